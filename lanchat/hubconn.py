"""One TCP connection of the hub, driven by an I/O loop (:mod:`lanchat.hubloop`).

A :class:`TcpConn` is a :class:`~lanchat.hubsession.Session` plus what a
non-blocking socket needs: a line decoder for what arrives, a bounded queue for
what leaves, its deadlines, and the state of its conversation (nickname prompt,
text mode, JSON mode and its challenge, or a connection over a client limit
that may only be a daemon).  It owns no thread: its loop calls
:meth:`on_readable`, :meth:`on_writable` and :meth:`on_timer`, always on the
loop's thread, and everything it reads is handled right there.

Sending.  Anyone may call :meth:`put` (the router thread fanning out, the loop
answering a command): with nothing queued it makes one non-blocking ``send``
on the caller's thread -- no hand-off in the common case -- and queues only
what the socket did not take, asking the loop to finish it (``want_write``).
A receiver whose queue passes MAX_OUTBOX_BYTES, or whose queue made no progress
for ``stall_timeout``, is cut off: its backlog is dropped and a notice queued,
which waits up to CUT_NOTICE_GRACE_S for the client to read on.

One port for all (issue 14).  On a hub with a TLS context the conversation
starts in the ``sniff`` state: the first bytes decide (:mod:`lanchat.sniff`).
A text user (``nc``) waits for the greeting while TLS and JSON clients speak
first, so silence for FIRST_BYTE_GRACE_S means a text user, who is greeted
then.  A ClientHello starts the ``tls-handshake`` state: an ``ssl.SSLObject``
on two memory BIOs (no ``SSLSocket``: the loop never blocks, and the bytes
read to decide are simply written into the incoming BIO, so ``ssl`` sees the
ClientHello whole), driven by the loop's reads and writes, within
``tls_handshake_timeout``; a client that stalls in it is dropped and frees its
slot.  Then the connection is a text or JSON client like any other: bytes
enter through :meth:`_raw_recv` and leave through :meth:`_raw_send`, which
decrypt and encrypt.  Ciphertext the socket did not take (``_tls_wait``) is
sent before any new record and counts as unsent output, so the loop keeps
writing until it is gone; at most TLS_PLAIN_PER_SEND bytes of plaintext are
encrypted ahead of the socket.  Anything else that starts with a TLS record
byte is closed at once.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import threading
import time
from typing import Any, Protocol, cast

from lanchat import auth, sniff, textmode, wire
from lanchat.commands import Hello, Quit, Say
from lanchat.errors import (
    ClosedError,
    FrameTooLong,
    LanchatError,
    NickInUse,
    RemoteProtocolError,
    ValidationError,
)
from lanchat.framing import LineDecoder, decode_utf8, loads_line
from lanchat.hubsession import (
    SECRET_REQUIRED,
    TLS_REQUIRED,
    Flooding,
    HubBackend,
    Session,
    TimedOut,
    host_of,
    plain_refused,
)
from lanchat.limits import (
    CUT_NOTICE_GRACE_S,
    FIRST_BYTE_GRACE_S,
    LINK_HELLO_GRACE_S,
    MAX_FRAME_BYTES,
    MAX_NICK_ATTEMPTS,
    MAX_OUTBOX_BYTES,
)
from lanchat.model import Draft
from lanchat.stream import FINAL_FLUSH_TIMEOUT_S, RECV_BYTES, SEND_FLAGS
from lanchat.tlsid import TlsSocket

log = logging.getLogger(__name__)

#: Protocol errors (bad JSON, unknown frame types) a JSON client may make before
#: it is disconnected: enough for a buggy client to log its mistakes, too few to
#: make the hub busy answering garbage.
MAX_PROTOCOL_ERRORS = 20

#: Most plaintext a TLS connection encrypts ahead of its socket: once the socket has not
#: taken a batch of records, no more is encrypted until it has (four full records).
TLS_PLAIN_PER_SEND = 64 * 1024
#: What a connection has in flight when it has nothing: one shared empty view (a memoryview
#: is ~180 bytes; one per idle connection was ~0.9 MiB for 5,000 of them).
NOTHING_IN_FLIGHT = memoryview(b"")

# Conversation states.
SNIFF = "sniff"          # waiting for the first bytes: TLS, or plain text/JSON?
HANDSHAKE = "tls-handshake"  # a TLS handshake in progress
GREETING = "greeting"    # prompted for a nickname (or a JSON hello)
PENDING = "pending"      # over a client limit: it may only be a daemon's hello
AUTH = "auth"            # a JSON client was challenged for the shared secret
TEXT = "text"            # a text-mode user
JSON = "json"            # a JSON-mode user
LINK = "link"            # handed to the link acceptor, on a thread of its own
CLOSED = "closed"


class PeekableTls(TlsSocket):
    """A :class:`~lanchat.tlsid.TlsSocket` that also answers ``recv(n, MSG_PEEK)``.

    A daemon's hello may arrive over the hub's TLS; the link code reads its handshake
    up to one line's end with ``MSG_PEEK`` (``LinkManager._check_auth``), which plain
    ``TlsSocket`` refuses.  Plaintext peeked is kept and returned by the next reads.
    One reader thread (the link's) reads it; writers as ``TlsSocket`` allows.
    """

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        super().__init__(sock, obj, incoming, outgoing)
        self._peeked = b""  # the reader's

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            if not self._peeked:
                self._peeked = super().recv(bufsize, flags & ~socket.MSG_PEEK)
            return self._peeked[:bufsize]
        if self._peeked:
            data, self._peeked = self._peeked[:bufsize], self._peeked[bufsize:]
            return data
        return super().recv(bufsize, flags)


class LinkAcceptor(Protocol):
    """Takes over a connection whose hello says it is another daemon (see :mod:`lanchat.links`)."""

    def accept_link(self, sock: socket.socket, address: tuple[Any, ...], hello: Hello,
                    decoder: LineDecoder, pending: list[bytes], *,
                    admit: Any) -> None:
        """Run the link on the calling thread; return when it ends.  Owns ``sock``.

        ``pending`` holds frames that arrived right behind the hello (already
        split off ``decoder``), to be read before anything else.  Once the
        handshake has proved the peer (the shared secret), ``admit()`` counts
        the connection as a link: False means every link slot is taken (or the
        handshake was evicted), and the link must be refused.
        """
        ...


class ConnHub(Protocol):
    """What a connection needs of its hub (:class:`lanchat.hub.Hub`)."""

    backend: HubBackend
    name: str
    max_rate: float
    key: bytes | None
    plain_clients: bool | None
    link_acceptor: LinkAcceptor | None
    line_timeout: float
    nick_timeout: float
    stall_timeout: float
    #: The TLS server context (the node's certificate); None: plain only, no sniffing.
    tls: ssl.SSLContext | None
    tls_handshake_timeout: float

    def source_allows(self, host: str, now: float) -> bool: ...
    def become_handshake(self, conn: TcpConn) -> str | None: ...
    def become_link(self, conn: TcpConn) -> bool: ...
    def release(self, conn: TcpConn) -> None: ...
    def forget(self, conn: TcpConn) -> None: ...
    def run_link(self, conn: TcpConn, hello: Hello, pending: list[bytes]) -> None: ...


class ConnLoop(Protocol):
    """What a connection needs of the I/O loop that owns it (:class:`lanchat.hubloop.IoLoop`)."""

    def on_thread(self) -> bool: ...
    def request(self, conn: TcpConn) -> None: ...
    def publish_later(self, conn: TcpConn, drafts: list[Draft], done: Any) -> None: ...
    def flush_said(self) -> None: ...
    def set_interest(self, conn: TcpConn, read: bool, write: bool) -> None: ...
    def schedule(self, conn: TcpConn, due: float) -> None: ...
    def unschedule(self, conn: TcpConn) -> None: ...
    def drop(self, conn: TcpConn) -> None: ...


class TcpConn(Session):
    """A TCP client of the hub (or a daemon's link, until it is handed over).

    ``kind`` is how the hub counts it (guarded by the hub's lock): ``"client"``,
    ``"pending"`` (over a client limit: it may only be a daemon, and is told
    ``refusal`` otherwise), ``"handshake"`` once handed to the link acceptor,
    ``"link"`` once that proved it a daemon we accept, and ``None`` once
    forgotten (or evicted from its handshake).

    Threads: the loop's thread runs every ``on_*`` method and the commands;
    :meth:`put`, :meth:`close_with` (and so :meth:`deliver`, :meth:`goodbye`)
    may be called from any thread.  guards (``_lock``): ``_out``, ``_inflight``, ``_queued``,
    ``_closing``, ``close_reason``, ``_at_line_start``, and the TLS state (``_tls``'s
    calls, both BIOs, ``_tls_wait``): OpenSSL allows one thread in an ``SSL`` at a time.
    """

    __slots__ = (
        "_at_line_start",
        "_attempts",
        "_closing",
        "_deadline",
        "_deadline_why",
        "_finished",
        "_first",
        "_flush_due",
        "_grace",
        "_hello_nick",
        "_inflight",
        "_line_due",
        "_link_sock",
        "_lock",
        "_nonce",
        "_out",
        "_progress_at",
        "_protocol_errors",
        "_queued",
        "_sniffed",
        "_tls",
        "_tls_in",
        "_tls_out",
        "_tls_wait",
        "address",
        "close_reason",
        "decoder",
        "events",
        "fd",
        "kind",
        "leave_reason",
        "loop",
        "refusal",
        "sock",
        "stalled",
        "state",
        "timer_at",
        "via",
        "writing",
    )

    def __init__(self, hub: ConnHub, loop: ConnLoop, sock: socket.socket,
                 address: tuple[Any, ...], number: int) -> None:
        super().__init__(hub, host_of(address), f"c{number}")
        self.hub: ConnHub = hub
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.kind: str | None = None  # set by the hub before the loop adopts it
        self.refusal: tuple[str, str] | None = None  # (code, text) for a "pending" one
        self.decoder = LineDecoder(MAX_FRAME_BYTES)
        self.state = GREETING
        self.leave_reason = "connection closed"
        self.stalled = False
        self._protocol_errors = 0
        self._attempts = 0
        self._first = True
        self._nonce = ""
        self._hello_nick = ""
        # deadlines (monotonic; loop thread): the prompt's or a pending hello's, and the
        # unfinished line's; the stall check and the final flush's while output waits
        self._deadline: float | None = None
        self._deadline_why = ""
        self._line_due: float | None = None
        self._progress_at = 0.0
        self._flush_due: float | None = None
        self._grace = FINAL_FLUSH_TIMEOUT_S
        self.timer_at: float | None = None  # the loop's: when it will call on_timer
        self.writing = False  # the loop's: registered for EVENT_WRITE
        self.events = 0  # the loop's: what the selector waits for on this socket
        self._finished = False  # the slot was released and the leave said (loop thread)
        self._lock = threading.Lock()
        self._out: list[bytes] = []  # queued, counted against MAX_OUTBOX_BYTES
        # what the loop took from _out and is sending (as the old writer thread held its
        # batch): not counted, so a receiver may have a batch in flight and a full queue
        self._inflight = NOTHING_IN_FLIGHT
        self._queued = 0
        self._closing = False
        self._at_line_start = True
        self.close_reason: str | None = None
        #: "tcp" (plain text mode) until it is JSON ("json") or TLS ("tls", "tls-json").
        self.via = "tcp"
        self._sniffed = b""  # the first bytes, read while deciding (loop thread)
        self._tls: ssl.SSLObject | None = None
        # made when the first bytes are a ClientHello: two BIOs are ~0.8 KiB a connection,
        # 4 MiB for the 5,000 plain clients of the scale benchmark
        self._tls_in: ssl.MemoryBIO | None = None
        self._tls_out: ssl.MemoryBIO | None = None
        self._tls_wait = b""  # ciphertext made and not yet taken by the socket
        self._link_sock: PeekableTls | None = None  # a link's TLS socket, once handed over

    # -- the byte seam (TLS goes here) ---------------------------------------------

    def _raw_recv(self) -> bytes:
        """Bytes that arrived (b"" at EOF); raises BlockingIOError if there are none yet."""
        if self._tls is None:
            return self.sock.recv(RECV_BYTES)
        chunk = self.sock.recv(RECV_BYTES)
        tls_in, tls_out = self._bios()
        with self._lock:
            if chunk:
                tls_in.write(chunk)
            else:
                tls_in.write_eof()
            plain, eof = self._tls_read()
            wrote = tls_out.pending > 0  # a KeyUpdate's answer, an alert
            if wrote:
                self._tls_wait += tls_out.read()
                self._tls_flush()
        if wrote:
            self.loop.request(self)  # the loop sends what the socket did not take
        if plain:
            return plain
        if eof:
            return b""
        raise BlockingIOError  # only part of a record so far

    def _raw_send(self, data: bytes | memoryview) -> int:
        """Send what the socket takes now; 0 if it takes nothing.  Raises OSError.

        The caller holds ``_lock``.  Over TLS, the count is of plaintext encrypted:
        what the socket did not take waits in ``_tls_wait`` (see :meth:`_unsent`).
        """
        if self._tls is not None:
            return self._tls_send(data)
        try:
            return self.sock.send(data, SEND_FLAGS)
        except BlockingIOError:
            return 0

    def _tls_send(self, data: bytes | memoryview) -> int:
        assert self._tls is not None
        tls_out = self._bios()[1]
        self._tls_wait += tls_out.read()
        self._tls_flush()
        if self._tls_wait or not data:
            return 0  # records wait for the socket: encrypt nothing more yet
        chunk = data[:TLS_PLAIN_PER_SEND]
        self._tls.write(chunk)
        self._tls_wait = tls_out.read()
        self._tls_flush()
        return len(chunk)

    def _bios(self) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO]:
        """The TLS connection's incoming and outgoing BIOs (there are none before TLS)."""
        assert self._tls_in is not None and self._tls_out is not None
        return self._tls_in, self._tls_out

    def _tls_flush(self) -> None:
        """Send what ciphertext the socket takes (caller holds ``_lock``); raises OSError."""
        if self._tls_wait:
            try:
                sent = self.sock.send(self._tls_wait, SEND_FLAGS)
            except BlockingIOError:
                return
            self._tls_wait = self._tls_wait[sent:]

    def _tls_read(self) -> tuple[bytes, bool]:
        """All plaintext decrypted so far, and whether the stream ended (caller holds _lock)."""
        assert self._tls is not None
        parts: list[bytes] = []
        while True:
            try:
                data = self._tls.read(RECV_BYTES)
            except ssl.SSLWantReadError:
                return b"".join(parts), False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(parts), True
            if not data:
                return b"".join(parts), True
            parts.append(data)

    def _unsent(self) -> bool:
        """Output waits: queued, in flight, or encrypted and not yet sent (caller holds _lock)."""
        return bool(self._out or self._inflight or self._tls_wait)

    @property
    def plain(self) -> bool:
        """True unless the connection is encrypted (the hub's users list marks it)."""
        return self._tls is None

    # -- sending (any thread) --------------------------------------------------------

    def _send(self, data: bytes) -> bool:
        if self.put(data):
            return True
        with self._lock:
            closing = self._closing
        if closing:
            # Closing already (a quit, a goodbye, a cut): what is still on its way is
            # dropped, and its leave says why it went.
            return True
        self._overflowed("too slow: your queue of unsent messages was full")
        return False

    def put(self, data: bytes) -> bool:
        """Queue ``data``; False (nothing queued) if closing or past MAX_OUTBOX_BYTES."""
        wake = False
        failed: str | None = None
        with self._lock:
            if self._closing or self._queued + len(data) > MAX_OUTBOX_BYTES:
                return False
            if self._out or self._inflight:
                self._out.append(data)
                self._queued += len(data)
                return True
            try:
                sent = self._raw_send(data)
            except OSError as exc:
                failed = f"send failed: {exc.strerror or exc}"
                sent = 0
            if failed is None:
                if sent:
                    self._at_line_start = data[sent - 1] == 0x0A
                if sent == len(data):
                    return True
                rest = data[sent:]
                self._out.append(rest)
                self._queued += len(rest)
                wake = True
        if failed is not None:
            self._give_up(failed)
        elif wake:
            self._progress_at = time.monotonic()
            self.loop.request(self)
        return True

    def close_with(self, final: bytes | None, reason: str, *, keep_queued: bool = False,
                   grace: float | None = None) -> None:
        """Stop taking data; send what is queued (if ``keep_queued``) and ``final``; close.

        A cut (``keep_queued=False``) drops the backlog so the notice goes next, on a
        line of its own.  The flush may wait ``grace`` seconds for the peer to read
        (default: FINAL_FLUSH_TIMEOUT_S, or ``stall_timeout`` if less).  Idempotent.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self.close_reason = reason
            if not keep_queued:
                self._out.clear()
                self._inflight = NOTHING_IN_FLIGHT
                self._queued = 0
                if final and not self._at_line_start:
                    final = b"\n" + final
            if final:
                self._out.append(final)
                self._queued += len(final)
            self._grace = (grace if grace is not None
                           else min(self.hub.stall_timeout, FINAL_FLUSH_TIMEOUT_S))
        self.loop.request(self)

    def _give_up(self, reason: str) -> None:
        """The socket broke: drop everything; the loop closes the connection."""
        with self._lock:
            self._closing = True
            if self.close_reason is None:
                self.close_reason = reason
            self._out.clear()
            self._inflight = NOTHING_IN_FLIGHT
            self._queued = 0
        log.debug("%r: %s", self, reason)
        self.loop.request(self)

    def _overflowed(self, reason: str) -> None:
        """Cut off a client that does not read: its backlog goes, a notice is sent."""
        with self._lock:
            if self._closing:
                return  # already closing (a goodbye, a quit, an earlier cut)
        log.info("%r: cut off: %s", self, reason)
        self.leave_reason = "too slow"
        if self.mode == "json":
            final = wire.encode_error("too-slow", reason, fatal=True)
        else:
            final = textmode.error(f"disconnected: {reason}")
        self.close_with(final, "too slow", grace=CUT_NOTICE_GRACE_S)

    def goodbye(self, reason: str) -> None:
        """Say goodbye and close once it is sent (server shutdown)."""
        if self.state == LINK:
            return  # the link says its own goodbye (links close before the hub)
        self.leave_reason = reason
        final = (wire.encode_bye(reason) if self.mode == "json"
                 else textmode.notice(f"{reason} -- bye!"))
        self.close_with(final, reason, keep_queued=True)

    # -- the loop's side ---------------------------------------------------------------

    def start(self) -> None:
        """Just adopted by the loop: wait for the first bytes (or greet), start reading."""
        if self.hub.tls is not None:
            self.state = SNIFF
            # a connection over a limit must be a daemon, which speaks first: its grace
            self._deadline = time.monotonic() + (LINK_HELLO_GRACE_S if self.kind == "pending"
                                                 else FIRST_BYTE_GRACE_S)
            self._deadline_why = "no first byte"
            self._reschedule()
            self.service()
            return
        self._converse(b"")
        self.service()

    def _converse(self, data: bytes) -> None:
        """Start the conversation (plain, or once TLS is up): greet, then read ``data``."""
        now = time.monotonic()
        if self.kind == "pending":
            self.state = PENDING
            self._deadline = now + LINK_HELLO_GRACE_S
            self._deadline_why = "no hello"
        else:
            self.state = GREETING
            if (self.plain and plain_refused(self.hub)
                    and not data.lstrip().startswith(b"{")):
                # a text user, silent or not: daemons and JSON clients say "{" first
                self._deadline = None
                log.info("%r: refused a plain text client", self)
                self.close_with(textmode.error(TLS_REQUIRED), "plain refused",
                                keep_queued=True)
                self._finish()
                return
            self._send(textmode.greeting(self.hub.name))
            self._deadline = now + self.hub.nick_timeout
            self._deadline_why = f"no nickname chosen within {self.hub.nick_timeout:g} s"
        self._reschedule()
        if data:
            self._guarded(self._feed, data)

    def _sniff(self, verdict: sniff.FirstBytes) -> None:
        """Act on what the first bytes say (loop thread, state SNIFF)."""
        if verdict is sniff.FirstBytes.NEED_MORE:  # part of a TLS record header
            due = time.monotonic() + self.hub.tls_handshake_timeout
            if self._deadline_why != "partial TLS record header":
                self._deadline, self._deadline_why = due, "partial TLS record header"
                self._reschedule()
            return
        data, self._sniffed = self._sniffed, b""
        if verdict is sniff.FirstBytes.INVALID:
            log.info("%r: first bytes are neither TLS nor text: closing", self)
            self.leave_reason = "not TLS"
            self.close_now()
        elif verdict is sniff.FirstBytes.PLAIN:
            if not data and self.kind == "pending":  # silent and over a limit: no daemon
                self.state = PENDING
                self._refuse()
                self._finish()
                return
            self._converse(data)
        else:
            assert self.hub.tls is not None
            self._tls_in, self._tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = self.hub.tls.wrap_bio(self._tls_in, self._tls_out, server_side=True)
            self.via = "tls"
            self.state = HANDSHAKE
            self._deadline = time.monotonic() + self.hub.tls_handshake_timeout
            self._deadline_why = "TLS handshake not finished in time"
            self._reschedule()
            self._tls_in.write(data)
            self._handshake()

    def _handshake(self) -> None:
        """Drive the TLS handshake with what arrived (loop thread, state HANDSHAKE)."""
        assert self._tls is not None
        failed: Exception | None = None
        done = False
        with self._lock:
            try:
                self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                failed = exc
            self._tls_wait += self._bios()[1].read()  # our flight (or an alert)
            try:
                self._tls_flush()
            except OSError as exc:
                failed = failed or exc
        if failed is not None:
            log.info("%r: TLS handshake failed: %s", self, failed)
            self.leave_reason = "TLS handshake failed"
            self.close_now()
            return
        if done:
            log.debug("%r: %s", self, self._tls.version())
            with self._lock:
                plain, eof = self._tls_read()  # what came right behind the handshake
            self._deadline = None
            self._converse(plain)
            if eof and self.state not in (LINK, CLOSED):
                self.close_now()

    def _first_bytes(self) -> None:
        """Readable in SNIFF or HANDSHAKE: the raw bytes go to the sniffer or to ``ssl``."""
        try:
            chunk = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%r: %s", self, exc)
            chunk = b""
        if not chunk:
            log.debug("%r: closed before it said anything", self)
            self.close_now()
            return
        if self.state == SNIFF:
            self._sniffed += chunk
            self._sniff(sniff.classify(self._sniffed))
        else:
            with self._lock:
                self._bios()[0].write(chunk)
            self._handshake()

    def service(self) -> None:
        """Bring the loop's view up to date: what to wait for, and whether we are done."""
        if self.state in (LINK, CLOSED):
            return
        with self._lock:
            closing, pending = self._closing, self._unsent()
        if closing:
            if not pending:
                self.close_now()
                return
            if self._flush_due is None:
                self._flush_due = time.monotonic() + self._grace
                self._reschedule()
        elif pending and not self.writing:
            self._progress_at = time.monotonic()
            self._reschedule()
        self.loop.set_interest(self, not closing, pending)

    def on_writable(self) -> None:
        """Send what is queued, as much as the socket takes."""
        failed: str | None = None
        with self._lock:
            if not self._inflight and self._out:  # take the whole queue as one batch
                out = self._out
                self._inflight = memoryview(out[0] if len(out) == 1 else b"".join(out))
                self._out = []
                self._queued = 0
            data = self._inflight
            if data or self._tls_wait:
                waited = len(self._tls_wait)
                try:
                    sent = self._raw_send(data)
                except OSError as exc:
                    failed = f"send failed: {exc.strerror or exc}"
                    sent = 0
                if not sent and len(self._tls_wait) < waited:
                    self._progress_at = time.monotonic()  # records left, none new
                if sent:
                    self._at_line_start = data[sent - 1] == 0x0A
                    self._progress_at = time.monotonic()
                    self._inflight = data[sent:]
        if failed is not None:
            self._give_up(failed)
        self.service()

    def on_readable(self) -> None:
        """Read what arrived and carry out every complete line."""
        if self.state in (SNIFF, HANDSHAKE):
            self._first_bytes()
            self._reschedule()
            self.service()
            return
        try:
            data = self._raw_recv()
        except BlockingIOError:
            return
        except OSError as exc:
            self.leave_reason = "connection lost"
            log.debug("%r: %s", self, exc)
            self.close_now()
            return
        if not data:
            pending = self.decoder.eof()
            if pending:
                log.debug("%r: dropped %d bytes of an unfinished line", self, len(pending))
            self.close_now()
            return
        self._guarded(self._feed, data)

    def on_timer(self, now: float) -> None:
        """A deadline may have passed: the prompt, an unfinished line, a stall, a flush."""
        self.timer_at = None
        if self.state in (LINK, CLOSED):
            return
        if self.state in (SNIFF, HANDSHAKE) and self._deadline is not None \
                and now >= self._deadline:
            if self.state == SNIFF:
                self._sniff(sniff.classify(self._sniffed, timed_out=True))
            else:
                log.info("%r: %s; dropping it", self, self._deadline_why)
                self.leave_reason = "TLS handshake timed out"
                self.close_now()
            self._reschedule()
            self.service()
            return
        with self._lock:
            closing, pending = self._closing, self._unsent()
        if closing:
            if self._flush_due is not None and now >= self._flush_due:
                log.debug("%r: its final words could not be sent in time", self)
                self.close_now()
                return
        elif pending and now - self._progress_at >= self.hub.stall_timeout:
            self.stalled = True
            self._overflowed(f"too slow: nothing could be sent to you for "
                             f"{self.hub.stall_timeout:g} s")
        elif self._deadline is not None and now >= self._deadline:
            if self.state == PENDING:
                self._refuse()
                self._finish()
            else:
                self._guarded(self._raise, TimedOut(self._deadline_why))
        elif self._line_due is not None and now >= self._line_due:
            self._guarded(self._raise, TimedOut(
                f"line not finished within {self.hub.line_timeout:g} s"))
        self._reschedule()
        self.service()

    @staticmethod
    def _raise(exc: Exception) -> None:
        raise exc

    def _reschedule(self) -> None:
        """Tell the loop the earliest of our deadlines (it calls on_timer then)."""
        if self.state == CLOSED:
            return
        dues = []
        with self._lock:
            closing, pending = self._closing, self._unsent()
        if closing:
            if self._flush_due is not None:
                dues.append(self._flush_due)
        else:
            if pending:
                dues.append(self._progress_at + self.hub.stall_timeout)
            if self._deadline is not None:
                dues.append(self._deadline)
            if self._line_due is not None:
                dues.append(self._line_due)
        if dues:
            self.loop.schedule(self, min(dues))
        else:
            self.loop.unschedule(self)

    def _guarded(self, fn: Any, arg: Any) -> None:
        """Run a step of the conversation; turn what it raises into the end of the connection."""
        try:
            fn(arg)
        except (Flooding, TimedOut) as exc:
            self.leave_reason = "flooding" if isinstance(exc, Flooding) else "timed out"
            log.info("%r: %s; dropping the connection", self, exc)
            self.close_with(self._fatal_bytes(exc.code, str(exc)), str(exc), keep_queued=True)
        except FrameTooLong as exc:
            self.leave_reason = "line too long"
            self.close_with(self._fatal_bytes("frame-too-long", str(exc)), str(exc),
                            keep_queued=True)
        except ClosedError:
            self.leave_reason = "server shutting down"
            self.close_now()
        except Exception:  # a bug must cost this client its connection, never the hub
            log.exception("%r: unexpected error; dropping the connection", self)
            self.close_now()
        if self._closing:
            # The conversation ended it (a quit, a timeout, a refusal): the slot and the
            # leave go now, while its last words are sent.  A cut from outside (the
            # router's, a stall, a goodbye) says its leave once the connection is closed.
            self._finish()
        self._reschedule()

    def _fatal_bytes(self, code: str, text: str) -> bytes:
        if self.mode == "json":
            return wire.encode_error(code, text, fatal=True)
        return textmode.error(f"{text} -- disconnecting")

    def _finish(self) -> None:
        """Free the connection slot and say the leave, once (loop thread).

        The slot first: once the others see "left", it can be taken.  Called when
        the conversation ends it, or when the connection is closed.
        """
        if self._finished or self.state == LINK:  # a link's thread does its own
            return
        self._finished = True
        self.loop.flush_said()  # what it said before it went goes out before its leave
        self.hub.release(self)
        if self.stalled:
            self.leave_reason = "too slow"
        if self.nick is not None:
            self.hub.backend.leave(self, self.leave_reason)

    def close_now(self) -> None:
        """End the connection at once (loop thread): leave, close, forget."""
        if self.state == CLOSED:
            return
        with self._lock:
            self._closing = True
            self._out.clear()
            self._inflight = NOTHING_IN_FLIGHT
            self._queued = 0
            goodbye = b""
            if self._tls is not None and self.state != HANDSHAKE:
                with contextlib.suppress(ssl.SSLError, ValueError):
                    self._tls.unwrap()  # queues TLS's close_notify, then wants a read
                goodbye = self._tls_wait + self._bios()[1].read()
            self._tls_wait = b""
        if goodbye:
            with contextlib.suppress(OSError):  # best effort: it is closing anyway
                self.sock.send(goodbye, SEND_FLAGS)
        self._finish()
        self.state = CLOSED
        self.loop.drop(self)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.hub.forget(self)

    # -- the conversation (loop thread) --------------------------------------------------

    def _publish(self, drafts: list[Draft], done: Any) -> None:
        """Publish at the end of the loop's round, with what the other connections said.

        One inbox operation and one commit for the whole round instead of one per
        connection; the order of each connection's own messages is kept.
        """
        self.loop.publish_later(self, drafts, done)

    def handle(self, command: Any) -> bool:
        """Carry out a command after what this round said: the router sees them in order."""
        self.loop.flush_said()
        return super().handle(command)

    def _feed(self, data: bytes) -> None:
        decoder = self.decoder
        frames = decoder.feed(data)
        if decoder.pending:
            if frames or self._line_due is None:  # a new unfinished line began in this data
                self._line_due = time.monotonic() + self.hub.line_timeout
                self._reschedule()
        else:
            self._line_due = None
        if frames:
            self._frames(frames)

    def _frames(self, frames: list[bytes]) -> None:
        now = time.monotonic()
        says: list[Say] = []
        for i, frame in enumerate(frames):
            if self._closing or self.state in (LINK, CLOSED):
                break
            state = self.state
            if state == TEXT:
                command = self._text_command(frame, now)
                if command is None:
                    continue
                if isinstance(command, Say):
                    says.append(command)  # published together: one router operation
                    continue
                self._say_many(says)
                says = []
                if not self.handle(command):
                    self.leave_reason = command.reason if isinstance(command, Quit) else "quit"
                    self.close_with(textmode.notice("Bye!"), "quit", keep_queued=True)
            elif state == JSON:
                self._json_command(frame, now)
            elif state == AUTH:
                self._auth_answer(frame)
            elif state == GREETING and self._greeting(frame, frames, i, now):
                break  # a hello: it took the frames after it
            elif state == PENDING:
                self._pending_hello(frame, frames, i)
                break  # a daemon's hello took the frames after it, or it was refused
        self._say_many(says)

    def _text_command(self, frame: bytes, now: float) -> Any:
        try:
            command = textmode.parse_line(decode_utf8(frame))
            if command is None or not self.admit(command, now):
                return None
            return command
        except (ValidationError, RemoteProtocolError) as exc:
            self.error(exc.code, str(exc))
            return None

    def _json_command(self, frame: bytes, now: float) -> None:
        try:
            command = wire.parse_command(frame)
            if not self.admit(command, now):
                return
            if not self.handle(command):
                self.leave_reason = command.reason if isinstance(command, Quit) else "quit"
                self.close_with(wire.encode_bye("goodbye"), "quit", keep_queued=True)
        except (ValidationError, RemoteProtocolError) as exc:
            self._protocol_errors += 1
            if self._protocol_errors > MAX_PROTOCOL_ERRORS:
                self.close_with(wire.encode_error(
                    "too-many-errors", "too many protocol errors", fatal=True), "errors")
                return
            self.error(exc.code, str(exc))

    def _greeting(self, frame: bytes, frames: list[bytes], i: int, now: float) -> bool:
        """A line answering the nickname prompt (or a JSON hello, as the first line).

        True if it was a hello, which took the frames after it (``frames[i + 1:]``).
        """
        if self._first and frame.lstrip().startswith(b"{"):
            self.mode = "json"
            self._deadline = None
            self._hello(frame, frames[i + 1:])
            return True
        self._first = False
        if self.plain and plain_refused(self.hub):
            log.info("%r: refused a plain text client", self)
            self.close_with(textmode.error(TLS_REQUIRED), "plain refused", keep_queued=True)
            return False
        if self.hub.key is not None and not self.hub.plain_clients:
            self.close_with(textmode.error(SECRET_REQUIRED), "no secret", keep_queued=True)
            return False
        try:
            nick: str | None = decode_utf8(frame).strip()
        except RemoteProtocolError:
            nick = None
        # Answers to the prompt are commands too, but the first nickname tried is free: a
        # client that only chose one (most of a big hub, idle) then holds no flood buckets
        # (640 B each).  Empty and bad lines and retries are limited; MAX_NICK_ATTEMPTS
        # bounds the retries as well.
        if (not nick or self._attempts) and not self.admit_command(now):
            return False
        if nick is None:
            self.error("bad-utf8", "that was not valid UTF-8; choose a nickname:")
            return False
        if not nick:
            self.notice("Choose a nickname:")
            return False
        self._attempts += 1
        if self.try_join(nick, last=self._attempts >= MAX_NICK_ATTEMPTS):
            self._deadline, self._deadline_why = None, ""
            self.state = TEXT
            return False
        if self._attempts >= MAX_NICK_ATTEMPTS:
            self.close_with(textmode.error(
                f"no nickname chosen in {MAX_NICK_ATTEMPTS} attempts -- disconnecting"),
                "no nick", keep_queued=True)
        return False

    def _pending_hello(self, frame: bytes, frames: list[bytes], i: int) -> None:
        """Over a client limit: serve a daemon's link, refuse anyone else with one line."""
        if frame.lstrip().startswith(b"{"):
            try:
                role = wire.parse_hello(frame).role
            except (RemoteProtocolError, ValidationError):
                role = None
            if role == "daemon":
                self.mode = "json"
                self._deadline = None
                self._hello(frame, frames[i + 1:])
                return
        self._refuse(json_mode=frame.lstrip().startswith(b"{"))

    def _refuse(self, json_mode: bool = False) -> None:
        assert self.refusal is not None
        code, text = self.refusal
        log.info("%r: refused: %s", self, text)
        final = wire.encode_error(code, text, fatal=True) if json_mode else textmode.error(text)
        self._deadline = None
        self.close_with(final, "refused")

    def _hello(self, first: bytes, pending: list[bytes]) -> None:
        try:
            hello = wire.parse_hello(first)
        except (RemoteProtocolError, ValidationError) as exc:
            self.close_with(wire.encode_error(exc.code, str(exc), fatal=True), "bad hello")
            return
        if hello.role == "daemon":
            self._to_link(hello, pending)
            return
        if self.plain and plain_refused(self.hub):
            log.info("%r: refused a plain JSON client", self)
            self.close_with(wire.encode_error("tls-required", TLS_REQUIRED, fatal=True),
                            "plain refused")
            return
        if hello.room is not None:
            self.room = hello.room
        assert hello.nick is not None
        if self.hub.key is not None:
            self._challenge(hello.nick)
            if pending:  # the answer came with the hello: the rest is read as usual
                self._auth_answer(pending[0])
                for frame in pending[1:]:
                    if self._closing or self.state != JSON:
                        break
                    self._json_command(frame, time.monotonic())
            return
        self._json_join(hello.nick)
        for frame in pending:
            if self._closing or self.state != JSON:
                break
            self._json_command(frame, time.monotonic())

    def _to_link(self, hello: Hello, pending: list[bytes]) -> None:
        if self.hub.link_acceptor is None:
            self.close_with(wire.encode_error("no-links", "this hub does not accept daemon links",
                                              fatal=True), "no links")
            return
        refusal = self.hub.become_handshake(self)
        if refusal is not None:
            self.close_with(wire.encode_error("too-many-handshakes", refusal, fatal=True),
                            "too many handshakes")
            return
        self.state = LINK
        self._deadline = self._line_due = None
        self.loop.drop(self)  # the link code reads and writes this socket from now on
        with self._lock:
            rest = bytes(self._inflight) + b"".join(self._out)
            self._out.clear()
            self._inflight = NOTHING_IN_FLIGHT
            self._queued = 0
            self._closing = True  # nothing more goes through us
            records = self._tls_wait + (self._tls_out.read() if self._tls_out is not None else b"")
            self._tls_wait = b""
        self.sock.setblocking(True)
        with contextlib.suppress(OSError):
            self.sock.settimeout(FINAL_FLUSH_TIMEOUT_S)
            if records:
                self.sock.sendall(records)
            if rest:
                self.link_socket().sendall(rest)
        self.hub.run_link(self, hello, pending)

    def link_socket(self) -> socket.socket:
        """The socket the link code reads and writes: the TCP socket, or TLS over it.

        Over TLS it is a :class:`PeekableTls` on this connection's ``SSLObject``
        (nothing decrypted is left in it: every read drained it), made once.
        """
        if self._tls is None:
            return self.sock
        if not isinstance(self._link_sock, PeekableTls):
            self._link_sock = PeekableTls(self.sock, self._tls, *self._bios())
        return cast(socket.socket, self._link_sock)

    def admit_link(self) -> bool:
        """The link's handshake proved the peer: count it as a link (see ConnHub.become_link)."""
        return self.hub.become_link(self)

    def _challenge(self, nick: str) -> None:
        """Challenge a JSON client for the shared secret; its answer is the next frame."""
        self._nonce = secrets.token_hex(auth.NONCE_BYTES)
        self._hello_nick = nick
        self._send(wire.encode_challenge(self._nonce))
        self.state = AUTH
        self._deadline = time.monotonic() + self.hub.nick_timeout
        self._deadline_why = "no answer to the challenge in time"
        self._reschedule()

    def _auth_answer(self, frame: bytes) -> None:
        assert self.hub.key is not None
        self._deadline = None
        given = None
        with contextlib.suppress(RemoteProtocolError):
            answer = loads_line(frame)
            if isinstance(answer, dict) and answer.get("type") == "auth":
                given = answer.get("proof")
        if auth.check_proof(self.hub.key, given, "client", self._nonce, self._hello_nick):
            self._json_join(self._hello_nick)
            return
        log.warning("%s: refused a client that cannot prove the shared secret", self.host)
        self.close_with(wire.encode_error(
            "auth-failed", "this hub requires the shared secret", fatal=True), "auth failed")

    def _json_join(self, nick: str) -> None:
        try:
            users = self.hub.backend.join(self, nick=nick, host=self.host,
                                          via="json" if self.plain else "tls-json",
                                          room=self.room)
        except NickInUse as exc:
            self.close_with(wire.encode_error(exc.code, str(exc), fatal=True), "nick")
            return
        except ClosedError:
            raise
        except LanchatError as exc:
            self.close_with(wire.encode_error(exc.code, str(exc), fatal=True), "join failed")
            return
        self.nick = nick
        self.state = JSON
        self.welcome(users)

