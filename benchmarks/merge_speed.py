#!/usr/bin/env python
"""Wall time and peak memory of ``cpi`` next to mergekit's ``linear`` and ``ties``.

Builds SmolLM2-135M-Instruct (fp32) plus three seeded task variants (reused when
already in ``--work``), writes one recipe per method, then runs each measurement as
its own child process -- the real command lines -- and reads the child's wall time,
CPU time and peak RSS from ``os.wait4`` (per method; CPU time includes processes the
command started and waited for, ``ru_maxrss`` is the largest single one of them), plus
RSS sampled from /proc and summed over the command's process tree (``tree``):

  linear   mergekit-yaml: base + 3 variants, equal weights
  ties     mergekit-yaml: base_model + 3 variants, density 0.01, weight 1
  cpi      cpift merge:   base_model + 3 variants, density 0.01, scope global, with the
           region pre-pass (CPIFT_CACHE points at a fresh empty folder for each run; the
           pre-pass runs in a child process beside the parent's imports)
  regions  cpift regions: density 0.01, 3 tasks, alone
  cpi_cached  cpift merge as cpi, with the pre-pass's cut already cached (a second merge of
           the same models: another omega, a re-run); the cut is made once, untimed
  cpi_spin as cpi_cached, with OpenMP's own default wait (GOMP_SPINCOUNT=300000: threads
           spin before they sleep) instead of the passive wait `cpift merge` sets
  cpi_torch   as cpi_cached, with the fused Numba loops turned off (CPIFT_FUSED=0): the
           kernel's torch ops only, as where Numba is not installed

Prints a table (median over ``--repeat`` runs) and the target ratios with PASS/FAIL.
Always exits 0 when every command ran (it is a benchmark); exits 1 if a command failed.

    python benchmarks/merge_speed.py [--work DIR] [--repeat N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from cpift_merge.pipeline.report import format_table

# layer bands (of SmolLM2-135M's 30) each variant pushes hardest: as in cpift_merge/demo.py
VARIANTS = {"math": range(0, 12), "code": range(9, 21), "chat": range(18, 30)}
SEED0 = 1000
DENSITY = 0.01
METHODS = ("linear", "ties", "cpi", "regions", "cpi_cached", "cpi_spin", "cpi_torch")
SPIN_DEFAULT = "300000"  # GNU OpenMP's spin count when no wait policy is set
ON_REQUEST = ("cpi_spin", "cpi_torch")  # run only when --methods names them
CACHED = ("cpi_cached", "cpi_spin", "cpi_torch")  # merges from the cached cut
# mergekit's writer holds the output shard it is filling in memory: one 100B shard gives one
# output file, and holds the whole merged model
ONE_FILE = "100B"
# (name, numerator, denominator, metric, op, target)
TARGETS = (
    ("cpi/linear wall", "cpi", "linear", "wall_s", "<=", 1.5),
    ("cpi/ties wall", "cpi", "ties", "wall_s", "<=", 0.5),
    ("cpi/linear RSS", "cpi", "linear", "rss_gb", "<=", 1.2),
    ("cpi_cached/linear wall", "cpi_cached", "linear", "wall_s", "<=", 1.2),
    ("regions RSS (GB)", "regions", None, "rss_gb", "<", 1.5),
)
BIN = os.path.dirname(sys.executable)  # console scripts of this interpreter's environment


def _script(name: str) -> str:
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


# ------------------------------------------------------------------ set-up


def prepare_models(work: str) -> Dict[str, str]:
    """Base (the converted SmolLM2, cached) and the three variants (made once)."""
    from cpift_merge.pipeline.models import make_variant, prepare_smollm2

    base = prepare_smollm2()
    paths = {"base": base}
    for i, (name, layers) in enumerate(VARIANTS.items()):
        out = os.path.join(work, "variants", name)
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            t = time.perf_counter()
            make_variant(base, out, seed=SEED0 + i, layers=list(layers))
            print(
                f"made variant {name} (seed {SEED0 + i}, layers {layers.start}-{layers.stop - 1})"
                f" in {time.perf_counter() - t:.1f} s",
                flush=True,
            )
        paths[name] = out
    return paths


def write_recipes(work: str, paths: Dict[str, str], dtype: str = "float32") -> Dict[str, str]:
    import yaml

    base = paths["base"]
    tasks = [paths[n] for n in VARIANTS]
    recipes = {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": p, "parameters": {"weight": 1.0}} for p in [base, *tasks]],
            "parameters": {"normalize": True},
            "dtype": dtype,
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": p} for p in tasks],
            "parameters": {"density": DENSITY, "weight": 1.0},
            "dtype": dtype,
        },
        "cpi": {
            "merge_method": "cpi",
            "base_model": base,
            "models": [{"model": p} for p in tasks],
            "parameters": {"density": DENSITY, "scope": "global"},
            "dtype": dtype,
        },
    }
    out = {}
    os.makedirs(os.path.join(work, "recipes"), exist_ok=True)
    for name, recipe in recipes.items():
        out[name] = os.path.join(work, "recipes", f"{name}.yml")
        with open(out[name], "w", encoding="utf-8") as fh:
            yaml.safe_dump(recipe, fh, sort_keys=False)
    return out


def command(
    method: str, work: str, paths: Dict[str, str], recipes: Dict[str, str], out: str, shard_size: str = ONE_FILE
) -> List[str]:
    shard = ["--out-shard-size", shard_size]
    if method in ("linear", "ties"):
        return [
            _script("mergekit-yaml"),
            recipes[method],
            out,
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
            *shard,
        ]
    if method == "cpi" or method in CACHED:
        return [
            _script("cpift"),
            "merge",
            recipes["cpi"],
            out,
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
            *shard,
        ]
    if method == "regions":
        models = [f"--model={n}={paths[n]}" for n in VARIANTS]
        return [
            _script("cpift"),
            "regions",
            "--base",
            paths["base"],
            *models,
            "--density",
            str(DENSITY),
            "--out",
            out,
            "--quiet",
        ]
    raise ValueError(method)


# -------------------------------------------------------------- measuring


class _Sampler(threading.Thread):
    """Polls /proc/PID/status of the command and of its child processes (``cpift
    merge`` runs its pre-pass in one) for the split of RSS into anonymous memory and
    file-backed pages (mostly the mmap'ed safetensors files), summed over the process
    tree. Sampled, so it can miss short peaks. ``ru_maxrss`` from wait4 is the peak of
    the largest single process (the command or a child it waited for); ``tree`` is the
    sampled peak of the sum over the processes alive at once."""

    def __init__(self, pid: int, every: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = {"RssAnon": 0, "RssFile": 0, "tree": 0}
        self.stop = threading.Event()

    @staticmethod
    def _tree(pid: int) -> List[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                with open(f"/proc/{p}/task/{p}/children", encoding="ascii") as fh:
                    todo += [int(c) for c in fh.read().split()]
            except (OSError, ValueError):
                pass
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            now = {"RssAnon": 0, "RssFile": 0}
            for pid in self._tree(self.pid):
                try:
                    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
                        for line in fh:
                            key, _, rest = line.partition(":")
                            if key in now:
                                now[key] += int(rest.split()[0])
                except (OSError, ValueError, IndexError):
                    pass
            for key, v in now.items():
                self.peak[key] = max(self.peak[key], v)
            self.peak["tree"] = max(self.peak["tree"], now["RssAnon"] + now["RssFile"])
            self.stop.wait(self.every)


def measure(cmd: List[str], env: Dict[str, str], log: str) -> Dict[str, float]:
    """Run ``cmd`` as a child; its wall time, peak RSS (ru_maxrss) and CPU time."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = _Sampler(proc.pid)
        sampler.start()
        _pid, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "rss_gb": ru.ru_maxrss * 1024 / 1e9,  # Linux: KiB
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "anon_gb": sampler.peak["RssAnon"] * 1024 / 1e9,
        "file_gb": sampler.peak["RssFile"] * 1024 / 1e9,
        "tree_gb": sampler.peak["tree"] * 1024 / 1e9,
    }


