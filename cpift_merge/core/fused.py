"""Fused CPU loops for the ``cpi`` kernel and the global pre-pass, compiled with Numba.

Optional: used when ``numba`` is installed (``pip install 'cpift-merge[fast]'``) and
``CPIFT_FUSED`` is not ``0``. Each loop replaces several memory-bound torch ops over a
chunk with one pass; a chunk's :data:`PARTS` fixed parts run on up to torch's intra-op
thread count (the loops release the GIL):

* :func:`mean_cut` (:func:`cpift_merge.core.fusion.fuse_stream`'s first pass) reads the
  base and every task model once and writes the tasks' mean, and sums the SLERP's norms
  ``x·x``, ``y·y``, ``x·y`` in float64 (four interleaved partial sums per part, parts
  added in order: the same on every machine); for a global cut it also finds each task's
  core (``|θi − θ0|`` above the task's threshold, ties taken in flat order up to a quota)
  and keeps each core entry's place and value (the overlap rule's) with its norms, for
  :class:`CoreBook`: the torch path's ``sub``, ``abs``, compare, ``nonzero``, bfloat16
  conversions, adds, divide, three ``dot`` calls (whose float32 partial sums depend on
  the BLAS thread count) and the cores' bookkeeping (owner counts, ``masked_select``,
  ``unique``, ``isin``, ``index_select``, ``index_copy_``);
* with cores given (a region file's), a second loop per chunk does that bookkeeping
  (:meth:`CoreBook.add`);
* :func:`interpolate` (its second pass) writes ``ca·x + cb·y`` into ``y``, each product
  rounded to float32 before the sum, as the torch path does;
* :func:`delta_histogram` (the pre-pass's first pass over a piece): the |Δ| keys, the
  histogram of their high bits, their norms and the guess window's keys.

Every elementwise result is the torch path's, bit for bit (same float32 operations, no
fused multiply-add, bfloat16 rounded to nearest even); the sums differ in their last
bits, so a non-core entry of a merge can differ in its last bits. The loops are compiled
on first use and cached on disk by Numba.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from cpift_merge.core import topk

_LOOPS = None  # cpift_merge.core.fused_loops, or False when Numba is missing


def available() -> bool:
    """Whether the fused loops can be used: Numba importable, ``CPIFT_FUSED`` not ``0``."""
    global _LOOPS
    if os.environ.get("CPIFT_FUSED", "1").strip() == "0":
        return False
    if _LOOPS is None:
        try:
            from cpift_merge.core import fused_loops

            _LOOPS = fused_loops
        except ImportError:
            _LOOPS = False
    return _LOOPS is not False


def warm_up(
    tasks: int, dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16), cut: bool = True
) -> Optional[threading.Thread]:
    """Import Numba and load (or compile) the loops a merge of ``tasks`` task models of
    these dtypes runs (``cut``: cores cut in the loop, as a global pre-pass's; else given,
    as a region file's) in a background thread, so a merge that starts importing mergekit
    meanwhile finds them ready (about half a second with Numba's disk cache warm). Does
    nothing without Numba. Start it only once the process will not fork again. Returns
    the thread (None for no tasks)."""

    def run() -> None:
        try:
            if not available():
                return
            every = [torch.arange(8)] * tasks
            for dtype in dtypes:
                x = torch.zeros(8, dtype=dtype)
                out = torch.empty_like(x)
                finder, book = Finder(tasks, 8), CoreBook(tasks, "max_delta")
                if cut:  # a threshold below every |Δ|: every entry is in every core
                    mean_cut(x, [x] * tasks, out, finder, np.full(tasks, -1.0, dtype=np.float32))
                    book.add(finder)
                else:
                    mean_cut(x, [x] * tasks, out, finder)
                    book.add(finder, every, [x] * tasks, x, x, out)
                interpolate(x, out, 0.5, 0.5)
                book.transplant(0, out)
        except Exception as err:  # noqa: BLE001 -- best effort: the merge loads them itself
            thread.error = err

    if tasks < 1:
        return None
    thread = threading.Thread(target=run, name="cpift-fused-warm-up", daemon=True)
    thread.error = None  # what went wrong, if anything (the merge then meets it itself)
    thread.start()
    return thread


def thresholds(keys: Sequence[int]) -> Optional[np.ndarray]:
    """The float32 thresholds whose bit patterns are ``keys`` (|Δ| keys, as ``topk`` makes
    them), or None when one is not a finite non-negative float (then the torch path
    compares the keys as integers)."""
    if any(not 0 <= int(k) < 0x7F800000 for k in keys):
        return None
    return np.array([int(k) for k in keys], dtype=np.int32).view(np.float32)


PARTS = 4  # each chunk is split into this many parts, whatever the machine: the norms'
# partial sums are added part by part, so the result does not depend on the thread count


def _bounds(n: int) -> List[Tuple[int, int]]:
    """The fixed split of ``n`` entries into at most :data:`PARTS` runs."""
    step = max(-(-n // PARTS), 1)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


PARALLEL_MIN = 1 << 12
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _map(fn, items, entries: int) -> None:
    """``fn`` over ``items`` (not None) on up to torch's intra-op thread count, this thread
    among them (the loops release the GIL); all in this thread when that count is one or the
    chunk has fewer than :data:`PARALLEL_MIN` ``entries`` (a hand-off costs more)."""
    global _POOL
    threads = min(len(items), torch.get_num_threads()) if entries >= PARALLEL_MIN else 1
    if threads <= 1:
        for item in items:
            fn(item)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads - 1:
            _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="cpift-fused")
        pool = _POOL
    queue = iter(items)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            fn(item)

    futures = [pool.submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        for f in futures:
            f.result()


class Finder:
    """Reused outputs of :func:`mean_cut` for ``tasks`` task models and chunks of up to
    ``chunk`` entries, per part of the last chunk (``parts`` parts starting at ``starts``):
    the norms' sums, and the cores found there: their places and values (in the part's
    span of ``places``/``values``), counts and sums (read by :meth:`CoreBook.add`)."""

    def __init__(self, tasks: int, chunk: int):
        self.chunk = chunk
        self.places = np.empty(chunk, dtype=np.int64)
        self._values: dict = {}
        self.count = np.zeros((PARTS, 2), dtype=np.int64)  # entries, entries in several cores
        self.tally = np.zeros((PARTS, tasks), dtype=np.int64)
        self.cnt = np.zeros((PARTS, tasks), dtype=np.int64)
        self.core = np.zeros((PARTS, tasks, 2), dtype=np.float64)
        self.sums = np.zeros((PARTS, 6), dtype=np.float64)
        self.starts = np.zeros(1, dtype=np.int64)
        self.parts = 0
        self.last = self.places  # the values' buffer of the last chunk

    def values(self, dtype: np.dtype) -> np.ndarray:
        """The core values' buffer for raw ``dtype`` (float32, or uint16 for bfloat16)."""
        buf = self._values.get(dtype)
        if buf is None:
            buf = self._values[dtype] = np.empty(self.chunk, dtype=dtype)
        return buf


_FINDERS = threading.local()


def finder(tasks: int, chunk: int) -> Finder:
    """A :class:`Finder` for ``tasks`` task models and chunks of up to ``chunk`` entries,
    reused by the calling thread (fresh buffers of this size cost page faults per tensor)."""
    f = getattr(_FINDERS, "finder", None)
    if f is None or f.tally.shape[1] != tasks or f.chunk < chunk:
        f = _FINDERS.finder = Finder(tasks, chunk)
    return f


def _raw(t: torch.Tensor) -> np.ndarray:
    """A float32 or bfloat16 tensor's memory as a NumPy array (bfloat16 as uint16 bits)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def mean_cut(
    x: torch.Tensor,
    ts: Sequence[torch.Tensor],
    out: torch.Tensor,
    finder: Finder,
    thr: Optional[np.ndarray] = None,
    left: Optional[np.ndarray] = None,
    ref: Optional[torch.Tensor] = None,
    overlap: str = "max_delta",
) -> Tuple[float, float, float]:
    """Write the mean of ``ts`` into ``out`` (chunks of one length and dtype, float32 or
    bfloat16) and sum the SLERP's norms of ``x`` and that stored mean. With ``thr``: per
    task, its core (``|Δ|`` above the task's threshold; ``left``, int64 per task, is the
    number of entries equal to it still to take, and is decreased), and each core entry's
    place and value (``overlap`` rule, ``ref``: theta_0's chunk, default ``x``) into
    ``finder`` (until its next use: read them with :meth:`CoreBook.add`). Returns
    ``(x·x, y·y, x·y)``. The parts of the chunk run in parallel, unless ties are to be
    taken (they go in flat order)."""
    find = thr is not None
    rx, rts, rout = _raw(x), [_raw(t) for t in ts], _raw(out)
    rref = _raw(ref) if ref is not None else rx
    left = left if left is not None else np.zeros(len(ts), dtype=np.int64)
    mean = overlap == "mean"
    values = finder.values(rout.dtype)
    bounds = _bounds(x.numel())
    finder.starts = np.array([b[0] for b in bounds], dtype=np.int64)
    finder.parts, finder.last = len(bounds), values
    finder.count[:] = 0

    def run(part: int) -> None:
        s, e = bounds[part]
        if not find:
            _LOOPS.mean(rx[s:e], tuple(t[s:e] for t in rts), rout[s:e], finder.sums[part])
            return
        _LOOPS.mean_cut(
            rx[s:e],
            tuple(t[s:e] for t in rts),
            thr,
            left,
            rout[s:e],
            s,
            finder.sums[part],
            rref[s:e],
            mean,
            finder.places[s:e],
            values[s:e],
            finder.count[part],
            finder.tally[part],
            finder.cnt[part],
            finder.core[part],
        )

    parts = list(range(len(bounds)))
    if find and left.any():
        for part in parts:
            run(part)
    else:
        _map(run, parts, x.numel())
    sums = [0.0, 0.0, 0.0]
    for part in parts:
        sums = [a + float(b) for a, b in zip(sums, finder.sums[part, :3])]
    return sums[0], sums[1], sums[2]


MAX_TASKS = 64  # a core entry's owners are one bit each of a 64-bit word


class CoreBook:
    """The cores of one tensor on the fused path, chunk by chunk, as
    ``cpift_merge.core.fusion``'s torch bookkeeping keeps them (the same places and
    values): each core entry's place and the value it takes, the entries per task
    (``transplanted``), the float64 ``(x·x, y·y, x·y)`` over the core entries
    (:meth:`skip_sums`, left out of the SLERP's angle) and, for cores cut in the loop, each
    task's core size and float64 ``(Σ|Δ|, Σ|Δ|²)`` there (``sizes``, ``core``). Sums are
    added part by part in flat order, so they do not depend on the thread count, nor on
    whether the cores were cut in the loop or given."""

    def __init__(self, tasks: int, overlap: str):
        if tasks > MAX_TASKS:
            raise ValueError(f"the fused loops take at most {MAX_TASKS} task models, got {tasks}")
        self.tasks, self.overlap = tasks, overlap
        self.places: List[np.ndarray] = []
        self.values: List[np.ndarray] = []
        self.transplanted = [0] * tasks
        self.sizes = [0] * tasks
        self.core = [[0.0, 0.0] for _ in range(tasks)]
        self.sums = [0.0, 0.0, 0.0]
        self.entries = self.overlap_entries = 0

    def add(
        self,
        finder: Finder,
        given: Optional[Sequence[torch.Tensor]] = None,
        ts: Sequence[torch.Tensor] = (),
        ref: Optional[torch.Tensor] = None,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
    ) -> int:
        """Take one chunk's cores: those :func:`mean_cut` just cut into ``finder``, or
        ``given`` (per task, sorted chunk-relative int64 indices) with the chunk's task
        values ``ts``, theta_0's ``ref`` (for ``max_delta``), the base's ``x`` and the
        target's ``y`` (after :func:`mean_cut` wrote it). Returns the chunk's number."""
        if given is not None:
            values = finder.values(_raw(y).dtype)
            _LOOPS.gather(
                tuple(g.numpy() for g in given),
                tuple(_raw(t) for t in ts),
                _raw(ref),
                _raw(x),
                _raw(y),
                self.overlap == "mean",
                finder.starts,
                finder.places,
                values,
                finder.count,
                finder.tally,
                finder.sums,
            )
        else:
            values = finder.last
        parts = range(finder.parts)
        spans = [(int(finder.starts[p]), int(finder.starts[p] + finder.count[p, 0])) for p in parts]
        self.places.append(np.concatenate([finder.places[s:e] for s, e in spans]))
        self.values.append(np.concatenate([values[s:e] for s, e in spans]))
        for p in parts:
            self.entries += int(finder.count[p, 0])
            self.overlap_entries += int(finder.count[p, 1])
            self.sums = [a + float(b) for a, b in zip(self.sums, finder.sums[p, 3:])]
            for i in range(self.tasks):
                self.transplanted[i] += int(finder.tally[p, i])
                if given is None:
                    self.sizes[i] += int(finder.cnt[p, i])
                    self.core[i] = [a + float(b) for a, b in zip(self.core[i], finder.core[p, i])]
        return len(self.places) - 1

    def skip_sums(self) -> Optional[Tuple[float, float, float]]:
        """The float64 ``(x·x, y·y, x·y)`` over every core entry, or None for none."""
        return (self.sums[0], self.sums[1], self.sums[2]) if self.entries else None

    def transplant(self, chunk: int, out: torch.Tensor) -> None:
        """Write chunk ``chunk``'s core values into its output ``out``."""
        if self.places[chunk].size:
            _LOOPS.scatter(_raw(out), self.places[chunk], self.values[chunk])


_HIST = threading.local()


def delta_histogram(
    theta0: torch.Tensor, theta: torch.Tensor, window: Optional[Tuple[int, int]]
) -> Tuple[torch.Tensor, Tuple[float, float], Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """One pass over a piece of a task's |Δ| keys (``topk.magnitude_keys``, computed here
    and not kept): the histogram of their high 16 bits (int64, ``topk.HIGH_BUCKETS``), the
    float64 ``(Σ|Δ|, Σ|Δ|²)`` (four interleaved partial sums), and with ``window`` (inclusive
    high-bit buckets) the distinct keys there with their counts, as ``topk.window_counts``.
    Float32 and bfloat16 pieces are read as they are; other dtypes (and pieces on another
    device) are converted to float32 on the CPU first."""
    x, t = (v.detach().reshape(-1).cpu() for v in (theta0, theta))
    x, t = (v if v.dtype in (torch.float32, torch.bfloat16) else v.to(torch.float32) for v in (x, t))
    n = x.numel()
    buf = getattr(_HIST, "buf", None)
    if buf is None or buf[1].shape[0] < n:
        buf = _HIST.buf = (np.zeros(topk.HIGH_BUCKETS, dtype=np.int64), np.empty(max(n, 1), dtype=np.int64))
    hist, win = buf
    hist[:] = 0
    sums = np.zeros(2, dtype=np.float64)
    lo, hi = (window[0] << 16, (window[1] + 1) << 16) if window is not None else (0, 0)
    kept = _LOOPS.histogram(_raw(x), _raw(t), hist, lo, hi, win, sums)
    found = None
    if window is not None:
        values, counts = torch.unique(torch.from_numpy(win[:kept]), return_counts=True)
        found = (values, counts)
    return torch.from_numpy(hist.copy()), (float(sums[0]), float(sums[1])), found


def interpolate(x: torch.Tensor, y: torch.Tensor, ca: float, cb: float) -> None:
    """``y = ca·x + cb·y`` (float32 or bfloat16 chunks; ``ca``, ``cb`` rounded to float32)."""
    rx, ry = _raw(x), _raw(y)
    ca, cb = np.float32(ca), np.float32(cb)
    bounds = _bounds(x.numel())

    def run(part: int) -> None:
        s, e = bounds[part]
        _LOOPS.interpolate(rx[s:e], ry[s:e], ca, cb)

    _map(run, list(range(len(bounds))), x.numel())
