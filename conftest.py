"""Test harness for ocamlmq.py: a real broker process and a raw STOMP client.

The tests are black-box: every test starts the real broker (`python3 ocamlmq.py ...`) on a free
127.0.0.1 port with a database in the test's tmp_path, and talks to it over sockets.  The launcher
and the connection come from testkit.py, which bench/ uses too.

- `Broker` (testkit.BrokerProcess) starts/stops/kill -9s/restarts one broker process on one
  database and port. Its stderr goes to a file in tmp_path, which is attached to the report of a
  failing test.
- `Client` speaks raw STOMP: `send_frame` writes exact bytes (this file's `encode_frame` can write
  malformed frames), `recv` reads frames with the broker's own parser (ocamlmq.FrameParser),
  strictly: anything malformed (a header line without a colon, no NUL where content-length says,
  bad content-length, invalid UTF-8, an undefined escape for the negotiated version) raises
  ProtocolViolation.  Header values are kept as they are on the wire (first header wins), EOL
  heart-beats are counted.  Frames that arrive while a test waits for something else (e.g. a
  MESSAGE before an awaited RECEIPT) are kept in a backlog and handed out by the next
  `recv`/`wait_for`, so tests do not depend on incidental interleaving.
- The `broker` fixture is parametrized by `backend`: "sqlite" for every test, and "pg" as well for
  the tests marked `@pytest.mark.both_backends` (queue delivery, durability, restarts, control
  destinations).  The pg runs share one throwaway PostgreSQL cluster (pgserver.py), started the
  first time a pg test needs it and stopped at the end of the session; every Broker gets a fresh
  database of its own in it, which its restarts reuse.  Without PostgreSQL (server binaries or
  psycopg2) the pg runs skip, unless OCAMLMQ_REQUIRE_PG=1 (as in CI), which makes them fail.
- `@pytest.mark.slow` tests (long variants) are skipped unless selected with `-m slow` (or
  OCAMLMQ_SLOW=1).
"""

import collections
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

import ocamlmq
import testkit
from testkit import (BROKER, HERE, HOST, Closed, ProtocolViolation, free_port,  # noqa: F401
                     read_http_response, ws_frame, ws_handshake)

BACKENDS = ["sqlite", "pg"]     # "pg" only for tests marked both_backends
REQUIRE_PG = os.environ.get("OCAMLMQ_REQUIRE_PG") == "1"

RECV_TIMEOUT = 5.0     # default wait for an expected frame
QUIET = 0.5            # how long "nothing arrives" is watched

DEFAULT_FLAGS = {"-flush-period": "0.2"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long variant, skipped unless selected with -m slow "
                                       "(or OCAMLMQ_SLOW=1)")
    config.addinivalue_line("markers", "both_backends: run against sqlite and PostgreSQL "
                                       "(the `backend` fixture gets both params)")


def pytest_generate_tests(metafunc):
    """`backend` is "sqlite" for every test, and "sqlite" and "pg" for tests marked both_backends."""
    if "backend" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_backends") is not None
        metafunc.parametrize("backend", BACKENDS if both else BACKENDS[:1], indirect=True)


def slow_selected(config):
    return ("slow" in (config.getoption("markexpr", "") or "")
            or os.environ.get("OCAMLMQ_SLOW") == "1")


def pytest_collection_modifyitems(config, items):
    if slow_selected(config):
        return
    skip = pytest.mark.skip(reason="long test: run with -m slow (or OCAMLMQ_SLOW=1)")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)



