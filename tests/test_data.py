"""Dataset loaders on tiny files written in each dataset's real on-disk format, plus options.

Each file writer mirrors the official release layout (CIFAR pickles, STL-10 column-major
binaries, TinyImageNet folders of JPEGs, IDX files), so these tests exercise the real parsers.
"""

import gzip
import os
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import runs.datasets.stl10 as stl10_module
import runs.datasets.tinyimagenet as tiny_module
from runs.data import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    cifar10_subset_path,
    dataset_info,
    load_dataset,
    pixel_stats,
    resize,
)
from runs.datasets.mnist import debian_fashion_mnist
from runs.errors import UserError
from tests.helpers import patch_md5s, pickle_file, write_cifar10
from tests.test_data_cifar5m import write_cifar5m_parts


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- CIFAR (python pickles)

def _write_cifar100(root, monkeypatch):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = _rng(1)
    out = {}
    for name, count in (("train", 6), ("test", 3)):
        fine = rng.integers(0, 100, count).tolist()
        coarse = [label // 5 for label in fine]  # different from fine: catches the wrong key
        x = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        pickle_file(folder / name, {"filenames": [], "batch_label": name, "fine_labels": fine,
                                "coarse_labels": coarse, "data": x.reshape(count, 3072)})
        out[name] = (x, fine)
    pickle_file(folder / "meta", {"fine_label_names": list(CIFAR100_CLASSES),
                              "coarse_label_names": [f"super{i}" for i in range(20)]})
    patch_md5s(monkeypatch, torchvision.datasets.CIFAR100, folder, ["train"], ["test"], "meta")
    return out


def test_cifar10_reads_official_pickles(tmp_path, monkeypatch):
    _, images, labels = write_cifar10(tmp_path, monkeypatch)
    train = load_dataset("cifar10", root=tmp_path)
    expected = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)])
    assert train.x.shape == (15, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.x.is_contiguous()
    assert np.array_equal(train.x.numpy(), expected)  # channel and row order preserved
    assert train.y.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    test = load_dataset("cifar10", root=str(tmp_path), split="test")
    assert np.array_equal(test.x.numpy(), images["test_batch"])
    assert test.info.class_names == CIFAR10_CLASSES and test.info.num_classes == 10


def test_cifar100_has_its_own_metadata(tmp_path, monkeypatch):
    """Its own classes always; its own statistics under stats="dataset" (under the default
    "paper" it has CIFAR-10's, as the paper's code: tests/test_data_stats.py)."""
    written = _write_cifar100(tmp_path, monkeypatch)
    data = load_dataset("cifar100", root=tmp_path, split="test", stats="dataset")
    assert np.array_equal(data.x.numpy(), written["test"][0])
    assert data.y.tolist() == written["test"][1]  # fine labels, not coarse
    info = data.info
    assert info.num_classes == 100 == len(info.class_names) == len(set(info.class_names))
    assert info.class_names[:3] == ("apple", "aquarium_fish", "baby")
    cifar10 = dataset_info("cifar10", stats="dataset")
    assert info.mean != cifar10.mean and info.std != cifar10.std
    assert dataset_info("cifar100", stats="dataset") == info


def test_cifar_missing_root_names_the_path_and_download(tmp_path):
    with pytest.raises(UserError, match="download=True") as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    with pytest.raises(UserError, match="root"):
        load_dataset("cifar100")


def test_cifar_missing_file_is_named(tmp_path, monkeypatch):
    folder, _, _ = write_cifar10(tmp_path, monkeypatch)
    (folder / "test_batch").unlink()
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_md5_mismatch_names_the_file(tmp_path, monkeypatch):
    folder, _, _ = write_cifar10(tmp_path, monkeypatch)
    with open(folder / "data_batch_2", "ab") as handle:
        handle.write(b"junk")
    with pytest.raises(UserError, match="md5") as err:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert str(folder / "data_batch_2") in str(err.value)


def test_cifar_bad_pickle_names_the_file(tmp_path, monkeypatch):
    folder, _, _ = write_cifar10(tmp_path, monkeypatch)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    patch_md5s(monkeypatch, torchvision.datasets.CIFAR10, folder,
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta")
    with pytest.raises(UserError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    """download=True goes through torchvision's downloader; its failures become one line."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known\n(second line)")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(stl10_module, "download_and_extract_archive", offline)
    for name in ("cifar10", "stl10"):
        with pytest.raises(UserError, match=f"{name}: download to .* failed") as err:
            load_dataset(name, root=tmp_path, download=True)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not supported"):
        load_dataset("tinyimagenet", root=tmp_path, download=True)


# ---------------------------------------------------------------- STL-10 (binaries)

def _stl_bytes(images):
    """torchvision's layout: each channel column-major (Matlab order), i.e. (N, C, W, H)."""
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()


def _write_stl10(root, train=3, test=2, unlabeled=4):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = _rng(2)
    out = {}
    for split, count in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        x = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(x))
        y = rng.integers(0, 10, count)
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
        out[split] = (x, y)
    return out


def test_stl10_decodes_rows_and_columns_the_right_way(tmp_path):
    written = _write_stl10(tmp_path)
    pattern = np.zeros((1, 3, 96, 96), dtype=np.uint8)
    pattern[0, 0] = np.arange(96, dtype=np.uint8)[:, None]  # red grows downwards (rows)
    pattern[0, 2, :, :10] = 255  # a blue band on the left
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(
        _stl_bytes(np.concatenate([pattern, written["test"][0][:1]])))
    data = load_dataset("stl10", root=tmp_path, split="test")
    assert data.x[0, 0, :, 7].tolist() == list(range(96))  # varies down a column
    assert data.x[0, 0, 40, :].unique().tolist() == [40]  # constant along a row
    assert data.x[0, 2, :, :10].min() == 255 and data.x[0, 2, :, 10:].max() == 0
    assert data.y.tolist() == written["test"][1].tolist()
    train = load_dataset("stl10", root=tmp_path)
    assert np.array_equal(train.x.numpy(), written["train"][0])
    assert train.info.image_size == (96, 96) and train.info.num_classes == 10


def test_stl10_unlabeled_split_has_label_minus_one(tmp_path):
    written = _write_stl10(tmp_path)
    data = load_dataset("stl10", root=tmp_path, split="unlabeled")
    assert np.array_equal(data.x.numpy(), written["unlabeled"][0])
    assert data.y.tolist() == [-1] * 4
    assert len(load_dataset("stl10", root=tmp_path, split="unlabeled", subset=2)) == 2


def test_stl10_cache_is_reused_and_refreshed(tmp_path, monkeypatch):
    written = _write_stl10(tmp_path)
    first = load_dataset("stl10", root=tmp_path)
    assert (tmp_path / "stl10_cache" / "train_x.npy").is_file()

    def fail(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(stl10_module, "decode_images", fail)
    second = load_dataset("stl10", root=tmp_path)  # from the cache: no decoding
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    source = tmp_path / "stl10_binary" / "train_X.bin"
    source.write_bytes(_stl_bytes(written["train"][0][::-1]))  # same size, new content
    os.utime(source, ns=(0, source.stat().st_mtime_ns + 10**9))  # and surely a new mtime
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset("stl10", root=tmp_path)


def test_stl10_wrong_size_binary_names_the_file(tmp_path):
    _write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="train_X.bin"):
        load_dataset("stl10", root=tmp_path)


def test_unknown_split_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="'val'; valid: test, train, unlabeled"):
        load_dataset("stl10", root=tmp_path, split="val")
    with pytest.raises(UserError, match="valid: test, train"):
        load_dataset("digits", split="validation")


# ---------------------------------------------------------------- TinyImageNet (folders)

def _colour(label):
    return (label, 255 - label, (7 * label) % 256)  # (3,) RGB identifying a class


def _write_tinyimagenet(root):
    """200 classes in shuffled wnids.txt order, one train JPEG each, 6 val JPEGs."""
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{number:08d}" for number in _rng(3).permutation(200) + 1000]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text(
        "".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)) + "n0\tunused\n")
    for label, wnid in enumerate(wnids):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        image = Image.new("RGB", (64, 64), _colour(label))
        image.save(folder / "train" / wnid / "images" / f"{wnid}_0.JPEG", quality=95)
    val_labels = [7, 0, 199, 7, 42, 3]
    lines = []
    for i, label in enumerate(val_labels):
        mode = "L" if i == 5 else "RGB"  # TinyImageNet has a few greyscale JPEGs
        colour = 90 if mode == "L" else _colour(label)
        Image.new(mode, (64, 64), colour).save(folder / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder, val_labels


def test_tinyimagenet_labels_follow_wnids_and_val_annotations(tmp_path):
    folder, val_labels = _write_tinyimagenet(tmp_path)
    train = load_dataset("tinyimagenet", root=tmp_path)
    assert train.x.shape == (200, 3, 64, 64) and train.y.tolist() == list(range(200))
    means = train.x.float().mean(dim=(2, 3))  # (200, 3) each image's colour
    expected = torch.tensor([_colour(label) for label in range(200)], dtype=torch.float32)
    assert (means - expected).abs().max() < 4  # JPEG keeps a flat colour within a few levels
    test = load_dataset("tinyimagenet", root=tmp_path, split="test")
    assert test.y.tolist() == val_labels
    assert (test.x[0].float().mean(dim=(1, 2)) - expected[7]).abs().max() < 4
    assert test.x[5].float().std(dim=0).max() < 1  # grey JPEG -> three equal channels
    info = test.info
    assert info.num_classes == 200 and info.class_names[:2] == ("thing 0", "thing 1")
    assert dataset_info("tinyimagenet", root=folder) == info  # root may be the folder itself
    assert len(dataset_info("tinyimagenet").class_names) == 200


def test_tinyimagenet_is_decoded_once(tmp_path, monkeypatch):
    _write_tinyimagenet(tmp_path)
    first = load_dataset("tinyimagenet", root=tmp_path, split="test")
    monkeypatch.setattr(tiny_module, "decode_images", lambda paths: 1 / 0)
    assert torch.equal(load_dataset("tinyimagenet", root=tmp_path, split="test").x, first.x)


def test_tinyimagenet_corrupt_jpeg_names_the_file(tmp_path):
    folder, _ = _write_tinyimagenet(tmp_path)
    (folder / "val" / "images" / "val_2.JPEG").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(UserError, match="val_2.JPEG"):
        load_dataset("tinyimagenet", root=tmp_path, split="test")
    with pytest.raises(UserError, match="tiny-imagenet-200"):
        load_dataset("tinyimagenet", root=tmp_path / "elsewhere")


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)

