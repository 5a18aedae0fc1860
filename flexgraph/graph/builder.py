"""The builder: ModelSpec + Workload + Policy -> the task graph of one block.

One *square* is layer ``j`` computed for GPU batch ``k`` at token step ``i`` (step 0 is
the prefill of the whole prompt, step ``i >= 1`` decodes one token).  Around each
``compute`` square the builder emits the data movements it may need:

==============  =========================================================================
node            what it does (buffers are on the compute tier unless said otherwise)
==============  =========================================================================
load_weight     copies the non-compute-tier share of layer j's weights into a working
                buffer ``Wb(i,j,k)``; a path may skip it when a buffer of layer j is
                still resident (the zig-zag schedule loads once per column)
load_cache      allocates the cache working buffer ``Cb(i,j,k)`` for the KV rows homed
                off the compute tier and reads their ``P + i - 1`` cached tokens into it
compute         runs the layer: reads ``Hc(i,j-1,k)`` (token ids for j = 0), weights and
                cache; writes ``Hc(i,j,k)`` and the new KV entry; uses workspace ``X``
store_cache     writes the new KV entry of the off-compute rows from ``Cb`` to their homes
store_hidden    moves the off-compute rows of ``Hc(i,j,k)`` to their homes ``Hh``
load_hidden     brings them back as ``Hc(i,j,k)`` before compute(i, j+1, k)
==============  =========================================================================

A node is emitted only when it has something to do (bytes to move or memory to take).
Edges are the paper's rules 1-3 as data dependencies; a small example, one layer
``j`` of two GPU batches with the cache partly on disk ::

    compute(0,j-1,0) --> compute(0,j,0) --> store_cache(0,j,0) --> load_cache(1,j,0) --> compute(1,j,0)
                           ^    ^
    load_weight(0,j,0) ----'    '---- load_cache(0,j,0)
    compute(0,j-1,1) --> compute(0,j,1) ...       (rule 1: left neighbour in the row;
                                                   rule 2: inputs on the device;
                                                   rule 3: outputs to their consumers)

The graph is pure data (a ``networkx.DiGraph``; nodes keyed ``(kind, i, j, k)``), with
node attributes ``moves`` [(from tier, to tier, bytes)], ``flops``, ``allocs``
[(buffer, tier, bytes)], ``needs`` (buffers that must be resident, see
:mod:`flexgraph.plan.checker`) and ``frees`` (buffers it releases explicitly).  Homes of
weights and cache (static for the block) are in ``graph.graph["homes"]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import networkx as nx

from flexgraph.errors import PlanError
from flexgraph.models.spec import ATTN, EMBED, HEAD, ModelSpec
from flexgraph.plan.policy import TIERS, Policy, split_rows, weight_placement

LOAD_WEIGHT, LOAD_CACHE, LOAD_HIDDEN = "load_weight", "load_cache", "load_hidden"
COMPUTE, STORE_CACHE, STORE_HIDDEN = "compute", "store_cache", "store_hidden"
KINDS = (LOAD_WEIGHT, LOAD_CACHE, LOAD_HIDDEN, COMPUTE, STORE_CACHE, STORE_HIDDEN)
ID_BYTES = 8   # a token id (int64)


@dataclass(frozen=True)
class Workload:
    num_prompts: int
    prompt_len: int
    gen_len: int

    def __post_init__(self):
        if self.num_prompts < 1 or self.prompt_len < 1 or self.gen_len < 1:
            raise PlanError("--num-prompts, --prompt-len and --gen-len must each be at least 1")

    @property
    def cache_len(self) -> int:
        """Cache slots per sequence: the prompt and every generated token but the last."""
        return self.prompt_len + self.gen_len - 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Workload:
        return cls(**d)


@dataclass(frozen=True)
class Sizes:
    """Byte sizes that every node of one block shares; derived from spec, workload, policy."""
    compute_tier: str
    rows_kv: int                      # gbs * nkv cache rows of one (layer, batch)
    kv_rows: tuple[int, int, int]     # rows homed on gpu, cpu, disk
    act_rows: tuple[int, int, int]    # batch rows of a hidden state homed on gpu, cpu, disk
    kv_row_token_bytes: int           # K and V of one row, one token
    itemsize: int

    def kv_off_rows(self) -> int:
        return self.rows_kv - self.kv_rows[TIERS.index(self.compute_tier)]

    def act_off_rows(self) -> int:
        return sum(self.act_rows) - self.act_rows[TIERS.index(self.compute_tier)]


def compute_tier(has_gpu_tier: bool) -> str:
    return "gpu" if has_gpu_tier else "cpu"


def check_policy_tiers(policy: Policy, has_gpu_tier: bool) -> None:
    if has_gpu_tier:
        return
    for kind in ("weights", "cache", "activations"):
        if getattr(policy, kind).gpu > 0:
            raise PlanError(f"this machine has no gpu tier but the policy puts {getattr(policy, kind).gpu:g}% of "
                            f"the {kind} there; move that share to cpu, or pass --gpu-mem SIZE to simulate a gpu "
                            "tier in host memory")


def make_sizes(spec: ModelSpec, policy: Policy, has_gpu_tier: bool) -> Sizes:
    check_policy_tiers(policy, has_gpu_tier)
    rows_kv = policy.gpu_batch_size * spec.num_kv_heads
    return Sizes(
        compute_tier=compute_tier(has_gpu_tier),
        rows_kv=rows_kv,
        kv_rows=split_rows(rows_kv, policy.cache),
        act_rows=split_rows(policy.gpu_batch_size, policy.activations),
        kv_row_token_bytes=2 * spec.head_dim * policy.itemsize,
        itemsize=policy.itemsize,
    )


def hidden_bytes(spec: ModelSpec, j: int, rows: int, new_tokens: int, itemsize: int) -> int:
    """Bytes of the output of layer j for ``rows`` sequences (the head outputs token ids)."""
    if spec.layer(j).kind == HEAD:
        return rows * ID_BYTES
    return rows * new_tokens * spec.hidden_size * itemsize


def workspace_bytes(spec: ModelSpec, j: int, batch: int, new_tokens: int, context: int, itemsize: int) -> int:
    """Upper bound of the temporary tensors a compute allocates (freed when it ends).

    Attention: q, k, v, output and float32 norms, plus float32 scores and probabilities
    of one query chunk (:func:`flexgraph.models.layers.attend` bounds them).  MLP: the
    intermediate activations.  Head: normalised states and float32 logits.
    """
    from flexgraph.models.layers import attention_chunk_rows
    kind = spec.layer(j).kind
    h, s = spec.hidden_size, new_tokens
    if kind == EMBED:
        return batch * s * max(spec.embed_dim, h) * itemsize * 2
    if kind == HEAD:
        return batch * (h * (itemsize + 4) + spec.vocab_size * 4 * 2)
    norm = batch * s * h * (4 + itemsize)
    if kind == ATTN:
        proj = batch * s * (2 * spec.q_size + 2 * spec.kv_size) * itemsize
        g = spec.num_heads // spec.num_kv_heads
        rows = batch * spec.num_kv_heads
        q_rows = attention_chunk_rows(rows, g * s, context)
        scores = rows * q_rows * context * (4 + 4 + itemsize)
        return norm + proj + scores
    return norm + batch * s * spec.intermediate_size * itemsize * 3


def static_homes(spec: ModelSpec, workload: Workload, policy: Policy, sz: Sizes,
                 placement=None) -> list[tuple[tuple, str, int]]:
    """The homes that live for the whole block: weights of every layer on their tiers, and
    the KV cache of every (attention layer, GPU batch), sized for all ``cache_len`` slots."""
    placement = placement or weight_placement(spec, policy.weights, policy.itemsize)
    homes: list[tuple[tuple, str, int]] = []
    for j in range(spec.num_layers):
        for tier, nbytes in placement.bytes_per_tier[j].items():
            if nbytes:
                homes.append((("Wh", j), tier, nbytes))
        if spec.layer(j).kind == ATTN:
            for k in range(policy.num_gpu_batches):
                for tier, rows in zip(TIERS, sz.kv_rows):
                    if rows:
                        homes.append((("Ch", j, k), tier, rows * workload.cache_len * sz.kv_row_token_bytes))
    return homes


def build_graph(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu_tier: bool) -> nx.DiGraph:
    """The task graph of one block of ``num_gpu_batches`` GPU batches."""
    sz = make_sizes(spec, policy, has_gpu_tier)
    ct = sz.compute_tier
    gbs, e = policy.gpu_batch_size, policy.itemsize
    L, G, K, P = spec.num_layers, workload.gen_len, policy.num_gpu_batches, workload.prompt_len
    placement = weight_placement(spec, policy.weights, e)
    kv_off = sz.kv_off_rows()
    act_off = sz.act_off_rows()

    homes = static_homes(spec, workload, policy, sz, placement)

    g = nx.DiGraph(spec=spec.name, workload=workload.to_json(), policy=policy.to_json(),
                   compute_tier=ct, homes=homes, sizes=asdict(sz),
                   weight_split=placement.achieved(), num_layers=L, gen_len=G, num_gpu_batches=K)

    def add(kind, i, j, k, **attrs):
        attrs.setdefault("moves", [])
        attrs.setdefault("allocs", [])
        attrs.setdefault("needs", [])
        attrs.setdefault("frees", [])
        attrs.setdefault("flops", 0.0)
        g.add_node((kind, i, j, k), kind=kind, i=i, j=j, k=k, **attrs)
        return (kind, i, j, k)

    def split_moves(src_or_dst_rows, per_row_bytes, to_compute: bool):
        moves = []
        for tier, rows in zip(TIERS, src_or_dst_rows):
            if tier != ct and rows:
                moves.append((tier, ct, rows * per_row_bytes) if to_compute else (ct, tier, rows * per_row_bytes))
        return moves

    for i in range(G):
        s = P if i == 0 else 1
        context = P + i                 # keys visible to the new tokens, themselves included
        for j in range(L):
            kind = spec.layer(j).kind
            w_off = sum(b for t, b in placement.bytes_per_tier[j].items() if t != ct)
            out_bytes = hidden_bytes(spec, j, gbs, s, e)
            for k in range(K):
                c = (COMPUTE, i, j, k)
                needs: list[tuple] = []
                # rule 1: the left neighbour in the row
                if j > 0:
                    g.add_edge((COMPUTE, i, j - 1, k), c, rule=1)
                    needs.append(("Hc", i, j - 1, k))
                elif i > 0:
                    g.add_edge((COMPUTE, i - 1, L - 1, k), c, rule=1)
                    needs.append(("Hc", i - 1, L - 1, k))
                # rule 2: weights on the compute tier
                if w_off:
                    lw = add(LOAD_WEIGHT, i, j, k, moves=[(t, ct, b) for t, b in placement.bytes_per_tier[j].items()
                                                          if t != ct and b],
                             allocs=[(("Wb", i, j, k), ct, w_off)])
                    g.add_edge(lw, c, rule=2)
                    needs.append(("W", j))
                # rule 2 and 3: the KV cache
                if kind == ATTN and kv_off:
                    prefix = context - s     # tokens already cached
                    lc = add(LOAD_CACHE, i, j, k,
                             moves=split_moves(sz.kv_rows, prefix * sz.kv_row_token_bytes, True) if prefix else [],
                             allocs=[(("Cb", i, j, k), ct, kv_off * context * sz.kv_row_token_bytes)],
                             needs=[("Cstored", i - 1, j, k)] if i > 0 else [])
                    g.add_edge(lc, c, rule=2)
                    if i > 0:
                        g.add_edge((STORE_CACHE, i - 1, j, k), lc, rule=3)
                    needs.append(("Cb", i, j, k))
                    sc = add(STORE_CACHE, i, j, k, moves=split_moves(sz.kv_rows, s * sz.kv_row_token_bytes, False),
                             needs=[("Cb", i, j, k)], allocs=[(("Cstored", i, j, k), ct, 0)])
                    g.add_edge(c, sc, rule=3)
                # rule 2 and 3: the activation, through its home when it has one off the compute tier
                if act_off and 0 < j and spec.layer(j - 1).kind != HEAD:
                    prev_bytes = hidden_bytes(spec, j - 1, 1, s, e)
                    kept = [("Hk", i, j - 1, k)] if sz.act_rows[TIERS.index(ct)] else []
                    lh = add(LOAD_HIDDEN, i, j, k, moves=split_moves(sz.act_rows, prev_bytes, True),
                             needs=[("Hh", i, j - 1, k)] + kept,
                             allocs=[(("Hc", i, j - 1, k), ct, gbs * prev_bytes)],
                             frees=[("Hh", i, j - 1, k), ("Hk", i, j - 1, k)])
                    g.add_edge((STORE_HIDDEN, i, j - 1, k), lh, rule=3)
                    g.add_edge(lh, c, rule=2)
                ws = workspace_bytes(spec, j, gbs, s, context, e)
                add(COMPUTE, i, j, k, flops=gbs * spec.layer_flops(j, s, context), needs=needs,
                    allocs=[(("Hc", i, j, k), ct, out_bytes), (("X", i, j, k), ct, ws)],
                    frees=[("X", i, j, k)])
                if act_off and kind != HEAD and j < L - 1:
                    row_bytes = hidden_bytes(spec, j, 1, s, e)
                    keep = sz.act_rows[TIERS.index(ct)] * row_bytes
                    allocs = [(("Hh", i, j, k), t, r * row_bytes) for t, r in zip(TIERS, sz.act_rows)
                              if t != ct and r]
                    if keep:
                        allocs.append((("Hk", i, j, k), ct, keep))
                    sh = add(STORE_HIDDEN, i, j, k, moves=split_moves(sz.act_rows, row_bytes, False),
                             needs=[("Hc", i, j, k)], allocs=allocs, frees=[("Hc", i, j, k)])
                    g.add_edge(c, sh, rule=3)
    return g
