"""Run under torchrun (2 processes, gloo): DDP + AdamW(wd) + clipping + accumulation
with MaskedUpdate; rank 0 writes what it saw to the JSON path in argv[1]."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from cpift_merge.training.freeze import MaskedUpdate  # noqa: E402


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()}
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 128, (4, 16), generator=data)
    for _ in range(2):  # stage 1: everything free, optimizer state builds up
        ddp(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mu = MaskedUpdate(ddp, masks).attach(opt)
    norms = []
    for _ in range(3):
        for micro in range(2):
            ddp(x[micro * 2 : (micro + 1) * 2], labels=x[micro * 2 : (micro + 1) * 2]).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.5)))
        frozen_grad_zero = all(
            bool((p.grad[masks[n]] == 0).all()) for n, p in model.named_parameters() if p.grad is not None
        )
        opt.step()
        opt.zero_grad()
    path = mu.last_step
    identical = all(torch.equal(p.detach()[masks[n]], before[n][masks[n]]) for n, p in model.named_parameters())
    moved = sum(int((p.detach()[~masks[n]] != before[n][~masks[n]]).sum()) for n, p in model.named_parameters())
    # replicas agree bit for bit
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    mu.detach()
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(
                {
                    "identical": identical,
                    "moved": moved,
                    "grads_masked": frozen_grad_zero,
                    "replicas_equal": all(torch.equal(gathered[0], t) for t in gathered),
                    "world": dist.get_world_size(),
                    "norms": norms,
                    "path": path,
                },
                fh,
            )
    # free DDP (its reducer) while the process group is alive: destroying it after
    # destroy_process_group() hangs one rank at exit under gloo
    del ddp, opt, mu
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
