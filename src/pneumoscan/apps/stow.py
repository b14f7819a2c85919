"""The listener's DICOMweb door: STOW-RS (PS3.18 10.5) requests parsed into parts, each part
handed to :meth:`pneumoscan.apps.listen.Listener.receive` as a C-STORE would be, and the answer in
DICOM JSON. The REST server's limits hold here too (pace, a budget per address, a size limit)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pneumoscan.apps.forward import OUT_OF_RESOURCES, SUCCESS
from pneumoscan.apps.limits import PeerBudget, UploadPace, UploadTooSlow, read_paced
from pneumoscan.apps.listen import CANNOT_UNDERSTAND, CHEST_STORAGE, log, printable

if TYPE_CHECKING:
    from pneumoscan.apps.listen import Listener


def serve_stow(listener: Listener, port: int) -> None:
    """The STOW-RS door served by uvicorn on a thread beside the DICOM port, on the listener's host.
    On a thread of its own: uvicorn takes signals only on the main thread, so the DICOM side keeps them."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(listener.stow_app(), host=listener.host, port=port, log_level="warning"))
    threading.Thread(target=server.run, name="pneumoscan-stow", daemon=True).start()


def stow_app(listener: Listener, max_bytes: int = 256 * 2**20, max_parts: int = 1000, concurrent: int = 4,
             pace: UploadPace | None = None, budget: PeerBudget | None = None):
    """STOW-RS (PS3.18 10.5): ``POST /studies`` (or ``/studies/{study}``, whose parts must all
    belong to that study) with a ``multipart/related; type="application/dicom"`` body; each
    part goes through :meth:`receive` like a C-STORE. Answers 200 (all stored), 202 (some
    refused) or 409 (none), with the DICOM JSON Referenced/Failed SOP Sequences (failure reason
    0xA700 "out of resources" when the queue was full, else 0xC000); 503 with ``Retry-After``
    when nothing was taken only because the queue was full, or when ``concurrent`` requests are
    already in; 413 past ``max_bytes`` or ``max_parts``. The REST server's limits hold here
    too: the upload's pace (408, :class:`~pneumoscan.apps.limits.UploadPace`) and a budget per
    client address (429, :class:`~pneumoscan.apps.limits.PeerBudget`); ``allow`` decides who
    may send (403, :meth:`~pneumoscan.apps.listen.Listener.peer_refusal`). Parsing runs off the event loop."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    places = asyncio.Semaphore(concurrent)
    pace = pace or UploadPace()
    budget = budget or PeerBudget(uploads=max(1, concurrent // 2))

    async def store(request):
        peer = request.client.host if request.client else "?"
        why = listener.peer_refusal(peer)
        if why:
            log.warning("refused a STOW-RS request from %s: %s", printable(peer, 64), why)
            return JSONResponse({"error": why}, 403)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/related"):
            return JSONResponse({"error": "expected multipart/related; type=\"application/dicom\""}, 415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            return JSONResponse({"error": f"upload of {int(declared):,} bytes is over the {max_bytes:,}-byte limit"},
                                413, headers={"Connection": "close"})
        refused = budget.refusal(peer)
        if refused:
            return JSONResponse({"error": refused[0]}, 429, headers={"Retry-After": str(refused[1])})
        if places.locked():
            return JSONResponse({"error": f"busy: {concurrent} STOW-RS requests in progress; retry shortly"}, 503,
                                headers={"Retry-After": "5"})
        async with places:
            try:
                with budget.reading(peer):
                    body = await read_paced(request.receive, max_bytes, pace)
            except UploadTooSlow as exc:
                budget.strike(peer)
                return JSONResponse({"error": str(exc)}, 408, headers={"Connection": "close"})
            if body is None:  # the sender went away
                return JSONResponse({"error": "the upload ended early"}, 400)
            if len(body) > max_bytes:
                return JSONResponse({"error": f"over the {max_bytes:,}-byte limit"}, 413,
                                    headers={"Connection": "close"})
            try:
                parts = await run_in_threadpool(multipart_parts, content_type, body, max_parts)
            except TooManyParts as exc:
                return JSONResponse({"error": str(exc)}, 413)
            finally:
                del body
            if parts is None:
                return JSONResponse({"error": "the multipart/related body cannot be parsed"}, 400)
            sender = f"STOW {peer}"
            study = request.path_params.get("study")
            outcome = []
            while parts:  # each part's bytes made once more as its parsing buffer is let go
                outcome.append(await run_in_threadpool(receive_part, listener, bytes(parts.pop(0)), sender, study))
        stored = [status == SUCCESS for status, _ in outcome]
        if not any(stored) and outcome and all(status == OUT_OF_RESOURCES for status, _ in outcome):
            return JSONResponse(stow_response(outcome), 503, headers={"Retry-After": "5"},
                                media_type="application/dicom+json")
        return JSONResponse(stow_response(outcome), 200 if all(stored) else 202 if any(stored) else 409,
                            media_type="application/dicom+json")

    return Starlette(routes=[Route("/studies", store, methods=["POST"]),
                             Route("/studies/{study}", store, methods=["POST"])])

def receive_part(listener: Listener, part: bytes, sender: str, study: str | None = None) -> tuple[int, Any]:
    """One STOW-RS part through the listener's ``receive``: (its status, the dataset or None); a part of
    another study than the request's path names is refused."""
    from io import BytesIO

    import pydicom

    from pneumoscan.films import MAX_PIXELS, XrayReadError
    from pneumoscan.films.dicom import inflated

    try:
        part = inflated(part, "a STOW-RS part", MAX_PIXELS)  # a deflated part, bounded like a file
        dataset = pydicom.dcmread(BytesIO(part))
    except XrayReadError as exc:
        log.warning("refused a STOW-RS part from %s: %s", sender, str(exc)[:200])
        return CANNOT_UNDERSTAND, None
    except Exception:  # noqa: BLE001 - not DICOM
        return CANNOT_UNDERSTAND, None
    try:  # pydicom converts elements when first read: a bad one (an unknown VR, say) fails here
        uid, sop_class = str(dataset.get("SOPInstanceUID", "")), str(dataset.get("SOPClassUID", ""))
        part_study = str(dataset.get("StudyInstanceUID", ""))
    except Exception as exc:  # noqa: BLE001 - this part alone is refused; the request's others go on
        log.warning("refused a STOW-RS part from %s: its header cannot be read (%s)", sender, str(exc)[:200])
        return CANNOT_UNDERSTAND, None
    if sop_class not in CHEST_STORAGE:
        log.warning("refused %s from %s: not a CR, DX or Secondary Capture instance", printable(uid, 64), sender)
        return CANNOT_UNDERSTAND, dataset
    if study is not None and part_study != study:
        log.warning("refused %s from %s: not of the study the request names", printable(uid, 64), sender)
        return CANNOT_UNDERSTAND, dataset
    return listener.receive(uid, dataset, part, sender), dataset


