"""systemd integration: the notify socket protocol and journal-friendly logging."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from lanchat import logsetup
from lanchat.sdnotify import notify, watchdog_interval


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    tmp = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(tmp)


def test_notify_sends_datagrams_to_a_path_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path}
    assert notify("READY=1\nSTATUS=listening on :7654", env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on :7654"
    assert notify("STOPPING=1", env)
    assert sock.recv(4096) == b"STOPPING=1"
    assert notify("WATCHDOG=1", env)
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_abstract_namespace_socket() -> None:
    name = f"lanchat-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_notify_without_a_socket_is_a_quiet_no_op(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lanchat.sdnotify")
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1"}) is False
    tmp = tempfile.mkdtemp(dir="/tmp")
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": os.path.join(tmp, "gone")}) is False
    finally:
        os.rmdir(tmp)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert any("failed" in r.getMessage() for r in caplog.records)


def test_watchdog_interval() -> None:
    assert watchdog_interval({}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 10) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0


# --------------------------------------------------------------------------- logging


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        logsetup._handler = None


def test_terminal_format_has_time_prog_pid_and_level(restore_root_logger: None) -> None:
    out = io.StringIO()
    logsetup.setup_logging("info", env={}, stream=out)
    logging.getLogger("lanchat.test").info("hub listening on %s", ":7654")
    logging.getLogger("lanchat.test").debug("hidden")
    line = out.getvalue()
    assert line.endswith(f" lanchatd[{os.getpid()}] INFO: hub listening on :7654\n")
    assert line[:4].isdigit() and line[4] == "-" and line.count("\n") == 1


def test_journal_format_when_stderr_is_the_journal_stream(restore_root_logger: None) -> None:
    with tempfile.TemporaryFile("w+") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        logsetup.setup_logging("debug", env=env, stream=stream)
        log = logging.getLogger("lanchat.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e\nsecond line")
        log.critical("c")
        stream.flush()
        stream.seek(0)
        assert stream.read() == "<7>d\n<6>i\n<4>w\n<3>e\n<3>second line\n<2>c\n"


def test_inherited_journal_stream_for_another_stream_is_ignored(
    restore_root_logger: None,
) -> None:
    with tempfile.TemporaryFile("w+") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert not logsetup.journal_stream(env, stream)
    assert not logsetup.journal_stream({"JOURNAL_STREAM": "1:2"}, io.StringIO())
    assert not logsetup.journal_stream({"JOURNAL_STREAM": "junk"}, io.StringIO())


def test_setup_again_replaces_the_handler(restore_root_logger: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    logsetup.setup_logging("warning", env={}, stream=first)
    logsetup.setup_logging("error", env={}, stream=second)
    log = logging.getLogger("lanchat.test")
    log.warning("dropped")
    log.error("kept")
    assert first.getvalue() == ""
    assert second.getvalue().endswith("ERROR: kept\n")
    logsetup.set_level("debug")
    assert logging.getLogger().level == logging.DEBUG
    with pytest.raises(ValueError):
        logsetup.to_level("loud")


# --------------------------------------------------------------------------- the daemon


def _daemon_env(tmp: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LANCHAT_", "NOTIFY_", "WATCHDOG_", "XDG_", "JOURNAL_"))}
    env.update(HOME=tmp, XDG_CONFIG_HOME=tmp, XDG_STATE_HOME=tmp, XDG_RUNTIME_DIR=tmp,
               USER="tester", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _daemon_cmd(tmp: str) -> list[str]:
    # Loopback only, discovery off: nothing leaves this machine.
    return [sys.executable, "-m", "lanchat.daemon", "--port", "0", "--bind", "127.0.0.1",
            "--no-discovery", "--state-dir", os.path.join(tmp, "state"),
            "--socket", os.path.join(tmp, "c.sock")]


def _recv_until(sock: socket.socket, wanted: str, deadline: float) -> list[str]:
    got: list[str] = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(data)
        if wanted in data.split("\n"):
            return got
    raise AssertionError(f"no {wanted} within the time limit; got {got}")


def test_daemon_sends_ready_watchdog_and_stopping(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    tmp = os.path.dirname(path)
    env = _daemon_env(tmp, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    proc = subprocess.Popen(_daemon_cmd(tmp), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        got = _recv_until(sock, "READY=1", time.monotonic() + 20)
        assert any(line.startswith("STATUS=") for data in got for line in data.split("\n"))
        _recv_until(sock, "WATCHDOG=1", time.monotonic() + 5)
        proc.send_signal(signal.SIGTERM)
        _recv_until(sock, "STOPPING=1", time.monotonic() + 10)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_daemon_bad_config_is_one_line_and_exit_78() -> None:
    tmp = tempfile.mkdtemp(dir="/tmp")
    try:
        bad = os.path.join(tmp, "bad.toml")
        for text, expected in [
            ("prot = 7654\n", f"lanchatd: {bad}: unknown key 'prot' (did you mean 'port'?)"),
            ("port = 'x'\n", f"lanchatd: {bad}: key 'port': must be an integer, not 'x' (str)"),
            ("port = = 1\n", f"lanchatd: {bad}: invalid TOML: "),
        ]:
            with open(bad, "w") as f:
                f.write(text)
            proc = subprocess.run([*_daemon_cmd(tmp), "--config", bad], env=_daemon_env(tmp),
                                  capture_output=True, text=True, timeout=30, check=False)
            assert proc.returncode == 78
            assert proc.stderr.startswith(expected), proc.stderr
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        ok = subprocess.run([*_daemon_cmd(tmp), "--check-config"], env=_daemon_env(tmp),
                            capture_output=True, text=True, timeout=30, check=False)
        assert ok.returncode == 0, ok.stderr
        assert "port = 0\n" in ok.stdout and "discovery = false\n" in ok.stdout
    finally:
        shutil.rmtree(tmp)
