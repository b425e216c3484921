"""The one HDF5 result layer: every analysis writes, resumes, shards and reads results here.

A result file is flat, so `xarray.open_dataset(path, engine="h5netcdf")` opens it as a
labelled dataset (see DESIGN.md, "One HDF5 result schema"):

- root attributes: `schema` ("results/1"), `analysis`, `created_utc`, `package_version`,
  `git_sha`, `git_dirty`, `torch_version`, `device`, `config` (JSON), `inputs` (JSON list of
  {"path", "sha256", ...}: checkpoints, and data files with "kind": "data", size and mtime,
  see runs.filehash), `shard` ("i/n", shard files only), plus the analysis' own (`bn_mode`);
- coordinates: 1-D datasets made HDF5 dimension scales (numbers or strings);
- metrics: N-D float datasets, every axis attached to its scale, attrs `units`, `long_name`;
  NaN until written;
- `done`: a bool mask over the point axes (the axes a scan iterates over).

    with create_result("out/interp.h5", "interpolate", {"pair": ["0-1"], "alpha": alphas},
                       {"loss": MetricSpec(("pair", "alpha"), "nats", "test loss")},
                       point_dims=("pair", "alpha"), config=cfg, inputs=ckpts,
                       device="cuda") as result:
        for cell in result.missing():
            result.write(cell, loss=evaluate(**result.labels(cell)))

Only this toolkit's own result of the same analysis is ever resumed or replaced (--overwrite
included); a resume whose data files changed is refused, naming the file. Sizes beyond
MAX_POINTS / MAX_RESULT_BYTES are refused before a file exists.

Writes are crash-safe: the skeleton is written to a temp file and renamed into place, data
sets are allocated up front (so a cell write never touches HDF5 metadata), and every cell is
flushed as it finishes. A killed scan re-run with the same arguments resumes from `done`.

This module must not import torch: figures read results on machines without it.
"""

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import secrets
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from runs import __version__, filehash
from runs.errors import DISK_FULL, UserError, cli, unknown

SCHEMA = "results/1"
# Provenance attrs that may differ between shards; a merge joins their distinct values.
PROVENANCE = ("package_version", "git_sha", "git_dirty", "torch_version", "device")
# Root attrs written by this module; an analysis' extra attrs may not reuse these names.
STANDARD_ATTRS = ("schema", "analysis", "created_utc", *PROVENANCE, "config", "inputs",
                  "shard", "merged_from")
DONE = "done"
# Sizes refused before a file is made: beyond these a grid is a typo (`--grid 0:1:100000000`),
# not a study. Point cells are model evaluations; bytes are the file's estimated size.
MAX_POINTS = 10**7
MAX_RESULT_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """How one metric is stored. Its dims must include every point dim, in any order, or
    none of them: a summary of the whole scan (a refined barrier), set by `write_summary`."""

    dims: tuple[str, ...]  # axis names, each a key of coords; e.g. ("pair", "alpha", "example")
    units: str = ""  # e.g. "nats", "fraction"; "" for dimensionless counts
    long_name: str = ""  # axis label for figures, e.g. "test loss"
    dtype: str = "f4"  # a float dtype: f4 halves the file, f8 for sums that need it

    def __post_init__(self):
        dims = (self.dims,) if isinstance(self.dims, str) else tuple(self.dims)
        dtype = np.dtype(self.dtype)
        if dtype.kind != "f":
            raise ValueError(f"metric dtype must be a float (NaN marks missing), got {dtype}")
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "dtype", dtype.str.lstrip("<>=|"))


