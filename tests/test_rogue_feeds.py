"""Signed feeds against a rogue daemon: what a peer with a key of its own cannot do.

Each test plays a rogue (:class:`rogue.Rogue`, the real link protocol, its own Ed25519 key)
against daemons on loopback (discovery off) and checks what users see: ``lanchat history``,
``lanchat peers``, the journal.  One attack per test (issue 13, build 2 and 3): a message
forged in an honest node's name, a relay that changes what it relays, an origin that signs
two histories (a fork), a floor that would silence an origin, and a restore from backup
that must extend our own feed instead of reusing its seqs (case 11), and a node upgraded
with unsigned history under its key's node id.  Our own origin
spoofed is in test_rogue.py (case 2).  Honest links stay up throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from typing import Any

from conftest import SETTLE_S, Daemon, wait_for
from rogue import Rogue, RogueIdentity, rogue_key
from test_links import LINK_DEADLINE_S, history_ids, linked, logs, node_of, rpc, send_many

from lanchat import store as store_module
from lanchat.feed import ForkProof
from lanchat.keyfile import load_identity
from lanchat.store import MIGRATIONS, Store


def _texts(d: Daemon) -> list[str]:
    return [m["text"] for m in rpc(d, "history", limit=1000)]


def _pair(make_daemon: Any) -> tuple[Daemon, Daemon, str, str]:
    """Two honest daemons, linked: A, and B dialing A."""
    a = make_daemon("-v", nick="alice", subdir="a")
    b = make_daemon("-v", "--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    wait_for("A and B linked", lambda: linked(a, nb) and linked(b, na), LINK_DEADLINE_S)
    return a, b, na, nb


def _still_linked(a: Daemon, b: Daemon, na: str, nb: str, text: str) -> None:
    """A and B are linked and a new message of B's reaches A."""
    assert linked(a, nb) and linked(b, na), logs(a, b)
    (sent,) = send_many(b, 1, text)
    wait_for("B's next message on A", lambda: sent in history_ids(a), SETTLE_S,
             diag=lambda: logs(a, b))


def test_a_message_forged_in_an_honest_nodes_name_is_refused(make_daemon: Any,
                                                             clients: list[Any]) -> None:
    """The rogue sends B's next entry, signed with its own key: A refuses it (the rogue's
    link ends), stores and relays nothing, and its link to B carries on."""
    a, b, na, nb = _pair(make_daemon)
    held = send_many(b, 2, "bob's own")
    wait_for("B's messages on A", lambda: set(held) <= set(history_ids(a)), SETTLE_S)
    rogue = Rogue(a.port)
    clients.append(rogue)
    rogue.handshake()
    forged = rogue.feed(nb)  # B's feed, written with the rogue's key
    for seq in (1, 2):
        forged.entry(seq, f"bob's own {seq - 1}")  # (the chain as far as the rogue knows)
    rogue.msgs([forged.entry(3, "forged in bob's name", nick="bob")], key=None)
    assert rogue.closed()
    wait_for("the forgery logged", lambda: f"the signature is not {nb}'s" in a.stderr(),
             SETTLE_S)
    # With B's real public key sent along (anyone can copy it), no better.
    again = Rogue(a.port, RogueIdentity(signing=rogue_key("another rogue")))
    clients.append(again)
    again.handshake()
    again.feeds[nb] = forged
    with open(os.path.join(b.state_dir, "node.key")) as f:
        bobs_key = json.load(f)["public"]
    again.msgs([forged.entry(3, "forged in bob's name", nick="bob")], key=bobs_key)
    assert again.closed()
    _still_linked(a, b, na, nb, "bob after the forgery")
    assert "forged in bob's name" not in _texts(a) + _texts(b)


