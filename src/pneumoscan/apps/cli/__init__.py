"""The ``pneumoscan`` command: a thin layer over the package's functions, one module per purpose
(:mod:`.data`, :mod:`.segmentation`, :mod:`.train`, :mod:`.judge`, :mod:`.export`, :mod:`.run`, :mod:`.serve`,
:mod:`.study`, :mod:`.review`, :mod:`.monitor`) on the
shared :mod:`.common`."""

from pneumoscan.apps.cli import (  # noqa: F401  (each registers its commands)
    data,
    export,
    judge,
    monitor,
    review,
    run,
    segmentation,
    serve,
    study,
    train,
)
from pneumoscan.apps.cli.common import app, fail

__all__ = ["app", "fail"]
