"""REST API and web page over the same :class:`~pneumoscan.predict.Predictor` the CLI uses.

- ``POST /v1/predict`` (multipart field ``file``: PNG, JPEG or DICOM) → the CLI's JSON object
  plus inline PNGs (``original_png``, ``overlay_png``: lung contour, crop box, Grad-CAM).
- ``GET /health`` → ``{"status": "ok", ...}``; ``GET /`` → the web page; ``/docs`` → OpenAPI.

Bad input gets a 4xx with ``{"error": "..."}``, never a 500 with a traceback. Uploads are held in
memory only; the client's file name is a label in the answer, never part of a path. One lock
serialises the model (Grad-CAM hooks on a shared network must not interleave); uvicorn's threads
still read and decode concurrently.
"""

from __future__ import annotations

import base64
import threading
from importlib import resources
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from pneumoscan import __version__
from pneumoscan.io import MAX_PIXELS, XrayReadError, decode_xray
from pneumoscan.predict import Predictor

DEFAULT_MAX_UPLOAD_MB = 32
PREVIEW_SIDE = 768


def _png_data_uri(bgr: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", bgr)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode()


def preview_images(result) -> dict[str, str]:
    """Down-scaled original and overlay (contour, box, heat map) as PNG data URIs."""
    from pneumoscan.enhance import to_uint8
    from pneumoscan.overlay import BOX_BGR, LUNG_BGR

    pixels = result.pixels
    scale = min(1.0, PREVIEW_SIDE / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    grey = cv2.cvtColor(to_uint8(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)), cv2.COLOR_GRAY2BGR)
    overlay = grey.copy()
    if result.cam is not None:
        cam = cv2.resize(result.cam, size, interpolation=cv2.INTER_LINEAR)
        heat = cv2.applyColorMap(to_uint8(cam), cv2.COLORMAP_JET)
        alpha = (np.clip(cam, 0, 1) * 0.55)[:, :, None]
        overlay = (overlay * (1 - alpha) + heat * alpha).astype(np.uint8)
    mask = cv2.resize(result.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(overlay, contours, -1, LUNG_BGR, 2, cv2.LINE_AA)
    x0, y0, x1, y1 = (round(v * scale) for v in result.box)
    cv2.rectangle(overlay, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, 2, cv2.LINE_AA)
    return {"original_png": _png_data_uri(grey), "overlay_png": _png_data_uri(overlay)}


def create_app(predictor: Predictor | None = None, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_pixels: int = MAX_PIXELS) -> FastAPI:
    predictor = predictor or Predictor.from_default()
    lock = threading.Lock()
    limit = int(max_upload_mb * 2**20)
    app = FastAPI(title="PneumoScan", version=__version__,
                  description="Chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM. "
                              "Research use only.")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"invalid request: {where} {first.get('msg', '')}".strip())

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def _refuse_large(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.url.path == "/v1/predict" and length and length.isdigit() and int(length) > limit + 1024:
            return error(413, f"upload of {int(length):,} bytes is over the {limit:,}-byte limit")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "models": predictor.models,
                "max_upload_bytes": limit, "max_pixels": max_pixels}

    @app.post("/v1/predict")
    def predict(file: UploadFile = File(..., description="PNG, JPEG or DICOM chest X-ray"),
                cam: str = Query("top", description="'top' (most probable assessed finding), 'none' or an "
                                                      "assessed class name, any capitalisation"),
                images: bool = Query(True, description="include original_png and overlay_png")):
        try:
            cam = predictor.cam_class(cam)
        except ValueError as exc:
            return error(422, str(exc))
        data = file.file.read(limit + 1)
        if len(data) > limit:
            return error(413, f"upload is over the {limit:,}-byte limit")
        label = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:200]
        try:
            image = decode_xray(data, name=label, max_pixels=max_pixels)
        except XrayReadError as exc:
            return error(400, str(exc))
        with lock:
            result = predictor.predict(image, cam=cam, name=label, keep_arrays=images)
        if result.error:  # pragma: no cover - decoding already succeeded above
            return error(400, result.error)
        body = result.to_dict()
        if images:
            body.update(preview_images(result))
        return body

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (resources.files("pneumoscan") / "web" / "index.html").read_text()

    return app
