"""The link handshake's proofs (link protocol v2): who a peer is, and whether it may link.

Two different questions, two different answers:

Identity (always)
    Each side's hello carries its public key and a fresh random nonce; the node id must be
    that key's (:meth:`lanchat.feed.PublicKey.for_node`).  Each side then signs the
    *transcript* -- :data:`LINK_DOMAIN`, both node ids, both keys and both nonces, in the
    dialer's-then-acceptor's order -- followed by its own role (``dialer`` or
    ``acceptor``).  The acceptor's signature travels in its ``welcome``, the dialer's in
    its ``auth``.  Because the other side's fresh nonce is in what is signed, a proof can
    not be replayed on another connection; because both keys and node ids are, it cannot
    be relayed to a third daemon either (the transcript that daemon checks names itself and
    its own nonce); and because the role is, a dialer's proof is never an acceptor's.  A
    hostile peer that copies another node's hello therefore never completes the
    handshake: it cannot sign.  (It can still sit in the middle of a connection both ends
    made and pass the bytes on unchanged, which gains it nothing the frames' own
    signatures do not already deny it; hiding traffic from such a relay is TLS's job.)

Admission (with a shared secret)
    The secret no longer vouches for messages (their origins' signatures do): it only
    decides who may link.  Each side adds ``admit`` = HMAC-SHA256 with the secret over
    :data:`ADMIT_DOMAIN`, its role and the same transcript, so the answer is bound to both
    keys and both nonces.  Sides that disagree about the secret each see it from the
    other's ``admit`` (wrong, missing or unexpected) and say so in one log line.

All byte strings here are of fixed lengths (16-byte node ids, 32-byte keys and nonces), so
plain concatenation is unambiguous.  Pure: the caller brings the nonces (from
``secrets``) and the keys.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from lanchat.feed import SIGNATURE_BYTES, PublicKey, SigningKey, b64decode, b64encode

#: What both sides sign before their role: a signature over a handshake can never pass
#: for one over a message or a roster (their own labels), nor the reverse.
LINK_DOMAIN = b"lanchat/link/v2\x00"
#: What the shared secret's HMAC covers before the role and the transcript.
ADMIT_DOMAIN = b"lanchat/link-admit/v2\x00"
#: Random bytes in a handshake nonce; on the wire twice as many hex digits (64, which a
#: v1 daemon's parser also accepts, so it can read a v2 hello far enough to answer it).
NONCE_BYTES = 32
NONCE_HEX = 2 * NONCE_BYTES
#: The two roles, as signed.
DIALER = "dialer"
ACCEPTOR = "acceptor"


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a handshake as the other sees it: node id, public key, nonce (hex)."""

    node: str
    key: PublicKey
    nonce: str


def transcript(dialer: Side, acceptor: Side) -> bytes:
    """The bytes both sides sign (after :data:`LINK_DOMAIN`, before their role)."""
    return (LINK_DOMAIN + bytes.fromhex(dialer.node) + bytes.fromhex(acceptor.node)
            + dialer.key.raw + acceptor.key.raw
            + bytes.fromhex(dialer.nonce) + bytes.fromhex(acceptor.nonce))


def _signed(role: str, data: bytes) -> bytes:
    if role not in (DIALER, ACCEPTOR):
        raise ValueError(f"unknown role {role!r}")
    return data + b"\x00" + role.encode("ascii")


def prove(key: SigningKey, role: str, data: bytes) -> str:
    """Our signature of transcript ``data`` in ``role``, as base64url (86 characters)."""
    return b64encode(key.sign(_signed(role, data)))


def check(key: PublicKey, proof: object, role: str, data: bytes) -> bool:
    """True if ``proof`` is ``key``'s signature of ``data`` in ``role``; never raises."""
    try:
        sig = b64decode(proof, SIGNATURE_BYTES)  # type: ignore[arg-type]
    except ValueError:
        return False
    return key.verify(sig, _signed(role, data))


def admit(secret: bytes, role: str, data: bytes) -> str:
    """The proof of the shared secret ``secret`` for this transcript and role (64 hex)."""
    return hmac.new(secret, ADMIT_DOMAIN + _signed(role, data), hashlib.sha256).hexdigest()


def admission_problem(secret: bytes | None, given: object, role: str,
                      data: bytes) -> str | None:
    """Why the other side's ``admit`` (sent in ``role``) does not let it in; None if it does.

    Constant-time for the comparison; anything but an ASCII string is simply wrong.
    """
    if secret is None:
        return None if given is None else ("it uses a shared secret and this daemon has "
                                           "none (set the same secret on both)")
    if given is None:
        return "it does not use the shared secret"
    if isinstance(given, str) and given.isascii() and hmac.compare_digest(
            given, admit(secret, role, data)):
        return None
    return "wrong proof of the shared secret (the two daemons' secrets differ)"
