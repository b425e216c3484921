"""Input statistics (`stats=`, the CLIs' --input-stats): "paper" = the mean/std the paper's code
normalised with (CIFAR-10's class constants for cifar10 and cifar100, ImageNet's for
tinyimagenet), "dataset" = each dataset's own. Only info.mean/std/stats may differ; the pixels
never do. Every dataset's files are the tiny on-disk fixtures of tests/test_data.py."""

from dataclasses import replace

import pytest
import torch

from runs.data import DATASETS, PAPER_STATS, dataset_info, load_dataset, load_splits
from runs.datasets.base import CIFAR10_CODE_STATS, IMAGENET_STATS
from runs.errors import UserError
from runs.gpu_loader import eval_loader
from tests.test_data import _minimal_root, _write_cifar100, _write_tinyimagenet

CIFAR100_OWN = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
TINY_OWN = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))


def stats_of(info):
    return info.mean, info.std


def test_cifar100_is_normalised_with_cifar10s_numbers_under_paper(tmp_path, monkeypatch):
    _write_cifar100(tmp_path, monkeypatch)
    paper = load_dataset("cifar100", root=tmp_path)  # the default
    own = load_dataset("cifar100", root=tmp_path, stats="dataset")
    assert stats_of(paper.info) == CIFAR10_CODE_STATS == ((0.4914, 0.4822, 0.4465),
                                                          (0.247, 0.243, 0.261))
    assert stats_of(paper.info) == stats_of(dataset_info("cifar10"))  # CIFAR-10's, as coded
    assert stats_of(own.info) == CIFAR100_OWN
    assert (paper.info.stats, own.info.stats) == ("paper", "dataset")
    assert paper.info.num_classes == own.info.num_classes == 100  # only the statistics change
    assert torch.equal(paper.x, own.x) and torch.equal(paper.y, own.y)
    # ... and so do the network's inputs: (x / 255 - mean) / std with the chosen numbers
    batch_paper, _ = next(eval_loader(paper, "cpu").epoch())
    batch_own, _ = next(eval_loader(own, "cpu").epoch())
    x = paper.x.float() / 255
    for batch, (mean, std) in ((batch_paper, CIFAR10_CODE_STATS), (batch_own, CIFAR100_OWN)):
        expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(batch, expected)


def test_tinyimagenet_paper_statistics_are_imagenets(tmp_path):
    _write_tinyimagenet(tmp_path)
    paper = load_dataset("tinyimagenet", root=tmp_path, split="test")
    own = load_dataset("tinyimagenet", root=tmp_path, split="test", stats="dataset")
    assert stats_of(paper.info) == IMAGENET_STATS == ((0.485, 0.456, 0.406),
                                                      (0.229, 0.224, 0.225))
    assert stats_of(own.info) == TINY_OWN and torch.equal(paper.x, own.x)
    assert dataset_info("tinyimagenet", root=tmp_path) == paper.info


def test_cifar10_paper_statistics_are_the_codes_constants():
    """The paper's code rounded CIFAR-10's std to three digits; "dataset" keeps four."""
    paper, own = dataset_info("cifar10"), dataset_info("cifar10", stats="dataset")
    assert stats_of(paper) == ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    assert stats_of(own) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def test_digits_are_identical_under_both():
    paper, own = load_dataset("digits", subset=5), load_dataset("digits", subset=5,
                                                                  stats="dataset")
    assert paper.info == own.info and paper.info.stats == "dataset"
    assert torch.equal(paper.x, own.x)


@pytest.mark.parametrize("name", DATASETS.names())
def test_only_the_paper_datasets_change_and_only_their_statistics(name, tmp_path, monkeypatch):
    """Every registered dataset, both choices: same pixels and labels, same metadata but for
    mean/std/stats, which differ exactly for the datasets the paper's code had numbers for."""
    options = {"noise": {"count": 40}, "cifar5m": {"subset": 2}}.get(name, {})
    root = _minimal_root(name, tmp_path, monkeypatch)
    paper = load_dataset(name, root=root, **options)
    own = load_dataset(name, root=root, stats="dataset", **options)
    assert torch.equal(paper.x, own.x) and torch.equal(paper.y, own.y)
    if name in PAPER_STATS:
        assert stats_of(paper.info) == PAPER_STATS[name] != stats_of(own.info)
        assert (paper.info.stats, own.info.stats) == ("paper", "dataset")
        assert replace(paper.info, mean=own.info.mean, std=own.info.std,
                       stats="dataset") == own.info
    else:
        assert paper.info == own.info and own.info.stats == "dataset"


def test_statistics_follow_channels_and_both_splits(tmp_path, monkeypatch):
    _write_cifar100(tmp_path, monkeypatch)
    grey = load_dataset("cifar100", root=tmp_path, channels=1)  # luma of CIFAR-10's constants
    mean, std = CIFAR10_CODE_STATS
    assert grey.info.mean == pytest.approx((0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2],))
    assert grey.info.std == pytest.approx((0.299 * std[0] + 0.587 * std[1] + 0.114 * std[2],))
    train, test = load_splits("cifar100", str(tmp_path), 0, seed=0, stats="dataset")
    assert stats_of(train.info) == stats_of(test.info) == CIFAR100_OWN


def test_unknown_statistics_name_the_flag_and_the_choices():
    for call in (lambda: load_dataset("digits", stats="imagenet"),
                 lambda: dataset_info("cifar10", stats="own")):
        with pytest.raises(UserError, match="--input-stats '.*': unknown input statistics; "
                                            "valid: paper, dataset"):
            call()
