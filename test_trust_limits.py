"""What ocamlmq.py may be trusted to hold, and how it behaves when the database or the file
descriptors run out (SPEC §2 `-max-memory`, §9 limits).

Every test starts the real broker (conftest.py) and watches it from outside: its RSS and CPU
(/proc/PID/status and /proc/PID/stat), its stderr, and round trips of honest clients.

- a topic message body is held once, however many subscribers it goes to (§9);
- `-max-memory`: past the broker-wide cap on what clients make the broker hold, the connection
  holding the most gets an ERROR mentioning memory and is closed; the others are served (§2, §9);
- storage trouble (another process holds sqlite's write lock): sqlite waits at most 100 ms per
  try, so topics, heart-beats and answers to receipted SENDs go on; unreceipted queue SENDs are
  cached up to `-maxmsgs`, then the broker stops reading their connections, without spinning;
  when the database is back every message is kept (§9);
- out of file descriptors: accepting pauses and is logged once per episode, no busy loop, and the
  open connections are served (§9).

On a broker without these bounds some of these tests would grow it by gigabytes or freeze it for
seconds: every wait, loop and thread here is bounded, so that a failing run ends in well under a
minute per test.  Measured figures are printed as `[figures]` lines (pytest -s).
"""

import os
import resource
import socket
import sqlite3
import threading
import time

