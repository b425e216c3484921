"""Probes: k-NN agrees with scikit-learn and NumPy, linear probes separate blobs, no leaks."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from probes.features import extract_features, pixel_features
from probes.logistic import linear_probe_lbfgs, linear_probe_sgd, standardize, stratified_split
from probes.nearest import knn_accuracies, knn_accuracy, knn_predict
from runs.errors import UserError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gaussian_classes(num_train=600, num_test=200, dim=32, num_classes=5, spread=1.0, seed=0):
    """Overlapping Gaussian classes (float64), so k-NN votes are mixed and often tied."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * spread
    y = rng.integers(0, num_classes, num_train + num_test)
    x = centres[y] + rng.normal(size=(len(y), dim))
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


def blobs(num_train=2000, num_test=500, dim=32, num_classes=4, seed=0):
    """Linearly separable float32 tensors: class means 10 apart (per dim), unit noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 10
    y = torch.randint(0, num_classes, (num_train + num_test,), generator=gen)
    x = centres[y] + torch.randn(len(y), dim, generator=gen)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


def sklearn_knn(train_x, train_y, test_x, k):
    """scikit-learn's default classifier: (predictions, (M, k+1) sorted neighbour distances)."""
    clf = KNeighborsClassifier(n_neighbors=k).fit(train_x, train_y)
    dist, _ = clf.kneighbors(test_x, n_neighbors=k + 1)
    return clf.predict(test_x), dist


def torch_knn(train_x, train_y, test_x, ks, **kw):
    """knn_predict on float64 tensors, predictions back as NumPy."""
    preds = knn_predict(torch.tensor(train_x, dtype=torch.float64), torch.tensor(train_y),
                        torch.tensor(test_x, dtype=torch.float64), ks, **kw)
    return {k: p.numpy() for k, p in preds.items()}


# ---------------------------------------------------------------- k-NN, paper variant (L2)


@pytest.mark.parametrize("dim", [8, 32])  # 8: sklearn picks a k-d tree; 32: brute force
def test_l2_knn_matches_sklearn_on_gaussians(dim):
    train_x, train_y, test_x, _ = gaussian_classes(dim=dim, spread=0.3)
    ours = torch_knn(train_x, train_y, test_x, (1, 5, 20))
    vote_ties = 0
    for k in (1, 5, 20):
        theirs, _ = sklearn_knn(train_x, train_y, test_x, k)
        np.testing.assert_array_equal(ours[k], theirs)
        _, ind = KNeighborsClassifier(n_neighbors=k).fit(train_x, train_y).kneighbors(test_x)
        counts = np.stack([np.bincount(train_y[row], minlength=5) for row in ind])
        vote_ties += ((counts == counts.max(1, keepdims=True)).sum(1) > 1).sum()
    assert vote_ties > 10  # the smallest-label tie-break was really exercised


@pytest.mark.parametrize("k", [1, 5, 20])
def test_l2_knn_matches_sklearn_on_digits(k):
    x, y = load_digits(return_X_y=True)  # (1797, 64) integer pixels 0..16: exact distance ties
    perm = np.random.default_rng(0).permutation(len(x))
    train_x, train_y, test_x = x[perm[400:]], y[perm[400:]], x[perm[:400]]
    theirs, dist = sklearn_knn(train_x, train_y, test_x, k)
    ours = torch_knn(train_x, train_y, test_x, (k,))[k]
    # Where the k-th and (k+1)-th distances are bit-identical, "the k nearest" is not defined
    # and sklearn's pick follows its heap order; everywhere else predictions must be identical.
    defined = dist[:, k - 1] < dist[:, k]
    assert defined.mean() > 0.9
    np.testing.assert_array_equal(ours[defined], theirs[defined])


def test_equal_distances_go_to_the_lower_train_index():
    train_x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0], [3.0]])  # four at distance 1 from 0
    train_y = torch.tensor([1, 0, 0, 1, 2])
    for chunk_size in (1, None):
        preds = knn_predict(train_x, train_y, torch.zeros(3, 1), (1, 2, 3), chunk_size=chunk_size)
        assert preds[1].tolist() == [1, 1, 1]  # index 0
        assert preds[2].tolist() == [0, 0, 0]  # indices 0, 1: labels 1, 0 tie -> smaller label
        assert preds[3].tolist() == [0, 0, 0]  # indices 0, 1, 2: labels 1, 0, 0


