"""Scan the loss landscape between checkpoints: `python -m landscape.interpolate A B [C]`.

- two checkpoints: the linear path theta(alpha) = (1 - alpha) theta_A + alpha theta_B;
- three: the plane through them (alpha, beta), coordinates by least squares in the basis
  (B - A, C - A) (`--basis lstsq`: A, B, C at (0, 0), (1, 0), (0, 1)) or Gram-Schmidt
  (`--basis orthonormal`: distances and angles kept, one unit = |B - A| on both axes);
- one checkpoint and `--directions 1|2`: random filter-normalised directions around it
  (Li et al. 2018), seeded.

At every point, as `--metrics` asks: supervised loss and error on train and test,
distillation cross-entropy and KL against `--teacher` (student landscapes move encoder +
DINO head), k-NN accuracy of the embeddings, linear-probe accuracy (a probe fitted on the
point's train embeddings and scored on its test embeddings: `linear` = L-BFGS logistic
regression at one L2 strength for the whole scan, chosen by 5-fold CV at the first
checkpoint unless `--linear-l2` fixes it; `linear-adamw` = the paper's AdamW probe), and
the parameter norm; and curvature (expensive, see below). BatchNorm statistics per point by
`--bn-mode` keep | interpolate | recalibrate (default). Writes one HDF5 result (analysis
`interpolate`; the linear probe's L2 strength in its attrs); a killed scan re-run with the
same arguments resumes, and `--shard i/n` splits it across processes (join with
`python -m runs.results merge`).

Curvature: `hessian-top` (the `--hessian-k` largest Hessian eigenvalues, Lanczos) and
`hessian-trace` (Hutchinson's trace and its standard error, to `--hessian-tol`) of the
supervised loss, or of the distillation loss when --teacher is given and supervised is not
measured, on `--hessian-samples` seeded images of `--hessian-split`, w.r.t. the parameters
the scan moves, BN in eval mode with the point's statistics after `--bn-mode`. EXPENSIVE:
tens to hundreds of Hessian-vector products (each ~ 3 passes over those images) per point;
`--hessian-at` (and `--hessian-beta-at`) pick the points evaluated, the others get NaN.

Beyond straight lines (issue 21): `--align weights|activations` permutes B (and C) to match
A first (landscape.align: weight matching, or activation matching on the BN images), the
aligned networks being the scan's anchors (attrs `align`: method and what the search did);
`--bn-mode repair` (paths, one point per pass) resets every channel's mean and std to the
alpha-mix of A's and B's (REPAIR); `--refine TOL` (paths) adds points where the error and
loss curves of `--refine-split` peak until the barrier changes by less than TOL
(landscape.refine: padded `refine` coordinate, refined_* metrics, refine_points).
"""

import argparse
import dataclasses
import itertools
import sys
from dataclasses import dataclass

import numpy as np
import torch

from landscape import geometry as G
from landscape import refine as R
from landscape.batchnorm import PATH_MODES, check_mode
from landscape.network import (
    Anchor,
    check_images,
    check_same_architecture,
    load_anchor,
    load_fc,
    load_teacher,
)
from landscape.params import BASES
from landscape.point_curvature import HESSIAN_SPLITS, Curvature
from landscape.point_curvature import check_k as check_hessian_k
from landscape.points import (
    LINEAR_FEATURES,
    METRICS,
    SPLITS,
    EvalData,
    Measures,
    PointEvaluator,
    eval_data,
)
from runs.config import (
    HelpFormatter,
    add_config_args,
    arg,
    check_at_most,
    config_from_args,
)
from runs.data import STATS, holdout, load_splits, parse_data_options
from runs.device import PRECISIONS, resolve_device, use_bf16
from runs.errors import UserError, cli, echo_command
from runs.launch import add_launcher_args, launch, launching
from runs.progress import Progress

ANALYSIS = "interpolate"
ALIGN_METHODS = ("weights", "activations")  # landscape.align.METHODS


