"""Pure math: exact-k selection and its tie rule, bit packing, Jaccard, grouping."""

import pytest
import torch

from cpift_merge.core import groups, masks, topk


def brute_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: sort by (value desc, index asc) with a stable sort."""
    order = torch.sort(-values.to(torch.float64), stable=True).indices
    out = torch.zeros(values.numel(), dtype=torch.bool)
    out[order[:k]] = True
    return out


@pytest.mark.parametrize("k", [0, 1, 7, 100, 999, 1000])
def test_exact_top_k_matches_stable_sort(k):
    g = torch.Generator().manual_seed(k)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    keys = topk.magnitude_keys(a, b)
    got = topk.exact_top_k(keys, k)
    assert int(got.sum()) == k
    assert torch.equal(got, brute_top_k((a - b).abs(), k))


def test_ties_broken_by_lower_index():
    # 10 entries, all |delta| = 1 except two larger ones
    theta0 = torch.zeros(10)
    theta = torch.ones(10)
    theta[7] = 5.0
    theta[2] = 3.0
    mask = topk.exact_top_k(topk.magnitude_keys(theta, theta0), 5)
    assert mask.nonzero().reshape(-1).tolist() == [0, 1, 2, 3, 7]


def test_ties_across_tensors_follow_stream_order():
    """Global scope: equal |delta| in several tensors; earlier tensors win."""
    tensors = [torch.full((4,), 2.0), torch.full((3,), 2.0), torch.tensor([9.0, 2.0])]
    zeros = [torch.zeros_like(t) for t in tensors]
    finder = topk.ThresholdFinder(k=6)
    keys = [topk.magnitude_keys(t, z) for t, z in zip(tensors, zeros)]
    for kk in keys:
        finder.add_high(kk)
    finder.end_high()
    for kk in keys:
        finder.add_low(kk)
    th = finder.end_low()
    assert th.value == 2.0 and th.ties == 5  # 9.0 is above; 5 of the eight 2.0s
    quotas = topk.tie_quotas(th, [int((kk == th.key).sum()) for kk in keys])
    assert quotas == [4, 1, 0]  # ties go to the earlier tensors
    got = [topk.cut_mask(kk, th.key, q).tolist() for kk, q in zip(keys, quotas)]
    assert got == [[True] * 4, [True, False, False], [True, False]]
    assert sum(map(sum, got)) == 6


@pytest.mark.parametrize("ties", [0, 1, 3, 100])
def test_cut_indices_are_the_cut_masks_entries(ties):
    """The kernel's cut as sorted indices (NumPy on the CPU, torch on an accelerator) is
    the mask's nonzero entries, ties taken by lower index."""
    g = torch.Generator().manual_seed(9)
    values = torch.randint(0, 6, (500,), generator=g).float()  # many ties at every key
    keys = topk.magnitude_keys(values, torch.zeros(500))
    key = int(topk.magnitude_keys(torch.tensor([3.0]), torch.zeros(1))[0])
    want = topk.cut_mask(keys, key, ties).nonzero().reshape(-1)
    took = min(ties, int((keys == key).sum()))
    flags = torch.empty(500, dtype=torch.bool)
    for cut in (topk.cut_indices, topk._cut_indices_numpy, topk._cut_indices_torch):
        for buf in (None, flags):
            got, n = cut(keys, key, ties, buf)
            assert got.dtype == torch.int64 and torch.equal(got, want) and n == took, (cut, buf)


def test_global_threshold_equals_concatenated_top_k():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, generator=g) * s for n, s in [(500, 1.0), (300, 0.1), (1200, 3.0)]]
    base = [torch.zeros_like(p) for p in parts]
    k = topk.budget(0.037, 2000)
    finder = topk.ThresholdFinder(k)
    keys = [topk.magnitude_keys(p, b) for p, b in zip(parts, base)]
    for kk in keys:
        finder.add_high(kk)
    finder.end_high()
    for kk in keys:
        finder.add_low(kk)
    th = finder.end_low()
    quotas = topk.tie_quotas(th, [int((kk == th.key).sum()) for kk in keys])
    got = torch.cat([topk.cut_mask(kk, th.key, q) for kk, q in zip(keys, quotas)])
    assert torch.equal(got, brute_top_k(torch.cat(parts).abs(), k))


def test_zero_deltas_and_full_density():
    z = torch.zeros(16)
    assert int(topk.exact_top_k(topk.magnitude_keys(z, z), 16).sum()) == 16
    assert topk.exact_top_k(topk.magnitude_keys(z, z), 3).nonzero().reshape(-1).tolist() == [0, 1, 2]


