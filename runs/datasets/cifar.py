"""CIFAR-10 and CIFAR-100 from the official python-pickle release, read by torchvision.

`root` is the folder holding `cifar-10-batches-py/` (or `cifar-100-python/`), as for
`torchvision.datasets.CIFAR10`. torchvision checks every file's md5 before reading; its
failures are turned into one-line errors naming the missing, corrupt or unreadable file.
"""

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import torchvision
from torchvision.datasets.utils import check_integrity

from runs.datasets.base import (
    DatasetInfo,
    dataset,
    download_failed,
    need_root,
    no_data,
    to_image_data,
)
from runs.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange
orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm
""".split())

# Standard published train-set statistics (per-pixel std over the whole split, not the mean of
# per-image stds). CIFAR-100 has its own: the public code reused CIFAR-10's, a known defect.
CIFAR10_INFO = DatasetInfo("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           (32, 32), 3, CIFAR10_CLASSES)
CIFAR100_INFO = DatasetInfo("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            (32, 32), 3, CIFAR100_CLASSES)

_UNREADABLE = (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
               AttributeError, IndexError, UnicodeDecodeError)


def _file_names(cls) -> list[tuple[str, str | None]]:
    """(file name, md5) of every file torchvision checks, read from the class at call time."""
    files = [(name, md5) for name, md5 in cls.train_list + cls.test_list]
    return files + [(cls.meta["filename"], cls.meta["md5"])]


def _check_files(name: str, cls, root: Path) -> None:
    """Raise a one-line error for the first missing or md5-mismatched file."""
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise no_data(name, folder)
    for file_name, _ in _file_names(cls):
        if not (folder / file_name).is_file():
            raise no_data(name, folder / file_name)
    for file_name, md5 in _file_names(cls):
        if not check_integrity(str(folder / file_name), md5):
            raise UserError(f"{name}: corrupt file {folder / file_name} (md5 mismatch; delete it "
                            "and download it again; in Python: download=True)")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts, lists, bytes, numpy arrays) and nothing that could
    run code: any other global is an UnpicklingError, reported as an unreadable file."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                         "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # protocol-2 bytes: encode(str, "latin1"), no side effect

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not data")
        return super().find_class(module, name)


def _unreadable_file(cls, folder: Path, label_key: str) -> Path:
    """The first pickle in `folder` that does not hold the expected keys (for the error)."""
    for file_name, _ in cls.train_list + cls.test_list:
        try:
            with open(folder / file_name, "rb") as handle:
                entry = _ArraysOnly(handle, encoding="latin1").load()
            if len(entry[label_key]) * 3072 != np.asarray(entry["data"]).size:
                raise ValueError("labels and images differ in number")
        except _UNREADABLE:
            return folder / file_name
    return folder / cls.meta["filename"]


def _read(name: str, cls, info: DatasetInfo, root: Path | None, split: str, download: bool):
    """Load one split through torchvision; (N, 32, 32, 3) HWC becomes (N, 3, 32, 32)."""
    if root is None:
        raise need_root(name, cls.base_folder)
    try:
        data = cls(str(root), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision's "not found or corrupted": say which file
        _check_files(name, cls, root)
        raise UserError(f"{name}: cannot load {root / cls.base_folder}: {err}") from err
    except OSError as err:  # a failed download (no network, disk full), or an unreadable file
        if download:
            raise download_failed(name, root, err) from err
        raise UserError(f"{name}: cannot read {root / cls.base_folder}: {err}") from err
    except _UNREADABLE as err:
        label_key = "labels" if cls is torchvision.datasets.CIFAR10 else "fine_labels"
        path = _unreadable_file(cls, root / cls.base_folder, label_key)
        raise UserError(f"{name}: cannot read {path} as a CIFAR pickle ({err!r})") from err
    if len(data.classes) != info.num_classes:
        path = root / cls.base_folder / cls.meta["filename"]
        raise UserError(f"{name}: {path} names {len(data.classes)} classes, "
                        f"expected {info.num_classes}")
    x = data.data.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W) uint8
    y = np.asarray(data.targets, dtype=np.int64)  # (N,)
    info = replace(info, class_names=tuple(data.classes))
    return to_image_data(x, y, info)


@dataset("train", "test", info=lambda root: CIFAR10_INFO)
def cifar10(root, split, download, seed):
    """CIFAR-10: 50000 train / 10000 test RGB 32x32 images, 10 classes."""
    return _read("cifar10", torchvision.datasets.CIFAR10, CIFAR10_INFO, root, split, download)


@dataset("train", "test", info=lambda root: CIFAR100_INFO)
def cifar100(root, split, download, seed):
    """CIFAR-100: 50000 train / 10000 test RGB 32x32 images, 100 fine classes."""
    return _read("cifar100", torchvision.datasets.CIFAR100, CIFAR100_INFO, root, split, download)
