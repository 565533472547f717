"""The error every `lkspec` sub-command raises for a user mistake."""
from __future__ import annotations


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""
