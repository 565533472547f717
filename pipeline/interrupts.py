"""Ctrl-C and SIGTERM for every lkspec command: unwind (every `finally` runs), then one line and 130 / 143.

    with SignalLog() as signals:          # in cli.main, around the whole command
        ...                               # SIGINT / SIGTERM raise Interrupted here
    signals.first()                       # the first signal that arrived, if any

Both signals raise `Interrupted`, a KeyboardInterrupt, so `except Exception` never swallows them and
`ray_session` stops the command's Ray workers and private cluster on the way out. A library may
replace the SIGINT handler meanwhile (Ray Train's `fit()` installs one that aborts the run and
calls `sys.exit(0)`): the log also reads a wakeup pipe (`signal.set_wakeup_fd`), which records every
signal whatever handler runs, so such an exit is still reported as the interruption it is.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from typing import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a command ran."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalLog:
    """Raise Interrupted on SIGINT / SIGTERM and remember every such signal (main thread only)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._active = threading.current_thread() is threading.main_thread()
        self._read_fd = self._write_fd = -1
        self._saved_handlers: dict = {}
        self._saved_wakeup_fd = -1

    def __enter__(self) -> SignalLog:
        if self._active:
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._read_fd, False)
            os.set_blocking(self._write_fd, False)
            self._saved_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
            self._saved_handlers = {number: signal.signal(number, self._raise) for number in HANDLED}
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._active:
            return
        self._drain()
        for number, handler in self._saved_handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._saved_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)
        self._active = False

    def _raise(self, signum: int, frame) -> None:
        raise Interrupted(signum)

    def _drain(self) -> None:
        try:
            data = os.read(self._read_fd, 1024)
        except BlockingIOError:
            return
        self.received += [number for number in data if number in HANDLED]

    def first(self) -> int | None:
        """The first SIGINT / SIGTERM received so far, or None."""
        if self._active:
            self._drain()
        return self.received[0] if self.received else None


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT / SIGTERM inside (a cluster shutting down must not be left half stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.signal(number, signal.SIG_IGN) for number in HANDLED}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Put the SIGINT / SIGTERM handlers back after the block: `ray.init` replaces SIGTERM's with its own
    (Python: `sys.exit(15)`; its C++ core: a stack dump, then abort), which would skip the clean stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.getsignal(number) for number in HANDLED}
    try:
        yield
    finally:
        for number, handler in saved.items():
            if handler is not None:
                signal.signal(number, handler)


def interrupt_message(argv: list[str], signum: int) -> str:
    """The one line printed after an interrupted command: what stopped, and how to resume it."""
    command = shlex.join(["lkspec", *argv])
    name = signal.Signals(signum).name
    if argv[:1] == ["submit"]:
        return f"lkspec: {name} interrupted `{command}`: its Ray job was stopped; submit it again to rerun it"
    if argv[:1] == ["train"] and "--resume" not in argv:
        resume = f"resume it from its last checkpoint with `{shlex.join(['lkspec', *argv, '--resume'])}`"
    else:
        resume = "run the same command to resume it"
    return f"lkspec: {name} interrupted `{command}`: its Ray workers and private cluster are stopped; {resume}"
