"""SQLite history: every message this node holds, and each origin's cursor.

Durability
    The database runs in WAL mode with ``synchronous=FULL``: a transaction is
    committed once its pages are in the WAL file *and* the WAL is fsynced,
    which is before any method here returns -- before the router fans a
    message out or acknowledges it.  So an acknowledged message survives the
    daemon being killed, a power loss, a kernel crash, and a file system that
    stops write-back (ext4 with ``errors=remount-ro`` aborts its journal: with
    ``synchronous=NORMAL`` every message acknowledged in the seconds before was
    lost, and the node id with them).  The cost is one fsync per commit; the
    router commits in groups, so under load one fsync covers many messages.

The per-origin prefix invariant
    For every origin, the store holds messages 1..n and nothing beyond a gap
    (DESIGN.md: seqs count 1, 2, 3 … with no gaps).  ``insert_remote`` stores
    a message only when it extends its origin's prefix; anything else is a
    duplicate (already held) or sits beyond a gap (the link asks for a replay).
    The table ``high`` remembers, per origin, the highest seq *ever* stored
    and the latest ts (and, for a signed feed, its head's entry hash and the
    origin's public key); every write raises it in the same transaction (once
    per origin, not per row: schema 6 dropped the per-row trigger), so it
    survives retention deleting old rows and is the one source of truth for
    ``cursors()``, the prefix rule and our own next seq.

Signed feeds (schema 6)
    A message of a signed feed (:mod:`lanchat.feed`) is stored with its entry:
    the body bytes as signed (never re-serialized), the signature if it has
    one, the entry hash, and ``checked`` -- we verified (a received run's
    head) or made (our own) its signature, so a run we serve may end there.
    Messages stored before schema 6 have none of these: they are shown
    (``Message.signed`` False) but never served as entries.

Sealed direct messages (lanchat.seal)
    The body of a direct message's entry holds its seal, never its text.  The
    ``text`` column holds what this daemon read: the text where it is one of the
    two ends (it opened the seal, or sealed it), ``''`` everywhere else.  Such a
    row is kept and served as an entry like any other, but never read back as a
    message (history, ``after``): the ciphertext is all this daemon has.

Thread model
    One thread writes (the router thread, HACKING.md): ``append_local``,
    ``insert_remote`` and ``prune`` use a single writer connection, and two
    threads writing at once is reported as :class:`LocalProtocolError` instead
    of silently interleaving transactions.  Reads (``history``, ``cursors``,
    ``after``, ``node_id``) may come from any thread: each thread gets its own
    read-only connection (``threading.local``), closed when that thread ends or
    when the store is closed.  WAL lets readers run while the writer commits,
    so no Python lock is ever held around SQLite I/O.

Errors
    Every ``sqlite3`` or file-system failure becomes :class:`StoreError` with a
    sentence naming the file (``cannot write history to /p: database or disk
    is full``).  SQLite says only "disk I/O error" when the file system turns
    read-only under an open database; a failed write then also names what the
    kernel says about the directory (``... (/p: Read-only file system)``).  A
    failed write leaves nothing behind: no row, no consumed seq.  The store
    stays usable: reads keep working, and writes work again once the file
    system takes them.
    Using the store after :meth:`Store.close` raises :class:`ClosedError`.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lanchat.errors import ClosedError, LocalProtocolError, StoreError, ValidationError
from lanchat.feed import (
    UNSIGNED_PREV,
    Entry,
    FeedError,
    FeedHead,
    SigningKey,
    StoredEntry,
    parse_entry,
    sign_entries,
)
from lanchat.limits import FUTURE_SKEW_S, MAX_HISTORY_PAGE
from lanchat.model import Draft, Message

log = logging.getLogger(__name__)

#: Milliseconds a connection waits for another one's lock (another process
#: holding a write transaction, a checkpoint) before failing with "locked".
BUSY_TIMEOUT_MS = 5000

_SECONDS_PER_DAY = 86400.0

#: SQLite's primary result codes behind which a file system's refusal hides
#: (SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN): worth asking the kernel why.
_FS_RESULT_CODES = frozenset({8, 10, 14})
#: The kernel's answers that explain such a failure.
_FS_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)  # Linux only

#: SQLite's page cache per connection (its default is 2 MiB).  Writes append at the
#: right edge of each B-tree and a history read touches a few pages, so a small cache
#: holds what is hot; the kernel's page cache holds the rest.  A busy hub's RSS grew by
#: the whole default (1.7 MiB, measured) without it being faster.
PAGE_CACHE_KIB = 512

#: Every column of ``messages`` at schema 6, as migration 7 copies them.
_V7_COLUMNS = ('arrival, id, origin, seq, ts, room, nick, host, text, "to", uid, mac, received, '
               "to_node, body, sig, hash, checked")

#: The schema, as the list of migrations that build it.  Migration ``i`` takes
#: the database from ``PRAGMA user_version`` ``i`` to ``i + 1``; each runs in
#: one transaction together with the version bump (a new database: all of them in
#: one), so a database is always at exactly one version.  Append new migrations;
#: never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: messages, meta (node id), high (per-origin cursor that outlives retention).
    (
        """CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        # "arrival" is the rowid: the local arrival counter.  uid is the local
        # sender's Unix uid (control socket); NULL for remote messages; never
        # leaves this node.
        """CREATE TABLE messages (
            arrival INTEGER PRIMARY KEY,
            id      TEXT NOT NULL UNIQUE,
            origin  TEXT NOT NULL,
            seq     INTEGER NOT NULL,
            ts      REAL NOT NULL,
            room    TEXT NOT NULL,
            nick    TEXT NOT NULL,
            host    TEXT NOT NULL,
            text    TEXT NOT NULL,
            "to"    TEXT,
            uid     INTEGER,
            UNIQUE (origin, seq)
        )""",
        # history(room=...) and history() read in (ts, origin, seq) order straight
        # off these indexes; per-origin replay uses the UNIQUE (origin, seq) index.
        "CREATE INDEX messages_room_order ON messages (room, ts, origin, seq)",
        "CREATE INDEX messages_order ON messages (ts, origin, seq)",
        """CREATE TABLE high (
            origin TEXT PRIMARY KEY,
            seq    INTEGER NOT NULL,
            ts     REAL NOT NULL
        )""",
        """CREATE TRIGGER messages_high AFTER INSERT ON messages BEGIN
            INSERT INTO high (origin, seq, ts) VALUES (NEW.origin, NEW.seq, NEW.ts)
            ON CONFLICT (origin) DO UPDATE
                SET seq = max(seq, excluded.seq), ts = max(ts, excluded.ts);
        END""",
    ),
    # 2: the origin's authentication tag, relayed with the message (lanchat.auth).
    (
        "ALTER TABLE messages ADD COLUMN mac TEXT",
    ),
    # 3: when a message claiming a time far ahead of ours arrived (NULL for every other
    # message): retention counts its age from here, so a far-future ts cannot escape it.
    # Rows from before this migration that are already that far ahead (300 s: the
    # FUTURE_SKEW_S of its day) arrived "now"; and if such a row in our own name dragged
    # our clock along (the floor of our next stamp), it is back to now.
    (
        "ALTER TABLE messages ADD COLUMN received REAL",
        "UPDATE messages SET received = CAST(strftime('%s', 'now') AS REAL) "
        "WHERE ts > CAST(strftime('%s', 'now') AS REAL) + 300",
        "CREATE INDEX messages_received ON messages (received) WHERE received IS NOT NULL",
        "UPDATE high SET ts = CAST(strftime('%s', 'now') AS REAL) "
        "WHERE origin = (SELECT value FROM meta WHERE key = 'node_id') "
        "AND ts > CAST(strftime('%s', 'now') AS REAL) + 300",
    ),
    # 4: a direct message's addressee's node: "to" + to_node name one user on the network.
    (
        "ALTER TABLE messages ADD COLUMN to_node TEXT",
    ),
    # 5: idempotent control sends: (local uid, client key) -> the message it stored.  A
    # key goes when its message goes (retention), so it lasts the retention window.
    (
        """CREATE TABLE send_keys (
            uid INTEGER NOT NULL,
            key TEXT NOT NULL,
            id  TEXT NOT NULL,
            PRIMARY KEY (uid, key)
        )""",
        "CREATE INDEX send_keys_id ON send_keys (id)",
        """CREATE TRIGGER messages_keys AFTER DELETE ON messages BEGIN
            DELETE FROM send_keys WHERE id = OLD.id;
        END""",
    ),
    # 6: signed feeds (lanchat.feed).  Per message the entry as it travels: its body bytes
    # (as signed and received, never re-serialized), signature (NULL on an entry its run's
    # head vouches for), entry hash, and whether we verified or made its signature (the
    # only places a relay ends the runs it serves).  Messages stored before this migration
    # have no body: unsigned, shown in history, never relayed.  Per origin (``high``): the
    # head's entry hash, the origin's public key, and the seq where we found it forked.
    (
        "ALTER TABLE messages ADD COLUMN body BLOB",
        "ALTER TABLE messages ADD COLUMN sig BLOB",
        "ALTER TABLE messages ADD COLUMN hash TEXT",
        "ALTER TABLE messages ADD COLUMN checked INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE high ADD COLUMN hash TEXT",
        "ALTER TABLE high ADD COLUMN key BLOB",
        "ALTER TABLE high ADD COLUMN forked INTEGER",
        # ``high`` is now kept by the store's writes, once per origin and transaction: the
        # trigger's upsert per row was most of what storing a catch-up cost.
        "DROP TRIGGER messages_high",
    ),
    # 7: no UNIQUE index on ``id``.  The id is "<origin>:<seq>", which UNIQUE (origin, seq)
    # already keeps unique; and its text order is not seq order (":10" sorts before ":9"),
    # so each row a catch-up stored went to another page of that index: with a page cache
    # that does not hold the whole index, every commit rewrote pages all over it, 12 % of
    # a catch-up's CPU (bench/catchup.py).  SQLite cannot drop a column's constraint in
    # place: the table is rebuilt (its rows, arrival order and columns as they were), then
    # its indexes and trigger.  Nothing looks a message up by id any more.
    (
        """CREATE TABLE messages_v7 (
            arrival  INTEGER PRIMARY KEY,
            id       TEXT NOT NULL,
            origin   TEXT NOT NULL,
            seq      INTEGER NOT NULL,
            ts       REAL NOT NULL,
            room     TEXT NOT NULL,
            nick     TEXT NOT NULL,
            host     TEXT NOT NULL,
            text     TEXT NOT NULL,
            "to"     TEXT,
            uid      INTEGER,
            mac      TEXT,
            received REAL,
            to_node  TEXT,
            body     BLOB,
            sig      BLOB,
            hash     TEXT,
            checked  INTEGER NOT NULL DEFAULT 0,
            UNIQUE (origin, seq)
        )""",
        f"INSERT INTO messages_v7 ({_V7_COLUMNS}) SELECT {_V7_COLUMNS} FROM messages",
        "DROP TABLE messages",  # with its indexes and its trigger
        "ALTER TABLE messages_v7 RENAME TO messages",
        "CREATE INDEX messages_room_order ON messages (room, ts, origin, seq)",
        "CREATE INDEX messages_order ON messages (ts, origin, seq)",
        "CREATE INDEX messages_received ON messages (received) WHERE received IS NOT NULL",
        """CREATE TRIGGER messages_keys AFTER DELETE ON messages BEGIN
            DELETE FROM send_keys WHERE id = OLD.id;
        END""",
    ),
)

