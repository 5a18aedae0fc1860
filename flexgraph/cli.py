"""The ``flexgraph`` command: ``plan`` and ``execute``.

Every user error (a :class:`~flexgraph.errors.FlexgraphError`) is printed as one line,
``error: ...``, with exit status 2; Ctrl-C exits with 130 after cleaning up.
"""

from __future__ import annotations

import argparse
import sys
import time

from flexgraph.errors import FlexgraphError


def _percent(values: list[str]) -> tuple[float, ...]:
    try:
        nums = tuple(float(v) for v in values)
    except ValueError:
        raise FlexgraphError(f"--percent takes six numbers (W_GPU W_CPU KV_GPU KV_CPU ACT_GPU ACT_CPU), "
                             f"got {' '.join(values)}") from None
    return nums


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``) like every other error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1 (got {text!r})")
    return value


def _add_sampling_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    g = p.add_argument_group("sampling" + ("" if defaults else " (override the plan's)"))
    g.add_argument("--do-sample", action="store_true", default=d(False) if defaults else None,
                   help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=d(1.0))
    g.add_argument("--top-k", type=int, default=d(0), help="0 = off")
    g.add_argument("--top-p", type=float, default=d(1.0), help="1.0 = off")
    g.add_argument("--seed", type=int, default=d(0), help="sampling seed")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable; needs a tokenizer)")
    g.add_argument("--ignore-eos", action="store_true", default=d(False) if defaults else None,
                   help="always generate --gen-len tokens (FlexGen's benchmark does)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flexgraph", description=__doc__.splitlines()[0])
    parser.add_argument("--log-format", choices=("console", "json"), default=None,
                        help="log lines on stderr: human-readable (default) or JSON lines")
    parser.add_argument("--log-level", default=None, help="debug, info (default), warning")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="choose a policy and a valid traversal; write plan.json")
    p.add_argument("--model", default="smollm2-135m",
                   help="model folder, .gguf file, built-in id (with --dummy) or 'smollm2-135m' (default)")
    p.add_argument("--dummy", action="store_true", help="random weights of the model's architecture")
    p.add_argument("--dummy-seed", type=int, default=0)
    p.add_argument("--out", default="plan.json", help="plan file to write (default plan.json)")
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-len", type=_positive_int, default=512)
    w.add_argument("--gen-len", type=_positive_int, default=32)
    w.add_argument("--num-prompts", type=_positive_int, default=None,
                   help="prompts to plan for (default: one block, or 32)")
    pol = p.add_argument_group("policy (left out = chosen automatically)")
    pol.add_argument("--percent", nargs=6, metavar="P", default=None,
                     help="W_GPU W_CPU KV_GPU KV_CPU ACT_GPU ACT_CPU; disk gets the rest")
    pol.add_argument("--gpu-batch-size", type=_positive_int, default=None)
    pol.add_argument("--num-gpu-batches", type=_positive_int, default=None)
    pol.add_argument("--schedule", choices=("row", "zigzag"), default=None)
    pol.add_argument("--no-prefetch", action="store_true", help="load each input right before its compute")
    pol.add_argument("--search", choices=("cost", "rule"), default="cost",
                     help="how knobs left out are chosen: 'cost' searches by the calibrated cost model "
                          "(default), 'rule' uses the simple fill-the-fastest-tier rule")
    pol.add_argument("--recalibrate", action="store_true", help="measure this machine's rates again")
    pol.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                     help="torch.compile the layer maths when executing (auto: 16-bit runs long enough to "
                          "repay about a minute of compiling)")
    pol.add_argument("--compress-weight", action="store_true")
    pol.add_argument("--compress-cache", action="store_true")
    pol.add_argument("--cpu-cache-compute", action="store_true")
    pol.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="working dtype (default: float16 on CUDA; on a CPU bfloat16 where it multiplies "
                          "bfloat16 at least half as fast as float32 (AMX, AVX512-BF16), else float32)")
    pol.add_argument("--storage-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="dtype weight matrices and KV cache are kept in on every tier, converted to the "
                          "working dtype where used (default: the search weighs bfloat16 against the working "
                          "dtype when that is float32; --search rule keeps the working dtype)")
    hw = p.add_argument_group("hardware (left out = detected)")
    hw.add_argument("--device", choices=("cpu", "cuda"), default=None)
    hw.add_argument("--gpu-mem", default=None, help="gpu tier size; on a CPU-only machine, simulates one")
    hw.add_argument("--cpu-mem", default=None)
    hw.add_argument("--disk-mem", default=None)
    hw.add_argument("--offload-dir", default=None, help="where disk-tier data lives")
    _add_sampling_args(p, defaults=True)

    e = sub.add_parser("execute", help="run a plan: generate for a prompts file or the plan's synthetic workload")
    e.add_argument("plan", help="plan.json made by flexgraph plan")
    e.add_argument("--prompts", default=None, help='JSONL: {"id": ..., "prompt": "text"} or {"id": ..., "input_ids": [...]}')
    e.add_argument("--out", default=None, help="results JSONL, appended block by block; rerun to resume")
    e.add_argument("--metrics", default=None, help="write metrics JSON here")
    e.add_argument("--trace", default=None, help="write a Chrome trace (one track per lane) here")
    e.add_argument("--no-overlap", action="store_true", help="run every node after the previous one finished")
    e.add_argument("--no-verify", action="store_true", help="skip the one-time weight checksum verification")
    e.add_argument("--compile", choices=("plan", "on", "off"), default="plan",
                   help="torch.compile the layer maths (fused element-wise work; about a minute up front); "
                        "default: as the plan says")
    e.add_argument("--offload-dir", default=None, help="override the plan's folder for disk-tier data")
    e.add_argument("--show", type=int, default=8, metavar="N", help="print the first N completions (default 8)")
    _add_sampling_args(e, defaults=False)
    return parser


