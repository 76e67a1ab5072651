#!/usr/bin/env python
"""How ``cpift regions`` and the ``cpi`` merge grow with model size, next to mergekit ``linear``.

Builds synthetic sharded safetensors checkpoints with Llama-7B tensor shapes (hidden 4096,
intermediate 11008, vocabulary 32000, untied embeddings, bf16): a base and three variants
(the base plus seeded noise), at each layer count of ``--layers`` (32 layers is about
6.7B parameters, 13.5 GB a model). For each size it runs, as child processes with the real
command lines of ``merge_speed.py``:

  regions  cpift regions: global scope, density 0.01, 3 tasks
  cpi      cpift merge:   base_model + 3 variants, density 0.01, scope global (fresh pre-pass cache)
  cpi_cached  the same merge with the pre-pass's cut already cached (made once, untimed)
  linear   mergekit-yaml: base + 3 variants, equal weights
  cpi_spin    cpi_cached with OpenMP's default spin-then-sleep wait, as `cpift merge` ran
              before it set OMP_WAIT_POLICY=PASSIVE (see --busy)
  cpi_torch   cpi_cached with the fused Numba loops off (CPIFT_FUSED=0): torch ops only

and reads wall time, peak RSS of the largest process (``ru_maxrss``) and RSS sampled over the
whole process tree. Prints a table (size, wall, peak RSS, RSS / largest tensor's bytes), the
fitted growth (seconds per billion parameters, and peak RSS at the largest size over the
smallest), and the issue's targets with PASS/FAIL. Sizes that do not fit on the disk (five
models: four inputs and one output; four with ``--methods regions``) are skipped with a line
saying so. Each size's models are deleted after it is measured unless ``--keep-models``.
The merges write shards of ``--out-shard-size`` (mergekit's default, 5B bytes): mergekit's
writer holds the shard it is filling in memory, so a merge's peak RSS grows with the model
up to that size, for ``linear`` and ``cpi`` alike, and is flat beyond it.
``--busy`` runs every timed command beside a peer that keeps all cores busy (a torch
matrix-product loop with one thread per core, as a training job on the same machine).

    python benchmarks/scale.py --layers 1,2,4 --work /tmp/scale [--json scale.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import merge_speed  # noqa: E402  (same folder: the command lines and the measuring)

HIDDEN, INTER, VOCAB, HEADS = 4096, 11008, 32000, 32
TASKS = tuple(merge_speed.VARIANTS)  # math, code, chat: the names merge_speed's commands use
METHODS = ("regions", "cpi", "cpi_cached", "linear", "cpi_spin", "cpi_torch")
# the --busy peer: every core multiplying matrices until it is killed
BUSY = "import os, torch\ntorch.set_num_threads(os.cpu_count())\na = torch.randn(1500, 1500)\nwhile True:\n    a @ a"
NOISE = 2e-3  # std of a variant's change (the base's entries have std 0.02)


def shapes(layers: int) -> Dict[str, List[int]]:
    out = {"model.embed_tokens.weight": [VOCAB, HIDDEN]}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{proj}.weight"] = [HIDDEN, HIDDEN]
        out[p + "mlp.gate_proj.weight"] = [INTER, HIDDEN]
        out[p + "mlp.up_proj.weight"] = [INTER, HIDDEN]
        out[p + "mlp.down_proj.weight"] = [HIDDEN, INTER]
        out[p + "input_layernorm.weight"] = [HIDDEN]
        out[p + "post_attention_layernorm.weight"] = [HIDDEN]
    out["model.norm.weight"] = [HIDDEN]
    out["lm_head.weight"] = [VOCAB, HIDDEN]
    return out


def numel(shape: List[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_bytes(layers: int) -> int:
    return 2 * sum(numel(s) for s in shapes(layers).values())


def shard_of(name: str) -> str:
    if ".layers." in name:
        return f"layer-{int(name.split('.')[2]):03d}"
    return "embed" if "embed" in name else "head"


def write_model(folder: str, layers: int, seed: int, base: Optional[str] = None) -> None:
    """The base (``base`` None: N(0, 0.02), norms 1) or a variant (``base`` + N(0, NOISE)),
    one safetensors shard per layer plus the embeddings and the head, with its index."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(seed)
    groups: Dict[str, List[str]] = {}
    for name in shapes(layers):
        groups.setdefault(shard_of(name), []).append(name)
    weight_map = {}
    for shard, names in groups.items():
        file = f"{shard}.safetensors"
        prior = load_file(os.path.join(base, file)) if base else None
        tensors = {}
        for name in names:
            shape = shapes(layers)[name]
            if prior is not None:
                t = prior[name].float() + torch.randn(shape, generator=gen) * NOISE
            elif len(shape) == 1:
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        del tensors, prior
    total = model_bytes(layers)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def build(work: str, layers: int) -> Dict[str, str]:
    root = os.path.join(work, f"L{layers}")
    paths = {"base": os.path.join(root, "base")}
    paths.update({t: os.path.join(root, t) for t in TASKS})
    for i, (name, path) in enumerate(paths.items()):
        if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
            continue
        t0 = time.perf_counter()
        # in a fresh child: this process stays small, so the children it forks to measure
        # do not start with its memory (ru_maxrss would count it until they exec)
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=write_model, args=(path, layers, i, None if name == "base" else paths["base"]))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building {path} failed (exit code {child.exitcode})")
        print(f"  built {name} ({layers} layers) in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def baseline_rss(work: str) -> float:
    """Peak RSS (GB) of an interpreter that imports what ``cpift regions`` imports, doing nothing."""
    code = "import torch, safetensors, cpift_merge.cli, cpift_merge.storage.regions"
    res = merge_speed.measure([sys.executable, "-c", code], dict(os.environ), os.path.join(work, "baseline.log"))
    return res["rss_gb"]


@contextlib.contextmanager
def busy_peer(on: bool):
    """A process keeping every core busy for the duration (nothing when ``on`` is false)."""
    if not on:
        yield
        return
    peer = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.DEVNULL)
    try:
        time.sleep(2)  # torch imported, the loop running
        yield
    finally:
        peer.kill()
        peer.wait()


