"""SPEC §12: delivery counts, dead-letter queues, expiry and delayed delivery.

Tests marked both_backends run on sqlite and PostgreSQL; the two storage-outage tests hold
sqlite's write lock from another process, so they run on sqlite only.

Raw frames against the real broker on both backends (restarts, kill -9, migration of a database
written by the version before §12), and the timing rules on an in-process Broker with a fake
clock (test_timing.Harness) where waiting for real would make a test slow.
"""

import json
import random
import sqlite3
import string
import time

import pytest

import ocamlmq
from conftest import Broker
from test_timing import Harness, encode_frame



def now_ms(offset=0.0):
    return int((time.time() + offset) * 1000)


def deliveries(c, n, timeout=5.0):
    """The delivery-count of each of the next `n` MESSAGEs, checked against redelivered."""
    counts = []
    for msg in c.messages(n, timeout=timeout):
        count = int(msg["delivery-count"])
        assert ("redelivered" in msg) == (count > 1), msg
        counts.append(count)
    return counts


# ---- delivery-count --------------------------------------------------------------------------

@pytest.mark.both_backends
def test_delivery_count_after_nack_unsubscribe_and_connection_loss(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "job")
    sub = a.subscribe(q, ack="client-individual")
    first = a.message()
    assert first["delivery-count"] == "1" and "redelivered" not in first
    a.nack(first)
    second = a.message()
    assert second["delivery-count"] == "2" and second["redelivered"] == "true"
    assert second["message-id"] == first["message-id"]
    a.unsubscribe(sub)
    a.subscribe(q, ack="client-individual")
    assert deliveries(a, 1) == [3]
    a.drop()                                    # connection lost: back to the queue
    b = broker.client()
    b.subscribe(q, ack="client-individual")
    msg = b.message()
    assert int(msg["delivery-count"]) == 4
    b.ack(msg)
    assert b.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_delivery_count_survives_clean_restart_and_kill9(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "job")
    a.subscribe(q, ack="client-individual")
    a.nack(a.message())
    assert deliveries(a, 1) == [2]              # delivered, not ACKed, at the clean stop
    broker.restart()
    a = broker.client()
    a.subscribe(q, ack="client-individual")
    msg = a.message()
    assert msg["delivery-count"] == "3" and msg["redelivered"] == "true"
    a.nack(msg)                                 # back to the queue, and out again at once...
    assert deliveries(a, 1) == [4]
    time.sleep(0.6)                             # ...then written by the next flush: 4 so far
    broker.kill9()
    broker.start()
    a = broker.client()
    a.subscribe(q, ack="client-individual")
    assert deliveries(a, 1) == [5]
    broker.kill9()                              # the 5th delivery was never written: forgotten
    broker.start()
    a = broker.client()
    a.subscribe(q, ack="client-individual")
    assert deliveries(a, 1) == [5]


@pytest.mark.both_backends
def test_message_from_disk_back_to_an_empty_queue_stays_redelivered(broker, qname):
    """A message that returns to a queue with no subscriber, and is read back from the disk,
    keeps its count (it used to lose its redelivered flag there)."""
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "job")
    time.sleep(0.5)                             # on disk
    sub = a.subscribe(q, ack="client-individual")
    a.message()
    a.unsubscribe(sub)
    time.sleep(0.5)
    a.subscribe(q, ack="client-individual")
    assert deliveries(a, 1) == [2]


@pytest.mark.both_backends
def test_topics_have_no_delivery_count_and_ignore_delays_and_expiry(broker, qname):
    t = f"/topic/{qname}"
    a = broker.client()
    a.subscribe(t)
    a.send(t, "now", headers={"AMQ_SCHEDULED_DELAY": "60000", "expires": "1",
                              "max-deliveries": "junk"})
    msg = a.message()
    assert msg.body == b"now" and "delivery-count" not in msg


