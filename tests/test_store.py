"""Tests of lanchat.store against real SQLite files in temporary directories."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lanchat import store as store_module
from lanchat.errors import ClosedError, LocalProtocolError, StoreError, ValidationError
from lanchat.feed import (
    UNSIGNED_PREV,
    Entry,
    FeedHead,
    SigningKey,
    sign_entries,
    verify_run,
)
from lanchat.limits import FUTURE_SKEW_S, MAX_HISTORY_PAGE
from lanchat.model import Draft, Message
from lanchat.store import MIGRATIONS, Store

A = "aaaaaaaaaaaaaaaa"
B = "bbbbbbbbbbbbbbbb"
C = "cccccccccccccccc"
REPO = Path(__file__).resolve().parent.parent


def draft(text: str = "hi", *, room: str = "lobby", to: str | None = None,
          uid: int | None = None) -> Draft:
    return Draft(text=text, nick="alice", host="box", room=room, to=to, uid=uid)


def msg(origin: str, seq: int, ts: float | None = None, *, text: str | None = None,
        room: str = "lobby", to: str | None = None) -> Message:
    return Message(origin=origin, seq=seq, ts=float(seq) if ts is None else ts, room=room,
                   nick="bob", host="far", text=text or f"{origin[:1]}{seq}", to=to)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hist" / "history.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    try:
        yield s
    finally:
        s.close()


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection for looking at (or tampering with) the file behind the store."""
    return sqlite3.connect(path, isolation_level=None)


def seqs(messages: list[Message]) -> list[int]:
    return [m.seq for m in messages]


