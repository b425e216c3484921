"""Run a scan's shards on a SLURM cluster as one array job, through submitit, then merge.

    python -m landscape.interpolate A B --out results/path.h5 \\
        --launcher slurm --shards 8 --slurm-partition gpu --slurm-time 120

Every scan CLI (`landscape.interpolate`, `landscape.border`, `tickets.imp`,
`probes.evaluate`) already splits itself with `--shard i/n` and resumes from its result
file. With `--launcher slurm --shards N` it submits, as ONE submitit array job, N tasks that
each call the same `main` with the original arguments plus `--shard i/N` (the launcher flags
removed), waits for them, and joins OUT.shard{i}of{N}.h5 into OUT with
`runs.results.merge_results`. `--launcher submitit-local` runs the same array as local
subprocesses (submitit's LocalExecutor): the cluster path without a cluster, used by the
tests. The default, `--launcher local`, runs in this process as before.

Each task is `ShardTask()(module, argv)`: only a module name and strings are pickled, so the
task imports the installed package on the node (same checkout, same venv: paths must live on
a filesystem the nodes share). A preempted or timed-out task is requeued and resumes; a
launch re-run after a failure resumes too: finished shards are complete files whose tasks
return at once.
"""

import dataclasses
import importlib
import json
import os
import shlex
import sys
from dataclasses import dataclass

from runs.config import add_config_args, arg, config_from_args
from runs.errors import UserError

try:
    from submitit.helpers import Checkpointable
except ImportError:  # submitit is the optional [slurm] extra; running here needs none of it
    Checkpointable = object

LAUNCHERS = ("local", "slurm", "submitit-local")
CLUSTERS = {"slurm": "slurm", "submitit-local": "local"}  # launcher -> submitit cluster name
RULE = "----------------------\n"  # submitit frames a failed job's traceback with this


@dataclass(frozen=True)
class LaunchConfig:
    launcher: str = arg("local", "where the scan runs: local (this process), slurm (an array "
                        "job of --shards tasks, via submitit) or submitit-local (the same "
                        "array as local subprocesses: the cluster path without a cluster)",
                        choices=LAUNCHERS)
    shards: int = arg(1, "array tasks; task i runs --shard i/N into OUT.shard{i}of{N}.h5, "
                         "joined into OUT when all are done")
    wait: bool = arg(True, "wait for the array, then merge; --no-wait prints the job ids "
                           "and the merge command instead")
    slurm_partition: str = arg("", "partition; '' = the cluster's default")
    slurm_time: int = arg(240, "time limit of each task, minutes")
    slurm_gpus_per_node: int = arg(1, "GPUs per task (submitit-local: GPUs made visible, "
                                      "0 = none, CPU)")
    slurm_cpus_per_task: int = arg(0, "CPU cores per task; 0 = the cluster's default")
    slurm_mem_gb: float = arg(0.0, "memory per task, GB; 0 = the cluster's default")
    slurm_account: str = arg("", "account charged; '' = your default")
    slurm_qos: str = arg("", "quality of service; '' = the default")
    slurm_constraint: str = arg("", "node features, e.g. a100; '' = any node")
    slurm_array_parallelism: int = arg(0, "most tasks running at once; 0 = all")
    slurm_folder: str = arg("", "submitit folder for pickled tasks and logs (files named by "
                                "job id; %j in it = a folder per job); '' = OUT without .h5 "
                                "+ '.jobs'")
    slurm_options: tuple[str, ...] = arg((), "extra sbatch options as key=value, e.g. "
                                             "gres=gpu:a100:1 mail-type=END")


LAUNCH_FIELDS = tuple(f.name for f in dataclasses.fields(LaunchConfig))


