"""K supervised runs trained at once: stacked parameters under torch.func.

A study is made of many small runs of one shape: SGD children of a border start, seeds,
IMP's branches at one level. One such run leaves a GPU idle between kernel launches; K of
them stacked along a new leading dim (`torch.func.stack_module_state`) and called through
`vmap(functional_call)` run as one K-times-wider program (convolutions with batched weights
become grouped convolutions). Each run keeps its own:

  - weights, BN running statistics (updated in place inside vmap, each run on its own
    images), momentum buffers: one SGD over the stacked tensors is K independent SGDs, the
    update being elementwise; a run without momentum yet gets a zero buffer, which SGD's
    first step (buf = m * 0 + g) turns into the plain one (buf = g) exactly;
  - data order and augmentation (its own GPULoader, seeded by its data_seed);
  - mask (stacked, ones for weights a run does not mask).

Everything else is shared and must be equal (SHARED: architecture, data, batch, schedule,
length): `check_shared` names the first setting that differs. Each run is still an
ordinary run of `runs.train` in the store: its session (runs.engines.train.setup) opens and
locks its folder, restores or rewinds its state and saves step 0; at every save and
evaluation the stacked state is copied back into its model and optimiser, and the run's
own save/log functions write the same checkpoints, metrics and DONE a run trained alone
writes (plus resume.prev.pt while it trains). A kill leaves each run with its resume
checkpoint and the one before; a re-run resumes the same groups together from the newest
step all of them hold, so it computes what the uninterrupted group computed, bit for bit
on the CPU. Runs trained together agree with the same runs trained alone to float32
rounding (~1e-7: a grouped convolution sums in another order than K plain ones).
"""

import dataclasses
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from runs.device import autocast, resolve_device
from runs.engines import distributed, engine
from runs.errors import UserError
from runs.progress import run_label

# What K runs trained together may differ in; every other TrainConfig field is shared.
VARYING = ("seed", "data_seed", "init", "rewind", "rewind_optimizer", "start_step", "mask",
           "save_at")
MAX_AUTO = 16  # the most runs `auto_parallel_runs` stacks
PARALLEL_HELP = ("supervised runs of one shape (children, seeds, IMP branches) trained "
                 "together as stacked parameters under torch.func (each with its own "
                 "optimiser, BN statistics, data order and mask; each written as its own "
                 "run): at most this many at once; 0 = auto (by memory on CUDA, 1 on CPU)")


