"""`lkspec: warning: ...` lines on stderr, each distinct one printed once per command.

A command plans many runs of one drafter (a sweep, a study's parts), and each plan says the same
thing about it; `lkspec` runs every command inside `warnings_once()`.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

_printed: set[str] | None = None  # the messages printed in the current warnings_once() block


def warn(message: str) -> None:
    """One `lkspec: warning: ...` line on stderr, unless warnings_once() already printed it."""
    if _printed is not None:
        if message in _printed:
            return
        _printed.add(message)
    print(f"lkspec: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def warnings_once() -> Iterator[None]:
    """Within the block (nested blocks included), `warn` prints each distinct message once."""
    global _printed
    outer = _printed
    _printed = set() if outer is None else outer
    try:
        yield
    finally:
        _printed = outer
