"""What a preset may say: a preset is data, so it is checked before anything runs.

A preset (runs/studies/presets/*.json, or a user's file) becomes command lines: each stage's
object becomes that command's flags (`{"batch_size": 64}` -> `--batch-size 64`) and each job
of interpolate, border, curve, imp and curvature writes `--out/results/<name>.h5`. A file
from someone else must not run code, nor write outside --out, so `validate` refuses it in one
line naming the file and the key path (`presets/x.json: interpolate[2].name '../../x' must
be a plain file name`); `preset_problems` lists every problem:

- unknown top-level keys, and values of the wrong type (seeds a list of integers, ...);
- a result `name` that is not a plain file name ('/', '\\', '..', ':', empty);
- keys the pipeline sets itself (out, store, device) or that widen what runs (import,
  trust_pickle): they belong on the command line;
- string values that look like flags (`--import x` inside a list would reach the command's
  argv), and option keys that are not plain flag names;
- a `model` named by its Python module (`pkg.mod:factory`) whose module was not allowed on
  the command line (`--import pkg.mod`): naming it would import that module.

Paths a preset reads (data_root, checkpoint references, dinopl=FILE) may lie anywhere:
reading runs no code (weights-only checkpoints, npz without pickles); `--trust-pickle FILE`
exists on the command line only. `--set` overrides are the user's own command line and are
not checked here.
"""

import re

from runs import usercode
from runs.errors import UserError

SCALAR = (str, int, float, bool, type(None))
FLAG_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
FLAG_LIKE = re.compile(r"^--|^-[A-Za-z]")  # "-0.5:1.5:7" is a grid, "--import" a flag
# Set by the pipeline itself, or widening what runs: only the command line may say them.
RESERVED = {"out": "the pipeline's --out sets it", "store": "the pipeline's --out sets it",
            "device": "give the pipeline --device", "import": "give --import on the command line",
            "trust_pickle": "give --trust-pickle on the command line"}
BAD_NAME = re.compile(r"[/\\:\x00]|\.\.")
JOB_STAGES = ("interpolate", "border", "curve", "imp", "curvature")
FLAG_STAGES = ("distill", "train", "probe", "figures")


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value)


def _numbers(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int | float) and
                                           not isinstance(v, bool) for v in value)


# top-level key -> (check, what it must be)
TOP = {"description": (lambda v: isinstance(v, str), "a string"),
       "base": (lambda v: isinstance(v, str) and v != "", "a preset name or .json path"),
       "seeds": (_ints, "a list of integers"),
       "alpha_seeds": (_ints, "a list of integers"),
       "subsets": (_ints, "a list of integers (train images per class)"),
       "alphas": (_numbers, "a list of numbers"),
       "noise": (lambda v: isinstance(v, bool), "true or false"),
       **{stage: (lambda v: isinstance(v, dict), "an object of flags") for stage in FLAG_STAGES},
       **{stage: (lambda v: isinstance(v, list), "a list of jobs") for stage in JOB_STAGES}}


def validate(preset, source) -> dict:
    """`preset` (one parsed JSON file) if it follows the schema; else a one-line UserError
    naming `source` (the file), the key path of the first problem and how many more there
    are (`preset_problems` lists them all). Writes nothing."""
    problems = list(preset_problems(preset))
    if problems:
        more = f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{source}: {problems[0]}{more}")
    return preset


def preset_problems(preset):
    """Every problem of a preset, as 'key.path: what is wrong' strings."""
    if not isinstance(preset, dict):
        yield f"a preset is a JSON object of stages, not a {type(preset).__name__}"
        return
    unknown = sorted(str(key) for key in preset if key not in TOP)
    if unknown:
        yield f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(TOP))}"
    for key, value in preset.items():
        if key not in TOP:
            continue
        check, what = TOP[key]
        if not check(value):
            yield f"{key} {_short(value)} must be {what}"
        elif key in FLAG_STAGES:
            yield from flag_problems(value, key)
        elif key in JOB_STAGES:
            for i, job in enumerate(value):
                yield from job_problems(job, f"{key}[{i}]")


def job_problems(job, where: str):
    """A job: {"name": plain file name, "refs": [str, ...], flag: value, ...}."""
    if not isinstance(job, dict):
        yield f"{where} {_short(job)} must be an object (name, refs, flags)"
        return
    if "name" in job:
        yield from name_problems(job["name"], f"{where}.name")
    refs = job.get("refs", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        yield f"{where}.refs {_short(refs)} must be a list of checkpoint references"
    else:
        for i, ref in enumerate(refs):
            yield from value_problems("refs", ref, f"{where}.refs[{i}]")
    yield from flag_problems({k: v for k, v in job.items() if k not in ("name", "refs")},
                             where)


def name_problems(name, where: str):
    """A result name becomes results/<name>.h5 under --out: a plain file name only."""
    if not isinstance(name, str) or not name.strip() or BAD_NAME.search(name) or \
            name.startswith("-"):
        yield (f"{where} {_short(name)} must be a plain file name (no '/', '\\', '..', ':'; "
               f"not empty): results are written under --out/results")


def flag_problems(options: dict, where: str):
    """A stage's or job's flags: plain flag names, scalar values or lists of them."""
    for key, value in options.items():
        path = f"{where}.{key}"
        if not isinstance(key, str) or not FLAG_KEY.match(key):
            yield f"{path}: {key!r} is not a flag name (lower case, digits, '_')"
        elif key in RESERVED:
            yield f"{path}: a preset may not set {key} ({RESERVED[key]})"
        elif isinstance(value, list) and all(isinstance(v, SCALAR) for v in value):
            for i, item in enumerate(value):
                yield from value_problems(key, item, f"{path}[{i}]")
        elif isinstance(value, SCALAR):
            yield from value_problems(key, value, path)
        else:
            yield f"{path} {_short(value)} must be a number, string, true/false or a list"


def value_problems(key: str, value, path: str):
    """A flag value must not be read as a flag, nor name code the user did not allow."""
    if not isinstance(value, str):
        return
    if FLAG_LIKE.match(value):
        yield f"{path} {_short(value)} looks like a flag; write options as keys of the stage"
    elif key == "model" and usercode.is_qualified(value):
        module, _ = usercode.split_qualified(value)
        if not usercode.is_allowed(module):
            yield (f"{path} {value!r} names Python code (module {module}); allow it on the "
                   f"command line with --import {module}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
