"""Tiny random Hugging Face models of every supported family, for comparisons.

Every parameter — biases and norm weights included — is drawn at random, so a missing
bias or a swapped norm cannot hide behind transformers' zero/one initialisation.  The
scales keep the blocks' contribution above the (tied) embeddings', so greedy decoding
does not merely repeat the last token.
"""

from __future__ import annotations

import torch
import transformers

_COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, max_position_embeddings=128)

# name -> (config class, kwargs).  Covers: OPT, OPT-350m's projections and post-LN
# blocks, Llama-2 style MHA, Llama-3 rope scaling, untied embeddings, Qwen2's q/k/v
# biases, Llama attention biases, Mistral's sliding window, GQA 4:1 and 3:1.
TINY_CONFIGS = {
    "opt": (transformers.OPTConfig, dict(ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64)),
    "opt-350m-shape": (transformers.OPTConfig, dict(ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32,
                                                    do_layer_norm_before=False)),
    "llama2-mha": (transformers.LlamaConfig, dict(intermediate_size=128, num_attention_heads=4,
                                                  num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-rope-scaling-gqa4": (transformers.LlamaConfig, dict(
        hidden_size=96, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama-tied-gqa3": (transformers.LlamaConfig, dict(hidden_size=96, intermediate_size=128,
                                                       num_attention_heads=6, num_key_value_heads=2,
                                                       tie_word_embeddings=True)),
    "llama-attention-bias": (transformers.LlamaConfig, dict(intermediate_size=128, num_attention_heads=4,
                                                            num_key_value_heads=1, attention_bias=True)),
    "mistral-sliding-window": (transformers.MistralConfig, dict(intermediate_size=128, num_attention_heads=4,
                                                                num_key_value_heads=2, sliding_window=6)),
    "qwen2-bias": (transformers.Qwen2Config, dict(intermediate_size=128, num_attention_heads=4,
                                                  num_key_value_heads=2, tie_word_embeddings=False)),
}


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model for ``TINY_CONFIGS[name]`` with every parameter random."""
    cls, kwargs = TINY_CONFIGS[name]
    config = cls(**{**_COMMON, **kwargs, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "embed" in pname or "lm_head" in pname:
                p.normal_(0, 0.3)
            elif p.ndim == 1:
                p.normal_(1.0 if "norm" in pname and pname.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0, 2.0 * p.shape[-1] ** -0.5)
    return model.to(dtype)


def padded_prompts(vocab: int, lengths: list[int], seed: int = 0):
    """Random prompts of the given lengths, left-padded: (input_ids [B, P], mask [B, P])."""
    g = torch.Generator().manual_seed(seed)
    p = max(lengths)
    ids = torch.zeros(len(lengths), p, dtype=torch.long)
    mask = torch.zeros(len(lengths), p, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, p - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, p - n:] = 1
    return ids, mask


@torch.inference_mode()
def hf_greedy(model, ids, mask, steps: int):
    """transformers' greedy generate: (new ids [B, steps], logits [B, steps, V] float32)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1).float()
