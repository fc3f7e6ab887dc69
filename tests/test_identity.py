"""Node identity on links (issue 13): keys in the hello, twins, clones, old daemons.

Daemons on 127.0.0.1 with ``--no-discovery``.  A "machine" is played by the file
``$LANCHAT_MACHINE_ID_FILE`` names (the daemon reads it instead of /etc/machine-id).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT, SETTLE_S, skip_or_fail, wait_for
from rogue import Rogue, RogueListener, rogue_identity
from test_auth import config_file
from test_links import LINK_DEADLINE_S, history_ids, linked, logs, node_of, rpc, send_many

from lanchat import linkproto

#: The last commit whose daemon speaks link protocol v1 (node ids already key-derived).
V1_COMMIT = "33cc028"


def machine(workdir: str, name: str, digit: str) -> dict[str, str]:
    """The environment of a daemon on machine ``name`` (its machine id: 32 x ``digit``)."""
    path = os.path.join(workdir, f"machine-id-{name}")
    with open(path, "w") as f:
        f.write(digit * 32 + "\n")
    return {"LANCHAT_MACHINE_ID_FILE": path}


# -- the handshake: a key you cannot claim -----------------------------------------------------

def test_a_hello_copied_from_another_node_cannot_complete(make_daemon: Any,
                                                          clients: list[Any]) -> None:
    """A rogue relays B's real hello (B's node id and key) to A: A welcomes it, but the
    rogue cannot sign A's transcript, so no link to "B" comes up, and A says why."""
    a = make_daemon("-v", nick="alice", subdir="a")
    b = make_daemon("-v", nick="bob", subdir="b")
    victim = Rogue(b.port, rogue_identity("victim-side"))
    clients.append(victim)
    # B's welcome to anyone carries B's node id and key: the rogue copies them.
    victim.hello()
    b_welcome = victim.until("welcome")
    impostor = Rogue(a.port, rogue_identity("impostor"), source="127.0.0.2")
    clients.append(impostor)
    impostor.hello(node=b_welcome["node"], key=b_welcome["key"], name=b_welcome["name"])
    welcome = impostor.until("welcome")
    # The best it can do: replay B's signature from B's welcome (another transcript).
    impostor.send({"type": "auth", "proof": b_welcome["proof"]})
    assert impostor.closed(10.0)
    assert not linked(a, b_welcome["node"])
    wait_for("the refusal logged", lambda: (
        f"it could not prove it holds the key of node {b_welcome['node']}" in a.stderr()),
        SETTLE_S, diag=lambda: logs(a))
    assert welcome["node"] == node_of(a)


def test_daemons_with_different_secrets_say_so_once_each(make_daemon: Any,
                                                         workdir: str) -> None:
    """The secret is admission only: wrong secret = one clear line on each side."""
    a = make_daemon("--config", config_file(workdir, "a", secret="one secret"),
                    nick="alice", subdir="a")
    b = make_daemon("--config", config_file(workdir, "b", secret="another secret",
                                            peers=[f"127.0.0.1:{a.port}"]),
                    nick="bob", subdir="b")
    na, nb = node_of(a), node_of(b)
    line = "wrong proof of the shared secret (the two daemons' secrets differ)"
    wait_for("both sides say the secrets differ",
             lambda: line in a.stderr() and line in b.stderr(), SETTLE_S,
             diag=lambda: logs(a, b))
    assert "refused a link from 127.0.0.1 (bob on" in a.stderr()
    assert "(alice on" in b.stderr() and f"node {na}) refused: {line}" in b.stderr()
    assert not linked(a, nb) and not linked(b, na)


# -- two daemons with one identity -------------------------------------------------------------

