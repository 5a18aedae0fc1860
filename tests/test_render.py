"""tools/render.py: the grid, the graph around a square, residency and the trace timeline."""

import importlib.util
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import numpy as np  # noqa: E402

from flexgraph.cli import main as flexgraph_main  # noqa: E402
from flexgraph.plan.planfile import load_plan  # noqa: E402

RENDER_PY = Path(__file__).resolve().parents[1] / "tools" / "render.py"
SMALL = ["--search", "rule", "--model", "opt-125m", "--dummy", "--gpu-mem", "1GiB", "--percent", "30", "30", "0", "50", "0", "100",
         "--gpu-batch-size", "2", "--num-gpu-batches", "3", "--prompt-len", "8", "--gen-len", "3",
         "--num-prompts", "6"]


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("flexgraph_render_tool", RENDER_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    out = {}
    for schedule in ("zigzag", "row"):
        path = d / f"{schedule}.json"
        assert flexgraph_main(["--log-level", "warning", "plan", *SMALL, "--schedule", schedule,
                               "--out", str(path)]) == 0
        out[schedule] = path
    return out


@pytest.fixture(scope="module")
def replayed(render, plans):
    return {s: render.replay(load_plan(p)) for s, p in plans.items()}


def synthetic_trace(path: Path) -> Path:
    """Three lanes: compute busy 0-1 s and 2-3 s; load_weight 0-0.5 s and 0.25-1.5 s (overlapping,
    so busy 1.5 s); store 2.5-2.75 s.  Times in µs, as Chrome traces have them."""
    ev = [{"ph": "M", "name": "thread_name", "pid": 7, "tid": t, "args": {"name": n}}
          for t, n in ((1, "compute"), (2, "load_weight"), (3, "store"))]
    x = lambda name, tid, ts, dur, **args: {"name": name, "ph": "X", "pid": 7, "tid": tid,  # noqa: E731
                                           "ts": 1e6 + ts * 1e6, "dur": dur * 1e6, "args": args}
    ev += [x("compute(0,0,0)", 1, 0, 1), x("compute(0,1,0)", 1, 2, 1),
           x("load_weight(0,1,0)", 2, 0, 0.5), x("weights", 2, 0.25, 1.25, kind="load_weight"),
           x("store_cache(0,1,0)", 3, 2.5, 0.25)]
    path.write_text(json.dumps({"traceEvents": ev}))
    return path


def compute_squares(plan, window):
    return [(i, j, k) for kind, i, j, k in plan.path if kind == "compute" and (i, j, k) in window]


def path_xy(fig):
    line = next(a for a in fig.axes[0].lines if a.get_gid() == "path")
    xy = line.get_xydata()
    return xy[~np.isnan(xy).any(axis=1)]


# ---------------------------------------------------------------------------- grid

@pytest.mark.parametrize("schedule", ["zigzag", "row"])
def test_grid_draws_every_square_and_the_path_in_order(render, plans, schedule):
    plan = load_plan(plans[schedule])
    fig = render.draw_grid(plan, tokens="0:3")
    window = fig.render_info["window"]
    assert window == render.Window(range(3), range(26), range(3))
    squares = compute_squares(plan, window)
    (coll,) = [c for c in fig.axes[0].collections if c.get_gid() == "squares"]
    assert len(coll.get_paths()) == len(squares) == 3 * 26 * 3
    geo = render.GridGeometry(window, gap=0.8)
    assert np.array_equal(path_xy(fig), np.array([geo.xy(sq) for sq in squares], dtype=float))
    (ticks,) = [c for c in fig.axes[0].collections if c.get_gid() == "weight-loads"]
    loads = [n for n in plan.path if n[0] == "load_weight"]
    assert len(ticks.get_paths()) == len(loads)
    # zig-zag loads a layer's weights once per column of 3 batches, row order once per square
    assert len(loads) == (3 * 26 if schedule == "zigzag" else 3 * 26 * 3)


def test_zigzag_and_row_paths_differ(render, plans):
    zig, row = (path_xy(render.draw_grid(load_plan(plans[s]))) for s in ("zigzag", "row"))
    assert zig.shape == row.shape
    assert not np.array_equal(zig, row)
    # zig-zag steps down a column first, row order along a row
    assert (zig[1] - zig[0]).tolist() == [0.0, 1.0]
    assert (row[1] - row[0]).tolist() == [1.0, 0.0]


def test_grid_window_and_jumps(render, plans):
    plan = load_plan(plans["row"])
    fig = render.draw_grid(plan, tokens="1:3", layers="2:8", batches="1:3")
    window = fig.render_info["window"]
    squares = compute_squares(plan, window)
    assert len(squares) == 2 * 6 * 2
    (coll,) = [c for c in fig.axes[0].collections if c.get_gid() == "squares"]
    assert len(coll.get_paths()) == len(squares)
    assert fig.render_info["order"] == squares
    assert fig.render_info["ordinals"] == sorted(fig.render_info["ordinals"])
    jumps = [a for a in fig.axes[0].lines if a.get_gid() == "path-jump"]
    assert len(jumps) == 3          # leaves the layer window after each of the 4 row pieces but the last
    assert "window tokens 1:3, layers 2:8, batches 1:3" in fig._suptitle.get_text()


def test_default_window_of_a_large_plan_is_small(render):
    w = render.default_window((32, 194, 8))        # OPT-175B, 8 GPU batches
    assert w.tokens == range(2) and w.batches == range(8)
    assert 0 < len(w.layers) * len(w.tokens) * len(w.batches) <= 240
    assert render.default_window((3, 26, 3)) == render.Window(range(2), range(26), range(3))
    assert render.default_window((2, 6, 2)) == render.Window(range(2), range(6), range(2))   # all of it


@pytest.mark.parametrize("bad", ["0:99", "5:2", "x", "-1:3"])
def test_bad_window_is_one_error(render, bad):
    with pytest.raises(render.RenderError, match="--layers"):
        render.make_window((3, 26, 3), layers=bad)


# ---------------------------------------------------------------------------- graph around a square

def test_graph_around_a_square(render, plans, replayed):
    plan = load_plan(plans["zigzag"])
    graph, checked = replayed["zigzag"]
    fig = render.draw_graph_around(plan, "1,3,1", depth=1, replayed=replayed["zigzag"])
    centre = ("compute", 1, 3, 1)
    nodes = fig.render_info["nodes"]
    assert nodes == {centre} | set(graph.predecessors(centre)) | set(graph.successors(centre)) | \
        {("load_weight", 1, 3, 0)}     # the column's one weight load, a dependency through its buffer
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if (p.get_gid() or "").startswith("node:")]
    assert len(boxes) == len(nodes)
    edges = [p for p in ax.patches if (p.get_gid() or "").startswith("edge:")]
    assert len(edges) == graph.subgraph(nodes).number_of_edges() + 1
    assert {e.get_gid() for e in edges} == {"edge:rule1", "edge:rule2", "edge:rule3", "edge:plan"}
    # path order left to right; kinds in lanes
    pos = fig.render_info["positions"]
    index = {n: p for p, n in enumerate(checked.path)}
    on_path = sorted((n for n in nodes if n in index), key=index.get)
    xs = [pos[n][0] for n in on_path]
    assert xs == sorted(xs)
    assert len({pos[n][1] for n in nodes}) == len({n[0] for n in nodes})
    labels = [t.get_text() for t in ax.texts]
    assert any(t.startswith("compute\n(1,3,1)") for t in labels)
    assert any("→gpu" in t for t in labels)       # bytes moved, with their tiers


