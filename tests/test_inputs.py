"""`cpift regions` takes what a merge recipe takes: hub ids (from the hub's cache),
``base+lora``, a bare LoRA adapter folder, and PyTorch ``.bin`` checkpoints, with the same
masks as on the equivalent safetensors folder; and a global-scope `cpi` merge reads ``.bin``."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from cpift_merge.cli import main
from cpift_merge.storage.checkpoint import Checkpoint
from cpift_merge.storage.regions import load_regions


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cpift-cache"))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def regions(base, models, out, density=0.05):
    args = ["regions", "--base", base, "--density", density, "--out", out, "--quiet"]
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return load_regions(str(out))


def same_masks(r1, r2):
    assert r1.tasks == r2.tasks
    for t in r1.tasks:
        m1, m2 = r1.masks(t), r2.masks(t)
        assert m1.keys() == m2.keys()
        assert all(torch.equal(m1[n], m2[n]) for n in m1)
        assert r1.k(t) == r2.k(t) and r1.k(t) > 0


def as_bin(src: str, dst: str, shards: int = 1) -> str:
    """The checkpoint in ``src`` re-saved as PyTorch .bin (one file, or ``shards`` files with
    a ``pytorch_model.bin.index.json``), config beside it."""
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), dst)
    if shards == 1:
        torch.save(tensors, os.path.join(dst, "pytorch_model.bin"))
        return dst
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: tensors[n] for n in part}, os.path.join(dst, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return dst


def test_bin_checkpoints_give_the_same_masks_as_safetensors(tiny_models, tmp_path):
    st = regions(tiny_models["base"], {t: tiny_models[t] for t in "ab"}, tmp_path / "st")
    base = as_bin(tiny_models["base"], str(tmp_path / "base-bin"))
    a = as_bin(tiny_models["a"], str(tmp_path / "a-bin"), shards=3)
    b = as_bin(tiny_models["b"], str(tmp_path / "b-bin"))
    same_masks(st, regions(base, {"a": a, "b": b}, tmp_path / "bin"))
    ck = Checkpoint(a)
    ref = load_file(os.path.join(tiny_models["a"], "model.safetensors"))
    assert set(ck.names()) == set(ref) and all(torch.equal(ck.get(n), ref[n]) for n in ref)


def test_global_cpi_merge_reads_bin_inputs(tiny_models, tmp_path):
    def merge(paths, out):
        cfg = {
            "dtype": "float32",
            "merge_method": "cpi",
            "base_model": paths["base"],
            "models": [{"model": paths[t]} for t in "ab"],
            "parameters": {"omega": 0.5, "density": 0.05},
        }
        path = tmp_path / f"{out}.yml"
        path.write_text(yaml.safe_dump(cfg))
        r = cli("merge", path, tmp_path / out, "--quiet")
        assert r.exit_code == 0 and r.output == "", r.output  # --quiet: nothing on success
        return load_file(str(tmp_path / out / "model.safetensors"))

    st = merge(tiny_models, "st")
    bins = {t: as_bin(tiny_models[t], str(tmp_path / f"{t}-bin")) for t in ("base", "a", "b")}
    got = merge(bins, "bin")
    assert st.keys() == got.keys() and all(torch.equal(st[n], got[n]) for n in st)


def test_unreadable_bin_is_one_line(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"not a torch file")
    r = cli("regions", "--base", tiny_models["base"], "--model", f"a={bad}", "--density", 0.05, "--out", tmp_path / "o")
    assert r.exit_code != 0 and "cannot read" in r.output and "re-save it as safetensors" in r.output
    assert not (tmp_path / "o").exists()


@pytest.fixture
def lora(tiny_models, tmp_path):
    """A LoRA adapter (random nonzero weights) on the tiny base, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    path = str(tmp_path / "adapter")
    peft_model.save_pretrained(path)
    merged = str(tmp_path / "merged")
    peft_model.merge_and_unload().save_pretrained(merged)
    return path, merged


def test_lora_inputs_give_the_masks_of_the_merged_folder(tiny_models, lora, tmp_path):
    adapter, merged = lora
    base = tiny_models["base"]
    want = regions(base, {"a": tiny_models["a"], "l": merged}, tmp_path / "reg-merged")
    same_masks(want, regions(base, {"a": tiny_models["a"], "l": f"{base}+{adapter}"}, tmp_path / "plus"))
    same_masks(want, regions(base, {"a": tiny_models["a"], "l": adapter}, tmp_path / "bare"))
    cached = os.listdir(tmp_path / "cpift-cache" / "lora")
    assert len(cached) == 1 and not any(c.startswith(".tmp-") for c in cached)  # one merge, reused


def test_lora_adapter_without_a_base_is_one_line(tiny_models, lora, tmp_path):
    adapter, _merged = lora
    cfg_file = os.path.join(adapter, "adapter_config.json")
    with open(cfg_file) as fh:
        cfg = json.load(fh)
    cfg["base_model_name_or_path"] = None
    with open(cfg_file, "w") as fh:
        json.dump(cfg, fh)
    r = cli("regions", "--base", tiny_models["base"], "--model", f"l={adapter}", "--density", 0.05,
            "--out", tmp_path / "o")  # fmt: skip
    assert r.exit_code != 0 and "names no base model" in r.output and "BASE+" in r.output
    assert not (tmp_path / "o").exists()


def hub_cache(root, repo: str, folder: str) -> None:
    """``folder`` laid out as the hub's cache holds a downloaded ``repo`` (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(entry, "refs"))
    with open(os.path.join(entry, "refs", "main"), "w") as fh:
        fh.write(commit)
    shutil.copytree(folder, os.path.join(entry, "snapshots", commit))


def test_hub_ids_resolve_from_the_cache_offline(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = str(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_cache(cache, "tiny-org/base", tiny_models["base"])
    hub_cache(cache, "tiny-org/a", tiny_models["a"])
    want = regions(tiny_models["base"], {"a": tiny_models["a"]}, tmp_path / "local")
    same_masks(want, regions("tiny-org/base", {"a": "tiny-org/a"}, tmp_path / "hub-ids"))
    r = cli("regions", "--base", "tiny-org/base", "--model", "a=tiny-org/nope", "--density", 0.05,
            "--out", tmp_path / "o")  # fmt: skip
    assert r.exit_code != 0 and "model tiny-org/nope: no such folder" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
