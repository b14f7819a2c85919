"""Where the listener's results go on: a DICOM node by C-STORE (``--forward HOST:PORT:AET``) or a
DICOMweb service by STOW-RS (``--forward-dicomweb URL``). Each target answers per object: stored,
refused for good (a reason, never retried), or :class:`Transient` (down or busy: the listener's
outbox tries again with backoff).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path

#: DIMSE status codes the listener answers and reads (PS3.7 Annex C).
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


class Transient(Exception):
    """A target that did not take an object now (down, busy): tried again later."""


@dataclass(frozen=True)
class Forward:
    """A C-STORE target: ``HOST:PORT:AET``."""

    host: str
    port: int
    ae_title: str

    kind = "dimse"

    @classmethod
    def parse(cls, text: str) -> Forward:
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not 1 <= len(parts[2]) <= 16:
            raise ValueError(f"--forward {text!r}: expected HOST:PORT:AET")
        return cls(parts[0], int(parts[1]), parts[2])

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, paths: list[Path], calling: str) -> dict[Path, str | None]:
        """Per path: None when stored, else why the target refuses it for good. Raises
        :class:`Transient` when the target cannot be reached or is busy."""
        import pydicom
        from pynetdicom import AE

        datasets = {p: pydicom.dcmread(p) for p in paths}
        ae = AE(ae_title=calling)
        for ds in datasets.values():
            ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID, "1.2.840.10008.1.2.1"])
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise Transient(f"no association with {self}")
        outcome: dict[Path, str | None] = {}
        try:
            taken = {c.abstract_syntax for c in assoc.accepted_contexts}
            for path, ds in datasets.items():
                if ds.SOPClassUID not in taken:
                    outcome[path] = f"{self} does not take {ds.SOPClassUID.name}"
                    continue
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is None or code & 0xFF00 == OUT_OF_RESOURCES:
                    raise Transient(f"{self} stopped answering or is out of resources")
                outcome[path] = None if code == SUCCESS or code & 0xF000 == 0xB000 else \
                    f"{self} answered status 0x{code:04X}"
        finally:
            if assoc.is_established:
                assoc.release()
        return outcome


@dataclass(frozen=True)
class StowForward:
    """A DICOMweb target: STOW-RS to ``URL/studies`` (``URL`` is the service root, e.g. Orthanc's
    ``http://host:8042/dicom-web``), one instance per request so that each gets its own answer.
    An instance counts as forwarded only when the answer (DICOM JSON) lists it in its Referenced
    SOP Sequence; a Failed SOP Sequence entry, an answer that is not DICOM JSON, or a redirect
    (never followed: the film would go to another host) is a failure of that instance, "out of
    resources" (0xA7xx), HTTP 5xx/408/429, no answer within ``timeout`` seconds or no connection
    a reason to try again later."""

    url: str
    timeout: float = 30.0
    #: Seconds one instance's request may take in all: a target that sends its answer a little at
    #: a time never trips the per-read ``timeout``, and would hold every later forward.
    deadline: float = 120.0

    kind = "dicomweb"

    def __str__(self) -> str:
        return self.url

    def send(self, paths: list[Path], calling: str) -> dict[Path, str | None]:
        import pydicom
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.max_redirects = 0
        sockets = deadline_adapter(session)
        client = DICOMwebClient(url=self.url, session=session, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # the outbox tries again itself, with its own back-off
        outcome: dict[Path, str | None] = {}
        for path in paths:
            dataset = pydicom.dcmread(path)
            expired = threading.Event()
            watchdog = threading.Timer(self.deadline, expire, args=(expired, sockets))
            watchdog.start()
            try:
                answer = client.store_instances(datasets=[dataset])
                if expired.is_set():  # whatever came before the cut is not an answer
                    raise requests.ConnectionError("cut at the deadline")
            except requests.TooManyRedirects:
                outcome[path] = f"{self} redirected the request (not followed)"
                continue
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code >= 500 or code in (408, 429) or code == 0:
                    raise Transient(f"{self} answered HTTP {code}") from exc
                outcome[path] = f"{self} refused it (HTTP {code})"
                continue
            except (requests.ConnectionError, requests.Timeout) as exc:
                if expired.is_set():
                    raise Transient(f"{self} did not finish answering within {self.deadline:g} s") from exc
                raise Transient(f"{self} cannot be reached or did not answer in {self.timeout:g} s") from exc
            except (ValueError, KeyError) as exc:  # a JSON content type whose body is not DICOM JSON
                outcome[path] = f"{self} answered something that is not DICOM JSON ({type(exc).__name__})"
                continue
            finally:
                watchdog.cancel()
            outcome[path] = self.verdict(answer, str(dataset.SOPInstanceUID))
        return outcome

    def verdict(self, answer, uid: str) -> str | None:
        """None when the STOW-RS answer confirms ``uid`` stored, else why not (Transient for "out of resources")."""
        reasons = [int(item.get("FailureReason", 0)) for item in answer.get("FailedSOPSequence", [])]
        if any(reason & 0xFF00 == OUT_OF_RESOURCES for reason in reasons):
            raise Transient(f"{self} is out of resources")
        if reasons:
            return f"{self} refused it (failure reason 0x{reasons[0]:04X})"
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])}
        return None if uid in stored else f"{self} did not confirm storing it (its answer lists no such instance)"


def deadline_adapter(session) -> list[socket.socket]:
    """Mount on ``session`` an adapter whose connections record their sockets in the returned
    list, so that :func:`shut` can end a request at its total deadline (requests and urllib3
    have per-read timeouts only)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    sockets: list[socket.socket] = []

    def recording(base):
        class Recording(base):
            def connect(self):
                super().connect()
                sockets.append(self.sock)
        return Recording

    class Pool(HTTPConnectionPool):
        ConnectionCls = recording(HTTPConnection)

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = recording(HTTPSConnection)

    adapter = HTTPAdapter(max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return sockets


def expire(expired: threading.Event, sockets: list[socket.socket]) -> None:
    """The watchdog's deadline: mark the send expired, then end its connections."""
    expired.set()
    shut(sockets)


def shut(sockets: list[socket.socket]) -> None:
    """End every recorded connection now: a read blocked on it returns at once."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed
