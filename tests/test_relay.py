"""The relay rule (lanchat/relay.py) on simulated networks: every daemon still gets every
message, whatever the topology and the timing, and a full mesh costs one copy each."""

from __future__ import annotations

import heapq
import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from lanchat.relay import LinkMap, relay_targets

Graph = dict[str, set[str]]


def flood(graph: Graph, origin: str, links: LinkMap, rng: random.Random, *,
          rule: bool = True) -> dict[str, int]:
    """Copies each node takes in when ``origin`` sends one message; every hop takes a random
    time (so first arrivals come by every possible path).  ``rule=False``: plain flooding."""
    copies = dict.fromkeys(graph, 0)
    have = {origin}
    queue: list[tuple[float, int, str, str]] = []
    tie = itertools.count()

    def send(frm: str, sender: str | None) -> None:
        targets = (relay_targets(graph[frm], me=frm, origin=origin, sender=sender, links=links)
                   if rule else [q for q in graph[frm] if q != sender])
        for q in targets:
            heapq.heappush(queue, (rng.random(), next(tie), frm, q))

    send(origin, None)
    steps = 0
    while queue:
        steps += 1
        assert steps < 100_000
        t, _, frm, to = heapq.heappop(queue)
        copies[to] += 1
        if to not in have:
            have.add(to)
            targets = (relay_targets(graph[to], me=to, origin=origin, sender=frm, links=links)
                       if rule else [q for q in graph[to] if q != frm])
            for q in targets:
                heapq.heappush(queue, (t + rng.random(), next(tie), to, q))
    return copies


def true_links(graph: Graph) -> LinkMap:
    return LinkMap({n: nbrs for n, nbrs in graph.items()})


def full_mesh(n: int) -> Graph:
    nodes = [f"n{i}" for i in range(n)]
    return {a: {b for b in nodes if b != a} for a in nodes}


@st.composite
def connected_graphs(draw: st.DrawFn) -> Graph:
    """A random connected graph: a random spanning tree plus random extra edges."""
    n = draw(st.integers(2, 14))
    nodes = [f"n{i}" for i in range(n)]
    graph: Graph = {x: set() for x in nodes}
    for i in range(1, n):
        j = draw(st.integers(0, i - 1))
        graph[nodes[i]].add(nodes[j])
        graph[nodes[j]].add(nodes[i])
    for a, b in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                              max_size=3 * n)):
        if a != b:
            graph[nodes[a]].add(nodes[b])
            graph[nodes[b]].add(nodes[a])
    return graph


@settings(max_examples=300, deadline=None)
@given(connected_graphs(), st.integers(0, 2**32 - 1), st.data())
def test_every_node_gets_every_message_on_any_connected_graph(
        graph: Graph, seed: int, data: st.DataObject) -> None:
    origin = data.draw(st.sampled_from(sorted(graph)))
    rng = random.Random(seed)
    copies = flood(graph, origin, true_links(graph), rng)
    assert copies[origin] == 0  # never back to the origin
    assert all(copies[n] >= 1 for n in graph if n != origin), copies
    flooded = flood(graph, origin, true_links(graph), random.Random(seed), rule=False)
    assert sum(copies.values()) <= sum(flooded.values())


def test_a_full_mesh_costs_one_copy_each() -> None:
    for n in (2, 3, 10, 20):
        graph = full_mesh(n)
        for seed in range(5):
            copies = flood(graph, "n0", true_links(graph), random.Random(seed))
            assert copies == {"n0": 0, **{f"n{i}": 1 for i in range(1, n)}}
            flooded = flood(graph, "n0", true_links(graph), random.Random(seed), rule=False)
            assert sum(flooded.values()) == (n - 1) ** 2  # what flooding costs, for scale


def test_two_subnets_joined_by_one_host_cost_one_copy_each() -> None:
    """The partial mesh of DESIGN.md: two full meshes and one dual-homed host between them."""
    a = [f"a{i}" for i in range(4)]
    b = [f"b{i}" for i in range(4)]
    graph: Graph = {x: set() for x in [*a, *b, "h"]}
    for side in (a, b):
        for x, y in itertools.combinations([*side, "h"], 2):
            graph[x].add(y)
            graph[y].add(x)
    for origin in ("a0", "h", "b3"):
        copies = flood(graph, origin, true_links(graph), random.Random(1))
        assert all(copies[n] == 1 for n in graph if n != origin), (origin, copies)


def test_a_link_counts_only_when_both_ends_list_it() -> None:
    """A hostile node that claims links to everyone must not stop relays to them."""
    links = LinkMap({"liar": {"a", "b", "c"}, "a": {"x"}, "b": set()})
    assert not links.linked("liar", "a") and not links.linked("a", "liar")
    links.set("a", {"liar", "x"})
    assert links.linked("a", "liar")
    # x relays a message of "liar" received from b to a: a's claim alone is not a link to b
    assert relay_targets(["a", "b"], me="x", origin="liar", sender="b", links=links) == []
    links.forget("a")
    assert relay_targets(["a", "b"], me="x", origin="liar", sender="b", links=links) == ["a"]


def test_unknown_link_sets_fall_back_to_flooding() -> None:
    """Before any roster arrived nothing is known: relay to every other neighbour."""
    empty = LinkMap()
    assert sorted(relay_targets(["a", "b", "o", "s"], me="x", origin="o", sender="s",
                                links=empty)) == ["a", "b"]
    assert sorted(relay_targets(["a", "b"], me="x", origin="x", sender=None,
                                links=empty)) == ["a", "b"]
