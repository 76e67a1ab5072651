"""Isolation ablation: one row per isolation option (and combination), on one seesaw run each.

Each variant is the CPU seesaw pipeline (``benchmarks/seesaw_cpu.yml``) on four built-in
tasks (math, format and the conflicting pair pick_first/pick_last) with some ``--set``
overrides, run through ``benchmarks/seesaw.py`` with the methods cpift, dpi,
full_sft_matched, sequential (math/format both ways, with ``sequential.transplant``) and
graft; the ``paper`` variant also runs full_sft, the same model for every variant of a seed.
Per variant it prints, mean ± std over the seeds that finished:

* the cores' localization: share of ‖Δ‖₂² in the 1% (or 10%) core by |Δ| and the mean
  Jaccard between tasks' cores (grouping), and the number of groups;
* the graft test: share of the probe's held-out-loss gain kept by its core alone and by the
  probe with its core reset to θ0 (mean over tasks);
* Table 1's average normalized score (0-10) of the CPI-FT merge before calibration, CPI-FT,
  DPI, and full SFT at CPI-FT's step count, beside full SFT;
* Table 2 by held-out loss: the cut in A's forgetting against plain SFT (the ``paper`` run's,
  with no option) for the variant's own sequential SFT with nothing frozen (not 0 only where
  the option changes sequential training, as replay does), for the frozen core and for the
  transplant, and the share of plain SFT's learning of B they keep (mean of the two
  directions; the per-direction figures follow in a second table).

Runs are seed-major (every variant's seed 0 first), each in its own process; a finished run
(``results.json`` there) is read back, not rerun, so an interrupted ablation continues where
it stopped. A run starts from a copy of a finished same-seed sibling whose weights are still
there (same probe optimizer preferred): the pipeline's fingerprinted steps then reuse what is
the same (the base's evaluation, plain sequential SFT, the probes) and rerun the rest
(``--no-reuse`` starts every run from nothing). Model weights are deleted when a seed's
variants are done, unless ``--keep-models``.

    python benchmarks/isolation.py --work runs/isolation                  # all variants, seeds 0,1,2
    python benchmarks/isolation.py --work runs/isolation --seeds 0 --variants paper,sgd_fisher
    python benchmarks/isolation.py --work runs/isolation --report-only    # table of what finished
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

TASKS = (
    "tasks=[{name: math, builtin: math}, {name: format, builtin: format},"
    " {name: pick_first, builtin: pick_first}, {name: pick_last, builtin: pick_last}]"
)
COMMON = [TASKS, "sequential.pair=[math, format]", "sequential.transplant=true"]
METHODS = "cpift,dpi,full_sft_matched,sequential,graft"

# name -> (what it is, --set overrides). The first is the papers' recipe, our default.
VARIANTS = {
    "paper": ("paper default: AdamW probe, |Δ|, 1%", []),
    "sgd_fisher": ("SGD probe + fisher score", ["probe.optimizer=sgd", "regions.score=fisher"]),
    "sgd_fisher_d10": (
        "SGD probe + fisher score, 10%",
        ["probe.optimizer=sgd", "regions.score=fisher", "regions.density=0.1"],
    ),
    "sgd": ("SGD probe", ["probe.optimizer=sgd"]),
    "sgd_d10": ("SGD probe, 10%", ["probe.optimizer=sgd", "regions.density=0.1"]),
    "fisher": ("fisher score (AdamW probe)", ["regions.score=fisher"]),
    "sparse": ("sparse probes", ["probe.sparse=true"]),
    "sparse_core": ("sparse probes + update: core", ["probe.sparse=true", "stage.update=core"]),
    "sgd_core": ("SGD probe + update: core", ["probe.optimizer=sgd", "stage.update=core"]),
    "replay8": ("replay 8 (stages and sequential B)", ["stage.replay=8"]),
}


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_dir(work, variant, seed):
    return os.path.join(work, variant, f"seed-{seed}")


def read(work, variant, seed):
    path = os.path.join(run_dir(work, variant, seed), "results.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


WEIGHTS = (".safetensors", ".bin", ".pt")


def weight_files(folder):
    """Model weight files under a run folder (region masks are not weights)."""
    for root, _dirs, files in os.walk(folder):
        if "masks" not in root:
            yield from (os.path.join(root, f) for f in files if f.endswith(WEIGHTS))


def prune(folder, seen=None):
    """Deletes model weights under a finished run; its results and region files stay.
    Returns the bytes freed, counting a file hard-linked into several runs once (``seen``:
    the inodes already counted)."""
    freed, seen = 0, set() if seen is None else seen
    for p in list(weight_files(folder)):
        st = os.stat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            freed += st.st_size
        os.remove(p)
    return freed


RUN_LEVEL = ("results.json", "report.md")  # written at the end of a run: never copied from a donor


def donor_for(work, variant, seed):
    """A finished same-seed run of another variant whose weights are still there, to start from.

    The pipeline's steps are fingerprinted (base, data, every setting a step depends on), so
    a run that starts from a copy of a sibling reuses exactly the steps whose inputs are the
    same (the base model's evaluation, plain sequential SFT, and, with the same probe
    optimizer, the probes) and reruns the rest. Preference: same probe optimizer, then the
    most ``--set`` overrides in common."""
    mine = set(VARIANTS[variant][1])
    opt = "probe.optimizer=sgd" in mine
    best = None
    for other in VARIANTS:
        d = run_dir(work, other, seed)
        if other == variant or read(work, other, seed) is None or next(weight_files(d), None) is None:
            continue
        theirs = set(VARIANTS[other][1])
        key = (("probe.optimizer=sgd" in theirs) == opt, len(mine & theirs), -len(theirs - mine))
        if best is None or key > best[0]:
            best = (key, other)
    return None if best is None else best[1]


def stamp(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def seed_from(donor_dir, dest):
    """Copies a finished run folder as the start of another: weight files hard-linked (steps
    write to a temporary sibling and rename, so a rerun step never writes into a shared
    file), everything else copied, the run-level results left out. Returns the linked files'
    (size, mtime) stamps, to check afterwards that the donor's weights were not touched."""
    stamps = {}
    for root, _dirs, files in os.walk(donor_dir):
        rel = os.path.relpath(root, donor_dir)
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for f in files:
            src, dst = os.path.join(root, f), os.path.join(dest, rel, f)
            if rel == "." and f in RUN_LEVEL:
                continue
            if f.endswith(WEIGHTS):
                os.link(src, dst)
                stamps[src] = stamp(src)
            else:
                shutil.copy2(src, dst)
    return stamps


