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
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from cpift_merge.core import fused, localization, topk

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
    """Reusable chunk buffers (one per slot, in the work dtype unless asked otherwise) on one device."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self._bufs = device, dtype, {}

    def __call__(self, slot: str, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        buf = self._bufs.get(slot)
        if buf is None:
            buf = self._bufs[slot] = torch.empty(CHUNK, dtype=dtype or self.dtype, device=self.device)
        return buf[:n]


class _Dots:
    """``x·x``, ``y·y`` and ``x·y`` summed in float64 over chunks."""

    def __init__(self) -> None:
        self.xx = self.yy = self.xy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.xx += float(torch.dot(x, x))
        self.yy += float(torch.dot(y, y))
        self.xy += float(torch.dot(x, y))

    def add_sums(self, sums: tuple) -> None:
        self.xx += sums[0]
        self.yy += sums[1]
        self.xy += sums[2]

    def coefficients(self, t: float, epsilon: float, work: torch.dtype, device, less=None) -> tuple[float, float]:
        """SLERP weights of x and y, leaving out of the angle and the norms the entries
        whose float64 ``(x·x, y·y, x·y)`` are ``less`` (None: none)."""
        xx, yy, xy = self.xx, self.yy, self.xy
        if less is not None:
            xx = max(xx - less[0], 0.0)
            yy = max(yy - less[1], 0.0)
            xy = xy - less[2]
        norms = (torch.tensor(v, dtype=work, device=device).sqrt() for v in (xx, yy))
        ca, cb = _coefficients(t, *norms, torch.tensor(xy, dtype=work, device=device), epsilon)
        return (float(ca) if torch.is_tensor(ca) else ca), (float(cb) if torch.is_tensor(cb) else cb)


def _dot_sums(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """``(x·x, y·y, x·y)`` in float64."""
    xs, ys = x.to(torch.float64), y.to(torch.float64)
    return float(torch.dot(xs, xs)), float(torch.dot(ys, ys)), float(torch.dot(xs, ys))


def _interpolate(out: torch.Tensor, ca: float, cb: float, x_of, y_of, work: _Work, after=None) -> None:
    """``out = ca*x + cb*y`` a chunk at a time (each product rounded, as unchunked); ``y``
    may read ``out`` itself. ``after(i, start, stop)`` runs after chunk ``i`` is written."""
    numel = out.numel()
    for n, s in enumerate(_chunks(numel)):
        e = min(s + CHUNK, numel)
        px = torch.mul(x_of(s, e), ca, out=work("px", e - s))
        py = torch.mul(y_of(s, e), cb, out=work("py", e - s))
        if out.dtype == px.dtype:
            torch.add(px, py, out=out[s:e])
        else:
            out[s:e] = px.add_(py)
        if after is not None:
            after(n, s, e)


def _flat_reader(flat: torch.Tensor, work: _Work, slot: str):
    """``(start, stop) -> chunk of flat`` in the work dtype, to read, not to change: a view
    when ``flat`` has that dtype, else a copy into a reused buffer."""
    if flat.dtype == work.dtype:
        return lambda s, e: flat[s:e]
    return lambda s, e: work(slot, e - s).copy_(flat[s:e])


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
    x_of, y_of = _flat_reader(fa, work, "x"), _flat_reader(fb, work, "y")
    dots = _Dots()
    for s in _chunks(fa.numel()):
        e = min(s + CHUNK, fa.numel())
        dots.add(x_of(s, e), y_of(s, e))
    less = _dot_sums(fa[skip], fb[skip]) if skip is not None and skip.numel() else None
    ca, cb = dots.coefficients(t, epsilon, work.dtype, a.device, less)
    _interpolate(out, ca, cb, x_of, y_of, work)
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


CoreOf = Callable[[int, int, int, Optional[torch.Tensor]], torch.Tensor]


class ThresholdCores:
    """:func:`fuse_stream`'s ``core_of`` for cores given by thresholds on ``|Δ|`` keys
    (``topk``'s float32 bit patterns): task i's core is every entry whose key is above
    ``keys[i]``, plus the first ``ties[i]`` entries equal to it in flat order (the quota is
    carried across chunks; ``left`` is what remains of it). Tallies per task the core's
    size (``sizes``) and the float64 ``(Σ|Δ|, Σ|Δ|²)`` over it (``core``), and with
    ``norms`` the whole tensor's (``norms``: this needs each chunk's whole ``|Δ|``, which
    the fused loop does not make, so the cores are then cut in torch ops)."""

    def __init__(self, keys: Sequence[int], ties: Sequence[int], norms: bool = False):
        self.keys, self.left = [int(k) for k in keys], [int(t) for t in ties]
        self.sizes = [0] * len(self.keys)
        self.core = [[0.0, 0.0] for _ in self.keys]
        self.norms = [[0.0, 0.0] for _ in self.keys] if norms else None
        self._flags: Optional[torch.Tensor] = None

    def __call__(self, task: int, start: int, stop: int, delta: Optional[torch.Tensor]) -> torch.Tensor:
        if self._flags is None or self._flags.numel() < stop - start:
            self._flags = torch.empty(stop - start, dtype=torch.bool, device=delta.device)
        keys = delta.view(torch.int32)
        local, took = topk.cut_indices(keys, self.keys[task], self.left[task], self._flags[: stop - start])
        self.left[task] -= took
        self.tally(task, local.numel(), localization.core_sums(delta, local))
        if self.norms is not None:
            self.norms[task] = [a + b for a, b in zip(self.norms[task], localization.norm_sums(delta))]
        return local

    def tally(self, task: int, size: int, sums: Sequence[float]) -> None:
        """Count ``size`` more core entries of ``task`` with ``(Σ|Δ|, Σ|Δ|²)`` = ``sums``."""
        self.sizes[task] += int(size)
        self.core[task] = [a + float(b) for a, b in zip(self.core[task], sums)]

    def delta_sums(self, totals: Sequence[Optional[Sequence[float]]]) -> List[List[float]]:
        """Per task ``(core ‖Δ‖₁, ‖Δ‖₁, core ‖Δ‖₂², ‖Δ‖₂²)`` (``localization.delta_sums``'s
        order), the whole tensor's norms from ``totals[task]`` when given, else tallied."""
        out = []
        for task, known in enumerate(totals):
            whole = known if known is not None else self.norms[task]
            out.append([self.core[task][0], float(whole[0]), self.core[task][1], float(whole[1])])
        return out


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

    Memory: the output, the cores' indices and a few chunk buffers (:func:`fuse_stream`).
    """
    if not thetas or len(thetas) != len(cores):
        raise ValueError("need one core mask per task model, and at least one task")
    core_of = given_cores(cores, base.device)
    return fuse_stream(base, thetas, core_of, omega=omega, epsilon=epsilon, overlap=overlap, theta0=theta0)


def given_cores(cores: Sequence[torch.Tensor], device=None) -> CoreOf:
    """:func:`fuse_stream`'s ``core_of`` for cores known in advance (bool masks or sorted
    flat indices, as :func:`cpi_fuse` takes them)."""
    idx = [core_indices(c).to(device) if device is not None else core_indices(c) for c in cores]

    def core_of(task: int, start: int, stop: int, _delta) -> torch.Tensor:
        i = idx[task]
        lo, hi = (int(x) for x in torch.searchsorted(i, torch.tensor([start, stop], device=i.device)))
        return i[lo:hi] - start

    return core_of


class _Cores:
    """The cores of one tensor, chunk by chunk: which entries each task owns, the values
    they take (:func:`fuse_stream`'s overlap rule), and the base and target values there
    (left out of the SLERP's angle). Work per chunk is on the chunk's few core entries, in
    buffers of the chunk's size, so no tensor-sized index or gather is made."""

    def __init__(self, tasks: int, overlap: str):
        self.tasks, self.overlap = tasks, overlap
        self.places: List[torch.Tensor] = []  # per chunk: core entries (chunk-relative), then
        self.values: List[torch.Tensor] = []  # the values they take
        # the entries left out of the SLERP, in the order: task 0's own entries (all chunks),
        # task 1's, ..., then the shared ones
        self._skip: List[List[tuple]] = [[] for _ in range(tasks + 1)]
        self._sizes: List[List[int]] = []  # per chunk: the lengths of own_0, ..., own_n, shared in places
        self.entries = self.overlap_entries = 0
        self.transplanted = [0] * tasks

    def add(self, local, pieces, ref, owners) -> int:
        """Take one chunk's cores (``local[i]``: task i's sorted chunk-relative indices) and
        the tasks' values there (``pieces``; ``ref``: theta_0's, for ``max_delta``).
        Returns the chunk's number."""
        if self.tasks == 1:
            own, multi = [local[0]], local[0][:0]
        else:
            # index_select/index_add_/masked_select: several times faster than t[idx] on CPU
            owners.zero_()
            one = owners.new_ones(1)
            for i in local:
                owners.index_add_(0, i, one.expand(i.numel()))  # a task's indices are distinct
            counts = [owners.index_select(0, i) for i in local]
            own = [torch.masked_select(i, c == 1) for i, c in zip(local, counts)]
            shared = [torch.masked_select(i, c > 1) for i, c in zip(local, counts)]
            multi = torch.unique(torch.cat(shared)) if any(p.numel() for p in shared) else local[0][:0]
        values = [p.index_select(0, i) for p, i in zip(pieces, own)]
        for t, i in enumerate(own):
            self.transplanted[t] += i.numel()
        if multi.numel():
            member = torch.stack([torch.isin(multi, p) for p in shared])
            vals = torch.stack([p.index_select(0, multi) for p in pieces])
            if self.overlap == "max_delta":
                r = ref.index_select(0, multi).to(torch.float32)
                scores = torch.where(member, (vals.to(torch.float32) - r).abs(), torch.tensor(-1.0, device=r.device))
                winner = scores.argmax(0)  # first maximum wins ties
                values.append(vals.gather(0, winner[None]).reshape(-1))
                for t in range(self.tasks):
                    self.transplanted[t] += int((winner == t).sum())
            else:
                w = member.to(torch.float32)
                values.append(((vals.to(torch.float32) * w).sum(0) / w.sum(0)).to(pieces[0].dtype))
                for t in range(self.tasks):
                    self.transplanted[t] += int(member[t].sum())
        groups = [*own, multi]
        self._sizes.append([g.numel() for g in groups])
        self.places.append(torch.cat(groups))
        self.values.append(torch.cat(values))
        self.entries += self.places[-1].numel()
        self.overlap_entries += multi.numel()
        return len(self.places) - 1

    def skip(self, chunk: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the base's (``x``) and the target's (``y``) values at chunk ``chunk``'s core
        entries, for :meth:`skip_sums`."""
        for slot, idx in zip(self._skip, self.places[chunk].split(self._sizes[chunk])):
            if idx.numel():
                slot.append((x.index_select(0, idx), y.index_select(0, idx)))

    def skip_sums(self) -> Optional[tuple]:
        """The float64 ``(x·x, y·y, x·y)`` of the base's (x) and the target's (y) values at
        every core entry, or None for no core entry."""
        pairs = [p for slot in self._skip for p in slot]
        if not pairs:
            return None
        return _dot_sums(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))

    def transplant(self, chunk: int, out: torch.Tensor) -> None:
        """Write chunk ``chunk``'s core values into its output ``out``."""
        idx = self.places[chunk]
        if idx.numel():
            out.index_copy_(0, idx, self.values[chunk])


def fuse_stream(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    core_of: CoreOf,
    *,
    omega: float,
    epsilon: float = DEFAULT_EPSILON,
    overlap: str = "max_delta",
    theta0: Optional[torch.Tensor] = None,
    with_delta: bool = False,
) -> tuple[torch.Tensor, FuseStats]:
    """:func:`cpi_fuse` with the cores found chunk by chunk, in the same pass that reads
    the tensors: ``core_of(task, start, stop, delta)`` returns the sorted indices (relative
    to ``start``) of task ``task``'s core among flat entries ``[start, stop)``, chunks in
    flat order; ``delta`` is ``|theta_task - base|`` there in float32 (a reused buffer)
    when ``with_delta``, else None.

    One pass reads every input once: it finds the cores, writes the mean of the task
    models into the output and sums the SLERP norms (float64 across chunks of ``CHUNK``
    entries); a second pass reads the base and that mean and writes the SLERP. Memory:
    the output, the cores' indices and a few chunk buffers.
    """
    if not thetas:
        raise ValueError("need one core mask per task model, and at least one task")
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega}")
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    shape, dtype, device = base.shape, base.dtype, base.device
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1).to(dtype) for t in thetas]
    numel = flat_base.numel()
    if any(f.numel() != numel for f in flats):
        raise ValueError(f"task tensors of shapes {[list(t.shape) for t in thetas]} for a base of {list(shape)}")
    flat_ref = (theta0 if theta0 is not None else base).reshape(-1)
    work = _Work(device, torch.float64 if dtype == torch.float64 else torch.float32)
    read_base = _flat_reader(flat_base, work, "x")
    slerping = 0.0 < omega < 1.0
    # the output holds the target (the tasks' mean, in the tensor's dtype) until the second pass
    out = flat_base.clone() if omega == 0.0 else torch.empty_like(flat_base)
    dots = _Dots()
    fast = _fused_path(omega, dtype, device, len(flats), flat_ref.dtype)
    cores = fused.CoreBook(len(flats), overlap) if fast else _Cores(len(flats), overlap)
    pass_one = _fused_pass_one if fast else _torch_pass_one
    pass_one(flat_base, flats, flat_ref, core_of, with_delta, omega, out, dots, cores, work)

    # ---- non-core: one SLERP over the non-core entries of the whole tensor, and the
    # core values written into each chunk once it is interpolated
    if slerping:
        ca, cb = dots.coefficients(omega, epsilon, work.dtype, device, cores.skip_sums())
    if slerping and fast:
        for n, s in enumerate(_chunks(numel)):
            e = min(s + CHUNK, numel)
            fused.interpolate(flat_base[s:e], out[s:e], ca, cb)
            cores.transplant(n, out[s:e])
    elif slerping:
        _interpolate(
            out,
            ca,
            cb,
            read_base,
            _flat_reader(out, work, "y"),
            work,
            after=lambda n, s, e: cores.transplant(n, out[s:e]),
        )
    stats = FuseStats(
        core_entries=cores.entries,
        overlap_entries=cores.overlap_entries,
        transplanted=cores.transplanted,
    )
    return out.reshape(shape), stats


