"""Checkpoints that rebuild their model alone, written atomically, loaded strictly.

A checkpoint is a dict:
    format     "runs/ckpt/1"
    step       iterations done when it was written
    model      {"spec": registry name + kwargs, "state": state_dict incl. BN buffers}
    modules    extra modules by name (a DINO head, a teacher), same layout; a None state
               means "rebuild from the spec's seed" (random teachers are stored that way)
    optimizer, scheduler   their state_dicts, or None
    config     the run's config (dict), rng (torch CPU/CUDA states), extra (anything JSON-able)
               (numpy values in config and extra are stored as Python numbers)
"""

from pathlib import Path

import torch
from torch import nn

from runs.errors import UserError
from runs.models.base import build, model_spec
from runs.store import atomic_write

FORMAT = "runs/ckpt/1"
SHOW = 4  # key names quoted in an error before "(+N more)"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        # Not `a or b`: containers define __len__, so an empty wrapped Sequential is falsy.
        inner = [m for m in (getattr(model, "module", None), getattr(model, "_orig_mod", None))
                 if isinstance(m, nn.Module)]
        if not inner:
            return model
        model = inner[0]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def module_entry(module: nn.Module, with_state: bool = True) -> dict:
    module = unwrap(module)
    return {"spec": model_spec(module), "state": module.state_dict() if with_state else None}


def save_checkpoint(path, model: nn.Module, step: int, *, config: dict = None,
                    optimizer=None, scheduler=None, modules: dict = None,
                    extra: dict = None) -> Path:
    """Write a checkpoint atomically (temp file, then rename). Returns the path."""
    payload = {
        "format": FORMAT, "step": int(step), "model": module_entry(model),
        "modules": {name: entry for name, entry in (modules or {}).items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": _plain(config or {}), "rng": rng_state(), "extra": _plain(extra or {}),
    }
    atomic_write(Path(path), lambda tmp: save_file(payload, tmp))
    return Path(path)


def save_file(payload, path) -> None:
    """torch.save through a Python file, so a full disk raises OSError(ENOSPC) (torch's own
    writer raises "unexpected pos ..."); torch then fails again closing the archive, and
    that RuntimeError carries the OSError (runs.errors.disk_full finds it)."""
    with open(path, "wb") as file:
        torch.save(payload, file)


def _plain(data):
    """numpy scalars and arrays as Python numbers and lists, at any depth: the weights-only
    loader refuses numpy objects, so a file holding one could never be read back."""
    if isinstance(data, dict):
        return {key: _plain(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return (list if isinstance(data, list) else tuple)(_plain(v) for v in data)
    return data.tolist() if type(data).__module__ == "numpy" else data


def read_checkpoint(path, trusted: bool = False) -> dict:
    """Load a checkpoint file to CPU; any unreadable file is a UserError naming it.

    `trusted=True` allows arbitrary pickled objects (Lightning checkpoints need it).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # torch raises several types for truncated or foreign files
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"cannot read checkpoint {path}: truncated or not a torch "
                        f"checkpoint ({first})") from None


def _listing(keys) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def state_mismatch(module: nn.Module, state: dict) -> str:
    """'' if `state` fits `module` exactly, else what differs (missing, unexpected, shapes)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{label}: {_listing(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected),
              ("shape mismatch (file vs model)", shapes)) if keys]
    return "; ".join(parts)


def load_state_strict(module: nn.Module, state: dict, source: str) -> nn.Module:
    """Load every key or fail naming the source, the missing/unexpected/mis-shaped keys."""
    problem = state_mismatch(module, state)
    if problem:
        name = model_spec(module).get("name", type(module).__name__)
        raise UserError(f"{source} does not fit model {name}: {problem}")
    module.load_state_dict(state, strict=True)
    return module


def module_sha256(module: nn.Module) -> str:
    """Hex sha256 of a module's state (names, dtypes, shapes and bytes, in state order): an
    in-memory model's identity in a result's `inputs`, as a file's sha256 is a checkpoint's."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel()
                      else b"")
    return digest.hexdigest()


def check_finite(module: nn.Module, source: str) -> nn.Module:
    """UserError naming `source` and the tensors that hold NaN or Inf: weights to train from
    or to scan (a diverged run's) would make every step or metric NaN. Probes find such
    weights through their features instead, naming the checkpoint there."""
    broken = [name for name, value in module.state_dict().items()
              if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise UserError(f"{source} holds NaN or Inf values in {_listing(broken)}")
    return module


def rebuild(entry: dict, source: str) -> nn.Module:
    """The module an entry ({"spec", "state"}) describes, weights loaded strictly."""
    if not entry.get("spec"):
        raise UserError(f"{source} has no model spec; load it with NAME=FILE (e.g. "
                        f"resnet18=weights.pt)")
    module = build(entry["spec"], source)  # a user's module:factory only if allowed
    if entry.get("state") is not None:
        load_state_strict(module, entry["state"], source)
    return module
