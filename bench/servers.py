"""Start the servers under test on 127.0.0.1 and read their resource use from /proc.

``start(kind)`` returns a ``Server`` (pid, port, how to stop it).  Kinds:

- ``classic``: ``bench/classic_server.py`` (thread per client, global lock), text mode only.
- ``floor``: ``bench/floor_server.py`` (one thread, epoll, nothing stored), text mode only: what
  the machine and the generator allow any Python server.
- ``lanchat``: ``lanchatd --port 0 --no-discovery --bind 127.0.0.1 --state-dir DIR --socket
  PATH`` (``--max-rate 0`` too once the daemon has the flag), from this checkout, with
  ``LANCHAT_MAX_CONNECTIONS=10000 LANCHAT_MAX_CONNECTIONS_PER_IP=0`` in its environment
  (``LANCHATD_BENCH_ENV``); the port is read from its stderr log.
- ``lanchat:DIR``: the same, from the checkout in DIR (a commit before a change, measured in
  the same invocation: ``git archive`` it there).
- ``ngircd``: the C IRC server (Debian package ``ngircd``), on a free port, with the config
  in ``NGIRCD_CONF`` (flood penalties off); IRC only (the generator's ``irc`` mode).
- anything else: a shell command containing ``{port}``, run as given on a free port chosen
  here (another reference server).

Every server is started by us, stopped by its pid (SIGTERM, then SIGKILL), and its temporary
directory removed.  ``start(..., cpus=(0,))`` runs it on those CPUs only (``taskset``, so every
thread it ever starts inherits the mask): the scenarios keep the server and the load generator
on different cores where they measure latency.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
#: How long a server may take to print its port.
START_TIMEOUT_S = 20.0
PORT_RE = re.compile(rb"listening on [0-9.]+:(\d+)")


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    modes: tuple[str, ...]  # wire modes it speaks: "text", "json", "irc"
    tmpdir: str | None = None
    socket_path: str | None = None
    log_lines: list[bytes] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Stop the process we started (by pid) and remove its directory.  Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def lanchatd_available() -> bool:
    return (REPO / "lanchat" / "daemon.py").exists()


def lanchat_cli_available() -> bool:
    return (REPO / "lanchat" / "cli.py").exists()


def compile_checkout(repo: Path = REPO) -> None:
    """Byte-compile ``repo``'s lanchat package, as an install does (pip compiles what it
    installs): with ``PYTHONDONTWRITEBYTECODE`` set (this machine's sessions set it) every
    daemon and CLI start would otherwise compile ~18,000 lines again -- 0.37 s of CPU for
    lanchatd's imports against 0.21 s -- and a start-up benchmark would measure that."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "lanchat")],
                   check=True, capture_output=True, timeout=120)


def _env(repo: Path = REPO) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


#: lanchatd's connection limits for the benchmarks, set through its environment: every
#: generated client comes from 127.0.0.1, so the per-address limit (default 64) would refuse
#: all but 64 of them, and the scale scenario needs 5,100 connections (default limit 1,024).
LANCHATD_BENCH_ENV = {"LANCHAT_MAX_CONNECTIONS": "10000", "LANCHAT_MAX_CONNECTIONS_PER_IP": "0"}


def lanchatd_env(repo: Path = REPO) -> dict[str, str]:
    env = _env(repo)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("LANCHAT_CONFIG", None)
    env.update(LANCHATD_BENCH_ENV)
    return env


def lanchatd_help(repo: Path = REPO) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from lanchat.daemon import main; sys.exit(main())",
         "--help"], capture_output=True, env=_env(repo), timeout=20, check=False)
    return out.stdout.decode("utf-8", "replace")


def _wait_port(proc: subprocess.Popen[bytes], stream_name: str,
               lines: list[bytes]) -> int:
    """Read the child's stream until a port appears; keep draining it afterwards."""
    stream = proc.stdout if stream_name == "stdout" else proc.stderr
    assert stream is not None
    found: list[int] = []
    got = threading.Event()

    def pump() -> None:
        for line in stream:
            if len(lines) < 200:
                lines.append(line)
            if not found:
                m = PORT_RE.search(line)
                if m:
                    found.append(int(m.group(1)))
                    got.set()
        got.set()

    threading.Thread(target=pump, name=f"pump-{proc.pid}", daemon=True).start()
    got.wait(START_TIMEOUT_S)
    if not found:
        raise RuntimeError(f"server did not print its port: {b''.join(lines[-10:])!r}")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _on_cpus(cmd: list[str], cpus: tuple[int, ...] | None) -> list[str]:
    """``cmd`` run on ``cpus`` only (None: wherever the scheduler likes)."""
    if not cpus:
        return cmd
    return ["taskset", "--cpu-list", ",".join(map(str, cpus)), *cmd]


#: The Python reference servers in bench/, text mode only.
SCRIPTS = {"classic": "classic_server.py", "floor": "floor_server.py"}


