"""Token buckets and the per-connection flood policy built from them.

Pure: the time is passed in (``now``, seconds on any monotonic clock), so the
policy is tested without sleeping.  The hub owns one :class:`ConnectionLimiter`
per client; daemon links use a bare :class:`TokenBucket` as a throttle.

A :class:`TokenBucket` holds up to ``burst`` tokens and gains ``rate`` of them
per second; an action costs one token.  Rate 0 means unlimited: every
:meth:`~TokenBucket.take` succeeds and nothing is ever owed.
"""

from __future__ import annotations

import enum
import functools
import math

from lanchat.limits import (
    COMMAND_BURST,
    COMMAND_RATE,
    FLOOD_FACTOR,
    FLOOD_GRACE_S,
    MAX_TRACKED_SOURCES,
    MESSAGE_BURST_S,
    MIN_MESSAGE_BURST,
    NEW_ORIGINS_BURST,
    NEW_ORIGINS_PER_S,
    RATE_NOTICE_INTERVAL_S,
)


def default_burst(rate: float) -> float:
    """The burst that goes with ``rate``: a short paste, at least MIN_MESSAGE_BURST."""
    return max(float(MIN_MESSAGE_BURST), MESSAGE_BURST_S * rate)


def _checked(rate: float, burst: float | None) -> tuple[float, float]:
    """``(rate, burst)`` as floats, the burst defaulted; ValueError if either is impossible."""
    if rate < 0 or math.isnan(rate):
        raise ValueError("rate must be 0 (unlimited) or positive")
    burst = default_burst(rate) if burst is None else float(burst)
    if burst < 1:
        raise ValueError("burst must be at least 1")
    return float(rate), burst


def _refilled(tokens: float, stamp: float | None, now: float, rate: float,
              burst: float) -> float:
    """``tokens`` plus what ``rate`` added from ``stamp`` to ``now``, at most ``burst``
    (nothing if time went backwards or there is no stamp yet)."""
    if stamp is not None and now > stamp:
        return min(burst, tokens + (now - stamp) * rate)
    return tokens


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    Not thread-safe: each bucket belongs to one reader (one connection).
    ``now`` must not go backwards; if it does, the bucket simply gains nothing.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate, self.burst = _checked(rate, burst)
        self._tokens = self.burst
        self._stamp: float | None = None

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def _refill(self, now: float) -> None:
        self._tokens = _refilled(self._tokens, self._stamp, now, self.rate, self.burst)
        if self._stamp is None or now > self._stamp:
            self._stamp = now

    def take(self, now: float, n: float = 1) -> bool:
        """Spend ``n`` tokens if the bucket holds them; False (spending nothing) if not."""
        if self.rate == 0:
            return True
        self._refill(now)
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def wait_time(self, now: float, n: float = 1) -> float:
        """Seconds until ``n`` tokens are there (0.0 = now; ``inf`` if ``n`` > burst)."""
        if self.rate == 0:
            return 0.0
        self._refill(now)
        if self._tokens >= n:
            return 0.0
        if n > self.burst:
            return math.inf
        return (n - self._tokens) / self.rate

    def consume(self, now: float, n: float = 1) -> float:
        """Spend ``n`` tokens even if that runs into debt; return the seconds to pause.

        For throttling rather than dropping (daemon links must lose nothing):
        the caller sleeps the returned time before reading more, which pushes
        back on the sender through TCP flow control.
        """
        if self.rate == 0:
            return 0.0
        self._refill(now)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Verdict(enum.Enum):
    """What to do with one message or command."""

    OK = "ok"          #: carry it out
    DROP = "drop"      #: drop it silently (the client was told less than a second ago)
    NOTIFY = "notify"  #: drop it and tell the client which limit it hit
    KICK = "kick"      #: the client keeps flooding far past its rate: disconnect it


class _Rule:
    """How one kind of action is limited, shared by every connection's :class:`_Limit`.

    ``rate`` per second after a ``burst`` (0 = unlimited), and a flood guard that every
    attempt (kept or dropped) counts against: sustaining FLOOD_FACTOR x the rate for
    FLOOD_GRACE_S beyond the burst is no accident.
    """

    __slots__ = ("burst", "flood_burst", "flood_rate", "rate")

    def __init__(self, rate: float, burst: float | None) -> None:
        self.rate, self.burst = _checked(rate, burst)
        self.flood_rate = self.rate * FLOOD_FACTOR
        self.flood_burst = max(self.burst, self.flood_rate * FLOOD_GRACE_S)


@functools.lru_cache(maxsize=16)
def _rule(rate: float, burst: float | None) -> _Rule:
    return _Rule(rate, burst)


