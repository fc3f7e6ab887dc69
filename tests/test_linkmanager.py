"""The link manager in this process, against a rogue peer and a fake router.

What a link must survive on our side: a router that cannot attach it in time (no ghost link
left registered but not running), and any exception at all on a dialer's thread (the static
peer is dialed again, never dropped for good).  (Issue 13, case 10.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from conftest import wait_for
from rogue import Feed, RogueListener

from lanchat.errors import RouterTimeout
from lanchat.feed import Entry, PublicKey, RunResult, SigningKey, StoredEntry
from lanchat.limits import RUNS_IN_FLIGHT, RUNS_IN_FLIGHT_BYTES
from lanchat.links import Identity, LinkManager
from lanchat.presence import NodeRoster

ME_KEY = SigningKey(b"\x11" * 32)
ME = ME_KEY.node


class FakeRouter:
    """The router as links see it (LinkRouter); ``fail_attach``/``fail_cursors`` count
    down the calls that fail."""

    node = ME

    def __init__(self) -> None:
        self.attached: list[Any] = []
        self.detached: list[Any] = []
        self.fail_attach = 0
        self.fail_cursors = 0

    def attach_link(self, link: Any) -> None:
        if self.fail_attach:
            self.fail_attach -= 1
            raise RouterTimeout("the router did not answer within 30 s")
        self.attached.append(link)

    def detach_link(self, link: Any) -> None:
        self.detached.append(link)

    key: SigningKey | None = None

    def submit_run(self, run: Sequence[Entry], key: PublicKey, *, floor: bool = False,
                   source: object | None) -> Future[RunResult]:
        done: Future[RunResult] = Future()
        done.set_result(RunResult(list(run)))
        return done

    def forked(self) -> dict[str, int]:
        return {}

    def apply_roster(self, roster: NodeRoster, *, source: Any) -> None:
        pass

    def withdraw_roster(self, node: str, ver: int, *, source: Any) -> None:
        pass

    def cursors(self) -> dict[str, int]:
        if self.fail_cursors:
            self.fail_cursors -= 1
            raise RuntimeError("a bug nobody foresaw")
        return {}

    def heads(self) -> dict[str, tuple[int, str]]:
        return {}



class NoHistory:
    def entries_after(self, origin: str, seq: int, limit: int) -> list[StoredEntry]:
        return []

    def feed_key(self, origin: str) -> bytes | None:
        return None


@pytest.fixture
def rogue_peer() -> Iterator[RogueListener]:
    listener = RogueListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def manager_for(rogue_peer: RogueListener) -> Iterator[Any]:
    made: list[LinkManager] = []

    def make(router: FakeRouter) -> LinkManager:
        m = LinkManager(router, NoHistory(), Identity(ME, "me", "myhost", None, key=ME_KEY),
                        static_peers=[("127.0.0.1", rogue_peer.port)])
        made.append(m)
        m.start()
        return m

    try:
        yield make
    finally:
        for m in made:
            m.close(timeout=5.0)


def state(manager: LinkManager, node: str) -> str | None:
    return next((p["state"] for p in manager.peers() if p["node"] == node), None)


def test_a_link_the_router_cannot_attach_is_closed_and_forgotten(
        rogue_peer: RogueListener, manager_for: Any) -> None:
    router = FakeRouter()
    router.fail_attach = 1
    manager = manager_for(router)
    first = rogue_peer.accept()
    first.answer()
    assert first.closed(5.0), "a link that could not be attached must be closed"
    assert not manager.linked(first.node)
    assert state(manager, first.node) != "linked"
    # Not a ghost: the dialer tries again, and this time the link is attached and runs.
    second = rogue_peer.accept(timeout=10.0)
    second.answer()
    wait_for("linked on the second try", lambda: manager.linked(second.node), 5.0)
    second.ping()
    second.until("pong", 5.0)
    assert state(manager, second.node) == "linked"
    # The one that failed was detached again: a late attach on the router thread is undone.
    assert len(router.attached) == 1 and len(router.detached) == 1
    assert router.detached[0] is not router.attached[0]


def test_a_dialer_survives_an_exception_nobody_foresaw(rogue_peer: RogueListener,
                                                       manager_for: Any) -> None:
    router = FakeRouter()
    router.fail_cursors = 1  # the first link's reader hits a bug at once
    manager = manager_for(router)
    first = rogue_peer.accept()
    first.answer()
    assert first.closed(5.0)
    second = rogue_peer.accept(timeout=10.0)  # the static peer is dialed again
    second.answer()
    wait_for("linked again", lambda: manager.linked(second.node), 5.0)


class SlowRouter(FakeRouter):
    """A router that takes runs but answers none until told: what a link holds meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[Future[RunResult], Sequence[Entry]]] = []

    def submit_run(self, run: Sequence[Entry], key: PublicKey, *, floor: bool = False,
                   source: object | None) -> Future[RunResult]:
        done: Future[RunResult] = Future()
        self.waiting.append((done, run))
        return done

    def answer_all(self) -> None:
        for done, run in list(self.waiting):
            if not done.done():
                done.set_result(RunResult(list(run)))


def test_a_link_holds_a_bounded_number_of_bytes_of_runs_in_flight(
        rogue_peer: RogueListener, manager_for: Any) -> None:
    """A link hands runs to the router without waiting for each answer (a catch-up's runs
    are stored together), but only up to RUNS_IN_FLIGHT runs *and* RUNS_IN_FLIGHT_BYTES of
    entries: a peer sending runs of big entries cannot park megabytes in a link's memory."""
    router = SlowRouter()
    manager_for(router)
    peer = rogue_peer.accept()
    peer.answer()
    wait_for("linked", lambda: router.attached, 5.0)
    text = "x" * 3000  # ~3.3 KiB a body, ~210 KiB a run of 64
    runs = 20
    frames = [[peer.message(r * 64 + i + 1, text) for i in range(64)] for r in range(runs)]
    # The link stops reading while it waits: the peer's sends block, so they go from a thread.
    sender = threading.Thread(target=lambda: [peer.msgs(f) for f in frames], name="rogue-send")
    sender.start()
    try:
        per_run = sum(len(e.body) for e in _entries(64, text))
        most = RUNS_IN_FLIGHT_BYTES // per_run + 2  # within the bytes, and the one over them
        wait_for("the link waits for answers", lambda: len(router.waiting) >= most - 1, 10.0)
        time.sleep(0.5)  # it would hand over more now if it were going to
        assert len(router.waiting) <= most, (len(router.waiting), most)
        assert len(router.waiting) < RUNS_IN_FLIGHT  # the bytes stopped it, not the count
        for _ in range(4 * runs):  # each answer frees room for the next
            router.answer_all()
            if len(router.waiting) == runs:
                break
            time.sleep(0.05)
        assert len(router.waiting) == runs
    finally:
        for _ in range(100):
            router.answer_all()
            if not sender.is_alive():
                break
            sender.join(0.1)
        router.answer_all()


def _entries(n: int, text: str) -> list[Entry]:
    """``n`` entries shaped like the rogue's (for their sizes)."""
    feed = Feed(SigningKey(b"\x22" * 32))
    return [Entry.from_wire(feed.entry(i + 1, text)) for i in range(n)]
