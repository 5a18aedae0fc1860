"""The executor: walks a plan's path and dispatches every node to its lane.

Dispatch is an asyncio coroutine (uvloop where installed).  For each node, in path
order, it

1. awaits the memory manager's grant of the node's allocations (in path order, so the
   residency can never exceed what the checker simulated);
2. resolves which buffer *instances* the node reads and creates, and counts readers;
3. submits the node to its lane, behind the nodes it depends on (``CheckedPath.deps``);
   with overlap off, also behind the previous node (fully serial execution).

When a node completes, every buffer it was the last to need is released: its tensors
dropped, its bytes returned to the memory manager (waking any waiting grant).

State (plain data): ``completions`` per path index; ``current`` buffer id -> live
instance; per instance its bytes per tier, pending readers and whether its last reader
has been dispatched.  New nodes can be appended to a running block's path
(:meth:`Executor.extend`), which temporal fusion will use.

Lanes: ``compute``, ``load_weight``, ``load_cache``, ``load_hidden``, ``store_cache``,
``store_hidden`` — CUDA streams on a GPU, worker threads on the CPU.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import partial

import torch

from flexgraph.compress.quant import should_compress
from flexgraph.errors import ExecutionError, FlexgraphError
from flexgraph.exec.diskio import DiskIO
from flexgraph.exec.homes import Tiers, load_weight_homes, make_cache_homes
from flexgraph.exec.lanes import Completion, Lane, LaneStopped
from flexgraph.exec.memory import MemoryManager
from flexgraph.exec.nodes import RUNNERS, BatchInputs, RunState
from flexgraph.exec.openmp import cores_to_the_compute_lane
from flexgraph.graph.builder import COMPUTE, KINDS, make_sizes, part_of, scratch_homes
from flexgraph.log import get_logger
from flexgraph.models.spec import ModelSpec
from flexgraph.plan.planfile import Plan
from flexgraph.plan.planner import capacities, replay_plan
from flexgraph.plan.policy import TIERS, policy_weight_placement

log = get_logger(__name__)
LANES = KINDS


@dataclass
class ExecOptions:
    overlap: bool = True          # False: every node waits for the previous one
    verify: bool = True           # check weight checksums (once per store)
    progress: bool = True
    offload_dir: str | None = None
    record_logits: bool = False   # keep the head's float32 logits of every step (BlockOutput.logits)
    compile: bool = False         # torch.compile the layer maths (fused element-wise work; see Kernels)


class _Instance:
    __slots__ = ("key", "bytes", "pending", "final", "freed")

    def __init__(self, key: tuple):
        self.key = key
        self.bytes: dict[str, int] = {}
        self.pending = 0
        self.final = False
        self.freed = False


@dataclass
class BlockTiming:
    start: float
    prefill_end: float
    end: float


@dataclass
class BlockOutput:
    ids: list[torch.Tensor]          # per GPU batch: [B, gen_len]
    timing: BlockTiming
    logits: list[torch.Tensor] | None = None   # per GPU batch: float32 [B, gen_len, V], if recorded


@dataclass
class _Node:
    kind: str
    i: int
    j: int
    k: int
    request: dict[str, int]
    allocs: list[tuple]
    uses: list[tuple]
    releases: list[tuple]
    deps: list[int]
    label: str
    moves: list[tuple]
    part: str               # graph.builder.part_of: what the node's seconds count towards


class Executor:
    """Runs blocks of a plan with a model's weights; reusable across blocks."""

    def __init__(self, plan: Plan, store, options: ExecOptions | None = None, weight_homes=None):
        """``weight_homes``: weights already placed (by :func:`load_weight_homes`, for this
        plan's weight split and dtype) — the Python API places them once for many runs."""
        self.plan, self.store = plan, store
        self.weight_homes = weight_homes
        self.options = options or ExecOptions()
        self.spec: ModelSpec = store.spec
        self.policy = plan.policy
        self.graph, self.checked = replay_plan(plan)
        cap = capacities(plan.hardware)
        self.has_gpu = cap["gpu"] is not None
        self.device = plan.hardware.get("device", "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ExecutionError("the plan was made for CUDA but no CUDA device is available here; "
                                 "re-plan on this machine (flexgraph plan --device cpu)")
        self.sizes = make_sizes(self.spec, self.policy, self.has_gpu)
        self.nodes = self._compile()
        self.graph = None        # everything a node needs is in self.nodes; the graph is large
        # never grant more than the checker simulated (which is within capacity)
        self.memory = MemoryManager({t: plan.residency["peak"].get(t, 0) for t in TIERS})
        self.disk = DiskIO()
        offload = self.options.offload_dir or plan.hardware.get("offload_dir") or "."
        self.tiers = Tiers(self.device, self.has_gpu, offload, self.disk)
        self.lanes: dict[str, Lane] = {}
        self.state: RunState | None = None
        self.moved: dict[tuple[str, str], int] = {}
        self.part_seconds: dict[str, float] = {}     # node seconds by part_of, every block so far
        self._closed = False

    # ---- set-up ----------------------------------------------------------------------------
    def _compile(self) -> list[_Node]:
        nodes = self.graph.nodes
        out = []
        for p, node in enumerate(self.checked.path):
            attrs = nodes[node]
            request: dict[str, int] = {}
            for _buf, tier, nbytes in attrs["allocs"]:
                if nbytes:
                    request[tier] = request.get(tier, 0) + nbytes
            kind, i, j, k = node
            out.append(_Node(kind, i, j, k, request, attrs["allocs"], self.checked.uses[p],
                             self.checked.releases[p], self.checked.deps[p], f"{kind}({i},{j},{k})",
                             attrs["moves"], part_of(self.spec, kind, i, j)))
        return out

    def setup(self) -> None:
        """Place the weights and the KV cache in their homes; start the lanes."""
        t0 = time.perf_counter()
        try:
            homes_request = {t: self.checked.home_bytes.get(t, 0) for t in TIERS}
            homes_request["cpu"] += self.checked.bookkeeping        # this executor's own state
            self.memory.acquire_now({t: n for t, n in homes_request.items() if n})
            weight_homes = self.weight_homes
            if weight_homes is None:
                placement = policy_weight_placement(self.spec, self.policy)
                weight_homes = load_weight_homes(self.spec, self.store, placement, self.policy.torch_dtype,
                                                 self.tiers, verify=self.options.verify,
                                                 show_progress=self.options.progress,
                                                 compress=self.policy.compress_weight,
                                                 store_dtype=self.policy.store_torch_dtype)
            elif any(h.compressed for layer in weight_homes for h in layer.values()) != (
                    self.policy.compress_weight and any(should_compress(w.name, w.shape)
                                                        for w in self.spec.all_weights())):
                raise ExecutionError("the weights given were placed with a different --compress-weight than "
                                     "the plan's; place them for this plan")
            cache_homes = make_cache_homes(self.spec, self.policy.num_gpu_batches, self.sizes.kv_rows,
                                           self.plan.workload.cache_len, self.policy.torch_dtype, self.tiers,
                                           compress=self.policy.compress_cache,
                                           store_dtype=self.policy.store_torch_dtype,
                                           prompt_len=self.plan.workload.prompt_len)
            self.state = RunState(self.spec, self.policy.torch_dtype, self.tiers, weight_homes, cache_homes,
                                  self.sizes.kv_rows, self.sizes.act_rows, self.plan.workload.prompt_len,
                                  self.plan.sampling, kv_attn=self.sizes.kv_attn,
                                  compress_cache=self.policy.compress_cache,
                                  record_logits=self.options.record_logits,
                                  cache_dtype=self.policy.store_torch_dtype,
                                  scratch_bytes={buf: (tier, n) for buf, tier, n in scratch_homes(
                                      self.spec, self.plan.workload, self.policy, self.sizes)})
            if self.options.compile:
                from flexgraph.models.forward import compiled_kernels, warm_up
                t_compile = time.perf_counter()
                self.state.kernels = compiled_kernels()
                warm_up(self.state.kernels, self.spec, self.policy.torch_dtype, self.policy.gpu_batch_size,
                        self.plan.workload.prompt_len, self.tiers.torch_device(self.tiers.compute_tier))
                log.info("compiled", seconds=round(time.perf_counter() - t_compile, 1))
            lane_device = "cuda" if self.device == "cuda" else "cpu"
            # the maths get this thread's OpenMP thread count, the copies one thread each
            # (flexgraph.exec.openmp: more teams than cores make every kernel wait)
            threads = torch.get_num_threads()
            self.lanes = {name: Lane(name, lane_device, trace=True, threads=threads if name == COMPUTE else 1)
                          for name in LANES}
        except BaseException:
            self.close()
            raise
        log.info("executor_ready", seconds=round(time.perf_counter() - t0, 2), nodes=len(self.nodes),
                 offload_dir=str(self.tiers.run_dir) if self.tiers.run_dir else None)

    def close(self) -> None:
        """Stop the lanes and remove the offload files (idempotent; also after errors)."""
        if self._closed:
            return
        self._closed = True
        for lane in self.lanes.values():
            lane.stop()
        for lane in self.lanes.values():
            lane.join(timeout=30)
        self.state = None
        self.disk.close()
        self.tiers.cleanup()
        self.tiers.pool.clear()

    def __enter__(self) -> Executor:
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one block ---------------------------------------------------------------------------
    async def run_block(self, batches: list[BatchInputs], on_compute=None, feed: NodeFeed | None = None
                        ) -> BlockOutput:
        """Run the plan's path once for a block of ``num_gpu_batches`` batches.

        With ``feed``, nodes come from it instead, possibly while the block runs (their
        ``deps`` index the order in which they were fed); the block ends when the feed
        is closed and everything fed has finished.
        """
        assert self.state is not None, "call setup() first"
        with cores_to_the_compute_lane():       # this thread dispatches; the compute lane computes
            return await self._run_block(batches, on_compute, feed)

    async def _run_block(self, batches: list[BatchInputs], on_compute, feed: NodeFeed | None) -> BlockOutput:
        st = self.state
        st.new_block(batches)
        loop = asyncio.get_running_loop()
        source = feed if feed is not None else _iterate(self.nodes)
        dispatched: list[_Node] = []
        completions: list[Completion | None] = []
        current: dict[tuple, _Instance] = {}
        errors: list[BaseException] = []
        start = time.perf_counter()
        prefill_end = start

        def free(inst: _Instance) -> None:
            inst.freed = True
            st.drop(inst.key)
            if inst.bytes:
                self.memory.release(inst.bytes)

        def on_done(p: int, touched: list[_Instance], fut: asyncio.Future) -> None:
            nonlocal prefill_end
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            node = dispatched[p]
            if exc is not None:
                errors.append(exc)
            else:
                c = completions[p]
                self.part_seconds[node.part] = self.part_seconds.get(node.part, 0.0) + (c.end - c.start)
                if node.kind == COMPUTE:
                    if node.i == 0:
                        prefill_end = max(prefill_end, c.end)
                    if on_compute is not None:
                        on_compute(node)
            for inst in touched:
                inst.pending -= 1
                if inst.pending == 0 and inst.final and not inst.freed:
                    free(inst)

        p = -1
        async for node in source:
            p += 1
            dispatched.append(node)
            completions.append(None)
            if errors:
                break
            if node.request:
                await self.memory.acquire(node.request)
            touched: list[_Instance] = []
            keys: dict[tuple, tuple] = {}
            for buf in node.uses:
                inst = current[buf]
                inst.pending += 1
                touched.append(inst)
                keys[buf] = inst.key
            made: dict[tuple, _Instance] = {}
            for buf, tier, nbytes in node.allocs:
                inst = made.get(buf)
                if inst is None:
                    inst = made[buf] = _Instance((buf, p))
                    inst.pending += 1
                    touched.append(inst)
                    current[buf] = inst
                    keys[buf] = inst.key
                if nbytes:
                    inst.bytes[tier] = inst.bytes.get(tier, 0) + nbytes
            for buf in node.releases:
                inst = current.get(buf)
                if inst is None:
                    continue
                if inst not in touched:
                    inst.pending += 1
                    touched.append(inst)
                inst.final = True
            deps = [completions[q] for q in node.deps]
            if not self.options.overlap and p:
                deps.append(completions[p - 1])
            fn = partial(_run_node, RUNNERS[node.kind], st, node.i, node.j, node.k, keys)
            c = self.lanes[node.kind].submit(fn, deps, node.label, loop)
            completions[p] = c
            c.future.add_done_callback(partial(on_done, p, touched))
        submitted = [c.future for c in completions if c is not None]
        await asyncio.gather(*submitted, return_exceptions=True)
        for inst in current.values():      # what nobody needed after the last step
            if not inst.freed:
                free(inst)
        if errors:
            raise _root_cause(errors)
        for node in dispatched:
            for src, dst, nbytes in node.moves:
                self.moved[(src, dst)] = self.moved.get((src, dst), 0) + nbytes
        ids = [torch.stack(out, dim=1) if out else torch.empty(0, 0, dtype=torch.long) for out in st.outputs]
        logits = [torch.stack(lg, dim=1) for lg in st.logits] if st.record_logits else None
        return BlockOutput(ids, BlockTiming(start, prefill_end, time.perf_counter()), logits)

    # ---- statistics -----------------------------------------------------------------------------
    def lane_busy(self) -> dict[str, float]:
        return {name: lane.statistics().busy_seconds for name, lane in self.lanes.items()}

    def spans(self) -> dict[str, list[tuple[float, float, str]]]:
        return {name: list(lane.spans or []) for name, lane in self.lanes.items()}


class NodeFeed:
    """Nodes for a running block, supplied over time (temporal fusion grows the path
    while it runs).  ``put`` appends; ``close`` says no more will come."""

    def __init__(self):
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, nodes: list[_Node]) -> None:
        for node in nodes:
            self._queue.put_nowait(node)

    def close(self) -> None:
        self._queue.put_nowait(None)

    def __aiter__(self):
        return self

    async def __anext__(self) -> _Node:
        node = await self._queue.get()
        if node is None:
            raise StopAsyncIteration
        return node


async def _iterate(nodes: list[_Node]):
    for node in nodes:
        yield node


def _run_node(fn, st, i, j, k, keys):
    with torch.inference_mode():
        return fn(st, i, j, k, keys)


def _root_cause(errors: list[BaseException]) -> BaseException:
    for e in errors:
        if isinstance(e, (LaneStopped, asyncio.CancelledError)):
            continue
        if isinstance(e, FlexgraphError):
            return e
        log.error("node_failed", exc_info=e)     # a bug: keep the traceback in the log
        return ExecutionError(f"execution failed: {type(e).__name__}: {e}")
    return ExecutionError("execution stopped")