def open_fds_to(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            continue
    return n


# ---- opening, schema, node id ---------------------------------------------------


def test_new_store_has_schema_wal_and_private_files(db: Path, store: Store) -> None:
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with raw(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_node_id_is_created_once_and_kept(db: Path) -> None:
    with Store(db) as s:
        node = s.node_id
    assert len(node) == 16 and all(c in "0123456789abcdef" for c in node)
    with Store(db) as s:
        assert s.node_id == node
    with Store(db.parent / "other.db") as s:
        assert s.node_id != node


def test_a_key_derived_node_id_starts_a_new_feed_and_keeps_old_messages(db: Path) -> None:
    """Upgrade in place (issue 13): history written under the old random id stays under it."""
    with Store(db) as s:
        old = s.node_id
        s.append_local([draft("before the key")], ts=1.0)
    new = "ab" * 16
    with Store(db, node_id=new) as s:
        assert s.node_id == new
        (m,) = s.append_local([draft("after the key")], ts=2.0)
        assert (m.origin, m.seq) == (new, 1)
        assert [(x.origin, x.seq, x.text) for x in s.history(limit=10)] == [
            (old, 1, "before the key"), (new, 1, "after the key")]
    with Store(db) as s:  # opened on its own later: the daemon's id is the one kept
        assert s.node_id == new


def test_refuses_a_database_from_a_newer_version(db: Path) -> None:
    Store(db).close()
    conn = raw(db)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    conn.close()
    with pytest.raises(StoreError, match="newer lanchat") as info:
        Store(db)
    assert str(db) in str(info.value)


def test_migrates_an_older_database_keeping_its_data(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(db) as s:
        node = s.node_id
        s.append_local([draft("before the upgrade")], ts=10.0)
    v2 = (*MIGRATIONS, ("ALTER TABLE messages ADD COLUMN edited REAL",
                        "CREATE INDEX messages_edited ON messages (edited)"))
    monkeypatch.setattr(store_module, "MIGRATIONS", v2)
    with Store(db) as s:
        assert s.node_id == node
        assert [m.text for m in s.history()] == ["before the upgrade"]
        assert seqs(s.append_local([draft()], ts=11.0)) == [2]
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(v2)
    cols = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
    assert "edited" in cols
    conn.close()


def test_a_new_database_is_built_all_or_nothing(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new database gets every migration in one transaction (one commit at start-up):
    a failure in the last one leaves no table of the first."""
    broken = (*MIGRATIONS, ("THIS IS NOT SQL",))
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match="cannot open history"):
        Store(db)
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    conn.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with Store(db) as s:
        assert seqs(s.append_local([draft("first")], ts=1.0)) == [1]


def test_a_failing_migration_leaves_the_database_at_its_old_version(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(db) as s:
        s.append_local([draft("kept")], ts=1.0)
    broken = (*MIGRATIONS, ("ALTER TABLE messages ADD COLUMN edited REAL",
                            "THIS IS NOT SQL"))
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match="cannot open history"):
        Store(db)
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    cols = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
    assert "edited" not in cols  # the first statement was rolled back with the second
    conn.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with Store(db) as s:
        assert [m.text for m in s.history()] == ["kept"]


def test_a_file_that_is_not_a_database_is_a_store_error(db: Path) -> None:
    db.parent.mkdir()
    db.write_bytes(b"this is not an sqlite database at all, just some text\n" * 100)
    with pytest.raises(StoreError, match="not a database") as info:
        Store(db)
    assert str(db) in str(info.value)


def test_a_parent_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(StoreError, match="cannot open history"):
        Store(tmp_path / "plain" / "history.db")


@contextlib.contextmanager
def refusing_writes(directory: Path) -> Iterator[str]:
    """Make ``directory`` and the files in it refuse writes; yield the kernel's reason.

    Root writes through permission bits, so as root (the way the whole suite runs) the
    directory is bind-mounted read-only onto itself, and unmounted at the end, pass or fail;
    as anyone else its mode and its files' modes lose their write bits.
    """
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", directory, directory], check=True,
                       capture_output=True, timeout=10)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", directory], check=True,
                           capture_output=True, timeout=10)
            yield os.strerror(errno.EROFS)
        finally:
            if subprocess.run(["umount", directory], capture_output=True, timeout=10,
                              check=False).returncode != 0:
                subprocess.run(["umount", "-l", directory], capture_output=True, timeout=10,
                               check=False)
        return
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.iterdir()]}
    for p in modes:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        yield os.strerror(errno.EACCES)
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)


def test_a_read_only_database_refuses_writes_and_keeps_data(db: Path) -> None:
    with Store(db) as s:
        s.append_local([draft()], ts=1.0)
    with (refusing_writes(db.parent) as reason, pytest.raises(StoreError) as info,
          Store(db) as s):
        s.append_local([draft()], ts=2.0)
    assert str(info.value) == f"cannot open history at {db}: {reason}"
    with Store(db) as s:
        assert seqs(s.history()) == [1]


# ---- append_local -----------------------------------------------------------


def test_append_local_stamps_our_origin_with_consecutive_seqs(store: Store) -> None:
    out = store.append_local([draft("one"), draft("two", room="#Dev"), draft("dm", to="bob")],
                             ts=100.0)
    assert seqs(out) == [1, 2, 3]
    assert {m.origin for m in out} == {store.node_id}
    assert [m.id for m in out] == [f"{store.node_id}:{i}" for i in (1, 2, 3)]
    assert [(m.room, m.to) for m in out] == [("lobby", None), ("dev", None), ("lobby", "bob")]
    assert store.history() == out
    assert store.append_local([], ts=101.0) == []
    assert seqs(store.append_local([draft()], ts=101.0)) == [4]
    assert store.cursors() == {store.node_id: 4}


def test_seqs_have_no_gaps_across_reopen(db: Path) -> None:
    for round_ in range(3):
        with Store(db) as s:
            got = s.append_local([draft() for _ in range(5)], ts=float(round_))
            assert seqs(got) == list(range(round_ * 5 + 1, round_ * 5 + 6))
    with Store(db) as s:
        assert seqs(s.after(s.node_id, 0, 100)) == list(range(1, 16))


def test_our_ts_never_goes_backwards(db: Path) -> None:
    with Store(db) as s:
        s.append_local([draft("a")], ts=1000.0)
        stepped_back = s.append_local([draft("b")], ts=500.0)
    assert stepped_back[0].ts == 1000.0
    with Store(db) as s:  # the last ts is remembered across restarts
        assert s.append_local([draft("c")], ts=900.0)[0].ts == 1000.0
        assert s.append_local([draft("d")], ts=1001.5)[0].ts == 1001.5
        assert [m.text for m in s.history()] == ["a", "b", "c", "d"]


def test_uid_is_stored_locally_only(db: Path, store: Store) -> None:
    store.append_local([draft(uid=1234), draft()], ts=1.0)
    store.insert_remote([msg(A, 1)])
    conn = raw(db)
    rows = conn.execute("SELECT origin, seq, uid FROM messages ORDER BY arrival").fetchall()
    conn.close()
    assert rows == [(store.node_id, 1, 1234), (store.node_id, 2, None), (A, 1, None)]


def test_a_failed_append_stores_nothing_and_consumes_no_seq(db: Path, store: Store) -> None:
    store.append_local([draft("first")], ts=1.0)
    # Make the third insert of the next batch fail, as a full disk would, mid-transaction.
    conn = raw(db)
    conn.execute("CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.text = 'boom' "
                 "BEGIN SELECT RAISE(ABORT, 'boom'); END")
    with pytest.raises(StoreError, match=r"cannot write history at .*: boom"):
        store.append_local([draft("ok"), draft("ok too"), draft("boom")], ts=2.0)
    assert [m.text for m in store.history()] == ["first"]
    assert store.cursors() == {store.node_id: 1}
    conn.execute("DROP TRIGGER boom")
    conn.close()
    assert seqs(store.append_local([draft("next")], ts=3.0)) == [2]
    assert [m.text for m in store.history()] == ["first", "next"]


def test_disk_full_is_a_clear_store_error_and_consumes_no_seq(store: Store) -> None:
    store.append_local([draft(f"m{i}") for i in range(10)], ts=1.0)
    before = store.history()
    # A database capped at its current size is, to SQLite, a full disk.  The cap
    # is per connection, so it goes on the store's writer connection.
    writer: sqlite3.Connection = store._writer
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")
    big = [draft("x" * 4000) for _ in range(50)]
    with pytest.raises(StoreError, match="database or disk is full"):
        store.append_local(big, ts=2.0)
    assert store.history() == before
    writer.execute("PRAGMA max_page_count = 1073741823")
    assert seqs(store.append_local([draft()], ts=3.0)) == [11]


# ---- insert_remote ------------------------------------------------------------


def test_insert_remote_stores_only_what_extends_the_prefix(store: Store) -> None:
    got = store.insert_remote([msg(A, 1), msg(A, 2), msg(B, 2), msg(A, 4), msg(B, 1)])
    assert [m.id for m in got] == [f"{A}:1", f"{A}:2", f"{B}:1"]
    assert store.cursors() == {A: 2, B: 1}
    # The rest arrives in the next batch: the prefix continues across batches.
    got = store.insert_remote([msg(A, 3), msg(A, 4), msg(B, 2)])
    assert [m.id for m in got] == [f"{A}:3", f"{A}:4", f"{B}:2"]
    assert store.cursors() == {A: 4, B: 2}


def test_insert_remote_never_replaces_a_stored_id(store: Store) -> None:
    store.insert_remote([msg(A, 1, text="original")])
    assert store.insert_remote([msg(A, 1, text="forged"), msg(A, 1, text="again")]) == []
    assert [m.text for m in store.history()] == ["original"]
    # A duplicate inside one batch is skipped too; the first copy wins.
    got = store.insert_remote([msg(A, 2, text="first"), msg(A, 2, text="second")])
    assert [m.text for m in got] == ["first"]
    assert [m.text for m in store.history()] == ["original", "first"]


def test_own_origin_from_outside_extends_our_prefix(db: Path) -> None:
    with Store(db) as s:
        node = s.node_id
        mine = s.append_local([draft("one"), draft("two")], ts=5.0)
        # Echoes of what we have are duplicates.
        assert s.insert_remote(mine) == []
        # After a restore, peers hand back our later messages: they extend the
        # prefix and append_local continues after them, not over them.
        later = [Message(origin=node, seq=seq, ts=9.0, room="lobby", nick="alice",
                         host="box", text=f"later {seq}") for seq in (3, 4)]
        assert s.insert_remote(later) == later
        nxt = s.append_local([draft("five")], ts=1.0)
        assert seqs(nxt) == [5] and nxt[0].ts == 9.0
        assert s.cursors() == {node: 5}


# ---- history, cursors, after ----------------------------------------------------


@pytest.fixture
def filled(store: Store) -> Store:
    """A at ts 1..10 in lobby; B at ts 1..10 in dev (odd seqs have to='carol')."""
    store.insert_remote([msg(A, i, ts=float(i)) for i in range(1, 11)])
    store.insert_remote([msg(B, i, ts=float(i), room="dev", to="carol" if i % 2 else None)
                         for i in range(1, 11)])
    return store


def key(m: Message) -> tuple[float, str, int]:
    return (m.ts, m.origin, m.seq)


def test_history_is_oldest_first_by_ts_origin_seq(filled: Store) -> None:
    page = filled.history(limit=MAX_HISTORY_PAGE)
    assert len(page) == 20
    assert [key(m) for m in page] == sorted(key(m) for m in page)
    assert [(m.ts, m.origin) for m in page[:2]] == [(1.0, A), (1.0, B)]
    # Direct messages are included; the caller filters them.
    assert sum(1 for m in page if m.to == "carol") == 5


def test_history_limit_takes_the_last_and_is_clamped(filled: Store) -> None:
    assert [key(m) for m in filled.history(limit=3)] == [(9.0, B, 9), (10.0, A, 10),
                                                         (10.0, B, 10)]
    assert len(filled.history(limit=0)) == 1
    assert len(filled.history(limit=-5)) == 1
    filled.insert_remote([msg(C, i, ts=100.0) for i in range(1, MAX_HISTORY_PAGE + 11)])
    page = filled.history(limit=MAX_HISTORY_PAGE * 10)
    assert len(page) == MAX_HISTORY_PAGE
    assert page[-1].seq == MAX_HISTORY_PAGE + 10


def test_history_room_before_since(filled: Store) -> None:
    dev = filled.history(room="dev")
    assert {m.origin for m in dev} == {B} and seqs(dev) == list(range(1, 11))
    assert filled.history(room="nowhere") == []
    # before is exclusive, and gives the last `limit` before it.
    assert [key(m) for m in filled.history(before=3.0, limit=3)] == [
        (1.0, B, 1), (2.0, A, 2), (2.0, B, 2)]
    # since is inclusive and, without before, reads forward: the first `limit`.
    assert [key(m) for m in filled.history(since=9.0, limit=3)] == [
        (9.0, A, 9), (9.0, B, 9), (10.0, A, 10)]
    # since and before together: the last `limit` in [since, before).
    assert [key(m) for m in filled.history(since=2.0, before=5.0, limit=2)] == [
        (4.0, A, 4), (4.0, B, 4)]
    assert seqs(filled.history(room="lobby", since=4.0, before=6.0)) == [4, 5]
    assert filled.history(before=1.0) == []


def test_cursors_and_after(filled: Store) -> None:
    assert filled.cursors() == {A: 10, B: 10}
    assert seqs(filled.after(A, 3, 4)) == [4, 5, 6, 7]
    assert seqs(filled.after(B, 8, 100)) == [9, 10]
    assert filled.after(A, 10, 5) == []
    assert filled.after(C, 0, 5) == []
    assert filled.after(A, 0, 0) == []


# ---- retention -----------------------------------------------------------------


def test_forget_idle_forgets_only_origins_that_hold_no_message(db: Path) -> None:
    with Store(db, max_messages=2) as s:
        s.insert_remote([msg(A, 1, ts=1.0), msg(B, 1, ts=2.0), msg(B, 2, ts=3.0)])
        s.advance("c3" * 8, 5, 4.0)  # a floor: a cursor with no message at all
        assert s.prune(now=1e9) == 1  # A's one message went; B's two stay
        assert sorted(s.forget_idle(10)) == sorted([A, "c3" * 8])
        assert s.cursors() == {B: 2}
        assert s.forget_idle(10) == []  # B holds messages: never forgotten
        assert s.forget_idle(0) == []


def test_retention_by_count_keeps_cursors_and_the_prefix_rule(db: Path) -> None:
    with Store(db, max_messages=5) as s:
        s.insert_remote([msg(A, i) for i in range(1, 9)])
        s.insert_remote([msg(B, i, ts=i + 0.5) for i in range(1, 3)])
        assert s.prune(now=1e9) == 5
        # The five oldest by (ts, origin, seq) went: A1, B1, A2, B2, A3.
        assert [(m.origin, m.seq) for m in s.history()] == [(A, i) for i in range(4, 9)]
        assert s.cursors() == {A: 8, B: 2}
        # Pruned ids stay known: they are not stored again...
        assert s.insert_remote([msg(A, 1), msg(A, 2)]) == []
        # ...and the prefix still continues after the highest seq ever held.
        assert seqs(s.insert_remote([msg(A, 9)])) == [9]
        assert s.prune(now=1e9) == 1
        assert s.prune(now=1e9) == 0
    with Store(db, max_messages=5) as s:
        assert s.cursors() == {A: 9, B: 2}


def test_retention_by_count_deletes_the_oldest_in_history_order(db: Path) -> None:
    with Store(db, max_messages=3) as s:
        s.insert_remote([msg(A, i, ts=10.0 * i) for i in range(1, 4)])
        s.insert_remote([msg(B, i, ts=10.0 * i + 5) for i in range(1, 4)])
        assert s.prune(now=0.0) == 3
        assert [key(m) for m in s.history()] == [(25.0, B, 2), (30.0, A, 3), (35.0, B, 3)]


def test_retention_by_age(db: Path) -> None:
    day = 86400.0
    with Store(db, max_age_days=2) as s:
        s.insert_remote([msg(A, 1, ts=0.0), msg(A, 2, ts=1 * day), msg(A, 3, ts=3 * day)])
        mine = s.append_local([draft()], ts=3 * day + 1)
        assert s.prune(now=3.5 * day) == 2
        assert [m.seq for m in s.history()] == [3, 1]
        assert s.cursors() == {A: 3, s.node_id: 1}
        assert s.after(A, 0, 10)[0].seq == 3  # replay starts where history starts
        assert s.history()[-1] == mine[0]


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
def test_retention_in_steps_removes_exactly_what_one_pass_does(tmp_path: Path,
                                                                 limit: int) -> None:
    """A pass over millions of rows runs as short steps of at most ``limit`` messages (the
    daemon repeats while a step is full): the survivors equal one unlimited pass's."""
    day = 86400.0
    now = 1_700_000_000.0

    def fill(s: Store) -> None:
        s.insert_remote([msg(A, i, ts=now - (12 - i) * day) for i in range(1, 12)], now=now)
        s.insert_remote([msg(B, 1, ts=1e17), msg(B, 2, ts=now)], now=now - 5 * day)
        s.append_local([draft(f"mine {i}") for i in range(4)], ts=now - 4 * day)

    survivors = []
    for path, step in ((tmp_path / "one.db", None), (tmp_path / "steps.db", limit)):
        with Store(path, max_age_days=3, max_messages=6) as s:
            fill(s)
            total, steps = 0, 0
            while True:
                n = s.prune(now=now, limit=step)
                assert step is None or n <= step
                total, steps = total + n, steps + 1
                if step is None or n < step:
                    break
                assert steps < 100
            survivors.append(([(m.origin, m.seq) for m in s.history(limit=100)], total))
    assert survivors[0] == survivors[1]
    assert survivors[0][1] > limit  # it took several steps


def test_a_far_future_message_ages_from_its_arrival(db: Path) -> None:
    """A peer's ts of 1e17 sorts last for ever: retention must still remove it, by age
    counted from when it arrived (issue 13, case 1)."""
    day = 86400.0
    now = 1_700_000_000.0
    with Store(db, max_age_days=2) as s:
        s.insert_remote([msg(A, 1, ts=now), msg(A, 2, ts=1e17)], now=now)
        s.insert_remote([msg(B, 1, ts=now + FUTURE_SKEW_S)], now=now)  # within the skew
        assert s.prune(now=now + 1 * day) == 0
        assert s.prune(now=now + 3 * day) == 3
        assert s.history() == []
        assert s.cursors() == {A: 2, B: 1}


def test_a_far_future_message_counts_from_its_arrival_for_retention_by_count(
        db: Path) -> None:
    with Store(db, max_messages=2) as s:
        s.insert_remote([msg(A, 1, ts=10.0), msg(A, 2, ts=1e17)], now=20.0)
        s.insert_remote([msg(B, 1, ts=30.0), msg(B, 2, ts=40.0)], now=40.0)
        assert s.prune(now=50.0) == 2
        # Oldest first: A1 (ts 10) and A2 (arrived at 20), although A2 sorts last by ts.
        assert [(m.origin, m.seq) for m in s.history()] == [(B, 1), (B, 2)]


def test_a_copy_of_ours_from_the_future_does_not_drag_our_clock(db: Path) -> None:
    """Our latest ts is the floor of our next stamp (so a clock that steps back keeps our
    order); a copy of our own message claiming the year 2100 must not raise that floor
    beyond now + FUTURE_SKEW_S, or every later message of ours would be stamped 2100."""
    now = 1_700_000_000.0
    with Store(db) as s:
        s.append_local([draft("one")], ts=now)
        s.insert_remote([Message(origin=s.node_id, seq=2, ts=4102444800.0, room="lobby",
                                 nick="mallory", host="evil", text="year 2100")], now=now)
        (nxt,) = s.append_local([draft("three")], ts=now + 1)
        assert nxt.seq == 3 and nxt.ts == now + FUTURE_SKEW_S
    legacy = db.parent / "legacy.db"
    with Store(legacy) as s:  # without an arrival time there is no judging the claim
        s.append_local([draft("one")], ts=now)
        s.insert_remote([Message(origin=s.node_id, seq=2, ts=now + 60, room="lobby",
                                 nick="alice", host="box", text="restored")], now=now)
        assert s.append_local([draft("three")], ts=now + 1)[0].ts == now + 60


def test_migration_gives_existing_far_future_rows_an_arrival(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that already holds a far-future message (and a clock dragged along by
    one in our name) is mended by the upgrade: retention reaches the one, the clock is now."""
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:2])
    with Store(db) as s:
        node = s.node_id
    conn = raw(db)
    for origin, seq, ts in ((A, 1, time.time()), (A, 2, 1e17), (node, 1, 4102444800.0)):
        conn.execute("INSERT INTO messages (id, origin, seq, ts, room, nick, host, text)"
                     " VALUES (?, ?, ?, ?, 'lobby', 'bob', 'far', 'x')",
                     (f"{origin}:{seq}", origin, seq, ts))
    conn.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with Store(db, max_age_days=1) as s:
        before = time.time()
        (mine,) = s.append_local([draft("after the upgrade")], ts=before)
        assert mine.ts <= before + FUTURE_SKEW_S + 5
        assert s.prune(now=time.time() + 2 * 86400) == 4
        assert s.history() == []


def test_no_retention_keeps_everything(store: Store) -> None:
    store.insert_remote([msg(A, i, ts=0.0) for i in range(1, 50)])
    assert store.prune(now=1e12) == 0
    assert len(store.history(limit=100)) == 49


# ---- threads, close --------------------------------------------------------------


def test_reads_from_other_threads_while_the_writer_writes(store: Store) -> None:
    node = store.node_id
    errors: list[BaseException] = []
    reads = [0]
    done = threading.Event()

    def writer() -> None:
        try:
            for _ in range(300):
                store.append_local([draft() for _ in range(10)], ts=1.0)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        last = 0
        deadline = time.monotonic() + 30
        try:
            for _ in range(100_000):
                if done.is_set() or time.monotonic() > deadline:
                    break
                high = store.cursors().get(node, 0)
                assert high >= last and high % 10 == 0  # whole transactions only
                last = high
                page = store.history(limit=100)
                got = seqs(page)
                if got:
                    assert got == list(range(got[0], got[-1] + 1))
                    assert len(got) == min(100, got[-1])
                # The writer may have committed more since cursors() answered.
                start = max(0, high - 5)
                tail = seqs(store.after(node, start, 10))
                assert tail == list(range(start + 1, start + 1 + len(tail)))
                assert len(tail) >= high - start
                reads[0] += 1
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, name="store-writer")]
    threads += [threading.Thread(target=reader, name=f"store-reader-{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert reads[0] > 0
    assert store.cursors() == {node: 3000}


def test_reads_do_not_wait_for_a_write_and_a_second_writer_is_refused(
        db: Path, store: Store) -> None:
    store.append_local([draft("committed")], ts=1.0)
    inside = threading.Event()
    release = threading.Event()

    def pause() -> int:
        inside.set()
        release.wait(10)
        return 0

    # Hold the writer inside its transaction: a trigger calls back into Python.
    store._writer.create_function("pause", 0, pause)
    conn = raw(db)
    conn.execute("CREATE TRIGGER hold BEFORE INSERT ON messages WHEN NEW.text = 'slow' "
                 "BEGIN SELECT pause(); END")
    conn.close()
    errors: list[BaseException] = []

    def slow_write() -> None:
        try:
            store.append_local([draft("slow")], ts=2.0)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)

    t = threading.Thread(target=slow_write, name="slow-writer")
    t.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        assert [m.text for m in store.history()] == ["committed"]  # not the uncommitted one
        assert store.cursors() == {store.node_id: 1}
        # A read that waited on the writer's lock would take the whole busy timeout (and
        # then fail); half of it tells the two apart on a loaded runner.
        assert time.monotonic() - started < store_module.BUSY_TIMEOUT_MS / 1000 / 2
        with pytest.raises(LocalProtocolError, match="only one thread may write"):
            store.insert_remote([msg(A, 1)])
    finally:
        release.set()
        t.join(timeout=10)
    assert errors == []
    assert [m.text for m in store.history()] == ["committed", "slow"]


def test_an_invalid_row_is_a_store_error(db: Path, store: Store) -> None:
    store.append_local([draft()], ts=1.0)
    conn = raw(db)
    conn.execute("UPDATE messages SET nick = 'bad nick'")
    conn.close()
    with pytest.raises(StoreError, match="invalid message"):
        store.history()


def test_read_connections_close_when_their_threads_end(db: Path, store: Store) -> None:
    store.append_local([draft()], ts=1.0)
    store.history()
    baseline = open_fds_to(db)

    def read() -> None:
        assert len(store.history()) == 1

    for _ in range(20):
        t = threading.Thread(target=read, name="short-reader")
        t.start()
        t.join(timeout=10)
    # Without the cleanup there would be 20 more.  SQLite may keep one closed
    # connection's descriptor for reuse (closing it would drop the process's
    # POSIX locks on the file), so allow one.
    assert open_fds_to(db) <= baseline + 1


def test_close_is_idempotent_and_closes_every_connection(db: Path) -> None:
    s = Store(db)
    s.append_local([draft()], ts=1.0)
    hold = threading.Event()
    release = threading.Event()

    def read_and_wait() -> None:
        s.history()
        hold.set()
        release.wait(10)

    t = threading.Thread(target=read_and_wait, name="lingering-reader")
    t.start()
    try:
        assert hold.wait(10)
        s.history()
        assert open_fds_to(db) >= 3
        s.close()
        s.close()
        assert open_fds_to(db) == 0
    finally:
        release.set()
        t.join(timeout=10)
    with pytest.raises(ClosedError):
        s.history()
    with pytest.raises(ClosedError):
        s.append_local([draft()], ts=2.0)


# ---- property: any interleaving of batches leaves exact prefixes -------------------


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_any_interleaving_of_batches_leaves_each_origin_an_exact_prefix(
        data: st.DataObject) -> None:
    lengths = {o: data.draw(st.integers(0, 12), label=f"len {o[:1]}") for o in (A, B, C)}
    pool = [msg(o, s) for o, n in lengths.items() for s in range(1, n + 1)]
    # Duplicates, some of them differing copies of the same id.
    for m in data.draw(st.lists(st.sampled_from(pool), max_size=20) if pool else st.just([])):
        pool.append(data.draw(st.sampled_from(
            [m, msg(m.origin, m.seq, text="forged copy")])))
    order = data.draw(st.permutations(pool))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=8)))
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    batches.append(sorted(pool, key=lambda m: (m.origin, m.seq)))  # a final full replay

    tmp = tempfile.mkdtemp(dir="/tmp")
    try:
        with Store(Path(tmp) / "h.db") as s:
            high: dict[str, int] = {}
            first: dict[str, Message] = {}
            for batch in batches:
                expected = []
                for m in batch:
                    if m.seq == high.get(m.origin, 0) + 1:
                        high[m.origin] = m.seq
                        first[m.id] = m
                        expected.append(m)
                assert s.insert_remote(batch) == expected
            assert s.cursors() == {o: n for o, n in lengths.items() if n}
            held = s.history(limit=MAX_HISTORY_PAGE)
            assert len({m.id for m in held}) == len(held)
            for o, n in lengths.items():
                assert seqs(s.after(o, 0, 100)) == list(range(1, n + 1))
            assert all(first[m.id] == m for m in held)  # never replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- durability: SIGKILL in the middle of appending --------------------------------


def _acks_until_killed(db: Path, kill_after: int) -> tuple[list[int], int | None]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "store_killer.py"), str(db), "5000", "20"],
        stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    try:
        deadline = time.monotonic() + 30
        while buf.count(b"\n") < kill_after and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # it finished all its appends before we got to kill it
                buf += chunk
        proc.send_signal(signal.SIGKILL)
        returncode = proc.wait(timeout=10)
        buf += proc.stdout.read()  # lines written before death were acknowledged too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
    lines = buf.split(b"\n")[:-1]  # a last line without its newline is not an ack
    return [int(line) for line in lines], returncode


@pytest.mark.parametrize("round_", range(3))
def test_acknowledged_appends_survive_sigkill(tmp_path: Path, round_: int) -> None:
    db = tmp_path / "killed.db"
    kill_after = random.randint(20, 1500)
    acked, returncode = _acks_until_killed(db, kill_after)
    assert returncode in (-signal.SIGKILL, 0)
    assert acked, "the child acknowledged nothing"
    assert acked == list(range(1, len(acked) + 1))
    with Store(db) as s:
        node = s.node_id
        held = s.after(node, 0, 10_000)
        n = s.cursors()[node]
        assert seqs(held) == list(range(1, n + 1))  # no gap, no duplicate
        assert n >= acked[-1]  # at most one commit beyond the last ack
        assert n <= acked[-1] + 1
        # And the store goes on where it stopped.
        assert seqs(s.append_local([draft()], ts=time.time())) == [n + 1]


def test_send_keys_find_their_message_per_uid_and_go_with_it(db: Path) -> None:
    """Issue 13 case 11: (uid, key) -> the stored message; retention takes the key along."""
    with Store(db, max_messages=2) as s:
        (m1,) = s.append_local([Draft("keyed", "me", "h", uid=1000, key="abc")], ts=1.0)
        assert s.sent_with_key(1000, "abc") == m1
        assert s.sent_with_key(1001, "abc") is None  # another user's key is another key
        assert s.sent_with_key(None, "abc") is None
        (m2,) = s.append_local([Draft("no uid", "me", "h", key="abc")], ts=2.0)
        assert s.sent_with_key(None, "abc") == m2
        s.append_local([Draft("later", "me", "h")], ts=3.0)
        assert s.prune(4.0) == 1  # m1 is the oldest
        assert s.sent_with_key(1000, "abc") is None
        rows = sqlite3.connect(db).execute("SELECT uid, key, id FROM send_keys").fetchall()
        assert rows == [(-1, "abc", m2.id)]
        conn = raw(db)  # a key whose id is not one we write finds nothing, and says so calmly
        conn.execute("INSERT INTO send_keys (uid, key, id) VALUES (5, 'odd', 'no seq here')")
        conn.close()
        assert s.sent_with_key(5, "odd") is None


def test_schema_7_rebuilds_messages_without_the_id_index_keeping_every_row(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema-6 history (signed, unsigned, far-future, sealed and keyed rows) upgrades to 7:
    every row with every column and its arrival, the indexes and the send-key trigger come
    back, and nothing is found by id any more (UNIQUE (origin, seq) does that)."""
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:6])
    with Store(db, node_id=OWN_KEY.node) as s:
        s.append_entries([Draft("keyed", "me", "h", uid=1000, key="k1"), draft("plain")],
                         ts=10.0, key=OWN_KEY)
        s.insert_run(_peer_run(1, 3), key=PEER_KEY.public.raw, now=1.0)
        s.insert_remote([msg(A, 1, ts=1e12)], now=5.0)  # far future: "received" is set
        conn = raw(db)
        conn.execute("INSERT INTO messages (id, origin, seq, ts, room, nick, host, text, "
                      '"to", to_node) VALUES (?, ?, 1, 3.0, ?, ?, ?, ?, ?, ?)',
                      (f"{B}:1", B, "lobby", "bob", "far", "", "ann", OWN_KEY.node))
        before = conn.execute("SELECT * FROM messages ORDER BY arrival").fetchall()
        conn.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with Store(db, node_id=OWN_KEY.node) as s:
        conn = raw(db)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
        assert conn.execute("SELECT * FROM messages ORDER BY arrival").fetchall() == before
        indexes = {row[1]: row[2] for row in conn.execute("PRAGMA index_list(messages)")}
        assert {name: unique for name, unique in indexes.items()
                if not name.startswith("sqlite_autoindex")} == {
            "messages_room_order": 0, "messages_order": 0, "messages_received": 0}
        (auto,) = [name for name in indexes if name.startswith("sqlite_autoindex")]
        assert [row[2] for row in conn.execute(f"PRAGMA index_info({auto})")] == [
            "origin", "seq"]
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"
                            ).fetchall() == [("messages_keys",)]
        keyed = s.sent_with_key(1000, "k1")
        assert keyed is not None and keyed.text == "keyed"
        plan = " ".join(str(row) for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE origin = ? AND seq = ?",
            (OWN_KEY.node, 1)))
        assert "USING INDEX" in plan and "SCAN" not in plan
        conn.execute("DELETE FROM messages WHERE id = ?", (keyed.id,))
        assert conn.execute("SELECT count(*) FROM send_keys").fetchone()[0] == 0  # the trigger
        with pytest.raises(sqlite3.IntegrityError, match=r"messages\.origin, messages\.seq"):
            conn.execute("INSERT INTO messages (id, origin, seq, ts, room, nick, host, text) "
                         "VALUES ('another id', ?, 1, 1.0, 'lobby', 'x', 'y', 'z')", (A,))
        conn.close()
        (new,) = s.append_entries([draft("after")], ts=11.0, key=OWN_KEY)
        assert new.seq == 3


def test_entries_are_bound_without_sqlite3s_adaptation_and_stored_as_before(
        db: Path) -> None:
    """Storing an entry binds no parameter that sqlite3 would adapt (None, bytes, bool: ~400 ns
    each in CPython 3.11), and the row still holds NULLs, BLOBs and 0/1 where it did."""
    adapted: list[type] = []

    def adapt(value: bool | bytes | None) -> bool | bytes | None:
        adapted.append(type(value))
        return value

    kinds = (type(None), bytes, bool)
    for kind in kinds:
        sqlite3.register_adapter(kind, adapt)
    try:
        with Store(db, node_id=OWN_KEY.node) as s:
            s.append_entries([draft("public", uid=1000),
                              Draft("dm", "alice", "box", to="bob", to_node=B)],
                             ts=10.0, key=OWN_KEY)
            run = _peer_run(1, 2)
            s.insert_run(run, key=PEER_KEY.public.raw, now=1.0)
            s.insert_run(sign_entries(PEER_KEY, [msg(PEER_KEY.node, 3, ts=1e12)], run[-1].head),
                         key=PEER_KEY.public.raw, now=5.0)
    finally:
        for kind in kinds:
            sqlite3.adapters.pop((kind, sqlite3.PrepareProtocol))
    assert adapted.count(type(None)) == 0 and adapted.count(bool) == 0
    # only the feed's raw key (once a commit) and the signatures (one entry in 64)
    assert adapted.count(bytes) == 3 + 3
    conn = raw(db)
    rows = conn.execute('SELECT seq, typeof("to"), typeof(uid), uid, typeof(received), '
                        "received, typeof(to_node), typeof(body), typeof(sig), checked "
                        "FROM messages ORDER BY arrival").fetchall()
    conn.close()
    assert rows == [
        (1, "null", "integer", 1000, "null", None, "null", "blob", "null", 0),  # public
        (2, "text", "null", None, "null", None, "text", "blob", "blob", 1),  # the DM
        (1, "null", "null", None, "null", None, "null", "blob", "null", 0),  # the peer's
        (2, "null", "null", None, "null", None, "null", "blob", "blob", 1),
        (3, "null", "null", None, "real", 5.0, "null", "blob", "blob", 1),  # far future
    ]


def test_direct_messages_are_shown_to_their_ends_only(db: Path) -> None:
    """Issue 13 case 9: history(viewer=) keeps only the direct messages that user is an end of."""
    with Store(db) as s:
        me = s.node_id
        other = "ab" * 8
        s.append_local([Draft("public", "ann", "h"), Draft("from ann", "ann", "h", to="bob",
                                                              to_node=other)], ts=1.0)
        s.insert_remote([
            Message(origin=other, seq=1, ts=2.0, room="lobby", nick="bob", host="h2",
                    text="to ann", to="ann", to_node=me),
            Message(origin=other, seq=2, ts=3.0, room="lobby", nick="bob", host="h2",
                    text="to another ann", to="ann", to_node="cd" * 8),
            Message(origin=other, seq=3, ts=4.0, room="lobby", nick="bob", host="h2",
                    text="old style", to="ANN"),
        ])
        def texts(viewer: str | None) -> list[str]:
            return [m.text for m in s.history(viewer=viewer)]
        assert texts("ann") == ["public", "from ann", "to ann", "old style"]
        assert texts("carl") == ["public"]
        assert texts(None) == ["public", "from ann", "to ann", "to another ann", "old style"]
        assert s.history(viewer=None)[2].to_node == me


# -- signed feeds (schema 6) -------------------------------------------------------------------

OWN_KEY = SigningKey(b"\x11" * 32)
PEER_KEY = SigningKey(b"\x22" * 32)


def _peer_run(first: int, last: int, prev: FeedHead | None = None) -> list[Entry]:
    messages = [msg(PEER_KEY.node, i) for i in range(first, last + 1)]
    return sign_entries(PEER_KEY, messages, prev)


def test_upgrade_keeps_unsigned_history_shown_and_never_served(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema-5 history upgrades in place: its messages stay, marked unsigned, and are not
    entries (a relay never serves them as if signed); our new feed starts at seq 1."""
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:5])
    with Store(db) as s:
        old_node = s.node_id
    conn = raw(db)  # rows as lanchat of schema 5 wrote them (its trigger keeps `high`)
    for origin, seq, text in ((old_node, 1, "old one"), (A, 1, "a1"), (old_node, 2, "old two"),
                              (A, 2, "a2")):
        conn.execute("INSERT INTO messages (id, origin, seq, ts, room, nick, host, text)"
                     " VALUES (?, ?, ?, ?, 'lobby', 'bob', 'far', ?)",
                     (f"{origin}:{seq}", origin, seq, float(seq), text))
    conn.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with Store(db, node_id=OWN_KEY.node) as s:
        shown = s.history()
        assert sorted(m.text for m in shown) == ["a1", "a2", "old one", "old two"]
        assert all(not m.signed for m in shown)
        assert all(m.to_dict()["signed"] is False for m in shown)
        assert s.entries_after(old_node, 0, 10) == [] and s.entries_after(A, 0, 10) == []
        assert s.cursors() == {old_node: 2, A: 2}
        (mine,) = s.append_entries([draft("signed now")], ts=3.0, key=OWN_KEY)
        assert mine.seq == 1 and mine.prev is None and mine.message.origin == OWN_KEY.node
        assert s.history()[-1].signed
        (row,) = s.entries_after(OWN_KEY.node, 0, 10)
        assert (row.body, row.sig, row.checked) == (mine.body, mine.sig, True)
    assert raw(db).execute("SELECT count(*) FROM sqlite_master WHERE name = 'messages_high'"
                           ).fetchone()[0] == 0


def test_our_entries_chain_across_commits_and_sign_each_batch_end(tmp_path: Path) -> None:
    with Store(tmp_path / "h.db", node_id=OWN_KEY.node) as s:
        first = s.append_entries([draft(f"m{i}") for i in range(3)], ts=1.0, key=OWN_KEY)
        second = s.append_entries([draft("m3")], ts=1.0, key=OWN_KEY)
        run = [*first, *second]
        verify_run(run, OWN_KEY.public)  # one chain across the two commits
        assert [e.sig is not None for e in run] == [False, False, True, True]
        rows = s.entries_after(OWN_KEY.node, 0, 10)
        assert [r.checked for r in rows] == [False, False, True, True]
        assert [(r.body, r.sig) for r in rows] == [(e.body, e.sig) for e in run]
        assert s.heads() == {OWN_KEY.node: run[-1].head}
        assert s.feed_key(OWN_KEY.node) == OWN_KEY.public.raw
        with pytest.raises(ValueError):
            s.append_entries([draft("x")], ts=1.0, key=PEER_KEY)


def test_insert_run_extends_skips_held_and_jumps_only_on_a_floor(tmp_path: Path) -> None:
    with Store(tmp_path / "h.db", node_id=OWN_KEY.node) as s:
        raw_key = PEER_KEY.public.raw
        one = _peer_run(1, 3)
        assert s.insert_run(one, key=raw_key) == one
        two = _peer_run(3, 5, one[1].head)  # overlaps 3: only 4, 5 are new
        assert [e.seq for e in s.insert_run(two, key=raw_key)] == [4, 5]
        far = _peer_run(9, 10, FeedHead(8, "ab" * 32))
        assert s.insert_run(far, key=raw_key) == []  # beyond a gap: nothing
        assert s.cursors()[PEER_KEY.node] == 5
        assert s.insert_run(far, key=raw_key, floor=True) == far  # a floor: the cursor jumps
        assert s.cursors()[PEER_KEY.node] == 10
        assert s.heads()[PEER_KEY.node] == far[-1].head
        assert s.hash_at(PEER_KEY.node, 4) == two[1].hash
        rows = s.entries_after(PEER_KEY.node, 0, 64)
        assert [(r.seq, r.checked) for r in rows] == [
            (1, False), (2, False), (3, True), (4, False), (5, True), (9, False), (10, True)]
        assert s.entries(PEER_KEY.node, 4, 5) == two[1:]
        assert s.forked() == {}
        s.mark_forked(PEER_KEY.node, 4)
        s.mark_forked(PEER_KEY.node, 2)  # the first one found stays
        assert s.forked() == {PEER_KEY.node: 4}


def test_our_unsigned_messages_under_our_key_are_followed_by_a_signed_feed(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that already used its key's node id (33cc028) stored its messages unsigned;
    after the upgrade it appends signed entries after them (the chain starts from
    UNSIGNED_PREV) instead of failing to send, and serves only the signed ones."""
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:5])
    with Store(db, node_id=OWN_KEY.node):
        pass
    conn = raw(db)
    for seq in (1, 2):
        conn.execute("INSERT INTO messages (id, origin, seq, ts, room, nick, host, text)"
                     " VALUES (?, ?, ?, 1.0, 'lobby', 'me', 'here', 'unsigned')",
                     (f"{OWN_KEY.node}:{seq}", OWN_KEY.node, seq))
    conn.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with Store(db, node_id=OWN_KEY.node) as s:
        (e,) = s.append_entries([draft("signed")], ts=2.0, key=OWN_KEY)
        assert e.seq == 3 and e.prev == UNSIGNED_PREV and e.sig is not None
        verify_run([e], OWN_KEY.public)
        assert [r.seq for r in s.entries_after(OWN_KEY.node, 0, 10)] == [3]
        assert s.heads() == {OWN_KEY.node: e.head}


