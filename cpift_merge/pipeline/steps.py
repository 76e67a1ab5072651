"""Fingerprinted, resumable steps of a ``cpift run``.

A step is recorded in ``OUT/.steps/<step>.json`` with a fingerprint of everything it
depends on (settings, data, upstream steps). A rerun reuses a finished step whose
fingerprint matches, resumes an interrupted one, and redoes a step whose inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import click

from cpift_merge.errors import CpiftError
from cpift_merge.storage.files import read_json, write_json

Record = Dict[str, Any]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    if os.path.isdir(path):  # a saved datasets folder
        for root, _d, files in sorted(os.walk(path)):
            for f in sorted(files):
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    else:
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def data_sha(path: str, role: str) -> str:
    """Content hash of a task's data: a JSONL file, or a saved dataset (and the split a
    DatasetDict gives for ``role``, as :func:`cpift_merge.training.data.split_of` picks it).
    A plain file keeps the hash it had before splits existed."""
    from cpift_merge.training.data import split_of

    where, split = split_of(path, role)
    return file_sha(where) if split is None else fingerprint(file_sha(where), split)


def _present(path: str) -> bool:
    """An output is there: it exists and, when it is a saved model folder (it has a
    ``config.json``), it still holds its weights. A run whose weights were deleted to free
    disk then redoes those steps instead of failing later on an empty model folder."""
    if not os.path.isdir(path):
        return os.path.exists(path)
    files = os.listdir(path)
    return "config.json" not in files or any(f.endswith((".safetensors", ".bin")) for f in files)


class Steps:
    """Fingerprinted, resumable steps: ``run(key, fp, outputs, fn)``."""

    def __init__(self, out: str, quiet: bool = False):
        self.out = out
        self.dir = os.path.join(out, ".steps")
        self.quiet = quiet
        self.timings: Dict[str, float] = {}
        os.makedirs(self.dir, exist_ok=True)

    def _marker(self, key: str) -> str:
        return os.path.join(self.dir, key.replace("/", "__") + ".json")

    def _write(self, key: str, rec: Record) -> None:
        write_json(self._marker(key), rec)

    def read(self, key: str) -> Optional[Record]:
        return read_json(self._marker(key))

    def say(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg)

    # paths under OUT are recorded relative to it, so a moved or copied OUT still resumes
    def _rel(self, result: Any) -> Any:
        if isinstance(result, str) and os.path.isabs(result) and result.startswith(self.out + os.sep):
            return {"path_in_out": os.path.relpath(result, self.out)}
        return result

    def _abs(self, result: Any) -> Any:
        if isinstance(result, dict) and set(result) == {"path_in_out"}:
            return os.path.join(self.out, result["path_in_out"])
        return result

    def _reused(self, key: str, fp: str, outputs: Sequence[str]) -> Optional[Record]:
        rec = self.read(key)
        if not rec or rec.get("fingerprint") != fp or rec.get("state") != "done":
            return None
        result = self._abs(rec.get("result"))  # a staged run's result: its final model
        paths = [*outputs, *([result] if isinstance(result, str) and result.startswith(self.out + os.sep) else [])]
        return rec if all(map(_present, paths)) else None

    def _begin(self, key: str, fp: str, outputs: Sequence[str], what: str) -> None:
        """Say what happens, remove stale outputs, mark the step running."""
        rec = self.read(key)
        if rec and rec.get("fingerprint") == fp and rec.get("state") != "done":
            self.say(f"[{key}] resuming an interrupted run")
        else:
            if rec and rec.get("fingerprint") == fp:
                self.say(f"[{key}] its outputs are gone (model weights deleted?): redoing it")
            elif rec or any(map(os.path.exists, outputs)):
                self.say(f"[{key}] inputs changed: redoing it")
            for p in outputs:  # ours (under OUT): stale, from other settings
                for q in (p, p + ".work"):
                    if os.path.isdir(q):
                        shutil.rmtree(q)
                    elif os.path.exists(q):
                        os.remove(q)
            self.say(f"[{key}] {what}".rstrip())
        self._write(key, {"fingerprint": fp, "state": "running"})

    def _end(self, key: str, fp: str, t0: float, result: Any) -> None:
        seconds = round(time.time() - t0, 2)
        self.timings[key] = seconds
        self._write(key, {"fingerprint": fp, "state": "done", "seconds": seconds, "result": self._rel(result)})
        self.say(f"[{key}] finished in {seconds:.1f} s")

    def run(
        self,
        key: str,
        fp: str,
        outputs: Sequence[str],
        fn: Callable[[], Any],
        what: str = "",
        everyone: bool = False,
    ) -> Any:
        """Run step ``key`` (or reuse it). Under torchrun / accelerate launch, rank 0 alone
        reads and writes the step records and runs ``fn`` while the other ranks wait, unless
        ``everyone``: a training step, which every rank runs (data-parallel; rank 0 writes)."""
        from cpift_merge.training.distributed import rank_world

        if rank_world()[1] > 1:
            return self._run_ranks(key, fp, outputs, fn, what, everyone)
        rec = self._reused(key, fp, outputs)
        if rec:
            self.say(f"[{key}] done earlier, reused")
            self.timings[key] = rec.get("seconds", 0.0)
            return self._abs(rec.get("result"))
        self._begin(key, fp, outputs, what)
        t0 = time.time()
        result = fn()
        self._end(key, fp, t0, result)
        return result

    def _run_ranks(self, key, fp, outputs, fn, what, everyone) -> Any:
        import torch.distributed as dist

        from cpift_merge.training.distributed import barrier, is_main

        plan: List[Any] = [None]
        if is_main():
            rec = self._reused(key, fp, outputs)
            if rec:
                self.say(f"[{key}] done earlier, reused")
                plan[0] = {"reuse": True, "result": rec.get("result"), "seconds": rec.get("seconds", 0.0)}
            else:
                self._begin(key, fp, outputs, what)
                plan[0] = {"reuse": False}
        barrier()
        dist.broadcast_object_list(plan, src=0)
        if plan[0]["reuse"]:
            self.timings[key] = plan[0]["seconds"]
            return self._abs(plan[0]["result"])
        t0 = time.time()
        if everyone:
            result = fn()
        else:
            box: List[Any] = [None, None]  # rank 0's result (as recorded), or its one-line error
            if is_main():
                try:
                    result = fn()
                    box[0] = self._rel(result)
                except CpiftError as err:
                    box[1] = str(err)
            barrier()
            dist.broadcast_object_list(box, src=0)
            if box[1] is not None:
                raise CpiftError(box[1])
            if not is_main():
                result = self._abs(box[0])
        if is_main():
            self._end(key, fp, t0, result)
        barrier()
        return result
