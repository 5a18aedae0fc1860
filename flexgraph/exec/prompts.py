"""Prompts in, blocks out: reading a prompts file, padding, and cutting into blocks.

A prompts file is JSON lines, one prompt each: ``{"id": ..., "prompt": "text"}`` (needs
the model's tokenizer) or ``{"id": ..., "input_ids": [...]}``.  Blank lines are
skipped; an ``id`` defaults to the line number.  Any problem is one error naming the
line.  Without a prompts file the plan's synthetic workload is used: random ids, as
FlexGen's benchmark does.

A block is ``num_gpu_batches`` GPU batches of ``gpu_batch_size`` prompts, each
left-padded to the plan's prompt length.  The last block is filled up with filler
rows (one masked token) whose outputs are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexgraph.errors import ExecutionError
from flexgraph.exec.nodes import BatchInputs
from flexgraph.models.sampling import SamplingParams, make_generator


@dataclass(frozen=True)
class Prompt:
    id: Any
    input_ids: tuple[int, ...]
    line: int | None = None          # where it came from, for messages


def read_prompts(path: str | Path, tokenizer, vocab_size: int, prompt_len: int) -> list[Prompt]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ExecutionError(f"no prompts file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExecutionError(f"cannot read prompts file {path}: {e}") from None
    prompts, seen = [], {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExecutionError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise ExecutionError(f"{where}: expected a JSON object with \"prompt\" or \"input_ids\"")
        pid = obj.get("id", n)
        if isinstance(pid, (dict, list)):
            raise ExecutionError(f"{where}: \"id\" must be a string or a number")
        key = json.dumps(pid)
        if key in seen:
            raise ExecutionError(f"{where}: id {pid!r} repeats line {seen[key]}; ids must be unique")
        seen[key] = n
        ids = _ids_of(obj, tokenizer, vocab_size, where)
        if not ids:
            raise ExecutionError(f"{where}: the prompt is empty")
        if len(ids) > prompt_len:
            raise ExecutionError(f"{where}: the prompt has {len(ids)} tokens, the plan allows {prompt_len}; "
                                 f"re-plan with --prompt-len {len(ids)} or shorten it")
        prompts.append(Prompt(pid, tuple(ids), n))
    if not prompts:
        raise ExecutionError(f"prompts file {path} has no prompts")
    return prompts


def _ids_of(obj: dict, tokenizer, vocab_size: int, where: str) -> list[int]:
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise ExecutionError(f"{where}: \"input_ids\" must be a list of integers")
        bad = [x for x in ids if not 0 <= x < vocab_size]
        if bad:
            raise ExecutionError(f"{where}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        return ids
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise ExecutionError(f"{where}: \"prompt\" must be a string")
        if tokenizer is None:
            raise ExecutionError(f"{where}: this model has no tokenizer; give \"input_ids\" instead of \"prompt\"")
        return list(tokenizer(obj["prompt"])["input_ids"])
    raise ExecutionError(f"{where}: a prompt needs \"prompt\" (text) or \"input_ids\" (a list of token ids)")


def synthetic_prompts(num: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[Prompt]:
    """FlexGen's benchmark workload: ``num`` prompts of ``prompt_len`` random ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num, prompt_len), generator=g)
    return [Prompt(f"synthetic-{n}", tuple(ids[n].tolist())) for n in range(num)]


def make_batches(prompts: list[Prompt], block_index: int, gpu_batch_size: int, num_gpu_batches: int,
                 prompt_len: int, pad_id: int, sampling: SamplingParams) -> list[BatchInputs]:
    """Left-pad ``prompts`` (at most one block) into GPU batches; fill the rest with filler."""
    batches = []
    for k in range(num_gpu_batches):
        ids = torch.full((gpu_batch_size, prompt_len), pad_id, dtype=torch.long)
        valid = torch.zeros(gpu_batch_size, prompt_len, dtype=torch.bool)
        for b in range(gpu_batch_size):
            n = k * gpu_batch_size + b
            if n < len(prompts):
                seq = prompts[n].input_ids
                ids[b, prompt_len - len(seq):] = torch.tensor(seq, dtype=torch.long)
                valid[b, prompt_len - len(seq):] = True
            else:
                valid[b, -1] = True           # filler: one real token so positions stay defined
        generator = make_generator(sampling, stream=block_index * num_gpu_batches + k) if sampling.do_sample else None
        batches.append(BatchInputs(ids, valid, generator))
    return batches


def blocks_of(prompts: list[Prompt], block_size: int) -> list[list[Prompt]]:
    return [prompts[a:a + block_size] for a in range(0, len(prompts), block_size)]
