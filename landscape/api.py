"""The landscape analyses as functions on in-memory models: what a notebook calls.

    ds = landscape.path(model_a, model_b, (images, labels), alphas=np.linspace(0, 1, 11))
    ds = landscape.plane(a, b, c, "digits", alphas=grid, betas=grid, basis="orthonormal")
    ds = landscape.directions(model, data, grid, n=2, seed=0)
    landscape.barriers(ds)                  # error and loss barriers of a path result
    ds = landscape.spectrum(model, "digits", k=5, params="fc")   # curvature at the model

Each returns the `xarray.Dataset` that `python -m landscape.interpolate` writes for the same
inputs (variables, coordinates, attributes): both doors build one `interpolate.Plan` and
fill its result through `interpolate.run` (`spectrum`: `landscape.hessian`'s plan and run);
`runs.save(ds, path)` writes the file.

Models: any `nn.Module`. Registry-protocol modules (`encoder`, `fc`, `embed_dim`) move
encoder + fc, as the CLI does (with `head`, as `runs.load(ref, head=True)` gives, encoder +
DINO head for `metrics=("distill",)`); any other classifier moves whole, and names its
embedding with `embed=` (a layer name or a callable embed(module, images)) where `knn`,
`linear` or `linear-adamw` is measured. Data: a registered dataset name, a pair (images,
labels), a torch Dataset or ImageData; `test=` the test split (default: a name's own test
split, else the same data).
"""

import copy
import dataclasses

import numpy as np
import xarray as xr
from torch import nn

from landscape import interpolate as I
from landscape.barrier import barriers as barrier_values
from landscape.network import Subject, check_same_architecture, module_anchor
from landscape.points import eval_data
from runs.data import as_splits
from runs.device import resolve_device, use_bf16
from runs.errors import UserError, unknown

# Options of every scan: InterpolateConfig's fields a caller may set, and how it runs.
SCAN_FIELDS = ("bn_samples", "bn_batch_size", "train_samples", "test_samples", "knn_k",
               "teacher_temp", "student_temp", "data_root", "linear_l2", "linear_features",
               "input_stats", "hessian_k", "hessian_tol", "hessian_probes", "hessian_eigen_tol",
               "hessian_samples", "hessian_split", "hessian_at", "hessian_beta_at",
               "align", "refine", "refine_max", "refine_split")
RUNTIME = {"device": "auto", "precision": "auto", "points_per_pass": 0, "batch_size": 512}


def path(a: nn.Module, b: nn.Module, data, alphas=None, *, test=None,
         metrics=("supervised", "norm"), bn_mode: str = "recalibrate", teacher=None,
         embed=None, names=("A", "B"), **options) -> xr.Dataset:
    """The linear path theta(alpha) = (1 - alpha) theta_A + alpha theta_B.

    alphas: coordinates (default 25 from 0 to 1; any values, beyond [0, 1] too).
    metrics: supervised (loss, error), distill (CE, KL to `teacher`), knn, linear (L-BFGS
    probe at one L2 strength: attrs linear_l2), linear-adamw (the paper's probe), norm.
    bn_mode: recalibrate (default), keep or interpolate. names: the two models' labels.
    options: bn_samples, bn_batch_size, train_samples, test_samples, knn_k, teacher_temp,
    student_temp, linear_l2 ("auto" or a number), linear_features, data_root and input_stats
    (with a dataset name), device, precision, points_per_pass, batch_size, as the CLI's flags.
    """
    grid = {"alpha": _coords(alphas, "alphas")}
    return _scan([a, b], names, grid, data, test, metrics, bn_mode, teacher, embed, options)


def plane(a: nn.Module, b: nn.Module, c: nn.Module, data, alphas=None, betas=None, *,
          basis: str = "lstsq", test=None, metrics=("supervised", "norm"),
          bn_mode: str = "recalibrate", teacher=None, embed=None, names=("A", "B", "C"),
          **options) -> xr.Dataset:
    """The plane through A, B, C on an (alpha, beta) grid: basis `lstsq` puts them at
    (0, 0), (1, 0), (0, 1); `orthonormal` keeps distances and angles (unit |B - A|).
    betas default to alphas; the rest as `path`."""
    alphas = _coords(alphas, "alphas")
    grid = {"alpha": alphas, "beta": alphas if betas is None else _coords(betas, "betas")}
    return _scan([a, b, c], names, grid, data, test, metrics, bn_mode, teacher, embed,
                 {**options, "basis": basis})


