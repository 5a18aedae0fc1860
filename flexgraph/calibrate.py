"""Calibration: this machine's rates, measured in seconds and cached per machine.

What is measured (for one working dtype and device):

- **bandwidth** of every tier pair, each direction: gpu<->cpu (pinned copies on CUDA;
  plain copies between host buffers for a simulated gpu tier), disk->gpu/cpu (reads of
  a file whose pages were dropped from the page cache, in the executor's chunked
  parallel way), gpu/cpu->disk (writes);
- **memory bandwidth** of the compute device (reads + writes of a large copy): what
  decode attention and element-wise work are bound by;
- **matmul throughput** ``rate(M, K, N)`` in FLOP/s, measured on demand for the shapes a
  model has (``K``, ``N`` capped at 4096 — beyond that the rate no longer changes much,
  and a 12288-wide matrix would take too long to time) at ``M`` = 1 .. 16384 and
  interpolated in log space;
- **attention throughput** of :func:`flexgraph.models.layers.attend` for prefill
  (FLOP/s, counting masked keys too) by query length;
- **per-node overhead** of the executor's lanes (submission to completion of an empty
  item), which bounds how small a node can usefully be;
- **the model's own layers** (:func:`measure_layers`): each layer kind's real maths —
  eager or compiled, as the run will use — timed at ``LAYER_POINTS`` (decode batches of
  1, 16 and 256 sequences, attention's over 512 and over 128 cached tokens; prefills
  of 1, 16 and 64 sequences of 512 tokens) with its weights and cache streamed from
  memory; the ratio to the analytic time corrects the
  cost model, prefill and decode apart (element-wise chains and memory-bound products
  are not what FLOP/s predict); on a CPU measured again, when a plan first needs it,
  under the allocator a tight run uses (:func:`measure_layers_tight`);
- **4-bit decoding** (:func:`measure_dequant`), when a plan compresses weights or cache;
- **converting from a storage dtype** (:func:`measure_cast`), when a plan may keep
  weights and cache narrower than it computes;
- **what disk reads cost the compute** on a CPU (:func:`measure_io_cpu`): the compute
  seconds lost per byte read meanwhile, and the rate the disk reads at while the
  compute runs (the estimate's disk rate; the roofline keeps the idle one).

The disk's rates are dated and measured again when a plan is made more than
``DISK_MAX_AGE_SECONDS`` after them (:func:`refresh_disk`): on a shared VM they swing
2x within hours, the compute rates by 10-15%.

The cache lives in ``$FLEXGRAPH_CACHE/calibration/<machine>.json``; the machine key is
the CPU model, core count, RAM, device and torch version.  ``--recalibrate`` redoes it.
Each measurement repeats until it has run for a minimum time and keeps the best of a
few repeats (this is a shared machine: the best is the least disturbed) — except the
layer timings, which keep the median of rounds interleaved over half a minute (their
best-of-two swung 2-3x between calibrations, five rounds back to back 0.88-1.22x; see
:func:`measure_layers`), and the disk's reads, which are all bytes over all the time of
3 s of reads (:func:`measure_disk`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flexgraph.fileio import write_json_atomic
from flexgraph.log import get_logger
from flexgraph.models.layers import dense_linear

log = get_logger(__name__)
VERSION = 6          # bump when what is measured changes (5: unfused KV cache decode, median disk read;
                     # 6: products of few rows as the layers compute them, layers.dense_linear)
M_POINTS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
MAX_KN = 4096


def _sync() -> None:
    """Wait for queued CUDA kernels: a call on CUDA returns once its kernels are queued,
    and a timing that did not wait would time the queueing."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_round(fn: Callable[[], object], min_seconds: float) -> float:
    """Seconds per call of ``fn``, called until ``min_seconds`` have passed."""
    _sync()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - start >= min_seconds:
            break
    _sync()                     # once at the end: calls queue back to back, as a stream runs them
    return (time.perf_counter() - start) / n


def _round_times(fn: Callable[[], object], rounds: int, min_seconds: float) -> list[float]:
    """Seconds per call of ``rounds`` rounds (after one warm-up call), each long enough to time."""
    fn()
    return [time_round(fn, min_seconds) for _ in range(rounds)]


def _best_time(fn: Callable[[], object], min_seconds: float = 0.15, repeats: int = 3) -> float:
    """Seconds per call: the best of ``repeats`` rounds."""
    return min(_round_times(fn, repeats, min_seconds))


