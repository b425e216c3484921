"""Data files by content: the files a result read, with size, mtime and sha256.

A result records the data files its dataset loader reads (`inputs` records with
"kind": "data"), so that a resumed scan can refuse to go on when they changed: a scan killed
half way and resumed after its .npz was rewritten would otherwise join two datasets in one
curve. Checkpoints are hashed by `runs.results` as before; this module is about data.

Hashing is paid once: each sha256 is cached by (real path, size, mtime, inode) in one small
JSON file, `$RUNS_HASH_CACHE` or else `~/.cache/random-teacher-landscape/sha256.json`
(`$XDG_CACHE_HOME` honoured). The cache lives with the user, never beside the data, so a
read-only data folder works; a cache that cannot be read or written is skipped (the hash is
still computed, only not remembered). RUNS_HASH_CACHE="" turns the cache off. A file
rewritten in place gets a new size or mtime, so it is hashed again.

Which files a dataset reads is known by its loader module (CIFAR's pickles, the MNIST IDX
files, ...): `dataset_files` asks those modules. Folders of many small files (TinyImageNet's
JPEGs) are one record per split, hashed over the names and contents of all its files.

This module imports no torch (runs.results uses it); `data_inputs` imports a dataset's
loader module only for a dataset that has files.
"""

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from runs.errors import UserError

CACHE_ENV = "RUNS_HASH_CACHE"
CACHE_ENTRIES = 20_000  # kept in the cache file, newest last (about 2 MB)
DATA = "data"  # the `kind` of a data file's input record


# ---------------------------------------------------------------------------- the cache


