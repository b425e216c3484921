"""The run store: `<root>/<kind>_<hash>/seed_<s>/` with config, checkpoints, metrics, DONE.

    run = open_run("store", "train", cfg, seed=0)   # creates or reopens, checks config.json
    if run.done: return
    start = run.latest_step()                        # None, or the step to resume from
    run.log({"step": 100, "loss": 0.3}); save_checkpoint(run.ckpt_path(100), ...)
    run.mark_done({"test_accuracy": 0.91})

Runs are relocatable: a config field that names a file (metadata `content="file"`, a mask) or
a checkpoint reference (`content="ref"`: --init, --rewind) enters the run's identity (its
folder's hash) by the sha256 of what the file holds, never by how its path is spelled, and
config.json records such a path relative to the store when it lies inside it (listed under
`store_relative`; `Run.config` joins it to wherever the store is now). A store copied or moved
elsewhere, or named `store` one day and `/abs/store` the next, holds the same runs.
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
    def root(self) -> Path:
        """The store holding this run (`<root>/<kind>_<hash>/seed_<s>`)."""
        return self.path.parent.parent

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self, summary: dict | None = None) -> None:
        self.require()
        atomic_write_text(self.path / "DONE", json.dumps(summary or {}, sort_keys=True) + "\n")

    def summary(self) -> dict:
        return read_json(self.path / "DONE") if self.done else {}

    def require(self) -> None:
        """A UserError if the run's folder (its config.json) is gone: deleted or moved while
        this process trained it. Writing on would make a run folder without a record."""
        if not (self.path / "config.json").is_file():
            raise UserError(f"run folder {self.path} disappeared while this command was "
                            f"using it (deleted or moved?); re-run the same command to start "
                            f"the run again")

    def config(self) -> dict:
        """config.json; a run written before a field existed gets that field's value as
        the run was made with it (runs.recipe.LEGACY), never today's default. Paths the
        record keeps relative to the store (`store_relative`) come back joined to the
        store's place now."""
        record = read_json(self.path / "config.json")
        if not isinstance(record, dict):
            raise UserError(f"{self.path / 'config.json'} is not a run record (a JSON object); "
                            f"restore it or delete the run folder {self.path}")
        if isinstance(record.get("config"), dict):
            config = fill_legacy(record.get("kind", ""), record["config"])
            record["config"] = from_store(config, record.get("store_relative", ()), self.root)
        return record

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl, flushed to disk."""
        path = self.path / "metrics.jsonl"
        self.require()
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


def read_json(path: Path):
    """A run's JSON record (config.json, DONE); a damaged one is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing (the run folder was deleted or moved?)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({str(err).splitlines()[0][:80]}): the "
                        f"run's record is damaged; restore it or delete the run folder "
                        f"{Path(path).parent}") from None


# ---------------------------------------------------------------------------- identity by content

_SHA_CACHE: dict = {}  # (real path, size, mtime_ns) -> hex digest: each file hashed once


def cached_digest(path, compute) -> str:
    """`compute(path)`, remembered for this file as long as its size and mtime stay."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns, compute)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = compute(real)
    return _SHA_CACHE[key]


def file_digest(path) -> str:
    """Hex sha256 of a file's bytes (cached by path, size and mtime)."""
    from runs.results import file_sha256
    return cached_digest(path, file_sha256)


def content_value(name: str, value, kind: str | None):
    """What a config field contributes to a run's identity: its value, or for a field that
    names a file (`kind` "file") or a checkpoint reference ("ref") what the file holds."""
    if not kind or not value:
        return value
    if kind == "ref":
        from runs.refs import content_ref
        return content_ref(value)
    if not Path(value).is_file():
        raise UserError(f"--{name.replace('_', '-')} {value}: no such file")
    return f"sha256:{file_digest(value)}"


def content_fields(cfg) -> dict[str, str]:
    """{field name: "file" | "ref"} of a config's fields that name files."""
    return {f.name: f.metadata["content"] for f in dataclasses.fields(cfg)
            if f.metadata.get("content")}


def to_store(config: dict, kinds: dict, root) -> tuple[dict, list[str]]:
    """(config with the paths inside the store `root` made relative to it, their fields)."""
    out, moved = dict(config), []
    for name, kind in kinds.items():
        relative = _store_relative(config.get(name), kind, root)
        if relative is not None:
            out[name], moved = relative, [*moved, name]
    return out, moved


def from_store(config: dict, names, root) -> dict:
    """`to_store` undone: the listed fields joined to the store's place `root` now."""
    out = dict(config)
    for name in names:
        if isinstance(out.get(name), str) and out[name]:
            out[name] = _joined(out[name], root)
    return out


