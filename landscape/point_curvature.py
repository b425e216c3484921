"""Curvature as a metric of scans: `hessian-top` and `hessian-trace` at points of a path or
plane (landscape.interpolate --metrics ...).

At a point, the network is the one whose loss the scan reports there: its weights loaded into
the real module and its BatchNorm statistics after the scan's BN handling (recalibrated in
place under `--bn-mode recalibrate`), then BN in eval mode. The Hessian is that of the mean
loss over a fixed seeded subset of one split (`Curvature.samples`), w.r.t. the parameters
the scan moves that the loss depends on, taken by landscape.curvature's operators in fp32:
- hessian_top (k,): the k largest eigenvalues (Lanczos, `top_eigen`);
- hessian_trace, hessian_trace_se: Hutchinson's trace and its standard error.
Each costs tens to hundreds of Hessian-vector products (each ~ 2-3 backward passes over the
subset) per point, so the scan evaluates them only at the points asked for; other points
get NaN.
"""

import math
from dataclasses import dataclass

import torch

from landscape.curvature import (
    distillation_loss,
    hessian_operator,
    hutchinson,
    supervised_loss,
    teacher_targets,
    top_eigen,
)
from runs.errors import UserError, unknown

HESSIAN_METRICS = ("hessian-top", "hessian-trace")
HESSIAN_LOSSES = ("supervised", "distill")
HESSIAN_SPLITS = ("train", "test")
MIN_PROBES = 10  # Hutchinson's probes before its standard error is trusted to stop


@dataclass(frozen=True)
class Curvature:
    """How a scan's hessian-* metrics are taken (the --hessian-* flags)."""
    k: int = 1  # top eigenvalues per point (hessian-top)
    trace_tol: float = 0.05  # Hutchinson stops at standard error <= trace_tol x |trace|
    max_probes: int = 100  # ... or after this many Rademacher probes
    eigen_tol: float = 1e-4  # Lanczos stops at Ritz residuals <= eigen_tol x |eigenvalue|
    samples: int = 256  # images of `split` the loss averages over (all when fewer); 0 = all
    split: str = "train"
    loss: str = "supervised"  # or "distill": H(t, s) against the teacher's probabilities
    seed: int = 0  # the images' draw (seed + 2), the Lanczos start and the probes (seed)
    frozen: tuple[str, ...] = ()  # parameters the scan does not move (an attached --fc)

    def __post_init__(self):
        rules = (("--hessian-k", self.k, self.k >= 1, "must be at least 1 (top eigenvalues "
                  "per point)"),
                 ("--hessian-tol", self.trace_tol, 0 < self.trace_tol < math.inf,
                  "must be a positive number (the trace's relative standard error, e.g. 0.05)"),
                 ("--hessian-eigen-tol", self.eigen_tol, 0 < self.eigen_tol < math.inf,
                  "must be a positive number (relative Ritz residual, e.g. 1e-4)"),
                 ("--hessian-probes", self.max_probes, self.max_probes >= 2,
                  "must be at least 2 (a standard error needs two probes)"),
                 ("--hessian-samples", self.samples, self.samples >= 0,
                  "must be >= 0 images (0 = the whole split)"))
        for flag, value, ok, must in rules:
            if not ok:
                raise UserError(f"{flag} {value}: {must}")
        if self.split not in HESSIAN_SPLITS:
            raise unknown("--hessian-split", self.split, HESSIAN_SPLITS)
        if self.loss not in HESSIAN_LOSSES:
            raise unknown("Hessian loss", self.loss, HESSIAN_LOSSES)

    def describe(self) -> str:
        """'supervised loss, 256 train images': what the metrics' long names say."""
        count = self.samples or "all"
        return f"{self.loss} loss, {count} {self.split} images"


def moved_parameters(subject: torch.nn.Module, curvature: Curvature) -> list[str]:
    """Names of the parameters the Hessian is taken over: those the scan moves that the loss
    depends on: encoder + fc (supervised) or encoder + head (distill), a whole `net`; never
    the frozen ones (an attached --fc is the same at every point)."""
    parts = ("net", "encoder", "fc" if curvature.loss == "supervised" else "head")
    return [name for name, p in subject.named_parameters()
            if name.split(".")[0] in parts and name not in curvature.frozen and p.requires_grad]


