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
  same working commands;
* ``scripts/install`` (run from a copy of the checkout, in a throwaway ``HOME``
  with its own ``XDG_*`` directories) puts the commands, man pages, bash
  completion and user unit where it says, each works where it is (``man``
  finds the pages, ``systemd-analyze --user verify`` finds and accepts the
  unit, the completion is what the parsers say), the installed daemon and CLI
  find each other by a user daemon's default paths -- and the real ``HOME`` is
  left as it was.

Installing needs the package index configured for pip (for zeroconf and, for
the isolated build, setuptools), as ``scripts/test`` does.  Every process
started here is stopped, and every directory removed, pass or fail.
"""

from __future__ import annotations

import ast
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
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_tool

import lanchat
from lanchat import cli

ROOT = Path(__file__).resolve().parent.parent
VERSION = lanchat.__version__
READY_RE = re.compile(r"listening on (\S+):(\d+)")

#: Man pages and the section directory each must be installed in.
MAN_PAGES = {
    "lanchat": "man1/lanchat.1",
    "lanchatd": "man8/lanchatd.8",
    "lanchatd.toml": "man5/lanchatd.toml.5",
    "lanchat-protocol": "man7/lanchat-protocol.7",
    "lanchat-security": "man7/lanchat-security.7",
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


def source_copy(dest: Path, *more: str) -> Path:
    """Copy what a build reads (pyproject, README, package, man pages), and the
    directories ``more``, to ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "HACKING.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in ("lanchat", "man", *more):
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
    """The installed ``lanchatd`` on 127.0.0.1, port 0, discovery off; always stopped.

    Its socket and state live in ``workdir``, given on the command line; or, with
    ``user_env``, they are a user daemon's defaults in that environment (``$XDG_RUNTIME_DIR``,
    ``$XDG_STATE_HOME``) and neither ``lanchatd`` nor ``lanchat`` is told where.
    """

    def __init__(self, bindir: Path, workdir: str,
                 user_env: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.env = user_env or clean_env()
        self.paths: list[str] = []
        if user_env is None:
            self.socket = os.path.join(workdir, "c.sock")
            self.state_dir = os.path.join(workdir, "state")
            self.paths = ["--state-dir", self.state_dir, "--socket", self.socket]
        else:
            self.socket = os.path.join(user_env["XDG_RUNTIME_DIR"], "lanchat", "control.sock")
            self.state_dir = os.path.join(user_env["XDG_STATE_HOME"], "lanchat")
        self.errpath = os.path.join(workdir, "lanchatd.err")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.workdir = workdir

    def start(self, timeout: float = 20.0) -> None:
        cmd = [str(self.bindir / "lanchatd"), "--no-discovery", "--port", "0",
               "--bind", "127.0.0.1", *self.paths, "--nick", "packager"]
        with open(self.errpath, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env=self.env, cwd=self.workdir)
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
        where = ["--socket", self.socket] if self.paths else []
        return run([self.bindir / "lanchat", *where, *args], input=input, timeout=30,
                   cwd=self.workdir, env=self.env)

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


def check_installed_commands(bindir: Path, *, venv: Path | None = None,
                             user_env: dict[str, str] | None = None) -> None:
    """What every install must give: both commands, their version, a working pair.

    ``bindir`` holds the commands, ``venv`` (default: ``bindir``'s parent) the package;
    with ``user_env`` the commands run in that environment and find each other by a user
    daemon's default paths (see :class:`InstalledDaemon`).
    """
    venv = venv or bindir.parent
    env = user_env or clean_env()
    for cmd in ("lanchatd", "lanchat"):
        out = ok(run([bindir / cmd, "--version"], env=env))
        assert out.strip() == f"{cmd} {VERSION}"

    # The package imported is the installed one, not this checkout.
    where = ok(run([venv / "bin" / "python", "-c", "import lanchat; print(lanchat.__file__)"],
                   cwd=venv, env=env))
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve()), where

    workdir = short_tmpdir("lc-pkg-")
    daemon = InstalledDaemon(bindir, workdir, user_env)
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
        assert os.path.isfile(os.path.join(daemon.state_dir, "history.db"))
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


