#!/usr/bin/env python3
"""Draw a flexgraph plan (or an executed trace) as PNG / SVG with matplotlib.

    python tools/render.py FILE [--out PREFIX | --out NAME.png|NAME.svg]
                                [--what grid,graph,residency,timeline] [--format png,svg]
                                [--tokens a:b] [--layers a:b] [--batches a:b]
                                [--square i,j,k] [--depth N] [--time a:b]

FILE is a ``plan.json`` (from ``flexgraph plan``) or a Chrome trace-event JSON (from the
executor); which one is told by its content.  What is drawn:

- ``grid``: the squares of the block (x: layer j, tokens i side by side; y: GPU batch k)
  and the traversal path through them, as in the FlexGen paper's figures 3 and 4.  The
  number in a square is the order in which it is computed; a blue tick on a square's
  left edge marks a ``load_weight`` of that square on the path (zig-zag: one per column,
  row: one per square); dashed grey lines are where the path leaves the window.  Large
  plans are drawn as a window (``--tokens/--layers/--batches``, python-style ``a:b``,
  ``b`` exclusive); the default window is small and named in the title.
- ``graph``: the task graph around one square (``--square i,j,k``, default the middle
  one): predecessors and successors up to ``--depth`` edges away, kinds in lanes (top to
  bottom), path order left to right, edges coloured by the rule they stand for; dotted
  grey edges are dependencies the plan adds through shared buffers (e.g. the column's one
  weight load); dashed boxes are graph nodes the path leaves out.
- ``residency``: bytes resident per tier along the path (homes included), capacity and
  static homes as lines, the peak marked; long paths are downsampled keeping each
  bucket's maximum, so the peak survives.
- ``timeline``: from a trace, one row per lane (thread), bars coloured by node kind,
  busy % per lane; ``--time a:b`` in seconds since the first event.

Every drawing function returns a ``matplotlib.figure.Figure`` (no pyplot, no screen).
Without ``--what`` everything that applies to FILE is drawn; the files written are
printed one per line.  Errors are one line, ``error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (no screen here; harmless if the caller chose already)
import numpy as np  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle  # noqa: E402

from flexgraph.errors import FlexgraphError  # noqa: E402

KIND_ORDER = ("load_weight", "load_cache", "load_hidden", "compute", "store_cache", "store_hidden")
KIND_COLORS = {"load_weight": "#4C72B0", "load_cache": "#55A868", "load_hidden": "#8172B3",
               "compute": "#C44E52", "store_cache": "#DD8452", "store_hidden": "#937860"}
EXTRA_COLORS = ("#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD", "#2F4B7C", "#A05195")
LAYER_COLORS = {"embed": "#E3E3E3", "attn": "#D6E6F5", "mlp": "#FCE8CC", "head": "#DCEFD6"}
RULE_STYLE = {1: ("#333333", "-", "rule 1: left neighbour in the row"),
              2: ("#1B9E9E", "-", "rule 2: input onto the compute tier"),
              3: ("#B0279A", "-", "rule 3: output to its consumer")}
TIERS = ("gpu", "cpu", "disk")
TIER_COLORS = {"gpu": "#C44E52", "cpu": "#4C72B0", "disk": "#55A868"}
WHATS = ("grid", "graph", "residency", "timeline")
FORMATS = ("png", "svg")
MAX_GRID_COLUMNS, MAX_GRID_ROWS, MAX_GRID_SQUARES = 56, 16, 220
BOX_W, BOX_H = 0.72, 0.66
GRAPH_COL_IN, GRAPH_LANE_IN = 1.8, 1.05      # inches per column and per lane of the graph view


class RenderError(FlexgraphError):
    """A bad input file, window or option; printed as one line."""


# ---------------------------------------------------------------------------- inputs

def load_input(path: str | Path) -> tuple[str, Any]:
    """``("plan", Plan)`` or ``("trace", dict)``, told apart by the file's content."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RenderError(f"no file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RenderError(f"cannot read {path}: {e.__class__.__name__}") from None
    except json.JSONDecodeError as e:
        raise RenderError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(data, dict) and data.get("format") == "flexgraph-plan":
        from flexgraph.plan.planfile import Plan
        return "plan", Plan.from_json(data, source=str(path))
    if isinstance(data, list) or (isinstance(data, dict) and "traceEvents" in data):
        events = data if isinstance(data, list) else data["traceEvents"]
        if not isinstance(events, list):
            raise RenderError(f"{path}: \"traceEvents\" is not a list of events")
        return "trace", {"traceEvents": events, "source": str(path)}
    raise RenderError(f"{path} is neither a flexgraph plan (\"format\": \"flexgraph-plan\") nor a Chrome trace "
                      "(\"traceEvents\")")


def plan_spec(plan):
    from flexgraph.models.spec import ModelSpec
    return ModelSpec.from_hf_config(plan.model["config"], name=plan.model.get("name"))


def plan_shape(plan) -> tuple[int, int, int]:
    """(tokens G, layers L, GPU batches K) of the plan's block."""
    return plan.workload.gen_len, plan_spec(plan).num_layers, plan.policy.num_gpu_batches


def replay(plan):
    """(graph, CheckedPath with per-node residency) of a plan."""
    from flexgraph.plan.planner import replay_plan
    return replay_plan(plan, keep_timeline=True)


def model_name(plan) -> str:
    return plan.model.get("name") or plan.spec.get("name") or "model"


def fmt_bytes(n: float) -> str:
    from flexgraph.sizes import format_size
    return format_size(int(n))


