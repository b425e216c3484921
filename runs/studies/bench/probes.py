"""Section probes: the k-NN probes (both variants) against scikit-learn, the paper's linear
probe against a TensorDataset + DataLoader loop, the L-BFGS probe against scikit-learn's
LogisticRegression (lbfgs) doing the same fits, on synthetic Gaussian features.

probes is imported inside the functions: a section whose package does not import is skipped.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from runs.studies.bench.common import Bench, Runner, comparison, count_flops, measure, to_device

# Class centres ~ N(0, s^2 I), s = 0.8 / dim^(1/4), under unit noise: the squared distance
# between centres (2 s^2 dim) grows like the noise in distances (~ sqrt(dim)), so k-NN
# accuracy stays near 70 % at any feature dimension: neither trivial nor chance.
FEATURE_SEPARATION = 0.8


# ---------------------------------------------------------------------------------------
# 4. Probes on frozen features


def synthetic_features(num_train: int, num_test: int, dim: int, num_classes: int,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y): Gaussian classes around random centres, float32."""
    gen = torch.Generator().manual_seed(seed)
    scale = FEATURE_SEPARATION / dim ** 0.25
    centres = torch.randn(num_classes, dim, generator=gen) * scale  # (C, D)

    def draw(count):
        y = torch.randint(0, num_classes, (count,), generator=gen)
        return centres[y] + torch.randn(count, dim, generator=gen), y  # (N, D), (N,)

    return (*draw(num_train), *draw(num_test))


def sklearn_knn(train_x, train_y, test_x, test_y, k=20, metric="l2",
                temperature=0.07) -> float:
    """The k-NN reference: scikit-learn, brute force, all CPU cores.

    l2: Euclidean neighbours, majority vote (the paper's); cosine: cosine neighbours, votes
    weighted exp(cos / T) = exp((1 - cosine distance) / T) (DINO's).
    """
    from sklearn.neighbors import KNeighborsClassifier
    if metric == "l2":
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", n_jobs=-1)
    else:
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                                   weights=lambda dist: np.exp((1 - dist) / temperature),
                                   n_jobs=-1)
    clf.fit(np.asarray(train_x), np.asarray(train_y))
    return float(clf.score(np.asarray(test_x), np.asarray(test_y)))


def fast_knn(features, device, metric: str, k: int = 20) -> Callable[[], float]:
    from probes.nearest import knn_accuracy
    train_x, train_y, test_x, test_y = (t.to(device) for t in features)
    return lambda: knn_accuracy(train_x, train_y, test_x, test_y, k=k, metric=metric)


def knn_flops(features, metric: str, k: int = 20, queries: int = 64) -> float:
    """FLOPs per test query of the fast k-NN (the distance matmul dominates), counted."""
    from probes.nearest import knn_predict
    train_x, train_y, test_x, _ = features
    return count_flops(lambda: knn_predict(train_x, train_y, test_x[:queries], (k,),
                                           metric)) / min(queries, len(test_x))