def fit(xs: List[float], ys: List[float]):
    """Least-squares slope and intercept of ys on xs (one point: slope through zero)."""
    if len(xs) == 1:
        return ys[0] / xs[0], 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="1,2,4", help="comma-separated layer counts (32: Llama-7B, ~54 GB of inputs)")
    ap.add_argument("--work", required=True, help="folder for the synthetic models and outputs")
    ap.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m not in merge_speed.ON_REQUEST),
        help=f"comma list, subset of {','.join(METHODS)}",
    )
    ap.add_argument("--keep-models", action="store_true", help="keep each size's models (default: delete after)")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method and size, order rotated; medians reported")
    ap.add_argument("--busy", action="store_true", help="time every command beside a process using all cores")
    ap.add_argument(
        "--out-shard-size",
        default="5B",
        help="the merges' --out-shard-size (mergekit's default 5B; its writer holds one output shard in memory,"
        " so 100B holds the whole merged model)",
    )
    args = ap.parse_args(argv)
    from mergekit.options import parse_kmb

    sizes = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    try:
        shard_bytes = parse_kmb(args.out_shard_size)
    except ValueError:
        ap.error(f"--out-shard-size {args.out_shard_size!r}: a size like 1B, 500M or 5000000000")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not sizes or min(sizes) < 1:
        ap.error(f"unknown methods {bad}" if bad else "--layers: positive integers")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    base_gb = baseline_rss(work)
    largest = 2 * VOCAB * HIDDEN  # the embedding (and the head), bf16 bytes
    print(f"interpreter baseline {base_gb:.3f} GB; largest tensor {largest / 1e9:.3f} GB (bf16)", flush=True)
    rows: Dict[int, Dict[str, Dict[str, float]]] = {}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    outputs = int(any(m != "regions" for m in methods))  # a merge writes a fifth model
    for layers in sizes:
        need = (4 + outputs) * model_bytes(layers) * 1.05
        free = shutil.disk_usage(work).free
        have = sum(
            os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(os.path.join(work, f"L{layers}")) for f in fs
        )
        if need > free + have:
            print(f"{layers} layers: skipped, needs {need / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free", flush=True)
            continue
        params = model_bytes(layers) / 2e9
        print(f"{layers} layers ({params:.2f} B parameters, {model_bytes(layers) / 1e9:.1f} GB a model):", flush=True)
        # 4 inputs and the output in the page cache, plus the output shard mergekit's writer holds
        need_ram = 5 * model_bytes(layers) + min(model_bytes(layers), shard_bytes)
        if outputs and ram and need_ram > 0.9 * ram:
            # inputs, output and the merge's own memory then no longer stay in the page cache
            # together: merges read from disk, and a fresh pre-pass reads every input twice
            print(f"  (inputs, output and merge ~{need_ram / 1e9:.0f} GB, memory {ram / 1e9:.0f} GB:"
                  " merges read partly from disk)", flush=True)  # fmt: skip
        paths = build(work, layers)
        recipes = merge_speed.write_recipes(os.path.join(work, f"L{layers}"), paths, dtype="bfloat16")
        runs: Dict[str, List[Dict]] = {m: [] for m in methods}
        for rep in range(args.repeat):
            for m in merge_speed.rotated(methods, rep):
                with busy_peer(args.busy):
                    where = os.path.join(work, f"L{layers}")
                    r = merge_speed.run_one(m, rep, where, paths, recipes, keep=False, shard_size=args.out_shard_size)
                runs[m].append(r)
                status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}: {r.get('error', '')[-300:]}"
                print(
                    f"  {m:<8} {r['wall_s']:8.1f} s  peak {r['rss_gb']:.3f} GB  tree {r['tree_gb']:.3f} GB  {status}",
                    flush=True,
                )
        rows[layers] = {m: merge_speed.median_of(rs) for m, rs in runs.items()}
        if not args.keep_models:
            shutil.rmtree(os.path.join(work, f"L{layers}"), ignore_errors=True)
    return report(rows, methods, base_gb, largest, args)


