"""Which protocol a hub connection speaks, from its first bytes: TLS, or plain text/JSON.

One port serves all (issue 14): a TLS client's first bytes are a TLS record header of
type handshake (RFC 8446 5.1: ``0x16``, legacy version ``0x03 0x0X``, a 2-byte length)
followed by a ClientHello (handshake type ``0x01``); a plain client's first byte is ``{``
(JSON mode) or the first character of a nickname (text mode).  ``0x16`` (ASCII SYN, a
control character) can start neither: no nickname or JSON frame holds one.  So the first
byte decides, and the next five confirm a TLS connection before the hub hands it to
``ssl``: a connection that starts with ``0x16`` and is not a ClientHello is neither
protocol and is closed.

Who speaks first.  A text-mode client (``nc``) waits for the hub's greeting before it
types its nickname, while a TLS client sends its ClientHello as soon as it has connected
(and a JSON client its hello).  So the hub waits up to ``limits.FIRST_BYTE_GRACE_S`` for a
first byte: silence then means a text user (``classify(b"", timed_out=True)`` is
:data:`FirstBytes.PLAIN`), who is greeted as today, only that much later.  Once a first
byte is there it decides at once, except after ``0x16``, where the hub waits (at most
:data:`SNIFF_BYTES` bytes, within ``limits.TLS_HANDSHAKE_TIMEOUT_S``) for the rest of the
record header; a header still partial at that deadline is :data:`FirstBytes.INVALID`.
The hub reads with ``MSG_PEEK``: ``ssl`` must see the ClientHello again.

An SSL 2.0-style ClientHello (first byte ``0x80``) is not TLS 1.3 and is classed plain; the
text reader then refuses it as it refuses any line that is not UTF-8.

Pure: bytes in, a verdict out.
"""

from __future__ import annotations

import enum

__all__ = ["SNIFF_BYTES", "TLS_HANDSHAKE_RECORD", "FirstBytes", "classify"]

#: Record content type of a TLS handshake record (RFC 8446 5.1).
TLS_HANDSHAKE_RECORD = 0x16
#: Handshake message type of a ClientHello (RFC 8446 4).
_CLIENT_HELLO = 0x01
#: Record header (5 bytes) plus the handshake type: enough to recognize a ClientHello.
SNIFF_BYTES = 6
#: Longest TLS plaintext record (RFC 8446 5.1: 2^14); a ClientHello record is never empty.
_MAX_RECORD = 2**14


class FirstBytes(enum.Enum):
    """What the first bytes of a connection say."""

    #: Not enough bytes yet to decide (no byte yet, or part of a TLS record header).
    NEED_MORE = "need-more"
    #: A TLS ClientHello: wrap the connection with the server context.
    TLS = "tls"
    #: Text or JSON mode: the hub's line reader takes it from here.
    PLAIN = "plain"
    #: Starts like TLS but is not a ClientHello: close it.
    INVALID = "invalid"


def classify(data: bytes, *, timed_out: bool = False) -> FirstBytes:
    """Decide from the first bytes received (any number; only the first 6 are looked at).

    ``timed_out``: the wait for more is over (the first-byte grace with no data, or the
    handshake deadline with part of a header): never :data:`FirstBytes.NEED_MORE` then.
    """
    if not data:
        return FirstBytes.PLAIN if timed_out else FirstBytes.NEED_MORE
    if data[0] != TLS_HANDSHAKE_RECORD:
        return FirstBytes.PLAIN
    head = data[:SNIFF_BYTES]
    # each byte is checked as soon as it is here: garbage is refused without waiting
    if len(head) > 1 and head[1] != 0x03:
        return FirstBytes.INVALID
    if len(head) > 2 and not 0x01 <= head[2] <= 0x04:  # legacy version 3.1 (TLS 1.0)..3.4
        return FirstBytes.INVALID
    if len(head) > 4 and not 4 <= int.from_bytes(head[3:5], "big") <= _MAX_RECORD:
        return FirstBytes.INVALID
    if len(head) < SNIFF_BYTES:
        return FirstBytes.INVALID if timed_out else FirstBytes.NEED_MORE
    return FirstBytes.TLS if head[5] == _CLIENT_HELLO else FirstBytes.INVALID
