"""Signed feeds (lanchat.feed): identities, the entry envelope, run verification, forks.

Everything here is pure: keys come from fixed seeds, entries are made with the real
Ed25519 of ``cryptography``, and every attack is played at the wire level, on the
``{"b", "s"}`` dicts a relay would forward.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanchat.errors import ValidationError
from lanchat.feed import (
    ENTRY_DOMAIN,
    MSG_DOMAIN,
    Entry,
    FeedError,
    FeedHead,
    ForkProof,
    PublicKey,
    SigningKey,
    b64decode,
    b64encode,
    cut_runs,
    encode_body,
    entry_hash,
    fingerprint,
    node_id_of,
    parse_entry,
    parse_run,
    safety_number,
    sign_entries,
    verify_run,
)
from lanchat.fields import validate_node
from lanchat.framing import dumps_line, loads_line
from lanchat.limits import (
    MAX_ENTRY_BODY_BYTES,
    MAX_RUN_ENTRIES,
    MAX_SEAL_TEXT_CHARS,
    SIGN_INTERVAL,
)
from lanchat.linkproto import MAX_BATCH, MAX_LINK_FRAME
from lanchat.model import Message

Wire = dict[str, str]


def key(n: int) -> SigningKey:
    return SigningKey(bytes([n]) * 32)


ALICE, BOB = key(1), key(2)


def msg(k: SigningKey, seq: int, text: str | None = None, **kw: Any) -> Message:
    fields: dict[str, Any] = {"ts": 1_700_000_000.25 + seq, "room": "lobby", "nick": "alice",
                              "host": "host-a", "text": text or f"message {seq}"}
    fields.update(kw)
    return Message(origin=k.node, seq=seq, **fields)


def feed(k: SigningKey, n: int, batches: Sequence[int] = (), *, start: FeedHead | None = None,
         first: int = 1, interval: int = SIGN_INTERVAL, **kw: Any) -> list[Entry]:
    """``n`` entries of ``k``'s feed, appended in batches of the given sizes (then one
    batch for the rest), as the origin would append them."""
    out: list[Entry] = []
    head, seq = start, first
    sizes, left = [], n
    for size in [*batches, n]:
        if left > 0:
            sizes.append(min(size, left))
            left -= sizes[-1]
    for size in sizes:
        made = sign_entries(k, [msg(k, s, **kw) for s in range(seq, seq + size)], head,
                            sign_interval=interval)
        out += made
        if made:
            head, seq = made[-1].head, seq + size
    return out


def wire(entries: Sequence[Entry]) -> list[Wire]:
    return [e.to_wire() for e in entries]


def receive(items: list[Any], k: SigningKey, anchor: FeedHead | None = None) -> list[Entry]:
    """What a receiver does with a run off the wire: parse it strictly, verify it."""
    return list(verify_run(parse_run(items), k.public, anchor))


def raw_entry(body: dict[str, Any] | str | bytes, k: SigningKey = ALICE) -> Wire:
    """A wire entry whose body is exactly this, signed by ``k`` (so only the body is wrong)."""
    if isinstance(body, dict):
        body = json.dumps(body, separators=(",", ":"))
    data = body.encode("latin-1") if isinstance(body, str) else body
    return {"b": data.decode("latin-1"), "s": b64encode(k.sign(MSG_DOMAIN + data))}


def good_fields(seq: Any = 1, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"v": 1, "origin": ALICE.node, "seq": seq, "ts": 1.5, "room": "lobby",
                         "nick": "alice", "host": "h", "text": "hi",
                         "prev": None if seq == 1 else "ab" * 32}
    d.update(kw)
    return d


# -- identity ----------------------------------------------------------------------------

def test_node_id_is_128_bits_of_sha256_of_the_public_key() -> None:
    pub = ALICE.public.raw
    assert ALICE.node == hashlib.sha256(pub).hexdigest()[:32] == node_id_of(pub)
    assert validate_node(ALICE.node) == ALICE.node
    assert ALICE.node != BOB.node


def test_ed25519_is_rfc8032() -> None:
    # RFC 8032 section 7.1, TEST 1: our SigningKey is plain Ed25519 on the 32-byte seed.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    k = SigningKey(seed)
    assert k.public.raw.hex() == ("d75a980182b10ab7d54bfed3c964073a"
                                  "0ee172f3daa62325af021a68f707511a")
    assert k.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert k.seed == seed
    assert "9d61" not in repr(k) and k.node in repr(k)


def test_a_key_is_self_certifying() -> None:
    assert PublicKey.for_node(ALICE.node, ALICE.public.raw) == ALICE.public
    with pytest.raises(ValidationError) as err:
        PublicKey.for_node(BOB.node, ALICE.public.raw)
    assert err.value.code == "wrong-key"
    assert PublicKey.from_text(ALICE.public.text) == ALICE.public
    assert len(ALICE.public.text) == 43
    for bad in ("", "x" * 43 + "=", ALICE.public.text[:-1], 42, None):
        with pytest.raises(ValidationError):
            PublicKey.from_text(bad)
    with pytest.raises(ValidationError):
        PublicKey(b"\x00" * 31)


def test_base64url_is_strict() -> None:
    sig = ALICE.sign(b"x")
    text = b64encode(sig)
    assert len(text) == 86 and "=" not in text and b64decode(text, 64) == sig
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(text[-1])
    other = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]
    for bad in (text + "==", text[:-1], text[:-1] + other, text.replace(text[0], "+", 1)):
        # the low bits of the last character are unused: flipping one is a second spelling
        with pytest.raises(ValueError):
            b64decode(bad, 64)


def test_fingerprint_and_safety_number() -> None:
    fp = fingerprint(ALICE.public)
    groups = fp.split(" ")
    assert len(groups) == 6 and all(len(g) == 5 and g.isdigit() for g in groups)
    assert fingerprint(ALICE.public) == fp != fingerprint(BOB.public)
    # known answers: the digits people compare must not change under their eyes
    assert fp == "55577 79355 07569 84679 47170 08476"
    assert fingerprint(BOB.public) == "12595 76344 33144 28860 38631 00063"
    number = safety_number(ALICE.public, BOB.public)
    assert number == safety_number(BOB.public, ALICE.public)
    assert len(number.split(" ")) == 12
    assert set(number.split(" ")) == set(fp.split(" ")) | set(fingerprint(BOB.public).split())


# -- the envelope --------------------------------------------------------------------------

@st.composite
def messages(draw: st.DrawFn) -> Message:
    text = draw(st.text(st.characters(codec="utf-8", exclude_characters="\0"),
                        min_size=1, max_size=200))
    nick = draw(st.from_regex(r"[a-zA-Z\u00e9\U0001F600][a-z0-9\u00e9\U0001F600_-]{0,10}",
                              fullmatch=True))
    to = draw(st.none() | st.just("bob\u00e9"))
    to_node = None if to is None else draw(st.none() | st.just(BOB.node))
    ts = draw(st.floats(min_value=0, max_value=1e17, allow_nan=False) | st.integers(0, 2**40))
    return Message(origin=ALICE.node, seq=draw(st.integers(1, 2**63 - 1)), ts=ts,
                   room=draw(st.sampled_from(["lobby", "a.b-c_1"])), nick=nick,
                   host="h\u00f6st", text=text, to=to, to_node=to_node)


@settings(max_examples=300, deadline=None)
@given(messages(), st.none() | st.binary(min_size=32, max_size=32))
def test_body_is_compact_ascii_json_and_parses_back(m: Message, prev_raw: bytes | None) -> None:
    prev = None if m.seq == 1 or prev_raw is None else prev_raw.hex()
    if m.seq != 1 and prev is None:
        prev = "00" * 32
    body = encode_body(m, prev)
    fields: dict[str, Any] = {"v": 1, "origin": m.origin, "seq": m.seq, "ts": m.ts,
                              "room": m.room, "nick": m.nick, "host": m.host, "text": m.text}
    if m.to is not None:
        fields["to"] = m.to
    if m.to_node is not None:
        fields["to_node"] = m.to_node
    fields["prev"] = prev
    assert body == json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()
    assert body.isascii()
    entry = parse_entry(body, None)
    assert entry.body is body  # kept, not re-serialized
    assert (entry.message, entry.prev) == (m, prev)
    assert entry.hash == hashlib.sha256(ENTRY_DOMAIN + body).hexdigest()
    # through the wire and back, as relays pass it on
    for e in (entry, entry._replace(sig=ALICE.sign(MSG_DOMAIN + body),
                                    hash=entry_hash(body, ALICE.sign(MSG_DOMAIN + body)))):
        again = Entry.from_wire(loads_line(dumps_line(e.to_wire())))
        assert again == e


def test_sign_entries_signs_batch_ends_and_every_interval() -> None:
    entries = feed(ALICE, 200, batches=(1, 3, 150))
    signed = [e.seq for e in entries if e.sig is not None]
    assert signed == [1, 4, 64, 128, 154, 192, 200]
    for a, b in itertools.pairwise(entries):
        assert b.prev == a.hash and b.seq == a.seq + 1
    assert entries[0].prev is None
    assert all(e.sig is not None for e in feed(ALICE, 10, batches=(5,), interval=1))
    with pytest.raises(ValueError):  # does not continue the head
        sign_entries(ALICE, [msg(ALICE, 3)], entries[0].head)
    with pytest.raises(ValueError):  # not our message
        sign_entries(ALICE, [msg(BOB, 1)], None)


def test_worst_case_body_fits_its_limit_and_a_run_fits_a_frame() -> None:
    astral = "\U0001F600"
    m = Message(origin=ALICE.node, seq=2**63 - 1, ts=1.7976931348623157e308, room="r" * 32,
                nick=astral * 32, host=astral * 253, text="\x01" * 4096, to=astral * 32)
    body = encode_body(m, "f" * 64)
    assert 0.85 * MAX_ENTRY_BODY_BYTES < len(body) <= MAX_ENTRY_BODY_BYTES  # tight, not lax
    assert parse_entry(body, None).message == m
    assert MAX_BATCH == MAX_RUN_ENTRIES  # one run is one msgs frame
    entry = Entry.from_wire(raw_entry(body.decode()))
    frame = dumps_line({"type": "msgs", "e": [entry.to_wire()] * MAX_BATCH})
    assert len(frame) <= MAX_LINK_FRAME
    padded = body[:-1] + b" " * (MAX_ENTRY_BODY_BYTES - len(body)) + b"}"
    assert parse_entry(padded, None).message == m  # white space is allowed...
    with pytest.raises(FeedError, match="limit"):  # ...up to the limit
        parse_entry(padded[:-1] + b" }", None)


# -- strict parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    '{"v":1,"v":1,"origin":"' + ALICE.node + '","seq":1,"ts":1,"room":"lobby","nick":"a",'
    '"host":"h","text":"t","prev":null}',  # a duplicate key (the same value, even)
    '{"v":1,"origin":"' + ALICE.node + '","seq":1,"ts":1,"room":"lobby","nick":"a",'
    '"host":"h","text":"t","prev":null,"text":"other"}',  # a duplicate key: which text?
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": NaN'),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": Infinity'),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": -Infinity'),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": 1e400'),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": ' + str(10**400)),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": ' + "9" * 5000),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": -1'),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": "1.5"'),
    json.dumps(good_fields()).replace('"ts": 1.5', '"ts": true'),
    json.dumps(good_fields(seq=0)),
    json.dumps(good_fields(seq=2**63)),
    json.dumps(good_fields(seq=10**400)),
    json.dumps(good_fields(seq=1.0)),
    json.dumps(good_fields(seq=True)),
    json.dumps({k: v for k, v in good_fields(seq=2).items() if k != "prev"}),  # missing prev
    json.dumps({k: v for k, v in good_fields().items() if k != "prev"}),  # even at seq 1
    json.dumps(good_fields(seq=2, prev=None)),  # only seq 1 has no predecessor
    json.dumps(good_fields(seq=1, prev="ab" * 32)),
    json.dumps(good_fields(seq=2, prev="AB" * 32)),
    json.dumps(good_fields(seq=2, prev="ab" * 31)),
    json.dumps(good_fields(seq=2, prev=5)),
    json.dumps(good_fields(seq=2, prev="ab" * 32 + "a")),  # 65
    json.dumps(good_fields(seq=2, prev="ab" * 31 + "ag")),  # not hex
    json.dumps(good_fields(seq=2, prev="ab" * 31 + "a ")),
    json.dumps(good_fields(seq=2, prev="\u0663" * 64)),  # a digit, not an ASCII one
    json.dumps(good_fields(seq=2, prev=["ab" * 32])),
    json.dumps({**good_fields(seq=2, prev="ab" * 32), "seal": "abc"}),  # seal and text
    json.dumps({k: v for k, v in good_fields().items() if k != "nick"}),
    json.dumps(good_fields(mac="ab" * 32)),  # an extra field
    json.dumps(good_fields(id=f"{ALICE.node}:1")),
    json.dumps(good_fields(v=2)),
    json.dumps(good_fields(v=True)),
    json.dumps(good_fields(v=1.0)),
    json.dumps(good_fields(to=None)),  # absent, not null
    json.dumps(good_fields(to="")),
    json.dumps(good_fields(room="#lobby")),  # not canonical
    json.dumps(good_fields(room="Lobby")),
    json.dumps(good_fields(origin="XYZ")),
    json.dumps(good_fields(text="")),
    json.dumps(good_fields(text="a\x00b")),
    json.dumps(good_fields(text="\ud800")),  # a lone surrogate, spelled in ASCII
    json.dumps(good_fields(text="x" * 4097)),
    json.dumps(good_fields(nick="a b")),
    json.dumps(good_fields(text=["hi"])),
    json.dumps([good_fields()]),
    json.dumps(good_fields()) + "x",
    json.dumps(good_fields()) + " ",  # no white space around the object (inside, yes)
    " " + json.dumps(good_fields()),
    json.dumps(good_fields()) + '{"a":1}',
    "[" * 100_000,
    "",
    "\x00",
])
def test_strict_parsing_rejects(body: str) -> None:
    with pytest.raises(FeedError) as err:
        receive([raw_entry(body)], ALICE)
    assert err.value.code == "bad-entry"
    assert err.value.index == 0


def test_strict_parsing_accepts_what_the_origin_may_write() -> None:
    # white space, an integer ts and a "to": signed bytes are taken as they are
    body = json.dumps(good_fields(ts=17, to="bob"), indent=1)
    (entry,) = receive([raw_entry(body)], ALICE)
    assert entry.body == body.encode() and entry.message.ts == 17.0
    assert entry.message.to == "bob"


def sealed_fields(**kw: Any) -> dict[str, Any]:
    """A sealed direct message's body: ``seal`` where ``text`` was, ``to`` and ``to_node``."""
    d = {("seal" if k == "text" else k): ("QUJD" * 80 if k == "text" else v)
         for k, v in good_fields().items()}
    d = {**{k: v for k, v in d.items() if k != "prev"}, "to": "bob", "to_node": BOB.node,
         "prev": None}
    d.update(kw)
    return d


