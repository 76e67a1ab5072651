"""The pipeline's report: Table 1 (tasks x methods, average normalized score), Table 2
(forgetting in sequential fine-tuning), plots; as text for the terminal and as
``report.md``."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

LABELS = {
    "base": "base model",
    "full_sft": "Full SFT (multi-task)",
    "full_sft_matched": "Full SFT, CPI-FT's step count",
    "expert": "Expert (own task, one SFT per task)",
    "multistage_random": "Multi-stage (random)",
    "multistage_heuristic": "Multi-stage (heuristic)",
    "dpi": "DPI (staged, frozen cores)",
    "cpift_merged": "CPI-FT merge, before calibration",
    "cpift": "CPI-FT",
    "task_arithmetic": "Task arithmetic (probes)",
    "ties": "TIES (probes)",
    "localize_stitch": "Localize-and-Stitch (probes)",
}


def _fmt(x: float, signed: bool = False) -> str:
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def table1_rows(results: Dict[str, Any]) -> tuple[List[str], List[List[str]]]:
    tasks = list(results["tasks"])
    header = ["method", *tasks, "avg norm. (0-10)"]
    rows = []
    for m, rec in results["methods"].items():
        label = LABELS.get(m, m)
        if m == "multistage_random" and rec.get("groups"):
            label += f", K={len(rec['groups'])}"
        rows.append([label, *[_fmt(rec["scores"][t]["score"]) for t in tasks], f"{rec['avg_normalized']:.2f}"])
    gap = results.get("seesaw_gap")
    if gap:
        mean = sum(gap.values()) / len(gap)
        rows.append([GAP_LABEL, *[_fmt(gap[t], True) for t in tasks], f"{mean / 10:+.2f}"])
    return header, rows


GAP_LABEL = "seesaw gap (expert - full SFT)"
EXPERT_TITLE = "Table 4: single-task experts (rows) scored on every task (columns), test accuracy (%)"


def experts_rows(results: Dict[str, Any]) -> tuple[List[str], List[List[str]]]:
    """The expert matrix: the diagonal is each expert on its own task, the rest what
    training on one task does to the others."""
    ex = results.get("experts") or {}
    if not ex:
        return [], []
    tasks = list(results["tasks"])
    rows = [[f"expert {a}", *[_fmt(ex["scores"][a][b]) for b in tasks]] for a in ex["scores"]]
    return ["", *tasks], rows


# Table 2's rows: the papers' two, and with `sequential.transplant` plain SFT followed by
# copying the first task's core values back from the model after it (cpi, omega 0). After
# the frozen run that copy changes nothing: the core already holds those values, bit for bit.
SEQ_VARIANTS = (
    ("plain", "plain SFT (nothing frozen)"),
    ("frozen", "first task's core frozen (DPI)"),
    ("plain_transplant", "plain SFT, then first core transplanted back"),
)


def table2_rows(results: Dict[str, Any]) -> tuple[List[str], List[List[str]]]:
    """Table 2: per direction, the first task's and the second task's change in test
    accuracy (points) and, where measured, in held-out loss (up = worse)."""
    fg = results.get("forgetting") or {}
    if not fg:
        return [], []
    dirs = list(fg)  # "A->B", "B->A"
    losses = all("delta_first_loss" in rec for d in dirs for rec in fg[d].values())
    header = ["sequential"]
    for d in dirs:
        first, second = fg[d]["plain"]["first"], fg[d]["plain"]["second"]
        header += [f"{d}: Δ{first} (forgetting)", f"{d}: Δ{second} (learning)"]
        header += [f"Δloss {first}", f"Δloss {second}"] if losses else []
    rows = []
    for variant, label in SEQ_VARIANTS:
        if not all(variant in fg[d] for d in dirs):
            continue
        row = [label]
        for d in dirs:
            rec = fg[d][variant]
            row += [_fmt(rec["delta_first"], True), _fmt(rec["delta_second"], True)]
            row += [f"{rec['delta_first_loss']:+.3f}", f"{rec['delta_second_loss']:+.3f}"] if losses else []
        rows.append(row)
    return header, rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in header]] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def region_report(rs) -> str:
    """Jaccard table, core sizes, how much of each task's update its core holds, and the
    stage order of a region set, as printed by ``cpift regions`` and ``cpift run``; a
    warning line per task whose core barely concentrates its update."""
    from cpift_merge.core.localization import WEAK_L2_RATIO

    tasks = rs.tasks
    local = {a: rs.localization(a) for a in tasks}
    header = ["Jaccard", *tasks, "k"]
    rows = [[a, *[rs.jaccard(a, b) for b in tasks], rs.k(a)] for a in tasks]
    if all(local.values()):
        header += ["core |Δ|₁", "core |Δ|₂²", "x random"]
        for row, a in zip(rows, tasks):
            loc = local[a]
            row += [
                f"{100 * loc['core_share_l1']:.1f}%",
                f"{100 * loc['core_share_l2']:.1f}%",
                f"{loc['l2_ratio']:.1f}",
            ]
    trained = {a: rs.meta["tasks"][a].get("trained_with") for a in tasks}
    if any(trained.values()):
        header.append("probe")
        for row, a in zip(rows, tasks):
            t = trained[a]
            row.append(f"{t['optimizer']} lr {t['lr']:g}" if t and t.get("lr") is not None else "?")
    out = [
        f"core regions: density {rs.density:g}, scope {rs.scope}, score {rs.score}, D = {rs.meta['D']:,}",
        "",
        format_table(header, rows),
        "",
    ]
    for a in tasks:
        loc = local[a]
        if loc and loc["l2_ratio"] < WEAK_L2_RATIO:
            out.append(
                f"warning: cores barely concentrate the update: task {a}'s core holds"
                f" {100 * loc['core_share_l2']:.1f}% of its |Δ|₂², a random set of its size"
                f" {100 * loc['random_share']:.1f}% ({loc['l2_ratio']:.1f}x, below {WEAK_L2_RATIO:g}x): freezing"
                " or transplanting it is close to freezing or transplanting a random subset"
                + (
                    " (an SGD probe with the fisher score located the task far better here: README,"
                    " 'Isolation options')"
                    if (trained[a] or {}).get("optimizer") == "adamw"
                    else ""
                )
            )
    if any(line.startswith("warning") for line in out):
        out.append("")
    out.append(f"groups (tau {rs.meta['tau']:g}, order {rs.meta['order']}, seed {rs.meta['seed']}), in stage order:")
    out += [f"  stage {i + 1}: {', '.join(g)}" for i, g in enumerate(rs.groups)]
    return "\n".join(out)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


GRAFT_TITLE = "Table 3: graft test, share of each probe's gain kept (held-out loss / metric)"
GRAFT_COLUMNS = (
    ("core-core", "core only"),
    ("core-random", "random only"),
    ("rest-core", "core removed"),
    ("rest-random", "random removed"),
)


def table3_rows(results: Dict[str, Any]) -> tuple[List[str], List[List[str]]]:
    """The graft test: per task, the share of its probe's held-out-loss gain that each
    graft keeps (and of its metric gain, after the slash)."""
    graft = results.get("graft") or {}
    if not graft:
        return [], []

    def pct(x) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    header = ["task", "probe: loss gain", *[label for _key, label in GRAFT_COLUMNS]]
    rows = []
    for task, rec in graft.items():
        gain = rec["base"]["loss"] - rec["probe"]["loss"]
        cells = [f"{pct(rec[key]['kept_loss'])} / {pct(rec[key]['kept_score'])}" for key, _label in GRAFT_COLUMNS]
        rows.append([task, f"{gain:+.3f}", *cells])
    return header, rows


def summary_text(results: Dict[str, Any]) -> str:
    h, r = table1_rows(results)
    out = ["Table 1: test accuracy (%) per task; average normalized score on a 0-10 scale", "", format_table(h, r)]
    h2, r2 = table2_rows(results)
    if h2:
        out += ["", "Table 2: sequential fine-tuning, change in test accuracy (points)", "", format_table(h2, r2)]
    h3, r3 = table3_rows(results)
    if h3:
        out += ["", GRAFT_TITLE, "", format_table(h3, r3)]
    h4, r4 = experts_rows(results)
    if h4:
        out += ["", EXPERT_TITLE, "", format_table(h4, r4)]
    return "\n".join(out)


def plot_scores(results: Dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    methods = list(results["methods"])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(tasks), 4))
    for i, m in enumerate(methods):
        vals = [results["methods"][m]["scores"][t]["score"] for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=LABELS.get(m, m))
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: str, results: Dict[str, Any]) -> str:
    """Write ``results.json``, ``report.md`` and ``plots/scores.png`` under ``out`` (atomically each)."""
    import json

    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    plot_scores(results, os.path.join(plots, "scores.png"))
    for name in ("jaccard.png", "core_share_by_layer.png"):
        src = os.path.join(out, "regions", name)
        if os.path.isfile(src):
            import shutil

            shutil.copy(src, os.path.join(plots, name))
    h, r = table1_rows(results)
    lines = [
        "# CPI-FT pipeline report",
        "",
        f"Base model: `{results['base']}`; seed {results['seed']}; device {results['device']};"
        f" this run {results['seconds']:.0f} s, all steps {results.get('compute_seconds', 0):.0f} s.",
        "",
        "## Table 1: test accuracy (%) per task",
        "",
        "The last column averages the task scores on a 0-10 scale (each score / 10).",
        "",
        md_table(h, r),
        "",
    ]
    if results.get("groups"):
        order = " → ".join("{" + ", ".join(g) + "}" for g in results["groups"])
        lines += [f"Stage groups from the core regions (Jaccard ≥ tau), in order: {order}.", ""]
    if results.get("jaccard"):
        tasks = list(results["jaccard"])
        jr = [[a, *[f"{results['jaccard'][a][b]:.3f}" for b in tasks]] for a in tasks]
        lines += ["Core-region Jaccard similarity:", "", md_table(["", *tasks], jr), ""]
    h2, r2 = table2_rows(results)
    if h2:
        lines += [
            "## Table 2: forgetting in sequential fine-tuning",
            "",
            "Change in test accuracy (points) after training the second task, relative to the model"
            " trained on the first task only.",
            "",
            md_table(h2, r2),
            "",
        ]
    h3, r3 = table3_rows(results)
    if h3:
        lines += [
            "## Table 3: graft test",
            "",
            GRAFT_TITLE + ". The papers' premise predicts core only near 100% and core removed near 0%;"
            " the random columns use a mask with the core's entry count in every tensor.",
            "",
            md_table(h3, r3),
            "",
        ]
    h4, r4 = experts_rows(results)
    if h4:
        lines += ["## Table 4: single-task experts", "", EXPERT_TITLE + ".", "", md_table(h4, r4), ""]
    matched = results.get("full_sft_matched")
    if matched:
        lines += [
            f"Full SFT at CPI-FT's step count: {matched['steps']} optimizer steps, {matched['examples']} examples"
            f" (CPI-FT: {matched['cpift_steps']} steps, {matched['cpift_examples']} examples over its stages and"
            " calibration).",
            "",
        ]
    lines += ["## Plots", "", "![scores](plots/scores.png)", ""]
    if os.path.isfile(os.path.join(plots, "jaccard.png")):
        lines += ["![jaccard](plots/jaccard.png)", "", "![core share by layer](plots/core_share_by_layer.png)", ""]
    lines += ["## Settings", "", "```json", json.dumps(results["settings"], indent=1), "```", ""]
    from cpift_merge.storage.files import write_json, write_text

    write_json(os.path.join(out, "results.json"), results)
    return write_text(os.path.join(out, "report.md"), "\n".join(lines))
