"""One checkpoint reference syntax for every CLI: `[LABEL:=][NAME=]SOURCE[@STEP][:PART...]`.

    runs/ckpt/step_0001000.pt     a checkpoint file written by this toolkit
    store/train_ab12cd34/seed_0@last   a run directory at its latest step
    RUN@1000  RUN@2ep  RUN@init   a step in iterations or epochs; init = the state the run
                                  started from (step 0, or the step a --rewind run began at)
    RUN@epochs  RUN@every         every saved checkpoint at a whole epoch (from epoch 1), or
                                  every saved checkpoint: one row each (probes.evaluate only)
    RUN@last:encoder              the encoder only, with a fresh fc (probing, fine-tuning)
    RUN@last:teacher              a named extra module of the checkpoint (distillation runs)
    resnet18=weights.pt           a plain state dict (torchvision key layout) for a model name
    dinopl=dino.ckpt:student      a dinopl Lightning checkpoint (student or teacher)
    teacher:=RUN@last:teacher     any of these, named "teacher" in tables, results, figures

Without a LABEL, results name a checkpoint by a label derived from its run's config and
step ("student s0 ep15", "teacher s0", "supervised s1 @40", a loose file by its stem), plus
the run's departures from the paper's recipe ("student s0 ep15 (normed head)"), never by
its path; the paths stay in the results' `inputs` (see `ref_labels`).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from runs.checkpoint import read_checkpoint, rebuild
from runs.config import check_label, parse_steps
from runs.errors import UserError
from runs.store import Run, find_run

PARTS = ("encoder", "student", "teacher")
_REF = re.compile(r"^(?:(?P<arch>[a-z][a-z0-9_]*)=)?(?P<source>[^@:]+)"
                  r"(?:@(?P<step>[^:]+))?(?P<parts>(?::[a-z]+)*)$")
EXAMPLE = "e.g. store/train_ab12cd34/seed_0@last:encoder or ckpt.pt"
LABEL_SEP = ":="  # LABEL:=REF names a checkpoint in results
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
# @STEP values that name several checkpoints of a run (expanded by `expand_refs`).
SEVERAL = {"epochs": "every saved checkpoint at a whole epoch from epoch 1",
           "every": "every saved checkpoint, the init included"}


@dataclass(frozen=True)
class Ref:
    text: str  # as the user wrote it
    source: str  # a file or run directory
    arch: str | None = None  # registry name for a plain state dict
    step: str | None = None  # iterations, "Nep", "last" or "init"
    parts: tuple[str, ...] = ()  # selectors: "encoder", "student", "teacher"
    label: str | None = None  # LABEL of LABEL:=REF: the name results give the checkpoint


@dataclass
class Loaded:
    model: nn.Module
    ref: str
    path: Path | None  # the file the weights came from (None: rebuilt from a seed)
    step: int | None
    config: dict = field(default_factory=dict)
    payload: dict = field(default_factory=dict, repr=False)

    def input_record(self) -> dict:
        """The provenance entry results store under `inputs`."""
        return file_record(self.ref, self.path, self.step)


def file_record(ref: str, path: Path | None, step: int | None) -> dict:
    from runs.results import file_sha256
    record = {"ref": ref, "path": str(path) if path else "", "step": step,
              "sha256": file_sha256(path) if path else ""}
    run = run_summary(path)
    return {**record, "run": run} if run else record


def run_summary(path: Path | None) -> dict:
    """{"kind", "dataset", "alpha"} of the run a checkpoint file belongs to (its
    `<run>/ckpt/step_N.pt` layout), so figures can tell a noise-input student from an
    image one without the store; {} for files outside a run."""
    if path is None or Path(path).parent.name != "ckpt":
        return {}
    try:
        saved = Run(Path(path).parent.parent).config()
    except (OSError, ValueError):
        return {}
    config = saved.get("config") or {}
    return {"kind": saved.get("kind", ""),
            **{k: config[k] for k in ("dataset", "alpha") if k in config}}


def ref_record(ref: str) -> dict:
    """The provenance record of a reference without loading its weights."""
    path, step, _ = resolve_file(parse_ref(ref))
    return file_record(ref, path, step)


def split_label(text: str) -> tuple[str | None, str]:
    """("teacher", "RUN@last:teacher") from "teacher:=RUN@last:teacher"; (None, text)."""
    label, sep, ref = text.partition(LABEL_SEP)
    if not sep:
        return None, text
    if not label.strip():
        raise UserError(f"checkpoint reference {text!r}: empty LABEL before ':='; e.g. "
                        f"teacher:=store/distill_x/seed_0@last:teacher")
    return check_label(label.strip(), text), ref.strip()


# ---------------------------------------------------------------------------- labels
# The order in which fields tell apart checkpoints whose derived labels coincide.
_TELLING = ("step", "model", "dataset", "alpha", "part", "arch")


def ref_labels(refs, keep=()) -> list[str]:
    """A short readable label per reference, unique within `refs` (a result's rows).

    LABEL:=REF gives LABEL; otherwise "<role> s<seed> <step>" from the run's config.json
    ("student s0 ep15", "teacher s0", "supervised s1 @40", "student α=1 s0 init") or a
    loose file's stem, never a path or a hash. Labels that coincide get the field that
    differs appended ("student s0 ep15 vgg11", "supervised s0 @4 data_seed=1"), else a
    letter ("supervised s0 @4 (A)"). The same
    reference text twice gets one label; the tokens in `keep` ("pixels", "random") are
    their own labels. Reads only config.json and file names (no checkpoint is loaded).
    """
    texts = list(dict.fromkeys(refs))
    bases, fields, fixed = [], [], []
    for text in texts:
        label = text if text in keep else parse_ref(text).label
        base, info = (label, {}) if label else _derived(parse_ref(text))
        bases.append(base)
        fields.append(info)
        fixed.append(label is not None)
    twice = sorted({b for b, f in zip(bases, fixed) if f and
                    sum(1 for b2, f2 in zip(bases, fixed) if f2 and b2 == b) > 1})
    if twice:
        raise UserError(f"label {twice[0]!r} names two different checkpoints; give each its "
                        f"own LABEL:=REF")
    labels = dict(zip(texts, _disambiguate(bases, fields, fixed)))
    return [labels[text] for text in refs]


def expand_refs(refs) -> list[str]:
    """References with RUN@epochs or RUN@every replaced by one reference per checkpoint they
    name, in step order (see SEVERAL): `[LABEL:=]RUN@epochs[:PART]` -> `RUN@22[:PART]`,
    `RUN@44[:PART]`, ... (a LABEL gets each one's epoch appended: "mine ep1"). The other
    references pass unchanged. Lets a probe scan every epoch of a run from one argument."""
    return [one for text in refs for one in _expand(text)]


def _expand(text: str) -> list[str]:
    ref = parse_ref(text)
    if ref.step not in SEVERAL:
        return [text]
    source = Path(ref.source)
    if ref.arch or source.is_file():
        raise UserError(f"{text}: @{ref.step} applies to run directories, not files")
    if not source.exists():
        raise UserError(f"checkpoint reference {text!r}: no file or run at {source}")
    run = find_run(source)
    per_epoch, saved = run.config().get("steps_per_epoch", 0), run.steps()
    steps = saved
    if ref.step == "epochs":
        if not per_epoch:
            raise UserError(f"{text}: run {run.path} records no steps_per_epoch; use @every")
        steps = [step for step in saved if step and step % per_epoch == 0]
    if not steps:
        raise UserError(f"{text}: run {run.path} has no checkpoint at a whole epoch >= 1; "
                        f"saved steps: {', '.join(map(str, saved)) or 'none'}")
    tail = "".join(f":{part}" for part in ref.parts)
    def named(step: int) -> str:  # "mine ep2:=" for LABEL:=RUN@epochs
        return f"{ref.label} {_step_text(step, per_epoch)}{LABEL_SEP}" if ref.label else ""
    return [f"{named(step)}{ref.source}@{step}{tail}" for step in steps]


def checkpoint_position(text: str) -> dict:
    """{"run", "step", "epoch"} of the checkpoint a reference names: its run
    ("distill_ab12cd34/seed_0"; "" for a file outside a run), its step and epoch (float;
    None where unknown). Probe tables select among a run's epochs with it."""
    path, step, run = _located(parse_ref(text))
    if run is None:
        return {"run": "", "step": step, "epoch": None}
    per_epoch = run.config().get("steps_per_epoch", 0)
    epoch = step / per_epoch if per_epoch and step is not None else None
    return {"run": f"{run.path.parent.name}/{run.path.name}", "step": step, "epoch": epoch}


def _located(ref: Ref) -> tuple[Path | None, int | None, Run | None]:
    """resolve_file, with a run's checkpoint file given as a path placed in its run."""
    path, step, run = resolve_file(ref)
    if run is None and path is not None and path.parent.name == "ckpt" \
            and (path.parent.parent / "config.json").is_file():
        run, step = Run(path.parent.parent), _file_step(path)  # a run's checkpoint file
    return path, step, run


def _derived(ref: Ref) -> tuple[str, dict]:
    """(label, fields that may tell it apart from others) of an unlabelled reference."""
    path, step, run = _located(ref)
    role = next((p for p in ref.parts if p in ("student", "teacher")), "")
    part = " ".join(p for p in ref.parts if p != role)
    if run is None:
        fields = {"part": part, "arch": ref.arch or ""}
        return " ".join(filter(None, [Path(ref.source).stem, role])), fields
    saved = run.config()
    config = saved.get("config") or {}
    kind = saved.get("kind", "")
    if role != "teacher":
        role = {"distill": _student(config), "train": "supervised"}.get(kind, kind)
    when = "" if role == "teacher" else _step_text(step, saved.get("steps_per_epoch", 0))
    fields = {"step": _step_text(step, saved.get("steps_per_epoch", 0)),
              "model": config.get("model", ""), "dataset": config.get("dataset", ""),
              "alpha": f"α={config['alpha']:g}" if "alpha" in config else "", "part": part,
              **{key: f"{key}={value}" for key, value in sorted((saved.get("identity")
                 or {}).items()) if _readable(value) and key not in _TELLING}}
    label = " ".join(filter(None, [role, f"s{saved.get('seed', '')}", when]))
    return label + variant_suffix(config), fields


def _readable(value) -> bool:
    """Whether an identity value can go into a label: not a path, not a content hash
    ("sha256:..", "state:..": runs started from different files are told apart by letters)."""
    text = str(value)
    return "/" not in text and not re.match(r"^[a-z0-9]+:[0-9a-f]{16,}", text)


def variant_suffix(config: dict) -> str:
    """" (normed head, avg pool)": where a run's config departs from the paper's recipe
    (see `recipe_notes`); "" for the recipe itself or a config-less checkpoint."""
    names = recipe_notes(config)
    return f" ({', '.join(names)})" if names else ""


def recipe_notes(config: dict) -> list[str]:
    """Short names of a run's departures from the paper's recipe, for labels and table
    roles: runs.recipe.variant_names less the scale settings a CPU-sized run shrinks (head
    widths, batch, lr; the bottleneck's width, not its absence) and alpha, which labels
    show their own way ("student α=1"). config: filled for old runs (runs.recipe)."""
    from runs.recipe import SCALE_KEYS, variant_names
    if not config:
        return []
    width = ("bottleneck_dim",) if config.get("bottleneck_dim") != 0 else ()
    return variant_names(config, skip=(*SCALE_KEYS, *width, "alpha"))


AT_TEACHER = (0.0, 1e-10)  # the paper's student inits: its figures' alpha, its IMP runs'


def at_teacher(alpha: float) -> bool:
    """The paper's student init: at its teacher (alpha 0, its figures; 1e-10, its IMP runs)."""
    return alpha in AT_TEACHER


def _student(config: dict) -> str:
    if config.get("dataset") == "noise":
        return "noise student"
    alpha = config.get("alpha", 0.0)
    return "student" if at_teacher(alpha) else f"student α={alpha:g}"


def _file_step(path: Path) -> int | None:
    match = _STEP_FILE.match(path.name)
    return int(match[1]) if match else None


def _step_text(step: int | None, steps_per_epoch: int) -> str:
    """"init" (step 0), "ep15" (whole epochs) or "@40" (iterations); "" when unknown."""
    if step is None:
        return ""
    if step == 0:
        return "init"
    if steps_per_epoch and step % steps_per_epoch == 0:
        return f"ep{step // steps_per_epoch}"
    return f"@{step}"


def _disambiguate(bases: list[str], fields: list[dict], fixed: list[bool]) -> list[str]:
    """Append to the derived labels that coincide the first field that tells them apart."""
    labels = list(bases)
    for _ in range(4):
        groups = {}
        for i, label in enumerate(labels):
            groups.setdefault(label, []).append(i)
        clashes = [group for group in groups.values() if len(group) > 1]
        if not clashes:
            return labels
        for group in clashes:
            free = [i for i in group if not fixed[i]]  # a LABEL:= stays as written
            keys = [k for k in dict.fromkeys(k for i in free for k in fields[i])
                    if len({fields[i].get(k, "") for i in free}) > 1]
            for i in free if keys else ():
                if fields[i].get(keys[0]):
                    labels[i] = f"{labels[i]} {fields[i][keys[0]]}"
    return [f"{label} ({chr(65 + i)})" if labels.count(label) > 1 and not fixed[i] else label
            for i, label in enumerate(labels)]


def parse_ref(text: str) -> Ref:
    label, body = split_label(text)
    match = _REF.match(body.strip())
    if not match:
        raise UserError(f"cannot parse checkpoint reference {text!r}; {EXAMPLE}")
    parts = tuple(p for p in match["parts"].split(":") if p)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise UserError(f"checkpoint reference {text!r}: unknown part {bad[0]!r}; "
                        f"valid: {', '.join(PARTS)}")
    return Ref(text, match["source"], match["arch"], match["step"], parts, label)


def run_step(run: Run, step: str) -> int:
    """Resolve 'last', 'init', iterations or 'Nep' to a step of `run` ('init': the step
    of its starting state, whether or not its file is still there; see `resolve_file`)."""
    if step in SEVERAL:
        raise UserError(f"@{step} names several checkpoints ({SEVERAL[step]}); only "
                        f"probes.evaluate takes it: give one @STEP here (e.g. @last)")
    if step == "init":
        return init_step(run)
    steps = run.steps()
    if not steps:
        raise UserError(f"run {run.path} has no checkpoints yet")
    if step in (None, "last"):
        return steps[-1]
    per_epoch = run.config().get("steps_per_epoch", 0)
    if step.endswith("ep") and not per_epoch:
        raise UserError(f"run {run.path} records no steps_per_epoch; give @STEP in iterations")
    value = parse_steps(step, per_epoch, flag="@STEP")
    if value not in steps:
        raise UserError(f"run {run.path} has no checkpoint at step {value}; saved steps: "
                        f"{', '.join(map(str, steps))}")
    return value


def init_step(run: Run) -> int:
    """The step of the state `run` started from: 0, the --rewind checkpoint's step, or
    --start-step. config.json records it (`init_step`); a run made before it did tells it
    by its config: --start-step, or for --rewind its first kept checkpoint (written first)."""
    record = run.config()
    if isinstance(record.get("init_step"), int):
        return record["init_step"]
    config = record.get("config") or {}
    if config.get("rewind"):
        steps = run.steps()
        return steps[0] if steps else 0
    return int(config.get("start_step") or 0)


def resolve_file(ref: Ref) -> tuple[Path, int | None, Run | None]:
    """The checkpoint file a reference names, its step and run (None for a file)."""
    source = Path(ref.source)
    if source.is_file():
        if ref.step is not None:
            raise UserError(f"{ref.text}: @STEP applies to run directories, not files")
        return source, None, None
    if not source.exists():
        raise UserError(f"checkpoint reference {ref.text!r}: no file or run at {source}")
    run = find_run(source)
    step = run_step(run, ref.step)
    path = run.ckpt_path(step)
    if not path.exists():  # only @init gets here: its starting state's file is gone
        return _missing_init(ref, run, step)
    return path, step, run


def _missing_init(ref: Ref, run: Run, step: int) -> tuple[Path, int, Run]:
    """RUN@init whose starting-state file is gone: a distillation teacher is the same in
    every checkpoint (built from its seed by design, stored without weights), so any other
    gives it; anything else fails naming the file, never rebuilt from a seed."""
    saved = run.steps()
    if "teacher" in ref.parts and saved and run.config().get("kind") == "distill":
        return run.ckpt_path(saved[-1]), saved[-1], run
    what = f"ckpt/{run.ckpt_path(step).name}"
    listed = f"saved steps: {', '.join(map(str, saved))}" if saved else "no checkpoint saved"
    raise UserError(f"{ref.text}: run {run.path} lacks its starting state {what} (step "
                    f"{step}; deleted, or the run never started): @init is the state it began "
                    f"training from and is never rebuilt from a seed; {listed}")


def with_source(text: str, change) -> str | None:
    """The reference `text` with its file or run path replaced by `change(path)`; None
    where `change` returns None (or `text` is no reference). Keeps the rest as written."""
    label, body = split_label(text)
    match = _REF.match(body.strip())
    new = change(match["source"]) if match else None
    if new is None:
        return None
    arch = f"{match['arch']}=" if match["arch"] else ""
    step = f"@{match['step']}" if match["step"] else ""
    head = f"{label}{LABEL_SEP}" if label else ""
    return f"{head}{arch}{new}{step}{match['parts']}"


# Checkpoint entries that are the state a run starts from (--init takes model, --rewind
# model, optimizer and scheduler); not the RNG state (random in every process), the config
# (it spells paths) nor the bookkeeping in extra.
STATE_KEYS = ("format", "step", "model", "modules", "optimizer", "scheduler")


def content_ref(text: str) -> str:
    """The reference with its file replaced by a hash of what it holds: "sha256:<hex>" of
    a foreign file's bytes (NAME=FILE), "state:<hex>" of a toolkit checkpoint's STATE_KEYS
    (its bytes also hold the process's RNG state), parts kept ("state:<hex>:encoder"), the
    LABEL dropped. A run's identity takes this, so the same weights reached by any spelling
    of their path (relative, absolute, a copied store) name the same run."""
    ref = parse_ref(text)
    path, _, _ = resolve_file(ref)
    if ref.arch:
        from runs.store import file_digest
        digest = f"sha256:{file_digest(path)}"
    else:
        from runs.store import cached_digest
        digest = f"state:{cached_digest(path, state_digest)}"
    arch = f"{ref.arch}=" if ref.arch else ""
    return f"{arch}{digest}{''.join(f':{part}' for part in ref.parts)}"


def state_digest(path) -> str:
    """Hex sha256 of a toolkit checkpoint's STATE_KEYS (tensors by dtype, shape, bytes)."""
    payload = read_checkpoint(path)
    _check_format(payload, Path(path))
    from runs.checkpoint import payload_digest
    return payload_digest({key: payload.get(key) for key in STATE_KEYS})


def checked_modules(payload: dict, source) -> dict:
    """The checkpoint's extra modules ({} when none); a damaged entry is one line."""
    modules = payload.get("modules") or {}
    if not isinstance(modules, dict):
        raise UserError(f"{source}: not a checkpoint of this toolkit (or a damaged one): its "
                        f"modules are a {type(modules).__name__}, not a dict")
    return modules


def select_entry(payload: dict, parts: tuple[str, ...], source: str) -> dict:
    """The {"spec", "state"} entry a part names: the main model or an extra module."""
    role = next((p for p in parts if p in ("student", "teacher")), None)
    modules = checked_modules(payload, source)
    if role is None or (role == "student" and "student" not in modules):
        return payload["model"]
    if role not in modules:
        raise UserError(f"{source} holds no {role}; parts it has: "
                        f"{', '.join(['student', *modules]) or 'none'}")
    return modules[role]


def with_fresh_fc(model: nn.Module, num_classes: int = None, seed: int = None) -> nn.Module:
    """The same encoder weights under a fresh, seeded fc (for probing and fine-tuning)."""
    from runs.models.base import build
    spec = dict(model.spec)
    spec["num_classes"] = num_classes or spec["num_classes"]
    spec["seed"] = spec["seed"] if seed is None else seed
    fresh = build(spec)
    fresh.encoder.load_state_dict(model.encoder.state_dict(), strict=True)
    return fresh


def load_model(ref: str, num_classes: int = None, fc_seed: int = None) -> Loaded:
    """The model a reference names, on the CPU, with its provenance.

    `:encoder` keeps only the encoder and draws a fresh fc (with `num_classes` outputs).
    """
    parsed = parse_ref(ref)
    path, step, run = resolve_file(parsed)
    config = run.config().get("config", {}) if run else {}
    if parsed.arch == "dinopl":
        from runs.dinopl import import_dinopl
        model, payload = import_dinopl(path, parsed.parts)
    elif parsed.arch:
        from runs.importers import import_state_dict
        model, payload = import_state_dict(path, parsed.arch)
    else:
        payload = read_checkpoint(path)
        _check_format(payload, path)
        model = rebuild(select_entry(payload, parsed.parts, str(path)), str(path))
        step = payload.get("step", step)
        config = _filled(payload, path) or config
    if "encoder" in parsed.parts or (num_classes and num_classes != model.fc.out_features):
        model = with_fresh_fc(model, num_classes, fc_seed)
    return Loaded(model, ref, path, step, config, payload)


def _filled(payload: dict, path: Path) -> dict:
    """A checkpoint's config, keys it predates set as its run was made (runs.recipe), paths
    it keeps relative to its store (`store_relative` in extra) joined to where the store is
    (ROOT/<kind>_<hash>/seed_<s>/ckpt/FILE)."""
    from runs.recipe import fill_legacy
    from runs.store import from_store
    extra = payload.get("extra") or {}
    config = fill_legacy(extra.get("kind", ""), payload.get("config") or {})
    names = extra.get("store_relative") or ()
    if names and isinstance(config, dict) and Path(path).parent.name == "ckpt":
        config = from_store(config, names, Path(path).parents[3])
    return config


def load_head(ref: str, payload: dict = None) -> nn.Module:
    """The DINO head that goes with a distillation reference, on the CPU.

    The student's head ("head") by default, the teacher's ("teacher_head") for `:teacher`;
    a head stored without state (the random teacher's) is rebuilt from its seed. dinopl
    Lightning checkpoints give their student's or teacher's head. `payload`: the checkpoint
    already read (e.g. `Loaded.payload`), to skip reading it again.
    """
    parsed = parse_ref(ref)
    path, _, _ = resolve_file(parsed)
    teacher = "teacher" in parsed.parts
    if parsed.arch == "dinopl":
        from runs.dinopl import import_dinopl_head
        return import_dinopl_head(path, "teacher" if teacher else "student")
    if parsed.arch:
        raise UserError(f"{ref} holds no DINO head: only distillation checkpoints (RUN@STEP, "
                        f"RUN@STEP:teacher) and dinopl=FILE carry one")
    payload = payload if payload and "modules" in payload else read_checkpoint(path)
    role = "teacher_head" if teacher else "head"
    modules = checked_modules(payload, path)
    if role not in modules:
        raise UserError(f"{ref}: {path} holds no DINO head ({role!r}); only distillation "
                        f"checkpoints carry one (modules here: {', '.join(modules) or 'none'})")
    return rebuild(modules[role], str(path))


def _check_format(payload, path: Path) -> None:
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"{path} is not a checkpoint of this toolkit; for a plain state dict "
                        f"write NAME={path} (e.g. resnet18={path}), for a dinopl Lightning "
                        f"checkpoint dinopl={path}:student")
