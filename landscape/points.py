"""Metrics at many points of a scan, one parameter set at a time or P per pass.

Two paths feed one measuring loop (`measure`):
- the reference (`points_per_pass=1`): the real network, its weights copied in, BN
  recalibrated in place by `batchnorm.recalibrate`, an ordinary forward per batch;
- the batched path: P parameter sets stacked on a leading axis and evaluated by
  torch.func.vmap over functional_call (convolutions become one grouped kernel per layer),
  BN statistics recalibrated functionally per point (`batchnorm.BatchedBN`). Every image
  batch is read once per pass for all P points, and the teacher's logits are computed once
  per batch for all of them.

Per point: loss and error (supervised), distillation cross-entropy and KL against a teacher,
k-NN accuracy of the embeddings (train split as the bank, test as the queries; squared L2,
majority vote, as the paper), linear-probe accuracy (a probe fitted on the point's train
embeddings, scored on its test embeddings: `linear` = probes' L-BFGS logistic regression at
one fixed L2 strength, `linear-adamw` = the paper's AdamW probe), and the parameter norm.
The probes run per point after the (batched) embedding pass. Curvature (`hessian-top`,
`hessian-trace`: landscape.point_curvature) is taken per point through the reference network
on either path, so it does not depend on how many points share a pass.
"""

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from landscape.batchnorm import BatchedBN, bn_layers, recalibrate, swap_batchnorm
from landscape.geometry import Geometry, point_norms
from landscape.network import Subject
from landscape.point_curvature import (
    HESSIAN_METRICS,
    Curvature,
    curvature_specs,
    hessian_batches,
    missing_curvature,
    moved_parameters,
    point_curvature,
)
from runs.data import ImageData
from runs.device import autocast as device_autocast
from runs.errors import UserError, unknown
from runs.gpu_loader import GPULoader, eval_loader

METRICS = ("supervised", "distill", "knn", "linear", "linear-adamw", "norm", *HESSIAN_METRICS)
EMBEDDING_METRICS = ("knn", "linear", "linear-adamw")  # read the embeddings of both splits
LINEAR_FEATURES = ("raw", "standardized")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Measures:
    metrics: tuple[str, ...]  # a subset of METRICS
    knn_k: int = 20  # neighbours of the k-NN probe
    teacher_temp: float = 1.0  # softmax temperatures of the distillation loss
    student_temp: float = 1.0
    # L2 strength of the `linear` probe, relative to the features' centred RMS (as
    # probes.logistic's grid); None until chosen (interpolate.choose_linear_l2)
    linear_l2: float | None = None
    linear_features: str = "raw"  # features the linear probes see: raw or standardized
    probe_seed: int = 0  # the AdamW probe's init and data order
    curvature: Curvature = Curvature()  # how hessian-top and hessian-trace are taken

    def __post_init__(self):
        for name in self.metrics:
            if name not in METRICS:
                raise unknown("metric", name, METRICS)
        if not self.metrics:
            raise UserError(f"--metrics: name at least one of {', '.join(METRICS)}")
        if self.knn_k < 1:
            raise UserError(f"--knn-k {self.knn_k}: must be at least 1 neighbour")
        if self.linear_features not in LINEAR_FEATURES:
            raise unknown("--linear-features", self.linear_features, LINEAR_FEATURES)
        if self.linear_l2 is not None and not 0 <= self.linear_l2 < float("inf"):
            raise UserError(f"--linear-l2 {self.linear_l2}: must be a number >= 0 or 'auto'")
        for flag, temp in (("--teacher-temp", self.teacher_temp),
                           ("--student-temp", self.student_temp)):
            if not 0 < temp < float("inf"):
                raise UserError(f"{flag} {temp}: must be a positive number")

    @property
    def needs_data(self) -> bool:
        return self.needs_scan_data or self.needs_curvature

    @property
    def needs_scan_data(self) -> bool:
        """Whether a point's metrics read the measured splits (all but norm and curvature)."""
        return bool({"supervised", "distill", *EMBEDDING_METRICS} & set(self.metrics))

    @property
    def needs_curvature(self) -> bool:
        return bool(set(HESSIAN_METRICS) & set(self.metrics))

    @property
    def with_fc(self) -> bool:
        """Whether the network needs its supervised fc: supervised metrics or Hessian."""
        return "supervised" in self.metrics or (self.needs_curvature and
                                                self.curvature.loss == "supervised")

    @property
    def with_head(self) -> bool:
        """Whether it needs its DINO head (and a teacher): distill metrics or Hessian."""
        return "distill" in self.metrics or (self.needs_curvature and
                                             self.curvature.loss == "distill")

    @property
    def needs_embeddings(self) -> bool:
        return bool(set(EMBEDDING_METRICS) & set(self.metrics))

    def specs(self) -> dict:
        """name -> (non-point dims, units, long_name) of every metric a point yields."""
        specs = {}
        if "supervised" in self.metrics:
            specs["loss"] = (("split",), "nats", "cross-entropy loss")
            specs["error"] = (("split",), "fraction", "classification error")
        if "distill" in self.metrics:
            specs["distill_ce"] = (("split",), "nats", "distillation cross-entropy H(t, s)")
            specs["distill_kl"] = (("split",), "nats", "KL(teacher || student)")
        if "knn" in self.metrics:
            specs["knn_accuracy"] = ((), "fraction",
                                     f"k-NN accuracy (k={self.knn_k}, squared L2, majority)")
        if "linear" in self.metrics:
            specs["linear_accuracy"] = ((), "fraction", f"linear-probe test accuracy (L-BFGS "
                                        f"logistic regression, {self.linear_features} features, "
                                        f"fixed L2: attrs linear_l2)")
        if "linear-adamw" in self.metrics:
            specs["linear_adamw_accuracy"] = ((), "fraction", f"linear-probe test accuracy (the "
                                              f"paper's AdamW probe, 10 epochs, "
                                              f"{self.linear_features} features)")
        if "norm" in self.metrics:
            specs["param_norm"] = ((), "", "L2 norm of the scanned parameters")
        specs.update(curvature_specs(self.curvature, self.metrics))
        return specs


