"""The full-screen client in a real terminal: ``lanchat chat`` and ``lanchat connect`` in tmux.

Each client runs in its own tmux server (``tmux -S <socket in the test's directory>``,
killed in a fixture's finally; the directory goes with the socket): the test types with
``send-keys`` and reads the screen with ``capture-pane``, so the assertions are on what a
user sees.  What was sent is checked where it arrives: the other client's screen, or a
daemon's history.  The daemons run on 127.0.0.1 with ``--no-discovery`` and are linked
with ``--peer``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import SETTLE_S, Daemon, TextUser, lanchat_cmd, skip_or_fail, wait_for

from lanchat import pinfile
from lanchat.client import ControlClient
from lanchat.feed import SigningKey
from lanchat.pins import HUBS_HEADER, Pins

COLS, ROWS = 100, 30


class Tmux:
    """One client in a detached tmux session of its own server.

    The pane runs a shell line: the client, then ``EXIT=<status>`` and the terminal's
    ``stty`` flags (was it left in raw mode?), then a sleep that keeps the pane for reading.
    A bell from the client is counted by tmux's ``alert-bell`` hook in ``self.bell_file``.
    """

    def __init__(self, argv: list[str], workdir: str, *, env: dict[str, str] | None = None
                 ) -> None:
        name = f"tmux-{uuid.uuid4().hex[:12]}"
        self.server = os.path.join(workdir, name)  # the server's socket
        self.bell_file = os.path.join(workdir, f"{name}.bells")
        self.err_file = os.path.join(workdir, f"{name}.err")
        flags = "stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo"
        line = (f"{' '.join(f'{k}={shlex.quote(v)}' for k, v in (env or {}).items())} "
                f"{shlex.join(argv)} 2>{shlex.quote(self.err_file)}; echo EXIT=$?; "
                f"echo STTY $({flags} | tr '\\n' ' '); exec sleep 600")
        self._tmux("-f", "/dev/null", "new-session", "-d", "-x", str(COLS), "-y", str(ROWS),
                   "-s", "main", "env", "TERM=xterm-256color", "sh", "-c", line)
        self._tmux("set-option", "-g", "monitor-bell", "on")
        self._tmux("set-option", "-g", "bell-action", "any")
        self._tmux("set-hook", "-g", "alert-bell",
                   f"run-shell 'echo bell >> {shlex.quote(self.bell_file)}'")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.server, *args], capture_output=True,
                              text=True, timeout=20, check=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "main", *(["-l"] if literal else []), *keys)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)

    def rows(self) -> list[str]:
        return self._tmux("capture-pane", "-p", "-t", "main").split("\n")[:ROWS]

    def text(self) -> str:
        return "\n".join(self.rows())

    def pane(self, fmt: str) -> str:
        return self._tmux("display-message", "-p", "-t", "main", fmt).strip()

    def bells(self) -> int:
        try:
            with open(self.bell_file) as f:
                return f.read().count("bell")
        except FileNotFoundError:
            return 0

    def input_row(self) -> str:
        """The input line: the last row that is not blank (below the status line)."""
        return ([""] + [r for r in self.rows() if r.strip()])[-1]

    def wait(self, what: str, check: Callable[[], bool], timeout: float = SETTLE_S) -> None:
        wait_for(what, lambda: True if check() else None, timeout,
                 diag=lambda: f"screen:\n{self.text()}\nstderr:\n{self.stderr()}")

    def wait_text(self, text: str, timeout: float = SETTLE_S) -> None:
        self.wait(repr(text), lambda: text in self.text(), timeout)

    def stderr(self) -> str:
        try:
            with open(self.err_file, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def exit_status(self) -> tuple[int, str]:
        """Wait for the client to end; its status and the terminal's line-discipline flags."""
        self.wait("the client to exit", lambda: "STTY " in self.text())
        found = re.search(r"EXIT=(\d+)\s+STTY ([^\n]*)", self.text())
        assert found is not None, self.text()
        return int(found.group(1)), found.group(2).strip()

    def kill(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["tmux", "-S", self.server, "kill-server"], capture_output=True,
                           timeout=20, check=False)


@pytest.fixture
def screens(workdir: str) -> Iterator[Callable[..., Tmux]]:
    if shutil.which("tmux") is None:
        skip_or_fail("tmux is not installed (apt-get install tmux)")
    made: list[Tmux] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Tmux:
        t = Tmux([*lanchat_cmd(), *args], workdir, env=env)
        made.append(t)
        return t

    try:
        yield make
    finally:
        for t in made:
            t.kill()


def chat(screens: Callable[..., Tmux], d: Daemon, *args: str) -> Tmux:
    t = screens("--socket", d.socket, "chat", *args)
    t.wait("the screen", lambda: "[connected]" in t.text() and "[#" in t.input_row())
    return t