def _flag_arity() -> dict[str, object]:
    """Every flag add_launcher_args adds -> how many values follow it (0, 1 or '*')."""
    arity = {}
    for f in dataclasses.fields(LaunchConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            arity[flag] = arity["--no-" + flag[2:]] = 0
        else:
            arity[flag] = "*" if isinstance(f.default, tuple) else 1
    return arity


FLAGS = _flag_arity()


def add_launcher_args(parser):
    """Add --launcher, --shards, --[no-]wait and the --slurm-* resource flags."""
    return add_config_args(parser, LaunchConfig, group="cluster launch (submitit array job; "
                                                       "see README, Running on a cluster)")


def launching(args) -> bool:
    """True when the parsed flags ask for an array job instead of running here (checked:
    --shards without a launcher is a UserError, not silently one process)."""
    return hasattr(args, "launcher") and launch_config(args).launcher != "local"


def launch_config(args) -> LaunchConfig:
    """The launcher flags of a parsed command line, checked against --shard and each other."""
    cfg = config_from_args(LaunchConfig, args)
    if cfg.launcher == "local":
        if cfg.shards != 1:
            raise UserError(f"--shards {cfg.shards} needs --launcher slurm or submitit-local; "
                            "to run one shard here, give --shard i/n")
        return cfg
    if getattr(args, "shard", None):
        raise UserError(f"--shard {args.shard} and --launcher {cfg.launcher} exclude each "
                        "other: the launcher gives every task its own --shard i/N")
    if cfg.shards < 1:
        raise UserError(f"--shards {cfg.shards}: give the number of array tasks, >= 1")
    for flag, value in (("--slurm-time", cfg.slurm_time),
                        ("--slurm-gpus-per-node", cfg.slurm_gpus_per_node),
                        ("--slurm-cpus-per-task", cfg.slurm_cpus_per_task),
                        ("--slurm-mem-gb", cfg.slurm_mem_gb),
                        ("--slurm-array-parallelism", cfg.slurm_array_parallelism)):
        if value < 0 or (flag == "--slurm-time" and value == 0):
            raise UserError(f"{flag} {value}: must be positive")
    sbatch_options(cfg.slurm_options)
    return cfg


# ---------------------------------------------------------------------------- job specs


def strip_launcher_flags(argv) -> list[str]:
    """argv without the flags add_launcher_args adds (`--flag value` and `--flag=value`)."""
    out, argv, i = [], list(argv), 0
    while i < len(argv):
        item = argv[i]
        if item == "--":  # the rest is positional
            return out + argv[i:]
        name = item.split("=", 1)[0]
        if name not in FLAGS:
            out.append(item)
            i += 1
            continue
        i += 1
        if "=" in item or FLAGS[name] == 0:
            continue
        if FLAGS[name] == 1:
            i += 1
        else:  # nargs="*": every following value up to the next option
            while i < len(argv) and not argv[i].startswith("-"):
                i += 1
    return out


def job_specs(argv, n: int) -> list[list[str]]:
    """The argv of each of the n array tasks: argv without launcher flags, + --shard i/n."""
    base = strip_launcher_flags(argv)
    for item in base:  # argparse takes unique prefixes: `--launch slurm` must not survive
        name = item.split("=", 1)[0]
        if name.startswith("--") and name != "--shard" and len(name) > 2 and \
                any(flag.startswith(name) for flag in FLAGS):
            full = sorted(flag for flag in FLAGS if flag.startswith(name))
            raise UserError(f"{name}: write launcher flags in full ({', '.join(full)})")
    cut = base.index("--") if "--" in base else len(base)
    # --import was taken off argv by the cli wrapper: every task must import the same modules
    from runs.usercode import allowed_modules, trusted_files
    imports = [item for module in allowed_modules() for item in ("--import", module)]
    imports += [item for path in trusted_files() for item in ("--trust-pickle", path)]
    return [[*imports, *base[:cut], "--shard", f"{i}/{n}", *base[cut:]] for i in range(n)]


def run_job(module: str, argv: list[str]) -> int:
    """One array task: `python -m MODULE ARGV` inside the task's process.

    Calls the command's undecorated main, so a UserError ends the task with its traceback
    in the log and its message in what the launcher reports; a non-zero status fails it too.
    """
    main = importlib.import_module(module).main
    status = getattr(main, "__wrapped__", main)(list(argv))
    if status:
        raise RuntimeError(f"python -m {module} exited with status {status}")
    return 0


class ShardTask(Checkpointable):
    """What each array task calls: `run_job(module, argv)`, requeued on time-out.

    Checkpointable: when SLURM preempts a task or its time runs out, submitit requeues the
    same call (up to 3 times); the scan resumes from its result file's `done` cells and the
    store's finished runs, so the requeued task only does what was left.
    """

    def __call__(self, module: str, argv: list[str]) -> int:
        return run_job(module, argv)


def module_name(module_main) -> str:
    """The importable module of a CLI's main (its real name when run as `python -m`)."""
    name = module_main.__module__
    if name == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise UserError("a launcher runs a command as `python -m MODULE ...`; start it "
                            "that way")
        name = spec.name
    return name


# ---------------------------------------------------------------------------- submitit


def sbatch_options(items) -> dict[str, str]:
    """('gres=gpu:a100:1', 'mail-type=END') -> {'gres': 'gpu:a100:1', 'mail-type': 'END'}."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-options {item!r}: expected key=value, e.g. "
                            "gres=gpu:a100:1")
        out[key.strip()] = value
    return out


def executor_parameters(cfg: LaunchConfig, name: str) -> dict:
    """What `submitit.AutoExecutor.update_parameters` gets: shared names (timeout_min,
    gpus_per_node, ...) that LocalExecutor also honours, and slurm_* ones it ignores."""
    params = {"name": name, "timeout_min": cfg.slurm_time,
              "slurm_array_parallelism": cfg.slurm_array_parallelism or cfg.shards}
    if cfg.slurm_gpus_per_node:
        params["gpus_per_node"] = cfg.slurm_gpus_per_node
    if cfg.slurm_cpus_per_task:
        params["cpus_per_task"] = cfg.slurm_cpus_per_task
    if cfg.slurm_mem_gb:
        params["mem_gb"] = cfg.slurm_mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if value := getattr(cfg, f"slurm_{key}"):
            params[f"slurm_{key}"] = value
    if cfg.slurm_options:
        params["slurm_additional_parameters"] = sbatch_options(cfg.slurm_options)
    return params


def make_executor(launcher: str, folder, params: dict):
    """A submitit AutoExecutor for the launcher's cluster, parameters set."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"--launcher {launcher} needs submitit: pip install -e '.[slurm]'") \
            from None
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTERS[launcher])
    except RuntimeError as err:  # SlurmExecutor: no srun on this machine
        raise UserError(f"--launcher {launcher}: {err}; on a machine without SLURM, "
                        "--launcher submitit-local runs the same array locally") from None
    executor.update_parameters(**params)
    return executor


