"""Hidden siblings of interrupted writes: named after their writer, reaped once it is gone.

A store (or an extracted GGUF file) is written under a hidden sibling name and renamed
into place when complete, so nothing half-written ever looks finished.  A writer killed
before it can clean up (an OOM kill, SIGKILL, a power cut) leaves that sibling behind,
and nothing else ever removes it: a dummy Llama-3.1-8B store is 16 GB of it, which the
next write then cannot use.

The name says who writes it::

    .<final name>.partial-<host>-<pid>-<8 hex>

so a later writer on the same host removes the siblings whose process no longer runs.
Siblings of other hosts (a cache folder on a shared file system) and of live processes
are left alone; so is anything not named this way.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from flexgraph.log import get_logger

log = get_logger(__name__)


def _host() -> str:
    # the name's fields are split on '-': keep them out of the host part
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def partial_path(final: Path) -> Path:
    """Where to write ``final`` before renaming it into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # someone else's process: running
        return True
    except OSError:                         # a PID this system cannot even ask about
        return False
    return True


def stale_partials(final: Path) -> list[Path]:
    """The hidden siblings of ``final`` left by writers on this host that no longer run."""
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.partial-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    if not final.parent.is_dir():
        return []
    host, found = _host(), []
    for p in final.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            found.append(p)
    return sorted(found)


def reap_stale(final: Path) -> list[Path]:
    """Remove :func:`stale_partials` of ``final``; returns what was removed."""
    removed = []
    for p in stale_partials(final):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            removed.append(p)
            log.info("stale_partial_removed", path=str(p))
    return removed
