"""REST API and web page over the same :class:`~pneumoscan.predict.Predictor` the CLI uses.

- ``POST /v1/predict`` (multipart field ``file``: PNG, JPEG or DICOM) → the CLI's JSON object
  plus inline PNGs (``original_png``, ``overlay_png``: lung contour, crop box, Grad-CAM).
- ``GET /health`` → ``{"status": "ok", ...}``; ``GET /`` → the web page; ``/docs`` → OpenAPI.

Bad input gets a 4xx with ``{"error": "..."}``, never a 500 with a traceback. Uploads are held in
memory only; the client's file name is a label in the answer, never part of a path.

Under load: at most ``workers + queue`` predictions are admitted at once; the next gets 503 with
``Retry-After`` before its body is read. Uploads are read here, chunk by chunk, before a
prediction place is taken (at most ``4 × (workers + queue)`` at once): one that stalls for 10 s,
averages under 1 KiB/s after 10 s, or takes over 300 s gets 408 (:class:`UploadPace`), so slow
senders cannot hold the predictions' places; one client address holds at most half the reading
places, and after three uploads cut off within a minute it gets 429 for a minute
(:class:`~pneumoscan.apps.limits.PeerBudget`), so reconnecting does not help a slow sender; one that passes the limit gets 413
at once, whatever
the transfer encoding (nothing is spooled to disk). At most ``workers`` images are decoded at a time (each bounded by
``max_pixels``), and one lock serialises the model (Grad-CAM hooks on a shared network must not
interleave). ``/health`` runs on the event loop, outside the prediction pool.

On a network: ``api_key`` (constant-time comparison; header ``X-API-Key`` or
``Authorization: Bearer``) is required on every route but ``/health`` and the static page ``/``
(which holds no data and asks for the key); ``allowed_hosts`` (Starlette's TrustedHostMiddleware)
refuses other Host headers, so that a web page elsewhere cannot reach the API through DNS
rebinding.
"""

from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pneumoscan import __version__
from pneumoscan.apps.limits import PeerBudget, UploadPace, UploadTooSlow, read_paced
from pneumoscan.apps.responses import data_uri, json_error, web_file
from pneumoscan.films import MAX_PIXELS, XrayReadError, decode_xray
from pneumoscan.outputs.writer import keep_film, write_to_store
from pneumoscan.predict import Predictor

DEFAULT_MAX_UPLOAD_MB = 32
PREVIEW_SIDE = 768
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: multipart headers around the file may add this much to the body
MULTIPART_SLACK = 64 * 1024
PREDICT_PATH = "/v1/predict"
OPEN_PATHS = {"/health", "/", "/review", "/study", "/monitor", "/outlines.js"}
KEPT_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}


