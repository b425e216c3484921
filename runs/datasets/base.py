"""What every dataset loader shares: the result types, the registry, statistics and the cache.

A loader is a function registered in `DATASETS` under its own name and called as
`fn(root, split, download, seed, **options) -> ImageData`: `root` is a `Path` or None, `split`
one of the loader's `splits`. Its keyword-only options are the dataset's own options; the
generic ones (`stats`, `channels`, `size`, `subset`) are applied afterwards by `runs.data`
(a loader registered with takes_subset=True also gets `subset=`, to read no more than it
needs). Input statistics: STATS, PAPER_STATS and `with_stats`.
"""

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from runs.errors import UserError
from runs.registry import Registry

DATASETS = Registry("dataset")


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a dataset as loaded (after the `channels` and `size` options)."""

    name: str  # registered name: "cifar10", "npz", ...
    num_classes: int  # labels are 0..num_classes-1 (-1 marks unlabeled images)
    mean: tuple[float, ...]  # per channel, [0, 1] scale, of the train split
    std: tuple[float, ...]  # per channel, [0, 1] scale, of the train split
    image_size: tuple[int, int]  # (H, W) in pixels
    channels: int  # C: 1 (grey) or 3 (RGB)
    class_names: tuple[str, ...]  # num_classes names, index = label
    stats: str = "dataset"  # where mean/std come from: "paper" (the paper's code) or "dataset"


@dataclass
class ImageData:
    """One split of a dataset, whole, as it lives on the device: uint8 pixels and int64 labels."""

    x: torch.Tensor  # (N, C, H, W) uint8, CPU, contiguous
    y: torch.Tensor  # (N,) int64; -1 for unlabeled images
    info: DatasetInfo

    def __len__(self) -> int:
        return self.x.shape[0]


def dataset(*splits: str, info: Callable[..., DatasetInfo] | None = None,
            takes_subset: bool = False):
    """Register a loader with its valid splits and, optionally, a pixel-free metadata function.

    `info(root, **options) -> DatasetInfo` lets `dataset_info` answer without decoding images;
    without it, `dataset_info` loads the train split and takes its `.info`. `takes_subset`:
    the loader is also called with `subset=` (images per class, or None) so that it can read
    only what the subset needs (a dataset too large to load whole: cifar5m).
    """

    def add(fn):
        fn.splits = splits
        fn.info = info
        fn.takes_subset = takes_subset
        return DATASETS.register(fn)

    return add


# ------------------------------------------------------------------------- input statistics

# --input-stats: "paper" = the mean/std the paper's code (safelix/dinopl) normalised with,
# "dataset" = each dataset's own train statistics. The paper's code gave CIFAR-100 (and the
# CIFAR-5M images it appended to CIFAR-10) CIFAR-10's class constants and TinyImageNet
# ImageNet's; datasets missing here (digits, noise, npz, MNIST, STL-10, ...) have no separate
# paper choice and load the same under both. Its CIFAR-10 std is rounded to 3 digits.
STATS = ("paper", "dataset")
CIFAR10_CODE_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PAPER_STATS = {"cifar10": CIFAR10_CODE_STATS, "cifar100": CIFAR10_CODE_STATS,
               "cifar5m": CIFAR10_CODE_STATS, "tinyimagenet": IMAGENET_STATS}


def check_stats(stats: str) -> str:
    if stats not in STATS:
        raise UserError(f"--input-stats {stats!r}: unknown input statistics; valid: "
                        f"{', '.join(STATS)} (stats= in Python)")
    return stats


def with_stats(info: DatasetInfo, stats: str) -> DatasetInfo:
    """`info` with the mean/std that `stats` selects; `info.stats` records the source.

    "paper" swaps in PAPER_STATS where the paper's code had its own choice; elsewhere (and
    under "dataset") the dataset's own statistics stay, recorded as "dataset".
    """
    if check_stats(stats) == "paper" and info.name in PAPER_STATS:
        mean, std = PAPER_STATS[info.name]
        return replace(info, mean=mean, std=std, stats="paper")
    return info


# ------------------------------------------------------------------------------ subsets


def check_per_class(per_class) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"subset: expected a positive number of images per class, "
                        f"got {per_class!r}")


def per_class_indices(y: torch.Tensor, info: DatasetInfo, per_class, seed: int,
                      where: str) -> torch.Tensor:
    """Sorted indices of `per_class` images of every class, drawn with `seed`.

    Class by class (0, 1, ...), a seeded permutation of that class's images in their order;
    all-unlabeled labels (-1, STL-10's "unlabeled") give `per_class` images in all. `where`
    names the images for errors ("split 'train'", "parts 0-4").
    """
    check_per_class(per_class)
    generator = torch.Generator().manual_seed(seed)
    unlabeled = bool((y < 0).all())
    groups = [torch.arange(len(y))] if unlabeled else [
        (y == label).nonzero().flatten() for label in range(info.num_classes)]
    picks = []
    for label, index in enumerate(groups):
        if len(index) < per_class:
            what = "unlabeled" if unlabeled else f"class {label} ({info.class_names[label]})"
            raise UserError(f"subset={per_class}: {info.name} {what} has only "
                            f"{len(index)} images in {where}")
        picks.append(index[torch.randperm(len(index), generator=generator)[:per_class]])
    return torch.cat(picks).sort().values


def _writable(array: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous, writable (torch warns on read-only buffers such as np.frombuffer's)."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return array if array.flags.writeable else array.copy()


def to_image_data(x: np.ndarray, y: np.ndarray, info: DatasetInfo) -> ImageData:
    """Wrap numpy arrays, checking the layout the rest of the toolkit relies on."""
    x_t = torch.from_numpy(_writable(x, np.uint8))  # (N, C, H, W) uint8
    y_t = torch.from_numpy(_writable(y, np.int64))  # (N,) int64
    assert x_t.ndim == 4 and x_t.shape[1] == info.channels, (x_t.shape, info)
    assert y_t.shape == (x_t.shape[0],), (y_t.shape, x_t.shape)
    return ImageData(x=x_t, y=y_t, info=info)


def pixel_stats(x: torch.Tensor | np.ndarray):
    """Per-channel (mean, std) of uint8 images (N, C, H, W) on the [0, 1] scale.

    From exact per-channel histograms of the 256 values (bincount is fast and exact, where
    summing 10^8 uint8 values in float32 is neither).
    """
    x = torch.as_tensor(x)
    values = torch.arange(256, dtype=torch.float64) / 255  # (256,) on the [0, 1] scale
    mean, std = [], []
    for channel in range(x.shape[1]):
        counts = torch.bincount(x[:, channel].reshape(-1), minlength=256).double()  # (256,)
        m = (counts * values).sum() / counts.sum()
        var = (counts * (values - m) ** 2).sum() / counts.sum()
        mean.append(m.item())
        std.append(var.sqrt().item())
    return tuple(mean), tuple(std)


# ------------------------------------------------------------------------- sizes and options

# A generated split above this many bytes of uint8 pixels is refused before it is allocated
# (CIFAR-10's train split is 0.15 GB: a bigger one is a typo in a shape or a count).
MAX_DATA_BYTES = 16 * 2 ** 30
MAX_CLASSES = 1_000_000  # labels are class indices: a label of 1e12 is not a class


def whole_option(dataset: str, key: str, value, minimum: int = 1) -> int:
    """A dataset option that must be a whole number >= minimum (an integral float such as
    1e5 too), as an int; else a one-line error naming the option as --data-options gives it."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool) and np.isfinite(value) and int(value) == value and value >= minimum
    if not ok:
        raise UserError(f"{dataset}: --data-options {key}={_shown(value)}: must be a whole "
                        f"number >= {minimum}")
    return int(value)


def _shown(value) -> str:
    """An option's value as it was typed: `3,a,32` for a tuple."""
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def check_data_bytes(dataset: str, count: int, shape, option: str, factor: int = 1) -> None:
    """Refuse `count` images of `shape` (C, H, W) whose uint8 pixels (times `factor`, the
    temporaries of generating them) would exceed MAX_DATA_BYTES, naming the option to lower."""
    total = int(count) * int(np.prod([int(n) for n in shape], dtype=object)) * factor
    if total > MAX_DATA_BYTES:
        raise UserError(f"{dataset}: {count} images of shape {tuple(shape)} would take "
                        f"{total / 2 ** 30:.3g} GiB, above the limit of "
                        f"{MAX_DATA_BYTES / 2 ** 30:.0f} GiB; lower {option}")


# A loader cannot know whether a command line or Python called it: its messages name both
# ways of giving the folder (the flag is --data-root on every command, --probe-root for
# runs.distill's probe data).
ROOT = "--data-root (root= in Python)"


def no_data(name: str, path: Path, download_supported: bool = True) -> UserError:
    """The one-line error for a missing file or folder, with how to get it."""
    if download_supported:
        hint = (f"download it (in Python: download=True) and point {ROOT} at the folder "
                f"holding it")
    else:
        hint = f"download it by hand and point {ROOT} at the folder holding it"
    return UserError(f"{name}: no data at {path} ({hint})")


def download_failed(name: str, root: Path, err: Exception) -> UserError:
    """A failed download (no network, bad checksum) as one line; torchvision's span several."""
    return UserError(f"{name}: download to {root} failed: {' '.join(str(err).split())}")


def need_root(name: str, holds: str) -> UserError:
    """The error for a loader called without the `root` it needs."""
    return UserError(f"{name}: no root given; pass --data-root <the folder holding {holds}> "
                     f"(root= in Python)")


def _fingerprint(sources: list[Path]) -> str:
    """A cheap stamp of the source files: names, sizes and modification times."""
    digest = hashlib.sha1()
    for path in sources:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def cached_arrays(cache_dir: Path, key: str, sources: list[Path],
                  decode: Callable[[], tuple[np.ndarray, np.ndarray]]):
    """Return `decode()`'s (x, y), decoding once and caching them as .npy files in `cache_dir`.

    The cache is valid while the source files keep their sizes and modification times; the
    stamp is written last, so an interrupted write is simply decoded again. A read-only
    `cache_dir` only costs a warning: the data is still returned.
    """
    x_path, y_path = cache_dir / f"{key}_x.npy", cache_dir / f"{key}_y.npy"
    stamp_path = cache_dir / f"{key}.stamp"
    stamp = _fingerprint(sources)
    if stamp_path.is_file() and stamp_path.read_text() == stamp:
        try:
            return np.load(x_path), np.load(y_path)
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache is decoded again below
    x, y = decode()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic(x_path, x)
        _save_atomic(y_path, y)
        stamp_path.write_text(stamp)
    except OSError as err:
        warnings.warn(f"could not cache decoded images in {cache_dir}: {err}", stacklevel=2)
    return x, y