@dataclass
class EvalData:
    splits: dict  # "train" / "test" -> GPULoader, fixed order, no augmentation
    bn: GPULoader | None  # the fixed BN recalibration images, None unless recalibrating
    num_classes: int
    image_shape: tuple  # (C, H, W)
    sources: dict | None = None  # "train" / "test" -> the whole ImageData (Hessian draws)


def repair_function():
    """REPAIR as helper modules provide it: landscape.align.repair (or landscape.repair's)."""
    import importlib
    for name in ("landscape.align", "landscape.repair"):
        try:
            found = getattr(importlib.import_module(name), "repair", None)
        except ModuleNotFoundError:
            continue
        if found is not None:
            return found
    raise UserError("--bn-mode repair: this installation has no landscape.align.repair; use "
                    "keep, interpolate or recalibrate")


def take(data: ImageData, count: int, seed: int, what: str) -> ImageData:
    """`count` images drawn with `seed`, kept in their original order; 0 = all of them."""
    if count == 0 or count == len(data.y):
        return data
    if not 0 < count <= len(data.y):
        raise UserError(f"{what} {count}: must lie in 1..{len(data.y)} (the split's size) "
                        f"or be 0 for all")
    keep = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(seed))[:count]
    keep = keep.sort().values
    return ImageData(data.x[keep], data.y[keep], data.info)


def eval_data(train: ImageData, test: ImageData, device, batch_size: int = 512,
              train_samples: int = 0, test_samples: int = 0, bn_samples: int = 0,
              bn_batch_size: int = 256, seed: int = 0, with_bn: bool = True,
              batch_flag: str = "--batch-size") -> EvalData:
    """Fixed, un-augmented loaders: the train and test images measured, and the BN images.

    The BN images are drawn from train with seed + 1 (another draw than the measured train
    images), all of train when it holds fewer than bn_samples; recalibration averages
    per-batch statistics, so bn_batch_size is part of what a result means and is recorded
    with it. batch_flag: the flag that set batch_size, named when it is not positive.
    """
    for flag, size in ((batch_flag, batch_size), ("--bn-batch-size", bn_batch_size)):
        if size < 1:
            raise UserError(f"{flag} {size}: must be at least 1 image")
    splits = {"train": take(train, train_samples, seed, "--train-samples"),
              "test": take(test, test_samples, seed, "--test-samples")}
    loaders = {k: eval_loader(v, device, batch_size) for k, v in splits.items()}
    bn = None
    if with_bn:
        images = take(train, min(bn_samples, len(train.y)), seed + 1, "--bn-samples")
        bn = eval_loader(images, device, bn_batch_size)
    return EvalData(loaders, bn, train.info.num_classes, tuple(train.x.shape[1:]),
                    {"train": train, "test": test})


def images(loader: GPULoader):
    """The normalised image batches of a loader, labels dropped."""
    for x, _ in loader.epoch(0):
        yield x


