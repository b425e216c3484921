"""Supervised training: `python -m runs.train --model resnet18 --dataset cifar10 ...`.

SGD with momentum, a multistep or cosine schedule, flip + pad-crop on the device, seeds for
init and data order kept apart, checkpoints at chosen steps for rewinding, an optional fixed
sparsity mask, and resume: kill it and run the same command again, it continues from its
last checkpoint and ends with the same weights (bitwise on CPU).
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from runs.checkpoint import check_finite, save_checkpoint, unwrap
from runs.config import arg, check_fields
from runs.data import holdout, load_splits
from runs.device import autocast, resolve_device, use_bf16
from runs.engines import distributed, engine
from runs.engines.engine import (
    DROP_LAST_HELP,
    INPUT_STATS,
    INPUT_STATS_HELP,
    MODEL_OPTIONS_HELP,
    check_model_options,
    model_kwargs,
)
from runs.engines.masking import Mask, load_mask
from runs.errors import UserError, cli, echo_command
from runs.gpu_loader import Augment, eval_loader
from runs.models import MODELS, create_model
from runs.models.base import check_input_size
from runs.progress import open_logger, run_label
from runs.recipe import PAPER_TRAIN
from runs.store import Run, content_fields, open_run, run_path, to_store

SCHEDULES = ("multistep", "cosine", "constant")
REWIND_OPTIMIZER = ("restore", "reset")  # --rewind-optimizer: the paper's code, open_lth


@dataclass(frozen=True)
class TrainConfig:
    model: str = arg("resnet18", "registry name of the network", choices=MODELS.names())
    width: float = arg(1.0, "channel width multiplier (CPU-sized runs use < 1)")
    model_options: tuple[str, ...] = arg((), MODEL_OPTIONS_HELP)
    dataset: str = arg("cifar10", "registry name of the dataset")
    data_root: str = arg("", "folder (or .npz file) holding the dataset; '' = its default")
    input_stats: str = arg(PAPER_TRAIN["input_stats"], INPUT_STATS_HELP, choices=INPUT_STATS)
    subset: int = arg(0, "train images per class, seeded stratified; 0 = all")
    val_size: int = arg(0, "images held out from train for model selection; 0 = none")
    # init, rewind and mask name files: the run's identity takes what they hold, not their
    # path (runs.store: a store moved or spelled another way holds the same runs)
    init: str = arg("", "start weights: a checkpoint reference (e.g. RUN@last:encoder); "
                        "'' = random init from --seed", content="ref")
    rewind: str = arg("", "start from this checkpoint's full training state (weights, "
                          "optimiser, schedule, step); used by lottery-ticket rewinding; "
                          "not with --init", content="ref")
    rewind_optimizer: str = arg("restore", "with --rewind: restore the checkpoint's optimiser "
                                           "state (momentum; the paper's code) or reset it "
                                           "(fresh SGD, momentum 0: open_lth); weights, BN "
                                           "buffers, lr schedule and data position are "
                                           "rewound either way", choices=REWIND_OPTIMIZER)
    start_step: int = arg(0, "fresh weights starting mid-schedule: lr schedule and data order "
                             "begin at this iteration (IMP's reinit control from K); 0 = start")
    mask: str = arg("", "file of a fixed sparsity mask (name -> bool); masked weights stay 0",
                    content="file")
    seed: int = arg(0, "init seed (weights and fresh fc)")
    data_seed: int = arg(0, "data-order and augmentation seed")
    num_steps: int = arg(0, "iterations to train (set by --steps)")
    batch_size: int = arg(256, "images per step")
    drop_last: bool = arg(PAPER_TRAIN["drop_last"], DROP_LAST_HELP)
    lr: float = arg(0.1, "peak learning rate")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(1e-4, "L2 weight decay")
    schedule: str = arg("multistep", "learning-rate schedule", choices=SCHEDULES)
    milestones: tuple[float, ...] = arg((0.5, 0.75), "multistep: fractions of training "
                                        "where the lr is multiplied by --gamma")
    gamma: float = arg(0.1, "multistep decay factor")
    warmup_steps: int = arg(0, "linear warm-up iterations")
    flip: bool = arg(True, "random horizontal flips")
    crop_padding: int = arg(4, "random crop after zero-padding by this many pixels; 0 = off")
    save_at: tuple[int, ...] = arg((), "iterations at which to keep a checkpoint (set by "
                                       "--save-at; step 0 and the end are always kept)")
    eval_every: int = arg(1, "evaluate on validation and test every N epochs; 0 = at the end")

    def __post_init__(self):  # numbers torch would choke on, or silently misuse
        check_model_options(self.model_options)
        check_fields(self, {
            **engine.choice_rules(self),
            "batch_size": (lambda v: v >= 1, "must be at least 1 image"),
            "val_size": (lambda v: v >= 0, "must be 0 (none) or a number of images"),
            "lr": (lambda v: 0 < v < math.inf, "must be a positive number"),
            "momentum": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
            "weight_decay": (lambda v: 0 <= v < math.inf, "must be 0 or positive"),
            "gamma": (lambda v: 0 < v <= 1, "the lr decay factor must lie in (0, 1]"),
            "milestones": (lambda v: all(0 < m < 1 for m in v),
                           "must be fractions of training in (0, 1), e.g. 0.5 0.75"),
            "warmup_steps": (lambda v: v >= 0, "must be 0 (none) or a number of iterations"),
            "crop_padding": (lambda v: v >= 0, "must be 0 (no crop) or a number of pixels"),
            "eval_every": (lambda v: v >= 0, "must be 0 (at the end) or a number of epochs"),
        })


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of cfg.lr after `step` iterations."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant":
        return warm
    if cfg.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step / cfg.num_steps, 1.0)))
    passed = sum(step >= int(m * cfg.num_steps) for m in cfg.milestones)
    return warm * cfg.gamma ** passed


def build_model(cfg: TrainConfig, num_classes: int, channels: int):
    """Random init from the seed, or the weights a reference names (fresh fc if asked)."""
    if not cfg.init:
        return create_model(cfg.model, num_classes=num_classes, width=cfg.width,
                            in_channels=channels, seed=cfg.seed, **model_kwargs(cfg))
    from runs.refs import load_model
    model = check_finite(load_model(cfg.init, num_classes=num_classes, fc_seed=cfg.seed).model,
                         cfg.init)
    # --model-option values given must match the checkpoint's model (others come from it).
    wanted = {"name": cfg.model, "width": cfg.width, "in_channels": channels,
              **model_kwargs(cfg)}
    bad = [f"{k} {model.spec.get(k)!r}, not {v!r}" for k, v in wanted.items()
           if model.spec.get(k) != v]  # a silent width change would train another network
    if bad:
        raise UserError(f"--init {cfg.init} does not fit this run (--model {cfg.model} "
                        f"--width {cfg.width}, {channels}-channel data): {'; '.join(bad)}")
    return model


def make_optimizer(cfg: TrainConfig, model, device):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step))
    return opt, sched


@torch.no_grad()
def evaluate(model, loader, bf16: bool = False) -> dict:
    """Mean cross-entropy and accuracy over a loader, in eval mode (restores the mode)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=loader.x.device, dtype=torch.float64)
    correct = torch.zeros((), device=loader.x.device, dtype=torch.int64)
    for x, y in loader.epoch(0):
        with autocast(x.device, bf16):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(loader.y)
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n}


