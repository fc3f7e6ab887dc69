"""Token buckets and the per-connection flood policy, with the time passed in (no sleeping)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lanchat.limits import (
    COMMAND_BURST,
    COMMAND_RATE,
    FLOOD_FACTOR,
    FLOOD_GRACE_S,
    RATE_NOTICE_INTERVAL_S,
)
from lanchat.ratelimit import (
    ConnectionLimiter,
    SourceBuckets,
    TokenBucket,
    Verdict,
    default_burst,
)


def test_bucket_starts_full_then_refills_at_its_rate() -> None:
    b = TokenBucket(5, 10)
    assert all(b.take(100.0) for _ in range(10))
    assert not b.take(100.0)
    assert b.wait_time(100.0) == pytest.approx(0.2)
    assert not b.take(100.1)  # half a token
    assert b.take(100.2)
    assert b.take(102.0) and sum(b.take(102.0) for _ in range(20)) == 8  # 9 saved up: 1 + 8


def test_bucket_never_holds_more_than_its_burst() -> None:
    b = TokenBucket(5, 10)
    b.take(0.0)
    assert sum(b.take(1_000_000.0) for _ in range(100)) == 10


def test_rate_zero_is_unlimited() -> None:
    b = TokenBucket(0)
    assert b.unlimited
    assert all(b.take(0.0) for _ in range(100_000))
    assert b.wait_time(0.0) == 0.0 and b.consume(0.0, 10**9) == 0.0


def test_default_burst_is_two_seconds_and_at_least_ten() -> None:
    assert default_burst(1) == 10 and default_burst(5) == 10 and default_burst(20) == 40
    assert TokenBucket(20).burst == 40


def test_wait_time_beyond_the_burst_is_infinite_and_take_of_n() -> None:
    b = TokenBucket(10, 20)
    assert b.wait_time(0.0, 21) == math.inf
    assert b.take(0.0, 15) and not b.take(0.0, 15)
    assert b.wait_time(0.0, 15) == pytest.approx(1.0)


def test_consume_runs_into_debt_and_says_how_long_to_pause() -> None:
    b = TokenBucket(100, 10)
    assert b.consume(0.0, 10) == 0.0
    assert b.consume(0.0, 50) == pytest.approx(0.5)
    assert not b.take(0.4)  # still in debt
    assert b.take(0.52)


def test_time_going_backwards_gains_nothing() -> None:
    b = TokenBucket(1, 1)
    assert b.take(10.0)
    assert not b.take(5.0) and not b.take(10.5)
    assert b.take(11.0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1)
    with pytest.raises(ValueError):
        TokenBucket(float("nan"))
    with pytest.raises(ValueError):
        TokenBucket(5, 0.5)


@given(rate=st.floats(0.5, 1000), burst=st.floats(1, 1000),
       steps=st.lists(st.tuples(st.floats(0, 5), st.integers(1, 50)), max_size=40))
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: float,
                                                       steps: list[tuple[float, int]]) -> None:
    b = TokenBucket(rate, burst)
    now = 0.0
    taken = 0
    for dt, tries in steps:
        now += dt
        taken += sum(b.take(now) for _ in range(tries))
    assert taken <= burst + rate * now + 1e-6


def _run(limiter: ConnectionLimiter, per_second: float, seconds: float,
         *, command: bool = False) -> list[Verdict]:
    check = limiter.command if command else limiter.message
    n = int(per_second * seconds)
    return [check(i / per_second) for i in range(n)]


def test_messages_past_the_rate_are_dropped_with_a_notice_once_a_second() -> None:
    lim = ConnectionLimiter(5)
    verdicts = _run(lim, 50, 4.0)  # 50/s: ten times the rate, under the flood guard's burst
    ok = verdicts.count(Verdict.OK)
    assert 10 + 5 * 4 - 2 <= ok <= 10 + 5 * 4 + 1
    assert Verdict.KICK not in verdicts
    notices = [i / 50 for i, v in enumerate(verdicts) if v is Verdict.NOTIFY]
    assert 3 <= len(notices) <= 4
    assert all(b - a >= RATE_NOTICE_INTERVAL_S - 1e-9 for a, b in itertools.pairwise(notices))


def test_a_sustained_flood_far_past_the_rate_is_kicked_after_the_grace() -> None:
    lim = ConnectionLimiter(5)
    verdicts = _run(lim, 200, 10.0)
    first_kick = verdicts.index(Verdict.KICK) / 200
    # the flood guard allows 5 x 10 = 50/s with FLOOD_GRACE_S of it saved up: at 200/s the
    # 250 saved attempts last 250 / (200 - 50) = 1.7 s
    expected = 5 * FLOOD_FACTOR * FLOOD_GRACE_S / (200 - 5 * FLOOD_FACTOR)
    assert first_kick == pytest.approx(expected, abs=0.05)


def test_rate_zero_never_limits_messages_but_commands_stay_bounded() -> None:
    lim = ConnectionLimiter(0)
    assert set(_run(lim, 10_000, 1.0)) == {Verdict.OK}
    commands = _run(lim, 1000, 1.0, command=True)
    assert commands.count(Verdict.OK) <= COMMAND_BURST + COMMAND_RATE + 1
    assert Verdict.NOTIFY in commands


def test_messages_and_commands_have_separate_buckets() -> None:
    lim = ConnectionLimiter(1)
    for _ in range(1000):  # spend the message bucket
        if lim.message(0.0) is not Verdict.OK:
            break
    else:
        pytest.fail("the message bucket never ran out")
    assert lim.command(0.0) is Verdict.OK


def test_source_buckets_are_one_per_address_and_shared_by_its_connections() -> None:
    """A client that reconnects keeps its address's bucket: no fresh burst per connection."""
    s = SourceBuckets(5, 10, max_sources=100)
    assert sum(s.take("10.0.0.1", 0.0) for _ in range(30)) == 10
    assert sum(s.take("10.0.0.2", 0.0) for _ in range(30)) == 10  # another host: its own
    assert not s.take("10.0.0.1", 0.1)
    assert s.take("10.0.0.1", 0.2)  # refills at the rate
    assert len(s) == 2


def test_source_buckets_forget_the_least_recently_seen_first() -> None:
    s = SourceBuckets(1, 1, max_sources=3)
    for host in ("a", "b", "c"):
        assert s.take(host, 0.0)
    assert not s.take("a", 0.0)  # a is now the most recent, and empty
    assert s.take("d", 0.0)      # b, the least recently seen, is forgotten
    assert len(s) == 3
    assert not s.take("a", 0.0) and not s.take("c", 0.0) and not s.take("d", 0.0)
    assert s.take("b", 0.0)      # b starts again full: hence a generous bound


def test_source_buckets_rate_zero_is_unlimited_and_tracks_nobody() -> None:
    s = SourceBuckets(0, max_sources=1)
    assert all(s.take(f"h{i}", 0.0) for i in range(1000))
    assert len(s) == 0


def test_a_refusal_by_a_shared_limit_is_notified_once_per_interval() -> None:
    limiter = ConnectionLimiter(5)
    assert limiter.message(0.0) is Verdict.OK
    assert limiter.message_refused(0.0) is Verdict.NOTIFY
    assert limiter.message_refused(0.5) is Verdict.DROP
    assert limiter.message_refused(RATE_NOTICE_INTERVAL_S + 0.1) is Verdict.NOTIFY