@dataclasses.dataclass
class ResultData:
    """A result file read into memory: what `open_result` returns."""

    path: str
    analysis: str
    attrs: dict  # root attributes; `config` and `inputs` parsed from JSON
    coords: dict[str, np.ndarray]  # name -> 1-D labels, in file order; strings as str arrays
    point_dims: tuple[str, ...]  # the axes of `done`
    specs: dict[str, MetricSpec]
    metrics: dict[str, np.ndarray]  # name -> N-D array over specs[name].dims, NaN where missing
    done: np.ndarray | None  # bool over point_dims

    @property
    def config(self) -> dict:
        return self.attrs["config"]

    @property
    def shard(self) -> tuple[int, int] | None:
        """(i, n) for a shard file, None for a whole or merged scan."""
        return parse_shard(self.attrs["shard"]) if "shard" in self.attrs else None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the point grid."""
        return tuple(len(self.coords[dim]) for dim in self.point_dims)


# ---------------------------------------------------------------------------- provenance


def file_sha256(path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def git_state() -> tuple[str, str]:
    """(sha, dirty) of the checkout holding runs/; "unknown" where git cannot say."""
    here = Path(__file__).resolve().parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(here), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else ("true" if status else "false")
    return sha, dirty


def torch_version() -> str:
    """The installed torch version without importing torch; "absent" if not installed."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config_json(config) -> str:
    """Canonical JSON (sorted keys) so equal configs give equal strings; accepts dataclasses."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.dumps(config, sort_keys=True, default=str)


def _input_records(inputs) -> list[dict]:
    """Checkpoint paths (hashed here) or ready {"path", "sha256"} dicts -> list of dicts."""
    records = []
    for item in inputs or ():
        if isinstance(item, Mapping):
            if not {"path", "sha256"} <= set(item):
                raise ValueError(f"an input record needs 'path' and 'sha256', got {item}")
            # Extra keys (the reference as written, its step) travel along as given.
            records.append({**item, "path": str(item["path"]), "sha256": str(item["sha256"])})
        else:
            records.append({"path": str(item), "sha256": file_sha256(item)})
    return records


# ---------------------------------------------------------------------------- shards


def parse_shard(spec: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; anything else is a UserError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    index, count = (int(match[1]), int(match[2])) if match else (-1, 0)
    if not 0 <= index < count:
        raise UserError(f"--shard expects i/n with 0 <= i < n, e.g. 0/4; got {spec!r}")
    return index, count


def shard_path(path, i: int, n: int) -> str:
    """The conventional file of shard i of n: "x.h5" -> "x.shard0of4.h5"."""
    path = Path(path)
    return str(path.with_name(f"{path.stem}.shard{i}of{n}{path.suffix}"))


def _owned_flat(size: int, shard: tuple[int, int] | None) -> np.ndarray:
    """Flat C-order indices owned by a shard: those with index % n == i (all if None)."""
    flat = np.arange(size)
    return flat if shard is None else flat[flat % shard[1] == shard[0]]


def owned_cells(shape: Sequence[int], shard: tuple[int, int] | None = None) -> list[tuple]:
    """Point cells owned by `shard` (every cell belongs to exactly one shard of n), C order."""
    flat = _owned_flat(int(np.prod(shape, dtype=np.int64)), shard)
    return _cells(flat, shape)


def _cells(flat: np.ndarray, shape) -> list[tuple]:
    return [tuple(int(i) for i in cell) for cell in zip(*np.unravel_index(flat, tuple(shape)))]


# ---------------------------------------------------------------------------- write lock


class WriteLock:
    """Exclusive locks held while a result file is open for writing, keyed by what the file
    is, not how its path is spelled: a flock on `<real path>.lock` (symlinks and relative
    spellings resolved) and, while the file exists, an OFD lock on the file's own inode (a
    hard link or another mount of it). A second writer by any name is refused.

    Readers take no lock, so `show` and figures can peek at a running scan; `merge` reads its
    shards without writing anything beside them (see `being_written`).
    """

    def __init__(self, path):
        self.shown = str(path)  # as the user wrote it, for messages
        self.target = os.path.realpath(path)
        self.path = f"{self.target}.lock"
        self.fd = None
        self.inode_fd = None

    def acquire(self) -> "WriteLock":
        for _ in range(10):
            with _writing(self.shown):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise _busy(self.shown, pid) from None
            # The last holder unlinks the lock file on release; if that happened between our
            # open and flock we hold an orphan inode and must retry on the fresh file.
            if self._still_linked(fd):
                self.fd = fd
                try:
                    with _writing(self.shown):  # the pid: what a refused writer is told
                        os.ftruncate(fd, 0)
                        os.write(fd, f"{os.getpid()}\n".encode())
                    self.lock_inode()
                except BaseException:
                    self.release()
                    raise
                return self
            os.close(fd)
        raise UserError(f"could not lock {self.path}: it keeps being replaced")

    def _still_linked(self, fd) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def lock_inode(self) -> None:
        """Lock the result file's inode (again, after a new file took the name): one byte far
        past any data, an OFD lock, which neither HDF5's own flock nor a reader meets. A
        no-op while the file does not exist, and where OFD locks do not (not Linux)."""
        self._unlock_inode()
        if not hasattr(fcntl, "F_OFD_SETLK") or not sys.platform.startswith("linux"):
            return
        try:
            with _writing(self.shown):
                fd = os.open(self.target, os.O_RDWR)
        except (FileNotFoundError, IsADirectoryError):  # not yet made; a run's folder
            return
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _ofd_lock(fcntl.F_WRLCK))
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise _busy(self.shown, "unknown; it writes the same file by another name") \
                    from None
            return  # a file system without byte-range locks: the path lock stands alone
        self.inode_fd = fd

    def _unlock_inode(self) -> None:
        if self.inode_fd is not None:
            os.close(self.inode_fd)  # closing the description drops its OFD lock
            self.inode_fd = None

    def release(self) -> None:
        self._unlock_inode()
        if self.fd is None:
            return
        # Unlink while still holding the lock, so no one can lock the name we remove.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


_INODE_LOCK_AT = 1 << 62  # the byte an inode lock covers: beyond any file this writes


def _ofd_lock(kind: int) -> bytes:
    """A Linux `struct flock` (short type, short whence, off_t start, off_t len, pid_t pid)
    for one byte at _INODE_LOCK_AT; OFD locks need pid 0."""
    return struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, _INODE_LOCK_AT, 1, 0)


def _busy(path, pid) -> UserError:
    return UserError(f"{path} is being written by another process (pid {pid}); wait for it "
                     f"to finish or stop it")


def being_written(path) -> str | None:
    """The pid (as text) of a process writing the result at `path`, None if none is; looks
    without creating or locking anything (a read-only folder stays untouched)."""
    lock = f"{os.path.realpath(path)}.lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no writer
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- OS errors

_ERRNO_TEXT = re.compile(r"errno = (\d+)")
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _errno_of(err: BaseException) -> int | None:
    """The OS error number behind `err` or the errors it was raised from: an OSError's own,
    or the "errno = N" that HDF5 writes into its RuntimeError messages."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        if isinstance(err, (OSError, RuntimeError)) and (match := _ERRNO_TEXT.search(str(err))):
            return int(match[1])
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _writing(path):
    """Report OS failures while writing `path` the way the CLIs print them in one line: a full
    disk as OSError(ENOSPC) naming `path` (runs.errors.cli says "No space left on device while
    writing PATH"), no permission or a read-only file system as a UserError."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        code = _errno_of(err)
        if code in DISK_FULL:
            raise OSError(code, os.strerror(code), str(path)) from None
        if code in READ_ONLY:
            why = "read-only file system" if code == errno.EROFS else "permission denied"
            raise UserError(f"cannot write {path}: {why}; choose a writable output folder "
                            f"(--out) or change its permissions") from None
        raise


# ---------------------------------------------------------------------------- create / resume


def create_result(path, analysis: str, coords: Mapping, metrics: Mapping,
                  point_dims: Sequence[str], config, inputs, device, attrs: Mapping = None,
                  overwrite: bool = False, shard=None) -> "Result":
    """Create (or resume) the result file at `path` and return it open for writing.

    coords: ordered name -> 1-D labels (numbers or strings).
    metrics: name -> MetricSpec or (dims, units, long_name[, dtype]).
    point_dims: the axes a scan iterates over; `done` lives on them.
    config: the analysis' config (dict or dataclass), stored as JSON.
    inputs: checkpoint paths (hashed here) or {"path", "sha256"} dicts.
    attrs: extra root attributes, e.g. {"bn_mode": "reset"}.
    shard: (i, n) or "i/n" when this file holds one shard of the scan.

    An existing file with the same analysis, config, inputs (by sha256), coords, metrics,
    attrs and shard is reopened to resume; a different one is a UserError unless `overwrite`.
    Holding the returned Result keeps other writers out (see WriteLock); close it when done.
    """
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    coords = _normalize_coords(coords)
    specs = _normalize_specs(metrics)
    point_dims = tuple(point_dims)
    _check_layout(coords, specs, point_dims)
    root = _root_attrs(analysis, config, inputs, device, attrs or {}, shard)
    return _open_writer(path, root, coords, specs, point_dims, overwrite, resume=True)


def new_result(path, analysis: str, coords: Mapping, metrics: Mapping,
               point_dims: Sequence[str], config, inputs, device, attrs: Mapping = None,
               overwrite: bool = False, shard=None) -> "Grid":
    """`create_result` for a file; a `MemoryResult` with the same layout when path is None.

    One way to lay out a result for both doors: the CLIs write files, the Python API fills
    the same grid in memory and returns it as an xarray.Dataset.
    """
    if path is not None:
        return create_result(path, analysis, coords, metrics, point_dims, config, inputs,
                             device, attrs, overwrite, shard)
    coords, specs = _normalize_coords(coords), _normalize_specs(metrics)
    _check_layout(coords, specs, tuple(point_dims))
    _check_size(None, coords, specs, tuple(point_dims))  # memory is bounded as files are
    root = _root_attrs(analysis, config, inputs, device, attrs or {}, None)
    return MemoryResult(root, coords, specs, point_dims)


def _normalize_coords(coords: Mapping) -> dict[str, np.ndarray]:
    out = {}
    for name, labels in coords.items():
        array = np.asarray(labels)
        if array.dtype.kind == "O" and all(isinstance(x, str) for x in array.flat):
            array = array.astype(str)
        if array.ndim != 1 or array.dtype.kind not in "iufU":
            raise ValueError(f"coord {name!r} must be 1-D numbers or strings, "
                             f"got shape {array.shape} dtype {array.dtype}")
        out[name] = array
    return out


def _normalize_specs(metrics: Mapping) -> dict[str, MetricSpec]:
    return {name: spec if isinstance(spec, MetricSpec) else MetricSpec(*spec)
            for name, spec in metrics.items()}


def _check_layout(coords, specs, point_dims) -> None:
    """Catch programming errors in the layout before anything touches the disk."""
    for name in [*coords, *specs]:
        if not name.isidentifier() or name == DONE:
            raise ValueError(f"{name!r} is not a usable coord/metric name "
                             f"(must be a Python identifier other than {DONE!r})")
    if clash := set(coords) & set(specs):
        raise ValueError(f"names used both as coord and metric: {sorted(clash)}")
    if len(set(point_dims)) != len(point_dims):
        raise ValueError(f"point_dims repeat a name: {point_dims}")
    for name, spec in {DONE: MetricSpec(point_dims), **specs}.items():
        for dim in spec.dims:
            if dim not in coords:
                raise ValueError(f"{name!r} uses dim {dim!r}, which is not a coord; "
                                 f"coords: {', '.join(coords)}")
        whole = set(point_dims) <= set(spec.dims) or not set(point_dims) & set(spec.dims)
        if not whole or len(set(spec.dims)) != len(spec.dims):
            raise ValueError(f"metric {name!r} dims {spec.dims} must hold every point dim "
                             f"{point_dims} once (or none: a summary)")


def _attr_value(value):
    """Numbers and strings as they are; anything else (bools, lists, dicts) as JSON."""
    if isinstance(value, (str, int, float, np.integer, np.floating)) and \
            not isinstance(value, bool):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _root_attrs(analysis, config, inputs, device, attrs, shard) -> dict:
    sha, dirty = git_state()
    root = {"schema": SCHEMA, "analysis": analysis, "created_utc": _utc_now(),
            "package_version": __version__, "git_sha": sha, "git_dirty": dirty,
            "torch_version": torch_version(), "device": str(device),
            "config": _config_json(config), "inputs": json.dumps(_input_records(inputs))}
    if shard is not None:
        root["shard"] = f"{shard[0]}/{shard[1]}"
    for key, value in attrs.items():
        if key in STANDARD_ATTRS:
            raise ValueError(f"attr {key!r} is set by runs.results; pick another name")
        root[key] = _attr_value(value)
    return root


def _open_writer(path, root, coords, specs, point_dims, overwrite, resume) -> "Result":
    """Lock `path`, then resume the file there or write a fresh skeleton; return it open.

    Everything a user can get wrong is checked before anything is written: the path (empty,
    a folder, under a file), the size, and what an existing file is (`--overwrite` replaces
    only a result of the same analysis that this toolkit wrote).
    """
    analysis = root["analysis"]
    real = _check_out_path(path, analysis)
    _check_size(path, coords, specs, point_dims)
    with _writing(path):
        Path(real).parent.mkdir(parents=True, exist_ok=True)
    lock = WriteLock(path).acquire()
    try:
        if os.path.exists(real):
            if why := _not_ours(real, analysis):
                raise UserError(f"{path} {why}; --overwrite replaces only "
                                f"this toolkit's own {analysis!r} result files: choose another "
                                f"output path (or move the file away yourself)")
            if not overwrite and not resume:
                raise UserError(f"{path} already exists; pass --overwrite to replace it")
            if not overwrite:
                planned = ResultData(str(path), analysis, _parse_attrs(root, path), coords,
                                     point_dims, specs, {}, None)
                _check_resumable(path, planned)
                return Result(path, lock)
        with _writing(path):
            _write_skeleton(real, root, coords, specs, point_dims)
        lock.lock_inode()  # the new file is a new inode
        return Result(path, lock)
    except BaseException:
        lock.release()
        raise


def _check_out_path(path, analysis: str) -> str:
    """The real path (symlinks resolved) a result is written to; a one-line UserError for an
    empty path, a folder, or a path below a file."""
    text = "" if path is None else os.fspath(path)
    if not str(text).strip():
        raise UserError(f"the result path is empty (--out ''); give a file such as "
                        f"out/{analysis}.h5")
    real = os.path.realpath(text)
    if os.path.isdir(real) or str(text).endswith(os.sep):
        raise UserError(f"{path} is a folder, not a result file; give a file path such as "
                        f"{os.path.join(text, analysis + '.h5')}")
    for folder in Path(real).parents:
        if os.path.exists(folder):
            if not os.path.isdir(folder):
                raise UserError(f"cannot write {path}: {folder} is a file, not a folder")
            break
    return real


def _not_ours(path, analysis: str) -> str | None:
    """Why the existing file at `path` may not be replaced or resumed (None if it may): it is
    a result of `analysis` with this toolkit's schema attribute. A damaged one (cut short by
    a full disk or a copy) still counts as ours when its bytes hold both names."""
    if not os.path.isfile(path):
        return "exists and is not a regular file"
    if not h5py.is_hdf5(path):
        return "exists and is not an HDF5 result file (a checkpoint, an .npz or another file?)"
    try:
        with h5py.File(path, "r", locking=False) as file:
            schema, found = file.attrs.get("schema"), file.attrs.get("analysis")
    except (OSError, RuntimeError, ValueError, KeyError):
        return None if _names_in_bytes(path, analysis) else "exists and is an unreadable HDF5 file"
    schema, found = (v.decode() if isinstance(v, bytes) else v for v in (schema, found))
    if schema != SCHEMA:
        return f"exists and is an HDF5 file without this toolkit's schema attribute ({SCHEMA!r})"
    if found != analysis:
        return f"already exists and holds a different analysis ({found!r}, not {analysis!r})"
    return None


def _names_in_bytes(path, analysis: str, limit: int = 1 << 20) -> bool:
    with open(path, "rb") as file:
        head = file.read(limit)
    return SCHEMA.encode() in head and analysis.encode() in head


def _check_resumable(path, planned: "ResultData") -> None:
    try:
        existing = _load(path, with_data=False)
    except UserError as err:
        raise UserError(f"{path} exists but cannot be resumed ({err}); "
                        "pass --overwrite to replace it") from None
    if changed := filehash.changed_data(existing.attrs.get("inputs", []),
                                        planned.attrs.get("inputs", [])):
        raise UserError(f"{changed[0]} changed since the result {path} was started "
                        f"({changed[1]}); re-run with --overwrite or restore the file")
    if what := _difference(existing, planned):
        raise UserError(f"{path} already exists and holds a different {what}; "
                        "pass --overwrite to replace it, or choose another output path")


def _check_size(path, coords, specs, point_dims) -> None:
    """Refuse a result beyond MAX_POINTS point cells or MAX_RESULT_BYTES before it exists."""
    length = {name: len(labels) for name, labels in coords.items()}
    points = math.prod(length[d] for d in point_dims)
    nbytes = points + sum(labels.nbytes for labels in coords.values()) + sum(
        math.prod(length[d] for d in spec.dims) * np.dtype(spec.dtype).itemsize
        for spec in specs.values())
    if points > MAX_POINTS or nbytes > MAX_RESULT_BYTES:
        shape = " x ".join(f"{length[d]:,} {d}" for d in point_dims)
        raise UserError(f"{path or 'the in-memory result'}: {shape} is {points:,} points and about "
                        f"{nbytes / 2**30:.3g} GiB, beyond the limit of {MAX_POINTS:,} points "
                        f"or {MAX_RESULT_BYTES / 2**30:g} GiB; use fewer points (a coarser "
                        f"--grid, fewer seeds or checkpoints)")


def _write_skeleton(path, root, coords, specs, point_dims) -> None:
    """Write coords, NaN metrics and an all-False `done` to a temp file, then rename it in.

    Data are written in full here, so space is allocated now and later cell writes change
    only raw bytes, never HDF5 metadata: a kill mid-write cannot break the file's structure.
    The file is laid out in memory (HDF5's core driver) and written with plain Python I/O:
    a full disk is then an OSError here, never an HDF5 handle half-flushed to a full disk
    (which crashed the process as it exited).
    """
    image = _skeleton_image(root, coords, specs, point_dims)
    folder, name = os.path.split(path)
    # Not mkstemp: its 0600 mode would stick to the result; "x" mode honours the umask.
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(image)
            handle.flush()
            os.fsync(handle.fileno())  # durable before it takes the real name
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _skeleton_image(root, coords, specs, point_dims) -> bytes:
    """The bytes of a fresh result file, laid out in memory."""
    name = f"skeleton-{os.getpid()}-{secrets.token_hex(8)}.h5"  # a name only, never a file
    with h5py.File(name, "w", driver="core", backing_store=False, track_order=True) as file:
        file.attrs.update(root)
        _write_datasets(file, coords, specs, point_dims)
        file.flush()
        return file.id.get_file_image()


def _write_datasets(file, coords, specs, point_dims) -> None:
    for name, labels in coords.items():
        if labels.dtype.kind == "U":
            scale = file.create_dataset(name, data=labels.tolist(), dtype=h5py.string_dtype())
        else:
            scale = file.create_dataset(name, data=labels)
        scale.make_scale(name)
    shape = {name: len(labels) for name, labels in coords.items()}
    # h5netcdf and xarray read HDF5 bool (an int8 enum) as a bool variable, so `done` is bool.
    done = file.create_dataset(DONE, data=np.zeros([shape[d] for d in point_dims], bool))
    _attach(done, point_dims, file)
    for name, spec in specs.items():
        data = np.full([shape[d] for d in spec.dims], np.nan, spec.dtype)
        metric = file.create_dataset(name, data=data, fillvalue=np.nan)
        metric.attrs.update({"units": spec.units, "long_name": spec.long_name})
        _attach(metric, spec.dims, file)


def _attach(dataset, dims, file) -> None:
    for axis, dim in enumerate(dims):
        dataset.dims[axis].attach_scale(file[dim])


class Grid:
    """The cells of a result being written: what `Result` (a file) and `MemoryResult` share.

    A subclass sets coords, specs, point_dims, shape, shard and `_done`, and stores values in
    `_store(index, arrays)`.
    """

    coords: dict
    specs: dict
    point_dims: tuple
    shape: tuple
    shard: tuple | None = None
    _done: np.ndarray

    def write(self, cell, /, **values) -> None:
        """Store every metric's values for one point cell and mark it done.

        cell: {dim: index} or a tuple of indices in point_dims order.
        values: one array per metric, shaped like the metric's non-point dims (scalar if none).
        """
        index = self._index(cell)
        self._store(index, self._check_values(values))
        self._done[index] = True

    def _check_values(self, values) -> dict[str, np.ndarray]:
        """Validate all values before writing any, so a bad call leaves the result unchanged."""
        per_cell = {name: spec for name, spec in self.specs.items()  # summaries: apart
                    if not self.point_dims or set(self.point_dims) & set(spec.dims)}
        for name in values:
            if name not in per_cell:
                raise unknown("metric", name, per_cell)
        if lacking := sorted(set(per_cell) - set(values)):
            raise ValueError(f"write needs every metric; missing {lacking}")
        arrays = {}
        for name, spec in per_cell.items():
            array = np.asarray(values[name], dtype=spec.dtype)
            shape = tuple(len(self.coords[d]) for d in spec.dims if d not in self.point_dims)
            if array.shape != shape:
                raise ValueError(f"metric {name!r} expects shape {shape} per cell "
                                 f"(dims {spec.dims} without point dims), got {array.shape}")
            arrays[name] = array
        return arrays

    def _index(self, cell) -> tuple[int, ...]:
        """{dim: index} or tuple -> tuple of ints in point_dims order, bounds-checked."""
        if isinstance(cell, Mapping):
            if set(cell) != set(self.point_dims):
                raise ValueError(f"cell keys {sorted(cell)} must be the point dims "
                                 f"{self.point_dims}")
            cell = tuple(cell[d] for d in self.point_dims)
        if len(cell) != len(self.point_dims):
            raise ValueError(f"cell {cell} needs one index per point dim {self.point_dims}")
        index = tuple(int(i) for i in cell)
        if not all(0 <= i < n for i, n in zip(index, self.shape)):
            raise IndexError(f"cell {index} outside the point grid {self.shape}")
        return index

    def _selection(self, name, index) -> tuple:
        """Integer indices on point axes, full slices on the metric's other axes."""
        at = dict(zip(self.point_dims, index))
        return tuple(at.get(dim, slice(None)) for dim in self.specs[name].dims)

    def missing(self, shard=None) -> list[tuple[int, ...]]:
        """Point cells not yet done, in C order, among those owned by `shard`.

        shard defaults to this result's own shard (all cells for an unsharded one).
        """
        shard = self.shard if shard is None else shard
        owned = _owned_flat(self._done.size, shard)
        return _cells(owned[~self._done.ravel()[owned]], self.shape)

    def write_summary(self, name: str, index: tuple, value) -> None:
        """Store `value` at `index` (a tuple of ints or slices over its dims) of a summary
        metric: one that holds no point dim. Not tied to `done`: a summary is NaN until set."""
        spec = self.specs[name]
        if set(self.point_dims) & set(spec.dims):
            raise ValueError(f"write_summary: {name!r} holds point dims; use write")
        self._store_summary(name, tuple(index), np.asarray(value, dtype=spec.dtype))

    def read(self, name: str) -> np.ndarray:
        """The metric's values as stored now (NaN where not yet written)."""
        return np.array(self._values(name))

    def is_done(self, cell) -> bool:
        return bool(self._done[self._index(cell)])

    def labels(self, cell) -> dict:
        """{dim: coordinate label} of a cell, as Python scalars: {"alpha": 0.5, "pair": "0-1"}."""
        return {dim: self.coords[dim][i].item() for dim, i in zip(self.point_dims,
                                                                   self._index(cell))}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close()

    def close(self) -> None:
        pass


class Result(Grid):
    """A result file open for writing; made by `create_result`. Use it as a context manager.

    Each cell is flushed as it is written: values before `done`, so a crash in between only
    recomputes the cell.
    """

    def __init__(self, path, lock: WriteLock):
        self.path = str(path)
        layout = _load(path, with_data=False)
        self.analysis, self.attrs, self.coords = layout.analysis, layout.attrs, layout.coords
        self.point_dims, self.specs, self.shard = layout.point_dims, layout.specs, layout.shard
        self.shape = layout.shape
        self._lock = lock
        self._file = None
        with _writing(path):
            self._file = h5py.File(path, "r+", locking=False)
        self._done = self._file[DONE][()]  # in-memory copy; the file's is updated per cell

    def _store(self, index, arrays) -> None:
        # A full disk: the cell stays not done and the file opens (its space is allocated).
        with _writing(self.path):
            for name, array in arrays.items():
                self._file[name][self._selection(name, index)] = array
            self._file[DONE][index] = True
            self._file.flush()

    def _store_summary(self, name, index, array) -> None:
        with _writing(self.path):
            self._file[name][index] = array
            self._file.flush()

    def _values(self, name) -> np.ndarray:
        return self._file[name][()]

    def _write_all(self, metrics: Mapping, done: np.ndarray) -> None:
        """Write whole arrays at once (merge, save)."""
        with _writing(self.path):
            for name, array in metrics.items():
                self._file[name][...] = array
            self._file[DONE][...] = done
            self._file.flush()
        self._done = done.copy()

    def close(self) -> None:
        """Close the file, then release the locks. A close that fails (HDF5 flushing to a
        full disk) still drops every handle now: one left to the interpreter's exit crashed
        the process there."""
        file, self._file = self._file, None
        try:
            if file is not None:
                with _writing(self.path):
                    _close_hard(file)
        finally:
            self._lock.release()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the error in flight is the one to report: after a failed write (a full
            self.close()  # disk) HDF5's close can fail too, and would replace it
        except Exception:
            pass


def _close_hard(file) -> None:
    """`file.close()`; if that fails, close every HDF5 object of the file that is still open
    (each failure ignored) and raise the first error."""
    try:
        file.close()
    except Exception:
        for kind in (h5py.h5f.OBJ_DATASET | h5py.h5f.OBJ_GROUP | h5py.h5f.OBJ_DATATYPE |
                     h5py.h5f.OBJ_ATTR, h5py.h5f.OBJ_FILE):
            try:
                ids = h5py.h5f.get_obj_ids(file.id, kind)
            except Exception:
                ids = []
            for obj in ids:
                with contextlib.suppress(Exception):
                    obj._close()
        raise


class MemoryResult(Grid):
    """A result held in memory with the layout a file would have: what the Python API fills.

    `dataset()` returns it as the `xarray.Dataset` that `xarray.open_dataset` gives for the
    same result written to HDF5; `save(ds, path)` writes that file.
    """

    def __init__(self, root: dict, coords: dict, specs: dict, point_dims: tuple):
        self.path = None
        self.root = root  # the root attributes as a file stores them (JSON strings)
        self.analysis, self.attrs = root["analysis"], _parse_attrs(root, "in memory")
        self.coords, self.specs, self.point_dims = coords, specs, tuple(point_dims)
        self.shape = tuple(len(coords[d]) for d in self.point_dims)
        self.values = {name: np.full([len(coords[d]) for d in spec.dims], np.nan, spec.dtype)
                       for name, spec in specs.items()}
        self._done = np.zeros(self.shape, bool)

    def _store(self, index, arrays) -> None:
        for name, array in arrays.items():
            self.values[name][self._selection(name, index)] = array

    def _store_summary(self, name, index, array) -> None:
        self.values[name][index] = array

    def _values(self, name) -> np.ndarray:
        return self.values[name]

    def data(self) -> ResultData:
        return ResultData("", self.analysis, self.attrs, self.coords, self.point_dims,
                          self.specs, self.values, self._done.copy())

    def dataset(self):
        return _to_dataset(self.root, self.coords, self.specs, self.point_dims, self.values,
                           self._done)


# ---------------------------------------------------------------------------- read


def open_result(path, analysis: str = None) -> ResultData:
    """Read and validate a result file; UserError naming the file on any problem.

    Checks: the file exists and is HDF5, schema is "results/1", the analysis matches (when
    given), and every dataset's axes carry coordinate scales of matching length.
    """
    data = _load(path, with_data=True)
    if analysis is not None and data.analysis != analysis:
        raise UserError(f"{path} holds analysis {data.analysis!r}, expected {analysis!r}")
    return data


def _load(path, with_data: bool) -> ResultData:
    if not os.path.exists(path):
        raise UserError(f"no such result file: {path}")
    if not h5py.is_hdf5(path):
        raise UserError(f"not an HDF5 file: {path}")
    try:
        with h5py.File(path, "r", locking=False) as file:
            return _read(file, str(path), with_data)
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot read result file {path} (truncated or corrupt?): "
                        f"{str(err).splitlines()[0]}") from None


def _read(file, path: str, with_data: bool) -> ResultData:
    attrs = _parse_attrs(dict(file.attrs), path)
    if attrs.get("schema") != SCHEMA:
        raise UserError(f"{path} has schema {attrs.get('schema')!r}, expected {SCHEMA!r}")
    datasets = {name: obj for name, obj in file.items() if isinstance(obj, h5py.Dataset)}
    coords = {name: _read_labels(ds) for name, ds in datasets.items()
              if h5py.h5ds.is_scale(ds.id)}
    if DONE not in datasets:
        raise UserError(f"{path} has no {DONE!r} dataset")
    point_dims = _dims_of(datasets[DONE], coords, path)
    specs, metrics = {}, {}
    for name, ds in datasets.items():
        if name in coords or name == DONE:
            continue
        specs[name] = MetricSpec(_dims_of(ds, coords, path), str(ds.attrs.get("units", "")),
                                 str(ds.attrs.get("long_name", "")), ds.dtype.str)
        if with_data:
            metrics[name] = ds[()]
    data = ResultData(path, attrs.get("analysis"), attrs, coords, point_dims, specs, metrics,
                      datasets[DONE][()].astype(bool) if with_data else None)
    for name in metrics:  # a crash between a cell's values and its `done` leaves stray values
        if not _is_summary(data, name):
            _point_first(metrics[name], data, name)[~data.done] = np.nan
    return data


def _read_labels(dataset) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype):
        return np.array(dataset.asstr()[()].tolist(), dtype=str)
    return dataset[()]


