"""How much of a task's update its core holds: the core's share of ‖Δ‖₁ and ‖Δ‖₂².

A random set of the same size holds, in expectation, ``k / D`` of either norm, so the
ratio share / (k / D) says how strongly the core concentrates the update (1: no more
than chance). Sums are accumulated a chunk at a time (float32 within a chunk, float64
across chunks), so memory stays at the tensor itself.
"""

from __future__ import annotations

import math
import threading
from typing import Dict, Iterable, Optional, Sequence

import torch

CHUNK = 1 << 20
# below this L2 ratio a core barely concentrates the update: freezing or transplanting
# it is close to freezing or transplanting a random subset
WEAK_L2_RATIO = 2.0


_LOCAL = threading.local()


def _float64(n: int, device: torch.device) -> torch.Tensor:
    """A float64 buffer of ``n`` entries, reused per thread (a fresh one per chunk
    costs a page fault per 4 KiB)."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.device != device or buf.numel() < n:
        buf = _LOCAL.buf = torch.empty(max(n, CHUNK), dtype=torch.float64, device=device)
    return buf[:n]


def _chunk_sums(piece: torch.Tensor) -> tuple[float, float]:
    """``(Σ piece, Σ piece²)`` of one chunk of non-negative values, in the chunk's own float32
    (a cascaded sum and a dot product: relative error ~1e-6, a third of the time of a
    float64 copy); in float64 when the squares overflow or the chunk is float64."""
    if piece.dtype == torch.float32:
        l1, l2 = float(piece.sum()), float(torch.dot(piece, piece))
        if math.isfinite(l2):
            return l1, l2
    c = _float64(piece.numel(), piece.device).copy_(piece)
    return float(c.sum()), float(torch.dot(c, c))


def norm_sums(abs_delta: torch.Tensor) -> tuple[float, float]:
    """``(‖Δ‖₁, ‖Δ‖₂²)`` of one tensor's ``|Δ|``: float32 chunk sums (:func:`_chunk_sums`)
    added in float64."""
    flat = abs_delta.reshape(-1)
    l1 = l2 = 0.0
    for i in range(0, flat.numel(), CHUNK):
        a, b = _chunk_sums(flat[i : i + CHUNK])
        l1 += a
        l2 += b
    return l1, l2


def core_sums(abs_delta: torch.Tensor, core: Optional[torch.Tensor]) -> tuple[float, float]:
    """``(core ‖Δ‖₁, core ‖Δ‖₂²)``: the core's few entries (a mask, or flat int64 indices:
    cheaper, no scan; None: ``abs_delta`` holds just the core's entries) summed in float64."""
    flat = abs_delta.reshape(-1)
    if core is None:
        sel = flat.to(torch.float64)
    else:
        idx = core.reshape(-1)
        sel = (flat[idx] if idx.dtype == torch.bool else flat.index_select(0, idx)).to(torch.float64)
    return float(sel.sum()), float(torch.dot(sel, sel))


def delta_sums(abs_delta: torch.Tensor, core: torch.Tensor) -> tuple[float, float, float, float]:
    """``(core ‖Δ‖₁, ‖Δ‖₁, core ‖Δ‖₂², ‖Δ‖₂²)`` of one tensor from its ``|Δ|`` and its
    core (:func:`core_sums`, :func:`norm_sums`)."""
    l1, l2 = norm_sums(abs_delta)
    c1, c2 = core_sums(abs_delta, core)
    return c1, l1, c2, l2


def add_sums(parts: Iterable[Sequence[float]]) -> tuple[float, float, float, float]:
    totals = [0.0, 0.0, 0.0, 0.0]
    for p in parts:
        for i in range(4):
            totals[i] += float(p[i])
    return totals[0], totals[1], totals[2], totals[3]


def shares(sums: Sequence[float], k: int, total: int) -> Dict[str, float]:
    """``core_share_l1``/``core_share_l2`` (fractions in [0, 1]), the share a random set
    of ``k`` of ``total`` entries would hold (``random_share``), and the ratios."""
    c1, t1, c2, t2 = sums
    s1 = min(1.0, c1 / t1) if t1 > 0 else 0.0
    s2 = min(1.0, c2 / t2) if t2 > 0 else 0.0
    rnd = k / total if total else 0.0
    return {
        "core_share_l1": s1,
        "core_share_l2": s2,
        "random_share": rnd,
        "l1_ratio": s1 / rnd if rnd else 0.0,
        "l2_ratio": s2 / rnd if rnd else 0.0,
    }
