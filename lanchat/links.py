"""Links to other daemons: dial, accept, keep one per node, and lose nothing.

A :class:`LinkManager` dials the static peers (``--peer HOST:PORT``) and the
peers discovery reports, and accepts the links other daemons open to our hub
(the hub hands over any connection whose hello says ``role: daemon``).  The
protocol -- hello, TLS, cursors, replay, heartbeats, the tie-break -- is in
:mod:`lanchat.linkproto`.

Every link runs over TLS 1.3 (:mod:`lanchat.tlsid`): the acceptor presents its
node key's certificate, the dialer checks that key against the node it expected
(mDNS TXT ``id``) and against the key pinned for the name it dialed
(:class:`lanchat.pins.PeerPins`: ``peer:HOST:PORT`` for a static peer,
``mdns:NAME`` for one discovery found), then the signed hello transcript of
:mod:`lanchat.handshake` runs inside the tunnel and proves the dialer's key.  A
key that does not match is refused with one log line on each side: the refusing
side logs why and sends it in an ``error`` frame, which the other side logs.

Each established :class:`Link` has two threads: its reader (the dialer's
thread, or the hub connection's thread for an accepted link) and a sender
(``link-<node>-tx``).  The sender owns everything written to the socket.  Live
messages reach it through a bounded queue; when that queue overflows the link
does not drop anything it owes -- it forgets the queue and catches up from the
history store, which holds every message anyway.  So a link can fall behind,
but never loses a message and never stalls the router.

Socket timeouts are the heartbeat's other half: a link whose peer has been
silent for ``DEAD_AFTER_S`` (no frame, not even a ping), or that cannot send
for as long, is dead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import secrets
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from lanchat import auth, handshake, linkproto, pinfile, tlsid
from lanchat.commands import Hello
from lanchat.errors import LanchatError, RemoteProtocolError, RouterTimeout, ValidationError
from lanchat.events import Event
from lanchat.feed import (
    Entry,
    PublicKey,
    RunResult,
    SigningKey,
    StoredEntry,
    cut_runs,
    fingerprint,
    verify_run,
)
from lanchat.framing import LineDecoder
from lanchat.limits import (
    LINK_BURST,
    LINK_BYE_GRACE_S,
    LINK_HANDSHAKE_TIMEOUT_S,
    LINK_MAX_RATE,
    MAX_DAEMON_LINKS,
    MAX_ORIGINS,
    ROUTER_HANDOFF_TIMEOUT_S,
    RUNS_IN_FLIGHT,
    RUNS_IN_FLIGHT_BYTES,
    SHUTDOWN_TIMEOUT_S,
)
from lanchat.model import Message
from lanchat.pins import PEERS_HEADER, PeerPins, PeerVerdict, Pins, check_name, hub_name
from lanchat.presence import NodeRoster, sign_roster
from lanchat.ratelimit import TokenBucket
from lanchat.render import neutralise

log = logging.getLogger(__name__)

#: Live messages a link queues before it stops queueing and catches up from
#: history instead.
MAX_LINK_QUEUE = 10_000

#: Seconds allowed for connecting and for the other side's welcome.
CONNECT_TIMEOUT_S = 3.0

#: A link that lasted this long resets its dialer's backoff.
STABLE_AFTER_S = 10.0

#: Bytes read at a time inside TLS until the dialer's ``auth`` is in: far below the
#: hub's frame limit (limits.MAX_FRAME_BYTES), which the handshake is held to.
AUTH_READ_BYTES = 4096


def _der(conn: tlsid.TlsSocket) -> bytes | None:
    der = conn.getpeercert(binary_form=True)
    return der if isinstance(der, bytes) else None


class LinkRouter(Protocol):
    """What links need from the router (see :class:`lanchat.router.Router`)."""

    node: str

    #: Our signing key (our feed): a run of our own origin must verify with its public half.
    key: SigningKey | None

    def attach_link(self, link: Any) -> None: ...
    def detach_link(self, link: Any) -> None: ...
    def submit_run(self, run: Sequence[Entry], key: PublicKey, *, floor: bool = False,
                   source: object | None) -> Future[RunResult]: ...
    def apply_roster(self, roster: NodeRoster, *, source: Any) -> None: ...
    def withdraw_roster(self, node: str, ver: int, *, source: Any) -> None: ...
    def cursors(self) -> dict[str, int]: ...
    def heads(self) -> dict[str, tuple[int, str]]: ...
    def refuse_roster(self, reason: str, *, source: Any) -> None: ...
    def forked(self) -> dict[str, int]: ...


class History(Protocol):
    """Read access to stored entries, for replay (see :class:`lanchat.store.Store`)."""

    def entries_after(self, origin: str, seq: int, limit: int) -> list[StoredEntry]: ...
    def feed_key(self, origin: str) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """How this daemon introduces itself on links; ``key`` proves it (``node`` is its id)."""

    node: str
    name: str
    host: str
    port: int | None
    key: SigningKey

    def __post_init__(self) -> None:
        if self.key.node != self.node:
            raise ValueError(f"node {self.node} is not the key's ({self.key.node})")


class LinkClosed(LanchatError):
    """The link ended (bye, timeout, reset, or replaced by a better one)."""

    code = "link-closed"


class SameIdentity(LinkClosed):
    """The other daemon proved it holds our own key: two daemons run with one identity."""

    code = "same-identity"


class Link:
    """One established link to another daemon.

    Thread-safety: :meth:`deliver` and :meth:`send_roster` run on the router
    thread and only queue; :meth:`run` is the reader; the sender thread does all
    writing.  ``_cond`` guards the queues, flags and ``_peer_has``.
    """

    def __init__(self, manager: LinkManager, sock: tlsid.TlsSocket, decoder: LineDecoder,
                 peer: linkproto.PeerHello, *, address: tuple[Any, ...], dialer: str,
                 pending: Sequence[bytes] = ()) -> None:
        self.manager = manager
        self.sock = sock
        self.decoder = decoder
        self._pending = list(pending)  # frames that came in right behind the handshake
        self.node = peer.node
        self.name = peer.name
        self.host = peer.host
        self.address = address
        self.port = peer.port
        self.dialer = dialer  # node id of the side that dialed
        #: The peer's key, as TLS (acceptor) or its proof (dialer) showed it.
        self.key: PublicKey | None = peer.key
        self.started = time.time()
        self.last_heard = time.time()
        self._cond = threading.Condition(threading.Lock())
        self._live: deque[Event] = deque()
        self._rosters: dict[str, NodeRoster] = {}
        self._control: list[bytes] = []
        self._resync = False
        # Until the peer's first sync says what it holds, nothing is sent but
        # control frames and rosters (live messages wait in _live).
        self._synced = False
        self._closing = False
        self._peer_has: dict[str, int] = {}
        # Reader thread only: origins' keys known on this link (checked against their
        # node ids, at most MAX_ORIGINS), the floor the peer announced for its next run,
        # the origins we asked once for an overlap that would prove a fork, and those
        # whose fork we showed the peer (our version), once.
        self._keys: dict[str, PublicKey] = {}
        # Runs handed to the router, oldest first, not yet answered (RUNS_IN_FLIGHT).
        self._in_flight: deque[tuple[Future[RunResult], Sequence[Entry], int]] = deque()
        self._in_flight_bytes = 0  # the entries' body bytes of the runs in flight
        self._floor: linkproto.Floor | None = None
        self._probed: set[str | tuple[str, str]] = set()
        # Sender thread only: origins whose key went with a run on this link, and those
        # whose stored entries cannot be cut into runs (the origin broke its signing).
        self._keyed: set[str] = set()
        self._stuck: set[str] = set()
        self._bye: bytes | None = None  # what close() asks the sender to say last
        #: Set once the link is over: both threads done, socket closed, unregistered.
        self.done = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name=f"link-{self.node[:8]}-tx",
                                        daemon=False)

    def __repr__(self) -> str:
        return f"<Link {self.node[:8]} {self.name!r} {self.address[0]}>"

    # -- router side (never blocks) ------------------------------------------------

    def deliver(self, events: Sequence[Event]) -> bool:
        with self._cond:
            if self._closing:
                return True
            if len(self._live) + len(events) > MAX_LINK_QUEUE:
                self._live.clear()
                self._resync = True  # history has it all: catch up from there
            else:
                self._live.extend(events)
            self._cond.notify()
        return True

    def vouch(self, events: Sequence[Event]) -> None:
        """The peer gets these from their origin or sender (the router's relay rule), not
        from us: count them as held, so the next message we do send it is in order.  If it
        missed one after all, its next sync (anti-entropy) says so and we replay."""
        with self._cond:
            has = self._peer_has
            for event in events:
                m = event.item
                if isinstance(m, Message) and m.seq == has.get(m.origin, 0) + 1:
                    has[m.origin] = m.seq

    def send_roster(self, roster: NodeRoster) -> None:
        with self._cond:
            self._rosters[roster.node] = roster  # only the newest of each node matters
            self._cond.notify()

    def _queue_control(self, data: bytes) -> None:
        with self._cond:
            self._control.append(data)
            self._cond.notify()

    # -- the reader ------------------------------------------------------------------

    def run(self) -> None:
        """Read frames until the link ends.  Runs on the caller's thread; closes the socket."""
        router = self.manager.router
        self.sock.settimeout(linkproto.DEAD_AFTER_S)
        self.decoder.max_frame = linkproto.MAX_LINK_FRAME
        reason = "connection closed"
        try:
            self._queue_control(self._sync())
            self._sender.start()
            # Generous, and a throttle rather than a filter: a link must lose nothing, so
            # a peer past LINK_MAX_RATE is simply read more slowly (TCP pushes back).
            throttle = TokenBucket(LINK_MAX_RATE, LINK_BURST)
            pages = linkproto.SyncPages()
            for frame in self._frames():
                self.last_heard = time.time()
                pause = throttle.consume(time.monotonic(), max(
                    1, len(frame.entries) if isinstance(frame, linkproto.Msgs) else 1))
                if pause > 0:
                    time.sleep(pause)  # at most one frame's worth: MAX_BATCH * 4 / LINK_MAX_RATE
                if isinstance(frame, linkproto.Msgs):
                    self._received(frame)
                elif isinstance(frame, linkproto.Roster):
                    router.apply_roster(frame.roster, source=self)
                elif isinstance(frame, linkproto.RosterRefused):
                    router.refuse_roster(frame.reason, source=self)
                elif isinstance(frame, linkproto.Gone):
                    router.withdraw_roster(frame.node, frame.ver, source=self)
                elif isinstance(frame, linkproto.Sync):
                    whole = pages.add(frame)
                    if whole is None:
                        continue  # more pages of this sync follow
                    cursors = whole.cursors
                    for origin, seq in self._forks_shown(whole).items():
                        cursors[origin] = seq - 1  # so that our version goes to it
                    with self._cond:
                        self._peer_has = cursors
                        self._synced = True
                        self._resync = True
                        self._cond.notify()
                elif isinstance(frame, linkproto.Floor):
                    self._floor = frame  # counts only with the run right after it
                elif isinstance(frame, linkproto.Ping):
                    self._queue_control(linkproto.encode_pong())
                elif isinstance(frame, linkproto.Bye):
                    # The peer's words go to our log: inert, or they could forge log lines.
                    reason = f"peer said bye ({neutralise(frame.reason)})"
                    return
                elif isinstance(frame, linkproto.Refused):
                    # It refused our proof (its pin of us, its secret): why, in our log too.
                    reason = f"refused by the other side: {neutralise(frame.message)}"
                    log.warning("%r: %s", self, reason)
                    return
        except TimeoutError:
            reason = f"no word for {linkproto.DEAD_AFTER_S:g} s"
        except (RemoteProtocolError, ValidationError) as exc:
            reason = f"protocol error: {exc}"
            log.warning("%r: %s; closing the link", self, exc)
        except OSError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        except LanchatError as exc:  # router closed, store failure
            reason = str(exc)
        finally:
            self._finish(reason)

    def _frames(self) -> Any:
        for line in self._pending:
            if line.strip():
                yield linkproto.parse_frame(line)
        self._pending = []
        while True:
            if not self.sock.readable():
                # What the router made of the runs in flight, before we wait for more (a
                # gap must be asked for even if the peer sends nothing else).  While data
                # waits, read on: the runs queue up and are stored together.
                self._settle()
            data = self.sock.recv(262144)
            if not data:
                return
            for line in self.decoder.feed(data):
                if line.strip():
                    yield linkproto.parse_frame(line)

    def _received(self, frame: linkproto.Msgs) -> None:
        """Verify a run, then hand it to the router; ask for what it showed us missing.

        Raises :class:`~lanchat.feed.FeedError` (the link closes) for a run that does not
        verify with its origin's key -- a forgery, or a relay that changed something --
        and RemoteProtocolError for a run whose origin's key we do not know.
        """
        floor, self._floor = self._floor, None
        run = frame.entries
        if not run:
            return
        origin = run[0].origin
        key = self._key_for(origin, frame.key)
        verify_run(run, key)
        with self._cond:  # the peer has what it sends us: never send it back
            if run[-1].seq > self._peer_has.get(origin, 0):
                self._peer_has[origin] = run[-1].seq
        pruned = floor is not None and floor.origin == origin and floor.seq == run[0].seq - 1
        # Runs in flight: the router stores these while we read and verify the next.
        size = sum(len(e.body) for e in run)
        self._in_flight.append(
            (self.manager.router.submit_run(run, key, floor=pruned, source=self), run, size))
        self._in_flight_bytes += size
        self._settle(keep=RUNS_IN_FLIGHT, keep_bytes=RUNS_IN_FLIGHT_BYTES)

    def _settle(self, keep: int = 0, keep_bytes: int = 0) -> None:
        """Wait for the router's answers until at most ``keep`` runs of at most
        ``keep_bytes`` in all are in flight; act on them.

        A gap asks for one replay (``sync``), however many runs showed it.
        """
        gap = False
        while self._in_flight and (len(self._in_flight) > keep
                                   or self._in_flight_bytes > keep_bytes):
            future, run, size = self._in_flight.popleft()
            self._in_flight_bytes -= size
            result = _wait_run(future)
            gap = gap or result.gap
            self._answered(run, result)
        if gap:
            self._queue_control(self._sync())

    def _answered(self, run: Sequence[Entry], result: RunResult) -> None:
        """Act on the router's answer to ``run`` (other than a gap): a fork, a probe."""
        origin = run[0].origin
        if result.gap:
            return
        if result.fork and ("fork", origin) not in self._probed:
            # It holds the other version and believes we hold it too: show it ours, once.
            self._probed.add(("fork", origin))
            with self._cond:
                self._peer_has[origin] = min(self._peer_has.get(origin, 0), run[0].seq - 1)
                self._resync = True
                self._cond.notify()
        elif result.probe is not None and origin not in self._probed:
            self._probed.add(origin)
            log.info("%r: %s's entry #%d does not follow the one we hold; asking for the "
                     "overlap", self, origin, run[0].seq)
            cursors = self.manager.router.cursors()
            cursors[origin] = result.probe
            self._queue_control(linkproto.encode_sync(cursors))

    def _sync(self) -> bytes:
        """Our ``sync``: our cursors, and the hash of each signed feed's entry there."""
        heads = self.manager.router.heads()
        cursors = self.manager.router.cursors()
        return linkproto.encode_sync(cursors, heads={
            o: h for o, (seq, h) in heads.items() if cursors.get(o) == seq})

    def _forks_shown(self, sync: linkproto.Sync) -> dict[str, int]:
        """The origins whose entry at the peer's cursor is another version than ours.

        Once per origin and link: we send the peer our version (it then holds two, finds
        the fork and sends us its own, see :meth:`_answered`).
        """
        if not sync.heads:
            return {}
        found = linkproto.diverged(sync, self.manager.router.heads())
        shown = {}
        for origin, seq in found.items():
            if ("head", origin) in self._probed:
                continue
            self._probed.add(("head", origin))
            log.info("%r holds another version of %s's entry #%d than ours; sending it ours",
                     self, origin, seq)
            shown[origin] = seq
        return shown

    def _key_for(self, origin: str, sent: PublicKey | None) -> PublicKey:
        """``origin``'s public key: ours for our own origin, else known or sent (and checked)."""
        key = self._keys.get(origin)
        if key is not None:
            return key
        own = self.manager.router.key
        if origin == self.manager.me.node and own is not None:
            key = own.public  # whatever key came along: only ours writes our feed
        elif sent is not None:
            if sent.node != origin:
                raise RemoteProtocolError(f"the key sent is {sent.node}'s, not {origin}'s",
                                          code="wrong-key")
            key = sent
        else:
            raw = self.manager.history.feed_key(origin)
            if raw is None:
                raise RemoteProtocolError(f"a run of {origin} came without its key",
                                          code="no-key")
            key = PublicKey(raw)
        if len(self._keys) < MAX_ORIGINS:
            self._keys[origin] = key
        return key

    # -- the sender -------------------------------------------------------------------

    def _send_loop(self) -> None:
        next_digest = time.monotonic() + linkproto.ANTI_ENTROPY_S
        try:
            while True:
                if time.monotonic() >= next_digest:
                    # Anti-entropy: what we hold, so the peer replays anything the relay
                    # rule (or a lost link) made us miss.
                    next_digest = time.monotonic() + linkproto.ANTI_ENTROPY_S
                    self._queue_control(self._sync())
                with self._cond:
                    while not (self._rosters or self._control or self._closing or (
                            self._synced and (self._live or self._resync))):
                        if not self._cond.wait(linkproto.HEARTBEAT_S):
                            break
                    if self._closing:
                        break
                    control, self._control = self._control, []
                    rosters = list(self._rosters.values())
                    self._rosters.clear()
                    resync = live = None
                    if self._synced:
                        resync, self._resync = self._resync, False
                        live = list(self._live)
                        self._live.clear()
                if not (control or rosters or resync or live):
                    control = [linkproto.encode_ping()]
                out = b"".join(control) + b"".join(self.manager.encode_roster(r) for r in rosters)
                if out:
                    self.sock.sendall(out)
                if resync:
                    self._replay()
                if live:
                    self._send_live(live)
            self._say_bye()
        except OSError as exc:  # includes the send timeout: the peer stopped reading
            log.debug("%r: send failed: %s", self, exc)
        self._shut()  # wakes the reader, if it is not the one ending the link

    def _say_bye(self) -> None:
        """Send our bye (from :meth:`close`) if the peer's window takes it at once."""
        bye = self._bye
        if bye is None:
            return
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        if poller.poll(0):  # a peer that stopped reading gets no goodbye, and no wait
            self.sock.send(bye, socket.MSG_DONTWAIT)

    def _replay(self) -> None:
        """Send everything the peer lacks, per origin, from history: runs of stored entries.

        Each run ends at an entry whose signature we verified or made (``checked``), so
        we vouch only for what we checked; stored bytes go out as they are.
        """
        ours = self.manager.router.cursors()
        with self._cond:
            todo = linkproto.missing(ours, self._peer_has)
        for origin, start in todo.items():
            sent = start
            while sent < ours[origin] and not self._closing and origin not in self._stuck:
                rows = self.manager.history.entries_after(origin, sent, linkproto.MAX_BATCH)
                if not rows:
                    break
                runs, rest = cut_runs(rows, linkproto.MAX_BATCH, can_end=_checked)
                if not runs:
                    if len(rest) >= linkproto.MAX_BATCH:
                        self._stuck.add(origin)
                        log.warning("%r: %s's entries after #%d cannot be cut into runs we "
                                    "checked (its signatures are broken); not serving them",
                                    self, origin, sent)
                    break
                out = []
                if rows[0].seq > sent + 1:  # retention pruned what it lacks
                    out.append(linkproto.encode_floor(origin, rows[0].seq - 1))
                out.extend(self._encode_run(origin, r) for r in runs)
                self.sock.sendall(b"".join(out))
                sent = runs[-1][-1].seq
                with self._cond:
                    self._peer_has[origin] = max(self._peer_has.get(origin, 0), sent)

    def _encode_run(self, origin: str, run: Sequence[StoredEntry] | Sequence[Entry]) -> bytes:
        """One ``msgs`` frame; the origin's key goes with its first run on this link."""
        key = None
        if origin not in self._keyed:
            self._keyed.add(origin)
            raw = self.manager.history.feed_key(origin)
            key = PublicKey(raw) if raw is not None else None
        return linkproto.encode_run(run, key)

    def _send_live(self, events: list[Event]) -> None:
        """Send one or more commits' messages as runs, per origin, in order.

        A commit of an origin always ends at an entry we checked (our own batches end
        signed; a peer's run ends at the signature we verified), so it is cut into runs
        at once; whatever does not continue what the peer has comes from history.
        """
        groups: dict[str, list[Entry]] = {}
        checked: set[str] = set()  # ids of the entries we may end a run at
        for event in events:
            entry = event.entry
            if entry is not None:  # unsigned (old, or a router without a key): never
                groups.setdefault(entry.origin, []).append(entry)
                if event.checked:
                    checked.add(entry.message.id)
        out: list[bytes] = []
        replay = False
        for origin, group in groups.items():
            with self._cond:
                have = self._peer_has.get(origin, 0)
            todo = [e for e in group if e.seq > have]
            if not todo:
                continue
            if todo[0].seq != have + 1 or origin in self._stuck:
                replay = True  # it missed some of this origin: history has them
                continue
            runs, rest = cut_runs(todo, linkproto.MAX_BATCH,
                                  can_end=lambda e: e.message.id in checked)
            if rest:
                replay = True  # held back until what vouches for it is stored too
            if not runs:
                continue
            out.extend(self._encode_run(origin, r) for r in runs)
            with self._cond:
                self._peer_has[origin] = max(self._peer_has.get(origin, 0), runs[-1][-1].seq)
        if out:
            self.sock.sendall(b"".join(out))
        if replay:
            self._replay()

    # -- ending ----------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """End the link from our side; never blocks.  Idempotent.

        The sender says bye between two frames (only the sender writes, so a
        bye never lands inside another frame) if the peer's window takes it at
        once, and shuts the socket down, which ends the reader.  A sender stuck
        on a peer that stopped reading is ended by :meth:`abort`; :attr:`done`
        is set once the link is over.
        """
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._bye = linkproto.encode_bye(reason)
            self._cond.notify()

    def abort(self, reason: str) -> None:
        """End the link at once, without a goodbye; never blocks."""
        log.info("%r: aborting the link: %s", self, reason)
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._shut()

    def _shut(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _finish(self, reason: str) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._shut()
        if self._sender.is_alive():
            self._sender.join()
        self.sock.close()
        self.manager._unregister(self, reason)
        self.done.set()


def _wait_run(future: Future[RunResult]) -> RunResult:
    """The router's answer to a run (LinkRouter.submit_run), as the router's own hand-offs
    wait: RouterTimeout after ROUTER_HANDOFF_TIMEOUT_S (then the link ends)."""
    try:
        return future.result(ROUTER_HANDOFF_TIMEOUT_S)
    except TimeoutError:
        if future.done():
            raise
        raise RouterTimeout(f"the router did not answer within "
                            f"{ROUTER_HANDOFF_TIMEOUT_S:g} s") from None


def _checked(row: StoredEntry) -> bool:
    return row.checked


@dataclass
class _Peer:
    """What ``lanchat peers`` shows about one other daemon."""

    node: str | None
    name: str
    address: str
    port: int
    state: str = "down"
    last_seen: float | None = None
    static: bool = False
    #: The name its key is pinned under (``peer:HOST:PORT``, ``mdns:NAME``), if any.
    pin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "name": self.name, "address": self.address,
                "port": self.port, "state": self.state, "last_seen": self.last_seen,
                "static": self.static}


def static_pin(host: str, port: int) -> str | None:
    """The pin name of the static peer ``host:port`` (``peer:HOST:PORT``); None if it
    cannot be one (then only a node id, once learnt, is checked)."""
    try:
        return check_name("peer:" + hub_name(host, port))
    except ValidationError:
        return None


def mdns_pin(name: str) -> str:
    """The pin name of a daemon discovery knows as ``name``: ``mdns:`` and the name,
    percent-encoded (a name too long for a pin is named by its hash)."""
    quoted = "mdns:" + urllib.parse.quote(name, safe="")
    try:
        return check_name(quoted)
    except ValidationError:
        return "mdns:sha256-" + hashlib.sha256(name.encode()).hexdigest()[:40]


class PinHeld(LanchatError):
    """A pinned name presented another key: held until ``lanchat trust NODE``."""

    code = "key-changed"


class _Dialer:
    """Keeps dialing one address until told to stop: connect, handshake, run, back off."""

    def __init__(self, manager: LinkManager, hosts: Sequence[str], port: int,
                 node: str | None, pin: str | None = None) -> None:
        self.manager = manager
        #: The name the peer's key is pinned under, and the node id its TLS certificate
        #: must name (mDNS TXT ``id``; ours for a twin): what the acceptor is checked by.
        self.pin = pin
        self.expect = node
        #: Every address the peer advertised (a dual-homed host has several, and
        #: only some are reachable from here); the one that worked last goes first.
        self.hosts = list(hosts)
        self.host = self.hosts[0]
        self.port = port
        self.node = node
        self.stop = threading.Event()
        #: Set to end a backoff early: ``lanchat trust`` accepted its key, or stopping.
        self.kick = threading.Event()
        self.link: Link | None = None
        self.thread = threading.Thread(target=self._run, name=f"link-dial-{self.host}:{port}",
                                       daemon=False)

    def _run(self) -> None:
        backoff = linkproto.BACKOFF_FIRST_S
        while not self.stop.is_set():
            started = time.monotonic()
            if self.node is not None and self.manager.linked(self.node):
                # Already linked the other way round: nothing to dial until that ends.
                self.stop.wait(linkproto.HEARTBEAT_S)
                continue
            try:
                self._dial_once()
            except (OSError, RemoteProtocolError, ValidationError, LinkClosed) as exc:
                log.debug("link to %s:%d: %s", self.host, self.port, exc)
            except LanchatError as exc:  # the router timed out or closed: try again later
                log.warning("link to %s:%d: %s", self.host, self.port, exc)
            except Exception:  # a bug must not end the dialing of a peer for good
                log.exception("link to %s:%d failed unexpectedly; dialing it again later",
                              self.host, self.port)
            if self.stop.is_set():
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = linkproto.BACKOFF_FIRST_S
            if self.kick.wait(backoff * random.uniform(0.8, 1.2)):
                self.kick.clear()
                backoff = linkproto.BACKOFF_FIRST_S
                continue
            backoff = min(backoff * 2, linkproto.BACKOFF_MAX_S)

    def _dial_once(self) -> None:
        manager = self.manager
        self.manager._set_state(self, "connecting")
        sock = self._connect()
        nonce = manager.new_nonce()
        where = f"{self.host}:{self.port}"
        conn: socket.socket | tlsid.TlsSocket = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(linkproto.encode_hello(manager.hello(nonce=nonce)))
            decoder = LineDecoder(linkproto.MAX_LINK_FRAME)
            answer, _ = self._await_frame(sock, decoder, clear=True)
            if (isinstance(answer, linkproto.Welcome)
                    and answer.peer.version <= linkproto.PLAIN_VERSION):
                manager.refuse_old_acceptor(sock, answer.peer, where)  # always raises
            if not isinstance(answer, linkproto.StartTls) or decoder.pending:
                raise RemoteProtocolError("expected starttls", code="bad-frame")
            conn = tlsid.tls_handshake(sock, manager.tls_client, server_side=False)
            key = manager.check_acceptor(conn, self.expect, self.pin, where)
            frame, pending = self._await_frame(conn, decoder, clear=False)
            if not isinstance(frame, linkproto.Welcome):
                raise RemoteProtocolError("expected a welcome", code="bad-frame")
            welcome = frame.peer
            if welcome.key != key:
                manager.refuse_mismatch(conn, f"the welcome names node {welcome.node}, not "
                                        f"the node of its TLS certificate ({key.node})",
                                        "wrong-key", where)
            manager.prove_dialer(conn, nonce, welcome, where)
        except BaseException as exc:
            conn.close()
            sock.close()
            if isinstance(exc, LinkClosed) and exc.code == "same-node":
                self.stop.set()  # we dialed ourselves (our own advertisement, a loop): never again
            state = "down"
            if isinstance(exc, SameIdentity):
                state = "same-identity"
            elif isinstance(exc, PinHeld):
                state = "key changed"
            self.manager._set_state(self, state)
            raise
        finally:
            manager.drop_nonce(nonce)
        assert isinstance(conn, tlsid.TlsSocket)
        self.node = welcome.node
        link = Link(manager, conn, decoder, welcome, address=(self.host, self.port),
                    dialer=manager.me.node, pending=pending)
        link.key = key
        try:
            registered = manager._register(link, self)
        except BaseException:
            conn.close()
            raise
        if not registered:
            with contextlib.suppress(OSError):
                conn.sendall(linkproto.encode_bye("duplicate link"))
            conn.close()
            self.manager._set_state(self, "linked" if manager.linked(welcome.node) else "down")
            return
        self.link = link
        try:
            link.run()
        finally:
            self.link = None

    def _connect(self) -> socket.socket:
        """Connect to the first of the peer's addresses that answers."""
        error: OSError | None = None
        for host in list(self.hosts):
            try:
                sock = socket.create_connection((host, self.port), timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                error = exc
                continue
            self.host = host
            if host in self.hosts:
                self.hosts.remove(host)
            self.hosts.insert(0, host)
            return sock
        assert error is not None
        raise error

    def _await_frame(self, conn: socket.socket | tlsid.TlsSocket, decoder: LineDecoder, *,
                     clear: bool) -> tuple[linkproto.Frame, list[bytes]]:
        """The other side's next frame, and the frames that arrived right behind it.

        ``clear``: before TLS, where the hub's text greeting comes first (skipped).  A
        ``refused`` frame raises :class:`LinkClosed` with its message.
        """
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            conn.settimeout(max(0.05, deadline - time.monotonic()))
            # Before TLS, no more than is there: the TLS records behind it are not ours.
            data = conn.recv(65536)
            if not data:
                raise LinkClosed("closed before welcome")
            lines = decoder.feed(data)
            for i, line in enumerate(lines):
                if clear and not line.lstrip().startswith(b"{"):
                    continue  # the hub's text greeting
                frame = linkproto.parse_frame(line)
                if isinstance(frame, linkproto.Refused):
                    if frame.code == "same-node":
                        self.stop.set()
                    self.manager.log_refused(frame, f"{self.host}:{self.port}")
                    raise LinkClosed(f"refused: {neutralise(frame.message)}")
                return frame, lines[i + 1:]

    def close(self) -> None:
        self.stop.set()
        self.kick.set()
        link = self.link
        if link is not None:
            link.close("shutting down")


class LinkManager:
    """All links of this daemon; the hub's :class:`~lanchat.hub.LinkAcceptor`.

    ``static_peers`` are dialed for as long as the daemon runs.  Peers found by
    discovery are dialed only by the lower node id of the pair (the tie-break),
    and dropped when discovery loses them.  Thread-safety: every method may be
    called from any thread; ``_lock`` guards the tables, never held during I/O.
    """

    def __init__(self, router: LinkRouter, history: History, me: Identity,
                 static_peers: Sequence[tuple[str, int]] = (), *,
                 key: bytes | None = None, pins: PeerPins | None = None,
                 pins_path: str | None = None, scratch_dir: str | None = None,
                 tls_server: ssl.SSLContext | None = None) -> None:
        self.router = router
        #: TLS: ours presents our node key's certificate; theirs is checked by us.
        #: ``tls_server``: a tlsid.server_context for ``me.key`` already built (the
        #: daemon's, shared with the hub: one certificate made and loaded at start-up).
        self.tls_server: ssl.SSLContext = (
            tls_server if tls_server is not None
            else tlsid.server_context(me.key, scratch_dir=scratch_dir))
        self.tls_client: ssl.SSLContext = tlsid.client_context()
        #: Pinned peers (``known_peers``, saved to ``pins_path`` when it changes).
        self.pins = pins if pins is not None else PeerPins(Pins())
        self.pins_path = pins_path
        self._pins_lock = threading.Lock()  # guards: pins, and the file's writes
        #: The shared secret: links must prove it (admission only).
        self.key = key
        self.history = history
        self.me = me
        self._lock = threading.Lock()  # guards: _links, _dialers, _peers, _closed, _nonces,
        #                                 _said, _own_signed
        self._nonces: set[str] = set()  # ours, of handshakes in progress
        self._said: set[tuple[str, str]] = set()  # warnings given once per peer
        self._own_signed: NodeRoster | None = None  # our roster as last signed
        self._links: dict[str, Link] = {}
        self._dialers: dict[str, _Dialer] = {}  # key: node id, or "host:port" if unknown
        self._peers: dict[str, _Peer] = {}  # key: node id, or "host:port" before we know it
        self._closed = False
        self._static = list(static_peers)

    def start(self) -> None:
        for host, port in self._static:
            self._dial([host], port, None, static=True)

    def set_static_peers(self, peers: Sequence[tuple[str, int]]) -> None:
        """A reload changed ``peers``: dial the new ones, stop dialing the removed ones."""
        with self._lock:
            removed = [p for p in self._static if p not in peers]
            added = [p for p in peers if p not in self._static]
            self._static = list(peers)
            stopping = [self._dialers.pop(f"{h}:{port}") for h, port in removed
                        if f"{h}:{port}" in self._dialers]
            for h, port in removed:
                self._peers.pop(f"{h}:{port}", None)
        for dialer in stopping:
            dialer.close()
        for host, port in added:
            self._dial([host], port, None, static=True)

    def hello(self, *, nonce: str, proof: str | None = None,
              admit: str | None = None) -> linkproto.PeerHello:
        return linkproto.PeerHello(node=self.me.node, name=self.me.name, host=self.me.host,
                                   port=self.me.port, nonce=nonce, proof=proof,
                                   key=self.me.key.public, admit=admit)

    # -- discovery's callbacks ---------------------------------------------------------

    def peer_found(self, node: str, name: str, addresses: Sequence[str], port: int) -> None:
        """Discovery saw a daemon.  Dial it if we are the lower node id and not linked."""
        if node == self.me.node or not addresses:
            return
        with self._lock:
            peer = self._peers.get(node)
            if peer is None:
                peer = self._peers[node] = _Peer(node, name, addresses[0], port,
                                                 state="discovered")
            else:
                peer.name, peer.address, peer.port = name, addresses[0], port
            peer.pin = mdns_pin(name)
        if self.me.node < node:
            self._dial(list(addresses), port, node, pin=peer.pin)

    def twin_found(self, addresses: Sequence[str], port: int) -> None:
        """Discovery saw our own node id advertised by another daemon: dial it, so that
        the handshake shows whether it holds our key (:meth:`same_identity`)."""
        if addresses:
            self._dial(list(addresses), port, self.me.node, twin=True)

    def peer_lost(self, node: str) -> None:
        """Discovery saw a daemon leave (goodbye): stop dialing it."""
        with self._lock:
            dialer = self._dialers.get(node)
            if dialer is not None:
                del self._dialers[node]
        if dialer is not None:
            dialer.stop.set()
            dialer.kick.set()

    def _dial(self, hosts: list[str], port: int, node: str | None, *,
              static: bool = False, pin: str | None = None, twin: bool = False) -> None:
        key = f"{hosts[0]}:{port}" if node is None or twin else node
        if static:
            pin = static_pin(hosts[0], port)
        with self._lock:
            if self._closed:
                return
            existing = self._dialers.get(key)
            if existing is not None:
                existing.hosts = list(dict.fromkeys([*existing.hosts, *hosts]))
                return
            if node is not None and node in self._links:
                return
            dialer = _Dialer(self, hosts, port, node, pin)
            self._dialers[key] = dialer
            if key not in self._peers and not twin:
                self._peers[key] = _Peer(node, f"{hosts[0]}:{port}", hosts[0], port,
                                         static=static, pin=pin)
        dialer.thread.start()

    # -- the hub's LinkAcceptor ----------------------------------------------------------

    def accept_link(self, sock: socket.socket, address: tuple[Any, ...], hello: Hello,
                    decoder: LineDecoder, pending: Sequence[bytes] = (), *,
                    admit: Callable[[], bool] | None = None) -> None:
        """A daemon dialed us: starttls, TLS, handshake, then run the link on this thread.

        The whole handshake -- TLS, then the dialer's proofs of its key and of the
        shared secret -- has LINK_HANDSHAKE_TIMEOUT_S.  Only then does ``admit()``
        (the hub's count of links) take a link slot for it; False refuses the link.
        """
        deadline = time.monotonic() + LINK_HANDSHAKE_TIMEOUT_S
        sock.settimeout(LINK_HANDSHAKE_TIMEOUT_S)  # also bounds our answers' sendall
        try:
            peer = linkproto.parse_peer_hello(hello.fields)
        except RemoteProtocolError as exc:
            log.log(logging.WARNING if self._first_time("bad-hello", str(address[0]))
                    else logging.DEBUG, "refused a link from %s: %s", address[0], exc)
            sock.sendall(linkproto.encode_error(exc.code, str(exc)))
            return
        if peer.version <= linkproto.OLD_VERSION:
            self._refuse_v1_dialer(sock, address, peer)
            return
        if peer.version <= linkproto.PLAIN_VERSION:
            self._refuse_plain_dialer(sock, address, peer)
            return
        if peer.node == self.me.node and self.is_our_nonce(peer.nonce):
            sock.sendall(linkproto.encode_error("same-node", "you dialed yourself"))
            return
        if peer.node != self.me.node and self.linked(peer.node):
            sock.sendall(linkproto.encode_error("duplicate-link", "already linked to you"))
            return
        if pending or decoder.pending:
            # The dialer must wait for starttls: bytes behind its hello are not TLS's.
            log.info("refused a link from %s: it sent more before TLS started", address[0])
            sock.sendall(linkproto.encode_error("bad-frame", "wait for starttls"))
            return
        sock.sendall(linkproto.encode_starttls())
        try:
            conn = tlsid.tls_handshake(sock, self.tls_server, server_side=True,
                                       timeout=max(0.01, deadline - time.monotonic()))
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log.info("link from %s (%s, node %s): no TLS: %s", address[0],
                     neutralise(peer.name), peer.node, exc)
            return
        assert peer.key is not None and peer.nonce is not None
        nonce = self.new_nonce()
        rest: list[bytes] = []
        try:
            data = handshake.transcript(handshake.Side(peer.node, peer.key, peer.nonce),
                                        self.side(nonce))
            conn.sendall(linkproto.encode_welcome(self.hello(
                nonce=nonce, proof=handshake.prove(self.me.key, handshake.ACCEPTOR, data),
                admit=(handshake.admit(self.key, handshake.ACCEPTOR, data)
                       if self.key is not None else None))))
            failure = self._check_auth(conn, decoder, rest, peer, data, deadline=deadline)
        finally:
            self.drop_nonce(nonce)
        if failure is None and peer.node != self.me.node:
            failure = self._check_pin(self._pin_of(address, peer), peer.key)
        if failure is not None:
            who = f"{address[0]} ({neutralise(peer.name)}, node {peer.node})"
            log.log(logging.WARNING if self._first_time("refused", f"{who} {failure}")
                    else logging.DEBUG, "refused a link from %s: %s", who, failure)
            with contextlib.suppress(OSError):
                conn.sendall(linkproto.encode_error("auth-failed", failure))
            return
        if peer.node == self.me.node:
            self.same_identity(str(address[0]), peer.port, peer.name, None)
            with contextlib.suppress(OSError):
                conn.sendall(linkproto.encode_error(
                    "same-identity", "you hold this node's key: two daemons with one identity"))
            return
        if admit is not None and not admit():
            log.warning("refused a link from %s (%s): every link slot is taken (limit %d)",
                        address[0], peer.node, MAX_DAEMON_LINKS)
            with contextlib.suppress(OSError):
                conn.sendall(linkproto.encode_error(
                    "too-many-links", f"too many daemon links (limit {MAX_DAEMON_LINKS})"))
            return
        link = Link(self, conn, decoder, peer, address=address, dialer=peer.node,
                    pending=rest)
        try:
            registered = self._register(link, None)
        except LinkClosed as exc:
            with contextlib.suppress(OSError):
                conn.sendall(linkproto.encode_error("unavailable", str(exc)))
            return
        if not registered:
            conn.sendall(linkproto.encode_error("duplicate-link", "already linked to you"))
            return
        link.run()

    def _check_auth(self, conn: tlsid.TlsSocket, decoder: LineDecoder, rest: list[bytes],
                    peer: linkproto.PeerHello, data: bytes, *, deadline: float) -> str | None:
        """Read the dialer's first frame inside TLS: a valid ``auth``?

        It must sign the transcript ``data`` with the dialer's key and, when
        either side has a shared secret, prove the same secret.  Returns None if
        so, else why not.  Gives up at ``deadline`` (monotonic), however the
        bytes trickle in.  Frames after it go to ``rest``.  Reads at most
        AUTH_READ_BYTES at a time, so what follows the auth frame in the
        decoder stays below the hub's frame limit, which holds until the link
        takes over (before the dialer's proof, its frames are a stranger's).
        """
        what = "its key" if self.key is None else "the shared secret"
        try:
            while not rest:
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"no proof of {what} within {LINK_HANDSHAKE_TIMEOUT_S:g} s"
                conn.settimeout(left)
                chunk = conn.recv(AUTH_READ_BYTES)
                if not chunk:
                    return "closed before proving who it is"
                rest.extend(decoder.feed(chunk))
            frame = linkproto.parse_frame(rest.pop(0))
        except TimeoutError:
            return f"no proof of {what} within {LINK_HANDSHAKE_TIMEOUT_S:g} s"
        except OSError as exc:
            return f"connection lost during the handshake: {exc.strerror or exc}"
        except (RemoteProtocolError, ValidationError) as exc:
            return f"a bad frame instead of a proof: {exc}"
        if isinstance(frame, linkproto.Refused):
            return f"it refused us: {neutralise(frame.message)}"
        if not isinstance(frame, linkproto.Auth):
            return "no proof: another frame came first"
        assert peer.key is not None
        if not handshake.check(peer.key, frame.proof, handshake.DIALER, data):
            return f"it could not prove it holds the key of node {peer.node}"
        if peer.node == self.me.node:
            return None  # our own key: a twin, whatever its secret (the caller says so)
        return handshake.admission_problem(self.key, frame.admit, handshake.DIALER, data)

    # -- the acceptor's key, pins ----------------------------------------------------------

    def check_acceptor(self, conn: tlsid.TlsSocket, expect: str | None, pin: str | None,
                       where: str) -> PublicKey:
        """The dialer's check of the acceptor's TLS key, before anything is sent or read.

        ``expect``: the node id it must be (mDNS TXT ``id``; ours for a twin); ``pin``:
        the name its key is pinned under.  Returns the key; raises :class:`LinkClosed`
        (:class:`PinHeld` for a changed pinned key) after one log line and an ``error``
        frame that tells the acceptor why.
        """
        try:
            key = (tlsid.expect_node(conn, expect, where=where) if expect is not None
                   else tlsid.peer_key(_der(conn)))
        except (tlsid.PeerKeyMismatch, tlsid.BadPeerCertificate) as exc:
            self.refuse_mismatch(conn, str(exc), exc.code, where)
        failure = self._check_pin(pin, key)
        if failure is not None:
            self.refuse_mismatch(conn, failure, "key-changed", where)
        return key

    def refuse_mismatch(self, conn: tlsid.TlsSocket, why: str, code: str, where: str) -> NoReturn:
        """Refuse the acceptor at ``where``: log ``why`` (once per peer), tell it, raise."""
        log.log(logging.WARNING if self._first_time(code, f"{where} {why}") else logging.DEBUG,
                "link to %s refused: %s", where, why)
        with contextlib.suppress(OSError):
            conn.sendall(linkproto.encode_error(code, f"{self.me.name} (node {self.me.node}) "
                                                f"refused this link: {why}"))
        if code == "key-changed":
            raise PinHeld(why)
        raise LinkClosed(why)

    def log_refused(self, frame: linkproto.Refused, where: str) -> None:
        """The acceptor refused our link: why goes to our log (once as a warning)."""
        if frame.code in ("same-node", "duplicate-link", "unavailable"):
            return  # nothing wrong: the dialer's own debug line says it
        log.log(logging.WARNING if self._first_time(frame.code, where) else logging.DEBUG,
                "link to %s refused by the other side: %s", where, neutralise(frame.message))

    def _pin_of(self, address: tuple[Any, ...], peer: linkproto.PeerHello) -> str | None:
        """The pin name a daemon that dialed us goes by: the mDNS name discovery gave its
        node, else the static peer at its address and advertised port, else none."""
        with self._lock:
            known = self._peers.get(peer.node)
            if known is not None and known.pin is not None and not known.static:
                return known.pin
            static = peer.port is not None and (str(address[0]), peer.port) in self._static
        return static_pin(str(address[0]), peer.port) if static and peer.port else None

    def _check_pin(self, pin: str | None, key: PublicKey) -> str | None:
        """Under the trust policy: None if ``key`` may link as ``pin``, else why not.

        Logs a new pin and an accepted change; saves the pins when they changed.
        """
        if pin is None:
            return None
        with self._pins_lock:
            decision = self.pins.see(pin, key)
            if decision.save and self.pins_path is not None:
                try:
                    pinfile.save(self.pins_path, self.pins.pins, PEERS_HEADER)
                except (OSError, LanchatError) as exc:
                    log.warning("could not save %s: %s", self.pins_path, exc)
        if decision.link:
            level = logging.INFO if decision.verdict is PeerVerdict.NEW else logging.WARNING
            # Only when it is shown: the line holds a fingerprint (~7 ms of hashing), and
            # a new daemon meeting its first peer would pay it before the catch-up.
            if log.isEnabledFor(level):
                line = decision.log_line()
                if line is not None:
                    log.log(level, "%s", line)
            return None
        line = decision.log_line()
        assert line is not None
        return line

    def trust(self, node: str) -> list[str]:
        """``lanchat trust NODE``: accept node ``node``'s changed key wherever it is held.

        Returns the pin names accepted (empty: nothing waits for that node).  Saves the
        pins and lets the held dialers try again at once.
        """
        with self._pins_lock:
            names = self.pins.trust(node)
            key = self.pins.pins.get(names[0]) if names else None
            if names and self.pins_path is not None:
                pinfile.save(self.pins_path, self.pins.pins, PEERS_HEADER)
        if names:
            log.warning("trusted node %s (fingerprint %s) for %s, as asked", node,
                        self.fingerprint_of(key), ", ".join(names))
            with self._lock:
                dialers = [d for d in self._dialers.values() if d.pin in names]
                self._said = {s for s in self._said if s[0] != "key-changed"}
            for d in dialers:
                d.kick.set()
        return names

    def held(self) -> dict[str, tuple[PublicKey, PublicKey]]:
        with self._pins_lock:
            return self.pins.held()

    def fingerprint_of(self, key: PublicKey | None) -> str | None:
        """``key``'s fingerprint (:func:`lanchat.feed.fingerprint`, which remembers it)."""
        return None if key is None else fingerprint(key)

    # -- older daemons ---------------------------------------------------------------------

    def refuse_old_acceptor(self, sock: socket.socket, welcome: linkproto.PeerHello,
                            where: str) -> NoReturn:
        """The acceptor answered our hello with a welcome in clear: a v1 or v2 daemon.

        Tell it in the frame its version logs at warning level, log it, raise LinkClosed.
        """
        if welcome.version <= linkproto.OLD_VERSION:
            with contextlib.suppress(OSError):
                sock.sendall(linkproto.encode_v1_refusal())
            self._say_v1(welcome.node, f"link to {where} refused: {neutralise(welcome.name)} "
                         f"(node {welcome.node}) speaks link protocol v1 (an older lanchat) "
                         "and cannot prove its identity; upgrade lanchat there")
            raise LinkClosed("the peer speaks link protocol v1")
        with contextlib.suppress(OSError):
            sock.sendall(linkproto.encode_v2_refusal())
        self._say_v1(welcome.node, f"link to {where} refused: {neutralise(welcome.name)} "
                     f"(node {welcome.node}) speaks link protocol v2 (an older lanchat), "
                     "which links without TLS; upgrade lanchat there")
        raise LinkClosed("the peer speaks link protocol v2")

    def _refuse_plain_dialer(self, sock: socket.socket, address: tuple[Any, ...],
                             peer: linkproto.PeerHello) -> None:
        """A v2 daemon (no TLS) dialed us: refuse it so that both logs say why.

        A v2 dialer logs a refused handshake at debug level only, but a bad frame on
        an established link at warning level, type included: so it gets a welcome
        it can check (our proof over its transcript: nothing it could not get by
        asking) and then :func:`linkproto.encode_v2_refusal`, and the connection
        closes.  It holds no link slot and reaches no router here.
        """
        self._say_v1(peer.node, f"refused a link from {address[0]} ({neutralise(peer.name)}, "
                     f"node {peer.node}): it speaks link protocol v2 (an older lanchat), "
                     "which links without TLS; upgrade lanchat there")
        assert peer.key is not None and peer.nonce is not None
        nonce = secrets.token_hex(handshake.NONCE_BYTES)
        data = handshake.transcript(handshake.Side(peer.node, peer.key, peer.nonce),
                                    self.side(nonce))
        old = linkproto.PeerHello(
            node=self.me.node, name=self.me.name, host=self.me.host, port=self.me.port,
            version=linkproto.PLAIN_VERSION, nonce=nonce, key=self.me.key.public,
            proof=handshake.prove(self.me.key, handshake.ACCEPTOR, data),
            admit=(handshake.admit(self.key, handshake.ACCEPTOR, data)
                   if self.key is not None else None))
        with contextlib.suppress(OSError):
            sock.sendall(linkproto.encode_welcome(old) + linkproto.encode_v2_refusal())

    def prove_dialer(self, sock: tlsid.TlsSocket, nonce: str, welcome: linkproto.PeerHello,
                     where: str) -> None:
        """The dialer's half, once the welcome is in (inside TLS): check it, answer ``auth``.

        Raises :class:`LinkClosed` (``same-node`` if we dialed ourselves) or
        :class:`SameIdentity` when the link must not go on; logs why, once.
        """
        if welcome.version <= linkproto.PLAIN_VERSION:
            raise RemoteProtocolError("a welcome of an older version inside TLS",
                                      code="bad-frame")
        assert welcome.key is not None and welcome.nonce is not None
        data = handshake.transcript(self.side(nonce),
                                    handshake.Side(welcome.node, welcome.key, welcome.nonce))
        if not handshake.check(welcome.key, welcome.proof, handshake.ACCEPTOR, data):
            log.warning("link to %s refused: it could not prove it holds the key of node %s",
                        where, welcome.node)
            raise LinkClosed("the peer could not prove its key")
        # Checked only once signed: a peer echoing our node id and nonce back must not
        # stop this dialer for good.  (Our own hub answers our hello with same-node.)
        if welcome.node == self.me.node and self.is_our_nonce(welcome.nonce):
            raise LinkClosed("that address is this daemon", code="same-node")
        # Answer even if we go no further: the other side then sees the same problem
        # (the secrets differ, or its twin) and says so in its own log.
        sock.sendall(linkproto.encode_auth(
            handshake.prove(self.me.key, handshake.DIALER, data),
            handshake.admit(self.key, handshake.DIALER, data) if self.key is not None else None))
        if welcome.node == self.me.node:
            host, _, port = where.rpartition(":")
            self.same_identity(host, int(port), welcome.name, where)
            raise SameIdentity(f"{where} holds this node's key")
        problem = handshake.admission_problem(self.key, welcome.admit, handshake.ACCEPTOR,
                                              data)
        if problem is not None:
            log.warning("link to %s (%s, node %s) refused: %s", where,
                        neutralise(welcome.name), welcome.node, problem)
            raise LinkClosed(problem)

    def _refuse_v1_dialer(self, sock: socket.socket, address: tuple[Any, ...],
                          peer: linkproto.PeerHello) -> None:
        """A v1 daemon dialed us: refuse it so that both logs say why.

        A v1 dialer logs a refused handshake at debug level only; it logs an unknown
        frame on an established link at warning level.  So it gets a v1 welcome
        (with its old shared-secret proof, if it asked for one and we know the
        secret), then :func:`linkproto.encode_v1_refusal`, and the connection closes.
        It holds no link slot and reaches no router here.
        """
        self._say_v1(peer.node, f"refused a link from {address[0]} ({neutralise(peer.name)}, "
                     f"node {peer.node}): it speaks link protocol v1 (an older lanchat) and "
                     "cannot prove its identity; upgrade lanchat there")
        proof = None
        if self.key is not None and peer.nonce is not None:
            proof = auth.proof(self.key, "link-welcome", peer.nonce, self.me.node, peer.node)
        old = linkproto.PeerHello(
            node=self.me.node, name=self.me.name, host=self.me.host, port=self.me.port,
            version=linkproto.OLD_VERSION,
            nonce=secrets.token_hex(auth.NONCE_BYTES) if proof else None, proof=proof)
        with contextlib.suppress(OSError):
            sock.sendall(linkproto.encode_welcome(old) + linkproto.encode_v1_refusal())

    def _say_v1(self, node: str, line: str) -> None:
        """Log a v1 refusal: at warning level the first time for ``node``, then debug."""
        log.log(logging.WARNING if self._first_time("v1", node) else logging.DEBUG, "%s", line)

    def _first_time(self, kind: str, who: str) -> bool:
        """True the first time (``kind``, ``who``) is asked about; at most 1,024 remembered."""
        with self._lock:
            if (kind, who) in self._said:
                return False
            if len(self._said) < 1024:
                self._said.add((kind, who))
            return True

    def same_identity(self, host: str, port: int | None, name: str,
                      dialed: str | None) -> None:
        """Another daemon proved it holds our key: say so loudly, show it in ``peers``.

        ``dialed``: the ``host:port`` key of our dialer's peer entry, if we dialed it.
        """
        where = f"{host}:{port}" if port else host
        log.log(logging.WARNING if self._first_time("twin", where) else logging.INFO,
                "another daemon, %s at %s, proved it holds this node's own key (node %s): "
                "two daemons are running with one identity (a copied state directory?). "
                "Not linking to it; stop one of them, or move its node.key away to give it "
                "an identity of its own", neutralise(name), where, self.me.node)
        with self._lock:
            key = dialed or f"same-identity:{where}"
            peer = self._peers.get(key)
            if peer is None:
                if len(self._peers) >= 4 * MAX_DAEMON_LINKS and dialed is None:
                    return
                peer = self._peers[key] = _Peer(None, name, host, port or 0)
            peer.node, peer.state, peer.last_seen = self.me.node, "same-identity", time.time()
            if dialed is None:
                peer.name = name

    def new_nonce(self) -> str:
        """A fresh handshake nonce, remembered until :meth:`drop_nonce` (to spot ourselves)."""
        nonce = secrets.token_hex(handshake.NONCE_BYTES)
        with self._lock:
            self._nonces.add(nonce)
        return nonce

    def drop_nonce(self, nonce: str) -> None:
        with self._lock:
            self._nonces.discard(nonce)

    def is_our_nonce(self, nonce: str | None) -> bool:
        """Is ``nonce`` one of our handshakes in progress?  Then a hello or welcome with
        our node id is our own, looped back -- else it is another process with our key."""
        with self._lock:
            return nonce in self._nonces

    def side(self, nonce: str) -> handshake.Side:
        return handshake.Side(self.me.node, self.me.key.public, nonce)

    def encode_roster(self, roster: NodeRoster) -> bytes:
        """A roster frame: others' as signed by them, ours signed here (cached per version)."""
        if roster.signed is None and not roster.gone:
            with self._lock:
                cached = self._own_signed
            if cached is None or cached != roster:
                cached = sign_roster(self.me.key, roster)
                with self._lock:
                    self._own_signed = cached
            roster = cached
        return linkproto.encode_roster(roster)

    # -- the table of links ----------------------------------------------------------------

    def linked(self, node: str) -> bool:
        with self._lock:
            return node in self._links

    def _register(self, link: Link, dialer: _Dialer | None) -> bool:
        """Make ``link`` the link to its node, unless a better one exists.  Attaches it.

        Returns False if a better link exists.  Raises :class:`LinkClosed` if
        the router could not attach it (it timed out, or is closing): the link
        is then forgotten again -- never left registered but not running, which
        would show the node "linked" for ever and refuse every redial.  The
        caller closes the socket.
        """
        loser: Link | None = None
        with self._lock:
            if self._closed:
                return False
            existing = self._links.get(link.node)
            if existing is not None:
                if not linkproto.keeps(existing.dialer, link.dialer):
                    return False
                loser = existing
            self._links[link.node] = link
            peer = self._peers.get(link.node)
            if peer is None and dialer is not None:
                peer = self._peers.pop(f"{dialer.host}:{dialer.port}", None)
            if peer is None:
                peer = _Peer(link.node, link.name, str(link.address[0]), link.port or 0)
            # A static peer we had not reached yet may be this very daemon, linked
            # the other way round: one entry, and its dialer now knows who it is.
            key = f"{link.address[0]}:{link.port}"
            twin = self._peers.get(key)
            if twin is not None and twin is not peer and twin.node is None:
                del self._peers[key]
                peer.static = peer.static or twin.static
                peer.address, peer.port = twin.address, twin.port
                waiting = self._dialers.get(key)
                if waiting is not None:
                    waiting.node = link.node
            peer.node, peer.name, peer.state = link.node, link.name, "linked"
            peer.last_seen = time.time()
            if dialer is not None:
                peer.address, peer.port = dialer.host, dialer.port
            self._peers[link.node] = peer
        if loser is not None:
            loser.close("replaced by a better link")
        try:
            self.router.attach_link(link)
        except LanchatError as exc:
            log.warning("could not attach the link to %s (%s): %s; closing it", link.name,
                        link.node, exc)
            # A late attach is undone by the detach queued behind it (the inbox is FIFO).
            self._unregister(link, f"could not attach it: {exc}")
            raise LinkClosed(f"could not attach the link: {exc}") from None
        log.info("linked to %s (%s) at %s", link.name, link.node, link.address[0])
        return True

    def _unregister(self, link: Link, reason: str) -> None:
        with self._lock:
            if self._links.get(link.node) is link:
                del self._links[link.node]
                peer = self._peers.get(link.node)
                if peer is not None:
                    peer.state = "down"
                    peer.last_seen = link.last_heard
        self.router.detach_link(link)  # also when replaced: it was attached until now
        log.info("link to %s (%s) closed: %s", link.name, link.node, reason)

    def _set_state(self, dialer: _Dialer, state: str) -> None:
        with self._lock:
            key = dialer.node or f"{dialer.host}:{dialer.port}"
            peer = self._peers.get(key)
            if peer is not None and peer.state != "linked":
                peer.state = state

    @property
    def link_count(self) -> int:
        """Daemon links up, those we dialled and those that came in."""
        with self._lock:
            return len(self._links)

    def peers(self) -> list[dict[str, Any]]:
        """Every daemon we know of; ``forked`` (the seq) on one found to have forked its feed.

        An origin that forked but is no peer of ours (its messages came relayed) is
        listed too, with state ``forked``: a user should see it either way.

        ``fingerprint``: of the key a linked peer proved, else of the key pinned for it.
        A peer whose pinned name presented another key is in state ``key changed``,
        with that key's ``node`` and ``fingerprint`` (what ``lanchat trust NODE`` takes)
        and the pinned one's as ``pinned_node`` and ``pinned_fingerprint``.
        """
        forked = self.router.forked()
        with self._pins_lock:
            held = self.pins.held()
            pinned = {peer.pin: self.pins.pins.get(peer.pin)
                      for peer in list(self._peers.values()) if peer.pin is not None}
        keyed: list[tuple[dict[str, Any], str, PublicKey | None]] = []
        with self._lock:
            out = []
            for peer in self._peers.values():
                link = self._links.get(peer.node) if peer.node else None
                if link is not None:
                    peer.last_seen = link.last_heard
                row = peer.to_dict()
                if peer.node in forked:
                    row["forked"] = forked[peer.node]
                key = (link.key if link is not None
                       else pinned.get(peer.pin) if peer.pin is not None else None)
                if peer.pin in held and link is None:
                    old, key = held[peer.pin]
                    row.update(state="key changed", node=key.node, pinned_node=old.node)
                    keyed.append((row, "pinned_fingerprint", old))
                keyed.append((row, "fingerprint", key))
                out.append(row)
            known = {p.node for p in self._peers.values()}
        for row, field, key in keyed:
            row[field] = self.fingerprint_of(key)
        out.extend({"node": node, "name": node[:16], "address": "", "port": 0,
                    "state": "forked", "last_seen": None, "static": False, "forked": seq}
                   for node, seq in forked.items() if node not in known)
        return sorted(out, key=lambda p: (p["name"], p["address"]))

    def close(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Say bye on every link, stop every dialer, join their threads.  Idempotent.

        Returns within ``timeout`` seconds whatever the peers do; a dialer still
        running then (a connect or a welcome that has not timed out yet) is
        logged and ends on its own within CONNECT_TIMEOUT_S.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dialers = list(self._dialers.values())
            links = list(self._links.values())
        deadline = time.monotonic() + timeout
        for d in dialers:
            d.close()
        for link in links:
            link.close("shutting down")
        # The goodbyes go out together; a peer that stopped reading is not waited for.
        grace = min(deadline, time.monotonic() + LINK_BYE_GRACE_S)
        for link in links:
            link.done.wait(max(0.0, grace - time.monotonic()))
        for link in links:
            if not link.done.is_set():
                link.abort("shutting down; the peer is not reading")
        for d in dialers:
            d.thread.join(max(0.0, deadline - time.monotonic()))
        late = [d.thread.name for d in dialers if d.thread.is_alive()]
        if late:
            log.warning("links: %d dialer(s) still busy after %g s: %s", len(late), timeout,
                        ", ".join(late))