def _idx(array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder, split, x, y, gz):
    stem = {"train": "train", "test": "t10k"}[split]
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", x), ("labels-idx1", y)):
        data = _idx(array)
        name = f"{stem}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@pytest.mark.parametrize(("name", "sub"), [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_family_reads_plain_and_gz_idx(tmp_path, name, sub):
    rng = _rng(4)
    x_train, y_train = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    x_test, y_test = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
    _write_idx(tmp_path / sub / "raw", "train", x_train, y_train, gz=False)
    _write_idx(tmp_path / sub / "raw", "test", x_test, y_test, gz=True)
    train = load_dataset(name, root=tmp_path)
    assert train.x.shape == (5, 1, 28, 28) and np.array_equal(train.x[:, 0].numpy(), x_train)
    assert train.y.tolist() == y_train.tolist()
    test = load_dataset(name, root=tmp_path, split="test")
    assert np.array_equal(test.x[:, 0].numpy(), x_test) and test.y.tolist() == y_test.tolist()
    assert test.info.channels == 1 and test.info.num_classes == 10


def test_idx_files_directly_under_root_and_corrupt_ones(tmp_path):
    rng = _rng(5)
    _write_idx(tmp_path, "test", rng.integers(0, 256, (2, 28, 28)), np.array([3, 4]), gz=True)
    assert load_dataset("mnist", root=tmp_path, split="test").y.tolist() == [3, 4]
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))  # truncated
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", root=tmp_path, split="test")
    path.write_bytes(b"garbage, not gzip")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", root=tmp_path, split="test")
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path, split="train")


