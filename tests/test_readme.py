"""The README's two set-up commands stay true: the flexgraph invocations parse with the
real CLI, the files they name exist, and .ci/run runs the test command."""

import re
import shlex
import subprocess
from pathlib import Path

from flexgraph.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def command_after(marker: str) -> str:
    m = re.search(re.escape(marker) + r"\s*```\n(.*?)\n```", README, re.S)
    assert m, f"README lacks a command after {marker}"
    return m.group(1).strip()


def test_main_command_invocations_parse_and_files_exist():
    cmd = command_after("<!-- main-command -->")
    steps = [shlex.split(s) for s in cmd.split("&&")]
    flexgraph_steps = [s[1:] for s in steps if s[0] == "flexgraph"]
    assert [s[0] for s in flexgraph_steps] == ["plan", "execute"]
    parser = build_parser()
    plan_args = parser.parse_args(flexgraph_steps[0])
    exec_args = parser.parse_args(flexgraph_steps[1])
    assert exec_args.plan == plan_args.out
    assert (ROOT / exec_args.prompts).is_file()
    assert ["pip", "install", "torch==2.13.0"] in steps


def test_ci_runs_the_readme_test_command():
    cmd = command_after("<!-- test-command -->")
    assert "pytest" in cmd and "torch==2.13.0" in cmd and '".[test]"' in cmd
    extract = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("cmd=")]
    assert len(extract) == 1, ".ci/run must extract the command in one cmd=... line"
    awk = subprocess.run(["bash", "-c", extract[0] + '\necho "$cmd"'], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert awk.stdout.strip() == cmd, awk.stderr
