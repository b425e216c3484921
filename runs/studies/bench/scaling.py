"""Cost curves, `python -m runs.bench --scaling`: how each hot path's time and peak memory
grow with its work.

Curves (CURVES; --sections picks groups of them, GROUPS):
  knn            probes.nearest.knn_predict (squared L2, k = 20) of `knn_queries` test
                 features against 5k..50k training features: time grows linearly in the
                 rows, memory stays at one (chunk, rows) distance block, whose test-row
                 chunk shrinks as the rows grow (probes.nearest.BLOCK_BYTES);
  path, plane    landscape.path / landscape.plane (BN recalibrated, loss and error on both
                 splits) over 5..100 points and 5x5..51x51 grids: linear in points;
  prune_level    tickets.prune.magnitude_prune of one IMP level L (density 0.8^L) of one
                 network, after the mask of level L - 1;
  prune_weights  the same step (level 1) for the network at growing widths (its weights);
  parallel       one runs.engines.parallel.Stack.step of K runs trained together.

Each point: its inputs are built, one untimed call runs (first-call costs: library set-up,
allocator pools, cuDNN autotune), then `repeats` timed calls (the median is recorded).
Memory is the peak above what the process held before the timed calls (inputs, models and
the untimed call's leftovers), i.e. what one call needs on top of its inputs. On CUDA:
torch.cuda.max_memory_allocated after a reset, in this process. On a CPU: the peak resident
set size, which only grows in a process; so every CPU point runs in a process of its own
(forked from a server that imported the toolkit once), whose high-water mark is reset after
the untimed call (Linux: /proc/self/clear_refs; elsewhere the baseline is the high-water
mark so far, which can only under-count). The children fix glibc's mmap threshold (mallopt):
blocks the untimed call freed go back to the system instead of staying in the heap, where
the timed calls would reuse them unseen.

Writes OUT/scaling-<device>[-quick].json (provenance as the benchmark's JSON, the sizes, per
curve its points and a linear fit of time against the work; curves of earlier runs that
this run did not measure are kept) and the figure OUT/scaling-<device>[-quick].png (and
.pdf, figures/style.py), drawn by runs.studies.bench.scaling_plot.
"""

import contextlib
import ctypes
import ctypes.util
import io
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runs.config import arg, to_dict
from runs.errors import unknown
from runs.registry import Registry
from runs.studies.bench.common import (
    FULL,
    QUICK,
    Bench,
    device_slug,
    first_line,
    synchronize,
    synthetic_images,
)

SCHEMA = "bench-scaling/1"
MIB = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 64 * 1024  # bytes: larger blocks are mmapped and unmapped when freed


@dataclass(frozen=True)
class ScalingConfig:
    knn_rows: tuple[int, ...] = arg((5_000, 10_000, 20_000, 35_000, 50_000),
                                    "training features (rows) of the k-NN curve")
    knn_dim: int = arg(512, "feature dimension of the k-NN curve")
    knn_queries: int = arg(10_000, "test features each k-NN search classifies")
    knn_block_mib: float = arg(0.0, "the (chunk, rows) distance block in MiB; its chunk of "
                                    "test rows is block / (rows x 4 bytes); 0 = "
                                    "probes.nearest.BLOCK_BYTES")
    knn_k: int = arg(20, "neighbours of the k-NN curve")
    grid_model: str = arg("resnet20", "network of the path and plane curves")
    grid_width: float = arg(1.0, "its channel width multiplier")
    grid_images: int = arg(2048, "images per point, each of: BN recalibration, train, test")
    path_points: tuple[int, ...] = arg((5, 10, 25, 50, 100), "points of the path curve")
    plane_sides: tuple[int, ...] = arg((5, 11, 21, 31, 51), "plane curve: side x side grids")
    grid_repeats: int = arg(1, "timed scans per path or plane point (one 2-point scan first)")
    prune_model: str = arg("resnet18", "network of the prune curves")
    prune_width: float = arg(1.0, "its width on the prune_level curve")
    prune_levels: tuple[int, ...] = arg((1, 2, 4, 8, 12, 16, 20),
                                        "IMP levels of the prune_level curve")
    prune_widths: tuple[float, ...] = arg((0.5, 1.0, 2.0, 4.0),
                                          "widths of the prune_weights curve (level 1)")
    parallel_model: str = arg("resnet20", "network of the parallel curve")
    parallel_width: float = arg(1.0, "its width")
    parallel_batch: int = arg(128, "images per run and step")
    parallel_runs: tuple[int, ...] = arg((1, 2, 4, 8, 16), "K, runs stacked in one Stack")
    repeats: int = arg(5, "timed calls per point of the knn, prune and parallel curves")


