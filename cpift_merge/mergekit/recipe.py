"""``cpift merge``: run a mergekit recipe with ``cpi`` available, validated up front
and written atomically (a failed or interrupted merge leaves nothing at OUT).

Before mergekit starts it: resolves local model paths (so mergekit's model card never
asks the hub for them), rejects unknown ``cpi`` parameters and out-of-range values,
checks that local models line up (same tensors and shapes), checks a region file
against the models, and runs (and caches) the global-scope pre-pass.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

from cpift_merge.errors import CpiftError, load_yaml_mapping
from cpift_merge.mergekit.config import check_cpi_values, param_blocks
from cpift_merge.mergekit.prepass import DEFAULT_DENSITY, DEFAULT_SCOPE


def load_yaml(path: str) -> Dict[str, Any]:
    return load_yaml_mapping(path, "recipe", "merge_method, models, ...")


def _resolve_ref(value: str, base_dir: str) -> str:
    """Absolute path for a local model reference (``path`` or ``path+lora``)."""
    parts = []
    for part in str(value).split("+"):
        path, _, rev = part.partition("@")
        local = [p for p in (path, os.path.join(base_dir, path)) if os.path.exists(p)]
        if local:
            path = os.path.abspath(local[0])
        elif path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in path:
            raise CpiftError(f"model folder {path} does not exist")
        parts.append(path + (f"@{rev}" if rev else ""))
    return "+".join(parts)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def local_model(value: str, base_dir: str = ".") -> str:
    """A local weights folder for anything mergekit takes as a model: a folder, a hub id
    (``org/name`` or ``org/name@revision``: from the hub's cache first, so it works offline
    once cached, else downloaded as mergekit downloads it), ``base+lora``, or a bare LoRA
    adapter folder (merged into the base its ``adapter_config.json`` names). LoRAs are merged
    through peft by mergekit's own ``ModelReference.merged`` into ``cache_dir()/lora``,
    written to a temporary sibling and renamed, so an interrupted merge leaves nothing."""
    from mergekit.common import ModelPath, ModelReference

    from cpift_merge.storage.files import cache_dir

    ref = ModelReference.parse(_resolve_ref(value, base_dir))
    adapter = os.path.join(ref.model.path, "adapter_config.json")
    if ref.lora is None and os.path.isfile(adapter):
        try:
            with open(adapter, encoding="utf-8") as fh:
                base = json.load(fh).get("base_model_name_or_path")
        except (OSError, ValueError) as err:
            raise CpiftError(f"model {value}: unreadable {adapter}: {err}") from None
        if not base:
            raise CpiftError(
                f"model {value} is a LoRA adapter whose adapter_config.json names no base model;"
                f" pass it as BASE+{value}"
            )
        ref = ModelReference(model=ModelPath.model_validate(_resolve_ref(base, base_dir)), lora=ref.model)
    if ref.lora is not None:
        return _merged_lora(ref, value, os.path.join(cache_dir(), "lora"))
    path = ref.model.path
    if os.path.isdir(path) or os.path.isfile(path):
        return os.path.abspath(path)
    return _hub_model(ref, value)


def _hub_model(ref: Any, value: str) -> str:
    import huggingface_hub

    try:  # the cache first: offline once cached, and no round trip when it is there
        return huggingface_hub.snapshot_download(ref.model.path, revision=ref.model.revision, local_files_only=True)
    except Exception:
        pass
    try:
        return ref.local_path()  # mergekit's own download (safetensors, else .bin)
    except Exception as err:
        raise CpiftError(
            f"model {value}: no such folder, and not a hub model in the local cache or on the hub ({_first_line(err)})"
        ) from None


def _merged_lora(ref: Any, value: str, root: str) -> str:
    import shutil
    import tempfile

    final = os.path.join(root, ref.model._unique_id() + "_" + ref.lora._unique_id())
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        merged = ref.merged(cache_dir=tmp).model.path
        os.replace(merged, final)
    except Exception as err:
        raise CpiftError(f"model {value}: cannot merge LoRA {ref.lora} into {ref.model}: {_first_line(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_recipe(cfg: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    """Resolve local paths in a raw recipe (models and ``regions``), in place."""
    if cfg.get("base_model"):
        cfg["base_model"] = _resolve_ref(cfg["base_model"], base_dir)

    def fix_models(items):
        for m in items or []:
            if isinstance(m, dict) and isinstance(m.get("model"), str):
                m["model"] = _resolve_ref(m["model"], base_dir)

    fix_models(cfg.get("models"))
    all_slices = list(cfg.get("slices") or [])
    for mod in (cfg.get("modules") or {}).values():
        if isinstance(mod, dict):
            fix_models(mod.get("models"))
            all_slices += mod.get("slices") or []
    for s in all_slices:
        if isinstance(s, dict):
            fix_models(s.get("sources"))
            if s.get("base_model"):
                s["base_model"] = _resolve_ref(s["base_model"], base_dir)
    if isinstance(cfg.get("tokenizer_source"), str) and cfg["tokenizer_source"] not in ("union", "base"):
        cfg["tokenizer_source"] = _resolve_ref(cfg["tokenizer_source"], base_dir)
    for _where, params, _per_model in param_blocks(cfg):
        if isinstance(params.get("regions"), str) and params["regions"]:
            reg = params["regions"]
            local = [p for p in (reg, os.path.join(base_dir, reg)) if os.path.exists(p)]
            if not local:
                raise CpiftError(f"region directory {reg} does not exist; make it with cpift regions")
            params["regions"] = os.path.abspath(local[0])
    return cfg


def local_inputs(cfg: Any) -> List[str]:
    """Every local path a resolved recipe reads (models, ``base+lora`` parts, regions,
    tokenizer source): any string in it, or ``+``-separated part, that exists on disk."""
    if isinstance(cfg, dict):
        return [p for v in cfg.values() for p in local_inputs(v)]
    if isinstance(cfg, list):
        return [p for v in cfg for p in local_inputs(v)]
    if isinstance(cfg, str):
        return [part for part in cfg.split("+") if part and os.path.exists(part)]
    return []


def _shared(cfg: Dict[str, Any], key: str, default: Any = None) -> Any:
    return (cfg.get("parameters") or {}).get(key, default)


def _task_models(cfg: Dict[str, Any]) -> List[str]:
    """Non-base models of a plain ``models:`` recipe, in mergekit's order."""
    base = cfg.get("base_model")
    return [m["model"] for m in cfg.get("models") or [] if isinstance(m, dict) and m.get("model") != base]