@pytest.mark.parametrize("seed", range(3))
def test_l2_knn_equals_stable_sort_reference_under_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 3, (300, 4))  # few distinct distances: ties at almost every k
    train_y = rng.integers(0, 4, 300)
    test_x = rng.integers(0, 3, (80, 4))
    dist = ((test_x[:, None] - train_x[None]) ** 2).sum(-1)  # (M, N) exact integers
    order = np.argsort(dist, axis=1, kind="stable")  # equal distances: lower index first
    for chunk_size in (3, None):
        ours = torch_knn(train_x, train_y, test_x, (1, 5, 20, 299, 300), chunk_size=chunk_size)
        for k, pred in ours.items():
            counts = np.stack([np.bincount(train_y[row[:k]], minlength=4) for row in order])
            np.testing.assert_array_equal(pred, counts.argmax(1))  # argmax: smallest label


# ---------------------------------------------------------------- k-NN, DINO variant (cosine)


def numpy_weighted_cosine_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """DINO's weighted k-NN written out directly in NumPy."""
    train_n = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_n = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = test_n @ train_n.T  # (M, N) cosine
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (M, k)
    votes = np.zeros((len(test_x), num_classes))
    for row, idx in enumerate(top):
        np.add.at(votes[row], train_y[idx], np.exp(sim[row, idx] / temperature))
    return votes.argmax(1)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_cosine_knn_matches_numpy(temperature):
    train_x, train_y, test_x, _ = gaussian_classes()
    ours = torch_knn(train_x, train_y, test_x, (1, 5, 20), metric="cosine",
                     temperature=temperature)
    for k in (1, 5, 20):
        expected = numpy_weighted_cosine_knn(train_x, train_y, test_x, k, temperature, 5)
        np.testing.assert_array_equal(ours[k], expected)


# ---------------------------------------------------------------- k-NN, mechanics


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_knn_chunked_equals_unchunked_and_multi_k_equals_single(metric):
    train_x, train_y, test_x, _ = (torch.tensor(a) for a in gaussian_classes())
    train_x, test_x = train_x.float(), test_x.float()
    whole = knn_predict(train_x, train_y, test_x, (1, 5, 20), metric, chunk_size=len(test_x))
    for chunk_size in (1, 7, None):
        chunked = knn_predict(train_x, train_y, test_x, (20, 1, 5), metric, chunk_size=chunk_size)
        assert chunked.keys() == whole.keys()
        for k in whole:
            assert torch.equal(chunked[k], whole[k])
    for k in (1, 5, 20):
        single = knn_predict(train_x, train_y, test_x, (k,), metric)
        assert torch.equal(single[k], whole[k])


def test_knn_accuracy_helpers_agree():
    train_x, train_y, test_x, test_y = (torch.tensor(a) for a in gaussian_classes(spread=3.0))
    accs = knn_accuracies(train_x, train_y, test_x, test_y, ks=(1, 20))
    preds = knn_predict(train_x, train_y, test_x, (1, 20))
    for k in (1, 20):
        assert accs[k] == pytest.approx((preds[k] == test_y).double().mean().item())
        assert knn_accuracy(train_x, train_y, test_x, test_y, k=k) == accs[k]
    assert accs[20] > 0.8  # well-separated classes


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("split", ["train", "test"])
def test_knn_rejects_non_finite_features_naming_them(bad, split):
    train_x, train_y, test_x, _ = (torch.tensor(a) for a in gaussian_classes())
    (train_x if split == "train" else test_x)[3, 2] = bad
    with pytest.raises(UserError, match=r"features of runs/abc123:step=500 contain NaN"):
        knn_predict(train_x, train_y, test_x, name="runs/abc123:step=500")


