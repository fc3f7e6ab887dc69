"""Sealed direct messages: readable only by the recipient's daemon and the sender's own.

Issue 14, item 3: every daemon stores and relays a direct message (so a recipient that is
offline still gets it later) but only its two ends can read it.

X25519 key records
    Each node has an X25519 key for direct messages besides its Ed25519 identity key (an
    Ed25519 key must not double as a Diffie-Hellman key).  It publishes the public half in
    a small record signed by the identity key: ``body`` = compact ASCII JSON
    ``{"v":1,"node":"<id>","ver":N,"x25519":"<43 base64url>"}`` in that order, ``sig`` =
    Ed25519 over ``DHKEY_DOMAIN + body``; on the wire ``{"b": body, "s": sig}``, like a feed
    entry.  ``ver`` orders a node's records (a higher one replaces a lower one), so a key
    can be replaced.  Parsing is strict: the body must be exactly the canonical encoding of
    its fields (one record, one byte string), signed by the key of the node it names.
    :meth:`DhKey.derive` makes the private key from the identity seed (HKDF with its own
    label and ``ver``), so no second secret file is needed and a restored ``node.key``
    still opens old messages; a node may instead keep a random one.

Seal (HPKE-style, RFC 9180's base mode in spirit, built only from ``cryptography``'s
primitives: X25519, HKDF-SHA256, ChaCha20-Poly1305)::

    offset  size  field
    0       4     magic b"LCS" + version 1
    4       32    ephemeral X25519 public key
    36      32    recipient's X25519 public key   (slot 0)
    68      32    sender's own X25519 public key  (slot 1)
    100     48    content key wrapped for slot 0  (32 + 16-byte tag)
    148     48    content key wrapped for slot 1
    196     n+16  the padded text under the content key (n a multiple of SEAL_PAD_BYTES)

    header = bytes 0..100
    KEK_i  = HKDF-SHA256(ikm = X25519(ephemeral, slot key i),
                         info = WRAP_INFO || i || header)        (both public keys in info)
    wrap_i = ChaCha20-Poly1305(KEK_i, nonce 0).encrypt(content key, aad = header)
    body   = ChaCha20-Poly1305(content key, nonce 0).encrypt(len16 || text || zeros,
                                  aad = SEAL_DOMAIN || header || wrap_0 || wrap_1
                                        || sender id || recipient id
                                        || len16(context) || context)

One random content key, wrapped once for each end: the recipient opens slot 0, the sender
(its own history) slot 1, nobody else either.  The zero nonces are safe because every key
is used once: the content key is fresh per seal, and each KEK derives from a fresh
ephemeral key.  The text's AAD covers both wrapped keys, so a change to either slot makes
the seal fail for *both* ends (one end cannot be shown a message the other cannot open).
The AAD binds the ciphertext to both node ids and the caller's context
(the message's origin, seq, room...): a node that copies someone else's sealed message
into its own cannot make it open under its own name (the opener names the sender it
expects, from the signed entry that carries the seal).  The padding hides a text's length
to within SEAL_PAD_BYTES.  No sender authentication inside the seal: the signed feed
entry that carries it authenticates the sender.

What it does not hide: who writes to whom (the entry's ``to`` and the slot keys) and when.
No forward secrecy: whoever later steals a node's X25519 key can read the direct messages
sealed to it (a daemon keeps them in its history anyway).

Pure: no I/O, clock or randomness; :func:`seal` takes its random bytes from the caller
(``entropy=secrets.token_bytes``), so a test can make a seal reproducible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lanchat.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from lanchat.feed import PublicKey, SigningKey, b64decode, b64encode
from lanchat.limits import MAX_DH_RECORD_BYTES, MAX_SEALED_TEXT_BYTES, SEAL_PAD_BYTES

__all__ = [
    "DHKEY_DOMAIN",
    "MAX_SEAL_BYTES",
    "DhKey",
    "DhPublic",
    "DhRecord",
    "SealError",
    "SealHeader",
    "dm_context",
    "open_sealed",
    "parse_seal_text",
    "peek",
    "seal",
    "seal_text",
]

#: What an identity key signs to publish an X25519 key: this label, then the body.
DHKEY_DOMAIN = b"lanchat/dhkey/v1\x00"
#: HKDF info of an X25519 key derived from the identity seed (then the 8-byte ``ver``).
DERIVE_INFO = b"lanchat/dhkey-derive/v1\x00"
#: HKDF info of a key-encryption key (then the slot number and the header).
WRAP_INFO = b"lanchat/seal-wrap/v1\x00"
#: Start of the text's additional authenticated data.
SEAL_DOMAIN = b"lanchat/seal/v1\x00"
#: Start of a direct message's context (:func:`dm_context`).
DM_CONTEXT_DOMAIN = b"lanchat/dm/v1\x00"
MAGIC = b"LCS\x01"
KEY_BYTES = 32
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 3 * KEY_BYTES
WRAPPED_BYTES = KEY_BYTES + TAG_BYTES
#: Where the sealed text starts.
BODY_OFFSET = HEADER_BYTES + 2 * WRAPPED_BYTES
_LEN_BYTES = 2


def _padded(n: int) -> int:
    """Size of a text of ``n`` bytes once framed (2-byte length) and padded."""
    return -(-(_LEN_BYTES + n) // SEAL_PAD_BYTES) * SEAL_PAD_BYTES


#: Smallest and largest seal, in bytes.
MIN_SEAL_BYTES = BODY_OFFSET + _padded(0) + TAG_BYTES
MAX_SEAL_BYTES = BODY_OFFSET + _padded(MAX_SEALED_TEXT_BYTES) + TAG_BYTES
#: Highest record ``ver``: exact in a JSON number anywhere (2**53).
MAX_VER = 2**53
_ZERO_NONCE = bytes(12)
_NODE_RE = re.compile(r"[0-9a-f]{32}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_RECORD_FIELDS = ("v", "node", "ver", "x25519")
#: An X25519 private key to probe a public key with (any scalar shows a small-order point).
_PROBE = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"lanchat/probe").digest())


class SealError(RemoteProtocolError):
    """A sealed message or key record is malformed, forged, or not for us.

    Deliberately vague about *why* a seal does not open (wrong key, tampering, wrong
    sender): the answer would help nobody but an attacker probing.
    """

    code = "bad-seal"


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(ikm)


def _check_public(raw: bytes) -> bytes:
    """``raw`` if it is an X25519 public key of large order; raises ValidationError."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ValidationError("an X25519 key is 32 bytes", code="bad-key")
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:  # the shared secret would be all zeros: a small-order point
        raise ValidationError("not a usable X25519 key (small order)", code="bad-key") from None
    return raw


