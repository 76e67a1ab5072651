"""MaskedUpdate: frozen entries stay bit-identical (torch.equal) under every condition
that moves an entry whose gradient is zero, and free entries still train."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaForCausalLM

from cpift_merge.training import freeze
from cpift_merge.training.freeze import MaskedUpdate, masks_from_regions, unwrap_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ------------------------------------------------------------------ helpers


def make_model(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).to(dtype)


def random_masks(model, density=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}


def batch(i: int, n: int = 4) -> torch.Tensor:
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(1000 + i))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_frozen(model, masks, before):
    for n, p in model.named_parameters():
        if n in masks:
            assert torch.equal(p.detach()[masks[n]], before[n][masks[n]]), f"frozen entries of {n} moved"


def frozen_moved(model, masks, before) -> int:
    return sum(
        int((p.detach()[masks[n]] != before[n][masks[n]]).sum()) for n, p in model.named_parameters() if n in masks
    )


def free_moved(model, masks, before) -> int:
    return sum(int((p.detach()[~masks[n]] != before[n][~masks[n]]).sum()) for n, p in model.named_parameters())


def train(model, opt, steps, start=0, clip=None, accum=1, autocast=False):
    for s in range(steps):
        for m in range(accum):
            x = batch(start + s * accum + m)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(x, labels=x).loss / accum
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def total_norm(grads) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


# -------------------------------------------------------- single process


def test_adamw_weight_decay_frozen_bit_identical():
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    before = snapshot(model)
    with MaskedUpdate(model, masks).attach(opt) as mu:
        assert mu.frozen_count == sum(int(m.sum()) for m in masks.values())
        train(model, opt, 4)
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


def test_zeroed_gradients_alone_are_not_enough():
    """Control: masking gradients without the step hooks lets weight decay move
    frozen entries, so the test above does test the step hooks."""
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    before = snapshot(model)
    mu = MaskedUpdate(model, masks).attach()  # gradient hooks only
    train(model, opt, 2)
    mu.detach()
    assert frozen_moved(model, masks, before) > 0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.1),
    ],
    ids=["adamw", "adam-amsgrad", "sgd-nesterov"],
)
def test_state_carried_over_from_free_phase(make_opt):
    model = make_model()
    masks = random_masks(model)
    opt = make_opt(model.parameters())
    train(model, opt, 3)  # phase 1: every entry free, moments build up
    state_keys = [k for k, v in opt.state[next(model.parameters())].items() if v.dim() > 0]
    assert state_keys, "the optimizer should hold per-entry state by now"
    for n, p in model.named_parameters():  # momentum at the soon-frozen entries is non-zero
        assert any(bool((opt.state[p][k][masks[n]] != 0).any()) for k in state_keys), n
    before = snapshot(model)
    mu = MaskedUpdate(model, masks).attach(opt)
    for n, p in model.named_parameters():  # moments of frozen entries zeroed at attach
        for k in state_keys:
            assert bool((opt.state[p][k][masks[n]] == 0).all()), (n, k)
            assert bool((opt.state[p][k][~masks[n]] != 0).any()), (n, k)  # free ones kept
    train(model, opt, 3, start=10)
    mu.detach()
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


def test_gradient_clipping_sees_masked_gradients():
    model = make_model()
    masks = random_masks(model)
    ref = copy.deepcopy(model)  # no hooks: the reference, masked by hand
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mu = MaskedUpdate(model, masks).attach(opt)
    before = snapshot(model)
    x = batch(0)
    model(x, labels=x).loss.backward()
    ref(x, labels=x).loss.backward()
    unmasked = total_norm([p.grad for p in ref.parameters()])
    ref_grads = {n: p.grad.masked_fill(masks[n], 0) for n, p in ref.named_parameters()}
    reference = total_norm(ref_grads.values())
    assert not torch.allclose(unmasked, reference)  # the frozen gradients matter to the norm
    max_norm = float(reference) / 4
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(norm, reference, rtol=1e-6, atol=0)
    coef = max_norm / (float(reference) + 1e-6)
    for n, p in model.named_parameters():  # clipped = masked reference gradient * coef
        assert bool((p.grad[masks[n]] == 0).all())
        torch.testing.assert_close(p.grad, ref_grads[n] * coef, rtol=1e-5, atol=1e-9)
    opt.step()
    mu.detach()
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


def test_gradient_accumulation():
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    mu = MaskedUpdate(model, masks).attach(opt)
    for step in range(3):
        for micro in range(3):
            x = batch(10 * step + micro, n=2)
            (model(x, labels=x).loss / 3).backward()
            for n, p in model.named_parameters():  # masked after every accumulation
                assert bool((p.grad[masks[n]] == 0).all()), n
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    mu.detach()
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_bf16(mode):
    model = make_model(torch.bfloat16 if mode == "bf16-weights" else torch.float32)
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with MaskedUpdate(model, masks).attach(opt):
        train(model, opt, 3, clip=1.0, autocast=mode == "autocast")
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


@pytest.mark.parametrize("storage", ["bits", "bytes"])
def test_storage(storage):
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with MaskedUpdate(model, masks, storage=storage).attach(opt) as mu:
        size = (lambda n: (n + 7) // 8) if storage == "bits" else (lambda n: n)
        assert mu.mask_bytes == sum(size(m.numel()) for m in masks.values())
        for f in mu.frozen:
            assert torch.equal(f.mask(), masks[f.name].reshape(-1))
        train(model, opt, 3, clip=1.0)
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


def test_bits_and_bytes_train_the_same():
    results = []
    for storage in ("bits", "bytes"):
        model = make_model()
        masks = random_masks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        with MaskedUpdate(model, masks, storage=storage).attach(opt):
            train(model, opt, 2)
        results.append(snapshot(model))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_params_without_frozen_entries_carry_no_mask():
    model = make_model()
    params = dict(model.named_parameters())
    masks = random_masks(model)
    masks["model.norm.weight"] = torch.zeros_like(masks["model.norm.weight"])
    masks["lm_head.weight"] = torch.zeros_like(masks["lm_head.weight"])
    del masks["model.embed_tokens.weight"]  # no mask given at all
    odd = "model.layers.0.self_attn.q_proj.weight"
    masks[odd] = torch.zeros_like(masks[odd])
    masks[odd].view(-1)[5] = True  # one frozen entry in a 1024-entry tensor
    mu = MaskedUpdate(model, masks)
    held = {f.name for f in mu.frozen}
    assert held == {n for n, m in masks.items() if m.any()}
    assert not held & {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"}
    # at most 1 bit per entry, rounded up per tensor; a sparse mask is kept as indices
    per = {f.name: f.nbytes for f in mu.frozen}
    assert per[odd] == 8  # one int64 index instead of 128 bytes of bits
    assert all(per[n] == (params[n].numel() + 7) // 8 for n in held if n != odd)
    assert mu.mask_bytes <= sum(params[n].numel() for n in held) / 8 + len(held)
    assert mu.frozen_count == sum(int(m.sum()) for m in masks.values())
    # the dropped params still train (their entries are all free)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with mu.attach(opt):
        train(model, opt, 2)
    for n in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert not torch.equal(params[n].detach(), before[n])
    assert params[odd].detach().view(-1)[5] == before[odd].view(-1)[5]


def test_free_entries_do_change():
    model = make_model()
    masks = random_masks(model, density=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with MaskedUpdate(model, masks).attach(opt):
        train(model, opt, 2)
    free = sum(int((~m).sum()) for m in masks.values())
    moved = free_moved(model, masks, before)
    # weight decay moves every non-zero free entry, so nearly all of them change
    assert moved > 0.95 * free, (moved, free)
    assert_frozen(model, masks, before)


def test_detach_stops_freezing():
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mu = MaskedUpdate(model, masks).attach(opt)
    before = snapshot(model)
    train(model, opt, 1)
    assert_frozen(model, masks, before)
    mu.detach()
    x = batch(50)
    model(x, labels=x).loss.backward()  # no gradient hook any more
    assert any(bool((p.grad[masks[n]] != 0).any()) for n, p in model.named_parameters())
    opt.step()
    opt.zero_grad()
    assert frozen_moved(model, masks, before) > 0
    mu.detach()  # twice is harmless


def test_gradients_set_by_hand_are_masked_before_the_step():
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    with MaskedUpdate(model, masks).attach(opt):
        for p in model.parameters():
            p.grad = torch.ones_like(p)  # bypasses the accumulate-grad hook
        opt.step()
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


def test_bad_masks_refused():
    model = make_model()
    with pytest.raises(KeyError, match="no.such"):
        MaskedUpdate(model, {"no.such.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="entries"):
        MaskedUpdate(model, {"model.norm.weight": torch.ones(7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="storage"):
        MaskedUpdate(model, {}, storage="nibbles")


def test_unwrap_optimizer_and_ddp_style_names():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    wrapped = torch.nn.ModuleDict({"module": model})  # names like DDP's "module.<name>"
    masks = random_masks(model)
    mu = MaskedUpdate(wrapped, masks)
    assert {f.name for f in mu.frozen} == set(masks)


def test_masks_from_regions_unions_tasks():
    model = make_model()
    params = dict(model.named_parameters())
    a, b = random_masks(model, seed=2), random_masks(model, seed=3)

    class Regions:
        tensor_names = list(params) + ["not.in.model"]

        def mask(self, task, tensor):
            return {"a": a, "b": b}[task].get(tensor, torch.ones(2, dtype=torch.bool))

    out = masks_from_regions(model, Regions(), ["a", "b"])
    assert set(out) == set(params)
    assert all(torch.equal(out[n], a[n] | b[n]) for n in params)
    assert all(torch.equal(v, a[n]) for n, v in masks_from_regions(model, Regions(), ["a"]).items())


# ----------------------------------------------------------- distributed


def run_workers(script: str, out_path: str, timeout: int = 180) -> dict:
    """torchrun, 2 processes on a free port; on timeout the whole process group
    (launcher and workers) is killed, so no worker is left behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(HERE, "workers", script),
            str(out_path),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script} did not finish in {timeout}s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    with open(out_path) as fh:
        return json.load(fh)


