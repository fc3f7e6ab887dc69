"""Links over TLS 1.3 between real daemons (issue 14, items 1 and 4): what a user and a
sniffer see.

Real lanchatd subprocesses on loopback (``--no-discovery``, static ``--peer``).  The link's
bytes are read on the wire through a relay (:class:`Sniffer`); impostors are real daemons
whose hello claims another node's id and key (:func:`impostor_prefix`: the daemon's code
with one method replaced, its own key and TLS untouched), old daemons are this
repository's own history (``git archive``), a changed key is a second daemon with a new
identity on the same port.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import pytest
from conftest import SETTLE_S, Daemon, wait_for
from rogue import Rogue, rogue_identity
from test_auth import config_file
from test_identity import old_tree
from test_links import LINK_DEADLINE_S, Proxy, linked, logs, node_of, rpc

from lanchat import linkproto, pinfile
from lanchat.feed import PublicKey, fingerprint

#: The last commit whose daemon speaks link protocol v2 (keys, no TLS).
V2_COMMIT = "8721b2e"


class Sniffer(Proxy):
    """A relay that also keeps every byte it passes, both ways (a passive eavesdropper)."""

    def __init__(self, target_port: int) -> None:
        self.seen = bytearray()
        super().__init__(target_port)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        super()._pump(_Recording(src, self.seen), dst)  # type: ignore[arg-type]


class _Recording:
    """A socket whose reads are also kept in ``seen`` (all else passes through)."""

    def __init__(self, sock: socket.socket, seen: bytearray) -> None:
        self._sock = sock
        self._seen = seen

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        self._seen += data
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def status_key(d: Daemon) -> PublicKey:
    return PublicKey.from_text(rpc(d, "status")["key"])


def peer_row(d: Daemon, node: str) -> dict[str, Any] | None:
    return next((p for p in rpc(d, "peers") if p.get("node") == node), None)


def test_a_link_is_tls_on_the_wire_and_peers_show_fingerprints(make_daemon: Any) -> None:
    b = make_daemon(nick="bob", subdir="b")
    sniffer = Sniffer(b.port)
    try:
        a = make_daemon("--peer", f"127.0.0.1:{sniffer.port}", nick="alice", subdir="a")
        wait_for("linked", lambda: linked(a, node_of(b)), LINK_DEADLINE_S,
                 diag=lambda: logs(a, b))
        secret = "the-launch-code-is-4711"
        assert a.cli("send", secret).returncode == 0
        wait_for("delivered", lambda: secret in b.cli("history").stdout.decode(), SETTLE_S,
                 diag=lambda: logs(a, b))
        wire = bytes(sniffer.seen)
        assert secret.encode() not in wire
        # In clear: the greeting, the hello and starttls; then only TLS records (0x17).
        assert b'"type":"starttls"' in wire.replace(b" ", b"")
        assert wire.count(b"\x17\x03\x03") >= 4
        # `lanchat peers` shows the key each side proved, as `lanchat status` shows its own.
        for me, other in ((a, b), (b, a)):
            row = peer_row(me, node_of(other))
            assert row is not None and row["fingerprint"] == rpc(other, "status")["fingerprint"]
            table = me.cli("peers").stdout.decode()
            assert "FINGERPRINT" in table and rpc(other, "status")["fingerprint"] in table
        # The dialer pinned the acceptor's key under the address it dialed.
        pins = pinfile.load(os.path.join(a.state_dir, pinfile.KNOWN_PEERS))
        assert pins.get(f"peer:127.0.0.1:{sniffer.port}") == status_key(b)
    finally:
        sniffer.close()


def impostor_prefix(workdir: str, victim: Daemon) -> list[str]:
    """A command that runs lanchatd with hellos, welcomes and handshake transcripts claiming
    ``victim``'s node id and public key (both public: any daemon's hello says them), with
    its own key everywhere else -- the signing, and the TLS certificate."""
    path = os.path.join(workdir, "impostor.py")
    with open(path, "w") as f:
        f.write(f"""
import dataclasses, sys
from lanchat import handshake, links
from lanchat.feed import PublicKey
NODE, KEY = {node_of(victim)!r}, PublicKey.from_text({rpc(victim, "status")["key"]!r})
real = links.LinkManager.hello
def hello(self, **kw):
    return dataclasses.replace(real(self, **kw), node=NODE, key=KEY)
