"""The CPI fusion of one tensor: core transplant plus SLERP of the non-core entries.

Pure: tensors in, tensors out. The mergekit method (``cpift_merge.method``) and the
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


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """Spherical interpolation of two flat vectors by factor ``t`` (linear when the
    angle is below ``epsilon``). Computed in float32 (float64 for float64 inputs);
    returned in ``a``'s dtype."""
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1).to(work), b.reshape(-1).to(work)
    if x.numel() == 0:
        return a.clone()
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    nx = torch.where(nx > 1e-8, nx, torch.ones_like(nx))
    ny = torch.where(ny > 1e-8, ny, torch.ones_like(ny))
    dot = torch.dot(x / nx, y / ny).clamp(-1, 1)
    if float(dot.abs()) > math.cos(epsilon):
        out = (1 - t) * x + t * y
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        out = (torch.sin((1 - t) * theta) / sin_theta) * x + (torch.sin(t * theta) / sin_theta) * y
    return out.to(a.dtype).reshape(a.shape)


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
) -> "tuple[torch.Tensor, FuseStats]":
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
    n_owners = torch.stack(flat_cores).sum(0) if len(flat_cores) > 1 else flat_cores[0].to(torch.int8)
    in_core = n_owners > 0
    out = torch.empty_like(flat_base)

    # ---- non-core: one SLERP over the non-core entries of the whole tensor
    free = ~in_core
    if bool(free.any()):
        a = flat_base[free]
        if omega == 0.0:
            out[free] = a
        else:
            if len(flats) == 1:
                target = flats[0][free]
            else:
                target = torch.stack([f[free].to(torch.float32) for f in flats]).mean(0).to(dtype)
            out[free] = target if omega == 1.0 else slerp(omega, a, target, epsilon)

    # ---- core: transplant
    transplanted = [0] * len(flats)
    single = n_owners == 1
    multi = n_owners > 1
    for i, (f, c) in enumerate(zip(flats, flat_cores)):
        own = c & single
        out[own] = f[own]
        transplanted[i] = int(own.sum())
    if bool(multi.any()):
        if overlap == "max_delta":
            ref = (theta0 if theta0 is not None else base).reshape(-1)[multi].to(torch.float32)
            scores = torch.stack(
                [
                    torch.where(c[multi], (f[multi].to(torch.float32) - ref).abs(), torch.full_like(ref, -1.0))
                    for f, c in zip(flats, flat_cores)
                ]
            )
            winner = scores.argmax(0)  # first maximum wins ties
            values = torch.stack([f[multi] for f in flats]).gather(0, winner[None]).reshape(-1)
            out[multi] = values
            for i in range(len(flats)):
                transplanted[i] += int((winner == i).sum())
        else:
            owners = torch.stack([c[multi] for c in flat_cores]).to(torch.float32)
            vals = torch.stack([f[multi].to(torch.float32) for f in flats])
            out[multi] = ((vals * owners).sum(0) / owners.sum(0)).to(dtype)
            for i, c in enumerate(flat_cores):
                transplanted[i] += int((c & multi).sum())
    stats = FuseStats(
        core_entries=int(in_core.sum()),
        overlap_entries=int(multi.sum()),
        transplanted=transplanted,
    )
    return out.reshape(shape), stats