def _local_models(cfg: Dict[str, Any]) -> Optional[Tuple[str, List[str]]]:
    """(base, tasks) of a plain ``models:`` recipe whose models are all local folders;
    None for slices, modules, hub models and LoRAs (mergekit and the kernel check those)."""
    base = cfg.get("base_model")
    tasks = _task_models(cfg)
    local = [p for p in [base, *tasks] if isinstance(p, str) and os.path.isdir(p) and "+" not in p]
    if not cfg.get("models") or len(local) != len(tasks) + 1:
        return None
    return base, tasks


def _positionals(args: Sequence[str]) -> Iterator[str]:
    for i, a in enumerate(args):
        if a == "--":
            yield from args[i + 1 :]
            return
        if not a.startswith("-"):
            yield a


def prestart(args: Sequence[str], ctx: Any = None) -> None:
    """Start the global pre-pass of ``cpift merge ARGS`` in a child process, before the
    parent imports mergekit (seconds of single-threaded imports the pre-pass now runs
    beside). Best effort and silent: anything unusual (no readable cpi recipe, no
    global pre-pass needed, cached, small models) starts nothing, and the merge then
    reports, checks and computes as before. The merge waits for the child in
    :func:`cpift_merge.mergekit.prepass.global_prepass`; a click ``ctx`` stops it at exit."""
    if "--help" in args:
        return
    config = next((a for a in _positionals(args) if os.path.isfile(a)), None)
    if config is None:
        return
    try:
        cfg = resolve_recipe(load_yaml(config), os.path.dirname(os.path.abspath(config)))
        if cfg.get("merge_method") != "cpi":
            return
        if _shared(cfg, "regions"):
            _warm_fused(cfg, cut=False)
            return
        models = _local_models(cfg)
        density = _shared(cfg, "density", DEFAULT_DENSITY)
        exclude = _shared(cfg, "exclude", "") or ""
        if (
            models is None
            or (_shared(cfg, "scope") or DEFAULT_SCOPE) != "global"
            or isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not 0 < density <= 1
            or not isinstance(exclude, str)
        ):
            return
        re.compile(exclude)
    except Exception:  # noqa: BLE001 -- the merge itself reports what is wrong
        return
    from cpift_merge.mergekit import prepass

    quiet = [a for a in args if a in ("--quiet", "--no-quiet")]
    progress = not quiet or quiet[-1] != "--quiet"
    if prepass.start_background(models[0], models[1], density, exclude, progress=progress) and ctx is not None:
        ctx.call_on_close(prepass.cancel_background)
    _warm_fused(cfg)  # after the pre-pass's fork: a fork must not copy a running thread


