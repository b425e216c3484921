"""The runs package from Python: load any checkpoint reference, train and distil into a store.

    import runs
    result = runs.run_train(model="convnet", data="digits", steps="2ep", width=0.25,
                            batch_size=64, device="cpu")
    result.path, result.summary          # the run folder, its DONE summary
    model = result.model()               # nn.Module at the last step, CPU, eval mode
    student = runs.load("store/distill_ab12cd34/seed_0@last", head=True)

`run_train` and `run_distill` go through the same function as `python -m runs.train` and
`python -m runs.distill` (runs.engines.engine.run_config): the same settings give the same run
folder and the same checkpoints, and a finished run is skipped, an unfinished one resumed.
"""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runs.errors import UserError
from runs.models.head import DinoNet
from runs.store import Run

__all__ = ["RunResult", "load", "run_distill", "run_train", "run_train_many"]


def load(ref, part: str = None, head: bool = False) -> nn.Module:
    """The model a checkpoint reference names, on the CPU, in eval mode.

    ref: anything the CLIs take (`RUN@last`, `RUN@init:teacher`, `resnet18=FILE`,
    `dinopl=FILE:student`, a checkpoint file), a path, a `runs.store.Run` or a `RunResult`.
    part: "encoder", "student" or "teacher", the same as a `:PART` suffix.
    head: for distillation references, the encoder with its DINO head (the student's, or
    the teacher's for part "teacher"): a module with `.model`, `.encoder` and `.head` whose
    forward gives the head's logits (B, out_dim).
    """
    from runs.refs import PARTS, load_head, load_model
    text = _ref_text(ref)
    if part is not None:
        if part not in PARTS:
            raise UserError(f"part {part!r}; valid: {', '.join(PARTS)}")
        if not text.endswith(f":{part}") and f":{part}:" not in text:
            text = f"{text}:{part}"
    loaded = load_model(text)
    model = loaded.model
    if head:
        model = DinoNet(model, load_head(text, loaded.payload))
    return model.cpu().eval()


def _ref_text(ref) -> str:
    if isinstance(ref, RunResult | Run):
        return str(ref.path)
    if isinstance(ref, str | os.PathLike):
        return os.fspath(ref)
    raise UserError(f"cannot load {type(ref).__name__}: give a checkpoint reference "
                    f"(e.g. store/train_ab12cd34/seed_0@last), a path or a run")


@dataclass(frozen=True)
class RunResult:
    """A finished (or resumed-and-finished) run of the store."""
    path: str  # the run folder, STORE/<kind>_<hash>/seed_<s>
    run: Run
    summary: dict  # what DONE records (test accuracy, k-NN accuracies, ...)

    def load(self, part: str = None, step="last", head: bool = False) -> nn.Module:
        """The run's model at `step` ("last", "init", iterations or "Nep"); see runs.load."""
        return load(f"{self.path}@{step}", part=part, head=head)

    def model(self, step="last", part: str = None, head: bool = False) -> nn.Module:
        return self.load(part=part, step=step, head=head)


def run_train(model: str = "convnet", data="digits", store="store", steps="10ep",
              seed: int = 0, device: str = "auto", save_at=(), precision: str = "auto",
              compile_model=None, test=None, log: str = None, **fields) -> RunResult:
    """Supervised training into `store`, as `python -m runs.train` does.

    model: a registry name or "pkg.mod:factory" (imported: you named it). data: a dataset
    name (TrainConfig.dataset), or uint8 training images as a pair (images, labels), a
    torch Dataset or ImageData, with `test` the test split (default: the same images):
    these are stored once in STORE/data/ as an .npz named by its content's sha256, which
    the run's config names, so a run can always be rebuilt and two different data sets
    never share a run. steps, save_at: iterations or epochs ("10ep"). log: "tensorboard" or
    "wandb" mirrors the metrics there (as --log; not part of the run). fields: any
    other TrainConfig field (width=0.25, batch_size=64, lr=0.05, ...); unknown ones are a
    UserError listing the valid ones. Returns None on torchrun ranks other than 0.
    """
    from runs.engines.train import TrainConfig, load_data, train
    return _run(TrainConfig, load_data, _logged(train, log), model, data, test, store, steps,
                seed, device, save_at, precision, compile_model, fields)