# -- keys and their records ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DhPublic:
    """A node's published X25519 key (from a verified :class:`DhRecord`)."""

    node: str
    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not _NODE_RE.fullmatch(self.node):
            raise ValidationError("a node id is 32 lowercase hex digits", code="bad-key")
        _check_public(self.key)


class DhKey:
    """A node's X25519 private key for direct messages.  Never printed, never sent."""

    __slots__ = ("_key", "public")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise ValidationError("an X25519 private key is 32 bytes", code="bad-key")
        self._key = X25519PrivateKey.from_private_bytes(raw)
        self.public = self._key.public_key().public_bytes_raw()

    @classmethod
    def derive(cls, identity: SigningKey, ver: int) -> DhKey:
        """The X25519 key of ``identity`` for record version ``ver`` (HKDF of the seed)."""
        if type(ver) is not int or not 1 <= ver <= MAX_VER:
            raise ValidationError(f"ver is 1-{MAX_VER}", code="bad-key")
        return cls(_hkdf(identity.seed, DERIVE_INFO + ver.to_bytes(8, "big")))

    def exchange(self, public: bytes) -> bytes:
        """X25519 with ``public``; raises SealError on a small-order point."""
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError:
            raise SealError("a sealed message names an unusable key") from None

    def __repr__(self) -> str:
        return "DhKey(...)"


def _record_body(node: str, ver: int, key: bytes) -> bytes:
    return json.dumps({"v": 1, "node": node, "ver": ver, "x25519": b64encode(key)},
                      separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True, slots=True)
