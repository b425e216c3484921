"""Random-teacher distillation: `python -m runs.distill --model resnet18 --dataset cifar10`.

The recipe of "Random Teachers are Good Teachers" (App. E): the teacher is the encoder and
DINO head at random init from a seed, frozen, always in eval mode, BatchNorm statistics
untouched; the student starts at
    theta_S(alpha) = ((1 - alpha) theta_T + alpha theta_fresh) / sqrt(alpha^2 + (1 - alpha)^2)
(parameters only, not buffers) and minimises the cross-entropy between the teacher's and
its own softmax outputs. No labels, no augmentation, no EMA, no centering by default.

The defaults are the code that produced the paper's numbers (runs.recipe.PAPER): alpha 0
(the student equals its teacher at step 0; the gradient there is small but not zero), the
head's last layer raw (--head-last normed: unit rows, as the text describes), the paper's
input statistics (--input-stats dataset: each dataset's own), the last partial batch kept
(--drop-last to drop it). Ablations: --loss mse, --head linear, --init-noise EPS,
--model-option pool=avg (VGG) or shortcut=A (ResNet20/56).
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from runs.checkpoint import module_entry, save_checkpoint, unwrap
from runs.config import arg, check_fields
from runs.data import load_dataset, parse_data_options
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
from runs.errors import UserError, cli, echo_command
from runs.gpu_loader import Augment
from runs.models import MODELS, create_model
from runs.models.base import check_input_size
from runs.models.head import DinoNet, create_head
from runs.progress import open_logger, run_label
from runs.recipe import PAPER
from runs.store import Run, open_run, run_path

STUDENT_SEED_OFFSET = 1_000_003  # fresh student weights: seed + offset, never the teacher's
NOISE_SEED_OFFSET = 2_000_003  # --init-noise draws: seed + offset, apart from both inits
HEADS = ("dino_head", "linear")
HEAD_LASTS = ("raw", "normed")
LOSSES = ("ce", "mse")
LOSS_UNITS = {"ce": ("nats", "distillation cross-entropy H(t, s)"),
              "mse": ("logit^2", "mean squared error of the tempered logits (--loss mse)")}


@dataclass(frozen=True)
class DistillConfig:
    model: str = arg("resnet18", "registry name of the encoder", choices=MODELS.names())
    width: float = arg(1.0, "channel width multiplier (CPU-sized runs use < 1)")
    model_options: tuple[str, ...] = arg((), MODEL_OPTIONS_HELP)
    dataset: str = arg("cifar10", "dataset distilled on (e.g. noise for the random-input "
                                  "control)")
    data_root: str = arg("", "folder (or .npz file) holding the dataset; '' = its default")
    data_options: tuple[str, ...] = arg((), "dataset options as key=value (e.g. "
                                            "shape=3,32,32 count=5000 for noise)")
    input_stats: str = arg(PAPER["input_stats"], INPUT_STATS_HELP, choices=INPUT_STATS)
    subset: int = arg(0, "train images per class, seeded stratified; 0 = all")
    probe_dataset: str = arg("", "dataset for the k-NN probe; '' = --dataset")
    probe_root: str = arg("", "root of --probe-dataset; '' = --data-root")
    seed: int = arg(0, "run seed: the teacher (unless --teacher-seed) and the student")
    teacher_seed: int = arg(-1, "seed of the random teacher; -1 = --seed")
    alpha: float = arg(PAPER["alpha"], "student init: 0 = the teacher (the paper's main "
                                       "figures), 1 = fresh (scaled by delta)")
    init_noise: float = arg(PAPER["init_noise"], "after the alpha mix, add to each student "
                            "tensor Gaussian noise of norm eps * ||teacher tensor|| (an "
                            "epsilon-neighbourhood of the teacher); 0 = none")
    head: str = arg(PAPER["head"], "projection head: dino_head (MLP, L2 bottleneck, last "
                    "layer) or linear (one bias-free Linear embedding -> m)", choices=HEADS)
    head_last: str = arg(PAPER["head_last"], "last head layer: raw (the weight as is, as "
                         "the paper's code) or normed (unit-norm rows, the paper's text)",
                         choices=HEAD_LASTS)
    out_dim: int = arg(65536, "head output dimension m")
    hidden_dim: int = arg(2048, "DINO head hidden width")
    bottleneck_dim: int = arg(256, "DINO head L2 bottleneck width; 0 = no bottleneck")
    loss: str = arg(PAPER["loss"], "ce: cross-entropy between teacher and student softmax "
                    "(the recipe); mse: mean squared error between their (tempered) logits, "
                    "as the paper's code's MSE ablation", choices=LOSSES)
    teacher_temp: float = arg(1.0, "teacher softmax temperature")
    student_temp: float = arg(1.0, "student softmax temperature")
    centering: bool = arg(False, "subtract an EMA centre from teacher logits (DINO)")
    center_momentum: float = arg(0.9, "EMA momentum of the centre")
    num_steps: int = arg(0, "iterations to train (set by --steps)")
    batch_size: int = arg(256, "images per step")
    drop_last: bool = arg(PAPER["drop_last"], DROP_LAST_HELP)
    lr: float = arg(1e-3, "AdamW learning rate (constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    flip: bool = arg(False, "random horizontal flips (off in the paper)")
    crop_padding: int = arg(0, "random crop after zero-padding; 0 = off (as in the paper)")
    save_at: tuple[int, ...] = arg((), "iterations at which to keep checkpoints (set by "
                                       "--save-at; the init and the end are always kept)")
    probe_every: int = arg(0, "k-NN probe of student and teacher every N epochs; 0 = only "
                              "at init and end")
    probe_k: int = arg(20, "neighbours of the k-NN probe (squared L2, majority vote)")

    def __post_init__(self):  # numbers torch would choke on, or silently misuse
        positive = (lambda v: 0 < v < math.inf, "must be a positive number")
        check_model_options(self.model_options)
        check_fields(self, {
            **engine.choice_rules(self),
            "batch_size": (lambda v: v >= 1, "must be at least 1 image"),
            **{name: (lambda v: v >= 1, "must be at least 1") for name in
               ("out_dim", "hidden_dim", "probe_k")},
            "bottleneck_dim": (lambda v: v >= 0, "must be 0 (no bottleneck) or a width"),
            "teacher_temp": positive, "student_temp": positive, "lr": positive,
            "weight_decay": (lambda v: 0 <= v < math.inf, "must be 0 or positive"),
            "center_momentum": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
            "alpha": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
            "init_noise": (lambda v: 0 <= v < math.inf, "must be 0 (none) or a positive "
                                                        "relative size, e.g. 0.01"),
            "crop_padding": (lambda v: v >= 0, "must be 0 (no crop) or a number of pixels"),
            "probe_every": (lambda v: v >= 0, "must be 0 (init and end) or a number of "
                                              "epochs"),
        })


def teacher_seed(cfg: DistillConfig) -> int:
    return cfg.seed if cfg.teacher_seed < 0 else cfg.teacher_seed


def build_pair(cfg: DistillConfig, num_classes: int, channels: int, seed: int):
    """(encoder Classifier, head) with weights drawn from `seed`."""
    model = create_model(cfg.model, num_classes=num_classes, width=cfg.width,
                         in_channels=channels, seed=seed, **model_kwargs(cfg))
    head = create_head(name=cfg.head, in_dim=model.embed_dim, out_dim=cfg.out_dim,
                       hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim, seed=seed,
                       last=cfg.head_last)
    return model, head


@torch.no_grad()
def alpha_init(student: nn.Module, teacher: nn.Module, alpha: float) -> None:
    """In place: student params <- ((1 - a) teacher + a student) / delta; buffers untouched.

    delta = sqrt(a^2 + (1 - a)^2) keeps the variance of the mix equal to the init's when
    the two draws are independent.
    """
    delta = math.sqrt(alpha ** 2 + (1 - alpha) ** 2)
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        p_s.copy_(((1 - alpha) * p_t + alpha * p_s) / delta)


@torch.no_grad()
def add_init_noise(student: nn.Module, teacher: nn.Module, eps: float, seed: int) -> None:
    """In place: each student parameter += g / ||g|| * eps * ||teacher parameter||, g a
    standard Gaussian draw (CPU generator from `seed`); buffers untouched.

    The perturbation of every tensor is exactly eps times its teacher tensor's norm, so the
    student starts in a relative epsilon-neighbourhood of the teacher whatever the layer's
    scale (tensors that are zero in the teacher, e.g. biases, stay unperturbed).
    """
    if eps == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        noise = torch.randn(p_s.shape, generator=gen, dtype=torch.float32)
        scale = eps * p_t.detach().float().norm().cpu() / noise.norm().clamp_min(1e-30)
        p_s.add_((noise * scale).to(p_s.device, p_s.dtype))


def distill_loss(student_logits, teacher_logits, student_temp=1.0, teacher_temp=1.0,
                 center=None, loss: str = "ce") -> dict:
    """The loss minimised, KL = H(t, s) - H(t) and the teacher entropy H(t), batch means.

    loss "ce": the cross-entropy H(t, s) between the softmax outputs (the recipe).
    loss "mse": the squared difference of the tempered (and centred) logits, averaged over
    the m outputs and the batch, as the MSE option of the paper's code (dinopl) computes it;
    the KL and entropy are then logged, not optimised.
    """
    t_logits = (teacher_logits.float() - (center if center is not None else 0.0)) \
        / teacher_temp  # (B, m)
    s_logits = student_logits.float() / student_temp  # (B, m)
    log_t = F.log_softmax(t_logits, dim=-1)
    log_s = F.log_softmax(s_logits, dim=-1)
    p_t = log_t.exp()
    ce = -(p_t * log_s).sum(-1).mean()
    entropy = -(p_t * log_t).sum(-1).mean()
    out = {"loss": ce, "kl": kl_divergence(t_logits, s_logits).mean(),
           "teacher_entropy": entropy}
    if loss == "mse":
        out["loss"] = (s_logits - t_logits).square().mean()
    return out


@torch.no_grad()
def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) per row (..., m) -> (...), accurate where it is tiny.

    In fp32, H(t, s) - H(t) (or sum p (log p - log q)) cancels two numbers near log m and
    is noise below about 1e-7 nats, the size of the raw head's KLs near the teacher. With
    d = t - s the same quantity is E_p[d] - log E_q[exp(d)], whose terms are small when the
    student is near the teacher: 4 digits at 1e-12 (float64 reference). Rows with a large
    logit gap (|d| > 20) take the log-sum-exp form, which cannot overflow. Tempered,
    centred logits in; a diagnostic (no gradient)."""
    d = teacher_logits.float() - student_logits.float()  # (..., m)
    p_t, log_q = F.softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)
    near = d.abs().amax(-1) <= 20  # (...)
    shift = torch.log1p((log_q.exp() * torch.expm1(d.clamp(max=20))).sum(-1))
    far = torch.logsumexp(log_q + d, -1)  # log E_q[exp(d)], exact where shift would overflow
    return (p_t * d).sum(-1) - torch.where(near, shift, far)


