"""Crash harness: kill the long commands at random moments, re-run them, compare the results.

    python -m runs.crashtest                          # every command, 20 SIGKILLs each
    python -m runs.crashtest train imp --kills 5      # some commands, fewer kills
    python -m runs.crashtest --signals --keep /tmp/c  # also SIGINT / SIGTERM; keep the folders

For each command (a tiny CPU configuration of runs.distill, runs.train, landscape.interpolate,
landscape.border and tickets.imp (each also with --parallel-runs: runs trained together) and
runs.pipeline) it
1. runs the command once, uninterrupted, in a folder of its own and times it from its banner
   line on stderr to its exit (interpreter start-up is not work worth killing); runs it again
   there, which must find everything done and rewrite no file;
2. in a second folder starts the same command again and again, sending SIGKILL at seeded
   moments of the uninterrupted run's timeline, one drawn in each of `--kills` equal slices
   of it (a re-run gets there sooner by the work already kept), then lets it finish. After
   every kill every checkpoint, mask and result file must open, and nothing finished may
   change later: a kept checkpoint, a DONE file, a `done` result cell;
3. compares the two folders: the same files; checkpoints and masks equal tensor by tensor;
   result files with equal coordinates, `done` masks, metric arrays (NaN-aware) and
   attributes (provenance and creation time aside); metrics.jsonl, DONE, config.json and
   figure tables equal byte for byte. On CPU with one thread and fixed seeds every command
   is deterministic, so all of this is exact: the tolerance is zero.

With `--signals` it also stops each command with SIGINT and with SIGTERM: the command must
exit 130 (143 for SIGTERM) with a line on stderr that says to re-run the same command, and
the re-run must finish with the same results. With `--moved` (the commands that have a
store: distill, train, imp, pipeline) it kills each one part-way, moves its folder elsewhere
and re-runs it there with --store and --out spelled absolute: the same files as the clean
run, bit for bit (checkpoints tensor by tensor). With `--changed-data` it kills a scan of a
.npz file part-way, rewrites the file and re-runs: the command must refuse (exit 2, one line
saying the file changed) and touch nothing. tests/test_crash.py runs the same harness with
fewer kills. Every command runs with cwd = its folder and relative paths, so the paths that
configs record (mask files, run references) are the same in both folders.
"""

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
# Attributes of a result file that say when and where it was written, not what it holds.
WHEN_WHERE = ("created_utc", "package_version", "git_sha", "git_dirty", "torch_version",
              "device", "merged_from")
RESUME_HINT = "re-run the same command"


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # python -m MODULE
    argv: tuple[str, ...]  # relative paths: run with cwd = the command's folder
    prepare: Callable[[Path, Path], None] | None = None  # (folder, shared inputs folder)


TOY_TRAIN = ("--model", "convnet", "--width", "0.125", "--dataset", "toy", "--batch-size", "32",
             "--lr", "0.05", "--device", "cpu")
DISTILL_HEAD = ("--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "8")
EVAL = ("--bn-samples", "64", "--bn-batch-size", "32")
# The two supervised runs interpolate and border start from (8 steps, seeds 0 and 1).
BASE_RUNS = {"A": 0, "B": 1}

PIPELINE_PRESET = {
    "description": "crash test: every stage on tiny toy runs",
    "seeds": [0], "noise": False,
    "distill": {"model": "convnet", "width": 0.125, "dataset": "toy",
                "data_options": ["side=8"], "batch_size": 32, "out_dim": 64,
                "hidden_dim": 32, "bottleneck_dim": 8, "steps": "2ep", "save_at": ["1ep"],
                "probe_every": 1},
    "probe": {"probes": ["knn"], "seeds": [0]},
    "interpolate": [{"name": "path", "refs": ["@images[0]:init", "@images[0]:last"],
                     "metrics": ["knn", "norm"], "grid": "0:1:3"}],
    "border": [{"name": "lmc", "refs": ["random"], "children": 2, "steps": "4",
                "batch_size": 32, "grid": "0:1:3", "bn_samples": 64, "bn_batch_size": 32}],
    "imp": [{"name": "imp", "rewind": "init@0", "levels": 1, "steps": "4", "batch_size": 32,
             "seeds": [0]}],
}


def base_run(inputs: Path, name: str) -> str:
    """The relative run folder of base run `name` (A or B), as the commands reference it."""
    found = sorted((inputs / "base").glob(f"train_*/seed_{BASE_RUNS[name]}"))
    return str(found[0].relative_to(inputs))


def make_inputs(inputs: Path) -> None:
    """Train the base runs once (in this process): 8 steps, a checkpoint at step 4."""
    from runs.engines.train import TrainConfig, train
    cfg = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=8,
                      lr=0.05, save_at=(4,))
    for seed in BASE_RUNS.values():
        train(dataclasses.replace(cfg, seed=seed), inputs / "base", device="cpu")


