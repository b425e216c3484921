"""TinyImageNet (200 classes, 64x64 RGB) from the standard `tiny-imagenet-200/` folder.

Layout: `wnids.txt` (the 200 class ids; their order defines the labels), `words.txt` (id -> names),
`train/<wnid>/images/*.JPEG` (500 a class) and `val/images/*.JPEG` with
`val/val_annotations.txt` (file <tab> wnid <tab> box). Split "test" is the labelled val folder
(the official test folder has no labels). JPEGs are decoded once with PIL and cached as uint8
.npy in `root/tinyimagenet_cache/`. `root` is the folder holding `tiny-imagenet-200/` (or that
folder itself).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from runs.datasets.base import (
    DatasetInfo,
    cached_arrays,
    dataset,
    need_root,
    no_data,
    to_image_data,
)
from runs.errors import UserError

NUM_CLASSES = 200
# Standard published train-set statistics (whole-split per-pixel std).
MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)


def _folder(root: Path | None) -> Path:
    if root is None:
        raise need_root("tinyimagenet", "tiny-imagenet-200")
    if (root / "wnids.txt").is_file():  # root is the dataset folder itself
        return root
    folder = root / "tiny-imagenet-200"
    if not (folder / "wnids.txt").is_file():
        raise no_data("tinyimagenet", folder / "wnids.txt", download_supported=False)
    return folder


def _wnids(folder: Path) -> list[str]:
    wnids = (folder / "wnids.txt").read_text().split()
    if len(wnids) != NUM_CLASSES or len(set(wnids)) != NUM_CLASSES:
        raise UserError(f"tinyimagenet: {folder / 'wnids.txt'} lists {len(set(wnids))} distinct "
                        f"class ids, expected {NUM_CLASSES}")
    return wnids


def _class_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
    """First synonym from words.txt ("goldfish, Carassius auratus" -> "goldfish"), else wnid."""
    words = {}
    if (folder / "words.txt").is_file():
        for line in (folder / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    return tuple(words.get(wnid) or wnid for wnid in wnids)


def _info(folder: Path | None, wnids: list[str] | None) -> DatasetInfo:
    names = _class_names(folder, wnids) if wnids else tuple(f"class_{i}" for i in range(200))
    return DatasetInfo("tinyimagenet", NUM_CLASSES, MEAN, STD, (64, 64), 3, names)


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        found = sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
        if not found:
            raise no_data("tinyimagenet", folder / "train" / wnid / "images",
                          download_supported=False)
        paths += found
        labels += [label] * len(found)
    return paths, labels


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    table = folder / "val" / "val_annotations.txt"
    if not table.is_file():
        raise no_data("tinyimagenet", table, download_supported=False)
    index = {wnid: label for label, wnid in enumerate(wnids)}
    paths, labels = [], []
    for number, line in enumerate(table.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise UserError(f"tinyimagenet: {table} line {number}: expected "
                            "'<file>\\t<wnid from wnids.txt>\\t...'")
        paths.append(folder / "val" / "images" / fields[0])
        labels.append(index[fields[1]])
    return paths, labels


def _decode_one(path: Path) -> np.ndarray:
    """One JPEG -> (3, 64, 64) uint8; a few TinyImageNet images are greyscale, hence RGB."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    except FileNotFoundError as err:
        raise no_data("tinyimagenet", path, download_supported=False) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UserError(f"tinyimagenet: corrupt image {path} ({err})") from err
    if pixels.shape != (64, 64, 3):
        raise UserError(f"tinyimagenet: image {path} is {pixels.shape[1]}x{pixels.shape[0]}, "
                        "expected 64x64")
    return pixels.transpose(2, 0, 1)


def decode_images(paths: list[Path]) -> np.ndarray:
    """Decode JPEGs in threads (PIL releases the GIL while decoding) into (N, 3, 64, 64)."""
    out = np.empty((len(paths), 3, 64, 64), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, pixels in enumerate(pool.map(_decode_one, paths, chunksize=256)):
            out[i] = pixels
    return out


def _info_from_root(root: Path | None) -> DatasetInfo:
    """Metadata without pixels; class names need the folder, else they are placeholders."""
    if root is None:
        return _info(None, None)
    folder = _folder(root)
    return _info(folder, _wnids(folder))


@dataset("train", "test", info=_info_from_root)
def tinyimagenet(root, split, download, seed):
    """TinyImageNet: 100000 train / 10000 test ("val" folder) RGB 64x64 images, 200 classes."""
    if download:
        raise UserError("tinyimagenet: download=True is not supported; unzip "
                        "tiny-imagenet-200.zip by hand and point root at the folder holding it")
    folder = _folder(root)
    wnids = _wnids(folder)
    files = _train_files if split == "train" else _val_files
    paths, labels = files(folder, wnids)
    sources = [folder / "wnids.txt", *paths]
    if split == "test":
        sources.append(folder / "val" / "val_annotations.txt")

    def decode():
        return decode_images(paths), np.asarray(labels, dtype=np.int64)

    try:
        x, y = cached_arrays(root / "tinyimagenet_cache", split, sources, decode)
    except FileNotFoundError as err:  # an annotated val image that is not on disk
        raise no_data("tinyimagenet", Path(err.filename), download_supported=False) from err
    return to_image_data(x, y, _info(folder, wnids))