@dataclass
class Session:
    cfg: DistillConfig
    run: Run
    student: DinoNet
    forward: nn.Module  # the student, possibly compiled
    teacher: DinoNet
    optimizer: torch.optim.Optimizer
    loader: object
    probe_data: tuple  # (train ImageData, test ImageData) for k-NN
    result: object  # runs.results.Result
    device: torch.device
    bf16: bool
    center: torch.Tensor | None = None
    step: int = 0
    # Running loss sums of the current epoch and their count: saved in every checkpoint, so
    # an epoch resumed mid-way logs the mean over all its steps, not only the resumed ones.
    sums: dict = field(default_factory=dict)
    count: int = 0
    world: distributed.World = distributed.SINGLE  # torchrun ranks; rank 0 writes files
    logger: object = None  # rank 0's runs.progress.Logger of --log tensorboard|wandb, or None


def load_data(cfg: DistillConfig):
    """(train data to distil on, (probe train, probe test))."""
    options = parse_data_options(cfg.data_options)
    train = load_dataset(cfg.dataset, root=cfg.data_root or None, split="train",
                         subset=cfg.subset or None, stats=cfg.input_stats, **options)
    name = cfg.probe_dataset or cfg.dataset
    root = cfg.probe_root or cfg.data_root or None
    probe_options = options if name == cfg.dataset else {}
    probe = tuple(load_dataset(name, root=root, split=split, stats=cfg.input_stats,
                               **probe_options)
                  for split in ("train", "test"))
    if probe[0].x.shape[1:] != train.x.shape[1:]:
        raise UserError(f"--probe-dataset {name} has images {tuple(probe[0].x.shape[1:])}, "
                        f"the distillation data {tuple(train.x.shape[1:])}; they must match")
    return train, probe


