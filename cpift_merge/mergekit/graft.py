"""The graft test's models (does a task's core carry the task?) and the core transplant
of sequential fine-tuning.

``core only`` is theta_0 with the task's core taken from its fine-tune; ``core removed``
is the fine-tune with its core reset to theta_0. Both are the ``cpi`` fusion of one
task at ``omega = 0`` (:func:`cpift_merge.core.fusion.cpi_fuse`: the backbone bit for
bit outside the core, the other model's values on it), streamed tensor by tensor. A
random mask with the same number of entries in every tensor gives the control. The
papers' premise predicts ``core only`` close to the fine-tune and ``core removed``
close to theta_0.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from typing import Literal

import torch

from cpift_merge.core.fusion import cpi_fuse
from cpift_merge.errors import CpiftError
from cpift_merge.storage.checkpoint import Checkpoint, SafetensorsWriter
from cpift_merge.storage.files import atomic_dir, ensure_apart
from cpift_merge.storage.regions import RegionSet, samples_close

KEEP = ("core", "rest")
MASKS = ("core", "random")
RECORDS = ("probe.json", "stage.json", "run.json", "train.json", "cpi_stats.json")  # not the graft's
# side files a written model does not inherit from its source: index, model card, run records
SKIPPED = ("model.safetensors.index.json", "README.md", *RECORDS)


def random_mask(rs: RegionSet, task: str, tensor: str, seed: int) -> torch.Tensor:
    """A seeded random mask of ``tensor`` with as many entries as ``task``'s core has there."""
    numel = math.prod(rs.shape(tensor))
    count = int((rs.meta.get("counts") or {}).get(task, {}).get(tensor, 0))
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tensor.encode()))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=g)[:count]] = True
    return mask.reshape(rs.shape(tensor))


def transplant(backbone: str, donor: str, rs: RegionSet, task: str, out: str, *, overwrite: bool = False) -> str:
    """Write ``backbone`` with ``task``'s core values copied from ``donor`` into ``out``: the
    ``cpi`` fusion at ``omega = 0`` (backbone bit for bit outside the core). Both models
    descend from the region file's base (sequential fine-tuning: the model after A is
    the donor of A's core, the model after A then B the backbone)."""
    if task not in rs.tasks:
        raise CpiftError(f"region file {rs.path} has no task {task!r} (has {rs.tasks})")
    ensure_apart(out, [backbone, donor])
    into, src = Checkpoint(backbone, label=backbone), Checkpoint(donor, label=donor)

    def tensor(name: str, info) -> torch.Tensor:
        t = into.get(name)
        if name not in src.infos or list(src.infos[name].shape) != list(info.shape):
            raise CpiftError(f"model {donor} has no tensor {name} shaped like {backbone}'s")
        if not rs.has_tensor(name):
            return t
        if rs.shape(name) != list(info.shape):
            raise CpiftError(f"region file {rs.path} has {name} shaped {rs.shape(name)}, not {list(info.shape)}")
        return cpi_fuse(t, [src.get(name).to(t.dtype)], [rs.mask(task, name)], omega=0.0)[0]

    return _write_model(out, into, tensor, side_files_from=backbone, overwrite=overwrite)


def _write_model(out: str, layout: Checkpoint, tensor, *, side_files_from: str, overwrite: bool) -> str:
    """Write ``out`` atomically: ``tensor(name, info)`` for every tensor of ``layout``,
    streamed one at a time into one safetensors file, beside the config, tokenizer and
    generation config of ``side_files_from`` (not its weights, run records or card)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = SafetensorsWriter(os.path.join(tmp, "model.safetensors"))
        for name, info in layout.infos.items():
            writer.add(name, tensor(name, info), shape=info.shape)
        writer.close({"format": "pt"})
        for f in os.listdir(side_files_from):
            src = os.path.join(side_files_from, f)
            ours = f.endswith((".safetensors", ".jsonl")) or f in SKIPPED
            if os.path.isfile(src) and not ours:
                shutil.copy(src, os.path.join(tmp, f))
    return os.path.abspath(out)


def graft(
    base: str,
    model: str,
    rs: RegionSet,
    task: str,
    out: str,
    *,
    keep: Literal["core", "rest"] = "core",
    mask: Literal["core", "random"] = "core",
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Write the ``keep="core"`` (theta_0 + the core of ``model``) or ``keep="rest"``
    (``model`` with the core reset to theta_0) graft of ``task`` into ``out``; ``mask``
    ``random`` uses :func:`random_mask` instead of the core. ``base`` must be the
    theta_0 and ``model`` the fine-tune that ``rs`` was computed from."""
    if keep not in KEEP or mask not in MASKS:
        raise CpiftError(f"graft keeps one of {KEEP} with a mask of {MASKS}, got {keep!r} and {mask!r}")
    if task not in rs.tasks:
        raise CpiftError(f"region file {rs.path} has no task {task!r} (has {rs.tasks})")
    ensure_apart(out, [base, model])
    theta0, theta = Checkpoint(base, label=base), Checkpoint(model, label=model)
    other = rs.other_base_tensor(theta0)
    if other is not None:
        raise CpiftError(f"region file {rs.path} was computed on another base than {base} ({other} differs)")

    def tensor(name: str, info) -> torch.Tensor:
        t0 = theta0.get(name)
        if name not in theta.infos or list(theta.infos[name].shape) != list(info.shape):
            raise CpiftError(f"model {model} has no tensor {name} shaped like the base's")
        ti = theta.get(name).to(t0.dtype)
        recorded = rs.sample(task, name)
        if recorded is not None and not samples_close(torch.tensor(theta.sample(name), dtype=t0.dtype), recorded):
            raise CpiftError(f"model {model} is not task {task} of region file {rs.path} ({name} differs)")
        if rs.has_tensor(name):
            m = rs.mask(task, name) if mask == "core" else random_mask(rs, task, name, seed)
        else:
            m = torch.zeros(t0.shape, dtype=torch.bool)
        return (cpi_fuse(t0, [ti], [m], omega=0.0) if keep == "core" else cpi_fuse(ti, [t0], [m], omega=0.0))[0]

    return _write_model(out, theta0, tensor, side_files_from=model, overwrite=overwrite)  # the fine-tune's files
