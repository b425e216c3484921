"""Metrics along a 1-D path: one figure per 1-D `interpolate` result (a line through two
checkpoints, or one random direction around one).

One panel per metric the result holds (loss, error, distillation KL, k-NN accuracy, the
linear-probe accuracies, parameter norm), train and test in two colours; the anchor
checkpoints are dotted lines.
"""

import json

import numpy as np

from figures import style
from figures.labels import anchor_labels, config_dataset, moved
from figures.sources import has, load, pick, save_each

NAME = "interpolate-1d"
ANALYSIS = "interpolate"
NEED = "1-D path (two checkpoints, or one with --directions 1)"
# (metric, y label, factor to the shown unit); split metrics get a train and a test line
PANELS = (
    ("loss", "cross-entropy loss (nats)", 1),
    ("error", "classification error (%)", 100),
    ("distill_kl", "KL(teacher ‖ student) (nats)", 1),
    ("knn_accuracy", "k-NN test accuracy (%)", 100),
    ("linear_accuracy", "linear-probe test accuracy (%)", 100),
    ("linear_adamw_accuracy", "AdamW linear-probe test accuracy (%)", 100),
    ("param_norm", "parameter L2 norm ‖θ‖", 1),
)
SPLIT_COLORS = {"train": style.PALETTE[0], "test": style.PALETTE[3]}
SPLIT_STYLES = {"train": "--", "test": "-"}


def is_path(result) -> bool:
    return tuple(result.point_dims) == ("alpha",)


def anchors(result) -> list[tuple[str, float]]:
    """(label, alpha) of each anchor checkpoint on the path."""
    coords = result.attrs.get("anchor_coords", "{}")
    coords = json.loads(coords) if isinstance(coords, str) else coords
    names = anchor_labels(result, len(coords)) or list(coords)
    return [(name, float(xy[0])) for name, xy in zip(names, coords.values())]


def xlabel(result) -> str:
    if result.attrs.get("geometry") == "directions":
        return r"$\alpha$ (multiples of direction)"
    return r"$\alpha$ along $(1-\alpha)\,\theta_A + \alpha\,\theta_B$"


def draw_panel(ax, result, metric: str, ylabel: str, factor: float) -> None:
    alpha = np.asarray(result.coords["alpha"], dtype=float)
    if "split" in result.specs[metric].dims:
        for split in [str(s) for s in result.coords["split"]]:
            values = pick(result, metric, ("alpha",), split=split) * factor
            ax.plot(alpha, values, SPLIT_STYLES.get(split, "-"), marker="o", ms=2,
                    color=SPLIT_COLORS.get(split), label=split)
    else:
        ax.plot(alpha, pick(result, metric, ("alpha",)) * factor, marker="o", ms=2,
                color=style.PALETTE[2], label="test" if metric.endswith("accuracy") else None)
    ax.set_ylabel(ylabel, fontsize="small")
    ax.set_xlabel(xlabel(result), fontsize="small")


def mark_anchors(ax, result) -> None:
    for name, alpha in anchors(result):
        ax.axvline(alpha, color="grey", lw=0.6, ls=":", zorder=0)
        ax.text(alpha, 1.0, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize="x-small", color="dimgrey")


def build(result):
    """The figure of one 1-D interpolate result (returned unsaved)."""
    chosen = [p for p in PANELS if has(result, p[0])]
    ncols = min(len(chosen), 3)
    nrows = -(-len(chosen) // ncols)
    width = style.FULL if ncols > 1 else style.COLUMN
    fig, axes = style.figure(width=width, height=2.1 * nrows + 0.3, ncols=ncols, nrows=nrows,
                             squeeze=False, layout="constrained")
    flat = axes.ravel()
    for ax, (metric, ylabel, factor) in zip(flat, chosen):
        draw_panel(ax, result, metric, ylabel, factor)
        mark_anchors(ax, result)
    for ax in flat[len(chosen):]:
        ax.set_visible(False)
    flat[0].legend(frameon=False, fontsize="x-small")
    fig.suptitle(f"{config_dataset(result.config)}: {moved(result)}, "
                 f"BN {result.attrs.get('bn_mode', '')}", fontsize="small")
    return fig


def draw(results_dir, out_dir) -> list:
    results = load(results_dir, ANALYSIS, NAME,
                   where=lambda r: is_path(r) and any(has(r, p[0]) for p in PANELS), need=NEED)
    return save_each(results, NAME, build, out_dir)
