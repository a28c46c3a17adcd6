"""A worker's budget of bytes that concurrent image decodes may hold at once (decode_memory_bytes)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from sidecar.errors import Overloaded


class MemoryBudget:
    """Request threads reserve a decode's estimated peak before decoding and give it back after.

    A pixel limit alone does not bound a worker: 32 threads each decoding a 40-megapixel PNG hold
    tens of GB. A reservation waits for room until its timeout, then answers Overloaded (503 with
    Retry-After): the worker is busy, the request itself is fine.
    """

    def __init__(self, capacity: int, *, setting: str = "decode_memory_bytes"):
        if capacity < 1:
            raise ValueError(f"{setting} must be >= 1, got {capacity}")
        self.capacity = capacity
        self.setting = setting
        self._held = 0
        self._room = threading.Condition()

    @property
    def held(self) -> int:
        return self._held

    @contextmanager
    def reserve(self, nbytes: int, *, timeout_s: float) -> Iterator[None]:
        """Hold `nbytes` for the duration of the block; callers refuse anything over `capacity` first."""
        if not 0 <= nbytes <= self.capacity:
            raise ValueError(f"cannot reserve {nbytes} bytes of a budget of {self.capacity} ({self.setting})")
        deadline = time.monotonic() + timeout_s
        with self._room:
            while self._held + nbytes > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(f"image decoding is at its memory budget ({self.setting}={self.capacity}): "
                                     f"{self._held} bytes in use, {nbytes} more waited for {timeout_s:g} s; "
                                     "retry shortly", retry_after_s=1.0)
                self._room.wait(remaining)
            self._held += nbytes
        try:
            yield
        finally:
            with self._room:
                self._held -= nbytes
                self._room.notify_all()
