"""Weights: the on-disk store, converters into it, dummy weights, the bundled model,
and resolving a ``--model`` argument.

Modules, one job each:

- ``store``        the store format (``index.json`` + one raw file per tensor), ``WeightStore``
                   (open, check, read, verify) and ``StoreWriter`` (atomic, tensor by tensor)
- ``convert_hf``   Hugging Face folder (safetensors / .bin) -> store
- ``gguf_file``    fast GGUF header parsing, GGUF identity, HF config from GGUF metadata
- ``convert_gguf`` GGUF -> store (dequantised, llama.cpp's Q/K permutation undone)
- ``dummy``        deterministic random weights of any spec, and their identity
- ``bundled``      the bundled default model ``smollm2-135m``
- ``cache``        the cache folder layout and an inter-process lock
- ``resolve``      ``resolve_model`` (cheap, config only) and ``materialize`` (weights)
"""

from flexgraph.weights.store import StoreWriter, WeightEntry, WeightStore, dtype_name, parse_dtype
from flexgraph.weights.convert_hf import convert_hf, hf_folder_checksum
from flexgraph.weights.convert_gguf import convert_gguf
from flexgraph.weights.gguf_file import gguf_checksum
from flexgraph.weights.dummy import dummy_identity, write_dummy
from flexgraph.weights.bundled import BUNDLED_ID, bundled_store
from flexgraph.weights.cache import cache_root
from flexgraph.weights.resolve import ModelRef, materialize, resolve_model

__all__ = [
    "StoreWriter", "WeightEntry", "WeightStore", "dtype_name", "parse_dtype",
    "convert_hf", "hf_folder_checksum", "convert_gguf", "gguf_checksum",
    "dummy_identity", "write_dummy", "BUNDLED_ID", "bundled_store", "cache_root",
    "ModelRef", "materialize", "resolve_model",
]
