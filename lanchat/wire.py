"""The hub's JSON protocol: one JSON object per line, each with a ``"type"``.

Client to hub: ``hello``, ``say``, ``join``, ``nick``, ``users``, ``ping``,
``bye``.  Hub to client: ``welcome``, ``message``, ``sent``, ``presence``,
``users``, ``pong``, ``error``, ``bye``.  The full table is in
``lanchat-protocol(7)``.  Pure: frames in, commands out; values in, bytes out.

Versioning: ``hello`` carries ``v``; a hub accepts every version from
``MIN_VERSION`` to ``VERSION`` and answers with the version it will speak.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lanchat.commands import Command, Hello, Join, ListUsers, Nick, Ping, Quit, Say
from lanchat.errors import RemoteProtocolError, ValidationError
from lanchat.framing import dumps_line, loads_line
from lanchat.limits import WELCOME_MAX_NAMES
from lanchat.model import Message, Presence, User

VERSION = 1
MIN_VERSION = 1


def _field(frame: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    value = frame.get(key)
    if value is None:
        if optional:
            return None
        raise RemoteProtocolError(f"{frame.get('type')!s} needs field {key!r}", code="bad-frame")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RemoteProtocolError(
            f"field {key!r} must be a {kind.__name__}", code="bad-frame"
        )
    return value


def parse_hello(line: bytes) -> Hello:
    """Parse the first line of a JSON-mode connection.  Raises on anything but a hello."""
    frame = loads_line(line)
    if not isinstance(frame, dict) or frame.get("type") != "hello":
        raise RemoteProtocolError("the first JSON frame must be a hello", code="bad-frame")
    version = frame.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RemoteProtocolError("hello needs an integer protocol version 'v'",
                                  code="bad-frame")
    if version < MIN_VERSION:
        raise RemoteProtocolError(
            f"protocol version {version} is too old; this hub speaks {MIN_VERSION}-{VERSION}",
            code="version",
        )
    role = frame.get("role", "client")
    if role not in ("client", "daemon"):
        raise RemoteProtocolError("hello role must be 'client' or 'daemon'", code="bad-frame")
    client = frame.get("client")
    if client is not None and (not isinstance(client, str) or len(client) > 100):
        raise RemoteProtocolError("hello 'client' must be a short string", code="bad-frame")
    try:
        return Hello(
            version=min(version, VERSION),
            nick=frame.get("nick"),
            room=frame.get("room"),
            role=role,
            client=client,
            fields=frame,
        )
    except ValidationError as exc:
        raise RemoteProtocolError(str(exc), code=exc.code) from None


def parse_command(line: bytes) -> Command:
    """Parse one client frame after the hello into a command.

    Raises :class:`RemoteProtocolError` for frames that are not valid JSON
    objects of a known type, and :class:`ValidationError` for valid frames with
    invalid values (a nick with spaces, an empty text).
    """
    frame = loads_line(line)
    if not isinstance(frame, dict):
        raise RemoteProtocolError("a frame must be a JSON object", code="bad-frame")
    kind = frame.get("type")
    if kind == "say":
        return Say(
            _field(frame, "text", str),
            to=_field(frame, "to", str, optional=True),
            ref=frame.get("ref"),
        )
    if kind == "join":
        return Join(_field(frame, "room", str))
    if kind == "nick":
        return Nick(_field(frame, "nick", str))
    if kind == "users":
        return ListUsers()
    if kind == "ping":
        return Ping(frame.get("t"))
    if kind == "bye":
        reason = frame.get("reason")
        return Quit(reason[:200] if isinstance(reason, str) and reason else "quit")
    raise RemoteProtocolError(f"unknown frame type {kind!r}", code="bad-frame")


# -- hub to client --------------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """Someone else's message (the encoder handed to :meth:`Event.encoded`)."""
    return dumps_line({"type": "message", "message": msg.to_dict()})


def encode_presence(p: Presence) -> bytes:
    return dumps_line({"type": "presence", "presence": p.to_dict()})


def encode_sent(ref: Any, msg: Message) -> bytes:
    """Acknowledges the sender's own ``say``, once the message is stored."""
    return dumps_line({"type": "sent", "ref": ref, "message": msg.to_dict()})


def encode_welcome(*, node: str, name: str, nick: str, room: str,
                   users: Sequence[User]) -> bytes:
    """The answer to a client's hello: ``users`` names at most WELCOME_MAX_NAMES of the
    room, ``count`` says how many it holds (a ``users`` command lists them all)."""
    return dumps_line({
        "type": "welcome", "v": VERSION, "node": node, "name": name, "nick": nick,
        "room": room, "users": [u.to_dict() for u in users[:WELCOME_MAX_NAMES]],
        "count": len(users),
    })


def encode_users(room: str, users: Iterable[User]) -> bytes:
    return dumps_line({"type": "users", "room": room, "users": [u.to_dict() for u in users]})


def encode_pong(token: Any) -> bytes:
    return dumps_line({"type": "pong", "t": token})


def encode_error(code: str, message: str, *, fatal: bool = False, ref: Any = None) -> bytes:
    """An error frame; ``ref`` (when given) names the client's frame it answers."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message, "fatal": fatal}
    if ref is not None:
        frame["ref"] = ref
    return dumps_line(frame)


def encode_auth(proof: str) -> bytes:
    """The answer to a challenge (client connections and daemon links alike)."""
    return dumps_line({"type": "auth", "proof": proof})


def encode_challenge(nonce: str) -> bytes:
    """A hub with a shared secret asks a JSON client to prove it (answer: ``auth {proof}``)."""
    return dumps_line({"type": "challenge", "nonce": nonce})


def encode_bye(reason: str) -> bytes:
    return dumps_line({"type": "bye", "reason": reason})


def encode_joined(nick: str, room: str) -> bytes:
    """Confirms a ``join`` or ``nick`` change to the client that asked."""
    return dumps_line({"type": "joined", "nick": nick, "room": room})