def _dims_of(dataset, coords, path) -> tuple[str, ...]:
    """The coordinate name on each axis, checking that its length matches the axis."""
    dims = []
    for axis, size in enumerate(dataset.shape):
        scales = dataset.dims[axis].values()
        name = scales[0].name.rsplit("/", 1)[-1] if len(scales) == 1 else None
        if name not in coords or len(coords[name]) != size:
            raise UserError(f"{path}: dataset {dataset.name!r} axis {axis} (length {size}) has "
                            f"no matching coordinate (found {name!r}; coords: {list(coords)})")
        dims.append(name)
    return tuple(dims)


def _parse_attrs(raw: Mapping, path) -> dict:
    """Numpy scalars to Python, `config` and `inputs` from JSON, checked to be what every
    reader relies on: `config` an object, `inputs` a list of records with a path and sha256
    (a file written elsewhere may hold anything)."""
    attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in raw.items()}
    attrs = {k: v.decode(errors="replace") if isinstance(v, bytes) else v
             for k, v in attrs.items()}
    for key, kind in (("config", dict), ("inputs", list)):
        if key in attrs:
            try:
                attrs[key] = json.loads(attrs[key])
            except (TypeError, ValueError):
                raise UserError(f"{path}: root attribute {key!r} is not JSON") from None
            if not isinstance(attrs[key], kind):
                raise UserError(f"{path}: root attribute {key!r} is not a JSON "
                                f"{'object' if kind is dict else 'list'} (got "
                                f"{type(attrs[key]).__name__}); not a result of this toolkit?")
    for record in attrs.get("inputs", []):
        if not isinstance(record, dict) or not isinstance(record.get("path"), str) or \
                not isinstance(record.get("sha256"), str):
            raise UserError(f"{path}: root attribute 'inputs' holds {str(record)[:60]!r}, not a "
                            f"record with a 'path' and a 'sha256'")
    return attrs


