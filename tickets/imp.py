"""Iterative magnitude pruning with rewinding: `python -m tickets.imp --levels L --rewind R`.

Level 0 trains the dense network: from random init (`--rewind init@K`) or from a checkpoint
(`--rewind RUN@last:encoder`, a distilled student's encoder under a fresh fc, at K = 0),
keeping a checkpoint at step K. Level l >= 1 prunes the prunable weights that level l - 1
kept, globally by magnitude of level l - 1's final weights, down to
`tickets.prune.kept_count(total, rate, l)` (density 0.8^L rounded half-up), then restores
the dense run's training state at step K (weights, BatchNorm buffers, lr schedule, data
position, and the optimiser's momentum unless --rewind-optimizer reset) under the new mask
and trains to the same final step.

Every level is an ordinary `runs.train` run in the store: re-running skips finished levels
and resumes an unfinished one. Masks are files in STORE/imp_<hash>/seed_<s>/<chain>/ (chains
ticket, random_layerwise, random), the hash covering what decides them (training config,
rewind point, rate, scope, output layer, --rewind-optimizer).

Controls (each a named option, recorded in the result's config; the defaults follow
open_lth, facebookresearch/open_lth, except --rewind-optimizer, which follows the paper's code):
  --rewind-optimizer restore|reset   what rewinding does to SGD's momentum. restore (default,
           the paper's code): the dense run's optimiser state at K; reset (open_lth): a fresh
           optimiser, momentum 0 at K. Weights, BN buffers, lr schedule and data position are
           rewound either way.
  --prune-output auto|yes|no   whether the output layer (fc) is prunable. auto: with
           --prune-scope weights, open_lth's per-model choice (VGG and MLP keep the fc dense,
           ResNets and the convnet prune it); with --prune-scope all (the paper's code), pruned.

Baselines (`--baselines`), branches of the same sweep over the same levels:
  random   random masks rewound to K like the ticket. --random-baseline layerwise (default,
           open_lth's randomly_prune): each layer's ticket mask permuted by one fixed random
           permutation per layer (seeded from the seed and the layer's name), so the per-layer
           counts are the ticket's at every level and the masks nest; global: a uniformly
           random mask over all prunable weights with the ticket's total count per level
           (nested, seeded from the seed and level).
  reinit   the ticket's mask of level l on a fresh random init (seed + --reinit-seed-offset).
           --reinit-from k (default, open_lth's randomly_reinitialize): trained from step K to
           the final step T (T - K steps, the ticket's lr schedule and data positions); 0:
           from step 0 to T (Frankle & Carbin's random reinitialisation).
Level 0 is the dense run, shared by all branches.

ResNet20: the paper's IMP runs used --lr 0.05 (ResNet18 and VGG: 0.1, the default).

`--instability`: each cell also trains a sibling (same start point and mask, data seed + 1)
and stores the error and loss barriers between the two on train and test
(landscape.border's `pair_curves`, BatchNorm recalibrated).

`--curvature`: each cell also stores the top eigenvalue and the Hutchinson trace (with its
standard error) of the supervised loss Hessian, over the surviving weights only (the
level's mask over the prunable tensors; other parameters unmasked), on a fixed seeded subset
of --curvature-samples train images, BatchNorm in eval mode with the checkpoint's
statistics (tickets.curvature): for the level's trained network and for its rewind point
(coord curvature_at: trained, rewind). Expensive: per network up to 60 Lanczos steps and
10 to 1000 Hutchinson probes, one Hessian-vector product over all the images each.

Results: HDF5 (analysis `imp`), coords branch x level x seed; a killed sweep resumes per cell
and `--shard i/n` takes the seeds with index % n == i.
"""

import argparse
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runs.checkpoint import read_checkpoint
from runs.config import (
    HelpFormatter,
    add_config_args,
    arg,
    config_from_args,
    non_default,
    parse_steps,
    seed_arg,
)
from runs.device import resolve_device, use_bf16
from runs.engines import engine
from runs.engines.parallel import add_parallel_arg, parallel_count
from runs.engines.train import REWIND_OPTIMIZER, TrainConfig, load_data, train
from runs.errors import UserError, cli, echo_command, unknown
from runs.launch import add_launcher_args, launch, launching
from runs.models import create_model
from runs.progress import Progress
from runs.registry import Registry
from runs.store import Run, atomic_write_text, check_store, run_path
from runs.store import identity as store_identity
from tickets.mask import (
    PRUNE_OUTPUT,
    SCOPES,
    dense_mask,
    num_kept,
    prunable_names,
    prunes_output,
    read_mask,
    save_mask,
)
from tickets.prune import (
    check_levels,
    check_rate,
    derived_seed,
    kept_count,
    layerwise_shuffle,
    magnitude_prune,
    random_prune,
)

# --random-baseline -> the chain (mask folder) the random branch trains under. "random" is
# the folder name of the global masks that sweeps before the option wrote.
RANDOM_CHAINS = {"layerwise": "random_layerwise", "global": "random"}
REINIT_FROM = ("k", "0")  # --reinit-from: the rewind step K, or step 0


