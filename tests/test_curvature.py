"""landscape.curvature: Hessian-vector products, Lanczos top-k, Hutchinson's trace and
stochastic Lanczos quadrature against dense Hessians and known spectra (issue #20)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from landscape import curvature as C
from runs.errors import UserError


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


class TinyConvBN(nn.Module):
    """conv -> BN -> ReLU -> pool -> fc, the BN holding trained running statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(12, 3)
        with torch.no_grad():  # running statistics unlike one batch's: eval mode matters
            self.train()
            for _ in range(3):
                self(torch.randn(16, 1, 6, 6) * 2 + 1)

    def forward(self, x):
        return self.fc(self.encoder(x))


def data(model: nn.Module, count: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (count, 6) if isinstance(model, nn.Sequential) else (count, 1, 6, 6)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (count,), generator=g)


def batched(x, y, sizes):
    cuts = np.cumsum([0, *sizes])
    return [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def dense_hessian(model, op, x, y) -> torch.Tensor:
    """The Hessian of the mean CE over (x, y), by torch.autograd.functional.hessian, in
    float64 (a double copy of the model)."""
    model, x = copy.deepcopy(model).double().eval(), x.double()
    params = dict(model.named_parameters())
    fixed = {**{n: p.detach() for n, p in params.items() if n not in op.names},
             **dict(model.named_buffers())}
    sizes = [params[n].numel() for n in op.names]

    def loss(flat):
        chosen = {n: p.view(params[n].shape) for n, p in zip(op.names, flat.split(sizes))}
        out = functional_call(model, {**fixed, **chosen}, (x,))
        return C.supervised_loss(out, y) / len(y)
    return torch.autograd.functional.hessian(loss, op.point.double().clone()).double()


def known(eigenvalues, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with the given spectrum and a random eigenbasis."""
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g,
                                       dtype=torch.float64))
    return (q * values) @ q.T


@pytest.fixture(params=["mlp", "convnet-bn"])
def case(request):
    model = tiny_mlp() if request.param == "mlp" else TinyConvBN()
    x, y = data(model)
    op = C.hessian_operator(model, C.supervised_loss, batched(x, y, [15, 25]))
    return model, op, dense_hessian(model, op, x, y)


# ---------------------------------------------------------------------------- products


def test_products_equal_the_dense_hessian_whatever_the_batches_or_method(case):
    model, op, dense = case
    x, y = data(model)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(3))
    expected = dense @ v.double()
    for sizes in ([40], [1, 39], [7, 7, 26]):
        for method in C.METHODS:
            hv = C.hessian_operator(model, C.supervised_loss, batched(x, y, sizes),
                                    method=method)(v)
            assert torch.allclose(hv.double(), expected, rtol=1e-4, atol=1e-6), (sizes, method)
    assert not model.training  # BN in eval mode: its running statistics


def test_bn_uses_the_checkpoints_running_statistics():
    model = TinyConvBN()
    x, y = data(model)
    op = C.hessian_operator(model, C.supervised_loss, [(x, y)])
    model.encoder[1].running_mean.add_(1.0)  # other statistics: another Hessian
    moved = C.hessian_operator(model, C.supervised_loss, [(x, y)])
    v = torch.ones(op.size)
    assert not torch.allclose(op(v), moved(v), atol=1e-5)


# ---------------------------------------------------------------------------- top-k


def test_top_eigenvalues_equal_the_dense_hessians(case):
    _, op, dense = case
    exact = torch.linalg.eigvalsh(dense).flip(0)[:5].numpy()
    found = C.top_eigen(op, 5, tol=1e-7, max_steps=op.size)
    assert np.allclose(found.values, exact, rtol=1e-4, atol=1e-7 * abs(exact[0])), \
        (found.values, exact)
    for value, vector in zip(found.values, found.vectors):  # H x = theta x, unit x
        hx = dense @ vector.double()
        assert abs(float(vector.norm()) - 1) < 1e-5
        assert float((hx - value * vector.double()).norm()) <= 1e-3 * abs(exact[0])


def test_a_known_spectrum_is_recovered_with_its_multiplicities():
    spectrum = [30.0, 30.0, 12.5, 7.0, *np.linspace(-2.0, 3.0, 36)]
    op = C.matrix_operator(known(spectrum))
    found = C.top_eigen(op, 4)
    assert np.allclose(found.values, [30.0, 30.0, 12.5, 7.0], rtol=1e-5)
    assert found.steps < op.size  # stopped on the residuals, not by exhausting the space
    pair = found.vectors[:2].double()
    assert torch.allclose(pair @ pair.T, torch.eye(2, dtype=torch.float64), atol=1e-5)


def test_a_rank_deficient_hessian_restarts_lanczos_and_finds_every_eigenvalue():
    """Three distinct eigenvalues in 12 dimensions: the Krylov space is exhausted after three
    steps; Lanczos continues from fresh vectors and still returns the spectrum's top six."""
    spectrum = [5.0] * 3 + [2.0] * 4 + [0.0] * 5
    found = C.top_eigen(C.matrix_operator(known(spectrum, seed=2)), 6, max_steps=12)
    assert np.allclose(found.values, [5, 5, 5, 2, 2, 2], atol=1e-5)


# ---------------------------------------------------------------------------- trace


def test_hutchinson_is_within_three_standard_errors_of_the_exact_trace(case):
    _, op, dense = case
    trace = C.hutchinson(op, tol=0.1, min_probes=30, max_probes=300, seed=1)
    exact = float(torch.trace(dense))
    assert trace.se > 0 and abs(trace.value - exact) <= 3 * trace.se, (trace.value, exact)
    assert trace.se <= 0.1 * abs(trace.value) or len(trace.samples) == 300


def test_group_traces_sum_to_the_total_and_each_estimates_its_block(case):
    _, op, dense = case
    trace = C.hutchinson(op, tol=1e-9, min_probes=150, max_probes=150, seed=2)
    assert math.isclose(sum(trace.groups.values()), trace.value, rel_tol=1e-9, abs_tol=1e-12)
    assert np.allclose(trace.group_samples.sum(1), trace.samples)
    for i, (name, a, b) in enumerate(op.groups):
        column = trace.group_samples[:, i]
        se = column.std(ddof=1) / math.sqrt(len(column))
        exact = float(torch.trace(dense[a:b, a:b]))
        assert abs(trace.groups[name] - exact) <= 3 * se + 1e-9, (name, trace.groups[name], exact)


def test_hutchinson_stops_at_the_tolerance_and_is_exact_without_off_diagonals():
    """A diagonal Hessian: every Rademacher probe gives the trace, the SE is 0 and the
    estimate stops at min_probes; a full one needs more probes for a tighter tolerance."""
    diagonal = C.hutchinson(C.matrix_operator(torch.diag(torch.arange(1.0, 11.0))),
                            tol=1e-6, min_probes=4)
    assert diagonal.value == pytest.approx(55.0) and diagonal.se == 0
    assert len(diagonal.samples) == 4
    op = C.matrix_operator(known(np.linspace(1, 4, 30)))
    loose, tight = (C.hutchinson(op, tol=tol, max_probes=5000) for tol in (0.05, 0.01))
    assert len(tight.samples) > len(loose.samples)
    assert tight.se <= 0.01 * abs(tight.value)


def test_per_group_top_eigenvalues_are_the_blocks(case):
    _, op, dense = case
    tops = C.group_top(op, tol=1e-7, max_steps=200)
    assert list(tops) == [name for name, _, _ in op.groups]
    for name, a, b in op.groups:
        exact = float(torch.linalg.eigvalsh(dense[a:b, a:b])[-1])
        assert tops[name] == pytest.approx(exact, rel=1e-4, abs=1e-7), name


# ---------------------------------------------------------------------------- density


def test_slq_density_integrates_to_one_and_its_mean_is_trace_over_n(case):
    _, op, dense = case
    quad = C.slq(op, runs=24, steps=12, seed=0)
    assert np.allclose(quad.weights.sum(1), 1.0, atol=1e-5)
    grid = C.density_grid(quad, points=4001)
    density = C.density_on(quad, grid)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-9)
    assert np.trapezoid(density * grid, grid) == pytest.approx(quad.mean(), rel=1e-3, abs=1e-6)
    per_run = (quad.nodes * quad.weights).sum(1)  # each run's v^T H v
    se = per_run.std(ddof=1) / math.sqrt(len(per_run))
    assert abs(quad.mean() - float(torch.trace(dense)) / op.size) <= 3 * se


def test_slq_on_a_known_spectrum_puts_its_nodes_on_the_eigenvalues():
    """Full Lanczos on three distinct eigenvalues: the quadrature is exact, its nodes the
    eigenvalues and its weights the fractions of the start vector in each eigenspace."""
    spectrum = [4.0] * 10 + [1.0] * 20 + [-1.0] * 10
    quad = C.slq(C.matrix_operator(known(spectrum)), runs=30, steps=3)
    assert np.allclose(np.sort(quad.nodes, 1), [[-1.0, 1.0, 4.0]] * 30, atol=1e-4)
    weights = np.take_along_axis(quad.weights, np.argsort(-quad.nodes, 1), 1)  # 4, 1, -1
    assert np.allclose(weights.mean(0), [0.25, 0.5, 0.25], atol=0.08)
    assert quad.mean() == pytest.approx(np.mean(spectrum), abs=0.15)


# ---------------------------------------------------------------------------- subsets


def test_parameter_selection_and_a_masked_hessian_are_the_dense_blocks():
    model = TinyConvBN()
    x, y = data(model)
    full = C.hessian_operator(model, C.supervised_loss, [(x, y)])
    dense = dense_hessian(model, full, x, y)
    fc = C.hessian_operator(model, C.supervised_loss, [(x, y)], params="fc")
    assert fc.names == ["fc.weight", "fc.bias"] and fc.size == 39
    start = full.size - fc.size
    v = torch.randn(fc.size)
    assert torch.allclose(fc(v).double(), dense[start:, start:] @ v.double(), atol=1e-5)
    encoder = C.hessian_operator(model, C.supervised_loss, [(x, y)], params="encoder")
    assert encoder.size == start and [g[0] for g in encoder.groups] == ["encoder.0", "encoder.1"]
    keep = torch.rand(full.size, generator=torch.Generator().manual_seed(0)) < 0.6
    masked = C.masked_operator(full, keep)
    index = keep.nonzero().squeeze(1)
    block = dense[index][:, index]
    assert masked.size == int(keep.sum())
    assert C.top_eigen(masked, 2, tol=1e-7, max_steps=masked.size).values == pytest.approx(
        torch.linalg.eigvalsh(block).flip(0)[:2].numpy(), rel=1e-4)
    assert sum(b - a for _, a, b in masked.groups) == masked.size


# ---------------------------------------------------------------------------- bad input


def test_bad_requests_are_one_line_naming_the_flag():
    op = C.matrix_operator(known([1.0, 2.0, 3.0]))
    with pytest.raises(UserError, match=r"^--top-k 4: must lie in 1\.\.3"):
        C.top_eigen(op, 4)
    with pytest.raises(UserError, match=r"^--eigen-tol 0"):
        C.top_eigen(op, 1, tol=0)
    with pytest.raises(UserError, match=r"^--trace-tol -0\.1"):
        C.hutchinson(op, tol=-0.1)
    with pytest.raises(UserError, match="--params 'head'"):
        C.select_parameters(tiny_mlp(), "head")
    with pytest.raises(UserError, match="--hvp 'reverse'"):
        C.hessian_operator(tiny_mlp(), C.supervised_loss, [data(tiny_mlp())], method="reverse")


def test_a_nan_loss_names_the_checkpoint():
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    op = C.hessian_operator(model, C.supervised_loss, [data(model)])
    with pytest.raises(UserError, match=r"^student s0 ep15: the loss is nan at this point"):
        C.check_finite_loss(op, "student s0 ep15")


def test_the_distillation_hessian_is_positive_semidefinite_at_the_teacher_itself():
    """H(t, s) is minimal at s = t: the head's Hessian there is the softmax's Fisher
    information, positive semidefinite and not zero."""
    torch.manual_seed(0)
    head = nn.Linear(5, 4, bias=False)
    x = torch.randn(30, 5)
    targets = C.teacher_targets(head, [x])
    op = C.hessian_operator(head, C.distillation_loss(), [(x, targets[0])])
    values = torch.linalg.eigvalsh(torch.stack([op(e) for e in torch.eye(op.size)]).double())
    assert values.min() > -1e-6 and values.max() > 1e-3
