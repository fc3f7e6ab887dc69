"""The daemon-to-daemon link protocol: frames, and what each side owes the other.

A link is a TCP connection to the other daemon's hub port, speaking JSON lines
(the hub's JSON mode, with ``"role": "daemon"`` in the hello):

1. The dialer sends ``hello {v: 3, role: "daemon", node, name, host, port, key,
   nonce}`` in clear (what mDNS says anyway, and what a v1 or v2 daemon can read
   far enough to refuse it); the acceptor answers ``starttls`` (or a fatal
   ``error``: ``same-node``, ``duplicate-link``, ``bad-key``), the dialer sends
   nothing more until then, and both run TLS 1.3 over the connection
   (:mod:`lanchat.tlsid`; the acceptor is the TLS server, presenting its node key's
   certificate).  The dialer checks the certificate's key against the node it
   expected (mDNS TXT ``id``, or the pin of the ``--peer`` address: see
   :mod:`lanchat.pins`) before it reads anything.  Inside TLS the acceptor sends
   ``welcome`` with the same fields as a hello plus ``proof`` (and ``admit`` with
   a shared secret) -- its ``key`` must be the certificate's -- or a fatal
   ``error`` (``auth-failed``, ``same-identity``, ``too-many-links``); the
   dialer's first frame is then ``auth {proof, admit?}``, or an ``error``
   saying why it will not go on (``wrong-key``, ``key-changed``).  ``key`` is
   the node's Ed25519 public key (its node id is the key's hash); each
   ``proof`` signs the handshake transcript (both node ids, keys and nonces,
   and the signer's role), ``admit`` proves the shared secret over the same:
   see :mod:`lanchat.handshake`.  TLS authenticates the acceptor's key; the
   dialer's ``proof``, sent only once the acceptor is authenticated and naming
   its key, authenticates the dialer.  An older peer is refused so that its own
   log says why: v1 (no key) with :data:`V1_REFUSAL`, v2 (keys, no TLS) with
   :data:`V2_REFUSAL`.  Hello and welcome stay small: the first line of a
   hub connection is held to the hub's frame limit.
2. Each side's first frame is ``sync {cursors}``: every origin mapped to the
   highest sequence number it holds (a node holds each origin's messages 1..n
   without gaps).  A map of more than MAX_SYNC_PAGE cursors goes as pages:
   ``sync {cursors, more: true}`` frames, then a last one without ``more``;
   the receiver adds pages up (at most MAX_SYNC_CURSORS, the rest ignored) and
   acts on the last.  A sync never fails on its size between honest daemons.
   On receiving it, each side sends what the other lacks --
   per origin, everything after its cursor, read from history and sent in
   order as ``msgs {e: [entries], k?}`` -- and only then live messages.
   Rosters of every node known follow as ``roster`` frames.
3. A ``msgs`` frame is one *run* of one origin's signed feed
   (:mod:`lanchat.feed`): at most MAX_RUN_ENTRIES consecutive entries
   ``{b: body, s?: signature}``, the last one signed (by a relay: one whose
   signature it verified itself).  ``k`` is the origin's public key, sent with
   the first run of each origin on a link; the receiver checks that it is the
   origin's (``PublicKey.for_node``) and verifies the run before anything
   else.  Live messages follow as ``msgs`` frames too, forwarded by the rule of
   :mod:`lanchat.relay` (one copy per daemon in a full mesh).  A receiver that gets a
   run beyond a gap (it missed something) answers ``sync {cursors}``, and
   the sender replays from there; each side also sends its ``sync``
   unasked every ANTI_ENTROPY_S.  Entries already held are duplicates (or,
   if they differ, a fork: the first stays).
   When retention has pruned the start of an origin's history, the sender
   first says ``floor {origin, seq}``, then sends the run that starts at
   ``seq + 1``: "nobody can get you entries 1..seq of this origin from me".
   The floor counts only with that run, once verified: the receiver's cursor
   jumps to the run's end, never beyond an entry it verified.
4. ``roster {b, s, k}`` carries a node's users and the nodes it is linked to,
   as that node signed them (body, signature, key; see :mod:`lanchat.presence`),
   relayed verbatim; ``gone {node, ver}`` withdraws a node whose roster the
   sender brought.
With a shared secret the handshake also carries the admission proofs
(:mod:`lanchat.handshake`).  The secret is admission only: who wrote a message
is its signature's business.

5. ``ping``/``pong`` every ``HEARTBEAT_S``; a link silent for ``DEAD_AFTER_S``
   is dead.  ``bye {reason}`` ends a link on purpose.

Tie-break: there is one link per pair of nodes.  The lower node id dials peers
it discovers by mDNS; static peers are dialed by whoever lists them.  If two
links to the same node come up anyway, the one dialed by the lower node id is
kept and the other is closed (both ends decide the same way).

Pure: frames in, values out; values in, bytes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol

from lanchat.errors import RemoteProtocolError, ValidationError
from lanchat.feed import Entry, PublicKey, b64encode, parse_run
from lanchat.framing import dumps_line, loads_line
from lanchat.handshake import NONCE_HEX
from lanchat.limits import MAX_HOST_CHARS, MAX_RUN_ENTRIES, MAX_SYNC_CURSORS, MAX_SYNC_PAGE
from lanchat.model import validate_host, validate_node
from lanchat.presence import NodeRoster, parse_signed_roster

#: The link protocol this daemon speaks: 3 (2's keys, proofs and signed rosters, over TLS).
#: A peer that says 1 or 2 is an older lanchat: it is refused, with a line in both logs.
VERSION = 3
#: The last link protocol without keys.
OLD_VERSION = 1
#: The last link protocol without TLS (keys and proofs in clear).
PLAIN_VERSION = 2

#: The frame type a v2 daemon sends a v1 daemon to refuse it.  A v1 daemon logs an
#: unknown frame type, with the type, at warning level (``unknown link frame type
#: '...'; closing the link``) -- unlike a ``bye`` or an ``error`` in a handshake, which
#: it logs at info or debug level only, below its default -- so the type is the sentence.
V1_REFUSAL = ("refused: the other daemon speaks lanchat link protocol v2 (signed "
              "identities) and no longer links to v1; upgrade lanchat here")

#: The frame type a v3 daemon sends a v2 daemon to refuse it, inside a frame the v2
#: daemon reads as a protocol error and logs at warning level with the type (the
#: dialer's ``auth`` slot, or the first frame of a link).
V2_REFUSAL = ("refused: the other daemon speaks lanchat link protocol v3 (links over "
              "TLS) and no longer links without TLS; upgrade lanchat here")

#: Seconds between heartbeats on an idle link.
HEARTBEAT_S = 2.0
#: Seconds of silence after which a link is declared dead (a crashed or
#: unplugged peer is noticed this fast; four missed heartbeats).
DEAD_AFTER_S = 8.0
#: Seconds between two ``sync`` frames a link sends unasked (anti-entropy): the peer
#: replays whatever we lack, e.g. a message the relay rule (lanchat.relay) expected us
#: to get from a neighbour whose link to us had just died.
ANTI_ENTROPY_S = 15.0
#: Most entries in one ``msgs`` frame (one run): keeps a frame far below MAX_LINK_FRAME.
MAX_BATCH = MAX_RUN_ENTRIES
#: Longest link frame: MAX_BATCH messages of 4 KiB, JSON-escaped, with slack.
MAX_LINK_FRAME = 4 * 1024 * 1024
#: Seconds a dialer waits before redialing, doubling from the first to the last.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class PeerHello:
    """What a daemon says about itself when a link opens (hello or welcome)."""

    node: str
    name: str
    host: str
    port: int | None
    version: int = VERSION
    #: v2: the node's public key (its id is the key's), this side's fresh nonce, and
    #: in a welcome the acceptor's signature of the handshake transcript
    #: (:mod:`lanchat.handshake`) and, with a shared secret, its ``admit`` HMAC.
    #: A v1 peer's nonce and proof are those of the old shared-secret handshake.
    nonce: str | None = None
    proof: str | None = None
    key: PublicKey | None = None
    admit: str | None = None


def parse_cursors(raw: object, limit: int = MAX_SYNC_CURSORS) -> dict[str, int]:
    """Validate a cursor map from a peer; raises :class:`RemoteProtocolError`.

    Keeps the first ``limit`` cursors and ignores the rest (each is still
    checked): a long map is not an error -- a peer holding many origins is not
    hostile for it, and the frame limit bounds the work -- and an origin left
    out only means it is sent to that peer again, which drops the duplicates.
    """
    if not isinstance(raw, dict):
        raise RemoteProtocolError("cursors must be an object", code="bad-frame")
    out: dict[str, int] = {}
    for origin, seq in raw.items():
        try:
            validate_node(origin)
        except ValidationError as exc:
            raise RemoteProtocolError(str(exc), code="bad-frame") from None
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise RemoteProtocolError("a cursor must be a non-negative integer", code="bad-frame")
        if len(out) < limit:
            out[origin] = seq
    return out


def parse_heads(raw: object, cursors: Mapping[str, int]) -> dict[str, str]:
    """Validate a sync's head hashes; raises :class:`RemoteProtocolError`.

    Each names an origin of the same page's cursors (one not kept there is ignored)
    and is an entry hash, 64 lowercase hex digits.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RemoteProtocolError("heads must be an object", code="bad-frame")
    out: dict[str, str] = {}
    for origin, head in raw.items():
        if not _is_hex(head, 64):
            raise RemoteProtocolError("a head is an entry hash (64 hex digits)",
                                      code="bad-frame")
        if origin in cursors:
            out[origin] = head
    return out


