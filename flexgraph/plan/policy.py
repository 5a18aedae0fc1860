"""The policy: how a run is shaped and where each kind of data lives.

FlexGen-compatible knobs (``--percent W_GPU W_CPU KV_GPU KV_CPU ACT_GPU ACT_CPU``, disk
gets the rest; ``--gpu-batch-size``; ``--num-gpu-batches``), the traversal
(``row`` or ``zigzag``), the working dtype, and the storage dtype.

**Storage dtype** (``storage_dtype``, ``--storage-dtype``; None = the working dtype): the
dtype weight matrices and the KV cache are *kept* in on every tier, converted to the
working dtype where they are used — mixed precision, as llama.cpp keeps f16 weights and
computes in f32, or vLLM's ``--kv-cache-dtype``.  It is for a CPU that multiplies
bfloat16 slowly (AVX2: 0.14x float32's rate) but whose disk and memory move half the
bytes of float32 in bfloat16: compute in float32, store in bfloat16.  The tensors it
applies to are exactly those :func:`~flexgraph.compress.quant.should_compress` accepts
(matrices; 1-D norms and biases and tiny tensors stay in the working dtype); K and V
are rounded to it when written, and attention reads them as stored.

Placement turns percentages into concrete homes:

- **weights** are placed per layer by cumulative size, as FlexGen does: a tensor goes to
  the tier whose percentage range contains the midpoint of its byte range within its
  layer.  Every layer is split the same way, so the split actually achieved can differ
  from the request (a layer of one tensor cannot be split); :func:`weight_placement`
  reports it.
- **KV cache** and **activations** are split at tensor granularity: each cache tensor
  (one attention layer, one GPU batch) and each hidden-state tensor is divided by rows —
  ``batch x kv_head`` rows for the cache, batch rows for activations — with each tier
  holding a contiguous run of rows in the proportions asked for (largest remainder).
  Any mix is valid for all three kinds.

Compression (``compress_weight``, ``compress_cache``: FlexGen's group-wise 4-bit scheme,
:mod:`flexgraph.compress.quant`) changes what a tensor *costs*, not where the rule puts
it: with ``compress_weight`` every weight :func:`~flexgraph.compress.quant.should_compress`
accepts is stored compressed on its home tier, and placement and the per-tier bytes use
the compressed sizes (:func:`stored_weight_bytes`).  ``cpu_cache_compute`` (with a gpu
tier) runs the attention over the cache rows homed on cpu and disk on the cpu.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from flexgraph.compress.quant import WEIGHT_GROUP_DIM, compressed_itemsize_nbytes, should_compress
from flexgraph.errors import PlanError
from flexgraph.models.spec import ModelSpec, WeightInfo

TIERS = ("gpu", "cpu", "disk")
SCHEDULES = ("row", "zigzag")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Split:
    """Percentages on gpu, cpu and disk; disk is whatever the first two leave."""
    gpu: float
    cpu: float

    def __post_init__(self):
        for name, v in (("gpu", self.gpu), ("cpu", self.cpu)):
            if not 0 <= v <= 100:
                raise PlanError(f"a {name} percentage must be within 0..100 (got {v:g})")
        if self.gpu + self.cpu > 100 + 1e-9:
            raise PlanError(f"gpu {self.gpu:g}% + cpu {self.cpu:g}% exceed 100%; disk takes the rest")

    @property
    def disk(self) -> float:
        return max(0.0, 100.0 - self.gpu - self.cpu)

    def fractions(self) -> tuple[float, float, float]:
        return self.gpu / 100, self.cpu / 100, self.disk / 100

    def as_list(self) -> list[float]:
        return [self.gpu, self.cpu, self.disk]


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int
    num_gpu_batches: int
    weights: Split
    cache: Split
    activations: Split
    schedule: str = "zigzag"
    dtype: str = "bfloat16"
    compress_weight: bool = False
    compress_cache: bool = False
    cpu_cache_compute: bool = False
    storage_dtype: str | None = None      # weights' matrices and KV cache as kept; None = ``dtype``

    def __post_init__(self):
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise PlanError("--gpu-batch-size and --num-gpu-batches must be at least 1")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            raise PlanError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.storage_dtype == self.dtype:
            object.__setattr__(self, "storage_dtype", None)      # one spelling of "no conversion"
        if self.storage_dtype is not None:
            if self.storage_dtype not in DTYPES:
                raise PlanError(f"unknown storage dtype {self.storage_dtype!r}; use one of {', '.join(DTYPES)}")
            if DTYPES[self.storage_dtype].itemsize > DTYPES[self.dtype].itemsize:
                raise PlanError(f"--storage-dtype {self.storage_dtype} is wider than the working dtype "
                                f"{self.dtype}: it would move more bytes for no precision; leave it out")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def store_torch_dtype(self) -> torch.dtype:
        """The dtype weight matrices and the dense KV cache are kept in."""
        return DTYPES[self.storage_dtype or self.dtype]

    @property
    def store_itemsize(self) -> int:
        return self.store_torch_dtype.itemsize

    @property
    def casts(self) -> bool:
        """Whether stored tensors are converted to the working dtype where they are used."""
        return self.store_torch_dtype != self.torch_dtype

    def percent_args(self) -> list[float]:
        """The six numbers of FlexGen's ``--percent``."""
        return [self.weights.gpu, self.weights.cpu, self.cache.gpu, self.cache.cpu,
                self.activations.gpu, self.activations.cpu]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("weights", "cache", "activations"):
            d[key] = getattr(self, key).as_list()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Policy:
        d = dict(d)
        for key in ("weights", "cache", "activations"):
            gpu, cpu, _disk = d[key]
            d[key] = Split(gpu, cpu)
        return cls(**d)


