"""A fixed glibc mmap threshold for runs under a tight memory cap.

glibc serves a block of at least its mmap threshold with a fresh mapping, returned to
the kernel when freed; smaller blocks come from heap arenas, which keep what is freed.
The threshold starts at 128 KiB and *rises* to the size of each mapped block freed (up
to 32 MiB), so after a few layers nearly every intermediate of a step lives in arenas —
one per thread that allocates — and they fragment.  OPT-1.3B under a 3 GiB cap (64
prompts, 8 x 8, cache on disk) grew its resident memory through the prefill from 1.7 to
2.9 GB, with 1.6 GB of buffers live, and was OOM-killed; with the threshold fixed at
1 MiB its resident memory stayed at ~1.4 GB and the run finished.

A fixed threshold makes every large block a fresh mapping, faulted in page by page:
alone it cost that run's compute 40%, so the executor's working copies come from its
own pool (:mod:`flexgraph.exec.bufpool`) and only the layer maths' intermediates pay;
the cost model times a tight plan's layers under this allocator
(:func:`flexgraph.calibrate.measure_layers_tight`).
A run fixes it when huge pages are off (its planned peak leaves no room, see
:mod:`flexgraph.hugepages`); a roomy run keeps glibc's reuse.  A user's own
``MALLOC_MMAP_THRESHOLD_`` always wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "MALLOC_MMAP_THRESHOLD_"
M_MMAP_THRESHOLD = -3          # glibc's <malloc.h>
THRESHOLD = 1 << 20


def fix(nbytes: int = THRESHOLD) -> bool:
    """Fix this process's mmap threshold at ``nbytes`` (which also stops it rising);
    returns whether it was set — not where the user set their own, nor off glibc."""
    if ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, nbytes) == 1
