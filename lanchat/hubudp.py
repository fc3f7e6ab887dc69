"""The hub's UDP twin: one thread receives every datagram and expires silent clients.

A UDP client is a :class:`~lanchat.hubsession.Session` known by its address; it
speaks text mode, one or more lines per datagram, and is forgotten after
``udp_idle_timeout`` of silence.  Answers to addresses that are not clients are
rate-limited (their source may be forged).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from typing import Any, Protocol

from lanchat import textmode
from lanchat.errors import ClosedError, RemoteProtocolError, ValidationError
from lanchat.framing import decode_utf8
from lanchat.hubsession import (
    SECRET_REQUIRED,
    TLS_REQUIRED,
    Flooding,
    Session,
    SessionHub,
    host_of,
    plain_refused,
)
from lanchat.limits import (
    MAX_DATAGRAM_BYTES,
    MAX_TRACKED_SOURCES,
    MAX_UDP_CLIENTS,
    MAX_UDP_CLIENTS_PER_IP,
    UDP_UNREGISTERED_BURST,
    UDP_UNREGISTERED_RATE,
    UDP_UNREGISTERED_TOTAL_BURST,
    UDP_UNREGISTERED_TOTAL_RATE,
)
from lanchat.ratelimit import SourceBuckets, TokenBucket

log = logging.getLogger(__name__)


class UdpHub(SessionHub, Protocol):
    """What the UDP endpoint needs of its hub besides a session's needs."""

    udp_idle_timeout: float
    udp_stranger_scale: float


class UdpSession(Session):
    """A UDP client, known by its address; lives on the hub's UDP thread."""

    via = "udp"

    def __init__(self, hub: UdpHub, endpoint: UdpEndpoint, address: tuple[Any, ...]) -> None:
        super().__init__(hub, host_of(address), f"udp {address[0]}:{address[1]}")
        self.endpoint = endpoint
        self.address = address
        self.last_seen = time.monotonic()

    def _send(self, data: bytes) -> bool:
        self.endpoint.send(data, self.address)
        return True  # datagrams may be lost; a UDP client is never "too slow"


