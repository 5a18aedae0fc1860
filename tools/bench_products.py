"""Products of few rows: ``F.linear`` (x @ W^T) against the engine's ``layers.dense_linear``.

A decode step multiplies each weight by a handful of rows (the GPU batch).  MKL's float32
GEMM packs its right-hand operand on every call, which in ``x @ W^T`` is the whole weight;
``dense_linear`` computes ``(W @ x^T)^T`` up to ``layers.SKINNY_ROWS`` rows instead.  This
times both, side by side, for each matrix shape of a built-in model, and reports the rate
each reaches against the machine's large-product rate and its memory bandwidth (a
product of few rows should be bound by reading the weight once)::

    python tools/bench_products.py --model opt-1.3b --rows 8,16,64,256,512

Prints one JSON object and a markdown table.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from flexgraph.calibrate import _best_time
from flexgraph.models import layers as L
from flexgraph.models.builtin import builtin_config
from flexgraph.models.spec import EMBED, ModelSpec


def matrix_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """The distinct [N, K] matrices the model multiplies by (the embedding layer's tables
    are looked up, not multiplied)."""
    shapes: list[tuple[int, int]] = []
    for j in range(spec.num_layers):
        if spec.layer(j).kind == EMBED:
            continue
        for w in spec.layer_weights(j):
            if len(w.shape) == 2 and tuple(w.shape) not in shapes:
                shapes.append(tuple(w.shape))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="opt-1.3b", help="a built-in model id")
    ap.add_argument("--rows", default="8,16,64,256,512", help="comma-separated row counts")
    args = ap.parse_args()
    spec = ModelSpec.from_hf_config(builtin_config(args.model))
    rows_list = [int(r) for r in args.rows.split(",")]
    big = torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / _best_time(lambda: big @ big, min_seconds=0.2)  # FLOP/s of a large product
    src, dst = torch.empty(64 << 20, dtype=torch.uint8), torch.empty(64 << 20, dtype=torch.uint8)
    mem = 2 * src.numel() / _best_time(lambda: dst.copy_(src), min_seconds=0.2)  # bytes/s read + written
    results = []
    torch.manual_seed(0)
    for n, k in matrix_shapes(spec):
        weight = torch.randn(n, k)
        for rows in rows_list:
            x = torch.randn(rows, k)
            t_linear = _best_time(lambda: F.linear(x, weight), min_seconds=0.2)
            t_engine = _best_time(lambda: L.dense_linear(x, weight, None), min_seconds=0.2)
            flops, nbytes = 2 * rows * n * k, weight.numel() * 4
            # the roofline: the weight read once at memory bandwidth, or the FLOPs at the large-product rate
            roof = max(nbytes / mem, flops / peak)
            results.append({"shape": [n, k], "rows": rows, "skinny": L.is_skinny(rows, x),
                            "f_linear_ms": t_linear * 1e3, "engine_ms": t_engine * 1e3,
                            "speedup": t_linear / t_engine, "engine_of_roofline": roof / t_engine})
    report = {"model": args.model, "large_product_gflops": peak / 1e9, "mem_gbps": mem / 1e9, "results": results}
    print(json.dumps(report, indent=1))
    print(f"\nlarge products {peak / 1e9:.0f} GFLOP/s, memory {mem / 1e9:.1f} GB/s\n")
    print("| matrix [N, K] | rows | F.linear ms | engine ms | speedup | engine of roofline |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['rows']} | {r['f_linear_ms']:.2f} | {r['engine_ms']:.2f} "
              f"| {r['speedup']:.2f}x | {r['engine_of_roofline']:.0%} |")


if __name__ == "__main__":
    main()
