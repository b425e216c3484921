"""The border of linear basins (paper Sec. 6): one figure per `border` result.

The test error barrier between SGD children of each start point, in the order the scan
recorded them (a distillation trajectory, students at several alphas, or supervised rewind
steps): every pair of children as a dot, their mean with a 95 % t-interval (min-max where
2 pairs) clipped at 0 as error bars. A scan made with `--align METHOD` (root attr `align`,
metrics `<barrier>_aligned`) also draws the barriers between the children aligned
child-to-child before interpolating, beside the plain ones: same colour, hollow markers and
dashed error bars, its pairs as hollow dots just right of it.
This figure owns the scans (two or more start points of one kind: `--from-distill`,
`--alpha-runs`, `--rewind-steps`, with or without `random` beside them); explicit start
lists (e.g. `random` against one student) are the `lmc` figure's.
"""

import numpy as np

from figures import honest, style
from figures.labels import parse, start_names, start_refs
from figures.sources import load, pick, save_each

NAME = "border"
ANALYSIS = "border"
NEED = "scan (start points along a distillation run, alphas or rewind steps)"
# barrier: (what, unit, factor to the unit, upper bound in that unit); every barrier is a
# maximum over a path that holds its endpoints, so none is below 0
BARRIERS = {"error_barrier": ("error barrier", "%", 100, 100),
            "loss_barrier_mean": ("loss barrier", "nats", 1, None),
            "loss_barrier_linear": ("loss barrier over the chord", "nats", 1, None)}


def is_scan(result) -> bool:
    """Two or more non-random start points of one kind that walk along something: the steps
    of one run (--from-distill, --rewind-steps) or students at several alphas
    (--alpha-runs). Students of several seeds at their last step (random vs students) are
    an explicit list, the `lmc` figure's."""
    labels = [ref for ref in start_refs(result)[0] if ref != "random"]
    kinds = {parse(label)["kind"] for label in labels}
    if len(labels) < 2 or len(kinds) != 1 or not kinds <= {"distill", "train"}:
        return False
    one_run = len({parse(label)["source"] for label in labels}) == 1
    alphas = {float(a) for a in np.asarray(result.metrics.get("start_alpha", []), float)
              if np.isfinite(a)}
    return one_run or len(alphas) > 1


def summary(pairs: np.ndarray, high: float = None) -> tuple[np.ndarray, ...]:
    """(mean, low, high) per start point over its pairs of children (start, pair): the
    95 % t-interval from 3 pairs on, min-max with 2, clipped to [0, high]."""
    return honest.spread(pairs, 0.0, high)


ALIGNED = "_aligned"  # suffix of the metrics of children aligned before interpolating


def aligned(result, barrier: str) -> str:
    """The alignment method (e.g. "weights") when the result holds `barrier`_aligned, else
    "" (a scan made without --align draws as before)."""
    if barrier + ALIGNED not in result.metrics:
        return ""
    return str(result.attrs.get("align", "")) or "aligned"


def build(result, barrier: str = "error_barrier", split: str = "test"):
    """The figure of one border result (returned unsaved)."""
    what, unit, factor, bound = BARRIERS[barrier]
    names, xlabel = start_names(result)
    method = aligned(result, barrier)
    fig, ax = style.figure(width=max(style.COLUMN, (0.8 if method else 0.45) * len(names)
                                     + 1.2), height=2.4, layout="constrained")
    x = np.arange(len(names))
    shift, reach = (0.12, (0.26, 0.1)) if method else (0.0, (0.3, 0.12))  # dots: from mean
    series(ax, x - shift, pick(result, barrier, ("start", "pair"), split=split) * factor,
           bound, side=-1, label="mean, 95 % t-interval over pairs (min-max where 2)",
           reach=reach)
    if method:
        aligned_pairs = pick(result, barrier + ALIGNED, ("start", "pair"), split=split)
        series(ax, x + shift, aligned_pairs * factor, bound, side=1, hollow=True,
               label=f"aligned ({method})", reach=reach)
    ax.axhline(0, color="black", lw=0.5, zorder=1)
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0,
                  ha="right" if len(names) > 4 else "center", fontsize="x-small")
    ax.set_xlabel(xlabel, fontsize="small")
    ax.set_ylabel(f"{split} {what} ({unit})", fontsize="small")
    fig.legend(loc="outside lower center", ncol=2, frameon=False, fontsize="x-small")
    children = result.config.get("border", {}).get("children", "")
    ax.set_title(f"{children} SGD children per start, BN {result.attrs.get('bn_mode', '')}",
                 fontsize="small")
    return fig


def series(ax, x, pairs, bound, side: int, label: str, hollow: bool = False,
           reach=(0.3, 0.12)) -> None:
    """One series at positions x: every pair (start, pair) as a dot on the outer `side` of
    its mean (-1 left, 1 right; `reach`: the farthest and nearest offset), the mean with its
    clipped spread as an error bar; hollow: open markers and dashed bars (the aligned
    series, beside the plain one)."""
    mean, low, high = summary(pairs, bound)
    jitter = side * np.linspace(*reach, pairs.shape[1])  # pair 0 farthest out
    for j, offset in enumerate(jitter):
        ax.scatter(x + offset, pairs[:, j], s=6, alpha=0.6, zorder=2,
                   facecolors="none" if hollow else "grey", edgecolors="grey",
                   lw=0.6 if hollow else 0,
                   label="pair of children" if j == 0 and not hollow else None)
    has_ci = np.isfinite(low) & np.isfinite(high)
    err = np.where(has_ci, [mean - low, high - mean], 0.0)
    color = style.PALETTE[0]
    bars = ax.errorbar(x, mean, yerr=err, fmt="o", ms=4, capsize=3, color=color,
                       mfc="white" if hollow else color, label=label, zorder=3)
    if hollow:
        bars.lines[2][0].set_linestyle("--")


def draw(results_dir, out_dir) -> list:
    results = load(results_dir, ANALYSIS, NAME, where=is_scan, need=NEED)
    return save_each(results, NAME, build, out_dir)
