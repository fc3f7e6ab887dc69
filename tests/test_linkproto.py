"""The daemon-to-daemon link protocol (lanchat.linkproto): pure frames, cursors, tie-break.

No sockets here: frames are encoded to bytes and parsed back, and every malformed frame a
peer could send must be refused with a RemoteProtocolError or ValidationError (which the link
turns into "protocol error; closing the link"), never anything else.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanchat import linkproto
from lanchat.errors import RemoteProtocolError, ValidationError
from lanchat.feed import Entry, FeedError, SigningKey, sign_entries
from lanchat.limits import MAX_SYNC_CURSORS, MAX_SYNC_PAGE
from lanchat.model import Message, User
from lanchat.presence import NodeRoster, sign_roster

KEY_A, KEY_B, KEY_C = (SigningKey(bytes([i]) * 32) for i in (0xA1, 0xB2, 0xC3))
NODE_A = KEY_A.node
NODE_B = KEY_B.node
NODE_C = KEY_C.node
NONCE = "5e" * 32


def msg(origin: str = NODE_A, seq: int = 1, text: str = "hi", **kw: Any) -> Message:
    return Message(origin=origin, seq=seq, ts=1_700_000_000.0 + seq, room=kw.pop("room", "lobby"),
                   nick=kw.pop("nick", "alice"), host=kw.pop("host", "laptop"), text=text, **kw)


def run_of(texts: list[str], key: SigningKey = KEY_A, first: int = 1, **kw: Any) -> list[Entry]:
    """Entries ``first``.. of ``key``'s feed with these texts (chained, the last signed)."""
    messages = [msg(key.node, first + i, t, **kw) for i, t in enumerate(texts)]
    prev = sign_entries(key, [msg(key.node, i, "x") for i in range(1, first)], None)
    return sign_entries(key, messages, prev[-1].head if prev else None)


def roster(node: str = NODE_B, ver: int = 1, *nicks: str, gone: bool = False) -> NodeRoster:
    users = tuple(User(nick=n, host="h", node=node, local=False, since=1.0) for n in nicks)
    return NodeRoster(node=node, ver=ver, name=f"n-{node[:4]}", host="h", users=users, gone=gone)


def hello(**over: Any) -> linkproto.PeerHello:
    base: dict[str, Any] = dict(node=NODE_A, name="alice on laptop", host="laptop", port=7654,
                                key=KEY_A.public, nonce=NONCE)
    base.update(over)
    return linkproto.PeerHello(**base)


def fields(data: bytes) -> dict[str, Any]:
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    obj = json.loads(data)
    assert isinstance(obj, dict)
    return obj


# -- hello / welcome ---------------------------------------------------------------------------

def test_hello_says_daemon_role_and_round_trips() -> None:
    me = hello()
    obj = fields(linkproto.encode_hello(me))
    # small whatever the network's size: cursors and rosters travel in later frames,
    # because a hub holds a connection's first line to its client frame limit
    assert set(obj) == {"type", "v", "role", "node", "name", "host", "port", "key", "nonce"}
    assert obj["type"] == "hello" and obj["role"] == "daemon" and obj["v"] == linkproto.VERSION
    assert obj["v"] == 3 and obj["key"] == KEY_A.public.text
    assert linkproto.parse_peer_hello(obj) == me


def test_welcome_round_trips_through_parse_frame() -> None:
    me = hello(port=None, proof="p" * 86, admit="ad" * 32)
    frame = linkproto.parse_frame(linkproto.encode_welcome(me))
    assert frame == linkproto.Welcome(me)


def test_a_hello_whose_key_is_not_its_nodes_is_refused() -> None:
    obj = fields(linkproto.encode_hello(hello()))
    for key in (KEY_B.public.text, None, "x" * 43, KEY_A.public.text[:-1]):
        obj["key"] = key
        with pytest.raises(RemoteProtocolError) as info:
            linkproto.parse_peer_hello(obj)
        assert info.value.code == "bad-key"


@pytest.mark.parametrize("nonce", [None, "5e" * 8, "5E" * 32, "5e" * 33, 5])
def test_a_v2_hello_needs_a_fresh_nonce_of_full_length(nonce: object) -> None:
    obj = fields(linkproto.encode_hello(hello()))
    obj["nonce"] = nonce
    with pytest.raises(RemoteProtocolError):
        linkproto.parse_peer_hello(obj)


