"""Parameter-space arithmetic: flatten, lerp, dot products, plane bases, random directions.

`params` is a name -> tensor dict of the parameters a scan moves; `state` a full state_dict
(parameters and BN buffers). Every function here is pure: it returns new tensors and never
edits its inputs. Dot products and norms are accumulated in float64 (a ResNet18 has 11M
weights: float32 sums would lose the digits that decide a plane's coordinates).
"""

import math

import torch

from runs.errors import UserError

BASES = ("lstsq", "orthonormal")
# sin of the angle at a below which c counts as on the line a-b (float32 weights carry
# ~1e-7 relative noise, so an exactly collinear triple measures about that)
COLLINEAR = 1e-5
# two anchors closer than this fraction of the largest anchor norm count as one point (an
# untrained student at alpha 0 and its teacher: exactly 0; at alpha 1e-10: ~1e-10; float32
# rounding alone: ~1e-7; a student after one AdamW step at lr 1e-3: ~1e-3)
TOO_CLOSE = 1e-6


def flatten(params: dict) -> torch.Tensor:
    """One 1-D vector (N,) of all tensors, in the dict's order."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(flat: torch.Tensor, like: dict) -> dict:
    """The inverse of `flatten`: split (N,) back into tensors shaped like `like`'s."""
    out, start = {}, 0
    for name, ref in like.items():
        out[name] = flat[start:start + ref.numel()].view_as(ref)
        start += ref.numel()
    if start != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the shapes need {start}")
    return out


def lerp(state_a: dict, state_b: dict, alpha: float) -> dict:
    """(1 - alpha) a + alpha b for floating tensors; integer ones (BN batch counts) from a.

    torch.lerp is exact at both ends (alpha = 0 gives a, alpha = 1 gives b, bit for bit).
    """
    return {name: torch.lerp(a, state_b[name], alpha) if a.is_floating_point() else a.clone()
            for name, a in state_a.items()}


def subtract(a: dict, b: dict) -> dict:
    """a - b, name by name."""
    return {name: a[name] - b[name] for name in a}


def dot(a: dict, b: dict) -> float:
    """<a, b> over all tensors, summed in float64."""
    return float(sum((a[name].double() * b[name].double()).sum() for name in a))


def norm(params: dict) -> float:
    """Euclidean norm of all tensors together, in float64."""
    return math.sqrt(dot(params, params))


def scale(params: dict, factor: float) -> dict:
    return {name: p * factor for name, p in params.items()}


def combine(origin: dict, directions: list[dict], coords) -> dict:
    """origin + sum_k coords[k] directions[k] for one point (coords: K numbers)."""
    out = {name: o.clone() for name, o in origin.items()}
    for c, direction in zip(coords, directions):
        for name in out:
            out[name] += float(c) * direction[name]
    return out


def filter_normalized(params: dict, generator: torch.Generator, frozen=()) -> dict:
    """A random direction with filter normalisation (Li et al. 2018).

    d ~ N(0, I) drawn on the CPU from `generator` (same numbers on any device), then every
    output filter (dim-0 slice) of every weight of 2 or more dims is rescaled to the norm of
    the same filter of `params`. 1-D tensors (biases, BN affine) and names in `frozen` get
    d = 0. Draws happen for every tensor of 2+ dims in order, frozen or not, so freezing a
    layer does not change the other layers' directions.
    """
    out = {}
    for name, theta in params.items():
        if theta.ndim <= 1:
            out[name] = torch.zeros_like(theta)
            continue
        d = torch.randn(theta.shape, generator=generator, dtype=torch.float32)
        d = d.to(theta.device, theta.dtype)
        d_norm = d.flatten(1).norm(dim=1)  # (O,) one norm per output filter
        t_norm = theta.flatten(1).norm(dim=1)  # (O,)
        factor = (t_norm / d_norm.clamp_min(1e-12)).view(-1, *[1] * (theta.ndim - 1))
        out[name] = torch.zeros_like(theta) if name in frozen else d * factor
    return out


