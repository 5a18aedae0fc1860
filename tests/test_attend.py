"""``attend``: grouped-query decode steps pass each group's query heads as rows of its kv head.

The results must be those of the fused kernel's own grouped-query path (bit-identical
in bfloat16, where the sums run in the same order), and the kernel must be called with
one head per kv head, so that each kv head's keys are read once per group.
"""

import pytest
import torch
import torch.nn.functional as F

from flexgraph.models import layers
from flexgraph.models.layers import Mask, attend

N, NH, NKV, T, D, ROOM = 5, 9, 3, 37, 64, 48


def _inputs(dtype, s=1):
    g = torch.Generator().manual_seed(0)
    # caches are views of buffers with room for more tokens, as in a run
    k = torch.randn(N, NKV, ROOM, D, generator=g).to(dtype)[:, :, :T]
    v = torch.randn(N, NKV, ROOM, D, generator=g).to(dtype)[:, :, :T]
    q = torch.randn(N, s, NH, D, generator=g).to(dtype).transpose(1, 2)    # [N, NH, s, D], as projected
    valid = torch.rand(N, 1, s, T, generator=g) > 0.3
    valid[..., -1] = True
    return q, k, v, valid


def _grouped_kernel(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.tensor, is_causal=mask.causal, scale=scale,
                                          enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_with_grouped_queries_matches_the_kernels_grouped_path(dtype, padded):
    q, k, v, valid = _inputs(dtype)
    mask = Mask(valid) if padded else Mask()
    ours = attend(q, k, v, mask, 0.125)
    expected = _grouped_kernel(q, k, v, mask, 0.125)
    assert ours.shape == (N, NH, 1, D)
    if dtype == torch.bfloat16:
        assert torch.equal(ours, expected)
    else:
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    # each query head got its own group's keys: moving a head to another group changes it
    wrong = _grouped_kernel(q.roll(NH // NKV, dims=1), k, v, mask, 0.125).roll(-(NH // NKV), dims=1)
    assert not torch.allclose(ours.float(), wrong.float(), atol=1e-2)


def test_decode_calls_the_kernel_with_one_head_per_kv_head(monkeypatch):
    seen = []
    kernel = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), kw.get("enable_gqa", False)))
        return kernel(q, k, v, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    q, k, v, valid = _inputs(torch.bfloat16)
    attend(q, k, v, Mask(valid), 0.125)
    assert seen == [((N, NKV, NH // NKV, D), (N, NKV, T, D), False)]
    # a prefill chunk (several new tokens, causal) keeps the kernel's grouped-query path
    seen.clear()
    q4, k4, v4, _ = _inputs(torch.bfloat16, s=4)
    attend(q4, k4, v4, Mask(causal=True), 0.125)
    assert seen == [((N, NH, 4, D), (N, NKV, T, D), True)]
