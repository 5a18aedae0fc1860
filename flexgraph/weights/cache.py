"""Where converted models live, and a lock so two processes never convert the same one.

Cache layout (root: ``$FLEXGRAPH_CACHE``, else ``~/.cache/flexgraph``)::

    <root>/bundled/SmolLM2-135M-Instruct.Q4_1.gguf     bundled GGUF, when it had to be downloaded
    <root>/stores/smollm2-135m-<gguf sha256[:12]>/      the bundled model, converted
    <root>/stores/hf-<folder>-<checksum[:16]>/          a converted Hugging Face folder
    <root>/stores/gguf-<file stem>-<checksum[:16]>/     a converted GGUF file
    <root>/stores/dummy-<model>-<dtype>-seed<N>-<identity[:16]>/   random weights
    <root>/locks/<store name>.lock                      held while that store is being made

Each store folder only appears once complete (``StoreWriter`` renames it into place),
so "the folder exists" means "the conversion finished".
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache root (not created)."""
    env = os.environ.get("FLEXGRAPH_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path("~/.cache/flexgraph").expanduser().resolve()


def stores_dir() -> Path:
    return cache_root() / "stores"


def safe_component(text: str, limit: int = 48) -> str:
    """A string usable as one path component: ``facebook/OPT-1.3b`` -> ``facebook_OPT-1.3b``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"
    return cleaned[:limit]


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """An exclusive inter-process lock named ``name`` (blocks until free).

    Converting into the cache takes seconds to hours; without the lock two concurrent
    ``flexgraph`` runs would both convert and one would throw its work away.
    """
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{safe_component(name, 120)}.lock"
    with open(path, "a+b") as f:
        try:
            import fcntl
        except ImportError:          # Windows: no lock; the atomic rename still keeps stores whole
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
