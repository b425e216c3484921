"""The Hessian-vector product method `auto` (landscape.curvature's default, issue #22):
forward-over-reverse on CUDA, double backward on CPUs, the same products either way."""

import pytest
import torch
from torch import nn

from landscape import curvature as C
from runs.errors import UserError


def test_auto_is_double_backward_on_cpus_and_jvp_on_cuda():
    assert C.resolve_method("auto", "cpu") == "double-backward"
    assert C.resolve_method("auto", torch.device("cuda", 1)) == "jvp"
    for method in ("jvp", "double-backward"):
        assert C.resolve_method(method, "cpu") == method == C.resolve_method(method, "cuda")
    with pytest.raises(UserError, match=r"^--hvp 'fwd': choose one of auto, jvp, "):
        C.resolve_method("fwd", "cpu")


def test_the_default_operator_gives_the_jvp_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(9, 5, generator=g), torch.randint(0, 3, (9,), generator=g))]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    default = C.hessian_operator(model, C.supervised_loss, batches)(v)
    jvp = C.hessian_operator(model, C.supervised_loss, batches, method="jvp")(v)
    assert torch.allclose(default, jvp, rtol=1e-5, atol=1e-7)
