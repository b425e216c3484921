"""The border of linear basins: `python -m landscape.border START... --children N`.

For each start point, train N supervised children that differ only in their data-order seed
(`data_seed` 0..N-1; same init, same hyper-parameters) through runs.train - ordinary runs in
the store, reused and never trained twice - then interpolate every pair of children
(theta(a) = (1 - a) theta_i + a theta_j on `--grid`, BN recalibrated by default) and store
the train/test loss and error curves and the barriers (landscape.barrier): error barrier
(Frankle et al. 2020), loss_barrier_mean and loss_barrier_linear (Entezari et al.), per pair
and as mean with a 95 % t-interval over pairs per start point (the start's instability).
--align weights|activations also measures every pair after permuting the second child's
hidden units onto the first's (landscape.align: Git Re-Basin weight matching, or activation
matching on the BN images): each curve and barrier metric M gains a twin M_aligned, so a
reader sees whether the children share one basin or one basin up to permutation.

Start points, given one by one (`random` = a fresh init from --seed, or any checkpoint
reference: a distilled student as RUN@STEP:encoder gets a fresh fc) or generated:
  --from-distill RUN           every saved step of a distillation run (RUN@STEP:encoder)
  --alpha-runs RUN [RUN ...]   distillation runs made at several --alpha (RUN@last:encoder)
  --alphas RUN 0,0.1,0.5,1     RUN's config distilled at each alpha (reused if in the store)
  --rewind-steps RUN k1,k2     steps of a supervised run; children rewind to RUN@k (weights,
                               optimiser, schedule) and train on with RUN's own config
One result file (analysis `border`), one cell per start: kill and re-run resumes; --shard
i/n gives each process whole start points (their children included).
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from landscape import geometry as G
from landscape.barrier import NAMES, barriers, mean_ci
from landscape.batchnorm import MODES, check_mode
from landscape.interpolate import auto_points_per_pass
from landscape.network import load_anchor
from landscape.points import SPLITS, Measures, PointEvaluator, eval_data
from runs.config import (
    HelpFormatter,
    add_config_args,
    arg,
    config_from_args,
    from_dict,
    parse_steps,
)
from runs.device import resolve_device, use_bf16
from runs.engines import engine
from runs.engines.parallel import add_parallel_arg
from runs.engines.train import TrainConfig, load_data, train
from runs.errors import UserError, cli, echo_command
from runs.launch import add_launcher_args, launch, launching
from runs.progress import Progress
from runs.store import Run, find_run, run_path

ANALYSIS = "border"
STATS = ("mean", "ci_low", "ci_high")
RANDOM = "random"
ALIGN_METHODS = ("weights", "activations")  # landscape.align.METHODS (checked by the tests)
ALIGN_SEED = 0  # weight matching's random layer order: fixed, so a re-run aligns alike
# the metrics that gain an `_aligned` twin under --align: the curves and the barriers
ALIGNED = ("loss", "error", *NAMES, "barrier_summary")


@dataclass(frozen=True)
class BorderConfig:
    children: int = arg(2, "SGD children per start point (differing only in data order)")
    grid: str = arg("0:1:25", "interpolation coordinates between two children; must hold 0 "
                              "and 1 (start:stop:num or a comma list)")
    bn_mode: str = arg("recalibrate", "BatchNorm statistics per point", choices=MODES)
    bn_samples: int = arg(2048, "fixed training images for BN recalibration (all of "
                                 "train when it has fewer); 0 = all")
    bn_batch_size: int = arg(256, "images per recalibration batch")
    train_samples: int = arg(0, "train images measured (seeded draw); 0 = all")
    test_samples: int = arg(0, "test images measured (seeded draw); 0 = all")
    sample_seed: int = arg(0, "seed of the measured and BN image draws")
    align: str = arg("", "also measure every pair after aligning the second child's hidden "
                         "units to the first's by permutation (landscape.align): weights = "
                         "weight matching, activations = activation matching on the BN "
                         "images; the result gains M_aligned beside each curve and barrier "
                         "metric M", choices=ALIGN_METHODS)


@dataclass(frozen=True)
class Start:
    label: str  # the `start` coordinate: the reference as given (a readable label once
    # `border` names it: LABEL:=REF's LABEL or runs.refs.ref_labels'), or "random"
    init: str = ""  # TrainConfig.init of the children
    rewind: str = ""  # TrainConfig.rewind of the children (supervised rewinding)
    base: dict = field(default=None, compare=False)  # rewind: the parent run's TrainConfig
    alpha: float = math.nan  # distillation alpha of the start, where it has one


def child_configs(start: Start, template: TrainConfig, count: int) -> list[TrainConfig]:
    """The N children of a start: its TrainConfig with data_seed 0..N-1."""
    if start.rewind:
        base = dataclasses.replace(from_dict(TrainConfig, start.base), init="", save_at=(),
                                   rewind=start.rewind)
    elif start.init:
        from runs.checkpoint import check_finite
        from runs.refs import load_model
        spec = check_finite(load_model(start.init).model, start.init).spec  # before training
        base = dataclasses.replace(template, init=start.init, rewind="", model=spec["name"],
                                   width=spec["width"], save_at=())
    else:
        base = dataclasses.replace(template, init="", rewind="", save_at=())
    return [dataclasses.replace(base, data_seed=i) for i in range(count)]


# ---------------------------------------------------------------------------- start points


def distill_starts(run_dir: str) -> list[Start]:
    """Every saved step of a distillation run, as encoders with a fresh fc."""
    run = find_run(run_dir)
    alpha = run.config().get("config", {}).get("alpha", math.nan)
    return [Start(f"{run_dir}@{step}:encoder", init=f"{run_dir}@{step}:encoder", alpha=alpha)
            for step in run.steps()]


def alpha_starts(run_dirs) -> list[Start]:
    """The last step of distillation runs made at different alphas."""
    starts = []
    for run_dir in run_dirs:
        alpha = find_run(run_dir).config().get("config", {}).get("alpha", math.nan)
        starts.append(Start(f"{run_dir}@last:encoder", init=f"{run_dir}@last:encoder",
                            alpha=alpha))
    return starts


def alpha_sweep_starts(run_dir: str, alphas: str, store: str) -> list[Start]:
    """A distillation run's config at each alpha (distilled now unless the store has it),
    then the students' last steps as start points: the basin border along alpha."""
    from runs.engines.distill import DistillConfig, distill
    record = find_run(run_dir).config()
    if record.get("kind") != "distill":
        raise UserError(f"--alphas {run_dir}: a {record.get('kind')} run; the template must be "
                        f"a distillation (runs.distill) run")
    try:
        values = [float(a) for a in alphas.split(",")]
    except ValueError:
        raise UserError(f"--alphas {alphas!r}: expected comma-separated numbers in [0, 1], "
                        f"e.g. 0,0.1,0.5,1") from None
    template = from_dict(DistillConfig, record["config"])
    runs = [distill(dataclasses.replace(template, alpha=a), store) for a in values]
    return alpha_starts([str(run.path) for run in runs])


