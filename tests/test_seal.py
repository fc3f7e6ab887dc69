"""Sealed direct messages (lanchat.seal): only the two ends open them, every byte is covered."""

from __future__ import annotations

import json
import secrets

import pytest

from lanchat import seal
from lanchat.errors import LocalProtocolError, ValidationError
from lanchat.feed import MSG_DOMAIN, SigningKey, b64encode
from lanchat.limits import (
    MAX_DH_RECORD_BYTES,
    MAX_SEAL_TEXT_CHARS,
    MAX_SEALED_TEXT_BYTES,
    SEAL_PAD_BYTES,
)
from lanchat.seal import DhKey, DhPublic, DhRecord, SealError


class Node:
    def __init__(self, ver: int = 1) -> None:
        self.identity = SigningKey(secrets.token_bytes(32))
        self.dh = DhKey.derive(self.identity, ver)
        self.record = DhRecord.make(self.identity, self.dh, ver)

    @property
    def public(self) -> DhPublic:
        return self.record.public


ALICE, BOB, CAROL = Node(), Node(), Node()
CONTEXT = b"origin=alice-node room=lobby to=bob"


def sealed(text: bytes = b"meet at 5", context: bytes = CONTEXT) -> bytes:
    return seal.seal(text, sender=ALICE.public, recipient=BOB.public, context=context,
                     entropy=secrets.token_bytes)


def open_as(node: Node, blob: bytes, *, sender: Node = ALICE, recipient: Node = BOB,
            context: bytes = CONTEXT) -> bytes:
    return seal.open_sealed(blob, node.dh, sender=sender.public, recipient=recipient.public,
                            context=context)


# -- key records --------------------------------------------------------------------------

def test_record_round_trip_and_canonical_body() -> None:
    wire = ALICE.record.to_wire()
    assert json.loads(wire["b"]) == {"v": 1, "node": ALICE.identity.node, "ver": 1,
                                     "x25519": b64encode(ALICE.dh.public)}
    assert wire["b"].startswith('{"v":1,"node":')
    got = DhRecord.from_wire(wire, ALICE.identity.public)
    assert got == ALICE.record and got.public == DhPublic(ALICE.identity.node, ALICE.dh.public)
    assert len(wire["b"]) < MAX_DH_RECORD_BYTES // 2


def test_derived_keys_depend_on_identity_and_version() -> None:
    assert DhKey.derive(ALICE.identity, 1).public == ALICE.dh.public
    assert DhKey.derive(ALICE.identity, 2).public != ALICE.dh.public
    assert DhKey.derive(BOB.identity, 1).public != ALICE.dh.public
    for bad in (0, -1, seal.MAX_VER + 1, True, 1.0):
        with pytest.raises(ValidationError):
            DhKey.derive(ALICE.identity, bad)  # type: ignore[arg-type]


def test_record_signed_by_another_key_or_naming_another_node_is_refused() -> None:
    wire = ALICE.record.to_wire()
    with pytest.raises(SealError, match="came with node"):
        DhRecord.from_wire(wire, BOB.identity.public)
    # Bob signs a record claiming Alice's node: the signature is not Alice's
    body = wire["b"].encode()
    forged = {"b": wire["b"], "s": b64encode(BOB.identity.sign(seal.DHKEY_DOMAIN + body))}
    with pytest.raises(SealError, match="not signed by its key"):
        DhRecord.from_wire(forged, ALICE.identity.public)
    # Alice's signature over the same body in another domain (a message) does not count
    other = {"b": wire["b"], "s": b64encode(ALICE.identity.sign(MSG_DOMAIN + body))}
    with pytest.raises(SealError, match="not signed by its key"):
        DhRecord.from_wire(other, ALICE.identity.public)


def test_every_changed_byte_of_a_record_is_refused() -> None:
    wire = ALICE.record.to_wire()
    for i in range(len(wire["b"])):
        for repl in ("0", "A", " "):
            if wire["b"][i] == repl:
                continue
            changed = {"b": wire["b"][:i] + repl + wire["b"][i + 1:], "s": wire["s"]}
            with pytest.raises(SealError):
                DhRecord.from_wire(changed, ALICE.identity.public)
    sig = bytearray(ALICE.record.sig)
    for i in range(len(sig)):
        sig[i] ^= 0x01
        with pytest.raises(SealError):
            DhRecord.from_wire({"b": wire["b"], "s": b64encode(bytes(sig))},
                               ALICE.identity.public)
        sig[i] ^= 0x01


