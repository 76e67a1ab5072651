"""BIG-bench JSON tasks as our task files (``cpift tasks import-bigbench``).

A BIG-bench JSON task (``bigbench/benchmark_tasks/NAME/task.json``) holds ``examples``,
each with an ``input`` and either a ``target`` (a string, or a list of acceptable
strings: a generative example) or ``target_scores`` (``{choice text: score}``: a
multiple-choice example), plus optional ``task_prefix`` and ``metrics``. We turn each
example into ``{"prompt", "response", "answer"}``:

* generative: prompt = ``task_prefix`` + ``input``; response = answer = the first
  target, every acceptable target kept in ``answers`` (scored correct on any of them);
  metric ``exact`` (BIG-bench's ``exact_str_match``);
* multiple choice: the prompt lists the choices as ``A. text`` lines and ends with
  ``Answer with the letter.``; response = answer = the letter of the highest-scored
  choice; the choice texts are kept in ``choices``; metric ``choice``
  (``multiple_choice_grade``).

Our prompts go through the model's chat template, so the example input/output
prefixes (``"\\nQ: "``, ``"\\nA: "`` by default) are not added; the task's
``task_prefix`` is. The task files are not shipped here: get them with
``pip download --no-deps bigbench==1.0.0`` (the sdist holds
``bigbench/benchmark_tasks/*/task.json``) or a clone of google/BIG-bench.
Programmatic tasks (a ``task.py``, no ``task.json``) are not JSON tasks.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from cpift_merge.errors import CpiftError

Example = Dict[str, Any]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
METRICS = {"exact_str_match": "exact", "multiple_choice_grade": "choice"}


@dataclass
class BigBenchTask:
    name: str
    path: str
    metric: str  # exact | choice
    bigbench_metrics: List[str]
    examples: List[Example] = field(default_factory=list)


def _task_file(path: str) -> str:
    if os.path.isdir(path):
        f = os.path.join(path, "task.json")
        if os.path.isfile(f):
            return f
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "task.json")))
        hint = f" (its subtasks: {', '.join(os.path.join(path, d, 'task.json') for d in subs[:3])})" if subs else ""
        raise CpiftError(
            f"{path} has no task.json: a programmatic task (task.py) or a task with subtasks;"
            f" point at one subtask's task.json{hint}"
        )
    if not os.path.isfile(path):
        raise CpiftError(f"BIG-bench task {path} does not exist")
    return path


def _choice_example(ex: Dict[str, Any], prefix: str, where: str) -> Example:
    scores = ex["target_scores"]
    if not isinstance(scores, dict) or len(scores) < 2 or len(scores) > len(LETTERS):
        raise CpiftError(f"{where}: target_scores must map 2 to 26 choices to scores")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
        raise CpiftError(f"{where}: target_scores values must be numbers")
    choices = list(scores)
    best = max(scores.values())
    if all(v == best for v in scores.values()):
        raise CpiftError(f"{where}: every choice has the same score; no answer to learn")
    letter = LETTERS[[scores[c] for c in choices].index(best)]
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    prompt = (prefix + str(ex["input"])).strip() + "\n" + "\n".join(lines) + "\nAnswer with the letter."
    return {"prompt": prompt, "response": letter, "answer": letter, "choices": choices}


def _generative_example(ex: Dict[str, Any], prefix: str, where: str) -> Example:
    target = ex["target"]
    targets = target if isinstance(target, list) else [target]
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise CpiftError(f"{where}: target must be a non-empty string or a list of them")
    targets = [t.strip() for t in targets]
    return {
        "prompt": (prefix + str(ex["input"])).strip(),
        "response": targets[0],
        "answer": targets[0],
        "answers": targets,
    }


def read_task(path: str) -> BigBenchTask:
    """Read a BIG-bench JSON task (a ``task.json`` or its folder) as our examples."""
    file = _task_file(path)
    try:
        with open(file, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError) as err:
        raise CpiftError(f"cannot read BIG-bench task {file}: {err}") from None
    except ValueError as err:
        raise CpiftError(f"{file} is not JSON ({err}); give a BIG-bench task.json") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("examples"), list):
        raise CpiftError(f"{file} is not a BIG-bench JSON task (no examples list)")
    if not doc["examples"]:
        raise CpiftError(f"{file} has no examples")
    prefix = doc.get("task_prefix") or ""
    if not isinstance(prefix, str):
        raise CpiftError(f"{file}: task_prefix must be a string")
    kinds = set()
    examples = []
    for i, ex in enumerate(doc["examples"]):
        where = f"{file} example {i}"
        if not isinstance(ex, dict) or "input" not in ex:
            raise CpiftError(f"{where} has no input")
        if "target_scores" in ex:
            kinds.add("choice")
            examples.append(_choice_example(ex, prefix, where))
        elif "target" in ex:
            kinds.add("exact")
            examples.append(_generative_example(ex, prefix, where))
        else:
            raise CpiftError(f"{where} has neither target nor target_scores")
        if len(kinds) > 1:
            raise CpiftError(f"{file} mixes generative (target) and multiple-choice (target_scores) examples")
    kind = kinds.pop()
    metrics = doc.get("metrics") or []
    if not isinstance(metrics, list):
        raise CpiftError(f"{file}: metrics must be a list")
    supported = [METRICS[m] for m in metrics if m in METRICS]
    if metrics and kind not in supported:
        raise CpiftError(
            f"{file} is scored by {', '.join(map(str, metrics))}; we score exact_str_match (target examples)"
            " and multiple_choice_grade (target_scores examples)"
        )
    name = doc.get("name") if isinstance(doc.get("name"), str) else os.path.basename(os.path.dirname(file))
    return BigBenchTask(name=name, path=file, metric=kind, bigbench_metrics=list(metrics), examples=examples)


def split(task: BigBenchTask, test_fraction: float = 0.2, seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """Seeded, disjoint train/test split by prompt (duplicates of a prompt stay together);
    at least one prompt on each side."""
    if not 0 < test_fraction < 1:
        raise CpiftError(f"test fraction must be between 0 and 1, got {test_fraction}")
    prompts = list(dict.fromkeys(ex["prompt"] for ex in task.examples))
    if len(prompts) < 2:
        raise CpiftError(f"{task.path} has {len(prompts)} distinct prompt(s); a train/test split needs 2")
    random.Random(f"bigbench:{task.name}:{seed}").shuffle(prompts)
    n_test = min(len(prompts) - 1, max(1, round(test_fraction * len(prompts))))
    test_prompts = set(prompts[:n_test])
    train = [ex for ex in task.examples if ex["prompt"] not in test_prompts]
    test = [ex for ex in task.examples if ex["prompt"] in test_prompts]
    return train, test


def import_bigbench(
    task_json: str, out_dir: str, test_fraction: float = 0.2, seed: int = 0, overwrite: bool = False
) -> Dict[str, Any]:
    """Write ``OUT_DIR/train.jsonl``, ``test.jsonl`` and ``task.yml`` (name, metric,
    sizes, split settings), all or nothing. ``out_dir`` may be missing or empty; another
    is replaced only with ``overwrite``."""
    import yaml

    from cpift_merge.storage.files import atomic_dir, write_text

    task = read_task(task_json)
    train, test = split(task, test_fraction, seed)
    out = os.path.abspath(out_dir)
    empty = os.path.isdir(out) and not os.listdir(out)
    info = {
        "name": task.name,
        "metric": task.metric,
        "domain": "bigbench",
        "source": os.path.abspath(task.path),
        "bigbench_metrics": task.bigbench_metrics,
        "n_train": len(train),
        "n_test": len(test),
        "test_fraction": test_fraction,
        "seed": seed,
    }
    with atomic_dir(out, overwrite=overwrite or empty) as tmp:
        for name, rows in (("train", train), ("test", test)):
            write_text(os.path.join(tmp, f"{name}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        write_text(os.path.join(tmp, "task.yml"), yaml.safe_dump(info, sort_keys=False))
    return {**info, "train": os.path.join(out, "train.jsonl"), "test": os.path.join(out, "test.jsonl")}