FULL_SCALING = ScalingConfig()
QUICK_SCALING = ScalingConfig(knn_dim=32, knn_queries=1000, knn_block_mib=16.0,
                              grid_model="convnet", grid_width=0.25, grid_images=32,
                              plane_sides=(3, 5, 9, 13, 21),
                              prune_width=0.25, prune_widths=(0.125, 0.25, 0.5, 1.0),
                              parallel_width=0.25, parallel_batch=16, repeats=3)


# ---------------------------------------------------------------------------------------
# The curves


@dataclass
class Work:
    """One point, ready to measure."""
    call: Callable[[], object]  # the measured call
    facts: dict = field(default_factory=dict)  # what the point is: sizes, bounds, x
    warm: Callable[[], object] | None = None  # a cheaper untimed first call; None = call


@dataclass(frozen=True)
class Curve:
    sizes: Callable[[ScalingConfig], tuple]  # the points of the curve, as given to `build`
    build: Callable  # build(cfg, size, device) -> Work
    x: str  # the fact that is the work (the x axis)
    x_label: str  # the x axis, with units
    title: str  # the hot path, one line
    repeats: Callable[[ScalingConfig], int] = lambda cfg: cfg.repeats
    linear: bool = True  # whether time is expected linear in x (a fit is drawn)


CURVES = Registry("scaling curve")
ORDER = ("knn", "path", "plane", "prune_level", "prune_weights", "parallel")
GROUPS = {"knn": ("knn",), "landscape": ("path", "plane"),
          "prune": ("prune_level", "prune_weights"), "parallel": ("parallel",)}
NAMES = (*GROUPS, *(name for name in ORDER if name not in GROUPS))  # what --sections takes


