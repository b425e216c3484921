"""Linear mode connectivity (paper Fig. 9): one figure per `border` result.

Test error along the linear path between two SGD children of the same start point, one
panel per start point (one colour each when there are many): every pair of children as a
thin line, their mean in bold. This figure owns explicit start lists (e.g. `random` against
one student); scans along a distillation run, alphas or rewind steps are the `border`
figure's. A start point not yet done is left blank with a note.
"""

import numpy as np
from matplotlib import colormaps

from figures import honest, style
from figures.border_barriers import is_scan
from figures.labels import start_names
from figures.sources import load, pick, save_each

NAME = "lmc"
ANALYSIS = "border"
MAX_PANELS = 8  # more start points than this share one panel, a colour each
NEED = "explicit start list (e.g. random vs student, not a scan)"
XLABEL = r"$\alpha$ between children ($\theta_i \to \theta_j$)"


def curves(result, start: str, split: str) -> np.ndarray:
    """(pair, alpha) error in % of one start point."""
    return pick(result, "error", ("pair", "alpha"), start=start, split=split) * 100


def draw_start(ax, alpha, values, color, label=None, thin: float = 0.35) -> None:
    if not np.isfinite(values).any():  # not done yet: say so, draw nothing
        ax.text(0.5, 0.5, "not done yet", transform=ax.transAxes, ha="center",
                fontsize="x-small", color="firebrick")
        return
    for row in values:
        ax.plot(alpha, row, color=color, lw=0.6, alpha=thin)
    ax.plot(alpha, honest.nanmean(values, 0), color=color, lw=2, label=label)


def build(result, split: str = "test"):
    """The figure of one border result (returned unsaved)."""
    starts = [str(s) for s in result.coords["start"]]
    names, _ = start_names(result)
    alpha = np.asarray(result.coords["alpha"], dtype=float)
    if len(starts) > MAX_PANELS:
        fig, ax = style.figure(width=style.COLUMN, height=2.4, layout="constrained")
        palette = colormaps["viridis"](np.linspace(0, 0.9, len(starts)))  # in order
        for start, name, color in zip(starts, names, palette):
            draw_start(ax, alpha, curves(result, start, split), color, name, thin=0.15)
        ax.set_xlabel(XLABEL, fontsize="small")
        ax.set_ylabel(f"{split} error (%)", fontsize="small")
        ax.legend(frameon=False, fontsize="xx-small", ncol=2)
        return fig
    ncols = min(len(starts), 4)
    nrows = -(-len(starts) // ncols)
    fig, axes = style.figure(width=style.FULL if ncols > 1 else style.COLUMN,
                             height=1.9 * nrows + 0.2, ncols=ncols, nrows=nrows,
                             sharey=True, squeeze=False, layout="constrained")
    for i, (ax, start, name) in enumerate(zip(axes.ravel(), starts, names)):
        draw_start(ax, alpha, curves(result, start, split), style.PALETTE[i % 10],
                   "mean over pairs")
        ax.set_title(name, fontsize="small")
        ax.set_xlabel(XLABEL, fontsize="x-small")
        ax.set_ylabel(f"{split} error (%)", fontsize="small")
    for ax in axes.ravel()[len(starts):]:
        ax.set_visible(False)
    axes[0][0].legend(frameon=False, fontsize="x-small", handles=axes[0][0].lines[-1:])
    return fig


def draw(results_dir, out_dir) -> list:
    results = load(results_dir, ANALYSIS, NAME, where=lambda r: not is_scan(r), need=NEED)
    return save_each(results, NAME, build, out_dir)
