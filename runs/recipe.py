"""The paper recipe's settings in one place, the settings of runs made before they existed,
and short names for every departure from the recipe (figure and table labels).

    PAPER["head_last"]                      # "raw": the paper's code's last head layer
    variant_names({"head_last": "normed", "model": "vgg11", "model_options": ["pool=avg"]})
        -> ["normed head", "avg pool"]
    fill_legacy("distill", old_config)      # keys a run written before issue #18 lacks

PAPER follows the code that produced the paper's numbers (safelix/dinopl, see PAPER.md):
an un-normalised last head layer, CIFAR10's input statistics for CIFAR10 and CIFAR100, the
last partial batch kept (196 steps per epoch at 50k / 256), the student equal to its
teacher at step 0 (alpha 0), VGG embeddings from the last max-pool, ResNet20/56 with 1x1
projection shortcuts. LEGACY is what this toolkit did before those options existed: stored
run configs without the keys are read back with these values, never with today's defaults.
"""

import json
import re

# The random-teacher distillation recipe (App. E) as DistillConfig fields.
PAPER = {
    "head": "dino_head", "head_last": "raw", "loss": "ce", "alpha": 0.0, "init_noise": 0.0,
    "input_stats": "paper", "drop_last": False, "model_options": (),
    "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256,
    "teacher_temp": 1.0, "student_temp": 1.0, "centering": False,
    "batch_size": 256, "lr": 1e-3, "weight_decay": 0.0, "flip": False, "crop_padding": 0,
}

# The supervised schedule of the lottery-ticket and basin experiments (Sec. 6), TrainConfig.
PAPER_TRAIN = {
    "input_stats": "paper", "drop_last": False, "model_options": (),
    "batch_size": 256, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
    "schedule": "multistep", "milestones": (0.5, 0.75), "gamma": 0.1, "warmup_steps": 0,
    "flip": True, "crop_padding": 4,
}

# Model factory options as the paper's code builds the networks (runs.models factories),
# by model family: VGG embeddings from the last max-pool, ResNet20/56 projection shortcuts.
PAPER_MODEL_OPTIONS = {
    "vgg": {"pool": "max", "norm": "none"}, "vgg_bn": {"pool": "max", "norm": "batch"},
    "resnet": {"norm": "batch"}, "cifar_resnet": {"shortcut": "projection", "norm": "batch"},
    "vit": {"patch": "8", "pool": "cls", "impl": "dinopl"},
}


def paper_model_options(model: str) -> dict:
    """{option: value as typed} of the paper's build of `model` ({} for other models)."""
    model = model or ""
    if re.fullmatch(r"vgg\d+_bn", model):
        return PAPER_MODEL_OPTIONS["vgg_bn"]
    if re.fullmatch(r"vgg\d+", model):
        return PAPER_MODEL_OPTIONS["vgg"]
    if model in ("resnet20", "resnet56"):
        return PAPER_MODEL_OPTIONS["cifar_resnet"]
    if re.fullmatch(r"resnet\d+", model):
        return PAPER_MODEL_OPTIONS["resnet"]
    if model.startswith("vit_"):
        return PAPER_MODEL_OPTIONS["vit"]
    return {}


# Fields added by issue #18 (or whose default changed), as runs made before it used them
# (model_options: per model, see legacy_model_options; alpha: the old default, which only
# the run identity needs, every stored distill config holding its alpha).
LEGACY = {
    "train": {"model_options": (), "input_stats": "dataset", "drop_last": True},
    "distill": {"model_options": (), "input_stats": "dataset", "drop_last": True,
                "head": "dino_head", "head_last": "normed", "loss": "ce", "init_noise": 0.0,
                "alpha": 1e-10},
}

# Scale settings: CPU-sized runs change them without changing the method; labels may skip
# them (variant_names(config, skip=SCALE_KEYS)). bottleneck_dim 0 (no bottleneck) changes
# the head's structure and is named even then.
SCALE_KEYS = ("out_dim", "hidden_dim", "bottleneck_dim", "batch_size", "lr")


def legacy_model_options(model: str) -> tuple[str, ...]:
    """The factory options this toolkit's models had before they became options: VGG
    embeddings averaged over the last conv map, ResNet20/56 with option-A shortcuts."""
    if re.fullmatch(r"vgg\d+(_bn)?", model or ""):
        return ("pool=avg",)
    if model in ("resnet20", "resnet56"):
        return ("shortcut=A",)
    return ()