def tls_args(kind: str) -> list[str]:
    """What ``start`` needs so that ``kind`` takes TLS 1.3 clients (the generator's
    ``LoadSpec.tls``): ``floor`` gets ``--tls``; lanchatd needs nothing (the hub tells a TLS
    ClientHello from text and JSON by its first byte, on its one port).  RuntimeError for a
    server that cannot (classic, ngircd, a command)."""
    if kind == "floor":
        return ["--tls"]
    if kind == "lanchat" or kind.startswith("lanchat:"):
        return []
    raise RuntimeError(f"{kind!r} has no TLS in the benchmarks (floor and lanchat do)")


def start(kind: str, extra_args: list[str] | None = None,
          cpus: tuple[int, ...] | None = None) -> Server:
    extra = extra_args or []
    lines: list[bytes] = []
    if kind in SCRIPTS:
        proc = subprocess.Popen(
            _on_cpus([sys.executable, str(BENCH / SCRIPTS[kind]), "--port", "0", *extra], cpus),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            port = _wait_port(proc, "stdout", lines)
        except RuntimeError:
            _kill(proc)
            raise
        return Server(kind, proc, port, ("text",), log_lines=lines)
    if kind == "lanchat" or kind.startswith("lanchat:"):
        # "lanchat:DIR": lanchatd from another checkout (e.g. the commit before a change,
        # measured in the same invocation as this one)
        repo = Path(kind.partition(":")[2]) if ":" in kind else REPO
        if not (repo / "lanchat" / "daemon.py").exists():
            raise RuntimeError(f"lanchatd not available in {repo} (no lanchat/daemon.py)")
        compile_checkout(repo)
        tmp = tempfile.mkdtemp(prefix="lcb", dir="/tmp")
        sock = os.path.join(tmp, "c.sock")
        args = ["--port", "0", "--no-discovery", "--bind", "127.0.0.1",
                "--state-dir", tmp, "--socket", sock]
        if "--max-rate" in lanchatd_help(repo):
            args += ["--max-rate", "0"]
        proc = subprocess.Popen(
            _on_cpus([sys.executable, "-c",
                      "import sys; from lanchat.daemon import main; sys.exit(main())",
                      *args, *extra], cpus),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=lanchatd_env(repo), cwd=tmp)
        try:
            port = _wait_port(proc, "stderr", lines)
        except RuntimeError:
            _kill(proc)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Server(kind, proc, port, ("text", "json"), tmp, sock, lines)
    if kind == "ngircd":
        return _start_ngircd(extra, cpus)
    # a command template, e.g. "ngircd -n -f /tmp/x.conf" with {port} in it
    port = free_port()
    proc = subprocess.Popen(_on_cpus(shlex.split(kind.format(port=port)) + extra, cpus),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if _listening(proc, port):
        return Server(kind, proc, port, ("text",))
    _kill(proc)
    raise RuntimeError(f"{kind!r} did not listen on port {port}")


#: ngircd 26 for the benchmarks: loopback only, no DNS/ident lookups, no connection limits,
#: and MaxPenaltyTime = 0, which turns off its flood penalties (ngircd >= 26).
NGIRCD_CONF = """\
[Global]
Name = bench.lanchat.invalid
Info = lanchat benchmark reference
Listen = 127.0.0.1
Ports = {port}
MotdPhrase = bench
PidFile = {tmp}/ngircd.pid
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 0
MaxPenaltyTime = 0
PingTimeout = 600
PongTimeout = 60
[Options]
DNS = no
Ident = no
PAM = no
"""


def _start_ngircd(extra: list[str], cpus: tuple[int, ...] | None) -> Server:
    """ngircd (Debian package ``ngircd``), the C reference server; it speaks IRC only."""
    binary = shutil.which("ngircd") or "/usr/sbin/ngircd"
    if not os.path.exists(binary):
        raise RuntimeError("ngircd is not installed (apt-get install ngircd)")
    tmp = tempfile.mkdtemp(prefix="lcbirc", dir="/tmp")
    os.chmod(tmp, 0o755)  # ngircd drops to an unprivileged user when started as root
    port = free_port()
    conf = os.path.join(tmp, "ngircd.conf")
    Path(conf).write_text(NGIRCD_CONF.format(port=port, tmp=tmp))
    proc = subprocess.Popen(_on_cpus([binary, "--nodaemon", "--config", conf, *extra], cpus),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if _listening(proc, port):
        return Server("ngircd", proc, port, ("irc",), tmp)
    _kill(proc)
    shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"ngircd did not listen on port {port}")


def _listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until 127.0.0.1:``port`` accepts; False if ``proc`` died or time ran out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


# --- /proc ------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far (/proc/PID/stat)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def status(pid: int) -> dict[str, int]:
    """``VmRSS``/``VmHWM`` in KiB and ``Threads`` from /proc/PID/status."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(val.split()[0])
    return out


def rss_mib(pid: int) -> float:
    return round(status(pid).get("VmRSS", 0) / 1024, 1)


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + vals[4]
    return (sum(vals[:8]) - idle) / CLK_TCK
