"""Shared test set-up.

Working copies of at least ``bufpool.MIN_POOLED`` bytes (1 MiB) come from the run's
buffer pool; the tiny models here make nothing that large, so every in-process test
pools every working copy instead — the correctness matrix then checks that a reused
buffer never carries one node's data into another (a subprocess runs as shipped).
"""

import pytest

from flexgraph.exec import bufpool


@pytest.fixture(autouse=True)
def pool_every_working_copy(monkeypatch):
    monkeypatch.setattr(bufpool, "MIN_POOLED", 0)
