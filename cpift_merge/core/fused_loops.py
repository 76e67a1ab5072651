"""The Numba loops behind :mod:`cpift_merge.core.fused` (imported only when Numba is
there). Arrays are float32, or bfloat16 passed as their uint16 bit patterns: a bfloat16
value is read as the float32 with those 16 high bits (exact) and a float32 result is
stored rounded to nearest-even, as torch rounds. Numba compiles one version per dtype."""

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

jit = numba.njit(cache=True, nogil=True)


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 with these uint32 bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_float(typingctx, value):
    """The uint32 bits of a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _get(a, j):
    """``a[j]`` as float32: a bfloat16 value (a uint16 array) becomes the float32 with
    those 16 high bits, which is exact."""


@overload(_get, inline="always")
def _get_impl(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: _float_of_bits(np.uint32(a[j]) << np.uint32(16))
    return lambda a, j: a[j]


def _put(a, j, v):
    """Store the float32 ``v`` into ``a[j]`` (into a uint16 array: rounded to the nearest
    bfloat16, ties to even, as torch rounds); returns the value stored, as float32."""


@overload(_put, inline="always")
def _put_impl(a, j, v):
    if a.dtype == types.uint16:

        def put_bf16(a, j, v):
            b = _bits_of_float(v)
            if v != v:
                r = np.uint32(0x7FC0)
            else:
                r = np.uint32((b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
            a[j] = r
            return _float_of_bits(r << np.uint32(16))

        return put_bf16

    def put_f32(a, j, v):
        a[j] = v
        return v

    return put_f32


@jit
def mean_cut(x, ts, thr, left, out, idx, dp, cnt, find, offset, sums):
    """``out`` = the mean of ``ts``; with ``find``, per task i the entries with
    ``|ts[i] - x| > thr[i]`` and the first ``left[i]`` equal to it (``left`` decreased),
    their indices plus ``offset`` into ``idx[i]`` and ``|Δ|`` into ``dp[i]``, their number
    into ``cnt[i]``;
    ``sums`` = float64 ``(x·x, y·y, x·y)`` with ``y`` the stored mean: entry j goes into
    partial sum ``j % 4``, and the four are added in order at the end."""
    k = len(ts)
    nk = np.float32(k)
    xx0 = xx1 = xx2 = xx3 = yy0 = yy1 = yy2 = yy3 = xy0 = xy1 = xy2 = xy3 = 0.0
    for i in range(k):
        cnt[i] = 0
    for j in range(x.shape[0]):
        xv = _get(x, j)
        acc = np.float32(0.0)
        for i in range(k):
            tv = _get(ts[i], j)
            if find:
                d = abs(tv - xv)
                if d >= thr[i]:
                    if d > thr[i] or left[i] > 0:
                        if d == thr[i]:
                            left[i] -= 1
                        c = cnt[i]
                        idx[i, c] = j + offset
                        dp[i, c] = d
                        cnt[i] = c + 1
            if i == 0:
                acc = tv
            else:
                acc = acc + tv
        if k > 1:
            acc = acc / nk
        a = np.float64(xv)
        b = np.float64(_put(out, j, acc))
        lane = j & 3
        if lane == 0:
            xx0 += a * a
            yy0 += b * b
            xy0 += a * b
        elif lane == 1:
            xx1 += a * a
            yy1 += b * b
            xy1 += a * b
        elif lane == 2:
            xx2 += a * a
            yy2 += b * b
            xy2 += a * b
        else:
            xx3 += a * a
            yy3 += b * b
            xy3 += a * b
    sums[0] = ((xx0 + xx1) + xx2) + xx3
    sums[1] = ((yy0 + yy1) + yy2) + yy3
    sums[2] = ((xy0 + xy1) + xy2) + xy3


@jit
def histogram(x, t, hist, lo, hi, win, sums):
    """The |Δ| keys of ``t`` against ``x`` (``|t - x|`` in float32, as bit patterns): add
    their high 16 bits into ``hist``; copy the keys in ``[lo, hi)`` into ``win`` and return
    how many; ``sums`` = float64 ``(Σ|Δ|, Σ|Δ|²)``, entry j into partial sum ``j % 4``."""
    n = 0
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = 0.0
    for j in range(x.shape[0]):
        d = abs(_get(t, j) - _get(x, j))
        key = np.int64(_bits_of_float(d))
        hist[key >> 16] += 1
        if key >= lo and key < hi:
            win[n] = key
            n += 1
        v = np.float64(d)
        lane = j & 3
        if lane == 0:
            a0 += v
            b0 += v * v
        elif lane == 1:
            a1 += v
            b1 += v * v
        elif lane == 2:
            a2 += v
            b2 += v * v
        else:
            a3 += v
            b3 += v * v
    sums[0] = ((a0 + a1) + a2) + a3
    sums[1] = ((b0 + b1) + b2) + b3
    return n


@jit
def compact(idx, dp, cnt, starts):
    """Move each part's run of found entries (part p's ``cnt[p, i]`` entries of task i at
    ``idx[i, starts[p]:]``) down after the runs before it; returns the totals per task."""
    parts, k = cnt.shape
    total = np.zeros(k, dtype=np.int64)
    for i in range(k):
        pos = 0
        for p in range(parts):
            s = starts[p]
            for c in range(cnt[p, i]):
                idx[i, pos + c] = idx[i, s + c]
                dp[i, pos + c] = dp[i, s + c]
            pos += cnt[p, i]
        total[i] = pos
    return total


@jit
def interpolate(x, y, ca, cb):
    """``y = ca·x + cb·y``, each product rounded to float32 before the sum."""
    for j in range(x.shape[0]):
        _put(y, j, ca * _get(x, j) + cb * _get(y, j))
