"""Run lanchat discovery inside a test network namespace and report what it sees.

Only ever run inside a namespace built by tests/netns.py: it multicasts on every usable
interface it finds.  Prints one JSON line per event to stdout, flushed:

    {"event": "starting", "t"}                 (just before start(): probing begins)
    {"event": "started", "name": <advertised label>, "service": ..., "t": <time.time()>}
    {"event": "found", "node", "name", "addresses", "port", "udp", "v", "auth", "service", "t"}
    {"event": "lost", "node", "t"}
    {"event": "updated", "port", "t"}          (after SIGUSR1: re-announce with port + 1)
    {"event": "closed", "t"}                   (after SIGTERM/SIGINT or --max-seconds)

``browse`` mode does one ``browse_hubs()`` and prints {"event": "browsed", "hubs": [...]}.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanchat.discovery import Discovery, PeerAd, browse_hubs

_out_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, **fields, "t": time.time()})
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def ad_fields(p: PeerAd) -> dict[str, Any]:
    return {"node": p.node, "name": p.name, "addresses": list(p.addresses), "port": p.port,
            "udp": p.udp_port, "v": p.version, "auth": p.auth, "service": p.service_name}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["serve", "browse"], nargs="?", default="serve")
    ap.add_argument("--node", default="00000000000000aa")
    ap.add_argument("--name", default="probe")
    ap.add_argument("--port", type=int, default=7777)
    ap.add_argument("--udp-port", type=int)
    ap.add_argument("--auth", action="store_true")
    ap.add_argument("--interface", action="append", dest="interfaces")
    ap.add_argument("--ip-version", default="v4", choices=["v4", "v6", "all"])
    ap.add_argument("--poll", type=float, default=30.0, help="interface poll interval, s")
    ap.add_argument("--timeout", type=float, default=3.0, help="browse mode: seconds")
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--flaky-callbacks", action="store_true",
                    help="callbacks raise after reporting (discovery must survive that)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")

    if args.mode == "browse":
        hubs = browse_hubs(args.timeout, interfaces=args.interfaces, ip_version=args.ip_version)
        emit("browsed", hubs=[ad_fields(h) for h in hubs])
        return 0

    stop = threading.Event()
    bump = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def on_usr1(*_: object) -> None:
        bump.set()
        stop.set()          # wake the main loop; it tells the two apart

    signal.signal(signal.SIGUSR1, on_usr1)

    def on_found(p: PeerAd) -> None:
        emit("found", **ad_fields(p))
        if args.flaky_callbacks:
            raise RuntimeError("on_found failed on purpose")

    def on_lost(node: str) -> None:
        emit("lost", node=node)
        if args.flaky_callbacks:
            raise RuntimeError("on_lost failed on purpose")

    d = Discovery(node_id=args.node, name=args.name, port=args.port, udp_port=args.udp_port,
                  interfaces=args.interfaces, ip_version=args.ip_version, auth=args.auth,
                  on_found=on_found, on_lost=on_lost, interface_poll_s=args.poll)
    emit("starting")
    d.start()
    try:
        emit("started", name=d.advertised_name, service=d.service_name)
        port = args.port
        deadline = time.monotonic() + args.max_seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if not stop.wait(remaining):
                break
            if bump.is_set():
                bump.clear()
                stop.clear()
                port += 1
                d.update(port=port)
                emit("updated", port=port)
                continue
            break
    finally:
        d.close()
        emit("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