async def _json(send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Admission:
    """ASGI middleware in front of the prediction route: admission (503 + Retry-After when the
    predictions in progress and queued fill ``capacity``, answered before the body is read and
    checked again once it is in), a pace for the upload (408 for a sender too slow,
    :class:`UploadPace`, with at most ``readers`` uploads coming in at once, counted apart from
    the predictions), a budget per client address (:class:`PeerBudget`: at most half the reading
    places, and 429 for a while after three uploads cut off as too slow, so that reconnecting
    does not help a slow sender) and a streaming size limit (413 as soon as the body passes it).
    The body read here is replayed to the app; runs on the event loop, so its counters need no lock."""

    def __init__(self, app, *, limit: int, capacity: int, readers: int | None = None,
                 pace: UploadPace = UploadPace(), budget: PeerBudget | None = None, strikes: int = 3):
        self.app, self.limit, self.capacity, self.pace = app, limit, capacity, pace
        self.readers = readers if readers is not None else 4 * capacity
        self.budget = budget or PeerBudget(uploads=max(1, self.readers // 2), strikes=strikes)
        self.admitted = self.reading = 0

    async def busy(self, send) -> None:
        await _json(send, 503, {"error": f"busy: {self.capacity} predictions in progress or queued; retry shortly"},
                    {"Retry-After": "2"})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.admitted >= self.capacity or self.reading >= self.readers:
            return await self.busy(send)
        peer = (scope.get("client") or ("?",))[0]
        refused = self.budget.refusal(peer)
        if refused:
            return await _json(send, 429, {"error": refused[0]}, {"Retry-After": str(refused[1]), "Connection": "close"})
        most = self.limit + MULTIPART_SLACK
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > most:
            return await _json(send, 413, {"error": f"upload of {int(declared):,} bytes is over the "
                                                    f"{self.limit:,}-byte limit"}, {"Connection": "close"})
        self.reading += 1
        try:
            with self.budget.reading(peer):
                body = await read_paced(receive, most, self.pace)
        except UploadTooSlow as exc:
            self.budget.strike(peer)
            return await _json(send, 408, {"error": str(exc)}, {"Connection": "close"})
        finally:
            self.reading -= 1
        if body is None:  # the client went away
            return
        if len(body) > most:  # stop reading, and close: the rest of the upload is never taken
            return await _json(send, 413, {"error": f"upload is over the {self.limit:,}-byte limit"},
                               {"Connection": "close"})
        if self.admitted >= self.capacity:  # filled while this upload came in
            return await self.busy(send)
        self.admitted += 1
        try:
            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
        finally:
            self.admitted -= 1

class ApiKey:
    """ASGI middleware: every route but :data:`OPEN_PATHS` needs the key."""

    def __init__(self, app, *, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        given = headers.get(b"x-api-key") or (token.strip() if scheme.lower() == b"bearer" else b"")
        if not hmac.compare_digest(given, self.key):
            return await _json(send, 401, {"error": "missing or wrong API key (header X-API-Key)"},
                               {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


def _png_data_uri(bgr: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", bgr)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("PNG encoding failed")
    return data_uri(data.tobytes(), "image/png")


def preview_images(result) -> dict[str, Any]:
    """Down-scaled original and overlay (the CLI's picture: contour, box, heat map, caption) as
    PNG data URIs; with more than one Grad-CAM explanation, ``overlay_png`` is the first one's
    panel and ``overlays_png`` holds each explained label's (the page switches between them)."""
    from pneumoscan.enhance import to_uint8
    from pneumoscan.outputs.overlay import picture_for

    pixels = result.pixels
    scale = min(1.0, PREVIEW_SIDE / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    grey = to_uint8(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))
    labels = list(result.cam_maps or {}) or [None]
    overlays = {label: _png_data_uri(picture_for(result, max_side=PREVIEW_SIDE, only=label)) for label in labels}
    return {"original_png": _png_data_uri(grey), "overlay_png": overlays[labels[0]],
            "overlays_png": {k: v for k, v in overlays.items() if k is not None}}


#: The ``clinical`` form field: a flat JSON object of a few fields, so a few kilobytes at most.
MAX_CLINICAL_CHARS = 4096


def clinical_fields(predictor: Predictor, named: dict[str, str | None], extra: str | None) -> dict[str, Any] | None:
    """The request's patient information (form fields, and ``clinical`` as a JSON object), checked
    against the model's fields: sent to a model that does not use it, or naming a field the model
    does not know, it is refused rather than silently ignored. Whether the model reads any is
    asked before ``clinical`` is parsed, and it is parsed only when short: a flat object of
    numbers and strings."""
    given = {k: v for k, v in named.items() if v not in (None, "")}
    spec = predictor.classifier.clinical
    if spec is None and (given or (extra or "").strip()):
        raise ValueError(f"patient information was sent ({', '.join(given) or 'clinical'}), "
                         f"but this model does not use it")
    if extra:
        if len(extra) > MAX_CLINICAL_CHARS:
            raise ValueError(f"'clinical' is {len(extra):,} characters; at most {MAX_CLINICAL_CHARS:,} are read")
        try:
            more = json.loads(extra)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"'clinical' must be a JSON object of field: value ({type(exc).__name__})") from None
        if not isinstance(more, dict) or not all(v is None or isinstance(v, str | int | float) for v in more.values()):
            raise ValueError("'clinical' must be a flat JSON object of field: value (numbers or text)")
        given |= {str(k): v for k, v in more.items() if v not in (None, "")}
    if not given or spec is None:  # (no spec and something given was refused above)
        return None
    unknown = sorted(set(given) - set(spec.names))
    if unknown:
        raise ValueError(f"this model's patient-information fields are {', '.join(spec.names)}; "
                         f"it does not use {', '.join(unknown)}")
    return given


@dataclass
class Serving:
    """What the routes of one app share (``app.state.serving``): the predictor behind one lock,
    the decoding slots, the limits, and where results and films are kept."""

    predictor: Predictor
    limit: int
    max_pixels: int
    workers: int
    pace: UploadPace
    auth_required: bool
    store: Any = None
    keep_films: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    decoding: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.decoding = threading.BoundedSemaphore(self.workers)


def create_app(predictor: Predictor | None = None, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_pixels: int = MAX_PIXELS, workers: int = 1, queue: int = 8, api_key: str | None = None,
               allowed_hosts: tuple[str, ...] | list[str] | None = LOOPBACK_HOSTS,
               pace: UploadPace = UploadPace(), slow_strikes: int = 3, store=None,
               reader_header: str | None = None, keep_films: Path | None = None) -> FastAPI:
    """The app. ``allowed_hosts`` None accepts any Host header (behind a proxy that checks it);
    ``pace``: how slowly an upload may come in before it gets 408; ``slow_strikes``: uploads from
    one address cut off within a minute before it gets 429 for a minute (0: never). With a ``store``
    (:class:`pneumoscan.store.db.Store`) every result is stored and the review page is served
    (:mod:`pneumoscan.apps.review_routes`); ``keep_films``: a folder where uploaded films are kept
    (named by their SHA-256), so that reviewed films can be exported for evaluation."""
    serving = Serving(predictor or Predictor.from_default(), int(max_upload_mb * 2**20), max_pixels, workers, pace,
                      bool(api_key), store, keep_films)
    # /docs and /redoc from files this server serves (fastapi-offline), never a CDN: hospital
    # networks often have no way out to the internet.
    app = FastAPIOffline(title="PneumoScan", version=__version__,
                         description="Chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM. "
                                     "Research use only.")
    app.state.serving = serving
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(HTTPException)(_http)
    # Outermost first: Host check, then the key, then admission and the upload limit.
    app.add_middleware(Admission, limit=serving.limit, capacity=workers + queue, pace=pace, strikes=slow_strikes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.include_router(router)
    if store is not None:
        from pneumoscan.apps.review_routes import add_review_routes

        add_review_routes(app, store, reader_header=reader_header)
    return app


async def _invalid(_request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return json_error(422, f"invalid request: {where} {first.get('msg', '')}".strip())


async def _http(_request, exc: HTTPException) -> JSONResponse:
    return json_error(exc.status_code, str(exc.detail))


router = APIRouter()


def serving_of(request: Request) -> Serving:
    return request.app.state.serving


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:  # async: answered on the event loop, never queued
    serving = serving_of(request)
    store = serving.store
    store_ok = True if store is None else await run_in_threadpool(store.reachable)
    return {"status": "ok" if store_ok else "degraded: the results store cannot be reached",
            "store_reachable": None if store is None else store_ok,
            "version": __version__, "models": serving.predictor.models,
            "max_upload_bytes": serving.limit, "max_pixels": serving.max_pixels, "auth_required": serving.auth_required,
            "upload_deadline_s": serving.pace.deadline_s, "min_upload_rate": serving.pace.min_rate,
            # the kind only: /health is open
            "store": store.url.split(":", 1)[0].split("+")[0] if store is not None else None}


@router.post("/v1/predict")
def predict(request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM chest X-ray"),
            cam: str = Query("top", description="'top' (a map per called finding, the most probable first), "
                                                  "'none' or assessed class names (comma-separated), any capitalisation"),
            images: bool = Query(True, description="include original_png and overlay_png"),
            force: bool = Query(False, description="score an image the input gate refuses as not a "
                                                   "frontal chest X-ray (marked in 'quality')"),
            age: str | None = Form(None, description="patient age in years or as a DICOM age (058Y), "
                                                     "for a model that fuses patient information"),
            sex: str | None = Form(None, description="M, F or O"),
            view: str | None = Form(None, description="view position: PA or AP"),
            clinical: str | None = Form(None, description="other fields of the model, as a JSON object")):
    serving = serving_of(request)
    predictor, store, limit = serving.predictor, serving.store, serving.limit
    try:
        asked = predictor.cam_class(cam)
        given = clinical_fields(predictor, {"age": age, "sex": sex, "view": view}, clinical)
    except ValueError as exc:
        return json_error(422, str(exc))
    data = file.file.read(limit + 1)
    if len(data) > limit:
        return json_error(413, f"upload is over the {limit:,}-byte limit")
    label = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:200]
    with serving.decoding:  # at most `workers` decoded images in memory at once
        try:
            image = decode_xray(data, name=label, max_pixels=serving.max_pixels)
        except XrayReadError as exc:
            return json_error(400, str(exc))
        if store is None:
            del data
        with serving.lock:
            result = predictor.predict(image, cam=asked, name=label, keep_arrays=images or store is not None,
                                       force=force, clinical=given)
        if result.error:  # pragma: no cover - decoding already succeeded above
            return json_error(400, result.error)
        body = result.to_dict()
        if store is not None:
            body = write_to_store(store, body, result, data, name=label, path=kept(serving.keep_films, data, label),
                                  run=predictor.run_identity(force), source="serve")
            del data
        if images:  # still inside the decode slot: the full-size arrays are freed after this
            body.update(preview_images(result))
    return body


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return web_file("index.html")


def kept(folder: Path | None, data: bytes, label: str) -> Path | None:
    """The upload kept in ``folder`` (by SHA-256, the name's suffix kept), or None."""
    if folder is None:
        return None
    suffix = Path(label).suffix.lower() if Path(label).suffix.lower() in KEPT_SUFFIXES else ""
    try:
        return keep_film(folder, data, suffix)
    except OSError:
        return None  # the store then says the film has no kept copy
