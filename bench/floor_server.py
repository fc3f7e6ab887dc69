"""The floor: the least a chat server written in Python can do per message on this machine.

One thread, one ``epoll``, non-blocking sockets, no storage, no locks, no queues: read a line,
``send`` it to every other client in the room, next.  It is not a design to ship (a client that
stops reading loses messages, nothing is kept, one slow step stalls everyone), but it shows what
the machine and the load generator allow: a latency that even this server cannot reach here is
a limit of the machine, not of a server's design.

It speaks the same text mode as ``classic_server.py`` (``* Choose a nickname:``, ``* Welcome,
NICK! ...``, ``[HH:MM:SS] nick: text``, ``/join ROOM`` answered with ``* You joined #ROOM``,
``/quit``), with TCP_NODELAY on every socket.

With ``--tls`` every client speaks TLS 1.3 (the load generator's ``LoadSpec.tls``): accepted
sockets are wrapped, non-blocking, with ``lanchat.tlsid.server_context`` for a fixed bench key
(the hub's own certificate kind: self-signed Ed25519), and the handshake is one more step of
the loop.  A TLS line cannot be dropped half-way like a plain one (OpenSSL keeps the rest of the
record and wants the same write again), so with ``--tls`` a client whose socket is full is
dropped instead of losing the line.  Without ``--tls`` all this costs one empty-list test per
line.

Run: ``python bench/floor_server.py --port 0 [--tls]``; prints ``listening on 127.0.0.1:PORT``.
Loopback only by default; a benchmark reference, not a server to expose.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import select
import socket
import ssl
import sys
import time
from pathlib import Path

from classic_server import open_listener

#: Longest line accepted from a client; a longer one drops the client.
MAX_LINE_BYTES = 32 * 1024
SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)


class Conn:
    """One client: its socket, the unfinished line, its nick (empty until chosen), its room."""

    __slots__ = ("handshaking", "nick", "pending", "room", "sock")

    def __init__(self, sock: socket.socket, handshaking: bool = False) -> None:
        self.sock = sock
        self.pending = b""
        self.nick = ""
        self.room = "lobby"
        self.handshaking = handshaking  # --tls: the TLS handshake is not done yet


GREETING = b"* floor chat server -- welcome!\n* Choose a nickname:\n"


def bench_tls_context() -> ssl.SSLContext:
    """The hub's kind of TLS server context (TLS 1.3, self-signed Ed25519 certificate) for a
    fixed key: ``lanchat.tlsid.server_context`` of a key from a constant seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lanchat.feed import SigningKey
    from lanchat.tlsid import server_context
    return server_context(SigningKey(hashlib.sha256(b"lanchat bench floor server").digest()))


class FloorServer:
    def __init__(self, listener: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        self.listener = listener
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.rooms: dict[str, dict[int, Conn]] = {}
        self.tls = tls
        self.doomed: list[int] = []  # --tls: clients whose socket was full, dropped after
        if tls is not None:
            self._send = self._send_tls  # type: ignore[method-assign]

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        lfd = self.listener.fileno()
        while True:
            for fd, _ev in self.epoll.poll():
                if fd == lfd:
                    self._accept()
                else:
                    self._readable(fd)

    def _accept(self) -> None:
        while True:
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:  # EMFILE and friends: try again on the next readiness
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                tsock = self.tls.wrap_socket(sock, server_side=True,
                                             do_handshake_on_connect=False)
                self.conns[tsock.fileno()] = Conn(tsock, handshaking=True)
                self.epoll.register(tsock.fileno(), select.EPOLLIN)
                continue  # the ClientHello comes with the next readiness
            self.conns[sock.fileno()] = Conn(sock)
            self.epoll.register(sock.fileno(), select.EPOLLIN)
            self._send(sock, GREETING)

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):  # full or gone: dropped (the floor keeps no queue)
            sock.send(data, SEND_FLAGS)

    def _send_tls(self, sock: socket.socket, data: bytes) -> None:
        """--tls: a full socket leaves half a record in OpenSSL: drop that client after the
        broadcast (``doomed``) instead of losing the line."""
        try:
            sock.send(data)
        except ssl.SSLWantWriteError:
            self.doomed.append(sock.fileno())
        except OSError:
            pass  # gone: its own read will see it

    def _handshake(self, fd: int, conn: Conn) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:  # ssl.SSLError included: not a TLS client, or gone
            self._drop(fd)
            return
        conn.handshaking = False
        self._send(sock, GREETING)

    def _drop(self, fd: int) -> None:
        conn = self.conns.pop(fd)
        self.rooms.get(conn.room, {}).pop(fd, None)
        self.epoll.unregister(fd)
        conn.sock.close()

    def _readable(self, fd: int) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        if conn.handshaking:
            self._handshake(fd, conn)
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError:
            data = b""
        if self.tls is not None and data:  # one record per recv: take what OpenSSL holds
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            while sock.pending():
                data += sock.recv(65536)
        if not data:
            self._drop(fd)
            return
        *lines, conn.pending = (conn.pending + data).split(b"\n")
        if len(conn.pending) > MAX_LINE_BYTES:
            self._drop(fd)
            return
        for raw in lines:
            if not self._line(fd, conn, raw.rstrip(b"\r").decode("utf-8", "replace")):
                self._drop(fd)
                return
            if self.doomed:
                self._drop_doomed()
                if fd not in self.conns:
                    return

    def _drop_doomed(self) -> None:
        doomed, self.doomed = self.doomed, []
        for fd in doomed:
            if fd in self.conns:
                self._drop(fd)

    def _line(self, fd: int, conn: Conn, text: str) -> bool:
        if not conn.nick:
            if not text.strip():
                return False
            conn.nick = text.strip()
            self.rooms.setdefault(conn.room, {})[fd] = conn
            self._send(conn.sock, f"* Welcome, {conn.nick}! You are in #{conn.room}.\n".encode())
        elif text == "/quit":
            return False
        elif text.startswith("/join "):
            self.rooms.get(conn.room, {}).pop(fd, None)
            conn.room = text[6:].strip() or "lobby"
            self.rooms.setdefault(conn.room, {})[fd] = conn
            self._send(conn.sock, f"* You joined #{conn.room}\n".encode())
        else:
            line = f"[{time.strftime('%H:%M:%S')}] {conn.nick}: {text}\n".encode()
            for other_fd, other in self.rooms[conn.room].items():
                if other_fd != fd:
                    self._send(other.sock, line)
        return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls", action="store_true",
                    help="every client speaks TLS 1.3 (a fixed bench key's certificate)")
    args = ap.parse_args(argv)
    tls = bench_tls_context() if args.tls else None
    listener = open_listener(args.bind, args.port)
    with contextlib.suppress(KeyboardInterrupt):
        FloorServer(listener, tls).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
