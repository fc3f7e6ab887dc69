"""The relay rule and anti-entropy on real daemons (lanchat.relay, lanchat.links)."""

from __future__ import annotations

import json
import time
from typing import Any

from conftest import Daemon
from rogue import Rogue

from lanchat.client import ControlClient
from lanchat.linkproto import ANTI_ENTROPY_S, HEARTBEAT_S


def test_a_link_says_what_it_holds_unasked_and_replays_what_the_peer_lacks(
        daemon: Daemon, clients: list[Any]) -> None:
    """Anti-entropy: whatever the relay rule skipped (or a dying link lost), each side's
    periodic ``sync`` brings back, from either end."""
    with ControlClient(daemon.socket) as c:
        sent = [c.call("send", text=f"m{i}", room="lobby") for i in range(3)]
    rogue = Rogue(daemon.port)
    clients.append(rogue)
    rogue.handshake(cursors={sent[0]["origin"]: 3})  # we "hold" all three: nothing replayed
    started = time.monotonic()
    syncs, msgs = 0, []
    while syncs < 2 and time.monotonic() - started < ANTI_ENTROPY_S + 10:
        rogue.ping()  # else the daemon calls the link dead after DEAD_AFTER_S
        try:
            frame = rogue.frame(HEARTBEAT_S)
        except TimeoutError:
            continue
        if frame.get("type") == "sync":
            syncs += 1  # the first is the link's opening sync; the second comes unasked
        elif frame.get("type") == "msgs":
            msgs += frame["e"]
    waited = time.monotonic() - started
    print(f"the unasked sync came after {waited:.1f} s")
    assert syncs == 2, f"no sync in {waited:.1f} s"
    assert ANTI_ENTROPY_S - 2 <= waited <= ANTI_ENTROPY_S + 10
    assert msgs == []  # we said we had them all
    # Now we "lack" them: our next sync makes the daemon replay all three.
    rogue.sync({})
    got = rogue.until("msgs", 5.0)["e"]  # one signed run: {b: body, s?: signature}
    assert [json.loads(e["b"])["text"] for e in got] == ["m0", "m1", "m2"]
