"""The ``cpift`` command (click). Every user-facing error is one line, exit code 2."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import click

from cpift_merge.errors import CpiftError, load_yaml_mapping
from cpift_merge.pipeline.report import format_table, region_report


def _friendly(fn):
    """Turn CpiftError (and a few obvious OS errors) into ``error: ...``, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CpiftError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)

    return wrapper


def _pairs(values: Sequence[str], flag: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise CpiftError(f"{flag} takes NAME=PATH, got {v!r}")
        if name in out:
            raise CpiftError(f"duplicate task name {name!r} in {flag}; give each task its own name")
        out[name] = path
    return out


# commands that stream tensors through many short multi-threaded torch ops (chunks of a
# million entries): OpenMP's default spin at the end of each one made a 16-layer merge 3-4.5x
# slower than a passive wait while another process used the same cores; the passive wait
# costs about 9% on an idle machine at 16 layers, ~20% at 4 (benchmarks/README.md, scale.py)
_STREAMING = ("merge", "regions", "merge-demo")


def _passive_threads(command: str) -> None:
    """Let OpenMP threads sleep, not spin, between the streaming commands' torch ops
    (``OMP_WAIT_POLICY=PASSIVE``), unless the user set the policy or GNU OpenMP's spin
    count (``GOMP_SPINCOUNT``, which wins over the policy). Read once, when torch loads its
    OpenMP runtime: a process that already imported torch is left as it is."""
    if command not in _STREAMING or "torch" in sys.modules:
        return
    if not any(v in os.environ for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


class _Cli(click.Group):
    """``merge`` takes mergekit's options, and importing mergekit (peft, transformers)
    takes seconds: that command is built only when it is used, after its global
    pre-pass has been started in a child process to run beside those imports."""

    def get_command(self, ctx, cmd_name):
        if cmd_name == "merge" and cmd_name not in self.commands:
            self.add_command(_merge_command())
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), "merge"})

    def resolve_command(self, ctx, args):
        if args:
            _passive_threads(args[0])
            if args[0] == "merge":
                from cpift_merge.mergekit.recipe import prestart

                prestart(args[1:], ctx)
        return super().resolve_command(ctx, args)


@click.group(cls=_Cli)
@click.version_option(package_name="cpift-merge")
def main() -> None:
    """Core Parameter Isolation (CPI-FT) for mergekit: core regions, the `cpi`
    merge method, probes and staged fine-tuning with frozen cores, the graft test,
    and the whole pipeline with its baselines (`cpift run`)."""