def json_attr(data: ResultData, key: str, kind: type = list, default=None):
    """A root attribute that an analysis stored as JSON (probe's `checkpoints`, border's
    `children`), parsed and type-checked: a one-line UserError naming the file and the
    attribute when it is not JSON or not a `kind`. default: returned when the file has none."""
    if key not in data.attrs:
        return default
    value = data.attrs[key]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UserError(f"{data.path}: root attribute {key!r} is not JSON") from None
    if not isinstance(value, kind):
        raise UserError(f"{data.path}: root attribute {key!r} is not a JSON "
                        f"{'object' if kind is dict else kind.__name__}")
    return value


def _difference(a: ResultData, b: ResultData, check_shard: bool = True) -> str | None:
    """Name what keeps `b` from being the same scan as `a` (None if nothing does).

    Provenance (device, git sha, ...) and input paths may differ; input sha256s may not.
    """
    if a.analysis != b.analysis:
        return f"analysis ({a.analysis!r} vs {b.analysis!r})"
    if what := _config_change(a, b):
        return f"config ({what})"
    if _shas(a) != _shas(b):
        return "inputs (checkpoint sha256)"
    if changed := filehash.changed_data(a.attrs.get("inputs", []), b.attrs.get("inputs", [])):
        return f"data file ({changed[0]}: {changed[1]})"
    if list(a.coords) != list(b.coords):
        return f"coords ({list(a.coords)} vs {list(b.coords)})"
    for name in a.coords:
        x, y = a.coords[name], b.coords[name]
        if (x.dtype.kind == "U") != (y.dtype.kind == "U") or not np.array_equal(x, y):
            return f"coords ({name})"
    if (a.point_dims, a.specs) != (b.point_dims, b.specs):
        return "metrics or point dims"
    extra_a, extra_b = _extra_attrs(a), _extra_attrs(b)
    if extra_a != extra_b:
        return f"attrs ({sorted(set(extra_a.items()) ^ set(extra_b.items()))[0][0]})"
    if check_shard and a.attrs.get("shard") != b.attrs.get("shard"):
        return f"shard ({a.attrs.get('shard')} vs {b.attrs.get('shard')})"
    return None


