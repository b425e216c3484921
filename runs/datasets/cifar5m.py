"""CIFAR-5M (Nakkiran, Neyshabur & Sedghi, ICLR 2021): about 6M CIFAR-10-like RGB 32x32 images
(sampled from a generative model trained on CIFAR-10, labelled by a CIFAR-10 classifier) in six
parts, read straight from their npz files without loading what is not asked for.

Files (github.com/preetum/cifar5m): `cifar5m_part0.npz` .. `cifar5m_part5.npz`, each holding
`X` uint8 (N, 32, 32, 3) and `Y` integer labels (N,) in CIFAR-10's class order, N = 1,000,448.
`root` is their folder (or the folder holding `cifar-5m/` or `cifar5m/` with them); the paper's
code's names `part0.npz` .. `part5.npz` are read too.

Splits:
- train: parts 0-4 (5,002,240 images). With `subset=k` (k images per class, as for every
  dataset) only as many parts as give every class k images are read, part 0 first, and k per
  class are drawn from them with `seed` exactly as `subset` draws elsewhere; the images are
  gathered from memory-mapped files, so 100,000 images cost 300 MB, not 15 GB. Sizes above
  CIFAR-10's 50,000 are the point (the paper's data-size study). Without `subset` all five
  parts are loaded (15 GB).
- test: never a training image. With `cifar10_root=<folder holding cifar-10-batches-py>`,
  CIFAR-10's own 10,000 test images (what the paper's code evaluated on); otherwise the first
  10,000 images of part 5, which training never reads.

The paper's code instead took CIFAR-10's 50,000 train images followed by the first CIFAR-5M
images in file order (not stratified) and normalised them with CIFAR-10's statistics, which
`stats="paper"` reproduces (runs.datasets.base.PAPER_STATS). CIFAR-5M publishes no statistics
of its own: under "dataset" it uses CIFAR-10's published ones, the distribution it imitates.
"""

import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from runs.datasets import cifar
from runs.datasets.base import (
    ROOT,
    DatasetInfo,
    ImageData,
    check_per_class,
    dataset,
    need_root,
    per_class_indices,
    to_image_data,
)
from runs.errors import UserError

CIFAR5M_INFO = DatasetInfo("cifar5m", 10, cifar.CIFAR10_INFO.mean, cifar.CIFAR10_INFO.std,
                           (32, 32), 3, cifar.CIFAR10_CLASSES)
TRAIN_PARTS = (0, 1, 2, 3, 4)
TEST_PART = 5
TEST_COUNT = 10_000  # images of the held-out part in the test split (CIFAR-10's test size)
EXPECTED = "cifar5m_part0.npz .. cifar5m_part5.npz (X uint8 (N, 32, 32, 3), Y labels)"
_CHUNK = 65_536  # images per HWC -> CHW copy when reading whole parts (200 MB)


def _part_path(root: Path, part: int) -> Path:
    """The file of one part, or a one-line error naming the folder and the expected files."""
    for folder in (root, root / "cifar-5m", root / "cifar5m"):
        for name in (f"cifar5m_part{part}.npz", f"part{part}.npz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(f"cifar5m: no cifar5m_part{part}.npz in {root}; expected {EXPECTED} "
                    f"(github.com/preetum/cifar5m): point {ROOT} at their folder")