def parse_peer_hello(frame: Mapping[str, Any]) -> PeerHello:
    """Read a daemon's hello or welcome fields; raises :class:`RemoteProtocolError`."""
    try:
        node = validate_node(frame.get("node"))
        host = validate_host(frame.get("host"))
    except ValidationError as exc:
        raise RemoteProtocolError(str(exc), code="bad-frame") from None
    name, port = frame.get("name"), frame.get("port")
    # Printable only: names end up in logs, tables and notices.
    if (not isinstance(name, str) or not name or len(name) > MAX_HOST_CHARS
            or not name.isprintable()):
        raise RemoteProtocolError("a daemon must say its name (printable)", code="bad-frame")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        raise RemoteProtocolError("port must be 1-65535", code="bad-frame")
    version = frame.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RemoteProtocolError("v must be a positive integer", code="bad-frame")
    nonce, proof = frame.get("nonce"), frame.get("proof")
    if version <= OLD_VERSION:  # an older lanchat: read far enough to refuse it properly
        for value, what in ((nonce, "nonce"), (proof, "proof")):
            if value is not None and (not isinstance(value, str) or not 16 <= len(value) <= 128
                                      or not value.isalnum()):
                raise RemoteProtocolError(f"{what} must be a short hex string", code="bad-frame")
        return PeerHello(node=node, name=name, host=host, port=port, version=OLD_VERSION,
                         nonce=nonce, proof=proof)
    try:
        key = PublicKey.for_node(node, _key_bytes(frame.get("key")))
    except ValidationError as exc:
        raise RemoteProtocolError(f"the hello's key: {exc}", code="bad-key") from None
    if not _is_hex(nonce, NONCE_HEX):
        raise RemoteProtocolError(f"nonce must be {NONCE_HEX} hex digits", code="bad-frame")
    if proof is not None and not (isinstance(proof, str) and len(proof) <= 128):
        raise RemoteProtocolError("proof must be a signature", code="bad-frame")
    admit = frame.get("admit")
    if admit is not None and not _is_hex(admit, 64):
        raise RemoteProtocolError("admit must be 64 hex digits", code="bad-frame")
    return PeerHello(node=node, name=name, host=host, port=port,
                     version=min(version, VERSION), nonce=nonce, proof=proof, key=key,
                     admit=admit)