def test_graph_depth_two_is_larger(render, plans, replayed):
    plan = load_plan(plans["zigzag"])
    one = render.draw_graph_around(plan, (1, 3, 1), depth=1, replayed=replayed["zigzag"])
    two = render.draw_graph_around(plan, (1, 3, 1), depth=2, replayed=replayed["zigzag"])
    assert one.render_info["nodes"] < two.render_info["nodes"]
    assert ("store_cache", 0, 3, 1) in two.render_info["nodes"]     # rule 3 into this token's cache load


def test_bad_square(render):
    with pytest.raises(render.RenderError, match="--square"):
        render.parse_square("9,0,0", (3, 26, 3))
    with pytest.raises(render.RenderError, match="--square"):
        render.parse_square("1,2", (3, 26, 3))
    assert render.parse_square(None, (3, 26, 3)) == (1, 13, 1)


# ---------------------------------------------------------------------------- residency

@pytest.mark.parametrize("max_points", [4000, 50])
def test_residency_peak_survives(render, plans, replayed, max_points):
    plan = load_plan(plans["zigzag"])
    _graph, checked = replayed["zigzag"]
    fig = render.draw_residency(plan, replayed=replayed["zigzag"], max_points=max_points)
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.lines}
    for tier in ("gpu", "cpu", "disk"):
        line = lines[f"resident:{tier}"]
        assert line.raw_max == checked.peak[tier] == max(checked.timeline[tier])
        n = len(line.get_xdata())
        assert n == len(checked.path) if max_points > len(checked.path) else n <= max_points
        assert math.isclose(max(line.get_ydata()) * line.unit_bytes, checked.peak[tier], rel_tol=1e-12)
        assert f"peak:{tier}" in lines
    # the gpu capacity (1 GiB) is within 2.5x of the gpu peak of this plan or flagged off scale
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "capacity 1.00 GiB" in texts


