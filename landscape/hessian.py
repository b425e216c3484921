"""Curvature at checkpoints: `python -m landscape.hessian REF... --out FILE.h5`.

For each checkpoint, the Hessian of a loss on a fixed, seeded set of `--samples` images of
one split, w.r.t. all parameters, the encoder's or the fc's (`--params`), from exact
Hessian-vector products (HVPs; `landscape.curvature`), as `--measures` asks:

  top        the --top-k largest eigenvalues by Lanczos (eigenvectors with --eigenvectors)
  trace      the trace by Hutchinson (Rademacher probes, standard error, stopped at
             --trace-tol), and from the same probes each layer's trace (they sum to it)
  density    the spectral density by stochastic Lanczos quadrature, on an eigenvalue grid
  layer-top  each layer's top eigenvalue (the top of its diagonal block of H)

The loss: `supervised` (cross-entropy with the labels, through the checkpoint's trained fc
or the one --fc attaches) or `distill` (the cross-entropy of the student's DINO head, encoder
+ head, against --teacher's head probabilities at the temperatures given). BatchNorm runs in
eval mode with each checkpoint's own statistics (attrs bn_mode "checkpoint").

One HDF5 result (analysis `hessian`), one cell per checkpoint, written as each finishes: a
killed run re-run with the same arguments computes only the missing checkpoints; `--shard
i/n` splits them across processes (join with `python -m runs.results merge`). The notebook
twin is `landscape.spectrum(model, data, ...)`: the same plan, the same result.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from landscape import curvature as C
from landscape.network import Anchor, check_images, load_anchor, load_fc, load_teacher
from landscape.points import take
from runs.config import HelpFormatter, add_config_args, arg, config_from_args, to_dict
from runs.data import STATS, ImageData, holdout, load_splits, parse_data_options
from runs.device import PRECISIONS, autocast, resolve_device, use_bf16
from runs.errors import UserError, cli, echo_command, unknown
from runs.launch import add_launcher_args, launch, launching
from runs.progress import Progress, format_duration

ANALYSIS = "hessian"
MEASURES = ("top", "trace", "density", "layer-top")
LOSSES = ("supervised", "distill")
SPLITS = ("train", "test")
AUTO_BINS = 1001  # eigenvalue grid points of --density-grid auto
LAYER_TOP_STEPS, LAYER_TOP_TOL = 30, 1e-3  # the small Lanczos of each layer's top eigenvalue
VECTORS_FORMAT = "landscape.hessian eigenvectors/1"


@dataclass(frozen=True)
class HessianConfig:
    refs: tuple[str, ...] = arg((), "checkpoints, each one row of the result")
    loss: str = arg("supervised", "the loss: supervised (cross-entropy with the labels, "
                                  "through the trained fc) or distill (student encoder + "
                                  "head against --teacher's head probabilities)")
    teacher: str = arg("", "teacher of --loss distill, e.g. RUN@init:teacher")
    teacher_temp: float = arg(1.0, "teacher softmax temperature (--loss distill)")
    student_temp: float = arg(1.0, "student softmax temperature (--loss distill)")
    fc: str = arg("", "a trained classifier whose fc is attached, unchanged, to every "
                      "checkpoint (--loss supervised at encoders without a trained fc)")
    dataset: str = arg("", "dataset the loss is taken on; '' = the first checkpoint's")
    data_root: str = arg("", "folder (or .npz file) of the dataset; '' = its default")
    data_options: tuple[str, ...] = arg((), "dataset options as key=value (e.g. side=8)")
    input_stats: str = arg("paper", "input normalisation: paper (the paper's code's "
                                    "mean/std) or dataset (each dataset's own); with "
                                    "--dataset '' the first checkpoint's", choices=STATS)
    subset: int = arg(0, "train images per class, seeded stratified, as the run used; 0 = all")
    val_size: int = arg(0, "train images the run held out for validation (left out here)")
    split: str = arg("train", "the split the loss is taken on: train or test")
    samples: int = arg(1000, "images of the split (a fixed draw with --seed; all of the split "
                             "when it has fewer); 0 = all. Every HVP passes over all of them")
    params: str = arg("all", "parameters the Hessian is taken over: all, encoder or fc (the "
                             "head's with --loss distill: all = encoder + head)")
    measures: tuple[str, ...] = arg(MEASURES, "what to compute per checkpoint: top, trace "
                                              "(layer traces come with it), density, "
                                              "layer-top")
    top_k: int = arg(5, "eigenvalues of `top`, largest first")
    eigen_tol: float = arg(1e-4, "Lanczos stops when every top-k Ritz residual ||Hx - tx|| "
                                 "is at most this x |t| (eigenvalue errors are at most the "
                                 "residual, typically its square over the gap)")
    eigen_steps: int = arg(0, "most Lanczos steps (HVPs) of `top`; 0 = max(3 k + 30, 60)")
    trace_tol: float = arg(0.01, "Hutchinson stops when its standard error is at most this "
                                 "x |trace| (relative)")
    trace_probes: str = arg("10:200", "MIN:MAX Rademacher probes of `trace` (one HVP each)")
    slq_runs: int = arg(3, "random starts of the spectral density (SLQ)")
    slq_steps: int = arg(80, "Lanczos steps per start (the quadrature's nodes)")
    density_grid: str = arg("auto", f"eigenvalues the density is given at: auto ({AUTO_BINS} "
                                    f"points spanning each checkpoint's nodes) or LO:HI:N "
                                    f"(one grid for all; mass outside it is dropped)")
    hvp: str = arg("auto", "Hessian-vector products: jvp (forward-over-reverse, torch.func), "
                           "double-backward (autograd.grad of g.v, the plain reference) or "
                           "auto (jvp on CUDA, double-backward on CPUs: the faster there)")
    seed: int = arg(0, "seed of the image draw (--samples) and of the random vectors: "
                       "Lanczos starts (seed), probes (seed + 1), SLQ (seed + 2), layer "
                       "tops (seed + 3)")
    precision: str = arg("", "fp32 or bf16 as resolved on the device (set by --precision)")


@dataclass
class Plan:
    """Everything the measurements need, every input checked before a result file exists."""
    cfg: HessianConfig
    anchors: list[Anchor]  # the checkpoints' networks, on the CPU
    labels: list[str]  # the `checkpoint` coordinate: readable, unique
    batches: list[tuple]  # (images (B, C, H, W), labels (B,) or teacher probs (B, m)), device
    layers: list[str]  # parameter groups (module paths) of all checkpoints, first-seen order
    sizes: list[int]  # parameters each checkpoint's Hessian is taken over
    losses: list[float]  # the mean loss at each checkpoint, finite
    inputs: list[dict]  # provenance records: checkpoints (labelled), teacher, fc, data files


# ---------------------------------------------------------------------------- options


def check_options(cfg: HessianConfig) -> None:
    """Every option that needs no checkpoint or data: one line naming the flag."""
    for name in cfg.measures:
        if name not in MEASURES:
            raise unknown("measure", name, MEASURES)
    if not cfg.measures:
        raise UserError(f"--measures: name at least one of {', '.join(MEASURES)}")
    for flag, value, valid in (("--loss", cfg.loss, LOSSES), ("--split", cfg.split, SPLITS),
                               ("--params", cfg.params, C.PARAMETERS),
                               ("--hvp", cfg.hvp, C.METHODS)):
        if value not in valid:
            raise UserError(f"{flag} {value!r}: choose one of {', '.join(valid)}")
    check_roles(cfg)
    check_numbers(cfg)
    probe_range(cfg.trace_probes)
    fixed_grid(cfg.density_grid)


def check_roles(cfg: HessianConfig) -> None:
    """--teacher goes with --loss distill, --fc with --loss supervised."""
    if cfg.loss == "distill" and not cfg.teacher:
        raise UserError("--loss distill needs --teacher REF (e.g. RUN@init:teacher)")
    if cfg.loss == "supervised" and cfg.teacher:
        raise UserError(f"--teacher {cfg.teacher}: only --loss distill uses a teacher")
    if cfg.loss == "distill" and cfg.fc:
        raise UserError(f"--fc {cfg.fc}: only --loss supervised uses a classifier's fc")


def check_numbers(cfg: HessianConfig) -> None:
    """Tolerances and temperatures positive, counts at least their least value."""
    for flag, value in (("--eigen-tol", cfg.eigen_tol), ("--trace-tol", cfg.trace_tol),
                        ("--teacher-temp", cfg.teacher_temp),
                        ("--student-temp", cfg.student_temp)):
        if not 0 < value < math.inf:
            raise UserError(f"{flag} {value}: must be a positive number")
    for flag, value, least in (("--top-k", cfg.top_k, 1), ("--slq-runs", cfg.slq_runs, 1),
                               ("--slq-steps", cfg.slq_steps, 1), ("--samples", cfg.samples, 0),
                               ("--eigen-steps", cfg.eigen_steps, 0)):
        if value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")


def probe_range(text: str) -> tuple[int, int]:
    """--trace-probes MIN:MAX -> (min, max), 1 <= min <= max."""
    low, sep, high = str(text).partition(":")
    try:
        low, high = int(low), int(high)
    except ValueError:
        low = high = 0
    if not sep or not 1 <= low <= high:
        raise UserError(f"--trace-probes {text!r}: give MIN:MAX probes with 1 <= MIN <= MAX, "
                        f"e.g. 10:200")
    return low, high


def fixed_grid(text: str) -> np.ndarray | None:
    """--density-grid: None for 'auto' (each checkpoint's own), else LO:HI:N as N points."""
    if str(text).strip() == "auto":
        return None
    parts = str(text).split(":")
    try:
        low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
    except (ValueError, IndexError):
        low = high = count = 0
    if len(parts) != 3 or not (math.isfinite(low) and math.isfinite(high) and low < high
                               and 2 <= count <= 100_000):
        raise UserError(f"--density-grid {text!r}: give auto or LO:HI:N with LO < HI and "
                        f"2 <= N <= 100000, e.g. -1:50:501")
    return np.linspace(low, high, count)


# ---------------------------------------------------------------------------- the plan


def resolve_data(cfg: HessianConfig) -> HessianConfig:
    """With --dataset '', the first checkpoint's dataset fields (recorded resolved)."""
    from landscape.interpolate import resolve_data as resolve
    return resolve(cfg)


def load_samples(cfg: HessianConfig) -> ImageData:
    """The images the loss is taken on: --samples of --split, drawn with --seed."""
    train, test = load_splits(cfg.dataset, cfg.data_root, cfg.subset, seed=0,
                              stats=cfg.input_stats, **parse_data_options(cfg.data_options))
    train, _ = holdout(train, cfg.val_size, seed=0)
    return take_samples(train if cfg.split == "train" else test, cfg)


def take_samples(data: ImageData, cfg: HessianConfig) -> ImageData:
    return take(data, min(cfg.samples, len(data.y)), cfg.seed, "--samples")


def prepare(cfg: HessianConfig, device, batch_size: int = 256) -> Plan:
    """Check every input and load what the measurements need: the CLI's door, from
    checkpoint references and a dataset name."""
    check_options(cfg)
    samples = load_samples(cfg)
    supervised = cfg.loss == "supervised"
    fc = load_fc(cfg.fc, samples.info.num_classes) if cfg.fc and supervised else None
    anchors = [load_anchor(ref, supervised, not supervised, samples.info.num_classes, fc)
               for ref in cfg.refs]
    inputs = [anchor.record for anchor in anchors]
    teacher = None
    if not supervised:
        from landscape.interpolate import check_teacher
        teacher = load_teacher(cfg.teacher)
        for anchor in anchors:
            check_teacher(cfg.teacher, teacher, anchor)
        inputs.append(_record(cfg.teacher))
    if fc is not None:
        inputs.append(_record(cfg.fc))
    from landscape.interpolate import labelled
    inputs = labelled(inputs)
    labels = [record["label"] for record in inputs[:len(anchors)]]
    from runs.filehash import data_inputs  # data files by content: a resume checks them
    inputs += data_inputs(cfg.dataset, cfg.data_root, cfg.data_options)
    return make_plan(cfg, anchors, labels, samples, teacher, inputs, device, batch_size)


def _record(ref: str) -> dict:
    from runs.refs import ref_record
    return ref_record(ref)


def make_plan(cfg: HessianConfig, anchors: list[Anchor], labels: list[str], samples: ImageData,
              teacher, inputs: list[dict], device, batch_size: int = 256) -> Plan:
    """The plan both doors share, once the networks and the images are loaded: the batches
    (with the teacher's targets), the layers, and each checkpoint's loss checked finite."""
    check_options(cfg)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1 image")
    for anchor in anchors:
        check_images(anchor, tuple(samples.x.shape[1:]))
    groups = [network_groups(network(anchor), cfg.params) for anchor in anchors]
    sizes = [groups_size(g) for g in groups]
    if "top" in cfg.measures:
        C.check_k(cfg.top_k, min(sizes))
    batches = data_batches(samples, teacher, cfg, device, batch_size)
    losses = [checkpoint_loss(cfg, anchor, batches, device) for anchor in anchors]
    if cfg.precision == "bf16":
        check_bf16(cfg, anchors[0], batches, device)
    layers = list(dict.fromkeys(name for g in groups for name, _, _ in g))
    return Plan(cfg, anchors, labels, batches, layers, sizes, losses, inputs)


def network(anchor: Anchor) -> torch.nn.Module:
    """The module whose Hessian is taken: the Subject (encoder + fc or head), or a plain
    classifier as the caller gave it (its own parameter names)."""
    subject = anchor.subject
    return subject.net if subject.net is not None else subject


def network_groups(module: torch.nn.Module, params: str) -> list[tuple]:
    """(layer, start, stop) of the selected parameters (a UserError when there are none)."""
    state = dict(module.named_parameters())
    names = C.select_parameters(module, params)
    return C.parameter_groups(names, [state[name].shape for name in names])


def groups_size(groups: list[tuple]) -> int:
    return groups[-1][2] if groups else 0


def data_batches(samples: ImageData, teacher, cfg: HessianConfig, device,
                 batch_size: int) -> list[tuple]:
    """(images, target) on the device: the labels, or the teacher's head probabilities
    (softmax at --teacher-temp, computed once here)."""
    from runs.gpu_loader import eval_loader
    pairs = list(eval_loader(samples, device, batch_size).epoch(0))
    if teacher is None:
        return pairs
    teacher = teacher.to(device)
    targets = C.teacher_targets(teacher, [x for x, _ in pairs], cfg.teacher_temp)
    teacher.cpu()
    return [(x, target) for (x, _), target in zip(pairs, targets)]


def loss_function(cfg: HessianConfig):
    if cfg.loss == "supervised":
        return C.supervised_loss
    return C.distillation_loss(cfg.student_temp)


def operator(cfg: HessianConfig, module, batches, device, bf16: bool = False):
    """The Hessian of the plan's loss at `module` (already on the device), as an operator."""
    context = (lambda: autocast(device, True)) if bf16 else None
    return C.hessian_operator(module, loss_function(cfg), batches, cfg.params, cfg.hvp,
                              context)


def hvp_bf16(device, precision: str) -> bool:
    """Whether the HVPs' forward runs under bf16 autocast: only when asked (--precision
    bf16). `auto` is fp32 here, unlike the toolkit's other commands: bf16 products were 5 %
    off fp32 ones on the tiny convnet, too coarse for Lanczos at the default --eigen-tol."""
    use_bf16(device, precision)  # checks the name
    return precision == "bf16"


def check_bf16(cfg: HessianConfig, anchor: Anchor, batches, device) -> None:
    """One bf16 product at the first checkpoint, so a torch that cannot take it (forward-
    over-reverse under CPU autocast) fails here in one line, before a result exists."""
    module = network(anchor).to(device)
    try:
        op = operator(cfg, module, batches[:1], device, bf16=True)
        op(torch.ones(op.size, device=device))
    except RuntimeError as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"--precision bf16 --hvp {cfg.hvp}: torch cannot take these products "
                        f"under bf16 autocast on {device} ({first}); use --precision fp32 or "
                        f"--hvp double-backward") from None
    finally:
        module.cpu()


