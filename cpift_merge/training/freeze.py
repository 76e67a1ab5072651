"""The masked update: frozen entries stay bit-identical, everything else trains.

This is the one place where freezing happens (probes, staged SFT, calibration, the
HF Trainer / TRL callbacks all use :class:`MaskedUpdate`). Zeroing gradients is not
enough: decoupled weight decay and momentum carried over from an earlier stage still
move an entry whose gradient is zero. So:

1. gradients of frozen entries are zeroed as soon as they are accumulated
   (``register_post_accumulate_grad_hook``), so gradient clipping and every norm see
   the masked gradients, also under gradient accumulation, and again in an optimizer
   *step pre-hook* (clipping, unscaling, all-reduce or a hand-set gradient may have
   written them since);
2. when a stage begins (and whenever optimizer state is loaded), optimizer moments of
   frozen entries are zeroed, so they carry nothing over;
3. the step itself, two ways:

   * ``torch.optim.Adam`` / ``AdamW`` (decoupled or no weight decay, ``eps > 0``):
     with a zero gradient and zero moments, Adam's update of an entry is exactly
     ``-0`` (``m = 0``, ``v = 0``, ``0 / eps = 0``) and the entry keeps its bits; the
     only thing that would move it is decoupled weight decay ``p *= 1 - lr * wd``.
     The pre-hook sets the group's ``weight_decay`` to 0 for the step and applies the
     same multiplication itself, to free entries only (frozen ones are multiplied by
     exactly 1); the post-hook puts ``weight_decay`` back. No copy of the parameters,
     no restore pass.
   * any other optimizer (SGD with momentum, Adafactor, Adam with L2 decay, ...): the
     pre-hook saves the frozen entries and the post-hook writes them back, whatever the
     optimizer did: ``torch.equal`` holds by construction.

Masks live on the parameter's device as 1 bit per entry (``storage="bits"``, default)
or 1 byte (``storage="bytes"``, a signed keep mask, no unpacking); a parameter with
under 1/64 of its entries frozen keeps sorted int64 indices instead (O(frozen) work);
parameters with no frozen entry carry no mask at all. Dense masks are applied with
integer bit operations on the values' bit patterns (exact for NaN, inf and -0), a
block at a time, so no full-size bool or float mask is ever built. The step hooks
are registered on the torch optimizer itself, so they also fire through accelerate's
wrapper, DDP, FSDP2 and AMP.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from cpift_merge.core import masks as maskcodec

# Entries are handled in blocks of 8 * _BLOCK (the last block may be shorter), each
# seen as an [8, columns] matrix; a block's keep mask (at most 8 * _BLOCK integers of
# the values' width, 2 MiB for float32) lives in a scratch buffer reused across blocks
# and tensors, so it stays in cache and no large temporary is allocated per step.
_BLOCK = 1 << 16
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_scratch = threading.local()  # per thread: autograd may run hooks in device threads


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """The same memory read as signed integers of the element's width."""
    return t.view(_INT[t.element_size()])


def _float_bits(value: float, dtype: torch.dtype) -> int:
    return int(torch.tensor([value], dtype=dtype).view(_INT[torch.tensor([], dtype=dtype).element_size()])[0])


