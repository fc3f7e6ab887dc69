"""Bash completion generated from the argument parsers, so it cannot drift from them.

``lanchat completion bash`` prints what :func:`bash_script` makes of the
``lanchat`` and ``lanchatd`` parsers; ``scripts/install`` writes that output
once, at install time, so pressing TAB runs a few ``case`` statements in bash
and never starts Python.  Adding a subcommand or an option to a parser is
enough for it to complete.

What the parsers say and how it completes:

* subcommands (an ``add_subparsers`` action) complete where a command goes;
  a subcommand that hands every word after it to another parser (``lanchat
  connect`` -> the hub client's) is completed from that parser (``delegated``);
* every option string not hidden with ``help=SUPPRESS`` completes after ``-``,
  and where no positional argument is expected;
* after an option that takes a value: its ``choices``; files when its metavar
  is ``PATH`` or ``FILE``; directories when it is ``DIR``; otherwise nothing
  (a nickname or a number cannot be guessed);
* a positional argument with ``choices`` completes them.

Pure: argparse in, text out (no I/O).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Metavars whose values are paths: complete file names, or directory names.
FILE_METAVARS = frozenset({"PATH", "FILE"})
DIR_METAVARS = frozenset({"DIR"})

#: What may appear in a word list: bash splits ``compgen -W`` words on blanks and
#: expands them, so anything else is refused rather than quoted.
_SAFE_WORD = re.compile(r"[A-Za-z0-9_.:+-]+")
_SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

FILES = "files"
DIRS = "dirs"


@dataclass
class Words:
    """What one parser (a program, or one of its subcommands) completes."""

    options: list[str] = field(default_factory=list)
    #: option string -> FILES, DIRS, a list of choices, or None (a free value).
    values: dict[str, str | list[str] | None] = field(default_factory=dict)
    positional_choices: list[str] = field(default_factory=list)
    has_positionals: bool = False
    subcommands: dict[str, Words] = field(default_factory=dict)


def _safe(words: list[str], what: str) -> list[str]:
    for word in words:
        if not _SAFE_WORD.fullmatch(word):
            raise ValueError(f"{what}: {word!r} cannot go in a bash word list")
    return words


def _value_kind(action: argparse.Action) -> str | list[str] | None:
    if action.choices is not None:
        return _safe([str(c) for c in action.choices], f"choices of {action.dest}")
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if metavar in FILE_METAVARS:
        return FILES
    if metavar in DIR_METAVARS:
        return DIRS
    return None


def words_of(parser: argparse.ArgumentParser,
             delegated: Mapping[str, argparse.ArgumentParser] | None = None) -> Words:
    """The words ``parser`` accepts; ``delegated`` replaces some subcommands' parsers."""
    delegated = delegated or {}
    words = Words()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words.subcommands[name] = words_of(delegated.get(name, sub))
            _safe(list(words.subcommands), "subcommand")
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            words.options += _safe(list(action.option_strings), "option")
            if action.nargs != 0:  # store_true, count, help, version... take no value
                for opt in action.option_strings:
                    words.values[opt] = _value_kind(action)
        else:
            words.has_positionals = True
            if action.choices is not None:
                words.positional_choices += _safe([str(c) for c in action.choices],
                                                  f"choices of {action.dest}")
    unknown = set(delegated) - set(words.subcommands)
    if unknown:
        raise ValueError(f"delegated subcommands {sorted(unknown)} are not subcommands")
    return words


def _compgen(flag: str, words: str = "") -> str:
    if flag == "-W":
        return f"mapfile -t COMPREPLY < <(compgen -W '{words}' -- \"$cur\")"
    return f"mapfile -t COMPREPLY < <(compgen {flag} -- \"$cur\")"


