"""A chat load generator that is not itself the bottleneck.

A coordinator forks ``workers`` processes; each drives many non-blocking sockets with one
``selectors`` loop (no thread per socket).  Every client first registers a nick (text mode:
answers ``* Choose a nickname:``; JSON mode: ``hello`` then waits for ``welcome``), may move to
another room, reports ready, and waits for a common start time.

Payload.  Every chat text is ``@lg SENDER SEQ T_NS PAD`` where ``T_NS`` is
``time.monotonic_ns()`` just before the ``send`` call.  CLOCK_MONOTONIC is one clock for every
process on the machine, so receive time minus ``T_NS`` is the one-way latency.  Two receive
times are kept: when the generator read the bytes (``lat``: what a client sees, including the
generator's own delay in getting to the socket) and when they reached the receiving socket
(``net_lat``: the kernel's receive timestamp, ``SO_TIMESTAMPNS``, of the last segment the read
returned -- what the server is answerable for).  The kernel stamps in CLOCK_REALTIME; each
worker converts with the REALTIME - MONOTONIC offset it measures at the start and reports how
far that offset drifted by the end (``clock_drift_us``).  Receivers find
payloads with one compiled regex over each received chunk (C speed), so the same parser reads
text mode (``[12:00:00] lg3: @lg 3 17 ...``), JSON mode (``"text":"@lg 3 17 ..."``) and IRC.

Accounting.  Each measured receiver keeps, per sender, a bitmap of sequence numbers seen and
the highest one so far: a second copy is a *duplicate*, an older one arriving after a newer
one is a *reorder*, and ``sent - unique`` at the end is *loss*.  A payload from the receiver's
own id (JSON mode's ``sent`` ack, or a server that echoes) is counted as ``self``, never as a
delivery.

Pacing.  ``rate_per_sender > 0``: sender k's message n is due at ``t0 + (n + k/S)/rate``; if
the socket's outbound buffer already holds ``MAX_OUTBUF`` bytes (the server stopped reading)
the message is counted ``skipped``, not queued, so the generator's memory stays bounded and the
offered/sent gap is reported.  ``rate_per_sender == 0``: pipelined with a window.  In text mode
a sender never sees its own message, so the window is clocked by a *witness*: another measured
receiver in the same worker process; a sender keeps at most ``window`` of its messages not yet
seen by its witness.  The same rule is used in JSON mode so both modes pace alike.

TLS (``LoadSpec.tls``).  Every client speaks TLS 1.3 (as the hub's clients will, on the same
port as plain ones) through an ``ssl.SSLObject`` on two memory BIOs, so the socket stays the
generator's own: ``recvmsg`` still returns the raw bytes with their kernel receive timestamp,
they go into the incoming BIO and the plaintext that comes out is accounted as before (it
carries the timestamp of the read whose bytes completed its record); a write encrypts into the
outgoing BIO and the ciphertext goes to the same outbound buffer as plain bytes (partial sends
carried over, ``MAX_OUTBUF`` counted in ciphertext).  The handshake is one more non-blocking
state of the connect phase.  The client checks no certificate: it is a load generator, not a
client to trust (a real client pins the hub's key).  The payload's ``T_NS`` is taken before
encryption and the read time after decryption: ``lat`` includes the sender's encryption and
the receiver's decryption, ``net_lat`` (the kernel's stamp) the sender's encryption only.  With
``tls`` off the only cost is one ``is None`` test per read and per write.

Bounds.  Connect phase and run phase each have a wall-clock deadline; a rate run stops at
``duration_s`` plus ``drain_s``; a window run stops when every expected delivery arrived or at
``max_run_s``.  Everything runs on 127.0.0.1 (the caller passes the host; scenarios pass only
loopback).
"""

from __future__ import annotations

import array
import contextlib
import heapq
import json
import multiprocessing as mp
import os
import re
import resource
import select
import selectors
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

PAYLOAD_RE = re.compile(rb"@lg (\d+) (\d+) (\d+)")
#: The one message of the room-probe phase (big room): ``@pr T_NS``.
ROOM_PROBE_RE = re.compile(rb"@pr (\d+)")
#: Bytes a sender may have queued locally before further messages are skipped.
MAX_OUTBUF = 256 * 1024
#: Handshakes a worker keeps in progress at once (the server's accept backlog is finite).
MAX_PENDING_CONNECTS = 200
RECV_CHUNK = 256 * 1024
#: The most plaintext one TLS record carries (RFC 8446 5.1): what one SSLObject.read returns.
TLS_RECORD = 16 * 1024
#: Linux ``SO_TIMESTAMPNS`` (the socket module does not name it): a ``struct timespec`` of
#: CLOCK_REALTIME with every read, the time the data reached the socket.
SO_TIMESTAMPNS = 35
ANC_BUF = socket.CMSG_SPACE(16)

# client states (TLS_HANDSHAKING: connected, TLS handshake under way; only with LoadSpec.tls)
CONNECTING, GREETING, WELCOMING, JOINING, READY, CLOSED, TLS_HANDSHAKING = range(7)


@dataclass
class ClientSpec:
    """One simulated client.  ``role``: send (sends and receives), recv, idle, slow."""

    cid: int
    role: str
    room: str | None = None  # None: stay in the server's default room


