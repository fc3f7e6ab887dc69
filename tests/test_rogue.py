"""A rogue daemon against a real lanchatd: what one hostile or broken peer cannot break.

Each test plays a rogue peer with :class:`rogue.Rogue` (the real link protocol, a node id of
its own choosing) against a daemon on loopback (discovery off), and checks what users see:
text clients on the hub, ``lanchat history``/``tail``, ``lanchat peers``, the journal.  The
daemon under attack must keep serving its honest peers and clients throughout.
(Issue 13, cases 1, 2, 6, 10 and 12; signatures come later.)
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from conftest import Daemon, TextUser, wait_for
from rogue import Rogue
from test_links import linked, logs, node_of, peer_state

#: A timestamp no clock will reach (year ~3 billion): it cannot even be turned into a date.
FAR_FUTURE = 1e17


def _history(d: Daemon, *args: str) -> list[dict[str, Any]]:
    res = d.cli("--json", "history", *args)
    assert res.returncode == 0, res.stderr.decode()
    return [json.loads(x) for x in res.stdout.decode().splitlines() if x.strip()]


# -- case 1: a far-future timestamp -------------------------------------------------------------

def test_far_future_timestamp_jams_nothing_and_crashes_no_one(
        make_daemon: Any, clients: list[Any]) -> None:
    d = make_daemon("-vv")
    node = node_of(d)
    tess = TextUser(d.port, "tess")
    clients.append(tess)
    rogue = Rogue(d.port)
    clients.append(rogue)
    rogue.handshake()
    rogue.msgs([rogue.message(1, "from the year three billion", ts=FAR_FUTURE)])
    # The text client sees it, marked as claiming a time far ahead, and the link still
    # answers: the router handed the batch back instead of jamming on it.
    line = tess.until("year three billion", 5.0)
    assert "future" in line, line
    rogue.ping()
    rogue.until("pong", 5.0)
    rogue.msgs([rogue.message(2, "an honest second")])
    assert "an honest second" in tess.until("honest second", 5.0)
    # The CLI prints it (marked) without a traceback; --json shows the ts as it was sent.
    for args in (("history",), ("tail", "--no-follow")):
        res = d.cli(*args)
        assert res.returncode == 0, res.stderr.decode()
        out = res.stdout.decode()
        assert "Traceback" not in res.stderr.decode()
        (shown,) = [x for x in out.splitlines() if "year three billion" in x]
        assert "future" in shown, out
    (stored,) = [m for m in _history(d) if m["seq"] == 1 and m["origin"] == rogue.node]
    assert stored["ts"] == FAR_FUTURE
    # Our own clock is untouched: a local message is stamped now.
    before = time.time()
    res = d.cli("--json", "send", "local after the rogue")
    assert res.returncode == 0, res.stderr.decode()
    assert before - 1 <= json.loads(res.stdout)["ts"] <= time.time() + 1
    assert "local after the rogue" in tess.until("local after the rogue", 5.0)
    # The link ends and the same node may link again (no ghost "duplicate-link").
    rogue.bye("done")
    assert rogue.closed()
    wait_for("rogue seen down", lambda: peer_state(d, rogue.node) != "linked", 5.0,
             diag=lambda: logs(d))
    again = Rogue(d.port)
    clients.append(again)
    again.handshake({node: 0, rogue.node: 2})
    wait_for("linked again", lambda: linked(d, rogue.node), 5.0, diag=lambda: logs(d))
    assert d.stop(signal.SIGTERM) == 0, logs(d)
    assert "Traceback" not in d.stderr(), logs(d)
