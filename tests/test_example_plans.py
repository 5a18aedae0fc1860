"""graphs/ holds example plans; they must stay in step with the planner."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("make_example_plans", ROOT / "tools" / "make_example_plans.py")
examples_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(examples_tool)
EXAMPLES = json.loads((ROOT / "graphs" / "examples.json").read_text())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_plan_is_current(name, tmp_path):
    fresh = tmp_path / f"{name}.json"
    examples_tool.make(name, EXAMPLES[name], fresh)
    committed = json.loads((ROOT / "graphs" / f"{name}.json").read_text())
    regenerated = json.loads(fresh.read_text())
    assert examples_tool.comparable(committed) == examples_tool.comparable(regenerated), (
        f"graphs/{name}.json drifted from the planner; run python tools/make_example_plans.py")


def test_the_comparison_would_notice_a_change():
    committed = json.loads((ROOT / "graphs" / "smollm2-135m.json").read_text())
    changed = json.loads(json.dumps(committed))
    changed["path"] = changed["path"][1:] + changed["path"][:1]
    assert examples_tool.comparable(changed) != examples_tool.comparable(committed)
