"""Built-in architectures: the published hyper-parameters of well-known models.

``builtin_config(id)`` returns the Hugging Face ``config.json`` of a built-in id, so a
plan (or, with ``--dummy``, random weights) can be made for a model that is not on the
machine.  Ids are case-insensitive and accept the hub name (``facebook/opt-6.7b``) or
the short name (``opt-6.7b``).
"""

from __future__ import annotations

from typing import Any

from flexgraph.errors import ModelError

# (hidden, blocks, heads, ffn) as published in facebook/opt-* config.json files.
_OPT_SHAPES = {
    "opt-125m": (768, 12, 12, 3072),
    "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672),
    "opt-66b": (9216, 64, 72, 36864),
    "opt-175b": (12288, 96, 96, 49152),
}

# (hidden, blocks, heads, kv heads, intermediate) of meta-llama/Llama-3.1-*.
_LLAMA31_SHAPES = {
    "llama-3.1-8b": (4096, 32, 32, 8, 14336),
    "llama-3.1-70b": (8192, 80, 64, 8, 28672),
}


def _opt_config(short: str) -> dict[str, Any]:
    hidden, blocks, heads, ffn = _OPT_SHAPES[short]
    return {
        "_name_or_path": f"facebook/{short}",
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "activation_function": "relu",
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "do_layer_norm_before": short != "opt-350m",
        "dropout": 0.1,
        "enable_bias": True,
        "eos_token_id": 2,
        "ffn_dim": ffn,
        "hidden_size": hidden,
        "init_std": 0.02,
        "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0,
        "max_position_embeddings": 2048,
        "num_attention_heads": heads,
        "num_hidden_layers": blocks,
        "pad_token_id": 1,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": 50272,
        "word_embed_proj_dim": 512 if short == "opt-350m" else hidden,
    }


def _llama31_config(short: str) -> dict[str, Any]:
    hidden, blocks, heads, kv_heads, inter = _LLAMA31_SHAPES[short]
    size = short.rsplit("-", 1)[1].upper()
    return {
        "_name_or_path": f"meta-llama/Llama-3.1-{size}",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": blocks,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }


BUILTIN_IDS = tuple(list(_OPT_SHAPES) + list(_LLAMA31_SHAPES))


def normalize_builtin_id(model: str) -> str | None:
    """``facebook/OPT-6.7B`` -> ``opt-6.7b``; None when ``model`` is not a built-in id."""
    short = model.strip().lower().rsplit("/", 1)[-1]
    if short.startswith("meta-llama-"):
        short = short[len("meta-"):]
    return short if short in BUILTIN_IDS else None


def builtin_config(model: str) -> dict[str, Any]:
    short = normalize_builtin_id(model)
    if short is None:
        raise ModelError(f"{model!r} is not a built-in model id; built-in ids are {', '.join(BUILTIN_IDS)}")
    return _opt_config(short) if short.startswith("opt-") else _llama31_config(short)
