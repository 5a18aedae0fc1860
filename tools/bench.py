#!/usr/bin/env python3
"""Throughput benchmark: flexgraph against its peers and the roofline, side by side.

One invocation runs, per scenario, on the same workload (default prompt 512, generation
32) and under the same memory cap (a cgroup limit that counts page cache; caches dropped
before each run, see ``tools/cgroup_run.py``):

- **flexgraph** with the plan its search picks: ``flexgraph plan`` runs *inside* the
  cap (so the planner sees the cap as this machine's memory), then ``flexgraph
  execute``; throughput is from its metrics (FlexGen's definition);
- the **peers** (``tools/peers.py``): transformers ``generate`` with the model in RAM
  and/or Accelerate with weights offloaded to disk, each the best batch of a sweep;
- the **roofline** of the plan flexgraph ran: the time its bytes and FLOPs need at the
  calibrated rates with perfect overlap (``flexgraph.plan.cost.roofline``), and which
  resource bounds it;
- the **prefill ceiling**: the throughput if the decode and every byte took no time (the
  prompts' products alone; the higher of the calibrated and the run's own figure), and
  how many times each peer's throughput it is: no plan passes it without running the
  products faster, so a target ratio above it is out of reach on this machine;
- the **cost model's estimate** for that plan, against the measurement — in total and
  part by part (:func:`estimate_parts`: node seconds by kind, phase and layer kind, and
  the compute lane's idle time), so a miss can be placed.

The dtype: flexgraph computes in what its planner picks for this CPU (bfloat16 where
the CPU multiplies it at least half as fast as float32 — AMX — else float32); the peers
run in that same dtype unless ``--peer-dtype`` asks for others too (``same,bfloat16``
adds rows with the peers in bfloat16, as the issue's scenarios are written), each from a
checkpoint in its own dtype unless ``--peer-checkpoint`` names one (``bfloat16`` gives a
float32 peer the storage flexgraph's plan keeps on such a CPU; see ``run_peer``).

Scenarios (the issue's): ``a`` the bundled SmolLM2-135M in RAM; ``b``
OPT-1.3B dummy under 3 GiB; ``c`` OPT-6.7B dummy under 8 GiB; ``d`` Llama-3.1-8B dummy
under 8 GiB.  (c) and (d) run prompt 128, generation 16 unless ``--full`` (at prompt 512
each run takes hours here).  ``--compress`` adds flexgraph rows with 4-bit weights and
cache for (b)-(d).

    python tools/bench.py --scenario a,b --out bench.json

prints one JSON object (also written to ``--out``) and a markdown table.  Ratios are
what to read: absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent


def _tool(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Scenario:
    name: str
    model: str
    dummy: bool
    cap: str
    peers: tuple[str, ...]
    peer_batches: tuple[int, ...]
    num_prompts: int                     # the most prompts flexgraph's search may block together
    note: str = ""
    short: tuple[int, int] | None = None  # (prompt, gen) used unless --full: the full workload is hours


SCENARIOS = {
    "a": Scenario("a", "smollm2-135m", False, "16GiB", ("transformers",), (32, 64, 128, 256), 256,
                  "bundled model in RAM"),
    # (b): 64 prompts (8 x 8 batches), each weight read from disk serves 64 sequences
    # (32 prompts ran at 6.8 tok/s here, 64 at 7.9; 64 was OOM-killed before the buffer pool)
    # Accelerate's sweep for (b) goes to 32: 16 runs since 138ce8f (checkpoint offload, the
    # tied head being on disk) and was its best on 12-07 (3.34 tok/s); 32 was OOM-killed.
    "b": Scenario("b", "opt-1.3b", True, "3GiB", ("accelerate",), (4, 8, 16, 32), 64,
                  "OPT-1.3B dummy under a 3 GiB cap"),
    # (c), (d): 128 prompts, FlexGen's large effective batch: every weight read from disk
    # serves 128 sequences (OPT-6.7B with 16 prompts ran at 1.90 tok/s here, with 128 at 4.90).
    # Accelerate's prefill-bound runs gain up to flexgraph's own batch where the cap lets
    # them (12-07, bfloat16, head input fixed: (d) 1.19 tok/s at 16, 2.13 at 64, 2.42 at
    # 128; (c) 1.35 at 16, 1.83 at 32, 1.81 at 64 run apart), so the sweeps go that far
    # ((c)'s 64, no faster than 32, costs ten minutes more).  Before 138ce8f (c)
    # stopped at 16: at 32 and 64 the budget maps everything to disk and folder offload
    # failed on the tied head (KeyError: 'lm_head.weight'); auto now reads the checkpoint.
    "c": Scenario("c", "opt-6.7b", True, "8GiB", ("accelerate",), (4, 16, 32), 128,
                  "OPT-6.7B dummy under an 8 GiB cap", short=(128, 16)),
    "d": Scenario("d", "llama-3.1-8b", True, "8GiB", ("accelerate",), (4, 16, 64, 128), 128,
                  "Llama-3.1-8B dummy under an 8 GiB cap", short=(128, 16)),
}


@dataclass
class Row:
    scenario: str
    system: str
    throughput: float | None
    detail: dict[str, Any] = field(default_factory=dict)


def _flexgraph_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexgraph.cli", "--log-format", "json", *args]


def prepare_model(sc: Scenario) -> str:
    """Make the bundled model's store before any capped run (not part of what is
    measured); returns the dtype flexgraph will compute in.  Dummy weights are written
    later, by :func:`materialize_planned`, in the one dtype the plan keeps them in."""
    from flexgraph.plan.planner import default_dtype
    from flexgraph.weights.resolve import materialize, resolve_model
    if not sc.dummy:
        materialize(resolve_model(sc.model), progress=True)
    return default_dtype("cpu")


def materialize_planned(plan: dict) -> None:
    """Write the dummy store the plan reads (outside the cap: not part of what is measured).
    Only that one: the search weighs float32 and bfloat16 storage on a float32 CPU, and
    writing both up front took 48 GB for Llama-3.1-8B.  The planner needs neither: a
    dummy store is generated in whatever dtype the plan keeps and read from in place."""
    from flexgraph.plan.policy import Policy
    from flexgraph.weights.resolve import ModelRef, materialize
    ref = ModelRef.from_json(plan["model"])
    if ref.dummy:         # as `flexgraph execute` would, but before its capped, timed run
        materialize(ref, dtype=Policy.from_json(plan["policy"]).store_torch_dtype, progress=True)


def run_flexgraph(sc: Scenario, prompt_len: int, gen_len: int, work: Path, compress: bool,
                  timeout: float | None) -> Row:
    cg = _tool("cgroup_run")
    from flexgraph.errors import FlexgraphError
    from flexgraph.sizes import parse_size
    cap = parse_size(sc.cap)
    plan = work / f"plan-{sc.name}{'-c4' if compress else ''}.json"
    metrics = work / f"metrics-{sc.name}{'-c4' if compress else ''}.json"
    offload = work / "offload"
    args = ["plan", "--model", sc.model, "--prompt-len", str(prompt_len), "--gen-len", str(gen_len),
            "--num-prompts", str(sc.num_prompts), "--offload-dir", str(offload), "--out", str(plan),
            "--ignore-eos"]
    if sc.dummy:
        args.append("--dummy")
    if compress:
        args += ["--compress-weight", "--compress-cache"]
    system = "flexgraph" + (" (4-bit)" if compress else "")
    t0 = time.perf_counter()
    planned = cg.run_capped(_flexgraph_cmd(*args), cap, capture_output=True, drop_caches=False, timeout=timeout)
    plan_seconds = time.perf_counter() - t0
    if planned.returncode != 0:
        return Row(sc.name, system, None, {"ok": False, "reason": _last_error(planned.stderr)})
    try:
        materialize_planned(json.loads(plan.read_text()))
    except FlexgraphError as e:            # e.g. no room on disk for the dummy store the plan reads
        return Row(sc.name, system, None, {"ok": False, "reason": str(e)})
    ran = cg.run_capped(_flexgraph_cmd("execute", str(plan), "--metrics", str(metrics), "--show", "0"), cap,
                        capture_output=True, drop_caches=True, timeout=timeout)
    if ran.returncode != 0:
        reason = f"OOM-killed by the {sc.cap} cap" if ran.oom_killed else _last_error(ran.stderr)
        return Row(sc.name, system, None, {"ok": False, "oom": ran.oom_killed, "reason": reason,
                                           "cgroup_peak": ran.peak_bytes})
    m = json.loads(metrics.read_text())
    p = json.loads(plan.read_text())
    est, roof = p.get("estimate", {}), p.get("estimate", {}).get("roofline", {})
    measured = m["seconds"]["total"]
    detail = {
        "ok": True, "policy": p["policy"], "num_sequences": m["num_sequences"], "seconds": m["seconds"],
        "throughput_parts": m["throughput"], "cgroup_peak": ran.peak_bytes, "plan_seconds": plan_seconds,
        "estimate_seconds": est.get("total_seconds"),
        "estimate_error": (est["total_seconds"] - measured) / measured if est.get("total_seconds") else None,
        "roofline_seconds": roof.get("block_seconds", 0) * m["blocks"] if roof else None,
        "roofline_bound": roof.get("bound"), "roofline_resources": roof.get("resources"),
        "overlap_ratio": m.get("overlap_ratio"), "executor_overhead": m.get("executor_overhead"),
        "bytes_moved": m.get("bytes_moved"), "lanes": m.get("lanes"),
        "estimate_parts": estimate_parts(est, m),
    }
    if detail["roofline_seconds"]:
        detail["roofline_throughput"] = m["num_sequences"] * gen_len / detail["roofline_seconds"]
        detail["of_roofline"] = detail["roofline_seconds"] / measured
    # The prefill ceiling: the throughput if the decode and every byte took no time, from
    # the calibrated rates (the plan's estimate) and from this run's own prefill.
    detail["prefill_ceiling_calibrated"] = (est.get("prefill_ceiling") or {}).get("throughput")
    if m["seconds"].get("prefill"):
        detail["prefill_ceiling_measured"] = m["num_sequences"] * gen_len / m["seconds"]["prefill"]
    detail["prefill_ceiling"] = prefill_ceiling(detail)
    return Row(sc.name, system, m["throughput"]["total"], detail)


def prefill_ceiling(detail: dict) -> float | None:
    """The higher of the two prefill ceilings, the generous bound: the calibrated rates can
    be below a run's (OPT-1.3B's (b) at 12-07 23:05: 7.4 tok/s from the calibration, 8.3
    from the run's own prefill, loads included)."""
    both = [c for c in (detail.get("prefill_ceiling_calibrated"), detail.get("prefill_ceiling_measured")) if c]
    return max(both) if both else None


