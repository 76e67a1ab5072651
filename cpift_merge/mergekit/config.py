"""The ``cpi`` parameters: their names, where they may appear in a mergekit recipe (a
plain dict) and which of them mergekit actually reads there, and their value checks.
Shared by ``cpift merge``'s up-front checks and the check hooked into stock mergekit's
planner."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterator, Tuple

from cpift_merge.errors import CpiftError


def param_blocks(cfg: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any], bool]]:
    """(where, parameters, per_model) for every parameters block of a raw recipe."""
    if isinstance(cfg.get("parameters"), dict):
        yield "parameters", cfg["parameters"], False
    for i, m in enumerate(cfg.get("models") or []):
        if isinstance(m, dict) and isinstance(m.get("parameters"), dict):
            yield f"models[{i}]", m["parameters"], True
    slices = list(enumerate(cfg.get("slices") or []))
    for mod_name, mod in (cfg.get("modules") or {}).items():
        if isinstance(mod, dict):
            if isinstance(mod.get("parameters"), dict):
                yield f"modules.{mod_name}", mod["parameters"], False
            for i, m in enumerate(mod.get("models") or []):
                if isinstance(m, dict) and isinstance(m.get("parameters"), dict):
                    yield f"modules.{mod_name}.models[{i}]", m["parameters"], True
            slices += [(f"{mod_name}.{i}", s) for i, s in enumerate(mod.get("slices") or [])]
    for i, s in slices:
        if isinstance(s, dict):
            if isinstance(s.get("parameters"), dict):
                yield f"slices[{i}]", s["parameters"], False
            for j, src in enumerate(s.get("sources") or []):
                if isinstance(src, dict) and isinstance(src.get("parameters"), dict):
                    yield f"slices[{i}].sources[{j}]", src["parameters"], True


PARAMETER_NAMES = ("omega", "density", "epsilon", "scope", "regions", "overlap", "exclude", "task", "score")
PER_MODEL = ("task",)  # the only per-model parameter; the rest are merge-wide

# value ranges of the numeric cpi parameters: (low, high)
RANGES = {"omega": (0.0, 1.0), "density": (0.0, 1.0), "epsilon": (0.0, 3.2)}
# parameters that must be one plain value for the whole merge
PLAIN = ("density", "scope", "regions", "exclude", "overlap", "score")


def _scalars(setting: Any) -> Iterator[Any]:
    if isinstance(setting, dict):
        yield from _scalars(setting.get("value"))
    elif isinstance(setting, list):
        for s in setting:
            yield from _scalars(s)
    else:
        yield setting


def check_parameter_place(key: str, where: str, per_model: bool) -> None:
    """Unknown names, and parameters where mergekit would silently not read them."""
    if key not in PARAMETER_NAMES:
        raise CpiftError(f"unknown cpi parameter {key!r} in {where}; known: {', '.join(PARAMETER_NAMES)}")
    if per_model and key not in PER_MODEL:
        raise CpiftError(
            f"cpi parameter {key} in {where} is merge-wide: set it under the top-level (or a"
            " slice's) parameters, not on one model"
        )
    if not per_model and key in PER_MODEL:
        raise CpiftError(f"cpi parameter {key} in {where} names one model's task: set it on that model")


def check_cpi_values(cfg: Dict[str, Any]) -> None:
    """Range and type checks of ``cpi`` parameter values, one clear line each."""
    for where, params, per_model in param_blocks(cfg):
        for key, setting in params.items():
            check_parameter_place(key, where, per_model)
            if key == "task" and not isinstance(setting, str):
                raise CpiftError(f"task in {where} must be a task name (a string), got {setting!r}")
            if key == "exclude" and isinstance(setting, str):
                try:
                    re.compile(setting)
                except re.error as err:
                    raise CpiftError(f"exclude in {where} is not a valid regex ({err}): {setting!r}") from None
            if key in PLAIN and isinstance(setting, (list, dict)):
                raise CpiftError(f"cpi parameter {key} in {where} must be one plain value (no gradient or filter)")
            for v in _scalars(setting):
                if key in RANGES:
                    lo, hi = RANGES[key]
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                        raise CpiftError(f"{key} in {where} must be a number in [{lo}, {hi}], got {v!r}")
                elif key == "scope" and v not in ("global", "tensor"):
                    raise CpiftError(f"scope in {where} must be 'global' or 'tensor', got {v!r}")
                elif key == "overlap" and v not in ("max_delta", "mean"):
                    raise CpiftError(f"overlap in {where} must be 'max_delta' or 'mean', got {v!r}")
                elif key == "score" and v not in ("delta", "relative", "fisher"):
                    raise CpiftError(f"score in {where} must be 'delta', 'relative' or 'fisher', got {v!r}")
