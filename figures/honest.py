"""What keeps a figure honest: spreads that fit the data, no silent mixing, no silent gaps.

- `spread`: mean over seeds with a 95 % t-interval from 3 seeds on, the min-max range with
  2 (a t-interval of n = 2 is +-12.7 standard deviations), clipped to the metric's range.
- `config_groups`: results split by the config keys that differ between them (seeds and
  the keys a figure draws on its own axes left out), so two recipes never share an axis.
- `note_incomplete`: "N of M cells done" on a figure drawn from a result still being written.
"""

import sys
import warnings

import numpy as np
from scipy import stats

SPREAD_LEGEND = "mean and 95 % t-interval over seeds (min-max where 2 seeds; n seeds)"


def nanmean(values, axis=None):
    """np.nanmean without the 'Mean of empty slice' warning: all-NaN slices give NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis)


def spread(values, low: float = None, high: float = None, confidence: float = 0.95):
    """(mean, lower, upper) over axis 1 of (rows, seeds), ignoring NaN.

    n >= 3: the two-sided t-interval t_{(1+c)/2, n-1} * std(ddof=1) / sqrt(n); n = 2: the
    min and the max; n < 2: NaN. Both bounds clipped to [low, high] (e.g. 0 and 100 %).
    """
    values = np.asarray(values, dtype=float)
    count = np.isfinite(values).sum(1)
    mean = nanmean(values, 1)
    lower, upper = np.full(mean.shape, np.nan), np.full(mean.shape, np.nan)
    several = count >= 3
    if several.any():
        sd = np.nanstd(values[several], 1, ddof=1)
        half = stats.t.ppf((1 + confidence) / 2, count[several] - 1) * sd / np.sqrt(
            count[several])
        lower[several], upper[several] = mean[several] - half, mean[several] + half
    two = count == 2
    if two.any():
        lower[two], upper[two] = np.nanmin(values[two], 1), np.nanmax(values[two], 1)
    return mean, np.clip(lower, low, high), np.clip(upper, low, high)


def flat(config: dict, prefix: str = "") -> dict:
    """{'train.batch_size': 64, ...}: nested config dicts as dotted keys."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def ignored(key: str, ignore) -> bool:
    """`key` is in `ignore` or under one of its entries ('train' covers 'train.sha256')."""
    return any(key == name or key.startswith(f"{name}.") for name in ignore)


def differing(results, ignore=()) -> list[str]:
    """Config keys (dotted) whose values differ between results, less `ignore` (an entry
    also covers the keys nested under it)."""
    configs = [flat(r.config) for r in results]
    keys = sorted(k for k in {k for c in configs for k in c} if not ignored(k, ignore))
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def config_groups(results, ignore=()) -> list[tuple[dict, list]]:
    """[(the differing keys' values, results)] in first-seen order: one group per recipe.

    One group (with an empty dict) when the results agree on every key not in `ignore`.
    """
    keys = differing(results, ignore)
    groups = {}
    for result in results:
        config = flat(result.config)
        values = tuple((k, config.get(k)) for k in keys)
        groups.setdefault(values, []).append(result)
    return [(dict(values), members) for values, members in groups.items()]


def group_name(values: dict) -> str:
    """'batch_size=64, lr=0.1': a group's differing keys, last dotted part, for titles."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


def file_suffix(values: dict) -> str:
    """'batch_size64_lr0.1': a group's differing keys for a file name."""
    text = "_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in values.items())
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text)


def cells_done(result) -> tuple[int, int]:
    """(finished cells, all cells) of a result; a result without a `done` mask is complete."""
    if result.done is None:
        return 1, 1
    done = np.asarray(result.done, dtype=bool)
    return int(done.sum()), int(done.size)


def incomplete(results) -> list[str]:
    """'FILE: N of M cells done' for each result not yet finished."""
    out = []
    for result in results:
        done, total = cells_done(result)
        if done < total:
            out.append(f"{result.path}: {done} of {total} cells done")
    return out


def note_incomplete(fig, results) -> None:
    """A visible note under the figure for results still being written (or killed)."""
    notes = []
    for result in results:
        done, total = cells_done(result)
        if done < total:
            name = str(result.path).replace("\\", "/").rsplit("/", 1)[-1]
            notes.append(f"{name}: {done} of {total} cells done")
    if notes:
        fig.text(0.5, 0.0, "incomplete: " + "; ".join(notes), ha="center", va="top",
                 fontsize="x-small", color="firebrick")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def refuse_mixed(results, allowed, figure: str) -> None:
    """A UserError naming the config keys (and their values) that differ between `results`
    beyond `allowed`: one figure draws one recipe."""
    from runs.errors import UserError
    keys = differing(results, allowed)
    if keys:
        configs = [flat(r.config) for r in results]
        found = "; ".join(f"{k}: {', '.join(sorted({repr(c.get(k)) for c in configs}))}"
                          for k in keys)
        raise UserError(f"figure {figure}: the results differ in {found}; one figure draws "
                        f"one recipe: point --results at the runs of one setting")
