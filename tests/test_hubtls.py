"""Clients over TLS on the hub's one port (issue 14, item 2), against a real lanchatd.

The real tools: ``openssl s_client`` joins in text mode, ``lanchat connect`` speaks JSON
over TLS and pins the hub's key in ``known_hubs`` (each test has its own
``$XDG_STATE_HOME``, see conftest), a raw socket plays ``nc``, garbage and a stalled
handshake.  ``plain_clients = false`` is set in a real config file.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from typing import Any, cast

import pytest
from conftest import SETTLE_S, Daemon, LineClient, TextUser, lanchat_cmd, require_tool, wait_for
from rogue import Rogue
from test_connect import Connect
from test_links import linked

from lanchat import pinfile, tlsid
from lanchat.hubsession import TLS_REQUIRED

pytestmark = pytest.mark.timeout(120)


def openssl() -> str:
    return require_tool("openssl", "openssl")


class SClient(Connect):
    """``openssl s_client -quiet`` to the hub: a text-mode user over TLS, by lines."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.proc = subprocess.Popen(
            [openssl(), "s_client", "-connect", f"127.0.0.1:{port}", "-quiet"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.timeout = timeout
        self._bufs: dict[int, bytes] = {}


def users_table(d: Daemon) -> dict[str, str]:
    """``lanchat users``: nick -> the VIA column as printed."""
    r = d.cli("users")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    start = lines[0].index("VIA")
    end = lines[0].index("SINCE")
    return {line.split()[0]: line[start:end].strip() for line in lines[1:]}


def status(d: Daemon) -> tuple[str, str]:
    """(node id, fingerprint) from ``lanchat status``: what a user compares."""
    r = d.cli("--json", "status")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    return str(got["node"]), str(got["fingerprint"])


def plain_refusing(make_daemon: Any, workdir: str, *extra: str) -> Daemon:
    path = os.path.join(workdir, "tls-only.toml")
    with open(path, "w") as f:
        f.write("plain_clients = false\n")
    return make_daemon("--config", path, *extra)  # type: ignore[no-any-return]


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello, as the first flight of a client that then stalls."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- TLS clients ---------------------------------------------------------------------------------

def test_openssl_s_client_chats_with_lanchat_connect_over_tls(daemon: Daemon, clients: list[Any],
                                                              connects: list[Connect]) -> None:
    olga = SClient(daemon.port)
    connects.append(olga)
    assert "lanchat hub" in olga.line(SETTLE_S)  # the greeting, decrypted
    assert "nickname" in olga.line().lower()
    olga.type("olga")
    assert olga.line().startswith("* Welcome, olga!")
    bob = Connect("--nick", "bob", f"127.0.0.1:{daemon.port}")
    connects.append(bob)
    assert bob.line(SETTLE_S).startswith("* Connected to ")
    assert olga.line() == "* bob joined #lobby"
    olga.type("hello from openssl")
    assert bob.until("hello from openssl").endswith("] olga: hello from openssl")
    bob.type("hello back over TLS")
    assert olga.until("hello back").endswith("] bob: hello back over TLS")
    # both are encrypted: not marked plain, here or on the hub's /users
    assert users_table(daemon) == {"owner": "daemon", "olga": "tls", "bob": "tls-json"}
    olga.type("/users")
    assert olga.until("* In #") == "* In #lobby (3): owner, bob, olga"
    olga.type("/quit")
    assert olga.until("Bye") == "* Bye!"
    assert bob.until("olga left") == "* olga left #lobby (quit)"


def test_plain_text_client_still_works_and_is_marked_plain(daemon: Daemon, clients: list[Any],
                                                           connects: list[Connect]) -> None:
    started = time.monotonic()
    alice = TextUser(daemon.port, "alice")  # nc: waits for the greeting, then types
    clients.append(alice)
    waited = time.monotonic() - started
    bob = Connect("--nick", "bob", f"127.0.0.1:{daemon.port}")
    connects.append(bob)
    assert bob.line(SETTLE_S).startswith("* Connected to ")
    alice.line()  # bob joined
    alice.send("plain hello\n")
    assert bob.until("plain hello").endswith("] alice: plain hello")
    assert users_table(daemon) == {"owner": "daemon", "alice": "tcp (plain)",
                                   "bob": "tls-json"}
    r = daemon.cli("--json", "users")
    assert {u["nick"]: u["plain"] for u in json.loads(r.stdout)} == {
        "owner": False, "alice": True, "bob": False}
    bob.type("/users")
    assert bob.until("* In #") == "* In #lobby (3): owner, alice (plain), bob"
    print(f"the plain text client was greeted after {waited:.2f} s (first-byte grace 0.3 s)")


def test_plain_clients_false_refuses_plain_text_json_and_udp(make_daemon: Any, workdir: str,
                                                             clients: list[Any],
                                                             connects: list[Connect]) -> None:
    d = plain_refusing(make_daemon, workdir)
    silent = LineClient(d.port)  # nc, waiting for a greeting
    clients.append(silent)
    assert silent.line(SETTLE_S) == f"! {TLS_REQUIRED}"
    assert silent.closed()
    eager = LineClient(d.port)  # types its nick at once
    clients.append(eager)
    eager.send("alice\n")
    assert eager.until("!") == f"! {TLS_REQUIRED}"
    assert eager.closed()
    j = LineClient(d.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    err = json.loads(j.until(lambda s: s.startswith("{")))
    assert err["type"] == "error" and err["code"] == "tls-required" and err["fatal"], err
    assert j.closed()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(SETTLE_S)
    try:
        udp.sendto(b"udpuser\n", ("127.0.0.1", d.port))
        assert udp.recvfrom(8192)[0].decode() == f"! {TLS_REQUIRED}\n"
    finally:
        udp.close()
    cleartext = Connect("--no-tls", "--nick", "carl", f"127.0.0.1:{d.port}")
    connects.append(cleartext)
    status, _, err_out = cleartext.finish(timeout=SETTLE_S)
    assert status == 1 and b"accepts only encrypted clients" in err_out, err_out
    # encrypted clients are welcome
    olga = SClient(d.port)
    connects.append(olga)
    olga.line(SETTLE_S), olga.line()
    olga.type("olga")
    assert olga.line().startswith("* Welcome, olga! You are in #lobby with owner.")
    bob = Connect("--nick", "bob", f"127.0.0.1:{d.port}")
    connects.append(bob)
    assert bob.line(SETTLE_S).startswith("* Connected to ")
    assert users_table(d) == {"owner": "daemon", "olga": "tls", "bob": "tls-json"}


# -- the hub's key, pinned -----------------------------------------------------------------------

def test_a_changed_hub_key_is_refused_until_accepted(make_daemon: Any, workdir: str,
                                                     private_state_home: str) -> None:
    first = make_daemon(subdir="first")
    port = first.port
    old_node, old_fp = status(first)
    hub = f"127.0.0.1:{port}"
    cmd = [*lanchat_cmd(), "connect", "--nick", "bob", hub]
    met = subprocess.run(cmd, input=b"/quit\n", capture_output=True, timeout=30, check=False)
    assert met.returncode == 0, met.stderr
    note = met.stderr.decode()
    assert note.startswith(f"first contact with hub {hub}: node {old_node}\n"), note
    assert f"fingerprint {old_fp}\n" in note
    path = pinfile.known_hubs_path(os.environ)
    assert path.startswith(private_state_home) and f"pinned in {path}" in note
    again = subprocess.run(cmd, input=b"/quit\n", capture_output=True, timeout=30, check=False)
    assert again.returncode == 0 and again.stderr == b"", again.stderr
    first.stop()
    # the "same hub" (address and port) comes back with another key
    os.makedirs(os.path.join(workdir, "second"))
    second = Daemon(os.path.join(workdir, "second"))
    second.requested_port = port
    try:
        second.start()
        changed_hub(second, cmd, hub, old_fp)
    finally:
        second.stop()


def changed_hub(second: Daemon, cmd: list[str], hub: str, old_fp: str) -> None:
    new_node, new_fp = status(second)
    assert new_fp != old_fp
    refused = subprocess.run(cmd, input=b"must never be sent\n", capture_output=True,
                             timeout=30, check=False)
    warning = refused.stderr.decode()
    assert refused.returncode == 1 and refused.stdout == b"", warning
    assert "WARNING: THE KEY OF HUB" in warning and "HAS CHANGED" in warning
    assert old_fp in warning and new_fp in warning
    accept = f"lanchat connect --accept-key {new_node} {hub}"
    assert accept in warning and "nothing was sent" in warning
    assert "bob" not in users_table(second)  # it never said hello
    history = second.cli("--json", "history").stdout.decode()
    assert "must never be sent" not in history
    accepted = subprocess.run([*cmd[:-1], "--accept-key", new_node, hub],
                              input=b"after accepting\n/quit\n", capture_output=True,
                              timeout=30, check=False)
    assert accepted.returncode == 0, accepted.stderr
    assert b"Connected to" in accepted.stdout
    assert "new key is accepted" in accepted.stderr.decode() and new_fp in accepted.stderr.decode()
    wait_for("the accepted client's message", lambda: "after accepting" in second.cli(
        "--json", "history").stdout.decode(), SETTLE_S)
    quiet = subprocess.run(cmd, input=b"/quit\n", capture_output=True, timeout=30, check=False)
    assert quiet.returncode == 0 and quiet.stderr == b"", quiet.stderr


# -- what is neither -----------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"\x16junk that is not TLS\n",                                 # not a record header
    b"\x16\x03\x01\x00\x30\x02" + b"\x00" * 0x2f,                 # a record, not a ClientHello
    b"\x16\x03\x01\x00\x30\x01" + b"\xff" * 0x2f,                 # a ClientHello of garbage
], ids=["header", "not-client-hello", "bad-client-hello"])
def test_tls_byte_then_garbage_is_closed_without_harming_others(
        daemon: Daemon, clients: list[Any], connects: list[Connect], garbage: bytes) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    olga = SClient(daemon.port)
    connects.append(olga)
    olga.line(SETTLE_S), olga.line()
    olga.type("olga")
    olga.line()
    alice.line()  # olga joined
    bad = LineClient(daemon.port)
    clients.append(bad)
    bad.send(garbage)
    assert bad.closed(SETTLE_S)
    alice.send("still here\n")
    assert olga.until("still here").endswith("] alice: still here")
    olga.type("me too")
    assert alice.until("me too").endswith("] olga: me too")
    assert "Traceback" not in daemon.stderr()
    assert set(users_table(daemon)) == {"owner", "alice", "olga"}