def checkpoint_loss(cfg: HessianConfig, anchor: Anchor, batches, device) -> float:
    """The mean loss at a checkpoint (fp32); a UserError naming it when it is not finite."""
    module = network(anchor).to(device)
    try:
        return C.check_finite_loss(operator(cfg, module, batches, device), anchor.ref)
    finally:
        module.cpu()


# ---------------------------------------------------------------------------- the result


def layout(plan: Plan) -> tuple[dict, dict, dict]:
    """(coords, metric specs, root attrs) of the result file."""
    from runs.results import MetricSpec
    cfg, measures = plan.cfg, plan.cfg.measures
    coords = {"checkpoint": list(plan.labels), "layer": list(plan.layers)}
    specs = {"loss": ((), "nats", f"{cfg.loss} loss on the {cfg.split} samples"),
             "param_count": ((), "", "parameters the Hessian is taken over"),
             "layer_size": (("layer",), "", "parameters of the layer"),
             "hvp_count": ((), "", "Hessian-vector products taken")}
    if "top" in measures:
        coords["eigen"] = np.arange(cfg.top_k)
        specs["eigenvalue"] = (("eigen",), "", "Hessian eigenvalue (largest first)")
        specs["eigen_residual"] = (("eigen",), "", "Ritz residual bound ||Hx - tx||")
    if "trace" in measures:
        coords["probe"] = np.arange(probe_range(cfg.trace_probes)[1])
        specs["trace"] = ((), "", "Hessian trace (Hutchinson)")
        specs["trace_se"] = ((), "", "standard error of the trace")
        specs["trace_probes"] = ((), "", "Rademacher probes taken")
        specs["trace_sample"] = (("probe",), "", "z'Hz of each probe (NaN after the stop)")
        specs["layer_trace"] = (("layer",), "", "trace of the layer's diagonal block")
    if "layer-top" in measures:
        specs["layer_top"] = (("layer",), "", "top eigenvalue of the layer's diagonal block")
    if "density" in measures:
        grid = fixed_grid(cfg.density_grid)
        coords["slq_run"] = np.arange(cfg.slq_runs)
        coords["slq_node"] = np.arange(min(cfg.slq_steps, max(plan.sizes)))
        coords["density_bin"] = np.arange(AUTO_BINS if grid is None else len(grid))
        specs["slq_node_value"] = (("slq_run", "slq_node"), "", "SLQ node (Ritz value)")
        specs["slq_weight"] = (("slq_run", "slq_node"), "", "SLQ weight of the node")
        specs["density"] = (("density_bin",), "", "spectral density (integrates to 1)")
        specs["density_eigenvalue"] = (("density_bin",), "", "eigenvalue of the density bin")
    metrics = {name: MetricSpec(("checkpoint", *dims), units, long_name, "f8")
               for name, (dims, units, long_name) in specs.items()}
    module = network(plan.anchors[0])
    parts = "+".join(n for n in ("encoder", "fc", "head")
                     if getattr(module, n, None) is not None) or "net"
    attrs = {"bn_mode": "checkpoint", "parts": parts,
             "layer_top_steps": LAYER_TOP_STEPS, "layer_top_tol": LAYER_TOP_TOL,
             "density_kernel": "gaussian, sigma = 2 grid steps"}
    return coords, metrics, attrs


