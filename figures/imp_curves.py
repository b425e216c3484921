"""Lottery tickets (paper Fig. 8): test accuracy vs % of weights remaining, from `imp` results.

One panel per architecture and dataset; one colour per rewind point (init@K as the sweep
was given, "student" for a distilled checkpoint), one line style per branch (the ticket,
random masks, random re-initialisation). Sweeps with the same rewind point are pooled (the
paper aggregates several student checkpoints): the mean over all their seeds with its 95 %
t-interval as a band from 3 seeds on, the min-max range with 2, none with 1, clipped to
[0, 100] %. The x axis is logarithmic and reversed, so sparsity grows to the right. When the
sweeps stored instability (--instability), a second row shows the test error barrier.
Sweeps whose recipes differ (batch size, learning rate, steps, pruning rate, ...: any config
key but the rewind point, seeds and levels) are drawn as separate figures, `imp` for the
first and `imp_KEYVALUE` for the others, each titled by its keys; a sweep still running is
drawn with an "N of M cells done" note.
"""

from collections import defaultdict

import numpy as np
from matplotlib import ticker
from scipy import stats

from figures import honest, style
from figures.labels import config_dataset, parse, ref_label
from figures.sources import has, load

NAME = "imp"
ANALYSIS = "imp"
BRANCH_STYLES = {"ticket": ("-", "o"), "random": ("--", "s"), "reinit": (":", "^")}
BRANCH_NAMES = {"ticket": "", "random": ", random mask", "reinit": ", reinit"}
REWIND_COLORS = [style.PALETTE[i] for i in (0, 2, 3, 4, 5, 6, 8, 9)]
# Config keys that may differ within one figure: the rewind point (one colour each), seeds,
# levels (pooled up to the common ones), branches, and bookkeeping; panels split by model
# and dataset. Any other differing key starts a separate figure.
POOLED_KEYS = ("reference", "rewind_step", "mask_dir", "prunable", "prunable_weights",
               "imp.rewind", "imp.levels", "imp.baselines", "imp.instability", "seeds",
               "train.init", "train.rewind", "train.mask", "train.seed", "train.data_seed",
               "train.save_at", "train.eval_every", "train.model", "train.dataset",
               "train.data_root", "train.width", "shard", "imp.seeds", "imp.curvature",
               "imp.curvature_samples", "imp.curvature_tol", "curvature")


def rewind_label(result) -> str:
    """'student' for a distilled checkpoint, the --rewind text (e.g. 'init@2ep') otherwise."""
    reference = result.config.get("reference", "")
    if reference:
        return "student" if parse(reference)["kind"] == "distill" else ref_label(reference)
    step = result.config.get("rewind_step", 0)
    return str(result.config.get("imp", {}).get("rewind", f"init@{step}"))


def panel_of(result) -> str:
    train = result.config.get("train", {})
    return f"{train.get('model', '')} on {config_dataset(train)}"


def pooled(results, metric: str, split: str = None) -> dict:
    """{branch: (density % (level,), values (level, seeds))} pooled over the results' seeds,
    up to the levels all of them reached."""
    levels = min(len(r.coords["level"]) for r in results)
    out = {}
    for branch in dict.fromkeys(str(b) for r in results for b in r.coords["branch"]):
        density, values = [], []
        for r in results:
            branches = [str(b) for b in r.coords["branch"]]
            if branch not in branches or metric not in r.metrics:
                continue
            b = branches.index(branch)
            density.append(r.metrics["density"][b, :levels])  # (level, seed)
            cell = r.metrics[metric][b, :levels]
            if split is not None:
                cell = cell[..., [str(s) for s in r.coords["split"]].index(split)]
            values.append(cell)
        if values:
            out[branch] = (100 * honest.nanmean(np.concatenate(density, 1), 1),
                           np.concatenate(values, 1))
    return out


def groups(results) -> dict:
    """{panel: {rewind label: [results]}}, rewind points ordered init@K by K, student last."""
    panels = defaultdict(lambda: defaultdict(list))
    key = lambda r: (bool(r.config.get("reference")), r.config.get("rewind_step", 0))  # noqa
    for result in sorted(results, key=key):
        panels[panel_of(result)][rewind_label(result)].append(result)
    return panels


def colors(panels) -> dict:
    labels = list(dict.fromkeys(label for p in panels.values() for label in p))
    others = iter(REWIND_COLORS)
    return {label: style.ROLE_COLORS["student"] if label == "student" else next(others)
            for label in labels}


