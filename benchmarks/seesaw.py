"""Quality benchmark: every method of the CPI-FT comparison, several seeds, mean ± std.

Runs ``cpift run`` on a pipeline file once per seed (each seed changes the probes',
stages' and baselines' data order and the random stage order; the task data stay
fixed), then prints:

* Table 1: test accuracy per task and method, mean ± std over seeds, and the average
  normalized score (0-10);
* Table 2: forgetting in sequential fine-tuning (ΔA, ΔB for A→B and B→A), mean ± std;
* Table 3: the graft test (share of each probe's held-out-loss gain its core keeps
  alone, and that remains when it is removed, beside random masks), mean ± std;
* with ``expert`` and ``full_sft`` in the methods, the seesaw gap row of Table 1
  (expert on its own task minus full SFT, per seed, then mean ± std).

Finished seeds are reused (``cpift run`` reuses finished steps), so an interrupted
benchmark continues where it stopped.

    python benchmarks/seesaw.py                      # benchmarks/seesaw_cpu.yml, seeds 0,1,2
    python benchmarks/seesaw.py --pipeline merge_configs/pipeline_full.yml --device cuda --jobs 3
    python benchmarks/seesaw.py --methods sequential --set sequential.transplant=true --set probe.optimizer=sgd
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def mean_std(vals):
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return m, s


def aggregate(runs):
    """Mean ± std of every score across the runs' results.json."""
    first = runs[0]
    tasks = list(first["tasks"])
    table1 = {}
    for m in first["methods"]:
        row = {}
        for t in tasks:
            row[t] = mean_std([r["methods"][m]["scores"][t]["score"] for r in runs])
        row["avg_normalized"] = mean_std([r["methods"][m]["avg_normalized"] for r in runs])
        table1[m] = row
    table2 = {}
    for d, variants in (first.get("forgetting") or {}).items():
        for v, rec in variants.items():
            table2.setdefault(d, {})[v] = {
                "first": rec["first"],
                "second": rec["second"],
                "delta_first": mean_std([r["forgetting"][d][v]["delta_first"] for r in runs]),
                "delta_second": mean_std([r["forgetting"][d][v]["delta_second"] for r in runs]),
            }
            for k in ("delta_first_loss", "delta_second_loss"):
                if all(k in r["forgetting"][d][v] for r in runs):
                    table2[d][v][k] = mean_std([r["forgetting"][d][v][k] for r in runs])
    if all(r.get("seesaw_gap") for r in runs):
        gaps = [r["seesaw_gap"] for r in runs]
        table1["seesaw_gap"] = {t: mean_std([g[t] for g in gaps]) for t in tasks}
        table1["seesaw_gap"]["mean"] = mean_std([sum(g.values()) / len(g) for g in gaps])
    table3 = {}
    if all(r.get("graft") for r in runs):
        from cpift_merge.pipeline.report import GRAFT_COLUMNS

        for t in first["graft"]:
            row = {"gain": mean_std([r["graft"][t]["base"]["loss"] - r["graft"][t]["probe"]["loss"] for r in runs])}
            for key, _label in GRAFT_COLUMNS:
                vals = [r["graft"][t][key]["kept_loss"] for r in runs]
                row[key] = mean_std(vals) if None not in vals else None
            table3[t] = row
    return tasks, table1, table2, table3


def render(tasks, table1, table2, seeds, n_test, table3=None):
    from cpift_merge.pipeline.report import LABELS, format_table

    pm = lambda ms, signed=False: (f"{ms[0]:+.1f}" if signed else f"{ms[0]:.1f}") + f" ± {ms[1]:.1f}"  # noqa: E731
    from cpift_merge.pipeline.report import GAP_LABEL, GRAFT_COLUMNS

    rows = [
        [
            LABELS.get(m, m),
            *[pm(row[t]) for t in tasks],
            f"{row['avg_normalized'][0]:.2f} ± {row['avg_normalized'][1]:.2f}",
        ]
        for m, row in table1.items()
        if m != "seesaw_gap"
    ]
    if "seesaw_gap" in table1:
        gap = table1["seesaw_gap"]
        mean = gap["mean"]
        rows.append([GAP_LABEL, *[pm(gap[t], True) for t in tasks], f"{mean[0] / 10:+.2f} ± {mean[1] / 10:.2f}"])
    out = [
        f"Table 1: test accuracy (%), mean ± std over seeds {seeds} ({n_test} test examples per task)",
        "",
        format_table(["method", *tasks, "avg norm. (0-10)"], rows),
    ]
    if table2:
        from cpift_merge.pipeline.report import SEQ_VARIANTS

        losses = all("delta_first_loss" in rec for v in table2.values() for rec in v.values())
        pm3 = lambda ms: f"{ms[0]:+.3f} ± {ms[1]:.3f}"  # noqa: E731
        header = ["sequential"]
        for d, v in table2.items():
            header += [f"{d}: Δ{v['plain']['first']} (forgetting)", f"{d}: Δ{v['plain']['second']} (learning)"]
            header += [f"Δloss {v['plain']['first']}", f"Δloss {v['plain']['second']}"] if losses else []
        rows2 = []
        for variant, label in SEQ_VARIANTS:
            if not all(variant in v for v in table2.values()):
                continue
            row = [label]
            for v in table2.values():
                row += [pm(v[variant]["delta_first"], True), pm(v[variant]["delta_second"], True)]
                row += [pm3(v[variant]["delta_first_loss"]), pm3(v[variant]["delta_second_loss"])] if losses else []
            rows2.append(row)
        out += [
            "",
            "Table 2: sequential fine-tuning, change in test accuracy (points), mean ± std",
            "",
            format_table(header, rows2),
        ]
    if table3:
        pct = lambda ms: "-" if ms is None else f"{100 * ms[0]:.0f} ± {100 * ms[1]:.0f}%"  # noqa: E731
        rows3 = [
            [t, f"{row['gain'][0]:+.3f} ± {row['gain'][1]:.3f}", *[pct(row[key]) for key, _ in GRAFT_COLUMNS]]
            for t, row in table3.items()
        ]
        out += [
            "",
            "Table 3: graft test, share of each probe's held-out-loss gain kept, mean ± std",
            "",
            format_table(["task", "probe: loss gain", *[label for _k, label in GRAFT_COLUMNS]], rows3),
        ]
    return "\n".join(out)