def test_a_v1_hello_is_read_as_v1_so_that_it_can_be_refused() -> None:
    old = {"type": "hello", "v": 1, "role": "daemon", "node": "ab" * 8, "name": "old",
           "host": "oldhost", "port": 7654, "nonce": "12" * 16}
    peer = linkproto.parse_peer_hello(old)
    assert peer.version == linkproto.OLD_VERSION == 1 and peer.key is None
    refusal = json.loads(linkproto.encode_v1_refusal())
    assert refusal["type"] == linkproto.V1_REFUSAL and "upgrade" in refusal["type"]


def test_an_unsigned_live_roster_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        linkproto.encode_roster(roster(NODE_C, 7, "carol"))


def test_newer_version_is_spoken_down_to_ours() -> None:
    obj = fields(linkproto.encode_hello(hello()))
    obj["v"] = linkproto.VERSION + 5
    assert linkproto.parse_peer_hello(obj).version == linkproto.VERSION


@pytest.mark.parametrize("change", [
    {"node": "NOT-HEX"}, {"node": None}, {"node": "ab"},
    {"name": ""}, {"name": 5}, {"name": "x" * 254},
    {"host": ""}, {"host": None},
    {"port": 0}, {"port": 65536}, {"port": True}, {"port": "7654"},
    {"v": 0}, {"v": True}, {"v": "1"}, {"v": None},
])
def test_bad_hello_is_a_protocol_error(change: dict[str, Any]) -> None:
    obj = fields(linkproto.encode_hello(hello()))
    obj.update(change)
    with pytest.raises(RemoteProtocolError) as info:
        linkproto.parse_peer_hello(obj)
    assert info.value.code == "bad-frame"


# -- cursors --------------------------------------------------------------------------------

def test_cursors_accept_zero_and_big_numbers() -> None:
    assert linkproto.parse_cursors({NODE_A: 0, NODE_B: 2**62}) == {NODE_A: 0, NODE_B: 2**62}
    assert linkproto.parse_cursors({}) == {}


