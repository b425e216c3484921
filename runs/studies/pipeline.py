"""The whole study in one command: `python -m runs.pipeline --preset demo`.

Stages, in order: distill (students on images, the noise control, optional alphas) ->
probe -> interpolate / plane -> border (optionally --align: barriers before and after
permutation alignment) -> curve (trained low-loss curves between two children of a border
start, `landscape.curve`) -> imp -> curvature (Hessian spectra at checkpoints,
`landscape.hessian`) -> figures. A preset is data (a JSON file in
runs/studies/presets/, or a path): per stage, the flags of that stage's command. Every stage
calls its command's `main(argv)`, imported inside the stage, so `runs` depends on no analysis
at import time; each command skips finished work, so re-running the pipeline resumes it.

Layout under --out: store/ (runs), results/ (HDF5 results), figures/ (PDF, PNG, tables).
"""

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runs.config import HelpFormatter
from runs.engines.parallel import add_parallel_arg
from runs.errors import UserError, cli, echo_command
from runs.progress import format_duration

PRESETS = Path(__file__).with_name("presets")
STAGES = ("distill", "probe", "interpolate", "border", "curve", "imp", "curvature",
          "figures")


@dataclass(frozen=True)
class Layout:
    out: Path

    @property
    def store(self) -> Path:
        return self.out / "store"

    @property
    def results(self) -> Path:
        return self.out / "results"

    @property
    def figures(self) -> Path:
        return self.out / "figures"


# In --out: the spelling of --out the study's results name their runs with ({"out": ...}).
OUT_RECORD = "pipeline.json"


def out_folder(out) -> Path:
    """--out spelled the way the study in it was made, however it is given now.

    The stages' results name the store's runs by path, so a re-run must spell the folder as
    the first run did: the spelling recorded in OUT/pipeline.json when it names this same
    folder (compared resolved: `out`, `./out/` and `/abs/cwd/out` are one folder). A new
    study is spelled relative to the working folder when it lies inside it, else absolute,
    so a copy run from its new parent (`--out out`) resumes too. A study made before the
    record keeps the spelling it is given (its own, if the user gives the same)."""
    given = Path(out).expanduser()
    recorded = _recorded_out(given)
    if recorded is not None and _same_folder(recorded, given):
        return recorded
    if (given / "results").is_dir():
        return given
    resolved = given.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve())
    except ValueError:
        return resolved


def _recorded_out(out: Path) -> Path | None:
    try:
        spelled = json.loads((out / OUT_RECORD).read_text())["out"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(spelled) if isinstance(spelled, str) and spelled else None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def record_out(layout: "Layout") -> None:
    """Write OUT/pipeline.json with the spelling in use (unless it already says so)."""
    if _recorded_out(layout.out) == layout.out:
        return
    from runs.store import atomic_write_text
    atomic_write_text(layout.out / OUT_RECORD, json.dumps({"out": str(layout.out)}) + "\n")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def load_preset(name: str, _seen: tuple = ()) -> dict:
    """A preset by name (runs/studies/presets/NAME.json) or by path to a JSON file.

    `"base": "OTHER"` starts from preset OTHER: a stage given as an object updates the
    base's object key by key (e.g. {"distill": {"model": "vgg11"}}), any other value
    replaces the base's.
    """
    path = Path(name) if name.endswith(".json") else PRESETS / f"{name}.json"
    if not path.is_file():
        raise UserError(f"--preset {name!r}: no such preset; valid: {', '.join(preset_names())}"
                        f" or a path to a .json file")
    try:
        preset = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"--preset {path}: not valid JSON ({err})") from None
    from runs.studies.preset_schema import validate
    validate(preset, path)  # data only: types, plain result names, no flags or code
    valid = {*STAGES, "description", "seeds", "noise", "alphas", "alpha_seeds", "subsets",
             "train", "base"}
    unknown = sorted(set(preset) - valid)
    if unknown:
        raise UserError(f"--preset {path}: unknown key(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(sorted(valid))}")
    if "base" not in preset:
        return preset
    if preset["base"] in _seen:
        raise UserError(f"--preset {path}: base {preset['base']!r} includes itself")
    return based(load_preset(preset.pop("base"), (*_seen, name)), preset)