def test_negative_zero_and_nonfinite():
    a = torch.tensor([-0.0, 0.0, -1.0])
    keys = topk.magnitude_keys(a, torch.zeros(3))
    assert (keys >= 0).all()
    with pytest.raises(ValueError):
        topk.magnitude_keys(torch.tensor([float("nan")]), torch.zeros(1))
    with pytest.raises(ValueError):
        topk.magnitude_keys(torch.tensor([float("inf")]), torch.zeros(1))


def test_budget_is_floor_of_the_decimal_density():
    assert topk.budget(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996 in binary
    assert topk.budget(0.01, 134515008) == 1345150
    assert topk.budget(0.0, 10) == 0 and topk.budget(1.0, 10) == 10
    assert topk.budget(0.15, 7) == 1
    with pytest.raises(ValueError):
        topk.budget(1.5, 10)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1000, 4097])
@pytest.mark.parametrize("p", [0.0, 0.01, 0.3, 1.0])
def test_bit_packing_round_trip(n, p):
    g = torch.Generator().manual_seed(n)
    m = torch.rand(n, generator=g) < p
    packed = masks.pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(masks.unpack_bits(packed, n), m)
    enc = masks.encode(m)
    assert torch.equal(masks.decode(enc, n), m)
    # never more than 1 bit per entry, rounded up to the byte
    assert enc.numel() * enc.element_size() <= (n + 7) // 8


def test_encoding_picks_sparse_when_smaller():
    m = torch.zeros(10_000, dtype=torch.bool)
    m[[5, 500, 9999]] = True
    enc = masks.encode(m)
    assert enc.dtype == torch.int32 and enc.tolist() == [5, 500, 9999]
    dense = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) < 0.5
    assert masks.encode(dense).dtype == torch.uint8


def test_bit_layout_is_little_endian():
    m = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert masks.pack_bits(m).tolist() == [1, 2]
    with pytest.raises(ValueError):
        masks.unpack_bits(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        masks.decode(torch.tensor([0, 12], dtype=torch.int32), 10)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000])
def test_mask_count_without_decoding(n):
    g = torch.Generator().manual_seed(n)
    for p in (0.0, 0.003, 0.5, 1.0):
        m = torch.rand(n, generator=g) < p
        for enc in (masks.encode(m), masks.pack_bits(m), m.nonzero().reshape(-1).to(torch.int32)):
            assert masks.count(enc, n) == int(m.sum())


def test_mask_count_refuses_what_encode_cannot_write():
    with pytest.raises(ValueError, match="bytes"):
        masks.count(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="past its last entry"):
        masks.count(torch.tensor([0, 0b10], dtype=torch.uint8), 9)  # bit 9 of 9 entries
    for bad in ([3, 3], [4, 2], [-1, 2], [2, 10]):
        with pytest.raises(ValueError, match="increasing"):
            masks.count(torch.tensor(bad, dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="dtype"):
        masks.count(torch.zeros(2, dtype=torch.float32), 10)


def test_jaccard_on_hand_made_masks():
    a = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.bool)
    c = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert groups.jaccard(a, b) == pytest.approx(2 / 4)
    assert groups.jaccard(a, c) == 0.0
    inter = groups.pairwise_intersections([a, b, c])
    assert inter.tolist() == [[3, 2, 0], [2, 3, 0], [0, 0, 2]]
    jac = groups.jaccard_from_counts([3, 3, 2], inter.tolist())
    assert jac[0][1] == pytest.approx(0.5) and jac[0][2] == 0.0 and jac[2][2] == 1.0
    empty = groups.jaccard_from_counts([0, 0], [[0, 0], [0, 0]])
    assert empty[0][1] == 0.0


def test_connected_components_are_transitive():
    names = ["a", "b", "c", "d", "e"]
    s = [[1.0] * 5 for _ in range(5)]
    for i in range(5):
        for j in range(5):
            if i != j:
                s[i][j] = 0.0
    s[0][1] = s[1][0] = 0.3  # a-b
    s[1][2] = s[2][1] = 0.25  # b-c  -> a, b, c together through b
    s[3][4] = s[4][3] = 0.05  # d-e below tau
    assert groups.connected_groups(names, s, 0.2) == [["a", "b", "c"], ["d"], ["e"]]
    assert groups.connected_groups(names, s, 0.0) == [names]
    assert groups.connected_groups(names, s, 1.0) == [[n] for n in names]
    with pytest.raises(ValueError):
        groups.connected_groups(names, s, 1.2)


