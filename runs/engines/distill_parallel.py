"""K random-teacher distillations trained at once: stacked parameters under torch.func.

The distillation counterpart of runs.engines.parallel: the seeds of one study (or its alpha
and init-noise variants) are K runs of one shape. Their students (encoder + DINO head) and
their frozen teachers are stacked along a new leading dim (`stack_module_state`) and called
through `vmap(functional_call)`, the teachers under no_grad in eval mode. Each run keeps its:

  - weights, student BN running statistics, AdamW moments: one AdamW over the stacked
    tensors is K AdamWs, its update (weight decay included) being elementwise and its step
    count shared (runs trained together start and step together); the recipe clips no
    gradient, so nothing couples the runs;
  - centre (a (K, m) EMA of each run's own teacher logits, with --centering);
  - data order (its own GPULoader seeded by its seed; one device copy of the images);
  - k-NN probes, metrics, checkpoints and DONE, written by runs.engines.distill's own
    functions after the stacked state is copied back into its session.

Everything but VARYING (what only changes the initial weights, and the kept steps) is shared;
`check_shared` names the first setting that differs. A kill resumes like the supervised
groups: resume.pt and resume.prev.pt, the group brought back to the newest step all its runs
hold, so a re-run writes the files an uninterrupted group writes, bit for bit on the CPU.
Together and alone agree to float32 rounding (a grouped convolution sums in another order).
"""


import torch
from torch.func import functional_call, stack_module_state, vmap

from runs.device import autocast, resolve_device
from runs.engines import engine
from runs.engines import parallel as sup
from runs.errors import UserError
from runs.progress import run_label

# What K distillations trained together may differ in; every other DistillConfig field is
# shared (architecture, head, loss, data, batch, lr, length, probes).
VARYING = ("seed", "teacher_seed", "alpha", "init_noise", "save_at")
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state (amsgrad off)


class DistillStack:
    """The K sessions' students and teachers as stacked tensors; one AdamW, K centres."""

    def __init__(self, sessions: list):
        first = sessions[0]
        self.sessions, self.k, self.cfg = sessions, len(sessions), first.cfg
        self.device, self.bf16 = first.device, first.bf16
        sup.check_same_shapes([s.student for s in sessions])
        self.student, self.teacher = first.student, first.teacher  # the functional_call bases
        self.params, self.buffers = stack_module_state([s.student for s in sessions])
        self.t_params, self.t_buffers = stack_module_state([s.teacher for s in sessions])
        self.names = trained_names(first)  # the order of each run's own AdamW
        group = first.optimizer.param_groups[0]
        self.optimizer = torch.optim.AdamW([self.params[n] for n in self.names], lr=group["lr"],
                                           betas=group["betas"], eps=group["eps"],
                                           weight_decay=group["weight_decay"],
                                           fused=self.device.type == "cuda")
        self.load_moments()
        self.center = (torch.stack([s.center for s in sessions]) if first.center is not None
                       else None)  # (K, m)
        self._teachers = vmap(self._teacher)
        self._losses = vmap(self._loss, in_dims=(0, 0, 0, 0, 0 if self.center is not None
                                                 else None))

    def _teacher(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        """One run's teacher logits: x (B, C, H, W) -> (B, m)."""
        return functional_call(self.teacher, (params, buffers), (x,))

    def _loss(self, params, buffers, x, teacher_logits, center) -> dict:
        """One run's distill_loss dict (loss, kl, teacher_entropy), each () (vmapped)."""
        from runs.engines.distill import distill_loss
        student_logits = functional_call(self.student, (params, buffers), (x,))  # (B, m)
        return distill_loss(student_logits, teacher_logits, self.cfg.student_temp,
                            self.cfg.teacher_temp, center, self.cfg.loss)

    def step(self, xs: torch.Tensor) -> dict:
        """One AdamW step of every run: xs (K, B, C, H, W) -> {name: (K,)} detached."""
        engine.mark_step()
        with torch.no_grad(), autocast(self.device, self.bf16):
            teacher_logits = self._teachers(self.t_params, self.t_buffers, xs)  # (K, B, m)
        with autocast(self.device, self.bf16):
            out = self._losses(self.params, self.buffers, xs, teacher_logits, self.center)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].sum().backward()  # d(sum)/d(run k's weights) = run k's own gradient
        self.optimizer.step()
        if self.center is not None:
            momentum = self.cfg.center_momentum
            batch_center = teacher_logits.float().mean(1)  # (K, m)
            self.center.mul_(momentum).add_(batch_center, alpha=1 - momentum)
        return {k: v.detach().clone() for k, v in out.items()}  # outlive the next step

    def load_moments(self) -> None:
        """The stacked AdamW's state from each run's own (none before the first step)."""
        states = [s.optimizer.state_dict()["state"] for s in self.sessions]
        if not states[0]:
            return
        steps = {float(st[i]["step"]) for st in states for i in st}
        if len(steps) != 1:
            raise UserError(f"distill --parallel-runs: runs at AdamW steps {sorted(steps)} "
                            f"cannot step together")
        merged = {i: {"step": states[0][i]["step"].clone(),
                      **{m: torch.stack([st[i][m] for st in states]) for m in MOMENTS}}
                  for i in states[0]}
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": merged, "param_groups": groups})

    def write_back(self) -> None:
        """Copy the stacked weights, buffers, AdamW moments and centres into the sessions."""
        with torch.no_grad():
            for k, s in enumerate(self.sessions):
                for name, p in s.student.named_parameters():
                    p.copy_(self.params[name][k])
                for name, b in s.student.named_buffers():
                    b.copy_(self.buffers[name][k])
                if self.center is not None:
                    s.center.copy_(self.center[k])
        state = self.optimizer.state_dict()["state"]
        for k, s in enumerate(self.sessions):
            own = {i: {"step": st["step"].clone(), **{m: st[m][k].clone() for m in MOMENTS}}
                   for i, st in state.items()}
            groups = s.optimizer.state_dict()["param_groups"]
            s.optimizer.load_state_dict({"state": own, "param_groups": groups})