@dataclass
class LoadSpec:
    """Everything one run needs.  ``mode``: ``text``, ``json`` or ``irc`` (a reference server)."""

    host: str
    port: int
    mode: str
    clients: list[ClientSpec]
    msgs_per_sender: int
    rate_per_sender: float = 0.0  # 0 = window mode
    window: int = 64
    pad: int = 16
    workers: int = 2
    connect_timeout_s: float = 60.0
    duration_s: float = 10.0  # rate mode: sending period
    drain_s: float = 3.0  # rate mode: extra time for the last deliveries
    max_run_s: float = 120.0  # hard limit on the run phase, either mode
    slow_rcvbuf: int = 64 * 1024  # SO_RCVBUF of a "slow" client (fills quickly)
    record_latency: bool = True
    latency_every: int = 1  # record the latency of every Nth sequence number
    cpus: tuple[int, ...] | None = None  # CPUs the worker processes run on (None: any)
    #: Measured clients (the first ``probes`` send/recv clients) read the moment they become
    #: readable; latency is sampled from them only.  The other measured clients are read in
    #: batches every ``batch_ms``, idle ones every ``idle_batch_ms``.  0: every socket is read
    #: the moment it becomes readable and every measured one is sampled (the old generator).
    probes: int = 0
    batch_ms: float = 5.0
    idle_batch_ms: float = 50.0
    #: Every client speaks TLS 1.3 (no certificate check: see the module docstring).
    tls: bool = False


@dataclass
class Client:
    spec: ClientSpec
    sock: socket.socket
    state: int = CONNECTING
    inbuf: bytes = b""
    outbuf: bytearray = field(default_factory=bytearray)
    writing: bool = False
    # receiver accounting, indexed by sender cid
    # per sender id (as the bytes on the wire): [bitmap of seqs seen, highest seq seen]
    rx: dict[bytes, list[Any]] = field(default_factory=dict)
    own_b: bytes = b""
    unique: int = 0
    dups: int = 0
    reorders: int = 0
    selfs: int = 0
    payload_bytes_seen: int = 0
    notices: list[str] = field(default_factory=list)
    closed_at_ns: int = 0
    close_reason: str = ""
    # sender
    next_seq: int = 1
    sent: int = 0
    skipped: int = 0
    witness: Client | None = None
    batched: bool = False  # read in batches (not registered for reading in the selector)
    probe_seen_ns: int = 0  # room-probe phase: when this client read the probe
    # TLS (LoadSpec.tls): the session on two memory BIOs; None for a plain client
    tls: ssl.SSLObject | None = None
    tls_in: ssl.MemoryBIO | None = None
    tls_out: ssl.MemoryBIO | None = None


def _hello(spec: LoadSpec, c: ClientSpec) -> bytes:
    if spec.mode == "irc":  # registration; the channel is joined after the 001 welcome
        return f"NICK lg{c.cid}\r\nUSER lg{c.cid} 0 * :lanchat bench\r\n".encode()
    if spec.mode == "json":
        hello: dict[str, Any] = {"type": "hello", "v": 1, "nick": f"lg{c.cid}"}
        if c.room:
            hello["room"] = c.room
        return (json.dumps(hello) + "\n").encode()
    return b""


