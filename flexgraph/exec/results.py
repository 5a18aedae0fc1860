"""The results file: JSON lines appended block by block, resumable.

Each line is ``{"id", "output_ids", "text", "finish_reason"}`` in prompt order.  A
block's lines are written with one ``write`` and an ``fsync``, after the block has
finished.  Rerunning the same command resumes: the lines already there must be the
results of the first prompts in order (else it is an error — another prompts file);
only whole blocks are kept (a torn tail from an interrupted write is cut off), and the
run continues with the next block.  So a line is never duplicated or lost.

Finishing: generation always runs the plan's ``gen_len`` steps (the block's shape is
fixed); a sequence's output is then cut at its first EOS (not included) or stop string
(the text ends before it; the ids end with the token that completed it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flexgraph.errors import ExecutionError
from flexgraph.exec.prompts import Prompt
from flexgraph.log import get_logger
from flexgraph.models.sampling import SamplingParams

log = get_logger(__name__)


def finish(ids: list[int], eos_ids: tuple[int, ...], sampling: SamplingParams, tokenizer) -> dict[str, Any]:
    """Cut one sequence's generated ids at EOS or a stop string; returns the result fields."""
    reason = "length"
    if not sampling.ignore_eos:
        for n, t in enumerate(ids):
            if t in eos_ids:
                ids, reason = ids[:n], "stop"
                break
    text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
    if text is not None and sampling.stop:
        hits = [(text.find(s), s) for s in sampling.stop if s and s in text]
        if hits:
            cut, _s = min(hits)
            text, reason = text[:cut], "stop"
            # keep the fewest ids whose text reaches the stop string
            for n in range(1, len(ids) + 1):
                if len(tokenizer.decode(ids[:n], skip_special_tokens=True)) > cut:
                    ids = ids[:n]
                    break
    return {"output_ids": ids, "text": text, "finish_reason": reason}


class ResultsFile:
    def __init__(self, path: str | os.PathLike, prompts: list[Prompt], block_size: int):
        self.path = Path(path)
        self.prompts = prompts
        self.block_size = block_size
        self.done = self._resume()

    @property
    def done_blocks(self) -> int:
        return self.done // self.block_size if self.done < len(self.prompts) else -(-self.done // self.block_size)

    def _resume(self) -> int:
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        good_end, count = 0, 0
        block_end, block_count = 0, 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break                                   # a torn last line
            try:
                obj = json.loads(data[pos:nl])
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if count >= len(self.prompts) or not isinstance(obj, dict) or obj.get("id") != self.prompts[count].id:
                want = self.prompts[count].id if count < len(self.prompts) else None
                raise ExecutionError(f"{self.path} line {count + 1} has the result for id {obj.get('id')!r}, "
                                     f"but prompt {count + 1} has id {want!r}: it belongs to other prompts; "
                                     "use another --out or delete it")
            count += 1
            pos = nl + 1
            good_end = pos
            if count % self.block_size == 0 or count == len(self.prompts):
                block_end, block_count = good_end, count
        if block_end < len(data):
            log.warning("results_truncated", path=str(self.path), kept_lines=block_count,
                        dropped_bytes=len(data) - block_end)
            with open(self.path, "r+b") as f:
                f.truncate(block_end)
                f.flush()
                os.fsync(f.fileno())
        if block_count:
            log.info("resuming", path=str(self.path), results_kept=block_count)
        return block_count

    def append(self, lines: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.done += len(lines)
