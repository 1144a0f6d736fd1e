"""In-process Broker tests: a fake clock, fake timers, a real sqlite store.

What crosses the wire is tested on the real broker process elsewhere; here the deadlines that
would make black-box tests slow or flaky are driven by hand (SPEC §7 ack-timeouts, §9 the
incomplete-frame deadline, storage backpressure, and what a fetch writes). The test plays the
reactor: it feeds bytes to `data_received`, ends turns, and says how much of an outbox the
"socket" took.
"""

import heapq
import sqlite3

import pytest

import ocamlmq
import storage_sqlite
from conftest import encode_frame


class FakeTimers:
    """A clock that moves only when told, and the timers that run as it moves."""

    def __init__(self):
        self.now = 1000.0
        self.heap = []
        self.sequence = 0

    def clock(self):
        return self.now

    def call_later(self, delay, callback, *args):
        timer = ocamlmq.Timer(self.now + delay, callback, args)
        self.sequence += 1
        heapq.heappush(self.heap, (timer.deadline, self.sequence, timer))
        return timer

    def advance(self, seconds):
        end = self.now + seconds
        while self.heap and self.heap[0][0] <= end:
            deadline, _, timer = heapq.heappop(self.heap)
            if not timer.cancelled:
                self.now = max(self.now, deadline)
                timer.fired = True
                timer.callback(*timer.args)
        self.now = end


class Harness:
    """A Broker on a real sqlite store, and helpers that play the reactor's part."""

    def __init__(self, tmp_path, **settings):
        self.timers = FakeTimers()
        self.db = str(tmp_path / "broker.db")
        store = ocamlmq.MessageStore(storage_sqlite.SqliteBackend(self.db),
                                     storage_sqlite.StorageError)
        settings.setdefault("wall_clock", self.timers.clock)
        self.broker = ocamlmq.Broker(store, self.timers.call_later, clock=self.timers.clock,
                                     **settings)

    def connect(self, version="1.2", **headers):
        client = self.broker.connection_made("test")
        self.feed(client, encode_frame("CONNECT", {"accept-version": version, **headers}))
        assert [f.command for f in self.write(client)] == ["CONNECTED"]
        return client

    def feed(self, client, data):
        """Bytes arrive from the client, then the turn ends (commit)."""
        self.broker.data_received(client, data)
        self.broker.end_of_turn()

    def write(self, client, limit=None):
        """The socket takes up to `limit` bytes of the outbox (all by default); returns the
        frames fully taken."""
        data = b"".join(b"".join(bytes(buf) for buf in frame) for frame in client.outbox)
        data = data[client.head_sent:]
        taken = len(data) if limit is None else min(limit, len(data))
        if taken:
            self.broker.output_written(client, taken)
        parser = ocamlmq.FrameParser()
        parser.feed(data[:taken])
        frames = []
        while (frame := parser.next_frame()) is not None:
            frames.append(frame)
        return frames

    @staticmethod
    def queued(client):
        """The frames waiting in the outbox, not yet written."""
        parser = ocamlmq.FrameParser()
        parser.feed(b"".join(b"".join(bytes(buf) for buf in frame) for frame in client.outbox))
        frames = []
        while (frame := parser.next_frame()) is not None:
            frames.append(frame)
        return frames


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.broker.shutdown()


# --- §9: an ack-timeout counts from the write -----------------------------------------------

def test_an_ack_timeout_counts_from_when_the_message_is_written_not_queued(harness):
    """A MESSAGE stuck behind a full socket is not taken back by its ack-timeout: the timer
    starts when the frame is written. Once written, it runs its full length."""
    consumer = harness.connect()
    harness.feed(consumer, encode_frame("SUBSCRIBE", {"destination": "/queue/q", "id": "s",
                                                      "ack": "client-individual"}))
    producer = harness.connect()
    harness.feed(producer, encode_frame("SEND", {"destination": "/queue/q", "ack-timeout": "1"},
                                        b"job"))
    assert [f.command for f in harness.queued(consumer)] == ["MESSAGE"]
    harness.timers.advance(5.0)               # the consumer's socket takes nothing
    queued = harness.queued(consumer)
    assert len(queued) == 1 and "redelivered" not in queued[0].headers, queued
    harness.write(consumer, limit=10)         # a part of the frame is not the frame
    harness.timers.advance(5.0)
    assert len(harness.queued(consumer)) == 1
    [message] = harness.write(consumer)
    assert message.body == b"job"
    harness.timers.advance(0.9)
    assert harness.queued(consumer) == []
    harness.timers.advance(0.2)               # 1.1 s after the write: taken back, sent again
    [again] = harness.queued(consumer)
    assert again.headers["redelivered"] == "true"
    assert again.headers["message-id"] == message.headers["message-id"]


