"""PNG plots of a region directory: the Jaccard heatmap and each task's core share
per layer. matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

import math
import os
import re
from typing import Dict, List

from cpift_merge.storage.regions import RegionSet

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _layers(rs: RegionSet) -> tuple[List[str], Dict[str, str], Dict[str, int]]:
    """Layer labels in order, each tensor's label, each label's entry count. Tensors
    outside numbered layers are ``embed`` (before) and ``head`` (after: final norm, lm_head)."""
    sizes: Dict[str, int] = {}
    order: List[str] = []
    seen_layer = False
    label_of = {}
    for t in rs.meta["tensors"]:
        m = _LAYER.search(t["name"])
        if m:
            label, seen_layer = m.group(1), True
        else:
            label = "head" if seen_layer else "embed"
        if label not in sizes:
            order.append(label)
            sizes[label] = 0
        sizes[label] += math.prod(t["shape"])
        label_of[t["name"]] = label
    return order, label_of, sizes


def layer_shares(rs: RegionSet) -> Dict[str, Dict[str, float]]:
    """task -> {layer label: share of that layer's entries in the task's core}."""
    order, label_of, sizes = _layers(rs)
    out = {}
    for task in rs.tasks:
        counts = {lab: 0 for lab in order}
        for name, c in rs.meta["counts"][task].items():
            counts[label_of[name]] += c
        out[task] = {lab: counts[lab] / sizes[lab] for lab in order}
    return out


def layer_delta_shares(rs: RegionSet) -> Dict[str, Dict[str, float]]:
    """task -> {layer label: share of that layer's ‖Δ‖₂² in the task's core}; empty for
    region files made before these sums were kept."""
    sums = rs.meta.get("delta_sums")
    if not sums:
        return {}
    order, label_of, _sizes = _layers(rs)
    out = {}
    for task in rs.tasks:
        core = {lab: 0.0 for lab in order}
        total = {lab: 0.0 for lab in order}
        for name, (_c1, _t1, c2, t2) in sums[task].items():
            core[label_of[name]] += c2
            total[label_of[name]] += t2
        out[task] = {lab: core[lab] / total[lab] if total[lab] > 0 else 0.0 for lab in order}
    return out


def plot_regions(rs: RegionSet, out_dir: str) -> List[str]:
    """Write ``jaccard.png`` and ``core_share_by_layer.png``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    tasks = rs.tasks
    mat = [[rs.jaccard(a, b) for b in tasks] for a in tasks]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.8 * len(tasks)))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(
                j,
                i,
                f"{mat[i][j]:.3f}",
                ha="center",
                va="center",
                color="white" if mat[i][j] < 0.6 else "black",
                fontsize=8,
            )
    ax.set_title(f"Core Jaccard (density {rs.density:g}, tau {rs.meta['tau']:g})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    heat = os.path.join(out_dir, "jaccard.png")
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    panels = [(layer_shares(rs), "core share of the layer's parameters (%)", "Where each task's core lies")]
    delta = layer_delta_shares(rs)
    if delta:
        panels.append((delta, "core share of the layer's |Δ|₂² (%)", "How much of each task's update its core holds"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 4 * len(panels)), squeeze=False)
    for ax, (shares, ylabel, title) in zip(axes[:, 0], panels):
        for task, by_layer in shares.items():
            labels = list(by_layer)
            ax.plot(range(len(labels)), [100 * v for v in by_layer.values()], marker="o", label=task)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.axhline(100 * rs.density, color="grey", lw=0.8, ls="--", label="density (a random set)")
        ax.legend()
        ax.set_title(title)
    fig.tight_layout()
    share = os.path.join(out_dir, "core_share_by_layer.png")
    fig.savefig(share, dpi=120)
    plt.close(fig)
    return [heat, share]
