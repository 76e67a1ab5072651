"""The mergekit merge method ``cpi``: CPI core transplant plus SLERP of the rest.

A thin adapter around :func:`cpift_merge.core.fusion.fuse_stream`: it finds each task's core
mask for the tensor at hand (from a region directory, computed per tensor, or from a
cached global pre-pass) and hands the tensors over.

YAML parameters (all optional)::

    omega:    0.5        # SLERP factor for non-core entries, [0, 1]; gradients/filters work
    density:  0.01       # core share; default: the region file's, else 0.01
    epsilon:  0.0316     # angle (radians) under which SLERP falls back to linear
    scope:    global     # global | tensor; default: the region file's, else global
    regions:  ./regions  # region directory from `cpift regions`
    overlap:  max_delta  # max_delta | mean
    exclude:  "norm|embed"   # regex; matching tensors have no core (pure SLERP)
    task:     math       # per model: which region-file task this model is

Unknown parameter names are errors (mergekit would ignore them silently).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import click
import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    OptionalTensorPolicy,
    PerNonBase,
    TensorGroup,
    merge_method,
    registry,
)
from pydantic import Field
from typing_extensions import Annotated, Literal

from cpift_merge.core import localization, topk
from cpift_merge.core.fusion import CHUNK, DEFAULT_EPSILON, ThresholdCores, fuse_stream, given_cores
from cpift_merge.errors import CpiftError
from cpift_merge.mergekit.prepass import DEFAULT_DENSITY, DEFAULT_SCOPE, global_prepass
from cpift_merge.storage.checkpoint import DTYPE_NAMES, Checkpoint, sample_positions
from cpift_merge.storage.files import file_stamps
from cpift_merge.storage.regions import GlobalCut, RegionSet, load_regions, samples_close

LOG = logging.getLogger(__name__)
METHOD_NAME = "cpi"

# Per-tensor statistics of the current process's merges (read by `cpift merge`).
_STATS_LOCK = threading.Lock()
STATS: Dict[str, Dict[str, Any]] = {}


def reset_stats() -> None:
    with _STATS_LOCK:
        STATS.clear()


# ------------------------------------------------------------------ resolution


@lru_cache(maxsize=16)
def _regions_at(path: str, stamp: Tuple) -> RegionSet:
    return load_regions(path)


def _regions(path: str) -> RegionSet:
    """The region directory at ``path``, re-read when its files change."""
    return _regions_at(path, file_stamps(path))


@lru_cache(maxsize=16)
def _checkpoint_at(path: str, stamp: Tuple) -> Checkpoint:
    return Checkpoint(path)


def _checkpoint(path: str) -> Checkpoint:
    return _checkpoint_at(path, file_stamps(path))


def _model_path(model_id: Any) -> str:
    """Local folder of a merge input: mergekit resolves hub ids, LoRAs, etc."""
    try:
        from mergekit.io.tasks import LoaderCache

        return LoaderCache().get(model_id).index.base_path
    except Exception:
        path = getattr(getattr(model_id, "model", None), "path", None) or str(model_id)
        return os.path.abspath(os.path.expanduser(path))


def _label(model_id: Any) -> str:
    return str(model_id)


def _samples_of(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat[torch.tensor(sample_positions(flat.numel()), device=flat.device)].cpu()


def _match_task(regions: RegionSet, model_id: Any, tensor_name: str, tensor: torch.Tensor, explicit: str) -> str:
    """Which region-file task a merge input is, checked against the recorded samples."""
    tasks = regions.tasks
    if explicit:
        if explicit not in tasks:
            raise CpiftError(
                f"model {_label(model_id)}: task {explicit!r} is not in region file {regions.path} (it has {tasks})"
            )
        return explicit
    path = _model_path(model_id)
    for t in tasks:
        if os.path.abspath(regions.meta["tasks"][t]["path"]) == path:
            return t
    for t in tasks:
        if os.path.basename(path.rstrip("/")) == t:
            return t
    if regions.has_tensor(tensor_name):
        values = _samples_of(tensor)
        hits = [t for t in tasks if samples_close(values, regions.sample(t, tensor_name))]
        if len(hits) == 1:
            return hits[0]
    raise CpiftError(
        f"model {_label(model_id)} matches no task of region file {regions.path}"
        f" (tasks {tasks}); add `parameters: {{task: NAME}}` to that model"
    )


def _check_against(regions: RegionSet, task: str, model_id: Any, name: str, tensor: torch.Tensor) -> None:
    recorded = regions.sample(task, name)
    if recorded is None:
        return
    values = _samples_of(tensor)
    if samples_close(values, recorded):
        return
    others = [t for t in regions.tasks if t != task and samples_close(values, regions.sample(t, name) or [])]
    if others:
        raise CpiftError(
            f"model {_label(model_id)} is task {others[0]}, not {task}, in region file"
            f" {regions.path}; set `task: {others[0]}` on it"
        )
    raise CpiftError(
        f"region file {regions.path} was made from other models: tensor {name} of"
        f" {_label(model_id)} does not match task {task}'s fingerprint; recompute"
        " the regions for these models"
    )


def check_region_settings(
    regions: RegionSet, density: Optional[float], scope: Optional[str], score: Optional[str] = None
) -> None:
    if score is not None and regions.score != score:
        raise CpiftError(
            f"region file {regions.path} was cut by score {regions.score} but the recipe asks"
            f" for {score}; drop score or recompute the regions with --score {score}"
        )
    if density is not None and abs(regions.density - density) > 1e-12:
        raise CpiftError(
            f"region file {regions.path} has density {regions.density} but the recipe asks"
            f" for {density}; drop density or recompute the regions"
        )
    if scope is not None and regions.scope != scope:
        raise CpiftError(
            f"region file {regions.path} has scope {regions.scope} but the recipe asks"
            f" for {scope}; drop scope or recompute the regions"
        )


def _global_cores(cut: GlobalCut, name: str, base_entry, entries) -> tuple[List[torch.Tensor], List[list]]:
    """Cores of one tensor from a global cut, as sorted flat indices, and each task's
    ``delta_sums``. Keys must be computed from exactly the values the pre-pass saw: when
    mergekit converted the inputs' dtype, the tensors are re-read from disk for the keys
    (the merge itself still uses mergekit's inputs). Streams the tensor in chunks (as the
    fusion does), so no tensor-sized temporary is made."""
    recorded = cut.dtypes[name]

    def original(entry) -> torch.Tensor:
        t = entry.tensor
        if DTYPE_NAMES.get(t.dtype) == recorded:
            return t
        return _checkpoint(_model_path(entry.id)).get(name).to(t.device)

    theta0 = original(base_entry).reshape(-1)
    thetas = [original(e).reshape(-1) for e in entries]
    numel = theta0.numel()
    size = min(numel, CHUNK)
    base32 = torch.empty(size, dtype=torch.float32, device=theta0.device)
    buf = torch.empty(size, dtype=torch.float32, device=theta0.device)
    core_of, totals = _cut_cores(cut, name, len(thetas))
    parts: List[List[torch.Tensor]] = [[] for _ in thetas]
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        b = base32[: stop - start].copy_(theta0[start:stop])
        for i, t in enumerate(thetas):
            # no finiteness check: the pre-pass passed these exact values
            delta = topk.magnitude_keys(t[start:stop], b, out=buf[: stop - start], check=False).view(torch.float32)
            parts[i].append(core_of(i, start, stop, delta).add_(start))
    return [torch.cat(p) for p in parts], core_of.delta_sums(totals)


def _core_size(core: torch.Tensor) -> int:
    return int(torch.count_nonzero(core)) if core.dtype == torch.bool else core.numel()


# ---------------------------------------------------------------- the kernel


def _check_finite(group: TensorGroup, name: str) -> None:
    for entry in group.entries:
        if not topk.all_finite(entry.tensor):
            raise CpiftError(
                f"model {_label(entry.id)} has NaN or Inf in tensor {name}; fix or re-export that checkpoint"
            )


@merge_method(
    name=METHOD_NAME,
    pretty_name="CPI (core parameter isolation)",
    reference_url="https://arxiv.org/abs/2508.21741",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
)
def cpi_merge(
    group: TensorGroup,
    omega: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5,
    density: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None,
    epsilon: Annotated[float, Field(ge=0.0)] = DEFAULT_EPSILON,
    scope: Optional[Literal["global", "tensor"]] = None,
    regions: str = "",
    overlap: Literal["max_delta", "mean"] = "max_delta",
    exclude: str = "",
    task: PerNonBase[str] = "",
    score: Optional[Literal["delta", "relative", "fisher"]] = None,
) -> torch.Tensor:
    name = group.metadata.name or "?"
    if score not in (None, "delta") and not regions:
        raise CpiftError(
            f"cpi: score {score} needs a region file; make one with `cpift regions --score {score}`"
            " and pass it as `regions:`"
        )
    base_entry = group.base
    entries = group.non_base
    base = base_entry.tensor
    thetas = [e.tensor for e in entries]
    excluded = bool(exclude) and re.search(exclude, name) is not None
    global_cut = not (excluded or (density == 0.0 and not regions) or regions) and (scope or DEFAULT_SCOPE) == "global"
    if not global_cut:
        _check_finite(group, name)
    theta0: Optional[torch.Tensor] = None
    names: List[str] = [_label(e.id) for e in entries]
    sums: Optional[List[list]] = None  # per task: core/total ‖Δ‖₁, ‖Δ‖₂² (cores found here, from theta_0)

    if excluded or (density == 0.0 and not regions):
        cores = [base.new_zeros(0, dtype=torch.int64) for _ in entries]  # no core: empty index lists
    elif regions:
        rs = _regions(os.path.abspath(os.path.expanduser(regions)))
        check_region_settings(rs, density, scope, score)
        names = [_match_task(rs, e.id, name, e.tensor, task.get(e.id, "")) for e in entries]
        if len(set(names)) != len(names):
            raise CpiftError(f"two merge inputs map to the same region-file task ({names})")
        if rs.has_tensor(name):
            for n, e in zip(names, entries):
                _check_against(rs, n, e.id, name, e.tensor)
            cores = [rs.mask(n, name, device=base.device) for n in names]
            base_sample = rs.sample("__base__", name)
            if overlap == "max_delta" and base_sample is not None and not samples_close(_samples_of(base), base_sample):
                theta0 = _lazy_theta0(rs, name, base)
        else:
            cores = [base.new_zeros(0, dtype=torch.int64) for _ in entries]  # no core: empty index lists
    elif (scope or DEFAULT_SCOPE) == "tensor":
        d = DEFAULT_DENSITY if density is None else density
        cores, sums = [], []
        for t in thetas:
            keys = topk.magnitude_keys(t, base)
            mask = topk.exact_top_k(keys, topk.budget(d, keys.numel()))
            sums.append(list(localization.delta_sums(keys.view(torch.float32), mask)))
            cores.append(mask.reshape(base.shape))
    else:
        d = DEFAULT_DENSITY if density is None else density
        paths = [_model_path(e.id) for e in entries]
        cut = global_prepass(_model_path(base_entry.id), paths, d, exclude, progress=not _QUIET)
        if name in cut.dtypes and all(DTYPE_NAMES.get(e.tensor.dtype) == cut.dtypes[name] for e in group.entries):
            # the pre-pass read (and checked) these very values: cores found in the fusion's own pass
            core_of, totals = _cut_cores(cut, name, len(entries))
            out, stats = fuse_stream(
                base, thetas, core_of, omega=omega, epsilon=epsilon, overlap=overlap, with_delta=True
            )
            _record(name, base, names, stats, omega, core_of.delta_sums(totals), core_of.sizes)
            return out
        _check_finite(group, name)  # values the pre-pass did not see
        if name in cut.dtypes:
            cores, sums = _global_cores(cut, name, base_entry, entries)
        else:
            cores = [base.new_zeros(0, dtype=torch.int64) for _ in entries]  # no core: empty index lists

    for n, c in zip(names, cores):
        if c.dtype == torch.bool and c.shape != base.shape:
            raise CpiftError(
                f"core mask of {n} for {name} has shape {list(c.shape)} but the tensor is"
                f" {list(base.shape)} (a vocabulary change?); exclude it with `exclude:`"
            )
    if len(cores) != len(thetas):
        raise CpiftError(f"cpi: {len(cores)} cores for {len(thetas)} models in {name}")
    core_of = given_cores(cores, base.device)
    out, stats = fuse_stream(base, thetas, core_of, omega=omega, epsilon=epsilon, overlap=overlap, theta0=theta0)
    _record(name, base, names, stats, omega, sums, [_core_size(c) for c in cores] if sums is not None else None)
    return out


def _record(name, base, names, stats, omega, sums, sizes) -> None:
    """Keep one tensor's merge statistics for ``cpi_stats.json``."""
    with _STATS_LOCK:
        STATS[name] = {
            "numel": base.numel(),
            "core_entries": stats.core_entries,
            "overlap_entries": stats.overlap_entries,
            "transplanted": dict(zip(names, stats.transplanted)),
            "omega": omega,
        }
        if sums is not None:
            STATS[name]["core_sizes"] = dict(zip(names, sizes))
            STATS[name]["delta_sums"] = dict(zip(names, sums))


