"""Sealed direct messages between real daemons (issue 14, item 3).

A direct message is sealed at its origin to the recipient's daemon and to the sender's own
(lanchat.seal); every other daemon stores and relays only ciphertext and shows it nowhere.
Three daemons in a chain on loopback (discovery off): alice on daemon 1, bob on daemon 2
(the relay), carol on daemon 3.  What users see is checked: ``lanchat history``, ``lanchat
tail``, a text client on hub 2, and the bytes of daemon 2's SQLite files.  A rogue peer
(tests/rogue.py, the real link protocol) sends a sealed message that was changed after
sealing: refused, not shown.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import sqlite3
import subprocess
from typing import Any

from conftest import SETTLE_S, Daemon, TextUser, lanchat_cmd, wait_for
from rogue import Rogue, RogueIdentity, rogue_key
from test_links import LINK_DEADLINE_S, cli_history, linked, logs, node_of, rpc

from lanchat.feed import PublicKey
from lanchat.seal import DhKey, DhRecord, dm_context, seal, seal_text

FIRST = "first secret: the launch code is 0451"
SECOND = "second secret, while carol is away: meet at the fountain"


def _db_bytes(d: Daemon) -> bytes:
    """Every byte of a daemon's SQLite files (database, WAL, shared memory)."""
    out = b""
    for path in sorted(glob.glob(os.path.join(d.state_dir, "history.db*"))):
        with open(path, "rb") as f:
            out += f.read()
    return out


def _rows(d: Daemon, origin: str) -> list[tuple[Any, ...]]:
    """``origin``'s rows in a daemon's store, read with sqlite3 (read-only)."""
    path = os.path.join(d.state_dir, "history.db")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute('SELECT seq, text, "to", to_node, body FROM messages '
                            "WHERE origin = ? ORDER BY seq", (origin,)).fetchall()
    finally:
        conn.close()


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _knows_user(d: Daemon, nick: str) -> bool:
    return any(u["nick"] == nick for u in rpc(d, "users"))


def _texts(d: Daemon) -> list[str]:
    return [m["text"] for m in cli_history(d, "--limit", "1000")]


def _everything_shown(d: Daemon) -> str:
    """What daemon ``d``'s user can read: plain and JSON history."""
    plain = d.cli("history", "--limit", "1000")
    assert plain.returncode == 0, plain.stderr.decode()
    return plain.stdout.decode() + json.dumps(cli_history(d, "--limit", "1000"))


