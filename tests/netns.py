"""A private LAN built from Linux network namespaces, for tests that need real multicast.

mDNS must never run on this machine's own interfaces (DESIGN.md, "Testing on a real network,
safely"), so discovery tests build their own network: one "switch" namespace holding a Linux
bridge per subnet, and one namespace per host, each with one veth per subnet (``eth0``,
``eth1`` …) plugged into that subnet's bridge.  Every interface is created *inside* a namespace
we made (``ip netns exec SWITCH ip link add … peer … netns HOST``), so nothing ever appears in
the root namespace, not even for a moment.

Use::

    require_netns()                      # skip (or fail when $CI is set) without root/netns
    with Lan("lc") as lan:
        a = lan.add_host()               # 10.77.0.1 on eth0
        b = lan.add_host()               # 10.77.0.2 on eth0
        p = a.run([sys.executable, "probe.py"])
        ...
        lan.set_link(b, "10.77.0.0/24", up=False)   # pull b's cable

Teardown (``close()``, also run by ``__exit__`` and at interpreter exit) always kills every
process the harness started -- by its PID/process group, SIGTERM then SIGKILL after 3 s -- and
deletes every namespace it created, even when the test failed half-way.  Names are unique per
run (pid + counter), so parallel runs do not collide; interface names stay within Linux's
15-character limit.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from conftest import skip_or_fail

#: The subnet a host joins when add_host() is given none.
DEFAULT_SUBNET = "10.77.0.0/24"

#: Seconds a process gets to exit after SIGTERM before it is killed.
TERM_GRACE_S = 3.0

#: Seconds any single `ip` command may take (they take milliseconds).
IP_TIMEOUT_S = 10.0

_IFNAMSIZ = 15          # longest Linux interface name (IFNAMSIZ - 1)
_MAX_HOSTS = 99         # keeps "h<i>s<j>" within the interface-name budget
_MAX_SUBNETS = 9

_counter_lock = threading.Lock()   # guards _counter
_counter = 0


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _next_tag(prefix: str) -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return f"{prefix[:3]}{_b36(os.getpid())}{_b36(n)}"


def _ip(*args: str, ns: str | None = None) -> str:
    """Run one iproute2 command (inside ``ns`` when given); raise on failure."""
    argv = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res.stdout


def netns_names() -> set[str]:
    """The namespaces that exist now (names only)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=IP_TIMEOUT_S, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def require_netns() -> None:
    """Skip the calling test unless we are root and can create a network namespace.

    When ``$CI`` is set the test fails instead: CI must run these tests, and a silent skip
    would hide that discovery went untested.
    """
    reason = None
    if os.geteuid() != 0:
        reason = "network-namespace tests need root"
    elif shutil.which("ip") is None:
        reason = "network-namespace tests need iproute2 (`ip`)"
    else:
        probe = _next_tag("lcq")
        try:
            _ip("netns", "add", probe)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            reason = f"cannot create a network namespace: {exc}"
        else:
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                _ip("netns", "del", probe)
    if reason is not None:
        skip_or_fail(reason)


class NsProcess(subprocess.Popen[bytes]):
    """A process started inside a host namespace; stdout/stderr go to files."""

    stdout_path: Path
    stderr_path: Path

    def out_text(self) -> str:
        """Everything the process wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def err_text(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """The complete JSON lines on stdout so far (a half-written last line is left out)."""
        out = []
        for line in self.out_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def wait_for_line(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                      *, poll: float = 0.05) -> dict[str, Any]:
        """The first JSON line matching ``pred``; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for obj in self.json_lines():
                if pred(obj):
                    return obj
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no matching line within {timeout} s from pid {self.pid}\n"
                    f"stdout:\n{self.out_text()}\nstderr:\n{self.err_text()[-4000:]}")
            time.sleep(poll)


