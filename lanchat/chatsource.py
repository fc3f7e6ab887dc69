"""Where the chat screen's events come from: the local daemon, or a hub directly.

Both sources hand the screen the same :data:`lanchat.chatmodel.Event` values through
one ``emit`` callable (which the screen makes safe to call from any thread), and take
the same requests (``lanchat.chatscreen.Source``): say something, show a room, change nick.

- :class:`DaemonSource` (``lanchat chat``): two control-socket connections, as the line
  mode has: a reader thread holds a subscription to every room, a worker thread makes
  the calls (``send``, ``history`` when a room is first shown, ``users``, ``status``), so
  neither waits for the other.  When the daemon goes away (a restart), the reader says
  ``reconnecting in N s`` and tries again with a doubling wait; once back it reloads the
  history of every room shown so far (the model drops what it already has), so the
  screen loses nothing.
- :class:`HubSource` (``lanchat connect``): one JSON-mode connection to a hub
  (:func:`lanchat.hubclient.open_json`); a hub has one current room per client, so
  showing a room buffer joins it.  It reconnects the same way.

Threads: ``reader`` and ``worker`` per source, both stopped and joined by :meth:`stop`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from lanchat.chatmodel import Event, Got, History, InRoom, Moved, Note, People, Person, State
from lanchat.client import ConnectionLost, ControlClient, ControlTimeout, RpcError
from lanchat.commands import Join, ListUsers, Nick, Quit, Say
from lanchat.errors import LanchatError, ValidationError
from lanchat.hubclient import ConnectError, Security, TcpSession, encode_command, open_json
from lanchat.limits import (
    SCREEN_HISTORY_ON_ENTRY,
    SCREEN_RECONNECT_FIRST_S,
    SCREEN_RECONNECT_MAX_S,
    SEND_ATTEMPTS,
)
from lanchat.model import Message, Presence
from lanchat.render import neutralise

#: Seconds between refreshes of the status line's counts and the user list.
REFRESH_S = 10.0

Emit = Callable[[Event], None]


def _people(items: object, *, room: str | None = None) -> list[Person]:
    """The user list from a ``users`` answer (control) or frame (hub: ``room``'s)."""
    found: list[Person] = []
    if isinstance(items, list):
        for u in items:
            if isinstance(u, dict) and isinstance(u.get("nick"), str):
                found.append(Person(nick=u["nick"], host=str(u.get("host", "")),
                                    room=str(u.get("room", room or "")),
                                    local=bool(u.get("local", True))))
    return found


class _Backoff:
    """The wait before the next try: doubled after each failure, back to the first after
    a success."""

    def __init__(self) -> None:
        self.delay = SCREEN_RECONNECT_FIRST_S

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, SCREEN_RECONNECT_MAX_S)
        return delay

    def reset(self) -> None:
        self.delay = SCREEN_RECONNECT_FIRST_S