@dataclass
class Session:
    """Everything a training loop touches, built once."""
    cfg: TrainConfig
    run: Run
    model: torch.nn.Module
    forward: torch.nn.Module  # the model, possibly compiled
    optimizer: torch.optim.Optimizer
    scheduler: object
    mask: Mask | None
    loader: object
    evals: dict  # split name -> eval loader
    device: torch.device
    bf16: bool
    step: int = 0
    images_per_second: float = 0.0
    world: distributed.World = distributed.SINGLE  # torchrun ranks; rank 0 writes files
    # Training losses since the last evaluation: saved in every checkpoint, so an epoch
    # resumed mid-way logs the mean over all its steps, not only the resumed ones.
    losses: list = field(default_factory=list)
    lock: object = None  # rank 0's runs.results.WriteLock on the run: one writer at a time
    logger: object = None  # rank 0's runs.progress.Logger of --log tensorboard|wandb, or None


def load_data(cfg: TrainConfig) -> tuple:
    """(train, val or None, test); the split is fixed (seed 0) whatever the run's seeds."""
    train, test = load_splits(cfg.dataset, cfg.data_root, cfg.subset, seed=0,
                              stats=cfg.input_stats)
    train, val = holdout(train, cfg.val_size, seed=0)
    return train, val, test


def setup(cfg: TrainConfig, store: str, data: tuple = None, device="auto", precision="auto",
          compile_model=False) -> Session:
    """Load data, open the run, build or restore model/optimiser: ready to train."""
    if cfg.num_steps < 1:
        raise UserError(f"--steps must be at least 1 iteration (got {cfg.num_steps})")
    check_start(cfg)
    world, device = distributed.start(resolve_device(device))
    train, val, test = data or load_data(cfg)
    model = build_model(cfg, train.info.num_classes, train.info.channels)
    check_input_size(model, train.info.channels, train.info.image_size)
    loader = engine.train_loader(train, cfg.batch_size, device, cfg.data_seed,
                                 Augment(cfg.flip, cfg.crop_padding), world, cfg.drop_last)
    forward = engine.prepare(model, device, compile_model, world)
    optimizer, scheduler = make_optimizer(cfg, model, device)
    mask = Mask(model, load_mask(cfg.mask), cfg.mask) if cfg.mask else None  # on the device
    rewind = load_rewind(cfg, model) if cfg.rewind else None
    # Only now, with every flag checked, does the run directory appear. init_step: the
    # step of the state it starts from, which RUN@init names (runs.refs.init_step).
    first = int(rewind.payload.get("step", 0)) if rewind is not None else cfg.start_step
    run = open_run(store, "train", cfg, extra={"steps_per_epoch": len(loader),
                                               "model_spec": model.spec, "init_step": first,
                                               "data_inputs": engine.run_data(cfg)})
    evals = {name: eval_loader(data, device) for name, data in
             (("val", val), ("test", test)) if data is not None}
    s = Session(cfg, run, model, forward, optimizer, scheduler, mask, loader, evals, device,
                use_bf16(device, precision), world=world)
    # A second process training the same run would interleave checkpoints and metrics.
    from runs.results import WriteLock  # runtime import: h5py only where a run trains
    s.lock = WriteLock(run.path).acquire() if world.main else None
    try:
        s.step = start_state(s, rewind)
    except BaseException:
        release(s)
        raise
    return s


