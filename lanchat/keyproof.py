"""A link's client proves its node key inside TLS: the transcript and its proofs.

Why this exists.  A link is TLS 1.3 (:mod:`lanchat.tlsid`), and the client pins the
server's key to the node id it dialled.  The other direction cannot be done by TLS here:
Python's ``ssl`` only accepts a client certificate it can chain to a CA it was given, and
a link's client is a node the server may never have seen.  So the client proves its key
inside the tunnel, once the tunnel is up.

The exchange (frame names are the link protocol's; the values are this module's):

1. TLS 1.3 handshake.  The client checks the server's certificate key against the node id
   it expected (``tlsid.expect_node``) and closes on a mismatch *before it sends anything*.
2. Client -> server: its node id, its public key and a fresh ``client_nonce``.
   The server checks the key against the node id (``PublicKey.for_node``).
3. Server -> client: a fresh ``server_nonce``.
4. Client -> server: :func:`client_proof`, an Ed25519 signature by the client's identity
   key over :meth:`LinkTranscript.encode` = ``LINK_AUTH_DOMAIN`` || client key || server
   key || client nonce || server nonce (fixed lengths, so unambiguous).  With a shared
   secret, also :func:`secret_proof` (``role="client"``) over the same transcript.
5. The server checks :func:`check_client_proof` against a transcript it builds itself:
   *its own* key, the key the client claimed, the nonces of *this* connection.  With a
   secret it answers its own :func:`secret_proof` (``role="server"``), which the client
   checks: both ends then know the other holds the secret, bound to both keys.

Why this is safe without TLS channel binding.  Python's ``ssl`` exposes neither the TLS
1.3 exporter (RFC 8446 7.5) nor ``tls-unique``, so the proof cannot name the TLS session.
It names the *server* instead, and the client signs only after it has authenticated the
server by its pinned key:

* Relay: a hostile middle node M that wants to pose as A to B opens a link to B, gets B's
  nonce, and hands it to A as its own challenge (A dialled M, or M lures A into dialling
  it).  A pinned M's key, so A's transcript names *M* as the server; B checks against a
  transcript naming *B*, and the signature fails.  M could only use the proof against
  itself.  (Likewise the secret proof: a non-member relaying a member's HMAC gets one
  bound to the wrong server key.)
* Replay: B's transcript holds the nonce B just drew; an old proof names another one.
* Man in the middle of the TLS itself: impossible without the server's private key,
  since the client pins the key before it signs; an attacker who holds the server's key
  *is* the server as far as any protocol can tell.
* Key substitution: the server verifies under the key that the claimed node id names, so
  a signature by any other key fails; the client's node id is never taken on trust.
* Cross-protocol use: the domain label separates these signatures from every other
  signature the identity key makes (messages, rosters, X25519 records), and the secret
  proofs of the two roles from each other and from ``lanchat.auth``'s.

Pure: no I/O, clock or randomness (callers draw the nonces from ``secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from lanchat.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from lanchat.feed import PublicKey, SigningKey, b64decode, b64encode

__all__ = [
    "LINK_AUTH_DOMAIN",
    "LINK_SECRET_DOMAIN",
    "NONCE_BYTES",
    "LinkTranscript",
    "ProofError",
    "check_client_proof",
    "check_secret_proof",
    "client_proof",
    "nonce_text",
    "parse_nonce",
    "secret_proof",
]

#: What a link's client signs: this label, then the transcript (domain separation).
LINK_AUTH_DOMAIN = b"lanchat/link-auth/v1\x00"
#: What the shared-secret proofs are over: this label, the role, then the transcript.
LINK_SECRET_DOMAIN = b"lanchat/link-secret/v1\x00"
#: Bytes of each nonce: 256 bits, so no nonce is ever drawn twice.
NONCE_BYTES = 32
#: Bytes of an Ed25519 signature.
_SIGNATURE_BYTES = 64

Role = Literal["client", "server"]
_ROLES: dict[str, bytes] = {"client": b"client\x00", "server": b"server\x00"}


class ProofError(RemoteProtocolError):
    """The peer's proof is malformed or wrong: close the link (log one line)."""

    code = "bad-proof"


@dataclass(frozen=True, slots=True)
class LinkTranscript:
    """Everything one link's authentication is about: both keys and both nonces.

    Each side builds it from what *it* knows: the server puts its own key, the client
    the key it pinned; neither takes the other's word for who the server is.
    """

    client: PublicKey
    server: PublicKey
    client_nonce: bytes
    server_nonce: bytes

    def __post_init__(self) -> None:
        for name in ("client_nonce", "server_nonce"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
                raise ValidationError(f"{name} must be {NONCE_BYTES} bytes", code="bad-nonce")

    def encode(self) -> bytes:
        """The signed bytes: label, client key, server key, client nonce, server nonce."""
        return (LINK_AUTH_DOMAIN + self.client.raw + self.server.raw
                + self.client_nonce + self.server_nonce)


def nonce_text(raw: bytes) -> str:
    """A nonce as it travels: 43 characters of base64url."""
    if len(raw) != NONCE_BYTES:
        raise LocalProtocolError(f"a nonce is {NONCE_BYTES} bytes")
    return b64encode(raw)


def parse_nonce(text: object) -> bytes:
    """A received nonce; raises :class:`ProofError` unless it is 32 bytes of base64url."""
    try:
        return b64decode(text, NONCE_BYTES)  # type: ignore[arg-type]
    except ValueError:
        raise ProofError(f"a nonce is {NONCE_BYTES} bytes of base64url") from None


def client_proof(key: SigningKey, transcript: LinkTranscript) -> str:
    """The client's signature over ``transcript`` (base64url), made with its identity key.

    Call only after the server's key was pinned (``tlsid.expect_node``) and put into
    ``transcript.server``: that is what makes the proof useless to anyone but that server.
    """
    if key.public != transcript.client:
        raise LocalProtocolError("the transcript names another client key than ours")
    return b64encode(key.sign(transcript.encode()))


def check_client_proof(transcript: LinkTranscript, given: object) -> None:
    """Raise :class:`ProofError` unless ``given`` is ``transcript.client``'s signature.

    ``transcript`` must be the server's own: its own key, this connection's nonces, and the
    client key that the client's claimed node id names (``PublicKey.for_node``).
    """
    try:
        sig = b64decode(given, _SIGNATURE_BYTES)  # type: ignore[arg-type]
    except ValueError:
        raise ProofError("a link proof is an Ed25519 signature in base64url") from None
    if not transcript.client.verify(sig, transcript.encode()):
        raise ProofError(f"node {transcript.client.node}'s link proof does not verify: not "
                         "signed by its key for this server and this connection")


def secret_proof(secret: bytes, role: Role, transcript: LinkTranscript) -> str:
    """HMAC-SHA256 (hex) with the shared ``secret`` over the role and the transcript.

    Both ends send one (the client ``"client"``, the server ``"server"``): proof that each
    holds the secret, bound to both keys and this connection's nonces, so it cannot be
    relayed to another server or replayed on another connection.
    """
    data = LINK_SECRET_DOMAIN + _ROLES[role] + transcript.encode()
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def check_secret_proof(secret: bytes, role: Role, transcript: LinkTranscript,
                       given: object) -> None:
    """Raise :class:`ProofError` unless ``given`` is :func:`secret_proof`; constant time."""
    if not (isinstance(given, str) and given.isascii()
            and hmac.compare_digest(given, secret_proof(secret, role, transcript))):
        raise ProofError(f"the {role}'s shared-secret proof is wrong (a different secret, "
                         "or a proof made for another connection)", code="auth-failed")
