"""The listener's worker: spooled instances in order through the
:class:`~pneumoscan.predict.Predictor`, their results written (SR, SEG, Secondary Capture, a line of
``predictions.jsonl``, the results store), owed to the forward targets, then a done-mark, and only
then the spooled file removed; so a crash or a kill loses nothing. A full disk keeps instances in the
spool (C-STORE is answered 0xA700 meanwhile); an instance that fails ``tries`` times (counted on disk)
goes to ``failed/``, which keeps at most ``failed_max`` instances and ``failed_max_bytes``."""

from __future__ import annotations

import logging
import queue as queues
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoscan.apps.outbox import Outbox

log = logging.getLogger("pneumoscan.apps.listen")


@dataclass
class Worker:
    """One worker over the spool. ``pending`` (spooled, not yet done) and ``queue`` are shared with
    the listener's receiving side, under ``lock``; ``full`` says there is no room to write results."""

    predictor: Any
    out: Path
    spool: Path
    forwarder: Outbox
    lock: threading.Lock
    stopping: threading.Event
    store: Any
    keep_films: Path | None
    tries: int
    backoff_max_s: float
    failed_max: int
    failed_max_bytes: int
    queue: queues.Queue = field(default_factory=queues.Queue, init=False)
    pending: set[str] = field(default_factory=set, init=False)
    #: no room to write results: C-STORE is answered 0xA700 until there is
    full: bool = field(default=False, init=False)
    _sink: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.done, self.failed = self.out / ".done", self.out / "failed"

    def close(self) -> None:
        if self._sink is not None:
            self._sink.__exit__(None, None, None)

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
            with self.lock:
                self.pending.add(uid)
            self.queue.put(uid)
            count += 1
        if count:
            log.info("recovered %d spooled instance(s) from the last run", count)
        return count

    def run(self) -> None:
        delay = 1.0
        while True:
            uid = self.queue.get()
            if uid is None:
                return
            again = False
            try:
                self.process(uid)
                if self.full:
                    log.info("there is room again: processing goes on, C-STORE is taken again")
                    self.full, delay = False, 1.0
            except Exception as exc:  # noqa: BLE001 - nothing escapes: one bad instance, or a full disk, never stops the worker
                try:
                    again = self._wait_for_room(exc, delay) or self._failed_try(uid, exc)
                except OSError as during:  # even counting the failed try found no room
                    again = self._wait_for_room(during, delay)
                if self.full:
                    delay = min(2 * delay, self.backoff_max_s)
            finally:
                if again:
                    self.queue.put(uid)
                else:
                    with self.lock:
                        self.pending.discard(uid)

    def _wait_for_room(self, exc: BaseException, delay: float) -> bool:
        """For a full disk (or quota, or a read-only file system): keep the instance in the spool
        (True: try it again), answer C-STORE 0xA700 meanwhile, and wait ``delay`` seconds. It is
        not a failure of the instance, so it never goes to failed/. False for any other error."""
        from pneumoscan.outputs.writer import NO_ROOM

        if not isinstance(exc, OSError) or exc.errno not in NO_ROOM:
            return False
        if not self.full:
            log.error("no room to write results (%s): instances wait in the spool, C-STORE is answered 0xA700 "
                      "until there is room", exc.strerror or type(exc).__name__)
        self.full = True
        self.stopping.wait(delay)
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
        self.give_up(uid, f"failed {tries} times; last: {reason}")
        return False

    def give_up(self, uid: str, reason: str, status: str = "failed") -> None:
        """Move a spooled instance to failed/ with its reason, record it, mark it done."""
        from pneumoscan.modelfile import atomic_write_bytes

        source = self.spool / f"{uid}.dcm"
        if source.exists():
            source.replace(self.failed / f"{uid}.dcm")
        atomic_write_bytes(self.failed / f"{uid}.error.txt", (reason + "\n").encode())
        self.record({"path": uid, "sop_instance_uid": uid, "status": status, "error": reason, "results": {}})
        atomic_write_bytes(self.done / uid, b"")
        (self.spool / f"{uid}.tries").unlink(missing_ok=True)
        log.error("gave up on %s: %s (moved to %s)", uid, reason[:200], self.failed.name)
        self.trim_failed()

    def trim_failed(self) -> None:
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

    def record(self, record: dict[str, Any]) -> None:
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
            self.give_up(uid, result.error.replace(str(path), uid), status="error")
            return []
        record = write_files(result, path, uid, Outputs(out=self.out, overlays=False, dicom_out=self.out),
                             self.predictor)
        if record.get("dicom_error"):  # tried again, then failed/
            raise RuntimeError(record["dicom_error"])
        written = [self.out / name for name in (record.get("dicom") or {}).values()]
        if self.store is not None:
            self._store(record, result, path, uid)
        self.record({**record, "path": uid, "sop_instance_uid": uid,
                      "results": {kind: name.rsplit("_", 1)[0] for kind, name in (record.get("dicom") or {}).items()}})
        if self.forwarder.targets and written:
            self.forwarder.owe(uid, written)
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
        from pneumoscan.outputs.writer import keep_film, write_to_store

        data = path.read_bytes()
        kept = None
        if self.keep_films is not None:
            try:
                kept = keep_film(self.keep_films, data, ".dcm")
            except OSError as exc:
                log.error("film %s not kept in %s: %s", uid, self.keep_films, exc.strerror or exc)
        run = self.predictor.run_identity()
        write_to_store(self.store, record, result, data, name=uid, path=kept, run=run, source="listen")
        if record.get("store_error"):
            log.error("%s: %s", uid, record["store_error"][:300])
