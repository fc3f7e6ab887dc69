"""Terminal-safe rendering of messages and notices: the one renderer.

Anything that came from the network -- nicks, texts, room names, leave
reasons -- may carry terminal escape sequences (``\\x1b]0;pwned\\x07`` retitles a
window, ``\\x1b[2J`` clears it) or bidi overrides that make text read
differently than it is.  :func:`neutralise` turns every such character into a
visible, inert spelling (``^[``, ``^G``, ``\\u009b``, ``\\u202e``), so what a
user sees is what was sent, and nothing can pose as something else.

The CLI (``lanchat tail``, ``history``, ``chat``) and the hub's text mode
use these functions, so a message looks the same everywhere.  Pure: times are
converted with :func:`time.localtime` (or a given ``tzinfo``); the reader's
clock, where it matters, is passed in (``now``); no I/O.
"""

from __future__ import annotations

import re
import time

from lanchat.limits import FUTURE_SKEW_S

TYPE_CHECKING = False  # not typing's: importing typing costs `lanchat send` ~3 ms (HACKING.md)
if TYPE_CHECKING:
    import datetime as _dt

    from lanchat.model import Message, Presence

#: Characters a terminal may interpret: C0 controls (tab handled apart), DEL,
#: C1 controls (``\\x9b`` is a one-byte CSI on some terminals), Unicode bidi
#: embeddings/overrides/isolates, line/paragraph separators, and lone
#: surrogates (which would make the terminal's encoder raise).
_UNSAFE = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)

#: How a far-future message's time is shown: its date too, since its hour says nothing.
_DATE_TIME = "%Y-%m-%d %H:%M:%S"

#: A tab becomes spaces: its width depends on the column, which a chat line cannot know.
_TAB = "    "


def _visible(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if code < 0x20:
        return "^" + chr(code + 0x40)  # caret notation: ESC -> ^[, BEL -> ^G, LF -> ^J
    if code == 0x7F:
        return "^?"
    return f"\\u{code:04x}"  # C1, bidi, separators, surrogates: an inert escape


def neutralise(s: str) -> str:
    """Return ``s`` with every character a terminal could act on made visible and inert.

    ``\\x1b`` -> ``^[``, ``\\x07`` -> ``^G``, ``\\n`` -> ``^J``, DEL -> ``^?``,
    C1 controls and bidi controls -> ``\\u009b`` style escapes, tab -> spaces.
    Printable text (any script, emoji) is unchanged.
    """
    if "\t" in s:
        s = s.replace("\t", _TAB)
    if _UNSAFE.search(s) is None:
        return s
    return _UNSAFE.sub(_visible, s)


def _escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def safe_json(text: str) -> str:
    """JSON text (``json.dumps``) with every character a terminal could act on escaped.

    ``json.dumps(..., ensure_ascii=False)`` escapes C0 controls but passes DEL,
    C1 controls (``\\x9b`` is a CSI), bidi controls and lone surrogates through
    raw.  Such characters can only stand inside JSON strings, where ``\\u009b``
    means the same: the value is unchanged, the bytes are inert.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escaped, text)


def clock(ts: float, tz: _dt.tzinfo | None = None, *, fmt: str = "%H:%M:%S") -> str:
    """``HH:MM:SS`` of ``ts`` in local time (or in ``tz``); never raises for a finite ``ts``.

    A time the platform cannot convert (``1e17`` is some three billion years
    ahead, past what ``time_t`` or ``datetime`` hold) is shown as question marks
    of the same shape: a peer's timestamp must never crash a renderer.
    """
    try:
        if tz is None:
            return time.strftime(fmt, time.localtime(ts))
        import datetime as _dt  # only for an explicit zone: keeps datetime off `lanchat send`

        return _dt.datetime.fromtimestamp(ts, tz).strftime(fmt)
    except (OverflowError, OSError, ValueError):
        return _UNKNOWN_TIME.get(fmt, "?")


#: What :func:`clock` shows for a time it cannot convert, per format.
_UNKNOWN_TIME = {"%H:%M:%S": "??:??:??", _DATE_TIME: "????-??-?? ??:??:??"}


def stamp(ts: float, tz: _dt.tzinfo | None = None, *, now: float | None = None) -> str:
    """The bracketed time a message is shown with: ``[HH:MM:SS]``.

    Given ``now``, a time more than FUTURE_SKEW_S ahead of it is a claim no
    clock on the LAN makes: it is shown with its date and marked,
    ``[future 2100-01-01 00:00:00]``, so nobody takes it for the present.
    """
    if now is not None and ts > now + FUTURE_SKEW_S:
        return f"[future {clock(ts, tz, fmt=_DATE_TIME)}]"
    return f"[{clock(ts, tz)}]"


def text_lines(text: str) -> list[str]:
    # LF splits lines; a CR before it is the sender's line ending, not content.
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def is_action(text: str) -> bool:
    """True for a ``/me`` action: ``/me waves`` (or ``/me`` alone on its first line)."""
    first = text.split("\n", 1)[0]
    first = first[:-1] if first.endswith("\r") else first  # as text_lines() does
    return first.startswith("/me ") or (first == "/me" and "\n" in text)


def format_message(msg: Message, *, tz: _dt.tzinfo | None = None,
                   show_room: bool = False, now: float | None = None) -> str:
    """One message as terminal-safe text, without a trailing newline.

    ``[HH:MM:SS] nick: text``; ``/me waves`` as ``[HH:MM:SS] * nick waves``; a
    direct message as ``[HH:MM:SS] nick -> to: text``; with ``show_room`` the
    room follows the time (``[HH:MM:SS] #dev nick: text``).  Further lines of a
    multi-line text are indented by two spaces, so no line of a message can
    pose as another message or a notice.  Given ``now`` (the reader's clock), a
    message from far in the future is marked (see :func:`stamp`).
    """
    prefix = f"{stamp(msg.ts, tz, now=now)} "
    if show_room:
        prefix += f"#{neutralise(msg.room)} "
    nick = neutralise(msg.nick)
    lines = text_lines(msg.text)
    first = lines[0]
    if is_action(msg.text):
        head = f"* {nick} {neutralise(first[4:])}"
        if msg.to is not None:
            head = f"-> {neutralise(msg.to)} {head}"
    elif msg.to is not None:
        head = f"{nick} -> {neutralise(msg.to)}: {neutralise(first)}"
    else:
        head = f"{nick}: {neutralise(first)}"
    rest = [f"  {neutralise(line)}" for line in lines[1:]]
    return "\n".join([prefix + head, *rest])


def format_presence(p: Presence, *, tz: _dt.tzinfo | None = None,
                    timestamp: bool = False) -> str:
    """A presence change as a notice: ``* alice joined #lobby``, ``* alice left #lobby (quit)``,
    ``* bob is now known as robert``.  With ``timestamp`` the time is prefixed.
    """
    nick = neutralise(p.nick)
    if p.others:
        nick += f" and {p.others} other{'s' if p.others > 1 else ''}"
    room = neutralise(p.room)
    if p.kind == "join":
        line = f"* {nick} joined #{room}"
    elif p.kind == "leave":
        line = f"* {nick} left #{room}"
        if p.reason:
            line += f" ({neutralise(p.reason)})"
    else:
        old = neutralise(p.old) if p.old is not None else "someone"
        line = f"* {old} is now known as {nick}"
    if timestamp:
        line = f"[{clock(p.ts, tz)}] {line}"
    return line
