"""The chat hub: a threaded TCP server, and its UDP twin on the same port number.

The classic socket chat, grown up.  Each TCP client gets its own reader
thread, as in the textbook design, but never writes to other clients itself:
it hands what it reads to the router, and the router hands each message to
every receiver's :class:`~lanchat.stream.Outbox`, whose own writer thread does
the sending.  A client that stops reading fills only its own outbox, and is cut
off with a notice when that is full; everyone else carries on.

Text mode (``nc HOST PORT``), JSON mode (a first line that is a JSON object)
and UDP datagrams all turn into the same :mod:`lanchat.commands`, handled by
one :class:`_Session` class whatever the transport.

Threads: ``hub-accept`` (accepts TCP connections), one reader per
connection (reads and handles its commands), the outboxes' writers, and
``hub-udp`` (receives datagrams, expires idle UDP clients).  The hub's lock
guards only its set of connections and their counts; no lock is held during
socket I/O.

Limits (values and reasons in :mod:`lanchat.limits`): every connection has a
:class:`~lanchat.ratelimit.ConnectionLimiter` (``max_rate`` messages per
second, a generous fixed rate for other commands, a flooder is disconnected);
TCP connections are counted in total and per source address, and daemon links
apart from both, so a flood of clients cannot lock out peers.  A connection
over a client limit gets LINK_HELLO_GRACE_S to say it is a daemon, then one
line saying which limit it hit.  The reader drops a connection holding an
unfinished line for LINE_TIMEOUT_S (slow loris) by polling with that deadline
before its next ``recv``: no timer threads.  TCP keepalive reaps dead peers.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lanchat import auth, textmode, wire
from lanchat.commands import (
    Command,
    Hello,
    Help,
    Join,
    ListUsers,
    Nick,
    Ping,
    Quit,
    Say,
    Unknown,
)
from lanchat.errors import (
    AmbiguousUser,
    ClosedError,
    FrameTooLong,
    LanchatError,
    NickInUse,
    NoSuchUser,
    RemoteProtocolError,
    ValidationError,
)
from lanchat.events import Event
from lanchat.framing import LineDecoder, decode_utf8, loads_line
from lanchat.lightthread import LightThread
from lanchat.limits import (
    CUT_NOTICE_GRACE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_RATE,
    FLOOD_FACTOR,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_S,
    KEEPALIVE_INTERVAL_S,
    LINE_TIMEOUT_S,
    LINK_HELLO_GRACE_S,
    MAX_DAEMON_LINKS,
    MAX_DATAGRAM_BYTES,
    MAX_FRAME_BYTES,
    MAX_LINK_HANDSHAKES,
    MAX_LINK_HANDSHAKES_PER_IP,
    MAX_NICK_ATTEMPTS,
    MAX_PENDING_OVER_LIMIT,
    MAX_TRACKED_SOURCES,
    MAX_UDP_CLIENTS,
    MAX_UDP_CLIENTS_PER_IP,
    NICK_TIMEOUT_S,
    SEND_STALL_TIMEOUT_S,
    SOURCE_RATE_FACTOR,
    UDP_IDLE_TIMEOUT_S,
    UDP_UNREGISTERED_BURST,
    UDP_UNREGISTERED_RATE,
    UDP_UNREGISTERED_TOTAL_BURST,
    UDP_UNREGISTERED_TOTAL_RATE,
)
from lanchat.model import DEFAULT_ROOM, Draft, Message, User
from lanchat.ratelimit import ConnectionLimiter, SourceBuckets, TokenBucket, Verdict
from lanchat.render import is_action
from lanchat.stream import RECV_BYTES, RECV_SMALL_BYTES, SEND_FLAGS, Outbox

log = logging.getLogger(__name__)

#: Protocol errors (bad JSON, unknown frame types) a JSON client may make before
#: it is disconnected: enough for a buggy client to log its mistakes, too few to
#: make the hub busy answering garbage.
MAX_PROTOCOL_ERRORS = 20

#: Seconds the accept loop waits after running out of file descriptors (EMFILE)
#: before it tries again, instead of spinning on the error.
ACCEPT_BACKOFF_S = 0.1

#: What a text-mode or UDP client is told by a hub that requires the shared secret.
SECRET_REQUIRED = ("this hub requires the shared secret: join with "
                   "lanchat connect --secret-file FILE HOST -- bye")

#: Seconds a clean shutdown waits for each client's goodbye to leave.
SHUTDOWN_FLUSH_S = 2.0


class HubBackend(Protocol):
    """What the hub needs from the router (see :class:`lanchat.router.Router`)."""

    node: str

    def publish(self, draft: Draft, *, source: object | None = None,
                done: Callable[[Message | None, LanchatError | None], None] | None = None
                ) -> None: ...
    def publish_many(self, drafts: Sequence[Draft], *, source: object | None = None,
                     done: Callable[[Message | None, LanchatError | None], None] | None = None
                     ) -> None: ...
    def join(self, sub: Any, *, nick: str, host: str, via: str,
             room: str = DEFAULT_ROOM) -> list[User]: ...
    def move(self, sub: Any, room: str) -> list[User]: ...
    def rename(self, sub: Any, nick: str) -> None: ...
    def leave(self, sub: Any, reason: str = "quit") -> None: ...
    def users(self, room: str | None = None) -> list[User]: ...


class LinkAcceptor(Protocol):
    """Takes over a connection whose hello says it is another daemon (see :mod:`lanchat.links`)."""

    def accept_link(self, sock: socket.socket, address: tuple[Any, ...], hello: Hello,
                    decoder: LineDecoder, pending: list[bytes], *,
                    admit: Callable[[], bool]) -> None:
        """Run the link on the calling thread; return when it ends.  Owns ``sock``.

        ``pending`` holds frames that arrived right behind the hello (already
        split off ``decoder``), to be read before anything else.  Once the
        handshake has proved the peer (the shared secret), ``admit()`` counts
        the connection as a link: False means every link slot is taken (or the
        handshake was evicted), and the link must be refused.
        """
        ...


def _text_message(msg: Message) -> bytes:
    """A message's text-mode lines, marked if it claims a time far ahead of our clock.

    Module level, so that :meth:`Event.encoded` renders it once for every text
    client (the cache is keyed by the encoder).
    """
    return textmode.encode_message(msg, now=time.time())


def _host_of(address: tuple[Any, ...]) -> str:
    return str(address[0])


class _Flooding(Exception):
    """A client kept sending far past its limit; the text says which limit."""

    code = "flooding"


class _TimedOut(Exception):
    """A reader deadline passed (nickname prompt, unfinished line); the text says which."""

    code = "timeout"


def _tune(sock: socket.socket) -> None:
    """Low latency, and keepalive so a vanished peer is reaped (chat clients may idle for hours)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # The knobs are Linux's; elsewhere the system's (hours-long) defaults apply.
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


