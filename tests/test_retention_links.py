"""History pruned by retention does not stall a link: the sender names the floor."""

from __future__ import annotations

import os
from typing import Any

from conftest import SETTLE_S, Daemon
from test_links import FAKE_NODE, FakePeer, fake_msg, history_ids, wait_for

from lanchat.model import Message
from lanchat.store import Store

FAR = "fa12" * 4  # an origin whose first messages were pruned


def _pruned_history(state_dir: str) -> None:
    """A store holding FAR's messages 6..10 only, as retention would leave it."""
    os.makedirs(state_dir, exist_ok=True)
    with Store(os.path.join(state_dir, "history.db")) as store:
        assert store.advance(FAR, 5, 1_700_000_000.0)
        stored = store.insert_remote([Message.from_dict(fake_msg(i, origin=FAR))
                                      for i in range(6, 11)])
        assert [m.seq for m in stored] == [6, 7, 8, 9, 10]


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
        batch = f.until("msgs")["m"]
        assert [m["seq"] for m in batch] == [6, 7, 8, 9, 10]
    finally:
        d.stop()


def test_a_floor_from_a_peer_lets_the_rest_in(daemon: Daemon, clients: list[Any]) -> None:
    f = FakePeer(daemon.port)
    clients.append(f)
    f.until("welcome")
    f.send({"type": "msgs", "m": [fake_msg(8)]})  # beyond a gap: refused, a sync asks
    assert f.until("sync")["cursors"].get(FAKE_NODE, 0) == 0
    f.send({"type": "floor", "origin": FAKE_NODE, "seq": 7})
    f.send({"type": "msgs", "m": [fake_msg(8), fake_msg(9)]})
    wait_for("stored after the floor",
             lambda: {f"{FAKE_NODE}:8", f"{FAKE_NODE}:9"} <= set(history_ids(daemon)), SETTLE_S)