def num_epochs(cfg: DistillConfig, steps_per_epoch: int) -> int:
    return -(-cfg.num_steps // steps_per_epoch)


def open_result(cfg: DistillConfig, run: Run, steps_per_epoch: int, device,
                train_images: int):
    from runs.results import MetricSpec, create_result
    epochs = list(range(num_epochs(cfg, steps_per_epoch) + 1))
    metrics = {
        "knn_accuracy": MetricSpec(("epoch", "model"), "fraction",
                                   f"k-NN accuracy (k={cfg.probe_k}, squared L2, majority)"),
        "loss": MetricSpec(("epoch",), *LOSS_UNITS[cfg.loss]),
        "kl": MetricSpec(("epoch",), "nats", "KL(teacher || student)"),
        "teacher_entropy": MetricSpec(("epoch",), "nats", "entropy of teacher outputs"),
    }
    return create_result(run.path / "distill.h5", "distill",
                         {"epoch": epochs, "model": ["teacher", "student"]}, metrics,
                         ("epoch",), dataclasses.asdict(cfg), [], str(device),
                         attrs={"steps_per_epoch": steps_per_epoch,
                                "train_images": train_images})


def setup(cfg: DistillConfig, store: str, data=None, device="auto", precision="auto",
          compile_model=False) -> Session:
    if cfg.num_steps < 1:
        raise UserError(f"--steps must be at least 1 iteration (got {cfg.num_steps})")
    if not 0 <= cfg.alpha <= 1:
        raise UserError(f"--alpha {cfg.alpha}: must lie in [0, 1]")
    world, device = distributed.start(resolve_device(device))
    train, probe = data or load_data(cfg)
    info = train.info
    teacher = DinoNet(*build_pair(cfg, info.num_classes, info.channels, teacher_seed(cfg)))
    student = DinoNet(*build_pair(cfg, info.num_classes, info.channels,
                                  cfg.seed + STUDENT_SEED_OFFSET))
    check_input_size(student.model, info.channels, info.image_size)
    alpha_init(student, teacher, cfg.alpha)
    add_init_noise(student, teacher, cfg.init_noise, cfg.seed + NOISE_SEED_OFFSET)
    engine.prepare(teacher.requires_grad_(False).eval(), device)  # channels_last on CUDA
    student.model.fc.requires_grad_(False)  # never in the loss: DDP must not wait for it
    loader = engine.train_loader(train, cfg.batch_size, device, cfg.seed,
                                 Augment(cfg.flip, cfg.crop_padding), world, cfg.drop_last)
    run = open_run(store, "distill", cfg, extra={"steps_per_epoch": len(loader),
                                                 "model_spec": student.model.spec,
                                                 "init_step": 0,
                                                 "data_inputs": engine.run_data(cfg)})
    forward = engine.prepare(student, device, compile_model, world)
    params = [*student.model.encoder.parameters(), *student.head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    result = open_result(cfg, run, len(loader), device, len(train.y)) if world.main else None
    s = Session(cfg, run, student, forward, teacher, optimizer, loader, probe, result, device,
                use_bf16(device, precision), world=world)
    s.center = torch.zeros(cfg.out_dim, device=device) if cfg.centering else None
    try:
        s.step = start_state(s)
    except BaseException:
        if result is not None:
            result.close()  # release the result's write lock before the error travels on
        raise
    return s


def start_state(s: Session) -> int:
    latest = engine.latest_state(s.run)
    distributed.barrier(s.world)  # every rank has looked before rank 0 writes step 0
    if latest is None:
        save(s, 0, s.run.ckpt_path(0))
        return 0
    step, path = latest
    payload = engine.restore(path, s.student.model, s.optimizer, modules={"head": s.student.head})
    if s.center is not None:
        s.center.copy_(payload["extra"]["center"])
    s.sums = {k: v.to(s.device) for k, v in payload["extra"].get("epoch_sums", {}).items()}
    s.count = payload["extra"].get("epoch_count", 0)
    if s.world.main:
        s.run.trim_metrics(step)
    return step


def save(s: Session, step: int, path) -> None:
    if not s.world.main:
        return
    s.run.require()  # its folder deleted mid-run: one line, no record-less run folder
    modules = {"head": module_entry(s.student.head),
               # The teacher is rebuilt from its seed: it never changes (checked by tests).
               "teacher": module_entry(s.teacher.model, with_state=False),
               "teacher_head": module_entry(s.teacher.head, with_state=False)}
    extra = {"kind": "distill", "steps_per_epoch": len(s.loader), "epoch_count": s.count,
             "epoch_sums": {k: v.cpu() for k, v in s.sums.items()}}
    if s.center is not None:
        extra["center"] = s.center.cpu()
    save_checkpoint(path, unwrap(s.student).model, step, config=dataclasses.asdict(s.cfg),
                    optimizer=s.optimizer, modules=modules, extra=extra)


def distill_step(s: Session, x: torch.Tensor) -> dict:
    engine.mark_step()
    with torch.no_grad(), autocast(s.device, s.bf16):
        teacher_logits = s.teacher(x)  # (B, m), eval mode: BN uses its default statistics
    with autocast(s.device, s.bf16):
        student_logits = s.forward(x)  # (B, m), train mode
    out = distill_loss(student_logits, teacher_logits, s.cfg.student_temp, s.cfg.teacher_temp,
                       s.center, s.cfg.loss)
    s.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    s.optimizer.step()
    if s.center is not None:
        batch_center = distributed.mean(teacher_logits.float().mean(0), s.world)
        s.center.mul_(s.cfg.center_momentum).add_(batch_center, alpha=1 - s.cfg.center_momentum)
    return {k: v.detach() for k, v in out.items()}


def knn_of(s: Session, encoder: nn.Module) -> float:
    """k-NN accuracy (paper variant) of an encoder's embeddings on the probe dataset."""
    from probes.features import extract_features  # runtime import: probes uses only the base
    from probes.nearest import knn_accuracy
    train, test = s.probe_data
    feats = [extract_features(encoder, d.x, d.info.mean, d.info.std, device=s.device)
             for d in (train, test)]
    return knn_accuracy(feats[0], train.y.to(s.device), feats[1], test.y.to(s.device),
                        k=s.cfg.probe_k, metric="l2", name=str(s.run.path))


def probe_now(s: Session, epoch: int, last_epoch: int) -> dict:
    """{"teacher": acc, "student": acc} at probe epochs (init and end always), else NaN."""
    every = s.cfg.probe_every
    probed = epoch in (0, last_epoch) or (every > 0 and epoch % every == 0)
    if not (probed and s.world.main):
        return {"teacher": math.nan, "student": math.nan}
    if getattr(s, "teacher_knn", None) is None:
        s.teacher_knn = knn_of(s, s.teacher.model.encoder)  # constant: the teacher is frozen
    return {"teacher": s.teacher_knn, "student": knn_of(s, unwrap(s.student).model.encoder)}


def close_epoch(s: Session, epoch: int, sums: dict, count: int, knn: dict) -> None:
    """Write one epoch's means (averaged over ranks) and probe accuracies (rank 0)."""
    means = {k: distributed.mean(v / count, s.world).item() for k, v in sums.items()}
    if not s.world.main:
        return
    s.result.write({"epoch": epoch}, knn_accuracy=[knn["teacher"], knn["student"]], **means)
    record = {"step": s.step, "epoch": epoch, **means,
              **{f"knn_{k}": (None if math.isnan(v) else v) for k, v in knn.items()}}
    s.run.log(record)
    if s.logger is not None:
        s.logger.log({**record, "lr": s.optimizer.param_groups[0]["lr"]})


def fit(s: Session, stop_at: int = None) -> None:
    per_epoch, last_epoch = len(s.loader), num_epochs(s.cfg, len(s.loader))
    keep = set(s.cfg.save_at) | {s.cfg.num_steps}
    init_knn = probe_now(s, 0, last_epoch) if s.step == 0 else None
    window = []
    label = run_label("distill", s.cfg)
    with engine.progress(s.cfg.num_steps, s.step, label, s.world.main, per_epoch,
                         s.cfg.batch_size) as bar:
        for step, x, _ in engine.batches(s.loader, s.step, s.cfg.num_steps):
            out = distill_step(s, x)
            s.step = step
            window.append(out["loss"])
            s.sums = {k: s.sums.get(k, 0) + v for k, v in out.items()}
            s.count += 1
            knn = {}  # this step's probe accuracies, shown by the progress line
            if init_knn is not None:  # epoch 0: the first batch's losses at init
                close_epoch(s, 0, out, 1, init_knn)
                knn, init_knn = init_knn, None
            epoch_end = step % per_epoch == 0 or step == s.cfg.num_steps
            if epoch_end or step in keep or step == stop_at:
                engine.check_window(window, step, s.run, s.world)
                window = []
            if epoch_end:
                epoch = -(-step // per_epoch)
                knn = probe_now(s, epoch, last_epoch)
                close_epoch(s, epoch, s.sums, s.count, knn)
                s.sums, s.count = {}, 0
            bar.update(1, epoch_end, loss=out["loss"], kl=out["kl"], knn=knn.get("student"))
            if step in keep:
                save(s, step, s.run.ckpt_path(step))
            elif epoch_end or step == stop_at:
                save(s, step, engine.resume_path(s.run))
            if step == stop_at:
                return


def distill(cfg: DistillConfig, store: str = "store", data=None, device="auto",
            precision="auto", compile_model=False, stop_at: int = None,
            log: str = None) -> Run:
    """Distil (or resume, or skip if done) the run `cfg` names in `store`; `log`:
    "tensorboard" or "wandb" mirrors metrics.jsonl there too (runs.progress)."""
    done = Run(run_path(store, "distill", cfg, cfg.seed))
    if done.done:
        return done
    s = setup(cfg, store, data, device, precision, compile_model)
    try:
        if log and s.world.main:
            s.logger = open_logger(log, s.run.path, dataclasses.asdict(cfg), s.step)
        fit(s, stop_at)
    finally:
        if s.logger is not None:
            s.logger.close()
        if s.result is not None:
            s.result.close()
    if s.step < cfg.num_steps:
        return s.run
    if s.world.main:
        engine.clear_resume(s.run)
        s.run.mark_done(summarize(s.run))
    distributed.barrier(s.world)  # no rank returns before DONE exists
    return s.run


def distill_with_steps(cfg: DistillConfig, steps: str, save_at=(), store: str = "store",
                       device="auto") -> Run:
    """`distill` with '100ep'-style --steps and --save-at, resolved once the data is loaded."""
    data = load_data(cfg)
    cfg = engine.config_with_steps(cfg, steps, save_at, engine.epoch_steps(cfg, data[0]))
    return distill(cfg, store, data, device)


def summarize(run: Run) -> dict:
    probed = [r for r in run.metrics() if r.get("knn_student") is not None]
    if not probed:
        return {}
    last = probed[-1]
    return {"step": last["step"], "epoch": last["epoch"], "knn_teacher": last["knn_teacher"],
            "knn_student": last["knn_student"], "loss": last["loss"], "kl": last["kl"],
            "knn_student_init": probed[0]["knn_student"]}


HELP = """Distil a student into a frozen random teacher (Sarnthein et al. 2023, App. E).
Runs live in STORE/distill_<hash>/seed_<seed>/ with checkpoints (the init and the end always),
metrics.jsonl and distill.h5 (k-NN accuracy of teacher and student per probed epoch, loss,
KL, teacher entropy). Re-running the same command resumes or skips finished work."""


EXAMPLES = r"""examples:
  python -m runs.distill --model vgg11 --dataset cifar10 --data-root ~/data --steps 100ep \
      --save-at 1ep 10ep 50ep --probe-every 5
  python -m runs.distill --model vgg11 --dataset noise --data-options shape=3,32,32 \
      --probe-dataset cifar10 --probe-root ~/data       # the random-input control
  python -m runs.distill --model vgg11 --dataset cifar10 --data-root ~/data --steps 100ep \
      --head-last normed --model-option pool=avg   # variants: the text's head, avg pool
  python -m runs.distill --model convnet --width 0.25 --dataset digits --steps 2ep \
      --out-dim 256 --device cpu"""


def parser():
    return engine.training_parser("python -m runs.distill", HELP, DistillConfig, "100ep", "19500",
                                   EXAMPLES)


@cli
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    echo_command("runs.distill", argv)
    run = engine.run_from_args(DistillConfig, args, load_data, distill)
    if run is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    summary = run.summary()
    teacher, init, last = (engine.fmt_pct(summary.get(key)) for key in
                           ("knn_teacher", "knn_student_init", "knn_student"))
    print(f"distill {run.path}: k-NN teacher {teacher}, student {init} at init -> {last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