def test_the_same_state_directory_run_twice_is_reported_loudly(make_daemon: Any,
                                                               workdir: str) -> None:
    """A's state directory copied on the same machine and run beside it (another port):
    both prove one key; each says so at the default log level, ``lanchat peers`` shows
    it, and they never link (a link would fork the feed they share)."""
    env = machine(workdir, "same", "a")
    a = make_daemon(nick="alice", subdir="a", env=env)
    node = node_of(a)
    os.makedirs(os.path.join(workdir, "twin"))
    a.stop()
    shutil.copytree(a.state_dir, os.path.join(workdir, "twin", "state"))
    a.start()
    twin = make_daemon("--peer", f"127.0.0.1:{a.port}", nick="alice2", subdir="twin", env=env)
    assert node_of(twin) == node
    warning = "proved it holds this node's own key"
    wait_for("both warn", lambda: warning in a.stderr() and warning in twin.stderr(),
             LINK_DEADLINE_S, diag=lambda: logs(a, twin))
    for d in (a, twin):
        assert "WARNING: another daemon" in d.stderr() and node in d.stderr()
        assert "two daemons are running with one identity" in d.stderr()
    shown = wait_for("peers shows it on both", lambda: [
        p for d in (a, twin) for p in rpc(d, "peers") if p["state"] == "same-identity"]
        if all(any(p["state"] == "same-identity" for p in rpc(d, "peers")) for d in (a, twin))
        else None, SETTLE_S)
    assert all(p["node"] == node for p in shown)
    out = twin.cli("peers").stdout.decode()
    assert "same-identity" in out and "127.0.0.1" in out
    time.sleep(2.0)  # several redials: still not linked, and the warning not repeated
    assert not linked(a, node) and not linked(twin, node)
    assert a.stderr().count(warning) == 1 and twin.stderr().count(warning) == 1


def test_a_daemon_that_dials_itself_is_not_taken_for_a_twin(make_daemon: Any) -> None:
    """``--peer`` naming its own port: its own hub answers ``same-node`` (the hello's nonce
    is one of its own handshakes), the dialer stops, and no twin is reported."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = make_daemon("-vv", "--port", str(port), "--peer", f"127.0.0.1:{port}")
    wait_for("the dialer stops", lambda: "refused: you dialed yourself" in d.stderr(),
             SETTLE_S, diag=lambda: logs(d))
    time.sleep(1.5)  # a dialer that had not stopped would try again within a second
    assert d.stderr().count("you dialed yourself") == 1, logs(d)
    assert "own key" not in d.stderr()
    assert all(p["state"] != "same-identity" for p in rpc(d, "peers"))
    assert rpc(d, "status")["links"] == 0


def test_a_peer_echoing_our_own_hello_cannot_stop_our_dialer(make_daemon: Any) -> None:
    """A static peer answers with our node id, key and nonce (as if we had dialed ourselves)
    but cannot present our key in TLS: it is refused, and we keep dialing it."""
    listener = RogueListener(rogue_identity("echo"))
    try:
        d = make_daemon("--peer", f"127.0.0.1:{listener.port}")
        for attempt in range(2):
            r = listener.accept(10.0)
            hello = r.frame()
            r.send({"type": "starttls"})
            r.serve_tls()
            r.send({**hello, "type": "welcome", "proof": r.identity.link_key.sign(b"x").hex()[:86]})
            assert r.closed(5.0), attempt
        assert (f"the welcome names node {rpc(d, 'status')['node']}, not the node of its TLS "
                "certificate "
                f"({rogue_identity('echo').node})") in d.stderr(), logs(d)
    finally:
        listener.close()


def test_a_cloned_state_directory_on_another_machine_gets_a_new_identity(
        make_daemon: Any, workdir: str) -> None:
    """A's state directory copied to a second machine: the copy makes itself a new
    identity (said once), keeps and shows the history, links to A, and every message
    from either reaches the other."""
    a = make_daemon(nick="alice", subdir="a", env=machine(workdir, "one", "1"))
    na = node_of(a)
    before = send_many(a, 5, "before the clone")
    a.stop()
    os.makedirs(os.path.join(workdir, "b"))
    shutil.copytree(a.state_dir, os.path.join(workdir, "b", "state"))
    a.start()
    b = make_daemon("--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b",
                    env=machine(workdir, "two", "2"))
    nb = node_of(b)
    assert nb != na
    note = f"and is now on {'2' * 32}: new identity {nb} (history kept; the old identity {na}"
    assert b.stderr().count(note) == 1, logs(b)
    assert "WARNING" in next(x for x in b.stderr().splitlines() if note in x)
    assert before == [i for i in history_ids(b) if i in before]  # the old history, shown
    wait_for("linked", lambda: linked(a, nb) and linked(b, na), LINK_DEADLINE_S,
             diag=lambda: logs(a, b))
    from_a = send_many(a, 3, "from A after the clone")
    from_b = send_many(b, 3, "from B, the clone")
    everything = set(before + from_a + from_b)
    for d in (a, b):
        wait_for("every message on both", lambda d=d: everything <= set(history_ids(d)),
                 SETTLE_S, diag=lambda: logs(a, b))
        ids = history_ids(d)
        assert len(ids) == len(set(ids)), "nothing twice"
    b.stop()
    b.start()  # restarted on its machine: the new identity stays
    assert node_of(b) == nb and b.stderr().count(note) == 1


# -- daemons of the old link protocol (v1) -----------------------------------------------------

@contextlib.contextmanager
def old_tree(commit: str) -> Iterator[str]:
    """lanchat as of ``commit``, unpacked from this repository's history (PYTHONPATH)."""
    path = os.path.join("/tmp", f"lc-{commit}-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "lanchat"],
                                 check=False, capture_output=True, timeout=30)
        if archive.returncode != 0:
            skip_or_fail(f"commit {commit} is not in this checkout: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", path], input=archive.stdout, check=True,
                       timeout=30)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def v1_tree() -> Iterator[str]:
    """lanchat as of V1_COMMIT (link protocol v1)."""
    with old_tree(V1_COMMIT) as path:
        yield path