def test_an_auto_ack_counts_only_once_the_message_is_written(harness):
    """In auto mode a message counts as ACKed once its own frame is written: when the
    connection dies, the written one is done and the unwritten one goes back to the queue."""
    consumer = harness.connect()
    harness.feed(consumer, encode_frame("SUBSCRIBE", {"destination": "/queue/q", "id": "s"}))
    producer = harness.connect()
    for body in (b"one", b"two"):
        harness.feed(producer, encode_frame("SEND", {"destination": "/queue/q"}, body))
    [first] = harness.write(consumer, limit=len(b"".join(consumer.outbox[0])))
    assert first.body == b"one"
    harness.broker.connection_lost(consumer)
    other = harness.connect()
    harness.feed(other, encode_frame("SUBSCRIBE", {"destination": "/queue/q", "id": "s"}))
    assert [f.body for f in harness.write(other)] == [b"two"]


# --- §9: the incomplete-frame deadline -----------------------------------------------------

def test_an_incomplete_frame_without_a_new_byte_for_30_s_closes_its_connection(harness):
    client = harness.connect()
    harness.feed(client, b"SEND\ndestination:/queue/q\ncontent-length:100\n\n" + b"x" * 10)
    harness.timers.advance(29.0)
    assert not client.closing
    harness.feed(client, b"y")                # a new byte starts the 30 s again
    harness.timers.advance(29.0)
    assert not client.closing
    harness.timers.advance(1.5)
    assert client.closing
    [error] = harness.write(client)
    assert error.command == "ERROR" and "incomplete frame" in error.headers["message"]
    assert client.input_held == 0 and harness.broker.held == 0


def test_a_connection_between_frames_has_no_incomplete_frame_deadline(harness):
    client = harness.connect()
    harness.feed(client, encode_frame("SEND", {"destination": "/topic/t"}, b"done"))
    harness.timers.advance(120.0)
    assert not client.closing


# --- §9: storage trouble: bounded cache, backpressure, retries -----------------------------

