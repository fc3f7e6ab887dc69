"""The floors of STYLE.md, held by a test: pure code imports no I/O, the CLI stays thin."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lanchat"

#: Modules with no sockets, threads, sqlite, zeroconf, clock or environment.
PURE = {"errors", "limits", "fields", "model", "framing", "events", "render", "wire",
        "textmode", "commands", "jsonrpc", "config", "linkproto", "paths", "ratelimit",
        "presence", "auth", "completion", "feed", "sniff", "pins", "seal", "relay",
        "chatmodel", "handshake"}
#: What a pure module may never import.
IO_MODULES = {"socket", "threading", "sqlite3", "zeroconf", "select", "selectors",
              "subprocess", "asyncio", "ifaddr", "multiprocessing", "signal"}
#: Adapters: each owns one kind of I/O and imports only the pure floor (and the
#: building blocks: ``stream`` and ``lightthread`` of every connection, ``lineedit``
#: of the terminal the two interactive clients read from and print to, ``tlsid`` the TLS
#: contexts and key pinning of hub, links and hub client alike, ``pinfile`` the pin files
#: of the hub client and the daemon, ``privfile`` the careful reading and durable writing
#: of a private file that the key file and the pin files share).
ADAPTERS = {"stream", "lightthread", "store", "hub", "hubsession", "hubconn", "hubloop",
            "hubudp", "control", "client", "hubclient",
            "discovery", "links", "sdnotify", "sdlisten", "logsetup", "memtrim", "keyfile",
            "lineedit", "tlsid", "pinfile", "privfile"}
BUILDING_BLOCKS = {"stream", "lightthread", "lineedit", "tlsid", "pinfile", "privfile"}
#: The hub's parts, and which of them each may import: one way, from the listener down to
#: the session (which does no I/O of its own).
HUB_PARTS = {"hub": {"hubloop", "hubconn", "hubsession", "hubudp"},
             "hubloop": {"hubconn", "hubsession"}, "hubconn": {"hubsession"},
             "hubudp": {"hubsession"}, "hubsession": set()}
ENTRY_POINTS = {"daemon", "cli", "__main__"}
#: The full-screen chat client: above the adapters it reads from (the control-socket
#: client and the hub client), below the CLI that opens it; the only prompt_toolkit users.
SCREEN = {"chatsource", "chatscreen", "chatlog"}


def imports_of(name: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "lanchat":
                found.update(f"lanchat.{alias.name}" for alias in node.names
                             if not alias.name.startswith("__"))
    return found


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_floor() -> None:
    for name in modules():
        assert name in PURE | ADAPTERS | ENTRY_POINTS | SCREEN | {"router"}, \
            f"{name}: which floor?"


def test_the_screen_uses_the_clients_only() -> None:
    for name in sorted(SCREEN):
        inner = {m.split(".")[1] for m in imports_of(name) if m.startswith("lanchat.")}
        allowed = PURE | SCREEN | {"client", "hubclient"}
        assert inner <= allowed, f"lanchat.{name} imports lanchat.{inner - allowed}"


def test_only_the_screen_imports_prompt_toolkit() -> None:
    for name in modules():
        if any(m.split(".")[0] == "prompt_toolkit" for m in imports_of(name)):
            assert name in ("chatscreen", "chatlog"), f"lanchat.{name} imports prompt_toolkit"


def test_pure_floor_imports_no_io() -> None:
    for name in sorted(PURE):
        if not (PACKAGE / f"{name}.py").exists():
            continue
        bad = {m for m in imports_of(name) if m.split(".")[0] in IO_MODULES}
        assert not bad, f"lanchat.{name} is pure but imports {bad}"
        inner = {m.split(".")[1] for m in imports_of(name) if m.startswith("lanchat.")}
        assert inner <= PURE, f"lanchat.{name} is pure but imports lanchat.{inner - PURE}"


def test_adapters_import_only_the_pure_floor() -> None:
    for name in sorted(ADAPTERS):
        if not (PACKAGE / f"{name}.py").exists():
            continue
        inner = {m.split(".")[1] for m in imports_of(name) if m.startswith("lanchat.")}
        # `lanchat connect` with no host browses for hubs: hubclient imports discovery (lazily).
        allowed = (PURE | BUILDING_BLOCKS | HUB_PARTS.get(name, set())
                   | ({"discovery"} if name == "hubclient" else set()))
        assert inner <= allowed, f"lanchat.{name} imports lanchat.{inner - allowed}"


def test_nothing_imports_the_entry_points() -> None:
    for name in modules():
        if name in ENTRY_POINTS:
            continue
        inner = {m.split(".")[1] for m in imports_of(name) if m.startswith("lanchat.")}
        assert not inner & ENTRY_POINTS, f"lanchat.{name} imports an entry point"


def test_only_discovery_imports_zeroconf() -> None:
    for name in modules():
        if any(m.split(".")[0] == "zeroconf" for m in imports_of(name)):
            assert name == "discovery", f"lanchat.{name} imports zeroconf"


def test_cli_import_stays_light() -> None:
    code = ("import sys, lanchat.cli; "
            "print(' '.join(sorted(m for m in sys.modules if m in "
            "('zeroconf', 'sqlite3', 'asyncio', 'ifaddr', 'cryptography', 'lanchat.feed', "
            "'prompt_toolkit', 'lanchat.chatscreen', 'lanchat.chatsource', "
            "'lanchat.keyfile', 'lanchat.daemon', 'lanchat.store', "
            "'lanchat.router', 'lanchat.hub', 'lanchat.control', 'lanchat.discovery'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == ""
