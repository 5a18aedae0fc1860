"""tools/bench.py's comparison of the cost model's estimate with a run, part by part."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH_PY = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_under_test"] = mod
    spec.loader.exec_module(mod)
    return mod


# An estimate of two blocks (its lane_busy is per block, its parts and total for the run)
# and a run's metrics: the prefill's MLP ran 20% over, the decode's attention as modelled,
# a store the model did not expect, and the compute lane waited 3 s instead of 1.
ESTIMATE = {"total_seconds": 21.0, "lane_busy": {"compute": 10.0, "store_cache": 0.5},
            "parts": {"compute prefill mlp": 10.0, "compute decode attn": 10.0}}
METRICS = {"blocks": 2, "seconds": {"total": 30.0},
           "lanes": {"compute": {"busy_seconds": 27.0}, "store_cache": {"busy_seconds": 2.0}},
           "parts": {"compute prefill mlp": 12.5, "compute decode attn": 10.0, "store_cache prefill attn": 2.0}}


def test_estimate_parts_pairs_each_part_and_the_compute_lanes_idle_time(bench):
    parts = bench.estimate_parts(ESTIMATE, METRICS)
    assert set(parts) == {"compute prefill mlp", "compute decode attn", "store_cache prefill attn",
                          bench.COMPUTE_IDLE}
    assert parts["compute prefill mlp"] == {"estimate": 10.0, "measured": 12.5, "error": pytest.approx(-0.2)}
    assert parts["compute decode attn"]["error"] == 0.0
    assert parts["store_cache prefill attn"] == {"estimate": 0.0, "measured": 2.0, "error": -1.0}
    # idle: 21 - 2 x 10 estimated, 30 - 27 measured
    assert parts[bench.COMPUTE_IDLE] == {"estimate": pytest.approx(1.0), "measured": pytest.approx(3.0),
                                         "error": pytest.approx(-2 / 3)}


def test_a_plan_or_run_from_before_parts_gives_no_parts(bench):
    assert bench.estimate_parts({k: v for k, v in ESTIMATE.items() if k != "parts"}, METRICS) == {}
    assert bench.estimate_parts(ESTIMATE, {k: v for k, v in METRICS.items() if k != "parts"}) == {}


def test_the_parts_table_lists_flexgraphs_parts_over_a_share_of_the_run(bench):
    detail = {"seconds": METRICS["seconds"], "estimate_parts": bench.estimate_parts(ESTIMATE, METRICS)}
    report = {"scenarios": {"b": {"rows": [
        {"system": "flexgraph", "detail": detail},
        {"system": "accelerate", "detail": {"estimate_parts": detail["estimate_parts"]}}]}}}
    lines = bench.parts_markdown(report, share=0.09).splitlines()
    # 12.5, 10 and 3 of 30 s are over 9%; the store's 2 s is not; the peer has no parts
    assert [ln.split(" | ")[1] for ln in lines[2:]] == ["compute prefill mlp", "compute decode attn",
                                                        bench.COMPUTE_IDLE]
    assert lines[2] == "| b flexgraph | compute prefill mlp | 10.0 | 12.5 | -20% |"
    assert bench.parts_markdown({"scenarios": {}}) == ""


def test_a_peer_row_is_named_by_what_differs_from_flexgraphs_run(bench):
    assert bench.peer_system("accelerate", "bfloat16", "bfloat16", "contiguous") == "accelerate"
    assert bench.peer_system("accelerate", "float32", "bfloat16", "contiguous") == "accelerate (float32)"
    assert bench.peer_system("transformers", "bfloat16", "bfloat16", "as-is") == "transformers (head as shipped)"
    assert bench.peer_system("accelerate", "float32", "bfloat16", "as-is") == \
        "accelerate (float32, head as shipped)"


def test_the_prefill_ceiling_bounds_the_ratio_to_each_peer(bench):
    # flexgraph's plan: 100 tok/s at best if the decode and every byte were free; a peer
    # at 40 can be beaten 2.5x at most, whatever the plan
    fg = bench.Row("b", "flexgraph", 30.0, {"ok": True, "prefill_ceiling": 100.0, "of_roofline": 0.9})
    peer = bench.Row("b", "accelerate", 40.0, {"best_batch": 8, "dtype": "bfloat16"})
    failed = bench.Row("b", "transformers", None, {"best_batch": None})
    out = bench.ratios([fg, peer, failed])
    assert out["ceiling/accelerate"] == pytest.approx(2.5)
    assert out["flexgraph/accelerate"] == pytest.approx(0.75)
    assert "ceiling/transformers" not in out and "ceiling/flexgraph" not in out
    rows = [{"system": r.system, "throughput": r.throughput, "detail": r.detail} for r in (fg, peer)]
    table = bench.markdown({"scenarios": {"b": {"rows": rows}}}).splitlines()
    assert "prefill ceiling 100.0 tok/s" in table[2]
    assert "the prefill ceiling is 2.50x this" in table[3]
    # a plan from before the ceiling was recorded: no claim about it
    fg.detail.pop("prefill_ceiling")
    assert not any(k.startswith("ceiling/") for k in bench.ratios([fg, peer]))


def test_the_prefill_ceiling_is_the_higher_of_the_calibrated_and_the_run(bench):
    assert bench.prefill_ceiling({"prefill_ceiling_calibrated": 7.4, "prefill_ceiling_measured": 8.3}) == 8.3
    assert bench.prefill_ceiling({"prefill_ceiling_calibrated": 3.2, "prefill_ceiling_measured": 3.1}) == 3.2
    assert bench.prefill_ceiling({"prefill_ceiling_measured": 8.3}) == 8.3      # a plan without an estimate
    assert bench.prefill_ceiling({}) is None
