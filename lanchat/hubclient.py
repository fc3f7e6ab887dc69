"""``lanchat connect``: the interactive client of a hub, over TCP (JSON mode) or UDP.

A receiver thread reads the hub and prints what arrives while the main thread
reads the user's lines; ``/quit`` or Ctrl-D leaves cleanly (exit 0), Ctrl-C
quietly (exit 130), a hub that goes away with a one-line message on stderr
(exit 1).  Everything from the network is printed through :mod:`lanchat.render`,
so no nick or text can drive the terminal.

TCP speaks the hub's JSON mode (``lanchat-protocol(7)``): ``hello`` then
``say``/``join``/``nick``/``users``/``bye`` frames -- over TLS 1.3 by default
(issue 14).  The hub's key is pinned trust-on-first-use, like SSH's
``known_hosts``: ``known_hubs`` in the user's state directory
(:mod:`lanchat.pinfile`), the fingerprint shown at first contact, and a hub
whose key changed is refused before anything is sent (:func:`lanchat.pins.decide_hub`),
until ``--accept-key NODE``.  ``--no-tls`` speaks clear text to an old hub.
The hub greets every TCP connection in text first; those lines (anything not
starting with ``{``) are skipped until ``welcome``.  ``--udp`` speaks UDP text
mode instead: the first datagram is the nick, each further datagram one typed
line, and an empty datagram every :data:`UDP_KEEPALIVE_S` keeps the registration alive.

With no HOST, hubs are found by mDNS through :mod:`lanchat.discovery`, imported
lazily so that ``zeroconf`` is loaded only on that path.

Thread-safety: the main thread owns stdin and sending; the receiver thread owns
receiving; both print through one :class:`_Printer` over a
:class:`lanchat.lineedit.LineConsole` (whole lines; on a terminal, readline editing and
incoming lines printed above the half-typed one).  The receiver wakes the main thread
out of its wait on stdin through a self-pipe, or the console's signal under readline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from lanchat import auth, pinfile, textmode, tlsid
from lanchat.commands import Command, Help, Join, ListUsers, Nick, Ping, Quit, Say, Unknown
from lanchat.config import DEFAULT_PORT, default_nick, sanitize_nick
from lanchat.errors import LanchatError, RemoteProtocolError, ValidationError
from lanchat.fields import validate_node
from lanchat.framing import LineDecoder, dumps_line, loads_line
from lanchat.limits import MAX_DATAGRAM_BYTES, MAX_RPC_LINE_BYTES, UDP_IDLE_TIMEOUT_S
from lanchat.lineedit import LineConsole
from lanchat.model import Message, Presence, validate_nick
from lanchat.pins import HUBS_HEADER, HubDecision, PinFileError, Pins, decide_hub, hub_name
from lanchat.render import format_message, format_presence, neutralise
from lanchat.textmode import HELP_LINES, parse_line
from lanchat.wire import VERSION, encode_auth

log = logging.getLogger(__name__)

PROG = "lanchat"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Seconds to connect and to receive the ``welcome`` (or the UDP welcome datagram).
CONNECT_TIMEOUT_S = 10.0

#: Seconds to wait, after sending ``bye``, for the hub to close its side.
BYE_WAIT_S = 2.0

#: Seconds between UDP keepalives: well inside the hub's UDP_IDLE_TIMEOUT_S (120 s).
UDP_KEEPALIVE_S = 30.0
assert UDP_KEEPALIVE_S * 3 < UDP_IDLE_TIMEOUT_S

#: Longest line accepted from a hub.  A ``users`` frame lists a whole room, which can be far
#: longer than one chat frame; this only stops a runaway server.
MAX_HUB_LINE_BYTES = MAX_RPC_LINE_BYTES

#: Seconds ``lanchat connect`` without a host listens for mDNS adverts.
BROWSE_TIMEOUT_S = 3.0

#: Longest stdin read at once.
_READ_BYTES = 65536


class ConnectError(LanchatError):
    """A failure to report as ``lanchat: <message>`` with exit status ``status``."""

    code = "connect"

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Security:
    """How a TCP session protects itself: ``lanchat connect``'s options.

    ``key``: the network's shared secret (``--secret-file``).  ``tls``: TLS 1.3 with the
    hub's key pinned in ``known_hubs`` (False: ``--no-tls``, clear text).
    ``accept_key``: ``--accept-key NODE``, the node id a changed hub key must have to be
    accepted.  ``pins_path``: the pin file (default: :func:`pinfile.known_hubs_path`).
    """

    key: bytes | None = None
    tls: bool = True
    accept_key: str | None = None
    pins_path: str | None = None


# -- pure helpers -------------------------------------------------------------------------------

def parse_target(target: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6ADDR]:PORT`` or a bare IPv6 address -> (host, port).

    Raises :class:`ConnectError` (exit 2) for an empty host or a bad port.
    """
    host, port_s = target, ""
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise ConnectError(f"bad address {target!r}: missing ']'", EXIT_USAGE)
        host, rest = target[1:end], target[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConnectError(f"bad address {target!r}", EXIT_USAGE)
            port_s = rest[1:]
    elif target.count(":") == 1:
        host, port_s = target.split(":")
    if not host:
        raise ConnectError(f"bad address {target!r}: no host", EXIT_USAGE)
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConnectError(f"bad port {port_s!r} in {target!r}", EXIT_USAGE)
    return host, int(port_s)


def hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 addresses bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_command(command: Command) -> bytes | None:
    """The JSON-mode frame for a typed command, or None for one handled locally (/help,
    unknown commands).  ``/me ACTION`` is a ``say`` whose text starts with ``/me ``, as the
    hub renders it."""
    if isinstance(command, Say):
        frame: dict[str, Any] = {"type": "say", "text": command.text}
        if command.to is not None:
            frame["to"] = command.to
        if command.ref is not None:
            frame["ref"] = command.ref
        return dumps_line(frame)
    if isinstance(command, Join):
        return dumps_line({"type": "join", "room": command.room})
    if isinstance(command, Nick):
        return dumps_line({"type": "nick", "nick": command.nick})
    if isinstance(command, ListUsers):
        return dumps_line({"type": "users"})
    if isinstance(command, Ping):
        return dumps_line({"type": "ping", "t": command.token})
    if isinstance(command, Quit):
        return dumps_line({"type": "bye", "reason": command.reason})
    return None


def encode_hello(nick: str, room: str | None = None) -> bytes:
    """The first frame of a JSON-mode connection."""
    frame: dict[str, Any] = {"type": "hello", "v": VERSION, "nick": nick, "client": "lanchat"}
    if room is not None:
        frame["room"] = room
    return dumps_line(frame)


def _users_line(room: str, users: object) -> str:
    names: list[str] = []
    if isinstance(users, list):
        for u in users:
            if isinstance(u, dict) and isinstance(u.get("nick"), str):
                local = u.get("local", True)
                host = u.get("host")
                names.append((u["nick"] if local or not isinstance(host, str)
                              else f"{u['nick']}@{host}")
                             + (" (plain)" if u.get("plain") is True else ""))
    return neutralise(f"* In #{room} ({len(names)}): {', '.join(names)}")


class HubAd(Protocol):
    """What the hub chooser needs of a discovered hub (``discovery.PeerAd`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def addresses(self) -> tuple[str, ...]: ...
    @property
    def port(self) -> int: ...


def hub_lines(hubs: Sequence[HubAd]) -> list[str]:
    """The numbered list shown when several hubs answer: ``  1. name  address:port``."""
    return [f"  {i}. {neutralise(h.name)}  "
            f"{hostport(h.addresses[0], h.port) if h.addresses else '?'}"
            for i, h in enumerate(hubs, 1)]


def choose_hub(hubs: Sequence[HubAd], ask: Callable[[str], str] | None) -> tuple[str, int]:
    """Pick the hub to connect to from what mDNS found.

    One hub: that one.  Several: ``ask`` (a prompt function; None when stdin is not a
    terminal) chooses by number, else :class:`ConnectError` (exit 2) with the list.  None:
    :class:`ConnectError` (exit 1).  Hubs without an address are ignored.
    """
    usable = [h for h in hubs if h.addresses]
    if not usable:
        raise ConnectError("no lanchat hub found on the local network; "
                           "give one: lanchat connect HOST[:PORT]")
    if len(usable) == 1:
        return usable[0].addresses[0], usable[0].port
    listing = "\n".join(hub_lines(usable))
    if ask is None:
        raise ConnectError(f"{len(usable)} hubs found; choose one with "
                           f"lanchat connect HOST[:PORT]:\n{listing}", EXIT_USAGE)
    for _ in range(3):
        answer = ask(f"{listing}\nWhich hub (1-{len(usable)})? ").strip()
        if answer.isdigit() and 1 <= int(answer) <= len(usable):
            chosen = usable[int(answer) - 1]
            return chosen.addresses[0], chosen.port
    raise ConnectError("no hub chosen", EXIT_USAGE)


# -- output -------------------------------------------------------------------------------------

class _Printer:
    """Whole lines to stdout (chat) and stderr (errors) through the line console, which
    never interleaves two lines and, on a terminal, prints them above the line being typed.
    A closed stdout (the reader of a pipe went away) is remembered, not raised on a
    receiver thread."""

    def __init__(self, console: LineConsole) -> None:
        self.console = console

    @property
    def broken(self) -> bool:
        return self.console.broken

    def out(self, text: str) -> None:
        self.console.out(text)

    def error(self, text: str) -> None:
        self.console.err(f"{PROG}: {text}")

    def note(self, text: str) -> None:
        """A local remark (``! ...`` from the hub, usage hints) on stderr."""
        self.console.err(text)


# -- stdin --------------------------------------------------------------------------------------

class _Stdin:
    """Line reader over a file descriptor that can wait for stdin *or* a wake-up pipe, so the
    receiver thread can end the main thread's wait without signals."""

    def __init__(self, fd: int, wake_fd: int) -> None:
        self.fd = fd
        self.wake_fd = wake_fd
        self._buf = b""
        self._eof = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._poll.register(wake_fd, select.POLLIN)

    def lines(self) -> list[str] | None:
        """The next complete lines (possibly none yet); None at EOF or when woken."""
        if self._eof:
            return None
        events = dict(self._poll.poll())
        if self.wake_fd in events:
            return None
        if self.fd not in events:
            return []
        data = os.read(self.fd, _READ_BYTES)
        if not data:
            self._eof = True
            rest, self._buf = self._buf, b""
            return [rest.decode("utf-8", "replace").rstrip("\r")] if rest else None
        *complete, self._buf = (self._buf + data).split(b"\n")
        return [c.decode("utf-8", "replace").rstrip("\r") for c in complete]


def _help(printer: _Printer) -> None:
    for line in HELP_LINES:
        printer.out(line)


# -- TCP (JSON mode) ----------------------------------------------------------------------------

@dataclass
class _Welcome:
    name: str
    nick: str
    room: str
    users: list[str]
    #: How many are in the room: the welcome names only the first few of a big room.
    count: int = 0


class _Session:
    """What both kinds of session share: the socket, the wake-up pipe, the typing loop.

    Threads: the main thread reads stdin (:meth:`_pump`) and sends; a receiver
    thread prints what arrives and, when the stream ends, sets ``gone`` and
    writes to the wake-up pipe so the main thread stops waiting on stdin.
    """

    def __init__(self, host: str, port: int, nick: str, printer: _Printer) -> None:
        self.host = host
        self.port = port
        self.nick = nick
        self.where = hostport(host, port)
        self.printer = printer
        self.sock: socket.socket | None = None
        self.closing = threading.Event()   # set by the main thread when we leave on purpose
        self.gone = threading.Event()      # set by the receiver when the stream ended
        self._wake_r, self._wake_w = os.pipe()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake_main(self) -> None:
        """Receiver thread: end the main thread's wait for a typed line."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self.printer.console.wake()

    def _typed(self, line: str) -> bool:
        """Handle one typed line; False to leave."""
        raise NotImplementedError

    def _pump(self, stdin_fd: int) -> None:
        """Hand typed lines to :meth:`_typed` until EOF, a quit, or the stream ends."""
        console = self.printer.console
        if console.interactive:  # readline: line editing and history on a terminal
            while (typed := console.read()) is not None:
                if not self._typed(typed):
                    return
            return
        reader = _Stdin(stdin_fd, self._wake_r)
        while True:
            lines = reader.lines()
            if lines is None or not all(self._typed(line) for line in lines):
                return

    def _stop(self, receiver: threading.Thread) -> None:
        """Stop the receiver: shutdown() wakes its recv/select (TCP and, on Linux, UDP)."""
        self.closing.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        if receiver.ident is not None:
            receiver.join(5.0)


class TcpSession(_Session):
    """One JSON-mode connection to a hub.  :meth:`run` drives it to an exit status."""

    def __init__(self, host: str, port: int, nick: str, printer: _Printer,
                 room: str | None = None, *, security: Security = Security(),
                 notes: Callable[[str], None] | None = None) -> None:
        super().__init__(host, port, nick, printer)
        self.security = security
        self.key = security.key
        #: Where the pin's messages go (the fingerprint at first contact): stderr.
        self.notes = notes or printer.note
        self.room = room
        self.decoder = LineDecoder(MAX_HUB_LINE_BYTES)
        self._pending: list[bytes] = []
        self._quit_reason = "quit"
        self._send_failed = False  # main thread only

    # handshake ------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            self.sock = socket.create_connection((self.host, self.port), CONNECT_TIMEOUT_S)
        except socket.gaierror as exc:
            raise ConnectError(f"cannot resolve {self.host}: {exc.strerror}") from None
        except TimeoutError:
            raise ConnectError(f"timed out connecting to {self.where}") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.where}: "
                               f"{exc.strerror or exc}") from None
        if self.security.tls:
            self._secure()

    def _secure(self) -> None:
        """TLS over the new connection, and the hub's key checked against its pin.

        Nothing is sent before the key is accepted; a changed key ends here (exit 1).
        """
        assert self.sock is not None
        hint = "; an old hub without TLS: lanchat connect --no-tls"
        try:
            tls = tlsid.tls_handshake(self.sock, tlsid.client_context(), server_side=False,
                                      timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConnectError(f"{self.where} did not finish the TLS handshake in "
                               f"{CONNECT_TIMEOUT_S:g} s{hint}") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConnectError(f"cannot set up TLS with {self.where}: "
                               f"{neutralise(str(exc))}{hint}") from None
        try:
            der = tls.getpeercert(binary_form=True)
            key = tlsid.peer_key(der if isinstance(der, bytes) else None)
        except RemoteProtocolError as exc:
            raise ConnectError(f"{self.where}: {neutralise(str(exc))}") from None
        name = hub_name(self.host, self.port)
        try:
            path = self.security.pins_path or pinfile.known_hubs_path(os.environ)
            decided: list[HubDecision] = []

            def change(pins: Pins) -> Pins:
                decided.append(decide_hub(pins, name, key, path,
                                          accept=self.security.accept_key))
                return decided[-1].pins or pins

            pinfile.update(path, change, HUBS_HEADER)
        except PinFileError as exc:
            raise ConnectError(f"cannot check the key of hub {name}: {exc}") from None
        decision = decided[-1]
        if not decision.proceed:
            raise ConnectError(f"not connected to hub {name}:\n{decision.message}")
        if decision.message:
            self.notes(decision.message)
        self.sock = cast(socket.socket, tls)  # a TlsSocket: recv, sendall, shutdown, close

    def _frame(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON frame before ``deadline``; None at EOF.  Text lines are skipped."""
        assert self.sock is not None
        while True:
            while self._pending:
                line = self._pending.pop(0)
                if not line.lstrip().startswith(b"{"):
                    continue  # the text-mode greeting, sent before the hub knows our mode
                try:
                    frame = loads_line(line)
                except RemoteProtocolError:
                    log.debug("skipped a malformed line from %s", self.where)
                    continue
                if isinstance(frame, dict):
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectError(f"{self.where} did not welcome us in "
                                   f"{CONNECT_TIMEOUT_S:g} s; is it a lanchat hub?")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(_READ_BYTES)
            except TimeoutError:
                continue
            if not data:
                return None
            self._pending.extend(self.decoder.feed(data))

    def _handshake(self) -> _Welcome:
        assert self.sock is not None
        try:
            self.sock.sendall(encode_hello(self.nick, self.room))
            frame = self._frame(time.monotonic() + CONNECT_TIMEOUT_S)
            if frame is not None and frame.get("type") == "challenge":
                frame = self._answer(frame)
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, ConnectError):
                raise
            raise ConnectError(f"connection to {self.where} closed by the server") from None
        except RemoteProtocolError as exc:
            raise ConnectError(f"{self.where} is not speaking the lanchat protocol: "
                               f"{neutralise(str(exc))}") from None
        if frame is None:
            raise ConnectError(f"connection to {self.where} closed by the server")
        kind = frame.get("type")
        if kind == "error" and frame.get("code") == "auth-failed":
            raise ConnectError(f"{self.where} requires the network's shared secret; "
                               "give it with --secret-file FILE" if self.key is None else
                               f"{self.where} did not accept our shared secret")
        if kind == "error":
            if frame.get("code") == "nick-taken":
                raise ConnectError(f"the nick {neutralise(self.nick)} is taken on {self.where};"
                                   " choose another with --nick")
            raise ConnectError(f"{self.where} refused us: "
                               f"{neutralise(str(frame.get('message', '')))}")
        if kind != "welcome":
            raise ConnectError(f"{self.where} answered {neutralise(str(kind))!r} "
                               "instead of welcome; is it a lanchat hub?")
        users = frame.get("users")
        names = [u["nick"] for u in users if isinstance(u, dict) and isinstance(u.get("nick"), str)
                 ] if isinstance(users, list) else []
        count = frame.get("count")
        return _Welcome(name=str(frame.get("name", "?")), nick=str(frame.get("nick", self.nick)),
                        room=str(frame.get("room", "lobby")), users=names,
                        count=count if isinstance(count, int) and count >= 0 else len(names))

    def _answer(self, challenge: dict[str, Any]) -> dict[str, Any] | None:
        """Prove the shared secret for a hub's challenge; return the frame after it."""
        assert self.sock is not None
        nonce = challenge.get("nonce")
        proof = (auth.proof(self.key, "client", nonce, self.nick)
                 if self.key is not None and isinstance(nonce, str) else "")
        self.sock.sendall(encode_auth(proof))
        return self._frame(time.monotonic() + CONNECT_TIMEOUT_S)

    # receiving ------------------------------------------------------------------------------

    def _show(self, frame: dict[str, Any]) -> None:
        """Print one frame from the hub."""
        kind = frame.get("type")
        p = self.printer
        try:
            if kind == "message":
                p.out(format_message(Message.from_dict(frame.get("message")), now=time.time()))
            elif kind == "presence":
                p.out(format_presence(Presence.from_dict(frame.get("presence"))))
            elif kind == "joined":
                nick, room = frame.get("nick"), frame.get("room")
                if isinstance(nick, str) and nick != self.nick:
                    self.nick = nick
                    p.out(neutralise(f"* You are now known as {nick}"))
                if isinstance(room, str) and room != self.room:
                    self.room = room
                    p.out(neutralise(f"* You are now in #{room}"))
            elif kind == "users":
                p.out(_users_line(str(frame.get("room", self.room)), frame.get("users")))
            elif kind == "error":
                p.note(neutralise(f"! {frame.get('message', frame.get('code', 'error'))}"))
            elif kind == "bye":
                if not self.closing.is_set():
                    p.note(neutralise(f"* the hub said goodbye: {frame.get('reason', '')}"))
            elif kind == "pong":
                p.out("* pong")
            # "sent" acknowledges our own line, already on the screen; others are ignored
            # for forward compatibility.
        except ValidationError as exc:
            p.note(neutralise(f"! skipped a malformed {kind} from the hub: {exc}"))

    def _receive(self) -> None:
        """The receiver thread: print frames until EOF, then wake the main thread."""
        assert self.sock is not None
        try:
            while True:
                for line in self._pending_frames():
                    self._show(line)
                data = self.sock.recv(_READ_BYTES)
                if not data:
                    break
                self._pending.extend(self.decoder.feed(data))
        except RemoteProtocolError as exc:  # a runaway line: the stream has lost its framing
            if not self.closing.is_set():
                self.printer.note(neutralise(f"! {exc}"))
        except OSError as exc:
            log.debug("receive from %s: %s", self.where, exc)
        finally:
            self.gone.set()
            self._wake_main()

    def frames(self, data: bytes) -> list[dict[str, Any]]:
        """The complete JSON frames ``data`` ends (with what came before it), in order.

        For the full-screen client (:mod:`lanchat.chatsource`), which reads the socket
        itself after :func:`open_json`.  Raises RemoteProtocolError for a runaway line."""
        self._pending.extend(self.decoder.feed(data))
        return self._pending_frames()

    def _pending_frames(self) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        pending, self._pending = self._pending, []
        for line in pending:
            if not line.lstrip().startswith(b"{"):
                continue
            try:
                frame = loads_line(line)
            except RemoteProtocolError:
                continue
            if isinstance(frame, dict):
                frames.append(frame)
        return frames

    # the main thread ------------------------------------------------------------------------

    def _send(self, data: bytes) -> bool:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError:
            self._send_failed = True
            return False
        return True

    def _typed(self, line: str) -> bool:
        command = _parse_typed(line, self.printer)
        if command is None:
            return True
        if isinstance(command, Unknown):
            self.printer.note(neutralise(f"! unknown command /{command.name} -- type /help"))
            return True
        if isinstance(command, Quit):
            self._quit_reason = command.reason
            return False
        data = encode_command(command)
        return data is None or self._send(data)

    def _leave(self) -> None:
        """Say bye and give the hub a moment to close its side (so others see us leave)."""
        self.closing.set()
        self._send(encode_command(Quit(self._quit_reason)) or b"")
        self.gone.wait(BYE_WAIT_S)

    def run(self, stdin_fd: int) -> int:
        self._connect()
        welcome = self._handshake()
        assert self.sock is not None
        self.sock.settimeout(None)
        self.nick, self.room = welcome.nick, welcome.room
        others = [n for n in welcome.users if n != welcome.nick]
        company = textmode.company(others, welcome.count - (len(welcome.users) - len(others)))
        self.printer.out(neutralise(
            f"* Connected to {welcome.name} ({self.where}) as {welcome.nick}, "
            f"in #{welcome.room}{company}. Type /help for commands, /quit to leave."))
        receiver = threading.Thread(target=self._receive, name="hubclient-receiver")
        status = EXIT_OK
        try:
            # Started inside the try: a Ctrl-C at any moment from here on still stops it.
            receiver.start()
            self._pump(stdin_fd)
            if self.gone.is_set() or self._send_failed:
                status = EXIT_ERROR
            else:
                self._leave()
        finally:
            self._stop(receiver)
        if status != EXIT_OK:
            self.printer.error(f"connection to {self.where} closed by the server")
        return status


