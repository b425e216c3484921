"""Section landscape: a linear path with BN recalibration (landscape.points.PointEvaluator,
batched and one point at a time) against state-dict lerp + update_bn + DataLoaders. The
comparison names the path the commands' default takes on the device (`default_path`: one
point at a time on CPUs), the one the goals' CPU rule judges.

landscape is imported inside the functions: a section whose package does not import is
skipped.
"""

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from runs.datasets.base import DatasetInfo, ImageData
from runs.gpu_loader import GPULoader
from runs.studies.bench.common import (
    Bench,
    Runner,
    comparison,
    measure,
    new_model,
    reference_loader,
    synthetic_images,
    synthetic_info,
    to_device,
)
from runs.studies.bench.training import eval_flops

BN_BATCH = 256  # images per BN recalibration batch (landscape.interpolate's default)


# ---------------------------------------------------------------------------------------
# 5. Landscape: a linear path with BN recalibration, batched vs one point at a time


def path_setup(bench: Bench):
    """(model A, model B, EvalData, alphas): two random inits of the model and the images."""
    from landscape.points import eval_data
    cfg = bench.cfg
    train = synthetic_images(max(cfg.path_images, cfg.bn_images), seed=0)
    test = synthetic_images(cfg.path_test_images, seed=1)
    data = eval_data(train, test, bench.device, batch_size=cfg.eval_batch,
                     train_samples=cfg.path_images, test_samples=cfg.path_test_images,
                     bn_samples=cfg.bn_images, bn_batch_size=BN_BATCH)
    models = [new_model(bench, train.info, seed=s) for s in (0, 1)]
    return models[0], models[1], data, np.linspace(0.0, 1.0, cfg.path_points)


def path_evaluator(bench: Bench, model_a, model_b, data):
    from landscape.geometry import line
    from landscape.network import Subject
    from landscape.points import Measures, PointEvaluator
    a, b = (Subject(m.encoder, m.fc) for m in (model_a, model_b))
    geometry = line(a, b).to(bench.device)
    return PointEvaluator(a, geometry, "recalibrate", data, Measures(("supervised",)), None,
                          bench.device, bench.bf16)


def fast_path(bench: Bench, evaluator, alphas, per_pass: int) -> Runner:
    """landscape.points.PointEvaluator: `per_pass` points per vmapped pass (1 = serial)."""
    coords = alphas[:, None]  # (P, 1)
    batched = per_pass > 1

    def step():
        out = []
        for start in range(0, len(coords), per_pass):
            out += evaluator.evaluate(coords[start:start + per_pass], batched)
        return np.stack([point["loss"] for point in out])  # (P, 2) train, test

    how = f"{per_pass} points per vmapped pass" if batched else "one point at a time"
    return Runner(f"PointEvaluator, GPULoader, {how}, functional BN recalibration",
                  len(alphas), step,
                  warm=lambda: evaluator.evaluate(coords[:per_pass], batched))


def reference_path(bench: Bench, model_a, model_b, data, alphas) -> Runner:
    """One point at a time as public landscape code: lerp the state dicts, update_bn over a
    DataLoader, evaluate over DataLoaders, eager fp32."""
    device = bench.device
    model = copy.deepcopy(model_a).to(device)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    bn = plain_loader(data.bn, BN_BATCH, bench)
    splits = [plain_loader(data.splits[s], bench.cfg.eval_batch, bench) for s in
              ("train", "test")]

    def points(values) -> np.ndarray:
        losses = []
        for alpha in values:
            model.load_state_dict({k: torch.lerp(v, state_b[k], float(alpha))
                                   if v.is_floating_point() else v for k, v in state_a.items()})
            torch.optim.swa_utils.update_bn(bn, model, device)
            model.eval()
            losses.append([split_loss(model, loader, device) for loader in splits])
        return np.array(losses)  # (P, 2) train, test

    return Runner("state-dict lerp + update_bn + DataLoader + eager fp32, one point at a time",
                  len(alphas), lambda: points(alphas), warm=lambda: points(alphas[:1]))


def plain_loader(loader: GPULoader, batch_size: int, bench: Bench) -> DataLoader:
    """A DataLoader over the very images (and order) of a GPULoader, no augmentation."""
    info = DatasetInfo("synthetic", 10, tuple(loader.mean.tolist()),
                       tuple(loader.std.tolist()), tuple(loader.x.shape[2:]),
                       loader.x.shape[1], ())
    data = ImageData(loader.x.cpu(), loader.y.cpu(), info)
    return reference_loader(data, batch_size, bench, shuffle=False, augment=False,
                            drop_last=False)


@torch.no_grad()
def split_loss(model, loader: DataLoader, device) -> float:
    total, count = 0.0, 0
    for x, y in loader:
        x, y = to_device((x, y), device)
        total += F.cross_entropy(model(x), y, reduction="sum").item()
        count += len(y)
    return total / count


def section_landscape(bench: Bench) -> dict:
    """The whole path by the batched and the serial fast paths; its first
    `reference_points` points by the reference (at full size it takes minutes a point)."""
    cfg = bench.cfg
    model_a, model_b, data, alphas = path_setup(bench)
    evaluator = path_evaluator(bench, model_a, model_b, data)
    shared = min(cfg.reference_points, len(alphas))
    runners = {"fast": fast_path(bench, evaluator, alphas, cfg.points_per_pass),
               "serial": fast_path(bench, evaluator, alphas, 1),
               "reference": reference_path(bench, model_a, model_b, data, alphas[:shared])}
    paths, out = {}, {}
    for name, runner in runners.items():  # warm-up: one pass (first-call costs, autotune)
        paths[name], out[name] = measure(runner, 1, 1, bench.device)
    checks = {f"max_abs_loss_diff_{name}":
              float(np.abs(out[name][:shared] - out["reference"]).max())
              for name in ("fast", "serial")}
    checks.update({f"path_seconds_{name}": len(alphas) * paths[name]["seconds"] /
                   paths[name]["items"] for name in runners})  # the whole path, each way
    images = cfg.bn_images + cfg.path_images + cfg.path_test_images  # forwards per point
    flops = eval_flops(bench, synthetic_info()) * images
    path = comparison("points/s", paths, bench, flops, checks)
    path["default_path"] = default_path(bench)
    return {"comparisons": {f"path{len(alphas)}_bn_recalibrate": path}}


def default_path(bench: Bench) -> str:
    """The path landscape's commands take on this device with --points-per-pass 0 (their
    default): "serial" where auto_points_per_pass is 1 (CPUs), else the batched "fast". The
    CPU rule of the goals judges this path; both are measured."""
    from landscape.interpolate import auto_points_per_pass
    return "serial" if auto_points_per_pass(bench.device) == 1 else "fast"