def load_cost_model(spec, hardware: dict, dtype: str | None, recalibrate: bool = False, compiled: bool = False,
                    compress_weight: bool = False, compress_cache: bool = False, storage: tuple = (),
                    uses_disk: bool = True):
    """The calibrated cost model for ``spec`` on this machine (measuring what is missing);
    ``storage``: the storage dtypes plans may use (their conversion rates are measured);
    ``uses_disk``: whether plans may reach the disk (its rates are then measured again if stale)."""
    from flexgraph.calibrate import (ensure_cast, ensure_dequant, ensure_layers, ensure_matmul, load_calibration,
                                     refresh_disk)
    from flexgraph.plan.cost import CostModel
    from flexgraph.plan.planner import default_dtype
    from flexgraph.plan.policy import DTYPES

    torch_dtype = DTYPES[dtype or default_dtype(hardware.get("device", "cpu"))]
    has_gpu = hardware.get("gpu_mem") is not None
    cal = load_calibration(hardware.get("device", "cpu"), torch_dtype, hardware["offload_dir"], has_gpu, recalibrate)
    if uses_disk:
        refresh_disk(cal, torch_dtype, hardware["offload_dir"], has_gpu)
    model = CostModel(spec, cal, torch_dtype.itemsize, compress_weight=compress_weight,
                      compress_cache=compress_cache)
    ensure_matmul(cal, model.matmul_shapes(), torch_dtype, has_gpu)
    ensure_layers(cal, model, torch_dtype, compiled, has_gpu)
    if compress_weight or compress_cache:
        ensure_dequant(cal, torch_dtype, has_gpu)
    for name in storage:
        if name is not None and DTYPES[name] != torch_dtype:
            ensure_cast(cal, DTYPES[name], torch_dtype, has_gpu)
    return model


def cmd_plan(args: argparse.Namespace) -> int:
    from flexgraph import hugepages
    from flexgraph.graph.builder import Workload
    from flexgraph.hardware import detect_hardware
    from flexgraph.log import get_logger
    from flexgraph.models.sampling import SamplingParams
    from flexgraph.plan.planfile import save_plan
    from flexgraph.plan.planner import (COMPILE_MEMORY, Knobs, default_dtype, make_plan, may_use_disk, should_compile,
                                        storage_choices)
    from flexgraph.plan.policy import DTYPES
    from flexgraph.plan.summary import plan_summary
    from flexgraph.weights.resolve import resolve_model

    hugepages.for_calibration()
    log = get_logger("flexgraph.plan")
    t0 = time.perf_counter()
    ref = resolve_model(args.model, dummy=args.dummy, seed=args.dummy_seed)
    hardware = detect_hardware(device=args.device, gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem,
                               disk_mem=args.disk_mem, offload_dir=args.offload_dir)
    num_prompts = args.num_prompts
    if num_prompts is None:
        num_prompts = (args.gpu_batch_size * args.num_gpu_batches
                       if args.gpu_batch_size and args.num_gpu_batches else 32)
    workload = Workload(num_prompts, args.prompt_len, args.gen_len)
    sampling = SamplingParams(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()),
                              ignore_eos=args.ignore_eos)
    knobs = Knobs(gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                  percent=_percent(args.percent) if args.percent else None, schedule=args.schedule,
                  dtype=args.dtype, compress_weight=args.compress_weight, compress_cache=args.compress_cache,
                  cpu_cache_compute=args.cpu_cache_compute, prefetch=not args.no_prefetch,
                  storage_dtype=args.storage_dtype)
    if workload.prompt_len + workload.gen_len > ref.spec.max_position_embeddings:
        raise FlexgraphError(f"--prompt-len {workload.prompt_len} + --gen-len {workload.gen_len} exceed the "
                             f"model's {ref.spec.max_position_embeddings} positions; shorten them")
    dtype = knobs.dtype or default_dtype(hardware.device, recalibrate=args.recalibrate)
    compiled = args.compile == "on" or (args.compile == "auto" and should_compile(ref.spec, workload, dtype,
                                                                                  hardware.cpu_mem))
    hw = hardware.to_json()
    if compiled:            # the compiler's memory comes out of what the plan may fill
        hw["cpu_mem"] = max(0, hw["cpu_mem"] - COMPILE_MEMORY)
        hw.setdefault("sources", {})["compile"] = f"{COMPILE_MEMORY} bytes of the cpu tier kept for torch.compile"
    cost_model = None
    if args.search == "cost":
        uses_disk = may_use_disk(ref.spec, workload, hw, knobs, DTYPES[dtype].itemsize)
        cost_model = load_cost_model(ref.spec, hw, dtype, args.recalibrate, compiled, knobs.compress_weight,
                                     knobs.compress_cache, storage_choices(knobs, dtype), uses_disk)
    plan = make_plan(ref, workload, sampling, hw, knobs, cost_model)
    plan.compile = compiled
    save_plan(plan, args.out)
    elapsed = time.perf_counter() - t0
    print(plan_summary(plan))
    log.info("plan_written", out=args.out, nodes=len(plan.path), seconds=round(elapsed, 2))
    return 0