class TooManyParts(ValueError):
    """A multipart body with more parts than one request may carry (counted while parsing)."""


def multipart_parts(content_type: str, body: bytes, max_parts: int = 1_000) -> list[bytearray] | None:
    """The parts of a ``multipart/related`` body (RFC 2387) by python-multipart's streaming
    parser, which holds each part's bytes once (the standard library's MIME parser held a body
    about 14 times); None when it is not one. Raises :class:`TooManyParts` as part
    ``max_parts`` + 1 begins, before the rest is parsed."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not kind.startswith(b"multipart/") or not boundary:
        return None
    parts: list[bytearray] = []
    ended = []

    def begin() -> None:
        if len(parts) == max_parts:
            raise TooManyParts(f"more than {max_parts:,} parts; at most {max_parts:,} in one request")
        parts.append(bytearray())

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": begin, "on_part_data": lambda data, start, end: parts[-1].extend(data[start:end]),
        "on_end": lambda: ended.append(True)})
    try:
        for at in range(0, len(body), 1 << 20):  # 1 MiB at a time: one copy of a chunk, not of the body
            parser.write(body[at:at + (1 << 20)])
        parser.finalize()
    except MultipartParseError:
        return None
    if not ended:
        return None
    return parts  # bytearrays: bytes-like everywhere they go, and not copied again


def stow_response(outcome: list[tuple[int, Any]]) -> dict[str, Any]:
    """The STOW-RS answer in DICOM JSON: Referenced SOP Sequence (0008,1199) for what was stored,
    Failed SOP Sequence (0008,1198) with the Failure Reason (0xA700 out of resources, or 0xC000)
    for the rest."""
    def item(dataset: Any, reason: int | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [str(dataset.get("SOPClassUID", ""))]} if dataset else {"vr": "UI"},
            "00081155": {"vr": "UI", "Value": [str(dataset.get("SOPInstanceUID", ""))]} if dataset else {"vr": "UI"}}
        if reason is not None:
            entry["00081197"] = {"vr": "US", "Value": [reason]}
        return entry

    answer: dict[str, Any] = {}
    stored = [item(ds, None) for status, ds in outcome if status == SUCCESS]
    failed = [item(ds, status) for status, ds in outcome if status != SUCCESS]
    if stored:
        answer["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    return answer
