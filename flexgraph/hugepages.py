"""Whether PyTorch backs large CPU tensors with transparent huge pages.

PyTorch's CPU allocator does not cache: every large intermediate of a layer (a prefill
MLP's ``[tokens, intermediate]`` products are ~100 MiB for SmolLM2 at 256 x 512 tokens)
is a fresh mapping, faulted in 4 KiB pages — on this machine that cost more than the
arithmetic (an element-wise op over 96 MiB ran 2.2x faster with huge pages; SmolLM2 in
RAM, one 64-sequence batch, eager: 51.7 -> 61.9 tok/s, prefill 1063 -> 1341 tok/s).  PyTorch's switch is the environment
variable ``THP_MEM_ALLOC_ENABLE``, read **once**, at the process's first CPU tensor.

Huge pages (and glibc's reuse of freed blocks, which a roomy run keeps, see
:mod:`flexgraph.malloc_threshold`) also hold memory a tight run gives back, and a run
sized to a tight cap cannot afford that: OPT-1.3B under a 3 GiB cap (8 x 4, weights 48%
in RAM) was OOM-killed with them and ran without.  What they hold is freed temporaries,
so it grows with the plan's working set (its peak above its static homes), not with the
homes: SmolLM2 at 256 x 1 in a 16 GiB cgroup peaked 0.53 GB higher roomy than tight
(8.58 against 8.09 GiB, twice each), for a working set of 0.79 GB; an earlier pair,
0.49 GB for 0.92 GB.  So a run turns them on only when its peak plus ``EXTRA`` times its
working set fits the memory it may use, and a user's own setting always wins.  (The
rule was "peak at most half the memory" until 12-07: it ran that SmolLM2 plan, 7.8 of
15.3 GB, tight, and tight it made 18.7 and 20.4 tok/s against 20.8-22.8 roomy, six runs
alternated in the same cgroup.)
"""

from __future__ import annotations

import os

ENV = "THP_MEM_ALLOC_ENABLE"
EXTRA = 1.0         # measured 0.53-0.67x the working set; the margin is for larger batches' spread


def roomy(peak_bytes: int, home_bytes: int, capacity_bytes: int | None) -> bool:
    """Whether a plan peaking at ``peak_bytes`` of host memory, ``home_bytes`` of them its
    static homes (weights and KV cache), can afford huge pages."""
    working_set = max(0, peak_bytes - home_bytes)
    return capacity_bytes is not None and peak_bytes + EXTRA * working_set <= capacity_bytes


def choose(peak_bytes: int, home_bytes: int, capacity_bytes: int | None) -> bool:
    """Set the switch for this process (unless the user set it) and return whether it is
    on.  Call before torch allocates its first CPU tensor; later calls change nothing."""
    if ENV not in os.environ:
        os.environ[ENV] = "1" if roomy(peak_bytes, home_bytes, capacity_bytes) else "0"
    return os.environ[ENV] == "1"


def for_calibration() -> None:
    """``flexgraph plan`` measures with huge pages on (what a run in RAM uses) unless the
    user chose; offloaded runs, which go without, are mostly disk-bound."""
    os.environ.setdefault(ENV, "1")