@pytest.mark.parametrize("raw", [
    None, [], "x", {NODE_A: -1}, {NODE_A: 1.5}, {NODE_A: True}, {NODE_A: "3"}, {NODE_A: None},
    {"UPPERCASE1": 1}, {"short": 1}, {"": 1},
])
def test_bad_cursors_are_refused(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        linkproto.parse_cursors(raw)


def test_missing_is_per_origin_what_the_other_lacks() -> None:
    ours = {NODE_A: 5, NODE_B: 2, NODE_C: 7}
    theirs = {NODE_A: 5, NODE_B: 4, NODE_C: 3}
    assert linkproto.missing(ours, theirs) == {NODE_C: 3}
    assert linkproto.missing(ours, {}) == {NODE_A: 0, NODE_B: 0, NODE_C: 0}
    assert linkproto.missing({}, theirs) == {}
    assert linkproto.missing({NODE_A: 0}, {}) == {}


@given(st.dictionaries(st.sampled_from([NODE_A, NODE_B, NODE_C]), st.integers(0, 1000)),
       st.dictionaries(st.sampled_from([NODE_A, NODE_B, NODE_C]), st.integers(0, 1000)))
def test_missing_property(ours: dict[str, int], theirs: dict[str, int]) -> None:
    gaps = linkproto.missing(ours, theirs)
    for origin, start in gaps.items():
        assert start == theirs.get(origin, 0) < ours[origin]
    for origin, high in ours.items():
        if origin not in gaps:
            assert high <= theirs.get(origin, 0)


# -- frames ---------------------------------------------------------------------------------

def test_msgs_round_trip_keeps_order_bytes_and_key() -> None:
    run = run_of([f"m{i}" for i in range(1, 6)]) + run_of(["dm"], first=6, to="bob")[-1:]
    run = sign_entries(KEY_A, [e.message for e in run], None)
    data = linkproto.encode_run(run, KEY_A.public)
    frame = linkproto.parse_frame(data)
    assert frame == linkproto.Msgs(tuple(run), KEY_A.public)
    assert all(a.body is not b.body and a.body == b.body for a, b in zip(frame.entries, run,
                                                                          strict=True))
    assert linkproto.parse_frame(linkproto.encode_run(run)) == linkproto.Msgs(tuple(run))


def test_one_live_message_is_a_msgs_frame() -> None:
    (e,) = run_of(["line one\nline two \x1b[31m \u00e9 \"quoted\" back\\slash"])
    assert linkproto.parse_frame(linkproto.encode_run([e])) == linkproto.Msgs((e,))


def test_a_full_batch_of_maximal_messages_fits_in_one_link_frame() -> None:
    text = "\x01" * 4096  # every byte JSON-escaped to six, then seven in the frame
    run = run_of([text] * linkproto.MAX_BATCH)
    data = linkproto.encode_run(run, KEY_A.public)
    assert len(data) < linkproto.MAX_LINK_FRAME
    frame = linkproto.parse_frame(data)
    assert isinstance(frame, linkproto.Msgs) and len(frame.entries) == linkproto.MAX_BATCH


@pytest.mark.parametrize("make", [
    lambda: (linkproto.encode_roster(sign_roster(KEY_C, roster(NODE_C, 7, "carol", "dave"))),
             linkproto.Roster(roster(NODE_C, 7, "carol", "dave"))),
    lambda: (linkproto.encode_roster(roster(NODE_C, 8, gone=True)),
             linkproto.Gone(NODE_C, 8)),
    lambda: (linkproto.encode_auth("p" * 86, "ad" * 32), linkproto.Auth("p" * 86, "ad" * 32)),
    lambda: (linkproto.encode_sync({NODE_A: 4}), linkproto.Sync({NODE_A: 4})),
    lambda: (linkproto.encode_ping(), linkproto.Ping()),
    lambda: (linkproto.encode_pong(), linkproto.Pong()),
    lambda: (linkproto.encode_bye("shutting down"), linkproto.Bye("shutting down")),
    lambda: (linkproto.encode_error("same-node", "you dialed yourself"),
             linkproto.Refused("same-node", "you dialed yourself")),
])
def test_frames_round_trip(make: Any) -> None:
    data, expected = make()
    assert linkproto.parse_frame(data) == expected


def test_bye_reason_is_bounded_and_defaulted() -> None:
    assert linkproto.parse_frame(b'{"type":"bye","reason":"' + b"x" * 500 + b'"}') \
        == linkproto.Bye("x" * 200)
    assert linkproto.parse_frame(b'{"type":"bye"}') == linkproto.Bye("bye")


def test_refusal_text_is_bounded() -> None:
    frame = linkproto.parse_frame(json.dumps(
        {"type": "error", "code": "c" * 99, "message": "m" * 999}).encode())
    assert frame == linkproto.Refused("c" * 50, "m" * 300)


@pytest.mark.parametrize("line", [
    b"[]", b'"msgs"', b"42", b"null", b"{}",
    b'{"type":"nonsense"}', b'{"type":"hello"}',
    b'{"type":"msgs"}', b'{"type":"msgs","e":{}}', b'{"type":"msgs","e":[1]}',
    b'{"type":"msgs","e":[{"origin":"a1a1a1a1a1a1a1a1"}]}', b'{"type":"msgs","e":[{"b":"{}"}]}',
    b'{"type":"msgs","m":[]}', b'{"type":"msgs","e":[],"k":"not a key"}',
    b'{"type":"sync"}', b'{"type":"sync","cursors":{"a1a1a1a1":-2}}',
    b'{"type":"roster"}', b'{"type":"roster","roster":{"node":"xyz"}}',
    b'{"type":"gone","node":"a1a1a1a1a1a1a1a1"}', b'{"type":"gone","node":"x","ver":1}',
    b'{"type":"auth","proof":"p","admit":"nothex"}',
    b'{"type":"welcome","node":"a1a1a1a1a1a1a1a1"}',
    b"{not json", b'{"type":"ping"', b"\xff\xfe",
])
def test_malformed_frames_are_refused_cleanly(line: bytes) -> None:
    with pytest.raises((RemoteProtocolError, ValidationError)):
        linkproto.parse_frame(line)


def test_oversized_msgs_list_is_refused_before_parsing_it() -> None:
    """Refused for its length alone: with entries that are not even entries, parsing them
    first would raise a FeedError, not the frame's bad-frame."""
    fits = json.loads(linkproto.encode_run(run_of(["x"] * linkproto.MAX_BATCH)))["e"]
    frame = linkproto.parse_frame(json.dumps({"type": "msgs", "e": fits}).encode())
    assert isinstance(frame, linkproto.Msgs) and len(frame.entries) == linkproto.MAX_BATCH
    too_many = [1] * (linkproto.MAX_BATCH + 1)
    with pytest.raises(RemoteProtocolError) as info:
        linkproto.parse_frame(json.dumps({"type": "msgs", "e": too_many}).encode())
    assert info.value.code == "bad-frame"


def test_a_key_that_is_not_the_origins_parses_but_names_its_own_node() -> None:
    """The frame carries any well-formed key; the link checks it is the origin's."""
    frame = linkproto.parse_frame(linkproto.encode_run(run_of(["x"]), KEY_B.public))
    assert isinstance(frame, linkproto.Msgs) and frame.key == KEY_B.public
    assert frame.key.node != frame.entries[0].origin


def test_a_timestamp_beyond_any_float_is_refused_not_an_overflow() -> None:
    """``ts: 10**400`` is valid JSON; it must be a protocol error like any bad field, not an
    OverflowError that no link handler expects (it killed the dialer thread)."""
    (e,) = run_of(["x"])
    body = e.body.decode().replace(f'"ts":{e.message.ts!r}', f'"ts":{10**400}')
    with pytest.raises(FeedError, match="ts"):
        linkproto.parse_frame(json.dumps({"type": "msgs", "e": [{"b": body}]}).encode())


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_garbage_never_escapes_as_another_exception(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError, ValidationError):  # the documented refusals
        linkproto.parse_frame(data)


_texts = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                 min_size=1, max_size=60)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_texts, st.sampled_from(["lobby", "dev", "a.b-c_d"])),
                max_size=linkproto.MAX_BATCH), st.booleans())
