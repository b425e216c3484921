"""Curvature of a loss at one point of parameter space, from Hessian-vector products.

A `HessianOperator` is the Hessian of a mean loss over a fixed set of batches as a linear
map on a flat parameter vector: `op(v)` is H v, the products taken forward-over-reverse
(`torch.func.jvp` of `torch.func.grad`) on CUDA and by double backward on CPUs (the faster
there; `resolve_method`), one batch at a time, and summed in float64, so the
result does not depend on how the data is cut into batches. Every algorithm below takes any
operator (`matrix_operator` wraps a dense symmetric matrix, as the tests' known spectra):

- `top_eigen`: the k largest (algebraic) eigenvalues and their eigenvectors by Lanczos with
  full reorthogonalisation, stopped when the Ritz residuals fall under `tol`;
- `hutchinson`: the trace with Rademacher probes, its standard error, stopped at a relative
  tolerance; per parameter group from the same probes (the groups' estimates sum to the
  total's exactly);
- `slq`: stochastic Lanczos quadrature, nodes and weights per random start, and
  `density_on` turns them into a density on a grid of eigenvalues (Gaussian kernels);
- `group_top`: the top eigenvalue of each group's diagonal block.

BatchNorm layers run in eval mode with the module's own running statistics (a point from an
interpolation is recalibrated by its caller first). Parameters not selected are constants.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from runs.errors import UserError

PARAMETERS = ("all", "encoder", "fc")
METHODS = ("auto", "jvp", "double-backward")


# ---------------------------------------------------------------------------- operators


@dataclass
class HessianOperator:
    """v (n,) -> H v (n,) in float32; groups: (name, start, stop) blocks of the vector."""
    size: int
    matvec: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device = torch.device("cpu")
    groups: list[tuple[str, int, int]] = field(default_factory=list)
    products: int = 0  # Hessian-vector products taken so far

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.matvec(v)

    def block(self, name: str) -> "HessianOperator":
        """The diagonal block of one group, as an operator on that group's entries."""
        start, stop = next((a, b) for n, a, b in self.groups if n == name)

        def matvec(v):
            full = torch.zeros(self.size, dtype=v.dtype, device=v.device)
            full[start:stop] = v
            return self(full)[start:stop]
        return HessianOperator(stop - start, matvec, self.device, [(name, 0, stop - start)])


def masked_operator(op: HessianOperator, keep: torch.Tensor) -> HessianOperator:
    """The Hessian restricted to the entries where `keep` (n,) is true (a ticket's surviving
    weights): v -> m * H (m * v), an operator on those entries only, groups kept."""
    index = keep.reshape(-1).nonzero().squeeze(1).to(op.device)
    starts = [(name, int((index < a).sum()), int((index < b).sum())) for name, a, b in op.groups]

    def matvec(v):
        full = torch.zeros(op.size, dtype=v.dtype, device=v.device)
        full[index] = v
        return op(full)[index]
    masked = HessianOperator(len(index), matvec, op.device, [g for g in starts if g[2] > g[1]])
    masked.loss = getattr(op, "loss", None)
    return masked


def matrix_operator(matrix: torch.Tensor, groups=()) -> HessianOperator:
    """A dense symmetric matrix as an operator (tests, known spectra)."""
    matrix = matrix.float()
    return HessianOperator(len(matrix), lambda v: matrix @ v.to(matrix.dtype), matrix.device,
                           list(groups) or [("all", 0, len(matrix))])


def select_parameters(module: nn.Module, which: str | Sequence[str] = "all") -> list[str]:
    """The names of the parameters a Hessian is taken over.

    which: "all", "encoder" (names under `encoder.`), "fc" (names under `fc.`), or an explicit
    list of parameter names. Parameters with requires_grad=False are never selected.
    """
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if not isinstance(which, str):
        missing = sorted(set(which) - set(names))
        if missing:
            raise UserError(f"parameters {', '.join(missing[:3])}: not trainable parameters "
                            f"of the network")
        return [n for n in names if n in set(which)]
    if which not in PARAMETERS:
        raise UserError(f"--params {which!r}: choose one of {', '.join(PARAMETERS)}")
    chosen = names if which == "all" else [n for n in names if n.startswith(f"{which}.")]
    if not chosen:
        raise UserError(f"--params {which}: the network has no {which} parameters "
                        f"(it has {', '.join(sorted({n.split('.')[0] for n in names}))})")
    return chosen


