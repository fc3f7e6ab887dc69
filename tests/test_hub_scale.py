"""The hub at scale: crowds of text clients of a real daemon, over real sockets.

A big room stays calm: joins and leaves in a room above limits.BIG_ROOM_OVER are summed
up (``* m7 and 36 others joined #lobby``), a welcome names only a few members and counts
the rest, and nobody is cut off for not keeping up with a flood of notices about everyone
else.  Connections cost no thread: a daemon holding 5,000 runs as many threads as one
holding one.  The clients are one non-blocking ``selectors`` loop in this process (no
thread per client); every loop is bounded in time.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from lanchat.limits import BIG_ROOM_OVER, PRESENCE_BATCH_S, WELCOME_MAX_NAMES

MEMBERS = 500
#: Connections being set up at once (the hub's accept backlog is finite).
MAX_CONNECTING = 100
ROOM_SETTLE_S = 90.0
PROBE_S = 30.0

NOTICE_RE = re.compile(r"^\* (\S+)(?: and ([\d,]+) others?)? (joined|left) #lobby")
WELCOME_RE = re.compile(r"^\* Welcome, (\S+)! You are in #lobby with (.*)\. Type /help")


@dataclass(eq=False)
class Member:
    """One text client: what it has read, sorted by kind."""

    nick: str
    sock: socket.socket
    buf: bytes = b""
    welcome: str | None = None
    joined_lines: int = 0
    joined_people: int = 0
    left_lines: int = 0
    left_people: int = 0
    errors: list[str] = field(default_factory=list)
    probes: int = 0
    eof: bool = False

    def take(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            m = NOTICE_RE.match(line)
            if m:
                people = 1 + int((m.group(2) or "0").replace(",", ""))
                if m.group(3) == "joined":
                    self.joined_lines += 1
                    self.joined_people += people
                else:
                    self.left_lines += 1
                    self.left_people += people
            elif line.startswith("* Welcome,"):
                self.welcome = line
            elif line.startswith("! "):
                self.errors.append(line)
            elif "big-room-probe" in line:
                self.probes += 1


class Crowd:
    """Text clients driven by one selector loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.members: list[Member] = []

    def close(self) -> None:
        for m in self.members:
            with contextlib.suppress(OSError):
                m.sock.close()
        self.sel.close()

    def drop(self, m: Member) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(m.sock)
        m.sock.close()
        self.members.remove(m)

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            m: Member = key.data
            try:
                data = m.sock.recv(262_144)
            except BlockingIOError:
                continue
            except OSError as exc:
                m.errors.append(f"recv: {exc}")
                data = b""
            if not data:
                m.eof = True
                self.sel.unregister(m.sock)
                continue
            m.take(data)

    def pump_until(self, what: str | Callable[[], str], done: Callable[[], bool],
                   timeout: float) -> float:
        """Read until ``done()``; the seconds it took (fails after ``timeout``)."""
        start = time.monotonic()
        deadline = start + timeout
        while not done():
            if time.monotonic() > deadline:
                pytest.fail(f"{what() if callable(what) else what}: not within {timeout:g} s")
            self.pump(0.05)
        return time.monotonic() - start

    def join(self, n: int) -> None:
        """Connect ``n`` clients (at most MAX_CONNECTING unwelcomed at once), each naming itself."""
        deadline = time.monotonic() + ROOM_SETTLE_S
        while len(self.members) < n:
            if time.monotonic() > deadline:
                pytest.fail(f"only {len(self.members)} of {n} connected in {ROOM_SETTLE_S:g} s")
            waiting = sum(1 for m in self.members if m.welcome is None)
            for _ in range(min(MAX_CONNECTING - waiting, n - len(self.members))):
                nick = f"m{len(self.members)}"
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                sock.sendall(f"{nick}\n".encode())
                sock.setblocking(False)
                m = Member(nick, sock)
                self.members.append(m)
                self.sel.register(sock, selectors.EVENT_READ, m)
            self.pump(0.05)


@pytest.fixture
def crowd(make_daemon: Any) -> Iterator[tuple[Any, Crowd]]:
    # 5,000 sockets on each side: raise our soft limit (the daemon inherits it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon = make_daemon(env={"LANCHAT_MAX_CONNECTIONS_PER_IP": "0",
                              "LANCHAT_MAX_CONNECTIONS": "6000"})
    c = Crowd(daemon.port)
    try:
        yield daemon, c
    finally:
        c.close()


