"""How many copies of each message a daemon of a mesh takes in; print ONE JSON line.

    python bench/mesh.py [--sizes 2,4,10,20] [--messages 300] [--rate 100] [--repeat 1]

For each size N, N lanchat daemons on 127.0.0.1 (``--no-discovery``) form a full mesh by
``--peer`` (each is told every other's port).  One JSON-mode client per daemon; the client on
daemon 0 sends ``--messages`` messages of a fixed size at ``--rate`` per second.  Measured:

- **copies received per message per daemon**: the TCP payload bytes each daemon received on
  its *link* sockets while the messages flowed (``ss -tinp``: the kernel's ``bytes_received``
  of every socket whose other end belongs to another daemon of the mesh), minus what the same
  links carry in an idle window as long as the send (keepalives), divided by the bytes of one
  copy.  One copy = what the single receiver of the 2-daemon mesh took in for the same
  messages, measured in the same invocation (so frame formats and batching need no model);
- the same for daemon 0, the origin: copies of its own messages sent back to it;
- **delivery**: every client's count of distinct messages (each must see each message once);
- **end-to-end latency** from the send on daemon 0 to the client on daemon N-1 (p50/p99).

The kernel counts are read by ``ss`` (iproute2) from outside the daemons: nothing in lanchat
is instrumented for this.  Link sockets that close during a phase lose their count; the line
reports ``link_sockets_changed`` so such a run can be thrown out.  Loopback only, bounded in
count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import servers

from lanchat.client import ControlClient

#: How long the daemons of one mesh may take to all be linked to each other.
LINK_TIMEOUT_S = 90.0
#: How long after the last send every client must have every message.
DRAIN_TIMEOUT_S = 60.0
#: Text of every message: a fixed length, so every copy is the same size on the wire.
TEXT_BYTES = 100
#: The unique head of every message's text: "mesh-" and ten digits.
TAG_BYTES = 15

#: A socket's line of ``ss -tinpH state established`` (no state column with a state filter).
_SS_LINE = re.compile(r"^\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)\s.*?pid=(\d+),")
_SS_BYTES = re.compile(r"bytes_received:(\d+)")


@dataclass
class Probe:
    """A JSON-mode hub client that counts distinct messages and records when each came."""

    sock: socket.socket
    seen: dict[str, float] = field(default_factory=dict)
    buf: bytes = b""

    def read(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise RuntimeError("a hub closed a probe's connection")
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        now = time.monotonic()
        for line in lines:
            if not line.startswith(b'{"type":"message"') and b'"message"' not in line[:40]:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                msg = json.loads(line)
                if msg.get("type") in ("message", "sent"):
                    text = msg["message"]["text"]
                    if text.startswith("mesh-"):
                        self.seen.setdefault(text[:TAG_BYTES], now)


def _probe(port: int, nick: str) -> Probe:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall((json.dumps({"type": "hello", "v": 1, "nick": nick, "room": "mesh"}) + "\n")
              .encode())
    s.setblocking(False)
    return Probe(s)


def _link_bytes(pids: set[int]) -> tuple[dict[int, int], frozenset[tuple[str, int, str, int]]]:
    """Per daemon pid: bytes received on link sockets now; and the set of link sockets."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    # ss prints a socket's line and its tcp_info on the next line.
    rows: list[tuple[str, int, str, int, int, int]] = []
    pending: tuple[str, int, str, int, int] | None = None
    for line in out.splitlines():
        m = _SS_LINE.match(line)
        if m:
            pending = (m[1], int(m[2]), m[3], int(m[4]), int(m[5]))
            continue
        if pending is not None:  # its tcp_info line; no bytes_received while it is 0
            b = _SS_BYTES.search(line)
            rows.append((*pending, int(b[1]) if b else 0))
            pending = None
    owner = {(la, lp): pid for la, lp, _, _, pid, _ in rows if pid in pids}
    got = {pid: 0 for pid in pids}
    links = set()
    for la, lp, pa, pp, pid, received in rows:
        other = owner.get((pa, pp))
        if pid in pids and other is not None and other != pid:
            got[pid] += received
            links.add((la, lp, pa, pp))
    return got, frozenset(links)


#: How long one ``peers`` call may take while a mesh links.  A daemon's first answer makes
#: every peer's fingerprint (5,200 SHA-512 rounds each); with 20 daemons linking on two
#: cores that took more than the client's default 5 s (2026-12-07).
PEERS_TIMEOUT_S = 30.0


def _all_linked(mesh: list[servers.Server], n: int) -> bool:
    for srv in mesh:
        assert srv.socket_path is not None
        with ControlClient(srv.socket_path, timeout=PEERS_TIMEOUT_S) as c:
            peers = c.call("peers")
        if sum(1 for p in peers if p.get("state") == "linked") < n - 1:
            return False
    return True


def _pump(sel: selectors.BaseSelector, until: float) -> None:
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        for key, _ in sel.select(min(left, 0.05)):
            key.data.read()


