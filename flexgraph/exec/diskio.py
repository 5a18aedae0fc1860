"""The disk I/O pool: reads into and writes from preallocated tensors, in parallel chunks.

Reads land directly in the destination tensor's memory (``os.preadv`` on a view of its
bytes): no intermediate ``bytes`` object, no extra copy — and, when the tensor is
page-aligned (:func:`aligned_empty`) and the offset too, with O_DIRECT, bypassing the
page cache.  Writes of page-aligned tensors at page-aligned offsets bypass it too: a
buffered write leaves its pages in the page cache, which a memory cgroup charges to the
run (OPT-1.3B's KV cache, written buffered under a 3 GiB cap, grew the run's page cache
to 1.8 GB, and every fresh buffer then had to be reclaimed from it).  Large transfers are cut into
chunks served by a small thread pool, so several requests are in flight at once (what
an NVMe drive needs to reach its bandwidth).  ``tools/bench_io.py`` compares this with
aiofiles, which returns fresh ``bytes`` objects that must then be copied.

Row-wise transfers (:meth:`DiskIO.read_rows_into`, :meth:`DiskIO.write_rows_from`) move
a file region that holds rows back to back into or out of the rows of a tensor whose
rows are *not* back to back (a KV cache buffer with room for more tokens per row): one
``preadv``/``pwritev`` per request, with one buffer per row, so the bytes land where
they belong with no staging copy.

A full disk (``ENOSPC``/``EDQUOT``) becomes an :class:`ExecutionError` naming the
folder and what to do.  ``statistics()`` snapshots bytes and time per direction.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from flexgraph.errors import ExecutionError

CHUNK = 4 << 20          # bytes per request: several in flight is what the drive needs
ALIGN = 4096             # O_DIRECT wants buffer address, file offset and length in these units
IOV_MAX = 1024           # buffers one preadv/pwritev takes (Linux's UIO_MAXIOV)


@dataclass(frozen=True)
class DiskStatistics:
    read_bytes: int
    write_bytes: int
    read_seconds: float
    write_seconds: float
    reads: int
    writes: int


def aligned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory starts on a page boundary (so that disk
    reads into it can bypass the page cache)."""
    n = math.prod(shape) * dtype.itemsize
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + n].view(dtype).view(tuple(shape))


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without copying."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("disk I/O needs a contiguous CPU tensor")
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


