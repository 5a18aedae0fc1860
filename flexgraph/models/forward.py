"""The whole model in memory: prefill and decode, built from :mod:`flexgraph.models.layers`.

This is the plain, unscheduled forward pass — every weight and the whole KV cache in one
place — used as the reference the executor is held to, and by the tests that compare
the layer maths with transformers.  The executor runs the very same layer functions,
one (token, layer, batch) square at a time, with data spread over tiers.

A batch of prompts of different lengths is left-padded to a common length ``P``;
``valid: [B, P]`` marks real tokens.  Cache slot ``t`` holds the token at column ``t`` of
the padded sequence, so slots line up across the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from flexgraph.models import layers as L
from flexgraph.models.sampling import SamplingParams, make_generator, sample
from flexgraph.models.spec import ATTN, EMBED, HEAD, MLP, ModelSpec


class KVCache:
    """Preallocated keys and values of one attention layer: ``k, v: [B * nkv, S, D]``."""

    def __init__(self, rows: int, max_len: int, head_dim: int, dtype: torch.dtype, device="cpu"):
        self.k = torch.zeros(rows, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(rows, max_len, head_dim, dtype=dtype, device=device)

    def segments(self):
        return [(slice(None), self.k, self.v)]


@dataclass
class SequenceState:
    """Per-batch bookkeeping shared by every layer of a step."""
    valid: torch.Tensor          # [B, S_max] bool: which cache slots hold real tokens
    slot: int                    # first slot of the tokens being computed
    pos: torch.Tensor            # [B, s] positions of the tokens being computed

    @classmethod
    def for_prompt(cls, valid_prompt: torch.Tensor, max_len: int) -> SequenceState:
        # valid_prompt: [B, P] -> state for the prefill step
        b, p = valid_prompt.shape
        valid = torch.zeros(b, max_len, dtype=torch.bool)
        valid[:, :p] = valid_prompt
        return cls(valid, 0, L.positions_from_valid(valid_prompt))

    def advance(self, new_tokens: int) -> None:
        """Move to the next decode step after ``new_tokens`` were computed."""
        self.slot += new_tokens
        self.valid[:, self.slot] = True
        self.pos = (self.valid[:, :self.slot + 1].sum(-1, keepdim=True) - 1)

    @property
    def key_valid(self) -> torch.Tensor:
        return self.valid[:, :self.slot + self.pos.shape[1]]

    @property
    def mask(self) -> torch.Tensor | None:
        """The attention mask of this step (None: each layer builds it)."""
        return None

    def rope(self, inv_freq: torch.Tensor, dtype: torch.dtype):
        """cos, sin of this step's positions: [B, s, D] each."""
        return L.rope_cos_sin(inv_freq, self.pos, dtype)


