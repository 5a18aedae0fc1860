"""Shared test set-up.

Working copies of at least ``bufpool.MIN_POOLED`` bytes (1 MiB) come from the run's
buffer pool; the tiny models here make nothing that large, so every in-process test
pools every working copy instead — the correctness matrix then checks that a reused
buffer never carries one node's data into another (a subprocess runs as shipped).

Under pytest-xdist each worker gets its share of the cores for PyTorch's threads (and so
do the processes it starts, through ``OMP_NUM_THREADS``).  GNU OpenMP keeps a team's
idle workers spinning for a while when a process has no more OpenMP threads than cores,
and it cannot see other processes: two workers each spinning a 2-thread team on a
2-core machine took the executor tests from 29 s to 147 s (flexgraph.exec.openmp).
"""

import os

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

import pytest  # noqa: E402
import torch  # noqa: E402

if _workers > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from flexgraph.exec import bufpool  # noqa: E402


@pytest.fixture(autouse=True)
def pool_every_working_copy(monkeypatch):
    monkeypatch.setattr(bufpool, "MIN_POOLED", 0)
