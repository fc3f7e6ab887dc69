"""The message model: what a chat message and a presence change are.

Objects validate themselves when they are built (as h11's and wsproto's events
do), so an invalid nick, room or text can never exist past the edge that
received it (one field's checks are in :mod:`lanchat.fields`).  Pure: no
sockets, threads, clock or randomness -- times and ids are passed in.

Wire shape of a message (DESIGN.md): ``{"id", "origin", "seq", "ts", "room",
"nick", "host", "text"}`` plus ``"to"`` and ``"to_node"`` for a direct message.  ``id`` is
``"<origin>:<seq>"``: unique across the network because ``origin`` is a node id
and ``seq`` counts that node's messages 1, 2, 3 … without gaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lanchat.errors import ValidationError
from lanchat.fields import (
    validate_host,
    validate_nick,
    validate_node,
    validate_recipient,
    validate_room,
    validate_sealed,
    validate_send_key,
    validate_seq,
    validate_text,
    validate_ts,
)

__all__ = [
    "DEFAULT_ROOM",
    "Draft",
    "Message",
    "Presence",
    "PresenceKind",
    "User",
    "message_id",
    "validate_host",  # the field validators, from lanchat.fields, for the model's users
    "validate_nick",
    "validate_node",
    "validate_recipient",
    "validate_room",
    "validate_sealed",
    "validate_send_key",
    "validate_text",
]

DEFAULT_ROOM = "lobby"



def message_id(origin: str, seq: int) -> str:
    """The network-wide id of the ``seq``-th message accepted by node ``origin``."""
    return f"{origin}:{seq}"


@dataclass(frozen=True, slots=True)
class Draft:
    """A message as someone wrote it, before a node stamps it with id, seq and time."""

    text: str
    nick: str
    host: str
    room: str = DEFAULT_ROOM
    #: A direct message's addressee: as the sender wrote it (``nick`` or ``nick@where``)
    #: until the router resolves it to a user's nick on node ``to_node``.
    to: str | None = None
    to_node: str | None = None
    #: Unix uid of a local sender on the control socket (SO_PEERCRED); never sent to peers.
    uid: int | None = None
    #: The local sender's idempotency key (control ``send {key}``): the same (uid, key)
    #: stores one message however often it is sent.  Never sent to peers.
    key: str | None = None
    #: A direct message's text sealed to its two ends (lanchat.seal's text form): what its
    #: feed entry carries instead of ``text``.  Set by the router once ``to_node`` is known.
    sealed: str | None = None

    def __post_init__(self) -> None:
        validate_text(self.text)
        validate_nick(self.nick)
        validate_host(self.host)
        object.__setattr__(self, "room", validate_room(self.room))
        if self.to is not None:
            validate_recipient(self.to)
        if self.to_node is not None:
            validate_node(self.to_node)
            validate_nick(self.to)
        if self.key is not None:
            validate_send_key(self.key)
        if self.sealed is not None:
            validate_sealed(self.sealed)
            if self.to_node is None:
                raise ValidationError("a sealed message names its addressee's node",
                                      code="bad-message")


@dataclass(frozen=True, slots=True, init=False)
class Message:
    """A stored chat message: immutable, valid, and the same on every node.

    Its ``__init__`` (keywords only) is written out rather than generated: it validates
    each field as it sets its slot, where the generated one set every slot through
    ``object.__setattr__`` and then validated and set some again -- 5.9 us a message
    against 3.2, and a daemon builds one for every message it receives or reads back from
    history.
    """

    origin: str
    seq: int
    ts: float
    room: str
    nick: str
    host: str
    text: str
    to: str | None = None
    id: str = field(default="")
    #: The node of a direct message's addressee: ``to`` + ``to_node`` name one user on the
    #: whole network (lanchat-protocol(7)).  None on public messages (and on old DMs).
    to_node: str | None = None
    #: False only on a message stored before signed feeds (lanchat.feed): it is shown, but
    #: never relayed, since nobody can check who wrote it.  How it is held, not what it
    #: says: not compared.
    signed: bool = field(default=True, compare=False)
    #: A direct message as its feed entry carries it: sealed to its two ends
    #: (lanchat.seal), in base64url.  ``text`` is then what one of those ends opened, or
    #: ``""`` where it was not opened (on every other daemon): such a message is stored
    #: and relayed, never shown.  None on public messages and on messages read from
    #: history (the store keeps the seal in the entry's body).  How it travels, not what
    #: it says: not compared.
    sealed: str | None = field(default=None, compare=False, repr=False)

    def __init__(self, *, origin: str, seq: int, ts: float, room: str, nick: str, host: str,
                 text: str, to: str | None = None, id: str = "",
                 to_node: str | None = None, signed: bool = True,
                 sealed: str | None = None) -> None:
        _set_origin(self, validate_node(origin))
        _set_seq(self, validate_seq(seq))
        _set_ts(self, validate_ts(ts))
        _set_room(self, validate_room(room))
        _set_nick(self, validate_nick(nick))
        _set_host(self, validate_host(host))
        if sealed is None or text:
            validate_text(text)
        _set_text(self, text)
        if sealed is not None:
            validate_sealed(sealed)
            if to is None or to_node is None:
                raise ValidationError("a sealed message names its addressee and node",
                                      code="bad-message")
        if to is not None:
            validate_nick(to)
        if to_node is not None:
            validate_node(to_node)
            if to is None:
                raise ValidationError("to_node without to", code="bad-message")
        _set_to(self, to)
        _set_to_node(self, to_node)
        expected = message_id(origin, seq)
        if id and id != expected:
            raise ValidationError(
                f"message id {id!r} does not match origin and seq", code="bad-id"
            )
        _set_id(self, expected)
        _set_signed(self, signed)
        _set_sealed(self, sealed)

    @classmethod
    def stamp(cls, drafts: Sequence[Draft], *, origin: str, first: int, ts: float,
              signed: bool = True) -> list[Message]:
        """Turn drafts into the messages that node ``origin`` accepted as ``first``, ``first + 1`` …

        The drafts validated their fields when they were built; only what is new here
        (origin, seqs, ts: the same origin and time for the whole commit) is checked,
        once per commit, and each message is built through its slots directly: this is
        the router's hot path (it was ~6 us per message, now ~2).
        ``signed``: False for messages that will not be entries of a signed feed.
        """
        validate_node(origin)
        validate_seq(first)
        if not drafts:
            return []
        validate_seq(first + len(drafts) - 1)
        ts = validate_ts(ts)
        out: list[Message] = []
        for seq, d in enumerate(drafts, start=first):
            msg = object.__new__(cls)
            _set_origin(msg, origin)
            _set_seq(msg, seq)
            _set_ts(msg, ts)
            _set_room(msg, d.room)
            _set_nick(msg, d.nick)
            _set_host(msg, d.host)
            _set_text(msg, d.text)
            _set_to(msg, d.to)
            _set_id(msg, message_id(origin, seq))
            _set_to_node(msg, d.to_node)
            _set_signed(msg, signed)
            _set_sealed(msg, d.sealed)
            out.append(msg)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The message's wire form (DESIGN.md's fields, ``to``/``to_node`` only when set)."""
        d: dict[str, Any] = {
            "id": self.id, "origin": self.origin, "seq": self.seq, "ts": self.ts,
            "room": self.room, "nick": self.nick, "host": self.host, "text": self.text,
        }
        if self.to is not None:
            d["to"] = self.to
        if self.to_node is not None:
            d["to_node"] = self.to_node
        if not self.signed:
            d["signed"] = False
        return d

    @classmethod
    def from_dict(cls, d: object) -> Message:
        """Build a message from its wire form; raise :class:`ValidationError` if it is wrong."""
        if not isinstance(d, dict):
            raise ValidationError("message must be an object", code="bad-message")
        try:
            return cls(
                origin=d["origin"], seq=d["seq"], ts=d["ts"], room=d["room"],
                nick=d["nick"], host=d["host"], text=d["text"], to=d.get("to"),
                id=d.get("id", ""), to_node=d.get("to_node"), signed=d.get("signed") is not False,
            )
        except KeyError as exc:
            raise ValidationError(f"message lacks field {exc.args[0]!r}",
                                  code="bad-message") from None


