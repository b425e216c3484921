"""Property tests (hypothesis) of the pure cores, beside the example tests of each module:
masks (idempotent, magnitude only, random masks nested and exact), shard ownership (balanced,
and `missing()` split by shard), barrier formulas (symmetric in the pair, zero for a constant
path, blind to a constant added, non-negative, scale-equivariant), interpolation (affine in
alpha, exact at the ends, buffers mixed the same way) and result merges (any order, any
split of the cells, the same file). Already covered elsewhere and not repeated here:
kept_count rounding and nested exact magnitude masks (test_tickets_prune.py), every cell
owned by one shard (test_results.py)."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _results_writer import open_scan, values
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from landscape import geometry as G
from landscape import params as P
from landscape.barrier import NAMES, barriers, linear_barrier, mean_barrier, mean_ci
from landscape.batchnorm import interpolate_buffers
from runs.results import merge_results, open_result, owned_cells, parse_shard
from tickets.mask import is_nested, num_kept
from tickets.prune import keep_largest, magnitude_prune, random_prune

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


# ---------------------------------------------------------------------------- masks


@st.composite
def weights_and_mask(draw):
    """name -> weights and a mask keeping some of them (the state after a few levels)."""
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
                           min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    weights = {f"p{i}": torch.randn(shape, generator=gen) for i, shape in enumerate(shapes)}
    if draw(st.booleans()):  # rounded weights: many ties
        weights = {n: w.round() for n, w in weights.items()}
    mask = {n: torch.rand(w.shape, generator=gen) < draw(st.floats(0.3, 1.0))
            for n, w in weights.items()}
    assume(num_kept(mask) > 0)
    return weights, mask


@SETTINGS
@given(weights_and_mask())
def test_pruning_to_the_count_a_mask_keeps_changes_nothing(case):
    weights, mask = case
    again = magnitude_prune(weights, mask, num_kept(mask))
    assert all(torch.equal(again[n], mask[n]) for n in mask)


@SETTINGS
@given(weights_and_mask(), st.floats(0.0, 1.0), st.floats(1e-3, 1e3))
def test_magnitude_pruning_is_idempotent_and_sees_only_magnitudes(case, fraction, factor):
    weights, mask = case
    keep = int(fraction * num_kept(mask))
    once = magnitude_prune(weights, mask, keep)
    twice = magnitude_prune(weights, once, keep)
    flipped = {n: -factor * w for n, w in weights.items()}  # same order of |w|
    same = magnitude_prune(flipped, mask, keep)
    for n in mask:
        assert torch.equal(once[n], twice[n]) and torch.equal(once[n], same[n])
    assert num_kept(once) == keep and is_nested(once, mask)


@SETTINGS
@given(weights_and_mask(), st.lists(st.floats(0.05, 0.95), min_size=1, max_size=5),
       st.integers(0, 2**40))
def test_random_masks_are_nested_exact_and_seeded(case, rates, seed):
    _, mask = case
    for level, rate in enumerate(rates):
        keep = int(num_kept(mask) * (1 - rate))
        pruned = random_prune(mask, keep, seed + level)
        assert num_kept(pruned) == keep and is_nested(pruned, mask)
        repeat = random_prune(mask, keep, seed + level)
        assert all(torch.equal(pruned[n], repeat[n]) for n in mask)
        mask = pruned


@SETTINGS
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.data())
def test_keep_largest_keeps_exactly_the_top_and_prunes_ties_from_the_front(scores, data):
    scores = torch.tensor(scores, dtype=torch.float32)
    keep = data.draw(st.integers(0, len(scores)))
    kept = keep_largest(scores, keep)
    assert int(kept.sum()) == keep
    if 0 < keep < len(scores):
        assert scores[kept].min() >= scores[~kept].max()
        tied = (scores == scores[kept].min()).nonzero().flatten()  # the boundary value
        dropped = tied[~kept[tied]]
        if len(dropped):  # among equal scores the lower indices go first
            assert dropped.max() < tied[kept[tied]].min()


# ---------------------------------------------------------------------------- shards


@SETTINGS
@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(1, 7))
def test_shards_are_balanced(shape, count):
    sizes = [len(owned_cells(shape, (i, count))) for i in range(count)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == int(np.prod(shape))


@SETTINGS
@given(st.integers(0, 50), st.integers(1, 50))
def test_shard_specs_round_trip(index, count):
    assume(index < count)
    assert parse_shard(f"{index}/{count}") == (index, count)
    assert parse_shard(f" {index} / {count} ") == (index, count)


# ---------------------------------------------------------------------------- barriers


@st.composite
def paths(draw):
    """(loss, error, alphas): curves on a grid holding 0 and 1, maybe points beyond."""
    inner = draw(st.lists(st.floats(0.01, 0.99), max_size=8, unique=True))
    outer = draw(st.lists(st.floats(-1.0, 2.0).filter(lambda a: not -1e-6 <= a <= 1 + 1e-6),
                          max_size=3, unique=True))  # (clear of the ends after 1 - alpha)
    alphas = np.array(sorted({0.0, 1.0, *inner, *outer}))
    loss = np.array(draw(st.lists(FINITE, min_size=len(alphas), max_size=len(alphas))))
    error = np.array(draw(st.lists(st.floats(0, 1), min_size=len(alphas),
                                   max_size=len(alphas))))
    return loss, error, alphas


def close(a: dict, b: dict) -> bool:
    return all(np.allclose(a[k], b[k], rtol=1e-9, atol=1e-9) for k in NAMES)


@SETTINGS
@given(paths())
def test_barriers_are_symmetric_in_the_pair(path):
    """Swapping A and B reverses the path: alpha -> 1 - alpha."""
    loss, error, alphas = path
    swapped = barriers(loss[::-1], error[::-1], (1 - alphas)[::-1])
    assert close(barriers(loss, error, alphas), swapped)


@SETTINGS
@given(paths(), FINITE)
def test_barriers_ignore_a_constant_added_to_the_curves(path, shift):
    loss, error, alphas = path
    assert close(barriers(loss, error, alphas), barriers(loss + shift, error + shift, alphas))


@SETTINGS
@given(paths(), st.floats(1e-3, 1e3))
def test_barriers_are_non_negative_and_scale_with_the_curves(path, factor):
    loss, error, alphas = path
    found = barriers(loss, error, alphas)
    assert all((found[k] >= -1e-9).all() for k in NAMES)  # the endpoints are on the path
    scaled = barriers(factor * loss, factor * error, alphas)
    assert all(np.allclose(scaled[k], factor * found[k], rtol=1e-9, atol=1e-6) for k in NAMES)


@SETTINGS
@given(st.lists(st.floats(0.01, 0.99), max_size=8, unique=True), FINITE, FINITE)
def test_identical_endpoints_or_a_straight_path_have_no_barrier(inner, level, slope):
    alphas = np.array(sorted({0.0, 1.0, *inner}))
    flat = np.full(len(alphas), level)  # one model twice: every point is that model
    assert all(v == 0 for v in barriers(flat, flat, alphas).values())
    straight = level + slope * alphas
    assert abs(linear_barrier(straight, alphas)) <= 1e-9 * (1 + abs(level) + abs(slope))
    assert mean_barrier(straight, alphas) == pytest.approx(abs(slope) / 2, abs=1e-9 * (
        1 + abs(level) + abs(slope)))


@SETTINGS
@given(st.lists(FINITE, min_size=2, max_size=20))
def test_the_confidence_interval_holds_the_mean_symmetrically(values):
    ci = mean_ci(np.array(values))
    assert ci["ci_low"] <= ci["mean"] + 1e-9 and ci["mean"] <= ci["ci_high"] + 1e-9
    assert ci["mean"] - ci["ci_low"] == pytest.approx(ci["ci_high"] - ci["mean"], abs=1e-6)


# ---------------------------------------------------------------------------- interpolation


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net


@SETTINGS
@given(st.integers(0, 1000), st.lists(st.floats(-1.0, 2.0), min_size=1, max_size=6))
def test_a_line_is_affine_in_alpha_and_exact_at_its_ends(seed, alphas):
    a, b = tiny_net(seed), tiny_net(seed + 1)
    geometry = G.line(a, b)
    coords = torch.tensor([[0.0], [1.0], *[[x] for x in alphas]], dtype=torch.float64)
    points = geometry.params_at(coords)
    for name, pa in a.named_parameters():
        pb = dict(b.named_parameters())[name]
        assert torch.equal(points[name][0], pa) and torch.equal(points[name][1], pb)
        for i, alpha in enumerate(alphas, start=2):
            expected = pa + alpha * (pb - pa)
            assert torch.allclose(points[name][i], expected, atol=1e-5)
            swapped = P.lerp({name: pb.detach()}, {name: pa.detach()}, 1 - alpha)[name]
            assert torch.allclose(points[name][i], swapped, atol=1e-5)


@SETTINGS
@given(st.integers(0, 1000), st.lists(st.tuples(st.floats(-1, 2), st.floats(-1, 2)),
                                      min_size=2, max_size=5))
def test_a_plane_is_affine_in_its_coordinates(seed, coords):
    nets = [tiny_net(seed + k) for k in range(3)]
    geometry = G.plane(*nets, basis="lstsq")
    c = torch.tensor(coords, dtype=torch.float64)
    points = geometry.params_at(c)
    origin = geometry.params_at(torch.zeros(1, 2, dtype=torch.float64))
    summed = geometry.params_at(c.sum(0, keepdim=True))
    for name in points:  # params(sum c) - origin = sum (params(c) - origin)
        offsets = (points[name] - origin[name]).sum(0)
        assert torch.allclose(summed[name][0] - origin[name][0], offsets, atol=1e-4)
    weights = geometry.anchor_weights(c)  # barycentric: rows sum to 1, reproduce coords
    assert torch.allclose(weights.sum(1), torch.ones(len(c), dtype=torch.float64))
    anchors = torch.tensor(list(geometry.anchor_coords.values()), dtype=torch.float64)
    assert torch.allclose(weights @ anchors, c, atol=1e-9)


@SETTINGS
@given(st.integers(0, 1000), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5))
def test_bn_buffers_interpolate_like_the_weights(seed, alphas):
    a, b = tiny_net(seed), tiny_net(seed + 1)
    buffers = [dict(net.named_buffers()) for net in (a, b)]
    weights = torch.tensor([[1 - x, x] for x in alphas], dtype=torch.float64)
    mixed = interpolate_buffers(buffers, weights)
    for name, first in buffers[0].items():
        for i, alpha in enumerate(alphas):
            if first.is_floating_point():
                expected = P.lerp({name: first}, {name: buffers[1][name]}, alpha)[name]
                assert torch.allclose(mixed[name][i], expected, atol=1e-5)
            else:  # batch counts come from the first anchor
                assert torch.equal(mixed[name][i], first)


# ---------------------------------------------------------------------------- merging


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 2), min_size=12, max_size=12), st.integers(2, 3),
       st.randoms(use_true_random=False))
def test_merging_is_independent_of_order_and_of_how_cells_were_split(owners, files, rng):
    """Cells spread over files in any way (some in two, some in none): every merge order
    gives the same file, holding exactly the union of the cells with their values."""
    cells = [(p, a) for p in range(3) for a in range(4)]
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for f in range(files):
            path = Path(folder) / f"part{f}.h5"
            with open_scan(path) as result:
                for cell, owner in zip(cells, owners):
                    if owner % files == f or (owner == 2 and f == 0):  # some cells twice
                        result.write(cell, **values(cell))
            paths.append(str(path))
        order = paths[:]
        rng.shuffle(order)
        one = merge_results(Path(folder) / "one.h5", paths)
        other = merge_results(Path(folder) / "other.h5", order)
        for name in one.metrics:
            np.testing.assert_array_equal(one.metrics[name], other.metrics[name])
        assert (one.done == other.done).all()
        expected = np.zeros((3, 4), bool)
        for path in paths:
            expected |= open_result(path).done
        assert (one.done == expected).all()
        for cell in cells:
            if one.done[cell]:
                assert np.allclose(one.metrics["loss"][cell], values(cell)["loss"])
