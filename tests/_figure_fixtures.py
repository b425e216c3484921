"""Small result files in the exact layouts the analyses write, for the figure tests.

Each builder lays its file out with the writer's own layout code (landscape.interpolate's
`layout`, landscape.border's `layout` and `start_values`, tickets.imp's `result_metrics`,
runs.distill's `open_result`, probes.evaluate's labels) and fills it with smooth synthetic
values instead of training anything. Building them imports torch (the writers do); the
figures that read them must not.
"""

import dataclasses
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from _curvature_fixtures import hessian

from runs.results import MetricSpec, create_result

RNG = np.random.default_rng(0)
STUDENT = "store/distill_0123abcd/seed_0"
SUPERVISED = "store/train_89abcdef/seed_{}"


def interpolate(path, refs: list[str], grids: dict, metrics: tuple[str, ...],
                kind: str, anchor_coords: dict, basis: str = "lstsq", inputs=()) -> Path:
    """A 1-D path or 2-D plane, laid out by landscape.interpolate.layout."""
    from landscape.interpolate import InterpolateConfig, layout
    from landscape.points import Measures
    cfg = InterpolateConfig(refs=tuple(refs), metrics=metrics, basis=basis, dataset="toy",
                            teacher=refs[0] if "distill" in metrics else "")
    parts = SimpleNamespace(encoder=1, fc=1 if "supervised" in metrics else None,
                            head=1 if "distill" in metrics else None)
    plan = SimpleNamespace(grids=grids, measures=Measures(metrics), cfg=cfg,
                           geometry=SimpleNamespace(kind=kind, anchor_coords=anchor_coords,
                                                    unit=3.5),
                           anchors=[SimpleNamespace(subject=parts)],
                           align=None)  # no --align (its info dict otherwise)
    coords, specs, point_dims, attrs = layout(plan)
    with create_result(path, "interpolate", coords, specs, point_dims, cfg, list(inputs),
                       "cpu", attrs) as result:
        for cell in result.missing():
            where = np.array([grids[d][i] for d, i in zip(point_dims, cell)])
            result.write(cell, **_landscape(where, specs))
    return Path(path)


def _landscape(where: np.ndarray, specs: dict) -> dict:
    """A bowl at the origin (the teacher, KL exactly 0) and another at (0, 1)."""
    near = float(np.sum(where ** 2))
    other = float(np.sum((where - np.eye(len(where))[-1]) ** 2))
    bowl = min(near, 0.6 * other + 0.05)
    values = {"loss": [0.3 + bowl, 0.4 + bowl], "error": [min(0.9, 0.05 + bowl / 3)] * 2,
              "distill_kl": [bowl, 1.1 * bowl], "distill_ce": [2 + bowl, 2 + 1.1 * bowl],
              "knn_accuracy": 0.6 - 0.1 * np.tanh(bowl), "param_norm": 5 + near}
    return {name: np.asarray(values[name], dtype=float) for name in specs}


def plane(path, refs=None, inputs=()) -> Path:
    """The paper's Fig. 5 plane: teacher, student at init, trained student."""
    refs = refs or [f"{STUDENT}@init:teacher", f"{STUDENT}@init", f"{STUDENT}@last"]
    grid = np.linspace(-0.5, 1.5, 9)
    return interpolate(path, refs, {"alpha": grid, "beta": grid}, ("distill", "knn", "norm"),
                       "plane", {"A": [0.0, 0.0], "B": [1.0, 0.0], "C": [0.0, 1.0]},
                       inputs=inputs)


def path_1d(path) -> Path:
    refs = [f"{SUPERVISED.format(0)}@last", f"{SUPERVISED.format(1)}@last"]
    return interpolate(path, refs, {"alpha": np.linspace(-0.25, 1.25, 7)},
                       ("supervised", "norm"), "line", {"A": [0.0], "B": [1.0]})


