"""Which links a daemon relays a message to: one copy per daemon in a full mesh.

Relaying every new message to every other link (flooding) delivers everywhere, but in a
full mesh each daemon then takes in a copy from every neighbour that got it first: N-2
duplicates per message per daemon, and work that grows with the size of the LAN
(bench/mesh.py measured 6.4 copies per message per daemon at 10 daemons).

The rule here uses what every daemon already publishes about itself: the set of daemons it
is linked to (its roster's ``links``, signed by it).  A link between two daemons *counts*
only when both ends list each other, so no single daemon can invent one (a hostile node
claiming to be linked to everyone would otherwise stop the others from relaying to them).
Daemon X, having first received message m of origin O from neighbour S (S = None for X's
own messages), relays m to each neighbour Q unless

- Q is O or S (they have it), or
- Q is linked to O (O sends its messages to all its neighbours itself), or
- Q is linked to S (S applied this same rule to Q when it received m, so it has either
  sent m to Q or skipped Q for a neighbour of Q that received m even earlier).

With true link sets this still reaches every daemon of a connected network: if X skips Q
because of S, then S is a neighbour of Q that had m before X did; following "skipped
because of" backwards in time from any daemon that never got m ends at O, which sends to
every neighbour -- a contradiction (tests/test_relay.py proves it on random graphs).
In a full mesh every daemon then gets exactly one copy, straight from the origin, and the
origin gets none back.  Where the sets are stale (a link just died) or a linked neighbour
withholds (a hostile one), a copy can be missed: the gap check on the next message of that
origin and the periodic cursor digest of each link (anti-entropy) fetch it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping


class LinkMap:
    """Who says they are linked to whom; a link counts when both ends say so."""

    __slots__ = ("_claims",)

    def __init__(self, claims: Mapping[str, Iterable[str]] | None = None) -> None:
        self._claims: dict[str, frozenset[str]] = {}
        for node, links in (claims or {}).items():
            self.set(node, links)

    def set(self, node: str, links: Iterable[str]) -> None:
        """``node``'s own, latest statement of the daemons it is linked to."""
        self._claims[node] = frozenset(links) - {node}

    def forget(self, node: str) -> None:
        self._claims.pop(node, None)

    def linked(self, a: str, b: str) -> bool:
        """Both ``a`` and ``b`` say they are linked to each other."""
        return b in self._claims.get(a, ()) and a in self._claims.get(b, ())

    def claims(self, node: str) -> frozenset[str]:
        return self._claims.get(node, frozenset())


def relay_targets(neighbours: Collection[str], *, me: str, origin: str, sender: str | None,
                  links: LinkMap) -> list[str]:
    """The neighbours of ``me`` to pass a message of ``origin`` on to, first received from
    ``sender`` (None: from a client of ours).  See the module docstring."""
    return [q for q in neighbours
            if should_relay(q, me=me, origin=origin, sender=sender, links=links)]


def should_relay(q: str, *, me: str, origin: str, sender: str | None, links: LinkMap) -> bool:
    """Whether ``me`` passes a message of ``origin``, first received from ``sender``, on to
    its neighbour ``q`` (see the module docstring)."""
    if q == sender:
        return False
    if origin == me:  # the origin sends to every neighbour: that is what the rule relies on
        return True
    if q == origin or links.linked(q, origin):
        return False
    return sender is None or not links.linked(q, sender)
