"""A routed item and the encodings made of it, computed once per fan-out.

The router hands one :class:`Event` to every subscriber.  A hub connection in
text mode, one in JSON mode, a ``lanchat tail`` and a daemon link each need a
different byte string; :meth:`Event.encoded` makes each one once and caches
it, so sending a message to a hundred text clients renders it once, not a
hundred times.  A :class:`Batch` does the same for a commit's events that
many receivers get alike (everyone in the room who sent none of them): their
bytes are joined once per encoding, not once per receiver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


class Batch(list[Event]):
    """A commit's events in order, handed as one list to every receiver that gets all of them.

    The router builds one per fan-out of several events in a room; the receivers it
    gives this same list to can share the joined bytes (:meth:`joined`) instead of
    each encoding and joining every event again -- that was a fifth of the router's
    time in a busy room.  Thread-safety as for :class:`Event`.
    """

    __slots__ = ("_joined",)

    def __init__(self, events: Iterable[Event]) -> None:
        super().__init__(events)
        self._joined: dict[tuple[Callable[[Any], bytes], Callable[[Any], bytes]], bytes] = {}

    def joined(self, for_message: Callable[[Any], bytes],
               for_presence: Callable[[Any], bytes]) -> bytes:
        """Every event encoded (messages by one encoder, presence by the other), joined."""
        key = (for_message, for_presence)
        data = self._joined.get(key)
        if data is None:
            data = self._joined[key] = encode_all(self, for_message, for_presence)
        return data


def encode_all(events: Iterable[Event], for_message: Callable[[Any], bytes],
               for_presence: Callable[[Any], bytes]) -> bytes:
    """``events`` encoded (messages by one encoder, presence by the other) and joined."""
    return b"".join([e.encoded(for_message if isinstance(e.item, Message) else for_presence)
                     for e in events])
