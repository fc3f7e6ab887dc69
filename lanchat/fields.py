"""Validation of the message model's fields: nick, room, text, node, host, ts, seq.

Each ``validate_*`` returns the (canonical) value or raises
:class:`~lanchat.errors.ValidationError`.  :mod:`lanchat.model` builds its
objects with these; they live apart from it because they need no
``dataclasses``, so ``lanchat send`` can check its text without loading the
model (``dataclasses`` brings ``inspect``, about 10 ms of start-up).  Pure: no
I/O, clock or randomness.
"""

from __future__ import annotations

import math
import re
import sys

from lanchat.errors import ValidationError
from lanchat.limits import (
    MAX_HOST_CHARS,
    MAX_NICK_CHARS,
    MAX_ROOM_CHARS,
    MAX_SEAL_TEXT_CHARS,
    MAX_SEND_KEY_CHARS,
    MAX_TEXT_BYTES,
)

#: Node ids are random lowercase hex (16 digits by default); peers may use up to 64.
_NODE_RE = re.compile(r"[0-9a-f]{8,64}")
#: Rooms: lowercase, digits, ``-``, ``_`` and ``.``; a leading ``#`` is accepted and dropped.
_ROOM_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
#: Characters that would make a nick look like a command, notice or error line in text mode.
_NICK_BAD_START = "/*!#["
_NICK_BAD_CHARS = frozenset(":,")

#: Names already found valid: node ids, nicks, rooms (with their canonical form).  The
#: messages of a feed repeat a few names thousands of times, and a lookup costs a fifth of
#: a check (~2 us a received message in all).  Only exact ``str`` values are looked up (a
#: subclass could redefine equality), and each table holds at most ``_KNOWN_MAX`` names of
#: at most 64 characters: it is emptied when full, so a peer that sends a new name with
#: every message only makes it miss.
_KNOWN_MAX = 256
_known_nodes: dict[str, str] = {}
_known_nicks: dict[str, str] = {}
_known_rooms: dict[str, str] = {}


def _remember(known: dict[str, str], value: str, canonical: str) -> None:
    if len(known) >= _KNOWN_MAX:
        known.clear()
    known[value] = canonical


def validate_nick(nick: object) -> str:
    """Return ``nick`` if it is a valid nickname, else raise :class:`ValidationError`.

    A nick is 1-32 printable characters with no white space, no ``:`` or ``,``
    (they would make ``[12:00:00] nick: text`` ambiguous) and not starting with
    a character that text mode uses for commands or notices.
    """
    if type(nick) is str and nick in _known_nicks:
        return nick
    if not isinstance(nick, str):
        raise ValidationError("nick must be a string", code="bad-nick")
    if not 1 <= len(nick) <= MAX_NICK_CHARS:
        raise ValidationError(f"nick must be 1-{MAX_NICK_CHARS} characters", code="bad-nick")
    # Of all white space only " " is printable (tests/test_fields.py checks every code
    # point): one `in` instead of a generator over the characters, 1 us less per message.
    if not nick.isprintable() or " " in nick:
        raise ValidationError(
            "nick must be printable characters without spaces", code="bad-nick"
        )
    if nick[0] in _NICK_BAD_START or _NICK_BAD_CHARS.intersection(nick):
        raise ValidationError(
            f"nick may not start with any of {_NICK_BAD_START} or contain ':' or ','",
            code="bad-nick",
        )
    _remember(_known_nicks, nick, nick)
    return nick


def validate_recipient(to: object) -> str:
    """Return ``to`` if it can name a direct message's addressee, else raise.

    ``nick``, or ``nick@where`` with ``where`` a node's host name or a prefix
    of its node id (lanchat(1)); which user it names is decided by whoever
    knows the rosters (:func:`lanchat.presence.resolve_recipient`).  Nicks may
    themselves contain ``@``, so a whole valid nick is accepted as it is.
    """
    if not isinstance(to, str):
        raise ValidationError("to must be a string", code="bad-nick")
    try:
        return validate_nick(to)
    except ValidationError:
        pass
    nick, at, where = to.rpartition("@")
    if not at or not 0 < len(where) <= MAX_HOST_CHARS or not where.isprintable() \
            or " " in where:
        raise ValidationError("to must be a nick or nick@host", code="bad-nick")
    validate_nick(nick)
    return to


