"""The trainer half: FreezeCallback under HF Trainer and TRL, `cpift probe` (full and
LoRA), `cpift train` (stage plans, frozen cores, sampling, no redo, resume after a
kill) and its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from cpift_merge.cli import main
from cpift_merge.errors import CpiftError
from cpift_merge.training.data import Collator, encode_all, sample_balanced
from cpift_merge.training.finetune import FreezeCallback, TrainConfig, plan_groups

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAST = ["--batch-size", "4", "--lr", "1e-2", "--max-length", "64", "--quiet"]


# ------------------------------------------------------------------ helpers


def task_rows(kind: str, n: int = 16):
    rows = []
    for i in range(n):
        if kind == "a":
            rows.append({"prompt": f"add {i} {2 * i}", "response": f"{3 * i}"})
        elif kind == "b":
            rows.append({"prompt": f"rev {i}xy", "response": f"yx{str(i)[::-1]}"})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"up {i}q"},
                        {"role": "assistant", "content": f"{i}Q".upper()},
                    ]
                }
            )
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def cli(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def one_line_error(result, match):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def log_steps(path):
    with open(path, encoding="utf-8") as fh:
        return [r["step"] for r in map(json.loads, fh) if "loss" in r]


def random_masks(model, seed=1, density=0.3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}


def assert_frozen_and_trained(model, masks, before):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[masks[n]], before[n][masks[n]]), f"frozen entries of {n} moved"
    moved = sum(int((p.detach()[~masks[n]] != before[n][~masks[n]]).sum()) for n, p in model.named_parameters())
    assert moved > 0


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {k: write_jsonl(root / f"{k}.jsonl", task_rows(k)) for k in "abc"}


@pytest.fixture(scope="module")
def probes(tiny_lm, tasks, tmp_path_factory):
    """`cpift probe` on tasks a and b (it also writes OUT/regions at density 0.05)."""
    out = tmp_path_factory.mktemp("probes")
    cli(
        "probe",
        "--base",
        tiny_lm,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--out",
        out,
        "--steps",
        6,
        "--regions",
        0.05,
        *FAST,
    )
    return {"out": str(out), "a": str(out / "a"), "b": str(out / "b")}


@pytest.fixture(scope="module")
def regions(tiny_lm, probes, tmp_path_factory):
    from cpift_merge.storage.regions import compute_from_paths

    out = tmp_path_factory.mktemp("regions") / "r"
    return compute_from_paths(
        tiny_lm,
        {"a": probes["a"], "b": probes["b"]},
        str(out),
        density=0.05,
        order="given",
        given_order=["a", "b"],
        progress=False,
    )


@pytest.fixture(scope="module")
def staged(tiny_lm, tasks, regions, tmp_path_factory):
    """`cpift train --groups given:"a;b"` with the regions: stage 2 freezes a's core."""
    out = tmp_path_factory.mktemp("staged") / "run"
    args = [
        "train",
        "--base",
        tiny_lm,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--groups",
        "given:a;b",
        "--out",
        out,
        "--steps",
        4,
        "--weight-decay",
        0.1,
        *FAST,
    ]
    result = cli(*args)
    return {"out": str(out), "args": args, "output": result.output}


# ---------------------------------------------------- callbacks (HF and TRL)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_hf_trainer_freeze_callback(tiny_lm, tmp_path, bf16):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    rows, _ = encode_all(tok, task_rows("a"), 64)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    masks = random_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.5,
        max_grad_norm=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
        bf16=bf16,
    )
    callback = FreezeCallback(masks)
    data = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=Collator(tok.pad_token_id), callbacks=[callback]
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert callback.update.frozen_count == sum(int(m.sum()) for m in masks.values())
    assert not callback.update._handles  # detached at the end of training
    assert_frozen_and_trained(model, masks, before)


def test_trl_sft_trainer_freeze_callback(tiny_lm, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    masks = random_masks(model, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_list([r for r in task_rows("c", 8)])  # a "messages" column
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.5,
        max_grad_norm=0.05,
        max_length=64,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[FreezeCallback(masks)]
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert_frozen_and_trained(model, masks, before)


# ------------------------------------------------------------------ probes


def test_probe_writes_full_checkpoints(tiny_lm, probes):
    from transformers import AutoModelForCausalLM

    base = weights(tiny_lm)
    for name in ("a", "b"):
        path = probes[name]
        for f in ("config.json", "model.safetensors", "tokenizer.json", "probe.json", "train_log.jsonl"):
            assert os.path.isfile(os.path.join(path, f)), f
        assert not os.path.exists(path + ".work")  # the work folder is cleaned up
        rec = read_json(os.path.join(path, "probe.json"))
        assert rec["task"] == name and rec["steps"] == 6 and rec["examples"] == 16
        assert rec["frozen_entries"] == 0 and rec["frozen_bit_identical"] is None
        assert len(rec["losses"]) == 6 and rec["first_loss"] == rec["losses"][0]
        assert rec["final_loss"] == rec["losses"][-1] and all(x > 0 for x in rec["losses"])
        assert log_steps(os.path.join(path, "train_log.jsonl")) == [1, 2, 3, 4, 5, 6]
        w = weights(path)
        assert set(w) == set(base)
        assert all(not torch.equal(w[k], base[k]) for k in base)  # a full fine-tune moves every tensor
        AutoModelForCausalLM.from_pretrained(path)  # a loadable HF checkpoint
    assert not torch.equal(weights(probes["a"])["lm_head.weight"], weights(probes["b"])["lm_head.weight"])


def test_probe_regions_option(probes, regions):
    from cpift_merge.storage.regions import load_regions

    rs = load_regions(os.path.join(probes["out"], "regions"))
    assert sorted(rs.tasks) == ["a", "b"]
    assert rs.k("a") == regions.k("a") and rs.k("b") == regions.k("b")


def test_probe_lora_changes_only_target_modules(tiny_lm, tasks, tmp_path):
    cli(
        "probe",
        "--base",
        tiny_lm,
        "--task",
        f"a={tasks['a']}",
        "--out",
        tmp_path,
        "--lora",
        "--lora-rank",
        4,
        "--steps",
        3,
        *FAST,
    )
    base, probe = weights(tiny_lm), weights(str(tmp_path / "a"))
    assert set(probe) == set(base)  # merged back: plain base names, no adapter tensors
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    changed = {k for k in base if not torch.equal(base[k], probe[k])}
    expected = {k for k in base if k.endswith(".weight") and k.split(".")[-2] in targets}
    assert len(expected) == 7 * 2
    assert changed == expected
    rec = read_json(str(tmp_path / "a" / "probe.json"))
    assert rec["config"]["lora"] is True and rec["steps"] == 3


def test_probe_lora_alpha_and_target_modules(tiny_lm, tasks, tmp_path, monkeypatch):
    import peft

    seen = []
    real = peft.LoraConfig

    def spy(**kw):
        seen.append(kw)
        return real(**kw)

    monkeypatch.setattr(peft, "LoraConfig", spy)
    cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", tmp_path / "p", "--lora", "--lora-rank", 4,
        "--lora-alpha", 16, "--lora-target-modules", "q_proj,v_proj", "--steps", 2, *FAST)  # fmt: skip
    assert seen[-1]["lora_alpha"] == 16 and seen[-1]["target_modules"] == ["q_proj", "v_proj"]
    base, probe = weights(tiny_lm), weights(str(tmp_path / "p" / "a"))
    changed = {k.split(".")[-2] for k in base if not torch.equal(base[k], probe[k])}
    assert changed == {"q_proj", "v_proj"}
    assert "lora_alpha" not in TrainConfig().identity()  # old runs keep their identity
    assert TrainConfig(lora=True, lora_alpha=16).identity()["lora_alpha"] == 16
    for args, match in [
        (["--lora", "--lora-target-modules", "qq_proj"], "has no module named qq_proj"),
        (["--lora-alpha", 8], "apply to --lora only"),
        (["--lora", "--lora-alpha", 0], "--lora-alpha must be a positive number"),
    ]:
        res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", tmp_path / "bad", "--steps", 1,
                  *args, *FAST, code=2)  # fmt: skip
        one_line_error(res, match)


