"""Tiered tensors: where weights, KV cache and activations live between uses.

:class:`Tiers` maps a tier to storage: ``gpu`` is the CUDA device, or — on a CPU-only
machine with ``--gpu-mem`` — a separately budgeted region of host memory that data is
really copied into; ``cpu`` is host memory (pinned when CUDA is present, for fast
copies); ``disk`` is files in a per-run folder under ``--offload-dir``, removed when
the run ends, also on error or Ctrl-C.

Homes:

- **weights** (:func:`load_weight_homes`): each tensor on the tier the placement gives
  it.  A disk-homed weight whose stored dtype is the run's is read from the weight store
  in place (no copy of a large model); otherwise it is converted into the run folder.
- **KV cache** (:class:`CacheHome`, per attention layer and GPU batch): rows
  ``batch x kv_head`` split across tiers; in memory a segment is ``k, v: [rows, S, D]``
  (each row's prefix contiguous, gpt-fast style); on disk each of K and V is a
  :class:`DiskKV`: the prompt's tokens row-major ``[rows, P, D]``, written once by the
  prefill and read by every decode step straight into the rows of a row-major working
  buffer, then the generated tokens seq-major ``[S - P, rows, D]``, so a new token is
  one contiguous write.

A storage dtype narrower than the working one (``--storage-dtype``) is the dtype of the
weight matrices (:func:`~flexgraph.compress.quant.should_compress`'s) and of the dense
KV cache in their homes, on every tier.

Compressed (4-bit, :mod:`flexgraph.compress.quant`) on every tier when the policy says
so: a weight home is a :class:`~flexgraph.compress.quant.QTensor` in memory, or its
:func:`~flexgraph.compress.quant.qlayout` bytes (``scale | mn | packed``) in one file on
disk, read whole into a preallocated byte buffer; a cache segment is a QTensor per K and
V (grouped along ``D``) in memory, or one qlayout file per K and V on disk, seq-major, so
the prefix of each of the three parts is one contiguous read and a new token's entry
three contiguous writes (:class:`QDiskTensor`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from flexgraph.compress.quant import (CACHE_GROUP_DIM, WEIGHT_GROUP_DIM, QLayout, QTensor, qlayout, qtensor_empty,
                                      quantize_into, should_compress, to_bytes_layout)
from flexgraph.errors import ExecutionError
from flexgraph.exec.bufpool import BufferPool
from flexgraph.exec.diskio import ALIGN, DiskIO, aligned_empty
from flexgraph.log import get_logger
from flexgraph.models.layers import role_of
from flexgraph.models.spec import ATTN, ModelSpec
from flexgraph.plan.policy import TIERS, WeightPlacement, row_ranges
from flexgraph.progress import progress

log = get_logger(__name__)


@dataclass(frozen=True)
class DiskTensor:
    """A tensor stored in a file: ``shape`` and ``dtype`` at byte ``offset``."""
    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    def lead_bytes(self, n: int) -> int:
        """Bytes of the first ``n`` entries along dim 0 (where entry ``n`` starts)."""
        return n * math.prod(self.shape[1:]) * self.dtype.itemsize


@dataclass(frozen=True)
class QDiskTensor:
    """A compressed tensor in a file at ``offset``, laid out by ``layout``: scale | mn | packed."""
    path: Path
    offset: int
    layout: QLayout

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def whole(self) -> DiskTensor:
        """The region as bytes (one read fills a :func:`qtensor_empty_bytes` buffer)."""
        return DiskTensor(self.path, self.offset, (self.layout.nbytes,), torch.uint8)

    def parts(self) -> tuple[DiskTensor, DiskTensor, DiskTensor]:
        """``(packed, scale, mn)`` as files, in :meth:`QTensor.buffers` order."""
        lay, o = self.layout, self.offset
        return (DiskTensor(self.path, o + lay.packed_offset, lay.packed_shape, torch.uint8),
                DiskTensor(self.path, o, lay.scale_shape, lay.dtype),
                DiskTensor(self.path, o + lay.mn_offset, lay.scale_shape, lay.dtype))


@dataclass(frozen=True)
class DiskKV:
    """K or V of disk-homed cache rows, in one file: the prompt's ``P`` tokens row-major
    ``[r, P, D]`` (each row's prompt is one run of bytes: a decode step reads them into
    the rows of its row-major buffer with no transposing copy), then the ``S - P``
    generated tokens seq-major ``[S - P, r, D]`` (a decode step's new token is one run).
    Kept all seq-major, every load paid a [T, r, D] -> [r, T, D] copy: on a 2-core EPYC,
    1.66 GB of OPT-1.3B's decode prefixes took 2.76 s read and transposed with a product
    running beside them, against 1.98 s read straight into place."""
    path: Path
    rows: int
    prompt_len: int
    slots: int
    head_dim: int
    dtype: torch.dtype

    @property
    def prompt(self) -> DiskTensor:
        return DiskTensor(self.path, 0, (self.rows, self.prompt_len, self.head_dim), self.dtype)

    @property
    def generated(self) -> DiskTensor:
        return DiskTensor(self.path, self.prompt.nbytes, (self.slots - self.prompt_len, self.rows, self.head_dim),
                          self.dtype)

    def whole(self) -> DiskTensor:
        return DiskTensor(self.path, 0, (self.slots, self.rows, self.head_dim), self.dtype)


class Tiers:
    def __init__(self, device: str, has_gpu_tier: bool, offload_dir: str | os.PathLike, disk: DiskIO):
        self.device = device
        self.has_gpu_tier = has_gpu_tier
        self.compute_tier = "gpu" if has_gpu_tier else "cpu"
        self.disk = disk
        self._offload_root = Path(offload_dir)
        self.run_dir: Path | None = None
        self._pin = device == "cuda"
        self.pool = BufferPool()                 # working copies on the CPU (see bufpool)

    def torch_device(self, tier: str) -> torch.device:
        if tier == "gpu" and self.device == "cuda":
            return torch.device("cuda")
        return torch.device("cpu")

    def _unpinned_host(self, tier: str) -> bool:
        # plain host memory: pinned buffers and device memory have their own allocators
        return tier != "disk" and self.torch_device(tier).type == "cpu" and not (self._pin and tier == "cpu")

    def empty(self, tier: str, shape, dtype: torch.dtype) -> torch.Tensor:
        if tier == "disk":
            raise ValueError("disk tensors are files; use file()")
        if self._unpinned_host(tier):
            return aligned_empty(shape, dtype)          # page-aligned: disk reads can bypass the cache
        return torch.empty(tuple(shape), dtype=dtype, device=self.torch_device(tier),
                           pin_memory=self._pin and tier == "cpu")

    def working(self, tier: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """Like :meth:`empty`, for a node's working copy that lives a few nodes: on the
        CPU (unpinned) it is cut from the run's :class:`BufferPool`, reusing idle memory."""
        return self.pool.empty(shape, dtype) if self._unpinned_host(tier) else self.empty(tier, shape, dtype)

    def working_q(self, tier: str, shape, dtype: torch.dtype, group_dim: int) -> QTensor:
        """Like :meth:`empty_q`, for a working copy (its buffers from the pool on the CPU)."""
        if self._unpinned_host(tier):
            return qtensor_empty(shape, dtype, group_dim, empty=self.pool.empty)
        return self.empty_q(tier, shape, dtype, group_dim)

    def empty_q(self, tier: str, shape, dtype: torch.dtype, group_dim: int) -> QTensor:
        """Uninitialised buffers of a compressed ``shape`` tensor on a memory tier."""
        if tier == "disk":
            raise ValueError("disk tensors are files; use file()")
        return qtensor_empty(shape, dtype, group_dim, device=self.torch_device(tier),
                             pin_memory=self._pin and tier == "cpu")

    def working_rows(self, tier: str, rows: int, tokens: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        """A working ``[rows, tokens, d]`` cache buffer for row-wise disk transfers: on
        the host its rows start on page boundaries (room for up to a page more tokens
        per row), so that each row's tokens can be read with O_DIRECT; a view."""
        if not self._unpinned_host(tier):
            return self.empty(tier, (rows, tokens, d), dtype)
        per_page = ALIGN // math.gcd(ALIGN, d * dtype.itemsize)
        padded = -(-tokens // per_page) * per_page
        return self.pool.empty((rows, padded, d), dtype)[:, :tokens]

    def staging(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer for a disk read headed to the device (pinned on CUDA)."""
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self._pin)

    def file(self, name: str) -> Path:
        """A path in this run's offload folder (created on first use)."""
        if self.run_dir is None:
            try:
                self._offload_root.mkdir(parents=True, exist_ok=True)
                remove_stale_runs(self._offload_root)
                self.run_dir = self._offload_root / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self.run_dir.mkdir()
            except OSError as e:
                raise ExecutionError(f"cannot create files in --offload-dir {self._offload_root}: {e.strerror}; "
                                     "point it at a writable folder") from None
        return self.run_dir / name

    def cleanup(self) -> None:
        """Remove this run's offload files (idempotent)."""
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    # ---- moving data between tiers ---------------------------------------------------------
    def read(self, src: DiskTensor, out: torch.Tensor, nbytes: int | None = None) -> None:
        """Read the first ``nbytes`` (default all) of ``src`` into the start of ``out``."""
        n = src.nbytes if nbytes is None else nbytes
        if n == 0:
            return
        flat = out.view(-1).view(torch.uint8)[:n]
        if out.device.type == "cpu":
            self.disk.read_into(src.path, src.offset, flat)
        else:
            stage = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            self.disk.read_into(src.path, src.offset, stage)
            flat.copy_(stage, non_blocking=True)

    def write(self, dst: DiskTensor, src: torch.Tensor, byte_offset: int = 0) -> None:
        self.disk.write_from(dst.path, dst.offset + byte_offset, src.contiguous())

    def read_rows(self, src: DiskTensor, out: torch.Tensor) -> None:
        """Read ``src`` (rows back to back) into the rows of ``out`` (each contiguous,
        any distance apart; same shape)."""
        if out.device.type == "cpu":
            self.disk.read_rows_into(src.path, src.offset, out)
        else:
            stage = self.staging(src.shape, src.dtype)
            self.disk.read_into(src.path, src.offset, stage)
            out.copy_(stage, non_blocking=True)

    def write_rows(self, dst: DiskTensor, src: torch.Tensor) -> None:
        """Write the rows of ``src`` (each contiguous, any distance apart) back to back
        as ``dst``."""
        if src.device.type == "cpu" and src[0].is_contiguous():
            self.disk.write_rows_from(dst.path, dst.offset, src)
        else:
            self.disk.write_from(dst.path, dst.offset, src.contiguous())

    def read_q(self, src: QDiskTensor, out: QTensor, lead: int | None = None) -> None:
        """Read the first ``lead`` entries along dim 0 (default all) of each part of ``src``
        into the start of ``out``'s buffers (contiguous, shaped like ``src`` after dim 0)."""
        for part, buf in zip(src.parts(), out.buffers()):
            self.read(part, buf, None if lead is None else part.lead_bytes(lead))

    def write_q(self, dst: QDiskTensor, src: QTensor, start: int = 0) -> None:
        """Write ``src`` (entries ``[start, start + n)`` along dim 0 of ``dst``) into place."""
        for part, buf in zip(dst.parts(), src.buffers()):
            self.write(part, buf, part.lead_bytes(start))


def remove_stale_runs(root: Path) -> None:
    """Remove run folders whose process is gone: a run killed outright (the OOM killer's
    SIGKILL) cannot clean up after itself, so the next run does."""
    for d in root.glob("run-*-*"):
        try:
            pid = int(d.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("removing_stale_offload", folder=str(d))
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass                      # someone else's live process


# ---- weights ---------------------------------------------------------------------------
@dataclass
class WeightHome:
    tier: str
    tensor: torch.Tensor | None = None     # gpu / cpu
    disk: DiskTensor | None = None         # disk
    q: QTensor | None = None               # gpu / cpu, compressed
    qdisk: QDiskTensor | None = None       # disk, compressed

    @property
    def compressed(self) -> bool:
        return self.q is not None or self.qdisk is not None


def load_weight_homes(spec: ModelSpec, store, placement: WeightPlacement, dtype: torch.dtype, tiers: Tiers,
                      verify: bool, show_progress: bool = True, compress: bool = False,
                      store_dtype: torch.dtype | None = None) -> list[dict[str, WeightHome]]:
    """Place every layer's weights on their home tiers; returns per layer {role: home}.

    With ``compress``, every weight :func:`~flexgraph.compress.quant.should_compress`
    accepts is quantised (along its output channels) and stored compressed on its tier;
    without, those weights are kept in ``store_dtype`` (default: the working ``dtype``).

    ``verify`` checks every checksum first, streaming (once per store: a stamp in the
    cache remembers verified files by size, mtime and inode); the placing reads skip it.
    """
    if verify and needs_verification(store):
        store.verify_all(progress=show_progress)
        mark_verified(store)
    homes: list[dict[str, WeightHome]] = []
    shared: dict[tuple[str, str], WeightHome] = {}     # a tied head shares the embedding's home
    total = sum(len(spec.layer_weights(j)) for j in range(spec.num_layers))
    bar = progress(total=total, desc="placing weights", unit="tensor", enabled=show_progress)
    try:
        for j in range(spec.num_layers):
            layer: dict[str, WeightHome] = {}
            tiers_of = placement.layer(j)
            for w in spec.layer_weights(j):
                tier = tiers_of[w.name]
                name = spec.storage_name(w.name)
                matrix = should_compress(w.name, w.shape)
                squeeze = compress and matrix
                key = (name, tier, squeeze)
                if key not in shared:
                    kept = store_dtype if matrix and store_dtype is not None else dtype
                    place = _place_compressed if squeeze else _place_weight
                    shared[key] = place(store, name, w.shape, tier, dtype if squeeze else kept, tiers)
                layer[role_of(w.name)] = shared[key]
                bar.update(1)
            homes.append(layer)
    finally:
        bar.close()
    return homes


def _place_weight(store, name: str, shape, tier: str, dtype: torch.dtype, tiers: Tiers) -> WeightHome:
    entry = store.entry(name)
    if tuple(entry.shape) != tuple(shape):
        raise ExecutionError(f"weight {name} has shape {tuple(entry.shape)} in the store, the model needs {shape}")
    if tier == "disk":
        if entry.dtype == dtype and entry.offset == 0:
            store._check_size(entry)                    # read in place during the run
            return WeightHome("disk", disk=DiskTensor(Path(entry.file), entry.offset, tuple(shape), dtype))
        t = store.read(name, dtype=dtype, verify=False)
        path = tiers.file(f"w-{name}.raw")
        dt = DiskTensor(path, 0, tuple(shape), dtype)
        tiers.write(dt, t)
        return WeightHome("disk", disk=dt)
    out = tiers.empty(tier, shape, dtype)
    if out.device.type == "cpu" and entry.dtype == dtype:
        store.read(name, verify=False, out=out)
    else:
        out.copy_(store.read(name, dtype=dtype, verify=False))
    return WeightHome(tier, tensor=out)


def _place_compressed(store, name: str, shape, tier: str, dtype: torch.dtype, tiers: Tiers) -> WeightHome:
    entry = store.entry(name)
    if tuple(entry.shape) != tuple(shape):
        raise ExecutionError(f"weight {name} has shape {tuple(entry.shape)} in the store, the model needs {shape}")
    dense = store.read(name, dtype=dtype, verify=False)
    if tier == "disk":
        q = _quantize_in_slices(dense, qtensor_empty(shape, dtype, WEIGHT_GROUP_DIM))
        qd = QDiskTensor(tiers.file(f"w-{name}.q4"), 0, qlayout(shape, dtype, WEIGHT_GROUP_DIM))
        tiers.write(qd.whole(), to_bytes_layout(q))
        return WeightHome("disk", qdisk=qd)
    home = tiers.empty_q(tier, shape, dtype, WEIGHT_GROUP_DIM)
    if home.packed.device == dense.device:
        _quantize_in_slices(dense, home)
    else:
        home.copy_(_quantize_in_slices(dense, qtensor_empty(shape, dtype, WEIGHT_GROUP_DIM)))
    return WeightHome(tier, q=home)


QUANTIZE_SLICE_BYTES = 64 << 20


def _quantize_in_slices(dense: torch.Tensor, out: QTensor) -> QTensor:
    """Quantise ``dense`` into ``out`` a slice of columns at a time: quantising works in
    float32 with a few temporaries, several times the input's size — gigabytes for a
    Llama-3 embedding table at once, which a memory cap near the model's size does not
    leave (the 4-bit Llama-3.1-8B run under 8 GiB was OOM-killed before this)."""
    if dense.dim() != 2 or out.group_dim != 0:
        return quantize_into(dense, out)
    rows, cols = dense.shape
    step = max(1, QUANTIZE_SLICE_BYTES // max(1, rows * dense.element_size()))
    for c in range(0, cols, step):
        n = min(step, cols - c)
        quantize_into(dense.narrow(1, c, n), out.narrow(1, c, n))
    return out


# ---- KV cache ----------------------------------------------------------------------------
@dataclass
class CacheSegment:
    tier: str
    rows: slice
    k: torch.Tensor | None = None          # [r, S, D] in memory
    v: torch.Tensor | None = None
    k_disk: DiskKV | None = None           # on disk: prompt [r, P, D], generated [S - P, r, D]
    v_disk: DiskKV | None = None
    kq: QTensor | None = None              # compressed: [r, S, D] grouped along D, in memory
    vq: QTensor | None = None
    kq_disk: QDiskTensor | None = None     # compressed: [S, r, D] seq-major on disk
    vq_disk: QDiskTensor | None = None

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


class CacheHome:
    """The KV cache of one (attention layer, GPU batch), split by rows across tiers."""

    def __init__(self, j: int, k: int, rows_per_tier: tuple[int, int, int], slots: int, head_dim: int,
                 dtype: torch.dtype, tiers: Tiers, compress: bool = False, store_dtype: torch.dtype | None = None,
                 prompt_len: int = 0):
        """``dtype``: the working dtype (a compressed cache's scales); a dense cache is kept
        in ``store_dtype`` (default: ``dtype``); ``prompt_len``: the tokens the first step
        writes (a dense disk cache keeps them row-major, :class:`DiskKV`)."""
        self.segments: list[CacheSegment] = []
        dense = store_dtype or dtype
        for tier, rows in row_ranges(rows_per_tier).items():
            r = rows.stop - rows.start
            if compress and tier == "disk":
                lay = qlayout((slots, r, head_dim), dtype, CACHE_GROUP_DIM)
                kd = QDiskTensor(tiers.file(f"kv-{j}-{k}.kq"), 0, lay)
                vd = QDiskTensor(tiers.file(f"kv-{j}-{k}.vq"), 0, lay)
                for d in (kd, vd):
                    _preallocate(d.whole(), tiers)
                self.segments.append(CacheSegment(tier, rows, kq_disk=kd, vq_disk=vd))
            elif compress:
                shape = (r, slots, head_dim)
                self.segments.append(CacheSegment(tier, rows, kq=tiers.empty_q(tier, shape, dtype, CACHE_GROUP_DIM),
                                                  vq=tiers.empty_q(tier, shape, dtype, CACHE_GROUP_DIM)))
            elif tier == "disk":
                kd, vd = (DiskKV(tiers.file(f"kv-{j}-{k}.{name}"), r, prompt_len, slots, head_dim, dense)
                          for name in "kv")
                for d in (kd, vd):     # reserve the space now: a full disk fails here, not mid-run
                    _preallocate(d.whole(), tiers)
                self.segments.append(CacheSegment(tier, rows, k_disk=kd, v_disk=vd))
            else:
                shape = (r, slots, head_dim)
                self.segments.append(CacheSegment(tier, rows, k=tiers.empty(tier, shape, dense),
                                                  v=tiers.empty(tier, shape, dense)))


def _preallocate(d: DiskTensor, tiers: Tiers) -> None:
    fd = tiers.disk.fd(d.path, create=True)
    try:
        os.posix_fallocate(fd, d.offset, d.nbytes)
    except OSError as e:
        raise ExecutionError(f"cannot reserve {d.nbytes} bytes in {d.path.parent} ({e.strerror}); free space "
                             "there, point --offload-dir at a larger disk, or plan with less on disk") from None


def make_cache_homes(spec: ModelSpec, num_gpu_batches: int, rows_per_tier, slots: int, dtype: torch.dtype,
                     tiers: Tiers, compress: bool = False, store_dtype: torch.dtype | None = None,
                     prompt_len: int = 0) -> dict[tuple[int, int], CacheHome]:
    return {(j, k): CacheHome(j, k, rows_per_tier, slots, spec.head_dim, dtype, tiers, compress, store_dtype,
                              prompt_len)
            for j in range(spec.num_layers) if spec.layer(j).kind == ATTN for k in range(num_gpu_batches)}


# ---- verification stamps -------------------------------------------------------------------
def verified_stamp_path(store) -> Path:
    from flexgraph.weights.cache import cache_root
    return cache_root() / "verified" / f"{store.index_checksum[:32]}.json"


def _file_state(store) -> dict[str, list[int]]:
    state = {}
    for name in store.names():
        st = os.stat(store.entry(name).file)
        state[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return state


def needs_verification(store) -> bool:
    """Checksums are verified once per store; afterwards (same files, same sizes and
    modification times) reads skip hashing.  A changed file is verified again."""
    path = verified_stamp_path(store)
    try:
        return json.loads(path.read_text()) != _file_state(store)
    except (OSError, ValueError):
        return True


def mark_verified(store) -> None:
    path = verified_stamp_path(store)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_file_state(store)))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("verification_stamp_not_written", path=str(path), error=str(e))


__all__ = ["TIERS", "Tiers", "DiskTensor", "DiskKV", "QDiskTensor", "WeightHome", "CacheHome", "CacheSegment",
           "load_weight_homes", "make_cache_homes", "needs_verification", "mark_verified"]