def validate_send_key(key: object) -> str:
    """Return ``key`` if it is a valid client key of ``send`` (1-64 printable ASCII, no space)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_SEND_KEY_CHARS \
            or not all("!" <= c <= "~" for c in key):
        raise ValidationError(f"key must be 1-{MAX_SEND_KEY_CHARS} printable ASCII characters "
                              "without spaces", code="bad-key")
    return key


def validate_room(room: object) -> str:
    """Return the canonical room name (lowercase, no leading ``#``) or raise.

    Interned: a room's thousands of members (and its messages) then hold one string.
    """
    if type(room) is str:
        known = _known_rooms.get(room)
        if known is not None:
            return known
    if not isinstance(room, str):
        raise ValidationError("room must be a string", code="bad-room")
    name = room[1:] if room.startswith("#") else room
    name = name.lower()
    if not 1 <= len(name) <= MAX_ROOM_CHARS or not _ROOM_RE.fullmatch(name):
        raise ValidationError(
            f"room must be 1-{MAX_ROOM_CHARS} of a-z, 0-9, '-', '_', '.'", code="bad-room"
        )
    name = sys.intern(name)
    _remember(_known_rooms, room, name)
    return name


def validate_text(text: object) -> str:
    """Return ``text`` if it is valid chat text, else raise.

    Text is 1 to 4 KiB of UTF-8 with no NUL.  Other control characters (and
    escape sequences) are *kept*: history and ``--json`` show exactly what was
    sent, and every renderer neutralises them (see :mod:`lanchat.render`).
    """
    if not isinstance(text, str):
        raise ValidationError("text must be a string", code="bad-text")
    if not text:
        raise ValidationError("text is empty", code="bad-text")
    if "\x00" in text:
        raise ValidationError("text may not contain NUL bytes", code="bad-text")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates smuggled in through JSON \ud800 escapes
        raise ValidationError("text is not valid Unicode", code="bad-text") from None
    if size > MAX_TEXT_BYTES:
        raise ValidationError(
            f"text is {size} bytes; the limit is {MAX_TEXT_BYTES}", code="text-too-long"
        )
    return text


_SEAL_TEXT_RE = re.compile(r"[A-Za-z0-9_-]+")


def validate_sealed(sealed: object) -> str:
    """Return ``sealed`` if it has the form of a sealed text (lanchat.seal's base64url).

    Only its form and bound: whether it opens, and for whom, only its two ends can tell.
    """
    if (not isinstance(sealed, str) or len(sealed) > MAX_SEAL_TEXT_CHARS
            or not _SEAL_TEXT_RE.fullmatch(sealed)):
        raise ValidationError(f"a sealed text is 1-{MAX_SEAL_TEXT_CHARS} characters of "
                              "base64url", code="bad-seal")
    return sealed


def validate_node(node: object) -> str:
    """Return ``node`` if it looks like a node id (lowercase hex, 8-64 digits)."""
    if type(node) is str and node in _known_nodes:
        return node
    if not isinstance(node, str) or not _NODE_RE.fullmatch(node):
        raise ValidationError("node id must be 8-64 lowercase hex digits", code="bad-node")
    _remember(_known_nodes, node, node)
    return node


def validate_host(host: object) -> str:
    """Return ``host`` if it is a printable host name of sane length."""
    if not isinstance(host, str) or not 1 <= len(host) <= MAX_HOST_CHARS:
        raise ValidationError("host must be 1-253 characters", code="bad-host")
    if not host.isprintable() or " " in host:  # as in validate_nick
        raise ValidationError("host must be printable without spaces", code="bad-host")
    return host


def validate_ts(ts: object) -> float:
    """Return ``ts`` as a float if it is a finite, non-negative number of seconds.

    Any finite value is accepted, however far in the future: showing and
    keeping such a claim safely is the renderer's and the store's business.  An
    integer too large for a float (``10**400``) is not finite here, and is a
    ValidationError rather than the OverflowError ``math.isfinite`` raises.
    """
    if type(ts) is float and 0.0 <= ts < math.inf:  # the usual case, in one test (NaN fails)
        return ts
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValidationError("ts must be a finite number of seconds", code="bad-ts")
    try:
        finite = math.isfinite(ts)
    except OverflowError:
        finite = False
    if not finite:
        raise ValidationError("ts must be a finite number of seconds", code="bad-ts")
    if ts < 0:
        raise ValidationError("ts must not be negative", code="bad-ts")
    return float(ts)


def validate_seq(seq: object) -> int:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < 2**63:
        raise ValidationError("seq must be a positive integer", code="bad-seq")
    return seq