def _torch_pass_one(flat_base, flats, flat_ref, core_of, with_delta: bool, omega: float, out, dots, cores, work):
    """:func:`fuse_stream`'s first pass in torch ops: per chunk, the cores
    (``core_of``), the tasks' mean into the output and the SLERP's norms; with no SLERP
    to come, the core values straight into the output."""
    numel, dtype = flat_base.numel(), flat_base.dtype
    slerping = 0.0 < omega < 1.0
    read_base = _flat_reader(flat_base, work, "x")
    read_tasks = [_flat_reader(f, work, "t") for f in flats]
    # task 0 is read straight into the sum when that makes a copy anyway
    direct = flats[0].dtype != work.dtype
    for s in _chunks(numel):
        e = min(s + CHUNK, numel)
        x = read_base(s, e) if (with_delta or slerping) else None
        acc = work("acc", e - s) if omega > 0.0 else None
        local: List[torch.Tensor] = []
        for i, read in enumerate(read_tasks):
            if acc is not None and i == 0 and direct:
                t = acc.copy_(flats[0][s:e])
            else:
                t = read(s, e) if (with_delta or omega > 0.0) else None
            delta = torch.sub(t, x, out=work("delta", e - s)).abs_() if with_delta else None
            local.append(core_of(i, s, e, delta))
            if acc is not None:
                if i == 0:
                    if not direct:
                        acc.copy_(t)
                else:
                    acc += t
        if acc is not None:
            if len(flats) > 1:
                acc /= len(flats)
            out[s:e] = acc  # rounded to the tensor's dtype
        chunk = cores.add(local, [f[s:e] for f in flats], flat_ref[s:e], work("owners", e - s, torch.uint8))
        if slerping:
            y = acc if dtype == acc.dtype else work("y", e - s).copy_(out[s:e])
            dots.add(x, y)
            cores.skip(chunk, flat_base[s:e], out[s:e])  # the target, still in the output
        else:
            cores.transplant(chunk, out[s:e])  # nothing else writes this chunk


