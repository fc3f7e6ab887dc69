"""Faults and injection against real lanchatd processes on loopback (discovery off).

- a peer (daemon link or hub client) that vanishes in the middle of a frame, with a RST;
- a state directory that fills up (a 4 MiB tmpfs mounted for the test) -- sends fail with a
  clear error, the daemon keeps serving, nothing acknowledged is lost, sends work again once
  there is room; and one that is read-only when the daemon starts (a tmpfs cannot be made
  read-only while SQLite holds files open for writing: the kernel says EBUSY);
- a state directory whose file system turns read-only under the running daemon, as ext4 does
  on an error (an ext4 image mounted in the daemon's own mount namespace): sends fail saying
  so, the daemon keeps serving, and after a repair and a restart every acknowledged message
  is there exactly once;
- SIGKILL of one of three linked daemons under traffic -- after its restart all three converge
  to the same history, each message exactly once, every acknowledged message present;
- injection: escape sequences, CR, newlines, NULs and bidi controls from clients and peers
  never break the text protocol's framing, a terminal, or the daemon's log lines.

The tmpfs and ext4 tests need root (``mount``) and, for ext4, e2fsprogs, losetup and loop
devices; without them they skip, or fail under ``$CI``.  Every mount is undone in teardown,
pass or fail (the ext4 one exists only in the daemon's mount namespace).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SETTLE_S, Daemon, LineClient, TextUser, require_tool, skip_or_fail
from test_links import (
    FAKE_NODE,
    LINK_DEADLINE_S,
    FakePeer,
    assert_exactly_once_in_order,
    history_ids,
    linked,
    logs,
    node_of,
    rpc,
    wait_for,
)

from lanchat.client import ControlClient
from lanchat.errors import LanchatError

RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close() sends a RST
MESSAGE_RE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    sock.close()


def alive(d: Daemon) -> bool:
    return d.proc is not None and d.proc.poll() is None


# -- a peer that vanishes mid-frame -------------------------------------------------------------

def test_link_peer_vanishing_mid_frame_stores_nothing_half_and_relinks(daemon: Daemon) -> None:
    node = node_of(daemon)
    f = FakePeer(daemon.port, cursors={node: 0})
    try:
        f.until("welcome")
        f.msgs([f.message(1)])
        wait_for("1 stored", lambda: f"{FAKE_NODE}:1" in history_ids(daemon), SETTLE_S)
        whole = json.dumps({"type": "msgs", "e": [f.message(2), f.message(3)]}).encode()
        f.sock.sendall(whole[: len(whole) // 2])  # half a frame, then the peer is gone
        time.sleep(0.2)
    finally:
        rst_close(f.tcp)
    wait_for("link dropped", lambda: not linked(daemon, FAKE_NODE), 10.0,
             diag=lambda: logs(daemon))
    assert alive(daemon)
    ids = history_ids(daemon)
    assert f"{FAKE_NODE}:2" not in ids and f"{FAKE_NODE}:3" not in ids
    # the same peer comes back: it is asked for what we lack, and the link works again
    g = FakePeer(daemon.port, cursors={node: 0})
    g.feeds = f.feeds  # the same node, the same feed
    try:
        g.until("welcome")
        assert g.until("sync")["cursors"].get(FAKE_NODE) == 1
        g.msgs([g.message(2), g.message(3)])
        wait_for("2, 3 stored", lambda: {f"{FAKE_NODE}:2", f"{FAKE_NODE}:3"}
                 <= set(history_ids(daemon)), SETTLE_S)
    finally:
        g.close()
    assert collections.Counter(history_ids(daemon))[f"{FAKE_NODE}:2"] == 1
    assert "Traceback" not in daemon.stderr()


def test_hub_clients_vanishing_mid_frame(daemon: Daemon, clients: list[Any]) -> None:
    watcher = TextUser(daemon.port, "watcher")
    clients.append(watcher)
    for i in range(20):
        if i % 2:
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            s.sendall(json.dumps({"type": "hello", "v": 1, "nick": f"j{i}"}).encode() + b"\n"
                      + b'{"type":"say","text":"never fin')
        else:
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            s.sendall(f"t{i}\nhalf a li".encode())
        watcher.until(f"{'j' if i % 2 else 't'}{i} joined")
        rst_close(s)
        line = watcher.until(f"{'j' if i % 2 else 't'}{i} left")
        assert "connection" in line
    watcher.send("/users\n")
    assert watcher.until("* In #lobby") == "* In #lobby (2): owner, watcher (plain)"
    history = [m["text"] for m in rpc(daemon, "history", limit=100)]
    assert not any("never fin" in t or "half a li" in t for t in history)
    assert alive(daemon) and "Traceback" not in daemon.stderr()


# -- a full or read-only state directory ------------------------------------------------------

@pytest.fixture
def tmpfs_state(workdir: str) -> Iterator[str]:
    """``workdir/state`` as a 4 MiB tmpfs (root only), unmounted at the end."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    path = os.path.join(workdir, "state")
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", path],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        for _ in range(50):
            r = subprocess.run(["umount", path], capture_output=True, check=False)
            if r.returncode == 0:
                break
            time.sleep(0.1)  # a daemon still exiting holds its files
        else:
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def fill(path: str) -> str:
    """Fill the filesystem holding ``path`` to the last byte; return the filler's name."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 64, 1):  # big steps, then the last crumbs
            for _ in range(20_000):  # bounded whatever the tmpfs size
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def chatters(daemon: Daemon, clients: list[Any]) -> tuple[TextUser, TextUser, LineClient]:
    """Two text users (alice, bob) and a JSON client (jay), all welcomed."""
    alice = TextUser(daemon.port, "alice")
    bob = TextUser(daemon.port, "bob")
    j = LineClient(daemon.port)
    clients += [alice, bob, j]
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    j.until('"welcome"')
    return alice, bob, j


def send_acked(daemon: Daemon, texts: list[str]) -> list[str]:
    """Send ``texts`` through the control socket; the ids it acknowledged."""
    with ControlClient(daemon.socket, timeout=10) as c:
        return [c.call("send", text=text)["id"] for text in texts]


#: Room given back after filling the disk: a few 3 KB sends fit (measured: four; each commit
#: appends several 4 KiB pages to the WAL), then the disk is full again in the middle of the
#: CLI's sends.
ROOM_LEFT = 160 * 1024


def test_disk_full_sends_fail_clearly_and_nothing_acked_is_lost(
        tmpfs_state: str, make_daemon: Any, clients: list[Any]) -> None:
    daemon: Daemon = make_daemon()
    alice, bob, j = chatters(daemon, clients)
    acked = send_acked(daemon, [f"before {i} " + "x" * 200 for i in range(50)])
    filler = fill(tmpfs_state)
    os.truncate(filler, os.path.getsize(filler) - ROOM_LEFT)
    # lanchat send as a user runs it while the disk runs out: the first sends are stored on
    # the last free pages and acknowledged (exit 0, the stored message), the rest are refused
    # (exit 1 with one clear line).  The acknowledged ones are the riskiest: stored on the
    # last bytes, next to writes that failed.
    acked_by_cli: dict[str, str] = {}  # id: text
    refused: list[str] = []
    for i in range(20):
        text = f"while full {i} " + "y" * 3000
        r = daemon.cli("--json", "send", text)
        err = r.stderr.decode()
        if r.returncode == 0:
            stored = json.loads(r.stdout)
            assert stored["text"] == text and err == "", (stored, err)
            acked_by_cli[stored["id"]] = text
            continue
        refused.append(text)
        assert r.returncode == 1 and r.stdout == b"", err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("lanchat: cannot write history at "), err
        assert "history.db" in err and "full" in err.lower(), err
    print(f"\nwhile the disk ran out: {len(acked_by_cli)} CLI sends acknowledged, "
          f"{len(refused)} refused")
    assert acked_by_cli, "no send was stored on the room left: the test missed its point"
    assert len(refused) >= 10, "sends kept succeeding on a full disk"
    acked += list(acked_by_cli)
    # a text client is told its message was not sent; a JSON client gets an error, not `sent`
    alice.send("a line that cannot be stored " + "z" * 3000 + "\n")
    line = alice.until(lambda s: s.startswith("! "), timeout=10)
    assert line.startswith("! your message was not sent:"), line
    j.send(json.dumps({"type": "say", "text": "json while full " + "w" * 3000, "ref": 1}) + "\n")
    reply = json.loads(j.until(lambda s: '"error"' in s or '"sent"' in s, timeout=10))
    assert reply["type"] == "error" and reply["fatal"] is False, reply
    # the daemon keeps serving: status, users, history, every client still connected;
    # every acknowledged message is there once, in order, and no refused one is
    with ControlClient(daemon.socket, timeout=10) as c:
        assert c.call("status")["node"]
        assert {u["nick"] for u in c.call("users")} >= {"alice", "bob", "jay"}
        history = c.call("history", limit=1000)
    assert_exactly_once_in_order([m["id"] for m in history], set(acked))
    assert [m["id"] for m in history] == acked
    bob.send("/users\n")
    assert bob.until("* In #lobby").startswith("* In #lobby (4)")
    # room again: sends work, and everything acknowledged before is intact
    os.unlink(filler)
    wait_for("a send after the disk was freed",
             lambda: daemon.cli("send", "after the disk was freed").returncode == 0, 10.0)
    alice.send("alice after\n")
    bob.until("alice: alice after", timeout=10)
    assert alive(daemon) and "Traceback" not in daemon.stderr(), daemon.stderr()[-3000:]
    daemon.stop()
    # and after a restart, from the database file: each acknowledged message once, with its
    # text; each refused one absent
    daemon.start()
    with ControlClient(daemon.socket, timeout=10) as c:
        history = c.call("history", limit=1000)
    ids = [m["id"] for m in history]
    texts = {m["id"]: m["text"] for m in history}
    assert ids[:len(acked)] == acked, "an acknowledged message is missing, doubled or moved"
    for i, mid in enumerate(acked[:50]):
        assert texts[mid] == f"before {i} " + "x" * 200, mid
    for mid, text in acked_by_cli.items():
        assert texts[mid] == text, mid
    assert not set(refused) & set(texts.values()), "a refused send was stored after all"
    assert [texts[i] for i in ids[len(acked):]] == ["after the disk was freed", "alice after"]


def test_read_only_state_dir_at_start_is_a_clear_error_and_history_survives(
        tmpfs_state: str, make_daemon: Any) -> None:
    daemon: Daemon = make_daemon()
    with ControlClient(daemon.socket, timeout=10) as c:
        acked = [c.call("send", text=f"kept {i}")["id"] for i in range(10)]
    assert daemon.stop() == 0
    subprocess.run(["mount", "-o", "remount,ro", tmpfs_state], check=True, capture_output=True)
    try:
        offset = len(daemon.stderr())
        with pytest.raises(RuntimeError):
            daemon.start(timeout=10)
        err = daemon.stderr()[offset:]
        assert daemon.proc is None or daemon.proc.poll() not in (None, 0)
        assert "Traceback" not in err, err
        # one line that names the file and gives the kernel's reason (not just any line
        # with the path in it: the path itself contains "state")
        db = os.path.join(tmpfs_state, "history.db")
        assert err.splitlines()[-1] == (f"lanchatd: cannot open history at {db}: "
                                        f"{os.strerror(errno.EROFS)}"), err
    finally:
        if daemon.proc is not None:
            daemon.stop()
        subprocess.run(["mount", "-o", "remount,rw", tmpfs_state], check=True,
                       capture_output=True)
    daemon.start()
    assert [m for m in history_ids(daemon) if m in set(acked)] == acked


class Ext4State:
    """An ext4 image mounted on the state directory inside the daemon's own mount namespace.

    ``prefix`` runs the daemon under ``unshare --mount --propagation private``, which mounts
    the image (loop, ``errors=remount-ro``) and then execs the daemon: the host never sees the
    mount, and it goes away with the daemon's namespace when the daemon exits, pass or fail
    (the loop device detaches itself then: ``mount -o loop`` sets autoclear).
    """

    def __init__(self, workdir: str) -> None:
        self.image = os.path.join(workdir, "state.img")
        self.state = os.path.join(workdir, "state")
        self.prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount -o loop,errors=remount-ro -- "$1" "$2" && shift 2 && exec "$@"',
                       "sh", self.image, self.state]

    def loop_devices(self) -> list[str]:
        r = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "--associated",
                            self.image], capture_output=True, text=True, timeout=10, check=True)
        return r.stdout.split()

    def turn_read_only(self) -> None:
        """What ext4 does when it finds an error, with ``errors=remount-ro``: it aborts its
        journal and from then on every write fails with EROFS, through descriptors opened
        before too (dmesg: "Remounting filesystem read-only").  It stays so until unmounted."""
        (dev,) = self.loop_devices()
        trigger = f"/sys/fs/ext4/{os.path.basename(dev)}/trigger_fs_error"
        if not os.path.exists(trigger):
            skip_or_fail("this kernel's ext4 has no trigger_fs_error")
        with open(trigger, "w") as f:
            f.write("lanchat test: the state directory's file system fails\n")

    def repair(self) -> None:
        """What an administrator does next: once the file system is unmounted (the daemon
        and its namespace are gone), e2fsck."""
        wait_for("state file system unmounted", lambda: not self.loop_devices(), 10.0)
        r = subprocess.run(["e2fsck", "-f", "-y", self.image], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: errors found and corrected


@pytest.fixture
def ext4_state(workdir: str) -> Iterator[Ext4State]:
    """``workdir/state`` as a 32 MiB ext4 image for daemons run under ``.prefix`` (root only)."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a loop device needs root")
    for tool, package in (("unshare", "util-linux"), ("mkfs.ext4", "e2fsprogs"),
                          ("e2fsck", "e2fsprogs"), ("losetup", "mount")):
        require_tool(tool, package)
    if not os.path.exists("/dev/loop-control"):
        skip_or_fail("no loop devices (/dev/loop-control)")
    fs = Ext4State(workdir)
    os.makedirs(fs.state)
    with open(fs.image, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", fs.image], check=True, capture_output=True,
                   timeout=60)
    try:
        yield fs
    finally:
        # The daemons are stopped by now (make_daemon is torn down first); should a loop
        # device still hold the image, have it detach once its last user is gone.
        with contextlib.suppress(AssertionError):
            wait_for("loop device released", lambda: not fs.loop_devices(), 10.0)
        for dev in fs.loop_devices():
            subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=10,
                           check=False)