class Stack:
    """K models of one architecture as stacked tensors, trained by one SGD.

    models: already on their device; their parameters and buffers are copied into
    (K, ...) tensors (the models keep theirs until `write_back`). masks: per model a dict
    name -> bool tensor of the parameter's shape, or None (no mask). compile_model: True
    or a torch.compile mode (engine.COMPILE_MODES) compiles the vmapped forward and its
    backward (BN's running statistics still update in place), False runs eager.
    """

    def __init__(self, models: list[nn.Module], lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4, masks: list | None = None, bf16: bool = False,
                 compile_model: bool | str = False):
        check_same_shapes(models)
        self.models, self.k, self.bf16 = models, len(models), bf16
        self.base = models[0]
        self.params, self.buffers = stack_module_state(models)  # name -> (K, ...)
        self.device = next(iter(self.params.values())).device
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay,
                                         fused=self.device.type == "cuda")
        self.mask_params, self.masks = stacked_masks(self.params, masks or [None] * self.k)
        self._losses = vmap(self._loss)
        self._logits = vmap(self._logits_one, in_dims=(0, 0, None))  # one batch, K runs
        if compile_model:
            mode = None if compile_model in (True, "default") else compile_model
            self._losses = torch.compile(self._losses, mode=mode)

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor):
        """One run's loss: x (B, C, H, W), y (B,) -> () (vmapped over the K runs)."""
        return F.cross_entropy(self._logits_one(params, buffers, x).float(), y)

    def step(self, xs: torch.Tensor, ys: torch.Tensor, lr: float | None = None):
        """One SGD step of every run: xs (K, B, C, H, W), ys (K, B) -> losses (K,)."""
        engine.mark_step()  # under CUDA graphs (--compile reduce-overhead): a new step
        with autocast(self.device, self.bf16):
            losses = self._losses(self.params, self.buffers, xs, ys)  # (K,)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # d(sum)/d(run k's weights) = run k's own gradient
        if self.masks:
            torch._foreach_mul_([p.grad for p in self.mask_params], self.masks)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        if self.masks:
            with torch.no_grad():
                torch._foreach_mul_(self.mask_params, self.masks)
        return losses.detach().clone()  # kept past the next step (CUDA graphs reuse outputs)

    @torch.no_grad()
    def evaluate(self, loader) -> list[dict]:
        """Every run's mean cross-entropy and accuracy over an eval loader, in eval mode
        (BN on its running statistics), the images shared: one {"loss", "accuracy"} per
        run, as runs.engines.train.evaluate gives for each alone."""
        was_training = self.base.training
        self.base.eval()
        loss_sum = torch.zeros(self.k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(self.k, device=self.device, dtype=torch.int64)
        for x, y in loader.epoch(0):
            with autocast(self.device, self.bf16):
                logits = self._logits(self.params, self.buffers, x).float()  # (K, B, C)
            per_image = F.cross_entropy(logits.transpose(1, 2), y.expand(self.k, -1),
                                        reduction="none")  # (K, B)
            loss_sum += per_image.sum(1).double()
            correct += (logits.argmax(2) == y).sum(1)
        self.base.train(was_training)
        n = len(loader.y)
        return [{"loss": loss / n, "accuracy": right / n}
                for loss, right in zip(loss_sum.tolist(), correct.tolist())]

    def _logits_one(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        """One run's logits: x (B, C, H, W) -> (B, classes)."""
        return functional_call(self.base, (params, buffers), (x,))

    def load_momentum(self, optimizers: list) -> None:
        """Take each run's momentum buffers from its own SGD (zeros where it has none)."""
        for name, model_params in self._per_model_params():
            buffers = [opt.state.get(p, {}).get("momentum_buffer")
                       for opt, p in zip(optimizers, model_params)]
            if all(b is None for b in buffers):
                continue
            stacked = self.params[name]
            self.optimizer.state[stacked]["momentum_buffer"] = torch.stack(
                [torch.zeros_like(p) if b is None else b for b, p in
                 zip(buffers, model_params)]).to(stacked)

    def write_back(self, optimizers: list | None = None) -> None:
        """Copy the stacked weights and buffers (and momentum, into `optimizers`: each run's
        own SGD over its model's parameters) back into the K models."""
        with torch.no_grad():
            for k, model in enumerate(self.models):
                for name, p in model.named_parameters():
                    p.copy_(self.params[name][k])
                for name, b in model.named_buffers():
                    b.copy_(self.buffers[name][k])
        if optimizers is not None:
            self._write_momentum(optimizers)

    def _write_momentum(self, optimizers: list) -> None:
        for name, model_params in self._per_model_params():
            buf = self.optimizer.state.get(self.params[name], {}).get("momentum_buffer")
            if buf is None:
                continue
            for k, (opt, p) in enumerate(zip(optimizers, model_params)):
                # in the parameter's own layout (channels_last on CUDA): fused SGD steps
                # a parameter and its buffer element by element in memory
                opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf[k])

    def _per_model_params(self):
        """(name, [that parameter of each model]) in the stack's order."""
        named = [dict(m.named_parameters()) for m in self.models]
        return [(name, [n[name] for n in named]) for name in self.params]


def check_same_shapes(models: list[nn.Module]) -> None:
    """Models to stack have the same parameter and buffer names and shapes."""
    if not models:
        raise ValueError("no models to stack")
    first = {n: t.shape for n, t in [*models[0].named_parameters(), *models[0].named_buffers()]}
    for k, model in enumerate(models[1:], 1):
        other = {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]}
        if other != first:
            name = next(n for n in {**first, **other} if first.get(n) != other.get(n))
            raise UserError(f"parallel runs: model {k} differs from model 0 in {name} "
                            f"({tuple(other.get(name, ()))} vs {tuple(first.get(name, ()))})")


