"""A plain-text summary of a plan: policy, sizes, residency per tier."""

from __future__ import annotations

from flexgraph.plan.planfile import Plan
from flexgraph.plan.policy import TIERS
from flexgraph.sizes import format_size


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    pol, wl = plan.policy, plan.workload
    ach = plan.placement.get("weights_achieved", {})
    blocks = -(-wl.num_prompts // pol.block_size)
    head = [
        f"model      {plan.model.get('name')} ({plan.model.get('kind')}{', dummy' if plan.model.get('dummy') else ''})",
        f"workload   {wl.num_prompts} prompts x {wl.prompt_len} tokens, generate {wl.gen_len}",
        f"policy     gpu batch {pol.gpu_batch_size} x {pol.num_gpu_batches} GPU batches = block of "
        f"{pol.block_size} ({blocks} block{'s' if blocks != 1 else ''}), {pol.schedule} schedule, {pol.dtype}"
        + (f" (stored {pol.storage_dtype})" if pol.storage_dtype else "") + ", "
        f"prefetch {'on' if plan.prefetch else 'off'}"
        + "".join(f", {what}" for on, what in ((pol.compress_weight, "4-bit weights"),
                                                (pol.compress_cache, "4-bit KV cache"),
                                                (pol.cpu_cache_compute, "cpu cache compute"),
                                                (plan.compile, "compiled maths")) if on),
        f"--percent  {' '.join(f'{p:g}' for p in pol.percent_args())}   (chosen by {plan.chosen.get('by', '?')})",
        f"path       {len(plan.path)} nodes",
    ]
    for note in plan.chosen.get("notes", []):
        head.append(f"           - {note}")
    rows = [["tier", "capacity", "homes", "peak", "weights (achieved)", "KV rows", "act rows"]]
    res = plan.residency
    for n, t in enumerate(TIERS):
        cap = res["capacity"].get(t)
        rows.append([t, "absent" if cap is None else format_size(cap), format_size(res["home"].get(t, 0)),
                     format_size(res["peak"].get(t, 0)), f"{ach.get(t, 0):.1f}%",
                     str(plan.placement.get("cache_rows", [0, 0, 0])[n]),
                     str(plan.placement.get("act_rows", [0, 0, 0])[n])])
    out = "\n".join(head) + "\n\n" + _table(rows)
    cands = plan.chosen.get("candidates")
    if cands:
        crow = [["#", "gpu batch", "GPU batches", "schedule", "stored", "--percent", "est. tokens/s", ""]]
        for n, c in enumerate(cands, 1):
            p = c["policy"]
            pct = p["weights"][:2] + p["cache"][:2] + p["activations"][:2]
            crow.append([str(n), str(p["gpu_batch_size"]), str(p["num_gpu_batches"]), p["schedule"],
                         p.get("storage_dtype") or p["dtype"], " ".join(f"{x:g}" for x in pct), f"{c['estimated_throughput']:.1f}",
                         "rejected: " + c["rejected"][:40] if c.get("rejected") else ""])
        out += "\n\ncandidates (best first)\n" + _table(crow)
    est = plan.estimate
    if est:
        tp, roof = est["throughput"], est["roofline"]
        out += (f"\n\nestimate   {tp['total']:.1f} tokens/s total (prefill {tp['prefill']:.1f}, decode "
                f"{tp['decode']:.1f}), {est['total_seconds']:.2f} s; roofline {roof['throughput']:.1f} tokens/s, "
                f"bound by {roof['bound']}")
        ceiling = (est.get("prefill_ceiling") or {}).get("throughput")
        if ceiling:             # plans from before it was recorded have none
            out += f"; prefill ceiling {ceiling:.1f} tokens/s (the prompts' products alone)"
    return out