@dataclass(frozen=True)
class InterpolateConfig:
    refs: tuple[str, ...] = arg((), "checkpoints: A B (line), A B C (plane), or A with "
                                    "--directions")
    grid: str = arg("0:1:25", "alpha coordinates: start:stop:num (ends included) or a comma "
                              "list; may extend beyond [0, 1]")
    beta_grid: str = arg("", "beta coordinates of a plane or of 2 directions; '' = --grid")
    directions: int = arg(0, "random filter-normalised directions (1 or 2) around the one "
                             "checkpoint; 0 = none")
    basis: str = arg("lstsq", "plane basis: lstsq (A, B, C at (0,0), (1,0), (0,1)) or "
                              "orthonormal (Gram-Schmidt, unit |B - A|)", choices=BASES)
    metrics: tuple[str, ...] = arg(("supervised", "norm"), "what to measure per point: "
                                   "supervised (loss, error), distill (CE, KL to --teacher), "
                                   "knn, linear (L-BFGS probe), linear-adamw (the paper's "
                                   "AdamW probe), norm, hessian-top and hessian-trace "
                                   "(curvature: expensive, many Hessian-vector products "
                                   "per point; see --hessian-at)")
    bn_mode: str = arg("recalibrate", "BatchNorm statistics per point; repair (paths, one "
                                      "point per pass): REPAIR, every channel's mean and std "
                                      "on the BN images reset to the alpha-mix of A's and B's",
                       choices=PATH_MODES)
    align: str = arg("", "permutation alignment of B (and C) to A before the scan: weights "
                         "(weight matching) or activations (activation matching on the BN "
                         "images); '' = none. The aligned networks are the scan's anchors",
                     choices=("", *ALIGN_METHODS))
    refine: float | None = arg(None, "adaptive barrier search (paths): after the grid, bisect "
                                     "around the maximum of the error and loss curves of "
                                     "--refine-split until the barrier changes by less than "
                                     "this (e.g. 0.005); unset = none")
    refine_max: int = arg(16, "most points --refine adds (the length of the result's padded "
                              "`refine` coordinate)")
    refine_split: str = arg("test", "the split whose curves --refine follows", choices=SPLITS)
    bn_samples: int = arg(2048, "fixed training images for BN recalibration (all of "
                                 "train when it has fewer); 0 = all")
    bn_batch_size: int = arg(256, "images per recalibration batch (statistics are averaged "
                                  "per batch, as torch's update_bn)")
    dataset: str = arg("", "dataset to measure on; '' = the first checkpoint's")
    data_root: str = arg("", "folder (or .npz file) of the dataset; '' = its default")
    data_options: tuple[str, ...] = arg((), "dataset options as key=value (e.g. side=8)")
    input_stats: str = arg("paper", "input normalisation: paper (the paper's code's mean/std) "
                                    "or dataset (each dataset's own); with --dataset '' the "
                                    "first checkpoint's", choices=STATS)
    subset: int = arg(0, "train images per class, seeded stratified, as the run used; 0 = all")
    val_size: int = arg(0, "train images the run held out for validation (left out here)")
    train_samples: int = arg(0, "train images measured (seeded draw); 0 = all")
    test_samples: int = arg(0, "test images measured (seeded draw); 0 = all")
    teacher: str = arg("", "teacher of distill metrics, e.g. RUN@last:teacher")
    teacher_temp: float = arg(1.0, "teacher softmax temperature (distill metrics)")
    student_temp: float = arg(1.0, "student softmax temperature (distill metrics)")
    fc: str = arg("", "a trained classifier whose fc is attached, unchanged, to every point "
                      "(supervised metrics of encoders without a trained fc)")
    knn_k: int = arg(20, "neighbours of the k-NN probe (squared L2, majority vote)")
    linear_l2: str = arg("auto", "L2 strength of the `linear` probe, relative to the "
                                 "features' centred RMS (probes.logistic's grid): 'auto' = "
                                 "chosen once by 5-fold CV on the first checkpoint's train "
                                 "embeddings, then fixed for every point; or a number >= 0. "
                                 "The value used is in the result's attrs (linear_l2)")
    linear_features: str = arg("raw", "features the linear probes see: raw or standardized "
                                      "(z-scored with each point's train statistics)",
                               choices=LINEAR_FEATURES)
    hessian_k: int = arg(1, "hessian-top: the number of largest Hessian eigenvalues per point")
    hessian_tol: float = arg(0.05, "hessian-trace: Hutchinson stops at a standard error of "
                                   "this fraction of the trace (or at --hessian-probes)")
    hessian_probes: int = arg(100, "hessian-trace: most Rademacher probes (Hessian-vector "
                                   "products) per point")
    hessian_eigen_tol: float = arg(1e-4, "hessian-top: Lanczos stops at Ritz residuals of "
                                         "this fraction of each eigenvalue (or after "
                                         "max(60, 3k + 30) products)")
    hessian_samples: int = arg(256, "images the Hessian's loss averages over (a seeded draw "
                                    "of --hessian-split; all when it has fewer); 0 = all")
    hessian_split: str = arg("train", "split the Hessian's images come from",
                             choices=HESSIAN_SPLITS)
    hessian_at: str = arg("", "alpha coordinates (points of --grid, as --grid's syntax) "
                              "where hessian-* metrics are evaluated; '' = every one; other "
                              "points get NaN")
    hessian_beta_at: str = arg("", "beta coordinates (points of the beta grid) where "
                                   "hessian-* metrics are evaluated; '' = every one")
    seed: int = arg(0, "seed of the random directions, of the image draws and of the "
                       "Hessian's Lanczos start and probes")
    precision: str = arg("", "fp32 or bf16 as resolved on the device (set by --precision)")