def client_tls_context() -> ssl.SSLContext:
    """TLS 1.3 only (like lanchat's ``tlsid.client_context``) and no certificate check: the
    generator measures the hub, it does not trust it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Worker:
    """One process's share of the clients, driven by one selector loop."""

    def __init__(self, spec: LoadSpec, cids: list[int]) -> None:
        self.spec = spec
        self.by_cid = {c.cid: c for c in spec.clients}
        self.mine = [self.by_cid[i] for i in cids]
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}  # fd -> client
        self.slow_poll = select.poll()
        self.slow: list[Client] = []
        self.bulk_poll = select.poll()  # measured clients read in batches
        self.idle_poll = select.poll()  # idle clients, read in slower batches
        self.n_batched = 0
        measured_cids = [c.cid for c in spec.clients if c.role in ("send", "recv")]
        self.probe_cids = set(measured_cids[:spec.probes]) if spec.probes > 0 else set(
            measured_cids)
        self.lat = array.array("q")
        self.net_lat = array.array("q")
        self.clock_offset = _realtime_offset_ns()
        self.t0 = 0
        self.buckets_deliv: dict[int, int] = {}
        self.buckets_expect: dict[int, float] = {}
        self.n_measured = sum(1 for c in spec.clients if c.role in ("send", "recv"))
        self.errors: dict[str, int] = {}
        self.max_lag_ns = 0
        self.end_ns = 0
        self.last_delivery_ns = 0
        self.tls_ctx = client_tls_context() if spec.tls else None

    # --- connect phase ---------------------------------------------------------------
    def _err(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def _open(self, cs: ClientSpec) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cs.role in ("send", "recv"):
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if cs.role == "slow":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.spec.slow_rcvbuf)
        s.setblocking(False)
        err = s.connect_ex((self.spec.host, self.spec.port))
        c = Client(cs, s, own_b=str(cs.cid).encode())
        self.clients[s.fileno()] = c
        if err not in (0, 115):  # 115 = EINPROGRESS
            self._close(c, f"connect errno {err}")
            return
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def _close(self, c: Client, reason: str) -> None:
        if c.state == CLOSED:
            return
        c.state = CLOSED
        c.closed_at_ns = time.monotonic_ns()
        c.close_reason = reason
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        if c.batched:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.bulk_poll.unregister(c.sock)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.idle_poll.unregister(c.sock)
        c.sock.close()

    def _send_now(self, c: Client, data: bytes) -> None:
        if c.tls is not None:  # encrypt; the ciphertext is what the socket carries
            assert c.tls_out is not None
            try:
                c.tls.write(data)
            except ssl.SSLError as exc:
                self._close(c, f"tls write: {exc.reason or exc}")
                return
            data = c.tls_out.read()
        c.outbuf += data
        self._flush(c)

    # --- TLS (LoadSpec.tls) -------------------------------------------------------------
    def _tls_start(self, c: Client) -> None:
        """The TCP connection is up: begin the handshake (the ClientHello goes out now)."""
        assert self.tls_ctx is not None
        c.tls_in, c.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        c.tls = self.tls_ctx.wrap_bio(c.tls_in, c.tls_out)
        c.state = TLS_HANDSHAKING
        self._tls_handshake(c)

    def _tls_handshake(self, c: Client) -> None:
        assert c.tls is not None and c.tls_out is not None
        try:
            c.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError as exc:
            self._close(c, f"tls handshake: {exc.reason or exc}")
            return
        if c.tls_out.pending:
            c.outbuf += c.tls_out.read()
            self._flush(c)
        if done and c.state == TLS_HANDSHAKING:
            self._begin_session(c)

    def _tls_recv(self, c: Client, data: bytes) -> bytes:
        """Raw bytes in, plaintext out (b"" for handshake progress, a partial record, or a
        close: then ``c`` is CLOSED)."""
        tls, tin, tout = c.tls, c.tls_in, c.tls_out
        assert tls is not None and tin is not None and tout is not None
        tin.write(data)
        if c.state == TLS_HANDSHAKING:
            self._tls_handshake(c)
            if c.state in (TLS_HANDSHAKING, CLOSED):
                return b""
        parts = []
        try:
            # One record per read (at most TLS_RECORD bytes of plaintext, so nothing stays
            # decrypted inside the SSLObject); ~1.5-2 us a record here.  Looping on the BIO's
            # fill alone costs a third less than asking tls.pending() as well.
            while tin.pending:
                chunk = tls.read(TLS_RECORD)
                if not chunk:
                    break
                parts.append(chunk)
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            self._close(c, "eof (tls close_notify)")
            return b""
        except ssl.SSLError as exc:
            self._close(c, f"tls: {exc.reason or exc}")
            return b""
        if tout.pending:  # e.g. a key update's answer
            c.outbuf += tout.read()
            self._flush(c)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _begin_session(self, c: Client) -> None:
        """Connected (and, with TLS, the handshake done): wait for the greeting, or say hello."""
        c.state = GREETING
        if self.spec.mode in ("json", "irc"):
            c.state = WELCOMING
            self._send_now(c, _hello(self.spec, c.spec))

    def _flush(self, c: Client) -> None:
        if c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
                del c.outbuf[:n]
            except BlockingIOError:
                pass
            except OSError as exc:
                self._close(c, f"send: {exc.strerror}")
                return
        want = bool(c.outbuf)
        if want != c.writing and c.state != CLOSED and c not in self.slow:
            c.writing = want
            if c.batched:  # in the selector only while it has something to write
                if want:
                    self.sel.register(c.sock, selectors.EVENT_WRITE, c)
                else:
                    self.sel.unregister(c.sock)
                return
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(c.sock, ev, c)

    def _handshake_line(self, c: Client, line: bytes) -> None:
        if self.spec.mode == "irc":
            self._irc_handshake_line(c, line)
            return
        if self.spec.mode == "json":
            if line.startswith(b"{") and b'"welcome"' in line:
                c.state = READY
            elif b'"error"' in line:
                self._close(c, "hello refused: " + line[:120].decode("utf-8", "replace"))
            return
        if c.state == GREETING and b"Choose a nickname" in line:
            self._send_now(c, f"lg{c.spec.cid}\n".encode())
            c.state = WELCOMING
        elif c.state == WELCOMING and line.startswith(b"* Welcome"):
            if c.spec.room:  # ready once the server confirms the move, not before
                c.state = JOINING
                self._send_now(c, f"/join {c.spec.room}\n".encode())
            else:
                c.state = READY
        elif c.state == JOINING and line.startswith(b"* You ") and (
                f"#{c.spec.room}".encode() in line):
            c.state = READY
        elif line.startswith(b"! "):
            self._close(c, "nick refused: " + line[:120].decode("utf-8", "replace"))

    def _irc_handshake_line(self, c: Client, line: bytes) -> None:
        """IRC (a reference server such as ngircd): 001 welcome, JOIN, ready at 366 (NAMES end)."""
        words = line.split(b" ", 3)
        code = words[1] if len(words) > 1 else b""
        if line.startswith(b"PING"):
            self._send_now(c, b"PONG" + line[4:] + b"\r\n")
        elif c.state == WELCOMING and code == b"001":
            c.state = JOINING
            self._send_now(c, f"JOIN #{c.spec.room or 'lobby'}\r\n".encode())
        elif c.state == JOINING and code == b"366":
            c.state = READY
        elif line.startswith(b"ERROR") or (code.isdigit() and code[:1] in (b"4", b"5")):
            self._close(c, "irc refused: " + line[:120].decode("utf-8", "replace"))

    def connect_all(self, deadline: float) -> None:
        todo = list(reversed(self.mine))
        pending = 0
        while time.monotonic() < deadline:
            while todo and pending < MAX_PENDING_CONNECTS:
                self._open(todo.pop())
                pending += 1
            for key, ev in self.sel.select(timeout=0.05):
                c: Client = key.data
                if c.state == CONNECTING and ev & selectors.EVENT_WRITE:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._close(c, f"connect: {os.strerror(err)}")
                        pending -= 1
                        continue
                    self.sel.modify(c.sock, selectors.EVENT_READ, c)
                    if self.tls_ctx is not None:
                        self._tls_start(c)
                        if c.state == CLOSED:
                            pending -= 1
                    else:
                        self._begin_session(c)
                    continue
                if ev & selectors.EVENT_WRITE:
                    self._flush(c)
                if ev & selectors.EVENT_READ and c.state != CLOSED:
                    before = c.state
                    self._read(c, handshake=True)
                    if before != READY and c.state in (READY, CLOSED):
                        pending -= 1
            if not todo and all(c.state in (READY, CLOSED) for c in self.clients.values()):
                break
        for c in list(self.clients.values()):
            if c.state not in (READY, CLOSED):
                self._close(c, "handshake timeout")
        # slow clients stop reading from here on; a poll watches for the server hanging up
        for c in self.clients.values():
            if c.spec.role == "slow" and c.state == READY:
                self.sel.unregister(c.sock)
                self.slow.append(c)
                self.slow_poll.register(c.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)

    def _serve_ready(self, timeout: float) -> None:
        """One round of the selector: read and flush every ready client that is readable or
        writable now (waiting at most ``timeout`` seconds for one)."""
        for key, ev in self.sel.select(timeout=timeout):
            c = key.data
            if ev & selectors.EVENT_READ and c.state == READY:
                self._read(c)
            if ev & selectors.EVENT_WRITE and c.state == READY:
                self._flush(c)

    def keep_reading_until_told(self, conn: Connection, limit_s: float) -> Any:
        """Wait for the coordinator's next message while reading every socket the moment it
        becomes readable: a server announces every join to the room, and clients nobody reads
        meanwhile would look like slow consumers to it.  None if nothing came within
        ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if conn.poll(0):
                return conn.recv()
            self._serve_ready(0.01)
        return None

    def room_probe(self, sender_cid: int, t_ns: int, deadline_ns: int) -> dict[str, Any]:
        """Big room: one message (``@pr T_NS``) from ``sender_cid``; read every socket at once
        until each of ours saw it or ``deadline_ns``.  The sender counts as reached."""
        ready = [c for c in self.clients.values() if c.state == READY]
        for c in ready:
            if c.spec.cid == sender_cid:
                c.probe_seen_ns = t_ns
                text = b"@pr %d" % t_ns
                if self.spec.mode == "irc":
                    line = b"PRIVMSG #%s :%s\r\n" % ((c.spec.room or "lobby").encode(), text)
                elif self.spec.mode == "json":
                    line = b'{"type":"say","text":"%s"}\n' % text
                else:
                    line = text + b"\n"
                self._send_now(c, line)
        while time.monotonic_ns() < deadline_ns:
            if all(c.probe_seen_ns or c.state != READY for c in ready):
                break
            self._serve_ready(0.01)
        seen = [c.probe_seen_ns for c in ready if c.probe_seen_ns]
        return {"held": len(ready), "reached": len(seen),
                "last_ns": max(seen) if seen else 0}

    def arrange_batches(self) -> None:
        """From here on only the probe clients stay in the selector for reading; the rest of
        the measured clients go to a poll read every ``batch_ms``, idle ones to one read every
        ``idle_batch_ms`` (see LoadSpec.probes)."""
        if self.spec.probes <= 0:
            return
        for c in self.clients.values():
            if c.state != READY or c.spec.role == "slow" or c.spec.cid in self.probe_cids:
                continue
            self.sel.unregister(c.sock)
            c.writing = False
            c.batched = True
            (self.idle_poll if c.spec.role == "idle" else self.bulk_poll).register(
                c.sock, select.POLLIN)
            self.n_batched += 1
            self._flush(c)  # back in the selector for writing if it has output pending

    def _read_batch(self, poll: select.poll) -> None:
        for fd, _ev in poll.poll(0):
            c = self.clients[fd]
            if c.state == READY:
                self._read(c)

    # --- receive ----------------------------------------------------------------------
    def _read(self, c: Client, handshake: bool = False) -> None:
        try:
            data, anc, _flags, _addr = c.sock.recvmsg(RECV_CHUNK, ANC_BUF)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(c, f"recv: {exc.strerror}")
            return
        if not data:
            self._close(c, "eof")
            return
        if c.tls is not None:
            data = self._tls_recv(c, data)
            if not data:
                return
        now = time.monotonic_ns()
        net_now = now  # when the bytes reached the socket (kernel stamp), on CLOCK_MONOTONIC
        for level, kind, stamp in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(stamp) >= 16:
                sec, nsec = struct.unpack_from("qq", stamp)
                net_now = sec * 1_000_000_000 + nsec - self.clock_offset
        buf = c.inbuf + data if c.inbuf else data
        end = buf.rfind(b"\n") + 1
        c.inbuf = buf[end:]
        if len(c.inbuf) > 64 * 1024:
            self._close(c, "overlong line")
            return
        if c.state != READY or handshake:
            for line in buf[:end].split(b"\n"):
                if c.state == READY:
                    break
                if line:
                    self._handshake_line(c, line.rstrip(b"\r"))
            if c.state != READY:
                return
        if c.spec.role == "idle":  # a member of the room, not measured: count, do not parse
            c.unique += buf.count(b"@lg ", 0, end)
            if c.probe_seen_ns == 0 and b"@pr " in buf:
                c.probe_seen_ns = now
            return
        if c.probe_seen_ns == 0 and b"@pr " in buf:
            c.probe_seen_ns = now
        self._account(c, buf, end, now, net_now)

    def _account(self, c: Client, buf: bytes, end: int, now: int, net_now: int) -> None:
        # The hot loop of the generator: about 2 million iterations in the fan-out scenario,
        # so it keys by the sender id's bytes and converts the timestamp only when sampled.
        own = c.own_b
        n = self.spec.msgs_per_sender + 2
        lat = self.lat if self.spec.record_latency and c.spec.cid in self.probe_cids else None
        net_lat = self.net_lat
        every = self.spec.latency_every
        state = c.rx
        got = 0
        for sid_b, seq_b, t_b in PAYLOAD_RE.findall(buf, 0, end):
            if sid_b == own:
                c.selfs += 1
                continue
            seq = int(seq_b)
            st = state.get(sid_b)
            if st is None:
                st = state[sid_b] = [bytearray(n), 0]
            seen: bytearray = st[0]
            if seq >= n:
                self._err("seq out of range")
                continue
            if seen[seq]:
                c.dups += 1
                continue
            seen[seq] = 1
            got += 1
            if seq < st[1]:
                c.reorders += 1
            else:
                st[1] = seq
            if lat is not None and seq % every == 0:
                t_sent = int(t_b)
                lat.append(now - t_sent)
                net_lat.append(net_now - t_sent)
        c.unique += got
        if c.spec.role not in ("send", "recv"):
            return
        if got:
            self.last_delivery_ns = now
            b = (now - self.t0) // 1_000_000_000
            self.buckets_deliv[b] = self.buckets_deliv.get(b, 0) + got
        # keep error/bye lines for the report, boundedly (notices of a cut, refusals)
        if len(c.notices) < 20 and (b"! " in buf or b'"error"' in buf or b'"bye"' in buf):
            for line in buf[:end].split(b"\n"):
                if _is_notice(line) and len(c.notices) < 20:
                    c.notices.append(line[:200].decode("utf-8", "replace"))

    # --- send -------------------------------------------------------------------------
    def _payload(self, c: Client, seq: int, pad: str) -> bytes:
        t = time.monotonic_ns()
        if self.spec.mode == "irc":
            return b"PRIVMSG #%s :@lg %d %d %d %s\r\n" % (
                (c.spec.room or "lobby").encode(), c.spec.cid, seq, t, pad.encode())
        if self.spec.mode == "json":
            return b'{"type":"say","text":"@lg %d %d %d %s"}\n' % (
                c.spec.cid, seq, t, pad.encode())
        return b"@lg %d %d %d %s\n" % (c.spec.cid, seq, t, pad.encode())

    def _count_sent(self, c: Client, now: int) -> None:
        c.sent += 1
        b = (now - self.t0) // 1_000_000_000
        factor = self.n_measured - (1 if c.spec.role in ("send", "recv") else 0)
        self.buckets_expect[b] = self.buckets_expect.get(b, 0) + factor

    def _top_up_window(self, senders: list[Client]) -> None:
        pad = "x" * self.spec.pad
        total = self.spec.msgs_per_sender
        for c in senders:
            if c.state != READY or c.next_seq > total or len(c.outbuf) > MAX_OUTBUF:
                continue
            w = c.witness
            st = w.rx.get(c.own_b) if w is not None else None
            acked = (st[1] if st else 0) if w is not None and w.state == READY else (
                c.next_seq - 1)
            room = self.spec.window - (c.next_seq - 1 - acked)
            if room <= 0:
                continue
            now = time.monotonic_ns()
            parts = []
            for _ in range(min(room, total - c.next_seq + 1)):
                parts.append(self._payload(c, c.next_seq, pad))
                c.next_seq += 1
                self._count_sent(c, now)
            self._send_now(c, b"".join(parts))

    def run(self, t0_ns: int, hard_deadline_ns: int) -> None:
        spec = self.spec
        self.t0 = t0_ns
        senders = [c for c in self.clients.values()
                   if c.spec.role == "send" and c.state == READY]
        measured = [c for c in self.clients.values()
                    if c.spec.role in ("send", "recv") and c.state == READY]
        probes = [m for m in measured if m.spec.cid in self.probe_cids]
        for s in senders:  # a probe if possible: read at once, it clocks the window promptly
            s.witness = next((m for m in probes if m is not s),
                             next((m for m in measured if m is not s), None))
        expected = {m.spec.cid: spec.msgs_per_sender * sum(
            1 for cs in spec.clients if cs.role == "send" and cs.cid != m.spec.cid)
            for m in measured}
        rate_mode = spec.rate_per_sender > 0
        heap: list[tuple[int, int, Client]] = []
        if rate_mode:
            period = 1e9 / spec.rate_per_sender
            total_senders = max(1, sum(1 for cs in spec.clients if cs.role == "send"))
            for s in senders:
                phase = int(period * (s.spec.cid % total_senders) / total_senders)
                heapq.heappush(heap, (t0_ns + phase, s.spec.cid, s))
            stop_send_ns = t0_ns + int(spec.duration_s * 1e9)
            end_ns = min(hard_deadline_ns, stop_send_ns + int(spec.drain_s * 1e9))
        else:
            end_ns = hard_deadline_ns
            period = 0.0
            stop_send_ns = end_ns
        pad = "x" * spec.pad
        while time.monotonic_ns() < t0_ns:
            time.sleep(min(0.01, (t0_ns - time.monotonic_ns()) / 1e9 + 1e-4))
        if not rate_mode:
            self._top_up_window(senders)
        last_slow_check = 0
        batch_ns = int(self.spec.batch_ms * 1e6)
        idle_batch_ns = int(self.spec.idle_batch_ms * 1e6)
        next_batch = next_idle_batch = time.monotonic_ns()
        while True:
            now = time.monotonic_ns()
            if now >= end_ns:
                break
            if self.n_batched:
                if now >= next_batch:
                    self._read_batch(self.bulk_poll)
                    next_batch = now + batch_ns
                if now >= next_idle_batch:
                    self._read_batch(self.idle_poll)
                    next_idle_batch = now + idle_batch_ns
            if rate_mode:
                while heap and heap[0][0] <= now:
                    due, cid, s = heapq.heappop(heap)
                    if s.state != READY or due >= stop_send_ns or s.next_seq > spec.msgs_per_sender:
                        continue
                    self.max_lag_ns = max(self.max_lag_ns, now - due)
                    seq = s.next_seq
                    s.next_seq += 1
                    if len(s.outbuf) > MAX_OUTBUF:
                        s.skipped += 1
                    else:
                        self._count_sent(s, now)
                        self._send_now(s, self._payload(s, seq, pad))
                    heapq.heappush(heap, (due + int(period), cid, s))
                timeout = 0.05 if not heap else max(0.0, min(0.05, (heap[0][0] - now) / 1e9))
            else:
                timeout = 0.05
            if self.n_batched:
                timeout = max(0.0, min(timeout, (next_batch - now) / 1e9))
            self._serve_ready(timeout)
            if not rate_mode:
                self._top_up_window(senders)
            if self.slow and now - last_slow_check > 50_000_000:
                last_slow_check = now
                for fd, _ev in self.slow_poll.poll(0):
                    c = self.clients[fd]
                    if not c.closed_at_ns:
                        c.closed_at_ns = now
                        c.close_reason = "server hung up"
                        self.slow_poll.unregister(fd)
            # done early when every measured receiver here has all it can expect
            sending_over = (not heap) if rate_mode else all(
                s.next_seq > spec.msgs_per_sender or s.state != READY for s in senders)
            if sending_over and not rate_mode and all(
                    m.unique >= expected[m.spec.cid] or m.state != READY for m in measured):
                break
        self.end_ns = time.monotonic_ns()

    def drain_slow(self, limit_s: float = 2.0) -> None:
        """Read what a slow client was sent, to see if it got a notice before the cut."""
        for c in self.slow:
            c.sock.setblocking(True)
            c.sock.settimeout(0.2)
            deadline = time.monotonic() + limit_s
            tail = b""
            total = 0
            while time.monotonic() < deadline:
                try:
                    data = c.sock.recv(RECV_CHUNK)
                except TimeoutError:
                    break
                except OSError as exc:
                    c.close_reason = c.close_reason or f"recv: {exc.strerror}"
                    break
                if not data:
                    c.close_reason = c.close_reason or "eof at drain"
                    break
                if c.tls is not None:
                    data = self._tls_recv(c, data)
                    if c.state == CLOSED:
                        c.close_reason = c.close_reason or "tls closed at drain"
                        break
                total += len(data)
                tail = (tail + data)[-8192:]
            c.payload_bytes_seen = total
            c.unique = len(PAYLOAD_RE.findall(tail)) if total else 0
            c.notices = [ln.decode("utf-8", "replace")[:200] for ln in tail.split(b"\n")
                         if _is_notice(ln) or ln.startswith(b"* ")][-3:]

    def tls_session(self) -> dict[str, Any] | None:
        """What TLS the clients spoke (protocol, cipher suite, how many held a session at the
        end), from the sessions themselves: the proof that the run was encrypted."""
        sessions = [c.tls for c in self.clients.values() if c.tls is not None and c.state == READY]
        if not sessions:
            return None
        cipher = sessions[0].cipher()
        return {"version": sessions[0].version(), "cipher": cipher[0] if cipher else None,
                "sessions": len(sessions)}

    def report(self) -> dict[str, Any]:
        measured = [c for c in self.clients.values() if c.spec.role in ("send", "recv")]
        per_rx = {c.spec.cid: {sid.decode(): int(sum(st[0])) for sid, st in c.rx.items()}
                  for c in measured}
        return {
            "ready": sum(1 for c in self.clients.values() if c.state == READY),
            "idle_deliveries": sum(c.unique for c in self.clients.values()
                                   if c.spec.role == "idle"),
            "closed": sum(1 for c in self.clients.values() if c.state == CLOSED),
            "close_reasons": _count(c.close_reason for c in self.clients.values()
                                    if c.state == CLOSED and c.spec.role != "slow"),
            "sent": {c.spec.cid: c.sent for c in self.clients.values() if c.spec.role == "send"},
            "skipped": sum(c.skipped for c in self.clients.values()),
            "per_rx": per_rx,
            "dups": sum(c.dups for c in measured),
            "reorders": sum(c.reorders for c in measured),
            "selfs": sum(c.selfs for c in measured),
            "notices": [n for c in measured for n in c.notices][:10],
            "lat": self.lat.tobytes(),
            "net_lat": self.net_lat.tobytes(),
            "clock_drift_us": abs(_realtime_offset_ns() - self.clock_offset) / 1000,
            "buckets_deliv": self.buckets_deliv,
            "buckets_expect": self.buckets_expect,
            "max_lag_ms": self.max_lag_ns / 1e6,
            "errors": self.errors,
            "tls": self.tls_session(),
            "slow": [{"cid": c.spec.cid,
                      "cut_after_s": (round((c.closed_at_ns - self.t0) / 1e9, 3)
                                      if c.closed_at_ns else None),
                      "reason": c.close_reason or None,
                      "bytes_read_at_end": c.payload_bytes_seen,
                      "last_lines": c.notices} for c in self.slow],
        }


def _is_notice(line: bytes) -> bool:
    """An error or goodbye from the server, as opposed to chat or presence."""
    return line.startswith(b"! ") or (line.startswith(b"{") and (
        b'"type":"error"' in line or b'"type": "error"' in line
        or b'"type":"bye"' in line or b'"type": "bye"' in line))


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return out


def _realtime_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC, the smaller of a few tries (the tightest pair)."""
    best = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        r = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, r - (m0 + m1) // 2)
    assert best is not None
    return best[1]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _worker_main(conn: Connection, spec: LoadSpec, cids: list[int]) -> None:
    raise_nofile()
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    w = Worker(spec, cids)
    cpu_start = _cpu_s()
    w.connect_all(time.monotonic() + spec.connect_timeout_s)
    conn.send(("ready", sum(1 for c in w.clients.values() if c.state == READY),
               _cpu_s() - cpu_start))
    limit = spec.connect_timeout_s + spec.max_run_s + 60
    msg = w.keep_reading_until_told(conn, limit)
    if msg is not None and msg[0] == "probe":
        _, sender, t_ns, until_ns = msg
        conn.send(("probed", w.room_probe(sender, t_ns, until_ns)))
        msg = w.keep_reading_until_told(conn, limit)
    if msg is None or msg[0] != "go":
        return
    w.arrange_batches()
    _, t0_ns, deadline_ns = msg
    cpu0 = _cpu_s()
    w.run(t0_ns, deadline_ns)
    cpu = _cpu_s() - cpu0
    w.drain_slow()
    rep = w.report()
    rep["cpu_s"] = cpu
    rep["batched"] = w.n_batched
    rep["end_ns"] = w.end_ns
    rep["last_delivery_ns"] = w.last_delivery_ns
    conn.send(("done", rep))
    for c in w.clients.values():
        if c.state != CLOSED:
            c.sock.close()


