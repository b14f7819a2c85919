"""The review page's API over the results store (added to the server by ``serve --db``).

- ``GET /review``: the page (static; it asks for the reader's key).
- ``GET /v1/review/me``: who the key or proxy header names.
- ``GET /v1/review/worklist``: results, the reader's unreviewed first; filters ``status``,
  ``finding``, ``source``, ``since``/``until`` (ISO dates, UTC), ``reader`` (reviewed by), ``limit``, ``offset``.
- ``GET /v1/review/results/{id}``: one result with its layers and the reader's current review.
- ``POST /v1/review/results/{id}/reviews``: a review (JSON; :func:`pneumoscan.store.review.check_review`),
  appended: it supersedes the reader's earlier one, never overwrites it.
- ``GET /study``: the reader-study page; ``GET /v1/study`` the reader's studies;
  ``GET /v1/study/{name}/next`` their next reading (:func:`pneumoscan.store.study.next_step`:
  unaided, nothing of the model); ``POST …/steps/{id}/rating`` and ``…/correction`` (409 while a
  washout holds the reading back).

A reader is named by their key (header ``X-Reader-Key``; ``pneumoscan review readers add``) or,
behind a site proxy that authenticates people, by the proxy's header (``--reader-header``, e.g.
``X-Remote-User``; trusted as given, so only behind that proxy). Reviewing needs one (401
otherwise). The store's blocking calls run in FastAPI's thread pool, never on the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pneumoscan.apps.responses import data_uri, json_error, web_file
from pneumoscan.store.db import NotFound, Store, StoreError, SubmissionTaken
from pneumoscan.store.review import ReviewError, assessed, check_review
from pneumoscan.store.schema import Reader
from pneumoscan.store.study import Waiting

READER_KEY_HEADER = "x-reader-key"


class Unauthorised(PermissionError):
    """No reader, or an unknown key (401; a known reader without the right is 403)."""
MAX_REVIEW_BYTES = 64 * 1024


def _date(text: str | None, name: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"'{name}' is an ISO date or time (2026-12-03 or 2026-12-03T14:00)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


#: Row ids and offsets fit a signed 64-bit integer (SQLite's and PostgreSQL's bigint): a larger
#: number is a client's mistake (422), never a database error (500 or 503).
MAX_ROW_ID = 2**63 - 1
RowId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID)]


#: How each failure of a review or study request is answered (first match wins: a subclass before
#: its base, Unauthorised before PermissionError, NotFound before StoreError).
ANSWERS: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorised, 401), (PermissionError, 403), (NotFound, 404), (Waiting, 409), (SubmissionTaken, 409),
    (ReviewError, 422), (ValueError, 422), (StoreError, 503))
_ANSWERED = tuple(kind for kind, _ in ANSWERS)

router = APIRouter()


def add_review_routes(app: FastAPI, store: Store, *, reader_header: str | None = None) -> None:
    """The review page, the reader-study page, the monitor and their API on ``app``, over ``store``;
    ``reader_header``: the site proxy's header that names a reader (trusted as given)."""
    app.state.store, app.state.reader_header = store, reader_header
    app.include_router(router)


def store_of(request: Request) -> Store:
    return request.app.state.store


def reader_of(request: Request) -> Reader:
    """The reader the request's key names, or the site proxy's header (never a reader with a key
    or an adjudicator: anyone on the path to this server could send that header)."""
    store, header = store_of(request), request.app.state.reader_header
    key = request.headers.get(READER_KEY_HEADER)
    if key:
        reader = store.reader_by_key(key)
        if reader is None:
            raise Unauthorised("unknown reader key")
        return reader
    if header and request.headers.get(header):
        reader = store.reader_by_name(request.headers[header], create=True)
        if reader.key_sha256 is not None or reader.adjudicator:
            raise PermissionError(f"{reader.name} is a reader with a key{' (an adjudicator)' if reader.adjudicator else ''}: "
                                  f"they sign in with X-Reader-Key, never through the proxy header {header}")
        return reader
    raise Unauthorised("reviewing needs a reader: send header X-Reader-Key (pneumoscan review readers add NAME)"
                       + (f" or come through the site proxy ({header})" if header else ""))


def guarded(request: Request, work: Callable[[Reader], Any]) -> Any:
    """``work(reader)`` for the request's reader; a failure answered as :data:`ANSWERS` says."""
    try:
        return work(reader_of(request))
    except _ANSWERED as exc:
        status = next(code for kind, code in ANSWERS if isinstance(exc, kind))
        return json_error(status, str(exc))


@router.get("/review", response_class=HTMLResponse, include_in_schema=False)
def review_page() -> str:
    return web_file("review.html")


@router.get("/v1/review/me")
def me(request: Request):
    return guarded(request, lambda reader: {"reader": reader.name, "adjudicator": reader.adjudicator})


@router.get("/v1/review/worklist")
def worklist(request: Request, status: str | None = None, finding: str | None = None, source: str | None = None,
             since: str | None = None, until: str | None = None, reader: str | None = None,
             limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_ROW_ID)):
    def work(me: Reader) -> dict[str, Any]:
        items, total = store_of(request).worklist(me.id, status=status, finding=finding, source=source,
                                                  since=_date(since, "since"), until=_date(until, "until"),
                                                  reviewed_by=reader, limit=limit, offset=offset)
        return {"reader": me.name, "total": total, "items": items}
    return guarded(request, work)