class DhRecord:
    """A signed X25519 key record: ``body`` and ``sig`` as they travel, and what they say.

    Build with :meth:`make` (ours) or :meth:`from_wire` (received, verified).
    """

    node: str
    ver: int
    key: bytes
    body: bytes
    sig: bytes

    @property
    def public(self) -> DhPublic:
        return DhPublic(self.node, self.key)

    @classmethod
    def make(cls, identity: SigningKey, dh: DhKey, ver: int) -> DhRecord:
        """Publish ``dh``'s public key, version ``ver``, signed by ``identity``."""
        if type(ver) is not int or not 1 <= ver <= MAX_VER:
            raise ValidationError(f"ver is 1-{MAX_VER}", code="bad-key")
        body = _record_body(identity.node, ver, dh.public)
        return cls(identity.node, ver, dh.public, body, identity.sign(DHKEY_DOMAIN + body))

    def to_wire(self) -> dict[str, str]:
        return {"b": self.body.decode("ascii"), "s": b64encode(self.sig)}

    @classmethod
    def from_wire(cls, raw: object, signer: PublicKey) -> DhRecord:
        """A received record, checked: strict form, ``signer``'s node, ``signer``'s signature.

        ``signer`` is the node's identity key (from its hello or ``PublicKey.for_node``).
        Raises :class:`SealError`.
        """
        if not isinstance(raw, dict) or set(raw) != {"b", "s"}:
            raise SealError('an X25519 key record is {"b": body, "s": signature}')
        text, sig_text = raw["b"], raw["s"]
        if not isinstance(text, str) or len(text) > MAX_DH_RECORD_BYTES or not text.isascii():
            raise SealError(f"an X25519 key record body is ASCII, at most "
                            f"{MAX_DH_RECORD_BYTES} bytes")
        try:
            sig = b64decode(sig_text, 64)
        except ValueError:
            raise SealError("an X25519 key record signature is 64 bytes of base64url") from None
        body = text.encode("ascii")
        try:
            fields: Any = json.loads(text, object_pairs_hook=_no_duplicates)
            node, ver = fields["node"], fields["ver"]
            key = b64decode(fields["x25519"], KEY_BYTES)
            canonical = _record_body(node, ver, key)
        except (ValueError, TypeError, KeyError, RecursionError):
            raise SealError("an X25519 key record body is not one") from None
        if (not isinstance(fields, dict) or tuple(fields) != _RECORD_FIELDS
                or fields["v"] != 1 or type(fields["v"]) is not int or type(ver) is not int
                or not 1 <= ver <= MAX_VER or not isinstance(node, str)
                or not _NODE_RE.fullmatch(node) or body != canonical):
            raise SealError("an X25519 key record body is not in its one canonical form")
        if node != signer.node:
            raise SealError(f"an X25519 key record of node {node} came with node "
                            f"{signer.node}'s key")
        if not signer.verify(sig, DHKEY_DOMAIN + body):
            raise SealError(f"node {node}'s X25519 key record is not signed by its key")
        try:
            _check_public(key)
        except ValidationError as exc:
            raise SealError(f"node {node}'s X25519 key record: {exc}") from None
        return cls(node, ver, key, body, sig)


def dm_context(*, origin: str, seq: int, room: str, nick: str, to: str,
               to_node: str) -> bytes:
    """The context a direct message's seal is bound to: the feed entry that carries it.

    The origin and seq name one entry of one signed feed, and the room, the sender's nick
    and the addressee are what that entry shows around the seal: a seal copied into another
    entry -- another node's, another seq of the same feed, or a different addressee --
    does not open.  Sealer and opener build it from the same entry fields.
    """
    return DM_CONTEXT_DOMAIN + json.dumps([origin, seq, room, nick, to, to_node],
                                          separators=(",", ":"),
                                          ensure_ascii=True).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


# -- sealing ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SealHeader:
    """The public part of a seal: which keys it was made for (to find the right ones)."""

    ephemeral: bytes
    recipient_key: bytes
    sender_key: bytes


def _aad(head: bytes, sender: DhPublic, recipient: DhPublic, context: bytes) -> bytes:
    """The text's additional data: ``head`` is the header and both wrapped keys."""
    if len(context) >= 1 << 16:
        raise LocalProtocolError("a seal's context is under 64 KiB")
    return (SEAL_DOMAIN + head + sender.node.encode("ascii") + recipient.node.encode("ascii")
            + len(context).to_bytes(2, "big") + context)


def _wrap_info(slot: int, header: bytes) -> bytes:
    return WRAP_INFO + bytes([slot]) + header