def rpc(d: Daemon, method: str, **params: Any) -> Any:
    with ControlClient(d.socket, timeout=10.0) as c:
        return c.call(method, **params)


def texts(d: Daemon, room: str = "lobby") -> list[str]:
    return [m["text"] for m in rpc(d, "history", room=room, limit=1000)]


@pytest.fixture
def linked(make_daemon: Any) -> tuple[Daemon, Daemon]:
    """Daemon A (nick alice) and daemon B (nick bob, --peer A), linked."""
    a = make_daemon(nick="alice", subdir="a")
    b = make_daemon("--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")
    wait_for("A and B linked", lambda: (rpc(a, "status")["links"] == 1
             and rpc(b, "status")["links"] == 1) or None, SETTLE_S)
    return a, b


# -- tests --------------------------------------------------------------------------------------

def test_two_clients_chat_through_two_linked_daemons(
        linked: tuple[Daemon, Daemon], screens: Callable[..., Tmux]) -> None:
    """Arrow keys edit the line, and what arrives on the other daemon's screen (and in its
    history) is exactly what was typed; the status line names the daemon and its link."""
    a, b = linked
    alice, bob = chat(screens, a), chat(screens, b)
    assert "[alice]" in alice.text() and "1 link]" in alice.text()
    alice.type("tyst ok")
    alice.keys("Left", "Left", "Left")
    alice.type("X")
    alice.keys("Home")
    alice.type("> ")
    alice.keys("Enter")
    bob.wait_text("<alice> > tystX ok")
    wait_for("stored on B", lambda: "> tystX ok" in texts(b) or None, SETTLE_S)
    assert [t for t in texts(b) if "tyst" in t] == ["> tystX ok"]
    bob.type("hello alice, from bob")
    bob.keys("Enter")
    alice.wait_text("<bob> hello alice, from bob")
    # Up recalls the line sent; Ctrl-W deletes its last word.
    alice.keys("Up")
    alice.wait("the recalled line", lambda: alice.input_row().endswith("> tystX ok"))
    alice.keys("C-w")
    alice.wait("a word deleted", lambda: alice.input_row().endswith("> tystX"))


def test_200_messages_leave_the_half_typed_line_intact(
        linked: tuple[Daemon, Daemon], screens: Callable[..., Tmux]) -> None:
    a, b = linked
    alice = chat(screens, a)
    alice.type("a half typed line")
    with ControlClient(b.socket, timeout=10.0) as c:
        for i in range(200):
            c.call("send", text=f"flood {i:03d}", room="lobby")
    alice.wait_text("<bob> flood 199")
    assert alice.input_row() == "[#lobby] a half typed line"
    alice.type(", ended")
    alice.keys("Enter")
    wait_for("stored", lambda: "a half typed line, ended" in texts(a) or None, SETTLE_S)


def test_switching_rooms_shows_each_rooms_history(
        linked: tuple[Daemon, Daemon], screens: Callable[..., Tmux]) -> None:
    a, b = linked
    for room in ("lobby", "dev", "ops"):
        rpc(b, "send", text=f"earlier in {room}", room=room)
    wait_for("replicated", lambda: "earlier in ops" in texts(a, "ops") or None, SETTLE_S)
    alice = chat(screens, a)
    alice.wait_text("<bob> earlier in lobby")
    alice.type("/join #dev")
    alice.keys("Enter")
    alice.wait_text("<bob> earlier in dev")
    assert "earlier in lobby" not in alice.text() and "[2:#dev]" in alice.text()
    alice.type("/join ops")
    alice.keys("Enter")
    alice.wait_text("<bob> earlier in ops")
    alice.keys("M-1")
    alice.wait_text("<bob> earlier in lobby")
    alice.keys("C-n")
    alice.wait_text("<bob> earlier in dev")
    alice.keys("C-p", "C-p")
    alice.wait_text("<bob> earlier in ops")
    rows = alice.rows()
    assert any(r.startswith(" 1 #lobby") for r in rows)
    assert any(r.startswith(" 2 #dev") for r in rows) and any(r.startswith(" 3 #ops") for r in rows)


