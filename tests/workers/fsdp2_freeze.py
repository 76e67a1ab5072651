"""Run under torchrun (2 processes, gloo, CPU): FSDP2 ``fully_shard`` + AdamW(wd) +
clipping + accumulation with MaskedUpdate given full-shape masks by name; rank 0
writes what it saw to the JSON path in argv[1].

The vocabulary is odd (131 rows) so the embedding and lm_head shards are uneven.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from cpift_merge.training.freeze import MaskedUpdate  # noqa: E402


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out_path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=131))
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()}
    masks["model.norm.weight"] = torch.zeros_like(masks["model.norm.weight"])  # no frozen entry: no mask
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    params = dict(model.named_parameters())
    sharded = all(hasattr(p, "to_local") for p in params.values())
    uneven = params["model.embed_tokens.weight"].to_local().shape[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 128, (4, 16), generator=data)
    for _ in range(2):  # stage 1: everything free, optimizer state builds up
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    before = {n: full(p.detach()).clone() for n, p in params.items()}
    mu = MaskedUpdate(model, masks).attach(opt)
    local_frozen = mu.frozen_count
    moments_zeroed = True
    for n, p in params.items():
        for key in ("exp_avg", "exp_avg_sq"):
            m = full(opt.state[p][key])
            moments_zeroed &= bool((m[masks[n]] == 0).all())
    grads_masked, norms_match, norms = True, True, []
    for _ in range(3):
        for micro in range(2):
            xb = x[micro * 2 : (micro + 1) * 2]
            model(xb, labels=xb).loss.backward()
        grads = {n: full(p.grad) for n, p in params.items() if p.grad is not None}
        grads_masked &= all(bool((gr[masks[n]] == 0).all()) for n, gr in grads.items())
        reference = torch.stack([gr[~masks[n]].norm() for n, gr in grads.items()]).norm()
        norm = full(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        norms.append(float(norm))
        norms_match &= bool(torch.allclose(norm, reference, rtol=1e-5, atol=1e-7))
        opt.step()
        opt.zero_grad()
    path = mu.last_step
    after = {n: full(p.detach()) for n, p in params.items()}
    identical = all(torch.equal(after[n][masks[n]], before[n][masks[n]]) for n in params)
    moved = sum(int((after[n][~masks[n]] != before[n][~masks[n]]).sum()) for n in params)
    counts = [0, 0]
    dist.all_gather_object(counts, local_frozen)
    mu.detach()
    # the save/restore path on the same shards: SGD with momentum and weight decay
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    mu = MaskedUpdate(model, masks).attach(sgd)
    for _ in range(2):
        model(x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        sgd.step()
        sgd.zero_grad()
    sgd_path = mu.last_step
    mu.detach()
    final = {n: full(p.detach()) for n, p in params.items()}
    sgd_identical = all(torch.equal(final[n][masks[n]], before[n][masks[n]]) for n in params)
    sgd_moved = sum(int((final[n][~masks[n]] != after[n][~masks[n]]).sum()) for n in params)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(
                {
                    "identical": identical,
                    "moved": moved,
                    "grads_masked": grads_masked,
                    "moments_zeroed": moments_zeroed,
                    "norms_match": norms_match,
                    "norms": norms,
                    "sharded": sharded,
                    "embed_rows_rank0": uneven,
                    "frozen_counts": counts,
                    "frozen_total": sum(int(m.sum()) for m in masks.values()),
                    "world": dist.get_world_size(),
                    "path": path,
                    "sgd_path": sgd_path,
                    "sgd_identical": sgd_identical,
                    "sgd_moved": sgd_moved,
                },
                fh,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