def test_a_sealed_entry_carries_its_seal_in_place_of_the_text() -> None:
    m = Message(origin=ALICE.node, seq=1, ts=1.5, room="lobby", nick="alice", host="h",
                text="", to="bob", to_node=BOB.node, sealed="QUJD" * 80)
    body = encode_body(m, None)
    assert body == json.dumps(sealed_fields(), separators=(",", ":")).encode()
    (entry,) = receive([raw_entry(body.decode())], ALICE)
    assert entry.message.sealed == "QUJD" * 80 and entry.message.text == ""
    assert entry.message == m and entry.body == body
    biggest = sealed_fields(seal="A" * MAX_SEAL_TEXT_CHARS)
    assert receive([raw_entry(biggest)], ALICE)[0].message.sealed == "A" * MAX_SEAL_TEXT_CHARS


@pytest.mark.parametrize("body", [
    sealed_fields(text="also in clear"),  # both: which one?
    {k: v for k, v in sealed_fields().items() if k != "to_node"},  # whose node seals it?
    {k: v for k, v in sealed_fields().items() if k != "to"},
    sealed_fields(to=None),
    sealed_fields(seal=""),
    sealed_fields(seal="QUJD=="),  # base64url without padding only
    sealed_fields(seal="QU+D"),  # not the URL alphabet
    sealed_fields(seal="A" * (MAX_SEAL_TEXT_CHARS + 1)),
    sealed_fields(seal=["QUJD"]),
    sealed_fields(seal=None),
])
def test_sealed_entries_are_parsed_strictly(body: dict[str, Any]) -> None:
    with pytest.raises(FeedError) as err:
        receive([raw_entry(body)], ALICE)
    assert err.value.code == "bad-entry"