def test_downsample_max_keeps_the_maximum(render):
    values = [1, 5, 2, 9, 3, 3, 3, 0, 7]
    x, y = render.downsample_max(values, 3)
    assert x.tolist() == [0, 3, 6] and y.tolist() == [5, 9, 7]
    x, y = render.downsample_max(values, 4)     # buckets of 3 again, last one padded
    assert max(y) == 9


# ---------------------------------------------------------------------------- timeline

def test_timeline_one_row_per_lane(render, tmp_path):
    kind, trace = render.load_input(synthetic_trace(tmp_path / "trace.json"))
    assert kind == "trace"
    fig = render.draw_timeline(trace)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 3
    assert [lb.split()[0] for lb in labels] == ["compute", "load_weight", "store"]
    busy = fig.render_info["busy"]
    assert busy == pytest.approx([2 / 3, 1.5 / 3, 0.25 / 3])
    gids = {c.get_gid() for c in ax.collections}
    assert {"bars:0:compute", "bars:1:load_weight", "bars:2:store_cache"} <= gids
    assert "compute 67%" in fig._suptitle.get_text()


def test_timeline_window(render, tmp_path):
    _, trace = render.load_input(synthetic_trace(tmp_path / "trace.json"))
    fig = render.draw_timeline(trace, time="0:1")
    assert fig.render_info["busy"] == pytest.approx([1.0, 1.0, 0.0])
    assert fig.axes[0].get_xlim() == (0.0, 1000.0) and "(ms)" in fig.axes[0].get_xlabel()
    with pytest.raises(render.RenderError, match="--time"):
        render.draw_timeline(trace, time="2:1")


# ---------------------------------------------------------------------------- CLI

def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def is_svg(path: Path) -> bool:
    return ET.parse(path).getroot().tag.endswith("svg")


def test_cli_plan_writes_png_and_svg(render, plans, tmp_path, capsys):
    prefix = tmp_path / "out" / "small"
    assert render.main([str(plans["zigzag"]), "--out", str(prefix), "--format", "png,svg",
                        "--square", "1,3,1", "--layers", "0:6"]) == 0
    printed = capsys.readouterr().out.split()
    expected = [f"{prefix}-{w}.{f}" for w in ("grid", "graph", "residency") for f in ("png", "svg")]
    assert printed == expected
    for p in map(Path, expected):
        assert is_png(p) if p.suffix == ".png" else is_svg(p)


def test_cli_trace_and_explicit_file(render, tmp_path, capsys):
    trace = synthetic_trace(tmp_path / "run.trace")
    out = tmp_path / "gantt.svg"
    assert render.main([str(trace), "--out", str(out), "--time", "0:2.5"]) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    assert is_svg(out)
    assert render.main([str(trace)]) == 0
    assert is_png(Path(capsys.readouterr().out.strip()))


@pytest.mark.parametrize("args, message", [
    (["{plan}", "--what", "timeline"], "needs a trace"),
    (["{plan}", "--layers", "0:500"], "--layers"),
    (["{plan}", "--what", "nope"], "--what"),
    (["{plan}", "--format", "jpg"], "--format"),
    (["{other}"], "neither a flexgraph plan"),
    (["{missing}"], "no file"),
    (["{plan}", "--bogus"], "unrecognized"),
])
def test_cli_errors_are_one_line(render, plans, tmp_path, capsys, args, message):
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    args = [a.format(plan=plans["row"], other=other, missing=tmp_path / "nope.json") for a in args]
    assert render.main(args + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("x-*"))