def run(plan: Plan, path, device, bf16: bool, shard=None, overwrite: bool = False,
        stop_after: int = None, vectors: str = None):
    """Measure the plan's missing checkpoints into its result: the file at `path` (the
    CLI, resumable) or, with path None, a MemoryResult (the Python API). vectors: a .pt
    file for the top-k eigenvectors. stop_after: checkpoints to measure before returning
    early, as if killed (tests). Returns the result."""
    from runs.results import new_result
    coords, metrics, attrs = layout(plan)
    with new_result(path, ANALYSIS, coords, metrics, ("checkpoint",), plan.cfg, plan.inputs,
                    str(device), attrs, overwrite, shard) as result:
        fill(result, plan, device, bf16, stop_after, vectors)
    return result


def fill(result, plan: Plan, device, bf16: bool, stop_after: int = None,
         vectors: str = None) -> None:
    """Measure the missing checkpoints one at a time, writing each as it finishes."""
    todo = result.missing()
    missing = {index for (index,) in todo}
    done = [label for i, label in enumerate(plan.labels) if i not in missing]
    store = VectorFile(vectors, plan.cfg, done) if vectors else None
    with Progress(len(todo), ANALYSIS, "checkpoint") as bar:
        for count, (index,) in enumerate(todo):
            if stop_after is not None and count >= stop_after:
                return
            start = time.perf_counter()
            values, eigen, names = measure(plan, index, device, bf16)
            if store is not None:
                store.add(plan.labels[index], eigen, names)
            result.write((index,), **values)
            report(bar, plan.labels[index], values, time.perf_counter() - start)


