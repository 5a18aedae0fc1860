"""The weight store: a converted model as one raw file per tensor plus a JSON index.

A store is a folder::

    index.json       what is stored (below); its sha256 is the store's identity
    config.json      the Hugging Face config (so ``ModelSpec.from_config_file`` works)
    tokenizer/       optional: a Hugging Face tokenizer's ``save_pretrained`` output
    <tensor>.raw     one file per tensor: its bytes in C order, little-endian

``index.json``::

    {"format": "flexgraph-weights", "version": 1,
     "source": {"kind": "hf" | "gguf" | "dummy", "name": ..., ...free-form provenance...},
     "tensors": {"<HF name>": {"file": "<file>", "dtype": "bfloat16", "shape": [..],
                              "offset": 0, "nbytes": N, "sha256": "<hex>"}},
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"}}

Tensor names are Hugging Face's (``ModelSpec.all_weights``), so a store maps one-to-one
onto a transformers state dict; a tied head is an alias, not a second file.  ``offset``
is always 0 today; the field is there so files can later be aligned or packed.

Checksums are sha256 (with SHA-NI it hashes at ~1.1 GB/s on one core here, faster
than blake2b's ~0.6 GB/s).  Reads hash each chunk right after reading it, while it is
still in the CPU cache, and never copy the data: bytes go straight from the file into
the tensor's own memory.  Writers hash while writing, so no tensor is read twice.

:class:`StoreWriter` writes into a hidden sibling folder and renames it into place at
the end, so an interrupted conversion never leaves a folder that looks complete (and
one killed before it could delete that sibling has it removed by the next writer:
:mod:`flexgraph.weights.partials`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexgraph.errors import ModelError
from flexgraph.log import get_logger
from flexgraph.models.spec import ModelSpec
from flexgraph.progress import progress as _progress
from flexgraph.weights.partials import partial_path, reap_stale

FORMAT = "flexgraph-weights"
VERSION = 1
INDEX = "index.json"
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
CHUNK = 8 << 20           # bytes per read/write+hash step: big enough for throughput, small enough for L2/L3

if sys.byteorder != "little":   # the format is little-endian and we read bytes straight into tensors
    raise ImportError("flexgraph's weight store needs a little-endian machine")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ENTRY_FIELDS = {"file": str, "dtype": str, "shape": list, "offset": int, "nbytes": int, "sha256": str}

log = get_logger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling used in index.json)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ModelError(f"dtype {dtype} cannot be stored; supported: {', '.join(_DTYPES)}") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``."""
    if isinstance(name, torch.dtype):
        dtype_name(name)
        return name
    key = str(name).removeprefix("torch.")
    key = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
           "float": "float32"}.get(key, key)
    try:
        return _DTYPES[key]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; supported: {', '.join(_DTYPES)}") from None


