"""The hub's I/O loops: a few threads, each serving its share of the TCP connections.

The event-loop-group design (Netty's, nginx's workers, ngircd's loop) on
threads: the hub starts IO_THREADS loops (about one per core), hands each new
connection to one of them, and that loop's thread does all of the
connection's reads, its commands, its queued writes and its deadlines through
one ``selectors`` loop.  An idle connection costs its socket and a
:class:`~lanchat.hubconn.TcpConn` (a few KiB), not a thread.

What may block stays off the loops: the router (which stores a message
before anyone sees it) has its thread, links theirs (a daemon's hello hands
its socket to a thread of its own), the UDP twin, discovery and the control
socket theirs.  A command that asks the router for an answer (a join, a nick
change) waits for it on the loop -- a millisecond; publishing only queues, and
a command after something its connection said waits until the router has
stored that (``Router.barrier``), so that no answer overtakes those lines.

Other threads reach a loop through :meth:`IoLoop.request`: a connection that
needs the loop's attention (output the socket did not take at once, a cut, a
goodbye) is queued and the loop woken through a socket pair, once per batch of
requests.  Timers are one heap of (due, connection) per loop; a connection
keeps only its earliest deadline in it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any

from lanchat.errors import ClosedError, LanchatError
from lanchat.hubconn import TcpConn
from lanchat.lightthread import LightThread
from lanchat.model import Draft

log = logging.getLogger(__name__)

#: New connections handed to a loop and not yet taken up by it, at most: past this the
#: accept thread waits, and further connections wait in the kernel's listen backlog.  A
#: loop busy with a storm of connections then holds a bounded number of sockets it has not
#: served yet, instead of every connection the accept thread could take meanwhile.
ADOPT_BACKLOG = 64

#: Seconds an accept thread waiting for a loop's backlog checks whether it should stop.
ADOPT_WAIT_S = 0.1

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class IoLoop:
    """One I/O thread and the connections it owns.

    Thread-safety: :meth:`adopt`, :meth:`request` and :meth:`stop` may be called
    from any thread; everything else runs on the loop's thread.  guards
    (``_lock``): ``_requests``, ``_adopting``, ``_woken``, ``_stopping``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, _READ, None)
        self._lock = threading.Lock()
        self._requests: deque[TcpConn] = deque()
        self._adopting: deque[TcpConn] = deque()
        self._adopt_room = threading.Semaphore(ADOPT_BACKLOG)
        self._woken = False
        self._stopping = False
        self._timers: list[tuple[float, int, TcpConn]] = []
        self._stale = 0  # timers in the heap whose connection is gone
        # what this round's connections said: (draft, source, done), published at its end
        self._said: list[tuple[Draft, object | None, Any]] = []
        self._backend: Any = None  # the router, once a connection said something
        self._seq = itertools.count()
        self.conns: set[TcpConn] = set()  # loop thread only (len() read by the hub)
        self._ident: int | None = None
        self.thread = LightThread(self._run, name=name)

    def start(self) -> None:
        self.thread.start()

    # -- any thread --------------------------------------------------------------

    def on_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def make_room(self, stop: threading.Event) -> bool:
        """Wait until the loop may be handed one more connection; False if ``stop`` is set.

        The accept thread calls it before :meth:`adopt`: a loop holds at most
        ADOPT_BACKLOG connections it has not taken up yet.
        """
        while not self._adopt_room.acquire(timeout=ADOPT_WAIT_S):
            if stop.is_set():
                return False
        return True

    def release_room(self) -> None:
        """Give back the room :meth:`make_room` took, for a connection not handed over."""
        self._adopt_room.release()

    def adopt(self, conn: TcpConn) -> None:
        """Take over a new connection (the accept thread hands it over, after make_room)."""
        with self._lock:
            self._adopting.append(conn)
            wake = not self._woken
            self._woken = True
        if wake:
            self._wake()

    def request(self, conn: TcpConn) -> None:
        """``conn`` needs the loop: output is waiting, or it is closing."""
        if threading.get_ident() == self._ident:
            self._requests.append(conn)  # served at the end of this round, no wake-up
            return
        with self._lock:
            self._requests.append(conn)
            wake = not self._woken
            self._woken = True
        if wake:
            self._wake()

    def stop(self) -> None:
        """Close every connection still here and end the thread (see :meth:`_run`)."""
        with self._lock:
            self._stopping = True
            self._woken = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
            self._wake_w.send(b"\0")

    # -- loop thread ----------------------------------------------------------------

    def set_interest(self, conn: TcpConn, read: bool, write: bool) -> None:
        if conn not in self.conns:
            return
        # selectors needs some interest: a closing connection with nothing left to send
        # is closed before it gets here, so "neither" is only a safe fallback.
        events = (_READ if read or not write else 0) | (_WRITE if write else 0)
        conn.writing = write
        if events == conn.events:
            return
        conn.events = events
        try:
            self._sel.modify(conn.fd, events, conn)
        except (KeyError, ValueError, OSError) as exc:
            log.debug("%r: cannot change what we wait for: %s", conn, exc)

    def schedule(self, conn: TcpConn, due: float) -> None:
        if conn.timer_at is None or due < conn.timer_at:
            conn.timer_at = due
            heapq.heappush(self._timers, (due, next(self._seq), conn))

    def publish_later(self, conn: TcpConn, drafts: list[Draft], done: Any) -> None:
        """Queue ``drafts`` of ``conn`` for :meth:`_publish` at the end of this round."""
        self._backend = conn.hub.backend
        self._said.extend((d, conn, done) for d in drafts)

    def flush_said(self) -> None:
        """Publish what this round said so far (before a command or a leave that follows it)."""
        if self._said:
            self._publish()

    def _publish(self) -> None:
        """Hand the round's messages to the router: one inbox operation, one commit.

        Waits only while the router's inbox is full (back-pressure onto the loop,
        whose connections then wait in their sockets).  A router that is gone or
        stuck loses this round's messages; their senders are told.
        """
        said, self._said = self._said, []
        try:
            self._backend.publish_all(said)
        except LanchatError as exc:
            if not isinstance(exc, ClosedError):
                log.warning("%s: the router did not take %d message(s): %s", self.name,
                            len(said), exc)
            for _, _, done in said:
                with contextlib.suppress(Exception):
                    done(None, exc)

    def drop(self, conn: TcpConn) -> None:
        """Stop watching ``conn`` (closed, or handed to a link thread)."""
        if conn in self.conns:
            self.conns.discard(conn)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.fd)
        self.unschedule(conn)

    def unschedule(self, conn: TcpConn) -> None:
        """``conn`` has no deadline left (or is gone): its timer, if any, is stale."""
        if conn.timer_at is not None:
            conn.timer_at = None
            self._stale += 1
            if self._stale > max(64, len(self._timers) // 2):
                self._compact()

    def _compact(self) -> None:
        """Drop the stale timers: of connections that are gone (each holds its connection),
        or that have no deadline left.

        A storm of connections that close before their deadline (a nickname
        prompt's is two minutes) would otherwise keep every one of them alive
        in the heap until then; and every client that chose a nickname would
        leave its prompt's timer there as long (~100 B each: 0.5 MiB for 5,000).
        """
        self._timers = [t for t in self._timers if t[2].timer_at == t[0] and t[2] in self.conns]
        heapq.heapify(self._timers)
        self._stale = 0

    def _run(self) -> None:
        self._ident = threading.get_ident()
        try:
            while not self._round():
                pass
        except Exception:  # a bug here would strand every connection of this loop
            log.exception("%s: unexpected error; closing its connections", self.name)
        finally:
            for conn in list(self.conns):
                with contextlib.suppress(Exception):
                    conn.close_now()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _round(self) -> bool:
        """One wait and what it brought; True when the loop is to end."""
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for key, events in self._sel.select(timeout):
            conn = key.data
            if conn is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_r.recv(4096)
                continue
            if events & _WRITE and conn.writing and conn in self.conns:
                conn.on_writable()
            if events & _READ and conn in self.conns:
                conn.on_readable()
        if self._said:
            self._publish()
        with self._lock:
            self._woken = False
            adopting, self._adopting = self._adopting, deque()
            stopping = self._stopping
            requests = self._requests
            self._requests = deque()
        for _ in adopting:
            self._adopt_room.release()
        if stopping:
            for conn in adopting:  # never served: closed with the others
                conn.close_now()
            return True
        for conn in adopting:
            self._adopt(conn)
        self._serve(requests)
        self._fire_timers()
        return False

    def _serve(self, requests: deque[TcpConn]) -> None:
        seen: set[TcpConn] = set()
        while requests:
            conn = requests.popleft()
            if conn in seen:
                continue
            seen.add(conn)
            if conn in self.conns:
                conn.service()
            if not requests:  # service() may have queued more, and so may other threads
                with self._lock:
                    requests, self._requests = self._requests, deque()

    def _adopt(self, conn: TcpConn) -> None:
        try:
            conn.sock.setblocking(False)
            self._sel.register(conn.fd, _READ, conn)
            conn.events = _READ
        except (ValueError, OSError) as exc:
            log.debug("%r: cannot watch it: %s", conn, exc)
            conn.close_now()
            return
        self.conns.add(conn)
        try:
            conn.start()
        except Exception:
            log.exception("%r: cannot start it", conn)
            conn.close_now()

    def _fire_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, _, conn = heapq.heappop(timers)
            if conn.timer_at != due or conn not in self.conns:
                continue  # stale: moved, or the connection is gone
            conn.on_timer(now)
