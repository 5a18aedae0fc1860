"""FlexGen's group-wise 4-bit quantisation (flexgraph.compress.quant).

Error bounds per group, the exact nibble layout on hand-written values, padding of a
short last group, exact byte accounting, the compressed KV cache written one token at a
time (and its prefix read back from disk), constant groups, and property tests.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgraph.compress.quant import (
    CACHE_GROUP_DIM,
    WEIGHT_GROUP_DIM,
    QTensor,
    compressed_nbytes,
    dequantize,
    dequantize_into,
    dequantize_rows,
    fake_quantize,
    packed_shape,
    qlayout,
    qtensor_empty,
    qtensor_empty_bytes,
    qtensor_from_bytes,
    quantize,
    quantize_into,
    scale_shape,
    should_compress,
    to_bytes_layout,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def group_stats(x: torch.Tensor, gd: int, gs: int = 64):
    """Per element: the range (max - min) and max |value| of the group it belongs to."""
    # x: [.., N, ..] -> two tensors of x's shape, float32
    x = x.float()
    gd = gd % x.dim()
    n = x.shape[gd]
    g = -(-n // gs)
    pad = g * gs - n
    if pad:
        edge = x.narrow(gd, n - 1, 1)
        x = torch.cat([x, edge.expand(*x.shape[:gd], pad, *x.shape[gd + 1:])], dim=gd)
    groups = x.unflatten(gd, (g, gs))
    rng = groups.amax(gd + 1, keepdim=True) - groups.amin(gd + 1, keepdim=True)
    absmax = groups.abs().amax(gd + 1, keepdim=True)

    def spread(t):
        return t.expand_as(groups).flatten(gd, gd + 1).narrow(gd, 0, n)

    return spread(rng), spread(absmax)


def assert_within_bound(x: torch.Tensor, y: torch.Tensor, gd: int, gs: int = 64):
    """|x - y| <= half a step ((max - min) / 15 / 2) plus rounding slack of x's dtype.

    The slack covers the step and the output being rounded to the dtype (scale and min
    are stored in it): one machine epsilon of the group's range and of its magnitude.
    """
    rng, absmax = group_stats(x, gd, gs)
    eps = torch.finfo(x.dtype).eps
    bound = rng / 15 / 2 + eps * (rng + absmax) + 1e-30
    err = (x.float() - y.float()).abs()
    worst = (err - bound).max()
    assert worst <= 0, f"error exceeds bound by {worst.item()} (max err {err.max().item()})"


# ---- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape, gd", [((256, 192), WEIGHT_GROUP_DIM), ((4, 3, 7, 64), CACHE_GROUP_DIM),
                                       ((5, 2, 128), CACHE_GROUP_DIM), ((192, 576), 1)])
def test_round_trip_error_is_within_half_a_step(dtype, shape, gd):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    q = quantize(x, gd)
    y = dequantize(q)
    assert y.dtype == dtype and tuple(y.shape) == shape
    assert q.scale.dtype == dtype and q.mn.dtype == dtype and q.packed.dtype == torch.uint8
    assert_within_bound(x, y, gd)
    # 4 bits cannot be exact on Gaussian data, but must be far better than nothing
    assert (y.float() - x.float()).abs().mean() < 0.15 * x.float().std()


def test_quantising_a_decoded_tensor_again_changes_nothing():
    # decoded values lie on the grid; re-quantising them must reproduce the same codes
    x = torch.randn(128, 64)
    q = quantize(x, 0)
    q2 = quantize(dequantize(q), 0)
    assert torch.equal(q.packed, q2.packed)
    torch.testing.assert_close(dequantize(q2), dequantize(q), rtol=0, atol=1e-6)


# ---- exact layout ----------------------------------------------------------------------------
CODES = list(range(16)) + list(range(15, -1, -1)) + list(range(16)) + list(range(15, -1, -1))   # 64 codes
BYTES = [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10] * 2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_64_known_values_pack_into_32_known_bytes(dtype):
    # values 0.5 * code - 3: min -3, step 0.5, so the codes are CODES exactly
    x = (torch.tensor(CODES, dtype=torch.float32) * 0.5 - 3).to(dtype)
    q = quantize(x, 0)
    assert q.packed.tolist() == BYTES                     # byte i = code[2i] << 4 | code[2i + 1]
    assert q.scale.tolist() == [0.5] and q.mn.tolist() == [-3.0]
    assert torch.equal(dequantize(q), x)                  # on-grid values decode exactly


def test_matrix_packs_pairs_of_rows_along_output_channels():
    # group_dim 0 of [64, 2]: a byte holds rows 2i and 2i+1 of one column
    c = torch.tensor(CODES, dtype=torch.float32)
    w = torch.stack([c, 15 - c], dim=1)                   # [64, 2]
    q = quantize(w, WEIGHT_GROUP_DIM)
    assert q.packed.shape == (32, 2) and q.scale.shape == (1, 2)
    assert q.packed[:, 0].tolist() == BYTES
    assert q.packed[:, 1].tolist() == [0xFF - b for b in BYTES]   # 15 - c flips every nibble
    assert torch.equal(dequantize(q), w)


def test_unpacking_hand_made_bytes():
    packed = torch.tensor(BYTES, dtype=torch.uint8)
    q = QTensor(packed, torch.tensor([2.0]), torch.tensor([1.0]), (64,), torch.float32, 0)
    assert dequantize(q).tolist() == [2.0 * c + 1.0 for c in CODES]


# ---- padding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, gd", [((100, 3), 0), ((5, 70), -1), ((2, 1, 3), 1), ((130,), 0)])
def test_short_last_group_is_padded_and_counted(shape, gd):
    x = torch.randn(shape) * 5
    q = quantize(x, gd)
    n = shape[gd]
    g = math.ceil(n / 64)
    assert q.num_groups == g
    assert q.packed.shape == packed_shape(shape, gd) and q.packed.shape[gd] == g * 32
    assert q.scale.shape == scale_shape(shape, gd) and q.scale.shape[gd] == g
    assert q.nbytes == compressed_nbytes(shape, torch.float32, gd)
    y = dequantize(q)
    assert tuple(y.shape) == shape
    assert_within_bound(x, y, gd)
    # padding repeats the last element, so the last group's range is its real values' range
    last = x.narrow(gd % x.dim(), (g - 1) * 64, n - (g - 1) * 64)
    rng = last.amax(gd) - last.amin(gd)
    torch.testing.assert_close(q.scale.narrow(gd % x.dim(), g - 1, 1).squeeze(gd), rng / 15)


def test_padding_of_a_far_from_zero_group_keeps_its_precision():
    # FlexGen pads with zeros, which would stretch this group's range to [0, 1001]
    x = 1000 + torch.rand(70)
    y = dequantize(quantize(x, 0))
    assert (y - x).abs().max() < 1 / 15


# ---- sizes and layouts -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape, gd", [((4096, 4096), 0), ((49152, 576), 0), ((80, 12, 64), -1), ((3, 65), 1)])
def test_compressed_nbytes_is_the_real_size(dtype, shape, gd):
    n = compressed_nbytes(shape, dtype, gd)
    empty = qtensor_empty(shape, dtype, gd)
    assert empty.nbytes == n == qlayout(shape, dtype, gd).nbytes
    g = math.ceil(shape[gd] / 64)
    other = math.prod(shape) // shape[gd]
    assert n == other * g * (32 + 2 * dtype.itemsize)


def test_4bit_is_about_a_quarter_of_bfloat16():
    shape = (4096, 4096)
    ratio = compressed_nbytes(shape, torch.bfloat16, 0) / (math.prod(shape) * 2)
    assert ratio == pytest.approx((0.5 + 2 * 2 / 64) / 2)     # 0.28125


def test_bytes_layout_round_trips_through_a_file(tmp_path):
    x = torch.randn(100, 48, dtype=torch.bfloat16)
    q = quantize(x, 0)
    raw = to_bytes_layout(q)
    assert raw.dtype == torch.uint8 and raw.numel() == q.nbytes
    path = tmp_path / "w.q4"
    path.write_bytes(raw.numpy().tobytes())
    buf, back = qtensor_empty_bytes(x.shape, x.dtype, 0)       # what the executor preallocates
    with open(path, "rb", buffering=0) as f:
        assert f.readinto(memoryview(buf.numpy())) == q.nbytes   # one read, straight into the buffers
    for a, b in zip(q.buffers(), back.buffers()):
        assert torch.equal(a, b)
    assert torch.equal(dequantize(back), dequantize(q))
    same = qtensor_from_bytes(raw, x.shape, x.dtype, 0)        # views, no copy
    assert same.scale.data_ptr() == raw.data_ptr()


def test_qtensor_from_bytes_rejects_a_short_buffer():
    with pytest.raises(ValueError):
        qtensor_from_bytes(torch.empty(10, dtype=torch.uint8), (64, 64), torch.float32, 0)


# ---- the KV cache, a token at a time --------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_seq_major_cache_written_per_token_equals_quantising_it_whole(dtype):
    s, rows, d = 9, 6, 64
    kv = torch.randn(s, rows, d).to(dtype)                      # disk layout [S, rows, D]
    whole = quantize(kv, CACHE_GROUP_DIM)
    cache = qtensor_empty((s, rows, d), dtype, CACHE_GROUP_DIM)
    quantize_into(kv[:4], cache.narrow(0, 0, 4))                # prefill writes 4 tokens at once
    for t in range(4, s):                                       # then decode one at a time
        quantize_into(kv[t:t + 1], cache.narrow(0, t, 1))
    for a, b in zip(whole.buffers(), cache.buffers()):
        assert torch.equal(a, b)
    assert cache.packed.shape == (s, rows, d // 2) and cache.scale.shape == (s, rows, d // 64)
    # a prefix of T tokens is a contiguous prefix of each of the three buffers
    t = 5
    prefix = cache.narrow(0, 0, t)
    for full, part in zip(cache.buffers(), prefix.buffers()):
        assert part.is_contiguous() and part.data_ptr() == full.data_ptr()
    assert torch.equal(dequantize(prefix), dequantize(whole)[:t])


def test_row_major_memory_cache_per_slot_equals_whole():
    rows, s, d = 4, 7, 128                                      # memory layout [rows, S, D]
    kv = torch.randn(rows, s, d, dtype=torch.bfloat16)
    cache = qtensor_empty((rows, s, d), torch.bfloat16, CACHE_GROUP_DIM)
    quantize_into(kv[:, :3], cache.narrow(1, 0, 3))
    for t in range(3, s):
        quantize_into(kv[:, t:t + 1], cache.narrow(1, t, 1))
    whole = quantize(kv, CACHE_GROUP_DIM)
    for a, b in zip(whole.buffers(), cache.buffers()):
        assert torch.equal(a, b)
    assert torch.equal(dequantize(cache.narrow(1, 0, 5)), dequantize(whole)[:, :5])


def test_cache_prefix_read_from_disk_into_preallocated_buffers(tmp_path):
    s, rows, d, t = 10, 3, 64, 6
    kv = torch.randn(s, rows, d, dtype=torch.float16)
    cache = quantize(kv, CACHE_GROUP_DIM)
    paths = [tmp_path / n for n in ("k.packed", "k.scale", "k.mn")]
    for p, b in zip(paths, cache.buffers()):
        p.write_bytes(b.numpy().tobytes())
    got = qtensor_empty((t, rows, d), torch.float16, CACHE_GROUP_DIM)
    for p, b in zip(paths, got.buffers()):                     # one contiguous read per buffer
        with open(p, "rb", buffering=0) as f:
            n = b.numel() * b.element_size()
            assert f.readinto(memoryview(b.view(torch.uint8).numpy()).cast("B")) == n
    assert torch.equal(dequantize(got), dequantize(cache)[:t])


def test_narrowing_along_the_group_dimension_is_refused():
    q = quantize(torch.randn(3, 64), -1)
    with pytest.raises(ValueError):
        q.narrow(1, 0, 32)


# ---- constant groups and odd inputs -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_constant_groups_decode_exactly_without_nan(dtype):
    x = torch.randn(4, 256).to(dtype)
    x[1] = 3.25
    x[2] = 0.0
    x[3, 64:128] = -7.5                                         # one constant group among varied ones
    q = quantize(x, -1)
    y = dequantize(q)
    assert torch.isfinite(y).all() and torch.isfinite(q.scale).all()
    assert torch.equal(y[1], x[1]) and torch.equal(y[2], x[2]) and torch.equal(y[3, 64:128], x[3, 64:128])
    assert (q.scale[1] == 0).all()
    assert_within_bound(x, y, -1)


def test_dequantize_into_strided_output_of_another_dtype():
    x = torch.randn(128, 96, dtype=torch.bfloat16)
    q = quantize(x, 0)
    big = torch.zeros(96, 130, dtype=torch.float32)
    out = big[:, 1:129].t()                                     # [128, 96], non-contiguous
    dequantize_into(q, out)
    # decoded in float32: more precise than the bfloat16 decode, equal after rounding to it
    torch.testing.assert_close(out, dequantize(q).float(), rtol=2 ** -8, atol=0)
    assert_within_bound(x, out, 0)
    assert (big[:, 0] == 0).all() and (big[:, 129] == 0).all()


def test_embedding_rows_decoded_alone_match_the_whole_table():
    table = torch.randn(300, 40)
    q = quantize(table, WEIGHT_GROUP_DIM)
    ids = torch.tensor([[0, 299, 64, 64], [5, 130, 131, 1]])
    assert torch.equal(dequantize_rows(q, ids), dequantize(q)[ids])


def test_invalid_arguments():
    with pytest.raises(ValueError):
        quantize(torch.randn(64), 0, bits=8)
    with pytest.raises(ValueError):
        quantize(torch.randn(64), 0, group_size=63)
    with pytest.raises(TypeError):
        quantize(torch.arange(64), 0)
    with pytest.raises(ValueError):
        quantize(torch.randn(64), 1)
    with pytest.raises(ValueError):
        quantize_into(torch.randn(3, 64), qtensor_empty((4, 64), torch.float32, -1))


def test_should_compress_matrices_only():
    assert should_compress("model.layers.0.self_attn.q_proj.weight", (576, 576))
    assert should_compress("model.embed_tokens.weight", (49152, 576))          # embeddings too, as FlexGen
    assert not should_compress("model.layers.0.input_layernorm.weight", (576,))
    assert not should_compress("model.decoder.layers.0.fc1.bias", (3072,))
    assert not should_compress("tiny", (8, 8))


def test_fake_quantize_is_dequantize_of_quantize():
    x = torch.randn(64, 70)
    assert torch.equal(fake_quantize(x, 1), dequantize(quantize(x, 1)))


# ---- properties --------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 150), min_size=1, max_size=3), gd_pick=st.integers(0, 2),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), log_scale=st.integers(-3, 3),
       group_size=st.sampled_from([2, 16, 64]))
def test_properties_on_random_shapes(shape, gd_pick, dtype, seed, log_scale, group_size):
    shape = tuple(shape)
    gd = gd_pick % len(shape)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 10.0 ** log_scale + torch.randn((), generator=g)).to(dtype)
    q = quantize(x, gd, group_size)
    assert q.nbytes == compressed_nbytes(shape, dtype, gd, group_size) == qlayout(shape, dtype, gd, group_size).nbytes
    assert tuple(q.packed.shape) == packed_shape(shape, gd, group_size)
    y = dequantize(q)
    assert y.dtype == dtype and tuple(y.shape) == shape
    assert_within_bound(x, y, gd, group_size)
    back = qtensor_from_bytes(to_bytes_layout(q), shape, dtype, gd, group_size)
    assert torch.equal(dequantize(back), y)
    # slices along any other dimension quantise independently (the cache's property)
    other = (gd + 1) % len(shape)
    if other != gd and shape[other] > 1:
        half = shape[other] // 2
        part = qtensor_empty(shape, dtype, gd, group_size)
        quantize_into(x.narrow(other, 0, half), part.narrow(other, 0, half))
        quantize_into(x.narrow(other, half, shape[other] - half), part.narrow(other, half, shape[other] - half))
        for a, b in zip(q.buffers(), part.buffers()):
            assert torch.equal(a, b)


def test_weights_quantised_a_slice_of_columns_at_a_time_equal_whole(monkeypatch):
    """Homes quantise big matrices in column slices (bounded memory); groups run along the
    output channels, so every slice's groups are whole and the bytes are identical."""
    from flexgraph.compress.quant import WEIGHT_GROUP_DIM, qtensor_empty, quantize
    from flexgraph.exec import homes
    torch.manual_seed(0)
    w = torch.randn(200, 77, dtype=torch.bfloat16)
    monkeypatch.setattr(homes, "QUANTIZE_SLICE_BYTES", 200 * 2 * 10)        # 10 columns a slice
    sliced = homes._quantize_in_slices(w, qtensor_empty(w.shape, w.dtype, WEIGHT_GROUP_DIM))
    whole = quantize(w, WEIGHT_GROUP_DIM)
    for a, b in zip(sliced.buffers(), whole.buffers()):
        assert torch.equal(a, b)


