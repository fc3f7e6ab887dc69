"""Shared-secret authentication: proofs for handshakes and tags for messages.

Off by default.  With a ``secret`` in the configuration, every daemon link and
every JSON-mode client proves it knows the secret by answering a fresh
challenge (HMAC-SHA256 over the other side's random nonce, both node ids or
the nick, and a label saying what is being proved).  The secret is admission
only: who wrote a message is proved by its origin's signature
(:mod:`lanchat.feed`), so turning a secret on or changing it never touches
history.

Labels keep each proof to its purpose: a welcome proof can never be replayed
as a hello proof.

Pure: no randomness here -- callers pass the nonces (from ``secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
import json

#: Bytes of randomness in a challenge nonce (as hex, twice as many characters).
NONCE_BYTES = 16


def _mac(key: bytes, label: str, *parts: str) -> str:
    data = json.dumps([f"lanchat/{label}/v1", *parts], separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogatepass")
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def proof(key: bytes, label: str, nonce: str, *who: str) -> str:
    """Prove knowledge of ``key`` for the challenge ``nonce`` (and the parties ``who``)."""
    return _mac(key, label, nonce, *who)


def check_proof(key: bytes, given: object, label: str, nonce: str, *who: str) -> bool:
    """True if ``given`` is the right proof; constant-time.

    Anything but an ASCII string is simply wrong: ``compare_digest`` raises
    TypeError on non-ASCII text, which would reach the caller as a crash.
    """
    return (isinstance(given, str) and given.isascii()
            and hmac.compare_digest(given, proof(key, label, nonce, *who)))


def load_secret(text: str) -> bytes:
    """The key for a configured secret (a file's content loses its final newline)."""
    return text.rstrip("\r\n").encode("utf-8")


#: Bytes read of a secret file: a secret is a line, not a document.
MAX_SECRET_FILE_BYTES = 65536


def read_secret_file(path: str) -> bytes:
    """The key in the file at ``path`` (daemon and client alike).

    Raises OSError if it cannot be read and ValueError if it holds no secret:
    an empty key would be a secret everyone knows.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read(MAX_SECRET_FILE_BYTES)
    if not text.strip():
        raise ValueError("the file is empty")
    return load_secret(text)
