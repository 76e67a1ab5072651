"""`cpift graft`: the graft test on a base + fine-tune pair (tiny Llama, real training)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cpift_merge.cli import main
from cpift_merge.errors import CpiftError
from cpift_merge.pipeline.graft_test import VARIANTS, graft_test, kept_gain
from cpift_merge.storage.regions import compute_from_paths, load_regions
from cpift_merge.training.finetune import TrainConfig, finetune

ROWS = [{"prompt": f"add {i} and {i}", "response": f"{2 * i}"} for i in range(12)]


@pytest.fixture(scope="module")
def pair(tiny_lm, tmp_path_factory):
    """The tiny base, a fine-tune of it on ROWS, and a test file."""
    root = tmp_path_factory.mktemp("graft")
    tuned = str(root / "tuned")
    cfg = TrainConfig(steps=6, lr=1e-2, batch_size=4, max_length=48, save_steps=100, device="cpu")
    finetune(tiny_lm, ROWS, tuned, cfg, progress=False)
    test = root / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    return tiny_lm, tuned, str(test)


def test_graft_test_scores_every_variant_and_writes_one_record(pair, tmp_path):
    base, tuned, test = pair
    out = tmp_path / "g"
    res = graft_test(base, tuned, "add", test, "exact", str(out), density=0.05, max_length=48, max_new_tokens=4,
                     keep_models=True, progress=False)  # fmt: skip
    rec = res["graft"]
    assert rec["base"]["loss"] > rec["tuned"]["loss"]  # the fine-tune learned something to keep
    for v in VARIANTS:
        assert {k: rec[v][k] for k in ("kept_loss", "kept_score")} == kept_gain(rec[v], rec["base"], rec["tuned"])
        assert os.path.isfile(out / "models" / v / "model.safetensors")
    assert json.load(open(out / "graft.json")) == res
    rs = load_regions(str(out / "regions"))
    assert rs.tasks == ["add"] and rs.density == 0.05 and res["regions"] == str(out / "regions")
    # core only: theta_0 outside the core, the fine-tune on it (the graft's bits, through the CLI's path)
    w0, wt = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(tuned, "model.safetensors"))
    only = load_file(str(out / "models" / "core-core" / "model.safetensors"))
    for name in rs.tensor_names:
        m = rs.mask("add", name)
        assert (only[name][m] == wt[name][m]).all() and (only[name][~m] == w0[name][~m]).all()
    # without keep_models only the record and the regions stay; a given region dir is used as is
    res2 = graft_test(base, tuned, "add", test, "exact", str(tmp_path / "g2"), regions=str(out / "regions"),
                      max_length=48, max_new_tokens=4, progress=False)  # fmt: skip
    assert sorted(os.listdir(tmp_path / "g2")) == ["graft.json"]
    assert res2["graft"]["core-core"]["loss"] == pytest.approx(rec["core-core"]["loss"], rel=1e-5)


def test_graft_cli_prints_table_and_refuses_bad_input(pair, tmp_path):
    base, tuned, test = pair
    args = ["graft", "--base", base, "--model", f"add={tuned}", "--test", test, "--metric", "exact",
            "--density", "0.05", "--max-length", "48", "--max-new-tokens", "4", "--quiet"]  # fmt: skip
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    assert "core removed" in r.output and "wrote" in r.output
    assert os.path.isfile(tmp_path / "g" / "graft.json")
    # an existing out is refused without --overwrite, and left as it was
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "g")])
    assert r.exit_code != 0 and "exists" in r.output and len(r.output.strip().splitlines()) == 1
    other = str(tmp_path / "other")
    compute_from_paths(base, {"sub": tuned}, other, density=0.05, progress=False)
    for extra, expected in (
        (["--regions", other], "has no task 'add'"),
        (["--metric", "fuzzy"], "unknown metric 'fuzzy'"),
        (["--test", str(tmp_path / "none.jsonl")], "cannot read data file"),
    ):
        r = CliRunner().invoke(main, [*args, *extra, "--out", str(tmp_path / "bad")])
        assert r.exit_code != 0 and expected in r.output, r.output
        assert not os.path.exists(tmp_path / "bad")
    r = CliRunner().invoke(main, [*args[:3], "--model", tuned, *args[5:], "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "NAME=PATH" in r.output


def test_unknown_task_in_region_dir_is_refused_before_work(pair, tmp_path):
    base, tuned, test = pair
    rs_dir = str(tmp_path / "r")
    compute_from_paths(base, {"sub": tuned}, rs_dir, density=0.05, progress=False)
    with pytest.raises(CpiftError, match="has no task 'add'"):
        graft_test(base, tuned, "add", test, "exact", str(tmp_path / "g"), regions=rs_dir, progress=False)
    assert not os.path.exists(tmp_path / "g")


def test_transplant_copies_the_core_back_bit_for_bit(pair, tmp_path):
    """Sequential fine-tuning's transplant: the A->B model outside A's core, the model
    after A on it, both bit for bit."""
    from cpift_merge.mergekit.graft import transplant

    base, after_a, _ = pair
    rs = compute_from_paths(base, {"a": after_a}, str(tmp_path / "r"), density=0.05, progress=False)
    after_ab = str(tmp_path / "ab")
    other = [{"prompt": f"say {i}", "response": f"word{i}"} for i in range(8)]
    cfg = TrainConfig(steps=2, lr=1e-2, batch_size=4, max_length=48, save_steps=100, device="cpu")
    finetune(after_a, other, after_ab, cfg, progress=False)
    out = transplant(after_ab, after_a, rs, "a", str(tmp_path / "t"))
    got, ab, a = (load_file(os.path.join(p, "model.safetensors")) for p in (out, after_ab, after_a))
    moved = 0
    for name, t in got.items():
        core = rs.mask("a", name) if rs.has_tensor(name) else torch.zeros(t.shape, dtype=torch.bool)
        assert torch.equal(t[~core], ab[name][~core]) and torch.equal(t[core], a[name][core]), name
        moved += int((ab[name][core] != a[name][core]).sum())
    assert moved > 0  # B's training had moved A's core, and the transplant undid it
    assert os.path.isfile(os.path.join(out, "config.json"))
    with pytest.raises(CpiftError, match="has no task 'b'"):
        transplant(after_ab, after_a, rs, "b", str(tmp_path / "t2"))
    assert not os.path.exists(tmp_path / "t2")
    # the same through the command line, bit for bit; bad input is one line, nothing written
    args = ["transplant", "--regions", rs.path, "--task", "a", "--from", after_a, "--into", after_ab]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0 and "a's core" in res.output, res.output
    cli = load_file(os.path.join(str(tmp_path / "cli"), "model.safetensors"))
    assert all(torch.equal(cli[n], got[n]) for n in got)
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli")])
    assert res.exit_code == 2 and "exists" in res.output and "--overwrite" in res.output, res.output
    bad = [a if a != "a" else "b" for a in args]
    res = CliRunner().invoke(main, [*bad, "--out", str(tmp_path / "cli2")])
    assert res.exit_code == 2 and "has no task 'b'" in res.output and len(res.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "cli2")
