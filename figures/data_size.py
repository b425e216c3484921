"""Data size and random inputs: the student's probe accuracy against the number of images
it was distilled on, with the noise-input control beside it.

One panel per probed dataset. x: distillation images (the run's `train_images`; log axis),
y: the student's k-NN test accuracy at its last probed epoch (no epoch is chosen on the test
split), mean +- std over seeds, clipped to [0, 100] %. Students distilled on Gaussian noise
are crosses at their sample count; each setting's random teacher is a dashed line (its
mean over seeds and probed epochs). The pipeline's `subsets` key makes the runs (equal
optimisation steps for every size). Runs that differ in any other config key (lr, steps,
temperatures, ...) are refused, naming the keys.
"""

from collections import defaultdict

import numpy as np
from matplotlib import ticker

from figures import honest, style
from figures.distill_curves import lowest_alpha, probed_on, role_index
from figures.sources import load

NAME = "data-size"
ANALYSIS = "distill"
# Fields that tell series apart within a panel (data size and seeds are pooled or on x).
SERIES_FIELDS = ("model", "width", "out_dim")
# Keys that may differ between the runs of one figure (seeds pooled, size on x, inputs and
# their probe data per series; the bookkeeping of when to save and probe).
VARYING_OK = (*SERIES_FIELDS, "seed", "teacher_seed", "subset", "dataset", "data_root",
              "data_options", "probe_dataset", "probe_root", "save_at", "probe_every", "alpha")
OPTIONS = ("store",)


def train_images(result) -> int:
    """Images the student was distilled on (older files: steps per epoch x batch size)."""
    if "train_images" in result.attrs:
        return int(result.attrs["train_images"])
    return int(result.attrs["steps_per_epoch"]) * int(result.config["batch_size"])


def model_accuracy(result, role: str) -> np.ndarray:
    """k-NN accuracy (%) of `role` at the probed epochs >= 1 (epoch 0 where none is)."""
    values = 100 * result.metrics["knn_accuracy"][:, role_index(result, role)]
    epochs = np.asarray(result.coords["epoch"])
    later = values[(epochs >= 1) & np.isfinite(values)]
    return later if later.size else values[np.isfinite(values)]


def last_student(result) -> float:
    """The student's accuracy (%) at its last probed epoch: the run's own end point, not an
    epoch picked by its test accuracy."""
    values = model_accuracy(result, "student")
    return float(values[-1]) if values.size else float("nan")


def series_key(config: dict) -> tuple:
    inputs = "noise inputs" if config["dataset"] == "noise" else "images"
    return (*(str(config.get(k)) for k in SERIES_FIELDS), inputs)


def group(results) -> dict:
    """{panel: {series: {train_images: [results over seeds]}}}."""
    panels = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    honest.refuse_mixed(lowest_alpha(results), VARYING_OK, NAME)
    for res in lowest_alpha(results):  # other alphas: the alpha-locality figure
        panels[probed_on(res.config)][series_key(res.config)][train_images(res)].append(res)
    return panels


def points(by_size: dict):
    """(sizes, mean, std) of the last-epoch student accuracy over seeds, by ascending size."""
    sizes = sorted(by_size)
    stats = [[last_student(r) for r in by_size[n]] for n in sizes]
    return (np.asarray(sizes, float), np.asarray([np.mean(s) for s in stats]),
            np.asarray([np.std(s) for s in stats]))


def teacher_level(by_size: dict) -> float:
    values = [model_accuracy(r, "teacher") for runs in by_size.values() for r in runs]
    return float(np.mean(np.concatenate(values))) if values else float("nan")


def series_label(key: tuple, varying: set) -> str:
    named = dict(zip(SERIES_FIELDS, key))
    extra = [f"{k}={named[k]}" for k in SERIES_FIELDS[1:] if k in varying]
    return ", ".join([named["model"], *extra, key[-1]])


def varying_fields(series) -> set:
    keys = list(series)
    return {k for i, k in enumerate(SERIES_FIELDS) if len({key[i] for key in keys}) > 1}


def draw_panel(ax, series: dict) -> None:
    varying = varying_fields(series)
    colors = {}
    for key in sorted(series, key=lambda k: (k[:-1], k[-1] != "images")):
        color = colors.setdefault(key[:-1], style.PALETTE[len(colors) % len(style.PALETTE)])
        x, mean, std = points(series[key])
        noise = key[-1] == "noise inputs"
        yerr = [mean - np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100) - mean]
        ax.errorbar(x, mean, yerr=yerr, color=color, marker="X" if noise else "o", ms=4,
                    ls="none" if noise else "-", capsize=2,
                    label=f"student ({series_label(key, varying)})")
        if not noise:
            ax.axhline(teacher_level(series[key]), color=color, ls="--", lw=1,
                       label=f"teacher ({series_label(key, varying)})")
    sizes = [n for by_size in series.values() for n in by_size]
    if max(sizes) >= 4 * min(sizes):
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(set(sizes))))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("distillation images (count)")
    ax.set_ylabel("k-NN test accuracy, last epoch (%)")
    ax.legend(frameon=False, fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.3))


def build(results):
    panels = group(results)
    fig, axes = style.figure(width=style.COLUMN * min(len(panels), 2), height=2.6,
                             ncols=len(panels), squeeze=False)
    for ax, (title, series) in zip(axes[0], sorted(panels.items())):
        draw_panel(ax, series)
        ax.set_title(f"k-NN probe on {title}", fontsize="small")
    honest.note_incomplete(fig, results)
    return fig


def draw(results_dir, out_dir, store=None) -> list:
    return style.save(build(load(results_dir, ANALYSIS, NAME, store=store)), out_dir, NAME)
