"""What signed feeds cost (lanchat.feed): signing, parsing, run verification, catch-up.

    python bench/feed.py [--messages 20000] [--repeat 3] [--hub-us 69] [--catchup-rate 14000]
                         [--json]

Pure CPU work in this process (no sockets, no servers) on ``--messages`` chat messages of
one origin, typical chat lines (~60 bytes of text).  Each figure is the median over
``--repeat`` runs of the fastest of 5 slices of the messages (on a shared machine other
processes only ever add time); within a run, today's way and the signed way of each thing
are measured one right after the other.  Prints a table, or one JSON line with ``--json``.
Bounded: about 30 s with the defaults on this machine (per-entry verification of 20,000
signatures is the slow part, ~3 s a run).

What it answers (issue 13's targets; see bench/README.md "Signed feeds"):

- Live fan-out may cost at most 15 % more with signatures on.  The origin's added work per
  message (body, hash, and a signature per batch) is compared with ``--hub-us``, the CPU
  the daemon spends per message in ``bench/run.py fanout`` (server_cpu_s / messages sent:
  1.38 CPU-s for 20,000 messages, i.e. 69 us, measured on this machine in the session that
  wrote this script).
- Catch-up of 20,000 messages by a new daemon at least as fast as today (``--catchup-rate``,
  ~14,000 messages/s, start-up included).  The receiver's and sender's added work per
  message (frames of runs of 64 against today's frames of message objects) is added to
  today's per-message time to project the rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanchat.feed import (
    MSG_DOMAIN,
    Entry,
    FeedHead,
    SigningKey,
    cut_runs,
    encode_body,
    parse_run,
    sign_entries,
    verify_run,
)
from lanchat.framing import dumps_line, loads_line
from lanchat.limits import MAX_RUN_ENTRIES
from lanchat.model import Message

Result = dict[str, Any]


def _messages(key: SigningKey, n: int) -> list[Message]:
    return [Message(origin=key.node, seq=i, ts=1_763_700_000.0 + i * 0.013, room="lobby",
                    nick="alice", host="alice-laptop",
                    text=f"message {i}: see you at the stand-up, bring the figures")
            for i in range(1, n + 1)]


#: Each figure is the best of this many slices of the messages: other processes on a shared
#: machine only ever add time, so the fastest slice is the one closest to the code's cost.
SLICES = 5


def _best_us(fn: Callable[[Sequence[Any]], object], items: Sequence[Any],
             per_item: int = 1) -> float:
    """``fn`` run on each of SLICES slices of ``items``: the fastest, in us per item."""
    size = max(1, len(items) // SLICES)
    best = float("inf")
    for i in range(0, size * SLICES, size):
        part = items[i:i + size]
        t0 = time.perf_counter()
        fn(part)
        best = min(best, (time.perf_counter() - t0) / (len(part) * per_item))
    return best * 1e6


def _batches(key: SigningKey, msgs: Sequence[Message], size: int) -> list[Entry]:
    out: list[Entry] = []
    # a slice of the feed starts after an entry we do not have here: any hash will do
    head = None if msgs[0].seq == 1 else FeedHead(msgs[0].seq - 1, "0" * 64)
    for i in range(0, len(msgs), size):
        out += sign_entries(key, msgs[i:i + size], head)
        head = out[-1].head
    return out


def _frames_today(msgs: Sequence[Message]) -> list[bytes]:
    return [dumps_line({"type": "msgs", "m": [m.to_dict() for m in msgs[i:i + MAX_RUN_ENTRIES]]})
            for i in range(0, len(msgs), MAX_RUN_ENTRIES)]


def _frames_signed(runs: Sequence[Sequence[Entry]]) -> list[bytes]:
    return [dumps_line({"type": "msgs", "e": [e.to_wire() for e in run]}) for run in runs]


def measure_once(key: SigningKey, msgs: Sequence[Message]) -> Result:
    """One run of every figure, one after the other (today's and the signed way of each
    thing measured side by side, so that both meet the same load on a shared machine)."""
    pub = key.public
    n = len(msgs)
    r: Result = {}

    # -- the origin: what storing one of our own messages costs on top of today ----------
    body = encode_body(msgs[0], None)
    r["sign_us"] = _best_us(lambda part: [key.sign(MSG_DOMAIN + body) for _ in part],
                            range(min(n, 2000)))
    for size in (1, 8, MAX_RUN_ENTRIES):
        r[f"append_batch{size}_us"] = _best_us(functools.partial(_batches, key, size=size),
                                               msgs)

    # -- the receiver ----------------------------------------------------------------------
    entries = _batches(key, msgs, MAX_RUN_ENTRIES)  # as a busy origin writes them
    runs, rest = cut_runs(entries)
    assert not rest and all(len(run) == MAX_RUN_ENTRIES for run in runs[:-1])
    all_signed = _batches(key, msgs, 1)  # as a quiet origin writes them: every entry signed
    r["verify_us"] = _best_us(lambda part: [verify_run((e,), pub) for e in part],
                              all_signed[:min(n, 1000)])
    wire_dicts = [e.to_wire() for e in entries]
    today_dicts = [m.to_dict() for m in msgs]
    r["parse_entry_us"] = _best_us(lambda part: [Entry.from_wire(d) for d in part], wire_dicts)
    r["parse_message_today_us"] = _best_us(lambda part: [Message.from_dict(d) for d in part],
                                           today_dicts)
    r["verify_run64_us"] = _best_us(lambda part: [verify_run(run, pub) for run in part], runs,
                                    MAX_RUN_ENTRIES)
    r["verify_each_us"] = _best_us(lambda part: [verify_run((e,), pub) for e in part],
                                   all_signed)
    r["runs"] = len(runs)

    # -- catch-up over a link: frames of 64, encoded by the sender, decoded by the receiver -
    signed_frames = _frames_signed(runs)
    all_signed_frames = _frames_signed([all_signed[i:i + MAX_RUN_ENTRIES]
                                        for i in range(0, n, MAX_RUN_ENTRIES)])
    today_frames = _frames_today(msgs)
    r["frame_bytes_per_msg_today"] = sum(map(len, today_frames)) / n
    r["frame_bytes_per_msg_signed"] = sum(map(len, signed_frames)) / n
    r["send_today_us"] = _best_us(_frames_today, msgs)
    r["send_signed_us"] = _best_us(_frames_signed, runs, MAX_RUN_ENTRIES)

    def receive_today(frames: Sequence[bytes]) -> None:
        for frame in frames:
            for d in loads_line(frame)["m"]:
                Message.from_dict(d)

    def receive_signed(frames: Sequence[bytes], each: bool) -> None:
        for frame in frames:
            run = parse_run(loads_line(frame)["e"])
            if each:
                for e in run:
                    verify_run((e,), pub)
            else:
                verify_run(run, pub)

    r["receive_today_us"] = _best_us(receive_today, today_frames, MAX_RUN_ENTRIES)
    r["receive_run64_us"] = _best_us(lambda part: receive_signed(part, False), signed_frames,
                                     MAX_RUN_ENTRIES)
    r["receive_each_us"] = _best_us(lambda part: receive_signed(part, True),
                                    all_signed_frames, MAX_RUN_ENTRIES)
    return r


def measure(n: int, repeat: int) -> Result:
    """The median over ``repeat`` runs of each figure."""
    key = SigningKey(b"\x07" * 32)
    msgs = _messages(key, n)
    runs = [measure_once(key, msgs) for _ in range(repeat)]
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}


def derive(r: Result, hub_us: float, catchup_rate: float) -> Result:
    """The figures the issue's targets are judged by."""
    d: Result = {}
    for size in (1, 8, MAX_RUN_ENTRIES):
        d[f"fanout_cost_batch{size}_pct"] = 100 * r[f"append_batch{size}_us"] / hub_us
    # The sender and the receiver of a catch-up are two processes on two cores, and the
    # receiver (parse, store, route) is the slower: its added work is what slows the run.
    today_us = 1e6 / catchup_rate
    d["catchup_receive_added_us"] = r["receive_run64_us"] - r["receive_today_us"]
    d["catchup_send_added_us"] = r["send_signed_us"] - r["send_today_us"]
    d["catchup_projected_per_s"] = 1e6 / (today_us + d["catchup_receive_added_us"])
    d["catchup_projected_each_per_s"] = 1e6 / (today_us + r["receive_each_us"]
                                                - r["receive_today_us"])
    d["verify_share_run64_pct"] = 100 * r["verify_run64_us"] / today_us
    return d