def rewind_starts(run_dir: str, steps: str) -> list[Start]:
    """Steps k of a supervised run (iterations or 'Nep'), children rewinding to RUN@k."""
    run = find_run(run_dir)
    record = run.config()
    if record.get("kind") != "train":
        raise UserError(f"--rewind-steps {run_dir}: a {record.get('kind')} run; rewinding "
                        f"needs a supervised (runs.train) run")
    per_epoch = record.get("steps_per_epoch", 0)
    starts = []
    for item in steps.split(","):
        step = parse_steps(item, per_epoch, flag="--rewind-steps")
        if step not in run.steps():
            raise UserError(f"--rewind-steps: {run_dir} has no checkpoint at step {step}; "
                            f"saved: {', '.join(map(str, run.steps()))}")
        ref = f"{run_dir}@{step}"
        starts.append(Start(ref, rewind=ref, base=record["config"]))
    return starts


def given_starts(refs) -> list[Start]:
    """Start points as given; LABEL:=REF names the start, the children start from REF (so
    a label never changes which children runs are trained or reused)."""
    from runs.refs import split_label
    return [Start(RANDOM) if ref == RANDOM else Start(ref, init=split_label(ref)[1])
            for ref in refs]


def named_starts(starts: list[Start]) -> list[Start]:
    """The starts with readable, unique labels (the `start` coordinate): LABEL of
    LABEL:=REF, else derived from the run ("student s0 ep2", "supervised s0 @40"); the
    same starts get the same labels, so a re-run resumes."""
    from runs.refs import ref_labels
    names = ref_labels([s.label for s in starts], keep=(RANDOM,))
    return [dataclasses.replace(s, label=name) for s, name in zip(starts, names)]