def measure(plan: Plan, index: int, device, bf16: bool) -> tuple[dict, object, list]:
    """(metric values, the top-k Eigen or None, [(param name, shape)]) of one checkpoint."""
    cfg, measures = plan.cfg, plan.cfg.measures
    module = network(plan.anchors[index]).to(device)
    try:
        op = operator(cfg, module, plan.batches, device, bf16)
        state = dict(module.named_parameters())
        names = [(name, tuple(state[name].shape)) for name in op.names]
        values = {"loss": plan.losses[index], "param_count": op.size,
                  "layer_size": plan_layers(plan, {g: b - a for g, a, b in op.groups})}
        eigen = None
        if "top" in measures:
            eigen = C.top_eigen(op, cfg.top_k, cfg.eigen_tol, cfg.eigen_steps, cfg.seed)
            values.update(eigenvalue=eigen.values, eigen_residual=eigen.residuals)
        if "trace" in measures:
            values.update(trace_values(plan, op))
        if "layer-top" in measures:
            tops = C.group_top(op, LAYER_TOP_TOL, LAYER_TOP_STEPS, cfg.seed + 3)
            values["layer_top"] = plan_layers(plan, tops)
        if "density" in measures:
            values.update(density_values(plan, op))
        values["hvp_count"] = op.products
        return values, eigen, names
    finally:
        module.cpu()


