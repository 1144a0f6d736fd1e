"""SPEC §12: delivery counts, dead-letter queues, expiry and delayed delivery.

Raw frames against the real broker on both backends (restarts, kill -9, migration of a database
written by the version before §12), and the timing rules on an in-process Broker with a fake
clock (test_timing.Harness) where waiting for real would make a test slow.
"""

import json
import sqlite3
import time

import pytest

import ocamlmq
from conftest import Broker
from test_timing import Harness, encode_frame

pytestmark = pytest.mark.both_backends


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


def test_topics_have_no_delivery_count_and_ignore_delays_and_expiry(broker, qname):
    t = f"/topic/{qname}"
    a = broker.client()
    a.subscribe(t)
    a.send(t, "now", headers={"AMQ_SCHEDULED_DELAY": "60000", "expires": "1",
                              "max-deliveries": "junk"})
    msg = a.message()
    assert msg.body == b"now" and "delivery-count" not in msg


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


def test_expired_rows_are_deleted_from_disk(broker, qname):
    a = broker.client()
    for i in range(1200):                       # more than one purge batch
        a.send(f"/queue/{qname}", f"m{i}", receipt=i == 1199, headers={"expiration": "200"})
    a.send(f"/queue/{qname}", "stays")
    time.sleep(1.5)
    broker.stop()
    assert stored_bodies(broker) == [b"stays"]


# ---- delayed delivery ------------------------------------------------------------------------

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
