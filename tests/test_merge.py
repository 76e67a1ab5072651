"""End-to-end: region files and real mergekit merges with `cpi` on tiny Llamas."""

import json
import os
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cpift_merge.cli import main
from cpift_merge.mergekit import method
from cpift_merge.mergekit import recipe as cmerge
from cpift_merge.storage.checkpoint import Checkpoint
from cpift_merge.storage.regions import compute_from_paths, load_regions

OPTS = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache"))


def recipe(tmp_path, name="r.yml", **cfg):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"dtype": "float32", **cfg}))
    return str(path)


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_regions_round_trip_and_metadata(tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    rs = compute_from_paths(
        tiny_models["base"], {t: tiny_models[t] for t in "abc"}, out, density=0.02, tau=0.3, progress=False
    )
    meta = json.load(open(os.path.join(out, "regions.json")))
    for key in ("density", "scope", "D", "exclude", "jaccard", "tau", "groups", "order"):
        assert key in meta
    base = Checkpoint(tiny_models["base"])
    D = sum(i.numel for i in base.infos.values())
    assert meta["D"] == D
    for t in "abc":
        assert set(meta["tasks"][t]) >= {"k", "threshold", "fingerprint"}
        assert rs.k(t) == int(0.02 * D)
        ms = rs.masks(t)
        assert all(m.dtype == torch.bool and list(m.shape) == rs.shape(n) for n, m in ms.items())
        assert sum(int(m.sum()) for m in ms.values()) == rs.k(t)
        # the masks are the exact global top-k of |delta|
        ck = Checkpoint(tiny_models[t])
        d = torch.cat([(ck.get(n) - base.get(n)).abs().reshape(-1) for n in rs.tensor_names])
        thr = meta["tasks"][t]["threshold"]
        got = torch.cat([ms[n].reshape(-1) for n in rs.tensor_names])
        assert bool((d[got] >= thr).all()) and bool((d[~got] <= thr).all())
        # fingerprint through slices equals the one from whole tensors
        assert ck.fingerprint(rs.tensor_names) == meta["tasks"][t]["fingerprint"]
        # at most 1 bit per parameter of mask data
        size = os.path.getsize(os.path.join(out, meta["tasks"][t]["mask_file"]))
        header = int.from_bytes(open(os.path.join(out, meta["tasks"][t]["mask_file"]), "rb").read(8), "little")
        assert size - 8 - header <= D / 8 + len(rs.tensor_names)
    a, b = rs.masks("a"), rs.masks("b")
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    assert rs.jaccard("a", b="b") == pytest.approx(inter / (rs.k("a") + rs.k("b") - inter))
    # random variants barely overlap: at tau 0.3 every task is its own group
    assert sorted(map(tuple, rs.groups)) == [("a",), ("b",), ("c",)]


def test_tensor_scope_and_exclude(tiny_models, tmp_path):
    rs = compute_from_paths(
        tiny_models["base"],
        {"a": tiny_models["a"]},
        str(tmp_path / "reg"),
        density=0.1,
        scope="tensor",
        exclude=["norm"],
        progress=False,
    )
    assert not any("norm" in n for n in rs.tensor_names)
    for n in rs.tensor_names:
        numel = torch.Size(rs.shape(n)).numel()
        assert int(rs.mask("a", n).sum()) == int(0.1 * numel)


def test_sharded_checkpoint_gives_same_regions(tiny_models, make_variant, tmp_path):
    sharded = make_variant("sharded", seed=100, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    r1 = compute_from_paths(
        tiny_models["base"], {"a": tiny_models["a"]}, str(tmp_path / "r1"), density=0.05, progress=False
    )
    r2 = compute_from_paths(tiny_models["base"], {"a": sharded}, str(tmp_path / "r2"), density=0.05, progress=False)
    for n in r1.tensor_names:
        assert torch.equal(r1.mask("a", n), r2.mask("a", n))


def test_density_zero_one_task_equals_mergekit_slerp(tiny_models, tmp_path):
    base, a = tiny_models["base"], tiny_models["a"]
    cpi = cmerge.run(
        recipe(
            tmp_path,
            "cpi.yml",
            merge_method="cpi",
            base_model=base,
            models=[{"model": a}],
            parameters={"density": 0.0, "omega": 0.3},
        ),
        str(tmp_path / "cpi"),
        OPTS,
    )
    sl = cmerge.run(
        recipe(
            tmp_path,
            "slerp.yml",
            merge_method="slerp",
            base_model=base,
            models=[{"model": base}, {"model": a}],
            parameters={"t": 0.3},
        ),
        str(tmp_path / "slerp"),
        OPTS,
    )
    w1, w2 = weights(cpi), weights(sl)
    assert w1.keys() == w2.keys()
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overlap", ["max_delta", "mean"])
def test_invariants_with_region_file(tiny_models, tmp_path, overlap):
    tasks = {t: tiny_models[t] for t in "abc"}
    rs = compute_from_paths(tiny_models["base"], tasks, str(tmp_path / "reg"), density=0.05, progress=False)
    out = cmerge.run(
        recipe(
            tmp_path,
            merge_method="cpi",
            base_model=tiny_models["base"],
            models=[{"model": p} for p in tasks.values()],
            parameters={"omega": 0.0, "regions": rs.path, "overlap": overlap},
        ),
        str(tmp_path / "out"),
        OPTS,
    )
    merged = weights(out)
    base = weights(tiny_models["base"])
    thetas = {t: weights(p) for t, p in tasks.items()}
    stats = json.load(open(os.path.join(out, "cpi_stats.json")))
    lost = {t: 0 for t in tasks}
    for n in rs.tensor_names:
        cores = {t: rs.mask(t, n) for t in tasks}
        owners = sum(c.int() for c in cores.values())
        free = owners == 0
        assert torch.equal(merged[n][free], base[n][free])  # omega = 0: bit for bit
        for t, c in cores.items():
            single = c & (owners == 1)
            assert torch.equal(merged[n][single], thetas[t][n][single])  # bit for bit
        multi = owners > 1
        if overlap == "max_delta":
            ds = torch.stack([torch.where(cores[t], (thetas[t][n] - base[n]).abs(), torch.tensor(-1.0)) for t in tasks])
            win = ds.argmax(0)
            for i, t in enumerate(tasks):
                assert torch.equal(merged[n][multi & (win == i)], thetas[t][n][multi & (win == i)])
                lost[t] += int((cores[t] & multi & (win != i)).sum())
        else:
            mean = sum(torch.where(cores[t], thetas[t][n], 0.0) for t in tasks) / owners.clamp(min=1)
            torch.testing.assert_close(merged[n][multi], mean[multi])
    for t in tasks:
        assert stats["transplanted"][t] == rs.k(t) - lost[t]
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_global_without_regions_matches_precomputed(tiny_models, tmp_path):
    base = tiny_models["base"]
    models = [{"model": tiny_models[t]} for t in "ab"]
    params = {"omega": 0.6, "density": 0.04}
    o1 = cmerge.run(
        recipe(tmp_path, "g.yml", merge_method="cpi", base_model=base, models=models, parameters=params),
        str(tmp_path / "o1"),
        OPTS,
    )
    rs = compute_from_paths(
        base, {"a": tiny_models["a"], "b": tiny_models["b"]}, str(tmp_path / "reg"), density=0.04, progress=False
    )
    o2 = cmerge.run(
        recipe(
            tmp_path,
            "p.yml",
            merge_method="cpi",
            base_model=base,
            models=models,
            parameters={**params, "regions": rs.path},
        ),
        str(tmp_path / "o2"),
        OPTS,
    )
    w1, w2 = weights(o1), weights(o2)
    for n in w1:
        assert torch.equal(w1[n], w2[n])
    stats = json.load(open(os.path.join(o1, "cpi_stats.json")))
    assert stats["scope"] == "global" and sum(stats["k"].values()) == rs.k("a") + rs.k("b")
    # the cores' shares of ‖Δ‖: found in the merge (o1) as in the region file (o2), to the
    # float32 rounding of the norms (the merge's totals come from the pre-pass, summed in
    # float64 by the fused loop when Numba is there, the region file's in float32 chunks)
    found = stats["localization"]
    copied = json.load(open(os.path.join(o2, "cpi_stats.json")))["localization"]
    assert copied == {t: rs.localization(t) for t in "ab"}
    for t in "ab":
        for key, value in rs.localization(t).items():
            assert found[tiny_models[t]][key] == pytest.approx(value, rel=1e-6), key


def test_a_cut_cached_without_norm_totals_still_merges(tiny_models, tmp_path, monkeypatch):
    """The pre-pass caches each tensor's ‖Δ‖₁ and ‖Δ‖₂² with its cut, so a merge from the
    cache sums only the cores' entries. Cuts cached before that carry no totals: the
    kernel then sums |Δ| itself, to the same weights and localization figures (to float32
    rounding; tensors in 40-entry chunks: the totals count once per tensor, not per chunk)."""
    from cpift_merge.core import fusion
    from cpift_merge.mergekit import prepass

    monkeypatch.setattr(fusion, "CHUNK", 40)
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prepass, "_CUTS", {})
    models = [{"model": tiny_models[t]} for t in "ab"]
    cfg = recipe(tmp_path, merge_method="cpi", base_model=tiny_models["base"], models=models,
                 parameters={"omega": 0.6, "density": 0.04})  # fmt: skip
    o1 = cmerge.run(cfg, str(tmp_path / "o1"), OPTS)
    cuts = os.listdir(tmp_path / "cache" / "cuts")
    assert len(cuts) == 1
    path = tmp_path / "cache" / "cuts" / cuts[0]
    data = json.loads(path.read_text())
    names = Checkpoint(tiny_models["base"]).infos
    assert sorted(data["totals"]) == ["t0", "t1"] and set(data["totals"]["t0"]) <= set(names)
    del data["totals"]
    path.write_text(json.dumps(data))
    monkeypatch.setattr(prepass, "_CUTS", {})
    o2 = cmerge.run(cfg, str(tmp_path / "o2"), OPTS)
    w1, w2 = weights(o1), weights(o2)
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    s1, s2 = (json.load(open(os.path.join(o, "cpi_stats.json")))["localization"] for o in (o1, o2))
    for model, loc in s1.items():
        for key, value in loc.items():
            assert s2[model][key] == pytest.approx(value, rel=1e-6), key  # float32 chunk sums


def test_region_localization_matches_a_direct_computation(tiny_models, tmp_path):
    """core_share_l1/l2 in regions.json against |Δ| summed over the whole model in
    float64, with the masks read back (the file sums float32 chunks: relative error
    ~1e-6 allowed); per-layer sums add up to the totals."""
    base = Checkpoint(tiny_models["base"])
    rs = compute_from_paths(
        tiny_models["base"],
        {"a": tiny_models["a"], "b": tiny_models["b"]},
        str(tmp_path / "r"),
        density=0.03,
        progress=False,
    )
    for t in "ab":
        ck = Checkpoint(tiny_models[t])
        c1 = t1 = c2 = t2 = 0.0
        for name in rs.tensor_names:
            d = (ck.get(name).double() - base.get(name).double()).abs().float().double()
            m = rs.mask(t, name)
            c1, t1 = c1 + float(d[m].sum()), t1 + float(d.sum())
            c2, t2 = c2 + float((d[m] ** 2).sum()), t2 + float((d**2).sum())
        loc = rs.localization(t)
        assert loc["core_share_l1"] == pytest.approx(c1 / t1, rel=1e-6)
        assert loc["core_share_l2"] == pytest.approx(c2 / t2, rel=1e-6)
        assert loc["random_share"] == rs.k(t) / rs.meta["D"] and loc["l2_ratio"] == pytest.approx(
            c2 / t2 / loc["random_share"]
        )
        assert 0 < loc["core_share_l1"] < loc["core_share_l2"] < 1  # the top of |Δ| weighs more in ‖Δ‖²
        per = rs.meta["delta_sums"][t]
        assert sum(v[3] for v in per.values()) == pytest.approx(t2, rel=1e-6)


def test_stock_run_merge_computes_global_prepass_in_kernel(tiny_models, tmp_path):
    """No cpift CLI involved: mergekit's run_merge alone, cpi registered by import."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    method.register()
    cfg = MergeConfiguration.model_validate(
        dict(
            merge_method="cpi",
            base_model=tiny_models["base"],
            dtype="float32",
            models=[{"model": tiny_models["a"]}],
            parameters={"omega": 0.0, "density": 0.05},
        )
    )
    run_merge(cfg, str(tmp_path / "out"), OPTS)
    merged, base, a = weights(str(tmp_path / "out")), weights(tiny_models["base"]), weights(tiny_models["a"])
    changed = sum(int((merged[n] != base[n]).sum()) for n in merged)
    from_a = sum(int(((merged[n] == a[n]) & (a[n] != base[n])).sum()) for n in merged)
    D = sum(v.numel() for v in base.values())
    assert changed == from_a == int(0.05 * D)


def test_tensor_scope_in_kernel(tiny_models, tmp_path):
    out = cmerge.run(
        recipe(
            tmp_path,
            merge_method="cpi",
            base_model=tiny_models["base"],
            models=[{"model": tiny_models["a"]}],
            parameters={"omega": 0.0, "density": 0.1, "scope": "tensor"},
        ),
        str(tmp_path / "out"),
        OPTS,
    )
    merged, base, a = weights(out), weights(tiny_models["base"]), weights(tiny_models["a"])
    for n in merged:
        moved = merged[n] != base[n]
        assert int(moved.sum()) == int(0.1 * merged[n].numel())
        assert torch.equal(merged[n][moved], a[n][moved])


def test_backbone_other_than_theta0_uses_recorded_reference(tiny_models, make_variant, tmp_path):
    """Pipeline case: regions from probes vs theta_0, merged into another backbone."""
    backbone = make_variant("staged", seed=7, scale=0.05)
    tasks = {t: tiny_models[t] for t in "ab"}
    rs = compute_from_paths(tiny_models["base"], tasks, str(tmp_path / "reg"), density=0.2, progress=False)
    out = cmerge.run(
        recipe(
            tmp_path,
            merge_method="cpi",
            base_model=backbone,
            models=[{"model": p, "parameters": {"task": t}} for t, p in tasks.items()],
            parameters={"omega": 0.0, "regions": rs.path},
        ),
        str(tmp_path / "out"),
        OPTS,
    )
    merged, theta0, bb = weights(out), weights(tiny_models["base"]), weights(backbone)
    th = {t: weights(p) for t, p in tasks.items()}
    some_overlap = 0
    for n in rs.tensor_names:
        ca, cb = rs.mask("a", n), rs.mask("b", n)
        both = ca & cb
        some_overlap += int(both.sum())
        da, db = (th["a"][n] - theta0[n]).abs(), (th["b"][n] - theta0[n]).abs()
        expect = torch.where(db > da, th["b"][n], th["a"][n])
        assert torch.equal(merged[n][both], expect[both])
        assert torch.equal(merged[n][~(ca | cb)], bb[n][~(ca | cb)])
    assert some_overlap > 0


def test_registration_is_idempotent_and_builtins_still_resolve():
    from mergekit.merge_methods import registry

    before = [m.spec.name for m in registry.registered_methods()]
    method.register()
    method.register()
    after = [m.spec.name for m in registry.registered_methods()]
    assert after.count("cpi") == 1 and len(after) == len(set(after))
    for name in ["linear", "slerp", "ties", "task_arithmetic", "dare_ties", "multislerp", "della"]:
        assert registry.get(name).spec.name == name
    assert set(before) <= set(after)


def test_region_api_refuses_unknown_task(tiny_models, tmp_path):
    from cpift_merge.errors import CpiftError

    rs = compute_from_paths(
        tiny_models["base"], {"a": tiny_models["a"]}, str(tmp_path / "reg"), density=0.01, progress=False
    )
    with pytest.raises(CpiftError, match="no task 'zz'"):
        rs.mask("zz", rs.tensor_names[0])
    assert load_regions(rs.path).tasks == ["a"]


@pytest.mark.parametrize("piece", [None, 40])
def test_global_ties_span_tensors_exactly(tiny_models, make_variant, tmp_path, monkeypatch, piece):
    """A variant that moved only the MLPs: most |delta| are 0, so the cut lands on a
    huge tie at 0 spread over many tensors; stream order must decide, exactly k (also
    when tensors are read in pieces of 40 entries and the ties split across pieces)."""
    from cpift_merge.storage import regions as reg

    if piece:
        monkeypatch.setattr(reg, "PIECE", piece)
    sparse = make_variant("mlp-only", seed=5, only="mlp")
    base = Checkpoint(tiny_models["base"])
    ck = Checkpoint(sparse)
    names = [n for n in base.names()]
    d = torch.cat([(ck.get(n) - base.get(n)).abs().reshape(-1) for n in names])
    moved = int((d > 0).sum())
    density = (moved + 1000) / d.numel()  # k reaches 1000 entries into the zeros
    rs = compute_from_paths(tiny_models["base"], {"s": sparse}, str(tmp_path / "reg"), density=density, progress=False)
    got = torch.cat([rs.mask("s", n).reshape(-1) for n in rs.tensor_names])
    order = torch.sort(-d.double(), stable=True).indices
    ref = torch.zeros_like(got)
    ref[order[: rs.k("s")]] = True
    assert rs.k("s") == moved + 1000 or rs.k("s") == int(density * d.numel())
    assert torch.equal(got, ref)
    assert rs.meta["tasks"]["s"]["threshold"] == 0.0


def test_global_merge_in_chunks_transplants_exactly_the_region_file_cores(
    tiny_models, make_variant, tmp_path, monkeypatch
):
    """The kernel finds global cores chunk by chunk while it reads the tensors: with
    chunks of 40 entries and a cut on a huge tie at |Δ| = 0 (split across chunks and
    tensors), an omega-0 merge keeps exactly the region file's cores of the task, and
    its cpi_stats count them."""
    from cpift_merge.core import fusion

    monkeypatch.setattr(fusion, "CHUNK", 40)
    sparse = make_variant("mlp-only", seed=5, only="mlp")
    base, ck = Checkpoint(tiny_models["base"]), Checkpoint(sparse)
    d = torch.cat([(ck.get(n) - base.get(n)).abs().reshape(-1) for n in base.names()])
    density = (int((d > 0).sum()) + 1000) / d.numel()
    rs = compute_from_paths(tiny_models["base"], {"s": sparse}, str(tmp_path / "reg"), density=density, progress=False)
    out = cmerge.run(
        recipe(
            tmp_path,
            merge_method="cpi",
            base_model=tiny_models["base"],
            models=[{"model": sparse}],
            parameters={"omega": 0.0, "density": density},
        ),
        str(tmp_path / "out"),
        OPTS,
    )
    merged = weights(out)
    for n in rs.tensor_names:
        core = rs.mask("s", n)
        assert torch.equal(merged[n][core], ck.get(n)[core]) and torch.equal(merged[n][~core], base.get(n)[~core])
    # per tensor, the kernel's cores have the region file's sizes (the ties split alike)
    sizes = {n: next(iter(method.STATS[n]["core_sizes"].values())) for n in rs.tensor_names}
    assert sizes == rs.meta["counts"]["s"] and sum(sizes.values()) == rs.k("s")


def test_works_with_slices_out_dtype_tokenizer_and_shards(tiny_lm, tmp_path):
    """mergekit features around the kernel: slices, out_dtype, tokenizer, sharded output."""
    import shutil

    from conftest import save_variant

    variants = {}
    for i, t in enumerate("ab"):
        variants[t] = save_variant(tiny_lm, str(tmp_path / t), seed=50 + i)
        for f in os.listdir(tiny_lm):
            if f.startswith("tokenizer") or f.endswith(".jinja") or f == "special_tokens_map.json":
                shutil.copy(os.path.join(tiny_lm, f), variants[t])
    cfg = {
        "merge_method": "cpi",
        "base_model": tiny_lm,
        "slices": [
            {
                "sources": [
                    {"model": tiny_lm, "layer_range": [0, 2]},
                    {"model": variants["a"], "layer_range": [0, 2]},
                    {"model": variants["b"], "layer_range": [0, 2]},
                ]
            }
        ],
        "parameters": {"omega": 0.5, "density": 0.05, "scope": "tensor"},
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "tokenizer": {"source": "base"},
    }
    opts = MergeOptions(quiet=True, write_model_card=False, out_shard_size=20_000, lazy_unpickle=True)
    out = cmerge.run(recipe(tmp_path, **cfg), str(tmp_path / "out"), opts)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits.float()).all()


# ------------------------------------------- pre-pass in a child process (cpift merge)


def cli_merge(config, out, *extra):

    return CliRunner().invoke(main, ["merge", "--quiet", "--no-copy-tokenizer", *extra, config, out])


def global_recipe(tmp_path, tiny_models, name="g.yml", **params):
    return recipe(
        tmp_path,
        name,
        merge_method="cpi",
        base_model=tiny_models["base"],
        models=[{"model": tiny_models[t]} for t in "abc"],
        parameters={"omega": 0.4, "density": 0.03, **params},
    )


def cut_files(cache):
    folder = os.path.join(cache, "cuts")
    return {f: json.load(open(os.path.join(folder, f))) for f in os.listdir(folder)}


def test_cli_merge_runs_the_prepass_in_a_child_with_the_same_result(children, tiny_models, tmp_path, monkeypatch):
    config = global_recipe(tmp_path, tiny_models)
    res = cli_merge(config, str(tmp_path / "bg"))
    assert res.exit_code == 0, res.output
    assert len(children) == 1 and "cpift_merge.mergekit.prepass" in children[0].args
    assert children[0].returncode == 0
    bg_cuts = cut_files(str(tmp_path / "cache"))
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache2"))
    from cpift_merge.mergekit import prepass

    prepass._CUTS.clear()  # in-process this time, from scratch
    monkeypatch.setattr(prepass, "BACKGROUND_MIN_BYTES", 1 << 62)
    inproc = cmerge.run(config, str(tmp_path / "fg"), OPTS)
    assert len(children) == 1
    assert cut_files(str(tmp_path / "cache2")) == bg_cuts
    w1, w2 = weights(str(tmp_path / "bg")), weights(inproc)
    assert w1.keys() == w2.keys()
    for n in w1:
        assert torch.equal(w1[n], w2[n]), n
    s1 = json.load(open(os.path.join(str(tmp_path / "bg"), "cpi_stats.json")))
    s2 = json.load(open(os.path.join(inproc, "cpi_stats.json")))
    assert s1["k"] == s2["k"] and s1["transplanted"] == s2["transplanted"]


def test_cli_merge_computes_in_process_when_the_child_dies(children, tiny_models, tmp_path, monkeypatch):
    import sys

    from cpift_merge.mergekit import prepass

    monkeypatch.setattr(prepass, "_child_command", lambda *a, **k: [sys.executable, "-c", "raise SystemExit(1)"])
    config = global_recipe(tmp_path, tiny_models, density=0.02)
    res = cli_merge(config, str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert len(children) == 1 and children[0].returncode == 1
    stats = json.load(open(os.path.join(str(tmp_path / "out"), "cpi_stats.json")))
    D = sum(v.numel() for v in weights(tiny_models["base"]).values())
    assert set(stats["k"].values()) == {int(0.02 * D)}


def test_cli_merge_stops_the_child_when_it_fails_first(children, tiny_models, tmp_path):
    config = global_recipe(tmp_path, tiny_models, omegaa=0.5)  # refused after the child starts
    res = cli_merge(config, str(tmp_path / "out"))
    assert res.exit_code == 2 and "omegaa" in res.output
    assert len(children) == 1  # the fixture checks it is no longer running
    assert not os.path.exists(str(tmp_path / "out"))


def test_cli_merge_starts_no_child_when_nothing_needs_one(children, tiny_models, tmp_path):
    for i, params in enumerate([{"scope": "tensor"}, {"density": 0.0}]):
        res = cli_merge(global_recipe(tmp_path, tiny_models, f"r{i}.yml", **params), str(tmp_path / f"o{i}"))
        assert res.exit_code == 0, res.output
    cached = global_recipe(tmp_path, tiny_models, "c.yml")
    assert cli_merge(cached, str(tmp_path / "c1")).exit_code == 0
    assert len(children) == 1
    assert cli_merge(cached, str(tmp_path / "c2")).exit_code == 0  # cut is cached now
    assert len(children) == 1


FORKING_CLI = """
import sys
from cpift_merge.mergekit import prepass
prepass.BACKGROUND_MIN_BYTES = 0  # tiny models: fork anyway
made = []
class Recorded(prepass._Forked):
    def __init__(self, body):
        super().__init__(body)
        made.append(self)
prepass._Forked = Recorded
assert "torch" not in sys.modules
from cpift_merge.cli import main
try:
    main(["merge", "--quiet", "--no-copy-tokenizer", *sys.argv[1:]])
finally:
    print("forked", [m.returncode for m in made], flush=True)
"""


def run_forking_cli(*args, cwd):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", FORKING_CLI, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=str(cwd)
    )


def test_real_cli_forks_the_prepass_with_the_same_result(tiny_models, tmp_path, monkeypatch):
    """A fresh `cpift merge` has not imported torch yet: it forks the pre-pass child."""
    config = global_recipe(tmp_path, tiny_models)
    proc = run_forking_cli(config, tmp_path / "fork", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forked [0]" in proc.stdout
    from cpift_merge.mergekit import prepass

    monkeypatch.setattr(prepass, "_CUTS", {})
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache2"))
    inproc = cmerge.run(config, str(tmp_path / "fg"), OPTS)
    assert cut_files(str(tmp_path / "cache2")) == cut_files(str(tmp_path / "cache"))
    w1, w2 = weights(str(tmp_path / "fork")), weights(inproc)
    for n in w2:
        assert torch.equal(w1[n], w2[n]), n


def test_region_report_shows_shares_and_warns_when_cores_do_not_concentrate(tiny_models, tmp_path):
    from safetensors.torch import save_file

    from cpift_merge.pipeline.report import region_report

    base = weights(tiny_models["base"])
    g = torch.Generator().manual_seed(1)
    for name, edit in (
        ("flat", lambda t: t + 0.01),  # the same |Δ| everywhere: a core is a random subset
        ("peaked", lambda t: t + (torch.rand(t.shape, generator=g) < 0.01) * 1.0 + 1e-6),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(open(os.path.join(tiny_models["base"], "config.json")).read())
        save_file({k: edit(v) for k, v in base.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    rs = compute_from_paths(
        tiny_models["base"],
        {"flat": str(tmp_path / "flat"), "peaked": str(tmp_path / "peaked")},
        str(tmp_path / "r"),
        density=0.01,
        progress=False,
    )
    assert rs.localization("flat")["l2_ratio"] == pytest.approx(1.0, rel=1e-3)
    assert rs.localization("peaked")["l2_ratio"] > 50
    text = region_report(rs)
    assert "core |Δ|₂²" in text and "x random" in text
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "task flat's core holds 1.0% of its |Δ|₂²" in warnings[0], text


def test_graft_models_bits_and_random_control(tiny_models, tmp_path):
    """core only: theta_0 outside the core, the fine-tune on it; core removed: the
    reverse; the random control has the core's count in every tensor, seeded."""
    from cpift_merge.errors import CpiftError
    from cpift_merge.mergekit.graft import graft, random_mask

    base, a = tiny_models["base"], tiny_models["a"]
    rs = compute_from_paths(base, {"a": a, "b": tiny_models["b"]}, str(tmp_path / "r"), density=0.05, progress=False)
    w0, wa = weights(base), weights(a)
    only = weights(graft(base, a, rs, "a", str(tmp_path / "only")))
    rest = weights(graft(base, a, rs, "a", str(tmp_path / "rest"), keep="rest"))
    rnd = weights(graft(base, a, rs, "a", str(tmp_path / "rnd"), mask="random", seed=3))
    moved = 0
    for name in w0:
        m = rs.mask("a", name) if rs.has_tensor(name) else torch.zeros(w0[name].shape, dtype=torch.bool)
        assert torch.equal(only[name][m], wa[name][m]) and torch.equal(only[name][~m], w0[name][~m]), name
        assert torch.equal(rest[name][m], w0[name][m]) and torch.equal(rest[name][~m], wa[name][~m]), name
        if rs.has_tensor(name):
            r = random_mask(rs, "a", name, 3)
            assert int(r.sum()) == rs.meta["counts"]["a"][name] and torch.equal(r, random_mask(rs, "a", name, 3))
            assert torch.equal(rnd[name][r], wa[name][r]) and torch.equal(rnd[name][~r], w0[name][~r])
            moved += int((r & ~m).sum())
    assert moved > 0  # the control is not the core
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "only")) is not None
    with pytest.raises(CpiftError, match="is not task a"):
        graft(base, tiny_models["b"], rs, "a", str(tmp_path / "wrong"))
    with pytest.raises(CpiftError, match="overlaps the input"):
        graft(base, a, rs, "a", a, overwrite=True)