def cut_once(paths: Dict[str, str], env: Dict[str, str]) -> None:
    """Compute and cache the global pre-pass of the cpi recipe's models (untimed), as a
    first merge of these models would."""
    cmd = [sys.executable, "-m", "cpift_merge.mergekit.prepass", "--base", paths["base"], "--quiet"]
    cmd += ["--density", json.dumps(DENSITY)] + [a for n in VARIANTS for a in ("--task", paths[n])]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def run_one(
    method: str, rep: int, work: str, paths, recipes, keep: bool, shard_size: str = ONE_FILE
) -> Dict[str, float]:
    runs = os.path.join(work, "runs")
    os.makedirs(runs, exist_ok=True)
    out = os.path.join(runs, f"{method}-{rep}")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    fresh_cache = None
    if method == "cpi":
        # empty pre-pass cache: the run pays for the global region pre-pass; the recipe
        # names the models by absolute path, so the converted base is still used as is.
        fresh_cache = tempfile.mkdtemp(prefix="cpift-cache-", dir=runs)
        env["CPIFT_CACHE"] = fresh_cache
    elif method in CACHED:
        env["CPIFT_CACHE"] = os.path.join(runs, "cut-cache")
        cut_once(paths, env)
        if method == "cpi_spin":
            env["GOMP_SPINCOUNT"] = SPIN_DEFAULT
        if method == "cpi_torch":
            env["CPIFT_FUSED"] = "0"
    log = os.path.join(runs, f"{method}-{rep}.log")
    cmd = command(method, work, paths, recipes, out, shard_size)
    res = measure(cmd, env, log)
    res["cmd"] = " ".join(cmd)
    if res["rc"] == 0:
        want = "regions.json" if method == "regions" else "model.safetensors"
        if not any(os.path.isfile(os.path.join(out, w)) for w in (want, f"{want}.index.json")):
            res["rc"] = -1
            res["error"] = f"{want} missing from {out}"
    if res["rc"] != 0:
        with open(log, encoding="utf-8", errors="replace") as fh:
            res.setdefault("error", fh.read()[-2000:])
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
        if fresh_cache:
            shutil.rmtree(fresh_cache, ignore_errors=True)
    return res


