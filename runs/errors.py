"""The one exception type for bad input, and the CLI wrapper that reports it.

A `UserError` carries a one-line message naming the culprit (file, key or flag) and, where
there is a choice, the valid options. CLIs print it without a traceback and exit non-zero.
The wrapper also turns Ctrl-C and SIGTERM into a clean stop (exit 130 / 143, a line saying to
re-run the same command), and the machine's refusals into one line, exit 2: a full disk naming
the file it could not write, a read-only or forbidden file or folder naming the path, a path in
the way (a file where a folder should be), and memory running out (with the size asked for).
"""

import errno
import functools
import os
import re
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


# What the file system refused, said in one line (see `os_failure`); anything else is a bug.
NO_ACCESS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EROFS: "read-only file system"}
IN_THE_WAY = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG)
# HDF5 and torch's C++ writers raise RuntimeError or OSError with the errno in the message.
_ERRNO_TEXT = re.compile(r"errno = (\d+)")
_NAME_TEXT = re.compile(r"(?:file)?name = '([^']*)'")


def _chain(err: BaseException):
    """`err`, then the errors it was raised from or while handling, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def os_failure(err: BaseException, codes) -> OSError | None:
    """The OSError with an errno in `codes` behind `err`: itself, one in its chain, or one
    rebuilt from an HDF5/torch message that carries `errno = N` (filename None then: see
    `named_file`); None if there is none."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in codes:
            return link
        text = str(link) if isinstance(link, OSError | RuntimeError) else ""
        found = _ERRNO_TEXT.search(text)
        if found and int(found.group(1)) in codes:
            return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
    return None


def disk_full(err: BaseException) -> OSError | None:
    """The out-of-space OSError behind `err`: itself, or the one it was raised while handling
    (torch's and HDF5's writers fail again as they close, hiding the first error); None if
    there is none."""
    return os_failure(err, DISK_FULL)


def named_file(full: OSError, err: BaseException) -> str | None:
    """The file an OSError names, else the `name = '...'` an HDF5 message in the chain gives."""
    if full.filename:
        return str(full.filename)
    for link in _chain(err):
        found = _NAME_TEXT.search(str(link))
        if found:
            return found.group(1)
    return None


def with_filename(err: BaseException, path) -> OSError:
    """The full-disk error behind `err`, naming `path` when it names no file (a failed
    write() or an HDF5 error does not): the CLI then says which file it could not write."""
    full = disk_full(err)
    if full.filename:
        return full
    return OSError(full.errno, os.strerror(full.errno), str(path))


def machine_refusal(err: BaseException) -> str | None:
    """One line for what the machine refused (a full disk, a read-only or forbidden path, a
    path in the way, memory), naming the file or the size; None for anything else (a bug)."""
    full = disk_full(err)
    if full is not None:
        name = named_file(full, err)
        where = f" while writing {name}" if name else ""
        return (f"{os.strerror(full.errno)}{where}; free space, then re-run the same command "
                f"to resume (finished work is kept)")
    denied = os_failure(err, NO_ACCESS)
    if denied is not None:
        return _no_access(denied, named_file(denied, err))
    blocked = os_failure(err, IN_THE_WAY)
    if blocked is not None and named_file(blocked, err):
        return _in_the_way(blocked, named_file(blocked, err))
    return out_of_memory(err)


def _no_access(err: OSError, path: str | None) -> str:
    """`cannot write PATH: read-only file system; ...` (read: an existing unreadable file)."""
    why = NO_ACCESS[err.errno]
    if path is None:
        return f"{why} ({err.strerror}); check the permissions of the folders given"
    reading = os.path.isfile(path) and not os.access(path, os.R_OK)
    if reading:
        return f"cannot read {path}: {why}; make it readable (chmod) or copy it elsewhere"
    where = ("choose a folder on a writable disk" if err.errno == errno.EROFS else
             "make its folder writable or choose another")
    return f"cannot write {path}: {why}; {where} (--out, --store)"


_IN_THE_WAY_HINT = {errno.ENOTDIR: "a part of the path is a file, not a folder",
                    errno.EISDIR: "it is a folder, not a file",
                    errno.EEXIST: "something is already there",
                    errno.ENOENT: "it is not there (moved or deleted?)",
                    errno.ENAMETOOLONG: "choose a shorter path"}


def _in_the_way(err: OSError, path: str) -> str:
    return f"{path}: {os.strerror(err.errno)} ({_IN_THE_WAY_HINT[err.errno]})"


_ASKED = (re.compile(r"(?:Unable|Tried|tried) to allocate ([0-9.]+ ?[KMGTPE]?i?B)\b"),
          re.compile(r"tried to allocate (\d+) bytes"))


def out_of_memory(err: BaseException) -> str | None:
    """`out of memory (asked for 2.91 TiB); ...` for a MemoryError, torch's OutOfMemoryError
    or its CPU allocator's RuntimeError in the chain of `err`; None otherwise."""
    for link in _chain(err):
        text = str(link)
        if not (isinstance(link, MemoryError) or type(link).__name__ == "OutOfMemoryError"
                or (isinstance(link, RuntimeError) and "can't allocate memory" in text)):
            continue
        size = _asked_size(text)
        asked = f" (asked for {size})" if size else ""
        return (f"out of memory{asked}; lower the sizes that set it (--batch-size, --width, "
                f"grid points, --data-options) or free memory")
    return None


def _asked_size(text: str) -> str | None:
    """The allocation a MemoryError's message names, as '2.91 TiB'; None if it names none."""
    found = _ASKED[0].search(text)
    if found:
        return found.group(1).replace(". ", " ").rstrip(".")
    found = _ASKED[1].search(text)
    if not found:
        return None
    size, unit = float(found.group(1)), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.3g} {unit}"


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
    and SIGTERM 143 with a line that says how to resume, a full disk, a read-only or
    forbidden path, a path in the way and memory running out exit 2 with one line naming
    the file or size (`machine_refusal`).

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
            message = machine_refusal(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2
        finally:
            _calls.depth = depth
            for sig, handler in previous.items():  # None: set outside Python; the default
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    wrapped.__wrapped__ = with_user_code
    return wrapped