class UdpEndpoint:
    """The UDP twin: one thread receives every datagram and expires silent clients."""

    def __init__(self, hub: UdpHub, sock: socket.socket) -> None:
        self.hub = hub
        self.sock = sock
        self.clients: dict[tuple[Any, ...], UdpSession] = {}  # UDP thread only
        self._per_ip: dict[str, int] = {}  # UDP thread only: registered clients per host
        # UDP thread only: how many answers an address that is not a client may get.
        scale = hub.udp_stranger_scale
        self._strangers = SourceBuckets(UDP_UNREGISTERED_RATE * scale, UDP_UNREGISTERED_BURST,
                                        max_sources=MAX_TRACKED_SOURCES)
        self._strangers_total = TokenBucket(UDP_UNREGISTERED_TOTAL_RATE * scale,
                                            UDP_UNREGISTERED_TOTAL_BURST)
        self.thread = threading.Thread(target=self.run, name="hub-udp", daemon=False)
        self._closing = False

    def send(self, data: bytes, address: tuple[Any, ...]) -> None:
        try:
            self.sock.sendto(data[:MAX_DATAGRAM_BYTES], socket.MSG_DONTWAIT, address)
        except OSError as exc:  # full buffer or unreachable: UDP is allowed to lose it
            log.debug("udp send to %s failed: %s", address, exc)

    def run(self) -> None:
        while not self._closing:
            timeout = self._expire()
            try:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    continue
                data, address = self.sock.recvfrom(MAX_DATAGRAM_BYTES + 1)
            except OSError as exc:
                if self._closing:
                    break
                log.debug("udp receive failed: %s", exc)
                continue
            if self._closing or address is None:
                break
            try:
                self._datagram(data, address)
            except ClosedError:
                break
            except Exception:  # one bad datagram must not stop UDP for everyone
                log.exception("udp: unexpected error handling a datagram from %s", address)
        for session in list(self.clients.values()):
            self.hub.backend.leave(session, "server shutting down")
        self.clients.clear()

    def _expire(self) -> float | None:
        """Forget clients silent for the hub's ``udp_idle_timeout``; seconds to the next expiry."""
        if not self.clients:
            return None
        now = time.monotonic()
        next_due: float | None = None
        for address, session in list(self.clients.items()):
            due = session.last_seen + self.hub.udp_idle_timeout
            if due <= now:
                self._forget(address, "timed out")
                self.send(textmode.notice("you were silent too long and have been forgotten"),
                          address)
            elif next_due is None or due < next_due:
                next_due = due
        return None if next_due is None else max(0.0, next_due - now)

    def _datagram(self, data: bytes, address: tuple[Any, ...]) -> None:
        session = self.clients.get(address)
        if session is None and not self._may_answer(address):
            return  # an unproven address gets a bounded number of answers, then silence
        if len(data) > MAX_DATAGRAM_BYTES:
            self.send(textmode.error(f"datagram larger than {MAX_DATAGRAM_BYTES} bytes"), address)
            return
        try:
            lines = decode_utf8(data).splitlines() or [""]
        except RemoteProtocolError as exc:
            self.send(textmode.error(str(exc)), address)
            return
        if session is None:
            self._register(lines[0].strip(), address)
            return
        now = session.last_seen = time.monotonic()
        for text in lines:
            try:
                command = textmode.parse_line(text)
                if command is None:
                    continue  # an empty datagram is a keepalive
                if not session.admit(command, now):
                    continue
                if not session.handle(command):
                    self._forget(address, "quit")
                    session.notice("Bye!")
                    return
            except (ValidationError, RemoteProtocolError) as exc:
                session.error(exc.code, str(exc))
            except Flooding as exc:
                log.info("%r: %s; forgetting it", session, exc)
                self._forget(address, "flooding")
                self.send(textmode.error(f"{exc} -- disconnecting"), address)
                return

    def _may_answer(self, address: tuple[Any, ...]) -> bool:
        """May a datagram from an address that is not a client get an answer (or a join)?

        Its source may be forged -- a victim's -- so answers to strangers are
        rate-limited per address and in all (UDP_UNREGISTERED_*).
        """
        now = time.monotonic()
        return (self._strangers.take(host_of(address), now)
                and self._strangers_total.take(now))

    def _register(self, nick: str, address: tuple[Any, ...]) -> None:
        if plain_refused(self.hub):  # UDP is never encrypted
            self.send(textmode.error(TLS_REQUIRED), address)
            return
        if self.hub.key is not None and not self.hub.plain_clients:
            self.send(textmode.error(SECRET_REQUIRED), address)
            return
        if not nick or nick.startswith("/"):
            self.send(textmode.greeting(self.hub.name), address)
            return
        if len(self.clients) >= MAX_UDP_CLIENTS:
            self.send(textmode.error(f"too many UDP clients (limit {MAX_UDP_CLIENTS}); try TCP"),
                      address)
            return
        host = host_of(address)
        if self._per_ip.get(host, 0) >= MAX_UDP_CLIENTS_PER_IP:
            self.send(textmode.error("too many UDP clients from your address "
                                     f"(limit {MAX_UDP_CLIENTS_PER_IP})"), address)
            return
        session = UdpSession(self.hub, self, address)
        if session.try_join(nick):
            self.clients[address] = session
            self._per_ip[host] = self._per_ip.get(host, 0) + 1

    def _forget(self, address: tuple[Any, ...], reason: str) -> None:
        """Unregister the client at ``address`` and tell the router it left."""
        session = self.clients.pop(address)
        host = host_of(address)
        left = self._per_ip.get(host, 1) - 1
        if left > 0:
            self._per_ip[host] = left
        else:
            self._per_ip.pop(host, None)
        self.hub.backend.leave(session, reason)

    def close(self) -> None:
        self._closing = True
        # shutdown() on a UDP socket wakes a blocked recvfrom on Linux (it reports ENOTCONN).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

