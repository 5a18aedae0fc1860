"""Traversals: paths through the squares of one block, with loads and stores placed.

Two orders of squares:

- ``row``: batch by batch, each batch through all its tokens and layers — what
  Accelerate and DeepSpeed do (``for k: for i: for j``).  Every square loads its own
  weights.
- ``zigzag``: FlexGen's block schedule — column by column (``for i: for j: for k``), so one
  load of a layer's weights serves all ``num_gpu_batches`` batches of the column.

Prefetch rules, applied to either order (FlexGen's overlapped loop):

- the next *column's* weights load before the first compute of the current column (so
  the load has a whole column of compute to hide behind; in ``row`` order a column is
  one square);
- the next square's KV cache and activation load before the current compute — unless
  they depend on the current square (the next layer of the same batch), in which case
  they load right after the current square's stores;
- stores follow the compute that produced their data.

The executor admits nodes in path order and runs each as soon as its dependencies are
done, so a load placed before a compute overlaps with it.
"""

from __future__ import annotations

from typing import Iterator

import networkx as nx

from flexgraph.graph.builder import COMPUTE, LOAD_CACHE, LOAD_HIDDEN, LOAD_WEIGHT, STORE_CACHE, STORE_HIDDEN

Square = tuple[int, int, int]   # (i, j, k)


def squares(graph: nx.DiGraph, schedule: str) -> Iterator[Square]:
    L, G, K = graph.graph["num_layers"], graph.graph["gen_len"], graph.graph["num_gpu_batches"]
    if schedule == "row":
        return ((i, j, k) for k in range(K) for i in range(G) for j in range(L))
    if schedule == "zigzag":
        return ((i, j, k) for i in range(G) for j in range(L) for k in range(K))
    raise ValueError(f"unknown schedule {schedule!r}")


def make_path(graph: nx.DiGraph, schedule: str, prefetch: bool = True) -> list[tuple]:
    """The path of ``schedule`` through ``graph``; ``prefetch=False`` places every load
    right before its compute (no overlap of loads with the previous compute)."""
    order = list(squares(graph, schedule))
    nodes = graph.nodes
    path: list[tuple] = []
    placed: set[tuple] = set()

    def emit(node: tuple) -> None:
        if node in nodes and node not in placed:
            placed.add(node)
            path.append(node)

    def column(sq: Square) -> tuple[int, int, int]:
        i, j, k = sq
        return (i, j, k) if schedule == "row" else (i, j, 0)

    def weight_load(sq: Square) -> tuple:
        return (LOAD_WEIGHT,) + column(sq)

    def data_loads(sq: Square) -> list[tuple]:
        i, j, k = sq
        return [(LOAD_CACHE, i, j, k), (LOAD_HIDDEN, i, j, k)]

    def ready(node: tuple) -> bool:
        """A load may be placed once what it reads has been stored (rule 3)."""
        kind, i, j, k = node
        if kind == LOAD_HIDDEN:
            return (STORE_HIDDEN, i, j - 1, k) in placed
        if kind == LOAD_CACHE and i > 0:
            return (STORE_CACHE, i - 1, j, k) in placed
        return True

    first_weight_of_column: dict[tuple, int] = {}
    for n, sq in enumerate(order):
        first_weight_of_column.setdefault(column(sq), n)

    emit(weight_load(order[0]))
    for node in data_loads(order[0]):
        emit(node)
    columns = list(first_weight_of_column)
    col_index = {c: n for n, c in enumerate(columns)}
    for n, sq in enumerate(order):
        nxt = order[n + 1] if n + 1 < len(order) else None
        if prefetch:
            if first_weight_of_column[column(sq)] == n and col_index[column(sq)] + 1 < len(columns):
                emit((LOAD_WEIGHT,) + columns[col_index[column(sq)] + 1])
            if nxt is not None:
                for node in data_loads(nxt):
                    if ready(node):
                        emit(node)
        else:
            emit(weight_load(sq))
            for node in data_loads(sq):
                emit(node)
        emit((COMPUTE,) + sq)
        i, j, k = sq
        emit((STORE_CACHE, i, j, k))
        emit((STORE_HIDDEN, i, j, k))
        if nxt is not None:
            # whatever the next square needs and could not be prefetched
            if not prefetch:
                continue
            emit(weight_load(nxt))
            for node in data_loads(nxt):
                emit(node)
    return path
