"""The PostgreSQL backend of ocamlmq.py (`-pg CONNINFO`): queue messages in one table of a server.

The sqlite backend's twin: same rows, methods, ordering and indexes (see storage_sqlite.py, and
the `MessageStore` docstring in ocamlmq.py for the contract). Writes go into one open
transaction, begun by the first write after a commit; `commit()` ends it under
`synchronous_commit = on`, so the server has flushed its WAL before the call returns. Reads
outside it run on their own (autocommit): the connection is never left "idle in transaction",
holding locks that would stop an operator's ALTER TABLE. Inserts are multi-row statements and
deletes one `DELETE ... WHERE id = ANY(...)`: a flush costs a few round trips.

Outages: when the connection is lost, the failing call raises StorageError and the backend drops
the connection; the next call tries once to reconnect (connect_timeout 2 s unless the conninfo sets
one; the store calls again only at its next flush).
Whatever the open transaction held is gone with the connection, so after any StorageError the
caller must assume its uncommitted inserts and deletes were lost and redo them; `insert` is
idempotent (INSERT ... ON CONFLICT (id) DO UPDATE) so a batch may be written twice, e.g. when
the connection died while COMMIT was in flight.
"""

import contextlib
import os

try:
    import psycopg2
    import psycopg2.extensions
    import psycopg2.extras