@pytest.mark.skipif(debian_fashion_mnist() is None, reason="dataset-fashion-mnist not installed")
def test_fashionmnist_from_debian_package():
    test = load_dataset("fashionmnist", split="test")
    assert test.x.shape == (10000, 1, 28, 28)
    assert test.y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    mean, std = pixel_stats(load_dataset("fashionmnist").x)
    assert abs(mean[0] - test.info.mean[0]) < 1e-4 and abs(std[0] - test.info.std[0]) < 1e-4


# ---------------------------------------------------------------- digits, noise, toy

def test_digits_split_is_stratified_and_seeded():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 599
    assert train.x.shape[1:] == (1, 8, 8) and int(train.x.max()) == 255
    counts = torch.bincount(test.y, minlength=10).float() / torch.bincount(train.y).float()
    assert ((counts - 0.5).abs() < 0.05).all()  # every class split about 1:2
    assert torch.equal(load_dataset("digits", split="test").x, test.x)  # same seed, same split
    other = load_dataset("digits", split="test", seed=1)
    assert not torch.equal(other.x, test.x)
    assert torch.bincount(other.y).tolist() == torch.bincount(test.y).tolist()  # stratified
    every = torch.cat([train.x, test.x]).flatten(1)  # the same 1797 images, however split
    again = torch.cat([load_dataset("digits", seed=1).x, other.x]).flatten(1)
    assert torch.equal(torch.unique(every, dim=0), torch.unique(again, dim=0))
    assert train.info.mean == pixel_stats(train.x)[0]  # train statistics


