"""The CPI fusion of one tensor: core transplant plus SLERP of the non-core entries.

Pure: tensors in, tensors out. The mergekit method (``cpift_merge.mergekit.method``) and the
pipeline call :func:`cpi_fuse` per tensor.

Rules (DESIGN §1 "Fusion"):

* Core entries (in at least one task's core) take the owner's value, bit for bit.
  ``overlap="max_delta"``: an entry in several cores goes to the task with the largest
  ``|theta_i - theta_0|`` there (ties: the earlier task). ``overlap="mean"``: it takes
  the mean of its owners' values (Localize-and-Stitch).
* Non-core entries: ``SLERP(base, target, omega)`` computed once per tensor over the
  non-core entries only, where ``target`` is the arithmetic mean of the task models
  there (with one task, exactly ``SLERP(base, theta_1, omega)``). When the angle
  between the two is below ``epsilon`` radians (or within ``epsilon`` of antipodal)
  the interpolation is linear, as in mergekit's ``slerp``. ``omega = 0`` copies the
  base's entries; ``omega = 1`` copies the target's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

# mergekit's slerp falls back to linear interpolation when |cos| > 0.9995
DEFAULT_EPSILON = math.acos(0.9995)
OVERLAP_RULES = ("max_delta", "mean")


def _coefficients(t: float, nx: torch.Tensor, ny: torch.Tensor, dot: torch.Tensor, epsilon: float):
    """SLERP weights of x and y from their norms and dot product (linear when the
    angle is below ``epsilon`` or within ``epsilon`` of antipodal)."""
    nx = torch.where(nx > 1e-8, nx, torch.ones_like(nx))
    ny = torch.where(ny > 1e-8, ny, torch.ones_like(ny))
    cos = (dot / (nx * ny)).clamp(-1, 1)
    if float(cos.abs()) > math.cos(epsilon):
        return 1 - t, t
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta


# entries per chunk of the streamed passes: float32 work buffers of a few MiB, reused, where
# whole-tensor temporaries of a 7B model's embedding (0.5 GB each) cost a page fault per 4 KiB
CHUNK = 1 << 20


def _chunks(numel: int) -> range:
    return range(0, numel, CHUNK)


class _Work:
    """Reusable float32 chunk buffers (one per slot) on one device."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self._bufs = device, dtype, {}

    def __call__(self, slot: str, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        buf = self._bufs.get(slot)
        if buf is None:
            buf = self._bufs[slot] = torch.empty(CHUNK, dtype=dtype or self.dtype, device=self.device)
        return buf[:n]


def _slerp_into(
    out: torch.Tensor,
    t: float,
    x_of,
    y_of,
    epsilon: float,
    skip: Optional[torch.Tensor],
    skip_x: Optional[torch.Tensor] = None,
    skip_y: Optional[torch.Tensor] = None,
) -> None:
    """Write ``SLERP(x, y, t)`` into the flat tensor ``out``, a chunk at a time: one pass
    for the norms and the dot product (summed in float64 across chunks), one for the
    output. ``x_of(start, stop)``/``y_of(start, stop)`` give a chunk of each vector in the
    work dtype (into reused buffers); ``skip`` (flat indices) leaves entries out of the
    angle and norms, their values given by ``skip_x``/``skip_y``."""
    numel = out.numel()
    xx = yy = xy = 0.0
    for s in _chunks(numel):
        e = min(s + CHUNK, numel)
        x, y = x_of(s, e), y_of(s, e)
        xx += float(torch.dot(x, x))
        yy += float(torch.dot(y, y))
        xy += float(torch.dot(x, y))
    if skip is not None and skip.numel():
        xs, ys = skip_x.to(torch.float64), skip_y.to(torch.float64)
        xx = max(xx - float(torch.dot(xs, xs)), 0.0)
        yy = max(yy - float(torch.dot(ys, ys)), 0.0)
        xy = xy - float(torch.dot(xs, ys))
    work = out.dtype if out.dtype == torch.float64 else torch.float32
    norms = (torch.tensor(v, dtype=work, device=out.device).sqrt() for v in (xx, yy))
    ca, cb = _coefficients(t, *norms, torch.tensor(xy, dtype=work, device=out.device), epsilon)
    ca = float(ca) if torch.is_tensor(ca) else ca
    cb = float(cb) if torch.is_tensor(cb) else cb
    for s in _chunks(numel):
        e = min(s + CHUNK, numel)
        x, y = x_of(s, e), y_of(s, e)
        out[s:e] = x.mul_(ca).add_(y.mul_(cb))  # ca*x + cb*y, each product rounded (as unchunked)


def _flat_reader(flat: torch.Tensor, work: _Work, slot: str):
    """``(start, stop) -> chunk of flat`` in the work dtype, into a reused buffer."""

    def read(s: int, e: int) -> torch.Tensor:
        return work(slot, e - s).copy_(flat[s:e])

    return read


def slerp(
    t: float,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float = DEFAULT_EPSILON,
    skip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Spherical interpolation of two tensors (as flat vectors) by factor ``t``, linear
    when their angle is below ``epsilon``. Computed in float32 (float64 for float64
    inputs) a chunk at a time, returned in ``a``'s dtype and shape.

    ``skip`` (flat indices) leaves entries out of the angle and norms: the result is the
    SLERP of the other entries, computed without gathering them (the statistics of the
    whole tensor minus those of the few skipped entries). Skipped entries of the output
    hold the same interpolation formula and are meant to be overwritten.
    """
    work = _Work(a.device, torch.float64 if a.dtype == torch.float64 else torch.float32)
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.numel() == 0:
        return a.clone()
    out = torch.empty_like(fa)
    sx = fa[skip] if skip is not None and skip.numel() else None
    sy = fb[skip] if sx is not None else None
    _slerp_into(out, t, _flat_reader(fa, work, "x"), _flat_reader(fb, work, "y"), epsilon, skip, sx, sy)
    return out.reshape(a.shape)


@dataclass
class FuseStats:
    """What :func:`cpi_fuse` did to one tensor."""

    core_entries: int  # entries in at least one core
    overlap_entries: int  # entries in two or more cores
    transplanted: List[int]  # per task: entries whose value came from that task


def core_indices(core: torch.Tensor) -> torch.Tensor:
    """Sorted flat int64 indices of a core given as a bool mask (any shape) or already as
    sorted flat indices."""
    flat = core.reshape(-1)
    if flat.dtype == torch.bool:
        return flat.nonzero().reshape(-1)
    return flat.to(torch.int64)


def cpi_fuse(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    cores: Sequence[torch.Tensor],
    *,
    omega: float,
    epsilon: float = DEFAULT_EPSILON,
    overlap: str = "max_delta",
    theta0: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, FuseStats]:
    """Fuse one tensor. ``cores[i]`` is task i's core: a bool mask shaped like the tensor,
    or its sorted flat indices (int64, as :func:`core_indices` gives); ``theta0`` is the
    pre-trained reference for ``max_delta`` (defaults to ``base``, right when the
    backbone is theta_0).

    Memory: the output, the cores' indices and a few chunk buffers; the non-core SLERP
    streams the tensor in chunks of ``CHUNK`` entries.
    """
    if not thetas or len(thetas) != len(cores):
        raise ValueError("need one core mask per task model, and at least one task")
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega}")
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    shape, dtype, device = base.shape, base.dtype, base.device
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1).to(dtype) for t in thetas]
    idx = [core_indices(c).to(device) for c in cores]
    shared: List[torch.Tensor] = [i[:0] for i in idx]  # per task: its entries in other cores too
    if len(idx) == 1:
        single, multi = idx, idx[0][:0]
    else:
        owners = torch.zeros(flat_base.numel(), dtype=torch.uint8, device=device)
        for i in idx:
            owners[i] += 1  # a task's indices are distinct
        counts = [owners[i] for i in idx]
        single = [i[c == 1] for i, c in zip(idx, counts)]
        shared = [i[c > 1] for i, c in zip(idx, counts)]
        del owners
        multi = torch.unique(torch.cat(shared)) if any(p.numel() for p in shared) else idx[0][:0]
    core_idx = torch.cat([*single, multi])  # every core entry once

    # ---- non-core: one SLERP over the non-core entries of the whole tensor
    work = _Work(device, torch.float64 if dtype == torch.float64 else torch.float32)
    read_base = _flat_reader(flat_base, work, "x")
    if len(flats) == 1:
        read_target = _flat_reader(flats[0], work, "y")
    else:

        def read_target(s: int, e: int) -> torch.Tensor:
            # the mean of the task models in float32, rounded to the tensor's dtype
            acc = work("acc", e - s).copy_(flats[0][s:e])
            for f in flats[1:]:
                acc += f[s:e]
            acc /= len(flats)
            if dtype == acc.dtype:
                return acc
            return work("y", e - s).copy_(work("rounded", e - s, dtype).copy_(acc))

    if omega == 0.0:
        out = flat_base.clone()
    elif omega == 1.0:
        out = torch.empty_like(flat_base)
        for s in _chunks(out.numel()):
            e = min(s + CHUNK, out.numel())
            out[s:e] = read_target(s, e)
    else:
        out = torch.empty_like(flat_base)
        if core_idx.numel():
            skip_x = flat_base[core_idx]
            if len(flats) == 1:
                skip_y = flats[0][core_idx]
            else:
                acc = flats[0][core_idx].to(torch.float32)
                for f in flats[1:]:
                    acc += f[core_idx]
                skip_y = (acc / len(flats)).to(dtype)
        else:
            skip_x = skip_y = None
        _slerp_into(out, omega, read_base, read_target, epsilon, core_idx, skip_x, skip_y)

    # ---- core: transplant (work on the few core indices only)
    transplanted = [0] * len(flats)
    for i, (f, own) in enumerate(zip(flats, single)):
        out[own] = f[own]
        transplanted[i] = own.numel()
    if multi.numel():
        member = torch.stack([torch.isin(multi, p) for p in shared])
        vals = torch.stack([f[multi] for f in flats])
        if overlap == "max_delta":
            ref = (theta0 if theta0 is not None else base).reshape(-1)[multi].to(torch.float32)
            scores = torch.where(member, (vals.to(torch.float32) - ref).abs(), torch.tensor(-1.0, device=device))
            winner = scores.argmax(0)  # first maximum wins ties
            out[multi] = vals.gather(0, winner[None]).reshape(-1)
            for i in range(len(flats)):
                transplanted[i] += int((winner == i).sum())
        else:
            w = member.to(torch.float32)
            out[multi] = ((vals.to(torch.float32) * w).sum(0) / w.sum(0)).to(dtype)
            for i in range(len(flats)):
                transplanted[i] += int(member[i].sum())
    stats = FuseStats(
        core_entries=int(core_idx.numel()),
        overlap_entries=int(multi.numel()),
        transplanted=transplanted,
    )
    return out.reshape(shape), stats
