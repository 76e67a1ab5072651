"""Probe optimizer: does the probe's optimizer decide whether a core localizes its task?

For each probe setting (the pipeline file's own, the papers' AdamW probe, and plain SGD
at several learning rates) and seed, runs

    cpift run PIPE --methods graft --seed S --out WORK/<setting>-s<S> --set probe.optimizer=... --set probe.lr=...

(probes, core regions, the graft test; finished runs are reused) and prints, per setting,
mean ± std over tasks and seeds of:

* ``loss gain``: the probe's held-out loss drop over theta_0 (how much it learned);
* ``core |Δ|₂²``: the share of the probe's squared update inside its core, and ``x random``
  (that share over the core's share of entries): 1 means the core is a random subset;
* ``Jaccard``: mean core overlap between two tasks (chance is about the density);
* ``core only`` / ``core removed``: the graft test's kept share of the loss gain for
  theta_0 + the core of Δ, and for the probe with its core reset to theta_0, and the same
  for a random mask of the core's size. The papers' premise predicts core only near 100%
  and core removed near 0%.

    python benchmarks/probe_optimizer.py                       # seesaw_cpu.yml tasks, seed 0
    python benchmarks/probe_optimizer.py --seeds 0,1,2 --sgd-lrs 0.03,0.1,0.3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(ms, pct=False, digits=2):
    if ms is None:
        return "-"
    m, s = ms
    if pct:
        return f"{100 * m:.0f} ± {100 * s:.0f}%"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def measure(run_dir):
    """Per-task figures of one finished `cpift run --methods graft`."""
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as fh:
        res = json.load(fh)
    with open(os.path.join(run_dir, "regions", "regions.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    tasks = list(res["graft"])
    rows = {}
    for t in tasks:
        g = res["graft"][t]
        info = meta["tasks"][t]
        random_share = info["k"] / meta["D"]
        rows[t] = {
            "gain": g["base"]["loss"] - g["probe"]["loss"],
            "share_l2": info.get("core_share_l2"),
            "ratio_l2": info["core_share_l2"] / random_share if info.get("core_share_l2") is not None else None,
            "jaccard": statistics.fmean(meta["jaccard"][t][u] for u in tasks if u != t) if len(tasks) > 1 else None,
            **{v: g[v]["kept_loss"] for v in ("core-core", "core-random", "rest-core", "rest-random")},
        }
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default=os.path.join(HERE, "seesaw_cpu.yml"))
    ap.add_argument("--work", default="runs/probe-optimizer", help="One run folder per setting and seed.")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--sgd-lrs", default="0.03,0.1,0.3", help="Plain SGD learning rates to try.")
    ap.add_argument("--adamw-lr", type=float, default=None, help="AdamW probe lr (default: the pipeline file's).")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Extra --set for every run.")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="Also write the table's figures here.")
    args = ap.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    settings = {"adamw": ["probe.optimizer=adamw"] + ([f"probe.lr={args.adamw_lr}"] if args.adamw_lr else [])}
    for lr in [float(x) for x in args.sgd_lrs.split(",") if x.strip()]:
        settings[f"sgd lr {lr:g}"] = ["probe.optimizer=sgd", f"probe.lr={lr}"]
    cpift = os.path.join(os.path.dirname(sys.executable), "cpift")
    figures = {}
    for name, sets in settings.items():
        per_task = []
        for seed in seeds:
            out = os.path.join(args.work, f"{name.replace(' ', '-')}-s{seed}")
            cmd = [cpift, "run", args.pipeline, "--methods", "graft", "--seed", str(seed), "--out", out, "--quiet"]
            cmd += [a for s in [*args.sets, *sets] for a in ("--set", s)]
            cmd += ["--device", args.device] if args.device else []
            t0 = time.time()
            print(f"[{name}, seed {seed}] {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            print(f"  {time.time() - t0:.0f} s", flush=True)
            per_task += list(measure(out).values())
        figures[name] = {k: mean_std([r[k] for r in per_task]) for k in per_task[0]}

    header = ["probe", "loss gain", "core |Δ|₂²", "x random", "Jaccard", "core only", "random only", "core removed",
              "random removed"]  # fmt: skip
    rows = []
    for name, f in figures.items():
        rows.append([
            name, fmt(f["gain"], digits=3), fmt(f["share_l2"], pct=True), fmt(f["ratio_l2"], digits=1),
            fmt(f["jaccard"], digits=3), fmt(f["core-core"], pct=True), fmt(f["core-random"], pct=True),
            fmt(f["rest-core"], pct=True), fmt(f["rest-random"], pct=True),
        ])  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    print(f"seeds {seeds}, pipeline {os.path.basename(args.pipeline)}; mean ± std over tasks and seeds")
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"seeds": seeds, "pipeline": args.pipeline, "figures": figures}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
