"""What each kind of node does with real tensors.

Each function runs on its lane's worker thread and touches only the buffers the checker
resolved for it (``keys``: buffer id -> instance key) plus the static homes.  Buffers
live in ``RunState.buffers`` keyed by *instance* (buffer id, producing path index), so a
buffer id reused later in the path (an activation stored away and loaded back) never
collides with its earlier instance.

Layouts: a working weight buffer is {role: tensor}; a cache working buffer is
{tier: (k, v)} with ``k, v: [r, T, D]`` row-major, in the dtype the cache is kept in
(rows homed on disk keep the prompt's tokens row-major, read straight into place, and
the generated ones seq-major, transposed as they are loaded: see
:class:`~flexgraph.exec.homes.DiskKV`); an activation is ``[B, s, H]`` (token ids
``[B]`` after the head).

Compression (:mod:`flexgraph.compress.quant`): a compressed weight stays a ``QTensor``
in homes and working buffers and is decoded in ``compute`` right before its product, one
matrix at a time (:class:`_Decoded`; the embedding decodes only the rows of its tokens).
A compressed cache working buffer holds, per home tier, :class:`_QRows` (K and V
QTensors, seq-major for disk rows); ``compute`` decodes the prefix of every row it
attends to into dense ``[r, T, D]`` buffers on the tier where that attention runs, the
attention writes this step's new K/V into them and uses them in full precision, and then
the new entries are quantised into their slots — in the home for rows attended where they
live, else into the working buffer, from which ``store_cache`` writes the compressed slot
home.

A storage dtype narrower than the working one (``--storage-dtype``) goes the same way:
weight matrices stay in it in homes and working buffers and ``compute`` converts each
right before its product, a chunk of rows at a time (:class:`_Decoded`; the embedding
only its tokens' rows); the dense cache is kept, loaded and stored in it, and
``compute`` converts the prefix it attends to into dense buffers and writes the new
entries back, rounded, after the attention used them.

Decoded matrices and dense K/V live in scratch buffers allocated once per run
(:meth:`RunState.scratch`, the ``Xw`` and ``Xc`` homes of
:func:`~flexgraph.graph.builder.scratch_homes`): a fresh 64 MiB tensor per matrix cost
34 ms against 5.4 ms for converting into a reused one here — the OS faults fresh memory
in page by page.

Attention where the cache lives (``kv_attn``, from ``cpu_cache_compute``; decode steps
only): rows whose attention tier is their home tier are attended in place (their home
tensors are the segments; :func:`~flexgraph.models.layers.attention_layer` moves the
query rows over and the output back); rows loaded by ``load_cache`` go to their
attention tier.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flexgraph.compress.quant import (CACHE_GROUP_DIM, QTensor, dequantize_into, dequantize_rows,
                                      qtensor_from_bytes, quantize_into)
from flexgraph.errors import ExecutionError
from flexgraph.exec.homes import CacheHome, DiskKV, DiskTensor, Tiers, WeightHome
from flexgraph.graph.builder import chunk_rows
from flexgraph.models import layers as L
from flexgraph.models.layers import dense_linear, is_skinny, skinny_product
from flexgraph.models.forward import EAGER, compute_layer
from flexgraph.models.sampling import SamplingParams, sample
from flexgraph.models.spec import ATTN, EMBED, HEAD, ModelSpec
from flexgraph.plan.policy import TIERS, row_ranges


@dataclass
class StepInputs:
    """Positions and masks of GPU batch k at token step i (shared by all its layers)."""
    slot: int                   # first cache slot written at this step
    new: int                    # tokens computed at this step
    pos: torch.Tensor           # [B, new]
    key_valid: torch.Tensor     # [B, slot + new] bool
    cos: torch.Tensor | None    # [B, new, D]
    sin: torch.Tensor | None
    mask: L.Mask                # which keys each new token sees (a [B, 1, new, slot + new] bool tensor, or none)


@dataclass
class BatchInputs:
    ids: torch.Tensor           # [B, P] left-padded prompt ids
    valid: torch.Tensor         # [B, P] bool
    generator: torch.Generator | None = None


class RunState:
    """Everything the node functions share for one block."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, tiers: Tiers, weight_homes: list[dict[str, WeightHome]],
                 cache_homes: dict[tuple[int, int], CacheHome], kv_rows, act_rows, prompt_len: int,
                 sampling: SamplingParams, kv_attn: tuple[str, str, str] | None = None,
                 compress_cache: bool = False, record_logits: bool = False, cache_dtype: torch.dtype | None = None,
                 scratch_bytes: dict[tuple, tuple[str, int]] | None = None):
        self.spec, self.dtype, self.tiers = spec, dtype, tiers
        self.cache_dtype = cache_dtype or dtype               # a dense cache as kept (the storage dtype)
        self.scratch_bytes = scratch_bytes or {}              # buffer id -> (tier, planned bytes)
        self._scratch: dict[tuple, torch.Tensor] = {}
        self.ct = tiers.compute_tier
        self.weight_homes, self.cache_homes = weight_homes, cache_homes
        self.kv_rows, self.act_ranges = kv_rows, row_ranges(act_rows)
        self.prompt_len, self.sampling = prompt_len, sampling
        self.kv_attn = kv_attn or (self.ct,) * len(TIERS)    # where rows homed on gpu, cpu, disk are attended
        self.compress_cache = compress_cache
        self.record_logits = record_logits                    # keep the head's logits (tests, quality checks)
        self.kernels = EAGER                                  # or compiled ones (ExecOptions.compile)
        self.logits: list[list[torch.Tensor]] = []           # per batch: float32 [B, V] per step
        self.inv_freq = L.rope_inv_freq(spec) if spec.family == "llama" else None
        self.buffers: dict[tuple, object] = {}
        self.sizes: dict[tuple, dict[str, int]] = {}       # instance -> real bytes per tier (measured)
        self.batches: list[BatchInputs] = []
        self.outputs: list[list[torch.Tensor]] = []          # per batch: ids [B] per step
        self._steps: dict[tuple[int, int], StepInputs] = {}
        self._lock = threading.Lock()
        self.live = dict.fromkeys(TIERS, 0)                  # measured bytes of live buffers
        self.live_peak = dict.fromkeys(TIERS, 0)

    # ---- buffers -----------------------------------------------------------------------
    def scratch(self, buf: tuple) -> torch.Tensor:
        """The run's scratch buffer ``buf`` (``("Xw",)``, ``("Xc", tier)``), flat, in the
        working dtype: allocated whole on first use, at the size the plan gave its home."""
        got = self._scratch.get(buf)
        if got is None:
            if buf not in self.scratch_bytes:
                raise ExecutionError(f"the plan has no {buf[0]} scratch home here; re-plan with this flexgraph")
            tier, nbytes = self.scratch_bytes[buf]
            got = self._scratch[buf] = self.tiers.empty(tier, (nbytes // self.dtype.itemsize,), self.dtype)
        return got

    def put(self, inst: tuple, value, tier_bytes: dict[str, int]) -> None:
        with self._lock:
            self.buffers[inst] = value
            self.sizes[inst] = tier_bytes
            for t, n in tier_bytes.items():
                self.live[t] += n
                self.live_peak[t] = max(self.live_peak[t], self.live[t])

    def drop(self, inst: tuple) -> None:
        with self._lock:
            self.buffers.pop(inst, None)
            for t, n in self.sizes.pop(inst, {}).items():
                self.live[t] -= n

    def new_block(self, batches: list[BatchInputs]) -> None:
        self.batches = batches
        self.outputs = [[] for _ in batches]
        self.logits = [[] for _ in batches]
        self._steps.clear()

    def attn_tier(self, home_tier: str, i: int) -> str:
        """The tier where attention over cache rows homed on ``home_tier`` runs at step ``i``
        (the prefill always on the compute tier; see :meth:`Sizes.attn_tiers`)."""
        return self.kv_attn[TIERS.index(home_tier)] if i > 0 else self.ct

    def step(self, i: int, k: int) -> StepInputs:
        key = (i, k)
        with self._lock:              # lanes ask concurrently (load_cache, compute)
            got = self._steps.get(key)
            if got is None:
                got = self._steps[key] = self._make_step(i, k)
            return got

    def _make_step(self, i: int, k: int) -> StepInputs:
        b = self.batches[k]
        dev = self.tiers.torch_device(self.ct)
        if i == 0:
            slot, new = 0, self.prompt_len
            pos = L.positions_from_valid(b.valid)
            key_valid = b.valid
        else:
            slot, new = self.prompt_len + i - 1, 1
            pos = b.valid.sum(-1, keepdim=True) + (i - 1)
            key_valid = torch.cat([b.valid, torch.ones(b.valid.shape[0], i, dtype=torch.bool)], dim=1)
        pos, key_valid = pos.to(dev), key_valid.to(dev)
        cos = sin = None
        if self.inv_freq is not None:
            cos, sin = L.rope_cos_sin(self.inv_freq, pos, self.dtype)
        return StepInputs(slot, new, pos, key_valid, cos, sin, L.attention_mask(key_valid, slot, new, self.spec))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _held_bytes(t: torch.Tensor) -> int:
    """The bytes from the first row of ``t`` to the end of its last row's stride (a
    row-padded view holds more than its elements)."""
    return t.shape[0] * t.stride(0) * t.element_size() if t.dim() and t.shape[0] else _nbytes(t)


# ---- loads ------------------------------------------------------------------------------
def load_weight(st: RunState, i: int, j: int, k: int, keys: dict) -> None:
    """Copy the off-compute-tier weights of layer j into a working buffer on the compute tier."""
    buf, size = {}, 0
    for role, home in st.weight_homes[j].items():
        if home.tier == st.ct:
            continue
        if home.qdisk is not None:          # compressed: one read of its bytes, viewed as a QTensor
            lay = home.qdisk.layout
            raw = st.tiers.working(st.ct, (lay.nbytes,), torch.uint8)
            st.tiers.read(home.qdisk.whole(), raw)
            t = qtensor_from_bytes(raw, lay.shape, lay.dtype, lay.group_dim, lay.group_size)
        elif home.q is not None:
            t = st.tiers.working_q(st.ct, home.q.shape, home.q.dtype, home.q.group_dim)
            t.copy_(home.q)
        elif home.tier == "disk":
            t = st.tiers.working(st.ct, home.disk.shape, home.disk.dtype)
            st.tiers.read(home.disk, t)
        else:
            t = st.tiers.working(st.ct, home.tensor.shape, home.tensor.dtype)
            t.copy_(home.tensor, non_blocking=True)
        buf[role] = t
        size += t.nbytes if isinstance(t, QTensor) else _nbytes(t)
    st.put(keys[("Wb", i, j, k)], buf, {st.ct: size})


@dataclass
class _QRows:
    """Compressed working copies of one home tier's cache rows: ``[T, r, D]`` if seq-major
    (rows homed on disk), else ``[r, T, D]``; grouped along ``D``."""
    k: QTensor
    v: QTensor
    seq_major: bool


def load_cache(st: RunState, i: int, j: int, k: int, keys: dict) -> None:
    """Working copies, on the tier where they are attended, of the KV rows homed elsewhere,
    with their cached prefix (compressed as stored, with a compressed cache)."""
    step = st.step(i, k)
    total = step.slot + step.new                  # keys after this step's tokens are written
    prefix = step.slot                            # tokens already cached
    home = st.cache_homes[(j, k)]
    buf, sizes = {}, {}
    d = st.spec.head_dim
    for seg in home.segments:
        at = st.attn_tier(seg.tier, i)
        if at == seg.tier:
            continue
        r = seg.size
        if st.compress_cache:
            if seg.tier == "disk":
                # seq-major [T, r, D]: the prefix of each of the three parts is one contiguous read
                kq = st.tiers.working_q(at, (total, r, d), st.dtype, CACHE_GROUP_DIM)
                vq = st.tiers.working_q(at, (total, r, d), st.dtype, CACHE_GROUP_DIM)
                st.tiers.read_q(seg.kq_disk, kq, prefix)
                st.tiers.read_q(seg.vq_disk, vq, prefix)
                buf[seg.tier] = _QRows(kq, vq, True)
            else:
                kq = st.tiers.working_q(at, (r, total, d), st.dtype, CACHE_GROUP_DIM)
                vq = st.tiers.working_q(at, (r, total, d), st.dtype, CACHE_GROUP_DIM)
                if prefix:
                    kq.narrow(1, 0, prefix).copy_(seg.kq.narrow(1, 0, prefix))
                    vq.narrow(1, 0, prefix).copy_(seg.vq.narrow(1, 0, prefix))
                buf[seg.tier] = _QRows(kq, vq, False)
            sizes[at] = sizes.get(at, 0) + kq.nbytes + vq.nbytes
            continue
        if seg.tier == "disk":
            # the prompt's tokens straight into the rows of the row-major buffer the
            # attention wants (over a strided view of a seq-major buffer PyTorch's attention
            # ran 3x slower here), the generated ones transposed from seq-major (DiskKV)
            kb, vb = _row_major_prefix(st, at, (seg.k_disk, seg.v_disk), total, prefix, r, d)
        else:
            kb = st.tiers.working(at, (r, total, d), st.cache_dtype)
            vb = st.tiers.working(at, (r, total, d), st.cache_dtype)
            if prefix:
                kb[:, :prefix].copy_(seg.k[:, :prefix], non_blocking=True)
                vb[:, :prefix].copy_(seg.v[:, :prefix], non_blocking=True)
        buf[seg.tier] = (kb, vb)
        sizes[at] = sizes.get(at, 0) + 2 * _held_bytes(kb)
    st.put(keys[("Cb", i, j, k)], buf, sizes)


def _row_major_prefix(st: RunState, at: str, disks: tuple[DiskKV, ...], total: int, prefix: int, r: int,
                      d: int) -> list[torch.Tensor]:
    """For each of keys and values on disk (:class:`~flexgraph.exec.homes.DiskKV`), a
    row-major ``[r, total, D]`` working buffer on tier ``at``, in the dtype the cache is
    kept in, holding its first ``prefix`` tokens: the prompt's read row by row into place,
    the generated ones (``prefix - P``, at most the generation length) read seq-major into
    a staging buffer and transposed.  Every read is issued before any transposing copy, so
    the disk is not left idle between them."""
    dtype = st.cache_dtype
    out = [st.tiers.working_rows(at, r, total, d, dtype) for _ in disks]
    if not prefix:
        return out
    p = disks[0].prompt_len
    if prefix < p:
        raise ExecutionError(f"a cache prefix of {prefix} tokens ends inside the prompt's {p}; re-plan")
    for disk, o in zip(disks, out):
        st.tiers.read_rows(disk.prompt, o[:, :p])
    if prefix > p:
        staged = [st.tiers.working(at, (prefix - p, r, d), dtype) for _ in disks]
        for disk, buf in zip(disks, staged):
            st.tiers.read(disk.generated, buf, _nbytes(buf))
        for o, buf in zip(out, staged):
            o[:, p:prefix].copy_(buf.transpose(0, 1))
    return out


def load_hidden(st: RunState, i: int, j: int, k: int, keys: dict) -> None:
    """Bring the activation H(i, j-1, k) back to the compute tier from its homes."""
    parts = st.buffers[keys[("Hh", i, j - 1, k)]]
    kept = st.buffers.get(keys.get(("Hk", i, j - 1, k)))
    shape, dtype = parts["shape"], parts["dtype"]
    full = st.tiers.working(st.ct, shape, dtype)
    for tier, rows in st.act_ranges.items():
        if tier == st.ct:
            full[rows].copy_(kept)
        elif tier == "disk":
            st.tiers.read(parts[tier], full[rows])
        else:
            full[rows].copy_(parts[tier], non_blocking=True)
    st.put(keys[("Hc", i, j - 1, k)], full, {st.ct: _nbytes(full)})


# ---- compute ------------------------------------------------------------------------------
def compute(st: RunState, i: int, j: int, k: int, keys: dict) -> None:
    spec = st.spec
    kind = spec.layer(j).kind
    step = st.step(i, k)
    w = _layer_weights(st, i, j, k, keys)
    if kind == EMBED:
        x = st.batches[k].ids.to(st.tiers.torch_device(st.ct)) if i == 0 else \
            st.buffers[keys[("Hc", i - 1, spec.num_layers - 1, k)]][:, None]
    else:
        x = st.buffers[keys[("Hc", i, j - 1, k)]]
    if kind == EMBED:
        w, x = _embedding_rows(w, x, st.dtype)
    segments, finish = _cache_segments(st, i, j, k, keys) if kind == ATTN else (None, None)
    inputs = _StepView(step)
    if all(isinstance(t, torch.Tensor) and t.dtype == st.dtype for t in w.values()):
        out = compute_layer(spec, j, w, x, inputs, segments, st.inv_freq, st.kernels)
    else:       # compressed or narrower-stored weights decode on access: eager maths
        out = compute_layer(spec, j, _Decoded(w, st.dtype, st.scratch), x, inputs, segments, st.inv_freq)
    if finish is not None:
        finish()
    if kind == HEAD:
        if st.record_logits:
            st.logits[k].append(out.detach().to("cpu", torch.float32, copy=True))
        out = sample(out, st.sampling, st.batches[k].generator)
        st.outputs[k].append(out.to("cpu"))
    st.put(keys[("Hc", i, j, k)], out, {st.ct: _nbytes(out)})


class _StepView:
    """The attributes :func:`compute_layer` reads from a sequence state."""
    __slots__ = ("pos", "slot", "key_valid", "mask", "_cos", "_sin")

    def __init__(self, step: StepInputs):
        self.pos, self.slot, self.key_valid, self.mask = step.pos, step.slot, step.key_valid, step.mask
        self._cos, self._sin = step.cos, step.sin

    def rope(self, inv_freq, dtype):
        return self._cos, self._sin     # computed once per step, in the working dtype


def _layer_weights(st: RunState, i: int, j: int, k: int, keys: dict) -> dict[str, torch.Tensor | QTensor]:
    """Layer j's weights by role: homes on the compute tier, else the working buffer
    (compressed ones as QTensors, decoded on use)."""
    working = None
    for buf_id, inst in keys.items():
        if buf_id[0] == "Wb" and buf_id[2] == j:
            working = st.buffers[inst]
    w = {}
    for role, home in st.weight_homes[j].items():
        if home.tier == st.ct:
            w[role] = home.q if home.q is not None else home.tensor
        else:
            w[role] = working[role]
    return w


class _Decoded(Mapping):
    """Weights by role for the layer maths; a compressed one — or one stored in a narrower
    dtype than the working ``dtype`` — is decoded when the maths uses it.

    A product (:meth:`linear`, which :func:`~flexgraph.models.layers.linear` calls)
    decodes its matrix a chunk of rows at a time
    (:func:`~flexgraph.graph.builder.chunk_rows`) and multiplies each chunk while it is
    still in the cache: decoding a whole matrix to memory first and reading it back
    made a decode step's product 2x slower than reading float32.  A weight read whole
    (``w[role]``: learned positions) is decoded whole.  Either way into one buffer — the
    run's ``Xw`` scratch when ``scratch`` (:meth:`RunState.scratch`) is given, else one
    allocated here — so a decoded weight is valid until the next is asked for (only
    matrices are decoded or stored narrower; norms and biases are read as they are).
    """
    __slots__ = ("_w", "_dtype", "_scratch", "_space")

    def __init__(self, w: dict, dtype: torch.dtype, scratch=None):
        self._w, self._dtype, self._scratch = w, dtype, scratch
        self._space: torch.Tensor | None = None

    def _decode(self, t) -> torch.Tensor:
        n = _numel(t)
        space = self._space
        if space is None or space.numel() < n or space.device != t.device:
            self._space = space = None                  # the old one goes before the new one comes
            space = self._scratch(("Xw",)) if self._scratch else torch.empty(n, dtype=self._dtype, device=t.device)
            if space.numel() < n:
                raise ExecutionError(f"a {tuple(t.shape)} weight does not fit the plan's decode scratch; re-plan")
            self._space = space
        out = space[:n].view(t.shape)
        if isinstance(t, QTensor):
            return dequantize_into(t, out)
        return out.copy_(t)

    def __getitem__(self, role: str) -> torch.Tensor:
        t = self._w[role]
        if not isinstance(t, QTensor) and t.dtype == self._dtype:
            return t
        return self._decode(t)

    def linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        # x: [..., K] -> [..., N], the weight [N, K] decoded a chunk of rows at a time
        t, bias = self._w[f"{prefix}.weight"], self._w.get(f"{prefix}.bias")
        if not isinstance(t, QTensor) and t.dtype == self._dtype:
            return dense_linear(x, t, bias)
        n_out, cols = t.shape[0], t.shape[1]
        m = x.numel() // cols
        rows = chunk_rows(cols, self._dtype.itemsize, m)
        if rows >= n_out:
            return dense_linear(x, self._decode(t), bias)
        # each chunk's product goes straight into its part of the output (a BLAS product
        # writes a row-major block with any row stride): a product's own output and a copy
        # per chunk cost a prefill's fc1 (OPT-1.3B, 16 x 512 tokens) two fresh 134 MB
        # temporaries and a 268 MB copy.  A skinny product (as dense_linear) fills rows of
        # weight @ x^T, then transposes once; any other fills columns of x @ weight^T.
        x2, skinny = x.reshape(m, cols), is_skinny(m, x)
        out2 = torch.empty((n_out, m) if skinny else (m, n_out), dtype=x.dtype, device=x.device)
        for a in range(0, n_out, rows):
            n = min(rows, n_out - a)
            w, b = self._decode(_row_chunk(t, a, n)), None if bias is None else bias[a:a + n]
            if skinny:
                skinny_product(x2, w, b, out_t=out2[a:a + n])
            elif b is None:
                torch.mm(x2, w.t(), out=out2[:, a:a + n])
            else:
                torch.addmm(b, x2, w.t(), out=out2[:, a:a + n])
        return (out2.t().contiguous() if skinny else out2).view(*x.shape[:-1], n_out)

    def __contains__(self, role) -> bool:
        return role in self._w

    def __iter__(self):
        return iter(self._w)

    def __len__(self) -> int:
        return len(self._w)


def _row_chunk(t, a: int, n: int):
    """Rows ``[a, a + n)`` of a matrix; of a 4-bit one (grouped along rows, ``a`` on a group
    boundary) the groups that hold them."""
    if not isinstance(t, QTensor):
        return t[a:a + n]
    gs = t.group_size
    g0, g1 = a // gs, -(-(a + n) // gs)
    return QTensor(t.packed[g0 * gs // 2:g1 * gs // 2], t.scale[g0:g1], t.mn[g0:g1], (n, t.shape[1]), t.dtype, 0, gs)


def _numel(t: torch.Tensor | QTensor) -> int:
    return t.numel if isinstance(t, QTensor) else t.numel()


def _embedding_rows(w: dict, ids: torch.Tensor, dtype: torch.dtype):
    """A compressed (or narrower-stored) embedding table is not decoded whole: only the
    rows of this step's tokens (4-bit: the groups holding them), as a compact table the
    ids are re-indexed into (same values, so the same result as a lookup in the decoded
    table)."""
    table = w.get("embed_tokens.weight")
    if isinstance(table, QTensor):
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return {**w, "embed_tokens.weight": dequantize_rows(table, uniq)}, inverse
    if table is not None and table.dtype != dtype:
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return {**w, "embed_tokens.weight": table[uniq].to(dtype)}, inverse
    return w, ids


def _cache_segments(st: RunState, i: int, j: int, k: int, keys: dict):
    """``(segments, finish)``: the ``(rows, k, v)`` buffers attention reads and writes, and
    what to do after it (put the new entries, quantised or rounded, into their slots, when
    the cache is kept compressed or narrower than the working dtype; else None)."""
    home = st.cache_homes[(j, k)]
    working = st.buffers.get(keys.get(("Cb", i, j, k)), {})
    segs = []
    if not st.compress_cache and st.cache_dtype == st.dtype:
        for seg in home.segments:
            if st.attn_tier(seg.tier, i) == seg.tier:    # attended where it lives
                segs.append((seg.rows, seg.k, seg.v))
            else:
                segs.append((seg.rows, *working[seg.tier]))
        return segs, None
    step = st.step(i, k)
    slot, new = step.slot, step.new
    total = slot + new
    d = st.spec.head_dim
    encode = []                      # (dense in the stored layout, as stored, token dim)
    used: dict[str, int] = {}        # elements of each tier's cache scratch handed out
    for seg in home.segments:
        at = st.attn_tier(seg.tier, i)
        if at == seg.tier:
            src, seq_major = ((seg.kq, seg.vq) if st.compress_cache else (seg.k, seg.v)), False
        elif st.compress_cache:
            rows = working[seg.tier]
            src, seq_major = (rows.k, rows.v), rows.seq_major
        else:
            src, seq_major = working[seg.tier], False     # row-major [r, T, D] (load_cache)
        # decoded into a row-major [r, T, D] buffer whatever the stored layout: a seq-major
        # one (the 4-bit disk cache's) is decoded through its transposed view, which halves
        # the decode rate, but attention over a strided view of a seq-major buffer ran 3x
        # slower
        tok = 0 if seq_major else 1          # the token dim of the stored layout
        space = st.scratch(("Xc", at))
        dense = []
        for q in src:
            a = used.get(at, 0)
            used[at] = a + seg.size * total * d
            if used[at] > space.numel():
                raise ExecutionError(f"the cache rows attended on {at} do not fit the plan's cache scratch; re-plan")
            buf = space[a:used[at]].view(seg.size, total, d)
            as_stored = buf.transpose(0, 1) if seq_major else buf
            if slot:
                _decode_into(q.narrow(tok, 0, slot), as_stored.narrow(tok, 0, slot))
            dense.append(buf)
            encode.append((as_stored, q, tok))
        segs.append((seg.rows, dense[0], dense[1]))

    def finish() -> None:
        # this step's entries were used in full precision (as FlexGen does); now into their slots
        for buf, q, tok in encode:
            _encode_into(buf.narrow(tok, slot, new), q.narrow(tok, slot, new))

    return segs, finish


def _decode_into(stored, out: torch.Tensor) -> None:
    if isinstance(stored, QTensor):
        dequantize_into(stored, out)
    else:
        out.copy_(stored)           # from the storage dtype


def _encode_into(dense: torch.Tensor, stored) -> None:
    if isinstance(stored, QTensor):
        quantize_into(dense, stored)
    else:
        stored.copy_(dense)         # rounded to the storage dtype


# ---- stores --------------------------------------------------------------------------------
def _seq_major_tokens(st: RunState, tier: str, rows: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Tokens [a, b) of a row-major [r, T, D] cache buffer on ``tier`` as a contiguous
    seq-major [b - a, r, D] working copy there (page-aligned on the host, so the disk
    write bypasses the page cache)."""
    r, _, d = rows.shape
    return st.tiers.working(tier, (b - a, r, d), rows.dtype).copy_(rows[:, a:b].transpose(0, 1))


def _store_disk_tokens(st: RunState, tier: str, disk: DiskKV, rows: torch.Tensor, a: int, b: int) -> None:
    """Write tokens [a, b) of a row-major [r, T, D] buffer on ``tier`` to their
    :class:`~flexgraph.exec.homes.DiskKV`: the prompt's (the prefill writes exactly
    those) row by row, generated ones seq-major."""
    p = disk.prompt_len
    if a < p:
        if (a, b) != (0, p):
            raise ExecutionError(f"cache tokens [{a}, {b}) cross the prompt's {p} on disk; re-plan")
        st.tiers.write_rows(disk.prompt, rows[:, :p])
        return
    gen = disk.generated
    st.tiers.write(gen, _seq_major_tokens(st, tier, rows, a, b), gen.lead_bytes(a - p))


def store_cache(st: RunState, i: int, j: int, k: int, keys: dict) -> None:
    """Write this step's new KV entries of the off-compute rows to their homes."""
    step = st.step(i, k)
    a, b = step.slot, step.slot + step.new
    working = st.buffers[keys[("Cb", i, j, k)]]
    for seg in st.cache_homes[(j, k)].segments:
        if st.attn_tier(seg.tier, i) == seg.tier:
            continue
        if st.compress_cache:
            rows: _QRows = working[seg.tier]
            if seg.tier == "disk":
                st.tiers.write_q(seg.kq_disk, rows.k.narrow(0, a, b - a), a)
                st.tiers.write_q(seg.vq_disk, rows.v.narrow(0, a, b - a), a)
            else:
                seg.kq.narrow(1, a, b - a).copy_(rows.k.narrow(1, a, b - a))
                seg.vq.narrow(1, a, b - a).copy_(rows.v.narrow(1, a, b - a))
            continue
        kb, vb = working[seg.tier]           # row-major [r, T, D], as kept (load_cache)
        if seg.tier == "disk":
            at = st.attn_tier(seg.tier, i)
            _store_disk_tokens(st, at, seg.k_disk, kb, a, b)
            _store_disk_tokens(st, at, seg.v_disk, vb, a, b)
        else:
            seg.k[:, a:b].copy_(kb[:, a:b], non_blocking=True)
            seg.v[:, a:b].copy_(vb[:, a:b], non_blocking=True)
    st.put(keys[("Cstored", i, j, k)], True, {})


def store_hidden(st: RunState, i: int, j: int, k: int, keys: dict) -> None:
    """Move the off-compute rows of H(i, j, k) to their homes; keep the compute rows."""
    h = st.buffers[keys[("Hc", i, j, k)]]
    parts: dict = {"shape": tuple(h.shape), "dtype": h.dtype}
    sizes = {}
    for tier, rows in st.act_ranges.items():
        if tier == st.ct:
            kept = h[rows].clone()
            st.put(keys[("Hk", i, j, k)], kept, {st.ct: _nbytes(kept)})
        elif tier == "disk":
            dt = DiskTensor(st.tiers.file(f"act-{k}-{j % 2}.raw"), 0, tuple(h[rows].shape), h.dtype)
            st.tiers.write(dt, h[rows])
            parts[tier] = dt
            sizes["disk"] = dt.nbytes
        else:
            t = st.tiers.working(tier, h[rows].shape, h.dtype)
            t.copy_(h[rows], non_blocking=True)
            parts[tier] = t
            sizes[tier] = _nbytes(t)
    st.put(keys[("Hh", i, j, k)], parts, sizes)


RUNNERS = {"load_weight": load_weight, "load_cache": load_cache, "load_hidden": load_hidden,
           "compute": compute, "store_cache": store_cache, "store_hidden": store_hidden}