def test_noise_shapes_determinism_and_splits():
    data = load_dataset("noise", shape=(1, 8, 8), count=3000, seed=3)
    assert data.x.shape == (3000, 1, 8, 8) and data.info.image_size == (8, 8)
    assert abs(data.x.float().mean() / 255 - 0.5) < 0.01
    assert 0.22 < data.x.float().std() / 255 < 0.26  # 0.25, shrunk a little by clipping
    assert torch.equal(load_dataset("noise", shape=(1, 8, 8), count=3000, seed=3).x, data.x)
    test = load_dataset("noise", split="test", shape=(1, 8, 8), count=3000, seed=3)
    assert not torch.equal(test.x, data.x) and test.info == data.info  # train statistics
    other = load_dataset("noise", shape=(1, 8, 8), count=3000, seed=4)
    assert not torch.equal(other.x, data.x)
    assert set(data.y.tolist()) == set(range(10))
    zeros = load_dataset("noise", shape=(1, 8, 8), count=3000, seed=3, num_classes=1)
    assert zeros.y.eq(0).all() and torch.equal(zeros.x, data.x)
    with pytest.raises(UserError, match="shape"):
        load_dataset("noise", shape=(8, 8))


def test_toy_is_learnable_by_nearest_class_mean():
    train, test = load_dataset("toy"), load_dataset("toy", split="test")
    assert train.x.shape == (256, 3, 16, 16) and len(test) == 128
    assert torch.bincount(train.y).tolist() == [64] * 4
    centres = torch.stack([train.x[train.y == c].float().mean(0) for c in range(4)])
    distance = torch.cdist(test.x.float().flatten(1), centres.flatten(1))  # (128, 4)
    assert (distance.argmin(1) == test.y).float().mean() > 0.9
    assert not torch.equal(load_dataset("toy", seed=1).x, train.x)


# ---------------------------------------------------------------- npz and the real subset

def _write_npz(path, layout, rng):
    x_train = rng.integers(0, 256, (12, 3, 5, 6), dtype=np.uint8)
    x_test = rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    y_train, y_test = np.arange(12) % 3, np.array([0, 1, 2, 4])
    stored = [x.transpose(0, 2, 3, 1) if layout == "nhwc" else x for x in (x_train, x_test)]
    np.savez(path, x_train=stored[0], y_train=y_train, x_test=stored[1], y_test=y_test)
    return x_train, x_test  # (N, C, H, W) whatever the stored layout


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_npz_layouts(tmp_path, layout):
    x_train, x_test = _write_npz(tmp_path / "a.npz", layout, _rng(6))
    data = load_dataset("npz", root=tmp_path / "a.npz", split="test")
    assert np.array_equal(data.x.numpy(), x_test) and data.y.tolist() == [0, 1, 2, 4]
    assert data.info.image_size == (5, 6) and data.info.channels == 3
    assert data.info.num_classes == 5  # max label (4, in test) + 1
    assert np.allclose(data.info.mean, x_train.mean(axis=(0, 2, 3)) / 255)  # train statistics
    assert np.allclose(data.info.std, x_train.std(axis=(0, 2, 3)) / 255)


