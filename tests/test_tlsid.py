"""TLS with the node key (lanchat.tlsid): real TLS 1.3 over loopback, the real ``openssl``.

A tiny server (one thread, one connection at a time, always joined) uses
``tlsid.server_context``; ``openssl s_client`` and the stdlib client context connect to it.
The system OpenSSL must negotiate TLS 1.3 with an Ed25519 certificate: these tests are the
proof that it does.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from lanchat import pinfile, tlsid
from lanchat.feed import PublicKey, SigningKey, fingerprint
from lanchat.limits import MAX_PEER_CERT_BYTES
from lanchat.pins import HUBS_HEADER, HubDecision, Pins, PinStatus, decide_hub, hub_name

pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT_S = 10.0


def new_key() -> SigningKey:
    return SigningKey(secrets.token_bytes(32))


class EchoServer:
    """Accepts TLS connections on 127.0.0.1 one after another; answers each line with
    ``<node id> <line>`` and closes at ``quit``; records what each connection negotiated."""

    def __init__(self, key: SigningKey, ctx: ssl.SSLContext | None = None,
                 port: int = 0) -> None:
        self.key = key
        self.ctx = ctx or tlsid.server_context(key)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.versions: list[str | None] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tls-echo")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(IO_TIMEOUT_S)
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as conn:
                    self.versions.append(conn.version())
                    with conn.makefile("rb") as f:  # holds the socket open until closed
                        for _ in range(100):
                            line = f.readline(1024)
                            if not line or line == b"quit\n":
                                break
                            conn.sendall(self.key.node.encode() + b" " + line)
            except (OSError, ssl.SSLError) as exc:
                self.errors.append(str(exc))
            finally:
                raw.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(IO_TIMEOUT_S)
        self.listener.close()


@pytest.fixture
def server() -> Iterator[EchoServer]:
    srv = EchoServer(new_key())
    try:
        yield srv
    finally:
        srv.close()


def tls_connect(port: int, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    try:
        return (ctx or tlsid.client_context()).wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


# -- the certificate ----------------------------------------------------------------------

def test_certificate_carries_the_identity_key_and_is_stable() -> None:
    key = new_key()
    der = tlsid.certificate_der(key)
    cert = x509.load_der_x509_certificate(der)
    public = cert.public_key()
    assert isinstance(public, Ed25519PublicKey)
    assert public.public_bytes_raw() == key.public.raw
    assert cert.subject.rfc4514_string() == f"CN={key.node}"
    assert tlsid.certificate_der(key) == der  # made at start: the same bytes every time
    assert tlsid.certificate_der(new_key()) != der
    assert tlsid.peer_key(der) == key.public
    assert tlsid.peer_key_for(der, key.node) == key.public
    assert len(der) < MAX_PEER_CERT_BYTES // 4
    public.verify(cert.signature, cert.tbs_certificate_bytes)  # really self-signed


def test_peer_key_for_refuses_a_key_that_is_not_the_nodes() -> None:
    alice, mallory = new_key(), new_key()
    with pytest.raises(tlsid.PeerKeyMismatch) as info:
        tlsid.peer_key_for(tlsid.certificate_der(mallory), alice.node, where="10.0.0.9:7000")
    text = str(info.value)
    assert info.value.code == "wrong-key"
    assert alice.node in text and mallory.node in text and "10.0.0.9:7000" in text
    assert fingerprint(mallory.public) in text


def test_peer_key_refuses_missing_huge_garbled_and_non_ed25519_certificates() -> None:
    for der in (None, b""):
        with pytest.raises(tlsid.BadPeerCertificate, match="no certificate"):
            tlsid.peer_key(der)
    with pytest.raises(tlsid.BadPeerCertificate, match="limit"):
        tlsid.peer_key(b"\x30" * (MAX_PEER_CERT_BYTES + 1))
    der = tlsid.certificate_der(new_key())
    with pytest.raises(tlsid.BadPeerCertificate, match="does not parse"):
        tlsid.peer_key(der[:-10])
    # an X25519 key in a certificate signed by some Ed25519 key: not a node's identity
    signer = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")])
    other = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
             .public_key(X25519PrivateKey.generate().public_key()).serial_number(7)
             .not_valid_before(tlsid.NOT_BEFORE).not_valid_after(tlsid.NOT_AFTER)
             .sign(signer, None))
    with pytest.raises(tlsid.BadPeerCertificate, match="Ed25519"):
        tlsid.peer_key(other.public_bytes(serialization.Encoding.DER))


def test_peer_key_refuses_a_bad_version_and_an_unknown_key_type_as_bad_certificates() -> None:
    """Found in session 8: x509 raises InvalidVersion and UnsupportedAlgorithm, which are no
    ValueError, so such a certificate escaped peer_key as an unexpected error (the link code's
    "failed unexpectedly" path) instead of the clear bad-cert refusal."""
    key = new_key()
    der = tlsid.certificate_der(key)
    at = der.find(b"\xa0\x03\x02\x01\x02")  # [0] version: v3
    assert at > 0
    with pytest.raises(tlsid.BadPeerCertificate, match="does not parse"):
        tlsid.peer_key(der[:at + 4] + b"\x05" + der[at + 5:])
    oid = der.rfind(b"\x06\x03\x2b\x65\x70", 0, der.find(key.public.raw))  # its key's type
    assert oid > 0
    with pytest.raises(tlsid.BadPeerCertificate, match="does not parse"):
        tlsid.peer_key(der[:oid + 4] + b"\x63" + der[oid + 5:])  # 1.3.101.99: unknown


def test_server_context_leaves_no_key_file_behind_even_without_memfd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key()
    tlsid.server_context(key, scratch_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delattr("os.memfd_create")  # the mkstemp path
    ctx = tlsid.server_context(key, scratch_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    srv = EchoServer(key, ctx)
    try:
        with tls_connect(srv.port) as conn:
            assert tlsid.expect_node(conn, key.node) == key.public
    finally:
        srv.close()


# -- the stdlib client against the server -------------------------------------------------

def test_stdlib_client_negotiates_tls13_and_pins_the_node(server: EchoServer) -> None:
    with tls_connect(server.port) as conn:
        assert conn.version() == "TLSv1.3"
        assert tlsid.expect_node(conn, server.key.node) == server.key.public
        assert tlsid.expect_key(conn, server.key.public) == server.key.public
        conn.sendall(b"hi\n")
        assert conn.makefile("rb").readline() == server.key.node.encode() + b" hi\n"
    assert server.versions == ["TLSv1.3"]


def test_pinning_refuses_a_server_holding_another_key(server: EchoServer) -> None:
    expected = new_key()
    with tls_connect(server.port) as conn:
        with pytest.raises(tlsid.PeerKeyMismatch) as by_node:
            tlsid.expect_node(conn, expected.node, where=f"127.0.0.1:{server.port}")
        with pytest.raises(tlsid.PeerKeyMismatch) as by_key:
            tlsid.expect_key(conn, expected.public)
    assert f"127.0.0.1:{server.port}" in str(by_node.value)
    assert server.key.node in str(by_node.value)
    # a pinned key: both fingerprints are in the message
    assert fingerprint(expected.public) in str(by_key.value)
    assert fingerprint(server.key.public) in str(by_key.value)
    assert by_key.value.got == server.key.public


def test_a_node_id_claimed_with_another_key_is_refused(server: EchoServer) -> None:
    """A server whose certificate names node X (CN) but carries its own key is not X."""
    victim, impostor = new_key(), new_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, victim.node)])
    priv = Ed25519PrivateKey.from_private_bytes(impostor.seed)
    forged = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(priv.public_key()).serial_number(1)
              .not_valid_before(tlsid.NOT_BEFORE).not_valid_after(tlsid.NOT_AFTER)
              .sign(priv, None))
    with pytest.raises(tlsid.PeerKeyMismatch):
        tlsid.peer_key_for(forged.public_bytes(serialization.Encoding.DER), victim.node)


def test_server_refuses_tls12_and_client_refuses_a_tls12_server(server: EchoServer,
                                                                  tmp_path: Path) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        tls_connect(server.port, old).close()
    # and our client will not talk to a server that offers only TLS 1.2
    key = new_key()
    ctx12 = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx12.load_cert_chain(*_pem_files(key, tmp_path))
    srv12 = EchoServer(key, ctx12)
    try:
        with pytest.raises(ssl.SSLError):
            tls_connect(srv12.port).close()
    finally:
        srv12.close()


def _pem_files(key: SigningKey, where: Path) -> tuple[str, str]:
    cert, priv = where / "c.pem", where / "k.pem"
    cert.write_bytes(tlsid.certificate_pem(key))
    priv.write_bytes(Ed25519PrivateKey.from_private_bytes(key.seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(cert), str(priv)


# -- the real openssl ---------------------------------------------------------------------

def s_client(port: int, *extra: str, stdin: bytes = b"hello over tls\nquit\n") -> tuple[str, str]:
    openssl = require_tool("openssl", "openssl")
    proc = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts",
         "-ign_eof", "-nocommands", *extra],
        input=stdin, capture_output=True, timeout=30, check=False)
    return proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def _first_pem(text: str) -> bytes:
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.index(begin)
    return text[start:text.index(end, start) + len(end)].encode() + b"\n"


def test_openssl_s_client_gets_tls13_and_the_identity_key(server: EchoServer) -> None:
    out, err = s_client(server.port)
    assert "New, TLSv1.3, Cipher is TLS_" in out, out + err
    assert "peer signature type: ed25519" in out.lower(), out
    # the certificate openssl received carries exactly the node's identity key
    cert = x509.load_pem_x509_certificate(_first_pem(out))
    public = cert.public_key()
    assert isinstance(public, Ed25519PublicKey)
    assert PublicKey(public.public_bytes_raw()) == server.key.public
    assert tlsid.expect_node(_Der(cert.public_bytes(serialization.Encoding.DER)),
                             server.key.node) == server.key.public
    with pytest.raises(tlsid.PeerKeyMismatch):
        tlsid.expect_node(_Der(cert.public_bytes(serialization.Encoding.DER)), new_key().node)
    # and the text went through the tunnel both ways
    assert f"{server.key.node} hello over tls" in out
    assert server.versions == ["TLSv1.3"]


def test_openssl_s_client_cannot_get_tls12(server: EchoServer) -> None:
    out, err = s_client(server.port, "-tls1_2")
    assert "Cipher is (NONE)" in out or "alert" in err.lower(), out + err
    assert f"{server.key.node} hello" not in out
    assert server.versions == []


def test_openssl_sees_the_same_certificate_as_certificate_pem(server: EchoServer) -> None:
    out, _ = s_client(server.port)
    assert _first_pem(out) == tlsid.certificate_pem(server.key)


class _Der:
    """What openssl showed, as a connection-like object for expect_node."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> object:
        assert binary_form
        return self.der


