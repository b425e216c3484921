"""REPAIR (landscape/repair.py): the interpolated network's channels get the alpha-mix of
A's and B's statistics; at alpha 0 on A itself nothing changes."""

import copy

import pytest
import torch

from landscape import align as A
from landscape.params import lerp
from landscape.repair import channel_stats, repair
from runs.errors import UserError
from tests.test_align import images, make


def between(a, b, alpha):
    mid = copy.deepcopy(a)
    mid.load_state_dict(lerp(a.state_dict(), b.state_dict(), alpha))
    return mid


def targets(a, b, alpha, x, spec):
    sa, sb = channel_stats(a, x, spec), channel_stats(b, x, spec)
    return {site: [torch.lerp(p, q, alpha) for p, q in zip(sa[site], sb[site])] for site in sa}


@pytest.mark.parametrize("name,options", [("vgg11", {}), ("mlp", {}), ("convnet", {}),
                                          ("resnet20", {"shortcut": "A"}), ("resnet18", {})],
                         ids=str)
def test_repaired_channels_have_the_mixed_statistics(name, options):
    a = make(name, seed=0, **options)
    b, _ = A.align(a, make(name, seed=1, **options))
    spec, x, alpha = A.permutation_spec(a), images(32), 0.3
    mid = between(a, b, alpha)
    want = targets(a, b, alpha, x, spec)
    before = channel_stats(mid, x, spec)
    fixed = repair(mid, a, b, alpha, x)
    got = channel_stats(fixed, x, spec)
    assert any(not torch.allclose(before[s][1], want[s][1], rtol=1e-2) for s in want)
    for site, (mean, std) in want.items():
        scale = 1e-5 * (1 + std.max())
        assert (got[site][0] - mean).abs().max() <= scale, site
        assert (got[site][1] - std).abs().max() <= scale, site


def test_repair_at_alpha_zero_leaves_a_unchanged():
    a, b = make("vgg11", seed=0), make("vgg11", seed=1)
    x = images(16)
    fixed = repair(copy.deepcopy(a), a, b, 0.0, x)
    with torch.no_grad():
        want = a(x)
        assert (fixed(x) - want).abs().max() <= 1e-5 * (1 + want.abs().max())
        other = images(16, seed=1)  # the same function, not only on the images it saw
        assert (fixed(other) - a(other)).abs().max() <= 1e-5 * (1 + a(other).abs().max())


def test_repair_leaves_its_inputs_untouched():
    a, b = make("convnet", seed=0), make("convnet", seed=1)
    mid = between(a, b, 0.5)
    state = {k: v.clone() for k, v in mid.state_dict().items()}
    fixed = repair(mid, a, b, 0.5, images())
    assert all(torch.equal(mid.state_dict()[k], v) for k, v in state.items())
    assert not torch.equal(fixed.state_dict()["encoder.1.weight"], state["encoder.1.weight"])


def test_repair_refuses_bad_input():
    a = make("convnet")
    with pytest.raises(UserError, match="repair needs images"):
        repair(a, a, a, 0.5, None)
    with pytest.raises(UserError, match="alpha must be a finite"):
        repair(a, a, a, float("nan"), images())
    with pytest.raises(UserError, match="different architectures"):
        repair(a, a, make("mlp"), 0.5, images())
