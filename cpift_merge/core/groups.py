"""Pure math of CPI-FT between tasks: Jaccard overlap of cores, groups, stage order.

Tensors and counts in, lists out: nothing here reads files, knows mergekit or trains.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import torch


def jaccard_from_counts(sizes: Sequence[int], intersections: Sequence[Sequence[int]]) -> List[List[float]]:
    """``|Ci ∩ Cj| / |Ci ∪ Cj|`` from core sizes and pairwise intersection counts.

    Two empty cores have Jaccard 0 (they share nothing), except a core with itself (1).
    """
    n = len(sizes)
    out = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            inter = int(intersections[a][b])
            union = int(sizes[a]) + int(sizes[b]) - inter
            if a == b:
                out[a][b] = 1.0
            else:
                out[a][b] = inter / union if union else 0.0
    return out


def pairwise_intersections(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[n, n]`` int64 counts of ``masks[a] & masks[b]`` (flat bool tensors)."""
    n = len(masks)
    out = torch.zeros((n, n), dtype=torch.int64)
    for a in range(n):
        out[a, a] = int(torch.count_nonzero(masks[a]))
        for b in range(a + 1, n):
            c = int(torch.count_nonzero(masks[a] & masks[b]))
            out[a, b] = out[b, a] = c
    return out


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index of two bool masks of equal shape."""
    inter = int((a & b).sum())
    union = int((a | b).sum())
    return inter / union if union else 0.0


def connected_groups(names: Sequence[str], similarity: Sequence[Sequence[float]], tau: float) -> List[List[str]]:
    """Connected components of the graph linking tasks with ``S >= tau``.

    Each group lists its tasks in input order; groups come in order of their first
    task.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            if similarity[a][b] >= tau:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: Dict[int, List[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(find(i), []).append(name)
    return list(groups.values())


def order_groups(
    groups: Sequence[Sequence[str]],
    order: str = "random",
    seed: int = 0,
    given: Optional[Sequence[str]] = None,
) -> List[List[str]]:
    """Stage order of the groups.

    ``random``: a seeded shuffle (the papers' default). ``given``: groups sorted by the
    position of their earliest task in ``given``, which must name every task once.
    """
    groups = [list(g) for g in groups]
    if order == "random":
        random.Random(seed).shuffle(groups)
        return groups
    if order == "given":
        tasks = [t for g in groups for t in g]
        if given is None or sorted(given) != sorted(tasks) or len(set(given)) != len(given):
            raise ValueError(f"order 'given' needs every task exactly once, got {list(given or [])} for tasks {tasks}")
        pos = {t: i for i, t in enumerate(given)}
        for g in groups:
            g.sort(key=pos.__getitem__)
        groups.sort(key=lambda g: pos[g[0]])
        return groups
    raise ValueError(f"order must be 'random' or 'given', got {order!r}")
