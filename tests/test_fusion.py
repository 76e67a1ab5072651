"""The pure CPI fusion of one tensor, against mergekit's own slerp."""

import math

import pytest
import torch
from mergekit.merge_methods.slerp import slerp as mk_slerp

from cpift_merge.core.fusion import DEFAULT_EPSILON, cpi_fuse, slerp


def _t(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _none(x):
    return torch.zeros_like(x, dtype=torch.bool)


@pytest.mark.parametrize("omega", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("near", [False, True])
def test_density_zero_one_task_is_mergekit_slerp(omega, near):
    base = _t(16, 24, seed=1)
    other = base + _t(16, 24, seed=2, scale=0.01 if near else 1.0)  # near: linear fallback
    out, stats = cpi_fuse(base, [other], [_none(base)], omega=omega)
    ref = mk_slerp(torch.tensor([omega]), base[None], other[None])[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert stats.core_entries == 0 and stats.transplanted == [0]


def test_slerp_keeps_norm_on_the_sphere_and_falls_back_when_collinear():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    mid = slerp(0.5, a, b)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5)] * 2))
    c = torch.tensor([1.0, 1e-4])  # angle 1e-4 < epsilon: linear
    torch.testing.assert_close(slerp(0.5, a, c), (a + c) / 2)
    assert DEFAULT_EPSILON == pytest.approx(math.acos(0.9995))
    # the spherical weights apply to the raw vectors (as in mergekit): |b| = 2
    far = slerp(0.5, a, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(far, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]))
    # a larger epsilon turns the same pair linear
    torch.testing.assert_close(slerp(0.5, a, torch.tensor([0.0, 2.0]), epsilon=2.0), torch.tensor([0.5, 1.0]))


def test_omega_zero_keeps_non_core_bit_identical_and_cores_transplanted():
    base = _t(32, 32, seed=3)
    thetas = [base + _t(32, 32, seed=10 + i, scale=0.1) for i in range(3)]
    g = torch.Generator().manual_seed(5)
    cores = [torch.rand(32, 32, generator=g) < 0.05 for _ in range(3)]
    out, stats = cpi_fuse(base, thetas, cores, omega=0.0)
    any_core = cores[0] | cores[1] | cores[2]
    assert torch.equal(out[~any_core], base[~any_core])
    only = [c & ~(any_core & ~c) for c in cores]
    for i, c in enumerate(cores):
        single = c & (cores[0].int() + cores[1].int() + cores[2].int() == 1)
        assert torch.equal(out[single], thetas[i][single])
    # max_delta: each overlapping entry comes from the task with the largest |delta|
    multi = (cores[0].int() + cores[1].int() + cores[2].int()) > 1
    assert multi.any()
    deltas = torch.stack([torch.where(c, (t - base).abs(), torch.tensor(-1.0)) for t, c in zip(thetas, cores)])
    winner = deltas.argmax(0)
    expect = torch.stack(thetas).gather(0, winner[None])[0]
    assert torch.equal(out[multi], expect[multi])
    # counts: k minus the entries lost to overlap
    for i, c in enumerate(cores):
        lost = int((c & multi & (winner != i)).sum())
        assert stats.transplanted[i] == int(c.sum()) - lost
    assert stats.overlap_entries == int(multi.sum())
    assert len(only) == 3


def test_overlap_mean_averages_owners():
    base = torch.zeros(4)
    thetas = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3.0, 6.0, 5.0, 8.0])]
    cores = [torch.tensor([True, True, False, False]), torch.tensor([False, True, True, False])]
    out, stats = cpi_fuse(base, thetas, cores, omega=0.0, overlap="mean")
    assert out.tolist() == [1.0, 4.0, 5.0, 0.0]
    assert stats.transplanted == [2, 2] and stats.overlap_entries == 1


def test_negative_zero_core_values_are_bit_exact():
    base = torch.ones(3)
    theta = torch.tensor([-0.0, 2.0, 3.0])
    out, _ = cpi_fuse(base, [theta], [torch.tensor([True, False, False])], omega=0.5)
    assert torch.equal(out[:1].view(torch.int32), theta[:1].view(torch.int32))


def test_max_delta_uses_theta0_not_the_backbone():
    theta0 = torch.zeros(2)
    backbone = torch.tensor([10.0, 10.0])
    thetas = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 9.0])]
    cores = [torch.tensor([True, True]), torch.tensor([True, True])]
    out, _ = cpi_fuse(backbone, thetas, cores, omega=0.5, theta0=theta0)
    assert out.tolist() == [2.0, 9.0]  # largest |theta_i - theta_0|
    out2, _ = cpi_fuse(backbone, thetas, cores, omega=0.5)  # measured against the backbone
    assert out2.tolist() == [1.0, 1.0]