except ImportError:  # reported by PgBackend() as a one-line StorageError
    psycopg2 = None

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          bigint PRIMARY KEY,     -- the broker's message id, kept for the message's life
    queue       text NOT NULL,          -- queue name, without the /queue/ prefix
    rank        bigint NOT NULL,        -- minus the priority: ascending rank is delivery order
    ack_timeout double precision,       -- seconds, or NULL to wait for the ACK as long as needed
    headers     text NOT NULL,          -- the client's own SEND headers, as JSON [[name, value], ...]
    body        bytea NOT NULL,
    deliveries  integer NOT NULL DEFAULT 0,  -- how often it was delivered, as last written
    expires     double precision,       -- Unix time after which it is never delivered, or NULL
    ready_at    double precision        -- a delayed message: Unix time it becomes ready, or NULL
);
ALTER TABLE messages ADD COLUMN IF NOT EXISTS ready_at double precision;
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, rank, id);
CREATE INDEX IF NOT EXISTS messages_ready_at ON messages (ready_at) WHERE ready_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_expires ON messages (expires) WHERE expires IS NOT NULL;
"""

COLUMNS = ("id", "queue", "rank", "ack_timeout", "headers", "body", "deliveries", "expires",
           "ready_at")
INSERT = (f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES %s ON CONFLICT (id) DO UPDATE SET "
          + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[1:]))
FETCHED = ("id", "rank", "ack_timeout", "headers", "body", "deliveries", "expires")  # ready rows


def page(columns, where, order):
    """A SELECT of `columns` of the rows `where` says, in `order`: at most LIMIT %s, up to the
    one whose body brings their bodies to %s bytes (octet_length does not read a body)."""
    columns = ", ".join(columns)
    return (f"SELECT {columns} FROM (SELECT {columns}, sum(octet_length(body)) OVER (ORDER BY"
            f" {order} ROWS UNBOUNDED PRECEDING) - octet_length(body) AS before FROM messages"
            f" WHERE {where} ORDER BY {order} LIMIT %s) AS page WHERE before < %s ORDER BY {order}")


FETCH = page(FETCHED, "queue = %s AND (rank, id) > (%s, %s)", "rank, id")

INSERT_BATCH_ROWS = 1000            # rows per INSERT statement
INSERT_BATCH_BYTES = 8 << 20        # and about this many bytes of headers and bodies


class StorageError(Exception):
    """The database cannot be used; the message is one line meant for the operator."""


def _one_line(error):
    return next((line.strip() for line in str(error).splitlines() if line.strip()),
                type(error).__name__)


class PgBackend:
    """Rows of queue messages in a PostgreSQL table. Every method may raise StorageError."""

    def __init__(self, conninfo):
        if psycopg2 is None:
            raise StorageError("cannot use PostgreSQL: the psycopg2 module is not installed"
                               " (pip install psycopg2-binary)")
        self.conninfo = conninfo
        self.conn = None
        self.in_transaction = False  # a write since the last commit: BEGIN was sent
        self.closed = False
        try:
            self.options = self._options(conninfo)
            self._connect()
            self._create_schema()
        except psycopg2.Error as e:
            self._drop()
            raise StorageError(f"cannot connect to PostgreSQL: {_one_line(e)}") from None

    def max_id(self):
        """The highest message id stored, or 0."""
        return self._scalar("SELECT coalesce(max(id), 0) FROM messages")

    def insert(self, rows):
        """Store rows (as COLUMNS; headers as JSON) in the open transaction; a row whose id is
        stored already replaces it."""
        latest = {}     # one row per id: ON CONFLICT DO UPDATE must not meet an id twice
        for row in rows:
            latest[row[0]] = row + (0, None, None)[len(row) - 6:]    # 6: the rest as default
        if not latest:
            return

        def insert_batches(cur):
            self._begin(cur)
            batch, size = [], 0
            for row in latest.values():
                batch.append(row)
                size += len(row[4]) + len(row[5])
                if len(batch) >= INSERT_BATCH_ROWS or size >= INSERT_BATCH_BYTES:
                    psycopg2.extras.execute_values(cur, INSERT, batch, page_size=len(batch))
                    batch, size = [], 0
            if batch:
                psycopg2.extras.execute_values(cur, INSERT, batch, page_size=len(batch))
        self._run(insert_batches)

    def delete(self, ids):
        """Delete the rows with these ids, in the open transaction (one statement)."""
        ids = list(ids)
        if not ids:
            return

        def delete_rows(cur):
            self._begin(cur)
            cur.execute("DELETE FROM messages WHERE id = ANY(%s::bigint[])", (ids,))
        self._run(delete_rows)

    def commit(self):
        """End the open transaction durably (the server has synced it), then open the next one
        (with the next write)."""
        def commit(cur):
            if self.in_transaction:
                self.in_transaction = False     # COMMIT ends it, also when it fails
                cur.execute("COMMIT")
        self._run(commit)

    def fetch(self, queue, after, limit, max_bytes):
        """A page (see `page`) of `queue`'s rows (FETCHED columns) whose (rank, id) key is
        greater than `after`, in key order; sees the open transaction."""
        rank, msg_id = after
        return self._query(FETCH, (queue, rank, msg_id, limit, max_bytes))

    def due(self, column, after, now, limit, max_bytes):
        """A page (see `page`) of the rows whose `column` (ready_at or expires) is at or before
        `now`, and whose (column, id) key is greater than `after`, in key order."""
        return self._query(page(COLUMNS, f"({column}, id) > (%s, %s) AND {column} <= %s",
                                f"{column}, id"), (*after, now, limit, max_bytes))

    def next_due(self):
        """The earliest `ready_at`, or None."""
        return self._scalar("SELECT min(ready_at) FROM messages WHERE ready_at IS NOT NULL")

    def count(self, queues=None, now=None):
        """How many unexpired rows these queues have (every row of every queue: None)."""
        if queues is None:
            return self._scalar("SELECT count(*) FROM messages", ())
        return self._scalar("SELECT (SELECT count(*) FROM messages WHERE queue = ANY(%s))"
                            " - (SELECT count(*) FROM messages WHERE expires <= %s"
                            " AND queue = ANY(%s))", (list(queues), now, list(queues)))

    def close(self):
        """Commit what is pending and disconnect; a broken backend just forgets its state."""
        try:
            if self.conn is not None:
                self.commit()
        finally:
            self._drop()
            self.closed = True

    def _scalar(self, sql, params=()):
        return self._query(sql, params)[0][0]

    def _query(self, sql, params):
        def run(cur):
            cur.execute(sql, params)
            return cur.fetchall()
        return self._run(run)

    # -- connection handling ------------------------------------------------------------------

    @staticmethod
    def _options(conninfo):
        """Connection keywords added to `conninfo` unless it (or PG* variables) sets them: a short
        connect timeout and TCP keepalives, so that a dead server never blocks the broker long."""
        given = psycopg2.extensions.parse_dsn(conninfo)
        defaults = {"connect_timeout": ("PGCONNECT_TIMEOUT", 2),
                    "application_name": ("PGAPPNAME", "ocamlmq"), "keepalives_idle": (None, 10),
                    "keepalives_interval": (None, 5), "keepalives_count": (None, 3)}
        if psycopg2.extensions.libpq_version() >= 120000:
            defaults["tcp_user_timeout"] = (None, 10000)   # ms of unacknowledged data
        return {key: value for key, (env, value) in defaults.items()
                if key not in given and not (env and os.environ.get(env))}

    def _connect(self):
        conn = psycopg2.connect(self.conninfo, **self.options)
        try:
            conn.autocommit = True      # transactions are begun explicitly, by the first write
            with conn.cursor() as cur:
                cur.execute("SET synchronous_commit = on")   # COMMIT returns once WAL is synced
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.in_transaction = False

    def _create_schema(self):
        with self.conn.cursor() as cur:
            cur.execute("SELECT to_regclass('messages_expires') IS NOT NULL")
            if not cur.fetchone()[0]:
                # Serialise with other brokers creating the schema at the same moment.
                cur.execute("BEGIN")
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('ocamlmq schema'))")
                cur.execute(SCHEMA)
                cur.execute("COMMIT")

    def _begin(self, cur):
        if not self.in_transaction:
            cur.execute("BEGIN")
            self.in_transaction = True

    def _drop(self):
        conn, self.conn = self.conn, None
        self.in_transaction = False
        if conn is not None:
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def _reconnect(self):
        if self.closed:
            raise StorageError("the PostgreSQL backend is closed")
        try:
            self._connect()
        except psycopg2.Error as e:
            raise StorageError(f"cannot reconnect to PostgreSQL: {_one_line(e)}") from None

    def _run(self, operation):
        """operation(cursor) on the connection, reconnecting first if the last call lost it;
        every psycopg2 error becomes StorageError, and a lost connection is dropped."""
        if self.conn is None:
            self._reconnect()
        try:
            with self.conn.cursor() as cur:
                return operation(cur)
        except psycopg2.Error as e:
            lost = isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError))
            if not lost and not self.conn.closed and self.in_transaction:
                self.in_transaction = False
                try:                        # the transaction is aborted: nothing of it is kept
                    with self.conn.cursor() as cur:
                        cur.execute("ROLLBACK")
                except psycopg2.Error:
                    lost = True
            if lost or self.conn.closed:
                self._drop()
                raise StorageError(f"PostgreSQL connection lost: {_one_line(e)}") from None
            raise StorageError(f"PostgreSQL: {_one_line(e)}") from None