@main.command()
@click.option(
    "--base",
    required=True,
    help="Pre-trained reference theta_0: what a merge recipe takes (folder, .safetensors/.bin, hub id).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A task's fine-tuned checkpoint (folder, hub id, BASE+LORA or a LoRA adapter folder); repeat per task.",
)
@click.option("--density", type=float, required=True, help="Core share p, in [0, 1] (0.01 = 1%).")
@click.option(
    "--scope",
    type=click.Choice(["global", "tensor"]),
    default="global",
    show_default=True,
    help="Rank |delta| over the whole model or within each tensor.",
)
@click.option("--exclude", multiple=True, metavar="REGEX", help="Tensors to leave out of D (repeatable).")
@click.option("--tau", type=float, default=0.1, show_default=True, help="Jaccard threshold linking two tasks.")
@click.option(
    "--order",
    type=click.Choice(["random", "given"]),
    default="random",
    show_default=True,
    help="Stage order of the groups: seeded shuffle, or the order of --model flags.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--score",
    type=click.Choice(["delta", "relative", "fisher"]),
    default="delta",
    show_default=True,
    help="Rank entries by |delta| (the papers'), |delta| / |theta_0|, or delta^2 x diagonal Fisher.",
)
@click.option(
    "--fisher",
    "fishers",
    multiple=True,
    metavar="NAME=FILE",
    help="A task's Fisher file for --score fisher (default MODEL/fisher/fisher.safetensors).",
)
@click.option("--out", required=True, help="Region directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--plot", is_flag=True, help="Also write jaccard.png and core_share_by_layer.png into --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly
def regions(base, models, density, scope, exclude, tau, order, seed, score, fishers, out, overwrite, plot, quiet):
    """Find each task's core region (top-p entries by --score, |theta_i - theta_0| by
    default), their Jaccard overlaps and the task groups; write a region directory."""
    from cpift_merge.mergekit.recipe import local_model
    from cpift_merge.storage.regions import compute_from_paths

    _hush(quiet)
    pairs = {name: local_model(path) for name, path in _pairs(models, "--model").items()}
    base = local_model(base)
    fisher = _pairs(fishers, "--fisher") if fishers else None
    if fisher and score != "fisher":
        raise CpiftError("--fisher is read with --score fisher only")
    unknown = [n for n in fisher or {} if n not in pairs]
    if unknown:
        raise CpiftError(f"--fisher {unknown[0]}=...: no --model named {unknown[0]}")
    rs = compute_from_paths(
        base,
        pairs,
        out,
        density=density,
        scope=scope,
        exclude=list(exclude),
        tau=tau,
        order=order,
        seed=seed,
        given_order=list(pairs),
        overwrite=overwrite,
        progress=not quiet,
        score=score,
        fisher=fisher,
    )
    click.echo(region_report(rs))
    if plot:
        from cpift_merge.pipeline.plots import plot_regions

        for p in plot_regions(rs, rs.path):
            click.echo(f"wrote {p}")
    click.echo(f"wrote {rs.path}")


def _main_rank() -> bool:
    """Rank 0 under torchrun / accelerate launch (or the only process): the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def _hush(quiet: bool) -> None:
    """--quiet (and every rank but 0): no transformers or hub progress bars ("Loading
    weights", "Writing model shards") and no info logs, beside our own bars (which
    callers turn off)."""
    if not quiet and _main_rank():
        return
    import warnings

    import transformers
    from huggingface_hub.utils import disable_progress_bars

    for category in (FutureWarning, DeprecationWarning):  # the libraries' notices to developers
        warnings.simplefilter("ignore", category)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" when a data file is read


def _launched() -> None:
    """Say so (even with --quiet) when a launcher started one process where several were asked for."""
    from cpift_merge.training.distributed import lone_launch

    note = lone_launch()
    if note:
        click.echo(f"warning: {note}", err=True)


def _train_options(fn):
    """Training options shared by probe and train."""
    opts = [
        click.option("--steps", type=int, default=None, help="Optimizer steps (overrides --epochs)."),
        click.option("--epochs", type=float, default=1.0, show_default=True),
        click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-4 with adamw, 0.1 with sgd]."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--max-grad-norm", type=float, default=1.0, show_default=True),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--max-length", type=int, default=256, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--bf16", is_flag=True, help="bf16 autocast."),
        click.option(
            "--optimizer",
            type=click.Choice(["adamw", "sgd"]),
            default="adamw",
            show_default=True,
            help="adamw: the Trainer's AdamW (the papers' recipe); sgd: plain SGD (see --momentum).",
        ),
        click.option("--momentum", type=float, default=0.0, show_default=True, help="SGD momentum (sgd only)."),
        click.option(
            "--report-to",
            default="none",
            show_default=True,
            metavar="LIST",
            help="Trainer loggers: none, all, or e.g. tensorboard,wandb (logs under OUT/NAME.work/runs).",
        ),
        click.option(
            "--save-steps",
            type=int,
            default=25,
            show_default=True,
            help="Checkpoint interval (an interrupted run resumes from the last one).",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option(
            "--fsdp",
            is_flag=True,
            help="Shard parameters and optimizer state with FSDP2 (GPUs, under torchrun or accelerate launch).",
        ),
        click.option(
            "--fsdp-config",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="YAML or JSON file of the Trainer's FSDP2 settings (fsdp_config keys) on top of ours.",
        ),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Redo a finished or interrupted run in --out that was made with other settings or data.",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _fsdp_file(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The settings in a --fsdp-config file (YAML, or JSON, which YAML reads too)."""
    if path is None:
        return None
    return load_yaml_mapping(path, "--fsdp-config", "FSDP2 settings, e.g. reshard_after_forward: false")


def _config(lora=False, lora_rank=8, lora_alpha=None, lora_targets="", fsdp=False, fsdp_config=None, **kw):
    from cpift_merge.training.finetune import TrainConfig

    keys = (
        "steps",
        "epochs",
        "lr",
        "weight_decay",
        "max_grad_norm",
        "batch_size",
        "grad_accum",
        "max_length",
        "seed",
        "bf16",
        "save_steps",
        "device",
        "optimizer",
        "momentum",
        "report_to",
    )
    cfg = TrainConfig(
        **{k: kw[k] for k in keys},
        lora=lora,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        fsdp=fsdp,
        fsdp_config=_fsdp_file(fsdp_config),
    )
    cfg.check()
    return cfg


@main.command()
@click.option("--base", required=True, help="Pre-trained model theta_0 (HF folder).")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    required=True,
    metavar="NAME=DATA",
    help="Task data (JSONL or a saved datasets folder); repeat per task.",
)
@click.option("--out", required=True, help="Folder for the probes: OUT/NAME/ per task.")
@click.option("--lora", is_flag=True, help="Train a LoRA adapter and save the merged model.")
@click.option("--lora-rank", type=int, default=8, show_default=True, help="LoRA rank r.")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha [default: 2r].")
@click.option(
    "--lora-target-modules",
    "lora_targets",
    default="",
    metavar="LIST",
    help="Comma-separated module names to adapt [default: every q/k/v/o and gate/up/down projection present].",
)
@click.option(
    "--regions",
    "regions_density",
    type=float,
    default=None,
    metavar="DENSITY",
    help="Then compute OUT/regions at this density (global scope).",
)
@click.option(
    "--score",
    type=click.Choice(["delta", "relative", "fisher"]),
    default="delta",
    show_default=True,
    help="Core score of --regions; fisher also writes each probe's diagonal Fisher to OUT/NAME/fisher/.",
)
@click.option(
    "--sparse",
    is_flag=True,
    help="Then retrain each task from BASE inside its core only (needs --regions): OUT/dense/ holds the dense"
    " probes, OUT/NAME the sparse ones.",
)
@click.option("--sparse-lr", type=float, default=None, help="lr of the sparse retrain [default: 20 x --lr].")
@click.option("--mask-epochs", type=float, default=None, help="Epochs of the dense probes that pick the cores.")
@_train_options
@_friendly
def probe(base, tasks, out, lora, lora_rank, lora_alpha, lora_targets, regions_density, score, sparse, sparse_lr,
          mask_epochs, quiet, overwrite, **kw):  # fmt: skip
    """Short fine-tune of BASE on each task alone (the probes that give the cores)."""
    from dataclasses import replace

    from cpift_merge.training.data import load_tasks
    from cpift_merge.training.finetune import run_probes

    quiet = quiet or not _main_rank()
    _hush(quiet)
    _launched()
    cfg = _config(lora=lora, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets, **kw)
    if (sparse_lr is not None or mask_epochs is not None) and not sparse:
        raise CpiftError("--sparse-lr and --mask-epochs apply to --sparse probes only")
    mask_cfg = replace(cfg, epochs=mask_epochs, steps=None) if mask_epochs is not None else None
    if mask_cfg is not None:
        mask_cfg.check()
    data = load_tasks(_pairs(tasks, "--task"), say=None if quiet else click.echo)
    _paths, rs = run_probes(
        base,
        data,
        out,
        cfg,
        regions_density=regions_density,
        score=score,
        progress=not quiet,
        overwrite=overwrite,
        say=(lambda line: None) if quiet else click.echo,
        sparse=sparse,
        sparse_lr=sparse_lr,
        mask_cfg=mask_cfg,
    )
    if rs is not None and _main_rank():
        click.echo(region_report(rs))


