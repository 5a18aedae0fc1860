"""The cost model: how long a plan takes, derived from its graph and this machine's rates.

Every node gets a duration from what the builder says it does:

- a load or store: for each move, ``bytes / bandwidth(src -> dst)``;
- a compute: its matrix products at the calibrated ``rate(M, K, N)`` for their shapes,
  but never faster than reading the weights from memory (``weight bytes / memory
  bandwidth`` — what bounds decode); attention at the calibrated prefill rate, or, for a
  decode step, the bytes of keys and values read at memory bandwidth; element-wise work
  (norms, RoPE, activations, residuals, sampling) as bytes at memory bandwidth;
- plus, where the compute decodes 4-bit weights or cache or converts them from a narrower
  storage dtype, that work at its calibrated rate;
- plus the executor's per-node overhead.

The path is then *replayed* like the executor runs it: each node starts when its lane
is free and its dependencies have finished (or, with overlap off, when the previous node
finished); nodes that read or write the disk also wait for the disk, which all lanes
share.  The result has FlexGen's terms — prefill and decode time per block, reads
and writes per tier — but comes from the graph, not from per-model formulas.

:func:`roofline` is the physical limit of the same plan: the busiest resource (compute,
or the bytes over one link) at the calibrated rates with perfect overlap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx

from flexgraph.calibrate import SHORT_CONTEXT, TIMED_CONTEXT, Calibration, _interp, correction_key
from flexgraph.compress.quant import should_compress
from flexgraph.graph.builder import COMPUTE, part_of
from flexgraph.models.spec import ATTN, EMBED, HEAD, MLP, ModelSpec
from flexgraph.plan.checker import CheckedPath


@dataclass(frozen=True)
class Matmul:
    m: int
    k: int
    n: int

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


@dataclass
class LayerWork:
    matmuls: list[Matmul] = field(default_factory=list)
    attn_flops: float = 0.0          # prefill attention (scores and weighted sum)
    attn_q_rows: int = 1             # new tokens (the query length of the fused kernel)
    attn_bytes: int = 0              # decode attention: keys and values read
    elementwise_bytes: int = 0


def layer_work(spec: ModelSpec, j: int, batch: int, new: int, context: int, itemsize: int) -> LayerWork:
    """What one compute of layer ``j`` does for ``batch`` sequences of ``new`` tokens."""
    kind = spec.layer(j).kind
    h, m = spec.hidden_size, batch * new
    w = LayerWork()
    act = m * h * itemsize
    if kind == EMBED:
        if spec.word_embed_proj_dim:
            w.matmuls.append(Matmul(m, spec.embed_dim, h))
        w.elementwise_bytes = 3 * act
    elif kind == HEAD:
        if spec.word_embed_proj_dim:
            w.matmuls.append(Matmul(batch, h, spec.embed_dim))
        w.matmuls.append(Matmul(batch, spec.embed_dim, spec.vocab_size))
        w.elementwise_bytes = batch * (6 * h * 4 + 3 * spec.vocab_size * 4)
    elif kind == MLP:
        inter = spec.intermediate_size
        if spec.family == "llama":
            w.matmuls += [Matmul(m, h, inter), Matmul(m, h, inter), Matmul(m, inter, h)]
            w.elementwise_bytes = 8 * act + 3 * m * inter * itemsize + 4 * m * h * 4
        else:
            w.matmuls += [Matmul(m, h, inter), Matmul(m, inter, h)]
            w.elementwise_bytes = 8 * act + 2 * m * inter * itemsize
    else:
        w.matmuls += [Matmul(m, h, spec.q_size), Matmul(m, h, spec.kv_size), Matmul(m, h, spec.kv_size),
                      Matmul(m, spec.q_size, h)]
        rows = batch * spec.num_kv_heads
        g = spec.num_heads // spec.num_kv_heads
        q_rows = g * new
        if new == 1:
            # decode: reading K and V dominates; the products are tiny
            w.attn_bytes = 2 * rows * context * spec.head_dim * itemsize + rows * q_rows * context * 8
        else:
            w.attn_flops = 4.0 * rows * q_rows * context * spec.head_dim   # masked keys cost too
            w.attn_q_rows = new
        w.elementwise_bytes = 10 * act + 4 * m * h * 4 + 2 * m * (spec.q_size + spec.kv_size) * itemsize * 2
    return w


class CostModel:
    """Node durations for one model on one machine.

    ``corrections`` (from :func:`flexgraph.calibrate.measure_layers`) scale the analytic
    compute time of each layer kind by what running that kind's real maths measured —
    at decode batches and prefills of several sizes, a table per phase and kind
    (:func:`flexgraph.calibrate.correction_key`) — so element-wise chains, weights
    streamed from memory rather than cache, and the kernels' real efficiency are in the
    estimate.  A prefill's ratio is interpolated in log(tokens); a decode step takes the
    measured times, linear in the batch (:meth:`_timed_decode`).  ``tight_corrections``,
    where set, gives the ones measured under the allocator a CPU run under a tight cap
    computes with (no huge pages, glibc's mmap threshold fixed: its large intermediates
    are faulted in afresh every time); :meth:`for_policy` with ``tight`` uses them.
    """

    def __init__(self, spec: ModelSpec, cal: Calibration, itemsize: int,
                 corrections: dict[str, list[list[float]]] | None = None,
                 compress_weight: bool = False, compress_cache: bool = False, storage_dtype: str | None = None):
        self.spec, self.cal, self.itemsize = spec, cal, itemsize
        self.corrections = corrections or {}
        # 4-bit weights and cache are decoded on use, by every compute node that reads them;
        # so are weights and cache kept in a narrower storage dtype (converted)
        self.compress_weight, self.compress_cache = compress_weight, compress_cache
        self.storage_dtype = storage_dtype
        self.tight_corrections: Callable[[], dict[str, list[list[float]]]] | None = None
        self._compute_cache: dict[tuple, float] = {}
        self._root = self                # the model the search was given: its corrections are the plain ones
        self._variants: dict[tuple[str | None, bool], CostModel] = {(storage_dtype, False): self}

    def for_policy(self, policy, tight: bool = False) -> CostModel:
        """This model for a policy's storage dtype (the same calibration; compression is
        the model's own, fixed for a search), with the tight-run corrections if ``tight``
        and the model has them."""
        root = self._root
        tight = tight and root.tight_corrections is not None
        key = (policy.storage_dtype, tight)
        got = self._variants.get(key)
        if got is None:
            corrections = root.tight_corrections() if tight else root.corrections
            got = CostModel(self.spec, self.cal, self.itemsize, corrections, self.compress_weight,
                            self.compress_cache, policy.storage_dtype)
            got._root, got._variants = root, self._variants
            self._variants[key] = got
        return got

    def for_spec(self, spec: ModelSpec) -> CostModel:
        """This model for a copy of its model with fewer blocks (the search times 2- and
        3-block copies): layer ``j`` is the copy's, whose last layer is the head — by
        the full model's layers that index is an attention layer.  The layers' shapes are
        the same, so the calibration, corrections and timed layer kinds are shared."""
        if spec == self.spec:
            return self
        got = copy.copy(self)
        got.spec = spec
        return got

    def cast_time(self, j: int, batch: int, new: int, context: int) -> float:
        """Seconds one compute node of layer j spends converting what is kept in the
        storage dtype into the working dtype: every weight matrix but the embedding's
        (only its tokens' rows are), and the K and V it attends to."""
        if self.storage_dtype is None:
            return 0.0
        rate = self.cal.cast.get(self.storage_dtype, 0.0)
        if rate <= 0:
            return 0.0
        layer, e, t = self.spec.layer(j), self.itemsize, 0.0
        if not self.compress_weight and layer.kind != EMBED:
            t += sum(w.numel for w in self.spec.layer_weights(j) if should_compress(w.name, w.shape)) * e / rate
        if not self.compress_cache and layer.kind == ATTN:
            t += 2 * batch * self.spec.num_kv_heads * self.spec.head_dim * context * e / rate
        return t

    def decode_time(self, j: int, batch: int, new: int, context: int) -> float:
        """Seconds one compute node of layer j spends decoding 4-bit weights and cache (and
        encoding its new cache entries), each at its own calibrated rate."""
        cal = self.cal
        if cal.dequant <= 0 or not (self.compress_weight or self.compress_cache):
            return 0.0
        layer, e = self.spec.layer(j), self.itemsize
        t = 0.0
        if self.compress_weight and layer.kind != EMBED:     # an embedding decodes only the rows it needs
            t += sum(w.numel for w in self.spec.layer_weights(j) if should_compress(w.name, w.shape)) * e / cal.dequant
        if self.compress_cache and layer.kind == ATTN:
            per_token = 2 * batch * self.spec.num_kv_heads * self.spec.head_dim * e      # keys and values
            t += per_token * (context - new) / (cal.dequant_cache or cal.dequant)     # the cached prefix
            if cal.quant_cache > 0:
                t += per_token * new / cal.quant_cache                                  # this step's entries
        return t

    def analytic_time(self, j: int, batch: int, new: int, context: int) -> float:
        """The compute time from calibrated rates alone (before corrections)."""
        cal, e = self.cal, self.itemsize
        work = layer_work(self.spec, j, batch, new, context, e)
        t = 0.0
        for mm in work.matmuls:
            t += max(mm.flops / cal.matmul_rate(mm.m, mm.k, mm.n), mm.k * mm.n * e / cal.mem_bandwidth)
        if work.attn_flops:
            t += work.attn_flops / cal.attention_rate(work.attn_q_rows)
        t += (work.attn_bytes + work.elementwise_bytes) / cal.mem_bandwidth
        return t

    def matmul_shapes(self) -> set[tuple[int, int]]:
        """The (K, N) shapes this model's layers multiply by (to calibrate)."""
        shapes = set()
        for j in (0, 1, 2, self.spec.num_layers - 1):
            for mm in layer_work(self.spec, j, 1, 1, 1, self.itemsize).matmuls:
                shapes.add((mm.k, mm.n))
        return shapes

    def compute_time(self, j: int, batch: int, new: int, context: int) -> float:
        kind = self.spec.layer(j).kind
        key = (kind, batch, new, context)
        got = self._compute_cache.get(key)
        if got is not None:
            return got
        rows = 1 if kind == HEAD else new         # the head multiplies each sequence's last position only
        table = self.corrections.get(correction_key(kind, rows))
        largest = int(table[-1][0]) if table else 0       # tokens
        if table and rows == 1:
            t = self._timed_decode(j, batch, new, context, table)
        elif table and batch > 1 and batch * new > largest:
            # Beyond the largest point a layer was timed at, its measured time per sequence
            # (a layer's work is linear in the batch; runs of SmolLM2 prefill had the same
            # per-token rate at 32, 128 and 256 sequences): the matmul table's rates at sizes
            # no layer was timed at are noisy (one shape read 89 GFLOP/s at M 1024 and 133
            # at 16384 here) and made 256 sequences cheaper per sequence than 16.
            ref = max(1, largest // new)
            t = self.analytic_time(j, ref, new, context) * _interp(table, ref * new) * batch / ref
        else:
            t = self.analytic_time(j, batch, new, context)
            if table:
                t *= _interp(table, batch * new)
        t += self.decode_time(j, batch, new, context) + self.cast_time(j, batch, new, context)
        self._compute_cache[key] = t
        return t

    def _timed_decode(self, j: int, batch: int, new: int, context: int, table: list[list[float]]) -> float:
        """A decode step (or the head) of ``batch`` sequences: the times measured at the
        timed batches, linear in the batch between them (a step reads the weights once
        and does per-sequence work, so its time is affine in the batch) and per sequence
        beyond the largest; scaled to ``context`` by the analytic time at this batch —
        except attention, where the calibration timed a second context
        (``SHORT_CONTEXT``): affine in the context through the two.

        Not the analytic time times an interpolated ratio: at a few rows the matmul
        table's rates are noisy (a 576 x 1536 product read 24 GFLOP/s at M 4 in one
        calibration, 44 in a re-timing), so the analytic time is not even monotone in the
        batch (SmolLM2's MLP: 0.77 ms at 4 sequences, 0.69 at 8), and a ratio measured at
        1 and 16 sequences put 4 sequences' decode at 1.6-3x its measured time."""
        short = None
        if self.spec.layer(j).kind == ATTN:
            short = self.corrections.get(correction_key(ATTN, 1, SHORT_CONTEXT))
        if short is None:           # a kind that does not read the cache, or an older calibration
            return (self._timed_batch(j, batch, table, TIMED_CONTEXT) * self.analytic_time(j, batch, new, context)
                    / self.analytic_time(j, batch, 1, TIMED_CONTEXT))
        # attention: affine in the context through the times measured at both contexts
        # (the cache part grows with it at its own measured cost), scaled below the short one
        t_short = self._timed_batch(j, batch, short, SHORT_CONTEXT)
        if context <= SHORT_CONTEXT:
            return t_short * self.analytic_time(j, batch, new, context) / self.analytic_time(j, batch, 1, SHORT_CONTEXT)
        t_long = self._timed_batch(j, batch, table, TIMED_CONTEXT)
        return t_short + (context - SHORT_CONTEXT) / (TIMED_CONTEXT - SHORT_CONTEXT) * (t_long - t_short)

    def _timed_batch(self, j: int, batch: int, table: list[list[float]], context: int) -> float:
        """``batch`` sequences' step at ``context`` from a table timed there: the times at
        its batches, linear between them, per sequence beyond the largest."""
        times = [(b, r * self.analytic_time(j, int(b), 1, context)) for b, r in table]
        (b0, t0), (b_last, t_last) = times[0], times[-1]
        if batch >= b_last:
            return t_last * batch / b_last
        if batch <= b0:
            return t0
        (lo, t_lo), (hi, t_hi) = next((p, q) for p, q in zip(times, times[1:]) if batch <= q[0])
        return t_lo + (batch - lo) / (hi - lo) * (t_hi - t_lo)

    def io_cpu_time(self, attrs: dict) -> float:
        """Compute seconds a node's disk transfers take from a CPU compute device."""
        if self.cal.device != "cpu" or self.cal.io_cpu <= 0:
            return 0.0
        return self.cal.io_cpu * sum(n for src, dst, n in attrs["moves"] if "disk" in (src, dst))

    def busy_bw(self, src: str, dst: str) -> float:
        """Bytes/s of a transfer while the compute runs: a CPU's disk transfers at the rate
        its disk was read under compute (calibrated), the rest at their idle rates."""
        bw = self.cal.bw(src, dst)
        busy, idle = self.cal.disk_read_busy, self.cal.bandwidth.get("disk->cpu", 0.0)
        if self.cal.device == "cpu" and "disk" in (src, dst) and busy > 0 and idle > 0:
            return bw * min(1.0, busy / idle)
        return bw

    def node_time(self, attrs: dict, gbs: int, prompt_len: int) -> float:
        t = self.cal.node_overhead
        if attrs["kind"] == COMPUTE:
            i, j = attrs["i"], attrs["j"]
            new = prompt_len if i == 0 else 1
            return t + self.compute_time(j, gbs, new, prompt_len + i)
        for src, dst, nbytes in attrs["moves"]:
            t += nbytes / self.busy_bw(src, dst)
        return t


@dataclass
class Estimate:
    block_seconds: float
    prefill_seconds: float              # per block
    decode_seconds: float               # per block
    lane_busy: dict[str, float]         # per block
    blocks: int
    parts: dict[str, float] = field(default_factory=dict)   # per block, by graph.builder.part_of

    @property
    def total_seconds(self) -> float:
        return self.block_seconds * self.blocks

    def throughput(self, gen_len: int, block_size: int) -> float:
        return self.blocks * block_size * gen_len / self.total_seconds


DISK = "disk device"


def simulate(graph: nx.DiGraph, checked: CheckedPath, model: CostModel, overlap: bool = True,
             blocks: int = 1) -> Estimate:
    """Replay the path on lanes with the modelled durations."""
    pol = graph.graph["policy"]
    gbs = pol["gpu_batch_size"]
    prompt_len = graph.graph["workload"]["prompt_len"]
    nodes = graph.nodes
    end = [0.0] * len(checked.path)
    lane_free: dict[str, float] = {}
    busy: dict[str, float] = {}
    parts: dict[str, float] = {}
    spec = model.spec
    prefill_end = 0.0
    io_debt = 0.0           # CPU time disk transfers took since the last compute node
    for p, node in enumerate(checked.path):
        attrs = nodes[node]
        lane = attrs["kind"]
        start = lane_free.get(lane, 0.0)
        # the disk is one device: loads of weights and of cache, and stores, on their own
        # lanes still take turns on it (as lanes they overlapped, and the estimate of a
        # disk-bound decode came out at half the measured time)
        on_disk = any("disk" in (src, dst) for src, dst, _ in attrs["moves"])
        if on_disk and lane_free.get(DISK, 0.0) > start:
            start = lane_free[DISK]
        for q in checked.deps[p]:
            if end[q] > start:
                start = end[q]
        if not overlap and p and end[p - 1] > start:
            start = end[p - 1]
        dur = model.node_time(attrs, gbs, prompt_len)
        # On a CPU, reading from disk costs the compute: charged to the next compute node
        # (the reads overlap it; on 2 cores the compute ran 0.44x while the disk read).
        if on_disk:
            io_debt += model.io_cpu_time(attrs)
        elif lane == COMPUTE:
            dur, io_debt = dur + io_debt, 0.0
        end[p] = start + dur
        lane_free[lane] = end[p]
        if on_disk:
            lane_free[DISK] = end[p]
        busy[lane] = busy.get(lane, 0.0) + dur
        part = part_of(spec, lane, attrs["i"], attrs["j"])
        parts[part] = parts.get(part, 0.0) + dur
        if lane == COMPUTE and attrs["i"] == 0 and end[p] > prefill_end:
            prefill_end = end[p]
    total = max(end) if end else 0.0
    return Estimate(total, prefill_end, total - prefill_end, busy, blocks, parts)


@dataclass
class Roofline:
    seconds: float                       # per block
    bound: str                           # "compute" or "src->dst"
    resources: dict[str, float]          # seconds each resource needs per block
    # the prompts' products alone, per block: the block's time if the decode and every
    # byte moved took none.  Every plan of the workload computes these products (other
    # batch sizes differ only by their products' rates), so tokens / this is about the
    # most throughput any plan can reach on this machine: the prefill ceiling.
    prefill_compute: float = 0.0


def roofline(graph: nx.DiGraph, checked: CheckedPath, model: CostModel) -> Roofline:
    """The busiest resource at the calibrated rates, with perfect overlap and no overhead."""
    pol = graph.graph["policy"]
    gbs = pol["gpu_batch_size"]
    prompt_len = graph.graph["workload"]["prompt_len"]
    need: dict[str, float] = {"compute": 0.0}
    prefill = 0.0
    nodes = graph.nodes
    for node in checked.path:
        attrs = nodes[node]
        if attrs["kind"] == COMPUTE:
            is_prefill = attrs["i"] == 0
            t = model.compute_time(attrs["j"], gbs, prompt_len if is_prefill else 1, prompt_len + attrs["i"])
            need["compute"] += t
            if is_prefill:
                prefill += t
        need["compute"] += model.io_cpu_time(attrs)
        for src, dst, nbytes in attrs["moves"]:
            link = "disk" if "disk" in (src, dst) else f"{src}->{dst}"    # reads and writes share the disk
            need[link] = need.get(link, 0.0) + nbytes / model.cal.bw(src, dst)
    bound = max(need, key=need.get)
    return Roofline(need[bound], bound, need, prefill)
