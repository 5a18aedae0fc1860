"""Convert a Hugging Face model folder into a weight store, one tensor at a time.

Reads ``*.safetensors`` (single or sharded with ``model.safetensors.index.json``) with
``safetensors.safe_open``, else ``pytorch_model*.bin`` with ``torch.load(mmap=True,
weights_only=True)``; both hand out one tensor at a time, so memory stays at one
tensor.  Dtypes are kept as stored.  Only the tensors ``ModelSpec.all_weights`` lists are
written (buffers such as rotary ``inv_freq`` are dropped); a missing one is an error.
A tied head becomes an alias.  ``config.json`` is copied, ``generation_config.json``
too when present, and the tokenizer is re-saved into ``tokenizer/`` when one loads.

Also defines the cheap identity of a Hugging Face folder used by ``resolve_model``
(:func:`hf_folder_checksum`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from flexgraph.errors import ModelError
from flexgraph.log import get_logger
from flexgraph.models.spec import ModelSpec
from flexgraph.progress import progress as _progress
from flexgraph.weights.store import StoreWriter, WeightStore

log = get_logger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "merges.txt")


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files a folder's checkpoint consists of: safetensors if any, else .bin."""
    st_index = folder / "model.safetensors.index.json"
    if st_index.is_file():
        return _files_of_index(st_index)
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return _files_of_index(bin_index)
    return sorted(folder.glob("pytorch_model*.bin"))


def _files_of_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{index} is unreadable or has no weight_map ({e}); re-download the model") from None
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{index} lists {missing[0]}, which is not in {index.parent}; re-download the model")
    return files


def hf_folder_checksum(folder: str | Path) -> str:
    """Identity of a Hugging Face folder, cheap enough to compute on every plan/run.

    sha256 over: the bytes of config.json, then for each weight file (sorted by name)
    ``"<name>\\0<size>\\n"``.  It does not read the weights, so an in-place edit that
    keeps every size is not detected; a re-download of different weights practically
    always changes a size or the config.
    """
    folder = Path(folder)
    h = hashlib.sha256(b"flexgraph-hf-folder/1\n")
    try:
        h.update((folder / "config.json").read_bytes())
        for f in sorted(hf_weight_files(folder), key=lambda p: p.name):
            h.update(f"\n{f.name}\0{f.stat().st_size}".encode())
    except OSError as e:
        raise ModelError(f"cannot read the model folder {folder}: {e.strerror or e}") from None
    return h.hexdigest()


class _Checkpoint:
    """Name -> tensor access over all files of a checkpoint, one tensor at a time."""

    def __init__(self, files: list[Path]):
        self._getters: dict[str, Callable[[], torch.Tensor]] = {}
        self._stack = contextlib.ExitStack()
        for f in files:
            if f.suffix == ".safetensors":
                self._add_safetensors(f)
            else:
                self._add_bin(f)

    def _add_safetensors(self, f: Path) -> None:
        from safetensors import SafetensorError, safe_open
        try:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{f} is not a readable safetensors file ({e}); re-download the model") from None
        for key in handle.keys():
            self._getters[key] = lambda key=key, handle=handle: handle.get_tensor(key)

    def _add_bin(self, f: Path) -> None:
        try:
            # mmap: tensors stay on disk until touched, so a shard costs no RAM up front
            sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            # legacy (non-zip) .bin files cannot be mmapped; this loads the whole shard
            log.warning("bin_not_mmappable", file=str(f), hint="loading the whole shard into memory")
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{f} is not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict):
            raise ModelError(f"{f} does not hold a state dict; re-download the model")
        for key, t in sd.items():
            if isinstance(t, torch.Tensor):
                self._getters[key] = lambda t=t: t

    def keys(self) -> list[str]:
        return list(self._getters)

    def find(self, name: str) -> str | None:
        """The checkpoint key of HF parameter ``name``: exact, or without the ``model.``
        prefix (facebook/opt-* checkpoints store ``decoder.*`` keys of OPTModel)."""
        if name in self._getters:
            return name
        short = name.removeprefix("model.")
        return short if short in self._getters else None

    def get(self, key: str) -> torch.Tensor:
        return self._getters[key]()

    def close(self) -> None:
        self._stack.close()
        self._getters.clear()


def convert_hf(folder: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True,
               name: str | None = None) -> WeightStore:
    """Convert the Hugging Face model in ``folder`` into a store at ``out``."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json, so it is not a Hugging Face model folder")
    config_text = (folder / "config.json").read_text()
    spec = ModelSpec.from_config_file(folder / "config.json", name=name or folder.name)
    files = hf_weight_files(folder)
    if not files:
        raise ModelError(f"{folder} has no weight files (*.safetensors or pytorch_model*.bin); "
                         "download the weights, or pass --dummy for random ones")
    t0 = time.perf_counter()
    ckpt = _Checkpoint(files)
    try:
        with StoreWriter(out, overwrite=overwrite) as w:
            used: set[str] = set()
            weights = spec.all_weights()
            for info in _progress(weights, desc=f"converting {spec.name}", unit="tensor", enabled=progress):
                key = ckpt.find(info.name)
                if key is None:
                    raise ModelError(f"{folder} lacks tensor {info.name} that {spec.architecture} needs; "
                                     "is the checkpoint complete and does config.json match it?")
                t = ckpt.get(key)
                if tuple(t.shape) != tuple(info.shape):
                    raise ModelError(f"tensor {info.name} in {folder} has shape {list(t.shape)} but config.json "
                                     f"implies {list(info.shape)}; the config does not match the weights")
                w.add(info.name, t)
                used.add(key)
                del t
            if spec.tie_word_embeddings:
                w.alias("lm_head.weight", spec.embed_tokens_name)
            dropped = [k for k in ckpt.keys() if k not in used]
            if dropped:
                log.debug("hf_tensors_dropped", count=len(dropped), examples=dropped[:5])
            if (folder / "generation_config.json").is_file():
                w.copy_file(folder / "generation_config.json")
            _save_tokenizer(folder, w)
            source: dict[str, Any] = {"kind": "hf", "name": spec.name, "path": str(folder),
                                      "files": [f.name for f in files], "checksum": hf_folder_checksum(folder)}
            w.finish(json.loads(config_text), source)
    finally:
        ckpt.close()
    log.info("converted_hf", model=spec.name, out=str(out), seconds=round(time.perf_counter() - t0, 2))
    return WeightStore.open(out)


def _save_tokenizer(folder: Path, w: StoreWriter) -> None:
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return
    try:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(w.tokenizer_dir))
    except Exception as e:   # a model without a usable tokenizer still runs on token ids
        log.warning("tokenizer_not_converted", folder=str(folder), error=f"{type(e).__name__}: {e}")


def iter_hf_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every tensor in a HF folder's checkpoint, one at a time (for tools/tests)."""
    ckpt = _Checkpoint(hf_weight_files(Path(folder)))
    try:
        for key in ckpt.keys():
            yield key, ckpt.get(key)
    finally:
        ckpt.close()
