"""Run metrics and the Chrome trace.

Throughput follows FlexGen's definitions, summed over blocks:

- prefill: prompt tokens / prefill time (a block's start to its last step-0 compute);
- decode: generated tokens after the first / decode time (the rest of the block);
- total: generated tokens / (prefill + decode).

Tokens count every sequence computed, filler rows of a last partial block included
(they cost the same); ``num_sequences`` says how many that was.

``overlap_ratio``: of the time the I/O lanes were busy, the share during which the
compute lane was busy too (1.0 = all I/O hidden behind compute).  ``executor_overhead``:
the share of wall time during which no lane was doing any work — dispatch, Python
bookkeeping, waiting on memory grants.  ``parts``: node seconds by
:func:`flexgraph.graph.builder.part_of` (kind, phase, layer kind), as the plan's
estimate has them.
"""

from __future__ import annotations

from typing import Any


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if b > a:
            total += b - a
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap_and_overhead(spans: dict[str, list[tuple[float, float, str]]], windows: list[tuple[float, float]]):
    """(overlap_ratio, executor_overhead) from lane spans within the blocks' time windows."""
    compute = _union([(a, b) for a, b, _ in spans.get("compute", [])])
    io = _union([(a, b) for name, s in spans.items() if name != "compute" for a, b, _ in s])
    busy_any = _union([(a, b) for s in spans.values() for a, b, _ in s])
    wall = _union(windows)
    io_time = _length(io)
    overlap = _intersection(io, compute) / io_time if io_time else None
    wall_time = _length(wall)
    covered = _intersection(busy_any, wall)
    overhead = (wall_time - covered) / wall_time if wall_time else 0.0
    return overlap, overhead


def build_metrics(*, workload, policy, timings, num_sequences: int, memory_stats, measured_peak: dict[str, int],
                  planned: dict, disk_stats, moved: dict, lanes: dict, spans: dict, setup_seconds: float,
                  pool_stats=None, parts: dict[str, float] | None = None) -> dict:
    prefill = sum(t.prefill_end - t.start for t in timings)
    decode = sum(t.end - t.prefill_end for t in timings)
    n = num_sequences
    overlap, overhead = overlap_and_overhead(spans, [(t.start, t.end) for t in timings])
    return {
        "throughput": {
            "prefill": n * workload.prompt_len / prefill if prefill else None,
            "decode": n * (workload.gen_len - 1) / decode if decode else None,
            "total": n * workload.gen_len / (prefill + decode) if prefill + decode else None,
        },
        "seconds": {"prefill": prefill, "decode": decode, "total": prefill + decode, "setup": setup_seconds},
        "num_sequences": n,
        "blocks": len(timings),
        "policy": policy.to_json(),
        "peak_memory": {t: {"granted": memory_stats.peak[t], "measured": measured_peak[t],
                            "planned": planned["peak"].get(t), "capacity": planned["capacity"].get(t)}
                        for t in memory_stats.peak},
        "bytes_moved": {f"{a}->{b}": v for (a, b), v in sorted(moved.items())},
        "disk_io": {"read_bytes": disk_stats.read_bytes, "write_bytes": disk_stats.write_bytes,
                    "read_seconds": disk_stats.read_seconds, "write_seconds": disk_stats.write_seconds},
        "buffer_pool": None if pool_stats is None else {
            "buffers": pool_stats.buffers, "held_bytes": pool_stats.held_bytes,
            "peak_held_bytes": pool_stats.peak_held_bytes, "hits": pool_stats.hits,
            "misses": pool_stats.misses, "evicted": pool_stats.evicted},
        "lanes": {name: {"busy_seconds": s.busy_seconds, "items": s.items} for name, s in lanes.items()},
        "overlap_ratio": overlap,
        "executor_overhead": overhead,
        "parts": dict(sorted((parts or {}).items())),
    }


def chrome_trace(spans: dict[str, list[tuple[float, float, str]]], origin: float) -> dict[str, Any]:
    """Chrome trace-event JSON: one track (tid) per lane, one complete event per node."""
    events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "flexgraph"}}]
    for tid, (lane, items) in enumerate(sorted(spans.items())):
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": lane}})
        for a, b, label in items:
            events.append({"name": label, "cat": label.split("(")[0], "ph": "X", "pid": 0, "tid": tid,
                           "ts": round((a - origin) * 1e6, 3), "dur": round((b - a) * 1e6, 3),
                           "args": {"kind": label.split("(")[0], "lane": lane}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
