"""flexgraph: FlexGen-style offloaded LLM inference as an explicit task graph.

Three stages, one artifact each (see ``../shared/DESIGN.md``)::

    ModelSpec + Workload + Hardware --builder--> TaskGraph --planner--> Plan --executor--> outputs

Subpackages: ``models`` (specs and layer maths), ``weights`` (the weight store and its
converters), ``graph`` (the builder), ``plan`` (policy, traversals, checker, plan.json),
``exec`` (the asyncio executor), ``compress`` (group-wise 4-bit quantisation).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The Python API pulls in torch; keep `import flexgraph` (and the CLI's start) light.
    if name == "FlexModel":
        from flexgraph.api import FlexModel
        return FlexModel
    raise AttributeError(f"module 'flexgraph' has no attribute {name!r}")