def test_ddp_two_processes(tmp_path):
    res = run_workers("ddp_freeze.py", tmp_path / "ddp.json")
    assert res["world"] == 2
    assert res["identical"] is True
    assert res["replicas_equal"] is True
    assert res["grads_masked"] is True
    assert res["moved"] > 0
    assert res["path"] == "adam"


def test_fsdp2_two_processes(tmp_path):
    """fully_shard on CPU/gloo: full-shape masks by name follow the (uneven) shards."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:  # pragma: no cover - old torch
        pytest.skip(f"FSDP2 not available: {err}")
    res = run_workers("fsdp2_freeze.py", tmp_path / "fsdp2.json")
    assert res["world"] == 2 and res["sharded"] is True
    assert res["embed_rows_rank0"] == 66  # 131 rows over 2 ranks: 66 + 65
    assert res["identical"] is True
    assert res["grads_masked"] is True
    assert res["moments_zeroed"] is True
    assert res["norms_match"] is True
    assert res["moved"] > 0
    assert res["path"] == "adam"
    # then SGD (save/restore path) on the same shards
    assert res["sgd_path"] == "generic"
    assert res["sgd_identical"] is True and res["sgd_moved"] > 0
    # every frozen entry is held by exactly one shard
    assert sum(res["frozen_counts"]) == res["frozen_total"]
    assert all(c > 0 for c in res["frozen_counts"])


@pytest.mark.parametrize("share", [0.001, 0.3])
def test_sparse_and_dense_encodings_both_bit_exact(share):
    """Under 1/64 frozen a parameter keeps int64 indices (O(frozen) work per step),
    above it packed bits; both keep frozen entries bit-identical under AdamW + wd."""
    model = make_model()
    g = torch.Generator().manual_seed(7)
    masks = {n: torch.rand(p.shape, generator=g) < share for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 2)
    before = snapshot(model)
    mu = MaskedUpdate(model, masks)
    kinds = {f._idx is not None for f in mu.frozen}
    assert kinds == ({True} if share < 1 / 64 else {False})
    with mu.attach(opt):
        train(model, opt, 3)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[masks[n]], before[n][masks[n]])
    assert any(not torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]) for n, p in model.named_parameters())


# ------------------------------------------- Adam fast path vs save/restore


def _groups(model, lr=1e-2, wd=0.1):
    """HF Trainer style: decay and no-decay (1-d params) groups, different lr."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": wd, "lr": lr}, {"params": rest, "weight_decay": 0.0, "lr": lr / 2}]


