"""The validity checker on small hand-drawn graphs (dask-style): each invalid path is
rejected for the right rule, and peaks equal hand-computed values."""

import networkx as nx
import pytest

from flexgraph.errors import RuleViolation
from flexgraph.plan.checker import check_path


def hand_graph() -> nx.DiGraph:
    """Two layers of one batch, one token; weights homed on cpu, computed on gpu ::

        load_weight(0,0,0) -> compute(0,0,0) -> compute(0,1,0) <- load_weight(0,1,0)

    Bytes: weights 100 and 200, activations 10, workspace 50 and 30.
    """
    g = nx.DiGraph(compute_tier="gpu", homes=[(("Wh", 0), "cpu", 100), (("Wh", 1), "cpu", 200)])

    def add(node, **a):
        a.setdefault("moves", [])
        a.setdefault("allocs", [])
        a.setdefault("needs", [])
        a.setdefault("frees", [])
        a.setdefault("flops", 0.0)
        g.add_node(node, kind=node[0], i=node[1], j=node[2], k=node[3], **a)

    add(("load_weight", 0, 0, 0), moves=[("cpu", "gpu", 100)], allocs=[(("Wb", 0, 0, 0), "gpu", 100)])
    add(("load_weight", 0, 1, 0), moves=[("cpu", "gpu", 200)], allocs=[(("Wb", 0, 1, 0), "gpu", 200)])
    add(("compute", 0, 0, 0), needs=[("W", 0)],
        allocs=[(("Hc", 0, 0, 0), "gpu", 10), (("X", 0, 0, 0), "gpu", 50)], frees=[("X", 0, 0, 0)])
    add(("compute", 0, 1, 0), needs=[("W", 1), ("Hc", 0, 0, 0)],
        allocs=[(("Hc", 0, 1, 0), "gpu", 10), (("X", 0, 1, 0), "gpu", 30)], frees=[("X", 0, 1, 0)])
    g.add_edge(("load_weight", 0, 0, 0), ("compute", 0, 0, 0), rule=2)
    g.add_edge(("load_weight", 0, 1, 0), ("compute", 0, 1, 0), rule=2)
    g.add_edge(("compute", 0, 0, 0), ("compute", 0, 1, 0), rule=1)
    return g


LW0, LW1 = ("load_weight", 0, 0, 0), ("load_weight", 0, 1, 0)
C0, C1 = ("compute", 0, 0, 0), ("compute", 0, 1, 0)
BIG = {"gpu": 10**6, "cpu": 10**6, "disk": 10**6}


def test_peak_with_prefetch_is_hand_computed():
    # lw0: 100; lw1: 300; c0: 300 + 10 + 50 = 360, then X0 and Wb0 (last use) go: 210;
    # c1: 210 + 10 + 30 = 250.
    r = check_path(hand_graph(), [LW0, LW1, C0, C1], BIG, keep_timeline=True)
    assert r.timeline["gpu"] == [100, 300, 360, 250]
    assert r.peak == {"gpu": 360, "cpu": 300, "disk": 0}
    assert r.peak_at["gpu"] == 2
    assert r.home_bytes == {"gpu": 0, "cpu": 300, "disk": 0}


def test_peak_without_prefetch_is_hand_computed():
    # lw0: 100; c0: 160 -> 10 left (Hc0); lw1: 210; c1: 250.
    r = check_path(hand_graph(), [LW0, C0, LW1, C1], BIG, keep_timeline=True)
    assert r.timeline["gpu"] == [100, 160, 210, 250]
    assert r.peak["gpu"] == 250


def test_deps_and_releases_for_the_executor():
    r = check_path(hand_graph(), [LW0, LW1, C0, C1], BIG)
    assert r.deps == [[], [], [0], [1, 2]]
    assert sorted(r.releases[2]) == [("Wb", 0, 0, 0), ("X", 0, 0, 0)]
    assert sorted(r.releases[3]) == [("Hc", 0, 0, 0), ("Wb", 0, 1, 0), ("X", 0, 1, 0)]