@dataclass(frozen=True)
class ImpConfig:
    rewind: str = arg("init@0", "rewind point: init@K = step K (iterations or epochs, e.g. "
                                "0, 1ep, 2ep) of the dense run from random init; or a "
                                "checkpoint reference the dense run starts from, rewound to "
                                "at K = 0 (e.g. store/distill_x/seed_0@last:encoder)")
    levels: int = arg(10, "pruning levels after the dense level 0")
    rate: float = arg(0.2, "fraction of the prunable weights pruned per level: level L keeps "
                           "floor(N * (1 - rate)^L + 0.5) of the N prunable weights")
    prune_scope: str = arg("weights", "prunable parameters: conv and linear weights, or all "
                                      "parameters (as the paper's code did)", choices=SCOPES)
    prune_output: str = arg("auto", "prune the output layer (fc)? auto: under --prune-scope "
                                    "weights open_lth's per-model choice (dense for VGG and "
                                    "MLP, pruned for ResNets and the convnet); under all (the "
                                    "paper's code) pruned", choices=PRUNE_OUTPUT)
    rewind_optimizer: str = arg("restore", "rewinding to K restores the dense run's optimiser "
                                           "state (momentum; the paper's code) or resets it "
                                           "(fresh SGD, momentum 0: open_lth)",
                                choices=REWIND_OPTIMIZER)
    baselines: tuple[str, ...] = arg((), "control branches: random (random masks, rewound "
                                         "like the ticket: --random-baseline), reinit (the "
                                         "ticket's masks on a fresh init: --reinit-from)")
    random_baseline: str = arg("layerwise", "random branch: layerwise = the ticket's mask "
                                            "shuffled within each layer (its per-layer counts; "
                                            "open_lth); global = uniform over all prunable "
                                            "weights (the total count only)",
                               choices=tuple(RANDOM_CHAINS))
    reinit_from: str = arg("k", "reinit branch: k = train from the rewind step K to the end "
                                "(T - K steps, the ticket's schedule position; open_lth); 0 = "
                                "from step 0 (T steps)", choices=REINIT_FROM)
    instability: bool = arg(False, "also train a second child per cell (another data seed) "
                                   "and store the barriers between the two (landscape.border:"
                                   " BN recalibrated on 2048 train images)")
    barrier_grid: str = arg("0:1:25", "instability: interpolation coordinates between the "
                                      "children, holding 0 and 1")
    reinit_seed_offset: int = arg(1000, "reinit branch: init seed = seed + this")
    child_data_seed_offset: int = arg(1, "instability: the second child's data seed is "
                                         "--data-seed + this")
    curvature: bool = arg(False, "also store the top Hessian eigenvalue and the Hutchinson "
                                 "trace of the supervised train loss over the surviving "
                                 "weights, for each level's trained network and its rewind "
                                 "point (expensive: up to ~1000 Hessian-vector products per "
                                 "network on --curvature-samples images)")
    curvature_samples: int = arg(256, "curvature: train images (a fixed seeded subset; 0 = "
                                      "all) the loss is taken over")
    curvature_tol: float = arg(0.05, "curvature: Hutchinson stops at this relative standard "
                                     "error of the trace")


# TrainConfig fields the sweep sets per level (steps, checkpoints, start point, mask, seed):
# not options of the CLI nor of `tickets.run_imp` (rewind_optimizer is ImpConfig's).
SET_PER_LEVEL = ("num_steps", "save_at", "init", "rewind", "mask", "seed", "start_step",
                 "rewind_optimizer")

# Fields that do not change any mask or any ticket run: left out of the mask folder's hash,
# so extending --levels or adding a baseline reuses every finished level. (The random
# baselines keep their masks in separate chains, RANDOM_CHAINS; reinit runs differ by their
# TrainConfig.) prune_output enters the hash resolved, as keep_output_dense (see identity).
NOT_IN_HASH = ("rewind", "levels", "baselines", "instability", "barrier_grid",
               "reinit_seed_offset", "child_data_seed_offset", "random_baseline",
               "reinit_from", "prune_output", "curvature", "curvature_samples",
               "curvature_tol")

# The ImpConfig fields of --curvature: in a result's config only when it is on, so results
# written without it (before it existed, too) keep their config and resume.
CURVATURE_FIELDS = ("curvature", "curvature_samples", "curvature_tol")
CURVATURE_AT = ("trained", "rewind")  # coord curvature_at: the cell's two networks


@dataclass(frozen=True)
class Plan:
    """A sweep resolved against its data: what every level of every seed trains."""
    imp: ImpConfig
    train: TrainConfig  # the dense run's config, seed 0; steps resolved; save_at holds K
    store: Path
    reference: str  # checkpoint the dense run starts from; "" = random init
    rewind_step: int  # K: where levels >= 1 restart (0 for a reference)
    shapes: dict  # prunable parameter name -> shape, in parameter order
    num_train: int = 0  # training images after the validation holdout
    output_pruned: bool = True  # whether the fc is prunable (--prune-output resolved)

    @property
    def total(self) -> int:
        return int(sum(np.prod(shape, dtype=np.int64) for shape in self.shapes.values()))

    @property
    def branches(self) -> list[str]:
        return ["ticket", *self.imp.baselines]


