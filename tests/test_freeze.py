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
from transformers import LlamaForCausalLM

from conftest import tiny_config
from cpift_merge.freeze import MaskedUpdate, masks_from_regions, unwrap_optimizer

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
    return sum(int((p.detach()[masks[n]] != before[n][masks[n]]).sum())
               for n, p in model.named_parameters() if n in masks)


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


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.1),
], ids=["adamw", "adam-amsgrad", "sgd-nesterov"])
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
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(HERE, "workers", script), str(out_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
