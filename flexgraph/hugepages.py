"""Whether PyTorch backs large CPU tensors with transparent huge pages.

PyTorch's CPU allocator does not cache: every large intermediate of a layer (a prefill
MLP's ``[tokens, intermediate]`` products are ~100 MiB for SmolLM2 at 256 x 512 tokens)
is a fresh mapping, faulted in 4 KiB pages — on this machine that cost more than the
arithmetic (an element-wise op over 96 MiB ran 2.2x faster with huge pages; SmolLM2 in
RAM, one 64-sequence batch, eager: 51.7 -> 61.9 tok/s, prefill 1063 -> 1341 tok/s).  PyTorch's switch is the environment
variable ``THP_MEM_ALLOC_ENABLE``, read **once**, at the process's first CPU tensor.

Huge pages also hold memory in 2 MiB pieces, which a run sized to a tight cap cannot
afford: OPT-1.3B under a 3 GiB cap (8 x 4, weights 48% in RAM) was OOM-killed with them
and ran without.  So a run turns them on only when its planned peak leaves room —
at most ``ROOMY`` of the memory it may use — and a user's own setting always wins.
"""

from __future__ import annotations

import os

ENV = "THP_MEM_ALLOC_ENABLE"
ROOMY = 0.5


def roomy(peak_bytes: int, capacity_bytes: int | None) -> bool:
    """Whether a plan peaking at ``peak_bytes`` of host memory can afford huge pages."""
    return capacity_bytes is not None and peak_bytes <= ROOMY * capacity_bytes


def choose(peak_bytes: int, capacity_bytes: int | None) -> bool:
    """Set the switch for this process (unless the user set it) and return whether it is
    on.  Call before torch allocates its first CPU tensor; later calls change nothing."""
    if ENV not in os.environ:
        os.environ[ENV] = "1" if roomy(peak_bytes, capacity_bytes) else "0"
    return os.environ[ENV] == "1"


def for_calibration() -> None:
    """``flexgraph plan`` measures with huge pages on (what a run in RAM uses) unless the
    user chose; offloaded runs, which go without, are mostly disk-bound."""
    os.environ.setdefault(ENV, "1")