@pytest.mark.parametrize("item", [
    {"b": json.dumps(good_fields(text="caf\u00e9"), ensure_ascii=False)},  # non-ASCII body
    {"b": json.dumps(good_fields()).encode().decode("latin-1") + "\u00ff"},
    {"b": json.dumps(good_fields()), "s": "A" * 86, "x": 1},  # extra key
    {"b": json.dumps(good_fields()), "sig": "A" * 86},
    {"s": "A" * 86},
    {"b": good_fields(), "s": "A" * 86},  # body not a string
    {"b": json.dumps(good_fields()), "s": "A" * 85},
    {"b": json.dumps(good_fields()), "s": "A" * 86 + "=="},
    {"b": json.dumps(good_fields()), "s": None},
    {"b": json.dumps(good_fields()), "s": 5},
    {"b": "x" * (MAX_ENTRY_BODY_BYTES + 1)},
    ["b", "s"],
    "b",
])
def test_strict_wire_form(item: Any) -> None:
    with pytest.raises(FeedError) as err:
        parse_run([item])
    assert err.value.index == 0
    with pytest.raises(FeedError):
        parse_run([*wire(feed(ALICE, 2)), item])


def test_parse_run_bounds_and_names_the_bad_entry() -> None:
    good = wire(feed(ALICE, 5))
    with pytest.raises(FeedError) as err:
        parse_run([*good[:3], {"b": "{}"}, *good[4:]])
    assert err.value.index == 3 and "entry 3" in str(err.value)
    with pytest.raises(FeedError):
        parse_run({"b": "x"})
    with pytest.raises(FeedError):
        parse_run(wire(feed(ALICE, MAX_RUN_ENTRIES + 1)))


