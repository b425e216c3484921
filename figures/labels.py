"""Short, human names for what results record: checkpoint references, start points, units.

A reference is `[LABEL:=][NAME=]SOURCE[@STEP][:PART...]` (runs.refs); a run directory is
`<store>/<kind>_<hash>/seed_<s>`. Parsed here by hand: runs.refs imports torch. Results
written since labels exist name checkpoints by readable labels (coordinates, `label` of
each `inputs` record); older files name them by their references, parsed here.
"""

import re
from pathlib import PurePath

import numpy as np

_REF = re.compile(r"^(?:(?P<arch>[a-z][a-z0-9_]*)=)?(?P<source>[^@:]+)"
                  r"(?:@(?P<step>[^:]+))?(?P<parts>(?::[a-z]+)*)$")
_RUN = re.compile(r"^(?P<kind>[a-z]+)_[0-9a-f]+$")
KINDS = {"distill": "student", "train": "supervised"}


def dataset_name(name: str, root: str = "") -> str:
    """A dataset as a reader knows it: an `npz` dataset by its file ("cifar10-subset")."""
    if name == "npz" and root:
        return PurePath(root).stem.replace("_", "-")
    return name


def config_dataset(config: dict) -> str:
    """The dataset a command's config names (`dataset`, `data_root`), as `dataset_name`."""
    return dataset_name(config.get("dataset", ""), config.get("data_root") or "")


def moved(result) -> str:
    """What a scan moved, for titles: "encoder+fc", "encoder+head", or "whole network"
    (a caller's own module through the Python API)."""
    parts = str(result.attrs.get("parts", ""))
    return "whole network" if parts == "net" else parts


def parse(ref: str) -> dict:
    """{"source", "step", "parts", "kind", "seed", "label"} of a reference ('' where
    absent; "label": LABEL of LABEL:=REF)."""
    label, sep, rest = ref.partition(":=")
    label, ref = (label.strip(), rest) if sep else ("", ref)
    match = _REF.match(ref.strip())
    if not match:
        return {"source": ref, "step": "", "parts": (), "kind": "", "seed": "", "label": label}
    source = PurePath(match["source"])
    seed = source.name.removeprefix("seed_") if source.name.startswith("seed_") else ""
    run = _RUN.match(source.parent.name) if seed else None
    return {"source": match["source"], "step": match["step"] or "",
            "parts": tuple(p for p in match["parts"].split(":") if p),
            "kind": run["kind"] if run else "", "seed": seed, "label": label}


AT_TEACHER = (0.0, 1e-10)  # the paper's student inits (its figures' alpha, its IMP runs')


def ref_label(ref: str, record: dict = None) -> str:
    """'teacher', 'student init', 'student', 'student @8', 'noise student', 'student α=1',
    'supervised s1', 'x.pt'. `record`: the reference's entry in the result's `inputs`,
    whose `run` summary (dataset, alpha) names a noise-input or an off-recipe student.
    A record's `label` (results since labels exist) or a LABEL:=REF's LABEL wins."""
    if ref == "random":
        return "random init"
    info = parse(ref)
    if (record or {}).get("label") or info["label"]:
        return (record or {}).get("label") or info["label"]
    if "teacher" in info["parts"]:
        return "teacher"
    when = info["step"] or "last"
    if info["kind"] == "distill":
        name = student_name((record or {}).get("run", {}))
        return {"init": f"{name} init", "0": f"{name} init", "last": name}.get(
            when, f"{name} @{when}")
    if info["kind"]:
        name = f"{KINDS.get(info['kind'], info['kind'])} s{info['seed']}"
        return name if when == "last" else f"{name} @{when}"
    return PurePath(info["source"]).name


def student_name(run: dict) -> str:
    if run.get("dataset") == "noise":
        return "noise student"
    alpha = run.get("alpha", 0.0)
    return "student" if alpha in AT_TEACHER else f"student α={alpha:g}"


def input_records(result) -> dict:
    """{ref: its `inputs` record} of a result (the provenance of every checkpoint used)."""
    return {r.get("ref", ""): r for r in result.attrs.get("inputs", []) or []}


def anchor_labels(result, count: int) -> list[str]:
    """Distinct labels of the result's `refs` (the anchors), or [] when they do not match
    the `count` anchors recorded."""
    refs = list(result.config.get("refs", []))
    if len(refs) != count:
        return []
    records = input_records(result)
    return unique([ref_label(ref, records.get(ref)) for ref in refs])


def unique(labels: list[str]) -> list[str]:
    """Labels made distinct: repeated ones get their position's letter (A, B, ...)."""
    return [f"{label} ({chr(65 + i)})" if labels.count(label) > 1 else label
            for i, label in enumerate(labels)]


def start_refs(result) -> tuple[list[str], bool]:
    """(reference per start point, whether the `start` coordinates are labels): newer files
    name starts by labels and keep each reference in its `inputs` record; older ones use
    the references as coordinates."""
    coords = [str(s) for s in result.coords["start"]]
    records = [r for r in result.attrs.get("inputs") or [] if r.get("kind") != "data"]
    named = len(records) == len(coords) and all("label" in r for r in records)
    return ([r.get("ref", "") for r in records] if named else coords), named


def start_names(result) -> tuple[list[str], str]:
    """(tick label per start point, x-axis label) of a `border` result, in recorded order.

    A distillation trajectory reads 'ep 1' (or 'step N' where the epoch is unknown; 'α=a'
    across --alpha-runs), supervised rewind points 'k=1ep' (or 'k=N'); the random init is
    'random init'. Mixed kinds keep their role.
    """
    coords = [str(s) for s in result.coords["start"]]
    labels, named = start_refs(result)
    steps, alphas = result.metrics["start_step"], result.metrics["start_alpha"]
    epochs = result.metrics.get("start_epoch", np.full(len(labels), np.nan))
    infos = [parse(label) for label in labels]
    kinds = {info["kind"] for label, info in zip(labels, infos) if label != "random"}
    alpha_set = {float(a) for a, info in zip(alphas, infos)
                 if info["kind"] == "distill" and np.isfinite(a)}
    in_epochs = all(np.isfinite(e) for e, label in zip(epochs, labels) if label != "random")

    def step(i) -> str:
        if in_epochs:
            return f"{epochs[i]:g}ep"
        return str(int(steps[i])) if np.isfinite(steps[i]) else infos[i]["step"] or "last"

    names = []
    role = "student " if "random" in labels else ""  # beside the random init: say whose
    for i, label in enumerate(labels):
        if label == "random":
            names.append("random init")
        elif infos[i]["label"]:
            names.append(infos[i]["label"])  # LABEL:=REF: the user's name
        elif kinds == {"distill"}:
            names.append(role + (f"α={alphas[i]:g}" if len(alpha_set) > 1 else
                                 f"ep {epochs[i]:g}" if in_epochs else f"step {step(i)}"))
        elif kinds == {"train"}:
            names.append(f"k={step(i)}")
        elif named:
            names.append(coords[i])  # mixed kinds: the recorded label says whose
        else:
            names.append(ref_label(label.rsplit("@", 1)[0] + f"@{step(i)}"))
    unit = "epochs" if in_epochs else "iterations"
    distilled = "start: student α (init distance to the teacher)" if len(alpha_set) > 1 \
        else f"start: distillation {unit}"
    axis = {frozenset({"distill"}): distilled,
            frozenset({"train"}): f"start: supervised rewind step k ({unit})"}
    return unique(names), axis.get(frozenset(kinds), "start point")