def test_probe_bad_data_is_one_line_error(tiny_lm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    result = cli("probe", "--base", tiny_lm, "--task", f"x={bad}", "--out", tmp_path / "o", code=2)
    one_line_error(result, f"{bad}:2: not valid JSON")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ stages


def test_staged_given_order_and_frozen_core(staged, regions):
    out = staged["out"]
    summary = read_json(os.path.join(out, "train.json"))
    assert summary["groups"] == [["a"], ["b"]]
    assert [s["tasks"] for s in summary["stages"]] == [["a"], ["b"]]
    assert summary["final"] == os.path.join(out, "stage-2")
    s1 = read_json(os.path.join(out, "stage-1", "stage.json"))
    s2 = read_json(os.path.join(out, "stage-2", "stage.json"))
    for rec, k in ((s1, 1), (s2, 2)):
        assert rec["stage"] == k and rec["steps"] == 4 and len(rec["losses"]) == 4
        assert set(rec) >= {"tasks", "frozen_entries", "steps", "losses"}
    assert s1["tasks"] == ["a"] and s1["frozen_entries"] == 0 and s1["frozen_tasks"] == []
    assert s2["tasks"] == ["b"] and s2["frozen_tasks"] == ["a"]
    assert s2["frozen_entries"] == regions.k("a") > 0
    assert s2["frozen_bit_identical"] is True
    assert s2["base"] == os.path.join(out, "stage-1")
    # stage 2 left a's core bit-identical to stage 1, and trained (almost) all the rest
    w1, w2 = weights(os.path.join(out, "stage-1")), weights(os.path.join(out, "stage-2"))
    core = unchanged = total = 0
    for t in regions.tensor_names:
        m = regions.mask("a", t)
        assert torch.equal(w2[t][m], w1[t][m]), t
        core += int(m.sum())
        unchanged += int((w2[t] == w1[t]).sum())
        total += m.numel()
    assert core == regions.k("a")
    assert unchanged - core < 0.001 * total  # the frozen set is a's core, not more
    assert "stage" in staged["output"] and "final model" in staged["output"]


def test_finished_stages_are_not_redone(staged, monkeypatch):
    import transformers

    out = staged["out"]
    files = [os.path.join(out, f"stage-{k}", f) for k in (1, 2) for f in ("model.safetensors", "stage.json")]
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}

    def no_training(*a, **k):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(transformers.Trainer, "train", no_training)
    start = time.monotonic()
    cli(*staged["args"])
    assert time.monotonic() - start < 10
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes


def test_random_groups_with_sample(tiny_lm, tasks, regions, tmp_path):
    out = tmp_path / "run"
    cli(
        "train",
        "--base",
        tiny_lm,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--groups",
        "random:2",
        "--sample",
        3,
        "--seed",
        1,
        "--out",
        out,
        "--steps",
        1,
        *FAST,
    )
    plan = plan_groups("random:2", ["a", "b"], seed=1)
    assert plan == [["b"], ["a"]]  # this seed reverses the --task order
    summary = read_json(str(out / "train.json"))
    assert summary["groups"] == plan and summary["sample"] == 3
    first = plan[0][0]
    recs = [read_json(str(out / f"stage-{k}" / "stage.json")) for k in (1, 2)]
    assert [r["tasks"] for r in recs] == plan
    assert all(r["examples"] == 3 for r in recs)  # N drawn per task (one task per stage)
    assert recs[1]["frozen_tasks"] == [first] and recs[1]["frozen_entries"] == regions.k(first)


def test_from_regions_plan(tiny_lm, tasks, regions, tmp_path):
    out = tmp_path / "run"
    cli(
        "train",
        "--base",
        tiny_lm,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--out",
        out,
        "--steps",
        1,
        "--sample",
        2,
        *FAST,
    )
    summary = read_json(str(out / "train.json"))
    assert summary["groups"] == regions.groups
    assert [s["tasks"] for s in summary["stages"]] == regions.groups
    assert summary["regions"] == regions.path
    if len(regions.groups) > 1:
        earlier = regions.groups[0]
        assert summary["stages"][1]["frozen_entries"] > 0
        assert read_json(str(out / "stage-2" / "stage.json"))["frozen_tasks"] == earlier


def test_sample_draws_n_per_task(tiny_lm, tasks, tmp_path):
    out = tmp_path / "run"
    cli(
        "train",
        "--base",
        tiny_lm,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"c={tasks['c']}",
        "--groups",
        "given:a,c",
        "--sample",
        5,
        "--out",
        out,
        "--steps",
        1,
        *FAST,
    )
    rec = read_json(str(out / "stage-1" / "stage.json"))
    assert rec["tasks"] == ["a", "c"] and rec["examples"] == 10 and rec["frozen_entries"] == 0
    drawn = sample_balanced({"a": task_rows("a"), "c": task_rows("c")}, 5, seed=0)
    assert {k: len(v) for k, v in drawn.items()} == {"a": 5, "c": 5}


def test_plan_groups(regions):
    tasks = ["a", "b", "c", "d", "e"]
    assert plan_groups("given:a,b;c;d,e", tasks) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_groups("given: a , b ;; c;d;e", tasks) == [["a", "b"], ["c"], ["d"], ["e"]]
    r = plan_groups("random:2", tasks, seed=3)
    assert r == plan_groups("random:2", tasks, seed=3)  # seeded
    assert len(r) == 2 and sorted(t for g in r for t in g) == tasks
    assert sorted(len(g) for g in r) == [2, 3]
    assert plan_groups("random:5", tasks) and len(plan_groups("random:1", tasks)) == 1
    assert plan_groups("from-regions", ["a", "b"], regions) == regions.groups
    for spec, match in [
        ("given:a,b", "every task exactly once"),
        ("given:a;a,b;c;d;e", "exactly once"),
        ("given:a;b;c;d;e;f", "exactly once"),
        ("random:0", "1 <= K"),
        ("random:6", "1 <= K"),
        ("random:x", "integer"),
        ("staged", "must be from-regions"),
        ("from-regions", "needs --regions"),
    ]:
        with pytest.raises(CpiftError, match=match):
            plan_groups(spec, tasks)
    with pytest.raises(CpiftError, match="task c is not in the region file"):
        plan_groups("from-regions", ["a", "b", "c"], regions)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("given:a;zzz", "must name every task exactly once"),
        ("random:x", "integer"),
        ("random:3", "1 <= K <= 2"),
        ("banana", "must be from-regions, random:K or given"),
    ],
)
def test_bad_groups_spec(tiny_lm, tasks, regions, tmp_path, spec, match):
    result = cli(
        "train",
        "--base",
        tiny_lm,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--groups",
        spec,
        "--out",
        tmp_path / "o",
        code=2,
    )
    one_line_error(result, match)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("groups", ["from-regions", "given:c;a,b", "random:3"])
