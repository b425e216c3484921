"""landscape's Python API on in-memory models that are not from the registry: endpoints,
BatchNorm recalibration against update_bn, planes and directions, barriers, the distillation
loss, equality with the CLI's HDF5 file, save/read and one-line errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from helpers import scaled_digits
from torch import nn
from torch.optim.swa_utils import update_bn

import landscape
from landscape.barrier import barriers as barrier_values
from landscape.interpolate import main as interpolate_main
from runs.checkpoint import save_checkpoint
from runs.errors import UserError
from runs.models import create_model
from runs.models.head import DinoNet, create_head
from runs.results import PROVENANCE, read_dataset, save


def sequential(seed: int, width: int = 4) -> nn.Module:
    """A plain classifier with BatchNorm, not a registry model: embedding = layer '4'."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


@pytest.fixture(scope="module")
def digits():
    """Float images (already normalised, used as they are) and labels: 120 train, 60 test."""
    return scaled_digits()


@pytest.fixture(scope="module")
def trained(digits):
    """Two networks a few SGD steps apart from different inits, with non-trivial BN stats."""
    (x, y), _ = digits
    models = []
    for seed in (0, 1):
        model = sequential(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        models.append(model.eval())
    return models


def direct(model, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = model.eval()(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) != y).float().mean().item()


def test_path_endpoints_are_the_models(trained, digits):
    a, b = trained
    train, test = digits
    ds = landscape.path(a, b, train, [0.0, 0.5, 1.0], test=test, bn_mode="interpolate",
                        names=("first", "second"))
    assert ds.attrs["analysis"] == "interpolate" and ds["done"].all()
    for alpha, model in ((0.0, a), (1.0, b)):
        for split, (x, y) in zip(("train", "test"), digits):
            loss, error = direct(model, x, y)
            cell = ds.sel(alpha=alpha, split=split)
            assert float(cell.loss) == pytest.approx(loss, abs=1e-5)
            assert float(cell.error) == pytest.approx(error, abs=1e-6)
    assert [r["ref"] for r in json.loads(ds.attrs["inputs"])] == ["first", "second"]
    assert a.training is False and b.training is False  # the caller's modules untouched


def test_recalibrated_midpoint_equals_update_bn(trained, digits):
    a, b = trained
    (x, y), test = digits
    ds = landscape.path(a, b, (x, y), [0.5], test=test, bn_samples=0, bn_batch_size=40)
    mid = sequential(0)
    mid.load_state_dict({k: torch.lerp(v.float(), b.state_dict()[k].float(), 0.5).to(v.dtype)
                         for k, v in a.state_dict().items()})
    update_bn([x[i:i + 40] for i in range(0, len(x), 40)], mid)
    loss, error = direct(mid, *test)
    assert float(ds.sel(alpha=0.5, split="test").loss) == pytest.approx(loss, abs=1e-5)
    assert float(ds.sel(alpha=0.5, split="test").error) == pytest.approx(error, abs=1e-6)


def test_plane_puts_anchors_at_their_corners(trained, digits):
    a, b = trained
    c = sequential(2).eval()
    train, test = digits
    ds = landscape.plane(a, b, c, train, [0.0, 1.0], [0.0, 1.0], test=test,
                         bn_mode="interpolate", metrics=("supervised",))
    for (alpha, beta), model in (((0, 0), a), ((1, 0), b), ((0, 1), c)):
        loss, _ = direct(model, *test)
        cell = ds.sel(alpha=alpha, beta=beta, split="test")
        assert float(cell.loss) == pytest.approx(loss, abs=1e-4)
    assert json.loads(ds.attrs["anchor_coords"]) == {"A": [0, 0], "B": [1, 0], "C": [0, 1]}


def test_directions_centre_is_the_model(trained, digits):
    a = trained[0]
    ds = landscape.directions(a, digits[0], [-1.0, 0.0, 1.0], n=2, seed=3, test=digits[1],
                              bn_mode="keep", metrics=("supervised", "norm"))
    norm = torch.cat([p.detach().flatten() for p in a.parameters()]).norm().item()
    assert float(ds.param_norm.sel(alpha=0, beta=0)) == pytest.approx(norm, rel=1e-6)
    loss, _ = direct(a, *digits[1])
    assert float(ds.loss.sel(alpha=0, beta=0, split="test")) == pytest.approx(loss, abs=1e-5)
    again = landscape.directions(a, digits[0], [-1.0, 0.0, 1.0], n=2, seed=3, test=digits[1],
                                 bn_mode="keep", metrics=("supervised", "norm"))
    xr.testing.assert_equal(ds.drop_attrs(), again.drop_attrs())  # seeded


def test_knn_metric_reads_the_named_layer(trained, digits):
    from sklearn.neighbors import KNeighborsClassifier
    a, b = trained
    (x, y), (tx, ty) = digits
    ds = landscape.path(a, b, (x, y), [0.0], test=(tx, ty), metrics=("knn",), embed="4",
                        knn_k=5, bn_mode="keep")
    with torch.no_grad():
        bank, queries = a[:5](x).double().numpy(), a[:5](tx).double().numpy()
    oracle = KNeighborsClassifier(n_neighbors=5).fit(bank, y.numpy()).score(queries, ty)
    assert float(ds.knn_accuracy.sel(alpha=0)) == pytest.approx(oracle, abs=1e-6)


def test_barriers_follow_the_definitions(trained, digits):
    a, b = trained
    ds = landscape.path(a, b, digits[0], np.linspace(0, 1, 5), test=digits[1], bn_mode="keep")
    out = landscape.barriers(ds)
    alphas = ds.alpha.values
    for split in ("train", "test"):
        loss = ds.loss.sel(split=split).values
        error = ds.error.sel(split=split).values
        expect = barrier_values(loss, error, alphas)
        assert float(out.error_barrier.sel(split=split)) == pytest.approx(
            error.max() - (error[0] + error[-1]) / 2)
        for name, value in expect.items():
            assert float(out[name].sel(split=split)) == pytest.approx(float(value))
    with pytest.raises(UserError, match="path result"):
        landscape.barriers(landscape.plane(a, b, sequential(2), digits[0], [0, 1], [0, 1],
                                           bn_mode="keep"))


def test_distill_kl_vanishes_at_the_teacher():
    encoder = create_model("convnet", num_classes=10, width=0.125, in_channels=1, seed=0)
    head = create_head(in_dim=encoder.embed_dim, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    teacher = DinoNet(encoder, head)
    student = DinoNet(create_model("convnet", num_classes=10, width=0.125, in_channels=1,
                                   seed=1), create_head(in_dim=encoder.embed_dim, out_dim=16,
                                                        hidden_dim=8, bottleneck_dim=4, seed=1))
    ds = landscape.path(student, teacher, "digits", [0.0, 1.0], metrics=("distill",),
                        teacher=teacher, bn_mode="keep", train_samples=64, test_samples=64)
    assert np.allclose(ds.distill_kl.sel(alpha=1.0).values, 0, atol=1e-5)
    assert (ds.distill_kl.sel(alpha=0.0).values > 1e-4).all()
    with pytest.raises(UserError, match="teacher="):
        landscape.path(student, teacher, "digits", [0.0, 1.0], metrics=("distill",))


def test_api_equals_cli_file(tmp_path):
    """Same checkpoints and data: the API's dataset is the CLI's file (values, coords,
    attrs apart from provenance, config and the inputs' spelling)."""
    models = [create_model("convnet", num_classes=10, width=0.125, in_channels=1, seed=s)
              for s in (0, 1)]
    paths = [tmp_path / f"m{s}.pt" for s in (0, 1)]
    for model, path in zip(models, paths):
        save_checkpoint(path, model, 0)
    options = dict(bn_samples=64, bn_batch_size=32, train_samples=100, test_samples=50)
    out = tmp_path / "path.h5"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    assert interpolate_main([*map(str, paths), "--dataset", "digits", "--grid", "0:1:5",
                             "--metrics", "supervised", "norm", "--device", "cpu", "--out",
                             str(out), *flags]) == 0
    ds = landscape.path(*models, "digits", np.linspace(0, 1, 5), device="cpu", **options)
    with xr.open_dataset(out, engine="h5netcdf") as cli:
        cli = cli.load()
    xr.testing.assert_allclose(ds.drop_attrs(), cli.drop_attrs(), rtol=1e-5, atol=1e-6)
    skip = {*PROVENANCE, "created_utc", "config", "inputs"}
    assert {k: v for k, v in ds.attrs.items() if k not in skip} == \
        {k: (v.item() if hasattr(v, "item") else v) for k, v in cli.attrs.items()
         if k not in skip}
    cfg_api, cfg_cli = json.loads(ds.attrs["config"]), json.loads(cli.attrs["config"])
    for key in ("metrics", "bn_mode", "bn_samples", "train_samples", "seed", "knn_k"):
        assert cfg_api[key] == cfg_cli[key], key


def test_save_writes_the_cli_layout(trained, digits, tmp_path):
    ds = landscape.path(*trained, digits[0], [0.0, 1.0], test=digits[1], bn_mode="keep")
    path = save(ds, tmp_path / "saved.h5")
    back = read_dataset(path, "interpolate")
    xr.testing.assert_identical(back, ds)
    with pytest.raises(UserError, match="already exists"):
        save(ds, path)


def test_bad_arguments_name_the_culprit(trained, digits):
    a = trained[0]
    wide = sequential(5, width=6)
    with pytest.raises(UserError, match=r"'0.weight' has shape \(4, 1, 3, 3\) vs "
                                        r"\(6, 1, 3, 3\)"):
        landscape.path(a, wide, digits[0], [0.0, 1.0], test=digits[1])
    with pytest.raises(UserError, match=r"no layer 'pool'.*0, 1, 2, 3, 4, 5"):
        landscape.path(a, trained[1], digits[0], [0.0, 1.0], metrics=("knn",), embed="pool")
    rgb = (torch.zeros(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(UserError, match=r"A cannot take the data's images of shape "
                                        r"\(3, 8, 8\)"):
        landscape.path(a, trained[1], rgb, [0.0, 1.0])
    with pytest.raises(UserError, match="knn needs the embedding"):
        landscape.path(a, trained[1], digits[0], [0.0], metrics=("knn",))
    with pytest.raises(UserError, match="unknown option 'bn_sample'"):
        landscape.path(a, trained[1], digits[0], [0.0], bn_sample=3)
    with pytest.raises(UserError, match="labels must be"):
        landscape.path(a, trained[1], (digits[0][0], digits[0][1][:-1]), [0.0])
