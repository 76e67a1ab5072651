"""The global-scope pre-pass of a ``cpi`` merge, cached on disk and per process.

Kept free of mergekit imports so that ``cpift merge`` can start it in a background
thread while the main thread is still importing mergekit and transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Dict, Sequence

from cpift_merge.checkpoint import Checkpoint, file_stamps, participating_tensors
from cpift_merge.errors import CpiftError
from cpift_merge.regions import GlobalCut

LOG = logging.getLogger(__name__)
DEFAULT_DENSITY = 0.01
DEFAULT_SCOPE = "global"


def cache_dir() -> str:
    return os.environ.get("CPIFT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "cpift-merge"
    )


def global_cache_key(
    base_path: str, task_paths: Sequence[str], density: float, exclude: str
) -> str:
    """Cache key of a global pre-pass: models (paths, sizes, mtimes) and settings."""
    h = hashlib.sha256()
    for p in [base_path, *task_paths]:
        h.update(repr((p, file_stamps(p))).encode())
    h.update(json.dumps([density, exclude]).encode())
    return h.hexdigest()[:24]


_PREPASS_LOCK = threading.Lock()


_CUTS: Dict[str, GlobalCut] = {}


def global_prepass(
    base_path: str, task_paths: Sequence[str], density: float, exclude: str, progress: bool = True
) -> GlobalCut:
    """Global-scope thresholds of ``task_paths`` against ``base_path`` (two streaming
    passes, no masks), cached on disk as JSON and in memory per process. The kernel
    rebuilds each tensor's cores from its keys with :meth:`GlobalCut.mask`."""
    key = global_cache_key(base_path, task_paths, density, exclude)
    with _PREPASS_LOCK:
        if key in _CUTS:
            return _CUTS[key]
        path = os.path.join(cache_dir(), "cuts", f"{key}.json")
        cut = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    cut = GlobalCut.from_json(json.load(fh))
            except (OSError, ValueError, KeyError, TypeError):
                LOG.warning("cached pre-pass %s is damaged; recomputing", path)
        if cut is None:
            base = Checkpoint(base_path, label=base_path)
            tasks = {f"t{i}": Checkpoint(p, label=p) for i, p in enumerate(task_paths)}
            tensors = participating_tensors(base, tasks, [exclude] if exclude else [])
            if not tensors:
                raise CpiftError("no floating-point tensors take part; check exclude")
            cut = GlobalCut.find(base, tasks, tensors, density, progress=progress)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(cut.to_json(), fh)
            os.replace(tmp, path)
        _CUTS[key] = cut
        return cut