def border(path, children: int = 3, steps=(0, 196, 392), done: int = None,
           runs=(STUDENT,), align: str = "") -> Path:
    """Random init and a distillation trajectory (`steps`; one step: random vs student, the
    lmc figure's), laid out and summarised by landscape.border (`layout`, `start_values`);
    `done`: fill only that many start points (a scan still running); several `runs`: each
    run's students at `steps` (random vs students of several seeds); `align` (a method):
    the `--align` layout, every curve and barrier metric M beside M_aligned (the aligned
    curves' bump a third of the plain one), root attr `align`."""
    from landscape.border import BorderConfig, Start, layout, start_values
    from runs.engines.train import TrainConfig
    starts = [Start("random"), *[Start(f"{run}@{s}:encoder", init=f"{run}@{s}:encoder",
                                       alpha=1.0) for run in runs for s in steps]]
    alphas = np.linspace(0, 1, 5)
    coords, metrics = layout(starts, children, alphas, align)
    num_pairs = len(list(combinations(range(children), 2)))
    border_cfg = BorderConfig(children=children, grid="0:1:5", align=align)
    config = {"border": dataclasses.asdict(border_cfg),
              "train": dataclasses.asdict(TrainConfig(dataset="toy")),
              "starts": [s.label for s in starts], "precision": "fp32"}
    attrs = {"bn_mode": "recalibrate", "children": {s.label: [] for s in starts},
             **({"align": align} if align else {})}
    with create_result(path, "border", coords, metrics, ("start",), config, [], "cpu",
                       attrs) as result:
        for (index,) in result.missing()[:done]:
            step = 0 if index == 0 else int(starts[index].label.split("@")[1].split(":")[0])
            record = {"ref": starts[index].label, "path": "", "step": step, "sha256": ""}
            curves = _border_curves(index, num_pairs, alphas)
            if align:
                aligned = _border_curves(index, num_pairs, alphas, 1 / 3)
                curves.update({f"{k}_aligned": v for k, v in aligned.items()})
            result.write((index,), **start_values(curves, alphas, starts[index], record))
    return Path(path)


def _border_curves(index: int, num_pairs: int, alphas, scale: float = 1.0) -> dict:
    """loss, error: (pair, alpha, split) with a bump of height scale * 0.3 / (1 + index)
    mid-path (later starts: lower barriers) and a little noise."""
    height = scale * 0.3 / (1 + index)
    bump = height * np.sin(np.pi * alphas)[None, :, None]  # (1, alpha, 1)
    error = 0.1 + bump + 0.03 * RNG.random((num_pairs, len(alphas), 2))
    return {"loss": 0.5 + 2 * error, "error": error}  # (pair, alpha, split)


def imp(path, rewind: str = "init@1ep", reference: str = "", levels: int = 4,
        seeds=(0, 1, 2), baselines=("random", "reinit"), instability: bool = True,
        train: dict = None) -> Path:
    """An IMP sweep: tickets.imp's metrics and coords, accuracies falling with sparsity."""
    from tickets.imp import POINT_DIMS, ImpConfig, result_metrics
    cfg = ImpConfig(rewind=rewind, levels=levels, baselines=tuple(baselines),
                    instability=instability)
    branches = ["ticket", *baselines]
    coords = {"branch": branches, "level": np.arange(levels + 1), "seed": np.asarray(seeds)}
    if instability:
        coords["split"] = ["train", "test"]
    config = {"imp": dataclasses.asdict(cfg),
              "train": {"model": "convnet", "dataset": "toy", **(train or {})},
              "reference": reference, "rewind_step": 0 if reference else 17,
              "prunable_weights": 1000}
    metrics = result_metrics(SimpleNamespace(imp=cfg))
    with create_result(path, "imp", coords, metrics, POINT_DIMS, config, [], "cpu",
                       {"bn_mode": "recalibrate"} if instability else {}) as result:
        for b, level, s in result.missing():
            drop = {"ticket": 0.01, "random": 0.08, "reinit": 0.05}[branches[b]] * level
            accuracy = 0.9 - drop + 0.02 * RNG.standard_normal()
            values = {"density": 0.8 ** level, "remaining_weights": round(1000 * 0.8 ** level),
                      "test_accuracy": accuracy, "test_loss": 1 - accuracy,
                      "best_val_accuracy": accuracy, "test_accuracy_at_best_val": accuracy,
                      "best_val_step": 100, "error_barrier": [drop, drop + 0.01],
                      "loss_barrier_mean": [drop, drop], "loss_barrier_linear": [drop, drop]}
            result.write((b, level, s), **{k: v for k, v in values.items() if k in metrics})
    return Path(path)


