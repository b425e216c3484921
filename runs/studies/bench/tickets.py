"""Section tickets: one IMP pruning step (tickets.prune on the device against NumPy on the
host) and the overhead of a supervised step under a mask (runs.engines.masking).

tickets is imported inside the functions: a section whose package does not import is
skipped.
"""

import statistics

import numpy as np
import torch

from runs.studies.bench.common import (
    Bench,
    Runner,
    comparison,
    measure,
    new_model,
    synthetic_images,
    synthetic_info,
    warm_up,
)
from runs.studies.bench.training import fast_train, train_flops

# ---------------------------------------------------------------------------------------
# 6. Tickets: one IMP pruning step, and the overhead of training under a mask


def prune_inputs(bench: Bench):
    """(weights name -> tensor on the device, dense mask on the device, weights to keep)."""
    from tickets.mask import dense_mask, num_total, prunable_names
    from tickets.prune import kept_count
    model = new_model(bench, synthetic_info()).to(bench.device)
    names = prunable_names(model)
    mask = {k: m.to(bench.device) for k, m in dense_mask(model, names).items()}
    weights = {k: p.detach() for k, p in model.named_parameters() if k in mask}
    return weights, mask, kept_count(num_total(mask), 0.2, 1)


def reference_prune(weights: dict, mask: dict, num_keep: int) -> dict:
    """Global magnitude pruning as open_lth does it: weights to NumPy on the host, one sort,
    a threshold, masks back (ties aside, the same mask as tickets.prune)."""
    host = {k: w.cpu().numpy() for k, w in weights.items()}
    keep = {k: m.cpu().numpy() for k, m in mask.items()}
    vector = np.abs(np.concatenate([host[k][keep[k]] for k in host]))
    num_prune = len(vector) - num_keep
    threshold = np.sort(vector)[num_prune - 1]
    return {k: torch.from_numpy(keep[k] & (np.abs(host[k]) > threshold)) for k in host}


def prune_comparison(bench: Bench) -> dict:
    """IMP's first level (a dense mask, 20 % pruned): the toolkit's global magnitude prune
    against NumPy's; the same mask (checked)."""
    from tickets.prune import magnitude_prune
    weights, mask, num_keep = prune_inputs(bench)
    how = ("kthvalue" if bench.device.type != "cpu" else
           "kthvalue in the band a strided sample brackets")
    fast = Runner(f"tickets.prune.magnitude_prune on the device ({how})", 1,
                  lambda: magnitude_prune(weights, mask, num_keep))
    ref = Runner("NumPy on the host: concatenate, sort, threshold", 1,
                 lambda: reference_prune(weights, mask, num_keep))
    paths, out = {}, {}
    for name, runner in (("fast", fast), ("reference", ref)):
        paths[name], out[name] = measure(runner, 1, bench.cfg.prune_repeats, bench.device)
    same = all(torch.equal(out["fast"][k].cpu(), out["reference"][k]) for k in mask)
    checks = {"masks_equal": same, "weights": sum(m.numel() for m in mask.values()),
              "kept": num_keep}
    return comparison("prunes/s", paths, bench, None, checks)


def masked_comparison(bench: Bench) -> dict:
    """Masked vs unmasked supervised steps: two sessions from one init, alternating rounds.

    Two sessions, not one with the mask switched on and off: unmasked steps on masked
    weights grow the pruned weights from 0 through denormal floats, slow on CPUs.
    """
    from runs.engines.masking import Mask
    from tickets.prune import magnitude_prune
    cfg = bench.cfg
    data = synthetic_images(cfg.num_images, seed=0)
    runners = {"unmasked": fast_train(bench, data), "masked": fast_train(bench, data)}
    weights, dense, _ = prune_inputs(bench)
    keep = round(cfg.mask_density * sum(m.numel() for m in dense.values()))
    s = runners["masked"].session
    s.mask = Mask(s.model, magnitude_prune(weights, dense, keep))
    s.mask.apply_to_weights()  # as runs.train starts a masked run
    for runner in runners.values():
        warm_up(runner, cfg.warmup)
    rounds = alternate(runners, cfg.mask_rounds, cfg.steps, bench.device)
    what = {"masked": f"runs.engines.train.train_step under a Mask "
                      f"({cfg.mask_density:.2f} density)",
            "unmasked": "runs.engines.train.train_step, no mask"}
    paths = {name: {"what": what[name], "steps": cfg.steps,
                    "items": cfg.steps * cfg.train_batch,
                    "seconds": statistics.median(times), "round_seconds": times}
             for name, times in rounds.items()}
    overhead = paths["masked"]["seconds"] / paths["unmasked"]["seconds"] - 1
    checks = {"overhead_pct": 100 * overhead, "goal_pct": 2.0, "within_goal": overhead < 0.02}
    return comparison("images/s", paths, bench, train_flops(bench, synthetic_info()), checks,
                      fast="masked", reference="unmasked")


def alternate(runners: dict, rounds: int, steps: int, device) -> dict:
    """name -> seconds of `steps` steps per round, the runners in A B B A ... order so a
    drift in machine speed (clocks, other load) hits both alike."""
    times = {name: [] for name in runners}
    for r in range(rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            record, _ = measure(runners[name], 0, steps, device)
            times[name].append(record["seconds"])
    return times


def section_tickets(bench: Bench) -> dict:
    return {"comparisons": {"prune_level": prune_comparison(bench),
                            "masked_step": masked_comparison(bench)}}