def test_a_batch_commits_once_and_each_write_in_it_is_all_or_nothing(tmp_path: Path) -> None:
    """The router stores queued runs in one transaction (one fsync): a run that fails in it
    leaves nothing behind and the batch goes on; reads on the batch's thread see its rows;
    nothing is visible to other connections, or durable, before the batch ends."""
    db = tmp_path / "h.db"
    with Store(db, node_id=OWN_KEY.node) as s:
        raw_key = PEER_KEY.public.raw
        run = _peer_run(1, 4)
        statements: list[str] = []
        s._writer.set_trace_callback(statements.append)
        with s.batch():
            assert s.insert_run(run[:2], key=raw_key) == run[:2]
            assert s.hash_at(PEER_KEY.node, 2) == run[1].hash  # this thread sees the batch
            outside = raw(db)
            assert outside.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
            outside.close()
            with pytest.raises(StoreError, match="UNIQUE"):  # fails at its second row
                s.insert_run([run[2], run[3], run[3]], key=raw_key)
            assert s.insert_run(run[2:], key=raw_key) == run[2:]  # nothing of it stayed
            with pytest.raises(LocalProtocolError):
                s.batch().__enter__()  # one batch at a time
        s._writer.set_trace_callback(None)
        assert [q for q in statements if q in ("BEGIN IMMEDIATE", "COMMIT")] == [
            "BEGIN IMMEDIATE", "COMMIT"]
        assert [e.seq for e in s.entries(PEER_KEY.node, 1, 4)] == [1, 2, 3, 4]
        assert s.heads()[PEER_KEY.node] == run[-1].head