def based(base: dict, preset: dict) -> dict:
    """`preset` on top of `base`: objects merged key by key, other values replaced."""
    out = dict(base)
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return out


def override(preset: dict, assignments: list[str]) -> dict:
    """Apply `stage.key=value` (or `key=value`) overrides; values are JSON or strings.

    A stage that is a list of jobs gets the value in every job.
    """
    for item in assignments:
        path, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. "
                            f"distill.data_root=~/data")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *stage, key = path.split(".")
        target = preset.get(stage[0]) if stage else preset
        for place in (target if isinstance(target, list) else [target]):
            if not isinstance(place, dict):
                raise UserError(f"--set {item!r}: the preset has no stage {stage[0]!r}")
            place[key] = value
    return preset


def flags(options: dict) -> list[str]:
    """{"batch_size": 64, "save_at": ["1ep", "2ep"], "flip": false} -> CLI argv.

    An empty value ("" or null, e.g. an unset data_root) means "unset": its flag is left out
    and the command uses its own default, so the echoed command pastes back as it ran."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def distill_configs(preset: dict) -> dict[str, list]:
    """{group: [DistillConfig per seed]}: images, the noise control, one group per alpha
    (at `alpha_seeds`, default the preset's seeds) and one per data size (`subsets`: train
    images per class)."""
    from runs.config import from_dict
    from runs.engines.distill import DistillConfig, load_data
    fields = {k: v for k, v in preset["distill"].items() if k not in ("steps", "save_at")}
    groups = {"images": [from_dict(DistillConfig, dict(fields, seed=s))
                         for s in preset.get("seeds", [0])]}
    alpha_seeds = preset.get("alpha_seeds", preset.get("seeds", [0]))
    for alpha in preset.get("alphas", []):
        groups[f"alpha={alpha}"] = [from_dict(DistillConfig, dict(fields, seed=s, alpha=alpha))
                                    for s in alpha_seeds]
    for per_class in preset.get("subsets", []):
        groups[f"subset={per_class}"] = [dataclasses.replace(c, subset=per_class)
                                         for c in groups["images"]]
    if preset.get("noise"):
        from runs.studies.reproduce import noise_config
        train = load_data(groups["images"][0])[0]
        groups["noise"] = [noise_config(c, train) for c in groups["images"]]
    return groups


def distill_stage(preset: dict, layout: Layout, device: str,
                  parallel_runs: int = 1) -> dict[str, list]:
    """Train every student; returns {group: [Run per seed]}.

    The data-size groups take the full-data students' number of steps (not epochs): the
    study varies the data, not the optimisation budget. `parallel_runs` other than 1: each
    other group's seeds are first distilled together (runs.engines.distill_parallel, 0 =
    auto), which the loop then finds done.
    """
    from runs.engines.distill import distill_with_steps
    steps = preset["distill"].get("steps", "100ep")
    save_at = preset["distill"].get("save_at", [])
    runs = {}
    for group, configs in distill_configs(preset).items():
        if parallel_runs != 1 and not group.startswith("subset="):
            distill_seeds_together(configs, steps, save_at, layout, device, parallel_runs)
        if group.startswith("subset="):
            full = runs["images"][0]
            runs[group] = [distill_with_steps(sized_config(cfg, full), str(full.latest_step()),
                                              (), str(layout.store), device)
                           for cfg in configs]
        else:
            runs[group] = [distill_with_steps(cfg, steps, save_at, str(layout.store), device)
                           for cfg in configs]
    return runs


def distill_seeds_together(configs: list, steps: str, save_at, layout: Layout, device: str,
                           parallel_runs: int) -> None:
    """One group's students (its seeds: one data set) distilled `parallel_runs` at a time
    (auto on the CPU is 1: then each is left to its turn, as without the flag)."""
    from runs.device import resolve_device
    if parallel_runs == 0 and resolve_device(device).type != "cuda":
        return
    from runs.engines.distill import load_data
    from runs.engines.distill_parallel import distill_together
    from runs.engines.engine import config_with_steps, epoch_steps
    data = load_data(configs[0])
    per_epoch = epoch_steps(configs[0], data[0])
    distill_together([config_with_steps(c, steps, save_at, per_epoch) for c in configs],
                     str(layout.store), data, device, parallel_runs=parallel_runs)


def sized_config(cfg, full):
    """A data-size student probed as often as the full-data run `full` (per step, not per
    epoch): 300 images make an epoch of one step, and a probe each 3 of those would embed
    the probe sets 95 times where the full-data student does 5."""
    from runs.engines.distill import load_data
    from runs.engines.engine import epoch_steps
    if cfg.probe_every <= 0:
        return cfg
    steps_per_epoch = max(1, epoch_steps(cfg, load_data(cfg)[0]))
    every = cfg.probe_every * full.config()["steps_per_epoch"] // steps_per_epoch
    return dataclasses.replace(cfg, probe_every=max(1, every))


def probe_refs(students: dict) -> list[str]:
    """pixels, then teacher and student of every seed, then the noise and alpha students
    (the data-size students are read from their own k-NN curves by the data-size figure)."""
    refs = ["pixels"]
    for run in students["images"]:
        refs += [f"{run.path}@last:teacher", f"{run.path}@last"]
    for group, runs in students.items():
        if group != "images" and not group.startswith("subset="):
            refs += [f"{run.path}@last" for run in runs]
    return refs


def probe_stage(preset: dict, layout: Layout, students: dict, device: str) -> Path:
    from probes.evaluate import main as probe_main
    options = dict(preset.get("probe", {}))
    base = preset["distill"]
    options.setdefault("dataset", base.get("dataset"))
    if base.get("data_root"):
        options.setdefault("data_root", base["data_root"])
    out = layout.results / f"probe_{options['dataset']}.h5"
    call(probe_main, [*probe_refs(students), *flags(options), "--out", str(out),
                      "--device", device], "probe")
    return out


# `[LABEL:=]@group[seed]:part` in a preset names a run of the distill stage, e.g.
# `@images[0]:teacher`, or (curvature stage) the dense supervised run of an imp job, e.g.
# `@imp_init0[0]:rewind`, or (curve stage) child K of start S of a border job,
# `@JOB.childK[S]:last` (see border_children); a part may also be a saved step
# (`@images[0]:4ep`, `:40`), or `epochs`: every checkpoint saved at a whole epoch
# (landscape.hessian, probes.evaluate).
TEMPLATE = re.compile(r"^(?P<label>.+:=)?@(?P<group>[^\[\]]+)\[(?P<index>\d+)\]"
                      r"(?::(?P<part>\w+))?$")
PARTS = {"last": "@last", "init": "@init", "teacher": "@last:teacher",
         "encoder": "@last:encoder", "epochs": "@epochs", "rewind": None, None: ""}
STEP_PART = re.compile(r"^\d+(ep)?$")  # a saved step: iterations or epochs


def resolve(value, students: dict):
    """Replace `[LABEL:=]@group[i]:part` templates (in strings and lists) with run
    references; `rewind` is the rewind step of an imp job's dense run (see dense_runs)."""
    if isinstance(value, list):
        return [resolve(v, students) for v in value]
    match = TEMPLATE.match(value) if isinstance(value, str) else None
    if not match:
        return value
    group, index, part = match["group"], int(match["index"]), match["part"]
    runs = students.get(group, [])
    rewind = getattr(runs[0], "rewind_step", None) if runs else None
    if index >= len(runs) or not (part in PARTS or STEP_PART.match(part)) or \
            (part == "rewind" and rewind is None):
        raise UserError(f"preset template {value!r}: groups {', '.join(students)} (an "
                        f"imp job's once its result exists), index below the number of "
                        f"seeds, parts {', '.join(p for p in PARTS if p)} (rewind: imp jobs "
                        f"only) or a saved step (4ep, 40)")
    tail = f"@{rewind}" if part == "rewind" else PARTS.get(part, f"@{part}")
    return f"{match['label'] or ''}{runs[index].path}{tail}"


