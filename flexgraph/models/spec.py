"""Model specs: the architecture of a model, read from a Hugging Face ``config.json``.

A :class:`ModelSpec` is everything the builder, planner and layer maths need to know
about a model, and nothing about its weights' values.  It is frozen and hashable.

The unit of scheduling is FlexGen's *layer*, finer than a transformer block: a model
with ``L`` blocks has ``2 L + 2`` layers ::

    j = 0            embed   token (and, for OPT, position) embeddings
    j = 1, 3, ...    attn    norm + self-attention + residual of block (j - 1) // 2
    j = 2, 4, ...    mlp     norm + MLP + residual of block (j - 2) // 2
    j = 2 L + 1      head    final norm + output projection (logits) + sampling

Only ``attn`` layers own a KV cache.  Tensor names are Hugging Face's, so a converted
store maps one-to-one onto a transformers state dict.  With tied embeddings the head's
``lm_head.weight`` is an alias of the input embedding (the weight store resolves it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flexgraph.errors import ModelError

# HF architecture name -> (family, variant).  Mistral and Qwen2 are Llama variants.
SUPPORTED_ARCHITECTURES = {
    "OPTForCausalLM": ("opt", "opt"),
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("llama", "mistral"),
    "Qwen2ForCausalLM": ("llama", "qwen2"),
}
_MODEL_TYPE_TO_ARCH = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM",
                       "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ACTIVATIONS = ("relu", "silu", "gelu", "gelu_new", "gelu_pytorch_tanh")

EMBED, ATTN, MLP, HEAD = "embed", "attn", "mlp", "head"


@dataclass(frozen=True)
class Layer:
    """One of FlexGen's layers: ``index`` j in ``0 .. 2L+1``, ``block`` b for attn/mlp."""
    index: int
    kind: str
    block: int | None = None


@dataclass(frozen=True)
class WeightInfo:
    """A weight tensor of one layer: its store name and shape (dtype comes from the run)."""
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    name: str                    # a display name: built-in id, folder name, ...
    architecture: str            # HF architecture, e.g. "LlamaForCausalLM"
    family: str                  # "opt" or "llama"
    variant: str                 # "opt", "llama", "mistral", "qwen2"
    vocab_size: int
    hidden_size: int
    num_blocks: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    # OPT only
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    linear_bias: bool = False            # OPT: every projection has a bias
    layer_norm_affine: bool = True
    # Llama family only
    qkv_bias: bool = False               # Qwen2, or Llama with attention_bias
    o_bias: bool = False                 # Llama with attention_bias
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()   # sorted items of the scaling dict
    sliding_window: int | None = None
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    hf_config: str = field(default="{}", compare=False, repr=False)  # config.json, as text

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None) -> ModelSpec:
        """Build a spec from a parsed ``config.json``; unsupported models are a one-line error."""
        arch = _architecture_of(config)
        family, variant = SUPPORTED_ARCHITECTURES[arch]
        name = name or config.get("_name_or_path") or arch
        try:
            return (_opt_spec if family == "opt" else _llama_spec)(config, name, arch, variant)
        except KeyError as e:
            raise ModelError(f"config.json of {name} lacks the field {e.args[0]!r} that {arch} needs; "
                             "is it a complete Hugging Face config?") from None

    @classmethod
    def from_config_file(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"no config.json at {path}; point --model at a Hugging Face model folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path} is not valid JSON ({e}); re-download or re-convert the model") from None
        return cls.from_hf_config(config, name=name or path.parent.name)

    def config_dict(self) -> dict[str, Any]:
        """The Hugging Face config this spec was read from (for writing back out)."""
        return json.loads(self.hf_config)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hf_config")
        d["rope_scaling"] = dict(self.rope_scaling)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    # ---- layers -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """FlexGen layers: embed, (attn, mlp) per block, head."""
        return 2 * self.num_blocks + 2

    def layer(self, j: int) -> Layer:
        if j == 0:
            return Layer(0, EMBED)
        if j == self.num_layers - 1:
            return Layer(j, HEAD)
        if not 0 < j < self.num_layers:
            raise IndexError(f"layer {j} out of range 0..{self.num_layers - 1}")
        return Layer(j, ATTN if j % 2 == 1 else MLP, (j - 1) // 2)

    def layers(self) -> list[Layer]:
        return [self.layer(j) for j in range(self.num_layers)]

    def attn_layer_index(self, block: int) -> int:
        return 2 * block + 1

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT-350m projects 512 -> 1024)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def layer_weights(self, j: int) -> list[WeightInfo]:
        """The weight tensors layer ``j`` reads, by store name."""
        return (_opt_weights if self.family == "opt" else _llama_weights)(self, self.layer(j))

    def all_weights(self) -> list[WeightInfo]:
        """Every distinct stored tensor (a tied head is not listed twice)."""
        seen: dict[str, WeightInfo] = {}
        for j in range(self.num_layers):
            for w in self.layer_weights(j):
                name = self.storage_name(w.name)
                seen.setdefault(name, WeightInfo(name, w.shape))
        return list(seen.values())

    def storage_name(self, name: str) -> str:
        """The stored tensor a weight name refers to (resolves the tied head)."""
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return self.embed_tokens_name
        return name

    @property
    def embed_tokens_name(self) -> str:
        return "model.decoder.embed_tokens.weight" if self.family == "opt" else "model.embed_tokens.weight"

    def num_parameters(self) -> int:
        return sum(w.numel for w in self.all_weights())

    # ---- sizes and work, per layer --------------------------------------------------
    def kv_bytes_per_token(self, itemsize: int) -> int:
        """KV cache bytes of one attention layer for one token of one sequence (K and V)."""
        return 2 * self.kv_size * itemsize

    def layer_flops(self, j: int, new_tokens: int, context: int) -> float:
        """FLOPs of layer ``j`` for one sequence that appends ``new_tokens`` tokens to a
        cache ending at ``context`` tokens (prefill: new = context = prompt length).

        Matrix products count 2 FLOPs per multiply-add; the head projects only the last
        position (the only one sampled).
        """
        layer = self.layer(j)
        h = self.hidden_size
        if layer.kind == EMBED:
            return float(new_tokens * h)
        if layer.kind == HEAD:
            return 2.0 * self.embed_dim * self.vocab_size + 2.0 * h * (self.embed_dim if self.word_embed_proj_dim else 0)
        if layer.kind == MLP:
            mats = 3 if self.family == "llama" else 2
            return 2.0 * new_tokens * mats * h * self.intermediate_size
        proj = 2.0 * new_tokens * h * (2 * self.q_size + 2 * self.kv_size)
        # scores and weighted sum: each new token attends to (on average) its prefix.
        avg_keys = context - (new_tokens - 1) / 2.0
        attn = 2.0 * 2.0 * new_tokens * avg_keys * self.q_size
        return proj + attn


