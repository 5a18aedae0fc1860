"""Running plans on tiny models in tests: store, plan, execute, compare."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexgraph.exec.executor import ExecOptions
from flexgraph.exec.prompts import Prompt
from flexgraph.exec.run import run_plan
from flexgraph.graph.builder import Workload
from flexgraph.models.sampling import SamplingParams
from flexgraph.plan.planner import Knobs, make_plan
from flexgraph.weights.convert_hf import convert_hf
from flexgraph.weights.resolve import resolve_model
from hf_tiny import hf_greedy, padded_prompts, tiny_model

GiB = 1 << 30

# The correctness matrix's cases, shared by every file that runs it (test_exec_matrix,
# test_compression_exec, test_storage_dtype): two families, 8 prompts of different
# lengths, the placements (--percent, simulated gpu tier) and batch shapes (gbs x ngb).
FAMILIES = ["opt-350m-shape", "llama3-rope-scaling-gqa4"]
LENGTHS = [7, 3, 5, 1, 6, 2, 7, 4]
GEN = 5
PLACEMENTS = {
    "all-cpu": ((0, 100, 0, 100, 0, 100), None),
    "weights-30-30-40": ((30, 30, 0, 100, 100, 0), 1 * GiB),
    "cache-0-50-50": ((0, 100, 0, 50, 0, 100), None),
    "activations-on-disk": ((0, 100, 0, 100, 0, 0), None),
    "mixed": ((20, 40, 30, 30, 40, 30), 1 * GiB),
}
SHAPES = [(1, 1), (2, 3), (4, 2)]


def shape_id(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def each_schedule(test):
    """Parametrize ``test`` over both schedules, with I/O overlapped and serial."""
    test = pytest.mark.parametrize("schedule", ["row", "zigzag"])(test)
    return pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])(test)


def assert_peaks_within_plan(report) -> None:
    """Every tier's measured peak <= what the run granted <= what the plan counted <= the
    tier's capacity (a tier the plan put nothing on is exempt)."""
    for tier, p in report.metrics["peak_memory"].items():
        assert p["measured"] <= p["granted"] <= p["planned"] <= (p["capacity"] or 0) or p["planned"] == 0, (tier, p)


def tiny_store(name: str, tmp: Path):
    """(transformers model, WeightStore) with the same float32 weights."""
    model = tiny_model(name)
    hf_dir = tmp / f"hf-{name}"
    model.save_pretrained(hf_dir)
    store = convert_hf(hf_dir, tmp / f"store-{name}", progress=False)
    return model, store


def tiny_case(name: str, tmp: Path, lengths, gen_len: int, seed: int = 3):
    """A tiny model of family ``name`` as transformers and as a store, left-padded random
    prompts of ``lengths``, and transformers' greedy answer:
    ``(model, store, ids, mask, hf_ids [B, gen_len], hf_logits [B, gen_len, V])``."""
    model, store = tiny_store(name, tmp)
    ids, mask = padded_prompts(store.spec.vocab_size, lengths, seed=seed)
    hf_ids, hf_logits = hf_greedy(model, ids, mask, gen_len)
    return model, store, ids, mask, hf_ids, hf_logits


def hardware(tmp: Path, gpu_mem: int | None = None, cpu_mem: int = 4 * GiB) -> dict:
    return {"device": "cpu", "gpu_mem": gpu_mem, "cpu_mem": cpu_mem, "disk_mem": 8 * GiB,
            "offload_dir": str(tmp / "offload"), "headroom": 0}


def prompts_of(ids: torch.Tensor, mask: torch.Tensor) -> list[Prompt]:
    """Left-padded (ids, mask) back to prompts of their own lengths."""
    return [Prompt(f"p{n}", tuple(ids[n][mask[n].bool()].tolist())) for n in range(ids.shape[0])]


def run_tiny(store, tmp: Path, prompts: list[Prompt], gen_len: int, *, gbs: int, ngb: int,
             percent=(0, 100, 0, 100, 0, 100), gpu_mem: int | None = None, schedule: str = "zigzag",
             overlap: bool = True, prefetch: bool = True, dtype: str = "float32",
             sampling: SamplingParams | None = None, results_path=None, metrics_path=None, trace_path=None,
             compress_weight: bool = False, compress_cache: bool = False, cpu_cache_compute: bool = False,
             record_logits: bool = False, storage_dtype: str | None = None):
    """Plan and execute; returns (generated ids per prompt, RunReport, Plan).  With
    ``record_logits`` the report's ``logits`` holds each prompt's float32 ``[gen_len, V]``."""
    ref = resolve_model(str(store.path))
    prompt_len = max(len(p.input_ids) for p in prompts)
    wl = Workload(len(prompts), prompt_len, gen_len)
    sampling = sampling or SamplingParams(ignore_eos=True)
    plan = make_plan(ref, wl, sampling, hardware(tmp, gpu_mem),
                     Knobs(gbs, ngb, tuple(percent), schedule, dtype, compress_weight=compress_weight,
                           compress_cache=compress_cache, cpu_cache_compute=cpu_cache_compute, prefetch=prefetch,
                           storage_dtype=storage_dtype))
    report = run_plan(plan, store, prompts, sampling, results_path=results_path, metrics_path=metrics_path,
                      trace_path=trace_path, options=ExecOptions(overlap=overlap, progress=False,
                                                                 record_logits=record_logits))
    return [line["output_ids"] for line in report.results], report, plan


def record_row_major_keys(monkeypatch) -> list[bool]:
    """Patch the attention kernel to note, for every call, whether the key buffer it is
    handed is row-major (tokens D apart, not a strided view of a seq-major cache)."""
    from flexgraph.models import layers
    seen: list[bool] = []
    attend = layers.attend

    def recording(q, k, v, mask, scale):
        seen.append(k.stride(2) == k.shape[3])
        return attend(q, k, v, mask, scale)

    monkeypatch.setattr(layers, "attend", recording)
    return seen


def _profiled(fn):
    """``(fn(), events)``: its result and the profiler's CPU events, memory included."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, prof.events()


def with_allocations(fn):
    """``(fn(), sizes)``: its result and the sizes (bytes) of the CPU allocations the ops
    themselves make while it runs (each op's own, not its children's, so one allocation
    is counted once)."""
    result, events = _profiled(fn)
    return result, [e.self_cpu_memory_usage for e in events if e.self_cpu_memory_usage > 0]


def with_peak_allocated(fn):
    """``(fn(), peak)``: its result and the most bytes the ops' CPU allocations held at
    once while it ran (each op's own allocations less its frees, in the order the ops
    started; what it returns included)."""
    result, events = _profiled(fn)
    live = peak = 0
    for event in sorted(events, key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return result, peak