def start_record(start: Start) -> dict:
    if start.label == RANDOM:
        return {"ref": RANDOM, "path": "", "step": 0, "sha256": ""}
    from runs.refs import ref_record
    return ref_record(start.init or start.rewind)


# ---------------------------------------------------------------------------- one start


def train_children(configs, data: tuple, store: str, device, precision,
                   compile_model=False) -> list[Run]:
    """Train (or reuse) every child on `data` (train, val, test); finished runs are skipped
    by runs.train, so a re-run never trains a child twice."""
    return [train(cfg, store, data, device, precision, compile_model) for cfg in configs]


def pretrain_children(configs: list, store: str, device, precision, compile_model,
                      parallel_runs: int) -> None:
    """With --parallel-runs other than 1 (and, under auto, more than one run fitting):
    every child still to measure trained now, runs of one shape together (the children of
    a start, and of starts at one step); 1 leaves each start's children to its turn."""
    if parallel_runs == 1 or not configs:
        return
    from runs.engines.parallel import parallel_count, train_many
    data = load_data(configs[0])
    k = parallel_count(parallel_runs, configs, data, device)
    if k > 1:
        train_many(configs, store, data, device, precision, compile_model, k)


def pair_curves(runs: list[Run], cfg: BorderConfig, data, alphas, device, bf16,
                per_pass: int, align_images=None) -> dict:
    """loss, error: (pairs, alphas, splits) along the path between every pair of children;
    with cfg.align also loss_aligned, error_aligned: the same pairs, the second child
    aligned to the first (align_images: (N, C, H, W) for activation matching)."""
    subjects = [load_anchor(f"{run.path}@last", True, False, data.num_classes).subject
                for run in runs]
    curves = {name: [] for name in (("loss", "error", "loss_aligned", "error_aligned")
                                    if cfg.align else ("loss", "error"))}
    for i, j in combinations(range(len(runs)), 2):
        loss, error = path_curve(subjects[i], subjects[j], cfg, data, alphas, device, bf16,
                                 per_pass)
        curves["loss"].append(loss)
        curves["error"].append(error)
        if cfg.align:
            moved, info = aligned_subject(runs[i], runs[j], cfg.align, align_images)
            if info.get("changed", 1) != 0:  # else every permutation is the identity: B
                loss, error = path_curve(subjects[i], moved, cfg, data, alphas, device,
                                         bf16, per_pass)
            curves["loss_aligned"].append(loss)
            curves["error_aligned"].append(error)
    return {name: np.array(values) for name, values in curves.items()}


def path_curve(start, end, cfg: BorderConfig, data, alphas, device, bf16,
               per_pass: int) -> tuple[list, list]:
    """loss, error: (alphas, splits) along the line from `start` to `end` (Subjects)."""
    path = G.line(start, end, guard=False)  # identical children: 0
    evaluator = PointEvaluator(start, path.to(device), cfg.bn_mode, data,
                               Measures(("supervised",)), None, device, bf16)
    points = []
    for first in range(0, len(alphas), per_pass):
        points += evaluator.evaluate(alphas[first:first + per_pass, None], per_pass > 1)
    return [p["loss"] for p in points], [p["error"] for p in points]


