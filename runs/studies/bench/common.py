"""What every benchmark section shares: the sizes (BenchConfig, FULL, QUICK), the Bench a
section gets, device facts (name, dense bf16 peak), measuring (Runner, measure, comparison,
counted FLOPs) and the synthetic images with both loaders (GPULoader and the DataLoader +
torchvision reference)."""

import dataclasses
import itertools
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from runs.config import arg
from runs.datasets.base import DatasetInfo, ImageData
from runs.device import use_bf16
from runs.engines.engine import COMPILE_MODES
from runs.errors import UserError
from runs.gpu_loader import Augment, GPULoader
from runs.models import MODELS, create_model, parse_options

COMPILE = ("auto", "on", "off", *COMPILE_MODES[1:])
# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, no sparsity). Matched as whole
# words against torch.cuda.get_device_name, first match wins: the PCIe/NVL H100 before the
# SXM one, and "A10" does not match "A10G" (whose peak is not listed: MFU n/a).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10", 125.0),
)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics the synthetic images claim
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# Networks the train and distill sections also measure (fast path only: MFU across
# architectures): NAME or NAME:key=value,key=value (factory options, as --model-option).
VARIANTS = ("vit_tiny", "vit_small", "vgg11_bn", "resnet18:norm=group")


@dataclass(frozen=True)
class BenchConfig:
    model: str = arg("resnet18", "network of the train, distill, eval, landscape, tickets, "
                                 "curvature sections")
    width: float = arg(1.0, "channel width multiplier")
    model_options: tuple[str, ...] = arg((), "factory options of `model` (key=value)")
    variants: tuple[str, ...] = arg(VARIANTS, "more networks of the train and distill "
                                              "sections, fast path only: NAME[:key=value,...]")
    num_images: int = arg(50_000, "synthetic uint8 32x32 RGB training images (CIFAR10-sized)")
    eval_images: int = arg(10_000, "synthetic test images of the eval section")
    train_batch: int = arg(512, "images per supervised step")
    distill_batch: int = arg(256, "images per distillation step")
    eval_batch: int = arg(1024, "images per inference batch")
    out_dim: int = arg(65536, "DINO head output dimension")
    hidden_dim: int = arg(2048, "DINO head hidden width")
    warmup: int = arg(10, "untimed steps first (cuDNN autotune, torch.compile, workers)")
    steps: int = arg(50, "timed steps per path")
    eval_passes: int = arg(3, "timed passes over the eval images per path (one untimed)")
    workers: int = arg(8, "DataLoader worker processes of the references (<= CPU count)")
    compile: str = arg("auto", "torch.compile the fast paths: auto (CUDA only), on, off, "
                               "or a mode (reduce-overhead = with CUDA graphs)",
                       choices=COMPILE)
    feature_train: int = arg(50_000, "probe train features (rows)")
    feature_test: int = arg(10_000, "probe test features (rows)")
    feature_dim: int = arg(512, "probe feature dimension")
    probe_classes: int = arg(10, "classes of the synthetic features")
    probe_epochs: int = arg(10, "epochs of the paper's linear probe")
    probe_repeats: int = arg(1, "timed calls per probe (one untimed call first)")
    path_points: int = arg(25, "points on the linear path of the landscape section")
    points_per_pass: int = arg(8, "points evaluated together by the batched path")
    bn_images: int = arg(2048, "BN recalibration images per point")
    path_images: int = arg(50_000, "train images measured per point (CIFAR10's train split)")
    path_test_images: int = arg(10_000, "test images measured per point (CIFAR10's test)")
    reference_points: int = arg(3, "points of the path the one-at-a-time reference measures "
                                   "(points/s compare: every point costs the same)")
    prune_repeats: int = arg(5, "timed pruning calls per path")
    mask_rounds: int = arg(5, "alternating rounds of masked / unmasked timed steps")
    mask_density: float = arg(0.21, "density of the mask in the masked-step timing "
                                    "(0.8^7 = 0.21)")
    hvp_images: int = arg(2000, "images each Hessian-vector product of the curvature "
                                "section sums over")
    hvp_batch: int = arg(1000, "images per batch of a Hessian-vector product")
    hvp_repeats: int = arg(10, "timed Hessian-vector products per path (one untimed first)")
    eigen_images: int = arg(10_000, "images of the top-k eigenvalue timing (the goal's 10k "
                                    "CIFAR images; fewer are projected to 10k)")
    eigen_k: int = arg(5, "eigenvalues of the Lanczos timing")
    eigen_tol: float = arg(1e-4, "Lanczos stops at this relative Ritz residual (as "
                                 "landscape.hessian's --eigen-tol default)")
    match_repeats: int = arg(1, "timed alignments of two networks per method (seconds each)")
    match_images: int = arg(2048, "images activation matching correlates on")
    parallel_models: tuple[str, ...] = arg(("resnet20", "resnet18"), "networks of the "
                                           "parallel section (K runs together vs in turn)")
    parallel_ks: tuple[int, ...] = arg((1, 2, 4, 8, 16), "runs trained at once (K) of the "
                                                         "parallel section")
    parallel_batch: int = arg(256, "images per step of each parallel run (runs.train's "
                                   "default batch)")
    parallel_width: float = arg(1.0, "channel width multiplier of the parallel networks")
    parallel_steps: int = arg(10, "timed steps per round, path and K of the parallel section")
    parallel_rounds: int = arg(3, "alternating rounds of timed steps per K (the median "
                                  "round counts)")
    parallel_check_steps: int = arg(3, "float64 steps of the parallel equivalence check "
                                       "(fresh runs, each way)")
    run_steps: int = arg(31_360, "steps of one run, for runs/hour: a border child of the "
                                 "paper (160 epochs x 196 steps of 256 CIFAR10 images)")