def jobs_stage(stage: str, main, preset: dict, layout: Layout, students: dict,
               device: str, store: bool = False, defaults: dict = None) -> None:
    """Run every job of a stage: {"name", "refs": [...], flag: value, ...} -> main(argv)."""
    for job in preset.get(stage, []):
        job = {**(defaults or {}), **job}
        name = job.pop("name", stage)
        refs = resolve(job.pop("refs", []), students)
        options = {k: resolve(v, students) for k, v in job.items()}
        argv = [*refs, *flags(options), "--out", str(layout.results / f"{name}.h5"),
                "--device", device]
        call(main, argv + (["--store", str(layout.store)] if store else []), f"{stage} {name}")


def training_defaults(preset: dict) -> dict:
    """Children and IMP runs train the distilled architecture on the same data, with the
    preset's `train` flags (augmentation, batch size, ...) unless a job sets its own."""
    base = preset["distill"]
    keys = ("model", "width", "dataset", "data_root", "subset")
    return {**{k: base[k] for k in keys if k in base}, **preset.get("train", {})}


@dataclass(frozen=True)
class DenseRun:
    """The dense (level 0) supervised run of an imp job at one seed: `@job[i]:rewind` is
    its checkpoint at the job's rewind step K (the state every pruned level restarts from),
    `:init` its random init (or the reference it started from: a student's encoder under a
    fresh fc), `:last` the trained network."""
    path: Path
    rewind_step: int


