"""The systemd units: they verify cleanly and the system service is well sandboxed.

Runs the real ``systemd-analyze`` (Debian package ``systemd``; without it these tests
skip, or fail under ``$CI``) on copies of the units whose ``ExecStart=`` points at an
existing executable, because verify fails on a binary that is not installed.  ``verify``
exits 0 even on unknown keys ("Unknown key ..., ignoring"), so any stderr output counts
as failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool

from lanchat.config import SYSTEM_SOCKET
from lanchat.sdlisten import CONTROL_NAME

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
TRUE = shutil.which("true") or "/bin/true"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (comments and sections dropped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def copy_with_exec(src: Path, dst_dir: Path) -> Path:
    """Copy a unit, pointing ExecStart= at an executable that exists here."""
    text = src.read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={TRUE}", text, flags=re.M)
    dst = dst_dir / src.name
    dst.write_text(text)
    return dst


@pytest.fixture
def analyze() -> str:
    return require_tool("systemd-analyze", "systemd")


@pytest.fixture
def unit_dir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="lcunit."))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp)


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_system_units_verify_without_any_message(unit_dir: Path, analyze: str) -> None:
    service = copy_with_exec(SYSTEMD / "lanchatd.service", unit_dir)
    socket_unit = copy_with_exec(SYSTEMD / "lanchatd.socket", unit_dir)
    proc = run([analyze, "verify", "--man=no", str(service), str(socket_unit)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_verify_would_catch_an_unknown_key(unit_dir: Path, analyze: str) -> None:
    # Guards the test above: a typo must show up on stderr.
    service = copy_with_exec(SYSTEMD / "lanchatd.service", unit_dir)
    service.write_text(service.read_text().replace("[Service]\n", "[Service]\nBogus=1\n"))
    proc = run([analyze, "verify", "--man=no", str(service)])
    assert "Bogus" in proc.stderr


def test_user_unit_verifies_without_any_message(unit_dir: Path, analyze: str) -> None:
    user_dir = unit_dir / "user"
    user_dir.mkdir()
    service = copy_with_exec(SYSTEMD / "user" / "lanchatd.service", user_dir)
    runtime = unit_dir / "runtime"
    runtime.mkdir(mode=0o700)
    # Outside a login session --user verify needs XDG_RUNTIME_DIR to resolve RuntimeDirectory=.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(unit_dir), "XDG_RUNTIME_DIR": str(runtime)}
    proc = run([analyze, "--user", "verify", "--man=no", str(service)], env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_system_service_exposure_is_at_most_2(unit_dir: Path, analyze: str) -> None:
    service = copy_with_exec(SYSTEMD / "lanchatd.service", unit_dir)
    proc = run([analyze, "security", "--offline=yes", str(service)])
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def test_system_service_contract() -> None:
    s = unit_settings(SYSTEMD / "lanchatd.service")
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    assert "WatchdogSec" in s
    assert s["ExecStart"] == ["/usr/bin/lanchatd --system"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0].split()
    assert s["User"] == s["Group"] == ["lanchat"]
    assert s["RuntimeDirectory"] == s["StateDirectory"] == s["ConfigurationDirectory"] == [
        "lanchat"
    ]
    assert s["RuntimeDirectoryMode"] == ["0750"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["After"] == ["network.target"]
    assert "PrivateUsers" not in s  # it would turn SO_PEERCRED uids into nobody
    assert "DynamicUser" in (SYSTEMD / "lanchatd.service").read_text()  # trade-off written down


def test_sysusers_creates_the_user_the_unit_runs_as() -> None:
    lines = [
        line for line in (SYSTEMD / "lanchat.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines == ['u lanchat - "LAN chat daemon" /var/lib/lanchat']


def test_user_unit_contract() -> None:
    s = unit_settings(SYSTEMD / "user" / "lanchatd.service")
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert "WatchdogSec" in s
    assert s["RuntimeDirectory"] == ["lanchat"]
    assert "StateDirectory" not in s  # maps to the wrong place before systemd 254
    assert s["PrivateUsers"] == ["yes"]  # needed by mount options in user units on 252
    assert "--system" not in s["ExecStart"][0]


def test_socket_unit_matches_the_service_paths() -> None:
    s = unit_settings(SYSTEMD / "lanchatd.socket")
    assert s["ListenStream"] == [SYSTEM_SOCKET]
    assert s["SocketMode"] == ["0660"] and s["SocketGroup"] == ["lanchat"]
    assert s["FileDescriptorName"] == [CONTROL_NAME]  # the name lanchatd serves
    assert "RuntimeDirectoryPreserve" in (SYSTEMD / "lanchatd.socket").read_text()
