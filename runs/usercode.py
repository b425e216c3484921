"""The user's own code: `--import MODULE`, `--model pkg.mod:factory`, and what may be imported.

A checkpoint records its model's registry name, and a user's model is named after the place
its factory lives (`mymodels:net`). No file a user passes may execute code when it is read
(DESIGN.md), so a checkpoint naming `pkg.mod:factory` never imports `pkg.mod` on its own:
only modules the user named in this process are imported, through

    --import pkg.mod                 on any CLI (the `cli` wrapper handles it, see `take_argv`)
    --model pkg.mod:factory          on any CLI that trains or builds models
    @runs.models.register            the module that ran the decorator
    runs.models.allow("pkg.mod")     from Python

Anything else is refused with one line saying which flag allows it. This module imports no
torch: every CLI runs through it, `python -m figures` too.

The same holds for pickles: checkpoints are read weights-only (runs.checkpoint), and a file
holding other Python objects is unpickled in full only if the user named that very file with
`--trust-pickle FILE` (any CLI, repeatable; `trust_file` from Python). Presets cannot name it
(runs.studies.preset_schema refuses the key and flag-like values).
"""

import importlib
import os
import re

from runs.errors import UserError

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_QUALIFIED = re.compile(rf"^(?P<module>{_NAME}):(?P<attr>{_NAME})$")
_allowed: set[str] = set()  # modules the user named in this process
_trusted: set[str] = set()  # resolved paths of files named with --trust-pickle
TRUST_FLAG = "--trust-pickle"


def is_qualified(name: str) -> bool:
    """True for `pkg.mod:factory` names (a user's model), False for registry names."""
    return bool(_QUALIFIED.match(str(name)))


def split_qualified(name: str) -> tuple[str, str]:
    """'pkg.mod:factory' -> ('pkg.mod', 'factory'); a UserError for anything else."""
    match = _QUALIFIED.match(str(name))
    if not match:
        raise UserError(f"model {name!r}: expected a registry name or module:factory "
                        f"(e.g. my_package.my_module:my_net)")
    return match["module"], match["attr"]


def allow(module: str) -> None:
    """Let checkpoints that name `module` import it (the user named it in this process)."""
    if not re.fullmatch(_NAME, str(module)):
        raise UserError(f"--import {module!r}: not a module name (e.g. my_package.my_module)")
    _allowed.add(str(module))


def is_allowed(module: str) -> bool:
    return module in _allowed


def allowed_modules() -> list[str]:
    """The modules allowed so far, sorted: what a launcher passes on as `--import` flags."""
    return sorted(_allowed)


def trust_file(path) -> None:
    """Let `path` be unpickled in full (it may run code): the user vouched for this file."""
    _trusted.add(os.path.realpath(os.path.expanduser(str(path))))


def is_trusted_file(path) -> bool:
    """True if `path` (through symlinks) was named with --trust-pickle in this process."""
    return os.path.realpath(os.path.expanduser(str(path))) in _trusted


def trusted_files() -> list[str]:
    """The trusted files, sorted: what a launcher passes on as `--trust-pickle` flags."""
    return sorted(_trusted)


def import_module(module: str, what: str = None):
    """Allow `module` and import it; a failed import is one line naming the module (and,
    for an error inside the module's own code, the file and line it came from). `what`:
    the flag or name that asked for it, e.g. "--model pkg.mod:net" (default --import)."""
    allow(module)
    what = what or f"--import {module}"
    try:
        return importlib.import_module(module)
    except Exception as err:  # the user's code: any error it raises while importing
        message = (str(err).splitlines() or [""])[0]
        missing = isinstance(err, ModuleNotFoundError) and module.startswith(err.name or "-")
        hint = ("; is its folder the current directory or on PYTHONPATH?" if missing
                else _where(err))
        raise UserError(f"{what}: cannot import module {module} ({type(err).__name__}: "
                        f"{message}){hint}") from None


def _where(err: BaseException) -> str:
    """' at FILE:LINE' of the innermost frame outside the import machinery."""
    if isinstance(err, SyntaxError) and err.filename:
        return f" at {err.filename}:{err.lineno}"
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    for frame in reversed(frames):
        filename = frame.tb_frame.f_code.co_filename
        if "importlib" not in filename and filename != __file__:
            return f" at {filename}:{frame.tb_lineno}"
    return ""


def take_argv(argv: list[str]) -> list[str]:
    """The command line without its `--import MODULE` / `--import=MODULE` pairs, each module
    imported and allowed; `--model pkg.mod:factory` values are imported and registered
    (they stay on the command line: the command's parser reads them as model names).

    `--trust-pickle FILE` pairs are taken off too, each file trusted (`trust_file`).

    Scanning stops at `--` (what follows is positional). Called by `runs.errors.cli` before
    the command's parser sees argv, so every CLI takes --import without a flag of its own.
    """
    out, models, i = [], [], 0
    while i < len(argv):
        item = str(argv[i])
        if item == "--":
            out += argv[i:]
            break
        if item == "--import" or item.startswith("--import="):
            module = item.partition("=")[2] if "=" in item else _value(argv, i)
            import_module(module)
            i += 1 if "=" in item else 2
            continue
        if item == TRUST_FLAG or item.startswith(TRUST_FLAG + "="):
            trust_file(item.partition("=")[2] if "=" in item else _value(argv, i, TRUST_FLAG))
            i += 1 if "=" in item else 2
            continue
        if item == "--model" or item.startswith("--model="):
            value = item.partition("=")[2] if "=" in item else (
                str(argv[i + 1]) if i + 1 < len(argv) else "")
            if is_qualified(value):
                models.append(value)
        out.append(argv[i])
        i += 1
    if models:
        from runs.models.base import use  # torch only when a user model is named
        for name in models:
            use(name, flag="--model")
    return out


def _value(argv: list[str], i: int, flag: str = "--import") -> str:
    if i + 1 >= len(argv) or str(argv[i + 1]).startswith("-") or not str(argv[i + 1]):
        what = ("a checkpoint file you trust (e.g. --trust-pickle old.ckpt)" if flag == TRUST_FLAG
                else "a module name (e.g. --import my_package.my_models)")
        raise UserError(f"{flag} needs {what}")
    return str(argv[i + 1])

