"""Students distilled at alpha = 0 (the paper's main runs: student == teacher at step 0) in
planes and paths: the untrained student is its teacher, and a plane through both is refused
with a message that says so; trained alpha = 0 students are accepted."""

import dataclasses
import re

import numpy as np
import pytest
import torch

import landscape
from landscape.interpolate import main
from runs.engines.distill import DistillConfig, distill
from runs.errors import UserError
from runs.refs import load_head, load_model
from runs.results import open_result

DISTILL = DistillConfig(model="convnet", width=0.125, dataset="toy", data_options=("side=8",),
                        teacher_seed=7, alpha=0.0, out_dim=64, hidden_dim=32, bottleneck_dim=8,
                        batch_size=32, num_steps=8)
FAST = ["--device", "cpu", "--bn-samples", "32", "--bn-batch-size", "32", "--grid", "0,1"]


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict:
    """Two distillation runs of one teacher: alpha 0 (the paper's) and alpha 1."""
    store = tmp_path_factory.mktemp("alpha0_store")
    return {alpha: str(distill(dataclasses.replace(DISTILL, alpha=alpha), store,
                               device="cpu").path) for alpha in (0.0, 1.0)}


def test_untrained_alpha0_student_is_its_teacher(students):
    run = students[0.0]
    student, teacher = load_model(f"{run}@init").model, load_model(f"{run}@init:teacher").model
    for (name, mine), theirs in zip(student.encoder.named_parameters(),
                                    teacher.encoder.parameters()):
        assert torch.equal(mine, theirs), name
    assert torch.equal(load_head(f"{run}@init").last.weight,
                       load_head(f"{run}@init:teacher").last.weight)


@pytest.mark.parametrize("metrics", [["norm"], ["distill", "norm"]])
def test_plane_through_teacher_and_untrained_alpha0_student_is_refused(students, tmp_path,
                                                                       capsys, metrics):
    run = students[0.0]
    out = tmp_path / "plane.h5"
    teacher = ["--teacher", f"{run}@init:teacher"] if "distill" in metrics else []
    code = main([f"{run}@init:teacher", f"{run}@init", f"{students[1.0]}@last", "--metrics",
                 *metrics, *teacher, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(r"B and A are identical, 0 apart .*IS its teacher at alpha=0.*"
                     r"\(RUN@last\) instead of RUN@init", err), err
    assert not out.exists()


def test_python_api_refuses_the_same_plane(students):
    run = students[0.0]
    teacher, student = load_model(f"{run}@init:teacher").model, load_model(f"{run}@init").model
    other = load_model(f"{students[1.0]}@last").model
    with pytest.raises(UserError, match="identical, 0 apart.*alpha=0"):
        landscape.plane(teacher, student, other, "toy", [0.0, 1.0], metrics=("norm",),
                        bn_mode="keep")


def test_trained_alpha0_students_are_accepted(students, tmp_path):
    """The paper's second plane: teacher, trained student alpha 0, trained student alpha 1,
    distillation KL of encoder + head; the KL vanishes at the teacher only."""
    run = students[0.0]
    out = tmp_path / "plane.h5"
    code = main([f"{run}@init:teacher", f"{run}@last", f"{students[1.0]}@last", "--metrics",
                 "distill", "norm", "--teacher", f"{run}@init:teacher", "--bn-mode", "keep",
                 "--out", str(out), *FAST])
    assert code == 0
    data = open_result(out, "interpolate")
    kl = data.metrics["distill_kl"]  # (alpha, beta, split)
    np.testing.assert_allclose(kl[0, 0], 0, atol=1e-5)
    assert (kl[1, 0] > 0).all() and (kl[0, 1] > 0).all()
    moved = landscape.path(load_model(f"{run}@init:teacher").model,
                           load_model(f"{run}@last").model, "toy", [0.0, 1.0],
                           metrics=("norm",), bn_mode="keep")
    assert float(moved.param_norm[0]) != float(moved.param_norm[1])
