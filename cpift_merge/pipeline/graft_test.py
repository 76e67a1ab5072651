"""``cpift graft``: the graft test on any base + fine-tune pair.

Does the fine-tune's core carry what it learned? For one task: theta_0, the fine-tune
theta, theta_0 with theta's core grafted in (*core only*), theta with its core reset to
theta_0 (*core removed*), and both again with a random mask of the core's entry count
in every tensor, each scored on the task's test set by held-out loss and by the task's
metric. The kept gain of a graft is ``(L0 - L) / (L0 - Ltheta)`` by loss and
``(s - s0) / (stheta - s0)`` by metric. The models are the ``cpi`` fusion at omega 0
(:func:`cpift_merge.mergekit.graft.graft`), the same code the pipeline's ``graft``
method uses. The core comes from a region directory that holds the task, or is
computed here from the pair (``density``, ``scope``, ``exclude``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional, Sequence

from cpift_merge.errors import CpiftError

Record = Dict[str, Any]
VARIANTS = tuple(f"{keep}-{mask}" for keep in ("core", "rest") for mask in ("core", "random"))


def kept_gain(row: Record, base: Record, tuned: Record) -> Record:
    """Share of the fine-tune's gain over theta_0 that a graft keeps: by held-out loss
    ``(L0 - L) / (L0 - Ltuned)`` and by the metric ``(s - s0) / (stuned - s0)``; None
    where the fine-tune gained nothing to keep."""
    dl = base["loss"] - tuned["loss"]
    ds = tuned["score"] - base["score"]
    return {
        "kept_loss": (base["loss"] - row["loss"]) / dl if dl > 0 else None,
        "kept_score": (row["score"] - base["score"]) / ds if ds > 0 else None,
    }


def graft_test(
    base: str,
    model: str,
    task: str,
    test: str,
    metric: str,
    out: str,
    *,
    regions: Optional[str] = None,
    density: float = 0.01,
    scope: str = "global",
    exclude: Sequence[str] = (),
    seed: int = 0,
    max_length: int = 256,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int = 0,
    device: str = "auto",
    keep_models: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    metric_search: Sequence[str] = (),
) -> Record:
    """Run the graft test of ``task`` (``model`` fine-tuned from ``base``) and write
    ``OUT/graft.json`` (and ``OUT/regions/`` when the core is computed here, and
    ``OUT/models/<variant>/`` with ``keep_models``), all or nothing. Returns the record:
    ``base`` and ``tuned`` (loss, score), and per variant loss, score and kept gain."""
    from tqdm.auto import tqdm

    from cpift_merge.evaluation.scoring import check_device, check_metric_name, evaluate, heldout_loss
    from cpift_merge.mergekit.graft import graft
    from cpift_merge.storage.files import atomic_dir, ensure_apart, write_json
    from cpift_merge.storage.regions import check_task_names, compute_from_paths, load_regions
    from cpift_merge.training.data import load_examples

    check_task_names([task])
    check_metric_name(metric)
    check_device(device)
    examples = load_examples(test, role="test")
    if limit:
        examples = examples[:limit]
    rs = load_regions(regions) if regions else None
    if rs is not None and task not in rs.tasks:
        raise CpiftError(f"region directory {regions} has no task {task!r} (it has {', '.join(rs.tasks)})")
    ensure_apart(out, [base, model, *([regions] if regions else [])])
    out = os.path.abspath(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if rs is None:
            rs = compute_from_paths(
                base, {task: model}, os.path.join(tmp, "regions"), density=density, scope=scope,
                exclude=list(exclude), seed=seed, progress=progress,
            )  # fmt: skip
        models = {"base": base, "tuned": model}
        steps = tqdm(total=2 + len(VARIANTS), desc=f"graft test {task}", disable=not progress)
        rec: Record = {}

        def score(path: str) -> Record:
            loss = heldout_loss(path, examples, max_length, batch_size, device)["loss"]
            res = evaluate(path, {task: (test, metric)}, max_new_tokens, batch_size, limit, device, metric_search)
            steps.update()
            return {"loss": loss, "score": res[task]["score"]}

        for key, path in models.items():
            rec[key] = score(path)
        for variant in VARIANTS:
            keep, mask = variant.split("-")
            path = os.path.join(tmp, "models", variant)
            graft(base, model, rs, task, path, keep=keep, mask=mask, seed=seed)
            row = score(path)
            rec[variant] = {**row, **kept_gain(row, rec["base"], rec["tuned"])}
            if not keep_models:
                shutil.rmtree(path)
        steps.close()
        if not keep_models:
            shutil.rmtree(os.path.join(tmp, "models"), ignore_errors=True)
        loc = rs.localization(task)
        result = {
            "task": task,
            "base": os.path.abspath(base),
            "model": os.path.abspath(model),
            "test": test,
            "metric": metric,
            "examples": len(examples),
            "regions": os.path.abspath(regions) if regions else os.path.join(out, "regions"),
            "density": rs.density,
            "scope": rs.scope,
            "seed": seed,
            "core_share_l2": loc.get("core_share_l2") if loc else None,
            "graft": rec,
        }
        write_json(os.path.join(tmp, "graft.json"), result)
    return result


def graft_table(result: Record) -> tuple[list, list]:
    """Table 3's header and row for one graft test result."""
    from cpift_merge.pipeline.report import table3_rows

    rec = result["graft"]
    return table3_rows({"graft": {result["task"]: {**rec, "probe": rec["tuned"]}}})
