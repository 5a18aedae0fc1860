#!/usr/bin/env python3
"""Run a command under a real memory cap, one that counts the page cache.

    python tools/cgroup_run.py --mem 3GiB [--no-drop-caches] [--json] -- cmd args...

Benchmarks in flexgraph compare systems "under the same memory cap": the cap must be
a cgroup memory limit (``ulimit -v`` / ``RLIMIT_AS`` would count address space, not
memory, and ignore the page cache, so a "disk" tier would quietly live in RAM).  This
tool

1. syncs and drops the page cache (``/proc/sys/vm/drop_caches``), so the first reads
   really come from disk — when that file is writable; otherwise it says so and goes on
   (page cache the parent already holds stays charged to the parent's cgroup, so it
   does not count against the cap either way, but reads of it are faster than disk);
2. creates a uniquely named child cgroup ``flexgraph-<pid>-<random>`` under this
   process's own memory cgroup (nested, so every limit above still applies and
   whoever accounts for this process still sees the command), sets the limit —
   ``memory.limit_in_bytes`` plus ``memory.memsw.limit_in_bytes`` on v1, ``memory.max``
   plus ``memory.swap.max = 0`` on v2, so swap cannot stretch the cap;
3. runs the command inside it (the forked child moves itself into the cgroup before
   exec, so nothing it allocates is charged elsewhere);
4. reports the peak usage (v1 ``memory.max_usage_in_bytes``, v2 ``memory.peak``) and
   whether the OOM killer fired (``oom_kill`` in ``memory.oom_control`` /
   ``memory.events``; on kernels without that counter, death by SIGKILL after the
   limit was hit);
5. always removes the cgroup — after the command exits, on Ctrl-C, on SIGTERM and on
   errors — killing anything the command left running in it first.

Exit status: the command's (128+N when a signal N killed it, as shells report it);
125 when this tool itself fails (no cgroup support, bad arguments), 126 when the
command cannot be executed, 127 when it is not found — the conventions of ``timeout(1)`` and ``env(1)``.

Importable: ``run_capped(cmd, mem_bytes, ...) -> CappedResult``.  Needs root and a
memory controller (cgroup v1, or v2 with ``memory`` enabled in the parent's
``cgroup.subtree_control``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from flexgraph.errors import FlexgraphError
from flexgraph.hardware import CgroupLocation, find_memory_cgroup
from flexgraph.sizes import format_size, parse_size

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
EXIT_TOOL_FAILED, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND = 125, 126, 127


class CgroupError(FlexgraphError):
    """No usable cgroup memory controller, or the child cgroup could not be managed."""


@dataclass
class CappedResult:
    returncode: int                  # negative: killed by that signal (subprocess style)
    peak_bytes: int | None           # None when the kernel does not report a peak
    oom_killed: bool
    wall_seconds: float
    stdout: bytes | None = None      # only with capture_output=True
    stderr: bytes | None = None
    limit_bytes: int = 0
    cgroup: str = ""                 # the (now removed) cgroup directory
    cgroup_version: int = 0
    caches_dropped: bool = False

    def summary(self) -> dict:
        """JSON-friendly fields, without the captured output."""
        d = asdict(self)
        d.pop("stdout"), d.pop("stderr")
        return d


# --- cgroup plumbing -------------------------------------------------------------------

def _parent_for(loc: CgroupLocation) -> Path:
    """Where to create the child: this process's own cgroup."""
    parent = loc.path
    if loc.version == 2:
        # v2's "no internal processes" rule: a cgroup holding processes (ours does)
        # cannot delegate memory to children, except the root.  We do not turn the
        # controller on ourselves: that would change a cgroup we do not own.
        sub = (parent / "cgroup.subtree_control").read_text().split() \
            if (parent / "cgroup.subtree_control").exists() else []
        if "memory" not in sub:
            raise CgroupError(
                f"cgroup v2: memory is not enabled in {parent}/cgroup.subtree_control; "
                f"run inside a delegated scope (e.g. systemd-run --scope -p Delegate=yes) "
                f"or pass --parent with a cgroup that has it")
    return parent


