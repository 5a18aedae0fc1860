"""Row-wise disk transfers and the disk KV cache's layout (prompt row-major, generated
tokens seq-major): a decode step reads the prompt's keys straight into the rows of its
row-major buffer, with no transposing copy."""

import types

import pytest
import torch

from flexgraph.errors import ExecutionError
from flexgraph.exec import diskio, nodes
from flexgraph.exec.diskio import ALIGN, DiskIO, aligned_empty
from flexgraph.exec.homes import DiskKV, Tiers
from test_exec_parts import _resident_pages


@pytest.fixture
def io():
    pool = DiskIO(workers=3)
    yield pool
    pool.close()


def _padded_rows(rows: int, tokens: int, room: int, d: int, dtype=torch.float32) -> torch.Tensor:
    """A [rows, tokens, d] view of a page-aligned [rows, tokens + room, d] buffer."""
    return aligned_empty((rows, tokens + room, d), dtype)[:, :tokens]


@pytest.mark.parametrize("tokens, room", [(16, 16), (5, 3)])      # rows of whole pages / not
def test_rows_go_back_to_back_in_the_file_and_come_back_into_place(io, tmp_path, tokens, room):
    src = _padded_rows(7, tokens, room, 64).normal_()
    io.write_rows_from(tmp_path / "f", 4096, src)
    on_disk = torch.frombuffer(bytearray((tmp_path / "f").read_bytes()[4096:]), dtype=torch.float32)
    assert torch.equal(on_disk.view(7, tokens, 64), src)            # the rows, back to back
    out = _padded_rows(7, tokens, room, 64).zero_()
    io.read_rows_into(tmp_path / "f", 4096, out)
    assert torch.equal(out, src)
    s = io.statistics()
    assert s.read_bytes == s.write_bytes == src.numel() * 4 and s.reads == s.writes == 1


def test_rows_of_whole_pages_bypass_the_page_cache(io, tmp_path):
    src = _padded_rows(64, 16, 16, 64).normal_()           # 4 KiB rows, 8 KiB apart
    io.write_rows_from(tmp_path / "f", 0, src)
    if io.direct_fd(tmp_path / "f", write=True) is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert _resident_pages(tmp_path / "f") == 0
    io.write_rows_from(tmp_path / "g", 0, _padded_rows(64, 5, 3, 64).normal_())   # 1280-byte rows: buffered
    assert _resident_pages(tmp_path / "g") > 0


def test_many_rows_are_cut_into_parallel_requests_and_short_reads_resume(io, tmp_path, monkeypatch):
    """More rows than one request takes (CHUNK bytes, IOV_MAX buffers) go out as several
    requests; a read that returns less than asked (as preadv may) is resumed mid-row."""
    monkeypatch.setattr(diskio, "CHUNK", 3 * 256)
    monkeypatch.setattr(diskio, "IOV_MAX", 2)
    src = _padded_rows(9, 1, 2, 64).normal_()               # 256-byte rows: 2 per request, 5 requests
    io.write_rows_from(tmp_path / "f", 0, src)
    real, calls = diskio.os.preadv, []

    def short(fd, bufs, offset):                            # at most 100 bytes per call
        calls.append(len(bufs))
        return real(fd, [memoryview(bufs[0])[:100]], offset)

    monkeypatch.setattr(diskio.os, "preadv", short)
    out = _padded_rows(9, 1, 2, 64).zero_()
    io.read_rows_into(tmp_path / "f", 0, out)
    assert torch.equal(out, src)
    assert max(calls) == 2 and len(calls) == 9 * 3          # each 256-byte row in three short reads


def test_rows_that_are_not_each_contiguous_are_refused(io, tmp_path):
    with pytest.raises(ValueError, match="each contiguous"):
        io.write_rows_from(tmp_path / "f", 0, torch.randn(4, 8, 6).transpose(1, 2))


# ---- the disk KV cache -------------------------------------------------------------------------
R, P, G, D = 6, 16, 4, 64          # rows, prompt tokens, generated tokens, head dim


def _state(tmp_path, io):
    tiers = Tiers("cpu", False, tmp_path, io)
    disks = tuple(DiskKV(tiers.file(f"kv.{n}"), R, P, P + G, D, torch.float32) for n in "kv")
    return types.SimpleNamespace(tiers=tiers, cache_dtype=torch.float32), disks


def test_disk_cache_keeps_the_prompt_row_major_and_new_tokens_seq_major(io, tmp_path):
    st, (kd, vd) = _state(tmp_path, io)
    k, v = torch.randn(R, P + G, D), torch.randn(R, P + G, D)
    nodes._store_disk_tokens(st, "cpu", kd, k, 0, P)           # the prefill
    nodes._store_disk_tokens(st, "cpu", vd, v, 0, P)
    for t in range(P, P + G - 1):                               # decode steps, a token each
        nodes._store_disk_tokens(st, "cpu", kd, k, t, t + 1)
        nodes._store_disk_tokens(st, "cpu", vd, v, t, t + 1)
    raw = torch.frombuffer(bytearray(kd.path.read_bytes()), dtype=torch.float32)
    assert torch.equal(raw[:R * P * D].view(R, P, D), k[:, :P])
    assert torch.equal(raw[R * P * D:].view(G - 1, R, D), k[:, P:P + G - 1].transpose(0, 1))

    for prefix in (P, P + G - 1):
        kb, vb = nodes._row_major_prefix(st, "cpu", (kd, vd), prefix + 1, prefix, R, D)
        assert kb.shape == (R, prefix + 1, D) and kb.stride(1) == D        # row-major, as attention wants
        assert kb.data_ptr() % ALIGN == 0 and (kb.stride(0) * 4) % ALIGN == 0
        assert torch.equal(kb[:, :prefix], k[:, :prefix]) and torch.equal(vb[:, :prefix], v[:, :prefix])


def test_the_prompt_is_read_into_place_and_only_generated_tokens_are_staged(io, tmp_path, monkeypatch):
    st, (kd, vd) = _state(tmp_path, io)
    k = torch.randn(R, P + G, D)
    for disk in (kd, vd):
        nodes._store_disk_tokens(st, "cpu", disk, k, 0, P)
        for t in range(P, P + 2):
            nodes._store_disk_tokens(st, "cpu", disk, k, t, t + 1)
    staged = []
    working = st.tiers.working
    monkeypatch.setattr(st.tiers, "working", lambda tier, shape, dtype: staged.append(tuple(shape))
                        or working(tier, shape, dtype))
    nodes._row_major_prefix(st, "cpu", (kd, vd), P + 3, P + 2, R, D)
    assert staged == [(2, R, D), (2, R, D)]                    # K's and V's two generated tokens only


def test_a_store_that_cuts_into_the_prompt_is_refused(io, tmp_path):
    st, (kd, _vd) = _state(tmp_path, io)
    with pytest.raises(ExecutionError, match="cross the prompt"):
        nodes._store_disk_tokens(st, "cpu", kd, torch.randn(R, P + G, D), 2, P)