def signed(identity: SigningKey, body: str) -> dict[str, str]:
    return {"b": body, "s": b64encode(identity.sign(seal.DHKEY_DOMAIN + body.encode()))}


@pytest.mark.parametrize("body", [
    '{"v":1,"node":"NODE","ver":1,"x25519":"KEY"} ',
    '{"v":1, "node":"NODE","ver":1,"x25519":"KEY"}',
    '{"node":"NODE","v":1,"ver":1,"x25519":"KEY"}',
    '{"v":1,"node":"NODE","ver":1,"x25519":"KEY","extra":1}',
    '{"v":1,"node":"NODE","ver":1,"ver":1,"x25519":"KEY"}',
    '{"v":2,"node":"NODE","ver":1,"x25519":"KEY"}',
    '{"v":1,"node":"NODE","ver":0,"x25519":"KEY"}',
    '{"v":1,"node":"NODE","ver":1.0,"x25519":"KEY"}',
    '{"v":true,"node":"NODE","ver":1,"x25519":"KEY"}',
    '{"v":1,"node":"NODE","ver":9007199254740993,"x25519":"KEY"}',
    '{"v":1,"node":"NODE","ver":1,"x25519":"KEY="}',
    '{"v":1,"node":"NODE","ver":1,"x25519":"SMALL"}',
    '[1]', '', 'null',
])
def test_validly_signed_but_non_canonical_records_are_refused(body: str) -> None:
    small_order = b64encode(bytes(32))  # the all-zero point
    body = (body.replace("NODE", ALICE.identity.node).replace("SMALL", small_order)
            .replace("KEY", b64encode(ALICE.dh.public)))
    with pytest.raises(SealError):
        DhRecord.from_wire(signed(ALICE.identity, body), ALICE.identity.public)


def test_record_wire_shape_and_size_are_checked() -> None:
    wire = ALICE.record.to_wire()
    for bad in (None, [], {"b": wire["b"]}, {**wire, "x": 1}, {"b": wire["b"], "s": "x"},
                {"b": 5, "s": wire["s"]}, {"b": "é", "s": wire["s"]},
                signed(ALICE.identity, " " * (MAX_DH_RECORD_BYTES + 1))):
        with pytest.raises(SealError):
            DhRecord.from_wire(bad, ALICE.identity.public)


def test_small_order_keys_are_refused_everywhere() -> None:
    zero = bytes(32)
    with pytest.raises(ValidationError):
        DhPublic(ALICE.identity.node, zero)
    with pytest.raises(ValidationError):
        DhPublic("not-a-node", ALICE.dh.public)


# -- sealing and opening ------------------------------------------------------------------

def test_both_ends_open_and_nobody_else() -> None:
    blob = sealed(b"meet at 5")
    assert open_as(BOB, blob) == b"meet at 5"
    assert open_as(ALICE, blob) == b"meet at 5"  # the sender's own history
    with pytest.raises(SealError, match="not for this node"):
        open_as(CAROL, blob)
    # Carol cannot open it even by claiming to be the recipient (the header names Bob's key)
    with pytest.raises(SealError, match="not made for these two"):
        open_as(CAROL, blob, recipient=CAROL)
    # and a key with Bob's public half but not his secret does not exist; a wrong secret
    # posing under Bob's public key fails at the tag
    impostor = Node()
    impostor.dh.public = BOB.dh.public  # claims Bob's public key, holds another secret
    with pytest.raises(SealError, match="does not open"):
        open_as(impostor, blob)


def test_a_copied_seal_does_not_open_under_another_sender_or_context() -> None:
    """Carol pastes Alice's sealed message to Bob into her own message to Bob."""
    blob = sealed()
    with pytest.raises(SealError):
        open_as(BOB, blob, sender=CAROL)
    with pytest.raises(SealError, match="does not open"):
        open_as(BOB, blob, context=b"origin=carol-node room=lobby to=bob")
    # and a seal made for another recipient node id but the same keys does not open either
    other_node = DhPublic(CAROL.identity.node, BOB.dh.public)
    with pytest.raises(SealError, match="does not open"):
        seal.open_sealed(blob, BOB.dh, sender=ALICE.public, recipient=other_node,
                         context=CONTEXT)


REGIONS = {
    "magic": (0, 4), "ephemeral": (4, 36), "recipient key": (36, 68),
    "sender key": (68, 100), "wrap 0": (100, 148), "wrap 1": (148, 196),
    "body": (196, None),
}


