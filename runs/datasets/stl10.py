"""STL-10 from its binary release (`stl10_binary/`), decoded once and cached as uint8 .npy.

`root` is the folder holding `stl10_binary/`, as for `torchvision.datasets.STL10`. Each image in
`*_X.bin` is 3 x 96 x 96 bytes, every channel stored column-major (Matlab order), so a reshape
gives (C, W, H) and one transpose gives (C, H, W). Labels in `*_y.bin` are bytes 1..10.
The decoded arrays go to `root/stl10_cache/`.
"""

from pathlib import Path

import numpy as np
import torchvision
from torchvision.datasets.utils import download_and_extract_archive

from runs.datasets.base import (
    DatasetInfo,
    cached_arrays,
    dataset,
    download_failed,
    need_root,
    no_data,
    to_image_data,
)
from runs.errors import UserError

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer",
                 "dog", "horse", "monkey", "ship", "truck")
# Standard published statistics (the values used by the SSL literature's STL-10 pipelines).
STL10_INFO = DatasetInfo("stl10", 10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
                         (96, 96), 3, STL10_CLASSES)
_IMAGE_BYTES = 3 * 96 * 96
_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
          "unlabeled": ("unlabeled_X.bin", None)}


def decode_images(path: Path) -> np.ndarray:
    """Read a `*_X.bin` file into (N, 3, 96, 96) uint8 (rows first)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _IMAGE_BYTES:
        raise UserError(f"stl10: corrupt file {path} ({raw.size} bytes is not a positive "
                        f"multiple of {_IMAGE_BYTES} = 3x96x96)")
    column_major = raw.reshape(-1, 3, 96, 96)  # (N, C, W, H) as stored
    return np.ascontiguousarray(column_major.transpose(0, 1, 3, 2))  # (N, C, H, W)


def decode_labels(path: Path, count: int) -> np.ndarray:
    """Read a `*_y.bin` file (bytes 1..10) into (N,) int64 labels 0..9."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != count or raw.size and (raw.min() < 1 or raw.max() > 10):
        raise UserError(f"stl10: corrupt file {path} (expected {count} labels in 1..10, "
                        f"got {raw.size})")
    return raw.astype(np.int64) - 1


def _download(root: Path) -> None:
    """Fetch and unpack the release with torchvision's downloader (md5-checked archive)."""
    cls = torchvision.datasets.STL10
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except (OSError, RuntimeError) as err:
        raise download_failed("stl10", root, err) from err


@dataset("train", "test", "unlabeled", info=lambda root: STL10_INFO)
def stl10(root, split, download, seed):
    """STL-10: 5000 train / 8000 test labelled and 100000 unlabeled (label -1) RGB 96x96."""
    if root is None:
        raise need_root("stl10", "stl10_binary")
    folder = root / "stl10_binary"
    x_name, y_name = _FILES[split]
    sources = [folder / name for name in (x_name, y_name) if name]
    if download and not all(path.is_file() for path in sources):
        _download(root)
    for path in sources:
        if not path.is_file():
            raise no_data("stl10", path)

    def decode():
        x = decode_images(sources[0])
        y = decode_labels(sources[1], len(x)) if y_name else np.full(len(x), -1, np.int64)
        return x, y

    x, y = cached_arrays(root / "stl10_cache", split, sources, decode)
    return to_image_data(x, y, STL10_INFO)