class _Limit:
    """One connection's count against one :class:`_Rule`.

    The state of two token buckets -- the rule's and its flood guard's, refilled
    together from one stamp -- and when the client may next be told, without
    per-connection copies of the rule: a hub keeps one of these for each of
    thousands of mostly idle clients (~140 B; two :class:`TokenBucket` were ~450).
    """

    __slots__ = ("_flood", "_next_notice", "_stamp", "_tokens", "rule")

    def __init__(self, rule: _Rule) -> None:
        self.rule = rule
        self._tokens = rule.burst  # both start full
        self._flood = rule.flood_burst
        self._stamp: float | None = None
        self._next_notice = -math.inf

    def check(self, now: float) -> Verdict:
        rule = self.rule
        if rule.rate == 0:
            return Verdict.OK
        stamp = self._stamp
        if stamp is None or now > stamp:
            self._tokens = _refilled(self._tokens, stamp, now, rule.rate, rule.burst)
            self._flood = _refilled(self._flood, stamp, now, rule.flood_rate, rule.flood_burst)
            self._stamp = now
        if self._flood < 1:
            return Verdict.KICK
        self._flood -= 1
        if self._tokens >= 1:
            self._tokens -= 1
            return Verdict.OK
        return self.refused(now)

    def refused(self, now: float) -> Verdict:
        """An action dropped (here, or by a limit shared with others): notify or not."""
        if now >= self._next_notice:
            self._next_notice = now + RATE_NOTICE_INTERVAL_S
            return Verdict.NOTIFY
        return Verdict.DROP


class ConnectionLimiter:
    """The flood policy for one hub connection.

    Messages (say, ``/me``, ``/msg``) get ``rate`` per second with a burst of
    :func:`default_burst` (``rate`` 0 = unlimited); other commands get the fixed,
    generous COMMAND_RATE so that a ``/users`` flood cannot burn CPU.  Past its
    limit an action is dropped, with a :attr:`Verdict.NOTIFY` at most once per
    RATE_NOTICE_INTERVAL_S; a client that sustains FLOOD_FACTOR times the limit
    gets :attr:`Verdict.KICK`.  Each count is made at its first use: a client
    that never speaks holds none for messages.  Not thread-safe (one per reader).
    """

    __slots__ = ("_command_rule", "_commands", "_message_rule", "_messages")

    def __init__(self, rate: float, *, burst: float | None = None,
                 command_rate: float = COMMAND_RATE,
                 command_burst: float = COMMAND_BURST) -> None:
        self._message_rule = _rule(float(rate), burst)
        self._command_rule = _rule(float(command_rate), command_burst)
        self._messages: _Limit | None = None
        self._commands: _Limit | None = None

    @property
    def rate(self) -> float:
        return self._message_rule.rate

    @property
    def command_rate(self) -> float:
        return self._command_rule.rate

    def _message_limit(self) -> _Limit:
        if self._messages is None:
            self._messages = _Limit(self._message_rule)
        return self._messages

    def message(self, now: float) -> Verdict:
        """Verdict on one chat message sent at ``now``."""
        return self._message_limit().check(now)

    def message_refused(self, now: float) -> Verdict:
        """A message this limiter let through was refused by a limit shared with other
        connections (:class:`SourceBuckets`): NOTIFY at most once per
        RATE_NOTICE_INTERVAL_S, like its own refusals, else DROP."""
        return self._message_limit().refused(now)

    def command(self, now: float) -> Verdict:
        """Verdict on one command other than a message (or quit, which is never limited)."""
        if self._commands is None:
            self._commands = _Limit(self._command_rule)
        return self._commands.check(now)


class SourceBuckets:
    """A :class:`TokenBucket` per source address, for at most ``max_sources`` addresses.

    What a per-connection limit cannot see: a client that reconnects gets a
    fresh burst each time, but its address keeps one bucket.  A new address
    past ``max_sources`` makes the least recently seen one forgotten (it would
    start again with a full bucket: hence a generous bound).  ``rate`` 0 is
    unlimited.  Not thread-safe: the owner locks.
    """

    __slots__ = ("_buckets", "burst", "max_sources", "rate")

    def __init__(self, rate: float, burst: float | None = None, *, max_sources: int) -> None:
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.rate = float(rate)
        self.burst = default_burst(rate) if burst is None else float(burst)
        self.max_sources = max_sources
        # Insertion order is recency: a bucket is re-inserted whenever it is used.
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str, now: float, n: float = 1) -> bool:
        """Spend ``n`` of ``source``'s tokens if it holds them; False (spending nothing) if not."""
        if self.rate == 0:
            return True
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]  # the least recently seen
            bucket = TokenBucket(self.rate, self.burst)
        self._buckets[source] = bucket
        return bucket.take(now, n)


class NewOrigins:
    """How many new origins each peer may introduce: a token bucket per peer address.

    A peer that invents origins (each a cursor we keep and send in every
    ``sync``) is held to NEW_ORIGINS_PER_S after a burst of NEW_ORIGINS_BURST.
    Kept per address, not per link, so that redialing buys no fresh burst; at
    most MAX_TRACKED_SOURCES addresses, the least recently used forgotten first.
    The total is bounded apart (limits.MAX_ORIGINS, in the router).
    Not thread-safe: the router thread owns it.
    """

    def __init__(self, rate: float = NEW_ORIGINS_PER_S, burst: float = NEW_ORIGINS_BURST) -> None:
        self._rate, self._burst = rate, burst
        self._buckets: dict[object, TokenBucket] = {}

    def admit(self, source: object, wanted: int, now: float) -> int:
        """How many of ``wanted`` new origins ``source`` may bring now (spends that many)."""
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst)
            if len(self._buckets) >= MAX_TRACKED_SOURCES:
                del self._buckets[next(iter(self._buckets))]
        self._buckets[source] = bucket  # now the most recently used
        n = 0
        while n < wanted and bucket.take(now):
            n += 1
        return n
