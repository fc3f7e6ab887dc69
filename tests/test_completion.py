"""Bash completion, run in a real bash: every subcommand and option of the parsers completes.

The expected words are read from the parsers themselves (``lanchat``'s, walking its
subparsers, and ``lanchatd``'s), never from a second list, so a parser change that the
completion missed fails here.  Each case sources the script ``lanchat completion bash``
prints into ``bash --norc``, looks the function up with ``complete -p`` (so the
registration is tested too), sets ``COMP_WORDS``/``COMP_CWORD`` as readline would, calls it
and reads ``COMPREPLY``.  ``PATH`` points nowhere: completing must not run any program
(no Python start-up on TAB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanchat import cli, completion, config, hubclient

ROOT = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash") or "/bin/bash"

#: Sources the script ($1), finds the function `complete -p` registered for the command
#: ($2), calls it on the words ($2...) with the cursor at the end of the last one.
DRIVER = r"""
source "$1" || exit 90
shift
spec=$(complete -p "$1") || exit 91
func=${spec#*-F }
func=${func%% *}
COMP_WORDS=("$@")
COMP_CWORD=$(($# - 1))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
"$func" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def script() -> Iterator[Path]:
    """The completion script, written by the real ``lanchat completion bash``."""
    tmp = Path(tempfile.mkdtemp(prefix="lccomp-", dir="/tmp"))
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", "lanchat", "completion", "bash"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
                              check=False)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        path = tmp / "lanchat"
        path.write_text(proc.stdout)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def complete(script: Path, *words: str) -> list[str]:
    """COMPREPLY for the command line ``words`` (the last word is the one being completed)."""
    proc = subprocess.run([BASH, "--norc", "--noprofile", "-c", DRIVER, "bash", str(script),
                           *words], capture_output=True, text=True, timeout=20,
                          env={"PATH": "/nonexistent", "LC_ALL": "C"}, check=False)
    assert proc.returncode == 0, f"{words}: exit {proc.returncode}\n{proc.stderr}"
    assert proc.stderr == "", f"{words}: {proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line]


# -- what the parsers accept, read from the parsers ------------------------------------------

def options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions if action.help != argparse.SUPPRESS
            for opt in action.option_strings}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser; one that takes the rest of the line is the hub client's."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    out: dict[str, argparse.ArgumentParser] = {}
    for name, p in sub.choices.items():
        out[name] = p
        if any(a.nargs == argparse.REMAINDER for a in p._actions):
            assert name == "connect", f"{name} hands its words on: to which parser?"
            out[name] = hubclient.build_parser()  # cli.main passes all after `connect` to it
    return out


LANCHAT = cli.build_parser()
LANCHATD = config.daemon_parser()
SUBCOMMANDS = subcommands(LANCHAT)


def test_the_parsers_are_what_is_walked() -> None:
    # Guards the walk: it found the commands a user knows, and options of each kind.
    assert {"send", "tail", "history", "connect", "completion"} <= set(SUBCOMMANDS)
    assert {"--nick", "--udp", "--secret-file"} <= options(SUBCOMMANDS["connect"])
    assert {"--check-config", "--state-dir", "-v"} <= options(LANCHATD)


def test_every_subcommand_completes(script: Path) -> None:
    assert set(complete(script, "lanchat", "")) == set(SUBCOMMANDS)
    assert complete(script, "lanchat", "conn") == ["connect"]
    assert set(complete(script, "lanchat", "-")) == options(LANCHAT)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_option_of_each_subcommand_completes(script: Path, name: str) -> None:
    assert set(complete(script, "lanchat", name, "-")) == options(SUBCOMMANDS[name])
    longs = {o for o in options(SUBCOMMANDS[name]) if o.startswith("--")}
    assert set(complete(script, "lanchat", name, "--")) == longs


def test_every_lanchatd_option_completes(script: Path) -> None:
    assert set(complete(script, "lanchatd", "-")) == options(LANCHATD)
    assert set(complete(script, "lanchatd", "")) == options(LANCHATD)  # no positionals
    assert complete(script, "lanchatd", "--check") == ["--check-config"]


def test_connect_completes_the_hub_clients_options(script: Path) -> None:
    # What the old hand-written script missed: `lanchat connect --<TAB>` offered nothing.
    assert set(complete(script, "lanchat", "connect", "--")) == {
        "--help", "--nick", "--room", "--plain", "--udp", "--secret-file", "--no-tls",
        "--accept-key"} == {
        o for o in options(hubclient.build_parser()) if o.startswith("--")}
    # options the daemon-client commands take are not offered where connect rejects them
    assert complete(script, "lanchat", "connect", "--js") == []
    assert complete(script, "lanchat", "connect", "--udp", "--ro") == ["--room"]


def test_the_command_is_found_after_global_options_and_their_values(script: Path) -> None:
    assert complete(script, "lanchat", "--socket", "/x/send", "--json", "send", "--r") == [
        "--room"]
    # --timeout's value "tail" is not the command
    assert sorted(complete(script, "lanchat", "--timeout", "tail", "history", "--s")) == [
        "--since", "--socket"]
    # bash splits --socket=chat at "=" (COMP_WORDBREAKS): three words, and "chat" is a value
    assert sorted(complete(script, "lanchat", "--socket", "=", "chat", "send", "--t")) == [
        "--timeout", "--to"]
    assert complete(script, "lanchat", "--socket", "=", "chat", "--t") == ["--timeout"]


def test_values_complete_from_the_parser(script: Path) -> None:
    assert complete(script, "lanchat", "completion", "") == ["bash"]
    assert complete(script, "lanchat", "send", "--room", "") == []   # a room cannot be guessed
    assert complete(script, "lanchat", "send", "") == []             # the message is free text
    assert complete(script, "lanchat", "tail", "-n", "") == []


def test_paths_complete_as_files_and_directories(script: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lccomp-", dir="/tmp"))
    try:
        (tmp / "control.sock").touch()
        (tmp / "conf.toml").touch()
        (tmp / "cstate").mkdir()
        files = sorted(str(tmp / n) for n in ("conf.toml", "control.sock", "cstate"))
        assert sorted(complete(script, "lanchat", "--socket", f"{tmp}/c")) == files
        assert sorted(complete(script, "lanchat", "send", "--socket", f"{tmp}/c")) == files
        assert sorted(complete(script, "lanchatd", "--config", "=", f"{tmp}/c")) == files
        assert sorted(complete(script, "lanchatd", "--config", "=")) == sorted(
            complete(script, "lanchatd", "--config", ""))
        assert complete(script, "lanchatd", "--state-dir", f"{tmp}/c") == [str(tmp / "cstate")]
        assert sorted(complete(script, "lanchat", "connect", "--secret-file", f"{tmp}/con")) == [
            str(tmp / "conf.toml"), str(tmp / "control.sock")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_new_option_completes_without_touching_the_script(script: Path) -> None:
    # The point of generating: add an option or a subcommand, and it completes.
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub.choices["send"].add_argument("--urgent", action="store_true")
    extra = sub.add_parser("ping")
    extra.add_argument("--count", metavar="N")
    extra.add_argument("mode", choices=["once", "forever"])
    text = completion.bash_script({"lanchat": completion.words_of(parser)})
    path = script.parent / "generated"
    path.write_text(text)
    assert complete(path, "lanchat", "send", "--u") == ["--urgent"]
    assert complete(path, "lanchat", "pi") == ["ping"]
    assert complete(path, "lanchat", "ping", "--c") == ["--count"]
    assert complete(path, "lanchat", "ping", "--count", "") == []
    assert complete(path, "lanchat", "ping", "f") == ["forever"]


def test_words_bash_would_mangle_are_refused() -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--mode", choices=["a b", "c"])
    with pytest.raises(ValueError, match="cannot go in a bash word list"):
        completion.words_of(parser)
