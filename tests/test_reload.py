"""SIGHUP reloads what can change without a restart; `lanchat connect` takes options anywhere."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import signal
import time
from typing import Any

from conftest import Daemon, TextUser, skip_or_fail, wait_for
from test_limits import JsonClient
from test_links import cli_history, cli_json, send_many

from lanchat.daemon import PRUNE_BATCH_ROWS
from lanchat.model import Draft
from lanchat.store import Store


def _peers(d: Daemon) -> list[dict[str, Any]]:
    out = d.cli("peers", "--json")
    return json.loads(out.stdout) if out.returncode == 0 else []  # type: ignore[no-any-return]


def _hup(d: Daemon, conf: str, text: str) -> None:
    """Write ``text`` as the daemon's configuration file and send it SIGHUP."""
    with open(conf, "w") as f:
        f.write(text)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)


def _reloads(d: Daemon) -> int:
    """How many reloads the daemon has applied (its info line; the file must log at info)."""
    return d.stderr().count("configuration reloaded")


def _daemon_nicks(d: Daemon, node: str) -> list[str]:
    """The nicks ``d``'s users list shows for the daemon ``node`` itself (not its clients)."""
    return [u["nick"] for u in cli_json(d, "users") if u["node"] == node and u["via"] == "daemon"]


def _texts(d: Daemon) -> list[str]:
    return [m["text"] for m in cli_history(d, "--limit", "1000")]


def test_sighup_applies_new_static_peers_and_nick(make_daemon: Any, workdir: str,
                                                  clients: list[Any]) -> None:
    """The new nick shows in status, on the wire and in a linked peer's users."""
    a = make_daemon(nick="alice", subdir="a")
    conf = os.path.join(workdir, "b.toml")
    with open(conf, "w") as f:
        f.write('nick = "bob"\n')
    b = make_daemon("--config", conf, nick=None, subdir="b")  # no --nick: the file decides
    assert _peers(b) == []
    status = cli_json(b, "status")
    assert status["nick"] == "bob"
    b_node = status["node"]
    watcher = TextUser(b.port, "watcher")
    clients.append(watcher)
    assert b.cli("send", "before").returncode == 0
    assert watcher.until(": before").endswith("] bob: before")

    _hup(b, conf, f'nick = "robert"\npeers = ["127.0.0.1:{a.port}"]\nlog_level = "info"\n')
    wait_for("b linked to a", lambda: [p["state"] for p in _peers(b)] == ["linked"], 10.0)
    assert cli_json(b, "status")["nick"] == "robert"
    assert b.cli("send", "after").returncode == 0
    assert watcher.until(": after").endswith("] robert: after")
    wait_for("a sees b's new nick", lambda: _daemon_nicks(a, b_node) == ["robert"], 10.0,
             diag=lambda: str(cli_json(a, "users")))
    assert "configuration reloaded" in b.stderr()
    # The default display name "NICK on HOST" follows the nick, but is advertised over
    # mDNS and to links: that takes a restart, and until then status shows the running one.
    restarts = [x for x in b.stderr().splitlines() if "restart lanchatd" in x]
    assert len(restarts) == 1 and restarts[0].endswith(
        "WARNING: config: name changed; restart lanchatd to apply it"), restarts
    assert cli_json(b, "status")["name"] == status["name"]
    # a bad file on reload is refused with one line, and the daemon runs on
    _hup(b, conf, "prot = 1\n")
    wait_for("the reload refused", lambda: "reload refused" in b.stderr(), 10.0)
    assert b.proc is not None and b.proc.poll() is None
    assert "prot" in b.stderr()
    assert cli_json(b, "status")["nick"] == "robert"  # the running configuration is kept


def test_sighup_applies_a_new_log_level(make_daemon: Any, workdir: str) -> None:
    """Each control connection is logged at debug: not before the reload, and after it."""
    conf = os.path.join(workdir, "lanchatd.toml")
    with open(conf, "w") as f:
        f.write('log_level = "warning"\n')
    d = make_daemon("--config", conf)
    assert d.cli("status").returncode == 0
    assert " DEBUG: " not in d.stderr()
    _hup(d, conf, 'log_level = "debug"\n')
    wait_for("a debug line for a control connection",
             lambda: d.cli("status").returncode == 0 and re.search(
                 r" DEBUG: control-\d+: pid \d+ uid", d.stderr()), 10.0, diag=d.stderr)
    assert "configuration reloaded" in d.stderr()  # info: shown at debug


def test_sighup_applies_a_new_max_rate_to_connected_clients(make_daemon: Any, workdir: str,
                                                            clients: list[Any]) -> None:
    """From unlimited to 2 a second: a client connected before the reload is held to it."""
    conf = os.path.join(workdir, "lanchatd.toml")
    with open(conf, "w") as f:
        f.write('max_rate = 0\nlog_level = "info"\n')
    d = make_daemon("--config", conf, max_rate=None)  # no --max-rate: the file decides
    j = JsonClient(d.port, "jay")
    clients.append(j)

    def flood(first: int) -> tuple[list[int], list[int]]:
        refs = range(first, first + 20)
        j.send("".join(json.dumps({"type": "say", "text": f"m{i}", "ref": i}) + "\n"
                       for i in refs))
        sent: list[int] = []
        limited: list[int] = []
        for _ in refs:
            f = j.frame(5.0)
            if f["type"] == "sent":
                sent.append(f["ref"])
            else:
                assert f["type"] == "error" and f["code"] == "rate-limited", f
                assert f["message"] == ("rate limit: at most 2 messages per second; "
                                        "message dropped")
                limited.append(f["ref"])
        return sent, limited

    assert flood(0) == (list(range(20)), [])  # unlimited
    before = _reloads(d)
    _hup(d, conf, 'max_rate = 2\nlog_level = "info"\n')
    wait_for("the reload", lambda: _reloads(d) > before, 10.0, diag=d.stderr)
    sent, limited = flood(100)
    assert 10 <= len(sent) <= 11, (sent, limited)  # the burst: max(10, 2 s x 2/s)
    assert sent == list(range(100, 100 + len(sent)))
    assert sorted(sent + limited) == list(range(100, 120))


