"""`flexgraph plan` end to end, and plan.json loading with its one-line errors."""

import json

import pytest

from flexgraph.cli import main
from flexgraph.errors import PlanError
from flexgraph.plan.planfile import load_plan
from flexgraph.plan.planner import replay_plan

SMALL = ["--search", "rule", "--model", "opt-125m", "--dummy", "--prompt-len", "16", "--gen-len", "4", "--cpu-mem", "2GiB",
         "--disk-mem", "4GiB"]


def plan(tmp_path, *extra, name="plan.json"):
    out = tmp_path / name
    code = main(["plan", *SMALL, "--offload-dir", str(tmp_path / "off"), "--out", str(out), *extra])
    return code, out


def test_plan_writes_a_loadable_checked_plan(tmp_path, capsys):
    code, out = plan(tmp_path, "--gpu-mem", "512MiB", "--percent", "30", "30", "0", "50", "0", "100",
                     "--gpu-batch-size", "4", "--num-gpu-batches", "3", "--num-prompts", "12")
    assert code == 0
    printed = capsys.readouterr().out
    assert "--percent  30 30 0 50 0 100" in printed and "zigzag" in printed and "peak" in printed
    p = load_plan(out)
    assert p.policy.gpu_batch_size == 4 and p.policy.num_gpu_batches == 3
    assert p.model["kind"] == "builtin" and p.model["dummy"]
    assert p.chosen["by"] == "user"
    _graph, checked = replay_plan(p)
    assert checked.peak == p.residency["peak"]
    assert all(checked.peak[t] <= p.residency["capacity"][t] for t in ("gpu", "cpu", "disk"))
    assert not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())   # no weights written


def test_plan_without_knobs_says_what_it_chose(tmp_path, capsys):
    code, out = plan(tmp_path, "--num-prompts", "40")
    assert code == 0
    p = load_plan(out)
    assert p.chosen["by"] == "auto" and p.policy.gpu_batch_size == 32 and p.policy.num_gpu_batches == 2
    assert "chosen by auto" in capsys.readouterr().out


def test_gpu_share_without_gpu_tier_is_one_line(tmp_path, capsys):
    code, out = plan(tmp_path, "--percent", "50", "50", "0", "100", "0", "100")
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--gpu-mem" in err[0]


@pytest.mark.parametrize("args, expected", [
    (["--percent", "60", "60", "0", "100", "0", "100"], "exceed 100%"),
    (["--percent", "a", "b", "c", "d", "e", "f"], "six numbers"),
    (["--gpu-batch-size", "0"], "at least 1"),
    (["--cpu-mem", "lots"], "lots"),
])
def test_bad_plan_arguments(tmp_path, capsys, args, expected):
    code, out = plan(tmp_path, *args)
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_unknown_model_is_one_line(tmp_path, capsys):
    code = main(["plan", "--model", "no-such-model", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no-such-model" in err[0]


def test_planning_opt_175b_writes_no_weights(tmp_path):
    code = main(["plan", "--search", "rule", "--model", "facebook/opt-175b", "--dummy", "--gpu-mem", "16GiB", "--cpu-mem", "208GiB",
                 "--disk-mem", "1.5TB", "--offload-dir", str(tmp_path / "off"), "--out", str(tmp_path / "p.json")])
    assert code == 0
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert files == [tmp_path / "p.json"]


@pytest.fixture
def good_plan(tmp_path):
    _code, out = plan(tmp_path)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="something"), "not a flexgraph plan"),
    (lambda d: d.pop("policy"), "lacks the required key 'policy'"),
    (lambda d: d["path"].append(["zz", 0, 0, 0]), "malformed path"),
    (lambda d: d["policy"].update(schedule="spiral"), "unknown schedule"),
    (lambda d: d["workload"].pop("gen_len"), "malformed section"),
])
def test_bad_plan_files_are_one_line_errors(tmp_path, good_plan, mutate, expected):
    mutate(good_plan)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(good_plan))
    with pytest.raises(PlanError) as e:
        load_plan(f)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_truncated_and_missing_plan_files(tmp_path):
    _code, out = plan(tmp_path)
    text = out.read_text()
    out.write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match="not valid JSON.*truncated"):
        load_plan(out)
    with pytest.raises(PlanError, match="no plan file"):
        load_plan(tmp_path / "nope.json")


def test_edited_path_breaking_a_rule_is_rejected_on_replay(tmp_path):
    _code, out = plan(tmp_path)
    d = json.loads(out.read_text())
    computes = [n for n, e in enumerate(d["path"]) if e[0] == "c"]
    a, b = computes[0], computes[1]
    d["path"][a], d["path"][b] = d["path"][b], d["path"][a]
    out.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="rule 1"):
        replay_plan(load_plan(out))
