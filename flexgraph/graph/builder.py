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

Compression and attention where the cache lives (policy flags) change sizes and tiers:

- ``compress_weight``: weights that :func:`~flexgraph.compress.quant.should_compress`
  accepts are stored 4-bit on their homes; ``Wh`` homes, ``load_weight`` moves and ``Wb``
  buffers are compressed bytes.  The compute decodes each matrix right before its product
  (one at a time; the embedding only the rows of its tokens) into the decode scratch
  ``Xw``, a static home on the compute tier sized for the largest matrix (one buffer for
  the whole run: a fresh one per matrix is page-faulted in, 6x the time of the decoding;
  a product's matrix is decoded a chunk of rows at a time, :func:`chunk_rows`);
  its workspace ``X`` adds the decoder's temporaries (:func:`weight_decode_bytes`).
- ``compress_cache``: ``Ch`` homes, ``load_cache`` moves, ``Cb`` buffers and
  ``store_cache`` moves are compressed bytes (K and V of a row and token grouped along the
  head dimension, :attr:`Sizes.kv_row_token_bytes`).  The compute decodes the prefix of
  every row it attends to — loaded and home rows alike — into dense K/V in the cache
  scratch ``Xc`` of the tier the attention runs on (a static home sized for all the rows
  attended there at the longest context, :func:`scratch_homes`), attends with this step's
  new entries in full precision (as FlexGen does), then quantises them into their slots:
  the quantiser's temporaries are :func:`cache_decode_bytes` in the workspace.
- ``storage_dtype`` narrower than the working dtype (mixed precision) goes the same way:
  weight matrices and the dense KV cache are stored, moved and held in working buffers
  at the storage dtype's size; the compute converts each matrix into ``Xw`` and the
  cached prefix into ``Xc`` (no temporaries), and writes the new entries back rounded.
- ``cpu_cache_compute`` (with a gpu tier): at decode steps, attention over the rows
  homed on cpu runs on the cpu, in place (no ``load_cache`` of them, and their new entries
  are written by the compute, after the prefill's were stored: a rule-3 edge); rows homed
  on disk are loaded into a ``Cb`` on the *cpu* tier and attended there.  The prefill
  attends on the compute tier as usual (there is no prefix to read, and its keys and
  values are there already).  What crosses instead are the compute's own moves — query
  rows, their mask and the new K/V gpu->cpu, the attention output cpu->gpu — and the cpu
  part of the attention workspace is an ``X`` allocation on the cpu tier
  (:func:`offloaded_attention_bytes`).  The compute's ``needs_on`` names the tier each
  working buffer must be on.

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
:mod:`flexgraph.plan.checker`), ``needs_on`` [(buffer, tier)] (a needed buffer must be on
that tier) and ``frees`` (buffers it releases explicitly).  Homes of
weights and cache (static for the block) are in ``graph.graph["homes"]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import networkx as nx

from flexgraph.compress.quant import CACHE_GROUP_DIM, GROUP_SIZE, compressed_nbytes, num_groups, should_compress
from flexgraph.errors import PlanError
from flexgraph.models.forward import chunk_sequences
from flexgraph.models.spec import ATTN, EMBED, HEAD, MLP, ModelSpec
from flexgraph.plan.policy import TIERS, Policy, policy_weight_placement, split_rows

LOAD_WEIGHT, LOAD_CACHE, LOAD_HIDDEN = "load_weight", "load_cache", "load_hidden"
COMPUTE, STORE_CACHE, STORE_HIDDEN = "compute", "store_cache", "store_hidden"
KINDS = (LOAD_WEIGHT, LOAD_CACHE, LOAD_HIDDEN, COMPUTE, STORE_CACHE, STORE_HIDDEN)
ID_BYTES = 8   # a token id (int64)
KERNEL_BLOCKS = 16 << 20   # scratch of the fused attention kernel (per-thread score blocks)


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
    kv_row_token_bytes: int           # K and V of one row, one token, as stored (compressed or not)
    itemsize: int
    kv_dense_row_token_bytes: int = 0                  # K and V of one row, one token, decoded
    kv_attn: tuple[str, str, str] = ("cpu", "cpu", "cpu")   # where decode attends rows homed on gpu, cpu, disk
    compress_cache: bool = False

    def attn_tiers(self, decode: bool) -> tuple[str, str, str]:
        """Where the attention over rows homed on gpu, cpu, disk runs.  The prefill attends
        everything on the compute tier: there is no cached prefix to read, and this step's
        entries are there already (FlexGen's ``cpu_cache_compute`` is for decoding too)."""
        return self.kv_attn if decode else (self.compute_tier,) * len(TIERS)

    def kv_loaded(self, decode: bool = True) -> list[tuple[str, str, int]]:
        """(home tier, tier attended on, rows) of the cache rows a ``load_cache`` brings to
        where their attention runs (rows attended where they live are not loaded)."""
        return [(t, a, r) for t, a, r in zip(TIERS, self.attn_tiers(decode), self.kv_rows) if r and t != a]

    def kv_attn_rows(self, decode: bool = True) -> dict[str, int]:
        """Rows attended on each tier (the compute tier first)."""
        out = {self.compute_tier: 0}
        for a, r in zip(self.attn_tiers(decode), self.kv_rows):
            if r:
                out[a] = out.get(a, 0) + r
        return out

    def act_off_rows(self) -> int:
        return sum(self.act_rows) - self.act_rows[TIERS.index(self.compute_tier)]


def part_of(spec: ModelSpec, kind: str, i: int, j: int) -> str:
    """The part of a run that node ``(kind, i, j, k)`` counts towards: its kind, the phase
    (step 0 is the prefill) and its layer's kind, e.g. ``compute prefill mlp``.  The cost
    model's estimate and the executor's metrics both add their node seconds up by it, so
    where the two differ can be read part by part (``tools/bench.py``)."""
    return f"{kind} {'prefill' if i == 0 else 'decode'} {spec.layer(j).kind}"


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


def kv_row_token_bytes(spec: ModelSpec, policy: Policy) -> int:
    """Stored bytes of K and V of one cache row for one token: dense in the storage
    dtype, or with ``compress_cache`` the 4-bit codes and per-group scale and minimum of
    each in the working dtype (grouped along the head dimension, padded to whole groups)."""
    if policy.compress_cache:
        return 2 * compressed_nbytes((1, spec.head_dim), policy.torch_dtype, CACHE_GROUP_DIM)
    return 2 * spec.head_dim * policy.store_itemsize


def make_sizes(spec: ModelSpec, policy: Policy, has_gpu_tier: bool) -> Sizes:
    check_policy_tiers(policy, has_gpu_tier)
    rows_kv = policy.gpu_batch_size * spec.num_kv_heads
    ct = compute_tier(has_gpu_tier)
    # attention where the cache lives: only meaningful when the compute tier is not the cpu
    on_cpu = policy.cpu_cache_compute and ct != "cpu"
    return Sizes(
        compute_tier=ct,
        rows_kv=rows_kv,
        kv_rows=split_rows(rows_kv, policy.cache),
        act_rows=split_rows(policy.gpu_batch_size, policy.activations),
        kv_row_token_bytes=kv_row_token_bytes(spec, policy),
        itemsize=policy.itemsize,
        kv_dense_row_token_bytes=2 * spec.head_dim * policy.itemsize,
        kv_attn=tuple("cpu" if on_cpu and t != ct else ct for t in TIERS),
        compress_cache=policy.compress_cache,
    )


def hidden_bytes(spec: ModelSpec, j: int, rows: int, new_tokens: int, itemsize: int) -> int:
    """Bytes of the output of layer j for ``rows`` sequences (the head outputs token ids)."""
    if spec.layer(j).kind == HEAD:
        return rows * ID_BYTES
    return rows * new_tokens * spec.hidden_size * itemsize


def workspace_bytes(spec: ModelSpec, j: int, batch: int, new_tokens: int, context: int, itemsize: int,
                    on_cpu: bool = False) -> int:
    """Upper bound of the temporary tensors a compute allocates (freed when it ends).

    Attention: the normalised input (float32 and working dtype), q, k, v, the output and
    the attention mask, plus contiguous copies of the keys and values it reads (the
    fused kernel may make them) and the kernel's per-thread blocks.  MLP: the
    intermediate activations — one ``[B, s, ffn]`` tensor per product into the
    intermediate size (the activation works in place), and one spare for a kernel that
    does not.  Embedding: Llama's looks up into its output; OPT's adds two lookups (after
    projecting the first).  Head: normalised states and float32 logits.

    A CPU prefill of many tokens computes its attention and MLP a few sequences at a time
    into the one output (:func:`flexgraph.models.forward.chunk_sequences`): one chunk's
    temporaries, the chunk's result before it is copied in, and the whole batch's mask.
    Counted for the whole batch, SmolLM2's MLP over 32 x 512 tokens was planned at
    415 MB and peaked at 88 MB; at 256 x 512 it put the plan's host peak at 10.7 GB where
    the run holds 7.8, and a tight cap's plans are sized by these counts.
    """
    kind = spec.layer(j).kind
    per_chunk = chunk_sequences(batch, new_tokens) if on_cpu and kind in (ATTN, MLP) else None
    if per_chunk is not None:
        return (workspace_bytes(spec, j, per_chunk, new_tokens, context, itemsize)
                + hidden_bytes(spec, j, per_chunk, new_tokens, itemsize) + batch * new_tokens * context)
    h, s = spec.hidden_size, new_tokens
    if kind == EMBED:                   # a lookup into the output; OPT's two summed, the first projected
        return 0 if spec.family == "llama" else batch * s * max(spec.embed_dim, h) * itemsize * 2
    if kind == HEAD:
        return batch * (h * (itemsize + 4) + spec.vocab_size * 4 * 2)
    norm = batch * s * h * (4 + itemsize)
    if kind == ATTN:
        proj = batch * s * (2 * spec.q_size + 2 * spec.kv_size) * itemsize * 2
        mask = batch * s * context
        kv_copies = 2 * batch * spec.kv_size * context * itemsize
        return norm + proj + mask + kv_copies + KERNEL_BLOCKS
    ffn_tensors = (2 if spec.family == "llama" else 1) + 1         # gate and up, or fc1; plus the spare
    return norm + batch * s * spec.intermediate_size * itemsize * ffn_tensors


# A matrix kept compressed or narrower is decoded for a product a chunk of rows at a time
# (flexgraph.exec.nodes): small chunks for a few tokens (decode), which stay in the
# last-level cache for the product that reads them — decoding a whole 64 MiB matrix to
# memory first made a decode-step product 2x slower than reading float32 — and large
# ones for many tokens (prefill), where the product's efficiency wants wide chunks.
SMALL_CHUNK_BYTES = 4 << 20
LARGE_CHUNK_BYTES = 32 << 20
SMALL_PRODUCT_TOKENS = 512


def chunk_rows(cols: int, itemsize: int, tokens: int) -> int:
    """Rows of a ``[rows, cols]`` matrix decoded at a time for a product over ``tokens``
    tokens (whole groups of 64, so a 4-bit matrix is sliced at group boundaries)."""
    nbytes = SMALL_CHUNK_BYTES if tokens <= SMALL_PRODUCT_TOKENS else LARGE_CHUNK_BYTES
    return max(GROUP_SIZE, nbytes // (cols * itemsize) // GROUP_SIZE * GROUP_SIZE)


def matrix_decode_bytes(rows: int, cols: int, itemsize: int) -> int:
    """What :func:`~flexgraph.compress.quant.dequantize_into` of a ``[rows, cols]`` matrix
    grouped along its rows allocates besides its output: one nibble plane of the codes at
    a time (half a byte per padded element), and a padded last group decoded aside."""
    padded = num_groups(rows) * GROUP_SIZE
    return padded * cols // 2 + GROUP_SIZE * cols * (itemsize + 1)


def _decoded_matrices(spec: ModelSpec, j: int, itemsize: int):
    """(rows, cols) of each matrix of layer j the compute decodes or converts at once: a
    product's weight a chunk of at most :func:`chunk_rows` rows at a time; the
    embedding layer's other matrices (learned positions are looked up, not multiplied)
    whole; not the embedding table, of which only the rows of a step's tokens are."""
    embed = spec.layer(j).kind == EMBED
    for w in spec.layer_weights(j):
        if not should_compress(w.name, w.shape) or (embed and w.name == spec.embed_tokens_name):
            continue
        rows, cols = w.shape[0], math.prod(w.shape[1:])
        yield (rows if embed else min(rows, chunk_rows(cols, itemsize, SMALL_PRODUCT_TOKENS + 1))), cols


def weight_scratch_bytes(spec: ModelSpec, itemsize: int) -> int:
    """The decode scratch ``Xw``: the largest matrix (or chunk of one) any compute decodes
    or converts at once, in the working dtype."""
    return max((r * c for j in range(spec.num_layers) for r, c in _decoded_matrices(spec, j, itemsize)),
               default=0) * itemsize


def weight_decode_bytes(spec: ModelSpec, j: int, itemsize: int, tokens: int, store_itemsize: int | None = None) -> int:
    """Upper bound of what decoding layer j's compressed weights — or, with
    ``store_itemsize``, converting its matrices from the storage dtype — allocates in its
    compute besides the scratch ``Xw`` the matrices are decoded into, one at a time.

    4-bit: the decoder's temporaries for the largest matrix or chunk
    (:func:`matrix_decode_bytes`).  The embedding table is not decoded whole: only the
    rows of this step's ``tokens`` (4-bit: the groups of 64 rows that hold them,
    :func:`~flexgraph.compress.quant.dequantize_rows`), kept as a compact table for the
    layer; converting gathers the rows in the storage dtype first.
    """
    e = itemsize
    table = 0
    for w in spec.layer_weights(j):
        if spec.layer(j).kind == EMBED and w.name == spec.embed_tokens_name and should_compress(w.name, w.shape):
            cols = math.prod(w.shape[1:])
            if store_itemsize:          # gathered in the storage dtype, then converted; unique ids
                table = tokens * cols * (store_itemsize + e) + tokens * 3 * ID_BYTES
            else:
                decoded = min(num_groups(w.shape[0]) * GROUP_SIZE, GROUP_SIZE * tokens)
                table = decoded * cols * (2 * e + 1) + tokens * (cols * e + 64)
    if store_itemsize:
        return table
    return table + max((matrix_decode_bytes(r, c, e) for r, c in _decoded_matrices(spec, j, e)), default=0)


def cache_decode_bytes(spec: ModelSpec, rows: int, new_tokens: int, context: int, itemsize: int) -> int:
    """Upper bound of what a compressed cache costs the compute of one attention layer for
    ``rows`` cache rows attended on one tier besides the dense K and V in the scratch
    ``Xc``: the decoder's temporaries (one of K, V at a time, a padded last group
    included) and the quantiser's for the new entries (padded copy, float32 groups,
    codes)."""
    d, e = spec.head_dim, itemsize
    dp = num_groups(d) * GROUP_SIZE
    return rows * context * dp * (e + 1) + rows * new_tokens * dp * (e + 10)


def cache_scratch_bytes(spec: ModelSpec, workload: Workload, sz: Sizes) -> dict[str, int]:
    """The cache scratch ``Xc`` per tier: dense K and V (``[rows, context, D]`` each, in
    the working dtype) of every row attended on that tier, at the longest context it is
    attended with — the prefill attends all rows on the compute tier at the prompt's
    length, decode steps each tier's rows at up to ``cache_len``."""
    per = 2 * spec.head_dim * sz.itemsize
    out: dict[str, int] = {}
    phases = [(False, workload.prompt_len)] + ([(True, workload.cache_len)] if workload.gen_len > 1 else [])
    for decode, context in phases:
        for tier, rows in sz.kv_attn_rows(decode).items():
            out[tier] = max(out.get(tier, 0), rows * context * per)
    return {t: n for t, n in out.items() if n}


def offloaded_attention_bytes(spec: ModelSpec, rows: int, new_tokens: int, context: int, itemsize: int) -> int:
    """Workspace, on the tier where they live, of the attention over ``rows`` cache rows that
    is not on the compute tier (``cpu_cache_compute``): the query rows and their mask copied
    over, the new keys and values on their way into the cache, contiguous copies of the
    keys and values the fused kernel may make, its per-thread blocks, and the output."""
    g = spec.num_heads // spec.num_kv_heads
    d, e, s = spec.head_dim, itemsize, new_tokens
    return (2 * rows * g * s * d * e + rows * s * context + 2 * rows * s * d * e + 2 * rows * context * d * e
            + KERNEL_BLOCKS)


def offloaded_attention_moves(spec: ModelSpec, ct: str, tier: str, rows: int, new_tokens: int, context: int,
                              itemsize: int) -> list[tuple[str, str, int]]:
    """What crosses between the compute tier and ``tier`` when ``rows`` are attended there
    (at most; whole sequences share their mask): the query rows, their mask (bool) and the
    new K/V out, the attention output back."""
    g = spec.num_heads // spec.num_kv_heads
    d, e, s = spec.head_dim, itemsize, new_tokens
    out = rows * g * s * d * e
    return [(ct, tier, out + rows * s * context + 2 * rows * s * d * e), (tier, ct, out)]


def scratch_homes(spec: ModelSpec, workload: Workload, policy: Policy, sz: Sizes) -> list[tuple[tuple, str, int]]:
    """Buffers the compute reuses for the whole run, where weights or cache are kept
    compressed or in a narrower storage dtype: ``Xw`` (one decoded matrix, on the compute
    tier) and ``Xc`` per attention tier (the dense K and V attention reads)."""
    out = []
    if policy.compress_weight or policy.casts:
        n = weight_scratch_bytes(spec, policy.itemsize)
        if n:
            out.append((("Xw",), sz.compute_tier, n))
    if policy.compress_cache or policy.casts:
        out += [(("Xc", t), t, n) for t, n in cache_scratch_bytes(spec, workload, sz).items()]
    return out


def static_homes(spec: ModelSpec, workload: Workload, policy: Policy, sz: Sizes,
                 placement=None, weights_in_place: bool = False) -> list[tuple[tuple, str, int]]:
    """The homes that live for the whole block: weights of every layer on their tiers, the
    KV cache of every (attention layer, GPU batch), sized for all ``cache_len`` slots, and
    the decode scratches (:func:`scratch_homes`).  With ``weights_in_place`` the weights
    on disk are the weight store's own files, read in place: they take no disk room."""
    placement = placement or policy_weight_placement(spec, policy)
    homes: list[tuple[tuple, str, int]] = scratch_homes(spec, workload, policy, sz)
    for j in range(spec.num_layers):
        for tier, nbytes in placement.bytes_per_tier[j].items():
            if nbytes and not (weights_in_place and tier == "disk"):
                homes.append((("Wh", j), tier, nbytes))
        if spec.layer(j).kind == ATTN:
            for k in range(policy.num_gpu_batches):
                for tier, rows in zip(TIERS, sz.kv_rows):
                    if rows:
                        homes.append((("Ch", j, k), tier, rows * workload.cache_len * sz.kv_row_token_bytes))
    return homes


def build_graph(spec: ModelSpec, workload: Workload, policy: Policy, has_gpu_tier: bool,
                weights_in_place: bool = False) -> nx.DiGraph:
    """The task graph of one block of ``num_gpu_batches`` GPU batches (``weights_in_place``:
    see :func:`static_homes`)."""
    sz = make_sizes(spec, policy, has_gpu_tier)
    ct = sz.compute_tier
    gbs, e = policy.gpu_batch_size, policy.itemsize
    L, G, K, P = spec.num_layers, workload.gen_len, policy.num_gpu_batches, workload.prompt_len
    placement = policy_weight_placement(spec, policy)
    kvb = sz.kv_row_token_bytes
    act_off = sz.act_off_rows()

    homes = static_homes(spec, workload, policy, sz, placement, weights_in_place)

    g = nx.DiGraph(spec=spec.name, workload=workload.to_json(), policy=policy.to_json(),
                   compute_tier=ct, homes=homes, sizes=asdict(sz),
                   weight_split=placement.achieved(), num_layers=L, gen_len=G, num_gpu_batches=K)

    def add(kind, i, j, k, **attrs):
        attrs.setdefault("moves", [])
        attrs.setdefault("allocs", [])
        attrs.setdefault("needs", [])
        attrs.setdefault("needs_on", [])
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
        kv_loaded = sz.kv_loaded(decode=i > 0)
        for j in range(L):
            kind = spec.layer(j).kind
            w_off = sum(b for t, b in placement.bytes_per_tier[j].items() if t != ct)
            out_bytes = hidden_bytes(spec, j, gbs, s, e)
            for k in range(K):
                c = (COMPUTE, i, j, k)
                needs: list[tuple] = []
                needs_on: list[tuple] = []
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
                # rule 2 and 3: the KV cache (rows attended where they live are not loaded)
                if kind == ATTN and kv_loaded:
                    prefix = context - s     # tokens already cached
                    cb = ("Cb", i, j, k)
                    cb_rows: dict[str, int] = {}
                    for _home, at, rows in kv_loaded:
                        cb_rows[at] = cb_rows.get(at, 0) + rows
                    lc = add(LOAD_CACHE, i, j, k,
                             moves=[(t, at, rows * prefix * kvb) for t, at, rows in kv_loaded] if prefix else [],
                             allocs=[(cb, at, rows * context * kvb) for at, rows in cb_rows.items()],
                             needs=[("Cstored", i - 1, j, k)] if i > 0 else [])
                    g.add_edge(lc, c, rule=2)
                    if i > 0:
                        g.add_edge((STORE_CACHE, i - 1, j, k), lc, rule=3)
                    needs.append(cb)
                    needs_on += [(cb, at) for at in cb_rows]
                    sc = add(STORE_CACHE, i, j, k, moves=[(at, t, rows * s * kvb) for t, at, rows in kv_loaded],
                             needs=[cb], allocs=[(("Cstored", i, j, k), ct, 0)])
                    g.add_edge(c, sc, rule=3)
                elif kind == ATTN and i > 0 and sz.kv_loaded(decode=i > 1):
                    # the previous step stored entries this one reads in place (cpu_cache_compute
                    # with no rows to load): the home must have them first
                    g.add_edge((STORE_CACHE, i - 1, j, k), c, rule=3)
                    needs.append(("Cstored", i - 1, j, k))
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
                ws = {ct: workspace_bytes(spec, j, gbs, s, context, e, on_cpu=ct == "cpu")}
                moves = []
                if policy.compress_weight:
                    ws[ct] += weight_decode_bytes(spec, j, e, gbs * s)
                elif policy.casts:
                    ws[ct] += weight_decode_bytes(spec, j, e, gbs * s, policy.store_itemsize)
                if kind == ATTN:
                    for at, rows in sz.kv_attn_rows(decode=i > 0).items():
                        if policy.compress_cache and rows:
                            ws[at] = ws.get(at, 0) + cache_decode_bytes(spec, rows, s, context, e)
                        if at != ct:
                            ws[at] = ws.get(at, 0) + offloaded_attention_bytes(spec, rows, s, context, e)
                            ws[ct] += rows * (spec.num_heads // spec.num_kv_heads) * s * spec.head_dim * e
                            moves += offloaded_attention_moves(spec, ct, at, rows, s, context, e)
                add(COMPUTE, i, j, k, flops=gbs * spec.layer_flops(j, s, context), needs=needs, needs_on=needs_on,
                    moves=moves, allocs=[(("Hc", i, j, k), ct, out_bytes)] + [(("X", i, j, k), t, b)
                                                                              for t, b in ws.items()],
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