def _key_bytes(text: object) -> bytes:
    return PublicKey.from_text(text).raw


def _is_hex(value: object, digits: int) -> bool:
    return (isinstance(value, str) and len(value) == digits
            and all(c in "0123456789abcdef" for c in value))


def _hello_fields(me: PeerHello) -> dict[str, Any]:
    fields: dict[str, Any] = {"v": me.version, "role": "daemon", "node": me.node,
                              "name": me.name, "host": me.host, "port": me.port}
    if me.key is not None:
        fields["key"] = me.key.text
    for name, value in (("nonce", me.nonce), ("proof", me.proof), ("admit", me.admit)):
        if value is not None:
            fields[name] = value
    return fields


def encode_hello(me: PeerHello) -> bytes:
    return dumps_line({"type": "hello", **_hello_fields(me)})


def encode_welcome(me: PeerHello) -> bytes:
    return dumps_line({"type": "welcome", **_hello_fields(me)})


class WireEntry(Protocol):
    """What :func:`encode_run` needs of an entry (a :class:`~lanchat.feed.Entry`, or a
    stored row: a relay serves the stored bytes without parsing them again)."""

    @property
    def body(self) -> bytes: ...
    @property
    def sig(self) -> bytes | None: ...


def encode_entry(entry: WireEntry) -> bytes:
    """``{"b": body, "s": sig}`` as JSON bytes: the bytes exactly as signed and stored."""
    body = encode_basestring_ascii(entry.body.decode("ascii")).encode("ascii")
    if entry.sig is None:
        return b'{"b":' + body + b"}"
    return b'{"b":' + body + b',"s":"' + b64encode(entry.sig).encode("ascii") + b'"}'