def plan_layers(plan: Plan, per_layer: dict) -> np.ndarray:
    """A layer -> value map as an array over the plan's layers, NaN where absent."""
    return np.array([per_layer.get(name, np.nan) for name in plan.layers], dtype=np.float64)


def trace_values(plan: Plan, op) -> dict:
    low, high = probe_range(plan.cfg.trace_probes)
    trace = C.hutchinson(op, plan.cfg.trace_tol, low, high, plan.cfg.seed + 1)
    samples = np.full(high, np.nan)
    samples[:len(trace.samples)] = trace.samples
    return {"trace": trace.value, "trace_se": trace.se, "trace_probes": len(trace.samples),
            "trace_sample": samples, "layer_trace": plan_layers(plan, trace.groups)}


def density_values(plan: Plan, op) -> dict:
    cfg = plan.cfg
    quadrature = C.slq(op, cfg.slq_runs, cfg.slq_steps, cfg.seed + 2)
    fixed = fixed_grid(cfg.density_grid)
    grid = C.density_grid(quadrature, AUTO_BINS) if fixed is None else fixed
    width = min(cfg.slq_steps, max(plan.sizes))
    nodes, weights = (np.full((cfg.slq_runs, width), np.nan) for _ in range(2))
    steps = quadrature.nodes.shape[1]
    nodes[:, :steps], weights[:, :steps] = quadrature.nodes, quadrature.weights
    return {"slq_node_value": nodes, "slq_weight": weights,
            "density": C.density_on(quadrature, grid), "density_eigenvalue": grid}