def release(s: Session) -> None:
    if s.lock is not None:
        s.lock.release()
        s.lock = None


def start_state(s: Session, rewind=None) -> int:
    """Resume from the newest checkpoint of this run, else rewind, else step 0 (saved)."""
    latest = engine.latest_state(s.run)
    distributed.barrier(s.world)  # every rank has looked before rank 0 writes step 0
    if latest:
        step, path = latest
        payload = engine.restore(path, s.model, s.optimizer, s.scheduler)
        s.losses = list(payload["extra"].get("losses", torch.empty(0)).to(s.device).unbind())
        if s.world.main:
            s.run.trim_metrics(step)
        return step
    step = rewind_to(s, rewind) if rewind is not None else schedule_at(s, s.cfg.start_step)
    if s.mask is not None:
        s.mask.apply_to_weights()
        s.mask.apply_to_optimizer(s.optimizer)
    save(s, step, s.run.ckpt_path(step))
    return step


def load_rewind(cfg: TrainConfig, model):
    """The --rewind checkpoint, checked against this run's model before any file is made."""
    from runs.refs import load_model
    loaded = load_model(cfg.rewind)
    check_finite(loaded.model, cfg.rewind)
    kind = loaded.payload.get("extra", {}).get("kind", "train")
    if kind != "train":
        raise UserError(f"--rewind {cfg.rewind}: a {kind} checkpoint holds no SGD state; "
                        f"start from its weights with --init REF:encoder")
    step = int(loaded.payload.get("step", 0))
    if step >= cfg.num_steps:  # training would end where it starts: nothing to train
        raise UserError(f"--rewind {cfg.rewind} is at step {step}, not before the end of "
                        f"training (--steps {cfg.num_steps}); give --steps above {step}")
    # The seed is not compared: every weight comes from the checkpoint.
    if without_seed(loaded.model.spec) != without_seed(model.spec):
        raise UserError(f"--rewind {cfg.rewind} is a {loaded.model.spec.get('name')} "
                        f"({loaded.model.spec}), not this run's {model.spec}")
    return loaded


