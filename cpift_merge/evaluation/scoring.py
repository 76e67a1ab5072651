"""``cpift eval``: batched greedy generation on task test sets, scored by exact metrics.

Metrics: ``exact`` (whitespace/case-normalised), ``numeric`` (last number in the
output), ``choice`` (the option letter), or ``py:module.function`` for a user's own
``function(output: str, answer: str) -> bool``. The reference answer of an example is
its ``answer`` field, else its ``response`` (or the last assistant message); an example
with a list ``answers`` counts as correct on any of them.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, Sequence

import torch

from cpift_merge.errors import CpiftError, first_line
from cpift_merge.evaluation.tasks import check
from cpift_merge.training.data import as_messages, load_examples

BUILTIN_METRICS = ("exact", "numeric", "choice")


def check_metric_name(metric: str) -> None:
    """Refuse a metric name that is neither built-in nor ``py:module.function``, without
    importing anything (a ``py:`` metric runs the user's code: only when scoring)."""
    if metric in BUILTIN_METRICS:
        return
    if metric.startswith("py:"):
        module, _, name = metric[3:].rpartition(".")
        if not (module and name and all(part.isidentifier() for part in metric[3:].split("."))):
            raise CpiftError(f"metric {metric!r} must be py:module.function")
        return
    raise CpiftError(f"unknown metric {metric!r}; use exact, numeric, choice or py:module.function")


def metric_fn(metric: str, search: Sequence[str] = ()) -> Callable[[str, str], bool]:
    """The checker for a metric name (built-in or ``py:module.function``). A ``py:``
    metric's module is imported now, from the folders in ``search`` first (a pipeline
    file's folder), then from ``sys.path``: it runs that module's code."""
    check_metric_name(metric)
    if metric in BUILTIN_METRICS:
        return lambda out, ans: check(metric, out, ans)
    module, _, name = metric[3:].rpartition(".")
    added = [d for d in search if d not in sys.path]
    sys.path[:0] = added
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise CpiftError(f"cannot load metric {metric!r}: {err}") from None
    finally:
        for d in added:
            sys.path.remove(d)

    def call(out: str, ans: str) -> bool:
        try:
            return bool(fn(out, ans))
        except Exception as err:
            raise CpiftError(
                f"metric {metric!r} raised {type(err).__name__}: {err} (output {out[:60]!r}, answer {ans[:60]!r})"
            ) from None

    return call


def reference(ex: Dict[str, Any], raw: Dict[str, Any]) -> str:
    if isinstance(raw.get("answer"), (str, int, float)):
        return str(raw["answer"])
    msgs = as_messages(ex)
    return msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else ""


def is_correct(check: Callable[[str, str], bool], output: str, raw: Dict[str, Any], ref: str) -> bool:
    """``check`` against the reference, or against any of the example's ``answers`` (a
    list of acceptable strings, as BIG-bench tasks give) when it has them."""
    answers = raw.get("answers") if isinstance(raw, dict) else None
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        return any(check(output, a) for a in answers)
    return check(output, ref)


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


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise CpiftError("--device cuda asked for, but no CUDA device is available")


def load_model(model_path: str, device: str = "auto"):
    """(tokenizer, model in eval mode on its device, device name); one line when either
    cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(dev).eval()
    except (OSError, ValueError, TypeError) as err:
        raise CpiftError(f"cannot load model {model_path}: {first_line(err)}") from None
    return tok, model, dev


def evaluate(
    model_path: str,
    tasks: Dict[str, tuple[str, str]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int = 0,
    device: str = "auto",
    metric_search: Sequence[str] = (),
) -> Dict[str, Dict[str, Any]]:
    """Score ``model_path`` on ``{name: (test file, metric)}``; returns per-task results.
    ``metric_search``: folders to import ``py:`` metrics from first (see :func:`metric_fn`)."""
    check_device(device)
    checks = {name: metric_fn(metric, metric_search) for name, (_path, metric) in tasks.items()}
    data = {}
    for name, (path, _metric) in tasks.items():
        examples = load_examples(path, role="test")
        raws = None
        if os.path.isfile(path):  # JSONL: keep the raw rows for their "answer" field
            with open(path, encoding="utf-8") as fh:
                raws = [json.loads(line) for line in fh if line.strip()]
        raws = raws if raws is not None and len(raws) == len(examples) else examples
        if limit:
            examples, raws = examples[:limit], raws[:limit]
        data[name] = (examples, raws)
    tok, model, dev = load_model(model_path, device)
    results = {}
    for name, (examples, raws) in data.items():
        prompts = [_prompt_text(tok, ex) for ex in examples]
        outputs = generate(model, tok, prompts, max_new_tokens, batch_size, dev)
        refs = [reference(ex, raw) for ex, raw in zip(examples, raws)]
        hits = [is_correct(checks[name], o, raw, r) for o, raw, r in zip(outputs, raws, refs)]
        results[name] = {
            "metric": tasks[name][1],
            "n": len(hits),
            "score": 100.0 * sum(hits) / len(hits) if hits else 0.0,
            "samples": [{"output": o, "answer": r, "correct": h} for o, r, h in list(zip(outputs, refs, hits))[:5]],
        }
    return results


def heldout_loss(
    model_path: str,
    examples: Sequence[Dict[str, Any]],
    max_length: int = 256,
    batch_size: int = 8,
    device: str = "auto",
) -> Dict[str, Any]:
    """Mean token loss of ``model_path`` on the responses of ``examples`` (the tokens
    training would learn, encoded as for training): cheap and continuous, it separates
    variants of a model on test sets too small for their metric. Returns ``loss``
    (nats per response token), ``tokens`` and ``examples`` (after truncation)."""
    from cpift_merge.training.data import IGNORE, Collator, encode_all

    check_device(device)
    tok, model, dev = load_model(model_path, device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows, report = encode_all(tok, examples, max_length)
    if not rows:
        raise CpiftError(f"{report.summary('held-out data')}: no response token to score; raise the max length")
    collate = Collator(tok.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(dev) for k, v in collate(rows[i : i + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            total += float(nll)
            count += int((labels != IGNORE).sum())
    return {"loss": total / count, "tokens": count, "examples": len(rows)}