def test_a_room_of_500_settles_calmly_and_nobody_is_cut(crowd: tuple[Any, Crowd]) -> None:
    daemon, c = crowd
    started = time.monotonic()
    c.join(MEMBERS)
    welcomed_s = c.pump_until("every member welcomed",
                              lambda: all(m.welcome for m in c.members), ROOM_SETTLE_S)
    join_s = time.monotonic() - started
    # The member who joined first (its welcome names only the daemon's own user).
    first = min(c.members, key=lambda m: len(m.welcome or ""))
    # Everyone who came after the first member is announced to it, summed up: the count
    # is exact, the lines are few -- one per PRESENCE_BATCH_S once the room is big.
    settle_s = c.pump_until(lambda: f"the first member told of all 499 others (so far "
                            f"{first.joined_people} in {first.joined_lines} lines)",
                            lambda: first.joined_people >= MEMBERS - 1, ROOM_SETTLE_S)
    allowed = BIG_ROOM_OVER + math.ceil((join_s + settle_s) / PRESENCE_BATCH_S) + 2
    assert first.joined_people == MEMBERS - 1
    assert first.joined_lines <= allowed, (first.joined_lines, allowed, join_s)
    # A welcome names a few members and counts the rest; the last to join was told of
    # everyone (the daemon's own user and the 499 others).
    totals = []
    for member in c.members:
        assert member.welcome is not None
        m = WELCOME_RE.match(member.welcome)
        assert m, member.welcome
        named, _, rest = m.group(2).partition(" and ")
        assert len(named.split(", ")) <= WELCOME_MAX_NAMES, member.welcome
        others = int(rest.split()[0].replace(",", "")) if rest else 0
        totals.append(len(named.split(", ")) + others)
    assert max(totals) == MEMBERS
    # The room has settled: one message reaches every other member, and nobody was cut.
    first.sock.sendall(b"big-room-probe\n")
    probe_s = c.pump_until("the probe reached every member",
                           lambda: all(m.probes for m in c.members if m is not first),
                           PROBE_S)
    # 100 members hang up at once: the rest are told in a few summed-up lines.
    leavers = c.members[-100:]
    for gone in leavers:
        c.drop(gone)
    leave_s = c.pump_until("everyone told of the 100 who left",
                           lambda: all(m.left_people >= 100 for m in c.members), ROOM_SETTLE_S)
    assert all(m.left_people == 100 for m in c.members)
    assert max(m.left_lines for m in c.members) <= math.ceil(leave_s / PRESENCE_BATCH_S) + 2
    troubled = [(m.nick, m.errors, m.eof) for m in c.members if m.errors or m.eof]
    assert not troubled
    assert "cut off" not in daemon.stderr()
    print(f"\n500 members: joined in {join_s:.1f} s (all welcomed after {welcomed_s:.1f} s "
          f"more), first member settled {settle_s:.1f} s later with {first.joined_lines} join "
          f"lines; probe reached all in {probe_s:.2f} s; 100 leaves told in {leave_s:.1f} s "
          f"with at most {max(m.left_lines for m in c.members)} lines")


#: Connections of the idle test, and the threads the daemon may add for them: none are
#: needed (the hub's I/O loops serve them all); the slack is for threads that come and go
#: on their own (a link's, a control request's).
IDLE_CONNECTIONS = 5000
THREAD_SLACK = 3


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_5000_idle_connections_cost_no_thread_each(crowd: tuple[Any, Crowd]) -> None:
    daemon, c = crowd
    need = 2 * IDLE_CONNECTIONS + 200
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        pytest.fail(f"RLIMIT_NOFILE is {soft}; this test needs {need} descriptors")
    c.join(1)
    c.pump_until("the first member welcomed", lambda: bool(c.members[0].welcome), 30)
    before, rss_before = _threads(daemon.proc.pid), daemon.rss_kib()
    started = time.monotonic()
    c.join(IDLE_CONNECTIONS)
    c.pump_until("every member welcomed", lambda: all(m.welcome for m in c.members),
                 ROOM_SETTLE_S)
    join_s = time.monotonic() - started
    c.pump(1.0)  # idle now: a last summed-up notice, then nothing
    after, rss_after = _threads(daemon.proc.pid), daemon.rss_kib()
    per_conn = (rss_after - rss_before) * 1024 / (IDLE_CONNECTIONS - 1)
    print(f"\n{IDLE_CONNECTIONS} connections (joined in {join_s:.1f} s): threads {before} -> "
          f"{after}; RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB "
          f"({per_conn / 1024:.1f} KiB per connection)")
    assert after <= before + THREAD_SLACK, (before, after)
    troubled = [(m.nick, m.errors, m.eof) for m in c.members if m.errors or m.eof]
    assert not troubled[:5]
