"""The cache's sense of time: whole seconds, read as a plain attribute on the hit path.

A hit compares an entry's expiry with ``clock.now`` and rewrites TTLs only when that
second changed: an attribute read, where ``time.monotonic()`` would be a call per query.
``TickingClock`` moves ``now`` forward from a timer on the event loop once a second.
Tests pass any object with a ``now`` attribute (and no-op ``start``/``stop``) and move it
themselves, so expiry, prefetch and serve_stale are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    now: int  # seconds on a monotonic scale

    def start(self) -> None: ...

    def stop(self) -> None: ...


class TickingClock:
    """``now`` is ``int(time.monotonic())``, refreshed by a timer just after each second turns."""

    def __init__(self) -> None:
        self.now = int(time.monotonic())
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._timer is None:
            self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        current = time.monotonic()
        self.now = int(current)
        # Wake just after the next whole second, so ``now`` lags the real second by little.
        delay = 1.0 - (current - self.now) + 0.001
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)
