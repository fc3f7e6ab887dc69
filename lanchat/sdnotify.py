"""systemd's notify protocol (sd_notify(3)) in a few lines of socket code, no dependency.

``lanchatd`` runs as ``Type=notify``: it sends ``READY=1`` once the hub, the
control socket and discovery are up, ``WATCHDOG=1`` from its supervision loop
(at :func:`watchdog_interval`), ``RELOADING=1``/``READY=1`` around a SIGHUP
reload, and ``STOPPING=1`` when shutdown begins.  Outside systemd
(``$NOTIFY_SOCKET`` unset) every call is a cheap no-op.

The protocol: one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named
by ``$NOTIFY_SOCKET``; a leading ``@`` names a socket in the abstract namespace
(systemd's own ``notify-selfcontained-example.py`` does the same).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(state: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=listening on :7654"``) to systemd.

    Returns True if the datagram was sent, False when there is no notify socket
    (not under systemd, or an address family we do not speak such as vsock) or
    the send failed.  Never raises: a service must not die because its manager
    went away; the failure is logged at debug level.  Thread-safe (one socket
    per call; ``NotifyAccess=main`` accepts any thread of the main process).
    """
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        if addr:
            log.debug("NOTIFY_SOCKET %r: unsupported address, not notifying", addr)
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.debug("sd_notify %r to %s failed: %s", state.split("\n", 1)[0], addr, exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is armed for us.

    systemd sets ``$WATCHDOG_USEC`` (the timeout) and ``$WATCHDOG_PID`` (whom it
    is for; ``pid`` defaults to ``os.getpid()``).  We ping at half the timeout,
    as sd_watchdog_enabled(3) recommends.
    """
    usec, owner = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        timeout = int(usec)
    except ValueError:
        log.debug("WATCHDOG_USEC %r is not an integer; watchdog off", usec)
        return None
    if timeout <= 0:
        return None
    return timeout / 2e6
