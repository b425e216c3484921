"""Where a scan's points lie: a line through two checkpoints, a plane through three, or
random filter-normalised directions around one; and the coordinate grids.

A `Geometry` turns a batch of coordinates (P, K) into P parameter sets (name -> (P, *shape))
and, for BN modes `keep` and `interpolate`, P sets of BN buffers. It is built on the CPU
(so the recorded anchor coordinates are the same bits on every machine) and then moved.
"""

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from landscape import params as P
from landscape.batchnorm import interpolate_buffers
from runs.errors import UserError

GRID_EXAMPLE = "start:stop:num with both ends included (e.g. 0:1:25) or a comma list " \
               "(e.g. 0,0.25,0.5,1)"
MAX_GRID_POINTS = 10**7  # points on one axis; runs.results.MAX_POINTS bounds the whole grid
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def parse_grid(spec: str, flag: str = "--grid") -> np.ndarray:
    """'0:1:25' -> 25 values from 0 to 1 inclusive; '0,0.25,1' -> those values (float64)."""
    text = str(spec).strip()
    _check_range(text, flag)
    values = _parse_range(text) if ":" in text else _parse_list(text)
    if values is None:
        raise UserError(f"{flag}: cannot parse {spec!r}; use {GRID_EXAMPLE}")
    if not np.isfinite(values).all():
        raise UserError(f"{flag} {spec!r}: a coordinate is not a finite number (beyond "
                        f"float64's 1.8e308); use finite coordinates, e.g. 0:1:25")
    if len(np.unique(values)) != len(values):
        raise UserError(f"{flag} {spec!r} repeats a coordinate; each point once, e.g. 0:1:25")
    return values


def join_negative(argv, flags=("--grid", "--beta-grid")) -> list[str]:
    """`--grid -1:1:21` as `--grid=-1:1:21`: argparse would take '-1:1:21' for an option."""
    out, argv = [], list(argv)
    for i, item in enumerate(argv):
        prev = out[-1] if out else None
        if prev in flags and i > 0 and argv[i - 1] == prev and re.match(r"^-[\d.]", item):
            out[-1] = f"{prev}={item}"
        else:
            out.append(item)
    return out


def _check_range(text: str, flag: str) -> None:
    """Refuse start:stop:num with a non-finite end or span, or more than MAX_GRID_POINTS
    points, before numpy allocates the grid or warns about overflow."""
    parts = text.split(":")
    if len(parts) != 3 or not all(_NUMBER.match(p) for p in parts[:2]) or \
            not parts[2].strip().isdigit():
        return  # not a range: parse_grid says so
    start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
    if not all(map(np.isfinite, (start, stop, stop - start))):
        raise UserError(f"{flag} {text!r}: its ends or span are not finite numbers (beyond "
                        f"float64's 1.8e308); use finite coordinates, e.g. 0:1:25")
    if count > MAX_GRID_POINTS:
        raise UserError(f"{flag} {text!r}: {count:,} points is beyond the limit of "
                        f"{MAX_GRID_POINTS:,} (each point is a model evaluation); use fewer")


def _parse_range(text: str) -> np.ndarray | None:
    parts = text.split(":")
    if len(parts) != 3 or not all(_NUMBER.match(p) for p in parts[:2]):
        return None
    if not parts[2].strip().isdigit() or int(parts[2]) < 1:
        return None
    return np.linspace(float(parts[0]), float(parts[1]), int(parts[2]))


def _parse_list(text: str) -> np.ndarray | None:
    items = text.split(",")
    if not all(_NUMBER.match(item) for item in items):
        return None
    return np.array([float(item) for item in items], dtype=np.float64)


def split_state(module: nn.Module) -> tuple[dict, dict]:
    """(params, buffers) of a module as detached copies, in module order."""
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    return params, buffers


