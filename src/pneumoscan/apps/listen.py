"""A DICOM listener (pynetdicom C-STORE SCP): chest X-rays in over the network, DICOM results out.

Every received instance is first written to the spool (temporary name, fsync, rename), then
answered "success"; one worker takes spooled instances in order, runs the
:class:`~pneumoscan.predict.Predictor`, writes SR + SEG + Secondary Capture
(:mod:`pneumoscan.outputs.dicom`) to the output folder, optionally sends them on by C-STORE, writes a
done-mark named by the SOP Instance UID and only then removes the spooled file. A crash or a kill
therefore loses nothing: on the next start, spooled instances without a done-mark are processed,
those with one are removed. The results' UIDs are derived from the source, so even an instance
processed twice (killed between its results and its done-mark) yields the same objects once
stored. When more than ``queue`` instances are waiting, new ones are answered 0xA700 "Out of
resources" and not taken. Only CR, DX (for presentation and for processing) and Secondary
Capture storage are accepted (other SOP classes are rejected in the association), plus C-ECHO.
Logs carry UIDs, never patient names or IDs.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("pneumoscan.apps.listen")

CHEST_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass
class Forward:
    """Where results are sent on: ``HOST:PORT:AET``."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Forward:
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            raise ValueError(f"--forward {text!r}: expected HOST:PORT:AET")
        return cls(parts[0], int(parts[1]), parts[2])


@dataclass
class Listener:
    """The SCP and its worker. ``start()`` returns the running server; ``stop()`` ends both."""

    predictor: Any
    out: Path
    spool: Path
    ae_title: str = "PNEUMOSCAN"
    port: int = 11112
    host: str = "0.0.0.0"
    forward: Forward | None = None
    allow: tuple[str, ...] = ()
    queue_size: int = 64
    _queue: queue.Queue = field(default_factory=queue.Queue, init=False)
    _pending: set[str] = field(default_factory=set, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _server: Any = field(default=None, init=False)
    _worker: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.out, self.spool = Path(self.out), Path(self.spool)
        self.done = self.out / ".done"
        for folder in (self.out, self.spool, self.done):
            folder.mkdir(parents=True, exist_ok=True)

    # --- receiving -------------------------------------------------------------------------
    def handle_store(self, event) -> int:
        """C-STORE: spool durably, then answer; "out of resources" when the queue is full."""
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            if uid in self._pending:
                return SUCCESS  # already spooled and waiting: storing it again changes nothing
            if len(self._pending) >= self.queue_size:
                log.warning("queue full (%d waiting): refused %s", len(self._pending), uid)
                return OUT_OF_RESOURCES
            self._pending.add(uid)
        try:
            self._spool(uid, event)
        except Exception as exc:  # a full disk, an unencodable dataset: the sender must retry
            with self._lock:
                self._pending.discard(uid)
            log.error("could not spool %s: %s", uid, type(exc).__name__)
            return OUT_OF_RESOURCES if isinstance(exc, OSError) else CANNOT_UNDERSTAND
        self._queue.put(uid)
        log.info("received %s from %s", uid, event.assoc.requestor.ae_title)
        return SUCCESS

    def _spool(self, uid: str, event) -> None:
        from pneumoscan.modelfile import atomic_write_bytes

        if (self.done / uid).exists():
            return  # done before (the sender retried): nothing to do
        atomic_write_bytes(self.spool / f"{uid}.dcm", event.encoded_dataset())  # .tmp, fsync, rename

    # --- processing ------------------------------------------------------------------------
    def recover(self) -> int:
        """Queue what a previous run spooled and did not finish; remove what it finished."""
        for part in self.spool.glob("*.dcm.tmp"):
            part.unlink()  # never answered "success": the sender still has it
        count = 0
        for path in sorted(self.spool.glob("*.dcm"), key=lambda p: p.stat().st_mtime):
            uid = path.name[: -len(".dcm")]
            if (self.done / uid).exists():
                path.unlink()
                continue
            with self._lock:
                self._pending.add(uid)
            self._queue.put(uid)
            count += 1
        if count:
            log.info("recovered %d spooled instance(s) from the last run", count)
        return count

    def _work(self) -> None:
        while True:
            uid = self._queue.get()
            if uid is None:
                return
            try:
                self.process(uid)
            except Exception as exc:  # one bad instance never stops the listener
                log.error("failed %s: %s", uid, type(exc).__name__)
            finally:
                with self._lock:
                    self._pending.discard(uid)

    def process(self, uid: str) -> list[Path]:
        """Results for one spooled instance, forwarded when asked; then its done-mark."""
        from pneumoscan.modelfile import atomic_write_bytes
        from pneumoscan.outputs.writer import Outputs, write_files

        path = self.spool / f"{uid}.dcm"
        if not path.exists():
            return []
        result = self.predictor.predict(path, cam="top", keep_arrays=True)
        written: list[Path] = []
        if result.error:
            log.warning("unreadable %s: %s", uid, result.error[:200])
        else:
            record = write_files(result, path, uid, Outputs(out=self.out, overlays=False, dicom_out=self.out),
                                 self.predictor)
            if record.get("dicom_error"):  # stays spooled: retried at the next start
                raise RuntimeError(record["dicom_error"])
            written = [self.out / name for name in (record.get("dicom") or {}).values()]
            if self.forward is not None:
                self.send(written)
        verdict = "refused by the input gate" if result.quality and not result.quality.get("frontal_chest") else "scored"
        atomic_write_bytes(self.done / uid, "\n".join(p.name for p in written).encode())
        path.unlink()
        log.info("processed %s (%s): %d result object(s)", uid, verdict if not result.error else "error", len(written))
        return written

    def send(self, paths: list[Path]) -> None:
        """C-STORE the results to the forward AE; raises when it does not take them all."""
        import pydicom
        from pynetdicom import AE

        datasets = [pydicom.dcmread(p) for p in paths]
        ae = AE(ae_title=self.ae_title)
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(self.forward.host, self.forward.port, ae_title=self.forward.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"forward: no association with {self.forward.ae_title}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or status.Status != SUCCESS:
                    raise ConnectionError(f"forward: {ds.SOPInstanceUID} not stored")
        finally:
            assoc.release()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, block: bool = False):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for uid in CHEST_STORAGE:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        ae.maximum_pdu_size = 0
        self.recover()
        self._worker = threading.Thread(target=self._work, name="pneumoscan-listen-worker", daemon=True)
        self._worker.start()
        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        log.info("listening as %s on %s:%d", self.ae_title, self.host, self.port)
        self._server = ae.start_server((self.host, self.port), block=block, evt_handlers=handlers)
        return self._server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=60)
