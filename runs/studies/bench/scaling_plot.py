"""The cost-curve figure of `python -m runs.bench --scaling`: one column per curve, time on
top, peak memory below, in the figures' style (figures/style.py). Reads the JSON document
only (runs.studies.bench.scaling writes it), so a figure can be redrawn from a file.

What a reader should see: k-NN time grows linearly in the training rows while its memory
stays at one distance block (the dashed chunk bound); a landscape scan costs a fixed time
per point (the dashed least-squares line, its slope in the legend); an IMP prune step costs
about the same at every level and grows with the weights; K runs stacked cost about K times
one (the dotted line) where the device has no room to spare (a CPU), less on a GPU.
"""

from pathlib import Path

import numpy as np

from figures import style

MIB = 2**20
# curve -> how its x values are shown: (divisor, suffix) on linear axes from 0
X_FORMATS = {"knn": (1e3, "k"), "prune_weights": (1e6, "M")}
X_TICKS_AT_POINTS = ("parallel",)  # a tick at every K measured (1, 2, 4, 8, 16)
UNITS = {"rows": "row", "points": "point", "level": "level", "weights": "weight",
         "runs": "run"}
PANEL_WIDTH = 2.05  # inches per column
HEIGHT = 4.6  # inches


def time_unit(seconds: float) -> tuple[float, str]:
    """(seconds per unit, unit) that shows `seconds` (a panel's largest) as 1..1000."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return scale, unit
    return 1e-9, "ns"


def seconds_text(value: float) -> str:
    """0.0000123 -> '12.3 µs'; 0.0231 -> '23.1 ms'; 2.5 -> '2.5 s'."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
        if abs(value) >= scale or unit == "ns":
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} s"


def draw(doc: dict, out_dir, name: str) -> Path:
    """Draw every curve of `doc` into OUT_DIR/NAME.png (and .pdf); returns the PNG path."""
    names = list(doc.get("curves", {}))
    fig, axes = style.figure(PANEL_WIDTH * max(len(names), 1), HEIGHT, nrows=2,
                             ncols=max(len(names), 1), squeeze=False, sharex="col")
    for column, curve_name in enumerate(names):
        curve = doc["curves"][curve_name]
        top, bottom = axes[0, column], axes[1, column]
        if "error" in curve or not curve.get("points"):
            top.text(0.5, 0.5, "not measured:\n" + curve.get("error", "no points")[:80],
                     ha="center", va="center", wrap=True, transform=top.transAxes,
                     fontsize=6)
            continue
        time_panel(top, curve_name, curve)
        memory_panel(bottom, curve_name, curve)
        x_axis(bottom, curve_name, curve)
    fig.suptitle(title(doc), fontsize=9)
    fig.text(0.5, -0.02, footnote(doc), ha="center", va="top", fontsize=6.5)
    fig.tight_layout()
    return style.save(fig, out_dir, name)[1]


def title(doc: dict) -> str:
    sizes = ", quick (CPU-sized) sizes" if doc.get("quick") else ""
    return (f"Cost curves on {doc.get('device_name', '?')} ({doc.get('device', '?')}), "
            f"{str(doc.get('created_utc', ''))[:10]}{sizes}")


def footnote(doc: dict) -> str:
    memory = ("torch.cuda.max_memory_allocated" if doc.get("device_type") == "cuda" else
              "peak resident set size, each point in a process of its own")
    return (f"time: median of the timed calls after one untimed call; memory: peak above "
            f"what the process held before them ({memory}). torch "
            f"{doc.get('torch_version', '?')}, CPU threads {doc.get('torch_threads', '?')}, git "
            f"{str(doc.get('git_sha', '?'))[:10]}")


def xy(curve: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = curve["points"]
    return (np.array([p["x"] for p in points], float),
            np.array([p[key] for p in points], float))


def time_panel(ax, name: str, curve: dict) -> None:
    """Median seconds per call, bars from the fastest to the slowest call; the least-squares
    line (linear curves); for `parallel` K times the K = 1 step (K runs one after another)."""
    x, seconds = xy(curve, "seconds")
    scale, unit = time_unit(float(np.nanmax(seconds)))
    repeats = [np.asarray(p.get("seconds_repeats") or [p["seconds"]], float)
               for p in curve["points"]]
    spread = np.array([[s - r.min(), r.max() - s] for s, r in zip(seconds, repeats)]).T
    ax.errorbar(x, seconds / scale, yerr=spread / scale, fmt="o-", color=style.PALETTE[0],
                ms=3.5, lw=1.2, capsize=2, elinewidth=0.8,
                label="median (bars: min-max)")
    fit = curve.get("time_fit", {})
    if curve.get("linear") and fit.get("slope") is not None:
        grid = np.linspace(0, x.max(), 50)
        per = UNITS.get(curve["x"], curve["x"])
        ax.plot(grid, (fit["slope"] * grid + fit["intercept"]) / scale, "--",
                color=style.PALETTE[3], lw=1,
                label=f"linear fit:\n{seconds_text(fit['slope'])} per {per}")
    if name == "parallel" and x[0] == 1:
        ax.plot(x, x * seconds[0] / scale, ":", color=style.PALETTE[7], lw=1.2,
                label="K × (K = 1):\none after another")
    ax.set_title(curve["title"], fontsize=7.5)
    ax.set_ylabel(f"time per {'step' if name == 'parallel' else 'call'} ({unit})")
    top = max(float(np.nanmax(seconds)), x.max() * seconds[0] if name == "parallel" else 0)
    ax.set_ylim(bottom=0, top=1.45 * top / scale)
    ax.legend(fontsize=5.5, frameon=False, loc="upper left")


def memory_panel(ax, name: str, curve: dict) -> None:
    """Peak memory in MiB; for k-NN the distance block its chunk is sized to."""
    x, peak = xy(curve, "peak_bytes")
    ax.plot(x, peak / MIB, "s-", color=style.PALETTE[2], ms=3.5, lw=1.2, label="measured")
    if name == "knn":
        _, block = xy(curve, "block_bytes")
        ax.plot(x, block / MIB, "--", color=style.PALETTE[3], lw=1,
                label="chunk bound: one float32\n(chunk, rows) distance block")
        ax.legend(fontsize=5.5, frameon=False, loc="upper left")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_ylim(bottom=0, top=max(1.0, 1.5 * float(np.nanmax(peak)) / MIB))


def x_axis(ax, name: str, curve: dict) -> None:
    """Linear from 0 (so linear costs read as straight lines through the fit)."""
    x, _ = xy(curve, "seconds")
    if name in X_TICKS_AT_POINTS:  # but not two closer than a tenth of the axis
        ticks = [v for i, v in enumerate(x) if i == 0 or v - x[i - 1] >= 0.1 * x.max()]
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    elif name in X_FORMATS:
        divisor, suffix = X_FORMATS[name]
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / divisor:g}{suffix}" if v else "0")
    label = curve["x_label"]
    if name == "plane":
        label += "\nsides " + ", ".join(str(p.get("side")) for p in curve["points"])
    ax.set_xlabel(label)
    ax.set_xlim(left=0, right=1.05 * float(np.nanmax(x)))
