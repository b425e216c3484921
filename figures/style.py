"""One look for every figure: seaborn ticks, a colour-blind palette, two-column paper sizes.

Sizes in inches: a column of a two-column paper is 3.25 in wide, the full width 6.75 in.
Every figure is written as a vector PDF and a 200-dpi PNG beside it.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

COLUMN = 3.25  # inches
FULL = 6.75  # inches
PALETTE = sns.color_palette("colorblind")
ROLE_COLORS = {"pixels": PALETTE[7], "teacher": PALETTE[0], "student": PALETTE[1],
               "noise-student": PALETTE[2], "supervised": PALETTE[3], "checkpoint": PALETTE[4]}
SPARE_COLORS = [c for c in PALETTE if c not in ROLE_COLORS.values()]


def role_colors(roles) -> dict:
    """A colour per role: the fixed ones above, then the spare palette colours in order
    for the others (e.g. `student (alpha=1.0)`), so no two roles of a figure share one."""
    others = [r for r in roles if r not in ROLE_COLORS]
    spare = {r: SPARE_COLORS[i % len(SPARE_COLORS)] for i, r in enumerate(others)}
    return {r: ROLE_COLORS.get(r) or spare[r] for r in roles}


def apply() -> None:
    sns.set_theme(context="paper", style="ticks", palette=PALETTE, font_scale=0.9,
                  rc={"axes.spines.right": False, "axes.spines.top": False,
                      "pdf.fonttype": 42, "savefig.bbox": "tight"})


def figure(width: float = COLUMN, height: float = 2.2, **kwargs):
    apply()
    return plt.subplots(figsize=(width, height), **kwargs)


def save(fig, out_dir, name: str) -> list[Path]:
    """Write NAME.pdf and NAME.png into out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png"]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=200)
    plt.close(fig)
    return paths