def test_a_mention_marks_the_room_and_rings_the_bell(
        linked: tuple[Daemon, Daemon], screens: Callable[..., Tmux]) -> None:
    a, b = linked
    alice = chat(screens, a)
    alice.type("/join dev")
    alice.keys("Enter")
    alice.wait_text("[2:#dev]")
    rpc(b, "send", text="just chatting", room="lobby")
    alice.wait("unread in #lobby", lambda: any(r[:18].rstrip() == " 1 #lobby 1"
                                               for r in alice.rows()))
    assert "[Act: 1]" in alice.text() and alice.bells() == 0
    rpc(b, "send", text="ALICE: are you there?", room="lobby")
    alice.wait_text("[Act: 1!]")
    alice.wait("the bell", lambda: alice.bells() >= 1)
    # A direct message opens a conversation and rings too.
    rpc(b, "send", text="a secret", to="alice")
    alice.wait_text(" 3 bob")
    alice.wait("a second bell", lambda: alice.bells() >= 2)
    alice.keys("M-3")
    alice.wait_text("<bob> a secret")
    alice.type("and back")
    alice.keys("Enter")
    wait_for("the answer stored on B", lambda: any(
        m["text"] == "and back" and m.get("to") == "bob"
        for m in rpc(b, "history", limit=50)) or None, SETTLE_S)


def test_resizing_redraws(linked: tuple[Daemon, Daemon], screens: Callable[..., Tmux]) -> None:
    a, b = linked
    alice = chat(screens, a)
    rpc(b, "send", text="a line to keep on screen", room="lobby")
    alice.wait_text("<bob> a line to keep on screen")
    alice.type("typed")
    subprocess.run(["tmux", "-S", alice.server, "resize-window", "-t", "main", "-x", "60",
                    "-y", "15"], check=True, timeout=20)
    # Narrow: no side lists; the message, the status line and the input are redrawn.
    alice.wait("the narrow layout", lambda: any(r.startswith("[") and "<bob> a line to keep"
                                                in r for r in alice.rows()))
    assert alice.input_row() == "[#lobby] typed"
    assert all(len(r.rstrip()) <= 60 for r in alice.rows())
    assert "│" not in alice.text(), alice.text()
    assert "[connected]" in alice.rows()[13]


@pytest.mark.parametrize("how", ["ctrl-d", "/quit"])
def test_leaving_exits_0_with_the_terminal_restored(
        daemon: Daemon, screens: Callable[..., Tmux], how: str) -> None:
    t = chat(screens, daemon)
    assert t.pane("#{alternate_on}") == "1"
    if how == "ctrl-d":
        t.keys("C-d")
    else:
        t.type("/quit")
        t.keys("Enter")
    status, flags = t.exit_status()
    assert status == 0, t.stderr()
    assert flags.split() == ["icanon", "echo"]  # cooked mode again, not raw
    assert t.pane("#{alternate_on} #{cursor_flag} #{mouse_any_flag}") == "0 1 0"
    assert t.stderr() == ""


def test_the_screen_survives_a_daemon_restart(daemon: Daemon,
                                               screens: Callable[..., Tmux]) -> None:
    rpc(daemon, "send", text="before the restart", room="lobby")
    t = chat(screens, daemon)
    t.wait_text("before the restart")
    t.type("half")
    daemon.stop()
    t.wait("reconnecting", lambda: "[reconnecting in" in t.text())
    daemon.start()
    t.wait("connected again", lambda: "[connected]" in t.text())
    assert "before the restart" in t.text() and t.input_row() == "[#lobby] half"
    t.type(" and after")
    t.keys("Enter")
    wait_for("stored", lambda: "half and after" in texts(daemon) or None, SETTLE_S)
    t.wait_text("<owner> half and after")


def test_connect_opens_the_screen_on_a_hub(daemon: Daemon,
                                           screens: Callable[..., Tmux]) -> None:
    t = screens("connect", f"127.0.0.1:{daemon.port}", "--nick", "carol")
    t.wait("the screen", lambda: "[connected]" in t.text() and "[carol]" in t.text())
    assert "hub " in t.text() and f"127.0.0.1:{daemon.port}" in t.text()
    t.type("hello hub")
    t.keys("Enter")
    t.wait_text("<carol> hello hub")
    wait_for("stored", lambda: "hello hub" in texts(daemon) or None, SETTLE_S)
    t.type("/join dev")
    t.keys("Enter")
    t.wait_text("[2:#dev]")
    wait_for("carol in #dev", lambda: any(u["nick"] == "carol" and u["room"] == "dev"
                                          for u in rpc(daemon, "users")) or None, SETTLE_S)
    rpc(daemon, "send", text="hi carol", room="dev")
    t.wait_text("<owner> hi carol")
    t.wait("carol in the user list", lambda: any(r.rstrip().endswith("carol 127.0.0.1")
                                                 or " carol" in r[-22:] for r in t.rows()))
    t.keys("C-d")
    status, flags = t.exit_status()
    assert status == 0 and flags.split() == ["icanon", "echo"], t.stderr()
    wait_for("carol gone", lambda: all(u["nick"] != "carol" for u in rpc(daemon, "users"))
             or None, SETTLE_S)


