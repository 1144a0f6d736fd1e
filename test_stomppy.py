"""Interop: the real stomp.py client (8.x) against the real broker, for STOMP 1.0, 1.1 and 1.2.

Each test runs once per protocol version with stomp.Connection10/11/12 and a listener that
collects every frame, and checks the broker's state with the raw client from conftest.py.
"""

import threading
import time

import pytest
import stomp

from conftest import HOST

VERSIONS = ["1.0", "1.1", "1.2"]
CLASSES = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}


class Collector(stomp.ConnectionListener):
    """Remembers every frame stomp.py hands us; wait_for() blocks (bounded) until one matches."""

    def __init__(self):
        self.cond = threading.Condition()
        self.frames = []          # (kind, frame)
        self.heartbeats = 0
        self.disconnected = False

    def _add(self, kind, frame):
        with self.cond:
            self.frames.append((kind, frame))
            self.cond.notify_all()

    def on_connected(self, frame):
        self._add("CONNECTED", frame)

    def on_message(self, frame):
        self._add("MESSAGE", frame)

    def on_receipt(self, frame):
        self._add("RECEIPT", frame)

    def on_error(self, frame):
        self._add("ERROR", frame)

    def on_heartbeat(self):
        with self.cond:
            self.heartbeats += 1

    def on_disconnected(self):
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    def wait_for(self, kind, pred=lambda f: True, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for k, f in self.frames:
                    if k == kind and pred(f):
                        self.frames.remove((k, f))
                        return f
                errors = [f for k, f in self.frames if k == "ERROR"]
                assert not errors, f"ERROR while waiting for {kind}: {errors[0].headers} {errors[0].body!r}"
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {kind} within {timeout}s; have {[(k, f.headers) for k, f in self.frames]}"
                self.cond.wait(remaining)

    def receipt(self, rid, timeout=5.0):
        return self.wait_for("RECEIPT", lambda f: f.headers.get("receipt-id") == rid, timeout)

    def message(self, timeout=5.0):
        return self.wait_for("MESSAGE", timeout=timeout)

    def expect_no_message(self, quiet=0.5):
        time.sleep(quiet)
        with self.cond:
            msgs = [f for k, f in self.frames if k == "MESSAGE"]
        assert not msgs, f"unexpected messages: {[(f.headers, f.body) for f in msgs]}"


@pytest.fixture
def stomppy(broker):
    """Factory: stomppy(version, heartbeats=(cx, cy)) -> (connection, collector), connected."""
    conns = []

    def make(version, heartbeats=None, **connect_kw):
        kw = {"reconnect_attempts_max": 1, "timeout": 5}
        if heartbeats is not None:
            kw["heartbeats"] = heartbeats
        conn = CLASSES[version]([(HOST, broker.port)], **kw)
        listener = Collector()
        conn.set_listener("collector", listener)
        conns.append(conn)
        conn.connect(wait=False, **connect_kw)      # wait=True would wait without a bound
        listener.connected = listener.wait_for("CONNECTED", timeout=5)
        return conn, listener

    yield make
    for conn in conns:
        try:
            conn.disconnect()
        except Exception:
            pass


def ack(conn, version, frame):
    """ACK the way each stomp.py protocol class spells it."""
    h = frame.headers
    if version == "1.0":
        conn.ack(h["message-id"], receipt="ack-r")
    elif version == "1.1":
        conn.ack(h["message-id"], h["subscription"], receipt="ack-r")
    else:
        conn.ack(h["ack"], receipt="ack-r")


def nack(conn, version, frame):
    h = frame.headers
    if version == "1.1":
        conn.nack(h["message-id"], h["subscription"], receipt="nack-r")
    else:
        conn.nack(h["ack"], receipt="nack-r")


@pytest.mark.parametrize("version", VERSIONS)
def test_stomppy_connects_with_the_negotiated_version(stomppy, version):
    conn, listener = stomppy(version)
    assert conn.is_connected()
    assert listener.connected.headers["version"] == version
    assert listener.connected.headers.get("session")


@pytest.mark.parametrize("version", VERSIONS)
def test_stomppy_send_subscribe_receive_with_receipts(stomppy, qname, version):
    conn, listener = stomppy(version)
    conn.subscribe(f"/queue/{qname}", id="s1", ack="auto", receipt="sub-r")
    listener.receipt("sub-r")
    conn.send(f"/queue/{qname}", "hello from stomp.py", content_type="text/plain",
              headers={"x-custom": "42", "correlation-id": "c-1"}, receipt="send-r")
    listener.receipt("send-r")
    m = listener.message()
    assert m.body == "hello from stomp.py"
    assert m.headers["destination"] == f"/queue/{qname}"
    assert m.headers["x-custom"] == "42"
    assert m.headers["correlation-id"] == "c-1"
    assert m.headers["content-type"] == "text/plain"
    assert m.headers.get("message-id")
    conn.unsubscribe(id="s1", receipt="unsub-r")
    listener.receipt("unsub-r")


@pytest.mark.parametrize("version", VERSIONS)
def test_stomppy_topic_broadcast(stomppy, qname, version):
    (a, la), (b, lb) = stomppy(version), stomppy(version)
    a.subscribe(f"/topic/{qname}", id="ta", receipt="ra")
    b.subscribe(f"/topic/{qname}", id="tb", receipt="rb")
    la.receipt("ra")
    lb.receipt("rb")
    a.send(f"/topic/{qname}", "news")
    assert la.message().body == "news"
    assert lb.message().body == "news"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", ["client", "client-individual"])
def test_stomppy_ack(stomppy, broker, qname, version, mode):
    conn, listener = stomppy(version)
    conn.subscribe(f"/queue/{qname}", id="s1", ack=mode, receipt="sub-r")
    listener.receipt("sub-r")
    conn.send(f"/queue/{qname}", "please ack", receipt="send-r")
    listener.receipt("send-r")
    m = listener.message()
    raw = broker.client()
    assert raw.count_msgs(qname) == 1
    ack(conn, version, m)
    listener.receipt("ack-r")
    assert raw.count_msgs(qname) == 0


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_stomppy_nack_redelivers(stomppy, qname, version):
    conn, listener = stomppy(version)
    conn.subscribe(f"/queue/{qname}", id="s1", ack="client-individual", receipt="sub-r")
    listener.receipt("sub-r")
    conn.send(f"/queue/{qname}", "try again", receipt="send-r")
    m1 = listener.message()
    nack(conn, version, m1)
    listener.receipt("nack-r")
    m2 = listener.message()
    assert m2.headers["message-id"] == m1.headers["message-id"]
    assert m2.headers.get("redelivered") == "true"
    assert m2.body == "try again"


@pytest.mark.parametrize("version", VERSIONS)
def test_stomppy_transaction_commit_and_abort(stomppy, qname, version):
    conn, listener = stomppy(version)
    conn.subscribe(f"/queue/{qname}", id="s1", receipt="sub-r")
    listener.receipt("sub-r")
    tx = conn.begin()
    conn.send(f"/queue/{qname}", "committed", transaction=tx, receipt="in-tx-r")
    listener.receipt("in-tx-r")
    listener.expect_no_message()
    conn.commit(tx, receipt="commit-r")
    listener.receipt("commit-r")
    assert listener.message().body == "committed"

    tx2 = conn.begin()
    conn.send(f"/queue/{qname}", "aborted", transaction=tx2)
    conn.abort(tx2, receipt="abort-r")
    listener.receipt("abort-r")
    listener.expect_no_message()


@pytest.mark.parametrize("version", VERSIONS)
def test_stomppy_transactional_ack(stomppy, broker, qname, version):
    conn, listener = stomppy(version)
    conn.subscribe(f"/queue/{qname}", id="s1", ack="client-individual", receipt="sub-r")
    listener.receipt("sub-r")
    conn.send(f"/queue/{qname}", "x", receipt="send-r")
    m = listener.message()
    raw = broker.client()
    tx = conn.begin()
    h = m.headers
    if version == "1.0":
        conn.ack(h["message-id"], transaction=tx, receipt="ack-r")
    elif version == "1.1":
        conn.ack(h["message-id"], h["subscription"], transaction=tx, receipt="ack-r")
    else:
        conn.ack(h["ack"], transaction=tx, receipt="ack-r")
    listener.receipt("ack-r")             # the broker has the ACK, and holds it for the COMMIT
    assert raw.count_msgs(qname) == 1
    conn.commit(tx, receipt="commit-r")
    listener.receipt("commit-r")
    assert raw.count_msgs(qname) == 0


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_stomppy_heart_beats_keep_an_idle_connection_alive(stomppy, qname, version):
    conn, listener = stomppy(version, heartbeats=(200, 200))
    time.sleep(2.0)
    assert listener.heartbeats >= 3, listener.heartbeats
    assert conn.is_connected()
    assert not listener.disconnected
    conn.send(f"/topic/{qname}", "after idle", receipt="r")
    listener.receipt("r")


def test_stomppy_1_0_idle_connection_without_heart_beats_stays_open(stomppy, qname):
    conn, listener = stomppy("1.0")
    time.sleep(1.5)
    assert listener.heartbeats == 0
    assert conn.is_connected()
    conn.send(f"/topic/{qname}", "after idle", receipt="r")
    listener.receipt("r")


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_stomppy_header_escaping_round_trips(stomppy, qname, version):
    conn, listener = stomppy(version)
    conn.subscribe(f"/queue/{qname}", id="s1", receipt="sub-r")
    listener.receipt("sub-r")
    value = "a:b\\c\nd"
    conn.send(f"/queue/{qname}", "x", headers={"x-tricky": value}, receipt="send-r")
    listener.receipt("send-r")
    assert listener.message().headers["x-tricky"] == value


@pytest.mark.parametrize("version", VERSIONS)
def test_stomppy_disconnect_with_receipt(stomppy, version):
    conn, listener = stomppy(version)
    conn.disconnect(receipt="bye")
    listener.receipt("bye")
    assert not conn.is_connected()


@pytest.mark.parametrize("version", VERSIONS)
def test_stomppy_error_reaches_the_listener(stomppy, version):
    conn, listener = stomppy(version)
    conn.send("/nowhere/x", "x", receipt="bad")
    err = listener.wait_for("ERROR", timeout=5)
    assert err.headers.get("message")
    assert err.headers.get("receipt-id") == "bad"


def test_stomppy_wrong_credentials_get_an_error(start_broker):
    b = start_broker("-login", "alice", "-passcode", "s3cret")
    conn = stomp.Connection12([(HOST, b.port)], reconnect_attempts_max=1, timeout=5)
    listener = Collector()
    conn.set_listener("c", listener)
    try:
        conn.connect("alice", "wrong", wait=False)
        err = listener.wait_for("ERROR", timeout=5)
        assert err.headers.get("message")
        assert not [f for k, f in listener.frames if k == "CONNECTED"]
    finally:
        try:
            conn.disconnect()
        except Exception:
            pass


def test_stomppy_right_credentials_connect(start_broker):
    b = start_broker("-login", "alice", "-passcode", "s3cret")
    conn = stomp.Connection12([(HOST, b.port)], reconnect_attempts_max=1, timeout=5)
    listener = Collector()
    conn.set_listener("c", listener)
    try:
        conn.connect("alice", "s3cret", wait=False)
        listener.wait_for("CONNECTED", timeout=5)
        assert conn.is_connected()
    finally:
        conn.disconnect()
