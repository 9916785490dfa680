"""The one domain error type. The CLI turns it into one red line and a distinct exit code."""

from __future__ import annotations


class HotcoldError(Exception):
    """A failure the user can fix. `what` says what went wrong (and where), `fix` how to fix it."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(what)
        self.what = what
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.what} — {self.fix}" if self.fix else self.what


class InputError(HotcoldError):
    """Bad user input: a missing or corrupt file, an unknown id, a malformed option."""

    exit_code = 2


class IncompatibleError(HotcoldError):
    """Artifacts that do not belong together (other model, other format version, altered file)."""

    exit_code = 3


class InfeasibleError(HotcoldError):
    """A budget or constraint set that no placement satisfies."""

    exit_code = 4
