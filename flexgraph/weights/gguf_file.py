"""Read a GGUF file's header fast: metadata, tensor table, identity, and an HF config.

``gguf.GGUFReader`` decodes every metadata array (a 49k-token vocabulary takes it ~5 s),
which is too slow for ``resolve_model``, which must be cheap.  This parser walks the
header with ``struct`` over an mmap and *skips* large arrays (keeping only their
length), so the bundled model's header parses in a few tens of milliseconds.

GGUF layout (little-endian, versions 2 and 3)::

    "GGUF" u32 version  u64 n_tensors  u64 n_kv
    n_kv x      (string key, u32 type, value)        string = u64 length + utf-8 bytes
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)
    padding to general.alignment (default 32), then the tensor data; offsets are
    relative to the start of the data.

``dims`` are ggml's ``ne`` (innermost first): the row-major (numpy / Hugging Face) shape
is ``dims`` reversed.

Identity (:func:`gguf_checksum`): sha256 over ``"flexgraph-gguf/1"``, the file size,
the whole header (metadata + tensor table, up to the data start) and 16 samples of
64 KiB spread evenly over the data.  It reads ~1 MB plus the header, whatever the file
size, and changes with any change to the metadata, tensor table, quantisation or size;
a same-size edit confined to bytes outside the samples would go unnoticed.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flexgraph.errors import ModelError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9
_KEEP_ARRAY = 1024          # arrays longer than this are skipped (vocabularies, merges)
_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array too long to be worth decoding (e.g. the vocabulary)."""
    count: int
    elem_type: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]       # ggml ne order: innermost first
    ggml_type: int
    offset: int                 # absolute file offset of the data
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major shape (what numpy and Hugging Face use)."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    size: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)
    data_start: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ModelError(f"{self.path} ends inside its GGUF header; the file is truncated: "
                             "download it again") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.path} has a corrupt GGUF header (string past the end of the file)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.unpack("<Q")      # (not `self.pos += ...`: unpack moves pos first)
        self.pos += n

    def value(self, vtype: int) -> Any:
        if vtype == _FLOAT32:
            # llama.cpp stores config floats as float32; the shortest decimal that
            # round-trips is what the original config said (1e-05, not 9.9999997e-06)
            return float(str(np.float32(self.unpack("<f"))))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count <= _KEEP_ARRAY:
                return [self.value(etype) for _ in range(count)]
            if etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            elif etype == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(etype)
            return SkippedArray(count, etype)
        raise ModelError(f"{self.path} has a corrupt GGUF header (unknown value type {vtype})")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse metadata and the tensor table (no tensor data is read)."""
    import gguf   # only for the quantisation block sizes

    path = Path(path).expanduser().resolve()
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelError(f"{path} is too small to be a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, path, size, gguf)
    except FileNotFoundError:
        raise ModelError(f"GGUF file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a folder, not a GGUF file") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None


def _parse(mm: mmap.mmap, path: Path, size: int, gguf: Any) -> GGUFHeader:
    c = _Cursor(mm, path)
    if bytes(mm[:4]) != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (bad magic bytes)")
    c.pos = 4
    version = c.unpack("<I")
    if version not in (2, 3):
        raise ModelError(f"{path} is GGUF version {version}; flexgraph reads versions 2 and 3 "
                         "(big-endian files are not supported)")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.unpack("<I"))
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.unpack("<I")
        dims = tuple(c.unpack("<Q") for _ in range(n_dims))
        raw.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
    align = int(metadata.get("general.alignment", 32)) or 32
    data_start = -(-c.pos // align) * align
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, gtype, off in raw:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise ModelError(f"{path}: tensor {name} has ggml type {gtype}, unknown to the installed "
                             "gguf package; upgrade gguf") from None
        nbytes = math.prod(dims) // block * type_size
        start = data_start + off
        if start + nbytes > size:
            raise ModelError(f"{path}: tensor {name} extends past the end of the file; the file is "
                             "truncated: download it again")
        tensors[name] = GGUFTensorInfo(name, dims, gtype, start, nbytes)
    return GGUFHeader(path, version, size, metadata, tensors, data_start)


def gguf_checksum(path: str | Path, header: GGUFHeader | None = None) -> str:
    """The cheap identity of a GGUF file (see the module docstring)."""
    header = header or read_gguf_header(path)
    h = hashlib.sha256(b"flexgraph-gguf/1\n")
    h.update(header.size.to_bytes(8, "little"))
    with open(header.path, "rb") as f:
        h.update(f.read(header.data_start))
        span = header.size - header.data_start
        for k in range(_SAMPLES):
            f.seek(header.data_start + (max(span - _SAMPLE_BYTES, 0) * k) // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def tensor_raw(mm: mmap.mmap | memoryview, info: GGUFTensorInfo) -> np.ndarray:
    """A zero-copy numpy view of a tensor's stored bytes, shaped as ``gguf`` expects:
    float types as their row-major shape, quantised types as rows of raw bytes."""
    import gguf

    qt = gguf.GGMLQuantizationType(info.ggml_type)
    buf = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    shape = info.shape
    if qt == gguf.GGMLQuantizationType.F32:
        return buf.view(np.float32).reshape(shape)
    if qt == gguf.GGMLQuantizationType.F16:
        return buf.view(np.float16).reshape(shape)
    if qt == gguf.GGMLQuantizationType.BF16:
        return buf.view(np.uint16).reshape(shape)      # numpy has no bfloat16; torch reinterprets
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    return buf.reshape(*shape[:-1], shape[-1] // block * type_size)


# ---- Hugging Face config from GGUF metadata ------------------------------------------
# Architectures flexgraph can run, by GGUF general.architecture.  A llama-architecture
# GGUF becomes LlamaForCausalLM even when it is a Mistral (llama.cpp runs those without
# a sliding window too).
_GGUF_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
_MISSING = object()

# Published Llama 3.x rope scalings; a GGUF stores only the resulting per-frequency
# factors (tensor rope_freqs.weight), so we recognise them by recomputing.
_LLAMA3_ROPE_CANDIDATES = (
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def llama3_rope_factors(theta: float, dim: int, p: dict[str, float]) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama-3 scaling parameters ``p`` (convert_hf_to_gguf.py)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_wl = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wl = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wl - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1.0 / ((1 - smooth) / p["factor"] + smooth))
    return np.asarray(out, dtype=np.float32)


def gguf_hf_config(header: GGUFHeader) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (as a dict) for the model in a GGUF file."""
    md, path = header.metadata, header.path
    arch = header.architecture
    if arch not in _GGUF_ARCHS:
        raise ModelError(f"{path} is a GGUF of architecture {arch!r}; flexgraph converts GGUF files of "
                         f"architecture {', '.join(_GGUF_ARCHS)} (Mistral GGUFs are 'llama')")
    hf_arch, model_type = _GGUF_ARCHS[arch]

    def get(key: str, default: Any = _MISSING) -> Any:
        v = md.get(f"{arch}.{key}", default)
        if v is _MISSING:
            raise ModelError(f"{path} lacks GGUF metadata {arch}.{key}; is it a complete model file?")
        if isinstance(v, list):   # per-layer values (some GGUFs): flexgraph needs them uniform
            if len(set(v)) != 1:
                raise ModelError(f"{path}: {arch}.{key} differs between layers, which flexgraph does not support")
            v = v[0]
        return v

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads)
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", None)
    if vocab is None:
        vocab = (tokens.count if isinstance(tokens, SkippedArray) else len(tokens) if tokens
                 else header.tensors["token_embd.weight"].dims[1])
    theta = float(get("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "_name_or_path": str(md.get("general.name") or path.stem),
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in md:
            config[hf_key] = int(md[f"tokenizer.ggml.{gguf_key}"])
    config["rope_scaling"] = _rope_scaling(header, get, theta, head_dim)
    if config["rope_scaling"] is None:
        del config["rope_scaling"]
    return config


def _rope_scaling(header: GGUFHeader, get: Any, theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = get("rope.scaling.type", None)
    if kind in (None, "none") and "rope_freqs.weight" not in header.tensors:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if kind not in (None, "none"):
        raise ModelError(f"{header.path} uses rope scaling {kind!r}, which flexgraph does not support")
    info = header.tensors["rope_freqs.weight"]
    with open(header.path, "rb") as f:
        f.seek(info.offset)
        factors = np.frombuffer(f.read(info.nbytes), dtype=np.float32) if info.ggml_type == 0 else None
    for cand in _LLAMA3_ROPE_CANDIDATES:
        expected = llama3_rope_factors(theta, head_dim, cand)
        if factors is not None and factors.shape == expected.shape and np.allclose(factors, expected, rtol=1e-4):
            return {"rope_type": "llama3", **cand}
    raise ModelError(f"{header.path} has rope frequency factors (rope_freqs.weight) that match no known "
                     "Llama 3 scaling; convert the original Hugging Face folder instead")
