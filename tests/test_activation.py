"""systemd socket activation of the control socket (lanchat.sdlisten), with real sockets.

The test plays systemd: it binds and listens on the control socket itself and
starts lanchatd with that socket as fd 3 and ``$LISTEN_PID``/``$LISTEN_FDS``/
``$LISTEN_FDNAMES`` set, through a tiny exec wrapper (``LISTEN_PID`` must be the
daemon's own pid, which only a process that then execs the daemon can know).
One test uses systemd's own ``systemd-socket-activate`` instead.  Every daemon
runs on loopback with discovery off (conftest.Daemon).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon, lanchat_cmd, lanchatd_cmd, require_tool, wait_for

from lanchat.sdlisten import MAX_LISTEN_FDS, parse_listen_fds

#: Plays systemd's part between fork and exec: moves the descriptors named in
#: argv[1] to 3, 4, ... (through high numbers first, so that none is clobbered),
#: sets $LISTEN_PID to its own pid ("self", which exec keeps) or to argv[2], and
#: execs the rest of argv.  $LISTEN_FDS and $LISTEN_FDNAMES come from the test's env.
EXEC_WRAPPER = """\
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else sys.argv[2]
os.execv(sys.argv[3], sys.argv[3:])
"""

ACTIVATE = "/usr/bin/systemd-socket-activate"


def wrapper(fds: Sequence[int], listen_pid: str = "self") -> list[str]:
    return [sys.executable, "-c", EXEC_WRAPPER, ",".join(map(str, fds)), listen_pid]


def activation_env(names: str | None = "control", count: int = 1) -> dict[str, str]:
    env = {"LISTEN_FDS": str(count)}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def listening_socket(path: str, mode: int = 0o640) -> socket.socket:
    """What systemd makes of ``ListenStream=path`` with ``SocketMode=mode``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(16)
    return sock


@pytest.fixture
def held(workdir: str) -> Iterator[socket.socket]:
    """The listening control socket that "systemd" (this test) holds throughout."""
    sock = listening_socket(os.path.join(workdir, "control.sock"))
    try:
        yield sock
    finally:
        sock.close()


def status(daemon: Daemon, *extra: str) -> dict[str, Any]:
    r = daemon.cli(*extra, "status", "--json")
    assert r.returncode == 0, r.stderr.decode()
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def fd_flags(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd} of pid {pid}")


