"""systemd socket activation (sd_listen_fds(3)) of the control socket, no dependency.

With ``lanchatd.socket`` enabled, systemd (PID 1) binds the control socket
itself, listens on it, and starts ``lanchatd`` with the listening socket as
file descriptor 3 and three variables:

- ``$LISTEN_PID``: the process the descriptors are for.  Anyone else (a
  process that merely inherited the environment) must ignore them.
- ``$LISTEN_FDS``: how many descriptors, numbered from 3
  (:data:`SD_LISTEN_FDS_START`).
- ``$LISTEN_FDNAMES``: their names, colon-separated (``FileDescriptorName=``).

lanchatd serves the descriptor named ``control`` and closes any other, with a
log line.  Like ``sd_listen_fds(unset_environment=1)`` it removes the three
variables in every case, and it sets ``FD_CLOEXEC`` on every descriptor it was
passed, so nothing it might start believes they are meant for it.  The
``control`` descriptor must be an ``AF_UNIX`` ``SOCK_STREAM`` socket in the
listening state (``ListenStream=`` with a path); anything else is refused
with one line saying what it is, since a restart would not fix the unit.

What it buys: systemd holds the socket while lanchatd restarts, so a client
that connects meanwhile waits in the listen backlog and is answered by the
next daemon, instead of being refused.  The socket's file, owner, group and
mode are systemd's (``SocketMode=``, ``SocketGroup=``): lanchatd never binds,
chmods or removes it.  :func:`parse_listen_fds` is the pure reading of the
environment; :func:`take_control_socket` does the descriptor work.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping

from lanchat.errors import ConfigError

log = logging.getLogger(__name__)

#: The first passed descriptor (sd-daemon.h): 0-2 are stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3

#: The name lanchatd.socket gives the control socket (``FileDescriptorName=control``).
CONTROL_NAME = "control"

#: The variables of the protocol; all three are removed from the environment.
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

#: Most descriptors we accept being handed.  systemd passes one per ``Listen*=``
#: line of the socket units of the service; far more is not a unit of ours, and
#: the bound keeps a garbled ``$LISTEN_FDS`` from costing a huge list.
MAX_LISTEN_FDS = 1024

#: systemd's name for a descriptor when ``$LISTEN_FDNAMES`` is not set.
UNKNOWN_NAME = "unknown"


def _decimal(text: str) -> int | None:
    """A non-negative decimal integer in ASCII digits, or None."""
    return int(text) if text.isascii() and text.isdigit() else None


def parse_listen_fds(env: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The ``(fd, name)`` pairs systemd passed to process ``pid``, in order.

    Pure: reads only ``env``.  Returns ``[]`` when nothing is for ``pid``:
    ``$LISTEN_PID`` unset or another process's, ``$LISTEN_FDS`` unset or 0
    (as sd_listen_fds(3) does).  Names come from ``$LISTEN_FDNAMES``, one per
    descriptor, else are ``"unknown"``.  Raises :class:`ValueError`, naming
    the variable, when the variables are for ``pid`` but malformed.
    """
    owner = env.get("LISTEN_PID", "")
    if not owner:
        return []
    owner_pid = _decimal(owner)
    if owner_pid is None or owner_pid == 0:
        raise ValueError(f"$LISTEN_PID={owner!r} is not a process id")
    if owner_pid != pid:
        return []
    count = env.get("LISTEN_FDS", "")
    if not count:
        return []
    n = _decimal(count)
    if n is None:
        raise ValueError(f"$LISTEN_FDS={count!r} is not a number of file descriptors")
    if n > MAX_LISTEN_FDS:
        raise ValueError(f"$LISTEN_FDS={n}: more than {MAX_LISTEN_FDS} file descriptors")
    if n == 0:
        return []
    names_var = env.get("LISTEN_FDNAMES")
    names = [UNKNOWN_NAME] * n if names_var is None else names_var.split(":")
    if len(names) != n:
        raise ValueError(f"$LISTEN_FDNAMES={names_var!r} has {len(names)} name(s) "
                         f"for $LISTEN_FDS={n} file descriptor(s)")
    return [(SD_LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def take_control_socket(env: MutableMapping[str, str] | None = None,
                        pid: int | None = None) -> socket.socket | None:
    """The listening control socket systemd passed us, or None when it passed none.

    ``env`` defaults to ``os.environ`` and ``pid`` to ``os.getpid()``.  Removes
    the three variables from ``env`` whatever they said; sets ``FD_CLOEXEC``
    on every passed descriptor; closes each one not named ``control`` (or a
    second ``control``), logging it.  The caller owns the returned socket.

    Raises :class:`~lanchat.errors.ConfigError` (one line) when the variables
    are malformed, a passed descriptor is not open, or the ``control`` one is
    not an ``AF_UNIX`` ``SOCK_STREAM`` socket that is listening.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    owner = env.get("LISTEN_PID", "")
    try:
        fds = parse_listen_fds(env, pid)
    except ValueError as exc:
        raise ConfigError(f"socket activation: {exc}") from None
    finally:
        for var in LISTEN_VARS:
            env.pop(var, None)
    if not fds:
        if owner:
            log.info("socket activation: no file descriptors for this process (pid %d, "
                     "$LISTEN_PID=%s); binding the control socket", pid, owner)
        return None
    for fd, name in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ConfigError(f"socket activation: fd {fd} ({name!r}) of $LISTEN_FDS="
                              f"{len(fds)} is not open: {exc.strerror or exc}") from None
    control: int | None = None
    for fd, name in fds:
        if name == CONTROL_NAME and control is None:
            control = fd
            continue
        log.warning("socket activation: closing fd %d named %r: lanchatd uses only the "
                    "socket named %r", fd, name, CONTROL_NAME)
        os.close(fd)
    if control is None:
        log.warning("socket activation: no file descriptor is named %r "
                    "(FileDescriptorName=%s in lanchatd.socket); binding the control socket",
                    CONTROL_NAME, CONTROL_NAME)
        return None
    sock = _listening_unix_stream(control)
    log.info("socket activation: serving the control socket passed as fd %d (%s)",
             control, sock.getsockname() or "unnamed")
    return sock


def _listening_unix_stream(fd: int) -> socket.socket:
    """Wrap ``fd`` as a socket if it is a listening AF_UNIX stream socket; else close it, raise."""
    where = f"socket activation: fd {fd} named {CONTROL_NAME!r}"
    fix = "lanchatd.socket needs ListenStream=/path/of/control.sock"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:  # pragma: no cover - set_inheritable already proved it open
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        os.close(fd)
        raise ConfigError(f"{where} is not a socket ({_file_kind(mode)}); {fix}")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"{where}: cannot use it as a socket: {exc.strerror or exc}; "
                          f"{fix}") from None
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    problem = None
    if sock.family != socket.AF_UNIX:
        problem = f"is an {_name(socket.AddressFamily, sock.family)} socket, not AF_UNIX"
    elif kind != socket.SOCK_STREAM:
        problem = f"is a {_name(socket.SocketKind, kind)} socket, not SOCK_STREAM"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "is not listening (SO_ACCEPTCONN is 0)"
    if problem is not None:
        sock.close()
        raise ConfigError(f"{where} {problem}; {fix}")
    return sock


def _name(enum: type[socket.AddressFamily] | type[socket.SocketKind], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a socket"