def aligned_subject(run_a: Run, run_b: Run, method: str, images=None) -> tuple:
    """(Subject, info): child B with its hidden units permuted onto child A's
    (landscape.align), the same function as B moved to where a straight line from A meets
    it unit for unit; info["changed"] = 0 when no permutation moved anything (B itself,
    whose path is measured already: children of one init often match unit for unit)."""
    from landscape.align import align
    from landscape.network import Subject
    from runs.refs import load_model
    a, b = (load_model(f"{run.path}@last").model.eval() for run in (run_a, run_b))
    moved, info = align(a, b, method=method, images=images, seed=ALIGN_SEED)
    return Subject(moved.encoder, moved.fc), info


def align_images(cfg: BorderConfig, train_split):
    """The images activation matching correlates on: the BN images' draw (--bn-samples,
    --sample-seed), normalised, on the CPU where the children are aligned; else None."""
    if cfg.align != "activations":
        return None
    import torch

    from landscape.points import images, take
    from runs.gpu_loader import eval_loader
    count = min(cfg.bn_samples, len(train_split.y))
    drawn = take(train_split, count, cfg.sample_seed + 1, "--bn-samples")
    return torch.cat(list(images(eval_loader(drawn, "cpu", cfg.bn_batch_size))))  # (N,C,H,W)


def start_epoch(record: dict) -> float:
    """The start checkpoint's step in epochs of the run that saved it (NaN: a file outside
    a run, or the random init)."""
    config = Path(record["path"]).parent.parent / "config.json" if record["path"] else None
    if record["step"] is None or config is None or not config.is_file():
        return math.nan
    per_epoch = json.loads(config.read_text()).get("steps_per_epoch", 0)
    return record["step"] / per_epoch if per_epoch else math.nan


def start_values(curves: dict, alphas, start: Start, record: dict) -> dict:
    """Everything a start's cell holds: curves, barriers per pair, their mean and CI (and
    their `_aligned` twins when the curves have them)."""
    values = dict(curves)
    for suffix in ("", "_aligned") if "loss_aligned" in curves else ("",):
        values.update(barrier_values(curves["loss" + suffix], curves["error" + suffix],
                                     alphas, suffix))
    step = record["step"]
    return {**values,
            "start_step": math.nan if step is None else step,
            "start_epoch": 0.0 if start.label == RANDOM else start_epoch(record),
            "start_alpha": start.alpha}


def barrier_values(loss, error, alphas, suffix: str = "") -> dict:
    """Barriers per pair ((pairs, splits) each) and barrier_summary (barrier, stat, split):
    mean and 95 % t-interval over pairs; names + suffix. loss, error: (pairs, alphas, splits)."""
    per_pair = barriers(np.moveaxis(loss, 1, -1), np.moveaxis(error, 1, -1), alphas)
    summary = np.empty((len(NAMES), len(STATS), len(SPLITS)))  # (barrier, stat, split)
    for b, name in enumerate(NAMES):
        ci = mean_ci(per_pair[name], axis=0)
        summary[b] = [ci[stat] for stat in STATS]
    return {name + suffix: value for name, value in
            {**per_pair, "barrier_summary": summary}.items()}


# ---------------------------------------------------------------------------- the scan


