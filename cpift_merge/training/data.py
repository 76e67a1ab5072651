"""Task data: JSONL, JSON, CSV, Parquet, a saved ``datasets`` dataset or a hub dataset
id, to tokenized SFT examples.

Each example in one of the formats SFT users hold, detected from its fields and turned
into ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role", "content"}, ...]}``:
prompt/response, chat ``messages``, TRL prompt/completion (strings or conversational),
Alpaca (``instruction``/``input``/``output``), ShareGPT (``conversations`` of
``from``/``value``). The tokenizer's chat template
is used when it has one; the loss is on response (assistant) tokens only; sequences
longer than ``max_length`` are truncated and counted, never silently.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from cpift_merge.errors import CpiftError

IGNORE = -100


MAX_LINE_BYTES = 16 << 20  # a JSONL line longer than this is refused (one example, 16 MiB)
# Before tokenizing, each text is cut to this many characters per token of max_length:
# far more than any token spans, so the first max_length tokens are unchanged, while a
# huge example costs memory in proportion to max_length, not to its size.
CHARS_PER_TOKEN_BOUND = 64
TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("test", "validation")


def _text(value: Any, field_name: str, where: str) -> str:
    if value is None:
        raise CpiftError(f"{where}: missing field {field_name!r}")
    if not isinstance(value, str):
        raise CpiftError(f"{where}: field {field_name!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CpiftError(
            f"{where}: field {field_name!r} holds an unpaired surrogate ({value[err.start]!r} at {err.start});"
            " fix the text"
        ) from None
    return value


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "bot": "assistant"}  # fmt: skip
FORMATS = ("prompt/response", "messages", "prompt/completion", "alpaca", "sharegpt")


def detect_format(ex: Dict[str, Any]) -> Optional[str]:
    """The SFT format an example is written in (:data:`FORMATS`), from its fields."""
    if "messages" in ex:
        return "messages"
    if "conversations" in ex:
        return "sharegpt"
    if "prompt" in ex and "response" in ex:
        return "prompt/response"
    if "prompt" in ex and "completion" in ex:
        return "prompt/completion"
    if "instruction" in ex and "output" in ex:
        return "alpaca"
    return None


def _as_turns(value: Any, field_name: str, where: str) -> Optional[List[Dict[str, Any]]]:
    """A conversational TRL field (a list of {role, content}), or None for a plain string."""
    if isinstance(value, list):
        if not all(isinstance(m, dict) for m in value):
            raise CpiftError(f"{where}: {field_name!r} must be a string or a list of {{role, content}} turns")
        return value
    return None


def normalize_example(ex: Any, where: str) -> tuple[Dict[str, Any], str]:
    """One example in any supported format as ``{prompt, response}`` or ``{messages}``,
    and the format's name; one line naming the missing field when none fits."""
    if not isinstance(ex, dict):
        raise CpiftError(f"{where}: an example must be a JSON object")
    fmt = detect_format(ex)
    if fmt == "sharegpt":
        turns = ex["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise CpiftError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
        msgs = []
        for n, t in enumerate(turns):
            who = _text(t.get("from"), f"conversations[{n}].from", where)
            if who not in SHAREGPT_ROLES:
                raise CpiftError(f"{where}: conversations[{n}].from is {who!r}; use human, gpt or system")
            msgs.append({"role": SHAREGPT_ROLES[who], "content": t.get("value")})
        ex = {"messages": msgs}
    elif fmt == "prompt/completion":
        p, c = _as_turns(ex["prompt"], "prompt", where), _as_turns(ex["completion"], "completion", where)
        if (p is None) != (c is None):
            raise CpiftError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of turns")
        ex = {"messages": p + c} if p is not None else {"prompt": ex["prompt"], "response": ex["completion"]}
    elif fmt == "alpaca":
        instruction = _text(ex["instruction"], "instruction", where)
        extra = ex.get("input") or ""
        if not isinstance(extra, str):
            raise CpiftError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        ex = {"prompt": f"{instruction}\n\n{extra}" if extra.strip() else instruction, "response": ex["output"]}
    elif fmt is None:
        fields = ", ".join(sorted(map(str, ex))) or "none"
        if "prompt" in ex:
            raise CpiftError(f"{where}: missing field 'response' (or 'completion') beside 'prompt' (fields: {fields})")
        if "instruction" in ex:
            raise CpiftError(f"{where}: missing field 'output' beside 'instruction' (fields: {fields})")
        raise CpiftError(
            f"{where}: missing field 'prompt' (need prompt and response, prompt and completion, instruction"
            f" and output, messages or conversations; fields: {fields})"
        )
    return _check_example(ex, where), fmt


def _check_example(ex: Any, where: str) -> Dict[str, Any]:
    if not isinstance(ex, dict):
        raise CpiftError(f"{where}: an example must be a JSON object")
    if "messages" in ex:
        msgs = ex["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise CpiftError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        out = [
            {
                "role": _text(m.get("role"), f"messages[{n}].role", where),
                "content": _text(m.get("content"), f"messages[{n}].content", where),
            }
            for n, m in enumerate(msgs)
        ]
        if not any(m["role"] == "assistant" for m in out):
            raise CpiftError(f"{where}: 'messages' has no assistant turn to learn from")
        return {"messages": out}
    missing = [k for k in ("prompt", "response") if k not in ex]
    if missing:
        raise CpiftError(f"{where}: missing field {missing[0]!r} (need prompt and response, or messages)")
    return {"prompt": _text(ex["prompt"], "prompt", where), "response": _text(ex["response"], "response", where)}


def split_of(path: str, role: str = "train") -> tuple[str, Optional[str]]:
    """(folder or file, split): ``DIR:SPLIT`` names a split of a saved ``datasets``
    DatasetDict; a DatasetDict named without one gives ``train`` for training and
    ``test`` (else ``validation``) for evaluation (``role``: train or test)."""
    path = os.path.expanduser(str(path))
    head, sep, tail = path.rpartition(":")
    if sep and head and not os.path.exists(path) and os.path.isdir(head) and tail and "/" not in tail:
        return head, tail
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as fh:
            splits = json.load(fh).get("splits", [])
        wanted = TRAIN_SPLITS if role == "train" else TEST_SPLITS
        found = next((w for w in wanted if w in splits), None)
        if found is None:
            raise CpiftError(
                f"dataset {path} has splits {splits}, none of {', '.join(wanted)} for {role}ing;"
                f" name one as {path}:SPLIT"
            )
        return path, found
    return path, None


DATASETS_FILES = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _load_with_datasets(path: str, split: Optional[str], role: str) -> tuple[Any, str]:
    """A JSON, CSV or Parquet file, or a hub dataset id, read by ``datasets`` (hub ids
    through its own cache: offline once cached). Returns the rows and where they came from."""
    import datasets

    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in DATASETS_FILES:
            kind = DATASETS_FILES[ext]
            # CSV has no types: every cell is text ("4" stays "4", an empty input stays "")
            extra: Dict[str, Any] = {}
            if kind == "csv":
                import csv

                with open(path, encoding="utf-8", newline="") as fh:
                    columns = next(csv.reader(fh), [])
                string = datasets.Value("string")
                extra = {"features": datasets.Features({c: string for c in columns}), "keep_default_na": False}
            return datasets.load_dataset(kind, data_files=path, split="train", **extra), path
        names = TRAIN_SPLITS if role == "train" else TEST_SPLITS
        dd = datasets.load_dataset(path) if split is None else None
        if dd is not None:
            split = next((n for n in names if n in dd), None)
            if split is None:
                raise CpiftError(
                    f"dataset {path} has splits {list(dd)}, none of {', '.join(names)}; name one as {path}:SPLIT"
                )
            return dd[split], f"{path}:{split}"
        return datasets.load_dataset(path, split=split), f"{path}:{split}"
    except CpiftError:
        raise
    except Exception as err:
        what = "data file" if ext in DATASETS_FILES else "dataset"
        raise CpiftError(
            f"cannot read {what} {path}: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        ) from None


def load_examples(path: str, role: str = "train", on_format=None) -> List[Dict[str, Any]]:
    """Examples from a JSONL, JSON, CSV or Parquet file, a ``datasets`` dataset saved
    with ``save_to_disk`` (a DatasetDict's split as :func:`split_of` picks it for
    ``role``), or a hub dataset id (``owner/name[:split]``, read through ``datasets``'
    cache). Each example may be in any of :data:`FORMATS`; ``on_format(name)`` is told
    which (the first example's)."""
    path, split = split_of(path, role)
    formats: List[str] = []

    def norm(ex: Any, where: str) -> Dict[str, Any]:
        row, fmt = normalize_example(ex, where)
        if not formats:
            formats.append(fmt)
        return row

    ext = os.path.splitext(path)[1].lower()
    if (
        not os.path.exists(path)
        and ext not in DATASETS_FILES
        and path.count("/") == 1
        and not path.startswith(("/", "."))
    ):
        head, sep, tail = path.rpartition(":")
        ds, where = _load_with_datasets(*((head, tail) if sep and "/" in head else (path, None)), role)
        rows = [norm(dict(r), f"{where} row {i}") for i, r in enumerate(ds)]
    elif os.path.isfile(path) and ext in DATASETS_FILES:
        ds, where = _load_with_datasets(path, None, role)
        rows = [norm(dict(r), f"{where} row {i}") for i, r in enumerate(ds)]
    elif os.path.isdir(path):
        try:
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(path)
        except Exception as err:
            raise CpiftError(f"cannot read dataset folder {path}: {err}") from None
        if isinstance(ds, DatasetDict):  # (it has column_names too: a dict per split)
            if split not in ds:
                raise CpiftError(f"dataset {path} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        elif split is not None:
            raise CpiftError(f"dataset {path} has no splits; name it without :{split}")
        where = f"{path}:{split}" if split else path
        rows = [norm(dict(r), f"{where} row {i}") for i, r in enumerate(ds)]
    else:
        try:
            with open(path, "rb") as fh:
                lines = fh.readlines()
        except OSError as err:
            raise CpiftError(f"cannot read data file {path}: {err.strerror}") from None
        rows = []
        for no, raw in enumerate(lines, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise CpiftError(
                    f"{path}:{no}: line of {len(raw):,} bytes; one example may take at most {MAX_LINE_BYTES:,}"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CpiftError(f"{path}:{no}: not UTF-8 text (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as err:
                raise CpiftError(f"{path}:{no}: not valid JSON ({getattr(err, 'msg', err)})") from None
            rows.append(norm(ex, f"{path}:{no}"))
    if not rows:
        raise CpiftError(f"data {path} holds no examples")
    if on_format is not None:
        on_format(formats[0])
    return rows


def load_tasks(paths: Dict[str, str], say=None) -> Dict[str, List[Dict[str, Any]]]:
    """Each task's examples (see :func:`load_examples`), after checking the task names;
    ``say`` gets one line per task with the format detected."""
    from cpift_merge.storage.regions import check_task_names

    check_task_names(list(paths))
    out = {}
    for name, path in paths.items():
        fmt: List[str] = []
        out[name] = load_examples(path, on_format=fmt.append)
        if say is not None:
            say(f"task {name}: {len(out[name])} examples from {path} ({fmt[0]} format)")
    return out


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


def _bounded(ex: Dict[str, Any], chars: int) -> Dict[str, Any]:
    """``ex`` with every text cut to ``chars`` characters (the same object when none is
    longer): what follows them would be truncated away anyway."""
    if "messages" in ex:
        if all(len(m["content"]) <= chars for m in ex["messages"]):
            return ex
        return {"messages": [{**m, "content": m["content"][:chars]} for m in ex["messages"]]}
    if len(ex["prompt"]) <= chars and len(ex["response"]) <= chars:
        return ex
    return {"prompt": ex["prompt"][:chars], "response": ex["response"][:chars]}


def encode_all(tok, examples: Sequence[Dict[str, Any]], max_length: int) -> tuple[List[Encoded], EncodeReport]:
    if max_length < 2:
        raise CpiftError(f"--max-length must be at least 2, got {max_length}")
    report = EncodeReport()
    out = []
    bound = max_length * CHARS_PER_TOKEN_BOUND
    for ex in examples:
        e = encode(tok, _bounded(ex, bound))
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