def test_rule4_names_node_tier_and_bytes():
    with pytest.raises(RuleViolation) as e:
        check_path(hand_graph(), [LW0, LW1, C0, C1], {"gpu": 300, "cpu": 1000, "disk": 0})
    v = e.value
    assert (v.rule, v.tier, v.needed, v.capacity) == (4, "gpu", 360, 300)
    assert "compute(i=0, j=0, k=0)" in str(v) and "gpu tier" in str(v)
    # the same capacity suffices without the prefetch
    assert check_path(hand_graph(), [LW0, C0, LW1, C1], {"gpu": 300, "cpu": 1000, "disk": 0}).peak["gpu"] == 250


def test_rule4_for_homes_on_an_absent_tier():
    with pytest.raises(RuleViolation) as e:
        check_path(hand_graph(), [LW0, C0, LW1, C1], {"gpu": 1000, "cpu": None, "disk": 0})
    assert e.value.rule == 4 and e.value.tier == "cpu" and "does not have" in str(e.value)


def test_rule2_missing_weight_load():
    with pytest.raises(RuleViolation) as e:
        check_path(hand_graph(), [LW0, C0, C1], BIG)
    assert e.value.rule == 2 and "weights of layer 1" in str(e.value)


def test_rule2_weights_freed_before_a_later_use():
    """A weight buffer dies after its last use on the path; loading it before it is needed
    again is required (the checker does not keep buffers alive by accident)."""
    g = hand_graph()
    g.add_node(("compute", 1, 0, 0), kind="compute", i=1, j=0, k=0, moves=[], allocs=[], frees=[],
               flops=0.0, needs=[("W", 0), ("Hc", 0, 1, 0)])
    g.add_edge(("compute", 0, 1, 0), ("compute", 1, 0, 0), rule=1)
    r = check_path(g, [LW0, C0, LW1, C1, ("compute", 1, 0, 0)], BIG)
    assert r.uses[4][0] == ("Wb", 0, 0, 0)   # still alive: its last use is this node
    assert ("Wb", 0, 0, 0) in r.releases[4]


def test_rule1_order():
    with pytest.raises(RuleViolation) as e:
        check_path(hand_graph(), [LW0, LW1, C1, C0], BIG)
    assert e.value.rule == 1 and "compute(i=0, j=1, k=0)" in str(e.value)


def test_rule1_every_square_computed_once():
    with pytest.raises(RuleViolation) as e:
        check_path(hand_graph(), [LW0, C0, LW1], BIG)
    assert e.value.rule == 1 and "never computed" in str(e.value)
    with pytest.raises(RuleViolation) as e:
        check_path(hand_graph(), [LW0, C0, C0, LW1, C1], BIG)
    assert "twice" in str(e.value)


def test_rule3_store_before_produce_and_load_before_store():
    g = hand_graph()
    for node, needs, allocs in [
        (("store_cache", 0, 1, 0), [("Cb", 0, 1, 0)], [(("Cstored", 0, 1, 0), "gpu", 0)]),
        (("load_cache", 0, 1, 0), [], [(("Cb", 0, 1, 0), "gpu", 40)]),
        (("load_cache", 1, 1, 0), [("Cstored", 0, 1, 0)], [(("Cb", 1, 1, 0), "gpu", 40)]),
    ]:
        g.add_node(node, kind=node[0], i=node[1], j=node[2], k=node[3], moves=[], frees=[], flops=0.0,
                   needs=needs, allocs=allocs)
    g.add_edge(("compute", 0, 1, 0), ("store_cache", 0, 1, 0), rule=3)
    g.add_edge(("store_cache", 0, 1, 0), ("load_cache", 1, 1, 0), rule=3)
    # store_cache placed before the compute that produces the entry
    with pytest.raises(RuleViolation) as e:
        check_path(g, [LW0, C0, LW1, ("load_cache", 0, 1, 0), ("store_cache", 0, 1, 0), C1], BIG)
    assert e.value.rule == 3
    # the next token's cache loaded without the previous entry ever stored
    g.remove_edge(("store_cache", 0, 1, 0), ("load_cache", 1, 1, 0))
    with pytest.raises(RuleViolation) as e:
        check_path(g, [LW0, C0, LW1, C1, ("load_cache", 1, 1, 0), ("store_cache", 0, 1, 0)], BIG)
    assert e.value.rule == 3 and "never stored" in str(e.value)


def test_unknown_node():
    with pytest.raises(RuleViolation) as e:
        check_path(hand_graph(), [("compute", 5, 5, 5)], BIG)
    assert "not in the task graph" in str(e.value)
