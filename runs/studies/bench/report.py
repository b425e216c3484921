"""The benchmark as a document: the section registry (SECTIONS, ORDER), one section's record
with its provenance, the JSON file (merged with earlier runs), the goals judged against it,
and the tables printed at the end."""

import dataclasses
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from runs.registry import Registry
from runs.store import atomic_write_text
from runs.studies.bench.common import Bench, device_name, first_line
from runs.studies.bench.connectivity import section_connectivity
from runs.studies.bench.curvature import section_curvature
from runs.studies.bench.landscape import section_landscape
from runs.studies.bench.parallel import section_parallel
from runs.studies.bench.probes import section_probes
from runs.studies.bench.tickets import section_tickets
from runs.studies.bench.training import section_distill, section_eval, section_train

SCHEMA = "bench/1"


# ---------------------------------------------------------------------------------------
# The registry and the document


@dataclass(frozen=True)
class Section:
    run: Callable[[Bench], dict]
    needs: tuple[str, ...] = ()  # modules that must import, else the section is skipped


SECTIONS = Registry("benchmark section")
ORDER = ("train", "distill", "eval", "probes", "landscape", "tickets", "curvature",
         "connectivity", "parallel")
SECTIONS.register(Section(section_train, ("runs.engines.train",)), name="train")
SECTIONS.register(Section(section_distill, ("runs.engines.distill",)), name="distill")
SECTIONS.register(Section(section_eval, ("runs.engines.train",)), name="eval")
SECTIONS.register(Section(section_probes, ("probes.nearest", "probes.logistic", "sklearn")),
                  name="probes")
SECTIONS.register(Section(section_landscape, ("landscape.points", "landscape.geometry",
                                              "landscape.network", "landscape.interpolate")),
                  name="landscape")
SECTIONS.register(Section(section_tickets, ("tickets.prune", "tickets.mask",
                                            "runs.engines.masking")), name="tickets")
SECTIONS.register(Section(section_curvature, ("landscape.curvature", "scipy.linalg")),
                  name="curvature")
SECTIONS.register(Section(section_connectivity, ("landscape.align", "landscape.curve",
                                                 "scipy.optimize")), name="connectivity")
SECTIONS.register(Section(section_parallel, ("runs.engines.parallel",)), name="parallel")


def missing(needs: Iterable[str]) -> str | None:
    """Why a section cannot run (a module that does not import), or None."""
    for name in needs:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a half-written package fails in many ways
            return f"{name} does not import ({type(err).__name__}: {first_line(err)})"
    return None


