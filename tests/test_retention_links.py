"""History pruned by retention does not stall a link: the sender names the floor."""

from __future__ import annotations

import os
from typing import Any

from conftest import SETTLE_S, Daemon
from rogue import Feed, rogue_key
from test_links import FAKE_NODE, FakePeer, entry_ids, history_ids, wait_for

from lanchat.feed import Entry
from lanchat.store import Store

FAR_FEED = Feed(rogue_key("far"))
FAR = FAR_FEED.origin  # an origin whose first messages were pruned


def _pruned_history(state_dir: str) -> None:
    """A store holding FAR's messages 6..10 only, as retention would leave it."""
    os.makedirs(state_dir, exist_ok=True)
    with Store(os.path.join(state_dir, "history.db")) as store:
        run = [Entry.from_wire(FAR_FEED.entry(i)) for i in range(6, 11)]
        stored = store.insert_run(run, key=FAR_FEED.key.public.raw, floor=True)
        assert [e.seq for e in stored] == [6, 7, 8, 9, 10]


def test_a_peer_learns_the_floor_instead_of_asking_forever(workdir: str,
                                                           clients: list[Any]) -> None:
    d = Daemon(workdir)
    _pruned_history(d.state_dir)
    d.start()
    try:
        f = FakePeer(d.port, cursors={})
        clients.append(f)
        f.until("welcome")
        floor = f.until("floor")
        assert floor["origin"] == FAR and floor["seq"] == 5
        batch = f.until("msgs")["e"]
        assert entry_ids(batch) == [f"{FAR}:{i}" for i in range(6, 11)]
    finally:
        d.stop()


def test_a_floor_from_a_peer_lets_the_rest_in(daemon: Daemon, clients: list[Any]) -> None:
    f = FakePeer(daemon.port)
    clients.append(f)
    f.until("welcome")
    f.msgs([f.message(8)])  # beyond a gap: refused, a sync asks
    assert f.until("sync")["cursors"].get(FAKE_NODE, 0) == 0
    f.send({"type": "floor", "origin": FAKE_NODE, "seq": 7})
    f.msgs([f.message(8), f.message(9)])
    wait_for("stored after the floor",
             lambda: {f"{FAKE_NODE}:8", f"{FAKE_NODE}:9"} <= set(history_ids(daemon)), SETTLE_S)


