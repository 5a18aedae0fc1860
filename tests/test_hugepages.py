"""Huge pages for large CPU tensors: on where the plan leaves room, off under a tight
cap, and the user's own setting always wins."""

import json
import os
import platform
import subprocess
import sys

import pytest

from flexgraph import hugepages, malloc_threshold
from test_exec_errors import model, plan, write_prompts  # noqa: F401  (the module-scoped tiny store)


@pytest.mark.parametrize("peak, home, capacity, on", [
    (1, 0, 100, True),
    (50, 0, 100, True),                 # the working set, held again, just fits
    (51, 0, 100, False),
    (80, 70, 100, True),                # large homes cost nothing extra: what counts is the working set
    (90, 70, 100, False),
    (1, 0, None, False),                # capacity unknown: no room can be promised
])
def test_on_only_where_the_working_set_leaves_room(monkeypatch, peak, home, capacity, on):
    monkeypatch.delenv(hugepages.ENV, raising=False)
    monkeypatch.setattr(hugepages, "EXTRA", 1.0)
    assert hugepages.choose(peak, home, capacity) is on
    assert os.environ[hugepages.ENV] == ("1" if on else "0")


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv(hugepages.ENV, "0")
    assert hugepages.choose(1, 0, 100) is False
    monkeypatch.setenv(hugepages.ENV, "1")
    assert hugepages.choose(99, 0, 100) is True


def _execute_choice(plan_path, prompts, out, env) -> dict:
    cmd = [sys.executable, "-m", "flexgraph.cli", "--log-format", "json", "execute", str(plan_path),
           "--prompts", str(prompts), "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    (choice,) = [e for e in events if e["event"] == "huge_pages"]
    return choice


def test_execute_decides_before_running(model, tmp_path):  # noqa: F811
    store, _ = model
    p = plan(store, tmp_path)                         # a tiny model in 2 GiB: plenty of room
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    env = {k: v for k, v in os.environ.items() if k not in (hugepages.ENV, malloc_threshold.ENV)}
    roomy = _execute_choice(p, prompts, tmp_path / "a.jsonl", env)
    assert roomy["on"] is True and roomy["malloc_threshold_fixed"] is False
    tight = _execute_choice(p, prompts, tmp_path / "b.jsonl", {**env, hugepages.ENV: "0"})
    # without huge pages (a tight run) malloc's threshold is fixed, unless the user set it
    assert tight["on"] is False and tight["malloc_threshold_fixed"] is (platform.libc_ver()[0] == "glibc")
    own = _execute_choice(p, prompts, tmp_path / "c.jsonl", {**env, hugepages.ENV: "0",
                                                              malloc_threshold.ENV: str(4 << 20)})
    assert own["malloc_threshold_fixed"] is False