def cmd_execute(args: argparse.Namespace) -> int:
    from flexgraph import hugepages, malloc_threshold
    from flexgraph.exec.executor import ExecOptions
    from flexgraph.exec.run import load_prompts, run_plan
    from flexgraph.log import get_logger
    from flexgraph.plan.planfile import load_plan
    from flexgraph.weights.resolve import ModelRef, materialize

    plan = load_plan(args.plan)
    host = {k: plan.residency[k]["cpu"] for k in ("peak", "home", "capacity")}
    huge = hugepages.choose(host["peak"], host["home"], host["capacity"])
    fixed = not huge and malloc_threshold.fix()          # tight: stop malloc's arenas hoarding
    get_logger("flexgraph.execute").info("huge_pages", on=huge, planned_peak=host["peak"], planned_home=host["home"],
                                         capacity=host["capacity"], malloc_threshold_fixed=fixed)
    ref = ModelRef.from_json(plan.model)
    # dummy weights are made in the dtype the plan keeps them in (read in place, not converted)
    store = materialize(ref, dtype=plan.policy.store_torch_dtype if ref.dummy else None)
    sampling = plan.sampling.override(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    prompts = load_prompts(args.prompts, store, plan)
    options = ExecOptions(overlap=not args.no_overlap, verify=not args.no_verify, offload_dir=args.offload_dir,
                          compile=plan.compile if args.compile == "plan" else args.compile == "on")
    report = run_plan(plan, store, prompts, sampling, results_path=args.out, metrics_path=args.metrics,
                      trace_path=args.trace, options=options)
    for line in report.results[: args.show]:
        shown = line["text"] if line["text"] is not None else " ".join(map(str, line["output_ids"][:16]))
        print(f"[{line['id']}] {shown!r} ({line['finish_reason']})")
    if len(report.results) > args.show:
        print(f"... {len(report.results) - args.show} more" + (f" in {args.out}" if args.out else ""))
    if report.skipped_blocks:
        print(f"resumed: {report.skipped_blocks} finished block(s) in {args.out} kept")
    tp = report.metrics.get("throughput")
    if tp:
        m = report.metrics
        overlap = "" if m.get("overlap_ratio") is None else f", I/O hidden behind compute {m['overlap_ratio']:.0%}"
        print(f"throughput: {tp['total']:.1f} tokens/s total (prefill {tp['prefill']:.1f}, decode "
              f"{tp['decode'] or 0:.1f}); {m['num_sequences']} sequences, {m['seconds']['total']:.2f} s; "
              f"executor overhead {m['executor_overhead']:.1%}{overlap}")
        per_block = (plan.estimate or {}).get("block_seconds")
        total = m["seconds"]["total"]
        if per_block and total:       # the plan's estimate for the blocks this run computed
            est = per_block * m["blocks"]
            print(f"estimate: {est:.2f} s for {m['blocks']} block(s), {(est - total) / total:+.0%} against the "
                  "measured time (plan --search cost)")
    return 0


COMMANDS = {"plan": cmd_plan, "execute": cmd_execute}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:       # --help, or a usage error already printed on one line
        return int(e.code or 0)
    from flexgraph.log import configure
    configure(args.log_format, args.log_level)
    try:
        return COMMANDS[args.command](args)
    except FlexgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished work was kept, partial outputs removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