def test_knn_rejects_bad_arguments():
    train_x, train_y, test_x, _ = (torch.tensor(a) for a in gaussian_classes())
    with pytest.raises(UserError, match="599 train labels for 600"):
        knn_predict(train_x, train_y[1:], test_x)
    with pytest.raises(UserError, match="valid: cosine, l2"):
        knn_predict(train_x, train_y, test_x, metric="l1")
    with pytest.raises(UserError, match=r"k-NN k must lie in \[1, 600\]"):
        knn_predict(train_x, train_y, test_x, ks=(601,))
    with pytest.raises(UserError, match="test has 31"):
        knn_predict(train_x, train_y, test_x[:, 1:])
    with pytest.raises(UserError, match="num_classes=3"):
        knn_predict(train_x, train_y, test_x, num_classes=3)


# ---------------------------------------------------------------- linear probes


def test_standardize_uses_train_statistics_only():
    gen = torch.Generator().manual_seed(0)
    train_x = torch.randn(500, 6, generator=gen) * 3 + 2
    train_x[:, 5] = 7.0  # constant on train: only centred, never divided by ~0
    test_x = torch.randn(100, 6, generator=gen) * 10 - 5
    train_z, test_z = standardize(train_x, test_x)
    mean, std = train_x.mean(0), train_x.std(0, correction=0)
    torch.testing.assert_close(train_z[:, :5].mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(train_z[:, :5].std(0, correction=0), torch.ones(5))
    torch.testing.assert_close(test_z[:, :5], (test_x[:, :5] - mean[:5]) / std[:5])
    torch.testing.assert_close(test_z[:, 5], test_x[:, 5] - 7.0)
    train_z2, _ = standardize(train_x, test_x * 100)  # test data must not move the stats
    assert torch.equal(train_z, train_z2)


def test_linear_probes_separate_blobs():
    train_x, train_y, test_x, test_y = blobs()
    sgd = linear_probe_sgd(train_x, train_y, test_x, test_y, num_classes=4)
    assert sgd["accuracy"] >= 0.95 and sgd["train_accuracy"] >= 0.95
    assert len(sgd["epoch_accuracies"]) == 10 and sgd["epoch_accuracies"][-1] == sgd["accuracy"]
    lbfgs = linear_probe_lbfgs(train_x, train_y, test_x, test_y, num_classes=4)
    assert lbfgs["accuracy"] >= 0.95 and lbfgs["train_accuracy"] >= 0.95
    assert lbfgs["l2"] in lbfgs["val_accuracies"] and len(lbfgs["val_accuracies"]) == 6


def test_linear_probe_sgd_is_seeded_and_leaves_global_rng_alone():
    train_x, train_y, test_x, test_y = blobs(num_train=600, num_test=200, seed=1)
    rng_before = torch.get_rng_state()
    runs = [linear_probe_sgd(train_x, train_y, test_x, test_y, 4, epochs=3, lr=1e-4, seed=s)
            for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # lr 1e-4, 3 epochs: still far from converged, so seeds show
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_lbfgs_model_selection_never_sees_test_labels():
    # Noisy, overlapping classes in high dimension: the chosen L2 strength really matters.
    train_x, train_y, test_x, test_y = (torch.tensor(a) for a in
                                        gaussian_classes(300, 200, dim=64, spread=0.2))
    train_x, test_x = train_x.float(), test_x.float()
    grid = (1e-4, 1e-2, 1.0)
    base = linear_probe_lbfgs(train_x, train_y, test_x, test_y, 5, l2_grid=grid, max_iter=50)
    shuffled = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))]
    other = linear_probe_lbfgs(train_x, train_y, test_x, shuffled, 5, l2_grid=grid, max_iter=50)
    assert other["l2"] == base["l2"] and other["val_accuracies"] == base["val_accuracies"]
    assert other["train_accuracy"] == base["train_accuracy"]
    assert len(set(base["val_accuracies"].values())) > 1  # the grid was a real choice


def test_stratified_split_holds_out_every_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 2 + [3])
    fit, val = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(torch.cat([fit, val]).sort().values, torch.arange(len(labels)))
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 3, 1, 0]
    again = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(again[0], fit) and torch.equal(again[1], val)


