"""Linear probes on frozen features: pure functions, float32 on the features' device.

- `linear_probe_sgd`: the paper's probe, Linear(D, C) trained by AdamW on mini-batches.
- `linear_probe_lbfgs`: a fast, tuning-free variant, full-batch multinomial logistic
  regression by L-BFGS, its L2 strength chosen on a stratified split held out from train.
- `standardize`: z-scores with the train split's statistics only, for the "standardised" rows.

Features never leave their device (no DataLoader); accuracies are fractions in [0, 1].
"""

import torch
import torch.nn.functional as F

from probes.features import check_features, check_labels
from runs.errors import UserError

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths tried by linear_probe_lbfgs
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


def linear_probe_lbfgs(train_x, train_y, test_x, test_y, num_classes, l2_grid=L2_GRID,
                       val_fraction=0.1, seed=0, max_iter=100, name="features") -> dict:
    """Multinomial logistic regression by full-batch L-BFGS, L2 strength tuned on train only.

    Loss: mean cross-entropy + l2 / 2 * |W|^2 (the bias is not penalised). Each l2 in `l2_grid`
    is fit on train minus a seeded stratified `val_fraction` split and scored on that split; the
    best (ties: the larger l2) is refit on all of train and scored on test. Test labels are
    used only for the reported accuracy. max_iter: L-BFGS iterations per fit. Returns
    {"accuracy", "train_accuracy", "l2": the chosen strength, "val_accuracies": {l2: acc}}.
    """
    train_x, train_y, test_x, test_y = _prepare(train_x, train_y, test_x, test_y,
                                                num_classes, name)
    if not l2_grid:
        raise UserError("l2_grid is empty; give at least one L2 strength")
    fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
    val_accuracies = {}
    for l2 in l2_grid:
        weight, bias = _fit_logistic(train_x[fit_idx], train_y[fit_idx], num_classes, l2,
                                     max_iter)
        val_accuracies[l2] = _accuracy(weight, bias, train_x[val_idx], train_y[val_idx])
    best = max(l2_grid, key=lambda l2: (val_accuracies[l2], l2))
    weight, bias = _fit_logistic(train_x, train_y, num_classes, best, max_iter)
    return {"accuracy": _accuracy(weight, bias, test_x, test_y),
            "train_accuracy": _accuracy(weight, bias, train_x, train_y),
            "l2": best, "val_accuracies": val_accuracies}


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


def _fit_logistic(x, y, num_classes, l2, max_iter):
    """(weight (D, C), bias (C,)) minimising mean CE + l2 / 2 |W|^2, from zeros (convex)."""
    weight = x.new_zeros(x.shape[1], num_classes, requires_grad=True)
    bias = x.new_zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(torch.addmm(bias, x, weight), y) + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


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
