"""A split held on the device as one uint8 tensor; order, crop, flip and normalise per batch.

No DataLoader and no worker processes: the whole split (CIFAR10 train is 150 MB as uint8)
sits on the device and every batch is an index into it. The randomness of an epoch (order,
crop offsets, flips) is drawn on the CPU from (data_seed, epoch), so identical seeds give
identical batches on CPU and GPU, and a resumed run can restart mid-epoch.

An epoch is ceil(N / batch_size) batches, the last one partial (as a DataLoader with
drop_last=False: the paper's code, 196 steps at 50,000 / 256), or N // batch_size with
drop_last=True. A trailing batch smaller than `min_batch` images per process (default 2) is
dropped: BatchNorm in train mode cannot normalise a batch of one image (it raises where a
layer's map is 1x1), so training never sees one; evaluation (`eval_loader`, min_batch=1)
keeps every image. Under data parallelism each process takes its contiguous slice of every
full batch and a near-equal contiguous share (sizes differ by at most one) of the partial one.
`len()` is always the number of batches `epoch()` yields.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from runs.datasets.base import ImageData


@dataclass(frozen=True)
class Augment:
    flip: bool = False  # random horizontal flip with probability 1/2
    crop_padding: int = 0  # random crop after zero-padding by this many pixels (4 in the paper)


@dataclass(frozen=True)
class EpochPlan:
    order: torch.Tensor  # (N,) int64 permutation of the split
    offsets: torch.Tensor  # (N, 2) int64 crop offsets (dy, dx) in [0, 2 * padding]
    flips: torch.Tensor  # (N,) bool


def epoch_generator(data_seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (data_seed, epoch), mixed so nearby seeds don't collide."""
    seed = np.random.SeedSequence([data_seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))


def plan_epoch(n: int, data_seed: int, epoch: int, shuffle: bool, augment: Augment) -> EpochPlan:
    gen = epoch_generator(data_seed, epoch)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    offsets = torch.randint(0, 2 * augment.crop_padding + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5 if augment.flip else torch.zeros(n, dtype=bool)
    return EpochPlan(order, offsets, flips)


def random_crop(x: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) by `padding` and cut an (H, W) window at each (dy, dx) offset."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def unit_scale(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 on [0, 1]; float images (a caller's own tensors) as float32."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or float) (B, C, H, W) -> float32 standardised per channel; channels_last on
    CUDA. Float images are taken as already on their scale (mean 0, std 1 leave them)."""
    out = (unit_scale(x) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    if out.is_cuda:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def rank_of(part: slice, batch_size: int) -> tuple[int, int]:
    """(rank, world size) of a process whose share of every full batch is `part`."""
    if part == slice(None):
        return 0, 1
    start, stop = part.start or 0, part.stop
    per_rank = (stop or batch_size) - start
    if per_rank < 1 or batch_size % per_rank or start % per_rank:
        raise ValueError(f"part {part} is not one of equal contiguous slices of a batch of "
                         f"{batch_size}")
    return start // per_rank, batch_size // per_rank


class GPULoader:
    """Batches of (images float32 normalised, labels int64) from a device-resident split.

    drop_last: only full batches. Otherwise the last partial batch is kept unless a process's
    share of it would hold fewer than `min_batch` images (see the module's docstring).
    part: this process's slice of every full batch (data parallel), as
    runs.engines.distributed.rank_slice gives it.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int,
                 device="cpu", shuffle: bool = True, drop_last: bool = False,
                 augment: Augment = Augment(), data_seed: int = 0, part: slice = slice(None),
                 min_batch: int = 2):
        if not (x.dtype == torch.uint8 or x.is_floating_point()) or x.ndim != 4:
            raise ValueError(f"expected uint8 or float (N, C, H, W) images, got {x.dtype} "
                             f"{tuple(x.shape)}")
        if batch_size < 1 or min_batch < 1:
            raise ValueError(f"batch_size ({batch_size}) and min_batch ({min_batch}) must be "
                             "positive")
        self.x = x.to(device)  # (N, C, H, W) uint8
        self.y = y.to(device)  # (N,) int64
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.data_seed = augment, data_seed
        self.part = part  # this process's slice of every global batch (data parallel)
        self.rank, self.world = rank_of(part, batch_size)
        self.min_batch = min_batch

    def __len__(self) -> int:
        full, tail = divmod(len(self.y), self.batch_size)
        keep_tail = not self.drop_last and tail > 0 and tail // self.world >= self.min_batch
        return full + keep_tail

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's part of a global batch (of indices, offsets or flips)."""
        if len(batch) == self.batch_size:
            return batch[self.part]
        return torch.tensor_split(batch, self.world)[self.rank]  # a partial batch

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """The batches of `epoch`, from batch index `start_batch` on (for mid-epoch resume)."""
        plan = plan_epoch(len(self.y), self.data_seed, epoch, self.shuffle, self.augment)
        device = self.x.device
        for i in range(start_batch, len(self)):
            sel = slice(i * self.batch_size, (i + 1) * self.batch_size)
            # The global batch, then this rank's share of it (all of it for one process).
            order, offsets, flips = (self.share(t[sel])
                                     for t in (plan.order, plan.offsets, plan.flips))
            idx = order.to(device, non_blocking=True)
            yield self.batch(idx, offsets.to(device), flips.to(device))

    def batch(self, idx, offsets=None, flips=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[idx]  # (B, C, H, W) uint8, gathered on the device
        if offsets is not None:
            x = random_crop(x, offsets, self.augment.crop_padding)
        if flips is not None and self.augment.flip:
            x = torch.where(flips[:, None, None, None], x.flip(3), x)
        return normalize(x, self.mean, self.std), self.y[idx]


def eval_loader(data: ImageData, device, batch_size: int = 1024) -> GPULoader:
    """A split in its order, every image once, no augmentation: for evaluation."""
    return GPULoader(data.x, data.y, data.info.mean, data.info.std, batch_size, device,
                     shuffle=False, min_batch=1)
