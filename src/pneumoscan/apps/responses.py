"""What every HTTP face answers with: a JSON error (``{"error": "..."}``, one line, the status that
says whose fault it is), a picture inlined as a data URI, and the package's own pages."""

from __future__ import annotations

import base64
from importlib import resources

from fastapi.responses import JSONResponse


def json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def data_uri(data: bytes, media: str) -> str:
    """``data:MEDIA;base64,...`` for an image the page shows without another request."""
    return f"data:{media};base64," + base64.b64encode(data).decode()


def web_file(name: str) -> str:
    """One of the package's pages or scripts (``apps/web/NAME``), read when it is asked for."""
    return (resources.files("pneumoscan") / "apps" / "web" / name).read_text()