# config keys that say where files are, not what they hold: a result copied with its store
# and data, or named through another spelling, is the same scan when the files' contents
# (the sha256s in `inputs`) are the same
LOCATION_KEYS = frozenset({"data_root", "probe_root", "refs", "store"})
DATA_LOCATION_KEYS = frozenset({"data_root", "probe_root"})


def _config_change(a: ResultData, b: ResultData) -> str | None:
    """What differs between two results' configs, ignoring where their files are when the
    files are compared by content: checkpoints always (by sha256), data folders only when
    `a` recorded its data files (results written before that keep the path as identity)."""
    config_a, config_b = a.attrs.get("config"), b.attrs.get("config")
    if config_a == config_b:
        return None
    try:
        parsed = [json.loads(c) if isinstance(c, str) else c for c in (config_a, config_b)]
    except ValueError:
        return _config_difference(config_a, config_b)
    ignored = LOCATION_KEYS if _records_data(a) else LOCATION_KEYS - DATA_LOCATION_KEYS
    if _strip_keys(parsed[0], ignored) == _strip_keys(parsed[1], ignored):
        return None
    return _config_difference(config_a, config_b)


def _records_data(data: ResultData) -> bool:
    return any(filehash.is_data(record) for record in data.attrs.get("inputs", []))


def _strip_keys(value, keys: frozenset):
    """`value` with every dict entry named in `keys` left out, at any depth."""
    if isinstance(value, dict):
        return {k: _strip_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_strip_keys(v, keys) for v in value]
    return value