@dataclass
class Plan:
    """Everything a scan needs, every input checked before a result file exists."""
    cfg: InterpolateConfig
    anchors: list[Anchor]
    geometry: G.Geometry
    grids: dict  # axis name -> coordinates
    measures: Measures
    data: EvalData | None
    teacher: object
    inputs: list[dict]
    curvature_at: set | None = None  # coordinate tuples of hessian-* metrics; None = all
    align: dict | None = None  # {"method", per aligned anchor label: landscape.align's info}


def axes(cfg: InterpolateConfig) -> tuple[str, ...]:
    two = len(cfg.refs) == 3 or cfg.directions == 2
    return ("alpha", "beta") if two else ("alpha",)


def check_shape(cfg: InterpolateConfig) -> None:
    """The number of checkpoints, --directions and --bn-mode must fit together."""
    count = len(cfg.refs)
    if count == 1 and cfg.directions not in (1, 2):
        raise UserError("one checkpoint: give --directions 1 or 2 (random directions around "
                        "it), or two checkpoints for a path, three for a plane")
    if count in (2, 3) and cfg.directions:
        raise UserError("--directions scans around one checkpoint; give one, not "
                        f"{count}")
    if count not in (1, 2, 3):
        raise UserError(f"give 1 (with --directions), 2 (path) or 3 (plane) checkpoints, "
                        f"got {count}")
    check_mode(cfg.bn_mode, PATH_MODES)
    if count == 1 and cfg.bn_mode == "interpolate":
        raise UserError("--bn-mode interpolate needs two or more checkpoints; random "
                        "directions use keep or recalibrate")
    if count != 2 and cfg.bn_mode == "repair":
        raise UserError("--bn-mode repair mixes two endpoints' statistics: paths only (two "
                        "checkpoints); planes and directions use keep, interpolate or "
                        "recalibrate")
    if cfg.bn_mode == "repair" and {"hessian-top", "hessian-trace"} & set(cfg.metrics):
        raise UserError("--bn-mode repair with hessian-top/hessian-trace: the curvature is "
                        "taken without REPAIR's rescaling; scan them with another --bn-mode")
    if cfg.align and count == 1:
        raise UserError(f"--align {cfg.align} aligns B (and C) to A: give two or three "
                        f"checkpoints, not --directions")
    R.check(cfg.refine, cfg.refine_max, count, cfg.metrics)


def grids(cfg: InterpolateConfig) -> dict:
    out = {"alpha": G.parse_grid(cfg.grid, "--grid")}
    if "beta" in axes(cfg):
        out["beta"] = G.parse_grid(cfg.beta_grid or cfg.grid, "--beta-grid")
    return out


def resolve_data(cfg: InterpolateConfig) -> InterpolateConfig:
    """With --dataset '', the first checkpoint's dataset fields (recorded resolved)."""
    if cfg.dataset:
        return cfg
    from runs.refs import load_model
    found = load_model(cfg.refs[0]).config or {}
    if not found.get("dataset"):
        raise UserError(f"{cfg.refs[0]} records no dataset; give --dataset (e.g. --dataset "
                        f"cifar10 --data-root ~/data)")
    fields = {k: found[k] for k in ("dataset", "data_root", "subset", "val_size",
                                    "input_stats") if k in found}
    fields["data_options"] = tuple(found.get("data_options", ()))
    return dataclasses.replace(cfg, **fields)


def load_data(cfg: InterpolateConfig, device, batch_size: int) -> EvalData:
    train, test = load_splits(cfg.dataset, cfg.data_root, cfg.subset, seed=0,
                              stats=cfg.input_stats, **parse_data_options(cfg.data_options))
    train, _ = holdout(train, cfg.val_size, seed=0)
    return eval_data(train, test, device, batch_size, cfg.train_samples, cfg.test_samples,
                     cfg.bn_samples, cfg.bn_batch_size, cfg.seed,
                     with_bn=needs_bn_images(cfg))