def seal(text: bytes, *, sender: DhPublic, recipient: DhPublic,
         entropy: Callable[[int], bytes], context: bytes = b"") -> bytes:
    """Seal ``text`` so that only ``recipient``'s and ``sender``'s X25519 keys open it.

    ``entropy(n)`` returns ``n`` random bytes: ``secrets.token_bytes`` (passed in, as this
    floor draws no randomness itself; a test may replay it).
    ``context`` binds the seal to where it is used (the wiring passes the message's
    origin, room and recipient nick); the opener must pass the same bytes.
    """
    if not isinstance(text, bytes) or len(text) > MAX_SEALED_TEXT_BYTES:
        raise LocalProtocolError(f"a sealed text is at most {MAX_SEALED_TEXT_BYTES} bytes")
    ephemeral = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
    content_key = entropy(KEY_BYTES)
    if len(content_key) != KEY_BYTES:
        raise LocalProtocolError("entropy must return the bytes asked for")
    header = (MAGIC + ephemeral.public_key().public_bytes_raw() + recipient.key
              + sender.key)
    wrapped = b""
    for slot, public in enumerate((recipient.key, sender.key)):
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public))
        kek = _hkdf(shared, _wrap_info(slot, header))
        wrapped += ChaCha20Poly1305(kek).encrypt(_ZERO_NONCE, content_key, header)
    framed = len(text).to_bytes(_LEN_BYTES, "big") + text
    framed += bytes(_padded(len(text)) - len(framed))
    body = ChaCha20Poly1305(content_key).encrypt(
        _ZERO_NONCE, framed, _aad(header + wrapped, sender, recipient, context))
    return header + wrapped + body


def peek(blob: object) -> SealHeader:
    """The keys a seal names, after checking its size and form; raises SealError."""
    if not isinstance(blob, bytes):
        raise SealError("a seal is bytes")
    size = len(blob)
    if not MIN_SEAL_BYTES <= size <= MAX_SEAL_BYTES:
        raise SealError(f"a seal is {MIN_SEAL_BYTES}-{MAX_SEAL_BYTES} bytes, not {size}")
    if (size - BODY_OFFSET - TAG_BYTES) % SEAL_PAD_BYTES:
        raise SealError("a seal's text is not padded to its block size")
    if blob[:len(MAGIC)] != MAGIC:
        raise SealError("not a version 1 lanchat seal")
    k = len(MAGIC)
    return SealHeader(blob[k:k + KEY_BYTES], blob[k + KEY_BYTES:k + 2 * KEY_BYTES],
                      blob[k + 2 * KEY_BYTES:HEADER_BYTES])


def open_sealed(blob: object, key: DhKey, *, sender: DhPublic, recipient: DhPublic,
                context: bytes = b"") -> bytes:
    """The text of a seal, opened with ``key`` (the recipient's or the sender's).

    ``sender`` and ``recipient`` are the keys the opener expects (from verified records;
    the sender is the origin of the signed entry that carries the seal).  Raises
    :class:`SealError` if the seal is malformed, names other keys, is not for ``key``, or
    was changed in any byte.
    """
    head = peek(blob)
    assert isinstance(blob, bytes)
    if head.recipient_key != recipient.key or head.sender_key != sender.key:
        raise SealError("this sealed message was not made for these two nodes' keys")
    if key.public == recipient.key:
        slot = 0
    elif key.public == sender.key:
        slot = 1
    else:
        raise SealError("this sealed message is not for this node")
    header = blob[:HEADER_BYTES]
    start = HEADER_BYTES + slot * WRAPPED_BYTES
    try:
        kek = _hkdf(key.exchange(head.ephemeral), _wrap_info(slot, header))
        content_key = ChaCha20Poly1305(kek).decrypt(
            _ZERO_NONCE, blob[start:start + WRAPPED_BYTES], header)
        framed = ChaCha20Poly1305(content_key).decrypt(
            _ZERO_NONCE, blob[BODY_OFFSET:],
            _aad(blob[:BODY_OFFSET], sender, recipient, context))
    except InvalidTag:
        raise SealError("this sealed message does not open: changed, or not for this "
                        "node") from None
    n = int.from_bytes(framed[:_LEN_BYTES], "big")
    end = _LEN_BYTES + n
    # authenticated, so only our own sealer could get these wrong; checked all the same
    if n > MAX_SEALED_TEXT_BYTES or len(framed) != _padded(n) or any(framed[end:]):
        raise SealError("a sealed message's padding is not canonical")
    return framed[_LEN_BYTES:end]


def seal_text(blob: bytes) -> str:
    """A seal as it travels in JSON: base64url without padding."""
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


def parse_seal_text(text: object) -> bytes:
    """The seal in :func:`seal_text`'s form; strict (one spelling) and bounded."""
    limit = -(-MAX_SEAL_BYTES * 4 // 3)
    if not isinstance(text, str) or len(text) > limit or not _B64URL_RE.fullmatch(text):
        raise SealError(f"a seal is at most {limit} characters of base64url")
    try:
        blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise SealError("a seal is base64url") from None
    if seal_text(blob) != text:
        raise SealError("a seal is in canonical base64url")
    peek(blob)
    return blob
