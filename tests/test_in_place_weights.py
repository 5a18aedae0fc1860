"""Weights read in place from the weight store take no room in --offload-dir.

The disk tier's capacity is the free space at --offload-dir; a disk-homed weight the store
already holds in the run's dtype is read from the store's own file, so charging it to that
free space refused plans a machine could run (OPT-6.7B under 8 GiB with 15 GB free).
"""

import pytest
import torch

from flexgraph.errors import PlanError, RuleViolation
from flexgraph.graph.builder import Workload
from flexgraph.models.builtin import builtin_config
from flexgraph.models.sampling import SamplingParams
from flexgraph.models.spec import ModelSpec
from flexgraph.plan.planner import Knobs, make_plan, plan_for_policy, replay_plan, weights_read_in_place
from flexgraph.plan.policy import Policy, Split, policy_weight_placement
from flexgraph.plan.search import search_policy
from flexgraph.weights.dummy import write_dummy
from flexgraph.weights.resolve import in_place_dtype, resolve_model
from test_cost import calibration, with_matmul
from test_planner import TINY

OPT = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))
WL = Workload(8, 64, 4)


def _disk_weight_bytes(spec, policy):
    return sum(b.get("disk", 0) for b in policy_weight_placement(spec, policy).bytes_per_tier)


def test_in_place_weights_are_not_disk_homes():
    pol = Policy(8, 1, Split(0, 20), Split(0, 0), Split(0, 100), schedule="row", dtype="bfloat16")
    unbounded = {"gpu": None, "cpu": 1 << 50, "disk": 1 << 50}
    _g, copied = plan_for_policy(OPT, WL, pol, False, unbounded)
    _g, in_place = plan_for_policy(OPT, WL, pol, False, unbounded, weights_in_place=True)
    on_disk = _disk_weight_bytes(OPT, pol)
    assert on_disk > 1 << 30
    assert copied.home_bytes["disk"] - in_place.home_bytes["disk"] == on_disk
    assert copied.home_bytes["cpu"] == in_place.home_bytes["cpu"]
    # a disk that holds the cache but not a copy of the weights
    cap = {"gpu": None, "cpu": 1 << 50, "disk": in_place.peak["disk"] + (1 << 20)}
    plan_for_policy(OPT, WL, pol, False, cap, weights_in_place=True)
    with pytest.raises(RuleViolation, match="disk"):
        plan_for_policy(OPT, WL, pol, False, cap)


@pytest.mark.parametrize("kept, storage, compress, expected", [
    ("*", None, False, True),                 # a dummy: generated in the plan's dtype
    ("*", "float16", False, True),
    ("bfloat16", None, False, True),          # a store of bfloat16 matrices, a bfloat16 plan
    ("float32", None, False, False),          # converted into the run folder
    ("bfloat16", "float16", False, False),
    ("*", None, True, False),                 # 4-bit weights are written to the run folder
    (None, None, False, False),               # a store still to be converted: not known
])
def test_which_plans_read_weights_in_place(kept, storage, compress, expected):
    pol = Policy(8, 1, Split(0, 20), Split(0, 0), Split(0, 100), schedule="row", dtype="bfloat16",
                 compress_weight=compress, storage_dtype=storage)
    assert weights_read_in_place({"weights_in_place": kept}, pol) is expected


def test_search_puts_weights_on_a_disk_that_holds_only_the_cache():
    model = with_matmul(calibration(), OPT)
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": 2 << 30, "disk_mem": 512 << 20}
    with pytest.raises(PlanError, match="no policy fits"):
        search_policy(OPT, WL, hw, Knobs(), model)      # 2.6 GB of weights: RAM and a copy cannot hold them
    best = search_policy(OPT, WL, {**hw, "weights_in_place": "*"}, Knobs(), model)[0].policy
    assert _disk_weight_bytes(OPT, best) > 512 << 20


def test_refs_say_which_dtype_their_store_keeps(tmp_path):
    assert in_place_dtype(resolve_model("opt-125m", dummy=True)) == "*"
    for dtype in (torch.bfloat16, torch.float32):
        path = tmp_path / str(dtype)
        write_dummy(TINY, path, dtype, seed=1, progress=False)
        assert in_place_dtype(resolve_model(str(path))) == str(dtype).split(".")[-1]


def test_a_plan_carries_it_and_its_replay_agrees():
    """make_plan records the store's dtype; the executor's re-check builds the same homes."""
    ref = resolve_model("opt-1.3b", dummy=True)
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": 2 << 30, "disk_mem": 512 << 20, "offload_dir": "."}
    plan = make_plan(ref, WL, SamplingParams(), hw, Knobs(dtype="bfloat16"))
    assert plan.hardware["weights_in_place"] == "*"
    assert plan.placement["weights_achieved"]["disk"] > 0
    assert any("read in place" in n for n in plan.chosen["notes"])
    _g, checked = replay_plan(plan)
    assert checked.home_bytes == plan.residency["home"]
    assert checked.home_bytes["disk"] < 512 << 20


def test_a_converted_model_is_not_counted_on():
    """Whether this machine converted a GGUF already must not change its plan."""
    assert in_place_dtype(resolve_model("smollm2-135m")) is None
