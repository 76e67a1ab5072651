"""Task data: loading (JSONL, saved datasets), chat-template encoding with
response-only labels, truncation accounting, balanced sampling, the collator."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import tiny_tokenizer

from cpift_merge.errors import CpiftError
from cpift_merge.training.data import (
    IGNORE,
    Collator,
    Encoded,
    encode,
    encode_all,
    load_examples,
    sample_balanced,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def labelled(e: Encoded):
    return [lab for lab in e.labels if lab != IGNORE]


def labelled_runs(e: Encoded):
    """Contiguous stretches of labelled tokens."""
    runs, cur = [], []
    for lab in e.labels:
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    return runs + ([cur] if cur else [])


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ----------------------------------------------------------------- encoding


def test_chat_template_labels_only_the_response(tok):
    e = encode(tok, {"prompt": "what is 2+2?", "response": "four"})
    assert len(e.input_ids) == len(e.labels)
    assert tok.decode(labelled(e)) == "four" + tok.eos_token
    # labels equal the ids where set, and the prompt part is entirely IGNORE
    assert all(lab == i for i, lab in zip(e.input_ids, e.labels) if lab != IGNORE)
    text = tok.decode(e.input_ids)
    assert text.startswith("<|im_start|>user\nwhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    first = next(i for i, lab in enumerate(e.labels) if lab != IGNORE)
    assert tok.decode(e.input_ids[:first]) == ("<|im_start|>user\nwhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # the full sequence is exactly what the chat template renders
    messages = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "four"}]
    assert text == tok.apply_chat_template(messages, tokenize=False)


def test_without_chat_template_labels_only_the_response(plain_tok):
    assert not plain_tok.chat_template
    e = encode(plain_tok, {"prompt": "Q: 2+2? A: ", "response": "four"})
    assert plain_tok.decode(e.input_ids) == "Q: 2+2? A: four" + plain_tok.eos_token
    assert plain_tok.decode(labelled(e)) == "four" + plain_tok.eos_token
    assert e.labels[: len("Q: 2+2? A: ")] == [IGNORE] * len("Q: 2+2? A: ")


def test_messages_need_a_chat_template(plain_tok):
    with pytest.raises(CpiftError, match="chat template"):
        encode(plain_tok, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


def test_multi_turn_labels_only_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    e = encode(tok, {"messages": messages})
    assert tok.decode(e.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    runs = [tok.decode(r) for r in labelled_runs(e)]
    assert runs == ["hello" + tok.eos_token, "see you" + tok.eos_token]
    # nothing of the system or user turns is labelled
    for text in ("be brief", "bye", "user", "system"):
        assert all(text not in r for r in runs)


def test_template_that_is_not_prefix_stable_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = "{{ messages|length }}" + t.chat_template  # the count prefixes everything
    with pytest.raises(CpiftError, match="prefix-stable"):
        encode(t, {"prompt": "a", "response": "b"})


def test_truncation_is_counted_and_empty_examples_dropped(tok):
    short = {"prompt": "hi", "response": "ok"}
    long_response = {"prompt": "hi", "response": "x" * 100}
    long_prompt = {"prompt": "p" * 100, "response": "ok"}  # no response left after the cut
    full = encode(tok, short)
    max_length = len(full.input_ids) + 5
    rows, report = encode_all(tok, [short, long_response, long_prompt, short], max_length)
    assert report.examples == 3 == len(rows)
    assert report.truncated == 2  # long_response and long_prompt
    assert report.dropped == 1  # long_prompt
    assert all(len(r.input_ids) <= max_length and len(r.labels) == len(r.input_ids) for r in rows)
    cut = rows[1]
    assert len(cut.input_ids) == max_length
    prompt_len = next(i for i, lab in enumerate(full.labels) if lab != IGNORE)  # same prompt "hi"
    assert tok.decode(labelled(cut)) == "x" * (max_length - prompt_len)  # the response, cut
    assert rows[0] == full and rows[2] == full  # untouched when short enough
    summary = report.summary("t")
    assert "3 examples" in summary and "2 truncated" in summary and "1 dropped" in summary


def test_untruncated_report_is_clean(tok):
    rows, report = encode_all(tok, [{"prompt": "a", "response": "b"}], 256)
    assert (report.examples, report.truncated, report.dropped) == (1, 0, 0)
    assert report.summary("t") == "t: 1 examples"


def test_max_length_checked(tok):
    with pytest.raises(CpiftError, match="max-length"):
        encode_all(tok, [{"prompt": "a", "response": "b"}], 1)


# ------------------------------------------------------------------ loading


def test_load_jsonl_both_formats(tmp_path):
    rows = [
        {"prompt": "a", "response": "b", "extra": 1},
        "",  # blank lines are skipped
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]},
    ]
    out = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert out == [
        {"prompt": "a", "response": "b"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]},
    ]


@pytest.mark.parametrize(
    "rows, line, match",
    [
        ([], None, "no examples"),
        (["", "   "], None, "no examples"),
        ([{"prompt": "a", "response": "b"}, "", '{"prompt": "a", "response": '], 3, "not valid JSON"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "a"}], 2, "missing field 'response'"),
        ([{"response": "b"}], 1, "missing field 'prompt'"),
        ([{"prompt": "a", "response": 3}], 1, "field 'response' must be a string, got int"),
        ([[1, 2]], 1, "JSON object"),
        (
            [{"prompt": "a", "response": "b"}] * 3 + [{"messages": [{"role": "user", "content": "u"}]}],
            4,
            "no assistant turn",
        ),
        ([{"messages": []}], 1, "non-empty list"),
        ([{"messages": [{"role": "user"}]}], 1, r"missing field 'messages\[0\].content'"),
        ([{"prompt": "a\ud800b", "response": "b"}], 1, "field 'prompt' holds an unpaired surrogate"),
    ],
    ids=[
        "empty",
        "blank",
        "bad-json",
        "no-response",
        "no-prompt",
        "not-string",
        "not-object",
        "no-assistant",
        "empty-messages",
        "no-content",
        "lone-surrogate",
    ],
)
def test_bad_data_errors(tmp_path, rows, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CpiftError, match=match) as info:
        load_examples(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert path in msg
    if line is not None:
        assert f"{path}:{line}:" in msg


def test_missing_file(tmp_path):
    with pytest.raises(CpiftError, match="cannot read data file"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_saved_dataset_folder_loads(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(str(tmp_path / "ds")) == rows

    msgs = [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)
    ]
    DatasetDict({"train": Dataset.from_list(msgs)}).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(str(tmp_path / "dd")) == msgs

    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(CpiftError, match="splits"):
        load_examples(str(tmp_path / "notrain"))

    Dataset.from_list([{"prompt": "p", "answer": "a"}]).save_to_disk(str(tmp_path / "badcol"))
    with pytest.raises(CpiftError, match="row 0.*missing field 'response'"):
        load_examples(str(tmp_path / "badcol"))

    (tmp_path / "junk").mkdir()
    with pytest.raises(CpiftError, match="cannot read dataset folder"):
        load_examples(str(tmp_path / "junk"))


# ----------------------------------------------------------------- sampling


def test_sample_balanced_is_seeded_and_balanced():
    per_task = {"a": list(range(100)), "b": list(range(100, 130)), "c": list(range(200, 203))}
    s1 = sample_balanced(per_task, 10, seed=0)
    s2 = sample_balanced(per_task, 10, seed=0)
    s3 = sample_balanced(per_task, 10, seed=1)
    assert s1 == s2
    assert s1 != s3
    assert {k: len(v) for k, v in s1.items()} == {"a": 10, "b": 10, "c": 3}  # c has fewer: all of it
    for name, items in s1.items():
        assert len(set(items)) == len(items)  # without replacement
        assert set(items) <= set(per_task[name])
    assert sorted(s1["c"]) == per_task["c"]
    assert s1["a"] != list(range(10))  # shuffled, not the head
    assert per_task["a"] == list(range(100))  # input untouched


# ----------------------------------------------------------------- collator


def test_collator_pads_right_with_ignored_labels():
    c = Collator(pad_id=0)
    batch = c([Encoded([5, 6, 7], [IGNORE, 6, 7]), {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


# ------------------------------------------------- bytes, huge lines, dataset splits


def test_non_utf8_and_oversized_lines_name_file_and_line(tmp_path, monkeypatch):
    from cpift_merge.training import data

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(CpiftError, match=r"d.jsonl:2: not UTF-8 text \(byte 16 of the line\)"):
        load_examples(str(path))
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 64)
    write_jsonl(path, [{"prompt": "a", "response": "b"}, {"prompt": "x" * 100, "response": "b"}])
    with pytest.raises(CpiftError, match=r"d.jsonl:2: line of 132 bytes; one example may take at most 64"):
        load_examples(str(path))


def test_a_huge_example_is_cut_before_tokenizing_with_the_same_tokens(tok, plain_tok):
    for t in (tok, plain_tok):
        long = {"prompt": "p" * 20, "response": "r" * 9000}
        got, rep = encode_all(t, [long], 64)
        full = encode(t, long)  # tokenized whole: what the cut must not change
        assert got[0].input_ids == full.input_ids[:64] and got[0].labels == full.labels[:64]
        assert rep.truncated == 1
    msgs = {"messages": [{"role": "user", "content": "u" * 9000}, {"role": "assistant", "content": "a"}]}
    got, rep = encode_all(tok, [msgs], 64)
    assert got == [] and rep.dropped == 1  # the prompt fills max_length either way


def test_a_huge_line_keeps_memory_bounded(tmp_path):
    """A 15 MB prompt with --max-length 64: the tokenizer sees 4 KB of it, so the
    process stays near its import size (tokenizing it whole took GBs)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 3_000_000, "response": "ok"}) + "\n")
    code = (
        f"import resource, sys; sys.path.insert(0, {here!r})\n"
        "from conftest import tiny_tokenizer\n"
        "from cpift_merge.training.data import encode_all, load_examples\n"
        f"rows, rep = encode_all(tiny_tokenizer(), load_examples({str(path)!r}), 64)\n"
        "assert rep.truncated == 1, rep\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    peak_mb = int(res.stdout.split()[-1]) / 1024
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"


def test_dataset_dict_splits_by_role_and_by_name(tmp_path):
    from datasets import Dataset, DatasetDict

    from cpift_merge.training.data import split_of

    train = [{"prompt": f"t{i}", "response": "r"} for i in range(4)]
    test = [{"prompt": f"e{i}", "response": "r"} for i in range(2)]
    dd = str(tmp_path / "dd")
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(dd)
    assert load_examples(dd) == train and load_examples(dd, role="test") == test
    assert load_examples(dd + ":test") == test and load_examples(dd + ":train", role="test") == train
    assert split_of(dd, "test") == (dd, "test") and split_of(dd + ":train", "test") == (dd, "train")
    with pytest.raises(CpiftError, match="not 'dev'"):
        load_examples(dd + ":dev")
    val = str(tmp_path / "val")
    DatasetDict({"train": Dataset.from_list(train), "validation": Dataset.from_list(test)}).save_to_disk(val)
    assert load_examples(val, role="test") == test
    only = str(tmp_path / "only")
    DatasetDict({"train": Dataset.from_list(train)}).save_to_disk(only)
    with pytest.raises(CpiftError, match=r"none of test, validation for testing; name one as .*:SPLIT"):
        load_examples(only, role="test")


# ------------------------------------------------------------- formats and files

FORMAT_ROWS = {
    "prompt/response": {"prompt": "2+2?", "response": "4"},
    "prompt/completion": {"prompt": "2+2?", "completion": "4"},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    "sharegpt": {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    "messages": {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_sft_format_is_detected_and_normalized(fmt, tmp_path):
    from cpift_merge.training.data import load_examples

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(FORMAT_ROWS[fmt]) + "\n")
    seen = []
    (row,) = load_examples(str(path), on_format=seen.append)
    assert seen == [fmt]
    expected = {
        "prompt/response": {"prompt": "2+2?", "response": "4"},
        "prompt/completion": {"prompt": "2+2?", "response": "4"},
        "alpaca": {"prompt": "Add the numbers.\n\n2 and 2", "response": "4"},
        "sharegpt": FORMAT_ROWS["messages"],
        "messages": FORMAT_ROWS["messages"],
    }[fmt]
    assert row == expected


def test_conversational_prompt_completion_and_alpaca_without_input(tmp_path):
    from cpift_merge.training.data import load_examples

    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
        {"instruction": "Say yo.", "input": "", "output": "yo"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_examples(str(path))
    assert a == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert b == {"prompt": "Say yo.", "response": "yo"}


@pytest.mark.parametrize("kind", ["json", "csv", "parquet"])
def test_json_csv_and_parquet_files_are_read_through_datasets(kind, tmp_path):
    import datasets

    from cpift_merge.training.data import load_examples

    rows = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(3)]
    path = tmp_path / f"d.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(path)) if kind == "csv" else ds.to_parquet(str(path))
    got = load_examples(str(path))
    assert got == [{"prompt": f"Echo {i}.", "response": str(i)} for i in range(3)]


def test_no_known_format_names_the_missing_field(tmp_path):
    from cpift_merge.training.data import load_examples

    for row, match in [
        ({"prompt": "a"}, "missing field 'response' (or 'completion') beside 'prompt'"),
        ({"instruction": "a", "input": "b"}, "missing field 'output' beside 'instruction'"),
        ({"question": "a", "answer": "b"}, "missing field 'prompt' (need prompt and response"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "use human, gpt or system"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "must both be strings"),
    ]:
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(CpiftError, match=re.escape(match)):
            load_examples(str(path))


def test_hub_dataset_id_offline_is_one_line(monkeypatch):
    from cpift_merge.training.data import load_examples

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CpiftError, match="cannot read dataset nobody-here/no-such-dataset"):
        load_examples("nobody-here/no-such-dataset")