def test_stage_order_random_is_seeded_and_given_is_respected():
    stages = [["a"], ["b", "c"], ["d"], ["e"]]
    r1 = groups.order_groups(stages, "random", seed=7)
    assert r1 == groups.order_groups(stages, "random", seed=7)
    assert sorted(map(tuple, r1)) == sorted(map(tuple, stages))
    assert any(groups.order_groups(stages, "random", seed=s) != stages for s in range(5))
    given = groups.order_groups(stages, "given", given=["d", "c", "e", "b", "a"])
    assert given == [["d"], ["c", "b"], ["e"], ["a"]]
    with pytest.raises(ValueError):
        groups.order_groups(stages, "given", given=["a", "b"])
    with pytest.raises(ValueError):
        groups.order_groups(stages, "sideways")


def test_localization_on_hand_made_deltas(monkeypatch):
    from cpift_merge.core import localization

    monkeypatch.setattr(localization, "CHUNK", 7)  # several chunks and a short last one
    core = torch.zeros(100, dtype=torch.bool)
    core[:5] = True
    peaked = torch.zeros(100)
    peaked[:5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # the core holds all of Δ
    sums = localization.delta_sums(peaked, core)
    assert sums == (15.0, 15.0, 55.0, 55.0)
    got = localization.shares(sums, 5, 100)
    assert got["core_share_l1"] == got["core_share_l2"] == 1.0 and got["l2_ratio"] == 20.0
    flat = torch.full((100,), 0.5)  # Δ flat: any core holds what a random set holds
    got = localization.shares(localization.delta_sums(flat, core), 5, 100)
    assert got["core_share_l1"] == pytest.approx(0.05) and got["l2_ratio"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    d = torch.rand(1000, generator=g)
    m = torch.rand(1000, generator=g) < 0.1
    c1, t1, c2, t2 = localization.delta_sums(d, m)
    dd = d.double()
    assert (c1, t1) == (pytest.approx(float(dd[m].sum())), pytest.approx(float(dd.sum())))
    assert (c2, t2) == (pytest.approx(float((dd[m] ** 2).sum())), pytest.approx(float((dd**2).sum())))
    assert localization.add_sums([(1, 2, 3, 4), (1, 1, 1, 1)]) == (2.0, 3.0, 4.0, 5.0)
    assert localization.shares((0.0, 0.0, 0.0, 0.0), 0, 0)["l2_ratio"] == 0.0


def test_core_scores_on_hand_made_deltas():
    """relative and fisher keys rank entries by |Δ|/(|θ0|+1e-8) and Δ²·F; delta is |Δ|."""
    theta0 = torch.tensor([1.0, 0.01, -2.0, 0.5, 0.0, 4.0])
    delta = torch.tensor([0.5, 0.02, 0.3, 0.1, 0.0, 1.0])  # |Δ|, as magnitude_keys leaves it
    fisher = torch.tensor([0.1, 10.0, 1.0, 0.0, 5.0, -0.0])
    k2 = lambda keys: set(torch.nonzero(topk.exact_top_k(keys, 2)).reshape(-1).tolist())  # noqa: E731
    assert k2(topk.score_keys(delta.clone(), "delta")) == {0, 5}  # by |Δ|: 1.0, 0.5
    assert k2(topk.score_keys(delta.clone(), "relative", theta0=theta0)) == {0, 1}  # 0.5, 2.0
    # Δ²·F: 0.025, 0.004, 0.09, 0, 0, -0 -> entries 2 and 0; the -0.0 Fisher entry is a zero key
    keys = topk.score_keys(delta.clone(), "fisher", fisher=fisher)
    assert k2(keys) == {0, 2} and bool((keys >= 0).all())
    assert torch.equal(keys.view(torch.float32), (delta * delta * fisher).abs())
    d = delta.clone()
    topk.score_keys(d, "relative", theta0=theta0)
    assert torch.equal(d, delta)  # |Δ| is left for the localization figures
    for bad, match in [
        ({"score": "fisher", "fisher": -fisher - 1}, "non-negative"),
        ({"score": "fisher", "fisher": torch.full((6,), float("nan"))}, "finite"),
        ({"score": "fisher"}, "needs the Fisher tensor"),
        ({"score": "relative", "theta0": theta0[:3]}, "3 entries for a tensor of 6"),
        ({"score": "magnitude"}, "score must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            topk.score_keys(delta.clone(), **bad)


@pytest.mark.parametrize("density", [0.001, 0.3])  # indices win / packed bits win
def test_mask_parts_encode_like_the_whole_mask(density):
    from cpift_merge.core.masks import MaskParts, encode

    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(1003, generator=gen) < density
    parts = MaskParts(mask.numel())
    for start in range(0, 1003, 48):
        parts.add(mask[start : start + 48])
    got, want = parts.encode(), encode(mask)
    assert got.dtype == want.dtype and torch.equal(got, want) and parts.count == int(mask.sum())
    bad = MaskParts(20)
    bad.add(mask[:5])
    with pytest.raises(ValueError, match="multiple of 8"):
        bad.add(mask[5:20])