def layout(starts: list[Start], count: int, alphas, align: str = "") -> tuple[dict, dict]:
    """Coords and metrics; with `align` a twin M_aligned (same dims) of each ALIGNED M."""
    from runs.results import MetricSpec
    pairs = [f"{i}-{j}" for i, j in combinations(range(count), 2)]
    coords = {"start": [s.label for s in starts], "pair": pairs, "alpha": alphas,
              "split": list(SPLITS), "barrier": list(NAMES), "stat": list(STATS)}
    curve, per_pair = ("start", "pair", "alpha", "split"), ("start", "pair", "split")
    metrics = {
        "loss": MetricSpec(curve, "nats", "cross-entropy loss along the path"),
        "error": MetricSpec(curve, "fraction", "classification error along the path"),
        "error_barrier": MetricSpec(per_pair, "fraction", "error barrier (Frankle et al.)"),
        "loss_barrier_mean": MetricSpec(per_pair, "nats", "loss barrier over the endpoints' "
                                        "mean"),
        "loss_barrier_linear": MetricSpec(per_pair, "nats", "loss barrier over the chord "
                                          "(Entezari et al.)"),
        "barrier_summary": MetricSpec(("start", "barrier", "stat", "split"), "",
                                      "mean and 95 % t-interval over pairs"),
        "start_step": MetricSpec(("start",), "steps", "step of the start checkpoint"),
        "start_epoch": MetricSpec(("start",), "epochs", "the start step in epochs of its run"),
        "start_alpha": MetricSpec(("start",), "", "distillation alpha of the start"),
    }
    if align:
        for name in ALIGNED:
            spec = metrics[name]
            metrics[name + "_aligned"] = MetricSpec(
                spec.dims, spec.units, f"{spec.long_name}, the second child aligned to "
                f"the first ({align} matching)")
    return coords, metrics


def config_record(cfg: BorderConfig) -> dict:
    """BorderConfig as the result records it: `align` only when set, so results made
    before --align existed (and runs without it) keep their config and resume."""
    record = dataclasses.asdict(cfg)
    if not cfg.align:
        del record["align"]
    return record


def border(cfg: BorderConfig, starts: list[Start], template: TrainConfig, store: str,
           out: str, device="auto", precision="auto", points_per_pass: int = 0,
           batch_size: int = 512, shard=None, overwrite=False, stop_after: int = None,
           compile_model: bool = False, parallel_runs: int = 1) -> str:
    """Run (or resume) the scan over start points; returns the result path.

    template: the children's TrainConfig (num_steps set) for init and random starts;
    stop_after: start points to finish before returning early, as if killed (tests);
    parallel_runs: as --parallel-runs (0 = auto): the children of every start still to
    measure trained first, runs of one shape together (runs.engines.parallel).
    """
    from runs.results import create_result, parse_shard, shard_path
    check(cfg, starts)
    given, starts = [s.label for s in starts], named_starts(starts)
    if points_per_pass < 0:
        raise UserError(f"--points-per-pass {points_per_pass}: must be >= 1 (0 = auto)")
    if parallel_runs < 0:
        raise UserError(f"--parallel-runs {parallel_runs}: must be >= 1 (0 = auto)")
    if batch_size < 1:  # now, not after the children have trained
        raise UserError(f"--eval-batch-size {batch_size}: must be at least 1 image")
    alphas = G.parse_grid(cfg.grid)
    barriers(np.zeros(len(alphas)), np.zeros(len(alphas)), alphas)  # 0 and 1 on the grid
    device = resolve_device(device)
    bf16 = use_bf16(device, precision)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    children = {s.label: child_configs(s, template, cfg.children) for s in starts}
    if cfg.align:  # an architecture without alignment support: refused before training
        check_alignable(children)
    config = {"border": config_record(cfg), "train": dataclasses.asdict(template),
              "starts": [s.label for s in starts], "precision": "bf16" if bf16 else "fp32"}
    # the children's run folders relative to the store: a moved or re-spelled store resumes
    attrs = {"bn_mode": cfg.bn_mode, "children": {label: [
        os.path.relpath(run_path(store, "train", c, c.seed), store) for c in configs]
        for label, configs in children.items()}, **({"align": cfg.align} if cfg.align else {})}
    coords, metrics = layout(starts, cfg.children, alphas, cfg.align)
    path = shard_path(out, *shard) if shard else out
    per_pass = points_per_pass or auto_points_per_pass(device)
    records = [{**start_record(s), "ref": ref, "label": s.label}  # + paths, sha256
               for s, ref in zip(starts, given)]
    from runs.filehash import data_inputs  # data files by content: a resume checks them
    records += data_inputs(template.dataset, template.data_root)
    with create_result(path, ANALYSIS, coords, metrics, ("start",), config, records,
                       str(device), attrs, overwrite, shard) as result:
        todo = result.missing()
        pretrain_children([c for (index,) in todo for c in children[starts[index].label]],
                          store, device, precision, compile_model, parallel_runs)
        with Progress(len(todo), ANALYSIS, "start") as bar:
            for n, (index,) in enumerate(todo):
                if stop_after is not None and n >= stop_after:
                    break
                configs = children[starts[index].label]
                splits = load_data(configs[0])  # (train, val, test), shared by the children
                runs = train_children(configs, splits, store, device, precision,
                                      compile_model)
                data = measured_data(cfg, splits, device, batch_size)
                curves = pair_curves(runs, cfg, data, alphas, device, bf16, per_pass,
                                     align_images(cfg, splits[0]))
                result.write((index,), **start_values(curves, alphas, starts[index],
                                                      records[index]))
                bar.update(1)
    return path


