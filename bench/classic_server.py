"""The classic socket chat server: the baseline every lanchat figure is compared with.

This is deliberately the textbook design (the one in countless tutorials): one thread per
client, one global lock, a list of clients, and a broadcast that calls blocking ``sendall`` on
every other client *while holding the lock*.  It is correct and simple, and it has the two
properties the benchmarks are meant to expose: every broadcast is serialised behind one lock,
and one client that stops reading blocks ``sendall`` and so stalls the whole room.

It speaks the hub's text mode closely enough for the load generator (HACKING.md, "The hub's
wire"): a greeting of ``* `` lines, ``* Choose a nickname:``, the client's nick, ``* Welcome,
NICK! ...``, then ``[HH:MM:SS] nick: text`` to everyone else in the room.  ``/join ROOM`` moves
the client to another room (so idle connections can sit outside the measured room) and
``/quit`` leaves.  Nicks are not checked for uniqueness: the generator picks unique ones.

Sockets are TCP_NODELAY, like lanchat's: the measurement is of the design, not of Nagle's
algorithm.  With ``--nagle`` (the textbook default) a broadcast of small lines waits on the
receivers' delayed ACKs: on this project's 2-core machine that made the latency scenario's
p50 8.6 ms and p99 18 ms instead of 0.8 and 2.9 -- far from the 1.5 ms p99 the issue measured
for this design, which evidently had it off too.

Run: ``python bench/classic_server.py --port 0``; prints ``listening on 127.0.0.1:PORT``.
Loopback only by default; it is a benchmark baseline, not a server to expose.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import signal
import socket
import sys
import threading
import time

log = logging.getLogger(__name__)

#: Longest line accepted from a client; a longer one drops the client (as the hub does).
MAX_LINE_BYTES = 32 * 1024


class Client:
    """One connected client; its thread is the only reader of ``sock``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.nick = ""
        self.room = "lobby"


class ClassicServer:
    """Thread per client; ``lock`` guards ``clients`` *and* is held across every send."""

    def __init__(self, listener: socket.socket, *, nodelay: bool = True) -> None:
        self.listener = listener
        self.nodelay = nodelay
        self.lock = threading.Lock()  # guards clients; held during broadcast sendall (the point)
        self.clients: list[Client] = []

    def serve_forever(self) -> None:
        while True:
            try:
                sock, _addr = self.listener.accept()
                if self.nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)
                continue
            t = threading.Thread(target=self.handle, args=(sock,), daemon=True)
            t.start()

    def broadcast(self, sender: Client, line: bytes) -> None:
        with self.lock:
            for c in self.clients:
                if c is sender or c.room != sender.room:
                    continue
                # blocking, under the lock: the classic design.  A failed client is left
                # for its own reader thread to notice and remove.
                with contextlib.suppress(OSError):
                    c.sock.sendall(line)

    def handle(self, sock: socket.socket) -> None:
        client = Client(sock)
        f = sock.makefile("rb")
        try:
            sock.sendall(b"* classic chat server -- welcome!\n* Choose a nickname:\n")
            line = f.readline(MAX_LINE_BYTES)
            nick = line.decode("utf-8", "replace").strip()
            if not nick:
                return
            client.nick = nick
            with self.lock:
                others = [c.nick for c in self.clients if c.room == client.room]
                self.clients.append(client)
            who = ", ".join(others[:10]) if others else "nobody yet"
            sock.sendall(
                f"* Welcome, {nick}! You are in #{client.room} with {who}.\n".encode()
            )
            while True:
                raw = f.readline(MAX_LINE_BYTES)
                if not raw or not raw.endswith(b"\n"):
                    return
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if text == "/quit":
                    return
                if text.startswith("/join "):
                    client.room = text[6:].strip() or "lobby"
                    sock.sendall(f"* You joined #{client.room}\n".encode())
                    continue
                stamp = time.strftime("%H:%M:%S")
                self.broadcast(client, f"[{stamp}] {nick}: {text}\n".encode())
        except OSError:
            pass
        finally:
            with self.lock:
                if client in self.clients:
                    self.clients.remove(client)
            f.close()
            sock.close()


def raise_nofile() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (thousands of connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_listener(bind: str, port: int) -> socket.socket:
    """A reference server's start: file limit raised, listening, its port printed on stdout
    (``listening on HOST:PORT``, what bench/servers.py waits for), SIGTERM exits."""
    raise_nofile()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind, port))
    listener.listen(4096)
    host, port = listener.getsockname()
    sys.stdout.write(f"listening on {host}:{port}\n")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return listener


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--nagle", action="store_true",
                    help="leave Nagle's algorithm on (the textbook default; slow on small lines)")
    args = ap.parse_args(argv)
    threading.stack_size(256 * 1024)  # 5,000 threads: keep the address space modest
    listener = open_listener(args.bind, args.port)
    with contextlib.suppress(KeyboardInterrupt):
        ClassicServer(listener, nodelay=not args.nagle).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