def mean_ci(values, confidence: float = 0.95):
    """(mean, half-width) over axis 1 ignoring NaN: the two-sided t-interval
    t_{(1+c)/2, n-1} * std(ddof=1) / sqrt(n); NaN half-width where n < 2."""
    count = np.isfinite(values).sum(1)
    mean = np.nanmean(values, 1)
    several = count >= 2
    half = np.full(mean.shape, np.nan)
    sd = np.nanstd(values[several], 1, ddof=1)
    half[several] = stats.t.ppf((1 + confidence) / 2, count[several] - 1) * sd / np.sqrt(
        count[several])
    return mean, half


def draw_series(ax, density, values, color, linestyle, marker, label,
                limits=(None, None)) -> None:
    """Mean over seeds with a band (95 % t-interval from 3 seeds, min-max with 2, clipped to
    `limits`); levels without a finished seed are left out."""
    count = np.isfinite(values).sum(1)
    ok = count > 0
    mean, lower, upper = honest.spread(values[ok], *limits)
    ax.plot(density[ok], mean, ls=linestyle, marker=marker, ms=2.5, color=color,
            label=f"{label} (n={int(count.max())})")
    ax.fill_between(density[ok], lower, upper, color=color, alpha=0.2, lw=0)


def density_axis(ax, density) -> None:
    """Log scale, reversed (sparser to the right), ticks at the levels' densities."""
    ax.set_xscale("log")
    ax.set_xlim(density.max() * 1.08, density.min() / 1.08)
    step = max(1, -(-len(density) // 8))
    ax.xaxis.set_major_locator(ticker.FixedLocator(density[::step]))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("weights remaining (%, log scale)", fontsize="small")


def draw_panel(ax, series: dict, palette: dict, metric: str, split: str = None) -> None:
    factor = 100
    limits = (0, 100) if metric == "test_accuracy" else (-100, 100)  # % either way
    all_density = []
    for label, results in series.items():
        for branch, (density, values) in pooled(results, metric, split).items():
            ls, marker = BRANCH_STYLES.get(branch, ("-.", "d"))
            draw_series(ax, density, factor * values, palette[label], ls, marker,
                        f"{label}{BRANCH_NAMES.get(branch, f', {branch}')}", limits)
            all_density.append(density)
    density_axis(ax, max(all_density, key=len))


def build(results):
    """The figure of every imp result given (returned unsaved)."""
    panels = groups(results)
    palette = colors(panels)
    barriers = any(has(r, "error_barrier") for r in results)
    rows = 2 if barriers else 1
    fig, axes = style.figure(width=style.FULL if len(panels) > 1 else style.COLUMN,
                             height=2.3 * rows + 0.5, ncols=len(panels), nrows=rows,
                             squeeze=False, layout="constrained")
    for col, (title, series) in enumerate(sorted(panels.items())):
        ax = axes[0][col]
        draw_panel(ax, series, palette, "test_accuracy")
        ax.set_ylabel("test accuracy (%)", fontsize="small")
        ax.set_title(title, fontsize="small")
        if barriers:
            ax = axes[1][col]
            draw_panel(ax, {k: [r for r in v if has(r, "error_barrier")]
                            for k, v in series.items()
                            if any(has(r, "error_barrier") for r in v)},
                       palette, "error_barrier", "test")
            ax.set_ylabel("test error barrier (%)", fontsize="small")
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes.ravel()[1:]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(seen.values(), seen.keys(), loc="outside lower center",
               ncol=3 if len(panels) > 1 else 2,
               frameon=False, fontsize="x-small",
               title=honest.SPREAD_LEGEND, title_fontsize="x-small")
    honest.note_incomplete(fig, results)
    return fig


def figures(results) -> list[tuple[str, object]]:
    """[(file name, figure)]: one figure per recipe (see POOLED_KEYS), titled by the keys
    that tell the recipes apart."""
    groups = honest.config_groups(results, POOLED_KEYS)
    out = []
    for i, (values, members) in enumerate(groups):
        fig = build(members)
        if len(groups) > 1:
            fig.suptitle(f"IMP sweeps with {honest.group_name(values)}", fontsize="small")
        out.append((NAME if i == 0 else f"{NAME}_{honest.file_suffix(values)}", fig))
    return out


def draw(results_dir, out_dir) -> list:
    paths = []
    for name, fig in figures(load(results_dir, ANALYSIS, NAME)):
        paths += style.save(fig, out_dir, name)
    return paths
