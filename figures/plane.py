"""Loss-landscape planes (paper Fig. 5): one figure per 2-D `interpolate` result.

Panels, as far as the result holds them: the distillation KL to the teacher on the train
split (or, for a supervised plane, the train loss) on a log colour scale, with contour lines
and the parameter-norm contours (dashed) over it; the test error; the k-NN and linear-probe
accuracies (the paper's planes plot the linear probe: `--metrics linear`, or `linear-adamw`
for the paper's AdamW probe). The anchor checkpoints (A, B, C, or the centre of random
directions) are marked and named.
"""

import json

import numpy as np
from matplotlib import colors, patheffects, ticker

from figures import style
from figures.labels import anchor_labels, config_dataset, moved
from figures.sources import has, load, pick, save_each

NAME = "plane"
ANALYSIS = "interpolate"
NEED = "2-D plane (three checkpoints, or one with --directions 2)"
CMAP = "viridis"
LEVELS = 16  # filled contour levels per panel
# (metric, split, title, colour-bar label, log colour scale, factor to the shown unit)
PANELS = (
    ("distill_kl", "train", "distillation loss", "KL(teacher ‖ student), train (nats)", True, 1),
    ("loss", "train", "supervised loss", "cross-entropy, train (nats)", True, 1),
    ("error", "test", "test error", "test error (%)", False, 100),
    ("knn_accuracy", None, "k-NN probe", "k-NN test accuracy (%)", False, 100),
    ("linear_accuracy", None, "linear probe", "linear-probe test accuracy (%)", False, 100),
    ("linear_adamw_accuracy", None, "linear probe (AdamW)", "AdamW linear-probe test accuracy "
     "(%)", False, 100),
)
NORM = ("param_norm", None, "parameter norm", "parameter L2 norm ‖θ‖", False, 1)


def is_plane(result) -> bool:
    return tuple(result.point_dims) == ("alpha", "beta")


def panels(result) -> list[tuple]:
    """The panels this result can fill; the norm gets its own only when it is all there is."""
    found = [p for p in PANELS if has(result, p[0])]
    return found or ([NORM] if has(result, NORM[0]) else [])


def axis_labels(result) -> tuple[str, str]:
    """Coordinates with their unit: multiples of a direction, or of |B - A|."""
    kind, basis = result.attrs.get("geometry"), result.attrs.get("plane_basis")
    if kind == "directions":
        return (r"$\alpha$ (multiples of direction 1)", r"$\beta$ (multiples of direction 2)")
    if basis == "orthonormal":
        unit = r"units of $\|\theta_B - \theta_A\|$"
        return (rf"$\alpha$ ({unit})", rf"$\beta$ ({unit}, $\perp$)")
    return (r"$\alpha$ (multiples of $\theta_B - \theta_A$)",
            r"$\beta$ (multiples of $\theta_C - \theta_A$)")


def anchors(result) -> list[tuple[str, float, float]]:
    """(label, alpha, beta) of each anchor checkpoint, named from the config's references."""
    coords = result.attrs.get("anchor_coords", "{}")
    coords = json.loads(coords) if isinstance(coords, str) else coords
    names = anchor_labels(result, len(coords)) or [""] * len(coords)
    out = []
    for (key, xy), name in zip(coords.items(), names):
        tag = "" if key == "center" else f"{key}: "
        out.append((f"{tag}{name}" if name else key, float(xy[0]), float(xy[1])))
    return out


def levels_for(values: np.ndarray, log: bool):
    """(levels, norm). A log scale runs from the 1st percentile of the positive values (so
    one point of exactly 0, the teacher's own KL, does not stretch it over decades of
    nothing; lower values take the `under` colour) to the maximum."""
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if log and (finite > 0).any():
        low = max(np.percentile(finite[finite > 0], 1), high * 1e-6)
        if high <= low * 1.001:
            low, high = low / 1.5, high * 1.5
        return np.geomspace(low, high, LEVELS + 1), colors.LogNorm(low, high)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return ticker.MaxNLocator(LEVELS).tick_values(low, high), None


