"""Field validation (lanchat.fields): what a fast path must not change."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lanchat.errors import ValidationError
from lanchat.fields import validate_host, validate_nick


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