def identity(plan: Plan, by_content: bool = True) -> dict:
    """What decides the masks (the folder hash covers exactly this).

    The output layer enters resolved, under the key sweeps before --prune-output used
    (keep_output_dense: true when the fc stays dense), so their folders stay valid. A
    reference to rewind to enters by what its checkpoint holds (runs.refs.content_ref), not
    by its path's spelling, unless `by_content` is False (sweeps made before did)."""
    from runs.refs import content_ref
    imp = {k: v for k, v in non_default(plan.imp, exclude=()).items() if k not in NOT_IN_HASH}
    if not plan.output_pruned:
        imp["keep_output_dense"] = True
    train_cfg = dataclasses.replace(plan.train, save_at=())
    reference = content_ref(plan.reference) if plan.reference and by_content else \
        plan.reference
    # the store's identity: the fields issue #18 added count against the values sweeps
    # made before them used, so a sweep under today's recipe never reopens an old one
    return {"imp": imp, "train": store_identity("train", train_cfg),
            "rewind": reference or f"init@{plan.rewind_step}"}


def _folder(plan: Plan, record: dict) -> Path:
    text = json.dumps(record, sort_keys=True)
    return plan.store / f"imp_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def imp_dir(plan: Plan) -> Path:
    """STORE/imp_<hash>: the sweep's masks. A sweep rewinding to a reference made before
    identities by content keeps its folder (named by the reference's spelling) if only
    that one exists."""
    path = _folder(plan, identity(plan))
    if plan.reference and not path.exists():
        old = _folder(plan, identity(plan, by_content=False))
        if old.is_dir():
            return old
    return path


# ---------------------------------------------------------------------------- level configs


def dense_config(plan: Plan, seed: int) -> TrainConfig:
    """Level 0: the dense run, from random init or from the reference's weights."""
    return dataclasses.replace(plan.train, seed=seed, init=plan.reference)


def rewind_ref(plan: Plan, seed: int) -> str:
    return f"{run_path(plan.store, 'train', dense_config(plan, seed), seed)}@{plan.rewind_step}"


def rewound(plan: Plan, seed: int, mask: Path) -> TrainConfig:
    """The dense run's state at step K under `mask` (its optimiser state restored or reset,
    --rewind-optimizer), trained to the final step."""
    return dataclasses.replace(plan.train, seed=seed, rewind=rewind_ref(plan, seed),
                               rewind_optimizer=plan.imp.rewind_optimizer, mask=str(mask),
                               save_at=())


def reinitialised(plan: Plan, seed: int, mask: Path) -> TrainConfig:
    """A fresh init (another seed) under `mask`, trained to the final step from step K (its
    lr schedule and data position there, a fresh optimiser) or from step 0: --reinit-from."""
    start = plan.rewind_step if plan.imp.reinit_from == "k" else 0
    return dataclasses.replace(plan.train, seed=seed + plan.imp.reinit_seed_offset,
                               mask=str(mask), save_at=(), start_step=start)


@dataclass(frozen=True)
class Branch:
    chain: str  # the nested mask sequence it trains under: "ticket" or "random" (see chain)
    config: Callable[[Plan, int, Path], TrainConfig]  # (plan, seed, mask file) -> run config


BRANCHES = Registry("branch")
BRANCHES.register(Branch("ticket", rewound), name="ticket")
BRANCHES.register(Branch("random", rewound), name="random")
BRANCHES.register(Branch("ticket", reinitialised), name="reinit")


def chain_of(plan: Plan, branch: str) -> str:
    """The mask folder a branch trains under: "ticket", or the random chain that
    --random-baseline names (RANDOM_CHAINS)."""
    chain = BRANCHES.get(branch).chain
    return RANDOM_CHAINS[plan.imp.random_baseline] if chain == "random" else chain


def level_config(plan: Plan, seed: int, branch: str, level: int, mask: Path = None):
    if level == 0:
        return dense_config(plan, seed)
    return BRANCHES.get(branch).config(plan, seed, mask)


def child_config(plan: Plan, cfg: TrainConfig, level: int) -> TrainConfig:
    """The second SGD child of a cell: same start and mask, another data order."""
    if level == 0:  # the dense run passes step K on its way; its sibling restarts there
        cfg = dataclasses.replace(cfg, init="", rewind=rewind_ref(plan, cfg.seed), save_at=(),
                                  rewind_optimizer=plan.imp.rewind_optimizer)
    return dataclasses.replace(cfg, data_seed=cfg.data_seed + plan.imp.child_data_seed_offset)


