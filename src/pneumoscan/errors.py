"""The errors a user can act on, and how an error is told in one line: every face (the CLI, the
server, the store, the writer) puts the first line of an exception into its own message, and never a
traceback. Light on purpose: the results store and the review commands import it without loading
PyTorch."""

from __future__ import annotations


class PneumoScanError(Exception):
    """The base of every error whose message tells the user what is wrong and what to do (a bad
    model file, manifest, cache, film, store, study …). A face catches this one class, shows its
    first line and exits or answers cleanly; anything else is a defect and keeps its traceback.
    Each subclass also derives from the built-in error it used to be (``ValueError`` mostly), so
    code that caught those still does."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line for a one-line message (its type when it says nothing); for an
    exception that wraps a driver's (SQLAlchemy's ``orig``), the driver's own words."""
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
