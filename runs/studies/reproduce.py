"""The paper's first effect at CPU scale: `python -m runs.reproduce --preset cifar10-subset`.

For each seed, distil a student into a random teacher on real images and another on
Gaussian-noise images of the same shape and count, then compare k-NN accuracy (k=20,
squared L2, majority vote) on the real test split: pixels, teacher, student, noise-student.
Prints a Markdown table (mean +- std over seeds). Runs are ordinary store runs: re-running
skips what is finished.
"""

import argparse
import dataclasses
import statistics

from runs.config import HelpFormatter, seed_arg
from runs.data import cifar10_subset_path, load_dataset
from runs.engines.distill import DistillConfig, distill_with_steps, load_data
from runs.errors import UserError, cli, echo_command

HEAD = dict(out_dim=4096, hidden_dim=512, bottleneck_dim=64)  # the small head of the README
PRESETS = {
    # 1797 8x8 grey digits: runs in about a minute a seed on 2 CPU cores.
    "digits": dict(model="convnet", width=0.5, dataset="digits", batch_size=64,
                   steps="10ep", **HEAD),
    # 5085 / 1017 real CIFAR-10 images from ../shared/data (see its README).
    "cifar10-subset": dict(model="convnet", width=1.0, dataset="npz", batch_size=256,
                           steps="15ep", **HEAD),
}


def preset_config(name: str, seed: int) -> tuple[DistillConfig, str]:
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}; valid: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    steps = fields.pop("steps")
    if fields["dataset"] == "npz":
        path = cifar10_subset_path()
        if path is None:
            raise UserError("the real CIFAR-10 subset is absent (expected "
                            "../shared/data/cifar10_subset.npz beside the repository)")
        fields["data_root"] = str(path)
    return DistillConfig(seed=seed, **fields), steps


def noise_config(cfg: DistillConfig, train) -> DistillConfig:
    """The random-input control: noise of the real data's shape and count, probed on it."""
    shape = ",".join(str(n) for n in train.x.shape[1:])
    return dataclasses.replace(cfg, dataset="noise", data_root="", subset=0,
                               data_options=(f"shape={shape}", f"count={len(train.y)}"),
                               probe_dataset=cfg.dataset, probe_root=cfg.data_root)


def run_one(cfg: DistillConfig, steps: str, store: str, device: str) -> dict:
    return distill_with_steps(cfg, steps, (), store, device).summary()


def pixel_knn(cfg: DistillConfig) -> float:
    from probes.features import pixel_features
    from probes.nearest import knn_accuracy
    root = cfg.data_root or None
    train, test = (load_dataset(cfg.dataset, root=root, split=s) for s in ("train", "test"))
    stats = train.info.mean, train.info.std  # the paper's input row: normalised pixels
    return knn_accuracy(pixel_features(train.x, *stats), train.y,
                        pixel_features(test.x, *stats), test.y, k=cfg.probe_k)


def collect(preset: str, seeds, store: str, device: str) -> dict[str, list[float]]:
    rows = {"pixels": [], "teacher": [], "student": [], "noise-student": []}
    for seed in seeds:
        cfg, steps = preset_config(preset, seed)
        image = run_one(cfg, steps, store, device)
        train = load_data(cfg)[0]
        noise = run_one(noise_config(cfg, train), steps, store, device)
        rows["teacher"].append(image["knn_teacher"])
        rows["student"].append(image["knn_student"])
        rows["noise-student"].append(noise["knn_student"])
    rows["pixels"] = [pixel_knn(preset_config(preset, seeds[0])[0])]
    return rows


def table(rows: dict[str, list[float]]) -> str:
    teacher = statistics.mean(rows["teacher"])
    lines = ["| input | k-NN accuracy (%) | vs teacher (points) | seeds |",
             "|---|---|---|---|"]
    for name, values in rows.items():
        pct = [100 * v for v in values]
        spread = statistics.stdev(pct) if len(pct) > 1 else 0.0
        gain = 100 * (statistics.mean(values) - teacher)
        lines.append(f"| {name} | {statistics.mean(pct):.2f} ± {spread:.2f} | {gain:+.2f} | "
                     f"{len(values)} |")
    return "\n".join(lines)


EPILOG = r"""examples:
  python -m runs.reproduce --preset cifar10-subset --seeds 0 1 2
  python -m runs.reproduce --preset digits --seeds 0 --device cpu --store /tmp/store"""


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runs.reproduce", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="cifar10-subset", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--seeds", nargs="+", type=seed_arg, default=[0, 1, 2], help="run seeds")
    p.add_argument("--store", default="store", help="root folder of the run store")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    echo_command("runs.reproduce", argv)
    rows = collect(args.preset, args.seeds, args.store, args.device)
    print(f"\nk-NN (k=20, squared L2, majority vote) on the test split, preset {args.preset}:")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