# -- scripts/install, for a user, in a throwaway HOME -----------------------------------------

def pip_config_env() -> dict[str, str]:
    """pip's settings here (its config files and ``PIP_*`` variables) as ``PIP_*`` variables.

    A throwaway ``HOME`` hides the user's pip.conf (an index, a proxy, a certificate);
    carried over this way, ``scripts/install`` reaches the same index as the rest of the
    suite, and reads nothing from the real ``HOME`` itself.
    """
    env: dict[str, str] = {}
    for line in ok(run([sys.executable, "-m", "pip", "config", "list"])).splitlines():
        key, sep, value = line.partition("=")
        if sep and "." in key:
            name = key.split(".", 1)[1]
            env["PIP_" + name.upper().replace("-", "_")] = str(ast.literal_eval(value))
    return env


def user_install_targets(env: dict[str, str]) -> list[Path]:
    """What ``scripts/install`` writes (or a user daemon keeps) for the user of ``env``."""
    home = Path(env["HOME"])
    data = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
    conf = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    state = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state")
    paths = [home / ".local" / "bin" / "lanchat", home / ".local" / "bin" / "lanchatd",
             data / "lanchat", data / "bash-completion" / "completions" / "lanchat",
             data / "bash-completion" / "completions" / "lanchatd",
             conf / "systemd" / "user" / "lanchatd.service", state / "lanchat"]
    paths += [data / "man" / page for page in MAN_PAGES.values()]
    if env.get("XDG_RUNTIME_DIR"):
        paths.append(Path(env["XDG_RUNTIME_DIR"]) / "lanchat")
    return paths


def snapshot(paths: list[Path]) -> dict[str, int | None]:
    """Each path's modification time (ns), None where nothing exists."""
    out: dict[str, int | None] = {}
    for path in paths:
        try:
            out[str(path)] = path.lstat().st_mtime_ns
        except FileNotFoundError:
            out[str(path)] = None
    return out


@dataclass
class UserInstall:
    """A finished ``scripts/install`` run and where it should have put things."""

    env: dict[str, str]           # the throwaway user's environment
    home: Path
    data: Path                    # $XDG_DATA_HOME's default, ~/.local/share
    conf: Path                    # $XDG_CONFIG_HOME, set to ~/cfg
    venv: Path
    bindir: Path                  # ~/.local/bin
    output: str
    seconds: float
    real_home: tuple[dict[str, int | None], dict[str, int | None]]  # before, after


@pytest.fixture(scope="module")
def user_install(scratch: Path) -> UserInstall:
    """``scripts/install`` run for real by a user whose ``HOME`` is a fresh directory.

    ``XDG_DATA_HOME`` is unset (so its default, ``~/.local/share``, is what is tested) and
    the other ``XDG_*`` directories point inside that ``HOME``; the script runs from a copy
    of the checkout, because pip builds in the source tree (``build/``, ``*.egg-info``).
    """
    src = source_copy(scratch / "install-src", "scripts", "systemd")
    home = scratch / "home"
    home.mkdir()
    (home / "run").mkdir(mode=0o700)
    env = clean_env(HOME=str(home), XDG_CONFIG_HOME=str(home / "cfg"),
                    XDG_STATE_HOME=str(home / "state"), XDG_CACHE_HOME=str(home / "cache"),
                    XDG_RUNTIME_DIR=str(home / "run"), **pip_config_env())
    for name in ("XDG_DATA_HOME", "DBUS_SESSION_BUS_ADDRESS", "BASH_COMPLETION_USER_DIR"):
        env.pop(name, None)
    real = user_install_targets(clean_env())
    before = snapshot(real)
    started = time.monotonic()
    proc = run(["bash", src / "scripts" / "install"], env=env, cwd=home,
               timeout=INSTALL_TIMEOUT_S)
    seconds = time.monotonic() - started
    output = ok(proc)
    print(f"scripts/install took {seconds:.1f} s")
    data = home / ".local" / "share"
    return UserInstall(env=env, home=home, data=data, conf=home / "cfg",
                       venv=data / "lanchat" / "venv", bindir=home / ".local" / "bin",
                       output=output + proc.stderr, seconds=seconds,
                       real_home=(before, snapshot(real)))


