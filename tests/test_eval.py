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


def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_eval_checks_its_options_before_loading_the_model(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    task = ["--task", f"add={data}:numeric"]
    missing = tmp_path / "no" / "such" / "res.json"
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "no-model"), *task, "--out", str(missing)])
    assert "folder" in _one_line(res) and "does not exist" in _one_line(res)
    import torch

    if not torch.cuda.is_available():
        res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "no-model"), *task, "--device", "cuda"])
        assert "no CUDA device" in _one_line(res)


def test_a_raising_user_metric_is_one_line_naming_it(tiny_lm, tmp_path):
    (tmp_path / "mymetrics.py").write_text("def boom(output, answer):\n    raise KeyError('oops')\n")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    from cpift_merge.evaluation.scoring import evaluate

    with pytest.raises(CpiftError, match=r"metric 'py:mymetrics.boom' raised KeyError: 'oops' \(output"):
        evaluate(tiny_lm, {"t": (str(data), "py:mymetrics.boom")}, 2, 1, metric_search=[str(tmp_path)])
    import sys

    assert str(tmp_path) not in sys.path  # the search folder is not left on the path


def test_heldout_loss_is_the_mean_response_token_loss(tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpift_merge.evaluation.scoring import heldout_loss
    from cpift_merge.training.data import Collator, encode_all

    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(7)]
    got = heldout_loss(tiny_lm, rows, max_length=64, batch_size=3)
    whole = heldout_loss(tiny_lm, rows, max_length=64, batch_size=100)  # batching changes nothing but rounding
    assert whole["loss"] == pytest.approx(got["loss"], rel=1e-6) and whole["tokens"] == got["tokens"]
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    enc, _ = encode_all(tok, rows, 64)
    batch = Collator(tok.pad_token_id)(enc)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(**batch).loss  # HF's own mean over the labelled tokens
    assert got["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert got["examples"] == 7 and got["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