# ---------------------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """A plan plus what running it needs: the data (loaded once) and the runtime flags."""
    plan: Plan
    data: tuple  # (train, val or None, test), as runs.engines.train.load_data returns
    device: str = "auto"
    precision: str = "auto"
    compile_model: bool = False
    parallel_runs: int = 1  # runs of one level trained together (runs.engines.parallel)

    _measured: object = None  # landscape's evaluation data, built on first use
    _curvature: object = None  # --curvature's fixed train batches, built on first use

    def train(self, cfg: TrainConfig) -> Run:
        """Train one run, or return it at once when the store holds it finished."""
        return train(cfg, self.plan.store, self.data, self.device, self.precision,
                     self.compile_model)

    def measured(self):
        """Fixed train (after the validation holdout) and test images, BN images: what
        --instability measures children on (landscape.border.measured_data)."""
        if self._measured is None:
            from landscape.border import measured_data
            self._measured = measured_data(border_config(self.plan), self.data,
                                           resolve_device(self.device), batch_size=512)
        return self._measured

    def curvature_batches(self) -> list:
        """--curvature's images: --curvature-samples train images (after the validation
        holdout), drawn once with a fixed seed, on the device (tickets.curvature)."""
        if self._curvature is None:
            from tickets.curvature import curvature_batches
            self._curvature = curvature_batches(self.data[0], self.plan.imp.curvature_samples,
                                                resolve_device(self.device))
        return self._curvature


def mask_file(plan: Plan, seed: int, chain: str, level: int) -> Path:
    return imp_dir(plan) / f"seed_{seed}" / chain / f"level_{level:03d}.pt"


def ensure_mask(sweep: Sweep, seed: int, chain: str, level: int) -> Path:
    """The mask file of `chain` at `level` >= 1; made now (parents trained first) if missing."""
    plan = sweep.plan
    path = mask_file(plan, seed, chain, level)
    if path.exists():
        return path
    if chain == "random_layerwise":  # the ticket's mask, shuffled within each layer
        ticket = read_mask(ensure_mask(sweep, seed, "ticket", level))
        return save_mask(path, layerwise_shuffle(ticket, seed))
    if level > 1:
        parent = read_mask(ensure_mask(sweep, seed, chain, level - 1))
    else:
        parent = {name: torch.ones(shape, dtype=torch.bool) for name, shape in
                  plan.shapes.items()}
    num_keep = kept_count(plan.total, plan.imp.rate, level)
    if chain == "random":
        mask = random_prune(parent, num_keep, derived_seed("random", seed, level))
    else:
        weights = final_weights(sweep, level_run(sweep, seed, "ticket", level - 1))
        mask = magnitude_prune(weights, parent, num_keep)
    return save_mask(path, mask)


def final_weights(sweep: Sweep, run: Run) -> dict[str, torch.Tensor]:
    """The prunable weights at the run's final step, on the sweep's device."""
    state = read_checkpoint(run.ckpt_path(sweep.plan.train.num_steps))["model"]["state"]
    device = resolve_device(sweep.device)
    return {name: state[name].to(device) for name in sweep.plan.shapes}


def level_run(sweep: Sweep, seed: int, branch: str, level: int) -> Run:
    """The finished run of one cell (trained now unless the store holds it done)."""
    return sweep.train(cell_config(sweep, seed, branch, level))


def cell_config(sweep: Sweep, seed: int, branch: str, level: int) -> TrainConfig:
    mask = ensure_mask(sweep, seed, chain_of(sweep.plan, branch), level) if level else None
    return level_config(sweep.plan, seed, branch, level, mask)


def cell_values(sweep: Sweep, seed: int, branch: str, level: int) -> dict:
    """Every metric of one (branch, level, seed) cell; trains what it needs."""
    plan = sweep.plan
    cfg = cell_config(sweep, seed, branch, level)
    run = sweep.train(cfg)
    summary = run.summary()
    kept = num_kept(read_mask(cfg.mask)) if cfg.mask else plan.total
    values = {"remaining_weights": kept, "density": kept / plan.total,
              **{key: nan_if_none(summary.get(key)) for key in SUMMARY_KEYS}}
    if plan.imp.instability:
        values.update(instability(sweep, cfg, level))
    if plan.imp.curvature:
        values.update(curvature(sweep, run, cfg, level))
    return values


def curvature(sweep: Sweep, run: Run, cfg: TrainConfig, level: int) -> dict:
    """--curvature of one cell: {hessian_top, hessian_trace, hessian_trace_se: (2,)} over
    curvature_at, the run's final network and its rewind point, both under the level's
    mask (tickets.curvature.ticket_curvature)."""
    from runs.refs import load_model
    from tickets.curvature import METRICS, ticket_curvature
    mask = read_mask(cfg.mask) if cfg.mask else {}  # level 0: dense
    device = resolve_device(sweep.device)
    rows = []
    for path in (run.ckpt_path(sweep.plan.train.num_steps), rewind_point(sweep.plan, run,
                                                                         level)):
        model = load_model(str(path)).model.to(device)
        rows.append(ticket_curvature(model, mask, sweep.curvature_batches(),
                                     sweep.plan.imp.curvature_tol, str(path)))
    return {name: np.array([row[name] for row in rows]) for name in METRICS}