# ---- decoding on the CPU: in slices, through a reused scratch ----------------------------------
def _biggest_allocation(fn) -> int:
    """The largest CPU allocation (bytes) any op makes while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("shape, gd", [((1000, 96), WEIGHT_GROUP_DIM), ((300, 7, 128), CACHE_GROUP_DIM)])
def test_decoding_in_slices_equals_decoding_whole(monkeypatch, shape, gd):
    """Small slices (many of them, the last one short) give the bytes of one whole pass."""
    from flexgraph.compress import quant
    torch.manual_seed(1)
    q = quantize(torch.randn(shape, dtype=torch.bfloat16), gd)
    monkeypatch.setattr(quant, "DECODE_SLICE_BYTES", 3 * 1000)
    sliced = dequantize_into(q, torch.empty(shape, dtype=torch.bfloat16))
    monkeypatch.setattr(quant, "_decode_groups",
                        lambda p, s, m, o, g: quant._decode_slice(p, s, m, o, g, None))    # the GPU's path
    whole = dequantize_into(q, torch.empty(shape, dtype=torch.bfloat16))
    assert torch.equal(sliced, whole)


def test_decoding_a_cache_prefix_in_slices_equals_the_prefix_of_the_whole(monkeypatch):
    """A cache's prefix is a strided view of its buffers; slicing must follow the strides."""
    from flexgraph.compress import quant
    monkeypatch.setattr(quant, "DECODE_SLICE_BYTES", 3 * 11 * 32)      # 3 rows of the prefix a slice
    torch.manual_seed(2)
    x = torch.randn(40, 30, 64, dtype=torch.bfloat16)              # [rows, S, D]
    q = quantize(x, CACHE_GROUP_DIM)
    prefix = dequantize_into(q.narrow(1, 0, 11), torch.empty(40, 11, 64, dtype=torch.bfloat16))
    assert torch.equal(prefix, dequantize(q)[:, :11])


