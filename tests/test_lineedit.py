"""The line mode on a real terminal: ``lanchat chat`` and ``lanchat connect`` in a pseudo-terminal.

Each client runs as a subprocess whose stdin, stdout and stderr are the slave side of a
pty; the test types into the master side, and renders everything the client writes with
``pyte`` (a VT100/xterm emulator) into a screen, so the assertions are on what the user
sees.  What was sent is checked where it arrives: the daemon's history, or another client.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyte
import pytest
from conftest import SETTLE_S, Daemon, LineClient, TextUser, lanchat_cmd

COLS, ROWS = 100, 30
PROMPT = "> "
SCROLLBACK = 2000  # rows kept above the screen: more than any test prints
LEFT, UP, CTRL_D = "\x1b[D", "\x1b[A", "\x04"


class Terminal:
    """A client on a pty, with a pyte screen of everything it has written."""

    def __init__(self, argv: list[str], term: str = "xterm") -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = dict(os.environ, TERM=term, INPUTRC="/dev/null",
                   COLUMNS=str(COLS), LINES=str(ROWS))
        self.master = master
        self.screen = pyte.HistoryScreen(COLS, ROWS, history=SCROLLBACK)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        try:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                         env=env, start_new_session=True)
        finally:
            os.close(slave)

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the client has exited and closed the slave side
            data = b""
        if not data:
            time.sleep(min(timeout, 0.05))
            return
        self.raw += data
        self.stream.feed(data)

    def lines(self) -> list[str]:
        """The screen's rows, trailing blanks removed."""
        return [row.rstrip() for row in self.screen.display]

    def all_rows(self) -> list[str]:
        """Every row ever shown: the scrollback, then the screen (trailing blanks removed)."""
        above = ["".join(row[x].data for x in range(COLS)).rstrip()
                 for row in self.screen.history.top]
        return above + self.lines()

    def last_line(self) -> str:
        """The last non-empty row: where the input line is."""
        rows = [r for r in self.lines() if r]
        return rows[-1] if rows else ""

    def wait(self, what: str, check: Callable[[], bool], timeout: float = SETTLE_S) -> None:
        """Read the client's output until ``check()`` holds (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                screen = "\n".join(self.lines())
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")
            self._pump(0.05)

    def shows_input(self, text: str) -> bool:
        """True when the last line is the prompt followed by exactly ``text``."""
        return self.last_line() == (PROMPT + text).rstrip()

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_exit(self, timeout: float = SETTLE_S) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "the client did not exit"
            self._pump(0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    try:
        yield made
    finally:
        for t in made:
            t.close()


def chat(daemon: Daemon, terminals: list[Terminal], term: str = "xterm") -> Terminal:
    t = Terminal([*lanchat_cmd(), "--socket", daemon.socket, "chat", "--plain", "-n", "0"],
                 term)
    terminals.append(t)
    t.wait("the prompt", lambda: t.shows_input(""))
    return t


def connect(daemon: Daemon, terminals: list[Terminal], *, udp: bool = False) -> Terminal:
    t = Terminal([*lanchat_cmd(), "connect", f"127.0.0.1:{daemon.port}", "--nick", "bob",
                  "--plain", *(["--udp"] if udp else [])])
    terminals.append(t)
    welcome = "Welcome, bob!" if udp else "Connected to"
    t.wait("the welcome", lambda: any(welcome in r for r in t.lines()) and t.shows_input(""))
    return t


def stored_texts(daemon: Daemon) -> list[str]:
    r = daemon.cli("history", "--room", "lobby", "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["text"] for line in r.stdout.decode().splitlines()]


def wait_stored(daemon: Daemon, texts: list[str]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while (got := stored_texts(daemon)) != texts:
        assert time.monotonic() < deadline, f"stored {got!r}, expected {texts!r}"
        time.sleep(0.1)


def edit(t: Terminal) -> None:
    """Type ``tyst ok``, move Left three times (to before the space), type X, Enter."""
    t.type("tyst ok")
    t.wait("the typed text", lambda: t.shows_input("tyst ok"))
    t.type(LEFT * 3 + "X")
    t.wait("the edited text", lambda: t.shows_input("tystX ok"))
    t.type("\r")


EDITED = "tystX ok"  # "tyst ok" with X inserted at offset 4, three to the left of the end


def flood(daemon: Daemon, clients: list[Any], t: Terminal, count: int = 200) -> None:
    """With ``half typed`` on the input line, ``count`` messages arrive from alice."""
    t.type("half typed")
    t.wait("the half-typed text", lambda: t.shows_input("half typed"))
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    alice.send("".join(f"message number {i} from alice\n" for i in range(count)))
    t.wait("the last message", lambda: any(r.endswith(f"alice: message number {count - 1} "
                                                      "from alice") for r in t.lines()))


def assert_input_intact(t: Terminal, count: int = 200) -> None:
    rows = [r for r in t.lines() if r]
    # What the user sees: every message on its own whole row, the input line last,
    # showing the prompt and the half-typed text with the cursor after it.
    assert rows[-1] == PROMPT + "half typed", rows[-3:]
    assert rows[-2].endswith(f"alice: message number {count - 1} from alice"), rows[-3:]
    assert (t.screen.cursor.y, t.screen.cursor.x) == (len(rows) - 1, len(PROMPT + "half typed"))
    # And scrolling back: all of them, in order, and no stale copy of the input line.
    every = [r for r in t.all_rows() if r]
    assert sum("half typed" in r for r in every) == 1, [r for r in every if "half" in r][:5]
    shown = [r for r in every if "message number" in r]
    assert [r.split("] ", 1)[1] for r in shown] == [
        f"alice: message number {i} from alice" for i in range(count)], shown[:5]


# -- lanchat chat, through a real daemon --------------------------------------------------------

def test_chat_arrow_keys_edit_the_line(daemon: Daemon, terminals: list[Terminal]) -> None:
    t = chat(daemon, terminals)
    edit(t)
    wait_stored(daemon, [EDITED])
    t.wait("our message", lambda: any(r.endswith(f"owner: {EDITED}") for r in t.lines()))
    assert b"\x1b[D" not in "".join(stored_texts(daemon)).encode()


def test_chat_redraws_the_half_typed_line_under_200_messages(
        daemon: Daemon, terminals: list[Terminal], clients: list[LineClient]) -> None:
    t = chat(daemon, terminals)
    flood(daemon, clients, t)
    t.wait("the input line redrawn", lambda: t.shows_input("half typed"))
    assert_input_intact(t)
    t.type(" and done\r")
    deadline = time.monotonic() + SETTLE_S
    while "half typed and done" not in stored_texts(daemon):
        assert time.monotonic() < deadline, stored_texts(daemon)[-3:]
        time.sleep(0.1)
    assert stored_texts(daemon)[-1] == "half typed and done"


def test_chat_on_a_dumb_terminal_redraws_without_escape_sequences(
        daemon: Daemon, terminals: list[Terminal], clients: list[LineClient]) -> None:
    """TERM=dumb understands no escape sequence: the input line is overwritten with blanks."""
    t = chat(daemon, terminals, term="dumb")
    flood(daemon, clients, t, count=20)
    t.wait("the input line redrawn", lambda: t.shows_input("half typed"))
    assert_input_intact(t, count=20)
    assert b"\x1b" not in t.raw, t.raw[:300]
    t.type(" and done\r")
    deadline = time.monotonic() + SETTLE_S
    while "half typed and done" not in stored_texts(daemon):
        assert time.monotonic() < deadline, stored_texts(daemon)[-3:]
        time.sleep(0.1)


def test_chat_up_recalls_the_previous_line(daemon: Daemon, terminals: list[Terminal]) -> None:
    t = chat(daemon, terminals)
    t.type("first line\r")
    wait_stored(daemon, ["first line"])
    t.wait("an empty input line", lambda: t.shows_input(""))
    t.type(UP)
    t.wait("the recalled line", lambda: t.shows_input("first line"))
    t.type(" again\r")
    wait_stored(daemon, ["first line", "first line again"])


def test_chat_ctrl_d_leaves_with_exit_0(daemon: Daemon, terminals: list[Terminal]) -> None:
    t = chat(daemon, terminals)
    t.type(CTRL_D)
    assert t.wait_exit() == 0, t.raw[-500:]


# -- lanchat connect, straight to the hub -------------------------------------------------------

@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_connect_arrow_keys_edit_the_line(daemon: Daemon, terminals: list[Terminal],
                                          clients: list[LineClient], udp: bool) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    t = connect(daemon, terminals, udp=udp)
    edit(t)
    got = alice.until("bob: ")
    assert got.endswith(f"] bob: {EDITED}"), got
    assert "\x1b" not in got and "^[" not in got
    t.type("/quit\r")
    assert t.wait_exit() == 0


def test_connect_redraws_the_half_typed_line_under_200_messages(
        daemon: Daemon, terminals: list[Terminal], clients: list[LineClient]) -> None:
    t = connect(daemon, terminals)
    flood(daemon, clients, t)
    t.wait("the input line redrawn", lambda: t.shows_input("half typed"))
    assert_input_intact(t)
    t.type(" and done\r")
    alice = clients[-1]
    assert isinstance(alice, TextUser)
    assert alice.until("bob: ").endswith("] bob: half typed and done")
    t.type(CTRL_D)
    assert t.wait_exit() == 0
