"""Permutation alignment (landscape/align.py): permuted networks compute the same function,
alignment undoes a random permutation exactly, weight matching's objective never drops."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import align as A
from landscape.barrier import mean_barrier
from landscape.network import Subject
from landscape.params import lerp
from runs.errors import UserError
from runs.models import MODELS, create_head, create_model
from runs.models.head import DinoNet

EXTRA = [("vgg11", {"norm": "group"}), ("vgg11", {"norm": "layer"}),
         ("vgg13", {"norm": "instance"}), ("resnet20", {"shortcut": "A"}),
         ("resnet56", {"shortcut": "A", "norm": "none"}), ("resnet20", {"norm": "none"}),
         ("resnet18", {"norm": "group"}), ("resnet20", {"norm": "group"})]
ARCHS = [(name, {}) for name in MODELS.names_now() if not name.startswith("vit")] + EXTRA


def make(name, seed=0, **options):
    """A tiny model in eval mode with random norm affines and BN statistics, so a
    permutation that misses any per-channel tensor changes the function."""
    if name == "mlp":
        options.setdefault("image_size", 16)
    model = create_model(name, width=0.25, num_classes=4, seed=seed, **options).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.weight.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
    return model


def images(count=8, seed=0):
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def assert_close(got, want):
    """Equal to 1e-5 relative to the output's scale (deep random nets reach 1e3)."""
    assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max())


@pytest.mark.parametrize("name,options", ARCHS, ids=lambda v: str(v))
def test_permuted_network_computes_the_same_function(name, options):
    model = make(name, **options)
    spec = A.permutation_spec(model)
    perm = A.random_permutation(spec, seed=3)
    permuted = A.apply_permutation(model, perm, spec)
    x = images()
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    assert not torch.equal(permuted.encoder(x), model.encoder(x))  # hidden units moved
    index = A._index(model.embed_dim, spec.axes["fc.weight"][1], perm, "cpu")
    with torch.no_grad():
        assert_close(permuted(x), model(x))
        assert_close(permuted.encoder(x), model.encoder(x)[:, index])


def test_every_permuted_tensor_keeps_its_values_and_buffers_follow():
    """Each BN's running statistics move with its weight: one index for all four."""
    model = make("convnet")
    spec = A.permutation_spec(model)
    perm = A.random_permutation(spec, seed=1)
    state = A.apply_permutation(model, perm, spec).state_dict()
    for key in ("weight", "bias", "running_mean", "running_var"):
        want = model.state_dict()[f"encoder.1.{key}"][perm["encoder.0"]]
        assert torch.equal(state[f"encoder.1.{key}"], want)


@pytest.mark.parametrize("wrap", ["dinonet", "subject"])
def test_dino_head_input_follows_the_encoder_output(wrap):
    model = make("convnet")
    head = create_head("dino_head", in_dim=model.embed_dim, out_dim=8, hidden_dim=16,
                       bottleneck_dim=4, seed=1)
    net = DinoNet(model, head) if wrap == "dinonet" else Subject(model.encoder, model.fc, head)
    spec = A.permutation_spec(net)
    permuted = A.apply_permutation(net, A.random_permutation(spec, seed=2), spec).eval()
    x = images()
    with torch.no_grad():
        want = net(x) if wrap == "dinonet" else net(x)["head"]
        got = permuted(x) if wrap == "dinonet" else permuted(x)["head"]
    assert_close(got, want)


def test_groupnorm_permutations_stay_within_groups():
    model = make("resnet18", norm="group")  # 16..128 channels: 2..16 groups of 8
    spec = A.permutation_spec(model)
    assert spec.groups["encoder.conv1"] == 2
    perm = A.random_permutation(spec, seed=0)["encoder.conv1"]
    assert set(perm[:8].tolist()) == set(range(8)) and set(perm[8:].tolist()) == set(range(8, 16))


RECOVER = [("convnet", {}), ("mlp", {}), ("vgg11", {"norm": "group"}), ("vgg11", {}),
           ("resnet20", {"shortcut": "A"}), ("resnet20", {}), ("resnet18", {})]


def path_losses(a, b, x, labels, alphas):
    """Loss along the straight line between a and b, eval mode, state (with BN buffers)
    interpolated directly."""
    losses = []
    for alpha in alphas:
        mid = copy.deepcopy(a)
        mid.load_state_dict(lerp(a.state_dict(), b.state_dict(), float(alpha)))
        with torch.no_grad():
            losses.append(F.cross_entropy(mid(x), labels).item())
    return np.array(losses)


