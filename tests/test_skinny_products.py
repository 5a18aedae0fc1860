"""A product of few rows (a decode step) multiplies with the weight on the left.

MKL's float32 GEMM packs its right-hand operand on every call; in ``x @ W^T`` that is the
whole weight.  ``layers.dense_linear`` and ``_Decoded.linear`` therefore compute
``(W @ x^T)^T`` for up to ``L.SKINNY_ROWS`` rows on the CPU in float32 (1.2-2.2x faster
for decode shapes on a 2-core AVX2 EPYC).  These tests check which operand order the
products use and that the result is the product to float32 rounding.
"""

import pytest
import torch
import torch.nn.functional as F

from flexgraph.exec import nodes
from flexgraph.models import layers as L


def _mm_operand_shapes(fn):
    """The input shapes of the matrix products ``fn`` runs (aten::mm / aten::addmm)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        result = fn()
    shapes = [[tuple(s) for s in e.input_shapes if s] for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    return result, shapes


@pytest.mark.parametrize("rows", [1, 5, L.SKINNY_ROWS])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_multiply_with_the_weight_on_the_left(rows, with_bias):
    torch.manual_seed(0)
    weight, bias = torch.randn(384, 96), (torch.randn(384) if with_bias else None)
    x = torch.randn(rows, 1, 96)                                   # [B, s=1, K]: a decode step
    got, shapes = _mm_operand_shapes(lambda: L.dense_linear(x, weight, bias))
    assert shapes and all((384, 96) in s and s.index((384, 96)) == (1 if with_bias else 0) for s in shapes), shapes
    assert got.shape == (rows, 1, 384) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_more_rows_than_skinny_run_as_f_linear():
    torch.manual_seed(0)
    weight, bias = torch.randn(384, 96), torch.randn(384)
    x = torch.randn(L.SKINNY_ROWS + 1, 96)
    assert torch.equal(L.dense_linear(x, weight, bias), F.linear(x, weight, bias))


def test_bfloat16_products_are_not_reordered():
    """Only float32 was measured faster (bfloat16 products go through oneDNN)."""
    x, weight = torch.randn(4, 96, dtype=torch.bfloat16), torch.randn(384, 96, dtype=torch.bfloat16)
    assert torch.equal(L.dense_linear(x, weight, None), F.linear(x, weight))


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_chunked_skinny_product_writes_each_chunk_into_rows_of_the_transposed_output(monkeypatch, with_bias):
    """A bfloat16 matrix converted a chunk of rows at a time for a decode step: each
    chunk multiplies on the left, into its rows of ``W @ x^T``; the result is the product
    with the converted matrix, laid out as ``F.linear``'s."""
    monkeypatch.setattr(nodes, "chunk_rows", lambda cols, itemsize, tokens: 64)
    torch.manual_seed(0)
    weight = torch.randn(320, 96).to(torch.bfloat16)                  # 5 chunks of 64 rows
    bias = torch.randn(320) if with_bias else None
    x = torch.randn(8, 1, 96)
    w = nodes._Decoded({"fc.weight": weight, **({"fc.bias": bias} if with_bias else {})}, torch.float32)
    got, shapes = _mm_operand_shapes(lambda: w.linear(x, "fc"))
    assert len(shapes) == 5 and all((64, 96) in s for s in shapes), shapes
    assert got.shape == (8, 1, 320) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight.float(), bias), rtol=1e-5, atol=1e-5)
