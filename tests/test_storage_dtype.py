"""Mixed precision: weight matrices and KV cache kept in bfloat16, computed in float32.

The reference is transformers with the same weights: its float32 model with every matrix
flexgraph keeps in bfloat16 (those :func:`~flexgraph.compress.quant.should_compress`
accepts) rounded to bfloat16, generating with a KV cache that keeps K and V rounded to
bfloat16 — what flexgraph's attention reads back at the next steps (a step's own new
entries are used in full precision, as FlexGen does with its compressed cache).  Everything else is float32
on both sides, so greedy tokens must be identical and logits equal to float32 rounding,
under every placement, batch shape and schedule of the correctness matrix.

Plus: the bytes (homes halved, the disk reads halved), memory accounting (measured <=
granted <= planned with the conversion buffers), the policy's validation, the CLI, and
the cost model and search deciding it by the calibrated rates.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache

from exec_helpers import (FAMILIES, GEN, LENGTHS, PLACEMENTS, SHAPES, assert_peaks_within_plan, prompts_of,
                          record_row_major_keys, with_allocations, run_tiny,
                          each_schedule, shape_id, tiny_store)
from flexgraph.calibrate import Calibration
from flexgraph.cli import main
from flexgraph.compress.quant import should_compress
from flexgraph.errors import PlanError
from flexgraph.graph.builder import LARGE_CHUNK_BYTES, Workload, make_sizes, static_homes
from flexgraph.models.builtin import builtin_config
from flexgraph.models.spec import ModelSpec
from flexgraph.plan.cost import CostModel
from flexgraph.plan.planner import Knobs, weights_read_in_place
from flexgraph.plan.policy import Policy, Split, policy_weight_placement
from flexgraph.plan.search import search_policy
from hf_tiny import padded_prompts

ON_DISK = (0, 0, 0, 0, 0, 100)           # weights and cache on disk, activations in RAM
# Float32 rounding differs with the batch shape, and now and then it moves a K or V
# element across a bfloat16 rounding boundary: one such flip moved a logit by 6e-4 (most
# agree to 1e-5).  Leaving out either rounding moves them by far more (measured on these
# models: weights not rounded 0.14-0.19, the cache not rounded 0.07-0.09).
LOGIT_ATOL = 5e-3


class _RoundingCache(DynamicCache):
    """transformers' cache, keeping K and V as a bfloat16 cache holds them; a step attends
    to the cached prefix as stored and to its own new entries in full precision (as
    FlexGen does with a compressed cache, and flexgraph with either)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        def r(t):
            return t.to(torch.bfloat16).to(t.dtype)
        keys, values = super().update(r(key_states), r(value_states), layer_idx, *args, **kwargs)
        n = key_states.shape[-2]
        return (torch.cat([keys[..., :-n, :], key_states], dim=-2),
                torch.cat([values[..., :-n, :], value_states], dim=-2))


@torch.inference_mode()
def _hf_reference(model, ids, mask, steps):
    for p in model.parameters():
        if should_compress("", tuple(p.shape)):
            p.copy_(p.to(torch.bfloat16))
    with warnings.catch_warnings():      # newer transformers prefer ``cache=``; older ones know only this
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             eos_token_id=None, past_key_values=_RoundingCache(config=model.config))
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1).float()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model, store = tiny_store(request.param, tmp)
    ids, mask = padded_prompts(store.spec.vocab_size, LENGTHS, seed=3)
    rounded = sum(should_compress("", tuple(p.shape)) for p in model.parameters())
    assert rounded >= 4 * store.spec.num_blocks      # the check below is about real conversions
    hf_ids, hf_logits = _hf_reference(model, ids, mask, GEN)
    return store, prompts_of(ids, mask), hf_ids, hf_logits, tmp


def _run(family, **kw):
    store, prompts, hf_ids, hf_logits, tmp = family
    got, report, plan = run_tiny(store, tmp, prompts, GEN, record_logits=True, storage_dtype="bfloat16", **kw)
    assert plan.policy.storage_dtype == "bfloat16"
    assert got == hf_ids.tolist(), f"outputs differ from transformers under {plan.policy}"
    for n, logits in enumerate(report.logits):
        err = (logits - hf_logits[n]).abs().max().item()
        assert err <= LOGIT_ATOL, (n, err)
    return report, plan


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bfloat16_storage_matches_transformers_on_the_same_weights(family, placement, shape):
    percent, gpu_mem = PLACEMENTS[placement]
    report, _plan = _run(family, gbs=shape[0], ngb=shape[1], percent=percent, gpu_mem=gpu_mem)
    assert_peaks_within_plan(report)