def cgroup_problem(parent: str | os.PathLike | None = None) -> str | None:
    """Why ``run_capped`` cannot work here, or None when it should.  For test skips."""
    if os.geteuid() != 0:
        return "cgroups need root (euid is not 0)"
    loc = find_memory_cgroup()
    if loc is None:
        return "no cgroup memory controller mounted (v1 /sys/fs/cgroup/memory or v2 with memory)"
    try:
        p = Path(parent) if parent else _parent_for(loc)
    except CgroupError as e:
        return str(e)
    if not os.access(p, os.W_OK):
        return f"cgroup {p} is not writable"
    return None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _set_limit(cg: Path, version: int, mem_bytes: int) -> None:
    if version == 1:
        # memsw (memory + swap) must be >= the memory limit, so set memory first.
        _write(cg / "memory.limit_in_bytes", str(mem_bytes))
        if (cg / "memory.memsw.limit_in_bytes").exists():
            _write(cg / "memory.memsw.limit_in_bytes", str(mem_bytes))
    else:
        _write(cg / "memory.max", str(mem_bytes))
        if (cg / "memory.swap.max").exists():
            _write(cg / "memory.swap.max", "0")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (memory.oom_control, memory.events)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (ln.split() for ln in lines if len(ln.split()) == 2) if v.isdigit()}


def _peak(cg: Path, version: int) -> int | None:
    return _read_int(cg / ("memory.max_usage_in_bytes" if version == 1 else "memory.peak"))


def _oom_killed(cg: Path, version: int, returncode: int) -> bool:
    counters = _read_keyed(cg / ("memory.oom_control" if version == 1 else "memory.events"))
    if "oom_kill" in counters:                       # v1 since 4.13, v2 since 4.13
        return counters["oom_kill"] > 0
    # Older kernels: SIGKILL after the limit was hit is the best evidence there is.
    hits = _read_int(cg / "memory.failcnt") if version == 1 else counters.get("max", 0)
    return returncode == -signal.SIGKILL and bool(hits)


