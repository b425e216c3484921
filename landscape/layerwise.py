"""Layer-wise connectivity: `python -m landscape.layerwise A B --grid 0:1:11`.

Which layers hold the barrier between two networks? For each layer (a module with
parameters: `--granularity layer`) or block (the encoder's top-level children with a
normalisation layer joined to the layer before it, each residual block, the fc:
`--granularity block`), only that group's parameters move, theta_g(alpha) = (1 - alpha)
theta_g^A + alpha theta_g^B, while every other parameter is held at A's (held = A) or, in
a second sweep, at B's (held = B). Per point the loss and error on train and test (BN
recalibrated by default, as interpolate does; `keep` = the held network's statistics,
`interpolate` = the group's own statistics mixed, the others held), and per (group, held)
the barriers of landscape.barrier along alpha. Groups where A and B agree have barrier 0
exactly. One HDF5 result, analysis `layerwise`, one cell per (group, held): a killed scan
re-run resumes at the first unfinished sweep.
"""

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from landscape import geometry as G
from landscape.barrier import barriers
from landscape.batchnorm import MODES, check_mode
from landscape.curve import add_measuring_args, check_pair, curve_specs, path_values
from landscape.interpolate import auto_points_per_pass, labelled
from landscape.network import check_images, load_anchor
from landscape.points import SPLITS, Measures, PointEvaluator
from runs.config import HelpFormatter, add_config_args, arg, config_from_args
from runs.device import resolve_device, use_bf16
from runs.errors import UserError, cli, echo_command, unknown
from runs.progress import Progress

ANALYSIS = "layerwise"
GRANULARITIES = ("layer", "block")
HELD = ("A", "B")
NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class LayerwiseConfig:
    refs: tuple[str, ...] = arg((), "the two checkpoints A and B")
    grid: str = arg("0:1:11", "alpha coordinates of each group's sweep; must hold 0 and 1")
    granularity: str = arg("layer", "what moves at a time: layer (each module with "
                                    "parameters) or block (encoder children, residual "
                                    "blocks, fc)", choices=GRANULARITIES)
    bn_mode: str = arg("recalibrate", "BatchNorm statistics per point", choices=MODES)
    bn_samples: int = arg(2048, "fixed training images for BN recalibration; 0 = all")
    bn_batch_size: int = arg(256, "images per recalibration batch")
    dataset: str = arg("", "dataset to measure on; '' = A's")
    data_root: str = arg("", "folder (or .npz file) of the dataset; '' = its default")
    data_options: tuple[str, ...] = arg((), "dataset options as key=value (e.g. side=8)")
    input_stats: str = arg("paper", "input normalisation: paper or dataset")
    subset: int = arg(0, "train images per class, seeded stratified, as the run used")
    val_size: int = arg(0, "train images the run held out for validation (left out here)")
    train_samples: int = arg(0, "train images measured (seeded draw); 0 = all")
    test_samples: int = arg(0, "test images measured (seeded draw); 0 = all")
    seed: int = arg(0, "seed of the measured and BN image draws")


# ---------------------------------------------------------------------------- groups


def groups(module: nn.Module, granularity: str) -> dict[str, list[str]]:
    """group name (a module path) -> the names of its parameters and buffers, in order."""
    if granularity not in GRANULARITIES:
        raise unknown("--granularity", granularity, GRANULARITIES)
    owners = layer_modules(module) if granularity == "layer" else block_modules(module)
    out = {}
    for name, members in owners.items():
        out[name] = [f"{path}.{key}" if path else key for path, m in members
                     for key in (*m._parameters, *m._buffers) if getattr(m, key) is not None]
    return out


def layer_modules(module: nn.Module) -> dict[str, list]:
    """Each module holding parameters directly is a group of its own."""
    return {name: [(name, m)] for name, m in module.named_modules()
            if any(p is not None for p in m._parameters.values())}


def block_modules(module: nn.Module) -> dict[str, list]:
    """Blocks: walk the network's parts (encoder, fc, head, net); a Sequential holding
    composite modules (residual stages) yields each of them; a normalisation layer joins
    the block before it; any other module with parameters is a block."""
    out: dict[str, list] = {}
    for name, child in module.named_children():
        _blocks(child, name, out, depth=0)
    return out