@pytest.mark.both_backends
def test_client_cannot_set_delivery_count(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "x", headers={"delivery-count": "99"})
    a.subscribe(q)
    msg = a.message()
    assert msg.get("delivery-count") == "1"
    assert [v for k, v in msg.header_list if k == "delivery-count"] == ["1"]


@pytest.mark.parametrize("header,value", [("max-deliveries", "-1"), ("max-deliveries", "two"),
                                          ("expires", "soon"), ("expiration", "-5"),
                                          ("AMQ_SCHEDULED_DELAY", "1.5"), ("deliver-at", "x")])
@pytest.mark.both_backends
def test_bad_header_values_are_errors(broker, qname, header, value):
    a = broker.client()
    a.send(f"/queue/{qname}", "x", receipt=False, headers={header: value})
    assert header in a.expect_error()["message"]
    assert broker.client().count_msgs(qname) == 0


# ---- dead-letter queues ----------------------------------------------------------------------

def assert_dead_lettered(msg, qname, reason, body, message_id=None):
    assert msg["destination"] == f"/queue/DLQ.{qname}"
    assert msg["original-destination"] == f"/queue/{qname}"
    assert msg["dead-letter-reason"] == reason
    assert msg.body == body
    if message_id is not None:
        assert msg["message-id"] == message_id


@pytest.mark.both_backends
def test_max_deliveries_moves_to_the_dlq_with_headers_id_and_body(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, b"bad\x00task", headers={"max-deliveries": "2", "x-job": "7",
                                       "content-type": "application/octet-stream"})
    a.subscribe(q, ack="client-individual")
    first = a.message()
    a.nack(first)
    a.nack(a.message())                         # the 2nd delivery comes back: dead-lettered
    assert a.try_message() is None
    assert a.count_msgs(qname) == 0 and a.count_msgs(f"DLQ.{qname}") == 1
    d = broker.client()
    d.subscribe(f"/queue/DLQ.{qname}", ack="client-individual")
    dead = d.message()
    assert_dead_lettered(dead, qname, "max-deliveries", b"bad\x00task", first["message-id"])
    assert dead["x-job"] == "7" and dead["max-deliveries"] == "2"
    assert dead["content-type"] == "application/octet-stream"
    assert dead["delivery-count"] == "1"
    d.ack(dead)
    assert d.count_msgs(f"DLQ.{qname}") == 0


@pytest.mark.both_backends
def test_default_max_deliveries_and_connection_loss(start_broker, qname):
    broker = start_broker("-max-deliveries", "1")
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "task")
    a.send(q, "patient", headers={"max-deliveries": "0"})     # 0: unlimited, whatever the default
    a.subscribe(q, ack="client-individual", prefetch=10)
    a.messages(2)
    a.drop()
    b = broker.client()
    b.subscribe(f"/queue/DLQ.{qname}")
    assert_dead_lettered(b.message(), qname, "max-deliveries", b"task")
    b.subscribe(q)
    msg = b.message()
    assert msg.body == b"patient" and msg["delivery-count"] == "2"


@pytest.mark.both_backends
def test_nack_requeue_false_rejects_at_once_and_survives_kill9(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "reject me")
    a.subscribe(q, ack="client-individual")
    a.nack(a.message(), requeue="false")   # its RECEIPT: the move is on disk
    broker.kill9()
    broker.start()
    b = broker.client()
    assert b.count_msgs(qname) == 0 and b.count_msgs(f"DLQ.{qname}") == 1
    b.subscribe(f"/queue/DLQ.{qname}", ack="client-individual")
    dead = b.message()
    assert_dead_lettered(dead, qname, "rejected", b"reject me")
    b.nack(dead, requeue="false")           # and further
    b.subscribe(f"/queue/DLQ.DLQ.{qname}")
    deeper = b.message()
    assert deeper["original-destination"] == f"/queue/DLQ.{qname}"
    assert [v for k, v in deeper.header_list if k == "original-destination"] == [
        f"/queue/DLQ.{qname}"]


