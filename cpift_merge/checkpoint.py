"""Streaming access to HF checkpoints: one tensor at a time, never the whole model.

Reads single-file and sharded safetensors (``model.safetensors.index.json``). Also
computes model fingerprints (tensor names, shapes, dtypes and a fixed sample of
values) cheaply: the sample is read through safetensors slices, not whole tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from cpift_merge.errors import CpiftError

SAMPLE_POINTS = 8
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def sample_positions(numel: int, points: int = SAMPLE_POINTS) -> List[int]:
    """Fixed flat positions used to fingerprint a tensor (deduplicated, sorted)."""
    if numel <= 0:
        return []
    return sorted({(j * numel) // points for j in range(points)} | {numel - 1})


def sample_values(tensor: torch.Tensor) -> List[float]:
    """The tensor's values at :func:`sample_positions`, as Python floats."""
    flat = tensor.reshape(-1)
    pos = sample_positions(flat.numel())
    if not pos:
        return []
    return [float(v) for v in flat[torch.tensor(pos)].to(torch.float64)]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class Checkpoint:
    """A safetensors checkpoint: a folder (single or sharded) or one ``.safetensors``.

    ``label`` names it in error messages (a task name or the path as the user wrote it).
    """

    def __init__(self, path: str, label: Optional[str] = None):
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        self.label = label or str(path)
        self._handles: Dict[str, object] = {}
        self._shards = self._find_shards()
        self.infos: Dict[str, TensorInfo] = {}
        for shard, names in self._shards.items():
            handle = self._open(shard)
            present = set(handle.keys())
            for name in names:
                if name not in present:
                    raise CpiftError(
                        f"model {self.label}: tensor {name} is listed in {INDEX_NAME}"
                        f" but missing from {os.path.basename(shard)}; re-save the model"
                    )
                sl = handle.get_slice(name)
                self.infos[name] = TensorInfo(
                    name, tuple(int(s) for s in sl.get_shape()), sl.get_dtype()
                )

    # ------------------------------------------------------------------ layout
    def _find_shards(self) -> Dict[str, List[str]]:
        p = self.path
        if os.path.isfile(p):
            if not p.endswith(".safetensors"):
                raise CpiftError(
                    f"model {self.label}: {p} is not a .safetensors file;"
                    " save the model with safe_serialization=True"
                )
            return {p: self._keys_of(p)}
        if not os.path.isdir(p):
            raise CpiftError(f"model {self.label}: cannot read {p}: no such file or folder")
        index = os.path.join(p, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise CpiftError(f"model {self.label}: unreadable {index}: {err}") from None
            shards: Dict[str, List[str]] = {}
            for name, shard in weight_map.items():
                shards.setdefault(os.path.join(p, shard), []).append(name)
            for shard in shards:
                if not os.path.isfile(shard):
                    raise CpiftError(f"model {self.label}: shard {shard} is missing")
            return shards
        single = os.path.join(p, SINGLE_NAME)
        if os.path.isfile(single):
            return {single: self._keys_of(single)}
        found = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
        if found:
            return {os.path.join(p, f): self._keys_of(os.path.join(p, f)) for f in found}
        if any(f.endswith(".bin") for f in os.listdir(p)):
            raise CpiftError(
                f"model {self.label}: {p} holds PyTorch .bin weights; re-save it as"
                " safetensors (save_pretrained(..., safe_serialization=True))"
            )
        raise CpiftError(f"model {self.label}: no safetensors weights in {p}")

    def _keys_of(self, shard: str) -> List[str]:
        return list(self._open(shard).keys())

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(shard, framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise CpiftError(
                    f"model {self.label}: cannot read {shard}: {err}"
                ) from None
        return self._handles[shard]

    def _shard_of(self, name: str) -> str:
        for shard, names in self._shards.items():
            if name in names:
                return shard
        raise CpiftError(f"model {self.label}: no tensor named {name}")

    # ------------------------------------------------------------------ access
    def names(self) -> List[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._shard_of(name)).get_tensor(name)
        except CpiftError:
            raise
        except Exception as err:
            raise CpiftError(f"model {self.label}: cannot read tensor {name}: {err}") from None

    def sample(self, name: str) -> List[float]:
        """:func:`sample_values` of one tensor, read through slices (rows), not whole."""
        info = self.infos[name]
        positions = sample_positions(info.numel)
        if not positions:
            return []
        sl = self._open(self._shard_of(name)).get_slice(name)
        if len(info.shape) <= 1:
            values = [sl[p : p + 1] for p in positions]
        else:
            row = info.numel // info.shape[0]
            values = [sl[p // row : p // row + 1].reshape(-1)[p % row] for p in positions]
        return [float(torch.as_tensor(v).reshape(-1)[0].to(torch.float64)) for v in values]

    def config(self) -> Dict:
        """``config.json`` beside the weights, or {} when there is none."""
        folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        cfg = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg):
            return {}
        try:
            with open(cfg, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError) as err:
            raise CpiftError(f"model {self.label}: unreadable {cfg}: {err}") from None

    def fingerprint(self, names: Optional[Sequence[str]] = None) -> str:
        """sha256 over names, shapes, dtypes and sampled values of ``names`` (default:
        every tensor)."""
        h = hashlib.sha256()
        for name in sorted(names if names is not None else self.infos):
            info = self.infos[name]
            h.update(f"{name}|{info.shape}|{info.dtype}|".encode())
            h.update(repr(self.sample(name)).encode())
        return h.hexdigest()

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)


def fingerprint_from_samples(
    infos: Dict[str, TensorInfo], samples: Dict[str, List[float]]
) -> str:
    """Same digest as :meth:`Checkpoint.fingerprint`, from precomputed samples."""
    h = hashlib.sha256()
    for name in sorted(samples):
        info = infos[name]
        h.update(f"{name}|{info.shape}|{info.dtype}|".encode())
        h.update(repr(samples[name]).encode())
    return h.hexdigest()


def participating_tensors(
    base: Checkpoint,
    models: Dict[str, Checkpoint],
    exclude: Sequence[str] = (),
) -> List[TensorInfo]:
    """The tensors that take part (DESIGN §1: float, same shape everywhere, not
    excluded), in the base's order. Refuses models that do not line up.
    """
    base_arch = base.config().get("architectures")
    for name, ckpt in models.items():
        arch = ckpt.config().get("architectures")
        if base_arch and arch and arch != base_arch:
            raise CpiftError(
                f"model {name} is a {arch[0]} but the base is a {base_arch[0]};"
                " all models must share one architecture"
            )
        missing = [t for t in base.infos if t not in ckpt.infos]
        if missing:
            raise CpiftError(
                f"tensor {missing[0]} is missing in model {name}"
                f" ({len(missing)} missing); all models must have the same tensors"
            )
        extra = [t for t in ckpt.infos if t not in base.infos]
        if extra:
            raise CpiftError(
                f"model {name} has tensor {extra[0]} that the base lacks"
                f" ({len(extra)} extra); all models must have the same tensors"
            )
        for t, info in base.infos.items():
            other = ckpt.infos[t]
            if other.shape != info.shape:
                raise CpiftError(
                    f"tensor {t} has shape {list(other.shape)} in model {name} but"
                    f" {list(info.shape)} in the base; the models have different shapes"
                )
    patterns = []
    for pat in exclude:
        try:
            patterns.append(re.compile(pat))
        except re.error as err:
            raise CpiftError(f"exclude pattern {pat!r} is not a valid regex: {err}") from None
    return [
        info
        for t, info in base.infos.items()
        if info.is_float
        and info.numel > 0
        and all(ckpt.infos[t].is_float for ckpt in models.values())
        and not any(p.search(t) for p in patterns)
    ]
