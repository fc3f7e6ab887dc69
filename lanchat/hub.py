"""The chat hub: a threaded TCP server, and its UDP twin on the same port number.

The classic socket chat, grown up -- and still threaded, but without a thread
per connection.  ``hub-accept`` accepts TCP connections and hands each to one
of a small fixed group of I/O loops (:mod:`lanchat.hubloop`, IO_THREADS: about
one per core), whose thread reads it, carries out its commands, writes what
could not be sent at once and keeps its deadlines.  A client never writes to
other clients itself: it hands what it reads to the router, which stores it and
then hands each message to every receiver (:meth:`TcpConn.put` sends right
away when nothing is queued).  A client that stops reading fills only its own
queue, and is cut off with a notice when that is full; everyone else carries on.

Modules, imports pointing one way: :mod:`lanchat.hubsession` (a user's
commands and replies, no I/O), :mod:`lanchat.hubconn` (one TCP connection's
state and bytes), :mod:`lanchat.hubloop` (the I/O threads), :mod:`lanchat.hubudp`
(the UDP twin), and this module: the listener, the connection limits, shutdown.

Text mode (``nc HOST PORT``), JSON mode (a first line that is a JSON object)
and UDP datagrams all turn into the same :mod:`lanchat.commands`, handled by
one :class:`~lanchat.hubsession.Session` class whatever the transport.

Threads: ``hub-accept``, the ``hub-io-N`` loops, ``hub-udp`` (receives
datagrams, expires idle UDP clients), and one per daemon link handed over by a
hello (the link code runs on it).  The hub's lock guards only its set of
connections and their counts; no lock is held during socket I/O.

Limits (values and reasons in :mod:`lanchat.limits`): every connection has a
:class:`~lanchat.ratelimit.ConnectionLimiter` (``max_rate`` messages per
second, a generous fixed rate for other commands, a flooder is disconnected);
TCP connections are counted in total and per source address, and daemon links
apart from both, so a flood of clients cannot lock out peers.  A connection
over a client limit gets LINK_HELLO_GRACE_S to say it is a daemon, then one
line saying which limit it hit.  A connection holding an unfinished line for
LINE_TIMEOUT_S (slow loris) is dropped.  TCP keepalive reaps dead peers.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any

from lanchat import textmode
from lanchat.commands import Hello
from lanchat.hubconn import LINK, LinkAcceptor, TcpConn
from lanchat.hubloop import IoLoop
from lanchat.hubsession import HubBackend
from lanchat.hubudp import UdpEndpoint
from lanchat.lightthread import LightThread
from lanchat.limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_RATE,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_S,
    KEEPALIVE_INTERVAL_S,
    LINE_TIMEOUT_S,
    MAX_DAEMON_LINKS,
    MAX_IO_THREADS,
    MAX_LINK_HANDSHAKES,
    MAX_LINK_HANDSHAKES_PER_IP,
    MAX_PENDING_OVER_LIMIT,
    MAX_TRACKED_SOURCES,
    NICK_TIMEOUT_S,
    SEND_STALL_TIMEOUT_S,
    SOURCE_RATE_FACTOR,
    TLS_HANDSHAKE_TIMEOUT_S,
    UDP_IDLE_TIMEOUT_S,
)
from lanchat.ratelimit import SourceBuckets
from lanchat.stream import SEND_FLAGS

__all__ = ["Hub", "HubBackend", "LinkAcceptor", "io_threads"]

log = logging.getLogger(__name__)

#: Seconds the accept loop waits after running out of file descriptors (EMFILE)
#: before it tries again, instead of spinning on the error.
ACCEPT_BACKOFF_S = 0.1

#: Seconds a clean shutdown waits for each client's goodbye to leave.
SHUTDOWN_FLUSH_S = 2.0


def io_threads() -> int:
    """How many I/O loops: one per core this process may run on, at most MAX_IO_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_IO_THREADS, cores))


