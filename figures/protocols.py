"""Which epoch of a run a probe table reports: its last one, or its best on the test set.

The paper reports each student's MAXIMUM OVER EPOCHS of the test-set probe: the epoch is
chosen on the very numbers it reports, an optimistic protocol ("paper"). The honest one
reads each run's last epoch ("last"). Both choose per group (one run's checkpoints of one
role: its student at every epoch probed), per probe, feature kind and seed; tables then
give the mean +- std over seeds and runs. Rows without a run (pixels, loose files, results
written before rows named their run) are groups of one, where the two coincide.
Numpy only: figures stay torch-free, and probes.evaluate prints the same summaries.
"""

import warnings

import numpy as np

from runs.errors import unknown

PROTOCOLS = {"last": "last epoch of each run (honest)",
             "paper": "best epoch of each run on the test set, as the paper (optimistic: "
                      "the epoch is selected on the numbers reported)"}
CHOICES = ("last", "paper", "both")


def groups(rows: list[dict]) -> list[list[int]]:
    """Row indices per (run, role), in first-seen order, each sorted by step (rows without
    a step keep their order); a row without a run is a group of its own."""
    found = {}
    for i, row in enumerate(rows):
        run = row.get("run") or ""
        found.setdefault((run, row.get("role", "")) if run else ("", i), []).append(i)
    return [sorted(group, key=lambda i: (_step(rows[i]), i)) for group in found.values()]


def several(rows: list[dict]) -> bool:
    """Whether some run holds several checkpoints (else both protocols give one table)."""
    return any(len(group) > 1 for group in groups(rows))


def select(accuracy: np.ndarray, rows: list[dict], protocol: str) -> tuple[list[int],
                                                                           np.ndarray]:
    """(each group's last row, accuracy per group): accuracy (checkpoint, ...) with one row
    per `rows` entry -> (groups, ...). "last": the group's last-step row; "paper": the
    maximum over the group's rows, cell by cell (each probe, feature kind and seed picks
    its own epoch; NaN cells, not probed yet, are skipped)."""
    if protocol not in PROTOCOLS:
        raise unknown("--protocol", protocol, list(PROTOCOLS))
    accuracy = np.asarray(accuracy, dtype=float)
    found = groups(rows)
    if protocol == "last":
        return [g[-1] for g in found], accuracy[[g[-1] for g in found]]
    with warnings.catch_warnings():  # a group still all NaN gives NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        best = np.stack([np.nanmax(accuracy[g], axis=0) for g in found])
    return [g[-1] for g in found], best


def chosen(protocol: str, rows_per_result: list[list[dict]]) -> list[str]:
    """The protocols to write for --protocol last|paper|both: "both" gives only the honest
    one where no run holds several checkpoints (the two would coincide)."""
    if protocol not in CHOICES:
        raise unknown("--protocol", protocol, CHOICES)
    if protocol != "both":
        return [protocol]
    return ["last", "paper"] if any(several(rows) for rows in rows_per_result) else ["last"]


def _step(row: dict) -> float:
    step = row.get("step")
    return -1.0 if step is None else float(step)