def _config_difference(a, b, most: int = 3) -> str:
    """The config keys that differ, each with both values: "grid: '0:1:25' vs '0:1:11'"."""
    a, b = (json.loads(c) if isinstance(c, str) else (c or {}) for c in (a, b))
    if not isinstance(a, dict) or not isinstance(b, dict):
        return f"{a!r} vs {b!r}"
    absent = object()
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)]
    shown = [f"{k}: {_config_value(a.get(k, absent), absent)} vs "
             f"{_config_value(b.get(k, absent), absent)}" for k in keys[:most]]
    more = f", and {len(keys) - most} more" if len(keys) > most else ""
    return "; ".join(shown) + more


def _config_value(value, absent) -> str:
    return "(not set)" if value is absent else repr(value)


def _shas(data: ResultData) -> list[str]:
    """The sha256 of every checkpoint input (data files are compared by changed_data)."""
    return [record["sha256"] for record in data.attrs.get("inputs", [])
            if not filehash.is_data(record)]


def _extra_attrs(data: ResultData) -> dict:
    return {k: v for k, v in data.attrs.items() if k not in STANDARD_ATTRS}


# ---------------------------------------------------------------------------- xarray


def _to_dataset(root: Mapping, coords, specs, point_dims, values, done):
    """An xarray.Dataset laid out as `xarray.open_dataset(file, engine="h5netcdf")` reads
    the same result: coords, `done`, then the metrics with units and long_name; the root
    attributes as the file stores them (config and inputs as JSON strings)."""
    import xarray as xr
    variables = {DONE: (tuple(point_dims), np.asarray(done, bool))}
    for name, spec in specs.items():
        variables[name] = (spec.dims, values[name],
                           {"units": spec.units, "long_name": spec.long_name})
    return xr.Dataset(variables, coords={name: (name, labels) for name, labels in
                                         coords.items()}, attrs=dict(root))


def to_dataset(data: ResultData):
    """A result read with `open_result` as an xarray.Dataset (see `_to_dataset`)."""
    root = {k: _attr_value(v) for k, v in data.attrs.items()}
    root["config"] = _config_json(data.attrs["config"])
    root["inputs"] = json.dumps(data.attrs.get("inputs", []))
    return _to_dataset(root, data.coords, data.specs, data.point_dims, data.metrics, data.done)


def read_dataset(path, analysis: str = None):
    """The result file at `path`, checked like `open_result`, as an xarray.Dataset."""
    return to_dataset(open_result(path, analysis))


def save(ds, path, overwrite: bool = False) -> str:
    """Write an analysis' xarray.Dataset (what the Python API returns) as a result file.

    The file is the one the analysis' CLI would write: same layout, attributes and values,
    so `python -m figures` and `runs.results show` read it. An existing file is kept unless
    `overwrite`. Returns the path.
    """
    root = dict(ds.attrs)
    for key in ("schema", "analysis", "config", "inputs"):
        if key not in root:
            raise UserError(f"save: the dataset has no {key!r} attribute; save the "
                            f"xarray.Dataset an analysis returned (or read_dataset gave)")
    if DONE not in ds:
        raise UserError(f"save: the dataset has no {DONE!r} variable (the cells computed)")
    coords = _normalize_coords({name: ds[name].values for name in ds.coords})
    specs = {name: MetricSpec(var.dims, str(var.attrs.get("units", "")),
                              str(var.attrs.get("long_name", "")), var.dtype.str)
             for name, var in ds.data_vars.items() if name != DONE}
    point_dims = tuple(ds[DONE].dims)
    _check_layout(coords, specs, point_dims)
    with _open_writer(path, root, coords, specs, point_dims, overwrite, resume=False) as result:
        result._write_all({name: ds[name].values for name in specs},
                          ds[DONE].values.astype(bool))
    return str(path)


# ---------------------------------------------------------------------------- merge


