"""A link client's key proof inside TLS (lanchat.keyproof): honest use, relay, replay, forgery.

Three nodes play the parts: A (an honest client), B (an honest server) and M (a hostile
node in the middle that both can reach).  Each side builds its transcript from what it
knows itself, as the module docstring says the wiring must.
"""

from __future__ import annotations

import secrets

import pytest

from lanchat import auth, keyproof
from lanchat.errors import LocalProtocolError, ValidationError
from lanchat.feed import MSG_DOMAIN, PublicKey, SigningKey, b64decode, b64encode
from lanchat.keyproof import LinkTranscript, ProofError

SECRET = b"correct horse battery staple"


def new_key() -> SigningKey:
    return SigningKey(secrets.token_bytes(32))


def nonce() -> bytes:
    return secrets.token_bytes(keyproof.NONCE_BYTES)


A, B, M = new_key(), new_key(), new_key()


def server_transcript(server: SigningKey, claimed_node: str, claimed_key: PublicKey,
                      client_nonce: bytes, server_nonce: bytes) -> LinkTranscript:
    """What an honest server checks against: its own key, the key the claimed node id
    names, this connection's nonces."""
    return LinkTranscript(PublicKey.for_node(claimed_node, claimed_key.raw), server.public,
                          client_nonce, server_nonce)


def test_honest_client_proves_its_key_to_the_server_it_pinned() -> None:
    cn, sn = nonce(), nonce()
    client_view = LinkTranscript(A.public, B.public, cn, sn)  # B's key as pinned by A
    proof = keyproof.client_proof(A, client_view)
    keyproof.check_client_proof(server_transcript(B, A.node, A.public, cn, sn), proof)
    assert len(proof) == 86 and b64decode(proof, 64)


def test_transcript_is_fixed_length_and_names_everything() -> None:
    cn, sn = nonce(), nonce()
    t = LinkTranscript(A.public, B.public, cn, sn)
    data = t.encode()
    assert data == keyproof.LINK_AUTH_DOMAIN + A.public.raw + B.public.raw + cn + sn
    # swapping the roles or the nonces gives other bytes
    assert LinkTranscript(B.public, A.public, cn, sn).encode() != data
    assert LinkTranscript(A.public, B.public, sn, cn).encode() != data


def test_a_proof_relayed_by_a_middle_node_fails_at_the_third_node() -> None:
    """M links to B posing as A; B's challenge is forwarded to A, who dialled M."""
    # M -> B: M claims A's node id and key, B draws its nonce
    m_client_nonce, b_nonce = nonce(), nonce()
    # M hands B's nonce to A as its own challenge (and A's client nonce may be M's choice
    # too: A's is random, so M forwards whatever it must); A pinned *M's* key over TLS
    a_view = LinkTranscript(A.public, M.public, m_client_nonce, b_nonce)
    relayed = keyproof.client_proof(A, a_view)
    with pytest.raises(ProofError, match=A.node):
        keyproof.check_client_proof(
            server_transcript(B, A.node, A.public, m_client_nonce, b_nonce), relayed)
    # the proof is good only where A meant it: at M
    keyproof.check_client_proof(
        server_transcript(M, A.node, A.public, m_client_nonce, b_nonce), relayed)


def test_secret_proofs_cannot_be_relayed_either() -> None:
    """A member's HMAC proof, relayed by a non-member M to B, names M as the server."""
    cn, b_nonce = nonce(), nonce()
    relayed = keyproof.secret_proof(SECRET, "client", LinkTranscript(A.public, M.public,
                                                                     cn, b_nonce))
    b_view = server_transcript(B, A.node, A.public, cn, b_nonce)
    with pytest.raises(ProofError) as info:
        keyproof.check_secret_proof(SECRET, "client", b_view, relayed)
    assert info.value.code == "auth-failed"
    keyproof.check_secret_proof(SECRET, "client", b_view,
                                keyproof.secret_proof(SECRET, "client", b_view))


