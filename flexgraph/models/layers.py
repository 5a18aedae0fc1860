"""Layer maths as small pure functions, for prefill and for decode with a KV cache.

Every function takes tensors and returns tensors; none keeps state or moves data
between tiers (that is the executor's job).  The functions follow Hugging Face
transformers' order of operations, so float32 results agree to rounding.

Shapes (``B`` sequences, ``s`` new tokens, ``T`` keys so far, ``H`` hidden size,
``D`` head dim, ``nh`` query heads, ``nkv`` KV heads, ``g = nh // nkv``, ``R = B * nkv``):

- hidden states ``h: [B, s, H]``
- queries ``q: [B, nh, s, D]``; query head ``n * g + i`` uses KV head ``n`` (as
  transformers' ``repeat_kv``), but K/V are never repeated: attention runs PyTorch's fused
  kernel with grouped queries
- a KV cache buffer ``k, v: [R, S, D]`` (row ``b * nkv + n``), of which ``[:, :T]`` is valid
- key validity (left padding): ``key_valid: [B, T]`` bool; the attention mask of a step
  ``[B, 1, s, T]`` is built once and shared by its layers

Weights come in as a mapping from *role* (the Hugging Face name with the model and block
prefix removed, e.g. ``"self_attn.q_proj.weight"``) to tensor; see :func:`role_of`.  A
mapping that keeps weights in another form (4-bit, or a narrower dtype) may offer
``linear(x, prefix)`` to compute a product without decoding the whole matrix first;
every product goes through :func:`linear`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from flexgraph.models.spec import ModelSpec

Weights = Mapping[str, torch.Tensor]



def role_of(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj.weight``; ``lm_head.weight`` stays."""
    parts = name.split(".")
    if "layers" in parts:
        return ".".join(parts[parts.index("layers") + 2:])
    while parts and parts[0] in ("model", "decoder"):
        parts = parts[1:]
    return ".".join(parts)


# ---- activations and norms --------------------------------------------------------------
def activation(spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """The MLP's activation of ``x``, in place where PyTorch has an in-place kernel
    (ReLU, SiLU): ``x`` is always a product's fresh output that nothing else reads, and a
    second [B, s, ffn] tensor is the largest intermediate of a prefill — under a tight
    run's allocator each one is a fresh mapping faulted in page by page."""
    act = spec.activation
    if act == "relu":
        return F.relu(x, inplace=True)
    if act == "silu":
        return F.silu(x, inplace=True)
    if act == "gelu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., H] -> [..., H]; computed in float32 as transformers does
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def layer_norm(x: torch.Tensor, w: Weights, prefix: str, spec: ModelSpec) -> torch.Tensor:
    # x: [..., H] -> [..., H]
    return F.layer_norm(x, (x.shape[-1],), w.get(f"{prefix}.weight"), w.get(f"{prefix}.bias"), 1e-5)


def linear(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    # x: [..., K] -> [..., N] with the weight [N, K] of ``prefix``
    product = getattr(w, "linear", None)
    if product is not None:
        return product(x, prefix)
    return dense_linear(x, w[f"{prefix}.weight"], w.get(f"{prefix}.bias"))


# A product of few rows (a decode step's batch, the head's last positions) runs on the
# CPU in float32 as (W @ x^T)^T.  MKL's GEMM packs its right-hand operand on each call,
# and in x @ W^T that is the whole weight; with the weight on the left it packs the few
# rows instead.  On the 12-06 EPYC (AVX2, MKL) that ran 1.2-2.2x faster from 8 to 256
# rows for OPT-1.3B's and OPT-6.7B's matrices, and no faster at 512 (the transposing
# copy it needs is one [rows, N] pass).  bfloat16 products go through oneDNN, where it
# was not measured.
SKINNY_ROWS = 256


def is_skinny(rows: int, x: torch.Tensor) -> bool:
    return rows <= SKINNY_ROWS and x.device.type == "cpu" and x.dtype == torch.float32


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [..., K], weight: [N, K], bias: [N] or None -> [..., N]
    rows = x.numel() // x.shape[-1]
    if not is_skinny(rows, x):
        return F.linear(x, weight, bias)
    out_t = skinny_product(x.reshape(rows, -1), weight, bias)        # [N, rows]
    return out_t.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # one transposing copy


def skinny_product(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   out_t: torch.Tensor | None = None) -> torch.Tensor:
    # x2: [rows, K], weight: [n, K] -> out_t: [n, rows] = weight @ x2^T (+ bias per row)
    if bias is None:
        return torch.mm(weight, x2.t(), out=out_t)
    return torch.addmm(bias.unsqueeze(1), weight, x2.t(), out=out_t)


# ---- positions and RoPE -----------------------------------------------------------------
def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    # valid: [B, T] bool -> positions [B, T] long; padding gets position 0 (its output is never used)
    pos = valid.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, with linear or Llama-3 scaling applied."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = spec.rope_scaling_dict
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype):
    # pos: [B, s] -> cos, sin: [B, s, D] in ``dtype`` (computed in float32 first)
    freqs = pos[..., None].float() * inv_freq.to(pos.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, s, n, D]; cos, sin: [B, s, D] (both halves equal) -> [B, s, n, D]
    # x * cos + rotate_half(x) * sin, half by half.
    h = x.shape[-1] // 2
    c, s_ = cos[:, :, None, :h], sin[:, :, None, :h]
    x1, x2 = x[..., :h], x[..., h:]
    if torch.compiler.is_compiling():       # the compiler fuses this into one pass anyway
        return torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1)
    # eager: fused multiply-adds into one output, a third of the passes of cat + mul
    out = torch.empty_like(x)
    torch.mul(x1, c, out=out[..., :h]).addcmul_(x2, s_, value=-1)
    torch.mul(x2, c, out=out[..., h:]).addcmul_(x1, s_)
    return out


