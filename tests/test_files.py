"""storage/files.py: atomic output folders clean up after killed runs (their own
temporaries only), give outputs the usual modes, and never overlap an input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cpift_merge.errors import CpiftError
from cpift_merge.storage.files import atomic_dir, clean_stale_temporaries, ensure_apart


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_runs_are_removed_and_nothing_else(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".out.tmp-{dead}-abc", tmp_path / f".out.old-{dead}-xyz"]
    kept = [
        tmp_path / f".out.tmp-{os.getppid()}-live",  # a live process's (our parent's)
        tmp_path / f".other.tmp-{dead}-abc",  # another output's
        tmp_path / ".out.tmp-abc",  # not our pattern (no pid)
        tmp_path / "out.tmp-1-x",
    ]
    for d in stale + kept:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    with atomic_dir(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "a.json"), "w").close()
    assert all(not d.exists() for d in stale)
    assert all(d.exists() for d in kept)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.json"]
    assert clean_stale_temporaries(str(tmp_path / "out")) == []


def test_a_failed_write_leaves_nothing_and_the_old_output_intact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").close()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]


def test_ensure_apart(tmp_path):
    model = tmp_path / "models" / "a"
    model.mkdir(parents=True)
    for out in (model, model / "sub", tmp_path / "models", tmp_path):
        with pytest.raises(CpiftError, match="overlaps the input"):
            ensure_apart(str(out), [str(model)])
    ensure_apart(str(tmp_path / "models" / "a-b"), [str(model)])  # a sibling with a longer name is fine
    ensure_apart(str(tmp_path / "x"), ["hub/model-id", ""])  # not local paths: nothing to protect


def test_cache_dir_follows_the_usual_variables(monkeypatch, tmp_path):
    from cpift_merge.storage.files import cache_dir

    for var in ("CPIFT_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "cpift-merge")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "cpift-merge")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_dir() == str(tmp_path / "hf" / "cpift-merge")
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == str(tmp_path / "mine")
