"""The worked example and the API docs run as a reader would run them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runs.results import open_result

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs/examples/analyse_your_checkpoint.py"


@pytest.mark.slow
def test_worked_example_runs_end_to_end(tmp_path):
    env = {**os.environ, "EXAMPLE_OUT": str(tmp_path), "EXAMPLE_STEPS": "20",
           "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(EXAMPLE)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    path = open_result(tmp_path / "results/path_a_b.h5", "interpolate")
    assert path.done.all() and [r["ref"] for r in path.attrs["inputs"]] == ["net A", "net B"]
    probed = open_result(tmp_path / "results/probe.h5", "probe")
    assert list(probed.coords["checkpoint"]) == ["net A", "net B", "pixels"]
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figures == ["interpolate-1d_path_a_b.png", "plane_init_a_b.png"]
    assert all((tmp_path / "figures" / name).stat().st_size > 10_000 for name in figures)
    assert "error_barrier" in done.stdout


def code_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, except those marked `# needs: ...` (data
    that cannot be had offline, e.g. CIFAR-10)."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return [b for b in blocks if not b.lstrip().startswith("# needs:")]


@pytest.mark.slow
def test_api_docs_examples_run(tmp_path):
    """Every runnable block of docs/api.md, in order, in one fresh interpreter."""
    blocks = code_blocks(ROOT / "docs/api.md")
    assert len(blocks) >= 5
    script = tmp_path / "docs_examples.py"
    script.write_text("\n\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-3000:]