# ---------------------------------------------------------------- reporting


def table(header, rows) -> str:
    return format_table(header, [[f"{c:.3f}" if isinstance(c, float) else c for c in r] for r in rows])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", help="folder for variants, recipes and outputs (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; the median is reported")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    ap.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m not in ON_REQUEST),
        help="comma list, subset of " + ",".join(METHODS),
    )
    ap.add_argument("--keep", action="store_true", help="keep merge outputs under WORK/runs")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or args.repeat < 1:
        ap.error(f"unknown methods {bad}" if bad else "--repeat must be >= 1")

    temp = None
    if args.work:
        work = os.path.abspath(args.work)
        os.makedirs(work, exist_ok=True)
    else:
        work = temp = tempfile.mkdtemp(prefix="cpift-bench-")
    try:
        paths = prepare_models(work)
        recipes = write_recipes(work, paths)
        print(f"work dir {work}; base {paths['base']}", flush=True)
        results: Dict[str, List[Dict]] = {m: [] for m in methods}
        for rep in range(args.repeat):
            for m in rotated(methods, rep):
                r = run_one(m, rep, work, paths, recipes, args.keep)
                results[m].append(r)
                status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
                print(
                    f"  run {rep + 1}/{args.repeat} {m:<8} {r['wall_s']:7.2f} s"
                    f"  {r['rss_gb']:6.3f} GB (anon {r['anon_gb']:.2f}, file {r['file_gb']:.2f},"
                    f" tree {r['tree_gb']:.2f})  cpu {r['cpu_s']:7.2f} s  {status}",
                    flush=True,
                )
                if r["rc"] != 0:
                    print(f"    {r['cmd']}\n    " + r["error"].strip().replace("\n", "\n    "), flush=True)
        return report(results, args, work)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def rotated(methods: List[str], rep: int) -> List[str]:
    """The methods in run ``rep``'s order: rotated each round, so a neighbour's load does not
    always hit the same method."""
    return methods[rep % len(methods) :] + methods[: rep % len(methods)]


