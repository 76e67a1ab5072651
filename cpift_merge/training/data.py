"""Task data: JSONL (or a saved ``datasets`` dataset) to tokenized SFT examples.

One example a line, either ``{"prompt": ..., "response": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}``. The tokenizer's chat template
is used when it has one; the loss is on response (assistant) tokens only; sequences
longer than ``max_length`` are truncated and counted, never silently.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch

from cpift_merge.errors import CpiftError

IGNORE = -100


def _check_example(ex: Any, where: str) -> Dict[str, Any]:
    if not isinstance(ex, dict):
        raise CpiftError(f"{where}: an example must be a JSON object")
    if "messages" in ex:
        msgs = ex["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise CpiftError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        if not any(m["role"] == "assistant" for m in msgs):
            raise CpiftError(f"{where}: 'messages' has no assistant turn to learn from")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    missing = [k for k in ("prompt", "response") if not isinstance(ex.get(k), str)]
    if missing:
        raise CpiftError(f"{where}: missing field {missing[0]!r} (need prompt and response, or messages)")
    return {"prompt": ex["prompt"], "response": ex["response"]}


def load_examples(path: str) -> List[Dict[str, Any]]:
    """Examples from a JSONL file or a ``datasets`` dataset saved with ``save_to_disk``."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        try:
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(path)
        except Exception as err:
            raise CpiftError(f"cannot read dataset folder {path}: {err}") from None
        if isinstance(ds, DatasetDict):  # (it has column_names too: a dict per split)
            if "train" not in ds:
                raise CpiftError(f"dataset {path} has splits {list(ds)}; point at one split or add 'train'")
            ds = ds["train"]
        rows = [_check_example(dict(r), f"{path} row {i}") for i, r in enumerate(ds)]
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except OSError as err:
            raise CpiftError(f"cannot read data file {path}: {err.strerror}") from None
        rows = []
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as err:
                raise CpiftError(f"{path}:{no}: not valid JSON ({err.msg})") from None
            rows.append(_check_example(ex, f"{path}:{no}"))
    if not rows:
        raise CpiftError(f"data {path} holds no examples")
    return rows


def load_tasks(paths: Dict[str, str]) -> Dict[str, List[Dict[str, Any]]]:
    """Each task's examples (see :func:`load_examples`), after checking the task names."""
    from cpift_merge.storage.regions import check_task_names

    check_task_names(list(paths))
    return {name: load_examples(path) for name, path in paths.items()}


def as_messages(ex: Dict[str, Any]) -> List[Dict[str, str]]:
    if "messages" in ex:
        return ex["messages"]
    return [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]}]


@dataclass
class Encoded:
    input_ids: List[int]
    labels: List[int]


@dataclass
class EncodeReport:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # truncated so far that no response token was left
    notes: List[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        s = f"{name}: {self.examples} examples"
        if self.truncated:
            s += f", {self.truncated} truncated to the max length"
        if self.dropped:
            s += f", {self.dropped} dropped (no response token left after truncation)"
        return s


def _template_ids(tok, messages, add_generation_prompt: bool) -> List[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _turn_labels(tok, turn: List[int]) -> List[int]:
    """Labels of one assistant turn: its tokens up to and including the end token;
    what the template adds after it (ChatML's newline) is not the model's to learn."""
    eos = tok.eos_token_id
    if eos is None or eos not in turn:
        return list(turn)
    end = len(turn) - turn[::-1].index(eos)
    return turn[:end] + [IGNORE] * (len(turn) - end)


def encode(tok, ex: Dict[str, Any]) -> Encoded:
    """Token ids and labels (IGNORE on everything but the response/assistant tokens)."""
    if getattr(tok, "chat_template", None):
        messages = as_messages(ex)
        ids: List[int] = []
        labels: List[int] = []
        for i, m in enumerate(messages):
            upto = _template_ids(tok, messages[: i + 1], add_generation_prompt=False)
            if m["role"] == "assistant":
                prompt = _template_ids(tok, messages[:i], add_generation_prompt=True)
                if upto[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
                    raise CpiftError("the tokenizer's chat template is not prefix-stable; cannot mask prompts")
                labels += [IGNORE] * (len(prompt) - len(ids)) + _turn_labels(tok, upto[len(prompt) :])
            else:
                if upto[: len(ids)] != ids:
                    raise CpiftError("the tokenizer's chat template is not prefix-stable; cannot mask prompts")
                labels += [IGNORE] * (len(upto) - len(ids))
            ids = upto
        return Encoded(ids, labels)
    if "messages" in ex:
        raise CpiftError("examples with 'messages' need a tokenizer with a chat template")
    prompt = tok(ex["prompt"], add_special_tokens=True)["input_ids"]
    full = tok(ex["prompt"] + ex["response"], add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None:
        full = full + [tok.eos_token_id]
    n = len(prompt) if full[: len(prompt)] == prompt else len(prompt) - 1
    return Encoded(full, [IGNORE] * n + full[n:])


def encode_all(tok, examples: Sequence[Dict[str, Any]], max_length: int) -> tuple[List[Encoded], EncodeReport]:
    if max_length < 2:
        raise CpiftError(f"--max-length must be at least 2, got {max_length}")
    report = EncodeReport()
    out = []
    for ex in examples:
        e = encode(tok, ex)
        if len(e.input_ids) > max_length:
            report.truncated += 1
            e = Encoded(e.input_ids[:max_length], e.labels[:max_length])
        if all(lab == IGNORE for lab in e.labels[1:]):
            report.dropped += 1
            continue
        out.append(e)
    report.examples = len(out)
    return out, report


def sample_balanced(per_task: Dict[str, List[Any]], n: int, seed: int) -> Dict[str, List[Any]]:
    """``n`` examples per task, drawn without replacement (all when a task has fewer)."""
    rng = random.Random(seed)
    out = {}
    for name in sorted(per_task):
        items = list(per_task[name])
        rng.shuffle(items)
        out[name] = items[:n]
    return out


class Collator:
    """Pad a batch of :class:`Encoded` (right padding; labels IGNORE on padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Any]) -> Dict[str, torch.Tensor]:
        rows = [b if isinstance(b, Encoded) else Encoded(b["input_ids"], b["labels"]) for b in batch]
        n = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[i, : len(r.labels)] = torch.tensor(r.labels)
            attn[i, : len(r.input_ids)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}
