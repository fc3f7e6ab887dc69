"""A routed item and the encodings made of it, computed once per fan-out.

The router hands one :class:`Event` to every subscriber.  A hub connection in
text mode, one in JSON mode, a ``lanchat tail`` and a daemon link each need a
different byte string; :meth:`Event.encoded` makes each one once and caches
it, so sending a message to a hundred text clients renders it once, not a
hundred times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lanchat.model import Message, Presence

if TYPE_CHECKING:
    from lanchat.feed import Entry

Item = Message | Presence


class Event:
    """One item on its way to subscribers.

    ``source`` is the subscriber it came from (a hub connection, a link), so the
    router does not echo it back; ``None`` for the node's own messages.  A message
    of a signed feed carries its ``entry`` (the bytes links relay) and ``checked``:
    we verified or made its signature, so a run we relay may end there.
    Thread-safety: events are shared between writer threads; the cache is a
    dict whose racing writers store equal values, which is harmless.
    """

    __slots__ = ("_cache", "checked", "entry", "item", "source")

    def __init__(self, item: Item, source: object | None = None,
                 entry: Entry | None = None, checked: bool = False) -> None:
        self.item = item
        self.source = source
        self.entry = entry
        self.checked = checked
        self._cache: dict[Callable[[Any], bytes], bytes] = {}

    @property
    def room(self) -> str:
        return self.item.room

    def encoded(self, encoder: Callable[[Any], bytes]) -> bytes:
        """``encoder(self.item)``, computed at most once per encoder (up to races)."""
        data = self._cache.get(encoder)
        if data is None:
            data = encoder(self.item)
            self._cache[encoder] = data
        return data

    def __repr__(self) -> str:
        return f"Event({self.item!r})"
