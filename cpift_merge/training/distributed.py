"""Several processes: which rank this is under ``torchrun`` / ``accelerate launch``, and the
few collective steps our commands need (rank 0 writes, the others wait, and an error on
rank 0 stops every rank with the same one line instead of a hang). Light: torch is
imported only when there are several processes."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cpift_merge.errors import CpiftError


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def lone_launch() -> Optional[str]:
    """A one-line warning when a launcher was asked for several processes and started this
    one alone: ``accelerate launch --cpu --num_processes N`` runs the command once (its
    multi-CPU mode needs MPI) without saying so. None otherwise."""
    env = os.environ
    asked = env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
    if asked and "WORLD_SIZE" not in env and not any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return (
            "accelerate launch --cpu started one process (several need MPI there), so this runs in one;"
            " for several processes on CPU use accelerate launch --multi_gpu or torchrun"
        )
    return None


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


# ------------------------------------------------------------------ FSDP2 through the Trainer

# The Trainer's ``fsdp_config`` keys (a leading ``fsdp_`` is dropped, as the Trainer does) that
# FSDP2 uses, and those that only FSDP1 reads: the Trainer and accelerate drop the latter with a
# warning under FSDP2, which would leave a user believing a setting took effect.
FSDP2_SETTINGS = (
    "version",
    "reshard_after_forward",
    "cpu_offload",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
    "state_dict_type",
    "cpu_ram_efficient_loading",
    "activation_checkpointing",
)
FSDP1_ONLY = (
    "sharding_strategy",
    "backward_prefetch",
    "forward_prefetch",
    "use_orig_params",
    "sync_module_states",
    "limit_all_gathers",
    "xla",
    "xla_fsdp_settings",
    "xla_fsdp_grad_ckpt",
)


def fsdp_settings(given: Optional[Dict[str, Any]], layer_classes: Sequence[str] = ()) -> Dict[str, Any]:
    """The Trainer's ``fsdp_config`` for ``--fsdp``: FSDP2, each decoder layer (``layer_classes``,
    a model's ``_no_split_modules``) sharded on its own, parameters resharded after forward,
    full state dicts in checkpoints; then the user's ``given`` settings on top. FSDP1-only,
    unknown or malformed settings are refused in one line (FSDP1's flattened parameters do not
    keep the per-tensor shapes the frozen masks index)."""
    if given is not None and not isinstance(given, dict):
        raise CpiftError(f"--fsdp-config must be a mapping of FSDP settings, got {type(given).__name__}")
    user = {(k[5:] if isinstance(k, str) and k.startswith("fsdp_") else k): v for k, v in (given or {}).items()}
    for key in user:
        if key in FSDP1_ONLY:
            hint = "; use reshard_after_forward (true or false)" if key == "sharding_strategy" else ""
            raise CpiftError(f"--fsdp-config: {key} is an FSDP1 setting and --fsdp uses FSDP2{hint}")
        if key not in FSDP2_SETTINGS:
            raise CpiftError(f"--fsdp-config: unknown FSDP2 setting {key!r}; known: {', '.join(FSDP2_SETTINGS)}")
    if str(user.get("version", 2)) != "2":
        raise CpiftError(f"--fsdp-config: version {user['version']!r} is not supported; --fsdp uses FSDP2 (version 2)")
    if not isinstance(user.get("reshard_after_forward", True), bool):
        raise CpiftError("--fsdp-config: reshard_after_forward must be true or false under FSDP2")
    if str(user.get("state_dict_type", "FULL_STATE_DICT")).upper() not in ("FULL_STATE_DICT", "SHARDED_STATE_DICT"):
        raise CpiftError("--fsdp-config: state_dict_type must be FULL_STATE_DICT or SHARDED_STATE_DICT under FSDP2")
    out: Dict[str, Any] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    if layer_classes:
        out.update(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_layer_cls_to_wrap=list(layer_classes))
    out.update(user)
    return out


def fsdp_available(device: str = "auto") -> bool:
    """Whether ``--fsdp`` can shard here: accelerate applies FSDP only to CUDA devices (on CPU it
    keeps plain data parallelism and ignores the Trainer's FSDP settings)."""
    import torch

    return device != "cpu" and torch.cuda.is_available()
