"""Lanes: ordered queues of work, one worker each.

A lane runs its items strictly in submission order, each once the items it depends on
(possibly on other lanes) are done — the semantics of a CUDA stream synchronised by
events.  On the CPU a lane is a worker thread; on CUDA the worker thread also enters the
lane's stream, so the kernels and copies it launches queue on that stream; it records
an event after each item (dependants on other streams wait on it) and waits for it, so
an item counts as done only once the device has finished it.  ``threads`` sizes the
worker thread's OpenMP team for PyTorch's CPU kernels (:mod:`flexgraph.exec.openmp`).

State (plain data): ``queue`` (pending items), ``busy`` seconds, ``items`` done, and
``spans`` [(start, end, label)] when tracing.  ``statistics()`` is a cheap snapshot.

A :class:`Completion` is the handle of one submitted item: lanes wait on it with
``wait()`` (thread), the asyncio dispatcher with ``await`` via ``future``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from flexgraph.exec.openmp import set_thread_team


class LaneStopped(Exception):
    """The lane was stopped (error elsewhere, or Ctrl-C) before this item ran."""


class Completion:
    """Done-ness of one item, visible to threads and to an asyncio loop."""

    __slots__ = ("_event", "error", "value", "cuda_event", "future", "_loop", "start", "end")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._event = threading.Event()
        self.error: BaseException | None = None
        self.value: Any = None
        self.cuda_event = None
        self._loop = loop
        self.future = loop.create_future() if loop is not None else None
        self.start = self.end = 0.0

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait()

    def _finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self._event.set()
        if self.future is not None:
            try:
                self._loop.call_soon_threadsafe(_settle, self.future, value, error)
            except RuntimeError:      # the loop is closed: the run was abandoned (error, Ctrl-C)
                pass

    @classmethod
    def finished(cls) -> Completion:
        c = cls()
        c._event.set()
        return c


def _settle(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


@dataclass(frozen=True)
class LaneStatistics:
    name: str
    queued: int
    items: int
    busy_seconds: float


class Lane:
    """An in-order worker.  ``device`` "cuda" gives the lane its own CUDA stream."""

    def __init__(self, name: str, device: str = "cpu", trace: bool = False, threads: int | None = None):
        self.name = name
        self.device = device
        self.threads = threads
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.busy = 0.0
        self.items = 0
        self.spans: list[tuple[float, float, str]] | None = [] if trace else None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flexgraph-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], deps: list[Completion], label: str = "",
               loop: asyncio.AbstractEventLoop | None = None) -> Completion:
        done = Completion(loop)
        self._queue.put((fn, deps, label, done))
        return done

    def _run(self) -> None:
        if self.threads is not None:
            set_thread_team(self.threads)
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, deps, label, done = item
            if self._stopped.is_set():
                done._finish(error=LaneStopped(self.name))
                continue
            try:
                for d in deps:
                    d.wait()
                    if d.error is not None:
                        raise LaneStopped(f"{label} not run: a node it depends on failed")
                    if self.stream is not None and d.cuda_event is not None:
                        self.stream.wait_event(d.cuda_event)   # GPU-side ordering across streams
                start = time.perf_counter()
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        value = fn()
                        done.cuda_event = torch.cuda.Event()
                        done.cuda_event.record(self.stream)
                    # Done means done on the device: buffers released after this item
                    # can be reused safely, and busy time is the stream's real time.
                    # Other lanes keep queueing on their own streams meanwhile.
                    done.cuda_event.synchronize()
                else:
                    value = fn()
                end = time.perf_counter()
            except BaseException as e:          # reported to whoever waits on this item
                done._finish(error=e)
                continue
            self.busy += end - start
            self.items += 1
            done.start, done.end = start, end
            if self.spans is not None:
                self.spans.append((start, end, label))
            done._finish(value)

    def stop(self) -> None:
        """Fail every item not started yet, then end the thread."""
        self._stopped.set()
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def statistics(self) -> LaneStatistics:
        return LaneStatistics(self.name, self._queue.qsize(), self.items, self.busy)
