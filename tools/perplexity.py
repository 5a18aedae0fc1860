"""Perplexity of a model on English text, with and without FlexGen's 4-bit compression.

    python tools/perplexity.py [--model smollm2-135m] [--text FILE] [--window 512]
                               [--stride 256] [--max-tokens N] [--dtype float32]
                               [--threads N] [--variants baseline,compressed-weights,...]

Four variants, all computed with flexgraph's own layer maths
(:class:`flexgraph.models.forward.InMemoryModel` and its layer functions):

- ``baseline``: the weights as stored, converted to ``--dtype``;
- ``compressed-weights``: every weight :func:`~flexgraph.compress.quant.should_compress`
  accepts (all matrices, the embedding table included) is quantised to 4 bits along its
  output channels and decoded again — the values a run with compressed weights computes
  with;
- ``compressed-cache``: the KV cache of every attention layer is stored compressed (a
  real :class:`~flexgraph.compress.quant.QTensor` per layer, grouped along the head
  dimension); keys and values are quantised as they are written and every attention reads
  the decoded cache.  Evaluation is teacher-forced, i.e. one prefill per window, so each
  query attends to the *decoded* keys and values of every position up to and including its
  own.  That is slightly harsher than FlexGen at generation time, where a decode step's
  own new entry is used before compression and a prefill attends in full precision; it is
  what a compressed cache means for every later token, applied to all of them;
- ``both``.

Windows: the text is tokenised without special tokens and cut into windows of
``--window`` tokens that start every ``--stride`` tokens (default: half a window).  Each
token is scored once, in the first window that contains it after the previous window's
end, so every scored token after the first window sees at least ``window - stride`` tokens
of context; with ``--stride == --window`` windows do not overlap and the first token of
each window, which has no context in it, is not scored.  Perplexity is
``exp(mean negative log-likelihood)`` over the scored tokens.

Prints a markdown table and the JSON result; :func:`perplexities` is the importable form.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flexgraph.compress.quant import (CACHE_GROUP_DIM, WEIGHT_GROUP_DIM, dequantize, fake_quantize, qtensor_empty,
                                      quantize_into, should_compress)
from flexgraph.models import layers as L
from flexgraph.models.forward import InMemoryModel, KVCache, SequenceState, compute_layer
from flexgraph.models.spec import ATTN, HEAD

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
VARIANTS = ("baseline", "compressed-weights", "compressed-cache", "both")
_FLAGS = {"baseline": (False, False), "compressed-weights": (True, False),
          "compressed-cache": (False, True), "both": (True, True)}      # (weights, cache)


# ---- a compressed KV cache that plugs into the layer maths -----------------------------------
class CompressedBuffer:
    """One of ``k``, ``v`` of a cache ``[R, S, D]``, stored as 4-bit codes.

    :func:`flexgraph.models.layers.attention_layer` writes ``buf[:, a:b] = new`` and
    reads ``buf[:, :T]``; here a write quantises the new tokens into their slots and a
    read decodes the prefix, so attention sees exactly what a compressed cache holds.
    """

    def __init__(self, rows: int, max_len: int, head_dim: int, dtype: torch.dtype, device="cpu"):
        self.q = qtensor_empty((rows, max_len, head_dim), dtype, CACHE_GROUP_DIM, device=device)
        self.dtype, self.device = dtype, torch.device(device)

    @staticmethod
    def _slots(idx) -> slice:
        if (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], slice)
                and idx[1].step is None):
            return idx[1]
        raise TypeError(f"a compressed cache supports buf[:, a:b] only, got {idx!r}")

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        # value: [R, s, D] -> quantised into slots [a, b)
        sl = self._slots(idx)
        quantize_into(value, self.q.narrow(1, sl.start, sl.stop - sl.start))

    def __getitem__(self, idx) -> torch.Tensor:
        # -> decoded [R, T, D] of slots [0, T)
        if isinstance(idx, tuple) and len(idx) == 3 and idx[1] is None:    # per-row reads buf[:, None, :T]
            return self[idx[0], idx[2]][:, None]
        sl = self._slots(idx)
        if sl.start not in (None, 0):
            raise TypeError("a compressed cache is read as a prefix buf[:, :T]")
        return dequantize(self.q.narrow(1, 0, sl.stop))

    def view(self, *shape) -> _SequenceView:
        """Whole sequences are read as ``buf.view(B, nkv, -1, D)[:, :, :T]``."""
        return _SequenceView(self, shape)


class _SequenceView:
    """``CompressedBuffer.view(B, nkv, -1, D)``: reads ``[:, :, :T]`` decode the prefix."""

    def __init__(self, buf: CompressedBuffer, shape):
        self.buf, self.shape = buf, shape

    def __getitem__(self, idx) -> torch.Tensor:
        if not (isinstance(idx, tuple) and len(idx) == 3 and idx[0] == slice(None) and idx[1] == slice(None)):
            raise TypeError(f"a compressed cache view supports [:, :, :T] only, got {idx!r}")
        dec = self.buf[:, idx[2]]                                   # [R, T, D]
        return dec.view(self.shape[0], self.shape[1], dec.shape[1], dec.shape[2])


class CompressedKVCache(KVCache):
    """:class:`~flexgraph.models.forward.KVCache` whose keys and values are kept compressed."""

    def __init__(self, rows: int, max_len: int, head_dim: int, dtype: torch.dtype, device="cpu"):
        self.k = CompressedBuffer(rows, max_len, head_dim, dtype, device)
        self.v = CompressedBuffer(rows, max_len, head_dim, dtype, device)


# ---- the model ------------------------------------------------------------------------------------
def model_weights(store, dtype: torch.dtype, compress: bool) -> dict[str, torch.Tensor]:
    """Every stored tensor in ``dtype``; with ``compress``, matrices replaced by their
    4-bit round trip (grouped along output channels, scale and min in ``dtype``)."""
    weights = {}
    for name in store.names():
        w = store.read(name, dtype=dtype, verify=False)
        if compress and should_compress(name, tuple(w.shape)):
            w = fake_quantize(w, WEIGHT_GROUP_DIM)
        weights[name] = w
    for alias, target in store.aliases.items():
        weights[alias] = weights[target]
    return weights


def all_logits(model: InMemoryModel, ids: torch.Tensor, compressed_cache: bool) -> torch.Tensor:
    """One prefill returning the logits of every position (``run_step`` keeps the last only).

    ids: [B, T] -> logits [B, T, V] float32
    """
    spec = model.spec
    b, t = ids.shape
    cache_cls = CompressedKVCache if compressed_cache else KVCache
    st = SequenceState.for_prompt(torch.ones(b, t, dtype=torch.bool), t)
    x = ids
    for j in range(spec.num_layers):
        w = model.layer_w[j]
        if spec.layer(j).kind == HEAD:
            return L.head(spec, w, x)
        cache = cache_cls(b * spec.num_kv_heads, t, spec.head_dim, model.dtype) if spec.layer(j).kind == ATTN else None
        x = compute_layer(spec, j, w, x, st, cache.segments() if cache else None, model.inv_freq)
    raise AssertionError("a model ends with its head layer")


# ---- windows and scoring ---------------------------------------------------------------------------
def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` of each window over ``n`` tokens: the window is
    ``ids[begin:end]`` and it scores the tokens ``[first_target, end)``."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window} stride={stride}")
    out, prev_end = [], 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def mean_nll(model: InMemoryModel, ids: torch.Tensor, window: int, stride: int,
             compressed_cache: bool) -> tuple[float, int]:
    """Mean negative log-likelihood (nats) of the scored tokens of ``ids: [N]``, and their count."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for begin, end, first in windows(ids.numel(), window, stride):
            logits = all_logits(model, ids[None, begin:end], compressed_cache)[0]    # [T, V]
            pred = logits[first - begin - 1:end - begin - 1]                         # predicts ids[first:end]
            total += F.cross_entropy(pred, ids[first:end], reduction="sum").item()
            count += end - first
    return total / count, count


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    # -> ids [N] long, no special tokens (the text is a continuation, not a prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def perplexities(store, text: str, window: int = 512, stride: int | None = None, max_tokens: int | None = None,
                 dtype: torch.dtype = torch.float32, variants=VARIANTS, tokenizer=None) -> dict:
    """Perplexity of ``store``'s model on ``text`` for each variant (see the module docstring).

    Returns ``{"tokens", "scored", "window", "stride", "dtype", "variants": {name:
    {"perplexity", "nll", "increase_pct", "seconds"}}}``; ``increase_pct`` is relative to
    ``baseline`` (which is computed first whenever another variant is asked for).
    """
    stride = stride or max(1, window // 2)
    tokenizer = tokenizer or store.tokenizer()
    if tokenizer is None:
        raise ValueError(f"store {store.path} has no tokenizer")
    ids = tokenize(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens")
    names = list(variants)
    if names and "baseline" not in names:
        names.insert(0, "baseline")
    for name in names:
        if name not in _FLAGS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    models: dict[bool, InMemoryModel] = {}
    results, scored = {}, 0
    for name in names:
        comp_w, comp_c = _FLAGS[name]
        if comp_w not in models:
            models[comp_w] = InMemoryModel(store.spec, model_weights(store, dtype, comp_w), dtype)
        t0 = time.perf_counter()
        nll, scored = mean_nll(models[comp_w], ids, window, stride, comp_c)
        results[name] = {"perplexity": math.exp(nll), "nll": nll, "seconds": round(time.perf_counter() - t0, 2)}
    base = results["baseline"]["perplexity"]
    for r in results.values():
        r["increase_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
    return {"tokens": int(ids.numel()), "scored": scored, "window": window, "stride": stride,
            "dtype": str(dtype).removeprefix("torch."), "variants": results}


def markdown_table(result: dict) -> str:
    lines = ["| variant | perplexity | increase % |", "|---|---:|---:|"]
    for name, r in result["variants"].items():
        lines.append(f"| {name} | {r['perplexity']:.3f} | {r['increase_pct']:+.2f} |")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------
def _open_store(model: str):
    from flexgraph.weights.bundled import bundled_store, is_bundled_id
    from flexgraph.weights.store import WeightStore
    if is_bundled_id(model):
        return bundled_store()
    return WeightStore.open(model)


def main(argv: list[str] | None = None) -> int:
    from flexgraph.weights.store import parse_dtype

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled model id or weight-store folder")
    p.add_argument("--text", default=DEFAULT_TEXT, help="an English text file (default: the GPL-3)")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = p.parse_args(argv)
    path = Path(args.text)
    if not path.is_file():
        print(f"error: text file {path} not found; pass --text FILE", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    store = _open_store(args.model)
    result = perplexities(store, path.read_text(encoding="utf-8", errors="replace"), window=args.window,
                          stride=args.stride, max_tokens=args.max_tokens, dtype=parse_dtype(args.dtype),
                          variants=[v.strip() for v in args.variants.split(",") if v.strip()])
    result.update(model=args.model, text=str(path))
    print(markdown_table(result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
