"""What the training engines share: model preparation (channels_last, DDP, torch.compile),
the step clock, the training loader, checkpoint save/restore for resume, NaN guards,
progress bars and the engines' command-line flags.

The loop itself stays in each engine, flat, reading top to bottom (train.py, distill.py).
"""

import argparse
import dataclasses
import functools
import time
from dataclasses import dataclass

import torch
from torch import nn

from runs.checkpoint import read_checkpoint, set_rng_state
from runs.config import HelpFormatter, add_config_args, from_dict, parse_steps
from runs.data import ImageData
from runs.device import PRECISIONS
from runs.engines import distributed
from runs.errors import UserError
from runs.gpu_loader import Augment, GPULoader
from runs.progress import LOGGERS, Progress, check_logger

# torch.compile modes; reduce-overhead also captures CUDA graphs (cudagraph trees) on CUDA.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Options both engines' configs share (issue #18: the paper's code's choices by default).
INPUT_STATS = ("paper", "dataset")
INPUT_STATS_HELP = ("input normalisation: paper = the paper's code's statistics (CIFAR10's "
                    "for cifar10 and cifar100, ImageNet's for tinyimagenet), dataset = each "
                    "dataset's own train statistics")
DROP_LAST_HELP = ("drop each epoch's last partial batch (--no-drop-last, as the paper's "
                  "code: an epoch is ceil(N / batch) steps, 196 at 50k / 256)")
MODEL_OPTIONS_HELP = ("model factory options as key=value (e.g. pool=avg for VGG, "
                      "shortcut=A for resnet20/56, norm=layer); none = the paper's build")
MODEL_OPTION_FLAG = "--model-option"


def check_model_options(items) -> None:
    """Each --model-option item is key=value (the model checks the keys when it is built)."""
    for item in items:
        key, sep, value = str(item).partition("=")
        if not (sep and key and value):
            raise UserError(f"{MODEL_OPTION_FLAG} {item}: expected key=value, e.g. pool=avg")


def model_kwargs(cfg) -> dict:
    """The model factory's keyword options of a config (runs.models.parse_options)."""
    if not cfg.model_options:
        return {}
    from runs.models import parse_options
    return parse_options(cfg.model, tuple(cfg.model_options))


def choice_rules(cfg) -> dict:
    """check_fields rules: every field with choices (but the model, which may be a user's
    pkg.mod:factory) holds one of them, else an error naming the flag and the choices."""
    rules = {}
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and f.name != "model":
            rules[f.name] = (lambda v, c=tuple(choices): v in c,
                             f"must be one of {', '.join(choices)}")
    return rules


def run_data(cfg) -> list[dict]:
    """The data files a train or distill run reads (its dataset's, and the probe set's when
    it is another), by size, mtime and sha256 (runs.filehash: hashed once, then cached):
    recorded in config.json, so a resume on changed files is refused (runs.store)."""
    from runs.filehash import data_inputs
    records = data_inputs(cfg.dataset, cfg.data_root, getattr(cfg, "data_options", ()))
    probe = getattr(cfg, "probe_dataset", "")
    if probe and probe != cfg.dataset:
        records += data_inputs(probe, getattr(cfg, "probe_root", "") or cfg.data_root)
    return records


def epoch_steps(cfg, train: ImageData) -> int:
    """Iterations per epoch of `cfg` on `train`: ceil(N / batch) (the last partial batch
    kept, as the paper's code: 196 at 50,000 / 256), N // batch with --drop-last.

    Where epochs become steps before the run's loader exists (--steps 15ep, --save-at):
    the length of the loader `train_loader` builds, so the two never disagree (GPULoader
    also drops a trailing batch too small for BatchNorm)."""
    world = distributed.from_env()
    loader = GPULoader(train.x, train.y, train.info.mean, train.info.std, cfg.batch_size,
                       "cpu", drop_last=cfg.drop_last,
                       part=distributed.rank_slice(cfg.batch_size, world))
    return len(loader)


def prepare(model: nn.Module, device: torch.device, compile_model: bool | str = False,
            world: distributed.World = distributed.SINGLE) -> nn.Module:
    """Move to the device (channels_last on CUDA), wrap in DDP under torchrun, optionally
    in torch.compile (`compile_model`: True = the default mode, or one of COMPILE_MODES).

    Returns the module to call; the original (unwrapped) one keeps the weights and is
    the one to checkpoint (`runs.checkpoint.unwrap` finds it either way).
    """
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    forward = distributed.wrap(model, world, device)
    if compile_model:
        mode = "default" if compile_model is True else compile_model
        return torch.compile(forward, mode=None if mode == "default" else mode)
    return forward


def mark_step() -> None:
    """Start of a training step: under CUDA graphs (reduce-overhead) the previous step's
    outputs may be overwritten from here on; a no-op for eager models."""
    torch.compiler.cudagraph_mark_step_begin()


@dataclass(frozen=True)
class Clock:
    """Iteration <-> (epoch, batch) for a loader of `steps_per_epoch` batches an epoch."""
    steps_per_epoch: int

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def is_epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0