def test_npz_grey_class_names_and_errors(tmp_path):
    path = tmp_path / "grey.npz"
    x = _rng(7).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.array([0, 1] * 3), x_test=x[:2], y_test=np.zeros(2))
    with pytest.raises(UserError, match="labels must be integers"):
        load_dataset("npz", root=path)  # float y_test
    np.savez(path, x_train=x, y_train=np.array([0, 1] * 3), x_test=x[:2], y_test=[1, 0])
    data = load_dataset("npz", root=path, class_names=("cat", "dog", "emu"))
    assert data.x.shape == (6, 1, 4, 4) and data.info.class_names == ("cat", "dog", "emu")
    assert data.info.num_classes == 3
    with pytest.raises(UserError, match="class_names"):
        load_dataset("npz", root=path, class_names=("cat",))
    np.savez(tmp_path / "partial.npz", x_train=x)
    with pytest.raises(UserError, match="partial.npz lacks y_train, x_test, y_test"):
        load_dataset("npz", root=tmp_path / "partial.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(UserError, match="bad.npz"):
        load_dataset("npz", root=tmp_path / "bad.npz")
    with pytest.raises(UserError, match="no file at"):
        load_dataset("npz", root=tmp_path / "absent.npz")


@pytest.mark.skipif(cifar10_subset_path() is None, reason="shared CIFAR-10 subset absent")
def test_real_cifar10_subset():
    train = load_dataset("npz", root=cifar10_subset_path(), class_names=CIFAR10_CLASSES)
    test = load_dataset("npz", root=cifar10_subset_path(), split="test")
    assert train.x.shape == (5085, 3, 32, 32) and test.x.shape == (1017, 3, 32, 32)
    assert train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert train.info.class_names[6] == "frog" and test.info.num_classes == 10
    cifar10 = dataset_info("cifar10")  # the subset's statistics are close to the full set's
    assert np.allclose(train.info.mean, cifar10.mean, atol=0.005)
    assert np.allclose(train.info.std, cifar10.std, atol=0.005)


# ---------------------------------------------------------------- generic options

def test_channels_option():
    grey = load_dataset("digits", channels=3)
    assert grey.x.shape[1] == 3 and torch.equal(grey.x[:, 0], grey.x[:, 2])
    assert grey.info.channels == 3 and grey.info.mean == load_dataset("digits").info.mean * 3
    toy = load_dataset("toy")
    luma = load_dataset("toy", channels=1)
    rgb = np.asarray(Image.fromarray(toy.x[0].permute(1, 2, 0).numpy()).convert("L"))
    assert np.abs(luma.x[0, 0].numpy().astype(int) - rgb).max() <= 1  # PIL's integer BT.601
    expected = sum(w * m for w, m in zip((0.299, 0.587, 0.114), toy.info.mean))
    assert luma.info.channels == 1 and luma.info.mean == pytest.approx((expected,))
    assert abs(pixel_stats(luma.x)[0][0] - luma.info.mean[0]) < 0.005
    with pytest.raises(UserError, match="channels"):
        load_dataset("toy", channels=2)


def test_size_option():
    data = load_dataset("toy", size=(8, 12))
    assert data.x.shape == (256, 3, 8, 12) and data.info.image_size == (8, 12)
    original = load_dataset("toy")
    assert abs(data.x.float().mean() - original.x.float().mean()) < 1  # averages preserved
    assert load_dataset("digits", size=32).x.shape[2:] == (32, 32)
    constant = load_dataset("noise", shape=(3, 6, 6), count=2)
    constant.x[:] = 77
    assert resize(constant, (3, 3)).x.unique().tolist() == [77]  # no ringing, exact rounding
    with pytest.raises(UserError, match="size"):
        load_dataset("toy", size=(8, 0))


def test_subset_option():
    full = load_dataset("toy")
    data = load_dataset("toy", subset=5)
    assert torch.bincount(data.y).tolist() == [5] * 4
    rows = {tuple(image.flatten().tolist()) for image in full.x}
    assert all(tuple(image.flatten().tolist()) in rows for image in data.x)
    assert torch.equal(load_dataset("toy", subset=5).x, data.x)
    assert not torch.equal(load_dataset("toy", subset=5, seed=1).x, data.x)
    with pytest.raises(UserError, match=r"subset=4: toy class \d \(\w+\) has only 3"):
        load_dataset("toy", per_class=3, subset=4)


def test_options_compose_and_metadata_follows():
    data = load_dataset("digits", channels=3, size=16, subset=7, split="test")
    assert data.x.shape == (70, 3, 16, 16)
    assert data.info == dataset_info("digits", channels=3, size=16)
    assert dataset_info("stl10", size=64, channels=1).image_size == (64, 64)


# ---------------------------------------------------------------- registry and bad input

def test_unknown_dataset_and_option_list_the_valid_ones():
    with pytest.raises(UserError, match="unknown dataset 'cifar11'; valid: cifar10, cifar100"):
        load_dataset("cifar11")
    with pytest.raises(UserError, match="unknown option 'count'; valid: per_class, side"):
        load_dataset("toy", count=3)


def _minimal_root(name, tmp_path, monkeypatch):
    """A root with a few images for each registered dataset (None where none is needed)."""
    if name == "cifar10":
        write_cifar10(tmp_path, monkeypatch)
    elif name == "cifar100":
        _write_cifar100(tmp_path, monkeypatch)
    elif name == "stl10":
        _write_stl10(tmp_path)
    elif name == "tinyimagenet":
        _write_tinyimagenet(tmp_path)
    elif name in ("mnist", "fashionmnist"):
        _write_idx(tmp_path, "train", _rng().integers(0, 256, (4, 28, 28)), np.arange(4), True)
    elif name == "npz":
        _write_npz(tmp_path / "a.npz", "nhwc", _rng())
        return tmp_path / "a.npz"
    elif name == "cifar5m":
        write_cifar5m_parts(tmp_path, per_part=20)
    else:
        return None
    return tmp_path


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_loads_consistently(name, tmp_path, monkeypatch):
    options = {"noise": {"count": 40}}.get(name, {})
    root = _minimal_root(name, tmp_path, monkeypatch)
    data = load_dataset(name, root=root, **options)
    info = data.info
    assert data.x.dtype == torch.uint8 and data.x.is_contiguous() and data.x.device.type == "cpu"
    assert data.y.dtype == torch.int64 and data.y.shape == (len(data),) and len(data) > 0
    assert data.x.shape[1:] == (info.channels, *info.image_size)
    assert len(info.mean) == len(info.std) == info.channels
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 0.5 for s in info.std)
    assert len(info.class_names) == info.num_classes and int(data.y.max()) < info.num_classes
    assert info.name == name
    meta = dataset_info(name, root=root, **options)
    assert (meta.num_classes, meta.image_size, meta.channels) == (
        info.num_classes, info.image_size, info.channels)


def test_cifar_batch_reader_loads_arrays_and_runs_no_code(tmp_path, monkeypatch):
    """The CIFAR diagnostic reader takes real batches and refuses a pickle that calls code."""
    import pickle

    from runs.datasets.cifar import _ArraysOnly
    from tests.helpers import write_cifar10
    folder, images, labels = write_cifar10(tmp_path, monkeypatch)
    with open(folder / "data_batch_1", "rb") as handle:
        entry = _ArraysOnly(handle, encoding="latin1").load()
    assert entry["labels"] == labels["data_batch_1"]
    assert np.array_equal(entry["data"], images["data_batch_1"].reshape(-1, 3072))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w')",))

    crafted = tmp_path / "crafted"
    crafted.write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with open(crafted, "rb") as handle, pytest.raises(pickle.UnpicklingError, match="not data"):
        _ArraysOnly(handle, encoding="latin1").load()
    assert not marker.exists()
