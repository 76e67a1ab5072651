"""``cpift eval``: batched greedy generation on task test sets, scored by exact metrics.

Metrics: ``exact`` (whitespace/case-normalised), ``numeric`` (last number in the
output), ``choice`` (the option letter), or ``py:module.function`` for a user's own
``function(output: str, answer: str) -> bool``. The reference answer of an example is
its ``answer`` field, else its ``response`` (or the last assistant message).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Callable, Dict, List, Sequence

import torch

from cpift_merge.errors import CpiftError
from cpift_merge.evaluation.tasks import check
from cpift_merge.training.data import as_messages, load_examples

BUILTIN_METRICS = ("exact", "numeric", "choice")


def metric_fn(metric: str) -> Callable[[str, str], bool]:
    """The checker for a metric name (built-in or ``py:module.function``)."""
    if metric in BUILTIN_METRICS:
        return lambda out, ans: check(metric, out, ans)
    if metric.startswith("py:"):
        target = metric[3:]
        module, _, name = target.rpartition(".")
        if not module:
            raise CpiftError(f"metric {metric!r} must be py:module.function")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise CpiftError(f"cannot load metric {metric!r}: {err}") from None
        return lambda out, ans: bool(fn(out, ans))
    raise CpiftError(f"unknown metric {metric!r}; use exact, numeric, choice or py:module.function")


def reference(ex: Dict[str, Any], raw: Dict[str, Any]) -> str:
    if isinstance(raw.get("answer"), (str, int, float)):
        return str(raw["answer"])
    msgs = as_messages(ex)
    return msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else ""


def _prompt_text(tok, ex: Dict[str, Any]) -> str:
    msgs = as_messages(ex)
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in msgs)


def generate(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int, device: str) -> List[str]:
    """Greedy completions of ``prompts`` (left-padded batches)."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    outs: List[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1] :]:
            outs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outs


def evaluate(
    model_path: str,
    tasks: Dict[str, tuple[str, str]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int = 0,
    device: str = "auto",
) -> Dict[str, Dict[str, Any]]:
    """Score ``model_path`` on ``{name: (test file, metric)}``; returns per-task results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checks = {name: metric_fn(metric) for name, (_path, metric) in tasks.items()}
    data = {}
    for name, (path, _metric) in tasks.items():
        examples = load_examples(path)
        raws = None
        if os.path.isfile(path):  # JSONL: keep the raw rows for their "answer" field
            with open(path, encoding="utf-8") as fh:
                raws = [json.loads(line) for line in fh if line.strip()]
        raws = raws if raws is not None and len(raws) == len(examples) else examples
        if limit:
            examples, raws = examples[:limit], raws[:limit]
        data[name] = (examples, raws)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(dev).eval()
    except OSError as err:
        raise CpiftError(f"cannot load model {model_path}: {err}") from None
    results = {}
    for name, (examples, raws) in data.items():
        prompts = [_prompt_text(tok, ex) for ex in examples]
        outputs = generate(model, tok, prompts, max_new_tokens, batch_size, dev)
        refs = [reference(ex, raw) for ex, raw in zip(examples, raws)]
        hits = [checks[name](o, r) for o, r in zip(outputs, refs)]
        results[name] = {
            "metric": tasks[name][1],
            "n": len(hits),
            "score": 100.0 * sum(hits) / len(hits) if hits else 0.0,
            "samples": [{"output": o, "answer": r, "correct": h} for o, r, h in list(zip(outputs, refs, hits))[:5]],
        }
    return results
