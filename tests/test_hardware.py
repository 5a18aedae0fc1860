"""Sizes, hardware detection (against fake /proc and /sys trees) and the cgroup runner.

The two ``run_capped`` tests create a real child memory cgroup; they skip, with the
reason, where that is impossible (not root, no memory controller, not writable).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexgraph.errors import FlexgraphError
from flexgraph.hardware import (
    Hardware, available_host_memory, default_headroom, detect_hardware, find_memory_cgroup,
    read_cgroup_memory,
)
from flexgraph.sizes import format_size, parse_size

GiB, MiB = 1024**3, 1024**2
REPO = Path(__file__).resolve().parents[1]
V1_UNLIMITED = "9223372036854771712"


def _load_cgroup_run():
    spec = importlib.util.spec_from_file_location("cgroup_run", REPO / "tools" / "cgroup_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cgroup_run"] = mod               # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


cgroup_run = _load_cgroup_run()


# --- sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * GiB), ("16G", 16 * GiB), ("16 gib", 16 * GiB), ("16Gi", 16 * GiB),
    ("512MB", 512_000_000), ("512MiB", 512 * MiB), ("512m", 512 * MiB),
    ("1.5TB", 1_500_000_000_000), ("1.5TiB", 3 * 1024**4 // 2), ("1048576", 1048576),
    (" 2k ", 2048), ("2KB", 2000), ("10B", 10), ("0", 0), (".5GiB", GiB // 2),
    ("0.3KiB", 307), (4096, 4096),
])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "-1", "1.2.3", "16GBs", "1e9", "16 XB", "GiB",
                                 "16 G iB", "nan", -5, True])
def test_parse_size_bad(bad):
    with pytest.raises(FlexgraphError) as e:
        parse_size(bad)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg and "e.g. '16GiB'" in msg


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1536, "1.50 KiB"), (3 * GiB // 2, "1.50 GiB"),
    (1024**4, "1.00 TiB"), (-2 * MiB, "-2.00 MiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


def test_default_headroom_bounds():
    assert default_headroom(2 * GiB) == GiB            # floor
    assert default_headroom(20 * GiB) == 2 * GiB       # 10%
    assert default_headroom(512 * GiB) == 4 * GiB      # cap


# --- fake /proc and /sys ---------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_root(tmp_path: Path, mem_available: int = 16 * GiB, proc_cgroup: str = "0::/\n") -> Path:
    root = tmp_path / "root"
    _write(root / "proc/meminfo", f"MemTotal: {32 * GiB // 1024} kB\nMemAvailable: {mem_available // 1024} kB\n")
    _write(root / "proc/self/cgroup", proc_cgroup)
    _write(root / "proc/self/mounts", "")
    return root


def _v1_group(d: Path, limit: int | str, usage: int, inactive_file: int = 0) -> None:
    _write(d / "memory.limit_in_bytes", f"{limit}\n")
    _write(d / "memory.usage_in_bytes", f"{usage}\n")
    _write(d / "memory.stat", f"cache 123\ninactive_file 1\ntotal_inactive_file {inactive_file}\n")


def _v1_tree(tmp_path: Path, **kw) -> Path:
    """v1 memory hierarchy with /a (limit 6 GiB, 3 GiB used) and /a/b (4 GiB, 3 GiB used
    of which 1 GiB inactive page cache), plus a hybrid unified mount without memory."""
    root = _fake_root(tmp_path, proc_cgroup="5:cpu,cpuacct:/a/b\n4:memory:/a/b\n0::/a/b\n", **kw)
    mem = root / "sys/fs/cgroup/memory"
    _v1_group(mem, V1_UNLIMITED, 10 * GiB)
    _v1_group(mem / "a", 6 * GiB, 3 * GiB)
    _v1_group(mem / "a/b", 4 * GiB, 3 * GiB, inactive_file=GiB)
    _write(root / "sys/fs/cgroup/unified/cgroup.controllers", "")
    return root


def test_cgroup_v1_reads_tightest_level(tmp_path):
    root = _v1_tree(tmp_path)
    loc = find_memory_cgroup(root)
    assert (loc.version, loc.path) == (1, root / "sys/fs/cgroup/memory/a/b")
    cg = read_cgroup_memory(root)
    # b: 4 - (3 - 1) = 2 GiB beats a: 6 - 3 = 3 GiB; page cache counts as reclaimable.
    assert (cg.path.name, cg.limit, cg.reclaimable, cg.available) == ("b", 4 * GiB, GiB, 2 * GiB)


def test_cgroup_v1_ancestor_can_bind(tmp_path):
    root = _v1_tree(tmp_path)
    _v1_group(root / "sys/fs/cgroup/memory/a", 6 * GiB, 5 * GiB + GiB // 2)
    cg = read_cgroup_memory(root)
    assert (cg.path.name, cg.available) == ("a", GiB // 2)


def test_cgroup_v1_unlimited_is_none(tmp_path):
    root = _v1_tree(tmp_path)
    _v1_group(root / "sys/fs/cgroup/memory/a", V1_UNLIMITED, GiB)
    _v1_group(root / "sys/fs/cgroup/memory/a/b", V1_UNLIMITED, GiB)
    assert read_cgroup_memory(root) is None


def test_cgroup_v1_container_path_falls_back_to_mount(tmp_path):
    # Inside a container /proc/self/cgroup names a path that the mounted subtree lacks.
    root = _fake_root(tmp_path, proc_cgroup="4:memory:/docker/abc123\n")
    _v1_group(root / "sys/fs/cgroup/memory", 2 * GiB, GiB)
    assert find_memory_cgroup(root).path == root / "sys/fs/cgroup/memory"
    assert read_cgroup_memory(root).available == GiB


def _v2_tree(tmp_path: Path, **kw) -> Path:
    root = _fake_root(tmp_path, proc_cgroup="0::/user.slice/job\n", **kw)
    cg = root / "sys/fs/cgroup"
    _write(cg / "cgroup.controllers", "cpuset cpu io memory pids\n")
    _write(cg / "user.slice/memory.max", "max\n")
    _write(cg / "user.slice/memory.current", f"{2 * GiB}\n")
    _write(cg / "user.slice/job/memory.max", f"{4 * GiB}\n")
    _write(cg / "user.slice/job/memory.high", "max\n")
    _write(cg / "user.slice/job/memory.current", f"{GiB}\n")
    _write(cg / "user.slice/job/memory.stat", f"anon 1\nfile 2\ninactive_file {512 * MiB}\n")
    return root


def test_cgroup_v2_reads_limit(tmp_path):
    root = _v2_tree(tmp_path)
    assert find_memory_cgroup(root).version == 2
    cg = read_cgroup_memory(root)
    assert (cg.version, cg.path.name, cg.limit) == (2, "job", 4 * GiB)
    assert cg.available == 4 * GiB - (GiB - 512 * MiB)


def test_cgroup_v2_memory_high_counts(tmp_path):
    root = _v2_tree(tmp_path)
    _write(root / "sys/fs/cgroup/user.slice/job/memory.high", f"{2 * GiB}\n")
    assert read_cgroup_memory(root).limit == 2 * GiB


def test_cgroup_v2_without_memory_controller(tmp_path):
    root = _v2_tree(tmp_path)
    _write(root / "sys/fs/cgroup/cgroup.controllers", "cpu io pids\n")
    assert find_memory_cgroup(root) is None and read_cgroup_memory(root) is None


def test_available_host_memory_takes_the_minimum(tmp_path):
    root = _v1_tree(tmp_path, mem_available=16 * GiB)
    avail, how = available_host_memory(root)
    assert avail == 2 * GiB and how.startswith("cgroup v1")
    root2 = _v1_tree(tmp_path / "x", mem_available=GiB)
    assert available_host_memory(root2) == (GiB, "MemAvailable")


# --- detect_hardware ---------------------------------------------------------------------

def test_detect_cpu_tier_from_meminfo(tmp_path):
    root = _fake_root(tmp_path, mem_available=16 * GiB)
    hw = detect_hardware(device="cpu", offload_dir=tmp_path / "off", root=root)
    assert hw.device == "cpu" and hw.gpu_mem is None and not hw.gpu_simulated
    assert hw.headroom == default_headroom(16 * GiB)
    assert hw.cpu_mem == 16 * GiB - hw.headroom
    assert hw.host_bytes == 16 * GiB
    assert (tmp_path / "off").is_dir() and hw.disk_mem > 0


def test_detect_with_overrides(tmp_path):
    root = _fake_root(tmp_path, mem_available=16 * GiB)
    hw = detect_hardware(device="cpu", cpu_mem="8GiB", disk_mem="100GiB",
                         offload_dir=tmp_path / "new" / "off", root=root)
    # An override is the tier itself: headroom is reserved on top, not taken from it.
    assert (hw.cpu_mem, hw.disk_mem, hw.headroom) == (8 * GiB, 100 * GiB, GiB)
    assert hw.source("cpu") == "override" and hw.source("disk") == "override"
    assert Hardware.from_json(hw.to_json()) == hw
    assert Hardware.from_json(json.dumps(hw.to_json())).sources == hw.sources
    hw2 = detect_hardware(device="cpu", headroom="3GiB", offload_dir=tmp_path / "off", root=root)
    assert (hw2.headroom, hw2.cpu_mem) == (3 * GiB, 13 * GiB)


def test_overrides_beyond_machine_are_allowed_with_a_note(tmp_path):
    root = _fake_root(tmp_path, mem_available=4 * GiB)
    hw = detect_hardware(device="cpu", cpu_mem="64GiB", offload_dir=tmp_path / "off", root=root)
    assert hw.cpu_mem == 64 * GiB and "exceeds" in hw.source("cpu")


def test_simulated_gpu_tier_comes_out_of_cpu(tmp_path):
    root = _fake_root(tmp_path, mem_available=16 * GiB)
    plain = detect_hardware(device="cpu", offload_dir=tmp_path / "off", root=root)
    sim = detect_hardware(device="cpu", gpu_mem="4GiB", offload_dir=tmp_path / "off", root=root)
    assert sim.gpu_simulated and sim.gpu_mem == 4 * GiB
    assert sim.cpu_mem == plain.cpu_mem - 4 * GiB
    assert sim.host_bytes == 16 * GiB
    with pytest.raises(FlexgraphError, match="no host memory left for the cpu tier"):
        detect_hardware(device="cpu", gpu_mem="15GiB", offload_dir=tmp_path / "off", root=root)


def test_detect_honours_cgroup(tmp_path):
    root = _v1_tree(tmp_path, mem_available=16 * GiB)
    hw = detect_hardware(device="cpu", offload_dir=tmp_path / "off", root=root)
    assert hw.cpu_mem == 2 * GiB - GiB and "cgroup v1" in hw.source("cpu")


@pytest.mark.parametrize("bad_dir", ["/dev/null/x", "/proc/flexgraph-offload"])
def test_unwritable_offload_dir(tmp_path, bad_dir):
    # Root ignores permission bits, so use paths that fail for root too: below a
    # character device, and in procfs.
    with pytest.raises(FlexgraphError) as e:
        detect_hardware(device="cpu", cpu_mem="1GiB", offload_dir=bad_dir, root=_fake_root(tmp_path))
    assert bad_dir in str(e.value) and "not writable" in str(e.value) and "\n" not in str(e.value)


def test_device_choice(tmp_path):
    import torch
    root = _fake_root(tmp_path)
    with pytest.raises(FlexgraphError, match="unknown device 'tpu'"):
        detect_hardware(device="tpu", root=root)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the no-CUDA error cannot be provoked")
    assert detect_hardware(offload_dir=tmp_path / "off", root=root).device == "cpu"
    with pytest.raises(FlexgraphError, match="device 'cuda' requested"):
        detect_hardware(device="cuda", offload_dir=tmp_path / "off", root=root)


def test_describe_and_json_validation(tmp_path):
    hw = Hardware("cpu", None, 8 * GiB, 100 * GiB, "/tmp/x", GiB, (("cpu", "override"),))
    rows = hw.describe()
    assert [r[0] for r in rows] == ["gpu", "cpu", "disk", "headroom"]
    assert rows[0][1] is None and rows[1] == ("cpu", 8 * GiB, "override")
    with pytest.raises(FlexgraphError, match="missing"):
        Hardware.from_json({"device": "cpu"})
    with pytest.raises(FlexgraphError, match="cpu_mem"):
        Hardware.from_json({**hw.to_json(), "cpu_mem": -1})
    with pytest.raises(FlexgraphError, match="bad hardware JSON"):
        Hardware.from_json("{not json")


# --- real cgroups --------------------------------------------------------------------------

_NO_CGROUPS = cgroup_run.cgroup_problem()
needs_cgroups = pytest.mark.skipif(_NO_CGROUPS is not None, reason=f"cgroups unusable: {_NO_CGROUPS}")

# Writes every page (b"x" * n is a memset), unlike bytearray(n), whose zero pages may
# never be touched and so never charged.
_ALLOC_300MB = "b = b'x' * (300 * 2**20); print(len(b))"


@needs_cgroups
def test_run_capped_oom_kills_over_cap():
    r = cgroup_run.run_capped([sys.executable, "-c", _ALLOC_300MB], 200 * MiB,
                              drop_caches=False, capture_output=True)
    assert r.oom_killed and r.returncode == -9 and r.stdout == b""
    assert r.peak_bytes is not None and r.peak_bytes <= 200 * MiB
    assert r.cgroup and not os.path.exists(r.cgroup)


@needs_cgroups
def test_run_capped_succeeds_under_cap():
    r = cgroup_run.run_capped([sys.executable, "-c", _ALLOC_300MB], "1GiB",
                              drop_caches=False, capture_output=True)
    assert r.returncode == 0 and not r.oom_killed and r.stdout.strip() == str(300 * 2**20).encode()
    assert 250 * MiB < r.peak_bytes <= GiB and r.limit_bytes == GiB
    assert not os.path.exists(r.cgroup)


@needs_cgroups
def test_cgroup_run_cli_exit_status_and_json():
    p = subprocess.run([sys.executable, str(REPO / "tools/cgroup_run.py"), "--mem", "256MiB",
                        "--no-drop-caches", "--json", "--", sys.executable, "-c", "raise SystemExit(3)"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
    summary = json.loads(p.stderr.strip().splitlines()[-1])
    assert summary["returncode"] == 3 and summary["oom_killed"] is False
    assert summary["limit_bytes"] == 256 * MiB and not os.path.exists(summary["cgroup"])


def test_cgroup_run_cli_usage_errors():
    tool = [sys.executable, str(REPO / "tools/cgroup_run.py")]
    p = subprocess.run(tool + ["--mem", "lots", "--", "true"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 125 and "bad size 'lots'" in p.stderr
    p = subprocess.run(tool + ["--mem", "1GiB"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 125 and "no command given" in p.stderr