def test_linear_probes_reject_bad_input():
    train_x, train_y, test_x, test_y = blobs(num_train=100, num_test=20)
    train_x[0, 0] = float("nan")
    with pytest.raises(UserError, match="features of ckpt-7 contain NaN"):
        linear_probe_lbfgs(train_x, train_y, test_x, test_y, 4, name="ckpt-7")
    with pytest.raises(UserError, match="num_classes=3"):
        linear_probe_sgd(test_x, test_y, test_x, test_y, 3)


# ---------------------------------------------------------------- features


def tiny_convnet():
    """BatchNorm and Dropout make eval mode observable."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5))
    net[1].running_mean.uniform_(-0.5, 0.5)  # non-trivial running stats
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def test_extract_features_equals_manual_forward_and_restores_mode():
    net = tiny_convnet()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    feats = extract_features(net, images, mean, std, batch_size=3)  # 4 uneven batches
    assert net.training and feats.dtype == torch.float32 and feats.shape == (10, 5)
    net.eval()
    with torch.no_grad():
        x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
            std).view(1, 3, 1, 1)
        expected = net(x)
    torch.testing.assert_close(feats, expected)
    extract_features(net, images, mean, std)
    assert not any(m.training for m in net.modules())  # eval stays eval
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training net keeps its own mode
    extract_features(net, images, mean, std)
    assert [m.training for m in net.modules()] == [True, True, False] + [True] * 5


def test_extract_features_rejects_bad_images():
    net = tiny_convnet()
    with pytest.raises(UserError, match="uint8"):
        extract_features(net, torch.rand(2, 3, 8, 8), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(UserError, match="2 values but the images have 3 channels"):
        extract_features(net, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), (0.5, 0.5), (0.2,) * 3)


def test_pixel_features_are_normalised_per_channel_then_flat():
    """The paper's input row: (x / 255 - mean_c) / std_c per channel, flattened C, H, W."""
    images = torch.tensor([0, 255, 51, 102], dtype=torch.uint8).view(1, 1, 2, 2).repeat(2, 3, 1, 1)
    feats = pixel_features(images, mean=(0.2, 0.4, 0.0), std=(0.5, 0.25, 1.0))
    assert feats.shape == (2, 12) and feats.dtype == torch.float32
    unit = torch.tensor([0.0, 1.0, 0.2, 0.4])
    torch.testing.assert_close(feats[0], torch.cat([(unit - 0.2) / 0.5, (unit - 0.4) / 0.25,
                                                    unit]))
    own = pixel_features(images)  # default: these images' own statistics
    torch.testing.assert_close(own.view(2, 3, 4).mean((0, 2)), torch.zeros(3), atol=1e-6,
                               rtol=0)
    floats = torch.randn(2, 3, 2, 2)  # already normalised: flattened as they are
    assert torch.equal(pixel_features(floats), floats.flatten(1))
    with pytest.raises(UserError, match="already normalised"):
        pixel_features(floats, mean=(0.5,) * 3, std=(0.2,) * 3)


# ---------------------------------------------------------------- CUDA (skipped on CPU)


@CUDA
def test_probes_on_cuda_match_cpu():
    train_x, train_y, test_x, test_y = (torch.tensor(a) for a in gaussian_classes())
    cpu = knn_predict(train_x, train_y, test_x, (1, 5, 20))
    gpu = knn_predict(train_x.cuda(), train_y.cuda(), test_x.cuda(), (1, 5, 20))
    for k in cpu:
        assert gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k])  # float64 on both
    train_x, train_y, test_x, test_y = (t.cuda() for t in blobs())
    assert linear_probe_sgd(train_x, train_y, test_x, test_y, 4)["accuracy"] >= 0.95
    assert linear_probe_lbfgs(train_x, train_y, test_x, test_y, 4)["accuracy"] >= 0.95
    net = tiny_convnet().cuda()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, device="cuda")
    feats = extract_features(net, images, (0.5,) * 3, (0.25,) * 3, batch_size=4)
    assert feats.is_cuda and feats.dtype == torch.float32 and net.training
