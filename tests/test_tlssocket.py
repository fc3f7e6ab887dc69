"""TlsSocket (lanchat.tlsid): one TLS connection shared by a reader and writer threads.

Real TCP on loopback.  Both directions carry megabytes at once, each end with its own
reader and writer threads, through a receiver that stalls so the sender's socket fills
(the withheld-byte path); the hub's real ``stream.Outbox`` writes through it; the real
``openssl s_client`` asks for a KeyUpdate mid-stream.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import require_tool, wait_for

from lanchat import tlsid
from lanchat.feed import SigningKey
from lanchat.stream import SEND_FLAGS, Outbox

pytestmark = pytest.mark.timeout(90)
IO_TIMEOUT_S = 20.0


def new_key() -> SigningKey:
    return SigningKey(secrets.token_bytes(32))


def tls_pair(server_key: SigningKey | None = None) -> tuple[tlsid.TlsSocket, tlsid.TlsSocket]:
    """A server and a client TlsSocket connected over loopback TCP (handshakes in parallel)."""
    key = server_key or new_key()
    ctx = tlsid.server_context(key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_raw = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT_S)
        server_raw, _ = listener.accept()
    server_raw.settimeout(IO_TIMEOUT_S)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            result["server"] = tlsid.tls_handshake(server_raw, ctx, server_side=True)
        except (OSError, ValueError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=serve, name="tls-accept")
    thread.start()
    try:
        client = tlsid.tls_handshake(client_raw, tlsid.client_context(), server_side=False)
    finally:
        thread.join(IO_TIMEOUT_S)
    server = result.get("server")
    assert isinstance(server, tlsid.TlsSocket), result
    assert tlsid.expect_node(client, key.node) == key.public
    return server, client


@pytest.fixture
def pair() -> Iterator[tuple[tlsid.TlsSocket, tlsid.TlsSocket]]:
    server, client = tls_pair()
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def read_all(conn: tlsid.TlsSocket, total: int, digest: Any,
             pause_after: int = 0, pause_s: float = 0.0) -> int:
    got = 0
    paused = False
    while got < total:
        data = conn.recv(65536)
        if not data:
            break
        digest.update(data)
        got += len(data)
        if pause_after and got >= pause_after and not paused:
            paused = True
            time.sleep(pause_s)  # let the other end's socket fill up
    return got


def send_nonblocking(conn: tlsid.TlsSocket, data: bytes, deadline: float) -> None:
    """Like stream.Outbox's writer: MSG_DONTWAIT sends, poll for room, resend the rest."""
    view = memoryview(data)
    poller = select.poll()
    poller.register(conn, select.POLLOUT)
    while view:
        assert time.monotonic() < deadline, "send did not finish"
        try:
            sent = conn.send(view[:50_000], SEND_FLAGS)
        except BlockingIOError:
            poller.poll(100)
            continue
        assert 0 < sent <= min(len(view), 50_000)
        view = view[sent:]