def directions(model: nn.Module, data, grid=None, n: int = 1, seed: int = 0, *, betas=None,
               test=None, metrics=("supervised", "norm"), bn_mode: str = "recalibrate",
               teacher=None, embed=None, name: str = "center", **options) -> xr.Dataset:
    """`n` (1 or 2) random filter-normalised directions around `model` (Li et al. 2018),
    drawn from `seed`; grid: the coordinates along each (betas: the second's, default
    grid). bn_mode keep or recalibrate; the rest as `path`."""
    if n not in (1, 2):
        raise UserError(f"n={n}: random directions span 1 or 2 axes")
    grid = _coords(grid, "grid")
    axes = {"alpha": grid}
    if n == 2:
        axes["beta"] = grid if betas is None else _coords(betas, "betas")
    return _scan([model], (name,), axes, data, test, metrics, bn_mode, teacher, embed,
                 {**options, "directions": n, "seed": seed})


def barriers(ds: xr.Dataset) -> xr.Dataset:
    """Error and loss barriers of a path result (DESIGN.md's definitions), per split.

    error_barrier: max_a E(a) - (E(0) + E(1)) / 2; loss_barrier_mean: the same with the
    loss; loss_barrier_linear: max_a [L(a) - ((1 - a) L(0) + a L(1))]. The maxima run over
    the grid points in [0, 1]; the grid must hold 0 and 1. Any leading axes (e.g. a path
    per pair) are kept.
    """
    for name in ("loss", "error"):
        if name not in ds:
            raise UserError(f"barriers: the dataset has no {name!r}; scan the path with "
                            f"metrics=('supervised', ...)")
    if "alpha" not in ds.dims or "beta" in ds.dims:
        raise UserError("barriers: expects a path result (one 'alpha' axis, no 'beta')")
    loss = ds["loss"].transpose(..., "alpha")
    error = ds["error"].transpose(..., "alpha")
    values = barrier_values(loss.values, error.values, ds["alpha"].values)
    dims = loss.dims[:-1]
    units = {"error_barrier": "fraction", "loss_barrier_mean": "nats",
             "loss_barrier_linear": "nats"}
    out = {name: (dims, value, {"units": units[name], "long_name": name.replace("_", " ")})
           for name, value in values.items()}
    return xr.Dataset(out, coords={d: ds[d] for d in dims if d in ds.coords},
                      attrs={"analysis": "barriers", "source_analysis": ds.attrs.get(
                          "analysis", ""), "bn_mode": ds.attrs.get("bn_mode", "")})


def spectrum(model, data, *, loss: str = "supervised", teacher=None, k: int = 5,
            test=None, split: str = "train", samples: int = 1000, params: str = "all",
            measures=("top", "trace", "density", "layer-top"), names=None,
            **options) -> xr.Dataset:
    """Curvature of the loss at `model` (or at each of several): what `python -m
    landscape.hessian` writes, one `checkpoint` row per model.

    model: an nn.Module, a list of them (rows named by `names`, default "model 0", ...) or
    a dict label -> module. loss: "supervised" (cross-entropy with the labels; a registry
    model's encoder + fc, any other classifier whole) or "distill" (encoder + DINO head, as
    runs.load(ref, head=True) gives, against `teacher`'s head probabilities). data: a
    dataset name, (images, labels), a Dataset or ImageData; split "train" measures on it,
    "test" on `test` (a name's own test split). samples: a seeded draw (0 = all).
    params: all, encoder or fc. k: top eigenvalues. measures: top, trace, density,
    layer-top. options: eigen_tol, eigen_steps, trace_tol, trace_probes ("MIN:MAX"),
    slq_runs, slq_steps, density_grid ("auto" or "LO:HI:N"), hvp, seed, teacher_temp,
    student_temp, data_root and input_stats (with a dataset name), device, precision,
    batch_size, as the CLI's flags. The models passed are never changed.
    """
    from landscape import hessian as H
    labels, models = _named_models(model, names)
    cfg, runtime = _hessian_config(labels, loss, teacher, k, split, samples, params,
                                   measures, options)
    H.check_options(cfg)
    device = resolve_device(runtime["device"])
    bf16 = H.hvp_bf16(device, runtime["precision"])
    cfg = dataclasses.replace(cfg, precision="bf16" if bf16 else "fp32")
    supervised = cfg.loss == "supervised"
    anchors = [module_anchor(copy.deepcopy(m), label, supervised, not supervised)
               for m, label in zip(models, labels)]
    train, test = as_splits(data, test, root=cfg.data_root or None, stats=cfg.input_stats)
    cfg = dataclasses.replace(cfg, dataset=train.info.name)
    images = H.take_samples(train if cfg.split == "train" else test, cfg)
    inputs = [anchor.record for anchor in anchors]
    subject = None if supervised else _teacher(copy.deepcopy(teacher), anchors[0], inputs)
    plan = H.make_plan(cfg, anchors, labels, images, subject, inputs, device,
                       runtime["batch_size"])
    return H.run(plan, None, device, bf16).dataset()


