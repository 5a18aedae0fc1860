"""The executor takes new nodes while a block runs (what temporal fusion will build on)."""

import asyncio

import torch

from exec_helpers import hardware, tiny_store
from flexgraph.exec.executor import ExecOptions, Executor, NodeFeed
from flexgraph.exec.prompts import make_batches, synthetic_prompts
from flexgraph.graph.builder import Workload
from flexgraph.models.sampling import SamplingParams
from flexgraph.plan.planner import Knobs, make_plan
from flexgraph.weights.resolve import resolve_model


def test_nodes_fed_while_running_give_the_same_result(tmp_path):
    _hf, store = tiny_store("qwen2-bias", tmp_path)
    wl = Workload(4, 6, 5)
    sampling = SamplingParams()
    plan = make_plan(resolve_model(str(store.path)), wl, sampling, hardware(tmp_path, gpu_mem=1 << 30),
                     Knobs(2, 2, (30, 30, 0, 50, 0, 100), "zigzag", "float32"))
    prompts = synthetic_prompts(4, 6, store.spec.vocab_size)
    batches = lambda: make_batches(prompts, 0, 2, 2, 6, 0, sampling)   # noqa: E731
    with Executor(plan, store, ExecOptions(progress=False)) as ex:
        whole = asyncio.run(ex.run_block(batches()))

        async def fed():
            feed = NodeFeed()
            half = len(ex.nodes) // 2
            feed.put(ex.nodes[:half])
            started = asyncio.Event()
            computed = []

            def on_compute(node):
                computed.append(node)
                started.set()

            task = asyncio.ensure_future(ex.run_block(batches(), on_compute=on_compute, feed=feed))
            await started.wait()               # the block is running...
            assert not task.done()
            feed.put(ex.nodes[half:])          # ...and grows
            feed.close()
            out = await task
            return out, computed

        out, computed = asyncio.run(fed())
    assert len(computed) == sum(1 for n in ex.nodes if n.kind == "compute")
    for a, b in zip(whole.ids, out.ids):
        assert torch.equal(a, b)
