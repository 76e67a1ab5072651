"""`cpift run`: the pipeline end to end on a tiny random Llama, resume, validation."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tiny_config, tiny_tokenizer
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from cpift_merge.cli import main
from cpift_merge.errors import CpiftError
from cpift_merge.pipeline.config import METHODS, load_pipeline
from cpift_merge.pipeline.report import GAP_LABEL, table1_rows, table2_rows
from cpift_merge.pipeline.run import normalized_average, run_pipeline
from cpift_merge.storage.regions import load_regions

ALL = list(METHODS)


def echo_metric(output: str, answer: str) -> bool:
    """A user's own metric, loaded by the pipeline as py:test_pipeline.echo_metric."""
    return answer in output


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    """A tiny random Llama with room for the built-in tasks' prompts (char-level tokens)."""
    path = str(tmp_path_factory.mktemp("pipe") / "base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(max_position_embeddings=512)).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def spec(lm: str, out: str, **over) -> dict:
    doc = {
        "base": lm,
        "out": out,
        "tasks": [
            {"name": "math", "builtin": "math"},
            {"name": "code", "builtin": "code"},
            {"name": "logic", "builtin": "logic"},
        ],
        "builtin_data": {"n_train": 12, "n_test": 3},
        "train": {"batch_size": 4, "max_length": 256, "lr": 1e-3, "save_steps": 2, "weight_decay": 0.1},
        "probe": {"steps": 2},
        "stage": {"epochs": 1},
        "calibration": {"sample": 4},
        "regions": {"density": 0.05},
        "methods": ALL,
        "sequential": {"pair": ["math", "code"], "transplant": True},
        "eval": {"max_new_tokens": 3, "intermediate": True},
    }
    doc.update(over)
    return doc


def write(tmp_path, doc: dict, name: str = "pipe.yml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(scope="module")
def full_run(lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    pipe = load_pipeline(write(tmp, spec(lm, str(tmp / "out"))))
    return run_pipeline(pipe, quiet=True), str(tmp / "out")


def test_every_method_and_artifact(full_run):
    results, out = full_run
    tasks = ["math", "code", "logic"]
    # results.json: a row per method (and the base), a score and n per task
    on_disk = json.load(open(os.path.join(out, "results.json")))
    assert on_disk["methods"].keys() == results["methods"].keys()
    expected = ["base", *[m for m in ALL if m not in ("sequential", "graft")]]  # those two have their own tables
    expected.insert(expected.index("cpift"), "cpift_merged")  # eval.intermediate
    assert list(results["methods"]) == expected
    for m, rec in results["methods"].items():
        assert set(rec["scores"]) == set(tasks)
        for t in tasks:
            assert rec["scores"][t]["n"] == 3 and 0.0 <= rec["scores"][t]["score"] <= 100.0
        assert rec["avg_normalized"] == normalized_average(rec["scores"])
        for path in rec.get("paths", {"": rec["path"]}).values():  # the experts: one model per task
            assert os.path.isfile(os.path.join(path, "config.json")), m
    # shared work: probes and regions, groups covering every task once
    for t in tasks:
        assert os.path.isfile(os.path.join(out, "probes", t, "model.safetensors"))
        assert os.path.isfile(os.path.join(out, "data", t, "test.jsonl"))
    rs = load_regions(os.path.join(out, "regions"))
    assert sorted(rs.tasks) == sorted(tasks)
    assert sorted(t for g in results["groups"] for t in g) == sorted(tasks)
    assert results["methods"]["dpi"]["groups"] == results["groups"]
    assert len(results["methods"]["multistage_random"]["groups"]) == 3
    # heuristic groups by domain: math, code and logic are all "reasoning"
    assert results["methods"]["multistage_heuristic"]["groups"] == [tasks]
    assert results["methods"]["full_sft"]["groups"] == [tasks]
    # intermediate stages keep their records but not their weights; final models stay whole
    dpi = os.path.join(out, "methods", "dpi")
    for k in range(1, len(results["groups"]) + 1):
        stage = os.path.join(dpi, f"stage-{k}")
        assert os.path.isfile(os.path.join(stage, "stage.json"))
        last = stage == results["methods"]["dpi"]["path"]
        assert os.path.isfile(os.path.join(stage, "model.safetensors")) == last
    # the cpift backbone is the DPI model; calibration trained every group on 4 examples per task
    recipe = yaml.safe_load(open(os.path.join(out, "recipes", "cpift_merged.yml")))
    assert recipe["merge_method"] == "cpi" and recipe["base_model"] == results["methods"]["dpi"]["path"]
    cal = json.load(open(os.path.join(out, "methods", "cpift", "train.json")))
    assert cal["sample"] == 4 and cal["groups"] == results["groups"]
    # forgetting: both directions, with and without freezing
    fg = results["forgetting"]
    assert set(fg) == {"math->code", "code->math"}
    for d in fg.values():
        assert set(d) == {"plain", "frozen", "plain_transplant"}
        for rec in d.values():
            assert {"delta_first", "delta_second", "delta_first_loss", "delta_second_loss"} <= set(rec)
    # sequential.transplant: A's core copied back changes A's held-out loss from the A->B model's
    plain = fg["math->code"]["plain"]["delta_first_loss"]
    assert fg["math->code"]["plain_transplant"]["delta_first_loss"] != plain
    assert not os.path.exists(os.path.join(out, "methods", "sequential", "math-code-transplant"))  # scored, removed
    frozen_stage = json.load(open(os.path.join(out, "methods", "sequential", "math-code-frozen", "stage.json")))
    assert frozen_stage["frozen_entries"] == rs.k("math") and frozen_stage["frozen_bit_identical"] is True
    # report: Table 1 has a row per method, Table 2 two rows; plots exist
    report = open(os.path.join(out, "report.md")).read()
    assert "Table 1" in report and "Table 2" in report
    h, rows = table1_rows(results)
    assert h[-1].startswith("avg") and len(rows) == len(expected) + 1  # and the seesaw gap row
    h2, rows2 = table2_rows(results)
    assert len(rows2) == 3 and len(h2) == 9
    for png in ("scores.png", "jaccard.png", "core_share_by_layer.png"):
        assert os.path.getsize(os.path.join(out, "plots", png)) > 0


def test_experts_seesaw_gap_and_matched_full_sft(full_run):
    """`expert`: one SFT per task from theta_0 with the stage budget, scored on every task;
    the seesaw gap is expert minus full SFT; `full_sft_matched` trains all tasks together
    for as many examples as CPI-FT's DPI stages and calibration saw."""
    results, out = full_run
    tasks = ["math", "code", "logic"]
    ex = results["experts"]
    assert ex["same_as_probes"] is False  # probe: 2 steps, stage: 1 epoch
    assert list(ex["scores"]) == tasks and all(list(row) == tasks for row in ex["scores"].values())
    own = results["methods"]["expert"]["scores"]
    for t in tasks:
        assert own[t]["score"] == ex["scores"][t][t]
        path = results["methods"]["expert"]["paths"][t]
        assert path == os.path.join(out, "methods", "expert", t)
        stage = json.load(open(os.path.join(path, "stage.json")))
        assert stage["tasks"] == [t] and stage["steps"] == 3  # 12 examples, batch 4, one epoch
        full = results["methods"]["full_sft"]["scores"][t]["score"]
        assert results["seesaw_gap"][t] == own[t]["score"] - full
    seen = 0
    for key in ("dpi", "cpift"):
        for st in json.load(open(os.path.join(out, "methods", key, "train.json")))["stages"]:
            seen += st["steps"] * 4  # batch 4 in every budget
    matched = results["full_sft_matched"]
    assert matched["cpift_examples"] == seen and matched["examples"] == seen and matched["steps"] == seen // 4
    rec = json.load(open(os.path.join(out, "methods", "full_sft_matched", "train.json")))
    assert rec["groups"] == [tasks] and [st["steps"] for st in rec["stages"]] == [matched["steps"]]
    h, rows = table1_rows(results)
    gap = rows[-1]
    assert gap[0] == GAP_LABEL and gap[1:4] == [f"{results['seesaw_gap'][t]:+.1f}" for t in tasks]
    report = open(os.path.join(out, "report.md")).read()
    assert "## Table 4: single-task experts" in report and "CPI-FT's step count" in report


def test_experts_are_the_probes_when_the_budgets_match(lm, tmp_path):
    doc = spec(lm, str(tmp_path / "out"), methods=["expert"], probe={"steps": 2}, stage={"steps": 2})
    doc["tasks"] = doc["tasks"][:2]
    res = run_pipeline(load_pipeline(write(tmp_path, doc)), quiet=True)
    assert res["experts"]["same_as_probes"] is True
    assert res["methods"]["expert"]["paths"] == {t: str(tmp_path / "out" / "probes" / t) for t in ("math", "code")}
    assert not os.path.exists(tmp_path / "out" / "methods" / "expert")
    assert res["seesaw_gap"] is None  # no full_sft to compare with
    with pytest.raises(CpiftError, match="full_sft_matched matches CPI-FT's training steps: list cpift"):
        load_pipeline(write(tmp_path, {**doc, "methods": ["full_sft_matched", "dpi"]}, "m.yml"))


def test_localize_stitch_keeps_theta0_outside_the_cores(full_run, lm):
    results, out = full_run
    rs = load_regions(os.path.join(out, "regions"))
    base = load_file(os.path.join(lm, "model.safetensors"))
    merged = load_file(os.path.join(results["methods"]["localize_stitch"]["path"], "model.safetensors"))
    probes = {t: load_file(os.path.join(out, "probes", t, "model.safetensors")) for t in rs.tasks}
    changed = 0
    for name in rs.tensor_names:
        union = torch.zeros_like(base[name], dtype=torch.bool)
        for t in rs.tasks:
            union |= rs.mask(t, name)
        assert torch.equal(merged[name][~union], base[name][~union]), name
        only = {
            t: rs.mask(t, name) & ~torch.stack([rs.mask(u, name) for u in rs.tasks if u != t]).any(0) for t in rs.tasks
        }
        for t, m in only.items():  # entries in one core carry that probe's value
            assert torch.equal(merged[name][m], probes[t][name][m])
            changed += int(m.sum())
    assert changed > 0


def test_rerun_reuses_and_redoes_only_what_changed(lm, tmp_path, capsys):
    out = str(tmp_path / "out")
    doc = spec(lm, out, methods=["dpi", "full_sft"])
    run_pipeline(load_pipeline(write(tmp_path, doc)))
    probe_file = os.path.join(out, "probes", "math", "model.safetensors")
    full_file = os.path.join(out, "methods", "full_sft", "stage-1", "model.safetensors")
    stamps = {p: os.stat(p).st_mtime_ns for p in (probe_file, full_file)}
    capsys.readouterr()
    # same file again, after moving OUT: everything reused, paths follow the move
    moved = str(tmp_path / "moved")
    os.rename(out, moved)
    doc["out"] = moved
    res = run_pipeline(load_pipeline(write(tmp_path, doc)))
    text = capsys.readouterr().out
    assert "[probe/math] done earlier, reused" in text and "[train/dpi] done earlier, reused" in text
    assert "finished in" not in text
    assert res["methods"]["dpi"]["path"].startswith(moved + os.sep)
    os.rename(moved, out)
    doc["out"] = out
    # a stage setting changes: probes and regions reused, both staged runs redone
    doc["stage"] = {"epochs": 1, "lr": 5e-4}
    res = run_pipeline(load_pipeline(write(tmp_path, doc)))
    text = capsys.readouterr().out
    assert "[probe/math] done earlier, reused" in text and "[regions] done earlier, reused" in text
    assert "[train/dpi] inputs changed: redoing it" in text
    assert os.stat(probe_file).st_mtime_ns == stamps[probe_file]
    assert os.stat(full_file).st_mtime_ns != stamps[full_file]
    assert res["settings"]["stage"]["lr"] == 5e-4
    # weights deleted to free disk (a probe's, a staged run's final model): those steps are
    # redone, the same bits, and the steps after them, whose inputs did not change, reused
    before = load_file(probe_file)
    os.remove(probe_file)
    os.remove(os.path.join(res["methods"]["dpi"]["path"], "model.safetensors"))
    run_pipeline(load_pipeline(write(tmp_path, doc)))
    text = capsys.readouterr().out
    for step in ("probe/math", "train/dpi"):
        assert f"[{step}] its outputs are gone (model weights deleted?): redoing it" in text
    assert "[regions] done earlier, reused" in text and "[train/full_sft] done earlier, reused" in text
    after = load_file(probe_file)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_interrupted_run_continues(lm, tmp_path, monkeypatch):
    from cpift_merge.pipeline import run as pipeline

    out = str(tmp_path / "out")
    path = write(tmp_path, spec(lm, out, methods=["cpift", "full_sft"]))
    real = pipeline.Run.staged
    calls = []

    def boom(self, key, *args, **kwargs):  # interrupt when the calibration starts
        calls.append(key)
        if key == "cpift":
            raise KeyboardInterrupt
        return real(self, key, *args, **kwargs)

    monkeypatch.setattr(pipeline.Run, "staged", boom)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline(path), quiet=True)
    assert calls == ["dpi", "cpift"]
    assert not os.path.exists(os.path.join(out, "results.json"))
    merged = os.path.join(out, "methods", "cpift_merged", "model.safetensors")
    stamp = os.stat(merged).st_mtime_ns
    monkeypatch.setattr(pipeline.Run, "staged", real)
    res = run_pipeline(load_pipeline(path), quiet=True)
    assert os.stat(merged).st_mtime_ns == stamp  # the merge done before the interruption is reused
    assert set(res["methods"]) == {"base", "cpift_merged", "cpift", "full_sft"}
    assert res["timings"]["merge/cpift_merged"] > 0


def test_user_task_files_and_custom_metric(lm, tmp_path):
    rows = [{"prompt": f"say {w}", "response": w} for w in ("a", "b", "c", "d", "e", "f")]
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    doc = spec(
        lm,
        str(tmp_path / "out"),
        methods=["full_sft"],
        tasks=[
            {"name": "echo", "train": "train.jsonl", "test": "test.jsonl", "metric": "py:test_pipeline.echo_metric"},
            {"name": "math", "builtin": "math"},
        ],
    )
    res = run_pipeline(load_pipeline(write(tmp_path, doc)), quiet=True)
    assert res["methods"]["full_sft"]["scores"]["echo"]["n"] == 2
    assert res["tasks"]["echo"]["train"] == str(train)


def _cli_error(tmp_path, doc, *args) -> str:
    path = write(tmp_path, doc) if isinstance(doc, dict) else doc
    result = CliRunner().invoke(main, ["run", path, *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"regoins": {}}, "unknown key 'regoins' in (top level)"),
        ({"regions": {"density": 0.01, "tua": 0.1}}, "unknown key 'tua' in regions"),
        ({"regions": {"density": 0.0}}, "regions.density"),
        ({"regions": {"tau": 1.5}}, "regions.tau"),
        ({"merge": {"omega": 2}}, "merge.omega"),
        ({"methods": ["cpift", "magic"]}, "methods.1"),
        ({"methods": ["dpi", "dpi"]}, "listed twice"),
        ({"methods": ["sequential"], "sequential": None}, "needs sequential"),
        ({"sequential": {"pair": ["math", "nope"]}}, "two different tasks"),
        ({"tasks": [{"name": "a", "builtin": "math"}, {"name": "a", "builtin": "code"}]}, "duplicate task name 'a'"),
        ({"tasks": [{"name": "a", "builtin": "poetry"}]}, "unknown builtin 'poetry'"),
        ({"tasks": [{"name": "a", "train": "x.jsonl"}]}, "tasks.a"),
        ({"tasks": [{"name": "a", "builtin": "math", "metric": "fuzzy"}]}, "unknown metric 'fuzzy'"),
        (
            {"tasks": [{"name": "a", "train": "missing.jsonl", "test": "missing.jsonl", "metric": "exact"}]},
            "does not exist",
        ),
        ({"tasks": [{"name": "a b", "builtin": "math"}]}, "task name 'a b'"),
        ({"probe": {"steps": 0}}, "probe.steps"),
        ({"probe": {"steps": True}}, "probe.steps: Input should be a valid integer"),
        ({"train": {"lr": float("nan")}}, "train.lr: Input should be a finite number"),
        ({"calibration": {"epochs": float("inf")}}, "calibration.epochs: Input should be a finite number"),
        ({"baselines": {"task_arithmetic": {"weight": float("nan")}}}, "baselines.task_arithmetic.weight"),
        ({"merge": {"epsilon": float("inf")}}, "merge.epsilon"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"stage": {"scheduler": "sideways"}}, "unknown scheduler 'sideways'"),
        ({"regions": {"exclude": ["lm_head(["]}}, "regions.exclude: 'lm_head([' is not a regular expression"),
        ({"base": "no/such/model"}, "is not a model folder"),
        ({"stage": {"replay": 13}}, "stage.replay 13 is larger than task math's 12 training examples"),
        ({"stage": {"update": "cores"}}, "stage.update"),
        ({"regions": {"score": "magnitude"}}, "regions.score"),
    ],
)
def test_malformed_pipeline_is_one_line_error(lm, tmp_path, change, expected):
    doc = spec(lm, str(tmp_path / "out"))
    if "tasks" in change:  # the sequential pair names the default tasks
        doc["methods"] = ["full_sft"]
    doc.update(change)
    line = _cli_error(tmp_path, doc)
    assert expected in line, line
    assert not os.path.exists(tmp_path / "out")


