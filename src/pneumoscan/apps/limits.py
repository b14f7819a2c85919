"""Limits shared by the network doors that take uploads (the REST server's ``/v1/predict`` and the
listener's STOW-RS door): the pace an upload must keep (:class:`UploadPace`, read by
:func:`read_paced`) and a per-client budget (:class:`PeerBudget`), so that a sender that is cut off
for being slow cannot simply reconnect, again and again, and hold the reading places that way.
Both run on the event loop, so their counters need no lock."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field


class UploadTooSlow(Exception):
    """The client sends its body too slowly (or stopped): answered 408."""


@dataclass(frozen=True)
class UploadPace:
    """How slowly an upload may come in: nothing for ``idle_s`` seconds, an average under
    ``min_rate`` bytes/s once ``grace_s`` have passed, or more than ``deadline_s`` in all ends
    it with 408. A slow sender then holds a reading place for seconds, never a prediction place."""

    idle_s: float = 10.0
    grace_s: float = 10.0
    min_rate: float = 1024.0
    deadline_s: float = 300.0


async def read_paced(receive, most: int, pace: UploadPace) -> bytes | None:
    """An ASGI request body (or its first ``most`` + 1 bytes) read at ``pace``
    (:class:`UploadTooSlow` otherwise); None when the client disconnects."""
    chunks, size = [], 0
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        wait = min(pace.idle_s, pace.deadline_s - elapsed)
        try:
            message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
        except TimeoutError:
            raise UploadTooSlow(f"upload too slow: {size:,} bytes in {elapsed:.0f} s, then nothing for "
                                f"{wait:.0f} s (uploads must finish within {pace.deadline_s:.0f} s)") from None
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > most or not message.get("more_body"):
            return b"".join(chunks)
        elapsed = time.monotonic() - start
        if elapsed > pace.grace_s and size / elapsed < pace.min_rate:
            raise UploadTooSlow(f"upload too slow: {size:,} bytes in {elapsed:.0f} s (at least "
                                f"{pace.min_rate:,.0f} bytes/s are needed)")


@dataclass
class PeerBudget:
    """What one client address may hold: at most ``uploads`` uploads coming in at once, and after
    ``strikes`` uploads cut off as too slow within ``window_s`` seconds, nothing for ``cooloff_s``
    seconds (answered 429 with Retry-After before a byte of the body is read). Without it a slow
    sender cut off with 408 reconnects at once and holds a reading place again. ``strikes`` 0: never
    barred (behind a proxy that does not pass the client's address, every client shares one)."""

    uploads: int = 8
    strikes: int = 3
    window_s: float = 60.0
    cooloff_s: float = 60.0
    _reading: defaultdict = field(default_factory=lambda: defaultdict(int), init=False)
    _struck: defaultdict = field(default_factory=lambda: defaultdict(deque), init=False)
    _barred: dict = field(default_factory=dict, init=False)

    def refusal(self, peer: str) -> tuple[str, int] | None:
        """(why, seconds to wait) when ``peer`` may not start an upload now; None when it may."""
        now = time.monotonic()
        until = self._barred.get(peer, 0.0)
        if until > now:
            why = (f"too many slow uploads from {peer}: {self.strikes} cut off within {self.window_s:.0f} s; "
                   f"refused for {self.cooloff_s:.0f} s")
            return why, max(1, round(until - now))
        self._barred.pop(peer, None)
        if self._reading[peer] >= self.uploads:
            return f"{self.uploads} uploads from {peer} already coming in; at most {self.uploads} at once", 2
        return None

    @contextmanager
    def reading(self, peer: str):
        """Hold one of ``peer``'s upload places while its body comes in."""
        self._reading[peer] += 1
        try:
            yield
        finally:
            self._reading[peer] -= 1
            if not self._reading[peer]:
                del self._reading[peer]

    def strike(self, peer: str) -> None:
        """``peer``'s upload was cut off as too slow; the ``strikes``-th within the window bars it."""
        now = time.monotonic()
        struck = self._struck[peer]
        struck.append(now)
        while struck and struck[0] < now - self.window_s:
            struck.popleft()
        if self.strikes and len(struck) >= self.strikes:
            self._barred[peer] = now + self.cooloff_s
            del self._struck[peer]
        if len(self._struck) > 10_000:  # many addresses, each struck once long ago: forget them
            for old in [p for p, times in self._struck.items() if times[-1] < now - self.window_s]:
                del self._struck[old]
