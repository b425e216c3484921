"""Pruning invariants: exact counts, nested masks, agreement with torch.nn.utils.prune,
deterministic ties, scopes and random masks (no training; milliseconds each)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune as torch_prune

from runs.errors import UserError
from runs.models import create_model
from tickets.mask import (
    dense_mask,
    density,
    is_nested,
    num_kept,
    num_total,
    prunable_names,
    prunes_output,
    read_mask,
    save_mask,
)
from tickets.prune import (
    SAMPLE_FROM,
    check_levels,
    check_rate,
    keep_above,
    keep_by_cumsum,
    keep_largest,
    kept_count,
    kth_smallest,
    layerwise_shuffle,
    magnitude_prune,
    max_levels,
    random_prune,
)


def convnet():
    return create_model("convnet", num_classes=4, width=0.125, seed=0)


def shapes_strategy():
    shape = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
    return st.lists(shape, min_size=1, max_size=4)


# --- the rounding rule --------------------------------------------------------------------

@given(total=st.integers(1, 10**8), rate=st.floats(0.01, 0.99), level=st.integers(0, 40))
def test_kept_count_is_the_rounded_density_and_never_grows(total, rate, level):
    kept = kept_count(total, rate, level)
    exact = total * (1 - rate) ** level
    assert kept == math.floor(exact + 0.5)
    assert abs(kept - exact) <= 0.5 + 1e-6 * exact
    assert kept_count(total, rate, level + 1) <= kept
    assert kept_count(total, rate, 0) == total


def test_kept_count_golden_numbers():
    # convnet width 0.125, 4 classes: conv 108 + 288 + 1152, fc 64 weights = 1612.
    assert [kept_count(1612, 0.2, level) for level in range(6)] == \
        [1612, 1290, 1032, 825, 660, 528]
    assert kept_count(11_168_832, 0.2, 24) == 52_743  # resnet18 encoder at 0.47 %


@given(total=st.integers(1, 10**9), rate=st.floats(1e-4, 0.999))
def test_max_levels_is_the_last_level_with_a_weight(total, rate):
    most = max_levels(total, rate)
    assert kept_count(total, rate, most) >= 1 and kept_count(total, rate, most + 1) == 0


def test_max_levels_and_the_errors_before_training():
    assert max_levels(1612, 0.2) == 36  # 1612 * 0.8^36 = 0.52 rounds to 1, 0.8^37 to 0
    assert kept_count(1612, 0.2, 36) == 1 and kept_count(1612, 0.2, 37) == 0
    check_levels(36, 1612, 0.2)
    with pytest.raises(UserError, match="--levels 37 leaves no weight"):
        check_levels(37, 1612, 0.2)
    with pytest.raises(UserError, match="--levels -1"):
        check_levels(-1, 1612, 0.2)
    for rate in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(UserError, match="--rate"):
            check_rate(rate)


# --- magnitude pruning -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(shapes=shapes_strategy(), rate=st.floats(0.05, 0.95), levels=st.integers(1, 8),
       seed=st.integers(0, 2**31), ties=st.booleans())
def test_masks_are_nested_with_exact_counts(shapes, rate, levels, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    mask = {f"p{i}": torch.ones(shape, dtype=torch.bool) for i, shape in enumerate(shapes)}
    total = num_total(mask)
    for level in range(1, levels + 1):
        # New weights every level, as after training; rounded ones make many ties.
        weights = {n: torch.randn(m.shape, generator=gen) for n, m in mask.items()}
        if ties:
            weights = {n: w.round() for n, w in weights.items()}
        pruned = magnitude_prune(weights, mask, kept_count(total, rate, level))
        assert num_kept(pruned) == kept_count(total, rate, level)
        assert is_nested(pruned, mask)
        assert density(pruned) == kept_count(total, rate, level) / total
        kept_min = min((w.abs()[m].min() for w, m in zip(weights.values(), pruned.values())
                        if m.any()), default=math.inf)
        dropped = [w.abs()[mask[n] & ~pruned[n]] for n, w in weights.items()]
        dropped_max = max((d.max() for d in dropped if d.numel()), default=-math.inf)
        assert dropped_max <= kept_min  # magnitude order among the weights still in play
        mask = pruned


def test_same_weights_as_torch_global_unstructured():
    """Level after level (with new continuous weights each time, as after training)."""
    ours, theirs = convnet(), convnet()
    names = prunable_names(ours)
    assert names == ["encoder.0.weight", "encoder.4.weight", "encoder.8.weight", "fc.weight"]
    modules = dict(theirs.named_modules())
    targets = [(modules[n.rsplit(".", 1)[0]], "weight") for n in names]
    mask, total, gen = dense_mask(ours, names), 1612, torch.Generator().manual_seed(1)
    for level in range(1, 8):
        weights = {n: torch.randn(p.shape, generator=gen) for n, p in ours.named_parameters()}
        with torch.no_grad():
            for (module, _), name in zip(targets, names):
                if level == 1:
                    module.weight.copy_(weights[name])
                else:  # torch scores `module.weight` = weight_orig * mask: refresh it
                    module.weight_orig.copy_(weights[name])
                    module.weight = module.weight_orig * module.weight_mask
        amount = kept_count(total, 0.2, level - 1) - kept_count(total, 0.2, level)
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured,
                                        amount=amount)
        mask = magnitude_prune(weights, mask, kept_count(total, 0.2, level))
        for (module, _), name in zip(targets, names):
            assert torch.equal(module.weight_mask.bool(), mask[name]), (level, name)


def test_ties_prune_the_lower_flat_index_first():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 2.0, 0.5])
    assert keep_largest(scores, 3).tolist() == [False, False, False, True, True, True, False]
    assert keep_largest(scores, 7).all() and not keep_largest(scores, 0).any()
    weights = {"a": torch.ones(2, 3), "b": torch.ones(4)}  # all tied: the last 5 of 10 stay
    mask = magnitude_prune(weights, {n: torch.ones_like(w, dtype=torch.bool)
                                     for n, w in weights.items()}, 5)
    assert mask["a"].flatten().tolist() == [False] * 5 + [True]
    assert mask["b"].all()


def test_pruned_weights_go_first_even_when_larger():
    weights = {"w": torch.tensor([5.0, 0.1, 0.2, 9.0])}
    mask = {"w": torch.tensor([True, True, True, False])}
    assert magnitude_prune(weights, mask, 2)["w"].tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="keeps fewer"):
        magnitude_prune(weights, mask, 4)


def adversarial_scores(kind: str, count: int, gen: torch.Generator) -> torch.Tensor:
    """Scores (count,) that a strided sample misjudges, or with many ties or -inf."""
    x = torch.randn(count, generator=gen)
    if kind == "stride":  # every 16th score (the sample's stride) far above the rest
        x[::16] = 100 + torch.arange(len(x[::16]), dtype=torch.float32)
    elif kind == "sorted":
        x = x.sort(descending=True).values
    elif kind == "ties":
        x = (3 * x).round().abs()
    elif kind == "pruned":  # most scores -inf, as at a late IMP level
        x[torch.rand(count, generator=gen) < 0.8] = -math.inf
    return x


@pytest.mark.parametrize("kind", ["random", "stride", "sorted", "ties", "pruned"])
@pytest.mark.parametrize("count", [SAMPLE_FROM - 1, SAMPLE_FROM, 5 * SAMPLE_FROM, 2**19 + 3])
def test_the_sampled_threshold_is_kthvalue_exactly(kind, count):
    """The CPU's bracketing sample (with its band, recursion and fallback) finds the k-th
    smallest value exactly, at any rank, whatever the order of the scores. (The oracle
    sorts: torch.kthvalue itself takes seconds on descending scores.)"""
    gen = torch.Generator().manual_seed(count)
    scores = adversarial_scores(kind, count, gen)
    ordered = scores.sort().values
    for k in (1, 2, count // 5, count // 2, count - 1, count):
        assert torch.equal(kth_smallest(scores, k), ordered[k - 1]), k


@pytest.mark.parametrize("kind", ["random", "ties", "pruned"])
def test_both_tie_rules_give_one_mask(kind):
    """The CPU's rule (> threshold, then the last tied by index) and the accelerator's
    (cumsum over the tied) keep the same weights."""
    gen = torch.Generator().manual_seed(1)
    scores = adversarial_scores(kind, 3 * SAMPLE_FROM, gen)
    for num_keep in (0, 1, 1000, len(scores) // 2, len(scores) - 1):
        num_prune = len(scores) - num_keep
        threshold = scores.kthvalue(num_prune).values
        cpu = keep_above(scores, threshold, num_keep)
        assert torch.equal(cpu, keep_by_cumsum(scores, threshold, num_prune))
        assert int(cpu.sum()) == num_keep


def test_a_large_prune_equals_the_sort_and_index_rule():
    """Past SAMPLE_FROM weights (the sampled threshold), against a stable sort of
    (|w|, flat index): pruned weights first, then ties by lower index."""
    gen = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(300, 200, generator=gen).round(decimals=1),
               "b": torch.randn(40_000, generator=gen)}
    mask = {"a": torch.rand(300, 200, generator=gen) < 0.7, "b": torch.ones(40_000).bool()}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    flat[~torch.cat([m.flatten() for m in mask.values()])] = -math.inf
    order = torch.sort(flat, stable=True).indices  # ties keep index order: lower first
    num_keep = 50_000
    expected = torch.ones_like(flat, dtype=torch.bool)
    expected[order[:len(flat) - num_keep]] = False
    before = {n: w.clone() for n, w in weights.items()}
    got = magnitude_prune(weights, mask, num_keep)
    assert torch.equal(torch.cat([m.flatten() for m in got.values()]), expected)
    assert all(torch.equal(weights[n], before[n]) for n in weights)  # |w| taken on a copy


def test_a_nan_weight_still_in_play_is_an_error():
    weights = {"w": torch.tensor([1.0, math.nan, 2.0])}
    with pytest.raises(UserError, match="NaN"):
        magnitude_prune(weights, {"w": torch.ones(3, dtype=torch.bool)}, 1)
    pruned_nan = magnitude_prune(weights, {"w": torch.tensor([True, False, True])}, 1)
    assert pruned_nan["w"].tolist() == [False, False, True]


@pytest.mark.gpu
def test_the_device_gives_the_cpu_mask():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(64, 32, 3, 3, generator=gen).round(decimals=1),
               "b": torch.randn(10, 64, generator=gen)}
    mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    cpu = magnitude_prune(weights, mask, 5000)
    cuda = magnitude_prune({n: w.cuda() for n, w in weights.items()}, mask, 5000)
    assert all(torch.equal(cpu[n], cuda[n].cpu()) for n in cpu)


# --- scopes and random masks ----------------------------------------------------------------

def test_scopes():
    model = convnet()
    assert prunable_names(model, keep_output_dense=True) == \
        ["encoder.0.weight", "encoder.4.weight", "encoder.8.weight"]
    every = [n for n, _ in model.named_parameters()]
    assert prunable_names(model, "all") == every
    assert prunable_names(model, "all", keep_output_dense=True) == every[:-2]
    with pytest.raises(UserError, match="unknown prune scope 'conv'; valid: all, weights"):
        prunable_names(model, "conv")


def test_random_masks_are_nested_exact_and_seeded():
    mask = dense_mask(convnet(), prunable_names(convnet()))
    chain = [mask]
    for level in range(1, 6):
        chain.append(random_prune(chain[-1], kept_count(1612, 0.2, level), seed=level))
        assert num_kept(chain[-1]) == kept_count(1612, 0.2, level)
        assert is_nested(chain[-1], chain[-2])
    again = random_prune(mask, 1290, seed=1)
    assert all(torch.equal(again[n], chain[1][n]) for n in mask)
    other = random_prune(mask, 1290, seed=2)
    assert any(not torch.equal(other[n], chain[1][n]) for n in mask)


def ticket_chain(levels: int = 4) -> list:
    """A nested magnitude-pruned chain of convnet masks (level 0 dense), as IMP makes."""
    model = convnet()
    params = dict(model.named_parameters())
    chain = [dense_mask(model, prunable_names(model))]
    for level in range(1, levels + 1):
        gen = torch.Generator().manual_seed(level)  # new "trained" weights per level
        weights = {n: params[n].detach() + torch.randn(params[n].shape, generator=gen)
                   for n in chain[0]}
        chain.append(magnitude_prune(weights, chain[-1], kept_count(1612, 0.5, level)))
    return chain


def test_layerwise_shuffles_keep_each_layers_count_and_nest():
    """open_lth's layerwise control: every layer keeps the ticket's count at every level,
    and one permutation per layer (from seed and name) makes the shuffles nest."""
    chain = ticket_chain()
    counts = [{n: int(m.sum()) for n, m in mask.items()} for mask in chain]
    assert len(set(counts[-1].values())) > 1  # global pruning: layers differ in density
    shuffled = [layerwise_shuffle(mask, seed=3) for mask in chain]
    for level, (ticket, random) in enumerate(zip(chain, shuffled)):
        assert list(random) == list(ticket)
        assert {n: int(m.sum()) for n, m in random.items()} == counts[level], level
        assert all(m.dtype == torch.bool and m.shape == ticket[n].shape
                   for n, m in random.items())
        if level:
            assert is_nested(random, shuffled[level - 1]), level
            assert all(not torch.equal(random[n], ticket[n]) for n in ticket), level
    again = layerwise_shuffle(chain[2], seed=3)
    other = layerwise_shuffle(chain[2], seed=4)
    assert all(torch.equal(again[n], shuffled[2][n]) for n in again)
    assert all(not torch.equal(other[n], shuffled[2][n]) for n in other)


def test_layerwise_shuffle_is_a_permutation_within_each_layer():
    mask = {"a": torch.arange(12).reshape(3, 4) % 5 == 0, "b": torch.tensor([True, False])}
    out = layerwise_shuffle(mask, seed=0)
    for name, m in mask.items():  # the same multiset per layer, nothing moved across
        assert sorted(out[name].flatten().tolist()) == sorted(m.flatten().tolist())


@pytest.mark.parametrize("model, scope, choice, pruned", [
    ("vgg11", "weights", "auto", False),  # open_lth: fc.weight in pruning_layers_to_ignore
    ("vgg16_bn", "weights", "auto", False),
    ("mlp", "weights", "auto", False),  # open_lth's LeNet keeps its fc dense too
    ("resnet20", "weights", "auto", True),  # open_lth prunes its ResNets' fc
    ("resnet18", "weights", "auto", True),
    ("convnet", "weights", "auto", True),
    ("vgg11", "all", "auto", True),  # the paper's code: every parameter
    ("vgg11", "weights", "yes", True),
    ("resnet20", "weights", "no", False),
    ("resnet20", "all", "no", False),
])
def test_prune_output_per_model(model, scope, choice, pruned):
    assert prunes_output(model, scope, choice) is pruned


def test_prune_output_names_the_choices():
    with pytest.raises(UserError, match="'maybe'; valid: auto, no, yes"):
        prunes_output("vgg11", "weights", "maybe")


def test_mask_files_round_trip(tmp_path):
    mask = random_prune(dense_mask(convnet(), prunable_names(convnet())), 800, seed=0)
    back = read_mask(save_mask(tmp_path / "m" / "level_001.pt", mask))
    assert list(back) == list(mask) and all(torch.equal(back[n], mask[n]) for n in mask)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["level_001.pt"]  # no temp left
    with pytest.raises(UserError, match="no mask file"):
        read_mask(tmp_path / "absent.pt")
