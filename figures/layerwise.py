"""Which layers hold the barrier: one figure per `layerwise` result (python -m
landscape.layerwise).

One layer (or block) at a time is interpolated from A to B while every other layer is held
at A, or held at B. Two panels, the test error barrier (%) and the loss barrier over the
endpoints' mean (nats), a pair of bars per layer (others held at A, others held at B side by
side), layers top to bottom in network order (the order the result records them). Barriers
are the result's own, recomputed from the curves over alpha (landscape.barrier) where the
file has none; a layer not yet measured is left empty and the figure notes it.
"""

import numpy as np

from figures import style
from figures.curve import endpoints, title
from figures.sources import has, load, pick, save_each
from landscape.barrier import mean_barrier

NAME = "layerwise"
ANALYSIS = "layerwise"
NEED = "layer-wise (coords layer and held)"
# (barrier, the metric it is taken over, x label, factor to the unit)
PANELS = (("error_barrier", "error", "error barrier (%)", 100),
          ("loss_barrier_mean", "loss", "loss barrier (nats)", 1))
HELD_COLORS = {"A": style.PALETTE[0], "B": style.PALETTE[1]}


def is_layerwise(result) -> bool:
    return "layer" in result.coords and "held" in result.coords


def barriers(result, name: str, metric: str, split: str) -> np.ndarray:
    """(layer, held) barrier `name` on `split`: stored over (layer, held, split), else
    recomputed from `metric` along alpha."""
    if has(result, name) and set(result.specs[name].dims) == {"layer", "held", "split"}:
        return pick(result, name, ("layer", "held"), split=split)
    curves = pick(result, metric, ("layer", "held", "alpha"), split=split)
    return mean_barrier(curves, np.asarray(result.coords["alpha"], dtype=float))


def draw_panel(ax, result, panel, split: str, names: list[str], first: bool) -> None:
    name, metric, xlabel, factor = panel
    layers = [str(layer) for layer in result.coords["layer"]]
    held = [str(h) for h in result.coords["held"]]
    values = barriers(result, name, metric, split) * factor  # (layer, held)
    y = np.arange(len(layers))
    height = 0.8 / len(held)
    for h, side in enumerate(held):
        offset = (h - (len(held) - 1) / 2) * height  # side by side within the layer's row
        ax.barh(y + offset, values[:, h], height=height,  # NaN: not done, no bar
                color=HELD_COLORS.get(side, style.PALETTE[2 + h]),
                label=f"others held at {side}" + held_name(side, names))
        for row, value in zip(y + offset, values[:, h]):
            if not np.isfinite(value) or value == 0:  # an empty row says why
                ax.text(0, row, " not done" if not np.isfinite(value) else " 0",
                        va="center", fontsize="xx-small", color="dimgrey")
    ax.axvline(0, color="black", lw=0.5)
    ax.set_yticks(y, layers if first else [], fontsize="x-small")
    ax.set_ylim(len(layers) - 0.5, -0.5)  # the first layer on top
    ax.set_xlabel(f"{split} {xlabel}", fontsize="small")
    ax.set_ylabel(f"{granularity(result)} interpolated (network order)" if first
                  else granularity(result), fontsize="small")


def granularity(result) -> str:
    """'layer' or 'block': what moved at a time."""
    return str(result.attrs.get("granularity", "")) or "layer"


def held_name(side: str, names: list[str]) -> str:
    """' (student s0)': the endpoint a side is, where it has a name beyond its letter."""
    name = dict(zip("AB", names)).get(side, side)
    return "" if name == side else f" ({name})"


def build(result, split: str = "test"):
    """The figure of one layerwise result (returned unsaved)."""
    chosen = [p for p in PANELS if has(result, p[0]) or has(result, p[1])]
    rows = len(result.coords["layer"])
    fig, axes = style.figure(width=style.FULL, height=max(2.2, 0.22 * rows + 1.0),
                             ncols=len(chosen), squeeze=False, layout="constrained")
    names = endpoints(result)
    for i, (ax, panel) in enumerate(zip(axes[0], chosen)):
        draw_panel(ax, result, panel, split, names, first=i == 0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False,
               fontsize="x-small")
    fig.suptitle(title(result, names, f"one {granularity(result)} at a time"),
                 fontsize="small")
    return fig


def draw(results_dir, out_dir) -> list:
    results = load(results_dir, ANALYSIS, NAME,
                   where=lambda r: is_layerwise(r) and any(
                       has(r, name) or has(r, metric) for name, metric, *_ in PANELS),
                   need=NEED)
    return save_each(results, NAME, build, out_dir)