def layer_weights(spec: ModelSpec, j: int, lookup: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of layer ``j`` by role, fetched through ``lookup(store name)``."""
    return {L.role_of(w.name): lookup(spec.storage_name(w.name)) for w in spec.layer_weights(j)}


@dataclass(frozen=True)
class Kernels:
    """The layer maths a compute calls: eager functions, or ``torch.compile``d ones.

    Compiling fuses the element-wise chains (norms in float32, RoPE, SiLU x up,
    residuals) into single passes over memory; on a CPU those chains cost about as much
    as the matrix products.  The attention kernel and the cache update stay eager.
    """
    mlp: Callable = L.mlp
    attention_pre: Callable = L.attention_pre
    attention_post: Callable = L.attention_post
    head: Callable = L.head


EAGER = Kernels()
_compiled: Kernels | None = None


def compiled_kernels() -> Kernels:
    """The compiled kernels (compiled lazily on first use, once per shape family)."""
    global _compiled
    if _compiled is None:
        def c(fn):
            return torch.compile(fn, dynamic=True)
        _compiled = Kernels(c(L.mlp), c(L.attention_pre), c(L.attention_post), c(L.head))
    return _compiled


def warm_up(kernels: Kernels, spec: ModelSpec, dtype: torch.dtype, batch: int, prompt_len: int,
            device: str | torch.device = "cpu") -> None:
    """Call every kernel once with a prefill's and a decode step's shapes, so that
    compiling happens here and not inside a timed run (sizes 0 and 1 are specialised by
    the compiler, so both shapes are needed).  Weights are zeros of the right shapes."""
    def weights(j):
        return {L.role_of(w.name): torch.zeros(w.shape, dtype=dtype, device=device) for w in spec.layer_weights(j)}

    wa, wm, wh = weights(1), weights(2), weights(spec.num_layers - 1)
    with torch.inference_mode():
        for new in (prompt_len, 1):
            h = torch.zeros(batch, new, spec.hidden_size, dtype=dtype, device=device)
            cos = sin = None
            if spec.family == "llama":
                cos = torch.zeros(batch, new, spec.head_dim, dtype=dtype, device=device)
                sin = torch.zeros_like(cos)     # distinct tensors: aliasing would be guarded on
            kernels.attention_pre(spec, wa, h, cos, sin)
            kernels.attention_post(spec, wa, h, torch.zeros(batch, spec.num_heads, new, spec.head_dim, dtype=dtype,
                                                           device=device))
            kernels.mlp(spec, wm, h)
        kernels.head(spec, wh, torch.zeros(batch, 1, spec.hidden_size, dtype=dtype, device=device))


def compute_layer(spec: ModelSpec, j: int, w: Mapping[str, torch.Tensor], x: torch.Tensor,
                  st: SequenceState, segments, inv_freq: torch.Tensor | None, kernels: Kernels = EAGER):
    """One square's computation. x: ids [B, s] for the embedding, else hidden [B, s, H].

    Returns the layer's output: hidden [B, s, H], or logits [B, V] of the last position
    for the head (an attention layer's new keys and values go into ``segments``).  A CPU
    prefill of many tokens is computed a few whole sequences at a time
    (:data:`PREFILL_CHUNK_TOKENS`).
    """
    kind = spec.layer(j).kind
    if kind == EMBED:
        return L.embed(spec, w, x, st.pos)
    if kind == HEAD:
        return kernels.head(spec, w, x[:, -1:].contiguous())[:, 0]
    if kind == MLP:
        return by_sequences(x, lambda xs, b0, b1: kernels.mlp(spec, w, xs))
    cos = sin = None
    if inv_freq is not None:
        cos, sin = st.rope(inv_freq, x.dtype)
    mask, nkv = st.mask, spec.num_kv_heads

    def attention(xs: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        if b1 - b0 == x.shape[0]:                                   # the whole batch, as it is
            return L.attention_layer(spec, w, xs, segments, st.slot, st.key_valid, cos, sin, mask,
                                     kernels.attention_pre, kernels.attention_post)[0]
        return L.attention_layer(
            spec, w, xs, segments_of(segments, x.shape[0] * nkv, b0 * nkv, b1 * nkv), st.slot,
            st.key_valid[b0:b1], cos[b0:b1] if cos is not None else None, sin[b0:b1] if sin is not None else None,
            mask.batches(b0, b1, x.device) if mask is not None else None,
            kernels.attention_pre, kernels.attention_post)[0]

    return by_sequences(x, attention)


def by_sequences(x: torch.Tensor, layer: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """``layer(xs, b0, b1)`` (``xs = x[b0:b1]``: [b, s, H] -> [b, s, H]) over the whole
    batch at once, or over chunks of :func:`prefill_chunk` sequences into one output."""
    per_chunk = prefill_chunk(x)
    if per_chunk is None:
        return layer(x, 0, x.shape[0])
    out = torch.empty_like(x)
    for b0 in range(0, x.shape[0], per_chunk):
        b1 = min(b0 + per_chunk, x.shape[0])
        out[b0:b1] = layer(x[b0:b1], b0, b1)
    return out


# A CPU prefill computes this many tokens' worth of whole sequences at a time.  One layer
# over a large batch makes intermediates of hundreds of MB (SmolLM2's MLP over 256 x 512
# tokens: 805 MB each) that stream through memory and are faulted in afresh every call;
# in chunks they are reused from the cache and the allocator.  SmolLM2's attention and
# MLP over 256 prompts of 512, timed interleaved: 45.0 ms a sequence in one piece, 33.8 in
# chunks of 8 sequences; OPT-1.3B's at 16 x 512 were as fast in chunks of 4,096 tokens as
# whole, and slower in chunks of 1,024.  A GPU wants the whole batch: no chunks there.
PREFILL_CHUNK_TOKENS = 4096


def prefill_chunk(x: torch.Tensor) -> int | None:
    """Sequences per chunk for a layer's input ``x: [B, s, H]``, or None to compute it whole."""
    return chunk_sequences(x.shape[0], x.shape[1]) if x.device.type == "cpu" else None


def chunk_sequences(batch: int, new_tokens: int) -> int | None:
    """Sequences per chunk of a CPU compute of ``batch`` sequences of ``new_tokens`` each,
    or None where it is computed whole (also what the planner counts its temporaries by)."""
    if new_tokens == 1 or batch * new_tokens <= PREFILL_CHUNK_TOKENS:
        return None
    per_chunk = max(1, PREFILL_CHUNK_TOKENS // new_tokens)
    return None if per_chunk >= batch else per_chunk


def segments_of(segments, total_rows: int, r0: int, r1: int) -> list:
    """The cache segments (``(rows, k, v)`` over ``total_rows = B * nkv`` rows, see
    :func:`flexgraph.models.layers.attention_layer`) of rows ``[r0, r1)``, renumbered from
    0 and with their buffers cut to those rows."""
    out = []
    for rows, k, v in segments:
        start, stop = rows.indices(total_rows)[:2]
        lo, hi = max(start, r0), min(stop, r1)
        if lo < hi:
            out.append((slice(lo - r0, hi - r0), k[lo - start:hi - start], v[lo - start:hi - start]))
    return out


class InMemoryModel:
    """A model whose weights are all in memory, with gpt-fast-style preallocated caches."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.spec, self.dtype = spec, dtype
        self.layer_w = [layer_weights(spec, j, lambda n: weights[n].to(dtype)) for j in range(spec.num_layers)]
        self.inv_freq = L.rope_inv_freq(spec) if spec.family == "llama" else None

    def run_step(self, x: torch.Tensor, st: SequenceState, caches: list[KVCache | None]) -> torch.Tensor:
        # x: ids [B, s] -> logits [B, V] of the last position
        for j in range(self.spec.num_layers):
            cache = caches[j]
            x = compute_layer(self.spec, j, self.layer_w[j], x, st, cache.segments() if cache else None,
                                 self.inv_freq)
        return x

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, params: SamplingParams = SamplingParams(),
                 return_logits: bool = False):
        """Left-padded ``input_ids: [B, P]`` -> generated ids ``[B, max_new_tokens]``
        (and the logits ``[B, max_new_tokens, V]`` they were chosen from)."""
        b, p = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        max_len = p + max_new_tokens
        rows = b * self.spec.num_kv_heads
        caches = [KVCache(rows, max_len, self.spec.head_dim, self.dtype) if self.spec.layer(j).kind == ATTN
                  else None for j in range(self.spec.num_layers)]
        st = SequenceState.for_prompt(valid, max_len)
        gen = make_generator(params)
        x, out, all_logits = input_ids, [], []
        for step in range(max_new_tokens):
            logits = self.run_step(x, st, caches)
            nxt = sample(logits, params, gen)
            out.append(nxt)
            all_logits.append(logits)
            if step + 1 < max_new_tokens:
                st.advance(x.shape[1])
                x = nxt[:, None]
        ids = torch.stack(out, dim=1)
        return (ids, torch.stack(all_logits, dim=1)) if return_logits else ids