def test_several_tasks_slerp_toward_their_mean():
    base = _t(64, seed=1)
    thetas = [_t(64, seed=2), _t(64, seed=3)]
    out, _ = cpi_fuse(base, thetas, [_none(base), _none(base)], omega=0.4)
    ref = slerp(0.4, base, (thetas[0] + thetas[1]) / 2)
    torch.testing.assert_close(out, ref)


def test_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError):
        cpi_fuse(x, [x], [_none(x)], omega=1.5)
    with pytest.raises(ValueError):
        cpi_fuse(x, [x], [_none(x)], omega=0.5, overlap="vote")
    with pytest.raises(ValueError):
        cpi_fuse(x, [x, x], [_none(x)], omega=0.5)


@pytest.mark.parametrize("overlap", ["max_delta", "mean"])
@pytest.mark.parametrize("omega", [0.0, 0.5, 1.0])
def test_chunked_fusion_is_the_whole_tensor_fusion(monkeypatch, overlap, omega):
    """Cores, overlaps and transplants are handled chunk by chunk: with 50-entry chunks
    (cores and overlaps straddle their borders, a short last chunk) every core entry and
    the statistics are those of one whole-tensor chunk, bit for bit, and the SLERP of
    the rest agrees to bf16 rounding (its norms are summed in another order)."""
    from cpift_merge.core import fusion

    base = _t(37, 29, seed=4).to(torch.bfloat16)
    thetas = [(base.float() + _t(37, 29, seed=20 + i, scale=0.05)).to(torch.bfloat16) for i in range(3)]
    g = torch.Generator().manual_seed(6)
    cores = [torch.rand(37, 29, generator=g) < 0.08 for _ in range(3)]
    whole, s1 = cpi_fuse(base, thetas, cores, omega=omega, overlap=overlap)
    monkeypatch.setattr(fusion, "CHUNK", 50)
    chunked, s2 = cpi_fuse(base, thetas, cores, omega=omega, overlap=overlap)
    assert s1 == s2 and s2.overlap_entries > 0
    any_core = cores[0] | cores[1] | cores[2]
    assert torch.equal(chunked[any_core].view(torch.int16), whole[any_core].view(torch.int16))
    if omega in (0.0, 1.0):
        assert torch.equal(chunked.view(torch.int16), whole.view(torch.int16))
    else:
        torch.testing.assert_close(chunked.float(), whole.float(), rtol=8e-3, atol=1e-6)
    expect_free = base if omega == 0.0 else (sum(t.float() for t in thetas) / 3).to(torch.bfloat16)
    if omega != 0.5:
        assert torch.equal(chunked[~any_core].view(torch.int16), expect_free[~any_core].view(torch.int16))


# ---------------------------------------------------------------- fused loops (Numba)


def _close(fast: torch.Tensor, slow: torch.Tensor) -> None:
    """The SLERP of the non-core entries on both paths: the same but for the last bits of
    its coefficients (its norms summed in another order), so within float32 (bfloat16)
    rounding of the coefficients."""
    if fast.dtype == torch.float32:
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(fast.float(), slow.float(), rtol=8e-3, atol=1e-5)


def _both_paths(monkeypatch, fn):
    """``fn()`` on the torch path (``CPIFT_FUSED=0``) and on the fused one."""
    pytest.importorskip("numba")
    from cpift_merge.core import fused

    monkeypatch.setenv("CPIFT_FUSED", "0")
    assert not fused.available()
    slow = fn()
    monkeypatch.setenv("CPIFT_FUSED", "1")
    assert fused.available()
    return slow, fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("omega", [0.3, 0.5])
