"""A rogue daemon for tests: speaks the real link protocol, says whatever the test wants.

:class:`Rogue` opens a TCP connection to a daemon's hub port and plays a daemon
(see :mod:`lanchat.linkproto`): a v3 ``hello`` with a key of its own (its node
id is that key's; :func:`rogue_identity` makes more), TLS 1.3 when the daemon
answers ``starttls`` (as the acceptor, it presents its own key's certificate,
:mod:`lanchat.tlsid`), the handshake's proofs made with :mod:`lanchat.handshake`
(and the shared secret's ``admit`` when its :class:`RogueIdentity` knows the
secret), then any frames at all -- ``msgs``, ``floor``, ``roster``, ``bye``, or
raw bytes -- while reading what comes back.

Who the rogue is lives in one place, :class:`RogueIdentity` (its Ed25519
signing key and the node id derived from it -- or any node id it claims --,
name, host, the secret it knows).  It speaks protocol 3: keyed hellos, TLS,
proofs (:mod:`lanchat.handshake`) and signed rosters; ``hello(v=2)`` plays an
older daemon that links in clear.  Its messages are
entries of signed feeds (:mod:`lanchat.feed`) that it writes itself with
:class:`Feed`: its own feed signed with its own key, or any other origin's
"signed" with a key that is not that origin's (a forgery), with any fields,
chained or not.  The rogue is a test's puppet, not a daemon: it never answers
on its own (no pong, no replay), so a test sees exactly what the daemon sends.

Typical use::

    r = Rogue(daemon.port)            # connected, nothing sent yet
    r.handshake()                     # hello, welcome, (auth), sync {}
    r.msgs([r.message(1, ts=1e17)])   # one run of its own feed, with its key
    r.until("sync")
    r.close()
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from lanchat import handshake, tlsid
from lanchat.feed import MSG_DOMAIN, PublicKey, SigningKey, b64encode, entry_hash
from lanchat.presence import ROSTER_DOMAIN


def _derived_key(label: object) -> SigningKey:
    return SigningKey(hashlib.sha256(f"rogue key {label}".encode()).digest())


#: The rogue's own key, and the node id it certifies, unless a test picks others.
ROGUE_KEY = _derived_key("fake")
ROGUE_NODE = ROGUE_KEY.node
#: A plausible timestamp for a rogue's messages (2023-11-14), one second apart per seq.
BASE_TS = 1_700_000_000.0
#: A ``prev`` for an entry whose predecessor the writer does not know (after a floor).
UNKNOWN_PREV = "00" * 32


def rogue_key(label: object) -> SigningKey:
    """A key of the rogue's own, the same for the same ``label`` (the same label, the same
    key: tests stay repeatable); ROGUE_KEY for ROGUE_NODE."""
    if label == ROGUE_NODE:
        return ROGUE_KEY
    return _derived_key(label)


@dataclass(frozen=True, slots=True)
class RogueIdentity:
    """Everything that says who the rogue is.

    ``node``: the node id its hello claims (by default the one its key certifies);
    ``signing``: its Ed25519 key (None: ROGUE_KEY, or :func:`rogue_key` of a ``node``
    given -- a key that is *not* that node's, as a forger has); ``key``: the shared
    secret, if it knows it.
    """

    node: str = ""
    name: str = "fake peer"
    host: str = "fakehost"
    port: int | None = None
    key: bytes | None = None
    signing: SigningKey | None = None

    @property
    def link_key(self) -> SigningKey:
        if self.signing is not None:
            return self.signing
        return ROGUE_KEY if not self.node else rogue_key(self.node)

    def __post_init__(self) -> None:
        if not self.node:
            object.__setattr__(self, "node", self.link_key.node)


@dataclass
class Feed:
    """One origin's feed as a test writes it: entries chained to the ones written before.

    ``key`` signs (the origin's own key, or any other: a forgery); ``origin`` is the
    origin the entries claim (by default the key's node).  ``public`` is the key sent
    with the runs (by default ``key``'s public half).
    """

    key: SigningKey
    origin: str = ""
    public: PublicKey | None = None
    hashes: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.origin = self.origin or self.key.node
        self.public = self.public or self.key.public

    def entry(self, seq: int, text: str = "", *, prev: Any = "chain", sign: bool = True,
              seal: str | None = None, **fields: Any) -> dict[str, Any]:
        """Entry ``seq`` in wire form ``{b, s}``; any body field may be overridden.

        ``prev``: by default the hash of entry ``seq - 1`` as this feed wrote it last
        (:data:`UNKNOWN_PREV` if it wrote none).  The body is compact ASCII JSON in the
        documented order, so what a daemon stores is exactly what was signed.  ``seal``: a
        sealed direct message (lanchat.seal's text form) in place of ``text``.
        """
        if prev == "chain":
            prev = None if seq == 1 else self.hashes.get(seq - 1, UNKNOWN_PREV)
        body_fields = fake_msg(seq, text, self.origin, **fields)
        del body_fields["id"]
        body_fields = {"v": 1, **body_fields}
        if seal is not None:
            body_fields = {("seal" if k == "text" else k): (seal if k == "text" else v)
                           for k, v in body_fields.items()}
        body_fields.pop("prev", None)
        body_fields["prev"] = prev
        body = json.dumps(body_fields, separators=(",", ":"), ensure_ascii=True).encode()
        wire: dict[str, Any] = {"b": body.decode()}
        sig = self.key.sign(MSG_DOMAIN + body) if sign else None
        if sig is not None:
            wire["s"] = b64encode(sig)
        self.hashes[seq] = entry_hash(body, sig)
        return wire


def rogue_identity(label: str, **fields: Any) -> RogueIdentity:
    """Another rogue identity: a key of its own made from ``label``, its node id that key's."""
    key = rogue_key(label)
    return RogueIdentity(node=key.node, signing=key, **fields)


def fake_msg(seq: int, text: str = "", origin: str = ROGUE_NODE, *,
             ts: Any = None, **fields: Any) -> dict[str, Any]:
    """A message in wire form as origin ``origin`` would send it (any field may be overridden)."""
    return {"id": f"{origin}:{seq}", "origin": origin, "seq": seq,
            "ts": BASE_TS + seq if ts is None else ts, "room": "lobby", "nick": "fakenick",
            "host": "fakehost", "text": text or f"f{seq}", **fields}


class Rogue:
    """A connection to a daemon, playing a daemon.  Owns its socket; :meth:`close`.

    ``Rogue(port)`` dials a daemon's hub port (then :meth:`handshake`); a
    :class:`RogueListener` makes one from a connection a daemon dialed (then
    :meth:`answer`).
    """

    def __init__(self, port: int, identity: RogueIdentity | None = None, *,
                 host: str = "127.0.0.1", timeout: float = 5.0, source: str | None = None,
                 sock: socket.socket | None = None) -> None:
        self.identity = identity or RogueIdentity()
        # ``source``: another loopback address (127.0.0.2, ...) plays another machine.
        self.sock: socket.socket | tlsid.TlsSocket = sock or socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        #: The plain socket under TLS (``sock`` is the TLS connection once it runs).
        self.tcp = self.sock
        self.buf = b""
        #: Frames read but not yet taken by :meth:`frame` (the answer to a hello).
        self.backlog: list[dict[str, Any]] = []
        #: The daemon's key, as its TLS certificate showed it (we dialed it).
        self.peer_key: PublicKey | None = None
        #: The challenge our hello carried (shared secret), and the daemon's welcome.
        self.nonce: str | None = None
        self.welcome: dict[str, Any] | None = None
        #: The feeds this rogue writes, by origin (its own, signed with its key, first).
        self.feeds: dict[str, Feed] = {}

    @property
    def node(self) -> str:
        return self.identity.node

    # -- sending -------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """One JSON frame, as given (no validation: a rogue sends what it likes)."""
        self.raw(json.dumps(obj).encode() + b"\n")

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, *, tls: bool = True, **over: Any) -> None:
        """A daemon's v3 hello from our identity: our key and a fresh nonce (``over`` wins).

        Then, with ``tls``, the daemon's answer is read: ``starttls`` starts TLS (the
        next frame is the welcome, inside it); anything else waits for :meth:`frame`.
        """
        me = self.identity
        frame: dict[str, Any] = {"type": "hello", "v": 3, "role": "daemon", "node": me.node,
                                 "name": me.name, "host": me.host, "port": me.port,
                                 "key": me.link_key.public.text,
                                 "nonce": secrets.token_hex(handshake.NONCE_BYTES)}
        frame.update(over)
        self.nonce = frame.get("nonce")
        self.send(frame)
        if tls:
            answer = self.frame()
            if answer.get("type") == "starttls":
                self.start_tls()
            else:
                self.backlog.append(answer)

    def start_tls(self) -> None:
        """Run TLS as the client (after the daemon's ``starttls``); note the daemon's key."""
        assert not self.buf, "bytes after starttls"
        self.sock = tlsid.tls_handshake(self.tcp, tlsid.client_context(), server_side=False)
        self.peer_key = tlsid.peer_key(self.sock.getpeercert(binary_form=True))  # type: ignore[arg-type]

    def serve_tls(self) -> None:
        """Run TLS as the server (after our ``starttls``), presenting our key's certificate."""
        assert not self.buf, "bytes after the hello"
        ctx = tlsid.server_context(self.identity.link_key)
        self.sock = tlsid.tls_handshake(self.tcp, ctx, server_side=True)

    def handshake(self, cursors: dict[str, int] | None = None, *, timeout: float = 5.0,
                  **hello: Any) -> dict[str, Any]:
        """Hello, the daemon's welcome, our ``auth`` (proofs), then ``sync {cursors}``.

        Returns the welcome.  Raises AssertionError if the daemon refuses us, or
        if its welcome does not prove its key (or the secret we hold).
        """
        self.hello(**hello)
        welcome = self.frame(timeout)
        assert welcome.get("type") == "welcome", f"refused: {welcome}"
        self.welcome = welcome
        self.auth(welcome)
        self.sync(cursors or {})
        return welcome

    def transcript(self, *, dialer: bool, peer: dict[str, Any]) -> bytes:
        """The handshake transcript with ``peer`` (its hello or welcome), we in our role."""
        me = self.identity
        assert self.nonce is not None
        ours = handshake.Side(me.node, me.link_key.public, self.nonce)
        theirs = handshake.Side(peer["node"], PublicKey.from_text(peer["key"]), peer["nonce"])
        return handshake.transcript(ours, theirs) if dialer else handshake.transcript(theirs,
                                                                                      ours)

    def auth(self, welcome: dict[str, Any], **over: Any) -> None:
        """Check the welcome's proofs, then send our ``auth`` (``over`` replaces fields)."""
        me = self.identity
        data = self.transcript(dialer=True, peer=welcome)
        assert handshake.check(PublicKey.from_text(welcome["key"]), welcome.get("proof"),
                               handshake.ACCEPTOR, data), "the welcome's proof is wrong"
        if me.key is not None:
            assert handshake.admission_problem(me.key, welcome.get("admit"),
                                               handshake.ACCEPTOR, data) is None
        frame: dict[str, Any] = {"type": "auth",
                                 "proof": handshake.prove(me.link_key, handshake.DIALER, data)}
        if me.key is not None:
            frame["admit"] = handshake.admit(me.key, handshake.DIALER, data)
        frame.update(over)
        self.send(frame)

    def answer(self, cursors: dict[str, int] | None = None, *,
               timeout: float = 5.0, **welcome: Any) -> dict[str, Any]:
        """The acceptor's side: read a dialing daemon's hello, starttls, TLS, our welcome,
        then sync.

        The welcome proves our key (and the secret, with one); the daemon's
        ``auth`` frame is read and checked.  Returns the daemon's hello.
        """
        hello = self.frame(timeout)
        assert hello.get("type") == "hello" and hello.get("role") == "daemon", hello
        self.send({"type": "starttls"})
        self.serve_tls()
        me = self.identity
        self.nonce = secrets.token_hex(handshake.NONCE_BYTES)
        data = self.transcript(dialer=False, peer=hello)
        frame: dict[str, Any] = {"type": "welcome", "v": 3, "role": "daemon", "node": me.node,
                                 "name": me.name, "host": me.host, "port": me.port,
                                 "key": me.link_key.public.text, "nonce": self.nonce,
                                 "proof": handshake.prove(me.link_key, handshake.ACCEPTOR,
                                                          data)}
        if me.key is not None:
            frame["admit"] = handshake.admit(me.key, handshake.ACCEPTOR, data)
        frame.update(welcome)
        self.send(frame)
        proof = self.until("auth", timeout)
        assert handshake.check(PublicKey.from_text(hello["key"]), proof.get("proof"),
                               handshake.DIALER, data), "the daemon's proof is wrong"
        if me.key is not None:
            assert handshake.admission_problem(me.key, proof.get("admit"), handshake.DIALER,
                                               data) is None, "the daemon's admit is wrong"
        self.sync(cursors or {})
        return hello

    def feed(self, origin: str | None = None, *, key: SigningKey | None = None,
             public: PublicKey | None = None) -> Feed:
        """The feed of ``origin`` this rogue writes (its own by default).

        Another origin's is signed with ``key`` (by default the rogue's own: a forgery)
        and sent with ``public`` (by default that key's public half).
        """
        origin = origin or self.identity.link_key.node
        if origin not in self.feeds:
            self.feeds[origin] = Feed(key or self.identity.link_key, origin, public)
        return self.feeds[origin]

    def message(self, seq: int, text: str = "", *, origin: str | None = None,
                **fields: Any) -> dict[str, Any]:
        """Entry ``seq`` of our feed (or of ``origin``'s, signed with our key), signed."""
        return self.feed(origin).entry(seq, text, **fields)

    def msgs(self, entries: list[dict[str, Any]], *, key: Any = "feed") -> None:
        """One ``msgs`` frame of ``entries``, with the key of the feed they claim.

        ``key``: the ``k`` to send instead (a string, or None for none).
        """
        frame: dict[str, Any] = {"type": "msgs", "e": entries}
        if key == "feed" and entries:
            origin = json.loads(entries[0]["b"]).get("origin")
            feed = self.feeds.get(origin)
            key = feed.public.text if feed is not None and feed.public is not None else None
        if key is not None:
            frame["k"] = key
        self.send(frame)

    def sync(self, cursors: dict[str, int]) -> None:
        self.send({"type": "sync", "cursors": cursors})

    def floor(self, origin: str, seq: int) -> None:
        self.send({"type": "floor", "origin": origin, "seq": seq})

    def roster(self, roster: dict[str, Any], *, key: SigningKey | None = None) -> None:
        """``roster`` signed as a node would sign its own: by ``key``, else by our key."""
        self.send(signed_roster_frame(roster, key or self.identity.link_key))

    def ping(self) -> None:
        self.send({"type": "ping"})

    def bye(self, reason: Any = "bye") -> None:
        self.send({"type": "bye", "reason": reason})

    # -- reading -------------------------------------------------------------------------

    def frame(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next JSON frame (the hub's text greeting is skipped); EOFError at close."""
        if self.backlog:
            return self.backlog.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.lstrip().startswith(b"{"):
                    obj = json.loads(line)
                    assert isinstance(obj, dict)
                    return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("closed")
            self.buf += data

    def until(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Read frames until one of type ``kind`` (bounded by ``timeout`` and 1,000 frames)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            f = self.frame(max(0.01, deadline - time.monotonic()))
            if f.get("type") == kind:
                return f
            seen.append(f.get("type"))
            if time.monotonic() > deadline or len(seen) > 1000:
                raise AssertionError(f"no {kind}; saw {seen[-20:]}")

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the daemon has closed the connection (frames meanwhile are dropped)."""
        try:
            while True:
                self.frame(timeout)
        except EOFError:
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
        self.tcp.close()


def signed_roster_frame(roster: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """A ``roster {b, s, k}`` frame: ``roster`` as compact JSON, signed by ``key``.

    Whoever ``roster`` names, ``key`` signs it: a rogue can sign another node's roster
    with its own key (the daemon must refuse it), or its own anything it likes.
    """
    body = json.dumps(roster, separators=(",", ":")).encode()
    sig = key.sign(ROSTER_DOMAIN + body)
    return {"type": "roster", "b": body.decode(), "s": b64encode(sig), "k": key.public.text}


class RogueListener:
    """A port that daemons dial (``--peer 127.0.0.1:PORT``); each connection becomes a Rogue."""

    def __init__(self, identity: RogueIdentity | None = None) -> None:
        self.identity = identity or RogueIdentity()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted: list[Rogue] = []

    def accept(self, timeout: float = 10.0) -> Rogue:
        """The next connection a daemon opened to us (AssertionError after ``timeout``)."""
        self.listener.settimeout(timeout)
        try:
            sock, _ = self.listener.accept()
        except TimeoutError:
            raise AssertionError(f"no daemon dialed port {self.port} in {timeout} s") from None
        sock.settimeout(5.0)
        rogue = Rogue(self.port, self.identity, sock=sock)
        self.accepted.append(rogue)
        return rogue

    def close(self) -> None:
        for rogue in self.accepted:
            rogue.close()
        self.listener.close()
