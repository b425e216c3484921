"""Benchmark of the hot paths: `python -m runs.bench [--device auto] [--quick] [--out bench]`.

For each hot path, in one process, the toolkit's fast path and a plain reference written here
the way public research code works: a torch.utils.data.DataLoader over a Dataset of PIL images
with torchvision transforms and worker processes, eager fp32, channels-first, one model or one
point at a time. Both compute the same thing (tests/test_bench.py checks it with augmentation
off and a fixed order); only their speed differs.

Per path: items per second (images, points, queries), seconds per step, achieved GFLOP/s,
model-FLOP utilisation (MFU) against the device's dense bf16 peak, and the ratio to the
reference. FLOPs per item are counted, not estimated: torch.utils.flop_counter.FlopCounterMode
over one forward + backward (forward only for inference) of the same network on the CPU, so
the backward is what autograd really runs, not a 3x rule. MFU is n/a on CPUs and on GPUs
missing from PEAK_BF16_TFLOPS (give --peak-tflops).

Sections (SECTIONS, --sections; all by default): train, distill, eval, probes, landscape,
tickets. A section whose package cannot be imported is recorded as skipped; one that fails
is recorded with its error and the others still run. The JSON goes to
`<out>/<device-slug>[-quick].json`, merged with the sections already there.
"""

import argparse
import copy
import dataclasses
import importlib
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from runs import engine
from runs.config import arg
from runs.datasets.base import DatasetInfo, ImageData
from runs.errors import UserError, cli, unknown
from runs.gpu_loader import Augment, GPULoader
from runs.models import create_model
from runs.registry import Registry
from runs.store import atomic_write_text

SCHEMA = "bench/1"
COMPILE = ("auto", "on", "off", *engine.COMPILE_MODES[1:])
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
# Class centres ~ N(0, s^2 I), s = 0.8 / dim^(1/4), under unit noise: the squared distance
# between centres (2 s^2 dim) grows like the noise in distances (~ sqrt(dim)), so k-NN
# accuracy stays near 70 % at any feature dimension: neither trivial nor chance.
FEATURE_SEPARATION = 0.8
BN_BATCH = 256  # images per BN recalibration batch (landscape.interpolate's default)


@dataclass(frozen=True)
class BenchConfig:
    model: str = arg("resnet18", "network of the train, distill, eval, landscape, tickets "
                                 "sections")
    width: float = arg(1.0, "channel width multiplier")
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


FULL = BenchConfig()
QUICK = BenchConfig(width=0.25, num_images=1024, eval_images=256, train_batch=64,
                    distill_batch=32, eval_batch=128, out_dim=4096, hidden_dim=256, warmup=1,
                    steps=3, eval_passes=1, workers=2, feature_train=5000, feature_test=1000,
                    feature_dim=128, probe_epochs=3, path_points=3, points_per_pass=3,
                    bn_images=64, path_images=64, path_test_images=64,
                    prune_repeats=3, mask_rounds=3)


@dataclass(frozen=True)
class Bench:
    """What every section gets: the sizes, the device and how fast it could go."""
    cfg: BenchConfig
    device: torch.device
    peak_tflops: float | None = None  # dense bf16 peak; None = unknown (MFU n/a)
    compile: bool | str = False  # torch.compile (True or a mode), eager fallback on failure

    @property
    def bf16(self) -> bool:
        return engine.use_bf16(self.device, "auto")

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
    """FLOPs of one call of `fn` as autograd runs it (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def comparison(unit: str, paths: dict, bench: Bench, flops_per_item: float | None,
               checks: dict = None, fast: str = "fast", reference: str = "reference") -> dict:
    """Rates, GFLOP/s, MFU and ratios of measured paths (see `measure`)."""
    for record in paths.values():
        rate = record["items"] / max(record["seconds"], 1e-12)
        flops = flops_per_item * rate if flops_per_item else None
        record.update(rate=rate, seconds_per_step=record["seconds"] / record["steps"],
                      gflop_per_s=flops / 1e9 if flops else None,
                      mfu=flops / (bench.peak_tflops * 1e12) if flops and bench.peak_tflops
                      else None)
    for record in paths.values():
        record["vs_reference"] = record["rate"] / paths[reference]["rate"]
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


# ---------------------------------------------------------------------------------------
# 1. Supervised training step


def train_config(bench: Bench):
    from runs.train import TrainConfig
    return TrainConfig(model=bench.cfg.model, width=bench.cfg.width,
                       batch_size=bench.cfg.train_batch, num_steps=10**9)  # lr stays at peak


def new_model(bench: Bench, info: DatasetInfo, seed: int = 0):
    return create_model(bench.cfg.model, num_classes=info.num_classes, width=bench.cfg.width,
                        in_channels=info.channels, seed=seed)


def fast_train(bench: Bench, data: ImageData, shuffle=True, augment=True,
               precision="auto") -> Runner:
    """runs.train's path: GPULoader, bf16 autocast, channels_last, fused SGD, compile."""
    from runs.train import Session, make_optimizer, train_step
    cfg, device = train_config(bench), bench.device
    model = new_model(bench, data.info)
    loader = fast_loader(data, cfg.batch_size, device, shuffle, augment)
    forward = engine.prepare(model, device, bench.compile)
    optimizer, scheduler = make_optimizer(cfg, model, device)
    s = Session(cfg, None, model, forward, optimizer, scheduler, None, loader, {}, device,
                engine.use_bf16(device, precision))
    batches = forever(loader.epoch)

    def step():
        x, y = next(batches)
        return train_step(s, x, y)

    eager = (lambda: setattr(s, "forward", s.model)) if bench.compile else None
    sgd = "fused SGD" if device.type == "cuda" else "SGD"
    return Runner(describe("GPULoader", s.bf16, device, bench.compile, sgd),
                  cfg.batch_size, step, eager, session=s)


