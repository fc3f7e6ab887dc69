"""The pin files on disk: ``known_hubs`` (the user's) and ``known_peers`` (the daemon's).

``known_hubs`` lives in the user's state directory (``$XDG_STATE_HOME/lanchat``, else
``~/.local/state/lanchat``), like SSH's ``~/.ssh/known_hosts``; ``known_peers`` in the
daemon's state directory, next to ``node.key``.  The format and its rules are
:mod:`lanchat.pins`'.

A pin file is not secret, but whoever can write it decides which keys are trusted: one
that others may write, that is not ours, or is not a regular file (a symbolic link could
point anywhere) is refused with a message saying what to do, never repaired.  Writes are
atomic: a ``mkstemp`` file in the same directory (mode 0600 whatever the umask), fsynced,
renamed over the old file, the directory fsynced; a reader sees the old pins or the new,
never half of a file, even after a power cut.  Read-modify-write is serialized between
processes (two ``lanchat connect`` at once) by ``flock`` on a ``.lock`` file beside it.

Building block: an adapter (files) that the hub client and the daemon may import.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator, Mapping

from lanchat import privfile
from lanchat.config import default_state_dir
from lanchat.errors import ConfigError
from lanchat.limits import MAX_PIN_FILE_BYTES
from lanchat.pins import PinFileError, Pins

__all__ = ["KNOWN_HUBS", "KNOWN_PEERS", "known_hubs_path", "load", "save", "update"]

KNOWN_HUBS = "known_hubs"
KNOWN_PEERS = "known_peers"


def known_hubs_path(env: Mapping[str, str]) -> str:
    """The user's ``known_hubs``: ``$XDG_STATE_HOME/lanchat/known_hubs`` (or under
    ``~/.local/state``).  Raises :class:`PinFileError` when neither variable helps."""
    user_env = {k: v for k, v in env.items() if k != "STATE_DIRECTORY"}  # a unit's, not ours
    try:
        return os.path.join(default_state_dir(user_env, system=False), KNOWN_HUBS)
    except ConfigError as exc:
        raise PinFileError(f"cannot place known_hubs: {exc}") from None


_RULES = privfile.Rules(
    error=PinFileError, what="a pin file", forbidden=0o022,
    owner_why=": whoever owns it decides whom you trust",
    mode_why="others may change which keys you trust. Check its pins, then "
             "`chmod 600 {path}`")


def load(path: str) -> Pins:
    """The pins in ``path`` (none if it does not exist); raises :class:`PinFileError`."""
    data = privfile.read_private(path, _RULES, MAX_PIN_FILE_BYTES)
    if data is None:
        return Pins()
    if len(data) > MAX_PIN_FILE_BYTES:
        raise PinFileError(f"{path} is longer than {MAX_PIN_FILE_BYTES} bytes")
    return Pins.parse(data, path)


def save(path: str, pins: Pins, header: str) -> None:
    """Write ``pins`` to ``path`` atomically, mode 0600; creates the directory (0700)."""
    directory = os.path.dirname(path) or "."
    data = pins.format(header)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with privfile.durable_temp(directory, f".{os.path.basename(path)}.", data) as tmp:
            os.rename(tmp, path)
        privfile.fsync_dir(directory)
    except OSError as exc:
        raise PinFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def update(path: str, change: Callable[[Pins], Pins], header: str) -> Pins:
    """Load, ``change``, save if it changed -- all under the file's lock; the new pins."""
    with _locked(path):
        old = load(path)
        new = change(old)
        if new != old:
            save(path, new, header)
        return new


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise PinFileError(f"cannot lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