def fmt_flops(f: float) -> str:
    for unit, div in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if f >= div:
            return f"{f / div:.2f} {unit}"
    return f"{f:.0f} FLOP"


def kind_color(kind: str, extra: dict[str, str] | None = None) -> str:
    if kind in KIND_COLORS:
        return KIND_COLORS[kind]
    extra = extra if extra is not None else {}
    if kind not in extra:
        extra[kind] = EXTRA_COLORS[len(extra) % len(EXTRA_COLORS)]
    return extra[kind]


# ---------------------------------------------------------------------------- windows

def parse_range(text: str | None, n: int, what: str) -> range | None:
    """``"a:b"`` (either end may be left out; b exclusive) or ``"a"`` within ``0..n``; None if text is None."""
    if text is None:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            lo = int(a) if a.strip() else 0
            hi = int(b) if b.strip() else n
        else:
            lo = int(text)
            hi = lo + 1
    except ValueError:
        raise RenderError(f"--{what} {text!r}: expected a:b with whole numbers, e.g. 0:4") from None
    if lo < 0 or hi > n or lo >= hi:
        raise RenderError(f"--{what} {text} is outside this plan's {what} 0:{n} (or empty)")
    return range(lo, hi)


def parse_time(text: str | None) -> tuple[float | None, float | None]:
    if text is None:
        return None, None
    try:
        a, b = text.split(":", 1)
        lo = float(a) if a.strip() else None
        hi = float(b) if b.strip() else None
    except ValueError:
        raise RenderError(f"--time {text!r}: expected a:b in seconds, e.g. 0:2.5") from None
    if lo is not None and hi is not None and hi <= lo:
        raise RenderError(f"--time {text}: the end must be after the start")
    return lo, hi