class Lock:
    """An exclusive lock on the broker's database, held by another connection."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self):
        self.db.execute("ROLLBACK")
        self.db.close()


def test_a_full_cache_in_an_outage_holds_producers_back_and_keeps_their_heart_beats(tmp_path):
    """Storage locked: unreceipted SENDs fill the cache to -maxmsgs, then the producer's
    frames wait unread (not closed for a missing heart-beat meanwhile), while consumers and
    topics go on; when a flush succeeds the waiting frames are handled, nothing lost."""
    h = Harness(tmp_path, maxmsgs=10, flush_period=1.0)
    lock = Lock(h.db)
    producer = h.connect(**{"heart-beat": "1000,0"})
    listener = h.connect()
    h.feed(listener, encode_frame("SUBSCRIBE", {"destination": "/topic/news", "id": "n"}))
    def sends(first):
        return b"".join(encode_frame("SEND", {"destination": "/queue/jobs"}, b"job %d" % i)
                        for i in range(first, first + 15))
    h.feed(producer, sends(0))                # the flush past -maxmsgs fails: outage
    h.timers.advance(1.0)                     # the periodic retry fails too
    assert not h.broker.store.healthy and h.broker.producers_held
    h.feed(producer, sends(15))
    assert producer.reading_paused and producer.input_held > 0
    held_back = producer.input_held
    assert h.broker.store.unsaved_count == 15
    h.timers.advance(5.0)                     # 5 retries, each at most 100 ms of sqlite's wait
    assert not producer.closing, "closed for heart-beats it could not send"
    h.feed(listener, encode_frame("SEND", {"destination": "/topic/news"}, b"still here"))
    assert [f.body for f in h.write(listener)] == [b"still here"]
    lock.release()
    h.timers.advance(1.0)                     # the next retry succeeds
    assert h.broker.store.healthy and not h.broker.producers_held
    assert not producer.reading_paused and producer.input_held < held_back
    counter = h.connect()
    h.feed(counter, encode_frame("SEND", {"destination": "/control/count-msgs/queue/jobs",
                                          "receipt": "r"}))
    [receipt] = h.write(counter)
    assert receipt.headers["num-messages"] == "30"
    h.broker.shutdown()


@pytest.mark.parametrize("first_to_fail", ["a delayed message's timer", "a receipted SEND"])
def test_an_outage_is_logged_once_whichever_call_meets_it_first(tmp_path, caplog, first_to_fail):
    """One ERROR line when storage fails, one line when it is back, however many calls fail
    between. The timers (delayed messages, expiry) used to mark the store unhealthy without a
    word, and then the failing flushes stayed silent too: the outage was never logged."""
    h = Harness(tmp_path, flush_period=1.0)
    client = h.connect()
    if first_to_fail == "a receipted SEND":
        lock = Lock(h.db)
    else:
        h.feed(client, encode_frame("SEND", {"destination": "/queue/later",
                                             "AMQ_SCHEDULED_DELAY": "5000"}, b"later"))
        h.timers.advance(1.0)                 # flushed: the delayed message is on disk
        lock = Lock(h.db)
        h.timers.advance(4.5)                 # due now: its rewrite fails
    for i in range(3):
        h.feed(client, encode_frame("SEND", {"destination": "/queue/q", "receipt": str(i)}))
        h.timers.advance(1.0)                 # and a flush retries
    assert not h.broker.store.healthy
    lock.release()
    h.timers.advance(1.0)
    assert h.broker.store.healthy
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ocamlmq"
             and "storage" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0][0] == "ERROR" and "locked" in lines[0][1], lines
    assert lines[1] == ("WARNING", "storage is back"), lines
    h.broker.shutdown()


def test_a_receipted_commit_in_an_outage_applies_nothing(tmp_path):
    """COMMIT is all or nothing: refused whole while storage cannot be written."""
    h = Harness(tmp_path)
    client = h.connect()
    h.feed(client, encode_frame("BEGIN", {"transaction": "t"}))
    h.feed(client, encode_frame("SEND", {"destination": "/queue/q", "transaction": "t"}, b"a"))
    lock = Lock(h.db)
    other = h.connect()
    h.feed(other, encode_frame("SEND", {"destination": "/queue/other", "receipt": "x"}, b"x"))
    assert not h.broker.store.healthy and h.write(other)[-1].command == "ERROR"   # outage
    h.feed(client, encode_frame("COMMIT", {"transaction": "t", "receipt": "c"}))
    frames = h.write(client)
    assert frames[-1].command == "ERROR" and "nothing applied" in frames[-1].headers["message"]
    lock.release()
    h.timers.advance(1.0)
    counter = h.connect()
    h.feed(counter, encode_frame("SEND", {"destination": "/control/count-msgs/queue/q",
                                          "receipt": "r"}))
    assert h.write(counter)[0].headers["num-messages"] == "0"
    h.broker.shutdown()


def test_a_fetch_writes_only_the_queue_it_reads(harness):
    """Subscribing to a queue reads its backlog; only that queue's cached messages are written
    into the open transaction for the read, not the whole cache."""
    producer = harness.connect()
    for queue in ("a", "b", "c"):
        harness.feed(producer, encode_frame("SEND", {"destination": f"/queue/{queue}"}, b"m"))
    consumer = harness.connect()
    harness.feed(consumer, encode_frame("SUBSCRIBE", {"destination": "/queue/a", "id": "s"}))
    assert [f.body for f in harness.write(consumer)] == [b"m"]
    assert sorted(harness.broker.store.unsaved) == ["b", "c"]


# --- what clients make the broker hold is counted in full ----------------------------------

def big_headers(count=20, size=60_000):
    return {f"x-pad-{i}": "p" * size for i in range(count)}


def test_an_open_transaction_counts_its_headers_too(tmp_path):
    """-max-pending bounds what open transactions hold, headers included, not bodies only."""
    h = Harness(tmp_path, max_pending=1_000_000)
    client = h.connect()
    h.feed(client, encode_frame("BEGIN", {"transaction": "t"}))
    h.feed(client, encode_frame("SEND", {"destination": "/queue/q", "transaction": "t",
                                         **big_headers()}, b"x"))
    [error] = h.write(client)
    assert error.command == "ERROR" and "transaction" in error.headers["message"]
    h.broker.connection_lost(client)
    assert h.broker.held == 0
    h.broker.shutdown()


def test_in_an_outage_no_new_connection_or_transaction_gets_past_the_full_cache(tmp_path):
    """Backpressure holds back every frame that would store a message, whoever sends it:
    a queue SEND from a connection new to it, and a COMMIT, wait for storage."""
    h = Harness(tmp_path, maxmsgs=5, flush_period=1.0)
    lock = Lock(h.db)
    first = h.connect()
    h.feed(first, b"".join(encode_frame("SEND", {"destination": "/queue/q"}, b"m%d" % i)
                           for i in range(8)))
    h.timers.advance(1.0)
    assert h.broker.producers_held
    cached = h.broker.store.unsaved_count
    late = [h.connect() for _ in range(5)]
    for client in late:
        h.feed(client, encode_frame("SEND", {"destination": "/queue/q"}, b"late"))
    tx = h.connect()
    h.feed(tx, encode_frame("BEGIN", {"transaction": "t"}) + b"".join(
        encode_frame("SEND", {"destination": "/queue/q", "transaction": "t"}, b"tx")
        for _ in range(10)) + encode_frame("COMMIT", {"transaction": "t", "receipt": "c"}))
    assert h.broker.store.unsaved_count == cached
    assert all(c.reading_paused for c in late + [tx])
    counter = h.connect()
    h.feed(counter, encode_frame("SEND", {"destination": "/control/count-msgs/queue/q",
                                          "receipt": "n"}))
    assert h.write(counter)[-1].command == "ERROR"    # at once: no count without storage
    lock.release()
    h.timers.advance(1.0)
    assert [f.command for f in h.write(tx)][-1] == "RECEIPT"
    counter = h.connect()
    h.feed(counter, encode_frame("SEND", {"destination": "/control/count-msgs/queue/q",
                                          "receipt": "n"}))
    assert h.write(counter)[0].headers["num-messages"] == str(8 + 5 + 10)
    h.broker.shutdown()


def test_what_clients_hold_is_uncounted_when_they_go(harness):
    """Input, output (a shared topic body too), a transport's buffer and transactions: back
    to zero."""
    subscribers = [harness.connect() for _ in range(3)]
    for i, c in enumerate(subscribers):
        harness.feed(c, encode_frame("SUBSCRIBE", {"destination": "/topic/t", "id": f"s{i}"}))
    producer = harness.connect()
    harness.feed(producer, encode_frame("BEGIN", {"transaction": "t"}))
    harness.feed(producer, encode_frame("SEND", {"destination": "/topic/t"}, b"x" * 100_000))
    harness.feed(producer, b"SEND\ndestination:/queue/q\ncontent-length:1000\n\nhalf")
    assert harness.broker.held > 100_000 and len(harness.broker.shared) == 1
    harness.write(subscribers[0], limit=50_000)
    harness.broker.transport_holds(subscribers[1], 70_000)    # TLS ciphertext not yet sent
    assert max(harness.broker.clients, key=ocamlmq.Client.holding) is subscribers[1]
    for c in subscribers + [producer]:
        harness.broker.connection_lost(c)
    assert harness.broker.held == 0 and harness.broker.shared == {}


def test_sqlite_pages_stop_at_the_row_that_brings_the_bodies_to_max_bytes(tmp_path):
    """The backend's fetch and due read a bounded page, however big the bodies (with 1 MB
    bodies and 500 rows a page, a queue's backlog was read 500 MB at a time)."""
    backend = storage_sqlite.SqliteBackend(str(tmp_path / "pages.db"))
    mib = 1 << 20
    backend.insert([(i, "q", 0, None, "[]", bytes(300_000), 0, None, None) for i in range(1, 11)]
                   + [(11, "other", 0, None, "[]", bytes(3 * mib), 0, 5.0, None),
                      (12, "other", 0, None, "[]", b"x", 0, 6.0, None)])
    backend.commit()
    first = (-(1 << 63), 0)
    assert [r[0] for r in backend.fetch("q", first, 100, mib)] == [1, 2, 3, 4]   # 1.2 MB
    assert [r[0] for r in backend.fetch("q", first, 2, mib)] == [1, 2]
    assert [r[0] for r in backend.fetch("q", (0, 4), 100, mib)] == [5, 6, 7, 8]
    assert [r[0] for r in backend.due("expires", (0, 0), 10, 100, mib)] == [11]       # one, all the same
    assert [r[0] for r in backend.due("expires", (0, 0), 10, 100, 4 * mib)] == [11, 12]
    backend.close()


