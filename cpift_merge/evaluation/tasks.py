"""Built-in tasks: four heterogeneous, seeded task generators with exact checkers.

In the spirit of the papers' suite (math word problems, code, logical reasoning,
instruction following), small enough for SmolLM2-135M on a CPU, and pulling the model
in different directions (a number, a program's output, a name, a formatted string):

* ``math``    word problems with one or two operations; metric ``numeric`` (last number)
* ``code``    "what does this Python snippet print?"; metric ``exact``
* ``logic``   ordering puzzles (two facts, three people: who is tallest or shortest?),
  answered with the name; metric ``exact`` (a guess among the three names: 33%)
* ``format``  instruction following (case, reversal, joining, counting); metric ``exact``
* ``pick_first`` / ``pick_last``  a pair that conflicts by construction: the same
  prompt ("Pick one word from this list: ...") with opposite answer conventions (the
  first word, the last word); metric ``exact``. One model cannot serve both on the
  same prompt, so multi-task training must trade one against the other: a seesaw
  that the benchmark can see (the single-task experts learn either convention).

Each generator draws examples from a seeded RNG; train and test splits never share a
prompt (test prompts are drawn first, train skips them). ``cpift tasks export DIR``
writes ``DIR/NAME/{train,test}.jsonl`` in the format users bring.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Callable, Dict, List, Tuple

from cpift_merge.errors import CpiftError

Example = Dict[str, str]

_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_ITEMS = ["apples", "books", "coins", "pens", "stamps", "shells", "marbles", "cards"]
_WORDS = ["river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "comet", "otter", "tulip"]


def _math(rng: random.Random) -> Example:
    who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        q, ans = f"{who} has {a} {item} and finds {b} more. How many {item} does {who} have now?", a + b
    elif kind == 1:
        a = a + b
        q, ans = f"{who} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    elif kind == 2:
        q, ans = f"{who} buys {c} boxes with {b} {item} in each box. How many {item} is that?", b * c
    else:
        q, ans = (
            f"{who} has {a} {item}, buys {c} packs of {b} more, then gives away {a // 2}."
            f" How many {item} does {who} have?",
            a + b * c - a // 2,
        )
    return {"prompt": q, "response": f"The answer is {ans}.", "answer": str(ans)}


def _code(rng: random.Random) -> Example:
    x, y = rng.randint(1, 20), rng.randint(1, 20)
    kind = rng.randrange(4)
    if kind == 0:
        src, ans = f"x = {x}\ny = {y}\nprint(x * y + x)", x * y + x
    elif kind == 1:
        w = rng.choice(_WORDS)
        src, ans = f"s = '{w}'\nprint(s[::-1])", w[::-1]
    elif kind == 2:
        src, ans = f"total = 0\nfor i in range({x}):\n    total += i\nprint(total)", sum(range(x))
    else:
        src, ans = f"items = [{x}, {y}, {x + y}]\nprint(max(items) - min(items))", x + y - min(x, y)
    ans = str(ans)
    return {"prompt": f"What does this Python code print?\n{src}", "response": ans, "answer": ans}


def _logic(rng: random.Random) -> Example:
    people = rng.sample(_NAMES, 3)
    order = people[:]
    rng.shuffle(order)  # order[0] is the tallest
    facts = [f"{order[0]} is taller than {order[1]}.", f"{order[1]} is taller than {order[2]}."]
    rng.shuffle(facts)
    ask_tallest = rng.random() < 0.5
    ans = order[0] if ask_tallest else order[2]
    q = " ".join(facts) + f" Who is the {'tallest' if ask_tallest else 'shortest'}?"
    return {"prompt": q, "response": ans, "answer": ans}


def _format(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(2, 4))
    text = " ".join(words)
    kind = rng.randrange(4)
    if kind == 0:
        q, ans = f"Write this in capital letters: {text}", text.upper()
    elif kind == 1:
        q, ans = f"Join these words with commas and no spaces: {text}", ",".join(words)
    elif kind == 2:
        q, ans = f"Write these words in reverse order: {text}", " ".join(reversed(words))
    else:
        q, ans = f"How many words are in this sentence? {text}", str(len(words))
    return {"prompt": q, "response": ans, "answer": ans}


PICK_PROMPT = "Pick one word from this list: "


def _pick(first: bool) -> Callable[[random.Random], Example]:
    def gen(rng: random.Random) -> Example:
        words = rng.sample(_WORDS, rng.randint(3, 5))
        ans = words[0] if first else words[-1]
        return {"prompt": PICK_PROMPT + " ".join(words), "response": ans, "answer": ans}

    return gen


GENERATORS: Dict[str, Tuple[Callable[[random.Random], Example], str, str]] = {
    "math": (_math, "numeric", "reasoning"),
    "code": (_code, "exact", "reasoning"),
    "logic": (_logic, "exact", "reasoning"),
    "format": (_format, "exact", "instruction"),
    "pick_first": (_pick(True), "exact", "convention"),
    "pick_last": (_pick(False), "exact", "convention"),
}


def generate(name: str, n_train: int, n_test: int, seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """Disjoint train/test splits of task ``name`` (test drawn first, by prompt)."""
    if name not in GENERATORS:
        raise CpiftError(f"unknown built-in task {name!r}; choose from {', '.join(GENERATORS)}")
    gen = GENERATORS[name][0]
    rng = random.Random(f"{name}:{seed}")
    test: List[Example] = []
    seen = set()
    tries = 0
    while len(test) < n_test:
        ex = gen(rng)
        tries += 1
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            test.append(ex)
        if tries > 100 * (n_test + n_train) + 1000:
            raise CpiftError(f"task {name}: cannot draw {n_test} distinct test examples")
    train: List[Example] = []
    train_seen = set()
    while len(train) < n_train:
        ex = gen(rng)
        tries += 1
        if ex["prompt"] not in seen and ex["prompt"] not in train_seen:
            train_seen.add(ex["prompt"])
            train.append(ex)
        if tries > 100 * (n_test + n_train) + 1000:
            raise CpiftError(f"task {name}: cannot draw {n_train} train examples disjoint from the test split")
    return train, test


def check(metric: str, output: str, answer: str) -> bool:
    """Exact checkers: ``exact`` (whitespace/case-normalised), ``numeric`` (last number
    in the output), ``choice`` (the first standalone option letter)."""
    if metric == "exact":
        norm = lambda s: " ".join(s.strip().lower().split())  # noqa: E731
        return norm(output) == norm(answer)
    if metric == "numeric":
        nums = re.findall(r"-?\d+(?:\.\d+)?", output.replace(",", ""))
        return bool(nums) and float(nums[-1]) == float(answer)
    if metric == "choice":
        m = re.search(r"\b([A-Z])\b", output.strip())
        return m is not None and m.group(1) == answer.strip().upper()
    raise CpiftError(f"unknown metric {metric!r}; use exact, numeric or choice")


def export(
    out: str, n_train: int = 200, n_test: int = 50, seed: int = 0, overwrite: bool = False
) -> Dict[str, Dict[str, str]]:
    """Write every built-in task as ``OUT/NAME/train.jsonl`` and ``test.jsonl``, all or
    nothing. ``out`` may be a missing or empty folder; another is replaced only with
    ``overwrite``."""
    from cpift_merge.storage.files import atomic_dir

    out = os.path.abspath(out)
    empty = os.path.isdir(out) and not os.listdir(out)
    written = {}
    with atomic_dir(out, overwrite=overwrite or empty) as tmp:
        for name, (_gen, metric, domain) in GENERATORS.items():
            train, test = generate(name, n_train, n_test, seed)
            os.makedirs(os.path.join(tmp, name))
            for split, rows in (("train", train), ("test", test)):
                with open(os.path.join(tmp, name, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
                    for r in rows:
                        fh.write(json.dumps(r) + "\n")
            folder = os.path.join(out, name)
            written[name] = {
                "metric": metric,
                "domain": domain,
                "train": os.path.join(folder, "train.jsonl"),
                "test": os.path.join(folder, "test.jsonl"),
            }
    return written