def test_a_relay_that_changes_a_message_is_refused(make_daemon: Any,
                                                   clients: list[Any]) -> None:
    """The rogue gets B's messages from A (as any peer does) and relays them to C, one of
    them changed: C refuses the run and the link; relayed unchanged, they are stored."""
    a, b, _na, nb = _pair(make_daemon)
    held = send_many(b, 3, "bob says")
    wait_for("B's messages on A", lambda: set(held) <= set(history_ids(a)), SETTLE_S)
    rogue = Rogue(a.port)
    clients.append(rogue)
    rogue.handshake()
    run = {}
    for _ in range(20):  # A's catch-up: rosters, then B's run (with B's key)
        frame = rogue.until("msgs", 10.0)
        if json.loads(frame["e"][0]["b"])["origin"] == nb:
            run = frame
            break
    assert run, "A never relayed B's messages"
    assert run.get("k") and "s" in run["e"][-1]
    c = make_daemon("-v", nick="carol", subdir="c")
    relay = Rogue(c.port)
    clients.append(relay)
    relay.handshake()
    changed = json.loads(json.dumps(run))
    changed["e"][1]["b"] = changed["e"][1]["b"].replace("bob says 1", "bob says 9")
    relay.send(changed)
    assert relay.closed()
    wait_for("the tampering logged", lambda: "does not chain" in c.stderr(), SETTLE_S)
    assert not any(t.startswith("bob says") for t in _texts(c))
    honest = Rogue(c.port, RogueIdentity(signing=rogue_key("honest relay")))
    clients.append(honest)
    honest.handshake()
    honest.send(run)
    wait_for("relayed unchanged: stored", lambda: set(held) <= set(history_ids(c)), SETTLE_S)
    assert [t for t in _texts(c) if t.startswith("bob")] == ["bob says 0", "bob says 1",
                                                            "bob says 2"]


def _a_rogue_at_two_daemons(make_daemon: Any, clients: list[Any]
                            ) -> tuple[Daemon, Daemon, Rogue, Rogue]:
    """X and Y, not linked, and the rogue (one key) linked to each: it can tell each its own
    version of its feed."""
    x = make_daemon("-v", nick="xavier", subdir="x")
    y = make_daemon("-v", nick="yvonne", subdir="y")
    to_x, to_y = Rogue(x.port), Rogue(y.port)
    clients += [to_x, to_y]
    to_x.handshake()
    to_y.handshake()
    return x, y, to_x, to_y


def test_an_origin_that_forks_its_feed_is_shown_and_the_first_version_kept(
        make_daemon: Any, clients: list[Any]) -> None:
    """The rogue signs two histories: entries 1-3 for X and another 2-3 for Y.  Once X and Y
    link and the versions meet, each keeps the one it stored first, logs the proof and
    shows the rogue forked in ``lanchat peers``; their own link stays up."""
    x, y, to_x, to_y = _a_rogue_at_two_daemons(make_daemon, clients)
    origin = to_x.node
    to_x.msgs([to_x.message(1, "one"), to_x.message(2, "two, as X heard it"),
               to_x.message(3, "three")])
    to_y.msgs([to_y.message(1, "one"), to_y.message(2, "two, as Y heard it"),
               to_y.message(3, "three")])
    wait_for("X and Y hold their versions",
             lambda: "two, as X heard it" in _texts(x) and "two, as Y heard it" in _texts(y),
             SETTLE_S)
    y.stop()
    y.extra = [*y.extra, "--peer", f"127.0.0.1:{x.port}"]
    y.start()
    nx, ny = node_of(x), node_of(y)
    wait_for("X and Y linked", lambda: linked(x, ny) and linked(y, nx), LINK_DEADLINE_S)
    to_y = Rogue(y.port)  # Y restarted: the rogue links again
    clients.append(to_y)
    to_y.handshake({origin: 3})
    to_y.feeds = {}
    for seq, text in ((1, "one"), (2, "two, as Y heard it"), (3, "three")):
        to_y.message(seq, text)  # the chain it told Y
    # Each version goes on; the relays bring each to the other side, where they meet.
    to_x.msgs([to_x.message(4, "four, for X")])
    to_y.msgs([to_y.message(4, "four, for Y")])
    for d in (x, y):
        wait_for("the fork logged with its proof", lambda d=d: "forked its feed" in d.stderr()
                 and '"a": [{"b": ' in d.stderr(), SETTLE_S, diag=lambda: logs(x, y))
        shown = {p["node"]: p for p in rpc(d, "peers")}
        # Where the versions met decides which seq the proof shows (2, 3 or 4 here).
        assert shown[origin].get("forked") in (2, 3, 4), shown
        res = d.cli("peers")
        assert res.returncode == 0 and "FORKED at #" in res.stdout.decode(), res.stdout.decode()
    assert "two, as X heard it" in _texts(x) and "two, as Y heard it" not in _texts(x)
    assert "two, as Y heard it" in _texts(y) and "two, as X heard it" not in _texts(y)
    assert "four, for Y" not in _texts(x) and "four, for X" not in _texts(y)
    # The proof in the journal convinces anyone who holds the origin's key.
    line = next(li for li in x.stderr().splitlines() if "forked its feed" in li)
    proof = json.loads(line.split("proof: ", 1)[1])
    assert ForkProof.from_dict(proof).check(to_x.identity.link_key.public)
    assert linked(x, ny) and linked(y, nx)
    (sent,) = send_many(y, 1, "the mesh is fine")
    wait_for("Y's message on X", lambda: sent in history_ids(x), SETTLE_S)