def parse_square(text: str | None, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    G, L, K = shape
    if text is None:
        return G // 2, L // 2, K // 2
    try:
        i, j, k = (int(x) for x in text.replace("(", "").replace(")", "").split(","))
    except ValueError:
        raise RenderError(f"--square {text!r}: expected i,j,k (token, layer, GPU batch), e.g. 1,3,0") from None
    if not (0 <= i < G and 0 <= j < L and 0 <= k < K):
        raise RenderError(f"--square {text} is outside this plan's {G} tokens x {L} layers x {K} GPU batches")
    return i, j, k


@dataclass(frozen=True)
class Window:
    tokens: range
    layers: range
    batches: range

    def __contains__(self, sq) -> bool:
        i, j, k = sq
        return i in self.tokens and j in self.layers and k in self.batches

    def describe(self) -> str:
        r = lambda x: f"{x.start}:{x.stop}"  # noqa: E731
        return f"tokens {r(self.tokens)}, layers {r(self.layers)}, batches {r(self.batches)}"


def default_window(shape: tuple[int, int, int]) -> Window:
    """All of a small block; for a large one the first tokens and layers: at most
    ``MAX_GRID_ROWS`` batches and about ``MAX_GRID_SQUARES`` squares (never more than
    ``MAX_GRID_COLUMNS`` columns), two tokens when a token's layers do not fill it."""
    G, L, K = shape
    batches = range(min(K, MAX_GRID_ROWS))
    cols = min(MAX_GRID_COLUMNS, max(12, MAX_GRID_SQUARES // len(batches)))
    if 2 * L <= cols or (G == 1 and L <= cols):
        tokens, layers = range(min(G, max(1, cols // L))), range(L)
    else:       # two tokens show how a row continues from the last layer to the next token
        ntok = min(G, 2)
        tokens, layers = range(ntok), range(min(L, cols // ntok))
    return Window(tokens, layers, batches)


def make_window(shape, tokens=None, layers=None, batches=None) -> Window:
    G, L, K = shape
    d = default_window(shape)
    return Window(parse_range(tokens, G, "tokens") or d.tokens, parse_range(layers, L, "layers") or d.layers,
                  parse_range(batches, K, "batches") or d.batches)


# ---------------------------------------------------------------------------- grid

@dataclass
class GridGeometry:
    window: Window
    gap: float          # blank columns between tokens

    def xy(self, sq) -> tuple[float, float]:
        i, j, k = sq
        w = self.window
        return ((i - w.tokens.start) * (len(w.layers) + self.gap) + (j - w.layers.start),
                float(k - w.batches.start))

    @property
    def width(self) -> float:
        w = self.window
        return len(w.tokens) * len(w.layers) + (len(w.tokens) - 1) * self.gap


def path_squares(plan, window: Window) -> tuple[list[tuple], list[int], set[tuple]]:
    """Computes of the window in path order, their ordinals (1-based) among all computes,
    and the squares that have a load_weight on the path."""
    order, ordinals, weights = [], [], set()
    n = 0
    for kind, i, j, k in plan.path:
        if kind == "compute":
            n += 1
            if (i, j, k) in window:
                order.append((i, j, k))
                ordinals.append(n)
        elif kind == "load_weight" and (i, j, k) in window:
            weights.add((i, j, k))
    return order, ordinals, weights


def path_lines(geo: GridGeometry, order: list[tuple], ordinals: list[int]):
    """(xs, ys) of the path through the window's squares (NaN where it leaves the window)
    and the list of jump segments ((x0, y0), (x1, y1))."""
    xs, ys, jumps = [], [], []
    for n, sq in enumerate(order):
        x, y = geo.xy(sq)
        if n and ordinals[n] != ordinals[n - 1] + 1:
            xs.append(math.nan)
            ys.append(math.nan)
            jumps.append((geo.xy(order[n - 1]), (x, y)))
        xs.append(x)
        ys.append(y)
    return np.array(xs, dtype=float), np.array(ys, dtype=float), jumps


def _grid_figure(geo: GridGeometry) -> tuple[Figure, float]:
    nrows = len(geo.window.batches)
    cell = min(0.5, 16.0 / max(geo.width, 1), 7.0 / max(nrows, 1))
    fig = Figure(figsize=(max(7.0, geo.width * cell + 1.3), (nrows + 0.7) * cell + 1.9), layout="constrained")
    return fig, cell * 72


def _draw_squares(ax, geo: GridGeometry, spec, order: list[tuple]) -> None:
    rects = [Rectangle((x - 0.45, y - 0.45), 0.9, 0.9) for x, y in map(geo.xy, order)]
    colors = [LAYER_COLORS.get(spec.layer(j).kind, "#EEEEEE") for _i, j, _k in order]
    coll = PatchCollection(rects, facecolors=colors, edgecolors="#9A9A9A", linewidths=0.6, zorder=1)
    coll.set_gid("squares")
    ax.add_collection(coll)


def _draw_weight_ticks(ax, geo: GridGeometry, weights: set[tuple]) -> None:
    if not weights:
        return
    rects = [Rectangle((x - 0.45, y - 0.45), 0.12, 0.9) for x, y in map(geo.xy, sorted(weights))]
    coll = PatchCollection(rects, facecolors=KIND_COLORS["load_weight"], edgecolors="none", zorder=2)
    coll.set_gid("weight-loads")
    ax.add_collection(coll)


def _draw_path(ax, geo: GridGeometry, order: list[tuple], ordinals: list[int]) -> None:
    xs, ys, jumps = path_lines(geo, order, ordinals)
    for (x0, y0), (x1, y1) in jumps:
        ax.add_line(Line2D([x0, x1], [y0, y1], color="#AAAAAA", lw=0.8, ls=(0, (3, 3)), zorder=2,
                           gid="path-jump"))
    ax.add_line(Line2D(xs, ys, color=KIND_COLORS["compute"], lw=1.6, alpha=0.85, zorder=3, gid="path"))
    _draw_arrowheads(ax, xs, ys)
    if len(order):
        x0, y0 = geo.xy(order[0])
        ax.plot([x0], [y0], "o", ms=7, mfc="none", mec="#222222", mew=1.5, zorder=4, gid="path-start")


def _draw_arrowheads(ax, xs: np.ndarray, ys: np.ndarray) -> None:
    """A small triangle at the middle of every path segment, pointing along it."""
    by_angle: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for n in range(len(xs) - 1):
        x0, y0, x1, y1 = xs[n], ys[n], xs[n + 1], ys[n + 1]
        if any(map(math.isnan, (x0, y0, x1, y1))):
            continue
        # the y axis is inverted (batch 0 on top): a step down in data points down on screen
        angle = round(math.degrees(math.atan2(-(y1 - y0), x1 - x0)))
        by_angle[angle].append(((x0 + x1) / 2, (y0 + y1) / 2))
    if sum(map(len, by_angle.values())) > 2000:
        return
    for angle, pts in by_angle.items():
        px, py = zip(*pts)
        ax.scatter(px, py, marker=(3, 0, angle - 90), s=22, c=KIND_COLORS["compute"], linewidths=0, zorder=3)


def _draw_ordinals(ax, geo: GridGeometry, order: list[tuple], ordinals: list[int], cell_pts: float) -> None:
    if not ordinals or len(order) > 1200:
        return
    digits = len(str(max(ordinals)))
    size = min(7.5, 0.6 * cell_pts / (0.62 * max(digits, 2)), 0.45 * cell_pts)
    if size < 3.5:
        return
    for sq, n in zip(order, ordinals):
        x, y = geo.xy(sq)
        ax.text(x + 0.42, y + 0.42, str(n), ha="right", va="bottom", fontsize=size, color="#333333", zorder=5)


def _grid_axes_labels(ax, geo: GridGeometry) -> None:
    w = geo.window
    ticks, labels = [], []
    step = max(1, math.ceil(len(w.layers) / 24))
    for i in w.tokens:
        for j in w.layers:
            if (j - w.layers.start) % step == 0 or j == w.layers.stop - 1:
                ticks.append(geo.xy((i, j, w.batches.start))[0])
                labels.append(str(j))
        x0 = geo.xy((i, w.layers.start, 0))[0] - 0.5
        x1 = geo.xy((i, w.layers.stop - 1, 0))[0] + 0.5
        name = "token 0 (prefill)" if i == 0 else f"token {i}"
        ax.text((x0 + x1) / 2, -0.75, name, ha="center", va="bottom", fontsize=9, fontweight="bold")
        if i != w.tokens.start:
            ax.axvline(x0 - geo.gap / 2, color="#BBBBBB", lw=0.8, zorder=0)
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_yticks(range(len(w.batches)), [str(k) for k in w.batches], fontsize=8)
    ax.set_xlabel("layer j (within each token)")
    ax.set_ylabel("GPU batch k")
    ax.set_xlim(-0.7, geo.width - 0.3)
    ax.set_ylim(len(w.batches) - 0.4, -1.05)
    ax.set_aspect("equal")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _grid_legend(fig, spec, window: Window, has_weights: bool, has_jumps: bool) -> None:
    kinds = sorted({spec.layer(j).kind for j in window.layers}, key=list(LAYER_COLORS).index)
    handles = [Patch(facecolor=LAYER_COLORS[k], edgecolor="#9A9A9A", label=f"{k} layer") for k in kinds]
    if has_weights:
        handles.append(Patch(facecolor=KIND_COLORS["load_weight"], label="load_weight on path"))
    handles.append(Line2D([], [], color=KIND_COLORS["compute"], lw=1.6, marker=(3, 0, -90), label="traversal path"))
    if has_jumps:
        handles.append(Line2D([], [], color="#AAAAAA", lw=0.8, ls=(0, (3, 3)), label="path outside window"))
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="#222222", label="first square shown"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)


def draw_grid(plan, tokens: str | None = None, layers: str | None = None, batches: str | None = None,
              window: Window | None = None) -> Figure:
    """The grid of squares of the block with the traversal path through them (paper Fig. 3/4)."""
    spec = plan_spec(plan)
    shape = (plan.workload.gen_len, spec.num_layers, plan.policy.num_gpu_batches)
    window = window or make_window(shape, tokens, layers, batches)
    geo = GridGeometry(window, gap=0.8 if len(window.tokens) > 1 else 0.0)
    order, ordinals, weights = path_squares(plan, window)
    fig, cell_pts = _grid_figure(geo)
    ax = fig.add_subplot()
    _draw_squares(ax, geo, spec, order)
    _draw_weight_ticks(ax, geo, weights)
    _draw_path(ax, geo, order, ordinals)
    _draw_ordinals(ax, geo, order, ordinals, cell_pts)
    _grid_axes_labels(ax, geo)
    has_jumps = any(a.get_gid() == "path-jump" for a in ax.lines)
    _grid_legend(fig, spec, window, bool(weights), has_jumps)
    G, L, K = shape
    whole = window == Window(range(G), range(L), range(K))
    shown = "whole block" if whole else f"window {window.describe()} of {G} x {L} x {K}"
    fig.suptitle(f"{model_name(plan)}: {plan.policy.schedule} schedule, {K} GPU batch{'es' * (K > 1)} of "
                 f"{plan.policy.gpu_batch_size}, prefetch {'on' if plan.prefetch else 'off'}\n"
                 f"{shown} (tokens x layers x batches); number = order of computation", fontsize=10)
    fig.render_info = {"order": order, "ordinals": ordinals, "window": window}
    return fig


# ---------------------------------------------------------------------------- graph around a square

def neighbourhood(graph, centre: tuple, depth: int) -> set[tuple]:
    """``centre``, its ancestors and its descendants up to ``depth`` edges away."""
    seen = {centre}
    for step in (graph.predecessors, graph.successors):
        frontier = {centre}
        for _ in range(depth):
            frontier = {n for f in frontier for n in step(f)} - seen
            seen |= frontier
    return seen


def _node_label(graph, node: tuple, index: dict) -> str:
    kind, i, j, k = node
    attrs = graph.nodes[node]
    lines = [kind, f"({i},{j},{k})"]
    if kind == "compute":
        lines.append(fmt_flops(attrs["flops"]))
    else:
        moves = [(a, b, n) for a, b, n in attrs["moves"] if n]
        lines += [f"{fmt_bytes(n)} {a}→{b}" for a, b, n in moves[:2]] or ["no bytes moved"]
        if len(moves) > 2:
            lines[-1] += " …"
    lines.append(f"path #{index[node]}" if node in index else "not on path")
    return "\n".join(lines)


def graph_layout(nodes: list[tuple], index: dict, graph) -> dict[tuple, tuple[float, int]]:
    """Columns in path order, as compact as possible: a node joins the current column unless
    its kind's lane is taken there or it depends on a node in it.  Rows: kind lanes."""
    def key(n):
        if n in index:
            return (index[n], 0)
        succ = [index[s] for s in graph.successors(n) if s in index]
        return (min(succ) if succ else 1 << 60, -1)
    pos: dict[tuple, tuple[float, int]] = {}
    col, lanes_used, members = 0, set(), set()
    for n in sorted(nodes, key=key):
        lane = KIND_ORDER.index(n[0]) if n[0] in KIND_ORDER else len(KIND_ORDER)
        if lane in lanes_used or any(p in members for p in graph.predecessors(n)):
            col, lanes_used, members = col + 1, set(), set()
        lanes_used.add(lane)
        members.add(n)
        pos[n] = (float(col), lane)
    return pos


def _plan_only_deps(graph, checked, index: dict, centre: tuple) -> list[tuple]:
    """Dependencies the checked path adds for ``centre`` through buffers (not graph edges)."""
    if centre not in index:
        return []
    extra = []
    for q in checked.deps[index[centre]]:
        src = checked.path[q]
        if not graph.has_edge(src, centre):
            extra.append(src)
    return extra


def draw_graph_around(plan, square: str | tuple | None = None, depth: int = 2, replayed=None) -> Figure:
    """The compute node of one square and its neighbourhood in the task graph."""
    graph, checked = replayed or replay(plan)
    shape = (graph.graph["gen_len"], graph.graph["num_layers"], graph.graph["num_gpu_batches"])
    sq = square if isinstance(square, tuple) else parse_square(square, shape)
    centre = ("compute",) + tuple(sq)
    index = {n: p for p, n in enumerate(checked.path)}
    shown = neighbourhood(graph, centre, depth)
    extra = _plan_only_deps(graph, checked, index, centre)
    shown |= set(extra)
    pos = graph_layout(list(shown), index, graph)
    ncols = int(max(x for x, _ in pos.values())) + 1
    lanes = sorted({lane for _, lane in pos.values()})
    fig = Figure(figsize=(max(7.0, GRAPH_COL_IN * ncols + 1.5), GRAPH_LANE_IN * len(lanes) + 1.6),
                 layout="constrained")
    ax = fig.add_subplot()
    row = {lane: r for r, lane in enumerate(lanes)}
    xy = {n: (x, row[lane]) for n, (x, lane) in pos.items()}
    boxes = _draw_graph_nodes(ax, graph, xy, index, centre)
    _draw_graph_edges(ax, graph, xy, boxes, shown, extra, centre)
    ax.set_yticks(range(len(lanes)), [KIND_ORDER[lane] if lane < len(KIND_ORDER) else "other" for lane in lanes],
                  fontsize=8)
    ax.set_xticks([])
    ax.set_xlim(-0.6, ncols - 0.4)
    ax.set_ylim(len(lanes) - 0.45, -0.55)
    ax.set_xlabel("path order →")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    rules = {r for _, _, r in graph.subgraph(shown).edges(data="rule")}
    _graph_legend(fig, rules, bool(extra), any(n not in index for n in shown))
    _graph_title(fig, plan, checked, index, centre, depth, len(checked.path))
    fig.render_info = {"nodes": shown, "centre": centre, "positions": xy}
    return fig


def _draw_graph_nodes(ax, graph, xy, index, centre) -> dict:
    boxes = {}
    for n, (x, y) in xy.items():
        on_path, color = n in index, kind_color(n[0])
        box = FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                             boxstyle="round,pad=0.0,rounding_size=0.05",
                             facecolor=_tint(color, 0.25) if on_path else "white",
                             edgecolor="#111111" if n == centre else color,
                             linewidth=2.4 if n == centre else 1.2, linestyle="-" if on_path else "--",
                             zorder=2, gid=f"node:{n[0]}:{n[1]},{n[2]},{n[3]}")
        ax.add_patch(box)
        ax.text(x, y, _node_label(graph, n, index), ha="center", va="center", fontsize=6.5, zorder=3,
                fontweight="bold" if n == centre else "normal")
        boxes[n] = box
    return boxes


def _tint(color: str, share: float) -> tuple[float, float, float]:
    """``color`` mixed with white (opaque, so edges behind a box stay hidden)."""
    r, g, b = matplotlib.colors.to_rgb(color)
    return (1 - share + share * r, 1 - share + share * g, 1 - share + share * b)


def _draw_graph_edges(ax, graph, xy, boxes, shown, extra, centre) -> None:
    occupied = set(xy.values())
    for u, v, rule in graph.subgraph(shown).edges(data="rule"):
        color, ls, _ = RULE_STYLE.get(rule, ("#777777", "-", ""))
        _arrow(ax, xy, boxes, occupied, u, v, color, ls, gid=f"edge:rule{rule}")
    for u in extra:
        _arrow(ax, xy, boxes, occupied, u, centre, "#777777", ":", gid="edge:plan")


def _arrow(ax, xy, boxes, occupied, u, v, color, ls, gid) -> None:
    others = occupied - {xy[u], xy[v]}
    rad = _clear_rad(xy[u], xy[v], others)
    a = FancyArrowPatch(xy[u], xy[v], patchA=boxes[u], patchB=boxes[v], arrowstyle="-|>", mutation_scale=10,
                        connectionstyle=f"arc3,rad={rad}", color=color, linestyle=ls, lw=1.2, zorder=1,
                        shrinkA=1, shrinkB=1)
    a.set_gid(gid)
    ax.add_patch(a)


def _clear_rad(p0, p1, boxes, inches=(GRAPH_COL_IN, GRAPH_LANE_IN)) -> float:
    """The least bent ``arc3`` curve from p0 to p1 that misses every box centred in ``boxes``
    (straight if none does); curves are computed as matplotlib does, on the page (inches)."""
    sx, sy = inches
    (x0, y0), (x1, y1) = (p0[0] * sx, -p0[1] * sy), (p1[0] * sx, -p1[1] * sy)
    t = np.linspace(0.1, 0.9, 33)[:, None]
    for rad in (0.0, -0.15, 0.15, -0.3, 0.3, -0.45, 0.45):
        cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)
        pts = (1 - t) ** 2 * np.array([x0, y0]) + 2 * t * (1 - t) * np.array([cx, cy]) + t ** 2 * np.array([x1, y1])
        hit = any(np.any((np.abs(pts[:, 0] - bx * sx) < BOX_W * sx / 2 + 0.05)
                         & (np.abs(pts[:, 1] + by * sy) < BOX_H * sy / 2 + 0.05)) for bx, by in boxes)
        if not hit:
            return rad
    return 0.0


def _graph_legend(fig, rules: set, has_extra: bool, has_off_path: bool) -> None:
    handles = [Line2D([], [], color=c, ls=ls, lw=1.2, label=label) for r, (c, ls, label) in RULE_STYLE.items()
               if r in rules]
    if has_extra:
        handles.append(Line2D([], [], color="#888888", ls=":", lw=1.2, label="plan: via a shared buffer"))
    if has_off_path:
        handles.append(Patch(facecolor="white", edgecolor="#777777", ls="--", label="in graph, not on path"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)


def _graph_title(fig, plan, checked, index, centre, depth, n) -> None:
    _, i, j, k = centre
    p = index.get(centre)
    reads = ", ".join(_buf(b) for b in checked.uses[p]) if p is not None else "-"
    frees = ", ".join(_buf(b) for b in checked.releases[p]) if p is not None else "-"
    fig.suptitle(f"{model_name(plan)}: task graph around square (i={i}, j={j}, k={k}), "
                 f"path #{p} of {n}, up to {depth} edge{'s' * (depth != 1)} each way\n"
                 f"reads {reads}; releases {frees}", fontsize=9)


def _buf(b: tuple) -> str:
    return f"{b[0]}({','.join(map(str, b[1:]))})"


# ---------------------------------------------------------------------------- residency

def downsample_max(values, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): the values themselves when short, else the maximum of each bucket of
    ``ceil(n / max_points)`` consecutive values at the bucket's first index."""
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n <= max_points:
        return np.arange(n), y
    b = math.ceil(n / max_points)
    pad = (-n) % b
    padded = np.concatenate([y, np.full(pad, -np.inf)]) if pad else y
    return np.arange(0, n, b), padded.reshape(-1, b).max(axis=1)


def _unit(nbytes: float) -> tuple[str, int]:
    for name, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= div:
            return name, div
    return "B", 1


def loop_starts(plan) -> tuple[str, list[tuple[int, int]]]:
    """Path indices where the outer loop of the schedule advances: tokens for zig-zag,
    GPU batches for row order."""
    starts, seen = [], set()
    outer = "token" if plan.policy.schedule == "zigzag" or plan.policy.num_gpu_batches == 1 else "batch"
    for p, (kind, i, j, k) in enumerate(plan.path):
        if kind == "compute":
            key = i if outer == "token" else k
            if key not in seen:
                seen.add(key)
                starts.append((key, p))
    return outer, starts


def draw_residency(plan, replayed=None, max_points: int = 4000) -> Figure:
    """Bytes resident per tier vs path index, with capacity, static homes and the peak."""
    graph, checked = replayed or replay(plan)
    cap = plan.residency.get("capacity", {}) or {}
    tiers = [t for t in TIERS if checked.peak.get(t)] or [t for t in TIERS if cap.get(t) is not None][:1]
    absent = [f"{t} {'unused' if cap.get(t) is not None else 'absent'}" for t in TIERS if t not in tiers]
    fig = Figure(figsize=(11, 1.0 + 2.1 * len(tiers)), layout="constrained")
    axes = fig.subplots(len(tiers), 1, sharex=True, squeeze=False)[:, 0]
    outer, starts = loop_starts(plan)
    n = len(checked.path)
    for ax, t in zip(axes, tiers):
        _draw_tier(ax, t, checked, cap.get(t), max_points)
        _draw_loop_marks(ax, outer, starts, top=(ax is axes[0]))
    axes[-1].set_xlabel(f"path index (node number, 0..{n - 1})")
    axes[-1].set_xlim(-0.5, max(n - 0.5, 0.5))
    note = f"; {', '.join(absent)}" if absent else ""
    sampled = f"; max per bucket of {math.ceil(n / max_points)} nodes" if n > max_points else ""
    fig.suptitle(f"{model_name(plan)}: bytes resident per tier along the path ({plan.policy.schedule}, "
                 f"{n} nodes{sampled}{note})", fontsize=10)
    return fig


def _draw_tier(ax, tier: str, checked, capacity: int | None, max_points: int) -> None:
    values = checked.timeline.get(tier, [])
    peak, home = checked.peak[tier], checked.home_bytes[tier]
    xs, ys = downsample_max(values, max_points)
    top = max(peak, 1)
    cap_in_scale = capacity is not None and capacity <= 2.5 * top
    unit, div = _unit(max(top, capacity or 0) if cap_in_scale else top)
    line, = ax.plot(xs, ys / div, drawstyle="steps-post", color=TIER_COLORS[tier], lw=1.0, gid=f"resident:{tier}")
    line.raw_max, line.unit_bytes = (float(ys.max()) if len(ys) else 0.0), div
    ax.fill_between(xs, ys / div, step="post", color=TIER_COLORS[tier], alpha=0.15, lw=0)
    ax.axhline(home / div, color="#555555", lw=0.9, ls=":", gid=f"homes:{tier}")
    low = home < 0.1 * top
    ax.text(0.995, home / div, f"static homes {fmt_bytes(home)}", transform=ax.get_yaxis_transform(),
            fontsize=7, va="bottom" if low else "top", ha="right", color="#444444",
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=1.0))
    ymax = top * 1.18
    if capacity is not None and cap_in_scale:
        ax.axhline(capacity / div, color="#D62728", lw=1.2, ls="--", gid=f"capacity:{tier}")
        ax.text(0.998, capacity / div, f"capacity {fmt_bytes(capacity)} ", transform=ax.get_yaxis_transform(),
                fontsize=7, va="bottom", ha="right", color="#D62728")
        ymax = capacity * 1.12
    elif capacity is not None:
        ax.text(0.998, 0.97, f"capacity {fmt_bytes(capacity)} ↑ (off scale, {capacity / top:.0f}x the peak)",
                transform=ax.transAxes, fontsize=7, va="top", ha="right", color="#D62728")
    _mark_peak(ax, checked, tier, values, div)
    ax.set_ylim(0, ymax / div)
    ax.set_ylabel(f"{tier} ({unit})")
    ax.grid(axis="y", color="#EEEEEE", lw=0.6)


def _mark_peak(ax, checked, tier: str, values, div: int) -> None:
    peak = checked.peak[tier]
    at = checked.peak_at[tier]
    if at < 0:          # the static homes are the peak: first index where it is reached
        at = next((p for p, v in enumerate(values) if v >= peak), 0)
    where = checked.path[at] if 0 <= at < len(checked.path) else None
    ax.plot([at], [peak / div], "v", color="#111111", ms=6, zorder=5, gid=f"peak:{tier}")
    what = f" at #{at} {where[0]}({where[1]},{where[2]},{where[3]})" if where else ""
    above = peak - checked.home_bytes[tier]
    what = f" = homes + {fmt_bytes(above)}{what}" if above > 0 else " (the static homes)"
    ha = "left" if at < 0.6 * max(len(values), 1) else "right"
    ax.annotate(f"peak {fmt_bytes(peak)}{what}", (at, peak / div), xytext=(6 if ha == "left" else -6, 6),
                textcoords="offset points", fontsize=7.5, ha=ha, va="bottom")


def _draw_loop_marks(ax, outer: str, starts: list[tuple[int, int]], top: bool) -> None:
    if len(starts) < 2:
        return
    step = max(1, math.ceil(len(starts) / 16))
    for n, (key, p) in enumerate(starts):
        ax.axvline(p, color="#CCCCCC", lw=0.6, zorder=0)
        if top and n % step == 0:
            ax.text(p, 1.01, f"{'i' if outer == 'token' else 'k'}={key}", transform=ax.get_xaxis_transform(), fontsize=6.5,
                    ha="left", va="bottom", color="#777777")


# ---------------------------------------------------------------------------- timeline

@dataclass
class Trace:
    lanes: list[str]                                  # names, in drawing order (top first)
    bars: list[tuple[int, str, float, float, str]]    # (lane, kind, start s, duration s, name)
    source: str = "trace"


def read_trace(trace: dict) -> Trace:
    """Lanes (one per (pid, tid) that has complete events) and their bars, times in seconds
    since the first event."""
    events = trace.get("traceEvents", [])
    names, order = {}, {}
    for e in events:
        if isinstance(e, dict) and e.get("ph") == "M":
            key = (e.get("pid", 0), e.get("tid", 0))
            if e.get("name") == "thread_name":
                names[key] = str((e.get("args") or {}).get("name", key[1]))
            elif e.get("name") == "thread_sort_index":
                order[key] = (e.get("args") or {}).get("sort_index", 0)
    raw = []
    for e in events:
        if isinstance(e, dict) and e.get("ph") == "X":
            try:
                raw.append(((e.get("pid", 0), e.get("tid", 0)), float(e["ts"]), float(e.get("dur", 0.0)), e))
            except (KeyError, TypeError, ValueError):
                raise RenderError(f"{trace.get('source', 'trace')}: an \"X\" event lacks a numeric ts/dur") from None
    if not raw:
        raise RenderError(f"{trace.get('source', 'trace')} has no complete (\"ph\": \"X\") events to draw")
    keys = sorted({k for k, *_ in raw}, key=lambda k: (order.get(k, 0), k))
    lane_of = {k: n for n, k in enumerate(keys)}
    t0 = min(ts for _, ts, _, _ in raw)
    bars = [(lane_of[k], event_kind(e), (ts - t0) / 1e6, dur / 1e6, str(e.get("name", "")))
            for k, ts, dur, e in raw]
    labels = [names.get(k, f"tid {k[1]}") for k in keys]
    if len(set(labels)) < len(labels):   # same thread name in two processes
        labels = [f"{name} (pid {k[0]})" for name, k in zip(labels, keys)]
    return Trace(labels, bars, trace.get("source", "trace"))


def event_kind(e: dict) -> str:
    kind = (e.get("args") or {}).get("kind")
    if kind:
        return str(kind)
    return str(e.get("name", "?")).split("(", 1)[0].strip() or "?"


def busy_fraction(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Share of [lo, hi] covered by the union of (start, duration) intervals."""
    clipped = sorted((max(s, lo), min(s + d, hi)) for s, d in intervals if s + d > lo and s < hi)
    total, end = 0.0, lo
    for a, b in clipped:
        if b > end:
            total += b - max(a, end)
            end = b
    return total / (hi - lo) if hi > lo else 0.0


def _time_unit(span: float) -> tuple[str, float]:
    if span >= 2.0:
        return "s", 1.0
    if span >= 2e-3:
        return "ms", 1e3
    return "µs", 1e6


def draw_timeline(trace: dict | Trace, time: str | None = None) -> Figure:
    """Gantt chart of an executed trace: one row per lane, bars coloured by node kind
    (every other bar of a lane a shade lighter, so back-to-back tasks stay apart)."""
    tr = trace if isinstance(trace, Trace) else read_trace(trace)
    lo, hi = parse_time(time)
    end = max(s + d for _, _, s, d, _ in tr.bars)
    lo = 0.0 if lo is None else lo
    hi = max(end, lo + 1e-9) if hi is None else hi
    if lo >= end and time is not None:
        raise RenderError(f"--time {time} starts after the trace ends ({end:.3f} s)")
    in_window = sorted((b for b in tr.bars if b[2] + b[3] >= lo and b[2] <= hi), key=lambda b: (b[0], b[2]))
    busy = [busy_fraction([(s, d) for ln, _, s, d, _ in in_window if ln == lane], lo, hi)
            for lane in range(len(tr.lanes))]
    unit, scale = _time_unit(hi - lo)
    fig = Figure(figsize=(12, 1.7 + 0.45 * len(tr.lanes)), layout="constrained")
    ax = fig.add_subplot()
    kinds = _draw_bars(ax, in_window, scale)
    ax.set_yticks(range(len(tr.lanes)), [f"{name}  {b:.0%}" for name, b in zip(tr.lanes, busy)], fontsize=8)
    ax.set_ylim(len(tr.lanes) - 0.5, -0.5)
    ax.set_xlim(lo * scale, hi * scale)
    ax.set_xlabel(f"time since the first event ({unit})")
    ax.set_axisbelow(True)
    ax.grid(axis="x", color="#E6E6E6", lw=0.6)
    handles = [Patch(facecolor=c, label=k) for k, c in kinds.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    summary = ", ".join(f"{name} {b:.0%}" for name, b in zip(tr.lanes, busy))
    fig.suptitle(f"{Path(tr.source).name}: {len(in_window)} tasks in {lo:.4g}–{hi:.4g} s, {len(tr.lanes)} lanes\n"
                 f"busy: {summary}", fontsize=9)
    fig.render_info = {"lanes": tr.lanes, "busy": busy}
    return fig


def _draw_bars(ax, bars, scale: float) -> dict[str, str]:
    """One broken_barh per (lane, kind, shade); returns the kinds drawn and their colours."""
    groups: dict[tuple[int, str, int], list] = defaultdict(list)
    count: dict[int, int] = defaultdict(int)
    for lane, kind, s, d, _ in bars:
        groups[(lane, kind, count[lane] % 2)].append((s * scale, d * scale))
        count[lane] += 1
    extra: dict[str, str] = {}
    rank = lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k)  # noqa: E731
    kinds = {k: kind_color(k, extra) for k in sorted({k for _, k, _ in groups}, key=rank)}
    for (lane, kind, shade), ivs in groups.items():
        c = kinds[kind] if shade == 0 else _tint(kinds[kind], 0.7)
        coll = ax.broken_barh(ivs, (lane - 0.38, 0.76), facecolors=c, edgecolors=c, linewidths=0.2)
        coll.set_gid(f"bars:{lane}:{kind}")
    return kinds


# ---------------------------------------------------------------------------- output and CLI

def output_paths(out: str | None, source: Path, whats: list[str], formats: list[str]) -> dict[str, list[Path]]:
    """Files to write per drawing: ``--out NAME.png`` is a file (the drawing's name is
    appended before the suffix when there are several), anything else a prefix."""
    if out and Path(out).suffix.lower().lstrip(".") in FORMATS:
        p = Path(out)
        if len(whats) == 1:
            return {whats[0]: [p]}
        return {w: [p.with_name(f"{p.stem}-{w}{p.suffix}")] for w in whats}
    prefix = out if out else str(source.with_suffix(""))
    sep = "" if prefix.endswith(("/", "-", "_")) else "-"
    return {w: [Path(f"{prefix}{sep}{w}.{f}") for f in formats] for w in whats}


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="render.py", description="Draw a flexgraph plan or an execution trace.")
    p.add_argument("file", help="plan.json (flexgraph plan) or a Chrome trace-event JSON (flexgraph execute)")
    p.add_argument("--out", help="prefix of the files to write (default: FILE without .json), "
                                 "or one file NAME.png / NAME.svg")
    p.add_argument("--what", help=f"comma-separated, of {','.join(WHATS)} (default: all that apply to FILE)")
    p.add_argument("--format", default="png", help="comma-separated, of png,svg (default png)")
    p.add_argument("--tokens", help="grid window: token steps a:b (b exclusive)")
    p.add_argument("--layers", help="grid window: layers a:b")
    p.add_argument("--batches", help="grid window: GPU batches a:b")
    p.add_argument("--square", help="graph: the square i,j,k to centre on (default the middle one)")
    p.add_argument("--depth", type=int, default=2, help="graph: edges to follow each way (default 2)")
    p.add_argument("--time", help="timeline: window a:b in seconds since the first event")
    return p


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise RenderError(message)


def _split_list(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise RenderError(f"{option} {text!r}: choose from {','.join(allowed)}")
    return list(dict.fromkeys(items))


def render(argv: list[str] | None = None) -> list[Path]:
    """Parse ``argv``, draw, write; returns the files written."""
    args = build_parser().parse_args(argv)
    if args.depth < 0:
        raise RenderError("--depth must be 0 or more")
    kind, data = load_input(args.file)
    applicable = ("timeline",) if kind == "trace" else ("grid", "graph", "residency")
    whats = _split_list(args.what, WHATS, "--what") if args.what else list(applicable)
    wrong = [w for w in whats if w not in applicable]
    if wrong:
        raise RenderError(f"{args.file} is a {kind}; --what {','.join(wrong)} needs a "
                          f"{'plan' if kind == 'trace' else 'trace'} (a {kind} draws {','.join(applicable)})")
    formats = _split_list(args.format, FORMATS, "--format")
    figures = _draw(kind, data, whats, args)
    written = []
    for what, paths in output_paths(args.out, Path(args.file), whats, formats).items():
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            figures[what].savefig(path, dpi=150)
            written.append(path)
    return written


def _draw(kind: str, data, whats: list[str], args) -> dict[str, Figure]:
    if kind == "trace":
        return {"timeline": draw_timeline(data, args.time)}
    figures = {}
    if "grid" in whats:
        figures["grid"] = draw_grid(data, args.tokens, args.layers, args.batches)
    if "graph" in whats or "residency" in whats:
        if "graph" in whats:
            parse_square(args.square, plan_shape(data))     # a bad square fails before the slow replay
        replayed = replay(data)
        if "graph" in whats:
            figures["graph"] = draw_graph_around(data, args.square, args.depth, replayed)
        if "residency" in whats:
            figures["residency"] = draw_residency(data, replayed)
    return figures


def main(argv: list[str] | None = None) -> int:
    try:
        for path in render(argv):
            print(path)
    except FlexgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
