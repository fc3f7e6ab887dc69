"""The chat screen's widgets through prompt_toolkit's own harness: keys into a pipe input,
the screen written by a real VT100 output into a string and read back with ``pyte``.

The source is a recording fake (what the screen asked for is what it recorded), so these
tests are about the screen alone: the input line, paste, completion, scrolling, colours,
commands and the bell.  tests/test_chatscreen.py drives the whole client in tmux.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pyte
import pytest
from prompt_toolkit.data_structures import Size
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.input.base import PipeInput
from prompt_toolkit.output.vt100 import Vt100_Output

from lanchat.chatlog import WRAP_INDENT, wrap
from lanchat.chatmodel import ChatModel, Event, Got, People, Person
from lanchat.chatscreen import EXIT_INTERRUPTED, EXIT_OK, ChatScreen, notifications_wanted
from lanchat.limits import SCREEN_PASTE_CONFIRM_OVER
from lanchat.model import Message

COLS, ROWS = 80, 24
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
UP, PGUP, PGDN, CTRL_C, CTRL_D = "\x1b[A", "\x1b[5~", "\x1b[6~", "\x03", "\x04"
T0 = 1_796_000_000.0


class FakeSource:
    """Records what the screen asks for; events are emitted by the test."""

    def __init__(self) -> None:
        self.said: list[tuple[str, str, str | None]] = []
        self.entered: list[str] = []
        self.nicks: list[str] = []
        self.emit: Callable[[Event], None] | None = None
        self.stopped = False

    def start(self, emit: Callable[[Event], None]) -> None:
        self.emit = emit

    def say(self, text: str, *, room: str, to: str | None) -> None:
        self.said.append((text, room, to))

    def enter(self, room: str) -> None:
        self.entered.append(room)

    def nick(self, name: str) -> None:
        self.nicks.append(name)

    def stop(self) -> None:
        self.stopped = True


class Harness:
    def __init__(self, pipe: PipeInput, cols: int = COLS, rows: int = ROWS, *,
                 notify: bool = False) -> None:
        self.pipe = pipe
        self.raw = io.StringIO()
        self.size = Size(rows=rows, columns=cols)
        self.output = Vt100_Output(self.raw, lambda: self.size, term="xterm",
                                   enable_cpr=False)
        self.source = FakeSource()
        self.model = ChatModel(me="alice", room="lobby", node="a" * 16)
        self.screen = ChatScreen(self.model, self.source, input=pipe, output=self.output,
                                 clock=lambda: T0, notify=notify)
        self.term = pyte.Screen(cols, rows)
        self.stream = pyte.Stream(self.term)
        self._read = 0

    async def settle(self) -> None:
        for _ in range(6):
            await asyncio.sleep(0.03)

    async def keys(self, text: str) -> None:
        self.pipe.send_text(text)
        await self.settle()

    def rows(self) -> list[str]:
        data = self.raw.getvalue()
        self.stream.feed(data[self._read:])
        self._read = len(data)
        return [r.rstrip() for r in self.term.display]

    def text(self) -> str:
        return "\n".join(self.rows())


_seq = iter(range(1, 1_000_000))


def message(text: str, *, nick: str = "bob", room: str = "lobby",
            to: str | None = None) -> Message:
    seq = next(_seq)
    return Message(origin="b" * 16, seq=seq, ts=T0 + seq, room=room, nick=nick, host="box",
                   text=text, to=to, id=f"{'b' * 16}:{seq}")


def drive(steps: Callable[[Harness], Awaitable[None]], *, end: str = CTRL_D,
          **kw: Any) -> tuple[int, Harness]:
    """Run the screen, play ``steps``, then ``end`` (Ctrl-D); the exit status and harness."""
    async def main() -> tuple[int, Harness]:
        with create_pipe_input() as pipe:
            h = Harness(pipe, **kw)
            task = asyncio.create_task(h.screen.run_async())
            await h.settle()
            await steps(h)
            if end:
                pipe.send_text(end)
            return await asyncio.wait_for(task, 10), h
    return asyncio.run(main())


def test_typed_lines_are_said_and_up_recalls_them() -> None:
    async def steps(h: Harness) -> None:
        await h.keys("hello\r")
        await h.keys(UP)
        assert h.screen.input.text == "hello"
        assert h.rows()[-1] == "[#lobby] hello"
        await h.keys(CTRL_D)  # on a line with text: deletes (there is nothing after it)
        assert h.screen.input.text == "hello"
        await h.keys(CTRL_C)  # clears the line
    status, h = drive(steps)
    assert status == EXIT_OK and h.source.said == [("hello", "lobby", None)]
    assert h.source.stopped and h.source.entered == ["lobby"]


def test_a_short_paste_is_several_messages_and_a_long_one_asks_first() -> None:
    few = "\n".join(f"few {i}" for i in range(SCREEN_PASTE_CONFIRM_OVER))
    many = "\n".join(f"many {i}" for i in range(SCREEN_PASTE_CONFIRM_OVER + 2))

    async def steps(h: Harness) -> None:
        await h.keys(PASTE_START + few + PASTE_END)
        assert [t for t, _, _ in h.source.said] == few.split("\n")
        h.source.said.clear()
        await h.keys(PASTE_START + many + PASTE_END)
        n = SCREEN_PASTE_CONFIRM_OVER + 2
        assert f"Send {n} pasted lines as {n} messages? (y/n)" in h.text()
        assert h.source.said == []
        await h.keys("y")
        assert [t for t, _, _ in h.source.said] == many.split("\n")
        h.source.said.clear()
        await h.keys(PASTE_START + many + PASTE_END)
        await h.keys("n")
        assert h.source.said == [] and f"paste of {n} lines not sent" in h.text()
        await h.keys(PASTE_START + "one line" + PASTE_END)
        assert h.screen.input.text == "one line" and h.source.said == []
    drive(steps, end=CTRL_C + CTRL_D)


def test_tab_completes_a_nick_in_the_input_line() -> None:
    async def steps(h: Harness) -> None:
        assert h.source.emit is not None
        h.source.emit(People([Person("bob", "box", "lobby", True),
                              Person("carol", "pc", "lobby", False)]))
        await h.settle()
        await h.keys("c\t")
        assert h.screen.input.text == "carol: "
        await h.keys("hi\r")
        assert h.source.said == [("carol: hi", "lobby", None)]
        rows = h.rows()
        assert any(r.endswith("│ bob box") for r in rows)      # local
        assert any(r.endswith("│~carol pc") for r in rows)    # remote
    drive(steps)


def test_pgup_pgdn_and_the_wheel_scroll_the_buffer() -> None:
    async def steps(h: Harness) -> None:
        assert h.source.emit is not None
        for i in range(60):
            h.source.emit(Got(message(f"line {i:02d}")))
        await h.settle()
        assert "<bob> line 59" in h.text()
        await h.keys(PGUP)
        assert "<bob> line 59" not in h.text() and "[more below: PgDn]" in h.text()
        await h.keys(PGDN)
        assert "<bob> line 59" in h.text()
        await h.keys("\x1b[<64;40;10M" * 2)  # SGR mouse: wheel up, twice
        assert "<bob> line 59" not in h.text() and "<bob> line 53" in h.text()
        await h.keys("\x1b[<65;40;10M" * 2)  # wheel down
        assert "<bob> line 59" in h.text()
    drive(steps)


def test_a_mention_rings_the_bell_and_other_rooms_count_unread() -> None:
    async def steps(h: Harness) -> None:
        assert h.source.emit is not None
        h.source.emit(Got(message("nothing for you", room="dev")))
        await h.settle()
        assert h.screen.bells == 0 and "\a" not in h.raw.getvalue()
        assert any(r.startswith(" 2 #dev 1") for r in h.rows()) and "[Act: 2]" in h.text()
        h.source.emit(Got(message("alice: you there?", room="dev")))
        await h.settle()
        assert h.screen.bells == 1 and "\a" in h.raw.getvalue()
        assert "[Act: 2!]" in h.text()
        await h.keys("\x1b2")  # Alt-2
        assert h.source.entered[-1] == "dev" and "[Act" not in h.text()
    drive(steps)


def test_commands() -> None:
    async def steps(h: Harness) -> None:
        await h.keys("/query Bob\r")
        assert h.model.shown.label == "Bob"
        await h.keys("hi\r")
        await h.keys("/close\r")
        assert h.model.shown.label == "#lobby"
        await h.keys("/msg carol hey\r")
        assert [b.label for b in h.model.buffers] == ["#lobby", "carol"]
        await h.keys("/me waves\r")
        await h.keys("//slash\r")
        await h.keys("/nick zed\r")
        await h.keys("/join #dev\r")
        assert h.model.shown.label == "#dev" and h.source.entered[-1] == "dev"
        await h.keys("/frob\r")
        assert "unknown command /frob" in h.text()
        await h.keys("/help\r")
        assert "Alt-1..9" in h.text()
        await h.keys("/quit\r")
    status, h = drive(steps, end="")
    assert status == EXIT_OK
    assert h.source.said == [("hi", "lobby", "Bob"), ("hey", "lobby", "carol"),
                             ("/me waves", "lobby", None), ("/slash", "lobby", None)]
    assert h.source.nicks == ["zed"]


def test_ctrl_c_clears_the_line_then_leaves_with_130() -> None:
    async def steps(h: Harness) -> None:
        await h.keys("draft")
        await h.keys(CTRL_C)
        assert h.screen.input.text == ""
    status, h = drive(steps, end=CTRL_C)
    assert status == EXIT_INTERRUPTED and h.source.said == []


SGR = re.compile(r"\x1b\[([0-9;]*)m")


def colours(raw: str) -> set[str]:
    """The colour parameters of every SGR sequence written."""
    found: set[str] = set()
    for params in SGR.findall(raw):
        parts = params.split(";")
        i = 0
        while i < len(parts):
            p = parts[i]
            if p in ("38", "48"):
                found.add(";".join(parts[i:i + 3]))
                i += 3
                continue
            if p.isdigit() and (30 <= int(p) <= 47 or 90 <= int(p) <= 107):
                found.add(p)
            i += 1
    return found


@pytest.mark.parametrize("no_color", [False, True])
def test_sixteen_colours_and_no_color(monkeypatch: pytest.MonkeyPatch, no_color: bool) -> None:
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)

    async def steps(h: Harness) -> None:
        assert h.source.emit is not None
        for nick in ("bob", "carol", "dave", "erin", "frank"):
            h.source.emit(Got(message("hello alice", nick=nick)))
        await h.settle()
        assert "<frank> hello alice" in h.text()
    _, h = drive(steps)
    used = colours(h.raw.getvalue())
    if no_color:
        assert used <= {"39", "49"}, used  # only "default colour"
    else:
        assert not any(c.startswith(("38;", "48;")) for c in used), used  # no 256/true colour
        assert len(used - {"39", "49"}) >= 3


def test_desktop_notifications_need_a_bus_and_notify_send_and_no_opt_out(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "notify-send"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    bus = {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus"}
    assert notifications_wanted(bus)
    assert not notifications_wanted({})
    assert not notifications_wanted({**bus, "LANCHAT_NO_NOTIFY": "1"})
    assert notifications_wanted({**bus, "LANCHAT_NO_NOTIFY": ""})
    tool.unlink()
    assert not notifications_wanted(bus)


def test_a_mention_and_a_direct_message_notify_the_desktop(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "notified"
    tool = tmp_path / "notify-send"
    tool.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    async def steps(h: Harness) -> None:
        assert h.source.emit is not None
        h.source.emit(Got(message("no name here")))
        h.source.emit(Got(message("alice?")))
        await h.settle()
        h.source.emit(Got(message("psst", to="alice")))
        await h.settle()
    drive(steps, notify=True)  # leaving waits for the notifiers
    assert log.read_text().splitlines() == ["--app-name=lanchat lanchat you were mentioned",
                                            "--app-name=lanchat lanchat a direct message"]


def test_the_user_list_keeps_one_person_a_row_whatever_their_host() -> None:
    async def steps(h: Harness) -> None:
        assert h.source.emit is not None
        h.source.emit(People([Person("bob", "a-very-long-host-name.example.org", "lobby", True),
                              Person("carol", "pc", "lobby", False)]))
        await h.settle()
        rows = h.rows()
        assert any(r.endswith("│ bob a-very-long-hos") for r in rows)
        assert any(r.endswith("│~carol pc") for r in rows)
    drive(steps)


def test_wrapping_counts_terminal_cells() -> None:
    rows = wrap([("class:time", "[12:00] "), ("", "漢字" * 10)], 30)
    text = ["".join(t for _, t in r) for r in rows]
    assert text[0] == "[12:00] " + ("漢字" * 6)[:11]  # 8 + 22 cells: no half character
    assert all(line.startswith(" " * WRAP_INDENT) for line in text[1:])
    assert sum(line.count("漢") + line.count("字") for line in text) == 20
    assert wrap([("", "a\nb")], 20) == [[("", "a")], [("", "b")]]
