"""A hub user, whatever the transport: its commands, its limits, what it is sent.

The sans-I/O half of the hub.  :class:`Session` turns the commands of a client
(:mod:`lanchat.commands`, from text mode, JSON mode or UDP) into calls on the
router and renders what the client is told; it never touches a socket.  Its
subclasses -- :class:`lanchat.hubconn.TcpConn` (a TCP connection driven by an
I/O loop) and :class:`lanchat.hubudp.UdpSession` -- say how bytes reach the
client (:meth:`Session._send`).

Imports point one way: ``hub`` -> ``hubloop`` -> ``hubconn`` -> ``hubsession``,
and ``hub`` -> ``hubudp`` -> ``hubsession``; none of these imports ``hub``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lanchat import textmode, wire
from lanchat.commands import (
    Command,
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
    LanchatError,
    NickInUse,
    NoSuchUser,
    RouterTimeout,
    ValidationError,
)
from lanchat.events import Batch, Event, encode_all
from lanchat.limits import FLOOD_FACTOR, SOURCE_RATE_FACTOR
from lanchat.model import DEFAULT_ROOM, Draft, Message, User
from lanchat.ratelimit import ConnectionLimiter, Verdict
from lanchat.render import is_action

log = logging.getLogger(__name__)

#: What a text-mode or UDP client is told by a hub that requires the shared secret.
SECRET_REQUIRED = ("this hub requires the shared secret: join with "
                   "lanchat connect --secret-file FILE HOST -- bye")

#: What a plain (unencrypted) client hears from a hub configured with
#: ``plain_clients = false`` (TCP text or JSON without TLS, and UDP).
TLS_REQUIRED = ("this hub accepts only encrypted clients: join with lanchat connect HOST "
                "(or openssl s_client -connect HOST:PORT) -- bye")


def plain_refused(hub: SessionHub) -> bool:
    """True when the hub refuses plain clients (``plain_clients = false``, set explicitly)."""
    return hub.plain_clients is False


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
    def publish_all(self, items: Sequence[tuple[Draft, object | None,
                    Callable[[Message | None, LanchatError | None], None] | None]]
                    ) -> None: ...
    def barrier(self) -> None: ...


class SessionHub(Protocol):
    """What a session needs of its hub (:class:`lanchat.hub.Hub`)."""

    backend: HubBackend
    name: str
    max_rate: float
    key: bytes | None
    #: None (unset): plain clients allowed; with a secret, those that cannot prove it
    #: (text mode, UDP) refused.  True: all allowed.  False: only TLS clients.
    plain_clients: bool | None

    def source_allows(self, host: str, now: float) -> bool: ...


def text_message(msg: Message) -> bytes:
    """A message's text-mode lines, marked if it claims a time far ahead of our clock.

    Module level, so that :meth:`Event.encoded` renders it once for every text
    client (the cache is keyed by the encoder).
    """
    return textmode.encode_message(msg, now=time.time())


def host_of(address: tuple[Any, ...]) -> str:
    return str(address[0])


class Flooding(Exception):
    """A client kept sending far past its limit; the text says which limit."""

    code = "flooding"


class TimedOut(Exception):
    """A reader deadline passed (nickname prompt, unfinished line); the text says which."""

    code = "timeout"


class Session:
    """A hub user, whatever the transport: handles its commands, receives its events.

    Subclasses say how bytes reach the user (:meth:`_send`).  ``mode`` is
    ``"text"`` or ``"json"``.  Thread-safety: :meth:`handle` runs on the thread
    of the I/O loop that owns the connection (or the UDP thread); :meth:`deliver`
    on the router thread.  They share only immutable state and the transport.
    """

    __slots__ = ("_limiter", "_unsettled", "host", "hub", "label", "mode", "nick", "room")

    via = "tcp"

    def __init__(self, hub: SessionHub, host: str, label: str) -> None:
        self.hub = hub
        self.host = host
        self.label = label
        self.mode = "text"
        self.nick: str | None = None
        self.room = DEFAULT_ROOM
        self._limiter: ConnectionLimiter | None = None
        # said something the router may not have stored yet (session thread only)
        self._unsettled = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} {self.nick or '?'}>"

    # transport ------------------------------------------------------------------

    def _send(self, data: bytes) -> bool:
        raise NotImplementedError

    # router side -------------------------------------------------------------------

    def deliver(self, events: Sequence[Event]) -> bool:
        json_mode = self.mode == "json"
        enc_m = wire.encode_message if json_mode else text_message
        enc_p = wire.encode_presence if json_mode else textmode.encode_presence
        if len(events) == 1:
            e = events[0]
            return self._send(e.encoded(enc_m if isinstance(e.item, Message) else enc_p))
        if isinstance(events, Batch):
            return self._send(events.joined(enc_m, enc_p))
        return self._send(encode_all(events, enc_m, enc_p))

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
        client flooding far past its limit raises :class:`Flooding`.  Quit is
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
            raise Flooding(f"flooding: more than {rate * FLOOD_FACTOR:g} {what}")
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
        """Carry out one command.  Returns False when the user quits.

        A command other than a message waits until what this session said before
        it is stored (:meth:`_settle`): its answer never overtakes those lines.
        """
        backend = self.hub.backend
        assert self.nick is not None
        if self._unsettled and not isinstance(command, Say | Quit):
            self._settle()
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

    def _settle(self) -> None:
        """Wait until the router has stored what this session said (see Router.barrier).

        A message only queues at the router, while a command is answered at once,
        partly from the router's state (``/users``): without this, ``/users`` right
        after a line is answered before that line is stored, and a JSON client gets
        the ``users`` answer before the ``sent`` of its say.  Costs one router round
        trip, and only for the first command after something was said.
        """
        self._unsettled = False
        try:
            self.hub.backend.barrier()
        except RouterTimeout as exc:  # the router is stuck: answer anyway, unordered
            log.warning("%r: answering without waiting for the router: %s", self, exc)

    def _confirm(self, text: str, users: list[User] | None) -> None:
        assert self.nick is not None
        if self.mode == "json":
            self._send(wire.encode_joined(self.nick, self.room))
        elif users is None:
            self.notice(text)
        else:
            self.notice(f"{text}{textmode.company(self._others(users))}")

    def _list_users(self) -> None:
        users = self.hub.backend.users(self.room)
        if self.mode == "json":
            self._send(wire.encode_users(self.room, users))
            return
        names = ", ".join((u.nick if u.local else f"{u.nick}@{u.host}")
                          + (" (plain)" if u.plain else "") for u in users)
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

        self._unsettled = True
        self._publish([draft], done)

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
        self._unsettled = True
        self._publish(drafts, self._published)

    def _publish(self, drafts: list[Draft],
                 done: Callable[[Message | None, LanchatError | None], None]) -> None:
        """Hand ``drafts`` to the router (a TCP connection defers them to its loop's round)."""
        self.hub.backend.publish_many(drafts, source=self, done=done)

    def _published(self, msg: Message | None, err: LanchatError | None) -> None:
        """A text-mode line was stored (or refused).  The sender is not sent their own
        message back (it is on their screen already) -- except an action or a direct
        message, shown as the others see it (``* bob waves``, ``bob -> alice: hi``), so
        that they see that it went out and how, as in irssi."""
        if err is not None:
            self._not_sent(err)
        elif msg is not None and self.mode == "text" and (
                msg.to is not None or is_action(msg.text)):
            self._send(text_message(msg))

    def _not_sent(self, err: LanchatError) -> None:
        """Tell the client its message was not sent (a bad addressee says only that)."""
        if isinstance(err, NoSuchUser | AmbiguousUser):
            self.error(err.code, str(err))
        else:
            self.error(err.code, f"your message was not sent: {err}")

