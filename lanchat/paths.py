"""Where the CLI looks for the daemon's control socket.  Pure (the file check is injected).

Order (DESIGN.md, conventions.md §6.4), first match wins:

1. an explicit ``--socket PATH``;
2. ``$LANCHAT_SOCKET`` (as ``DOCKER_HOST`` for docker);
3. ``$XDG_RUNTIME_DIR/lanchat/control.sock`` -- a user daemon -- if it exists;
4. ``/run/lanchat/control.sock`` -- the system service.

XDG variables must hold absolute paths; a relative one is ignored, as the XDG
base directory spec says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

SYSTEM_SOCKET = "/run/lanchat/control.sock"
SOCKET_NAME = "control.sock"


def user_socket(env: Mapping[str, str]) -> str | None:
    """``$XDG_RUNTIME_DIR/lanchat/control.sock``, or None if the variable is unset or relative."""
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if not runtime or not os.path.isabs(runtime):
        return None
    return os.path.join(runtime, "lanchat", SOCKET_NAME)


def socket_path(
    env: Mapping[str, str],
    explicit: str | None = None,
    *,
    exists: Callable[[str], bool] = os.path.exists,
) -> str:
    """The control socket path the CLI should use (see the module docstring for the order)."""
    places = socket_candidates(env, explicit)
    for path in places[:-1]:
        if exists(path):
            return path
    return places[-1]


def socket_candidates(env: Mapping[str, str], explicit: str | None = None) -> list[str]:
    """Every path :func:`socket_path` considers, in order: the first that exists wins, and
    the last is used when none does.  "Not running" names them all, so that a user with
    ``$XDG_RUNTIME_DIR`` set is not told only about the system socket."""
    if explicit:
        return [explicit]
    from_env = env.get("LANCHAT_SOCKET", "")
    if from_env:
        return [from_env]
    user = user_socket(env)
    return [SYSTEM_SOCKET] if user is None else [user, SYSTEM_SOCKET]
