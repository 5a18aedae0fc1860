"""Random ("dummy") weights of any spec, for benchmarks of models not on the machine.

Values: norm weights are ones, biases zeros, every other tensor ~ N(0, 0.02) (the HF
initializer range, so activations stay finite through many blocks).

Determinism: a tensor is cut, in flattened C order, into chunks of ``CHUNK_ELEMS``
elements; chunk ``c`` of tensor ``name`` is drawn in float32 by ``torch.randn`` from a
generator seeded with the first 8 bytes of ``sha256(f"{seed}:{name}:{c}")``, scaled by
0.02 and cast to the dtype.  Same spec + dtype + seed (and the same torch RNG, which
is stable across releases) gives identical bytes, whatever the machine or thread count.

Memory: chunks are produced by a few threads with a bounded look-ahead and written as
they come (``StoreWriter.add_chunks``), so a Llama-3.1-70B or OPT-175B dummy needs
about ``workers x 2 x 16 MB``, not the model.

Identity without writing (:func:`dummy_identity`, used by the planner, which never
writes weights): sha256 of the canonical JSON (sorted keys, no spaces) of
``{"format": "flexgraph-dummy", "version": 1, "config": <HF config>, "dtype": <name or
null>, "seed": <int>}``.  ``dtype=None`` identifies the dummy model independent of dtype
(what a ``ModelRef`` records); the cache adds the dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from flexgraph.errors import ModelError
from flexgraph.log import get_logger
from flexgraph.models.spec import ModelSpec
from flexgraph.progress import progress as _progress
from flexgraph.sizes import format_size
from flexgraph.weights.partials import reap_stale
from flexgraph.weights.store import StoreWriter, WeightStore, dtype_name, parse_dtype

DUMMY_FORMAT, DUMMY_VERSION = "flexgraph-dummy", 1
CHUNK_ELEMS = 1 << 22          # part of the definition of the values: do not change
STD = 0.02

log = get_logger(__name__)


def dummy_identity(spec: ModelSpec, dtype: torch.dtype | str | None = None, seed: int = 0) -> str:
    """Identity of the dummy weights of ``spec`` (see the module docstring)."""
    payload = {"format": DUMMY_FORMAT, "version": DUMMY_VERSION, "config": spec.config_dict(),
               "dtype": None if dtype is None else (dtype if isinstance(dtype, str) else dtype_name(dtype)),
               "seed": int(seed)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _kind(name: str) -> str:
    if name.endswith(".bias"):
        return "zeros"
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if "norm" in leaf:          # layernorm, layer_norm, input_layernorm, norm, ...
        return "ones"
    return "normal"


def _seed_of(seed: int, name: str, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{chunk}".encode()).digest()[:8], "little") >> 1


def _normal_chunk(seed: int, name: str, chunk: int, n: int, dtype: torch.dtype,
                  scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk ``chunk`` of a normal tensor; written into ``scratch`` (float32) and ``out``
    (dtype) when given, so a long run reuses the same memory instead of fragmenting the
    heap (fresh 16 MB buffers per chunk made glibc's RSS grow to several times the data
    in flight)."""
    g = torch.Generator().manual_seed(_seed_of(seed, name, chunk))
    x = torch.randn(n, generator=g, dtype=torch.float32, out=None if scratch is None else scratch[:n])
    x.mul_(STD)
    if dtype == torch.float32:
        return x
    return x.to(dtype) if out is None else out[:n].copy_(x)


class ChunkBuffers:
    """``slots`` reusable (float32 scratch, output) buffer pairs of ``CHUNK_ELEMS``
    elements.  Pages are only touched when used, so small models cost nothing."""

    def __init__(self, slots: int, dtype: torch.dtype):
        self.slots = slots
        self.scratch = [torch.empty(CHUNK_ELEMS, dtype=torch.float32) for _ in range(slots)]
        self.out = (self.scratch if dtype == torch.float32
                    else [torch.empty(CHUNK_ELEMS, dtype=dtype) for _ in range(slots)])


