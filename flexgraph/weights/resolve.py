"""Turn a ``--model`` argument into a :class:`ModelRef` (cheap), and a ref into weights.

``resolve_model(arg, dummy, seed)`` reads configs only — it never converts or writes
weights, so ``flexgraph plan`` stays fast and side-effect free.  Accepted arguments,
in the order they are tried:

=============================  =========  ==========================================
argument                       kind       checksum (identity rechecked later)
=============================  =========  ==========================================
folder with index.json         store      the store's ``index_checksum``
folder with config.json        hf         ``hf_folder_checksum``: config bytes +
                                          sorted (weight file name, size)
``*.gguf`` file                gguf       ``gguf_checksum``: header + size + 16 samples
``smollm2-135m``               bundled    the bundled GGUF's published sha256
built-in id (``opt-6.7b``)     builtin    needs ``dummy=True``
=============================  =========  ==========================================

With ``dummy=True`` any of them means "random weights with this config": the checksum
is then ``dummy_identity(spec, None, seed)`` (dtype-independent; see
:mod:`flexgraph.weights.dummy`), and a folder needs only its config.json.

``materialize(ref, dtype)`` produces a :class:`WeightStore`: a store is opened in
place; everything else is converted (or generated) once into the cache — see
:mod:`flexgraph.weights.cache` for the layout — and reused afterwards.  It first
recomputes the source's identity and refuses to run if it differs from the ref's:
the plan was made for other weights.  ``dtype`` matters only for dummies (real
weights keep their stored dtype; ``WeightStore.read`` converts on read); a dummy's
default dtype is the config's ``torch_dtype``, else bfloat16.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexgraph.errors import ModelError, PlanError
from flexgraph.log import get_logger
from flexgraph.models.builtin import BUILTIN_IDS, builtin_config, normalize_builtin_id
from flexgraph.models.spec import ModelSpec
from flexgraph.weights import bundled
from flexgraph.weights.cache import cache_lock, safe_component, stores_dir
from flexgraph.weights.convert_hf import convert_hf, hf_folder_checksum, hf_weight_files
from flexgraph.weights.dummy import dummy_identity, room_problem, write_dummy
from flexgraph.weights.gguf_file import gguf_checksum, read_gguf_header
from flexgraph.weights.partials import reap_stale
from flexgraph.weights.store import CONFIG, INDEX, WeightStore, dtype_name, parse_dtype

KINDS = ("store", "hf", "gguf", "builtin", "bundled")
log = get_logger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model argument: what it is, where, and the identity of its weights."""
    kind: str              # one of KINDS
    location: str          # absolute path (store, hf, gguf) or id (builtin, bundled)
    dummy: bool            # random weights with this model's config
    spec: ModelSpec
    checksum: str          # see the module docstring
    seed: int = 0          # dummy weights' seed

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for plan files (the config is embedded, so a plan can be
        read without the model)."""
        return {"kind": self.kind, "location": self.location, "dummy": self.dummy, "seed": self.seed,
                "checksum": self.checksum, "name": self.spec.name, "config": self.spec.config_dict()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRef:
        try:
            kind = data["kind"]
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            spec = ModelSpec.from_hf_config(data["config"], name=data.get("name"))
            return cls(kind=kind, location=str(data["location"]), dummy=bool(data["dummy"]), spec=spec,
                       checksum=str(data["checksum"]), seed=int(data.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"the plan's model entry is malformed ({type(e).__name__}: {e}); "
                            "re-run flexgraph plan") from None

    @property
    def display(self) -> str:
        return f"{self.location}{' (dummy)' if self.dummy else ''}"


def _accepted() -> str:
    return ("a flexgraph weight store folder (with index.json), a Hugging Face model folder (config.json "
            "+ *.safetensors or pytorch_model*.bin), a .gguf file, 'smollm2-135m' (the bundled model), or a "
            f"built-in id with --dummy ({', '.join(BUILTIN_IDS)})")


def _source_spec(kind: str, location: str) -> tuple[ModelSpec, str | None]:
    """(spec, checksum of the real weights or None when there are none) of a source."""
    path = Path(location)
    if kind == "store":
        store = WeightStore.open(path, check_files=False)
        return store.spec, store.index_checksum
    if kind == "hf":
        spec = ModelSpec.from_config_file(path / CONFIG, name=path.name)
        return spec, hf_folder_checksum(path) if hf_weight_files(path) else None
    if kind == "gguf":
        from flexgraph.weights.convert_gguf import gguf_spec
        header = read_gguf_header(path)
        return gguf_spec(header, name=path.stem), gguf_checksum(path, header)
    if kind == "bundled":
        store = bundled.cached_bundled_store()
        if store is not None:
            return store.spec, bundled.GGUF_SHA256
        from flexgraph.weights.convert_gguf import gguf_spec
        return gguf_spec(read_gguf_header(bundled.bundled_gguf()), name=bundled.BUNDLED_ID), bundled.GGUF_SHA256
    if kind == "builtin":
        return ModelSpec.from_hf_config(builtin_config(location), name=location), None
    raise ModelError(f"unknown model kind {kind!r}")


def _kind_of(arg: str) -> tuple[str, str]:
    path = Path(arg).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if (path / INDEX).is_file():
                return "store", str(path)
            if (path / CONFIG).is_file():
                return "hf", str(path)
            raise ModelError(f"model folder {path} has neither index.json nor config.json; expected "
                             + _accepted())
        if path.suffix.lower() == ".gguf":
            return "gguf", str(path)
        if path.name == CONFIG:                      # a config.json: its folder
            return _kind_of(str(path.parent))
        raise ModelError(f"model {arg!r} is a file but not a .gguf file; expected " + _accepted())
    if bundled.is_bundled_id(arg):
        return "bundled", bundled.BUNDLED_ID
    short = normalize_builtin_id(arg)
    if short is not None:
        return "builtin", short
    raise ModelError(f"unknown model {arg!r}: no such file or folder, and not a known id; expected " + _accepted())


def resolve_model(arg: str, dummy: bool = False, seed: int = 0) -> ModelRef:
    """Resolve ``arg`` (see the module docstring); config only, never writes weights
    (the bundled model's GGUF may be downloaded to read its config)."""
    kind, location = _kind_of(str(arg))
    spec, checksum = _source_spec(kind, location)
    if dummy:
        checksum = dummy_identity(spec, None, seed)
    elif kind == "builtin":
        raise ModelError(f"{arg!r} is a built-in architecture without weights; pass --dummy for random "
                         "weights, or a local model folder / .gguf file for real ones")
    elif checksum is None:
        raise ModelError(f"{location} has config.json but no weight files (*.safetensors or "
                         "pytorch_model*.bin); download the weights, or pass --dummy for random ones")
    return ModelRef(kind=kind, location=location, dummy=dummy, spec=spec, checksum=checksum, seed=seed)


def _changed(ref: ModelRef, why: str) -> ModelError:
    return ModelError(f"model {ref.display} changed since the plan was made ({why}); re-run flexgraph plan")


def _current_checksum(ref: ModelRef) -> tuple[ModelSpec, str | None]:
    if ref.kind in ("store", "hf", "gguf") and not Path(ref.location).exists():
        raise _changed(ref, f"{ref.location} no longer exists")
    spec, checksum = _source_spec(ref.kind, ref.location)
    if ref.dummy:
        checksum = dummy_identity(spec, None, ref.seed)
    if checksum != ref.checksum:
        raise _changed(ref, "its checksum differs")
    return spec, checksum


def default_dummy_dtype(spec: ModelSpec) -> torch.dtype:
    cfg = spec.config_dict()
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    try:
        return parse_dtype(name) if isinstance(name, str) else torch.bfloat16
    except ModelError:
        return torch.bfloat16


def store_path_for(ref: ModelRef, dtype: torch.dtype | None = None) -> Path:
    """Where ``materialize`` keeps (or finds) the store of ``ref``."""
    if ref.dummy:
        dtype = dtype or default_dummy_dtype(ref.spec)
        ident = dummy_identity(ref.spec, dtype, ref.seed)
        return stores_dir() / (f"dummy-{safe_component(ref.spec.name)}-{dtype_name(dtype)}-seed{ref.seed}-"
                               f"{ident[:16]}")
    if ref.kind == "store":
        return Path(ref.location)
    if ref.kind == "bundled":
        return bundled.bundled_store_path()
    stem = Path(ref.location).stem if ref.kind == "gguf" else Path(ref.location).name
    return stores_dir() / f"{ref.kind}-{safe_component(stem)}-{ref.checksum[:16]}"


def in_place_dtype(ref) -> str | None:
    """The stored dtype in which the run's weight store holds every weight matrix of
    ``ref`` — a disk-homed weight in that dtype is read from the store in place and takes
    no room in ``--offload-dir`` — or None where the plan cannot count on it: ``"*"`` for
    a dummy (generated in whatever dtype the plan keeps), the matrices' one dtype for a
    store folder.  A converted model (hf, gguf, bundled) says None, so its plan does not
    depend on whether this machine converted it already."""
    if getattr(ref, "dummy", False):
        return "*"
    if getattr(ref, "kind", None) != "store":
        return None
    try:
        store = WeightStore.open(ref.location, check_spec=False, check_files=False)
    except ModelError:
        return None
    kept = {store.entry(n).dtype for n in store.names() if len(store.entry(n).shape) == 2}
    return dtype_name(kept.pop()) if len(kept) == 1 else None


def unwritable_stores(ref, dtypes: list[str]) -> dict[str, str]:
    """For a dummy ``ref``: which of ``dtypes`` its store is neither written in yet nor has
    room to be (dtype -> why); empty for any other model, whose store is what it is."""
    if not getattr(ref, "dummy", False):
        return {}
    found = {}
    for name in dtypes:
        dtype = parse_dtype(name)
        path = store_path_for(ref, dtype)
        if not path.exists():
            reap_stale(path)                  # free what killed writes of it left behind
        problem = None if path.exists() else room_problem(ref.spec, dtype, path.parent)
        if problem:
            found[name] = problem
    return found


def materialize(ref: ModelRef, dtype: torch.dtype | None = None, *, progress: bool = True) -> WeightStore:
    """The weights of ``ref`` as a store: converted / generated into the cache once,
    reused afterwards; ModelError if the source changed since ``ref`` was made."""
    spec, _ = _current_checksum(ref)
    if ref.kind == "store" and not ref.dummy:
        return WeightStore.open(ref.location)
    if ref.kind == "bundled" and not ref.dummy:
        return bundled.bundled_store(progress=progress)
    path = store_path_for(ref, dtype)
    with cache_lock(path.name):
        store = _reusable(path, ref, dtype)
        if store is not None:
            return store
        if path.exists():
            shutil.rmtree(path)                   # stale or damaged: make it again
        if ref.dummy:
            log.info("generating_dummy", model=spec.name, out=str(path))
            return write_dummy(spec, path, dtype or default_dummy_dtype(spec), ref.seed, progress=progress)
        log.info("converting", model=ref.location, kind=ref.kind, out=str(path))
        if ref.kind == "hf":
            return convert_hf(ref.location, path, progress=progress, name=spec.name)
        from flexgraph.weights.convert_gguf import convert_gguf
        return convert_gguf(ref.location, path, progress=progress, name=spec.name)


def _reusable(path: Path, ref: ModelRef, dtype: torch.dtype | None) -> WeightStore | None:
    """The cached store at ``path`` if it is complete and made from this exact source."""
    if not (path / INDEX).is_file():
        return None
    try:
        store = WeightStore.open(path)
    except ModelError as e:
        log.warning("cached_store_damaged", path=str(path), error=str(e))
        return None
    src = store.source
    if ref.dummy:
        want = dummy_identity(ref.spec, dtype or default_dummy_dtype(ref.spec), ref.seed)
        return store if src.get("identity") == want else None
    return store if src.get("checksum") == ref.checksum else None