def needs_bn_images(cfg: InterpolateConfig) -> bool:
    """Whether the scan reads the fixed BN images: recalibration, REPAIR, activation
    matching."""
    return cfg.bn_mode in ("recalibrate", "repair") or cfg.align == "activations"


def load_anchors(cfg: InterpolateConfig, measures: Measures, num_classes) -> list[Anchor]:
    with_fc, with_head = measures.with_fc, measures.with_head
    fc = load_fc(cfg.fc, num_classes) if cfg.fc and with_fc else None
    anchors = [load_anchor(ref, with_fc, with_head, num_classes, fc) for ref in cfg.refs]
    check_same_architecture(anchors)
    if fc is not None and fc.in_features != anchors[0].embed_dim:
        raise UserError(f"--fc {cfg.fc}: its fc takes {fc.in_features}-d embeddings, "
                        f"{cfg.refs[0]} gives {anchors[0].embed_dim}-d")
    return anchors


def build_geometry(cfg: InterpolateConfig, anchors: list[Anchor],
                   guard: bool = True) -> G.Geometry:
    """guard: refuse a path between (nearly) identical networks; off for aligned anchors, which
    may legitimately coincide (B a permuted copy of A: the path is flat, its barrier 0)."""
    subjects = [a.subject for a in anchors]
    if len(subjects) == 2:
        return G.line(*subjects, guard=guard)
    if len(subjects) == 3:
        return G.plane(*subjects, basis=cfg.basis)
    frozen = ("fc.weight", "fc.bias") if cfg.fc else ()
    return G.random_directions(subjects[0], cfg.directions, cfg.seed, frozen)


def prepare(cfg: InterpolateConfig, device, batch_size: int = 512) -> Plan:
    """Check every input and load what the scan needs (data on the device): the CLI's door,
    from checkpoint references and a dataset name."""
    check_shape(cfg)
    measures = measures_of(cfg)
    data = load_data(cfg, device, batch_size) if measures.needs_data else None
    anchors = load_anchors(cfg, measures, data.num_classes if data else None)
    teacher = load_teacher(cfg.teacher) if measures.with_head else None
    inputs = [a.record for a in anchors]
    if teacher is not None:
        check_teacher(cfg.teacher, teacher, anchors[0])
        inputs.append(_record(cfg.teacher))
    if cfg.fc and measures.with_fc:
        inputs.append(_record(cfg.fc))
    from runs.filehash import data_inputs  # data files by content: a resume checks them
    files = data_inputs(cfg.dataset, cfg.data_root, cfg.data_options) if data else []
    return make_plan(cfg, anchors, measures, data, teacher, labelled(inputs) + files, device)


def labelled(inputs: list[dict]) -> list[dict]:
    """The input records, each with its readable `label` (LABEL of LABEL:=REF, else derived
    from the run: "student s0 ep2"), unique within the result: figures name the anchors by
    it; paths and sha256 (the inputs' identity on resume) stay beside it."""
    from runs.refs import ref_labels
    names = ref_labels([record["ref"] for record in inputs])
    return [{**record, "label": name} for record, name in zip(inputs, names)]


def measures_of(cfg: InterpolateConfig) -> Measures:
    measures = Measures(tuple(cfg.metrics), cfg.knn_k, cfg.teacher_temp, cfg.student_temp,
                        linear_l2=fixed_linear_l2(cfg.linear_l2),
                        linear_features=cfg.linear_features, probe_seed=cfg.seed,
                        curvature=curvature_of(cfg))
    if "distill" in measures.metrics and not cfg.teacher:
        raise UserError("--metrics distill needs --teacher REF (e.g. RUN@last:teacher)")
    if (cfg.hessian_at or cfg.hessian_beta_at) and not measures.needs_curvature:
        raise UserError("--hessian-at / --hessian-beta-at pick the points of hessian-top and "
                        "hessian-trace; add one of them to --metrics")
    return measures


def hessian_loss(cfg: InterpolateConfig) -> str:
    """The loss the hessian-* metrics take: supervised, unless --teacher is given and
    supervised metrics are not asked for (a student's landscape): then the distillation
    loss H(t, s) against that teacher, as the distill metrics measure it."""
    return "distill" if cfg.teacher and "supervised" not in cfg.metrics else "supervised"


def curvature_of(cfg: InterpolateConfig) -> Curvature:
    """The hessian-* settings; an attached --fc is not moved, so not in the Hessian."""
    frozen = ("fc.weight", "fc.bias") if cfg.fc else ()
    return Curvature(cfg.hessian_k, cfg.hessian_tol, cfg.hessian_probes, cfg.hessian_eigen_tol,
                     cfg.hessian_samples, cfg.hessian_split, hessian_loss(cfg), cfg.seed, frozen)