@pytest.mark.both_backends
def test_ack_timeout_counts_toward_max_deliveries(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "slow", headers={"ack-timeout": "0.3", "max-deliveries": "2"})
    a.subscribe(q, ack="client-individual")
    assert deliveries(a, 2) == [1, 2]           # never ACKed: taken back twice
    b = broker.client()
    b.subscribe(f"/queue/DLQ.{qname}")
    assert_dead_lettered(b.message(), qname, "max-deliveries", b"slow")


# ---- expiry ----------------------------------------------------------------------------------

@pytest.mark.both_backends
def test_expired_messages_are_never_delivered_nor_counted(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "old", headers={"expires": str(now_ms(-1))})
    a.send(q, "soon", headers={"expiration": "300"})
    a.send(q, "later", headers={"expires": str(now_ms(60))})
    a.send(q, "never", headers={"expires": "0"})         # 0: no expiry
    assert a.count_msgs(qname) == 3
    time.sleep(0.5)
    assert a.count_msgs(qname) == 2
    a.subscribe(q)
    assert [m.body for m in a.messages(2)] == [b"later", b"never"]
    assert a.try_message(0.5) is None


@pytest.mark.both_backends
def test_expiry_in_the_window_and_on_disk_after_restart(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.subscribe(q, ack="client-individual", prefetch=1)
    a.send(q, "first")
    for i in range(3):
        a.send(q, f"short{i}", headers={"expiration": "300"})
    a.send(q, "kept", headers={"expiration": "60000"})
    first = a.message()
    time.sleep(0.5)                             # the three expire while waiting in memory
    a.ack(first)
    assert a.message().body == b"kept"
    a.send(q, "on disk", headers={"expiration": "800"})
    broker.stop()
    time.sleep(1.0)
    broker.start()
    b = broker.client()
    assert b.count_msgs(qname) == 1             # "kept", delivered and not ACKed
    b.subscribe(q)
    assert b.message().body == b"kept" and b.try_message(0.5) is None


@pytest.mark.both_backends
def test_expired_with_dead_letter_goes_to_the_dlq(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "a", headers={"expiration": "200", "dead-letter": "true"})
    a.send(q, "b", headers={"expiration": "200", "max-deliveries": "5"})
    a.send(q, "c", headers={"expiration": "200"})
    time.sleep(1.0)                             # a purge of expired rows runs meanwhile
    assert a.count_msgs(qname) == 0 and a.count_msgs(f"DLQ.{qname}") == 2
    a.subscribe(f"/queue/DLQ.{qname}")
    dead = a.messages(2)
    assert sorted(m.body for m in dead) == [b"a", b"b"]
    for m in dead:
        assert_dead_lettered(m, qname, "expired", m.body)


def stored_bodies(broker):
    """The bodies of every row of the broker's database (read directly, broker stopped)."""
    if broker.backend == "sqlite":
        return [bytes(b) for b, in sqlite3.connect(broker.db).execute("SELECT body FROM messages")]
    import psycopg2
    with psycopg2.connect(broker.conninfo) as conn, conn.cursor() as cur:
        cur.execute("SELECT body FROM messages")
        bodies = [bytes(b) for b, in cur.fetchall()]
    conn.close()
    return bodies


@pytest.mark.both_backends
def test_expired_rows_are_deleted_from_disk(broker, qname):
    a = broker.client()
    for i in range(1200):                       # more than one purge batch
        a.send(f"/queue/{qname}", f"m{i}", receipt=i == 1199, headers={"expiration": "200"})
    a.send(f"/queue/{qname}", "stays")
    time.sleep(1.5)
    broker.stop()
    assert stored_bodies(broker) == [b"stays"]


# ---- delayed delivery ------------------------------------------------------------------------

@pytest.mark.both_backends
def test_delayed_message_reaches_a_waiting_consumer_at_its_time(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.subscribe(q)
    start = time.time()
    a.send(q, "later", headers={"AMQ_SCHEDULED_DELAY": "700"})
    a.send(q, "at", headers={"deliver-at": str(now_ms(0.4))})
    assert a.count_msgs(qname) == 2             # delayed ones are counted
    a.send(q, "now")
    assert a.message().body == b"now"
    assert a.message(timeout=3).body == b"at"
    assert time.time() - start >= 0.35
    msg = a.message(timeout=3)
    assert msg.body == b"later" and time.time() - start >= 0.65
    assert msg["delivery-count"] == "1"


@pytest.mark.both_backends
def test_delayed_messages_take_their_place_by_priority(broker, qname):
    """A delayed message that becomes ready sorts before the ready messages already held in the
    queue's window in memory (higher priority), and the window stays in order."""
    q = f"/queue/{qname}"
    a = broker.client()
    a.subscribe(q, ack="client-individual", prefetch=1)
    for i in range(20):
        a.send(q, f"ready{i}")
    a.send(q, "urgent", headers={"AMQ_SCHEDULED_DELAY": "300", "priority": "9"})
    a.send(q, "low", headers={"AMQ_SCHEDULED_DELAY": "300", "priority": "-1"})
    got = []
    msg = a.message()
    time.sleep(0.6)
    while msg is not None:
        got.append(msg.body.decode())
        a.ack(msg)
        msg = a.try_message(1.0)
    assert got == ["ready0", "urgent"] + [f"ready{i}" for i in range(1, 20)] + ["low"]


@pytest.mark.both_backends
def test_delayed_message_survives_kill9_and_comes_at_once_after_its_time(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "delayed", headers={"AMQ_SCHEDULED_DELAY": "1000"}, receipt=False)
    a.send(q, "control")                        # its RECEIPT: both are on disk
    broker.kill9()
    time.sleep(1.2)
    broker.start()
    b = broker.client()
    b.subscribe(q)
    assert sorted(m.body for m in b.messages(2, timeout=2)) == [b"control", b"delayed"]


@pytest.mark.both_backends
def test_delayed_not_delivered_before_its_time_after_restart(broker, qname):
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "delayed", headers={"AMQ_SCHEDULED_DELAY": "2500"})
    broker.restart()
    b = broker.client()
    b.subscribe(q)
    assert b.try_message(1.0) is None
    assert b.message(timeout=5).body == b"delayed"


# ---- a database from before §12 --------------------------------------------------------------

OLD_SQLITE_SCHEMA = """
CREATE TABLE messages (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, rank INTEGER NOT NULL,
    ack_timeout REAL, headers TEXT NOT NULL, body BLOB NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0, expires REAL);
CREATE INDEX messages_by_queue ON messages (queue, rank);
"""
OLD_PG_SCHEMA = """
CREATE TABLE messages (id bigint PRIMARY KEY, queue text NOT NULL, rank bigint NOT NULL,
    ack_timeout double precision, headers text NOT NULL, body bytea NOT NULL,
    deliveries integer NOT NULL DEFAULT 0, expires double precision);
CREATE INDEX messages_by_queue ON messages (queue, rank, id);
"""


@pytest.mark.both_backends
def test_database_of_the_previous_version_is_migrated(backend, tmp_path, qname, request):
    rows = [(1, qname, -5, None, json.dumps([["x-old", "yes"]]), b"high"),
            (2, qname, 0, None, "[]", b"low")]
    if backend == "sqlite":
        broker = Broker(tmp_path, "sqlite", name="old")
        db = sqlite3.connect(broker.db)
        db.executescript(OLD_SQLITE_SCHEMA)
        db.executemany("INSERT INTO messages (id, queue, rank, ack_timeout, headers, body)"
                       " VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.commit()
        db.close()
    else:
        import psycopg2
        pool = request.getfixturevalue("pg_databases")
        dbname, conninfo = pool.take()
        request.addfinalizer(lambda: pool.give_back(dbname))
        with psycopg2.connect(conninfo) as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS messages")
            cur.execute(OLD_PG_SCHEMA)
            cur.executemany("INSERT INTO messages (id, queue, rank, ack_timeout, headers, body)"
                            " VALUES (%s, %s, %s, %s, %s, %s)", rows)
        conn.close()
        broker = Broker(tmp_path, "pg", name="old", conninfo=conninfo)
    broker.start()
    request.addfinalizer(broker.stop)
    a = broker.client()
    q = f"/queue/{qname}"
    assert a.count_msgs(qname) == 2
    a.send(q, "delayed", headers={"AMQ_SCHEDULED_DELAY": "300"})
    a.subscribe(q, ack="client-individual")
    high, low = a.messages(2)
    assert (high.body, high["x-old"], high["message-id"], low.body) == (b"high", "yes", "1", b"low")
    a.nack(high)
    assert deliveries(a, 1) == [2]
    assert a.message(timeout=3).body == b"delayed"
    broker.restart()                            # opens the migrated database again
    assert broker.client().count_msgs(qname) == 3


# ---- timing on an in-process broker (fake clock, real sqlite store) --------------------------

def test_fake_clock_delay_is_exact_and_expiry_at_the_window_head(tmp_path):
    h = Harness(tmp_path)
    wall = h.timers.clock
    c = h.connect()
    h.feed(c, encode_frame("SUBSCRIBE", {"destination": "/queue/q", "id": "s", "ack": "client"}))
    h.write(c)
    h.feed(c, encode_frame("SEND", {"destination": "/queue/q", "AMQ_SCHEDULED_DELAY": "5000"},
                           b"delayed"))
    h.feed(c, encode_frame("SEND", {"destination": "/queue/q", "expires":
                                    str(int((wall() + 2) * 1000))}, b"expiring"))
    assert [f.body for f in h.write(c)] == [b"expiring"]
    h.feed(c, encode_frame("NACK", {"id": next(iter(c.deliveries))}))
    assert [f.headers["delivery-count"] for f in h.write(c)] == ["2"]
    h.timers.advance(4.999)
    h.feed(c, encode_frame("NACK", {"id": next(iter(c.deliveries))}))
    assert h.write(c) == []                     # expired at the head of the window: dropped
    assert h.broker.totals["expired"] == 1
    h.timers.advance(0.002)
    assert [f.body for f in h.write(c)] == [b"delayed"]


def test_fake_clock_delayed_messages_and_a_full_window(tmp_path):
    """The queue's window is full and more is on disk: a delayed message that becomes ready
    with a key before the window's cursor joins the window, one with a later key is read from
    the disk in its turn; both in priority and age order with the rest."""
    h = Harness(tmp_path)
    c = h.connect()
    count = ocamlmq.Queue.WINDOW + 100
    h.feed(c, encode_frame("SUBSCRIBE", {"destination": "/queue/q", "id": "s", "prefetch": "1",
                                         "ack": "client-individual"}))
    h.feed(c, encode_frame("SEND", {"destination": "/queue/q", "AMQ_SCHEDULED_DELAY": "1000",
                                    "priority": "5"}, b"urgent"))
    h.feed(c, b"".join(encode_frame("SEND", {"destination": "/queue/q"}, b"%d" % i)
                       for i in range(count)))
    h.feed(c, encode_frame("SEND", {"destination": "/queue/q", "AMQ_SCHEDULED_DELAY": "1000"},
                           b"late"))
    h.broker.flush()
    [first] = h.write(c)
    assert first.body == b"0" and h.broker.queues["q"].backlog_on_disk
    h.timers.advance(1.0)
    got = [first.body]
    for _ in range(count + 1):
        h.feed(c, encode_frame("ACK", {"id": next(iter(c.deliveries))}))
        [msg] = h.write(c)
        got.append(msg.body)
    assert got == [b"0", b"urgent"] + [b"%d" % i for i in range(1, count)] + [b"late"]
    h.broker.shutdown()


@pytest.mark.both_backends
def test_stomppy_worker_gives_up_on_a_poison_message(broker, qname):
    """The README's worker, with the real stomp.py client: a task that always fails is tried
    three times (delivery-count 1, 2, 3) and then rejected to the DLQ; a good task is ACKed."""
    import threading
    import stomp
    seen, done = [], threading.Event()

    class Worker(stomp.ConnectionListener):
        def on_message(self, frame):
            count = int(frame.headers["delivery-count"])
            seen.append((frame.body, count))
            if frame.body == "good":
                conn.ack(frame.headers["ack"])
            elif count >= 3:
                conn.nack(frame.headers["ack"], requeue="false")
                done.set()
            else:
                conn.nack(frame.headers["ack"])

    conn = stomp.Connection12([(broker.host, broker.port)])
    conn.set_listener("", Worker())
    conn.connect(wait=True)
    try:
        conn.subscribe(f"/queue/{qname}", id="1", ack="client-individual")
        conn.send(f"/queue/{qname}", "poison")
        conn.send(f"/queue/{qname}", "good")
        assert done.wait(5)
        c = broker.client()
        c.subscribe(f"/queue/DLQ.{qname}")
        assert_dead_lettered(c.message(), qname, "rejected", b"poison")
    finally:
        conn.disconnect()
    assert sorted(seen) == [("good", 1), ("poison", 1), ("poison", 2), ("poison", 3)]
    assert c.count_msgs(qname) == 0


# ==== found by a review of the first version =====================================

# ---- 1. a dead-lettered message whose old row is still under its queue ----------------------

@pytest.mark.both_backends
def test_reject_then_resubscribe_in_one_packet_does_not_deliver_it_again(broker, qname):
    """NACK requeue:false moves the message to the DLQ. A SUBSCRIBE to the old queue handled in
    the same reactor turn must not get it again (it is in the DLQ, no longer in the queue):
    MessageStore.move only queues the new row for the commit, so a read of the old queue in
    the same turn still sees the old row."""
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "job")                            # receipted: on disk
    a.subscribe(q, id="s1", ack="client-individual")
    m = a.message()
    a.send_raw(encode_frame("NACK", {"id": m["ack"], "requeue": "false"})
               + encode_frame("UNSUBSCRIBE", {"id": "s1"})
               + encode_frame("SUBSCRIBE", {"destination": q, "id": "s2",
                                            "ack": "client-individual", "receipt": "r"}))
    again = a.try_message(1.0)
    b = broker.client()
    assert again is None, f"a dead-lettered message was delivered again on {q}: {again!r}"
    assert b.count_msgs(f"DLQ.{qname}") == 1


@pytest.mark.both_backends
def test_reject_then_resubscribe_ack_does_not_delete_the_dlq_copy(broker, qname):
    """Same as above, from the consumer's side: ACKing the wrongly redelivered copy deletes the
    row, so the message the DLQ holds in memory is gone from the disk (lost after a restart)."""
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "job")
    a.subscribe(q, id="s1", ack="client-individual")
    m = a.message()
    a.send_raw(encode_frame("NACK", {"id": m["ack"], "requeue": "false"})
               + encode_frame("UNSUBSCRIBE", {"id": "s1"})
               + encode_frame("SUBSCRIBE", {"destination": q, "id": "s2",
                                            "ack": "client-individual", "receipt": "r"}))
    again = a.try_message(1.0)
    if again is not None:
        a.ack(again)
    broker.restart()
    b = broker.client()
    assert b.count_msgs(f"DLQ.{qname}") == 1, "the dead-lettered message was lost"