def merge_results(out_path, shard_paths: Sequence, overwrite: bool = False) -> ResultData:
    """Join shard files of one scan into `out_path`: the union of their done cells.

    All shards must share analysis, config, inputs, coords and metrics. A cell done in two
    files must hold the same values there (NaN equals NaN). The merged file has no `shard`
    attr; provenance attrs that differ between shards are joined ("cpu, cuda").
    """
    if not shard_paths:
        raise UserError("merge needs at least one shard file")
    if any(os.path.realpath(out_path) == os.path.realpath(p) for p in shard_paths):
        raise UserError(f"merge output {out_path} is also one of its inputs; pick another path")
    parts = [_read_unlocked(p) for p in shard_paths]
    first = parts[0]
    for part in parts[1:]:
        if what := _difference(first, part, check_shard=False):
            raise UserError(f"cannot merge {part.path}: it holds a different {what} "
                            f"from {first.path}")
    metrics, done = _union(parts)
    root = _merged_attrs(parts)
    with _open_writer(out_path, root, first.coords, first.specs, first.point_dims,
                      overwrite, resume=False) as result:
        result._write_all(metrics, done)
    return open_result(out_path)


def _read_unlocked(path) -> ResultData:
    """Read a shard, refusing one that a scan is still writing (its lock is held). Nothing
    is written beside it, so shards in a read-only folder merge."""
    if not os.path.exists(path):
        raise UserError(f"no such result file: {path}")
    if (pid := being_written(path)) is not None:
        raise _busy(path, pid)
    return open_result(path)


def _union(parts: Sequence[ResultData]) -> tuple[dict, np.ndarray]:
    """Merged metric arrays and done mask; UserError on a cell two files disagree on."""
    first = parts[0]
    metrics = {name: np.full_like(array, np.nan) for name, array in first.metrics.items()}
    done = np.zeros_like(first.done)
    for j, part in enumerate(parts):
        for earlier in parts[:j]:
            _check_agree(earlier, part)
        for name, array in part.metrics.items():
            if _is_summary(first, name):  # set in one shard at most: the values it holds
                metrics[name] = np.where(np.isnan(array), metrics[name], array)
                continue
            _point_first(metrics[name], first, name)[part.done] = \
                _point_first(array, part, name)[part.done]
        done |= part.done
    return metrics, done


def _is_summary(data: ResultData, name: str) -> bool:
    """Whether a metric holds no point dim (written whole, not per cell)."""
    return bool(data.point_dims) and not set(data.point_dims) & set(data.specs[name].dims)


def _point_first(array: np.ndarray, data: ResultData, name: str) -> np.ndarray:
    """A view of a metric with the point axes first, in point_dims order."""
    dims = data.specs[name].dims
    return np.moveaxis(array, [dims.index(d) for d in data.point_dims],
                       range(len(data.point_dims)))


def _check_agree(a: ResultData, b: ResultData) -> None:
    both = a.done & b.done
    if not both.any():
        return
    for name in a.metrics:
        if _is_summary(a, name):
            continue
        x, y = _point_first(a.metrics[name], a, name)[both], _point_first(b.metrics[name], b,
                                                                           name)[both]
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        bad = ~same.reshape(len(x), -1).all(axis=1)
        if bad.any():
            cell = tuple(int(i) for i in np.argwhere(both)[np.argmax(bad)])
            labels = ", ".join(f"{d}={a.coords[d][i].item()!r}"
                               for d, i in zip(a.point_dims, cell))
            raise UserError(f"cell ({labels}) is done in both {a.path} and {b.path} with "
                            f"different values of {name!r}; re-run one of them")


def _merged_attrs(parts: Sequence[ResultData]) -> dict:
    root = {k: v for k, v in parts[0].attrs.items() if k not in ("shard", "merged_from")}
    root["config"] = json.dumps(root["config"], sort_keys=True)
    root["inputs"] = json.dumps(root["inputs"])
    for key in PROVENANCE:  # sorted, so the merge is independent of the shards' order
        root[key] = ", ".join(sorted({str(p.attrs.get(key, "unknown")) for p in parts}))
    root["created_utc"] = _utc_now()
    root["merged_from"] = json.dumps(sorted(str(p.path) for p in parts))
    return root


# ---------------------------------------------------------------------------- CLI


def describe(data: ResultData) -> str:
    """The text `show` prints: attributes, coordinates, metrics and progress."""
    lines = [f"file: {data.path}", "attributes:"]
    for key, value in data.attrs.items():
        if key == "inputs":
            value = "".join(f"\n    {r['path']}  sha256={r['sha256'][:12]}{_data_note(r)}"
                            for r in value) or "(none)"
        elif not isinstance(value, str):
            value = json.dumps(value, sort_keys=True)
        lines.append(f"  {key}: {value}")
    lines.append("coords:")
    for name, labels in data.coords.items():
        span = f"{_fmt(labels[0])} .. {_fmt(labels[-1])}" if len(labels) else "(empty)"
        lines.append(f"  {name} ({len(labels)}): {span}")
    progress = f"{int(data.done.sum())} of {data.done.size} cells done"
    lines.append(f"metrics (point dims {', '.join(data.point_dims)}):")
    for name, spec in data.specs.items():
        shape = "x".join(str(n) for n in data.metrics[name].shape)
        lines.append(f"  {name} ({', '.join(spec.dims)}) {shape} {spec.dtype} "
                     f"[{spec.units}] {spec.long_name}: {progress}")
    lines.append(f"done: {progress}")
    return "\n".join(lines)


def _data_note(record: dict) -> str:
    """"  (data, 12.3 MB)" for a data file's record, "" for a checkpoint's."""
    if not filehash.is_data(record):
        return ""
    files = f", {record['files']} files" if "files" in record else ""
    size = record.get("size")
    if not isinstance(size, (int, float)):
        return f"  (data{files})"
    return f"  (data{files}, " + (f"{size / 1e6:.1f} MB)" if size >= 1e6 else
                                  f"{size / 1e3:.1f} kB)")


def _fmt(label) -> str:
    value = label.item()
    return f"{value:g}" if isinstance(value, float) else repr(value)


# ---------------------------------------------------------------------------- show --values

MAX_COLUMNS = 16  # a 1-D metric with more cells per point than this is summarised, not tabled


def values_text(data: ResultData) -> str:
    """The values `show --values` prints: a table over the point axis for 1-D scans (every
    metric and split; mean ± std over `seed` where a metric has one: the probe table), the
    min and max of every metric with their coordinates for larger grids."""
    if len(data.point_dims) == 1:
        return _table_1d(data)
    lines = [f"min and max over {' x '.join(data.point_dims)} (done cells only):"]
    for name in data.specs:
        for key, values in _slices(data, name, keep=data.point_dims):
            lines.append(f"  {name}{key}: {_extremes(data, values)}")
    return "\n".join(lines)


def _slices(data: ResultData, name: str, keep: tuple[str, ...]):
    """(column suffix like "[test]", array over `keep`) for each index of the other axes;
    `seed` stays as a last axis (averaged by the caller)."""
    spec = data.specs[name]
    rest = [d for d in spec.dims if d not in keep and d != "seed"]
    tail = ["seed"] if "seed" in spec.dims and "seed" not in keep else []
    array = np.moveaxis(data.metrics[name], [spec.dims.index(d) for d in (*keep, *rest, *tail)],
                        range(len(spec.dims)))
    for index in np.ndindex(*(len(data.coords[d]) for d in rest)):
        key = ",".join(str(data.coords[d][i].item()) for d, i in zip(rest, index))
        yield (f"[{key}]" if key else ""), array[(slice(None),) * len(keep) + index]