def test_a_fork_of_equal_length_is_found_when_the_holders_link(
        make_daemon: Any, clients: list[Any]) -> None:
    """The rogue tells X and Y two versions of its entry #2 and then falls silent: their
    cursors are equal (2), so a sync of cursors alone would never bring the versions
    together.  The head hashes in ``sync`` do: both find the fork as soon as they link."""
    x, y, to_x, to_y = _a_rogue_at_two_daemons(make_daemon, clients)
    origin = to_x.node
    to_x.msgs([to_x.message(1, "one"), to_x.message(2, "two, as X heard it")])
    to_y.msgs([to_y.message(1, "one"), to_y.message(2, "two, as Y heard it")])
    wait_for("X and Y hold their versions",
             lambda: "two, as X heard it" in _texts(x) and "two, as Y heard it" in _texts(y),
             SETTLE_S)
    to_x.close()
    to_y.close()
    y.stop()
    y.extra = [*y.extra, "--peer", f"127.0.0.1:{x.port}"]
    y.start()
    nx, ny = node_of(x), node_of(y)
    wait_for("X and Y linked", lambda: linked(x, ny) and linked(y, nx), LINK_DEADLINE_S)
    for d in (x, y):
        wait_for("the fork logged with its proof", lambda d=d: "forked its feed" in d.stderr()
                 and '"a": [{"b": ' in d.stderr(), SETTLE_S, diag=lambda: logs(x, y))
        assert {p["node"]: p for p in rpc(d, "peers")}[origin].get("forked") == 2
    assert "two, as X heard it" in _texts(x) and "two, as Y heard it" not in _texts(x)
    assert "two, as Y heard it" in _texts(y) and "two, as X heard it" not in _texts(y)
    _still_linked(x, y, nx, ny, "the mesh is fine")