FULL = BenchConfig()
QUICK = BenchConfig(width=0.25, num_images=1024, eval_images=256, train_batch=64,
                    distill_batch=32, eval_batch=128, out_dim=4096, hidden_dim=256, warmup=1,
                    steps=3, eval_passes=1, workers=2, feature_train=5000, feature_test=1000,
                    feature_dim=128, probe_epochs=3, path_points=3, points_per_pass=3,
                    bn_images=64, path_images=64, path_test_images=64,
                    prune_repeats=3, mask_rounds=3, hvp_images=32, hvp_batch=16,
                    hvp_repeats=2, eigen_images=32, match_images=128,
                    parallel_batch=32, parallel_width=0.25, parallel_steps=2)


@dataclass(frozen=True)
class Bench:
    """What every section gets: the sizes, the device and how fast it could go."""
    cfg: BenchConfig
    device: torch.device
    peak_tflops: float | None = None  # dense bf16 peak; None = unknown (MFU n/a)
    compile: bool | str = False  # torch.compile (True or a mode), eager fallback on failure

    @property
    def bf16(self) -> bool:
        return use_bf16(self.device, "auto")

    @property
    def workers(self) -> int:
        return max(0, min(self.cfg.workers, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------
# Device facts


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() or platform.machine() or "cpu"


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override` if > 0, else from the table."""
    if override > 0:
        return override
    return table_peak(device_name(device)) if device.type == "cuda" else None


def table_peak(name: str) -> float | None:
    """PEAK_BF16_TFLOPS for a CUDA device name, e.g. 'NVIDIA H100 80GB HBM3' -> 989.4."""
    for key, peak in PEAK_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", name):
            return peak
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(device: torch.device) -> str:
    name = slug(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# Measuring


@dataclass
class Runner:
    """One path of a comparison, ready to step."""
    what: str  # one line: how this path computes
    items: int  # images, points or queries per step
    step: Callable[[], object]  # one step: fetch its batch, compute; returns its output
    eager: Callable[[], None] | None = None  # after a failed torch.compile: go eager
    warm: Callable[[], object] | None = None  # a cheaper untimed step, when it differs
    session: object = None  # the engine's session, for sections that reuse a path


def measure(runner: Runner, warmup: int, steps: int, device) -> tuple[dict, object]:
    """(record, last output): untimed warm-up steps, then `steps` timed between syncs."""
    start = time.perf_counter()
    status = warm_up(runner, warmup)
    synchronize(device)
    record = {"what": runner.what, "warmup_seconds": time.perf_counter() - start}
    if status:
        record["compile"] = status
    out = None
    start = time.perf_counter()
    for _ in range(steps):
        out = runner.step()
    synchronize(device)
    record.update(steps=steps, items=steps * runner.items, seconds=time.perf_counter() - start)
    return record, out


def warm_up(runner: Runner, warmup: int) -> str | None:
    """Run the untimed steps; the first one under torch.compile may fall back to eager."""
    step = runner.warm or runner.step
    if runner.eager is None:
        for _ in range(warmup):
            step()
        return None
    status = first_compiled_step(step, runner.eager)
    for _ in range(warmup - 1):
        step()
    return status


def first_compiled_step(step: Callable, eager: Callable) -> str:
    """Compile happens on the first call: if it fails, switch the path to eager and go on."""
    try:
        step()
        return "compiled"
    except Exception as err:  # noqa: BLE001 - dynamo/inductor raise many types
        eager()
        torch._dynamo.reset()
        step()
        return f"failed, eager instead: {type(err).__name__}: {first_line(err)}"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` as autograd runs it (matmuls and convolutions, attention too).

    Attention written as matmuls is counted as such; F.scaled_dot_product_attention runs on
    its math backend here, as matmuls: the CPU's fused kernel has no FLOP formula and would
    count as 0. Elementwise work (softmax, norms, activations) is not counted, as in MFU.
    """
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def comparison(unit: str, paths: dict, bench: Bench, flops_per_item: float | None,
               checks: dict = None, fast: str = "fast", reference: str = "reference") -> dict:
    """Rates, GFLOP/s, MFU and ratios of measured paths (see `measure`); without a
    `reference` path (a fast path measured alone) the ratios are None."""
    for record in paths.values():
        rate = record["items"] / max(record["seconds"], 1e-12)
        flops = flops_per_item * rate if flops_per_item else None
        record.update(rate=rate, seconds_per_step=record["seconds"] / record["steps"],
                      gflop_per_s=flops / 1e9 if flops else None,
                      mfu=flops / (bench.peak_tflops * 1e12) if flops and bench.peak_tflops
                      else None)
    for record in paths.values():
        record["vs_reference"] = (record["rate"] / paths[reference]["rate"]
                                  if reference in paths else None)
    return {"unit": unit, "flops_per_item": flops_per_item, "paths": paths,
            "ratio": paths[fast]["vs_reference"], "checks": checks or {}}


# ---------------------------------------------------------------------------------------
# Data: the same uint8 images feed the GPULoader and the torchvision Dataset


def synthetic_images(count: int, seed: int, num_classes: int = 10) -> ImageData:
    """`count` uniform uint8 RGB 32x32 images with random labels: speed needs no content."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, num_classes, (count,), generator=gen)
    info = DatasetInfo("synthetic", num_classes, CIFAR_MEAN, CIFAR_STD, (32, 32), 3,
                       tuple(str(c) for c in range(num_classes)))
    return ImageData(x, y, info)


class PilImages(Dataset):
    """The images as torchvision's CIFAR10 serves them: one PIL image per item through
    `transform`, with an int label."""

    def __init__(self, data: ImageData, transform):
        self.images = data.x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8
        self.labels = data.y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        image = self.images[i]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(image), self.labels[i]


def reference_transform(info: DatasetInfo, augment: bool):
    import torchvision.transforms as T
    steps = [T.RandomCrop(info.image_size, padding=4), T.RandomHorizontalFlip()] if augment \
        else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(info.mean, info.std)])


