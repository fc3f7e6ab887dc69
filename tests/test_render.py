"""Terminal-safe rendering: nothing from the network reaches a terminal raw."""

from __future__ import annotations

import datetime as dt
import re

from hypothesis import given
from hypothesis import strategies as st

from lanchat.model import Message, Presence
from lanchat.render import format_message, format_presence, neutralise

UTC = dt.UTC
NODE = "0123456789abcdef"
DANGEROUS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def msg(text: str, nick: str = "alice", to: str | None = None, room: str = "lobby") -> Message:
    return Message(origin=NODE, seq=1, ts=3600 * 12 + 61, room=room, nick=nick,
                   host="box", text=text, to=to)


def test_escape_sequences_become_visible() -> None:
    assert neutralise("\x1b]0;pwned\x07") == "^[]0;pwned^G"
    assert neutralise("\x1b[2J\x1b[31mred") == "^[[2J^[[31mred"
    assert neutralise("a\x9b31mb") == "a\\u009b31mb"
    assert neutralise("\x7f\x00\r\n") == "^?^@^M^J"
    assert neutralise("evil\u202egnp.exe") == "evil\\u202egnp.exe"
    assert neutralise("\u2066x\u2069") == "\\u2066x\\u2069"
    assert neutralise("\ud800") == "\\ud800"
    assert neutralise("a\tb") == "a    b"


def test_printable_text_unchanged() -> None:
    for s in ("hello", "héllo wörld", "日本語", "emoji 🎉 👨‍👩‍👧", "a [b] {c}"):
        assert neutralise(s) == s


@given(st.text())
def test_neutralise_output_is_always_safe(s: str) -> None:
    out = neutralise(s)
    assert DANGEROUS.search(out) is None
    out.encode("utf-8")  # never raises: no lone surrogates left


def test_format_message_basic_me_and_dm() -> None:
    assert format_message(msg("hi"), tz=UTC) == "[12:01:01] alice: hi"
    assert format_message(msg("/me waves"), tz=UTC) == "[12:01:01] * alice waves"
    assert format_message(msg("psst", to="bob"), tz=UTC) == "[12:01:01] alice -> bob: psst"
    assert format_message(msg("hi", room="dev"), tz=UTC, show_room=True) == \
        "[12:01:01] #dev alice: hi"


def test_multiline_text_is_indented() -> None:
    out = format_message(msg("one\r\ntwo\n[12:00:00] bob: fake"), tz=UTC)
    assert out.split("\n") == ["[12:01:01] alice: one", "  two", "  [12:00:00] bob: fake"]


def test_format_message_neutralises_every_field() -> None:
    out = format_message(msg("\x1b]0;pwned\x07 \x1b[2J"), tz=UTC)
    assert "\x1b" not in out and "\x07" not in out
    assert out == "[12:01:01] alice: ^[]0;pwned^G ^[[2J"


def test_local_time_by_default() -> None:
    out = format_message(msg("x"))
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] alice: x", out)


def test_format_presence() -> None:
    base = {"host": "box", "node": NODE, "room": "lobby", "ts": 0.0}
    assert format_presence(Presence(kind="join", nick="alice", **base)) == \
        "* alice joined #lobby"
    assert format_presence(Presence(kind="leave", nick="alice", reason="quit\x1b[2J", **base)) \
        == "* alice left #lobby (quit^[[2J)"
    assert format_presence(Presence(kind="leave", nick="alice", **base)) == "* alice left #lobby"
    assert format_presence(Presence(kind="nick", nick="robert", old="bob", **base)) == \
        "* bob is now known as robert"
    assert format_presence(Presence(kind="join", nick="a", **base), tz=UTC,
                           timestamp=True) == "[00:00:00] * a joined #lobby"


def test_a_time_beyond_time_t_renders_instead_of_raising() -> None:
    """A valid message may carry any finite ``ts`` (a peer's clock, or its lie).  Rendering runs
    inside the router's fan-out: an exception there once left text clients without the message
    and the peer's link wedged, so such a time is shown as ``--:--:--`` instead."""
    for ts in (1e17, 1e300, 2.0**63):
        far = Message(origin=NODE, seq=1, ts=ts, room="lobby", nick="alice", host="box",
                      text="from the far future")
        assert format_message(far) == "[--:--:--] alice: from the far future"
        assert format_message(far, tz=UTC) == "[--:--:--] alice: from the far future"
        p = Presence(kind="join", nick="a", host="box", node=NODE, room="lobby", ts=ts)
        assert format_presence(p, tz=UTC, timestamp=True) == "[--:--:--] * a joined #lobby"
    last = Message(origin=NODE, seq=1, ts=253402300799.0, room="lobby", nick="alice",
                   host="box", text="x")  # 9999-12-31 23:59:59 UTC: still a time
    assert format_message(last, tz=UTC) == "[23:59:59] alice: x"