@dataclass
class Geometry:
    kind: str  # "line", "plane" or "directions"
    origin: dict  # params at coordinates 0 (checkpoint A, or the centre of directions)
    directions: list[dict]  # one per axis: params(c) = origin + sum_k c_k directions[k]
    buffers: list[dict]  # BN buffers of the anchors, A (or the centre) first
    anchor_coords: dict  # label -> coordinates, e.g. {"A": [0, 0], "B": [1, 0], "C": [...]}
    unit: float  # parameter-space length of one step along the first axis
    end: dict | None = None  # a line's B: params via torch.lerp, exact at both ends
    names: list = field(init=False)

    def __post_init__(self):
        self.names = list(self.origin)

    @property
    def num_axes(self) -> int:
        return len(self.directions)

    def to(self, device) -> "Geometry":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        self.origin = move(self.origin)
        self.directions = [move(d) for d in self.directions]
        self.buffers = [move(b) for b in self.buffers]
        self.end = move(self.end) if self.end is not None else None
        return self

    def params_at(self, coords: torch.Tensor) -> dict:
        """name -> (P, *shape) parameters at coords (P, K)."""
        device = next(iter(self.origin.values())).device
        coords = torch.as_tensor(coords, dtype=torch.float64).to(device)
        out = {}
        for name, origin in self.origin.items():
            view = (len(coords),) + (1,) * origin.ndim
            c = coords.to(origin.dtype)
            if self.end is not None:  # a line: lerp, so alpha 0 and 1 give A and B exactly
                out[name] = torch.lerp(origin[None], self.end[name][None], c[:, 0].view(view))
                continue
            point = origin[None].expand(view[:1] + origin.shape)
            for k, direction in enumerate(self.directions):
                point = point + c[:, k].view(view) * direction[name]
            out[name] = point
        return out

    def buffers_at(self, coords: torch.Tensor, mode: str) -> dict:
        """name -> (P, *shape) BN buffers under `keep` or `interpolate`."""
        coords = torch.as_tensor(coords, dtype=torch.float64)
        if mode == "keep":
            return {k: b[None].expand(len(coords), *b.shape) for k, b in self.buffers[0].items()}
        if mode != "interpolate":
            raise ValueError(f"buffers_at: mode must be keep or interpolate, got {mode!r}")
        if len(self.buffers) < 2:
            raise UserError("BN mode interpolate needs two or more checkpoints; random "
                            "directions around one checkpoint use keep or recalibrate")
        return interpolate_buffers(self.buffers, self.anchor_weights(coords))

    def anchor_weights(self, coords: torch.Tensor) -> torch.Tensor:
        """(P, n_anchors) affine weights whose mix of the anchors' coordinates is `coords`.

        Barycentric coordinates: a line's (1 - a, a), a plane's (1 - a - b, a, b) in the
        lstsq basis; solved from the recorded anchor coordinates for any basis.
        """
        anchors = torch.tensor(list(self.anchor_coords.values()), dtype=torch.float64)  # (n, K)
        system = torch.cat([anchors.T, torch.ones(1, len(anchors), dtype=torch.float64)])
        rhs = torch.cat([coords.T.cpu(), torch.ones(1, len(coords), dtype=torch.float64)])
        return torch.linalg.solve(system, rhs).T  # (P, n)


def line(a: nn.Module, b: nn.Module, guard: bool = True) -> Geometry:
    """theta(alpha) = (1 - alpha) theta_A + alpha theta_B.

    guard: refuse A and B closer than P.TOO_CLOSE of their norm (a scan of one point);
    landscape.border turns it off, since two SGD children may legitimately coincide (their
    barrier is then exactly 0).
    """
    (pa, ba), (pb, bb) = split_state(a), split_state(b)
    if guard:  # before any point: a tiny unit is a meaningless scan
        P.check_apart({"A": pa, "B": pb})
    return Geometry("line", pa, [P.subtract(pb, pa)], [ba, bb], {"A": [0.0], "B": [1.0]},
                    P.norm(P.subtract(pb, pa)), end=pb)


def plane(a: nn.Module, b: nn.Module, c: nn.Module, basis: str = "lstsq") -> Geometry:
    """The plane through A, B, C: A at (0, 0), B at (1, 0), C at (0, 1) (lstsq) or at its
    orthogonal projection (orthonormal, both axes in units of |B - A|)."""
    (pa, ba), (pb, bb), (pc, bc) = split_state(a), split_state(b), split_state(c)
    dirs = P.plane_directions(pa, pb, pc, basis)
    coords_c = [0.0, 1.0] if basis == "lstsq" else P.project(pa, dirs, pc)
    anchors = {"A": [0.0, 0.0], "B": [1.0, 0.0], "C": coords_c}
    return Geometry("plane", pa, dirs, [ba, bb, bc], anchors, P.norm(dirs[0]))


def random_directions(center: nn.Module, count: int, seed: int, frozen=()) -> Geometry:
    """`count` filter-normalised random directions around one checkpoint (Li et al. 2018),
    drawn one after the other from a CPU generator seeded with `seed`."""
    if count not in (1, 2):
        raise UserError(f"--directions {count}: random directions span 1 or 2 axes")
    params, buffers = split_state(center)
    generator = torch.Generator().manual_seed(seed)
    dirs = [P.filter_normalized(params, generator, frozen) for _ in range(count)]
    return Geometry("directions", params, dirs, [buffers], {"center": [0.0] * count},
                    P.norm(dirs[0]))


def point_norms(params: dict) -> torch.Tensor:
    """(P,) Euclidean norm of each point's parameters, summed in float64."""
    total = sum(p.double().pow(2).flatten(1).sum(1) for p in params.values())
    return total.sqrt()