def test_expect_node_refuses_a_connection_without_certificate() -> None:
    with pytest.raises(tlsid.BadPeerCertificate):
        tlsid.expect_node(_Der(None), new_key().node)  # type: ignore[arg-type]



# -- lanchat connect's trust on first use, over real TLS ---------------------------------

def connect_pinned(port: int, path: str, accept: str | None = None) -> HubDecision:
    """What the wired ``lanchat connect`` is to do: TLS, the hub's key, decide under the
    pin file's lock, and speak only if the decision says so."""
    with tls_connect(port) as conn:
        key = tlsid.peer_key(conn.getpeercert(binary_form=True))
        decided: list[HubDecision] = []

        def change(pins: Pins) -> Pins:
            decided.append(decide_hub(pins, hub_name("127.0.0.1", port), key, path,
                                      accept=accept))
            return decided[-1].pins or pins

        pinfile.update(path, change, HUBS_HEADER)
        decision = decided[-1]
        if decision.proceed:
            conn.sendall(b"hello\nquit\n")
            assert conn.makefile("rb").readline() == key.node.encode() + b" hello\n"
        return decision


def test_connect_pins_at_first_contact_and_refuses_a_changed_hub_key(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "known_hubs")
    first, second = new_key(), new_key()
    srv = EchoServer(first)
    port = srv.port
    try:
        new = connect_pinned(port, path)
        assert new.check.status is PinStatus.NEW and new.proceed
        assert fingerprint(first.public) in (new.message or "")
        again = connect_pinned(port, path)
        assert again.check.status is PinStatus.MATCH and again.proceed and not again.message
    finally:
        srv.close()
    srv = EchoServer(second, port=port)  # the "same hub" comes back with another key
    try:
        changed = connect_pinned(port, path)
        assert changed.check.status is PinStatus.CHANGED and not changed.proceed
        warning = changed.message or ""
        assert "HAS CHANGED" in warning and fingerprint(first.public) in warning
        assert fingerprint(second.public) in warning
        command = f"lanchat connect --accept-key {second.node} 127.0.0.1:{port}"
        assert command in warning
        assert srv.versions == ["TLSv1.3"] and not srv.errors  # nothing was sent to it
        assert pinfile.load(path).get(f"127.0.0.1:{port}") == first.public  # unchanged
        # accepting another node id than the one presented accepts nothing
        wrong = connect_pinned(port, path, accept=first.node)
        assert not wrong.proceed and "not node" in (wrong.message or "")
        accepted = connect_pinned(port, path, accept=second.node)
        assert accepted.proceed and "accepted" in (accepted.message or "")
        assert connect_pinned(port, path).check.status is PinStatus.MATCH
    finally:
        srv.close()
    srv = EchoServer(first, port=port)  # the old key again: a change like any other
    try:
        assert not connect_pinned(port, path).proceed
    finally:
        srv.close()
