"""The executor's parts on their own: memory manager, lanes, disk pool, metrics maths."""

import asyncio
import errno
import threading

import pytest
import torch

from flexgraph.errors import ExecutionError
from flexgraph.exec import diskio
from flexgraph.exec.diskio import DiskIO
from flexgraph.exec.lanes import Completion, Lane, LaneStopped
from flexgraph.exec.memory import MemoryManager
from flexgraph.exec.metrics import overlap_and_overhead


# ---- memory manager --------------------------------------------------------------------------
def test_memory_grants_in_order_and_never_exceeds():
    async def scenario():
        mem = MemoryManager({"gpu": 100, "cpu": 50, "disk": None})
        await mem.acquire({"gpu": 60})
        order = []

        async def want(name, req):
            await mem.acquire(req)
            order.append(name)

        big = asyncio.ensure_future(want("big", {"gpu": 70}))
        small = asyncio.ensure_future(want("small", {"gpu": 10}))   # would fit, but waits behind big
        await asyncio.sleep(0)
        s = mem.statistics()
        assert s.waiting == 2 and s.used["gpu"] == 60 and order == []
        mem.release({"gpu": 60})
        await asyncio.gather(big, small)
        assert order == ["big", "small"]
        s = mem.statistics()
        assert s.used["gpu"] == 80 and s.peak["gpu"] == 80 and s.waiting == 0 and s.grants == 3
        assert s.peak["gpu"] <= s.limit["gpu"]

    asyncio.run(scenario())


def test_memory_release_from_another_thread_wakes_waiter():
    async def scenario():
        mem = MemoryManager({"gpu": 10, "cpu": 10, "disk": 10})
        await mem.acquire({"cpu": 10})
        waiter = asyncio.ensure_future(mem.acquire({"cpu": 5}))
        await asyncio.sleep(0)
        threading.Thread(target=mem.release, args=({"cpu": 10},)).start()
        await asyncio.wait_for(waiter, 5)
        assert mem.statistics().used["cpu"] == 5

    asyncio.run(scenario())


def test_memory_impossible_requests_fail_fast():
    mem = MemoryManager({"gpu": None, "cpu": 10, "disk": 0})
    with pytest.raises(MemoryError):
        asyncio.run(mem.acquire({"gpu": 1}))
    with pytest.raises(MemoryError):
        asyncio.run(mem.acquire({"cpu": 11}))
    assert mem.try_acquire({"cpu": 10}) and not mem.try_acquire({"cpu": 1})


# ---- lanes ------------------------------------------------------------------------------------
def test_lane_runs_in_submission_order_after_dependencies():
    log = []
    gate = threading.Event()
    a, b = Lane("a"), Lane("b")
    try:
        blocker = b.submit(lambda: (gate.wait(5), log.append("b0")), [], "b0")
        # a1 depends on b0; a2 does not but is queued behind a1 on the same lane
        a1 = a.submit(lambda: log.append("a1"), [blocker], "a1")
        a2 = a.submit(lambda: log.append("a2"), [], "a2")
        assert not a2.done()
        gate.set()
        a2.wait()
        assert log == ["b0", "a1", "a2"]
        s = a.statistics()
        assert s.items == 2 and s.queued == 0 and s.busy_seconds >= 0
    finally:
        a.stop(), b.stop()


def test_lane_error_fails_dependants_and_stop_fails_queued():
    lane = Lane("x")
    try:
        bad = lane.submit(lambda: 1 / 0, [], "bad")
        after = lane.submit(lambda: "never", [bad], "after")
        after.wait()
        assert isinstance(bad.error, ZeroDivisionError)
        assert isinstance(after.error, LaneStopped)
    finally:
        lane.stop()
    late = Completion()
    lane2 = Lane("y")
    gate = threading.Event()
    lane2.submit(gate.wait, [], "blocking")
    queued = lane2.submit(lambda: "x", [], "queued")
    lane2.stop()
    gate.set()
    queued.wait()
    assert isinstance(queued.error, LaneStopped) and not late.done()


def test_completion_reaches_asyncio():
    async def scenario():
        lane = Lane("z")
        try:
            c = lane.submit(lambda: 42, [], "answer", asyncio.get_running_loop())
            assert await asyncio.wait_for(c.future, 5) == 42
        finally:
            lane.stop()

    asyncio.run(scenario())


