"""`flexgraph execute`'s summary: throughput, and the plan's estimate against the run."""

import json

import pytest

from exec_helpers import tiny_store
from flexgraph.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    _hf, store = tiny_store("llama-tied-gqa3", tmp_path_factory.mktemp("execute"))
    return store


def _plan(store, tmp_path, num_prompts: int) -> str:
    path = tmp_path / "plan.json"
    assert main(["plan", "--search", "rule", "--model", str(store.path), "--prompt-len", "8", "--gen-len", "4",
                 "--num-prompts", str(num_prompts), "--gpu-batch-size", "2", "--num-gpu-batches", "1",
                 "--dtype", "float32", "--offload-dir", str(tmp_path / "offload"), "--out", str(path)]) == 0
    return str(path)


def _summary(capsys) -> dict[str, str]:
    lines = capsys.readouterr().out.splitlines()
    return {ln.split(":")[0]: ln for ln in lines if ln.startswith(("throughput:", "estimate:"))}


def test_the_summary_sets_the_plans_estimate_against_the_measured_time(store, tmp_path, capsys):
    path = _plan(store, tmp_path, num_prompts=6)            # three blocks of two
    plan = json.loads(open(path).read())
    plan["estimate"] = {"block_seconds": 1e-6}              # as if made by --search cost
    open(path, "w").write(json.dumps(plan))
    capsys.readouterr()
    assert main(["execute", path]) == 0
    # 3 x 1 us estimated against a run of milliseconds: -100%
    assert _summary(capsys)["estimate"] == ("estimate: 0.00 s for 3 block(s), -100% against the measured time "
                                            "(plan --search cost)")


def test_a_plan_without_an_estimate_prints_none(store, tmp_path, capsys):
    path = _plan(store, tmp_path, num_prompts=2)
    capsys.readouterr()
    assert main(["execute", path]) == 0
    out = _summary(capsys)
    assert "throughput" in out and "estimate" not in out