# -- UDP (text mode) ----------------------------------------------------------------------------

class UdpSession(_Session):
    """A UDP text-mode registration with a hub.  :meth:`run` drives it to an exit status."""

    def __init__(self, host: str, port: int, nick: str, printer: _Printer) -> None:
        super().__init__(host, port, nick, printer)
        self.bye = threading.Event()       # the hub answered our /quit

    def _open(self) -> None:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise ConnectError(f"cannot resolve {self.host}: {exc.strerror}") from None
        family, kind, proto, _, address = infos[0]
        self.sock = socket.socket(family, kind, proto)
        # connect(): only the hub's datagrams reach us, and an ICMP "port unreachable" (the hub
        # is gone) surfaces as ConnectionRefusedError.
        self.sock.connect(address)

    def _send(self, text: str) -> bool:
        assert self.sock is not None
        try:
            self.sock.send(text.encode("utf-8")[:MAX_DATAGRAM_BYTES])
        except OSError:
            return False
        return True

    def _print_datagram(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line == "* Bye!":
                self.bye.set()
            self.printer.out(neutralise(line))

    def _register(self) -> None:
        assert self.sock is not None
        self._send(self.nick)
        self.sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            data = self.sock.recv(MAX_DATAGRAM_BYTES + 1)
        except TimeoutError:
            raise ConnectError(f"no answer from {self.where} over UDP in "
                               f"{CONNECT_TIMEOUT_S:g} s; is a lanchat hub there?") from None
        except OSError as exc:
            raise ConnectError(f"cannot reach {self.where} over UDP: "
                               f"{exc.strerror or exc}") from None
        text = data.decode("utf-8", "replace")
        if "taken" in text and text.startswith("!"):
            raise ConnectError(f"the nick {neutralise(self.nick)} is taken on {self.where}; "
                               "choose another with --nick")
        if not text.startswith("* Welcome"):
            raise ConnectError(f"{self.where} refused us: {neutralise(text.strip())}")
        self._print_datagram(data)

    def _receive(self) -> None:
        """The receiver thread: print datagrams, send a keepalive every UDP_KEEPALIVE_S."""
        assert self.sock is not None
        next_keepalive = time.monotonic() + UDP_KEEPALIVE_S
        try:
            while not self.closing.is_set():
                timeout = max(0.0, next_keepalive - time.monotonic())
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    self.sock.send(b"")
                    next_keepalive = time.monotonic() + UDP_KEEPALIVE_S
                    continue
                data = self.sock.recv(MAX_DATAGRAM_BYTES + 1)
                if self.closing.is_set():
                    break
                self._print_datagram(data)
                if text_forgotten(data):
                    break
        except OSError as exc:  # ConnectionRefusedError: the hub is gone
            log.debug("udp receive from %s: %s", self.where, exc)
        finally:
            if not self.closing.is_set():
                self.gone.set()
            self._wake_main()

    def _typed(self, line: str) -> bool:
        command = _parse_typed(line, self.printer)
        if command is None:
            return True
        if isinstance(command, Quit):
            return False
        if not self._send(line):
            self.gone.set()
            return False
        return True

    def run(self, stdin_fd: int) -> int:
        self._open()
        self._register()
        assert self.sock is not None
        self.sock.settimeout(None)
        receiver = threading.Thread(target=self._receive, name="hubclient-udp-receiver")
        try:
            receiver.start()
            self._pump(stdin_fd)
            if not self.gone.is_set():
                self._send("/quit")
                self.bye.wait(BYE_WAIT_S)
        finally:
            self._stop(receiver)
        if self.gone.is_set():
            self.printer.error(f"connection to {self.where} closed by the server")
            return EXIT_ERROR
        return EXIT_OK


def text_forgotten(data: bytes) -> bool:
    """True for the hub's notice that it forgot a silent UDP client."""
    return b"have been forgotten" in data


def _parse_typed(line: str, printer: _Printer) -> Command | None:
    """Parse a typed line; None when there is nothing to send (blank, an error shown, /help)."""
    try:
        command = parse_line(line)
    except ValidationError as exc:
        printer.note(f"! {exc}")
        return None
    if isinstance(command, Help):
        _help(printer)
        return None
    return command


def open_json(host: str, port: int, nick: str, *, room: str | None = None,
              security: Security = Security(),
              notes: Callable[[str], None] | None = None) -> tuple[TcpSession, _Welcome]:
    """Connect to a hub and say hello with no terminal: the full-screen client's way in.

    The session prints nothing (its console writes to a discarded buffer) but the pin's
    messages, given to ``notes`` (none: dropped); its caller reads ``session.sock`` and
    turns data into frames with :meth:`TcpSession.frames`.  Raises :class:`ConnectError`
    as ``lanchat connect`` reports it (a changed hub key among them)."""
    quiet = io.StringIO()
    session = TcpSession(host, port, nick, _Printer(LineConsole(quiet, quiet, quiet)),
                         room=room, security=security, notes=notes)
    try:
        session._connect()
        welcome = session._handshake()
    except BaseException:
        session.close()
        raise
    assert session.sock is not None
    session.sock.settimeout(None)
    return session, welcome


# -- entry point --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} connect",
        description="Join a lanchat hub directly (no local daemon needed). Typed lines are "
                    "sent to the room; /help lists the commands; /quit or Ctrl-D leaves.")
    parser.add_argument("target", nargs="?", metavar="HOST[:PORT]",
                        help=f"the hub (default port {DEFAULT_PORT}); without it, hubs on the "
                             "local network are found by mDNS")
    parser.add_argument("--nick", metavar="NAME", help="your nickname (default: login name)")
    parser.add_argument("--room", metavar="ROOM", help="room to start in (default: lobby)")
    parser.add_argument("--udp", action="store_true", help="speak UDP text mode instead of TCP")
    parser.add_argument("--plain", action="store_true",
                        help="line mode even on a terminal (lines edited with readline) instead "
                             "of the full-screen client; pipes, TERM=dumb and --udp always get it")
    parser.add_argument("--secret-file", metavar="FILE",
                        help="prove the network's shared secret (a hub with a secret requires it)")
    parser.add_argument("--no-tls", action="store_true",
                        help="speak clear text (for an old hub without TLS): anyone on the LAN "
                             "can read it")
    parser.add_argument("--accept-key", metavar="NODE",
                        help="accept the hub's new key if it is this node id's (after its key "
                             "changed; compare with `lanchat status` on the hub)")
    return parser