@pytest.mark.parametrize("secret", [False, True], ids=["open", "secret"])
@pytest.mark.parametrize("old_dials", [True, False], ids=["v1-dials", "v2-dials"])
def test_a_v1_daemon_is_refused_with_a_line_in_both_logs(
        make_daemon: Any, workdir: str, v1_tree: str, old_dials: bool, secret: bool) -> None:
    """The old code really runs (PYTHONPATH = its tree); both at the default log level."""
    conf = {"secret": "s3cret"} if secret else {}
    old_env = {"PYTHONPATH": v1_tree}
    if old_dials:
        new = make_daemon("--config", config_file(workdir, "new", **conf), nick="new",
                          subdir="new")
        old = make_daemon("--config", config_file(workdir, "old", **conf,
                                                  peers=[f"127.0.0.1:{new.port}"]),
                          nick="old", subdir="old", env=old_env)
    else:
        old = make_daemon("--config", config_file(workdir, "old", **conf), nick="old",
                          subdir="old", env=old_env)
        new = make_daemon("--config", config_file(workdir, "new", **conf,
                                                  peers=[f"127.0.0.1:{old.port}"]),
                          nick="new", subdir="new")
    ours = "speaks link protocol v1 (an older lanchat) and cannot prove its identity; " \
           "upgrade lanchat there"
    theirs = linkproto.V1_REFUSAL
    wait_for("both logs say why", lambda: ours in new.stderr() and theirs in old.stderr(),
             SETTLE_S, diag=lambda: logs(new, old))
    assert "WARNING" in next(x for x in new.stderr().splitlines() if ours in x)
    assert "WARNING" in next(x for x in old.stderr().splitlines() if theirs in x)
    # The old daemon dials (or is dialed) again; our side said it once.
    wait_for("a second attempt", lambda: old.stderr().count(theirs) >= 2, SETTLE_S,
             diag=lambda: logs(new, old))
    assert new.stderr().count(ours) == 1, logs(new)
    assert not linked(new, node_of(old))
    assert rpc(new, "status")["links"] == 0


def test_a_v1_hello_gets_a_v1_welcome_and_the_refusal(make_daemon: Any,
                                                      clients: list[Any]) -> None:
    """What a v1 dialer is sent (the old code's behaviour is checked above, when its
    tree is at hand): a v1 welcome, then the frame it logs at warning level, then EOF."""
    d = make_daemon()
    old = Rogue(d.port, rogue_identity("old"))
    clients.append(old)
    old.hello(v=1, key=None, nonce=None)
    welcome = old.frame()
    assert welcome["type"] == "welcome" and welcome["v"] == 1 and "key" not in welcome
    assert old.frame()["type"] == linkproto.V1_REFUSAL
    assert old.closed()
    wait_for("logged", lambda: "speaks link protocol v1" in d.stderr(), SETTLE_S)
    assert rpc(d, "status")["links"] == 0