def legacy_values(kind: str, config: dict) -> dict:
    """{field: value} that a `kind` ("train", "distill") run made before issue #18 used;
    {} for other kinds. model_options depends on the model the config names."""
    values = dict(LEGACY.get(kind, {}))
    if "model_options" in values:
        values["model_options"] = legacy_model_options(config.get("model", ""))
    return values


def fill_legacy(kind: str, config: dict) -> dict:
    """A stored config with the keys it lacks set to what its run was made with.

    Only records of this toolkit's engines (they always name a `model`) are filled; a key
    present in the record is never changed.
    """
    if not isinstance(config, dict) or "model" not in config:
        return config
    missing = {k: v for k, v in legacy_values(kind, config).items() if k not in config}
    if "alpha" in missing:  # every distill config ever written holds its alpha
        del missing["alpha"]
    return {**config, **{k: list(v) if isinstance(v, tuple) else v
                         for k, v in missing.items()}}


def _number(value) -> str:
    return f"{value:g}"


# (field, name of a departure from the recipe): in label order.
_NAMES = {
    "head": lambda v: f"{v.replace('_', ' ')} head",
    "head_last": lambda v: f"{v} head",
    "bottleneck_dim": lambda v: "no bottleneck" if v == 0 else f"bottleneck {v}",
    "loss": lambda v: f"{v} loss",
    "alpha": lambda v: f"alpha {_number(v)}",
    "init_noise": lambda v: f"init noise {_number(v)}",
    "input_stats": lambda v: f"{v} stats",
    "drop_last": lambda v: "drop last" if v else "keep last",
    "centering": lambda v: "centering" if v else "no centering",
    "teacher_temp": lambda v: f"teacher temp {_number(v)}",
    "student_temp": lambda v: f"student temp {_number(v)}",
    "flip": lambda v: "flips" if v else "no flips",
    "crop_padding": lambda v: f"crop {v}" if v else "no crop",
    "weight_decay": lambda v: f"wd {_number(v)}",
    "momentum": lambda v: f"momentum {_number(v)}",
    "schedule": lambda v: f"{v} schedule",
    "milestones": lambda v: "milestones " + "/".join(_number(m) for m in v),
    "gamma": lambda v: f"gamma {_number(v)}",
    "warmup_steps": lambda v: f"warm-up {v}",
    "out_dim": lambda v: f"m={v}",
    "hidden_dim": lambda v: f"hidden {v}",
    "batch_size": lambda v: f"batch {v}",
    "lr": lambda v: f"lr {_number(v)}",
}

# model option value -> readable name; other options read "key value".
_OPTION_NAMES = {
    ("pool", "avg"): "avg pool", ("pool", "max"): "max pool", ("pool", "mean"): "mean pool",
    ("pool", "cls"): "cls pool", ("shortcut", "A"): "option-A shortcuts",
    ("shortcut", "projection"): "projection shortcuts",
}


def option_names(model: str, items) -> list[str]:
    """'key=value' model options that differ from the paper's build of `model` -> names."""
    paper, names = paper_model_options(model), []
    for item in items or ():
        key, _, value = str(item).partition("=")
        if paper.get(key) == value:
            continue
        if key == "norm":
            names.append("no norm" if value == "none" else f"{value} norm")
        else:
            names.append(_OPTION_NAMES.get((key, value), f"{key} {value}"))
    return names


def is_distill(config: dict) -> bool:
    """A DistillConfig record (it has head settings), else a TrainConfig one."""
    return any(k in config for k in ("out_dim", "teacher_temp", "head", "alpha"))


def variant_names(config: dict, skip=()) -> list[str]:
    """Short names of every recipe setting in `config` that differs from the paper's.

    config: a DistillConfig or TrainConfig as a dict (a run's config.json "config", which
    Run.config() has filled for old runs); keys it lacks are not compared. skip: fields to
    leave out (e.g. SCALE_KEYS for CPU-sized runs, "alpha" where a label shows it).
    [] for a run of the recipe itself.
    """
    paper = PAPER if is_distill(config) else PAPER_TRAIN
    names = []
    for key, name in _NAMES.items():
        if key not in paper or key not in config:
            continue
        if key in skip and not (key == "bottleneck_dim" and config[key] == 0):
            continue
        if _differs(config[key], paper[key]):
            names.append(name(config[key]))
    if "model_options" not in skip:
        names += option_names(config.get("model", ""), config.get("model_options"))
    return names


def _differs(value, paper) -> bool:
    if isinstance(paper, tuple):
        return tuple(value or ()) != paper
    if isinstance(paper, float) and isinstance(value, int | float):
        return abs(value - paper) > 1e-12 * max(1.0, abs(paper))
    return json.dumps(value) != json.dumps(paper)
