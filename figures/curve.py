"""A trained low-loss curve against the straight line (Garipov et al. 2018): one figure per
`curve` result (python -m landscape.curve).

Two panels over t (0: network A, 1: network B): the loss and the classification error along
the trained curve (quadratic Bezier or polygonal chain with one bend) and along the straight
line between the same endpoints, train dashed and test solid; each line's barrier (the
result's own, recomputed from the curve where the file has none) is in the legend. A path
not yet measured is left out with a note.
"""

import json
import re
from pathlib import PurePath

import numpy as np

from figures import style
from figures.labels import anchor_labels, config_dataset
from figures.sources import has, load, pick, save_each
from landscape.barrier import mean_barrier

NAME = "curve"
ANALYSIS = "curve"
NEED = "trained curve against the line (coords path and t)"
KINDS = {"bezier": "Bezier curve", "polychain": "polygonal chain"}
# (metric, its barrier, y label, unit, factor to the unit)
PANELS = (("loss", "loss_barrier_mean", "cross-entropy loss (nats)", "nats", 1),
          ("error", "error_barrier", "classification error (%)", "%", 100))
SPLIT_STYLES = {"train": "--", "test": "-"}
PATH_COLORS = {"curve": style.PALETTE[2], "line": style.PALETTE[7]}
RUN_FOLDER = re.compile(r"\s*\b[a-z]+_[0-9a-f]{8,}\b")  # " train_49838c86": a store folder


def is_curve(result) -> bool:
    return "path" in result.coords and "t" in result.coords


def endpoints(result) -> list[str]:
    """Readable names of A and B: the result's `endpoints` attr (labels), else its refs'
    labels, else "A" and "B"."""
    names = result.attrs.get("endpoints") or result.attrs.get("labels") or []
    names = json.loads(names) if isinstance(names, str) else list(names)
    if len(names) != 2:
        names = anchor_labels(result, 2)
    return [readable(str(n)) for n in names] if len(names) == 2 else ["A", "B"]


def readable(label: str) -> str:
    """A recorded label without the run folders (kind_hash) or paths that runs.refs
    appends to tell apart runs it has no other name for: a reader sees "supervised s0 ep1"
    (A and B then tell the two apart)."""
    words = [PurePath(w).name if "/" in w else w for w in RUN_FOLDER.sub("", label).split()]
    return " ".join(words) or label


def path_name(result, path: str) -> str:
    """'trained Bezier curve', 'straight line' (a path coordinate as a reader knows it)."""
    if path == "line":
        return "straight line"
    kind = str(result.attrs.get("kind", ""))
    return f"trained {KINDS.get(kind, kind or 'curve')}"


def barrier(result, name: str, metric: str, path: str, split: str) -> float:
    """The stored barrier `name` of one path and split (e.g. error_barrier over (path,
    split)); recomputed from the metric along t (landscape.barrier) where not stored."""
    if has(result, name) and set(result.specs[name].dims) == {"path", "split"}:
        return float(pick(result, name, (), path=path, split=split))
    curve = pick(result, metric, ("t",), path=path, split=split)
    return float(mean_barrier(curve, np.asarray(result.coords["t"], float)))


def dataset_of(config: dict) -> str:
    """The dataset measured on, from the config or its `curve`/`train` section ('' when
    the command took it from A's run)."""
    for section in (config, config.get("curve", {}), config.get("train", {})):
        if isinstance(section, dict) and config_dataset(section):
            return config_dataset(section)
    return ""


def title(result, names: list[str], what: str) -> str:
    """'toy: trained curve from supervised s0 to supervised s1, BN recalibrate' (or
    'between two supervised s0 ep1' where both ends read alike)."""
    dataset = dataset_of(result.config)
    ends = f"from {names[0]} to {names[1]}" if names[0] != names[1] else \
        f"between two {names[0]}"
    return (f"{dataset + ': ' if dataset else ''}{what} {ends}, "
            f"BN {result.attrs.get('bn_mode', 'recalibrate')}")


def draw_panel(ax, result, panel) -> None:
    metric, name, ylabel, unit, factor = panel
    t = np.asarray(result.coords["t"], dtype=float)
    for path in [str(p) for p in result.coords["path"]]:
        for split in [str(s) for s in result.coords["split"]]:
            values = pick(result, metric, ("t",), path=path, split=split) * factor
            if not np.isfinite(values).any():
                continue  # not measured yet; the figure notes "N of M cells done"
            height = barrier(result, name, metric, path, split) * factor
            ax.plot(t, values, SPLIT_STYLES.get(split, "-"), marker="o", ms=2,
                    color=PATH_COLORS.get(path), label=f"{path_name(result, path)}, {split}: "
                                                        f"barrier {height:.3g} {unit}")
    ax.set_ylabel(ylabel, fontsize="small")
    ax.set_xlabel(r"$t$ along the path ($0$: A, $1$: B)", fontsize="small")
    ax.legend(frameon=False, fontsize="x-small", loc="upper center",  # below the panel
              bbox_to_anchor=(0.5, -0.22))


def mark_ends(ax, names: list[str]) -> None:
    for t, letter, name in zip((0.0, 1.0), "AB", names):
        ax.axvline(t, color="grey", lw=0.6, ls=":", zorder=0)
        text = name if name == letter else f"{letter}: {name}"
        ax.text(t, 1.0, text, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize="x-small", color="dimgrey")


def build(result):
    """The figure of one curve result (returned unsaved)."""
    chosen = [p for p in PANELS if has(result, p[0])]
    fig, axes = style.figure(width=style.FULL, height=3.2, ncols=len(chosen), squeeze=False,
                             layout="constrained")
    names = endpoints(result)
    for ax, panel in zip(axes[0], chosen):
        draw_panel(ax, result, panel)
        mark_ends(ax, names)
    fig.suptitle(title(result, names, path_name(result, "curve")), fontsize="small")
    return fig


def draw(results_dir, out_dir) -> list:
    results = load(results_dir, ANALYSIS, NAME,
                   where=lambda r: is_curve(r) and any(has(r, p[0]) for p in PANELS),
                   need=NEED)
    return save_each(results, NAME, build, out_dir)