@each_schedule
def test_bfloat16_storage_under_every_schedule(family, schedule, overlap):
    percent, gpu_mem = PLACEMENTS["mixed"]
    _run(family, gbs=2, ngb=3, percent=percent, gpu_mem=gpu_mem, schedule=schedule, overlap=overlap)


def test_bfloat16_storage_reads_half_the_bytes_from_disk(family):
    store, prompts, _ids, _logits, tmp = family
    _got, f32, f32_plan = run_tiny(store, tmp, prompts, GEN, gbs=4, ngb=2, percent=ON_DISK)
    report, plan = _run(family, gbs=4, ngb=2, percent=ON_DISK)
    read = lambda r: r.metrics["bytes_moved"]["disk->cpu"]      # noqa: E731
    # 1-D norms and biases and the tiny projections stay float32: a little over half
    assert 0.45 * read(f32) < read(report) < 0.6 * read(f32)
    # the float32 run reads its weights from the (float32) store in place; the bfloat16
    # one keeps a converted copy in the run folder: half of what a float32 copy would take
    assert weights_read_in_place(f32_plan.hardware, f32_plan.policy)
    assert not weights_read_in_place(plan.hardware, plan.policy)
    f32_copy = f32_plan.residency["home"]["disk"] + sum(
        b.get("disk", 0) for b in policy_weight_placement(store.spec, f32_plan.policy).bytes_per_tier)
    assert plan.residency["home"]["disk"] < 0.6 * f32_copy



def test_bfloat16_disk_cache_is_converted_from_a_row_major_buffer(family, monkeypatch):
    """The disk keeps the cache seq-major; the load lane lays it out row-major in bfloat16,
    so the compute converts it with a contiguous copy (through the transposed view of a
    seq-major buffer the conversion ran at under half the rate) and attends row-major.
    The outputs stay the reference's."""
    from flexgraph.exec import nodes
    converted: list[bool] = []
    decode_into = nodes._decode_into

    def recording(stored, out):          # [r, T, D] both, each row's tokens D apart
        converted.append(all(t.stride()[1:] == (t.shape[2], 1) for t in (stored, out)))
        return decode_into(stored, out)

    monkeypatch.setattr(nodes, "_decode_into", recording)
    strides = record_row_major_keys(monkeypatch)
    report, _plan = _run(family, gbs=2, ngb=2, percent=(0, 100, 0, 0, 0, 100))
    assert report.metrics["disk_io"]["read_bytes"] > 0
    assert converted and all(converted)
    assert strides and all(strides)

def test_homes_hold_the_matrices_and_the_cache_at_the_storage_size():
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    wl = Workload(4, 64, 8)

    def homes(storage):
        pol = Policy(4, 1, Split(0, 100), Split(0, 100), Split(0, 100), dtype="float32", storage_dtype=storage)
        out = {"Wh": 0, "Ch": 0, "Xw": 0, "Xc": 0}
        for buf, _tier, n in static_homes(spec, wl, pol, make_sizes(spec, pol, False)):
            out[buf[0]] += n
        return out

    f32, bf16 = homes(None), homes("bfloat16")
    vectors = sum(w.numel for j in range(spec.num_layers) for w in spec.layer_weights(j)
                  if not should_compress(w.name, w.shape)) * 4
    assert bf16["Wh"] == (f32["Wh"] - vectors) // 2 + vectors
    assert bf16["Ch"] * 2 == f32["Ch"]
    # and the buffers the conversions go into, for the whole run: the largest chunk of a
    # matrix converted at once (the 50272 x 768 head's, 32 MiB of whole groups of rows:
    # 10880, more than fc1's 3072) and K and V of every row at the longest context, in float32
    assert f32["Xw"] == f32["Xc"] == 0
    assert LARGE_CHUNK_BYTES // (768 * 4) // 64 * 64 == 10880
    assert bf16["Xw"] == 10880 * 768 * 4
    assert bf16["Xc"] == 2 * 4 * spec.num_kv_heads * wl.cache_len * spec.head_dim * 4


