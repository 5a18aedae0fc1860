"""flexgraph: FlexGen-style offloaded LLM inference as an explicit task graph.

Three stages, one artifact each (see ``../shared/DESIGN.md``)::

    ModelSpec + Workload + Hardware --builder--> TaskGraph --planner--> Plan --executor--> outputs

Subpackages: ``models`` (specs and layer maths), ``weights`` (the weight store and its
converters), ``graph`` (the builder), ``plan`` (policy, traversals, checker, plan.json),
``exec`` (the asyncio executor), ``compress`` (group-wise 4-bit quantisation).
"""

import os

__version__ = "0.1.0"

# Back every CPU tensor of 2 MiB or more with transparent huge pages (PyTorch's own
# switch; read at allocation time, so setting it here works even after torch is
# imported).  PyTorch's CPU allocator does not cache: each large intermediate of a
# layer (a prefill MLP's [tokens, intermediate] products are ~100 MiB) is a fresh mmap,
# and faulting it in 4 KiB pages cost more than the arithmetic here — an element-wise
# op over 96 MiB ran 2.2x faster with it, a 64 x 512-token prefill 1.3x.  Set
# THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def __getattr__(name: str):
    # The Python API pulls in torch; keep `import flexgraph` (and the CLI's start) light.
    if name == "FlexModel":
        from flexgraph.api import FlexModel
        return FlexModel
    raise AttributeError(f"module 'flexgraph' has no attribute {name!r}")
