"""Landscape cores: grids, parameter arithmetic, planes, filter-normalised directions, BN
recalibration against torch's update_bn, barriers and CIs, and the batched (vmap) point
evaluation against the one-point-at-a-time reference (tiny random models, CPU)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.optim.swa_utils import update_bn

from landscape import geometry as G
from landscape import params as P
from landscape.barrier import barriers, linear_barrier, mean_barrier, mean_ci
from landscape.batchnorm import BatchedBN, bn_layers, recalibrate, swap_batchnorm
from landscape.network import Subject
from landscape.points import Measures, PointEvaluator, eval_data
from runs.data import load_dataset
from runs.errors import UserError
from runs.models import create_model
from runs.models.head import create_head


def tiny(seed=0, name="convnet", head=False) -> Subject:
    model = create_model(name, num_classes=4, width=0.125, seed=seed)
    dino = create_head(in_dim=model.embed_dim, out_dim=64, hidden_dim=32, bottleneck_dim=8,
                       seed=seed) if head else None
    return Subject(model.encoder, model.fc, dino)


def perturbed(subject: Subject, seed: int) -> Subject:
    """Non-default BN buffers, so keep / interpolate / recalibrate all differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in subject.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    return subject


@pytest.fixture(scope="module")
def toy():
    return load_dataset("toy", split="train", side=8), load_dataset("toy", split="test", side=8)


# --- grids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expect", [
    ("0:1:5", [0, 0.25, 0.5, 0.75, 1]), ("-1:1:3", [-1, 0, 1]), ("0,0.25,1", [0, 0.25, 1]),
    ("0.5", [0.5]), (" -0.5 : 1.5 : 2 ", [-0.5, 1.5]), ("1e-1,2", [0.1, 2])])
def test_parse_grid(spec, expect):
    np.testing.assert_allclose(G.parse_grid(spec), expect)


@pytest.mark.parametrize("spec", ["0:1", "0:1:0", "0:1:2.5", "a,b", "0,,1", "", "0:1:5:2",
                                  "0,0", "nan,1"])
def test_unparseable_grid_shows_a_valid_example(spec):
    with pytest.raises(UserError, match=r"--grid.*(e\.g\. 0:1:25|each point once)") as err:
        G.parse_grid(spec)
    assert "\n" not in str(err.value)


# --- parameter arithmetic --------------------------------------------------------------------

def test_flatten_roundtrip_and_lerp_is_exact_at_the_ends():
    a, b = tiny(0).state_dict(), tiny(1).state_dict()
    flat = P.flatten(a)
    assert flat.shape == (sum(t.numel() for t in a.values()),)
    for name, t in P.unflatten(flat, a).items():
        assert torch.equal(t, a[name])
    for alpha, end in ((0.0, a), (1.0, b)):
        for name, t in P.lerp(a, b, alpha).items():
            assert torch.equal(t, end[name] if t.is_floating_point() else a[name]), name
    mid = P.lerp(a, b, 0.25)["encoder.0.weight"]
    torch.testing.assert_close(mid, 0.75 * a["encoder.0.weight"] + 0.25 * b["encoder.0.weight"])


@pytest.mark.parametrize("name", ["convnet", "vgg11"])
def test_filter_normalised_directions(name):
    """Per-filter norms equal the weights' (Li et al.); biases and BN affine get zero."""
    params, _ = G.split_state(tiny(0, name, head=True))
    direction = P.filter_normalized(params, torch.Generator().manual_seed(3))
    assert list(direction) == list(params)
    for key, d in direction.items():
        theta = params[key]
        if theta.ndim <= 1:
            assert not d.any(), key
            continue
        torch.testing.assert_close(d.flatten(1).norm(dim=1), theta.flatten(1).norm(dim=1),
                                   rtol=1e-5, atol=1e-7, msg=key)
        assert not torch.equal(d, theta), key
    again = P.filter_normalized(params, torch.Generator().manual_seed(3), frozen=("fc.weight",))
    assert not again["fc.weight"].any()
    assert torch.equal(again["encoder.0.weight"], direction["encoder.0.weight"])  # seeded