def parameter_groups(names: Sequence[str], shapes: Sequence[torch.Size]) -> list[tuple]:
    """(module name, start, stop) per module: a layer's weight and bias are one group."""
    groups, start = [], 0
    for name, shape in zip(names, shapes):
        owner = name.rsplit(".", 1)[0] if "." in name else name
        stop = start + math.prod(shape)
        if groups and groups[-1][0] == owner and groups[-1][2] == start:
            groups[-1] = (owner, groups[-1][1], stop)
        else:
            groups.append((owner, start, stop))
        start = stop
    return groups


def resolve_method(method: str, device) -> str:
    """The HVP method `auto` stands for on `device`: "jvp" (forward-over-reverse) on CUDA,
    "double-backward" on CPUs, where it ran 1.17x (resnet20) to 1.46x (vit_tiny) faster
    on 2 threads, 1.3x in runs.bench's curvature section (ResNet18/4; 2026-12-02). Named
    methods pass through."""
    if method not in METHODS:
        raise UserError(f"--hvp {method!r}: choose one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    return "jvp" if torch.device(device).type == "cuda" else "double-backward"


def hessian_operator(module: nn.Module, loss: Callable, batches: Sequence[tuple],
                     params: str | Sequence[str] = "all", method: str = "auto",
                     autocast: Callable = None) -> HessianOperator:
    """The Hessian of the mean of `loss` over `batches`, w.r.t. the selected parameters.

    loss(outputs, target) -> the loss summed over the batch (a scalar); batches: (inputs,
    target) pairs already on the module's device, the mean taken over all their rows.
    method: "jvp" (forward-over-reverse), "double-backward" (autograd.grad of g.v, the
    plain reference) or "auto" (`resolve_method`: the faster one on the parameters'
    device; both give H v to fp32 rounding). autocast: a context-manager factory around
    the forward (bf16). The module is put in eval mode (BatchNorm uses its running
    statistics) and left so.
    """
    module.eval()
    names = select_parameters(module, params)
    state = dict(module.named_parameters())
    # a snapshot: the operator stays the Hessian at this point when the module changes later
    fixed = {**{n: p.detach().clone() for n, p in state.items() if n not in set(names)},
             **{n: b.clone() for n, b in module.named_buffers()}}
    shapes = [state[n].shape for n in names]
    point = torch.cat([state[n].detach().reshape(-1).float() for n in names])
    method = resolve_method(method, point.device)
    count = sum(len(target) for _, target in batches)
    if count == 0:
        raise UserError("the Hessian needs at least one sample")
    total = _batch_loss(module, loss, names, shapes, fixed, autocast)
    product = _jvp_product if method == "jvp" else _double_backward_product

    def matvec(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(point), dtype=torch.float64, device=point.device)
        for inputs, target in batches:
            out += product(total, point, v.to(point), inputs, target).double()
        return (out / count).float()
    op = HessianOperator(len(point), matvec, point.device, parameter_groups(names, shapes))
    op.point, op.names, op.count = point, names, count
    op.loss = lambda: float(sum(total(point, x, t).double() for x, t in batches) / count)
    return op


def _batch_loss(module, loss, names, shapes, fixed, autocast):
    """flat parameters, inputs, target -> the summed loss of one batch."""
    sizes = [math.prod(s) for s in shapes]

    def total(flat, inputs, target):
        params = {n: p.view(s) for n, p, s in zip(names, flat.split(sizes), shapes)}
        if autocast is None:
            return loss(functional_call(module, {**fixed, **params}, (inputs,)), target)
        with autocast():
            out = functional_call(module, {**fixed, **params}, (inputs,))
        return loss(_as_float(out), target)
    return total


def _as_float(out):
    if isinstance(out, dict):
        return {k: v.float() for k, v in out.items()}
    return out.float()


def _jvp_product(total, point, v, inputs, target):
    return jvp(lambda p: grad(total)(p, inputs, target), (point,), (v,))[1]


def _double_backward_product(total, point, v, inputs, target):
    p = point.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(total(p, inputs, target), p, create_graph=True)
    (hv,) = torch.autograd.grad(g, p, grad_outputs=v)
    return hv


# ---------------------------------------------------------------------------- losses


def supervised_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch; outputs: logits (B, K) or {"logits": ...}."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def distillation_loss(student_temp: float = 1.0) -> Callable:
    """H(t, s) summed over the batch, against a teacher's probabilities as the target.

    Its Hessian is that of KL(t || s): the two differ by the teacher's entropy, a constant.
    outputs: head logits (B, m) or {"head": ...}; target: teacher probabilities (B, m).
    """
    def loss(outputs, teacher_probs):
        head = outputs["head"] if isinstance(outputs, dict) else outputs
        return -(teacher_probs * F.log_softmax(head.float() / student_temp, -1)).sum()
    return loss


def teacher_targets(teacher: Callable, batches: Iterable[torch.Tensor],
                    teacher_temp: float = 1.0) -> list[torch.Tensor]:
    """softmax(teacher head / temperature) (B, m) of each image batch, computed once."""
    with torch.no_grad():
        return [F.softmax(_head(teacher(x)).float() / teacher_temp, -1) for x in batches]


def _head(out):
    return out["head"] if isinstance(out, dict) else out


# ---------------------------------------------------------------------------- Lanczos


@dataclass
class Lanczos:
    alpha: np.ndarray  # (m,) diagonal of the tridiagonal T
    beta: np.ndarray  # (m - 1,) off-diagonal (0 where a new start was drawn)
    basis: torch.Tensor | None  # (m, n) orthonormal Lanczos vectors
    residual: float = 0.0  # ||w|| after the last step: the Ritz residuals' scale

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of T."""
        from scipy.linalg import eigh_tridiagonal
        if len(self.alpha) == 1:
            return self.alpha.copy(), np.ones((1, 1))
        return eigh_tridiagonal(self.alpha, self.beta)

    def top(self, k: int):
        """The k largest Ritz values, their residual bounds |residual x s_mi|, and the
        eigenvectors of T (m, k), largest first."""
        theta, s = self.ritz()
        order = np.argsort(theta)[::-1][:k]
        return theta[order], np.abs(self.residual * s[-1, order]), s[:, order]


def _random_unit(n: int, generator: torch.Generator, device, rademacher=True) -> torch.Tensor:
    if rademacher:
        v = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    else:
        v = torch.randn(n, generator=generator)
    return (v / v.norm()).to(device)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the rows of `basis`, twice (classical Gram-Schmidt x 2)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos(op: HessianOperator, steps: int, generator: torch.Generator,
            keep_basis: bool = True, stop: Callable = None) -> Lanczos:
    """`steps` Lanczos iterations from a random unit start, fully reorthogonalised.

    An exhausted Krylov space (beta ~ 0) continues from a fresh random vector orthogonal to
    the basis (its beta recorded as 0), so repeated eigenvalues are found with their
    multiplicity. stop(lanczos_so_far) -> True ends early (asked every 5 steps).
    """
    steps = min(steps, op.size)
    basis = torch.zeros(steps, op.size, device=op.device)
    alpha, beta = [], []
    v = _random_unit(op.size, generator, op.device)
    for j in range(steps):
        basis[j] = v
        w = op(v).float()
        alpha.append(float(w @ v))
        w = _orthogonalise(w, basis[:j + 1])
        b = float(w.norm()) if j + 1 < op.size else 0.0
        partial = Lanczos(np.array(alpha), np.array(beta), basis[:j + 1], b)
        if j == steps - 1 or (stop is not None and (j + 1) % 5 == 0 and stop(partial)):
            break
        if b <= 1e-6 * max(1.0, abs(alpha[-1]), *(abs(x) for x in beta)):
            w = _fresh(op, basis[:j + 1], generator)  # an invariant subspace: start afresh
            v, b = w / w.norm(), 0.0
        else:
            v = w / b
        beta.append(b)
    if not keep_basis:
        partial.basis = None
    return partial


def _fresh(op, basis, generator) -> torch.Tensor:
    for _ in range(10):
        w = _orthogonalise(_random_unit(op.size, generator, op.device, rademacher=False), basis)
        if w.norm() > 1e-3:
            return w
    raise RuntimeError("Lanczos could not extend an exhausted Krylov space")


# ---------------------------------------------------------------------------- top-k


@dataclass
class Eigen:
    values: np.ndarray  # (k,) descending
    vectors: torch.Tensor | None  # (k, n) unit rows
    residuals: np.ndarray  # (k,) bounds on ||H x - theta x|| of each pair
    steps: int  # Lanczos iterations (= Hessian-vector products)


def check_k(k: int, size: int, flag: str = "--top-k") -> None:
    if not 1 <= k <= size:
        raise UserError(f"{flag} {k}: must lie in 1..{size} (the number of parameters "
                        f"the Hessian is taken over)")


def top_eigen(op: HessianOperator, k: int = 1, tol: float = 1e-5, max_steps: int = 0,
              seed: int = 0, vectors: bool = True) -> Eigen:
    """The k largest eigenvalues of `op` (descending) and their unit eigenvectors.

    Lanczos runs until every top-k Ritz residual is at most tol x |its eigenvalue| (asked
    every 5 steps), for max_steps (0 = max(3k + 30, 60)) steps, or for the dimension.
    """
    check_k(k, op.size)
    if not tol > 0:
        raise UserError(f"--eigen-tol {tol}: must be a positive number")
    max_steps = min(op.size, max_steps or max(3 * k + 30, 60))

    def converged(run: Lanczos) -> bool:
        if len(run.alpha) < k + 2:
            return False
        values, residuals, _ = run.top(k)
        return bool(np.all(residuals <= tol * np.maximum(np.abs(values), 1e-12)))
    run = lanczos(op, max_steps, torch.Generator().manual_seed(seed), stop=converged)
    values, residuals, s = run.top(k)
    vecs = None
    if vectors:
        vecs = torch.from_numpy(s.T.copy()).float().to(op.device) @ run.basis  # (k, n)
        vecs = vecs / vecs.norm(dim=1, keepdim=True)
    return Eigen(values, vecs, residuals, len(run.alpha))


# ---------------------------------------------------------------------------- trace


@dataclass
class Trace:
    value: float  # the mean of the probes' estimates
    se: float  # its standard error (nan with one probe)
    samples: np.ndarray  # (probes,) z^T H z per probe
    groups: dict[str, float]  # group -> its block's trace estimate (sums to value)
    group_samples: np.ndarray  # (probes, groups)


def hutchinson(op: HessianOperator, tol: float = 1e-2, min_probes: int = 10,
               max_probes: int = 1000, seed: int = 0) -> Trace:
    """tr(H) by Hutchinson: the mean of z^T H z over Rademacher probes z.

    Probes are drawn until the standard error is at most tol x |mean| (after min_probes) or
    max_probes are taken. The same products give each group's diagonal-block trace:
    z_g^T (H z)_g, whose sum over groups is z^T H z.
    """
    if not tol > 0:
        raise UserError(f"--trace-tol {tol}: must be a positive number (a relative standard "
                        f"error, e.g. 0.01)")
    if not 1 <= min_probes <= max_probes:
        raise UserError(f"--trace-probes {min_probes}..{max_probes}: need 1 <= min <= max")
    generator = torch.Generator().manual_seed(seed)
    groups = op.groups or [("all", 0, op.size)]
    rows = []
    while len(rows) < max_probes:
        z = (torch.randint(0, 2, (op.size,), generator=generator).float() * 2 - 1).to(op.device)
        hz = op(z).double() * z.double()
        rows.append([float(hz[a:b].sum()) for _, a, b in groups])
        if len(rows) >= min_probes and _relative_se(rows) <= tol:
            break
    per_group = np.array(rows)  # (probes, groups)
    samples = per_group.sum(1)
    se = float(samples.std(ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.nan
    return Trace(float(samples.mean()), se, samples,
                 {name: float(per_group[:, i].mean()) for i, (name, _, _) in enumerate(groups)},
                 per_group)


def _relative_se(rows) -> float:
    samples = np.array(rows).sum(1)
    se = samples.std(ddof=1) / math.sqrt(len(samples))
    return float(se / max(abs(samples.mean()), 1e-30))


# ---------------------------------------------------------------------------- density


@dataclass
class Quadrature:
    nodes: np.ndarray  # (runs, steps) Ritz values of each random start
    weights: np.ndarray  # (runs, steps) squared first components; each row sums to 1

    def mean(self) -> float:
        """The density's first moment: tr(H) / n in expectation."""
        return float((self.nodes * self.weights).sum(1).mean())


def slq(op: HessianOperator, runs: int = 3, steps: int = 80, seed: int = 0) -> Quadrature:
    """Stochastic Lanczos quadrature: `runs` Lanczos runs of `steps` from random starts."""
    if runs < 1 or steps < 1:
        raise UserError(f"--slq-runs {runs}, --slq-steps {steps}: both must be at least 1")
    steps = min(steps, op.size)
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = np.zeros((runs, steps)), np.zeros((runs, steps))
    for r in range(runs):
        run = lanczos(op, steps, generator, keep_basis=False)
        theta, s = run.ritz()
        nodes[r, :len(theta)], weights[r, :len(theta)] = theta, s[0] ** 2
    return Quadrature(nodes, weights)


def density_grid(quadrature: Quadrature, points: int = 1001, pad: float = 0.05) -> np.ndarray:
    """An eigenvalue grid spanning the nodes, widened by `pad` of their range each side."""
    lo, hi = float(quadrature.nodes.min()), float(quadrature.nodes.max())
    width = max(hi - lo, 1e-12)
    return np.linspace(lo - pad * width, hi + pad * width, points)


def density_on(quadrature: Quadrature, grid: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """The spectral density on `grid`: Gaussian kernels of width sigma (0 = 2 grid steps)
    at the nodes, weighted, averaged over runs; normalised to integrate to 1 on the grid."""
    grid = np.asarray(grid, dtype=np.float64)
    sigma = sigma or 2 * float(np.diff(grid).mean())
    z = (grid[None, None, :] - quadrature.nodes[..., None]) / sigma  # (runs, steps, G)
    kernel = np.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (quadrature.weights[..., None] * kernel).sum(1).mean(0)  # (G,)
    area = np.trapezoid(density, grid)
    return density / area if area > 0 else density


# ---------------------------------------------------------------------------- per group


def group_top(op: HessianOperator, tol: float = 1e-3, max_steps: int = 30,
              seed: int = 0) -> dict[str, float]:
    """The top eigenvalue of each group's diagonal block of H."""
    return {name: float(top_eigen(op.block(name), 1, tol, max_steps, seed, False).values[0])
            for name, _, _ in op.groups}


def check_finite_loss(op: HessianOperator, what: str) -> float:
    """The mean loss at the point; a UserError naming `what` when it is not finite."""
    value = op.loss()
    if not math.isfinite(value):
        raise UserError(f"{what}: the loss is {value} at this point, so its curvature is "
                        f"undefined")
    return value
