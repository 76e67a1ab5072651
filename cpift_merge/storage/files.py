"""Files and folders every layer writes: atomic output folders, file stamps, the cache.

Import-light on purpose (no torch): the merge pre-pass starts from here in a child
process while its parent is still importing mergekit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterable, Iterator

from cpift_merge.errors import CpiftError


def cache_dir() -> str:
    return os.environ.get("CPIFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cpift-merge")


def file_stamps(path: str) -> tuple:
    """(name, size, mtime) of a checkpoint's or region directory's .json and
    .safetensors files (or of one file): a cache key that notices rewrites."""
    if os.path.isfile(path):
        st = os.stat(path)
        return ((path, st.st_size, st.st_mtime_ns),)
    out = []
    for root, _dirs, files in os.walk(path):
        for f in sorted(files):
            if f.endswith((".json", ".safetensors")):
                st = os.stat(os.path.join(root, f))
                out.append((f, st.st_size, st.st_mtime_ns))
    return tuple(out)


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


@contextmanager
def atomic_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only on success.

    Refuses an existing ``out`` unless ``overwrite``. On any error the temporary
    folder is removed and ``out`` is left as it was.
    """
    out = os.path.abspath(out)
    ensure_free(out, overwrite)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get the usual mode
    except OSError as err:
        raise CpiftError(f"cannot write to {parent}: {err.strerror}") from None
    try:
        yield tmp
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