def encode_run(entries: Iterable[WireEntry], key: PublicKey | None = None, *,
               encoded: Iterable[bytes] | None = None) -> bytes:
    """One ``msgs`` frame: a run (see the module docstring), with ``k`` when given.

    ``encoded``: the entries already encoded (:func:`encode_entry`), for a fan-out that
    encodes each entry once for every link.
    """
    parts = encoded if encoded is not None else (encode_entry(e) for e in entries)
    tail = b"]}\n" if key is None else b'],"k":"' + key.text.encode("ascii") + b'"}\n'
    return b'{"type":"msgs","e":[' + b",".join(parts) + tail


def encode_roster(roster: NodeRoster) -> bytes:
    """A node's roster as its node signed it (``roster {b, s, k}``, the bytes verbatim),
    or, for a roster marked gone here, ``gone {node, ver}`` (nobody's signature: see
    :meth:`lanchat.presence.NetworkRoster.withdraw`).  Raises ValueError for an unsigned
    live roster: :func:`lanchat.presence.sign_roster` signs our own first.
    """
    if roster.signed is not None:
        return dumps_line({"type": "roster", **roster.signed.to_wire()})
    if roster.gone:
        return encode_gone(roster.node, roster.ver)
    raise ValueError(f"the roster of {roster.node} is not signed")


def encode_gone(node: str, ver: int) -> bytes:
    return dumps_line({"type": "gone", "node": node, "ver": ver})


def encode_auth(proof: str, admit: str | None = None) -> bytes:
    """The dialer's answer to the welcome (v2): its signature, and its ``admit`` HMAC."""
    return dumps_line({"type": "auth", "proof": proof,
                       **({"admit": admit} if admit is not None else {})})


def encode_v1_refusal() -> bytes:
    """What a v1 daemon is told before the connection closes (see :data:`V1_REFUSAL`)."""
    return dumps_line({"type": V1_REFUSAL, "reason": V1_REFUSAL})


def encode_v2_refusal() -> bytes:
    """What a v2 daemon is told before the connection closes (see :data:`V2_REFUSAL`)."""
    return dumps_line({"type": V2_REFUSAL, "reason": V2_REFUSAL})


def encode_starttls() -> bytes:
    """The acceptor's answer to a v3 hello: TLS starts right after this line."""
    return dumps_line({"type": "starttls"})


