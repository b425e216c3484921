"""Linear probes on frozen features: pure functions, float32 on the features' device.

- `linear_probe_sgd`: the paper's probe, Linear(D, C) trained by AdamW on mini-batches.
- `linear_probe_lbfgs`: converged full-batch multinomial logistic regression by L-BFGS, its
  L2 strength chosen by stratified k-fold cross-validation on train (the capacity measure).
- `standardize`: z-scores with the train split's statistics only, for the "standardised" rows.

Features never leave their device (no DataLoader); accuracies are fractions in [0, 1].
"""

import warnings

import torch
import torch.nn.functional as F

from probes.features import check_features, check_labels
from runs.errors import UserError

# L2 strengths tried by linear_probe_lbfgs, relative to the features' centred RMS: on the
# demo's digits features (teacher, student, pixels; raw and standardised) 5-fold CV picks
# 1e-3 or 1e-2, and 1 or more costs 5 to 10 points.
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
EVAL_ROWS = 65536  # rows per forward pass when scoring, bounds the (rows, C) logits


def standardize(train_x, test_x, eps=1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_z, test_z): both splits z-scored per dimension with the TRAIN mean and std.

    A dimension whose train std is below `eps` (constant on train) is only centred, so it
    cannot blow up on test. Returns float32 on the features' device.
    """
    train_x, test_x = train_x.float(), test_x.float()
    mean = train_x.mean(0)  # (D,)
    std = train_x.std(0, correction=0)  # (D,) population std
    std = torch.where(std > eps, std, torch.ones_like(std))
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe_sgd(train_x, train_y, test_x, test_y, num_classes, epochs=10, batch_size=256,
                     lr=1e-3, weight_decay=1e-2, seed=0, name="features") -> dict:
    """The paper's linear probe: Linear(D, C) trained with AdamW and cross-entropy.

    seed: the initialisation (drawn on the CPU, so the same on every device) and the
    per-epoch shuffling (a torch.Generator on the features' device). Returns
    {"accuracy": test accuracy after the last epoch, "train_accuracy": same on train,
    "epoch_accuracies": [test accuracy after each epoch]}.
    """
    train_x, train_y, test_x, test_y = _prepare(train_x, train_y, test_x, test_y,
                                                num_classes, name)
    if epochs < 1 or batch_size < 1:
        raise UserError(f"linear probe needs epochs >= 1 and batch_size >= 1, "
                        f"got epochs={epochs}, batch_size={batch_size}")
    device = train_x.device
    model = _init_linear(train_x.shape[1], num_classes, seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator(device).manual_seed(seed)
    epoch_accuracies = []
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=order, device=device)  # (N,)
        for start in range(0, len(train_x), batch_size):
            idx = perm[start:start + batch_size]  # (B,)
            with torch.enable_grad():
                loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
        epoch_accuracies.append(_accuracy(model.weight.T, model.bias, test_x, test_y))
    return {"accuracy": epoch_accuracies[-1],
            "train_accuracy": _accuracy(model.weight.T, model.bias, train_x, train_y),
            "epoch_accuracies": epoch_accuracies}


def linear_probe_lbfgs(train_x, train_y, test_x, test_y, num_classes, l2_grid=L2_GRID, folds=5,
                       seed=0, max_iter=1000, tolerance_grad=1e-5, name="features") -> dict:
    """Multinomial logistic regression by full-batch L-BFGS, L2 strength chosen by k-fold CV.

    Objective: mean cross-entropy + l2 / 2 * |W|^2 on the features centred with the train mean
    and divided by `scale`, the RMS of the centred train values (1 for standardised features),
    so one grid suits features of any scale. The bias is not penalised, so centring changes
    nothing but the conditioning; on the raw features the penalty is l2_absolute / 2 * |W|^2
    with l2_absolute = l2 * scale^2 (scikit-learn's C = 1 / (N * l2_absolute)).

    Selection (test labels never used): every l2 in `l2_grid` is scored by seeded stratified
    `folds`-fold cross-validation on train (correct predictions pooled over the folds). The
    best score usually forms a plateau of tied grid values; the choice is the middle of the
    longest plateau (the upper one of two middles; between equally long plateaus, the one of
    larger l2), not its edge. A choice at the grid's first or last value sets "l2_on_edge" and
    warns: the optimum may lie outside the grid. A one-value grid skips the CV (fixed l2).
    Each fit runs L-BFGS until the gradient's largest entry is below `tolerance_grad` (or the
    loss stops changing), at most `max_iter` iterations; a fit that hits max_iter warns.
    Returns {"accuracy", "train_accuracy", "l2" (chosen grid value), "l2_absolute", "scale",
    "val_accuracies" {l2: CV accuracy}, "l2_on_edge", "converged" (the final fit),
    "iterations" (the final fit's), "cv_unconverged" (CV fits that hit max_iter)}.
    """
    train_x, train_y, test_x, test_y = _prepare(train_x, train_y, test_x, test_y,
                                                num_classes, name)
    if not l2_grid or min(l2_grid) < 0:
        raise UserError(f"l2_grid must hold at least one L2 strength >= 0, got {l2_grid}")
    if max_iter < 1:
        raise UserError(f"max_iter must be at least 1, got {max_iter}")
    grid = sorted(set(float(l2) for l2 in l2_grid))  # ascending: plateaus are contiguous
    # Centred (the free bias absorbs the mean: the same optimum, better conditioned) and
    # divided by the RMS of the centred values, so the grid and tolerances are scale-free.
    mean = train_x.mean(0)  # (D,)
    scale = (train_x - mean).pow(2).mean().sqrt().item()
    scale = scale if scale > 0 else 1.0
    train_x, test_x = (train_x - mean) / scale, (test_x - mean) / scale
    fit = dict(num_classes=num_classes, max_iter=max_iter, tolerance_grad=tolerance_grad)
    val_accuracies, cv_unconverged = {}, 0
    if len(grid) > 1:
        correct, cv_unconverged = _cross_validate(train_x, train_y, grid, folds, seed, fit)
        val_accuracies = {l2: correct[l2] / len(train_x) for l2 in grid}
        best = _plateau_middle(grid, [correct[l2] for l2 in grid])
    else:
        best = grid[0]
    weight, bias, iterations, converged = _fit_logistic(train_x, train_y, l2=best, **fit)
    on_edge = len(grid) > 1 and best in (grid[0], grid[-1])
    _warn_selection(name, grid, best, on_edge, converged, cv_unconverged, fit)
    return {"accuracy": _accuracy(weight, bias, test_x, test_y),
            "train_accuracy": _accuracy(weight, bias, train_x, train_y),
            "l2": best, "l2_absolute": best * scale ** 2, "scale": scale,
            "val_accuracies": val_accuracies, "l2_on_edge": on_edge, "converged": converged,
            "iterations": iterations, "cv_unconverged": cv_unconverged}


def _warn_selection(name, grid, best, on_edge, converged, cv_unconverged, fit) -> None:
    """UserWarnings (stacklevel: the probe's caller) for an edge choice or an unconverged fit."""
    if on_edge:
        side = "smallest" if best == grid[0] else "largest"
        warnings.warn(f"linear-lbfgs on {name}: the chosen L2 strength {best:g} is the grid's "
                      f"{side} value ({', '.join(f'{v:g}' for v in grid)}); the best may lie "
                      f"outside it: widen l2_grid", stacklevel=3)
    if cv_unconverged or not converged:
        warnings.warn(f"linear-lbfgs on {name}: L-BFGS hit max_iter={fit['max_iter']} before "
                      f"its gradient fell below {fit['tolerance_grad']:g} (final fit "
                      f"{'converged' if converged else 'unconverged'}, {cv_unconverged} "
                      f"cross-validation fits unconverged); raise max_iter", stacklevel=3)


def _cross_validate(x, y, grid, folds, seed, fit) -> tuple[dict, int]:
    """({l2: correct validation predictions summed over the folds}, unconverged fit count).

    Within a fold the grid runs from the largest l2 down, each fit warm-started at the
    previous solution (the objective is convex: same optimum, fewer iterations)."""
    fold_of = stratified_folds(y, folds, seed)  # (N,) fold index of every train row
    correct, unconverged = dict.fromkeys(grid, 0), 0
    for fold in range(folds):
        val = fold_of == fold
        fit_x, fit_y, val_x, val_y = x[~val], y[~val], x[val], y[val]
        start = None
        for l2 in reversed(grid):
            weight, bias, _, converged = _fit_logistic(fit_x, fit_y, l2=l2, start=start, **fit)
            start, unconverged = (weight, bias), unconverged + (not converged)
            correct[l2] += round(_accuracy(weight, bias, val_x, val_y) * len(val_x))
    return correct, unconverged


def _plateau_middle(grid, scores):
    """The grid value in the middle of the longest run of best scores (grid ascending)."""
    best = max(scores)
    runs, start = [], None  # (length, first index) of each run of best scores
    for i, score in enumerate([*scores, None]):
        if score == best and start is None:
            start = i
        elif score != best and start is not None:
            runs.append((i - start, start))
            start = None
    length, first = max(runs)  # ties between runs: the later one, of larger l2
    return grid[first + length // 2]


def stratified_folds(labels, folds, seed=0) -> torch.Tensor:
    """(N,) fold index in [0, folds) of every row: each class spread evenly over the folds.

    Rows are shuffled within each class by a seeded CPU generator (the same on every device),
    laid out class after class and dealt to the folds in turn, so fold sizes differ by at
    most one and every class with n members puts floor or ceil(n / folds) in each fold.
    """
    if folds < 2 or folds > len(labels):
        raise UserError(f"k-fold selection needs 2 <= folds <= train rows ({len(labels)}), "
                        f"got folds={folds}")
    cpu_labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    order = []
    for c in torch.unique(cpu_labels):
        members = torch.nonzero(cpu_labels == c).flatten()  # (n_c,)
        order.append(members[torch.randperm(len(members), generator=gen)])
    fold_of = torch.empty(len(labels), dtype=torch.long)
    fold_of[torch.cat(order)] = torch.arange(len(labels)) % folds
    return fold_of.to(labels.device)


def stratified_split(labels, val_fraction, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit_idx, val_idx): a seeded split holding out `val_fraction` of every class.

    Each class with at least 2 members puts round(val_fraction * n) of them, at least 1 and
    at most n - 1, into val. Drawn on the CPU so it is the same on every device; the index
    tensors (sorted) come back on the labels' device.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    cpu_labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in torch.unique(cpu_labels):
        members = torch.nonzero(cpu_labels == c).flatten()  # (n_c,)
        members = members[torch.randperm(len(members), generator=gen)]
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val.append(members[:n_val])
        fit.append(members[n_val:])
    val_idx = torch.cat(val).sort().values
    if len(val_idx) == 0:
        raise UserError("no class has 2 train examples; cannot hold out a validation split")
    return torch.cat(fit).sort().values.to(labels.device), val_idx.to(labels.device)


def _fit_logistic(x, y, num_classes, l2, max_iter, tolerance_grad, start=None):
    """(weight (D, C), bias (C,), iterations, converged) minimising mean CE + l2 / 2 |W|^2.

    Convex, so the start (zeros, or `start` = (weight, bias) to warm-start) changes only the
    iterations. converged: L-BFGS stopped on its own tolerances before max_iter iterations
    (gradient max-abs below tolerance_grad, or loss and step at float precision)."""
    if start is None:
        start = (x.new_zeros(x.shape[1], num_classes), x.new_zeros(num_classes))
    weight, bias = (t.detach().clone() for t in start)
    max_eval = 4 * max_iter  # strong-Wolfe line searches: never the binding limit
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, max_eval=max_eval,
                            history_size=10, tolerance_grad=tolerance_grad,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")
    opt.step(_objective(weight, bias, x, y, l2))
    state = opt.state[weight]
    iterations = state.get("n_iter", 0)
    converged = iterations < max_iter and state.get("func_evals", 0) < max_eval
    return weight.detach(), bias.detach(), iterations, converged


def _objective(weight, bias, x, y, l2):
    """L-BFGS's closure: mean cross-entropy + l2 / 2 |W|^2 at (weight, bias), its gradient
    written into their .grad by hand, no autograd graph.

    Logits come out (C, N), classes on dim 0: the CPU's log_softmax over a last dim of
    C = 10 took 0.5 ms for 4000 rows, over dim 0 0.02 ms; with the hand-written gradient
    (softmax - one-hot) / N a fit ran 2.5x faster than autograd through F.cross_entropy.
    """
    x_t = x.T.contiguous()  # (D, N)
    target = y[None]  # (1, N)

    @torch.no_grad()
    def closure():
        logits = torch.addmm(bias[:, None], weight.T, x_t)  # (C, N)
        log_p = logits.log_softmax(0)  # (C, N)
        loss = l2 / 2 * weight.pow(2).sum() - log_p.gather(0, target).sum() / len(y)
        residual = log_p.exp_().scatter_add_(0, target, torch.full_like(log_p[:1], -1.0))
        residual /= len(y)  # (C, N): d loss / d logits, softmax - one-hot over N
        weight.grad = torch.addmm(weight, x_t, residual.T, beta=l2)  # (D, C) X^T R^T + l2 W
        bias.grad = residual.sum(1)  # (C,)
        return loss
    return closure


def _accuracy(weight, bias, x, y):
    """Fraction of rows of `x` (N, D) whose argmax of x @ weight + bias equals `y`."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), EVAL_ROWS):
            logits = torch.addmm(bias, x[start:start + EVAL_ROWS], weight)  # (B, C)
            correct += (logits.argmax(1) == y[start:start + EVAL_ROWS]).sum().item()
    return correct / max(1, len(x))


def _init_linear(in_features, num_classes, seed, device):
    """nn.Linear with its default U(-1/sqrt(D), 1/sqrt(D)) init drawn from a seeded CPU gen.

    Built on the meta device first so the global RNG is left untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    bound = in_features ** -0.5
    model = torch.nn.Linear(in_features, num_classes, device="meta").to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.rand(param.shape, generator=gen).mul_(2 * bound).sub_(bound))
    return model


def _prepare(train_x, train_y, test_x, test_y, num_classes, name):
    """Checked float32 features and int64 labels, all on train_x's device."""
    check_features(train_x, name, "train")
    check_features(test_x, name, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise UserError(f"features of {name}: train has {train_x.shape[1]} dimensions, "
                        f"test has {test_x.shape[1]}")
    if num_classes < 2:
        raise UserError(f"a linear probe needs num_classes >= 2, got {num_classes}")
    device = train_x.device
    train_y = check_labels(train_y, len(train_x), name, "train", device, num_classes)
    test_y = check_labels(test_y, len(test_x), name, "test", device, num_classes)
    return train_x.float(), train_y, test_x.to(device, torch.float32), test_y
