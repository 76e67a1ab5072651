"""The masked update: frozen entries stay bit-identical, everything else trains.

This is the one place where freezing happens (probes, staged SFT, calibration, the
HF Trainer / TRL callbacks all use :class:`MaskedUpdate`). Zeroing gradients is not
enough: decoupled weight decay and momentum carried over from an earlier stage still
move an entry whose gradient is zero. So, per optimizer step:

1. gradients of frozen entries are zeroed as soon as they are accumulated
   (``register_post_accumulate_grad_hook``), so gradient clipping and every norm see
   the masked gradients, also under gradient accumulation;
2. an optimizer *step pre-hook* gathers the frozen entries' values (compactly, only
   the frozen ones) and a *step post-hook* writes them back, whatever the optimizer
   did (weight decay, momentum, AMSGrad, ...): ``torch.equal`` holds by construction;
3. when a stage begins, optimizer moments of newly frozen entries are zeroed, so they
   carry nothing over.

Masks live on the parameter's device packed at 1 bit per entry (``storage="bits"``,
default) or as bool (1 byte, ``storage="bytes"``, a little faster); parameters with
no frozen entry carry no mask at all. The step hooks are registered on the torch
optimizer itself, so they also fire through accelerate's wrapper, DDP and AMP.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from cpift_merge import masks as maskcodec


class _Frozen:
    """The frozen entries of one parameter.

    Encoding, whichever is smaller (like the region files): sorted int64 flat indices
    (what torch's index ops take) when under 1/64 of the entries are frozen (then every
    operation costs O(frozen)),
    else packed bits (``storage="bits"``) or a bool mask (``"bytes"``). A bit mask is
    unpacked once per optimizer step and the bool kept until the step's restore.
    Dense masks save the parameter whole for the step (a plain copy is much faster
    than gathering the frozen entries) and restore with one ``where``.
    """

    __slots__ = ("param", "name", "numel", "count", "_idx", "_packed", "_bool", "_cache", "_saved")

    def __init__(self, name: str, param: torch.Tensor, mask: torch.Tensor, storage: str):
        if mask.numel() != param.numel():
            raise ValueError(
                f"mask for {name} has {mask.numel()} entries, the parameter {param.numel()}"
            )
        local = _local(param)
        flat = _shard_mask(name, mask, param).reshape(-1).to(device=local.device, dtype=torch.bool)
        self.param, self.name, self.numel = param, name, local.numel()
        self.count = int(torch.count_nonzero(flat))
        sparse = 8 * self.count < maskcodec.packed_size(self.numel)
        self._idx = flat.nonzero().reshape(-1) if sparse else None
        self._packed = maskcodec.pack_bits(flat) if not sparse and storage == "bits" else None
        self._bool = flat if not sparse and storage == "bytes" else None
        self._cache: Optional[torch.Tensor] = None
        self._saved: Optional[torch.Tensor] = None

    def mask(self) -> torch.Tensor:
        """Flat bool mask (built from indices or bits when needed)."""
        if self._bool is not None:
            return self._bool
        if self._cache is None:
            if self._idx is not None:
                m = torch.zeros(self.numel, dtype=torch.bool, device=self._idx.device)
                m[self._idx] = True
                return m
            self._cache = maskcodec.unpack_bits(self._packed, self.numel)
        return self._cache

    @property
    def nbytes(self) -> int:
        t = next(x for x in (self._idx, self._packed, self._bool) if x is not None)
        return t.numel() * t.element_size()

    def _data(self) -> torch.Tensor:
        return _local(self.param).detach().view(-1)

    def save(self) -> None:
        data = self._data()
        self._saved = data.index_select(0, self._idx) if self._idx is not None else data.clone()

    def restore(self) -> None:
        if self._saved is not None:
            data = self._data()
            if self._idx is not None:
                data.index_copy_(0, self._idx, self._saved)
            else:
                torch.where(self.mask(), self._saved, data, out=data)
            self._saved = None
        self._cache = None  # the next step unpacks again

    def mask_grad(self) -> None:
        g = self.param.grad
        if g is not None:
            flat = _local(g).view(-1)
            if self._idx is not None:
                flat.index_fill_(0, self._idx, 0)
            else:
                flat.masked_fill_(self.mask(), 0)

    def zero_state(self, value: torch.Tensor) -> None:
        flat = _local(value).view(-1)
        if self._idx is not None:
            flat.index_fill_(0, self._idx, 0)
        else:
            flat.masked_fill_(self.mask(), 0)
        self._cache = None


def _local(t: torch.Tensor) -> torch.Tensor:
    """The process-local tensor (FSDP2/DTensor shards expose ``to_local``)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_mask(name: str, mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of a full-shape ``mask`` that lies in this process's shard of ``param``.

    Plain tensors get the mask as it is. A DTensor (FSDP2 ``fully_shard``, tensor
    parallel) holds only a block of the parameter locally: the mask is cut to that
    block, found from the DTensor's mesh and placements.
    """
    if not hasattr(param, "to_local") or not hasattr(param, "placements"):
        return mask
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    odd = [p for p in param.placements if type(p) not in (Shard, Replicate)]
    if odd:
        raise ValueError(f"cannot freeze entries of {name}: unsupported DTensor placement {odd[0]}")
    mask = mask.reshape(param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return mask[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


class MaskedUpdate:
    """Keep the masked (True = frozen) entries of a model's parameters bit-identical.

    ``masks`` maps parameter names (as in ``model.named_parameters()``) to bool tensors
    shaped like the parameter. Use it with any torch optimizer::

        mu = MaskedUpdate(model, masks)
        mu.attach(optimizer)          # hooks; zeroes moments of frozen entries
        ... your usual loop (backward, clip_grad_norm_, optimizer.step()) ...
        mu.detach()
    """

    def __init__(self, model: torch.nn.Module, masks: Mapping[str, torch.Tensor], storage: str = "bits"):
        if storage not in ("bits", "bytes"):
            raise ValueError("storage must be 'bits' or 'bytes'")
        params = dict(_named_parameters(model))
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise KeyError(f"mask for unknown parameter {unknown[0]!r}")
        self.frozen: List[_Frozen] = []
        for name, mask in masks.items():
            if bool(mask.any()) and params[name].is_floating_point():
                f = _Frozen(name, params[name], mask, storage)
                if f.count:  # a shard (FSDP2) may hold none of the frozen entries
                    self.frozen.append(f)
        self._handles: List = []

    # ------------------------------------------------------------------ facts
    @property
    def frozen_count(self) -> int:
        """Frozen entries held by this process (its shards only, under FSDP2)."""
        return sum(f.count for f in self.frozen)

    @property
    def step_buffer_bytes(self) -> int:
        """Transient memory a step holds: the frozen values (sparse masks) or a copy
        of each parameter with a dense mask."""
        return sum((f.count if f._idx is not None else f.numel) * f.param.element_size() for f in self.frozen)

    @property
    def mask_bytes(self) -> int:
        """Device memory the masks take (excludes transient buffers during a step)."""
        return sum(f.nbytes for f in self.frozen)

    # -------------------------------------------------------------- operations
    def mask_grads(self) -> None:
        for f in self.frozen:
            f.mask_grad()

    def save(self) -> None:
        for f in self.frozen:
            f.save()

    def restore(self) -> None:
        for f in self.frozen:
            f.restore()

    def reset_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-entry optimizer state (moments) of the frozen entries."""
        for f in self.frozen:
            state = optimizer.state.get(f.param, {})
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == f.param.shape:
                    f.zero_state(value)

    def attach(self, optimizer: Optional[torch.optim.Optimizer] = None) -> "MaskedUpdate":
        """Register gradient hooks (and step hooks when ``optimizer`` is given)."""
        for f in self.frozen:
            self._handles.append(f.param.register_post_accumulate_grad_hook(_grad_hook(f)))
        if optimizer is not None:
            opt = unwrap_optimizer(optimizer)
            self.reset_state(opt)
            self._handles.append(opt.register_step_pre_hook(lambda *_: self._pre_step()))
            self._handles.append(opt.register_step_post_hook(lambda *_: self.restore()))
        return self

    def _pre_step(self) -> None:
        self.mask_grads()  # e.g. grads set by hand after backward
        self.save()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "MaskedUpdate":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _grad_hook(f: _Frozen) -> Callable[[torch.Tensor], None]:
    def hook(_param: torch.Tensor) -> None:
        f.mask_grad()

    return hook


def _named_parameters(model: torch.nn.Module) -> Iterable[Tuple[str, torch.Tensor]]:
    """Names as in the checkpoint: strip DDP's ``module.`` and FSDP/compile prefixes."""
    for name, p in model.named_parameters():
        for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
            name = name.replace(prefix, "")
        yield name, p


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's (or another) wrapper.

    accelerate's ``AcceleratedOptimizer`` subclasses ``torch.optim.Optimizer`` without
    initialising it (it has no step-hook registries), so being an ``Optimizer`` is not
    enough: unwrap until the object can hold step hooks.
    """
    while not _has_step_hooks(optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _has_step_hooks(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_pre_hooks")


def masks_from_regions(model: torch.nn.Module, regions, tasks: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Union of the given tasks' cores, per parameter of ``model`` (bool, on CPU)."""
    names = dict(_named_parameters(model))
    out: Dict[str, torch.Tensor] = {}
    for task in tasks:
        for tensor in regions.tensor_names:
            if tensor not in names:
                continue
            m = regions.mask(task, tensor)
            out[tensor] = out[tensor] | m if tensor in out else m
    return out