def report(rows, methods, base_gb, largest, args) -> int:
    from cpift_merge.pipeline.report import format_table

    body = []
    for layers, res in rows.items():
        for m in methods:
            r = res.get(m)
            if not r or r["rc"] != 0:
                body.append([str(layers), f"{model_bytes(layers) / 2e9:.2f}", m, "FAILED", "-", "-", "-"])
                continue
            body.append(
                [
                    str(layers),
                    f"{model_bytes(layers) / 2e9:.2f}",
                    m,
                    f"{r['wall_s']:.1f}",
                    f"{r['rss_gb']:.3f}",
                    f"{r['tree_gb']:.3f}",
                    f"{r['rss_gb'] * 1e9 / largest:.2f}",
                ]
            )
    print()
    print(
        format_table(
            ["layers", "B params", "method", "wall s", "peak RSS GB", "tree RSS GB", "RSS / largest tensor"], body
        )
    )
    ok = {m: [(layers, res[m]) for layers, res in rows.items() if m in res and res[m]["rc"] == 0] for m in methods}
    print()
    growth = {}
    for m, pts in ok.items():
        if not pts:
            continue
        xs = [model_bytes(layers) / 2e9 for layers, _r in pts]
        slope, icpt = fit(xs, [r["wall_s"] for _l, r in pts])
        rss = [r["rss_gb"] for _l, r in pts]
        growth[m] = {"s_per_b_params": slope, "intercept_s": icpt, "rss_last_over_first": rss[-1] / rss[0]}
        print(
            f"{m:<8} wall ≈ {icpt:.1f} s + {slope:.1f} s per billion parameters; peak RSS"
            f" {rss[0]:.3f} -> {rss[-1]:.3f} GB ({rss[-1] / rss[0]:.2f}x) from {pts[0][0]} to {pts[-1][0]} layers"
        )
    checks = []
    last = max(rows) if rows else None
    if last is not None and "regions" in ok and ok["regions"]:
        reg = dict(ok["regions"])
        if last in reg:
            limit = 3 * largest / 1e9 + base_gb
            checks.append(("regions peak RSS < 3 x largest tensor + baseline", reg[last]["rss_gb"], f"< {limit:.3f}"))
            checks[-1] += ("PASS" if reg[last]["rss_gb"] < limit else "FAIL",)
        mid = [layers for layers in reg if layers < last]
        if mid:
            ratio = reg[last]["rss_gb"] / reg[max(mid)]["rss_gb"]
            verdict = "PASS" if ratio <= 1.1 else "FAIL"
            checks.append((f"regions RSS {last} / {max(mid)} layers", ratio, "<= 1.10", verdict))
    for layers, res in rows.items():
        if all(res.get(m, {}).get("rc") == 0 for m in ("cpi", "linear")):
            w = res["cpi"]["wall_s"] / res["linear"]["wall_s"]
            m_ = res["cpi"]["rss_gb"] / res["linear"]["rss_gb"]
            checks.append((f"cpi/linear wall, {layers} layers", w, "<= 1.5", "PASS" if w <= 1.5 else "FAIL"))
            checks.append((f"cpi/linear RSS, {layers} layers", m_, "<= 1.2", "PASS" if m_ <= 1.2 else "FAIL"))
        if all(res.get(m, {}).get("rc") == 0 for m in ("cpi_cached", "linear")):
            w = res["cpi_cached"]["wall_s"] / res["linear"]["wall_s"]
            verdict = "PASS" if w <= 1.5 else "FAIL"
            checks.append((f"cpi (cut cached)/linear wall, {layers} layers", w, "<= 1.5", verdict))
        if all(res.get(m, {}).get("rc") == 0 for m in ("cpi_cached", "cpi_spin")):
            w = res["cpi_cached"]["wall_s"] / res["cpi_spin"]["wall_s"]
            print(f"passive / spinning OpenMP wait (cut cached), {layers} layers: wall {w:.2f}x")
        if all(res.get(m, {}).get("rc") == 0 for m in ("cpi_cached", "cpi_torch")):
            w = res["cpi_cached"]["wall_s"] / res["cpi_torch"]["wall_s"]
            print(f"fused loops / torch ops only (cut cached), {layers} layers: wall {w:.2f}x")
    if checks:
        print()
        print(format_table(["check", "value", "target", "result"], [[c, f"{v:.3f}", t, r] for c, v, t, r in checks]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "cpus": os.cpu_count(),
                    "baseline_rss_gb": base_gb,
                    "largest_tensor_bytes": largest,
                    "rows": {str(k): v for k, v in rows.items()},
                    "growth": growth,
                    "checks": checks,
                    "busy": args.busy,
                },
                fh,
                indent=1,
            )
    failed = any(r["rc"] != 0 for res in rows.values() for r in res.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