@main.command()
@click.option("--base", required=True, help="Model to start from (HF folder).")
@click.option("--regions", "regions_dir", default=None, help="Region directory (cores to freeze).")
@click.option("--task", "tasks", multiple=True, required=True, metavar="NAME=DATA")
@click.option(
    "--groups", default="from-regions", show_default=True, help='Stages: from-regions, random:K, or given:"a,b;c".'
)
@click.option("--sample", type=int, default=None, help="Seeded, balanced N examples per task.")
@click.option("--out", required=True, help="OUT/stage-K/ per stage.")
@click.option(
    "--allow-other-base",
    is_flag=True,
    help="Freeze cores of --regions computed on another base (e.g. calibrating a merged model).",
)
@click.option(
    "--update",
    type=click.Choice(["all", "core"]),
    default="all",
    show_default=True,
    help="What a stage trains: all but earlier stages' cores (the papers'), or only its own tasks' cores.",
)
@click.option(
    "--replay",
    type=int,
    default=0,
    show_default=True,
    help="Mix N examples of each earlier stage's tasks into a stage.",
)
@_train_options
@_friendly
def train(base, regions_dir, tasks, groups, sample, out, quiet, overwrite, allow_other_base, update, replay, **kw):
    """Staged SFT: stage k trains its group with the cores of earlier stages frozen."""
    from cpift_merge.training.finetune import train_from_files

    quiet = quiet or not _main_rank()
    _hush(quiet)
    _launched()
    cfg = _config(**kw)
    if sample is not None and sample < 1:
        raise CpiftError(f"--sample must be at least 1, got {sample}")
    summary = train_from_files(
        base,
        _pairs(tasks, "--task"),
        out,
        cfg,
        groups=groups,
        regions_dir=regions_dir,
        sample=sample,
        progress=not quiet,
        overwrite=overwrite,
        allow_other_base=allow_other_base,
        update=update,
        replay=replay,
    )
    rows = [
        [
            s["stage"],
            ", ".join(s["tasks"]),
            s["frozen_entries"],
            s["steps"],
            s["final_loss"] if s["final_loss"] is not None else "-",
        ]
        for s in summary["stages"]
    ]
    if _main_rank():
        click.echo(format_table(["stage", "tasks", "frozen", "steps", "final loss"], rows))
        click.echo(f"final model: {summary['final']}")


