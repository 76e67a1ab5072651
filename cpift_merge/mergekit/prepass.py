"""The global-scope pre-pass of a ``cpi`` merge, cached on disk and per process.

Import-light on purpose (no torch, no mergekit at module level): ``cpift merge`` uses
it to start the pre-pass in a child process (``python -m cpift_merge.mergekit.prepass``) as
soon as it has read the recipe, so the pre-pass runs while the parent is still
importing mergekit, transformers and peft (seconds of single-threaded bytecode). The
child writes the cut to the cache (atomically); :func:`global_prepass` in the parent
waits for it, or computes the cut in-process when no child was started.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from cpift_merge.errors import CpiftError
from cpift_merge.storage.files import cache_dir, file_stamps

if TYPE_CHECKING:  # pragma: no cover
    from cpift_merge.storage.regions import GlobalCut

LOG = logging.getLogger(__name__)
DEFAULT_DENSITY = 0.01
DEFAULT_SCOPE = "global"
# below this many bytes of weights (base + tasks), starting a child interpreter (torch
# import, ~2 s of CPU) costs more than the pre-pass it would run in the background
BACKGROUND_MIN_BYTES = 256 << 20
ERROR_EXIT = 2  # the child's exit status for a CpiftError (its message on stdout)


def global_cache_key(base_path: str, task_paths: Sequence[str], density: float, exclude: str) -> str:
    """Cache key of a global pre-pass: models (paths, sizes, mtimes) and settings."""
    h = hashlib.sha256()
    for p in [base_path, *task_paths]:
        h.update(repr((p, file_stamps(p))).encode())
    h.update(json.dumps([density, exclude]).encode())
    return h.hexdigest()[:24]


def cut_path(key: str) -> str:
    return os.path.join(cache_dir(), "cuts", f"{key}.json")


_PREPASS_LOCK = threading.Lock()
_CUTS: Dict[str, GlobalCut] = {}
_PENDING: Dict[str, Any] = {}  # key -> background pre-pass child (Popen or _Forked)


def _read_cut(path: str) -> Optional[GlobalCut]:
    from cpift_merge.storage.regions import GlobalCut

    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return GlobalCut.from_json(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError):
        LOG.warning("cached pre-pass %s is damaged; recomputing", path)
        return None


def _compute(base_path: str, task_paths: Sequence[str], density: float, exclude: str, progress: bool) -> GlobalCut:
    from cpift_merge.storage.checkpoint import Checkpoint, participating_tensors
    from cpift_merge.storage.regions import GlobalCut

    base = Checkpoint(base_path, label=base_path)
    tasks = {f"t{i}": Checkpoint(p, label=p) for i, p in enumerate(task_paths)}
    tensors = participating_tensors(base, tasks, [exclude] if exclude else [])
    if not tensors:
        raise CpiftError("no floating-point tensors take part; check exclude")
    return GlobalCut.find(base, tasks, tensors, density, progress=progress, totals=True)


def _write_cut(path: str, cut: GlobalCut) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cut.to_json(), fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def global_prepass(
    base_path: str, task_paths: Sequence[str], density: float, exclude: str, progress: bool = True
) -> GlobalCut:
    """Global-scope thresholds of ``task_paths`` against ``base_path`` (two streaming
    passes, no masks), cached on disk as JSON and in memory per process. The kernel
    rebuilds each tensor's cores from its keys with :meth:`GlobalCut.mask`. When
    :func:`start_background` started a child for the same key, its result is used."""
    key = global_cache_key(base_path, task_paths, density, exclude)
    with _PREPASS_LOCK:
        if key in _CUTS:
            return _CUTS[key]
        path = cut_path(key)
        child = _PENDING.pop(key, None)
        if child is not None:
            _await(child)  # raises the child's CpiftError; else the file is there or not
        cut = _read_cut(path)
        if cut is None:
            cut = _compute(base_path, task_paths, density, exclude, progress)
            _write_cut(path, cut)
        _CUTS[key] = cut
        return cut


# ------------------------------------------------------------ background child


def _weights_bytes(paths: Sequence[str]) -> int:
    total = 0
    for p in paths:
        if os.path.isfile(p):
            total += os.path.getsize(p)
            continue
        for root, _dirs, files in os.walk(p):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".safetensors"))
    return total


def _child_command(
    base_path: str, task_paths: Sequence[str], density: float, exclude: str, progress: bool
) -> List[str]:
    cmd = [
        sys.executable,
        "-m",
        "cpift_merge.mergekit.prepass",
        "--parent",
        str(os.getpid()),
        "--base",
        base_path,
        "--density",
        json.dumps(density),
        "--exclude",
        exclude,
    ]
    if not progress:
        cmd.append("--quiet")
    for p in task_paths:
        cmd += ["--task", p]
    return cmd


def _can_fork() -> bool:
    """Whether the pre-pass may run in a fork of this process: Linux, and torch not yet
    imported (so it has started no OpenMP thread pool: a fork after OpenMP was used
    deadlocks in the child's first parallel op). Then this process imports torch (the
    merge needs it anyway) and forks, and the child skips a fresh interpreter's torch
    import (~2 s of CPU). Otherwise the child is a new ``python -m cpift_merge.mergekit.prepass``."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and "torch" not in sys.modules


