import pytest
import torch
import torch.nn.functional as F

from runs.datasets.base import DatasetInfo, ImageData
from runs.gpu_loader import Augment, GPULoader, eval_loader, plan_epoch, random_crop, rank_of


def make_loader(x, y, **kw):
    return GPULoader(x, y, mean=[0.0] * 3, std=[1.0] * 3, batch_size=5, **kw)


def test_epoch_covers_every_sample_once(tiny_images):
    x, y = tiny_images
    loader = make_loader(x, torch.arange(16), data_seed=3, min_batch=1)
    seen = torch.cat([b[1] for b in loader.epoch(0)])
    assert sorted(seen.tolist()) == list(range(16))
    assert len(loader) == 4 and len(make_loader(x, y, drop_last=True)) == 3
    assert len(make_loader(x, y)) == 3  # by default a 1-image tail (16 = 3 x 5 + 1) is dropped


def test_same_seeds_same_batches_other_seed_other_order(tiny_images):
    x, y = tiny_images
    aug = Augment(flip=True, crop_padding=2)
    a = list(make_loader(x, y, augment=aug, data_seed=1).epoch(2))
    b = list(make_loader(x, y, augment=aug, data_seed=1).epoch(2))
    c = list(make_loader(x, y, augment=aug, data_seed=2).epoch(2))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_start_batch_resumes_mid_epoch(tiny_images):
    x, y = tiny_images
    loader = make_loader(x, y, augment=Augment(True, 1), data_seed=4)
    full = list(loader.epoch(1))
    tail = list(loader.epoch(1, start_batch=2))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(full[2:], tail))


def test_random_crop_matches_pad_then_slice(tiny_images):
    x, _ = tiny_images
    offsets = torch.randint(0, 5, (16, 2), generator=torch.Generator().manual_seed(0))
    out = random_crop(x, offsets, padding=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])
    centred = random_crop(x, torch.full((16, 2), 2), padding=2)
    assert torch.equal(centred, x)


def test_flip_and_normalise(tiny_images):
    x, y = tiny_images
    loader = GPULoader(x, y, mean=[0.5] * 3, std=[0.25] * 3, batch_size=16,
                       shuffle=False, augment=Augment(flip=True))
    plan = plan_epoch(16, 0, 0, shuffle=False, augment=Augment(flip=True))
    assert 0 < plan.flips.sum() < 16
    (batch, labels), = list(loader.epoch(0))
    expect = torch.where(plan.flips[:, None, None, None], x.flip(3), x).float() / 255
    torch.testing.assert_close(batch, (expect - 0.5) / 0.25)
    assert torch.equal(labels, y)


def test_rejects_integer_images_other_than_uint8():
    with pytest.raises(ValueError, match="uint8"):
        GPULoader(torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.zeros(2), [0.0], [1.0], 2)


def test_float_images_pass_through_unscaled():
    """A caller's float images (already normalised) are taken as they are: mean 0, std 1."""
    x = torch.randn(4, 3, 4, 4)
    batch, _ = next(GPULoader(x, torch.zeros(4), [0.0] * 3, [1.0] * 3, 4, shuffle=False).epoch())
    assert torch.equal(batch, x)


@pytest.mark.gpu
def test_cuda_batches_equal_cpu_batches(tiny_images):
    x, y = tiny_images
    aug = Augment(True, 2)
    cpu = list(make_loader(x, y, augment=aug, data_seed=7).epoch(0))
    gpu = list(make_loader(x, y, augment=aug, data_seed=7, device="cuda").epoch(0))
    for p, q in zip(cpu, gpu):
        assert q[0].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(p[0], q[0].cpu())


# ------------------------------------------------------------------ partial last batches