PresenceKind = Literal["join", "leave", "nick"]


#: The setters of Message's slots, for :meth:`Message.stamp` (a frozen dataclass refuses
#: ``setattr``; these are what ``object.__setattr__`` would end up calling, minus the lookup).
(_set_origin, _set_seq, _set_ts, _set_room, _set_nick, _set_host, _set_text, _set_to, _set_id,
 _set_to_node, _set_signed, _set_sealed) = (
    Message.__dict__[name].__set__
    for name in ("origin", "seq", "ts", "room", "nick", "host", "text", "to", "id", "to_node",
                 "signed", "sealed"))


@dataclass(frozen=True, slots=True)
class Presence:
    """Someone joined or left a room, or changed nick (``old`` is the previous nick)."""

    kind: PresenceKind
    nick: str
    host: str
    node: str
    room: str
    ts: float
    old: str | None = None
    #: Why someone left ("quit", "timeout", "too slow", …); shown in leave notices.
    reason: str | None = None
    #: How many more people joined or left the room along with ``nick``: one notice
    #: summing up a big roster change (limits.PRESENCE_SUMMARY_OVER).
    others: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("join", "leave", "nick"):
            raise ValidationError("presence kind must be join, leave or nick",
                                  code="bad-presence")
        validate_nick(self.nick)
        validate_host(self.host)
        validate_node(self.node)
        object.__setattr__(self, "room", validate_room(self.room))
        object.__setattr__(self, "ts", validate_ts(self.ts))
        if self.old is not None:
            validate_nick(self.old)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind, "nick": self.nick, "host": self.host, "node": self.node,
            "room": self.room, "ts": self.ts,
        }
        if self.old is not None:
            d["old"] = self.old
        if self.reason is not None:
            d["reason"] = self.reason
        if self.others:
            d["others"] = self.others
        return d

    @classmethod
    def from_dict(cls, d: object) -> Presence:
        if not isinstance(d, dict):
            raise ValidationError("presence must be an object", code="bad-presence")
        reason = d.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
            raise ValidationError("presence reason must be a short string",
                                  code="bad-presence")
        others = d.get("others", 0)
        if isinstance(others, bool) or not isinstance(others, int) or others < 0:
            raise ValidationError("presence others must be a non-negative integer",
                                  code="bad-presence")
        try:
            return cls(kind=d["kind"], nick=d["nick"], host=d["host"], node=d["node"],
                       room=d["room"], ts=d["ts"], old=d.get("old"), reason=reason,
                       others=others)
        except KeyError as exc:
            raise ValidationError(f"presence lacks field {exc.args[0]!r}",
                                  code="bad-presence") from None


#: The ``via`` of hub clients whose traffic is not encrypted (plain TCP, UDP).
PLAIN_VIAS = frozenset({"tcp", "json", "udp"})


@dataclass(frozen=True, slots=True)
class User:
    """One entry of ``users``: someone connected somewhere on the network."""

    nick: str
    host: str
    node: str
    local: bool
    since: float
    room: str = DEFAULT_ROOM
    #: How they are connected: "daemon" (the node's own user), "tcp" (text mode), "json",
    #: "udp" -- all three plain, unencrypted -- or "tls" (text mode) and "tls-json" over TLS.
    via: str = "tcp"

    @property
    def plain(self) -> bool:
        """True for a hub client whose traffic crosses the LAN unencrypted."""
        return self.via in PLAIN_VIAS

    def to_dict(self) -> dict[str, Any]:
        return {"nick": self.nick, "host": self.host, "node": self.node,
                "local": self.local, "since": self.since, "room": self.room, "via": self.via,
                "plain": self.plain}