def test_an_old_proof_does_not_pass_on_a_new_connection() -> None:
    cn, sn = nonce(), nonce()
    old = keyproof.client_proof(A, LinkTranscript(A.public, B.public, cn, sn))
    old_secret = keyproof.secret_proof(SECRET, "client", LinkTranscript(A.public, B.public,
                                                                        cn, sn))
    # the next connection: B draws a new nonce; a replayer may reuse the client nonce
    fresh = server_transcript(B, A.node, A.public, cn, nonce())
    with pytest.raises(ProofError):
        keyproof.check_client_proof(fresh, old)
    with pytest.raises(ProofError):
        keyproof.check_secret_proof(SECRET, "client", fresh, old_secret)


def test_a_node_id_cannot_be_claimed_with_another_key() -> None:
    cn, sn = nonce(), nonce()
    # M claims A's node id but holds only its own key: the claim fails at for_node ...
    with pytest.raises(ValidationError):
        server_transcript(B, A.node, M.public, cn, sn)
    # ... and a signature by M checked under A's key fails
    forged = keyproof.client_proof(M, LinkTranscript(M.public, B.public, cn, sn))
    with pytest.raises(ProofError):
        keyproof.check_client_proof(server_transcript(B, A.node, A.public, cn, sn), forged)


def test_every_bit_of_a_proof_matters_and_bad_forms_are_refused() -> None:
    cn, sn = nonce(), nonce()
    t = LinkTranscript(A.public, B.public, cn, sn)
    raw = b64decode(keyproof.client_proof(A, t), 64)
    for i in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ProofError):
            keyproof.check_client_proof(t, b64encode(bytes(flipped)))
    for bad in (None, 42, "", "x" * 86, b64encode(raw) + "A", raw, b64encode(raw)[:-1]):
        with pytest.raises(ProofError, match="base64url"):
            keyproof.check_client_proof(t, bad)


def test_secret_proof_roles_are_not_interchangeable() -> None:
    t = LinkTranscript(A.public, B.public, nonce(), nonce())
    client = keyproof.secret_proof(SECRET, "client", t)
    server = keyproof.secret_proof(SECRET, "server", t)
    assert client != server
    with pytest.raises(ProofError):  # a reflected client proof is not the server's
        keyproof.check_secret_proof(SECRET, "server", t, client)
    with pytest.raises(ProofError):
        keyproof.check_secret_proof(b"another secret", "client", t, client)
    for bad in (None, 7, "é" * 64, client.upper()):
        with pytest.raises(ProofError):
            keyproof.check_secret_proof(SECRET, "client", t, bad)
    keyproof.check_secret_proof(SECRET, "server", t, server)


def test_proofs_are_domain_separated_from_other_signatures_and_macs() -> None:
    t = LinkTranscript(A.public, B.public, nonce(), nonce())
    sig = b64decode(keyproof.client_proof(A, t), 64)
    body = t.encode()[len(keyproof.LINK_AUTH_DOMAIN):]
    assert not A.public.verify(sig, MSG_DOMAIN + body)  # not a message signature
    assert A.public.verify(sig, t.encode())
    # and the old shared-secret proof of lanchat.auth is a different value
    assert keyproof.secret_proof(SECRET, "client", t) != auth.proof(
        SECRET, "hello", t.server_nonce.hex(), A.node, B.node)


def test_client_refuses_to_sign_a_transcript_naming_another_client() -> None:
    with pytest.raises(LocalProtocolError):
        keyproof.client_proof(M, LinkTranscript(A.public, B.public, nonce(), nonce()))


def test_nonces_are_exactly_32_bytes_in_and_out() -> None:
    n = nonce()
    assert keyproof.parse_nonce(keyproof.nonce_text(n)) == n
    for bad in (None, "", "A" * 42, "A" * 44, b"x" * 32, keyproof.nonce_text(n) + "="):
        with pytest.raises(ProofError):
            keyproof.parse_nonce(bad)
    for short in (b"", b"x" * 31, b"x" * 33):
        with pytest.raises(ValidationError):
            LinkTranscript(A.public, B.public, short, n)
        with pytest.raises(ValidationError):
            LinkTranscript(A.public, B.public, n, short)
        with pytest.raises(LocalProtocolError):
            keyproof.nonce_text(short)