COMPUTE_IDLE = "compute lane idle"


def estimate_parts(estimate: dict, metrics: dict) -> dict[str, dict[str, float | None]]:
    """The plan's estimate against the run's metrics, part by part: node seconds by
    ``graph.builder.part_of`` (both sides add them up by it), and the compute lane's idle
    time (wall time it waited on loads, stores and dispatch), each as
    ``{"estimate", "measured", "error"}`` with error = (estimate - measured) / measured."""
    est_parts, run_parts = estimate.get("parts") or {}, metrics.get("parts") or {}
    if not est_parts or not run_parts:
        return {}                     # a plan or a run from before parts were recorded
    pairs = {k: (est_parts.get(k, 0.0), run_parts.get(k, 0.0)) for k in sorted({*est_parts, *run_parts})}
    blocks = metrics.get("blocks", 1)
    est_busy = (estimate.get("lane_busy") or {}).get("compute", 0.0) * blocks
    run_busy = ((metrics.get("lanes") or {}).get("compute") or {}).get("busy_seconds", 0.0)
    pairs[COMPUTE_IDLE] = (max(0.0, estimate.get("total_seconds", 0.0) - est_busy),
                           max(0.0, metrics["seconds"]["total"] - run_busy))
    return {k: {"estimate": e, "measured": m, "error": (e - m) / m if m else None} for k, (e, m) in pairs.items()}


