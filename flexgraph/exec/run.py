"""``flexgraph execute``: a plan, prompts and a model in; results, metrics, trace out.

Blocks run one after another on one :class:`~flexgraph.exec.executor.Executor` (the
weights are placed once).  After each block its results are appended to the results
file; metrics and the trace are written at the end (atomically).  Whatever happens —
an error, Ctrl-C — the executor closes: lanes stop and offload files are removed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from flexgraph.exec.executor import BlockOutput, ExecOptions, Executor
from flexgraph.exec.metrics import build_metrics, chrome_trace
from flexgraph.exec.prompts import Prompt, blocks_of, make_batches, read_prompts, synthetic_prompts
from flexgraph.exec.results import ResultsFile, finish
from flexgraph.fileio import write_json_atomic
from flexgraph.log import get_logger
from flexgraph.models.sampling import SamplingParams
from flexgraph.plan.planfile import Plan
from flexgraph.progress import progress

log = get_logger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (lower per-callback overhead), else asyncio's own."""
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


@dataclass
class RunReport:
    results: list[dict[str, Any]] = field(default_factory=list)   # this run's lines
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped_blocks: int = 0
    logits: list[Any] = field(default_factory=list)   # with ExecOptions(record_logits=True): per prompt [gen_len, V]


def run_plan(plan: Plan, store, prompts: list[Prompt] | None = None, sampling: SamplingParams | None = None,
             results_path=None, metrics_path=None, trace_path=None,
             options: ExecOptions | None = None, weight_homes=None) -> RunReport:
    options = options or ExecOptions()
    sampling = sampling or plan.sampling
    plan.sampling = sampling
    spec = store.spec
    tokenizer = store.tokenizer()
    wl, pol = plan.workload, plan.policy
    if prompts is None:
        prompts = synthetic_prompts(wl.num_prompts, wl.prompt_len, spec.vocab_size, seed=sampling.seed)
    results = ResultsFile(results_path, prompts, pol.block_size) if results_path else None
    blocks = blocks_of(prompts, pol.block_size)
    skip = results.done_blocks if results else 0
    report = RunReport(skipped_blocks=skip)
    if skip >= len(blocks):
        log.info("nothing_to_do", results=str(results_path), blocks=len(blocks))
        return report
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    eos = () if sampling.ignore_eos else spec.eos_token_ids
    t0 = time.perf_counter()
    executor = Executor(plan, store, options, weight_homes)
    timings = []
    try:
        executor.setup()
        setup_seconds = time.perf_counter() - t0
        computes = sum(1 for n in executor.nodes if n.kind == "compute")
        bar = progress(total=computes * (len(blocks) - skip), desc="generating", unit="square",
                       enabled=options.progress)
        loop = new_event_loop()
        try:
            for b in range(skip, len(blocks)):
                batches = make_batches(blocks[b], b, pol.gpu_batch_size, pol.num_gpu_batches, wl.prompt_len, pad,
                                       sampling)
                out: BlockOutput = loop.run_until_complete(
                    executor.run_block(batches, on_compute=lambda _node: bar.update(1)))
                timings.append(out.timing)
                lines = _block_lines(blocks[b], out, pol.gpu_batch_size, eos, sampling, tokenizer)
                if results is not None:
                    results.append(lines)
                report.results.extend(lines)
                if out.logits is not None:
                    gbs = pol.gpu_batch_size
                    report.logits.extend(out.logits[n // gbs][n % gbs] for n in range(len(blocks[b])))
                log.info("block_done", block=b + 1, of=len(blocks),
                         seconds=round(out.timing.end - out.timing.start, 3))
        finally:
            bar.close()
            _close_loop(loop)
        stats = executor.memory.statistics()
        measured = {t: executor.checked.home_bytes.get(t, 0) + executor.state.live_peak[t] for t in stats.peak}
        report.metrics = build_metrics(
            workload=wl, policy=pol, timings=timings, num_sequences=len(timings) * pol.block_size,
            memory_stats=stats, measured_peak=measured, planned=plan.residency,
            disk_stats=executor.disk.statistics(), moved=executor.moved,
            lanes={n: lane.statistics() for n, lane in executor.lanes.items()}, spans=executor.spans(),
            setup_seconds=setup_seconds, pool_stats=executor.tiers.pool.statistics(),
            parts=executor.part_seconds)
        if trace_path:
            write_json_atomic(trace_path, chrome_trace(executor.spans(), timings[0].start))
    finally:
        executor.close()
    if metrics_path:
        write_json_atomic(metrics_path, report.metrics)
    return report


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what an interruption left pending (the dispatcher, memory waits), then close."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        try:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except BaseException:       # a second Ctrl-C while cancelling: give up on tidiness
            pass
    loop.close()


def _block_lines(prompts: list[Prompt], out: BlockOutput, gbs: int, eos, sampling, tokenizer) -> list[dict]:
    lines = []
    for n, prompt in enumerate(prompts):
        ids = out.ids[n // gbs][n % gbs].tolist()
        lines.append({"id": prompt.id, **finish(ids, eos, sampling, tokenizer)})
    return lines


def load_prompts(path, store, plan: Plan) -> list[Prompt] | None:
    if path is None:
        return None
    return read_prompts(path, store.tokenizer(), store.spec.vocab_size, plan.workload.prompt_len)
