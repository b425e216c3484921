"""Bounds checked before anything is allocated, and the one line for what the machine refuses.

The functions behind issue 19's size, seed, label and data rows (test_bad_input.py runs them
through the CLIs): seeds in [0, 2**63 - 1], LABELs of at most 200 characters, parameter
counts estimated on the meta device, generated data sized before it is drawn, npz files
checked array by array, and `runs.errors.machine_refusal`'s lines.
"""

import argparse
import errno
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from runs.config import (
    LABEL_MAX,
    SEED_MAX,
    arg,
    check_at_most,
    check_fields,
    check_label,
    check_seed,
    from_dict,
    seed_arg,
)
from runs.data import as_image_data, load_dataset, parse_data_options
from runs.datasets.base import MAX_DATA_BYTES, check_data_bytes, whole_option
from runs.errors import UserError, machine_refusal
from runs.models import create_model
from runs.models.base import MAX_PARAMETERS, check_parameter_count, meta_parameter_count
from runs.models.head import create_head


@dataclass(frozen=True)
class Seeded:
    seed: int = arg(0, "run seed")
    data_seed: int = arg(0, "data order")
    teacher_seed: int = arg(-1, "teacher; -1 = --seed")
    width: float = arg(1.0, "not a seed")

    def __post_init__(self):
        check_fields(self, {})


# ---------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("field, value", [("seed", 2 ** 64), ("seed", SEED_MAX + 1),
                                          ("seed", -1), ("data_seed", -1),
                                          ("teacher_seed", -2), ("seed", 1.5)])
def test_a_seed_outside_64_bits_names_its_flag(field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UserError, match=f"^{flag} {value}: seeds must be whole numbers"):
        Seeded(**{field: value})
    with pytest.raises(UserError, match=f"^{flag} {value}"):
        from_dict(Seeded, {field: value})  # a saved config or a preset: the same line


def test_the_largest_seed_and_the_sentinel_pass():
    assert Seeded(seed=SEED_MAX, data_seed=np.int64(3), teacher_seed=-1).seed == SEED_MAX
    assert torch.Generator().manual_seed(SEED_MAX).initial_seed() == SEED_MAX
    assert check_seed(0) == 0
    with pytest.raises(UserError, match="--seeds 18446744073709551616"):
        check_seed(2 ** 64, "--seeds")


def test_seed_arg_is_argparse_one_line():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--seeds", nargs="+", type=seed_arg)
    assert parser.parse_args(["--seeds", "0", str(SEED_MAX)]).seeds == [0, SEED_MAX]
    with pytest.raises(SystemExit):
        parser.parse_args(["--seeds", str(2 ** 64)])


# ---------------------------------------------------------------------------- labels, k


def test_a_label_is_one_short_line():
    assert check_label("x" * LABEL_MAX, "ref") == "x" * LABEL_MAX
    text = "y" * 10 ** 6 + ":=run@last"
    with pytest.raises(UserError, match="is 1000000 characters long; at most 200") as err:
        check_label("y" * 10 ** 6, text)
    assert len(str(err.value)) < 200  # the label is not echoed whole
    with pytest.raises(UserError, match="line break"):
        check_label("two\nlines", "two\nlines:=ref")


def test_a_label_through_the_reference_parser():
    from runs.refs import split_label
    assert split_label("teacher:=run@last") == ("teacher", "run@last")
    with pytest.raises(UserError, match="at most 200"):
        split_label("z" * 201 + ":=run@last")


def test_check_at_most_names_flag_value_and_limit():
    check_at_most(20, 20, "--knn-k", "train images")
    with pytest.raises(UserError, match=r"^--knn-k 100000: must be at most 600 \(train"):
        check_at_most(100000, 600, "--knn-k", "train images")


# ---------------------------------------------------------------------------- parameters


def test_the_meta_count_is_the_real_count():
    for name in ("convnet", "resnet20", "vgg11"):
        real = create_model(name, num_classes=10, width=0.25)
        counted = meta_parameter_count(lambda n=name: create_model(n, 10, width=0.25))
        assert counted == sum(p.numel() for p in real.parameters())


