"""The Python API, in the style of transformers: load once, generate many times.

    from flexgraph import FlexModel
    model = FlexModel.from_pretrained("smollm2-135m", percent=(0, 100, 0, 50, 0, 100))
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)   # [B, P + 32]
    texts = model.generate_text(["The capital of France is"], max_new_tokens=8)
    model.close()            # or use it as a context manager

Loading places the weights on their home tiers once (``percent`` fixes their split; left
out, the first ``generate`` chooses it with the planner's rule and later calls keep it).
Each ``generate`` plans its own workload (batch, prompt length, new tokens) around those
weights — batch shape, cache and activation placement chosen as ``flexgraph plan``
would, unless given — and executes the plan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from flexgraph.errors import FlexgraphError
from flexgraph.exec.diskio import DiskIO
from flexgraph.exec.executor import ExecOptions
from flexgraph.exec.homes import Tiers, load_weight_homes
from flexgraph.exec.prompts import Prompt
from flexgraph.exec.run import run_plan
from flexgraph.graph.builder import Workload
from flexgraph.hardware import detect_hardware
from flexgraph.models.sampling import SamplingParams
from flexgraph.plan.planner import Knobs, default_dtype, make_plan
from flexgraph.plan.policy import Policy, Split, policy_weight_placement
from flexgraph.weights.resolve import materialize, resolve_model


class FlexModel:
    def __init__(self, ref, store, hardware: dict, knobs: Knobs, progress: bool):
        self.ref, self.store, self.hardware, self.knobs = ref, store, hardware, knobs
        self.spec = store.spec
        self.tokenizer = store.tokenizer()
        self.progress = progress
        self._disk = DiskIO()
        self._tiers = Tiers(hardware["device"], hardware.get("gpu_mem") is not None,
                            hardware["offload_dir"], self._disk)
        self._weights: Split | None = None
        self._homes = None
        if knobs.percent is not None:
            any_split = Split(0, 0)          # only the weights' split matters for placing them
            self._place(Policy(1, 1, Split(knobs.percent[0], knobs.percent[1]), any_split, any_split,
                               dtype=knobs.dtype, compress_weight=knobs.compress_weight,
                               storage_dtype=knobs.storage_dtype))

    @classmethod
    def from_pretrained(cls, model: str = "smollm2-135m", *, dummy: bool = False,
                        percent: Sequence[float] | None = None, gpu_batch_size: int | None = None,
                        num_gpu_batches: int | None = None, schedule: str | None = None, dtype: str | None = None,
                        device: str | None = None, gpu_mem=None, cpu_mem=None, disk_mem=None,
                        offload_dir: str | None = None, progress: bool = False, compress_weight: bool = False,
                        compress_cache: bool = False, cpu_cache_compute: bool = False,
                        storage_dtype: str | None = None) -> FlexModel:
        ref = resolve_model(model, dummy=dummy)
        hardware = detect_hardware(device=device, gpu_mem=gpu_mem, cpu_mem=cpu_mem, disk_mem=disk_mem,
                                   offload_dir=offload_dir).to_json()
        knobs = Knobs(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches,
                      percent=tuple(percent) if percent is not None else None, schedule=schedule,
                      dtype=dtype or default_dtype(hardware["device"]),
                      compress_weight=compress_weight, compress_cache=compress_cache,
                      cpu_cache_compute=cpu_cache_compute, storage_dtype=storage_dtype)
        store = materialize(ref, dtype=_dtype(storage_dtype or knobs.dtype) if ref.dummy else None, progress=progress)
        return cls(ref, store, hardware, knobs, progress)

    def _place(self, policy: Policy) -> None:
        self._homes = load_weight_homes(self.spec, self.store, policy_weight_placement(self.spec, policy),
                                        policy.torch_dtype, self._tiers, verify=True, show_progress=self.progress,
                                        compress=policy.compress_weight, store_dtype=policy.store_torch_dtype)
        self._weights = policy.weights

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] | None = None,
                 ignore_eos: bool = False) -> torch.Tensor:
        """Left-padded ``input_ids: [B, P]`` -> ``[B, P + max_new_tokens]``: the prompts followed
        by the generated tokens, padded with the pad id after EOS or a stop string."""
        if input_ids.dim() != 2:
            raise FlexgraphError("input_ids must be [batch, length] (use unsqueeze(0) for one prompt)")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompts = [Prompt(n, tuple(input_ids[n][mask[n]].tolist())) for n in range(input_ids.shape[0])]
        results = self._run(prompts, max_new_tokens, SamplingParams(
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop=tuple(stop or ()), ignore_eos=ignore_eos))
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        new = torch.full((len(prompts), max_new_tokens), pad, dtype=torch.long)
        for n, line in enumerate(results):
            ids = line["output_ids"]
            new[n, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return torch.cat([input_ids.to(torch.long), new], dim=1)

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 32, **sampling) -> list[str]:
        if self.tokenizer is None:
            raise FlexgraphError(f"{self.spec.name} has no tokenizer; call generate() with token ids")
        items = [Prompt(n, tuple(self.tokenizer(p)["input_ids"])) for n, p in enumerate(prompts)]
        params = SamplingParams(**{"stop": tuple(sampling.pop("stop", ()) or ()), **sampling})
        return [line["text"] for line in self._run(items, max_new_tokens, params)]

    def _run(self, prompts: list[Prompt], max_new_tokens: int, sampling: SamplingParams) -> list[dict]:
        if not prompts or any(not p.input_ids for p in prompts):
            raise FlexgraphError("every prompt needs at least one token")
        wl = Workload(len(prompts), max(len(p.input_ids) for p in prompts), max_new_tokens)
        knobs = self.knobs if self._weights is None else replace(self.knobs, weights=self._weights)
        plan = make_plan(self.ref, wl, sampling, self.hardware, knobs)
        if self._homes is None:
            self._place(plan.policy)
        report = run_plan(plan, self.store, prompts, sampling,
                          options=ExecOptions(progress=self.progress), weight_homes=self._homes)
        self.last_metrics = report.metrics
        return report.results

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the weights and remove their offload files."""
        self._homes = None
        self._disk.close()
        self._tiers.cleanup()

    def __enter__(self) -> FlexModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dtype(name: str) -> torch.dtype:
    from flexgraph.plan.policy import DTYPES
    return DTYPES[name]
