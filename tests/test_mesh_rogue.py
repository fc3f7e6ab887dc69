"""Three honest daemons found by real mDNS in namespaces, and a fourth host that plays rogue.

The rogue (tests/rogue_attack.py, in its own namespace, a key of its own, the real link
protocol) tries to impersonate each honest node, forge their messages, silence their feeds,
replace or withdraw their rosters, and then stays linked as a member claiming links to all.
Meanwhile and afterwards the honest daemons chat.  Issue 13's promise: it cannot inject a
message attributed to any of them, cannot hide one of their messages, and cannot make any
of them drop a link to an honest peer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import netns
import pytest
from conftest import wait_for
from test_mesh import PORT, SUBNET, NsDaemon, lan, logs, start_mesh, wait_full_mesh, workdir  # noqa: F401 - the fixtures it uses

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ATTACK = Path(__file__).resolve().parent / "rogue_attack.py"
#: How long the rogue's attacks may take in all (each read is bounded by a few seconds).
ATTACKS_WITHIN_S = 120.0


def _honest_links_up(ds: list[NsDaemon]) -> list[str]:
    """Every honest pair that is not linked right now (empty: all are)."""
    down = []
    for d in ds:
        states = d.peer_states()
        down += [f"{d.nick}->{o.nick}: {states.get(o.node)}" for o in ds
                 if o is not d and states.get(o.node) != "linked"]
    return down


def test_a_rogue_daemon_cannot_forge_hide_or_unlink(lan: netns.Lan,  # noqa: F811
                                                    workdir: str) -> None:  # noqa: F811
    ds = start_mesh(lan, workdir, ["alice", "bob", "carol"])
    print(f"linked in {wait_full_mesh(ds, 60.0):.1f} s")
    before = {d.nick: d.send_many(2, f"{d.nick} before") for d in ds}
    rogue_host = lan.add_host([SUBNET])
    targets = [{"addr": d.host.address(), "port": PORT, "node": d.node,
                "key": d.rpc("status")["key"]} for d in ds]
    rogue = rogue_host.run([sys.executable, str(ATTACK), json.dumps(targets)],
                           env={"PYTHONPATH": f"{ATTACK.parent}:{ATTACK.parent.parent}",
                                "PATH": "/usr/bin:/bin"})
    try:
        # While it attacks, every honest link stays up (polled), and the honest keep talking.
        during: dict[str, list[str]] = {d.nick: [] for d in ds}
        started = time.monotonic()
        polls = 0
        while '"attack": "stay"' not in rogue.out_text():
            assert rogue.poll() is None, f"the rogue died:\n{rogue.err_text()[-3000:]}"
            assert time.monotonic() - started < ATTACKS_WITHIN_S, rogue.out_text()[-3000:]
            down = _honest_links_up(ds)
            assert not down, f"an honest link went down during the attacks: {down}\n" + logs(*ds)
            polls += 1
            if polls % 10 == 1:
                for d in ds:
                    during[d.nick] += d.send_many(1, f"{d.nick} during {polls}")
            time.sleep(0.2)
        print(f"attacks took {time.monotonic() - started:.1f} s; links polled {polls} times, "
              f"all up\n{rogue.out_text()}")
        answers = [json.loads(x) for x in rogue.out_text().splitlines() if x.startswith("{")]
        # Each impersonation, forgery and roster forgery was refused (closed or an error).
        for a in answers:
            if a["attack"] in ("impersonate", "forge"):
                assert "closed" in a["answer"] or "error" in a["answer"], a
        wait_for("the rogue linked as a member", lambda: all(
            sum(1 for p in d.rpc("peers") if p.get("state") == "linked") == 3 for d in ds), 30.0,
            diag=lambda: "\n".join(str(d.rpc("peers")) for d in ds))
        after = {d.nick: d.send_many(3, f"{d.nick} after") for d in ds}
        honest_ids = sorted(i for sent in (before, during, after)
                            for ids in sent.values() for i in ids)

        def complete() -> bool:
            return all(set(honest_ids) <= set(d.history_ids()) for d in ds)

        wait_for("every honest message on every honest daemon", complete, 30.0,
                 diag=lambda: logs(*ds))
        honest_nodes = {d.node for d in ds}
        for d in ds:
            history = d.rpc("history", limit=1000)
            ids = [m["id"] for m in history]
            assert len(ids) == len(set(ids)), f"{d.nick} holds a message twice"
            # Nothing in an honest node's name but what it wrote itself.
            forged = [m for m in history if m["origin"] in honest_nodes
                      and m["id"] not in honest_ids]
            assert not forged, f"{d.nick} holds forged messages: {forged}"
            assert not any("forged by the rogue" in m["text"] for m in history)
            # The rogue's own messages are its own: shown under its node, which is no one's.
            rogue_msgs = [m for m in history if "the rogue's own" in m["text"]]
            assert all(m["origin"] not in honest_nodes for m in rogue_msgs)
            # No honest node is marked forked or a twin; every honest link still up.
            for p in d.rpc("peers"):
                if p["node"] in honest_nodes:
                    assert p["state"] == "linked", (d.nick, p)
        assert not _honest_links_up(ds)
    finally:
        lan.stop(rogue)