def dense_runs(preset: dict, layout: Layout) -> dict[str, list[DenseRun]]:
    """{imp job name: [DenseRun per seed of its result]} for every imp job whose result
    exists, each run's folder computed as tickets.imp names it (dense_config, run_path)."""
    from runs.config import from_dict
    from runs.engines.train import TrainConfig
    from runs.results import open_result
    from runs.store import run_path
    groups = {}
    for job in preset.get("imp", []):
        path = layout.results / f"{job.get('name', 'imp')}.h5"
        if not path.is_file():
            continue
        result = open_result(path, "imp")
        train = from_dict(TrainConfig, result.config["train"])
        reference, step = result.config["reference"], int(result.config["rewind_step"])
        groups[path.stem] = [DenseRun(run_path(layout.store, "train", dataclasses.replace(
            train, seed=int(seed), init=reference), int(seed)), step)
            for seed in result.coords["seed"]]
    return groups


@dataclass(frozen=True)
class Child:
    """One SGD child of a border start: `@JOB.childK[S]` is child K (data_seed K) of start S
    (in the order of the job's `start` coordinate), a supervised run in the store."""
    path: Path


def border_children(preset: dict, layout: Layout) -> dict[str, list[Child]]:
    """{"JOB.childK": [Child per start]} for every border job whose result exists, read
    from the result's `children` attr (run folders relative to the store, per start label)."""
    from runs.results import json_attr, open_result
    groups = {}
    for job in preset.get("border", []):
        name = job.get("name", "border")
        path = layout.results / f"{name}.h5"
        if not path.is_file():
            continue
        result = open_result(path, "border")
        children = json_attr(result, "children", dict, {})
        for k in range(int(result.config["border"]["children"])):
            groups[f"{name}.child{k}"] = [Child(layout.store / children[str(start)][k])
                                          for start in result.coords["start"]]
    return groups


def curve_stage(preset: dict, layout: Layout, students: dict, device: str) -> None:
    """`python -m landscape.curve A B` per job: a trained curve (its bend a run in the
    store) between two children of a border start, `@JOB.child0[S]:last` and
    `@JOB.child1[S]:last`, measured beside the straight line."""
    from landscape.curve import main as curve_main
    groups = {**students, **border_children(preset, layout)}
    jobs_stage("curve", curve_main, preset, layout, groups, device, store=True)


def curvature_stage(preset: dict, layout: Layout, students: dict, device: str) -> None:
    """`python -m landscape.hessian` per job: its refs may name distill runs and, after the
    imp stage, the imp jobs' dense supervised runs (`@imp_init0[0]:rewind`)."""
    from landscape.hessian import main as hessian_main
    groups = {**students, **dense_runs(preset, layout)}
    jobs_stage("curvature", hessian_main, preset, layout, groups, device)


def figures_stage(layout: Layout) -> None:
    from figures.__main__ import main as figures_main
    call(figures_main, ["all", "--results", str(layout.out), "--out", str(layout.figures)],
         "figures")