def test_policy_validates_and_normalises_the_storage_dtype():
    base = dict(gpu_batch_size=1, num_gpu_batches=1, weights=Split(0, 100), cache=Split(0, 100),
                activations=Split(0, 100))
    assert Policy(**base, dtype="float32", storage_dtype="float32").storage_dtype is None
    with pytest.raises(PlanError, match="wider than the working dtype"):
        Policy(**base, dtype="bfloat16", storage_dtype="float32")
    with pytest.raises(PlanError, match="unknown storage dtype"):
        Policy(**base, dtype="float32", storage_dtype="int8")
    pol = Policy(**base, dtype="float32", storage_dtype="bfloat16")
    assert Policy.from_json(pol.to_json()) == pol
    old = {k: v for k, v in pol.to_json().items() if k != "storage_dtype"}      # a plan from before
    assert Policy.from_json(old).storage_dtype is None


def test_plan_cli_storage_dtype(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = ["plan", "--model", "opt-125m", "--dummy", "--prompt-len", "16", "--gen-len", "4", "--num-prompts", "4",
            "--dtype", "float32", "--search", "rule", "--out", str(out), "--offload-dir", str(tmp_path / "off")]
    assert main(args + ["--storage-dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "float32 (stored bfloat16)" in text and "stored in bfloat16" in text
    assert main(args[:-6] + ["--dtype", "bfloat16", "--storage-dtype", "float32", "--search", "rule",
                             "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --storage-dtype float32 is wider") and "\n" not in err


# ---- the cost model and the search ---------------------------------------------------------------
GB = 1e9


def _model(spec, disk_bw=2 * GB, cast=8 * GB) -> CostModel:
    cal = Calibration("cpu", "float32", bandwidth={"disk->cpu": disk_bw, "cpu->disk": disk_bw},
                      mem_bandwidth=10 * GB, attention=[[64, 1e11], [2048, 1e11]], node_overhead=0.0,
                      cast={"bfloat16": cast})
    model = CostModel(spec, cal, 4)
    for k, n in model.matmul_shapes():
        cal.matmul[f"{min(k, 4096)}x{min(n, 4096)}"] = [[1, 1e10], [256, 5e10], [4096, 1e11], [16384, 1e11]]
    return model


def test_conversion_is_charged_to_each_compute_at_its_rate():
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    plain = _model(spec)
    cast = plain.for_policy(Policy(8, 1, Split(0, 100), Split(0, 100), Split(0, 100), dtype="float32",
                                   storage_dtype="bfloat16"))
    assert cast is plain.for_policy(Policy(8, 1, Split(0, 0), Split(0, 0), Split(0, 0), dtype="float32",
                                           storage_dtype="bfloat16"))      # one model per storage dtype
    attn, mlp = 1, 2
    matrices = lambda j: sum(w.numel for w in spec.layer_weights(j) if should_compress(w.name, w.shape))  # noqa: E731
    assert plain.cast_time(mlp, 8, 1, 100) == 0.0
    assert cast.cast_time(mlp, 8, 1, 100) == pytest.approx(matrices(mlp) * 4 / (8 * GB))
    kv = 2 * 8 * spec.num_kv_heads * spec.head_dim * 100 * 4
    assert cast.cast_time(attn, 8, 1, 100) == pytest.approx((matrices(attn) * 4 + kv) / (8 * GB))
    assert cast.cast_time(0, 8, 1, 100) == 0.0                     # the embedding converts its rows only
    assert cast.compute_time(mlp, 8, 1, 100) == pytest.approx(plain.compute_time(mlp, 8, 1, 100)
                                                              + matrices(mlp) * 4 / (8 * GB))


def test_search_stores_bfloat16_when_the_disk_bounds_and_not_when_conversion_is_all_it_adds():
    spec = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))
    wl = Workload(16, 128, 8)
    capped = {"device": "cpu", "gpu_mem": None, "cpu_mem": 2 << 30, "disk_mem": 1 << 40}
    best = search_policy(spec, wl, capped, Knobs(dtype="float32"), _model(spec, disk_bw=0.5 * GB))[0]
    assert best.policy.storage_dtype == "bfloat16" and best.policy.weights.disk > 0
    # everything fits in RAM and converting is slow: nothing to gain from storing narrower
    roomy = {**capped, "cpu_mem": 64 << 30}
    best = search_policy(spec, wl, roomy, Knobs(dtype="float32"), _model(spec, cast=0.5 * GB))[0]
    assert best.policy.storage_dtype is None
    # the user's choice is the only one weighed
    cands = search_policy(spec, wl, roomy, Knobs(dtype="float32", storage_dtype="bfloat16"),
                          _model(spec, cast=0.5 * GB))
    assert {c.policy.storage_dtype for c in cands} == {"bfloat16"}


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_chunked_product_writes_each_chunk_into_the_output(monkeypatch, with_bias):
    """A bfloat16 matrix multiplied a chunk of rows at a time: each chunk's product goes
    straight into its columns of the output, with no product-sized temporary per chunk
    (a prefill's were fresh 134 MB mappings), and the result is the product with the
    converted matrix."""
    from flexgraph.exec import nodes
    monkeypatch.setattr(nodes, "chunk_rows", lambda cols, itemsize, tokens: 64)
    torch.manual_seed(0)
    weight = torch.randn(320, 96).to(torch.bfloat16)                  # 5 chunks of 64 rows
    bias = torch.randn(320) if with_bias else None
    x = torch.randn(3, 100, 96)                  # a prefill's rows (more than L.SKINNY_ROWS)
    w = nodes._Decoded({"fc.weight": weight, **({"fc.bias": bias} if with_bias else {})}, torch.float32)
    got, sizes = with_allocations(lambda: w.linear(x, "fc"))
    expected = torch.nn.functional.linear(x, weight.float(), bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    chunk_out = 3 * 100 * 64 * 4
    assert sizes.count(got.numel() * 4) == 1 and chunk_out not in sizes, sorted(sizes)


# ---- a dummy's store must fit the disk it is written to ------------------------------------------
def _free_disk(monkeypatch, free: int) -> None:
    import collections
    import flexgraph.weights.dummy as dummy
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(dummy.shutil, "disk_usage", lambda path: usage(free, 0, free))


def test_the_search_weighs_no_store_dtype_the_disk_cannot_hold(tmp_path, monkeypatch):
    """A dummy's store is written in the dtype the plan keeps: OPT-6.7B's float32 one
    (27 GB) was chosen on a disk with 18 GB free, and writing it failed with ENOSPC."""
    from flexgraph.models.sampling import SamplingParams
    from flexgraph.plan.planner import make_plan
    from flexgraph.weights.dummy import dummy_bytes
    from flexgraph.weights.resolve import resolve_model
    monkeypatch.setenv("FLEXGRAPH_CACHE", str(tmp_path / "cache"))      # no store written yet
    ref = resolve_model("opt-1.3b", dummy=True)
    wl = Workload(16, 128, 8)
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": 64 << 30, "disk_mem": 1 << 40}

    def plan(**knobs):   # all in RAM and converting slowly: the search keeps float32 where it can
        return make_plan(ref, wl, SamplingParams(), hw, Knobs(dtype="float32", **knobs),
                         _model(ref.spec, cast=0.5 * GB))

    assert plan().policy.storage_dtype is None
    _free_disk(monkeypatch, dummy_bytes(ref.spec, torch.bfloat16) + 1)   # room for bfloat16 only
    p = plan()
    assert p.policy.storage_dtype == "bfloat16" and p.hardware["unwritable_stores"].keys() == {"float32"}
    assert any(n.startswith("float32 storage not weighed: the dummy opt-1.3b store in float32 needs")
               for n in p.chosen["notes"])
    p = plan(storage_dtype="bfloat16")          # float32 was never a choice: nothing to say about its room
    assert "unwritable_stores" not in p.hardware and not any("not weighed" in n for n in p.chosen["notes"])
    _free_disk(monkeypatch, dummy_bytes(ref.spec, torch.bfloat16) - 1)   # room for neither
    with pytest.raises(PlanError, match=r"^the dummy opt-1.3b store in float32 needs .*; the dummy opt-1.3b "
                                        r"store in bfloat16 needs .* free: free space there or point "
                                        r"FLEXGRAPH_CACHE at a larger disk$"):   # nothing narrower to offer
        plan()


def test_writing_a_dummy_store_the_disk_cannot_hold_fails_before_writing(tmp_path, monkeypatch):
    from flexgraph.errors import ModelError
    from flexgraph.weights.dummy import dummy_bytes, write_dummy
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    _free_disk(monkeypatch, dummy_bytes(spec, torch.float32) - 1)
    with pytest.raises(ModelError, match=r"^the dummy \S*opt-125m store in float32 needs .*, or keep the "
                                         r"weights in bfloat16 \(--storage-dtype bfloat16\)$"):
        write_dummy(spec, tmp_path / "store", torch.float32, progress=False)
    assert list(tmp_path.iterdir()) == []
    write_dummy(spec, tmp_path / "store", torch.bfloat16, progress=False)  # half the bytes: fits
    assert (tmp_path / "store").is_dir()
