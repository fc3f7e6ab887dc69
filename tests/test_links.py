"""Daemon-to-daemon links on loopback: static ``--peer``, discovery off, real lanchatd processes.

Each test starts real daemons (tests/conftest.py's ``Daemon``: 127.0.0.1, port 0,
``--no-discovery``), links them with ``--peer 127.0.0.1:PORT`` and checks what a user sees:
``lanchat peers/users/history --json``, presence notifications on the control socket, lines
on a hub text client.  A link is cut without stopping either daemon by routing it through
:class:`Proxy`, an in-process TCP relay whose connections the test can drop.

Timings are printed (``pytest -s``).  Daemons run with ``-vv`` so a failure's stderr shows
the links' debug log.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    SETTLE_S,
    Daemon,
    TextUser,
    assert_exactly_once_in_order,
    skip_or_fail,
    wait_for,
    wait_within,
)
from rogue import ROGUE_NODE, Rogue, RogueIdentity, rogue_identity, rogue_key

from lanchat import linkproto
from lanchat.client import ControlClient
from lanchat.feed import PublicKey, parse_run, verify_run
from lanchat.limits import MAX_DAEMON_LINKS
from lanchat.presence import MAX_ROSTER_USERS

#: How long a test waits for a link to come up.  Generous on purpose: linking takes well
#: under a second here (the time is printed; issue 3 aimed at 3 s), but a loaded two-core
#: runner can stall a daemon for seconds without anything being wrong.
LINK_DEADLINE_S = 30.0
#: A link whose connection closed (a peer's SIGTERM says bye and closes; a cut proxy or a
#: peer that hangs up closes) is shown down at once -- well before the silence timeout
#: (lanchat-protocol(7): a link silent for 8 s is dead) could have done it.  Half that
#: timeout tells the two apart with room for a loaded runner.
CLOSED_DOWN_WITHIN_S = linkproto.DEAD_AFTER_S / 2
#: A peer that died without a word (SIGKILL) or stopped answering (SIGSTOP, a pulled cable)
#: is shown down within the documented silence timeout, plus margin for a loaded runner.
DEAD_DOWN_WITHIN_S = linkproto.DEAD_AFTER_S + 4.0


# -- helpers ------------------------------------------------------------------------------------


def rpc(d: Daemon, method: str, **params: Any) -> Any:
    with ControlClient(d.socket, timeout=10.0) as c:
        return c.call(method, **params)


def cli_json(d: Daemon, *args: str) -> Any:
    """``lanchat --json ARGS`` as a user runs it: its one JSON value (users, peers, status)."""
    res = d.cli("--json", *args)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout)


def cli_history(d: Daemon, *args: str) -> list[dict[str, Any]]:
    """``lanchat history --json``: one JSON message per line."""
    res = d.cli("--json", "history", *args)
    assert res.returncode == 0, res.stderr.decode()
    return [json.loads(x) for x in res.stdout.decode().splitlines() if x.strip()]


def node_of(d: Daemon) -> str:
    node = rpc(d, "status")["node"]
    assert isinstance(node, str)
    return node


def peer_state(d: Daemon, node: str) -> str | None:
    for p in rpc(d, "peers"):
        if p.get("node") == node:
            return str(p.get("state"))
    return None


def linked(d: Daemon, node: str) -> bool:
    return peer_state(d, node) == "linked"


def entry_ids(entries: list[dict[str, Any]]) -> list[str]:
    """The message ids of a ``msgs`` frame's entries (read from their bodies)."""
    return [f"{b['origin']}:{b['seq']}" for b in (json.loads(e["b"]) for e in entries)]


def history_ids(d: Daemon) -> list[str]:
    return [m["id"] for m in rpc(d, "history", limit=1000)]


def send_many(d: Daemon, n: int, prefix: str) -> list[str]:
    ids = []
    with ControlClient(d.socket, timeout=10.0) as c:
        for i in range(n):
            ids.append(c.call("send", text=f"{prefix} {i}")["id"])
    return ids


def logs(*daemons: Daemon) -> str:
    """The daemons' stderr tails, without the control socket's per-connection debug lines."""
    out = []
    for d in daemons:
        lines = [x for x in d.stderr().splitlines() if "DEBUG: control-" not in x]
        out.append(f"--- {d.nick} stderr (tail) ---\n" + "\n".join(lines[-60:]))
    return "\n".join(out)


