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
from typing import Any, NoReturn, TypeVar

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
    is a command the daemon runs under (it must exec the daemon, so that ``proc`` is it);
    ``pass_fds`` are descriptors of ours that it inherits (for a socket-activation prefix).
    ``nick`` and ``max_rate`` become ``--nick`` and ``--max-rate``; None leaves the flag
    out, so that the configuration file decides (a flag outranks the file, also on SIGHUP).
    """

    def __init__(self, workdir: str, *extra: str, nick: str | None = "owner",
                 max_rate: float | None = 0, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> None:
        self.workdir = workdir
        self.state_dir = os.path.join(workdir, "state")
        self.socket = os.path.join(workdir, "control.sock")
        self.stderr_path = os.path.join(workdir, f"lanchatd-{id(self)}.err")
        self.extra = list(extra)
        self.prefix = list(prefix)
        self.pass_fds = tuple(pass_fds)
        self.nick = nick
        self.max_rate = max_rate
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.requested_port = 0

    def argv(self) -> list[str]:
        """The daemon's command line (without ``prefix``): add ``--check-config`` to check it."""
        return [*lanchatd_cmd(), "--port", str(self.requested_port), "--bind", "127.0.0.1",
                "--no-discovery", "--state-dir", self.state_dir, "--socket", self.socket,
                *(["--nick", self.nick] if self.nick is not None else []),
                *(["--max-rate", f"{self.max_rate:g}"] if self.max_rate is not None else []),
                *self.extra]

    def start(self, timeout: float = 15.0) -> Daemon:
        cmd = [*self.prefix, *self.argv()]
        offset = len(self.stderr())  # a restart appends: only trust what it writes
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=self.env,
                                         cwd=self.workdir, pass_fds=self.pass_fds)
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

#: How long a test waits for something that should follow promptly (a message to arrive, a
#: roster or a line to reach a client) before failing.  Generous, because a loaded two-core
#: runner can stall a process for seconds; a wait returns as soon as its condition holds,
#: so a passing test does not pay for it.  Where a time bound is itself the behaviour under
#: test, the test names that bound instead.
SETTLE_S = 15.0


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
            raise AssertionError(f"{what}: not within {timeout:.1f} s (last: {last!r})"
                                 + (f"\n{diag()}" if diag else ""))
        time.sleep(poll)


def wait_within(what: str, fn: Callable[[], object], bound: float, since: float, *,
                poll: float = 0.05, diag: Callable[[], str] | None = None) -> float:
    """Wait for ``fn`` where the time it takes is the behaviour under test: it must hold
    within ``bound`` seconds of ``since`` (a ``time.monotonic()`` reading), also when the
    poll that saw it began in time but ended late, or when what came before (say, a
    peer's own shutdown) used the time up.  Returns the seconds it took."""
    wait_for(what, fn, max(0.0, since + bound - time.monotonic()), poll=poll, diag=diag)
    took = time.monotonic() - since
    assert took <= bound, f"{what}: after {took:.2f} s, more than the {bound:g} s allowed"
    return took


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


def ci_strict() -> bool:
    """True when ``$CI`` says we run in CI, where every test must run: nothing may skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the calling test for ``reason``; under ``$CI``, fail it instead.

    For what a developer's machine may lack (root, a tool, a kernel feature): there a skip
    says so, but CI must run every test, and a silent skip would hide that something went
    untested.  ``scripts/test`` installs every tool the suite needs.
    """
    if ci_strict():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def require_tool(name: str, package: str, *also: str) -> str:
    """The path of program ``name`` (on PATH, else the first of ``also`` that exists); if it
    is missing, :func:`skip_or_fail` naming the Debian ``package`` that has it."""
    found = shutil.which(name) or next((p for p in also if os.access(p, os.X_OK)), None)
    if found is None:
        skip_or_fail(f"{name} is not installed (apt-get install {package}; scripts/test does)")
    return found


def unit_stop_timeout_s() -> float:
    """How long systemd lets lanchatd stop before it SIGKILLs it: ``TimeoutStopSec=`` of the
    system unit -- the documented bound on a clean shutdown."""
    text = (ROOT / "systemd" / "lanchatd.service").read_text()
    match = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert match, "systemd/lanchatd.service sets no TimeoutStopSec="
    return float(match.group(1))


#: The user the tests of "another user's control socket" run ``lanchat`` as (nobody).
NOBODY_UID = 65534


def python_as(uid: int) -> list[str]:
    """A command that runs a Python >= 3.11 as user and group ``uid``, with no supplementary
    groups (needs root).

    A Python that user may run as it is comes first (Debian's /usr/bin/python3, or ours).
    Where there is none -- ours may live under /root, which others may not enter -- ours
    runs with one capability, CAP_DAC_READ_SEARCH, made ambient so that it survives the
    exec: it may read and search any directory, and write nothing it could not anyway.
    Connecting to a Unix socket needs write permission on the socket, so a socket the user
    may not write to still refuses it, which is what these tests are about; and no test
    skips for want of an interpreter.
    """
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    for exe in ("/usr/bin/python3", sys.executable):
        try:
            r = subprocess.run([*drop, exe, "-c",
                                "import sys; assert sys.version_info >= (3, 11)"],
                               capture_output=True, timeout=20, check=False, cwd="/")
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return [*drop, exe]
    return [*drop, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
            sys.executable]


@contextlib.contextmanager
def lanchat_as(uid: int) -> Iterator[tuple[list[str], dict[str, str]]]:
    """``(command, env)`` that run ``lanchat`` as user ``uid`` (see :func:`python_as`).

    The command imports a copy of the package in a directory everyone may read (the
    checkout may be under /root); the copy is removed at the end.
    """
    tree = tempfile.mkdtemp(prefix="lc-pkg-", dir="/tmp")
    try:
        os.chmod(tree, 0o755)
        shutil.copytree(ROOT / "lanchat", os.path.join(tree, "lanchat"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": tree, "HOME": "/", "NO_COLOR": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        yield [*python_as(uid), "-m", "lanchat"], env
    finally:
        shutil.rmtree(tree, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[str]:
    path = short_tmpdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(workdir: str) -> Iterator[Any]:
    """Factory: ``make_daemon(*flags, nick=..., max_rate=...)`` returns a started Daemon."""
    started: list[Daemon] = []

    def make(*extra: str, nick: str | None = "owner", max_rate: float | None = 0,
             subdir: str | None = None, env: dict[str, str] | None = None,
             prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> Daemon:
        where = os.path.join(workdir, subdir) if subdir else workdir
        os.makedirs(where, exist_ok=True)
        daemon = Daemon(where, *extra, nick=nick, max_rate=max_rate, env=env, prefix=prefix,
                        pass_fds=pass_fds)
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


@pytest.fixture
def connects() -> Iterator[list[Any]]:
    """Collects client subprocesses (``test_connect.Connect`` and the like: anything with
    ``kill()``) and kills them at the end of the test."""
    made: list[Any] = []
    try:
        yield made
    finally:
        for c in made:
            c.kill()


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


@pytest.fixture(autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> str:
    """``$XDG_STATE_HOME`` of this test alone: ``lanchat connect`` pins hub keys in
    ``$XDG_STATE_HOME/lanchat/known_hubs``, and a port that another test's hub used before
    (with another key) must not look like a changed key -- nor may a test touch the
    user's own file."""
    path = str(tmp_path_factory.mktemp("xdg-state"))
    monkeypatch.setenv("XDG_STATE_HOME", path)
    return path
