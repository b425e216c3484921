"""The probes' Python API (issue #16): any nn.Module in, the CLI's labelled result out."""

import json

import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

import probes
from probes.evaluate import main as probe_main
from probes.logistic import linear_probe_lbfgs
from runs.checkpoint import module_sha256, save_checkpoint
from runs.data import load_dataset, pixel_stats
from runs.errors import UserError
from runs.models import create_model
from runs.results import read_dataset, save

# Attributes that say when, where and from what a result was made, not what it holds.
PROVENANCE = {"created_utc", "package_version", "git_sha", "git_dirty", "torch_version",
              "device", "config", "inputs"}


def plain_net(in_channels=1, seed=0) -> nn.Sequential:
    """A classifier outside the registry (no `encoder`): its embedding is layer "4"."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with torch.no_grad():  # running statistics that eval mode must use
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def digits():
    """(train, test) digits: 300 and 200 grey 8x8 images."""
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    return (train.x[:300], train.y[:300]), (test.x[:200], test.y[:200])


def normalised(images, mean, std) -> torch.Tensor:
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def test_embed_equals_the_forward_up_to_the_named_layer(digits):
    (x, _), _ = digits
    net = plain_net().train()
    feats = probes.embed(net, x, batch_size=128, embed="4")  # 3 uneven batches
    assert feats.shape == (300, 4) and feats.dtype == torch.float32
    assert all(m.training for m in net.modules())  # modes restored
    mean, std = pixel_stats(x)  # the default normalisation: these images' statistics
    net.eval()
    with torch.no_grad():
        expected = net[:5](normalised(x, mean, std))  # (N, 4): conv, BN (eval), relu, pool
    torch.testing.assert_close(feats, expected)
    # The same embedding by callable, and from float images already normalised.
    by_call = probes.embed(net, x, embed=lambda model, images: model[:4](images))
    torch.testing.assert_close(by_call, expected)
    torch.testing.assert_close(probes.embed(net, normalised(x, mean, std), embed="4"),
                               expected)
    # Explicit statistics are used as given.
    other = probes.embed(net, x, embed="4", mean=(0.5,), std=(0.25,))
    with torch.no_grad():
        torch.testing.assert_close(other, net[:5](normalised(x, (0.5,), (0.25,))))


def test_registry_models_embed_with_their_encoder(digits):
    (x, _), _ = digits
    model = create_model("convnet", num_classes=10, width=0.25, in_channels=1, seed=1)
    mean, std = pixel_stats(x)
    model.eval()
    with torch.no_grad():
        expected = model.encoder(normalised(x, mean, std))
    torch.testing.assert_close(probes.embed(model, x), expected)


def test_knn_equals_scikit_learn_on_embeddings(digits):
    (x, y), (tx, ty) = digits
    net = plain_net()
    train_x = probes.embed(net, x, embed="4").double()  # float64: exact agreement
    test_x = probes.embed(net, tx, embed="4").double()
    for k in (1, 5, 20):
        ours = probes.knn(train_x, y, test_x, ty, k=k)
        clf = KNeighborsClassifier(n_neighbors=k).fit(train_x.numpy(), y.numpy())
        assert ours == pytest.approx(clf.score(test_x.numpy(), ty.numpy()), abs=1e-12), k
    cosine = probes.knn(train_x, y, test_x, ty, k=5, metric="cosine")
    assert 0.2 < cosine <= 1  # 4 random features still beat chance (0.1)


def test_linear_wraps_the_probes_and_checks_its_method(digits):
    (x, y), (tx, ty) = digits
    net = plain_net()
    train_x, test_x = probes.embed(net, x, embed="4"), probes.embed(net, tx, embed="4")
    lbfgs = probes.linear(train_x, y, test_x, ty, seed=1)
    assert lbfgs == linear_probe_lbfgs(train_x, y, test_x, ty, 10, seed=1)["accuracy"]
    paper = probes.linear(train_x, y, test_x, ty, method="paper", seed=0)
    assert paper == probes.linear(train_x, y, test_x, ty, method="paper", seed=0)  # seeded
    assert 0 <= paper <= 1
    with pytest.raises(UserError, match="unknown linear probe method 'svm'; valid: lbfgs, "
                                        "paper"):
        probes.linear(train_x, y, test_x, ty, method="svm")


def test_evaluate_model_equals_the_cli_file(tmp_path, capsys):
    model = create_model("convnet", num_classes=10, width=0.25, in_channels=1, seed=2)
    ckpt = str(save_checkpoint(tmp_path / "m.pt", model, step=0))
    out = tmp_path / "probe.h5"
    assert probe_main([ckpt, "pixels", "--dataset", "digits", "--subset", "20", "--probes",
                       "knn", "linear", "linear-lbfgs", "--ks", "5", "20", "--seeds", "0", "1",
                       "--device", "cpu", "--out", str(out)]) == 0
    train = load_dataset("digits", split="train", subset=20)
    test = load_dataset("digits", split="test")
    # The CLI names the file's row by its stem ("m"), never its path: the same label here.
    ds = probes.evaluate_model({"m": model, "pixels": "pixels"}, train, test,
                               probes=("knn", "linear", "linear-lbfgs"), ks=(5, 20),
                               seeds=(0, 1), device="cpu")
    with xr.open_dataset(out, engine="h5netcdf") as cli:
        cli = cli.load()
    assert bool(ds["done"].all()) and not np.isnan(ds["accuracy"].values).any()
    xr.testing.assert_equal(ds, cli)  # same values, coords and variables
    assert ds["accuracy"].attrs == cli["accuracy"].attrs
    assert {k: v for k, v in ds.attrs.items() if k not in PROVENANCE} == \
        {k: v for k, v in cli.attrs.items() if k not in PROVENANCE}
    assert ds.attrs["analysis"] == "probe" and "checkpoints" in ds.attrs
    # Provenance by content: the module's state, not a file.
    record = json.loads(ds.attrs["inputs"])
    assert record == [{"ref": "m", "path": "", "sha256": module_sha256(model), "step": None}]
    assert ds["accuracy"].sel(checkpoint="pixels", probe="knn@20", features="raw").min() > 0.85


def test_evaluate_model_on_a_plain_module_composes_embed_and_knn(digits, tmp_path):
    (x, y), (tx, ty) = digits
    net = plain_net().train()
    ds = probes.evaluate_model(net, (x, y), (tx, ty), probes=("knn",), ks=(3,), seeds=(0, 1),
                               embed="4", device="cpu")
    assert list(ds["checkpoint"].values) == ["model"]
    assert list(ds["probe"].values) == ["knn@3"]
    assert all(m.training for m in net.modules())  # the caller's module is left as it was
    mean, std = pixel_stats(x)  # test images are normalised with the train statistics
    expect = probes.knn(probes.embed(net, x, embed="4", mean=mean, std=std), y,
                        probes.embed(net, tx, embed="4", mean=mean, std=std), ty, k=3)
    got = ds["accuracy"].sel(checkpoint="model", features="raw").values  # (probe, seed)
    assert np.allclose(got, np.float32(expect))  # k-NN is one number for every seed
    config = json.loads(ds.attrs["config"])
    assert config["checkpoints"] == ["model"] and config["ks"] == [3]
    assert config["seeds"] == [0, 1] and config["batch_size"] == 512
    assert config["train"]["shape"] == [300, 1, 8, 8] and len(config["train"]["sha256"]) == 64
    # The dataset saves as the CLI's file and reads back unchanged.
    path = save(ds, tmp_path / "api.h5")
    xr.testing.assert_identical(read_dataset(path, "probe"), ds)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_an_unknown_layer_lists_the_layers(digits):
    (x, y), _ = digits
    with pytest.raises(UserError) as err:
        probes.embed(plain_net(), x, embed="fc")
    assert "no layer 'fc'" in one_line(err) and "its layers: 0, 1, 2, 3, 4, 5" in one_line(err)
    with pytest.raises(UserError) as err:  # no embed for a module outside the registry
        probes.evaluate_model(plain_net(), (x, y), device="cpu")
    assert "has no `encoder`" in one_line(err) and "0, 1, 2, 3, 4, 5" in one_line(err)


def test_images_the_model_cannot_take_name_both_shapes(digits):
    (x, y), _ = digits
    rgb = x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
    with pytest.raises(UserError) as err:
        probes.embed(plain_net(in_channels=1), rgb, embed="4")
    message = one_line(err)
    assert "(3, 8, 8)" in message and "1-channel images" in message
    with pytest.raises(UserError) as err:
        probes.evaluate_model({"grey": plain_net()}, (rgb, y), probes=("knn",), seeds=(0,),
                              embed="4", device="cpu")
    assert "(3, 8, 8)" in one_line(err) and "1-channel" in one_line(err)


def test_bad_labels_and_options_are_one_line_errors(digits):
    (x, y), (tx, ty) = digits
    net = plain_net()
    with pytest.raises(UserError) as err:
        probes.evaluate_model(net, (x, y[:-1]), embed="4", device="cpu")
    assert "labels must be 300 integers" in one_line(err)
    feats = probes.embed(net, x, embed="4")
    with pytest.raises(UserError) as err:
        probes.knn(feats, y[:-1], feats, y)
    assert "299 train labels for 300 train features" in one_line(err)
    with pytest.raises(UserError) as err:
        probes.evaluate_model(net, (x, y), probes=("svm",), embed="4", device="cpu")
    assert "unknown probe 'svm'; valid: knn, knn-cosine, linear, linear-lbfgs" in one_line(err)
    with pytest.raises(UserError) as err:
        probes.evaluate_model({"a": "not a model"}, (x, y), device="cpu")
    assert "models['a']: expected an nn.Module or 'pixels', got str" in one_line(err)
    with pytest.raises(UserError) as err:  # float images are already normalised
        probes.embed(net, normalised(x, (0.5,), (0.25,)), embed="4", mean=(0.5,), std=(0.25,))
    assert "uint8" in one_line(err)