def raise_nofile() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; 5,000 sockets need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Fleet:
    """The coordinator's handle on the worker processes of one run.

    ``connect()`` forks the workers and waits until every client registered (or the connect
    deadline passed); ``run()`` starts them together and returns the merged report.  Always
    ``close()`` (it joins or terminates the workers it started).
    """

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.ctx = mp.get_context("fork")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.ready = 0
        self.connect_s = 0.0
        self.connect_cpu_s = 0.0  # the workers' CPU while connecting

    def connect(self) -> int:
        t = time.monotonic()
        n = max(1, self.spec.workers)
        shares: list[list[int]] = [[] for _ in range(n)]
        for i, c in enumerate(self.spec.clients):
            shares[i % n].append(c.cid)
        for share in shares:
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(target=_worker_main, args=(child, self.spec, share))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        deadline = time.monotonic() + self.spec.connect_timeout_s + 10
        for conn in self.conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("worker did not finish connecting")
            _, n_ready, cpu = conn.recv()
            self.ready += n_ready
            self.connect_cpu_s += cpu
        self.connect_s = time.monotonic() - t
        return self.ready

    def room_probe(self, wait_s: float = 5.0) -> dict[str, Any]:
        """One message from the first client to the room; how many of the clients held saw
        it within ``wait_s``, and when the last did (seconds after sending)."""
        sender = self.spec.clients[0].cid
        t_ns = time.monotonic_ns()
        until = t_ns + int(wait_s * 1e9)
        for conn in self.conns:
            conn.send(("probe", sender, t_ns, until))
        outs = []
        for conn in self.conns:
            if not conn.poll(wait_s + 30):
                raise TimeoutError("worker did not report the room probe")
            outs.append(conn.recv()[1])
        held = sum(o["held"] for o in outs)
        reached = sum(o["reached"] for o in outs)
        last = max(o["last_ns"] for o in outs)
        return {"probe_held": held, "probe_reached": reached,
                "probe_last_s": round((last - t_ns) / 1e9, 3) if reached > 1 else None,
                "probe_all_s": (round((last - t_ns) / 1e9, 3)
                                if held and reached == held else None),
                "probe_wait_s": wait_s}

    def run(self) -> dict[str, Any]:
        spec = self.spec
        t0 = time.monotonic_ns() + 100_000_000
        limit = spec.duration_s + spec.drain_s if spec.rate_per_sender > 0 else spec.max_run_s
        limit = min(limit, spec.max_run_s)
        deadline = t0 + int(limit * 1e9)
        for conn in self.conns:
            conn.send(("go", t0, deadline))
        reps = []
        for conn in self.conns:
            if not conn.poll(limit + 30):
                raise TimeoutError("worker did not report")
            reps.append(conn.recv()[1])
        return merge(spec, reps, t0)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


