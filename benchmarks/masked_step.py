"""Cost of the masked update on a real model: one AdamW step of SmolLM2-135M-Instruct
(batch 8 x 64 tokens, same seed), plain vs with 1% and 30% of the entries frozen
(random masks, 1-bit storage; ``--storage bytes`` for bool masks).

Configurations are interleaved step by step on one model and optimizer (hooks
attached and detached between steps), so machine noise hits them alike; the table
gives the median step time, the overhead against plain AdamW, the masks' device
memory (bits per parameter) and the transient buffer a step holds (frozen values).

    python benchmarks/masked_step.py [--rounds 8] [--storage bits|bytes] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cpift_merge.cli import format_table
from cpift_merge.freeze import MaskedUpdate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--storage", choices=["bits", "bytes"], default="bits")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from cpift_merge.models import prepare_smollm2

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(prepare_smollm2(), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (8, 64), generator=gen)
    n_params = sum(p.numel() for p in model.parameters())

    def masks(share: float):
        g = torch.Generator().manual_seed(int(share * 1000))
        return {n: torch.rand(p.shape, generator=g) < share for n, p in model.named_parameters()}

    configs = {"plain AdamW": None, "1% frozen": masks(0.01), "30% frozen": masks(0.30)}
    updates = {k: MaskedUpdate(model, m, storage=args.storage) for k, m in configs.items() if m is not None}
    times = {k: [] for k in configs}

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for r in range(args.warmup + args.rounds):
        for name in configs:
            mu = updates.get(name)
            if mu is not None:
                mu.attach(opt)
            dt = step()
            if mu is not None:
                mu.detach()
            if r >= args.warmup:
                times[name].append(dt)
        print(f"round {r + 1}/{args.warmup + args.rounds}: " + ", ".join(
            f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), flush=True)

    plain = statistics.median(times["plain AdamW"])
    rows, out = [], {}
    for name in configs:
        med = statistics.median(times[name])
        mu = updates.get(name)
        mask_bytes = mu.mask_bytes if mu else 0
        frozen = mu.frozen_count if mu else 0
        transient = mu.step_buffer_bytes if mu else 0
        rows.append([name, f"{med:.3f}", f"{100 * (med / plain - 1):+.1f}%", f"{8 * mask_bytes / n_params:.3f}",
                     f"{mask_bytes / 2**20:.1f}", f"{transient / 2**20:.1f}"])
        out[name] = {"median_s": med, "steps": times[name], "mask_bytes": mask_bytes,
                     "bits_per_param": 8 * mask_bytes / n_params, "transient_bytes": transient}
    print()
    print(f"SmolLM2-135M ({n_params:,} params), batch 8x64, AdamW wd 0.1, clip 1.0, storage={args.storage},"
          f" {args.rounds} steps each (median)")
    print(format_table(["config", "step s", "overhead", "mask bits/param", "mask MiB", "step buffer MiB"], rows))
    worst = max(statistics.median(times[k]) / plain - 1 for k in updates)
    print(f"\nworst overhead {100 * worst:+.1f}% (target <= 5%): {'PASS' if worst <= 0.05 else 'FAIL'};"
          f" mask memory {max(out[k]['bits_per_param'] for k in updates):.3f} bits/param"
          f" (target <= 8, goal <= 1): {'PASS' if all(out[k]['bits_per_param'] <= 8 for k in updates) else 'FAIL'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
