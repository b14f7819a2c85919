"""Progress on stderr for everything a person waits for (tqdm: count, rate, time left).

On a terminal, one bar redrawn in place; when stderr is a file or a pipe (a log, CI), one plain
line every ``LOG_INTERVAL_S`` instead of carriage returns; with ``--quiet`` nothing. Quiet is
kept in the environment (``PNEUMOSCAN_QUIET=1``) so that worker processes started by a command
(``prepare``'s, Ray's) are quiet too.
"""

from __future__ import annotations

import os
import sys
from typing import Any

QUIET_ENV = "PNEUMOSCAN_QUIET"
#: Seconds between progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 10.0


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def set_quiet(on: bool) -> bool:
    """Silence progress for this process and the ones it starts (a Typer option's callback)."""
    if on:
        os.environ[QUIET_ENV] = "1"
    return on


def note(message: str) -> None:
    """A line about what is happening now (what a progress bar cannot say); silent with --quiet."""
    if not quiet():
        print(message, file=sys.stderr, flush=True)


class _Lines:
    """A file for tqdm that turns its in-place redraws into whole lines (for logs)."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def bar(total: int | None, desc: str, unit: str = "img", enabled: bool = True, **options: Any):
    """A tqdm bar on stderr as the module says (off when not ``enabled``, and with --quiet);
    ``with bar(n, "predict") as b: b.update()``."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet() or not enabled, file=sys.stderr if tty else _Lines(),
                mininterval=0.2 if tty else LOG_INTERVAL_S, dynamic_ncols=tty, **options)
