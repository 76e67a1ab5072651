#!/usr/bin/env python
"""Interpreter start-up cost of the ``cpift_merge_autoload`` hook, and that it works.

1. Runs ``python -c pass`` N times with the hook on and N times with
   ``CPIFT_NO_AUTOLOAD=1`` (the .pth line checks it), alternating which goes first,
   and reports median and mean wall time of each and the difference (target < 10 ms).
2. Runs ``python -X importtime -c pass`` (several times, median) and reports the self
   and cumulative microseconds of ``cpift_merge_autoload``.
3. Checks, with the hook on, that ``cpi`` is in ``registered_methods()`` and that every
   builtin method name (listed with the hook off) still resolves through
   ``mergekit.merge_methods.registry.get`` to the same method; and, with the hook
   off, that ``cpi`` is absent (the switch works).

``python`` is this interpreter (run it with the project's virtualenv). Exits 0 unless a
functional check fails (the timing target is reported, never enforced).

    python benchmarks/startup.py [-n 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from typing import Dict, List, Optional

HOOK = "cpift_merge_autoload"
TARGET_MS = 10.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LIST_METHODS = (
    "import json, mergekit.merge_methods as m; print(json.dumps(sorted(x.spec.name for x in m.registered_methods())))"
)
CPI_ON = "import mergekit.merge_methods as m; print('cpi' in [x.spec.name for x in m.registered_methods()])"
PLAN_CHECK = "import mergekit.plan as p; print(bool(getattr(p.MergePlanner.normalize_config, '_cpift_checked', False)))"
RESOLVE = (
    "import json, sys, mergekit.merge_methods as m\n"
    "from mergekit.merge_methods import registry\n"
    "bad = []\n"
    "for name in json.loads(sys.argv[1]):\n"
    "    try:\n"
    "        got = registry.get(name)\n"
    "        if got.spec.name != name: bad.append(f'{name} -> {got.spec.name}')\n"
    "    except Exception as err:\n"
    "        bad.append(f'{name}: {type(err).__name__}: {err}')\n"
    "print(json.dumps(bad))\n"
)


def env_with(autoload: bool, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("CPIFT_NO_AUTOLOAD", None)
    if not autoload:
        env["CPIFT_NO_AUTOLOAD"] = "1"
    env.update(extra or {})
    return env


def time_pass(autoload: bool, extra=None) -> float:
    env = env_with(autoload, extra)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - t) * 1000.0


def startup_times(n: int, extra=None) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {"on": [], "off": []}
    time_pass(True, extra), time_pass(False, extra)  # warm the page cache (and pyc prefix)
    for i in range(n):
        order = (True, False) if i % 2 == 0 else (False, True)
        for autoload in order:
            times["on" if autoload else "off"].append(time_pass(autoload, extra))
    return times


def importtime(runs: int) -> Dict[str, object]:
    """Median self/cumulative us of the hook's import under -X importtime."""
    selfs, cums = [], []
    for _ in range(runs):
        res = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "pass"],
            env=env_with(True),
            capture_output=True,
            text=True,
            check=True,
        )
        for line in res.stderr.splitlines():
            parts = [p.strip() for p in line.replace("import time:", "", 1).split("|")]
            if len(parts) == 3 and parts[2] == HOOK:
                selfs.append(int(parts[0]))
                cums.append(int(parts[1]))
                break

    # what else is imported at start-up with the hook on but not off (should be nothing)
    def imported(autoload: bool) -> set:
        res = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "pass"],
            env=env_with(autoload),
            capture_output=True,
            text=True,
            check=True,
        )
        return {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")} - {
            "imported package"
        }

    extra = sorted(imported(True) - imported(False))
    return {
        "found": bool(selfs),
        "self_us": statistics.median(selfs) if selfs else None,
        "cumulative_us": statistics.median(cums) if cums else None,
        "runs": len(selfs),
        "extra_modules": extra,
    }


def child(code: str, autoload: bool, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], env=env_with(autoload), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child failed (rc {res.returncode}): {res.stderr.strip()[-800:]}")
    return res.stdout.strip().splitlines()[-1]