def encode_sync(cursors: Mapping[str, int], page: int = MAX_SYNC_PAGE, *,
                heads: Mapping[str, str] | None = None) -> bytes:
    """One ``sync``, as pages of at most ``page`` cursors (``more: true`` on all but the last).

    ``heads``: per origin, the hash of the entry at our cursor (signed feeds only), so
    a peer holding another version of that very entry sees the fork (:class:`Sync`).
    """
    items = list(cursors.items())
    starts = range(0, len(items), page) if items else range(1)
    heads = heads or {}
    out = []
    for i in starts:
        chunk = dict(items[i:i + page])
        mine = {o: heads[o] for o in chunk if o in heads}
        out.append(dumps_line({"type": "sync", "cursors": chunk,
                               **({"heads": mine} if mine else {}),
                               **({"more": True} if i + page < len(items) else {})}))
    return b"".join(out)


def encode_floor(origin: str, seq: int) -> bytes:
    return dumps_line({"type": "floor", "origin": origin, "seq": seq})


def encode_ping() -> bytes:
    return dumps_line({"type": "ping"})


def encode_pong() -> bytes:
    return dumps_line({"type": "pong"})


def encode_bye(reason: str) -> bytes:
    return dumps_line({"type": "bye", "reason": reason})


def encode_error(code: str, message: str) -> bytes:
    return dumps_line({"type": "error", "code": code, "message": message, "fatal": True})


@dataclass(frozen=True, slots=True)
class Msgs:
    """One run of entries (parsed strictly, not yet verified) and the key sent with it."""

    entries: tuple[Entry, ...]
    key: PublicKey | None = None


@dataclass(frozen=True, slots=True)
class Roster:
    roster: NodeRoster


@dataclass(frozen=True, slots=True)
class RosterRefused:
    """A well-formed roster over a bound (presence limits): refused, the link stays up."""

    reason: str


@dataclass(frozen=True, slots=True)
class Sync:
    """Where the peer stands: per origin the highest seq it holds (and, for signed feeds,
    the hash of that entry).

    Cursors alone cannot show a fork of equal length: two daemons each holding another
    version of an origin's entry #n (the origin signed both, and sent each to one of
    them) would both say ``n`` and never exchange them.  With the head hashes the one
    that sees a difference sends its version, and both find the fork.
    """

    cursors: dict[str, int]
    #: More pages of this sync follow; act on the last (see :class:`SyncPages`).
    more: bool = False
    #: origin -> hash of the entry at its cursor (origins of signed feeds only).
    heads: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Gone:
    """The sender no longer reaches ``node`` (whose roster it relayed at version ``ver``)."""

    node: str
    ver: int


@dataclass(frozen=True, slots=True)
class Auth:
    proof: str
    admit: str | None = None


@dataclass(frozen=True, slots=True)
class Floor:
    origin: str
    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Bye:
    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """The acceptor's go-ahead: the next bytes either way are TLS."""


@dataclass(frozen=True, slots=True)
class Welcome:
    peer: PeerHello


@dataclass(frozen=True, slots=True)
class Refused:
    code: str
    message: str


Frame = (Msgs | Roster | RosterRefused | Gone | Sync | Floor | Auth | Ping | Pong | Bye
         | StartTls | Welcome | Refused)


