"""Cooperative stops: Ctrl-C (SIGINT) and SIGTERM (what Slurm, Kubernetes and systemd send) are recorded by the
handler and raised by compactmind itself at its own checkpoints, never from inside a library call.

The checkpoints, each a call of `checkpoint()`: between trials, between a trial's steps, once per calibration
block, once per evaluation batch (and per window of a dynamic study's dense KL reference), once per level built
and per level read into memory, once per chosen trial in a dynamic study's final measurement, and between report
files. At a checkpoint the recorded signal raises `Interrupted` (Ctrl-C) or
`Terminated` (SIGTERM), both KeyboardInterrupt subclasses, so code that ends on Ctrl-C ends on them too.

A second signal of either kind raises at once (as the first one's kind), wherever the main thread is (the
behaviour of Python's default Ctrl-C handler, for a user who does not want to wait for the next checkpoint); a
third restores the default
action and delivers itself again, which ends the process at once. This is the one process-wide state of the
library: signals are process-wide, and the CLI installs the handler (`guard()`) around a whole command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """Ctrl-C took effect at a checkpoint (or at once, on the second)."""

    status = "interrupted"
    exit_code = 130


class Terminated(Interrupted):
    """SIGTERM took effect at a checkpoint (or at once, on the second)."""

    status = "terminated"
    exit_code = 143


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: type[Interrupted] | None = None
_count = 0


def _exception_for(signum: int) -> type[Interrupted]:
    return Terminated if signum == signal.SIGTERM else Interrupted


def _on_signal(signum, _frame) -> None:
    global _pending, _count
    _count += 1
    if _count >= 3:  # the default action: the process ends now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _pending = _pending or _exception_for(signum)
    if _count == 2:  # raised as the first signal's kind: a terminated job stays terminated
        stop, _pending = _pending, None
        raise stop


def pending() -> type[Interrupted] | None:
    """The stop a signal asked for and no checkpoint has raised yet (None: none)."""
    return _pending


def checkpoint() -> None:
    """Raise the recorded stop, if a signal asked for one. Cheap: call it wherever stopping is safe."""
    global _pending
    if _pending is not None:
        stop, _pending = _pending, None
        raise stop


def request(stop: type[Interrupted]) -> None:
    """Record a stop as a signal would (the next checkpoint raises it)."""
    global _pending
    _pending = _pending or stop


@contextlib.contextmanager
def guard():
    """Record SIGINT and SIGTERM for the checkpoints while the block runs (in the main thread; elsewhere a no-op),
    then put the previous handlers back. A stop recorded and never raised is dropped on the way out."""
    global _pending, _count
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in _SIGNALS}
    _pending, _count = None, 0
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending, _count = None, 0


def end_on_signal() -> None:
    """For the process's last moments, after the command (and its guard) ended: a signal ends the process at once,
    its output flushed, with the signal's exit status (143 for SIGTERM, 130 for Ctrl-C). The interpreter's
    teardown takes seconds with a model loaded; every result is written by then, and the default action would
    end the process as killed by the signal, with its buffered output lost."""
    def _end(signum, _frame):
        flush_stdio()
        os._exit(_exception_for(signum).exit_code)

    for sig in _SIGNALS:
        signal.signal(sig, _end)


def flush_stdio() -> None:
    """Flush standard output and error before a process ends without the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing more can be said
            pass