@torch.no_grad()
def measure(forward, data: EvalData, measures: Measures, teacher, num_points: int,
            autocast) -> dict:
    """metric -> (P, ...) tensor over both splits; see Measures.specs for the layout.

    forward: images (B, C, H, W) -> {"embedding": (P, B, D), "logits": (P, B, K),
    "head": (P, B, m)}; teacher: a Subject giving {"head": (B, m)}, or None.
    """
    sums = {split: _split_sums(forward, loader, measures, teacher, num_points, autocast)
            for split, loader in data.splits.items()}
    out = {}
    for name, key in (("loss", "loss"), ("error", "wrong"), ("distill_ce", "ce"),
                      ("distill_kl", "kl")):
        if key in sums["train"]:
            out[name] = torch.stack([sums[s][key] / sums[s]["count"] for s in SPLITS], 1)
    if "knn" in measures.metrics:
        out["knn_accuracy"] = _knn(sums, data, measures.knn_k)
    if "linear" in measures.metrics:
        out["linear_accuracy"] = _linear(sums, data, measures, "lbfgs")
    if "linear-adamw" in measures.metrics:
        out["linear_adamw_accuracy"] = _linear(sums, data, measures, "adamw")
    return out


def _split_sums(forward, loader, measures, teacher, num_points, autocast) -> dict:
    """Sums over one split: loss, wrong, ce, kl (P,) float64 and embeddings (P, N, D)."""
    device = loader.x.device
    sums = {"count": 0}
    feats = []
    for x, y in loader.epoch(0):
        with autocast():
            out = forward(x)
            target = teacher(x, parts=("head",))["head"] if "head" in out else None
        if "logits" in out and "supervised" in measures.metrics:
            logits = out["logits"].float()  # (P, B, K)
            loss = F.cross_entropy(logits.transpose(1, 2), y.expand(num_points, -1),
                                   reduction="none")  # (P, B)
            _add(sums, "loss", loss.double().sum(1), device)
            _add(sums, "wrong", (logits.argmax(-1) != y).double().sum(1), device)
        if target is not None and "distill" in measures.metrics:
            ce, kl = _distill(out["head"], target, measures)
            _add(sums, "ce", ce, device)
            _add(sums, "kl", kl, device)
        if measures.needs_embeddings:
            feats.append(out["embedding"].float())  # (P, B, D)
        sums["count"] += len(y)
    if feats:
        sums["feats"] = torch.cat(feats, 1)  # (P, N, D)
    return sums


def _add(sums: dict, key: str, value: torch.Tensor, device) -> None:
    sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=device)) + value


def _distill(student, teacher, measures: Measures):
    """Summed H(t, s) and KL(t || s) over the batch, per point: two (P,) float64.

    KL is not H(t, s) - H(t): near the teacher it is 4 or more orders below H (a raw head's
    near-uniform outputs), and the difference of two float32 sums, or of two log-softmaxes
    near log m, keeps none of its digits; the engines' `kl_divergence` works on the logit
    difference instead (as the distillation run logs it)."""
    from runs.engines.distill import kl_divergence
    teacher = teacher.float() / measures.teacher_temp  # (B, m)
    student = student.float() / measures.student_temp  # (P, B, m)
    log_s = F.log_softmax(student, dim=-1)
    ce = -(F.softmax(teacher, dim=-1) * log_s).sum(-1).double().sum(1)  # (P,)
    kl = kl_divergence(teacher.expand_as(student), student).double().sum(1)  # (P,)
    return ce, kl


def _knn(sums: dict, data: EvalData, k: int) -> torch.Tensor:
    from probes.nearest import knn_accuracy
    train_y, test_y = data.splits["train"].y, data.splits["test"].y
    bank, queries = sums["train"]["feats"], sums["test"]["feats"]  # (P, N, D), (P, M, D)
    accs = [knn_accuracy(bank[p], train_y, queries[p], test_y, k=k, metric="l2",
                         num_classes=data.num_classes) for p in range(len(bank))]
    return torch.tensor(accs, dtype=torch.float64)


def linear_accuracy(train_x, train_y, test_x, test_y, num_classes: int, measures: Measures,
                    method: str = "lbfgs") -> float:
    """Test accuracy of one linear probe fitted on train_x (N, D), scored on test_x (M, D).

    lbfgs: probes.logistic.linear_probe_lbfgs with the one L2 strength `measures.linear_l2`
    (no cross-validation: the scan chose it once); adamw: linear_probe_sgd, the paper's probe
    (AdamW lr 1e-3, wd 1e-2, 10 epochs, batch 256), seeded with `measures.probe_seed`.
    """
    from probes.logistic import linear_probe_lbfgs, linear_probe_sgd, standardize
    if measures.linear_features == "standardized":
        train_x, test_x = standardize(train_x, test_x)
    if method == "adamw":
        return linear_probe_sgd(train_x, train_y, test_x, test_y, num_classes,
                                seed=measures.probe_seed, name="scan point")["accuracy"]
    if measures.linear_l2 is None:
        raise ValueError("linear_accuracy: measures.linear_l2 is not chosen yet")
    return linear_probe_lbfgs(train_x, train_y, test_x, test_y, num_classes,
                              l2_grid=(measures.linear_l2,), name="scan point")["accuracy"]