def table(p: Result, r: Result, d: Result) -> str:
    n = p["messages"]
    rows = [
        ("Ed25519 sign, one message", f"{r['sign_us']:.1f} us"),
        ("Ed25519 verify, one message", f"{r['verify_us']:.1f} us"),
        ("origin: body+hash+entry, every message signed (batch 1)",
         f"{r['append_batch1_us']:.1f} us/msg = {d['fanout_cost_batch1_pct']:.0f} % of the "
         f"hub's {p['hub_us']:.0f} us"),
        ("origin: the same, batches of 8 (signed: batch ends)",
         f"{r['append_batch8_us']:.1f} us/msg = {d['fanout_cost_batch8_pct']:.0f} %"),
        (f"origin: the same, batches of {MAX_RUN_ENTRIES}",
         f"{r['append_batch64_us']:.1f} us/msg = {d['fanout_cost_batch64_pct']:.0f} %"),
        ("parse one entry (wire dict -> Entry)", f"{r['parse_entry_us']:.1f} us"),
        ("parse one message today (Message.from_dict)", f"{r['parse_message_today_us']:.1f} us"),
        (f"verify_run, {n:,} entries in {r['runs']} runs of {MAX_RUN_ENTRIES}",
         f"{r['verify_run64_us']:.2f} us/entry ({r['verify_run64_us'] * n / 1e6:.3f} s)"),
        (f"verify each entry's signature, {n:,} entries",
         f"{r['verify_each_us']:.1f} us/entry ({r['verify_each_us'] * n / 1e6:.2f} s)"),
        ("catch-up, send: frames of 64, today / signed",
         f"{r['send_today_us']:.1f} / {r['send_signed_us']:.1f} us/msg"),
        ("catch-up, receive: today / runs of 64 / each verified",
         f"{r['receive_today_us']:.1f} / {r['receive_run64_us']:.1f} / "
         f"{r['receive_each_us']:.1f} us/msg"),
        ("frame bytes per message, today / signed",
         f"{r['frame_bytes_per_msg_today']:.0f} / {r['frame_bytes_per_msg_signed']:.0f}"),
        ("catch-up, added per message: receiver / sender",
         f"{d['catchup_receive_added_us']:+.1f} / {d['catchup_send_added_us']:+.1f} us"),
        (f"catch-up projected from {p['catchup_rate']:,.0f} msg/s today (receiver-bound)",
         f"{d['catchup_projected_per_s']:,.0f} msg/s with runs of {MAX_RUN_ENTRIES}; "
         f"{d['catchup_projected_each_per_s']:,.0f} msg/s verifying each"),
    ]
    width = max(len(a) for a, _ in rows)
    head = (f"signed feeds: {n:,} messages, median of {p['repeat']} runs (best of "
            f"{SLICES} slices each), "
            f"python {sys.version.split()[0]}")
    return "\n".join([head, *(f"{a:<{width}}  {b}" for a, b in rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="what signed feeds cost (pure CPU, no network)")
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hub-us", type=float, default=69.0,
                    help="the daemon's CPU per message in bench/run.py fanout (us)")
    ap.add_argument("--catchup-rate", type=float, default=14_000.0,
                    help="today's catch-up rate over a link (messages/s)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    a = ap.parse_args(argv)
    if not 64 <= a.messages <= 200_000 or not 1 <= a.repeat <= 9:
        ap.error("--messages must be 64-200000 and --repeat 1-9")
    params = {"messages": a.messages, "repeat": a.repeat, "hub_us": a.hub_us,
              "catchup_rate": a.catchup_rate}
    r = measure(a.messages, a.repeat)
    d = derive(r, a.hub_us, a.catchup_rate)
    if a.json:
        print(json.dumps({"scenario": "feed", "params": params,
                          "results": {k: round(v, 3) for k, v in {**r, **d}.items()}}))
    else:
        print(table(params, r, d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
