"""Policy search: the batch shape, schedule and placement with the best estimated throughput.

For each batch shape (GPU batch size x number of GPU batches, powers of two) and storage
dtype (:func:`~flexgraph.plan.planner.storage_choices`: float32 or bfloat16 where the CPU
computes in float32) the
placement fractions come from FlexGen's linear program (paper section 4.3), solved with
scipy's HiGHS: variables are the fractions of weights, KV cache and activations on each
tier; each lane's time per layer (the weight loads of a column, the cache loads and
stores and activation moves of its ``num_gpu_batches`` squares, the computes) is linear
in them, as is the disk's (reads and writes share it); a step takes as long as its
busiest lane; the objective is prefill plus ``gen_len - 1`` decode steps; capacities
bound the homes plus a working-set allowance per tier.

The LP ranks batch shapes cheaply.  The best few, with their fractions rounded to whole
percent, are then built, checked against the four rules and timed by the graph cost
model (:mod:`flexgraph.plan.cost`) on a copy of the model with two and three blocks,
extrapolated to the full depth (every block costs the same).  The best valid one wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from flexgraph.errors import PlanError, RuleViolation
from flexgraph.graph.builder import Workload, make_sizes, static_homes
from flexgraph.log import get_logger
from flexgraph.models.spec import ATTN, ModelSpec
from flexgraph.plan.cost import CostModel, Estimate, simulate
from flexgraph.plan.policy import TIERS, Policy, Split, placed_weight_bytes
from flexgraph.plan.planner import (Knobs, capacities, default_dtype, plan_for_policy, policy_flags, runs_tight,
                                    storage_choices, weights_read_in_place, working_set)

log = get_logger(__name__)
MAX_GPU_BATCH = 1024
MAX_GPU_BATCHES = 32
FULL_CHECKS = 6


@dataclass
class Candidate:
    policy: Policy
    lp_seconds: float                 # the LP's estimate of one block
    estimate: Estimate | None = None  # the graph cost model's, once evaluated
    error: str | None = None

    def throughput(self, workload: Workload) -> float:
        if self.estimate is None:
            return 0.0
        blocks = math.ceil(workload.num_prompts / self.policy.block_size)
        return workload.num_prompts * workload.gen_len / (blocks * self.estimate.block_seconds)


def _pow2_upto(n: int) -> list[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def batch_shapes(workload: Workload, knobs: Knobs) -> list[tuple[int, int]]:
    gbs_options = [knobs.gpu_batch_size] if knobs.gpu_batch_size else _pow2_upto(min(workload.num_prompts,
                                                                                      MAX_GPU_BATCH))
    shapes = []
    for gbs in gbs_options:
        ngbs = [knobs.num_gpu_batches] if knobs.num_gpu_batches else [
            n for n in _pow2_upto(MAX_GPU_BATCHES) if gbs * n <= max(workload.num_prompts, gbs)]
        shapes += [(gbs, n) for n in ngbs]
    return shapes


def lp_placement(spec: ModelSpec, workload: Workload, base: Policy, has_gpu: bool, cap: dict,
                 model: CostModel, allowance: dict[str, int],
                 weights_in_place: bool = False) -> tuple[tuple[Split, Split, Split], float] | None:
    """FlexGen's LP for one batch shape: (weights, cache, activations) splits and seconds per
    block.  ``weights_in_place``: weights on disk are the store's files and take no room."""
    from scipy.optimize import linprog

    ct = "gpu" if has_gpu else "cpu"
    tiers = [t for t in TIERS if t != "gpu" or has_gpu]
    kinds = ("w", "c", "a")
    idx = {(kd, t): n for n, (kd, t) in enumerate((kd, t) for kd in kinds for t in tiers)}
    nv = len(idx) + 2                        # + T_prefill, T_decode (per layer-column)
    t_pre, t_dec = len(idx), len(idx) + 1
    gbs, ngb, e = base.gpu_batch_size, base.num_gpu_batches, base.itemsize
    P, G = workload.prompt_len, workload.gen_len
    L = spec.num_layers
    n_attn = spec.num_blocks
    w_total = placed_weight_bytes(spec, e, base.compress_weight, base.store_itemsize)   # as the homes are placed
    w_layer = w_total / L                                                # average weight bytes per layer
    sz = make_sizes(spec, replace(base, weights=Split(0, 100), cache=Split(0, 100), activations=Split(0, 100)),
                    has_gpu)
    kv_token = sz.rows_kv * sz.kv_row_token_bytes                        # per attention layer, per batch
    hid = gbs * spec.hidden_size * e
    weight_loads_per_column = ngb if base.schedule == "row" else 1
    attn_at = "cpu" if base.cpu_cache_compute and has_gpu else ct    # where off-compute cache rows are attended

    def bw(src, dst):
        return model.cal.bw(src, dst)

    A, b = [], []
    # Ties: when compute bounds every step, any placement is equally fast; prefer the one
    # that moves the fewest bytes (less contention, less wear, more headroom).
    io_cost = np.zeros(nv)

    def lane(phase_var: int, coeffs: dict[int, float], const: float) -> None:
        """T_phase >= const + sum(coeffs * x)  ->  sum(coeffs * x) - T_phase <= -const."""
        row = np.zeros(nv)
        for v, c in coeffs.items():
            row[v] += c
            io_cost[v] += c * (1 if phase_var == t_pre else G - 1)
        row[phase_var] = -1.0
        A.append(row)
        b.append(-const)

    for phase, new, ctx in ((t_pre, P, P), (t_dec, 1, P + G // 2)):
        compute = sum(model.compute_time(j, gbs, new, ctx) for j in range(L)) / L * ngb
        lane(phase, {}, compute)
        weights, cache_in, cache_out, act, disk = {}, {}, {}, {}, {}
        for t in tiers:
            if t == ct:
                continue
            wv, cv, av = idx[("w", t)], idx[("c", t)], idx[("a", t)]
            weights[wv] = weight_loads_per_column * w_layer / bw(t, ct)
            prefix = (ctx - new) * kv_token * ngb * n_attn / L
            if attn_at != t:         # cache rows homed on t are loaded to where they are attended
                cache_in[cv] = prefix / bw(t, attn_at)
                cache_out[cv] = new * kv_token * ngb * n_attn / L / bw(attn_at, t)
            else:
                cache_in[cv] = cache_out[cv] = 0.0
            act[av] = 2 * new * hid * ngb / bw(t, ct)
            if t == "disk":
                disk = {wv: weights[wv], cv: cache_in[cv] + cache_out[cv], av: act[av]}
        for coeffs in (weights, cache_in, cache_out, act, disk):
            if coeffs:
                lane(phase, coeffs, 0.0)
    # capacities: homes are linear in the fractions; the working set is an allowance
    c_total = n_attn * ngb * workload.cache_len * kv_token
    for t in tiers:
        if cap[t] is None:
            continue
        row = np.zeros(nv)
        row[idx[("w", t)]] = 0 if weights_in_place and t == "disk" else w_total
        row[idx[("c", t)]] = c_total
        A.append(row)
        b.append(cap[t] - allowance.get(t, 0))
    A_eq, b_eq = [], []
    for kd in kinds:
        row = np.zeros(nv)
        for t in tiers:
            row[idx[(kd, t)]] = 1.0
        A_eq.append(row)
        b_eq.append(1.0)
    c = 1e-3 * io_cost
    c[t_pre] = L
    c[t_dec] = L * (G - 1)
    res = linprog(c, A_ub=np.array(A), b_ub=np.array(b), A_eq=np.array(A_eq), b_eq=np.array(b_eq),
                  bounds=[(0, 1)] * len(idx) + [(0, None)] * 2, method="highs")
    if res.status != 0:
        return None
    x = res.x
    seconds = L * (x[t_pre] + (G - 1) * x[t_dec])

    def split(kd: str) -> Split:
        pct = {t: (x[idx[(kd, t)]] * 100 if t in tiers else 0.0) for t in TIERS}
        g = round(pct["gpu"])
        return Split(g, min(100 - g, round(pct["cpu"])))

    return (split("w"), split("c"), split("a")), float(seconds)


def _estimate(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu: bool, cap: dict,
              model: CostModel, prefetch: bool, overlap: bool) -> Estimate:
    """Graph cost model on 2- and 3-block copies, extrapolated to the model's depth."""
    times = []
    for blocks in (2, 3):
        small = replace(spec, num_blocks=min(spec.num_blocks, blocks))
        graph, checked = plan_for_policy(small, workload, policy, has_gpu, dict.fromkeys(TIERS, 1 << 62),
                                         prefetch)
        times.append(simulate(graph, checked, model.for_spec(small), overlap))
        if spec.num_blocks <= blocks:
            return times[-1]
    a, b = times
    extra = spec.num_blocks - 3
    per = lambda x, y: y + extra * (y - x)   # noqa: E731  (linear in depth)
    busy = {k: per(a.lane_busy.get(k, 0.0), v) for k, v in b.lane_busy.items()}
    parts = {k: per(a.parts.get(k, 0.0), v) for k, v in b.parts.items()}
    return Estimate(per(a.block_seconds, b.block_seconds), per(a.prefill_seconds, b.prefill_seconds),
                    per(a.decode_seconds, b.decode_seconds), busy, 1, parts)


def _rough_allowance(spec: ModelSpec, workload: Workload, base: Policy, has_gpu: bool) -> dict[str, int]:
    """Working set on the compute tier, roughly: two layers of weights in flight and the
    prefill activations of every GPU batch (the real one is measured for the finalists)."""
    e = base.itemsize
    biggest = max(sum(w.numel for w in spec.layer_weights(j)) for j in range(spec.num_layers)) * base.store_itemsize
    acts = 2 * base.block_size * workload.prompt_len * spec.hidden_size * e
    return {"gpu" if has_gpu else "cpu": 2 * biggest + acts}


def search_policy(spec: ModelSpec, workload: Workload, hardware: dict, knobs: Knobs, model: CostModel,
                  top: int = 5, overlap: bool = True) -> list[Candidate]:
    """Candidates best first; the first is the choice.  Raises PlanError if none fits."""
    cap = capacities(hardware)
    has_gpu = cap["gpu"] is not None
    dtype = knobs.dtype or default_dtype(hardware.get("device", "cpu"))
    off = Split(0, 100) if has_gpu else Split(0, 0)
    storages = writable_storage_choices(hardware, knobs, dtype)
    ranked: list[tuple[float, Policy]] = []
    for gbs, ngb in batch_shapes(workload, knobs):
        for schedule in ([knobs.schedule] if knobs.schedule else ["zigzag"] if ngb > 1 else ["row"]):
            for storage in storages:
                base = Policy(gbs, ngb, off, off, off, schedule=schedule, dtype=dtype,
                              **{**policy_flags(knobs), "storage_dtype": storage})
                if knobs.percent is not None:
                    ranked.append((0.0, base))
                    continue
                # first pass: a rough working-set allowance, just to rank the batch shapes
                solved = lp_placement(spec, workload, base, has_gpu, cap, model.for_policy(base),
                                      _rough_allowance(spec, workload, base, has_gpu),
                                      weights_read_in_place(hardware, base))
                if solved is not None:
                    blocks = math.ceil(workload.num_prompts / base.block_size)
                    ranked.append((solved[1] * blocks, base))
    ranked.sort(key=lambda x: x[0])
    evaluated: list[Candidate] = []
    for _rough, base in ranked[:max(top, FULL_CHECKS)]:
        in_place = weights_read_in_place(hardware, base)     # the same for every placement of base
        if knobs.percent is not None:
            p = knobs.percent
            cand = Candidate(replace(base, weights=Split(p[0], p[1]), cache=Split(p[2], p[3]),
                                     activations=Split(p[4], p[5])), 0.0)
        else:
            # second pass: the measured working set of this shape
            allowance = working_set(spec, workload, base, has_gpu, knobs.prefetch)
            solved = lp_placement(spec, workload, base, has_gpu, cap, model.for_policy(base), allowance, in_place)
            if solved is None:
                continue
            (w, c, a), seconds = solved
            if knobs.weights is not None:
                w = knobs.weights
            cand = Candidate(replace(base, weights=w, cache=c, activations=a), seconds)
        try:
            if knobs.percent is None and knobs.weights is None:
                cand.policy = _fit_weights(spec, workload, cand.policy, has_gpu, cap, knobs.prefetch, in_place)
            host_peak, host_home = _check_fits(spec, workload, cand.policy, has_gpu, cap, knobs.prefetch, in_place)
            tight = runs_tight(host_peak, host_home, cap)
            cand.estimate = _estimate(spec, workload, cand.policy, has_gpu, cap,
                                      model.for_policy(cand.policy, tight), knobs.prefetch, overlap)
        except RuleViolation as e:
            cand.error = str(e)
        evaluated.append(cand)
    valid = sorted((c for c in evaluated if c.error is None), key=lambda c: -c.throughput(workload))
    if not valid:
        why = next((c.error for c in evaluated if c.error), "no batch shape has a feasible placement")
        raise PlanError(f"no policy fits this machine ({why}); give more --cpu-mem/--disk-mem or lower "
                        "--prompt-len")
    return valid[:top]


def writable_storage_choices(hardware: dict, knobs: Knobs, dtype: str) -> list[str | None]:
    """The storage dtypes to weigh, less those whose store cannot be written here
    (``hardware["unwritable_stores"]``, dtype -> why: a dummy's store is generated in the
    dtype the plan keeps, and OPT-6.7B's float32 one, 27 GB, does not fit a disk with
    18 GB free).  PlanError when none is left."""
    unwritable = hardware.get("unwritable_stores") or {}
    wanted = storage_choices(knobs, dtype)
    choices = [s for s in wanted if (s or dtype) not in unwritable]
    if not choices:
        from flexgraph.weights.dummy import room_advice
        blocked = [s or dtype for s in wanted]
        raise PlanError(f"{'; '.join(unwritable[d] for d in blocked)}: {room_advice(blocked)}")
    return choices


def choose_by_search(spec: ModelSpec, workload: Workload, hardware: dict, knobs: Knobs, model: CostModel):
    """The best candidate that passes the full check: (policy, graph, checked, notes, candidates)."""
    candidates = search_policy(spec, workload, hardware, knobs, model)
    cap = capacities(hardware)
    last: RuleViolation | None = None
    for cand in candidates:
        try:
            graph, checked = plan_for_policy(spec, workload, cand.policy, cap["gpu"] is not None, cap,
                                             knobs.prefetch, weights_in_place=weights_read_in_place(hardware,
                                                                                                    cand.policy))
        except RuleViolation as e:
            cand.error, last = str(e), e
            continue
        notes = [f"searched {len(candidates)} finalists by estimated throughput (cost model + FlexGen's LP "
                 "for placement)"]
        notes += [f"{d} storage not weighed: {why}" for d, why in (hardware.get("unwritable_stores") or {}).items()]
        return cand.policy, graph, checked, notes, candidates
    raise PlanError(f"no searched policy passes the full check ({last}); give more memory or set the "
                    "policy by hand")


def _needs(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu: bool, prefetch: bool,
           in_place: bool, homes: dict[str, int] | None = None) -> dict[str, int]:
    """Per tier, the bytes its homes (``homes``, where already known) and working set take."""
    if homes is None:
        homes = _home_bytes(spec, workload, policy, has_gpu, in_place)
    work = working_set(spec, workload, policy, has_gpu, prefetch)
    return {t: homes[t] + work[t] for t in TIERS}


def _overshoot(needs: dict[str, int], cap: dict) -> tuple[str, int, int] | None:
    """The first tier whose homes plus working set exceed its capacity: (tier, needed, over)."""
    for t in TIERS:
        need = needs[t]
        if need and (cap[t] is None or need > cap[t]):
            return t, need, need - (cap[t] or 0)
    return None


def _check_fits(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu: bool, cap: dict,
                prefetch: bool, in_place: bool) -> tuple[int, int]:
    """Raise where a tier cannot hold the plan; else the host memory it needs, and how much
    of that its homes take."""
    homes = _home_bytes(spec, workload, policy, has_gpu, in_place)
    needs = _needs(spec, workload, policy, has_gpu, prefetch, in_place, homes)
    over = _overshoot(needs, cap)
    if over is not None:
        t, need, _ = over
        raise RuleViolation(4, "the plan", f"needs {need} bytes on {t}", tier=t, needed=need, capacity=cap[t])
    return needs["cpu"], homes["cpu"]


def _fit_weights(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu: bool, cap: dict,
                 prefetch: bool, in_place: bool) -> Policy:
    """The LP's fractions are continuous and its working set an allowance; weights are placed
    a whole layer at a time and rounded to percent.  Where that overshoots a tier, move
    weights one tier down (gpu -> cpu -> disk) by the overshoot, a few times at most."""
    layer_bytes = placed_weight_bytes(spec, policy.itemsize, policy.compress_weight, policy.store_itemsize)
    for _ in range(8):
        over = _overshoot(_needs(spec, workload, policy, has_gpu, prefetch, in_place), cap)
        if over is None or over[0] == "disk":
            return policy
        t, _need, excess = over
        w = policy.weights
        share = w.gpu if t == "gpu" else w.cpu
        step = min(share, max(1, math.ceil(100 * excess / layer_bytes)))
        if step == 0:
            return policy            # no weights left to move: the check says why
        moved = Split(w.gpu - step, w.cpu + step) if t == "gpu" else Split(w.gpu, w.cpu - step)
        policy = replace(policy, weights=moved)
    return policy


def _home_bytes(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu: bool, in_place: bool) -> dict[str, int]:
    used = dict.fromkeys(TIERS, 0)
    for _buf, tier, nbytes in static_homes(spec, workload, policy, make_sizes(spec, policy, has_gpu),
                                           weights_in_place=in_place):
        used[tier] += nbytes
    return used


__all__ = ["Candidate", "search_policy", "lp_placement", "batch_shapes", "ATTN"]
