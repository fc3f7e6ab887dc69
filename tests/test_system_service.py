"""The system service for real: ``scripts/install --system`` and lanchatd.service under systemd.

Here systemd is not PID 1 (nor in most CI containers), so ``systemctl`` cannot start a
service on the host.  ``systemd-nspawn --boot`` gives one: a container whose PID 1 is the
host's own systemd, with the host's ``/usr`` read-only and an empty, throwaway root
(``--volatile=yes``: ``/etc``, ``/var``, ``/opt`` live in a tmpfs that is gone when the
container stops), and a private network namespace holding only its loopback.  It boots to
``basic.target`` only, so that no service the image happens to carry is started.

In it, as an administrator would: ``scripts/install --system`` (from a copy of this checkout,
pip offline from wheels built on the host), ``systemctl start lanchatd`` -- the unit of
``systemd/lanchatd.service`` with the ``ExecStart=`` the installer writes.  Then what systemd
does with the unit is observed on the running daemon: the user, capabilities, seccomp and
no-new-privileges in ``/proc``; the file system seen from the service's own mount namespace
(state directory writable, the rest read-only or hidden); the socket's owner and mode, so that
a member of group ``lanchat`` chats and anyone else is refused; ``Type=notify`` readiness,
the watchdog fed, ``ExecReload=`` applying a new nick, a clean stop; and ``systemd-analyze
security`` against the live manager.

The host is touched only by: a cgroup per run (``<hierarchy>/lcsd…``, holding nspawn and its
container, removed at the end), nspawn's own bookkeeping under ``/run/systemd`` (removed when
empty), and the temporary directory.  Needs root and ``systemd-nspawn`` (Debian package
``systemd-container``, which ``scripts/test`` installs); without them the tests skip, or fail
under ``$CI``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool, skip_or_fail, wait_for
from test_packaging import INSTALL_TIMEOUT_S, ok, run, short_tmpdir, source_copy

pytestmark = pytest.mark.timeout(600)

#: The Python inside the container: the host's /usr is all it has (Debian's python3).
SYSTEM_PYTHON = "/usr/bin/python3"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Seconds for the container to finish booting to basic.target (a few, unloaded).
BOOT_TIMEOUT_S = 120.0
#: Seconds nspawn gets to power the container off before it is killed.
SHUTDOWN_TIMEOUT_S = 30.0

_names = itertools.count()


def cgroup_homes() -> list[Path]:
    """Where this process sits in each cgroup hierarchy nspawn uses (cgroup2, name=systemd)."""
    mine: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            mine["cgroup2"] = path
        elif "name=systemd" in controllers.split(","):
            mine["systemd"] = path
    homes = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        mountpoint, fstype, options = fields[4], fields[sep + 1], fields[sep + 3]
        key = "cgroup2" if fstype == "cgroup2" else (
            "systemd" if fstype == "cgroup" and "name=systemd" in options.split(",") else None)
        if key in mine:
            homes.append(Path(mountpoint + mine.pop(key)))
    return homes


class Machine:
    """A booted nspawn container; :meth:`sh` runs commands in it.  :meth:`close` always
    stops it and removes what it left on the host."""

    def __init__(self, workdir: Path, binds: list[str]) -> None:
        self.name = f"lcsd{os.getpid()}x{next(_names)}"
        self.workdir = workdir
        self.console = workdir / "console.log"
        self.cgroups = [home / self.name for home in cgroup_homes()]
        if not self.cgroups:
            skip_or_fail("no cgroup hierarchy to run systemd-nspawn in")
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        for cg in self.cgroups:
            cg.mkdir()
        try:
            self._boot(binds)
        except BaseException:
            self.close()
            raise

    def _boot(self, binds: list[str]) -> None:
        nspawn = require_tool("systemd-nspawn", "systemd-container")
        join = "; ".join(f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))}"
                         for cg in self.cgroups)
        cmd = ["sh", "-c", f'{join}; exec "$@"', "sh", nspawn, "--quiet", "--register=no",
               "--keep-unit", "--volatile=yes", "--directory=/", f"--machine={self.name}",
               "--private-network", *binds, "--boot",
               "systemd.unit=basic.target", "systemd.firstboot=off"]
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        proc = self.proc

        def leader() -> int | None:
            if proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {proc.returncode}:\n"
                                     f"{self.console.read_text(errors='replace')[-3000:]}")
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                        return int(stat.parent.name)
            return None

        self.leader = wait_for("the container's PID 1", leader, 30.0)

        def booted() -> str | None:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            return state if state in ("running", "degraded") else None

        started = time.monotonic()
        state = wait_for("the container to boot", booted, BOOT_TIMEOUT_S, poll=0.2)
        print(f"container {self.name} booted ({state}) in {time.monotonic() - started:.1f} s")

    def sh(self, script: str, *, user: str | None = None, check: bool = True,
           timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a shell ``script`` in the container as root (or as ``user``, with its groups),
        with nothing of the host's environment."""
        argv = ["sh", "-c", script]
        if user is not None:
            argv = ["sh", "-c", 'exec setpriv --reuid="$0" --regid="$(id -g "$0")" '
                    '--init-groups "$@"', user, *argv]
        proc = subprocess.run(["nsenter", f"--target={self.leader}", "--all", "env", "-i",
                               f"PATH={PATH}", "LC_ALL=C.UTF-8", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            ok(proc)
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def close(self) -> None:
        """Power the container off (SIGTERM to nspawn), kill it if it hangs, clean up."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                if self.leader:  # PID 1 of its namespace: every process in it dies with it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                proc.kill()
                proc.wait(10)
        for cg in self.cgroups:  # nspawn's supervisor/payload groups inside ours, deepest first
            for sub in sorted(cg.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                cg.rmdir()
        for leftover in (f"/run/systemd/nspawn/propagate/{self.name}",
                         "/run/systemd/nspawn/propagate", "/run/systemd/nspawn",
                         "/run/systemd/nspawn-root"):
            with contextlib.suppress(OSError):
                os.rmdir(leftover)  # only if empty: another nspawn may be using it

    def leftovers(self) -> list[str]:
        return [str(cg) for cg in self.cgroups if cg.exists()]


def build_wheels(src: Path, dest: Path) -> None:
    """What ``pip install <src>`` needs, as wheels: lanchat's dependencies and its build
    backend, so that pip in the offline container installs from them alone."""
    ok(run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(src)],
           timeout=INSTALL_TIMEOUT_S, cwd=dest.parent))
    for built in dest.glob("lanchat-*.whl"):
        built.unlink()  # the installer must build lanchat from the source, as it does for users
    requires = re.search(r'^requires = \[(.*)\]', (src / "pyproject.toml").read_text(), re.M)
    assert requires, "pyproject.toml has no [build-system] requires"
    backend = json.loads(f"[{requires.group(1)}]")
    ok(run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest),
            *backend, "wheel"], timeout=INSTALL_TIMEOUT_S, cwd=dest.parent))
    shutil.rmtree(src / "build", ignore_errors=True)
    for info in src.glob("*.egg-info"):
        shutil.rmtree(info)


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    if os.geteuid() != 0:
        skip_or_fail("booting a systemd-nspawn container needs root")
    require_tool("systemd-nspawn", "systemd-container")
    require_tool("nsenter", "util-linux")
    if run([SYSTEM_PYTHON, "-c", "import ensurepip, sys, venv; "
            "sys.exit(sys.version_info < (3, 11))"]).returncode != 0:
        skip_or_fail(f"{SYSTEM_PYTHON} (3.11 or newer, with venv) is needed: "
                     "apt-get install python3-venv")
    workdir = Path(short_tmpdir("lc-sd-"))
    box: Machine | None = None
    try:
        src = source_copy(workdir / "src", "scripts", "systemd")
        wheels = workdir / "wheels"
        wheels.mkdir()
        build_wheels(src, wheels)
        box = Machine(workdir, [f"--bind={src}:/src", f"--bind-ro={wheels}:/wheels",
                                "--tmpfs=/usr/local"])
        yield box
    finally:
        if box is not None:
            box.close()
            assert not box.leftovers(), f"cgroups left behind: {box.leftovers()}"
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def service(machine: Machine) -> Machine:
    """``scripts/install --system`` in the container, a config for a network of one, and
    ``systemctl start lanchatd``."""
    out = machine.sh('PIP_ARGS="--no-index --find-links=/wheels" /src/scripts/install --system',
                     timeout=INSTALL_TIMEOUT_S).stdout
    assert "systemctl enable --now lanchatd" in out, out
    # Nothing to find in a network of one; the test's own namespace would allow mDNS, but a
    # daemon that does not browse keeps the test about the unit.
    machine.sh("printf 'discovery = false\\nnick = \"sandboxed\"\\n' "
               ">> /etc/lanchat/lanchatd.toml")
    machine.sh("systemctl start lanchatd", timeout=90)
    return machine


def main_pid(box: Machine) -> int:
    return int(box.show("lanchatd", "MainPID")["MainPID"])


# -- tests -------------------------------------------------------------------------------------

def test_install_writes_the_unit_the_user_and_the_config(service: Machine) -> None:
    unit = service.sh("cat /etc/systemd/system/lanchatd.service").stdout
    expected = (Path(__file__).resolve().parent.parent / "systemd" / "lanchatd.service"
                ).read_text().replace("ExecStart=/usr/bin/lanchatd --system",
                                      "ExecStart=/usr/local/bin/lanchatd --system")
    assert unit == expected
    passwd = service.sh("getent passwd lanchat").stdout.strip().split(":")
    assert passwd[5] == "/var/lib/lanchat" and passwd[6] in ("/usr/sbin/nologin", "/sbin/nologin")
    assert "sandboxed" in service.sh("cat /etc/lanchat/lanchatd.toml").stdout


def test_the_service_is_up_and_ready_as_type_notify_says(service: Machine) -> None:
    props = service.show("lanchatd", "ActiveState", "SubState", "Type", "NRestarts",
                         "StatusErrno")
    assert (props["ActiveState"], props["SubState"], props["Type"]) == (
        "active", "running", "notify"), props
    assert props["NRestarts"] == "0"
    status = json.loads(service.sh("lanchat status --json").stdout)
    assert status["nick"] == "sandboxed"
    assert (status["state_dir"], status["socket"]) == (
        "/var/lib/lanchat", "/run/lanchat/control.sock")


def test_the_daemon_runs_as_lanchat_without_privileges(service: Machine) -> None:
    pid = main_pid(service)
    uid = service.sh("id -u lanchat").stdout.strip()
    fields = dict(line.split(":\t", 1) for line in
                  service.sh(f"cat /proc/{pid}/status").stdout.splitlines() if ":\t" in line)
    assert fields["Uid"].split() == [uid] * 4
    assert fields["CapEff"] == fields["CapPrm"] == fields["CapBnd"] == "0" * 16
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # SystemCallFilter= is a seccomp filter


def test_the_daemon_sees_a_read_only_system_and_its_own_state(service: Machine) -> None:
    pid = main_pid(service)
    # Outside the service: a directory anyone may write to, and a file in /tmp.
    service.sh("mkdir -p -m 1777 /srv/open && echo outside > /tmp/lanchat-visible")
    # In the service's own mount namespace, as its user: what ProtectSystem=strict,
    # ProtectHome=, PrivateTmp=, StateDirectory= and RuntimeDirectory= made of the file system.
    probe = service.sh(
        f"nsenter --target={pid} --mount setpriv --reuid=lanchat --regid=lanchat "
        "--clear-groups sh -c '"
        "touch /var/lib/lanchat/probe && rm /var/lib/lanchat/probe && echo state:rw; "
        "touch /run/lanchat/probe && rm /run/lanchat/probe && echo runtime:rw; "
        "touch /srv/open/probe 2>&1 | grep -q \"Read-only file system\" && echo srv:ro; "
        "ls /home >/dev/null 2>&1 || echo home:hidden; "
        "test -e /tmp/lanchat-visible || echo tmp:private'").stdout.split()
    assert probe == ["state:rw", "runtime:rw", "srv:ro", "home:hidden", "tmp:private"]
    # ... while outside it, the same user may write there: the sandbox, not permissions.
    service.sh("touch /srv/open/probe && rm /srv/open/probe", user="lanchat")
    modes = service.sh("stat -c '%U:%G %a %n' /run/lanchat /run/lanchat/control.sock "
                       "/var/lib/lanchat /var/lib/lanchat/history.db").stdout.splitlines()
    assert modes == ["lanchat:lanchat 750 /run/lanchat",
                     "lanchat:lanchat 660 /run/lanchat/control.sock",
                     "lanchat:lanchat 750 /var/lib/lanchat",
                     "lanchat:lanchat 600 /var/lib/lanchat/history.db"]


def test_group_members_chat_and_others_are_refused(service: Machine) -> None:
    service.sh("useradd --no-create-home --groups lanchat alice && "
               "useradd --no-create-home bob")
    sent = json.loads(service.sh("lanchat send --json 'hi from alice'", user="alice").stdout)
    assert sent["text"] == "hi from alice"
    refused = service.sh("lanchat status", user="bob", check=False)
    assert refused.returncode == 4, refused
    assert "permission denied on /run/lanchat/control.sock" in refused.stderr
    assert "#lobby sandboxed: hi from alice" in service.sh("lanchat history").stdout
    # The hub on its default port, in the container's own network namespace.
    hub = service.sh("bash -c 'exec 3<>/dev/tcp/127.0.0.1/7654 && head -n 1 <&3'",
                     timeout=20).stdout
    assert hub.startswith("* lanchat hub sandboxed on "), hub


def test_live_security_exposure_is_at_most_2(service: Machine) -> None:
    out = service.sh("systemd-analyze security --no-pager lanchatd").stdout
    match = re.search(r"Overall exposure level for lanchatd\.service: (\d+(?:\.\d+)?)", out)
    assert match, out
    assert float(match.group(1)) <= 2.0, out


def test_reload_watchdog_and_stop(service: Machine) -> None:
    # ExecReload= (SIGHUP) applies a new nick from the file.
    service.sh("sed -i 's/^nick = .*/nick = \"renamed\"/' /etc/lanchat/lanchatd.toml")
    service.sh("systemctl reload lanchatd")

    def nick() -> str | None:
        status = json.loads(service.sh("lanchat status --json").stdout)
        return status["nick"] if status["nick"] == "renamed" else None

    wait_for("the reloaded nick", nick, 15.0, poll=0.2)

    # The watchdog is fed through the sandbox: with WatchdogSec=2s the daemon lives on.
    service.sh("mkdir -p /etc/systemd/system/lanchatd.service.d && printf "
               "'[Service]\\nWatchdogSec=2s\\n' > /etc/systemd/system/lanchatd.service.d/wd.conf"
               " && systemctl daemon-reload && systemctl restart lanchatd", timeout=90)
    first = service.show("lanchatd", "MainPID", "WatchdogTimestampMonotonic", "WatchdogUSec")
    assert first["WatchdogUSec"] == "2s"
    time.sleep(5.0)  # 2.5 watchdog periods: a daemon that does not ping is killed by now
    later = service.show("lanchatd", "MainPID", "NRestarts", "ActiveState",
                         "WatchdogTimestampMonotonic")
    assert later["ActiveState"] == "active" and later["NRestarts"] == "0", later
    assert later["MainPID"] == first["MainPID"]
    assert int(later["WatchdogTimestampMonotonic"]) > int(first["WatchdogTimestampMonotonic"])

    service.sh("systemctl stop lanchatd", timeout=60)
    done = service.show("lanchatd", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert (done["ActiveState"], done["Result"], done["ExecMainStatus"]) == (
        "inactive", "success", "0"), done
    journal = service.sh("journalctl -u lanchatd --no-pager -o cat").stdout
    assert "Traceback" not in journal and "Permission denied" not in journal, journal
