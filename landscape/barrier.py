"""Barriers along a linear path and their confidence intervals: pure numpy functions.

A curve is an array whose last axis runs over the path coordinate `alphas` (which must hold
0 and 1: the endpoints). Maxima are taken over the grid points with 0 <= alpha <= 1, so a
grid extended beyond the endpoints does not change a barrier.

- error barrier (Frankle et al. 2020): max_a E(a) - (E(0) + E(1)) / 2
- loss_barrier_mean: the same with the loss
- loss_barrier_linear (Entezari et al. 2022): max_a [L(a) - ((1 - a) L(0) + a L(1))]

`refine_peak` adds points where a measured curve peaks (bisection around its running
maximum) until the maximum, and so the barrier, changes by less than a tolerance.
"""

from dataclasses import dataclass

import numpy as np
from scipy import stats

from runs.errors import UserError

NAMES = ("error_barrier", "loss_barrier_mean", "loss_barrier_linear")


def _ends(alphas) -> tuple[int, int, np.ndarray]:
    """Indices of alpha = 0 and alpha = 1 and the mask of points inside [0, 1]."""
    alphas = np.asarray(alphas, dtype=np.float64)
    found = [np.flatnonzero(alphas == end) for end in (0.0, 1.0)]
    if any(len(f) == 0 for f in found):
        raise UserError(f"a barrier needs the endpoints alpha = 0 and 1 on the grid; got "
                        f"{np.round(alphas, 4).tolist()} (e.g. --grid 0:1:25)")
    return int(found[0][0]), int(found[1][0]), (alphas >= 0) & (alphas <= 1)


def mean_barrier(curve, alphas) -> np.ndarray:
    """max_a c(a) - (c(0) + c(1)) / 2 over the last axis."""
    curve = np.asarray(curve, dtype=np.float64)
    i0, i1, inside = _ends(alphas)
    return curve[..., inside].max(-1) - (curve[..., i0] + curve[..., i1]) / 2


def linear_barrier(curve, alphas) -> np.ndarray:
    """max_a [c(a) - ((1 - a) c(0) + a c(1))] over the last axis."""
    curve = np.asarray(curve, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    i0, i1, inside = _ends(alphas)
    start, end = curve[..., i0, None], curve[..., i1, None]
    # torch.lerp's two-sided form: exact at both ends and exactly flat when start == end,
    # so identical endpoints give a barrier of exactly 0 ((1 - a) c + a c can miss c).
    chord = np.where(alphas < 0.5, start + alphas * (end - start),
                     end - (1 - alphas) * (end - start))
    return (curve - chord)[..., inside].max(-1)


def barriers(loss, error, alphas) -> dict:
    """The three barriers of DESIGN.md from loss and error curves (last axis: alphas)."""
    return {"error_barrier": mean_barrier(error, alphas),
            "loss_barrier_mean": mean_barrier(loss, alphas),
            "loss_barrier_linear": linear_barrier(loss, alphas)}


def mean_ci(values, axis: int = -1, confidence: float = 0.95) -> dict:
    """Mean and a two-sided t-distribution confidence interval over `axis`.

    {"mean", "ci_low", "ci_high"}: mean +- t_{(1+c)/2, n-1} * std(ddof=1) / sqrt(n). With
    one value the interval is undefined (NaN). NaN values propagate.
    """
    values = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    n = values.shape[-1]
    mean = values.mean(-1)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return {"mean": mean, "ci_low": nan, "ci_high": nan.copy()}
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(-1, ddof=1) / np.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


@dataclass
class Refined:
    """What `refine_peak` took: the new points in the order evaluated, and the peak found."""
    alphas: np.ndarray  # (n,) coordinates evaluated, in order
    values: np.ndarray  # (n,) f at those coordinates
    peak_alpha: float  # argmax over the grid and the new points (within [lo, hi])
    peak: float  # the running maximum: the barrier's max term
    rounds: int  # bisection rounds run


def refine_peak(f, alphas, values, tol: float, max_points: int, lo: float = 0.0,
                hi: float = 1.0) -> Refined:
    """Adaptive search for max f on [lo, hi] around the running maximum of a measured curve.

    f: alpha -> float (one more model evaluation each call); alphas, values: the points
    already measured (any order; those outside [lo, hi] are ignored). Each round bisects the
    two intervals next to the running maximum (one new point on either side; one at an end
    of [lo, hi]), so the bracket around the peak halves per round. Stops when a round changes
    the running maximum by less than `tol` and the points beside the maximum lie within `tol`
    of it (a parabola through the three then rises at most tol / 4 above the maximum: the
    change alone is 0 whenever both new points fall below it, however far the peak is), at
    `max_points` new points, or when the bracket is below float resolution.
    Deterministic given the measured points: a killed search replays its rounds (the
    caller's f returns stored values) and continues. Why: a uniform grid can miss a sharp
    barrier by most of its height and must double its points to halve its spacing; the
    bisection halves the bracket around the peak with 2 evaluations a round.
    """
    if not tol > 0:
        raise UserError(f"--refine {tol}: the tolerance must be a positive number (e.g. 0.01)")
    xs, ys = _inside(alphas, values, lo, hi)
    taken_x, taken_y, rounds = [], [], 0
    while len(taken_x) < max_points:
        best = int(np.argmax(ys))
        before = ys[best]
        new = _midpoints(xs, best)[:max_points - len(taken_x)]
        if not new:
            break
        for x in new:
            y = float(f(x))
            taken_x.append(x)
            taken_y.append(y)
            at = int(np.searchsorted(xs, x))
            xs, ys = np.insert(xs, at, x), np.insert(ys, at, y)
        rounds += 1
        best = int(np.argmax(ys))
        if abs(ys[best] - before) < tol and _spread(ys, best) < tol:
            break
    best = int(np.argmax(ys))
    return Refined(np.array(taken_x), np.array(taken_y), float(xs[best]), float(ys[best]),
                   rounds)


def _inside(alphas, values, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The measured points within [lo, hi], sorted by alpha: (n,), (n,) float64."""
    xs, ys = np.asarray(alphas, np.float64), np.asarray(values, np.float64)
    keep = (xs >= lo) & (xs <= hi) & np.isfinite(ys)
    if keep.sum() < 2:
        raise UserError(f"refinement needs at least 2 measured points in [{lo:g}, {hi:g}]; "
                        f"got {int(keep.sum())} (e.g. --grid 0:1:25)")
    order = np.argsort(xs[keep])
    return xs[keep][order], ys[keep][order]


def _midpoints(xs: np.ndarray, best: int) -> list[float]:
    """Midpoints of the intervals left and right of xs[best] that float64 can still split."""
    out = []
    for left, right in ((best - 1, best), (best, best + 1)):
        if 0 <= left and right < len(xs):
            mid = xs[left] + (xs[right] - xs[left]) / 2
            if xs[left] < mid < xs[right]:
                out.append(float(mid))
    return out


def _spread(ys: np.ndarray, best: int) -> float:
    """How far the lower neighbour of ys[best] lies below it (0 when it has none)."""
    beside = [ys[i] for i in (best - 1, best + 1) if 0 <= i < len(ys)]
    return float(ys[best] - min(beside)) if beside else 0.0
