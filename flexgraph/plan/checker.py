"""The validity checker: does a path obey the paper's four rules?

A *path* is an ordered list of graph nodes.  It must contain every ``compute`` node; it
contains the load and store nodes it chooses (a zig-zag path loads a layer's weights
once per column, a row path once per square).  The checker walks it and keeps:

- ``alive``: buffer -> [(tier, bytes)] — what is resident now, homes excluded;
- ``latest_w``: layer -> the newest weight working buffer of that layer;
- ``producer``: buffer -> path index of the node that allocated it;
- ``last_use``: buffer -> path index of its last reader (a first pass computes it).

Rules, as checked (see ``../shared/DESIGN.md``):

1. a compute runs after its left neighbour in the row (layer j-1; or the last layer of
   the previous token for j = 0);
2. what a compute reads is resident on the compute tier: the layer's weights (a working
   buffer when part of them is homed elsewhere), its KV cache rows, its input activation;
   a buffer named in the node's ``needs_on`` must be resident on the tier given there
   (with ``cpu_cache_compute`` the cache rows loaded from disk are attended on the cpu);
3. what a compute produces reaches its consumers: a KV entry is stored to its home
   before the next token loads that cache; an activation stored to its home before it
   is loaded back; nothing is stored before it is produced;
4. at every node, the bytes resident on each tier — homes, working buffers (prefetched
   ones included) and the node's own allocations — fit the tier's capacity.  A buffer is
   released right after its last reader on the path (and explicit frees, e.g. a
   compute's workspace, at the end of their node).

The result, :class:`CheckedPath`, is also what the executor runs: for each node, the
path indices it depends on and the buffers to release when it completes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx

from flexgraph.errors import RuleViolation
from flexgraph.graph.builder import COMPUTE
from flexgraph.plan.policy import TIERS
from flexgraph.sizes import format_size


@dataclass
class CheckedPath:
    path: list[tuple]
    deps: list[list[int]]                 # path indices each node waits for
    uses: list[list[tuple]]               # buffers each node reads
    releases: list[list[tuple]]           # buffers to drop once the node (and their readers) are done
    home_bytes: dict[str, int]            # static homes per tier
    peak: dict[str, int]                  # peak resident bytes per tier, homes included
    peak_at: dict[str, int]               # path index of each tier's peak
    timeline: dict[str, list[int]] = field(repr=False, default_factory=dict)  # per node, if asked
    bookkeeping: int = 0                  # host bytes of the executor's own state (on the cpu tier)


def _describe(node: tuple) -> str:
    kind, i, j, k = node
    return f"{kind}(i={i}, j={j}, k={k})"


def check_path(graph: nx.DiGraph, path: list[tuple], capacity: dict[str, int | None],
               keep_timeline: bool = False, host_bytes_per_node: int = 0) -> CheckedPath:
    """Check ``path`` against rules 1-4; raise :class:`RuleViolation` on the first breach.

    ``host_bytes_per_node``: host memory the executor's own bookkeeping takes per node
    (its graph, path and per-node state), counted on the cpu tier from the start.
    """
    nodes = graph.nodes
    index: dict[tuple, int] = {}
    for p, node in enumerate(path):
        if node not in nodes:
            raise RuleViolation(1, _describe(node), "the node is not in the task graph")
        if node in index:
            raise RuleViolation(1, _describe(node), f"the node appears twice on the path (at {index[node]} and {p})")
        index[node] = p
    missing = [n for n, d in nodes(data="kind") if d == COMPUTE and n not in index]
    if missing:
        raise RuleViolation(1, _describe(missing[0]), f"the square is never computed ({len(missing)} squares missing)")

    # ---- pass 1: order (rule 1), availability (rules 2, 3), who uses what ----------------
    alive: dict[tuple, list[tuple[str, int]]] = {}
    producer: dict[tuple, int] = {}
    latest_w: dict[int, tuple] = {}
    uses: list[list[tuple]] = []
    deps: list[list[int]] = []
    for p, node in enumerate(path):
        attrs = nodes[node]
        kind = attrs["kind"]
        my_deps = set()
        for pred in graph.predecessors(node):
            q = index.get(pred)
            if q is None:
                continue          # an optional load the path replaced by an earlier one
            if q > p:
                rule = graph.edges[pred, node].get("rule", 1)
                raise RuleViolation(rule, _describe(node), f"it runs before {_describe(pred)}, which it depends on")
            my_deps.add(q)
        my_uses = []
        for need in attrs["needs"]:
            if need[0] == "W":
                buf = latest_w.get(need[1])
                if buf is None or buf not in alive:
                    raise RuleViolation(2, _describe(node), f"the weights of layer {need[1]} are not on the "
                                        f"{graph.graph['compute_tier']} tier: no load_weight of that layer precedes it")
            else:
                buf = need
                if buf not in alive:
                    raise RuleViolation(*_missing(graph, node, kind, buf))
            my_uses.append(buf)
            my_deps.add(producer[buf])
        for need, tier in attrs.get("needs_on", ()):
            if need in alive and not any(t == tier for t, _n in alive[need]):
                raise RuleViolation(*_missing(graph, node, kind, need, tier))
        uses.append(my_uses)
        deps.append(sorted(my_deps))
        for buf, tier, nbytes in attrs["allocs"]:
            alive.setdefault(buf, []).append((tier, nbytes))
            producer[buf] = p
            if buf[0] == "Wb":
                latest_w[buf[2]] = buf
        for buf in attrs["frees"]:
            alive.pop(buf, None)

    # ---- pass 2: liveness ---------------------------------------------------------------
    last_use: dict[tuple, int] = {}
    for p, bufs in enumerate(uses):
        for buf in bufs:
            last_use[buf] = p
    releases: list[list[tuple]] = [[] for _ in path]
    for buf, p in last_use.items():
        releases[p].append(buf)
    for p, node in enumerate(path):
        for buf in nodes[node]["frees"]:
            if buf not in releases[p]:
                releases[p].append(buf)

    # ---- pass 3: residency (rule 4) -----------------------------------------------------
    home = defaultdict(int)
    for _buf, tier, nbytes in graph.graph["homes"]:
        home[tier] += nbytes
    bookkeeping = host_bytes_per_node * len(path)
    used = {t: home[t] + (bookkeeping if t == "cpu" else 0) for t in TIERS}
    for t in TIERS:
        _fits(capacity, t, used[t], "the static homes of weights and KV cache and the executor's bookkeeping",
              graph)
    peak, peak_at = dict(used), {t: -1 for t in TIERS}
    timeline = {t: [] for t in TIERS} if keep_timeline else {}
    sizes: dict[tuple, list[tuple[str, int]]] = {}
    for p, node in enumerate(path):
        for buf, tier, nbytes in nodes[node]["allocs"]:
            sizes.setdefault(buf, []).append((tier, nbytes))
            used[tier] += nbytes
        for t in TIERS:
            if used[t] > peak[t]:
                peak[t], peak_at[t] = used[t], p
                _fits(capacity, t, used[t], _describe(node), graph)
            if keep_timeline:
                timeline[t].append(used[t])
        for buf in releases[p]:
            for tier, nbytes in sizes.pop(buf, ()):
                used[tier] -= nbytes
    return CheckedPath(path=list(path), deps=deps, uses=uses, releases=releases,
                       home_bytes={t: home[t] for t in TIERS}, peak=peak, peak_at=peak_at, timeline=timeline,
                       bookkeeping=bookkeeping)


def _missing(graph: nx.DiGraph, node: tuple, kind: str, buf: tuple, tier: str | None = None) -> tuple[int, str, str]:
    what = {"Hc": "its input activation", "Cb": "its KV cache rows", "Hh": "the activation it loads",
            "Cstored": "the KV entry of the previous token"}.get(buf[0], str(buf))
    if tier is None:
        tier = dict(graph.nodes[node].get("needs_on", ())).get(buf, graph.graph["compute_tier"])
    if buf[0] == "Cstored":
        reader = "square reads it there" if kind == COMPUTE else "load"
        return 3, _describe(node), f"{what} (i={buf[1]}) was never stored to its home before this {reader}"
    if buf[0] == "Hh":
        return 3, _describe(node), f"{what} was never stored to its home (no store_hidden before it)"
    if kind == COMPUTE:
        return 2, _describe(node), f"{what} {buf} is not on the {tier} tier when it runs"
    return 3, _describe(node), f"{what} {buf} does not exist yet (or was already freed) when it runs"


def _fits(capacity: dict[str, int | None], tier: str, needed: int, where: str, graph: nx.DiGraph) -> None:
    cap = capacity.get(tier)
    if cap is None:
        if needed > 0:
            raise RuleViolation(4, where, f"needs {format_size(needed)} on the {tier} tier, which this machine "
                                "does not have", tier=tier, needed=needed, capacity=0)
        return
    if needed > cap:
        raise RuleViolation(4, where, f"needs {format_size(needed)} on the {tier} tier, capacity "
                            f"{format_size(cap)}", tier=tier, needed=needed, capacity=cap)
