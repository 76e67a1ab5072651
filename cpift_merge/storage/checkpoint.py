"""Streaming access to HF checkpoints: one tensor at a time, never the whole model.

Reads single-file and sharded safetensors (``model.safetensors.index.json``), and
PyTorch ``.bin`` checkpoints (single or ``pytorch_model.bin.index.json``) through a memory
map: those cannot be read one tensor at a time from disk, so the pages a pass touches stay
resident until the checkpoint is closed (safetensors are the memory-flat path). Also
computes model fingerprints (tensor names, shapes, dtypes and a fixed sample of
values) cheaply: only the sampled entries are read, not whole tensors. Tensors are
read with positioned reads, not a memory map (see ``_Shard``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from cpift_merge.errors import CpiftError

SAMPLE_POINTS = 8
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"


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

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return _DTYPES.get(self.dtype)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "U16": getattr(torch, "uint16", None),
    "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
}


DTYPE_NAMES = {v: k for k, v in _DTYPES.items() if v is not None}


class Scratch:
    """Reusable flat buffers, one per slot, grown to the largest request.

    Streaming passes touch every tensor of several models; a fresh tensor for each read
    and each intermediate costs a page fault per 4 KiB page (for a 100 MB tensor, several
    times the cost of the arithmetic on it). Views of a slot are valid until the slot is
    taken again."""

    def __init__(self) -> None:
        self._bufs: Dict[str, torch.Tensor] = {}

    def take(self, slot: str, nbytes: int) -> torch.Tensor:
        """A flat uint8 view of ``nbytes`` bytes of buffer ``slot``."""
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(slot, None)
            buf = self._bufs[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]

    def floats(self, slot: str, numel: int) -> torch.Tensor:
        """A flat float32 view of ``numel`` entries of buffer ``slot``."""
        return self.take(slot, 4 * numel).view(torch.float32)


class _Shard:
    """One safetensors file read with positioned reads (no memory map).

    safetensors' ``safe_open`` memory-maps the file, so every page a pass touches stays
    in the process's resident set until the handle closes: streaming four 0.5 GB
    checkpoints that way costs 2+ GB of RSS. Plain reads keep RSS at the tensors in
    hand (the OS page cache still speeds up repeated passes)."""

    def __init__(self, path: str, label: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
            size = os.fstat(self.fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(os.pread(self.fd, n, 8))
        except (OSError, ValueError, struct.error) as err:
            raise CpiftError(f"model {label}: cannot read {path}: not a complete safetensors file ({err})") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.entries = header
        for name, e in header.items():
            if e["data_offsets"][1] + self.data_start > size:
                raise CpiftError(f"model {label}: {path} is truncated (tensor {name} runs past the end)")

    def read(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        e = self.entries[name]
        return self.read_range(name, 0, self.numel(name), out).reshape(e["shape"])

    def numel(self, name: str) -> int:
        n = 1
        for d in self.entries[name]["shape"]:
            n *= int(d)
        return n

    def read_range(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flat entries ``[start, stop)`` of tensor ``name`` (positioned reads of just those bytes)."""
        e = self.entries[name]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise CpiftError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        size = torch.tensor([], dtype=dtype).element_size()
        begin = e["data_offsets"][0] + start * size
        nbytes = (stop - start) * size
        if out is None:
            flat = torch.empty(nbytes, dtype=torch.uint8)  # no zero-fill, unlike bytearray
        else:
            flat = out[:nbytes]
        view = memoryview(flat.numpy())
        done = 0
        while done < len(view):  # pread may return short reads on huge tensors
            n = os.preadv(self.fd, [view[done:]], self.data_start + begin + done)
            if n <= 0:
                raise CpiftError(f"{self.path}: unexpected end of file in tensor {name}")
            done += n
        return flat.view(dtype)

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def read_at(self, name: str, positions: Sequence[int]) -> List[float]:
        e = self.entries[name]
        dtype = _DTYPES[e["dtype"]]
        size = torch.tensor([], dtype=dtype).element_size()
        base = self.data_start + e["data_offsets"][0]
        raw = bytearray(b"".join(os.pread(self.fd, size, base + p * size) for p in positions))
        return [float(v) for v in torch.frombuffer(raw, dtype=torch.uint8).view(dtype).to(torch.float64)]

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class _BinShard:
    """One PyTorch ``.bin`` file (the zip format ``torch.save`` writes since 1.6), loaded
    with ``weights_only`` through a memory map; same interface as :class:`_Shard`."""

    def __init__(self, path: str, label: str):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # pickle, zip and mmap errors all mean the same to a user
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CpiftError(
                f"model {label}: cannot read {path} as a PyTorch weights file ({msg}); re-save it as"
                " safetensors (save_pretrained(..., safe_serialization=True))"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CpiftError(f"model {label}: {path} is not a state dict of tensors")
        self.tensors: Dict[str, torch.Tensor] = state
        self.entries = {
            name: {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
            for name, t in state.items()
            if t.dtype in DTYPE_NAMES
        }

    def nbytes(self, name: str) -> int:
        t = self.tensors[name]
        return t.numel() * t.element_size()

    def read(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = self.tensors[name]
        return self.read_range(name, 0, t.numel(), out).reshape(t.shape)

    def read_range(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        part = self.tensors[name].reshape(-1)[start:stop]
        if out is None:
            return part.clone()
        view = out[: part.numel() * part.element_size()].view(part.dtype)
        view.copy_(part)
        return view

    def read_at(self, name: str, positions: Sequence[int]) -> List[float]:
        flat = self.tensors[name].reshape(-1)
        return [float(v) for v in flat[torch.tensor(list(positions), dtype=torch.long)].to(torch.float64)]

    def close(self) -> None:
        self.tensors = {}


class Checkpoint:
    """A checkpoint: a folder (single or sharded safetensors, else PyTorch ``.bin``) or one
    ``.safetensors`` / ``.bin`` file.

    ``label`` names it in error messages (a task name or the path as the user wrote it).
    """

    def __init__(self, path: str, label: Optional[str] = None):
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        self.label = label or str(path)
        self._shards: Dict[str, _Shard | _BinShard] = {}
        self._where: Dict[str, _Shard | _BinShard] = {}
        self.infos: Dict[str, TensorInfo] = {}
        for file, names in self._find_shards().items():
            shard = self._open(file)
            for name in names:
                if name not in shard.entries:
                    raise CpiftError(
                        f"model {self.label}: tensor {name} is listed in {INDEX_NAME}"
                        f" but missing from {os.path.basename(file)}; re-save the model"
                    )
                e = shard.entries[name]
                self.infos[name] = TensorInfo(name, tuple(int(x) for x in e["shape"]), e["dtype"])
                self._where[name] = shard

    # ------------------------------------------------------------------ layout
    def _find_shards(self) -> Dict[str, List[str]]:
        p = self.path
        if os.path.isfile(p):
            if not p.endswith((".safetensors", ".bin")):
                raise CpiftError(
                    f"model {self.label}: {p} is not a .safetensors or .bin weights file;"
                    " save the model with save_pretrained(..., safe_serialization=True)"
                )
            return {p: self._keys_of(p)}
        if not os.path.isdir(p):
            raise CpiftError(f"model {self.label}: cannot read {p}: no such file or folder")
        index = os.path.join(p, INDEX_NAME)
        if not os.path.isfile(index) and not os.path.isfile(os.path.join(p, SINGLE_NAME)):
            if not any(f.endswith(".safetensors") for f in os.listdir(p)):
                index = os.path.join(p, BIN_INDEX_NAME)  # no safetensors: PyTorch .bin weights
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
        single = os.path.join(p, BIN_SINGLE_NAME)
        if os.path.isfile(single):
            return {single: self._keys_of(single)}
        raise CpiftError(
            f"model {self.label}: no weights in {p} (model.safetensors, pytorch_model.bin or an index of either)"
        )

    def _keys_of(self, file: str) -> List[str]:
        return list(self._open(file).entries)

    def _open(self, file: str) -> _Shard | _BinShard:
        if file not in self._shards:
            kind = _BinShard if file.endswith(".bin") else _Shard
            self._shards[file] = kind(file, self.label)
        return self._shards[file]

    def close(self) -> None:
        for shard in getattr(self, "_shards", {}).values():
            shard.close()

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ access
    def names(self) -> List[str]:
        return list(self.infos)

    def get(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tensor ``name``; read into ``out`` (a flat uint8 tensor of at least its size in
        bytes, e.g. from :class:`Scratch`) when given, so the result is a view of it."""
        if name not in self._where:
            raise CpiftError(f"model {self.label}: no tensor named {name}")
        return self._where[name].read(name, out)

    def get_range(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flat entries ``[start, stop)`` of tensor ``name``, read from disk alone (into ``out``,
        a flat uint8 buffer of at least their size in bytes, when given)."""
        if name not in self._where:
            raise CpiftError(f"model {self.label}: no tensor named {name}")
        return self._where[name].read_range(name, start, stop, out)

    def nbytes(self, name: str) -> int:
        return self._where[name].nbytes(name)

    def sample(self, name: str) -> List[float]:
        """:func:`sample_values` of one tensor, reading only those entries."""
        return self._where[name].read_at(name, sample_positions(self.infos[name].numel))

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

    def first_non_finite(self) -> Optional[str]:
        """The first floating-point tensor holding a NaN or Inf (streamed, one tensor
        at a time), or None."""
        from cpift_merge.core.topk import all_finite

        for name, info in self.infos.items():
            if info.is_float and not all_finite(self.get(name)):
                return name
        return None

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


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time (the library needs all at once).

    Data goes to a scratch file as it comes; :meth:`close` writes the header and
    appends the data, so memory holds one tensor at a time.
    """

    def __init__(self, path: str):
        self.path = path
        self._scratch = open(path + ".data", "w+b")
        self._entries: Dict[str, Dict] = {}
        self._offset = 0

    def add(self, name: str, data: torch.Tensor, shape: Optional[Sequence[int]] = None) -> None:
        """Append one tensor (stored flat unless ``shape`` is given)."""
        raw = data.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._scratch.write(raw)
        self._entries[name] = {
            "dtype": DTYPE_NAMES[data.dtype],
            "shape": [data.numel()] if shape is None else list(shape),
            "data_offsets": [self._offset, self._offset + len(raw)],
        }
        self._offset += len(raw)

    def close(self, metadata: Optional[Mapping[str, str]] = None) -> str:
        header = dict(self._entries)
        header["__metadata__"] = dict(metadata or {})
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        head = struct.pack("<Q", len(blob)) + blob
        digest = hashlib.sha256(head)  # the whole file (region format version 2)
        with open(self.path, "wb") as out:
            out.write(head)
            self._scratch.seek(0)
            while chunk := self._scratch.read(1 << 22):
                out.write(chunk)
                digest.update(chunk)
        self._scratch.close()
        os.remove(self.path + ".data")
        return digest.hexdigest()


def has_safetensors(path: str) -> bool:
    """Whether ``path`` is a ``.safetensors`` file or a folder holding one (what
    :class:`Checkpoint` reads; a ``.bin`` model is not)."""
    if path.endswith(".safetensors"):
        return True
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def fingerprint_from_samples(infos: Dict[str, TensorInfo], samples: Dict[str, List[float]]) -> str:
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
                f"model {name} is a {arch[0]} but the base is a {base_arch[0]}; all models must share one architecture"
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