def rewind_to(s: Session, loaded) -> int:
    """Copy the training state of the --rewind checkpoint; returns its step.

    Weights, BN buffers, lr schedule and (through the step) data position always; the
    optimiser's state (momentum) under --rewind-optimizer restore only: reset leaves the
    fresh SGD of `setup` (no momentum buffers, as open_lth's rewinding)."""
    payload = loaded.payload
    step = int(payload.get("step", 0))
    s.model.load_state_dict(loaded.model.state_dict())
    if s.cfg.rewind_optimizer == "reset":
        return schedule_at(s, step)
    if payload.get("optimizer"):
        s.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scheduler"):
        s.scheduler.load_state_dict(payload["scheduler"])
    return step


def schedule_at(s: Session, step: int) -> int:
    """Move the fresh lr schedule to `step` (as open_lth: step it `step` times); returns it."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": meant
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            s.scheduler.step()
    return step


def check_start(cfg: TrainConfig) -> None:
    """--start-step and --rewind-optimizer against the start point, before any file."""
    if cfg.init and cfg.rewind:
        raise UserError(f"--init {cfg.init} with --rewind {cfg.rewind}: --rewind restores "
                        f"the weights too; give one of them")
    if cfg.start_step and (cfg.rewind or not 0 < cfg.start_step < cfg.num_steps):
        raise UserError(f"--start-step {cfg.start_step}: must lie in [0, {cfg.num_steps}) "
                        f"(the --steps) and --rewind sets its own step")
    if cfg.rewind_optimizer == "reset" and not cfg.rewind:
        raise UserError("--rewind-optimizer reset: only with --rewind (a fresh start has no "
                        "optimiser state to reset)")


def without_seed(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "seed"}


def save(s: Session, step: int, path) -> None:
    if not s.world.main:
        return
    s.run.require()  # its folder deleted mid-run: one line, no record-less run folder
    losses = torch.stack(s.losses).cpu() if s.losses else torch.empty(0)
    # paths into the store (mask, rewind) relative to it, as in config.json: a checkpoint
    # is the same bits wherever the store lies and however its path was spelled
    config, moved = to_store(dataclasses.asdict(s.cfg), content_fields(s.cfg), s.run.root)
    extra = {"kind": "train", "steps_per_epoch": len(s.loader), "losses": losses}
    save_checkpoint(path, unwrap(s.model), step, config=config, optimizer=s.optimizer,
                    scheduler=s.scheduler,
                    extra={**extra, "store_relative": moved} if moved else extra)


def train_step(s: Session, x, y) -> torch.Tensor:
    engine.mark_step()
    with autocast(s.device, s.bf16):
        loss = F.cross_entropy(s.forward(x).float(), y)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if s.mask is not None:
        s.mask.apply_to_grads()
    s.optimizer.step()
    s.scheduler.step()
    if s.mask is not None:
        s.mask.apply_to_weights()
    return loss.detach()



def log_eval(s: Session, step: int, losses: list, measured: dict = None) -> dict | None:
    """Rank 0 evaluates, logs and returns the record; the training loss is averaged over
    ranks first. measured: split -> {"loss", "accuracy"} taken already (runs trained
    together evaluate at once: runs.engines.parallel), else `evaluate` measures."""
    train_loss = distributed.mean(torch.stack(losses).mean(), s.world).item() if losses else None
    if not s.world.main:
        return None
    record = {"step": step, "epoch": step / len(s.loader), "lr": s.scheduler.get_last_lr()[0],
              "train_loss": train_loss}
    # Under DDP the plain module evaluates: DDP's forward would wait for the other ranks.
    model = s.model if s.world.active else s.forward
    for name, loader in s.evals.items():
        values = measured[name] if measured else evaluate(model, loader, s.bf16)
        for key, value in values.items():
            record[f"{name}_{key}"] = value
    s.run.log(record)
    if s.logger is not None:
        s.logger.log(record)
    return record


def is_eval_step(s: Session, step: int) -> bool:
    every = s.cfg.eval_every * len(s.loader)
    return step == s.cfg.num_steps or (every > 0 and step % every == 0)


def fit(s: Session, stop_at: int = None) -> None:
    """The loop. `stop_at` ends early without DONE (tests use it to simulate a crash)."""
    cfg = s.cfg
    keep = set(cfg.save_at) | {cfg.num_steps}
    timer = engine.Timer()
    s.images_per_second = 0.0
    label = run_label("train", cfg)
    with engine.progress(cfg.num_steps, s.step, label, s.world.main, len(s.loader),
                         cfg.batch_size) as bar:
        for step, x, y in engine.batches(s.loader, s.step, cfg.num_steps):
            loss = train_step(s, x, y)
            s.losses.append(loss)
            s.step = step
            timer.add(len(y))
            epoch_end = step % len(s.loader) == 0
            if step in keep or epoch_end or step == stop_at:
                engine.check_window(s.losses, step, s.run, s.world)
            record = None
            if is_eval_step(s, step):
                record = log_eval(s, step, s.losses)
                s.losses = []
            split = "val" if "val" in s.evals else "test"  # the accuracy shown
            bar.update(1, epoch_end or record is not None, loss=loss,
                       **{f"{split}_acc": (record or {}).get(f"{split}_accuracy")})
            if step in keep:
                save(s, step, s.run.ckpt_path(step))
            elif epoch_end or step == stop_at:
                save(s, step, engine.resume_path(s.run))
            if step == stop_at:
                return
    s.images_per_second = timer.rate()


def summarize(s: Session) -> dict:
    records = [r for r in s.run.metrics() if "test_accuracy" in r]
    final = records[-1] if records else {}
    summary = {"step": s.step, "test_accuracy": final.get("test_accuracy"),
               "test_loss": final.get("test_loss")}
    with_val = [r for r in records if "val_accuracy" in r]
    if with_val:
        best = max(with_val, key=lambda r: r["val_accuracy"])
        summary.update(best_val_accuracy=best["val_accuracy"], best_val_step=best["step"],
                       test_accuracy_at_best_val=best["test_accuracy"])
    return summary


def train(cfg: TrainConfig, store: str = "store", data: tuple = None, device="auto",
          precision="auto", compile_model=False, stop_at: int = None, log: str = None) -> Run:
    """Train (or resume, or skip if done) the run `cfg` names in `store`; `log`:
    "tensorboard" or "wandb" mirrors metrics.jsonl there too (runs.progress)."""
    done = Run(run_path(store, "train", cfg, cfg.seed))
    if done.done:
        return done
    s = setup(cfg, store, data, device, precision, compile_model)
    try:
        if s.run.done:  # finished by another process while this one waited for the lock
            return s.run
        if log and s.world.main:
            s.logger = open_logger(log, s.run.path, dataclasses.asdict(cfg), s.step)
        fit(s, stop_at)
        if stop_at is not None and s.step < cfg.num_steps:
            return s.run
        if s.world.main:
            engine.clear_resume(s.run)
            s.run.mark_done(summarize(s))
        distributed.barrier(s.world)  # no rank returns before DONE exists
    finally:
        if s.logger is not None:
            s.logger.close()
        release(s)
    return s.run


HELP = """Supervised training (SGD, momentum, multistep or cosine schedule) of a registered model
on a registered dataset. Runs live in STORE/train_<hash>/seed_<seed>/; re-running the same
command skips a finished run and resumes an unfinished one from its latest checkpoint."""


EXAMPLES = r"""examples:
  python -m runs.train --model resnet18 --dataset cifar10 --data-root ~/data --steps 160ep \
      --save-at 1ep 2ep 5ep --val-size 5000
  python -m runs.train --model convnet --width 0.25 --dataset digits --steps 2ep --device cpu
  python -m runs.train --init STORE/distill_<hash>/seed_0@last:encoder --dataset cifar10 \
      --data-root ~/data --steps 30ep          # fine-tune a student's encoder, fresh fc"""


def parser():
    return engine.training_parser("python -m runs.train", HELP, TrainConfig, "160ep", "31200",
                                   EXAMPLES)


@cli
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    echo_command("runs.train", argv)
    run = engine.run_from_args(TrainConfig, args, load_data, train)
    if run is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    summary = run.summary()
    print(f"train {run.path}: {summary.get('step')} steps, test accuracy "
          f"{engine.fmt_pct(summary.get('test_accuracy'))}" + best_text(summary))
    return 0


def best_text(summary: dict) -> str:
    if "best_val_accuracy" not in summary:
        return ""
    at_best = engine.fmt_pct(summary["test_accuracy_at_best_val"])
    return (f", best validation {engine.fmt_pct(summary['best_val_accuracy'])} at step "
            f"{summary['best_val_step']} (test there {at_best})")


if __name__ == "__main__":
    raise SystemExit(main())
