"""The ``pneumoscan`` command: a thin layer over the package's functions, one module per purpose
(:mod:`.data`, :mod:`.train`, :mod:`.run`, :mod:`.serve`, :mod:`.study`, :mod:`.review`, :mod:`.monitor`) on the
shared :mod:`.common`."""

from pneumoscan.apps.cli import data, monitor, review, run, serve, study, train  # noqa: F401  (each registers its commands)
from pneumoscan.apps.cli.common import app, fail

__all__ = ["app", "fail"]
