"""The correctness matrix: greedy outputs identical to transformers under every policy.

Tiny OPT (350m-shaped: projections, post-LN) and tiny Llama (GQA, Llama-3 rope
scaling) in float32; prompts of different lengths in one run.  Placements: all on cpu;
weights 30/30/40 over a simulated gpu tier, cpu and disk; KV cache 0/50/50; activations
on disk; everything mixed.  Batch shapes 1x1, 2x3, 4x2; row and zig-zag; overlap on and
off; prefetch on and off.
"""

import pytest

from exec_helpers import (FAMILIES, GEN, LENGTHS, PLACEMENTS, SHAPES, assert_peaks_within_plan, prompts_of, run_tiny,
                          each_schedule, record_row_major_keys, shape_id, tiny_case)
from flexgraph.graph.builder import part_of
from flexgraph.models.spec import ModelSpec


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    _model, store, ids, mask, expected, _ = tiny_case(request.param, tmp, LENGTHS, GEN)
    return store, prompts_of(ids, mask), expected.tolist(), tmp


def _check(family, **kw):
    store, prompts, expected, tmp = family
    got, report, plan = run_tiny(store, tmp, prompts, GEN, **kw)
    assert got == expected, f"outputs differ from transformers under {plan.policy}"
    return report, plan


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_placements_and_batch_shapes(family, placement, shape):
    percent, gpu_mem = PLACEMENTS[placement]
    report, plan = _check(family, gbs=shape[0], ngb=shape[1], percent=percent, gpu_mem=gpu_mem)
    # the run really used the tiers the policy names
    moved = report.metrics["bytes_moved"]
    if placement == "activations-on-disk":
        assert moved.get("cpu->disk", 0) > 0 and moved.get("disk->cpu", 0) > 0
    if placement == "cache-0-50-50":
        assert report.metrics["disk_io"]["write_bytes"] > 0
    if gpu_mem:
        assert moved.get("cpu->gpu", 0) > 0 and moved.get("disk->gpu", 0) > 0
    assert_peaks_within_plan(report)


@each_schedule
def test_schedules_and_overlap(family, schedule, overlap):
    percent, gpu_mem = PLACEMENTS["mixed"]
    _check(family, gbs=2, ngb=3, percent=percent, gpu_mem=gpu_mem, schedule=schedule, overlap=overlap)


def test_without_prefetch(family):
    percent, gpu_mem = PLACEMENTS["mixed"]
    _check(family, gbs=4, ngb=2, percent=percent, gpu_mem=gpu_mem, prefetch=False)


def test_more_prompts_than_a_block_run_as_several_blocks(family):
    report, plan = _check(family, gbs=2, ngb=1, percent=PLACEMENTS["cache-0-50-50"][0])
    assert plan.policy.block_size == 2 and report.metrics["blocks"] == 4
    # the metrics add every node's seconds up by part, in every block, as the estimate does
    spec = ModelSpec.from_hf_config(plan.model["config"])
    parts, lanes = report.metrics["parts"], report.metrics["lanes"]
    assert set(parts) == {part_of(spec, kind, i, j) for kind, i, j, _k in plan.path}
    assert {"load_cache decode attn", "store_cache prefill attn", "compute decode head"} <= set(parts)
    assert sum(parts.values()) == pytest.approx(sum(lane["busy_seconds"] for lane in lanes.values()))
    assert parts["compute prefill mlp"] + parts["compute decode mlp"] < lanes["compute"]["busy_seconds"]


def test_partial_last_block(family):
    """5 prompts in blocks of 4: the filler rows of the last block change nothing."""
    store, prompts, expected, tmp = family
    got, report, _ = run_tiny(store, tmp, prompts[:5], GEN, gbs=2, ngb=2)
    assert got == expected[:5] and report.metrics["num_sequences"] == 8


def test_cache_on_disk_is_attended_row_major(family, monkeypatch):
    """A disk cache is stored seq-major (a token's rows in one write) but handed to the
    attention row-major: over the strided view attention ran 3x slower on a CPU.  The
    outputs stay transformers', and every key buffer attended has its tokens D apart."""
    strides = record_row_major_keys(monkeypatch)
    report, _ = _check(family, gbs=2, ngb=2, percent=(0, 100, 0, 0, 0, 100))
    assert report.metrics["disk_io"]["write_bytes"] > 0 and report.metrics["disk_io"]["read_bytes"] > 0
    assert strides and all(strides)


@pytest.mark.parametrize("placement,gbs,ngb", [("cache-0-50-50", 3, 2), ("mixed", 4, 2)])
def test_a_prefill_in_chunks_of_sequences_gives_the_same_tokens(family, monkeypatch, placement, gbs, ngb):
    """A CPU prefill of more than PREFILL_CHUNK_TOKENS tokens runs a few sequences at a
    time (here one: the prompts are 7 long).  Cut so, a batch's cache rows split over
    tiers mid-batch (3 sequences, half their cache on disk) still line up."""
    from flexgraph.models import forward
    from flexgraph.models import layers as L
    monkeypatch.setattr(forward, "PREFILL_CHUNK_TOKENS", 7)
    batches = []
    whole = L.attention_layer

    def recording(spec, w, h, *args, **kw):
        batches.append(tuple(h.shape[:2]))
        return whole(spec, w, h, *args, **kw)

    monkeypatch.setattr(L, "attention_layer", recording)
    percent, gpu_mem = PLACEMENTS[placement]
    _check(family, gbs=gbs, ngb=ngb, percent=percent, gpu_mem=gpu_mem)
    prefills = {b for b, s in batches if s > 1}
    decodes = {b for b, s in batches if s == 1}
    assert prefills == {1} and decodes == {gbs}           # prefill a sequence at a time, decode whole
