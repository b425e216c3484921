"""Progress of long commands, readable in a terminal and in a log file.

In a terminal (stderr is a TTY): a tqdm bar with a readable label (`distill convnet digits
s0 α=1e-10`) and the latest loss and accuracy as postfix; a bar opened inside another one
(border's SGD children, IMP's levels) is cleared when it finishes.
Otherwise (nohup, SLURM, `tee`): plain lines on stderr, at most every LOG_EVERY_S seconds
(override with the environment variable RUNS_LOG_EVERY, in seconds; 0 = every update) and
at every epoch end:
    distill convnet digits s0 α=1e-10: step 120/1950 (epoch 3/50) loss 4.213 knn 0.412
        1234 img/s ETA 12 min 30 s
Values are turned into numbers only when a line or postfix is drawn, so a CUDA loss tensor
passed every step costs no synchronisation in between.

`--log tensorboard|wandb` (runs.train, runs.distill): `open_logger` mirrors the records a
run writes to metrics.jsonl (which stays the record) into <run>/tb/ or an offline wandb run.
"""

import math
import os
import sys
import time

LOG_EVERY_S = 30.0  # seconds between two progress lines in a log (not a TTY)
LOG_EVERY_ENV = "RUNS_LOG_EVERY"
POSTFIX_EVERY_S = 1.0  # seconds between two postfix redraws of a bar (each reads the values)
LOGGERS = ("tensorboard", "wandb")

_depth = 0  # progress reporters open right now: a reporter opened inside another is nested


def log_every() -> float:
    """Seconds between two progress lines: RUNS_LOG_EVERY if set (and a number >= 0)."""
    value = os.environ.get(LOG_EVERY_ENV, "")
    try:
        seconds = float(value)
    except ValueError:
        return LOG_EVERY_S
    return seconds if seconds >= 0 and math.isfinite(seconds) else LOG_EVERY_S


def format_duration(seconds: float) -> str:
    """`12 min 30 s`, `1 h 5 min 0 s`: rounded to whole seconds once, then split (so never
    `4 min 60 s`)."""
    if not math.isfinite(seconds):
        return "?"
    total = max(int(round(seconds)), 0)
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {secs} s" if hours else f"{minutes} min {secs} s"


def format_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def run_label(kind: str, cfg) -> str:
    """`train convnet digits s0`, `distill convnet digits s0 α=1e-10`: what a run trains.

    A data-order seed other than the init seed (SGD children) is shown as `d<seed>`.
    """
    parts = [kind, str(getattr(cfg, "model", "")), str(getattr(cfg, "dataset", "")),
             f"s{getattr(cfg, 'seed', 0)}"]
    data_seed = getattr(cfg, "data_seed", None)
    if data_seed is not None and data_seed != getattr(cfg, "seed", 0):
        parts.append(f"d{data_seed}")
    if getattr(cfg, "alpha", None) is not None:
        parts.append(f"α={cfg.alpha:g}")
    return " ".join(p for p in parts if p)


