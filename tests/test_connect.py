"""``lanchat connect``: a real ``lanchat connect`` subprocess, driven through pipes, against a
real lanchatd on 127.0.0.1 (discovery off), next to text-mode users.

The no-host path (mDNS) is never run here: it would browse this machine's own interfaces.
Only its selection logic is tested, with a fake list of hubs.
"""

from __future__ import annotations

import contextlib
import os
import pty
import pwd
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import Daemon, TextUser, lanchat_cmd, read_until

from lanchat import hubclient
from lanchat.commands import Join, ListUsers, Nick, Ping, Quit, Say
from lanchat.framing import loads_line

MESSAGE_RE = re.compile(r"^\[\d\d:\d\d:\d\d\] (\S+): (.*)$")

#: How the lines of ``lanchat connect``'s note at first contact with a hub begin.
FIRST_CONTACT_LINES = ("first contact with hub ", "  fingerprint ", "Its key is now pinned")


def without_first_contact(err: bytes) -> bytes:
    """``err`` without the note ``lanchat connect`` prints at first contact with a hub."""
    return b"".join(line for line in err.splitlines(keepends=True)
                    if not line.decode("utf-8", "replace").startswith(FIRST_CONTACT_LINES))


class Connect:
    """``lanchat connect ARGS`` as a subprocess; stdin a pipe, stdout/stderr read by lines."""

    def __init__(self, *args: str, timeout: float = 5.0) -> None:
        self.proc = subprocess.Popen([*lanchat_cmd(), "connect", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.timeout = timeout
        self._bufs: dict[int, bytes] = {}

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def eof(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def _line(self, stream: Any, timeout: float | None) -> str:
        fd = stream.fileno()
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self._bufs.get(fd, b""):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line; buffered {self._bufs.get(fd, b'')[:300]!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise EOFError(f"stream closed; buffered {self._bufs.get(fd, b'')!r}")
                self._bufs[fd] = self._bufs.get(fd, b"") + data
        line, _, rest = self._bufs[fd].partition(b"\n")
        self._bufs[fd] = rest
        return line.decode("utf-8", "replace")

    def line(self, timeout: float | None = None) -> str:
        return self._line(self.proc.stdout, timeout)

    def err_line(self, timeout: float | None = None) -> str:
        """The next line on stderr that is not the note about a hub met for the first time
        (its fingerprint; :func:`test_connect_pins_the_hub_key_and_refuses_a_changed_one`
        reads that one)."""
        for _ in range(len(FIRST_CONTACT_LINES) + 1):
            line = self._line(self.proc.stderr, timeout)
            if not line.startswith(FIRST_CONTACT_LINES):
                return line
        raise AssertionError("more first-contact lines than the note has")

    def raw_err_line(self, timeout: float | None = None) -> str:
        return self._line(self.proc.stderr, timeout)

    def until(self, predicate: Any, timeout: float | None = None, limit: int = 1000) -> str:
        return read_until(self.line, predicate, timeout or self.timeout, limit)

    def finish(self, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
        """Close stdin, wait for the exit; return (status, rest of stdout, rest of stderr)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        open_fds = [self.proc.stdout.fileno(), self.proc.stderr.fileno()]
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"lanchat connect still running; {self._bufs!r}")
            ready, _, _ = select.select(open_fds, [], [], remaining)
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    self._bufs[fd] = self._bufs.get(fd, b"") + data
                else:
                    open_fds.remove(fd)
        status = self.proc.wait(max(0.1, deadline - time.monotonic()))
        err = self._bufs.pop(self.proc.stderr.fileno(), b"")
        return (status, self._bufs.pop(self.proc.stdout.fileno(), b""),
                without_first_contact(err))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


def connect(daemon: Daemon, connects: list[Connect], *args: str) -> Connect:
    c = Connect(f"127.0.0.1:{daemon.port}", *args)
    connects.append(c)
    return c


def joined(daemon: Daemon, connects: list[Connect], nick: str, *args: str) -> Connect:
    c = connect(daemon, connects, "--nick", nick, *args)
    welcome = c.line()
    assert welcome.startswith("* Connected to ") and f" as {nick}, in #lobby" in welcome
    return c


# -- end to end ---------------------------------------------------------------------------------

def test_chat_both_ways_with_a_text_user(daemon: Daemon, clients: list[Any],
                                         connects: list[Connect]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    bob = connect(daemon, connects, "--nick", "bob")
    welcome = bob.line()
    assert welcome == (f"* Connected to owner on {socket.gethostname().split('.')[0]} "
                       f"(127.0.0.1:{daemon.port}) as bob, in #lobby with owner, alice. "
                       "Type /help for commands, /quit to leave.")
    assert alice.line() == "* bob joined #lobby"
    bob.type("hello alice")
    assert alice.line().endswith("] bob: hello alice")
    alice.send("hi bob\n")
    m = MESSAGE_RE.match(bob.line())
    assert m and m.groups() == ("alice", "hi bob")
    bob.type("/me waves")
    assert alice.line().endswith("] * bob waves")
    bob.type("//slash")
    assert alice.line().endswith("] bob: /slash")
    bob.type("/msg alice psst")
    assert alice.line().endswith("] bob -> alice: psst")
    # the history holds what the hub client said
    history = daemon.cli("history").stdout.decode()
    assert "bob: hello alice" in history


def test_nick_join_users(daemon: Daemon, clients: list[Any], connects: list[Connect]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    bob = joined(daemon, connects, "bob")
    alice.line()  # bob joined
    bob.type("/users")
    assert bob.line() == "* In #lobby (3): owner, alice (plain), bob"
    bob.type("/nick robert")
    assert bob.line() == "* You are now known as robert"
    assert alice.line() == "* bob is now known as robert"
    bob.type("/nick alice")
    assert "taken" in bob.err_line()
    bob.type("/join dev")
    assert bob.line() == "* You are now in #dev"
    assert alice.line() == "* robert left #lobby (moved to #dev)"
    bob.type("/users")
    assert bob.line() == "* In #dev (2): owner, robert"
    alice.send("/join dev\n")
    alice.line()
    assert bob.line() == "* alice joined #dev"
    bob.type("in dev")
    assert alice.line().endswith("robert: in dev")
    bob.type("/frobnicate")
    assert bob.err_line() == "! unknown command /frobnicate -- type /help"
    bob.type("/help")
    assert bob.line() == "Commands:"
    bob.until("/quit")


def test_quit_exits_0_and_others_see_it(daemon: Daemon, clients: list[Any],
                                        connects: list[Connect]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    bob = joined(daemon, connects, "bob")
    alice.line()
    bob.type("/quit")
    status, _, err = bob.finish()
    assert status == 0 and err == b""
    assert alice.line() == "* bob left #lobby (quit)"


def test_quit_reason_reaches_the_others(daemon: Daemon, clients: list[Any],
                                        connects: list[Connect]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    bob = joined(daemon, connects, "bob")
    alice.line()
    bob.type("/quit off to lunch")
    assert bob.finish()[0] == 0
    assert alice.line() == "* bob left #lobby (off to lunch)"


def test_eof_on_stdin_exits_0_and_others_see_left(daemon: Daemon, clients: list[Any],
                                                  connects: list[Connect]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    bob = joined(daemon, connects, "bob")
    alice.line()
    bob.type("last words")
    bob.eof()
    status, _, err = bob.finish()
    assert status == 0 and err == b""
    assert alice.line().endswith("bob: last words")  # nothing typed is lost at EOF
    assert alice.line() == "* bob left #lobby (quit)"


def test_daemon_stopped_under_it_exits_1_with_a_clear_message(
        daemon: Daemon, connects: list[Connect]) -> None:
    bob = joined(daemon, connects, "bob")
    assert daemon.stop() == 0
    status, _, err = bob.finish()
    assert status == 1
    lines = err.decode().splitlines()
    assert lines[-1] == f"lanchat: connection to 127.0.0.1:{daemon.port} closed by the server"
    assert "Traceback" not in err.decode()


def test_nick_taken_exits_1(daemon: Daemon, clients: list[Any], connects: list[Connect]) -> None:
    clients.append(TextUser(daemon.port, "alice"))
    c = connect(daemon, connects, "--nick", "Alice")  # nicks are unique regardless of case
    status, out, err = c.finish()
    assert status == 1 and out == b""
    assert err.decode() == (f"lanchat: the nick Alice is taken on 127.0.0.1:{daemon.port}; "
                            "choose another with --nick\n")


def test_bad_nick_is_a_usage_error(daemon: Daemon, connects: list[Connect]) -> None:
    c = connect(daemon, connects, "--nick", "bad nick")
    status, out, err = c.finish()
    assert status == 2 and out == b""
    assert err.decode().startswith("lanchat: nick must be printable characters without spaces")
    assert "Traceback" not in err.decode()


def test_nothing_listening_exits_1(connects: list[Connect]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Connect(f"127.0.0.1:{port}", "--nick", "bob")
    connects.append(c)
    status, _, err = c.finish()
    assert status == 1
    assert err.decode() == f"lanchat: cannot connect to 127.0.0.1:{port}: Connection refused\n"


def test_ctrl_c_exits_130_quietly(daemon: Daemon, clients: list[Any],
                                  connects: list[Connect]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    bob = joined(daemon, connects, "bob")
    alice.line()
    bob.proc.send_signal(signal.SIGINT)
    status, _, err = bob.finish()
    assert status == 130 and err == b""
    assert alice.line().startswith("* bob left #lobby")


def test_escape_sequences_from_others_are_neutralised(daemon: Daemon, clients: list[Any],
                                                      connects: list[Connect]) -> None:
    bob = joined(daemon, connects, "bob")
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    assert bob.line() == "* alice joined #lobby"
    alice.send("title \x1b]0;pwned\x07 clear \x1b[2J bidi \u202e done\n")
    line = bob.line()
    assert line.endswith("alice: title ^[]0;pwned^G clear ^[[2J bidi \\u202e done")
    # a JSON user can pick a hostile nick-free text with newlines: no line may pose as another
    j = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    try:
        j.sendall(b'{"type":"hello","v":1,"nick":"jay"}\n')
        assert bob.line() == "* jay joined #lobby"
        j.sendall(b'{"type":"say","text":"one\\n[12:00:00] bob: fake\\u001b[31m"}\n')
        assert bob.line().endswith("jay: one")
        assert bob.line() == "  [12:00:00] bob: fake^[[31m"
    finally:
        j.close()
    status, out, _ = bob.finish()
    assert status == 0 and b"\x1b" not in out and b"\x07" not in out


def test_udp_chat_both_ways(daemon: Daemon, clients: list[Any], connects: list[Connect]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    bob = connect(daemon, connects, "--nick", "bob", "--udp")
    assert bob.line().startswith("* Welcome, bob! You are in #lobby with owner, alice.")
    assert alice.line() == "* bob joined #lobby"
    bob.type("over udp")
    assert alice.line().endswith("] bob: over udp")
    alice.send("back \x1b[2J over tcp\n")
    assert bob.line().endswith("] alice: back ^[[2J over tcp")
    bob.type("/users")
    assert bob.line() == "* In #lobby (3): owner, alice (plain), bob (plain)"
    bob.type("/quit")
    status, _, err = bob.finish()
    assert status == 0 and err == b""
    assert alice.line() == "* bob left #lobby (quit)"


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_a_terminal_sees_one_help_banner(daemon: Daemon, udp: bool) -> None:
    """On a terminal, ``connect`` said "Type /help" twice: its own hint (on stderr) and the
    welcome line (on stdout), overlapping.  Only the welcome says it now."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*lanchat_cmd(), "connect", f"127.0.0.1:{daemon.port}",
                             "--nick", "bob", *(["--udp"] if udp else [])],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        os.write(master, b"/quit\n")  # waits in the terminal until the client reads it
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
        os.close(master)
    assert proc.returncode == 0, err
    shown = out.decode() + err.decode()
    assert shown.count("/help") == 1, shown
    assert "Welcome, bob!" in shown or "as bob, in #lobby" in shown


def test_default_nick_without_user_is_the_login_name(daemon: Daemon) -> None:
    """With no $USER or $LOGNAME (root in a bare shell) the nick was ``user``."""
    login = pwd.getpwuid(os.getuid()).pw_name
    env = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME")}
    proc = subprocess.run([*lanchat_cmd(), "connect", f"127.0.0.1:{daemon.port}"],
                          input=b"/quit\n", capture_output=True, env=env, timeout=20,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert f" as {login}, in #lobby" in proc.stdout.decode().splitlines()[0]


def test_udp_nick_taken_exits_1(daemon: Daemon, clients: list[Any],
                                connects: list[Connect]) -> None:
    clients.append(TextUser(daemon.port, "alice"))
    c = connect(daemon, connects, "--nick", "alice", "--udp")
    status, _, err = c.finish()
    assert status == 1
    assert err.decode() == (f"lanchat: the nick alice is taken on 127.0.0.1:{daemon.port}; "
                            "choose another with --nick\n")


# -- pure pieces --------------------------------------------------------------------------------

def test_parse_target() -> None:
    assert hubclient.parse_target("host") == ("host", 7654)
    assert hubclient.parse_target("host:99") == ("host", 99)
    assert hubclient.parse_target("[fe80::1%eth0]:5") == ("fe80::1%eth0", 5)
    assert hubclient.parse_target("[::1]") == ("::1", 7654)
    assert hubclient.parse_target("::1") == ("::1", 7654)
    for bad in ("host:0", "host:x", ":5", "[::1", "host:70000"):
        with pytest.raises(hubclient.ConnectError) as info:
            hubclient.parse_target(bad)
        assert info.value.status == 2
    assert hubclient.hostport("::1", 5) == "[::1]:5"


def test_encode_command_frames() -> None:
    def frame(cmd: Any) -> Any:
        data = hubclient.encode_command(cmd)
        assert data is not None and data.endswith(b"\n") and data.count(b"\n") == 1
        return loads_line(data[:-1])

    assert frame(Say("hi\nthere")) == {"type": "say", "text": "hi\nthere"}
    assert frame(Say("psst", to="bob")) == {"type": "say", "text": "psst", "to": "bob"}
    assert frame(Join("#Dev")) == {"type": "join", "room": "dev"}
    assert frame(Nick("zed")) == {"type": "nick", "nick": "zed"}
    assert frame(ListUsers()) == {"type": "users"}
    assert frame(Ping("x")) == {"type": "ping", "t": "x"}
    assert frame(Quit("lunch")) == {"type": "bye", "reason": "lunch"}
    assert loads_line(hubclient.encode_hello("bob")[:-1])["type"] == "hello"


@dataclass(frozen=True)
class FakeAd:
    name: str
    addresses: tuple[str, ...]
    port: int


def test_choose_hub_one_several_none() -> None:
    one = [FakeAd("alice on a", ("10.0.0.1",), 7654)]
    assert hubclient.choose_hub(one, None) == ("10.0.0.1", 7654)
    several = [FakeAd("alice on a", ("10.0.0.1",), 7654),
               FakeAd("bob \x1b[2J on b", ("fe80::2%eth0", "10.0.0.2"), 7000),
               FakeAd("no address", (), 1)]
    with pytest.raises(hubclient.ConnectError) as info:
        hubclient.choose_hub(several, None)  # stdin not a terminal: the list, exit 2
    assert info.value.status == 2
    assert str(info.value).splitlines()[1:] == ["  1. alice on a  10.0.0.1:7654",
                                                "  2. bob ^[[2J on b  [fe80::2%eth0]:7000"]
    prompts: list[str] = []
    answers = iter(["nine", "7", "2\n"])

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    assert hubclient.choose_hub(several, ask) == ("fe80::2%eth0", 7000)
    assert len(prompts) == 3 and prompts[0].endswith("Which hub (1-2)? ")
    with pytest.raises(hubclient.ConnectError) as info:
        hubclient.choose_hub(several, lambda _: "")
    assert info.value.status == 2
    with pytest.raises(hubclient.ConnectError) as info:
        hubclient.choose_hub([FakeAd("x", (), 1)], None)
    assert info.value.status == 1 and "no lanchat hub found" in str(info.value)


def test_hubclient_does_not_load_zeroconf() -> None:
    code = ("import sys, lanchat.hubclient, lanchat.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('zeroconf', 'sqlite3', 'lanchat.discovery')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         timeout=30).stdout
    assert out.strip() == b"[]"