def test_task_missing_from_regions(tiny_lm, tasks, regions, tmp_path, groups):
    """c was never probed: refused before anything is trained (the last stage's tasks
    need no core, so given:"a;b;c" would be allowed)."""
    if groups == "random:3":
        plan = plan_groups(groups, ["a", "b", "c"], seed=0)
        if plan[-1] == ["c"]:
            pytest.skip("this seed puts c last, where no core of it is needed")
    result = cli(
        "train",
        "--base",
        tiny_lm,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--task",
        f"c={tasks['c']}",
        "--groups",
        groups,
        "--out",
        tmp_path / "o",
        "--steps",
        1,
        code=2,
    )
    one_line_error(result, "task c is not in the region file")
    assert not (tmp_path / "o" / "stage-1").exists()


def test_three_stages_freeze_the_union_of_earlier_cores(tiny_lm, tasks, regions, tmp_path):
    """given:"a;b;c": stage 3 freezes a's and b's cores; c, last, needs no core."""
    out = tmp_path / "run"
    cli(
        "train",
        "--base",
        tiny_lm,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--task",
        f"c={tasks['c']}",
        "--groups",
        "given:a;b;c",
        "--out",
        out,
        "--steps",
        2,
        "--sample",
        4,
        *FAST,
    )
    recs = [read_json(str(out / f"stage-{k}" / "stage.json")) for k in (1, 2, 3)]
    assert [r["frozen_tasks"] for r in recs] == [[], ["a"], ["a", "b"]]
    union = {t: regions.mask("a", t) | regions.mask("b", t) for t in regions.tensor_names}
    assert recs[2]["frozen_entries"] == sum(int(m.sum()) for m in union.values())
    assert max(regions.k("a"), regions.k("b")) <= recs[2]["frozen_entries"] <= regions.k("a") + regions.k("b")
    w2, w3 = weights(str(out / "stage-2")), weights(str(out / "stage-3"))
    for t, m in union.items():
        assert torch.equal(w3[t][m], w2[t][m]), t


def test_update_core_trains_only_the_stage_cores(tiny_lm, tasks, regions, tmp_path):
    """--update core (AdamW, weight decay 0.1): stage k moves only its own cores (less
    earlier ones); every other entry stays bit-identical, and the cores do move."""
    out = tmp_path / "run"
    cli("train", "--base", tiny_lm, "--regions", regions.path, "--task", f"a={tasks['a']}", "--task",
        f"b={tasks['b']}", "--groups", "given:a;b", "--update", "core", "--out", out, "--steps", 3,
        "--weight-decay", 0.1, *FAST)  # fmt: skip
    w0, w1, w2 = weights(tiny_lm), weights(str(out / "stage-1")), weights(str(out / "stage-2"))
    moved = {1: 0, 2: 0}
    for name in w0:
        ca = regions.mask("a", name) if regions.has_tensor(name) else torch.zeros(w0[name].shape, dtype=torch.bool)
        cb = regions.mask("b", name) if regions.has_tensor(name) else torch.zeros(w0[name].shape, dtype=torch.bool)
        assert torch.equal(w1[name][~ca], w0[name][~ca]), name
        keep2 = ~cb | ca
        assert torch.equal(w2[name][keep2], w1[name][keep2]), name
        moved[1] += int((w1[name][ca] != w0[name][ca]).sum())
        moved[2] += int((w2[name][cb & ~ca] != w1[name][cb & ~ca]).sum())
    assert moved[1] > 0 and moved[2] > 0
    recs = [read_json(str(out / f"stage-{k}" / "stage.json")) for k in (1, 2)]
    assert all(r["update"] == "core" and r["frozen_bit_identical"] for r in recs)
    assert read_json(str(out / "train.json"))["update"] == "core"


def test_replay_mixes_exactly_the_stated_examples(tiny_lm, tasks, tmp_path, monkeypatch):
    from cpift_merge.training import finetune as ft
    from cpift_merge.training.data import load_examples

    seen = []
    real = ft.finetune

    def spy(base, examples, out, cfg, **kw):
        seen.append(list(examples))
        return real(base, examples, out, cfg, **kw)

    monkeypatch.setattr(ft, "finetune", spy)
    out = tmp_path / "run"
    cli("train", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--task", f"b={tasks['b']}", "--groups",
        "given:a;b", "--replay", 3, "--out", out, "--steps", 1, "--seed", 5, *FAST)  # fmt: skip
    a, b = load_examples(tasks["a"]), load_examples(tasks["b"])
    key = lambda rows: sorted(json.dumps(r, sort_keys=True) for r in rows)  # noqa: E731
    assert key(seen[0]) == key(a)  # stage 1: nothing to replay
    assert key(seen[1]) == key(b + ft.replay_examples(a, 3, 5 + 2))  # stage 2: b and 3 seeded a examples
    assert len(ft.replay_examples(a, 3, 7)) == 3 and ft.replay_examples(a, 3, 7) == ft.replay_examples(a, 3, 7)
    assert read_json(str(out / "stage-2" / "stage.json"))["replayed"] == {"a": 3}
    # bad input: one line before any work
    for args, match in [
        (["--replay", 99], "replay 99 is larger than task a's 16 examples"),
        (["--replay", -1], "replay must be a whole number"),
        (["--update", "core"], "update core trains only the stage's cores: it needs regions"),
    ]:
        res = cli("train", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--task", f"b={tasks['b']}", "--groups",
                  "given:a;b", "--out", tmp_path / "bad", "--steps", 1, *args, *FAST, code=2)  # fmt: skip
        one_line_error(res, match)
        assert not os.path.exists(tmp_path / "bad")


def test_regions_of_another_model_refused(tasks, regions, tmp_path):
    from conftest import tiny_config, tiny_tokenizer
    from transformers import LlamaForCausalLM

    other = str(tmp_path / "other")
    LlamaForCausalLM(tiny_config(vocab_size=112)).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    result = cli(
        "train",
        "--base",
        other,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--groups",
        "given:a;b",
        "--out",
        tmp_path / "o",
        code=2,
    )
    one_line_error(result, "computed for another model")
    assert not (tmp_path / "o" / "stage-1").exists()


def test_interrupted_run_with_other_settings_refused(tiny_lm, tmp_path):
    from cpift_merge.training.finetune import finetune

    out = tmp_path / "probe"
    (tmp_path / "probe.work").mkdir()
    (tmp_path / "probe.work" / "run-config.json").write_text(json.dumps({"config": "something else"}))
    with pytest.raises(CpiftError, match="interrupted run with other settings"):
        finetune(tiny_lm, task_rows("a", 4), str(out), TrainConfig(steps=1), progress=False)


