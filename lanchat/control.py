"""The control socket: JSON-RPC 2.0 over a Unix stream socket, one JSON object per line.

This is how ``lanchat`` (and any script with ``socat``) talks to its own daemon.
One reader thread per connection (connections are few and local) reads lines
with a hard limit, answers them through :func:`lanchat.jsonrpc.handle_line`
and queues the reply on the connection's :class:`~lanchat.stream.Outbox`
(:meth:`~lanchat.stream.Outbox.put_reply`: a reply of any documented size is
sent, and the reader takes the next request once the writer has taken it).
``subscribe`` turns the connection into a router :class:`Subscriber`: after
the reply, it streams ``message`` and ``presence`` notifications; a
subscriber that does not read is cut off with an ``overflow`` notification
and never slows anyone else (its ``deliver`` only appends to its outbox).

Permissions (conventions.md §3.5): the socket is bound inside a fresh 0700
directory, chmod'ed (and chgrp'ed) there, then renamed into place, so no
other user can ever reach it with the wrong mode and no process-wide
``umask`` is touched in threaded code.  A stale socket left by a crashed
daemon (connect -> ECONNREFUSED) is replaced; a live one makes the daemon
refuse to start.

An already listening socket may be handed in instead (systemd socket
activation, :mod:`lanchat.sdlisten`).  Its file, mode and group are then
systemd's: the server never binds, chmods or unlinks it, and it never calls
``shutdown()`` on it -- a listening socket is one kernel object shared with
systemd, and shutting it down would refuse every later connection, including
those meant for the next daemon.  So the accept thread waits in ``poll()`` on
the listener and a wake-up socketpair, and :meth:`ControlServer.close` wakes it
through the pair.

The methods are one route table, :data:`METHODS`; each handler parses its
params, calls the :class:`ControlBackend`, and returns JSON.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import itertools
import logging
import os
import select
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lanchat import __version__, jsonrpc
from lanchat.errors import FrameTooLong, LanchatError, LimitExceeded, ValidationError
from lanchat.events import Event
from lanchat.framing import LineDecoder, dumps_line, is_finite_number
from lanchat.limits import MAX_HISTORY_PAGE, MAX_OUTBOX_BYTES, MAX_RPC_LINE_BYTES
from lanchat.model import (
    DEFAULT_ROOM,
    Message,
    Presence,
    User,
    validate_nick,
    validate_node,
    validate_recipient,
    validate_room,
    validate_send_key,
    validate_text,
)
from lanchat.stream import Outbox, read_frames

log = logging.getLogger(__name__)

#: Most control connections at once.  Local clients are few (a tail, a chat, a
#: script); the bound keeps a runaway local script from using up threads.
MAX_CONTROL_CONNECTIONS = 64

#: Largest ``backlog`` a subscribe may ask for (one history page).
MAX_BACKLOG = MAX_HISTORY_PAGE

#: Bytes a subscription may hold back between its registration and the moment
#: its ``subscribe`` reply is queued (it is a few messages at most).
MAX_PENDING_BYTES = MAX_OUTBOX_BYTES


class AlreadyRunning(LanchatError):
    """Another daemon is listening on the control socket path."""

    code = "already-running"


class Subscriber(Protocol):
    """What the router fans out to (HACKING.md): ``deliver`` never blocks."""

    rooms: frozenset[str] | None

    def deliver(self, events: Sequence[Event]) -> bool: ...


class ControlBackend(Protocol):
    """What the control socket needs from the daemon (``router.Router`` + ``daemon``)."""

    def send(self, text: str, *, room: str, to: str | None, uid: int | None,
             key: str | None = None) -> Message:
        """Store and route a message from the local user; return it once stored.

        The same ``key`` from the same ``uid`` stores once: a repeat returns the
        stored message (while retention keeps it).
        """
        ...

    def history(self, *, room: str | None, limit: int, before: float | None,
                since: float | None) -> list[Message]:
        """Stored messages, oldest first."""
        ...

    def subscribe(self, sink: Subscriber, *, backlog: int) -> list[Message]:
        """Register ``sink`` and return the last ``backlog`` messages of its rooms, atomically."""
        ...

    def unsubscribe(self, sink: Subscriber) -> None: ...

    def users(self) -> list[User]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def trust(self, node: str) -> list[str]:
        """Accept node ``node``'s changed key where it is held; the pin names it took."""
        ...

    def status(self) -> dict[str, Any]: ...

    def set_nick(self, nick: str) -> str: ...


