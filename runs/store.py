"""The run store: `<root>/<kind>_<hash>/seed_<s>/` with config, checkpoints, metrics, DONE.

    run = open_run("store", "train", cfg, seed=0)   # creates or reopens, checks config.json
    if run.done: return
    start = run.latest_step()                        # None, or the step to resume from
    run.log({"step": 100, "loss": 0.3}); save_checkpoint(run.ckpt_path(100), ...)
    run.mark_done({"test_accuracy": 0.91})
"""

import dataclasses
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from runs.config import IDENTITY_EXCLUDE, to_dict
from runs.errors import UserError, disk_full, with_filename
from runs.recipe import fill_legacy, legacy_values

CKPT_DIGITS = 7  # step_0000000.pt: sorts by name up to 10M iterations
_CKPT_NAME = re.compile(r"^step_(\d+)\.pt$")


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name that `write` creates itself, so the file gets the umask's mode
    # (mkstemp would leave every checkpoint readable by its owner only, 0600).
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if disk_full(err) is None:
            raise
        raise with_filename(err, path) from None  # a full disk: name the file


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass(frozen=True)
class Run:
    path: Path  # <root>/<kind>_<hash>/seed_<s>

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "ckpt"

    def ckpt_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step_{step:0{CKPT_DIGITS}d}.pt"

    def steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending (temp files are ignored)."""
        if not self.ckpt_dir.is_dir():
            return []
        names = (_CKPT_NAME.match(p.name) for p in self.ckpt_dir.iterdir())
        return sorted(int(m[1]) for m in names if m)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self, summary: dict | None = None) -> None:
        atomic_write_text(self.path / "DONE", json.dumps(summary or {}, sort_keys=True) + "\n")

    def summary(self) -> dict:
        return json.loads((self.path / "DONE").read_text()) if self.done else {}

    def config(self) -> dict:
        """config.json; a run written before a field existed gets that field's value as
        the run was made with it (runs.recipe.LEGACY), never today's default."""
        record = json.loads((self.path / "config.json").read_text())
        if isinstance(record.get("config"), dict):
            record["config"] = fill_legacy(record.get("kind", ""), record["config"])
        return record

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl, flushed to disk."""
        path = self.path / "metrics.jsonl"
        try:
            with open(path, "ab+") as f:
                # After a crash mid-append the last line is partial: start a new line, or
                # this record would be glued to it and dropped with it by `metrics()`.
                head = "\n" if _ends_mid_line(f) else ""
                f.write((head + json.dumps(record, sort_keys=True) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if disk_full(err) is None:
                raise
            raise with_filename(err, path) from None  # (a partial line is dropped later)

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        # A crash mid-append can leave a partial last line: drop it, keep the rest.
        return [json.loads(line) for line in lines if _is_json(line)]

    def trim_metrics(self, after_step: int) -> None:
        """Drop records logged after `after_step`: a resumed run logs them again."""
        keep = [r for r in self.metrics() if r.get("step", -1) <= after_step]
        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def _ends_mid_line(file) -> bool:
    """Whether a binary file is non-empty and lacks a final newline."""
    if file.seek(0, os.SEEK_END) == 0:
        return False
    file.seek(-1, os.SEEK_END)
    return file.read(1) != b"\n"


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def identity(kind: str, cfg, exclude=IDENTITY_EXCLUDE) -> dict:
    """The fields that name a run: those that differ from their baseline value.

    The baseline is the field's default, except for the fields issue #18 added or changed
    (runs.recipe.LEGACY): there it is the value runs made before used. Old runs keep their
    folder (their identity is unchanged), and today's defaults (the paper recipe: raw head,
    alpha 0, ...) get new folders instead of reopening a run made the old way.
    """
    baseline = legacy_values(kind, to_dict(cfg))
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in exclude and value != baseline.get(f.name, f.default):
            out[f.name] = value
    return json.loads(json.dumps(out))


def identity_hash(kind: str, cfg, length: int = 8) -> str:
    """Short stable hash of `identity` (runs.config.config_hash where no field has a
    legacy baseline)."""
    text = json.dumps(identity(kind, cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_path(root, kind: str, cfg, seed: int) -> Path:
    return Path(root) / f"{kind}_{identity_hash(kind, cfg)}" / f"seed_{seed}"


def open_run(root, kind: str, cfg, seed: int = None, extra: dict = None) -> Run:
    """Create the run directory (or reopen it) and write/check its config.json.

    `extra` keys sit at the top level of config.json beside kind/seed/config and are written
    only on creation; refs read `steps_per_epoch` (for RUN@2ep) and `model_spec` (RUN@init).
    """
    seed = getattr(cfg, "seed", 0) if seed is None else seed
    run = Run(run_path(root, kind, cfg, seed))
    clash = sorted({"kind", "seed", "config", "identity"} & set(extra or {}))
    if clash:
        raise ValueError(f"open_run: extra may not set {', '.join(clash)}")
    # `identity` (the non-default fields, what the hash covers) decides whether a stored
    # run is this one: adding a field with a default later does not orphan old runs.
    record = {"kind": kind, "seed": seed, "config": to_dict(cfg),
              "identity": identity(kind, cfg), **(extra or {})}
    config_file = run.path / "config.json"
    if config_file.exists():
        found = json.loads(config_file.read_text())
        if found.get("kind") != kind or found.get("identity") != record["identity"]:
            raise UserError(f"{config_file} holds another config than this command's "
                            f"(hash collision or changed defaults); use another --store")
        return run
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return run


def find_run(path) -> Run:
    """A run from its seed directory, or from `<kind>_<hash>/` when it holds one seed."""
    path = Path(path)
    if (path / "config.json").exists():
        return Run(path)
    seeds = sorted(p.name for p in path.glob("seed_*") if (p / "config.json").exists())
    if len(seeds) == 1:
        return Run(path / seeds[0])
    if seeds:
        raise UserError(f"{path} holds several runs ({', '.join(seeds)}); name one, "
                        f"e.g. {path / seeds[0]}")
    raise UserError(f"no run at {path} (expected a directory with config.json)")