def test_msgs_round_trip_property(items: list[tuple[str, str]], with_key: bool) -> None:
    run = sign_entries(KEY_A, [msg(KEY_A.node, i, t, room=r)
                               for i, (t, r) in enumerate(items, 1)], None)
    key = KEY_A.public if with_key else None
    assert linkproto.parse_frame(linkproto.encode_run(run, key)) == linkproto.Msgs(tuple(run), key)


@given(st.dictionaries(st.text("0123456789abcdef", min_size=8, max_size=64),
                       st.integers(0, 2**62), max_size=20))
def test_sync_round_trip_property(cursors: dict[str, int]) -> None:
    assert linkproto.parse_frame(linkproto.encode_sync(cursors)) == linkproto.Sync(cursors)


# -- tie-break ------------------------------------------------------------------------------

def _kept(arrivals: list[str]) -> str:
    """The link one end keeps when links to the same node come up in this order, each named by
    the node that dialed it -- the rule ``links.LinkManager._register`` applies: a new link
    replaces the existing one only if ``keeps`` says so."""
    kept = arrivals[0]
    for dialer in arrivals[1:]:
        if linkproto.keeps(kept, dialer):
            kept = dialer
    return kept


@given(st.lists(st.text("0123456789abcdef", min_size=8, max_size=64), min_size=2, max_size=2,
                unique=True))
def test_tie_break_both_ends_keep_the_same_link_whatever_the_order(pair: list[str]) -> None:
    """Two daemons that dial each other at once each see both links come up, in either order,
    and neither knows the other's order: both must keep the same link -- the one dialed by the
    lower node id (lanchat-protocol(7)) -- or the pair ends with no link, or with two."""
    a, b = pair
    outcomes = {(tuple(at_a), tuple(at_b)): (_kept(list(at_a)), _kept(list(at_b)))
                for at_a in itertools.permutations(pair) for at_b in itertools.permutations(pair)}
    for orders, (kept_by_a, kept_by_b) in outcomes.items():
        assert kept_by_a == kept_by_b == min(a, b), (orders, kept_by_a, kept_by_b)
    # A redial by the same node never displaces the link it already has.
    for dialer in pair:
        assert linkproto.keeps(dialer, dialer) is False


# -- sync pages (issue 13, case 4) --------------------------------------------------------------

