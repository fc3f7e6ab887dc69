"""The chat screen's model: buffers, unread counts, mentions, completion -- no terminal.

``lanchat chat`` and ``lanchat connect`` on a terminal show a full-screen client
(:mod:`lanchat.chatscreen`); everything it decides that is not drawing lives here, so it
is tested without a terminal: one :class:`Buffer` per room and per direct conversation,
what is unread and where your nick was said, which join/leave notices fold into one line,
what Tab completes, how a nick is coloured.  Both sources (the daemon's control socket and
a hub's JSON mode, :mod:`lanchat.chatsource`) feed it the same :class:`~lanchat.model.Message`
and :class:`~lanchat.model.Presence` values.

Pure: no I/O, no clock (times come with the items), nothing read from the environment.
Remote text is kept as it came and made terminal-safe (:func:`lanchat.render.neutralise`)
where it becomes screen text, in :func:`fragments`.
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from lanchat.limits import (
    SCREEN_FOLD_PRESENCE_OVER,
    SCREEN_MAX_LINES,
    SCREEN_MAX_PASTE_LINES,
)
from lanchat.model import Message, Presence
from lanchat.render import clock, is_action, neutralise, text_lines

#: What Tab completes at the start of the line (and what /help lists).
COMMANDS = ("/close", "/help", "/join", "/me", "/msg", "/nick", "/query", "/quit", "/users")

HELP_LINES = (
    "/join ROOM (or #ROOM)  open a room;  /query NICK  a direct conversation;  /close  leave it",
    "/msg NICK TEXT  direct message;  /me ACTION;  /nick NAME;  /users;  /quit (or Ctrl-D)",
    "Alt-1..9, Ctrl-N/Ctrl-P switch buffers; PgUp/PgDn (or the wheel) scroll; Tab completes;"
    " // sends a line starting with /",
)

#: Nick colours: the 12 ANSI colours that read on a dark and on a light background, so a
#: 16-colour terminal shows them as they are (black, white and greys are left out).
NICK_COLOURS = ("ansired", "ansigreen", "ansiyellow", "ansiblue", "ansimagenta", "ansicyan",
                "ansibrightred", "ansibrightgreen", "ansibrightyellow", "ansibrightblue",
                "ansibrightmagenta", "ansibrightcyan")

ROOM = "room"
QUERY = "query"

#: What a live message asks of the terminal besides drawing it.
MENTION = "mention"
DIRECT = "direct"


def nick_colour(nick: str) -> str:
    """The colour of ``nick``: the same in every session and on every machine (CRC-32 of
    its case-folded name, not Python's salted ``hash``)."""
    return NICK_COLOURS[zlib.crc32(nick.casefold().encode("utf-8", "replace"))
                        % len(NICK_COLOURS)]


def mentions(text: str, nick: str) -> bool:
    """True when ``nick`` is said in ``text`` as a word of its own (any case)."""
    if not nick:
        return False
    return re.search(rf"(?<![\w]){re.escape(nick)}(?![\w])", text, re.IGNORECASE) is not None


def paste_lines(data: str) -> list[str]:
    """A paste as the messages it becomes: one per non-blank line (CR LF, CR or LF), at most
    SCREEN_MAX_PASTE_LINES."""
    lines = [ln for ln in re.split(r"\r\n|\r|\n", data) if ln.strip()]
    return lines[:SCREEN_MAX_PASTE_LINES]


@dataclass
class Entry:
    """One line of a buffer (a message may span several screen rows)."""

    kind: str            # "message", "action", "presence", "notice", "error"
    ts: float
    nick: str = ""
    text: str = ""
    to: str | None = None
    mention: bool = False
    own: bool = False
    #: A folded run of join/leave notices: (nick, "joined" or "left") each.
    moves: list[tuple[str, str]] = field(default_factory=list)
    id: str = ""


@dataclass
class Buffer:
    """A room (``#lobby``) or a direct conversation (``bob``), with what is unread in it."""

    name: str
    kind: str = ROOM
    entries: deque[Entry] = field(default_factory=lambda: deque(maxlen=SCREEN_MAX_LINES))
    ids: set[str] = field(default_factory=set)
    unread: int = 0
    mentioned: bool = False     # a mention (or, for a conversation, any message) unread
    loaded: bool = False        # its history was asked for
    scroll: int = 0             # screen rows up from the bottom

    @property
    def label(self) -> str:
        return f"#{self.name}" if self.kind == ROOM else self.name

    def key(self) -> tuple[str, str]:
        return (self.kind, self.name.casefold() if self.kind == QUERY else self.name)

    def add(self, entry: Entry) -> bool:
        """Append (or, for history, insert in time order); False if already there."""
        if entry.id:
            if entry.id in self.ids:
                return False
            self.ids.add(entry.id)
        if self.entries and entry.ts < self.entries[-1].ts:
            items = sorted([*self.entries, entry], key=lambda e: e.ts)  # stable
            self.entries.clear()
            self.entries.extend(items[-SCREEN_MAX_LINES:])
        else:
            self.entries.append(entry)
        return True


@dataclass
class Person:
    """One line of the user list."""

    nick: str
    host: str
    room: str
    local: bool


# -- events: what a source (lanchat.chatsource) hands the screen ---------------------------------

@dataclass(frozen=True)
class Got:
    """A message; ``own`` when the source knows it is ours (a hub's ``sent``)."""

    message: Message
    own: bool | None = None


@dataclass(frozen=True)
class Moved:
    """Someone joined, left or changed nick."""

    presence: Presence


@dataclass(frozen=True)
class History:
    """A room's recent history (oldest first), loaded when it is shown."""

    room: str
    messages: list[Message]


@dataclass(frozen=True)
class People:
    """Who is connected (the whole network through a daemon, one room on a hub)."""

    people: list[Person]


@dataclass(frozen=True)
class State:
    """The connection: ``connected``, ``reconnecting in 2 s``...; what we are connected to,
    our nick and node, and how many daemons are linked (None: not known)."""

    state: str
    server: str | None = None
    nick: str | None = None
    node: str | None = None
    links: int | None = None


@dataclass(frozen=True)
class Note:
    """A local remark for the shown buffer (``error``: something failed)."""

    text: str
    ts: float
    error: bool = False


@dataclass(frozen=True)
class InRoom:
    """The hub moved us to ``room`` (its answer to a join)."""

    room: str


Event = Got | Moved | History | People | State | Note | InRoom


class ChatModel:
    """Every buffer of one session, which one is shown, and who is around.

    ``me`` is our nick; ``node`` our daemon's node id (``lanchat chat``; None for a hub
    session, where the source says which messages are ours).
    """

    def __init__(self, *, me: str, room: str, node: str | None = None) -> None:
        self.me = me
        self.node = node
        self.buffers: list[Buffer] = [Buffer(room)]
        self.current = 0
        self.people: list[Person] = []
        self.rooms_seen: set[str] = {room}
        self.state = "connecting"
        self.server = ""
        self.links: int | None = None
        self._spoke: dict[str, float] = {}   # nick -> last time it spoke (completion order)
        self._completion: tuple[str, int, list[str], int, int] | None = None

    # -- events ------------------------------------------------------------------------------

    def apply(self, event: Event) -> str | None:
        """Take one event from the source; what to alert (MENTION, DIRECT) or None."""
        if isinstance(event, Got):
            return self.add_message(event.message, own=event.own)
        if isinstance(event, Moved):
            self.add_presence(event.presence)
        elif isinstance(event, History):
            self.add_history(event.room, event.messages)
        elif isinstance(event, People):
            self.set_people(event.people)
        elif isinstance(event, State):
            self.state = event.state
            if event.server is not None:
                self.server = event.server
            if event.nick is not None:
                self.me = event.nick
            if event.node is not None:
                self.node = event.node
            if event.links is not None:
                self.links = event.links
        elif isinstance(event, Note):
            self.note(event.text, ts=event.ts, kind="error" if event.error else "notice")
        else:
            self.open(event.room, ROOM)
        return None

    # -- buffers ---------------------------------------------------------------------------

    @property
    def shown(self) -> Buffer:
        return self.buffers[self.current]

    def find(self, name: str, kind: str = ROOM) -> Buffer | None:
        key = (kind, name.casefold() if kind == QUERY else name)
        return next((b for b in self.buffers if b.key() == key), None)

    def open(self, name: str, kind: str = ROOM, *, show: bool = True) -> Buffer:
        """The buffer ``name`` (made if new); shown when ``show``."""
        buf = self.find(name, kind)
        if buf is None:
            buf = Buffer(name, kind)
            self.buffers.append(buf)
            if kind == ROOM:
                self.rooms_seen.add(name)
        if show:
            self.show(self.buffers.index(buf))
        return buf

    def show(self, index: int) -> bool:
        """Show buffer ``index`` (0-based); False if there is none."""
        if not 0 <= index < len(self.buffers):
            return False
        self.current = index
        buf = self.buffers[index]
        buf.unread = 0
        buf.mentioned = False
        return True

    def step(self, delta: int) -> None:
        """Ctrl-N / Ctrl-P: the next or previous buffer, round the end."""
        self.show((self.current + delta) % len(self.buffers))

    def close(self) -> Buffer | None:
        """Close the shown buffer (never the last one); the closed one, or None."""
        if len(self.buffers) == 1:
            return None
        buf = self.buffers.pop(self.current)
        self.show(min(self.current, len(self.buffers) - 1))
        return buf

    # -- what arrives ------------------------------------------------------------------------

    def is_own(self, msg: Message) -> bool:
        if self.node is not None:
            return msg.origin == self.node and msg.nick == self.me
        return msg.nick == self.me

    def add_message(self, msg: Message, *, own: bool | None = None,
                    live: bool = True) -> str | None:
        """Put ``msg`` in its buffer; for a live one, what to alert: MENTION, DIRECT or None.

        A direct message goes to the conversation with the other end (opened if new, not
        shown).  History (``live`` False) is never unread and never alerts.
        """
        mine = self.is_own(msg) if own is None else own
        if msg.to is not None:
            buf = self.open(msg.to if mine else msg.nick, QUERY, show=False)
        else:
            buf = self.open(msg.room, ROOM, show=False)
        action = is_action(msg.text)
        body = msg.text[4:] if action else msg.text
        said = not mine and mentions(body, self.me)
        entry = Entry("action" if action else "message", msg.ts, msg.nick, body, msg.to,
                      mention=said, own=mine, id=msg.id)
        if not buf.add(entry) or not live:
            return None
        if not mine:
            self._spoke[msg.nick] = msg.ts
        if buf is self.shown or mine:
            return MENTION if said else None
        buf.unread += 1
        if said or msg.to is not None:
            buf.mentioned = True
        if msg.to is not None:
            return DIRECT
        return MENTION if said else None

    def add_history(self, room: str, messages: list[Message]) -> None:
        buf = self.open(room, ROOM, show=False)
        buf.loaded = True
        for msg in messages:
            self.add_message(msg, live=False)

    def add_presence(self, p: Presence) -> None:
        """A join, leave or nick change: dimmed, and folded when many come in a row."""
        if p.kind == "nick":
            for buf in self.buffers:
                if buf.kind == QUERY and p.old is not None and buf.name == p.old:
                    buf.name = p.nick
            self.note(f"{p.old or 'someone'} is now known as {p.nick}", ts=p.ts,
                      room=p.room, kind="presence")
            return
        self.rooms_seen.add(p.room)
        shown = self.find(p.room)
        if shown is None:
            return  # a room we do not show: its user count changes, no line
        buf = shown
        verb = "joined" if p.kind == "join" else "left"
        who = p.nick + (f" and {p.others} other{'s' if p.others > 1 else ''}" if p.others else "")
        last = buf.entries[-1] if buf.entries else None
        if last is not None and last.kind == "presence" and last.moves:
            last.moves.append((who, verb))
            last.ts = max(last.ts, p.ts)
            return
        buf.add(Entry("presence", p.ts, moves=[(who, verb)],
                      text=f"#{p.room}" + (f" ({p.reason})" if p.reason else "")))

    def note(self, text: str, *, ts: float, room: str | None = None, kind: str = "notice") -> None:
        """A local line ("notice", "error" or "presence") in ``room``'s buffer or the shown one."""
        buf = (self.find(room) if room is not None else None) or self.shown
        buf.add(Entry(kind, ts, text=text))

    def set_people(self, people: list[Person]) -> None:
        self.people = people
        self.rooms_seen.update(p.room for p in people)

    def room_people(self) -> list[Person]:
        """The user list of the shown buffer: its room's people, sorted by nick."""
        buf = self.shown
        if buf.kind == QUERY:
            found = [p for p in self.people if p.nick.casefold() == buf.name.casefold()]
        else:
            found = [p for p in self.people if p.room == buf.name]
        return sorted(found, key=lambda p: (p.nick.casefold(), p.host))

    # -- completion --------------------------------------------------------------------------

    def complete(self, text: str, cursor: int) -> tuple[str, int] | None:
        """Tab: complete the word before ``cursor`` (a command, ``#room`` or nick); Tab again
        cycles through the other candidates.  Returns the new (text, cursor), or None."""
        state = self._completion
        if state is not None and state[0] == text and state[1] == cursor:
            _, _, found, start, index = state
            index = (index + 1) % len(found)
        else:
            start = cursor
            while start > 0 and not text[start - 1].isspace():
                start -= 1
            word = text[start:cursor]
            found = self._candidates(word, first=start == 0)
            if not found:
                self._completion = None
                return None
            index = 0
        # Cycling replaces what the last Tab put in: from start to the cursor.
        cand = found[index]
        new = text[:start] + cand + text[cursor:]
        new_cursor = start + len(cand)
        self._completion = (new, new_cursor, found, start, index)
        return new, new_cursor

    def reset_completion(self) -> None:
        self._completion = None

    def _candidates(self, word: str, *, first: bool) -> list[str]:
        low = word.casefold()
        if first and word.startswith("/"):
            return [c + " " for c in COMMANDS if c.startswith(low)]
        if word.startswith("#"):
            rooms = sorted(self.rooms_seen)
            return [f"#{r} " for r in rooms if f"#{r}".casefold().startswith(low)]
        if not word:
            return []
        nicks = {p.nick for p in self.room_people()} | set(self._spoke)
        nicks.discard(self.me)
        order = sorted(nicks, key=lambda n: (-self._spoke.get(n, 0.0), n.casefold()))
        suffix = ": " if first else " "
        return [n + suffix for n in order if n.casefold().startswith(low)]


# -- what the screen shows -----------------------------------------------------------------------

Fragments = list[tuple[str, str]]


def day_of(ts: float) -> str:
    """The day separator's text for ``ts`` (local time)."""
    return clock(ts, fmt="%A, %d %B %Y")


def fragments(entry: Entry) -> Fragments:
    """One entry as (style, text) pieces; ``\\n`` separates its lines.  Every piece of remote
    text goes through :func:`~lanchat.render.neutralise` here, and nowhere else."""
    when = ("class:time", f"[{clock(entry.ts, fmt='%H:%M')}] ")
    nick = neutralise(entry.nick)
    colour = "class:own" if entry.own else f"class:nick {nick_colour(entry.nick)}"
    body_style = "class:mention" if entry.mention else "class:text"
    lines = [neutralise(line) for line in text_lines(entry.text)]
    if entry.kind == "message":
        head: Fragments = [when]
        if entry.to is not None and entry.own:
            head += [("class:dim", f"-> {neutralise(entry.to)} ")]
        head += [(colour, f"<{nick}>"), ("", " "), (body_style, lines[0])]
    elif entry.kind == "action":
        head = [when, ("class:action", " * "), (colour, nick), ("", " "),
                (body_style, lines[0])]
    elif entry.kind == "presence":
        return [when, ("class:presence", neutralise(_moves_text(entry)))]
    else:
        style = "class:error" if entry.kind == "error" else "class:notice"
        return [when, (style, "-- " + "\n   ".join(lines))]
    for line in lines[1:]:
        head += [("", "\n"), (body_style, "    " + line)]
    return head


def _moves_text(entry: Entry) -> str:
    moves = entry.moves
    if not moves:
        return f"-- {entry.text}"
    if len(moves) <= SCREEN_FOLD_PRESENCE_OVER:
        return "-- " + "; ".join(f"{who} {verb} {entry.text}" for who, verb in moves)
    parts = []
    for verb in ("joined", "left"):
        who = [w for w, v in moves if v == verb]
        if who:
            shown = ", ".join(who[:5]) + (f" and {len(who) - 5} more" if len(who) > 5 else "")
            parts.append(f"{len(who)} {verb}: {shown}")
    return f"-- {entry.text.split(' ', 1)[0]}: " + "; ".join(parts)


def lines_backwards(buf: Buffer) -> Iterator[Fragments]:
    """The buffer's lines, newest first, with a day separator above the first line of each
    date: the screen takes only as many as it shows, however long the buffer."""
    entries = buf.entries
    for i in range(len(entries) - 1, -1, -1):
        entry = entries[i]
        yield fragments(entry)
        day = day_of(entry.ts)
        if i == 0 or day_of(entries[i - 1].ts) != day:
            yield [("class:day", f"─── {day} ───")]


def buffer_lines(buf: Buffer) -> list[Fragments]:
    """The buffer's lines, oldest first, with a day separator wherever the date changes."""
    return list(lines_backwards(buf))[::-1]