def _tune(sock: socket.socket) -> None:
    """Low latency, and keepalive so a vanished peer is reaped (chat clients may idle for hours)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # The knobs are Linux's; elsewhere the system's (hours-long) defaults apply.
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)



class Hub:
    """The TCP (and UDP) chat server.

    ``port=0`` picks a free port (read it back from :attr:`port`); the UDP
    endpoint binds the same port number.  ``link_acceptor`` receives
    connections that introduce themselves as daemons.  :meth:`close` says
    goodbye to every client, joins every thread, and is idempotent.

    Limits: ``max_rate`` messages per second per connection (0 = unlimited;
    :meth:`set_max_rate` changes it for every connection, e.g. on SIGHUP),
    ``max_connections`` chat clients over TCP, ``max_connections_per_ip`` of
    them from one address (0 = unlimited); ``line_timeout`` and
    ``nick_timeout`` are the reader's deadlines, ``udp_idle_timeout`` how long a
    silent UDP client is remembered, ``stall_timeout`` how long one send to a
    client may stay blocked before it is cut off (seconds); ``udp_stranger_scale``
    multiplies the rates of answers to addresses that are not UDP clients
    (``UDP_UNREGISTERED_*``; tests only).  ``io_threads`` is how many I/O loops
    serve the TCP connections (default: :func:`io_threads`).  ``tls`` (a server
    context, :func:`lanchat.tlsid.server_context`) serves TLS clients on the same
    port, each handshake within ``tls_handshake_timeout``; ``plain_clients``: see
    :class:`lanchat.hubsession.SessionHub`.
    """

    def __init__(self, backend: HubBackend, *, name: str, bind: str = "0.0.0.0",
                 port: int = 0, udp: bool = True,
                 link_acceptor: LinkAcceptor | None = None,
                 max_rate: float = DEFAULT_MAX_RATE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
                 line_timeout: float = LINE_TIMEOUT_S,
                 nick_timeout: float = NICK_TIMEOUT_S,
                 udp_idle_timeout: float = UDP_IDLE_TIMEOUT_S,
                 stall_timeout: float = SEND_STALL_TIMEOUT_S,
                 udp_stranger_scale: float = 1.0,
                 key: bytes | None = None, plain_clients: bool | None = None,
                 tls: ssl.SSLContext | None = None,
                 tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT_S,
                 io_threads: int | None = None) -> None:
        if max_rate < 0 or max_connections < 1 or max_connections_per_ip < 0:
            raise ValueError("max_rate and max_connections_per_ip must be >= 0, "
                             "max_connections >= 1")
        self.backend = backend
        self.name = name
        #: The shared secret (lanchat.auth): JSON clients must prove it, and text-mode
        #: and UDP clients -- who cannot -- are refused unless ``plain_clients``.
        self.key = key
        self.plain_clients = plain_clients
        #: TLS on the same port (issue 14): each connection's first bytes say whether it
        #: is TLS (see lanchat.hubconn).  None: plain only, greeted at once.
        self.tls = tls
        self.tls_handshake_timeout = tls_handshake_timeout
        self.link_acceptor = link_acceptor
        self.max_rate = float(max_rate)  # read by every reader; a float store is atomic
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.line_timeout = line_timeout
        self.nick_timeout = nick_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.stall_timeout = stall_timeout
        self.udp_stranger_scale = udp_stranger_scale
        # guards: _sessions, _closed, the counts below and each session's ``kind``
        self._lock = threading.Lock()
        self._emptied = threading.Condition(self._lock)  # _sessions became empty
        self._sessions: set[TcpConn] = set()
        self._closed = False
        self._clients = 0                   # sessions of kind "client"
        self._per_ip: dict[str, int] = {}   # "client" sessions per source address
        self._pending = 0                   # sessions of kind "pending"
        self._links = 0                     # sessions of kind "link"
        # sessions of kind "handshake" (when each began, monotonic), and per address
        self._handshakes: dict[TcpConn, float] = {}
        self._handshakes_per_ip: dict[str, int] = {}
        self._counter = itertools.count(1)
        # Message buckets per source address, shared by all its connections (TCP and
        # UDP).  guards: _sources (its own lock: taken once per message, by any reader)
        self._sources_lock = threading.Lock()
        self._sources = SourceBuckets(self.max_rate * SOURCE_RATE_FACTOR,
                                      max_sources=MAX_TRACKED_SOURCES)
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((bind, port))
        self._listener.listen(512)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._udp: UdpEndpoint | None = None
        if udp:
            usock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                usock.bind((bind, self.address[1]))
            except OSError:
                usock.close()
                self._listener.close()
                raise
            self._udp = UdpEndpoint(self, usock)
        count = io_threads if io_threads is not None else globals()["io_threads"]()
        self._loops = [IoLoop(f"hub-io-{i}") for i in range(max(1, count))]
        self._next_loop = itertools.cycle(self._loops)
        self._link_threads: set[LightThread] = set()  # guarded by _lock
        self._stopping = threading.Event()  # set by close(): the accept thread ends
        self._accept_thread = threading.Thread(target=self._accept_loop, name="hub-accept",
                                               daemon=False)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def udp_port(self) -> int | None:
        return self.address[1] if self._udp is not None else None

    @property
    def client_count(self) -> int:
        """Chat clients connected: TCP and UDP, not daemon links or unfinished handshakes.

        A peer daemon's link arrives through the hub like a client, but is a
        link (``lanchat status`` shows the two apart).
        """
        with self._lock:
            tcp = self._clients
        # len() of a dict owned by the UDP thread: one atomic read, a snapshot.
        return tcp + (len(self._udp.clients) if self._udp is not None else 0)

    def source_allows(self, host: str, now: float) -> bool:
        """Take a message token from ``host``'s bucket: SOURCE_RATE_FACTOR x ``max_rate``."""
        rate = self.max_rate * SOURCE_RATE_FACTOR
        with self._sources_lock:
            if self._sources.rate != rate:  # max_rate reloaded
                self._sources = SourceBuckets(rate, max_sources=MAX_TRACKED_SOURCES)
            return self._sources.take(host, now)

    def set_max_rate(self, rate: float) -> None:
        """Change the per-connection message rate (0 = unlimited) for every connection."""
        if rate < 0:
            raise ValueError("max_rate must be >= 0")
        self.max_rate = float(rate)

    def start(self) -> None:
        for loop in self._loops:
            loop.start()
        self._accept_thread.start()
        if self._udp is not None:
            self._udp.thread.start()

    def _accept_loop(self) -> None:
        """Accept, count and hand each connection to the next loop, as fast as loops take them.

        Room in a loop's backlog (ADOPT_BACKLOG) is taken before ``accept``: while
        the loops are behind, new connections wait in the kernel's listen queue,
        not as sockets we hold and nobody serves.
        """
        loop = next(self._next_loop)
        while loop.make_room(self._stopping):
            try:
                sock, address = self._listener.accept()
            except OSError as exc:
                if self._closed:
                    loop.release_room()
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept connections: %s; retrying", exc.strerror)
                    time.sleep(ACCEPT_BACKOFF_S)
                loop.release_room()
                continue
            if self._serve(sock, address, loop):
                loop = next(self._next_loop)
            else:
                loop.release_room()
            if self._closed:
                return

    def _serve(self, sock: socket.socket, address: tuple[Any, ...], loop: IoLoop) -> bool:
        """Count a new connection in and hand it to ``loop``; False if it was refused."""
        try:
            _tune(sock)
        except OSError as exc:  # reset before we got to it
            log.debug("accepted %s but could not set it up: %s", address, exc)
            sock.close()
            return False
        session = TcpConn(self, loop, sock, address, next(self._counter))
        with self._lock:
            if self._closed:
                sock.close()
                return False
            refusal = self._count_in(session)
            if session.kind is not None:
                self._sessions.add(session)
        if session.kind is None:
            assert refusal is not None
            self._refuse_now(sock, address, refusal)
            return False
        loop.adopt(session)
        return True

    def _count_in(self, session: TcpConn) -> str | None:
        """Under the lock: give a new connection its kind; the refusal text if over a limit.

        Over a client limit it becomes "pending" (it may yet be a daemon) while
        there is room for that; otherwise its kind stays None: refuse it now.
        """
        host = session.host
        per_ip = self.max_connections_per_ip
        if self._clients >= self.max_connections:
            session.refusal = ("server-full",
                               f"server full (limit {self.max_connections} connections)")
        elif per_ip and self._per_ip.get(host, 0) >= per_ip:
            session.refusal = ("too-many-connections",
                               f"too many connections from your address (limit {per_ip})")
        else:
            session.kind = "client"
            self._clients += 1
            self._per_ip[host] = self._per_ip.get(host, 0) + 1
            return None
        if self._pending < MAX_PENDING_OVER_LIMIT and self._links < MAX_DAEMON_LINKS:
            session.kind = "pending"
            self._pending += 1
        return session.refusal[1]

    def _count_out(self, session: TcpConn) -> None:
        """Under the lock: undo :meth:`_count_in` (or :meth:`become_link`)."""
        if session.kind == "client":
            self._clients -= 1
            left = self._per_ip.get(session.host, 1) - 1
            if left > 0:
                self._per_ip[session.host] = left
            else:
                self._per_ip.pop(session.host, None)
        elif session.kind == "pending":
            self._pending -= 1
        elif session.kind == "link":
            self._links -= 1
        elif session.kind == "handshake":
            del self._handshakes[session]
            left = self._handshakes_per_ip[session.host] - 1
            if left > 0:
                self._handshakes_per_ip[session.host] = left
            else:
                del self._handshakes_per_ip[session.host]
        session.kind = None

    def become_handshake(self, session: TcpConn) -> str | None:
        """``session`` says it is a daemon: count it as a link handshake, not as a client.

        A handshake holds no link slot -- only a proven daemon does (see
        :meth:`become_link`) -- and has LINK_HANDSHAKE_TIMEOUT_S to finish.  At
        most MAX_LINK_HANDSHAKES_PER_IP run from one address (the refusal text
        otherwise) and MAX_LINK_HANDSHAKES in all: a newcomer past that evicts
        the oldest, so a crowd of connections that never finish their handshake
        delays a real daemon (milliseconds from hello to proof) at most briefly.
        """
        evicted: TcpConn | None = None
        with self._lock:
            if session.kind in ("handshake", "link"):
                return None
            host = session.host
            per_ip = self._handshakes_per_ip.get(host, 0)
            if per_ip >= MAX_LINK_HANDSHAKES_PER_IP:
                return (f"too many daemon handshakes from your address "
                        f"(limit {MAX_LINK_HANDSHAKES_PER_IP})")
            if len(self._handshakes) >= MAX_LINK_HANDSHAKES:
                evicted = min(self._handshakes, key=self._handshakes.__getitem__)
                self._count_out(evicted)
            self._count_out(session)
            session.kind = "handshake"
            self._handshakes[session] = time.monotonic()
            self._handshakes_per_ip[host] = per_ip + 1
        if evicted is not None:
            log.info("%r: evicted from its unfinished link handshake by a newer one", evicted)
            with contextlib.suppress(OSError):
                evicted.sock.shutdown(socket.SHUT_RDWR)  # its link thread ends the handshake
        return None

    def become_link(self, session: TcpConn) -> bool:
        """Count ``session``'s finished handshake as a link; False if links are full.

        Also False if the handshake was evicted meanwhile (it is being closed).
        """
        with self._lock:
            if session.kind == "link":
                return True
            if session.kind != "handshake" or self._links >= MAX_DAEMON_LINKS:
                return False
            self._count_out(session)
            session.kind = "link"
            self._links += 1
            return True

    @staticmethod
    def _refuse_now(sock: socket.socket, address: tuple[Any, ...], text: str) -> None:
        """One line and close, without ever blocking the accept loop."""
        log.info("refused a connection from %s: %s", address[0], text)
        with contextlib.suppress(OSError):
            sock.send(textmode.error(text), SEND_FLAGS)
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def release(self, session: TcpConn) -> None:
        """Stop counting ``session`` against any limit (it is ending)."""
        with self._lock:
            self._count_out(session)

    def forget(self, session: TcpConn) -> None:
        """``session`` is closed: it is no longer the hub's."""
        with self._lock:
            self._sessions.discard(session)
            self._count_out(session)
            if not self._sessions:
                self._emptied.notify_all()

    def run_link(self, session: TcpConn, hello: Hello, pending: list[bytes]) -> None:
        """Hand a daemon's connection to the link acceptor, on a thread of its own.

        The link code blocks (its handshake, then the link's reader), so it never
        runs on an I/O loop.  The thread ends with the link; then the connection
        is closed and forgotten.
        """
        acceptor = self.link_acceptor
        assert acceptor is not None

        def run() -> None:
            try:
                acceptor.accept_link(session.link_socket(), session.address, hello,
                                     session.decoder,
                                     pending, admit=session.admit_link)
            except OSError as exc:
                log.debug("%r: link ended: %s", session, exc)
            except Exception:  # a bug must cost this link, never the hub
                log.exception("%r: unexpected error in a link; dropping it", session)
            finally:
                self.release(session)
                session.sock.close()
                self.forget(session)
                with self._lock:
                    self._link_threads.discard(thread)

        thread = LightThread(run, name=f"hub-link-{session.label}")
        with self._lock:
            self._link_threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a thread: drop this link
            log.warning("cannot serve the link of %r: %s", session, exc)
            with self._lock:
                self._link_threads.discard(thread)
            self.release(session)
            session.sock.close()
            self.forget(session)

    def close(self, reason: str = "server shutting down",
              timeout: float | None = None) -> None:
        """Stop accepting, say goodbye to everyone, and join all threads.

        Goodbyes get SHUTDOWN_FLUSH_S (+ 2) seconds in all to leave, or
        ``timeout`` if less; then the loops close every connection still open,
        and a link thread still running has its socket shut down and one more
        second.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions)
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        if self._accept_thread.is_alive():
            self._accept_thread.join()
        self._listener.close()
        for session in sessions:
            session.goodbye(reason)
        flush = SHUTDOWN_FLUSH_S + 2 if timeout is None else min(timeout, SHUTDOWN_FLUSH_S + 2)
        deadline = time.monotonic() + flush
        with self._lock:
            while (any(s.state != LINK for s in self._sessions)
                   and time.monotonic() < deadline):
                self._emptied.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        for loop in self._loops:
            loop.stop()
        with self._lock:
            links = list(self._link_threads)
            stuck = [s for s in self._sessions if s.state == LINK]
        for thread in links:
            thread.join(max(0.0, deadline - time.monotonic()))
        for session in stuck:  # a handed-over link still running: force it, all at once
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RDWR)
        end = time.monotonic() + 1.0
        for thread in links:
            thread.join(max(0.0, end - time.monotonic()))
        for loop in self._loops:
            loop.thread.join(max(0.0, end - time.monotonic()) + 1.0)
        if self._udp is not None:
            self._udp.close()
            if self._udp.thread.is_alive():
                self._udp.thread.join()
            self._udp.sock.close()