def run_cli(args, timeout=15.0, cwd=HERE):
    """Run the broker with `args` to completion (for CLI tests that expect it to exit)."""
    return subprocess.run([sys.executable, BROKER, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)




# --------------------------------------------------------------------------------------------
# Broker process
# --------------------------------------------------------------------------------------------

class Broker(testkit.BrokerProcess):
    """One broker process bound to one port and one database; restartable on both.  The
    clients it made are closed when it stops."""

    def __init__(self, tmp_path, backend="sqlite", flags=(), name="broker", port=None,
                 soft_nofile=None, conninfo=None):
        if backend not in ("sqlite", "pg"):
            raise NotImplementedError(f"backend {backend!r}")
        assert backend == "sqlite" or conninfo is not None, "a pg Broker needs a conninfo"
        super().__init__(tmp_path, flags, pg=conninfo if backend == "pg" else None, name=name,
                         port=port, soft_nofile=soft_nofile, defaults=DEFAULT_FLAGS)
        self.tmp_path = tmp_path
        self.backend = backend
        self.clients = []

    def stop(self, sig=signal.SIGTERM):
        """Stop with SIGTERM (or `sig`); returns the exit code, or "timeout" if SIGKILL was needed."""
        self.close_clients()
        return super().stop(sig)

    def terminate(self, sig=signal.SIGTERM):
        """Signal the broker while clients stay open; returns the exit code."""
        return super().stop(sig)

    def kill9(self, close_clients=True):
        rc = super().stop(signal.SIGKILL)
        if close_clients:
            self.close_clients()
        return rc

    def close_clients(self):
        for c in self.clients:
            c.close()
        self.clients = []

    # clients --------------------------------------------------------------------------------

    def raw_client(self, timeout=RECV_TIMEOUT, rcvbuf=None):
        """A connected socket that has not sent CONNECT yet."""
        c = Client(self.port, timeout=timeout, host=self.host, rcvbuf=rcvbuf)
        self.clients.append(c)
        return c

    def client(self, version="1.2", rcvbuf=None, **connect_kw):
        """A client that has completed CONNECT/CONNECTED with `version` (None: no accept-version)."""
        c = self.raw_client(rcvbuf=rcvbuf)
        c.connect(version, **connect_kw)
        return c


# --------------------------------------------------------------------------------------------
# Raw STOMP client
# --------------------------------------------------------------------------------------------

class Frame:
    __slots__ = ("command", "headers", "header_list", "body")

    def __init__(self, command, header_list, body):
        self.command = command
        self.header_list = header_list
        self.headers = {}
        for k, v in header_list:
            self.headers.setdefault(k, v)   # the first one wins
        self.body = body

    def __getitem__(self, key):
        return self.headers[key]

    def get(self, key, default=None):
        return self.headers.get(key, default)

    def __contains__(self, key):
        return key in self.headers

    def __repr__(self):
        body = self.body if len(self.body) <= 80 else self.body[:80] + b"..."
        return f"<{self.command} {self.header_list!r} {body!r}>"


class StrictParser(ocamlmq.FrameParser):
    """The broker's parser (its checks, for the version set in `version`), without its size
    limits, plus what tests look at: the header lines as written (no unescaping, no trimming),
    the EOL heart-beats between frames (not a frame's trailing EOL), and the byte after each
    frame's NUL."""

    def __init__(self):
        super().__init__(max_frame_size=1 << 62, max_headers=1 << 62, max_line=1 << 62)
        self.heartbeats = 0
        self.heartbeat_times = []
        self.after_nul = []          # the byte after each frame's NUL, when seen
        self.trailer_pending = False
        self.header_list = None

    def _skip_eols(self):
        buf, start = self.buffer, self.pos
        end = super()._skip_eols()
        eols = buf.count(b"\n", start, end)
        if eols and self.trailer_pending:       # the EOL that ends the previous frame
            eols -= 1
            self.trailer_pending = False
        self.heartbeats += eols
        self.heartbeat_times += [time.monotonic()] * eols
        return end

    def _parse_head(self, head):
        result = super()._parse_head(head)
        lines = head.decode().replace("\r\n", "\n").split("\n")[1:-2]
        self.header_list = [tuple(line.split(":", 1)) for line in lines]
        return result

    def next_frame(self):
        buf, pos = self.buffer, self.pos
        if self.after_nul and self.after_nul[-1] is None and pos < len(buf):
            self.after_nul[-1] = bytes(buf[pos:pos + 1])
        if pos < len(buf) and buf[pos] != 10:   # a frame, or the CR of an EOL: no trailer now
            self.trailer_pending = buf.startswith(b"\r\n", pos) and self.trailer_pending
        try:
            f = super().next_frame()
        except ocamlmq.ProtocolError as e:
            raise ProtocolViolation(f"malformed frame from the broker: {e}: "
                                    f"{bytes(self.buffer[self.pos:self.pos + 200])!r}") from None
        if f is None:
            return None
        self.trailer_pending = True
        self.after_nul.append(bytes(self.buffer[self.pos:self.pos + 1]) or None)
        return Frame(f.command, self.header_list, f.body)


def encode_frame(command, headers=(), body=b"", content_length=None, eol=b"\n"):
    """Bytes of one frame; headers is a dict or a list of (name, value) pairs, written as given
    (no escaping: tests write exact, even malformed, frames).
    content_length: None -> added when the body is not empty; True/False force it; an int/str is
    written as is."""
    if isinstance(body, str):
        body = body.encode()
    if isinstance(headers, dict):
        headers = list(headers.items())
    else:
        headers = list(headers)
    if content_length is None:
        content_length = bool(body)
    if content_length is True:
        headers.append(("content-length", str(len(body))))
    elif content_length is not False:
        headers.append(("content-length", str(content_length)))
    out = [command.encode() if isinstance(command, str) else command, eol]
    for k, v in headers:
        k = k.encode() if isinstance(k, str) else k
        v = v.encode() if isinstance(v, str) else str(v).encode() if not isinstance(v, bytes) else v
        out += [k, b":", v, eol]
    out += [eol, body, b"\x00"]
    return b"".join(out)


class Client(testkit.Connection):
    _ids = itertools.count(1)

    def __init__(self, port, timeout=RECV_TIMEOUT, host=HOST, rcvbuf=None, **kw):
        super().__init__(port, host=host, timeout=timeout, rcvbuf=rcvbuf, parser=StrictParser(),
                         **kw)
        self.backlog = collections.deque()
        self.version = None
        self.connected = None
        self._rid = itertools.count(1)
        self._sid = itertools.count(1)
        self.name = f"c{next(self._ids)}"

    heartbeats = property(lambda self: self.parser.heartbeats)
    heartbeat_times = property(lambda self: self.parser.heartbeat_times)
    after_nul = property(lambda self: self.parser.after_nul)

    # --- bytes -------------------------------------------------------------------------------

    def send_frame(self, command, headers=(), body=b"", content_length=None, eol=b"\n"):
        self.send_raw(encode_frame(command, headers, body, content_length, eol))

    def heartbeat(self):
        self.send_raw(b"\n")

    def take_bytes(self):
        """The bytes received but not parsed yet, taken out of the parser."""
        data = bytes(self.parser.buffer[self.parser.pos:])
        self.parser.discard()
        return data

    def _read_frame(self, deadline):
        """The next frame; raises Closed on EOF, TimeoutError at the deadline (or when one read
        waited for this client's timeout)."""
        while True:
            f = self.parser.next_frame()
            if f is not None:
                return f
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.fill(min(remaining, self.timeout or remaining)):
                raise TimeoutError()

    # --- frames ------------------------------------------------------------------------------

    def recv(self, timeout=RECV_TIMEOUT):
        """The next frame (backlog first). Raises TimeoutError or Closed."""
        if self.backlog:
            return self.backlog.popleft()
        return self._read_frame(time.monotonic() + timeout)

    def wait_for(self, pred, timeout=RECV_TIMEOUT, what="frame"):
        """The first frame matching pred; other frames are kept for later.  An unexpected ERROR
        or the connection closing fails the test with what was seen."""
        for f in list(self.backlog):
            if pred(f):
                self.backlog.remove(f)
                return f
        deadline = time.monotonic() + timeout
        while True:
            try:
                f = self._read_frame(deadline)
            except TimeoutError:
                raise AssertionError(f"{self.name}: no {what} within {timeout}s; "
                                     f"other frames: {list(self.backlog)!r}") from None
            except Closed:
                raise AssertionError(f"{self.name}: connection closed while waiting for {what}; "
                                     f"other frames: {list(self.backlog)!r}") from None
            if pred(f):
                return f
            if f.command == "ERROR":
                raise AssertionError(f"{self.name}: ERROR while waiting for {what}: {f!r}")
            self.backlog.append(f)

    def expect(self, command, timeout=RECV_TIMEOUT):
        return self.wait_for(lambda f: f.command == command, timeout, command)

    def receipt(self, rid, timeout=RECV_TIMEOUT):
        return self.wait_for(lambda f: f.command == "RECEIPT" and f.get("receipt-id") == rid,
                             timeout, f"RECEIPT {rid}")

    def message(self, timeout=RECV_TIMEOUT):
        return self.expect("MESSAGE", timeout)

    def try_message(self, timeout=0.1):
        """A MESSAGE if one arrives within `timeout`, else None (an ERROR or close fails)."""
        try:
            return self.wait_for(lambda f: f.command == "MESSAGE", timeout, "MESSAGE")
        except AssertionError as e:
            if "no MESSAGE within" in str(e):
                return None
            raise

    def messages(self, n, timeout=RECV_TIMEOUT):
        return [self.message(timeout) for _ in range(n)]

    def expect_nothing(self, quiet=QUIET):
        """No frame arrives (heart-beats aside) for `quiet` seconds, and the backlog is empty."""
        assert not self.backlog, f"{self.name}: unexpected frames {list(self.backlog)!r}"
        try:
            f = self._read_frame(time.monotonic() + quiet)
        except TimeoutError:
            return
        except Closed:
            raise AssertionError(f"{self.name}: connection closed unexpectedly") from None
        raise AssertionError(f"{self.name}: unexpected frame {f!r}")

    def expect_closed(self, timeout=RECV_TIMEOUT):
        """Read until the broker closes the connection; return the frames read on the way."""
        frames = list(self.backlog)
        self.backlog.clear()
        deadline = time.monotonic() + timeout
        while True:
            try:
                frames.append(self._read_frame(deadline))
            except Closed:
                return frames
            except TimeoutError:
                raise AssertionError(f"{self.name}: connection still open after {timeout}s; "
                                     f"frames: {frames!r}") from None

    def expect_error(self, timeout=RECV_TIMEOUT):
        """An ERROR frame followed by the connection closing; returns the ERROR."""
        frames = self.expect_closed(timeout)
        errors = [f for f in frames if f.command == "ERROR"]
        assert errors, f"{self.name}: closed without ERROR; frames: {frames!r}"
        return errors[0]

    def is_closed(self, timeout=QUIET):
        """True if the connection is closed within `timeout` (frames read are discarded)."""
        try:
            self.expect_closed(timeout)
            return True
        except AssertionError:
            return False

    # --- commands ------------------------------------------------------------------------------

    def next_receipt_id(self):
        return f"{self.name}-r{next(self._rid)}"

    def next_sub_id(self):
        return f"{self.name}-s{next(self._sid)}"

    @staticmethod
    def _headers(headers, kw):
        out = dict(headers or {})
        for k, v in kw.items():
            if v is not None:
                out[k.replace("_", "-")] = str(v)
        return out

    def hello(self, version="1.2", command="CONNECT", heart_beat=None, headers=None, **kw):
        """Send CONNECT (or STOMP) and return the broker's answer frame."""
        h = {}
        if version is not None:
            h["accept-version"] = version
        h["host"] = "localhost"
        if heart_beat is not None:
            h["heart-beat"] = heart_beat
        h.update(self._headers(headers, kw))
        self.send_frame(command, h)
        return self.recv()

    def connect(self, version="1.2", **kw):
        f = self.hello(version, **kw)
        assert f.command == "CONNECTED", f"expected CONNECTED, got {f!r}"
        self.connected = f
        self.version = f.get("version", "1.0")
        self.parser.version = self.version      # escapes are checked for this version from now on
        return f

    def send(self, destination, body=b"", receipt=True, headers=None, content_length=None, **kw):
        """SEND; with receipt=True waits for and returns the RECEIPT."""
        h = {"destination": destination}
        rid = None
        if receipt:
            rid = receipt if isinstance(receipt, str) else self.next_receipt_id()
            h["receipt"] = rid
        h.update(self._headers(headers, kw))
        self.send_frame("SEND", h, body, content_length)
        return self.receipt(rid) if rid else None

    def subscribe(self, destination, id=True, ack="auto", receipt=True, headers=None, **kw):
        """SUBSCRIBE; returns the subscription id (id=True: a fresh one, None: no id header)."""
        h = {"destination": destination}
        if id is True:
            id = self.next_sub_id()
        if id is not None:
            h["id"] = id
        if ack is not None:
            h["ack"] = ack
        rid = None
        if receipt:
            rid = self.next_receipt_id()
            h["receipt"] = rid
        h.update(self._headers(headers, kw))
        self.send_frame("SUBSCRIBE", h)
        if rid:
            self.receipt(rid)
        return id

    def unsubscribe(self, id=None, destination=None, receipt=True, **kw):
        h = {}
        if id is not None:
            h["id"] = id
        if destination is not None:
            h["destination"] = destination
        return self.request("UNSUBSCRIBE", h, receipt, **kw)

    def request(self, command, headers=None, receipt=True, **kw):
        """Send any frame; with receipt (True or an id) wait for and return its RECEIPT."""
        h = self._headers(headers, kw)
        rid = None
        if receipt:
            rid = receipt if isinstance(receipt, str) else self.next_receipt_id()
            h["receipt"] = rid
        self.send_frame(command, h)
        return self.receipt(rid) if rid else None

    def _ack_headers(self, msg, by):
        if by is None:
            by = "id" if self.version == "1.2" else "message-id"
        h = {}
        if by == "id":
            h["id"] = msg["ack"] if "ack" in msg else msg["message-id"]
        elif by == "message-id":
            h["message-id"] = msg["message-id"]
            if self.version == "1.1" and "subscription" in msg:   # 1.0 ACK has message-id only
                h["subscription"] = msg["subscription"]
        else:
            raise ValueError(by)
        return h

    def ack(self, msg, receipt=True, by=None, **kw):
        """ACK a MESSAGE frame the way this client's version does it (by='id'/'message-id' forces)."""
        return self.request("ACK", self._ack_headers(msg, by), receipt, **kw)

    def nack(self, msg, receipt=True, by=None, **kw):
        return self.request("NACK", self._ack_headers(msg, by), receipt, **kw)

    def begin(self, tx, receipt=True):
        return self.request("BEGIN", {"transaction": tx}, receipt)

    def commit(self, tx, receipt=True):
        return self.request("COMMIT", {"transaction": tx}, receipt)

    def abort(self, tx, receipt=True):
        return self.request("ABORT", {"transaction": tx}, receipt)

    def disconnect(self, receipt=True):
        """DISCONNECT; with a receipt, waits for the RECEIPT and the close."""
        h = {}
        rid = None
        if receipt:
            rid = self.next_receipt_id()
            h["receipt"] = rid
        self.send_frame("DISCONNECT", h)
        if rid:
            r = self.receipt(rid)
            self.expect_closed()
            return r
        return None

    def count_msgs(self, queue_name):
        r = self.send(f"/control/count-msgs/queue/{queue_name}")
        assert "num-messages" in r, f"no num-messages on {r!r}"
        return int(r["num-messages"])

    def count_subscribers(self, destination):
        """destination: '/queue/NAME' or '/topic/NAME'."""
        r = self.send(f"/control/count-subscribers{destination}")
        assert "num-subscribers" in r, f"no num-subscribers on {r!r}"
        return int(r["num-subscribers"])


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

# --- PostgreSQL: one cluster per session, one database per broker -------------------------

def pg_unavailable(reason):
    """Skip a PostgreSQL test, or fail it when OCAMLMQ_REQUIRE_PG=1 (as in CI)."""
    if REQUIRE_PG:
        pytest.fail(f"{reason}, and OCAMLMQ_REQUIRE_PG=1 requires the PostgreSQL tests",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    """The session's throwaway PostgreSQL cluster (pgserver.Cluster), started on first use."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pg_unavailable("psycopg2 is not installed (pip install -r requirements.txt)")
    import pgserver
    if not pgserver.available():
        pg_unavailable(f"no PostgreSQL server binaries (initdb, pg_ctl) under {pgserver.PG_ROOT}"
                       " nor on PATH")
    c = pgserver.Cluster()
    yield c
    c.destroy()


_dbs = itertools.count(1)


def _admin(cluster, sql):
    import psycopg2
    admin = psycopg2.connect(cluster.conninfo)
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(sql)
    finally:
        admin.close()


def database_conninfo(cluster, name, connect_timeout=5):
    return (f"host=127.0.0.1 port={cluster.port} user=postgres dbname={name}"
            f" connect_timeout={connect_timeout}")


def create_database(cluster, connect_timeout=5):
    """CREATE DATABASE with a fresh name in `cluster` (started again if a test stopped it);
    returns (name, conninfo)."""
    if not cluster.running:
        cluster.start()
    name = f"t{os.getpid()}_{next(_dbs)}"
    _admin(cluster, f"CREATE DATABASE {name}")
    return name, database_conninfo(cluster, name, connect_timeout)


def drop_database(cluster, name):
    """Best effort: the cluster goes away at the end of the session anyway."""
    import psycopg2
    if cluster.running:
        try:
            _admin(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except psycopg2.Error:
            pass


class DatabasePool:
    """Fresh databases for the pg brokers, created ahead and dropped afterwards by one background
    thread, so that CREATE/DROP DATABASE (~0.3 s each, fsync on) overlap the tests instead of
    adding to them.  `take()` never hands out a database twice; when none is ready it creates
    one at once.  The thread never starts the cluster: while a test holds it stopped, its jobs
    fail quietly and `take()` falls back to `create_database`."""

    AHEAD = 2

    def __init__(self, cluster):
        import queue
        import threading
        self.cluster = cluster
        self.ready = queue.Queue()
        self.jobs = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="pg-databases", daemon=True)
        self.thread.start()
        for _ in range(self.AHEAD):
            self.jobs.put(("create", None))

    def _work(self):
        import psycopg2
        while True:
            kind, name = self.jobs.get()
            if kind == "stop":
                return
            if not self.cluster.running:
                continue
            try:
                if kind == "create":
                    name = f"t{os.getpid()}_{next(_dbs)}"
                    _admin(self.cluster, f"CREATE DATABASE {name}")
                    self.ready.put(name)
                else:
                    _admin(self.cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except psycopg2.Error:
                pass

    def take(self):
        """(name, conninfo) of a fresh database; another one is made ahead in the background."""
        import queue
        self.jobs.put(("create", None))
        try:
            name = self.ready.get_nowait()
        except queue.Empty:
            return create_database(self.cluster)
        if not self.cluster.running:
            self.cluster.start()
        return name, database_conninfo(self.cluster, name)

    def give_back(self, name):
        self.jobs.put(("drop", name))

    def close(self):
        self.jobs.put(("stop", None))
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def pg_databases(cluster):
    pool = DatabasePool(cluster)
    yield pool
    pool.close()


@pytest.fixture
def backend(request):
    """"sqlite" or "pg" (see pytest_generate_tests); "pg" skips without PostgreSQL."""
    if request.param == "pg":
        request.getfixturevalue("cluster")
    return request.param


@pytest.fixture
def start_broker(tmp_path, backend, request):
    """Factory: start_broker("-flag", "value", ...) -> a running Broker; all are stopped at teardown.
    Each broker has its own database (a file in tmp_path, or a fresh PostgreSQL database)."""
    brokers = []
    databases = []
    request.node._ocamlmq_brokers = brokers
    pg_pool = request.getfixturevalue("pg_databases") if backend == "pg" else None

    def start(*flags, name=None, port=None, soft_nofile=None):
        conninfo = None
        if pg_pool is not None:
            dbname, conninfo = pg_pool.take()
            databases.append(dbname)
        b = Broker(tmp_path, backend, flags, name=name or f"broker{len(brokers) + 1}", port=port,
                   soft_nofile=soft_nofile, conninfo=conninfo)
        brokers.append(b)
        return b.start()

    yield start
    tracebacks = []
    for b in brokers:
        b.stop()
        if "Traceback" in b.stderr():
            tracebacks.append(b)
    for dbname in databases:
        pg_pool.give_back(dbname)
    if tracebacks:
        pytest.fail("broker wrote a traceback to stderr:\n" + tracebacks[0].stderr()[-3000:],
                    pytrace=False)


@pytest.fixture
def broker(start_broker):
    return start_broker()


_names = itertools.count(1)


@pytest.fixture
def qname(request):
    """A destination name unique to this test (without /queue/ or /topic/)."""
    return f"t{next(_names)}_{request.node.name[:40]}".replace("[", "_").replace("]", "").replace("-", "_")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for b in getattr(item, "_ocamlmq_brokers", []):
            text = b.stderr()
            if text:
                rep.sections.append((f"{b.name} stderr ({b.argv()[2:]})", text[-4000:]))


# --------------------------------------------------------------------------------------------
# STOMP over WebSocket (RFC 6455) and over TLS
# --------------------------------------------------------------------------------------------

class WsClient(Client):
    """The raw STOMP client of above, its bytes carried in WebSocket messages: what it sends
    is one masked text message per send_raw (or split in `fragments`), and what it receives is
    unwrapped; `messages` keeps the (opcode, payload) of every message received."""

    keep_messages = True

    def __init__(self, port, timeout=RECV_TIMEOUT, host=HOST, tls_context=None, **handshake):
        super().__init__(port, timeout=timeout, host=host, tls_context=tls_context,
                         transport="ws" if tls_context is None else "wss", **handshake)

    def send_raw(self, data, fragments=1, opcode=1):
        step = -(-len(data) // fragments) if data else 1
        parts = [data[i:i + step] for i in range(0, len(data), step)] or [data]
        for i, part in enumerate(parts):
            self.sock.sendall(ws_frame(part, opcode if i == 0 else 0, fin=i == len(parts) - 1))


class TlsClient(Client):
    """The raw STOMP client of above, over TLS."""

    def __init__(self, port, tls_context, **kw):
        super().__init__(port, transport="tls", tls_context=tls_context, **kw)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """(certificate, key) PEM files of a self-signed certificate for localhost/127.0.0.1."""
    return testkit.self_signed_cert(str(tmp_path_factory.mktemp("tls")))



@pytest.fixture
def client_tls(tls_files):
    """An SSLContext that trusts the test certificate."""
    import ssl
    return ssl.create_default_context(cafile=tls_files[0])


@pytest.fixture
def web(start_broker):
    """A broker that also serves WebSocket (and /metrics) on `web.ws_port`."""
    ws_port = free_port()
    b = start_broker("-ws-port", str(ws_port))
    b.ws_port = ws_port
    return b
