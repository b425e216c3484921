"""Sections train, distill and eval: the engines' steps (runs.engines.train.train_step,
runs.engines.distill.distill_step) and evaluation (runs.engines.train.evaluate), each against
a DataLoader + eager fp32 reference. train and distill also measure the fast path alone for
each of BenchConfig.variants (ViTs, BatchNorm VGG, GroupNorm ResNet: their MFU), recorded as
comparisons `train_step[NAME options]` without a reference."""

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from runs.datasets.base import DatasetInfo, ImageData
from runs.device import use_bf16
from runs.engines import engine
from runs.gpu_loader import eval_loader
from runs.studies.bench.common import (
    Bench,
    Runner,
    comparison,
    count_flops,
    fast_loader,
    first_line,
    forever,
    measure,
    new_model,
    reference_loader,
    synthetic_images,
    to_device,
    variant_bench,
)

# ---------------------------------------------------------------------------------------
# 1. Supervised training step


def train_config(bench: Bench):
    from runs.engines.train import TrainConfig
    return TrainConfig(model=bench.cfg.model, width=bench.cfg.width,
                       model_options=bench.cfg.model_options,
                       batch_size=bench.cfg.train_batch, num_steps=10**9)  # lr stays at peak


def fast_train(bench: Bench, data: ImageData, shuffle=True, augment=True,
               precision="auto") -> Runner:
    """runs.train's path: GPULoader, bf16 autocast, channels_last, fused SGD, compile."""
    from runs.engines.train import Session, make_optimizer, train_step
    cfg, device = train_config(bench), bench.device
    model = new_model(bench, data.info)
    loader = fast_loader(data, cfg.batch_size, device, shuffle, augment)
    forward = engine.prepare(model, device, bench.compile)
    optimizer, scheduler = make_optimizer(cfg, model, device)
    s = Session(cfg, None, model, forward, optimizer, scheduler, None, loader, {}, device,
                use_bf16(device, precision))
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
    return with_variants({"comparisons": {"train_step": step}}, "train_step", bench, data,
                         fast_train, train_flops)


def with_variants(body: dict, base: str, bench: Bench, data: ImageData, fast, flops) -> dict:
    """Add `base[NAME options]`: the fast path alone for each of the config's variants; a
    variant that fails is recorded in body["variant_errors"] and the others still run."""
    for text in bench.cfg.variants:
        key = f"{base}[{text.replace(':', ' ').replace(',', ' ')}]"
        print(f"  {key} ...", file=sys.stderr, flush=True)
        try:
            variant = variant_bench(bench, text)
            paths = {"fast": measure(fast(variant, data), bench.cfg.warmup, bench.cfg.steps,
                                     bench.device)[0]}
            body["comparisons"][key] = comparison("images/s", paths, bench,
                                                  flops(variant, data.info))
        except Exception as err:  # noqa: BLE001 - one variant must not lose the others
            errors = body.setdefault("variant_errors", {})
            errors[key] = f"{type(err).__name__}: {first_line(err)}"
    return body


# ---------------------------------------------------------------------------------------
# 2. Distillation step


def distill_config(bench: Bench):
    from runs.engines.distill import DistillConfig
    cfg = bench.cfg
    return DistillConfig(model=cfg.model, width=cfg.width, model_options=cfg.model_options,
                         out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim,
                         batch_size=cfg.distill_batch, num_steps=10**9)


def distill_nets(dcfg, info: DatasetInfo):
    """(student, teacher) DinoNets on the CPU, exactly as runs.engines.distill.setup builds them."""
    from runs.engines.distill import (
        STUDENT_SEED_OFFSET,
        DinoNet,
        alpha_init,
        build_pair,
        teacher_seed,
    )
    teacher = DinoNet(*build_pair(dcfg, info.num_classes, info.channels, teacher_seed(dcfg)))
    student = DinoNet(*build_pair(dcfg, info.num_classes, info.channels,
                                  dcfg.seed + STUDENT_SEED_OFFSET))
    alpha_init(student, teacher, dcfg.alpha)
    return student, teacher


def trained_params(student) -> list:
    return [*student.model.encoder.parameters(), *student.head.parameters()]


def fast_distill(bench: Bench, data: ImageData, shuffle=True, precision="auto") -> Runner:
    """runs.distill's path: teacher forward + student forward/backward, fused AdamW."""
    from runs.engines.distill import Session, distill_step
    dcfg, device = distill_config(bench), bench.device
    student, teacher = distill_nets(dcfg, data.info)
    teacher.requires_grad_(False).eval().to(device)
    loader = fast_loader(data, dcfg.batch_size, device, shuffle, augment=False)
    forward = engine.prepare(student, device, bench.compile)
    optimizer = torch.optim.AdamW(trained_params(student), lr=dcfg.lr, betas=(0.9, 0.999),
                                  weight_decay=dcfg.weight_decay, fused=device.type == "cuda")
    s = Session(dcfg, None, student, forward, teacher, optimizer, loader, None, None, device,
                use_bf16(device, precision))
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
    from runs.engines.distill import distill_loss
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
    return with_variants({"comparisons": {"distill_step": step}}, "distill_step", bench, data,
                         fast_distill, distill_flops)


# ---------------------------------------------------------------------------------------
# 3. Inference forward (evaluation)


def fast_eval(bench: Bench, data: ImageData) -> Runner:
    """runs.engines.train.evaluate over a device-resident split: one step = one pass."""
    from runs.engines.train import evaluate
    model = new_model(bench, data.info)
    holder = SimpleNamespace(forward=engine.prepare(model, bench.device, bench.compile))
    loader = eval_loader(data, bench.device, bench.cfg.eval_batch)

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
