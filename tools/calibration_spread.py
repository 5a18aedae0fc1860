"""How far the layer calibration moves from one calibration to the next, two ways side by side.

The cost model scales each layer kind's analytic time by what timing its real maths
measured (:func:`flexgraph.calibrate.measure_layers`), so whatever that timing catches
of the host's mood goes straight into every estimate.  This calibrates a model's layers
``--repeats`` times each way, alternating the two so both meet the same host:

- **back to back**: each (kind, point) timed in ``LAYER_ROUNDS`` rounds in a row, the
  median kept (how calibration worked before 2026-12-06);
- **interleaved**: each round times every (kind, point) once, rounds repeating until they
  span ``LAYER_MIN_SPAN_SECONDS`` (what ``measure_layers`` does now);

and prints, per point, the ratio's range over the calibrations and its spread (standard
deviation over mean), as JSON and a markdown table::

    python tools/calibration_spread.py --model smollm2-135m --repeats 6

Uses the cached calibration's matmul rates for the analytic times (measuring the
model's shapes first if they are missing); runs on the CPU in the working dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from flexgraph import calibrate as C
from flexgraph.plan.cost import CostModel
from flexgraph.plan.planner import default_dtype
from flexgraph.plan.policy import DTYPES
from flexgraph.weights.resolve import resolve_model


def back_to_back(steps: list[C.TimedStep]) -> None:
    """Each step's rounds in a row, one step after another."""
    with torch.inference_mode():
        for step in steps:                                      # a warm-up call, then the rounds
            step.times += C._round_times(step.run, C.LAYER_ROUNDS, C.LAYER_ROUND_SECONDS)


SCHEMES = {"back to back": back_to_back, "interleaved": C.time_interleaved}


def calibrate_once(model: CostModel, dtype: torch.dtype, scheme: str) -> dict[str, list[list[float]]]:
    steps = C.layer_steps(model, dtype, False, torch.device("cpu"))
    SCHEMES[scheme](steps)
    return C.layer_corrections(steps)


def spread(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    return {"ratios": [round(v, 3) for v in values], "min": min(values), "max": max(values),
            "spread": statistics.pstdev(values) / mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a built-in architecture or model id")
    ap.add_argument("--repeats", type=int, default=6, help="calibrations each way (default 6)")
    ap.add_argument("--dtype", default=None, help="working dtype (default: the planner's for this CPU)")
    args = ap.parse_args()
    spec = resolve_model(args.model, dummy=True).spec
    name = args.dtype or default_dtype("cpu")
    dtype = DTYPES[name]
    with tempfile.TemporaryDirectory() as scratch:
        cal = C.load_calibration("cpu", dtype, scratch, False)
    model = CostModel(spec, cal, dtype.itemsize)
    C.ensure_matmul(cal, model.matmul_shapes(), dtype, False)
    runs: dict[str, list[dict]] = {scheme: [] for scheme in SCHEMES}
    for i in range(args.repeats):
        for scheme in SCHEMES:
            start = time.perf_counter()
            runs[scheme].append(C._in_thread(calibrate_once, model, dtype, scheme))
            print(json.dumps({"repeat": i, "scheme": scheme, "seconds": round(time.perf_counter() - start, 1)}),
                  flush=True)
    points = sorted({(key, tokens) for table in runs["interleaved"] for key, rows in table.items()
                     if not key.endswith("embed") for tokens, _ in rows})      # (the embedding's is the MLP's)
    result = {"model": spec.name, "dtype": name, "repeats": args.repeats, "points": []}
    for key, tokens in points:
        row = {"kind": key, "tokens": tokens}
        for scheme, tables in runs.items():
            row[scheme] = spread([dict((int(t), r) for t, r in table[key])[tokens] for table in tables])
        result["points"].append(row)
    result["mean spread"] = {scheme: statistics.fmean(p[scheme]["spread"] for p in result["points"])
                             for scheme in SCHEMES}
    print(json.dumps(result, indent=1))
    print("\n| kind | tokens | " + " | ".join(f"{s}: range (spread)" for s in SCHEMES) + " |")
    print("|---|---:|" + "---:|" * len(SCHEMES))
    for p in result["points"]:
        cells = [f"{p[s]['min']:.2f}-{p[s]['max']:.2f} ({p[s]['spread']:.0%})" for s in SCHEMES]
        print(f"| {p['kind']} | {p['tokens']} | " + " | ".join(cells) + " |")
    print("| mean | | " + " | ".join(f"({result['mean spread'][s]:.0%})" for s in SCHEMES) + " |")


if __name__ == "__main__":
    main()
