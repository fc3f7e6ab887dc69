"""The full-screen chat client of ``lanchat chat`` and ``lanchat connect`` (on a terminal).

Built on prompt_toolkit's full-screen applications: one small, typed dependency (only
``wcwidth`` comes with it) that already does what a chat screen must get right -- line
editing with history and word deletion, bracketed paste, mouse wheel, resize, 16-colour
and ``NO_COLOR`` output, the terminal put back as it was on exit -- and a test harness
(pipe input, dummy output).  Imported only by these two commands: ``lanchat send`` never
loads it (``tests/test_cli_unit.py``).

The screen, top to bottom: the room list (left), the shown buffer, the user list (right);
the status line; the input line.  What is decided (buffers, unread, mentions, completion)
is :mod:`lanchat.chatmodel`'s; where events come from is :mod:`lanchat.chatsource`'s.

Threads: prompt_toolkit's event loop owns the model and the screen.  A source's threads
hand events to :meth:`ChatScreen.emit`, which queues them and schedules one drain on the
loop (``call_soon_threadsafe``): a burst of 200 messages is one redraw, and the input line,
a prompt_toolkit buffer the loop alone touches, is never disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer as InputBuffer
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent, merge_key_bindings
from prompt_toolkit.key_binding.defaults import load_key_bindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import HSplit, Layout, VSplit, Window
from prompt_toolkit.layout.containers import ConditionalContainer
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.output import ColorDepth, Output
from prompt_toolkit.styles import Style

from lanchat.chatlog import LogControl
from lanchat.chatmodel import (
    DIRECT,
    HELP_LINES,
    QUERY,
    ROOM,
    ChatModel,
    Event,
    paste_lines,
)
from lanchat.commands import Help, Join, ListUsers, Nick, Quit, Say
from lanchat.errors import ValidationError
from lanchat.limits import SCREEN_PASTE_CONFIRM_OVER

if TYPE_CHECKING:
    from lanchat.hubclient import Security
from lanchat.render import neutralise
from lanchat.textmode import parse_line

EXIT_OK = 0
EXIT_INTERRUPTED = 130

#: Columns of the room list and of the user list; both hide on a terminal narrower than
#: SIDE_PANELS_FROM columns, where the messages need the room.
ROOMS_WIDTH = 18
USERS_WIDTH = 20
SIDE_PANELS_FROM = 70

#: Seconds between redraws with nothing new: the status line's clock stays right.
STATUS_REFRESH_S = 10.0

STYLE = Style.from_dict({
    "time": "ansibrightblack",
    "day": "ansibrightblack",
    "presence": "ansibrightblack",
    "dim": "ansibrightblack",
    "notice": "ansibrightblack",
    "error": "ansired bold",
    "own": "bold",
    "mention": "bold underline",
    "action": "ansimagenta",
    "status": "reverse",
    "status.alert": "reverse bold",
    "room.current": "reverse",
    "room.hot": "bold ansibrightmagenta",
    "room.unread": "bold",
    "user.remote": "ansibrightblack",
    "prompt": "bold",
    "confirm": "reverse bold",
})


class Source(Protocol):
    """What the screen asks of where its events come from (lanchat.chatsource has two)."""

    def start(self, emit: Callable[[Event], None]) -> None: ...
    def say(self, text: str, *, room: str, to: str | None) -> None: ...
    def enter(self, room: str) -> None: ...
    def nick(self, name: str) -> None: ...
    def stop(self) -> None: ...


def notifications_wanted(env: dict[str, str]) -> bool:
    """Desktop notifications: only where a session bus runs and ``notify-send`` exists, and
    not when ``LANCHAT_NO_NOTIFY`` is set (to anything non-empty, as ``NO_COLOR`` is)."""
    if env.get("LANCHAT_NO_NOTIFY"):
        return False
    return bool(env.get("DBUS_SESSION_BUS_ADDRESS")) and shutil.which("notify-send") is not None


class ChatScreen:
    """The application: ``run()`` until /quit, Ctrl-D (0) or Ctrl-C on an empty line (130)."""

    def __init__(self, model: ChatModel, source: Source, *, input: Input | None = None,
                 output: Output | None = None, notify: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.model = model
        self.source = source
        self.clock = clock
        self.notify = notify
        self.confirm: list[str] | None = None      # a paste waiting for y/n
        self._events: deque[Event] = deque()
        self._lock = threading.Lock()               # guards _events, _scheduled
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifiers: list[subprocess.Popen[bytes]] = []
        self.bells = 0
        history = InMemoryHistory()
        self.input = InputBuffer(multiline=False, history=history,
                                 accept_handler=self._accept)
        self.log = LogControl(self.model, self.scroll)
        self.app: Application[int] = Application(
            layout=self._layout(), key_bindings=merge_key_bindings(
                [load_key_bindings(), self._keys()]),
            style=STYLE, full_screen=True, mouse_support=True, input=input, output=output,
            refresh_interval=STATUS_REFRESH_S,
            color_depth=ColorDepth.DEPTH_1_BIT if os.environ.get("NO_COLOR") else None)

    # -- layout ----------------------------------------------------------------------------

    def _layout(self) -> Layout:
        wide = Condition(lambda: self.app.output.get_size().columns >= SIDE_PANELS_FROM)
        body = VSplit([
            ConditionalContainer(Window(FormattedTextControl(self._rooms), width=ROOMS_WIDTH,
                                        style="class:rooms"), filter=wide),
            ConditionalContainer(Window(width=1, char="│", style="class:dim"), filter=wide),
            Window(self.log, wrap_lines=False),
            ConditionalContainer(Window(width=1, char="│", style="class:dim"), filter=wide),
            ConditionalContainer(Window(FormattedTextControl(self._users), width=USERS_WIDTH),
                                 filter=wide),
        ])
        prompt = Window(FormattedTextControl(self._prompt), dont_extend_width=True)
        line = VSplit([prompt, Window(BufferControl(self.input), height=1)])
        status = Window(FormattedTextControl(self._status), height=1, style="class:status")
        return Layout(HSplit([body, status, line]), focused_element=self.input)

    def _rooms(self) -> StyleAndTextTuples:
        out: StyleAndTextTuples = []
        for i, buf in enumerate(self.model.buffers, 1):
            count = f" {buf.unread}" if buf.unread else ""
            text = f"{i:>2} {neutralise(buf.label)}"[:ROOMS_WIDTH - len(count) - 1]
            style = ("class:room.current" if i - 1 == self.model.current else
                     "class:room.hot" if buf.mentioned else
                     "class:room.unread" if buf.unread else "")
            out.append((style, f"{text}{count}".ljust(ROOMS_WIDTH - 1) + "\n"))
        return out

    def _users(self) -> StyleAndTextTuples:
        people = self.model.room_people()
        out: StyleAndTextTuples = [("class:dim", f"{len(people)} here\n")]
        for p in people:
            mark = " " if p.local else "~"
            out.append(("" if p.local else "class:user.remote", f"{mark}{neutralise(p.nick)}"))
            out.append(("class:dim", f" {neutralise(p.host)}"[:USERS_WIDTH] + "\n"))
        return out

    def _prompt(self) -> StyleAndTextTuples:
        if self.confirm is not None:
            return [("class:confirm", f"Send {len(self.confirm)} pasted lines as "
                                      f"{len(self.confirm)} messages? (y/n)"), ("", " ")]
        return [("class:prompt", f"[{neutralise(self.model.shown.label)}] ")]

    def _status(self) -> StyleAndTextTuples:
        m = self.model
        links = "" if m.links is None else f" · {m.links} link{'s' if m.links != 1 else ''}"
        act = [str(i) + ("!" if b.mentioned else "")
               for i, b in enumerate(m.buffers, 1) if b.unread]
        parts = [f"[{time.strftime('%H:%M', time.localtime(self.clock()))}]",
                 f"[{neutralise(m.me)}]",
                 f"[{m.current + 1}:{neutralise(m.shown.label)}]",
                 f"[{neutralise(m.state)}]",
                 f"[{m.server or '?'}{links}]"]
        if m.shown.scroll:
            parts.append("[more below: PgDn]")
        out: StyleAndTextTuples = [("class:status", " ".join(parts))]
        if act:
            out.append(("class:status.alert", f" [Act: {','.join(act)}]"))
        return out

    # -- keys ------------------------------------------------------------------------------

    def _keys(self) -> KeyBindings:
        kb = KeyBindings()
        confirming = Condition(lambda: self.confirm is not None)
        empty = Condition(lambda: not self.input.text)

        @kb.add("y", filter=confirming, eager=True)
        def _(event: KeyPressEvent) -> None:
            lines, self.confirm = self.confirm or [], None
            for line in lines:
                self._say(line)

        @kb.add(Keys.Any, filter=confirming, eager=True)
        def _(event: KeyPressEvent) -> None:
            self.model.note(f"paste of {len(self.confirm or [])} lines not sent",
                            ts=self.clock())
            self.confirm = None

        @kb.add(Keys.BracketedPaste)
        def _(event: KeyPressEvent) -> None:
            self._paste(event.data)

        @kb.add("c-d", filter=empty)
        def _(event: KeyPressEvent) -> None:
            event.app.exit(result=EXIT_OK)

        @kb.add("c-c")
        def _(event: KeyPressEvent) -> None:
            if self.input.text:
                self.input.reset()
            else:
                event.app.exit(result=EXIT_INTERRUPTED)

        @kb.add("c-n")
        def _(event: KeyPressEvent) -> None:
            self._switch(lambda: self.model.step(1))

        @kb.add("c-p")
        def _(event: KeyPressEvent) -> None:
            self._switch(lambda: self.model.step(-1))

        for digit in "123456789":
            @kb.add("escape", digit)
            def _(event: KeyPressEvent, n: int = int(digit)) -> None:
                self._switch(lambda: self.model.show(n - 1))

        @kb.add("pageup")
        def _(event: KeyPressEvent) -> None:
            self.scroll(max(1, self.log.height - 2))

        @kb.add("pagedown")
        def _(event: KeyPressEvent) -> None:
            self.scroll(-max(1, self.log.height - 2))

        @kb.add("tab")
        def _(event: KeyPressEvent) -> None:
            done = self.model.complete(self.input.text, self.input.cursor_position)
            if done is not None:
                self.input.text, self.input.cursor_position = done

        @kb.add("c-l")
        def _(event: KeyPressEvent) -> None:
            event.app.renderer.clear()

        return kb

    def scroll(self, rows: int) -> None:
        buf = self.model.shown
        buf.scroll = max(0, buf.scroll + rows)
        self.app.invalidate()

    def _switch(self, how: Callable[[], object]) -> None:
        before = self.model.shown
        how()
        if self.model.shown is not before:
            self._entered()

    def _entered(self) -> None:
        buf = self.model.shown
        if buf.kind == ROOM:
            self.source.enter(buf.name)

    # -- typed lines -----------------------------------------------------------------------

    def _accept(self, buf: InputBuffer) -> bool:
        self.model.reset_completion()
        self.command(buf.text)
        return False  # clear the line (it is in the history already)

    def _paste(self, data: str) -> None:
        here = self.input.cursor_position
        whole = self.input.text[:here] + data + self.input.text[here:]
        lines = paste_lines(whole)
        if len(lines) <= 1:
            self.input.insert_text(data.replace("\r", "").replace("\n", " "))
            return
        self.input.reset()
        if len(lines) > SCREEN_PASTE_CONFIRM_OVER:
            self.confirm = lines
            return
        for line in lines:
            self._say(line)

    def command(self, line: str) -> None:
        """One typed line: a message to the shown buffer, or a /command."""
        now = self.clock()
        word, _, rest = line.partition(" ")
        word = word.lower()
        if word == "/join" and rest.strip().startswith("#"):
            line = "/join " + rest.strip()[1:]
        if word == "/query":
            if not rest.strip():
                self.model.note("usage: /query NICK", ts=now, kind="error")
            else:
                self._switch(lambda: self.model.open(rest.strip(), QUERY))
            return
        if word == "/close":
            self._switch(self.model.close)
            return
        try:
            command = parse_line(line)
        except ValidationError as exc:
            self.model.note(str(exc), ts=now, kind="error")
            return
        if command is None:
            return
        if isinstance(command, Say):
            if command.to is not None:
                self.model.open(command.to, QUERY, show=False)
            self._say(command.text, to=command.to)
        elif isinstance(command, Join):
            self._switch(lambda: self.model.open(command.room, ROOM))
        elif isinstance(command, Nick):
            self.source.nick(command.nick)
        elif isinstance(command, ListUsers):
            people = self.model.room_people()
            names = ", ".join(p.nick + ("" if p.local else f"@{p.host}") for p in people)
            self.model.note(f"In {self.model.shown.label} ({len(people)}): {names}", ts=now)
        elif isinstance(command, Quit):
            self.app.exit(result=EXIT_OK)
        elif isinstance(command, Help):
            for h in HELP_LINES:
                self.model.note(h, ts=now)
        else:
            self.model.note(f"unknown command {line.split()[0]} -- type /help", ts=now,
                            kind="error")

    def _say(self, text: str, *, to: str | None = None) -> None:
        buf = self.model.shown
        if to is None and buf.kind == QUERY:
            to = buf.name
        room = buf.name if buf.kind == ROOM else self._last_room()
        self.source.say(text, room=room, to=to)

    def _last_room(self) -> str:
        return next((b.name for b in self.model.buffers if b.kind == ROOM), "lobby")

    # -- events from the source (any thread) -----------------------------------------------

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the screen; safe from any thread."""
        with self._lock:
            self._events.append(event)
            if self._scheduled or self._loop is None:
                return
            self._scheduled = True
            loop = self._loop
        # A loop that closed meanwhile raises: the screen is gone, and the event with it.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            events, self._events = self._events, deque()
            self._scheduled = False
        before = self.model.shown
        alerts = [alert for event in events if (alert := self.model.apply(event))]
        if self.model.shown is not before:
            self._entered()
        if alerts:
            self.bells += 1
            self.app.output.bell()
            if self.notify:
                self._desktop(alerts[-1])
        self.app.invalidate()

    def _desktop(self, alert: str) -> None:
        self._notifiers = [p for p in self._notifiers if p.poll() is None]
        what = "a direct message" if alert == DIRECT else "you were mentioned"
        try:
            self._notifiers.append(subprocess.Popen(
                ["notify-send", "--app-name=lanchat", "lanchat", what],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except OSError:
            self.notify = False

    # -- running -----------------------------------------------------------------------------

    def _started(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            pending = bool(self._events)
            self._scheduled = pending
        if pending:
            self._loop.call_soon(self._drain)
        self.source.start(self.emit)
        self._entered()

    def run(self) -> int:
        """Show the screen until the user leaves; the exit status."""
        try:
            return self.app.run(pre_run=self._started)
        finally:
            self._finish()

    async def run_async(self) -> int:
        """:meth:`run` inside a running event loop (the widget tests drive it so)."""
        try:
            return await self.app.run_async(pre_run=self._started)
        finally:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._loop = None  # what the source still says is dropped, not scheduled
        self.source.stop()
        for p in self._notifiers:
            try:
                p.wait(1.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_daemon(path: str, timeout: float, *, room: str) -> int:
    """``lanchat chat`` on a terminal.  Asks the daemon who we are first, so a daemon that is
    not running is reported as the line mode reports it (exit 3), before the screen opens."""
    from lanchat.chatsource import DaemonSource
    from lanchat.client import ControlClient

    with ControlClient(path, timeout) as client:
        status = client.call("status")
    nick = str(status.get("nick", "")) if isinstance(status, dict) else ""
    node = str(status.get("node", "")) if isinstance(status, dict) else ""
    model = ChatModel(me=nick, room=room, node=node or None)
    return ChatScreen(model, DaemonSource(path, timeout),
                      notify=notifications_wanted(dict(os.environ))).run()


def _to_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_hub(host: str, port: int, nick: str, *, room: str | None, security: Security) -> int:
    """``lanchat connect`` on a terminal (TCP).  Connects first, so a refused connection, a
    changed hub key or a taken nick is reported on the plain terminal
    (lanchat.hubclient.ConnectError), and the fingerprint of a hub met for the first time
    is printed there before the screen opens."""
    from lanchat.chatsource import HubSource

    source = HubSource(host, port, nick, room=room, security=security,
                       notes=_to_stderr)
    source.connect_first()
    model = ChatModel(me=source.my_nick, room=source.room or "lobby")
    return ChatScreen(model, source, notify=notifications_wanted(dict(os.environ))).run()
