"""A fixed mmap threshold returns freed blocks to the kernel: the resident memory of a
run that frees while it keeps a later block stops growing."""

import os
import platform
import subprocess
import sys

import pytest

from flexgraph import malloc_threshold

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's threshold is glibc's")

# Free an 8 MiB block (glibc raises its threshold to 8 MiB), make fifty 2 MiB tensors,
# keep the last and free the rest: print the resident MiB before and after the frees.
CHURN = """
import sys
from flexgraph import malloc_threshold
fixed = malloc_threshold.fix() if sys.argv[1] == "fix" else False
import torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
big = torch.ones(8 << 20, dtype=torch.uint8); del big
ts = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(50)]
before = rss()
last = ts[-1]; del ts
print(fixed, before, rss())
"""


def _churn(mode: str) -> tuple[bool, float, float]:
    env = {k: v for k, v in os.environ.items() if k != malloc_threshold.ENV}
    r = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    fixed, before, after = r.stdout.split()
    return fixed == "True", float(before), float(after)


def test_fixed_threshold_returns_freed_blocks():
    fixed, before, after = _churn("fix")
    assert fixed and before - after > 80          # 49 x 2 MiB went back
    fixed, before, after = _churn("default")
    assert not fixed and before - after < 20      # glibc's own threshold had risen: kept


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv(malloc_threshold.ENV, str(1 << 20))
    assert malloc_threshold.fix() is False