def median_of(runs: List[Dict]) -> Dict:
    """Medians of the measured figures over the runs that succeeded, and every run's wall and RSS
    (``rc`` 0 when one run succeeded at least, else the first failure's)."""
    ok = [r for r in runs if r["rc"] == 0]
    keys = ("wall_s", "rss_gb", "cpu_s", "anon_gb", "file_gb", "tree_gb")
    out: Dict = {k: statistics.median(r[k] for r in ok) if ok else None for k in keys}
    out.update(
        runs=len(runs),
        failed=len(runs) - len(ok),
        rc=0 if ok else runs[0]["rc"],
        error=runs[0].get("error", "") if not ok and runs else "",
        all_wall_s=[round(r["wall_s"], 3) for r in runs],
        all_rss_gb=[round(r["rss_gb"], 4) for r in runs],
        cmd=runs[0]["cmd"] if runs else None,
    )
    return out


def report(results: Dict[str, List[Dict]], args, work: str) -> int:
    summary = {m: median_of(runs) for m, runs in results.items()}
    print()
    label = "median " if args.repeat > 1 else ""
    print(
        f"SmolLM2-135M fp32, 3 variants, density {DENSITY}; {args.repeat} run(s) per method"
        f" ({os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()})"
    )
    keys = ("wall_s", "rss_gb", "anon_gb", "file_gb", "tree_gb", "cpu_s")
    rows = [
        [m, *[("FAILED" if k == "wall_s" else "-") if s[k] is None else s[k] for k in keys]] for m, s in summary.items()
    ]
    print(
        table(
            ["method", f"{label}wall s", f"{label}peak RSS GB", "anon GB*", "file GB*", "tree GB*", f"{label}cpu s"],
            rows,
        )
    )
    print("peak RSS: ru_maxrss, the largest single process (the command or a child it waited for)")
    print("* sampled every 20 ms from /proc, summed over the command and its child processes:")
    print("  peaks of RssAnon (heap), RssFile (mmap'ed weights) and of their sum (tree)")
    print()
    checks = []
    for name, num, den, metric, op, target in TARGETS:
        a = summary.get(num, {}).get(metric)
        b = summary.get(den, {}).get(metric) if den else 1.0
        if a is None or b is None:
            checks.append({"check": name, "value": None, "target": f"{op} {target}", "result": "SKIP"})
            continue
        value = a / b
        ok = value <= target if op == "<=" else value < target
        checks.append({"check": name, "value": value, "target": f"{op} {target}", "result": "PASS" if ok else "FAIL"})
    print(
        table(
            ["check", "value", "target", "result"],
            [[c["check"], c["value"] if c["value"] is not None else "-", c["target"], c["result"]] for c in checks],
        )
    )
    for num, den, what in (("cpi_cached", "cpi_torch", "fused loops / torch ops only"),):
        if summary.get(num, {}).get("wall_s") and summary.get(den, {}).get("wall_s"):
            print(f"{what} (cut cached), wall: {summary[num]['wall_s'] / summary[den]['wall_s']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "work": work,
                    "repeat": args.repeat,
                    "density": DENSITY,
                    "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "methods": summary,
                    "runs": results,
                    "checks": checks,
                },
                fh,
                indent=1,
            )
        print(f"\nwrote {args.json}")
    failed = any(s["failed"] for s in summary.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
