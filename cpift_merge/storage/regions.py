"""Core regions: compute them from checkpoints, store them, load them back.

A region directory holds::

    regions.json              metadata: density, scope, D, k, thresholds, fingerprints,
                              Jaccard matrix, groups, stage order, per-tensor counts
    masks/<task>.safetensors  one entry per tensor: packed bits (uint8) or sorted flat
                              indices (int32/int64), whichever is smaller

The computation streams tensor by tensor (three passes for ``scope: global``: two
histogram passes find the exact threshold, the third cuts and writes the masks), so
memory is O(largest tensor), not O(model). Mask files are written by a streaming
safetensors writer for the same reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from cpift_merge.core import fused, groups, localization, masks, topk
from cpift_merge.errors import CpiftError
from cpift_merge.storage.checkpoint import (
    Checkpoint,
    SafetensorsWriter,
    Scratch,
    TensorInfo,
    fingerprint_from_samples,
    participating_tensors,
    sample_positions,
)
from cpift_merge.storage.files import atomic_dir, ensure_apart, ensure_free

FORMAT = "cpift-regions"
VERSION = 2  # 2: mask_sha256 covers the whole mask file (1: the data after its header)
META_NAME = "regions.json"
MASK_DIR = "masks"
SCOPES = ("global", "tensor")
ORDERS = ("random", "given")


class TensorSource(Protocol):
    """What the region computation reads: a :class:`Checkpoint` or an adapter."""

    label: str
    path: str
    infos: Dict[str, TensorInfo]

    def get(self, name: str) -> torch.Tensor: ...


# ----------------------------------------------------------------- file writing


# ------------------------------------------------------------------ computation


def _finite_keys(
    theta: torch.Tensor,
    theta0: torch.Tensor,
    tensor: str,
    task: TensorSource,
    base: TensorSource,
    out: Optional[torch.Tensor] = None,
    check: bool = True,
) -> torch.Tensor:
    try:
        return topk.magnitude_keys(theta, theta0, out=out, check=check)
    except ValueError:
        culprit = base if not topk.all_finite(theta0) else task
        raise CpiftError(
            f"model {culprit.label} has NaN or Inf in tensor {tensor}; fix or re-export that checkpoint"
        ) from None


def _nonfinite(base: TensorSource, task: TensorSource, tensor: str, start: int, stop: int) -> None:
    """Raise the error for an Inf or NaN in ``|Δ|`` of entries ``[start, stop)``, naming the
    model that holds it."""
    theta0 = _read(base, tensor, Scratch(), "__base__", start, stop)
    culprit = base if not topk.all_finite(theta0.to(torch.float32)) else task
    raise CpiftError(f"model {culprit.label} has NaN or Inf in tensor {tensor}; fix or re-export that checkpoint")


@dataclass
class Scorer:
    """The core score (``topk.SCORES``) and, for ``fisher``, each task's Fisher file
    (safetensors with the model's tensor names, as ``cpift probe --score fisher`` writes)."""

    score: str = "delta"
    fisher: Optional[Mapping[str, TensorSource]] = None

    def keys(
        self,
        task: str,
        tensor: str,
        delta: torch.Tensor,
        theta0: torch.Tensor,
        scratch: Scratch,
        start: int = 0,
        stop: Optional[int] = None,
    ):
        """Keys of entries ``[start, stop)`` of ``tensor`` (``delta``/``theta0`` hold just those)."""
        if self.score == "delta":
            return delta.view(torch.int32)
        extra = None
        if self.score == "fisher":
            src = (self.fisher or {}).get(task)
            if src is None or tensor not in src.infos:
                where = src.label if src is not None else f"task {task}"
                raise CpiftError(f"score fisher: {where} has no Fisher values for tensor {tensor}")
            if src.infos[tensor].numel != delta.numel() and stop is None:
                stop = start + delta.numel()
            extra = _read(src, tensor, scratch, f"{task}/fisher", start, stop)
        try:
            return topk.score_keys(
                delta, self.score, theta0=theta0, fisher=extra, out=scratch.floats(f"{task}/score", delta.numel())
            )
        except ValueError as err:
            raise CpiftError(f"score {self.score} of task {task}, tensor {tensor}: {err}") from None


RUN_RECORDS = ("probe.json", "run.json", "stage.json")  # what our trainer writes beside a model


def trained_with(path: str) -> Optional[Dict[str, object]]:
    """How a task model was trained, from the run record our trainer leaves beside it:
    optimizer, learning rate, momentum and steps; None for a model trained elsewhere."""
    for name in RUN_RECORDS:
        try:
            with open(os.path.join(path, name), encoding="utf-8") as fh:
                cfg = json.load(fh).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(cfg, dict):
            return {
                "optimizer": cfg.get("optimizer", "adamw"),  # records from before the option: AdamW
                "lr": cfg.get("lr"),
                "momentum": cfg.get("momentum", 0.0),
                "steps": cfg.get("steps"),
                "epochs": cfg.get("epochs"),
            }
    return None


def _check_args(density: float, scope: str, tau: float, order: str) -> None:
    if not (0.0 <= density <= 1.0):
        raise CpiftError(f"density must be in [0, 1] (0 means no cores), got {density}")
    if scope not in SCOPES:
        raise CpiftError(f"scope must be 'global' or 'tensor', got {scope!r}")
    if not (0.0 <= tau <= 1.0):
        raise CpiftError(f"tau must be in [0, 1], got {tau}")
    if order not in ORDERS:
        raise CpiftError(f"order must be 'random' or 'given', got {order!r}")


def check_task_names(names: Sequence[str]) -> None:
    seen = set()
    for name in names:
        if not name or not all(c.isalnum() or c in "_.-" for c in name) or name[0] == ".":
            raise CpiftError(f"task name {name!r} must use letters, digits, '_', '.', '-' only")
        if name in seen:
            raise CpiftError(f"duplicate task name {name!r}; give each task its own name")
        seen.add(name)


# Entries per piece when a global-scope pass reads a tensor in pieces: memory then grows with
# the piece, not with the largest tensor. A multiple of 8 (packed mask bytes concatenate).
PIECE = 1 << 20


_HEAP_BOUNDED = False


def bound_heap() -> None:
    """Keep freed tensor buffers from piling up in the process (Linux, glibc): its malloc
    raises its mmap threshold to the largest block freed so far (up to 32 MiB), after
    which buffers of a streaming pass are carved from the heap and fragment it; measured
    on 7B-shaped tensors, a global-scope pass then grew to 1.05 GB instead of 0.42 GB.
    Fixing the threshold at 128 KiB returns every larger buffer to the OS when it is freed:
    with 1M-entry pieces a pass makes a few 128 KiB-1 MiB temporaries per piece (the 256 KiB
    high-bit histogram, the keys near the threshold), and at a 1 MiB threshold those, carved
    from the heap between the small blocks a pass keeps, grew `cpift regions` from 0.69 to
    0.78 GB between 4 and 8 layers of 7B shapes (0.631 / 0.636 GB at 128 KiB, same time).
    Process-wide and harmless elsewhere; a no-op where there is no glibc."""
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED:
        return
    _HEAP_BOUNDED = True
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: 128 KiB
    except (OSError, AttributeError):
        pass


def _pieces(numel: int, piece: Optional[int]) -> Iterator[Tuple[int, int]]:
    if not piece or numel <= piece:
        yield 0, numel
        return
    for start in range(0, numel, piece):
        yield start, min(start + piece, numel)


def _values_at(t: torch.Tensor, positions: Sequence[int]) -> List[float]:
    if not positions:
        return []
    return [float(v) for v in t.reshape(-1)[torch.tensor(positions)].to(torch.float64)]


def _stream(
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    tensors: Sequence[TensorInfo],
    desc: str,
    progress: bool,
    samples: Dict[str, Dict[str, List[float]]],
    wanted=None,
    scorer: Optional[Scorer] = None,
    deltas: Optional[Dict[str, torch.Tensor]] = None,
    piece: Optional[int] = None,
    check: bool = True,
    bar=None,
    raw: bool = False,
):
    """Yield (info, start, stop, {task: keys}) for entries ``[start, stop)`` of each tensor:
    the whole tensor, or with ``piece`` its consecutive pieces of that many entries (in flat
    order), recording value samples.

    ``wanted(tensor) -> task names`` limits what is read; a tensor no task wants is
    not read at all. The keys (of ``scorer``'s score, |Δ| by default, flat) live in buffers
    reused for the next piece: use them (or change them) before asking for the next one.
    ``deltas``, when given, receives each task's |Δ| (flat float32) for the piece. ``check``
    False skips the finiteness check of |Δ| (for a caller that checks the keys itself).
    ``bar``: a shared progress bar to advance per tensor instead of one of its own. ``raw``:
    yield the values read instead of keys, the base's under ``"__base__"`` (for a caller
    that computes the keys itself)."""
    names = list(tasks)
    scorer = scorer or Scorer()
    scratch = Scratch()
    bound_heap()
    own = bar is None
    for info in tqdm(tensors, desc=desc, disable=not progress, unit="tensor", leave=False) if own else tensors:
        if not own:
            bar.update(1)
        want = names if wanted is None else wanted(info.name)
        if not want:
            continue
        positions = sample_positions(info.numel)
        got: Dict[str, List[float]] = {n: [] for n in ["__base__", *want]}
        for start, stop in _pieces(info.numel, piece):
            here = [p - start for p in positions if start <= p < stop]
            theta0 = _read(base, info.name, scratch, "__base__", start, stop)
            got["__base__"] += _values_at(theta0, here)
            keys = {"__base__": theta0} if raw else {}
            if not raw and theta0.dtype != torch.float32:  # converted once for every task, into a reused buffer
                theta0 = scratch.floats("__base__/f32", stop - start).copy_(theta0.reshape(-1))
            for n in want:
                theta = _read(tasks[n], info.name, scratch, n, start, stop)
                got[n] += _values_at(theta, here)
                if raw:
                    keys[n] = theta
                    continue
                # the task's read buffer becomes its keys (a float32 read is overwritten)
                out = (
                    theta.reshape(-1)
                    if isinstance(tasks[n], Checkpoint) and theta.dtype == torch.float32
                    else scratch.floats(f"{n}/keys", stop - start)
                )
                delta = _finite_keys(theta, theta0, info.name, tasks[n], base, out=out, check=check)
                delta = delta.view(torch.float32)
                keys[n] = scorer.keys(n, info.name, delta, theta0, scratch, start, stop)
                if deltas is not None:
                    deltas[n] = delta
                del theta
            del theta0
            if stop == info.numel:
                for n, values in got.items():
                    samples[n][info.name] = values
            yield info, start, stop, keys


def _read(
    source: TensorSource, name: str, scratch: Scratch, slot: str, start: int = 0, stop: Optional[int] = None
) -> torch.Tensor:
    """Tensor ``name`` (shaped), or its flat entries ``[start, stop)`` when that is not all of it."""
    numel = source.infos[name].numel
    stop = numel if stop is None else stop
    whole = start == 0 and stop == numel
    if isinstance(source, Checkpoint):
        if whole:
            return source.get(name, out=scratch.take(slot, source.nbytes(name)))
        size = source.nbytes(name) // numel
        return source.get_range(name, start, stop, out=scratch.take(slot, (stop - start) * size))
    t = source.get(name)
    return t if whole else t.reshape(-1)[start:stop]


def _split(tensors: Sequence[TensorInfo], parts: int) -> List[List[TensorInfo]]:
    """Consecutive runs of ``tensors`` with about equal numbers of entries (at most ``parts``)."""
    total = sum(t.numel for t in tensors)
    out: List[List[TensorInfo]] = [[]]
    seen = 0
    for t in tensors:
        if out[-1] and len(out) < parts and seen >= total * len(out) / parts:
            out.append([])
        out[-1].append(t)
        seen += t.numel
    return out


def _workers() -> int:
    """Threads for a global-scope pass: one per available core, at most 4 (each reads and
    counts its own run of tensors; torch's ops release the GIL)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _in_threads(fn, parts: Sequence) -> List:
    """``[fn(p) for p in parts]``, the parts in threads of their own, one torch thread each."""
    if len(parts) <= 1:
        return [fn(p) for p in parts]
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(parts)) as pool:
            return list(pool.map(fn, parts))
    finally:
        torch.set_num_threads(before)


SAMPLE_FRACTION = 1 / 64  # of each tensor, read to guess where the threshold lies
SAMPLE_RUN = 4096  # entries per sampled run (two pages of bf16)
WINDOW_PAIRS = 1 << 22  # distinct keys a task may keep around its guess (~48 MB) before it needs pass 2
# Keep keys in the first pass only for a task whose sampled keys reach its window in at least this
# share of the entries: below it, a second pass over those tensors costs less than keeping keys
# (SmolLM2-135M, fp32 variants, 31% reached: 1.46 s with keeping, 1.26 s with two passes; 1 layer of
# Llama-7B shapes in bf16, every tensor reached: 6.7 s with keeping, 9.1-9.5 s with two passes)
SPECULATE_SHARE = 0.5
# Guess only for models of at least this many entries: the sample costs ~0.15 s at SmolLM2-135M
# size, where two passes take ~1.25 s in all and run hidden behind a merge's imports
GUESS_MIN_ENTRIES = 1 << 28


def _sample_runs(numel: int) -> List[Tuple[int, int]]:
    """Evenly spaced runs of entries covering about ``SAMPLE_FRACTION`` of a tensor."""
    want = max(1, round(numel * SAMPLE_FRACTION))
    runs = max(1, math.ceil(want / SAMPLE_RUN))
    length = max(1, want // runs)
    starts = ((2 * i + 1) * numel // (2 * runs) - length // 2 for i in range(runs))
    return [(s, s + length) for s in (min(max(0, s), numel - length) for s in starts)]


def _sampled(source: TensorSource, tensor: str, runs: Sequence[Tuple[int, int]], scratch: Scratch) -> torch.Tensor:
    """The flat entries of ``tensor`` in ``runs``, one after the other. Each run is copied out
    of the read buffer before the next read reuses it."""
    return torch.cat([_read(source, tensor, scratch, "__sample__", a, b).reshape(-1).clone() for a, b in runs])


def _guess_windows(base, tasks, tensors, k: int) -> Tuple[Dict[str, Tuple[int, int]], Dict[str, set]]:
    """Per task, the high-16-bit buckets likely to hold its threshold (the |Δ| keys of a
    uniform sample of every tensor, :func:`_sample_runs`, through :func:`topk.guess_window`),
    and the tensors whose sampled keys reach those buckets; only for the tasks whose keys
    reach them in at least ``SPECULATE_SHARE`` of the entries."""
    scratch = Scratch()
    hists = {n: torch.zeros(topk.HIGH_BUCKETS, dtype=torch.int64) for n in tasks}
    tops: Dict[str, Dict[str, int]] = {n: {} for n in tasks}
    seen = total = 0
    for info in tensors:
        total += info.numel
        runs = _sample_runs(info.numel)
        theta0 = _sampled(base, info.name, runs, scratch).to(torch.float32)
        for n, src in tasks.items():
            theta = _sampled(src, info.name, runs, scratch)
            high = topk.magnitude_keys(theta, theta0, check=False) >> 16
            hists[n] += torch.bincount(high, minlength=topk.HIGH_BUCKETS)
            tops[n][info.name] = int(high.max())
        seen += theta0.numel()
    windows = {n: topk.guess_window(h, k * seen / total) for n, h in hists.items()}
    reach = {n: {t for t, top in tops[n].items() if top >= windows[n][0]} for n in tasks}
    sizes = {t.name: t.numel for t in tensors}
    wide = [n for n in tasks if sum(sizes[t] for t in reach[n]) >= SPECULATE_SHARE * total]
    return {n: windows[n] for n in wide}, {n: reach[n] for n in wide}


def _histogram_cut(base, tasks, tensors, k, progress, samples, scorer=None, guess=True, totals=None):
    """Exact cut: a high-bit histogram, then the low bits in the threshold's bucket. Returns
    thresholds and, per task, the count of keys equal to the threshold in each tensor
    (stream order). ``totals`` (a dict, filled when given): per task and tensor, the
    ``(‖Δ‖₁, ‖Δ‖₂²)`` of its |Δ| keys, summed in the first pass. Each pass runs in threads
    (:func:`_workers`), each over its own run of tensors; the counts add up.

    With |Δ| keys (and ``guess``) the threshold's bucket is first guessed from a 1/64
    sample, and the first pass also keeps the distinct keys around the guess, with their
    counts, of the tensors whose sample reached it. When the guess holds, the low bits of
    those tensors come from what was kept, and a second pass reads only the tensors that
    reach the bucket beyond them (none, usually). When it misses, or a task's window holds
    too many distinct keys, the second pass reads every tensor that reaches the bucket."""
    names = list(tasks)
    parts = _split(tensors, _workers())
    # with |Δ| keys the stream skips its finiteness check (a pass over each piece): the
    # histogram shows an Inf or NaN for free
    delta_keys = scorer is None or scorer.score == "delta"
    total = sum(t.numel for t in tensors)
    guess = guess and delta_keys and 0 < k < total and total >= GUESS_MIN_ENTRIES
    windows, reach = _guess_windows(base, tasks, tensors, k) if guess else ({}, {})
    cap = WINDOW_PAIRS // len(parts)
    # |Δ| keys on the CPU: with the fused loops, each piece's keys, histogram, norms and
    # window are one pass (cpift_merge.core.fused.delta_histogram)
    in_loop = delta_keys and fused.available()

    def high(part: List[TensorInfo], bar) -> tuple:
        finders = {n: topk.ThresholdFinder(k) for n in names}
        spans: Dict[str, Dict[str, tuple[int, int]]] = {n: {} for n in names}
        kept: Dict[str, Dict[str, List[torch.Tensor]]] = {n: {} for n in names}
        pairs = dict.fromkeys(names, 0)
        dropped: set = set()
        flags: Optional[torch.Tensor] = None
        stream = _stream(
            base,
            tasks,
            part,
            "",
            False,
            samples,
            scorer=scorer,
            piece=PIECE,
            check=not delta_keys,
            bar=bar,
            raw=in_loop,
        )
        norms: Dict[str, Dict[str, List[float]]] = {n: {} for n in names}
        for info, start, stop, keys in stream:
            theta0 = keys.pop("__base__") if in_loop else None
            for n, kk in keys.items():
                window = windows[n] if n in windows and n not in dropped and info.name in reach[n] else None
                if in_loop:  # keys, histogram, norms and window in one fused loop
                    hist, (l1, l2), found = fused.delta_histogram(theta0, kk, window)
                    finders[n].add_histogram(hist, kk.numel())
                else:
                    if totals is not None:
                        l1, l2 = localization.norm_sums(kk.view(torch.float32))
                    if window is not None:
                        if flags is None or flags.numel() < kk.numel():
                            flags = torch.empty(kk.numel(), dtype=torch.bool)
                        found = topk.window_counts(kk, window, flags)
                    hist = finders[n].add_high(kk, in_place=True)  # the keys are spent here
                if totals is not None:
                    norm = norms[n].setdefault(info.name, [0.0, 0.0])
                    norm[0] += l1
                    norm[1] += l2
                if window is not None:
                    values, counts = found
                    if values.numel():
                        kept[n].setdefault(info.name, []).append(torch.stack([values, counts]))
                        pairs[n] += values.numel()
                        if pairs[n] > cap:  # too many distinct keys around the guess: pass 2 for this task
                            dropped.add(n)
                            kept[n] = {}
                used = hist.nonzero()
                if not used.numel():  # an empty tensor
                    continue
                lo, hi = int(used[0]), int(used[-1])
                if hi >= topk.NONFINITE_BUCKET and delta_keys:
                    _nonfinite(base, tasks[n], info.name, start, stop)
                seen = spans[n].get(info.name)
                spans[n][info.name] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))
        return finders, spans, kept, dropped, norms

    with tqdm(total=len(tensors), desc="regions: histogram", disable=not progress, unit="tensor", leave=False) as bar:
        results = _in_threads(lambda part: high(part, bar), parts)
    finders, spans, kept, dropped, norms = results[0]
    for more, more_spans, more_kept, more_dropped, more_norms in results[1:]:
        dropped |= more_dropped
        for n in names:
            finders[n].absorb(more[n])
            spans[n].update(more_spans[n])
            kept[n].update(more_kept[n])
            norms[n].update(more_norms[n])
    if totals is not None:
        for n in names:
            totals.setdefault(n, {}).update(norms[n])
    for f in finders.values():
        f.end_high()
    lows: Dict[str, Dict[str, List[torch.Tensor]]] = {n: {} for n in names}
    covered: Dict[str, set] = {n: set() for n in names}  # tensors whose low bits the first pass kept

    def reaches(n: str, tensor: str) -> bool:
        span = spans[n].get(tensor)
        return span is not None and span[0] <= finders[n].bucket <= span[1]

    for n in windows:  # the guess held: the low bits from the keys kept in the first pass
        f = finders[n]
        if f.needs_low and n not in dropped and windows[n][0] <= f.bucket <= windows[n][1]:
            for tensor, found in kept[n].items():
                both = torch.cat(found, dim=1)
                low, counts = f.add_low_counts(both[0], both[1])
                if low.numel():
                    lows[n][tensor] = [torch.stack([low, counts])]
            covered[n] = reach[n]
            if not any(reaches(n, t.name) and t.name not in covered[n] for t in tensors):
                f.end_low()
        kept[n] = {}

    def in_bucket(tensor: str) -> List[str]:
        return [n for n in names if finders[n].needs_low and tensor not in covered[n] and reaches(n, tensor)]

    def low(part: List[TensorInfo], bar) -> tuple:
        twins = {n: finders[n].twin() for n in names}
        lows: Dict[str, Dict[str, List[torch.Tensor]]] = {n: {} for n in names}
        for info, _start, _stop, keys in _stream(
            base, tasks, part, "", False, samples, in_bucket, scorer, piece=PIECE, check=not delta_keys, bar=bar
        ):  # the first pass checked |Δ| for Inf and NaN
            for n, kk in keys.items():
                low = twins[n].add_low(kk)
                if low.numel():
                    values, counts = torch.unique(low, return_counts=True)
                    lows[n].setdefault(info.name, []).append(torch.stack([values.to(torch.int64), counts]))
        return twins, lows

    if any(f.needs_low for f in finders.values()):
        bar = tqdm(total=len(tensors), desc="regions: threshold", disable=not progress, unit="tensor", leave=False)
        with bar:
            for twins, part_lows in _in_threads(lambda part: low(part, bar), parts):
                for n in names:
                    finders[n].absorb(twins[n])
                    lows[n].update(part_lows[n])
    thresholds = {n: finders[n].end_low() for n in names}
    tied: Dict[str, List[int]] = {}
    for n in names:
        low_key = thresholds[n].key & 0xFFFF
        row = []
        for info in tensors:
            parts = lows[n].get(info.name)
            vc = torch.cat(parts, dim=1) if parts else None
            sel = vc[1][vc[0] == low_key] if vc is not None else None
            row.append(int(sel.sum()) if sel is not None and sel.numel() else 0)
        tied[n] = row
    return thresholds, tied


@dataclass
class GlobalCut:
    """Exact global-scope cores without storing masks: per task the threshold key,
    and per tensor how many entries equal to it are taken (ties, in stream order).
    ``mask(task, tensor, keys)`` rebuilds a tensor's core from its keys."""

    tensors: List[str]
    dtypes: Dict[str, str]
    thresholds: Dict[str, topk.Threshold]
    quotas: Dict[str, Dict[str, int]]
    samples: Dict[str, Dict[str, List[float]]]
    # per task and tensor: (‖Δ‖₁, ‖Δ‖₂²) of its |Δ|, when the cut was found with ``totals``
    totals: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)

    def mask(self, task: str, tensor: str, keys: torch.Tensor) -> torch.Tensor:
        return topk.cut_mask(keys, self.thresholds[task].key, self.quotas[task].get(tensor, 0))

    def mask_piece(
        self, task: str, tensor: str, keys: torch.Tensor, taken: int, out: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, int]:
        """:meth:`mask` of a piece of the tensor's keys (pieces in flat order) when ``taken``
        of its tied entries went to the pieces before: the mask (into ``out`` when given)
        and the ties it takes."""
        key = self.thresholds[task].key
        left = max(self.quotas[task].get(tensor, 0) - taken, 0)
        m = topk.cut_mask(keys, key, left, out=out)
        return m, (min(left, int(torch.count_nonzero(keys == key))) if left else 0)

    @classmethod
    def find(
        cls,
        base: TensorSource,
        tasks: Mapping[str, TensorSource],
        tensors: Sequence[TensorInfo],
        density: float,
        progress: bool = True,
        scorer: Optional[Scorer] = None,
        totals: bool = False,
    ) -> GlobalCut:
        """Thresholds and tie quotas, exactly: two histogram passes over the high and
        low 16 bits of the keys (the second reads only tensors that reach the
        threshold's bucket). Memory: two fixed histograms per task. ``totals``: also
        sum each tensor's ‖Δ‖₁ and ‖Δ‖₂² (|Δ| keys only), which a merge from this cut
        then need not recompute."""
        names = list(tasks)
        k = topk.budget(density, sum(t.numel for t in tensors))
        samples: Dict[str, Dict[str, List[float]]] = {n: {} for n in ["__base__", *names]}
        sums: Optional[Dict[str, Dict[str, List[float]]]] = {} if totals and scorer is None else None
        thresholds, tied = _histogram_cut(base, tasks, tensors, k, progress, samples, scorer, totals=sums)
        quotas: Dict[str, Dict[str, int]] = {}
        for n in names:
            th = thresholds[n]
            quotas[n] = {} if th.ties == 0 else {t.name: q for t, q in zip(tensors, topk.tie_quotas(th, tied[n])) if q}
        return cls(
            tensors=[t.name for t in tensors],
            dtypes={t.name: t.dtype for t in tensors},
            thresholds=thresholds,
            quotas=quotas,
            samples=samples,
            totals=sums or {},
        )

    def to_json(self) -> Dict:
        return {
            "tensors": self.tensors,
            "dtypes": self.dtypes,
            "thresholds": {n: {"k": t.k, "key": t.key, "ties": t.ties} for n, t in self.thresholds.items()},
            "quotas": self.quotas,
            "totals": self.totals,
        }

    @classmethod
    def from_json(cls, data: Dict) -> GlobalCut:
        return cls(
            tensors=list(data["tensors"]),
            dtypes=dict(data["dtypes"]),
            thresholds={n: topk.Threshold(**t) for n, t in data["thresholds"].items()},
            quotas={n: dict(q) for n, q in data["quotas"].items()},
            samples={},
            totals={n: {t: list(v) for t, v in per.items()} for n, per in data.get("totals", {}).items()},
        )