@pytest.mark.both_backends
def test_count_right_after_reject_in_one_packet(broker, qname):
    """count-msgs after a NACK requeue:false handled in the same turn: the queue holds 0
    (SPEC §8/§12: the DLQ counts it, its old queue does not)."""
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "job")
    a.subscribe(q, id="s1", ack="client-individual")
    m = a.message()
    a.send_raw(encode_frame("NACK", {"id": m["ack"], "requeue": "false"})
               + encode_frame("SEND", {"destination": f"/control/count-msgs/queue/{qname}",
                                       "receipt": "c"}))
    r = a.receipt("c")
    assert r["num-messages"] == "0", f"{q} still counts its dead-lettered message: {r!r}"


# ---- 2. storage outage (another process holds the sqlite write lock, SPEC §9) ---------------

class SqliteLock:
    """Hold sqlite's write lock from another process' point of view (the broker's own writes
    then fail after its 100 ms busy wait; its reads go on, WAL)."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None, timeout=5)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self):
        self.db.execute("ROLLBACK")
        self.db.close()


def test_dlq_copy_acked_during_outage_does_not_come_back(broker, qname):
    """A message rejected while the database cannot be written moves to the DLQ in memory;
    its consumer ACKs it. After storage is back, the message must be gone everywhere: it was
    ACKed. MessageStore.commit turns the failed move's BATCHED state into CACHED ("never
    written"), so the ACK deletes no row and the old row under the first queue survives."""
    q = f"/queue/{qname}"
    a = broker.client()
    a.send(q, "job")                            # on disk
    d = broker.client()
    d.subscribe(f"/queue/DLQ.{qname}", ack="client-individual")
    a.subscribe(q, ack="client-individual")
    m = a.message()
    lock = SqliteLock(broker.db)
    try:
        a.nack(m, receipt=False, requeue="false")
        dead = d.message()
        assert dead["dead-letter-reason"] == "rejected"
        d.ack(dead, receipt=False)
        time.sleep(0.5)
    finally:
        lock.release()
    time.sleep(1.0)                             # a flush succeeds: storage is back
    c = broker.client()
    assert (c.count_msgs(qname), c.count_msgs(f"DLQ.{qname}")) == (0, 0)
    c.subscribe(q)
    back = c.try_message(1.0)
    assert back is None, f"an ACKed message came back: {back!r}"