def _named_models(model, names) -> tuple[list[str], list[nn.Module]]:
    """(labels, modules) of spectrum's `model`: one module, a list or a dict."""
    if isinstance(model, nn.Module):
        models = [model]
        names = names or ["model"]
    elif isinstance(model, dict):
        names, models = [str(n) for n in model], list(model.values())
    else:
        models = list(model)
        names = names or [f"model {i}" for i in range(len(models))]
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise UserError("model: give an nn.Module, a list of them or a dict label -> module")
    if len(names) != len(models) or len(set(names)) != len(names):
        raise UserError(f"names: give {len(models)} distinct labels, got {list(names)}")
    return list(names), models


HESSIAN_FIELDS = ("eigen_tol", "eigen_steps", "trace_tol", "trace_probes", "slq_runs",
                  "slq_steps", "density_grid", "hvp", "seed", "teacher_temp", "student_temp",
                  "data_root", "input_stats")
HESSIAN_RUNTIME = {"device": "auto", "precision": "auto", "batch_size": 256}


def _hessian_config(labels, loss, teacher, k, split, samples, params, measures,
                    options) -> tuple:
    """(HessianConfig, runtime options) of an API call; unknown options named."""
    from landscape.hessian import HessianConfig
    valid = (*HESSIAN_FIELDS, *HESSIAN_RUNTIME)
    for key in options:
        if key not in valid:
            raise unknown("option", key, sorted(valid))
    runtime = {key: options.pop(key, value) for key, value in HESSIAN_RUNTIME.items()}
    if loss == "distill" and teacher is None:
        raise UserError("loss distill needs teacher= (e.g. runs.load('RUN@init:teacher', "
                        "head=True))")
    cfg = HessianConfig(refs=tuple(labels), loss=loss, teacher="teacher" if teacher is not None
                        else "", top_k=k, split=split, samples=samples, params=params,
                        measures=tuple(measures), **options)
    return cfg, runtime


# ---------------------------------------------------------------------------- shared


def _coords(values, what: str) -> np.ndarray:
    values = np.linspace(0, 1, 25) if values is None else np.asarray(values, np.float64)
    if values.ndim != 1 or not len(values) or not np.isfinite(values).all():
        raise UserError(f"{what}: expected a 1-D sequence of finite coordinates, got "
                        f"{np.asarray(values).tolist()!r}")
    if len(np.unique(values)) != len(values):
        raise UserError(f"{what}: repeats a coordinate; give each point once")
    return values


def _grid_text(values: np.ndarray) -> str:
    """The coordinates as the CLI's --grid comma list (exact: repr round-trips floats)."""
    return ",".join(repr(float(v)) for v in values)


def _config(models, names, grid, data, metrics, bn_mode, teacher, options) -> tuple:
    """(InterpolateConfig, runtime options) of an API scan; unknown options named."""
    valid = (*SCAN_FIELDS, *RUNTIME, "basis", "directions", "seed")
    for key in options:
        if key not in valid:
            raise unknown("option", key, sorted(valid))
    runtime = {k: options.pop(k, v) for k, v in RUNTIME.items()}
    if len(names) != len(models) or len(set(names)) != len(names):
        raise UserError(f"names: give {len(models)} distinct labels, got {list(names)}")
    cfg = I.InterpolateConfig(
        refs=tuple(str(n) for n in names), grid=_grid_text(grid["alpha"]),
        beta_grid=_grid_text(grid["beta"]) if "beta" in grid else "",
        metrics=tuple(metrics), bn_mode=bn_mode,
        dataset=data if isinstance(data, str) else "",  # in-memory data: named by _eval_data
        teacher="teacher" if teacher is not None else "", **options)
    return cfg, runtime