def test_sighup_with_a_lower_max_messages_prunes_at_once(make_daemon: Any,
                                                         workdir: str) -> None:
    conf = os.path.join(workdir, "lanchatd.toml")
    with open(conf, "w") as f:
        f.write('log_level = "info"\n')
    d = make_daemon("--config", conf)
    send_many(d, 20, "m")
    assert len(_texts(d)) == 20
    _hup(d, conf, 'max_messages = 5\nlog_level = "info"\n')
    started = time.monotonic()
    # The periodic pass is an hour away; only a pass right after the reload is in time.
    wait_for("history cut to 5", lambda: _texts(d) == [f"m {i}" for i in range(15, 20)],
             20.0, diag=lambda: f"{_texts(d)}\n{d.stderr()}")
    print(f"pruned {time.monotonic() - started:.2f} s after SIGHUP")
    assert "retention: removed 15 old message(s)" in d.stderr()


def _old_history(state_dir: str, days_ago: float, n: int) -> None:
    """``n`` messages of this node written ``days_ago`` days ago, before lanchatd starts."""
    os.makedirs(state_dir, exist_ok=True)
    with Store(os.path.join(state_dir, "history.db")) as store:
        store.append_local([Draft(text=f"old {i}", nick="owner", host="here")
                            for i in range(n)], ts=time.time() - days_ago * 86400)


def test_sighup_with_a_lower_max_age_days_prunes_at_once(workdir: str) -> None:
    conf = os.path.join(workdir, "lanchatd.toml")
    with open(conf, "w") as f:
        f.write('log_level = "info"\n')
    d = Daemon(workdir, "--config", conf)
    _old_history(d.state_dir, days_ago=10, n=3)
    d.start()
    try:
        send_many(d, 2, "new")
        assert _texts(d) == ["old 0", "old 1", "old 2", "new 0", "new 1"]
        _hup(d, conf, 'max_age_days = 30\nlog_level = "info"\n')
        wait_for("the reload", lambda: _reloads(d) == 1, 10.0, diag=d.stderr)
        assert _texts(d) == ["old 0", "old 1", "old 2", "new 0", "new 1"]  # not 30 days old
        _hup(d, conf, 'max_age_days = 5\nlog_level = "info"\n')
        started = time.monotonic()
        wait_for("the 10-day-old messages gone", lambda: _texts(d) == ["new 0", "new 1"],
                 20.0, diag=lambda: f"{_texts(d)}\n{d.stderr()}")
        print(f"pruned {time.monotonic() - started:.2f} s after SIGHUP")
    finally:
        d.stop()


def test_retention_runs_at_start_up(workdir: str) -> None:
    """Not a minute later: a daemon restarted with a retention applies it straight away."""
    conf = os.path.join(workdir, "lanchatd.toml")
    with open(conf, "w") as f:
        f.write('max_age_days = 5\nlog_level = "info"\n')
    d = Daemon(workdir, "--config", conf)
    _old_history(d.state_dir, days_ago=10, n=3)
    started = time.monotonic()
    d.start()
    try:
        wait_for("the 10-day-old messages gone", lambda: _texts(d) == [], 20.0,
                 diag=d.stderr)
        print(f"pruned {time.monotonic() - started:.2f} s after the start")
        assert "retention: removed 3 old message(s)" in d.stderr()
    finally:
        d.stop()


def test_a_retention_pass_over_more_than_one_step_finishes_at_start_up(workdir: str) -> None:
    """A big pass runs as steps of PRUNE_BATCH_ROWS (sends interleave, the watchdog is
    fed); the main loop takes the next step at once, not an hour later, and logs once."""
    conf = os.path.join(workdir, "lanchatd.toml")
    with open(conf, "w") as f:
        f.write('max_messages = 10\nlog_level = "info"\n')
    d = Daemon(workdir, "--config", conf)
    n = 2 * PRUNE_BATCH_ROWS + 500
    _old_history(d.state_dir, days_ago=1, n=n)
    started = time.monotonic()
    d.start()
    try:
        wait_for("10 messages left",
                 lambda: _texts(d) == [f"old {i}" for i in range(n - 10, n)], 60.0,
                 diag=d.stderr)
        print(f"pruned {n - 10} in {time.monotonic() - started:.2f} s after the start")
        assert d.stderr().count("retention: removed") == 1
        assert f"retention: removed {n - 10} old message(s)" in d.stderr()
    finally:
        d.stop()


def test_sighup_changing_a_restart_only_key_logs_one_warning(make_daemon: Any,
                                                             workdir: str) -> None:
    conf = os.path.join(workdir, "lanchatd.toml")
    with open(conf, "w") as f:
        f.write("max_connections = 1024\n")
    d = make_daemon("--config", conf)
    _hup(d, conf, 'max_connections = 100\nnick = "ignored"\n')  # --nick outranks the file
    line = "config: max_connections changed; restart lanchatd to apply it"
    wait_for("the warning", lambda: line in d.stderr(), 10.0, diag=d.stderr)
    assert d.stderr().count("restart lanchatd") == 1, d.stderr()
    assert d.proc is not None and d.proc.poll() is None
    assert cli_json(d, "status")["nick"] == "owner"


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