# -- run verification ----------------------------------------------------------------------

def test_runs_verify_with_and_without_an_anchor() -> None:
    entries = feed(ALICE, 300, batches=(1, 2, 5, 40, 100))
    runs, rest = cut_runs(entries)
    assert not rest and [e for r in runs for e in r] == entries
    assert all(len(r) <= MAX_RUN_ENTRIES and r[-1].sig is not None for r in runs)
    head: FeedHead | None = None
    for run in runs:
        assert receive(wire(run), ALICE, head) == list(run)
        assert receive(wire(run), ALICE) == list(run)  # a receiver that holds nothing before
        head = run[-1].head
    lone = feed(ALICE, 1, start=head, first=301)
    assert receive(wire(lone), ALICE, head) == lone  # a live message: one entry, one verify
    assert verify_run([], ALICE.public) == []


def test_one_signature_is_checked_per_run() -> None:
    checked: list[bytes] = []

    class Counting(PublicKey):
        __slots__ = ()

        def verify(self, sig: bytes, data: bytes) -> bool:
            checked.append(data)
            return super().verify(sig, data)

    entries = feed(ALICE, 64, interval=1)  # every entry signed: still one check
    verify_run(entries, Counting(ALICE.public.raw))
    assert checked == [MSG_DOMAIN + entries[-1].body]


