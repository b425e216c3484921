"""Section curvature: Hessian-vector products of the supervised loss on ResNet18-CIFAR
(landscape.curvature.hessian_operator), forward-over-reverse (`method="jvp"`) against the
plain `torch.autograd.grad` double-backward reference, in fp32 and (CUDA only) under bf16
autocast; and the time of the top-k eigenvalues by Lanczos in fp32 on `eigen_images` images
(the goal: top-5 on 10k CIFAR images in under 60 s on one H100), by the method the
toolkit's default (`--hvp auto`) takes on the device.

Which of the two HVP paths that default takes is the comparison's `default_path`: "fast"
(jvp) on CUDA, "reference" (double backward, the faster on CPUs) on a CPU, the one the
goals' CPU rule judges.

One step is one Hessian-vector product over `hvp_images` images, summed batch by batch
(`hvp_batch` images each) in float64 as the operator does: the rate is products per second.
Both methods take the product at the same point along the same vector, so their outputs
must agree to fp32 rounding (checked: `rel_diff`). No torch.compile: torch.func transforms
run eager here as in `python -m landscape.hessian`.

landscape is imported inside the functions: a section whose package does not import is
skipped.
"""

import time

import torch

from runs.studies.bench.common import (
    Bench,
    Runner,
    comparison,
    count_flops,
    first_line,
    measure,
    new_model,
    synchronize,
    synthetic_images,
    synthetic_info,
)

GOAL_IMAGES = 10_000  # the goal's CIFAR images: top-5 of ResNet18 on 10k in < 60 s
GOAL_SECONDS = 60.0


def image_batches(bench: Bench, count: int, batch: int, seed: int) -> list[tuple]:
    """`count` synthetic images normalised as CIFAR, in (x (B, 3, 32, 32), y (B,)) batches
    on the device: the operator's fixed data."""
    data = synthetic_images(count, seed)
    mean = torch.tensor(data.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.info.std).view(1, 3, 1, 1)
    x = (data.x.float() / 255 - mean) / std  # (N, 3, 32, 32)
    return [(x[i:i + batch].to(bench.device), data.y[i:i + batch].to(bench.device))
            for i in range(0, count, batch)]


def operator(bench: Bench, model, batches, method: str, bf16: bool):
    from landscape.curvature import hessian_operator, supervised_loss
    cast = (lambda: torch.autocast(bench.device.type, dtype=torch.bfloat16)) if bf16 else None
    return hessian_operator(model, supervised_loss, batches, "all", method, cast)


def hvp_runner(bench: Bench, model, batches, method: str, bf16: bool,
               v: torch.Tensor) -> Runner:
    """One Hessian-vector product over every batch per step; returns H v (n,) float32."""
    op = operator(bench, model, batches, method, bf16)
    how = {"jvp": "torch.func jvp(grad) forward-over-reverse",
           "double-backward": "torch.autograd.grad of g.v (double backward)"}[method]
    images = sum(len(y) for _, y in batches)
    what = (f"{how}, {'bf16 autocast' if bf16 else 'fp32'}, {images} images in batches of "
            f"{len(batches[0][1])}, float64 sum")
    return Runner(what, 1, lambda: op(v))


