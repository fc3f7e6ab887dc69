"""TLS 1.3 with the node's identity key: its certificate, the contexts, and the pinning check.

Syncthing's model, without a CA: a node presents a self-signed X.509 certificate that only
carries its Ed25519 identity key (:mod:`lanchat.feed`), and the other side checks that key
against the node id it expected (node id = SHA-256 of the raw key, so
``PublicKey.for_node`` is the whole check).  Nothing about the certificate matters except
its key: not its name, dates, serial or self-signature.  TLS itself proves that the peer
holds the private key (its CertificateVerify signs the handshake transcript, which includes
our fresh random), so "the certificate's key is the one that node id names" is exactly
"we are talking to that node".

The certificate is made at start, not cached: :func:`certificate_der` is deterministic (the
serial is derived from the key, the dates are fixed -- valid from 2000 to RFC 5280's "no
expiry" 9999-12-31 -- and Ed25519 signatures are deterministic), so every start presents
the same bytes, a wrong clock cannot make it "expired", and there is no second file in the
state directory to keep consistent with ``node.key``.  Making it costs well under a
millisecond.

``ssl`` only loads a certificate and key from a *file*: :func:`server_context` writes the
PEM to an anonymous memory file (``memfd_create``) that is gone when closed; only where
there is none does it fall back to a 0600 ``mkstemp`` file in a directory the caller names
(the state directory), unlinked at once.  The private key is never left on disk twice.

Server and client alike:

* TLS 1.3 only (1.2's RSA and static-DH suites, renegotiation and the like are all out);
  no session tickets (no resumption: every connection shows its certificate again, and
  there is no ticket key to protect).
* The client context does not verify a chain (there is none) and checks no host name
  (a LAN address names nothing); instead the caller runs :func:`expect_node` (or
  :func:`expect_key`) right after the handshake, before it sends or believes anything.
* The server does not ask for a client certificate: Python's ``ssl`` refuses any
  client certificate it cannot chain to a CA it was given, and a link's client is a
  node we may never have seen.  Links authenticate the client inside the tunnel instead:
  the signed hello transcript of :mod:`lanchat.handshake`, which names the server's key.

Threads.  OpenSSL forbids two threads in one ``SSL`` object at once, and CPython releases
the GIL inside ``SSL_read``/``SSL_write``, so an ``ssl.SSLSocket`` cannot be shared by the
hub's reader thread and its outbox writer (a known source of corrupted records and
crashes).  :class:`TlsSocket` is what they share instead: an ``SSLObject`` on memory BIOs
whose every call holds one lock (CPU only, microseconds), with the socket I/O done outside
it; it offers the few socket methods ``stream`` uses (``recv``, ``send`` with
``MSG_DONTWAIT``, ``sendall``, ``shutdown``, ``fileno``).

Building block (like ``stream``): hub, links and the hub client may import it; it owns one
kind of I/O, TLS over a socket.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import os
import select
import socket
import ssl
import tempfile
import threading
import time
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from lanchat.errors import RemoteProtocolError, ValidationError
from lanchat.feed import PublicKey, SigningKey, fingerprint
from lanchat.limits import MAX_PEER_CERT_BYTES, TLS_HANDSHAKE_TIMEOUT_S

__all__ = [
    "BadPeerCertificate",
    "PeerKeyMismatch",
    "TlsSocket",
    "certificate_der",
    "certificate_pem",
    "client_context",
    "expect_key",
    "expect_node",
    "peer_key",
    "peer_key_for",
    "server_context",
    "tls_handshake",
]

#: Validity of every lanchat certificate: nobody checks it, so it never expires (RFC 5280
#: 4.1.2.5: 99991231235959Z means "no well-defined expiration date"), and it starts long
#: ago so that a machine whose clock is wrong still presents a currently valid one to
#: tools that look (``openssl s_client`` prints it).
NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
#: Domain label of the serial number's hash (a serial is 20 bytes at most, positive).
_SERIAL_DOMAIN = b"lanchat/cert-serial/v1\x00"


class BadPeerCertificate(RemoteProtocolError):
    """The peer presented no certificate, or one that carries no usable Ed25519 key."""

    code = "bad-cert"


class PeerKeyMismatch(RemoteProtocolError):
    """The peer's key is not the one expected: refuse it, log this message (one line).

    ``expected_node`` is the node id we dialled or pinned, ``expected`` its key when we
    knew it (a pin), ``got`` the key the peer proved it holds.
    """

    code = "wrong-key"

    def __init__(self, expected_node: str, got: PublicKey, *,
                 expected: PublicKey | None = None, where: str = "") -> None:
        expected_fp = fingerprint(expected) if expected is not None else "not known"
        at = f" at {where}" if where else ""
        super().__init__(
            f"the peer{at} is not node {expected_node} (fingerprint {expected_fp}): it "
            f"holds the key of node {got.node} (fingerprint {fingerprint(got)})")
        self.expected_node = expected_node
        self.expected = expected
        self.got = got


# -- the certificate ----------------------------------------------------------------------

def _private(key: SigningKey) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(key.seed)


def certificate_der(key: SigningKey) -> bytes:
    """The node's self-signed certificate (DER): subject and issuer CN = its node id.

    Deterministic: one key, one certificate (see the module docstring).
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.node)])
    serial = int.from_bytes(hashlib.sha256(_SERIAL_DOMAIN + key.public.raw).digest()[:16],
                            "big") >> 1 or 1  # positive, at most 127 bits
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(_private(key).public_key())
            .serial_number(serial)
            .not_valid_before(NOT_BEFORE)
            .not_valid_after(NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(_private(key), None))
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_pem(key: SigningKey) -> bytes:
    """:func:`certificate_der` as PEM (what ``openssl`` and ``ssl`` read)."""
    return x509.load_der_x509_certificate(certificate_der(key)).public_bytes(
        serialization.Encoding.PEM)


