"""A pool of page-aligned CPU buffers that the executor's working copies are cut from.

Every load node wants a fresh buffer — a layer's weights read from disk, a cache prefix,
a hidden state — and frees it a few nodes later.  Left to glibc, those 1-32 MiB blocks
churn: freeing an mmapped block raises malloc's mmap threshold, later blocks come from
heap arenas (one per thread that allocates: disk workers, lanes) and the arenas keep
what is freed, fragmented.  OPT-1.3B under a 3 GiB cap (64 prompts, 8 x 8, cache on
disk) was OOM-killed that way: its resident memory grew steadily through the prefill
from 1.7 to 2.9 GB while the buffers it had live stayed at 1.6.  Fixing malloc's
threshold (``MALLOC_MMAP_THRESHOLD_``) stopped the growth but made every buffer a fresh
mapping, faulted in page by page, and compute 40% slower.

So working buffers are kept and handed out again, and the threshold is fixed too
(:mod:`flexgraph.malloc_threshold`: the layer maths' intermediates churn as well; the
pool alone still grew to 2.9 GB).  Together: resident memory flat, compute 14% slower
than with glibc's own threshold instead of 40%.  The pool needs no release call: a
buffer is idle when nothing but the pool references its storage (its use count), so
a view that escapes into a longer-lived value keeps its buffer busy instead of being
overwritten.  Sizes are rounded up to a class (at most 1/32 over; a cache prefix that
grows by a token each step stays in one class for many steps).  Each request frees the
idle buffers of classes no longer asked for (none in the last ``STALE`` requests, or
twice as many as the pool holds buffers): a run asks for the shapes it uses every few
requests, so what goes is the cache prefix's outgrown classes, and the pool holds about
the most that was live at once, not the sum of every shape a run has used.  (Not a hard
bound: OPT-6.7B under 8 GiB, 128 x 1, held up to 4.6 GB against 3.3 GB live in all.
Freeing idle buffers on a miss down to a quarter of the busy bytes was tried: OPT-1.3B's
misses went from 132 to 1126 and its run from 7.9 to 6.3 tok/s, so it is not done.)

State: ``_by_class`` — class bytes -> buffers of that class (busy or idle);
``_asked`` — class bytes -> the request count when it was last asked for;
``_bytes``, ``_peak`` — bytes the pool holds, and the most it held; counters for
:meth:`statistics`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from flexgraph.exec.diskio import ALIGN, aligned_empty

MIN_POOLED = 1 << 20          # smaller buffers come from malloc's bins, which reuse them well
CLASS_BITS = 5                # size classes: 2**5 per power of two (at most 1/32 rounding)
STALE = 64                    # requests without one for a class before its idle buffers may go


@dataclass(frozen=True)
class PoolStatistics:
    buffers: int          # buffers held
    held_bytes: int       # their bytes, busy and idle
    peak_held_bytes: int  # the most it ever held
    idle_bytes: int       # of which nothing references now
    hits: int             # requests served by an idle buffer
    misses: int           # requests that allocated
    evicted: int          # idle buffers of outgrown (stale) classes freed


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to its class: a multiple of 1/32 of its power of two, and of a page."""
    step = max(ALIGN, 1 << max(0, nbytes.bit_length() - 1 - CLASS_BITS))
    return -(-nbytes // step) * step


class _Buffer:
    __slots__ = ("aligned", "storage", "baseline")

    def __init__(self, nbytes: int):
        self.aligned = aligned_empty((nbytes,), torch.uint8)
        self.storage = self.aligned.untyped_storage()
        # references held here (the tensor, the storage wrapper); any more is a user's view
        self.baseline = torch._C._storage_Use_Count(self.storage._cdata)

    def idle(self) -> bool:
        return torch._C._storage_Use_Count(self.storage._cdata) <= self.baseline


class BufferPool:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_class: dict[int, list[_Buffer]] = {}
        self._asked: dict[int, int] = {}
        self._bytes = self._peak = 0
        self._clock = 0
        self._hits = self._misses = self._evicted = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised, page-aligned CPU tensor, reused from an idle buffer where one fits."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_POOLED:
            return aligned_empty(shape, dtype)
        cls = size_class(nbytes)
        with self._lock:
            self._clock += 1
            self._asked[cls] = self._clock
            self._evict_stale()
            buf = next((b for b in self._by_class.get(cls, ()) if b.idle()), None)
            if buf is not None:
                self._hits += 1
            else:
                self._misses += 1
                buf = _Buffer(cls)
                self._by_class.setdefault(cls, []).append(buf)
                self._bytes += cls
                self._peak = max(self._peak, self._bytes)
            # the view handed out is made under the lock: from here on the buffer is busy
            return buf.aligned[:nbytes].view(dtype).view(tuple(shape))

    def _evict_stale(self) -> None:
        """Free the idle buffers of classes not asked for lately (a dict of a few dozen
        classes: cheap next to the copy each request is for)."""
        horizon = max(STALE, 2 * sum(map(len, self._by_class.values())))
        for cls in [c for c, t in self._asked.items() if self._clock - t > horizon]:
            kept = [b for b in self._by_class.get(cls, ()) if not b.idle()]
            gone = len(self._by_class.get(cls, ())) - len(kept)
            self._evicted += gone
            self._bytes -= gone * cls
            if kept:
                self._by_class[cls] = kept
            else:
                self._by_class.pop(cls, None)
                del self._asked[cls]

    def clear(self) -> None:
        """Forget every buffer (views still held elsewhere keep their memory until dropped)."""
        with self._lock:
            self._by_class.clear()
            self._asked.clear()
            self._bytes = 0

    def statistics(self) -> PoolStatistics:
        with self._lock:
            bufs = [b for bs in self._by_class.values() for b in bs]
            return PoolStatistics(len(bufs), self._bytes, self._peak, sum(b.aligned.numel() for b in bufs if b.idle()),
                                  self._hits, self._misses, self._evicted)

