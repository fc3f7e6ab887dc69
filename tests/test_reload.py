"""SIGHUP reloads what can change without a restart; `lanchat connect` takes options anywhere."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from conftest import Daemon


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