def _blocks(module: nn.Module, path: str, out: dict, depth: int) -> None:
    if not any(True for _ in module.parameters()):
        return
    leaf = not any(True for _ in module.children())
    if depth < 2 and not leaf and (depth == 0 or isinstance(module, nn.Sequential)):
        for name, child in module.named_children():
            _blocks(child, f"{path}.{name}", out, depth + 1)
        if any(p is not None for p in module._parameters.values()):  # the container's own
            out.setdefault(path, []).append((path, module))
        return
    members = [(p, m) for p, m in module.named_modules(prefix=path)]
    if isinstance(module, NORMS) and out:
        out[list(out)[-1]].extend(members)  # a norm layer belongs to the layer before it
    else:
        out[path] = members


# ---------------------------------------------------------------------------- geometry


class LayerGeometry:
    """One group moving from A to B with the rest held: coords (P, 1) = alpha."""

    kind = "layerwise"

    def __init__(self, moved: list[str], held: tuple[dict, dict], a: tuple[dict, dict],
                 b: tuple[dict, dict]):
        self.moved = set(moved)
        (self.held, self.held_buffers), (self.a, self.a_buffers), (self.b, self.b_buffers) = \
            held, a, b
        self.anchor_coords = {"A": [0.0], "B": [1.0]}

    def to(self, device) -> "LayerGeometry":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        for key in ("held", "held_buffers", "a", "a_buffers", "b", "b_buffers"):
            setattr(self, key, move(getattr(self, key)))
        return self

    def params_at(self, coords) -> dict:
        return self._mix(coords, self.held, self.a, self.b)

    def buffers_at(self, coords, mode: str) -> dict:
        if mode == "keep":
            return self._mix(coords, self.held_buffers, {}, {})
        return self._mix(coords, self.held_buffers, self.a_buffers, self.b_buffers)

    def _mix(self, coords, held: dict, a: dict, b: dict) -> dict:
        """name -> (P, *shape): the moved group's entries lerped, the rest held."""
        alpha = torch.as_tensor(coords, dtype=torch.float64)[:, 0]
        out = {}
        for name, value in held.items():
            if name in self.moved and name in a and value.is_floating_point():
                view = alpha.to(value.device, value.dtype).view(-1, *([1] * value.dim()))
                mixed = torch.lerp(a[name][None], b[name][None], view)  # exact at 0 and 1
                out[name] = mixed.clamp_min(0) if name.endswith("running_var") else mixed
            else:
                out[name] = value[None].expand(len(alpha), *value.shape)
        return out


def sweep_geometry(a: nn.Module, b: nn.Module, moved: list[str], held: str) -> LayerGeometry:
    states = {"A": G.split_state(a), "B": G.split_state(b)}
    return LayerGeometry(moved, states[held], states["A"], states["B"])


# ---------------------------------------------------------------------------- measuring


def layout(names: list[str], alphas: np.ndarray) -> tuple[dict, dict]:
    coords = {"layer": names, "held": list(HELD), "alpha": alphas, "split": list(SPLITS)}
    return coords, curve_specs(("layer", "held", "alpha", "split"), ("layer", "held", "split"))


def fill(result, a: nn.Module, b: nn.Module, members: dict, bn_mode: str, data, alphas,
         device, bf16, per_pass: int, stop_after: int = None) -> None:
    """Evaluate the missing (group, held) sweeps; `stop_after`: sweeps before returning
    early, as if killed (tests)."""
    names = list(members)
    todo = result.missing()
    evaluator = None
    with Progress(len(todo), ANALYSIS, "sweep") as bar:
        for n, (g, h) in enumerate(todo):
            if stop_after is not None and n >= stop_after:
                return
            geometry = sweep_geometry(a, b, members[names[g]], HELD[h]).to(device)
            if evaluator is None:
                evaluator = PointEvaluator(a, geometry, bn_mode, data,
                                           Measures(("supervised",)), None, device, bf16)
            evaluator.geometry = geometry
            result.write((g, h), **path_values(evaluator, alphas, per_pass))
            bar.update(1)


