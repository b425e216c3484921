"""The one exception type for bad input, and the CLI wrapper that reports it.

A `UserError` carries a one-line message naming the culprit (file, key or flag) and, where
there is a choice, the valid options. CLIs print it without a traceback and exit non-zero.
The wrapper also turns Ctrl-C and SIGTERM into a clean stop (exit 130 / 143, a line saying to
re-run the same command) and a full disk into one line naming the file it could not write.
"""

import errno
import functools
import os
import shlex
import signal
import sys
import threading


class UserError(Exception):
    """Bad input from the user: one line, names the culprit and the valid choices."""


def unknown(kind: str, name: str, valid) -> UserError:
    """The error for an unknown name: `unknown model 'resnet9'; valid: convnet, mlp, ...`."""
    return UserError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")


# Exit statuses: bad input 2; stopped by Ctrl-C or SIGTERM 128 + the signal, as a shell
# reports a process that signal ended.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
RESUME = "finished work is saved; re-run the same command to resume"


def disk_full(err: BaseException) -> OSError | None:
    """The out-of-space OSError behind `err`: itself, or the one it was raised while handling
    (torch's and HDF5's writers fail again as they close, hiding the first error); None if
    there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def with_filename(err: BaseException, path) -> OSError:
    """The full-disk error behind `err`, naming `path` when it names no file (a failed
    write() or an HDF5 error does not): the CLI then says which file it could not write."""
    full = disk_full(err)
    if full.filename:
        return full
    return OSError(full.errno, os.strerror(full.errno), str(path))


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, a scheduler's stop) turned into an interrupt, so the same clean-up
    runs as for Ctrl-C: temp files removed, result files closed, locks released."""


_stops = []  # signals received during the outermost command, in order


def _stop(signum, frame):
    _stops.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


_calls = threading.local()  # how deep `cli` mains are nested in this thread (the pipeline)


def _handle_signals() -> dict:
    """Install `_stop` for SIGINT (unless ignored, as under nohup) and SIGTERM; returns the
    handlers to put back."""
    _stops.clear()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _stop)
    return previous


def _stopped_message(sig) -> tuple[str, int]:
    name = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
    return f"{name}: {RESUME}", EXIT_SIGTERM if sig == signal.SIGTERM else EXIT_SIGINT


def echo_command(module: str, argv=None) -> str:
    """Print `python -m MODULE ARGS`, shell-quoted, to stderr: the first line of a command's
    log, which pastes back into a shell. argv None: this process's arguments."""
    args = sys.argv[1:] if argv is None else list(argv)
    line = shlex.join(["python", "-m", module, *args])
    print(line, file=sys.stderr)
    return line


def cli(main):
    """Wrap a `main(argv=None) -> int` so bad input exits 2 with one line, Ctrl-C exits 130
    and SIGTERM 143 with a line that says how to resume, a full disk exits 2 naming the file.

    Anything else is a bug and keeps its traceback. A main called by another (the pipeline
    calls each stage's) lets interrupts travel up, so only the outermost reports them.

    Every wrapped command also takes `--import MODULE` (repeatable) and `--model
    pkg.mod:factory` (see runs.usercode): the modules are imported and allowed before the
    command's parser sees argv, from which the --import pairs are removed. `__wrapped__`
    (what a launcher's array task calls) does the same without the error handling.
    """

    @functools.wraps(main)
    def with_user_code(argv=None) -> int:
        from runs.usercode import take_argv
        given = sys.argv[1:] if argv is None else list(argv)
        rest = take_argv(given)
        # Unchanged: hand on None, so the command still reads (and echoes) sys.argv itself.
        return main(None if argv is None and rest == given else rest)

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        depth = getattr(_calls, "depth", 0)
        # Signal handlers can only be set from the main thread.
        handle = depth == 0 and threading.current_thread() is threading.main_thread()
        previous = _handle_signals() if handle else {}
        _calls.depth = depth + 1
        try:
            return with_user_code(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            if depth:
                raise
            message, code = _stopped_message(
                signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
            print(message, file=sys.stderr)
            return code
        except Exception as err:
            if handle and _stops:  # a library turned the interrupt into its own error
                message, code = _stopped_message(_stops[0])  # (matplotlib does)
                print(message, file=sys.stderr)
                return code
            full = disk_full(err)
            if full is None:
                raise
            where = f" while writing {full.filename}" if full.filename else ""
            print(f"error: {os.strerror(full.errno)}{where}; free space, then "
                  f"re-run the same command to resume (finished work is kept)",
                  file=sys.stderr)
            return 2
        finally:
            _calls.depth = depth
            for sig, handler in previous.items():  # None: set outside Python; the default
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    wrapped.__wrapped__ = with_user_code
    return wrapped
