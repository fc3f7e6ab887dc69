"""Shared fixtures: real daemons as subprocesses, real sockets on loopback.

Every daemon started here runs with ``--no-discovery`` on 127.0.0.1 and port 0;
every one is stopped (SIGTERM, then SIGKILL) when its test ends, pass or fail.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lanchat.errors import LanchatError

ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"listening on (\S+):(\d+)")


def lanchatd_cmd() -> list[str]:
    return [sys.executable, "-m", "lanchat.daemon"]


def lanchat_cmd() -> list[str]:
    return [sys.executable, "-m", "lanchat"]


def short_tmpdir() -> str:
    """A directory whose paths fit in a Unix socket address (108 bytes)."""
    return tempfile.mkdtemp(prefix="lc-", dir="/tmp")


class Daemon:
    """A lanchatd subprocess on 127.0.0.1 with discovery off.

    ``start()`` waits for its "listening on" line and reads the port from it.  ``prefix``
    is a command the daemon runs under (it must exec the daemon, so that ``proc`` is it).
    """

    def __init__(self, workdir: str, *extra: str, nick: str = "owner",
                 env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.state_dir = os.path.join(workdir, "state")
        self.socket = os.path.join(workdir, "control.sock")
        self.stderr_path = os.path.join(workdir, f"lanchatd-{id(self)}.err")
        self.extra = list(extra)
        self.prefix = list(prefix)
        self.nick = nick
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.requested_port = 0

    def start(self, timeout: float = 15.0) -> Daemon:
        cmd = [*self.prefix, *lanchatd_cmd(), "--port", str(self.requested_port),
               "--bind", "127.0.0.1", "--no-discovery", "--state-dir", self.state_dir,
               "--socket", self.socket, "--nick", self.nick, "--max-rate", "0", *self.extra]
        offset = len(self.stderr())  # a restart appends: only trust what it writes
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=self.env,
                                         cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY_RE.search(self.stderr()[offset:])
            if match and self.proc.poll() is None and os.path.exists(self.socket):
                self.port = int(match.group(2))
                self.requested_port = self.port  # a restart reuses the same port
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"lanchatd exited with {self.proc.returncode}:\n"
                                   f"{self.stderr()}")
            time.sleep(0.02)
        raise RuntimeError(f"lanchatd did not start in {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the daemon and wait for it; SIGKILL it if it does not exit in time."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.proc = None
        return proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def threads(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return 0

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 20.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run ``lanchat --socket <ours> ARGS`` and return the completed process."""
        return subprocess.run([*lanchat_cmd(), "--socket", self.socket, *args], input=input,
                              capture_output=True, timeout=timeout,
                              env=dict(os.environ, **(env or {})), check=False)


T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, *, poll: float = 0.05,
             diag: Callable[[], str] | None = None) -> T:
    """Poll ``fn`` until it returns something truthy; AssertionError (with ``diag()``) on timeout.

    An OSError, RuntimeError or LanchatError from ``fn`` counts as "not yet" (a daemon
    restarting); the last value or error is shown in the failure.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except (OSError, RuntimeError, LanchatError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})"
                                 + (f"\n{diag()}" if diag else ""))
        time.sleep(poll)


def assert_exactly_once_in_order(ids: list[str], expected: set[str], who: str = "") -> None:
    """Every expected message id once, nothing else, and each origin's seqs ascending."""
    where = f"{who}: " if who else ""
    counts = collections.Counter(ids)
    dups = [i for i, n in counts.items() if n > 1]
    assert not dups, f"{where}duplicated {dups[:10]}"
    assert set(ids) == expected, (f"{where}missing {sorted(expected - set(ids))[:10]}, "
                                  f"extra {sorted(set(ids) - expected)[:10]}")
    per_origin: dict[str, list[int]] = collections.defaultdict(list)
    for i in ids:
        origin, seq = i.split(":")
        per_origin[origin].append(int(seq))
    for origin, seqs in per_origin.items():
        assert seqs == sorted(seqs), f"{where}{origin} out of order"