def _find_hub(printer: _Printer) -> tuple[str, int]:
    """Browse mDNS for hubs and pick one (the only path that loads zeroconf)."""
    try:
        from lanchat import discovery
    except ImportError as exc:
        raise ConnectError(f"cannot look for hubs on the network ({exc}); "
                           "give one: lanchat connect HOST[:PORT]") from None
    try:
        hubs = discovery.browse_hubs(timeout=BROWSE_TIMEOUT_S)
    except OSError as exc:
        raise ConnectError(f"cannot look for hubs on the network: {exc.strerror or exc}; "
                           "give one: lanchat connect HOST[:PORT]") from None
    return choose_hub(hubs, _ask_tty if sys.stdin.isatty() else None)


def _secret(path: str | None) -> bytes | None:
    """The key from ``--secret-file``; ConnectError if it cannot be read."""
    if path is None:
        return None
    try:
        return auth.read_secret_file(path)
    except OSError as exc:
        raise ConnectError(f"cannot read the secret file {path}: {exc.strerror or exc}",
                           EXIT_USAGE) from None
    except ValueError as exc:
        raise ConnectError(f"the secret file {path}: {exc}", EXIT_USAGE) from None


def _ask_tty(prompt: str) -> str:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return sys.stdin.readline()


#: The full-screen client, given by the CLI when the terminal can show it:
#: ``screen(host, port, nick, room, security)`` runs it and returns the exit status.
Screen = Callable[[str, int, str, "str | None", Security], int]