def run_train_many(model: str = "convnet", data="digits", store="store", steps="10ep",
                   seeds=(0,), data_seeds=None, masks=None, device: str = "auto", save_at=(),
                   precision: str = "auto", parallel_runs: int = 0, test=None,
                   **fields) -> list[RunResult]:
    """Several supervised runs of one shape trained together (as --parallel-runs does):
    run i has init seed seeds[i], data-order seed data_seeds[i] (default: its seed) and
    mask file masks[i] (default none); everything else as `run_train`. They train
    `parallel_runs` at a time (0 = auto: by memory on CUDA, 1 on the CPU) as stacked
    parameters under torch.func (runs.engines.parallel), each its own optimiser, BN
    statistics, data order and mask; each is an ordinary run of the store, the same as
    `run_train` with its seeds would make. Returns one RunResult per run, in order."""
    from runs.config import from_dict
    from runs.engines import engine
    from runs.engines.parallel import train_together
    from runs.engines.train import TrainConfig, load_data
    seeds = list(seeds)
    data_seeds = seeds if data_seeds is None else list(data_seeds)
    masks = [""] * len(seeds) if masks is None else [str(m) for m in masks]
    if not len(seeds) == len(data_seeds) == len(masks):
        raise UserError(f"run_train_many: {len(seeds)} seeds, {len(data_seeds)} data_seeds "
                        f"and {len(masks)} masks; give one of each per run")
    if "dataset" in fields:
        raise UserError("give the dataset as data=..., not dataset=...")
    values = {**fields, "model": model, **_data(data, test, store), "num_steps": 0,
              "save_at": ()}
    base, splits = engine.config_and_data(from_dict(TrainConfig, values), str(steps),
                                          [str(s) for s in _steps(save_at)], load_data)
    configs = [dataclasses.replace(base, seed=s, data_seed=d, mask=m)
               for s, d, m in zip(seeds, data_seeds, masks)]
    runs = train_together(configs, str(store), splits, device, precision, parallel_runs)
    return [RunResult(str(run.path), run, run.summary()) for run in runs]


def _steps(save_at) -> tuple:
    return (save_at,) if isinstance(save_at, str | int) else tuple(save_at)


def run_distill(model: str = "convnet", data="digits", store="store", steps="10ep",
                seed: int = 0, device: str = "auto", save_at=(), precision: str = "auto",
                compile_model=None, test=None, log: str = None, **fields) -> RunResult:
    """Random-teacher distillation into `store`, as `python -m runs.distill` does.

    Arguments as `run_train`; fields are DistillConfig fields (alpha=0.5, out_dim=256,
    teacher_seed=7, data_options=("side=8",), ...). `result.load(head=True)` gives the
    student with its DINO head, `result.load(part="teacher")` the random teacher.
    """
    from runs.engines.distill import DistillConfig, distill, load_data
    return _run(DistillConfig, load_data, _logged(distill, log), model, data, test, store,
                steps, seed, device, save_at, precision, compile_model, fields)


def _logged(run_fn, log: str = None):
    """The engine with its metrics mirrored to `log`, as the CLIs' --log does."""
    import functools
    return functools.partial(run_fn, log=log) if log else run_fn


def _data(data, test, store) -> dict:
    """The config fields of the data: a dataset name, or in-memory data's stored .npz."""
    if isinstance(data, str):
        if test is not None:
            raise UserError("test= goes with in-memory data; a dataset name has its own split")
        return {"dataset": data}
    return {"dataset": "npz", "data_root": str(stored_arrays(data, test, store))}


def stored_arrays(data, test, store) -> Path:
    """In-memory uint8 data as STORE/data/tensors_<sha12>.npz (written once, atomically)."""
    import hashlib

    from runs.data import as_splits
    from runs.store import atomic_write
    train, test = as_splits(data, test)
    arrays = {}
    for split, part in (("train", train), ("test", test)):
        if part.x.dtype != torch.uint8:
            raise UserError(f"{'data' if split == 'train' else 'test'}: training stores "
                            f"uint8 pixels (N, C, H, W); got {part.x.dtype} images (give the "
                            f"pixels before normalisation; runs normalise on the device)")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = part.x.numpy(), part.y.numpy()
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(f"{key}:{arrays[key].dtype}:{arrays[key].shape};".encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    path = Path(store) / "data" / f"tensors_{digest.hexdigest()[:16]}.npz"
    if not path.exists():
        atomic_write(path, lambda tmp: _savez(tmp, arrays))
    return path


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append .npz to a name
        np.savez(handle, **arrays)
    return path


def _run(config_cls, load_data, run_fn, model, data, test, store, steps, seed, device,
         save_at, precision, compile_model, fields) -> RunResult:
    from runs.engines import engine
    from runs.models.base import use
    if "dataset" in fields:
        raise UserError("give the dataset as data=..., not dataset=...")
    if isinstance(save_at, str | int):
        save_at = (save_at,)
    if ":" in str(model):  # a user's module:factory, named here: import and register it
        use(model)
    values = {**fields, "model": model, "seed": seed, **_data(data, test, store)}
    run = engine.run_config(config_cls, values, str(steps), [str(s) for s in save_at],
                            load_data, run_fn, str(store), device, precision, compile_model)
    if run is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    return RunResult(str(run.path), run, run.summary())