def _store_relative(value, kind: str, root) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    if kind == "ref":
        from runs.refs import with_source
        return with_source(value, lambda source: _inside(source, root))
    return _inside(value, root)


def _inside(path: str, root) -> str | None:
    """`path` relative to `root` when it lies inside it (links resolved), else None."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except (ValueError, OSError):
        return None


def _joined(value: str, root) -> str:
    from runs.refs import with_source
    joined = with_source(value, lambda source: str(Path(root) / source))
    return value if joined is None else joined


def identity(kind: str, cfg, exclude=IDENTITY_EXCLUDE, by_content: bool = True) -> dict:
    """The fields that name a run: those that differ from their baseline value; a field
    that names a file by the sha256 of its content (`content_value`), unless `by_content`
    is False (the spelling runs made before relocatable stores were named by).

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
            kind_of_file = f.metadata.get("content") if by_content else None
            out[f.name] = content_value(f.name, value, kind_of_file)
    return json.loads(json.dumps(out))


def _hash(record: dict, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:length]


def identity_hash(kind: str, cfg, length: int = 8) -> str:
    """Short stable hash of `identity` (runs.config.config_hash where no field has a
    legacy baseline)."""
    return _hash(identity(kind, cfg), length)


def _legacy_identity(kind: str, cfg) -> dict | None:
    """The identity by path spelling that runs made before content identities were named
    by, where it differs from today's (a run with a mask, --init or --rewind); else None."""
    if not any(getattr(cfg, name) for name in content_fields(cfg)):
        return None
    return identity(kind, cfg, by_content=False)


def _seed_dir(root, kind: str, record: dict, seed: int) -> Path:
    return Path(root) / f"{kind}_{_hash(record)}" / f"seed_{seed}"


def run_path(root, kind: str, cfg, seed: int) -> Path:
    """The run's folder: named by its identity, or where a run made before content
    identities lies (named by the spelling of its files' paths), if only that one exists."""
    path = _seed_dir(root, kind, identity(kind, cfg), seed)
    legacy = _legacy_identity(kind, cfg)
    if legacy is not None and not path.exists():
        old = _seed_dir(root, kind, legacy, seed)
        if (old / "config.json").is_file():
            return old
    return path


def check_store(root) -> None:
    """--store must be a folder (or not exist yet): a file there is a one-line error."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--store {root}: a file, not a folder; give the run store's folder")
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--store {root}: {parent} is a file, not a folder")
            break


def open_run(root, kind: str, cfg, seed: int = None, extra: dict = None) -> Run:
    """Create the run directory (or reopen it) and write/check its config.json.

    `extra` keys sit at the top level of config.json beside kind/seed/config and are written
    only on creation; refs read `steps_per_epoch` (for RUN@2ep), `init_step` (RUN@init: the
    step of the state the run started from) and `model_spec`.
    """
    check_store(root)
    seed = getattr(cfg, "seed", 0) if seed is None else seed
    run = Run(run_path(root, kind, cfg, seed))
    clash = sorted({"kind", "seed", "config", "identity", "store_relative"} & set(extra or {}))
    if clash:
        raise ValueError(f"open_run: extra may not set {', '.join(clash)}")
    # `identity` (the non-default fields, what the hash covers) decides whether a stored
    # run is this one: adding a field with a default later does not orphan old runs.
    config, moved = to_store(to_dict(cfg), content_fields(cfg), root)
    record = {"kind": kind, "seed": seed, "config": config,
              "identity": identity(kind, cfg), **(extra or {})}
    if moved:
        record["store_relative"] = moved
    config_file = run.path / "config.json"
    if config_file.exists():
        found = read_json(config_file)
        known = (record["identity"], _legacy_identity(kind, cfg))
        if not isinstance(found, dict) or found.get("kind") != kind or \
                found.get("identity") not in known:
            raise UserError(f"{config_file} holds another config than this command's "
                            f"(hash collision or changed defaults); use another --store")
        check_data(run, found.get("data_inputs") or [], (extra or {}).get("data_inputs", []))
        return run
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return run


def check_data(run: Run, recorded: list, current: list) -> None:
    """Refuse to resume a run whose data files changed since it started (by sha256, so a
    moved data folder with the same bytes resumes): its checkpoints were trained on the old
    bytes, and the rest of the run would train on the new ones."""
    from runs.filehash import changed_data
    changed = changed_data(recorded, current)
    if changed:
        path, how = changed
        raise UserError(f"{path} changed since the run {run.path} was started ({how}); "
                        f"restore the file, or train a new run (another --store)")


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
