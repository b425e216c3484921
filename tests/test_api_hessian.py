"""landscape.hessian, the notebook door of `python -m landscape.hessian`: the same numbers as
the CLI's file for the same checkpoints (supervised and distillation), any classifier with
BatchNorm against its dense Hessian, several models as rows, the caller's modules untouched,
one-line errors, and the name that is both the module and the function."""

from copy import deepcopy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from torch import nn
from torch.func import functional_call

import landscape
import runs
from landscape.hessian import main
from runs.engines.distill import DistillConfig, distill
from runs.engines.train import TrainConfig, train
from runs.errors import UserError
from runs.results import open_result

TRAIN = TrainConfig(model="convnet", width=0.125, dataset="digits", batch_size=64, num_steps=4,
                    lr=0.05)
DISTILL = DistillConfig(model="convnet", width=0.125, dataset="digits", teacher_seed=7,
                        alpha=1.0, out_dim=32, hidden_dim=16, bottleneck_dim=8, batch_size=64,
                        num_steps=2)
OPTIONS = {"samples": 48, "trace_probes": "5:30", "slq_runs": 2, "slq_steps": 20,
           "device": "cpu"}
FLAGS = ["--samples", "48", "--trace-probes", "5:30", "--slq-runs", "2", "--slq-steps", "20",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    store = tmp_path_factory.mktemp("api_hessian_store")
    supervised = train(TRAIN, store, device="cpu").path
    student = distill(DISTILL, store, device="cpu").path
    return {"model": f"{supervised}@last", "student": f"{student}@last",
            "teacher": f"{student}@init:teacher"}


def assert_same_numbers(ds, path) -> None:
    """Every metric and non-checkpoint coordinate of the dataset equals the file's."""
    data = open_result(path, "hessian")
    assert sorted(data.metrics) == sorted(v for v in ds.data_vars if v != "done")
    for name, values in data.metrics.items():
        np.testing.assert_array_equal(ds[name].values, values, err_msg=name)
    for name, labels in data.coords.items():
        if name != "checkpoint":
            np.testing.assert_array_equal(ds[name].values, labels, err_msg=name)
    for key in ("analysis", "bn_mode", "parts"):
        assert ds.attrs[key] == data.attrs[key]


def test_notebook_door_equals_the_cli(refs, tmp_path):
    out = tmp_path / "cli.h5"
    code, err = run_cli(main, [refs["model"], "--params", "fc", "--out", str(out), *FLAGS])
    assert code == 0, err
    ds = landscape.spectrum(runs.load(refs["model"]), "digits", k=5, params="fc", **OPTIONS)
    assert list(ds["checkpoint"].values) == ["model"] and bool(ds["done"].all())
    assert_same_numbers(ds, out)


def test_distill_door_equals_the_cli(refs, tmp_path):
    out = tmp_path / "cli.h5"
    code, err = run_cli(main, [refs["student"], "--loss", "distill", "--teacher",
                               refs["teacher"], "--measures", "top", "trace", "--top-k", "2",
                               "--out", str(out), *FLAGS])
    assert code == 0, err
    teacher = runs.load(refs["teacher"], head=True)
    ds = landscape.spectrum(runs.load(refs["student"], head=True), "digits", loss="distill",
                           teacher=teacher, k=2, measures=("top", "trace"), **OPTIONS)
    assert ds.attrs["parts"] == "encoder+head"
    assert_same_numbers(ds, out)
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher


def sequential(seed: int) -> nn.Module:
    """A plain classifier with BatchNorm (not a registry model), a few SGD steps trained so
    its BN statistics are not the defaults; left in train mode, as a notebook might."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    x, y = images()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(24, 1, 6, 6, generator=generator), torch.arange(24) % 10


def dense(model: nn.Module) -> torch.Tensor:
    """The float64 Hessian of the mean cross-entropy w.r.t. all parameters, BN in eval."""
    copy = deepcopy(model).double().eval()
    state = {**{k: v.detach() for k, v in copy.named_parameters()},
             **dict(copy.named_buffers())}
    names = [n for n, _ in copy.named_parameters()]
    shapes = [state[n].shape for n in names]
    x, y = images()

    def loss(flat):
        chunks = flat.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, chunks, shapes)}
        return F.cross_entropy(functional_call(copy, {**state, **params}, (x.double(),)), y)
    return torch.autograd.functional.hessian(loss, torch.cat([state[n].reshape(-1)
                                                              for n in names]))


def test_any_classifier_against_its_dense_hessian(tmp_path):
    model = sequential(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = landscape.spectrum(model, images(), k=3, samples=0, measures=("top", "trace",
                           "layer-top"), eigen_tol=1e-6, trace_probes="5:50", device="cpu")
    hessian = dense(model)
    exact = torch.linalg.eigvalsh(hessian).flip(0).numpy()
    np.testing.assert_allclose(ds["eigenvalue"].values[0], exact[:3], rtol=1e-4)
    assert list(ds["layer"].values) == ["0", "1", "5"]  # the module's own paths
    sizes = ds["layer_size"].values[0].astype(int)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        block = torch.linalg.eigvalsh(hessian[a:b, a:b])[-1]
        assert ds["layer_top"].values[0, i] == pytest.approx(float(block), rel=1e-3)
    assert ds["param_count"].values[0] == hessian.shape[0] == sizes.sum()
    assert model.training and all(torch.equal(before[k], v)
                                  for k, v in model.state_dict().items())


def test_several_models_are_rows():
    models = {"first": sequential(0), "second": sequential(1)}
    ds = landscape.spectrum(models, images(), k=2, samples=0, measures=("top",), device="cpu")
    assert list(ds["checkpoint"].values) == ["first", "second"]
    listed = landscape.spectrum(list(models.values()), images(), k=2, samples=0,
                               measures=("top",), names=["a", "b"], device="cpu")
    np.testing.assert_array_equal(listed["eigenvalue"].values, ds["eigenvalue"].values)
    assert ds["eigenvalue"].values[0, 0] != ds["eigenvalue"].values[1, 0]


@pytest.mark.parametrize("kwargs, culprit", [
    ({"loss": "distill"}, "needs teacher="),
    ({"bogus": 1}, "unknown option 'bogus'"),
    ({"k": 1000}, "--top-k 1000: must lie in 1.."),
    ({"params": "fc"}, "--params fc: the network has no fc parameters"),
    ({"trace_tol": 0.0}, "--trace-tol 0.0"),
    ({"measures": ("top", "curvature")}, "unknown measure 'curvature'"),
])
def test_one_line_errors(kwargs, culprit):
    with pytest.raises(UserError, match=culprit.replace(".", r"\.")) as caught:
        landscape.spectrum(sequential(0), images(), **{"samples": 0, "device": "cpu",
                                                      **kwargs})
    assert "\n" not in str(caught.value)


def test_the_function_and_the_command_module_are_two_names():
    """`landscape.spectrum` is the function, `landscape.hessian` stays the CLI module."""
    import landscape.hessian as module
    assert callable(landscape.spectrum) and landscape.spectrum.__doc__
    assert callable(module.main) and landscape.hessian is module
