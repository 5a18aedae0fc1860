"""Leftovers of killed writes: removed by the next writer on the same host, and only those."""

import os
import subprocess
import sys

import torch

from flexgraph.weights import partials
from flexgraph.weights.store import StoreWriter


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leftover(folder, final_name, host, pid, tag="0123abcd"):
    p = folder / f".{final_name}.partial-{host}-{pid}-{tag}"
    p.mkdir()
    (p / "w.raw").write_bytes(b"x" * 1000)
    return p


def test_only_dead_writers_of_this_store_on_this_host_are_reaped(tmp_path):
    host = partials._host()
    dead = _leftover(tmp_path, "store", host, _dead_pid())
    live = _leftover(tmp_path, "store", host, os.getppid())             # a running process
    other_host = _leftover(tmp_path, "store", "elsewhere.example", _dead_pid(), "4567cdef")
    other_store = _leftover(tmp_path, "store2", host, _dead_pid())
    unrelated = tmp_path / ".store.partial-notours"
    unrelated.mkdir()

    assert partials.stale_partials(tmp_path / "store") == [dead]
    with StoreWriter(tmp_path / "store") as w:
        assert w.tmp.name.startswith(f".store.partial-{host}-{os.getpid()}-")
        assert not dead.exists()
        assert live.exists() and other_host.exists() and other_store.exists() and unrelated.exists()
        w.add("a", torch.ones(2))
        w.finish({}, {"kind": "test"})
    assert (tmp_path / "store" / "index.json").exists()
    # the writer's own sibling is gone once it finished; the others are still there
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".store.")) == \
        sorted([live.name, other_host.name, unrelated.name])


def test_a_killed_writer_leaves_its_sibling_and_the_next_one_removes_it(tmp_path):
    final = tmp_path / "big"
    code = ("import os, sys, torch; from flexgraph.weights.store import StoreWriter\n"
            f"w = StoreWriter({str(final)!r}); w.add('a', torch.ones(1000))\n"
            "os._exit(9)   # killed: no __exit__, no abort\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".big.partial-")]
    assert len(left) == 1 and (left[0] / "a.raw").exists()
    assert partials.reap_stale(final) == left
    assert list(tmp_path.iterdir()) == []


def test_the_planners_room_check_reaps_before_it_measures(tmp_path, monkeypatch):
    from flexgraph.weights import resolve
    monkeypatch.setenv("FLEXGRAPH_CACHE", str(tmp_path))
    ref = resolve.resolve_model("opt-125m", dummy=True)
    path = resolve.store_path_for(ref, torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    dead = _leftover(path.parent, path.name, partials._host(), _dead_pid())
    resolve.unwritable_stores(ref, ["float32"])
    assert not dead.exists()