def test_state_file_system_turning_read_only_under_the_daemon(
        ext4_state: Ext4State, make_daemon: Any, clients: list[Any]) -> None:
    """The state directory's file system turns read-only while the daemon runs, as ext4 does
    on an error: writes through the daemon's open files fail with EROFS.  (A chmod would not
    do: the daemon's open descriptors keep writing; a read-only bind remount is refused with
    EBUSY while files are open for writing on it.)"""
    daemon: Daemon = make_daemon(prefix=ext4_state.prefix)
    node = node_of(daemon)
    alice, bob, j = chatters(daemon, clients)
    acked = send_acked(daemon, [f"before {i}" for i in range(40)])
    for i in range(10):
        j.send(json.dumps({"type": "say", "text": f"json before {i}", "ref": i}) + "\n")
        acked.append(json.loads(j.until('"sent"'))["message"]["id"])
    # Acknowledged means fsynced (lanchat.store: synchronous=FULL): no write-back is
    # forced here, the file system goes read-only right after the last acknowledgement.
    assert daemon.proc is not None
    ext4_state.turn_read_only()

    # lanchat send: exit 1 with one line that names the file and says why
    for i in range(5):
        r = daemon.cli("send", f"while read-only {i}")
        err = r.stderr.decode()
        assert r.returncode == 1 and r.stdout == b"", err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "history.db" in err and "read-only file system" in err.lower(), err
    # under it, the documented JSON-RPC error: code 1, data {"code": "store"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(daemon.socket)
        s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "send",
                              "params": {"text": "rpc while read-only"}}).encode() + b"\n")
        with s.makefile("rb") as f:
            error = json.loads(f.readline())["error"]
    assert error["code"] == 1 and error["data"]["code"] == "store", error
    # a text client is told its line was not sent; a JSON client gets an error, not `sent`
    alice.send("alice while read-only\n")
    line = alice.until(lambda s: s.startswith("! "), timeout=10)
    assert line.startswith("! your message was not sent:") and "read-only" in line.lower(), line
    j.send(json.dumps({"type": "say", "text": "json while read-only", "ref": 99}) + "\n")
    reply = json.loads(j.until(lambda s: '"error"' in s or '"sent"' in s, timeout=10))
    assert reply["type"] == "error" and reply["fatal"] is False, reply
    assert reply["code"] == "store" and "read-only" in reply["message"].lower(), reply

    # the daemon keeps serving: status, users, history (read from the read-only file system),
    # every client still connected, newcomers welcome; nobody saw an unsent message
    assert daemon.cli("status").returncode == 0
    r = daemon.cli("users")
    assert r.returncode == 0 and all(n in r.stdout.decode() for n in ("alice", "bob", "jay"))
    carol = TextUser(daemon.port, "carol")
    clients.append(carol)
    bob.send("/users\n")
    seen = [bob.line(10)]  # everything bob got since he joined, up to the answer to /users
    while not seen[-1].startswith("* In #lobby") and len(seen) < 1000:
        seen.append(bob.line(10))
    assert seen[-1] == ("* In #lobby (5): owner, alice (plain), bob (plain), carol (plain), "
                        "jay (plain)"), seen
    assert any("carol joined" in s for s in seen), seen
    assert not any("while read-only" in s for s in seen), seen
    ids = history_ids(daemon)
    assert_exactly_once_in_order(ids, set(acked))
    assert ids == acked
    assert alive(daemon) and "Traceback" not in daemon.stderr(), daemon.stderr()[-3000:]

    # it stops cleanly (its last checkpoint cannot be written: nothing is lost by that)
    assert daemon.stop() == 0, daemon.stderr()[-3000:]
    assert "Traceback" not in daemon.stderr()
    # the administrator repairs the file system; the daemon comes back as the same node with
    # every acknowledged message exactly once, and the failed sends consumed no seq
    ext4_state.repair()
    daemon.start()
    assert node_of(daemon) == node
    ids = history_ids(daemon)
    assert_exactly_once_in_order(ids, set(acked))
    assert ids == acked
    with ControlClient(daemon.socket, timeout=10) as c:
        after = c.call("send", text="after the repair")
    assert after["origin"] == node and after["seq"] == len(acked) + 1, after
    assert daemon.stop() == 0
    # and the file is sound
    check = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
             "print(c.execute('PRAGMA integrity_check').fetchone()[0], "
             "c.execute('SELECT count(*) FROM messages').fetchone()[0])")
    wait_for("state file system unmounted", lambda: not ext4_state.loop_devices(), 10.0)
    r = subprocess.run([*ext4_state.prefix, sys.executable, "-c", check,
                        os.path.join(ext4_state.state, "history.db")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.split() == ["ok", str(len(acked) + 1)], r
    print(f"\n{len(acked)} acknowledged before the file system turned read-only; "
          f"{len(acked)} held after it, after a restart, and in the checked file")


# -- SIGKILL under mesh traffic ---------------------------------------------------------------

def test_sigkill_under_mesh_traffic_converges_exactly_once(make_daemon: Any) -> None:
    a = make_daemon("-vv", nick="alice", subdir="a")
    b = make_daemon("-vv", "--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")
    c = make_daemon("-vv", "--peer", f"127.0.0.1:{a.port}", "--peer", f"127.0.0.1:{b.port}",
                    nick="carol", subdir="c")
    daemons = {"a": a, "b": b, "c": c}
    nodes = {k: node_of(d) for k, d in daemons.items()}
    wait_for("all linked", lambda: all(linked(d, nodes[o]) for k, d in daemons.items()
                                       for o in daemons if o != k), LINK_DEADLINE_S,
             diag=lambda: logs(a, b, c))
    per_sender = 250
    acked: dict[str, list[str]] = {k: [] for k in daemons}
    stop = threading.Event()

    def sender(key: str) -> None:
        d = daemons[key]
        sent = 0
        deadline = time.monotonic() + 60
        while sent < per_sender and time.monotonic() < deadline and not stop.is_set():
            try:
                with ControlClient(d.socket, timeout=10) as cl:
                    while sent < per_sender and not stop.is_set():
                        acked[key].append(cl.call("send", text=f"{key} {sent}")["id"])
                        sent += 1
            except (OSError, LanchatError):
                time.sleep(0.1)  # the daemon is down: try again until it is back

    threads = [threading.Thread(target=sender, args=(k,), name=f"send-{k}") for k in daemons]
    for t in threads:
        t.start()
    try:
        wait_for("b under traffic", lambda: len(acked["b"]) >= 60 and len(acked["a"]) >= 60,
                 30.0)
        b.stop(signal.SIGKILL)
        time.sleep(1.0)  # a and c keep sending while b is dead
        b.start()
    except BaseException:
        stop.set()  # failing: the senders stop now, not at their deadline
        raise
    finally:
        for t in threads:
            t.join(90)
    assert all(len(v) == per_sender for v in acked.values()), {k: len(v) for k, v in
                                                                acked.items()}
    expected = {i for v in acked.values() for i in v}

    def converged() -> bool:
        got = [set(history_ids(d)) for d in daemons.values()]
        return all(g >= expected for g in got) and got[0] == got[1] == got[2]

    t0 = time.monotonic()
    wait_for("three histories converge", converged, 60.0, poll=0.5,
             diag=lambda: logs(a, b, c) + "\n" + str({k: len(set(history_ids(d)) & expected)
                                                      for k, d in daemons.items()}))
    print(f"\nconverged {time.monotonic() - t0:.1f} s after the restart; "
          f"{len(expected)} messages")
    for d in daemons.values():
        ids = history_ids(d)
        assert_exactly_once_in_order(ids, set(ids))
        assert set(ids) >= expected
        assert not any("Traceback" in line for line in d.stderr().splitlines()), logs(d)


# -- injection --------------------------------------------------------------------------------

HOSTILE_TEXTS = [
    "title \x1b]0;pwned\x07 clear \x1b[2J\x1b[H done",
    "carriage\rreturn overwrites the line",
    "one\n[12:00:00] bob: a fake message\n* bob left #lobby (fake)",
    "bidi \u202etxt.exe\u202c and \u2066isolate\u2069",
    "C1 \x9b31m csi and \x85 nel and \u2028 line sep",
    "bell\x07 backspace\x08\x08 del\x7f tab\tend",
]
_RAW_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def test_injection_through_json_and_text_mode_cannot_break_framing(
        make_daemon: Any, clients: list[Any]) -> None:
    daemon: Daemon = make_daemon("-vv")
    reader = LineClient(daemon.port)
    clients.append(reader)
    reader.line(), reader.line()
    reader.send("reader\n")
    reader.line()
    raw_lines: list[bytes] = []
    j = LineClient(daemon.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    j.until('"welcome"')
    reader.until("jay joined")
    for i, text in enumerate(HOSTILE_TEXTS):
        j.send(json.dumps({"type": "say", "text": text, "ref": i}) + "\n")
        assert json.loads(j.until('"sent"'))["message"]["text"] == text  # stored as sent
    # NULs are refused, in JSON mode and in text mode
    j.send(json.dumps({"type": "say", "text": "nul \x00 here"}) + "\n")
    assert json.loads(j.until('"error"'))["code"] == "bad-text"
    t = TextUser(daemon.port, "tex")
    clients.append(t)
    t.send(b"text \x1b[31mred\x1b[0m and a bell \x07 and \x00 nul\n")
    assert t.line().startswith("! text may not contain NUL")
    t.send(b"text \x1b[31mred\x1b[0m and cr\r in the middle\r\n")
    # hostile nicks are refused at the door
    for nick in ("\x1b[2Jx", "a\u202eb", "bad\rnick", "[12:00:00]"):
        n = LineClient(daemon.port)
        clients.append(n)
        n.send(json.dumps({"type": "hello", "v": 1, "nick": nick}) + "\n")
        assert json.loads(n.until(lambda s: s.startswith("{")))["type"] == "error"
    # the text-mode reader: what it saw, byte for byte
    deadline = time.monotonic() + 10
    buf = b""
    reader.sock.settimeout(0.5)
    while time.monotonic() < deadline and buf.count(b"tex: ") < 1:
        with contextlib.suppress(TimeoutError):
            buf += reader.sock.recv(65536)
    raw_lines = buf.split(b"\n")
    for raw in raw_lines:
        line = raw.decode("utf-8")
        assert not _RAW_CONTROL.search(line), f"raw control character reached a client: {line!r}"
    lines = [raw.decode() for raw in raw_lines if raw]
    # each hostile text is one message line plus indented continuation lines, never a line
    # that poses as another message or a notice
    messages = [x for x in lines if MESSAGE_RE.match(x)]
    assert len(messages) == len(HOSTILE_TEXTS) + 1, lines
    for x in lines:
        assert MESSAGE_RE.match(x) or x.startswith("  ") or x.startswith("* "), x
        if x.startswith("* "):
            assert "(fake)" not in x, x
    assert any("^[]0;pwned^G" in x for x in lines), lines
    # the daemon's log: no raw escape, CR or NUL from any client reached it
    err = daemon.stderr()
    for bad in ("\x1b", "\r", "\x00", "\x07", "\u202e"):
        assert bad not in err, f"{bad!r} reached the log: " + repr(
            [x for x in err.splitlines() if bad in x][:3])


def test_link_peer_name_cannot_inject_into_logs_or_peers(make_daemon: Any) -> None:
    """A daemon's hello carries its name and host; they reach ``lanchat peers`` and the log
    ("linked to NAME ..."). An escape sequence or a newline there must not reach either raw:
    a forged log line is how an intruder hides."""
    daemon: Daemon = make_daemon("-vv")  # info and debug lines too
    evil_name = "evil\x1b[2J\r\n2030-01-01 00:00:00 lanchatd[1] INFO: forged line"
    f = FakePeer(daemon.port, name=evil_name, host="evilhost")
    try:
        first = f.frame()
        if first.get("type") == "error":
            # refusing a name with control characters is also fine (the log is checked below)
            assert first["fatal"] is True
            print(f"\npeer name with control characters refused: {first}")
        else:
            assert first["type"] == "welcome"
            wait_for("linked", lambda: linked(daemon, FAKE_NODE), SETTLE_S)
            res = daemon.cli("peers")
            assert res.returncode == 0
            print(f"\npeer name with control characters linked; lanchat peers shows "
                  f"{res.stdout!r}")
            assert b"\x1b" not in res.stdout and b"\r" not in res.stdout
    finally:
        f.close()
    time.sleep(0.5)
    err = daemon.stderr()
    assert "\x1b" not in err and "\r" not in err, repr(
        [x for x in err.splitlines() if "evil" in x][:3])
    assert not any(x.startswith("2030-01-01") for x in err.splitlines()), "a forged log line"