def _fused_path(omega: float, dtype: torch.dtype, device: torch.device, tasks: int, ref: torch.dtype) -> bool:
    """Whether :func:`fuse_stream` runs its first pass, the cores' bookkeeping and the
    SLERP with the fused loops (:mod:`cpift_merge.core.fused`): a SLERP of float32 or
    bfloat16 tensors on the CPU, a theta_0 of the same dtype, at most
    ``fused.MAX_TASKS`` tasks, Numba installed. Every tensor such a merge fuses then takes
    this path, whichever way its cores are found, so the outputs do not depend on how they
    were found."""
    return (
        0.0 < omega < 1.0
        and device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and ref == dtype
        and tasks <= fused.MAX_TASKS
        and fused.available()
    )


def _cut_in_loop(core_of, with_delta: bool) -> bool:
    """Whether the fused loop can cut the cores itself: thresholds it can compare as
    floats, and no whole-tensor norms to tally."""
    return (
        with_delta
        and isinstance(core_of, ThresholdCores)
        and core_of.norms is None
        and fused.thresholds(core_of.keys) is not None
    )


def _fused_pass_one(flat_base, flats, flat_ref, core_of, with_delta: bool, omega: float, out, dots, cores, work):
    """:func:`fuse_stream`'s first pass with the fused loops: per chunk one loop writes the
    tasks' mean into the output, sums the SLERP's norms and, when it can
    (:func:`_cut_in_loop`), cuts the cores and keeps their places and values; else
    ``core_of`` finds them as on the torch path and a second loop keeps them (``cores``, a
    ``fused.CoreBook``, holds them either way)."""
    numel = flat_base.numel()
    read_base = _flat_reader(flat_base, work, "x")
    finder = fused.finder(len(flats), CHUNK)
    find = _cut_in_loop(core_of, with_delta)
    thr = fused.thresholds(core_of.keys) if find else None
    left = np.array(core_of.left, dtype=np.int64) if find else None
    for s in _chunks(numel):
        e = min(s + CHUNK, numel)
        pieces = [f[s:e] for f in flats]
        ref = flat_ref[s:e]
        dots.add_sums(fused.mean_cut(flat_base[s:e], pieces, out[s:e], finder, thr, left, ref, cores.overlap))
        if find:
            cores.add(finder)
            continue
        if with_delta:
            x = read_base(s, e)
            given = [
                core_of(task, s, e, topk.magnitude_keys(f, x, out=work("delta", e - s), check=False).view(x.dtype))
                for task, f in enumerate(pieces)
            ]
        else:
            given = [core_of(task, s, e, None) for task in range(len(flats))]
        cores.add(finder, given, pieces, ref, flat_base[s:e], out[s:e])
    if find:
        core_of.left = [int(v) for v in left]
        for task in range(len(flats)):
            core_of.tally(task, cores.sizes[task], cores.core[task])