def launch(args, variant, seed):
    sets = COMMON + VARIANTS[variant][1]
    methods = METHODS + (",full_sft" if variant == "paper" else "")
    out = os.path.join(args.work, variant)
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, os.path.join(HERE, "seesaw.py"), "--seeds", str(seed), "--out", out, "--quiet"]
    cmd += ["--methods", methods] + [a for s in sets for a in ("--set", s)]
    cmd += ["--device", args.device] if args.device else []
    log = os.path.join(out, f"seed-{seed}.log")
    here = run_dir(args.work, variant, seed)
    donor, stamps = None, {}
    if args.reuse and not os.path.exists(here):
        donor = donor_for(args.work, variant, seed)
        if donor:
            stamps = seed_from(run_dir(args.work, donor, seed), here)
            with open(os.path.join(here, "reused_from.txt"), "w", encoding="utf-8") as fh:
                fh.write(f"started from a copy of {donor}/seed-{seed}; its matching steps were reused\n")
            print(f"== {variant} seed {seed}: starting from {donor} seed {seed}'s finished steps", flush=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    took = time.time() - t0
    touched = [p for p, s in stamps.items() if not os.path.exists(p) or stamp(p) != s]
    if touched:
        print(f"== WARNING: {len(touched)} of {donor}'s weight files changed in the run, e.g. {touched[0]}", flush=True)
    if rc != 0:
        print(f"== {variant} seed {seed}: FAILED (rc {rc}) after {took:.0f} s, see {log}", flush=True)
        return False
    print(f"== {variant} seed {seed}: done in {took:.0f} s", flush=True)
    return True


def regions_of(work, variant, seed):
    path = os.path.join(run_dir(work, variant, seed), "regions", "regions.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def plain_reference(work, seed):
    """Plain sequential SFT of a seed from any finished run whose options leave sequential
    training alone (every variant but replay), for a seed whose ``paper`` run is missing."""
    for v, (_what, sets) in VARIANTS.items():
        r = read(work, v, seed)
        if r and r.get("forgetting") and not any(s.startswith("stage.replay") for s in sets):
            return r["forgetting"]
    return None


def row_of(work, variant, seeds):
    """Per-seed figures of one variant, then mean ± std over the seeds that finished."""
    per = []
    for s in seeds:
        r = read(work, variant, s)
        if r is None:
            continue
        reg = regions_of(work, variant, s) or {}
        tasks = list(r["tasks"])
        shares = [reg["tasks"][t]["core_share_l2"] for t in tasks if t in reg.get("tasks", {})]
        jac = [r["jaccard"][a][b] for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
        graft = r.get("graft") or {}
        core_only = [g["core-core"]["kept_loss"] for g in graft.values()]
        removed = [g["rest-core"]["kept_loss"] for g in graft.values()]
        scores = {m: rec["avg_normalized"] for m, rec in r["methods"].items()}
        paper = read(work, "paper", s)
        full = paper["methods"]["full_sft"]["avg_normalized"] if paper and "full_sft" in paper["methods"] else None
        fg = r.get("forgetting") or {}
        # against plain SFT without any option (the paper run's, same seed and direction): a
        # variant that changes sequential training itself (replay) changes its own plain row
        ref = (paper or {}).get("forgetting") or plain_reference(work, s) or fg
        cut = {"plain": [], "frozen": [], "plain_transplant": []}
        keep_b = {"plain": [], "frozen": [], "plain_transplant": []}
        for direction, rows in fg.items():
            plain = (ref.get(direction) or rows)["plain"]
            for v in cut:
                if v in rows and "delta_first_loss" in rows[v]:
                    cut[v].append(1 - rows[v]["delta_first_loss"] / plain["delta_first_loss"])
                    keep_b[v].append(rows[v]["delta_second_loss"] / plain["delta_second_loss"])
        per.append(
            {
                "seed": s,
                "core_share_l2": statistics.fmean(shares) if shares else None,
                "jaccard": statistics.fmean(jac) if jac else None,
                "groups": len(r["groups"]),
                "core_only": statistics.fmean(core_only) if core_only else None,
                "core_removed": statistics.fmean(removed) if removed else None,
                "merged": scores.get("cpift_merged"),
                "cpift": scores.get("cpift"),
                "dpi": scores.get("dpi"),
                "matched": scores.get("full_sft_matched"),
                "full_sft": full,
                "cut_plain": statistics.fmean(cut["plain"]) if cut["plain"] else None,
                "b_plain": statistics.fmean(keep_b["plain"]) if keep_b["plain"] else None,
                "cut_frozen": statistics.fmean(cut["frozen"]) if cut["frozen"] else None,
                "b_frozen": statistics.fmean(keep_b["frozen"]) if keep_b["frozen"] else None,
                "cut_transplant": statistics.fmean(cut["plain_transplant"]) if cut["plain_transplant"] else None,
                "b_transplant": statistics.fmean(keep_b["plain_transplant"]) if keep_b["plain_transplant"] else None,
                "forgetting": fg,
            }
        )
    if not per:
        return None
    keys = [k for k in per[0] if k not in ("seed", "forgetting")]
    agg = {k: mean_std([p[k] for p in per]) for k in keys}
    agg["seeds"] = [p["seed"] for p in per]
    agg["per_seed"] = per
    return agg


COLUMNS = (
    ("core_share_l2", "core ‖Δ‖² share", "pct"),
    ("jaccard", "Jaccard", "f3"),
    ("groups", "groups", "f1"),
    ("core_only", "graft: core only", "pct"),
    ("core_removed", "graft: core removed", "pct"),
    ("merged", "merge (T1)", "f2"),
    ("cpift", "CPI-FT (T1)", "f2"),
    ("dpi", "DPI (T1)", "f2"),
    ("matched", "full SFT, same steps (T1)", "f2"),
    ("full_sft", "full SFT (T1)", "f2"),
    ("cut_plain", "forgetting cut, nothing frozen", "pct"),
    ("b_plain", "B's gain kept, nothing frozen", "pct"),
    ("cut_frozen", "forgetting cut, frozen", "pct"),
    ("b_frozen", "B's gain kept, frozen", "pct"),
    ("cut_transplant", "forgetting cut, transplant", "pct"),
    ("b_transplant", "B's gain kept, transplant", "pct"),
)


def cell(ms, kind, n):
    if ms is None:
        return "-"
    m, s = ms
    if kind == "pct":
        return f"{100 * m:.0f}%" + (f" ± {100 * s:.0f}" if n > 1 else "")
    digits = {"f1": 1, "f2": 2, "f3": 3}[kind]
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if n > 1 else "")


def _pair(rec, variant):
    if variant not in rec or "delta_first_loss" not in rec[variant]:
        return "-"
    return f"{rec[variant]['delta_first_loss']:+.3f} / {rec[variant]['delta_second_loss']:+.3f}"


def render(rows):
    from cpift_merge.pipeline.report import format_table

    header = ["variant", "seeds"] + [label for _k, label, _f in COLUMNS]
    body = []
    for name, agg in rows.items():
        n = len(agg["seeds"])
        cells = [cell(agg[k], f, n) for k, _l, f in COLUMNS]
        body.append([VARIANTS[name][0], ",".join(map(str, agg["seeds"]))] + cells)
    out = [format_table(header, body), ""]
    # Per direction: A's forgetting (Δ held-out loss, up = worse) and B's learning, per row.
    header2 = ["variant", "seed", "direction", "plain ΔA / ΔB", "frozen ΔA / ΔB", "transplant ΔA / ΔB"]
    body2 = []
    for name, agg in rows.items():
        for p in agg["per_seed"]:
            for d, rec in p["forgetting"].items():
                pairs = [_pair(rec, v) for v in ("plain", "frozen", "plain_transplant")]
                body2.append([name, str(p["seed"]), d] + pairs)
    out += ["Forgetting per direction (held-out loss; A = first task, B = second)", "", format_table(header2, body2)]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/isolation", help="WORK/VARIANT/seed-S per run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    ap.add_argument("--keep-models", action="store_true", help="keep every run's model weights (about 5 GB a run)")
    ap.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        help="start every run from nothing instead of from a same-seed sibling's finished steps",
    )
    ap.add_argument("--report-only", action="store_true", help="print the table of the finished runs, run nothing")
    ap.add_argument("--json", default=None, help="also write the aggregate here")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    t0 = time.time()
    if not args.report_only:
        for s in seeds:
            for v in variants:
                if read(args.work, v, s) is None:
                    launch(args, v, s)
            # weights stay until the seed's variants are done, so later ones can start from them
            if not args.keep_models:
                seen: set = set()
                freed = sum(prune(run_dir(args.work, v, s), seen) for v in variants)
                print(f"== seed {s}: weights deleted ({freed / 2**30:.1f} GiB)", flush=True)
    rows = {v: row_of(args.work, v, seeds) for v in variants}
    rows = {v: r for v, r in rows.items() if r is not None}
    if not rows:
        print("no finished runs under", args.work)
        return 1
    print(f"\nIsolation ablation, {args.work}; this invocation {(time.time() - t0) / 60:.0f} min\n")
    print(render(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
