"""The layer maths against transformers, same weights, same prompts.

Covers every family and variant in ``hf_tiny.TINY_CONFIGS`` in float32 (logits within
1e-4, identical greedy tokens for 16 steps, prompts of different lengths in one batch)
and in bfloat16 (identical tokens for the first steps, logits close).
"""

import pytest
import torch

from flexgraph.models.forward import InMemoryModel
from flexgraph.models.spec import ModelSpec
from hf_tiny import TINY_CONFIGS, hf_greedy, padded_prompts, tiny_model

LENGTHS = [9, 4, 1, 7]   # one batch, left-padded to 9


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_float32_matches_transformers(name):
    model = tiny_model(name)
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    ids, mask = padded_prompts(spec.vocab_size, LENGTHS)
    hf_ids, hf_logits = hf_greedy(model, ids, mask, 16)
    ours = InMemoryModel(spec, model.state_dict(), torch.float32)
    our_ids, our_logits = ours.generate(ids, mask, 16, return_logits=True)
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-4, rtol=0)
    assert torch.equal(our_ids, hf_ids)
    # the comparison is not vacuous: the tokens vary and padding changes the result
    assert len(set(our_ids.flatten().tolist())) > 4


@pytest.mark.parametrize("name", ["llama3-rope-scaling-gqa4", "opt-350m-shape", "qwen2-bias"])
def test_bfloat16_close_to_transformers(name):
    model = tiny_model(name, dtype=torch.bfloat16)
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    ids, mask = padded_prompts(spec.vocab_size, LENGTHS, seed=1)
    steps = 4
    hf_ids, hf_logits = hf_greedy(model, ids, mask, steps)
    ours = InMemoryModel(spec, model.state_dict(), torch.bfloat16)
    our_ids, our_logits = ours.generate(ids, mask, steps, return_logits=True)
    assert torch.equal(our_ids, hf_ids)
    # bfloat16 keeps 8 significant bits: 2-3 roundings per layer add up to a few percent
    err = (our_logits - hf_logits).abs()
    assert err.mean() <= 0.02 * hf_logits.abs().mean()
    assert err.max() <= 0.05 * hf_logits.abs().max()


def test_left_padding_does_not_change_a_sequence():
    """A prompt alone and the same prompt padded in a batch give the same tokens."""
    model = tiny_model("llama-tied-gqa3")
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    ours = InMemoryModel(spec, model.state_dict())
    ids, mask = padded_prompts(spec.vocab_size, [8, 3])
    both = ours.generate(ids, mask, 8)
    alone = ours.generate(ids[1:, -3:], mask[1:, -3:], 8)
    assert torch.equal(both[1:], alone)


def test_spec_weights_match_transformers_state_dict():
    for name in TINY_CONFIGS:
        model = tiny_model(name)
        spec = ModelSpec.from_hf_config(model.config.to_dict())
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ours = {w.name: w.shape for w in spec.all_weights()}
        assert ours.items() <= state.items(), name
        unused = set(state) - set(ours) - {"lm_head.weight"}
        assert not unused, (name, unused)


def test_segments_of_cuts_cache_segments_to_a_chunk_of_rows():
    # two segments over 12 rows (5 on one tier, 7 on another); the chunk of rows [3, 9)
    # takes the last 2 of the first and the first 4 of the second, renumbered from 0
    import torch

    from flexgraph.models.forward import segments_of
    k0, v0 = torch.arange(5.0)[:, None], -torch.arange(5.0)[:, None]
    k1, v1 = torch.arange(5.0, 12.0)[:, None], -torch.arange(5.0, 12.0)[:, None]
    got = segments_of([(slice(0, 5), k0, v0), (slice(5, None), k1, v1)], 12, 3, 9)
    assert [rows for rows, _, _ in got] == [slice(0, 2), slice(2, 6)]
    assert [k[:, 0].tolist() for _, k, _ in got] == [[3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert [v[:, 0].tolist() for _, _, v in got] == [[-3.0, -4.0], [-5.0, -6.0, -7.0, -8.0]]
    assert got[0][1].data_ptr() == k0[3:].data_ptr()          # views into the tiers' buffers, not copies
    assert segments_of([(slice(0, 5), k0, v0)], 5, 5, 5) == []
