"""Where ``cpi`` parameters may appear in a mergekit recipe (a plain dict), and which
of them mergekit actually reads there. Shared by ``cpift merge``'s up-front checks and
the check hooked into stock mergekit's planner."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple


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