def test_pipeline_file_errors(tmp_path):
    assert "cannot read pipeline" in _cli_error(tmp_path, str(tmp_path / "none.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("base: [unclosed\n")
    assert "not valid YAML" in _cli_error(tmp_path, str(bad))
    bad.write_text("- a list\n")
    assert "must be a YAML mapping" in _cli_error(tmp_path, str(bad))
    bad.write_text("tasks: [{name: a, builtin: math}]\n")
    assert "missing key base" in _cli_error(tmp_path, str(bad))


def test_cli_overrides_and_shipped_pipelines(lm, tmp_path):
    pipe = load_pipeline(write(tmp_path, spec(lm, "x")), {"out": str(tmp_path / "o"), "methods": ["dpi"], "seed": 3})
    assert pipe.out == str(tmp_path / "o") and pipe.methods == ["dpi"] and pipe.seed == 3
    default = load_pipeline()  # the embedded default
    assert default.base == "smollm2" and {"cpift", "dpi", "full_sft"} <= set(default.methods)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = load_pipeline(os.path.join(repo, "merge_configs", "pipeline_full.yml"))
    assert set(full.methods) == set(METHODS)


def test_set_overrides_dotted_keys(lm, tmp_path):
    """`cpift run --set KEY=VALUE` sweeps a setting without copying the file."""
    path = write(tmp_path, spec(lm, "x"))
    sets = ["merge.omega=0.25", "probe.optimizer=sgd", "regions={density: 0.02, tau: 0.3}", "seed=4"]
    pipe = load_pipeline(path, {"out": str(tmp_path / "o")}, sets)
    assert pipe.merge.omega == 0.25 and pipe.probe.optimizer == "sgd" and pipe.seed == 4
    assert (pipe.regions.density, pipe.regions.tau) == (0.02, 0.3) and pipe.probe.steps == 2  # its siblings stay
    assert load_pipeline(path, None, ["probe.steps=3"]).probe.steps == 3
    for item, expected in [
        ("merge.omega", "expected KEY=VALUE"),
        ("merge..omega=1", "expected KEY=VALUE"),
        ("merge.omega=[1", "VALUE is not valid YAML"),
        ("methods.x=1", "methods is not a mapping"),
        ("merge.omgea=0.3", "unknown key 'omgea' in merge"),
        ("merge.omega=2", "merge.omega"),
    ]:
        line = _cli_error(tmp_path, path, "--set", item, "--out", str(tmp_path / "e"))
        assert expected in line, line
    assert not os.path.exists(tmp_path / "e")


def test_fisher_score_in_the_pipeline(lm, tmp_path):
    """regions.score fisher: a Fisher step per probe, then regions cut by Δ²·F; the
    default score leaves the regions' fingerprint as it was before the option."""
    from cpift_merge.pipeline.config import RegionSpec

    assert "score" not in RegionSpec().identity() and RegionSpec(score="relative").identity()["score"] == "relative"
    doc = spec(lm, str(tmp_path / "o"), methods=["dpi"], regions={"density": 0.05, "score": "fisher"})
    run_pipeline(load_pipeline(write(tmp_path, doc)), quiet=True)
    rs = load_regions(str(tmp_path / "o" / "regions"))
    assert rs.score == "fisher"
    for t in ("math", "code", "logic"):
        assert os.path.isfile(tmp_path / "o" / "probes" / t / "fisher" / "fisher.safetensors")
        marker = json.load(open(tmp_path / "o" / ".steps" / f"fisher__{t}.json"))
        assert marker["state"] == "done" and marker["result"] == 12  # n_train examples


def test_update_core_and_replay_in_the_pipeline(lm, tmp_path):
    """stage.update core and stage.replay reach DPI's stages; full SFT (one group, no
    regions) is unchanged by them; their defaults leave fingerprints as they were."""
    from cpift_merge.pipeline.config import Stage

    assert Stage().staging() == {} and Stage(update="core", replay=2).staging() == {"update": "core", "replay": 2}
    doc = spec(lm, str(tmp_path / "o"), methods=["dpi", "full_sft"], stage={"epochs": 1, "update": "core", "replay": 2},
               regions={"density": 0.05, "order": "given"})  # fmt: skip
    res = run_pipeline(load_pipeline(write(tmp_path, doc)), quiet=True)
    dpi = json.load(open(tmp_path / "o" / "methods" / "dpi" / "train.json"))
    assert dpi["update"] == "core" and dpi["replay"] == 2 and len(res["groups"]) > 1
    last = json.load(open(os.path.join(dpi["stages"][-1]["path"], "stage.json")))
    assert last["update"] == "core" and set(last["replayed"].values()) == {2}
    full = json.load(open(tmp_path / "o" / "methods" / "full_sft" / "train.json"))
    assert full["update"] == "all" and full["replay"] == 2 and len(full["stages"]) == 1


def test_sparse_probes_in_the_pipeline(lm, tmp_path):
    """probe.sparse: dense probes and their cores under probes-dense/ and regions-dense/,
    the probes every method uses differ from θ0 only inside those cores."""
    from safetensors.torch import load_file

    doc = spec(lm, str(tmp_path / "o"), methods=["dpi"], probe={"steps": 2, "sparse": True, "sparse_lr": 0.01})
    run_pipeline(load_pipeline(write(tmp_path, doc)), quiet=True)
    dense = load_regions(str(tmp_path / "o" / "regions-dense"))
    w0 = load_file(os.path.join(lm, "model.safetensors"))
    for t in ("math", "code", "logic"):
        w = load_file(str(tmp_path / "o" / "probes" / t / "model.safetensors"))
        for name in w0:
            core = dense.mask(t, name) if dense.has_tensor(name) else torch.zeros(w0[name].shape, dtype=torch.bool)
            assert torch.equal(w[name][~core], w0[name][~core]), name
        assert json.load(open(tmp_path / "o" / "probes" / t / "probe.json"))["config"]["lr"] == 0.01
        assert os.path.isfile(tmp_path / "o" / "probes-dense" / t / "model.safetensors")
    assert load_regions(str(tmp_path / "o" / "regions")).tasks == ["math", "code", "logic"]
    line = _cli_error(tmp_path, spec(lm, str(tmp_path / "e"), probe={"steps": 2, "sparse_lr": 0.1}))
    assert "sparse_lr and mask_epochs apply to sparse probes only" in line


def test_probe_optimizer_from_the_pipeline_file(lm, tmp_path):
    from cpift_merge.pipeline.config import train_config

    doc = spec(lm, str(tmp_path / "o"), probe={"steps": 2, "optimizer": "sgd", "momentum": 0.5, "lr": 0.1})
    pipe = load_pipeline(write(tmp_path, doc))
    probe, stage = train_config(pipe, pipe.probe), train_config(pipe, pipe.stage)
    assert (probe.optimizer, probe.momentum, probe.lr) == ("sgd", 0.5, 0.1) and stage.optimizer == "adamw"
    with pytest.raises(CpiftError, match="momentum applies to --optimizer sgd only"):
        load_pipeline(write(tmp_path, spec(lm, "o", stage={"momentum": 0.5}), "m.yml"))
    # an lr set for AdamW above does not carry over to a budget that switches to SGD without one
    doc = spec(lm, str(tmp_path / "o"), train={"lr": 2e-4}, probe={"steps": 2, "optimizer": "sgd"})
    pipe = load_pipeline(write(tmp_path, doc, "lr.yml"))
    assert train_config(pipe, pipe.probe).lr == 0.1 and train_config(pipe, pipe.stage).lr == 2e-4


def test_normalized_average_and_tables():
    scores = {"a": {"score": 50.0, "n": 2}, "b": {"score": 100.0, "n": 2}}
    assert normalized_average(scores) == 7.5
    results = {
        "tasks": {"a": {}, "b": {}},
        "methods": {"base": {"scores": scores, "avg_normalized": 7.5}},
        "forgetting": {
            "a->b": {
                v: {"first": "a", "second": "b", "delta_first": -3.0, "delta_second": 4.0} for v in ("plain", "frozen")
            }
        },
    }
    h, rows = table1_rows(results)
    assert rows == [["base model", "50.0", "100.0", "7.50"]]
    h2, rows2 = table2_rows(results)
    assert h2[1:] == ["a->b: Δa (forgetting)", "a->b: Δb (learning)"] and rows2[0][1:] == ["-3.0", "+4.0"]


def test_out_must_be_a_run_folder(lm, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = _cli_error(tmp_path, spec(lm, str(out)))
    assert "is not a cpift run folder" in line
    assert os.listdir(out) == ["notes.txt"]


def test_bad_values_caught_before_any_work(lm, tmp_path):
    with pytest.raises(CpiftError, match="multistage_k"):
        load_pipeline(write(tmp_path, spec(lm, str(tmp_path / "o"), baselines={"multistage_k": 5})))


def test_py_metrics_run_only_when_scoring_from_the_pipeline_folder(lm, tmp_path):
    """Validating a pipeline file imports no user code; the py: metric's module is found
    in the pipeline file's folder (no PYTHONPATH needed) when evaluation starts."""
    folder = tmp_path / "proj"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / "proj_metric_xyz.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef ok(output, answer):\n    return True\n"
    )
    rows = [{"prompt": f"say {w}", "response": w} for w in "abcd"]
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    task = {"name": "echo", "train": "d.jsonl", "test": "t.jsonl", "metric": "py:proj_metric_xyz.ok"}
    bad = spec(lm, str(tmp_path / "o1"), methods=["full_sft"], tasks=[task], merge={"omega": 3})
    with pytest.raises(CpiftError, match="merge.omega"):
        load_pipeline(write(folder, bad))
    pipe = load_pipeline(write(folder, spec(lm, str(tmp_path / "o2"), methods=["full_sft"], tasks=[task])))
    assert not marker.exists()
    with pytest.raises(CpiftError, match="must be py:module.function"):
        load_pipeline(write(folder, spec(lm, "x", methods=["full_sft"], tasks=[{**task, "metric": "py:nodot"}])))
    pipe.methods = []  # score the base model only
    pipe.eval.limit = 2
    res = run_pipeline(pipe, quiet=True)
    assert marker.exists() and res["methods"]["base"]["scores"]["echo"]["score"] == 100.0


def test_same_data_as_train_and_test_is_refused_and_dataset_splits_are_picked(lm, tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"say {w}", "response": w} for w in "abcdef"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    same = {"name": "echo", "train": "d.jsonl", "test": "d.jsonl", "metric": "exact"}
    line = _cli_error(tmp_path, spec(lm, str(tmp_path / "o"), methods=["full_sft"], tasks=[same]))
    assert "task echo: train and test are the same data" in line and "held-out" in line
    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(str(dd))
    split = {"name": "echo", "train": "dd", "test": "dd", "metric": "exact"}  # train split, test split
    pipe = load_pipeline(write(tmp_path, spec(lm, str(tmp_path / "o"), methods=["full_sft"], tasks=[split])))
    pipe.methods = []
    res = run_pipeline(pipe, quiet=True)
    assert res["methods"]["base"]["scores"]["echo"]["n"] == 2  # scored on test, not on train
    both = {**split, "test": "dd:train"}
    line = _cli_error(tmp_path, spec(lm, str(tmp_path / "o"), methods=["full_sft"], tasks=[both]))
    assert "same data" in line and "dd:train" in line


def test_graft_method_reports_the_kept_gain(full_run):
    """`graft` in the full run: for every task, theta_0, its probe and the four grafts,
    by held-out loss and metric, the kept shares by their formula, and Table 3."""
    from cpift_merge.pipeline.graft_test import kept_gain

    res, out = full_run
    graft = res["graft"]
    assert set(graft) == {"math", "code", "logic"}
    for task, rec in graft.items():
        assert set(rec) == {"base", "probe", "core-core", "core-random", "rest-core", "rest-random"}
        for key in ("core-core", "core-random", "rest-core", "rest-random"):
            row = rec[key]
            assert row["loss"] > 0 and 0 <= row["score"] <= 100
            assert {k: row[k] for k in ("kept_loss", "kept_score")} == kept_gain(row, rec["base"], rec["probe"])
            assert not os.path.exists(os.path.join(out, "methods", "graft", task, key))  # scored, then deleted
        assert rec["base"]["loss"] == json.load(open(os.path.join(out, "eval", f"loss_base_{task}.json")))["loss"]
    report = open(os.path.join(out, "report.md")).read()
    assert "## Table 3: graft test" in report and "core removed" in report


def test_kept_gain():
    from cpift_merge.pipeline.graft_test import kept_gain

    base, probe = {"loss": 3.0, "score": 10.0}, {"loss": 2.0, "score": 30.0}
    assert kept_gain({"loss": 2.5, "score": 20.0}, base, probe) == {"kept_loss": 0.5, "kept_score": 0.5}
    assert kept_gain({"loss": 2.0, "score": 30.0}, base, base) == {"kept_loss": None, "kept_score": None}


def test_run_outputs_carry_hub_model_cards(full_run):
    """The pipeline's models are publishable folders: a README.md with hub front matter
    (titled after the folder, tagged, base model named), the settings that made them and,
    for the merge, the core regions it used; tokenizer and generation config beside."""
    results, out = full_run

    def card(folder):
        text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
        assert text.startswith("---\n") and ".tmp-" not in text
        for f in ("tokenizer.json", "config.json", "generation_config.json"):
            assert os.path.isfile(os.path.join(folder, f)), (folder, f)
        return yaml.safe_load(text.split("---")[1]), text

    front, text = card(os.path.join(out, "methods", "cpift_merged"))
    assert "# cpift_merged\n" in text and {"cpift-merge", "cpi", "mergekit"} <= set(front["tags"])
    assert "## Core regions" in text and "density 0.05, scope global" in text
    final = results["methods"]["cpift"]["path"]
    front, text = card(final)
    assert front["library_name"] == "transformers" and "cpift-merge" in front["tags"]
    assert front["base_model"] and "Settings:" in text


def test_run_under_torchrun_trains_on_both_ranks_and_writes_once(lm, tmp_path):
    """`torchrun --nproc-per-node 2 -m cpift_merge run` (CPU, gloo): training steps run on
    both ranks, rank 0 alone writes step records, merges, evaluations and the report and
    prints; DPI's frozen cores stay bit-identical; a second launch reuses every step."""
    import subprocess
    import sys

    doc = spec(lm, str(tmp_path / "out"), methods=["cpift", "dpi", "full_sft"])
    doc["tasks"] = doc["tasks"][:2]
    doc["eval"] = {"max_new_tokens": 3}
    pipe = write(tmp_path, doc)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534",
           "-m", "cpift_merge", "run", pipe, "--device", "cpu"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    assert first.stdout.count("[probe/math] probe fine-tune") == 1  # rank 0 prints, once
    assert first.stdout.count("[regions] finished") == 1 and first.stdout.count("report: ") == 1
    results = json.load(open(out / "results.json"))
    assert set(results["methods"]) == {"base", "cpift", "dpi", "full_sft"}
    markers = [json.load(open(out / ".steps" / f)) for f in os.listdir(out / ".steps")]
    assert markers and all(m["state"] == "done" for m in markers)
    assert not [p for p in out.rglob("*") if p.name.endswith(".work") or ".tmp-" in p.name]
    train = json.load(open(out / "methods" / "dpi" / "train.json"))
    stage2 = json.load(open(os.path.join(train["stages"][1]["path"], "stage.json")))
    assert stage2["world_size"] == 2 and stage2["frozen_bit_identical"] is True and stage2["frozen_entries"] > 0
    log = open(os.path.join(train["stages"][1]["path"], "train_log.jsonl")).readlines()
    assert len(log) == stage2["steps"] + 1  # a line per step and the summary, written once (not once per rank)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "probe fine-tune" not in again.stdout and again.stdout.count("done earlier, reused") >= len(markers)
