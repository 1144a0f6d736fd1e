"""Tests of the PostgreSQL backend (storage_pg.py), against a real throwaway server (pgserver.py).

Part 1 drives `PgBackend` directly: delivery order, paging by key, count, delete, durability of
commit, idempotent re-insert, bulk insert speed, and what happens when the server goes away and
comes back. Part 2 runs the broker with `-pg CONNINFO` and talks raw STOMP to it (the Broker and
Client of conftest.py): kill -9 and restart, priorities, count-msgs, headers across restarts, and
the outage contract (SPEC §2, §5, §7: a RECEIPT means durable, so no RECEIPT while PostgreSQL
is down).

Without PostgreSQL server binaries every test here skips, unless OCAMLMQ_REQUIRE_PG=1 (as in CI),
which turns the skip into a failure. Each test gets a database of its own in one shared cluster.
"""

import os
import subprocess
import sys
import time

import pytest

import storage_pg
from conftest import (BROKER, Broker, create_database, drop_database, encode_frame, free_port,
                      pg_unavailable)

try:
    import psycopg2
except ImportError:
    psycopg2 = None

# The session's cluster is conftest's `cluster` fixture (shared with the both_backends tests of
# test_broker.py); it skips, or fails under OCAMLMQ_REQUIRE_PG=1, without PostgreSQL.


@pytest.fixture
def pg(cluster):
    """conninfo of a fresh database of its own; the server runs again after the test."""
    name, conninfo = create_database(cluster, connect_timeout=2)
    yield conninfo
    if not cluster.running:
        cluster.start()
    drop_database(cluster, name)