# ---- disk pool ---------------------------------------------------------------------------------
def test_disk_roundtrip_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(diskio, "CHUNK", 4096)       # force several parallel chunks
    io = DiskIO(workers=3)
    try:
        src = torch.randn(10_000, dtype=torch.float32)
        io.write_from(tmp_path / "f", 128, src)
        out = torch.empty_like(src)
        io.read_into(tmp_path / "f", 128, out)
        assert torch.equal(out, src)
        s = io.statistics()
        assert s.read_bytes == s.write_bytes == 40_000 and s.reads == s.writes == 1
    finally:
        io.close()


def test_disk_full_and_short_file_are_clear(tmp_path, monkeypatch):
    io = DiskIO()
    try:
        out = torch.empty(100)
        (tmp_path / "short").write_bytes(b"x" * 10)
        with pytest.raises(ExecutionError, match="truncated"):
            io.read_into(tmp_path / "short", 0, out)

        def full(*_a):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(diskio.os, "pwritev", full)
        with pytest.raises(ExecutionError, match="is full"):
            io.write_from(tmp_path / "g", 0, out)
    finally:
        io.close()


# ---- metrics ------------------------------------------------------------------------------------
def test_overlap_and_overhead_on_hand_drawn_spans():
    spans = {
        "compute": [(0.0, 4.0, "c"), (5.0, 8.0, "c")],
        "load_weight": [(3.0, 6.0, "w")],         # overlaps compute for 1 + 1 of its 3 seconds
        "store_cache": [(9.0, 9.5, "s")],         # no overlap
    }
    overlap, overhead = overlap_and_overhead(spans, [(0.0, 10.0)])
    assert overlap == pytest.approx(2.0 / 3.5)
    assert overhead == pytest.approx((10.0 - 8.5) / 10.0)    # idle: 8-9 and 9.5-10


def test_aligned_reads_bypass_the_page_cache_and_match(tmp_path):
    from flexgraph.exec.diskio import ALIGN, aligned_empty
    io = DiskIO()
    try:
        src = torch.randn(3 * ALIGN // 4 + 123, dtype=torch.float32)      # not a whole number of pages
        io.write_from(tmp_path / "f", 0, src)
        out = aligned_empty(src.shape, torch.float32)
        assert out.data_ptr() % ALIGN == 0
        io.read_into(tmp_path / "f", 0, out)
        assert torch.equal(out, src)
        direct = io.direct_fd(tmp_path / "f")
        if direct is not None:                     # the filesystem allows O_DIRECT
            assert io.statistics().reads == 2      # the whole pages direct, the tail buffered
        unaligned = torch.empty(src.numel() + 1)[1:]
        io.read_into(tmp_path / "f", 0, unaligned)
        assert torch.equal(unaligned, src)
    finally:
        io.close()


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (mincore(2) on a shared mapping of it)."""
    import ctypes
    import mmap
    import os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    n = os.path.getsize(path)
    vec = (ctypes.c_ubyte * -(-n // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(addr, n, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, n)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


def test_aligned_writes_bypass_the_page_cache_and_read_back(tmp_path):
    from flexgraph.exec.diskio import ALIGN, aligned_empty
    io = DiskIO()
    try:
        src = aligned_empty((64 * ALIGN // 4 + 100,), torch.float32).normal_()    # 64 pages and a tail
        io.write_from(tmp_path / "f", 0, src)
        if io.direct_fd(tmp_path / "f", write=True) is None:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert io.statistics().writes == 2                   # the whole pages direct, the tail buffered
        assert _resident_pages(tmp_path / "f") <= 1           # only the tail's page went through the cache
        back = aligned_empty(src.shape, torch.float32)
        io.read_into(tmp_path / "f", 0, back)
        assert torch.equal(back, src)
        unaligned = torch.empty(src.numel() + 1)[1:]         # an unaligned source: buffered, and still right
        io.write_from(tmp_path / "g", 0, unaligned.copy_(src))
        assert _resident_pages(tmp_path / "g") > 64
        io.read_into(tmp_path / "g", 0, back)
        assert torch.equal(back, src)
    finally:
        io.close()


def test_stale_offload_runs_of_dead_processes_are_removed(tmp_path):
    import os
    from flexgraph.exec.homes import remove_stale_runs
    dead = _dead_pid()
    stale = tmp_path / f"run-{dead}-abcd1234"
    live = tmp_path / f"run-{os.getppid()}-abcd1234"
    for d in (stale, live):
        d.mkdir()
        (d / "kv-1-0.k").write_bytes(b"x" * 10)
    remove_stale_runs(tmp_path)
    assert not stale.exists() and live.exists()


def _dead_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid
