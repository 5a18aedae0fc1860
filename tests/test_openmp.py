"""One OpenMP team during a run: the compute lane keeps the process's thread count, the
other lanes and the dispatching thread run on one thread, and the dispatcher's own
workers are let go (flexgraph.exec.openmp)."""

import asyncio
import os
import threading

import pytest
import torch

from exec_helpers import hardware, tiny_store
from flexgraph.exec import openmp
from flexgraph.exec.executor import ExecOptions, Executor
from flexgraph.exec.prompts import make_batches, synthetic_prompts
from flexgraph.graph.builder import Workload
from flexgraph.models.sampling import SamplingParams
from flexgraph.plan.planner import Knobs, make_plan
from flexgraph.weights.resolve import resolve_model

needs_runtime = pytest.mark.skipif(openmp._runtime() is None, reason="no OpenMP runtime found in this process")
needs_two_cpus = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU")


def _in_fresh_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _parallel_kernel():
    x = torch.ones(1 << 22)         # 4 M elements: far above PyTorch's grain for going parallel
    return float((x * 2).sum())


@needs_runtime
def test_a_threads_team_size_is_its_own_and_survives_its_first_kernel():
    main = torch.get_num_threads()

    def body():
        openmp.set_thread_team(1)
        _parallel_kernel()          # PyTorch's lazy per-thread setup runs here at the latest
        return torch.get_num_threads()

    assert _in_fresh_thread(body) == 1
    assert torch.get_num_threads() == main            # the caller is untouched
    assert _in_fresh_thread(torch.get_num_threads) == main   # and so is what new threads start with


@needs_runtime
@needs_two_cpus
def test_releasing_a_team_ends_its_workers():
    if not openmp._runtime()[1].startswith("libgomp"):
        pytest.skip("teams are released with libgomp only")

    def tids() -> frozenset[int]:   # ids, not a count: threads of earlier tests may end meanwhile
        return openmp.statistics().thread_ids

    def body():
        openmp.set_thread_team(2)
        before = tids()
        _parallel_kernel()                            # starts this thread's team: one worker
        workers = tids() - before
        released = openmp.release_thread_team()
        left = workers & tids()
        _parallel_kernel()                            # the team comes back when needed
        again = tids() - before - workers
        openmp.release_thread_team()
        return workers, released, left, again

    workers, released, left, again = _in_fresh_thread(body)
    assert len(workers) == 1
    assert released
    assert not left                                   # the worker has exited
    assert len(again) == 1


@needs_runtime
def test_a_run_gives_the_compute_lane_the_team_and_the_rest_one_thread(tmp_path):
    _hf, store = tiny_store("llama3-rope-scaling-gqa4", tmp_path)
    wl = Workload(4, 6, 3)
    sampling = SamplingParams()
    plan = make_plan(resolve_model(str(store.path)), wl, sampling, hardware(tmp_path),
                     Knobs(2, 2, (0, 100, 0, 50, 0, 100), "zigzag", "float32"))
    prompts = synthetic_prompts(4, 6, store.spec.vocab_size)
    old = torch.get_num_threads()
    main = 3                    # before 3aa17c0 every lane (and the dispatcher) ran with this count
    torch.set_num_threads(main)
    dispatcher = []
    try:
        with Executor(plan, store, ExecOptions(progress=False)) as ex:
            out = asyncio.run(ex.run_block(make_batches(prompts, 0, 2, 2, 6, 0, sampling),
                                           on_compute=lambda _node: dispatcher.append(torch.get_num_threads())))
            lanes = {name: lane.submit(torch.get_num_threads, [], "probe") for name, lane in ex.lanes.items()}
            for c in lanes.values():
                c.wait()
            sizes = {name: c.value for name, c in lanes.items()}
            after = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    assert all(o.shape == (2, 3) for o in out.ids)
    assert sizes.pop("compute") == main
    assert set(sizes.values()) == {1}, sizes           # load_cache, store_cache, ... copy on one thread
    assert dispatcher and set(dispatcher) == {1}       # the loop's thread, while the block ran
    assert after == main                               # and given back after it


def test_without_a_runtime_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(openmp, "_runtime", lambda: None)
    main = torch.get_num_threads()
    with openmp.cores_to_the_compute_lane():
        assert torch.get_num_threads() == main
    assert not openmp.release_thread_team()
    assert openmp.statistics().runtime is None