def rewind_point(plan: Plan, run: Run, level: int) -> Path:
    """The checkpoint a cell was rewound to, with its mask applied: the run's starting
    state (step K of the dense run under the mask; a reinit's fresh init at its start
    step). Level 0's is the dense run's step K, where the levels after it restart."""
    from runs.refs import init_step
    return run.ckpt_path(plan.rewind_step if level == 0 else init_step(run))


def instability(sweep: Sweep, cfg: TrainConfig, level: int) -> dict:
    """Barriers between the cell's run and its sibling (same start and mask, another data
    order), measured by landscape.border's public functions: {name: (split,)}."""
    from landscape.barrier import NAMES, barriers
    from landscape.border import pair_curves
    sibling = sweep.train(child_config(sweep.plan, cfg, level))
    first = Run(run_path(sweep.plan.store, "train", cfg, cfg.seed))
    device = resolve_device(sweep.device)
    bf16, per_pass = use_bf16(device, sweep.precision), 8 if device.type == "cuda" else 1
    alphas = barrier_grid(sweep.plan.imp)
    curves = pair_curves([first, sibling], border_config(sweep.plan), sweep.measured(),
                         alphas, device, bf16, per_pass)  # (1 pair, alphas, splits) each
    per_pair = barriers(np.moveaxis(curves["loss"], 1, -1),
                        np.moveaxis(curves["error"], 1, -1), alphas)  # (1 pair, splits)
    return {name: per_pair[name][0] for name in NAMES}


def border_config(plan: Plan):
    """landscape.border's settings for --instability: its defaults with our grid, and BN
    recalibrated on all training images where there are fewer than its default count."""
    from landscape.border import BorderConfig
    cfg = BorderConfig(grid=plan.imp.barrier_grid)
    if cfg.bn_samples >= plan.num_train:
        cfg = dataclasses.replace(cfg, bn_samples=0)  # 0 = all
    return cfg


def barrier_grid(imp: ImpConfig) -> np.ndarray:
    """The interpolation grid of --instability, checked to hold 0 and 1."""
    from landscape.barrier import barriers
    from landscape.geometry import parse_grid
    alphas = parse_grid(imp.barrier_grid, flag="--barrier-grid")
    barriers(np.zeros(len(alphas)), np.zeros(len(alphas)), alphas)  # UserError without 0, 1
    return alphas


def nan_if_none(value) -> float:
    return float("nan") if value is None else float(value)


def run_sweep(sweep: Sweep, result, seeds: list[int], shard=None) -> None:
    """Fill every missing cell this shard owns: seed by seed, level by level (with
    --parallel-runs, each level's runs of every seed trained together first)."""
    plan = sweep.plan
    # (0, 1) = every cell: shards split by seed, not by the flat cell index results uses.
    todo = [cell for cell in result.missing(shard=(0, 1))
            if shard is None or cell[2] % shard[1] == shard[0]]
    if sweep.parallel_runs != 1:
        train_levels(sweep, todo, seeds)
    for s, seed in enumerate(seeds):
        cells = [c for c in todo if c[2] == s]
        levels = sorted({c[1] for c in cells})
        with Progress(len(levels), f"imp seed {seed}", "level") as bar:
            for level in levels:
                for b, _, _ in [c for c in cells if c[1] == level]:
                    values = cell_values(sweep, seed, plan.branches[b], level)
                    result.write((b, level, s), **values)
                bar.update(1, True, test_acc=values.get("test_accuracy"))


def train_levels(sweep: Sweep, cells: list, seeds: list[int]) -> None:
    """Train the runs of `cells` level by level, each level's runs of every seed and branch
    together (runs.engines.parallel.train_many: --parallel-runs at a time), then their
    --instability siblings, which rewind to the dense runs: a level's masks need the
    level before it trained."""
    from runs.engines.parallel import train_many
    plan = sweep.plan
    for level in sorted({c[1] for c in cells}):
        configs = [cell_config(sweep, seeds[s], plan.branches[b], level)
                   for b, lv, s in cells if lv == level]
        phases = [configs]
        if plan.imp.instability:
            phases.append([child_config(plan, cfg, level) for cfg in configs])
        for phase in phases:
            train_many(phase, plan.store, sweep.data, sweep.device, sweep.precision,
                       sweep.compile_model, sweep.parallel_runs)


# ---------------------------------------------------------------------------- results

POINT_DIMS = ("branch", "level", "seed")
SUMMARY_KEYS = ("test_accuracy", "test_loss", "best_val_accuracy", "test_accuracy_at_best_val",
                "best_val_step")


