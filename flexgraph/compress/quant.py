"""FlexGen's group-wise 4-bit quantisation of weights and of the KV cache.

The scheme (Sheng et al., FlexGen, section 5; ``flexgen/compression.py``): split a tensor
into groups of ``group_size = 64`` consecutive elements along one dimension, the *group
dimension*; per group keep the minimum ``mn`` and the step ``scale = (max - min) / 15``
and replace every element by the 4-bit code ``round((x - mn) / scale)`` in ``0..15``.
Two codes share a byte.  Dequantisation is ``code * scale + mn``.

- **Weights** are grouped along their output channels, ``group_dim = 0`` of an
  ``[out, in]`` matrix (FlexGen's choice); embedding tables ``[V, H]`` are matrices too
  and are compressed along ``V`` like FlexGen does — for a tied model that *is* the
  head's output dimension.  1-D tensors (norms, biases) and tiny ones are kept as they are
  (:func:`should_compress`).
- **KV cache** entries are grouped along the head dimension, the last dim ``D``, so every
  token's row of every head is quantised on its own: one new token can be quantised and
  written into its slot of a preallocated compressed cache, and the result is the same
  as quantising the whole cache at once.

Layout of a :class:`QTensor` for a tensor of shape ``pre + (N,) + post`` grouped along
``N`` (``G = ceil(N / 64)`` groups; ``N`` is padded to ``G * 64`` when needed)::

    packed: uint8  pre + (G * 32,) + post     byte i of a group = code[2i] << 4 | code[2i + 1]
    scale:  dtype  pre + (G,) + post          step of each group (FlexGen keeps these in fp16;
    mn:     dtype  pre + (G,) + post          here they are in the working dtype)

so all three keep the other dimensions where they were: a slice along a non-group
dimension of the original tensor is the same slice of each of the three buffers
(:meth:`QTensor.narrow`).  For the seq-major disk cache ``[S, rows, D]`` that makes
``packed [S, rows, D/2]`` and ``scale, mn [S, rows, D/64]``, and the first ``T`` tokens
are a contiguous prefix of each buffer (three contiguous reads); in memory
``[rows, S, D]`` each row's prefix is contiguous, as for the uncompressed cache.

Differences from FlexGen, each deliberate:

- FlexGen keeps ``15 / (max - min)`` and divides on the way back; a constant group then
  gives ``0 * inf = NaN``.  We keep the step and multiply (one fused multiply-add per
  element); a constant group has step 0 and codes 0, and decodes exactly.
- FlexGen pads a short last group with zeros, which widens that group's range when its
  values are far from 0; we pad by repeating the last element, which never changes a
  group's min or max (the padding is never decoded into the output).
- Codes are computed against the *stored* (rounded to ``dtype``) step and minimum, so
  what is decoded is what was optimised for.

For the disk there is a fixed byte layout, :func:`qlayout`: ``scale | mn | packed``
back to back (dtype-sized parts first, so every part is aligned with no padding); :func:`qtensor_from_bytes` views a
byte buffer as a QTensor without copying, so a file region can be read straight into a
preallocated buffer (:func:`qtensor_empty` allocates the three buffers separately, for
caches that are read and written a token at a time).

Speed: everything is vectorised torch ops; dequantisation writes the codes straight into
the output and finishes in place (``code * scale + mn``).  On the CPU it goes through the
output in slices of ~1 MiB of codes, unpacking each slice's codes in a reused per-thread
scratch (:func:`_decode_groups`): two half-size uint8 temporaries of a whole matrix are
fresh mappings under a tight run's fixed mmap threshold (:mod:`flexgraph.malloc_threshold`),
faulted in page by page, which halved the decode rate there (3.5 against 7.6 GB/s for a
2048x8192 bfloat16 weight), and a slice's scratch stays in the core's L2.
``python -c "from flexgraph.compress.quant import main; main()"`` measures it: on a
2-core AMX Xeon a 4096x4096 bfloat16 weight decodes at ~7 GB/s of output, a KV cache (groups along its last dim) at ~4.4 GB/s — for the cache, as a
multiply then an add: a fused ``addcmul`` broadcasting a size-1 innermost dim ran at
half that.  Earlier measurements on other 2-core machines: 1.8-2.6 GB/s for the weight.
Fusing the decode into the matmul does not pay in plain torch on a CPU: the factorised
form ``x @ W.T = c @ (s * x).T + m @ x.T`` per group still needs the codes unpacked into
the working dtype (the same bytes as the weight), and a batched product over 64 groups
of ``[64, in] @ [in, 1]`` ran ~3x slower than one dense matrix-vector product — the
combination measured slower than decode-then-``F.linear``.  A real fused kernel needs
C++/Triton; the executor should decode into a reused buffer (:func:`dequantize_into`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace

import torch

BITS = 4
GROUP_SIZE = 64
LEVELS = (1 << BITS) - 1          # codes 0..15
WEIGHT_GROUP_DIM = 0              # output channels of an [out, in] matrix
CACHE_GROUP_DIM = -1              # the head dimension D of [..., D]
MIN_COMPRESS_NUMEL = 64 * 64      # below this a tensor's bytes are not worth the bother


# ---- the compressed tensor -----------------------------------------------------------------
@dataclass(frozen=True)
class QTensor:
    """A tensor of ``shape`` and ``dtype`` quantised group-wise along ``group_dim``.

    ``packed: [.., G*gs/2, ..]`` uint8 codes; ``scale, mn: [.., G, ..]`` in ``dtype``;
    the other dimensions are the original tensor's (see the module docstring).
    """
    packed: torch.Tensor
    scale: torch.Tensor
    mn: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_dim: int                # non-negative
    group_size: int = GROUP_SIZE

    @property
    def num_groups(self) -> int:
        return self.scale.shape[self.group_dim]

    @property
    def padded(self) -> int:
        """Length of the group dimension after padding to whole groups."""
        return self.num_groups * self.group_size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the three buffers (what this tensor costs in memory or on disk)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(packed, scale, mn)``: what to copy, read or write, in that order."""
        return self.packed, self.scale, self.mn

    def narrow(self, dim: int, start: int, length: int) -> QTensor:
        """Views of ``[start, start + length)`` along a dimension other than the group
        dimension — e.g. tokens ``[:T]`` of a cache, or a range of its rows."""
        dim = dim % len(self.shape)
        if dim == self.group_dim:
            raise ValueError("cannot narrow a QTensor along its group dimension")
        shape = self.shape[:dim] + (length,) + self.shape[dim + 1:]
        return replace(self, packed=self.packed.narrow(dim, start, length), scale=self.scale.narrow(dim, start, length),
                       mn=self.mn.narrow(dim, start, length), shape=shape)

    def copy_(self, src: QTensor) -> QTensor:
        """Copy another QTensor of the same shape into these buffers (e.g. between tiers)."""
        if src.shape != self.shape or src.group_dim != self.group_dim or src.group_size != self.group_size:
            raise ValueError(f"cannot copy a QTensor {src.shape}/{src.group_dim} into {self.shape}/{self.group_dim}")
        for d, s in zip(self.buffers(), src.buffers()):
            d.copy_(s, non_blocking=True)
        return self

    def to(self, device) -> QTensor:
        return replace(self, packed=self.packed.to(device), scale=self.scale.to(device), mn=self.mn.to(device))

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