def run_parallel(args, pipeline, seeds) -> None:
    """Runs each seed in a child process, ``args.jobs`` at a time; the sequential loop
    after it then only reads the finished runs back (every step is reused)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    def one(seed):
        cmd = (
            [
                sys.executable,
                os.path.abspath(__file__),
                "--pipeline",
                pipeline,
                "--seeds",
                str(seed),
                "--out",
                args.out,
                "--quiet",
            ]
            + (["--device", args.device] if args.device else [])
            + (["--methods", args.methods] if args.methods else [])
            + [a for item in args.sets for a in ("--set", item)]
        )
        log = os.path.join(args.out, f"seed-{seed}.log")
        with open(log, "w", encoding="utf-8") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        print(f"== seed {seed}: {'done' if rc == 0 else f'FAILED (rc {rc}), see {log}'}", flush=True)
        return rc

    print(f"== seeds {seeds}, {args.jobs} at a time; logs in {args.out}/seed-S.log", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [s for s, rc in zip(seeds, pool.map(one, seeds)) if rc != 0]
    if failed:
        raise SystemExit(f"seeds {failed} failed; see their logs in {args.out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pipeline",
        default=None,
        help="pipeline file (default: benchmarks/seesaw_cpu.yml, or merge_configs/pipeline_full.yml"
        " when a GPU is there)",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/seesaw", help="OUT/seed-S per seed")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    ap.add_argument("--methods", default=None, help="comma-separated methods (overrides the file's methods:)")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the pipeline file by its dotted key (as `cpift run --set`); repeatable",
    )
    ap.add_argument("--json", default=None, help="also write the aggregate here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run this many seeds at once, each in its own process (log: OUT/seed-S.log); a GPU"
        " is shared better by several small runs than used by one",
    )
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")

    import torch
    import transformers

    from cpift_merge.pipeline.config import load_pipeline
    from cpift_merge.pipeline.run import run_pipeline

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pipeline = args.pipeline
    if pipeline is None:
        gpu = torch.cuda.is_available() and args.device != "cpu"
        pipeline = (
            os.path.join(os.path.dirname(HERE), "merge_configs", "pipeline_full.yml")
            if gpu
            else os.path.join(HERE, "seesaw_cpu.yml")
        )
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    if args.jobs > 1 and len(seeds) > 1:
        run_parallel(args, pipeline, seeds)
    runs = []
    for s in seeds:
        over = {"seed": s, "out": os.path.join(args.out, f"seed-{s}"), "device": args.device}
        if args.methods:
            over["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
        pipe = load_pipeline(pipeline, over, args.sets)
        print(f"== seed {s}: {pipeline} -> {pipe.out}", flush=True)
        runs.append(run_pipeline(pipe, quiet=args.quiet))
        print(f"== seed {s} done ({runs[-1]['seconds']:.0f} s this run)", flush=True)
    tasks, table1, table2, table3 = aggregate(runs)
    n_test = runs[0]["methods"]["base"]["scores"][tasks[0]]["n"]
    text = render(tasks, table1, table2, seeds, n_test, table3)
    compute = sum(sum(r["timings"].values()) for r in runs)
    print()
    print(
        f"pipeline {os.path.relpath(pipeline)}; device {runs[0]['device']};"
        f" step time summed over seeds {compute / 60:.0f} min; this invocation {(time.time() - t0) / 60:.0f} min"
    )
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "pipeline": pipeline,
                    "seeds": seeds,
                    "table1": table1,
                    "table2": table2,
                    "table3": table3,
                    "experts": [r.get("experts") for r in runs],
                    "full_sft_matched": [r.get("full_sft_matched") for r in runs],
                    "runs": [r["out"] for r in runs],
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
