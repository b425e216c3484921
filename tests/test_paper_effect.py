"""The paper's first effect on real images, reduced to CI size (one seed, 8 epochs).

Full version, 3 seeds, 15 epochs: `python -m runs.reproduce --preset cifar10-subset` (README).
"""

import dataclasses

import pytest

from runs.data import cifar10_subset_path
from runs.engines.distill import load_data
from runs.studies.reproduce import noise_config, preset_config, run_one

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(cifar10_subset_path() is None,
                                 reason="../shared/data/cifar10_subset.npz is absent")]


def test_student_beats_teacher_and_noise_student(tmp_path):
    cfg, _ = preset_config("cifar10-subset", seed=0)
    cfg = dataclasses.replace(cfg, width=0.5, batch_size=128)
    # The paper's recipe (raw head, alpha 0): its KL is about 10x smaller than the normed
    # head's, and the student needs more than 4 epochs to pull clear (+0.6 points at 4).
    images = run_one(cfg, "8ep", str(tmp_path), "cpu")
    noise = run_one(noise_config(cfg, load_data(cfg)[0]), "8ep", str(tmp_path), "cpu")
    assert images["knn_teacher"] == noise["knn_teacher"]  # the same random teacher
    # Measured: teacher 30.8 %, student 33.1 %, noise-student 30.9 % (k-NN, 1017 test images).
    assert images["knn_student"] > images["knn_teacher"] + 0.005
    assert noise["knn_student"] < images["knn_student"]