def test_a_batch_whose_commit_fails_stores_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path / "h.db", node_id=OWN_KEY.node) as s:
        run = _peer_run(1, 2)
        with pytest.raises(StoreError, match="disk I/O"), s.batch():
            s.insert_run(run, key=PEER_KEY.public.raw)
            s._writer.execute("ROLLBACK")  # what SQLite does when the commit cannot be written
            raise sqlite3.OperationalError("disk I/O error")
        assert s.cursors() == {} and s.entries(PEER_KEY.node, 1, 2) == []
        assert s.insert_run(run, key=PEER_KEY.public.raw) == run  # the store lives on


def test_stamp_builds_what_the_constructor_builds_and_checks_what_is_new() -> None:
    """Message.stamp (a commit's drafts, built through the slots) equals Message(...) field
    for field -- including a field added later, which stamp would otherwise leave unset --
    and still refuses a bad origin, seq or time."""
    import dataclasses
    drafts = [Draft(text="hi", nick="ann", host="box"),
              Draft(text="psst", nick="ann", host="box", to="bob", to_node="b" * 32),
              Draft(text="there", nick="ann", host="box", room="other")]
    stamped = Message.stamp(drafts, origin="a" * 32, first=7, ts=1_700_000_000.5)
    for seq, (d, m) in enumerate(zip(drafts, stamped, strict=True), start=7):
        built = Message(origin="a" * 32, seq=seq, ts=1_700_000_000.5, room=d.room, nick=d.nick,
                        host=d.host, text=d.text, to=d.to, to_node=d.to_node)
        for f in dataclasses.fields(Message):
            assert getattr(m, f.name) == getattr(built, f.name), f.name
    assert [m.id for m in stamped] == [f"{'a' * 32}:{n}" for n in (7, 8, 9)]
    with pytest.raises(ValidationError):
        Message.stamp(drafts, origin="not a node", first=1, ts=1.0)
    with pytest.raises(ValidationError):
        Message.stamp(drafts, origin="a" * 32, first=0, ts=1.0)
    with pytest.raises(ValidationError):
        Message.stamp(drafts, origin="a" * 32, first=1, ts=float("nan"))


def test_stamp_of_no_drafts_is_no_messages() -> None:
    """An empty commit stamps nothing -- not a ValidationError about seq first - 1."""
    assert Message.stamp([], origin="a" * 32, first=1, ts=1_700_000_000.0) == []