class _Session:
    """A hub user, whatever the transport: handles its commands, receives its events.

    Subclasses say how bytes reach the user (:meth:`_send`).  ``mode`` is
    ``"text"`` or ``"json"``.  Thread-safety: :meth:`handle` runs on the
    session's reader thread (or the UDP thread); :meth:`deliver` on the router
    thread.  They share only immutable state and the transport.
    """

    via = "tcp"

    def __init__(self, hub: Hub, host: str, label: str) -> None:
        self.hub = hub
        self.host = host
        self.label = label
        self.mode = "text"
        self.nick: str | None = None
        self.room = DEFAULT_ROOM
        self._limiter: ConnectionLimiter | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} {self.nick or '?'}>"

    # transport ------------------------------------------------------------------

    def _send(self, data: bytes) -> bool:
        raise NotImplementedError

    # router side -------------------------------------------------------------------

    def deliver(self, events: Sequence[Event]) -> bool:
        json_mode = self.mode == "json"
        enc_m = wire.encode_message if json_mode else _text_message
        enc_p = wire.encode_presence if json_mode else textmode.encode_presence
        if len(events) == 1:
            e = events[0]
            return self._send(e.encoded(enc_m if isinstance(e.item, Message) else enc_p))
        return self._send(b"".join([e.encoded(enc_m if isinstance(e.item, Message) else enc_p)
                                    for e in events]))

    # replies -------------------------------------------------------------------------

    def notice(self, text: str) -> None:
        if self.mode == "text":
            self._send(textmode.notice(text))

    def error(self, code: str, text: str, *, fatal: bool = False) -> None:
        if self.mode == "json":
            self._send(wire.encode_error(code, text, fatal=fatal))
        else:
            self._send(textmode.error(text))

    def _others(self, users: list[User]) -> list[str]:
        return [u.nick for u in users if u.nick != self.nick]

    def welcome(self, users: list[User]) -> None:
        assert self.nick is not None
        if self.mode == "json":
            self._send(wire.encode_welcome(node=self.hub.backend.node, name=self.hub.name,
                                           nick=self.nick, room=self.room, users=users))
        else:
            self._send(textmode.welcome(self.nick, self.room, self._others(users)))

    # limits --------------------------------------------------------------------------

    def admit(self, command: Command, now: float) -> bool:
        """Apply the flood limits to ``command``: True means carry it out.

        A dropped message or command is answered (see :meth:`_limited`); a
        client flooding far past its limit raises :class:`_Flooding`.  Quit is
        never limited.
        """
        if isinstance(command, Quit):
            return True
        if isinstance(command, Say):
            return self.admit_message(now, command.ref)
        return self.admit_command(now)

    def _limits(self) -> ConnectionLimiter:
        limiter = self._limiter
        if limiter is None or limiter.rate != self.hub.max_rate:  # new, or max_rate reloaded
            limiter = self._limiter = ConnectionLimiter(self.hub.max_rate)
        return limiter

    def admit_message(self, now: float, ref: Any = None) -> bool:
        """The connection's own limit, then its address's (shared by all its connections)."""
        limiter = self._limits()
        if limiter.rate == 0:  # --max-rate 0: the benchmarks' fast path
            return True
        verdict = limiter.message(now)
        if verdict is Verdict.OK and not self.hub.source_allows(self.host, now):
            return self._admitted(limiter.message_refused(now),
                                  limiter.rate * SOURCE_RATE_FACTOR, "messages per second",
                                  "message dropped", ref, who=" from your address")
        return self._admitted(verdict, limiter.rate, "messages per second", "message dropped",
                              ref)

    def admit_command(self, now: float) -> bool:
        limiter = self._limits()
        return self._admitted(limiter.command(now), limiter.command_rate, "commands per second",
                              "command ignored", None)

    def _admitted(self, verdict: Verdict, rate: float, what: str, consequence: str,
                  ref: Any, *, who: str = "") -> bool:
        """Turn a bucket's verdict into an answer: pass, a notice (or error frame), or a kick."""
        if verdict is Verdict.OK:
            return True
        if verdict is Verdict.KICK:
            raise _Flooding(f"flooding: more than {rate * FLOOD_FACTOR:g} {what}")
        text = f"rate limit: at most {rate:g} {what}{who}; {consequence}"
        # A JSON client hears about every dropped frame (with its ref, so it knows
        # which); a person gets one line a second, not one per dropped line.
        if self.mode == "json":
            self._send(wire.encode_error("rate-limited", text, ref=ref))
        elif verdict is Verdict.NOTIFY:
            self._send(textmode.error(text))
        return False

    # commands ------------------------------------------------------------------------

    def try_join(self, nick: str, *, last: bool = False) -> bool:
        """Register under ``nick``; on refusal tell the user why and return False.

        The refusal asks for another nickname unless this was the ``last`` attempt.
        """
        again = "" if last else "; choose another:"
        try:
            users = self.hub.backend.join(self, nick=nick, host=self.host, via=self.via,
                                          room=self.room)
        except NickInUse:
            self.error("nick-taken", f"the nick {nick} is taken{again}")
            return False
        except ValidationError as exc:
            self.error(exc.code, f"{exc}{again}")
            return False
        self.nick = nick
        self.welcome(users)
        return True

    def handle(self, command: Command) -> bool:
        """Carry out one command.  Returns False when the user quits."""
        backend = self.hub.backend
        assert self.nick is not None
        if isinstance(command, Say):
            self._say(command)
        elif isinstance(command, Join):
            users = backend.move(self, command.room)
            self.room = command.room
            self._confirm(f"You are now in #{self.room}", users)
        elif isinstance(command, Nick):
            try:
                backend.rename(self, command.nick)
            except NickInUse as exc:
                self.error(exc.code, str(exc))
                return True
            self.nick = command.nick
            self._confirm(f"You are now known as {self.nick}", None)
        elif isinstance(command, ListUsers):
            self._list_users()
        elif isinstance(command, Ping):
            if self.mode == "json":
                self._send(wire.encode_pong(command.token))
            else:
                self.notice("pong")
        elif isinstance(command, Help):
            self._send(textmode.help_text())
        elif isinstance(command, Unknown):
            self.error("unknown-command", f"unknown command /{command.name} -- type /help")
        elif isinstance(command, Quit):
            return False
        return True

    def _confirm(self, text: str, users: list[User] | None) -> None:
        assert self.nick is not None
        if self.mode == "json":
            self._send(wire.encode_joined(self.nick, self.room))
        elif users is None:
            self.notice(text)
        else:
            others = self._others(users)
            self.notice(f"{text} with {', '.join(others)}" if others else
                        f"{text} (nobody else is here yet)")

    def _list_users(self) -> None:
        users = self.hub.backend.users(self.room)
        if self.mode == "json":
            self._send(wire.encode_users(self.room, users))
            return
        names = ", ".join(u.nick if u.local else f"{u.nick}@{u.host}" for u in users)
        self.notice(f"In #{self.room} ({len(users)}): {names}")

    def _say(self, command: Say) -> None:
        assert self.nick is not None
        draft = Draft(text=command.text, nick=self.nick, host=self.host, room=self.room,
                      to=command.to)
        ref = command.ref
        json_mode = self.mode == "json"

        def done(msg: Message | None, err: LanchatError | None) -> None:
            if json_mode and err is None:
                assert msg is not None
                self._send(wire.encode_sent(ref, msg))
            else:
                self._published(msg, err)

        self.hub.backend.publish(draft, source=self, done=done)

    def _say_many(self, says: list[Say]) -> None:
        """Publish several text-mode lines at once (they need no acknowledgement)."""
        if not says:
            return
        if len(says) == 1:
            self._say(says[0])
            return
        assert self.nick is not None
        drafts = [Draft(text=c.text, nick=self.nick, host=self.host, room=self.room, to=c.to)
                  for c in says]
        self.hub.backend.publish_many(drafts, source=self, done=self._published)

    def _published(self, msg: Message | None, err: LanchatError | None) -> None:
        """A text-mode line was stored (or refused).  The sender is not sent their own
        message back (it is on their screen already) -- except an action or a direct
        message, shown as the others see it (``* bob waves``, ``bob -> alice: hi``), so
        that they see that it went out and how, as in irssi."""
        if err is not None:
            self._not_sent(err)
        elif msg is not None and self.mode == "text" and (
                msg.to is not None or is_action(msg.text)):
            self._send(_text_message(msg))

    def _not_sent(self, err: LanchatError) -> None:
        """Tell the client its message was not sent (a bad addressee says only that)."""
        if isinstance(err, NoSuchUser | AmbiguousUser):
            self.error(err.code, str(err))
        else:
            self.error(err.code, f"your message was not sent: {err}")


