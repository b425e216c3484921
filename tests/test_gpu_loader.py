import pytest
import torch
import torch.nn.functional as F

from runs.gpu_loader import Augment, GPULoader, plan_epoch, random_crop


def make_loader(x, y, **kw):
    return GPULoader(x, y, mean=[0.0] * 3, std=[1.0] * 3, batch_size=5, **kw)


def test_epoch_covers_every_sample_once(tiny_images):
    x, y = tiny_images
    loader = make_loader(x, torch.arange(16), data_seed=3)
    seen = torch.cat([b[1] for b in loader.epoch(0)])
    assert sorted(seen.tolist()) == list(range(16))
    assert len(loader) == 4 and len(make_loader(x, y, drop_last=True)) == 3


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
