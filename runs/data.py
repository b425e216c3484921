"""Datasets as whole uint8 tensors: one entry, `load_dataset(name, ...)`, over a registry.

    data = load_dataset("cifar10", root="~/data", split="train")
    data.x  # (50000, 3, 32, 32) uint8, CPU, contiguous: moved to the device once, whole
    data.y  # (50000,) int64
    data.info  # DatasetInfo: num_classes, per-channel mean/std on [0, 1], size, names

Registered names (each a loader in `runs/datasets/`): cifar10, cifar100, cifar5m, stl10,
tinyimagenet, mnist, fashionmnist, digits (embedded, no root: the default small set), noise,
npz, toy. After loading, the generic options apply in this order: `stats` (the input
statistics: "paper", the default, = what the paper's code normalised with, CIFAR-10's for
cifar10/cifar100/cifar5m and ImageNet's for tinyimagenet; "dataset" = the dataset's own),
`channels` (1 <-> 3), `size` (resize), `subset` (N images per class). `info` always describes
the data as returned; `info.stats` records where its mean/std come from.
Splits for the commands: `load_splits` (train and test), `holdout` (a stratified validation
part of train), `parse_data_options` (--data-options key=value strings -> keyword options).
Every split is checked as it loads (`check_loaded`: images in it, labels below num_classes,
test images labelled, train images that vary), so bad data stops a command with one line
naming the file before any run folder or result exists.
"""

import inspect
import operator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runs.datasets import (  # noqa: F401 - each module registers its loaders
    arrays,
    cifar,
    cifar5m,
    mnist,
    stl10,
    synthetic,
    tinyimagenet,
)
from runs.datasets.base import (
    DATASETS,
    PAPER_STATS,
    STATS,
    DatasetInfo,
    ImageData,
    check_stats,
    per_class_indices,
    pixel_stats,
    with_stats,
)
from runs.datasets.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from runs.errors import UserError, unknown

__all__ = ["CIFAR10_CLASSES", "CIFAR100_CLASSES", "CIFAR10_SUBSET", "DATASETS", "DatasetInfo",
           "ImageData", "PAPER_STATS", "STATS", "as_image_data", "as_splits",
           "cifar10_subset_path", "convert_channels",
           "dataset_info", "holdout", "load_dataset", "load_splits", "parse_data_options",
           "pixel_stats", "resize", "take_subset"]

# Real CIFAR-10 images for tests and CPU-sized checks (5085 train / 1017 test), kept in the
# shared folder beside the repository, never inside it. Load with `cifar10_subset_path()`.
CIFAR10_SUBSET = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_subset.npz"
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for RGB -> grey, as PIL's convert("L")
_CHUNK = 4096  # images per float32 temporary when converting: bounds memory on 100k-image sets
_GENERIC = ("root", "split", "download", "size", "channels", "subset", "seed", "stats")


def cifar10_subset_path() -> Path | None:
    """The path of the shared real CIFAR-10 subset, or None where it is absent (tests skip)."""
    return CIFAR10_SUBSET if CIFAR10_SUBSET.is_file() else None


def load_dataset(name: str, root=None, split: str = "train", download: bool = False,
                 size=None, channels: int | None = None, subset: int | None = None,
                 seed: int = 0, stats: str = "paper", **options) -> ImageData:
    """Load one split of a registered dataset whole, then apply stats, channels, size, subset.

    root: where the files are (see each loader; None for digits, noise, toy and Debian's
    Fashion-MNIST). download: fetch missing files with torchvision where it can.
    size: int or (H, W), antialiased bilinear resize. channels: 1 or 3. subset: N images per
    class, drawn with `seed`. seed also drives digits' split and the generated sets.
    stats: "paper" (the paper's code's input mean/std, see PAPER_STATS) or "dataset" (the
    dataset's own train statistics); the pixels are the same, only `info.mean/std` differ.
    options: the dataset's own keyword options (e.g. npz's class_names, noise's count).
    """
    loader = _loader(name, options)
    if split not in loader.splits:
        raise UserError(f"{name}: {unknown('split', split, loader.splits)}")
    check_stats(stats)
    _check_channels(channels)
    image_size = _check_size(size)
    if loader.takes_subset:
        options = {**options, "subset": subset}
    data = loader(_as_path(root), split, download, seed, **options)
    check_loaded(data, _where(name, root, split), split)
    data = ImageData(x=data.x, y=data.y, info=with_stats(data.info, stats))
    data = convert_channels(data, channels)
    data = resize(data, image_size)
    return take_subset(data, subset, seed, split)


