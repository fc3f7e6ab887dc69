"""The man pages: lint-clean, and in step with the code they document.

``mandoc -T lint -W warning`` (Debian package ``mandoc``) and ``groff -ww -z``
(package ``groff-base``) must both be silent.  ``groff`` exits 0 even when it
warns, so its stderr is what counts (without either tool the lint skips, or fails
under ``$CI``; ``scripts/test`` installs both).  The tables of the pages -- control
methods, error codes, config keys, daemon flags, CLI commands -- are compared
with the code's own tables, so neither can change alone.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

from lanchat import cli, config

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = ["lanchat.1", "lanchatd.8", "lanchatd.toml.5", "lanchat-protocol.7",
         "lanchat-security.7"]


def page(name: str) -> str:
    return (MAN / name).read_text(encoding="utf-8")


def section(text: str, start: str) -> str:
    """The lines of ``text`` from the macro line ``start`` to the next .Sh or .Ss."""
    lines = text.splitlines()
    i = lines.index(start)
    out = []
    for line in lines[i + 1:]:
        if line.startswith((".Sh ", ".Ss ")):
            break
        out.append(line)
    return "\n".join(out)


def test_every_page_exists_and_names_itself() -> None:
    for name in PAGES:
        text = page(name)
        title, sect = name.rsplit(".", 1)
        assert f"\n.Dt {title.upper()} {sect}\n" in text
        assert f"\n.Nm {title}\n" in text


@pytest.mark.parametrize("name", PAGES)
def test_mandoc_lint_is_clean(name: str) -> None:
    mandoc = require_tool("mandoc", "mandoc")
    proc = subprocess.run([mandoc, "-T", "lint", "-W", "warning", str(MAN / name)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""


@pytest.mark.parametrize("name", PAGES)
def test_groff_has_no_warnings(name: str) -> None:
    groff = require_tool("groff", "groff-base")
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([groff, "-mandoc", "-ww", "-z", str(MAN / name)],
                          capture_output=True, text=True, timeout=30, env=env, check=False)
    assert proc.returncode == 0
    assert proc.stderr == ""


def test_method_table_matches_the_control_route_table() -> None:
    from lanchat import control

    documented = re.findall(r"^\.It Ic (\S+)", section(page("lanchat-protocol.7"), ".Ss Methods"),
                            flags=re.M)
    assert documented == list(control.METHODS)


def test_error_table_matches_the_jsonrpc_codes() -> None:
    from lanchat import jsonrpc

    text = section(page("lanchat-protocol.7"), ".Ss Errors")
    documented = re.findall(r"^\.It Li (-?\d+)\n\.Ql (\S+?) :?$", text, flags=re.M)
    expected = [(str(row.code), row.name) for row in jsonrpc.ERROR_CODES]
    assert documented == expected
    for code in (-32700, -32600, -32601, -32602, -32603):
        assert f"\\{code}" in text or str(code) in text


def test_every_config_key_is_documented() -> None:
    text = page("lanchatd.toml.5")
    documented = set(re.findall(r"^\.It Ic (\w+) No \(", text, flags=re.M))
    assert documented == set(config.FILE_KEYS)
    reloadable = set(re.findall(r"^\.It Ic (\w+) No \([^)]*reloadable\)", text, flags=re.M))
    assert reloadable == set(config.RELOADABLE)


def test_the_example_config_is_valid() -> None:
    text = page("lanchatd.toml.5")
    example = section(text, ".Sh EXAMPLES").split(".Bd -literal -offset indent\n", 1)[1]
    example = example.split("\n.Ed", 1)[0]
    data = config.parse_toml(example.encode(), "example")
    cfg = config.build_config(file_data=data, file_path="example",
                              env={"HOME": "/h", "XDG_RUNTIME_DIR": "/run/user/1"}, flags={})
    assert cfg.peers and cfg.max_age_days == 90


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


def test_daemon_flags_match_the_argument_parser() -> None:
    parser = argparse.ArgumentParser()
    config.add_daemon_arguments(parser)
    text = page("lanchatd.8")
    documented = {"--" + f.replace("\\-", "-")
                  for f in re.findall(r"^\.It Fl \\-(\S+)", text, flags=re.M)}
    documented |= {"--verbose"} if ".It Fl v , Fl \\-verbose" in text else set()
    assert documented == long_options(parser)


def test_cli_commands_match_the_cli_parser() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = section(page("lanchat.1"), ".Sh DESCRIPTION")
    documented = re.findall(r"^\.It Cm (\w+)", text, flags=re.M)
    assert sorted(documented) == sorted(sub.choices)