@pytest.mark.parametrize("score", ["relative", "fisher"])
def test_region_scores_are_exact_top_k_of_the_score(tiny_models, tmp_path, score):
    """`cpift regions --score`: the masks are the global top-k of the score, the
    localization figures stay on |Δ|, the file records the score, and a recipe that
    asks for another score than its file is refused."""
    from safetensors.torch import save_file

    base = Checkpoint(tiny_models["base"])
    models = {t: tiny_models[t] for t in "ab"}
    fisher = None
    if score == "fisher":  # hand-made Fisher files: a seeded positive tensor per model tensor
        fisher = {}
        for i, t in enumerate(models):
            g = torch.Generator().manual_seed(i)
            f = {n: torch.rand(base.infos[n].shape, generator=g) for n in base.infos}
            fisher[t] = str(tmp_path / f"fisher_{t}.safetensors")
            save_file(f, fisher[t])
    out = str(tmp_path / "reg")
    res = CliRunner().invoke(
        main,
        ["regions", "--base", tiny_models["base"], *[f"--model={t}={p}" for t, p in models.items()],
         "--density", "0.02", "--score", score, *[f"--fisher={t}={p}" for t, p in (fisher or {}).items()],
         "--out", out, "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"score {score}" in res.output
    rs = load_regions(out)
    assert rs.score == score and rs.meta["score"] == score
    delta_rs = compute_from_paths(tiny_models["base"], models, str(tmp_path / "d"), density=0.02, progress=False)
    for t, path in models.items():
        ck = Checkpoint(path)
        names = rs.tensor_names
        d = torch.cat([(ck.get(n) - base.get(n)).abs().reshape(-1) for n in names])
        if score == "relative":
            s = d / (torch.cat([base.get(n).abs().reshape(-1) for n in names]) + 1e-8)
        else:
            f = Checkpoint(fisher[t])
            s = d * d * torch.cat([f.get(n).reshape(-1) for n in names])
        got = torch.cat([rs.mask(t, n).reshape(-1) for n in names])
        assert int(got.sum()) == rs.k(t) == delta_rs.k(t)
        assert float(s[got].min()) >= float(s[~got].max())  # exact top-k of the score
        # |Δ|-based localization of these cores, not of the score
        c2 = float((d[got].double() ** 2).sum() / (d.double() ** 2).sum())
        assert rs.localization(t)["core_share_l2"] == pytest.approx(c2, rel=1e-6)
        assert rs.meta["tasks"][t]["fisher" if score == "fisher" else "k"]
    # the cores differ from the |Δ| cores
    assert any(not torch.equal(rs.mask("a", n), delta_rs.mask("a", n)) for n in rs.tensor_names)
    # a recipe asking for another score is refused; a score without a region file too
    cfg = {"merge_method": "cpi", "base_model": tiny_models["base"], "models": [{"model": p} for p in models.values()]}
    for params, match in [
        ({"regions": out, "score": "delta"}, f"was cut by score {score} but the recipe asks for delta"),
        ({"score": score}, f"score {score} needs a region file"),
        ({"regions": out, "score": "l2"}, "score in parameters must be"),
    ]:
        r = CliRunner().invoke(main, ["merge", recipe(tmp_path, **cfg, parameters=params), str(tmp_path / "m")])
        assert r.exit_code == 2 and match in r.output, r.output
    ok = CliRunner().invoke(
        main, ["merge", recipe(tmp_path, **cfg, parameters={"regions": out, "score": score}), str(tmp_path / "m")]
    )
    assert ok.exit_code == 0, ok.output


def test_fisher_score_needs_fisher_files(tiny_models, tmp_path):
    res = CliRunner().invoke(
        main,
        ["regions", "--base", tiny_models["base"], f"--model=a={tiny_models['a']}", "--density", "0.02",
         "--score", "fisher", "--out", str(tmp_path / "r"), "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 2 and "no Fisher file" in res.output and "cpift probe --score fisher" in res.output
    assert not os.path.exists(tmp_path / "r")
    res = CliRunner().invoke(
        main,
        ["regions", "--base", tiny_models["base"], f"--model=a={tiny_models['a']}", "--density", "0.02",
         f"--fisher=a={tiny_models['a']}", "--out", str(tmp_path / "r"), "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 2 and "--fisher is read with --score fisher only" in res.output


@pytest.mark.parametrize("score", ["delta", "relative"])
def test_global_regions_read_in_pieces_are_the_same_regions(tiny_models, tmp_path, monkeypatch, score):
    """Global scope reads large tensors in pieces (memory bounded by the piece, not the
    tensor): with pieces of 40 entries (tensors span many, ties split across them) the
    masks, thresholds, counts, samples and fingerprints are those of whole-tensor reads,
    and the ‖Δ‖ sums agree to rounding."""
    from cpift_merge.storage import regions as reg

    tasks = {t: tiny_models[t] for t in "abc"}
    whole = compute_from_paths(tiny_models["base"], tasks, str(tmp_path / "whole"), density=0.03, progress=False,
                               score=score)  # fmt: skip
    monkeypatch.setattr(reg, "PIECE", 40)
    pieces = compute_from_paths(tiny_models["base"], tasks, str(tmp_path / "pieces"), density=0.03, progress=False,
                                score=score)  # fmt: skip
    m1, m2 = whole.meta, pieces.meta
    for key in ("counts", "samples", "intersections", "jaccard", "groups", "D"):
        assert m1[key] == m2[key], key
    for t in "abc":
        for key in ("k", "threshold", "fingerprint", "mask_sha256"):
            assert m1["tasks"][t][key] == m2["tasks"][t][key], (t, key)
        for name in whole.tensor_names:
            assert torch.equal(whole.mask(t, name), pieces.mask(t, name))
            assert m2["delta_sums"][t][name] == pytest.approx(m1["delta_sums"][t][name], rel=1e-6)


def _cut_on_the_zero_tie(tiny_models, make_variant):
    """Base, tasks ``a`` and ``s`` (only its MLPs changed), their tensors, and a k that
    reaches 1000 entries into the zeros of s's |Δ|: its cut lands on the tie at |Δ| = 0,
    across tensors."""
    paths = {"a": tiny_models["a"], "s": make_variant("mlp-only", seed=5, only="mlp")}
    base = Checkpoint(tiny_models["base"])
    tasks = {n: Checkpoint(p) for n, p in paths.items()}
    tensors = [base.infos[n] for n in base.names()]
    d = torch.cat([(tasks["s"].get(n) - base.get(n)).abs().reshape(-1) for n in base.names()])
    return base, tasks, tensors, int((d > 0).sum()) + 1000


@pytest.mark.parametrize("case", ["guess held", "guess missed", "too many keys kept", "a tensor the sample missed"])
def test_one_pass_cut_is_the_two_pass_cut(tiny_models, make_variant, monkeypatch, case):
    """The global cut guesses the threshold's bucket from a sample and keeps the keys around
    it in the first pass. Held: no second pass, the same thresholds and per-tensor ties as
    two passes; missed, or more distinct keys than it may keep: the second pass runs and
    the result is still the same. Task s's cut lands on the tie at |Δ| = 0, across tensors."""
    from cpift_merge.core import topk
    from cpift_merge.storage import regions as reg

    base, tasks, tensors, k = _cut_on_the_zero_tie(tiny_models, make_variant)

    def cut(guess):
        return reg._histogram_cut(base, tasks, tensors, k, False, {n: {} for n in ["__base__", *tasks]}, guess=guess)

    ref = cut(False)
    monkeypatch.setattr(reg, "SAMPLE_FRACTION", 1.0)  # a sample of everything: the guess is right
    monkeypatch.setattr(reg, "SPECULATE_SHARE", 0.0)  # and kept for every task
    monkeypatch.setattr(reg, "GUESS_MIN_ENTRIES", 0)  # tiny models too
    if case == "guess missed":
        monkeypatch.setattr(topk, "guess_window", lambda hist, k, margin=0.05: (0x7000, 0x7001))
    if case == "too many keys kept":
        monkeypatch.setattr(reg, "WINDOW_PAIRS", 2)
    if case == "a tensor the sample missed":  # its keys were not kept: pass 2 reads it alone
        guess = reg._guess_windows

        def partial(*args):
            windows, reach = guess(*args)
            reach["a"].discard(max(reach["a"], key=lambda t: base.infos[t].numel))
            return windows, reach

        monkeypatch.setattr(reg, "_guess_windows", partial)
    second = []
    stream = reg._stream

    def spy(*args, **kwargs):
        if (args[6] if len(args) > 6 else kwargs.get("wanted")) is not None:  # pass 2 names the tensors it wants
            second.append(1)
        return stream(*args, **kwargs)

    monkeypatch.setattr(reg, "_stream", spy)
    got = cut(True)
    assert ref[0]["s"].key == 0 and ref[0]["s"].ties > 0
    assert got == ref
    assert bool(second) == (case != "guess held")


@pytest.mark.parametrize("guess", [False, True])
def test_fused_prepass_gives_the_torch_prepass_cut(tiny_models, make_variant, monkeypatch, guess):
    """The pre-pass's first pass as one fused loop per piece (keys, histogram, norms and the
    guess's window) gives the torch ops' thresholds and per-tensor tie counts exactly, with
    or without a guess, and their ‖Δ‖ totals to float32 rounding (float64 sums now)."""
    pytest.importorskip("numba")
    from cpift_merge.storage import regions as reg

    base, tasks, tensors, k = _cut_on_the_zero_tie(tiny_models, make_variant)
    monkeypatch.setattr(reg, "SAMPLE_FRACTION", 1.0)
    monkeypatch.setattr(reg, "GUESS_MIN_ENTRIES", 0)
    monkeypatch.setattr(reg, "PIECE", 1000)  # several pieces per tensor

    def cut():
        totals = {}
        samples = {n: {} for n in ["__base__", *tasks]}
        thresholds, tied = reg._histogram_cut(base, tasks, tensors, k, False, samples, guess=guess, totals=totals)
        return thresholds, tied, totals, samples

    monkeypatch.setenv("CPIFT_FUSED", "0")
    slow = cut()
    monkeypatch.setenv("CPIFT_FUSED", "1")
    fast = cut()
    assert fast[0] == slow[0] and fast[1] == slow[1] and fast[3] == slow[3]
    assert slow[0]["s"].key == 0 and slow[0]["s"].ties > 0
    for n in tasks:
        assert fast[2][n].keys() == slow[2][n].keys()
        for t, sums in slow[2][n].items():
            assert fast[2][n][t] == pytest.approx(sums, rel=1e-6), (n, t)


def test_threshold_sample_reads_every_run(tiny_models, monkeypatch):
    """The guess's sample is each run's own entries: a read buffer reused for the next run
    must not leave every run holding the last one's values (which made guesses miss)."""
    from cpift_merge.storage import regions as reg
    from cpift_merge.storage.checkpoint import Scratch

    monkeypatch.setattr(reg, "SAMPLE_RUN", 7)
    base = Checkpoint(tiny_models["base"])
    name = max(base.names(), key=lambda n: base.infos[n].numel)
    runs = reg._sample_runs(base.infos[name].numel)
    flat = base.get(name).reshape(-1)
    assert len(runs) >= 10
    assert torch.equal(reg._sampled(base, name, runs, Scratch()), torch.cat([flat[a:b] for a, b in runs]))


def test_guess_window_brackets_the_sample_threshold():
    """The guessed buckets hold the sample's k-th largest key, widened by the margin."""
    from cpift_merge.core import topk

    keys = (torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 3).view(torch.int32)
    hist = torch.bincount(keys >> 16, minlength=topk.HIGH_BUCKETS)
    for k in (1, 50, 2000, 20_000, 199_999):
        lo, hi = topk.guess_window(hist, k)
        kth = int(keys.sort(descending=True).values[k - 1]) >> 16
        assert lo <= kth <= hi and (hi - lo < 64 or k > 190_000), (k, lo, kth, hi)  # near all: down to 0
        wider = topk.guess_window(hist, k, margin=0.5)
        assert wider[0] <= lo and wider[1] >= hi


@pytest.mark.parametrize("workers", [1, 3])
def test_global_cut_is_the_same_whatever_the_number_of_threads(
    tiny_models, make_variant, tmp_path, monkeypatch, workers
):
    """The global passes split the tensors into runs, one thread each, and add their counts:
    1 and 3 threads give the region file of 2 threads bit for bit, also when the cut lands
    on a tie spread over tensors of different runs."""
    from cpift_merge.storage import regions as reg

    tasks = {"a": tiny_models["a"], "s": make_variant("mlp-only", seed=5, only="mlp")}
    base, ck = Checkpoint(tiny_models["base"]), Checkpoint(tasks["s"])
    d = torch.cat([(ck.get(n) - base.get(n)).abs().reshape(-1) for n in base.names()])
    density = (int((d > 0).sum()) + 1000) / d.numel()  # k reaches 1000 entries into the zeros
    monkeypatch.setattr(reg, "_workers", lambda: 2)
    ref = compute_from_paths(tiny_models["base"], tasks, str(tmp_path / "two"), density=density, progress=False)
    monkeypatch.setattr(reg, "_workers", lambda: workers)
    got = compute_from_paths(tiny_models["base"], tasks, str(tmp_path / "other"), density=density, progress=False)
    assert ref.meta["tasks"]["s"]["threshold"] == 0.0  # the cut is on the tie at |Δ| = 0
    for key in ("counts", "samples", "intersections", "D"):
        assert ref.meta[key] == got.meta[key], key
    for t in tasks:
        for key in ("k", "threshold", "fingerprint", "mask_sha256"):
            assert ref.meta["tasks"][t][key] == got.meta["tasks"][t][key], (t, key)


@pytest.mark.parametrize(
    "user, spins",
    [({}, "0"), ({"OMP_WAIT_POLICY": "active"}, "30000000000"), ({"GOMP_SPINCOUNT": "300000"}, "300000")],
)
def test_streaming_commands_start_openmp_with_sleeping_threads(tiny_models, tmp_path, user, spins):
    """`cpift regions` (like `cpift merge`) loads torch's OpenMP runtime with
    OMP_WAIT_POLICY=PASSIVE, so its threads sleep between the chunked ops instead of
    spinning against other work on the same cores; a policy the user set wins. The
    runtime itself reports how long its threads spin before sleeping (OMP_DISPLAY_ENV):
    0 spins when passive; what the user set otherwise (300000 is OpenMP's own default)."""
    import re
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user, OMP_DISPLAY_ENV="VERBOSE")
    models = [f"--model={n}={tiny_models[n]}" for n in "ab"]
    cmd = [sys.executable, "-m", "cpift_merge", "regions", "--base", tiny_models["base"], *models]
    cmd += ["--density", "0.05", "--out", str(tmp_path / "regions"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "regions" / "regions.json").is_file()
    assert set(re.findall(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)) == {spins}


def test_passive_threads_only_for_streaming_commands_before_torch_loads(monkeypatch):
    from cpift_merge import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli._passive_threads("regions")  # torch is loaded in this process: too late to matter
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    cli._passive_threads("train")  # training is not a streaming command
    assert "OMP_WAIT_POLICY" not in os.environ
    cli._passive_threads("merge")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
