"""`flexgraph execute` under bad input and interruption: one-line errors, offload files
removed, finished blocks' results intact, nothing half-written, resumable."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exec_helpers import tiny_store
from flexgraph.cli import main
from flexgraph.errors import ExecutionError
from flexgraph.exec.prompts import read_prompts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    _hf, store = tiny_store("llama-tied-gqa3", tmp)
    return store, tmp


def write_prompts(path: Path, n: int, vocab: int = 200) -> Path:
    with open(path, "w") as f:
        for p in range(n):
            f.write(json.dumps({"id": f"q{p}", "input_ids": [3 + (p * 7 + t) % vocab for t in range(2 + p % 5)]}) + "\n")
    return path


def plan(store, tmp: Path, *extra, out="plan.json", offload=None) -> Path:
    path = tmp / out
    args = ["plan", "--search", "rule", "--model", str(store.path), "--prompt-len", "8", "--gen-len", "6", "--num-prompts", "12",
            "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--dtype", "float32", "--cpu-mem", "2GiB",
            "--disk-mem", "4GiB", "--offload-dir", str(offload or tmp / "offload"), "--out", str(path), *extra]
    assert main(args) == 0
    return path


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def leftover_offload(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_bad_prompt_lines_name_the_line(tmp_path):
    cases = {
        '{"id": 1, "input_ids": [1]}\nnot json\n': ":2: not valid JSON",
        '{"id": 1, "input_ids": [1, 2]}\n{"id": 1, "input_ids": [3]}\n': ":2: id 1 repeats line 1",
        '{"id": 1, "input_ids": [1, "a"]}\n': ":1: \"input_ids\" must be a list of integers",
        '{"id": 1, "input_ids": [99999]}\n': ":1: token id 99999 is outside the vocabulary",
        '{"id": 1}\n': ":1: a prompt needs \"prompt\"",
        '{"id": 1, "input_ids": [1,2,3,4,5,6,7,8,9]}\n': ":1: the prompt has 9 tokens, the plan allows 8",
        '{"id": 1, "prompt": "hello"}\n': ":1: this model has no tokenizer",
        '[1, 2]\n': ":1: expected a JSON object",
    }
    for text, expected in cases.items():
        f = tmp_path / "p.jsonl"
        f.write_text(text)
        with pytest.raises(ExecutionError) as e:
            read_prompts(f, None, 256, 8)
        assert expected in str(e.value), (text, str(e.value))
        assert "\n" not in str(e.value)


def test_bad_prompts_file_via_cli_keeps_nothing(model, tmp_path, capsys):
    store, _ = model
    p = plan(store, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "input_ids": [5, 6]}\n{"id": "b", "input_ids": "oops"}\n')
    out = tmp_path / "results.jsonl"
    assert main(["execute", str(p), "--prompts", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:2:" in one_line_error(capsys)
    assert not out.exists() and not leftover_offload(tmp_path / "offload")


def test_model_changed_since_planning(model, tmp_path, capsys):
    store, tmp = model
    _hf, other = tiny_store("llama-tied-gqa3", tmp_path)     # same shapes, its own store
    p = plan(other, tmp_path)
    index = other.path / "index.json"
    data = json.loads(index.read_text())
    data["source"]["note"] = "re-converted"
    index.write_text(json.dumps(data))
    assert main(["execute", str(p)]) == 2
    msg = one_line_error(capsys)
    assert "changed since the plan was made" in msg and "flexgraph plan" in msg


def test_unwritable_offload_folder(model, tmp_path, capsys):
    store, _ = model
    p = plan(store, tmp_path, "--percent", "0", "100", "0", "50", "0", "100")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "results.jsonl"
    code = main(["execute", str(p), "--offload-dir", str(blocker / "offload"), "--out", str(out)])
    assert code == 2
    msg = one_line_error(capsys)
    assert "offload" in msg and str(blocker) in msg
    assert not out.exists()


def test_offload_folder_out_of_space(model, tmp_path, capsys):
    """A real small filesystem: the cache files do not fit, the run stops with one line."""
    store, _ = model
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        p = plan(store, tmp_path, "--percent", "0", "0", "0", "0", "0", "100", offload=mnt)
        out = tmp_path / "results.jsonl"
        assert main(["execute", str(p), "--out", str(out)]) == 2
        msg = one_line_error(capsys)
        assert "full" in msg or "cannot reserve" in msg, msg
        assert not leftover_offload(mnt) and not out.exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _sigint_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT handled by default and not blocked, as a command
    typed at a terminal starts.  A child inherits an ignored SIGINT, and a non-interactive
    shell ignores SIGINT in what it runs in the background (POSIX, job control off): the
    suite started as ``bash .ci/run &`` ran the CLI deaf to Ctrl-C, and it finished all its
    blocks (three CI runs of three on 12-06; this test alone in the background, likewise)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _sigint_state(pid: int) -> str:
    """The child's blocked and ignored signal masks, for a failure message."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "no /proc status"
    return " ".join(line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_interrupt_then_resume(model, tmp_path):
    """Ctrl-C after the first block: exit 130 with one line, offload files gone, only whole
    blocks in the results; rerunning completes without duplicating or losing a line, and
    the result equals an uninterrupted run."""
    store, _ = model
    p = plan(store, tmp_path, "--percent", "0", "60", "0", "50", "0", "100", "--gen-len", "48")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "flexgraph.cli", "execute", str(p), "--prompts", str(prompts), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or not out.read_text()):
        time.sleep(0.05)
    state = _sigint_state(proc.pid)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{state}\n{stderr}"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0]
    lines = out.read_text().splitlines()
    assert lines and len(lines) % 4 == 0 and len(lines) < 12
    assert [json.loads(line)["id"] for line in lines] == [f"q{n}" for n in range(len(lines))]
    assert not leftover_offload(tmp_path / "offload")

    assert main(["execute", str(p), "--prompts", str(prompts), "--out", str(out)]) == 0
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in resumed] == [f"q{n}" for n in range(12)]
    fresh = tmp_path / "fresh.jsonl"
    assert main(["execute", str(p), "--prompts", str(prompts), "--out", str(fresh)]) == 0
    assert resumed == [json.loads(line) for line in fresh.read_text().splitlines()]


def test_torn_results_tail_is_dropped_on_resume(model, tmp_path):
    store, _ = model
    p = plan(store, tmp_path)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    out = tmp_path / "results.jsonl"
    assert main(["execute", str(p), "--prompts", str(prompts), "--out", str(out)]) == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:10])          # one whole block, a bit more, a torn line
    assert main(["execute", str(p), "--prompts", str(prompts), "--out", str(out)]) == 0
    assert out.read_text() == full


def test_results_of_other_prompts_are_not_overwritten(model, tmp_path, capsys):
    store, _ = model
    p = plan(store, tmp_path)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"id": "someone-else", "output_ids": []}) + "\n")
    assert main(["execute", str(p), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "belongs to other prompts" in one_line_error(capsys)
    assert "someone-else" in out.read_text()