def copy_inputs(folder: Path, inputs: Path) -> None:
    shutil.copytree(inputs / "base", folder / "base")


def write_preset(folder: Path, inputs: Path) -> None:
    (folder / "preset.json").write_text(json.dumps(PIPELINE_PRESET, indent=1) + "\n")


DATA_FILE = "data.npz"  # the changed-data row's dataset: random toy-shaped images


def write_data(path: Path, seed: int = 0) -> None:
    """A .npz of the toy data's shapes (3 x 16 x 16, 4 classes), drawn from `seed`."""
    rng = np.random.default_rng(seed)
    arrays = {f"x_{split}": rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
              for split, n in (("train", 128), ("test", 64))}
    arrays.update(y_train=np.arange(128) % 4, y_test=np.arange(64) % 4)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def copy_inputs_and_data(folder: Path, inputs: Path) -> None:
    copy_inputs(folder, inputs)
    write_data(folder / DATA_FILE)


def data_command(inputs: Path) -> Command:
    """The changed-data row's command: an interpolation scan that reads DATA_FILE."""
    a, b = (base_run(inputs, name) for name in BASE_RUNS)
    return Command("changed-data", "landscape.interpolate", (
        f"{a}@last", f"{b}@last", "--grid", "0:1:25", "--points-per-pass", "2", *EVAL,
        "--dataset", "npz", "--data-root", DATA_FILE, "--device", "cpu", "--out",
        "results/interpolate.h5"), copy_inputs_and_data)


# Commands whose every path into their folder is a flag value (--store, --out): the
# moved-store row spells those absolute in the new place. landscape.border and
# landscape.interpolate take run folders as positional references and record them by path.
MOVABLE = ("distill", "train", "imp", "pipeline")
PATH_FLAGS = ("--store", "--out")


def spelled_in(argv, folder: Path) -> tuple[str, ...]:
    """`argv` with the values of PATH_FLAGS made absolute paths under `folder`."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] in PATH_FLAGS:
            out[i + 1] = str(folder / out[i + 1])
    return tuple(out)


def out_file(argv) -> str:
    """The value of --out in `argv` ("" if none)."""
    argv = list(argv)
    return argv[argv.index("--out") + 1] if "--out" in argv[:-1] else ""


def commands(inputs: Path) -> dict[str, Command]:
    """Every command under test, on tiny configurations (seconds each on one CPU core)."""
    a, b = (base_run(inputs, name) for name in BASE_RUNS) if (inputs / "base").is_dir() \
        else ("base/A", "base/B")
    return {c.name: c for c in (
        Command("distill", "runs.distill", (
            "--model", "convnet", "--width", "0.125", "--dataset", "toy", "--data-options",
            "side=8", *DISTILL_HEAD, "--batch-size", "32", "--steps", "12ep", "--save-at",
            "2ep", "6ep", "--probe-every", "2", "--device", "cpu", "--store", "store")),
        Command("train", "runs.train", (
            *TOY_TRAIN, "--val-size", "32", "--steps", "24ep", "--save-at", "4ep", "12ep",
            "--store", "store")),
        Command("interpolate", "landscape.interpolate", (
            f"{a}@last", f"{b}@last", "--grid", "0:1:25", "--points-per-pass", "2", *EVAL,
            "--device", "cpu", "--out", "results/interpolate.h5"), copy_inputs),
        Command("border", "landscape.border", (
            "random", "--rewind-steps", a, "4", "--children", "3", *TOY_TRAIN, "--steps", "24",
            "--grid", "0:1:5", *EVAL, "--store", "store", "--out", "results/border.h5"),
            copy_inputs),
        Command("border-parallel", "landscape.border", (
            "random", "--rewind-steps", a, "4", "--children", "3", *TOY_TRAIN, "--steps", "24",
            "--grid", "0:1:5", *EVAL, "--store", "store", "--out", "results/border.h5",
            "--parallel-runs", "3"), copy_inputs),
        Command("imp", "tickets.imp", (
            "--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size",
            "64", "--val-size", "100", "--lr", "0.05", "--steps", "3ep", "--crop-padding", "0",
            "--no-flip", "--levels", "3", "--rewind", "init@1ep", "--baselines", "random", "reinit",
            "--seeds", "0", "--device", "cpu", "--store", "store", "--out", "results/imp.h5")),
        Command("imp-parallel", "tickets.imp", (
            "--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size",
            "64", "--val-size", "100", "--lr", "0.05", "--steps", "3ep", "--crop-padding", "0",
            "--no-flip", "--levels", "2", "--rewind", "init@1ep", "--baselines", "random",
            "--seeds", "0", "1", "--parallel-runs", "4", "--device", "cpu", "--store", "store",
            "--out", "results/imp.h5")),
        Command("pipeline", "runs.pipeline", (
            "--preset", "preset.json", "--out", "out", "--device", "cpu"), write_preset),
    )}


# ---------------------------------------------------------------------------- running


def environment() -> dict:
    """One thread (deterministic and fair on a shared machine), this checkout importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONHASHSEED="0", TQDM_DISABLE="1", MPLBACKEND="Agg")
    return env


