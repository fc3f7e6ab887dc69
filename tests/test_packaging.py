"""Packaging: a built wheel and ``pip install .`` both give working commands.

What a user gets from ``pip install`` is checked from the outside, in fresh
virtual environments, never in the environment running the tests (which has
lanchat installed in editable mode and would hide a missing file):

* the wheel is built once, from a clean copy of the files a build reads, so a
  stale ``build/`` or ``*.egg-info`` in the checkout can neither leak into it
  nor be written into the checkout by this test;
* it is installed, with its dependency zeroconf, into a fresh venv; the
  installed ``lanchatd`` and ``lanchat`` print the version from
  ``lanchat/__init__.py``, the completion script is valid bash, the installed
  daemon (loopback, port 0, ``--no-discovery``) answers the installed CLI, and
  the four man pages sit under the venv's ``share/man``, where ``man`` finds
  them from ``PATH`` alone;
* ``pip install <source>`` (not editable) into a second fresh venv gives the
  same working commands.

Installing needs the package index configured for pip (for zeroconf and, for
the isolated build, setuptools), as ``scripts/test`` does.  Every process
started here is stopped, and every directory removed, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool

import lanchat

ROOT = Path(__file__).resolve().parent.parent
VERSION = lanchat.__version__
READY_RE = re.compile(r"listening on (\S+):(\d+)")

#: Man pages and the section directory each must be installed in.
MAN_PAGES = {
    "lanchat": "man1/lanchat.1",
    "lanchatd": "man8/lanchatd.8",
    "lanchatd.toml": "man5/lanchatd.toml.5",
    "lanchat-protocol": "man7/lanchat-protocol.7",
}

#: Generous: a cold pip cache has to download zeroconf.
INSTALL_TIMEOUT_S = 240.0

pytestmark = pytest.mark.timeout(600)


# -- helpers -------------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """The environment for installed commands: nothing of the test venv or a user daemon."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LANCHAT_", "PYTHON", "PIP_REQUIRE"))
           and k not in ("VIRTUAL_ENV", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                         "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "MANPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str | Path], *, timeout: float = 60.0, cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to completion; its output is in the result, whatever the exit status."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or clean_env(), input=input,
                          check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """``proc``'s stdout, after asserting it exited 0 (showing everything it said if not)."""
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc.stdout


def short_tmpdir(prefix: str) -> str:
    """A directory whose paths fit in a Unix socket address (108 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def source_copy(dest: Path) -> Path:
    """Copy what a build reads (pyproject, README, package, man pages) to ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "HACKING.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in ("lanchat", "man"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def make_venv(path: Path) -> Path:
    """A fresh virtual environment (with pip) at ``path``; returns its bin directory."""
    ok(run([sys.executable, "-m", "venv", path], timeout=120))
    return path / "bin"


def pip_install(bindir: Path, *what: str | Path) -> None:
    ok(run([bindir / "python", "-m", "pip", "install", "--quiet", *what],
           timeout=INSTALL_TIMEOUT_S, cwd=bindir.parent))


def build_wheel(src: Path, outdir: Path) -> Path:
    """Build the wheel of ``src`` into ``outdir`` and return its path.

    ``python -m build`` (the test extras have it) makes the isolated build a
    user or a packager makes; without it, pip's wheel builder does the same job.
    """
    # Asked in a subprocess run outside the checkout: its build/ directory would
    # pass for a namespace package named "build" in this process.
    has_build = run([sys.executable, "-c", "import build.__main__"], cwd=src).returncode == 0
    if has_build:
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
               "--wheel-dir", str(outdir), str(src)]
    ok(run(cmd, timeout=INSTALL_TIMEOUT_S, cwd=src))
    wheels = sorted(outdir.glob("lanchat-*.whl"))
    assert len(wheels) == 1, f"expected one lanchat wheel in {outdir}, found {wheels}"
    return wheels[0]


class InstalledDaemon:
    """The installed ``lanchatd`` on 127.0.0.1, port 0, discovery off; always stopped."""

    def __init__(self, bindir: Path, workdir: str) -> None:
        self.bindir = bindir
        self.socket = os.path.join(workdir, "c.sock")
        self.state_dir = os.path.join(workdir, "state")
        self.errpath = os.path.join(workdir, "lanchatd.err")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.workdir = workdir

    def start(self, timeout: float = 20.0) -> None:
        cmd = [str(self.bindir / "lanchatd"), "--no-discovery", "--port", "0",
               "--bind", "127.0.0.1", "--state-dir", self.state_dir, "--socket", self.socket,
               "--nick", "packager"]
        with open(self.errpath, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env=clean_env(), cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY_RE.search(self.stderr())
            if match and os.path.exists(self.socket):
                self.port = int(match.group(2))
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"installed lanchatd exited with {self.proc.returncode}:"
                                     f"\n{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"installed lanchatd did not start in {timeout} s:\n"
                             f"{self.stderr()}")

    def stderr(self) -> str:
        try:
            return Path(self.errpath).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run([self.bindir / "lanchat", "--socket", self.socket, *args], input=input,
                   timeout=30, cwd=self.workdir)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode


def check_installed_commands(bindir: Path) -> None:
    """What every install must give: both commands, their version, a working pair."""
    for cmd in ("lanchatd", "lanchat"):
        out = ok(run([bindir / cmd, "--version"]))
        assert out.strip() == f"{cmd} {VERSION}"

    # The package imported is the installed one, not this checkout.
    where = ok(run([bindir / "python", "-c", "import lanchat; print(lanchat.__file__)"],
                   cwd=bindir.parent))
    assert Path(where.strip()).resolve().is_relative_to(bindir.parent.resolve()), where

    workdir = short_tmpdir("lc-pkg-")
    daemon = InstalledDaemon(bindir, workdir)
    try:
        daemon.start()
        status = json.loads(ok(daemon.cli("status", "--json")))
        assert status["version"] == VERSION
        assert status["port"] == daemon.port
        assert status["nick"] == "packager"
        assert status["discovery"] is False

        sent = json.loads(ok(daemon.cli("send", "--json", "hello from the wheel")))
        assert sent["text"] == "hello from the wheel"
        ok(daemon.cli("send", "-", input="a build log line\n"))
        texts = [json.loads(line)["text"]
                 for line in ok(daemon.cli("history", "--json")).splitlines() if line.strip()]
        assert texts == ["hello from the wheel", "a build log line"]
        plain = ok(daemon.cli("history"))
        assert "packager: hello from the wheel" in plain

        # The hub answers on the port it announced, as `nc 127.0.0.1 PORT` would see.
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as conn:
            conn.settimeout(5)
            greeting = b""
            deadline = time.monotonic() + 5
            while b"\n" not in greeting and time.monotonic() < deadline:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                greeting += chunk
        assert greeting.startswith(b"* lanchat hub "), greeting
    finally:
        status_code = daemon.stop()
        err = daemon.stderr()
        shutil.rmtree(workdir, ignore_errors=True)
    assert status_code == 0, f"installed lanchatd exited {status_code} on SIGTERM:\n{err}"


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = Path(short_tmpdir("lc-pk-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def src(scratch: Path) -> Path:
    return source_copy(scratch / "src")


@pytest.fixture(scope="module")
def wheel(src: Path, scratch: Path) -> Path:
    return build_wheel(src, scratch / "dist")


@pytest.fixture(scope="module")
def wheel_bin(wheel: Path, scratch: Path) -> Path:
    """bin/ of a fresh venv with the wheel (and zeroconf) installed."""
    bindir = make_venv(scratch / "wheel-venv")
    pip_install(bindir, wheel)
    return bindir


# -- tests ---------------------------------------------------------------------------------

def test_version_lives_in_one_place() -> None:
    """pyproject reads the version from lanchat/__init__.py; nothing else states it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "lanchat.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[.-]?\w+)?", VERSION)
    stated = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "lanchat").glob("*.py"))
              if re.search(rf"""["']{re.escape(VERSION)}["']""", p.read_text())]
    assert stated == ["lanchat/__init__.py"]


def test_wheel_holds_the_package_the_commands_and_the_man_pages(wheel: Path) -> None:
    assert wheel.name == f"lanchat-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"lanchat-{VERSION}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    modules = {p.name for p in (ROOT / "lanchat").glob("*.py")}
    assert {f"lanchat/{m}" for m in modules} <= names
    for page in MAN_PAGES.values():
        assert f"lanchat-{VERSION}.data/data/share/man/{page}" in names
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "Requires-Dist: zeroconf" in metadata
    assert "lanchat = lanchat.cli:main" in entry_points
    assert "lanchatd = lanchat.daemon:main" in entry_points


def test_installed_wheel_gives_working_commands(wheel_bin: Path) -> None:
    check_installed_commands(wheel_bin)


def test_installed_completion_is_valid_bash(wheel_bin: Path) -> None:
    script = ok(run([wheel_bin / "lanchat", "completion", "bash"]))
    assert "complete -F _lanchat lanchat" in script
    bash = shutil.which("bash")
    assert bash is not None
    syntax = run([bash, "-n"], input=script)
    assert syntax.returncode == 0 and not syntax.stderr, syntax.stderr


def test_man_pages_are_installed_where_man_finds_them(wheel_bin: Path) -> None:
    mandir = wheel_bin.parent / "share" / "man"
    for page in MAN_PAGES.values():
        installed = mandir / page
        assert installed.is_file(), f"{page} missing under {mandir}"
        assert installed.read_bytes() == (ROOT / "man" / Path(page).name).read_bytes()
    man = require_tool("man", "man-db")
    # With no MANPATH, man-db derives the search path from PATH (bin -> ../share/man).
    env = clean_env(PATH=f"{wheel_bin}{os.pathsep}/usr/bin{os.pathsep}/bin")
    for name, page in MAN_PAGES.items():
        found = ok(run([man, "-w", name], env=env)).strip()
        assert Path(found).resolve() == (mandir / page).resolve(), found


def test_pip_install_source_gives_working_commands(src: Path, scratch: Path) -> None:
    bindir = make_venv(scratch / "src-venv")
    pip_install(bindir, src)  # `pip install .`, not editable
    check_installed_commands(bindir)
    mandir = bindir.parent / "share" / "man"
    assert all((mandir / page).is_file() for page in MAN_PAGES.values())