@pytest.mark.parametrize("method", A.METHODS)
@pytest.mark.parametrize("name,options", RECOVER, ids=lambda v: str(v))
def test_alignment_undoes_a_random_permutation(method, name, options):
    a = make(name, **options)
    spec = A.permutation_spec(a)
    applied = A.random_permutation(spec, seed=7)
    b = A.apply_permutation(a, applied, spec)
    x, labels = images(16), torch.arange(16) % 4
    if method == "weights":
        found = A.weight_matching(a, b, spec, seed=0)
    else:
        found = A.activation_matching(a, b, x, spec)
    for perm in spec.sizes:
        assert torch.equal(found[perm], torch.argsort(applied[perm])), perm
    aligned, info = A.align(a, b, method=method, images=x, seed=0)
    for key, value in a.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), key
    assert info["changed"] > 0 and info["objective_after"] >= info["objective_before"]
    alphas = np.linspace(0, 1, 5)
    assert mean_barrier(path_losses(a, aligned, x, labels, alphas), alphas) == 0
    assert not torch.equal(b.state_dict()["fc.weight"], a.state_dict()["fc.weight"])


@pytest.mark.parametrize("name,options", [("convnet", {}), ("resnet20", {"shortcut": "A"}),
                                          ("vgg11", {"norm": "group"})], ids=str)
def test_weight_matching_objective_never_decreases(name, options):
    a, b = make(name, seed=0, **options), make(name, seed=1, **options)
    spec = A.permutation_spec(a)
    history = []
    perm = A.weight_matching(a, b, spec, seed=2, history=history)
    assert len(history) > len(spec.sizes)  # at least one full sweep after the start
    assert all(later >= earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] > history[0]
    direct = A.matching_objective(a, A.apply_permutation(b, perm, spec), spec)
    assert direct == pytest.approx(history[-1], rel=1e-9)
    _, info = A.align(a, b, seed=2)
    assert info["objective_before"] == pytest.approx(history[0])
    assert info["objective_after"] == pytest.approx(history[-1])
    assert info["iterations"] >= 1 and info["method"] == "weights"


def test_weight_matching_is_seeded():
    a, b = make("resnet20", seed=0), make("resnet20", seed=1)
    first, second = A.weight_matching(a, b, seed=5), A.weight_matching(a, b, seed=5)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_alignment_leaves_its_inputs_untouched():
    a, b = make("convnet", seed=0), make("convnet", seed=1)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    aligned, _ = A.align(a, b, method="activations", images=images())
    assert all(torch.equal(b.state_dict()[k], v) for k, v in before.items())
    assert aligned is not b


# ------------------------------------------------------------------ bad input

def test_different_architectures_name_the_first_mismatched_parameter():
    a = create_model("convnet", width=0.125, num_classes=4)
    b = create_model("convnet", width=0.25, num_classes=4)
    with pytest.raises(UserError, match=r"encoder\.0\.weight.*\(4, 3, 3, 3\) vs \(8, 3, 3, 3\)"):
        A.align(a, b)


def test_unsupported_architecture_lists_the_supported_ones():
    vit = create_model("vit_tiny", width=0.125, num_classes=4)
    with pytest.raises(UserError, match="alignment does not support.*supported: convnet.*resnet18"):
        A.align(vit, vit)


def test_option_a_stream_with_groupnorm_groups_is_refused():
    model = create_model("resnet20", shortcut="A", norm="group", num_classes=4)
    with pytest.raises(UserError, match="option-A.*shortcut=projection"):
        A.permutation_spec(model)


@pytest.mark.parametrize("call,match", [
    (lambda a, b: A.align(a, b, method="greedy"), "valid: activations, weights"),
    (lambda a, b: A.align(a, b, method="activations"), "needs images"),
    (lambda a, b: A.align(a, b, max_iter=0), "max_iter must be at least 1"),
    (lambda a, b: A.apply_permutation(b, {"encoder.0": torch.zeros(4, dtype=torch.long)}),
     "keys do not match"),
])
def test_bad_arguments_are_one_line_errors(call, match):
    a, b = make("convnet", seed=0), make("convnet", seed=1)
    with pytest.raises(UserError, match=match) as err:
        call(a, b)
    assert "\n" not in str(err.value)


def test_a_non_permutation_is_refused():
    model = make("convnet")
    spec = A.permutation_spec(model)
    perm = A.identity(spec)
    perm["encoder.0"] = torch.zeros_like(perm["encoder.0"])
    with pytest.raises(UserError, match="encoder.0: expected a permutation of 0..7"):
        A.apply_permutation(model, perm, spec)
