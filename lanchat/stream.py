"""A socket's outgoing side: a bounded queue drained by its own writer thread.

Every connection that the daemon writes to -- hub clients, control-socket
clients, daemon links -- gets an :class:`Outbox`.  Whoever produces data (the
router thread fanning out a message, a reader thread answering a command) calls
:meth:`Outbox.put`, which never blocks: with nothing queued it makes one
non-blocking ``send`` (the common case, and no thread switch), otherwise it
appends to a list, so a broadcast never waits on a slow or dead receiver.  The
outbox's writer thread drains *everything* queued into one ``send`` -- under
load a writer wakes once for many messages, which is where the hub's throughput
comes from.

The writer thread is started on demand and exits after
``WRITER_IDLE_EXIT_S`` without work, so thousands of idle connections cost one
(reader) thread each, not two.

Ownership: the outbox never closes the socket.  When it gives up (the peer
stalled, the socket broke, or :meth:`close_with` finished) it shuts the socket
down, which wakes the connection's reader thread; the reader owns the socket
and does the cleanup.  That keeps one thread responsible for each teardown.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable, Iterator

from lanchat.framing import LineDecoder
from lanchat.lightthread import LightThread
from lanchat.limits import (
    MAX_OUTBOX_BYTES,
    SEND_STALL_TIMEOUT_S,
    WRITER_IDLE_EXIT_S,
)

log = logging.getLogger(__name__)

#: Bytes asked of ``recv`` at a time: large enough to take a burst of pipelined
#: lines in one call, small enough not to matter per connection.
RECV_BYTES = 65536

#: What a hub reader asks for while its connection is quiet (a read that fills
#: it switches the next one to RECV_BYTES).
RECV_SMALL_BYTES = 4096

#: ``send`` flags: never block, no SIGPIPE.  A plain int: or-ing the IntFlag
#: members costs 1.4 us each time, as much as the rest of a delivery's bookkeeping.
SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)

#: Seconds a final notice (goodbye, error) may take to leave before the socket
#: is shut down anyway.
FINAL_FLUSH_TIMEOUT_S = 2.0

#: How often a writer blocked on a full socket looks whether it was cut off
#: meanwhile (then what it was sending is dropped backlog: the notice goes next).
CUT_CHECK_S = 0.25


class Outbox:
    """Bounded byte queue for one socket, sent by a lazily started writer thread.

    Thread-safety: :meth:`put`, :meth:`close_with` and :meth:`close` may be
    called from any thread.  Only the writer thread sends on the socket.
    ``close_reason`` says why the outbox stopped (``None`` while open).

    A send that stays blocked for ``stall_timeout`` means the peer stopped
    reading.  With ``on_stall`` the writer calls it with that timeout (on the
    writer thread); if it closed the outbox -- typically :meth:`close_with` and
    a notice saying why, which waits for the peer like any cut's notice -- the
    writer sends what it queued.  Otherwise, and without ``on_stall``, the
    outbox gives up at once.  ``on_stall`` is dropped once the outbox closes, so
    that it can be a bound method of the outbox's owner without keeping a
    finished connection alive in a reference cycle.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        max_bytes: int = MAX_OUTBOX_BYTES,
        stall_timeout: float = SEND_STALL_TIMEOUT_S,
        on_stall: Callable[[float], None] | None = None,
    ) -> None:
        self._sock = sock
        self._name = name
        self._max_bytes = max_bytes
        self._stall_timeout = stall_timeout
        self._on_stall = on_stall
        # guards: _chunks, _queued, _writer, _closing, _sleeping, _on_stall, close_reason,
        # _taken_waiters.
        # A plain lock, not a Condition: put() runs once per receiver per fan-out,
        # so its cost is the hub's cost.  A sleeping writer waits on ``_wake``, a
        # binary semaphore that exactly one put() releases (the one that sees
        # ``_sleeping`` and clears it).
        self._lock = threading.Lock()
        self._wake = threading.Lock()
        self._wake.acquire()
        self._sleeping = False
        self._sending = False  # the writer thread is sending right now (outside the lock)
        self._chunks: list[bytes] = []
        self._queued = 0
        self._writer: LightThread | None = None
        self._closing = False
        self._final_timeout = FINAL_FLUSH_TIMEOUT_S
        # A cut (close_with without keep_queued) drops the batch in flight too; the
        # writer then starts the notice on a line of its own if it stopped mid-line.
        self._cut = False
        self._at_line_start = True  # the last byte sent ended a line
        self.close_reason: str | None = None
        # put_reply() callers waiting for the writer to take what is queued
        self._taken_waiters: list[threading.Event] = []
        #: True once the peer was cut off for not reading (a send stalled).
        self.stalled = False

    def put(self, data: bytes, *, reply: bool = False) -> bool:
        """Queue ``data`` for sending.  Never blocks on the network.

        Returns False, queuing nothing, if the outbox is closing or ``data``
        would take it past its bound: the caller should drop this receiver
        (typically with :meth:`close_with` and a notice).

        ``reply``: ``data`` answers a request of the peer's, so it is accepted
        whatever its size and not counted against the bound, which is for
        *unsolicited* data (notifications, fan-out) that a peer which stopped
        reading would let pile up.  A reply costs memory once, and only as fast
        as the peer asks: use :meth:`put_reply`, which holds the requester's
        thread until the writer has taken the reply.

        The fast path, for a connection with nothing queued: one non-blocking
        ``send`` right here, on the caller's thread, with no thread switch; only
        what the socket does not take goes to the writer.  It is made under the
        lock -- it cannot block, and one lock round instead of two is a third
        of the cost of a delivery (``put`` runs once per receiver per fan-out).
        """
        failed: str | None = None
        action: str | None = None
        with self._lock:
            if self._closing or (self._queued + len(data) > self._max_bytes and not reply):
                return False
            if self._chunks or self._sending:  # the writer has the socket: queue behind it
                self._chunks.append(data)
                if not reply:
                    self._queued += len(data)
                action = None if self._sending else self._kick()
            else:
                try:
                    sent = self._sock.send(data, SEND_FLAGS)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    failed = f"send failed: {exc.strerror or exc}"
                if failed is None:
                    if sent:
                        self._at_line_start = data[sent - 1] == 0x0A
                    if sent == len(data):
                        return True
                    rest = data[sent:]
                    self._chunks.append(rest)
                    if not reply:
                        self._queued += len(rest)
                    action = self._kick()
        if failed is not None:
            self._give_up(failed)
            return True  # the reader sees the broken socket and cleans up
        self._act(action)
        return True

    def put_reply(self, data: bytes) -> bool:
        """Queue the reply to a request, of any size; wait until the writer has taken it.

        The backpressure for replies: the requester's thread (a control
        connection's reader, which serves only that peer) does not read the next
        request while a reply still waits in the queue, so at most one reply is
        queued and one in flight, however many requests the peer pipelines.  The
        wait ends when the writer takes the reply or the outbox closes (a peer
        that stops reading is cut after ``stall_timeout``, as for any data).
        Returns False if the outbox was already closing.
        """
        if not self.put(data, reply=True):
            return False
        with self._lock:
            if not self._chunks or self._closing:
                return True
            taken = threading.Event()
            self._taken_waiters.append(taken)
        while not taken.wait(self._stall_timeout + self._final_timeout):
            with self._lock:  # a safety net: every path that empties the queue sets it
                if not self._chunks or self._closing:
                    break
        return True

    def _release_waiters(self) -> list[threading.Event]:
        """Under the lock: hand over the put_reply() waiters (the caller sets them unlocked)."""
        waiters, self._taken_waiters = self._taken_waiters, []
        return waiters

    def _kick(self) -> str | None:
        """Under the lock: get the writer going; returns "wake" if the caller must wake it.

        A new writer is started right here, under the lock, so that no one can
        see (and try to join) a writer that is not started yet.  That is safe:
        ``Thread.start`` only waits for the thread to begin, not for our lock.
        """
        if self._writer is None:
            self._writer = LightThread(self._run, name=f"{self._name}-w")
            self._writer.start()
            return None
        if self._sleeping:
            self._sleeping = False
            return "wake"
        return None

    def _act(self, action: str | None) -> None:
        if action == "wake":
            self._wake.release()

    def close_with(self, final: bytes | None, reason: str, *, keep_queued: bool = False,
                   grace: float | None = None) -> None:
        """Stop accepting data; send what is queued (if ``keep_queued``) and ``final``; shut down.

        Used for goodbyes (``keep_queued=True``) and for cutting off a slow
        receiver: its backlog, including a batch stalled part-way, is dropped so
        the notice goes out next.  The final flush may wait ``grace`` seconds for
        the peer to make room (default ``FINAL_FLUSH_TIMEOUT_S``).  Idempotent:
        only the first call has an effect.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._on_stall = None
            self.close_reason = reason
            if not keep_queued:
                self._chunks.clear()
                self._queued = 0
                self._cut = True
            if final:
                self._chunks.append(final)
                self._queued += len(final)
            self._stall_timeout = (grace if grace is not None
                                   else min(self._stall_timeout, self._final_timeout))
            action: str | None = "shutdown"
            if self._chunks or self._writer is not None:  # a writer (even mid-send) closes it
                action = self._kick()  # else: nothing to flush, no thread needed to close
            waiters = self._release_waiters()
        for taken in waiters:
            taken.set()
        if action == "shutdown":
            self._shutdown()
        else:
            self._act(action)

    def close(self, reason: str = "closed") -> None:
        """Shut down now, dropping anything queued."""
        self.close_with(None, reason)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the writer thread (if any) to finish."""
        with self._lock:
            writer = self._writer
        if writer is not None and writer.ident != threading.get_ident():
            writer.join(timeout)

    # -- the writer thread -------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        try:
            poller.register(self._sock, select.POLLOUT)
        except (ValueError, OSError):  # the socket was closed under us: nothing to send to
            with self._lock:
                self._closing = True
                self._on_stall = None
                self._chunks.clear()
                self._queued = 0
                waiters = self._release_waiters()
            for taken in waiters:
                taken.set()
            return
        while True:
            with self._lock:
                chunks = self._chunks
                closing = self._closing
                idle = not chunks and not closing
                if idle:
                    self._sleeping = True
                else:
                    self._chunks = []
                    self._queued = 0
                    self._sending = True
                    if self._cut and chunks and not self._at_line_start:
                        chunks.insert(0, b"\n")  # a cut stopped a line part-way
                        self._at_line_start = True
                droppable = not self._cut  # backlog now; dropped if a cut comes mid-send
                stall_timeout = self._stall_timeout
                waiters = self._release_waiters()
            for taken in waiters:
                taken.set()
            if idle:
                if not self._sleep():
                    return
                continue
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                try:
                    self._send_all(data, poller, stall_timeout, droppable)
                except TimeoutError:
                    self.stalled = True
                    with self._lock:
                        on_stall = self._on_stall
                    if on_stall is not None:
                        on_stall(stall_timeout)
                        with self._lock:
                            cut = self._closing
                        if cut:
                            continue  # the notice it queued goes next
                    self._give_up(f"stalled: nothing could be sent for {stall_timeout:g} s")
                    return
                except OSError as exc:
                    self._give_up(f"send failed: {exc.strerror or exc}")
                    return
                finally:
                    with self._lock:
                        self._sending = False
            if closing:
                with self._lock:
                    if self._chunks:  # close_with() raced with our drain
                        continue
                self._shutdown()
                return

    def _sleep(self) -> bool:
        """Wait for a put(); False means "idle too long: this writer thread ends"."""
        if self._wake.acquire(timeout=WRITER_IDLE_EXIT_S):
            return True
        with self._lock:
            if self._sleeping:  # nobody woke us: retire; a later put() starts a new writer
                self._sleeping = False
                self._writer = None
                return False
        # A put() cleared _sleeping just as we timed out; it releases _wake right
        # after its lock, and that release is ours to take.
        self._wake.acquire()
        return True

    def _send_all(self, data: bytes, poller: select.poll, stall_timeout: float,
                  droppable: bool) -> None:
        """Send all of ``data``; stop early if it is ``droppable`` and a cut came.

        Raises ``TimeoutError`` once nothing could be sent for ``stall_timeout``.
        """
        view = memoryview(data)
        waited = 0.0
        while view:
            try:
                sent = self._sock.send(view, SEND_FLAGS)
            except BlockingIOError:
                if droppable and self._cut:
                    return  # dropped backlog: the cut's notice is next
                if waited >= stall_timeout:
                    raise TimeoutError from None
                # only a droppable batch has a reason to look for a cut meanwhile
                rest = stall_timeout - waited
                step = min(CUT_CHECK_S, rest) if droppable else rest
                if not poller.poll(step * 1000):
                    waited += step
                continue
            waited = 0.0
            self._at_line_start = view[sent - 1] == 0x0A
            view = view[sent:]

    def _give_up(self, reason: str) -> None:
        with self._lock:
            self._closing = True
            self._on_stall = None
            if self.close_reason is None:
                self.close_reason = reason
            self._chunks.clear()
            self._queued = 0
            waiters = self._release_waiters()
        for taken in waiters:
            taken.set()
        log.debug("%s: %s", self._name, reason)
        self._shutdown()

    def _shutdown(self) -> None:
        # Already shut down or reset by the peer: then there is nothing left to wake.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


def read_frames(sock: socket.socket, decoder: LineDecoder) -> Iterator[bytes]:
    """Yield the frames arriving on ``sock`` until the peer closes it.

    Raises :class:`~lanchat.errors.FrameTooLong` for an oversized line and
    ``OSError`` for a broken socket; the caller decides what to tell the peer.
    An unfinished line at EOF is dropped (``decoder.eof()`` tells how much).
    """
    while True:
        data = sock.recv(RECV_BYTES)
        if not data:
            return
        yield from decoder.feed(data)
