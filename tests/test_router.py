"""The router on its own: a real Store, fake receivers of its narrow interfaces.

What a hostile or buggy party must never do to the router thread: make a hand-off wait for
ever, stop a fan-out, or write in our own origin's name.  (Issue 13, cases 1, 2, build 5.)
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from rogue import Feed, rogue_key

from lanchat.errors import LanchatError, RouterTimeout
from lanchat.events import Event
from lanchat.feed import Entry, PublicKey, RunResult
from lanchat.limits import MAX_COMMIT_BATCH
from lanchat.model import Draft, Message
from lanchat.presence import NodeRoster
from lanchat.router import Router
from lanchat.store import Store

PEER_FEED = Feed(rogue_key("peer"))
PEER = PEER_FEED.origin
#: This node's own key (the router signs with it).
OWN = rogue_key("own")


class Sink:
    """A receiver that keeps what it is handed; ``fail`` makes its deliver raise (a bug)."""

    def __init__(self, name: str, *, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.got: list[Event] = []

    def deliver(self, events: Sequence[Event]) -> bool:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot render this")
        self.got.extend(events)
        return True

    def texts(self) -> list[str]:
        return [e.item.text for e in self.got if isinstance(e.item, Message)]

    def __repr__(self) -> str:
        return f"<Sink {self.name}>"


class FakeLink(Sink):
    """A link as the router sees it (LinkPeer)."""

    def __init__(self, node: str, **kw: Any) -> None:
        super().__init__(f"link {node}", **kw)
        self.node = node
        self.aborted: str | None = None
        self.vouched: list[Event] = []
        self.rosters: list[NodeRoster] = []

    def vouch(self, events: Sequence[Event]) -> None:
        self.vouched.extend(events)

    def send_roster(self, roster: NodeRoster) -> None:
        self.rosters.append(roster)

    def abort(self, reason: str) -> None:
        self.aborted = reason


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "history.db", node_id=OWN.node)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def router(store: Store) -> Iterator[Router]:
    r = Router(store, node=store.node_id, host="box", nick="owner", key=OWN)
    r.start()
    try:
        yield r
    finally:
        r.close()


def remote(seq: int, text: str = "", feed: Feed = PEER_FEED, ts: float | None = None) -> Entry:
    """Entry ``seq`` of ``feed`` (a peer's, by default), chained and signed."""
    return Entry.from_wire(feed.entry(seq, text or f"r{seq}", nick="peer", host="far",
                                      ts=1_700_000_000.0 + seq if ts is None else ts))


def accept(router: Router, *run: Entry, key: PublicKey | None = None) -> RunResult:
    """Hand ``run`` to the router as a link does once it verified it."""
    return router.accept_run(list(run), key or PEER_FEED.key.public, source=None)


def test_a_receiver_that_raises_is_dropped_and_the_fan_out_goes_on(router: Router) -> None:
    """One broken receiver (its deliver raised: a renderer crashed) costs only itself: the
    others get every message, the publisher its answer, and the link its reply."""
    before, broken, after = Sink("before"), Sink("broken", fail=True), Sink("after")
    for sink in (before, broken, after):
        router.subscribe(sink)
    link = FakeLink("cd" * 8, fail=True)
    router.attach_link(link)
    got = accept(router, remote(1, "first"))
    assert [e.message.text for e in got.new] == ["first"] and not got.gap
    stored = router.send(Draft(text="second", nick="owner", host="box"), timeout=5.0)
    assert stored.text == "second"
    assert before.texts() == after.texts() == ["first", "second"]
    assert broken.got == []
    assert link.aborted == "internal error"
    # Dropped: the broken receiver is not handed anything more, even once it could take it.
    broken.fail = False
    router.send(Draft(text="third", nick="owner", host="box"), timeout=5.0)
    assert broken.got == [] and after.texts() == ["first", "second", "third"]


def test_a_full_mesh_relays_nothing_and_a_partial_one_relays_where_needed(
        router: Router) -> None:
    """lanchat.relay wired: a message of A, from A, goes to no neighbour that both says and
    is said to be linked to A (they get it from A; the link counts it as held); our own
    messages go to every link; our roster lists our links."""
    feed_a = Feed(rogue_key("relay-a"))
    a, b, c = feed_a.origin, "b2" * 16, "c3" * 16
    me = router.node
    links = {n: FakeLink(n) for n in (a, b, c)}
    for link in links.values():
        router.attach_link(link)

    def roster(node: str, linked: set[str], ver: int = 1) -> NodeRoster:
        return NodeRoster(node=node, ver=ver, name=node, host="h", links=tuple(sorted(linked)))

    def got(node: str) -> list[str]:
        return [e.item.text for e in links[node].got if isinstance(e.item, Message)]

    # Nothing known yet: flood (the safe default).
    router.accept_run([remote(1, "a1", feed_a)], feed_a.key.public, source=links[a])
    assert got(b) == got(c) == ["a1"] and got(a) == []
    # A, B and C say they are linked to each other and to us: a full mesh.
    router.apply_roster(roster(a, {me, b, c}), source=links[a])
    router.apply_roster(roster(b, {me, a, c}), source=links[b])
    router.apply_roster(roster(c, {me, a, b}), source=links[c])
    router.accept_run([remote(2, "a2", feed_a)], feed_a.key.public, source=links[a])
    assert got(b) == got(c) == ["a1"]  # a2: from A itself
    assert [e.item.text for e in links[b].vouched] == ["a2"]  # type: ignore[union-attr]
    own = router.send(Draft(text="mine", nick="owner", host="box"), timeout=5.0)
    assert all(got(n)[-1] == own.text for n in (a, b, c))
    # C loses its link to A (C says so; A's claim alone no longer makes a link): C needs us.
    router.apply_roster(roster(c, {me, b}, ver=2), source=links[c])
    router.accept_run([remote(3, "a3", feed_a)], feed_a.key.public, source=links[a])
    assert got(c)[-1] == "a3" and got(b)[-1] == "mine"
    # Our roster lists our three links, for the others' decisions (at the next flush).
    wait_for("our roster listing our links", lambda: any(
        r.node == me and set(r.links) == {a, b, c} for r in list(links[a].rosters)), 10.0)


def test_a_bug_while_storing_a_peers_batch_answers_the_link(store: Store, router: Router,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The link waits for the router's answer: an unexpected error must reach it as a
    LanchatError (the link then closes) instead of leaving it waiting for ever."""
    def broken(*args: Any, **kw: Any) -> list[Message]:
        raise KeyError("a bug")
    monkeypatch.setattr(store, "insert_run", broken)
    t0 = time.monotonic()
    with pytest.raises(LanchatError, match="internal error"):
        accept(router, remote(1))
    assert time.monotonic() - t0 < 5.0
    monkeypatch.undo()
    assert accept(router, remote(1)).new  # the router lives on


def test_a_bug_while_storing_our_own_answers_the_sender(store: Store, router: Router,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    def broken(*args: Any, **kw: Any) -> list[Message]:
        raise KeyError("a bug")
    monkeypatch.setattr(store, "append_entries", broken)
    with pytest.raises(LanchatError, match="internal error"):
        router.send(Draft(text="x", nick="owner", host="box"), timeout=5.0)


def test_a_stuck_router_times_a_hand_off_out(router: Router,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hand-off has a deadline: a link waiting on a wedged router gives up."""
    monkeypatch.setattr("lanchat.router.ROUTER_HANDOFF_TIMEOUT_S", 0.5)
    release = threading.Event()
    router._call(lambda: None)  # a warm-up: the thread runs
    router._post(lambda: release.wait(10.0), "wedge the router for this test")
    try:
        t0 = time.monotonic()
        with pytest.raises(RouterTimeout):
            accept(router, remote(1))
        assert 0.4 < time.monotonic() - t0 < 3.0
    finally:
        release.set()


def test_our_own_origin_is_never_taken_from_outside(store: Store, router: Router) -> None:
    """A peer's message in our name (here from the year 2100) is neither stored, shown nor
    allowed to move our clock: the next message of ours is stamped now."""
    watcher = Sink("watcher")
    router.subscribe(watcher)
    forger = Feed(rogue_key("forger"), origin=router.node)
    forged = remote(1, "in your name", feed=forger, ts=4102444800.0)
    assert not accept(router, forged, key=forger.key.public).new  # not our key: refused
    got = accept(router, remote(1, "honest"))
    assert [e.message.text for e in got.new] == ["honest"] and not got.gap
    assert router.history() == [e.message for e in got.new]
    assert router.cursors().get(router.node, 0) == 0
    now = time.time()
    mine = router.send(Draft(text="mine", nick="owner", host="box"), timeout=5.0)
    assert mine.seq == 1 and now - 1 <= mine.ts <= time.time() + 1
    assert watcher.texts() == ["honest", "mine"]


def test_one_key_sent_twice_in_one_commit_stores_once_and_answers_both(
        store: Store, router: Router) -> None:
    """Issue 13 case 11: two sends of one (uid, key) taken in the same commit batch."""
    answers: list[Message | None] = []
    both = threading.Event()

    def done(msg: Message | None, err: LanchatError | None) -> None:
        assert err is None, err
        answers.append(msg)
        if len(answers) == 3:
            both.set()

    drafts = [Draft(text="twice", nick="owner", host="box", uid=7, key="k"),
              Draft(text="other user", nick="owner", host="box", uid=8, key="k"),
              Draft(text="twice", nick="owner", host="box", uid=7, key="k")]
    router.publish_many(drafts, done=done)  # one inbox operation: one commit
    assert both.wait(10.0)
    stored = store.history()
    assert [m.text for m in stored] == ["twice", "other user"]
    assert sorted(m.id for m in answers if m is not None) == sorted(
        [stored[0].id, stored[0].id, stored[1].id])
    again = router.send(Draft(text="twice", nick="owner", host="box", uid=7, key="k"))
    assert again == stored[0] and len(store.history()) == 2


def _queued(router: Router, runs: Sequence[Sequence[Entry]]) -> list[Any]:
    """Submit ``runs`` while the router is busy, so they wait together; then release it."""
    release = threading.Event()
    router._call(lambda: None)  # a warm-up: the thread runs
    router._post(lambda: release.wait(10.0), "hold the router so that runs queue up")
    futures = [router.submit_run(run, PEER_FEED.key.public, source=None) for run in runs]
    release.set()
    return futures


def test_runs_that_queue_up_are_stored_in_one_transaction(store: Store, router: Router) -> None:
    """A catch-up outruns the store: the runs waiting together cost one commit (one fsync),
    are shown only after it, and are held against each other as if stored one by one -- a
    second version of entries stored by an earlier run of the same batch is a fork."""
    watcher = Sink("watcher")
    router.subscribe(watcher)
    other = Feed(PEER_FEED.key)  # the peer's key, signing another version of #1-#2
    forked = [Entry.from_wire(other.entry(i, f"other {i}", nick="peer", host="far",
                                          ts=1_700_000_000.0 + i)) for i in (1, 2)]
    statements: list[str] = []
    router._call(lambda: store._writer.set_trace_callback(statements.append))
    futures = _queued(router, [[remote(1), remote(2)], [remote(3), remote(4)], forked])
    results = [f.result(10.0) for f in futures]
    router._call(lambda: store._writer.set_trace_callback(None))
    assert [[e.seq for e in r.new] for r in results] == [[1, 2], [3, 4], []]
    assert results[2].fork and router.forked() == {PEER: 1}
    assert statements.count("COMMIT") == 1  # the batch (the fork mark in it)
    assert watcher.texts() == ["r1", "r2", "r3", "r4"]
    assert store.count() == 4


def test_a_batch_of_runs_whose_commit_fails_is_not_shown_and_can_come_again(
        store: Store, router: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of a failed commit was stored: no receiver sees it, every link hears the
    error, and the cursors are as before, so the same runs are taken when they come again."""
    watcher = Sink("watcher")
    router.subscribe(watcher)
    real = store._transaction

    @contextlib.contextmanager
    def failing_commit() -> Iterator[None]:
        with real():
            yield
            store._writer.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_transaction", failing_commit)
    futures = _queued(router, [[remote(1), remote(2)], [remote(3)]])
    for f in futures:
        with pytest.raises(LanchatError):
            f.result(10.0)
    assert watcher.got == [] and router.cursors().get(PEER, 0) == 0
    monkeypatch.undo()
    assert [e.seq for e in accept(router, remote(1), remote(2), remote(3)).new] == [1, 2, 3]
    assert watcher.texts() == ["r1", "r2", "r3"]


class CountingSink(Sink):
    """A Sink that also keeps each deliver's list as it was handed over."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[Sequence[Event]] = []

    def deliver(self, events: Sequence[Event]) -> bool:
        self.calls.append(events)
        return super().deliver(events)


def _publish_together(router: Router, items: list[tuple[str, str, object | None]]) -> None:
    """Publish (text, room, source) drafts in one inbox operation (one commit, one fan-out)."""
    left = threading.Semaphore(0)

    def done(msg: Message | None, err: LanchatError | None) -> None:
        assert err is None, err
        left.release()

    router._call(lambda: None)
    release = threading.Event()
    router._post(lambda: release.wait(10.0), "hold the router so the drafts go together")
    router.publish_all([(Draft(text=text, nick="owner", host="box", room=room), source, done)
                        for text, room, source in items])
    release.set()
    for _ in items:
        assert left.acquire(timeout=10.0)


def test_a_commit_to_one_room_reaches_each_member_once_without_their_own(
        router: Router) -> None:
    """Several messages in one commit: each member gets all but what it sent, in order, in
    one deliver; those who sent none share one list (its bytes joined once); a watcher of
    every room and one of that room get all of it, other rooms and watchers nothing."""
    a, b, c, d = (CountingSink(n) for n in "abcd")
    every, lobby_only, elsewhere = CountingSink("every"), CountingSink("lobby"), \
        CountingSink("elsewhere")
    for sub, nick in ((a, "ann"), (b, "bob"), (c, "cid")):
        router.join(sub, nick=nick, host="box", via="tcp")
    router.join(d, nick="dan", host="box", via="tcp", room="other")
    router.subscribe(every)
    router.subscribe(lobby_only, rooms=frozenset({"lobby"}))
    router.subscribe(elsewhere, rooms=frozenset({"other"}))
    for sub in (a, b, c, d, every, lobby_only, elsewhere):
        sub.got.clear()
        sub.calls.clear()
    _publish_together(router, [("one", "lobby", a), ("two", "lobby", b), ("three", "lobby", None),
                               ("four", "lobby", a)])
    router.barrier()
    assert a.texts() == ["two", "three"]
    assert b.texts() == ["one", "three", "four"]
    for sub in (c, every, lobby_only):
        assert sub.texts() == ["one", "two", "three", "four"], sub
        assert len(sub.calls) == 1, sub
    assert c.calls[0] is every.calls[0] is lobby_only.calls[0]
    assert len(a.calls) == len(b.calls) == 1
    assert d.got == [] and elsewhere.got == []


def test_a_receiver_that_raises_mid_room_is_dropped_and_the_rest_get_the_commit(
        router: Router) -> None:
    """The shared-batch fan-out (a commit of several messages to one room) goes on past a
    receiver whose deliver raises: those after it get everything, it is dropped once."""
    first, broken, last = CountingSink("first"), CountingSink("broken"), CountingSink("last")
    for sub, nick in ((first, "ann"), (broken, "bob"), (last, "cid")):
        router.join(sub, nick=nick, host="box", via="tcp")
    broken.fail = True
    for sub in (first, last):
        sub.got.clear()
    _publish_together(router, [("one", "lobby", None), ("two", "lobby", None)])
    router.barrier()
    assert first.texts() == last.texts() == ["one", "two"]
    assert "bob" not in {u.nick for u in router.users()}
    broken.fail = False
    _publish_together(router, [("three", "lobby", None), ("four", "lobby", None)])
    router.barrier()
    assert last.texts() == ["one", "two", "three", "four"] and broken.texts() == []


def test_what_is_said_within_the_commit_pace_is_stored_and_fanned_out_at_once(
        store: Store) -> None:
    """Group commit: publishes that arrive less than ``commit_pace`` after a commit began
    gather and go out in one commit (one deliver each); a router that was quiet that long
    commits the next one at once."""
    pace = 0.5
    router = Router(store, node=store.node_id, host="box", nick="owner", key=OWN,
                    commit_pace=pace)
    router.start()
    try:
        sink = CountingSink("sink")
        router.join(sink, nick="ann", host="box", via="tcp")
        sink.calls.clear()
        router.send(Draft(text="zero", nick="owner", host="box"), timeout=5.0)
        t0 = time.monotonic()
        for text in ("one", "two", "three"):  # three hand-offs, as from three clients
            router.publish(Draft(text=text, nick="owner", host="box"))
        wait_for("the three", lambda: len(sink.texts()) == 4, timeout=5.0)
        took = time.monotonic() - t0
        assert [[e.item.text for e in call] for call in sink.calls] == [
            ["zero"], ["one", "two", "three"]]
        assert 0.3 <= took <= 3.0, took
        time.sleep(pace + 0.1)  # quiet for longer than the pace: the next goes at once
        t1 = time.monotonic()
        router.send(Draft(text="four", nick="owner", host="box"), timeout=5.0)
        assert time.monotonic() - t1 < pace - 0.1
    finally:
        router.close()


def test_a_full_batch_does_not_wait_for_the_commit_pace(store: Store) -> None:
    """MAX_COMMIT_BATCH publishes gathered are a whole commit: the router takes them at
    once instead of waiting out the rest of the pace (here far longer than the test)."""
    router = Router(store, node=store.node_id, host="box", nick="owner", key=OWN,
                    commit_pace=30.0)
    router.start()
    try:
        sink = CountingSink("sink")
        router.join(sink, nick="ann", host="box", via="tcp")
        router.send(Draft(text="zero", nick="owner", host="box"), timeout=5.0)  # pace begins
        router.publish(Draft(text="first", nick="owner", host="box"))  # gathers...
        time.sleep(0.2)
        router.publish_many([Draft(text=f"m{i}", nick="owner", host="box")
                             for i in range(MAX_COMMIT_BATCH)])  # ...and fills the batch
        wait_for("a full batch", lambda: len(sink.texts()) >= 1 + MAX_COMMIT_BATCH,
                 timeout=10.0)
        assert sink.texts()[:3] == ["zero", "first", "m0"]
    finally:
        router.close()


def test_a_commit_to_two_rooms_reaches_each_room_with_its_own(router: Router) -> None:
    """The same commit with a second room in it: each member gets its room's part only."""
    a, b, d = CountingSink("a"), CountingSink("b"), CountingSink("d")
    every = CountingSink("every")
    router.join(a, nick="ann", host="box", via="tcp")
    router.join(b, nick="bob", host="box", via="tcp")
    router.join(d, nick="dan", host="box", via="tcp", room="other")
    router.subscribe(every)
    for sub in (a, b, d, every):
        sub.got.clear()
    _publish_together(router, [("one", "lobby", a), ("elsewhere", "other", d),
                               ("two", "lobby", None)])
    router.barrier()
    assert a.texts() == ["two"]
    assert b.texts() == ["one", "two"]
    assert d.got == []
    assert every.texts() == ["one", "elsewhere", "two"]