def _linear(sums: dict, data: EvalData, measures: Measures, method: str) -> torch.Tensor:
    """(P,) float64 linear-probe test accuracy of every point, one probe per point."""
    train_y, test_y = data.splits["train"].y, data.splits["test"].y
    bank, queries = sums["train"]["feats"], sums["test"]["feats"]  # (P, N, D), (P, M, D)
    accs = [linear_accuracy(bank[p], train_y, queries[p], test_y, data.num_classes, measures,
                            method) for p in range(len(bank))]
    return torch.tensor(accs, dtype=torch.float64)


class PointEvaluator:
    """Evaluates points of one geometry on one network, data set and BN mode.

    curvature_at: the coordinate tuples whose hessian-* metrics are evaluated (others NaN);
    None = every point. repair: (A, B, images (N, C, H, W)) for bn_mode `repair` (a path,
    the reference path only): each point's channels reset to the alpha-mix of A's and B's
    statistics on those images (landscape.align.repair).
    """

    def __init__(self, subject: Subject, geometry: Geometry, bn_mode: str, data: EvalData,
                 measures: Measures, teacher: Subject = None, device="cpu", bf16=False,
                 curvature_at=None, repair=None):
        # A private copy: the reference path loads every point's weights into it.
        self.subject = copy.deepcopy(subject).to(device)
        if torch.device(device).type == "cuda":
            self.subject.to(memory_format=torch.channels_last)  # as the loaders' images
        self.geometry, self.bn_mode = geometry, bn_mode
        self.data, self.measures, self.teacher = data, measures, teacher
        self.device, self.bf16 = torch.device(device), bf16
        if teacher is not None:
            teacher.to(device).eval()
        heads = [m for m in (subject.fc, subject.head) if m is not None]
        heads_have_bn = any(bn_layers(m) for m in heads)
        # BN lives in the encoder: recalibration need not run the heads (a 2^16-way layer).
        self.recal_parts = ("embedding", "logits", "head") if heads_have_bn else ("embedding",)
        self._twin = None
        self.curvature_at = None if curvature_at is None else set(curvature_at)
        if bn_mode == "repair" and repair is None:
            raise ValueError("PointEvaluator: bn_mode repair needs repair=(A, B, images)")
        self.repair = None if repair is None else (
            *(copy.deepcopy(m).to(device).eval() for m in repair[:2]), repair[2].to(device))
        self.network = self.subject  # what the reference path runs: the subject, or REPAIR's
        self._hessian_batches = None

    def autocast(self):
        return device_autocast(self.device, self.bf16) if self.bf16 else contextlib.nullcontext()

    def evaluate(self, coords: np.ndarray, batched: bool = True) -> list[dict]:
        """One {metric: numpy value} per row of coords (P, K), in order."""
        coords = torch.as_tensor(np.asarray(coords, dtype=np.float64))
        if batched:
            values = {**self._batched(coords), **self._curvatures(coords)}
        else:
            per_point = [self._reference(row[None]) for row in coords]
            values = {k: torch.cat([v[k] for v in per_point]) for k in per_point[0]}
        return [{k: v[p].cpu().numpy() for k, v in values.items()} for p in range(len(coords))]

    def _measure(self, forward, params: dict, num_points: int) -> dict:
        out = {}
        if self.measures.needs_scan_data:
            out = measure(forward, self.data, self.measures, self.teacher, num_points,
                          self.autocast)
        if "norm" in self.measures.metrics:
            out["param_norm"] = point_norms(params)
        return out

    def _stored_mode(self) -> str:
        """The buffers a point starts from: recalibration starts from A's (then resets);
        REPAIR from the interpolated ones (then rescales)."""
        return "interpolate" if self.bn_mode in ("interpolate", "repair") else "keep"

    @torch.no_grad()
    def features_at(self, coords) -> tuple[torch.Tensor, torch.Tensor]:
        """(train (N, D), test (M, D)) float32 embeddings at one point, coords (K,), as its
        metrics see them (same weights, BN mode and images; the reference path)."""
        coords = torch.as_tensor(np.asarray(coords, dtype=np.float64)).reshape(1, -1)
        forward, _ = self._reference_forward(coords, parts=("embedding",))
        only = Measures(("knn",))
        feats = [_split_sums(forward, self.data.splits[s], only, None, 1, self.autocast)["feats"]
                 for s in SPLITS]
        return feats[0][0], feats[1][0]

    @torch.no_grad()
    def _reference(self, coords: torch.Tensor) -> dict:
        """One point: weights copied into the real network, BN recalibrated in place."""
        wanted = self._wants_curvature(coords[0])
        recal = self.measures.needs_scan_data or wanted
        forward, params = self._reference_forward(coords, recal=recal)
        out = self._measure(forward, params, 1)
        if self.measures.needs_curvature:
            out.update(self._curvature(wanted))
        return out

    @torch.no_grad()
    def _curvatures(self, coords: torch.Tensor) -> dict:
        """hessian-* metrics (P, ...) of the batched path: each point wanted loaded into the
        reference network in turn, as `_reference` does, so values match it exactly."""
        if not self.measures.needs_curvature:
            return {}
        rows = []
        for row in coords:
            wanted = self._wants_curvature(row)
            if wanted:
                self._reference_forward(row[None], recal=True)
            rows.append(self._curvature(wanted))
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _wants_curvature(self, row: torch.Tensor) -> bool:
        """Whether the point at coordinates row (K,) has its curvature evaluated."""
        if not self.measures.needs_curvature:
            return False
        return self.curvature_at is None or tuple(map(float, row)) in self.curvature_at

    def _curvature(self, wanted: bool) -> dict:
        """hessian-* metrics (1, ...) of the network as loaded now; NaN unless wanted."""
        curvature, metrics = self.measures.curvature, self.measures.metrics
        if not wanted:
            return missing_curvature(curvature, metrics)
        if self._hessian_batches is None:
            source = self.data.sources[curvature.split]
            batch_size = self.data.splits["train"].batch_size
            self._hessian_batches = hessian_batches(source, curvature, self.teacher,
                                                    self.measures.teacher_temp, self.device,
                                                    batch_size)
        names = moved_parameters(self.subject, curvature)
        return point_curvature(self.subject, self._hessian_batches, names, curvature, metrics,
                               self.measures.student_temp)

    def _reference_forward(self, coords: torch.Tensor, parts=("embedding", "logits", "head"),
                           recal: bool = True) -> tuple:
        """(forward, params) of one point (1, K): its weights loaded into the private network,
        BN recalibrated in place under bn_mode recalibrate (unless `recal` is False: no metric
        reads data); forward gives the (1, B, ...) outputs `parts`."""
        params = self.geometry.params_at(coords)
        buffers = self.geometry.buffers_at(coords, self._stored_mode())
        state = {k: v[0] for k, v in {**params, **buffers}.items()}
        self.subject.load_state_dict(state, strict=True)
        if self.bn_mode == "recalibrate" and recal and self.data is not None:
            whole = len(self.recal_parts) > 1 or self.subject.encoder is None
            target = self.subject if whole else self.subject.encoder
            recalibrate(target, images(self.data.bn), self.autocast)
        self.network = self._repaired(float(coords[0, 0])) if self.bn_mode == "repair" \
            else self.subject
        self.network.eval()

        def forward(x):
            return {k: v[None] for k, v in self.network(x, parts).items()}  # (1, B, ...)
        return forward, params

    def _repaired(self, alpha: float) -> Subject:
        """The loaded point after REPAIR at `alpha` (a new network, or the subject itself
        changed in place, as landscape.align.repair returns it)."""
        a, b, pictures = self.repair
        fixed = repair_function()(self.subject, a, b, alpha, pictures)
        return self.subject if fixed is None else fixed

    @torch.no_grad()
    def _batched(self, coords: torch.Tensor) -> dict:
        """P points in one pass under vmap; BN statistics per point, computed functionally."""
        params = self.geometry.params_at(coords)  # name -> (P, *shape)
        buffers = self.geometry.buffers_at(coords, self._stored_mode())
        if self.bn_mode == "recalibrate" and self.measures.needs_scan_data:
            # running mean/var replaced; batch counts (and any other buffer) stay A's
            bn = BatchedBN(self.twin, {"parts": self.recal_parts})
            buffers.update(bn.recalibrate(params, images(self.data.bn), self.autocast))
        call = vmap(lambda p, b, x: functional_call(self.twin, (p, b), (x,)),
                    in_dims=(0, 0, None))
        return self._measure(lambda x: call(params, buffers, x), params, len(coords))

    @property
    def twin(self):
        """The network with functional BN layers, made once per evaluator."""
        if self._twin is None:
            self._twin = swap_batchnorm(self.subject).eval()
        return self._twin
