"""Diagonal empirical Fisher of a task's loss at a fine-tuned model, for the ``fisher``
core score (``Δ² · F``, see :func:`cpift_merge.core.topk.score_keys`).

``F = mean over examples of (∂ loss_example / ∂θ)²``, one example at a time (the loss
is the mean token loss of the response, as training uses it), accumulated in float32
beside the model's parameters: memory is the model, its gradients and one accumulator.
The result is a safetensors file with the model's tensor names (tied weights once,
under the name the checkpoint stores), written atomically.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Sequence

import torch
from tqdm.auto import tqdm

from cpift_merge.errors import CpiftError
from cpift_merge.storage.checkpoint import Checkpoint, SafetensorsWriter


def compute_fisher(
    model_path: str,
    examples: Sequence[Dict[str, Any]],
    out_file: str,
    *,
    max_length: int = 256,
    limit: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> Dict[str, Any]:
    """Write the diagonal empirical Fisher of ``model_path`` on ``examples`` (the first
    ``limit`` when > 0) to ``out_file``; returns ``{"examples", "tokens", "path"}``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpift_merge.training.data import IGNORE, Collator, encode_all

    if max_length < 8 or limit < 0:
        raise CpiftError(f"Fisher: max length must be at least 8 and limit non-negative, got {max_length}, {limit}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise CpiftError("--device cuda asked for, but no CUDA device is available")
    dev = torch.device("cuda" if use_cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(dev)
    model.eval()  # no dropout: the gradient of the model as it is
    rows, report = encode_all(tok, list(examples)[: limit or None], max_length)
    if not rows:
        raise CpiftError(f"{report.summary('Fisher data')}: no response token; raise the max length")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    collate = Collator(tok.pad_token_id)
    tokens = 0
    for row in tqdm(rows, desc="Fisher", disable=not progress, unit="ex", leave=False):
        batch = {k: v.to(dev) for k, v in collate([row]).items()}
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n].addcmul_(p.grad.float(), p.grad.float())
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    stored = Checkpoint(model_path).infos  # the names the checkpoint stores (tied weights once)
    out_file = os.path.abspath(out_file)
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    tmp = f"{out_file}.tmp-{os.getpid()}"  # renamed at the end: never half a file
    try:
        writer = SafetensorsWriter(tmp)
        for n in stored:
            if n in acc:
                writer.add(n, (acc[n] / len(rows)).cpu(), shape=acc[n].shape)
        writer.close({"format": "pt", "kind": "diagonal empirical Fisher", "examples": str(len(rows))})
        os.replace(tmp, out_file)
    finally:
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return {"examples": len(rows), "tokens": tokens, "path": os.path.abspath(out_file)}