@pytest.fixture
def backends(pg):
    """Factory of PgBackend objects on the test's database; all are closed at teardown."""
    made = []

    def make(conninfo=pg, **kw):
        b = storage_pg.PgBackend(conninfo, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        try:
            b.close()
        except storage_pg.StorageError:
            pass


def row(msg_id, queue="q", priority=0, body=None, ack_timeout=None, headers="[]"):
    """A row as the store gives it: (id, queue, rank, ack_timeout, headers, body, deliveries,
    expires, ready_at)."""
    body = f"m{msg_id}".encode() if body is None else body
    return (msg_id, queue, -priority, ack_timeout, headers, body, 0, None, None)


def ids(rows):
    return [r[0] for r in rows]


FIRST = (-(1 << 63), 0)   # a key before every row
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# 1. The backend
# --------------------------------------------------------------------------------------------

def test_schema_is_created_once_and_reopened(backends):
    b = backends()
    assert b.max_id() == 0
    b.insert([row(7)])
    b.commit()
    b.close()
    again = backends()                       # tables exist now: nothing is recreated or lost
    assert again.max_id() == 7
    assert ids(again.fetch("q", FIRST, 10, MiB)) == [7]


def test_fetch_orders_by_priority_then_age(backends):
    b = backends()
    b.insert([row(1, priority=0), row(2, priority=5), row(3, priority=-3), row(4, priority=5),
              row(5, priority=0), row(6, priority=-3), row(7, priority=9, queue="other")])
    rows = b.fetch("q", FIRST, 100, MiB)
    assert ids(rows) == [2, 4, 1, 5, 3, 6]
    assert [r[1] for r in rows] == [-5, -5, 0, 0, 3, 3]      # FETCHED: id, rank, ...
    assert ids(b.fetch("other", FIRST, 100, MiB)) == [7]
    assert b.fetch("nothing", FIRST, 100, MiB) == []


def test_fetch_pages_after_a_key(backends):
    b = backends()
    b.insert([row(i, priority=i % 3 - 1) for i in range(1, 31)])
    everything = b.fetch("q", FIRST, 1000, MiB)
    assert len(everything) == 30
    pages, key = [], FIRST
    while True:
        page = b.fetch("q", key, 7, MiB)
        assert len(page) <= 7
        if not page:
            break
        pages += page
        key = (page[-1][1], page[-1][0])
    assert pages == everything
    # a key in the middle of one priority band
    assert ids(b.fetch("q", (0, 14), 3, MiB)) == [16, 19, 22]      # rank 0: ids 1, 4, 7, ...


def test_pages_stop_at_the_row_that_brings_the_bodies_to_max_bytes(backends):
    b = backends()
    b.insert([row(i, body=bytes(300_000)) for i in range(1, 11)]
             + [row(i, "other", body=bytes(3 * MiB)) for i in (11, 12)])
    b.commit()
    assert ids(b.fetch("q", FIRST, 100, MiB)) == [1, 2, 3, 4]       # 1.2 MB >= 1 MiB
    assert ids(b.fetch("q", FIRST, 2, MiB)) == [1, 2]
    assert ids(b.fetch("other", FIRST, 100, MiB)) == [11]          # one big row all the same
    b.insert([(13, "q", 0, None, "[]", bytes(MiB), 0, 5.0, None),
              (14, "q", 0, None, "[]", b"x", 0, 6.0, None)])
    assert ids(b.due("expires", (0, 0), 10, 100, MiB)) == [13]
    assert ids(b.due("expires", (0, 0), 10, 100, MiB + 1)) == [13, 14]


def test_fetch_is_one_index_range_scan(backends):
    b = backends()
    b.insert([row(i) for i in range(1, 100)])
    b.commit()
    with b.conn.cursor() as cur:
        cur.execute("SET enable_seqscan = off")
        cur.execute("SET enable_bitmapscan = off")
        cur.execute("EXPLAIN " + cur.mogrify(storage_pg.FETCH, ("q", 0, 10, 50, MiB)).decode())
        plan = "\n".join(r[0] for r in cur.fetchall())
    b.conn.rollback()
    assert "Index Scan using messages_by_queue" in plan, plan
    assert "ROW(rank, id) >" in plan, plan       # the key is the scan's start, not a filter
    assert "Sort" not in plan, plan


def test_rows_round_trip_with_bytes_bodies(backends):
    b = backends()
    big = os.urandom(1 << 20)
    b.insert([row(1, body=b"a\x00b\xff", ack_timeout=2.5, headers='[["x-custom","v"]]'),
              row(2, body=b""), row(3, body=big)])
    b.commit()
    got = backends().fetch("q", FIRST, 10, MiB)
    got = [row[:4] + (bytes(row[4]),) + row[5:] for row in got]    # psycopg2 gives memoryviews
    assert got[0] == (1, 0, 2.5, '[["x-custom","v"]]', b"a\x00b\xff", 0, None)
    assert got[1] == (2, 0, None, "[]", b"", 0, None)
    assert got[2][4] == big


def test_count_and_delete(backends):
    b = backends()
    b.insert([row(i) for i in range(1, 11)] + [row(100, queue="other")])
    assert b.count(["q"], 0) == 10 and b.count(["other"], 0) == 1 and b.count(["none"], 0) == 0
    b.delete([2, 4, 6, 999])                 # an unknown id is ignored
    assert b.count(["q"], 0) == 7
    assert ids(b.fetch("q", FIRST, 100, MiB)) == [1, 3, 5, 7, 8, 9, 10]
    b.delete([])
    b.delete(iter([1, 3]))
    b.commit()
    assert backends().count(["q"], 0) == 5
    assert b.max_id() == 100


def test_open_transaction_is_seen_by_its_connection_only_until_commit(backends):
    b, other = backends(), backends()
    b.insert([row(1), row(2)])
    b.commit()
    b.insert([row(3)])
    b.delete([1])
    assert ids(b.fetch("q", FIRST, 10, MiB)) == [2, 3]          # uncommitted writes are visible here
    assert ids(other.fetch("q", FIRST, 10, MiB)) == [1, 2]      # and nowhere else
    b.commit()
    assert ids(other.fetch("q", FIRST, 10, MiB)) == [2, 3]


def test_reads_leave_no_transaction_open(backends):
    b, watcher = backends(), backends()

    def state():
        with watcher.conn.cursor() as cur:
            cur.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                        (b.conn.get_backend_pid(),))
            return cur.fetchone()[0]
    b.max_id(), b.count(["q"], 0), b.fetch("q", FIRST, 10, MiB)
    assert state() == "idle"                 # no locks held between the broker's calls
    b.insert([row(1)])
    assert state() == "idle in transaction"
    b.fetch("q", FIRST, 10, MiB)
    b.commit()
    assert state() == "idle"
    b.commit()                               # nothing to commit: fine
    b.delete([1])
    assert state() == "idle in transaction"
    b.commit()
    assert state() == "idle" and b.count(["q"], 0) == 0


