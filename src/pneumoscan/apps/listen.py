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
import json
import logging
import os
import queue
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoscan.apps.forward import (
    OUT_OF_RESOURCES,
    SUCCESS,
    Forward,
    StowForward,
    Transient,
)
from pneumoscan.apps.limits import PeerBudget, UploadPace, UploadTooSlow, read_paced

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
    #: 0: the file limit of :func:`pneumoscan.io.file_limit`, as for a file on disk
    max_instance_bytes: int = 0
    _queue: queue.Queue = field(default_factory=queue.Queue, init=False)
    _pending: set[str] = field(default_factory=set, init=False)
    _outbox_queue: queue.Queue = field(default_factory=queue.Queue, init=False)
    _forwarding: set[str] = field(default_factory=set, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _server: Any = field(default=None, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _sink: Any = field(default=None, init=False)
    #: the worker found no room to write results: C-STORE is answered 0xA700 until it does
    _full: bool = field(default=False, init=False)
    #: P-DATA bytes received per association since its last C-STORE was handled
    _arriving: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, init=False)
    #: associations cut for sending an instance past the limit: nothing more of theirs is taken
    _oversize: weakref.WeakSet = field(default_factory=weakref.WeakSet, init=False)

    def __post_init__(self) -> None:
        from pneumoscan.io import file_limit

        self.max_instance_bytes = self.max_instance_bytes or file_limit()
        self.titles, self.networks = split_allow(self.allow)
        self.out, self.spool = Path(self.out), Path(self.spool)
        self.done, self.failed, self.outbox = self.out / ".done", self.out / "failed", self.out / ".outbox"
        for folder in (self.out, self.spool, self.done, self.failed, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)

    # --- receiving -------------------------------------------------------------------------
    def receive(self, uid: str, dataset: Any, encoded: bytes, sender: str) -> int:
        """One instance from any door (C-STORE, STOW-RS): checked, spooled durably, queued; the
        status to answer."""
        from pneumoscan.io import made_by_pneumoscan

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
        if self._full:
            log.warning("refused %s from %s: no room to write results (0xA700: send it again later)", uid, sender)
            return OUT_OF_RESOURCES
        with self._lock:
            if uid in self._pending:
                return SUCCESS  # already spooled and waiting: storing it again changes nothing
            waiting = len(self._pending) + len(self._forwarding)
            if waiting >= self.queue_size:
                log.warning("queue full (%d waiting to be processed or forwarded): refused %s", waiting, uid)
                return OUT_OF_RESOURCES
            self._pending.add(uid)
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
                self._pending.discard(uid)
            log.error("could not spool %s (answered 0xA700, the sender retries): %s", uid,
                      getattr(exc, "strerror", None) or type(exc).__name__)
            return OUT_OF_RESOURCES
        self._queue.put(uid)
        log.info("received %s from %s", uid, sender)
        return SUCCESS

    def handle_store(self, event) -> int:
        """C-STORE. A deflated dataset is inflated here, bounded like a file (pynetdicom's own
        decoding would inflate a compressed-size bomb whole), and spooled in Explicit VR Little Endian."""
        from io import BytesIO

        from pneumoscan.io import DEFLATED, XrayReadError, inflated_instance

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

    # --- processing ------------------------------------------------------------------------
    def recover(self) -> int:
        """Queue what a previous run spooled and did not finish (and its forwards); remove what
        it finished."""
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
        for entry in sorted(self.outbox.glob("*.json"), key=lambda p: p.stat().st_mtime):
            self._outbox_add(entry.stem)
        if count:
            log.info("recovered %d spooled instance(s) from the last run", count)
        return count

    def _work(self) -> None:
        delay = 1.0
        while True:
            uid = self._queue.get()
            if uid is None:
                return
            again = False
            try:
                self.process(uid)
                if self._full:
                    log.info("there is room again: processing goes on, C-STORE is taken again")
                    self._full, delay = False, 1.0
            except Exception as exc:  # noqa: BLE001 - nothing escapes: one bad instance, or a full disk, never stops the worker
                try:
                    again = self._wait_for_room(exc, delay) or self._failed_try(uid, exc)
                except OSError as during:  # even counting the failed try found no room
                    again = self._wait_for_room(during, delay)
                if self._full:
                    delay = min(2 * delay, self.backoff_max_s)
            finally:
                if again:
                    self._queue.put(uid)
                else:
                    with self._lock:
                        self._pending.discard(uid)

    def _wait_for_room(self, exc: BaseException, delay: float) -> bool:
        """For a full disk (or quota, or a read-only file system): keep the instance in the spool
        (True: try it again), answer C-STORE 0xA700 meanwhile, and wait ``delay`` seconds. It is
        not a failure of the instance, so it never goes to failed/. False for any other error."""
        from pneumoscan.outputs.writer import NO_ROOM

        if not isinstance(exc, OSError) or exc.errno not in NO_ROOM:
            return False
        if not self._full:
            log.error("no room to write results (%s): instances wait in the spool, C-STORE is answered 0xA700 "
                      "until there is room", exc.strerror or type(exc).__name__)
        self._full = True
        self._stopping.wait(delay)
        return True

    def _failed_try(self, uid: str, exc: Exception) -> bool:
        """Count a failed try on disk; True to try again, else the instance is moved to failed/."""
        from pneumoscan.errors import first_line
        from pneumoscan.modelfile import atomic_write_bytes

        counter = self.spool / f"{uid}.tries"
        tries = int(counter.read_text() or 0) + 1 if counter.exists() else 1
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        if tries < self.tries:
            atomic_write_bytes(counter, str(tries).encode(), sync=False)
            log.error("failed %s (try %d of %d): %s", uid, tries, self.tries, reason)
            return True
        self._give_up(uid, f"failed {tries} times; last: {reason}")
        return False

    def _give_up(self, uid: str, reason: str, status: str = "failed") -> None:
        """Move a spooled instance to failed/ with its reason, record it, mark it done."""
        from pneumoscan.modelfile import atomic_write_bytes

        source = self.spool / f"{uid}.dcm"
        if source.exists():
            source.replace(self.failed / f"{uid}.dcm")
        atomic_write_bytes(self.failed / f"{uid}.error.txt", (reason + "\n").encode())
        self._record({"path": uid, "sop_instance_uid": uid, "status": status, "error": reason, "results": {}})
        atomic_write_bytes(self.done / uid, b"")
        (self.spool / f"{uid}.tries").unlink(missing_ok=True)
        log.error("gave up on %s: %s (moved to %s)", uid, reason[:200], self.failed.name)
        self._trim_failed()

    def _trim_failed(self) -> None:
        """Keep failed/ within ``failed_max`` instances and ``failed_max_bytes``: a sender that
        keeps sending what cannot be read must not fill the disk through it. The oldest instances
        (with their error and forward notes) go first, each logged."""
        groups: dict[str, list[Path]] = {}
        sizes: dict[str, int] = {}
        ages: dict[str, int] = {}
        for path in self.failed.iterdir():
            uid = path.name
            for suffix in (".error.txt", ".forward.txt", ".dcm"):
                uid = uid.removesuffix(suffix)
            info = path.stat()
            groups.setdefault(uid, []).append(path)
            sizes[uid] = sizes.get(uid, 0) + info.st_size
            ages[uid] = max(ages.get(uid, 0), info.st_mtime_ns)
        order = sorted(groups, key=lambda uid: (ages[uid], uid))  # oldest first
        count, total = len(order), sum(sizes.values())
        for uid in order:
            if count <= self.failed_max and total <= self.failed_max_bytes:
                break
            for path in groups[uid]:
                path.unlink(missing_ok=True)
            count, total = count - 1, total - sizes[uid]
            log.warning("removed the oldest failed instance %s from %s (it keeps at most %d instances and "
                        "%d bytes)", uid, self.failed.name, self.failed_max, self.failed_max_bytes)

    def _record(self, record: dict[str, Any]) -> None:
        """A line of predictions.jsonl: the index from source instance to results."""
        from pneumoscan.outputs.writer import Outputs, RecordSink

        if self._sink is None:
            self._sink = RecordSink(Outputs(out=self.out, overlays=False), append=True).__enter__()
        self._sink.write(record)

    def process(self, uid: str) -> list[Path]:
        """Results for one spooled instance, queued for forwarding when asked; then its
        done-mark."""
        from pneumoscan.modelfile import atomic_write_bytes
        from pneumoscan.outputs.writer import Outputs, write_files

        path = self.spool / f"{uid}.dcm"
        if not path.exists():
            return []
        result = self.predictor.predict(path, cam="top", keep_arrays=True)
        if result.error:
            self._give_up(uid, result.error.replace(str(path), uid), status="error")
            return []
        record = write_files(result, path, uid, Outputs(out=self.out, overlays=False, dicom_out=self.out),
                             self.predictor)
        if record.get("dicom_error"):  # tried again, then failed/
            raise RuntimeError(record["dicom_error"])
        written = [self.out / name for name in (record.get("dicom") or {}).values()]
        if self.store is not None:
            self._store(record, result, path, uid)
        self._record({**record, "path": uid, "sop_instance_uid": uid,
                      "results": {kind: name.rsplit("_", 1)[0] for kind, name in (record.get("dicom") or {}).items()}})
        if self.forward and written:
            entry = {target.kind: [p.name for p in written] for target in self.forward}
            atomic_write_bytes(self.outbox / f"{uid}.json", json.dumps(entry).encode())
            self._outbox_add(uid)
        # Said before the done-mark: a kill in between repeats the line on restart, never loses it.
        log.info("processed %s (%s): %d result object(s)", uid, record["status"], len(written))
        atomic_write_bytes(self.done / uid, "\n".join(p.name for p in written).encode())
        path.unlink()
        (self.spool / f"{uid}.tries").unlink(missing_ok=True)
        return written

    def _store(self, record: dict[str, Any], result: Any, path: Path, uid: str) -> None:
        """The result into the results store (the received film kept in ``keep_films``, by its
        SHA-256, when given); a store that is down is logged and said in the record, never retried:
        the DICOM results are out already."""
        import hashlib
        import shutil

        from pneumoscan.outputs.writer import write_to_store

        data = path.read_bytes()
        kept = None
        if self.keep_films is not None:
            kept = self.keep_films / f"{hashlib.sha256(data).hexdigest()}.dcm"
            try:
                if not kept.exists():
                    shutil.copyfile(path, kept)
            except OSError as exc:
                log.error("film %s not kept in %s: %s", uid, self.keep_films, exc.strerror or exc)
                kept = None
        run = self.predictor.run_identity()
        write_to_store(self.store, record, result, data, name=uid, path=kept, run=run, source="listen")
        if record.get("store_error"):
            log.error("%s: %s", uid, record["store_error"][:300])

    # --- forwarding ------------------------------------------------------------------------
    def _outbox_add(self, uid: str) -> None:
        with self._lock:
            if uid in self._forwarding:
                return
            self._forwarding.add(uid)
        self._outbox_queue.put(uid)

    def _forward_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                uid = self._outbox_queue.get(timeout=0.5)
            except queue.Empty:
                continue
            delay = 1.0
            while not self._stopping.is_set():
                try:
                    self.forward_one(uid)
                    break
                except Transient as exc:
                    log.warning("forward of %s waits %.0f s: %s", uid, delay, exc)
                    self._stopping.wait(delay)
                    delay = min(2 * delay, self.backoff_max_s)
                except Exception as exc:  # noqa: BLE001 - the outbox entry itself is broken: drop it, say so
                    log.error("forward of %s dropped: %s", uid, type(exc).__name__)
                    (self.outbox / f"{uid}.json").unlink(missing_ok=True)
                    break
            with self._lock:
                if not (self.outbox / f"{uid}.json").exists():
                    self._forwarding.discard(uid)

    def forward_one(self, uid: str) -> None:
        """Send one instance's results to every target still owed them; the outbox entry keeps
        what is left after each target, so a restart sends nothing twice that was taken."""
        from pneumoscan.modelfile import atomic_write_bytes

        entry_path = self.outbox / f"{uid}.json"
        if not entry_path.exists():
            return
        entry = json.loads(entry_path.read_text())
        for target in self.forward:
            names = entry.get(target.kind) or []
            if not names:
                continue
            outcome = target.send([self.out / n for n in names], self.ae_title)
            refused = {p.name: why for p, why in outcome.items() if why}
            for name, why in refused.items():
                log.error("forward of %s to %s: %s refused for good: %s", uid, target, name, why)
                with open(self.failed / f"{uid}.forward.txt", "a") as handle:
                    handle.write(f"{name}\t{target}\t{why}\n")
            log.info("forwarded %d result object(s) of %s to %s", len(outcome) - len(refused), uid, target)
            entry[target.kind] = []
            atomic_write_bytes(entry_path, json.dumps(entry).encode())
        entry_path.unlink()

    # --- DICOMweb in -----------------------------------------------------------------------
    def stow_app(self, max_bytes: int = 256 * 2**20, max_parts: int = 1000, concurrent: int = 4,
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
        may send (403, :meth:`peer_refusal`). Parsing runs off the event loop."""
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
            why = self.peer_refusal(peer)
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
                    outcome.append(await run_in_threadpool(self._receive_part, bytes(parts.pop(0)), sender, study))
            stored = [status == SUCCESS for status, _ in outcome]
            if not any(stored) and outcome and all(status == OUT_OF_RESOURCES for status, _ in outcome):
                return JSONResponse(stow_response(outcome), 503, headers={"Retry-After": "5"},
                                    media_type="application/dicom+json")
            return JSONResponse(stow_response(outcome), 200 if all(stored) else 202 if any(stored) else 409,
                                media_type="application/dicom+json")

        return Starlette(routes=[Route("/studies", store, methods=["POST"]),
                                 Route("/studies/{study}", store, methods=["POST"])])

    def _receive_part(self, part: bytes, sender: str, study: str | None = None) -> tuple[int, Any]:
        """One STOW-RS part through :meth:`receive`: (its status, the dataset or None); a part of
        another study than the request's path names is refused."""
        from io import BytesIO

        import pydicom

        from pneumoscan.io import MAX_PIXELS, XrayReadError, inflated

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
        return self.receive(uid, dataset, part, sender), dataset

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, block: bool = False):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for uid in CHEST_STORAGE:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.titles:
            ae.require_calling_aet = list(self.titles)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = self.max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.idle_timeout
        self.recover()
        for target, name in ((self._work, "worker"), (self._forward_loop, "forward")):
            thread = threading.Thread(target=target, name=f"pneumoscan-listen-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self.handle_rejected),
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
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        if self._sink is not None:
            self._sink.__exit__(None, None, None)


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
        entry = {"00081150": {"vr": "UI", "Value": [str(dataset.get("SOPClassUID", ""))]} if dataset else {"vr": "UI"},
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