def dummy_chunks(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0,
                 pool: ThreadPoolExecutor | None = None,
                 buffers: ChunkBuffers | None = None) -> Iterator[torch.Tensor]:
    """The flattened values of tensor ``name``, chunk by chunk.

    With a thread ``pool`` and ``buffers`` (of ``lookahead + 1`` slots), up to
    ``lookahead`` chunks are generated ahead of the one being consumed.  A slot is
    reused only after the consumer has asked for the chunk after it, so the consumer
    must be done with a chunk when it asks for the next (``StoreWriter.add_chunks`` is).
    """
    numel = math.prod(shape)
    kind = _kind(name)
    if kind != "normal":
        fill = torch.ones if kind == "ones" else torch.zeros
        for start in range(0, numel, CHUNK_ELEMS):
            yield fill(min(CHUNK_ELEMS, numel - start), dtype=dtype)
        return
    n_chunks = -(-numel // CHUNK_ELEMS)
    sizes = [min(CHUNK_ELEMS, numel - c * CHUNK_ELEMS) for c in range(n_chunks)]
    if pool is None or buffers is None:
        for c, n in enumerate(sizes):
            yield _normal_chunk(seed, name, c, n, dtype)
        return
    lookahead = max(1, buffers.slots - 1)
    pending: deque = deque()
    for c, n in enumerate(sizes):
        slot = c % buffers.slots
        pending.append(pool.submit(_normal_chunk, seed, name, c, n, dtype,
                                   buffers.scratch[slot], buffers.out[slot]))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_dummy(spec: ModelSpec, out: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, *,
                overwrite: bool = False, progress: bool = True, workers: int | None = None) -> WeightStore:
    """Write random weights for ``spec`` as a store at ``out``; returns the opened store."""
    dtype_name(dtype)                       # reject unstorable dtypes before writing anything
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    weights = spec.all_weights()
    total = dummy_bytes(spec, dtype)
    reap_stale(Path(out))                     # a killed write's leftovers count against the room
    check_room(spec, dtype, Path(out).parent)   # a clear error now, not ENOSPC half-way through
    buffers = ChunkBuffers(workers + 1, dtype)
    t0 = time.perf_counter()
    with StoreWriter(out, overwrite=overwrite) as w, ThreadPoolExecutor(workers) as pool, \
            _progress(total=total, desc=f"dummy {spec.name}", unit="B", unit_scale=True, enabled=progress) as bar:
        for info in weights:
            chunks = dummy_chunks(info.name, tuple(info.shape), dtype, seed, pool, buffers)
            w.add_chunks(info.name, dtype, tuple(info.shape), _counted(chunks, bar))
        if spec.tie_word_embeddings:
            w.alias("lm_head.weight", spec.embed_tokens_name)
        source = {"kind": "dummy", "name": spec.name, "identity": dummy_identity(spec, dtype, seed),
                  "model_identity": dummy_identity(spec, None, seed), "dtype": dtype_name(dtype), "seed": seed}
        w.finish(spec.config_dict(), source)
    log.info("dummy_written", model=spec.name, dtype=dtype_name(dtype), bytes=total,
             seconds=round(time.perf_counter() - t0, 2))
    return WeightStore.open(out)


def dummy_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """The bytes of ``spec``'s dummy store in ``dtype`` (its matrices; the index is small)."""
    return sum(w.numel for w in spec.all_weights()) * dtype.itemsize


def room_problem(spec: ModelSpec, dtype: torch.dtype, folder: Path) -> str | None:
    """Why ``spec``'s dummy store in ``dtype`` cannot be written under ``folder`` (its
    nearest existing ancestor's file system has less free space than the store), or None."""
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    free, need = shutil.disk_usage(where).free, dummy_bytes(spec, dtype)
    if need <= free:
        return None
    return (f"the dummy {spec.name} store in {dtype_name(dtype)} needs {format_size(need)} and "
            f"{where} has {format_size(free)} free")


def room_advice(dtypes: list[str]) -> str:
    """How to make room for dummy stores in ``dtypes`` (names) that do not fit."""
    narrower = all(parse_dtype(d).itemsize > 2 for d in dtypes)     # bfloat16 is untried
    return ("free space there or point FLEXGRAPH_CACHE at a larger disk"
            + (", or keep the weights in bfloat16 (--storage-dtype bfloat16)" if narrower else ""))


def check_room(spec: ModelSpec, dtype: torch.dtype, folder: Path) -> None:
    problem = room_problem(spec, dtype, folder)
    if problem:
        raise ModelError(f"{problem}; {room_advice([dtype_name(dtype)])}")


def _counted(chunks: Iterator[torch.Tensor], bar) -> Iterator[torch.Tensor]:
    for c in chunks:
        yield c
        bar.update(c.numel() * c.element_size())
