"""The chat screen's model (lanchat.chatmodel) without a terminal: buffers, unread counts,
mentions, direct conversations, folding, completion, colours and terminal safety."""

from __future__ import annotations

import subprocess
import sys

from lanchat.chatmodel import (
    DIRECT,
    MENTION,
    NICK_COLOURS,
    QUERY,
    ChatModel,
    Got,
    History,
    Moved,
    People,
    Person,
    State,
    buffer_lines,
    fragments,
    mentions,
    nick_colour,
    paste_lines,
)
from lanchat.limits import SCREEN_FOLD_PRESENCE_OVER, SCREEN_MAX_PASTE_LINES
from lanchat.model import Message, Presence

NODE, OTHER = "a" * 16, "b" * 16
T0 = 1_796_000_000.0
_seq = iter(range(1, 1_000_000))


def msg(text: str, *, nick: str = "bob", room: str = "lobby", to: str | None = None,
        origin: str = OTHER, ts: float = T0) -> Message:
    seq = next(_seq)
    return Message(origin=origin, seq=seq, ts=ts, room=room, nick=nick, host="box", text=text,
                   to=to, id=f"{origin}:{seq}")


def joined(nick: str, room: str = "lobby", kind: str = "join") -> Presence:
    return Presence(kind=kind, nick=nick, host="box", node=OTHER, room=room, ts=T0)  # type: ignore[arg-type]


def model() -> ChatModel:
    return ChatModel(me="alice", room="lobby", node=NODE)


def text_of(m: ChatModel, index: int | None = None) -> list[str]:
    buf = m.buffers[m.current if index is None else index]
    return ["".join(t for _, t in line) for line in buffer_lines(buf)]


def test_a_message_in_another_room_is_unread_there_and_a_mention_marks_it() -> None:
    m = model()
    m.open("dev", show=False)
    assert m.apply(Got(msg("hi all", room="dev"))) is None
    dev = m.find("dev")
    assert dev is not None and dev.unread == 1 and not dev.mentioned
    assert m.apply(Got(msg("Alice, look", room="dev"))) == MENTION
    assert dev.unread == 2 and dev.mentioned
    m.show(1)
    assert dev.unread == 0 and not dev.mentioned


def test_a_mention_in_the_shown_room_alerts_without_unread() -> None:
    m = model()
    assert m.apply(Got(msg("hey alice!"))) == MENTION
    assert m.shown.unread == 0
    assert m.apply(Got(msg("malice is not a mention"))) is None
    assert m.shown.entries[0].mention and not m.shown.entries[1].mention


def test_own_messages_never_alert_nor_count() -> None:
    m = model()
    m.open("dev", show=False)
    assert m.apply(Got(msg("alice here", nick="alice", origin=NODE, room="dev"))) is None
    assert m.find("dev").unread == 0  # type: ignore[union-attr]


def test_a_direct_message_opens_a_conversation_with_the_sender() -> None:
    m = model()
    assert m.apply(Got(msg("psst", to="alice"))) == DIRECT
    query = m.find("bob", QUERY)
    assert query is not None and query.unread == 1 and query.mentioned
    assert m.shown.name == "lobby"  # not switched to
    # Our answer (from our node, to bob) goes to the same conversation.
    m.apply(Got(msg("yes?", nick="alice", origin=NODE, to="bob")))
    assert len(query.entries) == 2 and [b.label for b in m.buffers] == ["#lobby", "bob"]


def test_history_is_not_unread_and_is_merged_in_time_order_once() -> None:
    m = model()
    live = msg("live", ts=T0 + 10)
    m.apply(Got(live))
    old = [msg("first", ts=T0), msg("second", ts=T0 + 5)]
    m.apply(History("lobby", [*old, live]))
    assert [e.text for e in m.shown.entries] == ["first", "second", "live"]
    m.apply(History("lobby", old))  # a reconnect reloads it: nothing doubles
    assert len(m.shown.entries) == 3 and m.shown.unread == 0 and m.shown.loaded


def test_many_joins_fold_into_one_line_and_few_are_listed() -> None:
    m = model()
    m.apply(Moved(joined("carol")))
    m.apply(Moved(joined("dave", kind="leave")))
    assert text_of(m)[-1].endswith("-- carol joined #lobby; dave left #lobby")
    for i in range(SCREEN_FOLD_PRESENCE_OVER + 5):
        m.apply(Moved(joined(f"u{i}")))
    lines = text_of(m)
    assert len(lines) == 2  # the day and one folded line
    assert f"{SCREEN_FOLD_PRESENCE_OVER + 6} joined: carol, u0, u1, u2, u3 and" in lines[-1]
    assert "1 left: dave" in lines[-1]
    m.apply(Got(msg("now talk")))
    m.apply(Moved(joined("eve")))
    assert text_of(m)[-1].endswith("-- eve joined #lobby")  # a new run after a message