@dataclass
class Attempt:
    code: int  # exit status; negative = killed by that signal
    work_s: float  # banner to exit (or kill)
    stderr: str


class Runner:
    """Starts a command in its folder, with stdout/stderr to log files: a fresh interpreter
    each time, or a child forked by a `ForkServer`."""

    def __init__(self, command: Command, folder: Path, logs: Path, server=None):
        self.command, self.folder, self.logs, self.server = command, folder, logs, server
        self.count = 0

    def start(self):
        self.count += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        out_path, err_path = (self.logs / f"{self.folder.name}.{self.count}.{kind}"
                              for kind in ("out", "err"))
        if self.server is not None:
            err_path.write_bytes(b"")  # the child opens it after the fork: exists now
            return self.server.start(self.command, self.folder, out_path, err_path), err_path
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", self.command.module,
                                     *self.command.argv], cwd=self.folder, stdout=out,
                                    stderr=err, env=environment(), stdin=subprocess.DEVNULL)
        return proc, err_path

    def wait_banner(self, proc, err_path: Path, timeout: float = 120.0) -> float:
        """Poll stderr until the command's banner line (its main has started); the time."""
        banner = f"python -m {self.command.module} ".encode()  # errors.echo_command
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(line.startswith(banner) for line in err_path.read_bytes().splitlines()):
                return time.monotonic()
            if proc.poll() is not None:
                return time.monotonic()
            time.sleep(0.002)
        proc.kill()
        raise RuntimeError(f"{self.command.module} printed no banner in {timeout} s")

    def run(self, stop_after: float = None, sig=signal.SIGKILL, timeout=600.0) -> Attempt:
        """Run once; send `sig` `stop_after` seconds after the banner unless it ended."""
        proc, err_path = self.start()
        began = self.wait_banner(proc, err_path)
        if stop_after is not None:
            try:
                proc.wait(timeout=stop_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{self.command.module} ran longer than {timeout} s") from None
        return Attempt(code, time.monotonic() - began,
                       err_path.read_text(errors="replace"))


class ForkServer:
    """A process that imports torch and the commands once, then forks one child per run.

    Every run is still a process of its own, killed or signalled on its own, exiting with
    its own status; it just skips the 2-3 s of imports that would dwarf these tiny runs
    (the child calls the command's `main(argv)`, as `python -m` would). Fresh interpreters
    (`--fresh`) test the same thing, slower.
    """

    MODULES = ("runs.train", "runs.distill", "landscape.interpolate", "landscape.border",
               "tickets.imp", "runs.pipeline", "probes.evaluate", "figures.__main__")

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "runs.crashtest", "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=environment())
        self.buffer = b""
        if self.message(timeout=300) != {"ready": True}:
            raise RuntimeError("the fork server did not start")

    def start(self, command: Command, cwd: Path, out: Path, err: Path) -> "Forked":
        request = {"module": command.module, "argv": list(command.argv), "cwd": str(cwd),
                   "out": str(out), "err": str(err)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return Forked(self, self.message(timeout=60)["pid"])

    def message(self, timeout: float = None) -> dict | None:
        """The server's next JSON line, or None if none came within `timeout` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Forked:
    """A forked run, with the part of Popen's interface the Runner uses."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        return self.wait(timeout=0, quiet=True)

    def wait(self, timeout: float = None, quiet: bool = False) -> int | None:
        if self.returncode is None:
            message = self.server.message(timeout)
            if message is None:
                if quiet:
                    return None
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self.returncode = message["code"]
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def serve() -> None:
    """The fork server's loop: a JSON request per line in, the child's pid and then its exit
    status (negative: the signal that ended it) out."""
    import torch
    torch.set_num_threads(1)
    for module in ForkServer.MODULES:
        importlib.import_module(module)
    reply = sys.stdout.buffer
    reply.write(b'{"ready": true}\n')
    reply.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request)  # never returns
        reply.write(json.dumps({"pid": pid}).encode() + b"\n")
        reply.flush()
        status = os.waitpid(pid, 0)[1]
        reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        reply.flush()


def run_child(request: dict) -> None:
    """In the forked child: become `python -m MODULE ARGV` in its folder, then exit."""
    import traceback
    code = 1
    try:
        os.chdir(request["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, closefd=False)  # fd 0 is /dev/null now
        sys.stdout = open(1, "w", closefd=False)  # block-buffered, as a file
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # line-buffered
        sys.argv = [request["module"], *request["argv"]]
        code = importlib.import_module(request["module"]).main(request["argv"])
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else int(err.code is not None)
    except KeyboardInterrupt:  # outside the CLI's handler: die of SIGINT as python does
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # a crash of the command: its traceback, status 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code or 0)


# ---------------------------------------------------------------------------- checking


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def tracked_files(folder: Path) -> list[Path]:
    """The files a comparison covers: everything but temp files, locks and logs."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*")
                  if p.is_file() and not is_temp(p) and p.suffix != ".lock")


def digest(value) -> str:
    """A hash of a nested payload: tensors and arrays by dtype, shape and bytes."""
    from runs.checkpoint import payload_digest
    return payload_digest(value)


def load_pt(path: Path):
    """A checkpoint or mask file, opened the way the toolkit opens it."""
    from runs.checkpoint import read_checkpoint
    return read_checkpoint(path)


def without_rng(payload):
    """A checkpoint without its global RNG state: torch seeds its default generator at
    random in every process, and no computation here draws from it (every draw takes an
    explicit seeded generator), so that state is the only part two runs may not share."""
    if isinstance(payload, dict) and "rng" in payload and "format" in payload:
        return {k: v for k, v in payload.items() if k != "rng"}
    return payload


def result_view(path: Path, folder: Path = None) -> dict:
    """What a result file holds, for comparison: everything but when and where.

    With `folder` (where the command ran) each input's sha256 is checked against the file
    it names there and replaced by the outcome: checkpoints hold the process's RNG state,
    so two runs' files differ in their bytes (and hashes), never in their tensors.
    """
    from runs.results import file_sha256, open_result
    data = open_result(path)
    attrs = {k: v for k, v in data.attrs.items() if k not in WHEN_WHERE}
    if folder is not None and isinstance(attrs.get("inputs"), list):
        attrs["inputs"] = [{**record, "sha256": "of the file" if record.get("path") and (
            file_sha256(folder / record["path"]) == record["sha256"]) else record["sha256"]}
            for record in attrs["inputs"]]
    return {"analysis": data.analysis, "attrs": attrs, "point_dims": data.point_dims,
            "coords": data.coords, "specs": {k: dataclasses.astuple(v)
                                             for k, v in data.specs.items()},
            "done": data.done, "metrics": data.metrics}


def same_arrays(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality, NaN equal to NaN (floats); exact for everything else."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def file_hashes(folder: Path) -> dict[Path, str]:
    """sha256 of every tracked file but drawings (a re-run of the pipeline redraws them)."""
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest()
            for rel in tracked_files(folder) if rel.suffix not in (".pdf", ".png")}


def compare_results(a: dict, b: dict) -> list[str]:
    problems = []
    for key in ("analysis", "attrs", "point_dims", "specs"):
        if a[key] != b[key]:
            problems.append(f"{key} differ")
    for group in ("coords", "metrics"):
        if list(a[group]) != list(b[group]):
            problems.append(f"{group} names differ")
            continue
        problems += [f"{group[:-1]} {name!r} differs" for name in a[group]
                     if not same_arrays(a[group][name], b[group][name])]
    if not same_arrays(a["done"], b["done"]):
        problems.append("done mask differs")
    return problems


def compare_file(rel: Path, root_a: Path, root_b: Path) -> list[str]:
    """Differences between two versions of one file (empty when equal)."""
    a, b = root_a / rel, root_b / rel
    if rel.suffix == ".pt":
        first, second = (without_rng(load_pt(path)) for path in (a, b))
        if digest(first) == digest(second):
            return []
        keys = [k for k in first if digest(first.get(k)) != digest(second.get(k))]
        return [f"{rel}: differs in {', '.join(map(str, keys)) or 'its keys'}"]
    if rel.suffix == ".h5":
        return [f"{rel}: {p}" for p in compare_results(result_view(a, root_a),
                                                       result_view(b, root_b))]
    if rel.suffix in (".pdf", ".png"):
        return []  # drawings: existence is compared; their tables (.md, .tex) are text
    return [] if a.read_bytes() == b.read_bytes() else [f"{rel}: contents differ"]


def compare_folders(reference: Path, other: Path) -> list[str]:
    """Everything that differs between a clean run's folder and a crashed one's."""
    ref_files, other_files = tracked_files(reference), tracked_files(other)
    problems = [f"only in the uninterrupted run: {p}" for p in ref_files
                if p not in other_files]
    problems += [f"only in the killed run: {p}" for p in other_files if p not in ref_files]
    for rel in ref_files:
        if rel in other_files:
            problems += compare_file(rel, reference, other)
    return problems


@dataclass
class Watch:
    """What a killed folder held: finished things must never change afterwards."""
    seen: dict = field(default_factory=dict)  # rel path -> digest of a finished file
    cells: dict = field(default_factory=dict)  # rel path -> (done, metrics) last seen
    opened: int = 0  # files opened across all checks

    def check(self, folder: Path) -> list[str]:
        problems = []
        for rel in tracked_files(folder):
            path = folder / rel
            try:
                problems += self._check_one(rel, path)
            except Exception as err:  # any failure to open is the finding
                problems.append(f"{rel} does not open after a kill: "
                                f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return problems

    def _check_one(self, rel: Path, path: Path) -> list[str]:
        if rel.suffix == ".pt":
            fingerprint = digest(load_pt(path))
            self.opened += 1
            if rel.name in ("resume.pt", "resume.prev.pt"):
                return []  # overwritten as training goes on: only needs to open
            return self._unchanged(rel, fingerprint)
        if rel.suffix == ".h5":
            view = result_view(path)
            self.opened += 1
            return self._cells_kept(rel, view)
        if rel.name == "DONE":
            json.loads(path.read_text())
            return self._unchanged(rel, path.read_bytes())
        if rel.name in ("config.json",):
            json.loads(path.read_text())
            return self._unchanged(rel, path.read_bytes())
        return []

    def _unchanged(self, rel: Path, fingerprint) -> list[str]:
        before = self.seen.setdefault(rel, fingerprint)
        return [] if before == fingerprint else [f"{rel} changed after it was finished"]

    def _cells_kept(self, rel: Path, view: dict) -> list[str]:
        """Cells done before must still be done, with the same values."""
        problems = []
        if rel in self.cells:
            done, metrics = self.cells[rel]
            if done.shape == view["done"].shape:
                if (done & ~view["done"]).any():
                    problems.append(f"{rel}: finished cells became unfinished")
                for name, before in metrics.items():
                    after = view["metrics"].get(name)
                    if after is None or not same_arrays(point_cells(before, done, view, name),
                                                        point_cells(after, done, view, name)):
                        problems.append(f"{rel}: finished cells of {name!r} were recomputed "
                                        f"differently")
        self.cells[rel] = (view["done"].copy(), {k: v.copy() for k, v in
                                                 view["metrics"].items()})
        return problems


def point_cells(array: np.ndarray, done: np.ndarray, view: dict, name: str) -> np.ndarray:
    """The values of a metric at the cells `done` marks (point axes first)."""
    dims = view["specs"][name][0]
    moved = np.moveaxis(array, [dims.index(d) for d in view["point_dims"]],
                        range(len(view["point_dims"])))
    return moved[done]


# ---------------------------------------------------------------------------- the harness


@dataclass
class Report:
    command: str
    clean_s: float  # uninterrupted work time (banner to exit)
    skip_s: float = 0.0  # the same command re-run once everything is done (its start-up)
    pace: float = 1.0  # this machine's speed now against the clean run's (< 1: faster)
    kills: list[float] = field(default_factory=list)  # where each kill aimed, clean-run s
    attempts: int = 0  # runs of the killed folder(s), the finishing ones included
    chains: int = 0  # folders needed (a chain that finished early gets a fresh folder)
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)
    stops: dict = field(default_factory=dict)  # signal name -> exit code
    rows: list[str] = field(default_factory=list)  # the relocation rows passed ("moved ...")

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        spread = ", ".join(f"{t / self.clean_s:.2f}" for t in sorted(self.kills))
        stops = "".join(f", {name} -> exit {code}" for name, code in self.stops.items())
        stops += "".join(f", {row}" for row in self.rows)
        state = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"{self.command}: {state}; clean run {self.clean_s:.2f} s of work (a re-run "
                f"of it {self.skip_s:.2f} s), {len(self.kills)} kills in {self.attempts} "
                f"runs over {self.chains} folder(s) aimed at [{spread}] of it, "
                f"{self.files_checked} file opens checked{stops}")


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


@dataclass
class Harness:
    """Runs commands in folders under `root`: the shared inputs, logs, an optional server."""
    root: Path
    server: ForkServer | None = None

    @property
    def inputs(self) -> Path:
        inputs = self.root / "inputs"
        if not inputs.is_dir():
            make_inputs(inputs)
        return inputs

    def commands(self) -> dict[str, Command]:
        return commands(self.inputs)

    def runner(self, command: Command, folder: Path) -> Runner:
        """A runner for a new folder (made and prepared here) of `command`."""
        folder.mkdir(parents=True)
        if command.prepare is not None:
            command.prepare(folder, self.inputs)
        return Runner(command, folder, folder.parent / "logs", self.server)

    def clean_run(self, command: Command) -> Report:
        """The uninterrupted reference run, in ROOT/COMMAND/clean, timed; then the same
        command again, which must find everything done and change no file."""
        runner = self.runner(command, self.root / command.name / "clean")
        attempt = runner.run()
        if attempt.code != 0:
            return Report(command.name, attempt.work_s, problems=[
                f"uninterrupted run failed (exit {attempt.code}): {tail(attempt.stderr)}"])
        before = file_hashes(runner.folder)
        again = runner.run()
        report = Report(command.name, attempt.work_s, again.work_s)
        if again.code != 0:
            report.problems.append(f"re-running the finished command failed (exit "
                                   f"{again.code}): {tail(again.stderr)}")
        report.problems += [f"re-running the finished command rewrote {rel}"
                            for rel, digest_ in file_hashes(runner.folder).items()
                            if before.get(rel) != digest_]
        return report

    def crash_test(self, command: Command, kills: int, seed: int,
                   max_folders: int = 6) -> Report:
        """SIGKILL `command` at `kills` moments spread over its run (over one or more
        folders), then compare each finished folder with the uninterrupted run."""
        report = self.clean_run(command)
        reference = self.root / command.name / "clean"
        targets = kill_targets(report.clean_s, kills, random.Random(f"{seed}:{command.name}"))
        while report.ok and targets and report.chains < max_folders:
            report.chains += 1
            runner = self.runner(command, self.root / command.name / f"killed{report.chains}")
            watch = Watch()
            finished_ok = kill_chain(runner, targets, report, watch)
            report.problems += watch.check(runner.folder)  # the finished folder opens too
            report.files_checked += watch.opened
            if finished_ok:
                report.problems += [f"{runner.folder.name}: {p}"
                                    for p in compare_folders(reference, runner.folder)]
        if report.ok and len(report.kills) < kills:
            report.problems.append(f"only {len(report.kills)} of {kills} kills landed in "
                                   f"{report.chains} folders (the runs finished first)")
        return report

    def signal_test(self, command: Command, sig: signal.Signals, report: Report,
                    fraction: float = 0.3, tries: int = 4) -> Report:
        """Stop `command` with `sig` part-way: it must exit 128 + sig with a last stderr line
        that says to re-run the same command, and the re-run must finish with the clean
        run's results. A run that finished before the signal came is tried again, sooner."""
        expected = 128 + int(sig)
        reference = self.root / command.name / "clean"
        for number in range(1, tries + 1):
            runner = self.runner(command, self.root / command.name / f"{sig.name}{number}")
            attempt = runner.run(stop_after=fraction * report.clean_s, sig=sig)
            report.stops[sig.name] = attempt.code
            if attempt.code == expected or not finished(reference, runner.folder):
                break
            fraction /= 2  # the work was done before the signal came: try sooner
        last = (attempt.stderr.strip().splitlines() or [""])[-1]
        if attempt.code != expected:
            report.problems.append(f"{sig.name}: exit {attempt.code}, expected {expected}: "
                                   f"{tail(attempt.stderr)}")
            return report
        if RESUME_HINT not in last:
            report.problems.append(f"{sig.name}: the last stderr line does not say to "
                                   f"{RESUME_HINT!r}: {last!r}")
        report.problems += [f"{sig.name}: {p}" for p in Watch().check(runner.folder)]
        again = runner.run()
        if again.code != 0:
            report.problems.append(f"{sig.name}: the re-run failed (exit {again.code}): "
                                   f"{tail(again.stderr)}")
        else:
            report.problems += [f"{sig.name}: {p}"
                                for p in compare_folders(reference, runner.folder)]
        return report


    def killed_part_way(self, command: Command, name: str, report: Report,
                        started: Callable[[Path], bool] = None, fraction: float = 0.5,
                        tries: int = 5) -> Runner | None:
        """A folder ROOT/COMMAND/NAME<n> where `command` was SIGKILLed part-way, after
        `started(folder)` holds (e.g. its result file exists): a run that finished first is
        tried again sooner, one killed before `started` later. None (with a problem noted)
        if no try lands."""
        for number in range(1, tries + 1):
            runner = self.runner(command, self.root / command.name / f"{name}{number}")
            attempt = runner.run(stop_after=fraction * report.clean_s * report.pace)
            if attempt.code == -signal.SIGKILL and (started is None or started(runner.folder)):
                report.problems += [f"{name}: {p}" for p in Watch().check(runner.folder)]
                return runner
            if attempt.code not in (0, -signal.SIGKILL):
                report.problems.append(f"{name}: exit {attempt.code}: {tail(attempt.stderr)}")
                return None
            fraction = fraction / 2 if attempt.code == 0 else min(0.95, fraction * 1.5)
        report.problems.append(f"{name}: no kill landed part-way in {tries} tries")
        return None

    def moved_test(self, command: Command, report: Report) -> Report:
        """Kill `command` part-way, move its folder (store, results) to another place under
        another name, and re-run it from there with --store and --out spelled absolute: it
        must resume (nothing of the kept work redone wrong) and end with the clean run's
        files, bit for bit. Run identities and result configs must not depend on where the
        store is nor on how its path is spelled."""
        runner = self.killed_part_way(command, "moved_from", report)
        if runner is None:
            return report
        target = self.root / command.name / "moved" / runner.folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(runner.folder, target)
        moved = dataclasses.replace(command, argv=spelled_in(command.argv, target))
        attempt = Runner(moved, target, runner.logs, self.server).run()
        if attempt.code != 0:
            report.problems.append(f"moved store: the re-run in the new place failed (exit "
                                   f"{attempt.code}): {tail(attempt.stderr)}")
            return report
        problems = compare_folders(self.root / command.name / "clean", target)
        report.problems += [f"moved store: {p}" for p in problems]
        if not problems:
            report.rows.append("moved store resumed")
        return report

    def changed_data_test(self, command: Command, report: Report) -> Report:
        """Kill `command` (a scan of DATA_FILE) once its result exists, rewrite DATA_FILE
        with other images, re-run: it must exit 2 with one `error:` line saying the file
        changed, and leave every file of the folder as it was."""
        result = out_file(command.argv)
        runner = self.killed_part_way(command, "changed_data", report,
                                      started=lambda folder: (folder / result).is_file())
        if runner is None:
            return report
        write_data(runner.folder / DATA_FILE, seed=1)
        before = file_hashes(runner.folder)
        attempt = runner.run()
        errors = [line for line in attempt.stderr.splitlines() if line.startswith("error")]
        if attempt.code != 2 or len(errors) != 1 or "changed" not in errors[0] \
                or DATA_FILE not in errors[0]:
            report.problems.append(f"changed data: expected exit 2 and one error line naming "
                                   f"{DATA_FILE} as changed; got exit {attempt.code}: "
                                   f"{tail(attempt.stderr)}")
        report.problems += [f"changed data: the refused re-run rewrote {rel}"
                            for rel, digest_ in file_hashes(runner.folder).items()
                            if before.get(rel) != digest_]
        report.problems += [f"changed data: the refused re-run made {rel}"
                            for rel in file_hashes(runner.folder) if rel not in before]
        if report.ok:
            report.rows.append("changed data refused")
        return report


def kill_targets(work_s: float, count: int, rng: random.Random) -> list[float]:
    """`count` moments of the clean run's timeline (seconds after its banner), one drawn
    uniformly in each of `count` equal slices of it: spread over the whole run, seeded."""
    return [work_s * (i + rng.uniform(0.05, 0.95)) / count for i in range(count)]


def kill_chain(runner: Runner, targets: list[float], report: Report, watch: Watch) -> bool:
    """Kill runs in one folder at the next `targets` (consumed as they land), then let the
    command finish. Returns whether it finished cleanly.

    A re-run reaches the clean run's moment t about t - saved seconds after its banner,
    `saved` being the work its predecessors kept. Killed at t, a run keeps at most
    t - start-up (its re-run time once all is done), so that is taken as saved: an
    overestimate, so the next kill lands early rather than after the end.
    """
    saved = 0.0
    while targets:
        moment = targets[0] * report.pace  # seconds after the banner, this machine now
        attempt = runner.run(stop_after=max(0.005, moment - saved))
        report.attempts += 1
        if attempt.code == -signal.SIGKILL:
            report.kills.append(targets.pop(0))
            saved = max(saved, moment - report.skip_s)
            report.problems += watch.check(runner.folder)
            continue
        if attempt.code != 0:
            report.problems.append(f"{runner.folder.name}: a re-run after "
                                   f"{len(report.kills)} kill(s) failed (exit "
                                   f"{attempt.code}): {tail(attempt.stderr)}")
            return False
        if saved == 0.0:  # a whole run took less than the clean one (a warmer cache, a
            # quieter machine): aim the kills still to come at this quicker pace
            report.pace = min(report.pace, attempt.work_s / report.clean_s)
        return True  # it finished before the kill came: this folder is complete
    attempt = runner.run()
    report.attempts += 1
    if attempt.code != 0:
        report.problems.append(f"{runner.folder.name}: the final re-run failed (exit "
                               f"{attempt.code}): {tail(attempt.stderr)}")
        return False
    return True


def finished(reference: Path, folder: Path) -> bool:
    """Whether `folder` already holds everything the clean run made."""
    try:
        return not compare_folders(reference, folder)
    except Exception:  # a file that does not open: not finished
        return False


# ---------------------------------------------------------------------------- CLI

CRASHTEST_EXAMPLES = r"""examples:
  python -m runs.crashtest                     # SIGKILL each long command 20 times, compare
  python -m runs.crashtest train --kills 50 --signals --fresh --keep /tmp/crash
  python -m runs.crashtest interpolate imp --kills 5 --seed 1
  python -m runs.crashtest train imp --kills 2 --moved --changed-data"""


def show(report: Report, began: float) -> bool:
    """Print a command's report line and its problems; whether it passed."""
    print(f"{report.line()} ({time.monotonic() - began:.0f} s)", flush=True)
    for problem in report.problems:
        print(f"  {problem}", flush=True)
    return report.ok


def main(argv=None) -> int:
    if argv is None and sys.argv[1:] == ["--serve"]:
        serve()
        return 0
    from runs.config import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m runs.crashtest", description=__doc__,
                                epilog=CRASHTEST_EXAMPLES, formatter_class=HelpFormatter)
    names = list(commands(Path("inputs")))
    p.add_argument("commands", nargs="*", default=names, metavar="COMMAND",
                   help=f"commands to test (default: all): {', '.join(names)}")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs per command")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--signals", action="store_true", help="also stop each command with "
                   "SIGINT and SIGTERM and check the exit code, message and resume")
    p.add_argument("--moved", action="store_true", help="also kill each command that has a "
                   f"store ({', '.join(MOVABLE)}) part-way, move its folder and resume it "
                   "there with absolute paths: the clean run's files")
    p.add_argument("--changed-data", action="store_true", help="also kill a scan of a .npz "
                   "part-way, rewrite the file and check that the re-run refuses")
    p.add_argument("--fresh", action="store_true", help="start every run in a fresh "
                   "interpreter (slower) instead of forking it from a server that has "
                   "imported torch and the commands once")
    p.add_argument("--keep", default="", help="keep the folders here (default: a temp "
                   "folder, removed at the end)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.commands) - set(names))
    if unknown or args.kills < 1:
        p.error(f"unknown command(s) {', '.join(unknown)}; valid: {', '.join(names)}"
                if unknown else f"--kills {args.kills}: must be at least 1")
    import torch
    torch.set_num_threads(1)
    root = Path(args.keep or tempfile.mkdtemp(prefix="crashtest_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    failed = 0
    server = None if args.fresh else ForkServer()
    try:
        harness = Harness(root, server)
        table = harness.commands()
        for name in args.commands:
            began = time.monotonic()
            report = harness.crash_test(table[name], args.kills, args.seed)
            if args.signals and report.ok:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    harness.signal_test(table[name], sig, report)
            if args.moved and report.ok and name in MOVABLE:
                harness.moved_test(table[name], report)
            failed += not show(report, began)
        if args.changed_data:
            began, command = time.monotonic(), data_command(harness.inputs)
            report = harness.clean_run(command)
            if report.ok:
                harness.changed_data_test(command, report)
            failed += not show(report, began)
    finally:
        if server is not None:
            server.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = len(args.commands) + args.changed_data  # the changed-data scan: one more
    print(f"{total - failed} of {total} commands survived every kill"
          + (f"; folders kept in {root}" if args.keep else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
