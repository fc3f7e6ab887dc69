"""Text mode: what ``nc HOST PORT`` and telnet users type and see.

Pure: parses a typed line into a :mod:`lanchat.commands` command, and renders
the hub's replies as lines.  Every line the hub sends ends in ``\\n``; notices
start with ``* ``, errors with ``! ``, messages with ``[HH:MM:SS]``.  Rendering
goes through :mod:`lanchat.render`, which neutralises control characters and
escape sequences, so no nick or text from the network reaches a terminal raw.
"""

from __future__ import annotations

from lanchat.commands import Command, Help, Join, ListUsers, Nick, Ping, Quit, Say, Unknown
from lanchat.errors import ValidationError
from lanchat.limits import WELCOME_MAX_NAMES
from lanchat.model import Message, Presence
from lanchat.render import format_message, format_presence, neutralise

HELP_LINES = (
    "Commands:",
    "  /users          who is in this room",
    "  /nick NAME      change your nickname",
    "  /me ACTION      say that you do something",
    "  /join ROOM      move to another room (one at a time; you start in #lobby)",
    "  /msg NICK TEXT  send a direct message",
    "  /quit [REASON]  leave",
    "  /help           this list",
    "Anything else is sent to the room. Start a line with // to send one starting with /.",
)

_USAGE = {
    "nick": "usage: /nick NAME",
    "join": "usage: /join ROOM",
    "me": "usage: /me ACTION",
    "msg": "usage: /msg NICK TEXT",
}


def parse_line(line: str) -> Command | None:
    """Turn one typed line into a command; ``None`` for a blank line.

    Raises :class:`ValidationError` with a usage hint for a malformed command
    or an invalid nick, room or text.
    """
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Say(line)
    if line.startswith("//"):
        return Say(line[1:])
    name, _, rest = line[1:].partition(" ")
    name = name.lower()
    rest = rest.strip()
    if name in ("quit", "exit", "bye"):
        return Quit(rest or "quit")
    if name in ("users", "who", "names"):
        return ListUsers()
    if name == "help":
        return Help()
    if name == "ping":
        return Ping(rest or None)
    if name in _USAGE and not rest:
        raise ValidationError(_USAGE[name], code="usage")
    if name == "nick":
        return Nick(rest)
    if name == "join":
        return Join(rest)
    if name == "me":
        return Say("/me " + rest)
    if name == "msg":
        to, _, text = rest.partition(" ")
        if not text.strip():
            raise ValidationError(_USAGE["msg"], code="usage")
        return Say(text, to=to)
    return Unknown(name)


def line(text: str) -> bytes:
    """One server line, neutralised and newline-terminated."""
    return (neutralise(text) + "\n").encode("utf-8", "replace")


def notice(text: str) -> bytes:
    """A ``* `` notice line."""
    return line("* " + text)


def error(text: str) -> bytes:
    """A ``! `` error line."""
    return line("! " + text)


def greeting(hub_name: str) -> bytes:
    """What a new text-mode connection sees first: who we are, and the nick prompt."""
    return notice(f"lanchat hub {hub_name} -- welcome!") + notice("Choose a nickname:")


def company(others: list[str], count: int | None = None) -> str:
    """Who else is in the room, as the welcome says it: at most WELCOME_MAX_NAMES nicks.

    ``count`` is how many others there are when ``others`` names only some of them.
    The rest are counted (``with alice, bob and 4,990 others``): a room of thousands
    is not listed to every newcomer (``/users`` lists it on request).
    """
    total = max(len(others), count or 0)
    if not total:
        return " (nobody else is here yet)"
    named = others[:WELCOME_MAX_NAMES]
    rest = total - len(named)
    if rest:
        return f" with {', '.join(named)} and {rest:,} other{'s' if rest > 1 else ''}"
    return f" with {', '.join(named)}"


def welcome(nick: str, room: str, others: list[str]) -> bytes:
    """The line after a nick is accepted."""
    return notice(f"Welcome, {nick}! You are in #{room}{company(others)}. "
                  "Type /help for commands.")


def help_text() -> bytes:
    return b"".join(line(h) for h in HELP_LINES)


def encode_message(msg: Message, now: float | None = None) -> bytes:
    """A message as text-mode lines; ``now`` (the hub's clock) marks one from the far future."""
    return (format_message(msg, now=now) + "\n").encode("utf-8", "replace")


def encode_presence(p: Presence) -> bytes:
    """A join/leave/nick notice as a text-mode line."""
    return (format_presence(p) + "\n").encode("utf-8", "replace")