def test_delayed_message_due_during_outage_reaches_the_waiting_consumer(broker, qname):
    """A delayed message whose time comes while its row cannot be rewritten (take_due's write
    fails) must still reach the consumer waiting on its queue once storage is back.
    Broker.take_due: store.take_due keeps the messages in memory, but the following
    store.next_due() raises (unhealthy) and take_due returns before offering them; the queue
    has no backlog on disk, so nothing reads them again while it stays subscribed."""
    q = f"/queue/{qname}"
    a = broker.client()
    a.subscribe(q)
    a.send(q, "later", headers={"AMQ_SCHEDULED_DELAY": "1000"})
    time.sleep(0.5)
    lock = SqliteLock(broker.db)
    try:
        time.sleep(1.0)                         # due while the write lock is held
    finally:
        lock.release()
    msg = a.try_message(3.0)
    assert msg is not None and msg.body == b"later", \
        "the delayed message never reached its waiting subscriber"


# ---- 3. queue names near PostgreSQL's index limit ------------------------------------------

def long_name(length, seed=1):
    rng = random.Random(seed)                   # incompressible: no help from pglz
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(length))


@pytest.mark.both_backends
def test_long_destination_names_are_refused_and_the_longest_work_with_dlq_and_delays(broker,
                                                                                   qname):
    """A name over 1024 bytes is an ERROR (a database index holds the name: PostgreSQL's btree
    rows stop at 2704 bytes); one of 1020 bytes works with its DLQ ("DLQ." + NAME: 1024) and
    with a delay (stored under a name of its own), and storage stays healthy for everyone."""
    name = long_name(1020)
    a = broker.client()
    a.send_frame("SEND", {"destination": f"/queue/{name}12345", "receipt": "r"}, b"job")
    assert "longer than 1024 bytes" in a.expect_error()["message"]
    a = broker.client()
    a.send(f"/queue/{name}", "job")
    a.send(f"/queue/{name}", "later", headers={"AMQ_SCHEDULED_DELAY": "60000"})
    a.subscribe(f"/queue/{name}", ack="client-individual")
    a.nack(a.message(), requeue="false")
    time.sleep(0.5)                             # a flush
    b = broker.client()
    assert b.count_msgs(name) == 1
    b.subscribe(f"/queue/DLQ.{name}")
    assert b.message().body == b"job"
    b.send("/queue/other", "x")                 # a receipted SEND: storage is healthy