def check(cfg: BorderConfig, starts: list[Start]) -> None:
    if cfg.children < 2:
        raise UserError(f"--children {cfg.children}: a barrier needs at least 2 children")
    if not starts:
        raise UserError("no start points: give START references (or 'random'), "
                        "--from-distill RUN, --alpha-runs RUN..., --alphas RUN a1,a2, or "
                        "--rewind-steps RUN k1,k2")
    labels = [s.label for s in starts]
    if len(set(labels)) != len(labels):
        raise UserError(f"a start point is given twice: {labels}")
    check_mode(cfg.bn_mode)
    if cfg.align and cfg.align not in ALIGN_METHODS:
        raise UserError(f"--align {cfg.align}: valid: {', '.join(ALIGN_METHODS)}")


def check_alignable(children: dict) -> None:
    """UserError (landscape.align's, listing the supported architectures) when a start's
    children are of an architecture alignment does not support."""
    from landscape.align import permutation_spec
    from runs.models import create_model, parse_options
    seen = set()
    for configs in children.values():
        cfg = configs[0]
        key = (cfg.model, cfg.width, tuple(cfg.model_options))
        if key not in seen:
            seen.add(key)
            permutation_spec(create_model(cfg.model, width=cfg.width,
                                          **parse_options(cfg.model, cfg.model_options)))


def measured_data(cfg: BorderConfig, splits: tuple, device, batch_size: int):
    """The children's own data: train (after their validation holdout) and test."""
    train_split, _, test = splits
    return eval_data(train_split, test, device, batch_size, cfg.train_samples,
                     cfg.test_samples, cfg.bn_samples, cfg.bn_batch_size, cfg.sample_seed,
                     with_bn=cfg.bn_mode == "recalibrate", batch_flag="--eval-batch-size")


def report(path: str) -> str:
    """Per start: test error barrier and loss barriers, mean [95 % CI] over pairs; an
    aligned result shows each start twice, as measured and after alignment."""
    from runs.results import open_result
    data = open_result(path, ANALYSIS)
    test = list(data.coords["split"]).index("test")
    align = data.attrs.get("align", "")
    rows = {"": ""} if not align else {"": " (plain)", "_aligned": f" ({align}-aligned)"}
    lines = ["| start | " + " | ".join(f"{n} (test)" for n in NAMES) + " |",
             "|---" * (len(NAMES) + 1) + "|"]
    for s, label in enumerate(data.coords["start"]):
        for suffix, note in rows.items():
            cells = []
            for b in range(len(NAMES)):
                mean, low, high = data.metrics["barrier_summary" + suffix][s, b, :, test]
                cells.append(f"{mean:.4f} [{low:.4f}, {high:.4f}]")
            lines.append(f"| {label}{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [f"{path}: {int(data.done.sum())} of {data.done.size} "
                              f"start points done"])