def run_mesh(n: int, messages: int, rate: float, state_root: str | None = None
             ) -> dict[str, Any]:
    """One mesh of ``n``; ``state_root``: where the daemons keep their history (default:
    each one's temporary directory under /tmp, on the disk)."""
    ports = [servers.free_port() for _ in range(n)]
    mesh: list[servers.Server] = []
    probes: list[Probe] = []
    states: list[str] = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(n):
            peers = [a for j in range(n) if j != i for a in ("--peer", f"127.0.0.1:{ports[j]}")]
            extra = ["--port", str(ports[i]), "--nick", f"d{i}", *peers]
            if state_root is not None:
                states.append(tempfile.mkdtemp(prefix="lcmesh", dir=state_root))
                extra += ["--state-dir", states[-1]]  # the last --state-dir wins
            srv = servers.start("lanchat", extra)
            mesh.append(srv)
        t0 = time.monotonic()
        while not _all_linked(mesh, n):
            if time.monotonic() - t0 > LINK_TIMEOUT_S:
                raise RuntimeError(f"mesh of {n} not linked within {LINK_TIMEOUT_S} s")
            time.sleep(0.5)
        linked_s = time.monotonic() - t0
        for i, srv in enumerate(mesh):
            p = _probe(srv.port, f"p{i}")
            probes.append(p)
            sel.register(p.sock, selectors.EVENT_READ, p)
        # Welcomes, and the rosters that every new link sets off (each relayed everywhere)
        # settle before the idle window, or that window would count them as keepalives.
        _pump(sel, time.monotonic() + 2.0 + 0.25 * n)
        pids = {s.pid for s in mesh}
        send_s = messages / rate
        # Idle window as long as the send: what links carry with nothing to say.
        idle0, links0 = _link_bytes(pids)
        _pump(sel, time.monotonic() + send_s)
        idle1, _ = _link_bytes(pids)
        sent_at: dict[str, float] = {}
        sender = probes[0]
        start = time.monotonic()
        for k in range(messages):
            tag = f"mesh-{k:010d}"
            body = tag + "x" * (TEXT_BYTES - len(tag))
            line = (json.dumps({"type": "say", "text": body, "room": "mesh"}) + "\n").encode()
            sender.sock.setblocking(True)
            sender.sock.sendall(line)
            sender.sock.setblocking(False)
            sent_at[tag] = time.monotonic()
            _pump(sel, start + (k + 1) / rate)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (time.monotonic() < deadline
               and any(len(p.seen) < messages for p in probes[1:])):
            _pump(sel, time.monotonic() + 0.1)
        _pump(sel, time.monotonic() + 1.0)  # late duplicates still count below
        after, links1 = _link_bytes(pids)
        idle = {pid: idle1[pid] - idle0[pid] for pid in pids}
        busy = {pid: after[pid] - idle1[pid] - idle[pid] for pid in pids}
        last = probes[-1]
        lat = sorted((last.seen[t] - sent_at[t]) * 1000 for t in sent_at if t in last.seen)
        return {
            "n": n, "messages": messages, "rate": rate, "linked_s": round(linked_s, 1),
            "delivered_min": min(len(p.seen) for p in probes[1:]),
            "link_bytes": [busy[s.pid] for s in mesh],
            "idle_link_bytes": [idle[s.pid] for s in mesh],
            "link_sockets_changed": links0 != links1,
            "e2e_p50_ms": round(statistics.median(lat), 2) if lat else None,
            "e2e_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
            "daemon_cpu_s": [round(servers.cpu_s(s.pid), 2) for s in mesh],
        }
    finally:
        for p in probes:
            with contextlib.suppress(OSError):
                p.sock.close()
        sel.close()
        for srv in mesh:
            _stop(srv)
        for path in states:
            shutil.rmtree(path, ignore_errors=True)


def _stop(srv: servers.Server) -> None:
    """SIGTERM (a clean shutdown), SIGKILL after 10 s; remove its state directory."""
    if srv.proc.poll() is None:
        srv.proc.terminate()
        try:
            srv.proc.wait(10)
        except subprocess.TimeoutExpired:
            servers._kill(srv.proc)
    if srv.tmpdir:
        shutil.rmtree(srv.tmpdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2,4,10,20")
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--state-root", default=None,
                    help="keep the daemons' history here (e.g. /dev/shm: no disk flushes)")
    a = ap.parse_args(argv)
    sizes = sorted({int(x) for x in a.sizes.split(",")} | {2})
    if not 2 <= sizes[-1] <= 32 or not 1 <= a.messages <= 20_000 or not 0 < a.rate <= 2000:
        ap.error("sizes 2..32, messages 1..20000, rate (0, 2000]")
    runs = [run_mesh(n, a.messages, a.rate, a.state_root) for n in sizes]
    one_copy = runs[0]["link_bytes"][1] / a.messages  # the 2-mesh receiver: one copy each
    for r in runs:
        per = [b / a.messages / one_copy for b in r["link_bytes"]]
        r["copies_origin"] = round(per[0], 2)
        r["copies_per_daemon"] = [round(x, 2) for x in per[1:]]
        r["copies_max"] = round(max(per[1:]), 2)
        r["copies_mean"] = round(statistics.mean(per[1:]), 2)
    print(json.dumps({"scenario": "mesh", "bytes_per_copy": round(one_copy, 1),
                      "state_root": a.state_root or "/tmp (disk)",
                      "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
                      "cpus": os.cpu_count(), "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