def hessian_batches(source, curvature: Curvature, teacher, teacher_temp: float, device,
                    batch_size: int) -> list[tuple]:
    """(images (B, C, H, W), target) pairs the Hessian's loss averages over: a fixed draw of
    `curvature.samples` images of `source` (an ImageData; all of it when it holds fewer),
    with their labels (supervised) or the teacher's probabilities (B, m) (distill)."""
    from landscape.points import take
    from runs.gpu_loader import eval_loader
    count = min(curvature.samples, len(source.y))
    subset = take(source, count, curvature.seed + 2, "--hessian-samples")
    batches = list(eval_loader(subset, device, batch_size).epoch(0))
    if curvature.loss == "supervised":
        return batches
    if teacher is None:
        raise UserError("the distillation loss's Hessian needs --teacher REF")
    images = [x for x, _ in batches]
    return list(zip(images, teacher_targets(teacher, images, teacher_temp)))


def point_curvature(subject: torch.nn.Module, batches: list, names: list[str],
                    curvature: Curvature, metrics, student_temp: float = 1.0) -> dict:
    """{metric: (1, ...) float64 tensor} of the network as it is loaded (BN in eval mode with
    its running statistics); NaN where its loss is not finite there (a diverged point)."""
    loss = supervised_loss if curvature.loss == "supervised" else \
        distillation_loss(student_temp)
    with torch.enable_grad():
        op = hessian_operator(subject, loss, batches, params=names)
        if not math.isfinite(op.loss()):
            return missing_curvature(curvature, metrics)
        out = {}
        if "hessian-top" in metrics:
            eigen = top_eigen(op, curvature.k, tol=curvature.eigen_tol, seed=curvature.seed,
                              vectors=False)
            out["hessian_top"] = torch.tensor(eigen.values.copy(), dtype=torch.float64)[None]
        if "hessian-trace" in metrics:
            trace = hutchinson(op, tol=curvature.trace_tol,
                               min_probes=min(MIN_PROBES, curvature.max_probes),
                               max_probes=curvature.max_probes, seed=curvature.seed)
            out["hessian_trace"] = torch.tensor([trace.value], dtype=torch.float64)
            out["hessian_trace_se"] = torch.tensor([trace.se], dtype=torch.float64)
    return out


def missing_curvature(curvature: Curvature, metrics) -> dict:
    """The NaN values of a point whose curvature is not evaluated."""
    out = {}
    if "hessian-top" in metrics:
        out["hessian_top"] = torch.full((1, curvature.k), math.nan, dtype=torch.float64)
    if "hessian-trace" in metrics:
        out["hessian_trace"] = torch.full((1,), math.nan, dtype=torch.float64)
        out["hessian_trace_se"] = torch.full((1,), math.nan, dtype=torch.float64)
    return out


def curvature_specs(curvature: Curvature, metrics) -> dict:
    """name -> (non-point dims, units, long_name) of the hessian-* metrics asked for."""
    what = curvature.describe()
    specs = {}
    if "hessian-top" in metrics:
        specs["hessian_top"] = (("eigen",), "", f"top Hessian eigenvalues ({what})")
    if "hessian-trace" in metrics:
        specs["hessian_trace"] = ((), "", f"Hessian trace, Hutchinson ({what})")
        specs["hessian_trace_se"] = ((), "", f"standard error of the Hessian trace ({what})")
    return specs


def check_k(curvature: Curvature, subject: torch.nn.Module) -> int:
    """The number of parameters the Hessian is over; UserError when --hessian-k exceeds it."""
    size = sum(dict(subject.named_parameters())[n].numel()
               for n in moved_parameters(subject, curvature))
    if size == 0:
        raise UserError(f"--metrics hessian-*: the network has no parameters the "
                        f"{curvature.loss} loss depends on")
    if curvature.k > size:
        raise UserError(f"--hessian-k {curvature.k}: must lie in 1..{size} (the parameters "
                        f"the Hessian is taken over)")
    return size
