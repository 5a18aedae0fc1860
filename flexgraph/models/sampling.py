"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

The order of the filters is transformers' (temperature, then top-k, then top-p), so a
sampling configuration means the same thing in both.  ``SamplingParams`` is plain data:
it is written into plan.json and can be overridden at execute time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from flexgraph.errors import FlexgraphError


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1.0: off
    seed: int = 0
    stop: tuple[str, ...] = field(default=())   # stop strings (need a tokenizer)
    ignore_eos: bool = False  # FlexGen's benchmark generates a fixed length

    def __post_init__(self):
        if self.temperature <= 0:
            raise FlexgraphError(f"temperature must be > 0 (got {self.temperature}); use do_sample=False for greedy")
        if not 0 < self.top_p <= 1:
            raise FlexgraphError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise FlexgraphError(f"top_k must be >= 0 (got {self.top_k})")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SamplingParams:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["stop"] = tuple(known.get("stop") or ())
        return cls(**known)

    def override(self, **changes: Any) -> SamplingParams:
        changes = {k: v for k, v in changes.items() if v is not None}
        if "stop" in changes:
            changes["stop"] = tuple(changes["stop"])
        return replace(self, **changes)


def make_generator(params: SamplingParams, stream: int = 0) -> torch.Generator:
    """A generator per (seed, stream): each block of prompts draws from its own stream, so
    results do not depend on how blocks are interleaved."""
    g = torch.Generator()
    g.manual_seed(params.seed * 1_000_003 + stream)
    return g


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # logits: [B, V] float32 -> [B, V] with filtered entries at -inf
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - params.top_p
        drop_sorted[..., -1:] = False          # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    # logits: [B, V] -> next ids [B] (long)
    if not params.do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
