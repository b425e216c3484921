"""The one exception type for bad input, and the CLI wrapper that reports it.

A `UserError` carries a one-line message naming the culprit (file, key or flag) and, where
there is a choice, the valid options. CLIs print it without a traceback and exit non-zero.
"""

import functools
import sys


class UserError(Exception):
    """Bad input from the user: one line, names the culprit and the valid choices."""


def unknown(kind: str, name: str, valid) -> UserError:
    """The error for an unknown name: `unknown model 'resnet9'; valid: convnet, mlp, ...`."""
    return UserError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")


def cli(main):
    """Wrap a `main(argv=None) -> int` so bad input exits 2 with one line, Ctrl-C exits 130.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: finished work is saved; re-run the same command to resume",
                  file=sys.stderr)
            return 130

    return wrapped