def reference_linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=10,
                           batch_size=256, lr=1e-3, weight_decay=1e-2, device="cpu",
                           seed=0) -> float:
    """The paper's probe as public code runs it: CPU features in a TensorDataset, a
    DataLoader, eager nn.Linear + AdamW, test accuracy after the last epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Linear(train_x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=1024)
    for _ in range(epochs):
        for x, y in train:
            x, y = to_device((x, y), device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in test)
    return correct / len(test_x)


def sklearn_lbfgs_probe(train_x, train_y, test_x, test_y, l2_grid=None, folds=5, seed=0,
                        max_iter=1000, tol=1e-5) -> float:
    """The L-BFGS probe's work as scikit-learn does it: LogisticRegression (lbfgs,
    multinomial, float32 features) over the same L2 grid, the same stratified folds (each
    fold's grid from the largest l2 down, warm-started) and a refit on all of train at the
    best CV accuracy; features centred and divided by their RMS as linear_probe_lbfgs does.
    C = 1 / (rows * l2) is the same objective (mean cross-entropy + l2 / 2 |W|^2) and tol
    its gradient bound. BLAS on one thread: on 2 cores OpenBLAS's threads only waited on
    each other at these sizes (quick sizes: 9 s instead of 1.3 s). Returns the test
    accuracy."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from probes.logistic import L2_GRID, stratified_folds
    grid = sorted(l2_grid or L2_GRID, reverse=True)  # largest l2 first: the warm-start order
    x, y = np.asarray(train_x, dtype=np.float32), np.asarray(train_y)
    mean = x.mean(0)  # (D,)
    scale = float(np.sqrt(((x - mean) ** 2).mean())) or 1.0
    x, test = (x - mean) / scale, (np.asarray(test_x, dtype=np.float32) - mean) / scale
    fold_of = stratified_folds(torch.as_tensor(y), folds, seed).numpy()  # (N,)

    def fit(rows, l2, clf=None):
        clf = clf or LogisticRegression(solver="lbfgs", tol=tol, max_iter=max_iter,
                                        warm_start=True)
        clf.set_params(C=1 / (len(rows) * l2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(x[rows], y[rows])

    correct = dict.fromkeys(grid, 0)
    with threadpool_limits(1, user_api="blas"):
        for fold in range(folds):
            rows, val = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
            clf = None
            for l2 in grid:
                clf = fit(rows, l2, clf)
                correct[l2] += int((clf.predict(x[val]) == y[val]).sum())
        best = max(grid, key=lambda l2: correct[l2])  # ties: the larger l2 (first in grid)
        return float(fit(np.arange(len(x)), best).score(test, np.asarray(test_y)))


def probe_runners(bench: Bench, features) -> dict:
    """name -> (fast Runner, reference Runner)."""
    from probes.logistic import linear_probe_lbfgs, linear_probe_sgd
    cfg, device, queries = bench.cfg, bench.device, len(features[2])
    on_device = [t.to(device) for t in features]
    classes, epochs = cfg.probe_classes, cfg.probe_epochs
    runners = {}
    for metric in ("l2", "cosine"):
        fast = Runner(f"probes.nearest on the device ({metric})", queries,
                      fast_knn(features, device, metric))
        ref = Runner(f"scikit-learn KNeighborsClassifier brute ({metric})", queries,
                     lambda m=metric: sklearn_knn(*features, metric=m))
        runners[f"knn_{metric}"] = (fast, ref)
    sgd = Runner("probes.logistic.linear_probe_sgd, features on the device", 1,
                 lambda: linear_probe_sgd(*on_device, classes, epochs=epochs)["accuracy"])
    ref = Runner("TensorDataset + DataLoader + eager Linear/AdamW (the paper's probe)", 1,
                 lambda: reference_linear_probe(*features, classes, epochs, device=device))
    runners["linear_sgd"] = (sgd, ref)
    lbfgs = Runner("probes.logistic.linear_probe_lbfgs (6 L2 strengths x 5 folds + refit)",
                   1, lambda: linear_probe_lbfgs(*on_device, classes)["accuracy"])
    ref = Runner("scikit-learn LogisticRegression lbfgs (6 L2 strengths x 5 folds + refit)",
                 1, lambda: sklearn_lbfgs_probe(*features))
    runners["linear_lbfgs"] = (lbfgs, ref)
    return runners


def section_probes(bench: Bench) -> dict:
    """k-NN (both variants) and the L-BFGS probe vs scikit-learn; the paper's linear probe
    vs a DataLoader loop."""
    cfg, device = bench.cfg, bench.device
    features = synthetic_features(cfg.feature_train, cfg.feature_test, cfg.feature_dim,
                                  cfg.probe_classes)
    # One untimed call each, on a tenth of the rows: first calls pay imports (sklearn,
    # optimiser internals), CUDA context and cuBLAS set-up (a first linear_probe_sgd on a
    # CPU takes 20x longer than the next).
    warm = probe_runners(bench, [t[:max(len(t) // 10, 100)] for t in features])
    comparisons = {}
    for name, (fast, ref) in probe_runners(bench, features).items():
        fast.warm, ref.warm = warm[name][0].step, warm[name][1].step
        fast_record, fast_acc = measure(fast, 1, cfg.probe_repeats, device)
        ref_record, ref_acc = measure(ref, 1, cfg.probe_repeats, device)
        knn = name.startswith("knn")
        flops = knn_flops(features, name.removeprefix("knn_")) if knn else None
        checks = {"accuracy_fast": fast_acc, "accuracy_reference": ref_acc}
        comparisons[name] = comparison("queries/s" if knn else "probes/s",
                                       {"fast": fast_record, "reference": ref_record},
                                       bench, flops, checks)
    return {"comparisons": comparisons}