class _TcpSession(_Session):
    """A TCP client: one reader thread (:meth:`run`) and an outbox.

    ``kind`` is how the hub counts it (guarded by the hub's lock): ``"client"``,
    ``"pending"`` (over a client limit: it may only be a daemon, and is told
    ``refusal`` otherwise), ``"handshake"`` once handed to the link acceptor,
    ``"link"`` once that proved it a daemon we accept, and ``None`` once
    forgotten (or evicted from its handshake).
    """

    def __init__(self, hub: Hub, sock: socket.socket, address: tuple[Any, ...],
                 number: int) -> None:
        super().__init__(hub, _host_of(address), f"c{number}")
        self.sock = sock
        self.address = address
        self.outbox = Outbox(sock, name=f"hub-c{number}", stall_timeout=hub.stall_timeout,
                             on_stall=self._stalled)
        self.decoder = LineDecoder(MAX_FRAME_BYTES)
        self.thread = LightThread(self.run, name=f"hub-c{number}")
        self._leave_reason = "connection closed"
        self._protocol_errors = 0
        self._deadline: float | None = None  # the nickname prompt's (or a pending hello's)
        self._deadline_why = ""
        self.kind: str | None = None
        self.refusal: tuple[str, str] | None = None  # (code, text) for a "pending" connection

    def _send(self, data: bytes) -> bool:
        if self.outbox.put(data):
            return True
        if self.outbox.close_reason is not None:
            # Closing already (a quit, a goodbye, a cut): what is still on its way is
            # dropped, and its leave -- queued by the reader -- says why it went.
            return True
        self._overflowed("too slow: your queue of unsent messages was full")
        return False

    def _stalled(self, seconds: float) -> None:
        """The writer's send has been blocked for ``seconds``: the client is not reading."""
        self._overflowed(f"too slow: nothing could be sent to you for {seconds:g} s")

    def _overflowed(self, reason: str) -> None:
        """Cut off a client that does not read: its backlog goes, a notice is sent."""
        if self.outbox.close_reason is not None:
            return  # already closing (a goodbye, a quit, an earlier cut): nothing to cut
        log.info("%r: cut off: %s", self, reason)
        self._leave_reason = "too slow"
        if self.mode == "json":
            final = wire.encode_error("too-slow", reason, fatal=True)
        else:
            final = textmode.error(f"disconnected: {reason}")
        self.outbox.close_with(final, "too slow", grace=CUT_NOTICE_GRACE_S)

    def goodbye(self, reason: str) -> None:
        """Say goodbye and close once it is sent (server shutdown)."""
        self._leave_reason = reason
        final = (wire.encode_bye(reason) if self.mode == "json"
                 else textmode.notice(f"{reason} -- bye!"))
        self.outbox.close_with(final, reason, keep_queued=True)

    # the reader thread -------------------------------------------------------------

    def run(self) -> None:
        try:
            if self.kind == "pending":
                self._serve_pending()
            else:
                session = self._greet()
                if session is not None:
                    session()
        except (_Flooding, _TimedOut) as exc:
            self._leave_reason = "flooding" if isinstance(exc, _Flooding) else "timed out"
            log.info("%r: %s; dropping the connection", self, exc)
            self.outbox.close_with(self._fatal_bytes(exc.code, str(exc)), str(exc),
                                   keep_queued=True)
        except FrameTooLong as exc:
            self._leave_reason = "line too long"
            self.outbox.close_with(self._fatal_bytes("frame-too-long", str(exc)), str(exc),
                                   keep_queued=True)
        except (ConnectionError, TimeoutError) as exc:
            self._leave_reason = "connection lost"
            log.debug("%r: %s", self, exc)
        except OSError as exc:
            self._leave_reason = "connection lost"
            log.debug("%r: %s", self, exc)
        except ClosedError:
            self._leave_reason = "server shutting down"
        except Exception:  # a bug must cost this client its connection, never the hub
            log.exception("%r: unexpected error; dropping the connection", self)
        finally:
            self._teardown()

    def _fatal_bytes(self, code: str, text: str) -> bytes:
        if self.mode == "json":
            return wire.encode_error(code, text, fatal=True)
        return textmode.error(f"{text} -- disconnecting")

    def _chunks(self) -> Any:
        """Yield the frames of each ``recv`` as one list (so a burst is handled as one).

        Raises :class:`_TimedOut` when ``self._deadline`` (monotonic; the
        nickname prompt) passes before the next frame, or when an unfinished
        line has been held for the hub's line timeout (slow loris).

        The reader waits in ``poll``, not in ``recv``: ``recv(n)`` allocates its
        n-byte result before it blocks, and thousands of idle readers each holding
        a 4 KiB buffer were 3.4 KiB of every idle connection's memory.  The extra
        syscall per read is skipped after a read that filled the buffer.
        """
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        decoder = self.decoder
        line_timeout = self.hub.line_timeout
        line_due: float | None = None  # when the unfinished line in the decoder runs out
        size = RECV_SMALL_BYTES  # a read that fills it means a burst: RECV_BYTES next
        while True:
            due, why = self._deadline, self._deadline_why
            if line_due is not None and (due is None or line_due < due):
                due, why = line_due, f"line not finished within {line_timeout:g} s"
            if due is not None:
                remaining = due - time.monotonic()
                if remaining <= 0 or not poller.poll(remaining * 1000):
                    raise _TimedOut(why)
            elif size == RECV_SMALL_BYTES:
                poller.poll()  # wait holding no buffer: recv allocates its result first
            data = self.sock.recv(size)
            size = RECV_BYTES if len(data) == size else RECV_SMALL_BYTES  # full: a burst
            if not data:
                pending = decoder.eof()
                if pending:
                    log.debug("%r: dropped %d bytes of an unfinished line", self, len(pending))
                return
            frames = decoder.feed(data)
            if decoder.pending:
                if frames or line_due is None:  # a new unfinished line began in this data
                    line_due = time.monotonic() + line_timeout
            else:
                line_due = None
            if frames:
                yield frames

    def _serve_pending(self) -> None:
        """Over a client limit: serve a daemon's link, refuse anyone else with one line."""
        assert self.refusal is not None
        code, text = self.refusal
        self._deadline = time.monotonic() + LINK_HELLO_GRACE_S
        self._deadline_why = "no hello"
        chunks = self._chunks()
        try:
            chunk = next(chunks, None)
        except _TimedOut:
            chunk = None
        first = chunk[0] if chunk else b""
        if first.lstrip().startswith(b"{"):
            try:
                role = wire.parse_hello(first).role
            except (RemoteProtocolError, ValidationError):
                role = None
            if role == "daemon":
                self.mode = "json"
                self._deadline = None
                assert chunk is not None
                self._serve_json(first, chunk[1:], chunks)
                return
            final = wire.encode_error(code, text, fatal=True)
        else:
            final = textmode.error(text)
        log.info("%r: refused: %s", self, text)
        self.outbox.close_with(final, "refused")

    def _greet(self) -> Callable[[], None] | None:
        """Greet, take the nickname (or a JSON hello); return the rest of the session.

        The rest is returned, not called, so that this frame -- the prompt's
        loop state and the first lines read -- is gone while the session runs
        (0.6 KiB of every idle connection).  None: the connection is done.
        """
        self._send(textmode.greeting(self.hub.name))
        self._deadline = time.monotonic() + self.hub.nick_timeout
        self._deadline_why = f"no nickname chosen within {self.hub.nick_timeout:g} s"
        chunks = self._chunks()
        attempts = 0
        first = True
        for chunk in chunks:
            now = time.monotonic()
            for i, frame in enumerate(chunk):
                if first and frame.lstrip().startswith(b"{"):
                    self.mode = "json"
                    self._deadline = None
                    return functools.partial(self._serve_json, frame, chunk[i + 1:], chunks)
                first = False
                if self.hub.key is not None and not self.hub.plain_clients:
                    self.outbox.close_with(textmode.error(SECRET_REQUIRED), "no secret",
                                           keep_queued=True)
                    return None
                if not self.admit_command(now):  # answers to the prompt are commands too
                    continue
                try:
                    nick = decode_utf8(frame).strip()
                except RemoteProtocolError:
                    self.error("bad-utf8", "that was not valid UTF-8; choose a nickname:")
                    continue
                if not nick:
                    self.notice("Choose a nickname:")
                    continue
                attempts += 1
                if self.try_join(nick, last=attempts >= MAX_NICK_ATTEMPTS):
                    self._deadline = None
                    rest = itertools.chain([chunk[i + 1:]], chunks)  # what came after this frame
                    return functools.partial(self._serve_text, rest)
                if attempts >= MAX_NICK_ATTEMPTS:
                    self.outbox.close_with(textmode.error(
                        f"no nickname chosen in {MAX_NICK_ATTEMPTS} attempts -- disconnecting"),
                        "no nick", keep_queued=True)
                    return None
        return None

    def _serve_text(self, chunks: Any) -> None:
        for chunk in chunks:
            now = time.monotonic()
            says: list[Say] = []
            for frame in chunk:
                try:
                    command = textmode.parse_line(decode_utf8(frame))
                    if command is None or not self.admit(command, now):
                        continue
                    if isinstance(command, Say):
                        says.append(command)  # published together: one router operation
                        continue
                    self._say_many(says)
                    says = []
                    if not self.handle(command):
                        self._leave_reason = (command.reason if isinstance(command, Quit)
                                              else "quit")
                        self.outbox.close_with(textmode.notice("Bye!"), "quit",
                                               keep_queued=True)
                        return
                except (ValidationError, RemoteProtocolError) as exc:
                    self.error(exc.code, str(exc))
            self._say_many(says)

    def _serve_json(self, first: bytes, pending: list[bytes], chunks: Any) -> None:
        try:
            hello = wire.parse_hello(first)
        except (RemoteProtocolError, ValidationError) as exc:
            self.outbox.close_with(wire.encode_error(exc.code, str(exc), fatal=True), "bad hello")
            return
        if hello.role == "daemon":
            acceptor = self.hub.link_acceptor
            if acceptor is None:
                self.outbox.close_with(
                    wire.encode_error("no-links", "this hub does not accept daemon links",
                                      fatal=True), "no links")
                return
            refusal = self.hub._become_handshake(self)
            if refusal is not None:
                self.outbox.close_with(wire.encode_error("too-many-handshakes", refusal,
                                                         fatal=True), "too many handshakes")
                return
            acceptor.accept_link(self.sock, self.address, hello, self.decoder, pending,
                                 admit=functools.partial(self.hub._become_link, self))
            return
        if hello.room is not None:
            self.room = hello.room
        assert hello.nick is not None
        frames = itertools.chain(pending, itertools.chain.from_iterable(chunks))
        if self.hub.key is not None and not self._authenticated(hello.nick, frames):
            return
        try:
            users = self.hub.backend.join(self, nick=hello.nick, host=self.host, via="json",
                                          room=self.room)
        except NickInUse as exc:
            self.outbox.close_with(wire.encode_error(exc.code, str(exc), fatal=True), "nick")
            return
        self.nick = hello.nick
        self.welcome(users)
        for frame in frames:
            try:
                command = wire.parse_command(frame)
                if not self.admit(command, time.monotonic()):
                    continue
                if not self.handle(command):
                    self._leave_reason = command.reason if isinstance(command, Quit) else "quit"
                    self.outbox.close_with(wire.encode_bye("goodbye"), "quit", keep_queued=True)
                    return
            except (ValidationError, RemoteProtocolError) as exc:
                self._protocol_errors += 1
                if self._protocol_errors > MAX_PROTOCOL_ERRORS:
                    self.outbox.close_with(wire.encode_error(
                        "too-many-errors", "too many protocol errors", fatal=True), "errors")
                    return
                self.error(exc.code, str(exc))

    def _authenticated(self, nick: str, frames: Any) -> bool:
        """Challenge a JSON client for the shared secret; False (and closed) if it fails."""
        assert self.hub.key is not None
        nonce = secrets.token_hex(auth.NONCE_BYTES)
        self._send(wire.encode_challenge(nonce))
        self._deadline = time.monotonic() + self.hub.nick_timeout
        self._deadline_why = "no answer to the challenge in time"
        frame = next(frames, None)
        self._deadline = None
        given = None
        if frame is not None:
            with contextlib.suppress(RemoteProtocolError):
                answer = loads_line(frame)
                if isinstance(answer, dict) and answer.get("type") == "auth":
                    given = answer.get("proof")
        if auth.check_proof(self.hub.key, given, "client", nonce, nick):
            return True
        log.warning("%s: refused a client that cannot prove the shared secret", self.host)
        self.outbox.close_with(wire.encode_error(
            "auth-failed", "this hub requires the shared secret", fatal=True), "auth failed")
        return False

    def _teardown(self) -> None:
        # Free the connection slot first: once the others see "left", it can be taken.
        self.hub._release(self)
        if self.outbox.stalled:
            self._leave_reason = "too slow"
        if self.nick is not None:
            self.hub.backend.leave(self, self._leave_reason)
        self.outbox.close(self._leave_reason)
        self.outbox.join(SHUTDOWN_FLUSH_S + 1)
        self.sock.close()
        self.hub._forget(self)


