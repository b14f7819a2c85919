"""The listener's outbox: results owed to the forward targets (``--forward`` by C-STORE,
``--forward-dicomweb`` by STOW-RS), kept on disk until each target has taken them.

An entry per instance, ``OUT/.outbox/UID.json``, names the result files each target is still owed;
one loop sends them, rewriting the entry after each target, so that a restart sends nothing twice
that was taken. A target that is down (:class:`~pneumoscan.apps.forward.Transient`) is retried with
backoff while the listener runs; an object a target refuses for good is listed in
``failed/UID.forward.txt`` and never retried. Entries count against the listener's queue.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoscan.apps.forward import Transient

log = logging.getLogger("pneumoscan.apps.listen")


@dataclass
class Outbox:
    """Results owed to ``targets``, on disk in ``folder``; ``lock`` and ``stopping`` are the
    listener's (the queue counts :attr:`owed` under that lock)."""

    folder: Path
    out: Path
    failed: Path
    targets: tuple[Any, ...]
    ae_title: str
    lock: threading.Lock
    stopping: threading.Event
    backoff_max_s: float = 60.0
    #: instances with an entry not yet sent to every target
    owed: set[str] = field(default_factory=set, init=False)
    _queue: queue.Queue = field(default_factory=queue.Queue, init=False)

    def owe(self, uid: str, written: list[Path]) -> None:
        """Write the entry for ``written`` (every target owed all of them) and queue it."""
        from pneumoscan.modelfile import atomic_write_bytes

        entry = {target.kind: [p.name for p in written] for target in self.targets}
        atomic_write_bytes(self.folder / f"{uid}.json", json.dumps(entry).encode())
        self.add(uid)

    def add(self, uid: str) -> None:
        with self.lock:
            if uid in self.owed:
                return
            self.owed.add(uid)
        self._queue.put(uid)

    def recover(self) -> None:
        """Queue the entries a previous run left, oldest first."""
        for entry in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
            self.add(entry.stem)

    def loop(self) -> None:
        """Send queued entries until the listener stops: a target that is down is tried again with
        backoff; an entry that cannot be read is dropped, and said."""
        while not self.stopping.is_set():
            try:
                uid = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            delay = 1.0
            while not self.stopping.is_set():
                try:
                    self.send(uid)
                    break
                except Transient as exc:
                    log.warning("forward of %s waits %.0f s: %s", uid, delay, exc)
                    self.stopping.wait(delay)
                    delay = min(2 * delay, self.backoff_max_s)
                except Exception as exc:  # noqa: BLE001 - the outbox entry itself is broken: drop it, say so
                    log.error("forward of %s dropped: %s", uid, type(exc).__name__)
                    (self.folder / f"{uid}.json").unlink(missing_ok=True)
                    break
            with self.lock:
                if not (self.folder / f"{uid}.json").exists():
                    self.owed.discard(uid)

    def send(self, uid: str) -> None:
        """Send one instance's results to every target still owed them; the entry keeps what is
        left after each target, so a restart sends nothing twice that was taken."""
        from pneumoscan.modelfile import atomic_write_bytes

        entry_path = self.folder / f"{uid}.json"
        if not entry_path.exists():
            return
        entry = json.loads(entry_path.read_text())
        for target in self.targets:
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