from conftest import Client, Closed, encode_frame
from test_hostile import MiB, RssSampler, raise_nofile, report, rss_kib


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def cpu_seconds(pid):
    """CPU time (user + system) a process has used so far, in seconds (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()   # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime


class CpuMeter:
    """CPU a process uses from now on, as a fraction of one core."""

    def __init__(self, pid):
        self.pid = pid
        self.t0, self.c0 = time.monotonic(), cpu_seconds(pid)

    def cores(self):
        return (cpu_seconds(self.pid) - self.c0) / max(1e-6, time.monotonic() - self.t0)


class DatabaseLock(threading.Thread):
    """Another process's view of the broker's sqlite file: `BEGIN EXCLUSIVE`, held for `hold`
    seconds (or until `release()`), then rolled back. `before_release` runs just before."""

    def __init__(self, path, hold, before_release=None):
        super().__init__(daemon=True)
        self.path, self.hold, self.before_release = path, hold, before_release
        self.locked, self.released, self._let_go = (threading.Event(), threading.Event(),
                                                     threading.Event())
        self.locked_at = self.released_at = None
        self.error = None

    def run(self):
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10,
                             check_same_thread=False)
        try:
            db.execute("BEGIN EXCLUSIVE")
            self.locked_at = time.monotonic()
            self.locked.set()
            self._let_go.wait(self.hold)
            if self.before_release is not None:
                self.before_release()
            db.execute("ROLLBACK")
        except Exception as e:          # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            db.close()
            self.released_at = time.monotonic()
            self.released.set()

    def __enter__(self):
        self.start()
        assert self.locked.wait(15) and self.error is None, f"could not lock: {self.error!r}"
        return self

    def release(self):
        self._let_go.set()

    def __exit__(self, *exc):
        self.release()
        self.join(15)
        assert self.released.is_set(), "the test's sqlite lock was not released"


def round_trip(pub, sub, destination, tag, timeout=8.0):
    """Seconds for `tag` sent unreceipted by `pub` to reach `sub` (subscribed to destination)."""
    t0 = time.monotonic()
    pub.send(destination, tag, receipt=False)
    sub.wait_for(lambda f: f.command == "MESSAGE" and f.body == tag, timeout, f"MESSAGE {tag!r}")
    return time.monotonic() - t0


def answer(c, rid, timeout):
    """What answers receipt `rid` on c: ("RECEIPT"|"ERROR"|"closed"|"timeout", frame, seconds)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        try:
            f = c.recv(timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            return "timeout", None, time.monotonic() - t0
        except Closed:
            return "closed", None, time.monotonic() - t0
        if f.command == "ERROR" or (f.command == "RECEIPT" and f.get("receipt-id") == rid):
            return f.command, f, time.monotonic() - t0


def receipted_send(broker, destination, body, timeout=8.0, c=None):
    """A receipted SEND (on a fresh connection unless `c`); returns (answer, frame, seconds)
    as answer()."""
    if c is None:
        c = broker.raw_client(timeout=timeout)
        c.connect("1.2")
    rid = c.next_receipt_id()
    c.send_frame("SEND", {"destination": destination, "receipt": rid}, body)
    return answer(c, rid, timeout)


class BeatWatcher(threading.Thread):
    """Reads a connection's raw bytes and keeps the longest gap between two heart-beat EOLs
    (counting the time from the last one to `stop()`)."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.sock = client.sock
        self.max_gap = 0.0
        self.beats = 0
        self.closed = False
        self._halt = threading.Event()

    def run(self):
        self.sock.settimeout(0.1)
        last = time.monotonic()
        while not self._halt.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            now = time.monotonic()
            if b"\n" in data:
                self.beats += data.count(b"\n")
                self.max_gap = max(self.max_gap, now - last)
                last = now
        self.max_gap = max(self.max_gap, time.monotonic() - last)

    def stop(self):
        self._halt.set()
        self.join(5)
        return self.max_gap


def drain_nonblocking(sock, into):
    """Append what can be read now to `into`; True once the peer closed (EOF or reset)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            into += data
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def accept_lines(broker):
    return [line for line in broker.stderr().splitlines() if "accept" in line.lower()]


# ============================================================================================
# §9 A topic body is held once
# ============================================================================================

def test_a_topic_body_is_held_once_for_200_subscribers_that_never_read(start_broker, qname):
    """200 subscribers with a 4 KiB receive window never read; five 4 MiB topic messages go to
    them. Held once each, that is ~20 MiB; one copy per subscriber would be ~4 GB."""
    raise_nofile()
    b = start_broker()
    topic = f"/topic/{qname}"
    for _ in range(200):
        b.client(rcvbuf=4096).subscribe(topic)
    producer = b.client()
    bound_kib = 150 * 1024
    rss = RssSampler(b.proc.pid)
    body = os.urandom(4 * MiB)
    sent = 0
    for i in range(5):
        rid = producer.next_receipt_id()
        producer.send_frame("SEND", {"destination": topic, "receipt": rid}, body)
        producer.receipt(rid, timeout=30)
        sent += 1
        if rss.peak - rss.start > bound_kib:
            break                       # a copy per subscriber: stop before gigabytes
    deadline = time.monotonic() + 5     # copies made after the RECEIPT would show up here
    while time.monotonic() < deadline and rss.peak - rss.start <= bound_kib:
        time.sleep(0.1)
    peak = rss.stop()
    growth_mib = (peak - rss.start) // 1024
    report("topic body held once", subscribers=200, messages_sent=sent,
           rss_start_mib=rss.start // 1024, rss_peak_mib=peak // 1024, growth_mib=growth_mib)
    assert peak - rss.start <= bound_kib, \
        f"broker RSS grew by {growth_mib} MiB for {sent} x 4 MiB topic messages to 200 subscribers"
    honest = b.client()
    honest.subscribe(f"/queue/{qname}")
    assert round_trip(honest, honest, f"/queue/{qname}", b"honest", timeout=10) < 10
    assert honest.count_subscribers(topic) == 200


# ============================================================================================
# §2, §9 -max-memory
# ============================================================================================

def test_max_memory_closes_the_connections_holding_the_most_half_sent_frames(start_broker, qname):
    """12 connections each stop 5 MiB into an 8 MiB SEND body (60 MB held in all) under
    `-max-memory 40000000`: the ones holding the most get an ERROR mentioning memory and are
    closed; RSS stays near the cap; honest clients are served; stored messages are kept."""
    cap = 40_000_000
    b = start_broker("-max-memory", str(cap))
    writer = b.client()
    for i in range(3):
        writer.send(f"/queue/{qname}-stored", b"stored %d" % i)
    honest = b.client()
    honest.subscribe(f"/queue/{qname}")
    rss = RssSampler(b.proc.pid)
    half = 5 * MiB
    head = encode_frame("SEND", [("destination", f"/queue/{qname}-big")], b"",
                        content_length=str(8 * MiB))[:-1]          # the head, no body, no NUL
    chunk = os.urandom(half)
    conns = []
    for _ in range(12):
        c = b.raw_client(timeout=5)
        c.connect("1.2")
        c.sock.settimeout(3)          # bounded, if the broker stops reading this one
        try:
            c.sock.sendall(head + chunk)
        except OSError:               # closed (or not read) while we were sending
            pass
        conns.append(c)
    during = round_trip(honest, honest, f"/queue/{qname}", b"during", timeout=10)
    got = [bytearray() for _ in conns]
    closed = [False] * len(conns)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(closed):
        for i, c in enumerate(conns):
            if not closed[i]:
                closed[i] = drain_nonblocking(c.sock, got[i])
        if any(closed) and time.monotonic() > deadline - 3:
            break                     # closes have come: give the others 2 s more, no longer
        time.sleep(0.1)
    peak = rss.stop()
    errors = [bytes(g) for g in got if b"ERROR" in g]
    memory_errors = [e for e in errors if b"memory" in e.lower()]
    growth = (peak - rss.start) * 1024
    report("-max-memory vs half-sent frames", cap=cap, connections=len(conns),
           closed=sum(closed), errors=len(errors), memory_errors=len(memory_errors),
           still_open=len(conns) - sum(closed), rss_growth_mb=round(growth / 1e6, 1),
           honest_round_trip_s=round(during, 3))
    assert memory_errors, f"no connection got an ERROR mentioning memory; {sum(closed)} closed, " \
                          f"errors: {[e[:200] for e in errors]!r}"
    assert sum(closed) >= 1
    assert growth < 90_000_000, f"broker RSS grew by {growth / 1e6:.0f} MB under a 40 MB cap"
    assert round_trip(honest, honest, f"/queue/{qname}", b"after", timeout=10) < 10
    for c in conns:
        c.close()
    assert honest.count_msgs(f"{qname}-stored") == 3
    assert honest.count_msgs(f"{qname}-big") == 0


# ============================================================================================
# §9 Storage trouble: a locked sqlite file
# ============================================================================================

def test_a_locked_database_does_not_freeze_topics_heart_beats_or_receipts(broker, qname):
    """Another process holds sqlite's write lock for 5 s. Meanwhile topic round trips take under
    1.5 s, a 500 ms heart-beat never stops for over 1.5 s, and a receipted queue SEND is answered
    (ERROR or RECEIPT) within 1.5 s. Afterwards receipted SENDs work again and every message the
    broker took is kept."""
    queue = f"/queue/{qname}"
    writer = broker.client()
    for i in range(3):
        writer.send(queue, b"before %d" % i)
    sub, pub = broker.client(), broker.client()
    sub.subscribe(f"/topic/{qname}")
    beating = broker.raw_client()
    beating.connect("1.1", heart_beat="0,500")
    watcher = BeatWatcher(beating)
    watcher.start()
    cached, receipted = broker.client(), broker.client()
    answers = []
    trips = []
    hold = 5.0

    def receipted_during():
        time.sleep(1.0)
        answers.append(receipted_send(broker, queue, b"during, receipted", c=receipted))

    with DatabaseLock(broker.db, hold) as lock:
        for i in range(5):            # unreceipted: to the cache, kept for the next flush
            cached.send(queue, b"during %d" % i, receipt=False)
        t = threading.Thread(target=receipted_during, daemon=True)
        t.start()
        while time.monotonic() < lock.locked_at + hold - 0.3:
            trips.append(round_trip(pub, sub, f"/topic/{qname}", b"trip %d" % len(trips)))
            time.sleep(max(0.0, 0.5 - trips[-1]))
        t.join(10)
    max_gap = watcher.stop()
    during = answers[0] if answers else ("no answer", None, float("inf"))
    after, errors_after, t0 = None, 0, time.monotonic()
    while time.monotonic() - t0 < 5:
        after = receipted_send(broker, queue, b"after")
        if after[0] == "RECEIPT":
            break
        errors_after += 1
        time.sleep(0.2)
    report("locked database", hold_s=hold, topic_round_trips=len(trips),
           max_round_trip_s=round(max(trips), 3), max_heart_beat_gap_s=round(max_gap, 3),
           heart_beats=watcher.beats, receipted_during=during[0],
           receipted_during_s=round(during[2], 3), errors_after=errors_after,
           receipt_after_s=round(time.monotonic() - t0, 3))
    assert max(trips) < 1.5, f"a topic round trip took {max(trips):.2f}s while sqlite was locked"
    assert not watcher.closed and max_gap < 1.5, \
        f"heart-beats stopped for {max_gap:.2f}s while sqlite was locked"
    assert during[0] in ("RECEIPT", "ERROR") and during[2] < 1.5, \
        f"a receipted SEND during the lock got {during[0]} after {during[2]:.2f}s"
    assert after[0] == "RECEIPT", f"no RECEIPT 5 s after the lock was released: {after!r}"
    must_keep = 3 + 5 + 1 + (during[0] == "RECEIPT")
    maybe = (during[0] != "RECEIPT") + errors_after  # refused with an ERROR: kept or not
    count = writer.count_msgs(qname)
    assert must_keep <= count <= must_keep + maybe, (count, must_keep, maybe)
    broker.restart()                  # and it is on disk
    assert must_keep <= broker.client().count_msgs(qname) <= must_keep + maybe


def test_a_storage_outage_bounds_the_cache_pauses_producers_and_loses_nothing(start_broker, qname):
    """`-maxmsgs 2000`; the write lock is held for 6 s while a producer pushes 60,000 unreceipted
    1 KiB SENDs. The broker caches what it may and then stops reading the producer: the producer
    cannot push everything, RSS stays bounded, the broker idles (CPU < 0.5 core) and topics work.
    Afterwards the producer finishes and all 60,000 messages are stored."""
    b = start_broker("-maxmsgs", "2000")
    n, hold = 60_000, 6.0
    queue = f"/queue/{qname}"
    body = b"m" * 1024
    data = b"".join(encode_frame("SEND", [("destination", queue), ("x-seq", str(i))], body)
                    for i in range(n))
    sub, pub, observer = b.client(), b.client(), b.client()
    sub.subscribe(f"/topic/{qname}")
    producer = b.client()
    producer.sock.settimeout(0.5)
    progress = {"accepted": 0, "error": None, "done_at": None}

    def produce():
        view, off, give_up = memoryview(data), 0, time.monotonic() + 90
        while off < len(data) and time.monotonic() < give_up:
            try:
                off += producer.sock.send(view[off:off + 256 * 1024])
            except socket.timeout:
                pass
            except OSError as e:
                progress["error"] = repr(e)
                break
            progress["accepted"] = off
        progress["done_at"] = time.monotonic()

    at_release = {}
    rss = RssSampler(b.proc.pid)

    def snapshot():
        at_release.update(accepted=progress["accepted"], peak=rss.peak, cpu=cpu.cores())

    trips = []
    with DatabaseLock(b.db, hold, before_release=snapshot) as lock:
        cpu = CpuMeter(b.proc.pid)
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        while time.monotonic() < lock.locked_at + hold - 0.5:
            time.sleep(0.5)
            trips.append(round_trip(pub, sub, f"/topic/{qname}", b"trip %d" % len(trips)))
    released = lock.released_at
    thread.join(max(1.0, released + 60 - time.monotonic()))
    count, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        count = observer.count_msgs(qname)
        if count >= n:
            break
        time.sleep(0.5)
    growth_mib = (at_release["peak"] - rss.start) / 1024
    rss.stop()
    report("storage outage", hold_s=hold, frames=n, bytes_total=len(data),
           accepted_during_outage=at_release["accepted"], rss_growth_mib=round(growth_mib, 1),
           cpu_cores_during_outage=round(at_release["cpu"], 3),
           max_topic_round_trip_s=round(max(trips), 3), producer_error=progress["error"],
           producer_done_after_release_s=None if progress["done_at"] is None
           else round(progress["done_at"] - released, 2), stored=count)
    assert max(trips) < 1.5, f"a topic round trip took {max(trips):.2f}s during the outage"
    assert at_release["accepted"] < len(data) // 2, \
        f"the broker took {at_release['accepted']} of {len(data)} bytes while it could not store"
    assert growth_mib < 64 + 40, f"broker RSS grew by {growth_mib:.0f} MiB during the outage"
    assert at_release["cpu"] < 0.5, f"broker used {at_release['cpu']:.2f} cores during the outage"
    assert progress["error"] is None and progress["accepted"] == len(data), progress
    assert count == n, f"{count} of {n} messages stored 60 s after the outage"


# ============================================================================================
# §9 Out of file descriptors
# ============================================================================================

def test_out_of_file_descriptors_the_broker_pauses_accepting_and_logs_once(start_broker, qname):
    """The broker's RLIMIT_NOFILE is lowered to 64 (soft and hard) and 200 connections flood
    in: no busy loop (CPU < 0.5 core over 3 s), a handful of log lines about accept, the open
    connection is served; once the flood is gone a new client connects and is served."""
    raise_nofile()
    b = start_broker()
    honest = b.client()
    honest.subscribe(f"/queue/{qname}")
    resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    fds = len(os.listdir(f"/proc/{b.proc.pid}/fd"))
    lines_before = len(accept_lines(b))
    flood, refused = [], 0
    for _ in range(200):
        try:
            flood.append(socket.create_connection((b.host, b.port), timeout=2))
        except OSError:
            refused += 1
    time.sleep(0.2)
    cpu = CpuMeter(b.proc.pid)
    trip = round_trip(honest, honest, f"/queue/{qname}", b"during the flood", timeout=10)
    time.sleep(max(0.0, 3.0 - (time.monotonic() - cpu.t0)))
    cores = cpu.cores()
    lines = len(accept_lines(b)) - lines_before
    for s in flood:
        s.close()
    t0, served, last_error = time.monotonic(), False, None
    while not served and time.monotonic() - t0 < 8:
        try:
            c = Client(b.port, timeout=3, host=b.host)
            b.clients.append(c)
            c.connect("1.2")
            c.subscribe(f"/queue/{qname}-new")
            served = round_trip(c, c, f"/queue/{qname}-new", b"after the flood", 3) < 3
        except (OSError, AssertionError, TimeoutError, Closed) as e:
            last_error = e
            time.sleep(0.2)
    report("out of file descriptors", nofile=64, broker_fds_before=fds, flood=len(flood),
           refused=refused, cpu_cores=round(cores, 3), accept_log_lines=lines,
           honest_round_trip_s=round(trip, 3), new_client_after_s=round(time.monotonic() - t0, 2))
    assert cores < 0.5, f"broker used {cores:.2f} cores while out of file descriptors"
    assert lines <= 5, f"{lines} log lines about accept in 3 s: {accept_lines(b)[-3:]!r}"
    assert served, f"no new client served 8 s after the flood closed: {last_error!r}"
    assert honest.count_msgs(qname) == 0
    assert rss_kib(b.proc.pid) > 0 and b.alive()
