"""Pure math of CPI-FT: a task's core, the exact top-k of |delta| with the tie rule.

Tensors in, tensors out: nothing here reads files, knows mergekit or trains.

Exact top-k over a stream of tensors
------------------------------------
A task's core region is the ``k`` entries with the largest ``|delta|``. Non-negative
IEEE-754 floats sort like their bit patterns read as integers, so ``|delta|`` is
turned into int32 "keys" and the k-th largest key is found with two histogram
passes (high 16 bits, then low 16 bits inside the one bucket that holds it).
Memory is two fixed histograms, whatever the model size. Entries whose key equals
the threshold are taken in a fixed order (tensor order, then flat index) until
exactly ``k`` are selected, so two runs give the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

HIGH_BUCKETS = 1 << 15  # sign bit is always 0 for |delta|
NONFINITE_BUCKET = 0x7F80  # high 16 bits of +Inf; NaNs (sign cleared) lie above
LOW_BUCKETS = 1 << 16


def magnitude_keys(
    theta: torch.Tensor, theta0: torch.Tensor, out: Optional[torch.Tensor] = None, check: bool = True
) -> torch.Tensor:
    """Flat int32 keys that sort like ``|theta - theta0|`` (computed in float32).

    ``out``: a flat float32 tensor of ``theta.numel()`` entries to compute into (it may
    be ``theta``'s own storage); the keys are then a view of it. Pass ``theta0`` already
    in float32 when it serves several tasks: it is then converted once, not per call. Raises ValueError when
    the difference is not finite (NaN/Inf in a checkpoint), unless ``check`` is False
    (for callers that know these exact values passed the check before).
    """
    a = theta.detach().reshape(-1)
    b = theta0.detach().reshape(-1).to(torch.float32)  # no copy when the caller converted it
    if out is None:
        delta = a.to(torch.float32) - b
    elif a.dtype == torch.float32:
        delta = torch.sub(a, b, out=out)
    else:
        # convert into ``out`` and subtract in place: the same float32 values as
        # ``a.to(float32) - b``, without a tensor-sized temporary (a page fault per 4 KiB)
        delta = out.copy_(a).sub_(b)
    delta = delta.abs_()
    if check and not all_finite(delta):
        raise ValueError("non-finite value (NaN or Inf)")
    # abs() of -0.0 is +0.0, so every key is a non-negative int32
    return delta.view(torch.int32)


SCORES = ("delta", "relative", "fisher")  # delta: the papers' |Δ| (the default)
RELATIVE_EPS = 1e-8


def score_keys(
    delta: torch.Tensor,
    score: str,
    theta0: Optional[torch.Tensor] = None,
    fisher: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flat int32 keys that sort like a core score, from ``delta`` = ``|theta - theta0|``
    (flat float32, as :func:`magnitude_keys` leaves it, and left unchanged):

    * ``delta``: ``|Δ|`` itself (the keys are a view of ``delta``);
    * ``relative``: ``|Δ| / (|theta0| + 1e-8)`` (needs ``theta0``);
    * ``fisher``: ``Δ² · F`` with ``F`` the diagonal empirical Fisher (needs ``fisher``,
      non-negative).

    Computed in float32 into ``out`` (a flat float32 buffer) when given. Exact top-k and
    the tie rule act on these keys as on ``|Δ|``. Raises ValueError on a non-finite
    score or a negative Fisher entry."""
    if score == "delta":
        return delta.view(torch.int32)
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    other = theta0 if score == "relative" else fisher
    if other is None:
        raise ValueError(f"score {score} needs {'theta0' if score == 'relative' else 'the Fisher tensor'}")
    if other.numel() != delta.numel():
        raise ValueError(f"score {score}: {other.numel()} entries for a tensor of {delta.numel()}")
    res = torch.empty_like(delta) if out is None else out
    if score == "relative":
        torch.abs(other.detach().reshape(-1).to(torch.float32), out=res)
        res.add_(RELATIVE_EPS)
        torch.div(delta, res, out=res)
    else:
        f = other.detach().reshape(-1).to(torch.float32)
        if not all_finite(f) or bool((f < 0).any()):
            raise ValueError("Fisher values must be finite and non-negative")
        torch.mul(delta, delta, out=res)
        res.mul_(f).abs_()  # a -0.0 Fisher entry gives -0.0, whose bits sort below every key
    if not all_finite(res):
        raise ValueError("non-finite score")
    return res.view(torch.int32)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite. A NaN or Inf makes the sum non-finite, so the fast
    sum decides; only a non-finite sum (or an overflow) pays the full check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _bincount(values: torch.Tensor, buckets: int) -> torch.Tensor:
    return torch.bincount(values, minlength=buckets)  # int32 input: no int64 copy


@dataclass
class Threshold:
    """The exact cut for one task: keys > ``key`` are in, and the first ``ties``
    entries (in stream order) whose key equals ``key`` are in too."""

    k: int
    key: int
    ties: int

    @property
    def value(self) -> float:
        """The threshold as a float ``|delta|``."""
        return float(torch.tensor([self.key], dtype=torch.int32).view(torch.float32))


class ThresholdFinder:
    """Find the exact k-th largest key of a stream in two passes.

    Pass 1: ``add_high(keys)`` for every tensor, then ``end_high()``.
    Pass 2: ``add_low(keys)`` for every tensor (same stream), then ``end_low()``.
    When k is 0 or covers everything, pass 2 is not needed (``needs_low`` is False).
    """

    def __init__(self, k: int):
        if k < 0:
            raise ValueError("k must be non-negative")
        self.k = k
        self.total = 0
        self._high = torch.zeros(HIGH_BUCKETS, dtype=torch.int64)
        self._low = torch.zeros(LOW_BUCKETS, dtype=torch.int64)
        self._bucket: Optional[int] = None
        self._above = 0
        self._work: Optional[torch.Tensor] = None  # add_low's buffers
        self._flags: Optional[torch.Tensor] = None
        self.result: Optional[Threshold] = None

    def add_high(self, keys: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """Count the high 16 bits of ``keys``; returns this call's histogram
        (``HIGH_BUCKETS`` counts: its first and last non-zero bucket bound the keys, and
        any count from ``NONFINITE_BUCKET`` on is an Inf or NaN). ``in_place`` shifts
        ``keys`` itself (saves a tensor-sized allocation when the keys are spent)."""
        self.total += keys.numel()
        high = torch.bitwise_right_shift(keys, 16, out=keys) if in_place else keys >> 16
        hist = _bincount(high, HIGH_BUCKETS)
        self._high += hist
        return hist

    def add_histogram(self, hist: torch.Tensor, entries: int) -> None:
        """Add a histogram of the high 16 bits of ``entries`` keys counted elsewhere (as
        :meth:`add_high` counts them)."""
        self.total += entries
        self._high += hist

    def twin(self) -> ThresholdFinder:
        """A finder in this one's state with no counts: for part of a split stream, whose
        counts :meth:`absorb` adds back."""
        other = ThresholdFinder(self.k)
        other._bucket, other._above, other.result = self._bucket, self._above, self.result
        return other

    def absorb(self, other: ThresholdFinder) -> None:
        """Add the counts of ``other`` (a :meth:`twin`, or a finder of the same ``k`` that saw
        another part of the stream)."""
        if other.k != self.k:
            raise ValueError("finders of different k")
        self.total += other.total
        self._high += other._high
        self._low += other._low

    def end_high(self) -> None:
        if self.k > self.total:
            raise ValueError(f"k={self.k} exceeds the {self.total} entries available")
        if self.k == 0:
            # nothing selected: a key above every possible key, no ties
            self.result = Threshold(k=0, key=0x7FFFFFFF, ties=0)
            return
        counts = self._high.flip(0).cumsum(0).flip(0)  # counts[b] = #keys >= bucket b
        # the bucket holding the k-th largest: the largest b with counts[b] >= k
        bucket = int((counts >= self.k).nonzero().max())
        self._bucket = bucket
        self._above = int(counts[bucket + 1]) if bucket + 1 < HIGH_BUCKETS else 0

    @property
    def needs_low(self) -> bool:
        return self.result is None

    @property
    def bucket(self) -> int:
        """The high-16-bit bucket holding the k-th largest key (after ``end_high``)."""
        if self._bucket is None:
            raise RuntimeError("end_high() must be called first")
        return self._bucket

    def add_low(self, keys: torch.Tensor) -> torch.Tensor:
        """Histogram the low bits of the keys in the threshold's bucket; returns those
        low bits (so callers can count ties per tensor once the threshold is known)."""
        if self._bucket is None:
            raise RuntimeError("end_high() must be called before add_low()")
        flat = keys.reshape(-1)
        # work buffers reused across calls: a fresh tensor-sized one costs a page fault per 4 KiB
        if self._work is None or self._work.numel() < flat.numel():
            self._work = torch.empty(flat.numel(), dtype=torch.int32, device=flat.device)
            self._flags = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
        high, inside = self._work[: flat.numel()], self._flags[: flat.numel()]
        torch.bitwise_right_shift(flat, 16, out=high)
        torch.eq(high, self._bucket, out=inside)
        low = flat[inside].bitwise_and_(0xFFFF)
        if low.numel():
            self._low += _bincount(low, LOW_BUCKETS)
        return low

    def add_low_counts(self, keys: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pass 2 without reading the stream again: ``keys`` (distinct full keys, any order)
        seen ``counts`` times, e.g. those :func:`window_counts` kept in pass 1 around the
        threshold. Counts the ones in the threshold's bucket as :meth:`add_low` would, and
        returns their low bits and counts (for ties per tensor)."""
        if self._bucket is None:
            raise RuntimeError("end_high() must be called before add_low_counts()")
        inside = (keys >> 16) == self._bucket
        low, counts = (keys[inside] & 0xFFFF).to(torch.int64), counts[inside].to(torch.int64)
        if low.numel():
            self._low.index_add_(0, low, counts)
        return low, counts

    def end_low(self) -> Threshold:
        if self.result is not None:
            return self.result
        need = self.k - self._above  # how many to take from the bucket, >= 1
        counts = self._low.flip(0).cumsum(0).flip(0)
        low = int((counts >= need).nonzero().max())
        greater_in_bucket = int(counts[low + 1]) if low + 1 < LOW_BUCKETS else 0
        key = (self._bucket << 16) | low
        self.result = Threshold(k=self.k, key=key, ties=self.k - self._above - greater_in_bucket)
        return self.result


def guess_window(sample_high: torch.Tensor, k: float, margin: float = 0.05) -> Tuple[int, int]:
    """High-16-bit buckets ``(lo, hi)``, inclusive, likely to hold the k-th largest key of a
    stream, from the high-bit histogram of a uniform sample of it (``k`` scaled to the
    sample). The rank is widened by ``margin`` of itself plus three standard deviations,
    and by one bucket on each side. Only a guess: :class:`ThresholdFinder` is exact either way."""
    counts = sample_high.flip(0).cumsum(0).flip(0)  # counts[b] = #sample keys >= bucket b
    slack = margin * k + 3 * math.sqrt(max(k, 1.0)) + 1

    def bucket_at(rank: float) -> int:
        reached = (counts >= max(rank, 1.0)).nonzero()
        return int(reached.max()) if reached.numel() else 0

    lo, hi = bucket_at(k + slack) - 1, bucket_at(k - slack) + 1
    return max(lo, 0), min(hi, NONFINITE_BUCKET - 1)


def window_counts(
    keys: torch.Tensor, window: Tuple[int, int], flags: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The distinct keys whose high 16 bits lie in ``window`` (inclusive buckets) and how
    often each occurs. ``flags``: a bool buffer of at least ``keys.numel()`` entries.
    One pass over ``keys`` (those from the window's low edge up are few: the window lies
    near a top-k threshold), the upper edge is applied to those."""
    flat = keys.reshape(-1)
    first = window[0] << 16
    above = flat[torch.ge(flat, first, out=flags[: flat.numel()])]
    picked = above[above < ((window[1] + 1) << 16)]
    values, counts = torch.unique(picked, return_counts=True)  # a sort of the few picked keys
    return values.to(torch.int64), counts


def cut_mask(keys: torch.Tensor, key: int, ties: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keys above ``key``, plus the first ``ties`` entries equal to it (by index); into
    ``out`` (a bool tensor like ``keys``) when given."""
    mask = keys > key if out is None else torch.gt(keys, key, out=out)
    if ties > 0:
        tied = (keys == key).nonzero().reshape(-1)[:ties]
        mask[tied] = True
    return mask


def cut_indices(
    keys: torch.Tensor, key: int, ties: int, flags: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, int]:
    """:func:`cut_mask` as sorted flat int64 indices, and how many tied entries it took.
    ``flags``: a bool work buffer like ``keys`` (reused by callers that cut chunk after
    chunk). On the CPU the compare and the index scan run in NumPy, about twice as fast
    as ``torch.gt`` and ``nonzero`` on a 1M-entry chunk; the result is the same."""
    flat = keys.reshape(-1)
    flags = None if flags is None else flags.reshape(-1)
    if flat.device.type == "cpu":
        return _cut_indices_numpy(flat, key, ties, flags)
    return _cut_indices_torch(flat, key, ties, flags)


def _cut_indices_numpy(flat: torch.Tensor, key: int, ties: int, flags: Optional[torch.Tensor]):
    k = flat.numpy()
    idx = np.flatnonzero(np.greater(k, key, out=None if flags is None else flags.numpy()))
    took = 0
    if ties > 0:
        tied = np.flatnonzero(k == key)[:ties]
        took = int(tied.size)
        if took:
            idx = np.sort(np.concatenate([idx, tied]))
    return torch.from_numpy(idx.astype(np.int64, copy=False)), took


def _cut_indices_torch(flat: torch.Tensor, key: int, ties: int, flags: Optional[torch.Tensor]):
    took = min(ties, int(torch.count_nonzero(flat == key))) if ties > 0 else 0
    return cut_mask(flat, key, ties, out=flags).nonzero().reshape(-1), took


def tie_quotas(threshold: Threshold, tied_counts: Sequence[int]) -> List[int]:
    """Split a threshold's ties over tensors in stream order, given how many entries
    of each tensor equal the threshold key."""
    left, out = threshold.ties, []
    for c in tied_counts:
        take = min(left, int(c))
        out.append(take)
        left -= take
    return out


def exact_top_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest keys of one flat tensor, ties by lower index."""
    finder = ThresholdFinder(k)
    finder.add_high(keys)
    finder.end_high()
    if finder.needs_low:
        finder.add_low(keys)
    th = finder.end_low()
    return cut_mask(keys, th.key, th.ties)


def core_mask(theta: torch.Tensor, theta0: torch.Tensor, density: float) -> torch.Tensor:
    """Per-tensor core (``scope: tensor``): top ``floor(density * numel)`` of |delta|."""
    keys = magnitude_keys(theta, theta0)
    return exact_top_k(keys, budget(density, keys.numel())).reshape(theta.shape)


def budget(density: float, total: int) -> int:
    """``k = floor(density * D)``, with density read as the decimal the user wrote.

    ``0.29 * 100`` is 28.999999999999996 in binary floating point; a user who asks
    for 29% of 100 entries gets 29, so the product is taken on the shortest decimal
    representation of ``density`` (``Fraction(repr(density))``).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return math.floor(Fraction(repr(float(density))) * total)