class _UdpSession(_Session):
    """A UDP client, known by its address; lives on the hub's UDP thread."""

    via = "udp"

    def __init__(self, hub: Hub, endpoint: _UdpEndpoint, address: tuple[Any, ...]) -> None:
        super().__init__(hub, _host_of(address), f"udp {address[0]}:{address[1]}")
        self.endpoint = endpoint
        self.address = address
        self.last_seen = time.monotonic()

    def _send(self, data: bytes) -> bool:
        self.endpoint.send(data, self.address)
        return True  # datagrams may be lost; a UDP client is never "too slow"


class _UdpEndpoint:
    """The UDP twin: one thread receives every datagram and expires silent clients."""

    def __init__(self, hub: Hub, sock: socket.socket) -> None:
        self.hub = hub
        self.sock = sock
        self.clients: dict[tuple[Any, ...], _UdpSession] = {}  # UDP thread only
        self._per_ip: dict[str, int] = {}  # UDP thread only: registered clients per host
        # UDP thread only: how many answers an address that is not a client may get.
        scale = hub.udp_stranger_scale
        self._strangers = SourceBuckets(UDP_UNREGISTERED_RATE * scale, UDP_UNREGISTERED_BURST,
                                        max_sources=MAX_TRACKED_SOURCES)
        self._strangers_total = TokenBucket(UDP_UNREGISTERED_TOTAL_RATE * scale,
                                            UDP_UNREGISTERED_TOTAL_BURST)
        self.thread = threading.Thread(target=self.run, name="hub-udp", daemon=False)
        self._closing = False

    def send(self, data: bytes, address: tuple[Any, ...]) -> None:
        try:
            self.sock.sendto(data[:MAX_DATAGRAM_BYTES], socket.MSG_DONTWAIT, address)
        except OSError as exc:  # full buffer or unreachable: UDP is allowed to lose it
            log.debug("udp send to %s failed: %s", address, exc)

    def run(self) -> None:
        while not self._closing:
            timeout = self._expire()
            try:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    continue
                data, address = self.sock.recvfrom(MAX_DATAGRAM_BYTES + 1)
            except OSError as exc:
                if self._closing:
                    break
                log.debug("udp receive failed: %s", exc)
                continue
            if self._closing or address is None:
                break
            try:
                self._datagram(data, address)
            except ClosedError:
                break
            except Exception:  # one bad datagram must not stop UDP for everyone
                log.exception("udp: unexpected error handling a datagram from %s", address)
        for session in list(self.clients.values()):
            self.hub.backend.leave(session, "server shutting down")
        self.clients.clear()

    def _expire(self) -> float | None:
        """Forget clients silent for the hub's ``udp_idle_timeout``; seconds to the next expiry."""
        if not self.clients:
            return None
        now = time.monotonic()
        next_due: float | None = None
        for address, session in list(self.clients.items()):
            due = session.last_seen + self.hub.udp_idle_timeout
            if due <= now:
                self._forget(address, "timed out")
                self.send(textmode.notice("you were silent too long and have been forgotten"),
                          address)
            elif next_due is None or due < next_due:
                next_due = due
        return None if next_due is None else max(0.0, next_due - now)

    def _datagram(self, data: bytes, address: tuple[Any, ...]) -> None:
        session = self.clients.get(address)
        if session is None and not self._may_answer(address):
            return  # an unproven address gets a bounded number of answers, then silence
        if len(data) > MAX_DATAGRAM_BYTES:
            self.send(textmode.error(f"datagram larger than {MAX_DATAGRAM_BYTES} bytes"), address)
            return
        try:
            lines = decode_utf8(data).splitlines() or [""]
        except RemoteProtocolError as exc:
            self.send(textmode.error(str(exc)), address)
            return
        if session is None:
            self._register(lines[0].strip(), address)
            return
        now = session.last_seen = time.monotonic()
        for text in lines:
            try:
                command = textmode.parse_line(text)
                if command is None:
                    continue  # an empty datagram is a keepalive
                if not session.admit(command, now):
                    continue
                if not session.handle(command):
                    self._forget(address, "quit")
                    session.notice("Bye!")
                    return
            except (ValidationError, RemoteProtocolError) as exc:
                session.error(exc.code, str(exc))
            except _Flooding as exc:
                log.info("%r: %s; forgetting it", session, exc)
                self._forget(address, "flooding")
                self.send(textmode.error(f"{exc} -- disconnecting"), address)
                return

    def _may_answer(self, address: tuple[Any, ...]) -> bool:
        """May a datagram from an address that is not a client get an answer (or a join)?

        Its source may be forged -- a victim's -- so answers to strangers are
        rate-limited per address and in all (UDP_UNREGISTERED_*).
        """
        now = time.monotonic()
        return (self._strangers.take(_host_of(address), now)
                and self._strangers_total.take(now))

    def _register(self, nick: str, address: tuple[Any, ...]) -> None:
        if self.hub.key is not None and not self.hub.plain_clients:
            self.send(textmode.error(SECRET_REQUIRED), address)
            return
        if not nick or nick.startswith("/"):
            self.send(textmode.greeting(self.hub.name), address)
            return
        if len(self.clients) >= MAX_UDP_CLIENTS:
            self.send(textmode.error(f"too many UDP clients (limit {MAX_UDP_CLIENTS}); try TCP"),
                      address)
            return
        host = _host_of(address)
        if self._per_ip.get(host, 0) >= MAX_UDP_CLIENTS_PER_IP:
            self.send(textmode.error("too many UDP clients from your address "
                                     f"(limit {MAX_UDP_CLIENTS_PER_IP})"), address)
            return
        session = _UdpSession(self.hub, self, address)
        if session.try_join(nick):
            self.clients[address] = session
            self._per_ip[host] = self._per_ip.get(host, 0) + 1

    def _forget(self, address: tuple[Any, ...], reason: str) -> None:
        """Unregister the client at ``address`` and tell the router it left."""
        session = self.clients.pop(address)
        host = _host_of(address)
        left = self._per_ip.get(host, 1) - 1
        if left > 0:
            self._per_ip[host] = left
        else:
            self._per_ip.pop(host, None)
        self.hub.backend.leave(session, reason)

    def close(self) -> None:
        self._closing = True
        # shutdown() on a UDP socket wakes a blocked recvfrom on Linux (it reports ENOTCONN).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


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
    (``UDP_UNREGISTERED_*``; tests only).
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
                 key: bytes | None = None, plain_clients: bool = False) -> None:
        if max_rate < 0 or max_connections < 1 or max_connections_per_ip < 0:
            raise ValueError("max_rate and max_connections_per_ip must be >= 0, "
                             "max_connections >= 1")
        self.backend = backend
        self.name = name
        #: The shared secret (lanchat.auth): JSON clients must prove it, and text-mode
        #: and UDP clients -- who cannot -- are refused unless ``plain_clients``.
        self.key = key
        self.plain_clients = plain_clients
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
        self._sessions: set[_TcpSession] = set()
        self._closed = False
        self._clients = 0                   # sessions of kind "client"
        self._per_ip: dict[str, int] = {}   # "client" sessions per source address
        self._pending = 0                   # sessions of kind "pending"
        self._links = 0                     # sessions of kind "link"
        # sessions of kind "handshake" (when each began, monotonic), and per address
        self._handshakes: dict[_TcpSession, float] = {}
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
        self._udp: _UdpEndpoint | None = None
        if udp:
            usock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                usock.bind((bind, self.address[1]))
            except OSError:
                usock.close()
                self._listener.close()
                raise
            self._udp = _UdpEndpoint(self, usock)
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
        self._accept_thread.start()
        if self._udp is not None:
            self._udp.thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept connections: %s; retrying", exc.strerror)
                    time.sleep(ACCEPT_BACKOFF_S)
                continue
            try:
                _tune(sock)
            except OSError as exc:  # reset before we got to it
                log.debug("accepted %s but could not set it up: %s", address, exc)
                sock.close()
                continue
            session = _TcpSession(self, sock, address, next(self._counter))
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                refusal = self._count_in(session)
                if session.kind is not None:
                    self._sessions.add(session)
            if session.kind is None:
                assert refusal is not None
                self._refuse_now(sock, address, refusal)
                continue
            try:
                session.thread.start()
            except RuntimeError as exc:  # can't start a new thread: refuse this one
                log.warning("cannot serve %s: %s", address, exc)
                self._forget(session)
                sock.close()

    def _count_in(self, session: _TcpSession) -> str | None:
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

    def _count_out(self, session: _TcpSession) -> None:
        """Under the lock: undo :meth:`_count_in` (or :meth:`_become_link`)."""
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

    def _become_handshake(self, session: _TcpSession) -> str | None:
        """``session`` says it is a daemon: count it as a link handshake, not as a client.

        A handshake holds no link slot -- only a proven daemon does (see
        :meth:`_become_link`) -- and has LINK_HANDSHAKE_TIMEOUT_S to finish.  At
        most MAX_LINK_HANDSHAKES_PER_IP run from one address (the refusal text
        otherwise) and MAX_LINK_HANDSHAKES in all: a newcomer past that evicts
        the oldest, so a crowd of connections that never finish their handshake
        delays a real daemon (milliseconds from hello to proof) at most briefly.
        """
        evicted: _TcpSession | None = None
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
                evicted.sock.shutdown(socket.SHUT_RDWR)  # its thread ends the handshake
        return None

    def _become_link(self, session: _TcpSession) -> bool:
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

    def _release(self, session: _TcpSession) -> None:
        """Stop counting ``session`` against any limit (its reader is ending)."""
        with self._lock:
            self._count_out(session)

    def _forget(self, session: _TcpSession) -> None:
        with self._lock:
            self._sessions.discard(session)
            self._count_out(session)

    def close(self, reason: str = "server shutting down",
              timeout: float | None = None) -> None:
        """Stop accepting, say goodbye to everyone, and join all threads.

        Goodbyes get SHUTDOWN_FLUSH_S (+ 2) seconds in all to leave, or
        ``timeout`` if less; then every connection still open is shut down at
        once, and its reader gets one more second.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        if self._accept_thread.is_alive():
            self._accept_thread.join()
        self._listener.close()
        for session in sessions:
            session.goodbye(reason)
        flush = SHUTDOWN_FLUSH_S + 2 if timeout is None else min(timeout, SHUTDOWN_FLUSH_S + 2)
        deadline = time.monotonic() + flush
        for session in sessions:
            session.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [s for s in sessions if s.thread.is_alive()]
        for session in stuck:  # a handed-over link or a stuck peer: force it, all at once
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 1.0
        for session in stuck:
            session.thread.join(max(0.0, deadline - time.monotonic()))
        if self._udp is not None:
            self._udp.close()
            if self._udp.thread.is_alive():
                self._udp.thread.join()
            self._udp.sock.close()