def _warm_fused(cfg: Dict[str, Any], cut: bool = True) -> None:
    """Load the kernel's fused loops (:func:`cpift_merge.core.fused.warm_up`) for this
    recipe's task count and dtype (float32 and bfloat16 when it names none) and its
    cores (``cut`` by a global pre-pass, else from a region file) while the merge imports
    mergekit."""
    import torch

    from cpift_merge.core import fused

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(str(cfg.get("dtype")))
    fused.warm_up(len(_task_models(cfg)), [dtype] if dtype else (torch.float32, torch.bfloat16), cut=cut)


def prepare_cpi(cfg: Dict[str, Any], progress: bool = True) -> Dict[str, Any]:
    """Checks and pre-pass for a ``cpi`` recipe; returns facts for the stats file."""
    from cpift_merge.mergekit.method import check_region_settings
    from cpift_merge.mergekit.prepass import global_prepass
    from cpift_merge.storage.checkpoint import Checkpoint, participating_tensors
    from cpift_merge.storage.regions import load_regions

    check_cpi_values(cfg)
    if not cfg.get("base_model"):
        raise CpiftError("the cpi method needs a base_model (theta_0 or the backbone)")
    models = _local_models(cfg)
    if models is None:
        return {}  # slices/modules/hub models: mergekit and the kernel check the rest
    base, tasks = models
    base_ckpt = Checkpoint(base, label=f"base {base}")
    ckpts = {p: Checkpoint(p, label=p) for p in tasks}
    participating_tensors(base_ckpt, ckpts)  # same tensors, shapes, architecture
    regions = _shared(cfg, "regions")
    density = _shared(cfg, "density")
    scope = _shared(cfg, "scope")
    exclude = _shared(cfg, "exclude", "") or ""
    score = _shared(cfg, "score")
    if score not in (None, "delta") and not regions:
        raise CpiftError(
            f"cpi: score {score} needs a region file; make one with `cpift regions --score {score}`"
            " and pass it as `regions:`"
        )
    if regions:
        rs = load_regions(regions)
        check_region_settings(rs, density, scope, score)
        names = rs.tensor_names
        by_print = {rs.meta["tasks"][t]["fingerprint"]: t for t in rs.tasks}
        explicit = {m["model"]: (m.get("parameters") or {}).get("task") for m in cfg["models"] if isinstance(m, dict)}
        owner: Dict[str, str] = {}
        for path, ck in ckpts.items():
            fp = ck.fingerprint(names) if all(n in ck.infos for n in names) else None
            want = explicit.get(path)
            if want is not None and want not in rs.tasks:
                raise CpiftError(f"model {path}: task {want!r} is not in region file {rs.path} (it has {rs.tasks})")
            if fp not in by_print:
                raise CpiftError(
                    f"region file {rs.path} was made from other models: {path} matches none"
                    f" of its tasks {rs.tasks}; recompute the regions for these models"
                )
            if want is not None and by_print[fp] != want:
                raise CpiftError(
                    f"model {path} is task {by_print[fp]}, not {want}, in region file {rs.path};"
                    f" set `task: {by_print[fp]}` on it"
                )
            task = by_print[fp]
            if task in owner:
                raise CpiftError(f"models {owner[task]} and {path} are both task {task}; merge each task once")
            owner[task] = path
        return {
            "regions": rs.path,
            "density": rs.density,
            "scope": rs.scope,
            "k": {t: rs.k(t) for t in rs.tasks},
            "localization": {t: rs.localization(t) for t in rs.tasks},  # the cores' shares of ‖Δ‖ (see regions)
        }
    density = DEFAULT_DENSITY if density is None else density
    if (scope or DEFAULT_SCOPE) == "global" and density > 0:
        cut = global_prepass(base, tasks, density, exclude, progress=progress)
        return {"density": density, "scope": "global", "k": {p: cut.thresholds[f"t{i}"].k for i, p in enumerate(tasks)}}
    return {"density": density, "scope": scope or DEFAULT_SCOPE}


