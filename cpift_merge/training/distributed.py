"""Several processes: which rank this is under ``torchrun`` / ``accelerate launch``, and the
few collective steps our commands need (rank 0 writes, the others wait, and an error on
rank 0 stops every rank with the same one line instead of a hang). Light: torch is
imported only when there are several processes."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from cpift_merge.errors import CpiftError


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process). Starts the process group
    the launcher asked for (gloo on CPU, nccl on GPUs) if nothing has started it yet."""
    if rank_world()[1] <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        import atexit

        import torch

        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        # ours to close: a process group left open at exit aborts the process ("terminate
        # called without an active exception") when this rank is the last to leave
        atexit.register(_close)
    dist.barrier()


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def agree(ok: bool, message: str) -> None:
    """Every rank stops with ``message`` when any rank's ``ok`` is False (no rank hangs)."""
    if rank_world()[1] > 1:
        import torch
        import torch.distributed as dist

        barrier()
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        ok = int(flag) == 0
    if not ok:
        raise CpiftError(message)


def on_main(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; every rank then stops with the CpiftError it raised (the
    same one line on each rank) or goes on together. In one process: just ``fn()``."""
    if rank_world()[1] <= 1:
        fn()
        return
    import torch.distributed as dist

    message: List[Optional[str]] = [None]
    if is_main():
        try:
            fn()
        except CpiftError as err:
            message[0] = str(err)
    barrier()
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise CpiftError(message[0])
