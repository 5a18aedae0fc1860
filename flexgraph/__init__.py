"""flexgraph: FlexGen-style offloaded LLM inference as an explicit task graph.

Three stages, one artifact each (see ``../shared/DESIGN.md``)::

    ModelSpec + Workload + Hardware --builder--> TaskGraph --planner--> Plan --executor--> outputs

Subpackages: ``models`` (specs and layer maths), ``weights`` (the weight store and its
converters), ``graph`` (the builder), ``plan`` (policy, traversals, checker, plan.json),
``exec`` (the asyncio executor), ``compress`` (group-wise 4-bit quantisation).
"""

__version__ = "0.1.0"
