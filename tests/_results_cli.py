"""The test scan of _results_writer.py as a command (through runs.errors.cli, as every CLI):

    python tests/_results_cli.py PATH

Fills every cell; bad input or a full disk exits 2 with one `error:` line. No torch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results_writer import fill, open_scan  # noqa: E402

from runs.errors import cli  # noqa: E402


@cli
def main(argv=None) -> int:
    with open_scan(argv[0]) as result:
        fill(result, result.missing())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