def result_metrics(plan: Plan) -> dict:
    """The metrics of an `imp` result: one value per (branch, level, seed) cell."""
    from runs.results import MetricSpec

    def spec(units, long_name, dtype="f4"):
        return MetricSpec(POINT_DIMS, units, long_name, dtype)

    metrics = {
        "density": spec("fraction", "fraction of prunable weights remaining", "f8"),
        "remaining_weights": spec("weights", "prunable weights remaining", "f8"),
        "test_accuracy": spec("fraction", "test accuracy at the end of training"),
        "test_loss": spec("nats", "test loss at the end of training"),
        "best_val_accuracy": spec("fraction", "best validation accuracy (split off train)"),
        "test_accuracy_at_best_val": spec("fraction", "test accuracy at the best-validation "
                                                      "evaluation"),
        "best_val_step": spec("iterations", "step of the best validation accuracy", "f8"),
    }
    if plan.imp.instability:
        cell = (*POINT_DIMS, "split")
        metrics.update(
            error_barrier=spec("fraction", "error barrier between two SGD children "
                                           "(Frankle et al. 2020)"),
            loss_barrier_mean=spec("nats", "loss barrier over the children's mean loss"),
            loss_barrier_linear=spec("nats", "loss barrier over the chord (Entezari et al.)"))
        metrics = {k: dataclasses.replace(v, dims=cell) if "barrier" in k else v
                   for k, v in metrics.items()}
    if plan.imp.curvature:
        metrics.update(curvature_metrics())
    return metrics


def curvature_metrics() -> dict:
    """--curvature's metrics, one value per cell and network (curvature_at)."""
    from runs.results import MetricSpec
    dims, units = (*POINT_DIMS, "curvature_at"), "nats/param^2"
    return {
        "hessian_top": MetricSpec(dims, units, "top eigenvalue of the train loss Hessian "
                                               "over the surviving weights", "f8"),
        "hessian_trace": MetricSpec(dims, units, "Hutchinson trace of that Hessian", "f8"),
        "hessian_trace_se": MetricSpec(dims, units, "standard error of the trace", "f8")}


def result_config(plan: Plan, path=None) -> dict:
    imp = dataclasses.asdict(plan.imp)
    if not plan.imp.curvature:  # the config results had before --curvature existed
        imp = {k: v for k, v in imp.items() if k not in CURVATURE_FIELDS}
    config = {"imp": imp, "train": dataclasses.asdict(plan.train),
              "reference": plan.reference, "rewind_step": plan.rewind_step,
              "prunable": list(plan.shapes), "prunable_weights": plan.total,
              "output_pruned": plan.output_pruned, "mask_dir": mask_dir_record(plan, path)}
    if plan.imp.instability:
        config["border"] = dataclasses.asdict(border_config(plan))
    if plan.imp.curvature:
        from tickets.curvature import settings
        config["curvature"] = settings(plan.imp.curvature_samples, plan.imp.curvature_tol)
    return config


def mask_dir_record(plan: Plan, path=None) -> str:
    """The mask folder as the result's config names it: its name in the store ("imp_<hash>"),
    so the same sweep over a store moved or spelled another way (`--store store`, `--store
    /abs/store`) resumes its result. A result at `path` written before named the folder by
    its path then: kept as it was, so that result resumes too."""
    name = imp_dir(plan).name
    if path is None or not Path(path).is_file():
        return name
    from runs.results import open_result
    try:
        before = open_result(path).config.get("mask_dir")
    except UserError:
        return name  # not a readable result: creating it reports that
    return before if isinstance(before, str) and Path(before).name == name else name


def open_imp_result(plan: Plan, seeds: list[int], path, device, overwrite=False, shard=None):
    """Create or resume the result file (a shard's own file when `shard` is given); with
    `path` None, an in-memory result of the same layout (`runs.results.MemoryResult`)."""
    from runs.refs import ref_record
    from runs.results import new_result, shard_path
    coords = {"branch": plan.branches, "level": np.arange(plan.imp.levels + 1),
              "seed": np.asarray(seeds)}
    attrs = {}
    if plan.imp.instability:
        from landscape.points import SPLITS
        coords["split"] = list(SPLITS)
        attrs = {"bn_mode": border_config(plan).bn_mode}
    if plan.imp.curvature:
        coords["curvature_at"] = list(CURVATURE_AT)
    inputs = [ref_record(plan.reference)] if plan.reference else []
    from runs.filehash import data_inputs  # data files by content: a resume checks them
    inputs += data_inputs(plan.train.dataset, plan.train.data_root)
    path = shard_path(path, *shard) if shard and path is not None else path
    return new_result(path, "imp", coords, result_metrics(plan), POINT_DIMS,
                      result_config(plan, path), inputs, str(resolve_device(device)),
                      attrs, overwrite=overwrite, shard=shard)


def fill_result(sweep: Sweep, seeds: list[int], path=None, overwrite=False, shard=None):
    """The one way a sweep becomes a result (CLI and `tickets.run_imp` alike): create or
    resume it (the file at `path`, or in memory when None), record the mask folder's
    identity and train and write every missing cell. Returns the closed result."""
    with open_imp_result(sweep.plan, seeds, path, sweep.device, overwrite, shard) as result:
        write_identity(sweep.plan)
        run_sweep(sweep, result, seeds, shard)
    return result


