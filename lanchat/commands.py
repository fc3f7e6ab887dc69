"""What a hub user can ask for, whichever way they connect.

Text mode (``/join dev``), JSON mode (``{"type": "join", "room": "dev"}``) and
UDP datagrams are parsed into these same small, self-validating commands, so
the hub handles each request in one place whatever the client speaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lanchat.model import validate_nick, validate_recipient, validate_room, validate_text


@dataclass(frozen=True, slots=True)
class Say:
    """Post ``text`` to the current room (or to one user, when ``to`` is set)."""

    text: str
    to: str | None = None
    #: The client's correlation token, echoed in the ``sent`` acknowledgement (JSON mode).
    ref: Any = None

    def __post_init__(self) -> None:
        validate_text(self.text)
        if self.to is not None:
            validate_recipient(self.to)


@dataclass(frozen=True, slots=True)
class Join:
    """Move to another room (one room at a time)."""

    room: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "room", validate_room(self.room))


@dataclass(frozen=True, slots=True)
class Nick:
    """Change nickname."""

    nick: str

    def __post_init__(self) -> None:
        validate_nick(self.nick)


@dataclass(frozen=True, slots=True)
class ListUsers:
    """Who is in my room."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you there?  (Also a UDP keepalive.)"""

    token: Any = None


@dataclass(frozen=True, slots=True)
class Quit:
    """Leave, optionally saying why."""

    reason: str = "quit"


@dataclass(frozen=True, slots=True)
class Help:
    """List the commands."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A ``/command`` we do not know; answered with a one-line error."""

    name: str


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame of a JSON-mode connection (a client, or a daemon opening a link)."""

    version: int
    nick: str | None = None
    room: str | None = None
    role: str = "client"
    client: str | None = None
    #: Every field of the frame, for the link protocol to read its own keys from.
    fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role == "client":
            validate_nick(self.nick)
        if self.room is not None:
            object.__setattr__(self, "room", validate_room(self.room))


Command = Say | Join | Nick | ListUsers | Ping | Quit | Help | Unknown