class Proxy:
    """A TCP relay on 127.0.0.1 whose links the test can cut (``cut``) and restore (``heal``).

    While cut, it accepts and at once closes new connections (the dialer sees the peer as
    unreachable) and has dropped every relayed connection.  Threads: one acceptor, two pumps
    per relayed connection; ``close`` joins them all.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()  # guards: _pairs, _open
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._open = True
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                is_open = self._open
            if not is_open:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=3.0)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._pairs.append((conn, upstream))
            for src, dst in ((conn, upstream), (upstream, conn)):
                t = threading.Thread(target=self._pump, args=(src, dst), name="proxy-pump")
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._open = False
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def heal(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        self._stop.set()
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)
        self.listener.close()


@pytest.fixture
def proxies() -> Iterator[Callable[[int], Proxy]]:
    made: list[Proxy] = []

    def make(port: int) -> Proxy:
        p = Proxy(port)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


def pair(make_daemon: Any, *, b_via: int | None = None) -> tuple[Daemon, Daemon, str, str]:
    """Daemon A (nick alice) and daemon B (nick bob) with ``--peer`` A (or ``b_via``)."""
    a = make_daemon("-vv", nick="alice", subdir="a")
    b = make_daemon("-vv", "--peer", f"127.0.0.1:{b_via or a.port}", nick="bob", subdir="b")
    return a, b, node_of(a), node_of(b)


def wait_linked(a: Daemon, b: Daemon, na: str, nb: str, timeout: float = LINK_DEADLINE_S) -> float:
    t0 = time.monotonic()
    wait_for("A and B linked", lambda: linked(a, nb) and linked(b, na), timeout,
             diag=lambda: logs(a, b))
    return time.monotonic() - t0


# -- tests --------------------------------------------------------------------------------------

def test_static_peer_links_and_each_lists_the_other(make_daemon: Any) -> None:
    t0 = time.monotonic()
    a = make_daemon("-vv", nick="alice", subdir="a")
    b = make_daemon("-vv", "--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    wait_for("linked", lambda: linked(a, nb) and linked(b, na), LINK_DEADLINE_S,
             diag=lambda: logs(a, b))
    print(f"\nstatic link up {time.monotonic() - t0:.2f} s after starting A")

    # What `lanchat peers --json` and `lanchat users --json` show, on each side.
    for me, other_node, other_nick in ((a, nb, "bob"), (b, na, "alice")):
        peers = cli_json(me, "peers")
        assert [p["state"] for p in peers if p["node"] == other_node] == ["linked"], peers
        assert len(peers) == 1, peers

        def remote_listed(me: Daemon = me, other_node: str = other_node,
                          other_nick: str = other_nick) -> list[dict[str, Any]]:
            return [u for u in cli_json(me, "users")
                    if u["nick"] == other_nick and u["node"] == other_node]
        (u,) = wait_for("remote daemon user listed", remote_listed, SETTLE_S,
                        diag=lambda: logs(a, b))
        assert u["local"] is False and u["via"] == "daemon"
        mine = [u for u in cli_json(me, "users") if u["local"]]
        assert [u["nick"] for u in mine] == [me.nick]
    assert cli_json(a, "status")["linked"] == 1


def test_status_counts_chat_clients_and_daemon_links_apart(
        make_daemon: Any, clients: list[Any]) -> None:
    """B dials A: A's end of the link came in through A's hub like a chat client, and was
    counted as one (``clients 1`` on A, ``0`` on B).  Both ends have one link; only A has
    chat clients (carol over TCP, dave over UDP)."""
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    carol = TextUser(a.port, "carol")
    clients.append(carol)
    dave = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a UDP chat client is one too
    try:
        dave.sendto(b"dave\n", ("127.0.0.1", a.port))
        wait_for("carol and dave are listed", lambda: {"carol", "dave"} <= {
            u["nick"] for u in rpc(a, "users")}, SETTLE_S)
        for d, expected in ((a, {"clients": 2, "links": 1}), (b, {"clients": 0, "links": 1})):
            status = cli_json(d, "status")
            assert {k: status.get(k) for k in expected} == expected, status
            shown = [line.split() for line in d.cli("status").stdout.decode().splitlines()]
            assert ["clients", str(expected["clients"])] in shown
            assert ["links", "1"] in shown
    finally:
        dave.close()


def test_messages_flow_both_ways_exactly_once(make_daemon: Any) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    sent_a = send_many(a, 5, "from alice")
    sent_b = send_many(b, 5, "from bob")
    expected = set(sent_a) | set(sent_b)
    for d in (a, b):
        wait_for(f"{d.nick} has every message",
                 lambda d=d: set(history_ids(d)) == expected, SETTLE_S, diag=lambda: logs(a, b))
    time.sleep(0.5)  # a duplicate would arrive right behind
    for d in (a, b):
        ids = [m["id"] for m in cli_history(d, "--limit", "100")]
        assert_exactly_once_in_order(ids, expected)
    texts = [m["text"] for m in cli_history(a) if m["origin"] == nb]
    assert texts == [f"from bob {i}" for i in range(5)]


class Presences:
    """A raw control-socket subscription collecting ``presence`` notifications."""

    def __init__(self, d: Daemon) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(d.socket)
        self.sock.settimeout(5.0)
        self.buf = b""
        self.sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe",'
                          b'"params":{"presence":true}}\n')
        reply = self._next()
        assert reply.get("id") == 1 and "result" in reply, reply

    def _next(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("control socket closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        obj = json.loads(line)
        assert isinstance(obj, dict)
        return obj

    def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                obj = self._next()
            except TimeoutError:
                break
            seen.append(obj)
            if obj.get("method") == "presence" and pred(obj["params"]):
                return dict(obj["params"])
        raise AssertionError(f"no matching presence within {timeout} s; saw {seen[-10:]}")

    def close(self) -> None:
        self.sock.close()


def test_remote_joins_and_leaves_are_announced(make_daemon: Any, clients: list[Any]) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    watcher = Presences(a)
    try:
        local_on_a = TextUser(a.port, "dora")
        clients.append(local_on_a)
        carol = TextUser(b.port, "carol")   # joins on B
        clients.append(carol)
        p = watcher.until(lambda p: p["kind"] == "join" and p["nick"] == "carol", SETTLE_S)
        assert p["node"] == nb and p["room"] == "lobby"
        local_on_a.until("carol joined", SETTLE_S)
        users = cli_json(a, "users")
        assert [u["node"] for u in users if u["nick"] == "carol"] == [nb]
        carol.send("/quit\n")
        p = watcher.until(lambda p: p["kind"] == "leave" and p["nick"] == "carol", SETTLE_S)
        assert p["node"] == nb
        local_on_a.until("carol left", SETTLE_S)
        wait_for("carol gone from users on A",
                 lambda: all(u["nick"] != "carol" for u in rpc(a, "users")), SETTLE_S)
    finally:
        watcher.close()


def test_chat_between_hub_users_on_two_daemons(make_daemon: Any, clients: list[Any]) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    dora = TextUser(a.port, "dora")
    carol = TextUser(b.port, "carol")
    clients += [dora, carol]
    dora.until("carol joined", SETTLE_S)
    carol.send("hello from B\n")
    assert "carol: hello from B" in dora.until("hello from B", SETTLE_S)
    dora.send("hi back\n")
    assert "dora: hi back" in carol.until("hi back", SETTLE_S)


def test_clean_shutdown_is_seen_at_once_and_restart_catches_up(make_daemon: Any) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    own_b = send_many(b, 3, "bob before")
    wait_for("A has B's messages", lambda: set(own_b) <= set(history_ids(a)), SETTLE_S)

    t0 = time.monotonic()
    assert b.stop(signal.SIGTERM) == 0
    took = wait_within("A sees B down", lambda: not linked(a, nb), CLOSED_DOWN_WITHIN_S, t0,
                       diag=lambda: logs(a, b))
    print(f"\nclean shutdown noticed after {took:.2f} s")
    assert peer_state(a, nb) not in (None, "linked")

    while_down = send_many(a, 5, "alice while bob was away")
    b.start()
    t1 = time.monotonic()
    wait_linked(a, b, na, nb)
    expected = set(own_b) | set(while_down)
    wait_for("B caught up", lambda: set(history_ids(b)) == expected, SETTLE_S,
             diag=lambda: logs(a, b))
    print(f"restarted B linked and caught up after {time.monotonic() - t1:.2f} s")
    assert_exactly_once_in_order(history_ids(b), expected)
    assert_exactly_once_in_order(history_ids(a), expected)


def test_sigkill_is_noticed_within_the_silence_timeout(make_daemon: Any) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    t0 = time.monotonic()
    b.kill()
    took = wait_within("A sees B down", lambda: not linked(a, nb), DEAD_DOWN_WITHIN_S, t0,
                       diag=lambda: logs(a))
    print(f"\nSIGKILLed peer noticed after {took:.2f} s")
    wait_for("B's users gone from A", lambda: all(u["node"] != nb for u in rpc(a, "users")),
             SETTLE_S, diag=lambda: logs(a))


def test_silent_peer_is_declared_dead_by_heartbeat(make_daemon: Any) -> None:
    """A peer that stops answering without closing (SIGSTOP) is dropped within the silence
    timeout."""
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    assert b.proc is not None
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGSTOP)
    try:
        took = wait_within("A sees the frozen B down", lambda: not linked(a, nb),
                           DEAD_DOWN_WITHIN_S, t0, poll=0.2, diag=lambda: logs(a))
        print(f"\nsilent peer declared dead after {took:.2f} s")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    # Thawed, it links again and both ends agree.
    wait_linked(a, b, na, nb)


def test_chain_relays_both_ways_without_duplicates(make_daemon: Any) -> None:
    a = make_daemon("-vv", nick="alice", subdir="a")
    b = make_daemon("-vv", "--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")
    c = make_daemon("-vv", "--peer", f"127.0.0.1:{b.port}", nick="carol", subdir="c")
    na, nb, nc = node_of(a), node_of(b), node_of(c)
    wait_for("chain linked", lambda: linked(a, nb) and linked(b, na) and linked(b, nc)
             and linked(c, nb), LINK_DEADLINE_S, diag=lambda: logs(a, b, c))
    assert peer_state(a, nc) is None and peer_state(c, na) is None  # not linked directly
    ids = send_many(a, 4, "from A") + send_many(c, 4, "from C") + send_many(b, 2, "from B")
    for d in (a, b, c):
        wait_for(f"{d.nick} has all", lambda d=d: set(history_ids(d)) == set(ids), SETTLE_S,
                 diag=lambda: logs(a, b, c))
    time.sleep(0.5)
    for d in (a, b, c):
        assert_exactly_once_in_order(history_ids(d), set(ids))
    # The far end's users are known through the relay.
    wait_for("A lists carol (on C)", lambda: any(u["nick"] == "carol" and u["node"] == nc
                                                 for u in rpc(a, "users")), SETTLE_S)
    wait_for("C lists alice (on A)", lambda: any(u["nick"] == "alice" and u["node"] == na
                                                 for u in rpc(c, "users")), SETTLE_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _established(port_a: int, port_b: int) -> int:
    """TCP connections in ESTABLISHED state accepted on either listening port (loopback)."""
    count = 0
    with open("/proc/net/tcp") as f:
        table = f.read().splitlines()[1:]
    for line in table:
        parts = line.split()
        local_port = int(parts[1].split(":")[1], 16)
        if parts[3] == "01" and local_port in (port_a, port_b):
            count += 1
    return count


def test_mutual_static_peers_end_with_exactly_one_link(workdir: str) -> None:
    pa, pb = _free_port(), _free_port()
    a = Daemon(os.path.join(workdir, "a"), "-vv", "--peer", f"127.0.0.1:{pb}", nick="alice")
    b = Daemon(os.path.join(workdir, "b"), "-vv", "--peer", f"127.0.0.1:{pa}", nick="bob")
    a.requested_port, b.requested_port = pa, pb
    os.makedirs(a.workdir)
    os.makedirs(b.workdir)
    try:
        a.start()
        b.start()
        na, nb = node_of(a), node_of(b)
        wait_linked(a, b, na, nb)
        time.sleep(2.0)  # let both dialers finish whatever they started
        # One TCP connection between them, whichever side dialed it.
        assert min(_established(pa, pb) for _ in range(5)) == 1
        ids = send_many(a, 3, "a") + send_many(b, 3, "b")
        for d in (a, b):
            wait_for("all", lambda d=d: set(history_ids(d)) == set(ids), SETTLE_S)
        time.sleep(0.3)
        for d in (a, b):
            assert_exactly_once_in_order(history_ids(d), set(ids))
        # `lanchat peers` lists the other daemon once, linked (no stale "host:port" entry).
        for me, other in ((a, nb), (b, na)):
            peers = cli_json(me, "peers")
            assert [(p["node"], p["state"]) for p in peers] == [(other, "linked")], \
                f"{me.nick}: {peers}\n{logs(a, b)}"
    finally:
        b.stop()
        a.stop()


def test_500_each_side_while_cut_converge(make_daemon: Any,
                                          proxies: Callable[[int], Proxy]) -> None:
    a = make_daemon("-vv", nick="alice", subdir="a")
    proxy = proxies(a.port)
    b = make_daemon("-vv", "--peer", f"127.0.0.1:{proxy.port}", nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    wait_linked(a, b, na, nb)
    proxy.cut()
    wait_for("link seen down on both", lambda: not linked(a, nb) and not linked(b, na),
             SETTLE_S, diag=lambda: logs(a, b))
    sent = send_many(a, 500, "alice offline") + send_many(b, 500, "bob offline")
    proxy.heal()
    t0 = time.monotonic()
    expected = set(sent)  # 1000: exactly one history page, so a duplicate would show
    for d in (a, b):
        wait_for(f"{d.nick} converged", lambda d=d: set(history_ids(d)) == expected,
                 LINK_DEADLINE_S, poll=0.2, diag=lambda: logs(a, b))
    print(f"\n1000 messages converged {time.monotonic() - t0:.2f} s after the link healed")
    hist_a, hist_b = history_ids(a), history_ids(b)
    assert_exactly_once_in_order(hist_a, expected)
    assert_exactly_once_in_order(hist_b, expected)
    assert sorted(hist_a) == sorted(hist_b)


def test_restart_with_a_backlog_larger_than_one_frame_catches_up(make_daemon: Any) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    mine = send_many(b, 2, "bob's own")
    b.stop()
    backlog = send_many(a, 300, "backlog")
    b.start()
    expected = set(mine) | set(backlog)
    wait_for("B caught up on 300", lambda: set(history_ids(b)) == expected, SETTLE_S, poll=0.2,
             diag=lambda: logs(a, b))
    assert_exactly_once_in_order(history_ids(b), expected)
    texts = [m["text"] for m in rpc(b, "history", limit=1000) if m["origin"] == na]
    assert texts == [f"backlog {i}" for i in range(300)]


def test_link_flap_without_restart_restores_users(make_daemon: Any,
                                                  proxies: Callable[[int], Proxy]) -> None:
    """After a link drops and comes back (both daemons kept running), each lists the other's
    users again -- the "gone" mark from the drop must not hide them for good."""
    a = make_daemon("-vv", nick="alice", subdir="a")
    proxy = proxies(a.port)
    b = make_daemon("-vv", "--peer", f"127.0.0.1:{proxy.port}", nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    wait_linked(a, b, na, nb)
    wait_for("A lists bob", lambda: any(u["node"] == nb for u in rpc(a, "users")), SETTLE_S)
    proxy.cut()
    wait_for("down", lambda: not linked(a, nb) and not linked(b, na), SETTLE_S)
    wait_for("A no longer lists bob", lambda: all(u["node"] != nb for u in rpc(a, "users")),
             SETTLE_S)
    proxy.heal()
    wait_linked(a, b, na, nb)
    wait_for("A lists bob again after the link came back",
             lambda: any(u["node"] == nb for u in rpc(a, "users")), SETTLE_S,
             diag=lambda: f"A users: {rpc(a, 'users')}\nB users: {rpc(b, 'users')}\n"
                          + logs(a, b))
    wait_for("B lists alice again",
             lambda: any(u["node"] == na for u in rpc(b, "users")), SETTLE_S)


def test_static_dialer_relinks_after_the_peer_restarts(make_daemon: Any) -> None:
    """B dials A (--peer A); A restarts: B's dialer links again without anyone's help."""
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    a.stop()
    wait_for("B sees A down", lambda: not linked(b, na), SETTLE_S)
    time.sleep(2.0)  # a few failed redials: the backoff grows
    a.start()
    t0 = time.monotonic()
    wait_linked(a, b, na, nb)
    print(f"\nstatic dialer relinked {time.monotonic() - t0:.2f} s after the peer restarted")


def test_direct_message_crosses_the_link_to_its_addressee_only(make_daemon: Any,
                                                               clients: list[Any]) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    carol = TextUser(b.port, "carol")
    dave = TextUser(b.port, "dave")
    clients += [carol, dave]
    wait_for("A lists carol", lambda: any(u["nick"] == "carol" for u in rpc(a, "users")), SETTLE_S)
    res = a.cli("send", "--to", "carol", "psst carol")
    assert res.returncode == 0, res.stderr
    a.cli("send", "everyone")
    assert "psst carol" in carol.until("psst carol", SETTLE_S)
    line = dave.until(lambda s: "psst" in s or "everyone" in s, SETTLE_S)
    assert "everyone" in line and "psst" not in line


def test_rooms_cross_the_link(make_daemon: Any) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb)
    res = a.cli("send", "--room", "dev", "in dev")
    assert res.returncode == 0, res.stderr
    got = wait_for("B has it in #dev", lambda: [m for m in rpc(b, "history", room="dev")
                                                if m["text"] == "in dev"], SETTLE_S)
    assert got[0]["room"] == "dev" and got[0]["origin"] == na
    assert rpc(b, "history", room="lobby") == []


def test_a_daemon_with_hundreds_of_users_can_still_link(make_daemon: Any,
                                                        proxies: Callable[[int], Proxy]) -> None:
    """The hello carries every roster; with 300 users on one side it is larger than a hub
    client's frame limit, and the link must still come up."""
    a = make_daemon("-vv", nick="alice", subdir="a")
    proxy = proxies(a.port)
    proxy.cut()
    b = make_daemon("-vv", "--peer", f"127.0.0.1:{proxy.port}", nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    socks = []
    try:
        for i in range(300):  # UDP users: one datagram each, no handshake
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            # five users per host: a host may only join a few at once (UDP_UNREGISTERED_*)
            s.bind((f"127.0.3.{i // 5 + 1}", 0))
            s.sendto(f"user{i:03d}-{'x' * 20}\n".encode(), ("127.0.0.1", b.port))
            if i % 25 == 24:
                time.sleep(0.05)  # paced: a burst would overflow the hub's receive buffer
        wait_for("300 users on B", lambda: len(rpc(b, "users")) >= 301, SETTLE_S)
        proxy.heal()
        wait_linked(a, b, na, nb)
        wait_for("A lists B's 300 users",
                 lambda: sum(1 for u in rpc(a, "users") if u["node"] == nb) >= 301, SETTLE_S)
    finally:
        for s in socks:
            s.close()


# -- the wire, seen by a hand-written peer -------------------------------------------------------

FAKE_NODE = ROGUE_NODE


class FakePeer(Rogue):
    """A rogue daemon that introduces itself at once: hello, its ``auth`` when welcomed,
    then ``sync`` and its rosters, as a daemon's first frames (no shared secret).  The
    daemon's answer to the hello (welcome or error) is left to be read."""

    def __init__(self, port: int, *, node: str = FAKE_NODE, cursors: dict[str, int] | None = None,
                 identity: RogueIdentity | None = None, **over: Any) -> None:
        super().__init__(port, identity or RogueIdentity(node=node))
        rosters = over.pop("rosters", [])
        self.hello(**over)
        answer = self.frame()
        self.buf = json.dumps(answer).encode() + b"\n" + self.buf  # for the test to read
        if answer.get("type") != "welcome":
            return
        self.auth(answer)
        self.sync(cursors or {})
        for r in rosters:
            self.roster(r)


@pytest.fixture
def fakes() -> Iterator[list[FakePeer]]:
    made: list[FakePeer] = []
    try:
        yield made
    finally:
        for f in made:
            f.close()


def test_handshake_replay_gap_sync_and_ping(daemon: Daemon, fakes: list[FakePeer]) -> None:
    mine = send_many(daemon, 70, "stored before")   # more than one msgs batch (64)
    node = node_of(daemon)
    f = FakePeer(daemon.port, cursors={node: 3})
    fakes.append(f)
    welcome = f.until("welcome")
    assert welcome["node"] == node and welcome["role"] == "daemon"
    assert f.until("sync")["cursors"] == {node: 70}   # its first frame says what it holds
    # It sends what we lack, after our cursor, in order, in bounded batches.
    got: list[str] = []
    keys = []
    while len(got) < 67:
        frame = f.until("msgs")
        batch = frame["e"]
        assert 0 < len(batch) <= 64
        assert "s" in batch[-1]  # a run ends signed
        keys.append(frame.get("k"))
        got += entry_ids(batch)
    assert got == mine[3:]
    assert keys[0] is not None and not any(keys[1:])  # the key comes with the first run
    verify_run(parse_run(frame["e"]), PublicKey.from_text(keys[0]))
    # Our messages are stored and shown; a message beyond a gap is answered with a sync.
    f.msgs([f.message(1), f.message(2)])
    wait_for("stored", lambda: {f"{FAKE_NODE}:1", f"{FAKE_NODE}:2"} <= set(history_ids(daemon)),
             SETTLE_S)
    f.msgs([f.message(5)])
    sync = f.until("sync")
    assert sync["cursors"].get(FAKE_NODE) == 2
    assert f"{FAKE_NODE}:5" not in history_ids(daemon)   # never stored beyond a gap
    f.send({"type": "ping"})
    f.until("pong")
    # Duplicates are dropped by id.
    f.msgs([f.message(1), f.message(2), f.message(3)])
    wait_for("3 stored", lambda: f"{FAKE_NODE}:3" in history_ids(daemon), SETTLE_S)
    assert collections.Counter(history_ids(daemon))[f"{FAKE_NODE}:1"] == 1
    # Live messages follow; an idle link is pinged.
    send_many(daemon, 1, "live")
    live = f.until("msgs")["e"]
    assert [json.loads(e["b"])["seq"] for e in live] == [71]
    f.until("ping", timeout=5.0)
    peers = rpc(daemon, "peers")
    assert [(p["node"], p["state"]) for p in peers] == [(FAKE_NODE, "linked")]


def test_refusals_same_node_duplicate_and_bad_hello(daemon: Daemon,
                                                    fakes: list[FakePeer]) -> None:
    node = node_of(daemon)
    me = FakePeer(daemon.port, node=node)   # claims the daemon's node id without its key
    fakes.append(me)
    err = me.until("error")
    assert err["code"] == "bad-key" and err["fatal"] is True
    assert me.closed()
    bad = FakePeer(daemon.port, name="")
    fakes.append(bad)
    assert bad.until("error")["code"] == "bad-frame"
    assert bad.closed()
    first = FakePeer(daemon.port)
    fakes.append(first)
    first.until("welcome")
    # Registered once its auth is read (not at the welcome): only then is it "the link".
    wait_for("first linked", lambda: linked(daemon, FAKE_NODE), SETTLE_S)
    second = FakePeer(daemon.port)
    fakes.append(second)
    assert second.until("error")["code"] == "duplicate-link"
    assert second.closed()
    first.send({"type": "ping"})
    first.until("pong")   # the first link is untouched


def test_protocol_errors_close_the_link_and_the_daemon_lives_on(
        daemon: Daemon, fakes: list[FakePeer]) -> None:
    node = node_of(daemon)
    for junk in (b"{not json}\n", b'{"type":"warp"}\n', b'{"type":"msgs","m":[{"seq":1}]}\n',
                 b'{"type":"sync","cursors":{"a1a1a1a1":-1}}\n', b"x" * 70000 + b"\n"):
        f = FakePeer(daemon.port)
        fakes.append(f)
        f.until("welcome")
        f.sock.sendall(junk)
        assert f.closed(), junk[:40]
        wait_for("peer down", lambda: peer_state(daemon, FAKE_NODE) != "linked", SETTLE_S)
    assert rpc(daemon, "status")["node"] == node
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_relayed_roster_is_listed_and_vanishes_with_its_link(
        daemon: Daemon, fakes: list[FakePeer]) -> None:
    third_key = rogue_key("third")
    third = third_key.node
    f = FakePeer(daemon.port, rosters=[
        {"node": FAKE_NODE, "ver": 1, "name": "fake peer", "host": "fakehost", "gone": False,
         "users": [{"nick": "fay", "host": "fakehost", "since": 1.0, "room": "lobby",
                    "via": "tcp"}]}])
    fakes.append(f)
    f.until("welcome")
    f.roster({  # relayed: signed by its node, not by f
        "node": third, "ver": 7, "name": "far away", "host": "far", "gone": False,
        "users": [{"nick": "zed", "host": "far", "since": 2.0, "room": "lobby", "via": "udp"}]},
        key=third_key)
    users = wait_for("fay and zed listed", lambda: [
        (u["nick"], u["node"], u["local"]) for u in rpc(daemon, "users")
        if u["nick"] in ("fay", "zed")] if len([
            u for u in rpc(daemon, "users") if u["nick"] in ("fay", "zed")]) == 2 else None,
        SETTLE_S)
    assert sorted(users) == [("fay", FAKE_NODE, False), ("zed", third, False)]
    f.send({"type": "bye", "reason": "done"})
    assert f.closed()
    wait_for("both gone from users", lambda: not any(
        u["nick"] in ("fay", "zed") for u in rpc(daemon, "users")), SETTLE_S)


def test_users_lists_a_roster_of_the_largest_size(
        daemon: Daemon, fakes: list[FakePeer]) -> None:
    """A peer's roster of MAX_ROSTER_USERS users makes a ``users`` reply twice the control
    outbox bound; ``lanchat users`` used to fail with "lanchatd closed the connection"."""
    f = FakePeer(daemon.port, rosters=[
        {"node": FAKE_NODE, "ver": 1, "name": "big hub", "host": "bighost", "gone": False,
         "users": [{"nick": f"user{i:05d}", "host": f"host{i:05d}.example", "since": 1.0,
                    "room": "lobby", "via": "tcp"} for i in range(MAX_ROSTER_USERS)]}])
    fakes.append(f)
    f.until("welcome")
    wait_for("the big roster is listed",
             lambda: len(rpc(daemon, "users")) == 1 + MAX_ROSTER_USERS, SETTLE_S)
    r = daemon.cli("users", timeout=60.0)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2 + MAX_ROSTER_USERS  # the header, ours, the peer's
    assert r.stderr == b""
    nicks = {line.split()[0] for line in r.stdout.decode().splitlines()[1:]}
    assert {f"user{i:05d}" for i in range(MAX_ROSTER_USERS)} <= nicks


def test_the_65th_daemon_link_is_refused_and_real_links_carry_on(
        make_daemon: Any, fakes: list[FakePeer]) -> None:
    a, b, na, nb = pair(make_daemon)
    wait_linked(a, b, na, nb, timeout=20.0)

    def keep_alive() -> None:
        # A link silent for DEAD_AFTER_S (8 s) is dead, and a dead one frees its slot: the
        # fakes speak up between the steps so that every slot stays taken.
        for f in holding:
            f.send({"type": "ping"})

    # B's link and 63 fakes: every one of the 64 daemon links is taken.
    holding: list[FakePeer] = []
    for i in range(MAX_DAEMON_LINKS - 1):
        f = FakePeer(a.port, identity=rogue_identity(f"f0{i:014x}"))
        fakes.append(f)
        holding.append(f)
        f.until("welcome")
        if i % 16 == 15:
            keep_alive()
    keep_alive()
    # A fake holds its slot once its auth is read (after the welcome): wait for all of them.
    wait_for("every link slot taken", lambda: rpc(a, "status")["links"] == MAX_DAEMON_LINKS,
             SETTLE_S, diag=lambda: logs(a))
    over = FakePeer(a.port, identity=rogue_identity("f1" + "0" * 14))
    fakes.append(over)
    assert over.until("error") == {"type": "error", "code": "too-many-links", "fatal": True,
                                   "message": f"too many daemon links (limit {MAX_DAEMON_LINKS})"}
    assert over.closed()
    # The refusing daemon says so in its log, naming the refused node.
    assert (f"refused a link from 127.0.0.1 ({over.node}): every link slot is taken "
            f"(limit {MAX_DAEMON_LINKS})") in a.stderr()
    # The real link carries on, both ways.
    keep_alive()
    from_b = send_many(b, 1, "from bob")[0]
    from_a = send_many(a, 1, "from alice")[0]
    wait_for("B's message at A", lambda: from_b in history_ids(a), 5.0, diag=lambda: logs(a, b))
    wait_for("A's message at B", lambda: from_a in history_ids(b), 5.0, diag=lambda: logs(a, b))
    assert linked(a, nb) and linked(b, na)
    # A link that ends frees its slot.
    keep_alive()
    leaver = holding.pop(0)
    leaver.send({"type": "bye", "reason": "done"})
    assert leaver.closed()
    wait_for("the fake's link down", lambda: peer_state(a, leaver.node) != "linked", 5.0)

    def relinked() -> FakePeer | None:
        # The slot is freed just after the link is shown down: try again until it is.
        f = FakePeer(a.port, identity=rogue_identity("f1" + "0" * 14))
        fakes.append(f)
        if f.frame()["type"] == "welcome":
            return f
        f.close()
        return None

    holding.append(wait_for("a new link takes the freed slot", relinked, 5.0, poll=0.1))
    keep_alive()
    # A fake counts as linked once its auth, sent right after the welcome, is read.
    wait_for("all 64 slots linked again", lambda: sum(
        p["state"] == "linked" for p in rpc(a, "peers")) == MAX_DAEMON_LINKS, SETTLE_S,
        diag=lambda: logs(a))


def require_ipv6_loopback() -> None:
    """Skip (fail under $CI) unless this machine has the IPv6 loopback address ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        skip_or_fail(f"no IPv6 loopback (::1): {exc}")


def test_daemons_on_ipv6_link_and_chat(make_daemon: Any, clients: list[Any]) -> None:
    require_ipv6_loopback()
    a = make_daemon("-vv", "--bind", "::1", nick="alice", subdir="a")
    b = make_daemon("-vv", "--bind", "::1", "--peer", f"[::1]:{a.port}", nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    took = wait_linked(a, b, na, nb, timeout=20.0)
    print(f"\nlinked over ::1 in {took:.2f} s")
    assert [(p["address"], p["port"], p["state"]) for p in rpc(b, "peers")] == [
        ("::1", a.port, "linked")]
    assert [(p["address"], p["state"]) for p in rpc(a, "peers")] == [("::1", "linked")]
    # A message sent on either daemon reaches the other's history.
    from_b = send_many(b, 1, "from bob over IPv6")[0]
    from_a = send_many(a, 1, "from alice over IPv6")[0]
    wait_for("B's message at A", lambda: from_b in history_ids(a), 10.0, diag=lambda: logs(a, b))
    wait_for("A's message at B", lambda: from_a in history_ids(b), 10.0, diag=lambda: logs(a, b))
    # Text clients over IPv6, one on each hub, chat through the link.
    carol = TextUser(a.port, "carol", host="::1")
    dora = TextUser(b.port, "dora", host="::1")
    clients += [carol, dora]
    assert carol.welcome.startswith("* Welcome, carol!")
    carol.until("* dora joined #lobby", 10.0)
    carol.send("hello over IPv6\n")
    assert dora.until("carol: hello", 10.0).endswith("carol: hello over IPv6")
    dora.send("and back\n")
    assert carol.until("dora: and", 10.0).endswith("dora: and back")
    # A UDP client over IPv6 joins too.
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5.0)
        udp.sendto(b"erin", ("::1", a.port))
        assert udp.recvfrom(8192)[0].decode().startswith("* Welcome, erin!")
    assert dora.until("joined", 10.0) == "* erin joined #lobby"


def test_history_since_against_a_real_daemon(daemon: Daemon, fakes: list[FakePeer]) -> None:
    """``lanchat history --since`` in every documented form, on messages of many ages.

    A linked peer replays older messages (as a daemon that was away would), so the history
    holds messages from nine days ago to now; each form selects exactly those at or after it.
    """
    now = float(int(time.time()))  # whole seconds: an ISO time of one names it exactly
    ages = {"9d": 9 * 86400, "3d": 3 * 86400, "5h": 5 * 3600, "90m": 90 * 60, "30m": 30 * 60,
            "5m": 5 * 60}
    f = FakePeer(daemon.port)
    fakes.append(f)
    f.until("welcome")
    old = [f.message(seq, f"{name} ago", ts=now - age)
           for seq, (name, age) in enumerate(ages.items(), 1)]
    f.msgs(old)
    ts = {f"{name} ago": now - age for name, age in ages.items()}
    sent = daemon.cli("send", "just now")
    assert sent.returncode == 0, sent.stderr.decode()
    wait_for("the replayed messages stored",
             lambda: len(cli_history(daemon, "--limit", "100")) == len(ages) + 1, 5.0)

    def since(when: str, *more: str, env: dict[str, str] | None = None) -> list[str]:
        res = daemon.cli("--json", "history", "--since", when, *more, env=env)
        assert res.returncode == 0, res.stderr.decode()
        return [json.loads(x)["text"] for x in res.stdout.decode().splitlines() if x.strip()]

    everything = ["9d ago", "3d ago", "5h ago", "90m ago", "30m ago", "5m ago", "just now"]
    assert since("1w") == everything[1:]                   # oldest first, as always
    assert since("1d") == everything[2:]
    assert since("2h") == everything[3:]
    assert since("10m") == everything[5:]
    assert since("30s") == ["just now"]
    assert since("2.5h") == everything[3:]                 # fractions of a unit
    # Epoch seconds and ISO times are inclusive: a message at exactly that time is shown.
    assert since(repr(ts["30m ago"])) == everything[4:]
    iso_utc = datetime.datetime.fromtimestamp(ts["5h ago"], datetime.UTC).isoformat()
    assert since(iso_utc) == everything[2:]
    # An ISO time without a zone is the user's local time ($TZ here: UTC+5:30).
    india = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    naive = datetime.datetime.fromtimestamp(ts["3d ago"], india).replace(tzinfo=None)
    assert since(naive.isoformat(), env={"TZ": "IST-5:30"}) == everything[1:]
    # With --since, --limit takes the first messages from then on.
    assert since("1w", "--limit", "2") == ["3d ago", "5h ago"]
    # A time that is none of those is a usage error.
    bad = daemon.cli("history", "--since", "yesterday")
    assert bad.returncode == 2
    assert "'yesterday' is not a time: use 10m, 2h, 1d, an ISO time or epoch seconds" in (
        bad.stderr.decode())


# -- heartbeats and redial backoff, as lanchat-protocol(7) states them ---------------------------

#: lanchat-protocol(7): "an idle side sends ping every 2 seconds ...; a link silent for 8
#: seconds is dead and is redialed with backoff (0.5 s doubling to 30 s)".
DOC_HEARTBEAT_S = 2.0
DOC_DEAD_AFTER_S = 8.0
DOC_BACKOFF_FIRST_S = 0.5


def test_heartbeats_keep_an_idle_link_and_silence_ends_it(daemon: Daemon,
                                                          fakes: list[FakePeer]) -> None:
    """What the heartbeat numbers promise, seen from a peer: one that only pings, at the
    documented pace, for longer than the dead time stays linked; the daemon pings an idle
    link often enough that a peer keeping the same dead time never drops it (at least three
    pings within it); and a peer that goes silent is dropped after the dead time -- not
    before (that would cut live peers whose pings are late), and not long after."""
    f = FakePeer(daemon.port)
    fakes.append(f)
    f.until("welcome")
    heard: list[tuple[float, str]] = []  # when the daemon said what

    def listen(until: float) -> None:
        with contextlib.suppress(TimeoutError):
            for _ in range(1000):
                frame = f.frame(max(0.01, until - time.monotonic()))
                heard.append((time.monotonic(), str(frame.get("type"))))

    started = time.monotonic()
    while time.monotonic() - started < DOC_DEAD_AFTER_S + DOC_HEARTBEAT_S:
        f.send({"type": "ping"})
        silent_since = time.monotonic()  # our last word
        listen(silent_since + DOC_HEARTBEAT_S)
    assert peer_state(daemon, FAKE_NODE) == "linked", logs(daemon)

    closed_after = None
    try:
        listen(silent_since + DOC_DEAD_AFTER_S + 6.0)
    except (EOFError, ConnectionResetError):
        closed_after = time.monotonic() - silent_since
    pings = [round(t - silent_since, 2) for t, kind in heard if kind == "ping" and t > silent_since]
    print(f"\nsilent peer: pinged at {pings} s, dropped after {closed_after} s")
    assert closed_after is not None, f"a peer silent for {DOC_DEAD_AFTER_S + 6} s is still linked"
    assert closed_after >= DOC_DEAD_AFTER_S - 0.5, (closed_after, pings)
    within = [t for t in pings if t < DOC_DEAD_AFTER_S]
    assert len(within) >= 3, f"only {within} s: a peer with the same dead time would drop us"


def test_an_unreachable_peer_is_redialed_soon_then_less_and_less_often(make_daemon: Any) -> None:
    """"Redialed with backoff (0.5 s doubling)": a static peer that accepts and at once closes
    every connection is dialed again within about a second, then at waits that grow --
    the third at least twice the first -- so a dead peer is not hammered."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(15.0)
        make_daemon("--peer", f"127.0.0.1:{listener.getsockname()[1]}")
        dialed: list[float] = []
        for _ in range(4):
            conn, _ = listener.accept()
            dialed.append(time.monotonic())
            conn.close()
    gaps = [round(later - earlier, 2) for earlier, later in itertools.pairwise(dialed)]
    print(f"\nredial waits: {gaps} s")
    assert gaps[0] < 3 * DOC_BACKOFF_FIRST_S, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps
    assert gaps[2] >= 2 * gaps[0], gaps


def test_direct_messages_find_their_person_across_hubs_and_show_nowhere_else(
        make_daemon: Any, clients: list[Any]) -> None:
    """Issue 13 case 9 across three daemons: ``send --to`` reaches a user in another room on
    another hub; an unknown nick fails (exit 1); a nick on two nodes must be qualified
    (``nick@node-prefix``); only the two ends' daemons' users concerned ever list it."""
    a, b, na, nb = pair(make_daemon)
    c = make_daemon("-vv", "--peer", f"127.0.0.1:{a.port}", nick="cyd", subdir="c")
    nc = node_of(c)
    wait_linked(a, b, na, nb)
    wait_linked(a, c, na, nc)
    carol = TextUser(b.port, "carol")
    dave = TextUser(b.port, "dave")
    bob2 = TextUser(c.port, "bob")  # a second "bob": daemon B's own user is bob too
    clients += [carol, dave, bob2]
    carol.send("/join dev\n")
    carol.until("#dev", SETTLE_S)
    wait_for("A lists carol in #dev and bob on C", lambda: {
        (u["nick"], u.get("room")) for u in rpc(a, "users")} >= {("carol", "dev"), ("bob", "lobby")}
        and sum(u["nick"] == "bob" for u in rpc(a, "users")) == 2, SETTLE_S)
    watchers = {d: ControlClient(d.socket, timeout=10.0) for d in (b, c)}  # their `tail`s
    # notifications() waits for ever: a watchdog ends the wait (ConnectionLost) instead.
    watchdog = threading.Timer(LINK_DEADLINE_S, lambda: [w.interrupt()
                                                         for w in watchers.values()])
    watchdog.start()
    try:
        for w in watchers.values():
            w.subscribe(presence=False)
        res = a.cli("send", "--to", "carol", "psst carol")
        assert res.returncode == 0, res.stderr
        assert "psst carol" in carol.until("psst carol", SETTLE_S)
        assert a.cli("send", "tail marker").returncode == 0
        for d, w in watchers.items():
            seen = []
            for note in w.notifications():
                seen.append(note["params"]["text"])
                if seen[-1] == "tail marker":
                    break
            assert seen == ["tail marker"], (d, seen)
    finally:
        watchdog.cancel()
        watchdog.join()
        for w in watchers.values():
            w.close()
    sent = a.cli("send", "everyone")
    assert sent.returncode == 0, sent.stderr
    line = dave.until(lambda s: "psst" in s or "everyone" in s, SETTLE_S)
    assert "everyone" in line and "psst" not in line

    res = a.cli("send", "--to", "nobody", "hello?")
    assert res.returncode == 1
    assert "no such user: nobody" in res.stderr.decode()

    res = a.cli("send", "--to", "bob", "which bob?")
    assert res.returncode == 1
    err = res.stderr.decode()
    assert "bob@" + nb[:8] in err and "bob@" + nc[:8] in err, err
    res = a.cli("send", "--to", "bob@" + nb[:8], "for daemon B's bob")
    assert res.returncode == 0, res.stderr
    ours = wait_for("B's own user has it", lambda: [
        m for m in rpc(b, "history") if m["text"] == "for daemon B's bob"], SETTLE_S)
    assert ours[0]["to"] == "bob" and ours[0]["to_node"] == nb
    b2 = a.cli("send", "last public")
    assert b2.returncode == 0, b2.stderr
    assert "last public" in bob2.until(lambda s: "last public" in s or "daemon B" in s, SETTLE_S)
    for d in (b, c):  # every public message has arrived; no direct message is listed
        wait_for("the last public message arrived", lambda d=d: [
            m for m in rpc(d, "history") if m["text"] == "last public"], SETTLE_S)
    texts = {d: {m["text"] for m in rpc(d, "history")} for d in (a, b, c)}
    assert "psst carol" in texts[a] and "for daemon B's bob" in texts[a]  # alice sent them
    assert "psst carol" not in texts[b] and "psst carol" not in texts[c]
    assert "for daemon B's bob" in texts[b] and "for daemon B's bob" not in texts[c]