# -- notification encoding (module level: one cache entry per event, shared by all) --

def encode_notification(item: Message | Presence) -> bytes:
    """The notification line for a routed item; used as ``event.encoded(encode_notification)``."""
    method = "message" if isinstance(item, Message) else "presence"
    return jsonrpc.notification(method, item.to_dict())


def overflow_notice(reason: str) -> bytes:
    """The last line a subscriber that fell too far behind receives."""
    return jsonrpc.notification("overflow", {"reason": reason})


# -- peer credentials -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PeerCred:
    """Who is on the other end of a Unix socket (SO_PEERCRED, from the kernel)."""

    pid: int
    uid: int
    gid: int


_CRED = struct.Struct("3i")


def peer_cred(sock: socket.socket) -> PeerCred | None:
    """The connecting process's pid/uid/gid, or None where SO_PEERCRED is unavailable."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:  # pragma: no cover - Linux has it
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, opt, _CRED.size)
    except OSError:
        return None
    pid, uid, gid = _CRED.unpack(raw)
    return PeerCred(pid, uid, gid)


# -- one connection ---------------------------------------------------------------

class _Subscription:
    """A connection's subscription: the router's view of it.

    Until the ``subscribe`` reply is queued, delivered events wait in
    ``_pending`` so the client sees the reply (with its backlog) first and the
    live stream right after it, with no gap and no reordering.
    Thread-safety: ``deliver`` runs on the router thread, ``activate`` on the
    connection's reader thread; ``_lock`` guards ``_pending``/``_live`` and is
    held only for queue appends, never for socket I/O.
    """

    def __init__(self, conn: _Connection, sub_id: str, rooms: frozenset[str] | None,
                 presence: bool) -> None:
        self.rooms = rooms
        self.id = sub_id
        self._conn = conn
        self._presence = presence
        self._lock = threading.Lock()  # guards: _pending, _pending_bytes, _live
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._live = False

    def deliver(self, events: Sequence[Event]) -> bool:
        """Queue the events' notifications; False (and a final notice) if the client lags."""
        data = b"".join([e.encoded(encode_notification) for e in events
                         if self._presence or not isinstance(e.item, Presence)])
        if not data:
            return True
        with self._lock:
            if not self._live:
                if self._pending_bytes + len(data) > MAX_PENDING_BYTES:
                    ok = False
                else:
                    self._pending.append(data)
                    self._pending_bytes += len(data)
                    ok = True
            else:
                ok = self._conn.outbox.put(data)
        if not ok:
            self._conn.overflowed()
        return ok

    def activate(self) -> None:
        """The reply is queued: release what arrived meanwhile and go live."""
        with self._lock:
            ok = all(self._conn.outbox.put(data) for data in self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._live = True
        if not ok:
            self._conn.overflowed()

    def __repr__(self) -> str:
        return f"<control subscription {self.id} rooms={self.rooms}>"


class _Connection:
    """One control client.  Its reader thread owns the socket; the outbox writes to it."""

    def __init__(self, server: ControlServer, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.name = f"control-{number}"
        self.cred = peer_cred(sock)
        self.outbox = Outbox(sock, name=self.name, max_bytes=MAX_OUTBOX_BYTES)
        self.subscription: _Subscription | None = None
        self._activate: _Subscription | None = None
        self.routes: dict[str, jsonrpc.Handler] = {
            name: _bind(method.handler, self) for name, method in METHODS.items()
        }
        self.thread = threading.Thread(target=self._run, name=self.name)

    @property
    def uid(self) -> int | None:
        return self.cred.uid if self.cred is not None else None

    def overflowed(self) -> None:
        """The client fell too far behind: tell it once, then cut it off."""
        log.info("%s: subscriber too slow, dropping it", self.name)
        self.outbox.close_with(
            overflow_notice("too slow: the client did not read its notifications"), "overflow"
        )

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._cleanup()

    def _serve(self) -> None:
        decoder = LineDecoder(MAX_RPC_LINE_BYTES)
        try:
            for line in read_frames(self.sock, decoder):
                if not line.strip():
                    continue  # blank lines are keep-alives for hand-typed sessions
                reply = jsonrpc.handle_line(line, self.routes)
                # A reply of any size is accepted (a history page of 1,000 long messages
                # is several times the outbox bound, which limits unsolicited data); this
                # thread waits for the writer to take it before reading the next request.
                if reply is not None and not self.outbox.put_reply(reply):
                    return  # the outbox closed: the peer was cut or went away
                if self._activate is not None:
                    sub, self._activate = self._activate, None
                    sub.activate()
        except FrameTooLong:
            log.warning("%s: request line over %d bytes, closing", self.name, MAX_RPC_LINE_BYTES)
            self.outbox.close_with(
                dumps_line(jsonrpc.error_object(
                    jsonrpc.INVALID_REQUEST,
                    f"request line longer than {MAX_RPC_LINE_BYTES} bytes; closing",
                )),
                "frame too long",
            )
        except OSError as exc:
            log.debug("%s: %s", self.name, exc)

    def _cleanup(self) -> None:
        sub = self.subscription
        if sub is not None:
            self.subscription = None
            try:
                self.server.backend.unsubscribe(sub)
            except LanchatError as exc:  # shutting down: nothing left to unsubscribe from
                log.debug("%s: unsubscribe: %s", self.name, exc)
        self.outbox.close_with(None, "connection closed", keep_queued=True)
        self.outbox.join(timeout=5.0)
        self.sock.close()
        self.server._forget(self)

    # -- what subscribe needs -------------------------------------------------------

    def start_subscription(self, rooms: frozenset[str] | None, presence: bool,
                           backlog: int) -> tuple[str, list[Message]]:
        if self.subscription is not None:
            raise LimitExceeded("this connection is already subscribed", code="limit")
        sub = _Subscription(self, f"{self.name}-{next(self.server._sub_ids)}", rooms, presence)
        messages = self.server.backend.subscribe(sub, backlog=backlog)
        self.subscription = sub
        self._activate = sub  # goes live once the reply is queued
        return sub.id, messages

    def stop_subscription(self) -> bool:
        sub = self.subscription
        if sub is None:
            return False
        self.subscription = None
        self.server.backend.unsubscribe(sub)
        return True


def _bind(handler: Callable[[_Connection, dict[str, Any]], Any],
          conn: _Connection) -> jsonrpc.Handler:
    def bound(params: dict[str, Any]) -> Any:
        return handler(conn, params)
    return bound


# -- param helpers -----------------------------------------------------------------

def _int_param(params: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{name} must be an integer from {lo} to {hi}")
    return value


def _time_param(params: dict[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if not is_finite_number(value) or value < 0:
        raise ValidationError(f"{name} must be seconds since the epoch")
    return float(value)


def _room_param(params: dict[str, Any], default: str | None) -> str | None:
    room = params.get("room", default)
    return None if room is None else validate_room(room)


# -- the route table ---------------------------------------------------------------

def _send(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, {"text", "room", "to", "key"})
    if "text" not in params:
        raise ValidationError("missing parameter 'text'")
    text = validate_text(params["text"])
    room = _room_param(params, DEFAULT_ROOM) or DEFAULT_ROOM
    to = params.get("to")
    if to is not None:
        validate_recipient(to)
    key = params.get("key")
    if key is not None:
        validate_send_key(key)
    return conn.server.backend.send(text, room=room, to=to, uid=conn.uid, key=key).to_dict()


def _history(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, {"room", "limit", "before", "since"})
    messages = conn.server.backend.history(
        room=_room_param(params, None),
        limit=_int_param(params, "limit", 50, 1, MAX_HISTORY_PAGE),
        before=_time_param(params, "before"),
        since=_time_param(params, "since"),
    )
    return [m.to_dict() for m in messages]


def _subscribe(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, {"room", "backlog", "presence"})
    room = _room_param(params, None)
    backlog = _int_param(params, "backlog", 0, 0, MAX_BACKLOG)
    presence = params.get("presence", True)
    if not isinstance(presence, bool):
        raise ValidationError("presence must be true or false")
    rooms = None if room is None else frozenset({room})
    sub_id, messages = conn.start_subscription(rooms, presence, backlog)
    return {"subscription": sub_id, "backlog": [m.to_dict() for m in messages]}


def _unsubscribe(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, {"subscription"})
    return conn.stop_subscription()


def _users(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, set())
    return [u.to_dict() for u in conn.server.backend.users()]


def _peers(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, set())
    return conn.server.backend.peers()


def _trust(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, {"node"})
    node = validate_node(params.get("node"))
    names = conn.server.backend.trust(node)
    if not names:
        raise ValidationError(f"no changed key of node {node} is waiting to be trusted "
                              "(see `lanchat peers`: state \"key changed\")", code="not-held")
    return {"node": node, "names": names}


def _status(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, set())
    status: dict[str, Any] = {"version": __version__}
    status.update(conn.server.backend.status())
    return status


def _nick(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, {"nick"})
    if "nick" not in params:
        raise ValidationError("missing parameter 'nick'")
    return {"nick": conn.server.backend.set_nick(validate_nick(params["nick"]))}


def _methods(conn: _Connection, params: dict[str, Any]) -> Any:
    jsonrpc.check_params(params, set())
    return [{"name": name, "description": m.description} for name, m in METHODS.items()]


@dataclass(frozen=True, slots=True)
class Method:
    handler: Callable[[_Connection, dict[str, Any]], Any]
    #: One line for ``methods`` and the man page.
    description: str


#: The control API: the man page ``lanchat-rpc(7)`` documents exactly this table.
METHODS: dict[str, Method] = {
    "send": Method(_send, "send {text, room?='lobby', to?, key?} -> the stored message; "
                            "to: nick or nick@host|node-prefix, anywhere on the network; "
                            "key: the same key again returns the same stored message"),
    "history": Method(_history, "history {room?, limit?=50, before?, since?} -> messages, "
                                "oldest first"),
    "subscribe": Method(_subscribe, "subscribe {room?, backlog?=0, presence?=true} -> "
                                    "{subscription, backlog}; then message/presence "
                                    "notifications"),
    "unsubscribe": Method(_unsubscribe, "unsubscribe {} -> true if a subscription was ended"),
    "users": Method(_users, "users {} -> [{nick, host, node, local, since, room, via}]"),
    "peers": Method(_peers, "peers {} -> [{node, name, address, port, state, last_seen, "
                            "fingerprint, ...}]; state 'key changed': see trust"),
    "trust": Method(_trust, "trust {node} -> {node, names}: accept the changed key of node "
                            "NODE that a pinned peer presented (lanchat peers: key changed)"),
    "status": Method(_status, "status {} -> {version, node, key, fingerprint, nick, port, "
                              "peers, uptime_s, ...}"),
    "nick": Method(_nick, "nick {nick} -> {nick}: change this node's nickname"),
    "methods": Method(_methods, "methods {} -> [{name, description}]"),
}


# -- the server --------------------------------------------------------------------

def _check_stale(path: str) -> None:
    """Raise if a live daemon owns ``path``; return if it is free or stale (caller replaces it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AlreadyRunning(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("replacing stale control socket %s (its daemon is gone)", path)
        return
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return
        raise AlreadyRunning(f"cannot check {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise AlreadyRunning(f"another lanchatd is already listening on {path}")


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LanchatError(f"no such group: {group}", code="config") from None


class ControlServer:
    """The JSON-RPC server on a Unix socket.

    ``ControlServer(path, backend, mode=0o600, group=None)`` binds at
    :meth:`start`; raises :class:`AlreadyRunning` if a live daemon holds
    ``path``.  ``sock`` may pass an already listening socket (systemd socket
    activation) instead: the server then takes over that socket object (and
    closes it), but leaves the kernel socket listening and its file where it
    is, for whoever else holds it; ``mode`` and ``group`` are not applied.
    :meth:`close` is idempotent: it stops accepting, disconnects every client,
    joins every thread and removes the socket file (if it bound it and the
    file is still its own).  Thread-safety: ``start``/``close`` from one (the
    daemon's) thread; everything else runs on the server's own threads.
    """

    def __init__(self, path: str, backend: ControlBackend, *, mode: int = 0o600,
                 group: str | int | None = None, sock: socket.socket | None = None) -> None:
        self.path = path
        self.backend = backend
        self.mode = mode
        self.group = group
        self._listener = sock
        self._owns_path = sock is None
        self._inode: int | None = None
        self._lock = threading.Lock()  # guards: _conns, _closed
        self._conns: set[_Connection] = set()
        self._closed = False
        self._numbers = itertools.count(1)
        self._sub_ids = itertools.count(1)
        self._accept_thread: threading.Thread | None = None
        # close() closes _wake_w; the accept thread sees its peer readable and returns.
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    @property
    def inherited(self) -> bool:
        """True when the listening socket was handed in (its file is not ours)."""
        return not self._owns_path

    def start(self) -> None:
        """Bind (unless given a socket), listen, and start accepting."""
        if self._listener is None:
            self._listener = self._bind()
        else:
            log.info("control socket: serving the inherited socket on %s", self.path)
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="control-accept")
        self._accept_thread.start()

    def _bind(self) -> socket.socket:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            os.chmod(parent, 0o700)  # makedirs' mode is filtered by the umask
        _check_stale(self.path)
        # Bind in a private 0700 directory, fix mode and group there, then rename into
        # place: nobody can connect while the mode is still the umask's, and rename
        # replaces a stale socket atomically.
        staging = tempfile.mkdtemp(prefix=".lanchat-", dir=parent)
        tmp = os.path.join(staging, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            os.chmod(tmp, self.mode)
            if self.group is not None:
                os.chown(tmp, -1, _gid(self.group))
            sock.listen(16)
            os.rename(tmp, self.path)
            self._inode = os.lstat(self.path).st_ino
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.rmdir(staging)
        log.info("control socket listening on %s (mode %o)", self.path, self.mode)
        return sock

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        wake = self._wake_r.fileno()
        while True:
            ready = poller.poll()
            if self._closed or any(fd == wake for fd, _ in ready):
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                # An inherited socket may be non-blocking (the file status flags are
                # shared with systemd; we leave them alone) and the connection gone.
                continue
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control socket: accept failed (%s); backing off", exc)
                    threading.Event().wait(0.1)  # a bounded pause, not a poll: wait for fds
                    continue
                log.error("control socket: accept failed: %s", exc)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        conn: _Connection | None = None
        with self._lock:
            if self._closed:
                sock.close()
                return
            if len(self._conns) < MAX_CONTROL_CONNECTIONS:
                conn = _Connection(self, sock, next(self._numbers))
                self._conns.add(conn)
        if conn is None:
            log.warning("control socket: too many connections, refusing one")
            with contextlib.suppress(OSError):
                sock.sendall(dumps_line(jsonrpc.error_object(3, "too many control connections")))
            sock.close()
            return
        if conn.cred is not None:
            log.debug("%s: pid %d uid %d gid %d", conn.name, conn.cred.pid, conn.cred.uid,
                      conn.cred.gid)
        conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    @property
    def connections(self) -> int:
        """How many clients are connected (a snapshot)."""
        with self._lock:
            return len(self._conns)

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving: close the listener, disconnect clients, join threads, remove the file.

        Joins for ``timeout`` seconds in all.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        if self._listener is not None:
            # Not shutdown(): that would refuse connections for good on an inherited
            # socket (the module docstring says why).  Closing our end wakes poll().
            if self._wake_w is not None:
                self._wake_w.close()
            if self._accept_thread is not None:
                self._accept_thread.join(max(0.0, deadline - time.monotonic()))
            if self._wake_r is not None:
                self._wake_r.close()
            self._listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes its reader thread
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        if self._owns_path and self._inode is not None:
            # Only remove the file if it is still ours, not a successor's socket.
            with contextlib.suppress(OSError):
                if os.lstat(self.path).st_ino == self._inode:
                    os.unlink(self.path)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