@pytest.mark.parametrize("overlap", ["max_delta", "mean"])
def test_fused_loops_give_the_torch_paths_fusion(monkeypatch, dtype, omega, overlap):
    """With given cores, chunks of 50 entries (cores, overlaps and the loops' parts straddle
    chunk borders): the fused loops write every core entry and the tasks' mean bit for bit
    as the torch ops do, with the same statistics; the SLERP of the rest (its norms summed
    in float64 instead of BLAS float32) agrees to the rounding of its coefficients."""
    from cpift_merge.core import fusion

    monkeypatch.setattr(fusion, "CHUNK", 50)
    base = _t(37, 29, seed=4).to(dtype)
    thetas = [(base.float() + _t(37, 29, seed=20 + i, scale=0.05)).to(dtype) for i in range(3)]
    g = torch.Generator().manual_seed(6)
    cores = [torch.rand(37, 29, generator=g) < 0.08 for _ in range(3)]
    (slow, s1), (fast, s2) = _both_paths(
        monkeypatch, lambda: cpi_fuse(base, thetas, cores, omega=omega, overlap=overlap)
    )
    any_core = cores[0] | cores[1] | cores[2]
    assert s1 == s2 and s2.overlap_entries > 0
    assert fast.dtype == dtype and torch.equal(fast[any_core], slow[any_core])
    _close(fast, slow)
    # omega = 1 takes the torch path on both sides: the mean itself, bit for bit
    mean = (sum(t.float() for t in thetas) / 3).to(dtype)
    assert torch.equal(cpi_fuse(base, thetas, cores, omega=1.0)[0][~any_core], mean[~any_core])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cut_takes_the_torch_cuts_cores_and_ties(monkeypatch, dtype):
    """A threshold cut with ties (|Δ| from a few values, a tie quota spread over chunks):
    the fused loop finds, per chunk, the same core entries and |Δ| there as the torch
    path's compare, takes the same tied entries (the first ones in flat order) and leaves
    the same quota; the fused result does not depend on the thread count."""
    from cpift_merge.core import fusion, topk

    monkeypatch.setattr(fusion, "CHUNK", 64)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, generator=g).to(dtype)
    steps = torch.tensor([0.0, 0.5, 1.0, 1.5])
    thetas = [(base.float() + steps[torch.randint(0, 4, (300,), generator=g)]).to(dtype) for _ in range(2)]
    keys = [topk.magnitude_keys(t, base).view(torch.int32).reshape(-1) for t in thetas]
    key = int(torch.mode(keys[0][keys[0] > 0]).values)  # a |Δ| that many entries share
    counts = [int((k == key).sum()) for k in keys]
    assert min(counts) >= 4
    ties = [min(7, c - 1) for c in counts]  # some tied entries taken, not all

    def run():
        core_of = fusion.ThresholdCores([key, key], ties)
        out, stats = fusion.fuse_stream(base, thetas, core_of, omega=0.4, with_delta=True)
        return out, stats, core_of.sizes, core_of.left, core_of.core

    slow, fast = _both_paths(monkeypatch, run)
    assert slow[1] == fast[1] and slow[2] == fast[2] and slow[3] == fast[3]
    above = [int((k > key).sum()) for k in keys]
    assert slow[3] == [0, 0] and slow[2] == [a + t for a, t in zip(above, ties)]
    # each task's core: the entries above the key and its first tied ones in flat order
    cores = [(k > key) | ((k == key) & ((k == key).cumsum(0) <= t)) for k, t in zip(keys, ties)]
    d = [(t.float() - base.float()).abs().double() for t in thetas]
    want = [[float(x[c].sum()), float((x[c] ** 2).sum())] for x, c in zip(d, cores)]
    for got in (slow[4], fast[4]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-12, atol=0)
    core = cores[0] | cores[1]
    assert torch.equal(fast[0][core], slow[0][core]) and not torch.equal(fast[0][~core], base[~core])
    assert torch.equal(fast[0][cores[0] & ~cores[1]], thetas[0][cores[0] & ~cores[1]])
    _close(fast[0], slow[0])
    # the same cores given instead of cut in the loop: the same fusion, bit for bit
    given, stats = cpi_fuse(base, thetas, cores, omega=0.4)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(given.view(bits), fast[0].view(bits))
    assert stats == fast[1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, fast[0])


def test_fused_warm_up_loads_the_loops(monkeypatch):
    """``warm_up`` runs, in a thread, the loops a merge with cores cut in the loop or
    given will run (no error for either dtype; an error is kept on the thread); without
    tasks it starts nothing; ``CPIFT_FUSED=0`` turns the fused path off."""
    pytest.importorskip("numba")
    from cpift_merge.core import fused, fused_loops

    monkeypatch.setenv("CPIFT_FUSED", "1")
    for cut, loop in ((True, fused_loops.mean_cut), (False, fused_loops.gather)):
        thread = fused.warm_up(2, cut=cut)
        thread.join(timeout=120)
        assert not thread.is_alive() and thread.error is None and fused.available()
        assert len(loop.signatures) >= 2 and fused_loops.scatter.signatures  # float32 and bfloat16
    monkeypatch.setattr(fused, "interpolate", lambda *a: 1 / 0)
    thread = fused.warm_up(2, [torch.float32])
    thread.join(timeout=120)
    assert isinstance(thread.error, ZeroDivisionError)
    assert fused.warm_up(0) is None
    monkeypatch.setenv("CPIFT_FUSED", "0")
    assert not fused.available()


def test_fused_loops_round_to_bfloat16_as_torch_does():
    """The loops store a float32 result into bfloat16 as torch does (nearest, ties to even):
    the mean of two bfloat16 values one ulp apart is an exact tie; of three, anything."""
    pytest.importorskip("numba")
    from cpift_merge.core import fused

    assert fused.available()
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4099, generator=g).to(torch.bfloat16)
    b = (a.view(torch.int16) + 1).view(torch.bfloat16)  # one ulp away: their mean is a tie
    c = torch.randn(4099, generator=g).to(torch.bfloat16)
    for ts in ([a, b], [a, b, c]):
        out = torch.empty_like(a)
        fused.mean_cut(a, ts, out, fused.Finder(len(ts), a.numel()))
        want = (sum(t.float() for t in ts) / len(ts)).to(torch.bfloat16)
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    y = c.clone()
    fused.interpolate(a, y, 0.3, 0.7)
    want = (a.float() * 0.3 + c.float() * 0.7).to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