def test_a_stalled_tls_handshake_is_dropped_and_holds_no_slot(make_daemon: Any,
                                                              clients: list[Any]) -> None:
    deadline_s = 2.0
    d = make_daemon(env={"LANCHAT_TLS_HANDSHAKE_TIMEOUT_S": str(deadline_s),
                         "LANCHAT_MAX_CONNECTIONS": "1"})
    hello = client_hello()
    staller = LineClient(d.port)
    clients.append(staller)
    started = time.monotonic()
    staller.send(hello[:len(hello) // 2])  # half a ClientHello, then nothing
    # it holds the only client slot while its deadline runs: a newcomer is refused
    over = LineClient(d.port)
    clients.append(over)
    assert over.until("!", timeout=SETTLE_S) == "! server full (limit 1 connections)"
    assert staller.closed(SETTLE_S)
    took = time.monotonic() - started
    print(f"the stalled handshake was dropped after {took:.2f} s (deadline {deadline_s} s)")
    assert took >= deadline_s * 0.9, took
    # its slot is free again
    alice = wait_for("a free slot", lambda: _join(d.port, "alice"), SETTLE_S)
    clients.append(alice)
    assert "Traceback" not in d.stderr()


def _join(port: int, nick: str) -> TextUser | None:
    try:
        return TextUser(port, nick)
    except (AssertionError, EOFError, OSError):
        return None




#: Runs lanchatd with a small send buffer on every hub connection (``_tune`` wrapped), so
#: that the kernel takes little and the hub's own partial writes are what is tested.
SMALL_SNDBUF_PREFIX = [sys.executable, "-c", """
import runpy, socket, sys
import lanchat.hub
tune = lanchat.hub._tune
def small(sock):
    tune(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
lanchat.hub._tune = small
sys.argv = ["lanchatd", *sys.argv[4:]]  # after "-c" comes "python -m lanchat.daemon"
runpy.run_module("lanchat.daemon", run_name="__main__")
"""]


def test_a_slow_tls_reader_gets_every_line_intact(make_daemon: Any, clients: list[Any]) -> None:
    """Records the socket did not take wait and go first: a TLS reader that stops reading
    while a burst fills the hub's side (a small send buffer: sends fail or are partial)
    gets every line, in order, once it reads again."""
    d = make_daemon(prefix=SMALL_SNDBUF_PREFIX)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(SETTLE_S)
    raw.connect(("127.0.0.1", d.port))
    tls = tlsid.tls_handshake(raw, tlsid.client_context(), server_side=False)
    try:
        got = b""
        while b"nickname" not in got:
            got += tls.recv(65536)
        tls.sendall(b"slow\n")
        while b"Welcome, slow!" not in got:
            got += tls.recv(65536)
        fast = TextUser(d.port, "fast")
        clients.append(fast)
        # ~460 KB: far more than the two sockets' buffers hold, less than what the hub
        # queues for a receiver before it cuts it off (MAX_OUTBOX_BYTES, 512 KiB)
        count = 450
        lines = [f"line {i:04d} " + "x" * 1000 for i in range(count)]
        fast.send("".join(line + "\n" for line in lines))  # text mode: not sent back to it
        time.sleep(1.0)  # the hub's socket is full: records wait on its side
        received = b""
        deadline = time.monotonic() + SETTLE_S
        while f"line {count - 1:04d}".encode() not in received and time.monotonic() < deadline:
            data = tls.recv(65536)
            assert data, f"closed: {received[-300:]!r}"
            received += data
        said = [line.split("] fast: ", 1)[1] for line in received.decode().splitlines()
                if "] fast: " in line]
        assert said == lines
    finally:
        tls.close()


def test_a_daemon_hello_over_tls_is_handed_to_the_link_code(daemon: Daemon,
                                                            clients: list[Any]) -> None:
    """A daemon that dials the hub port over TLS is served like one in plain: its hello
    goes to the link code, which reads its handshake with ``MSG_PEEK`` (``PeekableTls``),
    and it links."""
    raw = socket.create_connection(("127.0.0.1", daemon.port), timeout=SETTLE_S)
    tls = tlsid.tls_handshake(raw, tlsid.client_context(), server_side=False)
    rogue = Rogue(daemon.port, sock=cast(socket.socket, tls))
    clients.append(rogue)
    welcome = rogue.handshake()
    assert welcome["node"] == status(daemon)[0]
    wait_for("the link", lambda: linked(daemon, rogue.identity.node) or None, SETTLE_S,
             diag=daemon.stderr)
    assert "Traceback" not in daemon.stderr()
