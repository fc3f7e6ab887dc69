"""The router: the one place that decides who gets a message.

Every message -- typed by a hub client (text, JSON or UDP), sent with
``lanchat send``, or arriving from another daemon -- goes through
:class:`Router`: it is stored (deduplicated by id), and only then fanned out to
every subscriber that should see it.  Presence (joins, leaves, nick changes)
goes the same way, unstored.

Thread model.  The router owns one thread, ``router``.  All changes arrive as
items on a bounded inbox; on the router thread, and only there, the router
writes to the store, changes the room table and the roster, and fans out.
Single ownership is what makes the guarantees cheap:

* every receiver sees messages in the same order (one thread enqueues them);
* ``subscribe`` takes its backlog snapshot and registers the subscriber in one
  step, so a subscriber misses nothing and sees nothing twice;
* a message is durable before anyone sees it, and before its sender is told it
  was accepted (the store commits, then the router fans out and acknowledges);
* consecutive publishes are committed in one transaction (group commit).

Fan-out never blocks: :meth:`Subscriber.deliver` only queues.  A subscriber
whose queue is full is dropped (and told so), never waited for.  Readers of
the roster (:meth:`users`) use an immutable snapshot and take no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from lanchat.errors import (
    ClosedError,
    LanchatError,
    NickInUse,
    NoSealKey,
    NoSuchUser,
    RouterTimeout,
    StoreError,
    ValidationError,
)
from lanchat.events import Batch, Event
from lanchat.feed import (
    Entry,
    FeedError,
    FeedHead,
    ForkProof,
    PublicKey,
    RunResult,
    SigningKey,
    verify_run,
)
from lanchat.limits import (
    BIG_ROOM_OVER,
    COMMIT_PACE_S,
    FUTURE_SKEW_S,
    MAX_COMMIT_BATCH,
    MAX_DH_RECORDS,
    MAX_HISTORY_PAGE,
    MAX_ORIGINS,
    MAX_ROUTER_QUEUE,
    MAX_RUN_ENTRIES,
    MAX_RUNS_PER_COMMIT,
    NEW_ORIGINS_BURST,
    NEW_ORIGINS_PER_S,
    PRESENCE_BATCH_S,
    PRESENCE_SUMMARY_OVER,
    ROUTER_HANDOFF_TIMEOUT_S,
)
from lanchat.model import (
    DEFAULT_ROOM,
    Draft,
    Message,
    Presence,
    User,
    validate_nick,
    validate_text,
)
from lanchat.presence import (
    Change,
    HeldNotices,
    NetworkRoster,
    NodeRoster,
    resolve_mailbox,
    resolve_recipient,
)
from lanchat.ratelimit import NewOrigins
from lanchat.relay import LinkMap, should_relay
from lanchat.seal import (
    DhKey,
    DhPublic,
    DhRecord,
    SealError,
    dm_context,
    open_sealed,
    parse_seal_text,
    peek,
    seal,
    seal_text,
)

log = logging.getLogger(__name__)

#: The ``ver`` of our X25519 key record (lanchat.seal): the key is derived from the
#: identity key with it, so it stays the same across restarts and a restored node.key.
DH_KEY_VER = 1

#: Seconds between two announcements of our users to the links (at most).
ROSTER_EVERY_S = 0.2


class Subscriber(Protocol):
    """Anything that receives routed events: a hub client, a ``tail``, a daemon link."""

    def deliver(self, events: Sequence[Event]) -> bool:
        """Queue ``events`` (in order) for sending; never block.

        The router hands over everything one commit produced for this
        subscriber in one call, so a busy hub pays one queue operation per
        receiver per batch rather than per message.  False means "my queue is
        full": the subscriber has already told its client and begun closing;
        the router unregisters it.
        """
        ...


class LinkPeer(Protocol):
    """A link to another daemon, as the router sees it (see :mod:`lanchat.links`).

    ``deliver`` (messages) never blocks and never fails: a link that falls
    behind catches up from history by itself.
    """

    node: str

    def deliver(self, events: Sequence[Event]) -> bool: ...
    def vouch(self, events: Sequence[Event]) -> None:
        """Messages the peer gets from their origin or sender (:mod:`lanchat.relay`), not
        from us: count them as held.  Never blocks."""
        ...
    def send_roster(self, roster: NodeRoster) -> None: ...
    def abort(self, reason: str) -> None:
        """End the link at once, never blocking (its ``deliver`` raised: a bug)."""
        ...


class MessageStore(Protocol):
    """What the router needs of the history store (see :mod:`lanchat.store`)."""

    def append_local(self, drafts: Sequence[Draft], *, ts: float,
                     key: SigningKey | None = None) -> list[Message]: ...
    def append_entries(self, drafts: Sequence[Draft], *, ts: float,
                       key: SigningKey) -> list[Entry]: ...
    def insert_run(self, run: Sequence[Entry], *, key: bytes, now: float | None = None,
                   floor: bool = False) -> list[Entry]: ...
    def batch(self) -> AbstractContextManager[None]: ...
    def heads(self) -> dict[str, FeedHead]: ...
    def hash_at(self, origin: str, seq: int) -> str | None: ...
    def entries(self, origin: str, first: int, last: int) -> list[Entry]: ...
    def mark_forked(self, origin: str, seq: int) -> None: ...
    def forked(self) -> dict[str, int]: ...
    def history(self, *, room: str | None = None, limit: int = 50,
                before: float | None = None, since: float | None = None,
                viewer: str | None = None) -> list[Message]: ...
    def prune(self, now: float, *, limit: int | None = None) -> int: ...
    def cursors(self) -> dict[str, int]: ...
    def sent_with_key(self, uid: int | None, key: str) -> Message | None: ...
    def forget_idle(self, limit: int) -> list[str]: ...


#: Called on the router thread once a publish is stored (message) or failed (error).
PublishDone = Callable[[Message | None, LanchatError | None], None]


@dataclass(eq=False, slots=True)
class _Member:
    """A user connected to this hub (router-thread state)."""

    sub: Subscriber
    nick: str
    host: str
    room: str
    via: str
    since: float


@dataclass(eq=False)
class _Publish:
    draft: Draft
    source: object | None
    done: PublishDone | None


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


@dataclass(eq=False)
class _Remote:
    run: Sequence[Entry]
    key: PublicKey
    floor: bool
    source: object | None
    future: Future[RunResult]


_STOP = object()

T = TypeVar("T")
_M = TypeVar("_M", Message, str)  # what _admitted filters: messages or origins


def _fork_proof(ours: Sequence[Entry], theirs: Sequence[Entry],
                key: PublicKey) -> ForkProof | None:
    """The proof between our stored entries and their verified run, or None.

    Ours are cut at the last signature that verifies (an origin may put a bad one on an
    inner entry), so the proof checks (:meth:`ForkProof.check`) wherever it is shown.
    """
    for end in range(len(ours) - 1, -1, -1):
        if ours[end].sig is None:
            continue
        try:
            mine = verify_run(ours[:end + 1], key)
        except FeedError:
            continue
        return ForkProof.between(mine, theirs)
    return None


def _nick_key(nick: str) -> str:
    """What ``_nicks`` is keyed by: the nick casefolded -- the nick itself when that is
    the same, so that most users' entries hold one string, not two."""
    key = nick.casefold()
    return nick if key == nick else key


def _wait(future: Future[T], timeout: float) -> T:
    """The result of a hand-off to the router; :class:`RouterTimeout` after ``timeout`` s."""
    try:
        return future.result(timeout)
    except TimeoutError:
        if future.done():  # what the router put there was a TimeoutError: pass it on
            raise
        raise RouterTimeout(f"the router did not answer within {timeout:g} s") from None