# ---- embedding ----------------------------------------------------------------------------
def embed(spec: ModelSpec, w: Weights, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    # ids, pos: [B, s] -> h: [B, s, H]
    x = F.embedding(ids, w["embed_tokens.weight"])
    if spec.family == "llama":
        return x
    if spec.word_embed_proj_dim:
        x = linear(x, w, "project_in")
    # OPT's learned positions are offset by 2; padding (valid-count 0) maps to index 1
    return x + F.embedding(pos + 2, w["embed_positions.weight"])


# ---- attention --------------------------------------------------------------------------
@dataclass(frozen=True)
class Mask:
    """Which keys each new token may see: a bool tensor ``[B, 1, s, T]``, or — when nothing
    is padded and there is no window — no tensor at all: plain causal attention (a
    prefill; the fused kernel then skips the masked half) or all keys (a decode step)."""
    tensor: torch.Tensor | None = None
    causal: bool = False

    def batches(self, b0: int, b1: int, device) -> Mask:
        return self if self.tensor is None else Mask(self.tensor[b0:b1].to(device), self.causal)

    def rows(self, seq: torch.Tensor, device) -> Mask:
        return self if self.tensor is None else Mask(self.tensor[seq].to(device), self.causal)


def attention_mask(key_valid: torch.Tensor, slot: int, new: int, spec: ModelSpec) -> Mask:
    """The mask of a step for every layer: key_valid: [B, T] bool (T = slot + new).

    Causal by cache slot; Mistral's sliding window also by slot (left padding shifts
    query and key alike).  A token always sees itself, so a padding query never has
    every key masked (which would give NaN, and NaN reaches real tokens through the
    cache even when masked).
    """
    t = key_valid.shape[-1]
    window = spec.sliding_window and spec.sliding_window < t
    if not window and bool(key_valid.all()):
        if slot == 0:
            return Mask(causal=True)          # a prefill without padding
        if new == 1:
            return Mask()                     # a decode step sees every key
    k_slots = torch.arange(t, device=key_valid.device)
    q_slots = torch.arange(slot, slot + new, device=key_valid.device)
    allowed = k_slots[None, :] <= q_slots[:, None]                      # [s, T]
    if spec.sliding_window:
        allowed &= k_slots[None, :] > q_slots[:, None] - spec.sliding_window
    mask = key_valid[:, None, :] & allowed[None]                        # [B, s, T]
    mask |= (k_slots[None, :] == q_slots[:, None])[None]
    return Mask(mask[:, None])


def attention_qkv(spec: ModelSpec, w: Weights, x: torch.Tensor, cos: torch.Tensor | None,
                  sin: torch.Tensor | None):
    """Project normalised hidden states to queries and new keys and values.

    x: [B, s, H] -> q: [B, nh, s, D] (scaled for OPT), k, v: [B, nkv, s, D] (views)
    """
    b, s, _ = x.shape
    nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if spec.family == "opt":
        q = linear(x, w, "self_attn.q_proj") * (d ** -0.5)   # OPT scales before the product
    else:
        q = linear(x, w, "self_attn.q_proj")
    k = linear(x, w, "self_attn.k_proj").view(b, s, nkv, d)
    v = linear(x, w, "self_attn.v_proj").view(b, s, nkv, d)
    q = q.view(b, s, nh, d)
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


# in the layer timings' cache key of grouped-query models: 2 = decode queries packed as rows
GROUPED_DECODE = 2


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float) -> torch.Tensor:
    """Scaled dot-product attention with grouped queries (PyTorch's fused kernel).

    q: [n, nh, s, D]; k, v: [n, nkv, T, D] (any strides); mask: tensor [n, 1, s, T] or
    plain causal / none -> [n, nh, s, D].  K and V are never repeated per query head.

    A decode step (s = 1) with grouped queries passes each group's g query heads as g
    query rows of its kv head: q [n, nkv, g, D] against k, v [n, nkv, T, D].  The same
    sums in the same order (bit-identical in bfloat16), but the kernel reads each kv
    head's keys once for its g queries instead of once per query head: Llama-3.1-8B's
    decode attention at 128 x 136 tokens ran 64 ms -> 10 ms on the CPU.
    """
    n, nh, s, d = q.shape
    nkv = k.shape[1]
    if nkv != nh and s == 1 and not mask.causal:    # the mask [n, 1, 1, T] holds for every row of a group
        rows = q.reshape(n, nkv, nh // nkv, d)
        o = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask.tensor, scale=scale)
        return o.reshape(n, nh, 1, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.tensor, is_causal=mask.causal, scale=scale,
                                          enable_gqa=nkv != nh)