class _Threads:
    """The reader and worker threads of a source, and how they stop."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.people_asked = threading.Event()  # a user-list refresh is queued
        self.emit: Emit = lambda event: None
        self._threads: list[threading.Thread] = []

    def run(self, emit: Emit, reader: Callable[[], None]) -> None:
        self.emit = emit
        self._threads = [threading.Thread(target=reader, name="screen-reader"),
                         threading.Thread(target=self._work, name="screen-worker")]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self.jobs.get(timeout=REFRESH_S)
            except queue.Empty:
                job = self.idle
            if job is None:
                return
            try:
                job()
            except LanchatError as exc:
                self.emit(Note(neutralise(str(exc)), time.time(), error=True))

    def idle(self) -> None:
        """Run by the worker every REFRESH_S without jobs."""

    def soon(self, job: Callable[[], None], pending: threading.Event) -> None:
        """Queue ``job`` unless it is queued already (``pending`` set): a burst of joins
        asks for the user list once, not once per join."""
        if pending.is_set():
            return
        pending.set()

        def once() -> None:
            pending.clear()
            job()
        self.jobs.put(once)

    def join(self) -> None:
        self.stopping.set()
        self.jobs.put(None)
        for t in self._threads:
            t.join(5.0)


class DaemonSource(_Threads):
    """``lanchat chat``: the daemon's control socket at ``path``."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout
        self._listener: ControlClient | None = None
        self._caller: ControlClient | None = None
        self._lock = threading.Lock()     # guards _listener
        self._entered: list[str] = []     # rooms shown so far (worker thread)
        self._connected = False

    def start(self, emit: Emit) -> None:
        self.run(emit, self._read)

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            if self._listener is not None:
                self._listener.interrupt()
        self.join()
        if self._caller is not None:
            self._caller.close()

    # -- the reader thread ------------------------------------------------------------------

    def _read(self) -> None:
        backoff = _Backoff()
        while not self.stopping.is_set():
            client = ControlClient(self.path, self.timeout)
            try:
                client.connect()
                with self._lock:
                    if self.stopping.is_set():
                        return
                    self._listener = client
                _, notes = client.subscribe(room=None, backlog=0)
                backoff.reset()
                self._connected = True
                self.jobs.put(self._resync)
                for note in notes:
                    if not self._dispatch(note):
                        break
            except LanchatError as exc:
                if self.stopping.is_set():
                    return
                self._connected = False
                delay = backoff.next()
                self.emit(State(f"reconnecting in {delay:g} s ({neutralise(str(exc))})"))
                self.stopping.wait(delay)
            finally:
                with self._lock:
                    self._listener = None
                client.close()

    def _dispatch(self, note: dict[str, Any]) -> bool:
        """One notification into an event; False when the daemon dropped the stream."""
        method, params = note.get("method"), note.get("params")
        try:
            if method == "message":
                self.emit(Got(Message.from_dict(params)))
            elif method == "presence":
                self.emit(Moved(Presence.from_dict(params)))
                self.soon(self._refresh, self.people_asked)
            elif method == "overflow":
                raise ConnectionLost("lanchatd dropped this stream (we fell behind)")
        except ValidationError as exc:
            self.emit(Note(f"skipped a malformed {neutralise(str(method))}: "
                           f"{neutralise(str(exc))}", time.time(), error=True))
        return True

    # -- the worker thread -----------------------------------------------------------------

    def _call(self, method: str, **params: Any) -> Any:
        """One call on the worker's connection; one new connection if the old one broke."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            if self._caller is None:
                self._caller = ControlClient(self.path, self.timeout)
            try:
                return self._caller.call(method, **params)
            except (ConnectionLost, ControlTimeout):
                self._caller.close()
                self._caller = None
                if attempt == SEND_ATTEMPTS:
                    raise
            except LanchatError:
                self._caller.close()
                self._caller = None
                raise
        return None  # pragma: no cover - the loop returns or raises

    def _resync(self) -> None:
        """After (re)connecting: who we are, who is around, and the history of every room
        shown so far (what came while we were away)."""
        self._refresh()
        for room in self._entered:
            self._history(room)

    def _refresh(self) -> None:
        status = self._call("status")
        if isinstance(status, dict):
            name = neutralise(str(status.get("name") or status.get("node", "?")))
            links = status.get("links")
            self.emit(State("connected", server=f"daemon {name}",
                            nick=str(status.get("nick", "")) or None,
                            node=str(status.get("node", "")) or None,
                            links=links if isinstance(links, int) else None))
        self.emit(People(_people(self._call("users"))))

    def idle(self) -> None:
        if self._connected:
            with contextlib.suppress(LanchatError):
                self._refresh()

    def _history(self, room: str) -> None:
        found = self._call("history", room=room, limit=SCREEN_HISTORY_ON_ENTRY)
        if isinstance(found, list):
            messages = []
            for m in found:
                with contextlib.suppress(ValidationError):
                    messages.append(Message.from_dict(m))
            self.emit(History(room, messages))

    # -- requests (the screen's thread) ----------------------------------------------------------

    def say(self, text: str, *, room: str, to: str | None) -> None:
        key = os.urandom(12).hex()  # one key for every try: stored once (lanchat send's way)

        def send() -> None:
            try:
                self._call("send", text=text, room=room, to=to, key=key)
            except RpcError as exc:
                self.emit(Note(f"not sent: {neutralise(exc.message)}", time.time(), error=True))
        self.jobs.put(send)

    def enter(self, room: str) -> None:
        def load() -> None:
            if room not in self._entered:
                self._entered.append(room)
                self._history(room)
        self.jobs.put(load)

    def nick(self, name: str) -> None:
        def change() -> None:
            try:
                self._call("nick", nick=name)
            except RpcError as exc:
                self.emit(Note(neutralise(exc.message), time.time(), error=True))
                return
            self._refresh()
        self.jobs.put(change)


class HubSource(_Threads):
    """``lanchat connect``: a hub's JSON mode over TCP."""

    def __init__(self, host: str, port: int, nick: str, *, room: str | None,
                 security: Security, notes: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.host, self.port, self.room, self.security = host, port, room, security
        self.notes = notes  # the pin's first-contact message, before the screen opens
        self.my_nick = nick
        self._welcome_name = "?"
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._session: TcpSession | None = None
        self._lock = threading.Lock()  # guards _session

    def start(self, emit: Emit) -> None:
        self.run(emit, self._read)

    def connect_first(self) -> None:
        """Connect before the screen opens, so a wrong host or a taken nick is a plain error
        (exit 1 or 2) on a normal terminal.  Raises ConnectError."""
        self._session, welcome = open_json(self.host, self.port, self.my_nick, room=self.room,
                                           security=self.security, notes=self.notes)
        self.my_nick, self.room = welcome.nick, welcome.room
        self._welcome_name = welcome.name

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            session = self._session
        if session is not None:
            with contextlib.suppress(OSError):
                session.sock.sendall(encode_command(Quit("quit")) or b"")  # type: ignore[union-attr]
            if session.sock is not None:
                with contextlib.suppress(OSError):
                    session.sock.shutdown(socket.SHUT_RDWR)
        self.join()
        if session is not None:
            session.close()

    def _read(self) -> None:
        backoff = _Backoff()
        session = self._session
        while not self.stopping.is_set():
            try:
                if session is None:
                    # a reconnection: the key is pinned by now, and one that changed
                    # meanwhile is refused (shown in the status line) until --accept-key
                    session, welcome = open_json(self.host, self.port, self.my_nick,
                                                 room=self.room, security=self.security)
                    self.my_nick, self.room = welcome.nick, welcome.room
                    self._welcome_name = welcome.name
                    with self._lock:
                        self._session = session
                backoff.reset()
                self.emit(State("connected", server=f"hub {neutralise(self._welcome_name)} "
                                f"({session.where})", nick=self.my_nick))
                self.emit(InRoom(self.room or "lobby"))
                self._send(ListUsers())
                self._pump(session)
            except (ConnectError, OSError, LanchatError) as exc:
                if self.stopping.is_set():
                    return
                delay = backoff.next()
                self.emit(State(f"reconnecting in {delay:g} s ({neutralise(str(exc))})"))
                self.stopping.wait(delay)
            finally:
                with self._lock:
                    self._session = None
                if session is not None:
                    session.close()
                session = None

    def _pump(self, session: TcpSession) -> None:
        assert session.sock is not None
        data = b""
        while True:
            for frame in session.frames(data):
                self._show(frame)
            data = session.sock.recv(65536)
            if not data:
                raise ConnectionLost(f"{session.where} closed the connection")

    def _show(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        try:
            if kind == "message":
                self.emit(Got(Message.from_dict(frame.get("message")), own=False))
            elif kind == "sent":
                self.emit(Got(Message.from_dict(frame.get("message")), own=True))
            elif kind == "presence":
                self.emit(Moved(Presence.from_dict(frame.get("presence"))))
                self.soon(lambda: self._send(ListUsers()), self.people_asked)
            elif kind == "joined":
                nick, room = frame.get("nick"), frame.get("room")
                if isinstance(nick, str) and nick != self.my_nick:
                    self.my_nick = nick
                    self.emit(State("connected", nick=nick))
                if isinstance(room, str) and room != self.room:
                    self.room = room
                    self.emit(InRoom(room))
                    self._send(ListUsers())
            elif kind == "users":
                room = str(frame.get("room", self.room))
                self.emit(People(_people(frame.get("users"), room=room)))
            elif kind == "error":
                self.emit(Note(neutralise(str(frame.get("message", frame.get("code", "error")))),
                               time.time(), error=True))
            elif kind == "bye":
                self.emit(Note(neutralise(f"the hub said goodbye: {frame.get('reason', '')}"),
                               time.time()))
        except ValidationError as exc:
            self.emit(Note(neutralise(f"skipped a malformed {kind} from the hub: {exc}"),
                           time.time(), error=True))

    def _send(self, command: Say | Join | Nick | ListUsers) -> None:
        data = encode_command(command)
        with self._lock:
            session = self._session
        if session is None or session.sock is None or data is None:
            self.emit(Note("not connected: not sent", time.time(), error=True))
            return
        try:
            with self._send_lock:
                session.sock.sendall(data)
        except OSError as exc:
            self.emit(Note(f"not sent: {exc.strerror or exc}", time.time(), error=True))

    # Requests go through the worker, in order: the screen's loop never waits on a socket.

    def say(self, text: str, *, room: str, to: str | None) -> None:
        def send() -> None:
            if to is None and room != self.room:
                self._send(Join(room))
            self._send(Say(text, to=to))
        self.jobs.put(send)

    def enter(self, room: str) -> None:
        def join() -> None:
            if room != self.room:
                self._send(Join(room))
        self.jobs.put(join)

    def nick(self, name: str) -> None:
        self.jobs.put(lambda: self._send(Nick(name)))
