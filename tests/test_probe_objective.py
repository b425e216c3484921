"""probes.logistic's L-BFGS objective: the hand-written gradient (softmax - one-hot, logits
laid out classes-first) is autograd's through F.cross_entropy (issue #22's speed-up)."""

import torch
import torch.nn.functional as F

from probes.logistic import _objective


def test_hand_written_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 4, (50,), generator=g)
    weight, bias, l2 = torch.randn(6, 4, generator=g), torch.randn(4, generator=g), 0.3
    loss = _objective(weight, bias, x, y, l2)()
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    expected = F.cross_entropy(x @ w + b, y) + l2 / 2 * w.pow(2).sum()
    expected.backward()
    assert torch.allclose(loss, expected.detach(), rtol=1e-6)
    assert torch.allclose(weight.grad, w.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(bias.grad, b.grad, rtol=1e-5, atol=1e-7)