def test_connect_screen_shows_a_new_hub_key_and_refuses_a_changed_one(
        daemon: Daemon, screens: Callable[..., Tmux], workdir: str) -> None:
    hub = f"127.0.0.1:{daemon.port}"
    env = {"XDG_STATE_HOME": os.path.join(workdir, "xdg")}
    t = screens("connect", hub, "--nick", "erin", env=env)
    t.wait("the screen", lambda: "[connected]" in t.text() and "[erin]" in t.text())
    t.keys("C-d")
    assert t.exit_status()[0] == 0
    # the note was printed on the terminal before the screen opened
    assert t.stderr().startswith(f"first contact with hub {hub}: node "), t.stderr()
    # the hub now presents another key than the one pinned
    path = os.path.join(env["XDG_STATE_HOME"], "lanchat", "known_hubs")
    assert pinfile.load(path).get(hub) is not None
    pinfile.save(path, Pins({hub: SigningKey(secrets.token_bytes(32)).public}), HUBS_HEADER)
    again = screens("connect", hub, "--nick", "erin", env=env)
    status, flags = again.exit_status()
    assert status == 1 and flags.split() == ["icanon", "echo"], again.stderr()
    assert "HAS CHANGED" in again.stderr() and "nothing was sent" in again.stderr()
    assert "[connected]" not in again.text()
    assert all(u["nick"] != "erin" for u in rpc(daemon, "users"))


def test_plain_and_dumb_terminals_keep_the_line_mode(daemon: Daemon,
                                                     screens: Callable[..., Tmux]) -> None:
    plain = screens("--socket", daemon.socket, "chat", "--plain")
    dumb = screens("--socket", daemon.socket, "chat", env={"TERM": "dumb"})
    for t in (plain, dumb):
        t.wait("the line prompt", lambda t=t: t.input_row() == ">")  # type: ignore[misc]
        assert t.pane("#{alternate_on}") == "0"
        t.keys("C-d")
        assert t.exit_status()[0] == 0


def test_connect_reconnects_to_a_hub_that_restarts(daemon: Daemon,
                                                   screens: Callable[..., Tmux]) -> None:
    t = screens("connect", f"127.0.0.1:{daemon.port}", "--nick", "dora", "--room", "ops")
    t.wait("the screen", lambda: "[connected]" in t.text() and "[1:#ops]" in t.text())
    rpc(daemon, "send", text="psst dora", to="dora")
    t.wait_text(" 2 owner")
    t.keys("M-2")
    t.wait_text("<owner> psst dora")
    t.keys("M-1")
    t.wait_text("[1:#ops]")
    daemon.stop()
    t.wait("reconnecting", lambda: "[reconnecting in" in t.text())
    daemon.start()
    t.wait("connected again", lambda: "[connected]" in t.text())
    wait_for("dora back in #ops", lambda: any(u["nick"] == "dora" and u["room"] == "ops"
                                              for u in rpc(daemon, "users")) or None, SETTLE_S)
    t.type("back again")
    t.keys("Enter")
    wait_for("stored", lambda: "back again" in texts(daemon, "ops") or None, SETTLE_S)
    t.keys("C-d")
    assert t.exit_status()[0] == 0


def test_a_crowd_joining_is_one_dimmed_line(daemon: Daemon, screens: Callable[..., Tmux],
                                            clients: list[Any]) -> None:
    t = chat(screens, daemon)
    for i in range(12):
        clients.append(TextUser(daemon.port, f"guest{i:02d}"))
    t.wait_text("-- #lobby: 12 joined: guest00, guest01, guest02")
    assert "guest04 and 7 more" in t.text()
    t.wait("the user list", lambda: "13 here" in t.text())
    assert "guest05 joined" not in t.text()


def test_connect_reports_a_refusal_before_opening_the_screen(
        daemon: Daemon, screens: Callable[..., Tmux], clients: list[Any]) -> None:
    clients.append(TextUser(daemon.port, "erin"))
    t = screens("connect", f"127.0.0.1:{daemon.port}", "--nick", "erin")
    status, flags = t.exit_status()
    assert status == 1 and flags.split() == ["icanon", "echo"]
    assert "the nick erin is taken" in t.stderr()
    assert t.pane("#{alternate_on}") == "0"


def test_remote_escapes_are_shown_not_obeyed(daemon: Daemon,
                                             screens: Callable[..., Tmux]) -> None:
    t = chat(screens, daemon)
    title = t.pane("#{pane_title}")
    rpc(daemon, "send", text="\x1b]2;pwned\x07\x1b[2J\x1b[31mred\u202e!", room="lobby")
    t.wait_text("<owner> ^[]2;pwned^G^[[2J^[[31mred\\u202e!")
    assert t.pane("#{pane_title}") == title and "pwned" not in title
    assert "[connected]" in t.text()  # not cleared