def test_a_day_separator_where_the_date_changes() -> None:
    m = model()
    m.apply(Got(msg("late", ts=T0)))
    m.apply(Got(msg("next day", ts=T0 + 86_400)))
    days = [line for line in text_of(m) if line.startswith("───")]
    assert len(days) == 2 and days[0] != days[1]


def test_remote_text_is_terminal_safe_on_screen() -> None:
    m = model()
    m.apply(Got(msg("\x1b]0;pwned\x07 hi\x9b2J \u202eevil")))
    shown = "".join(text_of(m))
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert "\u202e" not in shown
    assert "<bob> ^[]0;pwned^G hi\\u009b2J \\u202eevil" in shown


def test_actions_and_multi_line_messages() -> None:
    m = model()
    m.apply(Got(msg("/me waves")))
    m.apply(Got(msg("line one\nline two")))
    lines = text_of(m)
    assert lines[1].endswith(" * bob waves")
    assert lines[2].endswith("<bob> line one\n    line two")
    when = "".join(t for s, t in fragments(m.shown.entries[0]) if s == "class:time")
    assert when.startswith("[") and when[3] == ":" and when.endswith("] ")  # [HH:MM]


def test_nick_colours_are_stable_across_processes_and_spread() -> None:
    code = "from lanchat.chatmodel import nick_colour; print(nick_colour('alice'))"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(seed)}, check=True).stdout.strip()
            for seed in (1, 2, 3)}
    assert seen == {nick_colour("alice")}
    assert nick_colour("Alice") == nick_colour("alice")
    spread = {nick_colour(f"user{i}") for i in range(60)}
    assert spread <= set(NICK_COLOURS) and len(spread) >= 8


def test_mentions_are_whole_words_in_any_case() -> None:
    assert mentions("ALICE: lunch?", "alice")
    assert mentions("ping @alice.", "alice")
    assert not mentions("malice", "alice") and not mentions("alice2", "alice")
    assert not mentions("anything", "")


def test_tab_completes_nicks_rooms_and_commands_and_cycles() -> None:
    m = model()
    m.apply(People([Person("bob", "box", "lobby", True), Person("bert", "pc", "lobby", False),
                    Person("zed", "pc", "dev", False), Person("alice", "vm", "lobby", True)]))
    assert m.complete("b", 1) == ("bert: ", 6)          # at the start: "nick: "
    assert m.complete("bert: ", 6) == ("bob: ", 5)      # Tab again: the next one
    assert m.complete("bob: ", 5) == ("bert: ", 6)      # and round
    m.reset_completion()
    assert m.complete("hi b", 4) == ("hi bert ", 8)
    m.reset_completion()
    m.apply(Got(msg("I spoke last", nick="bob", ts=T0 + 1)))
    assert m.complete("b", 1) == ("bob: ", 5)           # the last speaker first
    m.reset_completion()
    assert m.complete("/jo", 3) == ("/join ", 6)
    m.reset_completion()
    assert m.complete("/join #d", 8) == ("/join #dev ", 11)
    m.reset_completion()
    assert m.complete("a", 1) is None                   # never ourselves


def test_switching_buffers() -> None:
    m = model()
    m.open("dev", show=False)
    m.open("bob", QUERY, show=False)
    m.step(1)
    assert m.shown.label == "#dev"
    m.step(-2)
    assert m.shown.label == "bob"
    assert not m.show(7) and m.shown.label == "bob"
    assert m.close() is not None and m.shown.label == "#dev"
    m.close()
    assert m.close() is None and m.shown.label == "#lobby"


def test_the_state_event_sets_who_we_are() -> None:
    m = ChatModel(me="", room="lobby")
    m.apply(State("connected", server="daemon box", nick="alice", node=NODE, links=2))
    assert (m.state, m.server, m.me, m.node, m.links) == ("connected", "daemon box", "alice",
                                                          NODE, 2)
    m.apply(State("reconnecting in 1 s"))
    assert m.state == "reconnecting in 1 s" and m.links == 2


def test_a_paste_is_one_message_per_non_blank_line() -> None:
    assert paste_lines("one\r\ntwo\n\n  \nthree\rfour") == ["one", "two", "three", "four"]
    assert len(paste_lines("x\n" * (SCREEN_MAX_PASTE_LINES + 50))) == SCREEN_MAX_PASTE_LINES