@pytest.mark.parametrize("basis", ["lstsq", "orthonormal"])
def test_plane_anchors_sit_at_their_coordinates(basis):
    subjects = [tiny(seed) for seed in (0, 1, 2)]
    plane = G.plane(*subjects, basis=basis)
    anchors = plane.anchor_coords
    assert anchors["A"] == [0.0, 0.0] and anchors["B"] == [1.0, 0.0]
    if basis == "lstsq":
        assert anchors["C"] == [0.0, 1.0]
    else:
        assert anchors["C"][1] > 0
    coords = torch.tensor(list(anchors.values()), dtype=torch.float64)
    at = plane.params_at(coords)  # name -> (3, *shape)
    for k, subject in enumerate(subjects):
        theta, _ = G.split_state(subject)
        np.testing.assert_allclose(P.project(plane.origin, plane.directions, theta),
                                   coords[k], atol=1e-9)
        for name, t in theta.items():
            torch.testing.assert_close(at[name][k], t, rtol=1e-5, atol=1e-6)
    weights = plane.anchor_weights(coords)  # barycentric: each anchor is itself
    torch.testing.assert_close(weights, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_orthonormal_basis_preserves_distances_and_angles():
    subjects = [tiny(seed) for seed in (0, 1, 2)]
    plane = G.plane(*subjects, basis="orthonormal")
    d1, d2 = plane.directions
    assert abs(P.dot(d1, d2)) < 1e-6 * P.norm(d1) * P.norm(d2)
    assert P.norm(d2) == pytest.approx(P.norm(d1), rel=1e-6) == pytest.approx(plane.unit)
    a, b, c = (G.split_state(s)[0] for s in subjects)
    ab, ac, bc = P.subtract(b, a), P.subtract(c, a), P.subtract(c, b)
    xa, xb, xc = (np.array(plane.anchor_coords[k]) for k in "ABC")
    for vec, (x, y) in ((ab, (xa, xb)), (ac, (xa, xc)), (bc, (xb, xc))):
        assert P.norm(vec) == pytest.approx(plane.unit * np.linalg.norm(y - x), rel=1e-6)
    cos_params = P.dot(ab, ac) / (P.norm(ab) * P.norm(ac))
    cos_plane = xb @ xc / (np.linalg.norm(xb) * np.linalg.norm(xc))
    assert cos_plane == pytest.approx(cos_params, abs=1e-6)


def test_degenerate_planes_are_user_errors():
    a, b = tiny(0), tiny(1)
    for basis in ("lstsq", "orthonormal"):
        with pytest.raises(UserError, match="collinear|identical"):
            G.plane(a, b, b, basis)
        with pytest.raises(UserError, match="identical"):
            G.plane(a, a, b, basis)


# --- BatchNorm -------------------------------------------------------------------------------

def batches(n=4, size=16, side=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, side, side, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("name", ["convnet", "resnet20", "resnet18"])
def test_recalibrate_matches_update_bn(name):
    """Both our paths give torch's update_bn statistics: the reference bit for bit, the
    batched (vmap, functional BN) one to float32 rounding (atol 1e-5)."""
    data = batches(3, size=8 if name == "resnet18" else 16)
    ours, theirs = perturbed(tiny(0, name), 1), perturbed(tiny(0, name), 1)
    update_bn(data, theirs)
    recalibrate(ours.eval(), data)
    expect = dict(theirs.named_buffers())
    for key, buf in ours.named_buffers():
        assert torch.equal(buf, expect[key]), key
    assert not ours.training and all(m.momentum == 0.1 for _, m in bn_layers(ours))  # restored
    others = [perturbed(tiny(seed, name), seed) for seed in (1, 2)]
    for other in others:
        update_bn(data, other)
    stacked = {k: torch.stack([dict(m.named_parameters())[k] for m in (ours, *others)])
               for k, _ in ours.named_parameters()}
    batched = BatchedBN(swap_batchnorm(ours)).recalibrate(stacked, data)
    assert len(batched) == 2 * len(bn_layers(ours))
    for p, model in enumerate((ours, *others)):
        buffers = dict(model.named_buffers())
        for key, value in batched.items():
            torch.testing.assert_close(value[p], buffers[key], rtol=1e-5, atol=1e-5, msg=key)


# --- barriers --------------------------------------------------------------------------------

def test_barrier_formulas_on_hand_made_curves():
    alphas = np.array([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    error = np.array([0.9, 0.1, 0.2, 0.5, 0.3, 0.3, 0.95])  # outside [0, 1] ignored
    loss = np.array([9.0, 1.0, 2.0, 2.5, 3.5, 3.0, 9.0])
    assert mean_barrier(error, alphas) == pytest.approx(0.5 - 0.2)
    assert mean_barrier(loss, alphas) == pytest.approx(3.5 - 2.0)
    # chord (1 - a) 1 + a 3 = 1 + 2a: excesses 0, 0.5, 0.5, 1.0, 0 -> 1.0 at a = 0.75
    assert linear_barrier(loss, alphas) == pytest.approx(1.0)
    stacked = barriers(np.stack([loss, loss]), np.stack([error, error]), alphas)
    np.testing.assert_allclose(stacked["error_barrier"], [0.3, 0.3])
    flat = np.full(5, 0.25)  # two identical children: the path is constant
    grid = np.linspace(0, 1, 5)
    assert mean_barrier(flat, grid) == 0 and linear_barrier(flat, grid) == 0
    below = -np.sin(np.pi * grid)  # under the chord everywhere: no barrier (0 at the ends)
    assert linear_barrier(below, grid) == pytest.approx(0, abs=1e-12)
    assert mean_barrier(below, grid) == pytest.approx(0, abs=1e-12)
    with pytest.raises(UserError, match="alpha = 0 and 1"):
        mean_barrier(flat[:3], [0.1, 0.5, 0.9])


def test_mean_ci_uses_the_t_distribution():
    values = np.array([[0.1, 0.3, 0.2, 0.6], [1.0, 1.0, 1.0, 1.0]])
    ci = mean_ci(values, axis=1)
    half = stats.t.ppf(0.975, 3) * values[0].std(ddof=1) / 2
    np.testing.assert_allclose(ci["mean"], [0.3, 1.0])
    np.testing.assert_allclose(ci["ci_low"], [0.3 - half, 1.0])
    np.testing.assert_allclose(ci["ci_high"], [0.3 + half, 1.0])
    single = mean_ci(np.array([[0.4]]), axis=1)
    assert single["mean"][0] == 0.4 and math.isnan(single["ci_low"][0])


# --- batched points against the reference ----------------------------------------------------

GEOMETRIES = {
    "line": lambda s: G.line(s[0], s[1]),
    "plane": lambda s: G.plane(s[0], s[1], s[2], "orthonormal"),
    "directions": lambda s: G.random_directions(s[0], 2, seed=5),
}


@pytest.mark.parametrize("kind, mode", [("line", "keep"), ("line", "interpolate"),
                                        ("line", "recalibrate"), ("plane", "interpolate"),
                                        ("plane", "recalibrate"), ("directions", "keep"),
                                        ("directions", "recalibrate")])
def test_batched_points_agree_with_the_reference(toy, kind, mode):
    """vmap over stacked parameters (functional BN) == one point at a time (nn.BatchNorm).

    Tolerance: losses rtol 1e-4 (float32 sums in another order); errors and k-NN
    accuracies may differ by one image (a near-tie flipped by that rounding)."""
    subjects = [perturbed(tiny(seed, head=True), seed) for seed in (0, 1, 2)]
    teacher = tiny(9, head=True).eval()
    geometry = GEOMETRIES[kind](subjects)
    data = eval_data(*toy, "cpu", batch_size=64, train_samples=96, test_samples=64,
                     bn_samples=48, bn_batch_size=16)
    measures = Measures(("supervised", "distill", "knn", "norm"), knn_k=5)
    evaluator = PointEvaluator(subjects[0], geometry, mode, data, measures, teacher)
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [0.4, 0.7], [-0.5, 1.2]])[:, :geometry.num_axes]
    slow, fast = evaluator.evaluate(coords, batched=False), evaluator.evaluate(coords)
    for a, b in zip(slow, fast):
        for key in ("loss", "distill_ce", "distill_kl", "param_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(b["error"], a["error"], atol=1 / 64 + 1e-9)
        assert abs(b["knn_accuracy"] - a["knn_accuracy"]) <= 1 / 64 + 1e-9
    assert slow[0]["loss"][0] != slow[2]["loss"][0]  # the points do differ


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
def test_batched_points_agree_with_the_reference_on_cuda(toy, bf16, monkeypatch):
    """The same agreement on a GPU: fp32 (TF32 off) to rtol 1e-4; bf16 autocast to the
    precision of bf16 (rtol 2e-2 on losses), the two paths rounding differently."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    subjects = [perturbed(tiny(seed, "resnet20", head=True), seed) for seed in (0, 1)]
    data = eval_data(*toy, "cuda", batch_size=64, bn_samples=64, bn_batch_size=32)
    measures = Measures(("supervised", "distill", "knn", "norm"), knn_k=5)
    evaluator = PointEvaluator(subjects[0], G.line(*subjects).to("cuda"), "recalibrate", data,
                               measures, tiny(9, "resnet20", head=True), "cuda", bf16)
    coords = np.linspace(-0.5, 1.5, 5)[:, None]
    slow, fast = evaluator.evaluate(coords, batched=False), evaluator.evaluate(coords)
    rtol = 2e-2 if bf16 else 1e-4
    for a, b in zip(slow, fast):
        for key in ("loss", "distill_ce", "param_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=1e-4, err_msg=key)