def check_grid(text: str) -> np.ndarray:
    alphas = G.parse_grid(text, "--grid")
    barriers(np.zeros(len(alphas)), np.zeros(len(alphas)), alphas)  # 0 and 1 on the grid
    return alphas


def run(cfg: LayerwiseConfig, anchors: list, data, inputs: list[dict], path, device,
        bf16: bool, points_per_pass: int = 0, overwrite: bool = False, stop_after=None):
    """Both doors: the sweeps of every group into the file at `path` (None: in memory)."""
    from runs.results import new_result
    alphas = check_grid(cfg.grid)
    check_mode(cfg.bn_mode)
    a, b = anchors[0].subject, anchors[1].subject
    members = groups(a, cfg.granularity)
    coords, metrics = layout(list(members), alphas)
    attrs = {"bn_mode": cfg.bn_mode, "granularity": cfg.granularity,
             "endpoints": [r.get("label", r["ref"]) for r in inputs[:2]],
             "groups": members}
    per_pass = points_per_pass or auto_points_per_pass(device)
    with new_result(path, ANALYSIS, coords, metrics, ("layer", "held"), cfg, inputs,
                    str(device), attrs, overwrite) as result:
        fill(result, a, b, members, cfg.bn_mode, data, alphas, device, bf16, per_pass,
             stop_after)
    return result


def scan(cfg: LayerwiseConfig, out: str, device="auto", precision="auto",
         points_per_pass: int = 0, batch_size: int = 512, overwrite: bool = False,
         stop_after: int = None) -> str:
    """The CLI's door: checkpoints and a dataset name; returns the path written."""
    from landscape.interpolate import load_data, resolve_data
    from runs.filehash import data_inputs
    if len(cfg.refs) != 2:
        raise UserError(f"give two checkpoints A B, got {len(cfg.refs)}")
    if cfg.granularity not in GRANULARITIES:
        raise unknown("--granularity", cfg.granularity, GRANULARITIES)
    check_grid(cfg.grid)
    check_mode(cfg.bn_mode)
    if points_per_pass < 0:
        raise UserError(f"--points-per-pass {points_per_pass}: must be >= 1 (0 = auto)")
    device = resolve_device(device)
    bf16 = use_bf16(device, precision)
    cfg = resolve_data(cfg)
    data = load_data(cfg, device, batch_size)
    anchors = [load_anchor(ref, True, False, data.num_classes) for ref in cfg.refs]
    check_pair(anchors)
    check_images(anchors[0], data.image_shape)
    inputs = labelled([anchor.record for anchor in anchors])
    inputs += data_inputs(cfg.dataset, cfg.data_root, cfg.data_options)
    run(cfg, anchors, data, inputs, out, device, bf16, points_per_pass, overwrite, stop_after)
    return out


def summary(path: str) -> str:
    """Test loss barrier (mean) per group, held at A and at B."""
    from runs.results import open_result
    data = open_result(path, ANALYSIS)
    test = list(data.coords["split"]).index("test")
    width = max(len(str(n)) for n in data.coords["layer"])
    lines = [f"{'group':>{width}}  loss_barrier_mean[test] held=A  held=B"]
    for g, name in enumerate(data.coords["layer"]):
        a, b = data.metrics["loss_barrier_mean"][g, :, test]
        lines.append(f"{name:>{width}}  {a:30.4f}  {b:8.4f}")
    return "\n".join(lines + [f"{path}: {int(data.done.sum())} of {data.done.size} sweeps "
                              f"done"])


EPILOG = r"""examples:
  python -m landscape.layerwise store/train_a/seed_0@last store/train_b/seed_0@last \
      --grid 0:1:11 --out results/layerwise.h5
  python -m landscape.layerwise A@last B@last --granularity block --bn-mode keep"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m landscape.layerwise", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("refs", nargs="+", metavar="REF", help="checkpoints A and B")
    add_measuring_args(p, "results/layerwise.h5")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    add_config_args(p, LayerwiseConfig, exclude=("refs",), group="scan")
    return p


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    echo_command("landscape.layerwise", argv)
    cfg = config_from_args(LayerwiseConfig, args, refs=tuple(args.refs))
    path = scan(cfg, args.out, args.device, args.precision, args.points_per_pass,
                args.batch_size, args.overwrite)
    print(summary(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