def knn_work(cfg: ScalingConfig, rows: int, device) -> Work:
    """`knn_queries` test features classified against `rows` training features; the test
    rows go in chunks of block / (rows x 4 bytes), as probes.nearest sizes them."""
    from probes.nearest import BLOCK_BYTES, knn_predict
    from runs.studies.bench.probes import synthetic_features
    train_x, train_y, test_x, _ = (t.to(device) for t in synthetic_features(
        rows, cfg.knn_queries, cfg.knn_dim, 10))
    block = int(cfg.knn_block_mib * MIB) if cfg.knn_block_mib > 0 else BLOCK_BYTES
    chunk = max(1, block // (rows * train_x.element_size()))  # probes.nearest's rule
    facts = {"rows": rows, "chunk_rows": chunk, "queries": cfg.knn_queries,
             "dim": cfg.knn_dim, "block_budget_bytes": block,
             "block_bytes": min(chunk, cfg.knn_queries) * rows * train_x.element_size(),
             "input_bytes": (rows + cfg.knn_queries) * cfg.knn_dim * train_x.element_size()}
    return Work(lambda: knn_predict(train_x, train_y, test_x, (cfg.knn_k,), "l2",
                                    chunk_size=chunk), facts)


def grid_work(cfg: ScalingConfig, side: int, device, axes: int) -> Work:
    """A path of `side` points (axes 1) or a side x side plane (axes 2) through the API."""
    import landscape
    from runs.models import create_model
    models = [create_model(cfg.grid_model, width=cfg.grid_width, seed=s).to(device)
              for s in range(axes + 1)]
    train, test = (synthetic_images(cfg.grid_images, seed=s) for s in (0, 1))
    options = dict(test=test, metrics=("supervised",), bn_samples=cfg.grid_images,
                   train_samples=cfg.grid_images, test_samples=cfg.grid_images,
                   device=str(device))
    scan = landscape.path if axes == 1 else landscape.plane

    def call(num: int):
        grid = np.linspace(0.0, 1.0, num)
        return scan(*models, train, grid, **options)

    facts = {"side": side, "points": side ** axes, "images_per_point": 3 * cfg.grid_images,
             "model": cfg.grid_model, "width": cfg.grid_width}
    return Work(lambda: call(side), facts, warm=lambda: call(2))


def prune_work(cfg: ScalingConfig, level: int, width: float, device) -> Work:
    """IMP level `level` of the network at `width`: the mask of level - 1 pruned again."""
    from runs.models import create_model
    from tickets.mask import dense_mask, num_total, prunable_names
    from tickets.prune import kept_count, magnitude_prune
    model = create_model(cfg.prune_model, width=width, seed=0).to(device)
    dense = {k: m.to(device) for k, m in dense_mask(model, prunable_names(model)).items()}
    weights = {k: p.detach() for k, p in model.named_parameters() if k in dense}
    total = num_total(dense)
    mask = magnitude_prune(weights, dense, kept_count(total, 0.2, level - 1))
    keep = kept_count(total, 0.2, level)
    facts = {"level": level, "weights": total, "kept": keep, "density": keep / total,
             "model": cfg.prune_model, "width": width}
    return Work(lambda: magnitude_prune(weights, mask, keep), facts)


def parallel_work(cfg: ScalingConfig, runs: int, device) -> Work:
    """One SGD step of `runs` networks stacked (their own seeds, their own images)."""
    from runs.device import use_bf16
    from runs.engines.parallel import Stack
    from runs.models import create_model
    models = [create_model(cfg.parallel_model, width=cfg.parallel_width, seed=k).to(device)
              for k in range(runs)]
    stack = Stack(models, bf16=use_bf16(device, "auto"))
    gen = torch.Generator().manual_seed(0)
    shape = (runs, cfg.parallel_batch)
    xs = torch.randn(*shape, 3, 32, 32, generator=gen).to(device)  # (K, B, C, H, W)
    ys = torch.randint(0, 10, shape, generator=gen).to(device)  # (K, B)
    facts = {"runs": runs, "batch": cfg.parallel_batch, "images": runs * cfg.parallel_batch,
             "model": cfg.parallel_model, "width": cfg.parallel_width}
    return Work(lambda: stack.step(xs, ys), facts)


CURVES.register(Curve(lambda c: c.knn_rows, knn_work, "rows", "training features (rows)",
                      "k-NN search (probes.nearest)"), name="knn")
CURVES.register(Curve(lambda c: c.path_points, lambda c, n, d: grid_work(c, n, d, 1),
                      "points", "points on the path", "landscape.path",
                      repeats=lambda c: c.grid_repeats), name="path")
CURVES.register(Curve(lambda c: c.plane_sides, lambda c, n, d: grid_work(c, n, d, 2),
                      "points", "points on the plane (side²)", "landscape.plane",
                      repeats=lambda c: c.grid_repeats), name="plane")
CURVES.register(Curve(lambda c: c.prune_levels,
                      lambda c, n, d: prune_work(c, n, c.prune_width, d), "level",
                      "IMP level L (density 0.8^L)", "IMP prune step vs level", linear=False),
                name="prune_level")
CURVES.register(Curve(lambda c: c.prune_widths, lambda c, n, d: prune_work(c, 1, n, d),
                      "weights", "prunable weights", "IMP prune step vs weights"),
                name="prune_weights")
CURVES.register(Curve(lambda c: c.parallel_runs, parallel_work, "runs",
                      "K runs trained together", "parallel.Stack.step"), name="parallel")


def select(names: list[str] | None) -> list[str]:
    """The curves of the groups (or curve names) given, in ORDER; None = all."""
    if names is None:
        return list(ORDER)
    chosen = set()
    for name in names:
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in CURVES:
            chosen.add(name)
        else:
            raise unknown("scaling curve (--sections with --scaling)", name, NAMES)
    return [name for name in ORDER if name in chosen]


# ---------------------------------------------------------------------------------------
# Measuring one point


def rss_bytes() -> int:
    """The resident set size now (Linux /proc; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import resource  # Unix only
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB else


def reset_peak_rss() -> bool:
    """Lower the peak RSS to the RSS now (Linux >= 4.0: clear_refs 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def start_memory(device) -> tuple[int, str]:
    """(baseline bytes, how memory is counted): the peak counter starts here."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), "cuda max_memory_allocated"
    if reset_peak_rss():
        return rss_bytes(), "peak RSS, reset before the timed calls"
    return peak_rss_bytes(), "peak RSS above the earlier peak (no reset: may under-count)"


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def measure_here(curve: str, size, cfg: ScalingConfig, device) -> dict:
    """The record of one point, measured in this process."""
    spec = CURVES.get(curve)
    work = spec.build(cfg, size, device)
    with contextlib.redirect_stderr(io.StringIO()):  # the scans' progress lines
        (work.warm or work.call)()
        synchronize(device)
        baseline, how = start_memory(device)
        seconds = []
        for _ in range(max(1, spec.repeats(cfg))):
            start = time.perf_counter()
            work.call()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        peak = peak_memory(device) - baseline
    return {"size": size, "x": work.facts[spec.x], **work.facts,
            "seconds": statistics.median(seconds), "seconds_repeats": seconds,
            "peak_bytes": max(peak, 0), "baseline_bytes": baseline, "memory": how}


def measure_point(curve: str, size, cfg: ScalingConfig, device) -> dict:
    """One point's record: here on CUDA, in a fresh child process on a CPU (peak RSS)."""
    if device.type == "cuda":
        record = measure_here(curve, size, cfg, device)
        torch.cuda.empty_cache()
        return record
    return measure_in_child(curve, size, cfg, device)


def measure_in_child(curve: str, size, cfg: ScalingConfig, device) -> dict:
    """One point in a new process: forked from a server that imported this module once
    (forkserver: a point costs milliseconds to start, not the imports' seconds), or
    spawned where forking is missing (Windows)."""
    with ProcessPoolExecutor(1, mp_context=child_context(), max_tasks_per_child=1) as pool:
        return pool.submit(child_point, curve, size, cfg, str(device),
                           torch.get_num_threads()).result()


def child_context():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__spec__.name if __spec__ else __name__])
    return context