def _where(name: str, root, split: str) -> str:
    """How errors name a loaded split: `npz: data.npz (test split)`, `cifar10: the test
    split at ~/data`."""
    if name == "npz":
        return f"npz: {root} ({split} split)"
    return f"{name}: the {split} split" + (f" at {root}" if root else "")


def check_loaded(data: ImageData, where: str, split: str) -> None:
    """What every command relies on, checked for every loader as it returns (the npz loader
    names the array first): images in the split, labels below num_classes, every test
    image labelled, train images that vary (their std normalises the inputs)."""
    if len(data) == 0:
        raise UserError(f"{where} holds 0 images; each split needs at least one")
    top = int(data.y.max())
    if top >= data.info.num_classes:
        raise UserError(f"{where} holds label {top} but the dataset has "
                        f"{data.info.num_classes} classes (labels 0..{data.info.num_classes - 1})")
    if split == "test":
        check_labelled(data, where)
    for channel, spread in enumerate(data.info.std):
        if not spread > 0:
            raise UserError(f"{where}: the train images are constant in channel {channel} "
                            f"(std {spread}): nothing to learn from")


def check_labelled(data: ImageData, where: str) -> None:
    """Every image has its class (no -1 = unlabeled): what accuracy and training need."""
    unlabeled = (data.y < 0).nonzero()
    if len(unlabeled):
        first = int(unlabeled[0])
        raise UserError(f"{where} holds label {int(data.y[first])} (image {first}); labels "
                        f"must lie in [0, {data.info.num_classes}) here (-1 = unlabeled: "
                        f"only distillation trains without labels)")


def dataset_info(name: str, root=None, download: bool = False, size=None,
                 channels: int | None = None, seed: int = 0, split: str | None = None,
                 subset: int | None = None, stats: str = "paper", **options) -> DatasetInfo:
    """The metadata `load_dataset` would attach, without decoding pixels where possible.

    Datasets with published statistics answer from constants (TinyImageNet reads its class
    names from root when given); the others load their train split. split and subset are
    accepted so one set of keywords serves both calls; they do not change the metadata.
    """
    loader = _loader(name, options)
    check_stats(stats)
    _check_channels(channels)
    image_size = _check_size(size)
    if loader.info is not None:
        info = loader.info(_as_path(root), **options)
    else:
        info = loader(_as_path(root), "train", download, seed, **options).info
    info = with_stats(info, stats)
    return _resized_info(_converted_info(info, channels), image_size)


def _loader(name: str, options: dict):
    """The registered loader, after checking `options` against its keyword-only parameters."""
    loader = DATASETS.get(name)
    own = [param.name for param in inspect.signature(loader).parameters.values()
           if param.kind is inspect.Parameter.KEYWORD_ONLY and param.name not in _GENERIC]
    for key in options:
        if key not in own:
            valid = ", ".join(own) if own else "none of its own"
            raise UserError(f"{name}: unknown option {key!r}; valid: {valid} "
                            f"(and the generic {', '.join(_GENERIC)})")
    return loader


def _as_path(root) -> Path | None:
    return None if root is None else Path(root).expanduser()


def _check_channels(channels) -> None:
    if channels not in (None, 1, 3):
        raise UserError(f"channels: expected 1 (grey) or 3 (RGB), got {channels!r}")


def _check_size(size) -> tuple[int, int] | None:
    """None, or (H, W) from an int or a pair of positive ints."""
    if size is None:
        return None
    try:
        pair = tuple(size) if hasattr(size, "__len__") else (size, size)
        pair = tuple(operator.index(n) for n in pair)  # ints (numpy's too), not floats
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise UserError(f"size: expected a positive int or (H, W), got {size!r}")
    return pair


def _converted_info(info: DatasetInfo, channels: int | None) -> DatasetInfo:
    """Metadata after a channel change: grey stats repeated, or RGB stats mixed by LUMA.

    The grey std of RGB data needs the channels' covariance, which the published constants
    lack; sum(w_c * std_c) is exact for fully correlated channels (an upper bound, within a
    few per cent for natural images, whose channels correlate at about 0.9).
    """
    if channels is None or channels == info.channels:
        return info
    if channels == 3:
        return replace(info, channels=3, mean=info.mean * 3, std=info.std * 3)
    mean = sum(w * m for w, m in zip(LUMA, info.mean))
    std = sum(w * s for w, s in zip(LUMA, info.std))
    return replace(info, channels=1, mean=(mean,), std=(std,))


