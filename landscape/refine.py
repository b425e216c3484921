"""Adaptive barrier search on a measured path (`landscape.interpolate --refine TOL`).

After the uniform grid is measured, `barrier.refine_peak` bisects around the running maximum
of the error curve, then of the loss curve, of one split (`--refine-split`), each new point
a full evaluation (loss and error on both splits), until the maximum (the barrier's only
moving term: the endpoints are fixed) changes by less than TOL, or `--refine-max` points.

Layout (summaries: no alpha axis, so they sit beside the grid's metrics in one result):
- coordinate `refine` = 0 .. refine_max - 1, padded: points not taken are NaN;
- refined_alpha (refine), refined_loss and refined_error (refine, split), in the order taken;
- refined_error_barrier, refined_loss_barrier_mean, refined_loss_barrier_linear (split):
  the barriers over the grid and the refined points together;
- refine_points (): how many points the search took (NaN until it finished).
Resumable: each point is written as it is measured; a re-run replays the (deterministic)
search, reading the points already stored, and measures only the rest.
"""

import numpy as np

from landscape.barrier import barriers, refine_peak
from landscape.points import SPLITS
from runs.errors import UserError

CURVES = ("error", "loss")  # the order refined: error first (the paper's barrier)


def check(tol, refine_max: int, refs: int, metrics) -> None:
    """--refine TOL: positive, on a path, with supervised metrics; --refine-max >= 1."""
    if tol is None:
        return
    if not tol > 0:
        raise UserError(f"--refine {tol:g}: the tolerance must be a positive number of the "
                        f"curves' units (e.g. --refine 0.005); leave it out for no refinement")
    if refs != 2:
        raise UserError(f"--refine refines the barrier of a path (two checkpoints), not of "
                        f"{refs} checkpoint(s)")
    if "supervised" not in metrics:
        raise UserError("--refine follows the loss and error curves; add supervised to "
                        "--metrics")
    if refine_max < 1:
        raise UserError(f"--refine-max {refine_max}: must be at least 1 point")


def layout(refine_max: int, split: str) -> tuple[dict, dict]:
    """(coords, metric specs) the refinement adds to a path result."""
    from runs.results import MetricSpec
    coords = {"refine": np.arange(refine_max)}
    how = f"adaptive barrier search on {split}"
    barrier = f"over the grid and the refined points ({how})"
    specs = {
        "refined_alpha": MetricSpec(("refine",), "", f"alpha of each refined point ({how}, "
                                    f"in the order taken; NaN: not taken)", "f8"),
        "refined_loss": MetricSpec(("refine", "split"), "nats",
                                   "cross-entropy loss at the refined points"),
        "refined_error": MetricSpec(("refine", "split"), "fraction",
                                    "classification error at the refined points"),
        "refined_error_barrier": MetricSpec(("split",), "fraction", f"error barrier {barrier}"),
        "refined_loss_barrier_mean": MetricSpec(("split",), "nats",
                                                f"loss barrier over the endpoints {barrier}"),
        "refined_loss_barrier_linear": MetricSpec(("split",), "nats",
                                                  f"loss barrier over the chord {barrier}"),
        "refine_points": MetricSpec((), "", "points the adaptive barrier search took"),
    }
    return coords, specs


class _Stopped(Exception):
    """The evaluation budget of a test's simulated kill ran out."""


class _Points:
    """The refined points: stored ones replayed by position, new ones measured and written."""

    def __init__(self, result, evaluate, budget):
        self.result, self.evaluate, self.budget = result, evaluate, budget
        self.stored = result.read("refined_alpha")  # (R,) float64, NaN where not taken
        self.alphas, self.values = [], []  # in the order taken; values: metric -> (split,)

    def __call__(self, alpha: float) -> dict:
        k = len(self.alphas)
        if self.stored[k] == alpha:  # taken before the kill: the same point, replayed
            values = {c: self.result.read(f"refined_{c}")[k] for c in CURVES}
        else:
            if self.budget is not None and self.budget <= 0:
                raise _Stopped
            measured = self.evaluate(alpha)
            values = {c: np.asarray(measured[c], np.float32) for c in CURVES}  # as stored
            for curve in CURVES:
                self.result.write_summary(f"refined_{curve}", (k, slice(None)), values[curve])
            self.result.write_summary("refined_alpha", (k,), alpha)  # last: marks it taken
            self.budget = None if self.budget is None else self.budget - 1
        self.alphas.append(alpha)
        self.values.append(values)
        return values


def run(result, evaluate, alphas: np.ndarray, tol: float, refine_max: int, split: str,
        budget: int = None) -> int:
    """Refine the path in `result` (its grid done); returns the points taken.

    evaluate: alpha -> {"loss": (split,), "error": (split,)}; budget: evaluations allowed
    before stopping as if killed (tests), None = no limit.
    """
    at = SPLITS.index(split)
    grid = {c: result.read(c)[:, at].astype(np.float64) for c in CURVES}  # (n_alpha,)
    points = _Points(result, evaluate, budget)
    try:
        for curve in CURVES:
            taken = np.array(points.alphas, np.float64)
            seen = np.array([v[curve][at] for v in points.values], np.float64)
            refine_peak(lambda a, c=curve: float(points(a)[c][at]), np.concatenate(
                [alphas, taken]), np.concatenate([grid[curve], seen]), tol,
                refine_max - len(points.alphas))
    except _Stopped:
        return len(points.alphas)
    _write_barriers(result, alphas, points)
    return len(points.alphas)


def _write_barriers(result, alphas: np.ndarray, points: _Points) -> None:
    """The barriers over the grid and the refined points, and the count taken."""
    xs = np.concatenate([alphas, points.alphas])
    order = np.argsort(xs, kind="stable")
    curves = {c: np.concatenate([result.read(c), np.reshape([v[c] for v in points.values],
                                                             (-1, len(SPLITS)))])
              for c in CURVES}  # (n_alpha + n, split)
    found = barriers(curves["loss"][order].T, curves["error"][order].T, xs[order])
    for name, value in found.items():
        result.write_summary(f"refined_{name}", (slice(None),), value)
    result.write_summary("refine_points", (), len(points.alphas))