def trained_names(s) -> list[str]:
    """The student's parameter names in its AdamW's order (encoder, then head; fc unused)."""
    names = {id(p): n for n, p in s.student.named_parameters()}
    return [names[id(p)] for group in s.optimizer.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------- run groups


def check_shared(configs: list) -> None:
    """UserError naming the first setting in which the distillations differ."""
    sup.check_shared(configs, VARYING, "distillations")


def run_of(cfg, store):
    from runs.store import Run, run_path
    return Run(run_path(store, "distill", cfg, cfg.seed))


def auto_parallel_runs(cfg, data: tuple, device) -> int:
    """As many runs as the free CUDA memory holds, by the peak of one run's step (student
    forward and backward, teacher forward) plus its weights, grads, moments and teacher."""
    from runs.engines.distill import STUDENT_SEED_OFFSET, build_pair
    from runs.models.head import DinoNet
    device = resolve_device(device)
    if device.type != "cuda":
        return 1
    info = data[0].info
    student = DinoNet(*build_pair(cfg, info.num_classes, info.channels, STUDENT_SEED_OFFSET))
    # + grads, two AdamW moments, the teacher and its head
    return sup.runs_that_fit(student, cfg.batch_size, info, device, copies=5)


def distill_together(configs: list, store: str = "store", data=None, device="auto",
                     precision="auto", parallel_runs: int = 0, stop_at: int = None) -> list:
    """Distil (or resume, or skip) runs that share a shape (else UserError naming the
    setting), `parallel_runs` at a time (0 = auto); returns their Runs in order.

    Chunks of `parallel_runs` are cut in the order given, finished runs included, so a
    re-run after a kill trains the same runs together as the first run did."""
    from runs.engines.distill import load_data
    if not configs:
        return []
    check_shared(configs)
    distinct = sup.unique(configs)
    if any(not run_of(c, store).done for c in distinct):
        data = data or load_data(configs[0])
        k = max(sup.parallel_count(parallel_runs, distinct, data, device,
                                   auto_parallel_runs), 1)
        for first in range(0, len(distinct), k):
            chunk = distinct[first:first + k]
            if len(chunk) > 1:
                distill_group(chunk, store, data, device, precision, stop_at)
    return [finish(c, store, data, device, precision, stop_at) for c in configs]


def finish(cfg, store, data, device, precision, stop_at=None):
    """The run of `cfg` distilled (alone) as far as the groups left it: to the end, or to
    `stop_at` where one is given (tests: a kill there)."""
    from runs.engines.distill import distill
    run = run_of(cfg, store)
    if sup.reached(run, stop_at):
        return run
    return distill(cfg, store, data, device, precision, stop_at=stop_at)


def distill_group(configs: list, store: str, data, device, precision,
                  stop_at: int = None) -> None:
    """Open every unfinished run (setup: its folder, its state restored or step 0 saved),
    bring them to the newest step all hold, and distil them together."""
    from runs.engines.distill import setup
    sessions = []
    try:
        for cfg in configs:
            if not run_of(cfg, store).done:
                sessions.append(setup(cfg, store, data, device, precision))
        if len(sessions) > 1:
            sup.align_steps(sessions, restore_state)
            fit_together(sessions, stop_at)
    finally:
        for s in sessions:
            if s.result is not None:
                s.result.close()


def restore_state(s, path) -> None:
    """The session's training state from a checkpoint, as distill.start_state loads it."""
    payload = engine.restore(path, s.student.model, s.optimizer,
                             modules={"head": s.student.head})
    if s.center is not None:
        s.center.copy_(payload["extra"]["center"])
    s.sums = {k: v.to(s.device) for k, v in payload["extra"].get("epoch_sums", {}).items()}
    s.count = payload["extra"].get("epoch_count", 0)
    s.step = int(payload["step"])
    s.run.trim_metrics(s.step)


def save_resume(s, step: int) -> None:
    """The run's resume state at `step` (runs.distill's save), the one before kept."""
    from runs.engines.distill import save
    save(s, step, sup.rotate_resume(s.run))


def fit_together(sessions: list, stop_at: int = None) -> None:
    """The loop of runs.engines.distill.fit for K sessions at one step, stacked; ends with
    each run marked DONE (unless stopped at `stop_at`, as a kill there would)."""
    from runs.engines.distill import num_epochs, probe_now
    sup.share_images(sessions)  # the probe data is one tuple already
    first, cfg = sessions[0], sessions[0].cfg
    per_epoch, last_epoch = len(first.loader), num_epochs(cfg, len(first.loader))
    stack = DistillStack(sessions)
    keeps = [set(s.cfg.save_at) | {cfg.num_steps} for s in sessions]
    init_knn = ([probe_now(s, 0, last_epoch) for s in sessions] if first.step == 0
                else None)
    windows = [[] for _ in sessions]
    label = f"{run_label('distill', cfg)} x{len(sessions)} together"
    with engine.progress(cfg.num_steps, first.step, label, True, per_epoch,
                         cfg.batch_size * len(sessions)) as bar:
        streams = [engine.batches(s.loader, first.step, cfg.num_steps) for s in sessions]
        for batches in zip(*streams):
            step = batches[0][0]
            out = stack.step(torch.stack([b[1] for b in batches]))  # {name: (K,)}
            outs = [{k: v[i].clone() for k, v in out.items()} for i in range(len(sessions))]
            for s, own, window in zip(sessions, outs, windows):
                s.step = step
                window.append(own["loss"])
                s.sums = {k: s.sums.get(k, 0) + v for k, v in own.items()}
                s.count += 1
            if init_knn is not None:  # epoch 0: the first batch's losses at init
                close_all(sessions, 0, outs, [1] * len(sessions), init_knn)
                init_knn = None
            epoch_end = step % per_epoch == 0 or step == cfg.num_steps
            saving = [step in keep or epoch_end or step == stop_at for keep in keeps]
            if any(saving):
                stack.write_back()
            for s, window, saves in zip(sessions, windows, saving):
                if saves:
                    engine.check_window(window, step, s.run)
                    window.clear()
            knn = [{}] * len(sessions)
            if epoch_end:
                epoch = -(-step // per_epoch)
                knn = [probe_now(s, epoch, last_epoch) for s in sessions]
                close_all(sessions, epoch, [s.sums for s in sessions],
                          [s.count for s in sessions], knn)
                for s in sessions:
                    s.sums, s.count = {}, 0
            bar.update(1, epoch_end, loss=out["loss"].mean(), knn=mean_knn(knn))
            save_all(sessions, keeps, saving, step)
            if step == stop_at:
                return
    mark_done(sessions)


def close_all(sessions, epoch, sums, counts, knn) -> None:
    from runs.engines.distill import close_epoch
    for s, own, count, accuracy in zip(sessions, sums, counts, knn):
        close_epoch(s, epoch, own, count, accuracy)


def save_all(sessions, keeps, saving, step) -> None:
    """Each run's kept checkpoint at its save_at steps, else its resume state where due."""
    from runs.engines.distill import save
    for s, keep, saves in zip(sessions, keeps, saving):
        if step in keep:
            save(s, step, s.run.ckpt_path(step))
        elif saves:
            save_resume(s, step)


def mark_done(sessions) -> None:
    from runs.engines.distill import summarize
    for s in sessions:
        engine.clear_resume(s.run)
        s.run.mark_done(summarize(s.run))


def mean_knn(knn: list):
    values = [k["student"] for k in knn if k and k.get("student") == k.get("student")]
    return sum(values) / len(values) if values else None