def _cached(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = make()
    return buf


def _buffer(kind: str, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable [rows, _BLOCK] scratch tensor of this thread."""
    return _cached((kind, rows, _BLOCK, dtype, device), lambda: torch.empty(rows, _BLOCK, dtype=dtype, device=device))


def _scratch_bytes() -> int:
    """Bytes of this thread's scratch buffers (kept between steps, O(one block))."""
    return sum(t.numel() * t.element_size() for t in getattr(_scratch, "bufs", {}).values())


def _spans(numel: int) -> Iterator[Tuple[int, int]]:
    """Column ranges ``[a, e)`` of the blocks: block entries ``8a .. 8e``."""
    n8 = numel // 8
    for a in range(0, n8, _BLOCK):
        yield a, min(a + _BLOCK, n8)


class _Frozen:
    """The frozen entries of one parameter (its local shard under FSDP2).

    Encodings, whichever is smaller: sorted int64 flat indices (what torch's index ops
    take) when under 1/64 of the entries are frozen, so every operation costs
    O(frozen); else a *keep mask* (-1 free, 0 frozen) over the first
    ``8 * (numel // 8)`` entries plus up to 7 tail entries (kept as int8). In blocks of
    ``8 * w`` entries (``w <= _BLOCK`` columns), entry ``8a + j * w + i`` of the block
    starting at column ``a`` is row ``j``, column ``i``:

    * ``"bits"``: byte ``a + i`` holds bit ``j`` = 1 when that entry is free; a block's
      keep mask is two shifts away (bit ``j`` to the sign bit, arithmetic shift back);
    * ``"bytes"``: the int8 keep mask itself, 1 byte per entry.

    The keep mask, widened to the values' integer width, is AND-ed into their bit
    patterns (zero frozen gradients or moments; exact for NaN and inf), selects
    between two bit patterns (restore), or picks the weight decay factor per entry
    (exactly 1.0, or ``1 - lr * wd``).
    """

    __slots__ = ("param", "name", "numel", "count", "_idx", "_bits", "_bytes", "_tail", "_saved")

    def __init__(self, name: str, param: torch.Tensor, mask: torch.Tensor, storage: str):
        if mask.numel() != param.numel():
            raise ValueError(f"mask for {name} has {mask.numel()} entries, the parameter {param.numel()}")
        local = _local(param)
        flat = _shard_mask(name, mask, param).reshape(-1).to(device=local.device, dtype=torch.bool)
        self.param, self.name, self.numel = param, name, local.numel()
        self.count = int(torch.count_nonzero(flat))
        sparse = 8 * self.count < maskcodec.packed_size(self.numel)
        self._idx = flat.nonzero().reshape(-1) if sparse else None
        self._bits = self._bytes = self._tail = None
        if not sparse:
            n8 = self.numel // 8
            keep = (~flat).to(torch.int8)  # 1 free, 0 frozen
            if storage == "bits":
                weights = torch.tensor([[1 << j] for j in range(8)], dtype=torch.uint8, device=flat.device)
                self._bits = torch.empty(n8, dtype=torch.int8, device=flat.device)
                for a, e in _spans(self.numel):
                    planes = keep[8 * a : 8 * e].view(8, e - a).view(torch.uint8)
                    self._bits[a:e] = (planes * weights).sum(0, dtype=torch.uint8).view(torch.int8)
            else:
                self._bytes = keep[: 8 * n8].neg()
            if self.numel > 8 * n8:
                self._tail = keep[8 * n8 :].neg()
        self._saved: Optional[torch.Tensor] = None

    # ------------------------------------------------------------ keep masks
    def _keep(self, a: int, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Keep mask of the block at columns ``[a, e)`` as ``[8, e - a]`` integers of
        ``dtype`` (a view of this thread's scratch buffer: use it before the next call)."""
        w, device = e - a, (self._bits if self._bits is not None else self._bytes).device
        out = _buffer("keep", 8, dtype, device)[:, :w]
        if self._bytes is not None:
            return out.copy_(self._bytes[8 * a : 8 * e].view(8, w))
        width = 8 * torch.tensor([], dtype=dtype).element_size()
        wide = _buffer("bits", 1, dtype, device)[:, :w]
        wide.copy_(self._bits[None, a:e])  # sign-extends; the high bits shift out below
        shifts = _cached(
            ("shifts", dtype, device),  # bit j to the sign bit
            lambda: torch.arange(width - 1, width - 9, -1, dtype=dtype, device=device).view(8, 1),
        )
        torch.bitwise_left_shift(wide, shifts, out=out)
        return out.bitwise_right_shift_(width - 1)

    def _blocks(self, *tensors: torch.Tensor) -> Iterator[Tuple[Callable[[torch.dtype], torch.Tensor], ...]]:
        """``(keep, view, ...)`` per block: ``keep(dtype)`` gives the block's keep mask
        shaped like the views of each flat ``tensor``."""
        for a, e in _spans(self.numel):
            yield (lambda dt, a=a, e=e: self._keep(a, e, dt), *[t[8 * a : 8 * e].view(8, e - a) for t in tensors])
        if self._tail is not None:
            n = 8 * (self.numel // 8)
            yield (lambda dt: self._tail.to(dt), *[t[n:] for t in tensors])

    def mask(self) -> torch.Tensor:
        """Flat bool mask, True = frozen (built on demand, not kept)."""
        if self._idx is not None:
            m = torch.zeros(self.numel, dtype=torch.bool, device=self._idx.device)
            m[self._idx] = True
            return m
        return torch.cat([keep(torch.int8).reshape(-1) == 0 for (keep,) in self._blocks()])

    @property
    def nbytes(self) -> int:
        ts = (
            [self._idx]
            if self._idx is not None
            else [t for t in (self._bits, self._bytes, self._tail) if t is not None]
        )
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------ operations
    def _data(self) -> torch.Tensor:
        return _local(self.param).detach().view(-1)

    def _zero(self, flat: torch.Tensor) -> None:
        """Zero the frozen entries of a flat tensor shaped like the parameter."""
        if self._idx is not None:
            flat.index_fill_(0, self._idx, 0)
            return
        for keep, part in self._blocks(flat):
            part = _as_int(part)
            part.bitwise_and_(keep(part.dtype))

    def mask_grad(self) -> None:
        g = self.param.grad
        if g is not None:
            self._zero(_local(g).view(-1))

    def zero_state(self, value: torch.Tensor) -> None:
        self._zero(_local(value).view(-1))

    def save(self) -> None:
        data = self._data()
        self._saved = data.index_select(0, self._idx) if self._idx is not None else data.clone()

    def restore(self) -> None:
        if self._saved is None:
            return
        data = self._data()
        if self._idx is not None:
            data.index_copy_(0, self._idx, self._saved)
        else:  # data = saved where frozen: ((data ^ saved) & keep) ^ saved, in place
            for keep, d, s in self._blocks(data, self._saved):
                d, s = _as_int(d), _as_int(s)
                d.bitwise_xor_(s).bitwise_and_(keep(d.dtype)).bitwise_xor_(s)
        self._saved = None

    def decay_and_mask_grad(self, factor: float) -> None:
        """Zero the frozen gradients and multiply the free entries by ``factor``
        (decoupled weight decay, computed as torch's Adam does: in float32 for
        float32/bf16/fp16 parameters, in float64 for float64 ones); frozen entries are
        multiplied by exactly 1."""
        data, grad = self._data(), _local(self.param.grad).view(-1)
        if self._idx is not None:
            grad.index_fill_(0, self._idx, 0)
            kept = data.index_select(0, self._idx)
            data.mul_(factor)
            data.index_copy_(0, self._idx, kept)
            return
        fdt = torch.float64 if data.dtype == torch.float64 else torch.float32
        idt = _INT[torch.tensor([], dtype=fdt).element_size()]
        width = 8 * torch.tensor([], dtype=fdt).element_size()
        one, fac = _float_bits(1.0, fdt), _float_bits(factor, fdt)
        delta = (one - fac + (1 << (width - 1))) % (1 << width) - (1 << (width - 1))  # wraps like the int op
        base = torch.tensor([one], dtype=idt, device=data.device)
        for keep, p, g in self._blocks(data, grad):
            g = _as_int(g)
            if g.dtype != idt:  # e.g. bf16 gradients: their own width first
                g.bitwise_and_(keep(g.dtype))
            k = keep(idt)
            if g.dtype == idt:
                g.bitwise_and_(k)
            # keep = -1 (free): one - (one - fac) = fac;  keep = 0 (frozen): one
            p.mul_(torch.add(base, k, alpha=delta, out=k).view(fdt))


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

    ``adam_fast_path=False`` makes Adam/AdamW use the save/restore path too (for
    comparison; the result is the same).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        masks: Mapping[str, torch.Tensor],
        storage: str = "bits",
        adam_fast_path: bool = True,
    ):
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
        self._by_id = {id(f.param): f for f in self.frozen}
        self.adam_fast_path = adam_fast_path
        self.last_step: Optional[str] = None  # "adam", "generic" or "adam+generic"
        self._buffer_bytes = 0
        self._handles: List = []
        self._decay_off: List[Tuple[dict, float]] = []  # groups whose weight_decay the step borrows

    # ------------------------------------------------------------------ facts
    @property
    def frozen_count(self) -> int:
        """Frozen entries held by this process (its shards only, under FSDP2)."""
        return sum(f.count for f in self.frozen)

    @property
    def step_buffer_bytes(self) -> int:
        """Extra memory the last optimizer step used: on the save/restore path the saved
        values (the frozen values, or a copy of each parameter with a dense mask), on
        the Adam path only the frozen values of one sparse-masked parameter at a time;
        plus the block scratch buffers (a few MiB, kept for the next step)."""
        return self._buffer_bytes

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
                if isinstance(value, torch.Tensor) and value.shape == f.param.shape and value.is_floating_point():
                    f.zero_state(value)

    def attach(self, optimizer: Optional[torch.optim.Optimizer] = None) -> MaskedUpdate:
        """Register gradient hooks (and step hooks when ``optimizer`` is given)."""
        for f in self.frozen:
            self._handles.append(f.param.register_post_accumulate_grad_hook(_grad_hook(f)))
        if optimizer is not None:
            opt = unwrap_optimizer(optimizer)
            self.reset_state(opt)
            self._handles.append(opt.register_step_pre_hook(lambda o, *_: self._pre_step(o)))
            self._handles.append(opt.register_step_post_hook(lambda *_: self._post_step()))
            # moments loaded from a checkpoint after attach: zero the frozen ones again
            self._handles.append(opt.register_load_state_dict_post_hook(self.reset_state))
        return self

    def _pre_step(self, opt: torch.optim.Optimizer) -> None:
        self._give_back_decay()  # a step that raised left weight_decay borrowed
        adam = self.adam_fast_path and type(opt) in (torch.optim.Adam, torch.optim.AdamW)
        paths, held = [], 0
        for group in opt.param_groups:
            frozen = [self._by_id[id(p)] for p in group["params"] if id(p) in self._by_id]
            if not frozen:
                continue
            if adam and _adam_exact(group):
                held = max(held, self._adam_group(group, frozen))
                paths.append("adam")
            else:
                for f in frozen:
                    f.mask_grad()
                    f.save()
                    held += f._saved.numel() * f._saved.element_size()
                paths.append("generic")
        self.last_step = "+".join(sorted(set(paths))) or None
        self._buffer_bytes = held + _scratch_bytes()

    def _adam_group(self, group: dict, frozen: List[_Frozen]) -> int:
        """Adam/AdamW group: masked gradients and zero moments leave frozen entries
        exactly in place, so only decoupled weight decay is done here, on free entries,
        with the group's ``weight_decay`` set to 0 for the step. Returns the most bytes
        of frozen values held at once (sparse masks)."""
        wd = group["weight_decay"]
        if wd == 0:
            for f in frozen:
                f.mask_grad()
            return 0
        factor = 1 - group["lr"] * wd  # as torch's Adam computes it, at step time
        masked = {id(f.param) for f in frozen}
        others = [_local(p).detach() for p in group["params"] if p.grad is not None and id(p) not in masked]
        if others:
            torch._foreach_mul_(others, factor)
        peak = 0
        for f in frozen:
            if f.param.grad is None:  # Adam skips it: no decay either
                continue
            f.decay_and_mask_grad(float(factor))
            if f._idx is not None:
                peak = max(peak, f.count * f.param.element_size())
        self._decay_off.append((group, wd))
        group["weight_decay"] = 0.0
        return peak

    def _post_step(self) -> None:
        self._give_back_decay()
        self.restore()

    def _give_back_decay(self) -> None:
        for group, wd in self._decay_off:
            group["weight_decay"] = wd
        self._decay_off.clear()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._give_back_decay()

    def __enter__(self) -> MaskedUpdate:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _adam_exact(group: dict) -> bool:
    """Whether torch's Adam/AdamW leaves an entry with zero gradient and zero moments
    exactly in place, apart from decoupled weight decay: ``eps > 0`` (the update is
    ``0 / eps``) and no L2 term folded into the gradient."""
    wd, eps = group.get("weight_decay", 0), group.get("eps", 0)
    if isinstance(wd, torch.Tensor) or isinstance(eps, torch.Tensor) or not eps > 0:
        return False
    return wd == 0 or bool(group.get("decoupled_weight_decay", False))


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
