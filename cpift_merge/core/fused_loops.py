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


@overload(_put)
def _put_impl(a, j, v):
    if a.dtype == types.uint16:

        def put_bf16(a, j, v):
            b = _bits_of_float(v)
            r = np.uint32((b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
            r = np.uint32(0x7FC0) if v != v else r
            a[j] = r
            return _float_of_bits(r << np.uint32(16))

        return put_bf16

    def put_f32(a, j, v):
        a[j] = v
        return v

    return put_f32


NORMS = (0.0,) * 12  # (x·x, y·y, x·y), each as four interleaved partial sums


@numba.njit(nogil=True, inline="always")
def _add_norms(s, j, a, b):
    """``s`` (as :data:`NORMS`) with entry ``j``'s ``a·a``, ``b·b``, ``a·b`` (float64) added
    into partial sum ``j % 4``."""
    xx0, xx1, xx2, xx3, yy0, yy1, yy2, yy3, xy0, xy1, xy2, xy3 = s
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
    return (xx0, xx1, xx2, xx3, yy0, yy1, yy2, yy3, xy0, xy1, xy2, xy3)


@numba.njit(nogil=True, inline="always")
def _store_norms(s, sums):
    """``sums[:3]`` = the partial sums ``s`` of :func:`_add_norms`, each four added in order."""
    sums[0] = ((s[0] + s[1]) + s[2]) + s[3]
    sums[1] = ((s[4] + s[5]) + s[6]) + s[7]
    sums[2] = ((s[8] + s[9]) + s[10]) + s[11]


@jit
def _shared(vals, r, m, mean, values, n, tally):
    """Write into ``values[n]`` the value an entry in the cores of several tasks (the bits
    set in ``m``; ``vals``: the tasks' values there, float32; ``r``: theta_0's) takes:
    (``mean``: False) the value of the owner with the largest ``|vals[i] - r|`` (the first
    of equal ones, NaN counting as largest, as ``torch.argmax``) or (``mean``: True) the
    owners' mean, summed over all tasks in order with weight 1 or 0 and divided in
    float32, as the torch ops do. Counts the entry in ``tally`` for each task whose value
    it took."""
    k = vals.shape[0]
    one = np.uint64(1)
    if mean:
        acc = np.float32(0.0)
        owners = 0
        for t in range(k):
            w = np.float32(0.0)
            if m & (one << np.uint64(t)):
                w = np.float32(1.0)
                owners += 1
                tally[t] += 1
            acc = acc + vals[t] * w
        _put(values, n, acc / np.float32(owners))
        return
    win = -1
    best = np.float32(0.0)
    for t in range(k):
        if m & (one << np.uint64(t)):
            score = abs(vals[t] - r)
            if win < 0 or (best == best and (score > best or score != score)):
                win = t
                best = score
    _put(values, n, vals[win])
    tally[win] += 1


@jit
def mean(x, ts, out, sums):
    """``out`` = the mean of ``ts``; ``sums[:3]`` = float64 ``(x·x, y·y, x·y)`` with ``y``
    the stored mean: entry j goes into partial sum ``j % 4``, the four added in order at
    the end."""
    k = len(ts)
    nk = np.float32(k)
    s = NORMS
    for j in range(x.shape[0]):
        acc = _get(ts[0], j)
        for i in range(1, k):
            acc = acc + _get(ts[i], j)
        if k > 1:
            acc = acc / nk
        a = np.float64(_get(x, j))
        b = np.float64(_put(out, j, acc))
        s = _add_norms(s, j, a, b)
    _store_norms(s, sums)
    sums[3] = sums[4] = sums[5] = 0.0


@jit
def mean_cut(x, ts, thr, left, out, offset, sums, ref, mean, places, values, count, tally, cnt, core):
    """:func:`mean` and the cores: task i's core is the entries with ``|ts[i] - x| >
    thr[i]`` and the first ``left[i]`` equal to it (``left`` decreased): ``cnt[i]`` counts
    them and ``core[i]`` sums float64 ``(|Δ|, |Δ|²)`` over them; each entry of any core
    goes once, in flat order, into ``places`` (plus ``offset``) with the value it takes
    into ``values`` (its one owner's value, stored as read: a bfloat16 value as float32 is
    exact; or :func:`_shared`'s, with ``ref``: theta_0; ``tally``: per task), and
    ``sums[3:]`` = float64 ``(x·x, y·y, x·y)`` over them; ``count`` = ``(entries, entries
    in several cores)``. Counts are kept in local arrays while the loop runs: parts on
    other threads write neighbouring rows."""
    k = len(ts)
    nk = np.float32(k)
    one = np.uint64(1)
    s = NORMS
    sx = sy = sxy = 0.0
    n = 0
    shared = 0
    found = np.zeros(k, dtype=np.int64)
    took = np.zeros(k, dtype=np.int64)
    dsum = np.zeros((k, 2), dtype=np.float64)
    quota = left.copy()
    vals = np.empty(k, dtype=np.float32)
    at = np.empty(x.shape[0], dtype=np.int64)
    bits = np.empty(x.shape[0], dtype=np.uint64)
    for j in range(x.shape[0]):
        xv = _get(x, j)
        acc = np.float32(0.0)
        m = np.uint64(0)
        last = 0
        for i in range(k):
            tv = _get(ts[i], j)
            vals[i] = tv
            d = abs(tv - xv)
            if d >= thr[i]:
                if d > thr[i] or quota[i] > 0:
                    if d == thr[i]:
                        quota[i] -= 1
                    m |= one << np.uint64(i)
                    last = i
                    found[i] += 1
                    dd = np.float64(d)
                    dsum[i, 0] += dd
                    dsum[i, 1] += dd * dd
            if i == 0:
                acc = tv
            else:
                acc = acc + tv
        if k > 1:
            acc = acc / nk
        a = np.float64(xv)
        b = np.float64(_put(out, j, acc))
        s = _add_norms(s, j, a, b)
        if m:
            places[n] = j + offset
            if m & (m - one) == 0:
                _put(values, n, vals[last])
                took[last] += 1
            else:
                at[shared] = n
                bits[shared] = m
                shared += 1
            sx += a * a
            sy += b * b
            sxy += a * b
            n += 1
    for q in range(shared):  # the entries in several cores: out of the hot loop
        p = at[q]
        j = places[p] - offset
        for i in range(k):
            vals[i] = _get(ts[i], j)
        _shared(vals, _get(ref, j), bits[q], mean, values, p, took)
    _store_norms(s, sums)
    sums[3] = sx
    sums[4] = sy
    sums[5] = sxy
    count[0] = n
    count[1] = shared
    for i in range(k):
        left[i] = quota[i]
        cnt[i] = found[i]
        tally[i] = took[i]
        core[i, 0] = dsum[i, 0]
        core[i, 1] = dsum[i, 1]


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
def gather(given, ts, ref, x, y, mean, starts, places, values, count, tally, sums):
    """:func:`mean_cut`'s core bookkeeping for cores given as sorted chunk-relative indices
    (``given[i]``: task i's), after the chunk's mean is in ``y``: the entries in flat order,
    each into the part p that holds it (``starts``: where each part begins), its place and
    value at ``places``/``values[starts[p] + count[p, 0]]``, its tasks into ``tally[p]``,
    its base and target values into ``sums[p, 3:]``, as :func:`mean_cut` does."""
    k = len(given)
    parts = starts.shape[0]
    pos = np.zeros(k, dtype=np.int64)
    vals = np.empty(k, dtype=np.float32)
    for p in range(parts):
        count[p, 0] = 0
        count[p, 1] = 0
        sums[p, 3] = 0.0
        sums[p, 4] = 0.0
        sums[p, 5] = 0.0
        for i in range(k):
            tally[p, i] = 0
    p = 0
    while True:
        j = -1
        for i in range(k):
            if pos[i] < given[i].shape[0] and (j < 0 or given[i][pos[i]] < j):
                j = given[i][pos[i]]
        if j < 0:
            return
        m = np.uint64(0)
        last = 0
        for i in range(k):
            vals[i] = _get(ts[i], j)
            if pos[i] < given[i].shape[0] and given[i][pos[i]] == j:
                m |= np.uint64(1) << np.uint64(i)
                last = i
                pos[i] += 1
        while p + 1 < parts and j >= starts[p + 1]:
            p += 1
        n = starts[p] + count[p, 0]
        places[n] = j
        if m & (m - np.uint64(1)) == 0:
            _put(values, n, vals[last])
            tally[p, last] += 1
        else:
            _shared(vals, _get(ref, j), m, mean, values, n, tally[p])
            count[p, 1] += 1
        a = np.float64(_get(x, j))
        b = np.float64(_get(y, j))
        sums[p, 3] += a * a
        sums[p, 4] += b * b
        sums[p, 5] += a * b
        count[p, 0] += 1


@jit
def scatter(out, places, values):
    """``out[places] = values``."""
    for n in range(places.shape[0]):
        out[places[n]] = values[n]


@jit
def interpolate(x, y, ca, cb):
    """``y = ca·x + cb·y``, each product rounded to float32 before the sum."""
    for j in range(x.shape[0]):
        _put(y, j, ca * _get(x, j) + cb * _get(y, j))