# Distillation fixtures: (subset per class, dataset, train images, seeds, alpha); accuracy
# grows with the data and falls with alpha (a fresh init learns less), noise stays low.
DISTILL_RUNS = ((0, "toy", 400, (0, 1), 1e-10), (5, "toy", 10, (0, 1), 1e-10),
                (50, "toy", 100, (0, 1), 1e-10), (0, "noise", 400, (0,), 1e-10),
                (0, "toy", 400, (0, 1), 0.5), (0, "toy", 400, (0, 1), 1.0))


def distill_run(folder, subset: int, dataset: str, images: int, seed: int,
                alpha: float = 1e-10) -> Path:
    """One run's distill.h5, made by runs.engines.distill.open_result."""
    from runs.engines.distill import DistillConfig, open_result
    cfg = DistillConfig(model="convnet", dataset=dataset, num_steps=40, subset=subset, seed=seed,
                        alpha=alpha, probe_dataset="toy" if dataset == "noise" else "")
    name = f"distill_{subset}{dataset}" + (f"_alpha{alpha:g}" if alpha != 1e-10 else "")
    run = SimpleNamespace(path=Path(folder) / name / f"seed_{seed}")
    gain = 0.0 if dataset == "noise" else 0.02 * np.log10(images) * (1 - 0.5 * alpha)
    with open_result(cfg, run, steps_per_epoch=8, device="cpu", train_images=images) as result:
        for (epoch,) in result.missing():
            student = 0.3 + gain * epoch + 0.01 * seed + (0.05 if epoch == 2 else 0)
            result.write((epoch,), knn_accuracy=[0.3, student], loss=3 - 0.1 * epoch,
                         kl=1 - 0.1 * epoch, teacher_entropy=2.0)
    return run.path / "distill.h5"


def distill(folder) -> Path:
    """Distillation runs over data sizes, alphas and seeds, and a noise-input control."""
    paths = [distill_run(folder, *spec[:3], seed, spec[4]) for spec in DISTILL_RUNS
             for seed in spec[3]]
    return paths[0]


def probe(path, **config) -> Path:
    """probes.evaluate's layout: checkpoint x probe x features x seed, rows in attrs;
    `config`: settings added to (or replacing) the recorded config."""
    from probes.evaluate import FEATURES, probe_labels
    refs = ["pixels", f"{STUDENT}@last:teacher", f"{STUDENT}@last"]
    rows = [{"ref": refs[0], "role": "pixels", "model": "", "trained_on": ""},
            {"ref": refs[1], "role": "teacher", "model": "resnet18", "trained_on": "cifar10"},
            {"ref": refs[2], "role": "student", "model": "resnet18", "trained_on": "cifar10"}]
    labels, seeds = probe_labels(["knn", "linear"], [20]), [0, 1, 2]
    coords = {"checkpoint": refs, "probe": labels, "features": list(FEATURES), "seed": seeds}
    metric = MetricSpec(("checkpoint", "probe", "features", "seed"), "fraction",
                        "probe accuracy on the test split")
    config = {"refs": refs, "dataset": "cifar10", "probes": ["knn", "linear"], "ks": [20],
              "seeds": seeds, **config}
    with create_result(path, "probe", coords, {"accuracy": metric}, ("checkpoint",), config,
                       [], "cpu", attrs={"checkpoints": rows}) as result:
        for (index,) in result.missing():
            base = (0.33, 0.37, 0.45)[index]
            accuracy = base + 0.01 * RNG.standard_normal((len(labels), len(FEATURES),
                                                          len(seeds)))
            result.write((index,), accuracy=accuracy)
    return Path(path)


