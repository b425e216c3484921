"""Layer-wise connectivity (landscape.layerwise): groups, barriers exactly 0 where A and B
agree, the changed layer's sweep against a hand-made interpolation, resume, bad input."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli

import landscape
from landscape.barrier import mean_barrier
from landscape.batchnorm import recalibrate
from landscape.layerwise import groups, main
from landscape.network import Subject
from landscape.points import eval_data, images
from runs.checkpoint import save_checkpoint
from runs.data import load_dataset
from runs.models import create_model
from runs.results import open_result

CHANGED = "encoder.4"  # convnet's second conv
FAST = ["--device", "cpu", "--grid", "0:1:5", "--bn-samples", "64", "--bn-batch-size", "32",
        "--dataset", "toy", "--data-options", "side=8", "--train-samples", "64",
        "--test-samples", "32"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A: a random convnet; B: A with only CHANGED's weights redrawn (BN stats A's)."""
    folder = tmp_path_factory.mktemp("layerwise")
    a = create_model("convnet", num_classes=4, width=0.125, seed=0)
    b = copy.deepcopy(a)
    other = create_model("convnet", num_classes=4, width=0.125, seed=1)
    with torch.no_grad():
        b.encoder[4].weight.copy_(other.encoder[4].weight)
        b.encoder[4].bias.copy_(other.encoder[4].bias) if b.encoder[4].bias is not None \
            else None
    save_checkpoint(folder / "a.pt", a, 0)
    save_checkpoint(folder / "b.pt", b, 0)
    wide = create_model("convnet", num_classes=4, width=0.25, seed=0)
    save_checkpoint(folder / "wide.pt", wide, 0)
    return {"A": str(folder / "a.pt"), "B": str(folder / "b.pt"),
            "wide": str(folder / "wide.pt"), "a": a, "b": b}


def test_groups_cover_every_parameter_once():
    model = create_model("resnet20", num_classes=4, width=0.125)
    subject = Subject(model.encoder, model.fc)
    names = list(subject.state_dict())
    for granularity in ("layer", "block"):
        found = [n for members in groups(subject, granularity).values() for n in members]
        assert sorted(found) == sorted(names) and len(found) == len(set(found))
    blocks = list(groups(subject, "block"))
    assert "encoder.layer1.0" in blocks and blocks[-1] == "fc"


def hand_sweep(pair, held: str, alphas, data) -> np.ndarray:
    """(alpha, split) loss: CHANGED's weights lerped by torch, the rest `held`, BN reset and
    recalibrated on the scan's BN images, cross-entropy summed over each split."""
    out = []
    for alpha in alphas:
        model = copy.deepcopy(pair[held.lower()])
        layer = model.encoder[4]
        with torch.no_grad():
            for name in ("weight", "bias"):
                start, end = getattr(pair["a"].encoder[4], name), getattr(pair["b"].encoder[4],
                                                                         name)
                if start is not None:
                    getattr(layer, name).copy_(torch.lerp(start, end, float(alpha)))
        subject = Subject(model.encoder, model.fc)
        recalibrate(subject.encoder, images(data.bn))
        subject.eval()
        row = []
        with torch.no_grad():
            for split in ("train", "test"):
                total, count = 0.0, 0
                for x, y in data.splits[split].epoch(0):
                    logits = subject(x)["logits"].float()
                    total += F.cross_entropy(logits, y, reduction="sum").double().item()
                    count += len(y)
                row.append(total / count)
        out.append(row)
    return np.array(out)


def test_barriers_vanish_where_a_and_b_agree_and_match_a_hand_sweep(pair, tmp_path):
    out = tmp_path / "lw.h5"
    assert main([pair["A"], pair["B"], "--out", str(out), *FAST]) == 0
    data = open_result(str(out), "layerwise")
    layers = list(data.coords["layer"])
    assert layers == ["encoder.0", "encoder.1", "encoder.4", "encoder.5", "encoder.8",
                      "encoder.9", "fc"]
    changed = layers.index(CHANGED)
    for name in ("error_barrier", "loss_barrier_mean", "loss_barrier_linear"):
        values = np.delete(data.metrics[name], changed, axis=0)  # (layer, held, split)
        assert (values == 0).all(), name
    assert np.abs(data.metrics["loss_barrier_mean"][changed]).max() > 0
    train = load_dataset("toy", split="train", side=8)
    test = load_dataset("toy", split="test", side=8)
    ref = eval_data(train, test, "cpu", 512, 64, 32, 64, 32, 0)
    alphas = data.coords["alpha"]
    for h, held in enumerate(("A", "B")):
        loss = hand_sweep(pair, held, alphas, ref)
        np.testing.assert_allclose(data.metrics["loss"][changed, h], loss, rtol=1e-5)
        np.testing.assert_allclose(data.metrics["loss_barrier_mean"][changed, h],
                                   mean_barrier(loss.T, alphas), rtol=1e-5, atol=1e-6)


def test_killed_scan_resumes_to_the_same_numbers(pair, tmp_path):
    from landscape.layerwise import LayerwiseConfig, scan
    cfg = LayerwiseConfig(refs=(pair["A"], pair["B"]), grid="0,0.5,1", granularity="block",
                          dataset="toy", data_options=("side=8",), bn_samples=64,
                          bn_batch_size=32, train_samples=32, test_samples=32)
    whole, part = str(tmp_path / "w.h5"), str(tmp_path / "p.h5")
    scan(cfg, whole, "cpu")
    scan(cfg, part, "cpu", stop_after=3)
    assert int(open_result(part).done.sum()) == 3
    scan(cfg, part, "cpu")
    first, again = open_result(whole), open_result(part)
    assert again.done.all()
    for name in first.metrics:
        np.testing.assert_array_equal(first.metrics[name], again.metrics[name])


@pytest.mark.parametrize("args, culprit", [
    (["--granularity", "neuron"], "invalid choice: 'neuron'"),
    (["--grid", "0.5:1:3"], "endpoints alpha = 0 and 1"),
])
def test_bad_inputs_exit_2_with_one_line(pair, tmp_path, args, culprit):
    out = tmp_path / "x.h5"
    code, err = run_cli(main, [pair["A"], pair["B"], "--out", str(out), *FAST, *args])
    assert code == 2 and "error: " in err[-1] and culprit in err[-1]
    assert not out.exists()


def test_different_architectures_name_the_first_mismatched_parameter(pair, tmp_path):
    out = tmp_path / "x.h5"
    code, err = run_cli(main, [pair["A"], pair["wide"], "--out", str(out), *FAST])
    assert code == 2 and "parameter 'encoder.0.weight' has shape" in err[-1]
    assert not out.exists()


def test_api_twin(pair):
    train = load_dataset("toy", split="train", side=8)
    test = load_dataset("toy", split="test", side=8)
    ds = landscape.layer_barriers(pair["a"], pair["b"], train, [0, 0.5, 1], test=test,
                                  granularity="block", device="cpu", bn_samples=64,
                                  bn_batch_size=32, train_samples=32, test_samples=32)
    assert dict(ds.sizes) == {"layer": 4, "held": 2, "alpha": 3, "split": 2}
    assert ds.attrs["analysis"] == "layerwise"
    changed = list(ds["layer"].values).index(CHANGED)
    barrier = ds["loss_barrier_mean"].values
    assert (np.delete(barrier, changed, axis=0) == 0).all()