def _mutations(items: list[Wire]) -> list[tuple[int, str, int, list[Wire]]]:
    """Every run that differs from ``items`` in one byte of one body or signature."""
    out: list[tuple[int, str, int, list[Wire]]] = []
    for i, item in enumerate(items):
        for part in ("b", "s"):
            if part not in item:
                continue
            raw = item["b"].encode() if part == "b" else b64decode(item["s"], 64)
            for pos in range(len(raw)):
                changed = bytearray(raw)
                changed[pos] ^= 0x01
                new = dict(item)
                new[part] = (bytes(changed).decode("latin-1") if part == "b"
                             else b64encode(bytes(changed)))
                out.append((i, part, pos, [*items[:i], new, *items[i + 1:]]))
    return out


def test_every_single_bit_flip_anywhere_in_a_run_is_detected() -> None:
    # Exhaustive: three entries (an unsigned inner one, a signed inner one, the signed head),
    # every byte of every body and signature, flipped.
    entries = feed(ALICE, 4, batches=(1, 2, 1))[1:]
    assert [e.sig is not None for e in entries] == [False, True, True]
    items = wire(entries)
    assert receive(items, ALICE) == entries
    cases = _mutations(items)
    assert len(cases) > 3 * 200
    for i, part, pos, bad in cases:
        with pytest.raises(FeedError) as err:
            receive(bad, ALICE, FeedHead(1, entries[0].prev or ""))
        assert err.value.index in (i, i + 1), (i, part, pos, err.value)
        with pytest.raises(FeedError):
            receive(bad, ALICE)  # no anchor: the chain and the head's signature still hold


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 8), data=st.data())
def test_any_single_byte_change_is_detected(n: int, data: st.DataObject) -> None:
    entries = feed(ALICE, n, batches=data.draw(st.lists(st.integers(1, 4), max_size=3)))
    items = wire(entries)
    i = data.draw(st.integers(0, n - 1))
    parts = [p for p in ("b", "s") if p in items[i]]
    part = data.draw(st.sampled_from(parts))
    raw = bytearray(items[i]["b"].encode() if part == "b" else b64decode(items[i]["s"], 64))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
    bad = dict(items[i])
    bad[part] = bytes(raw).decode("latin-1") if part == "b" else b64encode(bytes(raw))
    with pytest.raises(FeedError):
        receive([*items[:i], bad, *items[i + 1:]], ALICE)