def machine_key(device: str) -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    gpu = torch.cuda.get_device_name() if device == "cuda" else ""
    text = f"{cpu}|{os.cpu_count()}|{ram >> 30}|{gpu}|{torch.__version__}|{platform.machine()}|{VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Calibration:
    device: str
    dtype: str
    bandwidth: dict[str, float] = field(default_factory=dict)       # "src->dst" -> bytes/s
    mem_bandwidth: float = 0.0                                      # bytes/s on the compute device
    matmul: dict[str, list[list[float]]] = field(default_factory=dict)  # "KxN" -> [[M, FLOP/s], ...]
    attention: list[list[float]] = field(default_factory=list)      # [[q rows per chunk, FLOP/s], ...]
    node_overhead: float = 0.0                                      # seconds per executor node
    layers: dict[str, dict] = field(default_factory=dict)           # layer_signature -> corrections
    dequant: float = 0.0            # dense bytes/s out of 4-bit group-wise decoding (0: not measured)
    dequant_cache: float = 0.0      # the same for a KV cache's layout (groups along the head dim)
    quant_cache: float = 0.0        # dense bytes/s into a KV cache's 4-bit layout (encoding)
    io_cpu: float = 0.0             # compute seconds lost per byte read from disk meanwhile (CPU device)
    disk_read_busy: float = 0.0     # bytes/s the pool reads from disk while a product runs (CPU; 0: not measured)
    cast: dict[str, float] = field(default_factory=dict)   # storage dtype -> working-dtype bytes/s converted
    measured_at: str = ""
    disk_measured_at: float = 0.0   # time.time() of the disk rates above (0: before they were dated)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    # ---- queries ------------------------------------------------------------------------------
    def bw(self, src: str, dst: str) -> float:
        return self.bandwidth[f"{src}->{dst}"]

    def matmul_rate(self, m: int, k: int, n: int) -> float:
        """FLOP/s of an [m, k] x [k, n] product (interpolated in log M)."""
        table = self.matmul.get(_kn_key(k, n))
        if table is None:
            raise KeyError(f"no matmul calibration for {_kn_key(k, n)}; call ensure_matmul first")
        return _interp(table, m)

    def attention_rate(self, q_rows: int) -> float:
        return _interp(self.attention, q_rows)


def _kn_key(k: int, n: int) -> str:
    return f"{min(k, MAX_KN)}x{min(n, MAX_KN)}"


def _interp(table: list[list[float]], x: float) -> float:
    """Piecewise-linear in log x; flat beyond the ends."""
    if x <= table[0][0]:
        return table[0][1]
    for (x0, y0), (x1, y1) in zip(table, table[1:]):
        if x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return table[-1][1]


# ---- measurements ------------------------------------------------------------------------------
def measure_matmul(k: int, n: int, dtype: torch.dtype, device: torch.device) -> list[list[float]]:
    k, n = min(k, MAX_KN), min(n, MAX_KN)
    w = torch.randn(n, k, dtype=dtype, device=device)
    out = []
    for m in M_POINTS:
        x = torch.randn(m, k, dtype=dtype, device=device)
        t = _best_time(lambda: dense_linear(x, w, None), min_seconds=0.1 if m < 4096 else 0.3)
        out.append([m, 2.0 * m * k * n / t])
    return out


def measure_attention(dtype: torch.dtype, device: torch.device, head_dim: int = 64) -> list[list[float]]:
    """FLOP/s of prefill attention (:func:`flexgraph.models.layers.attend`) by query length."""
    from flexgraph.models.layers import Mask, attend
    out = []
    for q_len in (64, 512, 2048):
        batch, heads, kv_heads = 4, 8, 2
        q = torch.randn(batch, heads, q_len, head_dim, dtype=dtype, device=device)
        k = torch.randn(batch, kv_heads, q_len, head_dim, dtype=dtype, device=device)
        t = _best_time(lambda: attend(q, k, k, Mask(causal=True), 0.125))
        out.append([q_len, 4.0 * batch * heads * q_len * q_len * head_dim / t])
    return out


def measure_mem_bandwidth(device: torch.device) -> float:
    # 512 MiB: far more than any cache (this machine's L3 is 105 MiB; 64 MiB measured L3)
    a = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = _best_time(lambda: b.copy_(a))
    return 2 * a.numel() / t


def measure_copy(src: torch.Tensor, dst: torch.Tensor) -> float:
    def run():
        dst.copy_(src, non_blocking=True)
        if dst.is_cuda or src.is_cuda:
            torch.cuda.synchronize()
    return src.numel() * src.element_size() / _best_time(run)


@contextmanager
def _probe_file(folder: Path):
    """``(pool, path)``: the executor's disk pool and a fresh file in ``folder``, both
    closed and removed afterwards."""
    from flexgraph.exec.diskio import DiskIO
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="calibrate-", delete=False) as f:
        path = Path(f.name)
    io = DiskIO()
    try:
        yield io, path
    finally:
        io.close()
        path.unlink(missing_ok=True)


DISK_READ_ROUNDS = 3
# Reads are timed for this long in all, and the rate is bytes over seconds.  This VM's
# disk serves one 256 MiB read at anything from 0.8 to 2.9 GB/s, at random: 34 reads in
# 6 s gave 1.44 GB/s in all, where the median of three reads (the rate used to be that)
# came out 1.2-3.0 from one probe to the next, and the runs read at 1.0-1.2.  A slow
# read takes longer, so only the time-weighted rate says how long a run's reads take.
# The probe file, just written, often reads up to 2x faster than a run's cold weight
# store (2.6 GB/s at 13:20, the (c) run after it 1.0).  Reading the store instead was
# tried on 12-07 and left out: it read 1.2-2.5 GB/s minute to minute, (b)'s estimate
# went from -7% to +12% with it, and in the run the weight and cache lanes read at once
# (1.37 GB/s together) — see the README's disk bullet.
DISK_READ_SECONDS = 3.0


def measure_disk(folder: Path, nbytes: int = 256 << 20, seconds: float | None = None) -> tuple[float, float]:
    """(read, write) bytes/s of the executor's disk pool on ``folder``, reads cold: the
    file read again and again, its pages dropped each time, for ``DISK_READ_SECONDS``."""
    seconds = DISK_READ_SECONDS if seconds is None else seconds
    buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    with _probe_file(folder) as (io, path):
        start = time.perf_counter()
        io.write_from(path, 0, buf)
        fd = io.fd(path)
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - start)
        start, rounds = time.perf_counter(), 0
        while rounds < DISK_READ_ROUNDS or time.perf_counter() - start < seconds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)      # read from the disk, not the cache
            io.read_into(path, 0, buf)
            rounds += 1
        return rounds * nbytes / (time.perf_counter() - start), write


