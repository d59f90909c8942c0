"""How a study's summary reads (``rargen.demo.ablation.summarise``): the markdown table of
``table.md`` and the curves of ``curves.png``, each metric's label and direction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS = ("heldout_nll", "train_nll", "copy_fraction", "class_accuracy", "frechet_distance")
LOWER_IS_BETTER = {"heldout_nll": True, "train_nll": True, "copy_fraction": True,
                   "class_accuracy": False, "frechet_distance": True}  # fmt: skip
LABELS = {
    "heldout_nll": "held-out NLL (bits/token, raster)",
    "train_nll": "training NLL (bits/token, raster)",
    "copy_fraction": "copies among samples",
    "class_accuracy": "class accuracy",
    "frechet_distance": "Fréchet distance (classifier features)",
}


def format_table(summary: dict[str, Any]) -> str:
    """Markdown: one line per (window, budget) and protocol, mean ± std over seeds."""
    metrics = [m for m in METRICS if m in summary["rows"][0]["fixed_budget"]]
    head = ["window", "budget", "protocol", "step", *(LABELS[m] for m in metrics), "NLL gain vs raster (std)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in summary["rows"]:
        for protocol, name in (("fixed_budget", "fixed budget"), ("best_checkpoint", "best by held-out NLL")):
            result = row[protocol]
            step = f"{row['budget']}" if protocol == "fixed_budget" else _cell(result["step"], 0)
            gain = result.get("nll_gain_over_raster_in_std")
            cells = [row["window"], str(row["budget"]), name, step]
            cells += [_cell(result[m], 3) for m in metrics] + ["" if gain is None else f"{gain:+.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: dict[str, float], digits: int) -> str:
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Every metric against the optimizer step, one line per (window, budget), error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m in summary["rows"][0]["curves"]]
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    several_budgets = len({row["budget"] for row in summary["rows"]}) > 1
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for row in summary["rows"]:
            label = row["window"] + (f", {row['budget']} steps" if several_budgets else "")
            points = row["curves"][metric]
            ax.errorbar(row["curve_steps"], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                        marker="o", markersize=3, capsize=3, label=label)  # fmt: skip
        ax.set(xlabel="optimizer step", ylabel=LABELS[metric], title=LABELS[metric])
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    seeds = summary["rows"][0]["seeds"]
    fig.suptitle(f"annealing windows, mean ± std over {seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["LABELS", "LOWER_IS_BETTER", "METRICS", "format_table", "plot_curves"]