def test_a_bogus_floor_cannot_silence_an_origin(make_daemon: Any, clients: list[Any]) -> None:
    """Case 3: ``floor {B, 2**62}`` from the rogue moves nothing (a floor counts only with a
    verified run of B right after it), so B's next messages still reach A."""
    a, b, na, nb = _pair(make_daemon)
    held = send_many(b, 2, "bob before")
    wait_for("B's messages on A", lambda: set(held) <= set(history_ids(a)), SETTLE_S)
    rogue = Rogue(a.port)
    clients.append(rogue)
    rogue.handshake()
    rogue.floor(nb, 2**62)
    rogue.msgs([rogue.message(1, "the rogue's own")])  # a valid run, of another origin
    rogue.floor(nb, 2**62)
    rogue.ping()
    rogue.until("pong", 5.0)
    wait_for("the rogue's own message", lambda: "the rogue's own" in _texts(a), SETTLE_S)
    look = Rogue(a.port, RogueIdentity(signing=rogue_key("onlooker")))
    clients.append(look)
    look.handshake()
    cursors = look.until("sync", 5.0)["cursors"]  # a link's first frame: what A holds
    assert cursors.get(nb) == 2, cursors  # B's cursor did not move
    _still_linked(a, b, na, nb, "bob after the floor")


def test_a_node_restored_from_backup_continues_its_feed(make_daemon: Any, workdir: str,
                                                        clients: list[Any]) -> None:
    """Case 11, second half: B is restored from a copy older than its last message, which A
    holds.  B takes that message back (it is signed by B's own key) before it appends, so
    its next message is #4, not a second #3 that A would drop as a duplicate."""
    a, b, na, nb = _pair(make_daemon)
    send_many(b, 2, "bob before the backup")
    b.stop()
    backup = f"{workdir}/b-backup"
    shutil.copytree(b.state_dir, backup)
    b.start()
    (third,) = send_many(b, 1, "bob after the backup")
    wait_for("A holds B's third", lambda: third in history_ids(a), SETTLE_S)
    b.stop()
    shutil.rmtree(b.state_dir)
    shutil.copytree(backup, b.state_dir)
    b.start()
    wait_for("B linked again", lambda: linked(b, na), LINK_DEADLINE_S)
    wait_for("B took its third back", lambda: third in history_ids(b), SETTLE_S,
             diag=lambda: logs(a, b))
    (fourth,) = send_many(b, 1, "bob after the restore")
    assert fourth == f"{nb}:4"
    wait_for("A holds B's fourth", lambda: fourth in history_ids(a), SETTLE_S,
             diag=lambda: logs(a, b))
    assert "took our own messages #3-#3 back" in b.stderr()


def test_a_node_upgraded_with_unsigned_history_under_its_key_links_and_sends(
        make_daemon: Any, workdir: str, monkeypatch: Any) -> None:
    """A state directory written by 33cc028 (node id already its key's, messages unsigned):
    after the upgrade the daemon shows its old messages, never relays them, and its new,
    signed ones reach a fresh peer (a floor before them, since the peer lacks the old)."""
    state = os.path.join(workdir, "old", "state")
    os.makedirs(state, mode=0o700)
    node = load_identity(state).node
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:5])
    with Store(os.path.join(state, "history.db"), node_id=node):
        pass
    monkeypatch.undo()
    conn = sqlite3.connect(os.path.join(state, "history.db"), isolation_level=None)
    for seq in (1, 2):
        conn.execute("INSERT INTO messages (id, origin, seq, ts, room, nick, host, text)"
                     " VALUES (?, ?, ?, 1700000000.0, 'lobby', 'owner', 'here', ?)",
                     (f"{node}:{seq}", node, seq, f"unsigned {seq}"))
    conn.close()
    old = make_daemon("-v", subdir="old")
    assert node_of(old) == node
    assert [m.get("signed", True) for m in rpc(old, "history", limit=10)] == [False, False]
    fresh = make_daemon("-v", "--peer", f"127.0.0.1:{old.port}", nick="fresh", subdir="new")
    wait_for("linked", lambda: linked(fresh, node), LINK_DEADLINE_S)
    (sent,) = send_many(old, 1, "signed after the upgrade")
    assert sent == f"{node}:3"
    wait_for("the signed one on the fresh peer", lambda: sent in history_ids(fresh), SETTLE_S,
             diag=lambda: logs(old, fresh))
    assert f"{node}:1" not in history_ids(fresh)  # unsigned: never relayed