def _internal(exc: Exception) -> LanchatError:
    """``exc`` as what a hand-off's caller handles: a LanchatError (a bug is wrapped)."""
    if isinstance(exc, LanchatError):
        return exc
    return LanchatError(f"internal error: {exc!r}")


def _call_done(fn: PublishDone | None, msg: Message | None, err: LanchatError | None) -> None:
    """Tell a publisher how its message fared; a callback that raises is a bug, logged."""
    if fn is None:
        return
    try:
        fn(msg, err)
    except Exception:
        log.exception("router: a publisher's callback failed")


def _restore(d: dict[str, Any], key: str, value: object | None) -> None:
    """Put ``d[key]`` back to ``value`` (None: it was absent)."""
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value


def _log_store_failure(what: str, exc: Exception) -> None:
    """One line for a store that refused (disk full, read-only); a traceback for a bug."""
    if isinstance(exc, StoreError):
        log.error("cannot store %s: %s", what, exc)
    else:
        log.exception("router: storing %s failed", what)


def _both(a: PublishDone | None, b: PublishDone | None) -> PublishDone:
    """One publisher callback that answers two publishers (the same send, sent twice)."""
    def done(msg: Message | None, err: LanchatError | None) -> None:
        _call_done(a, msg, err)
        _call_done(b, msg, err)
    return done


