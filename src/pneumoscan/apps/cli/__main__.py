"""``python -m pneumoscan.apps.cli``."""

from pneumoscan.apps.cli import app

app()