def _extremes(data: ResultData, values: np.ndarray) -> str:
    values = np.where(data.done.reshape(data.done.shape + (1,) * (values.ndim - data.done.ndim)),
                      values, np.nan)
    if np.isnan(values).all():
        return "not computed"
    out = []
    for word, find in (("min", np.nanargmin), ("max", np.nanargmax)):
        where = np.unravel_index(find(values), values.shape)
        at = ", ".join(f"{d}={_fmt(data.coords[d][i])}" for d, i in zip(data.point_dims, where))
        out.append(f"{word} {values[where]:.4g} at {at}")
    return "; ".join(out)


def _table_1d(data: ResultData) -> str:
    dim = data.point_dims[0]
    columns, skipped = {}, []
    for name, spec in data.specs.items():
        if dim not in spec.dims:
            skipped.append(name)
            continue
        slices = list(_slices(data, name, keep=(dim,)))
        if len(slices) > MAX_COLUMNS:
            skipped.append(name)
            continue
        percent = spec.units == "fraction" and "seed" in spec.dims
        for key, values in slices:
            columns[f"{name}{key}" + (" %" if percent else "")] = \
                (100 * values if percent else values)
    header = [dim, *columns, "done"]
    rows = [[_name(label), *(_cell(v[i]) for v in columns.values()),
             "yes" if data.done[i] else "no"] for i, label in enumerate(data.coords[dim])]
    text = _aligned(header, rows)
    if "seed" in data.coords and any("seed" in data.specs[n].dims for n in data.specs):
        count = len(data.coords["seed"])
        text += f"\n(mean ± std over {count} seed{'s' * (count != 1)})"
    if skipped:
        text += f"\nnot tabled (more than {MAX_COLUMNS} values per {dim}): {', '.join(skipped)}"
    return text


def _name(label) -> str:
    """A coordinate value as a table row name: strings bare, numbers as `_fmt`."""
    return label.item() if isinstance(label.item(), str) else _fmt(label)


def _cell(values) -> str:
    values = np.atleast_1d(np.asarray(values, dtype=float))
    if np.isnan(values).all():
        return "-"
    if values.size == 1:
        return f"{values[0]:.4g}"
    return f"{np.nanmean(values):.2f} ± {np.nanstd(values):.2f}"


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header, *rows])


# ---------------------------------------------------------------------------- ls


def store_rows(store, where: Sequence[str] = ()) -> list[dict]:
    """One row per run of a store (`<store>/<kind>_<hash>/seed_<s>/config.json`), read from
    config.json, DONE and checkpoint names alone (no torch): kind, model, dataset, seed,
    alpha, steps done/total, status, path. `where`: "key=value" filters on config keys."""
    from runs.store import Run
    store = Path(store)
    if not store.is_dir():
        raise UserError(f"no store at {store} (a folder of <kind>_<hash>/seed_<s>/ runs)")
    runs = [Run(p.parent) for p in sorted(store.glob("*/seed_*/config.json"))]
    records = [(run, run.config()) for run in runs]
    valid = {"kind", "seed", "status"} | {k for _, saved in records
                                          for k in saved.get("config") or {}}
    filters = [_where(item, valid) for item in where]
    rows = []
    for run, saved in records:
        row = _store_row(run, saved, store)
        if all(_matches({**(saved.get("config") or {}), **row}, k, v) for k, v in filters):
            rows.append(row)
    return rows


def _store_row(run, saved: dict, store: Path) -> dict:
    config = saved.get("config") or {}
    total = config.get("num_steps", 0)
    latest = run.latest_step()
    done = total if run.done and total else latest
    status = "done" if run.done else "running" if _locked(run.path) else "stopped"
    return {"kind": saved.get("kind", ""), "model": config.get("model", ""),
            "dataset": config.get("dataset", ""), "seed": saved.get("seed", ""),
            "alpha": f"{config['alpha']:g}" if saved.get("kind") == "distill"
            and "alpha" in config else "",
            "steps": f"{done if done is not None else 0}/{total or '?'}", "status": status,
            "path": str(run.path.relative_to(store))}


def _locked(run_path: Path) -> bool:
    """Whether a process holds a write lock on the run (training: `<run>.lock`; a run's
    own result files: `<run>/*.lock`). Peeks with a shared, non-blocking flock."""
    own = Path(f"{os.path.realpath(run_path)}.lock")  # WriteLock's name for the run
    for lock in [own, *run_path.glob("*.lock")]:
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def _where(item: str, valid: set) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"--where {item!r}: expected KEY=VALUE, e.g. --where model=vgg11")
    if key not in valid:
        raise unknown("--where key", key, valid)
    return key, value


def _matches(values: dict, key: str, wanted: str) -> bool:
    value = values.get(key)
    if isinstance(value, bool):
        return str(value).lower() == wanted.lower()
    try:
        return float(value) == float(wanted)  # alpha=1 matches 1.0
    except (TypeError, ValueError):
        return str(value) == wanted


def ls_text(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    header = ["kind", "model", "dataset", "seed", "alpha", "steps", "status", "path"]
    return _aligned(header, [[str(row[k]) for k in header] for row in rows])


def _parser() -> argparse.ArgumentParser:
    from runs.config import HelpFormatter  # no torch: the results reader stays torch-free
    parser = argparse.ArgumentParser(
        prog="python -m runs.results",
        description="Inspect and merge HDF5 result files (schema results/1).",
        epilog="examples:\n  python -m runs.results show out/interp.h5\n"
               "  python -m runs.results show results/probe.h5 --values\n"
               "  python -m runs.results ls store --where model=vgg11 --where alpha=1\n"
               "  python -m runs.results merge out/interp.h5 out/interp.shard*of4.h5",
        formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{show,merge,ls}")
    show = sub.add_parser("show", help="print a result file's attributes, coords, metrics "
                          "and how many cells are done")
    show.add_argument("file", help="a result .h5 file")
    show.add_argument("--values", action="store_true", help="print the values too: a table "
                      "over the point axis of a 1-D scan (every metric and split; mean ± std "
                      "over seeds: the probe table), min and max with their coordinates for "
                      "a 2-D grid")
    ls = sub.add_parser("ls", help="list the runs of a store: kind, model, dataset, seed, "
                        "alpha, steps done/total, status, path",
                        description="One row per run of STORE, read from config.json, DONE "
                                    "and checkpoint names (status: done, running (a process "
                                    "holds the run's lock) or stopped).")
    ls.add_argument("store", help="a store folder (of <kind>_<hash>/seed_<s>/ runs)")
    ls.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="keep runs whose config KEY equals VALUE (also kind, seed, status); "
                         "repeatable, e.g. --where model=vgg11 --where alpha=1")
    merge = sub.add_parser(
        "merge", help="join the shard files of one scan into one result file",
        description="Join shard files (written with --shard i/n) into OUT: the union of their "
                    "done cells. All shards must hold the same analysis, config, inputs and "
                    "coords; a cell done in two shards must agree. Missing shards just leave "
                    "their cells not done.")
    merge.add_argument("out", help="the merged file to write")
    merge.add_argument("shards", nargs="+", help="shard files, in any order")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


@cli
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "show":
        data = open_result(args.file)
        print(describe(data))
        if args.values:
            print(f"values:\n{values_text(data)}")
    elif args.command == "ls":
        print(ls_text(store_rows(args.store, args.where)))
    else:
        merged = merge_results(args.out, args.shards, overwrite=args.overwrite)
        print(f"merged {len(args.shards)} files into {args.out}: "
              f"{int(merged.done.sum())} of {merged.done.size} cells done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
