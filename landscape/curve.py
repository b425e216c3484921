"""Trained low-loss curves between two networks: `python -m landscape.curve A B --kind ...`.

Garipov et al. 2018 ("Loss Surfaces, Mode Connectivity, and Fast Ensembling"): a curve
phi(t), t in [0, 1], with phi(0) = A and phi(1) = B and one trainable bend theta:
- bezier:    phi(t) = (1 - t)^2 A + 2 t (1 - t) theta + t^2 B   (quadratic Bezier)
- polychain: phi(t) = A -> theta on [0, 1/2], theta -> B on [1/2, 1] (one bend at t = 1/2)
theta starts at the midpoint (A + B) / 2 (so the untrained curve is the straight line) and
is the only thing trained: plain SGD with momentum (cosine or constant lr) on the
supervised cross-entropy at one uniformly random t per step, BN in train mode on the batch.
The bend is a run in the store (kind `curve`, its folder named by the endpoints' content and
the config; `RUN@last` loads the bend network): a killed training resumes from its last
checkpoint, a finished one is never trained again.

Then the curve and the straight line between A and B are measured on the same t grid (loss
and error on train and test, BN recalibrated per point by default, as interpolate does),
with the barriers along both (landscape.barrier). One HDF5 result, analysis `curve`; one
cell per path, so a killed measurement resumes at the path it was on.
"""

import argparse
import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape import geometry as G
from landscape.barrier import NAMES, barriers
from landscape.batchnorm import MODES, check_mode, interpolate_buffers
from landscape.interpolate import auto_points_per_pass, labelled
from landscape.network import Anchor, check_images, check_same_architecture, first_difference
from landscape.points import SPLITS, Measures, PointEvaluator, eval_data
from runs.config import HelpFormatter, add_config_args, arg, check_fields, config_from_args
from runs.device import autocast, resolve_device, use_bf16
from runs.errors import UserError, cli, echo_command, unknown
from runs.progress import Progress

ANALYSIS = "curve"
KINDS = ("bezier", "polychain")
SCHEDULES = ("cosine", "constant")
PATHS = ("curve", "line")  # the `path` coordinate: the trained curve, the straight line
BARRIER_UNITS = {"error_barrier": "fraction", "loss_barrier_mean": "nats",
                 "loss_barrier_linear": "nats"}


@dataclass(frozen=True)
class CurveConfig:
    """How the bend is trained: the curve run's identity (its store folder)."""
    a: str = arg("", "endpoint A (t = 0): a checkpoint reference", content="ref")
    b: str = arg("", "endpoint B (t = 1): a checkpoint reference", content="ref")
    kind: str = arg("bezier", "curve family: bezier (quadratic) or polychain (one bend at "
                              "t = 1/2)", choices=KINDS)
    num_steps: int = arg(0, "SGD steps on the bend (set by --steps)")
    batch_size: int = arg(128, "images per step")
    lr: float = arg(0.05, "peak learning rate of the bend")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(0.0, "L2 weight decay on the bend")
    schedule: str = arg("cosine", "learning-rate schedule", choices=SCHEDULES)
    dataset: str = arg("", "dataset to train and measure on; '' = A's")
    data_root: str = arg("", "folder (or .npz file) of the dataset; '' = its default")
    data_options: tuple[str, ...] = arg((), "dataset options as key=value (e.g. side=8)")
    input_stats: str = arg("paper", "input normalisation: paper or dataset")
    subset: int = arg(0, "train images per class, seeded stratified, as A's run used")
    val_size: int = arg(0, "train images A's run held out for validation (left out here)")
    seed: int = arg(0, "seed of the random t per step and of the data order")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise unknown("--kind", self.kind, KINDS)
        if self.schedule not in SCHEDULES:
            raise unknown("--schedule", self.schedule, SCHEDULES)
        check_fields(self, {
            "batch_size": (lambda v: v >= 1, "must be at least 1 image"),
            "lr": (lambda v: 0 < v < math.inf, "must be a positive number"),
            "momentum": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
            "weight_decay": (lambda v: 0 <= v < math.inf, "must be 0 or positive"),
        })