def main(args: list[str], *, screen: Screen | None = None) -> int:
    """Run ``lanchat connect ARGS``; return the exit status.

    With ``screen`` (stdin and stdout are a terminal), a TCP session without ``--plain``
    opens the full-screen client; the line console then only reports errors and the hub
    choice, so it is not given the terminal's stdin (no readline set-up under the screen)."""
    parsed = build_parser().parse_args(args)  # exits 2 on a usage error
    if parsed.plain or parsed.udp:
        screen = None
    stdin = sys.stdin if screen is None else io.StringIO()
    with LineConsole(sys.stdout, sys.stderr, stdin) as console:
        return _run(parsed, _Printer(console), screen)


def _run(parsed: argparse.Namespace, printer: _Printer, screen: Screen | None = None) -> int:
    session: TcpSession | UdpSession | None = None
    try:
        nick = (parsed.nick if parsed.nick is not None
                else default_nick(os.environ, hostname=socket.gethostname()))
        try:
            validate_nick(nick)
            room = parsed.room
            if room is not None:
                Join(room)  # validates it
        except ValidationError as exc:
            raise ConnectError(f"{exc} (--nick {neutralise(nick)}; "
                               f"try --nick {sanitize_nick(nick)})"
                               if exc.code == "bad-nick" else str(exc), EXIT_USAGE) from None
        if parsed.target:
            host, port = parse_target(parsed.target)
        else:
            host, port = _find_hub(printer)
        # No hint of our own here: the welcome line (the hub's, over UDP) says "Type /help".
        if parsed.accept_key is not None and (parsed.no_tls or parsed.udp):
            raise ConnectError("--accept-key needs TLS (not --no-tls or --udp)", EXIT_USAGE)
        if parsed.accept_key is not None:
            try:
                validate_node(parsed.accept_key)
            except ValidationError:
                raise ConnectError("--accept-key wants the node id the warning names, not "
                                   f"{neutralise(parsed.accept_key)!r}", EXIT_USAGE) from None
        security = Security(key=_secret(parsed.secret_file), tls=not parsed.no_tls,
                            accept_key=parsed.accept_key)
        if screen is not None:
            return screen(host, port, nick, parsed.room, security)
        if parsed.udp:
            if parsed.room is not None:
                raise ConnectError("--room needs TCP; with --udp type /join ROOM", EXIT_USAGE)
            session = UdpSession(host, port, nick, printer)
        else:
            session = TcpSession(host, port, nick, printer, room=parsed.room,
                                 security=security)
        return session.run(sys.stdin.fileno())
    except ConnectError as exc:
        printer.error(str(exc))
        return exc.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if session is not None:
            session.close()
