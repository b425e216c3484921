"""Generated datasets: Gaussian noise (the paper's random-input control) and a tiny toy set.

Both are deterministic in (seed, split) and use a different random stream for each split, so
train and test never share an image. Their mean/std are computed from their train split.
"""

import numpy as np
import torch

from runs.datasets.base import (
    MAX_CLASSES,
    DatasetInfo,
    check_data_bytes,
    dataset,
    pixel_stats,
    to_image_data,
    whole_option,
)
from runs.errors import UserError

_SPLIT_CODE = {"train": 0, "test": 1}  # mixed into the seed: train and test differ
_NOISE_COUNT = {"train": 50000, "test": 10000}  # CIFAR-10's split sizes
_TOY_PER_CLASS = {"train": 64, "test": 32}
TOY_CLASSES = ("red_rows", "green_columns", "blue_blob", "yellow_checker")
_TOY_COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.85, 0.25], [0.2, 0.3, 0.95], [0.9, 0.85, 0.2]])


# float32 values of one noise chunk: 16 GiB at most. Fewer images a chunk change the draws,
# so only images of over 1e6 values (3 x 600 x 600), whose 4096-image chunk passed 16 GiB,
# draw in smaller chunks; every shape that ran before draws the same pixels.
_CHUNK_FLOATS = 2 ** 32


def _noise_images(generator: torch.Generator, count: int, shape, chunk: int = 4096):
    """N(0.5, 0.25^2) pixels on the [0, 1] scale, rounded and clipped to uint8 (N, C, H, W),
    drawn `chunk` images at a time (fewer for huge images: see _CHUNK_FLOATS)."""
    chunk = max(1, min(chunk, _CHUNK_FLOATS // int(np.prod(shape))))
    out = torch.empty((count, *shape), dtype=torch.uint8)
    for start in range(0, count, chunk):  # chunks bound the float32 temporary
        part = torch.randn((min(chunk, count - start), *shape), generator=generator)
        out[start:start + len(part)] = part.mul_(0.25 * 255).add_(0.5 * 255).round_().clamp_(0, 255)
    return out


def _generator(seed: int, split: str, stream: int) -> torch.Generator:
    """A torch generator for one (seed, split, stream): independent 64-bit seeds, no overlap."""
    state = np.random.SeedSequence([seed, _SPLIT_CODE[split], stream]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _check_noise_options(shape, count, num_classes) -> tuple[tuple[int, ...], int | None, int]:
    """(shape, count, num_classes) as ints, each checked; the pixels' size is bounded."""
    parts = tuple(shape) if isinstance(shape, tuple | list) else (shape,)
    try:
        shape = tuple(whole_option("noise", "shape", n) for n in parts)
    except UserError:
        shape = ()
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UserError(f"noise: --data-options shape={','.join(map(str, parts))}: must be "
                        f"C,H,W, whole numbers with C 1 or 3 (e.g. shape=3,32,32)")
    count = None if count is None else whole_option("noise", "count", count)
    num_classes = whole_option("noise", "num_classes", num_classes)
    if num_classes > MAX_CLASSES:
        raise UserError(f"noise: --data-options num_classes={num_classes}: must be at most "
                        f"{MAX_CLASSES}")
    for part, default in _NOISE_COUNT.items():
        check_data_bytes("noise", count or default, shape,
                         f"--data-options shape= or count= ({part} split)")
    return shape, count, num_classes


def _noise_split(seed: int, split: str, shape, count, num_classes):
    count = count or _NOISE_COUNT[split]
    x = _noise_images(_generator(seed, split, 0), count, shape)
    labels = _generator(seed, split, 1)  # own stream: num_classes does not change the pixels
    return x, torch.randint(0, int(num_classes), (count,), generator=labels)


@dataset("train", "test")
def noise(root, split, download, seed, *, shape=(3, 32, 32), count=None, num_classes=10):
    """Gaussian-noise images (mean 0.5, std 0.25, clipped), labels uniform in 0..num_classes-1.

    `count` images per split (default 50000 train / 10000 test); num_classes=1 gives all-zero
    labels. Train and test come from different seeds.
    """
    shape, count, num_classes = _check_noise_options(shape, count, num_classes)
    x, y = _noise_split(seed, split, shape, count, num_classes)
    train_x = x if split == "train" else _noise_split(seed, "train", shape, count, 1)[0]
    mean, std = pixel_stats(train_x)
    names = tuple(str(label) for label in range(num_classes))
    info = DatasetInfo("noise", int(num_classes), mean, std, shape[1:], shape[0], names)
    return to_image_data(x, y, info)


def _toy_patterns(rng: np.random.Generator, label: int, count: int, side: int) -> np.ndarray:
    """(count, side, side) patterns in [0, 1] for one class, with random phase and scale."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    period = rng.uniform(3, 6, (count, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    if label == 0:  # horizontal stripes
        return 0.5 + 0.5 * np.sin(2 * np.pi * yy / period + phase)
    if label == 1:  # vertical stripes
        return 0.5 + 0.5 * np.sin(2 * np.pi * xx / period + phase)
    if label == 2:  # one Gaussian blob somewhere in the middle half
        centre = rng.uniform(0.25 * side, 0.75 * side, (2, count, 1, 1))
        sigma = side / 6
        return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma ** 2))
    cell = rng.integers(2, 5, (count, 1, 1))  # checkerboard of 2..4-pixel cells
    return ((yy // cell + xx // cell) % 2).astype(np.float32)


def _toy_split(seed: int, split: str, per_class: int, side: int):
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    images, labels = [], []
    for label, colour in enumerate(_TOY_COLOURS):
        pattern = _toy_patterns(rng, label, per_class, side)[:, None]  # (n, 1, S, S)
        tint = colour[None, :, None, None] + rng.normal(0, 0.08, (per_class, 3, 1, 1))
        background = rng.uniform(0.05, 0.3, (per_class, 1, 1, 1))
        pixel_noise = rng.normal(0, 0.05, (per_class, 3, side, side))
        images.append(background + 0.7 * pattern * tint + pixel_noise)  # (n, 3, S, S) in ~[0, 1]
        labels.append(np.full(per_class, label))
    order = rng.permutation(per_class * len(_TOY_COLOURS))  # mix the classes
    x = np.clip(np.rint(np.concatenate(images) * 255), 0, 255).astype(np.uint8)[order]
    return x, np.concatenate(labels)[order]


@dataset("train", "test")
def toy(root, split, download, seed, *, per_class=None, side=16):
    """Four learnable classes of coloured patterns (rows, columns, blob, checker), 3 x side^2.

    `per_class` images per class (default 64 train / 32 test). Made for fast tests.
    """
    per_class = None if per_class is None else whole_option("toy", "per_class", per_class)
    side = whole_option("toy", "side", side, minimum=4)
    for part, default in _TOY_PER_CLASS.items():  # float64 patterns while drawing: x 8
        check_data_bytes("toy", len(TOY_CLASSES) * (per_class or default), (3, side, side),
                         f"--data-options side= or per_class= ({part} split)", factor=8)
    x, y = _toy_split(seed, split, per_class or _TOY_PER_CLASS[split], side)
    train_per_class = per_class or _TOY_PER_CLASS["train"]
    train_x = x if split == "train" else _toy_split(seed, "train", train_per_class, side)[0]
    mean, std = pixel_stats(train_x)
    info = DatasetInfo("toy", len(TOY_CLASSES), mean, std, (side, side), 3, TOY_CLASSES)
    return to_image_data(x, y, info)
