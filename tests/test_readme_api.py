"""The README's "Python API" snippet runs as written (on a tiny model and tiny data)."""

from __future__ import annotations

import json
import os
import re

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_api_snippet_runs(tiny_lm, tmp_path, monkeypatch, capsys):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    for task in ("math", "code"):
        rows = [{"prompt": f"{task} {i}", "response": f"{i}"} for i in range(8)]
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipeline = {
        "base": tiny_lm,
        "out": str(tmp_path / "run"),
        "tasks": [{"name": "math", "builtin": "math"}, {"name": "code", "builtin": "code"}],
        "builtin_data": {"n_train": 8, "n_test": 2},
        "train": {"batch_size": 4, "max_length": 128},
        "methods": ["full_sft"],
        "sequential": {"pair": ["math", "code"]},
        "eval": {"max_new_tokens": 2},
    }
    (tmp_path / "pipeline.yml").write_text(yaml.safe_dump(pipeline))
    # the only edits: the tiny model, a smaller budget
    code = (
        code.replace('"models/base"', repr(tiny_lm))
        .replace("steps=20", "steps=2")
        .replace("batch_size=8", "batch_size=4")
    )
    exec(compile(code, "README Python API", "exec"), {})
    assert os.path.isfile(tmp_path / "dpi" / "train.json")
    assert os.path.isfile(tmp_path / "regions" / "regions.json")
    assert os.path.isfile(tmp_path / "run" / "results.json")