def attention_output(spec: ModelSpec, w: Weights, o: torch.Tensor, b: int, s: int) -> torch.Tensor:
    # o: [B, nh, s, D] -> [B, s, H]
    o = o.transpose(1, 2).reshape(b, s, spec.q_size)
    return linear(o, w, "self_attn.out_proj" if spec.family == "opt" else "self_attn.o_proj")


def attention_norm(spec: ModelSpec, w: Weights, h: torch.Tensor) -> torch.Tensor:
    # h: [B, s, H] -> [B, s, H] the input of the projections (identity for post-LN OPT)
    if spec.family == "llama":
        return rms_norm(h, w["input_layernorm.weight"], spec.norm_eps)
    return layer_norm(h, w, "self_attn_layer_norm", spec) if spec.do_layer_norm_before else h


def attention_residual(spec: ModelSpec, w: Weights, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # h, out: [B, s, H] -> [B, s, H]; ``out`` is a product's fresh output: h + out goes into it
    h = out.add_(h)
    if spec.family == "opt" and not spec.do_layer_norm_before:
        h = layer_norm(h, w, "self_attn_layer_norm", spec)
    return h


def attention_scale(spec: ModelSpec) -> float:
    return 1.0 if spec.family == "opt" else spec.head_dim ** -0.5


# ---- MLP ----------------------------------------------------------------------------------
def mlp(spec: ModelSpec, w: Weights, h: torch.Tensor) -> torch.Tensor:
    # h: [B, s, H] -> [B, s, H], norm and residual included
    if spec.family == "llama":
        x = rms_norm(h, w["post_attention_layernorm.weight"], spec.norm_eps)
        gate = activation(spec, linear(x, w, "mlp.gate_proj"))
        x = linear(gate.mul_(linear(x, w, "mlp.up_proj")), w, "mlp.down_proj")    # in place: as activation
        return x.add_(h)                        # h + x, into the product's fresh output
    x = layer_norm(h, w, "final_layer_norm", spec) if spec.do_layer_norm_before else h
    x = linear(activation(spec, linear(x, w, "fc1")), w, "fc2")
    h = x.add_(h)                               # h + x, into the product's fresh output
    return h if spec.do_layer_norm_before else layer_norm(h, w, "final_layer_norm", spec)


# ---- output head ------------------------------------------------------------------------
def head(spec: ModelSpec, w: Weights, h: torch.Tensor) -> torch.Tensor:
    # h: [B, s, H] -> logits [B, s, V] in float32
    if spec.family == "llama":
        h = rms_norm(h, w["norm.weight"], spec.norm_eps)
    else:
        if spec.final_layer_norm:
            h = layer_norm(h, w, "final_layer_norm", spec)
        if spec.word_embed_proj_dim:
            h = linear(h, w, "project_out")
    return linear(h, w, "lm_head").float()


# ---- one attention layer over a cache split into row segments -------------------------------
def attention_pre(spec: ModelSpec, w: Weights, h: torch.Tensor, cos: torch.Tensor | None,
                  sin: torch.Tensor | None):
    # h: [B, s, H] -> q: [B, nh, s, D], k, v: [B, nkv, s, D] — everything before the cache
    return attention_qkv(spec, w, attention_norm(spec, w, h), cos, sin)


def attention_post(spec: ModelSpec, w: Weights, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    # h: [B, s, H], o: [B, nh, s, D] -> [B, s, H] — everything after the attention kernel
    return attention_residual(spec, w, h, attention_output(spec, w, o, o.shape[0], o.shape[2]))


def attention_layer(spec: ModelSpec, w: Weights, h: torch.Tensor, segments, slot: int,
                    key_valid: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                    mask: torch.Tensor | None = None, pre=attention_pre, post=attention_post):
    """Norm, projections, cache update, attention and residual of one attention layer.

    h: [B, s, H]; key_valid: [B, slot + s] bool; ``mask`` (optional) is
    :func:`attention_mask`, shared by every layer of a step.  ``segments`` lists
    ``(rows, k, v)`` with ``rows`` a ``slice`` of the ``R = B * nkv`` cache rows
    (row ``b * nkv + n``) and ``k, v: [r, S, D]`` buffers for those rows; the new keys
    and values are written at ``[slot, slot + s)`` and attention reads ``[:, :slot + s]``.
    Segments let the cache live on several tiers: each is attended where it is.
    Returns ``(h_out [B, s, H], k_new, v_new)`` with ``k_new, v_new: [R, s, D]``.
    ``pre`` and ``post`` are :func:`attention_pre` and :func:`attention_post`, or
    compiled versions of them (the cache update and the kernel call stay eager).
    """
    b, s, _ = h.shape
    nkv, g, d = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
    t = slot + s
    q, k, v = pre(spec, w, h, cos, sin)
    k_new, v_new = k.reshape(b * nkv, s, d), v.reshape(b * nkv, s, d)
    if mask is None:
        mask = attention_mask(key_valid, slot, s, spec)
    scale = attention_scale(spec)
    # one segment holding the whole batch (the common case): its attention result is the
    # output, with no [B, nh, s, D] staging buffer to copy it into
    whole = len(segments) == 1 and segments[0][0].indices(b * nkv) == (0, b * nkv, 1)
    out = None if whole else torch.empty(b, spec.num_heads, s, d, dtype=h.dtype, device=h.device)
    for rows, k_buf, v_buf in segments:
        k_buf[:, slot:t] = k_new[rows].to(k_buf.device, k_buf.dtype)
        v_buf[:, slot:t] = v_new[rows].to(v_buf.device, v_buf.dtype)
        dev = k_buf.device
        start, stop = rows.indices(b * nkv)[:2]
        if start % nkv == 0 and stop % nkv == 0:             # whole sequences: batch-shaped
            b0, b1 = start // nkv, stop // nkv
            kb = k_buf.view(b1 - b0, nkv, -1, d)[:, :, :t]
            vb = v_buf.view(b1 - b0, nkv, -1, d)[:, :, :t]
            o = attend(q[b0:b1].to(dev), kb, vb, mask.batches(b0, b1, dev), scale)
            if out is None:
                out = o.to(h.device, h.dtype)
            else:
                out[b0:b1] = o.to(h.device, h.dtype)
        else:                                                # part of a sequence's heads: per row
            seq = torch.arange(start, stop, device=h.device) // nkv
            q_rows = q.reshape(b, nkv, g, s, d).reshape(b * nkv, g, s, d)[rows]
            o = attend(q_rows.to(dev), k_buf[:, None, :t], v_buf[:, None, :t], mask.rows(seq, dev), scale)
            out.view(b * nkv, g, s, d)[rows] = o.to(h.device, h.dtype)   # the same memory, one kv head per row
    return post(spec, w, h, out), k_new, v_new
