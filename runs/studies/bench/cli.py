"""The benchmark's command line: `python -m runs.bench` (its door) or
`python -m runs.studies.bench`."""

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from runs.config import HelpFormatter
from runs.device import resolve_device
from runs.engines import engine
from runs.errors import UserError, cli, unknown
from runs.studies.bench import scaling
from runs.studies.bench.common import (
    COMPILE,
    FULL,
    QUICK,
    VARIANTS,
    Bench,
    BenchConfig,
    device_slug,
    parse_variant,
    peak_tflops,
)
from runs.studies.bench.report import (
    ORDER,
    SECTIONS,
    fmt,
    goals_text,
    notes,
    provenance,
    run_section,
    table,
    write,
)

HELP = """Benchmark the toolkit's hot paths against plain references (DataLoader + torchvision
transforms + workers, eager fp32, channels-first, one model or point at a time) in one
process: images/s (points/s, queries/s), GFLOP/s, MFU against the GPU's dense bf16 peak and
the ratio fast / reference. Without --quick the sizes are the paper's (ResNet18, batch 512,
DINO head 65536, 50k x 512 features): meant for a GPU. Writes OUT/<device>[-quick].json,
keeping the sections of earlier runs that this run did not measure."""


EPILOG = r"""examples:
  python -m runs.bench --device cuda                 # full sizes (ResNet18, 50k x 512 probes)
  python -m runs.bench --device cpu --quick --sections landscape --threads 1  # a laptop
  python -m runs.bench --device cuda --sections train --variants vit_base resnet18:norm=layer
  python -m runs.bench --device cpu --quick --scaling  # cost curves: JSON + figure"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runs.bench", description=HELP, epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized smoke run (width 0.25, batch 64, a few steps, 5k x 128 "
                        "features); a couple of minutes on 2 cores")
    p.add_argument("--out", default="bench", help="folder of the JSON file")
    p.add_argument("--sections", nargs="+", default=None, metavar="NAME",
                   help=f"sections to measure, of: {', '.join(ORDER)} (default: all); with "
                        f"--scaling the curves, of: {', '.join(scaling.NAMES)}")
    p.add_argument("--scaling", action="store_true",
                   help="measure cost curves instead: time and peak memory of each hot path "
                        "as its work grows (k-NN rows, landscape points, IMP level and "
                        "weights, K parallel runs), each CPU point in a process of its own; "
                        "writes OUT/scaling-<device>[-quick].json and .png (--quick: "
                        "CPU-sized, a few minutes on 2 cores)")
    p.add_argument("--compile", choices=COMPILE, default=None,
                   help="torch.compile the fast paths (default of the preset: auto = CUDA "
                        "only); a failed compile falls back to eager and says so")
    p.add_argument("--variants", nargs="*", default=None, metavar="NAME[:K=V,...]",
                   help="more networks the train and distill sections measure, fast path "
                        "only (MFU per architecture); none given = none; default: "
                        f"{' '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=0, help="timed steps per path; 0 = preset")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps; -1 = preset")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (torch.set_num_threads); 0 = torch's default. "
                        "On a loaded machine 1 thread gives steadier CPU numbers")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak (TFLOP/s) when not in the table")
    return p


def make_config(args) -> BenchConfig:
    cfg = QUICK if args.quick else FULL
    changes = {}
    if args.compile:
        changes["compile"] = args.compile
    if args.steps > 0:
        changes["steps"] = args.steps
    if args.warmup >= 0:
        changes["warmup"] = args.warmup
    if args.variants is not None:
        changes["variants"] = tuple(args.variants)
    for text in changes.get("variants", ()):
        parse_variant(text)  # an unknown network or option stops the run before it starts
    return dataclasses.replace(cfg, **changes)


def check_sections(names: list[str]) -> list[str]:
    for name in names:
        if name not in SECTIONS:
            raise unknown("benchmark section", name, ORDER)
    return [name for name in ORDER if name in names]


def use_compile(choice: str, device: torch.device) -> bool | str:
    """False, True (the default mode) or a torch.compile mode name."""
    if choice in engine.COMPILE_MODES:
        return choice
    return choice == "on" or (choice == "auto" and device.type == "cuda")


@cli
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.scaling:
        scaling.select(args.sections)  # an unknown curve stops the run before it starts
        return scaling.run_scaling(device, args.quick, args.out, args.sections, argv,
                                   peak_tflops(device, args.peak_tflops))
    cfg = make_config(args)
    if cfg.steps < 1:
        raise UserError(f"--steps {cfg.steps}: must be at least 1")
    names = check_sections(args.sections or list(ORDER))
    bench = Bench(cfg, device, peak_tflops(device, args.peak_tflops),
                  use_compile(cfg.compile, device))
    doc = provenance(bench, args.quick, argv)
    print(f"runs.bench {shlex.join(argv)}: {doc['device_name']} ({device}), torch "
          f"{doc['torch_version']}, git {doc['git_sha'][:10]}, peak bf16 "
          f"{fmt(bench.peak_tflops, '.1f')} TFLOP/s", file=sys.stderr)
    sections = {name: run_section(name, bench) for name in names}
    doc["sections"] = sections
    name = device_slug(device) + ("-quick" if args.quick else "")
    path = write(doc, Path(args.out) / f"{name}.json")
    print(table(sections))
    extra = notes(sections)
    if extra:
        print(extra)
    print(goals_text(doc["goals"], doc["device_name"], args.quick))
    print(f"wrote {path}")
    return 1 if any("error" in body for body in sections.values()) else 0