def is_tty(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _printable(text: str, stream) -> str:
    """`text`, with α spelled `alpha` where the stream cannot encode it (an ASCII locale)."""
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return text
    except (UnicodeEncodeError, LookupError):
        return text.replace("α", "alpha")


def _unknown(value) -> bool:
    """None or a NaN float: not known (yet); the last known value stays shown."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return None if math.isnan(value) else value


class Progress:
    """A progress reporter; use as a context manager.

    total, initial: units of work (steps, points) to do and already done (a resumed run);
    unit: what one is ("step", "point"); per_unit, rate_unit: the rate shown is
    units/s x per_unit in rate_unit/s (a step of 256 images: per_unit=256, rate_unit="img");
    steps_per_epoch: adds `(epoch e/E)` to the lines; show: False = silent (other ranks).
    """

    def __init__(self, total: int, label: str, unit: str = "step", initial: int = 0,
                 per_unit: float = 1, rate_unit: str = None, steps_per_epoch: int = None,
                 show: bool = True):
        self.total, self.label, self.unit, self.done = int(total), label, unit, int(initial)
        self.start_done, self.per_unit = self.done, per_unit
        self.rate_unit = rate_unit or f"{unit}s"
        self.steps_per_epoch, self.show = steps_per_epoch, show
        self.values: dict = {}
        self.bar, self.stream = None, sys.stderr
        self.start = self.last_line = self.last_postfix = time.perf_counter()
        self.every, self.lines_since = log_every(), 0

    def __enter__(self):
        global _depth
        nested = _depth > 0
        _depth += 1
        self.label = _printable(self.label, self.stream)
        if self.show and is_tty(self.stream):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=self.done, desc=self.label,
                            unit=self.unit, dynamic_ncols=True, leave=not nested)
        return self

    def __exit__(self, kind, error, tb):
        global _depth
        _depth -= 1
        if self.bar is not None:
            self.bar.close()
        elif self.show and kind is None and self.start_done < self.done >= self.total:
            self._line(f"done in {format_duration(time.perf_counter() - self.start)}")
        return False

    def update(self, n: int = 1, epoch_end: bool = False, **values) -> None:
        """Advance by n units and note the latest values (floats, 0-d tensors or None = not
        known yet); draws a line when due or at an epoch end."""
        self.done += n
        self.values.update((k, v) for k, v in values.items() if not _unknown(v))
        if not self.show:
            return
        now = time.perf_counter()
        if self.bar is not None:
            if epoch_end or now - self.last_postfix >= POSTFIX_EVERY_S:
                self.bar.set_postfix_str(self.values_text(), refresh=False)
                self.last_postfix = now
            self.bar.update(n)
        elif epoch_end or now - self.last_line >= self.every:
            self._line(self.rate_text(now))

    def values_text(self) -> str:
        numbers = {k: _number(v) for k, v in self.values.items()}
        return " ".join(f"{k} {v:.4g}" for k, v in numbers.items() if v is not None)

    def rate_text(self, now: float) -> str:
        """`1234 img/s ETA 12 min 30 s`, over the work done by this process."""
        elapsed, did = now - self.start, self.done - self.start_done
        if did <= 0 or elapsed <= 0:
            return ""
        rate = did / elapsed  # units/s
        eta = format_duration((self.total - self.done) / rate)
        return f"{format_rate(rate * self.per_unit)} {self.rate_unit}/s ETA {eta}"

    def _line(self, tail: str) -> None:
        where = f"{self.unit} {self.done}/{self.total}"
        if self.steps_per_epoch:
            epochs = -(-self.total // self.steps_per_epoch)
            where += f" (epoch {self.done // self.steps_per_epoch}/{epochs})"
        text = " ".join(t for t in (where, self.values_text(), tail) if t)
        print(f"{self.label}: {text}", file=self.stream, flush=True)
        self.last_line = time.perf_counter()


# ---------------------------------------------------------------------------- --log


def check_logger(name: str | None) -> None:
    """Fail now, in one line, when the backend of `--log NAME` is not installed."""
    if not name:
        return
    if name not in LOGGERS:
        from runs.errors import UserError
        raise UserError(f"--log {name}: unknown; valid: {', '.join(LOGGERS)}")
    _backend(name)


def _backend(name: str):
    from runs.errors import UserError
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        import wandb
        return wandb
    except ImportError:
        raise UserError(f"--log {name}: the {name} package is not installed "
                        f"(pip install {name})") from None


class Logger:
    """Mirrors metric records ({"step": ..., name: number}) into tensorboard or wandb."""

    def __init__(self, name: str, run_dir, config: dict, start_step: int = 0):
        self.name, backend = name, _backend(name)
        if name == "tensorboard":
            # purge_step: a resumed run drops the events past its checkpoint, as metrics do
            self.writer = backend(log_dir=str(run_dir / "tb"), purge_step=start_step or None)
        else:
            self.writer = backend.init(mode="offline", dir=str(run_dir), config=config,
                                       name=f"{run_dir.parent.name}/{run_dir.name}",
                                       id=f"{run_dir.parent.name}-{run_dir.name}",
                                       resume="allow")

    def log(self, record: dict) -> None:
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items() if k != "step" and
                   isinstance(v, (int, float)) and not isinstance(v, bool) and
                   math.isfinite(v)}
        if self.name == "tensorboard":
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        else:
            self.writer.log(scalars, step=step)

    def close(self) -> None:
        if self.name == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


def open_logger(name: str | None, run_dir, config: dict, start_step: int = 0):
    """A Logger for `--log NAME`, or None when NAME is empty."""
    return Logger(name, run_dir, config, start_step) if name else None