def _resized_info(info: DatasetInfo, image_size: tuple[int, int] | None) -> DatasetInfo:
    return info if image_size is None else replace(info, image_size=image_size)


def convert_channels(data: ImageData, channels: int | None) -> ImageData:
    """Grey -> RGB by repeating the channel; RGB -> grey by BT.601 luminance, rounded."""
    if channels is None or channels == data.info.channels:
        return data
    if channels == 3:
        x = data.x.expand(-1, 3, -1, -1).contiguous()  # (N, 1, H, W) -> (N, 3, H, W)
    else:
        weights = torch.tensor(LUMA).view(1, 3, 1, 1)
        x = torch.empty((len(data), 1, *data.x.shape[2:]), dtype=torch.uint8)
        for start in range(0, len(data), _CHUNK):
            rgb = data.x[start:start + _CHUNK].float()  # (B, 3, H, W) in 0..255
            x[start:start + _CHUNK] = (rgb * weights).sum(1, keepdim=True).round().clamp(0, 255)
    return ImageData(x=x, y=data.y, info=_converted_info(data.info, channels))


def resize(data: ImageData, image_size: tuple[int, int] | None) -> ImageData:
    """Antialiased bilinear resize on float pixels, rounded back to uint8 (N, C, H', W')."""
    if image_size is None or image_size == tuple(data.x.shape[2:]):
        return data
    x = torch.empty((len(data), data.x.shape[1], *image_size), dtype=torch.uint8)
    for start in range(0, len(data), _CHUNK):
        part = data.x[start:start + _CHUNK].float()  # (B, C, H, W) in 0..255
        part = F.interpolate(part, size=image_size, mode="bilinear", antialias=True,
                             align_corners=False)
        x[start:start + _CHUNK] = part.round().clamp(0, 255)
    return ImageData(x=x, y=data.y, info=_resized_info(data.info, image_size))


def take_subset(data: ImageData, per_class: int | None, seed: int, split: str) -> ImageData:
    """`per_class` images of every class (drawn with `seed`), kept in their original order.

    An all-unlabeled split (labels -1, STL-10's "unlabeled") gives `per_class` images in all.
    """
    if per_class is None:
        return data
    keep = per_class_indices(data.y, data.info, per_class, seed, f"split {split!r}")
    if len(keep) == len(data):  # already the subset (cifar5m draws it as it reads)
        return data
    return ImageData(x=data.x[keep].contiguous(), y=data.y[keep], info=data.info)


# ------------------------------------------------------------------------------------- splits


def holdout(data: ImageData, size: int, seed: int) -> tuple[ImageData, ImageData]:
    """Split `size` images off train, stratified by class and seeded: (train, validation).

    Model selection (best epoch, early stopping) uses the validation part, never test.
    """
    if size <= 0:
        return data, None
    if size >= len(data.y):
        raise UserError(f"--val-size {size}: must be below the {len(data.y)} training images")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y), generator=gen)
    classes = data.y[order]
    # Round-robin over classes in shuffled order: each class gives its share to validation.
    rank = torch.zeros_like(order)
    for c in classes.unique():
        members = (classes == c).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    frac = rank.float() / torch.bincount(classes)[classes].float()
    val = order[torch.argsort(frac, stable=True)[:size]]
    keep = torch.ones(len(data.y), dtype=torch.bool)
    keep[val] = False
    return (ImageData(data.x[keep], data.y[keep], data.info),
            ImageData(data.x[val], data.y[val], data.info))


def load_splits(dataset: str, root: str, subset: int, seed: int, **options):
    """(train, test) of a dataset, train subset per class when `subset` > 0; both fully
    labelled (the commands that load both train or measure with the train labels)."""
    kwargs = dict(root=root or None, seed=seed, **options)
    train = load_dataset(dataset, split="train", subset=subset or None, **kwargs)
    check_labelled(train, _where(dataset, root or None, "train"))
    test = load_dataset(dataset, split="test", **kwargs)
    return train, test


