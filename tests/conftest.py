"""Fixtures: tiny random Llama checkpoints saved as real HF safetensors folders."""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def save_variant(
    base_dir: str,
    out_dir: str,
    seed: int,
    scale: float = 0.01,
    only: Optional[str] = None,
    max_shard_size: Optional[str] = None,
) -> str:
    """A 'fine-tune' of the model in ``base_dir``: seeded noise added to its weights
    (to tensors whose name contains ``only`` when given)."""
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return out_dir


@pytest.fixture(scope="session", autouse=True)
def _children_tmpdir(tmp_path_factory):
    """Child processes (torchrun leaves a ``torchelastic_*`` log folder per launch) make
    their temporary files under pytest's own temporary root, not loose in the system's."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("children"))
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Dict[str, str]:
    """base + three task variants (a, b, c) of a tiny random Llama."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base = str(root / "base")
    LlamaForCausalLM(tiny_config()).save_pretrained(base, safe_serialization=True)
    out = {"base": base}
    for i, name in enumerate("abc"):
        out[name] = save_variant(base, str(root / name), seed=100 + i)
    return out


@pytest.fixture
def make_variant(tiny_models, tmp_path) -> Callable[..., str]:
    def make(name: str, **kwargs) -> str:
        return save_variant(tiny_models["base"], str(tmp_path / name), **kwargs)

    return make


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer (ASCII + ChatML specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A tiny random Llama with the tiny tokenizer saved beside it (a trainable base)."""
    root = tmp_path_factory.mktemp("tinylm")
    torch.manual_seed(0)
    path = str(root / "base")
    LlamaForCausalLM(tiny_config()).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def children(monkeypatch):
    """Pre-pass children started by `cpift merge` (tiny models qualify here)."""
    import subprocess

    from cpift_merge.mergekit import prepass

    started = []

    class Spy(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(prepass, "BACKGROUND_MIN_BYTES", 0)
    monkeypatch.setattr(prepass.subprocess, "Popen", Spy)
    monkeypatch.setattr(prepass, "_CUTS", {})  # no cut from an earlier test in this process
    yield started
    assert not prepass._PENDING
    for child in started:
        assert child.poll() is not None, "a pre-pass child outlived its merge"