@dataclass(frozen=True)
class CurveScan:
    """How the curve and the line are measured (the result's, not the run's, config)."""
    grid: str = arg("0:1:21", "t coordinates of both paths; must hold 0 and 1")
    bn_mode: str = arg("recalibrate", "BatchNorm statistics per point (interpolate: A's and "
                                      "B's mixed with weights 1 - t, t)", choices=MODES)
    bn_samples: int = arg(2048, "fixed training images for BN recalibration; 0 = all")
    bn_batch_size: int = arg(256, "images per recalibration batch")
    train_samples: int = arg(0, "train images measured (seeded draw); 0 = all")
    test_samples: int = arg(0, "test images measured (seeded draw); 0 = all")
    sample_seed: int = arg(0, "seed of the measured and BN image draws")


# ---------------------------------------------------------------------------- the curve


def curve_point(kind: str, a: dict, bend: dict, b: dict, t) -> dict:
    """name -> phi(t) for t a float, a 0-d tensor, or a (P, 1, ..., 1)-broadcastable tensor.

    Exact at the ends: t = 0 gives A's and t = 1 B's tensors bit for bit (bezier: the other
    terms are exact zeros; polychain: torch.lerp is exact at weights 0 and 1).
    """
    out = {}
    for name, start in a.items():
        theta, end = bend[name], b[name]
        if kind == "bezier":
            out[name] = (1 - t) ** 2 * start + 2 * t * (1 - t) * theta + t ** 2 * end
        elif torch.is_tensor(t) and t.dim():
            first = torch.lerp(start, theta, (2 * t).clamp(max=1))
            out[name] = torch.where(t < 0.5, first, torch.lerp(theta, end, (2 * t - 1)
                                                                .clamp(min=0)))
        else:
            t = float(t)
            out[name] = torch.lerp(start, theta, 2 * t) if t < 0.5 else \
                torch.lerp(theta, end, 2 * t - 1)
    return out


class CurveGeometry:
    """The curve as a scan geometry (what PointEvaluator reads): coords (P, 1) = t."""

    kind = "curve"

    def __init__(self, kind: str, a: dict, bend: dict, b: dict, buffers: list[dict]):
        self.curve, self.a, self.bend, self.b, self.buffers = kind, a, bend, b, buffers
        self.anchor_coords = {"A": [0.0], "B": [1.0]}

    def to(self, device) -> "CurveGeometry":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        self.a, self.bend, self.b = move(self.a), move(self.bend), move(self.b)
        self.buffers = [move(b) for b in self.buffers]
        return self

    def params_at(self, coords) -> dict:
        """name -> (P, *shape) points of the curve at t = coords[:, 0]."""
        t = torch.as_tensor(coords, dtype=torch.float64)[:, 0]
        out = {}
        for name, start in self.a.items():
            view = t.to(start.device, start.dtype).view(-1, *([1] * start.dim()))  # (P, 1..)
            out.update(curve_point(self.curve, {name: start[None]}, {name: self.bend[name][None]},
                                   {name: self.b[name][None]}, view))
        return out

    def buffers_at(self, coords, mode: str) -> dict:
        t = torch.as_tensor(coords, dtype=torch.float64)[:, 0]
        if mode == "keep":
            return {k: v[None].expand(len(t), *v.shape) for k, v in self.buffers[0].items()}
        weights = torch.stack([1 - t, t], 1)  # (P, 2): the line's mix of A's and B's stats
        return interpolate_buffers(self.buffers, weights)


# ---------------------------------------------------------------------------- training


@dataclass
class Trainer:
    """Everything the bend's training loop touches."""
    cfg: CurveConfig
    a: dict  # A's parameters, frozen: name -> tensor on the device
    b: dict  # B's
    bend: nn.Module  # a Subject whose parameters are theta (the only ones trained)
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator  # draws t, one per step (CPU)
    loader: object  # shuffled train batches
    device: torch.device
    bf16: bool = False


def lr_factor(cfg: CurveConfig, step: int) -> float:
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step / max(cfg.num_steps, 1), 1.0)))


def midpoint(a: dict, b: dict) -> dict:
    return {name: (a[name] + b[name]) / 2 for name in a}