def python_for_uid(uid: int) -> str | None:
    """A Python >= 3.11 that user ``uid`` may run (the venv under /root may be closed to it)."""
    for exe in ("/usr/bin/python3", sys.executable):
        try:
            r = subprocess.run([exe, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                               user=uid, capture_output=True, timeout=20, check=False, cwd="/")
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return exe
    return None


@pytest.fixture
def workdir() -> Iterator[str]:
    path = short_tmpdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(workdir: str) -> Iterator[Any]:
    """Factory: ``make_daemon(*flags, nick=...)`` returns a started :class:`Daemon`."""
    started: list[Daemon] = []

    def make(*extra: str, nick: str = "owner", subdir: str | None = None,
             env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> Daemon:
        where = os.path.join(workdir, subdir) if subdir else workdir
        os.makedirs(where, exist_ok=True)
        daemon = Daemon(where, *extra, nick=nick, env=env, prefix=prefix)
        started.append(daemon)
        return daemon.start()

    try:
        yield make
    finally:
        for daemon in started:
            daemon.stop()


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    return make_daemon()  # type: ignore[no-any-return]


def read_until(line: Callable[[float], str], predicate: Any, timeout: float, limit: int) -> str:
    """Read lines with ``line(timeout)`` until one satisfies ``predicate`` (substring or callable).

    Bounded twice: by ``timeout`` seconds in all and by ``limit`` lines.
    """
    check = predicate if callable(predicate) else (lambda s: predicate in s)
    deadline = time.monotonic() + timeout
    for _ in range(limit):
        got = line(max(0.01, deadline - time.monotonic()))
        if check(got):
            return got
    raise AssertionError(f"no matching line in {limit} lines")


class LineClient:
    """A TCP client of the hub that reads lines with a timeout (what ``nc`` shows).

    ``rcvbuf`` sets a small receive buffer before connecting (a client that stops
    reading then fills its side quickly).
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0,
                 rcvbuf: int | None = None) -> None:
        if rcvbuf is None:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                self.sock.settimeout(timeout)
                self.sock.connect((host, port))
            except BaseException:
                self.sock.close()
                raise
        self.timeout = timeout
        self._partial = b""
        self._lines: collections.deque[bytes] = collections.deque()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self, timeout: float | None = None) -> str:
        """The next line, without its newline; raises TimeoutError if none arrives."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self._lines:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line within the timeout; buffered {self._partial[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(262144)
            except TimeoutError:
                continue
            if not data:
                raise EOFError(f"connection closed; buffered {self._partial[:200]!r}")
            *complete, self._partial = (self._partial + data).split(b"\n")
            self._lines.extend(complete)
        return self._lines.popleft().decode("utf-8", "replace")

    def until(self, predicate: Any, timeout: float | None = None, limit: int = 10_000) -> str:
        """Read lines until one satisfies ``predicate`` (a substring or a callable)."""
        return read_until(self.line, predicate, timeout or self.timeout, limit)

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (draining what is left)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.line(max(0.01, deadline - time.monotonic()))
            except EOFError:
                return True
            except (TimeoutError, ConnectionResetError):
                if time.monotonic() >= deadline:
                    return False
        return False

    def close(self) -> None:
        self.sock.close()


class TextUser(LineClient):
    """A text-mode user who has chosen a nickname."""

    def __init__(self, port: int, nick: str, **kw: Any) -> None:
        super().__init__(port, **kw)
        assert "welcome" in self.line().lower()
        assert "nickname" in self.line().lower()
        self.send(nick + "\n")
        self.welcome = self.line()
        self.nick = nick


@pytest.fixture
def clients() -> Iterator[list[LineClient]]:
    """Collects clients and closes them at the end of the test."""
    made: list[LineClient] = []
    try:
        yield made
    finally:
        for c in made:
            with contextlib.suppress(OSError):
                c.close()


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Every thread a test starts in this process must be gone when it ends."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not extra, f"threads leaked by this test: {[t.name for t in extra]}"
