"""k-nearest-neighbour probes on frozen features: pure functions, device follows the inputs.

Two variants (PAPER.md, "Probing"):

- ``metric="l2"`` (the paper's): squared Euclidean distance on the raw features, the k nearest
  training points, an unweighted majority vote. Agrees exactly with scikit-learn's
  ``KNeighborsClassifier(n_neighbors=k)``: a tied vote goes to the smallest class label.
- ``metric="cosine"`` (DINO's): L2-normalised features, cosine similarity, the k most similar
  training points, each voting with weight ``exp(sim / temperature)``; the class with the
  largest summed weight wins (a tie again goes to the smallest label).

Exactly equal distances: the training point with the lower index counts as the nearer one,
so which of several equidistant points fills the last of the k places is deterministic and
the same on every device. scikit-learn leaves that choice to its search order (heap and
thread layout), so on a test point whose k-th and (k+1)-th distances are bit-identical the two
may pick different neighbours; everywhere else they agree exactly. Float rounding differs
between float32 and float64 (and between CPU and GPU), so use float64 features where
agreement with another implementation must be exact. Leave TF32 matmuls off on GPUs
(torch.backends.cuda.matmul.allow_tf32): they round the distances to ~3 significant digits.

Distances are computed in float64 when the features are float64, otherwise in float32. Test
rows are processed in chunks so the (chunk, N_train) distance block stays near
``BLOCK_BYTES``: 50k train x 10k test fits on a CPU or a GPU. Accuracies are fractions in [0, 1].
"""

import torch

from probes.features import check_features, check_labels
from runs.errors import UserError, unknown

METRICS = ("cosine", "l2")
BLOCK_BYTES = 256 * 2**20  # target size of one (chunk, N_train) distance block