def batches(loader: GPULoader, start_step: int, num_steps: int):
    """Yield (step_after, x, y) from `start_step` to `num_steps`, crossing epochs.

    step_after counts the iteration just taken (1-based), matching checkpoint names.
    """
    clock = Clock(len(loader))
    step = start_step
    while step < num_steps:
        epoch, first = clock.position(step)
        for x, y in loader.epoch(epoch, start_batch=first):
            step += 1
            yield step, x, y
            if step >= num_steps:
                return


def train_loader(data: ImageData, batch_size: int, device, data_seed: int,
                 augment: Augment = Augment(),
                 world: distributed.World = distributed.SINGLE,
                 drop_last: bool = False) -> GPULoader:
    """Shuffled, augmented batches, the last partial one kept unless `drop_last`; under
    torchrun each rank gets its share of each (of the partial one too)."""
    if batch_size < 1 or batch_size > len(data.y):
        raise UserError(f"--batch-size {batch_size}: must be between 1 and the "
                        f"{len(data.y)} training images")
    return GPULoader(data.x, data.y, data.info.mean, data.info.std, batch_size, device,
                     shuffle=True, drop_last=drop_last, augment=augment, data_seed=data_seed,
                     part=distributed.rank_slice(batch_size, world))


def check_finite(loss: torch.Tensor, step: int, run) -> None:
    """Stop on a NaN/Inf loss, naming the step and the last good checkpoint kept."""
    if torch.isfinite(loss).all():
        return
    last = latest_state(run) if run is not None else None  # a kept step or resume.pt
    kept = f"; last good checkpoint: {last[1]}" if last is not None else ""
    raise UserError(f"loss is {loss.item()} at step {step}{kept} (lower the learning rate?)")


def progress(total: int, initial: int, desc: str, show: bool = True,
             steps_per_epoch: int = None, batch_size: int = 1) -> Progress:
    """A training loop's runs.progress.Progress: a bar in a terminal, lines with epoch,
    loss, img/s and ETA in a log; silent where `show` is False (ranks other than 0)."""
    return Progress(total, desc, "step", initial, per_unit=batch_size, rate_unit="img",
                    steps_per_epoch=steps_per_epoch, show=show)


def restore(path, model: nn.Module, optimizer=None, scheduler=None,
            modules: dict = None) -> dict:
    """Load a resume checkpoint in place: weights, optimiser, schedule, extra modules, RNG."""
    payload = read_checkpoint(path)
    model.load_state_dict(payload["model"]["state"])
    for name, module in (modules or {}).items():
        state = payload["modules"][name]["state"]
        if state is not None:
            module.load_state_dict(state)
    if optimizer is not None and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler"):
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return payload


class Timer:
    """Images per second over a run, for the summary line."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.images += n

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


# Every CLI takes these (runs.errors.cli handles them before the parser sees argv).
USER_MODELS = """Your own model: --model my_package.my_module:my_net imports the module and
builds the model with my_net(num_classes=, width=, in_channels=), which returns an nn.Module
with encoder, fc and embed_dim (runs.models.Classifier). --import MODULE (repeatable, every
command) imports a module first (e.g. one that registers models with @runs.models.register)
and lets checkpoints whose model comes from it load; a checkpoint never imports code by
itself."""


def training_parser(prog: str, description: str, config_cls, default_steps: str,
                    steps_example: str, examples: str = "") -> argparse.ArgumentParser:
    """The CLI of a training engine: runtime flags, --steps/--save-at, one flag per field.

    examples: the `examples:` block that opens the epilog (before the user-model note)."""
    epilog = f"{examples.rstrip()}\n\n{USER_MODELS}" if examples else USER_MODELS
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=HelpFormatter)
    add_runtime_args(p)
    p.add_argument("--log", default=None, choices=LOGGERS,
                   help="also write the logged metrics (loss, kl, accuracies, lr) to "
                        "tensorboard (RUN/tb/) or an offline wandb run (RUN/wandb/); "
                        "metrics.jsonl is always written (needs pip install tensorboard "
                        "or wandb; not part of the run's identity)")
    p.add_argument("--steps", default=default_steps, help=f"training length: iterations "
                   f"(e.g. {steps_example}) or epochs (e.g. {default_steps})")
    p.add_argument("--save-at", nargs="*", default=[],
                   help="keep checkpoints at these iterations or epochs (e.g. 1ep 2ep 500)")
    group = p.add_argument_group("configuration")
    names = [f.name for f in dataclasses.fields(config_cls)]
    first = ("model", "width")  # then --model-option, then the other fields in their order
    add_config_args(group, config_cls, exclude=[n for n in names if n not in first])
    add_model_option(group, config_cls)
    add_config_args(group, config_cls,
                    exclude=("num_steps", "save_at", "model_options", *first))
    return p


def add_model_option(group, config_cls) -> None:
    """--model-option key=value ... (--model-options, the field's name, works too)."""
    field = {f.name: f for f in dataclasses.fields(config_cls)}.get("model_options")
    if field is not None:
        group.add_argument(MODEL_OPTION_FLAG, "--model-options", dest="model_options",
                           nargs="*", default=field.default, metavar="KEY=VALUE",
                           help=field.metadata["help"].replace("%", "%%"))


def config_and_data(cfg, steps: str, save_at, load_data):
    """(config with --steps/--save-at resolved to iterations, the data it names): epochs
    are known only once the data is loaded."""
    data = load_data(cfg)
    cfg = config_with_steps(cfg, steps, save_at, epoch_steps(cfg, data[0]))
    return cfg, data


def run_from_args(config_cls, args, load_data, run_fn):
    """The body of an engine's main: config from flags, the run, torchrun teardown.

    Returns the Run on rank 0 (or the only process), None on the other ranks.
    """
    names = {f.name for f in dataclasses.fields(config_cls)} - {"num_steps", "save_at"}
    fields = {k: v for k, v in vars(args).items() if k in names}  # --save-at: steps, below
    if getattr(args, "log", None):  # a runtime flag: passed to the run, not in its config
        check_logger(args.log)
        run_fn = functools.partial(run_fn, log=args.log)
    return run_config(config_cls, fields, args.steps, args.save_at, load_data, run_fn,
                      args.store, args.device, args.precision, args.compile)


def run_config(config_cls, fields: dict, steps: str, save_at, load_data, run_fn,
               store: str = "store", device="auto", precision: str = "auto",
               compile_model=None):
    """What a training CLI and its Python function (runs.run_train, runs.run_distill) share:
    the config from its fields (unknown ones listed), the data, --steps/--save-at resolved
    ('10ep' or iterations), `run_fn(cfg, store, data, device, precision, compile_model)`,
    torchrun teardown. Returns the Run on rank 0 (or the only process), else None.
    """
    reserved = sorted({"num_steps", "save_at"} & set(fields))
    if reserved:
        raise UserError(f"{config_cls.__name__}: give {', '.join(reserved)} as steps/save_at "
                        f"(iterations or epochs, e.g. 10ep), not as a field")
    cfg = from_dict(config_cls, {**fields, "num_steps": 0, "save_at": ()})
    cfg, data = config_and_data(cfg, steps, save_at, load_data)
    run = run_fn(cfg, store, data, device, precision, compile_model)
    world = distributed.from_env()
    distributed.finish(world)
    return run if world.main else None


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Flags that change where and how fast a run executes, not what it computes."""
    p.add_argument("--store", default="store", help="root folder of the run store")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="wrap the model in torch.compile (alone: the default mode); "
                        "reduce-overhead adds CUDA graphs")


def config_with_steps(cfg, steps: str, save_at, steps_per_epoch: int):
    """Resolve '160ep'-style flags to iterations now that the epoch length is known."""
    if steps_per_epoch < 1:  # else '2ep' would fail blaming --steps
        raise UserError(f"--batch-size {cfg.batch_size}: larger than the training set (not "
                        f"one full batch per epoch)")
    num_steps = parse_steps(steps, steps_per_epoch, flag="--steps")
    points = tuple(sorted({parse_steps(t, steps_per_epoch) for t in save_at}))
    late = [p for p in points if p > num_steps]
    if late:
        raise UserError(f"--save-at {late[0]} is past the end of training ({num_steps} steps)")
    return dataclasses.replace(cfg, num_steps=num_steps, save_at=points)


def check_window(losses: list, last_step: int, run,
                 world: distributed.World = distributed.SINGLE) -> None:
    """Fail on the first non-finite loss of the window, naming its step.

    Under torchrun the window is averaged over ranks first, so every rank stops together.
    """
    stacked = distributed.mean(torch.stack(losses), world)
    bad = ~torch.isfinite(stacked)
    if bad.any():
        first = last_step - len(losses) + 1 + int(bad.int().argmax())
        check_finite(stacked[bad][:1], first, run)


def latest_state(run) -> tuple[int, object] | None:
    """(step, path) of the newest full training state: a kept step or the resume file."""
    saved = [(step, run.ckpt_path(step)) for step in run.steps()]
    if resume_path(run).exists():
        saved.append((read_checkpoint(resume_path(run))["step"], resume_path(run)))
    return max(saved) if saved else None


def resume_path(run):
    return run.ckpt_dir / "resume.pt"


def prev_resume_path(run):
    """The resume state before the newest: runs trained together (runs.engines.parallel)
    keep it while their group writes its new ones."""
    return run.ckpt_dir / "resume.prev.pt"


def clear_resume(run) -> None:
    """A finished run keeps no resume state (however it was trained: alone or together)."""
    resume_path(run).unlink(missing_ok=True)
    prev_resume_path(run).unlink(missing_ok=True)


def fmt_pct(value) -> str:
    """A fraction as '93.57 %', 'n/a' when absent: the engines' summary lines."""
    return "n/a" if value is None else f"{100 * value:.2f} %"