def field(result, metric: str, split) -> np.ndarray:
    """A metric over (beta, alpha): rows are beta, as contourf wants."""
    return pick(result, metric, ("beta", "alpha"), **({"split": split} if split else {}))


def draw_panel(fig, ax, result, panel) -> None:
    metric, split, title, label, log, factor = panel
    alpha, beta = result.coords["alpha"], result.coords["beta"]
    values = field(result, metric, split) * factor
    levels, norm = levels_for(values, log)
    if norm is not None:  # below the scale (0 included): the `under` colour, not a hole
        values = np.clip(values, levels[0] / 2, None)
    shown = np.ma.masked_invalid(values)  # cells not yet computed stay blank
    filled = ax.contourf(alpha, beta, shown, levels=levels, norm=norm, cmap=CMAP,
                         extend="min" if norm is not None else "neither")
    ax.contour(alpha, beta, shown, levels=levels[::2], colors="black", linewidths=0.3,
               alpha=0.6)
    bar = fig.colorbar(filled, ax=ax, pad=0.02)
    bar.set_label(label, fontsize="x-small")
    bar.ax.tick_params(labelsize="x-small")
    if norm is not None:  # every 4th level, geometric, two significant digits
        bar.set_ticks(levels[::4], labels=[f"{v:.2g}" for v in levels[::4]])
        bar.minorticks_off()
    ax.set_title(title, fontsize="small")


def draw_norm(ax, result) -> None:
    """Dashed white contours of the parameter norm, labelled with their values."""
    alpha, beta = result.coords["alpha"], result.coords["beta"]
    norm = np.ma.masked_invalid(field(result, "param_norm", None))
    lines = ax.contour(alpha, beta, norm, levels=5, colors="white", linestyles="--",
                       linewidths=0.7)
    ax.clabel(lines, fmt="%.3g", fontsize=5)


def mark_anchors(ax, result) -> None:
    outline = [patheffects.withStroke(linewidth=2, foreground="white")]
    for label, x, y in anchors(result):
        ax.plot(x, y, marker="o", ms=4, mfc="white", mec="black", mew=0.8, ls="none",
                zorder=5, clip_on=False)
        ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points",
                    fontsize="x-small", path_effects=outline, zorder=6)


def build(result):
    """The figure of one 2-D interpolate result (returned unsaved)."""
    chosen = panels(result)
    width = style.FULL if len(chosen) > 1 else style.COLUMN
    # square panels: a panel's width less its colour bar and labels, plus the titles
    height = 0.6 * width / len(chosen) + 0.55
    fig, axes = style.figure(width=width, height=height, ncols=len(chosen), squeeze=False,
                             layout="constrained")
    xlabel, ylabel = axis_labels(result)
    for ax, panel in zip(axes[0], chosen):
        draw_panel(fig, ax, result, panel)
        mark_anchors(ax, result)
        ax.set_xlabel(xlabel, fontsize="x-small")
        ax.set_ylabel(ylabel, fontsize="x-small")
        if result.attrs.get("geometry") == "directions" or \
                result.attrs.get("plane_basis") == "orthonormal":
            ax.set_aspect("equal")  # distances and angles are kept: show them so
        else:
            ax.set_box_aspect(1)
    if has(result, "param_norm") and chosen[0] is not NORM:
        draw_norm(axes[0][0], result)
        axes[0][0].set_title(f"{chosen[0][2]} (dashed: ‖θ‖)", fontsize="small")
    config = result.config
    fig.suptitle(f"{config_dataset(config)}: {moved(result)}, "
                 f"BN {result.attrs.get('bn_mode', '')}", fontsize="small")
    return fig


def draw(results_dir, out_dir) -> list:
    results = load(results_dir, ANALYSIS, NAME, where=lambda r: is_plane(r) and panels(r),
                   need=NEED)
    return save_each(results, NAME, build, out_dir)
