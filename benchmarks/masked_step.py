"""Cost of the masked update on a real model: one AdamW step of SmolLM2-135M-Instruct
(batch 8 x 64 tokens, same seed), plain vs with 1%, 30% and 99% of the entries frozen
(random masks): 1% (sparse indices), 30% and 99% (training only a 1% core) with 1-bit
and 1-byte masks on the Adam path, and 30% on the generic save/restore path (what any
other optimizer gets).

Configurations are interleaved step by step on one model and optimizer (hooks
attached and detached between steps), so machine noise hits them alike; the table
gives the median step time, the overhead against plain AdamW, the masks' device
memory (bits per parameter) and the peak transient buffer a step holds. "own s" is
the masked update's own work per step timed alone (grad masking + step hooks, less
the weight-decay pass AdamW no longer does), min over the rounds: on a busy machine
it is the steadier figure.

    python benchmarks/masked_step.py [--rounds 8] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cpift_merge.pipeline.report import format_table
from cpift_merge.training.freeze import MaskedUpdate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from cpift_merge.pipeline.models import prepare_smollm2

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

    m1, m30, m99 = masks(0.01), masks(0.30), masks(0.99)
    configs = {  # name: (masks, storage, Adam fast path)
        "plain AdamW": None,
        "1% frozen": (m1, "bits", True),
        "30% frozen, bits": (m30, "bits", True),
        "30% frozen, bytes": (m30, "bytes", True),
        "30% generic path": (m30, "bits", False),
        # a stage that trains only its cores (LoTA-style sparse training): 1% trainable
        "99% frozen, bits": (m99, "bits", True),
        "99% frozen, bytes": (m99, "bytes", True),
    }
    updates = {
        k: MaskedUpdate(model, c[0], storage=c[1], adam_fast_path=c[2]) for k, c in configs.items() if c is not None
    }
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
        print(
            f"round {r + 1}/{args.warmup + args.rounds}: "
            + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
            flush=True,
        )

    # The masked update's own work, timed alone (min of --rounds, robust to a busy
    # machine): what the grad hooks do in backward plus the step hooks, less the
    # decoupled-decay pass AdamW does itself (the Adam path takes it over).
    loss = model(x, labels=x).loss
    loss.backward()
    params = [p.detach() for p in model.parameters()]
    own = {}

    def best(fn) -> float:
        ts = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    decay = best(lambda: torch._foreach_mul_(params, 1 - 1e-5 * 0.1))
    for name, mu in updates.items():
        hook = best(mu.mask_grads)
        hooks = best(lambda mu=mu: (mu._pre_step(opt), mu._post_step()))
        own[name] = hook + hooks - (decay if mu.last_step == "adam" else 0.0)
    opt.zero_grad(set_to_none=True)

    plain = statistics.median(times["plain AdamW"])
    rows, out = [], {}
    for name in configs:
        med = statistics.median(times[name])
        mu = updates.get(name)
        mask_bytes = mu.mask_bytes if mu else 0
        transient = mu.step_buffer_bytes if mu else 0
        work = own.get(name, 0.0)
        rows.append(
            [
                name,
                f"{med:.3f}",
                f"{100 * (med / plain - 1):+.1f}%",
                f"{work:.3f}",
                f"{100 * work / plain:+.1f}%",
                f"{8 * mask_bytes / n_params:.3f}",
                f"{mask_bytes / 2**20:.1f}",
                f"{transient / 2**20:.1f}",
            ]
        )
        out[name] = {
            "median_s": med,
            "steps": times[name],
            "mask_bytes": mask_bytes,
            "bits_per_param": 8 * mask_bytes / n_params,
            "transient_bytes": transient,
            "path": mu.last_step if mu else None,
            "own_work_s": work,
        }
    print()
    print(
        f"SmolLM2-135M ({n_params:,} params), batch 8x64, AdamW wd 0.1, clip 1.0,"
        f" {args.rounds} steps each (median), {torch.get_num_threads()} threads"
    )
    print(
        format_table(
            ["config", "step s", "overhead", "own s", "own/step", "mask bits/param", "mask MiB", "step buffer MiB"],
            rows,
        )
    )
    default = [k for k in updates if updates[k].adam_fast_path]  # what AdamW users get
    bits = [k for k in updates if configs[k][1] == "bits"]
    worst = max(statistics.median(times[k]) / plain - 1 for k in default)
    worst_own = max(own[k] for k in default) / plain
    print(
        f"\nworst overhead (AdamW path) {100 * worst:+.1f}% step time, {100 * worst_own:+.1f}% own work"
        f" (target <= 5%): {'PASS' if max(worst, worst_own) <= 0.05 else 'FAIL'};"
        f" mask memory (default storage: bits) {max(out[k]['bits_per_param'] for k in bits):.3f} bits/param,"
        f" (bytes) {max(out[k]['bits_per_param'] for k in updates if k not in bits):.3f}"
        f" (target <= 8, goal <= 1): {'PASS' if all(out[k]['bits_per_param'] <= 8 for k in updates) else 'FAIL'}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