def _fails(code: str, items: list[Any], k: SigningKey = ALICE,
           anchor: FeedHead | None = None) -> FeedError:
    with pytest.raises(FeedError) as err:
        receive(items, k, anchor)
    assert err.value.code == code, err.value
    return err.value


def test_reordering_dropping_duplicating_and_splicing_are_detected() -> None:
    entries = feed(ALICE, 10, interval=1)  # all signed: only the chain can catch these
    items = wire(entries)
    assert _fails("not-consecutive", [items[0], items[2], items[1], *items[3:]]).index == 1
    assert _fails("not-consecutive", [*items[:4], *items[5:]]).index == 4  # dropped
    assert _fails("not-consecutive", [*items[:4], items[3], *items[4:]]).index == 4
    assert _fails("not-consecutive", items[::-1]).index == 1
    bob = wire(feed(BOB, 10, interval=1))
    assert _fails("wrong-origin", [*items[:5], *bob[5:]]).index == 5  # two feeds spliced
    assert _fails("wrong-origin", bob)  # right chain, wrong feed for this key
    # a fork of the same origin spliced in: same key, consecutive seqs, the chain breaks
    fork = wire(feed(ALICE, 10, interval=1, text="the other story"))
    assert _fails("broken-chain", [*items[:5], *fork[5:]]).index == 5


def test_wrong_key_and_wrong_node_id_are_detected() -> None:
    items = wire(feed(ALICE, 5))
    # Bob's key (his node id) for Alice's run: her entries name her origin
    assert _fails("wrong-origin", items, BOB).index == 0
    # A key that claims Alice's node id is refused before any entry is looked at...
    with pytest.raises(ValidationError):
        PublicKey.for_node(ALICE.node, BOB.public.raw)
    # ...and Bob cannot make a run under Alice's origin: his signature is not hers
    body = encode_body(msg(ALICE, 1), None)
    forged = [parse_entry(body, BOB.sign(MSG_DOMAIN + body))]
    assert _fails("bad-signature", wire(forged)).index == 0
    # a signature over the body without the domain label is not a message signature
    assert _fails("bad-signature", [{"b": body.decode(), "s": b64encode(ALICE.sign(body))}])