def compute_regions(
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    out: str,
    *,
    density: float,
    scope: str = "global",
    exclude: Sequence[str] = (),
    tau: float = 0.1,
    order: str = "random",
    seed: int = 0,
    given_order: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    progress: bool = True,
    score: str = "delta",
    fisher: Optional[Mapping[str, TensorSource]] = None,
) -> RegionSet:
    """Find every task's core region against ``base`` and write a region directory.

    ``tasks`` maps task names to fine-tuned checkpoints of ``base``. ``score`` ranks the
    entries (``topk.SCORES``; ``fisher`` needs ``fisher``: per task, the diagonal
    empirical Fisher at the fine-tune). Returns the loaded :class:`RegionSet`. Nothing
    is left at ``out`` if anything fails.
    """
    _check_args(density, scope, tau, order)
    if score not in topk.SCORES:
        raise CpiftError(f"score must be one of {', '.join(topk.SCORES)}, got {score!r}")
    if score == "fisher" and sorted(fisher or {}) != sorted(tasks):
        missing = [n for n in tasks if n not in (fisher or {})]
        raise CpiftError(f"score fisher needs a Fisher file for every task; none for {', '.join(missing)}")
    scorer = Scorer(score, fisher if score == "fisher" else None)
    ensure_free(out, overwrite)
    ensure_apart(out, [base.path, *(t.path for t in tasks.values())])
    names = list(tasks)
    check_task_names(names)
    if not names:
        raise CpiftError("no task models given; pass at least one --model NAME=PATH")
    if order == "given":
        given = list(given_order or names)
        if sorted(given) != sorted(names) or len(set(given)) != len(given):
            raise CpiftError(f"--order given needs each task once, got {given} for tasks {names}")
    tensors = participating_tensors(base, dict(tasks), exclude)  # type: ignore[arg-type]
    total = sum(t.numel for t in tensors)
    if total == 0:
        raise CpiftError("no floating-point tensors take part; check --exclude")

    cut = GlobalCut.find(base, tasks, tensors, density, progress, scorer) if scope == "global" else None
    samples = cut.samples if cut else {n: {} for n in ["__base__", *names]}

    with atomic_dir(out, overwrite=overwrite) as tmp:
        os.makedirs(os.path.join(tmp, MASK_DIR))
        writers = {n: SafetensorsWriter(os.path.join(tmp, MASK_DIR, f"{n}.safetensors")) for n in names}
        counts: Dict[str, Dict[str, int]] = {n: {} for n in names}
        sums: Dict[str, Dict[str, List[float]]] = {n: {} for n in names}  # core/total ‖Δ‖₁, ‖Δ‖₂²
        inter = torch.zeros((len(names), len(names)), dtype=torch.int64)
        desc = "regions: masks" if scope == "global" else "regions"
        deltas: Dict[str, torch.Tensor] = {}
        parts: Dict[str, masks.MaskParts] = {}
        taken: Dict[str, int] = {}
        stream = _stream(
            base, tasks, tensors, desc, progress, samples, scorer=scorer, deltas=deltas, piece=PIECE if cut else None
        )
        for info, start, stop, keys in stream:
            if start == 0:
                parts = {n: masks.MaskParts(info.numel) for n in names}
                taken = {n: 0 for n in names}
            cores = []
            for n in names:
                if cut is not None:
                    m, took = cut.mask_piece(n, info.name, keys[n], taken[n])
                    taken[n] += took
                else:
                    m = topk.exact_top_k(keys[n], topk.budget(density, info.numel))
                parts[n].add(m)
                piece_sums = localization.delta_sums(deltas[n], m)
                sums[n][info.name] = [a + b for a, b in zip(sums[n].get(info.name, [0.0] * 4), piece_sums)]
                cores.append(m)
            inter += groups.pairwise_intersections(cores)
            if stop == info.numel:
                for n in names:
                    counts[n][info.name] = parts[n].count
                    writers[n].add(info.name, parts[n].encode())
        sizes = [sum(counts[n].values()) for n in names]
        jac = groups.jaccard_from_counts(sizes, inter.tolist())
        components = groups.connected_groups(names, jac, tau)
        stages = groups.order_groups(components, order, seed, given_order)
        task_meta = {}
        for i, n in enumerate(names):
            sha = writers[n].close({"format": FORMAT, "task": n})
            th = cut.thresholds[n] if cut else None
            task_meta[n] = {
                "path": tasks[n].path,
                "k": sizes[i],
                "threshold": th.value if th is not None else None,
                "fingerprint": fingerprint_from_samples(tasks[n].infos, samples[n]),
                "mask_file": f"{MASK_DIR}/{n}.safetensors",
                "mask_sha256": sha,
                "trained_with": trained_with(tasks[n].path),
                **({"fisher": fisher[n].path} if score == "fisher" and fisher else {}),
                **localization.shares(localization.add_sums(sums[n].values()), sizes[i], total),
            }
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "density": density,
            "scope": scope,
            "score": score,
            "D": total,
            "exclude": list(exclude),
            "tau": tau,
            "order": order,
            "seed": seed,
            "base": {
                "path": base.path,
                "fingerprint": fingerprint_from_samples(base.infos, samples["__base__"]),
            },
            "tasks": task_meta,
            "jaccard": {a: {b: jac[i][j] for j, b in enumerate(names)} for i, a in enumerate(names)},
            "intersections": {a: {b: int(inter[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)},
            "groups": stages,
            "tensors": [{"name": t.name, "shape": list(t.shape)} for t in tensors],
            "counts": counts,
            "delta_sums": sums,  # per task and tensor: [core ‖Δ‖₁, ‖Δ‖₁, core ‖Δ‖₂², ‖Δ‖₂²]
            "samples": samples,
        }
        with open(os.path.join(tmp, META_NAME), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
    return load_regions(out)


# --------------------------------------------------------------------- loading


def samples_close(values: torch.Tensor, recorded: Sequence[float]) -> bool:
    """Whether a tensor's sampled values match recorded ones (2 ulp of its dtype)."""
    ref = torch.tensor(recorded, dtype=torch.float64)
    got = values.to(torch.float64)
    eps = torch.finfo(values.dtype).eps if values.is_floating_point() else 0.0
    return bool(torch.all((got - ref).abs() <= 2 * eps * ref.abs() + 1e-30))


@dataclass
class RegionSet:
    """A loaded region directory. Masks are read lazily, one tensor at a time."""

    path: str
    meta: Dict

    @property
    def tasks(self) -> List[str]:
        return list(self.meta["tasks"])

    @property
    def density(self) -> float:
        return float(self.meta["density"])

    @property
    def score(self) -> str:
        """The core score the masks were cut by (``delta`` for files made before scores)."""
        return str(self.meta.get("score", "delta"))

    @property
    def scope(self) -> str:
        return self.meta["scope"]

    @property
    def groups(self) -> List[List[str]]:
        return [list(g) for g in self.meta["groups"]]

    @property
    def tensor_names(self) -> List[str]:
        return [t["name"] for t in self.meta["tensors"]]

    def k(self, task: str) -> int:
        return int(self.meta["tasks"][task]["k"])

    def localization(self, task: str) -> Optional[Dict[str, float]]:
        """The core's share of ‖Δ‖₁ and ‖Δ‖₂², a random set's (k / D), and their ratios
        (see :mod:`cpift_merge.core.localization`); None for files made before them."""
        info = self.meta["tasks"][task]
        keys = ("core_share_l1", "core_share_l2", "random_share", "l1_ratio", "l2_ratio")
        return {key: float(info[key]) for key in keys} if all(key in info for key in keys) else None

    def jaccard(self, a: str, b: str) -> float:
        return float(self.meta["jaccard"][a][b])

    def shape(self, tensor: str) -> List[int]:
        return self._shapes[tensor]

    def __post_init__(self):
        self._shapes = {t["name"]: list(t["shape"]) for t in self.meta["tensors"]}
        self._handles: Dict[str, object] = {}

    def _handle(self, task: str):
        if task not in self.meta["tasks"]:
            raise CpiftError(f"region file {self.path} has no task {task!r} (has {self.tasks})")
        if task not in self._handles:
            file = os.path.join(self.path, self.meta["tasks"][task]["mask_file"])
            try:
                # positioned reads: a memory map (safe_open) keeps every page it touched resident,
                # so a merge or a check reading all masks would grow by the mask files' size
                self._handles[task] = Checkpoint(file)
            except Exception as err:
                raise CpiftError(
                    f"region file {self.path}: mask file of task {task} is unreadable ({err});"
                    " recompute it with cpift regions"
                ) from None
        return self._handles[task]

    def has_tensor(self, tensor: str) -> bool:
        return tensor in self._shapes

    def mask(self, task: str, tensor: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """Bool mask of ``task``'s core in ``tensor`` (shaped like the tensor).

        A tensor that does not take part (excluded, not float) has an all-False mask.
        """
        handle = self._handle(task)
        if tensor not in self._shapes:
            raise KeyError(tensor)
        shape = self._shapes[tensor]
        numel = 1
        for s in shape:
            numel *= s
        try:
            data = handle.get(tensor)
            flat = masks.decode(data.to(device) if device else data, numel)
        except Exception as err:
            raise CpiftError(
                f"region file {self.path}: mask of task {task} for {tensor} is corrupt ({err});"
                " recompute it with cpift regions"
            ) from None
        return flat.reshape(shape)

    def masks(self, task: str) -> Dict[str, torch.Tensor]:
        """Every tensor's mask for one task."""
        return {t: self.mask(task, t) for t in self.tensor_names}

    def sample(self, task: str, tensor: str) -> Optional[List[float]]:
        return self.meta["samples"].get(task, {}).get(tensor)

    def other_base_tensor(self, base: Checkpoint) -> Optional[str]:
        """The first tensor of ``base`` whose sampled values differ from those of the base
        these regions were computed on, or None (also when no base samples were kept)."""
        for name, recorded in (self.meta["samples"].get("__base__") or {}).items():
            if name in base.infos:
                values = torch.tensor(base.sample(name), dtype=base.infos[name].torch_dtype or torch.float64)
                if not samples_close(values, recorded):
                    return name
        return None


@functools.lru_cache(maxsize=1)
def _schema():
    """The pydantic model of ``regions.json`` (built on first use: pydantic stays out of
    the import of this module, which the merge pre-pass child imports)."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field

    class _Strict(BaseModel):
        model_config = ConfigDict(strict=True, extra="allow")

    class _TaskMeta(_Strict):
        k: int = Field(ge=0)
        mask_file: str
        mask_sha256: str
        core_share_l1: Optional[float] = Field(None, ge=0.0, le=1.0)
        core_share_l2: Optional[float] = Field(None, ge=0.0, le=1.0)

    class _TensorMeta(_Strict):
        name: str
        shape: List[Annotated[int, Field(ge=0)]]

    class _RegionMeta(_Strict):
        """The fields of ``regions.json`` that loading relies on, with their types and ranges."""

        format: Literal["cpift-regions"]
        version: Literal[1, 2]
        density: float = Field(ge=0.0, le=1.0)
        scope: Literal["global", "tensor"]
        score: Literal["delta", "relative", "fisher"] = "delta"  # files before the option: delta
        D: int = Field(ge=0)
        exclude: List[str] = []
        tau: float = Field(ge=0.0, le=1.0)
        order: Literal["random", "given"]
        seed: int
        tasks: Dict[str, _TaskMeta]
        tensors: List[_TensorMeta]
        groups: List[List[str]]
        jaccard: Dict[str, Dict[str, float]]
        samples: Dict[str, Dict[str, List[float]]]
        counts: Optional[Dict[str, Dict[str, Annotated[int, Field(ge=0)]]]] = None

    return _RegionMeta


def _check_meta(meta: object, path: str) -> Dict:
    """Types, ranges and consistency of ``regions.json``; one line on the first problem."""
    what = f"region file {os.path.join(path, META_NAME)}"
    fix = "recompute it with cpift regions"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CpiftError(f"{what} is not a cpift region file; {fix}")
    if meta.get("version") not in (1, 2):
        raise CpiftError(f"{what} has version {meta.get('version')!r}, this cpift-merge reads 1 and {VERSION}")
    from pydantic import ValidationError

    try:
        m = _schema().model_validate(meta)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(x) for x in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f", got {e['input']!r}"[:80]
        raise CpiftError(f"{what}: field {field}: {e['msg']}{got}; {fix}") from None
    numel = sum(math.prod(t.shape) for t in m.tensors)
    if numel != m.D:
        raise CpiftError(f"{what}: D is {m.D} but its tensors hold {numel} entries; {fix}")
    names = [t.name for t in m.tensors]
    if len(set(names)) != len(names):
        raise CpiftError(f"{what}: a tensor is listed twice; {fix}")
    staged = [t for g in m.groups for t in g]
    if sorted(staged) != sorted(m.tasks) or set(m.jaccard) != set(m.tasks):
        raise CpiftError(f"{what}: groups and jaccard must name each task ({', '.join(m.tasks)}) once; {fix}")
    root = os.path.realpath(path)
    for task, info in m.tasks.items():
        if info.k > m.D:
            raise CpiftError(f"{what}: task {task} has k = {info.k}, more than D = {m.D}; {fix}")
        file = info.mask_file
        inside = os.path.realpath(os.path.join(root, file))
        if os.path.isabs(file) or not inside.startswith(root + os.sep):
            raise CpiftError(f"{what}: mask file {file!r} of task {task} is not inside the region directory; {fix}")
        if m.counts is not None:
            per = m.counts.get(task)
            if per is None or set(per) - set(names) or sum(per.values()) != info.k:
                raise CpiftError(f"{what}: the per-tensor counts of task {task} do not add up to k = {info.k}; {fix}")
    return meta


def _verify_masks(rs: RegionSet) -> None:
    """Each mask file whole (checksum) and its entries counted, tensor by tensor: the
    count per tensor matches ``counts`` and the total matches ``k``."""
    version = rs.meta["version"]
    counts = rs.meta.get("counts") or {}
    for task, info in rs.meta["tasks"].items():
        file = os.path.join(rs.path, info["mask_file"])
        what = f"region file {rs.path}: mask file of task {task}"
        try:
            with open(file, "rb") as fh:
                if version == 1:  # version 1 checksums the data after the header only
                    (n,) = struct.unpack("<Q", fh.read(8))
                    fh.seek(8 + n)
                digest = hashlib.sha256()
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        except (OSError, struct.error) as err:
            raise CpiftError(f"{what} is missing or truncated ({err}); recompute it with cpift regions") from None
        if digest.hexdigest() != info["mask_sha256"]:
            raise CpiftError(
                f"{what} is corrupt, truncated or edited (checksum mismatch); recompute it with cpift regions"
            )
        handle = rs._handle(task)
        total = 0
        for name in rs.tensor_names:
            try:
                n = masks.count(handle.get(name), math.prod(rs.shape(name)))
            except Exception as err:
                raise CpiftError(f"{what} has a bad mask for {name} ({err}); recompute it with cpift regions") from None
            if task in counts and counts[task].get(name, 0) != n:
                raise CpiftError(
                    f"{what} holds {n} entries for {name}, its metadata {counts[task].get(name, 0)};"
                    " recompute it with cpift regions"
                )
            total += n
        if total != info["k"]:
            raise CpiftError(
                f"{what} holds {total} core entries, its metadata k = {info['k']}; recompute it with cpift regions"
            )


def load_regions(path: str, verify: bool = True) -> RegionSet:
    """Load a region directory; a corrupt, truncated or edited one is refused clearly.

    The metadata is always checked (types, ranges, consistency, mask files inside the
    directory); with ``verify`` each mask file is also checksummed whole and its
    entries counted against ``k``."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    meta_file = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_file):
        raise CpiftError(f"{path} is not a region directory (no {META_NAME}); make one with cpift regions")
    try:
        with open(meta_file, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as err:
        raise CpiftError(f"region file {meta_file} is corrupt ({err}); recompute it with cpift regions") from None
    rs = RegionSet(path=path, meta=_check_meta(meta, path))
    if verify:
        _verify_masks(rs)
    return rs


def compute_from_paths(
    base: str,
    models: Mapping[str, str],
    out: str,
    **kwargs,
) -> RegionSet:
    """:func:`compute_regions` on checkpoint folders (the CLI's entry point)."""
    check_task_names(list(models))
    base_ckpt = Checkpoint(base, label="base")
    tasks = {n: Checkpoint(p, label=n) for n, p in models.items()}
    fisher = kwargs.pop("fisher", None)
    if kwargs.get("score") == "fisher":
        fisher = {n: Checkpoint(p, label=f"Fisher file {p}") for n, p in fisher_files(models, fisher).items()}
    return compute_regions(base_ckpt, tasks, out, fisher=fisher, **kwargs)


# in a probe's folder: its diagonal empirical Fisher (in a subfolder, so that no loader
# mistakes it for a weight shard)
FISHER_NAME = os.path.join("fisher", "fisher.safetensors")


def fisher_files(models: Mapping[str, str], given: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Each task's Fisher file: given, else ``MODEL/fisher/fisher.safetensors``; one line naming
    the first task without one."""
    files = {}
    for n, p in models.items():
        f = (given or {}).get(n) or os.path.join(p, FISHER_NAME)
        if not os.path.isfile(f):
            raise CpiftError(
                f"score fisher: no Fisher file {f} for task {n}; make it with"
                " `cpift probe --score fisher` (or cpift_merge.training.fisher.compute_fisher)"
            )
        files[n] = f
    return files