@router.get("/v1/review/results/{result_id}")
def result(request: Request, result_id: RowId):
    def work(me: Reader) -> dict[str, Any]:
        view = store_of(request).result_view(result_id, me.id)
        layers = view["layers"]
        if layers is not None:
            layers["preview"] = data_uri(layers["preview"], "image/jpeg")
        view["assessed"] = assessed(view["record"])
        return view
    return guarded(request, work)


@router.get("/outlines.js", include_in_schema=False)
def outlines_script() -> Response:
    return Response(web_file("outlines.js"), media_type="text/javascript")


@router.get("/monitor", response_class=HTMLResponse, include_in_schema=False)
def monitor_page() -> str:
    return web_file("monitor.html")


@router.get("/v1/monitor")
def monitor(request: Request, reference: int = Query(500, ge=20, le=MAX_ROW_ID),
            window: int = Query(100, ge=20, le=MAX_ROW_ID)):
    """``pneumoscan monitor`` on this server's store, for any reader (docs/MONITOR.md)."""
    from pneumoscan.monitoring import read_store, summary_line
    from pneumoscan.monitoring.report import figures
    from pneumoscan.monitoring.watch import monitor as run_monitor

    def work(me: Reader) -> dict[str, Any]:
        rows, truth = read_store(store_of(request))
        report = run_monitor(rows, reference=reference, window=window, truth=truth)  # ValueError → 422
        return {"summary": summary_line(report), "report": report, "figures": figures(report)}
    return guarded(request, work)


@router.get("/study", response_class=HTMLResponse, include_in_schema=False)
def study_page() -> str:
    return web_file("study.html")


@router.get("/v1/study")
def my_studies(request: Request):
    from pneumoscan.store.study import studies_of

    return guarded(request, lambda me: {"reader": me.name, "studies": studies_of(store_of(request), me)})


@router.get("/v1/study/{name}/next")
def next_reading(request: Request, name: str):
    from pneumoscan.store.study import next_step

    def work(me: Reader) -> dict[str, Any]:
        answer = next_step(store_of(request), name, me)
        if answer.get("step"):
            answer["step"]["preview"] = data_uri(answer["step"]["preview"], "image/jpeg")
        return answer
    return guarded(request, work)


async def posted(request: Request, work: Callable[[Reader, Any], Any], what: str = ""):
    """A POST's JSON body (at most :data:`MAX_REVIEW_BYTES`; 422 otherwise), then
    ``work(reader, payload)`` in the thread pool, its failures answered by :func:`guarded`.
    Only the reader's own page can post: a body that is not ``application/json`` (415) or a
    request from another site (its ``Origin`` not this server's host, or ``Sec-Fetch-Site:
    cross-site``; 403) is refused, so that a page elsewhere cannot file reviews in the name of a
    reader whose credentials the browser adds by itself (an SSO proxy's, say)."""
    refused = foreign_post(request)
    if refused:
        return json_error(*refused)
    body = await request.body()
    if len(body) > MAX_REVIEW_BYTES:
        return json_error(422, f"{what}at most {MAX_REVIEW_BYTES:,} bytes")
    try:
        payload = json.loads(body or b"null")
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return json_error(422, f"{what}the body is a JSON object")
    return await run_in_threadpool(guarded, request, lambda me: work(me, payload))


def foreign_post(request: Request) -> tuple[int, str] | None:
    """Why a POST is refused (status, message), or None: not JSON, or from another site."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        return 415, f"the body is sent as Content-Type: application/json, not {kind or 'a body without a Content-Type'}"
    origin = request.headers.get("origin")
    if (origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()) \
            or request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return 403, "a review or rating is posted from this server's own page only (another site's Origin)"
    return None


def fields(payload: Any) -> dict[str, Any]:
    return payload if isinstance(payload, dict) else {}


@router.post("/v1/study/{name}/steps/{step_id}/rating", status_code=201)
async def rating(request: Request, name: str, step_id: RowId):
    from pneumoscan.store.study import rate

    return await posted(request, lambda me, payload: JSONResponse(status_code=201, content=rate(
        store_of(request), name, me, step_id, fields(payload).get("ratings"), fields(payload).get("seconds"))))


@router.post("/v1/study/{name}/steps/{step_id}/correction", status_code=201)
async def correction(request: Request, name: str, step_id: RowId):
    from pneumoscan.store.study import correct

    return await posted(request, lambda me, payload: JSONResponse(status_code=201, content=correct(
        store_of(request), name, me, step_id, str(fields(payload).get("target")), fields(payload).get("rating"),
        fields(payload).get("reason"))))


@router.post("/v1/review/results/{result_id}/reviews", status_code=201)
async def add(request: Request, result_id: RowId):
    def work(me: Reader, payload: Any):
        store = store_of(request)
        review = check_review(payload, store.result_for_review(result_id))
        saved = store.add_review(result_id, me, review)
        return JSONResponse(status_code=200 if saved["repeated"] else 201, content=saved | {"reader": me.name})

    return await posted(request, work, "a review: ")
