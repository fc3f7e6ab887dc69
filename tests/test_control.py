"""The control socket over a real Unix socket, with a fake backend."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from control_fake import NODE, FakeBackend

from lanchat.client import ConnectionLost, ControlClient, RpcError
from lanchat.control import AlreadyRunning, ControlServer
from lanchat.limits import (
    MAX_HISTORY_PAGE,
    MAX_OUTBOX_BYTES,
    MAX_RPC_BATCH_REPLY_BYTES,
    MAX_RPC_LINE_BYTES,
    MAX_TEXT_BYTES,
    SEND_STALL_TIMEOUT_S,
)
from lanchat.model import Presence
from lanchat.presence import MAX_ROSTER_USERS


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    d = tempfile.mkdtemp(dir="/tmp", prefix="lcc-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(tmpdir_short: str) -> Iterator[tuple[ControlServer, FakeBackend, str]]:
    backend = FakeBackend()
    path = os.path.join(tmpdir_short, "run", "control.sock")
    server = ControlServer(path, backend)
    server.start()
    try:
        yield server, backend, path
    finally:
        server.close()
        leftover = [t.name for t in threading.enumerate() if t.name.startswith("control-")]
        assert not leftover, leftover


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5.0)
    s.connect(path)
    return s


def read_line(f: Any) -> Any:
    line = f.readline()
    assert line, "connection closed"
    return json.loads(line)


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- permissions and the socket file --------------------------------------------------

def test_dir_created_0700_socket_0600(served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, _, path = served
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    # no staging directory left behind
    assert os.listdir(os.path.dirname(path)) == ["control.sock"]


def test_group_mode_0660(tmpdir_short: str) -> None:
    path = os.path.join(tmpdir_short, "c.sock")
    server = ControlServer(path, FakeBackend(), mode=0o660, group=os.getgid())
    server.start()
    try:
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        server.close()
    assert not os.path.exists(path), "close() removes its socket file"


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "non-blocking"])
def test_inherited_listener_is_served_and_left_listening(tmpdir_short: str,
                                                         blocking: bool) -> None:
    """systemd's socket (sd_listen_fds): served as is, never chmod'ed, shut down or unlinked.

    Its O_NONBLOCK flag is shared with whoever passed it, so the server must cope with both.
    """
    path = os.path.join(tmpdir_short, "c.sock")
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what systemd keeps open
    try:
        held.bind(path)
        os.chmod(path, 0o640)
        held.listen(8)
        os.set_blocking(held.fileno(), blocking)
        server = ControlServer(path, FakeBackend(), mode=0o600,
                               sock=socket.socket(fileno=os.dup(held.fileno())))
        server.start()
        try:
            with ControlClient(path) as c:
                assert c.call("status")["node"] == NODE
            assert server.inherited
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640, "mode is systemd's"
        finally:
            server.close()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640, "close() left the file alone"
        # Still listening for the next daemon: a client is queued, not refused.
        queued = raw(path)
        held.settimeout(5.0)
        accepted, _ = held.accept()
        accepted.close()
        queued.close()
    finally:
        held.close()


def test_stale_socket_is_replaced(tmpdir_short: str) -> None:
    path = os.path.join(tmpdir_short, "c.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # a crashed daemon: the file stays, nobody listens (ECONNREFUSED)
    server = ControlServer(path, FakeBackend())
    server.start()
    try:
        with ControlClient(path) as c:
            assert c.call("status")["node"] == NODE
    finally:
        server.close()


def test_live_socket_is_refused(served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, _, path = served
    second = ControlServer(path, FakeBackend())
    with pytest.raises(AlreadyRunning, match=f"another lanchatd is already listening on {path}"):
        second.start()
    with ControlClient(path) as c:  # the first one still serves
        assert c.call("status")["nick"] == "alice"


def test_non_socket_file_is_not_replaced(tmpdir_short: str) -> None:
    path = os.path.join(tmpdir_short, "c.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(AlreadyRunning, match="not a socket"):
        ControlServer(path, FakeBackend()).start()
    with open(path) as f:
        assert f.read() == "precious"


# -- methods -----------------------------------------------------------------------------

def test_send_records_peer_uid(served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, backend, path = served
    with ControlClient(path) as c:
        msg = c.call("send", text="hi", room="#Dev")
    assert msg["text"] == "hi" and msg["room"] == "dev" and msg["id"] == f"{NODE}:1"
    assert backend.uids == [os.getuid()]


def test_methods_and_errors(served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, backend, path = served
    with ControlClient(path) as c:
        names = [m["name"] for m in c.call("methods")]
        assert {"send", "history", "subscribe", "users", "peers", "status", "nick",
                "methods"} <= set(names)
        status = c.call("status")
        assert {"version", "node", "nick", "port", "peers", "uptime_s"} <= set(status)
        assert c.call("nick", nick="robert") == {"nick": "robert"}
        users = c.call("users")
        assert {"nick", "host", "node", "local", "since"} <= set(users[0])
        assert c.call("peers")[0]["state"] == "linked"
        with pytest.raises(RpcError) as e:
            c.call("nick", nick="taken")
        assert e.value.rpc_code == 2
        for params in ({"text": ""}, {"text": 5}, {"text": "x", "room": "no spaces"},
                       {"text": "x", "rom": "lobby"}, {}):
            with pytest.raises(RpcError) as e:
                c.call("send", **params)
            assert e.value.rpc_code == -32602, params
        with pytest.raises(RpcError) as e:
            c.call("history", limit=0)
        assert e.value.rpc_code == -32602
        with pytest.raises(RpcError) as e:
            c.call("frobnicate")
        assert e.value.rpc_code == -32601
        assert backend.messages == []


def test_history(served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, backend, path = served
    for i in range(5):
        backend.add(f"m{i}", room="dev" if i % 2 else "lobby", ts=1000.0 + i)
    with ControlClient(path) as c:
        assert [m["text"] for m in c.call("history")] == ["m0", "m1", "m2", "m3", "m4"]
        assert [m["text"] for m in c.call("history", room="dev")] == ["m1", "m3"]
        assert [m["text"] for m in c.call("history", limit=2)] == ["m3", "m4"]
        assert [m["text"] for m in c.call("history", since=1003)] == ["m3", "m4"]


def test_a_batch_of_history_pages_is_bounded(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    """A 1 MiB line of ``history`` calls must not make the daemon build every page at once:
    past MAX_RPC_BATCH_REPLY_BYTES the rest of the batch is refused, each with an error."""
    _, backend, path = served
    for i in range(1000):
        backend.add(f"{i:04d} " + "y" * 60, ts=1000.0 + i)  # a page is about 200 KB
    calls = [{"jsonrpc": "2.0", "method": "history", "params": {"limit": 1000}, "id": i}
             for i in range(30)]
    s = raw(path)
    f = s.makefile("rb")
    try:
        s.sendall(json.dumps(calls).encode() + b"\n")
        line = f.readline()
    finally:
        f.close()
        s.close()
    replies = json.loads(line)
    assert isinstance(replies, list), replies
    pages = [r for r in replies if "result" in r]
    refused = [r for r in replies if "error" in r]
    print(f"\nbatch of 30 pages: {len(pages)} answered, {len(refused)} refused, "
          f"{len(line)} bytes")
    assert 1 <= len(pages) < 30 and len(pages) + len(refused) == 30
    page = len(json.dumps(pages[0]))
    assert len(line) <= MAX_RPC_BATCH_REPLY_BYTES + page + 30 * 300
    assert {r["error"]["data"]["code"] for r in refused} == {"limit"}
    with ControlClient(path) as c:  # and the connection's daemon serves on
        assert len(c.call("history", limit=1000)) == 1000


def test_a_history_page_of_long_messages_arrives(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    """The documented largest page, 1,000 messages of MAX_TEXT_BYTES, is several times the
    outbox bound (which is for unsolicited data): the reply must arrive whole."""
    _, backend, path = served
    for i in range(MAX_HISTORY_PAGE):
        backend.add(f"{i:04d}" + "z" * (MAX_TEXT_BYTES - 4), ts=1000.0 + i)
    with ControlClient(path, timeout=30.0) as c:
        page = c.call("history", limit=MAX_HISTORY_PAGE)
        assert len(json.dumps(page)) > 4 * MAX_OUTBOX_BYTES
        assert [m["text"][:4] for m in page] == [f"{i:04d}" for i in range(MAX_HISTORY_PAGE)]
        assert all(len(m["text"]) == MAX_TEXT_BYTES for m in page)
        assert c.call("status")["node"] == NODE  # and the connection serves on


def test_pipelined_pages_are_built_only_as_fast_as_they_are_read(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    """Replies are not bounded by the outbox, so the backpressure is the reader's: a client
    that pipelines many large requests and reads nothing gets at most a reply in flight and
    one queued (plus the one being built), not every page in the daemon's memory; when it
    reads, every reply arrives, in order."""
    _, backend, path = served
    for i in range(MAX_HISTORY_PAGE):
        backend.add("p" * MAX_TEXT_BYTES, ts=1000.0 + i)
    requests = 20
    s = raw(path)
    s.settimeout(30.0)
    f = s.makefile("rb")
    try:
        s.sendall(b"".join(
            json.dumps({"jsonrpc": "2.0", "method": "history",
                        "params": {"limit": MAX_HISTORY_PAGE}, "id": i}).encode() + b"\n"
            for i in range(requests)))
        wait_for(lambda: backend.history_calls >= 2)
        time.sleep(1.0)  # time to build every page, if nothing held the reader back
        built = backend.history_calls
        print(f"\npages built while the client read nothing: {built} of {requests}")
        assert built <= 3
        ids = []
        for _ in range(requests):
            reply = json.loads(f.readline())
            assert len(reply["result"]) == MAX_HISTORY_PAGE
            ids.append(reply["id"])
        assert ids == list(range(requests))
    finally:
        f.close()
        s.close()


def test_users_reply_of_a_big_roster_arrives(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, backend, path = served
    backend.extra_users = MAX_ROSTER_USERS
    with ControlClient(path, timeout=30.0) as c:
        users = c.call("users")
    assert len(json.dumps(users)) > MAX_OUTBOX_BYTES
    assert len(users) == 2 + MAX_ROSTER_USERS


def test_notification_and_batch_over_socket(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, backend, path = served
    s = raw(path)
    f = s.makefile("rb")
    try:
        s.sendall(b'{"jsonrpc":"2.0","method":"send","params":{"text":"quiet"}}\n'
                  b"\n"
                  b'[{"jsonrpc":"2.0","method":"status","id":"a"},'
                  b'{"jsonrpc":"2.0","method":"users"}]\n'
                  b'{"jsonrpc":"2.0","method":"nope","id":1}\n')
        batch = read_line(f)
        assert isinstance(batch, list) and len(batch) == 1 and batch[0]["id"] == "a"
        assert read_line(f)["error"]["code"] == -32601
        assert [m.text for m in backend.messages] == ["quiet"]
    finally:
        f.close()
        s.close()


def test_oversized_line_gets_error_and_close(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    """A line that never ends: past MAX_RPC_LINE_BYTES the server replies and closes.

    The client streams one endless line within a budget of eight limits' worth of
    bytes.  Only the server closing passes: a send fails with EPIPE/ECONNRESET,
    then the error reply is read, then EOF (or ECONNRESET, for the bytes it left
    unread).  A server that keeps reading exhausts the budget; one that stops
    reading without closing makes a send or the read time out (TimeoutError).
    """
    server, _, path = served
    chunk = b"x" * 65536
    budget = 8 * MAX_RPC_LINE_BYTES
    sent = 0
    s = raw(path)  # 5 s per send and per recv
    deadline = time.monotonic() + 60.0
    try:
        closed_by: OSError | None = None
        while sent < budget and time.monotonic() < deadline:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError) as exc:
                closed_by = exc
                break
            sent += len(chunk)
        assert closed_by is not None, f"the server read {sent} bytes of one line and kept going"
        assert sent >= MAX_RPC_LINE_BYTES - len(chunk), f"closed after only {sent} bytes"
        received = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break  # closed with our bytes unread: Linux resets, after what was sent
            if not data:
                break
            received += data
            assert len(received) <= 4096, f"more than one error reply: {received[:200]!r}"
    finally:
        s.close()
    # A Unix socket delivers what was sent before the close, so the reply is always there.
    assert received.count(b"\n") == 1 and received.endswith(b"\n"), received
    reply = json.loads(received)
    assert reply["error"]["code"] == -32600 and reply["id"] is None
    assert "longer than" in reply["error"]["message"]
    with ControlClient(path) as c:  # the server keeps serving others
        assert c.call("status")["nick"] == "alice"
    wait_for(lambda: server.connections == 0)


def test_oversized_line_reply_is_seen(served: tuple[ControlServer, FakeBackend, str]) -> None:
    """Just over the limit, sent at once: the reply arrives before the close."""
    _, _, path = served
    s = raw(path)
    f = s.makefile("rb")
    try:
        s.sendall(b"[" + b" " * MAX_RPC_LINE_BYTES + b"]\n")
        reply = json.loads(f.readline())
        assert reply["error"]["code"] == -32600
        assert "longer than" in reply["error"]["message"]
        assert f.readline() == b""
    finally:
        f.close()
        s.close()


# -- subscriptions -----------------------------------------------------------------------

def test_subscribe_backlog_then_live_in_order(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, backend, path = served
    total = 300
    started = threading.Event()

    def producer() -> None:
        for i in range(total):
            if i == 50:
                started.set()
            backend.add(f"n{i}")

    t = threading.Thread(target=producer, name="test-producer")
    t.start()
    try:
        assert started.wait(5)
        with ControlClient(path) as c:
            backlog, notes = c.subscribe(backlog=5)
            seqs = [m["seq"] for m in backlog]
            assert len(seqs) == 5
            while seqs[-1] < total:
                note = next(notes)
                assert note["method"] == "message"
                seqs.append(note["params"]["seq"])
    finally:
        t.join(10)
    assert seqs == list(range(seqs[0], total + 1)), "no gap and no duplicate"


def test_subscribe_room_and_presence_filters(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    _, backend, path = served
    p = Presence(kind="join", nick="carol", host="h", node=NODE, room="dev", ts=1.0)
    with ControlClient(path) as everything, ControlClient(path) as quiet:
        backlog, notes = everything.subscribe(room="dev")
        assert backlog == []
        _, quiet_notes = quiet.subscribe(presence=False)
        backend.presence(p)
        backend.add("in lobby")
        backend.add("in dev", room="dev")
        first = next(notes)
        assert first == {"jsonrpc": "2.0", "method": "presence", "params": p.to_dict()}
        assert next(notes)["params"]["text"] == "in dev"
        assert next(quiet_notes)["params"]["text"] == "in lobby"
        assert next(quiet_notes)["params"]["text"] == "in dev"
        with pytest.raises(RpcError) as e:
            everything.call("subscribe")
        assert e.value.rpc_code == 3
        assert everything.call("unsubscribe") is True
    wait_for(lambda: backend.subs == [])


def test_slow_subscriber_is_dropped_without_slowing_senders(
        served: tuple[ControlServer, FakeBackend, str]) -> None:
    server, backend, path = served
    slow = raw(path)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        slow.sendall(b'{"jsonrpc":"2.0","method":"subscribe","id":1}\n')
        wait_for(lambda: len(backend.subs) == 1)
        text = "x" * 4000
        worst = 0.0
        with ControlClient(path) as sender:
            # Enough to fill the outbox bound plus every kernel buffer on the way, bounded.
            for _ in range(4 * MAX_OUTBOX_BYTES // len(text)):
                t0 = time.monotonic()
                sender.call("send", text=text)
                worst = max(worst, time.monotonic() - t0)
                if not backend.subs:
                    break
        assert backend.subs == [] and backend.dropped == 1, "the slow subscriber was dropped"
        # A sender that waited on the slow subscriber would wait for its cut-off (a blocked
        # send is given SEND_STALL_TIMEOUT_S); half of that tells the two apart on a loaded
        # runner.  Measured: milliseconds.
        print(f"\nslowest send beside a slow subscriber: {worst:.3f} s")
        assert worst < SEND_STALL_TIMEOUT_S / 2, f"a send waited {worst:.2f}s on a slow subscriber"
        # What the slow client finally reads: its reply, some messages, then the overflow
        # notice, then EOF.
        slow.settimeout(10)
        f = slow.makefile("rb")
        lines = []
        for _ in range(10_000):
            line = f.readline()
            if not line:
                break
            lines.append(json.loads(line))
        f.close()
        assert lines[0]["id"] == 1 and "subscription" in lines[0]["result"]
        assert lines[-1]["method"] == "overflow" and lines[-1]["params"]["reason"]
        assert all(m.get("method") == "message" for m in lines[1:-1])
    finally:
        slow.close()
    wait_for(lambda: server.connections == 0)


def test_close_disconnects_subscribers(tmpdir_short: str) -> None:
    path = os.path.join(tmpdir_short, "c.sock")
    backend = FakeBackend()
    server = ControlServer(path, backend)
    server.start()
    c = ControlClient(path)
    try:
        _, notes = c.subscribe()
        server.close()
        with pytest.raises(ConnectionLost):
            next(notes)
        assert backend.subs == []
    finally:
        c.close()
        server.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("control-")]