def report(bar: Progress, label: str, values: dict, seconds: float) -> None:
    """One line per checkpoint: its label, loss, top eigenvalue, trace +- se, HVPs, time."""
    parts = [f"{label}: loss {values['loss']:.4g}"]
    if "eigenvalue" in values:
        parts.append(f"top {values['eigenvalue'][0]:.4g}")
    if "trace" in values:
        parts.append(f"trace {values['trace']:.4g} ± {values['trace_se']:.2g} "
                     f"({values['trace_probes']} probes)")
    parts.append(f"{values['hvp_count']} HVPs, {format_duration(seconds)}")
    line = f"{ANALYSIS}: {', '.join(parts)}"
    if bar.bar is not None:
        bar.bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)
    top = values["eigenvalue"][0] if "eigenvalue" in values else None
    bar.update(1, loss=values["loss"], top=top, trace=values.get("trace"))


# ---------------------------------------------------------------------------- eigenvectors


class VectorFile:
    """The --eigenvectors file: {"format", "config", "checkpoints": {label: {"eigenvalues"
    (k,), "vectors": {parameter name: (k, *shape)}}}}, read back with torch.load(path,
    weights_only=True). Entries of checkpoints the result does not hold yet are dropped;
    each checkpoint's entry is written (tmp, then rename) before its result cell."""

    def __init__(self, path, cfg: HessianConfig, done_labels):
        self.path, self.config = Path(path), json.dumps(to_dict(cfg), sort_keys=True)
        old = read_vectors(path) or {}
        kept = old.get("checkpoints", {}) if old.get("config") == self.config else {}
        self.entries = {label: kept[label] for label in done_labels if label in kept}

    def add(self, label: str, eigen, names: list) -> None:
        vectors, start = {}, 0
        for name, shape in names:
            stop = start + math.prod(shape)
            vectors[name] = eigen.vectors[:, start:stop].reshape(-1, *shape).cpu().clone()
            start = stop
        self.entries[label] = {"eigenvalues": torch.as_tensor(eigen.values.copy()),
                               "vectors": vectors}
        payload = {"format": VECTORS_FORMAT, "config": self.config,
                   "checkpoints": self.entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(payload, temporary)
        os.replace(temporary, self.path)


def read_vectors(path) -> dict | None:
    """An existing --eigenvectors file (None when there is none); a UserError when the
    path holds anything else, so it is never overwritten."""
    if not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        payload = None
    if not isinstance(payload, dict) or payload.get("format") != VECTORS_FORMAT:
        raise UserError(f"--eigenvectors {path}: exists and is not a landscape.hessian "
                        f"eigenvectors file; choose another path")
    return payload


def check_vectors(path, cfg: HessianConfig) -> None:
    if not path:
        return
    if "top" not in cfg.measures:
        raise UserError("--eigenvectors saves the top-k eigenvectors: add top to --measures")
    if os.path.isdir(path):
        raise UserError(f"--eigenvectors {path} is a folder; give a file such as "
                        f"results/hessian_vectors.pt")
    read_vectors(path)


# ---------------------------------------------------------------------------- the CLI


def measure_checkpoints(cfg: HessianConfig, out: str, device="auto", precision="auto",
                        batch_size: int = 256, shard=None, overwrite=False, vectors: str = "",
                        stop_after: int = None) -> str:
    """Run (or resume) the measurements; returns the path written."""
    from runs.refs import expand_refs
    from runs.results import parse_shard, shard_path
    check_options(cfg)
    refs = tuple(expand_refs(cfg.refs))  # RUN@epochs: one checkpoint per saved epoch
    if len(set(refs)) != len(refs) or not refs:
        raise UserError(f"give each checkpoint once: {' '.join(cfg.refs) or 'none given'}")
    device = resolve_device(device)
    bf16 = hvp_bf16(device, precision)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    path = shard_path(out, *shard) if shard else out
    cfg = dataclasses.replace(cfg, refs=refs, precision="bf16" if bf16 else "fp32",
                              hvp=chosen_method(cfg.hvp, device, path, overwrite))
    cfg = resolve_data(cfg)
    vectors = shard_path(vectors, *shard) if vectors and shard else vectors
    check_vectors(vectors, cfg)
    plan = prepare(cfg, device, batch_size)
    run(plan, path, device, bf16, shard, overwrite, stop_after, vectors or None)
    return path


def chosen_method(hvp: str, device, path, overwrite: bool = False) -> str:
    """--hvp as the result records it: auto is the method a result already at `path` was
    measured with (so a resume, on any device, continues it), else the device's faster
    one (landscape.curvature.resolve_method)."""
    if hvp == "auto" and not overwrite and Path(path).is_file():
        from runs.results import open_result
        try:
            recorded = open_result(path, ANALYSIS).config.get("hvp")
        except UserError:
            recorded = None  # not a readable result: creating it reports that
        if recorded in C.METHODS:
            return recorded
    return C.resolve_method(hvp, device)


def summary(path: str) -> str:
    """One row per checkpoint: loss, top eigenvalue, trace +- se, HVPs."""
    from runs.results import open_result
    data = open_result(path, ANALYSIS)
    rows = [f"{'checkpoint':>28}  {'loss':>10}  {'top':>10}  {'trace':>22}  {'HVPs':>6}"]
    for i, label in enumerate(data.coords["checkpoint"]):
        if not data.done[i]:
            rows.append(f"{label:>28}  (not done)")
            continue
        metric = data.metrics
        top = f"{metric['eigenvalue'][i, 0]:.4g}" if "eigenvalue" in metric else "-"
        trace = (f"{metric['trace'][i]:.4g} ± {metric['trace_se'][i]:.2g}"
                 if "trace" in metric else "-")
        rows.append(f"{label:>28}  {metric['loss'][i]:10.4g}  {top:>10}  {trace:>22}  "
                    f"{int(metric['hvp_count'][i]):6d}")
    return "\n".join([*rows, f"{path}: {int(data.done.sum())} of {data.done.size} "
                             f"checkpoints done"])


HELP = __doc__ + """
Costs, in HVPs per checkpoint (one HVP costs about two forward + backward passes over
--samples images; the loss check one forward pass):
  top        at most --eigen-steps (default max(3 k + 30, 60)), fewer once converged
  trace      one per probe: --trace-probes MIN to MAX (layer traces cost nothing more)
  density    --slq-runs x --slq-steps (default 240)
  layer-top  one small Lanczos per layer: at most 30 per layer (a ResNet18 has ~60 layers)
"""
EPILOG = r"""examples:
  python -m landscape.hessian store/train_x/seed_0@epochs --samples 1000 --out curv.h5
  python -m landscape.hessian student:=RUN@last teacher:=RUN@init:teacher --loss distill \
      --teacher RUN@init:teacher --params encoder --measures top trace --top-k 10
  python -m landscape.hessian RUN@last --params fc --eigenvectors vectors.pt --out fc.h5
  python -m landscape.hessian RUN@last --density-grid -5:200:801 --device cuda
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m landscape.hessian", description=HELP,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("refs", nargs="+", metavar="REF", help="checkpoint references (RUN@last, "
                   "RUN@2ep, RUN@epochs, file.pt, LABEL:=REF, ...)")
    p.add_argument("--out", default="results/hessian.h5", help="HDF5 result file")
    p.add_argument("--eigenvectors", default="", metavar="FILE.pt", help="also save the "
                   "top-k eigenvectors of each checkpoint (one tensor per parameter, (k, "
                   "*shape)); read back with torch.load(FILE, weights_only=True)")
    p.add_argument("--shard", default=None, help="i/n: measure only this shard's "
                   "checkpoints, into OUT's shard file")
    p.add_argument("--overwrite", action="store_true", help="replace a result file of "
                   "another config")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="bf16: autocast around the HVPs' forward only (the eigensolvers "
                   "stay fp32); auto = fp32 here, on every device (bf16 products were 5 %% "
                   "off fp32 ones on a tiny convnet)")
    p.add_argument("--batch-size", type=int, default=256, help="images per HVP pass (the "
                   "sums are exact: the result does not depend on it)")
    add_config_args(p, HessianConfig, exclude=("refs", "precision"), group="curvature")
    add_launcher_args(p)
    return p


@cli
def main(argv=None) -> int:
    from landscape.geometry import join_negative
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(join_negative(argv, ("--density-grid",)))
    echo_command("landscape.hessian", argv)
    if launching(args):
        return launch(main, argv, args, args.out)
    cfg = config_from_args(HessianConfig, args, refs=tuple(args.refs), precision="")
    path = measure_checkpoints(cfg, args.out, args.device, args.precision, args.batch_size,
                               args.shard, args.overwrite, args.eigenvectors)
    print(summary(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
