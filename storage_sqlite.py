"""The sqlite backend of ocamlmq.py: queue messages in one table of an embedded database file.

The broker (see the `MessageStore` docstring in ocamlmq.py for the whole storage contract) keeps
unreceipted messages in an in-memory cache and hands them to the backend in batches; the backend
only has to store rows, delete rows, find the next rows of a queue, and make all of that durable on
`commit()`. Writes go into one open transaction; `commit()` ends it, and with WAL plus
`synchronous=FULL` sqlite syncs the log to disk before returning, which is what a RECEIPT promises.

Rows are ordered for delivery by `rank` (minus the priority, so that the highest priority comes
first in ascending order), then by `id` (the broker hands out increasing ids, so older comes first).
The index on (queue, rank), which sqlite extends with the rowid `id`, makes "the next N messages of
queue Q after key K" one index range scan, however many queues and messages the table holds. A
delayed message is stored under a queue name of its own until its `ready_at` (see Message.row),
so that scan never meets it; two partial indexes find the rows whose `ready_at` or `expires` is
past without reading the others.
"""

import contextlib
import fcntl
import functools
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,    -- the broker's message id, kept for the message's life
    queue       TEXT NOT NULL,          -- queue name, without the /queue/ prefix
    rank        INTEGER NOT NULL,       -- minus the priority: ascending rank is delivery order
    ack_timeout REAL,                   -- seconds, or NULL to wait for the ACK as long as needed
    headers     TEXT NOT NULL,          -- the client's own SEND headers, as JSON [[name, value], ...]
    body        BLOB NOT NULL,
    deliveries  INTEGER NOT NULL DEFAULT 0,  -- how often it was delivered, as last written
    expires     REAL,                   -- Unix time after which it is never delivered, or NULL
    ready_at    REAL                    -- a delayed message: Unix time it becomes ready, or NULL
);
"""
MIGRATION = "ALTER TABLE messages ADD COLUMN ready_at REAL"    # databases made before delays
INDEXES = """
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, rank);
CREATE INDEX IF NOT EXISTS messages_ready_at ON messages (ready_at) WHERE ready_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_expires ON messages (expires) WHERE expires IS NOT NULL;
"""

BUSY_TIMEOUT_MS = 100                # the longest wait for a lock held by another process: the
                                    # reactor waits with it (5 s at start, when nothing waits)
INSERT_ROWS = 100                   # rows per INSERT: 900 parameters, under sqlite's old 999
COLUMNS = "id, queue, rank, ack_timeout, headers, body, deliveries, expires, ready_at"
FETCHED = "id, rank, ack_timeout, headers, body, deliveries, expires"   # of a queue's ready rows
FETCH = (f"SELECT {FETCHED} FROM messages"
         " WHERE queue = ? AND (rank, id) > (?, ?) ORDER BY rank, id LIMIT ?")


@functools.lru_cache(maxsize=None)
def insert_statement(count, width):
    """INSERT OR REPLACE of `count` rows of the first `width` COLUMNS (a row may be written
    again, changed or not)."""
    columns = ", ".join(COLUMNS.split(", ")[:width])
    return (f"INSERT OR REPLACE INTO messages ({columns}) VALUES "
            + ", ".join(["(" + ", ".join("?" * width) + ")"] * count))


class StorageError(Exception):
    """The database cannot be used; the message is one line meant for the operator."""


class SqliteBackend:
    """Rows of queue messages in a sqlite file. Every method may raise StorageError."""

    def __init__(self, path):
        self.lock = self._lock(path)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            if "ready_at" not in [c[1] for c in self.db.execute("PRAGMA table_info(messages)")]:
                self.db.execute(MIGRATION)
            self.db.executescript(INDEXES)
            self.db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.db.execute("BEGIN")
        except sqlite3.Error as e:
            raise StorageError(f"cannot use sqlite database {path!r}: {e}") from None

    @staticmethod
    def _lock(path):
        """One broker per database file: an exclusive flock on it for the broker's life (sqlite's
        own locks are per transaction, and two brokers on one file would deliver everything
        twice). The file stays open until the process ends: closing any descriptor of the file
        would drop sqlite's POSIX locks."""
        try:
            lock = open(path, "ab")
        except OSError as e:
            raise StorageError(f"cannot use sqlite database {path!r}: {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StorageError(f"sqlite database {path!r} is in use by another broker "
                               f"(one broker per file; several brokers can share PostgreSQL)"
                               ) from None
        return lock

    def max_id(self):
        """The highest message id stored, or 0."""
        return self._scalar("SELECT max(id) FROM messages") or 0

    def insert(self, rows):
        """Store rows (as COLUMNS, or the first 6 with the rest at their defaults; headers as
        JSON) in the open transaction. A statement takes many rows of one width at once."""
        def insert_all():
            for width in (6, 9):
                same = [row for row in rows if len(row) == width]
                for start in range(0, len(same), INSERT_ROWS):
                    chunk = same[start:start + INSERT_ROWS]
                    self.db.execute(insert_statement(len(chunk), width),
                                    [v for row in chunk for v in row])
        self._run(insert_all)

    def delete(self, ids):
        """Delete the rows with these ids, in the open transaction."""
        self._run(lambda: self.db.executemany("DELETE FROM messages WHERE id = ?",
                                              [(i,) for i in ids]))

    def commit(self):
        """End the open transaction durably (synced to disk), then open the next one."""
        def commit_and_begin():
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
        self._run(commit_and_begin)

    def fetch(self, queue, after, limit, max_bytes):
        """A page (see _page) of `queue`'s rows (FETCHED columns) whose (rank, id) key is
        greater than `after`, in key order."""
        rank, msg_id = after
        return self._page(FETCH, (queue, rank, msg_id, limit), max_bytes, body=4)

    def due(self, column, after, now, limit, max_bytes):
        """A page (_page) of the rows due by `now`, after `after` by their (column, id) key."""
        sql = (f"SELECT {COLUMNS} FROM messages WHERE ({column}, id) > (?, ?) AND {column} <= ?"
               f" ORDER BY {column}, id LIMIT ?")
        return self._page(sql, (*after, now, limit), max_bytes, body=5)

    def _page(self, sql, params, max_bytes, body):
        """The rows of `sql` (at most its LIMIT), up to the one whose body (column `body`)
        brings their bodies to `max_bytes`: a page of big messages stays small."""
        def read():
            rows, size = [], 0
            for row in self.db.execute(sql, params):
                rows.append(row)
                size += len(row[body])
                if size >= max_bytes:
                    break
            return rows
        return self._run(read)

    def next_due(self):
        """The earliest `ready_at`, or None."""
        return self._scalar("SELECT min(ready_at) FROM messages WHERE ready_at IS NOT NULL")

    def count(self, queues=None, now=None):
        """How many unexpired rows these queues have (every row of every queue: None)."""
        if queues is None:
            return self._scalar("SELECT count(*) FROM messages")
        names = ", ".join("?" * len(queues))
        return self._scalar(f"SELECT (SELECT count(*) FROM messages WHERE queue IN ({names})) -"
                            f" (SELECT count(*) FROM messages INDEXED BY messages_expires"
                            f" WHERE expires <= ? AND queue IN ({names}))", (*queues, now, *queues))

    def close(self):
        try:
            self.db.execute("COMMIT")
            self.db.close()
        except sqlite3.Error as e:
            raise StorageError(f"closing the sqlite database: {e}") from None
        self.lock.close()         # sqlite is done with the file: its locks are gone anyway

    def _scalar(self, sql, params=()):
        return self._run(lambda: self.db.execute(sql, params).fetchone()[0])

    def _run(self, operation):
        try:
            return operation()
        except sqlite3.Error as e:
            self._restart_transaction()
            raise StorageError(f"sqlite: {e}") from None

    def _restart_transaction(self):
        """A failure loses the open transaction (the store writes it all again): roll back
        what sqlite did not, so that no stale snapshot or half-done write stays behind, and
        open a new one for the writes that follow."""
        with contextlib.suppress(sqlite3.Error):     # else the next call fails and tries again
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.db.execute("BEGIN")