def _reference_step(model, opt, masks, clip=1.0):
    """What the masked update must equal: masked gradients, a plain step, frozen
    values written back by hand."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad.masked_fill_(masks[n], 0)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.where(masks[n], saved[n], p))
    opt.zero_grad()


ADAM_VARIANTS = {
    "adamw": dict(cls=torch.optim.AdamW),
    "adamw-foreach": dict(cls=torch.optim.AdamW, foreach=True),
    "adamw-amsgrad-maximize": dict(cls=torch.optim.AdamW, amsgrad=True, maximize=True),
    "adamw-fused": dict(cls=torch.optim.AdamW, fused=True),
    "adam-decoupled": dict(cls=torch.optim.Adam, decoupled_weight_decay=True),
    "adamw-bf16-weights": dict(cls=torch.optim.AdamW, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
def test_adam_fast_path_matches_reference(variant):
    """The Adam path (no save/restore; weight decay applied to free entries only)
    leaves frozen entries bit-identical and their moments at zero, with state carried
    over from a free phase, two groups (wd and no wd), a scheduler changing lr every
    step and clipping; free entries equal a masked plain step."""
    kw = dict(ADAM_VARIANTS[variant])
    cls, dtype = kw.pop("cls"), kw.pop("dtype", torch.float32)
    models, opts, scheds = [], [], []
    for _ in range(2):
        model = make_model(dtype)
        opt = cls(_groups(model), **kw)
        models.append(model)
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))
    masks = random_masks(models[0])
    for model, opt, sched in zip(models, opts, scheds):  # free phase: moments build up
        for s in range(2):
            x = batch(s)
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    model, ref = models
    before = snapshot(model)
    mu = MaskedUpdate(model, masks).attach(opts[0])
    with torch.no_grad():  # the reference zeroes the same moments by hand
        for n, p in ref.named_parameters():
            for v in opts[1].state[p].values():
                if v.shape == p.shape:
                    v.masked_fill_(masks[n], 0)
    for s in range(3):
        x = batch(10 + s)
        model(x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[0].step()
        opts[0].zero_grad()
        assert mu.last_step == "adam"
        assert [g["weight_decay"] for g in opts[0].param_groups] == [0.1, 0.0]  # given back
        ref(x, labels=x).loss.backward()
        _reference_step(ref, opts[1], masks)
        for sched in scheds:
            sched.step()
    mu.detach()
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    for n, p in params.items():
        for key, v in opts[0].state[p].items():
            if v.shape == p.shape:
                assert bool((v[masks[n]] == 0).all()), (n, key)  # frozen moments stay zero
        if variant == "adamw-fused":  # the fused kernel rounds its own decay differently
            torch.testing.assert_close(p.detach(), ref_params[n].detach(), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(p.detach(), ref_params[n].detach()), n
    assert mu.step_buffer_bytes <= 64 * freeze._BLOCK  # block scratch only, no parameter copies


def test_adam_fast_path_and_save_restore_agree():
    """``adam_fast_path=False`` (save/restore around a full AdamW step) gives the same
    model bit for bit."""
    out = []
    for fast in (True, False):
        model = make_model()
        masks = random_masks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)
        train(model, opt, 2)
        before = snapshot(model)
        with MaskedUpdate(model, masks, adam_fast_path=fast).attach(opt) as mu:
            train(model, opt, 3, start=5, clip=1.0)
            assert mu.last_step == ("adam" if fast else "generic")
        assert_frozen(model, masks, before)
        out.append(snapshot(model))
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),  # L2 folded into the gradient
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, weight_decay=0.1),
    ],
    ids=["adam-l2", "sgd", "rmsprop"],
)
def test_other_optimizers_take_save_restore(make_opt):
    """Where a zero gradient does not leave an entry in place (L2 term, eps = 0,
    other optimizers) the step is saved and restored instead."""
    model = make_model()
    masks = random_masks(model)
    opt = make_opt(model.parameters())
    train(model, opt, 2)
    before = snapshot(model)
    with MaskedUpdate(model, masks).attach(opt) as mu:
        train(model, opt, 2, start=5, clip=1.0)
        assert mu.last_step == "generic"
        assert mu.step_buffer_bytes >= 4 * sum(int(m.numel()) for m in masks.values())  # parameter copies
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0


def test_adam_path_conditions():
    exact = freeze._adam_exact
    assert exact({"weight_decay": 0.1, "eps": 1e-8, "decoupled_weight_decay": True})
    assert exact({"weight_decay": 0.0, "eps": 1e-8, "decoupled_weight_decay": False})
    assert not exact({"weight_decay": 0.1, "eps": 1e-8, "decoupled_weight_decay": False})  # L2
    assert not exact({"weight_decay": 0.1, "eps": 0.0, "decoupled_weight_decay": True})  # 0 / 0
    assert not exact({"weight_decay": torch.tensor(0.1), "eps": 1e-8, "decoupled_weight_decay": True})


def test_adam_fast_path_needs_its_weight_decay_split():
    """Control: masked gradients and zeroed moments alone let AdamW's decay move frozen
    entries (what the Adam path takes over for free entries only)."""
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    before = snapshot(model)
    mu = MaskedUpdate(model, masks)
    mu.reset_state(opt)
    h = opt.register_step_pre_hook(lambda *_: mu.mask_grads())
    with mu.attach():
        train(model, opt, 2)
    h.remove()
    assert frozen_moved(model, masks, before) > 0


def test_nonfinite_frozen_gradients_are_zeroed_exactly():
    """NaN/inf gradients on frozen entries (set by hand, after the grad hook) become
    exact zeros: frozen entries and their moments stay put."""
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with MaskedUpdate(model, masks).attach(opt):
        for n, p in model.named_parameters():
            g = torch.randn_like(p)
            g[masks[n]] = float("nan")
            g.view(-1)[masks[n].view(-1).nonzero()[::2]] = float("inf")
            p.grad = g
        opt.step()
    assert_frozen(model, masks, before)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert bool((opt.state[p]["exp_avg"][masks[n]] == 0).all()), n


def test_weight_decay_given_back_after_a_failed_step():
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(_groups(model), lr=1e-2)
    mu = MaskedUpdate(model, masks).attach(opt)
    fail = {"now": True}

    def boom(*_):
        if fail["now"]:
            raise RuntimeError("boom")

    h = opt.register_step_pre_hook(boom)  # runs after MaskedUpdate's pre-hook
    x = batch(0)
    model(x, labels=x).loss.backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.0  # borrowed by the step that failed
    fail["now"] = False
    before = snapshot(model)
    opt.step()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert_frozen(model, masks, before)
    opt.param_groups[0]["weight_decay"] = 0.0
    mu._decay_off.append((opt.param_groups[0], 0.1))  # as if a step had failed
    mu.detach()
    h.remove()
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_loaded_optimizer_state_is_zeroed_on_frozen_entries():
    """Moments loaded after attach (e.g. a checkpoint) are zeroed on frozen entries
    again, so the Adam path stays exact."""
    model = make_model()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    before = snapshot(model)
    with MaskedUpdate(model, masks).attach(opt):
        opt.load_state_dict(state)
        for n, p in model.named_parameters():
            assert bool((opt.state[p]["exp_avg"][masks[n]] == 0).all()), n
        train(model, opt, 2, start=5)
    assert_frozen(model, masks, before)


class _Odd(torch.nn.Module):
    """Sizes that are not multiples of 8 (tails), one under 8 entries."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(13, 29)
        self.b = torch.nn.Linear(29, 5)
        self.c = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        return (self.b(torch.tanh(self.a(x))) * self.c.sum()).pow(2).mean()


@pytest.mark.parametrize("storage", ["bits", "bytes"])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_odd_sizes_and_many_blocks(monkeypatch, storage, opt_name):
    monkeypatch.setattr(freeze, "_BLOCK", 4)  # 32-entry blocks: several per tensor, short last ones
    model = _Odd()
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters()}
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.2)
        if opt_name == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.2)
    )
    for _ in range(2):
        model(torch.randn(4, 13, generator=g)).backward()
        opt.step()
        opt.zero_grad()
    before = snapshot(model)
    with MaskedUpdate(model, masks, storage=storage).attach(opt) as mu:
        for f in mu.frozen:
            assert f._idx is None and torch.equal(f.mask(), masks[f.name].reshape(-1))
        assert mu.mask_bytes <= sum(m.numel() / (8 if storage == "bits" else 1) + 7 for m in masks.values())
        for _ in range(3):
            model(torch.randn(4, 13, generator=g)).backward()
            opt.step()
            opt.zero_grad()
        assert mu.last_step == ("adam" if opt_name == "adamw" else "generic")
    assert_frozen(model, masks, before)
    assert free_moved(model, masks, before) > 0
