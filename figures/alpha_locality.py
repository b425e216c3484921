"""Locality: how the student's start distance to its teacher shapes what it learns.

Students start at theta_S(alpha) = ((1 - alpha) theta_T + alpha theta_fresh) / delta: alpha
near 0 starts on the teacher, alpha = 1 at a fresh init. Left: the student's k-NN test
accuracy over distillation epochs, one line per alpha (mean +- 1 std over seeds), the random
teacher dashed. Right: the last probed epoch per alpha (no epoch picked by its test
accuracy) against the teacher's level; spreads clipped to [0, 100] %. One row per probed
dataset and architecture; full-data students on images only (the pipeline's `alphas` key
makes them: one group of students per alpha, every seed). Runs that differ in any other
config key (lr, steps, ...) are refused, naming the keys.
"""

from collections import defaultdict

import numpy as np

from figures import honest, style
from figures.data_size import last_student, model_accuracy
from figures.distill_curves import curves, full_data, probed_on, role_index
from figures.sources import load
from runs.errors import UserError

NAME = "alpha-locality"
ANALYSIS = "distill"
OPTIONS = ("store",)
# Keys that may differ between the runs of one figure: alpha (the point), seeds, bookkeeping.
VARYING_OK = ("alpha", "seed", "teacher_seed", "save_at", "probe_every", "data_root",
              "probe_root", "model", "probe_dataset", "dataset")


def on_images(result) -> bool:
    return result.config["dataset"] != "noise"


def group(results) -> dict:
    """{(dataset, model): {alpha: [results over seeds]}} for full-data image students."""
    rows = defaultdict(lambda: defaultdict(list))
    honest.refuse_mixed(full_data([r for r in results if on_images(r)]), VARYING_OK, NAME)
    for res in full_data([r for r in results if on_images(r)]):
        panel = (probed_on(res.config), res.config["model"])
        rows[panel][float(res.config["alpha"])].append(res)
    return rows


def checked(rows: dict, results_dir) -> dict:
    """The rows with two or more alphas; none -> an error naming what makes them."""
    kept = {panel: by_alpha for panel, by_alpha in rows.items() if len(by_alpha) > 1}
    if not kept:
        found = sorted({a for by_alpha in rows.values() for a in by_alpha})
        raise UserError(f"figure {NAME}: the distill results under {results_dir} hold alpha "
                        f"{', '.join(f'{a:g}' for a in found) or 'none'}; it needs students "
                        f"at two or more alphas (the pipeline's `alphas` key, or the distill "
                        f"(python -m runs.distill) stage with --alpha A)")
    return kept


def alpha_label(alpha: float) -> str:
    return f"α = {alpha:g}"


def draw_curves(ax, by_alpha: dict) -> None:
    """Accuracy over epochs, one line per alpha; the shared random teacher once."""
    for color, alpha in zip(style.PALETTE, sorted(by_alpha)):
        runs = by_alpha[alpha]
        x, mean, std = curves(runs, role_index(runs[0], "student"))
        ax.plot(x, mean, color=color, marker="o", ms=2.5, label=alpha_label(alpha))
        ax.fill_between(x, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100),
                        color=color, alpha=0.2, lw=0)
    runs = by_alpha[min(by_alpha)]
    x, mean, _ = curves(runs, role_index(runs[0], "teacher"))
    ax.plot(x, mean, color="0.4", ls="--", lw=1, label="random teacher")
    ax.set_xlabel("distillation epoch")
    ax.set_ylabel("k-NN test accuracy (%)")


def last_by_alpha(by_alpha: dict):
    """(alphas, mean, std) over seeds of each student's last probed epoch, in %."""
    alphas = sorted(by_alpha)
    best = [[last_student(r) for r in by_alpha[a]] for a in alphas]
    return alphas, np.array([np.mean(b) for b in best]), np.array([np.std(b) for b in best])


def draw_best(ax, by_alpha: dict) -> None:
    """Last-epoch accuracy per alpha at evenly spaced positions (alpha spans 0 to 1)."""
    alphas, mean, std = last_by_alpha(by_alpha)
    where = np.arange(len(alphas))
    ax.plot(where, mean, color="0.7", lw=1, zorder=1)
    for x, m, s, color in zip(where, mean, std, style.PALETTE):
        yerr = [[m - max(m - s, 0)], [min(m + s, 100) - m]]  # +-1 std within [0, 100] %
        ax.errorbar(x, m, yerr=yerr, color=color, marker="o", ms=4, capsize=2)
    teacher = np.concatenate([model_accuracy(r, "teacher") for runs in by_alpha.values()
                              for r in runs])
    ax.axhline(teacher.mean(), color="0.4", ls="--", lw=1)
    ax.set_xticks(where, [f"{a:g}" for a in alphas])
    ax.set_xlim(-0.5, len(alphas) - 0.5)
    ax.set_xlabel("student init α (0 = teacher, 1 = fresh)")
    ax.set_ylabel("k-NN test accuracy, last epoch (%)")


def build(results, results_dir=""):
    rows = checked(group(results), results_dir)
    fig, axes = style.figure(width=style.FULL, height=2.4 * len(rows), nrows=len(rows),
                             ncols=2, squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for (left, right), ((dataset, model), by_alpha) in zip(axes, sorted(rows.items())):
        draw_curves(left, by_alpha)
        draw_best(right, by_alpha)
        left.set_title(f"{model} on {dataset}: accuracy over distillation", fontsize="small")
        right.set_title("last probed epoch per α", fontsize="small")
        left.legend(frameon=False, fontsize="x-small", ncols=2)
    honest.note_incomplete(fig, results)
    return fig


def draw(results_dir, out_dir, store=None) -> list:
    results = load(results_dir, ANALYSIS, NAME, store=store)
    return style.save(build(results, results_dir), out_dir, NAME)