def describe(loader: str, bf16: bool, device, compiled: bool | str, extra: str = "") -> str:
    mode = f" {compiled}" if isinstance(compiled, str) else ""
    parts = [loader, "bf16 autocast" if bf16 else "fp32",
             "channels_last" if device.type == "cuda" else "",
             f"torch.compile{mode}" if compiled else "", extra]
    return " + ".join(p for p in parts if p)


def reference_train(bench: Bench, data: ImageData, shuffle=True, augment=True) -> Runner:
    """DataLoader + torchvision transforms, eager fp32, channels-first, plain SGD."""
    cfg, device = train_config(bench), bench.device
    model = new_model(bench, data.info).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    loader = reference_loader(data, cfg.batch_size, bench, shuffle, augment)
    batches = forever(lambda _: loader)

    def step():
        x, y = to_device(next(batches), device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Runner(f"DataLoader ({bench.workers} workers) + torchvision transforms + eager "
                  f"fp32 + SGD", cfg.batch_size, step)


def train_flops(bench: Bench, info: DatasetInfo, batch: int = 2) -> float:
    """FLOPs per image of one forward + backward with cross-entropy, counted."""
    model = new_model(bench, info)
    x = torch.randn(batch, info.channels, *info.image_size)  # (B, C, H, W)
    y = torch.zeros(batch, dtype=torch.long)
    return count_flops(lambda: F.cross_entropy(model(x), y).backward()) / batch


def section_train(bench: Bench) -> dict:
    cfg = bench.cfg
    data = synthetic_images(cfg.num_images, seed=0)
    paths = {}
    for name, build in (("fast", fast_train), ("reference", reference_train)):
        paths[name], _ = measure(build(bench, data), cfg.warmup, cfg.steps, bench.device)
    step = comparison("images/s", paths, bench, train_flops(bench, data.info))
    return {"comparisons": {"train_step": step}}


# ---------------------------------------------------------------------------------------
# 2. Distillation step


def distill_config(bench: Bench):
    from runs.distill import DistillConfig
    cfg = bench.cfg
    return DistillConfig(model=cfg.model, width=cfg.width, out_dim=cfg.out_dim,
                         hidden_dim=cfg.hidden_dim, batch_size=cfg.distill_batch,
                         num_steps=10**9)


def distill_nets(dcfg, info: DatasetInfo):
    """(student, teacher) DinoNets on the CPU, exactly as runs.distill.setup builds them."""
    from runs.distill import STUDENT_SEED_OFFSET, DinoNet, alpha_init, build_pair, teacher_seed
    teacher = DinoNet(*build_pair(dcfg, info.num_classes, info.channels, teacher_seed(dcfg)))
    student = DinoNet(*build_pair(dcfg, info.num_classes, info.channels,
                                  dcfg.seed + STUDENT_SEED_OFFSET))
    alpha_init(student, teacher, dcfg.alpha)
    return student, teacher


def trained_params(student) -> list:
    return [*student.model.encoder.parameters(), *student.head.parameters()]


def fast_distill(bench: Bench, data: ImageData, shuffle=True, precision="auto") -> Runner:
    """runs.distill's path: teacher forward + student forward/backward, fused AdamW."""
    from runs.distill import Session, distill_step
    dcfg, device = distill_config(bench), bench.device
    student, teacher = distill_nets(dcfg, data.info)
    teacher.requires_grad_(False).eval().to(device)
    loader = fast_loader(data, dcfg.batch_size, device, shuffle, augment=False)
    forward = engine.prepare(student, device, bench.compile)
    optimizer = torch.optim.AdamW(trained_params(student), lr=dcfg.lr, betas=(0.9, 0.999),
                                  weight_decay=dcfg.weight_decay, fused=device.type == "cuda")
    s = Session(dcfg, None, student, forward, teacher, optimizer, loader, None, None, device,
                engine.use_bf16(device, precision))
    batches = forever(loader.epoch)

    def step():
        x, _ = next(batches)
        return distill_step(s, x)["loss"]

    eager = (lambda: setattr(s, "forward", s.student)) if bench.compile else None
    adamw = "fused AdamW" if device.type == "cuda" else "AdamW"
    return Runner(describe("GPULoader", s.bf16, device, bench.compile, adamw),
                  dcfg.batch_size, step, eager, session=s)


def reference_distill(bench: Bench, data: ImageData, shuffle=True) -> Runner:
    """DataLoader (ToTensor + Normalize, no augmentation), eager fp32, plain AdamW."""
    dcfg, device = distill_config(bench), bench.device
    student, teacher = distill_nets(dcfg, data.info)
    student.to(device)
    teacher.requires_grad_(False).eval().to(device)
    optimizer = torch.optim.AdamW(trained_params(student), lr=dcfg.lr, betas=(0.9, 0.999),
                                  weight_decay=dcfg.weight_decay)
    loader = reference_loader(data, dcfg.batch_size, bench, shuffle, augment=False)
    batches = forever(lambda _: loader)

    def step():
        x, _ = to_device(next(batches), device)
        with torch.no_grad():
            target = F.softmax(teacher(x) / dcfg.teacher_temp, dim=-1)  # (B, m)
        log_p = F.log_softmax(student(x) / dcfg.student_temp, dim=-1)  # (B, m)
        loss = -(target * log_p).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Runner(f"DataLoader ({bench.workers} workers) + eager fp32 + AdamW",
                  dcfg.batch_size, step)


def distill_flops(bench: Bench, info: DatasetInfo, batch: int = 2) -> float:
    """FLOPs per image: teacher forward + student forward and backward + loss, counted."""
    from runs.distill import distill_loss
    student, teacher = distill_nets(distill_config(bench), info)
    teacher.eval()
    x = torch.randn(batch, info.channels, *info.image_size)  # (B, C, H, W)

    def step():
        with torch.no_grad():
            target = teacher(x)
        distill_loss(student(x), target)["loss"].backward()

    return count_flops(step) / batch


def section_distill(bench: Bench) -> dict:
    cfg = bench.cfg
    data = synthetic_images(cfg.num_images, seed=0)
    paths = {}
    for name, build in (("fast", fast_distill), ("reference", reference_distill)):
        paths[name], _ = measure(build(bench, data), cfg.warmup, cfg.steps, bench.device)
    step = comparison("images/s", paths, bench, distill_flops(bench, data.info))
    return {"comparisons": {"distill_step": step}}


# ---------------------------------------------------------------------------------------
# 3. Inference forward (evaluation)


def fast_eval(bench: Bench, data: ImageData) -> Runner:
    """runs.train.evaluate over a device-resident split: one step = one pass."""
    from runs.train import evaluate
    model = new_model(bench, data.info)
    holder = SimpleNamespace(forward=engine.prepare(model, bench.device, bench.compile))
    loader = engine.eval_loader(data, bench.device, bench.cfg.eval_batch)

    def step():
        return evaluate(holder.forward, loader, bench.bf16)

    eager = (lambda: setattr(holder, "forward", model)) if bench.compile else None
    return Runner(describe("GPULoader", bench.bf16, bench.device, bench.compile),
                  len(data), step, eager)


def reference_eval(bench: Bench, data: ImageData) -> Runner:
    model = new_model(bench, data.info).to(bench.device).eval()
    loader = reference_loader(data, bench.cfg.eval_batch, bench, shuffle=False,
                              augment=False, drop_last=False)

    @torch.no_grad()
    def step():
        loss_sum, correct = 0.0, 0
        for x, y in loader:
            x, y = to_device((x, y), bench.device)
            logits = model(x)  # (B, classes)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        return {"loss": loss_sum / len(data), "accuracy": correct / len(data)}

    return Runner(f"DataLoader ({bench.workers} workers) + eager fp32", len(data), step)


def eval_flops(bench: Bench, info: DatasetInfo, batch: int = 2) -> float:
    model = new_model(bench, info).eval()
    x = torch.randn(batch, info.channels, *info.image_size)
    with torch.no_grad():
        return count_flops(lambda: model(x)) / batch


def section_eval(bench: Bench) -> dict:
    data = synthetic_images(bench.cfg.eval_images, seed=1)
    paths, outs = {}, {}
    for name, build in (("fast", fast_eval), ("reference", reference_eval)):
        paths[name], outs[name] = measure(build(bench, data), 1, bench.cfg.eval_passes,
                                          bench.device)
    checks = {"loss_fast": outs["fast"]["loss"], "loss_reference": outs["reference"]["loss"],
              "accuracy_fast": outs["fast"]["accuracy"],
              "accuracy_reference": outs["reference"]["accuracy"]}
    forward = comparison("images/s", paths, bench, eval_flops(bench, data.info), checks)
    return {"comparisons": {"eval_forward": forward}}


# ---------------------------------------------------------------------------------------
# 4. Probes on frozen features


def synthetic_features(num_train: int, num_test: int, dim: int, num_classes: int,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y): Gaussian classes around random centres, float32."""
    gen = torch.Generator().manual_seed(seed)
    scale = FEATURE_SEPARATION / dim ** 0.25
    centres = torch.randn(num_classes, dim, generator=gen) * scale  # (C, D)

    def draw(count):
        y = torch.randint(0, num_classes, (count,), generator=gen)
        return centres[y] + torch.randn(count, dim, generator=gen), y  # (N, D), (N,)

    return (*draw(num_train), *draw(num_test))


def sklearn_knn(train_x, train_y, test_x, test_y, k=20, metric="l2",
                temperature=0.07) -> float:
    """The k-NN reference: scikit-learn, brute force, all CPU cores.

    l2: Euclidean neighbours, majority vote (the paper's); cosine: cosine neighbours, votes
    weighted exp(cos / T) = exp((1 - cosine distance) / T) (DINO's).
    """
    from sklearn.neighbors import KNeighborsClassifier
    if metric == "l2":
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", n_jobs=-1)
    else:
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                                   weights=lambda dist: np.exp((1 - dist) / temperature),
                                   n_jobs=-1)
    clf.fit(np.asarray(train_x), np.asarray(train_y))
    return float(clf.score(np.asarray(test_x), np.asarray(test_y)))


def fast_knn(features, device, metric: str, k: int = 20) -> Callable[[], float]:
    from probes.nearest import knn_accuracy
    train_x, train_y, test_x, test_y = (t.to(device) for t in features)
    return lambda: knn_accuracy(train_x, train_y, test_x, test_y, k=k, metric=metric)


def knn_flops(features, metric: str, k: int = 20, queries: int = 64) -> float:
    """FLOPs per test query of the fast k-NN (the distance matmul dominates), counted."""
    from probes.nearest import knn_predict
    train_x, train_y, test_x, _ = features
    return count_flops(lambda: knn_predict(train_x, train_y, test_x[:queries], (k,),
                                           metric)) / min(queries, len(test_x))


def reference_linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=10,
                           batch_size=256, lr=1e-3, weight_decay=1e-2, device="cpu",
                           seed=0) -> float:
    """The paper's probe as public code runs it: CPU features in a TensorDataset, a
    DataLoader, eager nn.Linear + AdamW, test accuracy after the last epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Linear(train_x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=1024)
    for _ in range(epochs):
        for x, y in train:
            x, y = to_device((x, y), device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in test)
    return correct / len(test_x)


def probe_runners(bench: Bench, features) -> dict:
    """name -> (fast Runner, reference Runner, or None to share linear_sgd's reference)."""
    from probes.logistic import linear_probe_lbfgs, linear_probe_sgd
    cfg, device, queries = bench.cfg, bench.device, len(features[2])
    on_device = [t.to(device) for t in features]
    classes, epochs = cfg.probe_classes, cfg.probe_epochs
    runners = {}
    for metric in ("l2", "cosine"):
        fast = Runner(f"probes.nearest on the device ({metric})", queries,
                      fast_knn(features, device, metric))
        ref = Runner(f"scikit-learn KNeighborsClassifier brute ({metric})", queries,
                     lambda m=metric: sklearn_knn(*features, metric=m))
        runners[f"knn_{metric}"] = (fast, ref)
    sgd = Runner("probes.logistic.linear_probe_sgd, features on the device", 1,
                 lambda: linear_probe_sgd(*on_device, classes, epochs=epochs)["accuracy"])
    ref = Runner("TensorDataset + DataLoader + eager Linear/AdamW (the paper's probe)", 1,
                 lambda: reference_linear_probe(*features, classes, epochs, device=device))
    runners["linear_sgd"] = (sgd, ref)
    lbfgs = Runner("probes.logistic.linear_probe_lbfgs (6 L2 strengths + refit)", 1,
                   lambda: linear_probe_lbfgs(*on_device, classes)["accuracy"])
    runners["linear_lbfgs"] = (lbfgs, None)
    return runners


def section_probes(bench: Bench) -> dict:
    """k-NN (both variants) vs scikit-learn; linear probes vs a DataLoader loop."""
    cfg, device = bench.cfg, bench.device
    features = synthetic_features(cfg.feature_train, cfg.feature_test, cfg.feature_dim,
                                  cfg.probe_classes)
    # One untimed call each, on a tenth of the rows: first calls pay imports (sklearn,
    # optimiser internals), CUDA context and cuBLAS set-up (a first linear_probe_sgd on a
    # CPU takes 20x longer than the next).
    warm = probe_runners(bench, [t[:max(len(t) // 10, 100)] for t in features])
    measured, comparisons = {}, {}
    for name, (fast, ref) in probe_runners(bench, features).items():
        fast.warm = warm[name][0].step
        if ref is not None:
            ref.warm = warm[name][1].step
        fast_record, fast_acc = measure(fast, 1, cfg.probe_repeats, device)
        if ref is None:  # the L-BFGS probe answers the same question as the paper's probe
            ref_record, ref_acc = dict(measured["linear_sgd"][0]), measured["linear_sgd"][1]
        else:
            ref_record, ref_acc = measure(ref, 1, cfg.probe_repeats, device)
        measured[name] = (ref_record, ref_acc)
        knn = name.startswith("knn")
        flops = knn_flops(features, name.removeprefix("knn_")) if knn else None
        checks = {"accuracy_fast": fast_acc, "accuracy_reference": ref_acc}
        comparisons[name] = comparison("queries/s" if knn else "probes/s",
                                       {"fast": fast_record, "reference": ref_record},
                                       bench, flops, checks)
    return {"comparisons": comparisons}


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
    return {"comparisons": {f"path{len(alphas)}_bn_recalibrate": path}}


def synthetic_info() -> DatasetInfo:
    return synthetic_images(1, 0).info


# ---------------------------------------------------------------------------------------
# 6. Tickets: one IMP pruning step, and the overhead of training under a mask


def prune_inputs(bench: Bench):
    """(weights name -> tensor on the device, dense mask on the device, weights to keep)."""
    from tickets.mask import dense_mask, num_total, prunable_names
    from tickets.prune import kept_count
    model = new_model(bench, synthetic_info()).to(bench.device)
    names = prunable_names(model)
    mask = {k: m.to(bench.device) for k, m in dense_mask(model, names).items()}
    weights = {k: p.detach() for k, p in model.named_parameters() if k in mask}
    return weights, mask, kept_count(num_total(mask), 0.2, 1)


def reference_prune(weights: dict, mask: dict, num_keep: int) -> dict:
    """Global magnitude pruning as open_lth does it: weights to NumPy on the host, one sort,
    a threshold, masks back (ties aside, the same mask as tickets.prune)."""
    host = {k: w.cpu().numpy() for k, w in weights.items()}
    keep = {k: m.cpu().numpy() for k, m in mask.items()}
    vector = np.abs(np.concatenate([host[k][keep[k]] for k in host]))
    num_prune = len(vector) - num_keep
    threshold = np.sort(vector)[num_prune - 1]
    return {k: torch.from_numpy(keep[k] & (np.abs(host[k]) > threshold)) for k in host}


def prune_comparison(bench: Bench) -> dict:
    from tickets.prune import magnitude_prune
    weights, mask, num_keep = prune_inputs(bench)
    fast = Runner("tickets.prune.magnitude_prune on the device (kthvalue)", 1,
                  lambda: magnitude_prune(weights, mask, num_keep))
    ref = Runner("NumPy on the host: concatenate, sort, threshold", 1,
                 lambda: reference_prune(weights, mask, num_keep))
    paths, out = {}, {}
    for name, runner in (("fast", fast), ("reference", ref)):
        paths[name], out[name] = measure(runner, 1, bench.cfg.prune_repeats, bench.device)
    same = all(torch.equal(out["fast"][k].cpu(), out["reference"][k]) for k in mask)
    checks = {"masks_equal": same, "weights": sum(m.numel() for m in mask.values()),
              "kept": num_keep}
    return comparison("prunes/s", paths, bench, None, checks)


def masked_comparison(bench: Bench) -> dict:
    """Masked vs unmasked supervised steps: two sessions from one init, alternating rounds.

    Two sessions, not one with the mask switched on and off: unmasked steps on masked
    weights grow the pruned weights from 0 through denormal floats, slow on CPUs.
    """
    from runs.masking import Mask
    from tickets.prune import magnitude_prune
    cfg = bench.cfg
    data = synthetic_images(cfg.num_images, seed=0)
    runners = {"unmasked": fast_train(bench, data), "masked": fast_train(bench, data)}
    weights, dense, _ = prune_inputs(bench)
    keep = round(cfg.mask_density * sum(m.numel() for m in dense.values()))
    s = runners["masked"].session
    s.mask = Mask(s.model, magnitude_prune(weights, dense, keep))
    s.mask.apply_to_weights()  # as runs.train starts a masked run
    for runner in runners.values():
        warm_up(runner, cfg.warmup)
    rounds = alternate(runners, cfg.mask_rounds, cfg.steps, bench.device)
    what = {"masked": f"runs.train.train_step under a Mask ({cfg.mask_density:.2f} density)",
            "unmasked": "runs.train.train_step, no mask"}
    paths = {name: {"what": what[name], "steps": cfg.steps,
                    "items": cfg.steps * cfg.train_batch,
                    "seconds": statistics.median(times), "round_seconds": times}
             for name, times in rounds.items()}
    overhead = paths["masked"]["seconds"] / paths["unmasked"]["seconds"] - 1
    checks = {"overhead_pct": 100 * overhead, "goal_pct": 2.0, "within_goal": overhead < 0.02}
    return comparison("images/s", paths, bench, train_flops(bench, synthetic_info()), checks,
                      fast="masked", reference="unmasked")


def alternate(runners: dict, rounds: int, steps: int, device) -> dict:
    """name -> seconds of `steps` steps per round, the runners in A B B A ... order so a
    drift in machine speed (clocks, other load) hits both alike."""
    times = {name: [] for name in runners}
    for r in range(rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            record, _ = measure(runners[name], 0, steps, device)
            times[name].append(record["seconds"])
    return times


def section_tickets(bench: Bench) -> dict:
    return {"comparisons": {"prune_level": prune_comparison(bench),
                            "masked_step": masked_comparison(bench)}}


# ---------------------------------------------------------------------------------------
# The registry and the document


@dataclass(frozen=True)
class Section:
    run: Callable[[Bench], dict]
    needs: tuple[str, ...] = ()  # modules that must import, else the section is skipped


SECTIONS = Registry("benchmark section")
ORDER = ("train", "distill", "eval", "probes", "landscape", "tickets")
SECTIONS.register(Section(section_train, ("runs.train",)), name="train")
SECTIONS.register(Section(section_distill, ("runs.distill",)), name="distill")
SECTIONS.register(Section(section_eval, ("runs.train",)), name="eval")
SECTIONS.register(Section(section_probes, ("probes.nearest", "probes.logistic", "sklearn")),
                  name="probes")
SECTIONS.register(Section(section_landscape, ("landscape.points", "landscape.geometry",
                                              "landscape.network")), name="landscape")
SECTIONS.register(Section(section_tickets, ("tickets.prune", "tickets.mask", "runs.masking")),
                  name="tickets")


def missing(needs: Iterable[str]) -> str | None:
    """Why a section cannot run (a module that does not import), or None."""
    for name in needs:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a half-written package fails in many ways
            return f"{name} does not import ({type(err).__name__}: {first_line(err)})"
    return None


def run_section(name: str, bench: Bench) -> dict:
    """A section's record: its comparisons, or why it was skipped or failed."""
    section = SECTIONS.get(name)
    from runs.results import git_state
    sha, dirty = git_state()  # per section too: a file merges sections of several runs
    stamp = {"measured_utc": utc_now(), "git_sha": sha, "git_dirty": dirty,
             "config": dataclasses.asdict(bench.cfg)}
    reason = missing(section.needs)
    if reason:
        print(f"[{name}] skipped: {reason}", file=sys.stderr)
        return {**stamp, "skipped": reason}
    print(f"[{name}] measuring ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        body = section.run(bench)
    except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
        traceback.print_exc()
        return {**stamp, "error": f"{type(err).__name__}: {first_line(err)}"}
    return {**stamp, **body, "section_seconds": time.perf_counter() - start}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(bench: Bench, quick: bool, argv: list) -> dict:
    from runs.results import git_state
    sha, dirty = git_state()
    device = bench.device
    return {"schema": SCHEMA, "device": str(device), "device_name": device_name(device),
            "device_type": device.type, "peak_bf16_tflops": bench.peak_tflops,
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version() if device.type == "cuda"
            else None, "git_sha": sha, "git_dirty": dirty, "created_utc": utc_now(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "quick": quick, "argv": argv,
            "compile": bench.compile,
            # torch's defaults, which the eager fp32 references run under: cuDNN convs in
            # TF32 (allow_tf32 True), matmuls in full fp32, no cuDNN autotuning.
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def write(doc: dict, path: Path) -> Path:
    """Merge with the sections a previous run left in `path`, judge the goals over the
    merged sections; atomic write."""
    if path.exists():
        try:
            old = json.loads(path.read_text())
            doc["sections"] = {**old.get("sections", {}), **doc["sections"]}
        except (OSError, ValueError):
            pass  # an unreadable old file is replaced
    doc["goals"] = goal_rows(doc["sections"], doc.get("device_type") == "cuda"
                             and not doc.get("quick"))
    atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Goals: what the toolkit promises on one H100 (full sizes), checked against a document


@dataclass(frozen=True)
class Goal:
    text: str  # as a reader states it
    section: str
    comparison: str  # a comparison name, or "*" for every speed-up comparison
    value: Callable[[dict], float | None]  # the measured number from a comparison
    met: Callable[[float], bool]
    unit: str = ""  # how to print the number


def ratio_of(comp: dict) -> float | None:
    return comp.get("ratio")


def fast_mfu(comp: dict) -> float | None:
    return comp["paths"]["fast"].get("mfu")


GOALS = (
    Goal("supervised training step: MFU >= 30 %", "train", "train_step", fast_mfu,
         lambda v: v >= 0.30, "%"),
    Goal("distillation step: MFU >= 25 %", "distill", "distill_step", fast_mfu,
         lambda v: v >= 0.25, "%"),
    Goal("25-point path with BN recalibration over CIFAR10 train + test: < 30 s",
         "landscape", "path25_bn_recalibrate",
         lambda comp: comp["checks"].get("path_seconds_fast"), lambda v: v < 30, "s"),
    Goal("masked training step: < 2 % slower than unmasked", "tickets", "masked_step",
         lambda comp: comp["checks"].get("overhead_pct"), lambda v: v < 2, "% overhead"),
    Goal("every fast path: >= 5x its plain reference", "*", "*", ratio_of,
         lambda v: v >= 5, "x"),
)
NOT_SPEEDUPS = ("masked_step",)  # comparisons of an overhead, not fast vs reference


def goal_rows(sections: dict, judged: bool = True) -> list[dict]:
    """{"goal", "measured", "value", "met"} per goal and comparison it covers; `met` None
    where the document lacks the number (a section not run, MFU n/a on a CPU) or where the
    run is not one the goals speak of (`judged` False: a CPU, or quick sizes)."""
    rows = []
    for goal in GOALS:
        for section, name, comp in covered(goal, sections):
            value = goal.value(comp)
            met = None if value is None or not judged else bool(goal.met(value))
            rows.append({"goal": goal.text, "measured": f"{section}/{name}",
                         "value": value, "unit": goal.unit, "met": met})
    return rows


def covered(goal: Goal, sections: dict):
    """(section, comparison, record) that a goal speaks of, where measured."""
    for section, body in sections.items():
        if goal.section not in ("*", section):
            continue
        for name, comp in body.get("comparisons", {}).items():
            if goal.comparison == name or (goal.comparison == "*" and
                                           name not in NOT_SPEEDUPS):
                yield section, name, comp


def goals_text(rows: list[dict], device_name: str, quick: bool) -> str:
    """One line per goal row; a header saying where the goals were stated for."""
    head = (f"goals (stated for one H100 at full sizes; this run: {device_name}"
            f"{', quick sizes' if quick else ''}):")
    lines = [head]
    for row in rows:
        value, unit = row["value"], row["unit"]
        shown = "n/a" if value is None else (pct(value) if unit == "%" else
                                             f"{value:.3g} {unit}")
        verdict = {True: "met", False: "NOT met"}.get(row["met"], "not measured" if
                                                        value is None else "not judged here")
        lines.append(f"  {row['goal']} [{row['measured']}]: {shown}, {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Printing


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(sections: dict) -> str:
    head = ("section", "measure", "path", "rate", "unit", "ms/step", "GFLOP/s", "MFU", "x ref")
    rows = [head]
    for section, body in sections.items():
        if "comparisons" not in body:
            status = "skipped" if "skipped" in body else "error"
            rows.append((section, status, *[""] * (len(head) - 2)))
            continue
        for name, comp in body["comparisons"].items():
            for path, rec in comp["paths"].items():
                rows.append((section, name, path, fmt(rec["rate"], ",.1f"), comp["unit"],
                             fmt(1000 * rec["seconds_per_step"], ",.1f"),
                             fmt(rec["gflop_per_s"], ",.1f"),
                             pct(rec["mfu"]),
                             fmt(rec["vs_reference"], ".2f")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def notes(sections: dict) -> str:
    """Checks, compile status, skips and errors, one line each."""
    lines = []
    for section, body in sections.items():
        for key in ("skipped", "error"):
            if key in body:
                lines.append(f"{section}: {key}: {body[key]}")
        for name, comp in body.get("comparisons", {}).items():
            if comp["checks"]:
                text = ", ".join(f"{k}={fmt_check(v)}" for k, v in comp["checks"].items())
                lines.append(f"{section}/{name}: {text}")
            for path, rec in comp["paths"].items():
                if "compile" in rec:
                    lines.append(f"{section}/{name}/{path}: torch.compile {rec['compile']}")
    return "\n".join(lines)


def pct(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f} %"


def fmt_check(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------
# CLI


HELP = """Benchmark the toolkit's hot paths against plain references (DataLoader + torchvision
transforms + workers, eager fp32, channels-first, one model or point at a time) in one
process: images/s (points/s, queries/s), GFLOP/s, MFU against the GPU's dense bf16 peak and
the ratio fast / reference. Without --quick the sizes are the paper's (ResNet18, batch 512,
DINO head 65536, 50k x 512 features): meant for a GPU. Writes OUT/<device>[-quick].json,
keeping the sections of earlier runs that this run did not measure."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runs.bench", description=HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized smoke run (width 0.25, batch 64, a few steps, 5k x 128 "
                        "features); a couple of minutes on 2 cores")
    p.add_argument("--out", default="bench", help="folder of the JSON file")
    p.add_argument("--sections", nargs="+", default=list(ORDER), metavar="NAME",
                   help=f"sections to measure, of: {', '.join(ORDER)}")
    p.add_argument("--compile", choices=COMPILE, default=None,
                   help="torch.compile the fast paths (default of the preset: auto = CUDA "
                        "only); a failed compile falls back to eager and says so")
    p.add_argument("--steps", type=int, default=0, help="timed steps per path; 0 = preset")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps; -1 = preset")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (torch.set_num_threads); 0 = torch's default. "
                        "On a loaded machine 1 thread gives steadier CPU numbers")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak (TFLOP/s) when not in the table")
    return p


def make_config(args) -> BenchConfig:
    cfg = QUICK if args.quick else FULL
    changes = {}
    if args.compile:
        changes["compile"] = args.compile
    if args.steps > 0:
        changes["steps"] = args.steps
    if args.warmup >= 0:
        changes["warmup"] = args.warmup
    return dataclasses.replace(cfg, **changes)


def check_sections(names: list[str]) -> list[str]:
    for name in names:
        if name not in SECTIONS:
            raise unknown("benchmark section", name, ORDER)
    return [name for name in ORDER if name in names]


def use_compile(choice: str, device: torch.device) -> bool | str:
    """False, True (the default mode) or a torch.compile mode name."""
    if choice in engine.COMPILE_MODES:
        return choice
    return choice == "on" or (choice == "auto" and device.type == "cuda")


@cli
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    device = engine.resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    if cfg.steps < 1:
        raise UserError(f"--steps {cfg.steps}: must be at least 1")
    names = check_sections(args.sections)
    bench = Bench(cfg, device, peak_tflops(device, args.peak_tflops),
                  use_compile(cfg.compile, device))
    doc = provenance(bench, args.quick, argv)
    print(f"runs.bench {' '.join(argv)}: {doc['device_name']} ({device}), torch "
          f"{doc['torch_version']}, git {doc['git_sha'][:10]}, peak bf16 "
          f"{fmt(bench.peak_tflops, '.1f')} TFLOP/s", file=sys.stderr)
    sections = {name: run_section(name, bench) for name in names}
    doc["sections"] = sections
    name = device_slug(device) + ("-quick" if args.quick else "")
    path = write(doc, Path(args.out) / f"{name}.json")
    print(table(sections))
    extra = notes(sections)
    if extra:
        print(extra)
    print(goals_text(doc["goals"], doc["device_name"], args.quick))
    print(f"wrote {path}")
    return 1 if any("error" in body for body in sections.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