def test_install_script_leaves_the_real_home_alone(user_install: UserInstall) -> None:
    before, after = user_install.real_home
    assert after == before
    assert all(not p.startswith(str(user_install.home)) for p in before)


def test_install_script_gives_working_commands(user_install: UserInstall) -> None:
    u = user_install
    assert "install: done." in u.output, u.output
    for cmd in ("lanchat", "lanchatd"):
        link = u.bindir / cmd
        assert link.is_symlink() and link.resolve() == (u.venv / "bin" / cmd).resolve()
    help_text = ok(run([u.bindir / "lanchat", "--help"], env=u.env, cwd=u.home))
    (sub,) = [a for a in cli.build_parser()._actions
              if isinstance(a, cli.argparse._SubParsersAction)]
    assert all(name in help_text for name in sub.choices), help_text
    # With no flags, the installed daemon's configuration is a user daemon's, in this HOME.
    checked = ok(run([u.bindir / "lanchatd", "--check-config"], env=u.env, cwd=u.home))
    assert f'state_dir = "{u.home}/state/lanchat"' in checked, checked
    assert f'socket = "{u.home}/run/lanchat/control.sock"' in checked, checked


def test_install_script_puts_man_pages_where_man_finds_them(user_install: UserInstall) -> None:
    u = user_install
    mandir = u.data / "man"
    for page in MAN_PAGES.values():
        assert (mandir / page).read_bytes() == (ROOT / "man" / Path(page).name).read_bytes()
    man = require_tool("man", "man-db")
    # As the user has it once ~/.local/bin is on PATH: man-db maps it to ~/.local/share/man.
    env = {**u.env, "PATH": f"{u.bindir}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    for name, page in MAN_PAGES.items():
        found = ok(run([man, "-w", name], env=env, cwd=u.home)).strip()
        assert Path(found) == mandir / page, found
    shown = ok(run([man, "-P", "cat", "lanchat"], env={**env, "MANWIDTH": "80"}, cwd=u.home))
    assert "lanchat completion bash" in shown


def test_install_script_installs_the_completion_the_parsers_make(
        user_install: UserInstall) -> None:
    compdir = user_install.data / "bash-completion" / "completions"
    # Generated at install time by the installed lanchat: what this checkout's parsers say.
    assert (compdir / "lanchat").read_text() == cli.completion_script()
    assert os.readlink(compdir / "lanchatd") == "lanchat"  # bash looks it up by command name
    listed = ok(run(["bash", "--norc", "-c", f'source "{compdir}/lanchatd" && complete -p'],
                    env=user_install.env))
    assert "complete -F _lanchat lanchat\n" in listed
    assert "complete -F _lanchatd lanchatd\n" in listed


def test_install_script_installs_a_valid_user_unit(user_install: UserInstall) -> None:
    u = user_install
    unit = u.conf / "systemd" / "user" / "lanchatd.service"
    expected = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={u.venv}/bin/lanchatd",
                      (ROOT / "systemd" / "user" / "lanchatd.service").read_text())
    assert unit.read_text() == expected
    analyze = require_tool("systemd-analyze", "systemd")
    # By name: systemd --user finds it in $XDG_CONFIG_HOME/systemd/user, and its ExecStart=
    # is an executable that exists.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(u.home), "XDG_CONFIG_HOME": str(u.conf),
           "XDG_RUNTIME_DIR": u.env["XDG_RUNTIME_DIR"]}
    proc = run([analyze, "--user", "verify", "--man=no", "lanchatd.service"], env=env,
               cwd=u.home)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_installed_daemon_and_cli_find_each_other_in_the_users_home(
        user_install: UserInstall) -> None:
    check_installed_commands(user_install.bindir, venv=user_install.venv,
                             user_env=user_install.env)
