"""Datasets that arrive as arrays: sklearn's embedded digits and any user `.npz` file.

Both compute their mean/std from their own train split.
"""

import functools
import zipfile
from pathlib import Path

import numpy as np

from runs.datasets.base import (
    MAX_CLASSES,
    ROOT,
    DatasetInfo,
    dataset,
    pixel_stats,
    to_image_data,
)
from runs.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _digits_split(target: np.ndarray, test_fraction: float, seed: int):
    """Seeded stratified (train, test) indices, each sorted to keep the original order."""
    from sklearn.model_selection import train_test_split

    number = isinstance(test_fraction, int | float | np.number) and not isinstance(
        test_fraction, bool)
    if not (number and 0 < test_fraction < 1):
        raise UserError(f"digits: --data-options test_fraction={test_fraction}: must be a "
                        f"number in (0, 1)")
    train, test = train_test_split(np.arange(len(target)), test_size=test_fraction,
                                   stratify=target, random_state=seed)
    return np.sort(train), np.sort(test)


@dataset("train", "test")
def digits(root, split, download, seed, *, test_fraction=1 / 3):
    """sklearn's 1797 grey 8x8 digits (0..16 scaled to 0..255), split train/test by `seed`.

    Embedded in scikit-learn, so it needs no root and no network: the default small dataset.
    """
    images, target = _digits_arrays()
    train, test = _digits_split(target, test_fraction, seed)
    mean, std = pixel_stats(images[train])
    info = DatasetInfo("digits", 10, mean, std, (8, 8), 1, tuple(str(d) for d in range(10)))
    index = train if split == "train" else test
    return to_image_data(images[index], target[index], info)  # indexing copies: cache intact


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images (N, 1, 8, 8) uint8 (0..16 scaled to 0..255) and labels, read once."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None], bunch.target


def _open_npz(root: Path | None) -> dict[str, np.ndarray]:
    """The four arrays of the file; one-line errors for a missing, corrupt or incomplete file."""
    if root is None or not root.is_file():
        where = "no root given" if root is None else f"no file at {root}"
        raise UserError(f"npz: {where}; pass {ROOT} <path of a .npz holding "
                        f"{', '.join(NPZ_KEYS)}>")
    try:
        with np.load(root, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise UserError(f"npz: {root} lacks {', '.join(missing)} (has "
                                f"{', '.join(archive.files) or 'nothing'}; needs "
                                f"{', '.join(NPZ_KEYS)})")
            return {key: archive[key] for key in NPZ_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"npz: corrupt file {root} ({err})") from err


def _to_nchw(x: np.ndarray, where: str, layout: str) -> np.ndarray:
    """Images as (N, C, H, W) uint8 from NCHW, NHWC or grey NHW, C in {1, 3}."""
    if x.dtype != np.uint8:
        raise UserError(f"npz: {where} has dtype {x.dtype}, expected uint8")
    if x.ndim == 3:
        return x[:, None]  # grey (N, H, W) -> (N, 1, H, W)
    if x.ndim != 4:
        raise UserError(f"npz: {where} has shape {x.shape}; expected NCHW, NHWC or NHW")
    if layout == "auto":  # channels where a 1 or a 3 is; NCHW wins the (rare) tie
        layout = "nchw" if x.shape[1] in (1, 3) else "nhwc"
    if layout == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise UserError(f"npz: {where} has shape {x.shape} as {layout.upper()}; "
                        "expected 1 or 3 channels")
    return x


def _num_classes(arrays, path: Path, class_names) -> tuple[int, tuple[str, ...]]:
    """(num_classes, names): max label + 1, or len(class_names); labels checked by key."""
    for key, lowest in (("y_train", -1), ("y_test", 0)):  # test images need their labels
        y = arrays[key]
        if y.dtype.kind not in "iu":
            raise UserError(f"npz: {path}:{key} has dtype {y.dtype}; labels must be integers "
                            f">= 0 (-1 = unlabeled, in y_train only)")
        if y.size and y.min() < lowest:
            first = int(np.argmax(y.ravel() < lowest))
            raise UserError(f"npz: {path}:{key} holds label {y.ravel()[first]} (image "
                            f"{first}); labels must be integers >= 0"
                            + (" (-1 = unlabeled)" if lowest < 0 else
                               " (every test image needs its class)"))
    tops = {key: int(arrays[key].max()) if arrays[key].size else -1
            for key in ("y_train", "y_test")}
    key, top = max(tops.items(), key=lambda item: item[1])
    if top + 1 > MAX_CLASSES:
        raise UserError(f"npz: {path}:{key} holds label {top}; labels are class indices "
                        f"0..num_classes-1, at most {MAX_CLASSES} classes")
    num_classes = top + 1
    if class_names is None:
        return num_classes, tuple(str(label) for label in range(num_classes))
    class_names = class_names if isinstance(class_names, tuple | list) else (class_names,)
    if len(class_names) < num_classes:
        raise UserError(f"npz: class_names has {len(class_names)} names but {path} has labels "
                        f"up to {num_classes - 1}")
    return len(class_names), tuple(str(name) for name in class_names)


def _check_images(x: np.ndarray, where: str) -> None:
    """At least one image in each split: an empty test split divides by zero later."""
    if len(x) == 0:
        raise UserError(f"npz: {where} holds 0 images; each split needs at least one")


def _check_varies(x_train: np.ndarray, std, where: str) -> None:
    """Refuse train images of one constant value in a channel: nothing to learn from, and
    normalising by their std (0) turns every pixel into NaN or Inf (a NaN loss later)."""
    for channel, spread in enumerate(std):
        if spread == 0:
            value = int(x_train[:, channel].flat[0])
            raise UserError(f"npz: {where} is constant (every pixel of channel {channel} is "
                            f"{value}): nothing to learn from; check the file's images")


@dataset("train", "test")
def npz(root, split, download, seed, *, class_names=None, layout="auto"):
    """Arrays from a .npz file (root = its path): x_train, y_train, x_test, y_test.

    Images uint8 as NCHW, NHWC or grey NHW (`layout` "auto", "nchw" or "nhwc"); labels
    integers (-1 = unlabeled, in y_train only). num_classes = max label + 1, or
    len(class_names) when given. Refused with a line naming the key: an empty split,
    constant train images, a label below -1 (or -1 in y_test).
    """
    if layout not in ("auto", "nchw", "nhwc"):
        raise UserError(f"npz: unknown layout {layout!r}; valid: auto, nchw, nhwc")
    arrays = _open_npz(root)
    x_train = _to_nchw(arrays["x_train"], f"{root}:x_train", layout)
    _check_images(x_train, f"{root}:x_train")
    x = x_train if split == "train" else _to_nchw(arrays["x_test"], f"{root}:x_test", layout)
    _check_images(x, f"{root}:x_{split}")
    num_classes, names = _num_classes(arrays, root, class_names)
    y = arrays[f"y_{split}"]
    if x.shape[1:] != x_train.shape[1:] or y.shape != (len(x),):
        raise UserError(f"npz: {root} has x_{split} {x.shape} and y_{split} {y.shape}; "
                        f"expected N images like x_train's {x_train.shape[1:]} and N labels")
    mean, std = pixel_stats(x_train)
    _check_varies(x_train, std, f"{root}:x_train")
    info = DatasetInfo("npz", num_classes, mean, std, tuple(x.shape[2:]), x.shape[1], names)
    return to_image_data(x, y, info)