# ---------------------------------------------------------------------------- CLI


EPILOG = r"""examples:
  python -m landscape.border random --from-distill store/distill_x/seed_0 --children 5 \
      --dataset cifar10 --data-root ~/data --steps 30ep --store store --align weights
  python -m landscape.border --rewind-steps store/train_y/seed_0 0,1ep,2ep,5ep --children 5
  python -m landscape.border --alpha-runs store/distill_a/seed_0 store/distill_b/seed_0 \
      --dataset cifar10 --data-root ~/data --steps 30ep
  python -m landscape.border --alphas store/distill_a/seed_0 0,0.1,0.5,1 --children 3 \
      --dataset cifar10 --data-root ~/data"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m landscape.border", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("starts", nargs="*", metavar="START", help="start points: checkpoint "
                   "references or 'random'")
    p.add_argument("--from-distill", default="", metavar="RUN", help="every saved step of "
                   "this distillation run")
    p.add_argument("--alpha-runs", nargs="*", default=[], metavar="RUN",
                   help="distillation runs at several alphas (their last step)")
    p.add_argument("--alphas", nargs=2, default=None, metavar=("RUN", "ALPHAS"),
                   help="a distillation run as template and comma-separated alphas (e.g. "
                        "0,0.1,0.5,1): students distilled at each alpha (reused when in the "
                        "store), their last steps as start points")
    p.add_argument("--rewind-steps", nargs=2, default=None, metavar=("RUN", "STEPS"),
                   help="a supervised run and comma-separated steps (e.g. 0,1ep,2ep)")
    p.add_argument("--out", default="results/border.h5", help="HDF5 result file")
    p.add_argument("--shard", default=None, help="i/n: only this shard's start points")
    p.add_argument("--overwrite", action="store_true", help="replace a result of another "
                   "config")
    p.add_argument("--points-per-pass", type=int, default=0, help="path points evaluated "
                   "together under vmap; 1 = reference path; 0 = auto (8 CUDA, 1 CPU)")
    p.add_argument("--eval-batch-size", type=int, default=512, help="images per forward "
                   "pass when measuring")
    p.add_argument("--steps", default="160ep", help="children's training length: "
                   "iterations or epochs (e.g. 160ep)")
    engine.add_runtime_args(p)
    add_config_args(p, BorderConfig, group="border scan")
    add_config_args(p, TrainConfig, group="children's training (ignored by --rewind-steps)",
                    exclude=("init", "rewind", "data_seed", "num_steps", "save_at", "mask"))
    add_parallel_arg(p)
    add_launcher_args(p)
    return p


def collect_starts(args) -> list[Start]:
    starts = given_starts(args.starts)
    if args.from_distill:
        starts += distill_starts(args.from_distill)
    starts += alpha_starts(args.alpha_runs)
    if args.alphas:
        starts += alpha_sweep_starts(*args.alphas, args.store)
    if args.rewind_steps:
        starts += rewind_starts(*args.rewind_steps)
    return starts


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(G.join_negative(argv))
    echo_command("landscape.border", argv)
    if launching(args):
        return launch(main, argv, args, args.out)
    cfg = config_from_args(BorderConfig, args)
    starts = collect_starts(args)
    template = config_from_args(TrainConfig, args, num_steps=0, save_at=())
    if any(not s.rewind for s in starts):  # rewinding children keep their parent's length
        # '--steps 2ep' resolved exactly as runs.train resolves it (the engines' epoch length)
        template, _ = engine.config_and_data(template, args.steps, (), load_data)
    path = border(cfg, starts, template, args.store, args.out, args.device, args.precision,
                  args.points_per_pass, args.eval_batch_size, args.shard, args.overwrite,
                  compile_model=args.compile, parallel_runs=args.parallel_runs)
    print(report(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
