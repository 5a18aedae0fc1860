"""Regenerate the example plans in graphs/ from graphs/examples.json.

    python tools/make_example_plans.py          # rewrite graphs/<name>.json
    python tools/make_example_plans.py --check  # exit 1 if any differs (what the test does)

Each example is `flexgraph plan` with the arguments listed under its name; the T4-like
profile is 16 GiB gpu, 208 GiB cpu, 1.5 TB disk (simulated gpu tier on a CPU machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from flexgraph.cli import main as flexgraph_main

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"
# differ from machine to machine or release to release without the plan changing
VOLATILE = {("created_by",), ("hardware", "sources")}


def comparable(plan: dict) -> dict:
    plan = json.loads(json.dumps(plan))
    for keys in VOLATILE:
        d = plan
        for k in keys[:-1]:
            d = d.get(k, {})
        d.pop(keys[-1], None)
    return plan


def make(name: str, args: list[str], out: Path) -> None:
    code = flexgraph_main(["plan", *args, "--out", str(out)])
    if code != 0:
        raise SystemExit(f"example {name} failed to plan (exit {code})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of rewriting")
    args = ap.parse_args()
    examples = json.loads((GRAPHS / "examples.json").read_text())
    drifted = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan_args in examples.items():
            fresh = Path(tmp) / f"{name}.json"
            make(name, plan_args, fresh)
            target = GRAPHS / f"{name}.json"
            if args.check:
                if not target.exists() or comparable(json.loads(target.read_text())) != comparable(
                        json.loads(fresh.read_text())):
                    drifted.append(name)
            else:
                target.write_text(fresh.read_text())
    if drifted:
        print(f"example plans out of date: {', '.join(drifted)}; run python tools/make_example_plans.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