def curve(path, kind: str = "bezier", done: int = None, stored: bool = True) -> Path:
    """A trained curve and the straight line between two supervised runs, laid out by
    landscape.curve.layout: loss and error over (path, t, split), barriers over (path,
    split) computed by landscape.barrier; the line peaks at t = 0.5, the curve stays
    nearly flat. `done`: fill only that many paths (a scan still running); stored=False: no barrier
    metrics (the figure recomputes them)."""
    from landscape.barrier import barriers
    from landscape.curve import layout
    refs = [f"{SUPERVISED.format(0)}@last", f"{SUPERVISED.format(1)}@last"]
    t = np.linspace(0, 1, 9)
    coords, metrics = layout(t)  # path (curve, line), t, split
    metrics = {k: v for k, v in metrics.items() if stored or k in ("loss", "error")}
    config = {"curve": {"a": refs[0], "b": refs[1], "kind": kind, "dataset": "toy",
                        "num_steps": 100}, "scan": {"grid": "0:1:9"}, "precision": "fp32"}
    attrs = {"bn_mode": "recalibrate", "kind": kind, "endpoints": ["supervised s0",
                                                                   "supervised s1"],
             "bend": "curve_0123abcd/seed_0/bend.pt"}
    with create_result(path, "curve", coords, metrics, ("path",), config, [], "cpu",
                       attrs) as result:
        for (index,) in result.missing()[:done]:
            height = (0.05, 0.4)[index]  # the trained curve, the line
            error = 0.1 + height * np.sin(np.pi * t)[:, None] + np.array([0.0, 0.03])
            values = {"loss": 0.4 + 2 * error, "error": error}  # (t, split)
            values.update(barriers(values["loss"].T, values["error"].T, t))  # (split,)
            result.write((index,), **{k: values[k] for k in metrics})
    return Path(path)


LAYERS = ("encoder.conv1", "encoder.layer1", "encoder.layer2", "fc")


def layerwise(path, agree=("fc",), done: int = None, stored: bool = True) -> Path:
    """One layer at a time between two supervised runs, laid out by
    landscape.layerwise.layout: loss and error over (layer, held, alpha, split), barriers over
    (layer, held, split); layers in `agree` are the same in A and B (flat, barrier 0),
    the others peak mid-path, deeper ones higher, held at B a little lower than at A;
    `done`: fill only that many cells; stored=False: no barrier metrics."""
    from landscape.barrier import barriers
    from landscape.layerwise import layout
    refs = [f"{SUPERVISED.format(0)}@last", f"{SUPERVISED.format(1)}@last"]
    alphas = np.linspace(0, 1, 5)
    coords, metrics = layout(list(LAYERS), alphas)  # layer, held (A, B), alpha, split
    metrics = {k: v for k, v in metrics.items() if stored or k in ("loss", "error")}
    config = {"refs": refs, "dataset": "toy"}
    attrs = {"bn_mode": "recalibrate", "granularity": "block",
             "endpoints": ["supervised s0", "supervised s1"]}
    with create_result(path, "layerwise", coords, metrics, ("layer", "held"), config, [],
                       "cpu", attrs) as result:
        for layer, held in result.missing()[:done]:
            height = 0.0 if LAYERS[layer] in agree else 0.05 * (layer + 1) * (1 - 0.3 * held)
            error = 0.1 + height * np.sin(np.pi * alphas)[:, None] + np.array([0.0, 0.02])
            values = {"loss": 0.4 + 2 * error, "error": error}  # (alpha, split)
            values.update(barriers(values["loss"].T, values["error"].T, alphas))  # (split,)
            result.write((layer, held), **{k: values[k] for k in metrics})
    return Path(path)


def all_results(folder) -> dict:
    """Every fixture in `folder`: {name: path}."""
    folder = Path(folder)
    return {"plane": plane(folder / "plane.h5"), "path": path_1d(folder / "path.h5"),
            "border": border(folder / "border.h5"),
            "lmc": border(folder / "lmc_random_vs_student.h5", steps=(392,)),
            "imp_init": imp(folder / "imp_init.h5"),
            "imp_student": imp(folder / "imp_student.h5", rewind=f"{STUDENT}@last:encoder",
                               reference=f"{STUDENT}@last:encoder", baselines=("reinit",),
                               instability=False),
            "distill": distill(folder / "store"), "probe": probe(folder / "probe.h5"),
            "hessian": hessian(folder / "hessian.h5"), "curve": curve(folder / "curve.h5"),
            "layerwise": layerwise(folder / "layerwise.h5")}