def test_existing_output_that_is_not_a_run_is_not_replaced(tiny_lm, tmp_path):
    from cpift_merge.training.finetune import finetune

    out = tmp_path / "probe"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CpiftError, match="not a finished run"):
        finetune(tiny_lm, task_rows("a", 4), str(out), TrainConfig(steps=1), progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_log_callback_drops_lines_past_the_checkpoint_and_cut_lines(tmp_path):
    from cpift_merge.training.finetune import JsonlLogCallback

    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    JsonlLogCallback(str(path), resume_step=3)
    assert log_steps(str(path)) == [1, 2, 3]
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')  # killed mid-line
    cb = JsonlLogCallback(str(path), resume_step=2)

    class State:
        global_step = 2

    cb.on_log(None, State(), None, logs={"loss": 0.5, "note": "x"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
    ]
    assert cb.losses == [0.5]


def test_last_checkpoint_skips_a_cut_trainer_state(tmp_path):
    from cpift_merge.training.finetune import _last_checkpoint

    assert _last_checkpoint(str(tmp_path / "none")) is None
    for step, text in ((2, '{"global_step": 2}'), (4, '{"global_st'), (10, None)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if text is not None:
            (d / "trainer_state.json").write_text(text)
    (tmp_path / "checkpoint-x").mkdir()
    assert _last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_train_config_checks():
    TrainConfig().check()
    for bad, match in [
        ({"steps": 0}, "--steps"),
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": 0}, "--lr"),
        ({"weight_decay": -1}, "--weight-decay"),
        ({"device": "tpu"}, "--device"),
        ({"optimizer": "adam"}, "--optimizer must be adamw or sgd"),
        ({"optimizer": "sgd", "momentum": 1.0}, "--momentum must be a number in"),
        ({"momentum": 0.9}, "--momentum applies to --optimizer sgd only"),
    ]:
        with pytest.raises(CpiftError, match=match):
            TrainConfig(**bad).check()
    assert TrainConfig(lr=1e-3).fingerprint() != TrainConfig().fingerprint()


def test_optimizer_options_leave_default_identities_unchanged():
    """Runs recorded before --optimizer existed keep their identity while it is adamw."""
    from dataclasses import asdict

    ident = TrainConfig().identity()
    assert "optimizer" not in ident and "momentum" not in ident
    later = ("optimizer", "momentum", "report_to", "lora_alpha", "lora_targets", "fsdp", "fsdp_config")
    assert ident == {k: v for k, v in asdict(TrainConfig()).items() if k not in later}
    sgd = TrainConfig(optimizer="sgd", momentum=0.5)
    assert sgd.identity()["optimizer"] == "sgd" and sgd.identity()["momentum"] == 0.5
    assert sgd.fingerprint() != TrainConfig().fingerprint()
    sharded = TrainConfig(fsdp=True, fsdp_config={"cpu_offload": True})  # a sharded run is another run
    assert sharded.identity()["fsdp"] is True and sharded.fingerprint() != TrainConfig().fingerprint()


def test_sgd_probe_uses_plain_sgd_and_records_it(tiny_lm, tasks, tmp_path, monkeypatch):
    import torch

    made = []
    real = torch.optim.SGD.__init__

    def spy(self, params, **kw):
        made.append(kw)
        real(self, params, **kw)

    monkeypatch.setattr(torch.optim.SGD, "__init__", spy)
    out = tmp_path / "p"
    res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", out, "--steps", 2,
              "--optimizer", "sgd", "--momentum", 0.5, "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(made) == 1 and made[0]["momentum"] == 0.5 and made[0]["lr"] == TrainConfig.DEFAULT_LR["sgd"] == 0.1
    rec = json.load(open(out / "a" / "probe.json"))
    assert rec["config"]["optimizer"] == "sgd" and rec["run"]["config"]["optimizer"] == "sgd"
    assert rec["steps"] == 2 and rec["final_loss"] is not None


def test_report_to_reaches_the_trainer_and_not_the_run_identity(tiny_lm, tasks, tmp_path, monkeypatch):
    import transformers

    seen = []
    real = transformers.TrainingArguments

    def spy(*args, **kw):
        seen.append(kw["report_to"])
        return real(*args, **{**kw, "report_to": []})  # no logger package needed here

    monkeypatch.setattr(transformers, "TrainingArguments", spy)
    cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", tmp_path / "p", "--steps", 1,
        "--report-to", "tensorboard, wandb", *FAST)  # fmt: skip
    cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", tmp_path / "q", "--steps", 1, *FAST)
    assert seen == [["tensorboard", "wandb"], []]
    assert TrainConfig(report_to="wandb").identity() == TrainConfig().identity()  # logging changes no bit


def test_report_to_tensorboard_writes_an_event_file(tiny_lm, tasks, tmp_path):
    """--report-to tensorboard: the Trainer's TensorBoard logger (tensorboardX here) writes
    its event file into the model folder (runs/...), beside train_log.jsonl."""
    import glob

    cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", tmp_path / "p", "--steps", 2,
        "--report-to", "tensorboard", *FAST)  # fmt: skip
    events = glob.glob(str(tmp_path / "p" / "a" / "runs" / "*" / "events.out.tfevents.*"))
    assert len(events) == 1 and os.path.getsize(events[0]) > 0


def test_quiet_probe_prints_nothing(tiny_lm, tasks, tmp_path):
    """--quiet: neither our lines nor transformers' "Loading weights"/"Writing model shards" bars."""
    code = "import sys; from cpift_merge.cli import main; main(sys.argv[1:])"
    args = ["probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", str(tmp_path / "p"), "--steps", "1",
            "--max-length", "64"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT}
    quiet = subprocess.run([sys.executable, "-c", code, *args, "--quiet"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == "", (quiet.stdout, quiet.stderr)
    loud = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "q")], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert "probe a: 16 examples" in loud.stdout
    as_module = subprocess.run([sys.executable, "-m", "cpift_merge", "--help"], capture_output=True, text=True, env=env)
    assert as_module.returncode == 0 and "Usage: cpift" in as_module.stdout  # python -m cpift_merge is cpift


def test_region_files_record_the_probes_optimizer(tiny_lm, probes, regions, tmp_path):
    """regions.json says how each task model was trained; `cpift regions` prints it."""
    from cpift_merge.storage.regions import load_regions, trained_with

    for rs in (regions, load_regions(os.path.join(probes["out"], "regions"))):
        for t in ("a", "b"):
            got = rs.meta["tasks"][t]["trained_with"]
            assert got["optimizer"] == "adamw" and got["lr"] == 1e-2 and got["steps"] == 6
    assert trained_with(tiny_lm) is None  # a model trained elsewhere: unknown, not guessed
    # every model folder carries a hub model card: front matter, what it was trained on and how
    card = open(os.path.join(probes["a"], "README.md"), encoding="utf-8").read()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == os.path.basename(tiny_lm) and front["library_name"] == "transformers"
    assert {"cpift-merge", "probe", "task:a"} <= set(front["tags"]) and "optimizer: adamw" in card
    res = cli("regions", "--base", tiny_lm, "--model", f"a={probes['a']}", "--model", f"b={probes['b']}",
              "--density", 0.05, "--out", tmp_path / "r", "--quiet")  # fmt: skip
    assert "probe" in res.output and "adamw lr 0.01" in res.output


def test_sgd_step_is_theta0_minus_lr_times_clipped_gradient(tiny_lm, tasks, tmp_path, monkeypatch):
    """One SGD probe step from θ0 writes θ0 − lr·clip(g), bit for bit with torch's own SGD."""
    from transformers import AutoModelForCausalLM

    from cpift_merge.training.data import load_examples
    from cpift_merge.training.finetune import finetune

    seen = {}
    real = torch.optim.SGD.step

    def spy(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen["lr"] = self.param_groups[0]["lr"]
        seen["before"] = [p.detach().clone() for p in params]
        seen["grads"] = [p.grad.detach().clone() for p in params]
        out = real(self, closure)
        seen["after"] = [p.detach().clone() for p in params]
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    cfg = TrainConfig(steps=1, batch_size=4, optimizer="sgd", max_grad_norm=1e-3, save_steps=5, device="cpu")
    finetune(tiny_lm, load_examples(tasks["a"]), str(tmp_path / "p"), cfg, progress=False)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_lm).named_parameters())
    # the step starts at θ0, with the clipped gradient and the full learning rate (no warmup)
    assert seen["lr"] == 0.1
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in seen["grads"]])) <= 1e-3 * (1 + 1e-5)
    assert sum(any(torch.equal(b, p.detach()) for p in base.values()) for b in seen["before"]) == len(seen["before"])
    # torch's reference SGD on copies of θ0 with the same gradient gives the same bits
    ref = [b.clone().requires_grad_(True) for b in seen["before"]]
    for r, g in zip(ref, seen["grads"]):
        r.grad = g.clone()
    real(torch.optim.SGD(ref, lr=0.1, momentum=0.0))
    assert all(torch.equal(r.detach(), a) for r, a in zip(ref, seen["after"]))
    assert any(not torch.equal(b, a) for b, a in zip(seen["before"], seen["after"]))
    # and that is what the probe wrote
    saved = dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "p")).named_parameters())
    after = {n: p.detach() for n, p in saved.items()}
    assert sum(any(torch.equal(a, v) for v in after.values()) for a in seen["after"]) == len(seen["after"])


