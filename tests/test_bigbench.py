"""BIG-bench JSON tasks: the importer, multiple acceptable answers, the pipeline key."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from click.testing import CliRunner

from cpift_merge.cli import main
from cpift_merge.errors import CpiftError
from cpift_merge.evaluation.bigbench import import_bigbench, read_task, split
from cpift_merge.evaluation.scoring import is_correct, metric_fn

GEN = {
    "name": "tiny_arith",
    "metrics": ["exact_str_match"],
    "task_prefix": "Compute. ",
    "examples": [{"input": f"{i} + 1 =", "target": [str(i + 1), f"{i + 1}.0"]} for i in range(10)]
    + [{"input": "0 + 1 =", "target": "1"}],  # a duplicate prompt: it must stay on one side
}
MC = {
    "name": "tiny_mc",
    "metrics": ["multiple_choice_grade"],
    "examples": [
        {"input": "Sky colour?", "target_scores": {"green": 0, "blue": 1, "red": 0}},
        {"input": "Grass colour?", "target_scores": {"green": 1, "blue": 0}},
        {"input": "Snow colour?", "target_scores": {"black": 0.2, "white": 0.9, "grey": 0.5}},
    ],
}


def task_file(tmp_path, doc, name="t") -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "task.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(folder / "task.json")


def test_generative_task_prefix_and_every_target(tmp_path):
    task = read_task(os.path.dirname(task_file(tmp_path, GEN)))  # the folder works too
    assert task.metric == "exact" and task.name == "tiny_arith" and len(task.examples) == 11
    ex = task.examples[3]
    assert ex == {"prompt": "Compute. 3 + 1 =", "response": "4", "answer": "4", "answers": ["4", "4.0"]}


def test_multiple_choice_letters_choices_and_best_score(tmp_path):
    task = read_task(task_file(tmp_path, MC))
    assert task.metric == "choice"
    sky, grass, snow = task.examples
    assert sky["prompt"] == "Sky colour?\nA. green\nB. blue\nC. red\nAnswer with the letter."
    assert (sky["answer"], grass["answer"], snow["answer"]) == ("B", "A", "B")
    assert sky["choices"] == ["green", "blue", "red"] and sky["response"] == "B"


def test_split_is_disjoint_complete_seeded_and_keeps_duplicates_together(tmp_path):
    task = read_task(task_file(tmp_path, GEN))
    train, test = split(task, 0.3, seed=1)
    assert len(train) + len(test) == len(task.examples) and train and test
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert (train, test) == split(task, 0.3, seed=1)
    assert any(split(task, 0.3, seed=s)[1] != test for s in range(2, 6))
    dup = [e for e in train + test if e["prompt"] == "Compute. 0 + 1 ="]
    assert len(dup) == 2 and (dup[0] in train) == (dup[1] in train)


def test_import_writes_files_and_task_yml_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    info = import_bigbench(task_file(tmp_path, MC), str(out), test_fraction=0.34, seed=0)
    meta = yaml.safe_load((out / "task.yml").read_text())
    assert meta["metric"] == "choice" and meta["name"] == "tiny_mc" and meta["bigbench_metrics"] == MC["metrics"]
    rows = [json.loads(x) for f in ("train", "test") for x in (out / f"{f}.jsonl").read_text().splitlines()]
    assert len(rows) == 3 == meta["n_train"] + meta["n_test"] and info["test"] == str(out / "test.jsonl")
    with pytest.raises(CpiftError, match="already exists"):
        import_bigbench(task_file(tmp_path, GEN, "g"), str(out))
    assert yaml.safe_load((out / "task.yml").read_text())["name"] == "tiny_mc"  # left as it was


@pytest.mark.parametrize(
    "doc, expected",
    [
        ("{not json", "is not JSON"),
        ({"name": "x"}, "no examples list"),
        ({"examples": []}, "has no examples"),
        ({"examples": [{"target": "a"}, {"input": "b", "target": "b"}]}, "example 0 has no input"),
        ({"examples": [{"input": "a"}]}, "neither target nor target_scores"),
        ({"examples": [{"input": "a", "target": "a"}, MC["examples"][0]]}, "mixes generative"),
        ({"examples": [{"input": "a", "target": ""}]}, "target must be a non-empty string"),
        ({"examples": [{"input": "a", "target_scores": {"x": 1, "y": 1}}]}, "same score"),
        ({"examples": [{"input": "a", "target": "a"}], "metrics": ["bleu"]}, "scored by bleu"),
        ({"examples": [{"input": "a", "target": "a"}]}, "1 distinct prompt"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, doc, expected):
    r = CliRunner().invoke(main, ["tasks", "import-bigbench", task_file(tmp_path, doc), str(tmp_path / "out")])
    assert r.exit_code == 2 and expected in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_cli_and_folders_without_task_json(tmp_path):
    r = CliRunner().invoke(main, ["tasks", "import-bigbench", task_file(tmp_path, GEN), str(tmp_path / "o")])
    assert r.exit_code == 0 and "tiny_arith" in r.output, r.output
    assert sorted(os.listdir(tmp_path / "o")) == ["task.yml", "test.jsonl", "train.jsonl"]
    prog = tmp_path / "programmatic"
    (prog / "sub1").mkdir(parents=True)
    (prog / "sub1" / "task.json").write_text(json.dumps(GEN))
    (prog / "task.py").write_text("# a programmatic task\n")
    r = CliRunner().invoke(main, ["tasks", "import-bigbench", str(prog), str(tmp_path / "p")])
    assert r.exit_code == 2 and "programmatic task" in r.output and "sub1" in r.output
    r = CliRunner().invoke(main, ["tasks", "import-bigbench", str(tmp_path / "none.json"), str(tmp_path / "p")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["tasks", "import-bigbench", task_file(tmp_path, MC, "m"), str(tmp_path / "p"),
                                  "--test-fraction", "1.5"])  # fmt: skip
    assert r.exit_code == 2 and "between 0 and 1" in r.output and not os.path.exists(tmp_path / "p")


def test_any_listed_answer_counts():
    exact = metric_fn("exact")
    assert is_correct(exact, "4.0", {"answers": ["4", "4.0"]}, "4")
    assert not is_correct(exact, "5", {"answers": ["4", "4.0"]}, "4")
    assert is_correct(exact, "4", {"answer": "4"}, "4") and not is_correct(exact, "4.0", {"answer": "4"}, "4")


def test_pipeline_bigbench_task(tiny_lm, tmp_path):
    from cpift_merge.pipeline.config import load_pipeline
    from cpift_merge.pipeline.run import run_pipeline

    gen = task_file(tmp_path, {**GEN, "task_prefix": ""}, "gen")
    mc = task_file(tmp_path, MC, "mc")
    doc = {
        "base": tiny_lm,
        "out": str(tmp_path / "run"),
        "tasks": [{"name": "arith", "bigbench": gen}, {"name": "mc", "bigbench": mc, "test_fraction": 0.34}],
        "train": {"batch_size": 4, "max_length": 48, "save_steps": 5},
        "stage": {"steps": 1},
        "methods": ["full_sft"],
        "eval": {"max_new_tokens": 2},
    }
    (tmp_path / "p.yml").write_text(yaml.safe_dump(doc))
    pipe = load_pipeline(str(tmp_path / "p.yml"))
    assert [(t.metric, t.domain) for t in pipe.tasks] == [("exact", "bigbench"), ("choice", "bigbench")]
    res = run_pipeline(pipe, quiet=True)
    train, test = split(read_task(gen), 0.2, 0)
    assert res["methods"]["full_sft"]["scores"]["arith"]["n"] == len(test)
    lines = (tmp_path / "run" / "data" / "arith" / "train.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == train and res["tasks"]["mc"]["bigbench"] == mc
    for change, expected in (
        ({"name": "a", "bigbench": gen, "builtin": "math"}, "give one of builtin, bigbench"),
        ({"name": "a", "builtin": "math", "test_fraction": 0.5}, "test_fraction splits a bigbench task"),
        ({"name": "a", "bigbench": str(tmp_path / "missing.json")}, "task a: bigbench:"),
    ):
        (tmp_path / "bad.yml").write_text(yaml.safe_dump({**doc, "tasks": [change]}))
        with pytest.raises(CpiftError, match=expected):
            load_pipeline(str(tmp_path / "bad.yml"))