@pytest.mark.parametrize("region", list(REGIONS))
def test_changing_any_byte_of_any_region_is_refused_for_both_ends(region: str) -> None:
    blob = sealed(b"x" * 100)
    start, end = REGIONS[region]
    stop = len(blob) if end is None else end
    for i in range(start, stop):
        changed = bytearray(blob)
        changed[i] ^= 0x80
        for node in (BOB, ALICE):
            with pytest.raises(SealError):
                open_as(node, bytes(changed))


def test_truncated_extended_and_resized_seals_are_refused() -> None:
    blob = sealed()
    for bad in (blob[:-1], blob + b"\0", blob[:seal.MIN_SEAL_BYTES - 1], b"",
                blob + bytes(SEAL_PAD_BYTES), blob[:-SEAL_PAD_BYTES]):
        with pytest.raises(SealError):
            open_as(BOB, bad)
    with pytest.raises(SealError):
        open_as(BOB, "text")  # type: ignore[arg-type]


def test_sizes_are_padded_and_bounded() -> None:
    sizes = {len(sealed(b"a" * n)) for n in range(SEAL_PAD_BYTES - 2)}
    assert sizes == {seal.MIN_SEAL_BYTES}  # short texts all look alike
    assert len(sealed(b"a" * (SEAL_PAD_BYTES - 1))) == seal.MIN_SEAL_BYTES + SEAL_PAD_BYTES
    biggest = sealed(b"z" * MAX_SEALED_TEXT_BYTES)
    assert len(biggest) == seal.MAX_SEAL_BYTES
    assert open_as(BOB, biggest) == b"z" * MAX_SEALED_TEXT_BYTES
    assert open_as(BOB, sealed(b"")) == b""
    with pytest.raises(LocalProtocolError):
        sealed(b"z" * (MAX_SEALED_TEXT_BYTES + 1))
    with pytest.raises(SealError):
        open_as(BOB, biggest + bytes(SEAL_PAD_BYTES))


def test_each_seal_is_fresh_unless_the_entropy_is_replayed() -> None:
    assert sealed() != sealed()
    draws = [secrets.token_bytes(32) for _ in range(2)]

    def fixed() -> bytes:
        it = iter(draws)
        return seal.seal(b"hi", sender=ALICE.public, recipient=BOB.public,
                         entropy=lambda n: next(it))

    assert fixed() == fixed()


def test_text_form_is_strict_and_bounded() -> None:
    blob = sealed()
    text = seal.seal_text(blob)
    assert seal.parse_seal_text(text) == blob
    for bad in (None, "", text + "=", text[:-1], text.replace("-", "+"), text + "A",
                "A" * (seal.MAX_SEAL_BYTES * 2)):
        with pytest.raises(SealError):
            seal.parse_seal_text(bad)


def test_peek_names_the_keys_for_looking_them_up() -> None:
    head = seal.peek(sealed())
    assert head.recipient_key == BOB.dh.public and head.sender_key == ALICE.dh.public
    assert len(head.ephemeral) == 32 and head.ephemeral not in (BOB.dh.public,
                                                               ALICE.dh.public)


# -- the wiring's pieces (issue 14 item 3: a seal in a feed entry) ---------------------------

def test_the_entry_field_bound_is_the_largest_seal_in_base64url() -> None:
    assert MAX_SEAL_TEXT_CHARS == -(-seal.MAX_SEAL_BYTES * 4 // 3)
    biggest = seal.seal_text(sealed(b"x" * MAX_SEALED_TEXT_BYTES))
    assert len(biggest) == MAX_SEAL_TEXT_CHARS


def test_dm_context_binds_each_field_of_the_entry() -> None:
    """A seal made for one entry opens for that entry only: another origin, seq, room,
    nick, addressee or addressee node (each one changed in turn) and it does not."""
    fields = {"origin": ALICE.identity.node, "seq": 7, "room": "lobby", "nick": "alice",
              "to": "bob", "to_node": BOB.identity.node}
    ctx = seal.dm_context(**fields)
    blob = sealed(b"for entry 7", context=ctx)
    assert open_as(BOB, blob, context=ctx) == b"for entry 7"
    others = {"origin": CAROL.identity.node, "seq": 8, "room": "ops", "nick": "mallory",
              "to": "bobby", "to_node": CAROL.identity.node}
    for name, value in others.items():
        moved = seal.dm_context(**{**fields, name: value})
        assert moved != ctx
        with pytest.raises(SealError, match="does not open"):
            open_as(BOB, blob, context=moved)
    # unambiguous: a field cannot borrow characters from its neighbour
    assert (seal.dm_context(**{**fields, "room": "a", "nick": "bc"})
            != seal.dm_context(**{**fields, "room": "ab", "nick": "c"}))
