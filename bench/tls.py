"""What the issue-14 building blocks cost in CPU: TLS 1.3 with the node key, proofs, seals.

    python bench/tls.py [--messages 20000] [--handshakes 50] [--repeat 3] [--json]

Pure CPU in this process: both ends of each TLS connection run here over memory BIOs (no
sockets, no threads), so the figures are the crypto and ``ssl`` work alone, which the
wiring adds to today's per-message cost.  Each figure is the median of ``--repeat`` runs.

- ``handshake_ms``: one TLS 1.3 handshake (X25519 key exchange, Ed25519 certificate), both
  ends' CPU, plus the pinning check (``tlsid.peer_key_for``).
- ``link_proof_us``: the dialer's signature of the link handshake's transcript, made and checked.
- ``tls_us_per_msg``: encrypting and decrypting ``--messages`` chat lines (~140-byte JSON
  frames) through TLS, in writes of 64 frames (a link's ``msgs`` batch), both ends' CPU per
  message; ``tls_us_per_single`` the same with one frame per write (a live line to one
  client: a record each).  Compare with the daemon's ~48-69 us of CPU per message
  (bench/README.md) to project what TLS adds to link replay and hub fan-out (issue 14
  allows 20 %).
- ``seal_us`` / ``open_us``: one sealed direct message of a chat line, made and opened.
"""

from __future__ import annotations

import argparse
import json
import secrets
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanchat import handshake, seal, tlsid
from lanchat.feed import SigningKey

BATCH = 64


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def _pair(server_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject,
                                                Callable[[], None]]:
    """A connected client/server pair over memory BIOs, and the function that moves bytes."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = tlsid.client_context().wrap_bio(c_in, c_out)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)

    def move() -> None:
        _pump(c_out, s_in)
        _pump(s_out, c_in)

    for _ in range(10):
        done = 0
        for end in (client, server):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        move()
        if done == 2:
            break
    return client, server, move


def handshake_ms(server_ctx: ssl.SSLContext, node: str, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        client, _, _ = _pair(server_ctx)
        tlsid.peer_key_for(client.getpeercert(binary_form=True), node)
    return (time.process_time() - start) / n * 1000


FRAME = (b'{"type":"msg","id":"0123456789abcdef0123456789abcdef:12345","room":"lobby",'
         b'"nick":"alice","text":"see you at the coffee machine in five"}\n')


def tls_us_per_msg(server_ctx: ssl.SSLContext, messages: int, per_write: int) -> float:
    """Both ends' CPU per frame, ``per_write`` frames per TLS write (one record)."""
    client, server, move = _pair(server_ctx)
    batch = FRAME * per_write
    start = time.process_time()
    got = 0
    for _ in range(messages // per_write):
        client.write(batch)
        move()
        for _ in range(100):
            try:
                got += len(server.read(1 << 20))
            except ssl.SSLWantReadError:
                break
    elapsed = time.process_time() - start
    assert got == len(batch) * (messages // per_write), got
    return elapsed / (messages // per_write * per_write) * 1e6


def link_proof_us(n: int) -> float:
    a, b = SigningKey(secrets.token_bytes(32)), SigningKey(secrets.token_bytes(32))
    start = time.process_time()
    for _ in range(n):
        # The link handshake's signatures inside TLS: the dialer's proof, made and checked.
        t = handshake.transcript(handshake.Side(a.node, a.public, secrets.token_hex(32)),
                                 handshake.Side(b.node, b.public, secrets.token_hex(32)))
        assert handshake.check(a.public, handshake.prove(a, handshake.DIALER, t),
                               handshake.DIALER, t)
    return (time.process_time() - start) / n * 1e6


def seal_us(n: int) -> tuple[float, float]:
    a, b = SigningKey(secrets.token_bytes(32)), SigningKey(secrets.token_bytes(32))
    da, db = seal.DhKey.derive(a, 1), seal.DhKey.derive(b, 1)
    pa, pb = seal.DhPublic(a.node, da.public), seal.DhPublic(b.node, db.public)
    text = b"see you at the coffee machine in five"
    start = time.process_time()
    blobs = [seal.seal(text, sender=pa, recipient=pb, entropy=secrets.token_bytes)
             for _ in range(n)]
    sealed = time.process_time() - start
    start = time.process_time()
    for blob in blobs:
        assert seal.open_sealed(blob, db, sender=pa, recipient=pb) == text
    return sealed / n * 1e6, (time.process_time() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--handshakes", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    key = SigningKey(secrets.token_bytes(32))
    start = time.process_time()
    ctx = tlsid.server_context(key)
    context_ms = (time.process_time() - start) * 1000
    runs: dict[str, list[float]] = {k: [] for k in (
        "handshake_ms", "link_proof_us", "tls_us_per_msg", "tls_us_per_single", "seal_us",
        "open_us")}
    for _ in range(args.repeat):
        runs["handshake_ms"].append(handshake_ms(ctx, key.node, args.handshakes))
        runs["link_proof_us"].append(link_proof_us(200))
        runs["tls_us_per_msg"].append(tls_us_per_msg(ctx, args.messages, BATCH))
        runs["tls_us_per_single"].append(tls_us_per_msg(ctx, args.messages, 1))
        s, o = seal_us(200)
        runs["seal_us"].append(s)
        runs["open_us"].append(o)
    results = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    results["server_context_ms"] = round(context_ms, 2)
    results["openssl"] = ssl.OPENSSL_VERSION
    if args.json:
        print(json.dumps({"results": results}))
    else:
        for name, value in results.items():
            print(f"{name:>18}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