# ---- 4. purging expired rows ----------------------------------------------------------------

def rows_of(broker, queue):
    if broker.backend == "sqlite":
        db = sqlite3.connect(broker.db)
        try:
            return db.execute("SELECT count(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]
        finally:
            db.close()
    import psycopg2
    conn = psycopg2.connect(broker.conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM messages WHERE queue = %s", (queue,))
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.both_backends
def test_expired_rows_are_purged_although_a_stuck_queue_holds_many_expired(broker, qname):
    """SPEC §12: expired rows are deleted in bounded batches. A queue whose consumer is stuck
    holds more than one purge batch (500) of expired messages in its window; they have the
    earliest `expires`, so take_expired returns the same 500 every time, purge_expired skips
    them all (they are in the window) and never reaches the expired rows of other queues."""
    stuck, other = f"{qname}_stuck", f"{qname}_other"
    c = broker.client()
    c.subscribe(f"/queue/{stuck}", ack="client-individual", prefetch="1")
    a = broker.client()
    a.send(f"/queue/{stuck}", "held")
    c.message()                                 # never ACKed: the window stays
    for i in range(600):
        a.send(f"/queue/{stuck}", f"m{i}", receipt=i == 599, headers={"expiration": "100"})
    for i in range(5):
        a.send(f"/queue/{other}", f"o{i}", headers={"expiration": "300"})
    time.sleep(2.5)                             # a dozen purges
    assert a.count_msgs(other) == 0
    assert rows_of(broker, other) == 0, "expired rows of another queue are never deleted"


# ---- 5. memory: delayed messages that become ready together (Harness, fake clock) -----------

def test_many_delayed_messages_due_at_once_stay_out_of_memory(tmp_path):
    """SPEC §10/§12: millions of delayed messages cost no memory beyond disk, and a queue holds
    a bounded window in memory. When many delayed messages (older ids than the window's cursor)
    become ready together on an active queue whose consumer is busy, Broker.offer pushes every
    one into the queue's heap (a key before the cursor always joins the window, full or not)."""
    h = Harness(tmp_path)
    c = h.connect()
    h.feed(c, encode_frame("SUBSCRIBE", {"destination": "/queue/q", "id": "s", "prefetch": "1",
                                         "ack": "client-individual"}))
    count = ocamlmq.Queue.WINDOW * 3
    h.feed(c, b"".join(encode_frame("SEND", {"destination": "/queue/q",
                                             "AMQ_SCHEDULED_DELAY": "1000"}, b"d%d" % i)
                       for i in range(count)))
    h.feed(c, encode_frame("SEND", {"destination": "/queue/q"}, b"now1"))   # delivered
    h.feed(c, encode_frame("SEND", {"destination": "/queue/q"}, b"now2"))   # the window
    [first] = h.write(c)
    assert first.body == b"now1"
    h.timers.advance(1.5)                       # every delayed one is due; the consumer is busy
    queue = h.broker.queues["q"]
    held = len(queue.heap)
    h.broker.shutdown()
    assert held <= ocamlmq.Queue.WINDOW, f"{held} messages in one queue's memory window"
