"""Convert a GGUF file (llama.cpp) into a weight store, one tensor at a time.

Tensors are read straight from an mmap of the file (the header via
:mod:`flexgraph.weights.gguf_file`) and dequantised one by one with
``gguf.quants.dequantize``, so memory stays at one tensor.  Quantised tensors are
stored as float32 (dequantised exactly as transformers does it); F32, F16 and BF16
tensors keep their dtype.

Names: the GGUF names (``token_embd``, ``blk.N.attn_q``, ...) are mapped to Hugging
Face's with gguf-py's own table (``gguf.get_tensor_name_map``), driven by the names
``ModelSpec.all_weights`` lists.

Rotary layout: for llama-architecture files, llama.cpp's converter permutes the rows
of ``attn_q`` / ``attn_k`` (per head it interleaves the two rotary halves, to suit its
"normal" RoPE).  We undo it as transformers does when loading a GGUF
(``LlamaTensorProcessor._reverse_permute_weights``): per head (KV heads for K), rows
``(dim/2, 2)`` are transposed back to ``(2, dim/2)``.  Qwen2 files use NeoX RoPE and are
not permuted.

The HF ``config.json`` comes from the GGUF metadata (``gguf_hf_config``); the
tokenizer is converted by transformers (``AutoTokenizer.from_pretrained(...,
gguf_file=...)``) and saved into ``tokenizer/`` — that step is the slow one (~8 s for
a 49k vocabulary) and is done once.
"""

from __future__ import annotations

import mmap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexgraph.errors import ModelError
from flexgraph.log import get_logger
from flexgraph.models.spec import ModelSpec
from flexgraph.progress import progress as _progress
from flexgraph.weights.gguf_file import GGUFHeader, gguf_checksum, gguf_hf_config, read_gguf_header, tensor_raw
from flexgraph.weights.store import StoreWriter, WeightStore

log = get_logger(__name__)


def gguf_spec(header: GGUFHeader, name: str | None = None) -> ModelSpec:
    """The ModelSpec of a GGUF file, from its metadata only."""
    return ModelSpec.from_hf_config(gguf_hf_config(header), name=name or header.path.stem)


def hf_to_gguf_names(spec: ModelSpec, arch: str) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for every tensor the spec needs."""
    import gguf

    try:
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    except StopIteration:
        raise ModelError(f"the installed gguf package does not know architecture {arch!r}; upgrade gguf") from None
    name_map = gguf.get_tensor_name_map(arch_enum, spec.num_blocks)
    names: dict[str, str] = {}
    for w in spec.all_weights() + [w for w in spec.layer_weights(spec.num_layers - 1)]:
        base, _, suffix = w.name.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise ModelError(f"no GGUF name for tensor {w.name} of {spec.architecture}")
        names[w.name] = f"{mapped}.{suffix}"
    return names


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (the inverse of its ``permute``)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_torch(arr: np.ndarray, ggml_type: int) -> torch.Tensor:
    import gguf

    # Unquantised tensors are still views of the read-only mmap; torch wants writable
    # memory, so copy them (one tensor at a time, like everything else here).
    arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr, copy=True)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if gguf.GGMLQuantizationType(ggml_type) == gguf.GGMLQuantizationType.BF16 else t


def convert_gguf(file: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                 name: str | None = None, tokenizer: bool = True,
                 source_extra: dict[str, Any] | None = None) -> WeightStore:
    """Convert the GGUF ``file`` into a store at ``out``; returns the opened store."""
    import gguf

    file = Path(file).expanduser().resolve()
    t0 = time.perf_counter()
    header = read_gguf_header(file)
    config = gguf_hf_config(header)
    spec = ModelSpec.from_hf_config(config, name=name or file.stem)
    arch = header.architecture
    names = hf_to_gguf_names(spec, arch)
    permute = arch == "llama"
    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    timings: dict[str, float] = {}
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, \
            StoreWriter(out, overwrite=overwrite) as w:
        t1 = time.perf_counter()
        for info in _progress(spec.all_weights(), desc=f"converting {spec.name}", unit="tensor", enabled=progress):
            gname = names[info.name]
            ti = header.tensors.get(gname)
            if ti is None:
                raise ModelError(f"{file} lacks tensor {gname} ({info.name}) that {spec.architecture} needs; "
                                 "is the GGUF file complete?")
            raw = tensor_raw(mm, ti)
            if gguf.GGMLQuantizationType(ti.ggml_type) in float_types:
                arr = raw
            else:
                arr = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ti.ggml_type))
            if tuple(arr.shape) != tuple(info.shape):
                raise ModelError(f"GGUF tensor {gname} of {file} has shape {list(arr.shape)} but its metadata "
                                 f"implies {list(info.shape)} for {info.name}")
            if permute and gname.endswith((".attn_q.weight", ".attn_q.bias")):
                arr = unpermute_rotary(arr, spec.num_heads)
            elif permute and gname.endswith((".attn_k.weight", ".attn_k.bias")):
                arr = unpermute_rotary(arr, spec.num_kv_heads)
            w.add(info.name, _to_torch(arr, ti.ggml_type))
            del arr, raw
        if spec.tie_word_embeddings:
            w.alias("lm_head.weight", spec.embed_tokens_name)
        timings["tensors_s"] = round(time.perf_counter() - t1, 2)
        if tokenizer:
            t2 = time.perf_counter()
            _save_tokenizer(file, header, w)
            timings["tokenizer_s"] = round(time.perf_counter() - t2, 2)
        source = {"kind": "gguf", "name": spec.name, "path": str(file), "size": header.size,
                  "checksum": gguf_checksum(file, header), "architecture": arch,
                  "file_type": header.metadata.get("general.file_type"), **(source_extra or {})}
        w.finish(config, source)
    log.info("converted_gguf", model=spec.name, out=str(out), seconds=round(time.perf_counter() - t0, 2), **timings)
    return WeightStore.open(out)


def _save_tokenizer(file: Path, header: GGUFHeader, w: StoreWriter) -> None:
    if "tokenizer.ggml.model" not in header.metadata:
        return
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        tok.save_pretrained(str(w.tokenizer_dir))
    except Exception as e:   # the weights are still usable with token ids
        log.warning("tokenizer_not_converted", file=str(file), error=f"{type(e).__name__}: {e}")