def test_a_relay_that_re_serializes_a_body_is_detected() -> None:
    entries = feed(ALICE, 3, batches=(1,))
    items = wire(entries)

    def reserialized(i: int, dump: Callable[[Any], str]) -> list[Wire]:
        new = dict(items[i])
        new["b"] = dump(json.loads(items[i]["b"]))
        assert new["b"] != items[i]["b"]
        return [*items[:i], new, *items[i + 1:]]

    for dump in (json.dumps,  # spaces after ':' and ','
                 lambda d: json.dumps(d, separators=(",", ":"), sort_keys=True),
                 lambda d: json.dumps(d, separators=(",", ":"), indent=0)):
        for i in range(3):
            with pytest.raises(FeedError) as err:
                receive(reserialized(i, dump), ALICE)
            assert err.value.code in ("broken-chain", "bad-signature")
    # the same bytes again pass: what is signed is exactly what was sent
    same = [{**it, "b": json.dumps(json.loads(it["b"]), separators=(",", ":"))}
            for it in items]
    assert receive(same, ALICE) == entries


def test_signatures_cannot_be_moved_stripped_or_added() -> None:
    entries = feed(ALICE, 4, batches=(2,))  # signed: 2 and 4
    items = wire(entries)
    assert [("s" in it) for it in items] == [False, True, False, True]
    assert _fails("unsigned-head", items[:1]).index == 0  # run cut at an unsigned entry
    no_head_sig = {"b": items[3]["b"]}
    assert _fails("unsigned-head", [*items[:3], no_head_sig]).index == 3
    stripped = {"b": items[1]["b"]}  # the chain covers signatures: stripping one breaks it
    assert _fails("broken-chain", [items[0], stripped, *items[2:]]).index == 2
    added = {**items[2], "s": items[3]["s"]}
    assert _fails("broken-chain", [*items[:2], added, items[3]]).index == 3
    swapped = {**items[3], "s": items[1]["s"]}
    assert _fails("bad-signature", [*items[:3], swapped]).index == 3


def test_anchor_must_be_extended() -> None:
    entries = feed(ALICE, 6, batches=(3,))
    head = entries[2].head
    assert receive(wire(entries[3:]), ALICE, head) == entries[3:]
    assert _fails("not-consecutive", wire(entries[4:]), anchor=head).index == 0
    other = feed(ALICE, 3, text="elsewhere")[2].head  # the same seq, another history
    assert _fails("broken-chain", wire(entries[3:]), anchor=other).index == 0


def test_an_origin_garbage_signature_on_an_inner_entry_only_hurts_its_own_feed() -> None:
    # The origin signs entry 2 with garbage; the head (4) vouches for it through the chain.
    msgs = [msg(ALICE, s) for s in range(1, 5)]
    entries, prev, items = [], None, []
    for m in msgs:
        body = encode_body(m, prev)
        sig = b"\x00" * 64 if m.seq == 2 else ALICE.sign(MSG_DOMAIN + body) if m.seq == 4 \
            else None
        e = parse_entry(body, sig)
        entries.append(e)
        items.append(e.to_wire())
        prev = e.hash
    assert receive(items, ALICE) == entries  # a receiver stores the run
    _fails("bad-signature", items[:2])  # a run that ends at that entry fails
    # which is why a relay ends its runs where it has verified a signature itself:
    runs, rest = cut_runs(entries, can_end=lambda e: e.seq == 4)
    assert [len(r) for r in runs] == [4] and not rest


def test_cut_runs() -> None:
    entries = feed(ALICE, 10, batches=(2, 2))  # signed: 2, 4, 10
    runs, rest = cut_runs(entries, 3)
    assert [[e.seq for e in r] for r in runs] == [[1, 2], [3, 4]] and len(rest) == 6
    runs, rest = cut_runs(entries)
    assert [[e.seq for e in r] for r in runs] == [list(range(1, 11))] and not rest
    runs, rest = cut_runs(entries[:9])  # the rest waits for its signed successor
    assert [[e.seq for e in r] for r in runs] == [[1, 2, 3, 4]] and len(rest) == 5
    assert cut_runs([]) == ([], [])


# -- forks -----------------------------------------------------------------------------------

