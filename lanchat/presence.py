"""Who is connected where, across the whole network: versioned per-node rosters.

Each daemon is the only authority on its own users.  Whenever they change it
publishes a :class:`NodeRoster` -- all its users, with a version number that
only grows -- and daemons pass rosters on to each other (relaying them across
links).  A roster replaces the previous one of the same node only if it is
newer, so rosters may arrive twice, late or by several paths and every node
still converges on the newest one.  Flooding stops by itself: a node passes a
roster on only when it was news.

A node that disappears (its link died and nobody else vouches for it) is
marked ``gone`` at the same version; ``gone`` wins over a live roster of the
same version, and any newer roster (the node came back) wins over both.

Signed (issue 13): a node signs its roster with its identity key
(:data:`ROSTER_DOMAIN`, then the body's bytes); the frame carries the body, the
signature and the public key, whose hash must be the roster's node id.  Relays
pass the signed bytes on verbatim, so nobody but a node can state, raise the
version of, or empty its roster.  The one unsigned claim is ``gone``: a daemon
saying it no longer reaches a node.  It is taken only from the link that
brought that node's current roster, at that roster's very version
(:meth:`NetworkRoster.withdraw`): the one who vouched may withdraw, nobody else.

A node's roster also carries its X25519 key record for sealed direct messages
(``dh``, :class:`lanchat.seal.DhRecord`), inside the signed body and itself signed
by the same key: that is how the other daemons learn whom to seal a direct message to.

Pure: no I/O, no clock (versions and times are passed in).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lanchat.errors import AmbiguousUser, NoSuchUser, ValidationError
from lanchat.feed import SIGNATURE_BYTES, PublicKey, SigningKey, b64decode, b64encode
from lanchat.limits import MAX_NETWORK_USERS, MAX_ROSTER_BODY_BYTES, MAX_ROSTER_USERS
from lanchat.model import Presence, User, validate_host, validate_nick, validate_node, validate_room
from lanchat.seal import DhRecord, SealError

#: Most nodes a network roster tracks; a peer announcing more is lying.
MAX_NODES = 1024

#: What a node signs: this label, then its roster's body (domain separation: a roster
#: signature can never pass for a message's or a handshake's, nor the reverse).
ROSTER_DOMAIN = b"lanchat/roster/v1\x00"

#: Fewest hex digits of a node id that qualify a nick (``bob@1a2b``): fewer would
#: often match several nodes.  Error messages suggest QUALIFIER_DIGITS.
MIN_NODE_PREFIX = 4
QUALIFIER_DIGITS = 8


@dataclass(frozen=True, slots=True)
class SignedRoster:
    """A roster as its node signed it: the body's bytes, the signature, the key (as sent)."""

    body: bytes
    sig: str
    key: str

    def to_wire(self) -> dict[str, str]:
        return {"b": self.body.decode("ascii"), "s": self.sig, "k": self.key}


@dataclass(frozen=True, slots=True)
class NodeRoster:
    """The users of one node, as of version ``ver``.

    ``signed``: the bytes its node signed (None for our own roster until a link signs it,
    and for a roster marked gone here); never part of equality.
    """

    node: str
    ver: int
    name: str
    host: str
    users: tuple[User, ...] = ()
    gone: bool = False
    #: The nodes this node says it has a link up to (lanchat.relay: a link counts
    #: when both ends list each other).
    links: tuple[str, ...] = ()
    signed: SignedRoster | None = field(default=None, compare=False)
    #: The node's X25519 key record for sealed direct messages (lanchat.seal), inside the
    #: signed body: verified with the roster's key by :func:`parse_signed_roster`.
    dh: DhRecord | None = field(default=None, compare=False)

    def newer_than(self, other: NodeRoster | None) -> bool:
        return other is None or (self.ver, self.gone) > (other.ver, other.gone)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "node": self.node, "ver": self.ver, "name": self.name, "host": self.host,
            "gone": self.gone, "users": [_user_dict(u) for u in self.users],
            "links": list(self.links)}
        if self.dh is not None:
            d["dh"] = self.dh.to_wire()
        return d

    @classmethod
    def from_dict(cls, d: object) -> NodeRoster:
        """Parse a roster from a peer; raises :class:`ValidationError`."""
        if not isinstance(d, dict):
            raise ValidationError("roster must be an object", code="bad-roster")
        node = validate_node(d.get("node"))
        ver = d.get("ver")
        if isinstance(ver, bool) or not isinstance(ver, int) or ver < 0:
            raise ValidationError("roster ver must be a non-negative integer", code="bad-roster")
        name = d.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 253 or not name.isprintable():
            raise ValidationError("roster name must be a short printable string",
                                  code="bad-roster")
        host = validate_host(d.get("host"))
        raw = d.get("users", [])
        if not isinstance(raw, list):
            raise ValidationError("roster users must be a list", code="bad-roster")
        if len(raw) > MAX_ROSTER_USERS:
            raise ValidationError(f"the roster of {node} lists {len(raw)} users, more than "
                                  f"{MAX_ROSTER_USERS}", code="roster-limit")
        users = tuple(_user_from(u, node) for u in raw)
        links = d.get("links", [])
        if not isinstance(links, list):
            raise ValidationError("roster links must be a list", code="bad-roster")
        if len(links) > MAX_NODES:
            raise ValidationError(f"the roster of {node} lists {len(links)} links, more than "
                                  f"{MAX_NODES}", code="roster-limit")
        linked = tuple(sorted({validate_node(x) for x in links} - {node}))
        return cls(node=node, ver=ver, name=name, host=host, users=users,
                   gone=bool(d.get("gone", False)), links=linked)