def parts_markdown(report: dict[str, Any], share: float = 0.03) -> str:
    """Where flexgraph's estimate and run differ: the parts over ``share`` of the run."""
    lines = ["| scenario | part | estimate s | measured s | error |", "|---|---|---:|---:|---:|"]
    for sc_name, sc in report["scenarios"].items():
        for r in sc["rows"]:
            if not r["system"].startswith("flexgraph"):
                continue
            d = r["detail"]
            parts, total = d.get("estimate_parts") or {}, (d.get("seconds") or {}).get("total")
            for part, p in sorted(parts.items(), key=lambda kv: -kv[1]["measured"]):
                if total and max(p["measured"], p["estimate"]) >= share * total:
                    err = "" if p["error"] is None else f"{p['error']:+.0%}"
                    lines.append(f"| {sc_name} {r['system']} | {part} | {p['estimate']:.1f} | "
                                 f"{p['measured']:.1f} | {err} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _last_error(stderr: bytes | None) -> str:
    lines = [ln for ln in (stderr or b"").decode(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def run_peer(sc: Scenario, peer: str, prompt_len: int, gen_len: int, timeout: float | None,
             huge_pages: bool = False, dtype: str = "bfloat16", system: str | None = None,
             checkpoint: str | None = None, head_input: str | None = None) -> Row:
    """The best batch of the peer's sweep, computing in ``dtype``, from a checkpoint in
    ``checkpoint`` (default: that same dtype), written here before the capped runs.

    By default the checkpoint is in the compute dtype: Accelerate converting a bfloat16
    checkpoint to float32 as it loads was OOM-killed under (b)'s 3 GiB cap at batch 1,
    while loading, and a user computing in float32 would convert the checkpoint once.
    A bfloat16 checkpoint under a float32 compute is flexgraph's own storage choice on
    such a CPU: Accelerate then keeps its offload folder in bfloat16 too (it writes the
    checkpoint's tensors as they are and converts each as it reads it: Llama-3.1-8B's
    folder held 14.1 GB for 28.3 GB of float32 parameters), so each step reads half the
    bytes; it also needs no float32 copy of the model on disk.

    ``head_input``: see "The head's input" in ``tools/peers.py`` (``contiguous`` spares the
    peer PyTorch's batch copies of ``lm_head`` in the prefill; ``as-is`` is as shipped)."""
    peers = _tool("peers")
    head_input = head_input or peers.DEFAULT_HEAD_INPUT
    model_dir = peers.hf_folder(sc.model, dtype=checkpoint or dtype, progress=True)
    results = peers.sweep(peer, model_dir, sc.peer_batches, prompt_len, gen_len, sc.cap, dtype, timeout=timeout,
                          huge_pages=huge_pages, head_input=head_input,
                          on_result=lambda r: print(json.dumps({"scenario": sc.name, **r}), file=sys.stderr))
    top = peers.best(results)
    return Row(sc.name, system or peer, top["throughput"] if top else None,
               {"best_batch": top["batch"] if top else None, "dtype": dtype, "checkpoint": checkpoint or dtype,
                "offload": top.get("offload") if top else None, "head_input": head_input, "sweep": results})


def peer_system(peer: str, dtype: str, planned: str, head_input: str) -> str:
    """The row's name: the peer, with what differs from flexgraph's dtype and the default head."""
    extra = [d for d in (dtype if dtype != planned else None,
                         "head as shipped" if head_input == "as-is" else None) if d]
    return f"{peer} ({', '.join(extra)})" if extra else peer


def peer_dtypes(asked: str, planned: str) -> list[str]:
    """The dtypes to run the peers in: ``same`` is the one flexgraph's plan computes in."""
    out = []
    for d in asked.split(","):
        d = planned if d.strip() == "same" else d.strip()
        if d not in out:
            out.append(d)
    return out


def ratios(rows: list[Row]) -> dict[str, Any]:
    fg = next((r for r in rows if r.system == "flexgraph"), None)
    ceiling = fg.detail.get("prefill_ceiling") if fg else None
    out = {}
    for r in rows:
        if r.system != "flexgraph" and fg and fg.throughput and r.throughput:
            out[f"flexgraph/{r.system}"] = fg.throughput / r.throughput
        if ceiling and r.throughput and not r.system.startswith("flexgraph"):
            out[f"ceiling/{r.system}"] = ceiling / r.throughput     # the most any plan beats this peer by
    if fg and fg.detail.get("of_roofline"):
        out["flexgraph/roofline"] = fg.detail["of_roofline"]
    comp = next((r for r in rows if r.system == "flexgraph (4-bit)"), None)
    if comp and fg and comp.throughput and fg.throughput:
        out["4-bit/uncompressed"] = comp.throughput / fg.throughput
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = ["| scenario | system | tokens/s | flexgraph is | notes |", "|---|---|---:|---:|---|"]
    for sc_name, sc in report["scenarios"].items():
        rows = sc["rows"]
        fg = next((r for r in rows if r["system"] == "flexgraph"), None)
        for r in rows:
            tp = r["throughput"]
            ratio = (fg["throughput"] / tp) if fg and fg["throughput"] and tp and r is not fg else None
            d = r["detail"]
            if r["system"].startswith("flexgraph"):
                pol = d.get("policy") or {}
                stored = f" (stored {pol['storage_dtype']})" if pol.get("storage_dtype") else ""
                note = (f"{pol.get('dtype')}{stored}, gbs {pol.get('gpu_batch_size')} x {pol.get('num_gpu_batches')}, "
                        f"{pol.get('schedule')}, % {pol.get('weights')}/{pol.get('cache')}; "
                        if pol else "") + (
                    f"estimate err {d['estimate_error']:+.0%}; " if d.get("estimate_error") is not None else "") + (
                    f"{d['of_roofline']:.0%} of roofline ({d.get('roofline_throughput', 0):.1f} tok/s, "
                    f"bound by {d.get('roofline_bound')})" if d.get("of_roofline") else "") + (
                    f"; prefill ceiling {d['prefill_ceiling']:.1f} tok/s" if d.get("prefill_ceiling") else "") + (
                    f" FAILED: {d.get('reason')}" if not d.get("ok", True) else "")
            else:
                ckpt = d.get("checkpoint")
                stored = f" (checkpoint {ckpt})" if ckpt and ckpt != d.get("dtype") else ""
                offload = f", offload {d['offload']}" if d.get("offload") else ""
                head = ", head input as shipped" if d.get("head_input") == "as-is" else ""
                ceiling = (fg or {}).get("detail", {}).get("prefill_ceiling")
                most = f"; the prefill ceiling is {ceiling / tp:.2f}x this" if ceiling and tp else ""
                note = f"{d.get('dtype', 'bfloat16')}{stored}, best batch {d.get('best_batch')}{offload}{head}{most}"
            lines.append(f"| {sc_name} | {r['system']} | {tp:.2f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} | {note} |" if tp is not None else
                         f"| {sc_name} | {r['system']} | — | | {note} |")
    return "\n".join(lines)


def _batch_list(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of batch sizes; write e.g. 32,64,128")
    return batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="a,b,c,d", help="comma-separated: a, b, c, d")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--compress", action="store_true", help="also run flexgraph with 4-bit weights and cache")
    ap.add_argument("--peer-huge-pages", action="store_true",
                    help="run the peers with flexgraph's allocator setting (THP_MEM_ALLOC_ENABLE=1) "
                         "instead of as shipped")
    ap.add_argument("--no-peers", action="store_true", help="skip the peers (flexgraph and roofline only)")
    ap.add_argument("--peer-dtype", default="same",
                    help="comma-separated dtypes to run the peers in: same (the one flexgraph's plan "
                         "computes in), bfloat16, float32; a row per dtype (e.g. same,bfloat16)")
    ap.add_argument("--peer-checkpoint", default=None,
                    help="dtype of the checkpoint the peers load (default: the one each computes in); "
                         "bfloat16 gives a float32 peer bfloat16 storage, as flexgraph's plan on such a CPU")
    ap.add_argument("--peer-head-input", default=_tool("peers").DEFAULT_HEAD_INPUT,
                    help="comma-separated: contiguous (default: the peers' head gets a contiguous input, "
                         "sparing them PyTorch's batch copies of lm_head), as-is (as shipped); a row per value")
    ap.add_argument("--num-prompts", type=int, default=None, help="override the scenarios' prompt counts")
    ap.add_argument("--peer-batches", type=_batch_list, default=None,
                    help="comma-separated batch sizes for the peers' sweep (default: each scenario's)")
    ap.add_argument("--full", action="store_true",
                    help="run (c) and (d) on the full workload too (by default they use prompt 128, gen 16)")
    ap.add_argument("--timeout", type=float, default=3600, help="per run, seconds")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    head_inputs = list(dict.fromkeys(h.strip() for h in args.peer_head_input.split(",") if h.strip()))
    known = _tool("peers").HEAD_INPUTS
    wrong = [h for h in head_inputs if h not in known]
    if wrong or not head_inputs:
        print(f"error: unknown --peer-head-input {(wrong or [''])[0]!r}; choose from {', '.join(known)}",
              file=sys.stderr)
        return 2
    cg = _tool("cgroup_run")
    problem = cg.cgroup_problem()
    if problem:
        print(f"error: memory caps need a writable cgroup: {problem}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"workload": {"prompt_len": args.prompt_len, "gen_len": args.gen_len},
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "scenarios": {}}
    work = Path(tempfile.mkdtemp(prefix="flexgraph-bench-"))
    try:
        for name in names:
            sc = SCENARIOS[name]
            if args.num_prompts:
                sc = Scenario(**{**sc.__dict__, "num_prompts": args.num_prompts})
            if args.peer_batches:
                sc = Scenario(**{**sc.__dict__, "peer_batches": args.peer_batches})
            prompt_len, gen_len = sc.short if sc.short and not args.full else (args.prompt_len, args.gen_len)
            print(f"== scenario {name}: {sc.note}, prompt {prompt_len}, gen {gen_len}, cap {sc.cap}",
                  file=sys.stderr)
            planned = prepare_model(sc)
            rows = [run_flexgraph(sc, prompt_len, gen_len, work, False, args.timeout)]
            planned = (rows[0].detail.get("policy") or {}).get("dtype", planned)
            if args.compress and sc.dummy:
                rows.append(run_flexgraph(sc, prompt_len, gen_len, work, True, args.timeout))
            if not args.no_peers:
                dtypes = peer_dtypes(args.peer_dtype, planned)
                rows += [run_peer(sc, peer, prompt_len, gen_len, args.timeout, args.peer_huge_pages, d,
                                  peer_system(peer, d, planned, h), args.peer_checkpoint, h)
                         for peer in sc.peers for d in dtypes for h in head_inputs]
            report["scenarios"][name] = {"note": sc.note, "cap": sc.cap, "model": sc.model,
                                         "workload": {"prompt_len": prompt_len, "gen_len": gen_len},
                                         "rows": [r.__dict__ for r in rows], "ratios": ratios(rows)}
            print(json.dumps({"scenario": name, "ratios": report["scenarios"][name]["ratios"]}), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    print()
    print(markdown(report))
    parts = parts_markdown(report)
    if parts:
        print()
        print(parts)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
