"""LightThread: the hub's per-connection reader thread, started and joined like a Thread."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from lanchat.lightthread import LightThread


def test_runs_its_target_and_is_joined() -> None:
    gate = threading.Event()
    ran: list[str] = []

    def target() -> None:
        gate.wait(5)
        ran.append("done")

    t = LightThread(target, name="hub-c1")
    assert not t.is_alive()
    t.start()
    assert t.is_alive()
    t.join(0.05)  # times out: the target is still waiting
    assert t.is_alive() and ran == []
    gate.set()
    t.join(5)
    assert not t.is_alive() and ran == ["done"]
    assert "hub-c1" in repr(t)


def test_a_target_that_raises_is_reported_and_still_joined(monkeypatch: Any) -> None:
    reported: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))

    def target() -> None:
        raise ValueError("a bug in a reader")

    t = LightThread(target, name="hub-c2")
    t.start()
    t.join(5)
    assert not t.is_alive()
    deadline = time.monotonic() + 5
    while not reported and time.monotonic() < deadline:  # reported just after the release
        time.sleep(0.01)
    assert [str(e) for e in reported] == ["a bug in a reader"]


def test_join_with_a_timeout_is_bounded() -> None:
    stop = threading.Event()
    t = LightThread(lambda: stop.wait(60), name="hub-c3")
    t.start()
    started = time.monotonic()
    t.join(0.1)
    # far above the 0.1 s asked for (a loaded runner), far below the thread's 60 s
    assert time.monotonic() - started < 10
    stop.set()
    t.join(5)
    assert not t.is_alive()
