"""Boolean masks at 1 bit per entry, or as sparse indices when that is smaller.

Pure torch and device-agnostic: the same packing serves the region files on disk and
the frozen-entry masks the trainer keeps on the accelerator. Bit order is
little-endian within each byte (entry ``8*i + j`` is bit ``j`` of byte ``i``).
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = [1 << j for j in range(8)]


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat uint8 tensor of ``ceil(numel/8)`` bytes holding ``mask`` (any shape)."""
    flat = mask.reshape(-1).to(torch.bool)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` entries."""
    if packed.numel() != packed_size(numel):
        raise ValueError(f"packed mask has {packed.numel()} bytes, expected {packed_size(numel)} for {numel} entries")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def encode(mask: torch.Tensor) -> torch.Tensor:
    """The smaller of packed bits (uint8) and sorted flat indices (int32/int64).

    The dtype tells the encoding apart; :func:`decode` needs only ``numel``.
    """
    flat = mask.reshape(-1)
    count = int(torch.count_nonzero(flat))
    idx_dtype = index_dtype(flat.numel())
    idx_bytes = count * torch.tensor([], dtype=idx_dtype).element_size()
    if idx_bytes < packed_size(flat.numel()):
        return flat.nonzero().reshape(-1).to(idx_dtype)
    return pack_bits(flat)


class MaskParts:
    """A flat mask given piece by piece in flat order (every piece but the last a multiple
    of 8 entries): :meth:`encode` returns what :func:`encode` returns for the whole mask,
    while only its packed bits and its indices are held, never the mask itself."""

    def __init__(self, numel: int):
        self.numel = numel
        self.count = 0
        self._at = 0
        self._dtype = index_dtype(numel)
        self._packed: list = []
        self._idx: list = []

    def add(self, piece: torch.Tensor) -> None:
        if self._at % 8:
            raise ValueError("only the last piece of a mask may have a length that is not a multiple of 8")
        flat = piece.reshape(-1)
        self._packed.append(pack_bits(flat))
        idx = flat.nonzero().reshape(-1)
        self._idx.append((idx + self._at).to(self._dtype))
        self.count += idx.numel()
        self._at += flat.numel()

    def encode(self) -> torch.Tensor:
        if self._at != self.numel:
            raise ValueError(f"mask pieces cover {self._at} of {self.numel} entries")
        idx_bytes = self.count * torch.tensor([], dtype=self._dtype).element_size()
        if idx_bytes < packed_size(self.numel):
            return torch.cat(self._idx)
        return torch.cat(self._packed)


def decode(data: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat bool mask of ``numel`` entries from :func:`encode`'s output."""
    if data.dtype == torch.uint8:
        return unpack_bits(data, numel)
    if data.dtype in (torch.int32, torch.int64):
        idx = data.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"mask index out of range for {numel} entries")
        out = torch.zeros(numel, dtype=torch.bool, device=data.device)
        out[idx] = True
        return out
    raise ValueError(f"unknown mask encoding dtype {data.dtype}")


def count(data: torch.Tensor, numel: int) -> int:
    """Entries set in an encoded mask of ``numel`` entries, without decoding it; refuses
    (ValueError) data that :func:`encode` cannot have written: a wrong byte count, pad
    bits set, indices out of range, unsorted or repeated."""
    if data.dtype == torch.uint8:
        if data.numel() != packed_size(numel):
            raise ValueError(f"packed mask has {data.numel()} bytes, expected {packed_size(numel)} for {numel} entries")
        flat = data.reshape(-1)
        if numel % 8 and int(flat[-1]) >> (numel % 8):
            raise ValueError("packed mask has bits set past its last entry")
        return sum(int(((flat >> j) & 1).sum(dtype=torch.int64)) for j in range(8))
    if data.dtype in (torch.int32, torch.int64):
        idx = data.reshape(-1).to(torch.int64)
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())):
            raise ValueError(f"mask indices must be increasing and below {numel}")
        return idx.numel()
    raise ValueError(f"unknown mask encoding dtype {data.dtype}")
