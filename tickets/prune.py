"""Global pruning of the remaining prunable weights: by magnitude (tickets) or at random
(globally, or a layerwise shuffle of the ticket's mask).

How many weights survive (the one rounding rule, exact and tested):

    kept_count(total, rate, level) = floor(total * (1 - rate) ** level + 0.5)

i.e. the density after L levels is 0.8^L (rate 0.2) rounded half-up to whole weights, in
float64, independent of the path through earlier levels. Level l prunes
kept_count(l - 1) - kept_count(l) of the weights level l - 1 kept, about `rate` of them.
Counts never increase with the level, so masks nest.

Which weights go: the smallest |w| over all prunable tensors together (global, not per
layer); weights pruned before score -inf and go first. Ties in magnitude are broken by flat
index in the mask's parameter order (lower index pruned first), so the result never depends
on the device or the sort kernel. The threshold comes from one `torch.kthvalue` on the
weights' device; nothing is sorted on the host.
"""

import hashlib
import math

import torch

from runs.errors import UserError
from tickets.mask import Masks


def check_rate(rate: float) -> None:
    if not 0 < rate < 1:
        raise UserError(f"--rate {rate}: the fraction pruned per level must lie in (0, 1), "
                        f"e.g. 0.2")


def kept_count(total: int, rate: float, level: int) -> int:
    """Prunable weights left after `level` levels (see the module docstring)."""
    return math.floor(total * (1.0 - rate) ** level + 0.5)


def max_levels(total: int, rate: float) -> int:
    """The most levels that leave at least one weight (total * (1 - rate)^L >= 0.5)."""
    if total < 1:
        return 0
    level = max(0, math.floor(math.log(0.5 / total) / math.log(1.0 - rate)))
    while level > 0 and kept_count(total, rate, level) < 1:  # float error of the log,
        level -= 1                                           # either way
    while kept_count(total, rate, level + 1) >= 1:
        level += 1
    return level


def check_levels(levels: int, total: int, rate: float) -> None:
    """A level count that leaves no weight (or is negative) is an error before training."""
    if levels < 0:
        raise UserError(f"--levels {levels}: must be 0 (dense only) or more")
    most = max_levels(total, rate)
    if levels > most:
        raise UserError(f"--levels {levels} leaves no weight: {total} prunable weights at "
                        f"--rate {rate} last {most} levels "
                        f"({kept_count(total, rate, most)} weight(s) left)")


def keep_largest(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Bool (N,) keeping the `num_keep` largest scores; ties prune the lower index first."""
    num_prune = scores.numel() - num_keep
    if num_keep < 0 or num_prune < 0:
        raise ValueError(f"cannot keep {num_keep} of {scores.numel()} scores")
    if num_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(num_prune).values  # the num_prune-th smallest, on the device
    below = scores < threshold
    tied = scores == threshold
    # Of the scores equal to the threshold, prune the first ones until num_prune are gone.
    extra = num_prune - below.sum()
    return ~(below | (tied & (tied.cumsum(0) <= extra)))


def prune_by_scores(scores: dict[str, torch.Tensor], mask: Masks, num_keep: int) -> Masks:
    """Keep the `num_keep` highest-scoring weights among those `mask` keeps, globally."""
    if num_keep > sum(int(m.sum()) for m in mask.values()):
        raise ValueError(f"cannot keep {num_keep} weights: the mask keeps fewer")
    flat = torch.cat([scores[name].detach().float().flatten().masked_fill(
        ~m.to(scores[name].device).flatten(), -math.inf) for name, m in mask.items()])  # (N,)
    if torch.isnan(flat).any():
        raise UserError("a prunable weight is NaN: the network diverged; lower the lr")
    keep = keep_largest(flat, num_keep)
    sizes = [m.numel() for m in mask.values()]
    return {name: part.view(m.shape) for (name, m), part in
            zip(mask.items(), keep.split(sizes))}


def magnitude_prune(weights: dict[str, torch.Tensor], mask: Masks, num_keep: int) -> Masks:
    """The ticket's next mask: the `num_keep` largest |w| among the weights `mask` keeps.

    weights: name -> tensor for every name of `mask` (any device; the result lives there).
    """
    return prune_by_scores({name: weights[name].abs() for name in mask}, mask, num_keep)


def random_prune(mask: Masks, num_keep: int, seed: int) -> Masks:
    """Keep `num_keep` weights of `mask` uniformly at random, globally (the random-pruning
    baseline). Scores are drawn on the CPU from `seed`, so every device gets the same mask."""
    gen = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(m.shape, generator=gen) for name, m in mask.items()}
    return prune_by_scores(scores, {n: m.cpu() for n, m in mask.items()}, num_keep)


def layerwise_shuffle(mask: Masks, seed: int) -> Masks:
    """The ticket's mask shuffled within each layer: the layerwise random-pruning control.

    Each tensor's entries are permuted by a random permutation drawn (on the CPU) from
    (seed, parameter name) alone, as open_lth's randomly_prune (strategy 'layerwise') draws
    one per layer from its seed: every layer keeps exactly the ticket's count, and since a
    level's permutations are those of every other level, shuffles of nested masks nest."""
    out = {}
    for name, m in mask.items():
        gen = torch.Generator().manual_seed(derived_seed("layerwise", seed, name))
        order = torch.randperm(m.numel(), generator=gen)  # (numel,)
        out[name] = m.detach().cpu().bool().flatten()[order].view(m.shape)
    return out


def derived_seed(*parts) -> int:
    """A 63-bit seed from labels, e.g. ("random", seed, level): no two labels collide."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()
    return int(digest[:15], 16)