def _context(words: Words, indent: str) -> list[str]:
    """Bash lines completing ``$cur`` (after ``$prev``) where ``words`` apply."""
    out: list[str] = []
    by_reply: dict[str, list[str]] = {}
    for opt, kind in words.values.items():
        if kind == FILES:
            reply = "compopt -o filenames 2>/dev/null; " + _compgen("-f")
        elif kind == DIRS:
            reply = "compopt -o filenames 2>/dev/null; " + _compgen("-d")
        elif isinstance(kind, list):
            reply = _compgen("-W", " ".join(kind))
        else:
            reply = ""
        by_reply.setdefault(reply, []).append(opt)
    if by_reply:
        out.append(f"{indent}case $prev in")
        for reply, opts in by_reply.items():
            action = f"{reply}; return" if reply else "return"
            out.append(f"{indent}    {'|'.join(opts)}) {action} ;;")
        out.append(f"{indent}esac")
    options = " ".join(words.options)
    if words.subcommands:
        otherwise = " ".join(sorted(words.subcommands))
    elif words.positional_choices:
        otherwise = " ".join(words.positional_choices)
    elif not words.has_positionals:
        out.append(f"{indent}{_compgen('-W', options)}")  # nothing but options to offer
        return out
    else:
        otherwise = ""  # free text (a message, a host): nothing to offer
    out.append(f'{indent}if [[ $cur == -* ]]; then')
    out.append(f"{indent}    {_compgen('-W', options)}")
    if otherwise:
        out.append(f"{indent}else")
        out.append(f"{indent}    {_compgen('-W', otherwise)}")
    out.append(f"{indent}fi")
    return out


def bash_function(function: str, words: Words) -> str:
    """A completion function (for ``complete -F``) over ``words``."""
    if not _SAFE_NAME.fullmatch(function):
        raise ValueError(f"{function!r} is not a bash function name")
    lines = [
        f"{function}()",
        "{",
        '    local cur=${COMP_WORDS[COMP_CWORD]} prev=""'
        + (' cmd="" i' if words.subcommands else ""),
        "    COMPREPLY=()",
        "    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD-1]}",
        '    # bash splits "--opt=value" at the "=" (COMP_WORDBREAKS)',
        "    if [[ $cur == = ]]; then",
        '        cur=""',
        "    elif [[ $prev == = ]] && ((COMP_CWORD > 1)); then",
        "        prev=${COMP_WORDS[COMP_CWORD-2]}",
        "    fi",
    ]
    if words.subcommands:
        takes_value = "|".join(words.values) or "''"
        lines += [
            "    # the command: the first word that is neither an option nor an option's value",
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            "        case ${COMP_WORDS[i]} in",
            f"            {takes_value})",
            "                ((i += 1)); [[ ${COMP_WORDS[i]-} == = ]] && ((i += 1)) ;;",
            "            -*) ;;",
            '            *) cmd=${COMP_WORDS[i]}; break ;;',
            "        esac",
            "    done",
            "    case $cmd in",
            '        "")',
            *_context(words, " " * 12),
            "            ;;",
        ]
        for name, sub in words.subcommands.items():
            lines += [f"        {name})", *_context(sub, " " * 12), "            ;;"]
        lines += ["    esac"]
    else:
        lines += _context(words, " " * 4)
    lines += ["}"]
    return "\n".join(lines) + "\n"


def bash_script(programs: Mapping[str, Words], *, header: str = "") -> str:
    """One script completing every program in ``programs`` (command name -> its words).

    The function for ``lanchat`` is ``_lanchat``; for ``lanchatd``, ``_lanchatd``.
    """
    parts = ["# bash completion for " + " and ".join(programs)
             + "                -*- shell-script -*-\n"]
    parts += [f"# {line}\n" if line else "#\n" for line in header.splitlines()]
    for name, words in programs.items():
        _safe([name], "command")
        function = "_" + name.replace("-", "_")
        parts.append("\n" + bash_function(function, words))
        parts.append(f"complete -F {function} {name}\n")
    return "".join(parts)
