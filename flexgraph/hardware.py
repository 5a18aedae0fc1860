"""The memory tiers a plan may use: what this machine (and its cgroup) can give.

``detect_hardware`` measures, ``Hardware`` records (and goes into plan.json).  Every
capacity is a number of bytes the *planner* may fill with weights, KV cache and
activations on that tier; the process's own needs (interpreter, torch, allocator
slack) are kept apart in ``headroom``, which is reserved *in addition* to the tiers.
So the host memory a run needs is about ``cpu_mem + headroom`` (+ ``gpu_mem`` when the
gpu tier is simulated in host memory).

Tiers:

- **gpu**: on CUDA the device's free memory (``torch.cuda.mem_get_info``).  On the CPU
  there is no separate gpu memory, so by default the tier is absent (``gpu_mem=None``)
  and the cpu tier is compute-local.  Passing ``gpu_mem`` on the CPU *simulates* the
  tier as a separately budgeted region of host memory (see DESIGN.md); those bytes
  come out of the same RAM, so they are subtracted from the detected cpu tier.
- **cpu**: available host memory, the smaller of ``MemAvailable`` and what the
  process's memory cgroup (v1 or v2, the tightest of it and its ancestors) still allows,
  minus headroom (and minus a simulated gpu tier).
- **disk**: free bytes on the filesystem of ``offload_dir``.

A size given by the user (``cpu_mem=...`` etc.) is the tier capacity they want and is
used as is: it is not reduced by headroom or by a simulated gpu tier, because the user
has already decided how to split the machine (and may be planning for another one).
Headroom is still recorded, and a warning is logged when the overrides plus headroom
exceed what was detected here.

Nothing here imports torch unless the device has to be probed (it costs ~3 s and
~220 MB), so the cgroup readers can be used by light tools such as
``tools/cgroup_run.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flexgraph.errors import FlexgraphError
from flexgraph.sizes import format_size, parse_size

GiB = 1024**3

# --- headroom ---------------------------------------------------------------------
#
# Measured on this machine (torch 2.13 CPU, transformers 5.23, Python 3.11):
#   python -c pass                                      RSS  11 MB
#   python -c "import torch"                            RSS 224 MB
#   python -c "import torch, transformers"              RSS 244 MB
#   ... + from transformers import the OPT/Llama models RSS 379 MB
# A running executor adds what the planner does not see: lazily imported modules,
# oneDNN / OpenMP scratch and thread stacks, asyncio and I/O-pool threads, glibc malloc
# arenas holding freed blocks (up to 8 per core), dirty page cache from disk-tier
# writes that a cgroup counts until written back.  The fixed part is therefore taken
# as ~2.5x the measured import footprint, 1 GiB; the parts that grow with the amount
# of memory being churned (fragmentation, dirty pages) as 10% of the host memory being
# budgeted; and the total is capped at 4 GiB because on a large host 10% would waste
# tens of GiB for slack that does not keep growing with RAM size.
HEADROOM_MIN = 1 * GiB
HEADROOM_FRACTION = 0.10
HEADROOM_MAX = 4 * GiB

# cgroup v1 spells "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB
# pages); anything this large is no limit.
_UNLIMITED = 2**62

DEVICES = ("cuda", "cpu")


def default_headroom(host_bytes: int) -> int:
    """Bytes to reserve for the process itself when ``host_bytes`` of host memory are
    budgeted: ``min(max(1 GiB, 10%), 4 GiB)`` (see the measurements above)."""
    return int(min(max(HEADROOM_MIN, HEADROOM_FRACTION * host_bytes), HEADROOM_MAX))


def default_offload_dir() -> str:
    """``$FLEXGRAPH_OFFLOAD_DIR``, else ``$XDG_CACHE_HOME/flexgraph/offload`` (``~/.cache``)."""
    if os.environ.get("FLEXGRAPH_OFFLOAD_DIR"):
        return os.environ["FLEXGRAPH_OFFLOAD_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "flexgraph", "offload")


# --- the record ----------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """Tier capacities (bytes) for planning.  ``gpu_mem is None``: no gpu tier."""

    device: str                      # "cuda" or "cpu": where compute runs
    gpu_mem: int | None              # None on the CPU unless simulated
    cpu_mem: int                     # host memory for tensors, net of headroom
    disk_mem: int                    # free bytes at offload_dir
    offload_dir: str
    headroom: int = 0                # host bytes kept for the process, on top of the tiers
    # (tier, where the number came from), for describe(); not used by the planner.
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise FlexgraphError(f"unknown device {self.device!r}; expected 'cuda' or 'cpu'")
        for name in ("gpu_mem", "cpu_mem", "disk_mem", "headroom"):
            v = getattr(self, name)
            if v is None and name == "gpu_mem":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FlexgraphError(f"hardware {name} must be a byte count >= 0 (got {v!r})")

    @property
    def gpu_simulated(self) -> bool:
        """True when the gpu tier is a budgeted region of host memory (CPU device)."""
        return self.device == "cpu" and self.gpu_mem is not None

    @property
    def host_bytes(self) -> int:
        """Host memory a run on this hardware needs: cpu tier + headroom (+ simulated gpu)."""
        return self.cpu_mem + self.headroom + (self.gpu_mem if self.gpu_simulated else 0)

    def source(self, tier: str) -> str:
        return dict(self.sources).get(tier, "")

    def describe(self) -> list[tuple[str, int | None, str]]:
        """Rows ``(tier, capacity bytes or None, source)`` for a summary table."""
        return [
            ("gpu", self.gpu_mem, self.source("gpu") or ("none" if self.gpu_mem is None else "")),
            ("cpu", self.cpu_mem, self.source("cpu")),
            ("disk", self.disk_mem, self.source("disk") or f"free at {self.offload_dir}"),
            ("headroom", self.headroom, self.source("headroom")),
        ]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = dict(self.sources)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any] | str) -> Hardware:
        """Inverse of ``to_json`` (also accepts the JSON text)."""
        if isinstance(d, str):
            try:
                d = json.loads(d)
            except json.JSONDecodeError as e:
                raise FlexgraphError(f"bad hardware JSON: {e}")
        if not isinstance(d, dict):
            raise FlexgraphError(f"bad hardware JSON: expected an object, got {type(d).__name__}")
        missing = [k for k in ("device", "cpu_mem", "disk_mem", "offload_dir") if k not in d]
        if missing:
            raise FlexgraphError(f"bad hardware JSON: missing {', '.join(missing)}")
        return cls(device=d["device"], gpu_mem=d.get("gpu_mem"), cpu_mem=d["cpu_mem"],
                   disk_mem=d["disk_mem"], offload_dir=d["offload_dir"],
                   headroom=d.get("headroom", 0),
                   sources=tuple(sorted((d.get("sources") or {}).items())))


# --- cgroups -------------------------------------------------------------------------

@dataclass(frozen=True)
class CgroupLocation:
    """Where this process's memory cgroup lives.  ``mount`` is the controller's mount
    point (v1: .../memory; v2: the unified root), ``path`` the cgroup's directory."""

    version: int
    mount: Path
    path: Path


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit on this process's cgroup or one of its ancestors."""

    version: int
    path: Path                       # the cgroup that holds the binding limit
    limit: int
    usage: int                       # as the kernel counts it: includes page cache
    reclaimable: int                 # inactive_file, which the kernel drops before OOM
    available: int                   # limit - (usage - reclaimable), >= 0


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    """An integer file; v2's ``max`` (and a missing file) give None."""
    text = _read_text(path)
    if text is None or text.strip() in ("", "max"):
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _read_stat(path: Path) -> dict[str, int]:
    stats: dict[str, int] = {}
    for line in (_read_text(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


def _own_cgroup_paths(root: Path) -> tuple[str | None, str | None]:
    """(v1 memory path, v2 path) of this process, from ``/proc/self/cgroup``."""
    v1 = v2 = None
    for line in (_read_text(root / "proc/self/cgroup") or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _under(mount: Path, cgpath: str) -> Path:
    """The directory of ``cgpath`` under ``mount``.  Inside a container the mount may
    be a subtree (or a cgroup namespace shows "/"), so when the full path does not
    exist, drop leading components until it does; the mount itself is the last resort."""
    parts = [p for p in cgpath.split("/") if p]
    for i in range(len(parts) + 1):
        candidate = mount.joinpath(*parts[i:])
        if candidate.is_dir():
            return candidate
    return mount


def find_memory_cgroup(root: str | os.PathLike = "/") -> CgroupLocation | None:
    """This process's memory cgroup, or None when no memory controller is mounted.

    v1 (a ``memory`` hierarchy at ``/sys/fs/cgroup/memory``) wins over v2 when both
    exist, because on hybrid systems the v2 tree then has no memory controller.  v2 is
    looked for at ``/sys/fs/cgroup`` (unified) and ``/sys/fs/cgroup/unified`` (hybrid)
    and counts only when its ``cgroup.controllers`` lists ``memory``.  ``root`` lets
    tests point at a fake tree.
    """
    root = Path(root)
    v1_path, v2_path = _own_cgroup_paths(root)
    v1_mount = root / "sys/fs/cgroup/memory"
    if v1_path is not None and (v1_mount / "memory.limit_in_bytes").exists():
        return CgroupLocation(1, v1_mount, _under(v1_mount, v1_path))
    for v2_mount in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
        controllers = (_read_text(v2_mount / "cgroup.controllers") or "").split()
        if v2_path is not None and "memory" in controllers:
            return CgroupLocation(2, v2_mount, _under(v2_mount, v2_path))
    return None


def _level_memory(version: int, d: Path) -> CgroupMemory | None:
    """The limit at one cgroup directory, or None when it has none."""
    if version == 1:
        limit = _read_int(d / "memory.limit_in_bytes")
        usage = _read_int(d / "memory.usage_in_bytes")
        stat = _read_stat(d / "memory.stat")
        # usage_in_bytes is hierarchical, so is total_inactive_file (inactive_file is
        # this level only); older kernels may lack the total_ form.
        reclaim = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    else:
        limits = [v for v in (_read_int(d / "memory.max"), _read_int(d / "memory.high"))
                  if v is not None]
        # memory.high does not kill but throttles hard: a plan should stay under it too.
        limit = min(limits) if limits else None
        usage = _read_int(d / "memory.current")
        reclaim = _read_stat(d / "memory.stat").get("inactive_file", 0)
    if limit is None or limit >= _UNLIMITED or usage is None:
        return None
    # "Available inside a limit": the limit minus the working set, where working set =
    # usage - inactive_file.  The cgroup's usage counts page cache; inactive file pages
    # are dropped before the OOM killer fires, so they are available.  Active file
    # pages are not counted as free: the kernel demotes them only gradually, and this
    # is the same definition of working set as the kubelet's and `docker stats`'.
    reclaim = min(max(reclaim, 0), usage)
    return CgroupMemory(version, d, limit, usage, reclaim, max(0, limit - (usage - reclaim)))


def read_cgroup_memory(root: str | os.PathLike = "/") -> CgroupMemory | None:
    """The binding memory limit on this process: of its memory cgroup and every
    ancestor up to the controller's mount, the one with the least available memory.
    None when there is no cgroup memory controller or no limit anywhere."""
    loc = find_memory_cgroup(root)
    if loc is None:
        return None
    best: CgroupMemory | None = None
    d = loc.path
    while True:
        level = _level_memory(loc.version, d)
        if level is not None and (best is None or level.available < best.available):
            best = level
        if d == loc.mount or loc.mount not in d.parents:
            return best
        d = d.parent


def read_mem_available(root: str | os.PathLike = "/") -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (psutil as a fallback)."""
    for line in (_read_text(Path(root) / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024        # the file says kB, meaning KiB
    import psutil                                     # kernels before 3.14; not in /proc
    return int(psutil.virtual_memory().available)


# --- the tiers -----------------------------------------------------------------------

def _log():
    from flexgraph.log import get_logger              # deferred: structlog setup is a side effect
    return get_logger(__name__)


def _size(value: int | str | None) -> int | None:
    return None if value is None else parse_size(value)


def _resolve_device(device: str | None) -> str:
    if device is not None and device not in DEVICES:
        raise FlexgraphError(f"unknown device {device!r}; expected 'cuda' or 'cpu'")
    if device == "cpu":
        return "cpu"                                  # no torch import needed
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise FlexgraphError("device 'cuda' requested but torch sees no CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu")
    return "cpu"


def _cuda_free_bytes() -> int:
    """Free memory on the current CUDA device.  What the caching allocator already holds
    (reserved but unused) counts as free to us, since our own tensors will reuse it."""
    import torch
    free, _total = torch.cuda.mem_get_info()
    return int(free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())


def available_host_memory(root: str | os.PathLike = "/") -> tuple[int, str]:
    """(bytes, how it was found): min of MemAvailable and the cgroup's availability."""
    meminfo = read_mem_available(root)
    cg = read_cgroup_memory(root)
    if cg is not None and cg.available < meminfo:
        return cg.available, (f"cgroup v{cg.version} {cg.path}: limit {format_size(cg.limit)}, "
                              f"working set {format_size(cg.usage - cg.reclaimable)}")
    return meminfo, "MemAvailable"


def prepare_offload_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if missing and prove it writable (as root ``os.access`` says yes
    to anything, so actually write a file).  One-line error naming the dir otherwise."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".flexgraph-probe-"):
            pass
    except OSError as e:
        raise FlexgraphError(f"offload dir {str(p)!r} is not writable ({e.strerror or e}); "
                             f"pass a writable directory, e.g. --offload-dir /var/tmp/flexgraph-offload")
    return p.resolve()


def _filesystem_type(path: Path, root: str | os.PathLike = "/") -> str | None:
    """The fs type of the longest mount point containing ``path`` (/proc/self/mounts)."""
    best, fstype = "", None
    for line in (_read_text(Path(root) / "proc/self/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mnt = fields[1].replace("\\040", " ")
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    return fstype


def _detect_gpu(device: str, gpu_mem: int | None) -> tuple[int | None, str]:
    if device == "cuda":
        free = _cuda_free_bytes()
        if gpu_mem is None:
            return free, "torch.cuda.mem_get_info (free)"
        if gpu_mem > free:
            _log().warning("gpu_mem_exceeds_free", gpu_mem=gpu_mem, free=free)
        return gpu_mem, "override"
    if gpu_mem is None:
        return None, "none: compute is on the cpu"
    return gpu_mem, "override, simulated in host memory"


def _detect_cpu(cpu_mem: int | None, sim_gpu: int, headroom: int | None,
                root: str | os.PathLike) -> tuple[int, int, str, str]:
    """(cpu tier, headroom, cpu source, headroom source)."""
    avail, how = available_host_memory(root)
    if cpu_mem is None:
        h = headroom if headroom is not None else default_headroom(avail)
        cpu = avail - h - sim_gpu
        if cpu <= 0:
            raise FlexgraphError(
                f"no host memory left for the cpu tier: {format_size(avail)} available ({how}) "
                f"minus headroom {format_size(h)}"
                + (f" and simulated gpu {format_size(sim_gpu)}" if sim_gpu else "")
                + "; lower --gpu-mem/--headroom or give --cpu-mem explicitly")
        src = f"{how}; {format_size(avail)} available - headroom" + (" - simulated gpu" if sim_gpu else "")
        basis = "available"
    else:
        # The user's number is the tier: no headroom or simulated gpu taken from it.
        cpu = cpu_mem
        h = headroom if headroom is not None else default_headroom(cpu_mem + sim_gpu)
        over = cpu_mem + sim_gpu + h > avail
        if over:
            _log().warning("host_memory_overcommitted", cpu_mem=cpu_mem, simulated_gpu=sim_gpu,
                           headroom=h, available=avail, available_source=how)
        src = "override" + (f" (with gpu and headroom exceeds {format_size(avail)} available)" if over else "")
        basis = "the tiers"
    hsrc = "override" if headroom is not None else f"default: 10% of {basis}, within [1 GiB, 4 GiB]"
    return cpu, h, src, hsrc


def _detect_disk(offload_dir: str | os.PathLike, disk_mem: int | None,
                 root: str | os.PathLike) -> tuple[Path, int, str]:
    path = prepare_offload_dir(offload_dir)
    free = shutil.disk_usage(path).free
    fstype = _filesystem_type(path, root)
    if fstype in ("tmpfs", "ramfs"):
        # A disk tier in RAM is no disk tier: it competes with the cpu tier (and a
        # cgroup counts it as shmem).  Allowed for tests, worth a warning.
        _log().warning("offload_dir_in_memory", offload_dir=str(path), fstype=fstype)
    if disk_mem is None:
        return path, free, f"free at {path}" + (f" ({fstype}: in RAM!)" if fstype in ("tmpfs", "ramfs") else "")
    if disk_mem > free:
        _log().warning("disk_mem_exceeds_free", disk_mem=disk_mem, free=free, offload_dir=str(path))
    return path, disk_mem, "override"


def detect_hardware(device: str | None = None, gpu_mem: int | str | None = None,
                    cpu_mem: int | str | None = None, disk_mem: int | str | None = None,
                    offload_dir: str | os.PathLike | None = None,
                    headroom: int | str | None = None, *,
                    root: str | os.PathLike = "/") -> Hardware:
    """Measure the tiers of this machine; any size given is used instead (``"16GiB"`` or
    bytes).  ``root`` relocates ``/proc`` and ``/sys`` for tests.  See the module doc
    for what each number means."""
    dev = _resolve_device(device)
    gpu, hdw = _size(gpu_mem), _size(headroom)
    gpu, gsrc = _detect_gpu(dev, gpu)
    sim_gpu = gpu if (dev == "cpu" and gpu is not None) else 0
    cpu, h, csrc, hsrc = _detect_cpu(_size(cpu_mem), sim_gpu, hdw, root)
    odir, disk, dsrc = _detect_disk(offload_dir or default_offload_dir(), _size(disk_mem), root)
    return Hardware(device=dev, gpu_mem=gpu, cpu_mem=cpu, disk_mem=disk, offload_dir=str(odir),
                    headroom=h, sources=(("cpu", csrc), ("disk", dsrc), ("gpu", gsrc), ("headroom", hsrc)))