def functional_checks() -> List[Dict[str, object]]:
    checks = []

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "result": "PASS" if ok else "FAIL", "detail": detail})

    try:
        out = child(CPI_ON, True)
        add("cpi registered (hook on)", out == "True", f"printed {out}")
    except RuntimeError as err:
        add("cpi registered (hook on)", False, str(err))
    try:
        out = child(CPI_ON, False)
        add("cpi absent (CPIFT_NO_AUTOLOAD=1)", out == "False", f"printed {out}")
    except RuntimeError as err:
        add("cpi absent (CPIFT_NO_AUTOLOAD=1)", False, str(err))
    try:
        builtin = json.loads(child(LIST_METHODS, False))
        on = json.loads(child(LIST_METHODS, True))
        bad = json.loads(child(RESOLVE, True, json.dumps(builtin)))
        add(f"{len(builtin)} builtin names resolve (hook on)", not bad, "; ".join(bad) or "all resolve to themselves")
        print("builtin methods (hook off): " + ", ".join(builtin))
        add(
            "hook adds only cpi",
            sorted(set(on) - set(builtin)) == ["cpi"] and set(builtin) <= set(on),
            f"added {sorted(set(on) - set(builtin))}, lost {sorted(set(builtin) - set(on))}",
        )
    except (RuntimeError, ValueError) as err:
        add("builtin names resolve (hook on)", False, str(err))
    try:
        out = child(PLAN_CHECK, True)
        add("parameter check installed on mergekit.plan", out == "True", f"printed {out}")
    except RuntimeError as err:
        add("parameter check installed on mergekit.plan", False, str(err))
    # the hook is installed by copying plugins/ into site-packages: is the copy current?
    site = sysconfig.get_paths()["purelib"]
    for name in (f"{HOOK}.py", f"{HOOK}.pth"):
        src, inst = os.path.join(REPO, "plugins", name), os.path.join(site, name)
        if os.path.isfile(src):
            same = os.path.isfile(inst) and open(src, "rb").read() == open(inst, "rb").read()
            add(
                f"installed {name} matches plugins/",
                same,
                inst if same else f"{inst} differs from {src} or is missing; reinstall the package",
            )
    return checks


def table(header, rows, left=(0,)) -> str:
    cells = [list(map(str, header))] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=30, help="runs of `python -c pass` per setting")
    ap.add_argument("--importtime-runs", type=int, default=7)
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    print(
        f"python {sys.executable} ({sys.version.split()[0]}), {os.cpu_count()} CPUs,"
        f" PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}"
    )
    times = startup_times(args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    rows = [
        ["hook on", med["on"], mean["on"], min(times["on"])],
        ["hook off (CPIFT_NO_AUTOLOAD=1)", med["off"], mean["off"], min(times["off"])],
        [
            "difference (on - off)",
            med["on"] - med["off"],
            mean["on"] - mean["off"],
            min(times["on"]) - min(times["off"]),
        ],
    ]
    print(f"\n`python -c pass`, {args.runs} runs each, alternating order (ms)")
    print(table(["setting", "median", "mean", "min"], rows))
    diff = med["on"] - med["off"]
    verdict = "PASS" if diff < TARGET_MS else "FAIL"
    print(f"start-up cost of the hook (median difference): {diff:.2f} ms, target < {TARGET_MS:g} ms: {verdict}")

    it = importtime(args.importtime_runs)
    print(f"\n`python -X importtime -c pass`, {it['runs']} runs (median, us)")
    if it["found"]:
        print(table(["module", "self us", "cumulative us"], [[HOOK, it["self_us"], it["cumulative_us"]]]))
    else:
        print(f"{HOOK} was not imported at start-up (is the .pth installed?)")
    print("modules imported at start-up only with the hook on: " + (", ".join(it["extra_modules"]) or "none"))

    print("\nfunctional checks")
    checks = functional_checks()
    print(
        table(
            ["check", "result", "detail"], [[c["check"], c["result"], c["detail"][:100]] for c in checks], left=(0, 2)
        )
    )

    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "python": sys.executable,
                    "runs": args.runs,
                    "times_ms": times,
                    "median_ms": med,
                    "mean_ms": mean,
                    "diff_median_ms": diff,
                    "target_ms": TARGET_MS,
                    "result": verdict,
                    "importtime": it,
                    "checks": checks,
                },
                fh,
                indent=1,
            )
        print(f"\nwrote {args.json}")
    return 1 if any(c["result"] == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