# --------------------------------------------------------------------------------------
def _architecture_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    model_type = config.get("model_type")
    if not archs and model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    what = ", ".join(archs) or f"model_type {model_type!r}"
    raise ModelError(f"unsupported architecture {what}; flexgraph supports "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _eos_ids(config: dict[str, Any]) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _check_activation(act: str, name: str) -> str:
    if act not in _ACTIVATIONS:
        raise ModelError(f"{name} uses activation {act!r}; supported: {', '.join(_ACTIVATIONS)}")
    return act


def _opt_spec(c: dict[str, Any], name: str, arch: str, variant: str) -> ModelSpec:
    hidden = c["hidden_size"]
    heads = c["num_attention_heads"]
    proj = c.get("word_embed_proj_dim", hidden)
    before = c.get("do_layer_norm_before", True)
    return ModelSpec(
        name=name, architecture=arch, family="opt", variant=variant,
        vocab_size=c["vocab_size"], hidden_size=hidden, num_blocks=c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=c["ffn_dim"], max_position_embeddings=c["max_position_embeddings"],
        norm_eps=1e-5, activation=_check_activation(c.get("activation_function", "relu"), name),
        tie_word_embeddings=True,   # OPTForCausalLM always ties lm_head to embed_tokens
        word_embed_proj_dim=proj if proj != hidden else 0,
        do_layer_norm_before=before,
        final_layer_norm=before and not c.get("_remove_final_layer_norm", False),
        linear_bias=c.get("enable_bias", True),
        layer_norm_affine=c.get("layer_norm_elementwise_affine", True),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=_eos_ids(c), pad_token_id=c.get("pad_token_id"),
        hf_config=json.dumps(c, sort_keys=True),
    )


def _rope_of(c: dict[str, Any], name: str) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """RoPE base and scaling from either config layout (transformers 4: rope_theta +
    rope_scaling; transformers 5: rope_parameters)."""
    params = dict(c.get("rope_parameters") or {})
    scaling = dict(c.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    merged.pop("rope_theta", None)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"{name} uses rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, ()
    merged["rope_type"] = rope_type
    return theta, tuple(sorted(merged.items()))


def _llama_spec(c: dict[str, Any], name: str, arch: str, variant: str) -> ModelSpec:
    hidden = c["hidden_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ModelError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    theta, scaling = _rope_of(c, name)
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError(f"{name} uses partial rotary embeddings, which flexgraph does not support")
    window = None
    if variant == "mistral":
        window = c.get("sliding_window")
    elif variant == "qwen2" and c.get("use_sliding_window"):
        raise ModelError(f"{name} enables Qwen2's per-layer sliding window, which flexgraph does not support; "
                         "set use_sliding_window=false if the prompts fit the window")
    attention_bias = bool(c.get("attention_bias", False))
    return ModelSpec(
        name=name, architecture=arch, family="llama", variant=variant,
        vocab_size=c["vocab_size"], hidden_size=hidden, num_blocks=c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=kv_heads, head_dim=c.get("head_dim") or hidden // heads,
        intermediate_size=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        activation=_check_activation(c.get("hidden_act", "silu"), name),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=variant == "qwen2" or attention_bias, o_bias=attention_bias and variant != "qwen2",
        mlp_bias=bool(c.get("mlp_bias", False)),
        rope_theta=theta, rope_scaling=scaling, sliding_window=window,
        bos_token_id=c.get("bos_token_id"), eos_token_ids=_eos_ids(c), pad_token_id=c.get("pad_token_id"),
        hf_config=json.dumps(c, sort_keys=True),
    )


def _ln(prefix: str, spec: ModelSpec, h: int) -> list[WeightInfo]:
    if not spec.layer_norm_affine:
        return []
    return [WeightInfo(f"{prefix}.weight", (h,)), WeightInfo(f"{prefix}.bias", (h,))]


def _linear(prefix: str, out_f: int, in_f: int, bias: bool) -> list[WeightInfo]:
    ws = [WeightInfo(f"{prefix}.weight", (out_f, in_f))]
    if bias:
        ws.append(WeightInfo(f"{prefix}.bias", (out_f,)))
    return ws


def _opt_weights(s: ModelSpec, layer: Layer) -> list[WeightInfo]:
    h, p, b = s.hidden_size, "model.decoder", s.linear_bias
    if layer.kind == EMBED:
        ws = [WeightInfo(f"{p}.embed_tokens.weight", (s.vocab_size, s.embed_dim)),
              WeightInfo(f"{p}.embed_positions.weight", (s.max_position_embeddings + 2, h))]
        if s.word_embed_proj_dim:
            ws += _linear(f"{p}.project_in", h, s.embed_dim, False)
        return ws
    if layer.kind == HEAD:
        ws = _ln(f"{p}.final_layer_norm", s, h) if s.final_layer_norm else []
        if s.word_embed_proj_dim:
            ws += _linear(f"{p}.project_out", s.embed_dim, h, False)
        return ws + [WeightInfo("lm_head.weight", (s.vocab_size, s.embed_dim))]
    q = f"{p}.layers.{layer.block}"
    if layer.kind == ATTN:
        return (_ln(f"{q}.self_attn_layer_norm", s, h)
                + [w for n in ("q_proj", "k_proj", "v_proj", "out_proj")
                   for w in _linear(f"{q}.self_attn.{n}", h, h, b)])
    return (_ln(f"{q}.final_layer_norm", s, h) + _linear(f"{q}.fc1", s.intermediate_size, h, b)
            + _linear(f"{q}.fc2", h, s.intermediate_size, b))


def _llama_weights(s: ModelSpec, layer: Layer) -> list[WeightInfo]:
    h = s.hidden_size
    if layer.kind == EMBED:
        return [WeightInfo("model.embed_tokens.weight", (s.vocab_size, h))]
    if layer.kind == HEAD:
        return [WeightInfo("model.norm.weight", (h,)), WeightInfo("lm_head.weight", (s.vocab_size, h))]
    q = f"model.layers.{layer.block}"
    if layer.kind == ATTN:
        return ([WeightInfo(f"{q}.input_layernorm.weight", (h,))]
                + _linear(f"{q}.self_attn.q_proj", s.q_size, h, s.qkv_bias)
                + _linear(f"{q}.self_attn.k_proj", s.kv_size, h, s.qkv_bias)
                + _linear(f"{q}.self_attn.v_proj", s.kv_size, h, s.qkv_bias)
                + _linear(f"{q}.self_attn.o_proj", h, s.q_size, s.o_bias))
    i = s.intermediate_size
    return ([WeightInfo(f"{q}.post_attention_layernorm.weight", (h,))]
            + _linear(f"{q}.mlp.gate_proj", i, h, s.mlp_bias) + _linear(f"{q}.mlp.up_proj", i, h, s.mlp_bias)
            + _linear(f"{q}.mlp.down_proj", h, i, s.mlp_bias))
