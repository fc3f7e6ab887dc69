"""``lanchat`` as a user runs it: ``python -m lanchat ...`` subprocesses against a control
server with a fake backend."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NOBODY_UID, lanchat_as, skip_or_fail
from control_fake import NODE, FakeBackend

from lanchat.cli import parse_since
from lanchat.control import ControlServer
from lanchat.limits import MAX_STDIN_COUNT_BYTES
from lanchat.paths import SYSTEM_SOCKET, socket_candidates, socket_path

ROOT = str(Path(__file__).resolve().parent.parent)
EVIL = "\x1b]0;pwned\x07 \x1b[2J\x9b31m \u202eevil"
ENV = {**os.environ, "PYTHONPATH": ROOT, "NO_COLOR": "1"}
ENV.pop("LANCHAT_SOCKET", None)


class Daemon:
    def __init__(self, path: str) -> None:
        self.path = path
        self.backend = FakeBackend()
        self.server = ControlServer(path, self.backend)
        self.server.start()

    def run(self, *args: str, input: str | None = None, timeout: float = 20,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lanchat", "--socket", self.path, *args],
            input=input, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "lanchat", "--socket", self.path, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=ENV, cwd=ROOT,
        )


@pytest.fixture
def tmp_short() -> Iterator[str]:
    d = tempfile.mkdtemp(dir="/tmp", prefix="lccli-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(tmp_short: str) -> Iterator[Daemon]:
    d = Daemon(os.path.join(tmp_short, "control.sock"))
    try:
        yield d
    finally:
        d.server.close()


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def readline(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """One stdout line from ``proc``, bounded in time."""
    assert proc.stdout is not None
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()),  # type: ignore[union-attr]
                         name="test-readline")
    t.start()
    t.join(timeout)
    assert box, "no output in time"
    return box[0]


# -- connection failures -----------------------------------------------------------------

def test_no_daemon_exit_3(tmp_short: str) -> None:
    path = os.path.join(tmp_short, "nothing.sock")
    r = subprocess.run([sys.executable, "-m", "lanchat", "--socket", path, "status"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=20, check=False)
    assert r.returncode == 3
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and path in lines[0] and "systemctl" in lines[0]
    assert "lanchatd" in lines[0]


def test_no_daemon_names_every_socket_it_looked_for(tmp_short: str) -> None:
    """With $XDG_RUNTIME_DIR set and no daemon, the CLI looked for the user daemon's socket
    first and then the system one: the message names both, not just the last."""
    runtime = os.path.join(tmp_short, "runtime")
    os.mkdir(runtime, 0o700)
    r = subprocess.run([sys.executable, "-m", "lanchat", "status"], capture_output=True,
                       text=True, env={**ENV, "XDG_RUNTIME_DIR": runtime}, cwd=ROOT,
                       timeout=20, check=False)
    user = os.path.join(runtime, "lanchat", "control.sock")
    if os.path.exists(SYSTEM_SOCKET):
        pytest.fail(f"{SYSTEM_SOCKET} exists on this machine: this test needs it absent")
    assert r.returncode == 3, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and f"no socket at {user} nor at {SYSTEM_SOCKET}" in lines[0], lines
    os.mkdir(os.path.dirname(user))  # a stale user socket (its daemon crashed) is the one tried
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(user)
    stale.close()
    r = subprocess.run([sys.executable, "-m", "lanchat", "status"], capture_output=True,
                       text=True, env={**ENV, "XDG_RUNTIME_DIR": runtime}, cwd=ROOT,
                       timeout=20, check=False)
    assert r.returncode == 3 and f"(no socket at {user})" in r.stderr, r.stderr


def test_places_the_cli_looks_for_the_socket() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1"}
    assert socket_candidates(env, None) == ["/run/user/1/lanchat/control.sock", SYSTEM_SOCKET]
    assert socket_candidates({}, None) == [SYSTEM_SOCKET]
    assert socket_candidates({"XDG_RUNTIME_DIR": "relative"}, None) == [SYSTEM_SOCKET]
    assert socket_candidates({**env, "LANCHAT_SOCKET": "/a.sock"}, None) == ["/a.sock"]
    assert socket_candidates({**env, "LANCHAT_SOCKET": "/a.sock"}, "/b.sock") == ["/b.sock"]


def test_stale_socket_exit_3(tmp_short: str) -> None:
    path = os.path.join(tmp_short, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    r = subprocess.run([sys.executable, "-m", "lanchat", "--socket", path, "users"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=20, check=False)
    assert r.returncode == 3 and path in r.stderr


def test_permission_denied_exit_4(tmp_short: str) -> None:
    if os.geteuid() != 0:  # skip_or_fail: under $CI this fails, as the README says
        skip_or_fail("needs root to run the CLI as another uid")
    os.chmod(tmp_short, 0o755)  # searchable by everyone; the 0600 socket is not writable
    d = Daemon(os.path.join(tmp_short, "control.sock"))
    try:
        with lanchat_as(NOBODY_UID) as (lanchat, env):
            r = subprocess.run([*lanchat, "--socket", d.path, "status"], capture_output=True,
                               text=True, env=env, cwd="/", timeout=20, check=False)
    finally:
        d.server.close()
    assert r.returncode == 4, r.stderr
    assert "permission denied" in r.stderr and "group 'lanchat'" in r.stderr
    assert d.path in r.stderr


def test_usage_error_exit_2(daemon: Daemon) -> None:
    assert daemon.run("tail", "-n", "lots").returncode == 2
    assert daemon.run("frobnicate").returncode == 2
    assert daemon.run().returncode == 2


def test_rpc_error_exit_1(daemon: Daemon) -> None:
    r = daemon.run("nick", "taken")
    assert r.returncode == 1 and r.stderr.strip() == "lanchat: nick 'taken' is already in use"
    r = daemon.run("nick", "bad:nick")
    assert r.returncode == 1 and "nick" in r.stderr


# -- commands ------------------------------------------------------------------------------

def test_send_quiet_and_json(daemon: Daemon) -> None:
    r = daemon.run("send", "hello", "world")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = daemon.run("send", "--json", "--room", "dev", "again")
    assert r.returncode == 0
    msg = json.loads(r.stdout)
    assert msg["text"] == "again" and msg["room"] == "dev" and msg["origin"] == NODE
    assert [m.text for m in daemon.backend.messages] == ["hello world", "again"]
    assert daemon.backend.uids == [os.getuid(), os.getuid()]


def test_send_text_may_contain_the_word_connect(daemon: Daemon) -> None:
    """Only the subcommand ``connect`` hands the rest to the hub client's parser; the word
    in a message's text (or a global option's value) is just text."""
    r = daemon.run("send", "please", "connect", "to", "me")
    assert r.returncode == 0, r.stderr
    r = daemon.run("--timeout", "5", "send", "--room", "connect", "connect", "now")
    assert r.returncode == 0, r.stderr
    assert [(m.text, m.room) for m in daemon.backend.messages] == [
        ("please connect to me", "lobby"), ("connect now", "connect")]


def test_send_reads_stdin(daemon: Daemon) -> None:
    assert daemon.run("send", "-", input="from a pipe\n").returncode == 0
    assert daemon.run("send", input="two\nlines\n").returncode == 0  # no TEXT, stdin not a tty
    assert [m.text for m in daemon.backend.messages] == ["from a pipe", "two\nlines"]
    r = daemon.run("send", "-", input="x" * 5000)
    assert r.returncode == 1 and "limit" in r.stderr


def test_a_too_long_message_is_reported_with_its_real_size(daemon: Daemon) -> None:
    """It said ``text is 4098 bytes`` for any long standard input (what it had read)."""
    for given, size in (("x" * 5000, 5000), ("x" * 5000 + "\n", 5000),
                        ("\u00e9" * 3000 + "\r\n", 6000), ("y" * 4097, 4097)):
        r = daemon.run("send", "-", input=given)
        assert r.returncode == 1
        assert r.stderr == f"lanchat: text is {size} bytes; the limit is 4096\n", size
        r = daemon.run("send", given)
        assert r.returncode == 1, size
        argv_size = len(given.encode())  # an argument is sent as given, newline and all
        assert r.stderr == f"lanchat: text is {argv_size} bytes; the limit is 4096\n"
    r = daemon.run("send", "-", input="z" * (MAX_STDIN_COUNT_BYTES + 10))
    assert r.returncode == 1
    assert r.stderr == (f"lanchat: text is over {MAX_STDIN_COUNT_BYTES} bytes; "
                        "the limit is 4096\n")
    assert daemon.backend.messages == []
    assert daemon.run("send", "-", input="").returncode == 1


def test_history_human_is_neutralised_json_is_raw(daemon: Daemon) -> None:
    daemon.backend.add(EVIL, nick="mallory")
    daemon.backend.add("plain", nick="bob", room="dev")
    r = daemon.run("history")
    assert r.returncode == 0
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\x9b" not in r.stdout
    assert "\u202e" not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0].endswith("#lobby mallory: ^[]0;pwned^G ^[[2J\\u009b31m \\u202eevil")
    assert lines[1].endswith("#dev bob: plain")
    r = daemon.run("history", "--json")
    texts = [json.loads(line)["text"] for line in r.stdout.splitlines()]
    assert texts == [EVIL, "plain"]
    # The same values, but no control character reaches the terminal raw: C1 and bidi
    # controls are JSON escapes too, not only C0 (json.dumps escapes those by itself).
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in r.stdout, raw
    assert "\\u009b31m \\u202eevil" in r.stdout
    r = daemon.run("history", "--room", "dev", "--json")
    assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == ["plain"]


def test_history_since(daemon: Daemon) -> None:
    now = time.time()
    daemon.backend.add("old", ts=now - 7200)
    daemon.backend.add("new", ts=now - 60)
    r = daemon.run("history", "--since", "10m", "--json")
    assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == ["new"]
    r = daemon.run("history", "--since", str(now - 3 * 3600), "--json")
    assert len(r.stdout.splitlines()) == 2


def test_tail_no_follow(daemon: Daemon) -> None:
    for i in range(15):
        daemon.backend.add(f"m{i}")
    r = daemon.run("tail", "--no-follow")
    assert r.returncode == 0
    assert [line.rsplit(" ", 1)[-1] for line in r.stdout.splitlines()] == \
        [f"m{i}" for i in range(5, 15)]
    r = daemon.run("tail", "--no-follow", "-n", "2", "--json")
    assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == ["m13", "m14"]


def test_history_tail_and_chat_spell_the_count_alike(daemon: Daemon) -> None:
    """``-n`` and ``--limit`` on history, tail and chat (``history -n 3`` was a usage error
    while ``tail -n 3`` worked); the old spellings still work."""
    for i in range(15):
        daemon.backend.add(f"m{i}")
    for command in (["history"], ["tail", "--no-follow"]):
        for flag in ("-n", "--limit"):
            r = daemon.run(*command, flag, "3", "--json")
            assert r.returncode == 0, (command, flag, r.stderr)
            assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == \
                ["m12", "m13", "m14"], (command, flag)
    r = daemon.run("chat", "--limit", "2", input="/quit\n")
    assert r.returncode == 0, r.stderr
    assert [line.rsplit(" ", 1)[-1] for line in r.stdout.splitlines()] == ["m13", "m14"]


def test_tail_follow_streams_and_ctrl_c_exits_130(daemon: Daemon) -> None:
    daemon.backend.add("before")
    proc = daemon.popen("tail", "-n", "1", "--json")
    try:
        assert json.loads(readline(proc))["text"] == "before"
        wait = time.monotonic() + 10
        while not daemon.backend.subs:
            assert time.monotonic() < wait
            time.sleep(0.01)
        daemon.backend.add(EVIL)
        assert json.loads(readline(proc))["text"] == EVIL  # --json keeps the raw text
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 130
        assert "Traceback" not in err
    finally:
        stop(proc)


def test_tail_follow_human_neutralised_and_daemon_gone_exit_1(daemon: Daemon) -> None:
    proc = daemon.popen("tail", "-n", "0", "--room", "lobby")
    try:
        wait = time.monotonic() + 10
        while not daemon.backend.subs:
            assert time.monotonic() < wait
            time.sleep(0.01)
        daemon.backend.add(EVIL, nick="mallory")
        line = readline(proc)
        assert "\x1b" not in line and "mallory: ^[]0;pwned^G" in line
        assert "#lobby" not in line  # one room: no room column
        daemon.server.close()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 1
        assert err.count("\n") == 1 and "closed the connection" in err
    finally:
        stop(proc)


def test_chat_sends_and_prints_safely(daemon: Daemon) -> None:
    daemon.backend.add(EVIL, nick="mallory")
    proc = daemon.popen("chat", "-n", "1")
    try:
        first = readline(proc)
        assert "\x1b" not in first and "mallory: ^[]0;pwned^G" in first
        assert proc.stdin is not None
        proc.stdin.write("hello there\n")
        proc.stdin.flush()
        assert readline(proc).rstrip("\n").endswith("alice: hello there")
        proc.stdin.write("/nick robert\n/me waves\n")
        proc.stdin.flush()
        assert readline(proc).rstrip("\n").endswith("* robert waves")
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
    finally:
        stop(proc)
    assert [m.text for m in daemon.backend.messages][1:] == ["hello there", "/me waves"]
    assert daemon.backend.subs == []


def test_chat_ends_when_daemon_goes_away(daemon: Daemon) -> None:
    proc = daemon.popen("chat")
    try:
        wait = time.monotonic() + 10
        while not daemon.backend.subs:
            assert time.monotonic() < wait
            time.sleep(0.01)
        daemon.server.close()
        _, err = proc.communicate(timeout=10)  # stdin stays open: the stream's end wakes it
        assert proc.returncode == 1 and "closed the connection" in err
    finally:
        stop(proc)


def test_users_peers_status(daemon: Daemon) -> None:
    r = daemon.run("users")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].split()[:3] == ["NICK", "HOST", "ROOM"]
    assert lines[1].startswith("alice") and "local" in lines[1]
    users = json.loads(daemon.run("users", "--json").stdout)
    assert [u["nick"] for u in users] == ["alice", "bob"]
    r = daemon.run("peers")
    assert "\x1b" not in r.stdout and "bob's box^[]0;pwned^G" in r.stdout
    assert json.loads(daemon.run("--json", "peers").stdout)[0]["name"].endswith("\x07")
    r = daemon.run("status")
    assert any(line.split() == ["port", "7654"] for line in r.stdout.splitlines())
    status = json.loads(daemon.run("status", "--json").stdout)
    assert status["node"] == NODE and "version" in status


def test_nick(daemon: Daemon) -> None:
    r = daemon.run("nick", "robert", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"nick": "robert"}
    assert daemon.backend.nick == "robert"


def test_broken_pipe_is_quiet(daemon: Daemon) -> None:
    for i in range(1000):
        daemon.backend.add(f"line {i} " + "y" * 200)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lanchat", "--socket", daemon.path, "history", "--limit", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        err = proc.stderr.read() if proc.stderr is not None else b""
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_completion_bash() -> None:
    r = subprocess.run([sys.executable, "-m", "lanchat", "completion", "bash"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=20, check=False)
    assert r.returncode == 0 and "complete -F _lanchat lanchat" in r.stdout
    assert "complete -F _lanchatd lanchatd" in r.stdout
    check = subprocess.run(["bash", "-n"], input=r.stdout, text=True, capture_output=True,
                           timeout=20, check=False)
    assert check.returncode == 0, check.stderr


def test_version() -> None:
    r = subprocess.run([sys.executable, "-m", "lanchat", "--version"], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=20, check=False)
    assert r.returncode == 0 and r.stdout.startswith("lanchat ")


def test_cli_import_is_light() -> None:
    code = ("import sys, lanchat.cli; heavy = ('zeroconf', 'sqlite3', 'asyncio', "
            "'lanchat.control', 'lanchat.store', 'lanchat.router', 'lanchat.hub', "
            "'lanchat.stream', 'lanchat.daemon'); print([m for m in heavy if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=20, check=True)
    assert r.stdout.strip() == "[]"


#: What ``lanchat send`` must not load: the daemon's pieces, and what only other commands
#: need (the message model and its dataclasses/inspect, datetime, threading, signal, typing,
#: and the full-screen client of `chat` and `connect` with its library, prompt_toolkit).
#: Each costs start-up time (HACKING.md, "Start-up of lanchat send").
SEND_MUST_NOT_LOAD = (
    "zeroconf", "sqlite3", "asyncio", "pathlib", "dataclasses", "inspect", "typing",
    "datetime", "threading", "signal", "readline", "lanchat.model", "lanchat.stream",
    "lanchat.hubclient", "lanchat.lineedit", "prompt_toolkit", "wcwidth",
    "lanchat.chatscreen", "lanchat.chatsource", "lanchat.chatmodel", "lanchat.chatlog",
    "lanchat.store", "lanchat.router", "lanchat.hub", "lanchat.control", "lanchat.daemon",
)


def test_send_path_loads_only_what_it_needs(daemon: Daemon) -> None:
    # A whole `send` (parse, connect, call, print the reply); -S so that what site and an
    # editable install's finder load does not hide what lanchat itself loads.
    code = ("import json, sys; from lanchat.cli import main; "
            f"status = main(['--socket', {daemon.path!r}, 'send', '--json', 'hi']); "
            f"print(json.dumps([status, [m for m in {SEND_MUST_NOT_LOAD!r} "
            "if m in sys.modules]]))")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=20, check=False)
    assert r.returncode == 0, r.stderr
    sent, (status, loaded) = r.stdout.splitlines()[0], json.loads(r.stdout.splitlines()[-1])
    assert status == 0 and json.loads(sent)["text"] == "hi"
    assert loaded == []


# -- pure helpers --------------------------------------------------------------------------

def test_parse_since() -> None:
    now = 1_700_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1d", now) == now - 86400
    assert parse_since("30s", now) == now - 30
    assert parse_since("1699999000", now) == 1699999000.0
    assert parse_since("2023-11-14T22:13:20+00:00", now) == 1_700_000_000.0
    with pytest.raises(argparse.ArgumentTypeError):
        parse_since("yesterday-ish", now)  # argparse shows the message and exits 2
    with pytest.raises(argparse.ArgumentTypeError):
        parse_since("nan", now)


def test_socket_path_order() -> None:
    def yes(p: str) -> bool:
        return True

    def no(p: str) -> bool:
        return False

    env = {"LANCHAT_SOCKET": "/a.sock", "XDG_RUNTIME_DIR": "/run/user/1"}
    assert socket_path(env, "/explicit.sock", exists=yes) == "/explicit.sock"
    assert socket_path(env, None, exists=yes) == "/a.sock"
    env2 = {"XDG_RUNTIME_DIR": "/run/user/1"}
    assert socket_path(env2, None, exists=yes) == "/run/user/1/lanchat/control.sock"
    assert socket_path(env2, None, exists=no) == SYSTEM_SOCKET
    assert socket_path({"XDG_RUNTIME_DIR": "relative"}, None, exists=yes) == SYSTEM_SOCKET
    assert socket_path({}, None) == SYSTEM_SOCKET