def _chain_pem(key: SigningKey) -> bytes:
    secret = _private(key).private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    return certificate_pem(key) + secret


# -- contexts -----------------------------------------------------------------------------

def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _load_chain(ctx: ssl.SSLContext, key: SigningKey, scratch_dir: str | None) -> None:
    """Hand the certificate and private key to ``ctx`` without leaving them on disk."""
    data = _chain_pem(key)
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        try:
            fd = memfd("lanchat-tls", os.MFD_CLOEXEC)
        except OSError:
            fd = -1  # a kernel without memfd (or a seccomp filter): use a file
        if fd >= 0:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
                return
            except (OSError, ssl.SSLError):
                pass  # no /proc (a chroot): use a file
            finally:
                os.close(fd)
    fd, path = tempfile.mkstemp(dir=scratch_dir, prefix=".lanchat-tls.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def server_context(key: SigningKey, *, scratch_dir: str | None = None) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting ``key``'s certificate; asks for no client one.

    ``scratch_dir`` (the state directory) is used only where there is no ``memfd``: the
    key is written there for the moment ``ssl`` reads it (mode 0600, unlinked at once).
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_NONE
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    _load_chain(ctx, key, scratch_dir)
    return ctx


def client_context() -> ssl.SSLContext:
    """A TLS 1.3 client context that accepts any certificate: the caller pins the key.

    Safe only with :func:`expect_node` or :func:`expect_key` right after the handshake,
    before anything is sent or believed: that check replaces chain and host name checks.
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the peer's key -----------------------------------------------------------------------

def peer_key(der: bytes | None) -> PublicKey:
    """The Ed25519 key in a peer's certificate (``getpeercert(binary_form=True)``).

    Raises :class:`BadPeerCertificate` for no certificate, one over
    ``limits.MAX_PEER_CERT_BYTES``, one that does not parse, or one whose key is not
    Ed25519.  The certificate's own signature and fields are not checked (see the module
    docstring): TLS has proved the peer holds this key, and the key is all we trust.
    """
    if not der:
        raise BadPeerCertificate("the peer presented no certificate")
    if len(der) > MAX_PEER_CERT_BYTES:
        raise BadPeerCertificate(f"the peer's certificate is {len(der)} bytes; the limit is "
                                 f"{MAX_PEER_CERT_BYTES}")
    try:
        public = x509.load_der_x509_certificate(der).public_key()
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        # (the last two are no ValueError: an unknown version, an unknown key type)
        raise BadPeerCertificate(f"the peer's certificate does not parse: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise BadPeerCertificate("the peer's certificate does not carry an Ed25519 key "
                                 f"({type(public).__name__}): it is not a lanchat node")
    return PublicKey(public.public_bytes_raw())


def peer_key_for(der: bytes | None, node: str, *, where: str = "") -> PublicKey:
    """The key in ``der`` if it is node ``node``'s; :class:`PeerKeyMismatch` otherwise."""
    got = peer_key(der)
    try:
        return PublicKey.for_node(node, got.raw)
    except ValidationError:
        raise PeerKeyMismatch(node, got, where=where) from None


class HasPeerCert(Protocol):
    """What :func:`expect_node` needs of a TLS connection (``SSLSocket``, ``SSLObject``)."""

    def getpeercert(self, binary_form: bool = ...) -> object: ...


def _peer_der(conn: HasPeerCert) -> bytes | None:
    der = conn.getpeercert(binary_form=True)
    return der if isinstance(der, bytes) else None