def curvature_points(cfg: InterpolateConfig, coords: dict) -> set | None:
    """The coordinate tuples whose hessian-* metrics are evaluated: the product of the
    --hessian-at alphas and --hessian-beta-at betas, each a point of its axis' grid (the
    grid's own value kept, so the scan's points match exactly); None = every point."""
    if not (cfg.hessian_at or cfg.hessian_beta_at):
        return None
    picked = []
    for axis, flag, text in (("alpha", "--hessian-at", cfg.hessian_at),
                             ("beta", "--hessian-beta-at", cfg.hessian_beta_at)):
        if axis not in coords:
            if text:
                raise UserError(f"{flag} {text}: the scan has no {axis} axis (a path has "
                                f"alpha only)")
            continue
        grid = coords[axis]
        values = G.parse_grid(text, flag) if text else grid
        picked.append([_grid_point(grid, value, flag) for value in values])
    return set(itertools.product(*picked))


def _grid_point(grid: np.ndarray, value: float, flag: str) -> float:
    """The grid's coordinate equal to `value` (to float rounding); UserError if none is."""
    hits = np.flatnonzero(np.isclose(grid, value, rtol=1e-9, atol=1e-12))
    if not len(hits):
        shown = ", ".join(f"{v:g}" for v in grid[:8]) + (", ..." if len(grid) > 8 else "")
        raise UserError(f"{flag} {value:g}: not a point of the scan's grid ({shown}); give "
                        f"coordinates the grid holds")
    return float(grid[hits[0]])