def test_probe_score_fisher_writes_the_fisher_and_cuts_by_it(tiny_lm, tasks, tmp_path):
    """`cpift probe --score fisher --regions D`: each probe's diagonal empirical Fisher
    (mean over examples of the squared per-example gradient) beside it, and regions by Δ²·F."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpift_merge.storage.checkpoint import Checkpoint
    from cpift_merge.storage.regions import FISHER_NAME, load_regions
    from cpift_merge.training.data import Collator, encode_all, load_examples

    out = tmp_path / "p"
    res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--task", f"b={tasks['b']}", "--out", out,
              "--steps", 2, "--regions", 0.05, "--score", "fisher", *FAST)  # fmt: skip
    assert "score fisher" in res.output and "Fisher on" not in res.output  # --quiet: the tables only
    rs = load_regions(str(out / "regions"))
    assert rs.score == "fisher" and rs.meta["tasks"]["a"]["fisher"].endswith(FISHER_NAME)
    fisher = Checkpoint(str(out / "a" / FISHER_NAME))
    # a direct computation on the first two examples' gradients, for one tensor
    model = AutoModelForCausalLM.from_pretrained(str(out / "a"))
    tok = AutoTokenizer.from_pretrained(str(out / "a"))
    tok.pad_token = tok.pad_token or tok.eos_token
    rows, _ = encode_all(tok, load_examples(tasks["a"]), 64)
    name = "model.layers.0.mlp.down_proj.weight"
    acc = torch.zeros_like(dict(model.named_parameters())[name])
    for row in rows:
        model.zero_grad()
        batch = Collator(tok.pad_token_id)([row])
        model(**batch).loss.backward()
        acc += dict(model.named_parameters())[name].grad ** 2
    assert torch.allclose(fisher.get(name), acc / len(rows), rtol=1e-4, atol=1e-12)
    assert set(fisher.infos) == set(Checkpoint(str(out / "a")).infos)
    # the probe folder still loads as the model (the Fisher is no weight shard)
    assert "fisher" not in " ".join(Checkpoint(str(out / "a")).infos)
    # a rerun reuses the probes and their Fisher files
    before = os.path.getmtime(out / "a" / FISHER_NAME)
    cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--task", f"b={tasks['b']}", "--out", out,
        "--steps", 2, "--regions", 0.05, "--score", "fisher", *FAST)  # fmt: skip
    assert os.path.getmtime(out / "a" / FISHER_NAME) == before


def test_sparse_probes_differ_from_theta0_only_inside_their_cores(tiny_lm, tasks, tmp_path):
    """`cpift probe --sparse`: dense probes pick the cores, then each task is retrained
    from θ0 with everything else frozen (AdamW, weight decay 0.1): bit for bit θ0 outside."""
    from cpift_merge.storage.regions import load_regions

    out = tmp_path / "p"
    res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--task", f"b={tasks['b']}", "--out", out,
              "--steps", 3, "--weight-decay", 0.1, "--regions", 0.05, "--sparse", "--sparse-lr", 0.05,
              "--mask-epochs", 1, *[f for f in FAST if f != "--quiet"])  # fmt: skip
    assert "sparse probe a" in res.output and "lr 0.05" in res.output
    dense = load_regions(str(out / "dense" / "regions"))
    w0 = weights(tiny_lm)
    for t in ("a", "b"):
        w = weights(str(out / t))
        moved = 0
        for name in w0:
            core = dense.mask(t, name) if dense.has_tensor(name) else torch.zeros(w0[name].shape, dtype=torch.bool)
            assert torch.equal(w[name][~core], w0[name][~core]), name
            moved += int((w[name][core] != w0[name][core]).sum())
        assert moved > 0.5 * dense.k(t)  # the core trains
        rec = read_json(str(out / t / "probe.json"))
        assert rec["sparse"] is True and rec["config"]["lr"] == 0.05 and rec["frozen_bit_identical"]
        assert read_json(str(out / "dense" / t / "probe.json"))["steps"] == 4  # --mask-epochs 1: 16 examples / 4
    final = load_regions(str(out / "regions"))
    for t in ("a", "b"):  # the sparse probes' cores lie in the dense cores wherever they moved
        assert sum(int((final.mask(t, n) & ~dense.mask(t, n)).sum()) for n in final.tensor_names) <= 0.5 * final.k(t)
    for args, match in [
        (["--sparse"], "--sparse needs --regions DENSITY"),
        (["--sparse-lr", 0.1], "apply to --sparse probes only"),
        (["--sparse", "--regions", 0.05, "--sparse-lr", -1], "--sparse-lr must be a positive number"),
    ]:
        res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", tmp_path / "bad", "--steps", 1,
                  *args, *FAST, code=2)  # fmt: skip
        one_line_error(res, match)


def test_train_under_torchrun_writes_once_and_keeps_frozen_bits(tiny_lm, tasks, regions, tmp_path):
    """`torchrun --nproc-per-node 2 -m cpift_merge train` (CPU, gloo): both ranks train,
    rank 0 alone writes each stage (one log line per step, as in one process), the
    frozen cores stay bit-identical, and the replicas are checked equal to what was written."""
    args = ["train", "--base", tiny_lm, "--regions", regions.path, "--task", f"a={tasks['a']}", "--task",
            f"b={tasks['b']}", "--groups", "given:a;b", "--steps", "2", "--weight-decay", "0.1", "--device", "cpu",
            "--batch-size", "4", "--max-length", "64", "--lr", "1e-2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m",
         "cpift_merge", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("final model:") == 1  # rank 0 prints, once
    cli(*args, "--out", tmp_path / "one", "--quiet")
    for run in ("one", "two"):
        out = tmp_path / run
        assert sorted(os.listdir(out)) == ["stage-1", "stage-2", "train.json"]  # no .work folder left
        rec = read_json(str(out / "stage-2" / "stage.json"))
        assert rec["frozen_bit_identical"] is True and rec["frozen_entries"] == regions.k("a")
        assert rec.get("world_size", 1) == (2 if run == "two" else 1)
        w1, w2 = weights(str(out / "stage-1")), weights(str(out / "stage-2"))
        for name in regions.tensor_names:
            m = regions.mask("a", name)
            assert torch.equal(w2[name][m], w1[name][m]), name
    lines = {r: len(open(tmp_path / r / "stage-2" / "train_log.jsonl").readlines()) for r in ("one", "two")}
    assert lines["one"] == lines["two"]  # written once, not once per rank


def test_train_and_probe_under_accelerate_launch(tiny_lm, tasks, regions, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m cpift_merge` on a machine without
    GPUs (accelerate then starts torch's launcher; we pick gloo for the CPU): `cpift train`
    and `cpift probe` run on 2 ranks, write each output once, and A's core stays
    bit-identical. `accelerate launch --cpu` starts one process whatever --num_processes
    says: the command warns in one line and runs."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    launch = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29562", "-m", "cpift_merge"]  # fmt: skip
    common = ["--device", "cpu", "--batch-size", "4", "--max-length", "64", "--lr", "1e-2"]
    train = ["train", "--base", tiny_lm, "--regions", regions.path, "--task", f"a={tasks['a']}", "--task",
             f"b={tasks['b']}", "--groups", "given:a;b", "--steps", "2", "--weight-decay", "0.1", *common]  # fmt: skip
    run = subprocess.run([*launch, *train, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("final model:") == 1  # rank 0 prints, once
    out = tmp_path / "two"
    assert sorted(os.listdir(out)) == ["stage-1", "stage-2", "train.json"]
    rec = read_json(str(out / "stage-2" / "stage.json"))
    assert rec["world_size"] == 2 and rec["frozen_bit_identical"] is True and rec["frozen_entries"] == regions.k("a")
    w1, w2 = weights(str(out / "stage-1")), weights(str(out / "stage-2"))
    for name in regions.tensor_names:
        m = regions.mask("a", name)
        assert torch.equal(w2[name][m], w1[name][m]), name
    assert log_steps(str(out / "stage-2" / "train_log.jsonl")) == [1, 2]  # one line per step, written once
    probe = ["probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--steps", "2", "--quiet", *common]
    run = subprocess.run([*launch, *probe, "--out", str(tmp_path / "probe")], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rec = read_json(str(tmp_path / "probe" / "a" / "probe.json"))
    assert rec["world_size"] == 2 and rec["steps"] == 2
    assert log_steps(str(tmp_path / "probe" / "a" / "train_log.jsonl")) == [1, 2]
    # --cpu: accelerate starts one process whatever --num_processes says; we say so, and run
    alone = [launch[0], "launch", "--cpu", *launch[3:]]
    run = subprocess.run([*alone, *probe, "--out", str(tmp_path / "alone")], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warning: accelerate launch --cpu started one process" in run.stderr
    assert "world_size" not in read_json(str(tmp_path / "alone" / "a" / "probe.json"))


def test_train_with_fsdp_under_torchrun_keeps_frozen_bits(tiny_lm, tasks, regions, tmp_path):
    """`cpift train --fsdp` on 2 gloo ranks: the parameters and AdamW state are FSDP2 shards
    (DTensors) during training, rank 0 writes the gathered model once, and A's core stays
    bit-identical through stage 2 while the rest trains. accelerate applies FSDP only to
    GPUs; the worker lifts that gate and ours, nothing else (see tests/workers/fsdp_cpu_cli.py)."""
    settings = tmp_path / "fsdp.yml"
    settings.write_text("fsdp_reshard_after_forward: false\n")
    args = ["train", "--base", tiny_lm, "--regions", regions.path, "--task", f"a={tasks['a']}", "--task",
            f"b={tasks['b']}", "--groups", "given:a;b", "--steps", "2", "--weight-decay", "0.1", "--device", "cpu",
            "--batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--fsdp", "--fsdp-config",
            str(settings)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534",
         os.path.join(HERE, "workers", "fsdp_cpu_cli.py"), *args, "--out", str(tmp_path / "fsdp")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "fsdp"
    assert sorted(os.listdir(out)) == ["stage-1", "stage-2", "train.json"]
    rec = read_json(str(out / "stage-2" / "stage.json"))
    assert rec["frozen_bit_identical"] is True and rec["frozen_entries"] == regions.k("a")
    assert rec["world_size"] == 2 and rec["config"]["fsdp"] is True
    assert rec["config"]["fsdp_config"] == {"fsdp_reshard_after_forward": False}
    base, w1, w2 = weights(tiny_lm), weights(str(out / "stage-1")), weights(str(out / "stage-2"))
    assert set(w2) == set(base)  # the whole model was gathered and written, not one shard
    moved = 0
    for name in regions.tensor_names:
        m = regions.mask("a", name)
        assert torch.equal(w2[name][m], w1[name][m]), name
        moved += int((w2[name][~m] != w1[name][~m]).sum())
    assert moved > 0.5 * sum(int((~regions.mask("a", n)).sum()) for n in regions.tensor_names)  # stage 2 trained
    logged = [json.loads(line) for line in open(out / "stage-2" / "train_log.jsonl")]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]  # one line per step, written once
    probe = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29535",
         os.path.join(HERE, "workers", "fsdp_cpu_cli.py"), "probe", "--base", tiny_lm, "--task", f"a={tasks['a']}",
         "--steps", "2", "--device", "cpu", "--batch-size", "4", "--max-length", "64", "--fsdp", "--quiet",
         "--out", str(tmp_path / "probe")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    rec = read_json(str(tmp_path / "probe" / "a" / "probe.json"))
    assert rec["world_size"] == 2 and rec["config"]["fsdp"] is True and rec["steps"] == 2
    assert set(weights(str(tmp_path / "probe" / "a"))) == set(base)


def test_fsdp_refuses_what_it_cannot_do(tiny_lm, tasks, tmp_path):
    """--fsdp on a machine without CUDA, FSDP1-only or unknown settings, --fsdp-config alone,
    and --fsdp with --lora: one line each, before any work."""
    base = ["train", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--groups", "given:a", "--steps", "1"]
    cases = [
        ({}, ["--fsdp"], "--fsdp needs CUDA GPUs"),
        ({"fsdp_backward_prefetch": "BACKWARD_PRE"}, ["--fsdp"], "backward_prefetch is an FSDP1 setting"),
        ({"sharding_strategy": "HYBRID_SHARD"}, ["--fsdp"], "use reshard_after_forward"),
        ({"version": 1}, ["--fsdp"], "--fsdp uses FSDP2"),
        ({"reshard_after_forward": "full_shard"}, ["--fsdp"], "reshard_after_forward must be true or false"),
        ({"shard_everything": True}, ["--fsdp"], "unknown FSDP2 setting 'shard_everything'"),
        ({"version": 2}, [], "--fsdp-config applies to --fsdp only"),
    ]
    for i, (settings, flags, match) in enumerate(cases):
        path = tmp_path / f"s{i}.json"
        path.write_text(json.dumps(settings))
        extra = ["--fsdp-config", path] if settings else []
        res = cli(*base, *flags, *extra, "--out", tmp_path / f"o{i}", code=2)
        one_line_error(res, match)
        assert not os.path.exists(tmp_path / f"o{i}") and not os.path.exists(tmp_path / f"o{i}.work")
    res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", tmp_path / "lora", "--steps", 1,
              "--lora", "--fsdp", code=2)  # fmt: skip
    one_line_error(res, "--fsdp and --lora together are not supported")


# ------------------------------------------------------------ resume after kill


def _start_slow(args, sleep):
    env = {**os.environ, "PYTHONPATH": ROOT, "CPIFT_TEST_STEP_SLEEP": str(sleep), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "workers", "slow_cli.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _descendants(pid: int) -> List[int]:
    """Every live process below ``pid`` (from /proc: torchrun starts its workers in
    sessions of their own, so killing the launcher's process group leaves them running)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_at_checkpoint(proc, work, timeout=120):
    """Wait for a complete checkpoint in ``work``, then kill -9 the run (every process of it)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if os.path.isdir(work) and any(
                d.startswith("checkpoint-") and os.path.isfile(os.path.join(work, d, "trainer_state.json"))
                for d in os.listdir(work)
            ):
                return
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before a checkpoint appeared in {work}:\n"
                    f"{proc.stderr.read().decode()[-3000:]}"
                )
            time.sleep(0.05)
        pytest.fail(f"no checkpoint appeared in {work} within {timeout}s")
    finally:
        if proc.poll() is None:
            below = _descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in below:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        proc.stderr.close()


def test_resume_after_kill(tiny_lm, tasks, regions, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--base",
        tiny_lm,
        "--regions",
        regions.path,
        "--task",
        f"a={tasks['a']}",
        "--task",
        f"b={tasks['b']}",
        "--groups",
        "given:a;b",
        "--out",
        out,
        "--steps",
        8,
        "--save-steps",
        2,
        "--weight-decay",
        0.1,
        *FAST,
    ]
    # killed in stage 1, between checkpoints
    _kill_at_checkpoint(_start_slow(args, 0.5), str(out / "stage-1.work"))
    assert not (out / "stage-1").exists()  # nothing half-written in place
    # killed again in stage 2 (stage 1 resumes and finishes first): resumes with frozen entries
    _kill_at_checkpoint(_start_slow(args, 0.3), str(out / "stage-2.work"))
    assert (out / "stage-1" / "stage.json").is_file() and not (out / "stage-2").exists()
    cli(*args)
    for k in (1, 2):
        rec = read_json(str(out / f"stage-{k}" / "stage.json"))
        assert rec["steps"] == 8 and len(rec["losses"]) == 8
        # each step logged once: the run resumed from its checkpoint, it did not start over
        assert log_steps(str(out / f"stage-{k}" / "train_log.jsonl")) == list(range(1, 9))
        assert not (out / f"stage-{k}.work").exists()
    rec2 = read_json(str(out / "stage-2" / "stage.json"))
    assert rec2["resumed_from_step"] in (2, 4, 6)  # from the checkpoint, not from step 0
    assert rec2["frozen_entries"] == regions.k("a") and rec2["frozen_bit_identical"] is True
    w1, w2 = weights(str(out / "stage-1")), weights(str(out / "stage-2"))
    for t in regions.tensor_names:
        m = regions.mask("a", t)
        assert torch.equal(w2[t][m], w1[t][m]), t
    assert not any(n.startswith(".") for n in os.listdir(out))  # no temporary folders left


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_resume_after_kill_under_torchrun(fsdp, tiny_lm, tasks, regions, tmp_path):
    """`cpift train` under torchrun (2 gloo ranks; replicas, or FSDP2 shards with --fsdp),
    killed (the whole launcher group) after a checkpoint of stage 2, then launched again
    the same way: it resumes from rank 0's checkpoint instead of starting over (each step
    logged once), stage 1 is reused, no temporary is left and A's core stays bit-identical.
    Under --fsdp the sharded model and AdamW state are restored, and the result is bit for
    bit the run that was never interrupted."""
    out = tmp_path / "run"
    args = ["train", "--base", tiny_lm, "--regions", regions.path, "--task", f"a={tasks['a']}", "--task",
            f"b={tasks['b']}", "--groups", "given:a;b", "--steps", 6, "--save-steps", 2,
            "--weight-decay", 0.1, "--device", "cpu", *(["--fsdp"] if fsdp else []), *FAST]  # fmt: skip
    fsdp_worker = [os.path.join(HERE, "workers", "fsdp_cpu_cli.py")]  # also slows steps when asked
    slow, plain = (
        (fsdp_worker, fsdp_worker) if fsdp else ([os.path.join(HERE, "workers", "slow_cli.py")], ["-m", "cpift_merge"])
    )
    port = 29537 if fsdp else 29535

    def launch(script, sleep, port, to=out):
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        if sleep:
            env["CPIFT_TEST_STEP_SLEEP"] = str(sleep)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
        return subprocess.Popen(
            [*cmd, *script, *map(str, args), "--out", str(to)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip

    _kill_at_checkpoint(launch(slow, 0.5, port), str(out / "stage-2.work"), timeout=240)
    assert (out / "stage-1" / "stage.json").is_file() and not (out / "stage-2").exists()
    again = launch(plain, 0, port + 1)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-3000:]
    assert sorted(os.listdir(out)) == ["stage-1", "stage-2", "train.json"]  # no .work or temporary left
    rec = read_json(str(out / "stage-2" / "stage.json"))
    assert rec["steps"] == 6 and rec.get("world_size") == 2 and rec["resumed_from_step"] in (2, 4)
    assert rec["config"]["fsdp"] is fsdp
    assert log_steps(str(out / "stage-2" / "train_log.jsonl")) == list(range(1, 7))  # resumed, written once
    assert rec["frozen_entries"] == regions.k("a") and rec["frozen_bit_identical"] is True
    w1, w2 = weights(str(out / "stage-1")), weights(str(out / "stage-2"))
    for t in regions.tensor_names:
        m = regions.mask("a", t)
        assert torch.equal(w2[t][m], w1[t][m]), t
    if fsdp:
        whole = launch(plain, 0, port + 2, tmp_path / "whole")  # the same run, never interrupted
        _, err = whole.communicate(timeout=300)
        assert whole.returncode == 0, err.decode()[-3000:]
        assert read_json(str(tmp_path / "whole" / "stage-2" / "stage.json"))["losses"] == rec["losses"]
        w = weights(str(tmp_path / "whole" / "stage-2"))
        assert all(torch.equal(w[k], w2[k]) for k in w)


def test_same_seed_same_weights(tiny_lm, tmp_path):
    """Seeds make runs repeatable on CPU: two runs, bit-identical weights and losses."""
    from safetensors.torch import load_file

    from cpift_merge.training.finetune import TrainConfig, finetune

    exs = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(6) for b in range(6)]
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, weight_decay=0.1, seed=3)
    r1 = finetune(tiny_lm, exs, str(tmp_path / "r1"), cfg, progress=False)
    r2 = finetune(tiny_lm, exs, str(tmp_path / "r2"), cfg, progress=False)
    assert r1["losses"] == r2["losses"]
    w1 = load_file(str(tmp_path / "r1" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "r2" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    r3 = finetune(
        tiny_lm, exs, str(tmp_path / "r3"), TrainConfig(steps=4, batch_size=4, lr=1e-3, seed=4), progress=False
    )
    assert r3["losses"] != r1["losses"]


def test_progress_bar_named_from_its_first_draw(tiny_lm, tmp_path, capfd):
    """The training bar carries its description and the loss, and no nameless "0/N"
    bar is drawn first (it would stay as a blank line in a log file)."""
    from cpift_merge.training.finetune import TrainConfig, finetune

    exs = [{"prompt": f"{a}+{a}=", "response": str(2 * a)} for a in range(8)]
    finetune(tiny_lm, exs, str(tmp_path / "run"), TrainConfig(steps=2, batch_size=4), progress=True, desc="probe demo")
    draws = [d for d in capfd.readouterr().err.replace("\r", "\n").splitlines() if "/2 [" in d]
    assert draws, "no training bar drawn"
    assert all(d.startswith("probe demo:") for d in draws), draws
    assert any("loss=" in d for d in draws), draws


# ------------------------------------------- stale results: redo or refuse, never reuse


def test_finished_run_with_other_options_is_refused_or_redone(tiny_lm, tasks, tmp_path):
    """`cpift train --out EXISTING` with another --lr: refused naming the option; with
    --overwrite redone with the new lr; with the same options reused as it is."""
    out = tmp_path / "run"
    args = ["train", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--groups", "given:a", "--out", out]
    args += ["--steps", 2, "--batch-size", 4, "--max-length", 64, "--quiet"]
    cli(*args, "--lr", "1e-4")
    stage = out / "stage-1"
    first = weights(str(stage))
    mtime = os.stat(stage / "model.safetensors").st_mtime_ns
    cli(*args, "--lr", "1e-4")  # same options: the finished stage is reused, not retrained
    assert os.stat(stage / "model.safetensors").st_mtime_ns == mtime
    line = one_line_error(cli(*args, "--lr", "5e-3", code=2), "finished run made with other settings")
    assert "lr 0.0001 -> 0.005" in line and "--overwrite" in line
    assert all(torch.equal(first[k], v) for k, v in weights(str(stage)).items())  # untouched
    cli(*args, "--lr", "5e-3", "--overwrite")
    assert read_json(str(stage / "stage.json"))["config"]["lr"] == 5e-3
    assert any(not torch.equal(first[k], v) for k, v in weights(str(stage)).items())


def test_swapped_data_of_the_same_length_is_refused(tiny_lm, tmp_path):
    from cpift_merge.training.finetune import finetune

    out = str(tmp_path / "probe")
    cfg = TrainConfig(steps=1, batch_size=4, max_length=64)
    first = finetune(tiny_lm, task_rows("a", 8), out, cfg, record="probe.json", progress=False)
    with pytest.raises(CpiftError, match=r"other settings \(training data\)"):
        finetune(tiny_lm, task_rows("b", 8), out, cfg, record="probe.json", progress=False)
    rec = finetune(tiny_lm, task_rows("b", 8), out, cfg, record="probe.json", progress=False, overwrite=True)
    assert rec["run"]["data"] != first["run"]["data"] and rec["run"]["config"] == first["run"]["config"]
    again = finetune(tiny_lm, task_rows("b", 8), out, cfg, record="probe.json", progress=False)
    assert again == rec  # same identity: reused


def test_interrupted_run_on_other_data_is_not_resumed(tiny_lm, tmp_path):
    """A work folder left by a kill on one data file is not finished on another file of
    the same length: refused, or started over with overwrite."""
    from cpift_merge.training.finetune import finetune, run_identity

    out = tmp_path / "probe"
    cfg = TrainConfig(steps=1, batch_size=4, max_length=64)
    work = tmp_path / "probe.work"
    work.mkdir()
    (work / "run-config.json").write_text(json.dumps(run_identity(tiny_lm, task_rows("a", 8), cfg, None)))
    (work / "checkpoint-1").mkdir()  # what a kill leaves: must not be resumed from
    with pytest.raises(CpiftError, match=r"interrupted run with other settings \(training data\)"):
        finetune(tiny_lm, task_rows("b", 8), str(out), cfg, progress=False)
    rec = finetune(tiny_lm, task_rows("b", 8), str(out), cfg, progress=False, overwrite=True)
    assert rec["steps"] == 1 and not work.exists()


def test_run_identity_covers_base_content_and_frozen_entries(tiny_lm, tmp_path):
    """A copied base keeps its identity (moved runs resume); other weights or other
    frozen entries change it."""
    import shutil

    from cpift_merge.training.finetune import run_identity

    cfg = TrainConfig(steps=1)
    rows = task_rows("a", 4)
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_lm, copy)
    assert run_identity(copy, rows, cfg, None) == run_identity(tiny_lm, rows, cfg, None)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(copy)
    assert run_identity(copy, rows, cfg, None)["base"] != run_identity(tiny_lm, rows, cfg, None)["base"]
    masks = {"x": torch.tensor([True, False, False])}
    other = {"x": torch.tensor([False, True, False])}
    assert run_identity(tiny_lm, rows, cfg, masks)["frozen"] != run_identity(tiny_lm, rows, cfg, other)["frozen"]


# ------------------------------------- non-finite input, bad options, nothing half-written


def test_nan_in_the_base_is_refused_before_training(tiny_lm, tasks, tmp_path):
    from safetensors.torch import save_file

    nan_base = tmp_path / "nan-base"
    shutil.copytree(tiny_lm, nan_base)
    w = weights(str(nan_base))
    name = sorted(w)[3]
    w[name].view(-1)[0] = float("nan")
    save_file(w, str(nan_base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "probes"
    res = cli("probe", "--base", nan_base, "--task", f"a={tasks['a']}", "--out", out, "--steps", 1, *FAST, code=2)
    one_line_error(res, f"has NaN or Inf in tensor {name}")
    assert not (out / "a").exists() and not (out / "a.work").exists()


def test_diverging_training_stops_with_one_line_and_leaves_nothing(tiny_lm, tmp_path):
    from cpift_merge.training.finetune import finetune

    out = tmp_path / "probe"
    cfg = TrainConfig(steps=6, lr=1e12, max_grad_norm=0.0, batch_size=4, max_length=64)
    with pytest.raises(CpiftError, match=r"training diverged at step \d+: (loss|grad_norm) is (nan|inf)"):
        finetune(tiny_lm, task_rows("a", 16), str(out), cfg, progress=False)
    assert not out.exists() and not (tmp_path / "probe.work").exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--epochs", "inf"], "--epochs must be a finite number"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
        (["--seed", "-1"], "--seed and warmup steps must be non-negative"),
    ],
)
def test_non_finite_and_negative_options_refused_before_work(tiny_lm, tasks, tmp_path, flags, match):
    out = tmp_path / "probes"
    res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", out, "--steps", 1, *flags, code=2)
    one_line_error(res, match)
    assert not out.exists()


def test_outputs_get_the_usual_file_modes(tiny_lm, tmp_path):
    from cpift_merge.training.finetune import finetune

    out = tmp_path / "probe"
    finetune(tiny_lm, task_rows("a", 4), str(out), TrainConfig(steps=1, batch_size=4, max_length=64), progress=False)
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}, modes
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


def test_probe_regions_density_checked_before_training(tiny_lm, tasks, tmp_path):
    out = tmp_path / "probes"
    res = cli("probe", "--base", tiny_lm, "--task", f"a={tasks['a']}", "--out", out, "--regions", 5, *FAST, code=2)
    one_line_error(res, "--regions takes a density in [0, 1]")
    assert not out.exists()


def test_model_folder_without_tokenizer_or_truncated_is_one_line(tiny_lm, tasks, tmp_path):
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_lm, f), no_tok / f)
    args = ["--task", f"a={tasks['a']}", "--steps", 1, *FAST]
    res = cli("probe", "--base", no_tok, "--out", tmp_path / "p1", *args, code=2)
    one_line_error(res, f"cannot load a tokenizer from {no_tok}")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_lm, cut)
    with open(cut / "model.safetensors", "r+b") as fh:
        fh.truncate(os.path.getsize(cut / "model.safetensors") // 2)
    res = cli("probe", "--base", cut, "--out", tmp_path / "p2", *args, code=2)
    one_line_error(res, "is truncated")
    assert not (tmp_path / "p1").exists() or not os.listdir(tmp_path / "p1")
    assert not (tmp_path / "p2").exists() or not os.listdir(tmp_path / "p2")


def test_nothing_left_after_max_length_names_the_task(tiny_lm, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 200, "response": "y"}] * 3)
    out = tmp_path / "probes"
    res = cli("probe", "--base", tiny_lm, "--task", f"wordy={long}", "--out", out, "--steps", 1, *FAST, code=2)
    line = one_line_error(res, "probe wordy: 0 examples")
    assert "nothing left to train on; raise --max-length" in line and not (out / "wordy.work").exists()


def test_regions_of_another_base_need_allow_other_base(tiny_lm, tasks, regions, tmp_path):
    """Same architecture, other weights: refused by default; --allow-other-base (the
    calibration of a merged model) freezes those cores in it."""
    from transformers import AutoModelForCausalLM

    other = str(tmp_path / "other")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    model.save_pretrained(other)
    for f in os.listdir(tiny_lm):
        if "token" in f or f.endswith(".jinja"):
            shutil.copy(os.path.join(tiny_lm, f), other)
    args = ["train", "--base", other, "--regions", regions.path, "--task", f"a={tasks['a']}"]
    args += ["--task", f"b={tasks['b']}", "--groups", "given:a;b", "--out", tmp_path / "o", "--steps", 1, *FAST]
    line = one_line_error(cli(*args, code=2), "computed for another model")
    assert "--allow-other-base" in line and not (tmp_path / "o" / "stage-1").exists()
    cli(*args, "--allow-other-base")
    assert read_json(str(tmp_path / "o" / "stage-2" / "stage.json"))["frozen_entries"] == regions.k("a")
