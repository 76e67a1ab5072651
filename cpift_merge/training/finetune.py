"""Fine-tuning runs: task probes and staged SFT with frozen cores (HF Trainer).

Each run (one probe, one stage) trains a model with HF ``Trainer`` and the
:class:`FreezeCallback` (which applies :class:`cpift_merge.training.freeze.MaskedUpdate`),
checkpoints into ``OUT.work/`` every ``save_steps`` so an interrupted run resumes
where it stopped, and writes the finished model to ``OUT/`` atomically, with a JSON
record and ``train_log.jsonl``. A finished run (its record exists) is not redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from cpift_merge.core.topk import all_finite
from cpift_merge.errors import CpiftError, first_line
from cpift_merge.storage.files import atomic_dir, ensure_apart, file_stamps, read_json
from cpift_merge.training import distributed
from cpift_merge.training.data import Collator, encode_all
from cpift_merge.training.distributed import agree, barrier, is_main, on_main, rank_world
from cpift_merge.training.freeze import MaskedUpdate, unwrap_optimizer

# Bump when a change to the training path below changes the bits a run writes: a
# finished or interrupted run made by other code is then redone or refused, not reused.
TRAIN_CODE_VERSION = 1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Training options shared by probes, stages and calibration."""

    steps: Optional[int] = None  # optimizer steps (wins over epochs)
    epochs: float = 1.0
    lr: Optional[float] = None  # None: the optimizer's default (DEFAULT_LR)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    bf16: bool = False
    save_steps: int = 25
    warmup_steps: int = 0
    scheduler: str = "linear"
    lora: bool = False
    lora_rank: int = 8
    device: str = "auto"  # auto | cpu | cuda
    optimizer: str = "adamw"  # adamw (the Trainer's AdamW, the papers' recipe) | sgd (plain SGD)
    momentum: float = 0.0  # sgd only
    report_to: str = "none"  # the Trainer's report_to: none, all, or integrations (tensorboard,wandb)
    lora_alpha: Optional[float] = None  # None: 2 x lora_rank
    lora_targets: str = ""  # comma-separated module names; "": every attention and MLP projection present
    fsdp: bool = False  # shard parameters and optimizer state with FSDP2 (GPUs, under torchrun / accelerate)
    fsdp_config: Optional[Dict[str, Any]] = None  # the Trainer's FSDP2 settings on top of ours (fsdp only)

    # Options added after runs were recorded: left out of a run's identity while at their
    # defaults, so finished runs made before them are still recognised as the same run.
    LATER_DEFAULTS = {
        "optimizer": "adamw",
        "momentum": 0.0,
        "lora_alpha": None,
        "lora_targets": "",
        "fsdp": False,
        "fsdp_config": None,
    }
    # Learning rate when none is given. SGD's is measured on SmolLM2-135M probes (README,
    # "Probe optimizer"): with clipping at 1.0 its loss drop matches the AdamW probe's.
    DEFAULT_LR = {"adamw": 1e-4, "sgd": 0.1}

    def __post_init__(self):
        if self.lr is None and self.optimizer in self.DEFAULT_LR:
            self.lr = self.DEFAULT_LR[self.optimizer]

    def identity(self) -> Dict[str, Any]:
        """The options as recorded in a run's identity and in pipeline fingerprints."""
        values = asdict(self)
        values.pop("report_to")  # where logs go changes no bit of the run
        return {k: v for k, v in values.items() if k not in self.LATER_DEFAULTS or v != self.LATER_DEFAULTS[k]}

    def report_targets(self) -> List[str]:
        """``report_to`` as the Trainer takes it (an empty list for none)."""
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        return [] if names in ([], ["none"]) else names

    def check(self) -> None:
        if not isinstance(self.report_to, str):
            raise CpiftError(f"--report-to must be a comma-separated list of integrations, got {self.report_to!r}")
        if self.lora_alpha is not None and (
            isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0
        ):
            raise CpiftError(f"--lora-alpha must be a positive number, got {self.lora_alpha!r}")
        if (self.lora_alpha is not None or self.lora_targets) and not self.lora:
            raise CpiftError("--lora-alpha and --lora-target-modules apply to --lora only")
        if self.optimizer not in ("adamw", "sgd"):
            raise CpiftError(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        for name in ("steps", "batch_size", "grad_accum", "save_steps", "lora_rank", "seed", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise CpiftError(f"--{name.replace('_', '-')} must be a whole number, got {value!r}")
        for name in ("epochs", "lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CpiftError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if self.steps is not None and self.steps < 1:
            raise CpiftError(f"--steps must be at least 1, got {self.steps}")
        if self.epochs <= 0:
            raise CpiftError(f"--epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "save_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise CpiftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0 or self.warmup_steps < 0:
            raise CpiftError(f"--seed and warmup steps must be non-negative, got {self.seed} and {self.warmup_steps}")
        if self.lr is None or self.lr <= 0:
            raise CpiftError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise CpiftError("--weight-decay and --max-grad-norm must be non-negative")
        from transformers.trainer_utils import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.scheduler not in schedulers:
            raise CpiftError(f"scheduler must be one of {', '.join(schedulers)}, got {self.scheduler!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise CpiftError(f"--momentum must be a number in [0, 1), got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise CpiftError("--momentum applies to --optimizer sgd only")
        if self.device not in ("auto", "cpu", "cuda"):
            raise CpiftError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CpiftError("--device cuda asked for, but no CUDA device is available")
        if self.fsdp_config is not None and not self.fsdp:
            raise CpiftError("--fsdp-config applies to --fsdp only")
        if not isinstance(self.fsdp, bool):
            raise CpiftError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.fsdp:
            if self.lora:
                raise CpiftError("--fsdp and --lora together are not supported; use one of them")
            distributed.fsdp_settings(self.fsdp_config)  # refuses FSDP1-only or unknown settings
            if not distributed.fsdp_available(self.device):
                raise CpiftError(
                    "--fsdp needs CUDA GPUs (accelerate shards only there); on CPU drop --fsdp:"
                    " torchrun still trains data-parallel"
                )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


class FreezeCallback(TrainerCallback):
    """HF ``Trainer`` / TRL ``SFTTrainer`` callback that keeps frozen entries
    bit-identical. It attaches :class:`MaskedUpdate` when training begins (after the
    optimizer exists and any checkpoint state was loaded) and detaches at the end.

    ``trainer = Trainer(..., callbacks=[FreezeCallback(masks)])`` with ``masks`` a
    ``{parameter name: bool tensor}`` (True = frozen).
    """

    def __init__(self, masks: Dict[str, torch.Tensor], storage: str = "bits"):
        self.masks = masks
        self.storage = storage
        self.update: Optional[MaskedUpdate] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.update = MaskedUpdate(model, self.masks, storage=self.storage).attach(unwrap_optimizer(optimizer))

    def on_train_end(self, args, state, control, **kwargs):
        if self.update is not None:
            self.update.detach()


def model_card(base: str, rec: Dict[str, Any]) -> str:
    """A Hugging Face model card (README.md with YAML front matter) for a model our
    trainer wrote: what it was fine-tuned from, on what, and with which settings, so
    ``huggingface_hub.upload_folder`` publishes the folder as it is."""
    import yaml

    kind = "sparse probe" if rec.get("sparse") else "probe" if "task" in rec else "stage"
    tasks = [rec["task"]] if "task" in rec else list(rec.get("tasks") or [])
    root = os.path.basename(os.path.normpath(base))
    try:  # a base we trained ourselves (an earlier stage) names its own base: keep the root
        with open(os.path.join(base, "README.md"), encoding="utf-8") as fh:
            text = fh.read()
        if "cpift-merge" in text and text.startswith("---"):
            root = yaml.safe_load(text.split("---")[1]).get("base_model") or root
    except (OSError, yaml.YAMLError, AttributeError, IndexError):
        pass
    front = {
        "base_model": root,
        "library_name": "transformers",
        "tags": ["cpift-merge", "cpi-ft", kind.replace(" ", "-"), *[f"task:{t}" for t in tasks]],
    }
    cfg = rec.get("config", {})
    settings = {k: cfg[k] for k in ("optimizer", "lr", "steps", "epochs", "batch_size", "weight_decay") if k in cfg}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {kind}: {', '.join(tasks) or 'training run'}",
        "",
        f"Fine-tuned from `{os.path.basename(os.path.normpath(base))}` (itself from `{root}`)"
        if root != os.path.basename(os.path.normpath(base))
        else f"Fine-tuned from `{root}`",
        f"with cpift-merge ({kind}) on {rec.get('examples', '?')} examples"
        f" of {', '.join(tasks) or 'its data'}, {rec.get('steps', '?')} optimizer steps.",
    ]
    if rec.get("frozen_entries"):
        frozen = ", ".join(rec.get("frozen_tasks") or []) or "given"
        lines.append(f"{rec['frozen_entries']:,} entries (the cores of {frozen}) were kept bit-identical.")
    lines += ["", "Settings:", "", "```yaml", yaml.safe_dump(settings, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


class JsonlLogCallback(TrainerCallback):
    """Append every Trainer log (loss, lr, grad norm) to a JSONL file."""

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        self.losses: List[float] = []
        if os.path.exists(path) and is_main():  # drop lines past the checkpoint we resume from
            keep = []
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:  # cut short by a kill while it was written
                        continue
                    if rec.get("step", 0) <= resume_step:
                        keep.append(json.dumps(rec) + "\n")
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(keep)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            rec = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if "loss" in rec:
                self.losses.append(float(rec["loss"]))
            if getattr(state, "is_world_process_zero", True):  # one log, written once
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")


class LossBar(ProgressCallback):
    """Trainer's progress bar with the loss in its postfix, instead of a printed dict
    per logging step."""

    def __init__(self, desc: str = ""):
        super().__init__()
        self.desc = desc

    def on_train_begin(self, args, state, control, **kwargs):
        # as ProgressCallback, but with the description from the start: a bar renamed
        # after it was drawn leaves a blank "0/N" line in logs that are not a terminal
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=self.desc or None)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)


class NoFinalCheckpoint(TrainerCallback):
    """Trainer saves a full checkpoint (model and optimizer state) when training ends;
    ``finetune`` writes the finished model itself right after, so skip that one."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and state.global_step % args.save_steps:
            control.should_save = False


class FiniteTraining(TrainerCallback):
    """Stop at the first logged loss or gradient norm that is NaN or infinite (before
    that step is checkpointed): one line naming the step, instead of a NaN model."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise CpiftError(
                    f"training diverged at step {state.global_step}: {key} is {value};"
                    f" lower the learning rate (now {args.learning_rate:g}) or check the data"
                )


class _Examples(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return {"input_ids": r.input_ids, "labels": r.labels}


def _last_checkpoint(work: str) -> Optional[str]:
    if not os.path.isdir(work):
        return None
    ckpts = [d for d in os.listdir(work) if d.startswith("checkpoint-") and d[11:].isdigit()]
    ckpts = [d for d in ckpts if _readable_state(os.path.join(work, d, "trainer_state.json"))]
    return os.path.join(work, max(ckpts, key=lambda d: int(d[11:]))) if ckpts else None


def _readable_state(path: str) -> bool:
    """trainer_state.json is written last into a checkpoint, but not atomically: a run
    killed while writing it leaves a checkpoint to pass over, not to resume from."""
    state = read_json(path)
    return isinstance(state, dict) and "global_step" in state


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def model_fingerprint(path: str) -> str:
    """Content fingerprint of a model folder (tensor names, shapes, dtypes, sampled
    values), so a moved or copied model keeps it; file stamps for what is not safetensors."""
    from cpift_merge.storage.checkpoint import Checkpoint

    try:
        return Checkpoint(path, label=path).fingerprint()[:16]
    except CpiftError:
        return _digest(repr(file_stamps(path)).encode())


def load_tokenizer(path: str):
    """The tokenizer saved beside a model; one line when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise CpiftError(
            f"cannot load a tokenizer from {path} ({first_line(err, 200)}); save the base's tokenizer beside it"
        ) from None


def refuse_non_finite(path: str) -> bool:
    """Refuse a model with NaN or Inf in a tensor, streamed before anything is loaded.
    False when the folder is not safetensors (then the loaded model is checked)."""
    from cpift_merge.storage.checkpoint import Checkpoint, has_safetensors

    if not has_safetensors(path):
        return False
    bad = Checkpoint(path, label=path).first_non_finite()  # a truncated file: one line here
    if bad is not None:
        raise CpiftError(f"model {path} has NaN or Inf in tensor {bad}; fix or re-export that checkpoint")
    return True


def run_identity(
    base: str, examples: Sequence[Dict[str, Any]], cfg: TrainConfig, frozen: Optional[Dict[str, torch.Tensor]]
) -> Dict[str, Any]:
    """Everything that determines the bits a fine-tune writes: the resolved options,
    the base model's content, the examples' content, the frozen entries, the code."""
    import numpy as np

    masks = sorted((frozen or {}).items())
    return {
        "config": cfg.identity(),
        "base": model_fingerprint(base),
        "data": _digest(json.dumps(list(examples), sort_keys=True, default=str).encode()),
        "frozen": {
            "entries": sum(int(m.sum()) for _, m in masks),
            "digest": _digest(*(n.encode() + np.packbits(m.detach().cpu().numpy()).tobytes() for n, m in masks)),
        },
        "code": TRAIN_CODE_VERSION,
    }


def _what_changed(old: Any, new: Dict[str, Any]) -> str:
    """``other settings (lr 0.0001 -> 0.005, training data)``: what differs between two
    :func:`run_identity` records (``old`` may be anything read from disk)."""
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return "other settings (made by an older cpift-merge or edited)"
    cfg_old = old["config"]
    changed = [f"{k} {cfg_old.get(k)!r} -> {v!r}" for k, v in new["config"].items() if cfg_old.get(k) != v]
    labels = {"base": "base model", "data": "training data", "frozen": "frozen entries", "code": "training code"}
    changed += [label for key, label in labels.items() if old.get(key) != new[key]]
    return f"other settings ({', '.join(changed) or 'unknown'})"


def finetune(
    base: str,
    examples: Sequence[Dict[str, Any]],
    out: str,
    cfg: TrainConfig,
    *,
    frozen: Optional[Dict[str, torch.Tensor]] = None,
    record: str = "run.json",
    extra: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    desc: str = "",
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Fine-tune ``base`` on ``examples`` into ``out`` (resumable, atomic).

    ``frozen`` maps parameter names to bool masks kept bit-identical. Returns the
    record written to ``out/<record>``. A finished run in ``out`` (or an interrupted
    one in ``out.work``) is reused (resumed) only when it was made from the same
    :func:`run_identity`; otherwise it is refused with what changed, or redone with
    ``overwrite`` (the old ``out`` stays until the new one is written). Nothing is left
    in ``out.work`` when the run is refused or diverges.
    """
    cfg.check()
    out = os.path.abspath(out)
    done = os.path.join(out, record)
    work = out + ".work"
    ensure_apart(out, [base])
    streamed = refuse_non_finite(base)
    run_id = run_identity(base, examples, cfg, frozen)
    if os.path.isfile(done):
        old = read_json(done)
        if isinstance(old, dict) and old.get("run") == run_id:
            barrier()  # every rank has seen the finished run before rank 0 tidies up
            if is_main():
                shutil.rmtree(work, ignore_errors=True)  # left by a kill between the rename and the cleanup
            return old
        if not overwrite:
            prior = old.get("run") if isinstance(old, dict) else None
            raise CpiftError(
                f"{out} holds a finished run made with {_what_changed(prior, run_id)}; pass --overwrite to redo it,"
                " or choose another --out"
            )
    elif os.path.exists(out) and not overwrite:  # finished runs are written whole, record included
        raise CpiftError(
            f"{out} exists but holds no {record}; it is not a finished run: delete it or choose another --out"
        )
    stamp = os.path.join(work, "run-config.json")

    def check_and_stamp() -> None:
        if os.path.isfile(stamp):
            prior = read_json(stamp)
            if prior != run_id:
                if not overwrite:
                    raise CpiftError(
                        f"{work} holds an interrupted run with {_what_changed(prior, run_id)}; pass --overwrite to"
                        " start over, or rerun with the same options"
                    )
                shutil.rmtree(work)
        if not os.path.isfile(stamp):
            os.makedirs(work, exist_ok=True)
            with open(stamp, "w", encoding="utf-8") as fh:
                json.dump(run_id, fh)

    # rank 0 alone reads and writes the stamp (another rank could read it half-written);
    # every rank stops with its error, or goes on once it is written
    on_main(check_and_stamp)

    try:
        return _train_and_save(
            base, examples, out, cfg, frozen, record, extra, progress and is_main(), desc, work, run_id,
            check_loaded=not streamed,
        )  # fmt: skip
    except CpiftError:
        if is_main():
            shutil.rmtree(work, ignore_errors=True)  # a refused or diverged run leaves nothing worth resuming
        raise


def _train_and_save(
    base: str,
    examples: Sequence[Dict[str, Any]],
    out: str,
    cfg: TrainConfig,
    frozen: Optional[Dict[str, torch.Tensor]],
    record: str,
    extra: Optional[Dict[str, Any]],
    progress: bool,
    desc: str,
    work: str,
    run_id: Dict[str, Any],
    check_loaded: bool,
) -> Dict[str, Any]:
    """The body of :func:`finetune` once ``work`` is stamped: train (resuming from the
    last checkpoint in ``work``), check, and write ``out`` atomically."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    tok = load_tokenizer(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows, report = encode_all(tok, examples, cfg.max_length)
    if not rows:
        raise CpiftError(f"{report.summary(desc or 'data')}: nothing left to train on; raise --max-length")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except Exception as err:  # a damaged or foreign checkpoint: one line, not a traceback
        raise CpiftError(
            f"cannot load model {base}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from None
    bad = next((n for n, p in model.named_parameters() if check_loaded and not all_finite(p.detach())), None)
    if bad is not None:
        raise CpiftError(f"model {base} has NaN or Inf in tensor {bad}; fix or re-export that checkpoint")
    reference = {n: p.detach()[frozen[n]].clone() for n, p in model.named_parameters() if frozen and n in frozen}
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        names = [n for n, _ in model.named_parameters()]
        wanted = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or list(LORA_TARGETS)
        targets = [t for t in wanted if any(n.endswith(f"{t}.weight") for n in names)]
        missing = [t for t in wanted if t not in targets]
        if cfg.lora_targets and missing:
            raise CpiftError(f"--lora-target-modules: {base} has no module named {missing[0]} with a weight")
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
        model = get_peft_model(
            model, LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
        )
    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    args = TrainingArguments(
        output_dir=work,
        max_steps=cfg.steps if cfg.steps is not None else -1,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        use_cpu=use_cpu,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        logging_steps=1,
        report_to=cfg.report_targets(),
        disable_tqdm=True,  # our LossBar replaces Trainer's bar
        dataloader_num_workers=0,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (FiniteTraining stops there)
        **({"optim": "sgd", "optim_args": f"momentum={cfg.momentum}"} if cfg.optimizer == "sgd" else {}),
        **_fsdp_arguments(cfg, model),
    )
    resume = _last_checkpoint(work)
    resume_step = 0
    if resume:
        with open(os.path.join(resume, "trainer_state.json"), encoding="utf-8") as fh:
            resume_step = int(json.load(fh).get("global_step", 0))
    log = JsonlLogCallback(os.path.join(work, "train_log.jsonl"), resume_step)
    callbacks: List[Any] = [log, NoFinalCheckpoint(), FiniteTraining()]
    if frozen and not cfg.lora:
        callbacks.append(FreezeCallback(frozen))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Examples(rows),
        data_collator=Collator(tok.pad_token_id),
        callbacks=callbacks,
    )
    # Trainer prints every log dict (with bars off) or writes it under the bar: show the
    # loss in the bar's postfix instead (train_log.jsonl keeps every log)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if cfg.fsdp and not trainer.is_fsdp_enabled:  # e.g. one process started without a launcher
        raise CpiftError("--fsdp: accelerate did not turn FSDP on; launch with torchrun or accelerate launch on GPUs")
    if progress:
        trainer.add_callback(LossBar(desc))
    result = trainer.train(resume_from_checkpoint=resume)
    if cfg.lora:
        model = model.merge_and_unload()
    if cfg.fsdp:  # every rank gathers the shards; rank 0 gets the whole state, on the CPU
        weights = trainer.accelerator.get_state_dict(trainer.model)
        held = bool(weights) or not is_main()
    else:
        model = model.to("cpu")
        weights, held = {n: p.detach() for n, p in model.named_parameters()}, True
    # under --fsdp only rank 0 holds the weights: the other ranks have nothing to check
    identical = not weights or all(n in weights and torch.equal(weights[n][frozen[n]], reference[n]) for n in reference)
    agree(held, f"internal error: rank 0 gathered no weights for {out} under --fsdp; please report")
    agree(not frozen or identical, f"internal error: frozen entries moved in {out}; please report")
    losses = [json.loads(line).get("loss") for line in open(os.path.join(work, "train_log.jsonl"), encoding="utf-8")]
    losses = [x for x in losses if x is not None]
    rec = {
        "base": os.path.abspath(base),
        "examples": report.examples,
        "truncated": report.truncated,
        "dropped": report.dropped,
        "steps": int(result.global_step),
        "frozen_entries": run_id["frozen"]["entries"],
        "frozen_bit_identical": bool(identical) if frozen else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "config": asdict(cfg),
        "run": run_id,
        **(extra or {}),
    }
    if resume_step:  # continued from the checkpoint of an interrupted run
        rec["resumed_from_step"] = resume_step
    rank, world = rank_world()
    if world > 1:
        rec["world_size"] = world
    if is_main():
        with atomic_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights if cfg.fsdp else None)
            tok.save_pretrained(tmp)
            shutil.copy(os.path.join(work, "train_log.jsonl"), os.path.join(tmp, "train_log.jsonl"))
            if os.path.isdir(os.path.join(work, "runs")):  # --report-to tensorboard writes its events there
                shutil.copytree(os.path.join(work, "runs"), os.path.join(tmp, "runs"))
            with open(os.path.join(tmp, record), "w", encoding="utf-8") as fh:
                json.dump(rec, fh, indent=1)
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
                fh.write(model_card(base, rec))
    if world > 1:
        barrier()  # rank 0 has written out, and every rank has read the log it is about to remove
    if world > 1 and not cfg.fsdp:  # every replica must hold the weights rank 0 wrote, bit for bit
        same = True
        if rank:
            from cpift_merge.storage.checkpoint import Checkpoint

            saved = Checkpoint(out)
            params = dict(model.named_parameters())
            same = all(torch.equal(saved.get(n), params[n].detach()) for n in saved.infos if n in params)
        agree(same, f"data-parallel replicas ended with different weights in {out}; please report")
    if is_main():
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    return rec


def _fsdp_arguments(cfg: TrainConfig, model) -> Dict[str, Any]:
    """The Trainer's FSDP2 arguments for ``--fsdp`` (none without it)."""
    if not cfg.fsdp:
        return {}
    layers = getattr(model, "_no_split_modules", None) or ()
    return {"fsdp": True, "fsdp_config": distributed.fsdp_settings(cfg.fsdp_config, layers)}


def run_probes(
    base: str,
    data: Dict[str, Sequence[Dict[str, Any]]],
    out: str,
    cfg: TrainConfig,
    *,
    regions_density: Optional[float] = None,
    score: str = "delta",
    progress: bool = True,
    overwrite: bool = False,
    say: Callable[[str], None] = lambda line: None,
    sparse: bool = False,
    sparse_lr: Optional[float] = None,
    mask_cfg: Optional[TrainConfig] = None,
):
    """One probe per task, ``out/NAME`` (``cpift probe``); with ``score`` ``fisher``, each
    probe's diagonal empirical Fisher on its data (``out/NAME/fisher/``); with
    ``regions_density``, then their core regions (global scope, by ``score``) in
    ``out/regions``. Returns the probes' paths and the region set (or None); ``say``
    gets one line per probe."""
    from cpift_merge.core.topk import SCORES
    from cpift_merge.storage.regions import FISHER_NAME

    if regions_density is not None and not 0.0 <= regions_density <= 1.0:  # before any training
        raise CpiftError(f"--regions takes a density in [0, 1] (0.01 = 1%), got {regions_density}")
    if score not in SCORES:
        raise CpiftError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if sparse:
        return _sparse_probes(base, data, out, cfg, regions_density, score, progress, overwrite, say, sparse_lr,
                              mask_cfg)  # fmt: skip
    paths = {}
    for name, examples in data.items():
        say(f"probe {name}: {len(examples)} examples")
        rec = finetune(
            base,
            examples,
            os.path.join(out, name),
            cfg,
            record="probe.json",
            extra={"task": name},
            progress=progress,
            desc=f"probe {name}",
            overwrite=overwrite,
        )
        say(f"  steps {rec['steps']}, loss {rec['first_loss']:.4f} -> {rec['final_loss']:.4f}")
        paths[name] = os.path.join(out, name)
        fisher = os.path.join(paths[name], FISHER_NAME)
        if score == "fisher" and not os.path.isfile(fisher) and is_main():  # a finished probe's Fisher is reused
            from cpift_merge.training.fisher import compute_fisher

            res = compute_fisher(paths[name], examples, fisher, max_length=cfg.max_length, device=cfg.device,
                                 progress=progress)  # fmt: skip
            say(f"  Fisher on {res['examples']} examples ({res['tokens']} response tokens)")
    if regions_density is None:
        return paths, None
    from cpift_merge.storage.regions import compute_from_paths, load_regions

    barrier()  # the Fisher files are written
    if is_main():
        compute_from_paths(
            base, paths, os.path.join(out, "regions"), density=regions_density, score=score, overwrite=True,
            progress=progress,
        )  # fmt: skip
    barrier()
    return paths, load_regions(os.path.join(out, "regions"))


def _sparse_probes(base, data, out, cfg, density, score, progress, overwrite, say, sparse_lr, mask_cfg):
    """``cpift probe --sparse``: dense probes (``mask_cfg``, default ``cfg``) and their
    cores in ``out/dense/``, then each task retrained from ``base`` inside its core only
    (lr ``sparse_lr``, default SPARSE_LR_FACTOR x ``cfg.lr``) in ``out/NAME``, and the
    regions of those in ``out/regions``."""
    from dataclasses import replace

    if density is None:
        raise CpiftError("--sparse needs --regions DENSITY: the core each task is retrained in")
    if sparse_lr is not None and (isinstance(sparse_lr, bool) or not sparse_lr > 0 or not math.isfinite(sparse_lr)):
        raise CpiftError(f"--sparse-lr must be a positive number, got {sparse_lr!r}")
    _, mask_rs = run_probes(base, data, os.path.join(out, "dense"), mask_cfg or cfg, regions_density=density,
                            score=score, progress=progress, overwrite=overwrite, say=say)  # fmt: skip
    retrain = replace(cfg, lr=sparse_lr if sparse_lr is not None else SPARSE_LR_FACTOR * cfg.lr)
    retrain.check()
    paths = {}
    for name, examples in data.items():
        say(f"sparse probe {name}: {mask_rs.k(name):,} entries trainable, lr {retrain.lr:g}")
        rec = sparse_probe(base, examples, os.path.join(out, name), retrain, mask_rs, name, progress=progress,
                           overwrite=overwrite)  # fmt: skip
        say(f"  steps {rec['steps']}, loss {rec['first_loss']:.4f} -> {rec['final_loss']:.4f}")
        paths[name] = os.path.join(out, name)
    from cpift_merge.storage.regions import compute_from_paths, load_regions

    if is_main():
        compute_from_paths(base, paths, os.path.join(out, "regions"), density=density, overwrite=True,
                           progress=progress)  # fmt: skip
    barrier()
    return paths, load_regions(os.path.join(out, "regions"))


# ------------------------------------------------------------------- stages


def plan_groups(spec: str, tasks: Sequence[str], regions=None, seed: int = 0) -> List[List[str]]:
    """Stage groups from ``from-regions``, ``random:K`` or ``given:"a,b;c"``."""
    import random

    if spec == "from-regions":
        if regions is None:
            raise CpiftError("--groups from-regions needs --regions")
        groups = [[t for t in g if t in tasks] for g in regions.groups]
        missing = [t for t in tasks if not any(t in g for g in groups)]
        if missing:
            raise CpiftError(f"task {missing[0]} is not in the region file {regions.path}; recompute the regions")
        return [g for g in groups if g]
    if spec.startswith("random:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise CpiftError(f"--groups random:K needs an integer K, got {spec!r}") from None
        if not 1 <= k <= len(tasks):
            raise CpiftError(f"--groups random:{k} needs 1 <= K <= {len(tasks)} (the number of tasks)")
        order = list(tasks)
        random.Random(seed).shuffle(order)
        return [order[i::k] for i in range(k)]
    if spec.startswith("given:"):
        groups = [[t.strip() for t in g.split(",") if t.strip()] for g in spec.split(":", 1)[1].split(";")]
        groups = [g for g in groups if g]
        named = [t for g in groups for t in g]
        if sorted(named) != sorted(tasks) or len(set(named)) != len(named):
            raise CpiftError(f"--groups {spec!r} must name every task exactly once (tasks: {', '.join(tasks)})")
        return groups
    raise CpiftError(f'--groups must be from-regions, random:K or given:"a,b;c", got {spec!r}')


def _skeleton(path: str) -> torch.nn.Module:
    """The model at ``path`` on the meta device (names and shapes, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CpiftError(f"cannot read the model config in {path}: {err}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


SPARSE_LR_FACTOR = 20  # a sparse probe's default lr: this times the dense probe's (LoTA's ratio at 1%)


def sparse_probe(
    base: str,
    examples: Sequence[Dict[str, Any]],
    out: str,
    cfg: TrainConfig,
    mask_regions,
    task: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
    record: str = "probe.json",
) -> Dict[str, Any]:
    """Retrain ``task`` from ``base`` with every entry outside its core in
    ``mask_regions`` frozen (LoTA-style): the result differs from ``base`` only inside
    the core, bit for bit. ``cfg`` is the retrain's (its lr is the sparse lr)."""
    if task not in mask_regions.tasks:
        raise CpiftError(f"sparse probe: task {task} has no core in {mask_regions.path}")
    frozen = outside_cores(_skeleton(base), mask_regions, [task])
    return finetune(
        base, examples, out, cfg, frozen=frozen, record=record,
        extra={"task": task, "sparse": True, "mask_regions": mask_regions.path},
        progress=progress, desc=f"sparse probe {task}", overwrite=overwrite,
    )  # fmt: skip


UPDATES = ("all", "core")  # what a stage trains: all but earlier cores (the papers'), or its own cores only


def replay_examples(examples: Sequence[Dict[str, Any]], n: int, seed: int) -> List[Dict[str, Any]]:
    """``n`` of ``examples``, drawn without replacement with ``seed`` (a stage's replay)."""
    import random

    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def outside_cores(model, regions, group: Sequence[str], earlier: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Frozen masks for training only ``group``'s cores (less ``earlier`` tasks' cores):
    ``update: core`` stages and sparse probes."""
    from cpift_merge.training.freeze import _named_parameters, masks_from_regions

    own = masks_from_regions(model, regions, group)
    before = masks_from_regions(model, regions, earlier) if earlier else {}
    frozen = {}
    for name, p in _named_parameters(model):
        if not p.is_floating_point():
            continue
        train = own.get(name)
        if train is None:
            frozen[name] = torch.ones(p.shape, dtype=torch.bool)
        else:
            frozen[name] = ~train | before[name] if name in before else ~train
    return frozen


def staged_train(
    base: str,
    data: Dict[str, List[Dict[str, Any]]],
    out: str,
    groups: List[List[str]],
    cfg: TrainConfig,
    regions=None,
    sample: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
    update: str = "all",
    replay: int = 0,
) -> Dict[str, Any]:
    """Train the groups in order; stage k freezes the cores of every task trained in
    stages 1..k-1. Each stage is saved under ``OUT/stage-K/`` with ``stage.json``.

    ``update="core"`` trains, in each stage, only the union of its own group's cores
    (less earlier stages' cores): every other entry stays bit-identical. ``replay=N``
    mixes N seeded examples of each earlier stage's tasks into every later stage."""
    import random

    from cpift_merge.training.data import sample_balanced
    from cpift_merge.training.freeze import masks_from_regions

    if update not in UPDATES:
        raise CpiftError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
    if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
        raise CpiftError(f"replay must be a whole number of examples per earlier task (0 = off), got {replay!r}")
    if update == "core" and regions is None:
        raise CpiftError("update core trains only the stage's cores: it needs regions")
    if update == "core":
        missing = [t for g in groups for t in g if t not in regions.tasks]
        if missing:
            raise CpiftError(f"update core: task {missing[0]} has no core in the region file {regions.path}")
    if regions is not None:  # before any training: the cores frozen in later stages must exist
        missing = [t for g in groups[:-1] for t in g if t not in regions.tasks]
        if missing:
            raise CpiftError(
                f"task {missing[0]} is not in the region file {regions.path} (it has {', '.join(regions.tasks)});"
                " its core is needed to freeze it in later stages: recompute the regions"
            )
        params = dict(_skeleton(base).named_parameters())
        for t in regions.tensor_names:
            if t in params and list(params[t].shape) != list(regions.shape(t)):
                raise CpiftError(
                    f"region file {regions.path}: {t} has shape {list(regions.shape(t))}, in {base}"
                    f" {list(params[t].shape)}; the regions were computed for another model"
                )
    if sample is not None:
        data = sample_balanced(data, sample, cfg.seed)
    if replay:
        short = [(t, len(data[t])) for g in groups[:-1] for t in g if len(data[t]) < replay]
        if short:
            raise CpiftError(f"replay {replay} is larger than task {short[0][0]}'s {short[0][1]} examples")
    os.makedirs(out, exist_ok=True)
    current = base
    stages = []
    earlier: List[str] = []
    for k, group in enumerate(groups, 1):
        stage_dir = os.path.join(out, f"stage-{k}")
        frozen = None
        if update == "core":
            frozen = outside_cores(_skeleton(current), regions, group, earlier)
        elif regions is not None and earlier:
            frozen = masks_from_regions(_skeleton(current), regions, earlier)
        rows = [ex for t in group for ex in data[t]]
        replayed = {t: replay_examples(data[t], replay, cfg.seed + k) for t in earlier} if replay else {}
        rows += [ex for t in earlier for ex in replayed.get(t, [])]
        random.Random(cfg.seed + k).shuffle(rows)
        rec = finetune(
            current,
            rows,
            stage_dir,
            cfg,
            frozen=frozen,
            record="stage.json",
            extra={
                "stage": k,
                "tasks": group,
                "frozen_tasks": list(earlier),
                **({"update": update} if update != "all" else {}),
                **({"replayed": {t: len(v) for t, v in replayed.items()}} if replay else {}),
            },
            progress=progress,
            desc=f"stage {k}/{len(groups)} ({'+'.join(group)})",
            overwrite=overwrite,
        )
        stages.append(
            {
                "stage": k,
                "tasks": group,
                "path": stage_dir,
                "frozen_entries": rec["frozen_entries"],
                "steps": rec["steps"],
                "final_loss": rec["final_loss"],
            }
        )
        earlier += group
        current = stage_dir
    summary = {
        "groups": groups,
        "stages": stages,
        "final": current,
        "regions": getattr(regions, "path", None),
        "sample": sample,
        "update": update,
        "replay": replay,
    }
    if is_main():
        with open(os.path.join(out, "train.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def train_from_files(
    base: str,
    task_files: Dict[str, str],
    out: str,
    cfg: TrainConfig,
    *,
    groups: str = "from-regions",
    regions_dir: Optional[str] = None,
    sample: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
    allow_other_base: bool = False,
    update: str = "all",
    replay: int = 0,
) -> Dict[str, Any]:
    """``cpift train``: each task's data from its file, the cores from ``regions_dir``,
    the stages from ``groups`` (see :func:`plan_groups`), then :func:`staged_train`.
    Regions computed on another base than ``base`` are refused unless
    ``allow_other_base`` (CPI-FT's calibration freezes θ0's cores in a merged model)."""
    from cpift_merge.storage.checkpoint import Checkpoint, has_safetensors
    from cpift_merge.storage.regions import load_regions
    from cpift_merge.training.data import load_tasks

    data = load_tasks(task_files, say=print if progress and is_main() else None)
    rs = load_regions(regions_dir) if regions_dir else None
    if rs is not None and not allow_other_base and has_safetensors(base):
        other = rs.other_base_tensor(Checkpoint(base, label=base))
        if other is not None:
            raise CpiftError(
                f"region file {rs.path} was computed for another model: its base differs from {base} in {other};"
                " pass --allow-other-base to freeze its cores in this model anyway (as when calibrating a merge)"
            )
    plan = plan_groups(groups, list(data), rs, cfg.seed)
    return staged_train(
        base, data, out, plan, cfg, regions=rs, sample=sample, progress=progress, overwrite=overwrite, update=update,
        replay=replay,
    )  # fmt: skip