def cache_file() -> Path | None:
    """Where hashes are cached; None when $RUNS_HASH_CACHE is set to ""."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]).expanduser() if os.environ[CACHE_ENV] else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "random-teacher-landscape" / "sha256.json"


def _read_cache(path: Path | None) -> dict:
    try:
        entries = json.loads(path.read_text())["entries"]
        return entries if isinstance(entries, dict) else {}
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return {}  # absent, unreadable or damaged: hash again


def _write_cache(path: Path | None, new: Mapping) -> None:
    """Add `new` to the cache file (read again first: other processes may have added some);
    temp file then rename, so a reader never sees half a file. Failures are ignored."""
    if path is None or not new:
        return
    entries = {**_read_cache(path), **new}
    entries = dict(list(entries.items())[-CACHE_ENTRIES:])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": 1, "entries": entries}))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def _key(real: str, stat: os.stat_result) -> str:
    return f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"


def _stat(path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror}") from None


def _digest(path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(chunk_bytes):
                digest.update(chunk)
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror}") from None
    return digest.hexdigest()


def sha256_cached(path) -> str:
    """Hex sha256 of a file, from the cache while its size, mtime and inode are unchanged."""
    return _hash_many([Path(path)])[0]


def _hash_many(paths: Sequence[Path]) -> list[str]:
    """sha256 of each file, reading the cache once and writing it once."""
    cache = cache_file()
    known, new, out = _read_cache(cache), {}, []
    for path in paths:
        key = _key(os.path.realpath(path), _stat(path))
        sha = known.get(key) or new.get(key) or _digest(path)
        if key not in known:
            new[key] = sha
        out.append(sha)
    _write_cache(cache, new)
    return out


# ---------------------------------------------------------------------------- records


def file_record(path) -> dict:
    """{"kind": "data", "path", "size", "mtime", "sha256"} of one data file."""
    stat = _stat(path)
    return {"kind": DATA, "path": os.path.abspath(path), "size": stat.st_size,
            "mtime": stat.st_mtime, "sha256": sha256_cached(path)}


def folder_record(folder, paths: Sequence[Path]) -> dict:
    """One record for many files under `folder`: sha256 over each file's name (relative to
    the folder) and sha256; size is their total, mtime the newest, `files` their count. The
    whole group is cached by a stamp of every file's name, size and mtime, so an unchanged
    folder costs one stat per file."""
    folder = Path(folder)
    stats = [_stat(path) for path in paths]
    names = [os.path.relpath(path, folder) for path in paths]
    stamp = hashlib.sha256("\n".join(f"{n}|{s.st_size}|{s.st_mtime_ns}|{s.st_ino}" for n, s
                                     in zip(names, stats)).encode()).hexdigest()
    cache, key = cache_file(), f"folder:{os.path.realpath(folder)}|{stamp}"
    sha = _read_cache(cache).get(key)
    if sha is None:
        lines = (f"{name}\t{_digest(path)}\n" for name, path in zip(names, paths))
        sha = hashlib.sha256("".join(lines).encode()).hexdigest()
        _write_cache(cache, {key: sha})
    return {"kind": DATA, "path": os.path.abspath(folder), "files": len(paths),
            "size": sum(s.st_size for s in stats),
            "mtime": max((s.st_mtime for s in stats), default=0.0), "sha256": sha}


def is_data(record) -> bool:
    return isinstance(record, Mapping) and record.get("kind") == DATA


def changed_data(recorded: Sequence[Mapping], current: Sequence[Mapping]
                 ) -> tuple[str, str] | None:
    """The first data input that changed between a result's records and the files now, as
    (path, how: "sha256 ab12.. then, cd34.. now"); None if none did.

    Records are compared in order by content: the same loader lists the same files in the
    same order, and a moved data folder (another path, same bytes) is not a change. A
    result written before data files were recorded has none and is not checked.
    """
    old, new = [r for r in recorded if is_data(r)], [r for r in current if is_data(r)]
    if not old:
        return None
    for before, now in zip(old, new):
        if before.get("sha256") != now.get("sha256"):
            return now["path"], (f"sha256 {str(before.get('sha256'))[:12]} then, "
                                 f"{now['sha256'][:12]} now")
    if len(old) != len(new):
        extra = (old if len(old) > len(new) else new)[min(len(old), len(new))]
        return extra["path"], "read by one and not the other"
    return None


# ---------------------------------------------------------------------------- datasets


def data_inputs(dataset: str, root, options=(),
                splits: Sequence[str] = ("train", "test")) -> list[dict]:
    """The input records of the data files `dataset` reads for `splits` (none for datasets
    made in memory: digits, toy, noise). options: the dataset's options, as a dict or as
    'key=value' strings (a config's data_options)."""
    if not dataset:
        return []
    if not isinstance(options, Mapping):
        from runs.data import parse_data_options
        options = parse_data_options(tuple(options))
    root = Path(str(root)).expanduser() if root else None
    groups = dataset_files(dataset, root, dict(options), splits)
    plain = [path for path in groups if isinstance(path, Path)]
    sha = dict(zip(plain, _hash_many(plain)))
    records = []
    for item in groups:
        if isinstance(item, Path):
            stat = _stat(item)
            records.append({"kind": DATA, "path": os.path.abspath(item),
                            "size": stat.st_size, "mtime": stat.st_mtime, "sha256": sha[item]})
        else:
            records.append(folder_record(*item))
    return records


def dataset_files(dataset: str, root: Path | None, options: dict,
                  splits: Sequence[str]) -> list:
    """The files the loader of `dataset` reads, in a fixed order, without duplicates: Paths,
    and (folder, [paths]) for a folder hashed as one record. A dataset this module does not
    know (one a user registered) records its root when the root is a file."""
    find = FILES.get(dataset, _root_file)
    seen, out = set(), []
    for split in splits:
        for item in find(root, split, options):
            key = str(item[0]) + split if isinstance(item, tuple) else item
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def _root_file(root, split, options) -> list[Path]:
    return [root] if root is not None and root.is_file() else []


def _cifar(which: str) -> Callable:
    def files(root, split, options) -> list[Path]:
        if root is None:
            return []
        import torchvision

        from runs.datasets.cifar import _file_names
        cls = getattr(torchvision.datasets, which)
        folder = root / cls.base_folder
        return [folder / name for name, _ in _file_names(cls) if (folder / name).is_file()]
    return files


def _mnist(name: str, raw: str) -> Callable:
    def files(root, split, options) -> list[Path]:
        from runs.datasets import mnist
        if root is None:
            folder = mnist.debian_fashion_mnist() if name == "fashionmnist" else None
            folders = [folder] if folder else []
        else:
            folders = [root / raw / "raw", root]
        found = []
        for file_name in mnist._FILES.get(split, ()):
            for folder in folders:
                hits = [p for p in (folder / file_name, folder / f"{file_name}.gz")
                        if p.is_file()]
                if hits:
                    found.append(hits[0])
                    break
        return found
    return files


def _stl10(root, split, options) -> list[Path]:
    from runs.datasets.stl10 import _FILES
    if root is None:
        return []
    folder = root / "stl10_binary"
    return [folder / name for name in _FILES.get(split, ()) if name and (folder / name).is_file()]


def _tinyimagenet(root, split, options) -> list:
    from runs.datasets import tinyimagenet as tin
    if root is None:
        return []
    folder = tin._folder(root)
    wnids = tin._wnids(folder)
    paths, _ = (tin._train_files if split == "train" else tin._val_files)(folder, wnids)
    sources = [folder / "wnids.txt", *paths]
    if split != "train":
        sources.append(folder / "val" / "val_annotations.txt")
    return [(folder / ("train" if split == "train" else "val"), sources)]


def _cifar5m(root, split, options) -> list[Path]:
    from runs.datasets import cifar5m
    if root is None:
        return []
    if split != "train" and options.get("cifar10_root"):
        cifar10_root = Path(str(options["cifar10_root"])).expanduser()
        return [p for p in _cifar("CIFAR10")(cifar10_root, split, {}) if "test" in p.name
                or "meta" in p.name]
    parts = cifar5m.TRAIN_PARTS if split == "train" else (cifar5m.TEST_PART,)
    found = []
    for part in parts:  # with a subset only the first parts are read; record those there
        try:
            found.append(cifar5m._part_path(root, part))
        except UserError:
            continue
    return found


FILES: dict[str, Callable] = {
    "npz": _root_file, "cifar10": _cifar("CIFAR10"), "cifar100": _cifar("CIFAR100"),
    "mnist": _mnist("mnist", "MNIST"), "fashionmnist": _mnist("fashionmnist", "FashionMNIST"),
    "stl10": _stl10, "tinyimagenet": _tinyimagenet, "cifar5m": _cifar5m,
    "digits": lambda *a: [], "noise": lambda *a: [], "toy": lambda *a: [],
}