@dataclass(frozen=True)
class WeightEntry:
    """One stored tensor: where its bytes are and what they must hash to."""
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    sha256: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _byte_view(t: torch.Tensor) -> memoryview:
    """A flat, writable byte view of a contiguous CPU tensor's memory (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


# ---------------------------------------------------------------------------------------
class WeightStore:
    """A read-only view of a store folder.  Thread-safe: reads share no mutable state."""

    def __init__(self, path: Path, index: dict[str, Any], index_checksum: str, spec: ModelSpec):
        self.path = path
        self.index = index
        self.index_checksum = index_checksum
        self.spec = spec
        self.source: dict[str, Any] = index.get("source", {})
        self._aliases: dict[str, str] = dict(index.get("aliases", {}))
        self._entries = {name: WeightEntry(name=name, file=path / e["file"], dtype=_DTYPES[e["dtype"]],
                                           shape=tuple(e["shape"]), offset=e["offset"],
                                           nbytes=e["nbytes"], sha256=e["sha256"])
                         for name, e in index["tensors"].items()}

    # ---- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, check_spec: bool = True, check_files: bool = True) -> WeightStore:
        """Open and validate a store; any problem is a one-line :class:`ModelError`.

        ``check_spec`` compares the tensors against the spec's (names and shapes);
        ``check_files`` stats every file so a truncated or missing one is caught now
        rather than in the middle of a run (cheap: one ``stat`` per tensor).
        """
        path = Path(path).expanduser().resolve()
        index_path = path / INDEX
        try:
            raw = index_path.read_bytes()
        except FileNotFoundError:
            what = "does not exist" if not path.exists() else "has no index.json"
            raise ModelError(f"{path} {what}, so it is not a flexgraph weight store; "
                             "convert the model first (or pass the original folder / .gguf file)") from None
        except OSError as e:
            raise ModelError(f"cannot read {index_path}: {e.strerror}") from None
        try:
            index = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{index_path} is not valid JSON ({e}); the store is damaged: re-convert the model") from None
        _validate_index(index, index_path)
        name = index["source"].get("name") if isinstance(index.get("source"), dict) else None
        spec = ModelSpec.from_config_file(path / CONFIG, name=name or path.name)
        store = cls(path, index, hashlib.sha256(raw).hexdigest(), spec)
        if check_spec:
            store.check_spec()
        if check_files:
            for entry in store._entries.values():
                store._check_size(entry)
        return store

    def check_spec(self, spec: ModelSpec | None = None) -> None:
        """Every tensor the spec needs exists with the spec's shape, else ModelError
        naming the first one that does not."""
        spec = spec or self.spec
        for w in spec.all_weights():
            target = self._aliases.get(w.name, w.name)
            entry = self._entries.get(target)
            if entry is None:
                raise ModelError(f"store {self.path} lacks tensor {w.name} that {spec.architecture} "
                                 f"{spec.name} needs; re-convert the model")
            if entry.shape != tuple(w.shape):
                raise ModelError(f"tensor {w.name} in store {self.path} has shape {list(entry.shape)} but "
                                 f"config.json implies {list(w.shape)}; re-convert the model")

    # ---- lookup ----------------------------------------------------------------------
    def names(self) -> list[str]:
        """Stored tensor names in storage order (aliases excluded; see :attr:`aliases`)."""
        return list(self._entries)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name, name) in self._entries

    def entry(self, name: str) -> WeightEntry:
        """The entry of ``name``; an alias resolves to its target's entry (whose
        ``name`` is the target's)."""
        try:
            return self._entries[self._aliases.get(name, name)]
        except KeyError:
            raise ModelError(f"store {self.path} has no tensor {name!r}") from None

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    # ---- reading ---------------------------------------------------------------------
    def _check_size(self, e: WeightEntry) -> None:
        try:
            size = e.file.stat().st_size
        except FileNotFoundError:
            raise ModelError(f"tensor {e.name}: file {e.file} is missing; the store is damaged: "
                             "re-convert the model") from None
        if size < e.offset + e.nbytes:
            raise ModelError(f"tensor {e.name}: file {e.file} is truncated ({size} bytes, needs "
                             f"{e.offset + e.nbytes}); the store is damaged: re-convert the model")

    def read(self, name: str, dtype: torch.dtype | None = None, verify: bool = True,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` (aliases resolve) into a new CPU tensor, or into ``out``
        (contiguous, the stored dtype, same number of elements — e.g. a pinned buffer).

        ``verify`` checks the sha256 (a mismatch is a ModelError); ``dtype`` converts
        after reading (a copy only if it differs from the stored dtype).
        """
        e = self.entry(name)
        self._check_size(e)
        if out is None:
            t = torch.empty(e.shape, dtype=e.dtype)
        else:
            if out.dtype != e.dtype or out.numel() != e.numel or not out.is_contiguous() or out.device.type != "cpu":
                raise ValueError(f"out for {e.name} must be a contiguous CPU {e.dtype} tensor of "
                                 f"{e.numel} elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
            t = out
        if e.nbytes:
            self._read_bytes(e, _byte_view(t), verify)
        elif verify and hashlib.sha256(b"").hexdigest() != e.sha256:
            self._bad_checksum(e)
        if dtype is not None and dtype != t.dtype:
            t = t.to(dtype)
        return t

    def _read_bytes(self, e: WeightEntry, buf: memoryview, verify: bool) -> None:
        h = hashlib.sha256() if verify else None
        try:
            with open(e.file, "rb", buffering=0) as f:
                f.seek(e.offset)
                pos = 0
                while pos < e.nbytes:
                    n = f.readinto(buf[pos:min(pos + CHUNK, e.nbytes)])
                    if not n:
                        raise ModelError(f"tensor {e.name}: file {e.file} is truncated at byte {pos} of "
                                         f"{e.nbytes}; the store is damaged: re-convert the model")
                    if h is not None:
                        h.update(buf[pos:pos + n])
                    pos += n
        except OSError as err:
            raise ModelError(f"cannot read tensor {e.name} from {e.file}: {err.strerror}") from None
        if h is not None and h.hexdigest() != e.sha256:
            self._bad_checksum(e)

    def _bad_checksum(self, e: WeightEntry) -> None:
        raise ModelError(f"tensor {e.name}: file {e.file} does not match its checksum; the store is "
                         "damaged: re-convert the model")

    def verify_all(self, progress: bool = True) -> int:
        """Check every tensor's size and checksum, streaming through one reusable buffer.

        Returns the number of bytes verified; raises one ModelError listing every damaged
        tensor (up to a few by name).
        """
        bad: list[str] = []
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        done = 0
        with _progress(total=self.total_bytes(), desc=f"verifying {self.path.name}", unit="B",
                       unit_scale=True, enabled=progress) as bar:
            for e in self._entries.values():
                try:
                    self._check_size(e)
                    h = hashlib.sha256()
                    with open(e.file, "rb", buffering=0) as f:
                        f.seek(e.offset)
                        left = e.nbytes
                        while left:
                            n = f.readinto(view[:min(CHUNK, left)])
                            if not n:
                                raise ModelError(f"tensor {e.name}: file {e.file} is truncated")
                            h.update(view[:n])
                            left -= n
                            bar.update(n)
                    if h.hexdigest() != e.sha256:
                        bad.append(f"{e.name} (checksum)")
                except ModelError:
                    bad.append(f"{e.name} (missing or truncated)")
                except OSError as err:
                    bad.append(f"{e.name} ({err.strerror})")
                done += e.nbytes
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ModelError(f"{len(bad)} of {len(self._entries)} tensors of store {self.path} are damaged: "
                             f"{shown}; re-convert the model")
        return done

    def tokenizer(self) -> Any:
        """The transformers tokenizer saved with the model, or None when it has none."""
        folder = self.path / TOKENIZER_DIR
        if not folder.is_dir():
            return None
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:   # transformers raises many types; the message is what matters
            raise ModelError(f"cannot load the tokenizer in {folder} ({type(e).__name__}: {e}); "
                             "re-convert the model") from None

    def __repr__(self) -> str:
        return f"WeightStore({str(self.path)!r}, {len(self._entries)} tensors, {self.total_bytes()} bytes)"



def _validate_index(index: Any, where: Path) -> None:
    """Structural checks of a parsed index.json; the first problem is a ModelError."""
    def bad(what: str) -> ModelError:
        return ModelError(f"{where} is not a valid flexgraph index ({what}); re-convert the model")

    if not isinstance(index, dict):
        raise bad("not a JSON object")
    if index.get("format") != FORMAT:
        raise bad(f"format is {index.get('format')!r}, expected {FORMAT!r}")
    version = index.get("version")
    if not isinstance(version, int):
        raise bad("no integer version")
    if version > VERSION:
        raise ModelError(f"{where} has store format version {version}, newer than this flexgraph reads "
                         f"({VERSION}); upgrade flexgraph or re-convert the model")
    if version != VERSION:
        raise bad(f"unsupported version {version}")
    tensors = index.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise bad("no tensors")
    if not isinstance(index.get("source", {}), dict):
        raise bad("source is not an object")
    for name, e in tensors.items():
        if not isinstance(e, dict):
            raise bad(f"entry {name} is not an object")
        for key, typ in _ENTRY_FIELDS.items():
            if not isinstance(e.get(key), typ) or isinstance(e.get(key), bool):
                raise bad(f"entry {name} lacks a valid {key!r}")
        if e["dtype"] not in _DTYPES:
            raise bad(f"entry {name} has unknown dtype {e['dtype']!r}")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in e["shape"]):
            raise bad(f"entry {name} has a bad shape {e['shape']}")
        expected = math.prod(e["shape"]) * _DTYPES[e["dtype"]].itemsize
        if e["nbytes"] != expected:
            raise bad(f"entry {name} has nbytes {e['nbytes']} but its shape and dtype need {expected}")
        # a file name must stay inside the store folder
        if e["file"] in ("", ".", "..") or "/" in e["file"] or "\\" in e["file"] or e["offset"] < 0:
            raise bad(f"entry {name} has a bad file or offset")
        if not re.fullmatch(r"[0-9a-f]{64}", e["sha256"]):
            raise bad(f"entry {name} has a malformed sha256")
    aliases = index.get("aliases", {})
    if not isinstance(aliases, dict):
        raise bad("aliases is not an object")
    for alias, target in aliases.items():
        if target not in tensors:
            raise bad(f"alias {alias} points at {target!r}, which is not stored")


# ---------------------------------------------------------------------------------------
class StoreWriter:
    """Writes a store tensor by tensor; never holds more than the tensor (or chunk) it is given.

    ::

        with StoreWriter(out) as w:
            for name, t in tensors:
                w.add(name, t)
            w.alias("lm_head.weight", "model.embed_tokens.weight")
            tokenizer.save_pretrained(w.tokenizer_dir)
            w.finish(config, {"kind": "hf", ...})

    Everything goes to a hidden sibling folder that ``finish`` renames to ``path``;
    leaving the ``with`` block without ``finish`` (an error, Ctrl-C) deletes it.
    """

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path).expanduser().resolve()
        self.overwrite = overwrite
        if self.path.exists() and not overwrite:
            raise ModelError(f"{self.path} already exists; remove it or choose another output folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        reap_stale(self.path)                 # what killed writers left of this store
        self.tmp = partial_path(self.path)
        self.tmp.mkdir()
        self._tensors: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, str] = {}
        self._files: set[str] = set()
        self._done = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    @property
    def tokenizer_dir(self) -> Path:
        """Where to ``save_pretrained`` a tokenizer (created on demand by transformers)."""
        return self.tmp / TOKENIZER_DIR

    def _file_for(self, name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "tensor"
        fname, k = f"{base}.raw", 1
        while fname.lower() in self._files:        # case-insensitive file systems
            fname, k = f"{base}.{k}.raw", k + 1
        self._files.add(fname.lower())
        return fname

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (any device/layout; stored contiguous, on CPU, dtype kept)."""
        t = tensor.detach()
        self.add_chunks(name, t.dtype, tuple(t.shape), [t])

    def add_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                   chunks: Iterable[torch.Tensor]) -> None:
        """Write a tensor given as consecutive pieces of its C-order data (e.g. row
        blocks), so a tensor larger than memory can be produced piece by piece."""
        if name in self._tensors or name in self._aliases:
            raise ValueError(f"tensor {name} added twice")
        nbytes = math.prod(shape) * dtype.itemsize
        fname = self._file_for(name)
        h = hashlib.sha256()
        written = 0
        with open(self.tmp / fname, "wb", buffering=0) as f:
            for chunk in chunks:
                if chunk.dtype != dtype:
                    raise ValueError(f"chunk of {name} has dtype {chunk.dtype}, expected {dtype}")
                c = chunk.detach().to("cpu").contiguous()
                view = _byte_view(c)
                for start in range(0, len(view), CHUNK):
                    part = view[start:start + CHUNK]
                    h.update(part)
                    while part:                       # raw writes may be partial
                        n = f.write(part)
                        part = part[n:]
                written += len(view)
                del c, view
        if written != nbytes:
            raise ValueError(f"tensor {name}: got {written} bytes, shape {shape} {dtype} needs {nbytes}")
        self._tensors[name] = {"file": fname, "dtype": dtype_name(dtype), "shape": list(shape),
                               "offset": 0, "nbytes": nbytes, "sha256": h.hexdigest()}

    def alias(self, name: str, target: str) -> None:
        """Record ``name`` as another name of the stored tensor ``target``."""
        if target not in self._tensors:
            raise ValueError(f"alias {name} -> {target}: {target} has not been added")
        if name in self._tensors:
            raise ValueError(f"alias {name} collides with a stored tensor")
        self._aliases[name] = target

    def copy_file(self, src: str | Path, name: str | None = None) -> None:
        """Copy an extra file (e.g. generation_config.json) into the store."""
        shutil.copyfile(src, self.tmp / (name or Path(src).name))

    def finish(self, config: dict[str, Any], source: dict[str, Any]) -> Path:
        """Write config.json and index.json, then move the folder into place."""
        if self._done:
            raise RuntimeError("StoreWriter already finished or aborted")
        if not self._tensors:
            raise ValueError("no tensors were added")
        (self.tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        index = {"format": FORMAT, "version": VERSION, "source": source,
                 "tensors": self._tensors, "aliases": self._aliases}
        # index.json last and fsynced: its presence marks the folder as complete
        with open(self.tmp / INDEX, "w") as f:
            json.dump(index, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if self.path.exists():
            if not self.overwrite:
                self.abort()
                raise ModelError(f"{self.path} appeared while writing; remove it or choose another folder")
            trash = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(self.tmp, self.path)
        self._done = True
        log.debug("store_written", path=str(self.path), tensors=len(self._tensors))
        return self.path