def test_a_backlog_of_big_messages_is_read_a_bounded_page_at_a_time(tmp_path):
    """A queue's stored backlog comes back in pages of PAGE_BYTES (or PAGE_ROWS), in order,
    every message once."""
    h = Harness(tmp_path, maxmsgs=1)
    producer = h.connect()
    body = bytes(1_000_000)
    for i in range(30):
        h.feed(producer, encode_frame("SEND", {"destination": "/queue/big", "n": str(i)}, body))
    h.broker.flush()
    store = h.broker.store
    reads = []
    fetch = store.fetch
    store.fetch = lambda queue, after: reads.append(fetch(queue, after)) or reads[-1]
    consumer = h.connect()
    h.feed(consumer, encode_frame("SUBSCRIBE", {"id": "1", "destination": "/queue/big", "ack": "auto"}))
    got = []
    for _ in range(100):
        frames = h.write(consumer)
        if not frames:
            break
        got += [int(f.headers["n"]) for f in frames]
    assert got == list(range(30))
    assert [len(page) for page in reads] == [9, 9, 9, 3]          # 9 MB >= 8 MiB


def test_sqlite_due_pages_on_the_column_and_id(tmp_path):
    """Rows that share a `ready_at` or `expires` are paged by (column, id): a page that stops
    inside such a run goes on after the last row it read, and none is skipped."""
    backend = storage_sqlite.SqliteBackend(str(tmp_path / "ties.db"))
    backend.insert([(i, "q", 0, None, "[]", bytes(300_000), 0, 5.0 if i < 15 else 6.0, None)
                    for i in range(1, 21)])
    seen, key = [], (-float("inf"), 0)
    while page := backend.due("expires", key, 10, 100, 1 << 20):
        assert len(page) <= 4
        seen += [row[0] for row in page]
        key = (page[-1][7], page[-1][0])
    assert seen == list(range(1, 21))
    backend.close()


def test_expired_big_messages_that_share_an_expires_are_purged_in_one_pass(tmp_path):
    """SPEC §12: expired rows are deleted in bounded batches, paging on. 30 messages of 1 MB
    with one `expires` fill 4 pages; the purge goes on after each page's last message (paging
    on `expires` alone, it stopped after the first page until the next flush period)."""
    h = Harness(tmp_path, maxmsgs=1, flush_period=1000)
    c = h.connect()
    expires = str(int((h.timers.now + 10) * 1000))
    for _ in range(30):
        h.feed(c, encode_frame("SEND", {"destination": "/queue/old", "expires": expires},
                               bytes(1_000_000)))
    h.broker.flush()
    assert h.broker.store.backend.count() == 30
    h.timers.now += 20                          # expired; no periodic purge runs meanwhile
    h.broker.purge_expired()
    h.timers.advance(0)                         # its next pages, one per turn
    h.broker.flush()
    assert h.broker.store.backend.count() == 0
