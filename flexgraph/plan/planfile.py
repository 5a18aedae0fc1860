"""plan.json: the planner's artifact and the executor's input.

Schema (``format: "flexgraph-plan"``, ``version: 1``)::

    {
      "format": "flexgraph-plan", "version": 1, "created_by": "flexgraph 0.1.0",
      "model":     {kind, location, dummy, checksum, ...}   # ModelRef.to_json()
      "spec":      {...}                                     # ModelSpec.to_dict(), for readers
      "workload":  {num_prompts, prompt_len, gen_len},
      "sampling":  {do_sample, temperature, top_k, top_p, seed, stop, ignore_eos},
      "hardware":  {device, gpu_mem, cpu_mem, disk_mem, offload_dir, headroom, ...},
      "policy":    {gpu_batch_size, num_gpu_batches, weights: [g, c, d], cache: [...],
                    activations: [...], schedule, dtype, compress_*, cpu_cache_compute},
      "prefetch":  true,
      "placement": {weights_achieved: {gpu, cpu, disk}, cache_rows: [g, c, d], act_rows: [g, c, d]},
      "residency": {capacity: {...}, home: {...}, peak: {...}},
      "chosen":    {"by": "user" | "auto" | "search", "notes": [...], "candidates": [...]},
      "estimate":  {total_seconds, throughput, roofline, prefill_ceiling, ...}   # with --search cost
      "compile":   false                     # torch.compile the layer maths when executing
      "path":      [["c", i, j, k], ...]     # one entry per node, in order
    }

Path entries abbreviate the node kinds (see ``KIND_CODES``).  Loading checks the format,
the version and every required key, and reports the first problem in one line.  The
model checksum is checked when the plan executes (the weights are not read here).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgraph import __version__
from flexgraph.errors import PlanError
from flexgraph.fileio import write_json_atomic
from flexgraph.graph.builder import Workload
from flexgraph.models.sampling import SamplingParams
from flexgraph.plan.policy import Policy

FORMAT, VERSION = "flexgraph-plan", 1
KIND_CODES = {"load_weight": "lw", "load_cache": "lc", "load_hidden": "lh",
              "compute": "c", "store_cache": "sc", "store_hidden": "sh"}
CODE_KINDS = {v: k for k, v in KIND_CODES.items()}
REQUIRED = ("model", "workload", "sampling", "hardware", "policy", "prefetch", "residency", "path")


@dataclass
class Plan:
    model: dict[str, Any]
    spec: dict[str, Any]
    workload: Workload
    sampling: SamplingParams
    hardware: dict[str, Any]
    policy: Policy
    path: list[tuple]
    prefetch: bool = True
    placement: dict[str, Any] = field(default_factory=dict)
    residency: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)
    compile: bool = False        # torch.compile the layer maths when executing

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "created_by": f"flexgraph {__version__}",
            "model": self.model, "spec": self.spec, "workload": self.workload.to_json(),
            "sampling": self.sampling.to_json(), "hardware": self.hardware, "policy": self.policy.to_json(),
            "prefetch": self.prefetch, "placement": self.placement, "residency": self.residency,
            "chosen": self.chosen, "estimate": self.estimate, "compile": self.compile,
            "path": [[KIND_CODES[kind], i, j, k] for kind, i, j, k in self.path],
        }

    @classmethod
    def from_json(cls, d: Any, source: str = "plan") -> Plan:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"{source} is not a flexgraph plan (no \"format\": \"{FORMAT}\"); "
                            "make one with `flexgraph plan`")
        if d.get("version") != VERSION:
            raise PlanError(f"{source} has plan version {d.get('version')!r}, this flexgraph reads version "
                            f"{VERSION}; re-run `flexgraph plan`")
        for key in REQUIRED:
            if key not in d:
                raise PlanError(f"{source} lacks the required key {key!r}; re-run `flexgraph plan`")
        try:
            path = [(CODE_KINDS[code], int(i), int(j), int(k)) for code, i, j, k in d["path"]]
        except (KeyError, ValueError, TypeError):
            raise PlanError(f"{source} has a malformed path entry; re-run `flexgraph plan`") from None
        try:
            return cls(model=d["model"], spec=d.get("spec", {}), workload=Workload.from_json(d["workload"]),
                       sampling=SamplingParams.from_json(d["sampling"]), hardware=d["hardware"],
                       policy=Policy.from_json(d["policy"]), path=path, prefetch=bool(d["prefetch"]),
                       placement=d.get("placement", {}), residency=d["residency"], chosen=d.get("chosen", {}),
                       estimate=d.get("estimate", {}), compile=bool(d.get("compile", False)))
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source} has a malformed section ({type(e).__name__}: {e}); "
                            "re-run `flexgraph plan`") from None


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write atomically: a reader never sees a half-written plan."""
    write_json_atomic(path, plan.to_json(), compact=True)


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"no plan file at {path}; make one with `flexgraph plan --out {path}`") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read plan file {path}: {e.__class__.__name__}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        "it may be truncated — re-run `flexgraph plan`") from None
    return Plan.from_json(data, source=str(path))
