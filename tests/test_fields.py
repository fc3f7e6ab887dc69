"""Field validation (lanchat.fields): what a fast path must not change."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lanchat import fields
from lanchat.errors import ValidationError
from lanchat.fields import (
    validate_host,
    validate_nick,
    validate_node,
    validate_room,
    validate_ts,
)
from lanchat.model import Message


def test_the_only_printable_white_space_is_the_space() -> None:
    # validate_nick and validate_host rely on it: isprintable() and no " " means no space
    assert [c for c in map(chr, range(sys.maxunicode + 1))
            if c.isspace() and c.isprintable()] == [" "]


@given(st.text(max_size=40))
def test_nick_and_host_refuse_white_space_anywhere(text: str) -> None:
    for validate in (validate_nick, validate_host):
        try:
            validate(text)
        except ValidationError:
            continue
        assert not any(c.isspace() for c in text)


@pytest.mark.parametrize("bad", ["a b", "a\tb", "a\u00a0b", "a\u2028b", "\u3000x", "x\u1680",
                                 "x\x1f"])
def test_unicode_white_space_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        validate_nick(bad)
    with pytest.raises(ValidationError):
        validate_host(bad)


# -- the tables of names already found valid ----------------------------------------------

def _outcome(validate: Callable[[object], str], value: object) -> str | None:
    try:
        return validate(value)
    except ValidationError as exc:
        return f"refused: {exc.code}"


@given(st.text(max_size=40) | st.sampled_from(["lobby", "#Lobby", "#lobby", "bob", "a1b2c3d4",
                                                 "ABCDEF12", "#", "", "x" * 33]))
def test_a_remembered_name_gets_the_same_answer_as_a_checked_one(text: str) -> None:
    for validate in (validate_nick, validate_node, validate_room):
        first = _outcome(validate, text)
        again = _outcome(validate, text)  # from the table, if the first one was valid
        fields._known_nicks.clear()
        fields._known_nodes.clear()
        fields._known_rooms.clear()
        assert first == again == _outcome(validate, text)


def test_a_room_is_remembered_with_its_canonical_name() -> None:
    assert validate_room("#Lobby") == "lobby"
    assert validate_room("#Lobby") == "lobby"  # from the table
    assert fields._known_rooms["#Lobby"] == "lobby"


def test_a_flood_of_new_names_keeps_each_table_bounded() -> None:
    for i in range(5 * fields._KNOWN_MAX):
        validate_nick(f"nick{i}")
        validate_node(f"{i:016x}")
        validate_room(f"room{i}")
    for known in (fields._known_nicks, fields._known_nodes, fields._known_rooms):
        assert 0 < len(known) <= fields._KNOWN_MAX


def test_only_exact_strings_are_looked_up() -> None:
    class Sly(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("bob")

    validate_nick("bob")
    with pytest.raises(ValidationError):
        validate_nick(Sly("not a nick"))  # equal to "bob" by its own say, still checked
    with pytest.raises(ValidationError):
        validate_nick(["bob"])  # unhashable: an error, not a TypeError


@given(st.floats() | st.integers(min_value=-(10**400), max_value=10**400) | st.booleans())
def test_ts_is_any_finite_non_negative_number(ts: float | int | bool) -> None:
    if isinstance(ts, bool):
        ok = False
    else:
        try:
            ok = math.isfinite(ts) and ts >= 0
        except OverflowError:
            ok = False
    if ok:
        assert validate_ts(ts) == float(ts)
        assert type(validate_ts(ts)) is float
    else:
        with pytest.raises(ValidationError):
            validate_ts(ts)


# -- messages: the written-out __init__ ---------------------------------------------------

def test_a_message_is_built_from_keywords_and_by_replace() -> None:
    node = "ab" * 8
    by_name = Message(origin=node, seq=3, ts=5, room="#Lobby", nick="bob", host="h", text="hi",
                      to="amy", to_node=node)
    assert by_name == Message(origin=node, seq=3, ts=5.0, room="lobby", nick="bob", host="h",
                              text="hi", to="amy", id=f"{node}:3", to_node=node, signed=False)
    with pytest.raises(TypeError):
        Message(node, 3, 5.0, "lobby", "bob", "h", "hi")  # type: ignore[call-arg]
    assert (by_name.room, by_name.ts, by_name.id, by_name.signed, by_name.sealed) == \
        ("lobby", 5.0, f"{node}:3", True, None)
    assert type(by_name.ts) is float
    assert dataclasses.replace(by_name, text="hello").text == "hello"
    assert dataclasses.replace(by_name, text="hello").id == by_name.id
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_name.text = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(("change", "code"), [
    ({"id": "ab:1"}, "bad-id"), ({"origin": "AB" * 8}, "bad-node"), ({"seq": 0}, "bad-seq"),
    ({"ts": float("nan")}, "bad-ts"), ({"room": "a b"}, "bad-room"), ({"nick": ""}, "bad-nick"),
    ({"host": " "}, "bad-host"), ({"text": ""}, "bad-text"), ({"to_node": "ab" * 8}, "bad-message"),
    ({"sealed": "abc"}, "bad-message"), ({"to": "a b"}, "bad-nick"),
])
def test_a_message_still_refuses_every_bad_field(change: dict[str, object], code: str) -> None:
    fields_ = {"origin": "ab" * 8, "seq": 1, "ts": 1.0, "room": "lobby", "nick": "bob",
               "host": "h", "text": "hi", **change}
    with pytest.raises(ValidationError) as exc:
        Message(**fields_)  # type: ignore[arg-type]
    assert exc.value.code == code