def parse_frame(line: bytes) -> Frame:
    """Parse one link frame; raises :class:`RemoteProtocolError` (or ValidationError)."""
    frame = loads_line(line)
    if not isinstance(frame, dict):
        raise RemoteProtocolError("a link frame must be a JSON object", code="bad-frame")
    kind = frame.get("type")
    if kind == "msgs":
        raw, key_text = frame.get("e"), frame.get("k")
        if not isinstance(raw, list) or len(raw) > MAX_BATCH:
            raise RemoteProtocolError(f"msgs needs a list 'e' of at most {MAX_BATCH} entries",
                                      code="bad-frame")
        key = None
        if key_text is not None:
            try:
                key = PublicKey.from_text(key_text)
            except ValidationError as exc:
                raise RemoteProtocolError(str(exc), code="bad-frame") from None
        return Msgs(tuple(parse_run(raw)), key)
    if kind == "roster":
        try:
            return Roster(parse_signed_roster(frame))
        except ValidationError as exc:
            if exc.code not in ("roster-limit", "roster-signature"):
                raise
            return RosterRefused(str(exc))
    if kind == "gone":
        ver = frame.get("ver")
        if isinstance(ver, bool) or not isinstance(ver, int) or ver < 0:
            raise RemoteProtocolError("gone needs a version", code="bad-frame")
        try:
            return Gone(validate_node(frame.get("node")), ver)
        except ValidationError as exc:
            raise RemoteProtocolError(str(exc), code="bad-frame") from None
    if kind == "sync":
        cursors = parse_cursors(frame.get("cursors"))
        return Sync(cursors, more=frame.get("more") is True,
                    heads=parse_heads(frame.get("heads"), cursors))
    if kind == "auth":
        proof, admit = frame.get("proof"), frame.get("admit")
        if not isinstance(proof, str) or len(proof) > 128:
            raise RemoteProtocolError("auth needs a proof", code="bad-frame")
        if admit is not None and not _is_hex(admit, 64):
            raise RemoteProtocolError("admit must be 64 hex digits", code="bad-frame")
        return Auth(proof, admit)
    if kind == "floor":
        cursor = parse_cursors({frame.get("origin"): frame.get("seq")}, 1)
        ((origin, seq),) = cursor.items()
        return Floor(origin, seq)
    if kind == "ping":
        return Ping()
    if kind == "pong":
        return Pong()
    if kind == "bye":
        reason = frame.get("reason")
        return Bye(reason[:200] if isinstance(reason, str) else "bye")
    if kind == "welcome":
        return Welcome(parse_peer_hello(frame))
    if kind == "starttls":
        return StartTls()
    if kind == "error":
        code, message = frame.get("code"), frame.get("message")
        return Refused(str(code)[:50], str(message)[:300])
    raise RemoteProtocolError(f"unknown link frame type {kind!r}", code="bad-frame")


class SyncPages:
    """Adds up the pages of one ``sync`` until its last; holds at most MAX_SYNC_CURSORS."""

    def __init__(self) -> None:
        self._acc: dict[str, int] = {}
        self._heads: dict[str, str] = {}

    def add(self, sync: Sync) -> Sync | None:
        """The whole sync once ``sync`` is the last page; None while more follow."""
        for origin, seq in sync.cursors.items():
            if len(self._acc) >= MAX_SYNC_CURSORS and origin not in self._acc:
                break
            self._acc[origin] = seq
            head = sync.heads.get(origin)
            if head is not None:
                self._heads[origin] = head
            else:
                self._heads.pop(origin, None)
        if sync.more:
            return None
        whole = Sync(self._acc, heads=self._heads)
        self._acc, self._heads = {}, {}
        return whole


def diverged(theirs: Sync, ours: Mapping[str, tuple[int, str]]) -> dict[str, int]:
    """Per origin, the seq at which the peer holds another version of our head entry.

    ``ours``: origin -> (seq, hash) of the entries at our cursors.  Only equal cursors
    are compared: where one side holds more, the replay itself shows a fork (the run
    does not chain to the receiver's head, and it asks for the overlap).
    """
    out = {}
    for origin, head in theirs.heads.items():
        mine = ours.get(origin)
        if mine is not None and mine[0] == theirs.cursors.get(origin) and mine[1] != head:
            out[origin] = mine[0]
    return out


def missing(ours: Mapping[str, int], theirs: Mapping[str, int]) -> dict[str, int]:
    """Per origin, the cursor the other side is at where we hold more than it does."""
    return {origin: theirs.get(origin, 0) for origin, high in ours.items()
            if high > theirs.get(origin, 0)}


def keeps(dialer_of_existing: str, dialer_of_new: str) -> bool:
    """Of two links to one node, keep the new one?  The lower dialer's link wins.

    The answer depends only on who dialed each link, so both ends of the pair
    make the same choice.
    """
    return dialer_of_new < dialer_of_existing
