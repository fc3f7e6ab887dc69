"""A rogue daemon against a real lanchatd: what one hostile or broken peer cannot break.

Each test plays a rogue peer with :class:`rogue.Rogue` (the real link protocol, a key of its
own, signed runs) against a daemon on loopback (discovery off), and checks what users see:
text clients on the hub, ``lanchat history``/``tail``, ``lanchat peers``, the journal.  The
daemon under attack must keep serving its honest peers and clients throughout.
(Issue 13, cases 1, 2, 6, 10 and 12; the attacks on signed feeds are in test_rogue_feeds.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
from contextlib import closing
from typing import Any

from conftest import Daemon, TextUser, wait_for
from rogue import (
    BASE_TS,
    Rogue,
    RogueIdentity,
    RogueListener,
    rogue_identity,
    rogue_key,
    signed_roster_frame,
)
from test_auth import config_file, secret_file
from test_links import linked, logs, node_of, peer_state, rpc

from lanchat import auth
from lanchat.feed import PublicKey, b64decode, b64encode
from lanchat.limits import (
    LINK_BYE_GRACE_S,
    LINK_HANDSHAKE_TIMEOUT_S,
    MAX_LINK_HANDSHAKES_PER_IP,
    MAX_ORIGINS,
    MAX_ROSTER_USERS,
    NEW_ORIGINS_BURST,
    NEW_ORIGINS_PER_S,
    SHUTDOWN_TIMEOUT_S,
)
from lanchat.presence import ROSTER_DOMAIN

KEY = auth.load_secret("correct horse battery staple\n")  # what test_auth's secret file holds

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
    print(f"\nshut down in {stop_in_time(d):.2f} s with a rogue link up")
    assert "Traceback" not in d.stderr(), logs(d)

def stop_in_time(d: Daemon) -> float:
    """SIGTERM: a clean exit (0) within SHUTDOWN_TIMEOUT_S, whatever the peers did."""
    t0 = time.monotonic()
    code = d.stop(signal.SIGTERM, timeout=SHUTDOWN_TIMEOUT_S + 5)
    took = time.monotonic() - t0
    assert code == 0, f"exit {code} after {took:.1f} s\n{logs(d)}"
    assert took < SHUTDOWN_TIMEOUT_S + 1, f"{took:.1f} s\n{logs(d)}"
    return took


def test_far_future_timestamp_from_a_peer_we_dial_lets_us_shut_down(
        make_daemon: Any, clients: list[Any]) -> None:
    """The same message on a link we dialed: the dialer thread must not wait for ever on
    the router, or SIGTERM hangs on it (it is not a daemon thread)."""
    listener = RogueListener()
    clients.append(listener)
    d = make_daemon("-vv", "--peer", f"127.0.0.1:{listener.port}")
    tess = TextUser(d.port, "tess")
    clients.append(tess)
    rogue = listener.accept()
    rogue.answer()
    rogue.msgs([rogue.message(1, "from the far future", ts=FAR_FUTURE)])
    assert "future" in tess.until("from the far future", 5.0)
    rogue.ping()
    rogue.until("pong", 5.0)
    print(f"\nshut down in {stop_in_time(d):.2f} s with a dialed rogue link up")


def test_shutdown_is_bounded_when_peers_stop_reading(make_daemon: Any,
                                                     clients: list[Any]) -> None:
    """Links whose peers stopped reading (their buffers full of relayed traffic) must not
    each hold the shutdown for a goodbye that cannot be sent."""
    d = make_daemon()
    sleepers = []
    for i in range(12):
        r = Rogue(d.port, rogue_identity(f"{i + 1:02x}" * 8, name=f"sleeper {i}"))
        clients.append(r)
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        r.handshake()
        sleepers.append(r)
    flood = Rogue(d.port)
    clients.append(flood)
    flood.handshake()
    text = "x" * 3000
    for start in range(1, 2001, 50):  # 6 MB relayed to each sleeper, which reads none of it
        flood.msgs([flood.message(seq, text) for seq in range(start, start + 50)])
    flood.ping()
    flood.until("pong", 20.0)
    took = stop_in_time(d)
    print(f"\nshut down in {took:.2f} s with {len(sleepers)} links that stopped reading")
    # Their goodbyes are given LINK_BYE_GRACE_S together, not a wait each.
    assert took < LINK_BYE_GRACE_S + 3.0, logs(d)


# -- case 2: our own origin ---------------------------------------------------------------------

def test_a_peer_cannot_speak_in_our_name_nor_move_our_clock(make_daemon: Any,
                                                           clients: list[Any]) -> None:
    d = make_daemon("-v")
    node = node_of(d)
    first = json.loads(d.cli("--json", "send", "mine, first").stdout)
    rogue = Rogue(d.port)
    clients.append(rogue)
    rogue.handshake({node: 1})
    year_2100 = 4102444800.0
    # Entries 2 and 3 of our feed would extend our prefix, in the year 2100; the rogue signs
    # them with its own key (it has no other) and sends that key, or none.
    rogue.msgs([rogue.message(seq, f"forged {seq}", origin=node, ts=year_2100)
                for seq in (2, 3)])
    assert rogue.closed()  # a forgery is a protocol error: that link ends
    other = Rogue(d.port, RogueIdentity(signing=rogue_key("other")))
    clients.append(other)
    other.handshake({node: 1})
    other.feeds[node] = rogue.feeds[node]
    other.msgs([other.message(2, "forged 2", origin=node, ts=year_2100)], key=None)
    assert other.closed()
    assert [m["text"] for m in _history(d)] == ["mine, first"]
    before = time.time()
    second = json.loads(d.cli("--json", "send", "mine, second").stdout)
    assert second["seq"] == first["seq"] + 1 == 2
    assert before - 1 <= second["ts"] <= time.time() + 1
    assert [m["text"] for m in _history(d)] == ["mine, first", "mine, second"]
    # Said once per link: the signature is not ours.
    assert d.stderr().count(f"the signature is not {node}'s; closing the link") == 2, logs(d)


# -- case 6: unproven connections and the link slots --------------------------------------------

def _trickler(port: int, i: int) -> Rogue | None:
    """A connection that says it is a daemon, gets a welcome, and never finishes proving it."""
    try:
        r = Rogue(port, rogue_identity(f"{i:04x}" * 4, key=KEY),
                  source=f"127.0.0.{2 + i % 10}")
        r.hello()
        if r.frame(5.0).get("type") != "welcome":
            r.close()
            return None
        r.raw(b'{"type":"auth"')  # the start of an answer that never ends
    except (OSError, EOFError):
        return None
    return r


def test_connections_that_never_prove_the_secret_cannot_lock_daemons_out(
        make_daemon: Any, workdir: str, clients: list[Any]) -> None:
    """70 sockets from ten addresses say hello and then trickle a byte every 2 s, and are
    replaced when dropped (bounded: 400 connections, 20 s).  A real daemon with the secret
    still links at once, and no trickler ever counts as a link."""
    secret = secret_file(workdir)
    a = make_daemon("--config", config_file(workdir, "a", secret_file=secret), "-v",
                    subdir="a")
    na = node_of(a)
    tricklers: list[Rogue] = []
    opened = 0

    def top_up() -> None:
        nonlocal opened
        while len(tricklers) < 70 and opened < 400:
            opened += 1
            r = _trickler(a.port, opened)
            if r is not None:
                tricklers.append(r)
                clients.append(r)

    top_up()
    b = make_daemon("--config", config_file(workdir, "b", secret_file=secret,
                                            peers=[f"127.0.0.1:{a.port}"]), "-v", subdir="b")
    nb = node_of(b)
    t0 = time.monotonic()
    linked_after: float | None = None
    while time.monotonic() - t0 < 20.0:
        for r in list(tricklers):
            try:
                r.raw(b" ")
            except OSError:  # dropped by the daemon: an attacker comes straight back
                tricklers.remove(r)
        top_up()
        if linked_after is None and linked(a, nb) and linked(b, na):
            linked_after = time.monotonic() - t0
            break
        time.sleep(0.5)
    print(f"\nlinked {linked_after} s after B started, {opened} trickling connections opened")
    assert linked_after is not None, logs(a, b)
    # At once: a newcomer evicts the oldest unfinished handshake, not waits for it to expire.
    assert linked_after < LINK_HANDSHAKE_TIMEOUT_S, logs(a, b)
    assert all(p["node"] == nb for p in rpc(a, "peers") if p["state"] == "linked")
    # And each trickler is dropped within the handshake deadline.
    for r in tricklers[:5]:
        assert r.closed(LINK_HANDSHAKE_TIMEOUT_S + 3.0), "a handshake outlived its deadline"


# -- case 10: dead dialers ----------------------------------------------------------------------

def test_a_static_peer_is_dialed_again_after_any_bad_frame(make_daemon: Any,
                                                           clients: list[Any]) -> None:
    """``ts: 10**400`` raised OverflowError on the dialer's thread, which only expected
    protocol errors: the thread died and the static peer was never dialed again."""
    listener = RogueListener()
    clients.append(listener)
    d = make_daemon("-v", "--peer", f"127.0.0.1:{listener.port}")
    first = listener.accept()
    first.answer()
    first.msgs([first.message(1, "from beyond any float", ts=10**400)])
    assert first.closed(5.0), "a frame that cannot be parsed ends the link"
    second = listener.accept(timeout=10.0)  # dialed again, after the first backoff
    second.answer()
    wait_for("linked again", lambda: linked(d, second.node), 5.0, diag=lambda: logs(d))
    second.msgs([second.message(1, "an honest first")])
    wait_for("stored", lambda: any(m["text"] == "an honest first" for m in _history(d)), 5.0)
    assert "Traceback" not in d.stderr(), logs(d)


# -- case 12: the smaller ones ------------------------------------------------------------------

def test_a_peers_bye_reason_cannot_forge_log_lines(make_daemon: Any, clients: list[Any]) -> None:
    d = make_daemon("-v")  # the "link closed: peer said bye (...)" line is at info
    rogue = Rogue(d.port)
    clients.append(rogue)
    rogue.handshake()
    rogue.bye("done\n2030-01-01 00:00:00 lanchatd[1] WARNING: forged\x1b[2J\r")
    assert rogue.closed()
    wait_for("the bye logged", lambda: "peer said bye" in d.stderr(), 5.0)
    err = d.stderr()
    assert "\x1b" not in err and "\r" not in err, logs(d)
    assert not any(x.startswith("2030-01-01") for x in err.splitlines()), "a forged log line"
    assert "peer said bye (done^J2030-01-01 00:00:00 lanchatd[1] WARNING: forged^[[2J^M)" in err


def test_a_handshake_has_an_overall_deadline_and_a_per_address_bound(
        make_daemon: Any, workdir: str, clients: list[Any]) -> None:
    d = make_daemon("--config", config_file(workdir, "d", secret_file=secret_file(workdir)),
                    "-v")
    # One connection trickling its proof a byte a second, with nobody else pushing it out.
    slow = _trickler(d.port, 1)
    assert slow is not None
    clients.append(slow)
    t0 = time.monotonic()
    closed = False
    while not closed and time.monotonic() - t0 < LINK_HANDSHAKE_TIMEOUT_S + 5:
        try:
            slow.raw(b" ")
            closed = slow.closed(1.0)
        except OSError:
            closed = True
    took = time.monotonic() - t0
    print(f"\na trickling handshake was dropped after {took:.1f} s")
    assert closed and took < LINK_HANDSHAKE_TIMEOUT_S + 2, logs(d)
    assert "no proof of the shared secret within" in d.stderr(), logs(d)
    # From one address, at most MAX_LINK_HANDSHAKES_PER_IP unfinished handshakes at once.
    held = []
    for i in range(MAX_LINK_HANDSHAKES_PER_IP):
        r = Rogue(d.port, rogue_identity(f"{i + 0x100:04x}" * 4, key=KEY),
                  source="127.0.0.9")
        clients.append(r)
        r.hello()
        assert r.frame().get("type") == "welcome"
        held.append(r)
    extra = Rogue(d.port, rogue_identity("ee" * 8, key=KEY), source="127.0.0.9")
    clients.append(extra)
    extra.hello()
    refusal = extra.until("error")
    assert refusal["code"] == "too-many-handshakes" and refusal["fatal"], refusal


# -- case 4: invented origins -------------------------------------------------------------------

#: More origins than an honest peer of the old code would take in one ``sync`` (16,384).
INVENTED_ORIGINS = 16_400


def _origins_held(d: Daemon) -> int:
    """How many origins ``d`` keeps a cursor for, read from its SQLite file (read-only)."""
    db = os.path.join(d.state_dir, "history.db")
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)) as conn:
        (n,) = conn.execute("SELECT count(*) FROM high").fetchone()
    return int(n)


def test_invented_origins_cannot_cut_a_node_off_the_mesh(make_daemon: Any,
                                                         clients: list[Any]) -> None:
    a = make_daemon("-v", nick="alice", subdir="a")
    rogue = Rogue(a.port, source="127.0.0.2")  # another machine than B's
    clients.append(rogue)
    rogue.handshake()
    # Each invented origin is a real key (a run must verify), so each costs the rogue a key.
    keys = [rogue_key(f"invented {i}") for i in range(1, INVENTED_ORIGINS + 1)]
    started = time.monotonic()
    for start in range(0, len(keys), 256):
        rogue.raw(b"".join(
            json.dumps({"type": "msgs", "e": [rogue.feed(k.node, key=k).entry(1, f"o{n}")],
                        "k": k.public.text}).encode() + b"\n"
            for n, k in enumerate(keys[start:start + 256], start)))
    rogue.ping()
    rogue.until("pong", 60.0)  # every batch before it has been handled
    rogue.close()
    took = time.monotonic() - started
    held = _origins_held(a)
    assert held <= MAX_ORIGINS, f"A keeps {held} origins (bound {MAX_ORIGINS})"
    # One address brings NEW_ORIGINS_BURST at once, then NEW_ORIGINS_PER_S (its own is free).
    assert held <= 1 + NEW_ORIGINS_BURST + NEW_ORIGINS_PER_S * (took + 1), (held, took)
    assert a.stderr().count("new origin(s) from") == 1, logs(a)
    # An honest daemon links to A and stays linked: its sync never fails.
    b = make_daemon("-v", "--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")
    node_a, node_b = node_of(a), node_of(b)
    wait_for("A and B linked", lambda: linked(b, node_a) and linked(a, node_b), 20.0,
             diag=lambda: logs(a, b))
    sent_a = json.loads(a.cli("--json", "send", "from alice").stdout)
    sent_b = json.loads(b.cli("--json", "send", "from bob").stdout)
    wait_for("honest messages both ways",
             lambda: sent_a["id"] in {m["id"] for m in _history(b, "-n", "1000")}
             and sent_b["id"] in {m["id"] for m in _history(a, "-n", "1000")},
             20.0, diag=lambda: logs(a, b))
    time.sleep(3.0)  # a looping link would come and go in this time
    assert linked(b, node_a), logs(a, b)
    assert b.stderr().count("linked to") == 1, logs(b)
    assert "protocol error" not in a.stderr() + b.stderr(), logs(a, b)
    # Whatever A relayed, B holds no more origins than the bound either.
    assert _origins_held(b) <= MAX_ORIGINS


# -- case 8: rosters ----------------------------------------------------------------------------

def _roster(node: str, ver: int, nicks: list[str], **over: Any) -> dict[str, Any]:
    return {"node": node, "ver": ver, "name": f"node {node[:4]}", "host": "fakehost",
            "gone": False, **over,
            "users": [{"nick": n, "host": "fakehost", "since": BASE_TS, "room": "lobby",
                       "via": "tcp"} for n in nicks]}


def _nicks(d: Daemon) -> set[str]:
    return {u["nick"] for u in rpc(d, "users")}


def test_an_oversized_roster_is_refused_and_the_link_stays_up(make_daemon: Any,
                                                              clients: list[Any]) -> None:
    d = make_daemon("-v")
    rogue = Rogue(d.port)
    clients.append(rogue)
    rogue.handshake()
    for ver in (1, 2):  # said once per link, however often
        rogue.roster(_roster(rogue.node, ver, [f"u{i}" for i in range(MAX_ROSTER_USERS + 1)]))
    rogue.roster(_roster(rogue.node, 3, ["within", "bounds"]))
    rogue.ping()
    rogue.until("pong", 10.0)  # the link is up, and read on after the refusal
    wait_for("the roster within bounds", lambda: {"within", "bounds"} <= _nicks(d), 10.0,
             diag=lambda: logs(d))
    assert not any(n.startswith("u") and n[1:].isdigit() for n in _nicks(d))
    err = d.stderr()
    assert err.count("refused a roster") == 1, logs(d)
    assert f"more than {MAX_ROSTER_USERS}" in err, logs(d)


def test_a_forged_roster_cannot_hide_a_linked_nodes_users(make_daemon: Any,
                                                          clients: list[Any]) -> None:
    a = make_daemon("-v", nick="alice", subdir="a")
    b = make_daemon("-v", "--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")
    node_b = node_of(b)
    wait_for("bob on A", lambda: "bob" in _nicks(a), 20.0, diag=lambda: logs(a, b))
    rogue = Rogue(a.port, source="127.0.0.2")
    clients.append(rogue)
    rogue.handshake()
    # "B has nobody": newer than B's own (versions are microseconds of a node's clock),
    # and within the clock skew a relayed roster may have; then as "gone", far ahead.
    rogue.roster(_roster(node_b, int((time.time() + 60) * 1_000_000), []))
    rogue.roster(_roster(node_b, 2**62, [], gone=True))
    rogue.ping()
    rogue.until("pong", 10.0)
    assert "bob" in _nicks(a), logs(a)
    # B's later changes still show on A: its own newer rosters are not hidden behind 2**62.
    tess = TextUser(b.port, "tess")
    clients.append(tess)
    wait_for("tess on A", lambda: "tess" in _nicks(a), 20.0, diag=lambda: logs(a, b))
    # Signed by another key than B's: refused, and said (once per link).
    assert f"the roster of {node_b} is signed by another node ({rogue.node})" in a.stderr()
    # A relayed roster of a node that is not our neighbour may not jump far ahead either,
    # even signed by its node (another link: the refusal is logged once per link).
    relay = Rogue(a.port, rogue_identity("relay"), source="127.0.0.3")
    clients.append(relay)
    relay.handshake()
    far = int((time.time() + 3600) * 1_000_000)
    carol = rogue_key("carol's node")
    relay.roster(_roster(carol.node, far, ["carol"]), key=carol)
    relay.ping()
    relay.until("pong", 10.0)
    assert "carol" not in _nicks(a)
    assert "ahead of our clock" in a.stderr(), logs(a)


def test_rosters_are_signed_by_their_node_and_relayed_verbatim(make_daemon: Any,
                                                              clients: list[Any]) -> None:
    """A roster is taken only with its own node's signature, whoever relays it, and is
    passed on as the very bytes that node signed (never re-serialized)."""
    d = make_daemon("-v")
    node = node_of(d)
    watcher = Rogue(d.port, rogue_identity("watcher"), source="127.0.0.2")
    clients.append(watcher)
    watcher.handshake()
    # The daemon's own roster: signed by its key, which is its node id's.
    own = watcher.until("roster", 10.0)
    key = PublicKey.from_text(own["k"])
    assert key.node == node and json.loads(own["b"])["node"] == node
    assert key.verify(b64decode(own["s"], 64), ROSTER_DOMAIN + own["b"].encode())
    relay = Rogue(d.port, rogue_identity("relay"), source="127.0.0.3")
    clients.append(relay)
    relay.handshake()
    carol = rogue_key("carol's node")
    # Forged: carol's roster signed by the relay; a tampered body under carol's signature;
    # and no signature at all (the v1 form).  None of them is taken.
    relay.roster(_roster(carol.node, 5, ["mallory"]))
    frame = signed_roster_frame(_roster(carol.node, 5, ["carol"]), carol)
    relay.send({**frame, "b": frame["b"].replace("carol", "mallo")})
    relay.ping()
    relay.until("pong", 10.0)
    # The router logs a refusal on its own thread, after the link read the frame.
    wait_for("the forged rosters refused in the log", lambda: "a roster with a bad signature"
             in d.stderr() or "signed by another node" in d.stderr(), 10.0, diag=lambda: logs(d))
    assert not {"mallory", "mallo"} & _nicks(d), logs(d)
    # Signed by carol, in a spelling of its own (spaces, another key order): taken, shown,
    # and relayed to the watcher byte for byte.
    body = json.dumps({"users": [{"via": "tcp", "room": "lobby", "since": BASE_TS,
                                  "host": "fakehost", "nick": "carol"}],
                       "gone": False, "host": "farhost", "name": "carol's hub",
                       "ver": 6, "node": carol.node}, indent=1)
    relay.send({"type": "roster", "b": body,
                "s": b64encode(carol.sign(ROSTER_DOMAIN + body.encode())),
                "k": carol.public.text})
    wait_for("carol on d", lambda: "carol" in _nicks(d), 10.0, diag=lambda: logs(d))
    relayed = watcher.until("roster", 10.0)
    while json.loads(relayed["b"])["node"] != carol.node:
        relayed = watcher.until("roster", 10.0)
    assert relayed["b"] == body and relayed["k"] == carol.public.text
    # An unsigned roster frame is a protocol error: that link ends, the daemon serves on.
    relay.send({"type": "roster", "roster": _roster(relay.node, 1, ["eve"])})
    assert relay.closed(10.0)
    assert "eve" not in _nicks(d)
    watcher.ping()
    watcher.until("pong", 10.0)


def test_only_the_link_that_brought_a_roster_may_say_its_node_is_gone(
        make_daemon: Any, clients: list[Any]) -> None:
    d = make_daemon("-v")
    carol = rogue_key("carol's node")
    brings = Rogue(d.port, rogue_identity("brings"), source="127.0.0.2")
    other = Rogue(d.port, rogue_identity("other"), source="127.0.0.3")
    clients += [brings, other]
    brings.handshake()
    other.handshake()
    brings.roster(_roster(carol.node, 5, ["carol"]), key=carol)
    wait_for("carol on d", lambda: "carol" in _nicks(d), 10.0, diag=lambda: logs(d))
    other.send({"type": "gone", "node": carol.node, "ver": 5})  # not its to withdraw
    brings.send({"type": "gone", "node": carol.node, "ver": 4})  # not the version we hold
    for r in (other, brings):
        r.ping()
        r.until("pong", 10.0)
    assert "carol" in _nicks(d)
    brings.send({"type": "gone", "node": carol.node, "ver": 5})
    wait_for("carol gone", lambda: "carol" not in _nicks(d), 10.0, diag=lambda: logs(d))


def test_a_big_roster_change_is_one_notice_per_room(make_daemon: Any,
                                                    clients: list[Any]) -> None:
    d = make_daemon("-v")
    tess = TextUser(d.port, "tess")
    clients.append(tess)
    rogue = Rogue(d.port)
    clients.append(rogue)
    rogue.handshake()
    many = [f"p{i:03d}" for i in range(500)]
    rogue.roster(_roster(rogue.node, 1, many))
    line = tess.until("joined #lobby", 10.0)
    assert line.endswith(f"and {len(many) - 1} others joined #lobby"), line
    rogue.roster(_roster(rogue.node, 2, ["p000", "p001"]))  # 498 leave
    line = tess.until("left #lobby", 10.0)
    assert f"and {len(many) - 3} others left #lobby" in line, line
    # A small change is still told person by person.
    rogue.roster(_roster(rogue.node, 3, ["p000", "p001", "newbie"]))
    assert tess.until("joined", 10.0).endswith("* newbie joined #lobby")
    tess.send("/ping\n")
    seen = []
    for _ in range(50):  # bounded: nothing else but the pong may be waiting
        seen.append(tess.line(5.0))
        if "pong" in seen[-1].lower():
            break
    assert not any("joined" in x or "left" in x for x in seen), seen