def knn_predict(train_x, train_y, test_x, ks=(20,), metric="l2", temperature=0.07,
                num_classes=None, chunk_size=None, name="features") -> dict[int, torch.Tensor]:
    """Predicted labels of `test_x` for every k in `ks`, from one nearest-neighbour search.

    train_x (N, D) and test_x (M, D) float features on one device; train_y (N,) integer labels
    in [0, num_classes). num_classes defaults to max(train_y) + 1. chunk_size: test rows per
    distance block (default: from BLOCK_BYTES). name: what the features are, for error messages
    (e.g. the checkpoint reference). The search runs on train_x's device (test_x is moved
    there). Returns {k: (M,) int64 labels} on that device.
    """
    ks = _check_ks(ks, len(train_x))
    train_x, train_y, test_x = _check_inputs(train_x, train_y, test_x, name)
    if metric not in METRICS:
        raise unknown("k-NN metric", metric, METRICS)
    if metric == "cosine":
        if not temperature > 0:
            raise UserError(f"k-NN temperature must be > 0, got {temperature}")
        train_x = torch.nn.functional.normalize(train_x, dim=1)
        test_x = torch.nn.functional.normalize(test_x, dim=1)
    num_classes = _num_classes(train_y, num_classes)
    kmax = max(ks)
    if chunk_size is None:
        chunk_size = max(1, BLOCK_BYTES // (len(train_x) * train_x.element_size()))
    train_sq = train_x.pow(2).sum(1)  # (N,) squared norms, reused by every chunk
    preds = {k: [] for k in ks}
    for start in range(0, len(test_x), chunk_size):
        chunk = test_x[start:start + chunk_size]  # (B, D)
        dist = _distances(chunk, train_x, train_sq, metric)  # (B, N) smaller is nearer
        dist_k, idx = _nearest(dist, kmax)  # (B, kmax) sorted by (distance, train index)
        labels = train_y[idx]  # (B, kmax)
        if metric == "l2":
            weight = torch.ones_like(dist_k)  # unweighted majority vote
        else:
            weight = dist_k.neg().div(temperature).exp()  # (B, kmax) exp(cos / T)
        for k in ks:
            votes = dist_k.new_zeros(len(chunk), num_classes)  # (B, C) summed vote weights
            votes.scatter_add_(1, labels[:, :k], weight[:, :k])
            preds[k].append(votes.argmax(1))  # argmax returns the first max: smallest label
        del dist  # else the next chunk's block is allocated while this one lives: 2 blocks
    return {k: torch.cat(p) if p else train_y.new_zeros(0) for k, p in preds.items()}


def knn_accuracies(train_x, train_y, test_x, test_y, ks=(20,), metric="l2", temperature=0.07,
                   num_classes=None, chunk_size=None, name="features") -> dict[int, float]:
    """Test accuracy in [0, 1] for every k in `ks` from one search; see `knn_predict`."""
    test_y = check_labels(test_y, len(test_x), name, "test", train_x.device)
    preds = knn_predict(train_x, train_y, test_x, ks, metric, temperature, num_classes,
                        chunk_size, name)
    return {k: (p == test_y).double().mean().item() for k, p in preds.items()}


def knn_accuracy(train_x, train_y, test_x, test_y, k=20, metric="l2", temperature=0.07,
                 num_classes=None, chunk_size=None, name="features") -> float:
    """Test accuracy in [0, 1] of the k-NN classifier; see `knn_predict`."""
    return knn_accuracies(train_x, train_y, test_x, test_y, (k,), metric, temperature,
                          num_classes, chunk_size, name)[k]


def _distances(chunk, train_x, train_sq, metric):
    """(B, N) dissimilarities of test rows `chunk` (B, D) to `train_x` (N, D): smaller is nearer."""
    if metric == "cosine":
        return torch.mm(chunk, train_x.T).neg_()  # (B, N) minus cosine, both L2-normalised
    dist = torch.addmm(train_sq[None], chunk, train_x.T, alpha=-2)  # (B, N) |b|^2 - 2 a.b
    return dist.add_(chunk.pow(2).sum(1, keepdim=True)).clamp_(min=0)  # (B, N) squared L2


def _nearest(dist, k):
    """The k smallest entries of each row of `dist` (B, N), ties going to the lower column.

    Returns (values, indices), both (B, k), sorted by (value, index).
    """
    width = min(k + 1, dist.shape[1])  # one extra place shows whether a tie straddles k
    vals, idx = dist.topk(width, dim=1, largest=False)  # (B, k+1); torch picks among ties freely
    redo = vals[:, -1] == vals[:, k - 1] if width > k else vals.new_zeros(len(vals), dtype=bool)
    vals, idx = vals[:, :k], idx[:, :k]  # (B, k): the values are unique, the indices are not
    if redo.any():  # rows whose k-th and (k+1)-th values are equal: choose by index instead
        sub = dist[redo]  # (R, N)
        edge = vals[redo, k - 1:]  # (R, 1) the k-th smallest value
        nearer, tied = sub < edge, sub == edge  # (R, N) each
        need = k - nearer.sum(1, keepdim=True)  # (R, 1) places left for the tied points
        keep = nearer | (tied & (tied.cumsum(1, dtype=torch.int32) <= need))  # (R, N) k per row
        sub_idx = keep.nonzero()[:, 1].view(-1, k)  # (R, k) ascending column order
        idx[redo], vals[redo] = sub_idx, sub.gather(1, sub_idx)
    idx, order = idx.sort(1)  # by index first, so the stable sort below breaks ties by index
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, stable=True)
    return vals, idx.gather(1, order)


def _check_inputs(train_x, train_y, test_x, name):
    """Validate shapes, labels and finiteness; return float features and int64 labels."""
    check_features(train_x, name, "train")
    check_features(test_x, name, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise UserError(f"features of {name}: train has {train_x.shape[1]} dimensions, "
                        f"test has {test_x.shape[1]}")
    train_y = check_labels(train_y, len(train_x), name, "train", train_x.device)
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    return train_x.to(dtype), train_y, test_x.to(train_x.device, dtype)


def _check_ks(ks, num_train):
    """Sorted unique ks, each in [1, num_train]."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > num_train:
        raise UserError(f"k-NN k must lie in [1, {num_train}] (the train set size), got {ks}")
    return ks


def _num_classes(train_y, num_classes):
    """`num_classes`, or max(train_y) + 1; checked against the labels."""
    top = int(train_y.max()) + 1
    if num_classes is None:
        return top
    if num_classes < top:
        raise UserError(f"num_classes={num_classes} but train labels go up to {top - 1}")
    return num_classes