def percentile(sorted_vals: list[int] | array.array[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return float(sorted_vals[i])


def merge(spec: LoadSpec, reps: list[dict[str, Any]], t0: int) -> dict[str, Any]:
    """Fold the workers' reports into one result: deliveries, loss, dups, latency."""
    sent: dict[int, int] = {}
    for r in reps:
        sent.update({int(k): v for k, v in r["sent"].items()})
    measured = [c.cid for c in spec.clients if c.role in ("send", "recv")]
    expected = 0
    unique = 0
    lost = 0
    for r in reps:
        for rx, per in r["per_rx"].items():
            for sid, n_sent in sent.items():
                if sid == rx:
                    continue
                got = per.get(str(sid), 0)
                expected += n_sent
                unique += got
                lost += max(0, n_sent - got)
    reporting = sum(len(r["per_rx"]) for r in reps)
    end_ns = max(r["end_ns"] for r in reps)
    # the last delivery: the last non-empty second bucket is coarse; use the per-run end
    deliv: dict[int, int] = {}
    expect: dict[int, float] = {}
    for r in reps:
        for k, v in r["buckets_deliv"].items():
            deliv[k] = deliv.get(k, 0) + v
        for k, v in r["buckets_expect"].items():
            expect[k] = expect.get(k, 0) + v
    return {
        "clients_measured": len(measured),
        "receivers_reporting": reporting,
        "senders": len(sent),
        "sent": sum(sent.values()),
        "skipped": sum(r["skipped"] for r in reps),
        "expected_deliveries": expected,
        "deliveries": unique,
        "lost": lost,
        "dups": sum(r["dups"] for r in reps),
        "reorders": sum(r["reorders"] for r in reps),
        "self_echoes": sum(r["selfs"] for r in reps),
        "run_s": (end_ns - t0) / 1e9,
        "latency_ms": _summary(reps, "lat"),
        "net_latency_ms": _summary(reps, "net_lat"),
        "clock_drift_us": max(r["clock_drift_us"] for r in reps),
        "last_delivery_s": (max(r["last_delivery_ns"] for r in reps) - t0) / 1e9,
        "timeline": [{"s": k, "delivered": deliv.get(k, 0), "offered": int(expect.get(k, 0))}
                     for k in range(0, max([*deliv, *expect, 0]) + 1)],
        "gen_cpu_s": sum(r["cpu_s"] for r in reps),
        "ready_end": sum(r["ready"] for r in reps),
        "idle_deliveries": sum(r["idle_deliveries"] for r in reps),
        "batched_clients": sum(r["batched"] for r in reps),
        "gen_max_send_lag_ms": max(r["max_lag_ms"] for r in reps),
        "close_reasons": _merge_counts(r["close_reasons"] for r in reps),
        "errors": _merge_counts(r["errors"] for r in reps),
        "notices": [n for r in reps for n in r["notices"]][:5],
        "slow": [s for r in reps for s in r["slow"]],
        "tls": _merge_tls([r["tls"] for r in reps]),
    }


def _merge_tls(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The workers' TLS sessions: None when no client spoke TLS; versions and ciphers as
    seen (one each, unless something differed)."""
    got = [p for p in parts if p]
    if not got:
        return None
    return {"version": "/".join(sorted({p["version"] for p in got})),
            "cipher": "/".join(sorted({p["cipher"] for p in got})),
            "sessions": sum(p["sessions"] for p in got)}


def _summary(reps: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Percentiles (ms) of the nanosecond samples the workers reported under ``key``."""
    samples = array.array("q")
    for r in reps:
        samples.frombytes(r[key])
    sorted_ns = sorted(samples)
    return {"n": len(sorted_ns),
            "p50": percentile(sorted_ns, 50) / 1e6,
            "p90": percentile(sorted_ns, 90) / 1e6,
            "p99": percentile(sorted_ns, 99) / 1e6,
            "max": (sorted_ns[-1] / 1e6) if sorted_ns else float("nan")}


def _merge_counts(ds: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
