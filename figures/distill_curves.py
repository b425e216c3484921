"""Probe accuracy of student and teacher over distillation epochs.

One line per distinct setting (model, dataset, alpha, ...; seeds pooled): the student as a
mean with a band of +-1 std over seeds, its teacher dashed in the same colour. Several
alphas are drawn by `alpha-locality` (only the lowest alpha present, the paper's 1e-10,
appears here); a noise-input run gives the random-input control.
Students distilled on a subset of the data (the pipeline's `subsets`, drawn by `data-size`)
appear only where no full-data student does: with equal steps they span many more epochs.
A teacher shared by several lines (the same random network) is drawn once.
"""

from collections import defaultdict

import numpy as np

from figures import honest, style
from figures.labels import dataset_name
from figures.sources import load

NAME = "distill-curves"
ANALYSIS = "distill"
OPTIONS = ("store",)
SEED_FIELDS = ("seed", "teacher_seed")


def setting(config: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in config.items() if k not in SEED_FIELDS))


# Fields worth naming in a legend when they differ between lines of one panel.
LEGEND_FIELDS = ("alpha", "width", "out_dim", "subset", "lr", "teacher_temp", "centering")


def probed_on(config: dict) -> str:
    """The dataset whose test split the k-NN probe used (the panel title)."""
    name = config.get("probe_dataset") or config["dataset"]
    root = config.get("probe_root") or config.get("data_root") or ""
    return dataset_name(name, root)


def label(config: dict, varying: set) -> str:
    inputs = "noise inputs" if config["dataset"] == "noise" else "images"
    extra = [f"{k}={config[k]}" for k in LEGEND_FIELDS if k in varying]
    return ", ".join([config["model"], inputs, *extra])


def teacher_label(config: dict, varying: set) -> str:
    """A random teacher is named by its architecture alone (inputs, alpha, ... do not
    change it)."""
    extra = [f"{k}={config[k]}" for k in ("width", "out_dim") if k in varying]
    return ", ".join([config["model"], *extra])


def full_data(results) -> list:
    """The full-data students (subset 0) where there are any, else those on the largest
    subset (a preset that distils on a subset and adds smaller ones for data-size)."""
    full = [r for r in results if not r.config.get("subset")]
    if full or not results:
        return full
    largest = max(int(r.config.get("subset") or 0) for r in results)
    return [r for r in results if int(r.config.get("subset") or 0) == largest]


def lowest_alpha(results) -> list:
    """The runs at the lowest student-init alpha present (the paper's default, 1e-10)."""
    alpha = min(float(r.config.get("alpha", 0)) for r in results)
    return [r for r in results if float(r.config.get("alpha", 0)) == alpha]


def group(results) -> dict:
    """{panel: {setting: [results over seeds]}}."""
    panels = defaultdict(lambda: defaultdict(list))
    for res in full_data(lowest_alpha(results)):
        panels[probed_on(res.config)][setting(res.config)].append(res)
    return panels


def varying_fields(groups) -> set:
    configs = [runs[0].config for runs in groups.values()]
    return {k for k in configs[0] if k not in SEED_FIELDS
            and len({str(c.get(k)) for c in configs}) > 1}


def role_index(result, role: str) -> int:
    """Position of `role` ("teacher" or "student") on a distill result's model axis."""
    return [str(m) for m in result.coords["model"]].index(role)


def curves(runs, model_index: int):
    """(epochs, mean, std) over seeds of knn_accuracy at the probed epochs, in %."""
    epochs = np.asarray(runs[0].coords["epoch"], dtype=float)
    stack = np.stack([100 * r.metrics["knn_accuracy"][:, model_index] for r in runs
                      if len(r.coords["epoch"]) == len(epochs)])
    probed = np.isfinite(stack).all(0)
    return epochs[probed], stack[:, probed].mean(0), stack[:, probed].std(0)


def build(results):
    """One panel per probed dataset (returned unsaved)."""
    panels = group(results)
    fig, axes = style.figure(width=style.COLUMN * min(len(panels), 2), height=2.6,
                             ncols=len(panels), squeeze=False)
    for ax, (title, groups) in zip(axes[0], sorted(panels.items())):
        draw_panel(ax, groups)
        ax.set_title(f"k-NN probe on {title}", fontsize="small")
        ax.set_ylabel("k-NN test accuracy (%)")
    honest.note_incomplete(fig, results)
    return fig


def draw(results_dir, out_dir, store=None) -> list:
    return style.save(build(load(results_dir, ANALYSIS, NAME, store=store)), out_dir, NAME)


def draw_panel(ax, groups) -> None:
    varying, teachers = varying_fields(groups), []
    ordered = sorted(groups.items(), key=lambda kv: (kv[1][0].config["dataset"] == "noise",
                                                     kv[0]))  # images first
    for color, (_, runs) in zip(style.PALETTE, ordered):
        x, mean, std = curves(runs, role_index(runs[0], "student"))
        name = label(runs[0].config, varying)
        ax.plot(x, mean, color=color, marker="o", ms=2.5, label=f"student ({name})")
        ax.fill_between(x, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100),
                        color=color, alpha=0.2, lw=0)
        x, mean, _ = curves(runs, role_index(runs[0], "teacher"))
        if any(np.allclose(mean, seen) for seen in teachers if len(seen) == len(mean)):
            continue  # the same random teacher as an earlier line
        teachers.append(mean)
        ax.plot(x, mean, color=color, ls="--", lw=1,
                label=f"random teacher ({teacher_label(runs[0].config, varying)})")
    ax.set_xlabel("distillation epoch")
    ax.legend(frameon=False, fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.3))