def _scan(models, names, grid, data, test, metrics, bn_mode, teacher, embed, options):
    cfg, runtime = _config(models, names, grid, data, metrics, bn_mode, teacher, options)
    I.check_shape(cfg)
    I.check_points_per_pass(runtime["points_per_pass"])
    device = resolve_device(runtime["device"])
    bf16 = use_bf16(device, runtime["precision"])
    cfg = dataclasses.replace(cfg, precision="bf16" if bf16 else "fp32")
    if "distill" in cfg.metrics and teacher is None:
        raise UserError("metrics distill needs teacher= (e.g. runs.load('RUN@init:teacher', "
                        "head=True))")
    measures = I.measures_of(cfg)
    if measures.needs_embeddings:
        _check_embedding(models, embed, measures.metrics)
    with_fc, with_head = measures.with_fc, measures.with_head  # hessian-* need fc or head
    anchors = [module_anchor(m, label, with_fc, with_head, embed)
               for m, label in zip(models, cfg.refs)]
    check_same_architecture(anchors)
    loaded, cfg = _eval_data(cfg, data, test, device, runtime["batch_size"],
                             measures.needs_data)
    inputs = [anchor.record for anchor in anchors]
    subject = _teacher(teacher, anchors[0], inputs) if with_head else None
    plan = I.make_plan(cfg, anchors, measures, loaded, subject, inputs, device)
    result = I.run(plan, None, device, bf16, runtime["points_per_pass"])
    return result.dataset()


def _check_embedding(models, embed, metrics) -> None:
    from landscape.points import EMBEDDING_METRICS
    from runs.models.adapt import has_protocol
    if embed is None and not all(has_protocol(m) for m in models):
        first = next(m for m in metrics if m in EMBEDDING_METRICS)
        raise UserError(f"metrics {first} needs the embedding: name it with embed='<layer>' or "
                        f"embed=callable(module, images) (the models have no `encoder`)")


def _eval_data(cfg, data, test, device, batch_size, needed) -> tuple:
    """(EvalData or None, cfg naming the data: "tensors", a Dataset's class, or the name)."""
    if not needed:
        return None, cfg
    train, test = as_splits(data, test, root=cfg.data_root or None, stats=cfg.input_stats)
    loaded = eval_data(train, test, device, batch_size, cfg.train_samples, cfg.test_samples,
                       cfg.bn_samples, cfg.bn_batch_size, cfg.seed,
                       with_bn=cfg.bn_mode == "recalibrate")
    return loaded, dataclasses.replace(cfg, dataset=train.info.name)


def _teacher(teacher, anchor, inputs: list) -> Subject:
    """The teacher of distill metrics: encoder + DINO head, frozen, in eval mode."""
    from runs.checkpoint import module_sha256
    encoder = getattr(teacher, "encoder", None)
    if encoder is None or getattr(teacher, "head", None) is None:
        raise UserError(f"teacher: needs an encoder and a DINO head (runs.load(ref, "
                        f"head=True)); {type(teacher).__name__} has none")
    subject = Subject(encoder, None, teacher.head).requires_grad_(False).eval()
    mine = teacher.head.spec.get("out_dim") if hasattr(teacher.head, "spec") else None
    theirs = anchor.subject.head.spec.get("out_dim") if hasattr(anchor.subject.head,
                                                                "spec") else None
    if mine != theirs:
        raise UserError(f"teacher has a {mine}-way DINO head but {anchor.ref}'s has {theirs} "
                        f"outputs; the distillation loss needs the same")
    inputs.append({"ref": "teacher", "path": "", "step": None,
                   "sha256": module_sha256(subject)})
    return subject


# ---------------------------------------------------------------------------- issue 21 (B)