def make_trainer(cfg: CurveConfig, a: nn.Module, b: nn.Module, bend: nn.Module, train,
                 device, bf16: bool = False) -> Trainer:
    """bend: the module trained (its parameters set to the midpoint here); a, b: the
    endpoints (same parameter names); train: ImageData of the training split."""
    from runs.engines import engine
    from runs.gpu_loader import Augment
    pa = {k: v.detach().to(device) for k, v in a.named_parameters()}
    pb = {k: v.detach().to(device) for k, v in b.named_parameters()}
    bend.to(device)
    with torch.no_grad():
        for name, param in bend.named_parameters():
            param.copy_((pa[name] + pb[name]) / 2)
    optimizer = torch.optim.SGD(bend.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    loader = engine.train_loader(train, cfg.batch_size, device, cfg.seed, Augment())
    generator = torch.Generator().manual_seed(cfg.seed)
    return Trainer(cfg, pa, pb, bend, optimizer, scheduler, generator, loader,
                   torch.device(device), bf16)


def train_step(tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One SGD step on the bend: the loss of phi(t) at t ~ U(0, 1), BN on the batch."""
    t = torch.rand((), generator=tr.generator, dtype=torch.float64).item()
    theta = dict(tr.bend.named_parameters())
    point = curve_point(tr.cfg.kind, tr.a, theta, tr.b, t)
    tr.bend.train()
    with autocast(tr.device, tr.bf16):
        out = functional_call(tr.bend, point, (x,), {"parts": ("embedding", "logits")})
    loss = F.cross_entropy(out["logits"].float(), y)  # (B, classes) -> mean nats
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    tr.scheduler.step()
    return loss.detach()


def fit(tr: Trainer, start: int = 0, save=None, stop_at: int = None) -> float:
    """Train from step `start` to cfg.num_steps; save(step, final) at epoch ends, at the
    end and at `stop_at` (tests: a kill); returns the mean loss of the last epoch."""
    from runs.engines import engine
    losses = []
    with Progress(tr.cfg.num_steps, "curve", "step", start) as bar:
        for step, x, y in engine.batches(tr.loader, start, tr.cfg.num_steps):
            losses = [*losses[-len(tr.loader) + 1:], train_step(tr, x, y)]
            engine.check_finite(losses[-1], step, None)
            bar.update(1)
            last = step == tr.cfg.num_steps
            if save is not None and (last or step == stop_at or step % len(tr.loader) == 0):
                save(step, last)
            if step == stop_at:
                return math.nan
    return float(torch.stack(losses).mean()) if losses else math.nan


# ---------------------------------------------------------------------------- the run


def bend_state(tr: Trainer) -> dict:
    """The extra state a resume needs beyond weights, optimiser and schedule."""
    return {"kind": "curve", "t_rng": tr.generator.get_state(),
            "steps_per_epoch": len(tr.loader)}


def save_bend(tr: Trainer, model: nn.Module, run, step: int, final: bool) -> None:
    """The bend network (the registry model whose encoder and fc are the bend) as a
    checkpoint: kept at step 0 and at the end, else the run's resume file."""
    from runs.checkpoint import save_checkpoint
    from runs.engines import engine
    from runs.store import content_fields, to_store
    run.require()
    config, moved = to_store(dataclasses.asdict(tr.cfg), content_fields(tr.cfg), run.root)
    extra = bend_state(tr) | ({"store_relative": moved} if moved else {})
    path = run.ckpt_path(step) if final or step == 0 else engine.resume_path(run)
    save_checkpoint(path, model, step, config=config, optimizer=tr.optimizer,
                    scheduler=tr.scheduler, extra=extra)


def resume(tr: Trainer, model: nn.Module, run) -> int:
    """Restore the newest checkpoint of the run into the trainer; its step (0 = fresh)."""
    from runs.engines import engine
    latest = engine.latest_state(run)
    if latest is None:
        save_bend(tr, model, run, 0, False)
        return 0
    step, path = latest
    payload = engine.restore(path, model, tr.optimizer, tr.scheduler)
    tr.generator.set_state(payload["extra"]["t_rng"])
    return step


def train_curve(cfg: CurveConfig, model: nn.Module, anchors: list[Anchor], train, store: str,
                device, bf16: bool, stop_at: int = None):
    """Train (or resume, or reuse) the curve run; returns (run, bend Subject).

    model: a copy of A's registry model; its encoder and fc become the bend."""
    from landscape.network import Subject
    from runs.results import WriteLock
    from runs.store import open_run
    bend = Subject(model.encoder, model.fc)
    tr = make_trainer(cfg, anchors[0].subject, anchors[1].subject, bend, train, device, bf16)
    run = open_run(store, "curve", cfg, extra={"model_spec": model.spec,
                                               "steps_per_epoch": len(tr.loader),
                                               "endpoints": [cfg.a, cfg.b]})
    lock = WriteLock(run.path).acquire()
    try:
        if run.done:
            from runs.engines import engine
            engine.restore(run.ckpt_path(cfg.num_steps), model)
            return run, bend
        start = resume(tr, model, run)
        loss = fit(tr, start, lambda s, last: save_bend(tr, model, run, s, last), stop_at)
        if stop_at is None or stop_at >= cfg.num_steps:
            run.mark_done({"step": cfg.num_steps, "train_loss_last_epoch": loss})
    finally:
        lock.release()
    return run, bend


# ---------------------------------------------------------------------------- measuring


def layout(ts: np.ndarray) -> tuple[dict, dict]:
    coords = {"path": list(PATHS), "t": ts, "split": list(SPLITS)}
    return coords, curve_specs(("path", "t", "split"), ("path", "split"))


def curve_specs(along: tuple, per_curve: tuple) -> dict:
    """The metrics of curves measured point by point: loss and error over `along`, the
    barriers over `per_curve` (also landscape.layerwise's sweeps)."""
    from runs.results import MetricSpec
    metrics = {"loss": MetricSpec(along, "nats", "cross-entropy loss"),
               "error": MetricSpec(along, "fraction", "classification error")}
    for name in NAMES:
        metrics[name] = MetricSpec(per_curve, BARRIER_UNITS[name], name.replace("_", " "))
    return metrics


def path_values(evaluator: PointEvaluator, xs: np.ndarray, per_pass: int) -> dict:
    """loss, error (x, split) along one path (or sweep) and its barriers (split,)."""
    points = []
    for start in range(0, len(xs), per_pass):
        points += evaluator.evaluate(xs[start:start + per_pass, None], per_pass > 1)
    loss = np.array([p["loss"] for p in points])  # (x, split)
    error = np.array([p["error"] for p in points])
    return {"loss": loss, "error": error, **barriers(loss.T, error.T, xs)}


def measure(result, subject_a, geometries: dict, scan: CurveScan, data, ts, device, bf16,
            per_pass: int) -> None:
    """Fill the result's missing paths (one cell each)."""
    todo = result.missing()
    evaluator = None
    with Progress(len(todo), ANALYSIS, "path") as bar:
        for (index,) in todo:
            geometry = geometries[PATHS[index]].to(device)
            if evaluator is None:
                evaluator = PointEvaluator(subject_a, geometry, scan.bn_mode, data,
                                           Measures(("supervised",)), None, device, bf16)
            evaluator.geometry = geometry
            result.write((index,), **path_values(evaluator, ts, per_pass))
            bar.update(1)


def geometries(kind: str, a: nn.Module, bend: nn.Module, b: nn.Module) -> dict:
    """The trained curve and the straight line, as scan geometries on the CPU."""
    (pa, ba), (pb, bb) = G.split_state(a), G.split_state(b)
    theta = {k: v.detach().cpu().clone() for k, v in bend.named_parameters()}
    return {"curve": CurveGeometry(kind, pa, theta, pb, [ba, bb]), "line": G.line(a, b)}


def in_memory(a: nn.Module, b: nn.Module, train, test, cfg: CurveConfig, scan: CurveScan,
              names=("A", "B"), device="cpu", bf16: bool = False, points_per_pass: int = 0,
              eval_batch_size: int = 512) -> tuple:
    """The Python API's door: (xarray.Dataset as the CLI writes, trained bend Subject).
    a, b: in-memory modules (never changed); train, test: ImageData."""
    from landscape.network import module_anchor
    from runs.results import new_result
    ts = check_scan(scan)
    anchors = [module_anchor(m, label, True, False) for m, label in zip((a, b), names)]
    check_pair(anchors)
    check_images(anchors[0], tuple(train.x.shape[1:]))
    bend = copy.deepcopy(anchors[0].subject)
    tr = make_trainer(cfg, anchors[0].subject, anchors[1].subject, bend, train, device, bf16)
    fit(tr)
    data = eval_data(train, test, device, eval_batch_size, scan.train_samples,
                     scan.test_samples, scan.bn_samples, scan.bn_batch_size, scan.sample_seed,
                     with_bn=scan.bn_mode == "recalibrate", batch_flag="eval_batch_size")
    coords, metrics = layout(ts)
    attrs = {"kind": cfg.kind, "bn_mode": scan.bn_mode, "endpoints": list(names), "bend": ""}
    config = {"curve": dataclasses.asdict(cfg), "scan": dataclasses.asdict(scan),
              "precision": "bf16" if bf16 else "fp32"}
    inputs = [anchor.record for anchor in anchors]
    paths = geometries(cfg.kind, anchors[0].subject, bend.cpu(), anchors[1].subject)
    per_pass = points_per_pass or auto_points_per_pass(torch.device(device))
    result = new_result(None, ANALYSIS, coords, metrics, ("path",), config, inputs,
                        str(device), attrs)
    measure(result, anchors[0].subject, paths, scan, data, ts, device, bf16, per_pass)
    return result.dataset(), bend


# ---------------------------------------------------------------------------- the CLI's door


def check_pair(anchors: list[Anchor]) -> None:
    """Different architectures: one line naming the first mismatched parameter."""
    a, b = anchors
    shapes = [{k: tuple(v.shape) for k, v in x.subject.state_dict().items()} for x in anchors]
    if differs := first_difference(*shapes):
        raise UserError(f"{a.ref} and {b.ref} are different architectures: {differs}; a "
                        f"curve joins two networks of one architecture")
    check_same_architecture(anchors)


def resolve_data(cfg: CurveConfig) -> CurveConfig:
    """With --dataset '', A's dataset fields."""
    if cfg.dataset:
        return cfg
    from runs.refs import load_model
    found = load_model(cfg.a).config or {}
    if not found.get("dataset"):
        raise UserError(f"{cfg.a} records no dataset; give --dataset (e.g. --dataset cifar10)")
    fields = {k: found[k] for k in ("dataset", "data_root", "subset", "val_size",
                                    "input_stats") if k in found}
    fields["data_options"] = tuple(found.get("data_options", ()))
    return dataclasses.replace(cfg, **fields)


def load_splits_of(cfg: CurveConfig) -> tuple:
    from runs.data import holdout, load_splits, parse_data_options
    train, test = load_splits(cfg.dataset, cfg.data_root, cfg.subset, seed=0,
                              stats=cfg.input_stats, **parse_data_options(cfg.data_options))
    train, _ = holdout(train, cfg.val_size, seed=0)
    return train, test


def check_scan(scan: CurveScan) -> np.ndarray:
    check_mode(scan.bn_mode)
    ts = G.parse_grid(scan.grid, "--grid")
    if ts.min() < 0 or ts.max() > 1:
        raise UserError(f"--grid {scan.grid}: t runs over [0, 1] along a curve; give "
                        f"coordinates in it, e.g. 0:1:21")
    barriers(np.zeros(len(ts)), np.zeros(len(ts)), ts)  # 0 and 1 on the grid
    return ts


def resolve_steps(cfg: CurveConfig, steps: str, steps_per_epoch: int) -> CurveConfig:
    from runs.config import parse_steps
    count = parse_steps(steps, steps_per_epoch, flag="--steps")
    if count < 1:
        raise UserError(f"--steps {steps}: must be at least 1 step of the bend")
    return dataclasses.replace(cfg, num_steps=count)


def curve(cfg: CurveConfig, scan: CurveScan, steps: str, store: str, out: str, device="auto",
          precision="auto", points_per_pass: int = 0, eval_batch_size: int = 512,
          overwrite: bool = False, stop_at: int = None) -> str:
    """Train (or reuse) the bend, then measure the curve and the line; returns `out`.
    stop_at: a step at which training stops as if killed (tests); nothing is measured."""
    from landscape.network import load_anchor
    from runs.filehash import data_inputs
    from runs.refs import load_model, ref_record
    from runs.results import new_result
    from runs.store import check_store
    ts = check_scan(scan)
    check_store(store)
    if points_per_pass < 0:
        raise UserError(f"--points-per-pass {points_per_pass}: must be >= 1 (0 = auto)")
    device = resolve_device(device)
    bf16 = use_bf16(device, precision)
    cfg = resolve_data(cfg)
    train, test = load_splits_of(cfg)
    num_classes = train.info.num_classes
    anchors = [load_anchor(ref, True, False, num_classes) for ref in (cfg.a, cfg.b)]
    check_pair(anchors)
    check_images(anchors[0], tuple(train.x.shape[1:]))
    per_epoch = math.ceil(len(train.y) / cfg.batch_size)
    cfg = resolve_steps(cfg, steps, per_epoch)
    data = eval_data(train, test, device, eval_batch_size, scan.train_samples,
                     scan.test_samples, scan.bn_samples, scan.bn_batch_size, scan.sample_seed,
                     with_bn=scan.bn_mode == "recalibrate", batch_flag="--eval-batch-size")
    model = copy.deepcopy(load_model(cfg.a).model)
    run, bend = train_curve(cfg, model, anchors, train, store, device, bf16, stop_at)
    if not run.done:
        return out
    bend_ref = f"{run.path}@last"
    inputs = labelled([a.record for a in anchors] + [ref_record(bend_ref)])
    inputs += data_inputs(cfg.dataset, cfg.data_root, cfg.data_options)
    coords, metrics = layout(ts)
    attrs = {"kind": cfg.kind, "bn_mode": scan.bn_mode,
             "endpoints": [r["label"] for r in inputs[:2]],
             "bend": os.path.relpath(run.ckpt_path(cfg.num_steps), store)}
    config = {"curve": dataclasses.asdict(cfg), "scan": dataclasses.asdict(scan),
              "precision": "bf16" if bf16 else "fp32"}
    a_subject, b_subject = anchors[0].subject, anchors[1].subject
    paths = geometries(cfg.kind, a_subject, bend.cpu(), b_subject)
    per_pass = points_per_pass or auto_points_per_pass(device)
    with new_result(out, ANALYSIS, coords, metrics, ("path",), config, inputs, str(device),
                    attrs, overwrite) as result:
        measure(result, a_subject, paths, scan, data, ts, device, bf16, per_pass)
    return out


def summary(path: str) -> str:
    """Barriers of the curve and the line, per split."""
    from runs.results import open_result
    data = open_result(path, ANALYSIS)
    lines = [f"{'path':>6}  " + "  ".join(f"{n}[{s}]" for n in NAMES[:2] for s in SPLITS)]
    for p, label in enumerate(data.coords["path"]):
        cells = [data.metrics[n][p, s] for n in NAMES[:2] for s in range(len(SPLITS))]
        lines.append(f"{label:>6}  " + "  ".join(f"{v:22.4f}" for v in cells))
    return "\n".join(lines + [f"{path}: {int(data.done.sum())} of {data.done.size} paths "
                              f"done; bend {data.attrs.get('bend')}"])


EPILOG = r"""examples:
  python -m landscape.curve store/train_a/seed_0@last store/train_b/seed_0@last \
      --kind bezier --steps 20ep --lr 0.05 --store store --out results/curve.h5
  python -m landscape.curve A@last B@last --kind polychain --steps 2000 --grid 0:1:41"""


def add_measuring_args(p: argparse.ArgumentParser, out: str) -> None:
    """--out, --overwrite, --device, --precision, --points-per-pass (curve, layerwise)."""
    p.add_argument("--out", default=out, help="HDF5 result file")
    p.add_argument("--overwrite", action="store_true", help="replace a result of another "
                   "config")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--points-per-pass", type=int, default=0, help="points evaluated "
                   "together under vmap; 0 = auto (8 CUDA, 1 CPU)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m landscape.curve", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("a", metavar="A", help="endpoint A (t = 0): a checkpoint reference")
    p.add_argument("b", metavar="B", help="endpoint B (t = 1): a checkpoint reference")
    p.add_argument("--steps", default="10ep", help="SGD steps on the bend: iterations or "
                   "epochs of A's train split (e.g. 20ep)")
    p.add_argument("--store", default="store", help="run store holding the curve run")
    add_measuring_args(p, "results/curve.h5")
    p.add_argument("--eval-batch-size", type=int, default=512, help="images per forward "
                   "pass when measuring")
    add_config_args(p, CurveConfig, exclude=("a", "b", "num_steps"), group="the bend")
    add_config_args(p, CurveScan, group="measuring")
    return p


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    echo_command("landscape.curve", argv)
    cfg = config_from_args(CurveConfig, args, a=args.a, b=args.b, num_steps=0)
    scan = config_from_args(CurveScan, args)
    path = curve(cfg, scan, args.steps, args.store, args.out, args.device, args.precision,
                 args.points_per_pass, args.eval_batch_size, args.overwrite)
    print(summary(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
