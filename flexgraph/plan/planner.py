"""The planner: knobs the user gave + a rule for the rest -> a checked Plan.

``make_plan`` fills in what the user left out (see :func:`choose_policy`), builds the
task graph, lays the traversal path, checks it against the four rules, and returns a
:class:`~flexgraph.plan.planfile.Plan`.  A plan that breaks a rule is never returned.

The automatic rule (until the cost-model search replaces it) is simple and stated in
every plan's ``chosen.notes``:

1. GPU batch size ``min(num_prompts, 32)``; number of GPU batches
   ``min(ceil(num_prompts / gpu_batch_size), 8)``; zig-zag when there is more than one
   GPU batch, else row (the two coincide then).
2. Placement fills the fastest tiers first: activations, then KV cache, then weights
   (small and hot data first).  Each kind's share of the compute tier, then of the cpu
   tier, is lowered in steps of 10% until the plan fits every tier.  A candidate is
   screened by its static homes plus its working set (measured on a two-block copy of
   the model, or bounded by the copy with nothing homed on the compute tier), then
   checked in full.
3. If nothing fits, the GPU batch size is halved (unless the user fixed it) and the
   search repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import networkx as nx

from flexgraph.errors import PlanError, RuleViolation
from flexgraph.graph.builder import Workload, build_graph, make_sizes, static_homes
from flexgraph.models.sampling import SamplingParams
from flexgraph.models.spec import ATTN, MLP, ModelSpec
from flexgraph.plan.checker import CheckedPath, check_path
from flexgraph.plan.planfile import Plan
from flexgraph.plan.policy import TIERS, Policy, Split, policy_weight_placement
from flexgraph.plan.traversal import make_path
from flexgraph.sizes import format_size

MAX_FULL_CHECKS = 8
# The executor's own host memory per path node: the rebuilt graph, the checked path and
# its per-node dispatch state (measured: ~3.5 KB for graph and path, ~1.5 KB to run).
EXEC_BYTES_PER_NODE = 6 << 10
BLOCK_KINDS = (ATTN, MLP)          # the layers a block repeats (embedding and head come once)
MAX_EXACT_WORKING_SETS = 40


@dataclass(frozen=True)
class Knobs:
    """What the user asked for; ``None`` means "choose for me"."""
    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    percent: tuple[float, float, float, float, float, float] | None = None
    schedule: str | None = None
    dtype: str | None = None
    compress_weight: bool = False
    compress_cache: bool = False
    cpu_cache_compute: bool = False
    prefetch: bool = True
    weights: Split | None = None      # fix only the weights' split (weights already placed)
    storage_dtype: str | None = None  # weights' matrices and KV cache as kept (None: the search's or dtype)


def capacities(hardware: dict) -> dict[str, int | None]:
    return {"gpu": hardware.get("gpu_mem"), "cpu": hardware.get("cpu_mem"), "disk": hardware.get("disk_mem")}


def weights_read_in_place(hardware: dict, policy: Policy) -> bool:
    """Whether the run reads its disk-homed weights from the weight store in place, so that
    they take no room in ``--offload-dir`` (whose free space is the disk tier's capacity):
    they are kept uncompressed, in the dtype the store holds them in (``weights_in_place``
    in the hardware, from :func:`flexgraph.weights.resolve.in_place_dtype`)."""
    kept = hardware.get("weights_in_place")
    return bool(kept) and not policy.compress_weight and kept in ("*", policy.storage_dtype or policy.dtype)


def runs_tight(host_peak: int, host_home: int, cap: dict) -> bool:
    """Whether ``flexgraph execute`` runs a plan peaking at ``host_peak`` bytes of host
    memory, ``host_home`` of them its static homes, with the tight-cap allocator (no huge
    pages, a fixed mmap threshold), which makes its layer maths slower: the cost model
    must time it so."""
    from flexgraph.hugepages import roomy
    return not roomy(host_peak, host_home, cap["cpu"])


def may_use_disk(spec: ModelSpec, workload: Workload, hardware: dict, knobs: Knobs, itemsize: int) -> bool:
    """Whether a plan for this could keep anything on disk: ``--percent`` leaves some
    there, or (searched) the weights and the whole workload's KV cache do not fit the
    memory tiers.  A plan that cannot reach the disk needs no fresh disk rates."""
    if knobs.percent is not None:
        return any(Split(*knobs.percent[i:i + 2]).disk > 0 for i in (0, 2, 4))
    memory = sum(hardware.get(tier) or 0 for tier in ("gpu_mem", "cpu_mem"))
    tokens = workload.num_prompts * (workload.prompt_len + workload.gen_len)
    cache = spec.num_blocks * spec.kv_bytes_per_token(itemsize) * tokens
    return spec.num_parameters() * itemsize + cache > memory


def default_dtype(device: str, recalibrate: bool = False) -> str:
    """float16 on CUDA; on a CPU whichever of bfloat16 and float32 it multiplies well
    (measured once per machine: bfloat16 ran ~5x faster than float32 with AMX,
    0.14-0.16x on a CPU without native bfloat16)."""
    if device == "cuda":
        return "float16"
    from flexgraph.calibrate import cpu_dtype_choice
    return cpu_dtype_choice(recalibrate).dtype


def storage_choices(knobs: Knobs, dtype: str) -> list[str | None]:
    """Storage dtypes the search weighs (None: as computed).  Where a CPU computes in
    float32 (it multiplies bfloat16 slowly), keeping weights and cache in bfloat16 halves
    every byte stored and moved for a conversion at each use; the cost model decides."""
    if knobs.storage_dtype is not None:
        return [knobs.storage_dtype]
    return [None, "bfloat16"] if dtype == "float32" else [None]


def stored_dtypes(knobs: Knobs, hardware: dict) -> list[str]:
    """The dtypes the search may keep the weights in: its storage choices, "as computed"
    named."""
    dtype = knobs.dtype or default_dtype(hardware.get("device", "cpu"))
    return [s or dtype for s in storage_choices(knobs, dtype)]


def dtype_notes(knobs: Knobs, device: str) -> list[str]:
    """Why the plan computes in its dtype, when the user left it out (``chosen.notes``)."""
    if knobs.dtype is not None:
        return []
    if device == "cuda":
        return ["dtype float16 (the CUDA default; --dtype to choose)"]
    from flexgraph.calibrate import cpu_dtype_choice
    return [cpu_dtype_choice().note()]


def flag_notes(knobs: Knobs, has_gpu: bool) -> list[str]:
    """What the compression / attention flags mean for this plan (stated in ``chosen.notes``)."""
    notes = []
    if knobs.compress_weight:
        notes.append("weights: 4-bit group-wise (group 64 along output channels) on every tier, decoded "
                     "in the compute; sizes are the compressed ones")
    if knobs.compress_cache:
        notes.append("KV cache: 4-bit group-wise (group 64 along the head dimension) on every tier; "
                     "each step's new entries are used in full precision, then quantised")
    if knobs.storage_dtype:
        notes.append(storage_note(knobs.storage_dtype))
    if knobs.cpu_cache_compute:
        notes.append("decode attention over the cache rows homed on cpu and disk runs on the cpu (the prefill's "
                     "on the gpu tier)" if has_gpu else
                     "--cpu-cache-compute has no effect without a gpu tier (attention already runs on the cpu)")
    return notes


def storage_note(storage_dtype: str) -> str:
    return (f"weight matrices and KV cache stored in {storage_dtype} on every tier, converted to the working "
            "dtype where they are used (--storage-dtype)")


def _splits(has_gpu: bool) -> list[Split]:
    """Splits of one kind of data, fastest first: compute-tier share down, then cpu share down."""
    out = []
    if has_gpu:
        for g in range(100, -1, -10):
            for c in range(100 - g, -1, -10):
                out.append(Split(g, c))
    else:
        out = [Split(0, c) for c in range(100, -1, -10)]
    return out


def _candidates(has_gpu: bool, weights: Split | None = None) -> Iterator[tuple[Split, Split, Split]]:
    """(weights, cache, activations), in the order of the rule: activations keep the fastest
    split longest, then the cache, and the weights give way first."""
    splits = _splits(has_gpu)
    for a in splits:
        for c in splits:
            for w in ([weights] if weights is not None else splits):
                yield w, c, a


class _HomeSizes:
    """Static home bytes per tier of each weight split and each cache split, computed once
    per batch shape so that ruling out a candidate costs a few additions."""

    def __init__(self, spec: ModelSpec, workload: Workload, base: Policy, has_gpu: bool, in_place: bool = False):
        self.spec, self.workload, self.base, self.has_gpu, self.in_place = spec, workload, base, has_gpu, in_place
        self._w: dict[Split, dict[str, int]] = {}
        self._c: dict[Split, dict[str, int]] = {}

    def _sum(self, policy: Policy, kind: str) -> dict[str, int]:
        used = dict.fromkeys(TIERS, 0)
        sz = make_sizes(self.spec, policy, self.has_gpu)
        for buf, tier, nbytes in static_homes(self.spec, self.workload, policy, sz, weights_in_place=self.in_place):
            if buf[0] == kind:
                used[tier] += nbytes
        return used

    def homes(self, w: Split, c: Split) -> dict[str, int]:
        if w not in self._w:
            self._w[w] = self._sum(replace(self.base, weights=w), "Wh")
        if c not in self._c:
            self._c[c] = self._sum(replace(self.base, cache=c), "Ch")
        return {t: self._w[w][t] + self._c[c][t] for t in TIERS}


def _fits(used: dict[str, int], cap: dict[str, int | None]) -> bool:
    return all(not used[t] or (cap[t] is not None and used[t] <= cap[t]) for t in TIERS)


def working_set(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu: bool,
                prefetch: bool = True) -> dict[str, int]:
    """Peak bytes per tier above the static homes — working buffers, activations in flight,
    workspace — measured by checking the same policy on a two-block copy of the model.

    Every block of a model has the same shape and a path only ever holds a window of
    adjacent layers, so the working set of the full model is that of the small copy —
    except the executor's bookkeeping, which grows with the path: that is counted for the
    full model's path (the small one's nodes plus a block's nodes per missing block).
    """
    small = replace(spec, num_blocks=min(spec.num_blocks, 2))
    _graph, checked = plan_for_policy(small, workload, policy, has_gpu, dict.fromkeys(TIERS, 1 << 62), prefetch)
    work = {t: checked.peak[t] - checked.home_bytes[t] for t in TIERS}
    block_nodes = sum(small.layer(j).kind in BLOCK_KINDS for _kind, _i, j, _k in checked.path) // small.num_blocks
    missing = (spec.num_blocks - small.num_blocks) * block_nodes
    work["cpu"] += EXEC_BYTES_PER_NODE * missing
    return work


def plan_for_policy(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu: bool,
                    cap: dict[str, int | None], prefetch: bool = True,
                    keep_timeline: bool = False, weights_in_place: bool = False) -> tuple[nx.DiGraph, CheckedPath]:
    """Build, lay and check the path of one policy; raises RuleViolation if it does not fit."""
    graph = build_graph(spec, workload, policy, has_gpu, weights_in_place=weights_in_place)
    path = make_path(graph, policy.schedule, prefetch=prefetch)
    return graph, check_path(graph, path, cap, keep_timeline=keep_timeline, host_bytes_per_node=EXEC_BYTES_PER_NODE)


def policy_flags(knobs: Knobs) -> dict[str, bool]:
    return {"compress_weight": knobs.compress_weight, "compress_cache": knobs.compress_cache,
            "cpu_cache_compute": knobs.cpu_cache_compute, "storage_dtype": knobs.storage_dtype}


def choose_policy(spec: ModelSpec, workload: Workload, hardware: dict, knobs: Knobs):
    """Fill in the knobs the user left out; returns (policy, graph, checked, notes)."""
    cap = capacities(hardware)
    has_gpu = cap["gpu"] is not None
    dtype = knobs.dtype or default_dtype(hardware.get("device", "cpu"))
    notes = []
    gbs = knobs.gpu_batch_size or min(workload.num_prompts, 32)
    last_error: RuleViolation | None = None
    full_checks = 0
    while True:
        ngb = knobs.num_gpu_batches or min(math.ceil(workload.num_prompts / gbs), 8)
        schedule = knobs.schedule or ("zigzag" if ngb > 1 else "row")
        base = Policy(gbs, ngb, Split(0, 100), Split(0, 100), Split(0, 100), schedule=schedule, dtype=dtype,
                      **policy_flags(knobs))
        if knobs.percent is not None:
            p = knobs.percent
            candidates = iter([(Split(p[0], p[1]), Split(p[2], p[3]), Split(p[4], p[5]))])
        else:
            candidates = _candidates(has_gpu, knobs.weights)
        in_place = weights_read_in_place(hardware, base)
        homes = _HomeSizes(spec, workload, base, has_gpu, in_place)
        # Working sets are largest when nothing is homed on the compute tier (every weight
        # and cache row needs a working copy there): that bound, per activation split,
        # admits a candidate without more ado; a candidate the bound rejects gets its
        # own working set measured (a few dozen times at most, then the bound decides).
        off = Split(0, 100) if has_gpu else Split(0, 0)
        bound: dict[Split, dict[str, int]] = {}
        exact_left = MAX_EXACT_WORKING_SETS
        for w, c, a in candidates:
            policy = replace(base, weights=w, cache=c, activations=a)
            if knobs.percent is None:
                home = homes.homes(w, c)
                if not _fits(home, cap):
                    continue
                if a not in bound:
                    bound[a] = working_set(spec, workload, replace(base, weights=off, cache=off, activations=a),
                                           has_gpu, knobs.prefetch)
                if not _fits({t: home[t] + bound[a][t] for t in TIERS}, cap):
                    if exact_left <= 0:
                        continue
                    exact_left -= 1
                    work = working_set(spec, workload, policy, has_gpu, knobs.prefetch)
                    if not _fits({t: home[t] + work[t] for t in TIERS}, cap):
                        continue
            try:
                graph, checked = plan_for_policy(spec, workload, policy, has_gpu, cap, knobs.prefetch,
                                                 weights_in_place=in_place)
            except RuleViolation as e:
                last_error = e
                full_checks += 1
                if knobs.percent is not None or full_checks >= MAX_FULL_CHECKS:
                    break
                continue
            if knobs.gpu_batch_size is None:
                notes.append(f"gpu batch size {gbs} = min(num_prompts, 32), halved until a placement fits")
            if knobs.num_gpu_batches is None:
                notes.append(f"{ngb} GPU batches = min(ceil(num_prompts / gpu batch size), 8)")
            if knobs.percent is None:
                notes.append("placement: fastest tiers first (activations, then cache, then weights), "
                             "lowered in 10% steps until every tier fits")
            return policy, graph, checked, notes
        if knobs.gpu_batch_size is not None or gbs == 1 or knobs.percent is not None:
            break
        gbs = max(1, gbs // 2)
    why = f" ({last_error})" if last_error else ""
    total = spec.num_parameters() * Policy(1, 1, Split(0, 100), Split(0, 100), Split(0, 100), dtype=dtype).itemsize
    raise PlanError(f"no policy fits this machine{why}; the weights alone are {format_size(total)} — give more "
                    "--cpu-mem/--disk-mem (or a larger --offload-dir disk), or lower --gpu-batch-size / --prompt-len")


def make_plan(model_ref, workload: Workload, sampling: SamplingParams, hardware: dict, knobs: Knobs,
              cost_model=None) -> Plan:
    """Plan a run; ``model_ref`` has ``spec`` and ``to_json()`` (see flexgraph.weights.resolve).

    With a ``cost_model`` (:class:`flexgraph.plan.cost.CostModel`), knobs left out are
    searched for the best estimated throughput and the plan carries its estimate;
    without one, the simple rule above fills them in.
    """
    from flexgraph.weights.resolve import in_place_dtype, unwritable_stores
    spec: ModelSpec = model_ref.spec
    hardware = {**hardware, "weights_in_place": in_place_dtype(model_ref)}
    complete = knobs.percent is not None and knobs.gpu_batch_size is not None and knobs.num_gpu_batches is not None
    candidates = []
    if cost_model is not None and not complete:
        from flexgraph.plan.search import choose_by_search
        unwritable = unwritable_stores(model_ref, stored_dtypes(knobs, hardware))
        if unwritable:          # only then: a plan does not depend on the free space it did not need
            hardware["unwritable_stores"] = unwritable
        policy, graph, checked, notes, candidates = choose_by_search(spec, workload, hardware, knobs, cost_model)
    else:
        policy, graph, checked, notes = choose_policy(spec, workload, hardware, knobs)
    has_gpu = hardware.get("gpu_mem") is not None
    sz = make_sizes(spec, policy, has_gpu)
    placement = policy_weight_placement(spec, policy)
    notes = notes + flag_notes(knobs, has_gpu) + dtype_notes(knobs, hardware.get("device", "cpu"))
    in_place = sum(b.get("disk", 0) for b in placement.bytes_per_tier) if weights_read_in_place(hardware, policy) else 0
    if in_place:
        notes.append(f"the {format_size(in_place)} of weights on disk are read in place from the weight store: "
                     "they take no room in --offload-dir")
    if policy.storage_dtype and not knobs.storage_dtype:
        notes.append(storage_note(policy.storage_dtype).replace("(--storage-dtype)", "(chosen by search; "
                                                                 "--storage-dtype to choose)"))
    estimate = {}
    if cost_model is not None:
        tight = runs_tight(checked.peak["cpu"], checked.home_bytes["cpu"], capacities(hardware))
        estimate = plan_estimate(graph, checked, cost_model.for_policy(policy, tight), workload, policy)
    chosen = {"by": "user" if complete else ("search" if candidates else "auto"), "notes": notes}
    if candidates:
        chosen["candidates"] = [{"policy": c.policy.to_json(), "estimated_throughput": c.throughput(workload),
                                 **({"rejected": c.error} if c.error else {})} for c in candidates]
    return Plan(
        model=model_ref.to_json(), spec=spec.to_dict(), workload=workload, sampling=sampling, hardware=hardware,
        policy=policy, path=checked.path, prefetch=knobs.prefetch,
        placement={"weights_achieved": placement.achieved(), "cache_rows": list(sz.kv_rows),
                   "act_rows": list(sz.act_rows), "compute_tier": sz.compute_tier},
        residency={"capacity": capacities(hardware), "home": checked.home_bytes, "peak": checked.peak},
        chosen=chosen, estimate=estimate,
    )


COMPILE_AFTER_SECONDS = 60.0
SLOW_FLOPS = 2e11       # a pessimistic CPU rate: compiling pays off if even then the run is long
COMPILE_MEMORY = 1 << 30  # the compiler's own peak (measured: 1.33 GiB cold, 0.63 GiB cached, with torch)


def should_compile(spec: ModelSpec, workload: Workload, dtype: str, cpu_mem: int | None = None) -> bool:
    """Compile the layer maths (torch.compile: fused element-wise chains) when the run is
    16-bit, long enough to repay about a minute of compiling, and host memory is not so
    tight that the compiler's gigabyte would crowd out the plan (``cpu_mem``)."""
    if dtype == "float32":
        return False                # the exact reference path stays eager
    if cpu_mem is not None and cpu_mem < 4 * COMPILE_MEMORY:
        return False
    per_seq = sum(spec.layer_flops(j, workload.prompt_len, workload.prompt_len) for j in range(spec.num_layers))
    per_seq += sum(spec.layer_flops(j, 1, workload.prompt_len + workload.gen_len // 2)
                   for j in range(spec.num_layers)) * (workload.gen_len - 1)
    return workload.num_prompts * per_seq / SLOW_FLOPS >= COMPILE_AFTER_SECONDS


def plan_estimate(graph: nx.DiGraph, checked: CheckedPath, cost_model, workload: Workload, policy: Policy) -> dict:
    """The cost model's timing of the full path, and the plan's roofline."""
    from flexgraph.plan.cost import roofline, simulate
    blocks = math.ceil(workload.num_prompts / policy.block_size)
    est = simulate(graph, checked, cost_model, blocks=blocks)
    roof = roofline(graph, checked, cost_model)
    n = blocks * policy.block_size
    return {
        "block_seconds": est.block_seconds, "prefill_seconds": est.prefill_seconds * blocks,
        "decode_seconds": est.decode_seconds * blocks, "total_seconds": est.total_seconds,
        "throughput": {"prefill": n * workload.prompt_len / (est.prefill_seconds * blocks),
                       "decode": n * (workload.gen_len - 1) / max(est.decode_seconds * blocks, 1e-12),
                       "total": n * workload.gen_len / est.total_seconds},
        "roofline": {"block_seconds": roof.seconds, "bound": roof.bound, "resources": roof.resources,
                     "throughput": n * workload.gen_len / (roof.seconds * blocks)},
        # about the most any plan of this workload reaches here: the prompts' products alone
        "prefill_ceiling": {"block_seconds": roof.prefill_compute,
                            "throughput": n * workload.gen_len / (roof.prefill_compute * blocks)
                            if roof.prefill_compute > 0 else None},
        "lane_busy": est.lane_busy,
        # seconds of node time per part of the run (graph.builder.part_of), all blocks:
        # what the executor's metrics report as "parts", to compare part by part
        "parts": {k: v * blocks for k, v in sorted(est.parts.items())},
    }


def replay_plan(plan: Plan, keep_timeline: bool = False) -> tuple[nx.DiGraph, CheckedPath]:
    """Rebuild a plan's graph and re-check its stored path (the executor and the renderer
    work from this; a plan edited into breaking a rule is rejected here)."""
    spec = ModelSpec.from_hf_config(plan.model["config"], name=plan.model.get("name"))
    cap = capacities(plan.hardware)
    graph = build_graph(spec, plan.workload, plan.policy, cap["gpu"] is not None,
                        weights_in_place=weights_read_in_place(plan.hardware, plan.policy))
    return graph, check_path(graph, plan.path, cap, keep_timeline=keep_timeline,
                             host_bytes_per_node=EXEC_BYTES_PER_NODE)