IO_PROBE_SECONDS = 1.5
IO_PROBE_ROUNDS = 3


def measure_io_cpu(folder: Path, dtype: torch.dtype, nbytes: int = 256 << 20) -> tuple[float, float]:
    """Compute seconds lost per byte read from disk at the same time, on the CPU, and the
    bytes per second the disk was read at meanwhile.

    Reading from disk costs CPU (on this 2-core VM a decode-sized product ran at 0.44x
    its rate while the pool read at full speed, and the reads at 0.55x theirs), so a
    CPU run that overlaps loads with compute does not get both for free.  Timed as a
    product's rate alone and while the executor's pool reads a cold file in a loop:
    (compute lost) / (bytes read), and (bytes read) / (time).  OPT-1.3B's disk-bound
    runs here read at ~1.0 GB/s on average against 2.3 calibrated idle, and their
    estimates came out 30% fast.
    """
    import threading

    from flexgraph.exec.diskio import aligned_empty
    x, w = torch.randn(32, 2048, dtype=dtype), torch.randn(8192, 2048, dtype=dtype)
    buf = aligned_empty((nbytes,), torch.uint8)
    stop, read = threading.Event(), [0]

    def rate() -> float:          # products per second for IO_PROBE_SECONDS
        torch.nn.functional.linear(x, w)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < IO_PROBE_SECONDS:
            torch.nn.functional.linear(x, w)
            n += 1
        return n / (time.perf_counter() - start)

    def reader(io, path: Path) -> None:
        fd = io.fd(path)
        while not stop.is_set():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            io.read_into(path, 0, buf)
            read[0] += nbytes

    def one_round(io, path: Path) -> float:
        alone = rate()
        stop.clear()
        read[0] = 0
        thread = threading.Thread(target=reader, args=(io, path), name="flexgraph-calibrate-io")
        thread.start()
        try:
            start = time.perf_counter()
            shared = rate()
            elapsed = time.perf_counter() - start
        finally:
            stop.set()
            thread.join()
        lost = max(0.0, 1.0 - shared / alone) * elapsed
        return (lost / read[0] if read[0] else 0.0), read[0] / elapsed

    with _probe_file(folder) as (io, path):
        io.write_from(path, 0, buf)
        os.fsync(io.fd(path))
        rounds = [one_round(io, path) for _ in range(IO_PROBE_ROUNDS)]
    # medians: one round in 4 read 2x
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)


def measure_node_overhead() -> float:
    from flexgraph.exec.lanes import Lane
    lane = Lane("calibrate")
    try:
        def one():
            lane.submit(lambda: None, [], "noop").wait()
        return _best_time(one, min_seconds=0.1)
    finally:
        lane.stop()