#: The uid a key is filed under when the sender's uid is unknown (no SO_PEERCRED).
_NO_UID = -1

_COLUMNS = 'id, origin, seq, ts, room, nick, host, text, "to", mac, to_node, body IS NOT NULL'
_INSERT = (
    'INSERT INTO messages (id, origin, seq, ts, room, nick, host, text, "to", uid, mac, '
    "received, to_node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Raise an origin's cursor (and latest ts) to a batch's; its head hash and key with it.
_RAISE_HIGH = (
    "INSERT INTO high (origin, seq, ts, hash, key) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (origin) DO UPDATE SET seq = max(seq, excluded.seq), "
    "ts = max(ts, excluded.ts), "
    "hash = CASE WHEN excluded.seq >= seq THEN excluded.hash ELSE hash END, "
    "key = coalesce(key, excluded.key)"
)
#: A row of an entry, bound with parameters of exact types only (:func:`_entry_row`): NULL
#: travels as a sentinel that NULLIF turns back into NULL.
_INSERT_ENTRY = (
    'INSERT INTO messages (id, origin, seq, ts, room, nick, host, text, "to", uid, '
    "received, to_node, body, sig, hash, checked) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULLIF(?, ''), NULLIF(?, -1), NULLIF(?, -1.0), "
    "NULLIF(?, ''), ?, NULLIF(?, ''), ?, ?)"
)


def _entry_row(entry: Entry, uid: int | None, received: float | None,
               checked: bool) -> tuple[str | int | float | bytearray | bytes, ...]:
    """The parameters of :data:`_INSERT_ENTRY` for ``entry``.

    CPython 3.11's sqlite3 runs its adaptation protocol (PEP 246) for every parameter
    that is not exactly an int, float, str or bytearray -- None, bytes, bool: two
    attribute lookups, one of which formats an AttributeError and drops it, ~400 ns a
    parameter, and a stored entry had 7 such of its 16 (cachegrind: 8 % of what a
    catch-up runs).  So a NULL goes as a sentinel no value can be (``''`` for a name or a
    signature, never empty; ``-1`` for a uid; ``-1.0`` for a time of arrival), a flag as
    0 or 1, and the body as a bytearray (a copy costs a fourth of an adaptation).
    """
    m = entry.message
    return (m.id, m.origin, m.seq, m.ts, m.room, m.nick, m.host, m.text, m.to or "",
            -1 if uid is None else uid, -1.0 if received is None else received,
            m.to_node or "", bytearray(entry.body), entry.sig or "", entry.hash,
            1 if checked else 0)

#: Who may read a direct message here (history's ``viewer``): its addressee if on this
#: node (an old DM without to_node: anyone of that nick), or its sender if it was sent
#: from this node.  Public messages (no "to") everyone.
_VISIBLE = ('("to" IS NULL OR ("to" = ? COLLATE NOCASE AND (to_node IS NULL OR to_node = ?))'
            " OR (origin = ? AND nick = ? COLLATE NOCASE))")

#: The ``?`` oldest messages, for retention by count: history order, except that a
#: message that claimed a far-future time counts from its arrival.  Each half reads
#: an index (``messages_order``, ``messages_received``).
_OLDEST = (
    "DELETE FROM messages WHERE arrival IN (SELECT arrival FROM ("
    "SELECT * FROM (SELECT arrival, ts AS age, origin, seq FROM messages"
    " WHERE received IS NULL ORDER BY ts, origin, seq LIMIT ?)"
    " UNION ALL SELECT arrival, received AS age, origin, seq FROM messages"
    " WHERE received IS NOT NULL"
    ") ORDER BY age, origin, seq LIMIT ?)"
)

#: Messages older than a cutoff, by their ts or (far-future ones) by when they arrived;
#: at most ? of them (-1: all).
_EXPIRED = {
    column: f"DELETE FROM messages WHERE arrival IN (SELECT arrival FROM messages "
            f"WHERE {column} < ? LIMIT ?)"
    for column in ("ts", "received")
}

#: The ``text`` of a sealed direct message this daemon cannot read (it is neither end):
#: no readable text is empty, so it marks a row that is stored and relayed, never shown.
_UNREAD = ""

_Row = tuple[str, str, int, float, str, str, str, str, str | None, str | None, str | None,
             int]


def _message(row: _Row) -> Message:
    mid, origin, seq, ts, room, nick, host, text, to, _mac, to_node, signed = row
    return Message(origin=origin, seq=seq, ts=ts, room=room, nick=nick, host=host,
                   text=text, to=to, id=mid, to_node=to_node, signed=bool(signed))


def _blob(value: object) -> bytes:
    """A BLOB column's value (sqlite3 returns bytes)."""
    assert isinstance(value, bytes)
    return value


class _Reader:
    """Holds one thread's read connection; when the thread ends, it is freed and closes it."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class Store:
    """The history store of one node (see the module docstring for the contracts).

    ``path`` is the database file; its directory is created (mode 0700) if
    missing, and a new file is created mode 0600, since history is private.
    ``max_age_days`` / ``max_messages`` bound what :meth:`prune` keeps; ``None``
    keeps forever.  The store owns its connections; :meth:`close` closes them
    all and is idempotent.  Call it after the threads using the store stopped.

    Raises :class:`StoreError` if the file cannot be opened, is not a
    database, or was written by a newer lanchat (schema version too high).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_age_days: float | None = None,
                 max_messages: int | None = None, node_id: str | None = None) -> None:
        if max_age_days is not None and not max_age_days > 0:
            raise ValueError("max_age_days must be positive or None")
        if max_messages is not None and max_messages < 1:
            raise ValueError("max_messages must be at least 1 or None")
        self.path = Path(path)
        self.max_age_days = max_age_days
        self.max_messages = max_messages
        self._closed = False
        # Guards nothing but the busy flag: acquired without blocking, so a second
        # writer thread gets an error instead of a wait (trio's ConflictDetector).
        self._write_busy = threading.Lock()
        self._batch_thread: int | None = None  # the thread inside batch(), if any
        # Guards _readers and the _closed check when a reader is registered;
        # held only for set operations, never during SQLite I/O.
        self._readers_lock = threading.Lock()
        self._readers: set[weakref.finalize[[], _Reader]] = set()
        self._local = threading.local()
        self._prepare_path()
        self._writer = self._connect("open")
        try:
            with self._errors("open"):
                self._setup(node_id)
        except BaseException:
            self._writer.close()
            raise

    # ---- opening -----------------------------------------------------------

    def _prepare_path(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file ourselves so it is private; SQLite gives its -wal and
            # -shm files the same mode as the database.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreError(f"cannot open history at {self.path}: {reason}") from exc

    def _connect(self, verb: str, *, query_only: bool = False) -> sqlite3.Connection:
        with self._errors(verb):
            # check_same_thread=False: the writer is built here but used by the
            # router thread, and close() closes every thread's connection.  The
            # one-writer rule is enforced by _write_busy instead.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
                if query_only:
                    conn.execute("PRAGMA query_only = ON")
            except BaseException:
                conn.close()
                raise
            return conn

    def _setup(self, node_id: str | None) -> None:
        conn = self._writer
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"cannot open history at {self.path}: the file system does not support "
                f"SQLite's WAL mode (got {mode!r})"
            )
        conn.execute("PRAGMA synchronous = FULL")
        known = len(MIGRATIONS)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > known:
            self._refuse_newer(version, known)
        while True:
            with self._transaction():
                # Re-read inside the write lock: another process may have migrated.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > known:
                    self._refuse_newer(version, known)
                # A new database (version 0) gets every migration in this one transaction:
                # one commit (an fsync) instead of one per migration, which was a good part
                # of a new daemon's start-up.  An existing one steps one migration per
                # transaction, as it always did.  Either way it is at exactly one version.
                target = known if version == 0 else min(version + 1, known)
                while version < target:
                    log.info("migrating history %s from schema %d to %d",
                             self.path, version, version + 1)
                    for statement in MIGRATIONS[version]:
                        conn.execute(statement)
                    version += 1
                    conn.execute(f"PRAGMA user_version = {version}")
                if version == known:
                    # The node id goes in the transaction of the last migration, if any.
                    row = self._keep_node_id(node_id)
                    break
        self._node_id: str = row[0]

    def _keep_node_id(self, node_id: str | None) -> tuple[str]:
        """Record the node id (inside the caller's transaction); the one now kept."""
        conn = self._writer
        if node_id is not None:
            # The daemon's identity key names the node (lanchat.keyfile); a new key
            # (first start after the upgrade, or a state directory that moved to
            # another machine) starts a new feed at seq 1.  Earlier messages keep
            # the origin they were written under.
            conn.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (node_id,))
        else:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?)",
                         (secrets.token_hex(8),))
        row: tuple[str] = conn.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
        return row

    def _refuse_newer(self, version: int, known: int) -> None:
        raise StoreError(
            f"history at {self.path} has schema version {version}, written by a newer "
            f"lanchat (this one knows up to {known}); upgrade lanchat or move the file away"
        )

    # ---- plumbing ----------------------------------------------------------

    @contextmanager
    def _errors(self, verb: str) -> Iterator[None]:
        """Turn sqlite3 errors into StoreError: ``cannot <verb> history at <path>: why``."""
        try:
            yield
        except sqlite3.Error as exc:
            why = str(exc) if verb == "read" else f"{exc}{self._file_system_says(exc)}"
            raise StoreError(f"cannot {verb} history at {self.path}: {why}") from exc

    def _file_system_says(self, exc: sqlite3.Error) -> str:
        """`` (<dir>: <strerror>)`` if the kernel refuses writes in the store's directory.

        SQLite does not pass on the errno behind SQLITE_IOERR: a file system that
        turned read-only under our open files (ext4 after an error) is just "disk
        I/O error".  So ask the kernel the same question with a probe that leaves
        nothing behind: an unnamed file (O_TMPFILE) in the directory, closed at
        once.  Only on a failed write (rare); never opens the database file
        itself, since closing any descriptor of it would drop SQLite's locks.
        """
        code = getattr(exc, "sqlite_errorcode", None)
        if not _O_TMPFILE or not isinstance(code, int) or code & 0xFF not in _FS_RESULT_CODES:
            return ""
        try:
            os.close(os.open(self.path.parent, _O_TMPFILE | os.O_WRONLY, 0o600))
        except OSError as err:
            if err.errno in _FS_ERRNOS:
                return f" ({self.path.parent}: {err.strerror})"
        return ""

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction on the writer connection: all of it or nothing."""
        conn = self._writer
        # IMMEDIATE takes the write lock up front, so the reads inside the
        # transaction (our next seq, an origin's high) cannot go stale.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    # SQLite may already have rolled back (e.g. after SQLITE_FULL).
                    log.debug("rollback after a failed write also failed", exc_info=True)
            raise

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction around several writes of this thread: one fsync for all of them.

        For the router's queued runs during a catch-up: a commit (an fsync with
        ``synchronous=FULL``) per run of 64 was a third of a receiver's time.  Each
        write inside stays all or nothing on its own (a savepoint), and reads on this
        thread see the batch's rows; but nothing in it is durable before this returns,
        so the caller shows none of it (no fan-out, no answer) until then.  Raises
        :class:`StoreError` if the commit fails: then none of the batch is stored.
        Writer thread only.
        """
        self._check_open()
        if not self._write_busy.acquire(blocking=False):
            raise LocalProtocolError(
                "two threads wrote to the history store at once; only one thread may write"
            )
        try:
            with self._errors("write"), self._transaction():
                self._batch_thread = threading.get_ident()
                try:
                    yield
                finally:
                    self._batch_thread = None
        finally:
            self._write_busy.release()

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        """A write inside :meth:`batch`: all of it or none of it, the batch going on."""
        conn = self._writer
        conn.execute("SAVEPOINT write")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO write")
            conn.execute("RELEASE write")
            raise
        conn.execute("RELEASE write")

    @contextmanager
    def _writing(self, verb: str) -> Iterator[sqlite3.Connection]:
        self._check_open()
        if self._batch_thread == threading.get_ident():
            with self._errors(verb), self._savepoint():
                yield self._writer
            return
        if not self._write_busy.acquire(blocking=False):
            raise LocalProtocolError(
                "two threads wrote to the history store at once; only one thread may write"
            )
        try:
            with self._errors(verb), self._transaction():
                yield self._writer
        finally:
            self._write_busy.release()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"history store {self.path} is closed")

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection, opened on first use."""
        self._check_open()
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is not None:
            return reader.conn
        conn = self._connect("read", query_only=True)
        reader = _Reader(conn)
        # Closes the connection when the thread ends (its locals are freed) or
        # when close() calls it, whichever comes first.
        finalizer = weakref.finalize(reader, conn.close)
        with self._readers_lock:
            closed = self._closed
            if not closed:
                self._readers = {f for f in self._readers if f.alive}
                self._readers.add(finalizer)
        if closed:
            finalizer()
            self._check_open()
        self._local.reader = reader
        return conn

    def _select(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        # Inside a batch its own thread reads what the batch wrote (not yet committed).
        conn = self._writer if self._batch_thread == threading.get_ident() else self._reader()
        with self._errors("read"):
            return conn.execute(sql, params).fetchall()

    def _messages(self, rows: list[tuple[object, ...]]) -> list[Message]:
        """Messages from ``_COLUMNS`` rows, without the sealed ones not opened here."""
        try:
            return [_message(row) for row in rows if row[7] != _UNREAD]  # type: ignore[arg-type]
        except ValidationError as exc:
            # Only a file edited behind our back gets here: we validate before storing.
            raise StoreError(f"history at {self.path} holds an invalid message: {exc}") from exc

    # ---- the interface -------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id: the daemon's key-derived one (``node_id=``), else 16 random
        lowercase hex digits made once and kept (a store opened on its own)."""
        return self._node_id

    def append_local(self, drafts: Iterable[Draft], *, ts: float,
                     key: SigningKey | None = None) -> list[Message]:
        """Stamp ``drafts`` as our own messages with the next seqs, in one transaction.

        Every message gets ``max(ts, the latest ts of our origin)``, so history
        order (by ts) keeps our own order even if the clock steps back.  (Only
        our own stamps raise that latest ts beyond the clock: see
        :meth:`insert_remote`.)
        With ``key`` (the daemon always passes its identity key) the messages are
        entries of our signed feed: see :meth:`append_entries`.  Without one they
        are stored unsigned (a store used on its own, in tests and tools).
        A draft's client ``key`` is filed with its message (see
        :meth:`sent_with_key`): the caller checks for it first.
        Returns the stored messages, in order.  On failure raises StoreError
        and stores nothing; the seqs are not consumed (the next call reuses
        them), so our seqs never have a gap.  Writer thread only.
        """
        if key is not None:
            return [e.message for e in self.append_entries(drafts, ts=ts, key=key)]
        return self._append(list(drafts), ts, None)[0]

    def append_entries(self, drafts: Iterable[Draft], *, ts: float,
                       key: SigningKey) -> list[Entry]:
        """:meth:`append_local` as signed entries: one call is one signing batch.

        In the same transaction: read our feed's head, stamp, chain and sign
        (:func:`lanchat.feed.sign_entries`: the last entry and every SIGN_INTERVAL-th),
        store the entries with their bytes.  ``key`` must be this node's
        (``key.node == node_id``).  Returns the entries, in order.  Writer thread only.
        """
        if key.node != self._node_id:
            raise ValueError(f"key {key.node} is not this node's ({self._node_id})")
        entries = self._append(list(drafts), ts, key)[1]
        assert entries is not None
        return entries

    def _append(self, drafts: list[Draft], ts: float, key: SigningKey | None,
                ) -> tuple[list[Message], list[Entry] | None]:
        if not drafts:
            return [], ([] if key is not None else None)
        origin = self._node_id
        with self._writing("write") as conn:
            row = conn.execute("SELECT seq, ts, hash FROM high WHERE origin = ?",
                               (origin,)).fetchone()
            last_seq, last_ts = (row[0], row[1]) if row is not None else (0, 0.0)
            stamp = max(float(ts), last_ts)
            messages = Message.stamp(drafts, origin=origin, first=last_seq + 1, ts=stamp,
                                     signed=key is not None)
            entries: list[Entry] | None = None
            if key is None:
                conn.executemany(_INSERT, [
                    (m.id, m.origin, m.seq, m.ts, m.room, m.nick, m.host, m.text, m.to, d.uid,
                     None, None, m.to_node)
                    for m, d in zip(messages, drafts, strict=True)
                ])
                conn.execute(_RAISE_HIGH, (origin, messages[-1].seq, stamp, None, None))
            else:
                head = None
                if row is not None and row[0] > 0:
                    # Our messages so far may be unsigned (stored by a lanchat that already
                    # named the node by its key, before signed feeds): the chain starts
                    # after them, from UNSIGNED_PREV.
                    head = FeedHead(row[0], row[2] if row[2] is not None else UNSIGNED_PREV)
                entries = sign_entries(key, messages, head)
                conn.executemany(_INSERT_ENTRY, [
                    _entry_row(e, d.uid, None, e.sig is not None)
                    for e, d in zip(entries, drafts, strict=True)
                ])
                conn.execute(_RAISE_HIGH, (origin, messages[-1].seq, stamp, entries[-1].hash,
                                           key.public.raw))
            keyed = [(_NO_UID if d.uid is None else d.uid, d.key, m.id)
                     for m, d in zip(messages, drafts, strict=True) if d.key is not None]
            if keyed:  # in the same transaction: a stored message always has its key
                conn.executemany("INSERT OR REPLACE INTO send_keys (uid, key, id) "
                                 "VALUES (?, ?, ?)", keyed)
        return messages, entries

    def sent_with_key(self, uid: int | None, key: str) -> Message | None:
        """The message local user ``uid`` stored with client key ``key``, if still retained.

        What makes a retried ``send`` idempotent (see :meth:`append_local`).  Any thread;
        the router asks on the writer thread, which alone writes keys, so a check and the
        append after it cannot race.
        """
        keys = self._select("SELECT id FROM send_keys WHERE uid = ? AND key = ?",
                            (_NO_UID if uid is None else uid, key))
        if not keys:
            return None
        # "<origin>:<seq>" (node ids are hex): found through the UNIQUE (origin, seq) index
        origin, _, seq = str(keys[0][0]).rpartition(":")
        if not seq.isascii() or not seq.isdigit():
            return None  # not an id we wrote: no message of ours has it
        messages = self._messages(self._select(
            f"SELECT {_COLUMNS} FROM messages WHERE origin = ? AND seq = ?", (origin, int(seq))))
        return messages[0] if messages else None

    def insert_remote(self, messages: Iterable[Message], *,
                      now: float | None = None) -> list[Message]:
        """Store, in one transaction, each message that extends its origin's prefix.

        A message is stored only if its seq is exactly one more than the
        highest seq of its origin held so far (counting earlier messages of
        this batch).  A lower seq is a duplicate -- an id once stored is never
        replaced, even by a copy that differs -- and a higher one would leave
        a gap; both are skipped.  Our own origin is no exception: after a
        restore from backup, peers' copies extend our prefix and
        :meth:`append_local` continues after them.  Returns the messages
        actually stored, in order.  Writer thread only.

        ``now`` is when they arrived: a message claiming a time more than
        FUTURE_SKEW_S after it is stored with its arrival time too, which
        retention goes by (see :meth:`prune`); and a copy of our own origin's
        message raises our latest ts (the floor of :meth:`append_local`'s
        stamps) to ``now + FUTURE_SKEW_S`` at most, so no peer's claim can
        drag our clock into the future.
        """
        future = None if now is None else float(now) + FUTURE_SKEW_S
        own: float | None = None  # the highest ts of ours stored here, if any
        own_before = 0.0  # our latest ts before them
        stored: list[Message] = []
        high: dict[str, int] = {}
        latest: dict[str, float] = {}  # origin -> the latest ts stored here
        with self._writing("write") as conn:
            for m in messages:
                if m.origin not in high:
                    row = conn.execute("SELECT seq, ts FROM high WHERE origin = ?",
                                       (m.origin,)).fetchone()
                    high[m.origin] = row[0] if row is not None else 0
                    if row is not None and m.origin == self._node_id:
                        own_before = float(row[1])
                if m.seq != high[m.origin] + 1:
                    continue
                received = now if future is not None and m.ts > future else None
                conn.execute(_INSERT, (m.id, m.origin, m.seq, m.ts, m.room, m.nick, m.host,
                                       m.text, m.to, None, None, received, m.to_node))
                high[m.origin] = m.seq
                latest[m.origin] = max(latest.get(m.origin, m.ts), m.ts)
                stored.append(m)
                if m.origin == self._node_id:
                    own = m.ts if own is None else max(own, m.ts)
            conn.executemany(_RAISE_HIGH, [(o, high[o], ts, None, None)
                                           for o, ts in latest.items()])
            if own is not None and future is not None and own > future:
                # The cursor took the claim as it was; bring our clock back to now (+ skew).
                conn.execute("UPDATE high SET ts = max(?, ?) WHERE origin = ?",
                             (own_before, future, self._node_id))
        return stored

    def insert_run(self, run: Sequence[Entry], *, key: bytes, now: float | None = None,
                   floor: bool = False) -> list[Entry]:
        """Store the entries of a verified run that extend their origin's feed; one transaction.

        The caller (the router) has verified ``run`` (:func:`lanchat.feed.verify_run`)
        with the origin's public key ``key`` (32 bytes, kept as the origin's) and
        checked that it continues the head we hold: entries at or below our head are
        skipped (duplicates), the first one above must be the next seq -- or, with
        ``floor`` (the sender's history of this origin before the run was pruned),
        anything above it: the cursor then jumps.  The run's last entry is marked
        checked (its signature verified), so we may end the runs we serve there.
        ``now``: as for :meth:`insert_remote` (far-future claims and our own clock).
        Returns the entries stored.  Writer thread only.
        """
        if not run:
            return []
        origin = run[0].message.origin
        future = None if now is None else float(now) + FUTURE_SKEW_S
        last_seq = run[-1].message.seq
        with self._writing("write") as conn:
            row = conn.execute("SELECT seq, ts FROM high WHERE origin = ?",
                               (origin,)).fetchone()
            high, own_before = (row[0], float(row[1])) if row is not None else (0, 0.0)
            fresh = [e for e in run if e.message.seq > high]
            if not fresh or (fresh[0].message.seq != high + 1 and not floor):
                return []
            conn.executemany(_INSERT_ENTRY, [
                _entry_row(e, None, now if future is not None and e.message.ts > future else None,
                           e.message.seq == last_seq)
                for e in fresh
            ])
            # (after a floor, the cursor jumps to the run's end)
            newest = max(e.message.ts for e in fresh)
            conn.execute(_RAISE_HIGH, (origin, fresh[-1].message.seq, newest, fresh[-1].hash,
                                       key))
            if origin == self._node_id and future is not None:
                own = newest
                if own > future:  # the cursor took the claim; back to now (+ skew)
                    conn.execute("UPDATE high SET ts = max(?, ?) WHERE origin = ?",
                                 (own_before, future, origin))
        return fresh

    def heads(self) -> dict[str, FeedHead]:
        """``{origin: FeedHead}`` of every signed feed we hold (the head survives retention).

        Any thread.
        """
        rows = self._select("SELECT origin, seq, hash FROM high WHERE hash IS NOT NULL", ())
        return {str(o): FeedHead(int(q), str(h))  # type: ignore[call-overload]
                for o, q, h in rows}

    def feed_key(self, origin: str) -> bytes | None:
        """``origin``'s public key (32 raw bytes) as we stored it, or None.  Any thread."""
        rows = self._select("SELECT key FROM high WHERE origin = ?", (origin,))
        return _blob(rows[0][0]) if rows and rows[0][0] is not None else None

    def hash_at(self, origin: str, seq: int) -> str | None:
        """The entry hash of ``origin``'s entry ``seq`` if we hold it signed.  Any thread."""
        rows = self._select("SELECT hash FROM messages WHERE origin = ? AND seq = ?",
                            (origin, seq))
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    def entries_after(self, origin: str, seq: int, limit: int) -> list[StoredEntry]:
        """``origin``'s signed entries above ``seq``, in seq order, at most ``limit``.

        What a relay serves (no :class:`Message` is built).  Unsigned messages (stored
        before signed feeds) are not entries: never returned.  Any thread.
        """
        if limit < 1:
            return []
        rows = self._select(
            "SELECT seq, body, sig, checked FROM messages WHERE origin = ? AND seq > ? "
            "AND body IS NOT NULL ORDER BY seq LIMIT ?", (origin, seq, limit))
        return [StoredEntry(int(q), _blob(b), None if g is None else _blob(g), bool(c))  # type: ignore[call-overload]
                for q, b, g, c in rows]

    def entries(self, origin: str, first: int, last: int) -> list[Entry]:
        """``origin``'s stored entries ``first``..``last`` (parsed again), for fork proofs.

        Any thread.  Raises StoreError if a stored body no longer parses.
        """
        rows = self._select(
            "SELECT body, sig FROM messages WHERE origin = ? AND seq BETWEEN ? AND ? "
            "AND body IS NOT NULL ORDER BY seq", (origin, first, last))
        try:
            return [parse_entry(_blob(b), None if g is None else _blob(g)) for b, g in rows]
        except FeedError as exc:
            raise StoreError(f"history at {self.path} holds an invalid entry: {exc}") from exc

    def mark_forked(self, origin: str, seq: int) -> None:
        """Remember that ``origin`` signed two entries for ``seq`` (the first found is kept).

        Writer thread only.
        """
        with self._writing("write") as conn:
            conn.execute("UPDATE high SET forked = coalesce(forked, ?) WHERE origin = ?",
                         (seq, origin))

    def forked(self) -> dict[str, int]:
        """``{origin: seq}`` of every origin found to have forked its feed.  Any thread."""
        rows = self._select("SELECT origin, forked FROM high WHERE forked IS NOT NULL", ())
        return {str(o): int(q) for o, q in rows}  # type: ignore[call-overload]

    def advance(self, origin: str, seq: int, ts: float) -> bool:
        """Move ``origin``'s cursor up to ``seq`` without storing messages 1..seq.

        For history that no longer exists anywhere we can get it from: a peer
        whose retention pruned an origin's first messages says so, and the
        messages after that floor then extend our prefix.  Never moves a
        cursor down.  Returns True if it moved.  Writer thread only.
        """
        with self._writing("write") as conn:
            row = conn.execute("SELECT seq FROM high WHERE origin = ?", (origin,)).fetchone()
            if row is not None and row[0] >= seq:
                return False
            conn.execute(
                "INSERT INTO high (origin, seq, ts) VALUES (?, ?, ?) ON CONFLICT (origin) "
                "DO UPDATE SET seq = max(seq, excluded.seq), ts = max(ts, excluded.ts)",
                (origin, seq, ts))
        return True

    def forget_idle(self, limit: int) -> list[str]:
        """Forget the cursors of up to ``limit`` origins that hold no message here.

        For the bound on origins held (limits.MAX_ORIGINS): an origin whose
        messages retention has removed is only a number we keep sending in
        ``sync``; forgetting it loses no history.  Never our own origin.
        Returns the origins forgotten.  Writer thread only.
        """
        if limit <= 0:
            return []
        with self._writing("write") as conn:
            rows = conn.execute(
                "SELECT origin FROM high WHERE origin != ? AND origin NOT IN "
                "(SELECT DISTINCT origin FROM messages) LIMIT ?",
                (self._node_id, limit)).fetchall()
            gone = [str(r[0]) for r in rows]
            conn.executemany("DELETE FROM high WHERE origin = ?", [(o,) for o in gone])
        return gone

    def history(self, *, room: str | None = None, limit: int = 50,
                before: float | None = None, since: float | None = None,
                viewer: str | None = None) -> list[Message]:
        """A page of history, oldest first, ordered by (ts, origin, seq).

        ``room`` None means every room.  ``before`` (exclusive) and ``since``
        (inclusive) bound ts.  With ``since`` and no ``before`` the page is the
        *first* ``limit`` messages at or after ``since`` (reading forward);
        otherwise it is the *last* ``limit`` messages in range.  ``limit`` is
        clamped to 1..MAX_HISTORY_PAGE.  ``viewer`` None includes every direct
        message (the caller decides who may see them); a nick keeps only the
        direct messages this node's user of that nick sent or is sent (the page
        is then ``limit`` messages that user may see).  Any thread.
        """
        limit = max(1, min(int(limit), MAX_HISTORY_PAGE))
        where: list[str] = ["text != ''"]  # sealed direct messages not opened here
        params: list[object] = []
        if room is not None:
            where.append("room = ?")
            params.append(room)
        if before is not None:
            where.append("ts < ?")
            params.append(float(before))
        if since is not None:
            where.append("ts >= ?")
            params.append(float(since))
        if viewer is not None:
            where.append(_VISIBLE)
            params += [viewer, self._node_id, self._node_id, viewer]
        forward = since is not None and before is None
        direction = "ASC" if forward else "DESC"
        sql = (f"SELECT {_COLUMNS} FROM messages"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY ts {direction}, origin {direction}, seq {direction} LIMIT ?")
        params.append(limit)
        rows = self._select(sql, params)
        if not forward:
            rows.reverse()
        return self._messages(rows)

    def count(self) -> int:
        """How many messages the store holds now.  Any thread."""
        ((n,),) = self._select("SELECT count(*) FROM messages", ())
        assert isinstance(n, int)
        return n

    def cursors(self) -> dict[str, int]:
        """``{origin: highest seq ever stored}`` -- each origin's prefix 1..n.

        Retention does not lower a cursor.  Any thread.
        """
        rows = self._select("SELECT origin, seq FROM high", ())
        return {str(origin): int(seq) for origin, seq in rows}  # type: ignore[call-overload]

    def after(self, origin: str, seq: int, limit: int) -> list[Message]:
        """``origin``'s messages with a seq above ``seq``, in seq order, at most ``limit``.

        For replay to a peer.  Messages removed by retention are not returned,
        so the first one may be above ``seq + 1``.  The caller bounds
        ``limit``; ``limit < 1`` returns nothing.  Any thread.
        """
        if limit < 1:
            return []
        rows = self._select(
            f"SELECT {_COLUMNS} FROM messages WHERE origin = ? AND seq > ? "
            "ORDER BY seq LIMIT ?", (origin, seq, limit))
        return self._messages(rows)

    def prune(self, now: float, *, limit: int | None = None) -> int:
        """Delete messages older than ``max_age_days`` or beyond ``max_messages``.

        The oldest go first, in history order.  A message that claimed a time
        far in the future when it arrived is as old as its arrival: it goes
        when one received then would (else it would sort last and stay for
        ever).  Cursors are kept (the ``high`` table), so the prefix rule still
        refuses pruned ids that come back.  At most ``limit`` messages go in
        one call (one short transaction: a pass over millions of rows would
        hold the writer for a minute; the caller repeats while a call
        returns ``limit``).  Returns how many messages were deleted.  Writer
        thread only.
        """
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1 or None")
        if self.max_age_days is None and self.max_messages is None:
            self._check_open()
            return 0
        deleted = 0
        room = -1 if limit is None else limit  # SQLite: LIMIT -1 is no limit
        with self._writing("prune") as conn:
            if self.max_age_days is not None:
                cutoff = float(now) - self.max_age_days * _SECONDS_PER_DAY
                for column in ("ts", "received"):
                    if room != 0:
                        n = conn.execute(_EXPIRED[column], (cutoff, room)).rowcount
                        deleted += n
                        room = room - n if room > 0 else room
            if self.max_messages is not None and room != 0:
                count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
                excess = count - self.max_messages
                if room > 0:
                    excess = min(excess, room)
                if excess > 0:
                    deleted += conn.execute(_OLDEST, (excess, excess)).rowcount
        if deleted:
            log.info("pruned %d old messages from %s", deleted, self.path)
        return deleted

    def close(self) -> None:
        """Close every connection the store opened.  Idempotent; any thread.

        Call it once the threads using the store have stopped; later calls
        of the other methods raise :class:`ClosedError`.
        """
        with self._readers_lock:
            if self._closed:
                return
            self._closed = True
            finalizers, self._readers = self._readers, set()
        for finalizer in finalizers:
            finalizer()
        try:
            self._writer.close()
        except sqlite3.Error as exc:
            log.warning("closing history %s: %s", self.path, exc)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
