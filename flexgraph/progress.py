"""Progress bars for long steps (conversion, dummy weights, verification, downloads).

A thin wrapper around tqdm that decides *whether* to draw: bars appear only when stderr
is a terminal, so logs, pipes and CI output stay clean.  ``FLEXGRAPH_PROGRESS=0`` (or
``set_enabled(False)``, e.g. from a ``--no-progress`` flag) turns them off everywhere;
``FLEXGRAPH_PROGRESS=1`` forces them on.  Callers pass ``enabled=False`` to silence one
bar.  Usage::

    for name in progress(names, desc="converting", unit="tensor"):
        ...
    with progress(total=nbytes, desc="writing", unit="B", unit_scale=True) as bar:
        bar.update(n)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

_override: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force bars on/off for the whole process (None: back to automatic)."""
    global _override
    _override = enabled


def enabled(requested: bool | None = True) -> bool:
    """Whether a bar should be drawn: the caller's wish, the override, the env, a tty."""
    if requested is False:
        return False
    if _override is not None:
        return _override
    env = os.environ.get("FLEXGRAPH_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # closed or replaced stderr
        return False


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", unit_scale: bool = False, enabled: bool | None = True,
             leave: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar that is disabled unless :func:`enabled` says to draw it."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=not _enabled(enabled), leave=leave, dynamic_ncols=True, **kwargs)


_enabled = enabled