links.LinkManager.hello = hello
links.LinkManager.side = lambda self, nonce: handshake.Side(NODE, KEY, nonce)
from lanchat.daemon import main
raise SystemExit(main(sys.argv[sys.argv.index("lanchat.daemon") + 1:]))
""")
    return [sys.executable, path]


@pytest.mark.parametrize("impostor_dials", [True, False], ids=["impostor-dials",
                                                               "impostor-dialed"])
def test_a_daemon_claiming_another_nodes_id_cannot_link(make_daemon: Any, workdir: str,
                                                        impostor_dials: bool) -> None:
    victim = make_daemon(nick="bob", subdir="victim")
    victim_node = node_of(victim)
    if impostor_dials:
        a = make_daemon(nick="alice", subdir="a")
        m = make_daemon("--peer", f"127.0.0.1:{a.port}", nick="mallory", subdir="m",
                        prefix=impostor_prefix(workdir, victim))
        ours = f"it could not prove it holds the key of node {victim_node}"
        theirs = f"refused by the other side: {ours}"
    else:
        m = make_daemon(nick="mallory", subdir="m", prefix=impostor_prefix(workdir, victim))
        a = make_daemon("--peer", f"127.0.0.1:{m.port}", nick="alice", subdir="a")
        ours = (f"the welcome names node {victim_node}, not the node of its TLS certificate "
                f"({rpc(m, 'status')['node']})")
        theirs = (f"it refused us: {rpc(a, 'status')['name']} (node {node_of(a)}) refused "
                  f"this link: {ours}")
    wait_for("both logs say why", lambda: ours in a.stderr() and theirs in m.stderr(),
             SETTLE_S, diag=lambda: logs(a, m))
    assert "WARNING" in next(x for x in a.stderr().splitlines() if ours in x)
    assert "WARNING" in next(x for x in m.stderr().splitlines() if theirs in x)
    assert rpc(a, "status")["links"] == 0
    assert not linked(a, victim_node)


def new_identity_on(port: int, make_daemon: Any, subdir: str) -> Daemon:
    """A daemon with a new key (a fresh state directory) on ``port``: a reinstalled peer."""
    d: Daemon = make_daemon(nick="bob", subdir=subdir)  # started on a port of its own ...
    d.stop()
    d.requested_port = port  # ... then moved to the old daemon's port
    return d.start()


@pytest.mark.parametrize("trust", ["first-use", "always"])
def test_a_changed_key_under_a_pinned_address(make_daemon: Any, workdir: str,
                                              trust: str) -> None:
    """first-use: held, `key changed` in peers, linked after `lanchat trust NODE`;
    always: accepted at once, logged loudly."""
    b = make_daemon(nick="bob", subdir="b")
    port, old_node = b.port, node_of(b)
    a = make_daemon("--config", config_file(workdir, "a", trust=trust),
                    "--peer", f"127.0.0.1:{port}", nick="alice", subdir="a")
    wait_for("linked", lambda: linked(a, old_node), LINK_DEADLINE_S, diag=lambda: logs(a, b))
    b.stop()
    b2 = new_identity_on(port, make_daemon, "b2")
    new_node, new_key = node_of(b2), status_key(b2)
    assert new_node != old_node
    pin = f"peer:127.0.0.1:{port}"
    line = (f"peer {pin} presented another key: node {new_node} (fingerprint "
            f"{fingerprint(new_key)}), pinned was node {old_node}")
    if trust == "always":
        wait_for("linked to the new key", lambda: linked(a, new_node), LINK_DEADLINE_S,
                 diag=lambda: logs(a, b2))
        assert f'{line} (fingerprint' in a.stderr() and 'trust = "always"' in a.stderr()
        return
    ours = f"{line} (fingerprint"
    wait_for("held", lambda: ours in a.stderr(), SETTLE_S, diag=lambda: logs(a, b2))
    assert f"not linked. If the change is expected: lanchat trust {new_node}" in a.stderr()
    wait_for("its side says why", lambda: "refused this link: peer " in b2.stderr(), SETTLE_S,
             diag=lambda: logs(a, b2))
    row = wait_for("key changed in peers",
                   lambda: (r if (r := peer_row(a, new_node)) and r["state"] == "key changed"
                            else None), SETTLE_S, diag=lambda: logs(a, b2))
    assert row["fingerprint"] == fingerprint(new_key)
    assert row["pinned_node"] == old_node
    table = a.cli("peers").stdout.decode()
    assert "key changed" in table and fingerprint(new_key) in table
    assert rpc(a, "status")["links"] == 0
    # Nothing else accepts it: a wrong node id is an error that says so.
    wrong = a.cli("trust", old_node)
    assert wrong.returncode != 0 and b"no changed key of node" in wrong.stderr
    done = a.cli("trust", new_node)
    assert done.returncode == 0, done.stderr.decode()
    assert pin in done.stdout.decode()
    wait_for("linked after trust", lambda: linked(a, new_node), LINK_DEADLINE_S,
             diag=lambda: logs(a, b2))
    pins = pinfile.load(os.path.join(a.state_dir, pinfile.KNOWN_PEERS))
    assert pins.get(pin) == new_key
    assert a.cli("send", "welcome back").returncode == 0
    wait_for("chat again", lambda: "welcome back" in b2.cli("history").stdout.decode(),
             SETTLE_S, diag=lambda: logs(a, b2))


def test_a_held_key_is_held_again_after_a_restart(make_daemon: Any) -> None:
    """The pin is on disk: a restarted daemon does not forget it and link silently."""
    b = make_daemon(nick="bob", subdir="b")
    port, old_node = b.port, node_of(b)
    a = make_daemon("--peer", f"127.0.0.1:{port}", nick="alice", subdir="a")
    wait_for("linked", lambda: linked(a, old_node), LINK_DEADLINE_S, diag=lambda: logs(a, b))
    a.stop()
    b.stop()
    b2 = new_identity_on(port, make_daemon, "b2")
    a.start()
    wait_for("held", lambda: "presented another key" in a.stderr(), SETTLE_S,
             diag=lambda: logs(a, b2))
    assert not linked(a, node_of(b2))


def test_a_plain_v2_hello_is_refused_clearly(make_daemon: Any, clients: list[Any]) -> None:
    """A v2 dialer (keys, no TLS) gets a welcome it can check and the frame it logs."""
    d = make_daemon()
    old = Rogue(d.port, rogue_identity("plain"))
    clients.append(old)
    old.hello(v=2, tls=False)
    welcome = old.frame()
    assert welcome["type"] == "welcome" and welcome["v"] == 2
    assert old.frame()["type"] == linkproto.V2_REFUSAL
    assert old.closed()
    line = "speaks link protocol v2 (an older lanchat), which links without TLS; upgrade"
    wait_for("logged", lambda: line in d.stderr(), SETTLE_S)
    assert "WARNING" in next(x for x in d.stderr().splitlines() if line in x)
    assert rpc(d, "status")["links"] == 0


@pytest.mark.parametrize("old_dials", [True, False], ids=["v2-dials", "v3-dials"])
def test_a_real_v2_daemon_is_refused_with_a_line_in_both_logs(
        make_daemon: Any, workdir: str, old_dials: bool) -> None:
    """The code of V2_COMMIT really runs (PYTHONPATH = its tree)."""
    with old_tree(V2_COMMIT) as tree:
        env = {"PYTHONPATH": tree}
        if old_dials:
            new = make_daemon(nick="new", subdir="new")
            old = make_daemon("--peer", f"127.0.0.1:{new.port}", nick="old", subdir="old",
                              env=env)
        else:
            old = make_daemon(nick="old", subdir="old", env=env)
            new = make_daemon("--peer", f"127.0.0.1:{old.port}", nick="new", subdir="new")
        ours = "speaks link protocol v2 (an older lanchat), which links without TLS"
        theirs = linkproto.V2_REFUSAL
        wait_for("both logs say why", lambda: ours in new.stderr() and theirs in old.stderr(),
                 SETTLE_S, diag=lambda: logs(new, old))
        assert "WARNING" in next(x for x in new.stderr().splitlines() if ours in x)
        assert "WARNING" in next(x for x in old.stderr().splitlines() if theirs in x)
        assert rpc(new, "status")["links"] == 0