def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 2x2 RGB images whose first pixel is their index: (n, 3, 2, 2) uint8, labels 0..n-1."""
    x = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n) % 256
    return x, torch.arange(n)


def test_the_papers_epoch_keeps_its_last_partial_batch():
    """50,000 images at batch 256: 195 full batches and one of 80, 196 steps (drop_last=True:
    195)."""
    x = torch.zeros(50_000, 1, 1, 1, dtype=torch.uint8)
    y = torch.zeros(50_000, dtype=torch.long)
    loader = GPULoader(x, y, [0.0], [1.0], 256, shuffle=False)
    assert len(loader) == 196 and len(GPULoader(x, y, [0.0], [1.0], 256, drop_last=True)) == 195
    sizes = [len(labels) for _, labels in loader.epoch(0, start_batch=194)]
    assert sizes == [256, 80]


@pytest.mark.parametrize("n", [15, 16, 17, 18, 21])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("augment", [Augment(), Augment(flip=True, crop_padding=1)])
def test_len_is_the_number_of_batches_an_epoch_yields(n, drop_last, shuffle, augment):
    x, y = images(n)
    loader = GPULoader(x, y, [0.0] * 3, [1.0] * 3, 4, shuffle=shuffle, drop_last=drop_last,
                       augment=augment, data_seed=1)
    batches = [labels for _, labels in loader.epoch(2)]
    assert len(batches) == len(loader)
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == len(seen)  # no image twice
    tail = n % 4
    kept = n - tail if drop_last or tail < 2 else n  # a 1-image tail is dropped
    assert len(seen) == kept and all(len(b) == 4 for b in batches[:n // 4])


def test_a_one_image_tail_is_dropped_for_training_and_kept_for_evaluation():
    """BatchNorm in train mode cannot take one image at a 1x1 map; evaluation sees all."""
    x, y = images(17)
    train = GPULoader(x, y, [0.0] * 3, [1.0] * 3, 8, shuffle=True)
    assert len(train) == 2 and sum(len(b) for _, b in train.epoch(0)) == 16
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4),
                                torch.nn.BatchNorm1d(4)).train()
    for batch, _ in train.epoch(0):
        model(batch)  # every batch has at least 2 images
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(x[:1].float())  # what a kept 1-image tail would do
    data = ImageData(x, y, DatasetInfo("t", 17, (0.0,) * 3, (1.0,) * 3, (2, 2), 3,
                                       tuple(map(str, range(17)))))
    full = eval_loader(data, "cpu", batch_size=8)
    assert len(full) == 3 and torch.cat([b for _, b in full.epoch()]).tolist() == list(range(17))
    assert len(GPULoader(x, y, [0.0] * 3, [1.0] * 3, 8, min_batch=1)) == 3


@pytest.mark.parametrize("n, steps", [(21, 3), (19, 2), (16, 2)])
def test_ranks_share_every_batch_the_partial_one_too(n, steps):
    """Two processes (batch 8, 4 each): each full batch split in contiguous halves, the partial
    one in near-equal halves; together they are the one-process batches, and both ranks agree
    on the epoch's length (a tail of 3 would give a rank 1 image: dropped on both)."""
    x, y = images(n)
    kw = dict(mean=[0.0] * 3, std=[1.0] * 3, batch_size=8, shuffle=True, data_seed=5,
              augment=Augment(flip=True, crop_padding=1))
    whole = GPULoader(x, y, **kw)
    ranks = [GPULoader(x, y, part=slice(r * 4, (r + 1) * 4), **kw) for r in (0, 1)]
    assert [len(r) for r in ranks] == [steps, steps] and rank_of(slice(4, 8), 8) == (1, 2)
    for (x_all, y_all), (x0, y0), (x1, y1) in zip(whole.epoch(3), *(r.epoch(3) for r in ranks)):
        assert torch.equal(torch.cat([y0, y1]), y_all) and torch.equal(torch.cat([x0, x1]), x_all)
        assert abs(len(y0) - len(y1)) <= 1 and min(len(y0), len(y1)) >= 2
    assert len(list(ranks[1].epoch(3))) == steps


def test_a_part_that_is_not_an_equal_slice_is_refused():
    with pytest.raises(ValueError, match="equal contiguous slices"):
        GPULoader(*images(8), [0.0] * 3, [1.0] * 3, 8, part=slice(0, 3))
