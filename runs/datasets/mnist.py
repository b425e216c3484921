"""MNIST and Fashion-MNIST from IDX files (plain or .gz), read with numpy.

Files are looked up in torchvision's layout `root/MNIST/raw/` (`root/FashionMNIST/raw/`), then
in `root` itself. Fashion-MNIST with `root=None` uses the files of Debian's
`dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`), found with `dpkg -L`.
"""

import functools
import gzip
import subprocess
import zlib
from pathlib import Path

import numpy as np
import torchvision

from runs.datasets.base import (
    DatasetInfo,
    dataset,
    download_failed,
    need_root,
    no_data,
    to_image_data,
)
from runs.errors import UserError

# IDX type codes -> big-endian numpy dtypes (the format's spec; MNIST itself is all 0x08).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Standard published train-set statistics.
MNIST_INFO = DatasetInfo("mnist", 10, (0.1307,), (0.3081,), (28, 28), 1,
                         tuple(str(digit) for digit in range(10)))
FASHION_INFO = DatasetInfo("fashionmnist", 10, (0.2860,), (0.3530,), (28, 28), 1,
                           FASHION_CLASSES)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed if its name ends in .gz) into a numpy array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"corrupt file {path} (cannot decompress: {err})") from err
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise UserError(f"corrupt file {path} (not an IDX file: bad magic number)")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(shape) != ndim or len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise UserError(f"corrupt file {path} (IDX header says shape {shape}, "
                        f"the file has {len(raw) - header} data bytes)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


@functools.cache
def debian_fashion_mnist() -> Path | None:
    """The folder of Debian's `dataset-fashion-mnist` files, or None if it is not installed."""
    try:
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                                 text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no dpkg: not a Debian system
    if listing.returncode != 0:
        return None
    for line in listing.stdout.splitlines():
        path = Path(line.strip())
        if path.name == "train-images-idx3-ubyte.gz" and path.is_file():
            return path.parent
    return None


def _find(name: str, folders: list[Path], file_name: str) -> Path:
    """The plain or .gz file in the first folder that has it."""
    for folder in folders:
        for candidate in (folder / file_name, folder / f"{file_name}.gz"):
            if candidate.is_file():
                return candidate
    raise no_data(name, folders[0] / file_name)


def _read(name: str, info: DatasetInfo, folders: list[Path], split: str):
    image_path, label_path = (_find(name, folders, file) for file in _FILES[split])
    try:
        x, y = read_idx(image_path), read_idx(label_path)
    except UserError as err:
        raise UserError(f"{name}: {err}") from None
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or y.size and y.max() >= info.num_classes:
        raise UserError(f"{name}: {image_path} and {label_path} do not hold N images (N, H, W) "
                        f"and N labels in 0..{info.num_classes - 1}: {x.shape}, {y.shape}")
    if x.shape[1:] != info.image_size:
        raise UserError(f"{name}: {image_path} holds {x.shape[1]}x{x.shape[2]} images, "
                        f"expected {info.image_size[0]}x{info.image_size[1]}")
    return to_image_data(x[:, None], y.astype(np.int64), info)  # (N, 1, H, W) uint8


def _download(name: str, cls, root: Path, split: str) -> None:
    """Fetch the IDX files into root/<cls.__name__>/raw with torchvision's downloader."""
    try:
        cls(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as err:
        raise download_failed(name, root, err) from err


@dataset("train", "test", info=lambda root: MNIST_INFO)
def mnist(root, split, download, seed):
    """MNIST: 60000 train / 10000 test grey 28x28 digits."""
    if root is None:
        raise need_root("mnist", "MNIST/raw/ or the IDX files")
    if download:
        _download("mnist", torchvision.datasets.MNIST, root, split)
    return _read("mnist", MNIST_INFO, [root / "MNIST" / "raw", root], split)


@dataset("train", "test", info=lambda root: FASHION_INFO)
def fashionmnist(root, split, download, seed):
    """Fashion-MNIST: 60000 train / 10000 test grey 28x28 clothing images."""
    if root is None:
        debian = debian_fashion_mnist()
        if debian is None:
            raise UserError("fashionmnist: no root given and Debian's dataset-fashion-mnist is "
                            "not installed; pass --data-root <the folder holding "
                            "FashionMNIST/raw/> (root= in Python) or run apt-get install "
                            "dataset-fashion-mnist")
        return _read("fashionmnist", FASHION_INFO, [debian], split)
    if download:
        _download("fashionmnist", torchvision.datasets.FashionMNIST, root, split)
    return _read("fashionmnist", FASHION_INFO, [root / "FashionMNIST" / "raw", root], split)