def calibrate(device: str, dtype: torch.dtype, offload_dir: str, has_gpu_tier: bool) -> Calibration:
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    name = str(dtype).split(".")[-1]
    log.info("calibrating", device=device, dtype=name)
    cal = Calibration(device=device, dtype=name, measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    cal.mem_bandwidth = measure_mem_bandwidth(dev)
    host = torch.empty(128 << 20, dtype=torch.uint8, pin_memory=device == "cuda")
    if has_gpu_tier:
        gpu = torch.empty_like(host, device=dev)
        cal.bandwidth["cpu->gpu"] = measure_copy(host, gpu)
        cal.bandwidth["gpu->cpu"] = measure_copy(gpu, host)
    cal.attention = measure_attention(dtype, dev)
    cal.node_overhead = measure_node_overhead()
    measure_disk_rates(cal, dtype, Path(offload_dir), has_gpu_tier)
    return cal


def measure_disk_rates(cal: Calibration, dtype: torch.dtype, folder: Path, has_gpu_tier: bool) -> None:
    """The disk's rates into ``cal``: idle reads and writes, and on a CPU the reads under
    compute and what they cost it; dated, so that :func:`refresh_disk` can tell their age."""
    read, write = measure_disk(folder)
    cal.bandwidth["disk->cpu"] = read
    cal.bandwidth["cpu->disk"] = write
    if has_gpu_tier:
        # disk -> gpu goes through host memory on CUDA; straight into host memory when simulated
        via_host = 1 / (1 / read + 1 / cal.bandwidth["cpu->gpu"]) if cal.device == "cuda" else read
        cal.bandwidth["disk->gpu"] = via_host
        cal.bandwidth["gpu->disk"] = (1 / (1 / write + 1 / cal.bandwidth["gpu->cpu"]) if cal.device == "cuda"
                                      else write)
    if cal.device == "cpu":
        cal.io_cpu, cal.disk_read_busy = measure_io_cpu(folder, dtype)
    cal.disk_measured_at = time.time()


# A shared VM's disk does not keep its rate: this one's pool read 2.9 GB/s at 09:33 and
# 1.2-1.9 GB/s at 12:03 the same day, and the 11:26 run read at 1.2 against the morning's
# 2.9 (its estimate -10%, its plan picked on the fast rate), and at 12:23 read 3.0 again.
# The compute rates drift too, but by 10-15% (the layer timings' medians absorb that).
DISK_MAX_AGE_SECONDS = 20 * 60


def refresh_disk(cal: Calibration, dtype: torch.dtype, offload_dir: str, has_gpu_tier: bool,
                 now: float | None = None) -> bool:
    """Measure the disk's rates again (~5-10 s) where they are older than
    ``DISK_MAX_AGE_SECONDS`` — a plan is then costed at the rate the disk has now.
    Returns whether it measured."""
    now = time.time() if now is None else now
    age = now - cal.disk_measured_at
    if cal.disk_measured_at > 0 and 0 <= age <= DISK_MAX_AGE_SECONDS:
        return False
    before = cal.bandwidth.get("disk->cpu", 0.0), cal.disk_read_busy
    log.info("calibrating_disk", age_minutes=round(age / 60) if cal.disk_measured_at else None)
    _in_thread(measure_disk_rates, cal, dtype, Path(offload_dir), has_gpu_tier)
    log.info("disk_rates", read_gbps=round(cal.bandwidth["disk->cpu"] / 1e9, 2),
             read_busy_gbps=round(cal.disk_read_busy / 1e9, 2),
             before_gbps=[round(b / 1e9, 2) for b in before])
    save_calibration(cal, calibration_path(cal.device, cal.dtype, has_gpu_tier))
    return True


# ---- which dtype a CPU computes in --------------------------------------------------------------
# One product of a decode-to-prefill size, timed in both dtypes.  bfloat16 halves every
# byte moved, so it is the choice unless this CPU multiplies it much slower: with AMX it
# ran ~5x faster than float32; on an AVX2-only CPU (no native bfloat16) 0.14-0.16x.
DTYPE_PROBE = (256, 1024, 1024)         # M, K, N
BF16_MIN_SPEED = 0.5                    # bfloat16 if at least this fraction of float32's rate


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    rates: dict[str, float]             # dtype -> FLOP/s of the probe product

    @property
    def bf16_speed(self) -> float:
        return self.rates["bfloat16"] / self.rates["float32"]

    def note(self) -> str:
        return (f"dtype {self.dtype}: bfloat16 matmuls run at {self.bf16_speed:.2f}x float32's rate on this CPU "
                f"(bfloat16 when at least {BF16_MIN_SPEED}x; --dtype to choose)")


def measure_cpu_dtype_rates() -> dict[str, float]:
    m, k, n = DTYPE_PROBE
    rates = {}
    for name in ("float32", "bfloat16"):
        dt = getattr(torch, name)
        x, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)
        rates[name] = 2.0 * m * k * n / _best_time(lambda: torch.nn.functional.linear(x, w), min_seconds=0.05)
    return rates


def choose_cpu_dtype(rates: dict[str, float]) -> DtypeChoice:
    fast = rates["bfloat16"] >= BF16_MIN_SPEED * rates["float32"]
    return DtypeChoice("bfloat16" if fast else "float32", rates)