def run(config_path: str, out: str, options: Any, overwrite: bool = False, progress: bool = True) -> str:
    """Validate, pre-pass and merge ``config_path`` into ``out`` atomically."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from pydantic import ValidationError

    from cpift_merge.mergekit import method
    from cpift_merge.storage.files import atomic_dir, ensure_apart, ensure_free

    method.register()
    ensure_free(out, overwrite)
    if not getattr(options, "verbosity", 0):
        import transformers

        transformers.logging.set_verbosity_error()  # mergekit trips deprecation notices
    raw = load_yaml(config_path)
    cfg = resolve_recipe(raw, os.path.dirname(os.path.abspath(config_path)))
    ensure_apart(out, [config_path, *local_inputs(cfg)])
    for where, params, _per_model in param_blocks(cfg):
        empty = [k for k, v in params.items() if v is None]
        if empty:
            raise CpiftError(f"recipe {config_path}: {where}.{empty[0]} is empty (null); give it a value or remove it")
    try:
        config = MergeConfiguration.model_validate(cfg)
    except (ValidationError, RuntimeError) as err:
        first = str(err).strip().splitlines()
        raise CpiftError(f"recipe {config_path} is not a valid mergekit config: {' '.join(first[:3])}") from None
    facts: Dict[str, Any] = {}
    if config.merge_method == method.METHOD_NAME:
        facts = prepare_cpi(cfg, progress=progress)
    else:
        from mergekit.merge_methods import registry

        try:
            registry.get(config.merge_method)
        except RuntimeError:
            raise CpiftError(f"unknown merge method {config.merge_method!r} in {config_path}") from None
    source = yaml.safe_dump(cfg, sort_keys=False)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        method.reset_stats()
        try:
            run_merge(config, tmp, options=options, config_source=source)
        except CpiftError:
            raise
        except Exception as err:  # mergekit's own errors: one line, nothing left at OUT
            raise CpiftError(f"merge failed: {type(err).__name__}: {' '.join(str(err).split())[:400]}") from None
        stats = None
        if config.merge_method == method.METHOD_NAME:
            stats = write_stats(os.path.join(tmp, "cpi_stats.json"), facts, dict(method.STATS))
        name_card(tmp, os.path.basename(os.path.abspath(out)), stats)
    return os.path.abspath(out)


def name_card(folder: str, name: str, stats: Optional[Dict[str, Any]] = None) -> None:
    """mergekit titles its model card after the folder it wrote into: here the temporary
    sibling; give the card the final folder's name, as ``mergekit-yaml`` would. For a
    ``cpi`` merge, also tag it ``cpift-merge``/``cpi`` in the front matter and say which
    core regions it used (density, scope, score, each task's core size and what it
    transplanted), so the card published with the folder says how it was made."""
    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        return
    with open(card, encoding="utf-8") as fh:
        text = fh.read().replace(os.path.basename(folder), name)
    if stats is not None:
        text = _cpi_card(text, stats)
    with open(card, "w", encoding="utf-8") as fh:
        fh.write(text)


def _cpi_card(text: str, stats: Dict[str, Any]) -> str:
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        head, body = text[4:].split("\n---\n", 1)
        front = yaml.safe_load(head) or {}
        tags = list(front.get("tags") or [])
        front["tags"] = tags + [t for t in ("cpift-merge", "cpi") if t not in tags]
        text = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body
    moved = stats.get("transplanted") or {}
    rows = [f"| {task} | {k:,} | {moved.get(task, 0):,} |" for task, k in (stats.get("k") or {}).items()]
    section = [
        "",
        "## Core regions",
        "",
        f"Made with [cpift-merge](https://pypi.org/project/cpift-merge/)'s `cpi` method: density"
        f" {stats.get('density')}, scope {stats.get('scope')}, score {stats.get('score', 'delta')}"
        + (f", region file `{os.path.basename(str(stats['regions']).rstrip('/'))}`" if stats.get("regions") else "")
        + f"; {stats.get('core_entries', 0):,} core entries, {stats.get('overlap_entries', 0):,} in more than one"
        " core. Per-tensor figures: `cpi_stats.json`.",
        "",
        *(["| task | core entries | transplanted |", "|---|---|---|", *rows, ""] if rows else []),
    ]
    return text.rstrip("\n") + "\n" + "\n".join(section)


def write_stats(path: str, facts: Dict[str, Any], per_tensor: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    totals: Dict[str, int] = {}
    for st in per_tensor.values():
        for task, n in st["transplanted"].items():
            totals[task] = totals.get(task, 0) + n
    found = [s for s in per_tensor.values() if "delta_sums" in s]
    if found and "localization" not in facts:  # cores found in the merge: their shares of ‖Δ‖, exact
        from cpift_merge.core.localization import add_sums, shares

        total = sum(s["numel"] for s in found)
        facts = {
            **facts,
            "localization": {
                task: shares(
                    add_sums(s["delta_sums"][task] for s in found), sum(s["core_sizes"][task] for s in found), total
                )
                for task in found[0]["delta_sums"]
            },
        }
    summary = {
        **facts,
        "transplanted": totals,
        "core_entries": sum(s["core_entries"] for s in per_tensor.values()),
        "overlap_entries": sum(s["overlap_entries"] for s in per_tensor.values()),
        "tensors": per_tensor,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    return summary