class Host:
    """One machine of the LAN: a namespace with one ``ethN`` per subnet."""

    def __init__(self, lan: Lan, index: int, ns: str) -> None:
        self.lan = lan
        self.index = index
        self.ns = ns
        #: subnet (as given) -> (interface name inside the host, host-side veth in the switch)
        self.links: dict[str, tuple[str, str]] = {}
        #: subnet -> this host's address on it
        self.addresses: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Host {self.ns} {self.addresses}>"

    def address(self, subnet: str | None = None) -> str:
        """This host's address on ``subnet`` (default: its first subnet)."""
        if subnet is None:
            subnet = next(iter(self.addresses))
        return self.addresses[subnet]

    def wait_ipv6_ready(self, timeout: float = 10.0) -> None:
        """Wait until no IPv6 address is still tentative (duplicate address detection takes
        ~1-2 s after a link comes up); AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while _ip("-6", "addr", "show", "tentative", ns=self.ns).strip():
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.ns}: IPv6 addresses still tentative")
            time.sleep(0.1)

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: int | None = None) -> NsProcess:
        """Start ``argv`` inside this host's namespace, in a new session.

        stdout and stderr go to files in the LAN's temporary directory (read them with
        ``out_text()``/``json_lines()``); stdin is empty unless ``stdin=subprocess.PIPE``
        (then write to ``proc.stdin``).  The LAN's teardown kills the process.
        """
        return self.lan._spawn(self, argv, env=env, cwd=cwd, stdin=stdin)

    def check_output(self, argv: Sequence[str], *, timeout: float = 30.0) -> str:
        """Run ``argv`` in this namespace to completion; its stdout, or CalledProcessError."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=True).stdout