def cpu_dtype_choice(recalibrate: bool = False) -> DtypeChoice:
    """The CPU's working dtype, from rates measured once per machine (cached beside the
    calibration)."""
    from flexgraph.weights.cache import cache_root
    path = cache_root() / "calibration" / f"{machine_key('cpu')}-dtype.json"
    rates = None
    if not recalibrate:
        try:
            rates = {k: float(v) for k, v in json.loads(path.read_text())["rates"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
    if rates is not None and set(rates) == {"float32", "bfloat16"}:
        return choose_cpu_dtype(rates)
    rates = measure_cpu_dtype_rates()
    try:
        write_json_atomic(path, {"rates": rates, "probe": list(DTYPE_PROBE)})
    except OSError as e:
        log.warning("calibration_not_saved", path=str(path), error=str(e))
    choice = choose_cpu_dtype(rates)
    log.info("cpu_dtype_measured", dtype=choice.dtype, bf16_speed=round(choice.bf16_speed, 2))
    return choice


# ---- cache --------------------------------------------------------------------------------------
def calibration_path(device: str, dtype: str, has_gpu_tier: bool) -> Path:
    from flexgraph.weights.cache import cache_root
    tiers = "3tier" if has_gpu_tier else "2tier"
    return cache_root() / "calibration" / f"{machine_key(device)}-{dtype}-{tiers}.json"


def load_calibration(device: str, dtype: torch.dtype, offload_dir: str, has_gpu_tier: bool,
                     recalibrate: bool = False) -> Calibration:
    name = str(dtype).split(".")[-1]
    path = calibration_path(device, name, has_gpu_tier)
    if not recalibrate:
        try:
            return Calibration.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    cal = calibrate(device, dtype, offload_dir, has_gpu_tier)
    save_calibration(cal, path)
    return cal


def save_calibration(cal: Calibration, path: Path) -> None:
    try:
        write_json_atomic(path, cal.to_json())
    except OSError as e:
        log.warning("calibration_not_saved", path=str(path), error=str(e))


def ensure_matmul(cal: Calibration, shapes: set[tuple[int, int]], dtype: torch.dtype, has_gpu_tier: bool) -> bool:
    """Measure the (K, N) shapes not yet in ``cal``; returns whether anything was added."""
    dev = torch.device("cuda" if cal.device == "cuda" else "cpu")
    added = False
    for k, n in sorted(shapes):
        key = _kn_key(k, n)
        if key not in cal.matmul:
            log.info("calibrating_matmul", shape=key)
            cal.matmul[key] = measure_matmul(k, n, dtype, dev)
            added = True
    if added:
        save_calibration(cal, calibration_path(cal.device, cal.dtype, has_gpu_tier))
    return added


# ---- the model's own layers ----------------------------------------------------------------------
# (batch, new tokens, context) at which each layer kind is timed.  Decode is timed at
# 1, 16 and 256 sequences: per token, a small batch measured 3-4x its analytic time here
# against ~1.3x for a large one (fixed per-kernel costs no rate of big matmuls predicts),
# and the search must see that to weigh small GPU batches (fast prefill) against large
# ones (cheap decode).  Prefill is timed at 512, 8k and 32k tokens: the search picks GPU
# batches of 64-256 sequences where the model is small (a prefill node of 32k-131k
# tokens), and extrapolating from 8k alone put those 0.55-1.5x off (its ratio moved
# that much between calibrations); the largest point is skipped where its analytic time
# exceeds LARGE_POINT_SECONDS (a big model's layer would take many seconds a call).
# Prefill and decode are corrected apart (:func:`correction_key`): one table by tokens
# had a 4 x 512 prefill's attention between a 256-sequence decode's ratio (3.2) and a
# 16 x 512 prefill's (1.2), and SmolLM2's prefill attention at 1-4 sequences came out
# 1.4-2.1x its measured time.
# Decode attention is timed at a short context as well (its own tables, "decode attn
# @128"), and a step's time is the line through the two: the part that grows with the
# context (attention over the cache) runs further above its analytic time than the
# projections do (OPT-6.7B's decode attention layer: 4.7x its analytic time at 512
# tokens, 2.2x at 128), so scaling the 512-token time by the analytic ratio put OPT-6.7B's
# and Llama-3.1-8B's decode attention at 128-143 tokens at 1.7-2.0x the measured time
# (12-07).  The other kinds do not read the cache and are timed at TIMED_CONTEXT only.
TIMED_CONTEXT = 512               # the cached tokens a timed decode step reads (and a timed prefill's length)
SHORT_CONTEXT = 128               # ... and the cached tokens of decode attention's second set of points
LAYER_POINTS = {"decode-tiny": (1, 1, TIMED_CONTEXT), "decode-small": (16, 1, TIMED_CONTEXT),
                "decode": (256, 1, TIMED_CONTEXT), "prefill-small": (1, 512, TIMED_CONTEXT),
                "prefill": (16, 512, TIMED_CONTEXT), "prefill-large": (64, 512, TIMED_CONTEXT),
                "decode-tiny-short": (1, 1, SHORT_CONTEXT), "decode-small-short": (16, 1, SHORT_CONTEXT),
                "decode-short": (256, 1, SHORT_CONTEXT)}
LARGE_POINT_SECONDS = 1.0
LAYER_ROUNDS = 5                  # at least this many rounds of every point ...
LAYER_MIN_SPAN_SECONDS = 30.0     # ... and more until the rounds span this long (measure_layers) ...
LAYER_MAX_ROUNDS = 25             # ... but no more than this many
LAYER_ROUND_SECONDS = 0.1         # one round of one point runs at least this long
LAYER_TIMING = 4                  # in the layers' cache key: 2 = rounds interleaved over a span (was back to
                                  # back), 3 = a table per phase and kind, 4 = timed with one OpenMP team
                                  # (_in_thread)
# Cycle through this much weight memory, and as much KV cache, when timing a layer: a
# run streams every layer's weights and every batch's cache from DRAM, and a timing
# that reuses a few copies would find them in the last-level cache (105 MiB on this
# machine's Xeon) and time faster than a run can go.
STREAM_BYTES = 256 << 20
MAX_COPIES = 64
MAX_LAYER_BYTES = 1 << 30              # bigger layers are not timed (too slow, too much memory)


def _decode_rate(dense: torch.Tensor, group_dim: int) -> float:
    """Dense bytes per second decoding the 4-bit form of ``dense`` back into it produces."""
    from flexgraph.compress.quant import dequantize_into, quantize
    q = quantize(dense, group_dim)
    return dense.numel() * dense.element_size() / _best_time(lambda: dequantize_into(q, dense),
                                                             min_seconds=0.3, repeats=2)


def measure_dequant(dtype: torch.dtype, device: torch.device) -> float:
    """Dense bytes per second that decoding a 4-bit group-wise matrix produces (a matrix
    bigger than the last-level cache, as a layer's weights are)."""
    from flexgraph.compress.quant import WEIGHT_GROUP_DIM
    return _decode_rate(torch.randn(8192, 8192, dtype=dtype, device=device), WEIGHT_GROUP_DIM)


# A KV cache as the executor holds it: [rows, tokens, head dim], grouped along the
# head dim, ~200 MB dense.  Its decoding measured ~0.6-0.7 GB/s here against ~2 GB/s for
# a weight matrix (64-value groups, one per row and token), and encoding ~0.27 GB/s;
# charging the cache at the weights' rate put a 4-bit estimate at a third of the run.
CACHE_SHAPE = (3072, 528, 64)


def measure_cache_codec(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(decode, encode) dense bytes per second for a KV cache in its 4-bit layout."""
    from flexgraph.compress.quant import CACHE_GROUP_DIM, quantize
    dense = torch.randn(CACHE_SHAPE, dtype=dtype, device=device)
    decode = _decode_rate(dense, CACHE_GROUP_DIM)
    encode = dense.numel() * dense.element_size() / _best_time(lambda: quantize(dense, CACHE_GROUP_DIM),
                                                               min_seconds=0.3, repeats=2)
    return decode, encode


def ensure_dequant(cal: Calibration, dtype: torch.dtype, has_gpu_tier: bool) -> None:
    """Measure the decoding rates once per machine (compressed weights or cache need them)."""
    if cal.dequant <= 0 or cal.dequant_cache <= 0 or cal.quant_cache <= 0:
        log.info("calibrating_dequant")
        dev = torch.device("cuda" if cal.device == "cuda" else "cpu")
        cal.dequant = _in_thread(measure_dequant, dtype, dev)
        cal.dequant_cache, cal.quant_cache = _in_thread(measure_cache_codec, dtype, dev)
        save_calibration(cal, calibration_path(cal.device, cal.dtype, has_gpu_tier))


def measure_cast(store_dtype: torch.dtype, dtype: torch.dtype, device: torch.device) -> float:
    """Working-dtype bytes per second that converting a matrix kept in ``store_dtype``
    produces, into one reused buffer as the compute does (a matrix bigger than the
    last-level cache, as a layer's weights are)."""
    src = torch.randn(8192, 8192, device=device).to(store_dtype)
    out = torch.empty(src.shape, dtype=dtype, device=device)
    return out.numel() * out.element_size() / _best_time(lambda: out.copy_(src), min_seconds=0.3, repeats=3)


def ensure_cast(cal: Calibration, store_dtype: torch.dtype, dtype: torch.dtype, has_gpu_tier: bool) -> None:
    """Measure the conversion rate from ``store_dtype`` once per machine."""
    name = str(store_dtype).split(".")[-1]
    if cal.cast.get(name, 0.0) <= 0:
        log.info("calibrating_cast", storage_dtype=name)
        dev = torch.device("cuda" if cal.device == "cuda" else "cpu")
        cal.cast[name] = _in_thread(measure_cast, store_dtype, dtype, dev)
        save_calibration(cal, calibration_path(cal.device, cal.dtype, has_gpu_tier))


def _copies(nbytes: int) -> int:
    """How many copies of ``nbytes`` to cycle through so that none is still cached."""
    return max(1, min(MAX_COPIES, -(-STREAM_BYTES // max(nbytes, 1))))


def layer_signature(spec, dtype: torch.dtype, compiled: bool) -> str:
    d = spec.to_dict()
    for key in ("name", "num_blocks", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_ids",
                "pad_token_id"):
        d.pop(key, None)
    from flexgraph.models.forward import PREFILL_CHUNK_TOKENS
    from flexgraph.models.layers import GROUPED_DECODE
    text = (json.dumps(d, sort_keys=True, default=str) + f"|{dtype}|{compiled}|{sorted(LAYER_POINTS.items())}"
            f"|{STREAM_BYTES}|{LAYER_TIMING}|{PREFILL_CHUNK_TOKENS}")
    if spec.num_kv_heads != spec.num_heads:       # only their decode attention changed
        text += f"|{GROUPED_DECODE}"
    return "layers-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def measure_layers(model, dtype: torch.dtype, compiled: bool, device: torch.device) -> dict[str, list[list[float]]]:
    """Time the real maths of each layer kind at each of ``LAYER_POINTS``, with weights
    streamed from memory (several copies in turn), and return per kind the ratio of the
    measured time to ``model.analytic_time`` — ``[[tokens, ratio], ...]`` by tokens.

    The rounds are interleaved: each round times every (kind, point) once, and rounds
    repeat until ``LAYER_MIN_SPAN_SECONDS`` have passed (at least ``LAYER_ROUNDS``, at
    most ``LAYER_MAX_ROUNDS``); each point keeps the median of its rounds.  This host's
    speed swings by a quarter over tens of seconds (SmolLM2's MLP at 8,192 tokens timed
    299-490 ms within seven minutes), and five rounds of one point back to back sampled
    one moment of it: six calibrations in a row put that MLP at 0.88-1.22x its analytic
    time.  Spread over the span, each median samples the host as a long run meets it
    (a run's compute lane alternates the kinds too)."""
    steps = layer_steps(model, dtype, compiled, device)
    time_interleaved(steps)
    return layer_corrections(steps)


def time_interleaved(steps: list[TimedStep]) -> None:
    """Time ``steps`` in rounds that each time every step once, until the rounds span
    ``LAYER_MIN_SPAN_SECONDS`` (``LAYER_ROUNDS`` to ``LAYER_MAX_ROUNDS`` rounds)."""
    with torch.inference_mode():
        for step in steps:
            step.run()                                          # warm-up
        start, rounds = time.perf_counter(), 0
        while rounds < LAYER_ROUNDS or (rounds < LAYER_MAX_ROUNDS
                                        and time.perf_counter() - start < LAYER_MIN_SPAN_SECONDS):
            for step in steps:
                step.times.append(time_round(step.run, LAYER_ROUND_SECONDS))
            rounds += 1


def correction_key(kind: str, new: int, context: int = TIMED_CONTEXT) -> str:
    """The corrections table a compute of ``new`` tokens per sequence of a ``kind`` layer
    is scaled by: ``"prefill mlp"``, ``"decode attn"``, ... (named as the estimate's parts);
    points timed at another context than ``TIMED_CONTEXT`` have their own: ``"decode attn @128"``."""
    key = f"{'prefill' if new > 1 else 'decode'} {kind}"
    return key if context == TIMED_CONTEXT else f"{key} @{context}"


def layer_corrections(steps: list[TimedStep]) -> dict[str, list[list[float]]]:
    """Per table (:func:`correction_key`), ``[[tokens, median time / analytic time], ...]``
    of timed steps; the embedding is scaled as the MLP (it is not timed)."""
    from flexgraph.models.spec import EMBED, MLP
    out: dict[str, list[list[float]]] = {}
    for step in steps:
        out.setdefault(step.table, []).append([step.tokens, statistics.median(step.times) / step.analytic])
    out = {table: sorted(rows) for table, rows in out.items()}
    for phase in ("prefill", "decode"):
        mlp, embed = f"{phase} {MLP}", f"{phase} {EMBED}"
        if mlp in out and embed not in out:
            out[embed] = out[mlp]
    return out


@dataclass
class TimedStep:
    """One layer kind at one point: the call that runs it and its times so far."""
    table: str                          # the corrections table it is a point of (correction_key)
    tokens: int                         # batch x new tokens
    analytic: float                     # the cost model's time before corrections
    run: Callable[[], None]
    times: list[float] = field(default_factory=list)


def layer_steps(model, dtype: torch.dtype, compiled: bool, device: torch.device) -> list[TimedStep]:
    """A timed step per layer kind and point of ``LAYER_POINTS``: each kind's weights in
    ``_copies`` copies, and for attention one pool of caches that every point's copies
    are rows of (so the pool is as big as the largest point needs, not their sum).
    Every kind's weights are held at once, for the interleaved rounds: OPT-6.7B's in
    float32 are 1.6 GB (its head's 0.8 GB included), beside a cache pool of 1 GiB."""
    from flexgraph.models import layers as L
    from flexgraph.models.forward import EAGER, compiled_kernels, compute_layer, warm_up
    from flexgraph.models.spec import ATTN, HEAD
    spec = model.spec
    kernels = compiled_kernels() if compiled else EAGER
    inv_freq = L.rope_inv_freq(spec) if spec.family == "llama" else None
    steps = []
    for j in (1, 2, spec.num_layers - 1):
        kind = spec.layer(j).kind
        nbytes = sum(w.numel for w in spec.layer_weights(j)) * dtype.itemsize
        if nbytes > MAX_LAYER_BYTES:
            continue
        copies = _copies(nbytes)
        weights = [{L.role_of(w.name): torch.randn(w.shape, dtype=dtype, device=device) * 0.02
                    for w in spec.layer_weights(j)} for _ in range(copies)]
        points = []
        for phase, (batch, new, context) in LAYER_POINTS.items():
            if kind == HEAD and phase.startswith("prefill"):
                continue                                      # the head only ever sees the last position
            if phase == "prefill-large" and model.analytic_time(j, batch, new, context) > LARGE_POINT_SECONDS:
                continue
            if context != TIMED_CONTEXT and kind != ATTN:
                continue                                      # only attention reads the cache
            if kind == ATTN:      # a large model's cache at a large batch is timed at a smaller one (the
                # same at every context: the pool's rows are as long as the longest)
                longest = max(c for _, _, c in LAYER_POINTS.values())
                batch = max(1, min(batch, MAX_LAYER_BYTES // _cache_bytes_per_sequence(spec, longest, dtype)))
            points.append((batch, new, context))
        pool = _CachePool(spec, points, dtype, device) if kind == ATTN else None
        for batch, new, context in points:
            if compiled:
                warm_up(kernels, spec, dtype, batch, new, device)
            caches = pool.caches(batch) if pool else [None]
            st = _LayerStep(batch, new, context, spec, dtype, device)
            x = torch.randn(batch, new, spec.hidden_size, dtype=dtype, device=device)

            def run(j=j, weights=weights, caches=caches, x=x, st=st, n=[0]):    # this point's; n counts calls
                w, cache = weights[n[0] % len(weights)], caches[n[0] % len(caches)]
                n[0] += 1
                compute_layer(spec, j, w, x, st, cache, inv_freq, kernels)

            steps.append(TimedStep(correction_key(kind, new, context), batch * new,
                                   model.analytic_time(j, batch, new, context), run))
    return steps


def _cache_bytes_per_sequence(spec, context: int, dtype: torch.dtype) -> int:
    """Keys and values of one sequence's cache rows at ``context`` tokens, plus the slot
    a step writes."""
    return 2 * spec.num_kv_heads * (context + 1) * spec.head_dim * dtype.itemsize


class _CachePool:
    """Keys and values ``[rows, context + 1, D]`` for every attention point of a
    calibration: a point of ``batch`` sequences gets ``_copies`` disjoint row ranges of
    it to cycle through, as :class:`flexgraph.models.forward.KVCache` segments."""

    def __init__(self, spec, points: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device):
        self.nkv = spec.num_kv_heads
        context = max(c for _, _, c in points)
        self.per_sequence = per_sequence = _cache_bytes_per_sequence(spec, context, dtype)
        rows = max(b * _copies(b * per_sequence) for b, _, _ in points) * self.nkv
        self.k = torch.zeros(rows, context + 1, spec.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def caches(self, batch: int) -> list[list[tuple]]:
        rows = batch * self.nkv
        return [[(slice(None), self.k[i * rows:(i + 1) * rows], self.v[i * rows:(i + 1) * rows])]
                for i in range(_copies(batch * self.per_sequence))]


def _in_thread(fn, *args):
    """Run ``fn`` on a fresh thread, as the executor's compute lane runs the maths: with
    this thread's OpenMP thread count, while this thread has given its own team back
    (:mod:`flexgraph.exec.openmp`; with two teams on two cores every kernel waited for a
    wake-up, and the layers timed that way ran 1.3-1.8x slower at SmolLM2's decode)."""
    import threading

    from flexgraph.exec.openmp import cores_to_the_compute_lane, set_thread_team
    result: list = []
    failure: list = []
    threads = torch.get_num_threads()

    def target():
        try:
            set_thread_team(threads)
            result.append(fn(*args))
        except BaseException as e:      # re-raised in the caller
            failure.append(e)

    t = threading.Thread(target=target, name="flexgraph-calibrate")
    with cores_to_the_compute_lane():
        t.start()
        t.join()
    if failure:
        raise failure[0]
    return result[0]


class _LayerStep:
    """A step's positions and mask for timing one layer (all tokens valid)."""

    def __init__(self, batch: int, new: int, context: int, spec, dtype, device):
        from flexgraph.models import layers as L
        self.slot = context - new
        self.pos = torch.arange(self.slot, context, device=device).expand(batch, new)
        self.key_valid = torch.ones(batch, context, dtype=torch.bool, device=device)
        self.mask = L.attention_mask(self.key_valid, self.slot, new, spec)
        self._dtype = dtype

    def rope(self, inv_freq, dtype):
        from flexgraph.models import layers as L
        return L.rope_cos_sin(inv_freq, self.pos, dtype)


def ensure_layers(cal: Calibration, model, dtype: torch.dtype, compiled: bool, has_gpu_tier: bool) -> None:
    """Measure (once per machine, layer shape, dtype and kernels) and install the model's
    layer corrections on ``model``; on a CPU also the source of its tight-run corrections,
    measured the first time a plan needs them."""
    key = layer_signature(model.spec, dtype, compiled)
    path = calibration_path(cal.device, cal.dtype, has_gpu_tier)
    if key not in cal.layers:
        log.info("calibrating_layers", model=model.spec.name, compiled=compiled)
        dev = torch.device("cuda" if cal.device == "cuda" else "cpu")
        cal.layers[key] = _in_thread(measure_layers, model, dtype, compiled, dev)
        save_calibration(cal, path)
    model.corrections = cal.layers[key]
    if cal.device != "cpu":
        return

    def tight() -> dict[str, list[list[float]]]:
        tight_key = key + TIGHT_SUFFIX
        if tight_key not in cal.layers:
            log.info("calibrating_layers", model=model.spec.name, compiled=compiled, allocator="tight")
            cal.layers[tight_key] = measure_layers_tight(model, dtype, compiled)["corrections"]
            save_calibration(cal, path)
        return cal.layers[tight_key]

    model.tight_corrections = tight


TIGHT_SUFFIX = "-tight"
_CHILD_KNOBS = ("LAYER_ROUNDS", "LAYER_MIN_SPAN_SECONDS", "LAYER_MAX_ROUNDS", "LAYER_ROUND_SECONDS", "STREAM_BYTES",
                "LARGE_POINT_SECONDS", "LAYER_POINTS")


def measure_layers_tight(model, dtype: torch.dtype, compiled: bool) -> dict:
    """:func:`measure_layers` on the CPU as a run under a tight cap computes: without
    PyTorch's huge pages and with glibc's mmap threshold fixed (what ``flexgraph execute``
    chooses when the plan's peak leaves no room, :mod:`flexgraph.hugepages`,
    :mod:`flexgraph.malloc_threshold`).  Every large intermediate is then a fresh mapping
    faulted in 4 KiB pages: here OPT-1.3B's MLP at a 16 x 512 prefill measured 3.0x its
    analytic time so, against 1.4x with huge pages, and the estimate of a disk-bound run
    under 3 GiB came out 37% fast.  Huge pages are chosen once per process, at its first
    tensor, so this runs in a child process; returns ``{"corrections", "huge_pages",
    "threshold_fixed"}``."""
    import pickle
    import subprocess
    import sys

    from flexgraph import hugepages
    from flexgraph.errors import PlanError
    env = {**os.environ, hugepages.ENV: "0"}
    knobs = {name: globals()[name] for name in _CHILD_KNOBS}       # what the child times as this process would
    payload = pickle.dumps((model.spec, model.cal, model.itemsize, dtype, compiled, knobs))
    done = subprocess.run([sys.executable, "-c", "from flexgraph.calibrate import _tight_child; _tight_child()"],
                          input=payload, capture_output=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise PlanError(f"timing the layers under a tight run's allocator failed: {last}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def _tight_child() -> None:
    """The child of :func:`measure_layers_tight`: the arguments pickled on stdin, the
    result as one JSON line on stdout."""
    import pickle
    import sys

    from flexgraph import hugepages, malloc_threshold
    from flexgraph.plan.cost import CostModel
    spec, cal, itemsize, dtype, compiled, knobs = pickle.loads(sys.stdin.buffer.read())
    globals().update({k: v for k, v in knobs.items() if k in _CHILD_KNOBS})
    fixed = malloc_threshold.fix()
    model = CostModel(spec, cal, itemsize)
    corrections = _in_thread(measure_layers, model, dtype, compiled, torch.device("cpu"))
    print(json.dumps({"corrections": corrections, "huge_pages": os.environ.get(hugepages.ENV),
                      "threshold_fixed": fixed}))