def plane_directions(a: dict, b: dict, c: dict, basis: str = "lstsq") -> list[dict]:
    """Two directions spanning the plane through the parameter vectors a, b, c.

    lstsq: d1 = b - a, d2 = c - a, so a, b, c sit at (0, 0), (1, 0), (0, 1) and any point's
    coordinates are its least-squares fit in this (generally oblique) basis.
    orthonormal: Gram-Schmidt of b - a and c - a, both scaled to |b - a|: one coordinate
    unit is |b - a| on both axes, so distances (times that unit) and angles are true; b sits
    at (1, 0) and c wherever its projection falls.
    """
    if basis not in BASES:
        raise UserError(f"unknown plane basis {basis!r}; valid: {', '.join(BASES)}")
    check_apart({"A": a, "B": b, "C": c})
    u, v = subtract(b, a), subtract(c, a)
    unit = norm(u)
    if basis == "lstsq":
        _check_independent(u, v)
        return [u, v]
    e1 = scale(u, 1 / unit)
    v_perp = subtract(v, scale(e1, dot(v, e1)))
    perp = norm(v_perp)
    if perp <= COLLINEAR * norm(v):
        raise UserError(f"the three checkpoints are collinear (C is {perp:.2g} off the line "
                        f"A-B, sin of the angle at A {perp / norm(v):.2g} < {COLLINEAR:g}); a "
                        f"plane needs three non-collinear checkpoints: pick a C off the line "
                        f"through A and B, or scan the path A-B instead")
    return [u, scale(v_perp, unit / perp)]


def _check_independent(u: dict, v: dict) -> None:
    uu, vv, uv = dot(u, u), dot(v, v), dot(u, v)
    sin2 = max(uu * vv - uv * uv, 0.0) / (uu * vv)  # sin^2 of the angle at a
    if sin2 <= COLLINEAR ** 2:
        raise UserError(f"the three checkpoints are collinear (sin of the angle at A "
                        f"{math.sqrt(sin2):.2g} < {COLLINEAR:g}); a plane needs three "
                        f"non-collinear checkpoints: pick a C off the line through A and B, or "
                        f"scan the path A-B instead")


def check_apart(anchors: dict, minimum: float = TOO_CLOSE) -> None:
    """Refuse anchors closer than `minimum` x the largest anchor norm (label -> params).

    Coordinates are in units of |B - A|: a tiny unit gives a grid of indistinguishable
    points that takes as long to evaluate as a meaningful one. The usual cause: an untrained
    distilled student (@init) beside its teacher; at the paper's alpha = 0 the two are the
    same network, at alpha = 1e-10 they are 1e-10 apart. Trained students (alpha 0 too) are
    far apart and pass. Checked before any point is computed.
    """
    norms = {label: norm(params) for label, params in anchors.items()}
    largest = max(norms.values())
    labels = list(anchors)
    for i, first in enumerate(labels):
        for second in labels[i + 1:]:
            apart = norm(subtract(anchors[second], anchors[first]))
            if apart <= minimum * largest:
                raise UserError(
                    f"{second} and {first} are {'nearly ' if apart else ''}identical, "
                    f"{apart:.2g} apart (|{first}| = "
                    f"{norms[first]:.4g}, below {minimum:g} of the largest norm): the "
                    f"{'plane' if len(labels) > 2 else 'path'} would be one point repeated. "
                    f"An untrained distilled student IS its teacher at alpha=0 (the paper's "
                    f"default; RUN@init equals RUN@init:teacher) and is 1e-10 from it at "
                    f"alpha=1e-10: scan the trained student (RUN@last) instead of RUN@init, "
                    f"or one distilled with --alpha 1")


def project(origin: dict, directions: list[dict], theta: dict) -> list[float]:
    """Least-squares coordinates of `theta` in the affine span origin + sum_k c_k d_k.

    Solves the K x K normal equations G c = D^T (theta - origin) in float64.
    """
    delta = subtract(theta, origin)
    gram = torch.tensor([[dot(di, dj) for dj in directions] for di in directions],
                        dtype=torch.float64)
    rhs = torch.tensor([dot(di, delta) for di in directions], dtype=torch.float64)
    return torch.linalg.solve(gram, rhs).tolist()
