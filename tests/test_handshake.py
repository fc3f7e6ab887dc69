"""The link handshake's proofs (lanchat.handshake) and signed rosters, without sockets.

Three parties: A and B handshake; M is hostile (its own key, and anything it has seen).
"""

from __future__ import annotations

import json

import pytest

from lanchat import handshake
from lanchat.errors import ValidationError
from lanchat.feed import SigningKey, b64encode
from lanchat.model import User
from lanchat.presence import ROSTER_DOMAIN, NodeRoster, parse_signed_roster, sign_roster

A, B, M = (SigningKey(bytes([i]) * 32) for i in (0xA0, 0xB0, 0x70))
NA, NB, NM = ("0a" * 32, "0b" * 32, "07" * 32)
SECRET = b"correct horse"


def side(key: SigningKey, nonce: str) -> handshake.Side:
    return handshake.Side(key.node, key.public, nonce)


def ab(na: str = NA, nb: str = NB) -> bytes:
    """The transcript of A dialing B."""
    return handshake.transcript(side(A, na), side(B, nb))


def test_each_side_proves_its_key_in_its_role() -> None:
    data = ab()
    welcome = handshake.prove(B, handshake.ACCEPTOR, data)
    auth = handshake.prove(A, handshake.DIALER, data)
    assert len(welcome) == 86 and len(auth) == 86
    assert handshake.check(B.public, welcome, handshake.ACCEPTOR, data)
    assert handshake.check(A.public, auth, handshake.DIALER, data)
    # not the other role, not the other key
    assert not handshake.check(B.public, welcome, handshake.DIALER, data)
    assert not handshake.check(A.public, welcome, handshake.ACCEPTOR, data)
    for junk in (None, "", 5, "x" * 86, welcome[:-1], welcome + "A", "\u00e9" * 86):
        assert not handshake.check(B.public, junk, handshake.ACCEPTOR, data)


def test_a_proof_cannot_be_replayed_on_another_connection() -> None:
    """Every nonce, key and node id is in what is signed: a proof made for one
    handshake fails in any other one."""
    auth = handshake.prove(A, handshake.DIALER, ab())
    assert not handshake.check(A.public, auth, handshake.DIALER, ab(nb="0c" * 32))  # B's nonce
    assert not handshake.check(A.public, auth, handshake.DIALER, ab(na="0c" * 32))  # A's nonce


def test_a_relayed_hello_cannot_complete() -> None:
    """M passes A's hello to C (and C's welcome to A). A signs a transcript naming the
    party A sees; C checks one naming C: they differ, so C refuses M's relay of A."""
    c = SigningKey(b"\xc0" * 32)
    nc = "0c" * 32
    # A believes it dialed M (it got M's welcome): A signs A-M.
    a_signs = handshake.prove(A, handshake.DIALER,
                              handshake.transcript(side(A, NA), side(M, NM)))
    # C got "A's" hello from M and welcomed it: C checks A-C.
    a_to_c = handshake.transcript(side(A, NA), side(c, nc))
    assert not handshake.check(A.public, a_signs, handshake.DIALER, a_to_c)


def test_the_transcript_is_fixed_length_and_labelled() -> None:
    data = ab()
    assert data.startswith(b"lanchat/link/v2\x00")
    assert len(data) == len(handshake.LINK_DOMAIN) + 2 * 16 + 2 * 32 + 2 * 32
    with pytest.raises(ValueError):
        handshake.prove(A, "observer", data)


def test_admission_is_bound_to_the_transcript_and_says_what_is_wrong() -> None:
    data = ab()
    mine = handshake.admit(SECRET, handshake.DIALER, data)
    assert handshake.admission_problem(SECRET, mine, handshake.DIALER, data) is None
    assert handshake.admission_problem(None, None, handshake.DIALER, data) is None
    # another transcript, another role, another secret: wrong
    for problem in (
            handshake.admission_problem(SECRET, mine, handshake.DIALER, ab(nb="0c" * 32)),
            handshake.admission_problem(SECRET, mine, handshake.ACCEPTOR, data),
            handshake.admission_problem(b"other", mine, handshake.DIALER, data),
            handshake.admission_problem(SECRET, "\u00e9" * 64, handshake.DIALER, data),
            handshake.admission_problem(SECRET, 5, handshake.DIALER, data)):
        assert problem is not None and "secrets differ" in problem
    assert "does not use the shared secret" in str(
        handshake.admission_problem(SECRET, None, handshake.DIALER, data))
    assert "this daemon has none" in str(
        handshake.admission_problem(None, mine, handshake.DIALER, data))
    # the secret's proof is not the key's: an HMAC is no signature and vice versa
    assert not handshake.check(A.public, mine, handshake.DIALER, data)


# -- signed rosters --------------------------------------------------------------------------

def roster(node: str, ver: int = 1, *nicks: str) -> NodeRoster:
    users = tuple(User(nick=n, host="h", node=node, local=False, since=1.0) for n in nicks)
    return NodeRoster(node=node, ver=ver, name="n", host="h", users=users)


def wire(r: NodeRoster) -> dict[str, str]:
    assert r.signed is not None
    return r.signed.to_wire()


def test_a_roster_signed_by_its_node_parses_to_itself_with_its_bytes() -> None:
    signed = sign_roster(A, roster(A.node, 3, "alice", "al"))
    got = parse_signed_roster(wire(signed))
    assert got == roster(A.node, 3, "alice", "al") and got.signed == signed.signed


def test_only_a_nodes_own_key_signs_its_roster() -> None:
    with pytest.raises(ValueError):
        sign_roster(M, roster(A.node))
    body = json.dumps(roster(A.node, 9).to_dict(), separators=(",", ":")).encode()
    forged = {"b": body.decode(), "s": b64encode(M.sign(ROSTER_DOMAIN + body)),
              "k": M.public.text}
    with pytest.raises(ValidationError) as info:
        parse_signed_roster(forged)
    assert info.value.code == "roster-signature" and "signed by another node" in str(info.value)


@pytest.mark.parametrize("change", ["body", "sig", "key", "label"])
def test_any_change_to_a_signed_roster_is_refused(change: str) -> None:
    frame = wire(sign_roster(A, roster(A.node, 3, "alice")))
    if change == "body":
        frame["b"] = frame["b"].replace('"ver":3', '"ver":4')
    elif change == "sig":
        frame["s"] = ("B" if frame["s"][0] == "A" else "A") + frame["s"][1:]
    elif change == "key":
        frame["k"] = B.public.text
    else:  # a roster signature passed off as a handshake proof's, or the reverse
        data = ab()
        frame["s"] = handshake.prove(A, handshake.DIALER, data)
    with pytest.raises(ValidationError) as info:
        parse_signed_roster(frame)
    assert info.value.code == "roster-signature"
