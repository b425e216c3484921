"""CIFAR-5M on tiny parts written in the release's format: npz files holding X uint8
(N, 32, 32, 3) and Y labels, one per part. Each image carries its (part, index) in its first
pixels, so every test can tell exactly which images were read and in which layout."""

import numpy as np
import pytest
import torch

import runs.datasets.cifar5m as cifar5m_module
from runs.data import dataset_info, load_dataset
from runs.datasets.base import IMAGENET_STATS, per_class_indices
from runs.datasets.cifar5m import CIFAR5M_INFO, read_part
from runs.errors import UserError
from tests.helpers import write_cifar10


def part_arrays(part: int, per_part: int) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) of one fake part: random pixels, image i of part p tagged (p, i % 256, i // 256)
    in pixel (0, 0); labels cycle over the classes with a part-dependent phase."""
    rng = np.random.default_rng(part)
    x = rng.integers(0, 256, (per_part, 32, 32, 3), dtype=np.uint8)
    index = np.arange(per_part)
    x[:, 0, 0] = np.stack([np.full(per_part, part), index % 256, index // 256], axis=1)
    return x, ((index * 3 + part) % 10).astype(np.int64)


def write_cifar5m_parts(root, per_part=40, parts=range(6), compressed=False,
                        name="cifar5m_part{}.npz"):
    """Parts as the release ships them (np.savez: stored, memory-mappable), in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    for part in parts:
        x, y = part_arrays(part, per_part)
        save(root / name.format(part), X=x, Y=y)
    return root


def tags(data) -> list[tuple[int, int]]:
    """(part, index) of every loaded image, read from its tag pixel (CHW layout)."""
    pixel = data.x[:, :, 0, 0].long()  # (N, 3)
    return [(p, lo + 256 * hi) for p, lo, hi in pixel.tolist()]


def test_subset_is_drawn_like_every_subset_from_the_parts_it_reads(tmp_path):
    """subset=k: the fewest parts (from part 0) with k of every class, k per class drawn with
    the seed by the same rule as any dataset's subset, gathered in CHW order."""
    write_cifar5m_parts(tmp_path, per_part=40)  # 4 images of each class per part
    data = load_dataset("cifar5m", root=tmp_path, subset=6, seed=3)
    assert data.x.shape == (60, 3, 32, 32) and data.x.dtype == torch.uint8
    assert torch.bincount(data.y, minlength=10).tolist() == [6] * 10
    parts = [part_arrays(p, 40) for p in (0, 1)]  # 4 + 4 >= 6 of each class: parts 0 and 1
    labels = torch.from_numpy(np.concatenate([y for _, y in parts]))
    keep = per_class_indices(labels, CIFAR5M_INFO, 6, 3, "parts 0-1").numpy()
    expected = np.concatenate([x for x, _ in parts])[keep].transpose(0, 3, 1, 2)
    assert np.array_equal(data.x.numpy(), expected) and data.y.tolist() == labels[keep].tolist()
    assert {part for part, _ in tags(data)} == {0, 1}
    other = load_dataset("cifar5m", root=tmp_path, subset=6, seed=4)
    assert tags(other) != tags(data)  # the seed draws


def test_only_the_needed_parts_are_read_and_a_missing_one_is_named(tmp_path):
    write_cifar5m_parts(tmp_path, per_part=40, parts=(0, 5))
    assert len(load_dataset("cifar5m", root=tmp_path, subset=4)) == 40  # part 0 suffices
    with pytest.raises(UserError) as err:
        load_dataset("cifar5m", root=tmp_path, subset=5)
    message = str(err.value)
    assert "cifar5m_part1.npz" in message and str(tmp_path) in message
    assert "cifar5m_part0.npz .. cifar5m_part5.npz" in message and "\n" not in message


def test_without_subset_train_is_parts_0_to_4_in_order(tmp_path):
    write_cifar5m_parts(tmp_path, per_part=12)
    data = load_dataset("cifar5m", root=tmp_path)
    assert tags(data) == [(p, i) for p in range(5) for i in range(12)]
    x0, y0 = part_arrays(0, 12)
    assert np.array_equal(data.x[:12].numpy(), x0.transpose(0, 3, 1, 2))
    assert data.y[:12].tolist() == y0.tolist()


def test_more_images_than_a_class_has_is_refused(tmp_path):
    write_cifar5m_parts(tmp_path, per_part=20)  # 2 a class a part: 10 in parts 0-4
    with pytest.raises(UserError, match=r"subset=11: cifar5m class 0 \(airplane\) has only "
                                        r"10 images in parts 0-4"):
        load_dataset("cifar5m", root=tmp_path, subset=11)
    with pytest.raises(UserError, match="positive number of images per class"):
        load_dataset("cifar5m", root=tmp_path, subset=0)


def test_test_split_is_held_out_part_5_or_cifar10_test(tmp_path, monkeypatch):
    write_cifar5m_parts(tmp_path / "c5m", per_part=20)
    monkeypatch.setattr(cifar5m_module, "TEST_COUNT", 7)
    test = load_dataset("cifar5m", root=tmp_path / "c5m", split="test")
    assert tags(test) == [(5, i) for i in range(7)]
    _, images, labels = write_cifar10(tmp_path / "c10", monkeypatch)
    test = load_dataset("cifar5m", root=tmp_path / "c5m", split="test",
                        cifar10_root=str(tmp_path / "c10"))
    assert np.array_equal(test.x.numpy(), images["test_batch"])
    assert test.y.tolist() == labels["test_batch"] and test.info.name == "cifar5m"


def test_compressed_parts_and_the_paper_codes_names_read_the_same(tmp_path):
    write_cifar5m_parts(tmp_path / "stored", per_part=20)
    write_cifar5m_parts(tmp_path / "zipped" / "cifar-5m", per_part=20, compressed=True,
                        name="part{}.npz")
    x, _ = read_part(tmp_path / "stored" / "cifar5m_part0.npz")
    assert isinstance(x, np.memmap)  # np.savez stores: read in place, not loaded
    a = load_dataset("cifar5m", root=tmp_path / "stored", subset=5, seed=1)
    b = load_dataset("cifar5m", root=tmp_path / "zipped", subset=5, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_bad_parts_and_roots_are_one_line(tmp_path):
    np.savez(tmp_path / "cifar5m_part0.npz", X=np.zeros((4, 3, 32, 32), np.uint8),
             Y=np.zeros(4, np.int64))
    with pytest.raises(UserError, match=r"cifar5m_part0.npz has X uint8 \(4, 3, 32, 32\)"):
        load_dataset("cifar5m", root=tmp_path, subset=1)
    np.savez(tmp_path / "cifar5m_part0.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="lacks X, Y"):
        load_dataset("cifar5m", root=tmp_path, subset=1)
    (tmp_path / "cifar5m_part0.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="corrupt file"):
        load_dataset("cifar5m", root=tmp_path, subset=1)
    with pytest.raises(UserError, match="no root given"):
        load_dataset("cifar5m")


def test_metadata_and_input_statistics():
    """CIFAR-10's classes; the paper's code's CIFAR-10 constants under "paper", CIFAR-10's
    published statistics under "dataset" (CIFAR-5M publishes none)."""
    paper, own = dataset_info("cifar5m"), dataset_info("cifar5m", stats="dataset")
    cifar10 = dataset_info("cifar10", stats="dataset")
    assert paper.class_names == cifar10.class_names and paper.num_classes == 10
    assert (paper.mean, paper.std, paper.stats) == (
        dataset_info("cifar10").mean, dataset_info("cifar10").std, "paper")
    assert (own.mean, own.std, own.stats) == (cifar10.mean, cifar10.std, "dataset")
    assert paper.mean != IMAGENET_STATS[0]