class Lan:
    """A private network of namespaces; a context manager that always tears down.

    Not thread-safe: build and tear down from one thread (the test's).
    """

    def __init__(self, prefix: str = "lc") -> None:
        self.tag = _next_tag(prefix)
        self.switch = f"{self.tag}sw"
        self.hosts: list[Host] = []
        self.subnets: list[str] = []            # index = bridge number in the switch
        self.namespaces: list[str] = []         # every namespace we created, in order
        self.procs: list[NsProcess] = []
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/tmp"))
        self._closed = False
        atexit.register(self.close)
        try:
            self._add_ns(self.switch)
            _ip("link", "set", "lo", "up", ns=self.switch)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ---------------------------------------------------------------------------

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)

    def _bridge(self, subnet: str) -> str:
        """The bridge for ``subnet`` in the switch namespace, created on first use."""
        ipaddress.ip_network(subnet)            # validate early, with a clear error
        if subnet not in self.subnets:
            if len(self.subnets) >= _MAX_SUBNETS:
                raise ValueError(f"at most {_MAX_SUBNETS} subnets")
            br = f"br{len(self.subnets)}"
            # No STP and no forwarding delay: ports forward at once.  No IGMP snooping: with no
            # querier on this tiny LAN, snooping would only make multicast delivery depend on
            # timing; mDNS is link-local multicast and should simply be flooded, as a switch does.
            _ip("link", "add", br, "type", "bridge", "stp_state", "0", "forward_delay", "0",
                "mcast_snooping", "0", ns=self.switch)
            _ip("link", "set", br, "up", ns=self.switch)
            self.subnets.append(subnet)
        return f"br{self.subnets.index(subnet)}"

    def add_host(self, subnets: Sequence[str] = (DEFAULT_SUBNET,)) -> Host:
        """A new host with one interface per subnet (``eth0`` on the first), addressed ``.i``.

        ``i`` is the host's number (1, 2, …), so the n-th host is ``10.77.0.n`` on the
        default subnet.
        """
        if len(self.hosts) >= _MAX_HOSTS:
            raise ValueError(f"at most {_MAX_HOSTS} hosts")
        i = len(self.hosts) + 1
        host = Host(self, i, f"{self.tag}h{i}")
        self._add_ns(host.ns)
        self.hosts.append(host)
        _ip("link", "set", "lo", "up", ns=host.ns)
        for j, subnet in enumerate(subnets):
            net = ipaddress.ip_network(subnet)
            br = self._bridge(subnet)
            veth = f"{self.tag}h{i}s{j}"
            assert len(veth) <= _IFNAMSIZ, veth
            eth = f"eth{j}"
            # Create the pair inside the switch namespace, with its peer moved straight into the
            # host: no interface ever exists in the root namespace.
            _ip("link", "add", veth, "type", "veth", "peer", "name", eth, "netns", host.ns,
                ns=self.switch)
            _ip("link", "set", veth, "master", br, "up", ns=self.switch)
            addr = str(net.network_address + i)
            _ip("addr", "add", f"{addr}/{net.prefixlen}", "dev", eth, ns=host.ns)
            _ip("link", "set", eth, "up", ns=host.ns)
            host.links[subnet] = (eth, veth)
            host.addresses[subnet] = addr
        return host

    def set_link(self, host: Host, subnet: str, up: bool) -> None:
        """Pull (``up=False``) or plug back in the cable of ``host`` on ``subnet``.

        The switch-side end goes down, so the host sees its ``ethN`` lose carrier while keeping
        its address -- as when a cable is unplugged or a Wi-Fi link drops.
        """
        _eth, veth = host.links[subnet]
        _ip("link", "set", veth, "up" if up else "down", ns=self.switch)

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, host: Host, argv: Sequence[str], *, env: dict[str, str] | None,
               cwd: str | None, stdin: int | None = None) -> NsProcess:
        if self._closed:
            raise RuntimeError("LAN already torn down")
        n = len(self.procs)
        out = self.tmpdir / f"{host.ns}-{n}.out"
        err = self.tmpdir / f"{host.ns}-{n}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = NsProcess(["ip", "netns", "exec", host.ns, *argv],
                             stdin=subprocess.DEVNULL if stdin is None else stdin,
                             stdout=fo, stderr=fe, env=env, cwd=cwd, start_new_session=True)
        proc.stdout_path = out
        proc.stderr_path = err
        self.procs.append(proc)
        return proc

    def capture(self, subnet: str = DEFAULT_SUBNET, *, timeout: float = 10.0) -> Capture:
        """Start ``tcpdump`` on ``subnet``'s bridge (the switch sees every frame between the
        hosts, as a sniffer on the LAN would); :meth:`Capture.stop` returns the bytes."""
        if shutil.which("tcpdump") is None:
            skip_or_fail("tcpdump is not installed (Debian package tcpdump)")
        br = self._bridge(subnet)
        pcap = self.tmpdir / f"{br}-{len(self.procs)}.pcap"
        n = len(self.procs)
        err = self.tmpdir / f"{self.switch}-{n}.err"
        with open(err, "wb") as fe:
            # -U: each packet written at once; -Z root: keep writing where we can (tcpdump
            # otherwise drops to its own user); -s 0: whole frames.
            proc = NsProcess(["ip", "netns", "exec", self.switch, "tcpdump", "-i", br, "-U",
                              "-Z", "root", "-s", "0", "-w", str(pcap)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fe,
                             start_new_session=True)
        proc.stderr_path = err
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while "listening on" not in proc.err_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(proc)
                raise RuntimeError(f"tcpdump did not start: {proc.err_text()}")
            time.sleep(0.02)
        return Capture(self, proc, pcap)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        # `ip netns exec` execs the command, so proc.pid is the command itself, and it leads its
        # own session/process group (start_new_session): signal that group, which we created.
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def stop(self, proc: subprocess.Popen[bytes], *, grace: float = TERM_GRACE_S) -> int:
        """SIGTERM ``proc`` (one we started), SIGKILL after ``grace`` s; its exit status."""
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(IP_TIMEOUT_S)
        rc = proc.returncode
        assert rc is not None
        return rc

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Kill our processes and delete our namespaces.  Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(IP_TIMEOUT_S)
        # Hosts first, the switch last: deleting a namespace destroys the veth ends inside it.
        for ns in reversed(self.namespaces):
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                _ip("netns", "del", ns)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            atexit.unregister(self.close)

    def leftovers(self) -> tuple[set[str], list[int]]:
        """Namespaces of ours that still exist and PIDs of ours still running (both empty after
        a clean teardown)."""
        alive = [p.pid for p in self.procs if p.poll() is None]
        return netns_names() & set(self.namespaces), alive


class Capture:
    """A running packet capture on a namespace LAN's bridge (:meth:`Lan.capture`)."""

    def __init__(self, lan: Lan, proc: NsProcess, path: Path) -> None:
        self.lan, self.proc, self.path = lan, proc, path

    def stop(self) -> bytes:
        """Stop tcpdump (it flushes on SIGTERM) and return the pcap file's bytes."""
        self.lan.stop(self.proc)
        return self.path.read_bytes()

    def summary(self) -> str:
        """tcpdump's own last lines (how many packets it captured, dropped)."""
        return self.proc.err_text()[-500:]


@contextlib.contextmanager
def lan_for_test(prefix: str = "lc") -> Iterator[Lan]:
    """``require_netns()`` + a ``Lan`` that is torn down however the test ends.

    For a pytest fixture: ``@pytest.fixture def lan(): with lan_for_test() as l: yield l``.
    """
    require_netns()
    with Lan(prefix) as lan:
        yield lan
