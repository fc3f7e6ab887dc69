"""First-byte detection for one port (lanchat.sniff): real ClientHellos against text and JSON.

ClientHellos come from the stdlib client context (through a memory BIO) and from the real
``openssl s_client`` (captured on a loopback socket); each is fed whole and one byte at a
time, as h11's tests feed their parsers.
"""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest
from conftest import require_tool

from lanchat import tlsid
from lanchat.sniff import SNIFF_BYTES, FirstBytes, classify

pytestmark = pytest.mark.timeout(30)


def stdlib_client_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tlsid.client_context().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def openssl_client_hello() -> bytes:
    openssl = require_tool("openssl", "openssl")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]
        proc = subprocess.Popen([openssl, "s_client", "-connect", f"127.0.0.1:{port}"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                for _ in range(100):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                    if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"):
                        break
        finally:
            proc.kill()
            proc.wait(10)
            assert proc.stdin is not None
            proc.stdin.close()
    return data


@pytest.mark.parametrize("source", [stdlib_client_hello, openssl_client_hello])
def test_real_client_hellos_are_tls_once_six_bytes_are_in(source: object) -> None:
    hello = source()  # type: ignore[operator]
    assert hello[0] == 0x16 and len(hello) > SNIFF_BYTES
    assert classify(hello) is FirstBytes.TLS
    for n in range(len(hello) + 1):  # one byte at a time: undecided, then TLS, never plain
        expected = FirstBytes.NEED_MORE if n < SNIFF_BYTES else FirstBytes.TLS
        assert classify(hello[:n]) is expected, n


@pytest.mark.parametrize("first", [
    b"alice\n", b"alice\r\n", b'{"type":"hello","nick":"alice"}\n', b"{", b"a", b"\n",
    b"\x80\x01\x03", "zoë\n".encode(), b"GET / HTTP/1.1\r\n", b"\x15\x03\x03\x00\x02",
    b"\x17\x03\x03\x00\x10\x01",
])
def test_text_and_json_are_plain_from_their_first_byte(first: bytes) -> None:
    assert classify(first) is FirstBytes.PLAIN
    assert classify(first[:1]) is FirstBytes.PLAIN


@pytest.mark.parametrize("start", [
    b"\x16\x02", b"\x16\x03\x00", b"\x16\x03\x05", b"\x16\x03\x01\x00\x00",
    b"\x16\x03\x01\x00\x03", b"\x16\x03\x01\x40\x01", b"\x16\x03\x01\x00\x40\x02",
    b"\x16\x03\x03\x00\x40\x00", b"\x16h",
])
def test_a_first_byte_0x16_that_is_no_client_hello_is_refused_early(start: bytes) -> None:
    assert classify(start) is FirstBytes.INVALID
    # decided from the byte that breaks the header, not later
    assert all(classify(start[:n]) is FirstBytes.NEED_MORE for n in range(1, len(start)))


def test_nothing_yet_is_undecided_and_silence_is_a_text_user() -> None:
    assert classify(b"") is FirstBytes.NEED_MORE
    assert classify(b"\x16") is FirstBytes.NEED_MORE
    # nc waits for the greeting: no first byte within the grace means plain text
    assert classify(b"", timed_out=True) is FirstBytes.PLAIN
    # part of a record header when the handshake deadline passes: neither protocol
    hello = stdlib_client_hello()
    for n in range(1, SNIFF_BYTES):
        assert classify(hello[:n], timed_out=True) is FirstBytes.INVALID
    assert classify(hello, timed_out=True) is FirstBytes.TLS
    assert classify(b"alice", timed_out=True) is FirstBytes.PLAIN


def test_only_the_first_six_bytes_count() -> None:
    hello = stdlib_client_hello()
    assert classify(hello[:SNIFF_BYTES] + b"\x00" * 100) is FirstBytes.TLS