def _cut_cores(cut: GlobalCut, name: str, tasks: int):
    """``fuse_stream``'s ``core_of`` for a global cut (:class:`ThresholdCores`: each
    chunk's core from its |Δ| keys, tie quotas carried across chunks, the cores' sizes and
    |Δ| sums tallied) and the tensor's whole ``(‖Δ‖₁, ‖Δ‖₂²)`` per task from the cut (None
    where the cut has no totals: the cores then tally them too)."""
    keys = [f"t{i}" for i in range(tasks)]
    totals = [cut.totals.get(t, {}).get(name) for t in keys]
    core_of = ThresholdCores(
        [cut.thresholds[t].key for t in keys],
        [cut.quotas[t].get(name, 0) for t in keys],
        norms=any(t is None for t in totals),
    )
    return core_of, totals


def _lazy_theta0(rs: RegionSet, name: str, base: torch.Tensor) -> torch.Tensor:
    """theta_0's tensor when the backbone is not theta_0 (needed by max_delta)."""
    path = rs.meta["base"]["path"]
    try:
        return _checkpoint(path).get(name).to(base.device)
    except CpiftError as err:
        raise CpiftError(
            f"overlap max_delta needs the pre-trained reference recorded in {rs.path}"
            f" ({path}), which cannot be read ({err}); make it readable or use overlap: mean"
        ) from None