def test_both_directions_at_once_with_reader_and_writer_threads(
        pair: tuple[tlsid.TlsSocket, tlsid.TlsSocket]) -> None:
    server, client = pair
    size = 6 * 1024 * 1024
    down, up = os.urandom(size), os.urandom(size)
    digests = {"server": hashlib.sha256(), "client": hashlib.sha256()}
    counts: dict[str, int] = {}
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def guard(fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def reader(name: str, conn: tlsid.TlsSocket) -> None:
        # the server's reader stalls once, so the client's socket fills part-way
        pause = (size // 3, 1.0) if name == "server" else (0, 0.0)
        counts[name] = read_all(conn, size, digests[name], *pause)

    threads = [
        threading.Thread(target=guard, args=(reader, "server", server), name="server-reader"),
        threading.Thread(target=guard, args=(reader, "client", client), name="client-reader"),
        # the server writes like the links do (sendall), the client like an outbox
        threading.Thread(target=guard, args=(server.sendall, down), name="server-writer"),
        threading.Thread(target=guard, args=(send_nonblocking, client, up, deadline),
                         name="client-writer"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(70)
    assert not errors, errors
    assert counts == {"server": size, "client": size}
    assert digests["server"].digest() == hashlib.sha256(up).digest()
    assert digests["client"].digest() == hashlib.sha256(down).digest()


def test_a_full_socket_withholds_a_byte_and_sends_it_exactly_once(
        pair: tuple[tlsid.TlsSocket, tlsid.TlsSocket]) -> None:
    server, client = pair
    client.settimeout(0.0)  # non-blocking, as the hub's sockets are for writing
    sent = bytearray()
    withheld = 0
    for i in range(10_000):  # fill the socket: the server reads nothing yet
        piece = bytes([65 + i % 26]) * 4096
        try:
            n = client.send(piece, SEND_FLAGS)
        except BlockingIOError:
            break
        sent += piece[:n]
        if n < len(piece):
            withheld += 1
            rest = piece[n:]
            break
    else:
        pytest.fail("the socket never filled")
    assert withheld == 1 and rest
    # while the socket is full, nothing more is taken, and the withheld byte is not lost
    with pytest.raises(BlockingIOError):
        client.send(rest, SEND_FLAGS)
    client.settimeout(IO_TIMEOUT_S)
    digest = hashlib.sha256()
    total = len(sent) + len(rest)
    thread = threading.Thread(target=lambda: read_all(server, total, digest), name="reader")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        client.settimeout(0.0)
        send_nonblocking(client, rest, deadline)
        client.settimeout(IO_TIMEOUT_S)
    finally:
        thread.join(40)
    assert digest.digest() == hashlib.sha256(bytes(sent) + rest).digest()


def test_the_hubs_outbox_writes_through_it_to_a_slow_reader(
        pair: tuple[tlsid.TlsSocket, tlsid.TlsSocket]) -> None:
    server, client = pair
    server.settimeout(0.0)
    outbox = Outbox(server, name="tls-outbox", max_bytes=64 * 1024 * 1024,  # type: ignore[arg-type]
                    stall_timeout=30.0)
    lines = [f"[12:00:{i % 60:02d}] alice: line {i} {'x' * (i % 200)}\n".encode()
             for i in range(40_000)]
    received = bytearray()
    expected = b"".join(lines)

    def slow_reader() -> None:
        time.sleep(0.5)  # the outbox fills the socket and queues meanwhile
        while len(received) < len(expected):
            data = client.recv(65536)
            if not data:
                return
            received.extend(data)

    thread = threading.Thread(target=slow_reader, name="slow-reader")
    thread.start()
    try:
        for line in lines:
            assert outbox.put(line)
        wait_for("every line", lambda: len(received) >= len(expected) or None, 60)
    finally:
        outbox.close_with(None, "done", keep_queued=True)
        outbox.join(10)
        thread.join(10)
    assert bytes(received) == expected  # in order, nothing lost, nothing twice


def test_send_on_a_blocking_socket_sends_what_it_counts(
        pair: tuple[tlsid.TlsSocket, tlsid.TlsSocket]) -> None:
    server, client = pair
    data = os.urandom(200_000)
    got = bytearray()
    thread = threading.Thread(target=lambda: got.extend(_read_n(server, len(data))),
                              name="reader")
    thread.start()
    try:
        view = memoryview(data)
        for _ in range(100):
            if not view:
                break
            n = client.send(view)  # no MSG_DONTWAIT, a timeout socket: blocking
            assert 0 < n <= 64 * 1024
            view = view[n:]
    finally:
        thread.join(IO_TIMEOUT_S)
    assert bytes(got) == data


def _read_n(conn: tlsid.TlsSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(65536)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_handshake_deadline_and_a_peer_that_closes() -> None:
    ctx = tlsid.server_context(new_key())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        silent = socket.create_connection(listener.getsockname())  # says nothing
        raw, _ = listener.accept()
        try:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                tlsid.tls_handshake(raw, ctx, server_side=True, timeout=0.5)
            assert time.monotonic() - start < 5
        finally:
            raw.close()
            silent.close()
        quitter = socket.create_connection(listener.getsockname())
        raw, _ = listener.accept()
        quitter.close()
        try:
            with pytest.raises(ConnectionError):
                tlsid.tls_handshake(raw, ctx, server_side=True, timeout=5)
        finally:
            raw.close()


def test_end_of_stream_and_peek(pair: tuple[tlsid.TlsSocket, tlsid.TlsSocket]) -> None:
    server, client = pair
    assert server.version() == client.version() == "TLSv1.3"
    client.sendall(b"bye\n")
    client.shutdown(socket.SHUT_WR)  # no close_notify: a plain end, as nc --ssl may do
    assert server.recv(100) == b"bye\n"
    assert server.recv(100) == b""
    with pytest.raises(ValueError):
        server.recv(1, socket.MSG_PEEK)


def test_openssl_key_update_mid_stream() -> None:
    """s_client asks for a KeyUpdate (K) between two lines; our reader answers it inside
    recv, the writer's next record goes out under the new key, openssl reads it."""
    openssl = require_tool("openssl", "openssl")
    key = new_key()
    ctx = tlsid.server_context(key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(IO_TIMEOUT_S)
    echoed: list[bytes] = []

    def serve() -> None:
        try:
            echo()
        except OSError as exc:
            echoed.append(f"error: {exc}".encode())

    def echo() -> None:
        raw, _ = listener.accept()
        raw.settimeout(IO_TIMEOUT_S)
        with tlsid.tls_handshake(raw, ctx, server_side=True) as conn:
            buf = b""
            for _ in range(100):
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    echoed.append(line)
                    conn.sendall(b"echo " + line + b"\n")  # the writer: this thread

    thread = threading.Thread(target=serve, name="tls-echo")
    thread.start()
    proc = subprocess.Popen([openssl, "s_client", "-connect", f"127.0.0.1:{port}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # KEYUPDATE is said on stderr
    assert proc.stdin is not None and proc.stdout is not None
    out = b""

    def read_until(marker: bytes) -> bytes:
        nonlocal out
        end = time.monotonic() + IO_TIMEOUT_S
        while marker not in out and time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
                if not chunk:
                    break
                out += chunk
        return out

    try:
        proc.stdin.write(b"before\n")
        proc.stdin.flush()
        assert b"echo before" in read_until(b"echo before")
        proc.stdin.write(b"K\n")  # KEYUPDATE, update_requested
        proc.stdin.flush()
        # one read of stdin is one command: wait until openssl has done it
        assert b"KEYUPDATE" in read_until(b"KEYUPDATE"), out
        proc.stdin.write(b"after\n")
        proc.stdin.flush()
        assert b"echo after" in read_until(b"echo after"), out
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        thread.join(IO_TIMEOUT_S)
        listener.close()
    assert echoed == [b"before", b"after"]  # K was a command to openssl, not a line


def test_one_recv_takes_every_record_that_arrived_and_readable_says_so(
        pair: tuple[tlsid.TlsSocket, tlsid.TlsSocket]) -> None:
    """A TLS record holds at most 16 KiB: a reader asking for 256 KiB must get all that
    already arrived, not one record per call (a link then reads several runs at once and
    hands them to the router together).  ``readable`` tells whether recv would wait."""
    client, server = pair
    assert not server.readable()
    data = secrets.token_bytes(200_000)
    client.sendall(data)
    wait_for("the records arrived", server.readable, IO_TIMEOUT_S)
    time.sleep(0.2)  # all of them
    got = server.recv(262144)
    assert len(got) > 4 * 16384, len(got)
    rest = read_all_plain(server, len(data) - len(got))
    assert got + rest == data
    assert not server.readable()


def read_all_plain(conn: tlsid.TlsSocket, total: int) -> bytes:
    out = b""
    deadline = time.monotonic() + IO_TIMEOUT_S
    while len(out) < total and time.monotonic() < deadline:
        out += conn.recv(65536)
    return out
