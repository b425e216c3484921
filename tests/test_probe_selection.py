"""The L-BFGS probe's L2 selection: k-fold CV on train, plateau middles, edge and convergence
warnings, and the objective checked against scikit-learn's LogisticRegression."""

import warnings

import pytest
import torch

from probes.logistic import _fit_logistic, _plateau_middle, linear_probe_lbfgs, stratified_folds
from runs.errors import UserError


def shared_noise(n, seed, noise_dims=300, flip=0.2):
    """Two classes whose L2 optimum is interior, by construction.

    x1 = +-1 + s + e1, x2 = s + e2 with a large shared s (sd 10): the class lies along x1 - x2
    (sd ~0.7), a direction of low variance that a strong L2 penalty shrinks away (l2 = 100 is
    at chance). 300 weak noise dimensions (sd 0.1) and 20 % flipped train labels let a weak
    penalty fit the flips (l2 <= 1e-4 loses ~5 points). l2 = 1 (relative) wins on held-out data.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    shared = 10 * torch.randn(n, generator=gen)
    x1 = (2 * y - 1) + shared + 0.5 * torch.randn(n, generator=gen)
    x2 = shared + 0.5 * torch.randn(n, generator=gen)
    x = torch.cat([x1[:, None], x2[:, None], 0.1 * torch.randn(n, noise_dims, generator=gen)], 1)
    flipped = torch.rand(n, generator=gen) < flip
    return x, torch.where(flipped, 1 - y, y)


def gaussian_blobs(n, seed, dim=8, classes=3, spread=1.5):
    gen = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % classes
    return means[y] + spread * torch.randn(n, dim, generator=gen) + 5.0, y  # offset: centring


GRID = (1e-6, 1e-4, 1e-2, 1e0, 1e2)


def quiet_probe(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linear_probe_lbfgs(*args, **kwargs)


def test_k_fold_picks_the_known_best_l2():
    train_x, train_y = shared_noise(100, seed=0)
    test_x, test_y = shared_noise(3000, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # interior, converged: no warning at all
        out = linear_probe_lbfgs(train_x, train_y, test_x, test_y, 2, l2_grid=GRID)
    test_accs = {l2: quiet_probe(train_x, train_y, test_x, test_y, 2, l2_grid=(l2,))["accuracy"]
                 for l2 in GRID}
    assert max(test_accs, key=test_accs.get) == 1.0  # the known best, on 3000 fresh images
    assert out["l2"] == 1.0 and not out["l2_on_edge"] and out["converged"]
    assert out["val_accuracies"][1.0] > max(v for k, v in out["val_accuracies"].items() if k != 1)
    assert out["accuracy"] == test_accs[1.0]
    assert out == linear_probe_lbfgs(train_x, train_y, test_x, test_y, 2, l2_grid=GRID)  # seeded


def test_best_on_the_grids_edge_warns_and_is_recorded():
    train_x, train_y = shared_noise(100, seed=0)
    test_x, test_y = shared_noise(200, seed=1)
    with pytest.warns(UserWarning, match=r"on ckpt-3: the chosen L2 strength 1 is the grid's "
                                         r"smallest value \(1, 10, 100\)"):
        out = linear_probe_lbfgs(train_x, train_y, test_x, test_y, 2, l2_grid=(1e2, 1e1, 1e0),
                                 name="ckpt-3")
    assert out["l2"] == 1.0 and out["l2_on_edge"]
    assert list(out["val_accuracies"]) == [1.0, 10.0, 100.0]  # sorted, whatever the order given
    fixed = quiet_probe(train_x, train_y, test_x, test_y, 2, l2_grid=(1e4,))
    assert not fixed["l2_on_edge"] and fixed["val_accuracies"] == {}  # one value: no CV


def test_ties_resolve_to_the_middle_of_the_plateau():
    grid = [1, 2, 3, 4, 5, 6, 7]
    assert _plateau_middle(grid, [5, 9, 9, 9, 7, 6, 5]) == 3  # odd run: its middle
    assert _plateau_middle(grid, [9, 9, 9, 9, 7, 6, 5]) == 3  # touching the edge: not the edge
    assert _plateau_middle(grid, [5, 9, 9, 9, 9, 6, 5]) == 4  # even run: the upper middle
    assert _plateau_middle(grid, [9, 9, 1, 9, 9, 9, 1]) == 5  # the longest run wins
    assert _plateau_middle(grid, [9, 9, 1, 1, 1, 9, 9]) == 7  # equal runs: the larger l2
    assert _plateau_middle(grid, [9] * 7) == 4
    # End to end: well-separated blobs, every L2 up to 1e-2 classifies every fold perfectly.
    train_x, train_y = gaussian_blobs(150, seed=0, spread=0.3)
    out = quiet_probe(train_x, train_y, train_x, train_y, 3, l2_grid=(1e-6, 1e-5, 1e-4, 1e-3))
    assert set(out["val_accuracies"].values()) == {1.0}
    assert out["l2"] == 1e-4 and not out["l2_on_edge"]  # upper middle of 4, not 1e-3


def test_objective_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    train_x, train_y = gaussian_blobs(300, seed=0)
    test_x, test_y = gaussian_blobs(300, seed=1)
    l2 = 1e-2
    out = linear_probe_lbfgs(train_x, train_y, test_x, test_y, 3, l2_grid=(l2,))
    # Ours: mean CE + l2/2 |W'|^2 on x' = (x - mean) / scale, i.e. W = W' / scale on raw x:
    # mean CE + l2 scale^2 / 2 |W|^2. scikit-learn: C * sum CE + 1/2 |W|^2 (bias free), the
    # same minimiser when C = 1 / (N * l2 * scale^2) = 1 / (N * l2_absolute).
    assert out["l2_absolute"] == pytest.approx(l2 * out["scale"] ** 2)
    reference = sklearn.LogisticRegression(C=1 / (len(train_x) * out["l2_absolute"]),
                                           tol=1e-10, max_iter=10000)
    reference.fit(train_x.double().numpy(), train_y.numpy())
    assert out["accuracy"] == pytest.approx(reference.score(test_x.double().numpy(),
                                                            test_y.numpy()), abs=1 / 300)
    mean = train_x.mean(0)
    weight, bias, _, converged = _fit_logistic((train_x - mean) / out["scale"], train_y, 3, l2,
                                               max_iter=1000, tolerance_grad=1e-6)
    coef = (weight / out["scale"]).T  # (C, D) on raw x
    assert converged
    assert torch.allclose(coef.double(), torch.from_numpy(reference.coef_), atol=2e-3, rtol=1e-2)
    intercept = bias - mean @ coef.T  # (C,): a softmax's biases are defined up to a shift
    ref_intercept = torch.from_numpy(reference.intercept_)
    assert torch.allclose((intercept - intercept.mean()).double(),
                          ref_intercept - ref_intercept.mean(), atol=1e-2)


@pytest.mark.filterwarnings("ignore:.*grid's smallest value")
def test_an_unconverged_fit_warns_and_is_recorded():
    train_x, train_y = gaussian_blobs(120, seed=0)
    with pytest.warns(UserWarning, match=r"hit max_iter=1 before its gradient"):
        out = linear_probe_lbfgs(train_x, train_y, train_x, train_y, 3, l2_grid=(1e-4, 1e-2),
                                 max_iter=1)
    assert out["converged"] is False and out["iterations"] == 1
    assert out["cv_unconverged"] == 10  # 5 folds x 2 strengths


def test_stratified_folds_are_balanced_and_seeded():
    labels = torch.tensor([0] * 23 + [1] * 11 + [2] * 3)
    fold_of = stratified_folds(labels, 5, seed=4)
    assert torch.bincount(fold_of, minlength=5).tolist() in ([8, 8, 7, 7, 7],)
    for c, n in ((0, 23), (1, 11), (2, 3)):
        counts = torch.bincount(fold_of[labels == c], minlength=5)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert torch.equal(stratified_folds(labels, 5, seed=4), fold_of)
    assert not torch.equal(stratified_folds(labels, 5, seed=5), fold_of)
    with pytest.raises(UserError, match="2 <= folds <= train rows"):
        stratified_folds(labels[:3], 5)
