"""Data as a notebook holds it: names, (images, labels) pairs, Datasets (tensors or PIL)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from runs.data import as_image_data, as_splits, load_dataset, pixel_stats
from runs.errors import UserError


class PilDigits(Dataset):
    """A torchvision-style Dataset: (PIL image, int label) items."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return Image.fromarray(self.data.x[i, 0].numpy()), int(self.data.y[i])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train", subset=5)


def test_pair_tensor_dataset_and_pil_dataset_give_the_same_images(digits):
    pair = as_image_data((digits.x, digits.y))
    tensors = as_image_data(TensorDataset(digits.x, digits.y))
    pil = as_image_data(PilDigits(digits))
    for data in (pair, tensors, pil):
        assert torch.equal(data.x, digits.x) and torch.equal(data.y, digits.y)
        assert data.info.num_classes == 10 and data.info.channels == 1
        assert data.info.mean == pixel_stats(digits.x)[0]
    assert (pair.info.name, tensors.info.name, pil.info.name) == \
        ("tensors", "TensorDataset", "PilDigits")


def test_test_split_takes_the_train_statistics_and_float_images_stay_as_they_are(digits):
    test = load_dataset("digits", split="test", subset=3)
    train, held = as_splits((digits.x, digits.y), (test.x, test.y))
    assert held.info.mean == train.info.mean and held.info.std == train.info.std
    floats = as_image_data((digits.x.float() / 255, digits.y))
    assert floats.info.mean == (0.0,) and floats.info.std == (1.0,)
    named_train, named_test = as_splits("digits")
    assert len(named_train) + len(named_test) == 1797


@pytest.mark.parametrize("data, message", [
    ((torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)),
     r"images must be \(N, C, H, W\), got shape \(4, 8, 8\)"),
    ((torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long)),
     "labels must be 4 integers"),
    ((torch.zeros(4, 1, 8, 8, dtype=torch.int32), torch.zeros(4, dtype=torch.long)),
     "uint8 pixels or floats"),
    (np.zeros((4, 1, 8, 8)), "expected a dataset name, a pair"),
])
def test_bad_data_is_one_line_naming_the_argument(data, message):
    with pytest.raises(UserError, match=message):
        as_image_data(data, "data")


def test_test_images_of_another_shape_are_refused(digits):
    with pytest.raises(UserError, match=r"test: images of shape \(3, 8, 8\) do not match the "
                                        r"training data's \(1, 8, 8\)"):
        as_splits((digits.x, digits.y), (torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                                         torch.zeros(2, dtype=torch.long)))
