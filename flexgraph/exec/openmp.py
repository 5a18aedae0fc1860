"""One OpenMP team for the maths during a run: the compute lane's.

PyTorch's CPU kernels run on OpenMP, and every thread that starts a parallel region
keeps its own team of worker threads for as long as it lives.  GNU OpenMP (libgomp, in
PyTorch's Linux wheels) lets a team's idle workers spin for a while, so that the next
region starts at once — but only while the process has no more OpenMP threads than
CPUs.  Past that it spins ~100 times, and every parallel region then waits for a futex
wake-up.  The main thread has a team from loading weights and calibrating; the compute
lane's team puts a 2-core machine over the limit.  On the 12-07 EPYC (2 cores),
SmolLM2's decode product ``[8, 576] x [576, 1536]`` in bfloat16 took 115 µs in the main
thread and 200 µs on a lane, and a lane started before the main thread's first kernel
ran it in 116 µs.  The README's run (8 sequences) took 3.4 s against a 2.1 s estimate.

So while a block runs (:func:`cores_to_the_compute_lane`):

- the compute lane's thread has the team, with the process's thread count
  (:func:`set_thread_team`, as the lane's thread starts);
- the other lanes copy on one thread, so they never start a team;
- the thread that runs the block (the asyncio dispatcher) gives its team back
  (:func:`release_thread_team`) and runs on one thread until the block ends.

Thread counts are set through the loaded runtime's ``omp_set_num_threads``, which sets
the calling thread's count only (``torch.set_num_threads`` would also change what every
thread that has not run a kernel yet starts with).  Teams are released with libgomp
only: its ``omp_pause_resource_all`` frees the calling thread's workers alone, where
LLVM's runtime shuts down every thread's.  Without a runtime found in
``/proc/self/maps`` (not Linux, or PyTorch built without OpenMP) these do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

OMP_PAUSE_HARD = 2          # omp_pause_resource_t: free the resources, not just idle them


@dataclass(frozen=True)
class OpenMPStatistics:
    runtime: str | None      # file name of the OpenMP library PyTorch loaded, or None
    team_size: int           # threads the calling thread's kernels use
    thread_ids: frozenset[int]   # this process's threads, OpenMP workers included (ids: a count
                                 # would not show a worker starting as another thread ends)


@functools.cache
def _runtime() -> tuple[ctypes.CDLL, str] | None:
    """The OpenMP library already loaded in this process (PyTorch's), and its file name."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in name:
            try:
                return ctypes.CDLL(path), name      # the loaded copy: dlopen returns its handle
            except OSError:
                return None
    return None


def set_thread_team(threads: int) -> int:
    """Size the calling thread's OpenMP team for PyTorch's kernels; returns the old size."""
    old = torch.get_num_threads()   # first call in a thread: PyTorch's lazy setup, which would reset it later
    rt = _runtime()
    if rt is not None and threads != old:
        rt[0].omp_set_num_threads(int(threads))
    return old


def release_thread_team() -> bool:
    """Let the calling thread's OpenMP workers exit (libgomp); True if they were released."""
    rt = _runtime()
    if rt is None or not rt[1].startswith("libgomp") or not hasattr(rt[0], "omp_pause_resource_all"):
        return False
    return rt[0].omp_pause_resource_all(OMP_PAUSE_HARD) == 0


@contextmanager
def cores_to_the_compute_lane() -> Iterator[None]:
    """The calling thread runs on one thread, with no team of its own, until the block
    it dispatches has run; then its team size is restored (the team returns on its next
    parallel kernel)."""
    old = set_thread_team(1)
    release_thread_team()
    try:
        yield
    finally:
        set_thread_team(old)


def statistics() -> OpenMPStatistics:
    rt = _runtime()
    try:
        thread_ids = frozenset(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        thread_ids = frozenset()
    return OpenMPStatistics(rt[1] if rt else None, torch.get_num_threads(), thread_ids)