def default_folder(out_path) -> str:
    return f"{os.path.splitext(str(out_path))[0]}.jobs"


def check_output(out_path, shard_files: list[str], overwrite: bool) -> None:
    """Refuse, before anything is submitted, to replace an OUT this launch did not merge."""
    if overwrite or not os.path.exists(out_path):
        return
    from runs.results import open_result
    merged_from = open_result(out_path).attrs.get("merged_from")
    ours = sorted(os.path.abspath(p) for p in shard_files)
    if merged_from and sorted(os.path.abspath(p) for p in json.loads(merged_from)) == ours:
        return  # a previous merge of these shards: merging again only adds cells
    raise UserError(f"{out_path} already exists and is not a merge of this launch's shards; "
                    "pass --overwrite to replace it, or give another --out")


def merge_command(out_path, n: int) -> str:
    from runs.results import shard_path
    # Shell-quoted so it pastes back with spaces in the path; the * stays a glob.
    before, _, after = str(shard_path(out_path, "*", n)).partition("*")
    shards = f"{shlex.quote(before)}*{shlex.quote(after)}"
    return f"python -m runs.results merge --overwrite {shlex.quote(str(out_path))} {shards}"


def failure_reason(error) -> str:
    """One line from a submitit job error: the task's exception, or why it left no result."""
    text = str(error)
    if text.count(RULE) >= 2:  # FailedJobError: the task's traceback between two rules
        trace = [line for line in text.split(RULE)[1].splitlines() if line.strip()]
        last = trace[-1] if trace else text.splitlines()[0]
        return last.removeprefix("runs.errors.UserError: ")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])  # UncompletedJobError: "Job X ... has not produced any output"


def wait_for(jobs, n: int) -> None:
    """Block until every task ends; UserError naming each failed task, its job and log."""
    failed = []
    for i, job in enumerate(jobs):
        error = job.exception()  # waits; None when the task succeeded
        if error is not None:
            failed.append(f"shard {i}/{n} (job {job.job_id}) failed: {failure_reason(error)} "
                          f"(log: {job.paths.stderr})")
    if failed:
        raise UserError(f"{len(failed)} of {n} array tasks failed; " + "; ".join(failed) +
                        "; fix it and re-run the same command (finished shards are kept)")


# ---------------------------------------------------------------------------- launch


def launch(module_main, argv, args, out_path) -> int:
    """Submit `module_main`'s shards as one array job, wait, merge into `out_path`.

    argv: the command line as given (None = sys.argv[1:]); args: it parsed, for the launcher
    flags and --overwrite. Returns the exit status.
    """
    from runs.results import merge_results, shard_path
    cfg = launch_config(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    module, n = module_name(module_main), cfg.shards
    specs = job_specs(argv, n)
    shard_files = [shard_path(out_path, i, n) for i in range(n)]
    check_output(out_path, shard_files, bool(getattr(args, "overwrite", False)))
    folder = cfg.slurm_folder or default_folder(out_path)
    executor = make_executor(cfg.launcher, folder, executor_parameters(cfg, module))
    jobs = executor.map_array(ShardTask(), [module] * n, specs)
    ids = ", ".join(job.job_id for job in jobs)
    logs = str(folder).replace("%j", "*")
    print(f"submitted {n} tasks of python -m {module} ({cfg.launcher}): job {ids}; "
          f"logs in {logs}", file=sys.stderr)
    if not cfg.wait:
        print(f"when they finish: {merge_command(out_path, n)}")
        return 0
    try:
        wait_for(jobs, n)
    except KeyboardInterrupt:
        print(f"stopped waiting; the tasks go on. When they finish: "
              f"{merge_command(out_path, n)}", file=sys.stderr)
        raise
    merged = merge_results(out_path, shard_files, overwrite=True)
    print(f"merged {n} shards into {out_path}: {int(merged.done.sum())} of "
          f"{merged.done.size} cells done (python -m runs.results show {out_path})")
    return 0
