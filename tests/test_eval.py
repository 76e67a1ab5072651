"""cpift eval: batched greedy generation and exact metrics on a tiny model."""

import json

import pytest
from click.testing import CliRunner

from cpift_merge.cli import _eval_specs, main
from cpift_merge.errors import CpiftError
from cpift_merge.evaluation.scoring import metric_fn


def always_true(output, answer):  # a user's own metric, loaded through py:
    return True


def test_eval_runs_and_writes_json(tiny_lm, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(5)) + "\n")
    out = tmp_path / "res.json"
    res = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            tiny_lm,
            "--task",
            f"add={data}:numeric",
            "--task",
            f"mine={data}:py:test_eval.always_true",
            "--max-new-tokens",
            "3",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())["tasks"]
    assert got["add"]["n"] == 5 and 0.0 <= got["add"]["score"] <= 100.0
    assert got["mine"]["score"] == 100.0  # the custom metric accepts everything
    assert got["add"]["samples"][0]["answer"] == "1"
    assert "add" in res.output and "numeric" in res.output


def test_eval_spec_parsing_and_errors():
    assert _eval_specs(["a=x.jsonl:exact"]) == {"a": ("x.jsonl", "exact")}
    assert _eval_specs(["a=d/x.jsonl:py:m.f"]) == {"a": ("d/x.jsonl", "py:m.f")}
    with pytest.raises(CpiftError):
        _eval_specs(["a=x.jsonl"])
    with pytest.raises(CpiftError):
        _eval_specs(["a=x.jsonl:exact", "a=y.jsonl:exact"])
    with pytest.raises(CpiftError):
        metric_fn("bleu")
    with pytest.raises(CpiftError):
        metric_fn("py:no_such_module_xyz.f")
    assert metric_fn("choice")("B. Ada", "B")