def test_a_huge_width_is_refused_with_the_count():
    with pytest.raises(UserError, match=r"model convnet at --width 100000.0 \(4 classes\) "
                                        r"would have 9.22e\+14 parameters .*lower --width"):
        create_model("convnet", num_classes=4, width=1e5)
    with pytest.raises(UserError, match="more parameters than 64-bit sizes can count"):
        create_model("mlp", num_classes=4, width=1e12)


def test_a_huge_head_is_refused_naming_its_flags():
    with pytest.raises(UserError, match=r"--out-dim 100000000000.*would have 8e\+11 param"):
        create_head(in_dim=16, out_dim=10 ** 11, hidden_dim=32, bottleneck_dim=8)
    assert create_head(in_dim=16, out_dim=64, hidden_dim=32, bottleneck_dim=8).spec


def test_a_factory_that_cannot_run_on_meta_is_not_counted():
    def on_cpu_only():
        if torch.empty(0).device.type == "meta":
            raise RuntimeError("needs real memory")
        return nn.Linear(2, 2)
    assert meta_parameter_count(on_cpu_only) is None
    check_parameter_count(on_cpu_only, "net", "--width")  # not counted: not refused
    with pytest.raises(UserError, match="above the limit of 2e"):
        check_parameter_count(lambda: nn.Linear(MAX_PARAMETERS, 2), "net", "--width")


# ---------------------------------------------------------------------------- data sizes


def test_generated_data_is_sized_before_it_is_drawn():
    with pytest.raises(UserError, match=r"noise: 50000 images of shape \(1, 30000, 30000\) "
                                        r"would take 4.19e\+04 GiB, above the limit of 16"):
        load_dataset("noise", shape=(1, 30000, 30000))
    with pytest.raises(UserError, match="lower --data-options side= or per_class="):
        load_dataset("toy", side=100000)
    check_data_bytes("x", 1, (1, 1, MAX_DATA_BYTES), "n")  # at the limit: allowed
    with pytest.raises(UserError, match="lower n"):
        check_data_bytes("x", 1, (1, 1, MAX_DATA_BYTES + 1), "n")


def test_huge_noise_images_draw_in_bounded_chunks(monkeypatch):
    """A chunk holds at most _CHUNK_FLOATS floats (here lowered to one 32 x 32 image)."""
    from runs.datasets import synthetic
    assert synthetic._CHUNK_FLOATS // 4096 >= 3 * 96 * 96  # the shapes used draw as before
    shapes, real = [], torch.randn
    monkeypatch.setattr(synthetic, "_CHUNK_FLOATS", 32 * 32)
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: shapes.append(shape) or real(
        shape, **kw))
    images = synthetic._noise_images(torch.Generator().manual_seed(0), 3, (1, 32, 32))
    assert [shape[0] for shape in shapes] == [1, 1, 1] and images.shape == (3, 1, 32, 32)


@pytest.mark.parametrize("options, message", [
    (["count=abc"], "noise: --data-options count=abc: must be a whole number >= 1"),
    (["count="], "--data-options count=: must be"),
    (["count=2.5"], "count=2.5"),
    (["count=nan"], "count=nan"),
    (["shape=3,,32"], "shape=3,,32: must be C,H,W"),
    (["shape=3"], "shape=3: must be C,H,W"),
    (["shape=2,8,8"], "shape=2,8,8: must be C,H,W, whole numbers with C 1 or 3"),
    (["num_classes=x"], "num_classes=x"),
])
def test_malformed_noise_options_are_one_line(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset("noise", **parse_data_options(options))


def test_whole_numbers_typed_as_floats_are_accepted():
    assert whole_option("noise", "count", 1e3) == 1000
    assert len(load_dataset("noise", **parse_data_options(["count=1e1", "shape=1,4,4"]))) == 10
    with pytest.raises(UserError, match="test_fraction=x: must be a number in"):
        load_dataset("digits", test_fraction="x")
    with pytest.raises(UserError, match="side=x"):
        load_dataset("toy", side="x")


# ---------------------------------------------------------------------------- npz files


def npz(tmp_path, **change):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.integers(0, 256, (12, 4, 4), dtype=np.uint8),
              "y_train": np.arange(12) % 3,
              "x_test": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
              "y_test": np.arange(6) % 3}
    path = tmp_path / "data.npz"
    np.savez(path, **{**arrays, **change})
    return path