def start_background(
    base_path: str, task_paths: Sequence[str], density: float, exclude: str, progress: bool = True
) -> Optional[str]:
    """Start the pre-pass of these models in a child process, unless it is cached, already
    under way, or too small to be worth a child. Returns the cache key when a child runs.
    :func:`global_prepass` with the same arguments then waits for it."""
    key = global_cache_key(base_path, task_paths, density, exclude)
    with _PREPASS_LOCK:
        if key in _CUTS or key in _PENDING or os.path.isfile(cut_path(key)):
            return None
        if _weights_bytes([base_path, *task_paths]) < BACKGROUND_MIN_BYTES:
            return None
    try:
        if _can_fork():
            import torch  # noqa: F401  -- before the fork, so the child has it

            child = _Forked(lambda: _child_body(base_path, task_paths, density, exclude, progress))
        else:
            cmd = _child_command(base_path, task_paths, density, exclude, progress)
            # stdout carries the child's one-line error; stderr (progress bars) is shared
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    except OSError as err:
        LOG.warning("cannot start the pre-pass in the background (%s); it runs in-process", err)
        return None
    with _PREPASS_LOCK:
        _PENDING[key] = child
    return key


class _Forked:
    """A forked pre-pass child, with the part of :class:`subprocess.Popen`'s interface
    used here. ``body()`` runs in the child and returns (exit status, message); the
    message comes back through a pipe, as the spawned child's stdout does."""

    def __init__(self, body):
        self.args = ["fork"]
        self.stdout = None
        self.returncode: Optional[int] = None
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                os.close(read)
                code, message = body()
                if message:
                    os.write(write, message.encode("utf-8", "replace"))
            except BaseException:  # noqa: BLE001 -- exit with code 1, the parent computes
                pass
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(write)
        self.pid, self._read = pid, read

    def communicate(self):
        chunks = []
        while self._read is not None:
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                os.close(self._read)
                self._read = None
            chunks.append(chunk)
        self.wait()
        return b"".join(chunks), None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        pause = threading.Event()
        for _ in range(max(1, int(timeout / 0.05))):
            if self.poll() is not None:
                return self.returncode
            pause.wait(0.05)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        if self._read is not None:
            os.close(self._read)
            self._read = None


def _child_body(
    base_path: str,
    task_paths: Sequence[str],
    density: float,
    exclude: str,
    progress: bool,
    parent: Optional[int] = None,
) -> tuple[int, str]:
    """The pre-pass child's work: (exit status, message for the parent)."""
    global _PREPASS_LOCK
    _PREPASS_LOCK = threading.Lock()  # a fork copies the lock in whatever state it was
    _PENDING.clear()
    _watch_parent(os.getppid() if parent is None else parent)
    # a terminate from the parent unwinds normally (no half-written cache file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # the parent's imports come first: they are on the merge's path until it needs the
        # cut, while the pre-pass uses whatever CPU is left (all of it once the parent waits)
        os.nice(10)
    except (OSError, AttributeError):
        pass
    try:
        import torch

        # one torch thread per worker (the passes run their own threads, one per core):
        # OpenMP threads that wait on a busy core make each tensor op many times slower
        torch.set_num_threads(1)
        global_prepass(base_path, task_paths, density, exclude, progress=progress)
    except CpiftError as err:
        return ERROR_EXIT, str(err)
    except KeyboardInterrupt:
        return 130, ""
    except Exception as err:  # noqa: BLE001 -- the parent logs it and computes in-process
        return 1, f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
    return 0, ""


def _await(child: subprocess.Popen) -> None:
    """Wait for a pre-pass child. Its CpiftError is raised here with the same message;
    any other failure (a crash, a kill) only logs: the caller computes in-process."""
    try:
        out, _ = child.communicate()
    except BaseException:
        _stop(child)
        raise
    if child.returncode == 0:
        return
    message = out.decode("utf-8", "replace").strip()
    if child.returncode == ERROR_EXIT and message:
        raise CpiftError(message)
    LOG.warning(
        "background pre-pass failed (exit %s%s); computing it in-process",
        child.returncode,
        f": {message}" if message else "",
    )


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if child.stdout is not None:
        child.stdout.close()
    if isinstance(child, _Forked):
        child.close()


def cancel_background() -> None:
    """Stop every pre-pass child not waited for (the merge failed before it needed one)."""
    with _PREPASS_LOCK:
        children = list(_PENDING.values())
        _PENDING.clear()
    for child in children:
        _stop(child)


atexit.register(cancel_background)


def _watch_parent(parent: int) -> None:
    """Exit when the parent process is gone (killed before it could stop us)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cpift_merge.mergekit.prepass``: compute and cache one global pre-pass."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cpift_merge.mergekit.prepass", description=main.__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--task", action="append", required=True)
    ap.add_argument("--density", required=True, help="as JSON (keeps 1 and 1.0 apart, as the cache key does)")
    ap.add_argument("--exclude", default="")
    ap.add_argument("--parent", type=int, default=None, help="exit when this process is gone")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    code, message = _child_body(
        args.base, args.task, json.loads(args.density), args.exclude, not args.quiet, args.parent
    )
    if message:
        sys.stdout.write(message + "\n")
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the cut is on disk: skip the interpreter's teardown (torch's takes ~0.5 s), which
    # the parent would otherwise wait for
    os._exit(code)
