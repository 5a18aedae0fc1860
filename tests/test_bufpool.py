"""The working-copy pool: an idle buffer is handed out again, one still viewed never is,
sizes round into classes, and outgrown classes are freed rather than hoarded."""

import threading

import torch

from flexgraph.exec import bufpool
from flexgraph.exec.bufpool import ALIGN, STALE, BufferPool, size_class

MiB = 1 << 20


def test_an_idle_buffer_is_reused():
    pool = BufferPool()
    a = pool.empty((MiB,), torch.uint8)
    where = a.data_ptr()
    del a
    b = pool.empty((MiB // 4,), torch.float32)
    assert b.data_ptr() == where and b.data_ptr() % ALIGN == 0
    s = pool.statistics()
    assert (s.hits, s.misses, s.buffers, s.held_bytes, s.peak_held_bytes, s.idle_bytes) == (1, 1, 1, MiB, MiB, 0)


def test_a_buffer_with_a_live_view_is_not_reused():
    pool = BufferPool()
    a = pool.empty((2, MiB // 2), torch.uint8)
    kept = a.permute(1, 0)[3:]          # a view that outlives the tensor handed out
    del a
    b = pool.empty((2, MiB // 2), torch.uint8)
    assert b.data_ptr() != kept.data_ptr() and pool.statistics().misses == 2
    b.fill_(7)
    kept.fill_(1)
    assert b.eq(7).all()                # the two never share memory
    del kept, b
    assert pool.statistics().idle_bytes == 2 * MiB


def test_size_classes_round_up_by_at_most_a_32nd_and_to_pages():
    for n in [MiB, MiB + 1, 3 * MiB - 5, 17 * MiB + 12345, 1 << 30]:
        c = size_class(n)
        assert n <= c <= n + n / 32 + ALIGN and c % ALIGN == 0
    # a KV prefix growing a token (32 KiB) a step shares one class for many steps
    classes = {size_class(512 * 32 * 1024 + t * 32 * 1024) for t in range(32)}
    assert len(classes) <= 3


def test_small_buffers_bypass_the_pool(monkeypatch):
    monkeypatch.setattr(bufpool, "MIN_POOLED", MiB)
    pool = BufferPool()
    t = pool.empty((1000,), torch.float32)
    assert t.data_ptr() % ALIGN == 0 and pool.statistics().buffers == 0


def test_outgrown_classes_are_freed():
    """A decode's requests: each step a layer's weights (one shape, asked for again and
    again) and a cache prefix a token longer than the last step's.  The pool holds about
    what is live, not every prefix size it has seen."""
    pool = BufferPool()
    rows = 64 * 1024                                       # bytes per token
    weight = 4 * MiB
    live = []
    for step in range(300):
        for _ in range(30):                                # 30 layers' weights, one live at a time
            w = pool.empty((weight,), torch.uint8)
            del w
        live.append(pool.empty((512 + step, rows), torch.uint8))
        live = live[-2:]                                   # the last two steps' prefixes live
    s = pool.statistics()
    largest = size_class((512 + 299) * rows)
    assert s.hits > 0.95 * (s.hits + s.misses)             # classes shared across steps
    assert s.evicted > 0
    # live: 2 prefixes and the weight buffer; idle: at most one outgrown class's 3
    assert s.peak_held_bytes <= 5 * largest + weight, s


def test_a_class_still_asked_for_is_kept():
    pool = BufferPool()
    a = pool.empty((MiB,), torch.uint8)
    b = pool.empty((2 * MiB,), torch.uint8)
    del a, b                                       # both idle
    for _ in range(3 * STALE):                     # both asked for all along
        pool.empty((MiB,), torch.uint8)
        pool.empty((2 * MiB,), torch.uint8)
    held = pool.empty((3 * MiB,), torch.uint8)
    s = pool.statistics()
    assert s.evicted == 0 and s.buffers == 3 and s.hits == 6 * STALE
    for _ in range(STALE + 1):                     # now only the 3 MiB class is asked for
        del held
        held = pool.empty((3 * MiB,), torch.uint8)
    s = pool.statistics()
    assert s.evicted == 2 and s.buffers == 1 and s.held_bytes == 3 * MiB
    assert held.data_ptr() % ALIGN == 0


def test_threads_never_share_a_buffer():
    pool = BufferPool()
    clashes = []

    def work(mark: int):
        for _ in range(200):
            t = pool.empty((MiB,), torch.uint8)
            t.fill_(mark)
            if not t.eq(mark).all():
                clashes.append(mark)
            del t

    threads = [threading.Thread(target=work, args=(m,)) for m in range(1, 5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not clashes and pool.statistics().buffers <= 4