def stacked_masks(params: dict, masks: list) -> tuple[list, list]:
    """(stacked parameters, their (K, ...) float masks): every name any run masks; a run
    without a mask for it gets ones."""
    names = sorted({name for m in masks if m for name in m})
    unknown = [n for n in names if n not in params]
    if unknown:
        raise UserError(f"mask names no parameter of the model: {', '.join(unknown[:4])}")
    out = []
    for name in names:
        stacked = params[name]
        out.append(torch.stack([torch.ones_like(stacked[k]) if not m or name not in m else
                                m[name].to(stacked) for k, m in enumerate(masks)]))
    return [params[n] for n in names], out


# ---------------------------------------------------------------------------- run groups


def shape_key(cfg, varying=VARYING) -> tuple:
    """The settings runs trained together share: a config's fields but `varying`."""
    return tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                 if f.name not in varying)


def check_shared(configs: list, varying=VARYING, what: str = "runs") -> None:
    """UserError naming the first setting in which the runs differ (and its values)."""
    first = dict(shape_key(configs[0], varying))
    for cfg in configs[1:]:
        for name, value in shape_key(cfg, varying):
            if value != first[name]:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"--parallel-runs: the {what} differ in {flag} "
                                f"({first[name]!r} vs {value!r}); runs trained together "
                                f"share every setting but {', '.join(varying)}")


def unique(configs: list) -> list:
    """The configs without repeats (IMP's branches share their dense run at level 0)."""
    return list(dict.fromkeys(configs))


def shape_groups(configs: list) -> list[list]:
    """The configs split into groups that share a shape, in first-seen order."""
    groups = {}
    for cfg in configs:
        groups.setdefault(shape_key(cfg), []).append(cfg)
    return list(groups.values())