def test_a_direct_message_is_ciphertext_on_the_relay_and_reaches_carol_after_a_restart(
        make_daemon: Any, clients: list[Any]) -> None:
    d1 = make_daemon("-v", nick="alice", subdir="d1")
    d2 = make_daemon("-v", "--peer", f"127.0.0.1:{d1.port}", nick="bob", subdir="d2")
    d3 = make_daemon("-v", "--peer", f"127.0.0.1:{d2.port}", nick="carol", subdir="d3")
    n1, n2, n3 = node_of(d1), node_of(d2), node_of(d3)
    wait_for("the chain linked", lambda: linked(d1, n2) and linked(d2, n3), LINK_DEADLINE_S,
             diag=lambda: logs(d1, d2, d3))
    # carol's roster (and with it daemon 3's signed X25519 key) reached daemon 1 via 2
    wait_for("alice sees carol", lambda: _knows_user(d1, "carol"), SETTLE_S)

    # Everything that shows messages on daemon 2: a text client, `lanchat tail`.
    dave = TextUser(d2.port, "dave")
    clients.append(dave)
    tail_out = os.path.join(d2.workdir, "tail.out")
    with open(tail_out, "wb") as out:
        tail = subprocess.Popen([*lanchat_cmd(), "--socket", d2.socket, "tail", "-n", "100"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        # 1. carol online: a DM from alice reaches her, and only her.
        res = d1.cli("send", "--to", "carol", FIRST)
        assert res.returncode == 0, res.stderr.decode()
        wait_for("carol has the first DM", lambda: FIRST in _texts(d3), SETTLE_S,
                 diag=lambda: logs(d1, d2, d3))
        (mine,) = [m for m in cli_history(d3, "--limit", "1000") if m["text"] == FIRST]
        assert (mine["nick"], mine["to"], mine["to_node"], mine["origin"]) == (
            "alice", "carol", n3, n1)
        assert FIRST in _texts(d1)  # the sender's end keeps it too
        wait_for("daemon 2 holds the first DM", lambda: len(_rows(d2, n1)) == 1, SETTLE_S)
        assert FIRST.encode() not in _db_bytes(d2), "daemon 2 stores the DM in clear"

        # 2. carol away: daemon 3 stopped; alice writes to carol on daemon 3 by node.
        assert d3.stop(signal.SIGTERM) == 0
        wait_for("daemon 1 sees carol gone", lambda: not _knows_user(d1, "carol"), SETTLE_S)
        res = d1.cli("send", "--to", f"carol@{n3[:8]}", SECOND)
        assert res.returncode == 0, res.stderr.decode()
        wait_for("daemon 2 holds both DMs", lambda: len(_rows(d2, n1)) == 2, SETTLE_S,
                 diag=lambda: logs(d1, d2))

        # 3. carol back: daemon 3 restarted, catches up from daemon 2, opens it.
        d3.start()
        wait_for("carol has the second DM", lambda: SECOND in _texts(d3), SETTLE_S,
                 diag=lambda: logs(d1, d2, d3))
        assert _texts(d3).count(FIRST) == 1 and _texts(d3).count(SECOND) == 1

        # On daemon 2 both exist only as ciphertext: rows with no text and a sealed body.
        rows = _rows(d2, n1)
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(1, "", "carol", n3),
                                                           (2, "", "carol", n3)]
        for row in rows:
            body = json.loads(row[4])
            assert "text" not in body and len(body["seal"]) > 300, body
        raw = _db_bytes(d2)
        for secret in (FIRST, SECOND):
            for needle in (secret, secret[:12], json.dumps(secret)[1:13]):
                assert needle.encode() not in raw, f"{needle!r} in daemon 2's SQLite files"
            # ... and in no output of daemon 2
            assert secret not in _everything_shown(d2)
        # The text client on hub 2 and `lanchat tail` on daemon 2 saw neither.
        dave.send("/me is still here\n")
        dave_lines = []
        for _ in range(200):
            line = dave.line(SETTLE_S)
            dave_lines.append(line)
            if "dave is still here" in line:
                break
        assert not any("secret" in x for x in dave_lines), dave_lines
        wait_for("tail shows dave's line", lambda: "dave is still here" in _read(tail_out),
                 SETTLE_S)
    finally:
        tail.send_signal(signal.SIGINT)
        try:
            tail.wait(10)
        except subprocess.TimeoutExpired:
            tail.kill()
            tail.wait(5)
    with open(tail_out, encoding="utf-8", errors="replace") as f:
        shown = f.read()
    assert "dave is still here" in shown, shown  # tail was following all along
    assert "secret" not in shown, shown


def test_a_direct_message_to_a_node_whose_key_is_unknown_fails_never_in_clear(
        make_daemon: Any, clients: list[Any]) -> None:
    """A peer whose signed roster publishes no X25519 key (a rogue, or an older lanchat):
    its user zed is listed, but a direct message to zed fails with a clear error and is
    stored and relayed nowhere; nor does one to a node nobody has heard of."""
    d1 = make_daemon("-v", nick="alice", subdir="d1")
    rogue = Rogue(d1.port, RogueIdentity(signing=rogue_key("keyless")))
    clients.append(rogue)
    rogue.handshake()
    rogue.roster({"node": rogue.node, "ver": 5, "name": "keyless", "host": "fakehost",
                  "gone": False, "links": [],
                  "users": [{"nick": "zed", "host": "fakehost", "since": 1.0,
                             "room": "lobby", "via": "tcp"}]})
    wait_for("alice sees zed", lambda: _knows_user(d1, "zed"), SETTLE_S,
             diag=lambda: logs(d1))
    res = d1.cli("send", "--to", "zed", "do not send me in clear")
    assert res.returncode != 0
    err = res.stderr.decode()
    assert "cannot seal a direct message to zed" in err and rogue.node in err, err
    res = d1.cli("send", "--to", "carol@0123abcd", "nor me")
    assert res.returncode != 0 and "carol@0123abcd" in res.stderr.decode()
    # ... the link is fine: a public message reaches the rogue, the DM never did
    assert d1.cli("send", "public after").returncode == 0
    seen = []
    for _ in range(100):
        frame = rogue.until("msgs", SETTLE_S)
        seen += [json.loads(e["b"]) for e in frame["e"]]
        if any(b.get("text") == "public after" for b in seen):
            break
    assert [b.get("text") for b in seen] == ["public after"], seen
    for text in ("do not send me in clear", "nor me"):
        assert text not in _everything_shown(d1)
        assert text.encode() not in _db_bytes(d1)


def test_a_tampered_sealed_message_from_a_rogue_peer_is_refused_not_shown(
        make_daemon: Any, clients: list[Any]) -> None:
    """The rogue (a peer with its own key) seals two DMs to carol properly, then changes one
    byte of the first seal before signing its feed: carol's daemon shows the second, refuses
    the first (a log line), and the rogue's link is not trusted with more than it signed."""
    d3 = make_daemon("-v", nick="carol", subdir="d3")
    n3 = node_of(d3)
    rogue = Rogue(d3.port, RogueIdentity(signing=rogue_key("sealer")))
    clients.append(rogue)
    rogue.handshake()
    roster = rogue.until("roster", SETTLE_S)
    record = DhRecord.from_wire(json.loads(roster["b"])["dh"], PublicKey.from_text(roster["k"]))
    assert record.node == n3
    ours = DhKey.derive(rogue.identity.link_key, 1)
    me = rogue.node

    def sealed(seq: int, text: str) -> bytes:
        ctx = dm_context(origin=me, seq=seq, room="lobby", nick="mallory", to="carol",
                         to_node=n3)
        return seal(text.encode(), sender=DhRecord.make(rogue.identity.link_key, ours, 1).public,
                    recipient=record.public, context=ctx, entropy=secrets.token_bytes)

    bad = bytearray(sealed(1, "tampered after sealing"))
    bad[-20] ^= 0x01
    feed = rogue.feed()
    entries = [feed.entry(1, seal=seal_text(bytes(bad)), nick="mallory", to="carol",
                          to_node=n3, sign=False),
               feed.entry(2, seal=seal_text(sealed(2, "genuine from mallory")), nick="mallory",
                          to="carol", to_node=n3)]
    # carol follows live (`lanchat tail --json`) while the rogue sends
    tail_out = os.path.join(d3.workdir, "tail.out")
    with open(tail_out, "wb") as out:
        follow = subprocess.Popen([*lanchat_cmd(), "--socket", d3.socket, "--json", "tail",
                                   "-n", "5"], stdout=out, stderr=subprocess.STDOUT)
    try:
        # (in its backlog if it subscribed after this, live if before: once either way)
        assert d3.cli("send", "carol is listening").returncode == 0
        wait_for("tail follows", lambda: "carol is listening" in _read(tail_out), SETTLE_S)
        rogue.msgs(entries)
        wait_for("carol sees the genuine one", lambda: "genuine from mallory" in _texts(d3),
                 SETTLE_S, diag=lambda: logs(d3))
        wait_for("the tampered one refused in the log",
                 lambda: f"{me}:1" in d3.stderr() and "does not open" in d3.stderr(), SETTLE_S)
        wait_for("tail shows the genuine one",
                 lambda: "genuine from mallory" in _read(tail_out), SETTLE_S)
    finally:
        follow.send_signal(signal.SIGINT)
        try:
            follow.wait(10)
        except subprocess.TimeoutExpired:
            follow.kill()
            follow.wait(5)
    with open(tail_out, encoding="utf-8") as f:
        live = [json.loads(x) for x in f.read().splitlines() if x.startswith("{")]
    assert [(m["id"], m["text"]) for m in live if m["origin"] == me] == [
        (f"{me}:2", "genuine from mallory")], live
    assert len(live) == 2, live  # carol's own line and the genuine one, nothing else
    shown = [m for m in cli_history(d3, "--limit", "1000") if m["origin"] == me]
    assert [m["text"] for m in shown] == ["genuine from mallory"]
    tail = d3.cli("tail", "--no-follow", "-n", "100")
    assert tail.returncode == 0 and "tampered" not in tail.stdout.decode()
    assert "genuine from mallory" in tail.stdout.decode()
