"""A rogue daemon's attacks on a network, run as a program inside its own host namespace.

    python tests/rogue_attack.py TARGETS_JSON

``TARGETS_JSON``: ``[{"addr", "port", "node", "key"}, ...]``, the honest daemons (their node
ids and public keys, as ``lanchat status`` shows them).  Against each one, the rogue (a key
of its own, speaking the real link protocol through :class:`rogue.Rogue`) tries, each on a
fresh connection:

1. ``impersonate``: a hello claiming another honest node's id (with the rogue's key);
2. ``forge``: a run of entries in another honest node's name, signed with the rogue's key
   and sent with the rogue's key, then with the victim's real public key;
3. ``silence``: ``floor {victim, 2**40}``, the frame that once silenced an origin for ever;
4. ``roster``: the victim's roster (all its users gone) signed with the rogue's key, and a
   ``gone`` of the victim the rogue never brought;
5. ``stay``: then it links honestly, claims in its roster to be linked to everyone, writes
   two messages of its own (that much a member may do) and stays until killed.

It prints one JSON line per attempt (what the daemon answered), for the test's diagnostics;
every read is bounded by a timeout, and the program ends by itself after ``STAY_S``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

from rogue import BASE_TS, Rogue

#: How long the rogue stays linked at the end, at most (the test kills it earlier).
STAY_S = 60.0
#: How long a new link may be refused as a duplicate of the one just closed.
LINK_RETRY_S = 15.0


def _answer(r: Rogue, timeout: float = 3.0) -> str:
    """What the daemon did: closed the connection, or the type of its next frames."""
    seen = []
    try:
        for _ in range(20):
            frame = r.frame(timeout)
            seen.append(str(frame.get("type")) + (f":{frame.get('code')}" if "code" in frame
                                                  else ""))
    except (EOFError, ConnectionResetError, BrokenPipeError):
        seen.append("closed")
    except TimeoutError:
        seen.append("quiet")
    return ",".join(seen)


def _report(target: dict[str, Any], attack: str, answer: str) -> None:
    print(json.dumps({"target": target["node"][:8], "attack": attack, "answer": answer}),
          flush=True)


def _linked(target: dict[str, Any]) -> Rogue:
    """A fresh link; while the daemon still holds our last one (it is closing), try again
    (at most LINK_RETRY_S)."""
    deadline = time.monotonic() + LINK_RETRY_S
    while True:
        r = Rogue(target["port"], host=target["addr"])
        try:
            r.handshake(cursors={})
            return r
        except AssertionError:
            r.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def attack(target: dict[str, Any], others: list[dict[str, Any]]) -> None:
    for victim in others:
        r = Rogue(target["port"], host=target["addr"])
        with contextlib.suppress(OSError):
            r.hello(node=victim["node"])
        _report(target, "impersonate", _answer(r))
        r.close()
        for key in ("feed", victim["key"]):
            r = _linked(target)
            feed = r.feed(victim["node"])
            with contextlib.suppress(OSError):
                r.msgs([feed.entry(seq, f"forged by the rogue {seq}", nick="victim",
                                   ts=BASE_TS + seq) for seq in (1, 2, 3)], key=key)
            _report(target, "forge", _answer(r))
            r.close()
        r = _linked(target)
        with contextlib.suppress(OSError):
            r.floor(victim["node"], 2**40)
        _report(target, "silence", _answer(r))
        r.close()
        r = _linked(target)
        with contextlib.suppress(OSError):
            r.roster({"node": victim["node"], "ver": 2**52, "name": "victim", "host": "h",
                      "gone": False, "users": [], "links": []})
            r.send({"type": "gone", "node": victim["node"], "ver": 1})
        _report(target, "roster", _answer(r))
        r.close()


def main(argv: list[str]) -> int:
    targets: list[dict[str, Any]] = json.loads(argv[1])
    for target in targets:
        attack(target, [t for t in targets if t is not target])
    # Then a member of the network like any other, for a while: linked to every honest
    # daemon, saying it is linked to all, writing a little of its own.
    stays = []
    for target in targets:
        r = _linked(target)
        r.roster({"node": r.node, "ver": 1, "name": "rogue", "host": "roguehost",
                  "gone": False, "users": [], "links": [t["node"] for t in targets]})
        r.msgs([r.message(seq, f"the rogue's own {seq}") for seq in (1, 2)])
        stays.append(r)
    print(json.dumps({"attack": "stay", "linked": len(stays)}), flush=True)
    deadline = time.monotonic() + STAY_S
    while time.monotonic() < deadline:
        for r in stays:
            with contextlib.suppress(OSError):
                r.ping()
                with contextlib.suppress(TimeoutError, EOFError):
                    r.frame(0.2)
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