def _fork(k: SigningKey = ALICE, at: int = 5, n: int = 8,
          batches: Sequence[int] = ()) -> tuple[list[Entry], list[Entry]]:
    """Two histories of ``k``'s feed that agree before seq ``at`` and differ from there."""
    common = feed(k, at - 1, batches=batches)
    head = common[-1].head if common else None
    ours = common + feed(k, n - at + 1, start=head, first=at, batches=batches)
    theirs = common + feed(k, n - at + 1, start=head, first=at, batches=batches, text="evil")
    return ours, theirs


def test_a_fork_is_proven_and_checked() -> None:
    ours, theirs = _fork()
    verify_run(ours, ALICE.public)
    verify_run(theirs, ALICE.public)
    proof = ForkProof.between(ours, theirs)
    assert proof is not None and (proof.origin, proof.seq) == (ALICE.node, 5)
    assert proof.check(ALICE.public)
    assert not proof.check(BOB.public)
    assert ForkProof.between(theirs, ours) == proof  # one proof, whoever found it
    again = ForkProof.from_dict(json.loads(json.dumps(proof.to_dict())))
    assert again == proof and again.check(ALICE.public)
    assert ForkProof.between(ours, ours) is None
    assert ForkProof.between(ours[:4], theirs[5:]) is None  # no overlap


def test_fork_proofs_with_inner_entries_carry_their_runs() -> None:
    ours, theirs = _fork(at=3, n=10, batches=(5,))  # after seq 2: batches 3-7 and 8-10
    assert [e.seq for e in ours if e.sig is not None] == [2, 7, 10]
    proof = ForkProof.between(ours, theirs)
    assert proof is not None and proof.seq == 3
    assert [e.seq for e in proof.a] == [3, 4, 5, 6, 7, 8, 9, 10]
    assert proof.check(ALICE.public)
    trimmed = ForkProof(proof.a[:5], proof.b[:5])  # still ends at the signed entry 7
    assert trimmed.check(ALICE.public)
    assert not ForkProof(proof.a[:2], proof.b[:2]).check(ALICE.public)  # 4 is unsigned


def test_fork_proofs_are_accepted_only_when_both_sides_verify_and_differ() -> None:
    ours, theirs = _fork()  # signed: 4 (common), 8 (each side)
    a, b = tuple(ours[4:]), tuple(theirs[4:])
    assert ForkProof(a, b).check(ALICE.public)
    # a relay's forgery: a made-up entry 5 "signed" by Bob, or with garbage for a signature
    body = encode_body(msg(ALICE, 5, text="never said"), ours[3].hash)
    forged = parse_entry(body, BOB.sign(MSG_DOMAIN + body))
    garbage = parse_entry(body, b"\x01" * 64)
    for fake in (forged, garbage):
        assert not ForkProof(a, (fake,)).check(ALICE.public)
        assert not ForkProof((fake,), a).check(ALICE.public)
    # a side that is not a run ending at a signature: entry 5 alone is not signed
    assert not ForkProof(a[:1], b[:1]).check(ALICE.public)
    assert not ForkProof(a, a).check(ALICE.public)  # both sides verify but do not differ
    assert not ForkProof(a, b[1:]).check(ALICE.public)  # they do not start at one seq
    assert not ForkProof((), ()).check(ALICE.public)
    assert not ForkProof(a, ()).check(ALICE.public)


@pytest.mark.parametrize("mangle", [
    lambda d: {**d, "seq": d["seq"] + 1},
    lambda d: {**d, "seq": True},
    lambda d: {**d, "origin": BOB.node},
    lambda d: {**d, "a": []},
    lambda d: {**d, "a": "x"},
    lambda d: {**d, "b": [{"b": "{}"}]},
    lambda d: {**d, "extra": 1},
    lambda d: {k: v for k, v in d.items() if k != "b"},
    lambda d: [d],
])
def test_fork_proof_parsing_is_strict(mangle: Callable[[dict[str, Any]], Any]) -> None:
    ours, theirs = _fork(at=1)
    proof = ForkProof.between(ours, theirs)
    assert proof is not None and proof.seq == 1
    with pytest.raises(FeedError) as err:
        ForkProof.from_dict(mangle(json.loads(json.dumps(proof.to_dict()))))
    assert err.value.code == "bad-proof"