def trained_curve(a: nn.Module, b: nn.Module, data, ts=None, *, kind: str = "bezier",
                  steps: int = 100, test=None, bn_mode: str = "recalibrate",
                  names=("A", "B"), return_bend: bool = False, **options):
    """A trained low-loss curve from A (t = 0) to B (t = 1) and the straight line, as
    `python -m landscape.curve` writes them (Garipov et al. 2018): kind "bezier" or
    "polychain", its one bend trained by SGD for `steps` steps at a random t per step.

    ts: the t grid of both paths (default 21 from 0 to 1; must hold 0 and 1). options: lr,
    batch_size, momentum, weight_decay, schedule ("cosine" | "constant"), seed (t draws and
    data order), bn_samples, bn_batch_size, train_samples, test_samples, sample_seed,
    device, precision, points_per_pass, eval_batch_size. return_bend: also return the
    trained bend (an nn.Module with A's parameter names). The models passed are unchanged.
    """
    from landscape import curve as C
    train_fields = {"lr", "batch_size", "momentum", "weight_decay", "schedule", "seed"}
    scan_fields = {"bn_samples", "bn_batch_size", "train_samples", "test_samples",
                   "sample_seed"}
    runtime = {"device": "auto", "precision": "auto", "points_per_pass": 0,
               "eval_batch_size": 512}
    for key in options:
        if key not in train_fields | scan_fields | set(runtime):
            raise unknown("option", key, sorted(train_fields | scan_fields | set(runtime)))
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps={steps!r}: must be at least 1 step of the bend")
    ts = _coords(np.linspace(0, 1, 21) if ts is None else ts, "ts")
    runtime.update({k: options.pop(k) for k in list(options) if k in runtime})
    cfg = C.CurveConfig(a=str(names[0]), b=str(names[1]), kind=kind, num_steps=steps,
                        **{k: v for k, v in options.items() if k in train_fields})
    scan = C.CurveScan(grid=_grid_text(ts), bn_mode=bn_mode,
                       **{k: v for k, v in options.items() if k in scan_fields})
    device = resolve_device(runtime["device"])
    bf16 = use_bf16(device, runtime["precision"])
    train, test_data = as_splits(data, test)
    ds, bend = C.in_memory(a, b, train, test_data, dataclasses.replace(
        cfg, dataset=train.info.name), scan, tuple(names), device, bf16,
        runtime["points_per_pass"], runtime["eval_batch_size"])
    return (ds, bend) if return_bend else ds


def layer_barriers(a: nn.Module, b: nn.Module, data, alphas=None, *,
                   granularity: str = "layer", test=None, bn_mode: str = "recalibrate",
                   names=("A", "B"), **options) -> xr.Dataset:
    """Layer-wise connectivity, as `python -m landscape.layerwise` writes it: each layer
    (granularity "layer") or block ("block") moved alone from A to B along `alphas`
    (default 11 from 0 to 1; must hold 0 and 1), all others held at A and then at B; loss,
    error and barriers per (layer, held). options: bn_samples, bn_batch_size,
    train_samples, test_samples, seed, device, precision, points_per_pass, batch_size.
    """
    from landscape import layerwise as LW
    fields = {"bn_samples", "bn_batch_size", "train_samples", "test_samples", "seed"}
    runtime = {"device": "auto", "precision": "auto", "points_per_pass": 0,
               "batch_size": 512}
    for key in options:
        if key not in fields | set(runtime):
            raise unknown("option", key, sorted(fields | set(runtime)))
    alphas = _coords(np.linspace(0, 1, 11) if alphas is None else alphas, "alphas")
    runtime.update({k: options.pop(k) for k in list(options) if k in runtime})
    cfg = LW.LayerwiseConfig(refs=tuple(str(n) for n in names), grid=_grid_text(alphas),
                             granularity=granularity, bn_mode=bn_mode, **options)
    if cfg.granularity not in LW.GRANULARITIES:
        raise unknown("granularity", cfg.granularity, LW.GRANULARITIES)
    device = resolve_device(runtime["device"])
    bf16 = use_bf16(device, runtime["precision"])
    anchors = [module_anchor(m, label, True, False) for m, label in zip((a, b), cfg.refs)]
    from landscape.curve import check_pair
    check_pair(anchors)
    loaded = eval_data(*as_splits(data, test), device, runtime["batch_size"],
                       cfg.train_samples, cfg.test_samples, cfg.bn_samples,
                       cfg.bn_batch_size, cfg.seed, with_bn=cfg.bn_mode == "recalibrate")
    inputs = [anchor.record for anchor in anchors]
    result = LW.run(cfg, anchors, loaded, inputs, None, device, bf16,
                    runtime["points_per_pass"])
    return result.dataset()