# ---- shapes and sizes ----------------------------------------------------------------------
def _norm_dim(shape, group_dim: int) -> int:
    if not -len(shape) <= group_dim < len(shape):
        raise ValueError(f"group_dim {group_dim} out of range for shape {tuple(shape)}")
    return group_dim % len(shape)


def _check_group_size(group_size: int) -> None:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")


def num_groups(length: int, group_size: int = GROUP_SIZE) -> int:
    return -(-length // group_size)


def packed_shape(shape, group_dim: int, group_size: int = GROUP_SIZE) -> tuple[int, ...]:
    """Shape of the uint8 codes: the group dim becomes ``G * group_size / 2``."""
    gd = _norm_dim(shape, group_dim)
    _check_group_size(group_size)
    shape = tuple(shape)
    return shape[:gd] + (num_groups(shape[gd], group_size) * group_size // 2,) + shape[gd + 1:]


def scale_shape(shape, group_dim: int, group_size: int = GROUP_SIZE) -> tuple[int, ...]:
    """Shape of ``scale`` and of ``mn``: the group dim becomes ``G``."""
    gd = _norm_dim(shape, group_dim)
    _check_group_size(group_size)
    shape = tuple(shape)
    return shape[:gd] + (num_groups(shape[gd], group_size),) + shape[gd + 1:]


def compressed_nbytes(shape, dtype: torch.dtype, group_dim: int, group_size: int = GROUP_SIZE) -> int:
    """Exact bytes of the compressed form of a ``shape`` tensor (padding included)."""
    return compressed_itemsize_nbytes(shape, dtype.itemsize, group_dim, group_size)


def compressed_itemsize_nbytes(shape, itemsize: int, group_dim: int, group_size: int = GROUP_SIZE) -> int:
    """:func:`compressed_nbytes` for a working dtype given by its item size: the packed
    codes plus a scale and a minimum per group in that dtype."""
    return math.prod(packed_shape(shape, group_dim, group_size)) + \
        2 * math.prod(scale_shape(shape, group_dim, group_size)) * itemsize


def should_compress(name: str, shape) -> bool:
    """Whether a weight is worth compressing: matrices (embedding tables included, as
    in FlexGen), not 1-D norms and biases nor tiny tensors whose savings are nil.
    ``name`` is accepted so a policy by role can be added without changing callers."""
    return len(shape) >= 2 and math.prod(shape) >= MIN_COMPRESS_NUMEL


# ---- disk layout -----------------------------------------------------------------------------
@dataclass(frozen=True)
class QLayout:
    """Where the three buffers of a compressed ``shape`` tensor sit in one byte region:
    ``scale`` at 0, ``mn`` at ``mn_offset``, ``packed`` at ``packed_offset``.  The
    dtype-sized parts come first so every part is aligned without padding bytes, whatever
    the group size: ``nbytes == compressed_nbytes(...)`` always."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_dim: int
    group_size: int
    packed_shape: tuple[int, ...]
    scale_shape: tuple[int, ...]

    @property
    def packed_nbytes(self) -> int:
        return math.prod(self.packed_shape)

    @property
    def scale_nbytes(self) -> int:
        return math.prod(self.scale_shape) * self.dtype.itemsize

    @property
    def mn_offset(self) -> int:
        return self.scale_nbytes

    @property
    def packed_offset(self) -> int:
        return 2 * self.scale_nbytes

    @property
    def nbytes(self) -> int:
        return self.packed_offset + self.packed_nbytes


def qlayout(shape, dtype: torch.dtype, group_dim: int, group_size: int = GROUP_SIZE) -> QLayout:
    """The fixed byte layout ``scale | mn | packed`` of a compressed ``shape`` tensor."""
    gd = _norm_dim(shape, group_dim)
    return QLayout(tuple(shape), dtype, gd, group_size, packed_shape(shape, gd, group_size),
                   scale_shape(shape, gd, group_size))


def qtensor_from_bytes(buf: torch.Tensor, shape, dtype: torch.dtype, group_dim: int,
                       group_size: int = GROUP_SIZE) -> QTensor:
    """View a contiguous uint8 buffer laid out by :func:`qlayout` as a QTensor (no copy):
    read a file region into ``buf`` and this is the compressed tensor."""
    lay = qlayout(shape, dtype, group_dim, group_size)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or buf.numel() < lay.nbytes:
        raise ValueError(f"need a contiguous 1-D uint8 buffer of at least {lay.nbytes} bytes")
    scale = buf[:lay.mn_offset].view(dtype).view(lay.scale_shape)
    mn = buf[lay.mn_offset:lay.packed_offset].view(dtype).view(lay.scale_shape)
    packed = buf[lay.packed_offset:lay.nbytes].view(lay.packed_shape)
    return QTensor(packed, scale, mn, lay.shape, dtype, lay.group_dim, group_size)


def qtensor_empty_bytes(shape, dtype: torch.dtype, group_dim: int, group_size: int = GROUP_SIZE,
                        device="cpu", pin_memory: bool = False) -> tuple[torch.Tensor, QTensor]:
    """One preallocated byte region and the QTensor viewing it: a single read fills it."""
    lay = qlayout(shape, dtype, group_dim, group_size)
    buf = torch.empty(lay.nbytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)
    return buf, qtensor_from_bytes(buf, shape, dtype, group_dim, group_size)


def to_bytes_layout(q: QTensor) -> torch.Tensor:
    """The bytes of ``q`` in :func:`qlayout` order, as a new 1-D uint8 CPU tensor."""
    buf, out = qtensor_empty_bytes(q.shape, q.dtype, q.group_dim, q.group_size)
    out.copy_(q)
    return buf


def qtensor_empty(shape, dtype: torch.dtype, group_dim: int, group_size: int = GROUP_SIZE,
                  device="cpu", pin_memory: bool = False, empty=None) -> QTensor:
    """Three separately allocated, uninitialised buffers for a compressed ``shape`` tensor.

    For a cache, ``shape`` is the whole cache (``[S, rows, D]`` on disk, ``[rows, S, D]``
    in memory) with ``group_dim=-1``; tokens are written with :func:`quantize_into` into
    ``q.narrow(seq_dim, t, n)`` and a prefix read as ``q.narrow(seq_dim, 0, T)``.
    ``empty(shape, dtype)``, if given, makes each buffer (a pool's working copies).
    """
    gd = _norm_dim(shape, group_dim)

    def alloc(s, dt):
        if empty is not None:
            return empty(s, dt)
        return torch.empty(s, dtype=dt, device=device, pin_memory=pin_memory)

    return QTensor(alloc(packed_shape(shape, gd, group_size), torch.uint8), alloc(scale_shape(shape, gd, group_size), dtype),
                   alloc(scale_shape(shape, gd, group_size), dtype), tuple(shape), dtype, gd, group_size)


# ---- quantise ----------------------------------------------------------------------------------
def _pad_groups(x: torch.Tensor, gd: int, group_size: int) -> torch.Tensor:
    # x: [.., N, ..] -> [.., G*gs, ..], padded by repeating the last element (keeps min/max)
    n = x.shape[gd]
    pad = num_groups(n, group_size) * group_size - n
    if pad == 0:
        return x
    edge = x.narrow(gd, n - 1, 1)
    return torch.cat([x, edge.expand(*x.shape[:gd], pad, *x.shape[gd + 1:])], dim=gd)


def quantize(x: torch.Tensor, group_dim: int, group_size: int = GROUP_SIZE, bits: int = BITS) -> QTensor:
    """Quantise a floating-point tensor group-wise along ``group_dim`` (finite values)."""
    if bits != BITS:
        raise ValueError(f"only {BITS}-bit quantisation (two codes per byte) is implemented, got {bits}")
    out = qtensor_empty(x.shape, x.dtype, group_dim, group_size, device=x.device)
    return quantize_into(x, out)


# Elements quantised per slice on the CPU: the float32 temporaries of a slice (512 KiB)
# stay under a tight run's fixed mmap threshold, so they come from the heap and are
# reused, and stay in L2.  A 512-token prefill's cache, [512, 512, 64] bfloat16, encoded
# at 0.46 GB/s whole and 0.85 sliced here (0.39 and 0.7 under the tight allocator).
QUANTIZE_SLICE_ELEMENTS = 1 << 17


def quantize_into(x: torch.Tensor, out: QTensor) -> QTensor:
    """Quantise ``x`` (``out.shape``) into ``out``'s buffers, which may be views into a
    bigger compressed tensor — e.g. ``cache.narrow(0, t, 1)`` for token ``t``.  On the
    CPU a big tensor grouped along its last dim (a cache) goes in slices along dim 0
    (groups lie wholly inside a slice, so the bytes are the same); a weight, grouped
    along dim 0, is quantised once, at its home, in column slices
    (:func:`flexgraph.exec.homes._quantize_in_slices`)."""
    if tuple(x.shape) != out.shape:
        raise ValueError(f"quantize_into: tensor of shape {tuple(x.shape)} into QTensor of shape {out.shape}")
    if not x.is_floating_point():
        raise TypeError(f"can only quantise floating-point tensors, got {x.dtype}")
    if (x.device.type == "cpu" and x.dim() > 1 and out.group_dim == x.dim() - 1
            and x.numel() > QUANTIZE_SLICE_ELEMENTS):
        n = x.shape[0]
        step = max(1, QUANTIZE_SLICE_ELEMENTS // max(1, x.numel() // n))
        if step < n:
            for a in range(0, n, step):
                b = min(n, a + step)
                _quantize_slice(x[a:b], out.narrow(0, a, b - a))
            return out
    return _quantize_slice(x, out)


def _quantize_slice(x: torch.Tensor, out: QTensor) -> QTensor:
    gd, gs = out.group_dim, out.group_size
    groups = _pad_groups(x, gd, gs).unflatten(gd, (out.num_groups, gs)).float()   # [.., G, gs, ..]
    lo, hi = torch.aminmax(groups, dim=gd + 1, keepdim=True)                       # [.., G, 1, ..]
    # store step and minimum first, then code against the stored (rounded) values
    out.scale.copy_(((hi - lo) / LEVELS).squeeze(gd + 1))
    out.mn.copy_(lo.squeeze(gd + 1))
    step = out.scale.unsqueeze(gd + 1).float()
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))   # constant group: codes 0, exact
    codes = (groups - out.mn.unsqueeze(gd + 1).float()).mul_(inv).round_().clamp_(0, LEVELS).to(torch.uint8)
    pairs = codes.unflatten(gd + 1, (gs // 2, 2))                                   # [.., G, gs/2, 2, ..]
    dst = out.packed.unflatten(gd, (out.num_groups, gs // 2))                       # [.., G, gs/2, ..]
    torch.bitwise_or(pairs.select(gd + 2, 0) << 4, pairs.select(gd + 2, 1), out=dst)
    return out


# ---- dequantise --------------------------------------------------------------------------------
# Codes unpacked per slice on the CPU (packed bytes): big enough that the per-slice Python
# overhead stays small (~8 slices for a 32 MiB weight), small enough to stay in L2.
DECODE_SLICE_BYTES = 1 << 20
_scratch = threading.local()


def _code_scratch(nbytes: int) -> torch.Tensor:
    """This thread's reused uint8 buffer of at least ``nbytes`` (CPU only: CPU ops are
    synchronous, so a thread can reuse it at once; on a GPU two streams could race on
    it, and the caching allocator already makes temporaries cheap there)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        with torch.inference_mode(False):       # a normal tensor: written in and out of inference mode
            buf = _scratch.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


def _decode_slice(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor, gd: int,
                  codes: torch.Tensor | None) -> None:
    """packed: [.., G, gs/2, ..] uint8; scale, mn: [.., G, 1, ..]; out: [.., G, gs, ..] (any
    strides); codes: a contiguous uint8 buffer of packed's shape, or None for temporaries."""
    pairs = out.unflatten(gd + 1, (packed.shape[gd + 1], 2))                        # [.., G, gs/2, 2, ..]
    if codes is None:
        pairs.select(gd + 2, 0).copy_(packed >> 4)      # codes straight into the output, converted on copy
        pairs.select(gd + 2, 1).copy_(packed & 0xF)
    else:
        pairs.select(gd + 2, 0).copy_(torch.bitwise_right_shift(packed, 4, out=codes))
        pairs.select(gd + 2, 1).copy_(torch.bitwise_and(packed, 0xF, out=codes))
    if gd + 1 == out.dim() - 1:
        # groups along the last dim (the KV cache): addcmul broadcasting a size-1 innermost
        # dim runs at half the speed of a multiply and an add here (2.2 vs 4.4 GB/s of
        # bfloat16 output on an AMX Xeon); the product is rounded once more, as in FlexGen
        out.mul_(scale).add_(mn)
    else:
        torch.addcmul(mn, out, scale, out=out)          # one fused, in-place pass: code * scale + mn


def _decode_groups(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor, gd: int) -> None:
    """Decode into ``out`` (shapes as :func:`_decode_slice`); on the CPU slice by slice
    along dim 0, which every operand shares (the groups for a weight, the rows for a
    cache), through a reused scratch."""
    if packed.device.type != "cpu" or packed.numel() == 0:
        _decode_slice(packed, scale, mn, out, gd, None)
        return
    n0 = packed.shape[0]
    per_row = max(1, packed.numel() // n0)
    step = max(1, DECODE_SLICE_BYTES // per_row)
    scratch = _code_scratch(min(n0, step) * per_row)
    for a in range(0, n0, step):
        b = min(n0, a + step)
        p = packed[a:b]
        _decode_slice(p, scale[a:b], mn[a:b], out[a:b], gd, scratch[:p.numel()].view(p.shape))


def dequantize_into(q: QTensor, out: torch.Tensor) -> torch.Tensor:
    """Decode ``q`` into ``out`` (shape ``q.shape``, any floating dtype, any strides)."""
    if tuple(out.shape) != q.shape:
        raise ValueError(f"dequantize_into: QTensor of shape {q.shape} into tensor of shape {tuple(out.shape)}")
    gd, gs, g = q.group_dim, q.group_size, q.num_groups
    n = q.shape[gd]
    packed = q.packed.unflatten(gd, (g, gs // 2))                                   # [.., G, gs/2, ..]
    scale = q.scale.unsqueeze(gd + 1).to(out.dtype)                                 # [.., G, 1, ..]
    mn = q.mn.unsqueeze(gd + 1).to(out.dtype)
    full = n // gs                                       # groups that lie wholly inside the output
    if full:
        _decode_groups(packed.narrow(gd, 0, full), scale.narrow(gd, 0, full), mn.narrow(gd, 0, full),
                       out.narrow(gd, 0, full * gs).unflatten(gd, (full, gs)), gd)
    if full < g:                                         # a padded last group: decode it aside, keep the real part
        tail_shape = q.shape[:gd] + (1, gs) + q.shape[gd + 1:]
        tail = torch.empty(tail_shape, dtype=out.dtype, device=out.device)
        _decode_groups(packed.narrow(gd, full, 1), scale.narrow(gd, full, 1), mn.narrow(gd, full, 1), tail, gd)
        out.narrow(gd, full * gs, n - full * gs).copy_(tail.flatten(gd, gd + 1).narrow(gd, 0, n - full * gs))
    return out


def dequantize(q: QTensor) -> torch.Tensor:
    """A new tensor of ``q.shape`` in ``q.dtype`` on ``q.device``."""
    return dequantize_into(q, torch.empty(q.shape, dtype=q.dtype, device=q.device))


def dequantize_rows(q: QTensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a matrix quantised along dim 0 (an embedding lookup), decoding only
    the groups that hold them.  index: [...] long -> [..., H]."""
    if q.group_dim != 0 or len(q.shape) != 2:
        raise ValueError("dequantize_rows needs a matrix quantised along dim 0")
    gs = q.group_size
    flat = index.reshape(-1)
    groups, inverse = torch.unique(flat // gs, return_inverse=True)                 # [u], [n]
    packed = q.packed.unflatten(0, (q.num_groups, gs // 2))[groups]                 # [u, gs/2, H]
    sub = QTensor(packed.flatten(0, 1), q.scale[groups], q.mn[groups], (len(groups) * gs, q.shape[1]), q.dtype, 0, gs)
    rows = dequantize(sub)                                                          # [u*gs, H]
    return rows[inverse * gs + flat % gs].view(*index.shape, q.shape[1])


def fake_quantize(x: torch.Tensor, group_dim: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """``dequantize(quantize(x))``: the values a compressed tensor stands for (quality studies)."""
    return dequantize(quantize(x, group_dim, group_size))


# ---- measuring --------------------------------------------------------------------------------
def benchmark(rows: int = 4096, cols: int = 4096, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
              threads: int | None = None) -> dict[str, float]:
    """Dequantisation throughput (GB/s of output) of a ``rows x cols`` weight, and the
    time of a one-row product with the decoded weight vs with a dense one."""
    import time

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        w = torch.randn(rows, cols, dtype=dtype)
        q = quantize(w, WEIGHT_GROUP_DIM)
        out = torch.empty_like(w)
        x = torch.randn(1, cols, dtype=dtype)

        def best(f):
            f()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        t_deq = best(lambda: dequantize_into(q, out))
        t_lin = best(lambda: torch.nn.functional.linear(x, dequantize_into(q, out)))
        t_mm = best(lambda: torch.nn.functional.linear(x, w))
        return {"shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                "dequantize_ms": t_deq * 1e3, "dequantize_GBps": w.nbytes / t_deq / 1e9,
                "dequantize_then_linear_ms": t_lin * 1e3, "dense_linear_ms": t_mm * 1e3,
                "compressed_bytes": q.nbytes, "dense_bytes": w.nbytes}
    finally:
        torch.set_num_threads(old)


def main() -> None:
    """Print :func:`benchmark` for bfloat16 and float32, on one thread and on all."""
    import json
    for dt in (torch.bfloat16, torch.float32):
        for th in (1, None):
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in benchmark(dtype=dt, threads=th).items()}))


if __name__ == "__main__":
    main()
