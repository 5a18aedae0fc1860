"""The working dtype on a CPU: bfloat16 where the CPU multiplies it well, else float32.

Measured once per machine and cached; the rates are injected here so the choice is
tested for both kinds of CPU (AMX: bfloat16 ~5x float32; AVX2 only: ~0.16x) on any
machine, and one test measures this machine for real.
"""

import json

import pytest

from flexgraph import calibrate
from flexgraph.cli import main
from flexgraph.plan.planfile import load_plan

AMX = {"float32": 100e9, "bfloat16": 500e9}
AVX2 = {"float32": 110e9, "bfloat16": 17e9}


@pytest.mark.parametrize("rates, expected", [
    (AMX, "bfloat16"),
    (AVX2, "float32"),
    ({"float32": 100e9, "bfloat16": 50e9}, "bfloat16"),      # at the threshold: half the bytes win
    ({"float32": 100e9, "bfloat16": 49e9}, "float32"),
])
def test_choice_follows_the_rates(rates, expected):
    choice = calibrate.choose_cpu_dtype(rates)
    assert choice.dtype == expected
    assert f"{rates['bfloat16'] / rates['float32']:.2f}x" in choice.note()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXGRAPH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_measured_once_then_read_from_the_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure_cpu_dtype_rates", lambda: calls.append(1) or dict(AVX2))
    assert calibrate.cpu_dtype_choice().dtype == "float32"
    assert calibrate.cpu_dtype_choice().dtype == "float32"
    assert len(calls) == 1
    [saved] = (cache / "calibration").glob("*-dtype.json")
    assert json.loads(saved.read_text())["rates"] == AVX2
    saved.write_text("{not json")                        # a damaged cache is measured again
    assert calibrate.cpu_dtype_choice().dtype == "float32" and len(calls) == 2
    monkeypatch.setattr(calibrate, "measure_cpu_dtype_rates", lambda: calls.append(1) or dict(AMX))
    assert calibrate.cpu_dtype_choice(recalibrate=True).dtype == "bfloat16" and len(calls) == 3


def test_this_machines_rates_are_real():
    rates = calibrate.measure_cpu_dtype_rates()
    assert set(rates) == {"float32", "bfloat16"}
    assert all(1e8 < r < 1e15 for r in rates.values())    # FLOP/s of a CPU, not a unit slip


@pytest.mark.parametrize("rates, expected", [(AMX, "bfloat16"), (AVX2, "float32")])
def test_plan_without_dtype_uses_the_choice_and_says_why(cache, tmp_path, monkeypatch, capsys, rates, expected):
    monkeypatch.setattr(calibrate, "measure_cpu_dtype_rates", lambda: dict(rates))
    out = tmp_path / "plan.json"
    args = ["plan", "--search", "rule", "--model", "opt-125m", "--dummy", "--prompt-len", "16", "--gen-len", "4",
            "--cpu-mem", "2GiB", "--offload-dir", str(tmp_path / "off"), "--out", str(out)]
    assert main(args) == 0
    p = load_plan(out)
    assert p.policy.dtype == expected
    assert any(n.startswith(f"dtype {expected}:") for n in p.chosen["notes"])
    assert main([*args, "--dtype", "float16"]) == 0                # the user's choice wins, without a note
    p = load_plan(out)
    assert p.policy.dtype == "float16" and not any(n.startswith("dtype") for n in p.chosen["notes"])