# ---------------------------------------------------------------------------- planning


def parse_rewind(text: str, steps_per_epoch: int) -> tuple[str, int]:
    """(reference, K): "init@2ep" -> ("", 2 * steps_per_epoch); "RUN@last:encoder" -> (it, 0).

    A LABEL:= prefix is dropped: a label names a row, it never changes which runs train."""
    from runs.refs import split_label
    text = split_label(text.strip())[1]
    if text == "init" or text.startswith("init@"):
        step = text.partition("@")[2] or "0"
        return "", parse_steps(step, steps_per_epoch, flag="--rewind init@K")
    return text, 0


def check_reference(reference: str, cfg: TrainConfig, info):
    """The reference's model (under a fresh fc), checked to be this sweep's architecture
    (--model-option values given must match it too) before anything trains."""
    from runs.refs import load_model
    model = load_model(reference, num_classes=info.num_classes).model
    spec = model.spec
    wanted = {"name": cfg.model, "width": cfg.width, "in_channels": info.channels,
              **engine.model_kwargs(cfg)}
    bad = [f"{k} {spec.get(k)!r}, not {v!r}" for k, v in wanted.items() if spec.get(k) != v]
    if bad:
        raise UserError(f"--rewind {reference} is another architecture than --model "
                        f"{cfg.model} --width {cfg.width} on {info.channels}-channel "
                        f"{info.name}: {'; '.join(bad)}")
    return model


def check_options(imp: ImpConfig, seeds) -> None:
    """What can be checked before the data is loaded."""
    check_rate(imp.rate)
    if imp.instability:
        barrier_grid(imp)
    for name in imp.baselines:
        if name == "ticket" or name not in BRANCHES:
            raise unknown("baseline", name, [b for b in BRANCHES.names() if b != "ticket"])
    if len(set(imp.baselines)) != len(imp.baselines):
        raise UserError(f"--baselines {' '.join(imp.baselines)}: names repeat")
    check_curvature(imp)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds")


def check_curvature(imp: ImpConfig) -> None:
    """--curvature-samples and --curvature-tol (checked with or without --curvature)."""
    samples, tol = imp.curvature_samples, imp.curvature_tol
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise UserError(f"--curvature-samples {samples}: give a number of train images "
                        f"(at least 1; 0 = all of them)")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < math.inf:
        raise UserError(f"--curvature-tol {tol}: must be a positive number (the trace's "
                        f"relative standard error, e.g. 0.05)")


def make_plan(imp: ImpConfig, cfg: TrainConfig, store, data: tuple, steps: str,
              save_at=()) -> Plan:
    """Resolve steps and the rewind point, check every option; nothing trains here."""
    info = data[0].info
    cfg = dataclasses.replace(cfg, seed=0, init="", rewind="", mask="", start_step=0,
                              rewind_optimizer="restore")  # the dense run's: set per level
    per_epoch = epoch_steps(cfg, data)
    cfg = engine.config_with_steps(cfg, steps, save_at, per_epoch)
    reference, step = parse_rewind(imp.rewind, per_epoch)
    if step >= cfg.num_steps:
        raise UserError(f"--rewind {imp.rewind}: step {step} is not before the end of "
                        f"training ({cfg.num_steps} steps)")
    cfg = dataclasses.replace(cfg, save_at=tuple(sorted({*cfg.save_at, step} - {0})))
    model = check_reference(reference, cfg, info) if reference else \
        create_model(cfg.model, num_classes=info.num_classes, width=cfg.width,
                     in_channels=info.channels, **engine.model_kwargs(cfg))
    output_pruned = prunes_output(cfg.model, imp.prune_scope, imp.prune_output)
    mask = dense_mask(model, prunable_names(model, imp.prune_scope, not output_pruned))
    plan = Plan(imp, cfg, Path(store), reference, step,
                {name: tuple(m.shape) for name, m in mask.items()}, len(data[0].y),
                output_pruned)
    check_levels(imp.levels, plan.total, imp.rate)
    return plan


def epoch_steps(cfg: TrainConfig, data: tuple) -> int:
    """Iterations per epoch of the training loop (what "2ep" means in --steps, --rewind):
    the engines' rule, ceil(N / batch) with the last partial batch kept unless --drop-last."""
    return engine.epoch_steps(cfg, data[0])


def write_identity(plan: Plan) -> None:
    """STORE/imp_<hash>/imp.json: what the folder's masks were computed for."""
    path = imp_dir(plan) / "imp.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(identity(plan), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- CLI

