"""Section connectivity: permutation alignment of two networks (landscape.align: weight
matching on the CPU, as the issue states it, and activation matching on the device) in
seconds, and one SGD step of a trained curve's bend (landscape.curve.train_step) in the
training section's terms (images/s, GFLOP/s, MFU) beside an ordinary supervised step of the
same network and batch (runs.engines.train.train_step): the curve's price over plain
training, not a speed-up (report.NOT_SPEEDUPS).

landscape is imported inside the functions: a section whose package does not import is
skipped.
"""

import copy

import torch

from runs.studies.bench.common import (
    Bench,
    Runner,
    comparison,
    forever,
    measure,
    new_model,
    synthetic_images,
    synthetic_info,
)
from runs.studies.bench.training import describe, fast_train, train_flops

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------
# 8. Connectivity: aligning two networks, and a trained curve's step


def matching_comparison(bench: Bench, method: str) -> dict:
    """align(a, b, method) of two inits of the bench's network, `match_repeats` timed calls
    after none untimed (the search has no warm-up to speak of; each call is seconds)."""
    from landscape.align import align
    cfg = bench.cfg
    device = CPU if method == "weights" else bench.device
    a, b = (new_model(bench, synthetic_info(), seed=s).to(device).eval() for s in (0, 1))
    images = None
    if method == "activations":
        from landscape.points import images as batches
        from runs.gpu_loader import eval_loader
        data = synthetic_images(cfg.match_images, seed=2)
        images = torch.cat(list(batches(eval_loader(data, device, cfg.eval_batch))))
    where = "CPU" if device.type == "cpu" else str(device)
    what = {"weights": f"landscape.align weight matching on the {where} (coordinate descent, "
                       f"scipy linear_sum_assignment)",
            "activations": f"landscape.align activation matching on {cfg.match_images} "
                           f"images ({where}), one assignment per layer"}[method]
    runner = Runner(what, 1, lambda: align(a, b, method=method, images=images, seed=0))
    record, (_, info) = measure(runner, 0, cfg.match_repeats, device)
    checks = {"seconds": record["seconds"] / record["steps"],
              "iterations": info["iterations"], "changed": info["changed"],
              "objective_before": info["objective_before"],
              "objective_after": info["objective_after"],
              "parameters": sum(p.numel() for p in a.parameters())}
    return comparison("matchings/s", {"fast": record}, bench, None, checks)


def curve_runner(bench: Bench, data) -> Runner:
    """landscape.curve's bend step: phi(t) at a random t between two inits (quadratic
    Bezier), forward and backward through the bend only, plain SGD with momentum."""
    from landscape.curve import CurveConfig, make_trainer, train_step
    from landscape.network import Subject
    cfg = CurveConfig(kind="bezier", batch_size=bench.cfg.train_batch, schedule="constant",
                      num_steps=10**9)
    a, b = (new_model(bench, data.info, seed=s) for s in (0, 1))
    bend = copy.deepcopy(a)
    tr = make_trainer(cfg, Subject(a.encoder, a.fc), Subject(b.encoder, b.fc),
                      Subject(bend.encoder, bend.fc), data, bench.device, bench.bf16)
    batches = forever(tr.loader.epoch)

    def step():
        x, y = next(batches)
        return train_step(tr, x, y)

    return Runner(describe("GPULoader", tr.bf16, bench.device, False,
                           "landscape.curve.train_step (bezier bend)"), cfg.batch_size, step)


def curve_comparison(bench: Bench) -> dict:
    """The bend's step against runs.train's step on the same images, eager both (the curve
    step has no compiled path): their ratio is the curve's cost per image."""
    cfg = bench.cfg
    data = synthetic_images(cfg.num_images, seed=0)
    plain = Bench(cfg, bench.device, bench.peak_tflops, False)
    paths = {}
    for name, runner in (("curve", curve_runner(bench, data)),
                         ("train_step", fast_train(plain, data, augment=False))):
        paths[name], _ = measure(runner, cfg.warmup, cfg.steps, bench.device)
    return comparison("images/s", paths, bench, train_flops(bench, data.info),
                      fast="curve", reference="train_step")


def section_connectivity(bench: Bench) -> dict:
    return {"comparisons": {"weight_matching": matching_comparison(bench, "weights"),
                            "activation_matching": matching_comparison(bench, "activations"),
                            "curve_step": curve_comparison(bench)}}
