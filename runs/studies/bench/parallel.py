"""Section parallel: K runs of one shape trained together (runs.engines.parallel.Stack:
stacked parameters under torch.func vmap, one SGD) against the same K runs in turn in the
same process (K models, each its own runs.engines.train.train_step: forward, cross-entropy,
backward, SGD step), for each network of BenchConfig.parallel_models and each K of
BenchConfig.parallel_ks.

Both paths train the same runs: run k starts from init seed k and draws its own batches
(a GPULoader over the synthetic CIFAR-sized images with data seed k, augmented as runs.train
does), so loading costs alike. The check `weights_match`: the same K runs trained both
ways in float64 end with equal weights and BN buffers (to 1e-4); `max_abs_diff_timed` is
how far the timed (fp32 or bf16) runs drifted apart. A step of a path advances all K runs
by one step; runs/hour = 3600 / (seconds per step x run_steps) x K.

The comparison `NAME_kK` holds both paths (images/s, seconds per step, runs_per_hour,
GFLOP/s, MFU) and the ratio together / sequential. `defaults` says which K the toolkit's
--parallel-runs default trains on this device (auto: 1 on the CPU, where one run already
uses every core, so the CPU default is the sequential path itself) and judges that one.

runs.engines.parallel is imported inside the functions: a section whose package does not
import is skipped.
"""

import dataclasses
import statistics
import sys

import torch

from runs.datasets.base import ImageData
from runs.engines import engine
from runs.gpu_loader import Augment, GPULoader
from runs.studies.bench.common import (
    Bench,
    Runner,
    comparison,
    forever,
    new_model,
    synthetic_images,
    warm_up,
)
from runs.studies.bench.tickets import alternate
from runs.studies.bench.training import train_config, train_flops

TOLERANCE = 1e-4  # largest |stacked - sequential| over weights and BN buffers that matches
FULL_KS = (1, 2, 4, 8, 16)  # the Ks the issue asks for; quick sizes may stop earlier


def parallel_bench(bench: Bench, name: str) -> Bench:
    """The sizes of the parallel section for network `name` (its width and batch)."""
    cfg = bench.cfg
    return dataclasses.replace(bench, cfg=dataclasses.replace(
        cfg, model=name, model_options=(), width=cfg.parallel_width,
        train_batch=cfg.parallel_batch))


# ---------------------------------------------------------------------------------------
# The two paths: K runs as one Stack, and K runs in turn


def run_loaders(data: ImageData, batch: int, device, k: int) -> list[GPULoader]:
    """Run i's batches: shuffled and augmented (flip, 4-pixel pad-crop) with data seed i,
    as runs.train draws them; one device copy of the images for all K."""
    x, y = data.x.to(device), data.y.to(device)  # (N, 3, 32, 32) uint8, (N,)
    augment = Augment(flip=True, crop_padding=4)
    return [GPULoader(x, y, data.info.mean, data.info.std, batch, device, shuffle=True,
                      drop_last=True, augment=augment, data_seed=i) for i in range(k)]


def run_models(bench: Bench, data: ImageData, k: int, dtype=torch.float32) -> list:
    """Run i's network from init seed i, on the device as runs.train places it (no
    torch.compile: the Stack runs eager, so its reference does too)."""
    return [engine.prepare(new_model(bench, data.info, seed=i).to(dtype), bench.device)
            for i in range(k)]


def together(bench: Bench, data: ImageData, k: int, bf16: bool,
             dtype=torch.float32) -> Runner:
    """One Stack step of all K runs: each run's batch, stacked (K, B, C, H, W). dtype:
    of the weights and images (float64: the equivalence check)."""
    from runs.engines.parallel import Stack
    cfg = train_config(bench)
    stack = Stack(run_models(bench, data, k, dtype), cfg.lr, cfg.momentum, cfg.weight_decay,
                  bf16=bf16)
    streams = [forever(loader.epoch) for loader in run_loaders(data, cfg.batch_size,
                                                               bench.device, k)]

    def step():
        batches = [next(stream) for stream in streams]
        xs = torch.stack([x.to(dtype) for x, _ in batches])  # (K, B, C, H, W)
        ys = torch.stack([y for _, y in batches])  # (K, B)
        return stack.step(xs, ys)  # (K,)

    what = (f"runs.engines.parallel.Stack: {k} runs stacked under torch.func vmap, one "
            f"SGD; {k} GPULoaders; {'bf16 autocast' if bf16 else 'fp32'}, eager")
    return Runner(what, k * cfg.batch_size, step, session=stack)


def sequential(bench: Bench, data: ImageData, k: int, bf16: bool,
               dtype=torch.float32) -> Runner:
    """K runs.engines.train.train_step calls, one per run, each on its own batch."""
    from runs.engines.train import Session, make_optimizer, train_step
    cfg, device = train_config(bench), bench.device
    sessions = []
    for model, loader in zip(run_models(bench, data, k, dtype),
                             run_loaders(data, cfg.batch_size, device, k)):
        optimizer, scheduler = make_optimizer(cfg, model, device)
        sessions.append(Session(cfg, None, model, model, optimizer, scheduler, None, loader,
                                {}, device, bf16))
    streams = [forever(s.loader.epoch) for s in sessions]

    def step():
        losses = []
        for s, stream in zip(sessions, streams):
            x, y = next(stream)
            losses.append(train_step(s, x.to(dtype), y))
        return torch.stack(losses)  # (K,)

    sgd = "fused SGD" if device.type == "cuda" else "SGD"
    what = (f"{k} runs in turn: runs.engines.train.train_step each ({sgd}, "
            f"{'bf16 autocast' if bf16 else 'fp32'}, eager); {k} GPULoaders")
    return Runner(what, k * cfg.batch_size, step, session=sessions)


