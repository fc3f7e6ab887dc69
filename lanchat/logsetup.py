"""Logging for lanchatd: plain lines on a terminal, priority-prefixed lines for journald.

Under systemd, stderr is connected to the journal and systemd says so in
``$JOURNAL_STREAM`` (``DEVICE:INODE`` of that stream, systemd.exec(5)).  Then
we write no timestamp of our own (journald stamps every line) and prefix each
line with its syslog priority ``<N>`` (sd-daemon(3)), so ``journalctl -p
warning`` filters properly.  Elsewhere a line reads
``2026-11-21 12:00:00 lanchatd[1234] WARNING: message``.

``JOURNAL_STREAM`` is checked against stderr's own device and inode, as
systemd.exec(5) advises: a shell started from a service inherits the variable
while its stderr is a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

#: logging level -> syslog priority (sd-daemon(3)).
PRIORITIES = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class JournalFormatter(logging.Formatter):
    """``<N>message``: no time (journald adds it), priority for ``journalctl -p``.

    A multi-line message (a traceback) keeps its priority on every line, since
    journald treats each line as a record.
    """

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


def priority(levelno: int) -> int:
    """The syslog priority for a logging level (between levels, the more severe one)."""
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


def to_level(level: str | int) -> int:
    """``"info"`` / ``logging.INFO`` → ``logging.INFO``; raises ValueError on an unknown name."""
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def journal_stream(env: Mapping[str, str], stream: TextIO) -> bool:
    """True if ``stream`` is the journal stream systemd announced in ``$JOURNAL_STREAM``."""
    announced = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = announced.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):  # no fileno (a StringIO), bad numbers
        return False


_handler: logging.Handler | None = None  # guards against stacking handlers on reload


def setup_logging(
    level: str | int, *, env: Mapping[str, str] = os.environ, stream: TextIO | None = None,
    prog: str = "lanchatd",
) -> logging.Handler:
    """Send the root logger to ``stream`` (stderr) at ``level``; call again to change it.

    Returns the installed handler.  Safe to call again on SIGHUP (the previous
    handler installed by this function is replaced, never stacked).  Call it
    from the main thread.
    """
    global _handler
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    if journal_stream(env, out):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {prog}[%(process)d] %(levelname)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        ))
    # Neither format shows thread names, and asking for one in a hub reader (a
    # LightThread, not a threading.Thread) would make threading invent a stand-in.
    logging.logThreads = False
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(to_level(level))
    _handler = handler
    return handler


def set_level(level: str | int) -> None:
    """Change the level at run time (SIGHUP with a new ``log_level``)."""
    logging.getLogger().setLevel(to_level(level))
