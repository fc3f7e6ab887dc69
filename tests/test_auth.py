"""The optional shared secret: who can link, who can chat, what can be injected."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import SETTLE_S, Daemon, LineClient
from rogue import Feed, Rogue, RogueIdentity, rogue_key
from test_links import (
    FAKE_NODE,
    LINK_DEADLINE_S,
    FakePeer,
    history_ids,
    linked,
    node_of,
    rpc,
    send_many,
    wait_for,
)

from lanchat import auth

KEY = auth.load_secret("correct horse battery staple\n")


def secret_peer(port: int, secret: bytes | None = None) -> Rogue:
    """A rogue daemon (knowing ``secret``, if given) that has said hello, nothing else yet."""
    peer = Rogue(port, RogueIdentity(node=FAKE_NODE, key=secret))
    peer.hello()
    return peer


def config_file(workdir: str, name: str, **keys: Any) -> str:
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as f:
        for k, v in keys.items():
            f.write(f"{k} = {json.dumps(v)}\n")
    return path


def secret_file(workdir: str, text: str = "correct horse battery staple") -> str:
    path = os.path.join(workdir, "secret")
    with open(path, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)
    return path


# -- the pure floor ---------------------------------------------------------------------------

def test_proofs_are_bound_to_nonce_parties_and_purpose() -> None:
    p = auth.proof(KEY, "link-hello", "ab" * 16, "n1", "n2")
    assert auth.check_proof(KEY, p, "link-hello", "ab" * 16, "n1", "n2")
    assert not auth.check_proof(KEY, p, "link-welcome", "ab" * 16, "n1", "n2")  # purpose
    assert not auth.check_proof(KEY, p, "link-hello", "cd" * 16, "n1", "n2")    # nonce
    assert not auth.check_proof(KEY, p, "link-hello", "ab" * 16, "n2", "n1")    # parties
    assert not auth.check_proof(b"other", p, "link-hello", "ab" * 16, "n1", "n2")
    assert not auth.check_proof(KEY, None, "link-hello", "ab" * 16, "n1", "n2")
    # a non-ASCII "proof" is wrong, not a crash (compare_digest raises TypeError on it)
    assert not auth.check_proof(KEY, "\u00e9" * 64, "link-hello", "ab" * 16, "n1", "n2")


def test_secret_file_empty_is_refused_not_an_empty_key(tmp_path: Any) -> None:
    """Daemon and client read a secret file the same way: an empty one is an error."""
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "good").write_text("s3cret\n")
    with pytest.raises(ValueError, match="empty"):
        auth.read_secret_file(str(tmp_path / "empty"))
    assert auth.read_secret_file(str(tmp_path / "good")) == b"s3cret"
    with pytest.raises(OSError):
        auth.read_secret_file(str(tmp_path / "missing"))


# -- daemons ----------------------------------------------------------------------------------

def test_daemons_with_the_secret_link_and_relay_signed_messages(make_daemon: Any,
                                                               workdir: str) -> None:
    secret = secret_file(workdir)
    a = make_daemon("--config", config_file(workdir, "a", secret_file=secret), nick="alice",
                    subdir="a")
    b = make_daemon("--config", config_file(workdir, "b", secret_file=secret,
                                        peers=[f"127.0.0.1:{a.port}"]), nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    wait_for("linked", lambda: linked(a, nb) and linked(b, na), LINK_DEADLINE_S)
    assert a.cli("send", "from alice").returncode == 0
    wait_for("relayed", lambda: any(i.startswith(na) for i in history_ids(b)), SETTLE_S)
    got = [json.loads(line) for line in b.cli("history", "--json").stdout.splitlines()]
    assert got and all(m.get("signed", True) for m in got)
    assert all("mac" not in m for m in got)  # the secret tags no message any more


@pytest.mark.parametrize("who_has_it", ["acceptor", "dialer"])
def test_a_daemon_without_the_secret_cannot_link(make_daemon: Any, workdir: str,
                                                 who_has_it: str) -> None:
    secret = secret_file(workdir)
    with_secret = {"secret_file": secret}
    a = make_daemon("--config", config_file(workdir, "a", **(
        with_secret if who_has_it == "acceptor" else {})), "-v", nick="alice", subdir="a")
    b = make_daemon("--config", config_file(workdir, "b", peers=[f"127.0.0.1:{a.port}"], **(
        with_secret if who_has_it == "dialer" else {})), "-v", nick="bob", subdir="b")
    wait_for("the refusal logged", lambda: "shared secret" in a.stderr() + b.stderr(),
             SETTLE_S)
    time.sleep(2.0)  # several dial attempts: none of them links
    assert not linked(a, node_of(b)) and not linked(b, node_of(a))


def test_an_intruder_can_neither_link_nor_inject(make_daemon: Any, workdir: str,
                                                 clients: list[Any]) -> None:
    d = make_daemon("--config", config_file(workdir, "d", secret_file=secret_file(workdir)))
    plain = FakePeer(d.port)  # proves its key, knows no secret: does not even try
    clients.append(plain)
    assert plain.until("error")["code"] == "auth-failed"
    assert plain.closed()
    wait_for("the refusal logged", lambda: "it does not use the shared secret" in d.stderr(),
             SETTLE_S)
    guesser = secret_peer(d.port)  # tries, but cannot answer the welcome
    clients.append(guesser)
    welcome = guesser.until("welcome")
    assert {"proof", "nonce", "key", "admit"} <= set(welcome)
    guesser.auth(welcome, admit="11" * 32)  # its key proved, the secret guessed
    with contextlib.suppress(OSError):  # the daemon may hang up before this arrives
        guesser.msgs([guesser.message(1, "injected")])
    assert guesser.closed()
    time.sleep(0.3)
    assert f"{FAKE_NODE}:1" not in history_ids(d)


def test_a_linked_peer_cannot_forge_messages(make_daemon: Any, workdir: str,
                                             clients: list[Any]) -> None:
    d = make_daemon("--config", config_file(workdir, "d", secret_file=secret_file(workdir)), "-v")
    f = secret_peer(d.port, KEY)
    clients.append(f)
    f.auth(f.until("welcome"))  # checks the welcome's proofs of key and secret
    f.send({"type": "sync", "cursors": {}})
    f.msgs([f.message(1, "honest")])  # signed with its own key: a member may speak for itself
    wait_for("its own message is stored", lambda: f"{FAKE_NODE}:1" in history_ids(d),
             SETTLE_S)
    # Knowing the secret makes no signatures: entry 2 of its feed signed with another key.
    forger = Feed(rogue_key("another"), FAKE_NODE)
    forger.hashes[1] = f.feed().hashes[1]
    f.msgs([forger.entry(2, "forged")], key=None)
    assert f.closed()
    wait_for("the forgery logged", lambda: "bad-signature" in d.stderr() or
             "signature is not" in d.stderr(), SETTLE_S)
    assert f"{FAKE_NODE}:2" not in history_ids(d)


# -- clients ----------------------------------------------------------------------------------

def test_plain_clients_are_refused_unless_allowed(make_daemon: Any, workdir: str,
                                                  clients: list[Any]) -> None:
    secret = secret_file(workdir)
    d = make_daemon("--config", config_file(workdir, "d", secret_file=secret), subdir="d")
    text = LineClient(d.port)
    clients.append(text)
    text.line(), text.line()
    text.send("alice\n")
    assert "requires the shared secret" in text.line()
    assert text.closed()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    try:
        udp.sendto(b"udpuser\n", ("127.0.0.1", d.port))
        assert b"requires the shared secret" in udp.recvfrom(8192)[0]
    finally:
        udp.close()
    j = LineClient(d.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    challenge = json.loads(j.until(lambda s: s.startswith("{")))
    assert challenge["type"] == "challenge"
    j.send(json.dumps({"type": "auth", "proof": "00" * 32}) + "\n")
    err = json.loads(j.line())
    assert err["type"] == "error" and err["code"] == "auth-failed" and err["fatal"]
    relaxed = make_daemon("--config", config_file(workdir, "r", secret_file=secret,
                                              plain_clients=True), subdir="r")
    ok = LineClient(relaxed.port)
    clients.append(ok)
    ok.line(), ok.line()
    ok.send("alice\n")
    assert "Welcome, alice!" in ok.line()


def test_lanchat_connect_proves_the_secret(make_daemon: Any, workdir: str) -> None:
    secret = secret_file(workdir)
    d = make_daemon("--config", config_file(workdir, "d", secret_file=secret))
    cmd = [sys.executable, "-m", "lanchat", "connect", "--nick", "carol",
           f"127.0.0.1:{d.port}"]
    without = subprocess.run(cmd, input=b"", capture_output=True, timeout=20, check=False)
    assert without.returncode == 1 and b"--secret-file" in without.stderr
    with_it = subprocess.run([*cmd[:4], "--secret-file", secret, *cmd[4:]],
                             input=b"hello with the secret\n/quit\n", capture_output=True,
                             timeout=20, check=False)
    assert with_it.returncode == 0, with_it.stderr
    wait_for("stored", lambda: any(
        json.loads(line)["text"] == "hello with the secret"
        for line in d.cli("history", "--json").stdout.splitlines()), SETTLE_S)


def test_a_missing_secret_file_is_a_config_error(workdir: str) -> None:
    d = Daemon(workdir, "--config", config_file(workdir, "d", secret_file="/nonexistent/secret"))
    with pytest.raises(RuntimeError, match="secret_file"):
        d.start(timeout=10)
    assert d.proc is not None and d.proc.returncode == 78


def test_turning_the_secret_on_and_changing_it_keeps_every_message(make_daemon: Any,
                                                                    workdir: str) -> None:
    """Issue 13 case 5: two daemons with history, one of them holding messages the other
    never got; the secret is turned on, then changed.  They link, converge, drop nothing.

    (With the per-message tags of the secret, the old messages were dropped as forged, the
    next tagged one looked like a gap, sync, replay, drop: for ever.)
    """
    a = make_daemon(nick="alice", subdir="a")
    b = make_daemon("--config", config_file(workdir, "b0", peers=[f"127.0.0.1:{a.port}"]),
                    nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    wait_for("linked", lambda: linked(a, nb) and linked(b, na), LINK_DEADLINE_S)
    sent = send_many(a, 3, "before any secret") + send_many(b, 3, "bob before any secret")

    def converged(n: int) -> bool:
        ids_a, ids_b = set(history_ids(a)), set(history_ids(b))
        return ids_a == ids_b and len(ids_a) == n

    wait_for("six on both", lambda: converged(6), SETTLE_S)
    for step, text in enumerate(("turned on", "changed")):
        b.stop()
        sent += send_many(a, 5 + step, f"while bob was away, before the secret was {text}")
        a.stop()
        secret = secret_file(workdir, f"secret number {step}")
        a.requested_port = a.port  # b dials a where it was
        a.extra = ["--config", config_file(workdir, f"a{step}", secret_file=secret)]
        b.extra = ["--config", config_file(workdir, f"b{step + 1}", secret_file=secret,
                                           peers=[f"127.0.0.1:{a.port}"])]
        a.start()
        b.start()
        wait_for(f"linked with the secret {text}", lambda: linked(a, nb) and linked(b, na),
                 LINK_DEADLINE_S)
        sent += send_many(b, 1, f"bob after the secret was {text}")
        total = len(sent)
        wait_for(f"converged after the secret was {text}",
                 lambda total=total: converged(total), LINK_DEADLINE_S)
    assert set(history_ids(b)) == set(sent)
    assert [p["state"] for p in rpc(b, "peers")] == ["linked"]
    assert "forged" not in a.stderr() + b.stderr() and "no valid tag" not in b.stderr()