class _Inbox:
    """A bounded FIFO whose consumer can take a run of publishes at once.

    guards: _items, _closed (one lock, two conditions)
    """

    def __init__(self, maxsize: int) -> None:
        self._items: deque[object] = deque()
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._gathering = threading.Condition(self._lock)  # publishes gather (see take)
        self._closed = False

    def put(self, item: object, timeout: float | None = None) -> None:
        self.put_many([item], timeout)

    def put_many(self, items: list[object], timeout: float | None = None) -> None:
        """Append ``items``, waiting while the inbox is full (back-pressure).

        Raises :class:`ClosedError` once closed, and :class:`RouterTimeout` if
        there was no room for ``timeout`` seconds (the router is stuck).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            for item in items:
                while len(self._items) >= self._maxsize and not self._closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise RouterTimeout("the router took nothing for "
                                            f"{timeout:g} s; giving up")
                    self._not_full.wait(left)
                if self._closed:
                    raise ClosedError("the daemon is shutting down")
                self._items.append(item)
            self._not_empty.notify()
            if len(self._items) >= MAX_COMMIT_BATCH:
                self._gathering.notify()  # a whole commit waits: no reason to gather on

    def put_stop(self) -> None:
        with self._lock:
            self._items.append(_STOP)
            self._closed = True
            self._not_empty.notify()
            self._gathering.notify()
            self._not_full.notify_all()

    def take(self, timeout: float | None = None, *,
             publishes_from: float = 0.0) -> list[object]:
        """Block for the next item, and the items of its kind right after it (publishes, runs).

        Publishes are not taken before ``publishes_from`` (monotonic; the router's
        commit pacing): those that arrive until then gather behind the first, to be
        stored by one commit.  Returns ``[]`` if ``timeout`` seconds pass with
        nothing to take.
        """
        with self._lock:
            while not self._items:
                if not self._not_empty.wait(timeout) and not self._items:
                    return []
            if type(self._items[0]) is _Publish:
                left = publishes_from - time.monotonic()
                if left > 0 and not self._closed and len(self._items) < MAX_COMMIT_BATCH:
                    self._gathering.wait(left)  # the lock is free meanwhile
            first = self._items.popleft()
            batch = [first]
            kind = type(first)
            if kind is _Publish or kind is _Remote:
                most = MAX_COMMIT_BATCH if kind is _Publish else MAX_RUNS_PER_COMMIT
                while self._items and len(batch) < most and type(self._items[0]) is kind:
                    batch.append(self._items.popleft())
            self._not_full.notify(len(batch))
            return batch


class Router:
    """Stores and fans out messages and presence; keeps who is connected where.

    ``node``/``host``/``nick`` describe this daemon and its own user (the one
    speaking through the control socket).  ``clock`` returns seconds since the
    epoch; tests pass a fake one.  ``commit_pace``: at most one commit of
    publishes starts per this many seconds (limits.COMMIT_PACE_S).
    """

    def __init__(self, store: MessageStore, *, node: str, host: str, nick: str,
                 name: str | None = None, clock: Callable[[], float] = time.time,
                 key: SigningKey | None = None,
                 commit_pace: float = COMMIT_PACE_S) -> None:
        self._store = store
        #: Signs our own messages (our feed, lanchat.feed); None only in tests of the
        #: router alone, whose messages are then stored unsigned and never relayed.
        self.key = key
        if key is not None and key.node != node:
            raise ValueError(f"key {key.node} is not node {node}'s")
        self.node = node
        self.host = host
        self.name = name or f"{nick} on {host}"
        self._nick = validate_nick(nick)
        self._clock = clock
        self._commit_pace = commit_pace
        self._next_commit_at = 0.0  # no publishes taken before this (monotonic)
        self._started_at = clock()
        self._inbox = _Inbox(MAX_ROUTER_QUEUE)
        self._thread = threading.Thread(target=self._run, name="router", daemon=False)
        # Router-thread state: the roster and the fan-out table.
        self._members: dict[Subscriber, _Member] = {}
        self._nicks: dict[str, _Member] = {}  # casefolded nick -> member
        self._room_subs: dict[str, tuple[Subscriber, ...]] = {}
        self._watchers: tuple[Subscriber, ...] = ()  # every room: tail, links
        self._watcher_rooms: dict[Subscriber, frozenset[str] | None] = {}
        self._links: tuple[LinkPeer, ...] = ()
        self._failed: set[Any] = set()  # receivers whose deliver raised, until dropped
        #: origin -> highest seq stored: the store's cursors, kept in memory so
        #: that gap detection costs no query.  Router thread only.
        self._cursors: dict[str, int] = store.cursors()
        #: origin -> entry hash of the head we hold (signed feeds only).  Router thread.
        self._hashes: dict[str, str] = {o: h.hash for o, h in store.heads().items()}
        #: origin -> seq of the first fork we found (store's ``forked``); replaced, never
        #: mutated, so any thread may read it.
        self._forked: dict[str, int] = store.forked()
        self._new_origins = NewOrigins()
        #: (link, what) said once in the log for that link, until it detaches.
        self._warned: set[tuple[object, str]] = set()
        self._roster = NetworkRoster(node)
        #: Who is linked to whom, from every roster's ``links`` (lanchat.relay).
        self._linkmap = LinkMap()
        # Microseconds of the clock: newer than any version we announced before a restart.
        self._roster_ver = int(clock() * 1_000_000)
        # Who is connected: kept per connection, changed one entry at a time by
        # the router thread (a join costs the same with 5 or 5,000 users), and
        # read by anyone -- a dict copy is atomic under the GIL, sorting happens
        # on the reader's side.  _me and _remote are replaced, never mutated.
        self._local_users: dict[Subscriber, User] = {}
        self._remote_users: tuple[User, ...] = ()
        self._me = self._own_user()
        self._roster_dirty = False  # our roster changed since links last heard it
        self._roster_sent_at = 0.0  # monotonic
        # Join and leave notices of big rooms, summed up every PRESENCE_BATCH_S (monotonic).
        self._held = HeldNotices(PRESENCE_BATCH_S)
        #: Our X25519 key for sealed direct messages (lanchat.seal) and its record, signed
        #: by our identity key and published in our roster.  None without a key (a
        #: router alone in tests): its direct messages are unsigned and never leave it.
        self._dh: DhKey | None = None
        self._dh_record: DhRecord | None = None
        if key is not None:
            self._dh = DhKey.derive(key, DH_KEY_VER)
            self._dh_record = DhRecord.make(key, self._dh, DH_KEY_VER)
        #: node -> its newest X25519 key record, verified with its roster's key (at most
        #: MAX_DH_RECORDS; kept while we run, also after the node went away).  Router thread.
        self._dh_records: dict[str, DhRecord] = {}

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Finish what is queued, then stop the router thread.  Idempotent.

        Returns False if the thread is still running after ``timeout`` seconds
        (then the store must stay open: the thread may still be writing).
        """
        if self._thread.is_alive():
            with contextlib.suppress(ClosedError):
                self._inbox.put_stop()
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def nick(self) -> str:
        """This daemon's own user's nick."""
        return self._nick

    # -- publishing ------------------------------------------------------------

    def publish(self, draft: Draft, *, source: object | None = None,
                done: PublishDone | None = None) -> None:
        """Queue ``draft`` for storing and fan-out; ``done`` is called on the router thread.

        Blocks only while the router's inbox is full (back-pressure onto a
        flooding connection).  Raises :class:`ClosedError` after :meth:`close`.
        """
        self._inbox.put(_Publish(draft, source, done), ROUTER_HANDOFF_TIMEOUT_S)

    def publish_many(self, drafts: Sequence[Draft], *, source: object | None = None,
                     done: PublishDone | None = None) -> None:
        """Queue several drafts at once (one inbox operation); same contract as :meth:`publish`."""
        self._inbox.put_many([_Publish(d, source, done) for d in drafts],
                             ROUTER_HANDOFF_TIMEOUT_S)

    def publish_all(self, items: Sequence[tuple[Draft, object | None, PublishDone | None]]
                    ) -> None:
        """Queue drafts of several publishers at once: (draft, source, done) each.

        A hub I/O loop hands over everything one round of its connections said in
        one inbox operation, so the router commits it in one transaction and
        fans it out in one pass.  Same contract as :meth:`publish`.
        """
        self._inbox.put_many([_Publish(d, source, done) for d, source, done in items],
                             ROUTER_HANDOFF_TIMEOUT_S)

    def barrier(self) -> None:
        """Return once everything queued before this call has been handled.

        Publishing only queues; a hub client's command is answered after what
        the client said before it is stored and fanned out (its ``/users`` after
        a line, its JSON ``users`` after the ``sent`` of its says), because the
        inbox is one FIFO and the router takes it in order.  Raises
        :class:`RouterTimeout` after ROUTER_HANDOFF_TIMEOUT_S, :class:`ClosedError`
        once closed.
        """
        self._call(lambda: None)

    def send(self, draft: Draft, timeout: float = ROUTER_HANDOFF_TIMEOUT_S) -> Message:
        """Publish and wait until stored: the message returned is durable.

        Raises :class:`RouterTimeout` if that takes more than ``timeout`` seconds.
        """
        future: Future[Message] = Future()

        def done(msg: Message | None, err: LanchatError | None) -> None:
            if err is not None:
                future.set_exception(err)
            else:
                assert msg is not None
                future.set_result(msg)

        self.publish(draft, done=done)
        return _wait(future, timeout)

    def accept_run(self, run: Sequence[Entry], key: PublicKey, *, floor: bool = False,
                   source: object | None) -> RunResult:
        """Store a verified run of ``key``'s feed from another daemon; fan out what is new.

        The caller (the link) has checked ``run`` with :func:`~lanchat.feed.verify_run`
        and ``key`` (``key.node`` is the run's origin).  Here it is held against what we
        hold of that feed: entries we hold are duplicates, and if the run's versions of
        them differ, the origin forked (the first version stays; the proof is logged and
        the origin marked, see :meth:`forked`); the rest is stored if it continues our
        head (its chain, not only its seq).  ``floor``: the sender pruned this feed's
        entries before the run, so the run may start beyond our head (the cursor jumps,
        never beyond a verified entry).  Our own feed is no exception: a run of it
        signed by our key that goes beyond our head (we were restored from a backup)
        is stored and becomes our head before we append again.
        Raises :class:`RouterTimeout` after ROUTER_HANDOFF_TIMEOUT_S, and whatever
        storing it raised (always a :class:`LanchatError`): the answer comes back
        whatever happens on the router thread.
        """
        return _wait(self.submit_run(run, key, floor=floor, source=source),
                     ROUTER_HANDOFF_TIMEOUT_S)

    def submit_run(self, run: Sequence[Entry], key: PublicKey, *, floor: bool = False,
                   source: object | None) -> Future[RunResult]:
        """:meth:`accept_run` without waiting: the answer comes in the future returned.

        A link parses and verifies its next frame while the router stores this run (one
        run in flight per link: it waits with :func:`wait_run` before the next).  Runs are
        taken in the order submitted.  Raises :class:`RouterTimeout` if the inbox has no
        room for ROUTER_HANDOFF_TIMEOUT_S.
        """
        future: Future[RunResult] = Future()
        self._inbox.put(_Remote(run, key, floor, source, future), ROUTER_HANDOFF_TIMEOUT_S)
        return future

    def forked(self) -> dict[str, int]:
        """``{origin: seq}``: the origins found to have signed two entries for one seq."""
        return dict(self._forked)

    # -- links -------------------------------------------------------------------

    def attach_link(self, link: LinkPeer) -> None:
        """Start routing messages and rosters to ``link``; hand it every roster we know.

        Every message stored from now on is delivered to the link live; the
        link catches the peer up on everything before from history.
        """
        self._call(lambda: self._do_attach(link))

    def detach_link(self, link: LinkPeer) -> None:
        """Stop routing to ``link``; the nodes only it vouched for are gone."""
        self._post(lambda: self._do_detach(link), "detach a link")

    def apply_roster(self, roster: NodeRoster, *, source: LinkPeer) -> None:
        """A roster arrived over ``source``: take it if newer, show changes, pass it on."""
        self._post(lambda: self._do_apply_roster(roster, source), "apply a roster")

    def withdraw_roster(self, node: str, ver: int, *, source: LinkPeer) -> None:
        """``source`` no longer reaches ``node`` (an unsigned ``gone``): taken only from
        the link that brought that node's roster (:meth:`NetworkRoster.withdraw`)."""
        self._post(lambda: self._do_withdraw_roster(node, ver, source), "withdraw a roster")

    def refuse_roster(self, reason: str, *, source: LinkPeer) -> None:
        """``source`` sent a roster over a bound (:mod:`lanchat.presence`): log it, once."""
        self._post(lambda: self._log_refused_roster(reason, source), "refuse a roster")

    def _log_refused_roster(self, reason: str, source: object) -> None:
        if self._first(source, "roster"):
            log.warning("refused a roster from %r: %s (said once per link; the link stays up)",
                        source, reason)

    def cursors(self) -> dict[str, int]:
        """origin -> highest seq held (what a peer needs to know to fill our gaps)."""
        return self._call(lambda: dict(self._cursors))  # type: ignore[no-any-return]

    def heads(self) -> dict[str, tuple[int, str]]:
        """origin -> (seq, entry hash) at our cursor, for each signed feed we hold."""
        return self._call(lambda: {  # type: ignore[no-any-return]
            o: (self._cursors[o], h) for o, h in self._hashes.items() if o in self._cursors})

    # -- membership (hub clients) ----------------------------------------------

    def join(self, sub: Subscriber, *, nick: str, host: str, via: str,
             room: str = DEFAULT_ROOM) -> list[User]:
        """Register a hub client under ``nick`` in ``room``; announce it.

        Returns the users already in the room.  Raises :class:`NickInUse`.
        """
        return self._call(lambda: self._do_join(sub, nick, host, via, room))  # type: ignore[no-any-return]

    def move(self, sub: Subscriber, room: str) -> list[User]:
        """Move a client to another room (leave notice here, join notice there)."""
        return self._call(lambda: self._do_move(sub, room))  # type: ignore[no-any-return]

    def rename(self, sub: Subscriber, nick: str) -> None:
        """Change a client's nick.  Raises :class:`NickInUse`."""
        self._call(lambda: self._do_rename(sub, nick))

    def leave(self, sub: Subscriber, reason: str = "quit") -> None:
        """Forget a client (idempotent) and announce that it left."""
        self._post(lambda: self._do_leave(sub, reason), "announce a leave")

    def set_nick(self, nick: str) -> str:
        """Change this daemon's own nick (``lanchat nick``).  Raises :class:`NickInUse`."""
        return self._call(lambda: self._do_set_nick(nick))  # type: ignore[no-any-return]

    # -- watchers (control-socket subscribers, links) --------------------------

    def subscribe(self, sub: Subscriber, *, backlog: int = 0,
                  rooms: frozenset[str] | None = None) -> list[Message]:
        """Register ``sub`` for every event in ``rooms`` (None: all rooms).

        Returns the last ``backlog`` stored messages (oldest first); every
        message stored after them will be delivered live -- no gap, no duplicate.
        """
        return self._call(lambda: self._do_subscribe(sub, backlog, rooms))  # type: ignore[no-any-return]

    def unsubscribe(self, sub: Subscriber) -> None:
        self._post(lambda: self._do_unsubscribe(sub), "unsubscribe")

    def prune(self, *, limit: int | None = None) -> int:
        """Apply the store's retention on the router thread (the store's only writer):
        at most ``limit`` messages per call (see :meth:`Store.prune`)."""
        return self._call(  # type: ignore[no-any-return]
            lambda: self._store.prune(self._clock(), limit=limit))

    # -- queries -----------------------------------------------------------------

    def users(self, room: str | None = None) -> list[User]:
        """Everyone connected (this daemon's user first), optionally only in ``room``."""
        local = list(self._local_users.values())
        remote = self._remote_users
        if room is not None:
            local = [u for u in local if u.room == room]
            remote = tuple(u for u in remote if u.room == room)
        local.sort(key=lambda u: u.nick.casefold())
        return [self._me, *local, *sorted(remote, key=lambda u: (u.nick.casefold(), u.node))]

    def _room_users(self, room: str, exclude: Subscriber | None = None) -> list[User]:
        """Who is in ``room`` (router thread: uses the room index, not a scan of everyone)."""
        local = [self._local_users[s] for s in self._room_subs.get(room, ())
                 if s is not exclude and s in self._local_users]
        remote = [u for u in self._remote_users if u.room == room]
        return [self._me, *local, *remote]

    def history(self, *, room: str | None = None, limit: int = 50,
                before: float | None = None, since: float | None = None) -> list[Message]:
        """Stored messages as this daemon's own user may see them (their direct messages only)."""
        limit = max(1, min(limit, MAX_HISTORY_PAGE))
        return self._store.history(room=room, limit=limit, before=before, since=since,
                                   viewer=self._nick)

    # -- router thread -----------------------------------------------------------

    def _call(self, fn: Callable[[], Any], timeout: float = ROUTER_HANDOFF_TIMEOUT_S) -> Any:
        """Run ``fn`` on the router thread and return its result (or raise what it raised).

        Raises :class:`RouterTimeout` after ``timeout`` seconds in all.
        """
        item = _Call(fn)
        self._inbox.put(item, timeout)
        return _wait(item.future, timeout)

    def _post(self, fn: Callable[[], Any], what: str) -> None:
        """Run ``fn`` on the router thread, without waiting for it.

        Shutting down, there is nobody left to tell; a router stuck for
        ROUTER_HANDOFF_TIMEOUT_S loses this one change, which is logged.
        """
        try:
            self._inbox.put(_Call(fn), ROUTER_HANDOFF_TIMEOUT_S)
        except ClosedError:
            pass
        except RouterTimeout as exc:
            log.warning("router: could not %s: %s", what, exc)

    def _run(self) -> None:
        while True:
            batch = self._inbox.take(self._next_timeout(), publishes_from=self._next_commit_at)
            if self._roster_dirty:
                self._flush_roster()
            if self._held and self._held.due is not None \
                    and self._held.due <= time.monotonic():
                self._flush_held()
            if not batch:
                continue
            first = batch[0]
            if first is _STOP:
                return
            try:
                if isinstance(first, _Publish):
                    self._commit(batch)  # type: ignore[arg-type]
                elif isinstance(first, _Call):
                    self._run_call(first)
                elif isinstance(first, _Remote):
                    self._take_remotes(batch)  # type: ignore[arg-type]
            except Exception as exc:  # the router thread must survive any bug
                log.exception("router: unexpected error")
                for item in batch:
                    if isinstance(item, _Call | _Remote) and not item.future.done():
                        item.future.set_exception(_internal(exc))  # nobody waits for ever

    def _next_timeout(self) -> float | None:
        """How long the router thread may wait for work: until roster or notices are due."""
        timeout = ROSTER_EVERY_S if self._roster_dirty else None
        due = self._held.due
        if due is not None:
            left = max(0.0, due - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _flush_held(self) -> None:
        """Send the big rooms' held join and leave notices, summed up.  Router thread only."""
        self._fanout([Event(p, source) for p, source in self._held.take()])

    def _run_call(self, item: _Call) -> None:
        try:
            item.future.set_result(item.fn())
        except LanchatError as exc:
            item.future.set_exception(exc)
        except Exception as exc:  # hand the bug to the caller, keep routing
            log.exception("router: call failed")
            item.future.set_exception(exc)

    def _commit(self, batch: list[_Publish]) -> None:
        """Store a run of publishes in one transaction, fan them out, answer each publisher.

        Every publisher is answered exactly once, stored or not: the fan-out
        never raises, and neither does a publisher's callback (see :meth:`_answer`).
        """
        self._next_commit_at = time.monotonic() + self._commit_pace
        batch = self._seal(self._address(self._dedupe(batch)))
        if not batch:
            return
        drafts = [p.draft for p in batch]
        entries: list[Entry] | None = None
        first_seq = self._cursors.get(self.node, 0) + 1  # what _seal bound its seals to
        try:
            if self.key is not None:  # one commit, one signing batch (lanchat.feed)
                entries = self._store.append_entries(drafts, ts=self._clock(), key=self.key)
                messages = [e.message for e in entries]
            else:
                messages = self._store.append_local(drafts, ts=self._clock())
        except Exception as exc:  # noqa: BLE001 -- logged there, a traceback for a bug
            _log_store_failure(f"{len(batch)} message(s)", exc)
            for p in batch:
                self._answer(p, None, _internal(exc))
            return
        if messages:
            self._cursors[self.node] = messages[-1].seq
            if messages[0].seq != first_seq and any(m.sealed for m in messages):
                log.error("router: our feed went on at #%d, not #%d as the direct messages "
                          "of this batch were sealed for: their addressees cannot open them "
                          "(a bug)", messages[0].seq, first_seq)
        if entries:
            self._hashes[self.node] = entries[-1].hash
            self._fanout([Event(e.message, p.source, e, e.sig is not None)
                          for p, e in zip(batch, entries, strict=True)])
        else:
            self._fanout([Event(msg, p.source) for p, msg in zip(batch, messages, strict=True)])
        for p, msg in zip(batch, messages, strict=True):
            self._answer(p, msg, None)

    def _dedupe(self, batch: list[_Publish]) -> list[_Publish]:
        """Answer each keyed draft already stored with its message, and leave it out.

        A client key (control ``send {key}``) makes a retry idempotent: the same
        (uid, key) is stored once and every later send of it is answered with
        that stored message.  Two of them in this very batch become one publish
        that answers both.  Router thread only: it alone appends, so a check and
        the append after it cannot race.
        """
        if all(p.draft.key is None for p in batch):
            return batch
        kept: list[_Publish] = []
        first: dict[tuple[int | None, str], int] = {}  # (uid, key) -> index in kept
        for p in batch:
            draft = p.draft
            if draft.key is None:
                kept.append(p)
                continue
            ident = (draft.uid, draft.key)
            if ident in first:
                i = first[ident]
                kept[i] = _Publish(kept[i].draft, kept[i].source, _both(kept[i].done, p.done))
                continue
            try:
                stored = self._store.sent_with_key(draft.uid, draft.key)
            except Exception as exc:
                log.exception("router: cannot look up a send key")
                self._answer(p, None, _internal(exc))
                continue
            if stored is not None:
                self._answer(p, stored, None)
                continue
            first[ident] = len(kept)
            kept.append(p)
        return kept

    def _address(self, batch: list[_Publish]) -> list[_Publish]:
        """Resolve each direct message's addressee to one user (nick + node) of the network.

        A draft whose ``to`` names nobody, or several users, is answered with
        the error (the sender sees it) and left out; the rest go on with
        ``to``/``to_node`` naming exactly one user.
        """
        if all(p.draft.to is None or p.draft.to_node is not None for p in batch):
            return batch
        users = [self._me, *self._local_users.values(), *self._remote_users]
        hosts = {self.node: self.host}
        for roster in self._roster.snapshot():
            hosts[roster.node] = roster.host
        kept: list[_Publish] = []
        for p in batch:
            draft = p.draft
            if draft.to is None or draft.to_node is not None:
                kept.append(p)
                continue
            try:
                try:
                    user = resolve_recipient(draft.to, users, hosts)
                    to, node = user.nick, user.node
                except NoSuchUser:
                    # Connected nowhere: ``nick@where`` may still name a node we know
                    # (its roster, or its key record), whose daemon keeps it for them.
                    known = {n: "" for n in self._dh_records}
                    known.update(hosts)
                    box = resolve_mailbox(draft.to, known)
                    if box is None:
                        raise
                    to, node = box
            except LanchatError as exc:
                self._answer(p, None, exc)
                continue
            kept.append(_Publish(replace(draft, to=to, to_node=node), p.source, p.done))
        return kept

    def _seal(self, batch: list[_Publish]) -> list[_Publish]:
        """Seal each direct message to its addressee's daemon and to ours (lanchat.seal).

        Its feed entry then carries the seal, never the text: every other daemon stores
        and relays ciphertext.  A draft whose addressee's node has published no key we
        hold is answered with :class:`NoSealKey` and left out: never sent in clear.  The
        seal is bound to the entry that will carry it (:func:`~lanchat.seal.dm_context`:
        our node, its seq -- the next ones of our feed, in batch order, as the store
        appends them -- room, nick and addressee).  Router thread only.
        """
        dh = self._dh
        if dh is None or all(p.draft.to is None for p in batch):
            return batch
        me = DhPublic(self.node, dh.public)
        seq = self._cursors.get(self.node, 0)
        kept: list[_Publish] = []
        for p in batch:
            draft = p.draft
            if draft.to is None:
                seq += 1
                kept.append(p)
                continue
            node = draft.to_node
            record = self._dh_records.get(node) if node is not None else None
            recipient = me if node == self.node else (record.public if record else None)
            if node is None or recipient is None:
                self._answer(p, None, NoSealKey(
                    f"cannot seal a direct message to {draft.to}"
                    f"{'@' + node[:8] if node else ''}: no key of node {node} has reached "
                    "us yet (it publishes one in its roster once it is linked, directly "
                    "or through others); nothing was sent"))
                continue
            seq += 1
            context = dm_context(origin=self.node, seq=seq, room=draft.room, nick=draft.nick,
                                 to=draft.to, to_node=node)
            blob = seal(draft.text.encode("utf-8"), sender=me, recipient=recipient,
                        context=context, entropy=secrets.token_bytes)
            kept.append(_Publish(replace(draft, sealed=seal_text(blob)), p.source, p.done))
        return kept

    def _open(self, run: Sequence[Entry], cur: int) -> Sequence[Entry]:
        """``run`` with the sealed direct messages for us opened (their ``text`` set).

        For us: addressed to a user of this node, or sent by this node (our own entries
        coming back after a restore).  Only those above ``cur`` (what we store now).  A
        seal that does not open (changed by its origin, or not for us) stays unread:
        stored, since the feed needs it, relayed, never shown; logged.  Router thread.
        """
        dh = self._dh
        if dh is None or all(e.message.sealed is None for e in run):
            return run
        out: list[Entry] = []
        for e in run:
            m = e.message
            if (m.sealed is None or m.seq <= cur
                    or self.node not in (m.to_node, m.origin)):
                out.append(e)
                continue
            text = self._unseal(m, dh)
            out.append(e if text is None else e._replace(message=replace(m, text=text)))
        return out

    def _unseal(self, m: Message, dh: DhKey) -> str | None:
        """The text of sealed message ``m``, or None (logged) if it does not open here."""
        assert m.sealed is not None and m.to is not None and m.to_node is not None
        try:
            blob = parse_seal_text(m.sealed)
            head = peek(blob)
            # The other end's key as the seal names it: the origin signed the entry that
            # carries it, and the seal is bound to both node ids and to this entry.
            sender = DhPublic(m.origin, head.sender_key)
            recipient = DhPublic(m.to_node, head.recipient_key)
            plain = open_sealed(blob, dh, sender=sender, recipient=recipient,
                                context=dm_context(origin=m.origin, seq=m.seq, room=m.room,
                                                   nick=m.nick, to=m.to, to_node=m.to_node))
            return validate_text(plain.decode("utf-8"))
        except (SealError, ValidationError, UnicodeDecodeError) as exc:
            log.warning("refused the sealed direct message %s from node %s to %s: it does "
                        "not open (%s); kept as ciphertext for its feed, never shown",
                        m.id, m.origin, m.to, exc)
            return None

    def _keep_dh(self, record: DhRecord) -> None:
        """Hold ``record`` (verified with its node's roster) if it is that node's newest."""
        if record.node == self.node:
            return
        old = self._dh_records.get(record.node)
        if old is None and len(self._dh_records) >= MAX_DH_RECORDS:
            return
        if old is None or record.ver > old.ver:
            self._dh_records[record.node] = record

    def _sees(self, msg: Message, nick: str) -> bool:
        """True if this node's user ``nick`` may see ``msg`` (a direct message: one of its ends)."""
        if msg.to is None:
            return True
        key = nick.casefold()
        if msg.to.casefold() == key and msg.to_node in (None, self.node):
            return True
        return msg.origin == self.node and msg.nick.casefold() == key

    @staticmethod
    def _answer(p: _Publish, msg: Message | None, err: LanchatError | None) -> None:
        """Tell a publisher how its message fared."""
        _call_done(p.done, msg, err)

    def _take_remotes(self, batch: list[_Remote]) -> None:
        """Hold peers' runs against our copies of their feeds; always resolves every future.

        The runs queued together (a catch-up outruns the store) are stored in one
        transaction: one fsync for all of them instead of one per run of 64.  Each run
        is all or nothing on its own; nothing is fanned out and no link hears its answer
        before the commit, and if the commit fails, nothing of the batch was stored.
        """
        origins = {item.run[0].origin for item in batch if item.run}
        before = {o: (self._cursors.get(o), self._hashes.get(o)) for o in origins}
        outcomes: list[RunResult | LanchatError] = []
        try:
            with self._store.batch():
                for item in batch:
                    try:
                        outcomes.append(self._take_run(item))
                    except Exception as exc:  # noqa: BLE001 -- logged there, a traceback for a bug
                        _log_store_failure(f"{len(item.run)} message(s) from a peer", exc)
                        outcomes.append(_internal(exc))
        except Exception as exc:  # noqa: BLE001 -- the commit: none of the batch is stored
            _log_store_failure(f"{sum(len(i.run) for i in batch)} message(s) from peers", exc)
            for origin, (cursor, head) in before.items():
                _restore(self._cursors, origin, cursor)
                _restore(self._hashes, origin, head)
            for item in batch:
                item.future.set_exception(_internal(exc))
            return
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, LanchatError):
                item.future.set_exception(outcome)
                continue
            if outcome.new:
                last = item.run[-1].seq
                self._fanout([Event(e.message, item.source, e, e.seq == last)
                              for e in outcome.new])
            item.future.set_result(outcome)

    def _take_run(self, item: _Remote) -> RunResult:
        run, source = item.run, item.source
        if not run:
            return RunResult([])
        origin = run[0].origin
        if origin == self.node and (self.key is None or item.key != self.key.public):
            return RunResult([])  # only our key writes our feed (the link checked it)
        first, last = run[0].seq, run[-1].seq
        cur = self._cursors.get(origin, 0)
        if last <= cur:  # all held: duplicates, or the origin forked
            ours = self._store.hash_at(origin, last)
            if ours is not None and ours != run[-1].hash:
                self._fork(origin, run, item.key, source)
                return RunResult([], fork=True)
            return RunResult([])
        if first <= cur:  # overlaps our head: it must hold our head's version
            head = self._hashes.get(origin)
            if head is not None and run[cur - first].hash != head:
                self._fork(origin, run, item.key, source)
                return RunResult([], fork=True)
        elif first == cur + 1:
            head = self._hashes.get(origin)
            if cur > 0 and head is not None and run[0].prev != head:
                # It continues another version of entry `cur` than ours: a fork, if the
                # origin signed both; ask for the overlap that proves it (once per link).
                return RunResult([], probe=None if origin in self._forked else cur - 1)
        elif not item.floor or origin == self.node:
            return RunResult([], gap=True)
        if origin not in self._cursors and not self._admitted([origin], source, [origin]):
            return RunResult([])
        run = self._open(run, cur)
        new = self._store.insert_run(run, key=item.key.raw, now=self._clock(),
                                     floor=item.floor and origin != self.node)
        if not new:
            return RunResult([])
        self._cursors[origin] = new[-1].seq
        self._hashes[origin] = new[-1].hash
        if new[0].seq != cur + 1:
            log.info("history of %s before #%d was pruned everywhere we can reach; "
                     "continuing after it", origin, new[0].seq)
        if origin == self.node:
            log.warning("took our own messages #%d-#%d back from %r (signed by our key: "
                        "we were restored from an older copy); continuing after them",
                        new[0].seq, new[-1].seq, source)
        return RunResult(new)  # fanned out by the caller, after the commit

    def _fork(self, origin: str, theirs: Sequence[Entry], key: PublicKey,
              source: object) -> None:
        """``origin`` signed another version of entries we hold: keep ours, log the proof."""
        first = theirs[0].seq
        try:
            ours = self._store.entries(origin, first, first + MAX_RUN_ENTRIES - 1)
        except StoreError as exc:
            log.error("cannot read %s's entries for a fork proof: %s", origin, exc)
            return
        proof = None
        if ours and ours[0].seq == first:
            proof = _fork_proof(ours, theirs, key)
        seq = proof.seq if proof is not None else first
        if origin not in self._forked:
            try:
                self._store.mark_forked(origin, seq)
            except StoreError as exc:
                log.error("cannot mark %s forked: %s", origin, exc)
            self._forked = {**self._forked, origin: seq}
        if self._first(source, f"fork {origin}"):
            log.warning("node %s forked its feed at #%d: it signed two different messages "
                        "there; keeping the one we stored first (%r sent the other). "
                        "proof: %s", origin, seq, source,
                        json.dumps(proof.to_dict()) if proof is not None else "incomplete")

    def _first(self, source: object, what: str) -> bool:
        """True the first time ``source`` (a link) earns a log line about ``what``."""
        if (source, what) in self._warned:
            return False
        self._warned.add((source, what))
        return True

    def _admit_origins(self, fresh: list[Message], source: object) -> list[Message]:
        """``fresh`` without the messages of new origins that ``source`` may not bring.

        Two bounds (lanchat-protocol(7), "Limits"): each peer address brings at most
        NEW_ORIGINS_BURST new origins at once and NEW_ORIGINS_PER_S after that (the
        linked peer's own origin is free), and we hold at most MAX_ORIGINS, forgetting
        origins that hold no message first.  A refused message is not a gap: its
        origin is simply unknown here.
        """
        new = list(dict.fromkeys(m.origin for m in fresh if m.origin not in self._cursors))
        if not new:
            return fresh
        return self._admitted(new, source, fresh)

    def _admitted(self, new: list[str], source: object, fresh: list[_M]) -> list[_M]:
        """``fresh`` (messages, or origins) without those of the ``new`` origins refused."""
        own: object = getattr(source, "node", None)
        if isinstance(own, str) and own in new:  # first, and free of the budget
            new = [own, *(o for o in new if o != own)]
        address = getattr(source, "address", None)
        key = address[0] if isinstance(address, tuple) and address else source
        free = 1 if isinstance(own, str) and own in new else 0
        allowed = free + self._new_origins.admit(key, len(new) - free, self._clock())
        room = MAX_ORIGINS - len(self._cursors)
        if allowed > room:
            try:
                for origin in self._store.forget_idle(allowed - room):
                    self._cursors.pop(origin, None)
            except StoreError as exc:
                log.error("cannot forget idle origins: %s", exc)
            room = MAX_ORIGINS - len(self._cursors)
        allowed = max(0, min(allowed, room))
        refused = set(new[allowed:])
        if not refused:
            return fresh
        if self._first(source, "origins"):
            log.warning("refusing messages of %d new origin(s) from %r: it brings new "
                        "origins faster than %g/s after %d, or we hold %d (the most); "
                        "said once per link", len(refused), source, NEW_ORIGINS_PER_S,
                        NEW_ORIGINS_BURST, MAX_ORIGINS)
        return [m for m in fresh if (m if isinstance(m, str) else m.origin) not in refused]

    def _fanout(self, events: list[Event]) -> None:
        """Hand events to everyone who should see them.  Router thread only.

        Each receiver gets its share of ``events`` in one :meth:`Subscriber.deliver`
        (one ``send`` per receiver per batch).  A single event -- what a quiet
        hub routes -- is handed to all its receivers as the same list.
        """
        if len(events) == 1:
            dead = [sub for sub in self._receivers(events[0])
                    if not self._hand(sub, events)]
        else:
            batches = self._room_batches(events)
            if batches is None:
                batches = {}
                for event in events:
                    for sub in self._receivers(event):
                        batch = batches.get(sub)
                        if batch is None:
                            batches[sub] = [event]
                        else:
                            batch.append(event)
            dead = [sub for sub, batch in batches.items() if not self._hand(sub, batch)]
        broken: list[LinkPeer] = []
        # Whom a message came from, if a link: the relay rule skips the sender's neighbours.
        senders = {id(lk): lk.node for lk in self._links}
        for link in self._links:
            mine: list[Event] = []
            vouched: list[Event] = []
            for e in events:
                m = e.item
                if not isinstance(m, Message) or e.source is link:
                    continue
                sender = senders.get(id(e.source))
                if should_relay(link.node, me=self.node, origin=m.origin, sender=sender,
                                links=self._linkmap):
                    mine.append(e)
                else:
                    vouched.append(e)
            if vouched:
                link.vouch(vouched)
            if mine and not self._hand(link, mine):
                broken.append(link)
        for sub in dead:
            self._drop(sub)
        for link in broken:
            link.abort("internal error")
            self._do_detach(link)

    def _room_batches(self, events: list[Event]) -> dict[Subscriber, list[Event]] | None:
        """Who gets which of ``events`` when all are messages to one room; else None.

        The same as asking :meth:`_receivers` event by event, without doing so:
        everyone in the room and every watcher of it gets the whole commit except
        what they sent themselves, so all but the senders share one :class:`Batch`
        (its bytes joined once per encoding).
        """
        room = events[0].item.room
        for e in events:
            m = e.item
            if not isinstance(m, Message) or m.to is not None or m.room != room:
                return None
        sources = {id(e.source) for e in events if e.source is not None}
        shared = Batch(events)
        batches: dict[Subscriber, list[Event]] = {}
        watching = [sub for sub in self._watchers if self._watches(sub, room)]
        for sub in (*self._room_subs.get(room, ()), *watching):
            batches[sub] = (shared if id(sub) not in sources
                            else [e for e in events if e.source is not sub])
        return {sub: batch for sub, batch in batches.items() if batch}

    def _hand(self, sub: Subscriber, events: Sequence[Event]) -> bool:
        """``sub.deliver(events)``; a receiver that raises (a bug) counts as dead.

        One broken receiver must not stop the fan-out to the others, nor the
        answer to whoever published: it is logged once and dropped.
        """
        try:
            return sub.deliver(events)
        except Exception:
            log.exception("router: a receiver failed to take %d event(s); dropping it: %r",
                          len(events), sub)
            self._failed.add(sub)
            return False

    def _receivers(self, event: Event) -> list[Subscriber]:
        """Who gets ``event``: its room and the watchers.

        A direct message goes to its two ends on this node only, whatever their
        rooms (the addressee if ``to_node`` is us, the sender if it was sent
        here), and to the watchers -- this daemon's own user's ``tail`` -- only
        if that user is one of its ends.  Links relay it regardless (_fanout).
        """
        item = event.item
        source = event.source
        if isinstance(item, Message) and item.to is not None:
            if not item.text:  # sealed, and not opened here: for other daemons only
                return []
            # A direct message: only its two ends on this node, whatever their rooms;
            # the watchers (control subscriptions) are this daemon's own user.
            subs: list[Subscriber] = []
            if item.to_node in (None, self.node):
                member = self._nicks.get(item.to.casefold())
                if member is not None and member.sub is not source:
                    subs.append(member.sub)
            if item.origin == self.node:
                member = self._nicks.get(item.nick.casefold())
                if member is not None and member.sub is not source and member.sub not in subs:
                    subs.append(member.sub)
            if not self._sees(item, self._nick):
                return subs
        else:
            subs = [sub for sub in self._room_subs.get(item.room, ()) if sub is not source]
        subs.extend(sub for sub in self._watchers
                    if sub is not source and self._watches(sub, item.room))
        return subs

    def _watches(self, sub: Subscriber, room: str) -> bool:
        """Whether the watcher ``sub`` (a control subscription) asked for ``room``."""
        rooms = self._watcher_rooms.get(sub)
        return rooms is None or room in rooms

    def _drop(self, sub: Subscriber) -> None:
        failed = sub in self._failed
        self._failed.discard(sub)
        if not failed:
            log.info("dropping a subscriber whose queue is full: %r", sub)
        if sub in self._members:
            self._do_leave(sub, "internal error" if failed else "too slow")
        else:
            self._do_unsubscribe(sub)

    def _presence(self, kind: str, member: _Member, room: str, *, old: str | None = None,
                  reason: str | None = None) -> None:
        p = Presence(kind=kind, nick=member.nick, host=member.host,  # type: ignore[arg-type]
                     node=self.node, room=room, ts=self._clock(), old=old, reason=reason)
        if kind != "nick" and self._is_big(room):
            # Held and summed up: the fan-out of one notice per person would cost the
            # square of the room, and a leave is often a cut that happens inside a fan-out.
            self._held.hold(p, member.sub, time.monotonic())
            return
        self._fanout([Event(p, member.sub)])

    def _is_big(self, room: str) -> bool:
        """More than BIG_ROOM_OVER of our members in ``room``: its notices are summed up."""
        return len(self._room_subs.get(room, ())) > BIG_ROOM_OVER

    def _add_to_room(self, sub: Subscriber, room: str) -> None:
        self._room_subs[room] = (*self._room_subs.get(room, ()), sub)

    def _remove_from_room(self, sub: Subscriber, room: str) -> None:
        rest = tuple(s for s in self._room_subs.get(room, ()) if s is not sub)
        if rest:
            self._room_subs[room] = rest
        else:
            self._room_subs.pop(room, None)

    def _check_nick_free(self, nick: str, member: _Member | None) -> None:
        """Raise unless ``nick`` is free for ``member`` (None: a newcomer).

        Taken means held by another client here, or this daemon's own nick.
        """
        key = nick.casefold()
        holder = self._nicks.get(key)
        if (holder is not None and holder is not member) or key == self._nick.casefold():
            raise NickInUse(f"the nick {nick} is taken")

    def _do_join(self, sub: Subscriber, nick: str, host: str, via: str, room: str) -> list[User]:
        validate_nick(nick)
        if sub in self._members:
            raise NickInUse("already joined")
        self._check_nick_free(nick, None)
        member = _Member(sub, nick, host, room, via, self._clock())
        others = self._room_users(room)
        self._members[sub] = member
        self._nicks[_nick_key(nick)] = member
        self._add_to_room(sub, room)
        self._user_changed(member)
        self._presence("join", member, room)
        return others

    def _do_move(self, sub: Subscriber, room: str) -> list[User]:
        member = self._members.get(sub)
        if member is None:
            raise ClosedError("not joined")
        if member.room == room:
            return self._room_users(room, exclude=sub)
        self._presence("leave", member, member.room, reason=f"moved to #{room}")
        self._remove_from_room(sub, member.room)
        others = self._room_users(room)
        member.room = room
        self._add_to_room(sub, room)
        self._user_changed(member)
        self._presence("join", member, room)
        return others

    def _do_rename(self, sub: Subscriber, nick: str) -> None:
        validate_nick(nick)
        member = self._members.get(sub)
        if member is None:
            raise ClosedError("not joined")
        self._check_nick_free(nick, member)
        old = member.nick
        del self._nicks[old.casefold()]
        member.nick = nick
        self._nicks[_nick_key(nick)] = member
        self._user_changed(member)
        self._presence("nick", member, member.room, old=old)

    def _do_leave(self, sub: Subscriber, reason: str) -> None:
        member = self._members.pop(sub, None)
        if member is None:
            self._do_unsubscribe(sub)
            return
        self._nicks.pop(member.nick.casefold(), None)
        self._remove_from_room(sub, member.room)
        self._local_users.pop(sub, None)
        self._roster_dirty = True
        self._presence("leave", member, member.room, reason=reason)

    def _do_set_nick(self, nick: str) -> str:
        validate_nick(nick)
        holder = self._nicks.get(nick.casefold())
        if holder is not None:
            raise NickInUse(f"the nick {nick} is taken")
        self._nick = nick
        self._me = self._own_user()
        self._roster_dirty = True
        return nick

    def _do_subscribe(self, sub: Subscriber, backlog: int,
                      rooms: frozenset[str] | None) -> list[Message]:
        messages: list[Message] = []
        if backlog > 0:
            if rooms is not None and len(rooms) == 1:
                (room,) = rooms
                messages = self._store.history(room=room, limit=min(backlog, MAX_HISTORY_PAGE),
                                               viewer=self._nick)
            else:
                messages = self._store.history(limit=min(backlog, MAX_HISTORY_PAGE),
                                               viewer=self._nick)
                if rooms is not None:
                    messages = [m for m in messages if m.room in rooms]
        if sub not in self._watcher_rooms:
            self._watchers = (*self._watchers, sub)
        self._watcher_rooms[sub] = rooms
        return messages

    def _do_unsubscribe(self, sub: Subscriber) -> None:
        if self._watcher_rooms.pop(sub, None) is not None or sub in self._watchers:
            self._watchers = tuple(s for s in self._watchers if s is not sub)

    def _do_attach(self, link: LinkPeer) -> None:
        if link not in self._links:
            self._links = (*self._links, link)
            self._links_changed()
        for roster in (self._own_roster(), *self._roster.snapshot()):
            link.send_roster(roster)

    def _do_detach(self, link: LinkPeer) -> None:
        if link not in self._links:
            return
        self._links = tuple(lk for lk in self._links if lk is not link)
        self._links_changed()
        self._warned = {w for w in self._warned if w[0] is not link}
        direct = {lk.node for lk in self._links}
        for node in self._roster.vouched_by(link):
            if node in direct:
                continue
            marked = self._roster.mark_gone(node)
            self._linkmap.forget(node)
            if marked is not None:
                gone, changes = marked
                self._show_changes(changes, "unreachable")
                for other in self._links:
                    other.send_roster(gone)
        self._remote_users = tuple(self._roster.users())

    def _do_withdraw_roster(self, node: str, ver: int, source: LinkPeer) -> None:
        changes = self._roster.withdraw(node, ver, source)
        gone = self._roster.get(node)
        if changes is None or gone is None:
            return
        self._linkmap.forget(node)  # unreachable: linked to no one we could count on
        self._show_changes(changes, "unreachable")
        for link in self._links:
            if link is not source:
                link.send_roster(gone)
        self._remote_users = tuple(self._roster.users())

    def _do_apply_roster(self, roster: NodeRoster, source: LinkPeer) -> None:
        direct = roster.node == source.node
        if not direct and any(lk.node == roster.node for lk in self._links):
            return  # a neighbour speaks for itself: a relayed roster of it is stale or forged
        # Versions are microseconds of their node's clock: a relayed one far ahead of ours
        # would hide that node's real rosters until its clock got there.
        if not direct and roster.ver > (self._clock() + FUTURE_SKEW_S) * 1_000_000:
            self._log_refused_roster(
                f"the roster of {roster.node} claims version {roster.ver}, more than "
                f"{FUTURE_SKEW_S:g} s ahead of our clock", source)
            return
        try:
            changes = self._roster.apply(roster, source, direct=direct)
        except ValidationError as exc:
            self._log_refused_roster(str(exc), source)
            return
        if direct:  # the node's own link vouches for it, whichever copy came first
            self._roster.claim(roster.node, source)
        if roster.dh is not None and roster.signed is not None:
            self._keep_dh(roster.dh)  # checked with the roster's key (presence)
        if changes is None:
            return
        self._linkmap.set(roster.node, () if roster.gone else roster.links)
        self._show_changes(changes, "quit")
        for link in self._links:
            if link is not source:
                link.send_roster(roster)
        self._remote_users = tuple(self._roster.users())

    def _show_changes(self, changes: list[Change], reason: str) -> None:
        """Notices for a roster's changes; over PRESENCE_SUMMARY_OVER per room and kind, one."""
        now = self._clock()
        groups: dict[tuple[str, str], list[Change]] = {}
        for change in changes:
            groups.setdefault((change.kind, change.user.room), []).append(change)
        events = []
        for (kind, room), group in groups.items():
            big = self._is_big(room)
            others = len(group) - 1 if big or len(group) > PRESENCE_SUMMARY_OVER else 0
            for change in group[:1] if others else group:
                u = change.user
                p = Presence(kind=kind, nick=u.nick, host=u.host,  # type: ignore[arg-type]
                             node=u.node, room=u.room, ts=now,
                             reason=reason if kind == "leave" else None, others=others)
                if big:
                    self._held.hold(p, None, time.monotonic(), people=1 + others)
                else:
                    events.append(Event(p, None))
        if events:
            self._fanout(events)

    def _own_roster(self) -> NodeRoster:
        mine = (self._me, *self._local_users.values())
        return NodeRoster(node=self.node, ver=self._roster_ver, name=self.name,
                          host=self.host, users=mine, links=tuple(sorted(self._linked_nodes())),
                          dh=self._dh_record)

    def _linked_nodes(self) -> set[str]:
        return {lk.node for lk in self._links}

    def _links_changed(self) -> None:
        """Our links changed: our own entry of the link map now, our roster (which lists
        them for the others' relay decisions) at the next flush."""
        self._linkmap.set(self.node, self._linked_nodes())
        self._roster_dirty = True

    def _own_user(self) -> User:
        return User(nick=self._nick, host=self.host, node=self.node, local=True,
                    since=self._started_at, room=DEFAULT_ROOM, via="daemon")

    def _user_changed(self, member: _Member) -> None:
        self._local_users[member.sub] = User(
            nick=member.nick, host=member.host, node=self.node, local=True,
            since=member.since, room=member.room, via=member.via)
        self._roster_dirty = True

    def _flush_roster(self) -> None:
        """Tell links about our users: at most every ROSTER_EVERY_S, however busy the hub.

        A roster is all our users, so sending one per join would cost links
        the square of the users during a rush of joins.
        """
        now = time.monotonic()
        if now - self._roster_sent_at < ROSTER_EVERY_S:
            return
        self._roster_dirty = False
        self._roster_sent_at = now
        # Versions only grow, also across restarts: microseconds of the clock,
        # or one more than the last version if the clock stepped back.
        self._roster_ver = max(self._roster_ver + 1, int(self._clock() * 1_000_000))
        if self._links:
            roster = self._own_roster()
            for link in self._links:
                link.send_roster(roster)