def split_rows(rows: int, split: Split) -> tuple[int, int, int]:
    """Divide ``rows`` into contiguous gpu, cpu, disk runs by largest remainder."""
    exact = [f * rows for f in split.fractions()]
    counts = [int(x) for x in exact]
    order = sorted(range(3), key=lambda t: (exact[t] - counts[t], -t), reverse=True)
    for t in order[: rows - sum(counts)]:
        counts[t] += 1
    return counts[0], counts[1], counts[2]


def row_ranges(counts: tuple[int, int, int]) -> dict[str, slice]:
    """``(2, 3, 0)`` -> ``{"gpu": slice(0, 2), "cpu": slice(2, 5)}`` (empty tiers left out)."""
    out, start = {}, 0
    for tier, n in zip(TIERS, counts):
        if n:
            out[tier] = slice(start, start + n)
        start += n
    return out


@dataclass(frozen=True)
class WeightPlacement:
    """Home tier of every weight tensor, per FlexGen layer."""
    tiers: tuple[tuple[tuple[str, str], ...], ...]     # per layer: ((name, tier), ...)
    bytes_per_tier: tuple[dict[str, int], ...] = field(compare=False)  # per layer

    def layer(self, j: int) -> dict[str, str]:
        return dict(self.tiers[j])

    def achieved(self) -> dict[str, float]:
        """Percent of all weight bytes homed on each tier (as actually placed)."""
        tot = {t: sum(b.get(t, 0) for b in self.bytes_per_tier) for t in TIERS}
        total = sum(tot.values()) or 1
        return {t: 100.0 * tot[t] / total for t in TIERS}


def stored_weight_bytes(w: WeightInfo, itemsize: int, compress: bool = False, store_itemsize: int | None = None) -> int:
    """Bytes of one weight tensor as stored on its home tier: dense, or — with ``compress``
    and when :func:`~flexgraph.compress.quant.should_compress` accepts it — its 4-bit codes
    plus per-group scale and minimum in the working dtype (padding included, exactly what
    :func:`~flexgraph.compress.quant.compressed_nbytes` gives).  A dense matrix that
    ``should_compress`` accepts is kept in the storage dtype (``store_itemsize``, default
    the working dtype's ``itemsize``); other tensors in the working dtype."""
    if should_compress(w.name, w.shape):
        if compress:
            return compressed_itemsize_nbytes(w.shape, itemsize, WEIGHT_GROUP_DIM)
        return w.numel * (store_itemsize or itemsize)
    return w.numel * itemsize


def placed_weight_bytes(spec: ModelSpec, itemsize: int, compress: bool = False,
                        store_itemsize: int | None = None) -> int:
    """Bytes of every layer's weight homes together, as :func:`weight_placement` places
    them: a tied embedding has a home in both its layers, so it counts twice."""
    return sum(stored_weight_bytes(w, itemsize, compress, store_itemsize) for j in range(spec.num_layers)
               for w in spec.layer_weights(j))


def weight_placement(spec: ModelSpec, split: Split, itemsize: int, compress: bool = False,
                     store_itemsize: int | None = None) -> WeightPlacement:
    """FlexGen's rule: within each layer, a tensor's home is chosen by the midpoint of its
    cumulative byte range against the gpu / cpu / disk percentage boundaries.  Byte sizes
    are the stored ones (compressed with ``compress``), so the achieved split is in real bytes."""
    gpu_f, cpu_f, _ = split.fractions()
    tiers, per_tier = [], []
    for j in range(spec.num_layers):
        ws = spec.layer_weights(j)
        sizes = [stored_weight_bytes(w, itemsize, compress, store_itemsize) for w in ws]
        total = sum(sizes) or 1
        acc, assigned, by = 0, [], {t: 0 for t in TIERS}
        for w, size in zip(ws, sizes):
            mid = (acc + size / 2) / total
            acc += size
            tier = "gpu" if mid < gpu_f else "cpu" if mid < gpu_f + cpu_f else "disk"
            assigned.append((w.name, tier))
            by[tier] += size
        tiers.append(tuple(assigned))
        per_tier.append(by)
    return WeightPlacement(tuple(tiers), tuple(per_tier))


def policy_weight_placement(spec: ModelSpec, policy: Policy) -> WeightPlacement:
    """The weight placement of a policy (its split, dtypes and weight compression)."""
    return weight_placement(spec, policy.weights, policy.itemsize, policy.compress_weight, policy.store_itemsize)


def weight_store_dtype(policy: Policy, w: WeightInfo) -> torch.dtype:
    """The dtype a dense (not 4-bit) weight is kept in under ``policy``: the storage dtype
    for the matrices :func:`~flexgraph.compress.quant.should_compress` accepts, else the
    working dtype."""
    return policy.store_torch_dtype if should_compress(w.name, w.shape) else policy.torch_dtype