def fixed_linear_l2(text: str) -> float | None:
    """--linear-l2 as a number, or None for 'auto' (chosen at the first checkpoint)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise UserError(f"--linear-l2 {text!r}: give 'auto' (5-fold CV at the first "
                        f"checkpoint) or a number >= 0 (e.g. 1e-3)")
    return value


def choose_linear_l2(plan: Plan, evaluator: PointEvaluator) -> tuple[float, dict]:
    """(L2 strength of the `linear` probe, attrs recording it and how it was chosen).

    --linear-l2 auto: probes' own selection (linear_probe_lbfgs: seeded stratified 5-fold
    CV on train over probes.logistic.L2_GRID) on the embeddings of the first checkpoint (or
    the centre of random directions) under the scan's BN mode, once: CV at every point would
    cost 30 fits a point. Every point then fits one probe at that strength.
    """
    from probes.logistic import linear_probe_lbfgs
    chosen = plan.measures.linear_l2
    if chosen is not None:
        return chosen, {"linear_l2": chosen, "linear_l2_choice": "--linear-l2"}
    label, coords = next(iter(plan.geometry.anchor_coords.items()))
    train_x, test_x = evaluator.features_at(coords)
    if plan.measures.linear_features == "standardized":
        from probes.logistic import standardize
        train_x, test_x = standardize(train_x, test_x)
    splits = plan.data.splits
    fit = linear_probe_lbfgs(train_x, splits["train"].y, test_x, splits["test"].y,
                             plan.data.num_classes, seed=plan.cfg.seed,
                             name=f"anchor {label} (--linear-l2 auto)")
    return fit["l2"], {"linear_l2": fit["l2"], "linear_l2_choice": f"5-fold CV at {label}"}


def make_plan(cfg: InterpolateConfig, anchors: list[Anchor], measures: Measures,
              data: EvalData | None, teacher, inputs: list[dict], device) -> Plan:
    """The plan both doors share, once the anchors and data are loaded and checked."""
    coords = grids(cfg)
    if data is not None:
        check_images(anchors[0], data.image_shape)
        if "knn" in measures.metrics:  # before the result file exists
            check_at_most(measures.knn_k, len(data.splits["train"].y), "--knn-k",
                          "the train images measured: --train-samples, or all of train")
    if measures.needs_curvature:
        check_hessian_k(measures.curvature, anchors[0].subject)
    at = curvature_points(cfg, coords) if measures.needs_curvature else None
    if cfg.refine is not None:
        from landscape.barrier import _ends
        _ends(coords["alpha"])  # a barrier needs 0 and 1 on the grid
    if data is not None and data.bn is None and needs_bn_images(cfg):
        data.bn = bn_loader(data, cfg, device)  # the API door loads it for recalibrate only
    if cfg.align and len(anchors) == 2:  # the checkpoints themselves must differ
        from landscape.params import check_apart
        check_apart({a: G.split_state(x.subject)[0] for a, x in zip("AB", anchors)})
    anchors, aligned = align_anchors(cfg, anchors, data)
    geometry = build_geometry(cfg, anchors, guard=not cfg.align).to(device)
    return Plan(cfg, anchors, geometry, coords, measures, data, teacher, inputs, at, aligned)


def bn_loader(data: EvalData, cfg: InterpolateConfig, device):
    """The fixed BN images as eval_data draws them (train, seed + 1, --bn-samples)."""
    from landscape.points import take
    from runs.gpu_loader import eval_loader
    train = data.sources["train"]
    drawn = take(train, min(cfg.bn_samples, len(train.y)), cfg.seed + 1, "--bn-samples")
    return eval_loader(drawn, device, cfg.bn_batch_size)


def bn_images(data: EvalData) -> torch.Tensor:
    """(N, C, H, W) the fixed BN images on the CPU, normalised as every point sees them."""
    from landscape.points import images
    return torch.cat([x.float().cpu() for x in images(data.bn)])


def align_anchors(cfg: InterpolateConfig, anchors: list[Anchor], data) -> tuple:
    """(anchors with B and C permuted to match A, attrs record) under --align; the anchors
    unchanged and None without it. Activation matching reads the fixed BN images."""
    if not cfg.align:
        return anchors, None
    from landscape import align as A
    if cfg.align == "activations" and data is None:
        raise UserError("--align activations matches hidden activations on the BN images: "
                        "measure a metric that reads data (supervised, distill, knn, linear)")
    images = bn_images(data) if cfg.align == "activations" else None
    out, record = [anchors[0]], {"method": cfg.align}
    for label, anchor in zip(("B", "C"), anchors[1:]):  # Subjects in, a permuted copy out
        moved, info = A.align(anchors[0].subject, anchor.subject, cfg.align, images=images,
                              seed=cfg.seed)
        out.append(dataclasses.replace(anchor, subject=moved))
        record[label] = {k: _plain(v) for k, v in info.items()}
    return out, record


def _plain(value):
    """An info value as JSON can hold it (tensors and numpy scalars as numbers)."""
    if isinstance(value, torch.Tensor | np.generic):
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    return value


def check_teacher(ref: str, teacher, anchor: Anchor) -> None:
    """The teacher's head must give as many outputs as the students' heads."""
    mine, theirs = teacher.head.spec.get("out_dim"), anchor.spec["head"].get("out_dim")
    if mine != theirs:
        raise UserError(f"--teacher {ref} has a {mine}-way DINO head but {anchor.ref}'s has "
                        f"{theirs} outputs; the distillation loss needs the same")


def _record(ref: str) -> dict:
    from runs.refs import ref_record
    return ref_record(ref)


def layout(plan: Plan) -> tuple[dict, dict, tuple, dict]:
    """(coords, metric specs, point dims, root attrs) of the result file."""
    from runs.results import MetricSpec
    point_dims = tuple(plan.grids)
    coords = dict(plan.grids)
    specs = plan.measures.specs()
    if any("split" in dims for dims, _, _ in specs.values()):
        coords["split"] = list(SPLITS)
    if any("eigen" in dims for dims, _, _ in specs.values()):
        coords["eigen"] = np.arange(plan.measures.curvature.k)
    metrics = {name: MetricSpec(point_dims + dims, units, long_name)
               for name, (dims, units, long_name) in specs.items()}
    geometry = plan.geometry
    attrs = {"bn_mode": plan.cfg.bn_mode, "geometry": geometry.kind,
             "anchor_coords": geometry.anchor_coords, "coordinate_unit": geometry.unit,
             "parts": "+".join(n for n in ("encoder", "fc", "head", "net")
                               if getattr(plan.anchors[0].subject, n, None) is not None)}
    if geometry.kind == "plane":
        attrs["plane_basis"] = plan.cfg.basis
    if plan.measures.needs_curvature:
        attrs["hessian_loss"] = plan.measures.curvature.loss
    if plan.align is not None:
        attrs["align"] = plan.align
    if plan.cfg.refine is not None:
        extra_coords, extra = R.layout(plan.cfg.refine_max, plan.cfg.refine_split)
        coords.update(extra_coords)
        metrics.update(extra)
    return coords, metrics, point_dims, attrs


def auto_points_per_pass(device: torch.device) -> int:
    """Points per pass when --points-per-pass is 0: 8 on CUDA (one vmapped pass fills the
    GPU where one small model cannot); 1 on CPUs, where vmap does not pay: on 2 cores a
    4-point path (BN recalibration + train and test loss) ran 2.1x (convnet) and 2.6x
    (resnet20) faster one point at a time than in one pass of 4 (runs.bench's landscape
    section, 2026-12-01)."""
    return 8 if device.type == "cuda" else 1


def scan(cfg: InterpolateConfig, out: str, device="auto", precision="auto",
         points_per_pass: int = 0, batch_size: int = 512, shard=None, overwrite=False,
         stop_after: int = None) -> str:
    """Run (or resume) the scan; returns the path written. `stop_after`: passes to run
    before returning early, as if killed (tests)."""
    from runs.results import parse_shard, shard_path
    device = resolve_device(device)
    bf16 = use_bf16(device, precision)
    cfg = dataclasses.replace(cfg, precision="bf16" if bf16 else "fp32")
    if set(cfg.metrics) - {"norm"}:
        cfg = resolve_data(cfg)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    check_points_per_pass(points_per_pass)
    if shard and cfg.refine is not None:
        raise UserError("--refine searches the whole path in one process; drop --shard (or "
                        "drop --refine and merge the shards)")
    plan = prepare(cfg, device, batch_size)
    path = shard_path(out, *shard) if shard else out
    run(plan, path, device, bf16, points_per_pass, shard, overwrite, stop_after)
    return path


def check_points_per_pass(points_per_pass: int) -> None:
    if points_per_pass < 0:
        raise UserError(f"--points-per-pass {points_per_pass}: must be >= 1 (0 = auto)")


def run(plan: Plan, path, device, bf16: bool, points_per_pass: int = 0, shard=None,
        overwrite: bool = False, stop_after: int = None):
    """Evaluate the plan's missing points into its result: the file at `path` (the CLI,
    resumable) or, with path None, a MemoryResult (the Python API). Returns the result."""
    from runs.results import new_result
    per_pass = passes_of(plan.cfg, points_per_pass, device)
    coords, metrics, point_dims, attrs = layout(plan)
    evaluator = PointEvaluator(plan.anchors[0].subject, plan.geometry, plan.cfg.bn_mode,
                               plan.data, plan.measures, plan.teacher, device, bf16,
                               plan.curvature_at, repair_of(plan))
    if "linear" in plan.measures.metrics:
        l2, chosen = choose_linear_l2(plan, evaluator)
        evaluator.measures = dataclasses.replace(plan.measures, linear_l2=l2)
        attrs.update(chosen)
    with new_result(path, ANALYSIS, coords, metrics, point_dims, plan.cfg, plan.inputs,
                    str(device), attrs, overwrite, shard) as result:
        passes = fill(result, evaluator, plan.grids, per_pass, stop_after)
        if plan.cfg.refine is not None and not result.missing():
            refine_path(result, evaluator, plan, None if stop_after is None else
                        stop_after - passes)
    return result


def passes_of(cfg: InterpolateConfig, points_per_pass: int, device) -> int:
    """Points per pass: --points-per-pass, or auto; REPAIR runs on the reference path only
    (it hooks the real network's channels), so with it auto is 1 and more is refused."""
    if cfg.bn_mode != "repair":
        return points_per_pass or auto_points_per_pass(device)
    if points_per_pass > 1:
        raise UserError(f"--bn-mode repair evaluates one point at a time (the reference "
                        f"path); use --points-per-pass 1 (or 0 = auto), not {points_per_pass}")
    return 1


def repair_of(plan: Plan):
    """(A, B, BN images) for --bn-mode repair, None otherwise."""
    if plan.cfg.bn_mode != "repair":
        return None
    if plan.data is None:
        raise UserError("--bn-mode repair needs images: measure --metrics supervised, "
                        "distill, knn or linear")
    return plan.anchors[0].subject, plan.anchors[1].subject, bn_images(plan.data)


def refine_path(result, evaluator: PointEvaluator, plan: Plan, budget: int = None) -> int:
    """--refine: the adaptive barrier search after the grid (landscape.refine)."""
    def evaluate(alpha: float) -> dict:
        return evaluator.evaluate(np.array([[alpha]]), batched=False)[0]
    cfg = plan.cfg
    with Progress(cfg.refine_max, ANALYSIS, "refined point") as bar:
        taken = R.run(result, evaluate, plan.grids["alpha"], cfg.refine, cfg.refine_max,
                      cfg.refine_split, budget)
        bar.update(taken)
    return taken


def fill(result, evaluator: PointEvaluator, coords: dict, per_pass: int,
         stop_after: int = None) -> int:
    """Evaluate the missing cells `per_pass` at a time, writing each pass as it finishes;
    returns the passes run."""
    todo = result.missing()
    axes_ = list(coords.values())
    passes = 0
    with Progress(len(todo), ANALYSIS, "point") as bar:
        for start in range(0, len(todo), per_pass):
            if stop_after is not None and passes >= stop_after:
                break
            cells = todo[start:start + per_pass]
            points = np.array([[axis[i] for axis, i in zip(axes_, cell)] for cell in cells])
            for cell, values in zip(cells, evaluator.evaluate(points, per_pass > 1)):
                result.write(cell, **values)
            bar.update(len(cells))
            passes += 1
    return passes


def summary(path: str) -> str:
    """A short table of a 1-D scan (alpha and every metric), or the progress of a 2-D one."""
    from runs.results import open_result
    data = open_result(path, ANALYSIS)
    done = f"{int(data.done.sum())} of {data.done.size} points done"
    if data.point_dims != ("alpha",):
        return f"{path}: {done}"
    names, columns = ["alpha"], [data.coords["alpha"]]
    for name, values in data.metrics.items():
        dims = data.specs[name].dims
        if "alpha" not in dims:
            continue  # --refine's summaries: refined_text
        extra = next((d for d in dims if d != "alpha"), None)  # split or eigen
        if extra is not None:
            for j, label in enumerate(data.coords[extra]):
                names.append(f"{name}[{label}]")
                columns.append(np.take(values, j, axis=dims.index(extra)))
        else:
            names.append(name)
            columns.append(values)
    rows = ["  ".join(f"{n:>14}" for n in names)]
    rows += ["  ".join(f"{c[i]:14.4f}" for c in columns) for i in range(len(columns[0]))]
    return "\n".join([*rows, *refined_text(data), f"{path}: {done}"])


def refined_text(data) -> list[str]:
    """--refine's lines: points taken and the barriers over grid + refined points."""
    if "refine_points" not in data.metrics:
        return []
    count = data.metrics["refine_points"]
    if np.isnan(count):
        return ["refinement: not finished (re-run to resume)"]
    barriers = ", ".join(
        f"{name}[{split}] {data.metrics[f'refined_{name}'][j]:.4f}"
        for name in ("error_barrier", "loss_barrier_mean") for j, split in enumerate(SPLITS))
    return [f"refinement: {int(count)} points; {barriers}"]


HELP = __doc__
EPILOG = r"""examples:
  python -m landscape.interpolate store/train_a/seed_0@last store/train_b/seed_0@last \
      --grid -0.25:1.25:31 --metrics supervised norm hessian-top hessian-trace \
      --hessian-at 0,0.5,1   # curvature (expensive) at 3 of the 31 points
  python -m landscape.interpolate RUN@init:teacher RUN@init RUN@last --metrics distill knn \
      norm --teacher RUN@init:teacher --grid -0.5:1.5:21 --basis orthonormal
  python -m landscape.interpolate RUN@init:teacher RUN@last RUN_ALPHA1@last --metrics \
      distill linear norm --teacher RUN@init:teacher --grid -0.5:1.5:21   # the paper's Fig. 5
  python -m landscape.interpolate RUN@last --directions 2 --grid -1:1:21 --bn-mode keep
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m landscape.interpolate", description=HELP,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("refs", nargs="+", metavar="REF", help="checkpoint references "
                   "(RUN@last, RUN@init:teacher, file.pt, ...)")
    p.add_argument("--out", default="results/interpolate.h5", help="HDF5 result file")
    p.add_argument("--shard", default=None, help="i/n: compute only this shard's points, "
                   "into OUT's shard file")
    p.add_argument("--overwrite", action="store_true", help="replace a result file of "
                   "another config")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--points-per-pass", type=int, default=0, help="parameter sets "
                   "evaluated together under vmap; 1 = the one-at-a-time reference path; "
                   "0 = auto (8 on CUDA, 1 on CPU)")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    metrics = f"; valid: {', '.join(METRICS)}"
    add_config_args(p, InterpolateConfig, exclude=("refs", "precision"), group="scan")
    for action in p._actions:  # name the valid metrics in --help
        if action.dest == "metrics":
            action.help += metrics
    add_launcher_args(p)
    return p


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = ("--grid", "--beta-grid", "--hessian-at", "--hessian-beta-at")
    args = parser().parse_args(G.join_negative(argv, flags))
    echo_command("landscape.interpolate", argv)
    if launching(args):
        return launch(main, argv, args, args.out)
    cfg = config_from_args(InterpolateConfig, args, refs=tuple(args.refs), precision="")
    path = scan(cfg, args.out, args.device, args.precision, args.points_per_pass,
                args.batch_size, args.shard, args.overwrite)
    print(summary(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