def call(main, argv: list[str], stage: str) -> None:
    """Run a stage's command; its bad input stops the pipeline with ONE line naming the
    stage and the command's complaint. The command runs without its own `cli` reporting
    (`__wrapped__`), so its error reaches this one line, and a full disk or Ctrl-C the
    pipeline's own `cli` (argparse's refusal of a flag ends the pipeline on its own line,
    which names the command). Any other non-zero exit stops the pipeline naming the stage."""
    try:
        code = getattr(main, "__wrapped__", main)(argv)
    except UserError as err:
        raise UserError(f"stage {stage}: {err}; fix it and re-run the same pipeline command "
                        f"to resume") from None
    if code != 0:
        raise UserError(f"stage {stage} failed (exit {code}); fix it and re-run the same "
                        f"pipeline command to resume")


@contextlib.contextmanager
def timed(stage: str):
    """Print the stage's wall time on stderr when it ends (`stage distill: 3 min 12 s`)."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    print(f"stage {stage}: {format_duration(seconds)}", file=sys.stderr)  # never "60 s"


def run_pipeline(preset: dict, layout: Layout, device: str, stages=STAGES,
                 parallel_runs: int = 0) -> None:
    """Every stage in order; `parallel_runs`: the students distilled at once (a group's
    seeds) and the border and imp jobs' --parallel-runs (unless a job sets its own)."""
    record_out(layout)
    with timed("distill"):
        students = distill_stage(preset, layout, device, parallel_runs)
    if "probe" in stages and "probe" in preset:
        with timed("probe"):
            probe_stage(preset, layout, students, device)
    training = {**training_defaults(preset), "parallel_runs": parallel_runs}
    jobs = {"interpolate": ("landscape.interpolate", False, None),
            "border": ("landscape.border", True, training),
            "imp": ("tickets.imp", True, training)}
    for stage, (module, store, defaults) in jobs.items():
        if stage in stages:
            with timed(stage):
                main = importlib.import_module(module).main
                jobs_stage(stage, main, preset, layout, students, device, store, defaults)
        if stage == "border" and "curve" in stages and preset.get("curve"):
            with timed("curve"):
                curve_stage(preset, layout, students, device)
    if "curvature" in stages and preset.get("curvature"):
        with timed("curvature"):
            curvature_stage(preset, layout, students, device)
    if "figures" in stages:
        with timed("figures"):
            figures_stage(layout)


EPILOG = r"""examples:
  python -m runs.pipeline --preset demo            # digits, CPU, every stage and figure
  python -m runs.pipeline --preset cifar10-subset --set distill.data_root=~/data
  python -m runs.pipeline --preset paper-cifar10 --device cuda --out out/paper
  python -m runs.pipeline --preset demo --stages distill probe figures"""


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runs.pipeline", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="demo", help=f"one of {', '.join(preset_names())}, "
                   f"or a path to a preset .json")
    p.add_argument("--out", default=None, help="output folder (default: out/<preset>); any "
                   "spelling of one folder (relative, absolute) resumes the same study")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                   help="stages to run (distill always runs: later stages need its runs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--set", nargs="*", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a preset value, e.g. distill.data_root=~/data or "
                        "seeds=[0] (VALUE is JSON, or a plain string)")
    add_parallel_arg(p, "runs of one shape trained together as stacked parameters under "
                        "torch.func, at most this many at once (each still its own run): "
                        "each distill group's seeds (not the data-size groups), and the "
                        "border and imp jobs' supervised runs (unless a job sets its own "
                        "parallel_runs); 0 = auto (by memory on CUDA, 1 on CPU)")
    args = p.parse_args(argv)
    echo_command("runs.pipeline", argv)
    preset = override(load_preset(args.preset), args.set)
    layout = Layout(out_folder(args.out or Path("out") / Path(args.preset).stem))
    run_pipeline(preset, layout, args.device, args.stages, args.parallel_runs)
    for table in sorted(layout.figures.glob("*.md")):
        print(f"\n{table.stem}:\n{table.read_text().rstrip()}")
    print(f"\npipeline {args.preset}: results in {layout.results}, figures in {layout.figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