# ---------------------------------------------------------------- registration

# The merge's ``quiet`` option (``mergekit-yaml --quiet``), as mergekit's planner last saw it:
# the in-kernel pre-pass then draws no progress bars either.
_QUIET = False


def register_method() -> None:
    """Make ``cpi`` resolvable by name in mergekit's registry (idempotent)."""
    try:
        registry.get(METHOD_NAME)
    except RuntimeError:
        registry.register(cpi_merge)


def register() -> None:
    """Make ``cpi`` available to mergekit, with its parameter check. Safe to call any
    number of times; this is the one line to add where the autoload hook is off."""
    register_method()
    install_parameter_check()


class RecipeError(CpiftError, click.ClickException):
    """A bad ``cpi`` recipe seen under stock mergekit: a CpiftError for Python callers,
    and for mergekit's click commands one ``Error: ...`` line instead of a traceback."""

    def __init__(self, message: str):
        super().__init__(f"cpi: {message}")


def check_parameters(config: Any) -> None:
    """Reject misspelled, misplaced and out-of-range ``cpi`` parameters anywhere in a
    MergeConfiguration (mergekit's own validation style: one line)."""
    if getattr(config, "merge_method", None) != METHOD_NAME:
        return
    from cpift_merge.mergekit.config import check_cpi_values

    raw = config.model_dump(mode="json", exclude_none=True)
    try:
        check_cpi_values(raw)  # names and places, then values and ranges
    except CpiftError as err:
        raise RecipeError(str(err)) from None


def install_parameter_check() -> None:
    """Have mergekit's planner call :func:`check_parameters` (once per process)."""
    from mergekit import plan

    planner = plan.MergePlanner
    if getattr(planner.normalize_config, "_cpift_checked", False):
        return
    original = planner.normalize_config

    def normalize_config(self, *args, **kwargs):
        global _QUIET
        _QUIET = bool(getattr(getattr(self, "options", None), "quiet", False))  # mergekit-yaml --quiet
        check_parameters(self.config)
        return original(self, *args, **kwargs)

    normalize_config._cpift_checked = True  # type: ignore[attr-defined]
    planner.normalize_config = normalize_config


# Importing this module makes ``cpi`` resolvable by name (idempotent).
register_method()