def _eval_specs(values: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    out: Dict[str, Tuple[str, str]] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if ":py:" in rest:
            path, metric = rest.split(":py:", 1)
            metric = "py:" + metric
        else:
            path, _, metric = rest.rpartition(":")
        if not sep or not name or not path or not metric:
            raise CpiftError(f"--task takes NAME=TEST.jsonl:METRIC, got {v!r}")
        if name in out:
            raise CpiftError(f"duplicate task name {name!r} in --task")
        out[name] = (path, metric)
    return out


@main.command("eval")
@click.option("--model", "model_path", required=True, help="HF model folder to evaluate.")
@click.option(
    "--task",
    "tasks_",
    multiple=True,
    required=True,
    metavar="NAME=TEST.jsonl:METRIC",
    help="METRIC: exact, numeric, choice or py:module.function; repeat per task.",
)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--limit", type=int, default=0, help="Score only the first N examples of each task.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", "out_json", default=None, help="Write the results as JSON here.")
@_friendly
def eval_cmd(model_path, tasks_, max_new_tokens, batch_size, limit, device, out_json):
    """Greedy generation on each task's test set, scored by an exact metric."""

    from cpift_merge.evaluation.scoring import evaluate

    if max_new_tokens < 1 or batch_size < 1 or limit < 0:
        raise CpiftError("--max-new-tokens and --batch-size must be at least 1, --limit non-negative")
    if out_json and not os.path.isdir(os.path.dirname(os.path.abspath(out_json))):
        raise CpiftError(f"--out {out_json}: folder {os.path.dirname(os.path.abspath(out_json))} does not exist")
    res = evaluate(model_path, _eval_specs(tasks_), max_new_tokens, batch_size, limit, device)
    click.echo(
        format_table(
            ["task", "metric", "n", "score"], [[n, r["metric"], r["n"], f"{r['score']:.1f}"] for n, r in res.items()]
        )
    )
    if out_json:
        from cpift_merge.storage.files import write_json

        write_json(out_json, {"model": os.path.abspath(model_path), "tasks": res})
        click.echo(f"wrote {out_json}")


@main.group()
def tasks() -> None:
    """The built-in tasks, and BIG-bench JSON tasks as task files."""


@tasks.command("export")
@click.argument("out_dir")
@click.option("--train", "n_train", type=int, default=200, show_default=True, help="Train examples per task.")
@click.option("--test", "n_test", type=int, default=50, show_default=True, help="Test examples per task.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@_friendly
def tasks_export(out_dir, n_train, n_test, seed, overwrite):
    """Write each built-in task as OUT_DIR/NAME/train.jsonl and test.jsonl."""
    from cpift_merge.evaluation.tasks import export

    if n_train < 1 or n_test < 1:
        raise CpiftError("--train and --test must be at least 1")
    rows = [
        [name, info["metric"], info["domain"], info["train"], info["test"]]
        for name, info in export(out_dir, n_train, n_test, seed, overwrite).items()
    ]
    click.echo(format_table(["task", "metric", "domain", "train", "test"], rows))


@tasks.command("import-bigbench")
@click.argument("task_json")
@click.argument("out_dir")
@click.option("--test-fraction", type=float, default=0.2, show_default=True, help="Share of prompts held out.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/test split.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@_friendly
def tasks_import_bigbench(task_json, out_dir, test_fraction, seed, overwrite):
    """Convert a BIG-bench JSON task (TASK_JSON: a task.json or its folder) into
    OUT_DIR/train.jsonl, test.jsonl and task.yml (the metric to score it with):
    exact_str_match tasks are scored `exact` (any listed target counts), and
    multiple_choice_grade tasks `choice` (the choices listed as lettered lines). Get
    the files with `pip download --no-deps bigbench==1.0.0` (the sdist holds
    bigbench/benchmark_tasks/*/task.json) or a clone of google/BIG-bench."""
    from cpift_merge.evaluation.bigbench import import_bigbench

    info = import_bigbench(task_json, out_dir, test_fraction, seed, overwrite)
    row = [info["name"], info["metric"], info["n_train"], info["n_test"], os.path.abspath(out_dir)]
    click.echo(format_table(["task", "metric", "train", "test", "folder"], [row]))


def _merge_command() -> click.Command:
    from mergekit.options import add_merge_options

    @click.command("merge", context_settings={"show_default": True})
    @click.argument("config_file")
    @click.argument("out_path")
    @click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it exists.")
    @add_merge_options
    @_friendly
    def merge(merge_options, config_file, out_path, overwrite):
        """Run a mergekit YAML recipe with `cpi` available (takes every mergekit-yaml
        option). Validates first; writes OUT_PATH atomically."""
        from cpift_merge.mergekit.recipe import run

        merge_options.apply_global_options()
        out = run(config_file, out_path, merge_options, overwrite=overwrite, progress=not merge_options.quiet)
        if not merge_options.quiet:  # as mergekit-yaml --quiet: nothing on success
            click.echo(f"wrote {out}")

    return merge


@main.command("run")
@click.argument("pipeline_file", required=False)
@click.option("--out", default=None, help="Output folder (overrides the file's out:).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Overrides the file's device: (auto uses a GPU when there is one).",
)
@click.option("--seed", type=int, default=None, help="Overrides the file's seed:.")
@click.option(
    "--methods", default=None, metavar="LIST", help="Comma-separated methods to run (overrides the file's methods:)."
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one setting of the pipeline file by its dotted key, e.g. --set merge.omega=0.25"
    " --set probe.optimizer=sgd (VALUE is YAML; repeatable; applied after the other options).",
)
@click.option("--quiet", is_flag=True, help="No progress output; print only the result tables.")
@_friendly
def run_cmd(pipeline_file, out, device, seed, methods, sets, quiet):
    """Run a CPI-FT pipeline file: probes, regions, staged SFT, the cpi merge,
    calibration, the baselines and the evaluation; writes OUT/results.json and
    OUT/report.md. With no PIPELINE_FILE, runs the shipped default (SmolLM2-135M-Instruct
    on the built-in tasks: cpift, dpi and full_sft). A rerun reuses finished steps."""
    from cpift_merge.pipeline.config import load_pipeline
    from cpift_merge.pipeline.report import summary_text
    from cpift_merge.pipeline.run import run_pipeline

    overrides = {
        "out": out,
        "device": device,
        "seed": seed,
        "methods": [m.strip() for m in methods.split(",") if m.strip()] if methods else None,
    }
    pipe = load_pipeline(pipeline_file, overrides, sets)
    _launched()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # per-load/save bars; training keeps its loss bar
    results = run_pipeline(pipe, quiet=quiet or not _main_rank())
    if not _main_rank():
        return  # rank 0 prints the tables, once
    click.echo("")
    click.echo(summary_text(results))
    click.echo("")
    click.echo(f"done in {results['seconds']:.0f} s; report: {os.path.join(results['out'], 'report.md')}")


@main.command("graft")
@click.option("--base", required=True, help="Pre-trained model theta_0 (HF folder).")
@click.option("--model", "model_pair", required=True, metavar="NAME=PATH", help="The task's fine-tune of --base.")
@click.option("--test", "test_data", required=True, help="The task's test data (JSONL or dataset folder[:split]).")
@click.option("--metric", default="exact", show_default=True, help="exact, numeric, choice or py:module.function.")
@click.option("--regions", "regions_dir", default=None, help="Region directory holding NAME's core (else computed).")
@click.option("--density", type=float, default=0.01, show_default=True, help="Core share p when computing the core.")
@click.option("--scope", type=click.Choice(["global", "tensor"]), default="global", show_default=True)
@click.option("--exclude", multiple=True, metavar="REGEX", help="Tensors to leave out of the core (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random-mask control.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Token limit of the held-out loss.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--limit", type=int, default=0, help="Use only the first N test examples.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", required=True, help="Folder for graft.json (and regions/, models/).")
@click.option("--keep-models", is_flag=True, help="Keep the four grafted models under OUT/models/.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly
def graft(base, model_pair, test_data, metric, regions_dir, density, scope, exclude, seed, max_length,
          max_new_tokens, batch_size, limit, device, out, keep_models, overwrite, quiet):  # fmt: skip
    """Graft test: does the fine-tune's core carry its task? Scores theta_0, the
    fine-tune, the core grafted onto theta_0 ("core only") and the fine-tune with its
    core reset ("core removed"), each beside a random mask of the same size, by
    held-out loss and by the metric, and prints the share of the fine-tune's gain each
    keeps. The papers' premise predicts core only near 100% and core removed near 0%."""
    from cpift_merge.pipeline.graft_test import graft_table, graft_test
    from cpift_merge.pipeline.report import format_table

    (task, model), *_ = _pairs([model_pair], "--model").items()
    if not 0 < density <= 1 or min(max_length, max_new_tokens, batch_size) < 1 or limit < 0:
        raise CpiftError("--density must be in (0, 1], --max-length, --max-new-tokens and --batch-size at least 1")
    _hush(quiet)
    res = graft_test(
        base, model, task, test_data, metric, out, regions=regions_dir, density=density, scope=scope,
        exclude=exclude, seed=seed, max_length=max_length, max_new_tokens=max_new_tokens, batch_size=batch_size,
        limit=limit, device=device, keep_models=keep_models, overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    rec = res["graft"]
    click.echo(
        f"task {task}: held-out loss theta_0 {rec['base']['loss']:.4f}, fine-tune {rec['tuned']['loss']:.4f};"
        f" {metric} theta_0 {rec['base']['score']:.1f}, fine-tune {rec['tuned']['score']:.1f}"
        f" ({res['examples']} test examples)"
    )
    click.echo(format_table(*graft_table(res)))
    click.echo(f"wrote {os.path.join(os.path.abspath(out), 'graft.json')}")


@main.command("transplant")
@click.option("--regions", "regions_dir", required=True, help="Region directory holding the task's core.")
@click.option("--task", required=True, help="The region-file task whose core is copied back.")
@click.option("--from", "donor", required=True, help="Model to take the core's values from (e.g. after training A).")
@click.option("--into", "backbone", required=True, help="Model to copy them into (e.g. after training A, then B).")
@click.option("--out", required=True, help="Folder for the result (a model folder like --into).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@_friendly
def transplant(regions_dir, task, donor, backbone, out, overwrite):
    """Copy a task's core back: write --into with --task's core entries taken from --from,
    bit for bit, and every other entry unchanged (the cpi fusion at omega 0). After
    fine-tuning on A and then on B, this undoes what B's training did to A's core; how
    much of A it keeps depends on the core (see "Isolation options" in the README)."""
    from cpift_merge.mergekit.graft import transplant as copy_core
    from cpift_merge.storage.regions import load_regions

    rs = load_regions(regions_dir)
    path = copy_core(backbone, donor, rs, task, out, overwrite=overwrite)
    click.echo(f"wrote {path}: {task}'s core ({rs.k(task)} entries, {rs.score} score) from {donor} into {backbone}")


@main.command("merge-demo")
@click.option("--out", default="merge-demo", show_default=True, help="Folder for the demo's models and outputs.")
@click.option("--density", type=float, default=0.01, show_default=True)
@click.option("--omega", type=float, default=0.5, show_default=True)
@click.option("--overwrite/--no-overwrite", default=True, show_default=True)
@_friendly
def merge_demo(out, density, omega, overwrite):
    """Merge-only demo on a real model: SmolLM2-135M-Instruct, three seeded task
    variants, `cpift regions`, a `cpi` merge, and a generation from the result."""
    from cpift_merge.pipeline.demo import run_demo

    run_demo(out, density=density, omega=omega, overwrite=overwrite)


if __name__ == "__main__":  # pragma: no cover
    main()
