"""A DICOM listener (pynetdicom C-STORE SCP, and DICOMweb STOW-RS): chest X-rays in over the
network, DICOM results out.

Receiving. An instance is checked before anything is written: its SOP Instance UID must be a
valid UID (digits and dots, at most 64 characters, no empty component; the only wire data a file
name is ever made from), the dataset must carry the same UID, and it must not be one of
PneumoScan's own results (its manufacturer or descriptions: results routed back never loop).
Refusals are answered 0xC000 with a log line. It is then written to the spool (temporary name,
fsync, rename, fsync of the folder) and only then answered "success". When ``queue`` instances
are waiting (to be processed, or to be forwarded), new ones are answered 0xA700 "Out of
resources" and not taken. Only CR, DX (for presentation and for processing) and Secondary Capture
storage are accepted (other SOP classes are rejected in the association), plus C-ECHO.

Processing. One worker takes spooled instances in order, runs the
:class:`~pneumoscan.predict.Predictor`, writes SR + SEG + Secondary Capture through the result
writer (:mod:`pneumoscan.outputs.writer`), appends a line to ``predictions.jsonl`` (source
instance → result UIDs, findings, status), writes a done-mark named by the SOP Instance UID and
only then removes the spooled file. A crash or a kill therefore loses nothing: on the next start,
spooled instances without a done-mark are processed, those with one are removed. An instance that
cannot be read goes to ``failed/`` at once with its error; one whose processing fails is tried
``tries`` times (counted on disk, across restarts), then goes to ``failed/``: never a loop.

Forwarding. Results to send on (``--forward`` by C-STORE, ``--forward-dicomweb`` by STOW-RS)
wait in an outbox on disk and count against the queue; a target that is down is retried with
backoff while the listener runs (and after a restart); an object the target refuses for good
(its SOP class not taken, a failure status other than "out of resources", an HTTP 4xx) is a
permanent failure of that object, logged and listed in ``failed/``, never retried.

Who may send. ``allow`` holds calling AE titles and IP addresses or networks (``10.1.2.0/24``). An
address list binds both doors (an association from elsewhere is rejected, a STOW-RS request gets
403); AE titles bind the DICOM door, and since HTTP carries no AE title, a listener restricted by
AE titles alone takes STOW-RS requests from this machine only.

Logs carry UIDs and AE titles, never patient names or IDs. No TLS: keep it behind the hospital's
DICOM router or a VPN.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoscan.apps.forward import OUT_OF_RESOURCES, SUCCESS, Forward, StowForward
from pneumoscan.apps.outbox import Outbox
from pneumoscan.apps.worker import Worker

log = logging.getLogger("pneumoscan.apps.listen")

CHEST_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
CANNOT_UNDERSTAND = 0xC000
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def valid_uid(text: str) -> bool:
    """A DICOM UID (PS3.5 9.1): digits in dot-separated components, none empty, ≤ 64 characters."""
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def split_allow(allow: tuple[str, ...]) -> tuple[tuple[str, ...], tuple]:
    """``--allow`` entries → (calling AE titles, IP networks): an entry that parses as an address
    or a network is one."""
    titles, networks = [], []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            titles.append(entry)
    return tuple(titles), tuple(networks)


def printable(text: Any, limit: int = 16) -> str:
    """Wire text fit for a log line (an AE title): printable ASCII only, shortened."""
    return re.sub(r"[^ -~]", "?", str(text)).strip()[:limit] or "?"


class OneLineFormatter(logging.Formatter):
    """One record, one line: control characters a sender put in a value (a UID with a newline,
    quoted by pynetdicom's own warnings) are escaped, so no sender can forge a log line."""

    def format(self, record: logging.LogRecord) -> str:
        return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", super().format(record))


def harden_process() -> None:
    """What a process that takes films from the network sets once, before the first arrives: log
    lines through :class:`OneLineFormatter` (the libraries' chatter at warnings only), and
    pydicom's reading validation off, whose warnings quote wire values (a patient's name, or a
    forged log line); the listener checks every value it uses itself. Process-wide, so the
    listener's own process only (:meth:`Listener.serve_forever`), never a host that embeds it."""
    import pydicom

    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for noisy in ("pynetdicom", "highdicom", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def spool_and_sync(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename, then fsync of the folder: the rename itself survives a
    power cut before "success" is answered."""
    from pneumoscan.modelfile import atomic_write_bytes

    atomic_write_bytes(path, data)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@dataclass
class Listener:
    """The SCP, its worker and its forwarder. ``start()`` returns the running server; ``stop()``
    ends them."""

    predictor: Any
    out: Path
    spool: Path
    ae_title: str = "PNEUMOSCAN"
    port: int = 11112
    host: str = "127.0.0.1"
    forward: tuple[Forward | StowForward, ...] = ()
    #: calling AE titles and IP addresses/networks allowed to send (module docstring); empty: any
    allow: tuple[str, ...] = ()
    queue_size: int = 64
    tries: int = 3
    backoff_max_s: float = 60.0
    store: Any = None
    keep_films: Path | None = None
    #: an association silent this long is closed (pynetdicom's network/ACSE/DIMSE timeouts), so a
    #: few idle or stalled peers cannot hold every slot for minutes
    idle_timeout: float = 20.0
    max_associations: int = 10
    #: failed/ keeps at most this many instances and bytes; the oldest are removed (and logged)
    failed_max: int = 1000
    failed_max_bytes: int = 1 << 30
    #: an instance larger than this (bytes on the wire) ends its association while it arrives;
    #: 0: the file limit of :func:`pneumoscan.films.file_limit`, as for a file on disk
    max_instance_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _server: Any = field(default=None, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    #: P-DATA bytes received per association since its last C-STORE was handled
    _arriving: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, init=False)
    #: associations cut for sending an instance past the limit: nothing more of theirs is taken
    _oversize: weakref.WeakSet = field(default_factory=weakref.WeakSet, init=False)

    def __post_init__(self) -> None:
        from pneumoscan.films import file_limit

        self.max_instance_bytes = self.max_instance_bytes or file_limit()
        self.titles, self.networks = split_allow(self.allow)
        self.out, self.spool = Path(self.out), Path(self.spool)
        self.done, self.failed, self.outbox = self.out / ".done", self.out / "failed", self.out / ".outbox"
        for folder in (self.out, self.spool, self.done, self.failed, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        self.forwarder = Outbox(self.outbox, self.out, self.failed, self.forward, self.ae_title, self._lock,
                                self._stopping, self.backoff_max_s)
        self.worker = Worker(self.predictor, self.out, self.spool, self.forwarder, self._lock, self._stopping,
                             store=self.store, keep_films=self.keep_films, tries=self.tries,
                             backoff_max_s=self.backoff_max_s, failed_max=self.failed_max,
                             failed_max_bytes=self.failed_max_bytes)

    # --- receiving -------------------------------------------------------------------------
    def receive(self, uid: str, dataset: Any, encoded: bytes, sender: str) -> int:
        """One instance from any door (C-STORE, STOW-RS): checked, spooled durably, queued; the
        status to answer."""
        from pneumoscan.films.dicom import made_by_pneumoscan

        sender = printable(sender)
        if not valid_uid(uid):
            log.warning("refused an instance from %s: its SOP Instance UID is not a valid UID", sender)
            return CANNOT_UNDERSTAND
        if str(dataset.get("SOPInstanceUID", "")) != uid:
            log.warning("refused %s from %s: the dataset carries another SOP Instance UID", uid, sender)
            return CANNOT_UNDERSTAND
        if made_by_pneumoscan(dataset):
            log.info("refused %s from %s: one of PneumoScan's own results (loop guard)", uid, sender)
            return CANNOT_UNDERSTAND
        worker = self.worker
        if worker.full:
            log.warning("refused %s from %s: no room to write results (0xA700: send it again later)", uid, sender)
            return OUT_OF_RESOURCES
        with self._lock:
            if uid in worker.pending:
                return SUCCESS  # already spooled and waiting: storing it again changes nothing
            waiting = len(worker.pending) + len(self.forwarder.owed)
            if waiting >= self.queue_size:
                log.warning("queue full (%d waiting to be processed or forwarded): refused %s", waiting, uid)
                return OUT_OF_RESOURCES
            worker.pending.add(uid)
        try:
            if (self.failed / f"{uid}.error.txt").exists():  # sent again after it failed: try it afresh
                (self.done / uid).unlink(missing_ok=True)
                (self.failed / f"{uid}.error.txt").unlink()
                (self.failed / f"{uid}.dcm").unlink(missing_ok=True)
                log.info("%s from %s failed before; processing it again", uid, sender)
            if not (self.done / uid).exists():  # done before (the sender retried): nothing to do
                spool_and_sync(self.spool / f"{uid}.dcm", encoded)
        except Exception as exc:  # noqa: BLE001 - a full disk: the sender must retry
            with self._lock:
                worker.pending.discard(uid)
            log.error("could not spool %s (answered 0xA700, the sender retries): %s", uid,
                      getattr(exc, "strerror", None) or type(exc).__name__)
            return OUT_OF_RESOURCES
        worker.queue.put(uid)
        log.info("received %s from %s", uid, sender)
        return SUCCESS

    def handle_store(self, event) -> int:
        """C-STORE. A deflated dataset is inflated here, bounded like a file (pynetdicom's own
        decoding would inflate a compressed-size bomb whole), and spooled in Explicit VR Little Endian."""
        from io import BytesIO

        from pneumoscan.films import XrayReadError
        from pneumoscan.films.dicom import DEFLATED, inflated_instance

        self._arriving.pop(event.assoc, None)
        uid = str(event.request.AffectedSOPInstanceUID)
        if event.assoc in self._oversize:  # pynetdicom may still hand over what it had read
            log.warning("refused %s from %s: the rest of an instance past the instance limit (never spooled)",
                        printable(uid, 64), printable(event.assoc.requestor.ae_title))
            return CANNOT_UNDERSTAND
        try:
            if str(event.context.transfer_syntax) == DEFLATED:
                import pydicom

                encoded = inflated_instance(event.request.DataSet.getvalue(), str(event.request.AffectedSOPClassUID), uid)
                dataset = pydicom.dcmread(BytesIO(encoded))
            else:
                dataset, encoded = event.dataset, event.encoded_dataset()
        except XrayReadError as exc:
            log.warning("refused an instance from %s: %s", printable(event.assoc.requestor.ae_title),
                        str(exc).replace(uid, "it")[:200])
            return CANNOT_UNDERSTAND
        except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot decode
            log.warning("refused an instance from %s: undecodable (%s)", printable(event.assoc.requestor.ae_title),
                        type(exc).__name__)
            return CANNOT_UNDERSTAND
        return self.receive(uid, dataset, encoded, event.assoc.requestor.ae_title)

    def handle_data(self, event) -> None:
        """P-DATA as it arrives: the bytes of the instance being sent are counted per association,
        and past ``max_instance_bytes`` the association is aborted, before pynetdicom has held the
        whole instance in memory (no C-STORE answer can be given in the middle of a message)."""
        limit = self.max_instance_bytes
        arriving = self._arriving.get(event.assoc, 0) + len(event.data)
        self._arriving[event.assoc] = arriving
        if arriving > limit >= arriving - len(event.data):  # said and done once
            log.warning("aborted the association from %s at %s: an instance of more than %d bytes was being "
                        "sent (the instance limit)", printable(event.assoc.requestor.ae_title),
                        event.assoc.requestor.address, limit)
            self._oversize.add(event.assoc)
            cut_off(event.assoc)
            # not from this thread: it is the association's own, which abort() waits for
            threading.Thread(target=event.assoc.abort, daemon=True).start()

    def peer_refusal(self, address: str) -> str | None:
        """Why a peer at ``address`` may not send (None: it may), by ``allow``."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"unknown address {printable(address, 64)!r}" if self.allow else None
        ip = getattr(ip, "ipv4_mapped", None) or ip  # an IPv4 peer of a dual-stack socket (::ffff:10.1.2.3)
        if self.networks:
            return None if any(ip in net for net in self.networks) else f"{ip} is not in the --allow addresses"
        if self.titles and not ip.is_loopback:
            return ("this listener admits senders by AE title (--allow), which HTTP does not carry; "
                    "add the sender's address or network to --allow")
        return None

    def handle_requested(self, event) -> None:
        """An association request from an address ``allow`` does not list is rejected (permanent,
        no reason given) before anything is negotiated."""
        address = event.assoc.requestor.address
        if self.networks and self.peer_refusal(address):
            log.warning("refused an association from %s at %s (address not in --allow)",
                        printable(event.assoc.requestor.ae_title), printable(address, 64))
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            event.assoc.kill()

    @staticmethod
    def handle_rejected(event) -> None:
        ae = event.assoc.ae
        open_now = sum(1 for a in ae.active_associations if a.is_acceptor and a is not event.assoc)
        why = (f"{open_now} associations already open, the most allowed; idle ones close after "
               f"{ae.network_timeout:g} s" if open_now >= ae.maximum_associations
               else "calling AE title not allowed, or nothing it proposed is taken")
        log.warning("refused an association from %s at %s (%s)", printable(event.assoc.requestor.ae_title),
                    event.assoc.requestor.address, why)

    # --- DICOMweb in -----------------------------------------------------------------------
    def stow_app(self, **limits: Any):
        """The STOW-RS door (:func:`pneumoscan.apps.stow.stow_app`) onto :meth:`receive`."""
        from pneumoscan.apps.stow import stow_app

        return stow_app(self, **limits)

    # --- lifecycle -------------------------------------------------------------------------
    def serve_forever(self, stow_port: int | None = None) -> None:
        """The listener as a process of its own (``pneumoscan listen``): the process made safe for
        wire values (:func:`harden_process`), the STOW-RS door on ``stow_port`` when given, then
        the DICOM port, until stopped."""
        from pneumoscan.apps.stow import serve_stow

        harden_process()
        if stow_port is not None:
            serve_stow(self, stow_port)
        self.start(block=True)

    def start(self, block: bool = False):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.events import EventHandlerType

        # pynetdicom makes its SOP class names when imported; no stub can list them
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for uid in CHEST_STORAGE:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.titles:
            ae.require_calling_aet = list(self.titles)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = self.max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.idle_timeout
        self.worker.recover()
        self.forwarder.recover()
        for target, name in ((self.worker.run, "worker"), (self.forwarder.loop, "forward")):
            thread = threading.Thread(target=target, name=f"pneumoscan-listen-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_DATA_RECV, self.handle_data), (evt.EVT_REQUESTED, self.handle_requested)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        log.info("ready: listening as %s on %s:%d", self.ae_title, self.host, self.port)
        while block and not self._stopping.wait(1.0):
            pass
        return self._server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self._stopping.set()
        self.worker.queue.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        self.worker.close()


#: The largest P-DATA PDU this listener accepts (advertised at association): a sender splits an
#: instance into PDUs of at most this size, so the instance limit is checked every MiB as it arrives
#: instead of after one unbounded PDU (pynetdicom reads a whole PDU before any event).
MAX_PDU_BYTES = 1 << 20


def cut_off(assoc) -> None:
    """Stop reading from an association's socket now: the read blocked on it returns, and no
    more of the instance is buffered while the abort goes through."""
    import socket

    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already closed
