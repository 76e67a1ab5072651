"""The recipes in merge_configs/: valid as written, and they run end to end.

Each recipe is loaded, its hub ids / local paths are swapped for the tiny fixture
models, it is validated (mergekit's MergeConfiguration and our value checks), run
(`cpift merge`, stock `mergekit-yaml`, stock `mergekit-multi`) and the output is loaded
back with transformers and checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, List

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from cpift_merge.cli import main
from cpift_merge.mergekit.config import check_cpi_values

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "merge_configs")
BIN = os.path.dirname(sys.executable)

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MATH_ID = "your-org/SmolLM2-135M-Instruct-math-sft"
CODE_ID = "your-org/SmolLM2-135M-Instruct-code-sft"
SUMM_ID = "your-org/SmolLM2-135M-Instruct-summarize-sft"
RECIPES = ["community_finetunes", "with_regions", "omega_gradient", "chain_multi", "tensor_scope"]
PIPELINES = ["pipeline_full"]  # `cpift run` files, not mergekit recipes: tests/test_pipeline.py


# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cpift-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def recipe_path(name: str) -> str:
    return os.path.join(CONFIGS, f"{name}.yml")


def load_docs(name: str) -> List[Dict[str, Any]]:
    with open(recipe_path(name), encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def hub_map(tiny: Dict[str, str]) -> Dict[str, str]:
    return {BASE_ID: tiny["base"], MATH_ID: tiny["a"], CODE_ID: tiny["b"], SUMM_ID: tiny["c"]}


def swap(obj: Any, mapping: Dict[str, str]) -> Any:
    """Replace every string equal to a key of ``mapping`` (model references)."""
    if isinstance(obj, dict):
        return {k: swap(v, mapping) for k, v in obj.items()}
    if isinstance(obj, list):
        return [swap(v, mapping) for v in obj]
    if isinstance(obj, str) and obj in mapping:
        return mapping[obj]
    return obj


def model_refs(doc: Dict[str, Any]) -> List[str]:
    refs = [doc["base_model"]] if doc.get("base_model") else []
    return refs + [m["model"] for m in doc.get("models") or []]


def validate(doc: Dict[str, Any]) -> None:
    from mergekit.config import MergeConfiguration

    from cpift_merge.mergekit import method

    method.register()
    config = MergeConfiguration.model_validate(doc)
    if doc["merge_method"] == "cpi":
        check_cpi_values(doc)
        method.check_parameters(config)


def write_yaml(path: str, docs: List[Dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump_all(docs, fh, sort_keys=False)
    return path


def run_cpift_merge(config: str, out: str) -> None:
    res = CliRunner().invoke(main, ["merge", "--quiet", "--no-copy-tokenizer", config, out])
    assert res.exit_code == 0, (res.output, res.exception)
    assert os.path.isdir(out)
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f or ".old-" in f]


def run_script(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(BIN, args[0]), *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


def state(path: str) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update({k: v.float() for k, v in load_file(os.path.join(path, f)).items()})
    return out


def load_output(path: str) -> Dict[str, torch.Tensor]:
    """Load a merge output with transformers; check it is finite and it runs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert sd, path
    for k, v in sd.items():
        assert torch.isfinite(v).all(), f"{k} of {path} is not finite"
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()
    return sd


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm())


def differs_from_all(sd, others: Dict[str, Dict[str, torch.Tensor]], atol=1e-6) -> None:
    """The merge is a new model: not a copy of the base or of any input."""
    for name, other in others.items():
        assert set(other) <= set(sd), name
        worst = max(float((sd[k] - other[k].float()).abs().max()) for k in other)
        assert worst > atol, f"output equals {name}"


# ------------------------------------------------------------------ the files


def test_every_recipe_is_present_and_commented():
    found = sorted(f[:-4] for f in os.listdir(CONFIGS) if f.endswith(".yml"))
    assert sorted(RECIPES + PIPELINES) == found
    for name in RECIPES:
        with open(recipe_path(name), encoding="utf-8") as fh:
            head = fh.read().splitlines()[:3]
        assert all(line.startswith("#") for line in head), name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_as_written(name):
    docs = load_docs(name)
    assert docs
    for doc in docs:
        validate({k: v for k, v in doc.items() if k != "name"})
    assert docs[0]["merge_method"] == "cpi"


# ------------------------------------------------------------------ end to end


def test_community_finetunes(tiny_models, tmp_path):
    (doc,) = load_docs("community_finetunes")
    assert doc["base_model"] == BASE_ID and len(doc["models"]) == 3
    assert doc["parameters"] == {"density": 0.01, "omega": 0.5, "scope": "global"}
    local = swap(doc, hub_map(tiny_models))
    assert set(model_refs(local)) == {tiny_models[k] for k in "base a b c".split()}
    validate(local)
    out = str(tmp_path / "out")
    run_cpift_merge(write_yaml(str(tmp_path / "recipe.yml"), [local]), out)

    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "# out\n" in card and ".tmp-" not in card  # titled after the final folder, as mergekit-yaml does
    front = yaml.safe_load(card.split("---")[1])  # hub front matter: mergekit's, with our tags added
    assert front["library_name"] == "transformers" and {"mergekit", "merge", "cpift-merge", "cpi"} <= set(front["tags"])
    assert "## Core regions" in card and "density 0.01, scope global, score delta" in card
    sd = load_output(out)
    base = state(tiny_models["base"])
    differs_from_all(sd, {n: state(tiny_models[n]) for n in ("base", "a", "b", "c")})
    stats = json.load(open(os.path.join(out, "cpi_stats.json")))
    D = sum(t.numel() for t in base.values())
    assert stats["scope"] == "global" and stats["density"] == 0.01
    assert list(stats["k"].values()) == [math.floor(0.01 * D)] * 3
    assert sum(stats["transplanted"].values()) == stats["core_entries"] > 0
    # each task's core goes to it (ties of overlaps go elsewhere: a few at most)
    for k in stats["transplanted"].values():
        assert math.floor(0.01 * D) - stats["overlap_entries"] <= k <= math.floor(0.01 * D)


def test_with_regions(tiny_models, tmp_path):
    from cpift_merge.storage.regions import compute_from_paths

    (doc,) = load_docs("with_regions")
    assert doc["parameters"]["regions"] == "./regions"
    tasks = {m["parameters"]["task"]: m["model"] for m in doc["models"]}
    assert sorted(tasks) == ["chat", "code", "math"]
    # lay the folders out as the recipe expects, next to a verbatim copy of it
    work = tmp_path / "project"
    (work / "models").mkdir(parents=True)
    fixture = dict(zip(["math", "code", "chat"], ["a", "b", "c"]))
    os.symlink(tiny_models["base"], work / doc["base_model"])
    for task, rel in tasks.items():
        os.symlink(tiny_models[fixture[task]], work / rel)
    rs = compute_from_paths(
        str(work / doc["base_model"]),
        {t: str(work / p) for t, p in tasks.items()},
        str(work / "regions"),
        density=0.01,
        scope="global",
        progress=False,
    )
    config = str(work / "with_regions.yml")
    with open(recipe_path("with_regions"), encoding="utf-8") as src, open(config, "w") as dst:
        dst.write(src.read())
    validate(doc)
    out = str(tmp_path / "out")
    run_cpift_merge(config, out)  # relative paths resolve from the recipe's folder

    sd = load_output(out)
    differs_from_all(sd, {n: state(tiny_models[n]) for n in ("base", "a", "b", "c")})
    stats = json.load(open(os.path.join(out, "cpi_stats.json")))
    assert stats["regions"] == rs.path
    assert stats["k"] == {t: rs.k(t) for t in rs.tasks}
    # the core of each task is transplanted bit for bit (where it is the only owner)
    models = {t: state(tiny_models[fixture[t]]) for t in tasks}
    checked = 0
    for name in rs.tensor_names:
        masks = {t: rs.mask(t, name) for t in tasks}
        owners = sum(m.to(torch.int64) for m in masks.values())
        for t, m in masks.items():
            only = m & (owners == 1)
            assert torch.equal(sd[name][only], models[t][name][only]), (t, name)
            checked += int(only.sum())
    assert checked > 0.9 * sum(rs.k(t) for t in tasks)


