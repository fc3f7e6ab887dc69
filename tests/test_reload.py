"""SIGHUP reloads what can change without a restart; `lanchat connect` takes options anywhere."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import time
from typing import Any

from conftest import Daemon, skip_or_fail


def _peers(d: Daemon) -> list[dict[str, Any]]:
    out = d.cli("peers", "--json")
    return json.loads(out.stdout) if out.returncode == 0 else []  # type: ignore[no-any-return]


def test_sighup_applies_new_static_peers_and_nick(make_daemon: Any, workdir: str) -> None:
    a = make_daemon(nick="alice", subdir="a")
    conf = os.path.join(workdir, "b.toml")
    with open(conf, "w") as f:
        f.write('nick = "bob"\n')
    b = make_daemon("--config", conf, nick="bob", subdir="b")
    assert _peers(b) == []
    with open(conf, "w") as f:
        f.write(f'nick = "bob"\npeers = ["127.0.0.1:{a.port}"]\nlog_level = "info"\n')
    assert b.proc is not None
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if [p["state"] for p in _peers(b)] == ["linked"]:
            break
        time.sleep(0.1)
    assert [p["state"] for p in _peers(b)] == ["linked"]
    assert "configuration reloaded" in b.stderr()
    # a bad file on reload is refused with one line, and the daemon runs on
    with open(conf, "w") as f:
        f.write("prot = 1\n")
    b.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert b.proc.poll() is None
    assert "reload refused" in b.stderr() and "prot" in b.stderr()
    assert b.cli("status").returncode == 0


def test_connect_takes_its_options_before_or_after_the_host(daemon: Daemon) -> None:
    for args in (["--help"], ["--udp", "--help"]):
        out = daemon.cli("connect", *args)
        assert out.returncode == 0 and b"usage: lanchat connect" in out.stdout


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of another process (Linux tgkill)."""
    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234  # x86_64
    if libc.syscall(sys_tgkill, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


def test_sigterm_delivered_to_any_thread_stops_the_daemon_at_once(daemon: Daemon) -> None:
    """The kernel may hand a process's SIGTERM to any thread; shutdown must not wait for
    the main thread to wake up by itself."""
    if platform.machine() != "x86_64":
        skip_or_fail("the tgkill syscall number used here is x86_64's")
    assert daemon.proc is not None
    pid = daemon.proc.pid
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "the daemon runs several threads"
    started = time.monotonic()
    _tgkill(pid, others[-1], signal.SIGTERM)
    assert daemon.proc.wait(5) == 0
    assert time.monotonic() - started < 3
    assert "Traceback" not in daemon.stderr()