def socket_inode(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def rpc_line(sock: socket.socket, timeout: float) -> dict[str, Any]:
    """One reply line from ``sock`` within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


# --------------------------------------------------------------------------- the environment


def test_parse_nothing_for_us() -> None:
    assert parse_listen_fds({}, 42) == []
    assert parse_listen_fds({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"}, 42) == []
    # Another process's descriptors, even garbled ones, are none of our business.
    assert parse_listen_fds({"LISTEN_PID": "41", "LISTEN_FDS": "x"}, 42) == []
    assert parse_listen_fds({"LISTEN_PID": "42"}, 42) == []
    assert parse_listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, 42) == []


def test_parse_fds_from_3_with_their_names() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "control:other:control"}
    assert parse_listen_fds(env, 42) == [(3, "control"), (4, "other"), (5, "control")]
    assert parse_listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == [
        (3, "unknown"), (4, "unknown")]
    assert parse_listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": str(MAX_LISTEN_FDS)}, 42)[-1] == (
        2 + MAX_LISTEN_FDS, "unknown")


@pytest.mark.parametrize(("env", "expected"), [
    ({"LISTEN_PID": "forty-two", "LISTEN_FDS": "1"}, "$LISTEN_PID='forty-two' is not a process id"),
    ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "$LISTEN_PID='0' is not a process id"),
    ({"LISTEN_PID": "-42", "LISTEN_FDS": "1"}, "$LISTEN_PID='-42' is not a process id"),
    ({"LISTEN_PID": "42", "LISTEN_FDS": "one"}, "$LISTEN_FDS='one' is not a number"),
    ({"LISTEN_PID": "42", "LISTEN_FDS": "-1"}, "$LISTEN_FDS='-1' is not a number"),
    ({"LISTEN_PID": "42", "LISTEN_FDS": "\u0661"}, "is not a number"),  # Arabic-Indic one
    ({"LISTEN_PID": "42", "LISTEN_FDS": str(MAX_LISTEN_FDS + 1)},
     f"more than {MAX_LISTEN_FDS} file descriptors"),
    ({"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control:other"},
     "has 2 name(s) for $LISTEN_FDS=1"),
    ({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control"},
     "has 1 name(s) for $LISTEN_FDS=2"),
])
def test_parse_malformed_variables_for_us(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_listen_fds(env, 42)
    assert expected in str(exc.value)


TAKE_SNIPPET = """\
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from lanchat import sdlisten
sock = sdlisten.take_control_socket()
def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
print(json.dumps({"fd": sock.fileno(), "name": sock.getsockname(),
                  "env": [os.environ.get(v) for v in sdlisten.LISTEN_VARS],
                  "inheritable": os.get_inheritable(3), "fd4_open": is_open(4)}))
"""


def test_take_unsets_the_variables_sets_cloexec_and_closes_the_rest(
        held: socket.socket) -> None:
    r_pipe, w_pipe = os.pipe()
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **activation_env("control:other", 2))
        proc = subprocess.run(
            [*wrapper([held.fileno(), r_pipe]), sys.executable, "-c", TAKE_SNIPPET],
            env=env, pass_fds=(held.fileno(), r_pipe), capture_output=True, text=True,
            timeout=30, check=False)
    finally:
        os.close(r_pipe)
        os.close(w_pipe)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {"fd": 3, "name": held.getsockname(), "env": [None, None, None],
                   "inheritable": False, "fd4_open": False}
    assert "closing fd 4 named 'other': lanchatd uses only the socket named 'control'" in (
        proc.stderr)


# --------------------------------------------------------------------------- a real daemon


def test_status_answers_through_the_inherited_socket(make_daemon: Any,
                                                     held: socket.socket) -> None:
    path = held.getsockname()
    inode = os.stat(path).st_ino
    daemon = make_daemon(prefix=wrapper([held.fileno()]), pass_fds=[held.fileno()],
                         env=activation_env())
    assert daemon.proc is not None
    pid = daemon.proc.pid
    st = status(daemon)
    assert st["socket"] == path
    assert f"control socket {path} (from systemd)" in daemon.stderr()
    # It serves systemd's socket itself (the same kernel object), close-on-exec...
    assert socket_inode(pid, 3) == f"socket:[{os.fstat(held.fileno()).st_ino}]"
    assert fd_flags(pid, 3) & os.O_CLOEXEC
    # ...and did not rebind, chmod or replace the file.
    assert os.stat(path).st_ino == inode
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert daemon.stop() == 0
    # Shutdown left systemd's socket alone: the file is there and a client is queued.
    assert os.stat(path).st_ino == inode
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5.0)
        client.connect(path)
        held.settimeout(5.0)
        accepted, _ = held.accept()
        accepted.close()


def test_a_restart_queues_clients_instead_of_refusing_them(make_daemon: Any,
                                                           held: socket.socket) -> None:
    path = held.getsockname()
    daemon = make_daemon(prefix=wrapper([held.fileno()]), pass_fds=[held.fileno()],
                         env=activation_env())
    node = status(daemon)["node"]
    assert daemon.stop() == 0
    # No daemon now.  A client connects (it waits in the backlog; ECONNREFUSED would
    # mean the socket was shut down or closed) and sends its request...
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli: subprocess.Popen[bytes] | None = None
    try:
        client.settimeout(5.0)
        client.connect(path)
        client.sendall(b'{"jsonrpc":"2.0","id":7,"method":"status"}\n')
        # ...and so does `lanchat status`, which must simply wait for its answer.
        cli = subprocess.Popen([*lanchat_cmd(), "--socket", path, "status", "--json",
                                "--timeout", "120"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)  # let the CLI connect while no daemon runs (it exits 3 if refused)
        assert cli.poll() is None, cli.communicate()
        started = time.monotonic()
        daemon.start()  # the same fd, a new process
        reply = rpc_line(client, 60.0)
        took = time.monotonic() - started
        assert reply["id"] == 7 and reply["result"]["node"] == node, reply
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0, err.decode()
        assert json.loads(out)["node"] == node
        print(f"queued request answered {took:.2f} s after the restart began")
    finally:
        client.close()
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.communicate(timeout=10)


def test_systemds_path_wins_over_a_different_configured_one(make_daemon: Any, workdir: str,
                                                             held: socket.socket) -> None:
    configured = os.path.join(workdir, "configured.sock")  # the last --socket wins
    daemon = make_daemon("--socket", configured, prefix=wrapper([held.fileno()]),
                         pass_fds=[held.fileno()], env=activation_env())
    assert status(daemon)["socket"] == held.getsockname()
    assert (f"systemd passed {held.getsockname()}, not the configured {configured}; "
            f"serving {held.getsockname()}") in daemon.stderr()
    assert not os.path.exists(configured)


def test_another_processes_listen_pid_is_ignored(make_daemon: Any, workdir: str) -> None:
    theirs = listening_socket(os.path.join(workdir, "theirs.sock"))
    try:
        daemon = make_daemon("-v", prefix=wrapper([theirs.fileno()], listen_pid=str(os.getpid())),
                             pass_fds=[theirs.fileno()], env=activation_env())
        # It bound its own socket at --socket (Daemon.start waited for the file) and serves it.
        assert stat.S_ISSOCK(os.lstat(daemon.socket).st_mode)
        assert status(daemon)["socket"] == daemon.socket != theirs.getsockname()
        assert "(from systemd)" not in daemon.stderr()
        assert f"$LISTEN_PID={os.getpid()}); binding the control socket" in daemon.stderr()
    finally:
        theirs.close()


def test_no_fd_named_control_binds_its_own(make_daemon: Any, workdir: str) -> None:
    other = listening_socket(os.path.join(workdir, "other.sock"))
    try:
        daemon = make_daemon(prefix=wrapper([other.fileno()]), pass_fds=[other.fileno()],
                             env=activation_env("lanchatd.socket"))
        assert status(daemon)["socket"] == daemon.socket
        err = daemon.stderr()
        assert "closing fd 3 named 'lanchatd.socket'" in err
        assert "no file descriptor is named 'control'" in err
    finally:
        other.close()


def run_activated(workdir: str, fds: Sequence[int], env: dict[str, str],
                  ) -> subprocess.CompletedProcess[str]:
    cmd = [*wrapper(fds), *lanchatd_cmd(), "--port", "0", "--bind", "127.0.0.1",
           "--no-discovery", "--state-dir", os.path.join(workdir, "state"),
           "--socket", os.path.join(workdir, "control.sock")]
    return subprocess.run(cmd, env=dict(os.environ, **env), pass_fds=tuple(fds),
                          capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def unusable(kind: str, workdir: str) -> Iterator[int]:
    """A descriptor systemd might pass by mistake, kept open for the test."""
    keep: list[Any] = []
    try:
        if kind == "connected":  # a Unix stream socket, but not listening
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            keep += [a, b]
            yield a.fileno()
        elif kind == "datagram":  # ListenDatagram=
            d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            keep.append(d)
            d.bind(os.path.join(workdir, "dgram.sock"))
            yield d.fileno()
        elif kind == "tcp":  # ListenStream=127.0.0.1:0
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            keep.append(t)
            t.bind(("127.0.0.1", 0))
            t.listen(4)
            yield t.fileno()
        else:  # a regular file
            f = open(os.path.join(workdir, "file"), "wb")  # noqa: SIM115 - closed below
            keep.append(f)
            yield f.fileno()
    finally:
        for item in keep:
            item.close()


@pytest.mark.parametrize(("kind", "expected"), [
    ("connected", "fd 3 named 'control' is not listening (SO_ACCEPTCONN is 0)"),
    ("datagram", "fd 3 named 'control' is a SOCK_DGRAM socket, not SOCK_STREAM"),
    ("tcp", "fd 3 named 'control' is an AF_INET socket, not AF_UNIX"),
    ("file", "fd 3 named 'control' is not a socket (a regular file)"),
])
def test_an_unusable_inherited_fd_is_refused_clearly(workdir: str, kind: str,
                                                     expected: str) -> None:
    with unusable(kind, workdir) as fd:
        proc = run_activated(workdir, [fd], activation_env())
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr == (f"lanchatd: socket activation: {expected}; "
                           "lanchatd.socket needs ListenStream=/path/of/control.sock\n")
    assert not os.path.exists(os.path.join(workdir, "control.sock")), "it bound one anyway"


@pytest.mark.parametrize(("env", "expected"), [
    ({"LISTEN_FDS": "many"}, "$LISTEN_FDS='many' is not a number of file descriptors"),
    ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "control:extra"},
     "$LISTEN_FDNAMES='control:extra' has 2 name(s) for $LISTEN_FDS=1 file descriptor(s)"),
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:gone"},
     "fd 4 ('gone') of $LISTEN_FDS=2 is not open: Bad file descriptor"),
])
def test_malformed_activation_variables_are_refused(workdir: str, held: socket.socket,
                                                     env: dict[str, str], expected: str) -> None:
    proc = run_activated(workdir, [held.fileno()], env)
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr == f"lanchatd: socket activation: {expected}\n"


def test_systemd_socket_activate_starts_it_on_the_first_connection(workdir: str) -> None:
    """systemd's own tool: it listens, and the first `lanchat status` starts the daemon."""
    activate = require_tool("systemd-socket-activate", "systemd", ACTIVATE)
    path = os.path.join(workdir, "control.sock")
    cmd = [activate, "--listen", path, "--fdname=control", *lanchatd_cmd(), "--port", "0",
           "--bind", "127.0.0.1", "--no-discovery", "--state-dir",
           os.path.join(workdir, "state"), "--socket", path]
    err_path = os.path.join(workdir, "activate.err")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, cwd=workdir)
    try:
        wait_for("systemd-socket-activate listening", lambda: os.path.exists(path), 20,
                 diag=lambda: Path(err_path).read_text())
        r = subprocess.run([*lanchat_cmd(), "--socket", path, "status", "--json",
                            "--timeout", "60"],
                           capture_output=True, timeout=90, check=False)
        assert r.returncode == 0, (r.stderr.decode(), Path(err_path).read_text())
        assert json.loads(r.stdout)["socket"] == path
        # The control socket answers as soon as it is served, a moment before the daemon
        # prints its start-up line: wait for the line rather than race it.
        wait_for("the start-up line", lambda: f"control socket {path} (from systemd)"
                 in Path(err_path).read_text(), 20, diag=lambda: Path(err_path).read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, Path(err_path).read_text()
        assert stat.S_ISSOCK(os.lstat(path).st_mode), "the daemon removed systemd's socket"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