def fitting_runs(per_run_bytes: int, free_bytes: int, cap: int = MAX_AUTO) -> int:
    """How many runs of `per_run_bytes` fit in 80 % of `free_bytes` (1 to cap)."""
    if per_run_bytes <= 0:
        return 1
    return max(1, min(cap, int(0.8 * free_bytes) // per_run_bytes))


def auto_parallel_runs(cfg, data: tuple, device) -> int:
    """--parallel-runs 0: 1 on the CPU (one run already uses every core), on CUDA as many
    as the memory left holds, by the peak memory of one training step of `cfg`'s model."""
    device = resolve_device(device)
    if device.type != "cuda":
        return 1
    from runs.engines.train import build_model
    info = data[0].info
    model = build_model(dataclasses.replace(cfg, init="", rewind=""), info.num_classes,
                        info.channels)
    return runs_that_fit(model, cfg.batch_size, info, device, copies=3)  # + grad, momentum


def runs_that_fit(model: nn.Module, batch_size: int, info, device, copies: int) -> int:
    """How many runs of `model` the free CUDA memory holds: the peak of one forward and
    backward on a batch of random images, plus `copies` more of its weights each (grads,
    optimiser state, a frozen teacher)."""
    model = model.to(device)
    x = torch.randn(batch_size, info.channels, *info.image_size, device=device)  # (B,C,H,W)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model(x).float().logsumexp(1).mean().backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_run = torch.cuda.max_memory_allocated(device) - before + copies * params
    del model, x
    return fitting_runs(per_run, free_memory(device))


def free_memory(device) -> int:
    """Bytes a new allocation may take on a CUDA device: what the driver has free plus
    what torch's caching allocator holds reserved but unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def parallel_count(requested: int, configs: list, data: tuple, device,
                   auto=auto_parallel_runs) -> int:
    """The runs trained at once: `requested` (0 = auto(configs[0], data, device)), 1 under
    torchrun (each rank is one run's data parallel share)."""
    if requested < 0:
        raise UserError(f"--parallel-runs {requested}: must be >= 1 (0 = auto)")
    if distributed.from_env().active:
        return 1
    if requested == 0:
        return auto(configs[0], data, device) if configs else 1
    return requested


def add_parallel_arg(p, help: str = PARALLEL_HELP) -> None:
    """--parallel-runs K on the commands that train many runs."""
    p.add_argument("--parallel-runs", type=int, default=0, metavar="K", help=help)


def train_many(configs: list, store: str = "store", data: tuple = None, device="auto",
               precision="auto", compile_model=False, parallel_runs: int = 1,
               stop_at: int = None) -> list:
    """Train (or resume, or skip) every config, runs of one shape `parallel_runs` at a time
    (configs of different shapes go to different groups); returns their Runs in order.
    data: the splits of the first config's data (others are loaded as they come);
    compile_model (--compile): the stacked step, and runs trained alone, compiled."""
    from runs.store import Run, run_path
    distinct = unique(configs)
    splits = DataCache(distinct[0] if distinct else None, data)
    runs = [Run(run_path(store, "train", c, c.seed)) for c in configs]
    if not all(run.done for run in runs):
        k = parallel_count(parallel_runs, distinct, splits(distinct[0]), device)
        if parallel_runs > 1:
            note_lone_runs(distinct)
        for group in shape_groups(distinct) if k > 1 else []:
            train_together(group, store, splits(group[0]), device, precision, k, stop_at,
                           compile_model)
    return [run if run.done else finish(c, store, splits(c), device, precision,
                                        compile_model, stop_at)
            for c, run in zip(configs, runs)]


def note_lone_runs(configs: list) -> None:
    """Say so (on stderr) when --parallel-runs was asked for but no two runs share a shape,
    naming the setting that keeps the first two apart: each then trains alone."""
    if len(configs) > 1 and all(len(g) == 1 for g in shape_groups(configs)):
        try:
            check_shared(configs[:2])
        except UserError as err:
            print(f"note: {err}: each trains alone", file=sys.stderr)


class DataCache:
    """The splits of each config's data, loaded once (runs.engines.train.load_data): a
    border's children may come from runs of other data than its template."""

    def __init__(self, cfg=None, data: tuple = None):
        self.loaded = {data_key(cfg): data} if cfg is not None and data else {}

    def __call__(self, cfg) -> tuple:
        from runs.engines.train import load_data
        key = data_key(cfg)
        if key not in self.loaded:
            self.loaded[key] = load_data(cfg)
        return self.loaded[key]


def data_key(cfg) -> tuple:
    """What a config's splits depend on (runs.engines.train.load_data)."""
    return (cfg.dataset, cfg.data_root, cfg.subset, cfg.val_size, cfg.input_stats)


def train_together(configs: list, store: str = "store", data: tuple = None, device="auto",
                   precision="auto", parallel_runs: int = 0, stop_at: int = None,
                   compile_model: bool | str = False) -> list:
    """Train runs that share a shape (else UserError naming the setting), `parallel_runs`
    at a time (0 = auto); returns their Runs. The Python door of --parallel-runs.

    The runs are cut into chunks of `parallel_runs` in the order given, finished runs
    included, so a re-run after a kill trains the same runs together as the first run did
    (and so computes the same numbers)."""
    from runs.engines.train import load_data
    if not configs:
        return []
    check_shared(configs)
    data = data or load_data(configs[0])
    k = parallel_count(parallel_runs, configs, data, device)
    distinct = unique(configs)
    for first in range(0, len(distinct), max(k, 1)):
        chunk = distinct[first:first + k]
        if len(chunk) > 1:
            train_group(chunk, store, data, device, precision, stop_at, compile_model)
    return [finish(c, store, data, device, precision, compile_model, stop_at)
            for c in configs]


def finish(cfg, store, data, device, precision, compile_model, stop_at=None):
    """The run of `cfg` trained (alone) as far as the groups left it: to the end, or to
    `stop_at` where one is given (tests: a kill there)."""
    from runs.engines.train import train
    from runs.store import Run, run_path
    run = Run(run_path(store, "train", cfg, cfg.seed))
    if reached(run, stop_at):
        return run
    return train(cfg, store, data, device, precision, compile_model, stop_at)


def reached(run, stop_at: int = None) -> bool:
    """Whether a run needs no more training: it is done, or (tests' kill at `stop_at`) it
    holds a state at or past that step."""
    if run.done or stop_at is None or not run.path.is_dir():
        return run.done
    latest = engine.latest_state(run)
    return latest is not None and latest[0] >= stop_at


def train_group(configs: list, store: str, data: tuple, device, precision,
                stop_at: int = None, compile_model: bool | str = False) -> None:
    """Open every unfinished run (setup: lock, restore or rewind, step 0 saved), then train
    those that start at one step together, from the newest state they all hold; a run
    alone at its start step is left to runs.train."""
    from runs.engines.train import release, setup
    from runs.store import Run, run_path
    sessions = []
    try:
        for cfg in configs:
            if not Run(run_path(store, "train", cfg, cfg.seed)).done:
                sessions.append(setup(cfg, store, data, device, precision))
        by_start = {}
        for s in sessions:
            if not s.run.done:
                by_start.setdefault(min(s.run.steps()), []).append(s)
        for group in by_start.values():
            if len(group) > 1:
                align_steps(group, restore_session)
                fit_together(group, stop_at, compile_model)
    finally:
        for s in sessions:
            release(s)


prev_path = engine.prev_resume_path  # the resume state kept while a group writes its new one


def saved_states(run) -> dict:
    """step -> checkpoint of every full training state the run holds: its kept steps, its
    resume file and the one before it."""
    from runs.checkpoint import read_checkpoint
    states = {step: run.ckpt_path(step) for step in run.steps()}
    for path in (prev_path(run), engine.resume_path(run)):
        if path.exists():
            states[int(read_checkpoint(path)["step"])] = path
    return states


def align_steps(sessions: list, restore) -> None:
    """Bring runs killed at different steps (between two of a group's saves) back to the
    newest step they all hold, so they go on together as they went before the kill.
    restore(session, checkpoint path): the engine's way to load a full training state."""
    if len({s.step for s in sessions}) == 1:
        return
    held = [saved_states(s.run) for s in sessions]
    common = max(set.intersection(*(set(h) for h in held)))  # the start step at least
    for s, states in zip(sessions, held):
        if s.step != common:
            restore(s, states[common])


def restore_session(s, path) -> None:
    """A runs.train session's state from a checkpoint, as its start_state resumes it."""
    payload = engine.restore(path, s.model, s.optimizer, s.scheduler)
    s.losses = list(payload["extra"].get("losses", torch.empty(0)).to(s.device).unbind())
    s.step = int(payload["step"])
    s.run.trim_metrics(s.step)


def share_images(sessions: list) -> None:
    """One device copy of the training images for all the sessions' loaders."""
    for s in sessions[1:]:
        s.loader.x, s.loader.y = sessions[0].loader.x, sessions[0].loader.y


def share_data(sessions: list) -> None:
    """One device copy of the training and evaluation images for all the sessions."""
    share_images(sessions)
    for s in sessions[1:]:
        s.evals = sessions[0].evals


def fit_together(sessions: list, stop_at: int = None,
                 compile_model: bool | str = False) -> None:
    """The loop of runs.engines.train.fit for K sessions at one step, stacked; ends with
    each run marked DONE (unless stopped at `stop_at`, as a kill there would)."""
    from runs.engines.train import is_eval_step, log_eval, save, summarize
    share_data(sessions)
    first, cfg = sessions[0], sessions[0].cfg
    stack = stack_sessions(sessions, compile_model)
    timer = engine.Timer()
    keeps = [set(s.cfg.save_at) | {cfg.num_steps} for s in sessions]
    label = f"{run_label('train', cfg)} x{len(sessions)} together"
    with engine.progress(cfg.num_steps, first.step, label, True, len(first.loader),
                         cfg.batch_size * len(sessions)) as bar:
        streams = [engine.batches(s.loader, first.step, cfg.num_steps) for s in sessions]
        for batches in zip(*streams):
            step = batches[0][0]
            losses = stack.step(torch.stack([b[1] for b in batches]),
                                torch.stack([b[2] for b in batches]),
                                first.optimizer.param_groups[0]["lr"])
            step_schedules(sessions, losses, step)
            timer.add(len(batches[0][2]) * len(sessions))
            epoch_end = step % len(first.loader) == 0
            evaluate = is_eval_step(first, step)
            saving = [step in keep or epoch_end or step == stop_at for keep in keeps]
            if any(saving):
                stack.write_back([s.optimizer for s in sessions])
            measured = evaluate_all(stack, first.evals) if evaluate else None
            records = []
            for k, (s, keep, saves) in enumerate(zip(sessions, keeps, saving)):
                if saves:
                    engine.check_window(s.losses, step, s.run)
                if evaluate:
                    records.append(log_eval(s, step, s.losses, measured[k]))
                    s.losses = []
                if step in keep:
                    save(s, step, s.run.ckpt_path(step))
                elif saves:
                    save_resume(s, step)
            bar.update(1, epoch_end or evaluate, loss=losses.mean(),
                       test_acc=mean_of(records, "test_accuracy"))
            if step == stop_at:
                return
    for s in sessions:
        s.images_per_second = timer.rate() / len(sessions)
        engine.clear_resume(s.run)
        s.run.mark_done(summarize(s))


def save_resume(s, step: int) -> None:
    """The run's resume state at `step` (runs.train's save), the one before kept."""
    from runs.engines.train import save
    save(s, step, rotate_resume(s.run))


def rotate_resume(run):
    """Keep the run's resume state as resume.prev.pt before a new one is written (a kill
    while the group writes leaves every run a state at the group's previous step);
    returns the path to write the new one to."""
    resume = engine.resume_path(run)
    if resume.exists():
        os.replace(resume, prev_path(run))
    return resume


def evaluate_all(stack: Stack, evals: dict) -> list[dict]:
    """Per run, split -> {"loss", "accuracy"}: every split measured once for all runs."""
    by_split = {name: stack.evaluate(loader) for name, loader in evals.items()}
    return [{name: values[k] for name, values in by_split.items()} for k in range(stack.k)]


def stack_sessions(sessions: list, compile_model: bool | str = False) -> Stack:
    """The sessions' models, masks and momentum as one Stack (their shared SGD settings)."""
    cfg = sessions[0].cfg
    masks = [None if s.mask is None else dict(zip(s.mask.names, s.mask.masks))
             for s in sessions]
    stack = Stack([s.model for s in sessions], cfg.lr, cfg.momentum, cfg.weight_decay,
                  masks, sessions[0].bf16, compile_model)
    stack.load_momentum([s.optimizer for s in sessions])
    return stack


def step_schedules(sessions: list, losses: torch.Tensor, step: int) -> None:
    """After a stacked step: each run's lr schedule steps (its SGD does not: the stack's
    did the work) and its loss joins its window."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": meant
        warnings.simplefilter("ignore", UserWarning)
        for s, loss in zip(sessions, losses.unbind()):
            s.scheduler.step()
            s.losses.append(loss)
            s.step = step


def mean_of(records: list, key: str):
    values = [r[key] for r in records if r and r.get(key) is not None]
    return sum(values) / len(values) if values else None