@pytest.mark.parametrize("change, split, message", [
    (dict(x_test=np.zeros((0, 4, 4), np.uint8), y_test=np.zeros(0, int)), "test",
     ":x_test holds 0 images"),
    (dict(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, int)), "train",
     ":x_train holds 0 images"),
    (dict(y_test=np.array([0, 1, 2, -1, 1, 2])), "train", ":y_test holds label -1 (image 3)"),
    (dict(y_train=np.r_[np.arange(11) % 3, -2]), "train", ":y_train holds label -2 (image 11)"),
    (dict(y_test=np.r_[0, 1, 2, 0, 1, 10 ** 7]), "test",
     ":y_test holds label 10000000; labels are class indices"),
    (dict(x_train=np.full((12, 4, 4), 9, np.uint8)), "test",
     ":x_train is constant (every pixel of channel 0 is 9)"),
])
def test_npz_problems_name_the_file_and_array(tmp_path, change, split, message):
    path = npz(tmp_path, **change)
    with pytest.raises(UserError, match=f"^npz: {path}" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        load_dataset("npz", root=path, split=split)


def test_unlabeled_train_images_load_but_not_for_training(tmp_path):
    from runs.data import load_splits
    path = npz(tmp_path, y_train=np.r_[np.arange(11) % 3, -1])
    assert int(load_dataset("npz", root=path).y.min()) == -1  # distillation needs no labels
    with pytest.raises(UserError, match=r"\(train split\) holds label -1 \(image 11\)"):
        load_splits("npz", str(path), 0, seed=0)


def test_npz_class_names_given_as_one_value(tmp_path):
    path = npz(tmp_path)
    assert load_dataset("npz", root=path, class_names=("a", "b", "c")).info.num_classes == 3
    with pytest.raises(UserError, match="class_names has 1 names"):
        load_dataset("npz", root=path, class_names=5)


def test_a_callers_constant_images_are_refused():
    images = torch.full((4, 1, 4, 4), 3, dtype=torch.uint8)
    with pytest.raises(UserError, match="data: the images are constant in channel 0"):
        as_image_data((images, torch.arange(4)))


# ---------------------------------------------------------------------------- machine


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/d/x.pt"),
     "No space left on device while writing /d/x.pt; free space, then re-run"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/x.h5"),
     "cannot write /ro/x.h5: permission denied; make its folder writable"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"),
     "cannot write /ro: read-only file system; choose a folder on a writable disk"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), "/d: Is a directory"),
    (MemoryError("Unable to allocate 2.91 GiB for an array"), "out of memory (asked for "
                                                              "2.91 GiB)"),
])
def test_machine_refusal_lines(error, line):
    assert machine_refusal(error).startswith(line)


def test_a_refusal_found_behind_the_error_it_caused():
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/d/x.h5")
        except OSError:
            raise RuntimeError("closing failed too") from None
    except RuntimeError as err:
        assert machine_refusal(err).startswith("No space left on device while writing /d/x.h5")
    assert machine_refusal(ValueError("a bug")) is None
    assert machine_refusal(OSError(errno.ENOENT, "No such file")) is None  # names no file


def test_an_unreadable_file_is_named_as_read(tmp_path):
    path = tmp_path / "in.pt"
    path.write_bytes(b"x")
    path.chmod(0)
    try:
        line = machine_refusal(PermissionError(errno.EACCES, "Permission denied", str(path)))
        if os.access(path, os.R_OK):  # root reads anything: the check cannot tell
            pytest.skip("running as root")
        assert line.startswith(f"cannot read {path}: permission denied")
    finally:
        path.chmod(0o644)