def test_omega_gradient_with_stock_mergekit_yaml(tiny_models, tmp_path):
    """Stock mergekit-yaml (no cpift code in the command) runs cpi: the autoload works."""
    (doc,) = load_docs("omega_gradient")
    omega = doc["parameters"]["omega"]
    assert [c.get("filter") for c in omega] == ["self_attn", "mlp", None]
    local = swap(doc, hub_map(tiny_models))
    local["dtype"] = "float32"  # finer than bf16 for the distance comparison below
    validate(local)
    config = write_yaml(str(tmp_path / "recipe.yml"), [local])
    out = str(tmp_path / "out")
    proc = run_script("mergekit-yaml", config, out, "--no-copy-tokenizer", "--quiet", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "regions:" not in proc.stderr  # --quiet: the in-kernel global pre-pass draws no bars either

    sd = load_output(out)
    base, a, b = (state(tiny_models[n]) for n in ("base", "a", "b"))
    differs_from_all(sd, {"base": base, "a": a, "b": b})

    def interpolated_step(name: str) -> float:
        """RMS move away from the base over the non-core (SLERPed) entries, i.e.
        those not transplanted bit for bit from a or b."""
        free = (sd[name] != a[name]) & (sd[name] != b[name])
        assert free.float().mean() > 0.9, name
        return float((sd[name] - base[name])[free].pow(2).mean().sqrt())

    last = 1  # the tiny model has two layers: gradient positions 0 and 1
    for proj, grows in [
        ("self_attn.q_proj", True),
        ("self_attn.o_proj", True),
        ("mlp.up_proj", False),
        ("mlp.down_proj", False),
    ]:
        d0 = interpolated_step(f"model.layers.0.{proj}.weight")
        d1 = interpolated_step(f"model.layers.{last}.{proj}.weight")
        # omega 0.2 -> 0.8 in attention, 0.8 -> 0.2 in the mlp: a step 4x as long
        if grows:
            assert d1 > 3 * d0, (proj, d0, d1)
        else:
            assert d0 > 3 * d1, (proj, d0, d1)
    # unfiltered tensors get the default 0.5 in both layers
    n0 = interpolated_step("model.layers.0.input_layernorm.weight")
    n1 = interpolated_step(f"model.layers.{last}.input_layernorm.weight")
    assert 0.5 < n0 / n1 < 2.0


def test_chain_multi_with_stock_mergekit_multi(tiny_models, tmp_path):
    docs = load_docs("chain_multi")
    assert [d.get("name") for d in docs] == ["cpi_stage", None]
    assert docs[0]["merge_method"] == "cpi"
    assert docs[1]["base_model"] == "cpi_stage"
    assert "cpi_stage" in model_refs(docs[1])
    local = swap(docs, hub_map(tiny_models))
    for d in local:
        validate({k: v for k, v in d.items() if k != "name"})
    config = write_yaml(str(tmp_path / "chain.yml"), local)
    inter, out = str(tmp_path / "intermediate"), str(tmp_path / "out")
    proc = run_script(
        "mergekit-multi",
        config,
        "--intermediate-dir",
        inter,
        "--out-path",
        out,
        "--no-copy-tokenizer",
        "--quiet",
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    stage = load_output(os.path.join(inter, "cpi_stage"))
    final = load_output(out)
    other = state(tiny_models["c"])
    differs_from_all(stage, {n: state(tiny_models[n]) for n in ("base", "a", "b")})
    differs_from_all(final, {"cpi_stage": stage, "c": other})
    # slerp t 0.3 from cpi_stage towards the other model: nearer cpi_stage than it
    for name in ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]:
        whole = dist(other[name], stage[name])
        assert 0.1 * whole < dist(final[name], stage[name]) < 0.5 * whole


def test_tensor_scope(tiny_models, tmp_path):
    (doc,) = load_docs("tensor_scope")
    params = doc["parameters"]
    assert params["scope"] == "tensor" and params["overlap"] == "mean"
    local = swap(doc, hub_map(tiny_models))
    validate(local)
    out = str(tmp_path / "out")
    run_cpift_merge(write_yaml(str(tmp_path / "recipe.yml"), [local]), out)

    sd = load_output(out)
    differs_from_all(sd, {n: state(tiny_models[n]) for n in ("base", "a", "b", "c")})
    stats = json.load(open(os.path.join(out, "cpi_stats.json")))
    assert stats["scope"] == "tensor"
    per = stats["tensors"]
    assert set(per) == set(state(tiny_models["base"]))
    for name, st in per.items():
        if "norm" in name:
            assert st["core_entries"] == 0, name  # excluded: no core
        else:
            k = math.floor(params["density"] * st["numel"])
            # every tensor has its own cores: 3 tasks x k entries, minus overlaps
            assert k <= st["core_entries"] <= 3 * k, (name, st)
            assert sum(st["transplanted"].values()) >= st["core_entries"]