def reference_loader(data: ImageData, batch_size: int, bench: Bench, shuffle=True,
                     augment=True, drop_last=True) -> DataLoader:
    """DataLoader + torchvision transforms + workers, pinned memory on CUDA."""
    dataset = PilImages(data, reference_transform(data.info, augment))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=bench.workers, pin_memory=bench.device.type == "cuda",
                      persistent_workers=bench.workers > 0,
                      generator=torch.Generator().manual_seed(0))


def fast_loader(data: ImageData, batch_size: int, device, shuffle=True,
                augment=True) -> GPULoader:
    """As engine.train_loader (which always shuffles); flip + 4-pixel pad-crop if augment."""
    aug = Augment(flip=True, crop_padding=4) if augment else Augment()
    return GPULoader(data.x, data.y, data.info.mean, data.info.std, batch_size, device,
                     shuffle=shuffle, drop_last=True, augment=aug, data_seed=0)


def forever(epoch: Callable[[int], Iterable]) -> Iterator:
    """Batches across epochs without end: epoch(0), epoch(1), ..."""
    for n in itertools.count():
        yield from epoch(n)


def to_device(batch, device):
    return [t.to(device, non_blocking=True) for t in batch]


def new_model(bench: Bench, info: DatasetInfo, seed: int = 0):
    cfg = bench.cfg
    return create_model(cfg.model, num_classes=info.num_classes, width=cfg.width,
                        in_channels=info.channels, seed=seed,
                        **parse_options(cfg.model, cfg.model_options))


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """'resnet18:norm=group,pool=avg' -> ('resnet18', ('norm=group', 'pool=avg')), checked:
    an unknown network or option is a UserError naming --variants and the valid ones."""
    name, _, rest = text.partition(":")
    if name not in MODELS:
        raise UserError(f"--variants {text}: unknown model {name!r}; valid: "
                        f"{', '.join(MODELS.names())}")
    options = tuple(item for item in rest.split(",") if item)
    parse_options(name, options, flag="--variants")
    return name, options


def variant_bench(bench: Bench, text: str) -> Bench:
    """The same sizes and device with another network (a variant of the sections)."""
    name, options = parse_variant(text)
    return dataclasses.replace(bench, cfg=dataclasses.replace(bench.cfg, model=name,
                                                              model_options=options))


def synthetic_info() -> DatasetInfo:
    return synthetic_images(1, 0).info
