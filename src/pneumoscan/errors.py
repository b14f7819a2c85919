"""How an error is told in one line: every face (the CLI, the server, the store, the writer) puts
the first line of an exception into its own message, and never a traceback. Light on purpose: the
results store and the review commands import it without loading PyTorch."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line for a one-line message (its type when it says nothing); for an
    exception that wraps a driver's (SQLAlchemy's ``orig``), the driver's own words."""
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