def parse_data_options(items) -> dict:
    """'key=value' strings (a `data_options` field, --data-options) -> a dataset's keyword
    options: ints, floats, comma lists as tuples (`shape=3,32,32` -> (3, 32, 32))."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--data-options: expected key=value, got {item!r}")
        parts = [_number(v) for v in value.split(",")]
        out[key] = tuple(parts) if "," in value else parts[0]
    return out


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------------------- a caller's data


def as_splits(data, test=None, root=None, **options) -> tuple[ImageData, ImageData]:
    """(train, test) ImageData from what a notebook holds (see `as_image_data`).

    data: a registered dataset name (its train and test splits, loaded with `root` and
    `options`), or the training data; test: the test data, default the same images as data
    (a name's own test split).
    """
    if isinstance(data, str):
        train = load_dataset(data, root=root, split="train", **options)
        return train, (load_dataset(data, root=root, split="test", **options)
                       if test is None else as_image_data(test, "test", train.info))
    train = as_image_data(data, "data")
    return train, train if test is None else as_image_data(test, "test", train.info)


def as_image_data(data, what: str = "data", like: DatasetInfo = None) -> ImageData:
    """One split as ImageData from an ImageData, a pair (images, labels) or a Dataset.

    Images (N, C, H, W): uint8 pixels are normalised per channel with statistics of these
    images (or of `like`, the train split's); float images are used as they are (already
    normalised, as a torchvision transform leaves them). A `torch.utils.data.Dataset` is read
    item by item: (image, label) with images as tensors, PIL images or (H, W[, C]) arrays.
    what: the argument's name, for errors. The data's name (`info.name`) is "tensors" for a
    pair, the Dataset's class name for a Dataset.
    """
    if isinstance(data, ImageData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        (images, labels), name = data, "tensors"
    elif isinstance(data, torch.utils.data.Dataset):
        (images, labels), name = _read_items(data, what), type(data).__name__
    else:
        raise UserError(f"{what}: expected a dataset name, a pair (images, labels) of tensors "
                        f"or a torch.utils.data.Dataset; got {type(data).__name__}")
    return _wrap(images, torch.as_tensor(labels), what, like, name)


def _read_items(dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(dataset) == 0:
        raise UserError(f"{what}: the Dataset is empty")
    images, labels = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UserError(f"{what}: item {index} is not an (image, label) pair")
        images.append(_image_tensor(item[0]))
        labels.append(int(item[1]))
    return torch.stack(images), torch.tensor(labels)


def _image_tensor(image) -> torch.Tensor:
    """A tensor as it is; PIL images and numpy arrays (H, W[, C]) as uint8 (C, H, W)."""
    if torch.is_tensor(image):
        return image
    array = torch.from_numpy(np.array(image))  # a copy: PIL arrays are read-only
    return array[None] if array.dim() == 2 else array.permute(2, 0, 1).contiguous()


def _wrap(images, labels, what: str, like: DatasetInfo | None, name: str) -> ImageData:
    if images.dim() != 4:
        raise UserError(f"{what}: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UserError(f"{what}: images must be uint8 pixels or floats, got {images.dtype}")
    if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise UserError(f"{what}: labels must be {len(images)} integers (one per image), got "
                        f"{labels.dtype} {tuple(labels.shape)}")
    channels, size = images.shape[1], tuple(images.shape[2:])
    if like is not None and (like.channels, tuple(like.image_size)) != (channels, size):
        raise UserError(f"{what}: images of shape {(channels, *size)} do not match the "
                        f"training data's {(like.channels, *like.image_size)}")
    if like is not None and images.dtype == torch.uint8:
        mean, std = like.mean, like.std
    elif images.dtype == torch.uint8:
        mean, std = pixel_stats(images)
        if len(images) and min(std) == 0:
            raise UserError(f"{what}: the images are constant in channel {std.index(0)} (std "
                            f"0): nothing to learn from, and normalising would divide by 0")
    else:  # float images arrive normalised: leave them as they are
        mean, std = (0.0,) * channels, (1.0,) * channels
    num_classes = max(int(labels.max()) + 1 if len(labels) else 1,
                      like.num_classes if like is not None else 1)
    info = DatasetInfo(name=name, num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                       image_size=size, channels=channels,
                       class_names=tuple(str(c) for c in range(num_classes)))
    return ImageData(x=images.contiguous(), y=labels.long(), info=info)