EPILOG = r"""examples:
  # rewinding a random init to epoch 2, with both baselines, 3 seeds
  python -m tickets.imp --model resnet18 --dataset cifar10 --data-root ~/data --steps 160ep \
      --val-size 5000 --levels 24 --rewind init@2ep --baselines random reinit --seeds 0 1 2
  # rewinding to a distilled student (its encoder under a fresh fc) at K = 0, with the
  # Hessian's top eigenvalue and trace of every ticket and its rewind point
  python -m tickets.imp --model resnet18 --dataset cifar10 --data-root ~/data --steps 160ep \
      --val-size 5000 --levels 24 --rewind store/distill_ab12cd34/seed_0@last:encoder \
      --curvature
  # four rewind points sharing one dense run per seed: give all of them to --save-at
  python -m tickets.imp --model resnet18 --dataset cifar10 --data-root ~/data --steps 160ep \
      --val-size 5000 --levels 24 --rewind init@1ep --save-at 1ep 2ep 5ep
  # ResNet20 at the paper's IMP lr 0.05, rewound as open_lth does (momentum reset at K)
  python -m tickets.imp --model resnet20 --dataset cifar10 --data-root ~/data --steps 160ep \
      --lr 0.05 --levels 24 --rewind init@2ep --rewind-optimizer reset --baselines random"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tickets.imp", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    engine.add_runtime_args(p)
    p.add_argument("--steps", default="160ep",
                   help="training length of every level: iterations or epochs (e.g. 160ep)")
    p.add_argument("--save-at", nargs="*", default=[],
                   help="extra checkpoints of the dense run (step K is always kept); the "
                        "same list lets sweeps with other K share one dense run")
    p.add_argument("--seeds", nargs="+", type=seed_arg, default=[0],
                   help="init seeds (fc seeds when rewinding to a reference): one IMP each")
    p.add_argument("--out", default="results/imp.h5", help="HDF5 result file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a result file written for another config")
    p.add_argument("--shard", default=None,
                   help="i/n: run only the seeds with index %% n == i, into OUT.shardIofN.h5 "
                        "(join with python -m runs.results merge)")
    add_config_args(p, ImpConfig, group="pruning")
    add_config_args(p, TrainConfig, group="training (every level)",
                    exclude=SET_PER_LEVEL)
    add_parallel_arg(p)
    add_launcher_args(p)
    return p


def summary_table(data) -> str:
    """Markdown: one row per level, density and test accuracy (mean ± std over seeds)."""
    branches = [str(b) for b in data.coords["branch"]]
    head = ["level", "density (%)"] + [f"{b} test acc. (%)" for b in branches]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    acc, density = data.metrics["test_accuracy"] * 100, data.metrics["density"] * 100
    for i, level in enumerate(data.coords["level"]):
        cells = [str(int(level)), fmt(density[0, i])]
        cells += [fmt(acc[b, i]) for b in range(len(branches))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(values: np.ndarray) -> str:
    """'mean ± std' in % over the finished seeds, 'n/a' if none."""
    values = values[~np.isnan(values)]
    if not len(values):
        return "n/a"
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else \
        f"{values[0]:.2f}"


def build_sweep(imp: ImpConfig, cfg: TrainConfig, store, steps, save_at=(), seeds=(0,),
                device="auto", precision="auto", compile_model=False,
                parallel_runs: int = 1) -> Sweep:
    """Check the options (cheap ones first), load the data, plan: nothing trains yet.

    The one way to a Sweep, for the CLI (`sweep_from_args`) and `tickets.run_imp`.
    cfg: every level's training config (`make_plan` sets its seed, steps and start);
    steps, save_at: "160ep"-style lengths, resolved once the data is loaded.
    """
    check_options(imp, list(seeds))
    check_store(store)  # masks go there too: a file in its place is one line, now
    use_bf16(resolve_device(device), precision)  # a bad device or precision
    data = load_data(cfg)
    plan = make_plan(imp, cfg, store, data, steps, save_at)
    sweep = Sweep(plan, data, device, precision, compile_model,
                  parallel_count(parallel_runs, [plan.train], data, device))
    if imp.instability:
        sweep.measured()  # its options fail now, not after the first level
    if imp.curvature:
        sweep.curvature_batches()  # --curvature-samples beyond the split fails now
    return sweep


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    """The parsed flags as a Sweep (see `build_sweep`): nothing trains yet."""
    imp = config_from_args(ImpConfig, args)
    cfg = config_from_args(TrainConfig, args, num_steps=0, save_at=(), init="", rewind="",
                           mask="", seed=0, start_step=0, rewind_optimizer="restore")
    return build_sweep(imp, cfg, args.store, args.steps, args.save_at, args.seeds,
                       args.device, args.precision, args.compile, args.parallel_runs)


@cli
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    echo_command("tickets.imp", argv)
    if launching(args):
        return launch(main, argv, args, args.out)
    from runs.results import open_result, parse_shard
    shard = parse_shard(args.shard) if args.shard else None
    sweep = sweep_from_args(args)
    path = fill_result(sweep, args.seeds, args.out, args.overwrite, shard).path
    print(summary_table(open_result(path, "imp")))
    print(f"wrote {path} (masks in {imp_dir(sweep.plan)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