class DiskIO:
    def __init__(self, workers: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexgraph-disk")
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int | None] = {}
        self._direct_writable: dict[str, bool] = {}
        self._stats = {"read_bytes": 0, "write_bytes": 0, "read_seconds": 0.0, "write_seconds": 0.0,
                       "reads": 0, "writes": 0}

    # ---- files -------------------------------------------------------------------------
    def fd(self, path: str | Path, create: bool = False) -> int:
        key = str(path)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                flags = os.O_RDWR | (os.O_CREAT if create else 0)
                try:
                    fd = os.open(key, flags, 0o600)
                except PermissionError:
                    fd = os.open(key, os.O_RDONLY)      # a read-only weight store file
                self._fds[key] = fd
            return fd

    def direct_fd(self, path: str | Path, write: bool = False) -> int | None:
        """A second descriptor with O_DIRECT, or None where the filesystem refuses it
        (tmpfs, some network filesystems) — or, with ``write``, where the file is
        read-only (a weight store's)."""
        key = str(path)
        with self._lock:
            if key not in self._direct_fds:
                direct = getattr(os, "O_DIRECT", 0)
                fd = None
                for flags in (os.O_RDWR | direct, os.O_RDONLY | direct):
                    try:
                        fd = os.open(key, flags)
                        break
                    except PermissionError:
                        continue
                    except OSError:
                        break
                self._direct_fds[key] = fd
                if fd is not None:
                    self._direct_writable[key] = flags & os.O_RDWR == os.O_RDWR
            fd = self._direct_fds[key]
            if write and not self._direct_writable.get(key, False):
                return None
            return fd

    def forget(self, path: str | Path) -> None:
        with self._lock:
            fds = [self._fds.pop(str(path), None), self._direct_fds.pop(str(path), None)]
            self._direct_writable.pop(str(path), None)
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds = list(self._fds.values()) + [fd for fd in self._direct_fds.values() if fd is not None]
            self._fds, self._direct_fds, self._direct_writable = {}, {}, {}
        for fd in fds:
            os.close(fd)
        self._pool.shutdown(wait=True)

    # ---- transfers -----------------------------------------------------------------------
    def read_into(self, path: str | Path, offset: int, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, CPU) with ``out.nbytes`` bytes of ``path`` at ``offset``.

        When ``out`` starts on a page and ``offset`` is page-aligned, the whole pages are
        read with O_DIRECT: disk to tensor, no page cache.  Under a memory cap that
        counts the page cache, buffered reads of data read once per step would evict
        and refill the cache on every step, and the reclaiming costs CPU and memory.
        """
        mv = byte_view(out)
        direct = None
        if out.data_ptr() % ALIGN == 0 and offset % ALIGN == 0 and len(mv) >= ALIGN:
            direct = self.direct_fd(path)
        if direct is None:
            self._transfer(self.fd(path), offset, mv, write=False, path=path)
            return
        whole = len(mv) - len(mv) % ALIGN
        self._transfer(direct, offset, mv[:whole], write=False, path=path)
        if whole < len(mv):
            self._transfer(self.fd(path), offset + whole, mv[whole:], write=False, path=path)

    def write_from(self, path: str | Path, offset: int, src: torch.Tensor) -> None:
        """Write the bytes of ``src`` (made contiguous on the CPU if needed) at ``offset``:
        whole pages with O_DIRECT when ``src`` starts on a page and ``offset`` is
        page-aligned, the rest through the page cache."""
        src = src.detach().to("cpu").contiguous()
        mv = byte_view(src)
        fd = self.fd(path, create=True)
        direct = None
        if src.data_ptr() % ALIGN == 0 and offset % ALIGN == 0 and len(mv) >= ALIGN:
            direct = self.direct_fd(path, write=True)
        if direct is None:
            self._transfer(fd, offset, mv, write=True, path=path)
            return
        whole = len(mv) - len(mv) % ALIGN
        self._transfer(direct, offset, mv[:whole], write=True, path=path)
        if whole < len(mv):
            self._transfer(fd, offset + whole, mv[whole:], write=True, path=path)

    def read_rows_into(self, path: str | Path, offset: int, out: torch.Tensor) -> None:
        """Fill each row ``out[i]`` (contiguous itself; rows any distance apart) from the
        rows stored back to back in ``path`` at ``offset``."""
        self._rows(path, offset, out, write=False)

    def write_rows_from(self, path: str | Path, offset: int, src: torch.Tensor) -> None:
        """Write the rows ``src[i]`` (each contiguous; any distance apart) back to back
        into ``path`` at ``offset``."""
        self._rows(path, offset, src, write=True)

    def _rows(self, path, offset: int, t: torch.Tensor, write: bool) -> None:
        rows = t.shape[0]
        if rows == 0 or t[0].numel() == 0:
            return
        row_bytes = t[0].numel() * t.element_size()
        if t.device.type != "cpu" or not t[0].is_contiguous():
            raise ValueError("row-wise disk I/O needs CPU rows that are each contiguous")
        stride = t.stride(0) * t.element_size()
        base = t.data_ptr()
        # the whole storage from the first row to the end of the last, as bytes
        span = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), t.storage_offset() * t.element_size(),
                                                      ((rows - 1) * stride + row_bytes,))
        mv = byte_view(span)
        fd = self.fd(path, create=write)          # (creates the file before any O_DIRECT open)
        if base % ALIGN == 0 and stride % ALIGN == 0 and row_bytes % ALIGN == 0 and offset % ALIGN == 0:
            direct = self.direct_fd(path, write=write)
            if direct is not None:
                fd = direct
        per_request = max(1, min(IOV_MAX, CHUNK // row_bytes))
        requests = [(offset + a * row_bytes, [mv[i * stride:i * stride + row_bytes]
                                             for i in range(a, min(rows, a + per_request))])
                    for a in range(0, rows, per_request)]
        self._run(requests, fd, write, path, rows * row_bytes)

    def _transfer(self, fd: int, offset: int, mv: memoryview, write: bool, path) -> None:
        self._run([(offset + a, [mv[a:a + CHUNK]]) for a in range(0, len(mv), CHUNK)], fd, write, path, len(mv))

    def _run(self, requests: list[tuple[int, list[memoryview]]], fd: int, write: bool, path, n: int) -> None:
        """Serve ``(file offset, buffers)`` requests, in parallel on the pool when there
        are several, and count ``n`` bytes."""
        start = time.perf_counter()
        if len(requests) == 1:
            _io(fd, *requests[0], write, path)
        else:
            futures = [self._pool.submit(_io, fd, off, bufs, write, path) for off, bufs in requests]
            for f in futures:
                f.result()
        elapsed = time.perf_counter() - start
        kind = "write" if write else "read"
        with self._lock:
            self._stats[f"{kind}_bytes"] += n
            self._stats[f"{kind}_seconds"] += elapsed
            self._stats[f"{kind}s"] += 1

    def statistics(self) -> DiskStatistics:
        with self._lock:
            return DiskStatistics(**self._stats)


def _io(fd: int, offset: int, bufs: list[memoryview], write: bool, path) -> None:
    """Transfer ``bufs`` to or from the file region at ``offset`` they fill back to back,
    resuming after a short read or write."""
    want = sum(len(b) for b in bufs)
    done = 0
    while bufs:
        try:
            if write:
                n = os.pwritev(fd, bufs, offset + done)
            else:
                n = os.preadv(fd, bufs, offset + done)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ExecutionError(f"the disk holding {Path(path).parent} is full; free space there, point "
                                     "--offload-dir at a larger disk, or plan with less on disk") from None
            raise ExecutionError(f"disk I/O on {path} failed: {e.strerror}") from None
        if n == 0:
            raise ExecutionError(f"{path} ended early (wanted {want} bytes at {offset}); "
                                 "the file is truncated — re-convert the model or rerun")
        done += n
        while bufs and n >= len(bufs[0]):          # drop what is done, resume mid-buffer
            n -= len(bufs[0])
            bufs = bufs[1:]
        if n:
            bufs = [bufs[0][n:], *bufs[1:]]