def child_point(curve: str, size, cfg: ScalingConfig, device: str, threads: int) -> dict:
    """A child's work: the parent's thread count, glibc's mmap threshold fixed, the point."""
    fix_mmap_threshold()
    torch.set_num_threads(threads)
    return measure_here(curve, size, cfg, torch.device(device))


def fix_mmap_threshold() -> bool:
    """glibc: blocks from MMAP_THRESHOLD bytes up are mmapped and given back when freed
    (mallopt M_MMAP_THRESHOLD also stops its dynamic raising); False without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------
# Curves, fits and the document


def linear_fit(x, y) -> dict:
    """Least squares y = slope x + intercept, with R² (None from fewer than 2 points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return {"slope": None, "intercept": None, "r2": None}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


def measure_curve(name: str, cfg: ScalingConfig, device) -> dict:
    """A curve's record: its points (each measured on its own) and the time fit."""
    spec = CURVES.get(name)
    points = []
    for size in spec.sizes(cfg):
        start = time.perf_counter()
        points.append(measure_point(name, size, cfg, device))
        print(f"[scaling {name}] {spec.x} {points[-1]['x']}: "
              f"{points[-1]['seconds']:.4g} s, {points[-1]['peak_bytes'] / MIB:.1f} MiB "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    fit = linear_fit([p["x"] for p in points], [p["seconds"] for p in points])
    return {"title": spec.title, "x": spec.x, "x_label": spec.x_label,
            "linear": spec.linear, "points": points, "time_fit": fit}


def run_curves(names: list[str], cfg: ScalingConfig, device) -> dict:
    """name -> the curve's record, or {"error": ...} where it failed (the others go on)."""
    from runs.studies.bench.report import utc_now
    curves = {}
    for name in names:
        start = time.perf_counter()
        try:
            curves[name] = measure_curve(name, cfg, device)
        except Exception as err:  # noqa: BLE001 - one failing curve must not lose the others
            curves[name] = {"error": f"{type(err).__name__}: {first_line(err)}"}
            print(f"[scaling {name}] error: {curves[name]['error']}", file=sys.stderr)
        curves[name].update(measured_utc=utc_now(),
                            curve_seconds=time.perf_counter() - start)
    return curves


def document(device, quick: bool, argv: list, cfg: ScalingConfig, peak_tflops) -> dict:
    """The benchmark's provenance (git, device, torch, threads, argv) and the sizes."""
    from runs.studies.bench.report import provenance
    bench = Bench(QUICK if quick else FULL, device, peak_tflops)
    doc = provenance(bench, quick, argv)
    doc.pop("compile", None)
    return {**doc, "schema": SCHEMA, "sizes": to_dict(cfg)}


def write_doc(doc: dict, path: Path) -> Path:
    """Keep the curves an earlier run of the same sizes left in `path`; atomic write."""
    from runs.store import atomic_write_text
    if path.exists():
        try:
            old = json.loads(path.read_text())
            sizes = json.loads(json.dumps(doc["sizes"]))  # tuples as the file's lists
            if old.get("schema") == SCHEMA and old.get("sizes") == sizes:
                doc["curves"] = {**old.get("curves", {}), **doc["curves"]}
        except (OSError, ValueError):
            pass  # an unreadable old file is replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    return path


def summary(curves: dict) -> str:
    """One line per point: curve, x, seconds, MiB; and each curve's fit."""
    lines = []
    for name, curve in curves.items():
        if "error" in curve:
            lines.append(f"{name}: error: {curve['error']}")
            continue
        for p in curve["points"]:
            lines.append(f"{name:14s} {curve['x']} {p['x']:>10,}  {p['seconds']:9.4f} s  "
                         f"{p['peak_bytes'] / MIB:8.1f} MiB")
        fit = curve["time_fit"]
        if fit["slope"] is not None:
            lines.append(f"{name:14s} fit: {fit['slope']:.3g} s per {curve['x']} + "
                         f"{fit['intercept']:.3g} s (R² {fit['r2']:.3f})")
    return "\n".join(lines)


def run_scaling(device, quick: bool, out: str, names, argv: list,
                peak_tflops: float | None = None, cfg: ScalingConfig = None) -> int:
    """Measure the curves, write the JSON and the figure; 1 if a curve failed."""
    from runs.studies.bench.scaling_plot import draw
    chosen = select(names)
    cfg = cfg or (QUICK_SCALING if quick else FULL_SCALING)
    doc = document(device, quick, argv, cfg, peak_tflops)
    print(f"runs.bench --scaling: {doc['device_name']} ({device}), torch "
          f"{doc['torch_version']}, git {doc['git_sha'][:10]}, curves {', '.join(chosen)}",
          file=sys.stderr)
    doc["curves"] = run_curves(chosen, cfg, device)
    name = "scaling-" + device_slug(device) + ("-quick" if quick else "")
    path = write_doc(doc, Path(out) / f"{name}.json")
    figure = draw(json.loads(path.read_text()), path.parent, name)
    print(summary(doc["curves"]))
    print(f"wrote {path} and {figure}")
    return 1 if any("error" in c for c in doc["curves"].values()) else 0
