"""A typed client of the daemon's control socket (JSON-RPC 2.0, one JSON object per line).

The CLI's only way to the daemon.  It maps connection failures to errors the
CLI turns into exit codes and one-line messages (conventions.md §6.3, §6.4):
no socket or a refused connection -> :class:`DaemonNotRunning` (exit 3),
``EACCES`` -> :class:`PermissionDenied` (exit 4), a JSON-RPC error ->
:class:`RpcError` (exit 1).  Standard library only, so ``lanchat send`` starts
fast.  A :class:`ControlClient` is not thread-safe: use one per thread (the
interactive chat uses one for its subscription and one for sending).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import socket
from collections.abc import Iterator

from lanchat.errors import BrokenError, FrameTooLong, LanchatError, RemoteProtocolError
from lanchat.framing import LineDecoder, dumps_line, loads_line
from lanchat.limits import MAX_RPC_LINE_BYTES

TYPE_CHECKING = False  # not typing's: importing typing costs `lanchat send` ~3 ms (HACKING.md)
if TYPE_CHECKING:
    from typing import Any

#: Longest reply line we accept: a full history page of maximal messages,
#: JSON-escaped, is far beyond the request limit; the daemon is trusted, this
#: only stops a runaway.
MAX_REPLY_BYTES = 64 * MAX_RPC_LINE_BYTES

#: Notifications held while waiting for a reply (a subscriber that also calls).
MAX_HELD_NOTIFICATIONS = 10_000


class DaemonNotRunning(LanchatError):
    """No daemon answers on the control socket (no file, or a stale one)."""

    code = "not-running"

    def __init__(self, path: str, detail: str = "") -> None:
        super().__init__(f"lanchatd is not running (no socket at {path})"
                         + (f": {detail}" if detail else ""))
        self.path = path


class PermissionDenied(LanchatError):
    """The control socket exists but this user may not connect to it."""

    code = "permission"

    def __init__(self, path: str) -> None:
        super().__init__(f"permission denied on {path}")
        self.path = path


class ConnectionLost(BrokenError):
    """The daemon closed the connection (it stopped or restarted)."""

    code = "connection-lost"


class ControlTimeout(LanchatError):
    """The daemon did not answer in time."""

    code = "timeout"


class RpcError(LanchatError):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message, code="rpc")
        self.rpc_code = code
        self.message = message
        self.data = data


class ControlClient:
    """A connection to the control socket at ``path``.

    Connects on first use (or :meth:`connect`).  ``timeout`` bounds each
    ``call`` so a wedged daemon cannot hang a script; a subscription waits as
    long as it takes.  :meth:`close` is idempotent; the client is also a
    context manager.
    """

    def __init__(self, path: str, timeout: float | None = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = LineDecoder(MAX_REPLY_BYTES)
        self._lines: collections.deque[bytes] = collections.deque()
        self._held: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MAX_HELD_NOTIFICATIONS)
        self._ids = itertools.count(1)

    def connect(self) -> None:
        """Open the connection; raise DaemonNotRunning / PermissionDenied / LanchatError."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            sock.close()
            raise DaemonNotRunning(self.path) from exc
        except PermissionError as exc:
            sock.close()
            raise PermissionDenied(self.path) from exc
        except TimeoutError as exc:
            sock.close()
            raise ControlTimeout(f"timed out connecting to {self.path}") from exc
        except OSError as exc:
            sock.close()
            raise DaemonNotRunning(self.path, exc.strerror or str(exc)) from exc
        self._sock = sock

    def interrupt(self) -> None:
        """Wake a thread blocked reading this connection (it then sees ConnectionLost).

        Safe to call from another thread; :meth:`close` still has to be called.
        """
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lines ---------------------------------------------------------------------

    def _send(self, obj: Any) -> None:
        self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(dumps_line(obj))
        except TimeoutError as exc:
            raise ControlTimeout(f"the daemon at {self.path} did not accept the request") from exc
        except OSError as exc:
            raise ConnectionLost(f"lost the connection to lanchatd ({exc.strerror or exc})") \
                from exc

    def _read(self) -> dict[str, Any]:
        """The next JSON object from the daemon; raises ConnectionLost at EOF."""
        assert self._sock is not None
        while not self._lines:
            try:
                data = self._sock.recv(65536)
            except TimeoutError as exc:
                raise ControlTimeout(f"the daemon at {self.path} did not answer in time") \
                    from exc
            except OSError as exc:
                raise ConnectionLost(f"lost the connection to lanchatd ({exc.strerror or exc})") \
                    from exc
            if not data:
                raise ConnectionLost("lanchatd closed the connection")
            try:
                self._lines.extend(self._decoder.feed(data))
            except FrameTooLong as exc:
                raise ConnectionLost(f"reply from lanchatd too long: {exc}") from exc
        line = self._lines.popleft()
        try:
            obj = loads_line(line)
        except RemoteProtocolError as exc:
            raise ConnectionLost(f"garbled reply from lanchatd: {exc}") from exc
        if not isinstance(obj, dict):
            raise ConnectionLost("unexpected reply from lanchatd (not an object)")
        return obj

    # -- calls -----------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> Any:
        """Call ``method`` with named ``params``; return its result or raise :class:`RpcError`.

        Params whose value is ``None`` are left out (the daemon's default applies).
        Notifications that arrive meanwhile are kept for :meth:`notifications`.
        """
        request_id = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        named = {k: v for k, v in params.items() if v is not None}
        if named:
            request["params"] = named
        self._send(request)
        while True:
            obj = self._read()
            if "id" not in obj:
                if "method" in obj:
                    self._held.append(obj)
                continue
            if obj["id"] != request_id and obj["id"] is not None:
                continue  # a stale reply (from a call that timed out): not ours
            if "error" in obj:
                err = obj["error"] if isinstance(obj["error"], dict) else {}
                code = err.get("code", -32603)
                raise RpcError(code if isinstance(code, int) else -32603,
                               str(err.get("message", "unknown error")), err.get("data"))
            return obj.get("result")

    def notifications(self) -> Iterator[dict[str, Any]]:
        """Every notification (``{"method", "params"}``) from now on, waiting without timeout.

        Ends by raising :class:`ConnectionLost` when the daemon closes the connection.
        """
        assert self._sock is not None or self._held
        while self._held:
            yield self._held.popleft()
        if self._sock is not None:
            self._sock.settimeout(None)
        while True:
            obj = self._read()
            if "method" in obj and "id" not in obj:
                yield obj

    def subscribe(self, *, room: str | None = None, backlog: int = 0,
                  presence: bool = True) -> tuple[list[dict[str, Any]],
                                                  Iterator[dict[str, Any]]]:
        """Subscribe; return ``(backlog messages, iterator of notifications)``."""
        result = self.call("subscribe", room=room, backlog=backlog, presence=presence)
        if not isinstance(result, dict):
            raise ConnectionLost("unexpected subscribe reply from lanchatd")
        backlog_msgs = result.get("backlog", [])
        return list(backlog_msgs), self.notifications()
