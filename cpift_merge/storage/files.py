"""Files and folders every layer writes: atomic output folders, file stamps, the cache.

Import-light on purpose (no torch): the merge pre-pass starts from here in a child
process while its parent is still importing mergekit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List

from cpift_merge.errors import CpiftError


def cache_dir() -> str:
    """Where converted models and merge pre-pass cuts are kept: ``$CPIFT_CACHE``, else
    ``$HF_HOME/cpift-merge`` (beside the Hugging Face cache, when it was moved), else
    ``$XDG_CACHE_HOME/cpift-merge``, else ``~/.cache/cpift-merge``."""
    env = os.environ
    if env.get("CPIFT_CACHE"):
        return os.path.expanduser(env["CPIFT_CACHE"])
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        if env.get(var):
            return os.path.join(os.path.expanduser(env[var]), "cpift-merge")
    return os.path.join(os.path.expanduser("~"), ".cache", "cpift-merge")


def file_stamps(path: str) -> tuple:
    """(name, size, mtime) of a checkpoint's or region directory's .json,
    .safetensors and .bin files (or of one file): a cache key that notices rewrites."""
    if os.path.isfile(path):
        st = os.stat(path)
        return ((path, st.st_size, st.st_mtime_ns),)
    out = []
    for root, _dirs, files in os.walk(path):
        for f in sorted(files):
            if f.endswith((".json", ".safetensors", ".bin")):
                st = os.stat(os.path.join(root, f))
                out.append((f, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_json(path: str) -> Any:
    """The JSON in ``path``, or None when it is missing, unreadable or cut short (a
    record or marker a killed run may have left half-written)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a ``.tmp`` sibling renamed at the end, so a
    reader never sees half a file (its folder is made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)
    return path


def write_json(path: str, data: Any) -> str:
    """:func:`write_text` of ``data`` as indented JSON (what :func:`read_json` reads)."""
    return write_text(path, json.dumps(data, indent=1))


def ensure_free(out: str, overwrite: bool = False) -> None:
    """Refuse an existing output early, before any expensive work."""
    if os.path.exists(out) and not overwrite:
        raise CpiftError(f"output {os.path.abspath(out)} already exists; pass --overwrite or choose another path")


def ensure_apart(out: str, inputs: Iterable[str]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs: writing
    (or with overwrite, replacing) it would destroy or alter that input."""
    target = os.path.realpath(os.path.expanduser(out))
    for path in inputs:
        if not path or not os.path.exists(os.path.expanduser(path)):
            continue  # not a local input (a hub id, an adapter's label)
        src = os.path.realpath(os.path.expanduser(path))
        if target == src or src.startswith(target + os.sep) or target.startswith(src + os.sep):
            raise CpiftError(f"output {out} overlaps the input {path}; choose an output outside every input")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(out: str) -> List[str]:
    """Remove the temporaries a killed :func:`atomic_dir` left beside ``out``: siblings
    named ``.NAME.tmp-PID-*`` or ``.NAME.old-PID-*`` whose process is gone. Nothing
    else is touched (not another name, not a live process's folder)."""
    parent, name = os.path.split(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(\d+)-[^/]*")
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry)
        path = os.path.join(parent, entry)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _usual_modes(root: str) -> None:
    """Files 0666 and folders 0777 less the umask, as open() and mkdir() would make
    them: tempfile (and libraries that write through it) make 0600/0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o666 & ~umask)


@contextmanager
def atomic_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only on success.

    Refuses an existing ``out`` unless ``overwrite``. On any error the temporary
    folder is removed and ``out`` is left as it was. Temporaries that a killed run
    left beside ``out`` are removed first (:func:`clean_stale_temporaries`); what is
    written gets the usual file modes.
    """
    out = os.path.abspath(out)
    ensure_free(out, overwrite)
    parent = os.path.dirname(out)
    stem = f".{os.path.basename(out)}"
    try:
        os.makedirs(parent, exist_ok=True)
        clean_stale_temporaries(out)
        tmp = tempfile.mkdtemp(prefix=f"{stem}.tmp-{os.getpid()}-", dir=parent)
    except OSError as err:
        raise CpiftError(f"cannot write to {parent}: {err.strerror}") from None
    try:
        yield tmp
        _usual_modes(tmp)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f"{stem}.old-{os.getpid()}-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