def _procs(cg: Path) -> list[int]:
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _remove_cgroup(cg: Path, timeout: float = 10.0) -> None:
    """Kill whatever is left in ``cg`` and rmdir it.  rmdir fails with EBUSY until every
    member has exited and been reaped, so retry for a while."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in _procs(cg):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise CgroupError(f"could not remove cgroup {cg} ({e.strerror}); remove it with: rmdir {cg}")
            time.sleep(0.05)


def drop_page_cache() -> str | None:
    """sync, then drop clean page cache, dentries and inodes.  None on success, else why not."""
    os.sync()
    try:
        _write(DROP_CACHES, "3")
        return None
    except OSError as e:
        return f"{DROP_CACHES}: {e.strerror}"


# --- running ---------------------------------------------------------------------------

def _enter_cgroup(procs_file: str):
    """A preexec_fn: runs in the forked child, before exec, and moves it into the cgroup.
    Kept to two syscalls because little is safe between fork and exec."""
    def enter() -> None:
        fd = os.open(procs_file, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    return enter


def run_capped(cmd: Sequence[str], mem_bytes: int | str, drop_caches: bool = True,
               env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
               capture_output: bool = False, timeout: float | None = None,
               parent: str | os.PathLike | None = None) -> CappedResult:
    """Run ``cmd`` in a fresh memory cgroup capped at ``mem_bytes`` (bytes or ``"3GiB"``)
    and return how it went.  The cgroup is removed before this returns or raises.

    ``timeout`` (seconds): the command is killed after it and ``TimeoutExpired`` is
    raised.  ``parent``: the cgroup directory to create the child in (default: this
    process's own memory cgroup).  Raises ``CgroupError`` when cgroups are unusable and
    ``FileNotFoundError`` when the command does not exist.
    """
    limit = parse_size(mem_bytes)
    if os.geteuid() != 0:
        raise CgroupError("cgroup memory caps need root (euid is not 0)")
    loc = find_memory_cgroup()
    if loc is None:
        raise CgroupError("no cgroup memory controller is mounted "
                          "(v1 /sys/fs/cgroup/memory, or v2 with 'memory' in cgroup.controllers)")
    dropped = drop_page_cache() is None if drop_caches else False
    base = Path(parent) if parent else _parent_for(loc)
    cg = base / f"flexgraph-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        cg.mkdir()
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {cg} ({e.strerror})")
    try:
        try:
            _set_limit(cg, loc.version, limit)
        except OSError as e:
            raise CgroupError(f"cannot set a {format_size(limit)} limit on cgroup {cg} ({e.strerror})")
        start = time.monotonic()
        pipe = subprocess.PIPE if capture_output else None
        proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env), cwd=cwd,
                                stdout=pipe, stderr=pipe,
                                preexec_fn=_enter_cgroup(str(cg / "cgroup.procs")))
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            # Ctrl-C, SIGTERM (CLI), timeout: the command dies with us.
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - start
        return CappedResult(returncode=proc.returncode, peak_bytes=_peak(cg, loc.version),
                            oom_killed=_oom_killed(cg, loc.version, proc.returncode),
                            wall_seconds=wall, stdout=out, stderr=err, limit_bytes=limit,
                            cgroup=str(cg), cgroup_version=loc.version, caches_dropped=dropped)
    except subprocess.SubprocessError as e:
        if "preexec_fn" in str(e):
            raise CgroupError(f"could not move the command into cgroup {cg}")
        raise
    finally:
        _remove_cgroup(cg)


# --- command line ----------------------------------------------------------------------

def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="cgroup_run.py", description="Run a command under a cgroup memory cap that counts page cache.",
        usage="%(prog)s --mem SIZE [--no-drop-caches] [--json] [--parent DIR] -- cmd args...")
    ap.add_argument("--mem", required=True, help="the cap, e.g. 3GiB, 512MB, 2G (bare G = GiB)")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache warm")
    ap.add_argument("--json", action="store_true", help="print a one-line JSON summary to stderr at the end")
    ap.add_argument("--parent", help="cgroup directory to create the child in (default: our own)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        ap.error("no command given; put it after --")
    return args


class _Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. from a benchmark's timeout) turned into an exception, so it unwinds
    through run_capped's cleanup instead of leaving the cgroup behind."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _summary_line(r: CappedResult) -> str:
    peak = format_size(r.peak_bytes) if r.peak_bytes is not None else "unknown"
    return (f"cgroup_run: exit {r.returncode}, peak {peak} of {format_size(r.limit_bytes)} cap, "
            f"{'OOM-killed' if r.oom_killed else 'no OOM kill'}, {r.wall_seconds:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:                          # argparse: usage errors are ours, not the command's
        return EXIT_TOOL_FAILED if e.code == 2 else int(e.code or 0)
    signal.signal(signal.SIGTERM, _raise_terminated)
    why: str | None = "not asked to"
    try:
        limit = parse_size(args.mem)
        if not args.no_drop_caches:
            why = drop_page_cache()
            if why:
                print(f"cgroup_run: note: page cache not dropped ({why}); reads may come from cache",
                      file=sys.stderr)
        r = run_capped(args.cmd, limit, drop_caches=False, parent=args.parent)
        r.caches_dropped = why is None
    except FileNotFoundError as e:
        print(f"cgroup_run: error: command not found: {e.filename or args.cmd[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except PermissionError as e:
        print(f"cgroup_run: error: cannot execute {e.filename or args.cmd[0]}: {e.strerror}", file=sys.stderr)
        return EXIT_CANNOT_EXECUTE
    except FlexgraphError as e:
        print(f"cgroup_run: error: {e}", file=sys.stderr)
        return EXIT_TOOL_FAILED
    except KeyboardInterrupt as e:
        print("cgroup_run: interrupted; command killed and cgroup removed", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    print(json.dumps(r.summary()) if args.json else _summary_line(r), file=sys.stderr)
    return r.returncode if r.returncode >= 0 else 128 - r.returncode


if __name__ == "__main__":
    sys.exit(main())
