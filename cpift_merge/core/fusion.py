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


def slerp(
    t: float,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float = DEFAULT_EPSILON,
    skip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Spherical interpolation of two tensors (as flat vectors) by factor ``t``, linear
    when their angle is below ``epsilon``. Computed in float32 (float64 for float64
    inputs), returned in ``a``'s dtype and shape.

    ``skip`` (flat indices) leaves entries out of the angle and norms: the result is the
    SLERP of the other entries, computed without gathering them (the statistics of the
    whole tensor minus those of the few skipped entries). Skipped entries of the output
    hold the same interpolation formula and are meant to be overwritten.
    """
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1).to(work), b.reshape(-1).to(work)
    if x.numel() == 0:
        return a.clone()
    xx, yy, xy = torch.dot(x, x), torch.dot(y, y), torch.dot(x, y)
    if skip is not None and skip.numel():
        xs, ys = x[skip].to(torch.float64), y[skip].to(torch.float64)
        xx = (xx.double() - torch.dot(xs, xs)).clamp(min=0).to(work)
        yy = (yy.double() - torch.dot(ys, ys)).clamp(min=0).to(work)
        xy = (xy.double() - torch.dot(xs, ys)).to(work)
    ca, cb = _coefficients(t, xx.sqrt(), yy.sqrt(), xy, epsilon)
    return (ca * x + cb * y).to(a.dtype).reshape(a.shape)


@dataclass
class FuseStats:
    """What :func:`cpi_fuse` did to one tensor."""

    core_entries: int  # entries in at least one core
    overlap_entries: int  # entries in two or more cores
    transplanted: List[int]  # per task: entries whose value came from that task


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
    """Fuse one tensor. ``cores[i]`` is task i's bool core mask (shaped like the
    tensor); ``theta0`` is the pre-trained reference for ``max_delta`` (defaults to
    ``base``, right when the backbone is theta_0).
    """
    if not thetas or len(thetas) != len(cores):
        raise ValueError("need one core mask per task model, and at least one task")
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega}")
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    shape, dtype = base.shape, base.dtype
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1).to(dtype) for t in thetas]
    flat_cores = [c.reshape(-1).to(device=base.device, dtype=torch.bool) for c in cores]
    if len(flat_cores) == 1:
        n_owners = flat_cores[0].to(torch.uint8)
    else:
        n_owners = torch.zeros_like(flat_base, dtype=torch.uint8)
        for c in flat_cores:
            n_owners += c
    core_idx = n_owners.nonzero().reshape(-1)  # few: about density * numel * tasks

    # ---- non-core: one SLERP over the non-core entries of the whole tensor
    if omega == 0.0:
        out = flat_base.clone()
    else:
        if len(flats) == 1:
            target = flats[0]
        else:
            acc = flats[0].to(torch.float32).clone()
            for f in flats[1:]:
                acc += f
            target = (acc / len(flats)).to(dtype)
        if omega == 1.0:
            out = target.clone()
        else:
            out = slerp(omega, flat_base, target, epsilon, skip=core_idx)

    # ---- core: transplant (work on the few core indices only)
    transplanted = [0] * len(flats)
    owners = n_owners[core_idx]
    single, multi = core_idx[owners == 1], core_idx[owners > 1]
    for i, (f, c) in enumerate(zip(flats, flat_cores)):
        own = single[c[single]]
        out[own] = f[own]
        transplanted[i] = own.numel()
    if multi.numel():
        member = torch.stack([c[multi] for c in flat_cores])
        vals = torch.stack([f[multi] for f in flats])
        if overlap == "max_delta":
            ref = (theta0 if theta0 is not None else base).reshape(-1)[multi].to(torch.float32)
            scores = torch.where(member, (vals.to(torch.float32) - ref).abs(), torch.tensor(-1.0))
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