def test_commit_survives_a_server_crash(cluster, backends):
    b = backends()
    b.insert([row(1), row(2)])
    b.commit()
    b.insert([row(3)])                       # never committed
    cluster.stop("immediate")                # no shutdown checkpoint: recovery replays the WAL
    cluster.start()
    fresh = backends()
    assert ids(fresh.fetch("q", FIRST, 10, MiB)) == [1, 2]
    with fresh.conn.cursor() as cur:
        cur.execute("SHOW synchronous_commit")
        assert cur.fetchone()[0] == "on"
    fresh.conn.rollback()


def test_insert_is_idempotent(backends):
    b = backends()
    b.insert([row(1), row(2)])
    b.commit()
    b.insert([row(1), row(2), row(3)])       # a batch written again after a lost COMMIT reply
    b.insert([row(3), row(3)])               # even twice in one batch
    b.commit()
    assert b.count(["q"], 0) == 3
    assert ids(backends().fetch("q", FIRST, 10, MiB)) == [1, 2, 3]


def test_ten_thousand_rows_insert_and_delete_in_one_call_each(backends):
    """Large batches are split into statements the server accepts (speed is bench/'s job)."""
    b = backends()
    rows = [row(i, priority=i % 5, body=b"x" * 100) for i in range(1, 10001)]
    b.insert(rows)
    b.commit()
    assert b.count(["q"], 0) == 10000
    assert ids(backends().fetch("q", FIRST, 3, MiB)) == [4, 9, 14]      # priority 4 first
    b.delete(range(1, 10001))
    b.commit()
    assert b.count(["q"], 0) == 0


def test_conninfo_may_be_a_uri_or_come_from_pg_variables(cluster, pg, backends, monkeypatch):
    dbname = pg.split("dbname=")[1].split()[0]
    b = backends(f"postgresql://postgres@127.0.0.1:{cluster.port}/{dbname}")
    b.insert([row(1)])
    b.commit()
    for var, value in (("PGHOST", "127.0.0.1"), ("PGPORT", str(cluster.port)),
                       ("PGUSER", "postgres"), ("PGDATABASE", dbname)):
        monkeypatch.setenv(var, value)
    assert ids(backends("").fetch("q", FIRST, 10, MiB)) == [1]


def test_unreachable_server_is_a_one_line_storage_error():
    if psycopg2 is None:
        pg_unavailable("psycopg2 is not installed (pip install -r requirements.txt)")
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(storage_pg.StorageError) as err:
        storage_pg.PgBackend(f"host=127.0.0.1 port={port} user=postgres dbname=postgres")
    assert time.monotonic() - t0 < 5
    message = str(err.value)
    assert message.startswith("cannot connect to PostgreSQL: ") and "\n" not in message
    with pytest.raises(storage_pg.StorageError, match="invalid"):
        storage_pg.PgBackend("no_such_option=1")


def test_a_failed_statement_rolls_back_and_the_backend_goes_on(backends):
    b = backends()
    b.insert([row(1)])
    b.commit()
    b.insert([row(2)])
    with pytest.raises(storage_pg.StorageError):
        b.insert([(3, "q", 1 << 70, None, "[]", b"")])     # out of bigint range
    assert b.conn is not None
    assert ids(b.fetch("q", FIRST, 10, MiB)) == [1]             # the open transaction is gone
    b.insert([row(2)])
    b.commit()
    assert ids(backends().fetch("q", FIRST, 10, MiB)) == [1, 2]


def test_outage_raises_storage_error_then_reconnects(cluster, backends):
    b = backends()
    b.insert([row(1)])
    b.commit()
    b.insert([row(2)])                       # lost with the connection
    cluster.stop()
    for call in (lambda: b.insert([row(3)]), b.commit, lambda: b.fetch("q", FIRST, 10, MiB),
                 lambda: b.count(["q"], 0), b.max_id, lambda: b.delete([1])):
        t0 = time.monotonic()
        with pytest.raises(storage_pg.StorageError) as err:
            call()
        assert time.monotonic() - t0 < 3, "a call blocked while the server was down"
        assert "\n" not in str(err.value) and "PostgreSQL" in str(err.value)
        assert b.conn is None
    cluster.start()
    assert b.count(["q"], 0) == 1                 # the first call after the restart reconnects
    assert b.conn is not None
    b.insert([row(2), row(3)])               # the caller redoes its uncommitted batch
    b.commit()
    assert ids(backends().fetch("q", FIRST, 10, MiB)) == [1, 2, 3]


