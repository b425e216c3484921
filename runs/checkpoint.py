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

Reading runs no code from the file: `torch.load(weights_only=True)` rebuilds tensors,
containers, numbers and strings only, plus the classes a caller allows by name (dinopl's
Lightning allow-list). A file that needs anything else is refused in one line naming the
Python object it pickles, unless the user named that file with --trust-pickle
(runs.usercode). JSON, HDF5, .npz and empty files are recognised by their first bytes.
"""

import contextlib
import re
import warnings
import zipfile
from pathlib import Path

import torch
import torch.torch_version
from torch import nn

from runs.errors import UserError
from runs.models.base import BUILDERS, build, model_spec
from runs.store import atomic_write
from runs.usercode import TRUST_FLAG, is_trusted_file

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


def read_checkpoint(path, allow=()) -> dict:
    """Load a checkpoint file to CPU, running no code from it; any unreadable file is a
    UserError naming it.

    `allow`: classes the file may also hold, as (stand-in, "pickled.module.Name") pairs for
    torch.serialization.safe_globals (dinopl.lightning_globals()). A file the user named with
    --trust-pickle is unpickled in full.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint file at {path}")
    try:
        foreign = foreign_format(path)
    except OSError as err:  # unreadable: permissions, a folder of that name, ...
        raise UserError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if foreign:
        raise UserError(f"cannot read checkpoint {path}: it is {foreign}, not a torch "
                        f"checkpoint")
    trusted = is_trusted_file(path)
    try:
        with warnings.catch_warnings(), _allowing(allow):
            # a pickle of protocol > 2 makes the weights-only reader warn before it fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(load_error(path, err, trusted)) from None


def _allowing(allow):
    """torch's safe_globals context for (stand-in, "pickled.Name") pairs. torch before 2.6
    cannot take a pickled name: there only plain data loads (a file holding more is refused,
    naming what it holds)."""
    if not allow or torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(list(allow))


_HDF5 = b"\x89HDF\r\n\x1a\n"


def foreign_format(path: Path) -> str:
    """'an HDF5 file', 'a JSON file', ... when the first bytes say `path` is no torch file;
    '' otherwise (torch then judges it)."""
    with open(path, "rb") as file:
        head = file.read(64)
    if not head:
        return "an empty file"
    if head.startswith(_HDF5):
        return "an HDF5 file (a result?)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if head.startswith(b"PK") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(name.endswith("data.pkl") for name in names):
            npz = any(name.endswith(".npy") for name in names)
            return "a NumPy .npz archive" if npz else "a zip archive"
    return ""


# torch's weights-only refusals name the pickled global they met
_GLOBAL = re.compile(r"GLOBAL (\S+?)\.? (?:was not an allowed global|whose module)")


def load_error(path: Path, err: Exception, trusted: bool = False) -> str:
    """One complete line for a failed torch.load of `path`: the Python object a weights-only
    load refused (and the two ways on), or torch's first sentence."""
    text = str(err)
    found = _GLOBAL.search(text)
    if found and not trusted:
        name = found[1] if "." in found[1] else f"builtins.{found[1]}"  # torch drops builtins.
        return (f"refused to read {path}: it pickles the Python object {name}, and "
                f"unpickling it could run code (checkpoints are read as tensors and plain "
                f"data only); if you trust the file, add {TRUST_FLAG} {path}, or convert it "
                f"to plain tensors (README: Security)")
    reason = text.partition("WeightsUnpickler error:")[2].strip() if not trusted else ""
    if reason:
        return (f"cannot read checkpoint {path}: not tensors and plain data (the weights-only "
                f"reader stopped at: {reason.splitlines()[0].rstrip('.')}); if you trust the "
                f"file, add {TRUST_FLAG} {path}")
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    sentence = first.split(". ")[0].rstrip(".")
    if trusted:  # unpickled in full: the file's own objects failed (a module not installed)
        return f"cannot unpickle checkpoint {path} (given with {TRUST_FLAG}): {sentence}"
    return f"cannot read checkpoint {path}: truncated or not a torch checkpoint ({sentence})"


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


def check_entry(entry, source: str) -> dict:
    """`entry` if it is {"spec": {"name": str, [registry], options...}, "state": ...} as
    save_checkpoint writes it; else a UserError naming `source` and what is wrong, so that a
    damaged or foreign file fails here in one line, not as a TypeError inside a factory."""
    where = f"{source}: not a checkpoint of this toolkit (or a damaged one):"
    if not isinstance(entry, dict):
        raise UserError(f"{where} its model entry is a {type(entry).__name__}, not a dict "
                        f"with spec and state")
    spec = entry.get("spec")
    if not spec:
        raise UserError(f"{source} has no model spec; load it with NAME=FILE (e.g. "
                        f"resnet18=weights.pt)")
    if not isinstance(spec, dict):
        raise UserError(f"{where} its model spec is a {type(spec).__name__}, not a dict of "
                        f"name and options")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise UserError(f"{where} its model spec has no name (a string); it has "
                        f"{_listing(map(str, spec)) or 'no keys'}")
    registry = spec.get("registry", "model")
    if not isinstance(registry, str) or registry not in BUILDERS:
        raise UserError(f"{where} its model spec names registry {registry!r}; valid: "
                        f"{', '.join(sorted(BUILDERS))}")
    if "state" not in entry:
        raise UserError(f"{where} its model entry has no state (the weights)")
    state = entry["state"]
    if state is not None and not (isinstance(state, dict) and all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise UserError(f"{where} its model state is not a dict of name -> tensor")
    return entry


def rebuild(entry: dict, source: str) -> nn.Module:
    """The module an entry ({"spec", "state"}) describes, weights loaded strictly; a state
    of None rebuilds the module from the spec's seed."""
    spec = check_entry(entry, source)["spec"]
    try:
        module = build(spec, source)  # a user's module:factory only if allowed
    except (TypeError, ValueError, OverflowError) as err:  # options of the wrong type
        first = (str(err).splitlines() or [type(err).__name__])[0]
        options = {k: v for k, v in spec.items() if k not in ("name", "registry")}
        raise UserError(f"{source}: model {spec['name']} cannot be built from the options "
                        f"the file records ({_listing(f'{k}={v!r}' for k, v in options.items())}"
                        f"): {first}") from None
    except UserError as err:  # an unknown option or name: say which file recorded it
        if source and source not in str(err):
            raise UserError(f"{source}: {err}") from None
        raise
    if entry["state"] is not None:
        load_state_strict(module, entry["state"], source)
    return module


def payload_digest(value, into=None) -> str:
    """Hex sha256 of a nested payload: tensors (and numpy arrays) by dtype, shape and bytes,
    dict keys in sorted order, anything else by repr. What names a checkpoint's state
    (runs.refs.state_digest) and what the crash harness compares."""
    import hashlib

    import numpy as np
    digest = into or hashlib.sha256()
    if torch.is_tensor(value):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            payload_digest(value[key], digest)
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[")
        for item in value:
            payload_digest(item, digest)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()
