"""The sqlite backend of ocamlmq.py: queue messages in one table of an embedded database file.

The broker (see the `MessageStore` docstring in ocamlmq.py for the whole storage contract) keeps
unreceipted messages in an in-memory cache and hands them to the backend in batches; the backend
only has to store rows, delete rows, find the next rows of a queue, and make all of that durable on
`commit()`. Writes go into one open transaction; `commit()` ends it, and with WAL plus
`synchronous=FULL` sqlite syncs the log to disk before returning, which is what a RECEIPT promises.

Rows are ordered for delivery by `rank` (minus the priority, so that the highest priority comes
first in ascending order), then by `id` (the broker hands out increasing ids, so older comes first).
The index on (queue, rank), which sqlite extends with the rowid `id`, makes "the next N messages of
queue Q after key K" one index range scan, however many queues and messages the table holds.
"""

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
    deliveries  INTEGER NOT NULL DEFAULT 0,  -- room to grow: poison-message handling
    expires     REAL                    -- room to grow: message expiry (unix time)
);
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, rank);
"""

BUSY_TIMEOUT_MS = 100                # the longest wait for a lock held by another process: the
                                    # reactor waits with it (5 s at start, when nothing waits)
INSERT_ROWS = 100                   # rows per INSERT: 600 parameters, under sqlite's old 999
FETCH = ("SELECT id, rank, ack_timeout, headers, body FROM messages"
         " WHERE queue = ? AND (rank, id) > (?, ?) ORDER BY rank, id LIMIT ?")


@functools.lru_cache(maxsize=None)
def insert_statement(count):
    """INSERT OR REPLACE of `count` rows (a row is written again after a failed commit)."""
    return ("INSERT OR REPLACE INTO messages (id, queue, rank, ack_timeout, headers, body) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * count))


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
        return self._run(lambda: self.db.execute("SELECT max(id) FROM messages").fetchone()[0] or 0)

    def insert(self, rows):
        """Store rows (id, queue, rank, ack_timeout, headers_json, body) in the open transaction.
        A statement takes many rows at once: fewer trips into sqlite than one per row."""
        def insert_all():
            for start in range(0, len(rows), INSERT_ROWS):
                chunk = rows[start:start + INSERT_ROWS]
                self.db.execute(insert_statement(len(chunk)), [v for row in chunk for v in row])
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

    def fetch(self, queue, after, limit):
        """Up to `limit` rows (id, rank, ack_timeout, headers_json, body) of `queue` whose
        (rank, id) key is greater than `after`, in key order."""
        rank, msg_id = after
        return self._run(lambda: self.db.execute(FETCH, (queue, rank, msg_id, limit)).fetchall())

    def count(self, queue=None):
        """How many rows `queue` has (every queue: None)."""
        if queue is None:
            return self._run(lambda: self.db.execute(
                "SELECT count(*) FROM messages").fetchone()[0])
        return self._run(lambda: self.db.execute(
            "SELECT count(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0])

    def close(self):
        try:
            self.db.execute("COMMIT")
            self.db.close()
        except sqlite3.Error as e:
            raise StorageError(f"closing the sqlite database: {e}") from None
        self.lock.close()         # sqlite is done with the file: its locks are gone anyway

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
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.db.execute("BEGIN")
        except sqlite3.Error:
            pass                  # the next call fails and tries again