def hvp_flops(bench: Bench, images: int, batch: int = 2) -> float:
    """FLOPs of one double-backward product over `images` images, counted on the CPU on a
    batch of 2 (the reference's arithmetic as autograd runs it; forward-over-reverse
    counts within 1 %)."""
    from landscape.curvature import hessian_operator, supervised_loss
    model = new_model(bench, synthetic_info())
    x = torch.randn(batch, 3, 32, 32)  # (B, C, H, W)
    y = torch.zeros(batch, dtype=torch.long)
    op = hessian_operator(model, supervised_loss, [(x, y)], "all", "double-backward")
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0))
    return count_flops(lambda: op(v)) / batch * images


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| of two products (n,)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def hvp_comparison(bench: Bench, bf16: bool) -> dict:
    """jvp (fast) against double-backward (reference), both in the same precision; with
    bf16 also the error of each against the fp32 double-backward product."""
    cfg = bench.cfg
    model = new_model(bench, synthetic_info()).to(bench.device)
    batches = image_batches(bench, cfg.hvp_images, cfg.hvp_batch, seed=0)
    v = torch.randn(sum(p.numel() for p in model.parameters()),
                    generator=torch.Generator().manual_seed(1)).to(bench.device)
    v = v / v.norm()
    paths, out = {}, {}
    for name, method in (("fast", "jvp"), ("reference", "double-backward")):
        runner = hvp_runner(bench, model, batches, method, bf16, v)
        paths[name], out[name] = measure(runner, 1, cfg.hvp_repeats, bench.device)
    checks = {"rel_diff": rel_diff(out["fast"], out["reference"]), "images": cfg.hvp_images,
              "parameters": len(v)}
    if bf16:
        exact = operator(bench, model, batches, "double-backward", False)(v)
        checks.update(rel_error_fast=rel_diff(out["fast"], exact),
                      rel_error_reference=rel_diff(out["reference"], exact))
    comp = comparison("HVPs/s", paths, bench, hvp_flops(bench, cfg.hvp_images), checks)
    comp["default_path"] = {"jvp": "fast", "double-backward": "reference"}[
        default_method(bench)]
    return comp


def default_method(bench: Bench) -> str:
    """The HVP method of `--hvp auto` (landscape.curvature's default) on the device."""
    from landscape.curvature import resolve_method
    return resolve_method("auto", bench.device)


def eigen_comparison(bench: Bench) -> dict:
    """The top-k eigenvalues by Lanczos in fp32 on the default method's products (jvp on
    CUDA, double backward on CPUs), measured alone: the other method would take as many
    products, each at its rate in hvp_fp32.
    `seconds_10k`: measured when eigen_images is the goal's 10k, else projected linearly in
    images at the same number of Lanczos steps."""
    from landscape.curvature import top_eigen
    cfg = bench.cfg
    model = new_model(bench, synthetic_info()).to(bench.device)
    batches = image_batches(bench, cfg.eigen_images, cfg.hvp_batch, seed=2)
    method = default_method(bench)
    op = operator(bench, model, batches, method, False)
    op(torch.zeros(op.size, device=bench.device))  # untimed: first-call costs, autotune
    synchronize(bench.device)
    start = time.perf_counter()
    eigen = top_eigen(op, cfg.eigen_k, cfg.eigen_tol, seed=0, vectors=False)
    synchronize(bench.device)
    seconds = time.perf_counter() - start
    record = {"what": f"landscape.curvature.top_eigen, Lanczos to relative residual "
                      f"{cfg.eigen_tol:g} on {method} products, fp32, {cfg.eigen_images} "
                      f"images",
              "warmup_seconds": 0.0, "steps": 1, "items": 1, "seconds": seconds}
    scale = GOAL_IMAGES / cfg.eigen_images
    checks = {"images": cfg.eigen_images, "k": cfg.eigen_k, "tol": cfg.eigen_tol,
              "lanczos_steps": eigen.steps, "eigenvalues": [float(x) for x in eigen.values],
              "seconds": seconds, "seconds_10k": seconds * scale,
              "projected": cfg.eigen_images != GOAL_IMAGES, "goal_seconds": GOAL_SECONDS,
              "within_goal": seconds * scale < GOAL_SECONDS}
    flops = hvp_flops(bench, cfg.eigen_images) * eigen.steps
    return comparison("solves/s", {"fast": record}, bench, flops, checks)


def section_curvature(bench: Bench) -> dict:
    """hvp_fp32, hvp_bf16 (CUDA only: CPU autocast is slow and changes bits; a failure is
    recorded in variant_errors, the fp32 numbers kept) and top{k}_eigen."""
    body = {"comparisons": {"hvp_fp32": hvp_comparison(bench, bf16=False)}}
    if bench.device.type == "cuda":
        try:
            body["comparisons"]["hvp_bf16"] = hvp_comparison(bench, bf16=True)
        except Exception as err:  # noqa: BLE001 - autocast under torch.func fails many ways
            body["variant_errors"] = {"hvp_bf16": f"{type(err).__name__}: {first_line(err)}"}
    body["comparisons"][f"top{bench.cfg.eigen_k}_eigen"] = eigen_comparison(bench)
    return body