def roster_body(roster: NodeRoster) -> bytes:
    """The bytes a node signs for ``roster``: compact ASCII JSON of :meth:`NodeRoster.to_dict`."""
    return json.dumps(roster.to_dict(), separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sign_roster(key: SigningKey, roster: NodeRoster) -> NodeRoster:
    """``roster`` (of ``key``'s node) with its signature; raises ValueError for another node's."""
    if roster.node != key.node:
        raise ValueError(f"key {key.node} cannot sign the roster of {roster.node}")
    body = roster_body(roster)
    sig = b64encode(key.sign(ROSTER_DOMAIN + body))
    return replace(roster, signed=SignedRoster(body, sig, key.public.text))


def parse_signed_roster(frame: Mapping[str, Any]) -> NodeRoster:
    """Check and parse a ``roster {b, s, k}`` frame; raises :class:`ValidationError`.

    The signature is checked before the body is even parsed, and the body's node must
    be the key's.  Code ``roster-signature`` for a roster its node did not sign (a
    forgery, or a relay that changed it), ``roster-limit`` for one over a bound,
    ``bad-roster`` for garbage.
    """
    body, sig, key_text = frame.get("b"), frame.get("s"), frame.get("k")
    if not isinstance(body, str) or not body.isascii():
        raise ValidationError("a roster's body must be ASCII text", code="bad-roster")
    if len(body) > MAX_ROSTER_BODY_BYTES:
        raise ValidationError(f"a roster of {len(body)} bytes, more than "
                              f"{MAX_ROSTER_BODY_BYTES}", code="roster-limit")
    raw = body.encode("ascii")
    try:
        key = PublicKey.from_text(key_text)
        signature = b64decode(sig, SIGNATURE_BYTES)  # type: ignore[arg-type]
    except (ValidationError, ValueError):
        raise ValidationError("a roster needs a key and a signature", code="bad-roster") from None
    if not key.verify(signature, ROSTER_DOMAIN + raw):
        raise ValidationError(f"a roster with a bad signature (key of {key.node})",
                              code="roster-signature")
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except ValueError:
        raise ValidationError("a roster's body must be JSON", code="bad-roster") from None
    roster = NodeRoster.from_dict(doc)
    if roster.node != key.node:
        raise ValidationError(f"the roster of {roster.node} is signed by another node "
                              f"({key.node})", code="roster-signature")
    dh = None
    if "dh" in doc:  # its X25519 key record: signed by the same key, for the same node
        try:
            dh = DhRecord.from_wire(doc["dh"], key)
        except SealError as exc:
            raise ValidationError(f"the roster of {roster.node}: {exc}",
                                  code="bad-roster") from None
    assert isinstance(sig, str) and isinstance(key_text, str)
    return replace(roster, signed=SignedRoster(raw, sig, key_text), dh=dh)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _user_dict(u: User) -> dict[str, Any]:
    return {"nick": u.nick, "host": u.host, "since": u.since, "room": u.room, "via": u.via}


def _user_from(d: object, node: str) -> User:
    if not isinstance(d, dict):
        raise ValidationError("roster user must be an object", code="bad-roster")
    since = d.get("since")
    if isinstance(since, bool) or not isinstance(since, int | float) or not math.isfinite(since):
        raise ValidationError("user since must be a finite number", code="bad-roster")
    via = d.get("via", "tcp")
    if not isinstance(via, str) or len(via) > 16:
        raise ValidationError("user via must be a short string", code="bad-roster")
    return User(nick=validate_nick(d.get("nick")), host=validate_host(d.get("host")), node=node,
                local=False, since=float(since), room=validate_room(d.get("room", "lobby")),
                via=via)


@dataclass(frozen=True, slots=True)
class Change:
    """One user appeared in or disappeared from a room (for join/leave notices)."""

    kind: str  # "join" or "leave"
    user: User


class NetworkRoster:
    """The newest roster of every other node, plus where each came from.

    ``apply`` returns the user-level changes a new roster causes (empty if it
    was not news), so the caller can show "* bob joined" notices and pass the
    roster on.  Not thread-safe: owned by the router thread.
    """

    def __init__(self, me: str) -> None:
        self.me = me
        self._rosters: dict[str, NodeRoster] = {}
        self._via: dict[str, object] = {}  # node -> the link its roster last came through

    def get(self, node: str) -> NodeRoster | None:
        return self._rosters.get(node)

    def apply(self, roster: NodeRoster, via: object, *,
              direct: bool = False) -> list[Change] | None:
        """Take ``roster`` if it is newer than what we hold.  None means "not news".

        ``direct``: the roster came from its own node over a link that is up
        now, which proves the node is alive -- it then also replaces a "gone"
        mark of the same version (set when an earlier link to it dropped), and
        any roster of it that came another way, whatever its version: a node
        speaks for itself, so a relayed roster with a forged ``ver`` cannot hide
        its users once we hear it directly.  Raises :class:`ValidationError`
        (``roster-limit``) if taking it would hold more than MAX_NETWORK_USERS.
        """
        if roster.node == self.me:
            return None
        old = self._rosters.get(roster.node)
        revived = (direct and old is not None and old.gone and not roster.gone
                   and roster.ver >= old.ver)
        overrides = direct and old is not None and self._via.get(roster.node) is not via
        if not (revived or overrides or roster.newer_than(old)):
            return None
        if old is None and len(self._rosters) >= MAX_NODES:
            return None
        held = sum(len(r.users) for r in self._rosters.values() if not r.gone)
        before = len(old.users) if old is not None and not old.gone else 0
        after = 0 if roster.gone else len(roster.users)
        if after > before and held - before + after > MAX_NETWORK_USERS:
            raise ValidationError(
                f"the roster of {roster.node} ({after} users) would make {held - before + after} "
                f"users of other nodes, more than {MAX_NETWORK_USERS}", code="roster-limit")
        self._rosters[roster.node] = roster
        self._via[roster.node] = via
        return _diff(old, roster)

    def withdraw(self, node: str, ver: int, via: object) -> list[Change] | None:
        """``via`` says it no longer reaches ``node`` (an unsigned ``gone``).  None: ignored.

        Taken only from the link whose roster of ``node`` we hold, and only at that
        roster's version: whoever vouched for a node may withdraw it, and nobody can
        hide a roster it did not bring us (a node's own signed rosters are the only
        way to state its users or raise its version).
        """
        old = self._rosters.get(node)
        if old is None or old.gone or old.ver != ver or self._via.get(node) is not via:
            return None
        marked = self.mark_gone(node)
        return marked[1] if marked is not None else None

    def claim(self, node: str, via: object) -> None:
        """``via`` is a direct link to ``node``: it vouches for that node from now on."""
        if node in self._rosters:
            self._via[node] = via

    def vouched_by(self, via: object) -> list[str]:
        """The nodes whose newest roster came through ``via``."""
        return [node for node, v in self._via.items() if v is via]

    def mark_gone(self, node: str) -> tuple[NodeRoster, list[Change]] | None:
        """Declare ``node`` unreachable; returns the gone-roster to pass on and the changes."""
        old = self._rosters.get(node)
        if old is None or old.gone:
            return None
        gone = replace(old, users=(), gone=True, links=(), signed=None)
        self._rosters[node] = gone
        return gone, _diff(old, gone)

    def snapshot(self) -> list[NodeRoster]:
        return list(self._rosters.values())

    def users(self) -> list[User]:
        return [u for r in self._rosters.values() if not r.gone for u in r.users]


def _diff(old: NodeRoster | None, new: NodeRoster) -> list[Change]:
    before = {(u.nick, u.room): u for u in old.users} if old and not old.gone else {}
    after = {(u.nick, u.room): u for u in new.users} if not new.gone else {}
    changes = [Change("leave", u) for key, u in before.items() if key not in after]
    changes += [Change("join", u) for key, u in after.items() if key not in before]
    return changes


def resolve_mailbox(to: str, hosts: Mapping[str, str]) -> tuple[str, str] | None:
    """``(nick, node)`` if ``to`` is ``nick@where`` and ``where`` names one known node.

    For a direct message to someone connected nowhere right now (:func:`resolve_recipient`
    found nobody): it waits on that node's daemon, which hands it to ``nick`` there (their
    ``lanchat history``, or their connections once they are back).  ``hosts`` maps every
    node we know of to its host name (an empty one if none); ``where`` is matched as in
    :func:`resolve_recipient`.  None if ``to`` names no known node that way; raises
    :class:`AmbiguousUser` if it names several.
    """
    if "@" not in to:
        return None
    nick, _, where = to.rpartition("@")
    try:
        validate_nick(nick)
    except ValidationError:
        return None
    where_key = where.casefold()
    by_prefix = len(where) >= MIN_NODE_PREFIX
    nodes = sorted(n for n, host in hosts.items()
                   if (host and host.casefold() == where_key)
                   or (by_prefix and n.startswith(where_key)))
    if not nodes:
        return None
    if len(nodes) > 1:
        names = ", ".join(f"{nick}@{n[:QUALIFIER_DIGITS]} (on {hosts.get(n) or '?'})"
                          for n in nodes)
        raise AmbiguousUser(f"{to} is ambiguous: it names {len(nodes)} nodes; say which: "
                            f"{names}")
    return nick, nodes[0]


def resolve_recipient(to: str, users: Iterable[User], hosts: Mapping[str, str]) -> User:
    """The one connected user a direct message's ``to`` names (see lanchat(1)).

    ``to`` is a nick (matched without regard to case) when exactly one node
    has a user of that nick; otherwise ``nick@where``, where ``where`` is a
    node's host name (``hosts``: node -> host) or at least MIN_NODE_PREFIX
    leading hex digits of its node id.  A whole ``to`` that is some user's
    nick wins over reading it as ``nick@where`` (nicks may contain ``@``).
    Raises :class:`NoSuchUser`, or :class:`AmbiguousUser` naming each
    candidate in a form that does resolve.
    """
    everyone = list(users)
    key = to.casefold()
    matches = [u for u in everyone if u.nick.casefold() == key]
    if not matches and "@" in to:
        nick, _, where = to.rpartition("@")
        nick_key, where_key = nick.casefold(), where.casefold()
        by_prefix = len(where) >= MIN_NODE_PREFIX
        matches = [u for u in everyone if u.nick.casefold() == nick_key and (
            hosts.get(u.node, "").casefold() == where_key
            or (by_prefix and u.node.startswith(where_key)))]
    if not matches:
        raise NoSuchUser(f"no such user: {to}")
    if len(matches) > 1:
        names = ", ".join(sorted(
            f"{u.nick}@{u.node[:QUALIFIER_DIGITS]} (on {hosts.get(u.node, '?')})"
            for u in matches))
        raise AmbiguousUser(f"{to} is ambiguous: {len(matches)} users go by that name; "
                            f"say which: {names}")
    return matches[0]


class HeldNotices:
    """A big room's join and leave notices, held to be summed up (limits.BIG_ROOM_OVER).

    The router :meth:`hold`\\ s each notice of a big room instead of fanning it out,
    and :meth:`take`\\ s them all every PRESENCE_BATCH_S: one notice per room, kind
    and reason, naming its first person and counting the rest (``others``).  A
    group of one is sent as it came (with its source, so the joiner is not told
    of their own join).  Pure: the caller passes the time.
    """

    def __init__(self, delay: float) -> None:
        self._delay = delay
        # (kind, room, reason) -> [first notice, its source, how many people in all]
        self._groups: dict[tuple[str, str, str | None], list[Any]] = {}
        self._due: float | None = None

    def __bool__(self) -> bool:
        return bool(self._groups)

    @property
    def due(self) -> float | None:
        """When the held notices are to be sent (None: none held)."""
        return self._due

    def hold(self, p: Presence, source: object | None, now: float, people: int = 1) -> None:
        """Hold ``p`` (which stands for ``people`` persons: 1 + its ``others``)."""
        key = (p.kind, p.room, p.reason)
        group = self._groups.get(key)
        if group is None:
            self._groups[key] = [p, source, people]
            if self._due is None:
                self._due = now + self._delay
        else:
            group[2] += people

    def take(self) -> list[tuple[Presence, object | None]]:
        """Every held notice, summed up per room, kind and reason; holds nothing after."""
        out: list[tuple[Presence, object | None]] = []
        for p, source, people in self._groups.values():
            if people == 1:
                out.append((p, source))
            else:
                out.append((replace(p, others=people - 1), None))
        self._groups.clear()
        self._due = None
        return out