def test_cpu_decode_allocates_no_temporaries_of_the_matrix_size():
    """Under a tight run's fixed mmap threshold every big temporary is a fresh mapping
    faulted in page by page: the decode keeps to its slice-sized scratch instead."""
    from flexgraph.compress import quant
    quant._scratch.buf = None              # earlier tests may have grown it (a row bigger than a slice)
    q = quantize(torch.randn(2048, 1024, dtype=torch.bfloat16), WEIGHT_GROUP_DIM)    # 1 MiB of codes
    out = torch.empty(2048, 1024, dtype=torch.bfloat16)
    dequantize_into(q, out)                                          # the scratch exists from here on
    scratch = quant._code_scratch(1).data_ptr()
    assert _biggest_allocation(lambda: dequantize_into(q, out)) < 64 << 10
    assert quant._code_scratch(1).data_ptr() == scratch              # reused, not replaced
    assert quant._scratch.buf.numel() <= quant.DECODE_SLICE_BYTES


@pytest.mark.parametrize("shape", [(300, 7, 128), (9, 1, 64), (5, 70000, 64)])
def test_cache_quantised_in_slices_equals_quantising_it_whole(monkeypatch, shape):
    """Slices along the rows (the last one short, or one row bigger than a slice) give
    the bytes of one whole pass."""
    from flexgraph.compress import quant
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "QUANTIZE_SLICE_ELEMENTS", 2000)
    sliced = quantize(x, CACHE_GROUP_DIM)
    whole = qtensor_empty(x.shape, x.dtype, CACHE_GROUP_DIM)
    quant._quantize_slice(x, whole)
    for a, b in zip(sliced.buffers(), whole.buffers()):
        assert torch.equal(a, b)


def test_decode_scratch_made_in_inference_mode_serves_outside_it():
    from flexgraph.compress import quant
    q = quantize(torch.randn(256, 64), WEIGHT_GROUP_DIM)
    quant._scratch.buf = None
    with torch.inference_mode():
        inside = dequantize(q)
    assert torch.equal(dequantize(q), inside)