def expect_node(conn: HasPeerCert, node: str, *, where: str = "") -> PublicKey:
    """Check that the peer of ``conn`` is node ``node``; return its key.

    Call right after the handshake, before sending or trusting anything.  ``where`` (an
    address) goes into the error's message.  Raises :class:`PeerKeyMismatch` (expected and
    actual node ids and fingerprints) or :class:`BadPeerCertificate`.
    """
    return peer_key_for(_peer_der(conn), node, where=where)


def expect_key(conn: HasPeerCert, key: PublicKey, *, where: str = "") -> PublicKey:
    """Like :func:`expect_node` for a pinned key (a known hub): both fingerprints shown."""
    got = peer_key(_peer_der(conn))
    if got != key:
        raise PeerKeyMismatch(key.node, got, expected=key, where=where)
    return got


# -- a TLS connection two threads can share ----------------------------------------------

#: Bytes asked of the socket per read: a TLS record is at most 16 KiB plus overhead.
_RECV_BYTES = 64 * 1024
#: Most plaintext encrypted per ``send`` call: a bound on the ciphertext held back when
#: the socket is full (four full records).
_MAX_PLAIN_PER_SEND = 64 * 1024


def tls_handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                  timeout: float = TLS_HANDSHAKE_TIMEOUT_S) -> TlsSocket:
    """Run the TLS handshake on the connected ``sock``; the :class:`TlsSocket` over it.

    The whole handshake must end within ``timeout`` seconds (``TimeoutError`` otherwise:
    a peer that stalls holds no slot for long).  ``ssl.SSLError`` for a failed handshake,
    ``ConnectionError`` if the peer closes during it.  ``sock``'s timeout is restored.
    A client checks the server's key (:func:`expect_node`) before it sends anything.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side)
    saved = sock.gettimeout()
    end = time.monotonic() + timeout
    try:
        for _ in range(1000):  # a handshake is a few flights; the deadline ends it anyway
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            data = outgoing.read()
            if data:
                sock.settimeout(max(end - time.monotonic(), 0.001))
                sock.sendall(data)
            if done:
                return TlsSocket(sock, obj, incoming, outgoing)
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("the TLS handshake took too long")
            sock.settimeout(left)
            chunk = sock.recv(_RECV_BYTES)
            if not chunk:
                raise ConnectionError("the peer closed the connection during the TLS "
                                      "handshake")
            incoming.write(chunk)
        raise TimeoutError("the TLS handshake did not end")
    finally:
        sock.settimeout(saved)


def _has_data(sock: socket.socket) -> bool:
    """True if ``sock`` can be read without waiting (data, an end, or an error)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class TlsSocket:
    """TLS over a connected socket, for one reader thread and any writer threads at once.

    Locks: ``_ssl`` guards the ``SSLObject`` and both memory BIOs, and is never held
    during socket I/O.  ``_send`` (taken before ``_ssl``, never after) orders the writers:
    records leave in the order they were made.  The reader takes only ``_ssl``, so it
    never waits for a writer blocked on a full socket; what reading produces (the answer
    to a peer's KeyUpdate) leaves with the next write, or at :meth:`flush`.

    ``send(data, MSG_DONTWAIT)`` keeps the plain socket's promise that the count it
    returns is exactly what will reach the peer.  Once encrypted, plaintext cannot be
    taken back, so when the socket takes only part of the new records, the rest waits
    (``_pending``) and the count *withholds the last byte* encrypted: the caller sends
    that byte again with the rest of its data, and it is recognized and skipped
    (``_carry``), so it is sent once, and the caller -- which now has something left to
    send -- is sure to come back and flush what waits.  (Only if the caller then drops
    its data instead, as an outbox cutting a stalled receiver does, has that one byte
    already gone: the receiver is being cut off anyway.)
    """

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self._sock = sock
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._ssl = threading.Lock()  # guards _obj, _in, _out
        self._send = threading.Lock()  # guards _pending, _carry and the order of writes
        #: Ciphertext made but not yet taken by the socket.
        self._pending = b""
        #: The last plaintext byte encrypted but not counted as sent (see above).
        self._carry: int | None = None

    # -- what the caller needs of a socket --

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes of plaintext; ``b""`` at the end of the stream.

        Blocks, or raises ``BlockingIOError``/``TimeoutError``, as the socket does.  An end
        without TLS's close_notify is an end too: lanchat's frames are lines, and a line
        cut short is dropped whole.
        """
        if flags & socket.MSG_PEEK:
            raise ValueError("MSG_PEEK is not supported on a TLS connection")
        while True:
            data_read = False
            with self._ssl:
                try:
                    data = self._obj.read(bufsize)
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
                else:
                    data_read = True
            if data_read:
                return self._read_more(data, bufsize) if data else data
            chunk = self._sock.recv(_RECV_BYTES, flags)
            with self._ssl:
                if chunk:
                    self._in.write(chunk)
                else:
                    self._in.write_eof()

    def _read_more(self, data: bytes, bufsize: int) -> bytes:
        """``data`` and whatever else has arrived by now, up to ``bufsize``, never waiting.

        One ``SSL_read`` yields at most one record (16 KiB): without this a reader asking
        for 256 KiB would get a sixteenth of what already arrived per call.  Reads the
        socket only without blocking; the caller (the reader) does not hold ``_ssl``.
        """
        parts = [data]
        size = len(data)
        while size < bufsize:
            with self._ssl:
                try:
                    more = self._obj.read(bufsize - size)
                except ssl.SSLWantReadError:
                    more = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break  # the end shows at the next call
            if more:
                parts.append(more)
                size += len(more)
                continue
            # (Not MSG_DONTWAIT: on a socket with a timeout Python would wait that long.)
            if not _has_data(self._sock):
                break
            try:
                chunk = self._sock.recv(_RECV_BYTES)
            except OSError:
                break  # the next call meets the error again
            with self._ssl:
                if chunk:
                    self._in.write(chunk)
                else:
                    self._in.write_eof()
            if not chunk:
                break
        return b"".join(parts) if len(parts) > 1 else data

    def readable(self) -> bool:
        """True if a :meth:`recv` now would not wait: plaintext or a record's bytes are
        buffered, or the socket has data (a record still arriving counts as data)."""
        with self._ssl:
            if self._obj.pending() or self._in.pending:
                return True
        return _has_data(self._sock)

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:
        """Encrypt and send a prefix of ``data``; how many bytes of it (see the class).

        Non-blocking with ``MSG_DONTWAIT`` or a non-blocking socket: ``BlockingIOError``
        when nothing can be taken, like a socket; never 0 for non-empty ``data``.  On a
        blocking socket (or one with a timeout) it sends all it accepts before returning.
        """
        view = memoryview(data).cast("B")
        if not (flags & socket.MSG_DONTWAIT) and self._sock.gettimeout() != 0.0:
            chunk = view[:_MAX_PLAIN_PER_SEND]
            self.sendall(chunk)
            return len(chunk)
        with self._send:
            skip = self._skip_carry(view)
            self._pending = self._pending[self._raw_send(self._pending, flags):]
            if self._pending:  # the socket is still full: accept nothing new
                if skip:
                    self._carry = view[0]
                raise BlockingIOError(errno.EAGAIN, "the socket is full")
            chunk = view[skip:skip + _MAX_PLAIN_PER_SEND]
            if not chunk:
                return skip
            with self._ssl:
                self._obj.write(chunk)
                out = self._out.read()
            self._pending = out[self._raw_send(out, flags):]
            if not self._pending:
                return skip + len(chunk)
            self._carry = chunk[-1]  # withheld: the caller comes back with it
            if skip + len(chunk) - 1 == 0:
                raise BlockingIOError(errno.EAGAIN, "the socket is full")
            return skip + len(chunk) - 1

    def sendall(self, data: bytes | memoryview) -> None:
        """Encrypt and send all of ``data`` (blocking, with the socket's timeout)."""
        view = memoryview(data).cast("B")
        with self._send:
            skip = self._skip_carry(view)
            with self._ssl:
                if len(view) > skip:
                    self._obj.write(view[skip:])
                out = self._out.read()
            data_out, self._pending = self._pending + out, b""
            self._sock.sendall(data_out)

    def flush(self) -> None:
        """Send what waits (records a read made, a full socket's rest); blocking."""
        self.sendall(b"")

    def _skip_carry(self, view: memoryview) -> int:
        """1 if ``view`` starts with the byte withheld last time (already encrypted)."""
        carry, self._carry = self._carry, None
        return 1 if carry is not None and len(view) and view[0] == carry else 0

    def _raw_send(self, data: bytes, flags: int) -> int:
        if not data:
            return 0
        try:
            return self._sock.send(data, flags)
        except BlockingIOError:
            return 0

    def wait_writable(self, timeout: float) -> bool:
        """True once the socket can take more (for a caller without its own poller)."""
        poller = select.poll()
        poller.register(self._sock, select.POLLOUT)
        return bool(poller.poll(timeout * 1000))

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def getpeername(self) -> object:
        return self._sock.getpeername()

    # -- TLS --

    def getpeercert(self, binary_form: bool = False) -> object:
        with self._ssl:
            return self._obj.getpeercert(binary_form)

    def version(self) -> str | None:
        with self._ssl:
            return self._obj.version()

    def __enter__(self) -> TlsSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