def run_section(name: str, bench: Bench) -> dict:
    """A section's record: its comparisons, or why it was skipped or failed."""
    section = SECTIONS.get(name)
    from runs.results import git_state
    sha, dirty = git_state()  # per section too: a file merges sections of several runs
    stamp = {"measured_utc": utc_now(), "git_sha": sha, "git_dirty": dirty,
             "config": dataclasses.asdict(bench.cfg)}
    reason = missing(section.needs)
    if reason:
        print(f"[{name}] skipped: {reason}", file=sys.stderr)
        return {**stamp, "skipped": reason}
    print(f"[{name}] measuring ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        body = section.run(bench)
    except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
        traceback.print_exc()
        return {**stamp, "error": f"{type(err).__name__}: {first_line(err)}"}
    return {**stamp, **body, "section_seconds": time.perf_counter() - start}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(bench: Bench, quick: bool, argv: list) -> dict:
    from runs.results import git_state
    sha, dirty = git_state()
    device = bench.device
    return {"schema": SCHEMA, "device": str(device), "device_name": device_name(device),
            "device_type": device.type, "peak_bf16_tflops": bench.peak_tflops,
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version() if device.type == "cuda"
            else None, "git_sha": sha, "git_dirty": dirty, "created_utc": utc_now(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "quick": quick, "argv": argv,
            "compile": bench.compile,
            # torch's defaults, which the eager fp32 references run under: cuDNN convs in
            # TF32 (allow_tf32 True), matmuls in full fp32, no cuDNN autotuning.
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def write(doc: dict, path: Path) -> Path:
    """Merge with the sections a previous run left in `path`, judge the goals over the
    merged sections; atomic write."""
    if path.exists():
        try:
            old = json.loads(path.read_text())
            doc["sections"] = {**old.get("sections", {}), **doc["sections"]}
        except (OSError, ValueError):
            pass  # an unreadable old file is replaced
    doc["goals"] = goal_rows(doc["sections"], doc.get("device_type") == "cuda"
                             and not doc.get("quick"), cpu_quick=doc.get("device_type") ==
                             "cpu" and bool(doc.get("quick")))
    atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Goals: what the toolkit promises on one H100 (full sizes), checked against a document


@dataclass(frozen=True)
class Goal:
    text: str  # as a reader states it
    section: str
    comparison: str  # a comparison name, or "*" for every speed-up comparison
    value: Callable[[dict], float | None]  # the measured number from a comparison
    met: Callable[[float], bool]
    unit: str = ""  # how to print the number
    cpu: bool = False  # the CPU rule: listed and judged on CPU quick runs only


def ratio_of(comp: dict) -> float | None:
    return comp.get("ratio")


def fast_mfu(comp: dict) -> float | None:
    return comp["paths"]["fast"].get("mfu")


def default_path(comp: dict) -> str:
    """The path the toolkit's default takes on the measured device: the comparison's
    `default_path` (landscape's one point per pass, curvature's double backward and
    anything that falls back to its reference on CPUs), else "fast"."""
    return comp.get("default_path", "fast")


def default_ratio(comp: dict) -> float | None:
    return comp["paths"][default_path(comp)].get("vs_reference")


GOALS = (
    Goal("supervised training step: MFU >= 30 %", "train", "train_step", fast_mfu,
         lambda v: v >= 0.30, "%"),
    Goal("distillation step: MFU >= 25 %", "distill", "distill_step", fast_mfu,
         lambda v: v >= 0.25, "%"),
    Goal("25-point path with BN recalibration over CIFAR10 train + test: < 30 s",
         "landscape", "path25_bn_recalibrate",
         lambda comp: comp["checks"].get("path_seconds_fast"), lambda v: v < 30, "s"),
    Goal("masked training step: < 2 % slower than unmasked", "tickets", "masked_step",
         lambda comp: comp["checks"].get("overhead_pct"), lambda v: v < 2, "% overhead"),
    Goal("top-5 Hessian eigenvalues of ResNet18 on 10k CIFAR images: < 60 s", "curvature",
         "top5_eigen", lambda comp: comp["checks"].get("seconds_10k"), lambda v: v < 60, "s"),
    Goal("8 ResNet20 children trained together: >= 4x the runs/hour of one at a time",
         "parallel", "resnet20_k8", ratio_of, lambda v: v >= 4, "x"),
    Goal("every fast path: >= 5x its plain reference", "*", "*", ratio_of,
         lambda v: v >= 5, "x"),
    Goal("CPU quick sizes: >= 1.0x its reference, on the path the CPU default takes", "*",
         "*", default_ratio, lambda v: v >= 1.0, "x", cpu=True),
)
# Comparisons the 5x goal does not judge: the masked step is an overhead, not fast vs
# reference; the Hessian-vector products compare two ways of one product (forward-over-
# reverse, double backward) with no data path between them, for which no speed-up was
# promised (issue #20 states the eigenvalue goal only); the curve step is the price of a
# trained curve's bend over an ordinary step (issue #21). Their ratios are still reported.
NOT_SPEEDUPS = ("masked_step", "hvp_fp32", "hvp_bf16", "curve_step")
# What the CPU rule (issue #22: on CPU no default path slower than its reference) leaves
# out: the overheads, measured against the step they add to, not against a reference.
OVERHEADS = ("masked_step", "curve_step")
# Sections whose ratios only their own goals judge for speed: parallel (K runs together vs
# in turn: the K = 8 goal; at K = 1 the ratio is the stack's overhead, no speed-up).
OWN_GOALS = ("parallel",)


def goal_rows(sections: dict, judged: bool = True, cpu_quick: bool = False) -> list[dict]:
    """{"goal", "measured", "value", "met"} per goal and comparison it covers; `met` None
    where the document lacks the number (a section not run, MFU n/a on a CPU) or where the
    run is not one the goals speak of (`judged` False: a CPU, or quick sizes). The CPU rule
    is listed, and judged, only on CPU quick runs (`cpu_quick`), naming the path it reads."""
    rows = []
    for goal in GOALS:
        if goal.cpu and not cpu_quick:
            continue
        for section, name, comp in covered(goal, sections):
            value = goal.value(comp)
            met = (None if value is None or not (cpu_quick if goal.cpu else judged)
                   else bool(goal.met(value)))
            where = f" ({default_path(comp)} path)" if goal.cpu else ""
            rows.append({"goal": goal.text, "measured": f"{section}/{name}{where}",
                         "value": value, "unit": goal.unit, "met": met})
    return rows


def covered(goal: Goal, sections: dict):
    """(section, comparison, record) that a goal speaks of, where measured. A fast path
    measured alone (a variant network: no reference) is no speed-up to judge."""
    skip = OVERHEADS if goal.cpu else NOT_SPEEDUPS
    for section, body in sections.items():
        if goal.section not in ("*", section):
            continue
        for name, comp in body.get("comparisons", {}).items():
            if goal.comparison == name or (goal.comparison == "*" and name not in skip
                                           and comp.get("ratio") is not None
                                           and (goal.cpu or section not in OWN_GOALS)):
                yield section, name, comp


def goals_text(rows: list[dict], device_name: str, quick: bool) -> str:
    """One line per goal row; a header saying where the goals were stated for."""
    head = (f"goals (stated for one H100 at full sizes, the CPU rule for CPU quick runs; "
            f"this run: {device_name}"
            f"{', quick sizes' if quick else ''}):")
    lines = [head]
    for row in rows:
        value, unit = row["value"], row["unit"]
        shown = "n/a" if value is None else (pct(value) if unit == "%" else
                                             f"{value:.3g} {unit}")
        verdict = {True: "met", False: "NOT met"}.get(row["met"], "not measured" if
                                                        value is None else "not judged here")
        lines.append(f"  {row['goal']} [{row['measured']}]: {shown}, {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Printing


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(sections: dict) -> str:
    head = ("section", "measure", "path", "rate", "unit", "ms/step", "GFLOP/s", "MFU", "x ref")
    rows = [head]
    for section, body in sections.items():
        if "comparisons" not in body:
            status = "skipped" if "skipped" in body else "error"
            rows.append((section, status, *[""] * (len(head) - 2)))
            continue
        for name, comp in body["comparisons"].items():
            for path, rec in comp["paths"].items():
                rows.append((section, name, path, fmt(rec["rate"], ",.1f"), comp["unit"],
                             fmt(1000 * rec["seconds_per_step"], ",.1f"),
                             fmt(rec["gflop_per_s"], ",.1f"),
                             pct(rec["mfu"]),
                             fmt(rec["vs_reference"], ".2f")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def notes(sections: dict) -> str:
    """Checks, compile status, skips and errors, one line each."""
    lines = []
    for section, body in sections.items():
        for key in ("skipped", "error"):
            if key in body:
                lines.append(f"{section}: {key}: {body[key]}")
        for name, message in body.get("variant_errors", {}).items():
            lines.append(f"{section}/{name}: error: {message}")
        for name, comp in body.get("comparisons", {}).items():
            if comp["checks"]:
                text = ", ".join(f"{k}={fmt_check(v)}" for k, v in comp["checks"].items())
                lines.append(f"{section}/{name}: {text}")
            for path, rec in comp["paths"].items():
                if "compile" in rec:
                    lines.append(f"{section}/{name}/{path}: torch.compile {rec['compile']}")
    return "\n".join(lines)


def pct(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f} %"


def fmt_check(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
