"""A small in-memory ControlBackend for the control-socket and CLI tests (a fake, not a mock).

It behaves like the router where the tests look: one lock stands in for the
router thread, so fan-out order is the same for every subscriber and
``subscribe`` snapshots the backlog and registers atomically.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from lanchat.control import Subscriber
from lanchat.errors import NickInUse
from lanchat.events import Event
from lanchat.model import Message, Presence, User

NODE = "0123456789abcdef"


class FakeBackend:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards everything below; stands in for the router thread
        self.messages: list[Message] = []
        self.subs: list[Subscriber] = []
        self.uids: list[int | None] = []
        self.nick = "alice"
        self.dropped = 0
        self.extra_users = 0  # remote users beyond the two below (a big network roster)
        self.history_calls = 0  # pages built: what a client that pipelines requests costs

    def _fan_out(self, item: Message | Presence) -> None:
        event = Event(item)
        for sub in list(self.subs):
            if sub.rooms is not None and item.room not in sub.rooms:
                continue
            if not sub.deliver([event]):
                self.subs.remove(sub)
                self.dropped += 1

    def send(self, text: str, *, room: str, to: str | None, uid: int | None,
             key: str | None = None) -> Message:
        with self.lock:
            msg = Message(origin=NODE, seq=len(self.messages) + 1, ts=time.time(), room=room,
                          nick=self.nick, host="box", text=text, to=to)
            self.messages.append(msg)
            self.uids.append(uid)
            self._fan_out(msg)
        return msg

    def add(self, text: str, *, nick: str = "bob", room: str = "lobby",
            ts: float | None = None) -> Message:
        """A message as if it arrived from the network."""
        with self.lock:
            msg = Message(origin=NODE, seq=len(self.messages) + 1,
                          ts=time.time() if ts is None else ts, room=room, nick=nick,
                          host="otherbox", text=text)
            self.messages.append(msg)
            self._fan_out(msg)
        return msg

    def presence(self, p: Presence) -> None:
        with self.lock:
            self._fan_out(p)

    def history(self, *, room: str | None, limit: int, before: float | None,
                since: float | None) -> list[Message]:
        with self.lock:
            self.history_calls += 1
            msgs = [m for m in self.messages
                    if (room is None or m.room == room)
                    and (before is None or m.ts < before)
                    and (since is None or m.ts >= since)]
        return msgs[-limit:]

    def subscribe(self, sink: Subscriber, *, backlog: int) -> list[Message]:
        with self.lock:
            msgs = [m for m in self.messages if sink.rooms is None or m.room in sink.rooms]
            self.subs.append(sink)
        return msgs[-backlog:] if backlog else []

    def unsubscribe(self, sink: Subscriber) -> None:
        with self.lock:
            if sink in self.subs:
                self.subs.remove(sink)

    def users(self) -> list[User]:
        return [User(nick=self.nick, host="box", node=NODE, local=True, since=1000.0,
                     via="daemon"),
                User(nick="bob", host="otherbox", node="fedcba9876543210", local=False,
                     since=2000.0),
                *(User(nick=f"user{i:05d}", host="farbox", node="fedcba9876543210",
                       local=False, since=3000.0) for i in range(self.extra_users))]

    def peers(self) -> list[dict[str, Any]]:
        return [{"node": "fedcba9876543210", "name": "bob's box\x1b]0;pwned\x07",
                 "address": "10.0.0.2", "port": 7654, "state": "linked",
                 "last_seen": 2000.0}]

    def trust(self, node: str) -> list[str]:
        return ["peer:10.0.0.2:7654"] if node == "fedcba9876543210fedcba9876543210" else []

    def status(self) -> dict[str, Any]:
        return {"node": NODE, "nick": self.nick, "port": 7654, "peers": 1, "uptime_s": 12.5}

    def set_nick(self, nick: str) -> str:
        if nick == "taken":
            raise NickInUse("nick 'taken' is already in use")
        self.nick = nick
        return nick

