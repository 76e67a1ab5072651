"""Built-in task generators and their exact checkers."""

import json
import os

import pytest
from click.testing import CliRunner

from cpift_merge.cli import main
from cpift_merge.errors import CpiftError
from cpift_merge.evaluation.tasks import GENERATORS, check, generate
from cpift_merge.training.data import load_examples


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generators_are_seeded_disjoint_and_checkable(name):
    train, test = generate(name, 150, 40, seed=1)
    assert (train, test) == generate(name, 150, 40, seed=1)
    assert generate(name, 150, 40, seed=2)[1] != test
    assert len(train) == 150 and len(test) == 40
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert len({e["prompt"] for e in train}) == 150
    metric = GENERATORS[name][1]
    for ex in train + test:
        assert check(metric, ex["response"], ex["answer"])  # the reference passes
    wrong = "Z" if metric == "choice" else "99999 nothing"
    assert not any(check(metric, wrong, ex["answer"]) for ex in test)


def test_math_and_code_answers_are_right():
    for ex in generate("code", 0, 30, seed=0)[1]:
        src = ex["prompt"].split("\n", 1)[1]
        out = []
        exec(src, {"print": lambda *a, out=out: out.append(" ".join(map(str, a)))})  # our own snippets
        assert out[-1] == ex["answer"]


def test_logic_answers_follow_from_the_facts():
    import re

    for ex in generate("logic", 0, 40, seed=0)[1]:
        pairs = re.findall(r"(\w+) is taller than (\w+)\.", ex["prompt"])
        taller, shorter = {a for a, _ in pairs}, {b for _, b in pairs}
        want = (taller - shorter) if "tallest" in ex["prompt"] else (shorter - taller)
        assert len(pairs) == 2 and want == {ex["answer"]} and GENERATORS["logic"][1] == "exact"


def test_the_pick_pair_conflicts_by_construction():
    """Same prompts, opposite answers: no single answer serves both tasks."""
    import random

    first, last = GENERATORS["pick_first"][0], GENERATORS["pick_last"][0]
    for i in range(50):
        a, b = first(random.Random(i)), last(random.Random(i))
        assert a["prompt"] == b["prompt"] and a["answer"] != b["answer"]
        words = a["prompt"].split(": ", 1)[1].split()
        assert (a["answer"], b["answer"]) == (words[0], words[-1])


def test_checkers_on_hand_made_outputs():
    assert check("exact", "  Hello   World ", "hello world")
    assert not check("exact", "hello world!", "hello world")
    assert check("numeric", "so 3 + 4 = 7", "7") and check("numeric", "The answer is 1,200.", "1200")
    assert not check("numeric", "7 apples, then 8", "7") and not check("numeric", "none", "7")
    assert check("choice", "B. Ada", "B") and check("choice", "B", "b")
    assert not check("choice", "The answer is C", "B") and not check("choice", "", "B")
    with pytest.raises(CpiftError):
        check("bleu", "a", "a")
    with pytest.raises(CpiftError):
        generate("poetry", 1, 1)


def test_export_writes_user_format(tmp_path):
    res = CliRunner().invoke(main, ["tasks", "export", str(tmp_path), "--train", "20", "--test", "5"])
    assert res.exit_code == 0, res.output
    for name in GENERATORS:
        rows = load_examples(os.path.join(tmp_path, name, "train.jsonl"))
        assert len(rows) == 20 and set(rows[0]) == {"prompt", "response"}
        with open(os.path.join(tmp_path, name, "test.jsonl")) as fh:
            assert len([json.loads(line) for line in fh]) == 5
    bad = CliRunner().invoke(main, ["tasks", "export", str(tmp_path), "--test", "0"])
    assert bad.exit_code == 2 and "at least 1" in bad.output


def test_export_is_all_or_nothing_and_asks_before_replacing(tmp_path, monkeypatch):
    from cpift_merge.evaluation import tasks

    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["tasks", "export", str(out), "--train", "3", "--test", "2"])
    assert res.exit_code == 2 and "already exists" in res.output and "--overwrite" in res.output
    assert os.listdir(out) == ["mine.txt"]
    real = tasks.generate

    def fail_on_logic(name, *a, **k):
        if name == "logic":
            raise RuntimeError("disk full")
        return real(name, *a, **k)

    monkeypatch.setattr(tasks, "generate", fail_on_logic)
    with pytest.raises(RuntimeError):
        tasks.export(str(tmp_path / "fresh"), 3, 2)
    assert os.listdir(tmp_path) == ["data"]  # no half export, no temporary left
    monkeypatch.setattr(tasks, "generate", real)
    res = CliRunner().invoke(main, ["tasks", "export", str(out), "--train", "3", "--test", "2", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == sorted(GENERATORS)
