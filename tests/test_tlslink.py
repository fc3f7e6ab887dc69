"""tlsid + keyproof together over real TLS on loopback: the handshake the links will wire.

A minimal stand-in for the link handshake (JSON lines inside TLS 1.3), written from the
exchange in lanchat.keyproof's docstring: the client pins the server's key, then sends its
node id, key and nonce; the server answers its nonce; the client signs the transcript (and,
with a secret, both sides send HMAC proofs).  A hostile middle node M relays between a real
client and a real server, over real sockets, and is refused.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from lanchat import keyproof, tlsid
from lanchat.errors import LanchatError
from lanchat.feed import PublicKey, SigningKey
from lanchat.keyproof import LinkTranscript

pytestmark = pytest.mark.timeout(60)
IO_TIMEOUT_S = 10.0


def new_key() -> SigningKey:
    return SigningKey(secrets.token_bytes(32))


class Lines:
    """JSON lines over a TLS socket."""

    def __init__(self, conn: ssl.SSLSocket) -> None:
        self.conn = conn
        self.file = conn.makefile("rb")

    def send(self, obj: dict[str, Any]) -> None:
        self.conn.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline(4096)
        if not line:
            raise ConnectionError("closed")
        doc = json.loads(line)
        assert isinstance(doc, dict)
        return doc

    def close(self) -> None:
        self.file.close()
        self.conn.close()


class LinkServer:
    """Accepts links one at a time; records each outcome (``ok NODE`` or the error)."""

    def __init__(self, key: SigningKey, secret: bytes | None = None) -> None:
        self.key, self.secret = key, secret
        self.ctx = tlsid.server_context(key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="link-server")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(IO_TIMEOUT_S)
            try:
                lines = Lines(self.ctx.wrap_socket(raw, server_side=True))
            except (OSError, ssl.SSLError) as exc:
                raw.close()
                self.outcomes.append(f"tls: {exc}")
                continue
            try:
                self.outcomes.append(self._handshake(lines))
            except (LanchatError, OSError, ValueError, KeyError) as exc:
                self.outcomes.append(f"refused: {exc}")
                with contextlib.suppress(OSError):
                    lines.send({"type": "error", "message": str(exc)})
            finally:
                lines.close()

    def _handshake(self, lines: Lines) -> str:
        hello = lines.recv()
        client = PublicKey.for_node(hello["node"], PublicKey.from_text(hello["key"]).raw)
        server_nonce = secrets.token_bytes(keyproof.NONCE_BYTES)
        lines.send({"type": "challenge", "sn": keyproof.nonce_text(server_nonce)})
        t = LinkTranscript(client, self.key.public, keyproof.parse_nonce(hello["cn"]),
                           server_nonce)
        answer = lines.recv()
        keyproof.check_client_proof(t, answer["sig"])
        welcome: dict[str, Any] = {"type": "welcome"}
        if self.secret is not None:
            keyproof.check_secret_proof(self.secret, "client", t, answer.get("auth"))
            welcome["auth"] = keyproof.secret_proof(self.secret, "server", t)
        lines.send(welcome)
        return f"ok {client.node}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(IO_TIMEOUT_S)
        self.listener.close()


def dial(port: int, expect: str) -> tuple[Lines, PublicKey]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    try:
        conn = tlsid.client_context().wrap_socket(raw)
    except BaseException:
        raw.close()
        raise
    lines = Lines(conn)
    try:
        return lines, tlsid.expect_node(conn, expect)  # before anything is sent
    except BaseException:
        lines.close()
        raise


def link(key: SigningKey, port: int, expect: str, secret: bytes | None = None) -> str:
    """An honest client's whole handshake; returns the server's last frame type."""
    lines, server = dial(port, expect)
    try:
        client_nonce = secrets.token_bytes(keyproof.NONCE_BYTES)
        lines.send({"type": "hello", "node": key.node, "key": key.public.text,
                    "cn": keyproof.nonce_text(client_nonce)})
        challenge = lines.recv()
        t = LinkTranscript(key.public, server, client_nonce,
                           keyproof.parse_nonce(challenge["sn"]))
        answer = {"type": "proof", "sig": keyproof.client_proof(key, t)}
        if secret is not None:
            answer["auth"] = keyproof.secret_proof(secret, "client", t)
        lines.send(answer)
        reply = lines.recv()
        if secret is not None and reply["type"] == "welcome":
            keyproof.check_secret_proof(secret, "server", t, reply["auth"])
        return str(reply["type"])
    finally:
        lines.close()


@pytest.fixture
def servers() -> Iterator[list[LinkServer]]:
    made: list[LinkServer] = []
    try:
        yield made
    finally:
        for srv in made:
            srv.close()


def test_honest_link_with_and_without_secret(servers: list[LinkServer]) -> None:
    a, b = new_key(), new_key()
    srv = LinkServer(b)
    servers.append(srv)
    assert link(a, srv.port, b.node) == "welcome"
    secret_srv = LinkServer(b, secret=b"s3cret")
    servers.append(secret_srv)
    assert link(a, secret_srv.port, b.node, secret=b"s3cret") == "welcome"
    assert link(a, secret_srv.port, b.node, secret=b"wrong") == "error"
    srv.close()
    secret_srv.close()
    assert srv.outcomes == [f"ok {a.node}"]
    assert secret_srv.outcomes[0] == f"ok {a.node}"
    assert "shared-secret proof is wrong" in secret_srv.outcomes[1]


def test_client_refuses_a_server_that_is_not_the_node_it_dialled(
        servers: list[LinkServer]) -> None:
    b, impostor = new_key(), new_key()
    srv = LinkServer(impostor)
    servers.append(srv)
    with pytest.raises(tlsid.PeerKeyMismatch, match=b.node):
        link(new_key(), srv.port, b.node)
    srv.close()
    assert srv.outcomes and srv.outcomes[0].startswith("refused")  # nothing was sent to it


def test_a_middle_node_relaying_a_real_clients_proof_is_refused(
        servers: list[LinkServer]) -> None:
    """A dials M (a hostile node); M dials B posing as A and relays every frame."""
    a, b, m = new_key(), new_key(), new_key()
    target = LinkServer(b, secret=b"shared")
    servers.append(target)
    m_ctx = tlsid.server_context(m)
    relayed: list[str] = []

    def middle(listener: socket.socket) -> None:
        raw, _ = listener.accept()
        raw.settimeout(IO_TIMEOUT_S)
        victim = Lines(m_ctx.wrap_socket(raw, server_side=True))
        onward, _ = dial(target.port, b.node)  # M pins B honestly: it wants in
        try:
            for _ in range(3):  # hello -> B, challenge -> A, proof -> B
                onward.send(victim.recv())
                reply = onward.recv()
                relayed.append(str(reply.get("type")))
                victim.send(reply)
                if reply.get("type") != "challenge":
                    break
        except (OSError, ValueError):
            pass
        finally:
            onward.close()
            victim.close()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT_S)
        thread = threading.Thread(target=middle, args=(listener,), name="middle")
        thread.start()
        try:
            # A meant to reach M (it pinned M's key); the secret proof is A's too
            outcome = link(a, listener.getsockname()[1], m.node, secret=b"shared")
        finally:
            thread.join(IO_TIMEOUT_S)
    target.close()
    assert outcome == "error"
    assert relayed == ["challenge", "error"]
    assert len(target.outcomes) == 1 and "does not verify" in target.outcomes[0]
    assert a.node in target.outcomes[0]
