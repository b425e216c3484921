"""Barriers along a linear path and their confidence intervals: pure numpy functions.

A curve is an array whose last axis runs over the path coordinate `alphas` (which must hold
0 and 1: the endpoints). Maxima are taken over the grid points with 0 <= alpha <= 1, so a
grid extended beyond the endpoints does not change a barrier.

- error barrier (Frankle et al. 2020): max_a E(a) - (E(0) + E(1)) / 2
- loss_barrier_mean: the same with the loss
- loss_barrier_linear (Entezari et al. 2022): max_a [L(a) - ((1 - a) L(0) + a L(1))]
"""

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