def test_close_commits_and_a_closed_backend_refuses(backends):
    b = backends()
    b.insert([row(1)])
    b.close()
    assert ids(backends().fetch("q", FIRST, 10, MiB)) == [1]
    with pytest.raises(storage_pg.StorageError):
        b.count(["q"], 0)


def test_only_storage_pg_imports_psycopg2():
    code = ("import sys, storage_sqlite, ocamlmq; assert 'psycopg2' not in sys.modules"
            if os.path.exists(BROKER) else
            "import sys, storage_sqlite; assert 'psycopg2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# 2. The broker on PostgreSQL
# --------------------------------------------------------------------------------------------

class PgBroker(Broker):
    def __init__(self, tmp_path, conninfo, flags=(), name="pgbroker"):
        super().__init__(tmp_path, "pg", flags, name=name, conninfo=conninfo)


@pytest.fixture
def pg_broker(pg, tmp_path):
    """Factory of brokers on the test's database; all are stopped at teardown, and a
    traceback on any of their stderr fails the test."""
    made = []

    def start(*flags):
        b = PgBroker(tmp_path, pg, flags, name=f"pgbroker{len(made) + 1}")
        made.append(b)
        return b.start()
    yield start
    for b in made:
        b.stop()
    for b in made:
        assert "Traceback" not in b.stderr(), b.stderr()[-3000:]


def test_broker_receipted_send_survives_kill9(pg_broker):
    b = pg_broker()
    c = b.client()
    c.send("/queue/durable", b"kept\x00body", headers={"x-custom": "yes", "content-type": "a/b"})
    mid = None
    b.kill9()
    b.start()
    c = b.client()
    c.subscribe("/queue/durable", ack="client-individual")
    m = c.message()
    assert m.body == b"kept\x00body"
    assert m["x-custom"] == "yes" and m["content-type"] == "a/b"
    mid = m["message-id"]
    c.ack(m)
    b.kill9()
    b.start()
    c = b.client()
    assert c.count_msgs("durable") == 0, "an ACK with a RECEIPT must be durable"
    assert mid


def test_broker_priorities_across_restart(pg_broker):
    b = pg_broker()
    c = b.client()
    for body, prio in [(b"low", -5), (b"mid1", 0), (b"high", 7), (b"mid2", 0), (b"lowest", -9)]:
        c.send("/queue/prio", body, priority=prio)
    b.kill9()
    b.start()
    c = b.client()
    assert c.count_msgs("prio") == 5
    c.subscribe("/queue/prio", ack="client-individual")
    got = c.messages(5)
    assert [m.body for m in got] == [b"high", b"mid1", b"mid2", b"low", b"lowest"]


def test_broker_unreceipted_sends_reach_postgresql_at_the_flush(pg_broker, pg):
    b = pg_broker()
    c = b.client()
    for i in range(20):
        c.send("/queue/flushed", f"n{i}".encode(), receipt=False)
    assert c.count_msgs("flushed") == 20
    deadline = time.monotonic() + 5
    while True:                              # -flush-period 0.2 writes them out soon
        conn = psycopg2.connect(pg)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM messages WHERE queue = 'flushed'")
            n = cur.fetchone()[0]
        conn.close()
        if n == 20 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert n == 20
    b.stop()
    b.start()
    c = b.client()
    c.subscribe("/queue/flushed")
    assert sorted(m.body for m in c.messages(20)) == sorted(f"n{i}".encode() for i in range(20))


def test_broker_unreachable_postgresql_at_start_is_one_line_and_exit_1(tmp_path):
    conninfo = f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres connect_timeout=2"
    out = subprocess.run([sys.executable, BROKER, "-port", str(free_port()), "-pg", conninfo],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr
    assert "postgres" in lines[0].lower(), lines[0]


def _new_lines(broker, before):
    return [l for l in broker.stderr()[before:].splitlines() if l.strip()]


def _receipted_send_outcome(broker, body):
    """SEND body to /queue/outage with a receipt on a fresh connection: "RECEIPT" or "ERROR"."""
    c = broker.client()
    rid = c.next_receipt_id()
    c.send_frame("SEND", {"destination": "/queue/outage", "receipt": rid}, body)
    f = c.wait_for(lambda f: f.command in ("RECEIPT", "ERROR"), timeout=10, what="RECEIPT/ERROR")
    if f.command == "RECEIPT":
        assert f["receipt-id"] == rid
    c.close()
    return f.command


def test_broker_postgresql_outage(pg_broker, cluster, pg):
    b = pg_broker()
    receipted = []
    assert _receipted_send_outcome(b, b"before") == "RECEIPT"
    receipted.append(b"before")
    listener = b.client()
    listener.subscribe("/topic/news")
    log_start = len(b.stderr())

    cluster.stop()
    # While PostgreSQL is down a queue SEND cannot become durable: ERROR, never RECEIPT.
    for i in range(3):
        assert _receipted_send_outcome(b, f"during{i}".encode()) == "ERROR"
    # Unreceipted queue SENDs are accepted and kept in memory until PostgreSQL is back.
    talker = b.client()
    for i in range(3):
        talker.send("/queue/outage", f"unreceipted{i}".encode(), receipt=False)
    # Topics do not touch storage and keep working, as do other connections.
    talker.send("/topic/news", b"still here")
    assert listener.message().body == b"still here"
    time.sleep(1.0)                          # some flush periods pass with the server down
    lines = [l for l in _new_lines(b, log_start) if "postgres" in l.lower()]
    assert len(lines) == 1, f"the outage should be logged once, not per retry: {lines}"
    assert b.alive()

    cluster.start()
    deadline = time.monotonic() + 10
    n = 0
    while True:                              # the broker reconnects by itself
        n += 1
        body = f"after{n}".encode()
        if _receipted_send_outcome(b, body) == "RECEIPT":
            receipted.append(body)
            break
        assert time.monotonic() < deadline, "no RECEIPT within 10 s of PostgreSQL's restart"
        time.sleep(0.3)
    for i in range(3):
        body = f"later{i}".encode()
        assert _receipted_send_outcome(b, body) == "RECEIPT"
        receipted.append(body)

    # The messages kept in memory reach PostgreSQL at a flush once it is back.
    kept = [f"unreceipted{i}".encode() for i in range(3)]
    deadline = time.monotonic() + 5
    while True:
        conn = psycopg2.connect(pg)
        with conn.cursor() as cur:
            cur.execute("SELECT body FROM messages WHERE queue = 'outage'")
            stored = [bytes(r[0]) for r in cur.fetchall()]
        conn.close()
        if all(k in stored for k in kept) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(k in stored for k in kept), f"unreceipted SENDs never written: {stored}"
    receipted += kept

    # Every message that got a RECEIPT is durable: kill -9, restart, all of them come back.
    b.kill9()
    b.start()
    c = b.client()
    c.subscribe("/queue/outage", ack="client-individual")
    got = []
    while True:
        m = c.try_message(timeout=1.0)
        if m is None:
            break
        got.append(m.body)
    missing = [r for r in receipted if r not in got]
    assert not missing, f"durably stored messages lost: {missing}; delivered: {got}"


def test_broker_receipted_ack_during_outage_is_durable_or_refused(pg_broker, cluster):
    """SPEC §7: an ACK that carried a receipt is durable once its RECEIPT is sent. While
    PostgreSQL is down the broker must hold that RECEIPT back or answer with an ERROR."""
    b = pg_broker()
    c = b.client()
    for body in (b"m1", b"m2", b"m3"):
        c.send("/queue/acks", body)
    consumer = b.client()
    consumer.subscribe("/queue/acks", ack="client-individual")
    got = {m.body: m for m in consumer.messages(3)}
    log_start = len(b.stderr())

    cluster.stop()
    outcomes = {}
    for body in (b"m1", b"m2"):
        rid = consumer.next_receipt_id()
        consumer.send_frame("ACK", {"id": got[body]["ack"], "receipt": rid})
        try:
            f = consumer.wait_for(lambda f: f.command in ("RECEIPT", "ERROR"), timeout=1.5,
                                  what="RECEIPT/ERROR")
            outcomes[body] = f.command
        except AssertionError:          # held back, or the connection was closed
            outcomes[body] = None
    lines = [l for l in _new_lines(b, log_start) if "postgres" in l.lower()]

    b.kill9()
    cluster.start()
    b.start()
    c = b.client()
    c.subscribe("/queue/acks", ack="client-individual")
    redelivered = set()
    while True:
        m = c.try_message(timeout=1.0)
        if m is None:
            break
        redelivered.add(m.body)
    assert b"m3" in redelivered, "a message never ACKed was lost"
    wrongly_back = [body for body, outcome in outcomes.items()
                    if outcome == "RECEIPT" and body in redelivered]
    assert not wrongly_back, (f"ACKs got a RECEIPT while PostgreSQL was down, yet their messages"
                              f" came back after a restart: {wrongly_back} (outcomes {outcomes})")
    assert len(lines) <= 1, f"the outage should be logged once, not once per ACK: {lines}"


def test_broker_consumer_resumes_after_outage(pg_broker, cluster):
    """A backlog bigger than one read from storage: the consumer drains what the broker holds in
    memory during the outage, and gets the rest once PostgreSQL is back, each message once."""
    n = 700
    b = pg_broker()
    c = b.client()
    c.send_raw(b"".join(encode_frame("SEND", {"destination": "/queue/backlog", "receipt": f"r{i}"},
                                     f"m{i}".encode()) for i in range(n)))
    for i in range(n):
        c.receipt(f"r{i}")
    consumer = b.client()
    consumer.subscribe("/queue/backlog", ack="client-individual", prefetch=20)
    cluster.stop()
    got = []

    def drain(quiet):
        while True:
            m = consumer.try_message(timeout=quiet)
            if m is None:
                return
            got.append(m.body)
            consumer.ack(m, receipt=False)
    drain(quiet=1.0)
    print(f"{len(got)} of {n} delivered while PostgreSQL was down")
    cluster.start()
    deadline = time.monotonic() + 15
    while len(got) < n and time.monotonic() < deadline:
        drain(quiet=0.5)
    assert len(got) == n and len(set(got)) == n, f"{len(got)} delivered, {len(set(got))} distinct"
    assert got == [f"m{i}".encode() for i in range(n)]


def test_broker_sigterm_during_outage_exits_promptly(pg_broker, cluster):
    b = pg_broker()
    c = b.client()
    c.send("/queue/shutdown", b"durable")
    c.send("/queue/shutdown", b"cached only", receipt=False)
    cluster.stop()
    t0 = time.monotonic()
    rc = b.terminate()
    assert time.monotonic() - t0 < 5 and rc in (0, 1), rc
    assert "Traceback" not in b.stderr()
    cluster.start()
    b.start()
    c = b.client()
    c.subscribe("/queue/shutdown")
    assert c.message().body == b"durable"


def test_broker_acks_reach_postgresql_within_flush_periods(pg_broker, cluster):
    """An ACK without a receipt is written at a flush like any other change (-flush-period 0.2):
    neither a count-msgs in between nor a PostgreSQL restart may bring the message back."""
    b = pg_broker()
    c = b.client()
    for body in (b"a1", b"a2", b"a3"):
        c.send("/queue/acked", body)
    consumer = b.client()
    consumer.subscribe("/queue/acked", ack="client-individual")
    first = consumer.message()
    assert first.body == b"a1"
    consumer.send_raw(encode_frame("ACK", {"id": first["ack"]}) +
                      encode_frame("SEND", {"destination": "/control/count-msgs/queue/acked",
                                            "receipt": "count"}))
    assert consumer.receipt("count")["num-messages"] == "2"
    time.sleep(1.0)                          # five flush periods
    cluster.stop()
    cluster.start()
    b.kill9()
    b.start()
    c = b.client()
    assert c.count_msgs("acked") == 2, "an ACKed message came back"


def test_broker_conninfo_from_pg_variables(pg_broker, cluster, pg, monkeypatch, tmp_path):
    dbname = pg.split("dbname=")[1].split()[0]
    for var, value in (("PGHOST", "127.0.0.1"), ("PGPORT", str(cluster.port)),
                       ("PGUSER", "postgres"), ("PGDATABASE", dbname)):
        monkeypatch.setenv(var, value)
    b = PgBroker(tmp_path, "", name="pgenv")          # -pg "": everything from PG* variables
    try:
        b.start()
        b.client().send("/queue/fromenv", b"via PG* variables")
    finally:
        b.stop()
    conn = psycopg2.connect(pg)
    with conn.cursor() as cur:
        cur.execute("SELECT body FROM messages WHERE queue = 'fromenv'")
        assert [bytes(r[0]) for r in cur.fetchall()] == [b"via PG* variables"]
    conn.close()


def test_broker_large_binary_body_survives_restart(pg_broker):
    body = os.urandom(8 << 20) + b"\x00end"
    b = pg_broker()
    b.client().send("/queue/big", body)
    b.kill9()
    b.start()
    c = b.client()
    c.subscribe("/queue/big")
    m = c.message(timeout=10)
    assert len(m.body) == len(body) and m.body == body
