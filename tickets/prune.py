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
on the device or the sort kernel. The threshold (the num_prune-th smallest score, exact)
comes from `torch.kthvalue` on the weights' device, nothing copied to the host; on a CPU a
strided sample first brackets it, so kthvalue runs on the few scores near it (see
`kth_smallest`).
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


# Scores from which a CPU brackets the threshold with a sample before kthvalue, and the
# most scores that strided sample holds.
SAMPLE_FROM = 1 << 14
SAMPLE_SIZE = 8192


def keep_largest(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Bool (N,) keeping the `num_keep` largest scores; ties prune the lower index first.

    scores: (N,), no NaN. Everything above the threshold (the num_prune-th smallest score)
    stays, and of the scores equal to it the highest-indexed ones until num_keep stay.
    """
    num_prune = scores.numel() - num_keep
    if num_keep < 0 or num_prune < 0:
        raise ValueError(f"cannot keep {num_keep} of {scores.numel()} scores")
    if num_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_smallest(scores, num_prune)
    if scores.device.type == "cpu":
        return keep_above(scores, threshold, num_keep)
    return keep_by_cumsum(scores, threshold, num_prune)


def keep_above(scores: torch.Tensor, threshold: torch.Tensor, num_keep: int) -> torch.Tensor:
    """The CPU's tie rule: two passes (>, count), then the tied scores still needed (the
    last ones) by index; the 0.7M-score cumsum of `keep_by_cumsum` cost 0.6 ms there."""
    keep = scores > threshold  # (N,) bool
    missing = num_keep - int(keep.count_nonzero())  # tied scores that stay: the last ones
    if missing:
        tied = (scores == threshold).nonzero().squeeze(1)  # (T,) ascending flat indices
        keep[tied[len(tied) - missing:]] = True
    return keep


def keep_by_cumsum(scores: torch.Tensor, threshold: torch.Tensor,
                   num_prune: int) -> torch.Tensor:
    """The accelerator's tie rule: elementwise passes and a cumsum, no host sync."""
    below = scores < threshold
    tied = scores == threshold
    # Of the scores equal to the threshold, prune the first ones until num_prune are gone.
    extra = num_prune - below.sum()
    return ~(below | (tied & (tied.cumsum(0) <= extra)))


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest of scores (N,) (k from 1), exact, as a 0-d tensor on their device.

    torch.kthvalue, except on a CPU from SAMPLE_FROM scores: there kthvalue (one thread,
    ~12 ns a score) took 4 ms for ResNet18/4's 0.7M weights, 6x NumPy's partition. A
    strided sample of N / 16 (at most SAMPLE_SIZE) scores brackets the value in (lo, hi];
    the search goes on in the band of scores inside, ~5 % of them (~9 % from 16k), or
    ends at lo when the k-th is lo itself (many tied scores). A bracket that misses
    (scores ordered against the stride) falls back to the full kthvalue, so the value is
    exact whatever the sample says.
    """
    total = scores.numel()
    if scores.device.type != "cpu" or total < SAMPLE_FROM:
        return scores.kthvalue(k).values
    lo, hi = bracket(scores[::max(16, total // SAMPLE_SIZE)], k / total)
    low = scores <= lo  # (N,) bool
    below = int(low.count_nonzero())
    inside = (scores <= hi).logical_xor_(low)  # (N,) bool: lo < score <= hi
    # nonzero of the bytes, not of the bools: 0.4 ms instead of 0.6 ms for 0.7M scores
    band = scores.index_select(0, inside.view(torch.uint8).nonzero().squeeze(1))  # (M,)
    if below < k <= below + len(band):  # in the band: search on there
        return (kth_smallest(band, k - below) if len(band) <= total // 2
                else band.kthvalue(k - below).values)
    if k <= below and int((scores < lo).count_nonzero()) < k:  # lo itself, tied
        return lo
    return scores.kthvalue(k).values


def bracket(sample: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) around the `quantile` of the scores the sample (m,) was drawn from: the
    sample's order statistics 2 sqrt(m) ranks either side (the rank of a quantile in a
    random sample has standard deviation <= sqrt(m) / 2: 4 of them), -inf / inf past its
    ends."""
    size = len(sample)
    centre, margin = quantile * size, 2 * math.sqrt(size)
    low, high = math.floor(centre - margin), math.ceil(centre + margin)
    lo = sample.kthvalue(low).values if low >= 1 else sample.new_tensor(-math.inf)
    hi = sample.kthvalue(high).values if high <= size else sample.new_tensor(math.inf)
    return lo, hi


def prune_by_scores(scores: dict[str, torch.Tensor], mask: Masks, num_keep: int) -> Masks:
    """Keep the `num_keep` highest-scoring weights among those `mask` keeps, globally."""
    flat = torch.cat([scores[name].detach().flatten() for name in mask]).float()  # (N,)
    return prune_flat(flat, mask, num_keep)


def prune_flat(flat: torch.Tensor, mask: Masks, num_keep: int) -> Masks:
    """`prune_by_scores` on the scores concatenated in mask order, flat (N,) float32, which
    this overwrites (pruned weights score -inf)."""
    kept = torch.cat([m.to(flat.device).flatten() for m in mask.values()])  # (N,) bool
    num_kept = int(kept.count_nonzero())
    if num_keep > num_kept:
        raise ValueError(f"cannot keep {num_keep} weights: the mask keeps fewer")
    if len(kept) > num_kept:  # a dense mask (IMP's first level) needs no fill
        flat.masked_fill_(~kept, -math.inf)
    if len(flat) and torch.isnan(flat.max()):  # max propagates NaN: one pass, one sync
        raise UserError("a prunable weight is NaN: the network diverged; lower the lr")
    keep = keep_largest(flat, num_keep)
    sizes = [m.numel() for m in mask.values()]
    return {name: part.view(m.shape) for (name, m), part in
            zip(mask.items(), keep.split(sizes))}


def magnitude_prune(weights: dict[str, torch.Tensor], mask: Masks, num_keep: int) -> Masks:
    """The ticket's next mask: the `num_keep` largest |w| among the weights `mask` keeps.

    weights: name -> tensor for every name of `mask` (any device; the result lives there).
    """
    flat = torch.cat([weights[name].detach().flatten() for name in mask]).float()  # (N,)
    return prune_flat(flat.abs_(), mask, num_keep)


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