def _data_offset(path: Path, member: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    with open(path, "rb") as handle:
        handle.seek(member.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_length + extra_length


def _memmap_member(path: Path, archive: zipfile.ZipFile, key: str) -> np.ndarray | None:
    """A member saved uncompressed (np.savez) as a read-only memory map; None if compressed."""
    member = archive.getinfo(f"{key}.npy")
    if member.compress_type != zipfile.ZIP_STORED:
        return None
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(handle)
        header_length = handle.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape,
                     offset=_data_offset(path, member) + header_length,
                     order="F" if fortran_order else "C")


def read_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) of one part: X memory-mapped (N, 32, 32, 3) uint8 where the file allows it."""
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [key for key in ("X", "Y") if f"{key}.npy" not in archive.namelist()]
            if missing:
                raise UserError(f"cifar5m: {path} lacks {', '.join(missing)}; expected "
                                f"{EXPECTED}")
            x = _memmap_member(path, archive, "X")
        if x is None:  # compressed: the whole array has to be decompressed
            with np.load(path, allow_pickle=False) as arrays:
                x = arrays["X"]
        with np.load(path, allow_pickle=False) as arrays:
            y = arrays["Y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"cifar5m: corrupt file {path} ({err})") from err
    _check_part(path, x, y)
    return x, y


def _check_part(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise UserError(f"cifar5m: {path} has X {x.dtype} {x.shape}, expected uint8 "
                        "(N, 32, 32, 3)")
    if y.dtype.kind not in "iu" or y.shape != (len(x),) or (len(y) and (
            y.min() < 0 or y.max() > 9)):
        raise UserError(f"cifar5m: {path} has Y {y.dtype} {y.shape}, expected {len(x)} "
                        "integer labels in 0..9")


def _gather(parts: list[tuple[np.ndarray, np.ndarray]], keep: np.ndarray) -> ImageData:
    """The images at sorted global indices `keep` over the concatenated parts, as (N, C, H, W)."""
    x = np.empty((len(keep), 3, 32, 32), dtype=np.uint8)
    y = np.empty(len(keep), dtype=np.int64)
    start, done = 0, 0
    for images, labels in parts:
        local = keep[(keep >= start) & (keep < start + len(labels))] - start
        for first in range(0, len(local), _CHUNK):  # fancy indexing reads only these rows
            rows = local[first:first + _CHUNK]
            x[done:done + len(rows)] = images[rows].transpose(0, 3, 1, 2)  # HWC -> CHW
            y[done:done + len(rows)] = labels[rows]
            done += len(rows)
        start += len(labels)
    return to_image_data(x, y, CIFAR5M_INFO)


def _parts_for(root: Path, per_class: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The train parts to read: all five, or the fewest (from part 0) with `per_class` of
    every class."""
    parts, counts = [], np.zeros(10, dtype=np.int64)
    for part in TRAIN_PARTS:
        parts.append(read_part(_part_path(root, part)))
        counts += np.bincount(parts[-1][1], minlength=10)[:10]
        if per_class is not None and counts.min() >= per_class:
            break
    return parts


def _train(root: Path, per_class: int | None, seed: int) -> ImageData:
    if per_class is not None:
        check_per_class(per_class)
    parts = _parts_for(root, per_class)
    labels = torch.from_numpy(np.concatenate([np.asarray(y, dtype=np.int64) for _, y in parts]))
    if per_class is None:
        keep = np.arange(len(labels))
    else:
        where = f"parts 0-{len(parts) - 1}" if len(parts) > 1 else "part 0"
        keep = per_class_indices(labels, CIFAR5M_INFO, per_class, seed, where).numpy()
    return _gather(parts, keep)


def _test(root: Path, cifar10_root, seed: int) -> ImageData:
    if cifar10_root is not None:
        data = cifar.cifar10(Path(str(cifar10_root)).expanduser(), "test", False, seed)
        return ImageData(x=data.x, y=data.y, info=CIFAR5M_INFO)
    x, y = read_part(_part_path(root, TEST_PART))
    return _gather([(x[:TEST_COUNT], y[:TEST_COUNT])], np.arange(min(TEST_COUNT, len(y))))


@dataset("train", "test", info=lambda root, cifar10_root=None: CIFAR5M_INFO, takes_subset=True)
def cifar5m(root, split, download, seed, *, cifar10_root=None, subset=None):
    """CIFAR-5M: train = parts 0-4 (read as far as `subset` needs), test = CIFAR-10's test set
    (cifar10_root=) or the first 10,000 images of part 5."""
    if download:
        raise UserError("cifar5m: download=True is not supported; fetch cifar5m_part0.npz .. "
                        f"cifar5m_part5.npz by hand and point {ROOT} at their folder")
    if root is None:
        raise need_root("cifar5m", "cifar5m_part0.npz .. cifar5m_part5.npz")
    if split == "train":
        return _train(root, subset, seed)
    return _test(root, cifar10_root, seed)