# ---------------------------------------------------------------------------------------
# Equivalence: the stacked runs are the sequential ones


def max_difference(stack, sessions: list) -> float:
    """Largest |stacked - sequential| over every run's weights and buffers (after
    write_back)."""
    stack.write_back()
    worst = 0.0
    for stacked, s in zip(stack.models, sessions):
        mine = dict([*stacked.named_parameters(), *stacked.named_buffers()])
        for name, t in [*s.model.named_parameters(), *s.model.named_buffers()]:
            diff = (mine[name].detach().double() - t.detach().double()).abs().max()
            worst = max(worst, diff.item())
    return worst


def equivalence(bench: Bench, data: ImageData, k: int, runners: dict) -> dict:
    """weights_match: the same K runs, fresh, parallel_check_steps steps each way in
    float64, end with equal weights and BN buffers (to 1e-4). float64, not the timed runs:
    a step of a narrow network can be ill-conditioned (a BN channel of near-zero batch
    variance amplifies fp32 rounding, which the stacked grouped convolutions and the plain
    ones round differently); max_abs_diff_timed is the timed runs' drift, for the record."""
    steps = bench.cfg.parallel_check_steps
    exact = {"together": together(bench, data, k, False, torch.float64),
             "sequential": sequential(bench, data, k, False, torch.float64)}
    for runner in exact.values():
        for _ in range(steps):
            runner.step()
    diff = max_difference(exact["together"].session, exact["sequential"].session)
    drift = max_difference(runners["together"].session, runners["sequential"].session)
    return {"weights_match": diff <= TOLERANCE, "max_abs_diff": diff, "tolerance": TOLERANCE,
            "checked_steps": steps, "checked_in": "float64", "max_abs_diff_timed": drift}


# ---------------------------------------------------------------------------------------
# The section


def k_comparison(bench: Bench, data: ImageData, k: int, flops: float) -> dict:
    """Both paths at K: warmed up, then parallel_rounds rounds of parallel_steps steps each,
    alternating (A B B A: a drift in machine load hits both alike), the median round
    timed; their runs/hour, the ratio together / sequential and the check."""
    cfg = bench.cfg
    runners = {name: build(bench, data, k, bench.bf16)
               for name, build in (("together", together), ("sequential", sequential))}
    for runner in runners.values():
        warm_up(runner, cfg.warmup)
    rounds = alternate(runners, cfg.parallel_rounds, cfg.parallel_steps, bench.device)
    paths = {}
    for name, times in rounds.items():
        seconds = statistics.median(times)
        paths[name] = {"what": runners[name].what, "k": k, "steps": cfg.parallel_steps,
                       "items": cfg.parallel_steps * runners[name].items, "seconds": seconds,
                       "round_seconds": times, "runs_per_hour": runs_per_hour(
                           seconds / cfg.parallel_steps, cfg.run_steps, k)}
    checks = equivalence(bench, data, k, runners)
    comp = comparison("images/s", paths, bench, flops, checks, fast="together",
                      reference="sequential")
    return {**comp, "model": cfg.model, "k": k}


def runs_per_hour(seconds_per_step: float, run_steps: int, k: int) -> float:
    """Runs finished per hour when one step (of `seconds_per_step`) advances k runs."""
    return 3600.0 / (seconds_per_step * run_steps) * k


def default_k(bench: Bench, data: ImageData) -> int:
    """K of --parallel-runs' default (0 = auto) for this network on this device."""
    from runs.engines.parallel import auto_parallel_runs
    return auto_parallel_runs(train_config(bench), (data,), bench.device)


def judge_default(k: int, comps: dict, name: str) -> dict:
    """The default K's ratio: 1.0 at K = 1 (no Stack: every run trains in turn, the
    reference itself); else the measured together / sequential at that K (None: that K
    not measured). Each comparison of `name` is told the path the default takes there
    (report's CPU rule reads it)."""
    path = "sequential" if k == 1 else "together"
    for comp in comps.values():
        if comp["model"] == name:
            comp["default_path"] = path
    measured = comps.get(f"{name}_k{k}")
    ratio = 1.0 if k == 1 else (measured["ratio"] if measured else None)
    return {"parallel_runs": k, "path": path, "ratio": ratio,
            "at_least_reference": None if ratio is None else ratio >= 1.0}


def section_parallel(bench: Bench) -> dict:
    cfg = bench.cfg
    data = synthetic_images(cfg.num_images, seed=0)
    comps, defaults = {}, {}
    for name in cfg.parallel_models:
        nb = parallel_bench(bench, name)
        flops = train_flops(nb, data.info)
        for k in cfg.parallel_ks:
            print(f"  {name} K={k} ...", file=sys.stderr, flush=True)
            comps[f"{name}_k{k}"] = k_comparison(nb, data, k, flops)
        defaults[name] = judge_default(default_k(nb, data), comps, name)
    return {"comparisons": comps, "run_steps": cfg.run_steps,
            "run": f"one run = {cfg.run_steps:,} steps of {cfg.parallel_batch} images (a "
                   f"border child of the paper: 31,360 = 160 epochs x 196 steps of 256); "
                   f"runs/hour = 3600 / (seconds per step x run_steps) x K",
            "ks": list(cfg.parallel_ks), "ks_note": ks_note(cfg.parallel_ks),
            "defaults": defaults,
            "all_weights_match": all(c["checks"]["weights_match"] for c in comps.values())}


def ks_note(ks: tuple) -> str | None:
    """Which of the issue's Ks a run left out (quick sizes on a CPU may stop early)."""
    left = [k for k in FULL_KS if k not in ks]
    return f"not measured: K = {', '.join(map(str, left))}" if left else None
