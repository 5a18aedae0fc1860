"""The memory manager: grants and returns bytes per tier, never beyond a tier's limit.

State (plain dicts): ``used[tier]``, ``peak[tier]``, ``limit[tier]``, and a FIFO of
waiters.  The executor asks for a node's allocations in path order (``acquire``) and
returns them when the buffers die (``release``).  A request waits while it does not
fit; requests are granted strictly in arrival order, so a big request is not starved by
small ones behind it — and, because the path was checked with the same accounting, the
head of the queue always fits once enough earlier nodes have finished.

``statistics()`` is a cheap snapshot (trio style) that tests assert on.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

from flexgraph.plan.policy import TIERS


@dataclass(frozen=True)
class MemoryStatistics:
    used: dict[str, int]
    peak: dict[str, int]
    limit: dict[str, int | None]
    waiting: int
    grants: int


class MemoryManager:
    def __init__(self, limit: dict[str, int | None]):
        self.limit = {t: limit.get(t) for t in TIERS}
        self.used = dict.fromkeys(TIERS, 0)
        self.peak = dict.fromkeys(TIERS, 0)
        self.grants = 0
        self._waiters: deque[tuple[dict[str, int], asyncio.Future]] = deque()
        self._lock = threading.Lock()      # release() may come from lane threads

    def _fits(self, request: dict[str, int]) -> bool:
        for tier, nbytes in request.items():
            if not nbytes:
                continue
            cap = self.limit[tier]
            if cap is None or self.used[tier] + nbytes > cap:
                return False
        return True

    def _grant(self, request: dict[str, int]) -> None:
        for tier, nbytes in request.items():
            self.used[tier] += nbytes
            if self.used[tier] > self.peak[tier]:
                self.peak[tier] = self.used[tier]
        self.grants += 1

    def check_possible(self, request: dict[str, int]) -> None:
        """A request larger than a tier's whole limit can never be granted."""
        for tier, nbytes in request.items():
            cap = self.limit[tier]
            if nbytes and (cap is None or nbytes > cap):
                raise MemoryError(f"request of {nbytes} bytes on {tier} exceeds its limit {cap}")

    async def acquire(self, request: dict[str, int]) -> None:
        """Wait until ``request`` (bytes per tier) fits, then take it."""
        self.check_possible(request)
        with self._lock:
            if not self._waiters and self._fits(request):
                self._grant(request)
                return
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((request, fut))
        await fut

    def try_acquire(self, request: dict[str, int]) -> bool:
        with self._lock:
            if not self._waiters and self._fits(request):
                self._grant(request)
                return True
            return False

    def acquire_now(self, request: dict[str, int]) -> None:
        """Take ``request`` without waiting (static homes, set up before the run)."""
        self.check_possible(request)
        with self._lock:
            if not self._fits(request):
                raise MemoryError(f"cannot place {request}: in use {self.used}, limits {self.limit}")
            self._grant(request)

    def release(self, request: dict[str, int]) -> None:
        """Return bytes (thread-safe); wakes waiters that now fit, in order."""
        wake = []
        with self._lock:
            for tier, nbytes in request.items():
                self.used[tier] -= nbytes
                assert self.used[tier] >= 0, f"released more {tier} memory than was granted"
            while self._waiters and self._fits(self._waiters[0][0]):
                req, fut = self._waiters.popleft()
                self._grant(req)
                wake.append(fut)
        for fut in wake:
            try:
                fut.get_loop().call_soon_threadsafe(_resolve, fut)
            except RuntimeError:      # the loop is closed: the run was abandoned
                pass

    def statistics(self) -> MemoryStatistics:
        with self._lock:
            return MemoryStatistics(dict(self.used), dict(self.peak), dict(self.limit), len(self._waiters),
                                    self.grants)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