def test_a_long_cursor_map_goes_as_pages_and_adds_up_on_the_other_side() -> None:
    n = 3 * MAX_SYNC_PAGE + 5  # four pages
    cursors = {f"{i:016x}": i for i in range(1, n + 1)}
    lines = [x for x in linkproto.encode_sync(cursors).split(b"\n") if x]
    assert len(lines) == 4
    pages = linkproto.SyncPages()
    whole = None
    for n, line in enumerate(lines):
        raw = json.loads(line)
        assert len(raw["cursors"]) <= MAX_SYNC_PAGE
        assert raw.get("more", False) is (n < len(lines) - 1)
        frame = linkproto.parse_frame(line)
        assert isinstance(frame, linkproto.Sync)
        whole = pages.add(frame)
        assert (whole is None) is (n < len(lines) - 1)
    assert whole is not None and whole.cursors == cursors and whole.heads == {}
    # An empty map is still one sync, and a short one has no "more".
    assert json.loads(linkproto.encode_sync({})) == {"type": "sync", "cursors": {}}


def test_an_oversized_sync_is_cut_short_not_a_protocol_error() -> None:
    # One frame as a daemon before paging sends it: more cursors than a receiver keeps.
    many = {f"{i:016x}": 1 for i in range(MAX_SYNC_CURSORS + 100)}
    frame = linkproto.parse_frame(json.dumps({"type": "sync", "cursors": many}).encode())
    assert isinstance(frame, linkproto.Sync)
    assert len(frame.cursors) == MAX_SYNC_CURSORS
    pages = linkproto.SyncPages()
    assert pages.add(linkproto.Sync(frame.cursors, more=True)) is None
    extra = linkproto.Sync({"ffffffffffffffff": 3})
    total = pages.add(extra)
    assert total is not None and len(total.cursors) == MAX_SYNC_CURSORS  # bounded
    # A bad cursor anywhere is still refused.
    bad = {**many, "nothex": 1}
    with pytest.raises(RemoteProtocolError):
        linkproto.parse_frame(json.dumps({"type": "sync", "cursors": bad}).encode())


def test_sync_heads_travel_with_their_pages_and_show_a_fork_of_equal_length() -> None:
    """Head hashes (signed feeds) ride in the page of their cursor; the receiver finds the
    origins whose entry at an equal cursor is another version than its own."""
    n = MAX_SYNC_PAGE + 2
    cursors = {f"{i:032x}": i for i in range(1, n + 1)}
    heads = {o: f"{seq:064x}" for o, seq in cursors.items() if seq % 2}
    pages = linkproto.SyncPages()
    whole = None
    for line in (x for x in linkproto.encode_sync(cursors, heads=heads).split(b"\n") if x):
        raw = json.loads(line)
        assert set(raw.get("heads", {})) <= set(raw["cursors"])
        frame = linkproto.parse_frame(line)
        assert isinstance(frame, linkproto.Sync)
        whole = pages.add(frame)
    assert whole is not None and whole.cursors == cursors and whole.heads == heads
    a, b, c = list(cursors)[:3]  # seqs 1 (a head), 2 (none), 3 (a head)
    ours = {a: (1, heads[a]), b: (2, "ee" * 32), c: (3, "dd" * 32), "f" * 32: (9, "cc" * 32)}
    assert linkproto.diverged(whole, ours) == {c: 3}  # a: same; b: no head sent
    assert linkproto.diverged(whole, {c: (4, "dd" * 32)}) == {}  # unequal: the replay shows it


@pytest.mark.parametrize("heads", [[], {"a" * 32: "AB" * 32}, {"a" * 32: "ab" * 31},
                                   {"a" * 32: 5}])
def test_a_sync_with_bad_heads_is_refused(heads: object) -> None:
    line = json.dumps({"type": "sync", "cursors": {"a" * 32: 1}, "heads": heads}).encode()
    with pytest.raises(RemoteProtocolError, match="head"):
        linkproto.parse_frame(line)


def test_a_head_for_an_origin_not_in_the_page_is_ignored() -> None:
    line = json.dumps({"type": "sync", "cursors": {"a" * 32: 1},
                       "heads": {"b" * 32: "ab" * 32}}).encode()
    frame = linkproto.parse_frame(line)
    assert isinstance(frame, linkproto.Sync) and frame.heads == {}
