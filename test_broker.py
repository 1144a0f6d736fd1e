"""Black-box tests of ocamlmq.py against SPEC.md, one section per SPEC section (§2-§9).

Every test starts the real broker process (see conftest.py) and speaks raw STOMP over a socket,
so the assertions are about exact wire behaviour.  Destinations are named per test (`qname`).
"""

import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import HOST, encode_frame, free_port, run_cli


def collect(clients, n, timeout=5.0):
    """Gather n MESSAGE frames from any of `clients`; returns [(client, frame)] in arrival order."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} messages arrived: {got!r}"
        for c in clients:
            m = c.try_message(0.05)
            if m is not None:
                got.append((c, m))
    return got


def wait_until(fn, timeout=5.0, interval=0.05):
    """Poll fn() until it returns a true value (returned) or time runs out (returns the last)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def barrier(c):
    """Frames are handled in order: once this topic SEND's RECEIPT is back, every earlier frame of
    this connection has been handled."""
    c.send("/topic/barrier-for-tests")


# ============================================================================================
# §2 Command line
# ============================================================================================

ALL_FLAGS = ["-port", "-address", "-login", "-passcode", "-maxmsgs", "-flush-period",
             "-max-prefetch", "-max-frame-size", "-max-pending", "-max-memory", "-pg", "-ws-port",
             "-ws-origin", "-tls-port", "-tls-cert", "-tls-key", "-debug", "-help"]


@pytest.mark.parametrize("flag", ["-help", "--help"])
def test_help_prints_usage_listing_every_flag_and_exits_0(flag):
    r = run_cli([flag])
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    missing = [f for f in ALL_FLAGS if f not in out]
    assert not missing, f"usage does not list {missing}:\n{out}"
    assert "Traceback" not in out


@pytest.mark.parametrize("args", [
    ["-bogus"],
    ["-port", "abc"],
    ["-port", "70000"],
    ["-flush-period", "soon"],
    ["-maxmsgs", "many"],
    ["-max-prefetch", "x"],
    ["-max-frame-size", "big"],
    ["-max-pending", "1.5x"],
], ids=lambda a: " ".join(a))
def test_bad_flag_or_value_prints_error_and_usage_and_exits_2(args, tmp_path):
    r = run_cli(["-port", str(free_port()), *args, str(tmp_path / "x.db")], timeout=10)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert any(a in r.stderr for a in args), f"error does not name {args}:\n{r.stderr}"
    assert "-flush-period" in r.stderr and "-max-prefetch" in r.stderr, \
        f"no usage on stderr:\n{r.stderr}"


def test_flag_missing_its_value_exits_2(tmp_path):
    r = run_cli(["-port", str(free_port()), "-maxmsgs"], timeout=10)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr


def _one_line_error(r):
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{r.stderr}"


def test_port_in_use_is_a_one_line_error_and_exit_1(tmp_path):
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli(["-port", str(port), str(tmp_path / "x.db")], timeout=10)
    assert r.returncode == 1, (r.returncode, r.stderr)
    _one_line_error(r)


@pytest.mark.parametrize("kind", ["directory", "missing-parent", "not-a-database"])
def test_unusable_database_is_a_one_line_error_and_exit_1(tmp_path, kind):
    if kind == "directory":
        path = tmp_path
    elif kind == "missing-parent":
        path = tmp_path / "no" / "such" / "dir" / "x.db"
    else:
        path = tmp_path / "garbage.db"
        path.write_bytes(b"this is not an sqlite database, just some text\n" * 200)
    r = run_cli(["-port", str(free_port()), str(path)], timeout=10)
    assert r.returncode == 1, (r.returncode, r.stderr)
    _one_line_error(r)


def test_a_second_broker_on_a_sqlite_file_in_use_exits_1_with_one_line(broker, qname):
    """sqlite is one broker per file: a second one would deliver every message twice."""
    broker.client().send(f"/queue/{qname}", b"kept")
    r = run_cli(["-port", str(free_port()), broker.db], timeout=10)
    assert r.returncode == 1, (r.returncode, r.stderr)
    _one_line_error(r)
    assert "in use" in r.stderr
    assert broker.client().count_msgs(qname) == 1     # the first one serves on


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_broker_with_exit_0(broker, sig, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    c.send(f"/queue/{qname}", "x")
    assert broker.terminate(sig) == 0, broker.stderr()


@pytest.mark.both_backends
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_flushes_unreceipted_messages_to_disk(start_broker, qname, sig):
    b = start_broker("-flush-period", "600")
    c = b.client()
    for i in range(5):
        c.send(f"/queue/{qname}", f"m{i}", receipt=False)
    barrier(c)
    assert b.terminate(sig) == 0, b.stderr()
    b.close_clients()
    b.start()
    c = b.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    assert [m.body for m in c.messages(5)] == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_sigterm_with_a_half_sent_frame_still_exits_0(broker, qname):
    c = broker.client()
    c.send_raw(f"SEND\ndestination:/queue/{qname}\ncontent-length:100\n\nonly part".encode())
    time.sleep(0.2)
    assert broker.terminate() == 0, broker.stderr()
    broker.close_clients()
    broker.start()
    assert broker.client().count_msgs(qname) == 0


def test_restart_on_the_same_port_right_after_stop_works(broker, qname):
    c1 = broker.client()
    c2 = broker.client("1.0")
    c1.subscribe(f"/queue/{qname}", ack="client")
    c2.send(f"/queue/{qname}", "x")
    c1.message()
    assert broker.terminate() == 0, broker.stderr()   # connections still open on our side
    broker.start()                                      # same port
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    assert c.message().body == b"x"


def test_open_connections_are_closed_on_sigterm(broker):
    c = broker.client()
    assert broker.terminate() == 0
    c.expect_closed()


def test_address_flag_chooses_the_bind_address(start_broker):
    b = start_broker("-address", "127.0.0.2")
    b.client().send("/topic/x", "reachable on 127.0.0.2")
    with pytest.raises(OSError):
        socket.create_connection((HOST, b.port), timeout=2).close()


def test_address_0_0_0_0_listens_on_all_interfaces(start_broker):
    b = start_broker("-address", "0.0.0.0")
    b.client().send("/topic/x", "reachable on 127.0.0.1")
    socket.create_connection(("127.0.0.2", b.port), timeout=2).close()


def test_debug_flag_writes_debug_logging_to_stderr(start_broker, qname):
    quiet = start_broker(name="quiet")
    loud = start_broker("-debug", name="loud")
    for b in (quiet, loud):
        c = b.client()
        c.subscribe(f"/queue/{qname}")
        c.send(f"/queue/{qname}", "x")
        c.message()
        c.disconnect()
    time.sleep(0.3)
    assert len(loud.stderr().splitlines()) > len(quiet.stderr().splitlines()), loud.stderr()


# ============================================================================================
# §3 Wire protocol
# ============================================================================================

# --- version negotiation, CONNECT/CONNECTED -----------------------------------------------

@pytest.mark.parametrize("accept,expected", [
    (None, "1.0"), ("1.0", "1.0"), ("1.1", "1.1"), ("1.2", "1.2"),
    ("1.0,1.1,1.2", "1.2"), ("1.0,1.1", "1.1"), ("1.1,3.0", "1.1"), ("1.2,1.0", "1.2"),
])
def test_version_is_negotiated_from_accept_version(broker, accept, expected):
    f = broker.raw_client().hello(accept)
    assert f.command == "CONNECTED", f
    assert f["version"] == expected


def test_no_common_version_is_an_error_listing_supported_versions(broker):
    c = broker.raw_client()
    err = c.hello("2.0,3.1")
    assert err.command == "ERROR", err
    c.expect_closed()
    assert "version" in err, err
    assert set(err["version"].split(",")) >= {"1.0", "1.1", "1.2"}, err


@pytest.mark.parametrize("command", ["CONNECT", "STOMP"])
def test_stomp_command_is_the_same_as_connect(broker, command, qname):
    c = broker.raw_client()
    f = c.hello("1.2", command=command)
    assert f.command == "CONNECTED", f
    c.version = "1.2"
    c.send(f"/queue/{qname}", "x")


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_connected_carries_version_session_server_and_heart_beat(broker, version):
    f = broker.raw_client().hello(version)
    assert f.command == "CONNECTED", f
    assert f["version"] == version
    assert f.get("session"), f
    assert f.get("server"), f
    if version != "1.0":
        assert "heart-beat" in f, f
    assert "content-length" not in f, f
    assert f.body == b""


def test_any_host_value_is_accepted(broker):
    f = broker.raw_client().hello("1.2", headers={"host": "some.virtual.host"})
    assert f.command == "CONNECTED", f


def test_sessions_are_distinct(broker):
    a = broker.client()
    b = broker.client()
    assert a.connected["session"] != b.connected["session"]


def test_receipt_on_connect_is_ignored(broker):
    c = broker.raw_client()
    f = c.hello("1.2", receipt="r-connect")
    assert f.command == "CONNECTED", f
    c.expect_nothing()


# --- framing ---------------------------------------------------------------------------------

def test_extra_eols_between_frames_are_accepted(broker, qname):
    c = broker.raw_client()
    c.send_raw(b"\n\r\n\n" + encode_frame("CONNECT", {"accept-version": "1.2", "host": "h"}))
    assert c.recv().command == "CONNECTED"
    c.send_raw(b"\n\n\r\n\r\n" + encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": "a"}, "1")
               + b"\n\n\n" + encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": "b"}, "2")
               + b"\r\n")
    c.receipt("a")
    c.receipt("b")
    assert c.count_msgs(qname) == 2


def test_crlf_line_endings_are_accepted(broker, qname):
    c = broker.raw_client()
    c.send_frame("CONNECT", {"accept-version": "1.2", "host": "h"}, eol=b"\r\n")
    assert c.recv().command == "CONNECTED"
    c.version = "1.2"
    c.send_frame("SUBSCRIBE", {"destination": f"/queue/{qname}", "id": "s1", "receipt": "r1"},
                 eol=b"\r\n")
    c.receipt("r1")
    c.send_frame("SEND", {"destination": f"/queue/{qname}", "x-h": "v", "receipt": "r2"}, b"body",
                 content_length=False, eol=b"\r\n")
    c.receipt("r2")
    m = c.message()
    assert m["destination"] == f"/queue/{qname}"
    assert m["x-h"] == "v"
    assert m["subscription"] == "s1"
    assert m.body == b"body"


def test_content_length_is_honoured_so_bodies_may_contain_nul(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    body = b"a\x00b\x00\x00c\n\x00"
    c.send(f"/queue/{qname}", body, content_length=True)
    m = c.message()
    assert m.body == body
    assert m["content-length"] == str(len(body))


def test_body_without_content_length_ends_at_nul(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    c.send(f"/queue/{qname}", b"hello world", content_length=False)
    m = c.message()
    assert m.body == b"hello world"
    assert m["content-length"] == "11"


def test_a_frame_arriving_one_byte_at_a_time_is_handled(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    data = encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": "rb"}, b"piece\x00wise")
    for i in range(len(data)):
        c.send_raw(data[i:i + 1])
        time.sleep(0.002)
    c.receipt("rb")
    assert c.message().body == b"piece\x00wise"


def test_repeated_header_first_one_wins(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}a")
    c.subscribe(f"/queue/{qname}b")
    c.send_frame("SEND", [("destination", f"/queue/{qname}a"), ("destination", f"/queue/{qname}b"),
                          ("x-rep", "first"), ("x-rep", "second"), ("receipt", "r1")], b"x")
    c.receipt("r1")
    m = c.message()
    assert m["destination"] == f"/queue/{qname}a"
    assert m["x-rep"] == "first"
    assert c.count_msgs(qname + "b") == 0


def test_header_names_are_case_sensitive(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    c.send(f"/queue/{qname}", "x", headers={"X-Case": "upper", "x-case": "lower"})
    m = c.message()
    assert m["X-Case"] == "upper"
    assert m["x-case"] == "lower"


def test_stomp_1_0_header_values_are_stripped(broker, qname):
    sub = broker.client()
    sub.subscribe(f"/queue/{qname}")
    c = broker.client("1.0")
    c.send_raw(f"SEND\ndestination:  /queue/{qname}  \nx-pad:  v  \nreceipt: r1\n\nhi\x00".encode())
    c.receipt("r1")
    m = sub.message()
    assert m["destination"] == f"/queue/{qname}"
    assert m["x-pad"] == "v"


def test_stomp_1_2_header_values_are_taken_as_is(broker, qname):
    sub = broker.client()
    sub.subscribe(f"/queue/{qname}")
    c = broker.client("1.2")
    c.send_raw(f"SEND\ndestination:/queue/{qname}\nx-pad:  v  \nreceipt:r1\n\nhi\x00".encode())
    c.receipt("r1")
    assert sub.message()["x-pad"] == "  v  "


def test_stomp_1_1_destination_with_a_leading_blank_is_not_trimmed(broker, qname):
    c = broker.client("1.1")
    c.send_raw(f"SEND\ndestination: /queue/{qname}\nreceipt:r1\n\nhi\x00".encode())
    err = c.expect_error()
    assert err.get("receipt-id") == "r1"


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_escapes_are_decoded_on_input_and_encoded_on_message(broker, qname, version):
    """Escaped on the way in, decoded (a 1.0 subscriber, which has no escapes, sees the real
    characters, a newline as a blank, and a colon in a header name as a blank, so that it
    cannot split the line into another header), escaped again for a 1.1/1.2 subscriber."""
    sub = broker.client(version)
    sub.subscribe(f"/topic/{qname}")
    plain = broker.client("1.0")
    plain.subscribe(f"/topic/{qname}")
    c = broker.client(version)
    c.send_raw(f"SEND\ndestination:/topic/{qname}\nx-esc:a\\cb\\nc\\\\d\nx\\cname:v\nreceipt:r1\n\n\x00"
               .encode())
    c.receipt("r1")
    m = sub.message()
    assert m["x-esc"] == "a\\cb\\nc\\\\d", m
    assert m["x\\cname"] == "v", m
    m = plain.message()
    assert m["x-esc"] == "a:b c\\d", m
    assert m["x name"] == "v" and "x" not in m, m


def test_escaped_cr_is_decoded_and_encoded_in_1_2(broker, qname):
    sub = broker.client("1.2")
    sub.subscribe(f"/topic/{qname}")
    plain = broker.client("1.0")
    plain.subscribe(f"/topic/{qname}")
    c = broker.client("1.2")
    c.send_raw(f"SEND\ndestination:/topic/{qname}\nx-cr:a\\rb\nreceipt:r1\n\n\x00".encode())
    c.receipt("r1")
    assert sub.message()["x-cr"] == "a\\rb"
    assert plain.message()["x-cr"] == "a b"      # decoded; 1.0 cannot carry a CR in a header


def test_escapes_are_decoded_before_delivery_to_a_1_0_subscriber(broker, qname):
    sub = broker.client("1.0")
    sub.subscribe(f"/queue/{qname}")
    c = broker.client("1.2")
    c.send_raw(f"SEND\ndestination:/queue/{qname}\nx-esc:a\\cb\\\\c\nreceipt:r1\n\n\x00".encode())
    c.receipt("r1")
    assert sub.message()["x-esc"] == "a:b\\c"


def test_stomp_1_0_backslashes_are_literal_and_escaped_for_a_1_2_subscriber(broker, qname):
    sub = broker.client("1.2")
    sub.subscribe(f"/queue/{qname}")
    c = broker.client("1.0")
    c.send_raw(f"SEND\ndestination:/queue/{qname}\nx-lit:a\\cb\nreceipt:r1\n\n\x00".encode())
    c.receipt("r1")
    assert sub.message()["x-lit"] == "a\\\\cb"


def test_escaped_destination_is_decoded(broker, qname):
    sub = broker.client("1.0")
    sub.subscribe(f"/queue/{qname}:x")
    c = broker.client("1.2")
    c.send_raw(f"SEND\ndestination:/queue/{qname}\\cx\nreceipt:r1\n\nhi\x00".encode())
    c.receipt("r1")
    assert sub.message()["destination"] == f"/queue/{qname}:x"


def _escape_1_2(value):
    return (value.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
            .replace(":", "\\c"))


_header_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                       max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_header_text, body=st.binary(max_size=3000))
def test_any_header_value_and_body_round_trip_through_the_broker(broker, value, body):
    if not hasattr(broker, "_rt"):
        broker._rt = (broker.client("1.2"), broker.client("1.2"))
        broker._rt[1].subscribe("/queue/roundtrip")
    sender, sub = broker._rt
    sender.send_frame("SEND", {"destination": "/queue/roundtrip", "x-value": _escape_1_2(value),
                               "receipt": "rt"}, body, content_length=True)
    sender.receipt("rt")
    m = sub.message()
    assert m["x-value"] == _escape_1_2(value)
    assert m.body == body


# --- heart-beats -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.1", "1.2"])
@pytest.mark.parametrize("client_hb,server_hb", [
    ("0,0", "0,0"),
    ("1000,2000", "2000,1000"),
    ("0,500", "500,0"),
    ("700,0", "0,700"),
    ("50,30", "100,100"),
    ("0,1", "100,0"),
])
def test_heart_beat_negotiation(broker, version, client_hb, server_hb):
    f = broker.raw_client().hello(version, heart_beat=client_hb)
    assert f.command == "CONNECTED", f
    assert f["heart-beat"] == server_hb


def test_no_client_heart_beat_header_means_no_heart_beats(broker):
    f = broker.raw_client().hello("1.2")
    assert f["heart-beat"] == "0,0"


def test_broker_sends_eols_at_its_interval_when_idle(broker):
    c = broker.client("1.2", heart_beat="0,200")
    assert c.connected["heart-beat"] == "200,0"
    time.sleep(1.5)
    c.expect_nothing(0.1)
    assert c.heartbeats >= 3, c.heartbeats


def test_broker_sends_no_eols_when_heart_beats_are_off(broker):
    c = broker.client("1.2", heart_beat="0,0")
    c.expect_nothing(1.0)
    assert c.heartbeats == 0


def test_broker_closes_a_connection_silent_for_twice_the_client_interval(broker):
    c = broker.client("1.2", heart_beat="200,0")
    c.expect_closed(timeout=3.0)


def test_broker_keeps_a_heart_beating_connection_open(broker, qname):
    c = broker.client("1.2", heart_beat="200,0")
    for _ in range(15):
        c.heartbeat()
        time.sleep(0.1)
    c.send(f"/queue/{qname}", "still here")


def test_a_client_beating_at_exactly_its_interval_stays_connected(broker, qname):
    c = broker.client("1.2", heart_beat="200,0")
    for _ in range(10):
        time.sleep(0.2)
        c.heartbeat()
    c.send(f"/queue/{qname}", "still here")


def test_frames_count_as_heart_beats(broker, qname):
    c = broker.client("1.2", heart_beat="200,0")
    for _ in range(8):
        c.send(f"/topic/{qname}", "x")
        time.sleep(0.15)
    c.send(f"/queue/{qname}", "still here")


def test_stomp_1_0_connection_has_no_heart_beats(broker):
    c = broker.client("1.0", heart_beat="100,100")
    c.expect_nothing(1.0)
    assert c.heartbeats == 0
    c.send("/topic/x", "still open")


# --- receipts ------------------------------------------------------------------------------------

def _frames_for_receipt(qname):
    """One client frame of each kind (after CONNECT), each needing a receipt."""
    q = f"/queue/{qname}"
    return [
        ("SUBSCRIBE", {"destination": q, "id": "s1", "ack": "client"}),
        ("SEND", {"destination": q}),
        ("SEND", {"destination": f"/topic/{qname}"}),
        ("SEND", {"destination": f"/control/count-msgs/queue/{qname}"}),
        ("ACK", {"id": "no-such-message", "message-id": "no-such-message", "subscription": "s1"}),
        ("NACK", {"id": "no-such-message", "message-id": "no-such-message", "subscription": "s1"}),
        ("BEGIN", {"transaction": "tx1"}),
        ("SEND", {"destination": q, "transaction": "tx1"}),
        ("COMMIT", {"transaction": "tx1"}),
        ("BEGIN", {"transaction": "tx2"}),
        ("ABORT", {"transaction": "tx2"}),
        ("UNSUBSCRIBE", {"id": "s1"}),
    ]


@pytest.mark.parametrize("index", range(12), ids=lambda i: f"{i}-" + _frames_for_receipt("q")[i][0])
def test_every_frame_with_a_receipt_gets_a_receipt(broker, qname, index):
    c = broker.client("1.2")
    frames = _frames_for_receipt(qname)
    for i, (command, headers) in enumerate(frames[:index + 1]):
        c.send_frame(command, {**headers, "receipt": f"rcpt-{i}"})
    r = c.receipt(f"rcpt-{index}")
    assert "content-length" not in r, r
    assert r.body == b""


def test_disconnect_with_receipt_gets_receipt_then_close(broker):
    c = broker.client()
    c.send_frame("DISCONNECT", {"receipt": "bye"})
    frames = c.expect_closed()
    assert [f.command for f in frames] == ["RECEIPT"], frames
    assert frames[0]["receipt-id"] == "bye"


def test_disconnect_without_receipt_closes(broker):
    c = broker.client()
    c.send_frame("DISCONNECT", {})
    assert c.expect_closed() == []


def test_receipts_come_in_the_order_of_the_frames(broker, qname):
    c = broker.client()
    data = b""
    ids = []
    for i in range(40):
        kind = i % 4
        rid = f"o{i}"
        ids.append(rid)
        if kind == 0:
            h = {"destination": f"/queue/{qname}", "receipt": rid}   # waits for a disk sync
        elif kind == 1:
            h = {"destination": f"/topic/{qname}", "receipt": rid}
        elif kind == 2:
            h = {"destination": f"/control/count-msgs/queue/{qname}", "receipt": rid}
        else:
            data += encode_frame("SUBSCRIBE", {"destination": f"/topic/{qname}{i}", "id": f"s{i}",
                                               "receipt": rid})
            continue
        data += encode_frame("SEND", h, f"body{i}")
    c.send_raw(data)
    got = []
    for _ in range(40):
        f = c.recv()
        assert f.command == "RECEIPT", f
        got.append(f["receipt-id"])
    assert got == ids


def test_a_receipt_never_overtakes_an_earlier_error(broker, qname):
    c = broker.client()
    c.send_raw(encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": "first"}, "x")
               + encode_frame("SEND", {"destination": "/nowhere/x", "receipt": "second"}, "x")
               + encode_frame("SEND", {"destination": f"/topic/{qname}", "receipt": "third"}, "x"))
    frames = c.expect_closed()
    assert [f.command for f in frames][:2] == ["RECEIPT", "ERROR"], frames
    assert frames[0]["receipt-id"] == "first"
    assert frames[1]["receipt-id"] == "second"
    assert all(f.get("receipt-id") != "third" for f in frames), frames


@pytest.mark.both_backends
def test_count_msgs_receipt_after_queue_sends_counts_them(broker, qname):
    c = broker.client()
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}", receipt=False)
    assert c.count_msgs(qname) == 3


# --- errors --------------------------------------------------------------------------------------

def test_error_frame_has_message_receipt_id_body_content_length_then_close(broker):
    c = broker.client()
    c.send_frame("SEND", {"destination": "/bogus/x", "receipt": "bad-1"}, "x")
    frames = c.expect_closed()
    assert [f.command for f in frames] == ["ERROR"], frames
    err = frames[0]
    assert err.get("message"), err
    assert err["receipt-id"] == "bad-1"
    assert err.body.strip(), err
    assert err["content-length"] == str(len(err.body))


def test_error_without_receipt_has_no_receipt_id(broker):
    c = broker.client()
    c.send_frame("SEND", {"destination": "/bogus/x"}, "x")
    err = c.expect_error()
    assert "receipt-id" not in err
    assert err.get("message")


def test_an_error_does_not_affect_other_connections(broker, qname):
    a = broker.client()
    b = broker.client()
    b.subscribe(f"/queue/{qname}")
    a.send_frame("SEND", {"destination": "/bogus/x"}, "x")
    a.expect_error()
    b.send(f"/queue/{qname}", "fine")
    assert b.message().body == b"fine"


# --- login ---------------------------------------------------------------------------------------

@pytest.fixture
def auth_broker(start_broker):
    return start_broker("-login", "alice", "-passcode", "s3cret")


@pytest.mark.parametrize("version", [None, "1.1", "1.2"])
def test_right_credentials_are_connected(auth_broker, version):
    f = auth_broker.raw_client().hello(version, login="alice", passcode="s3cret")
    assert f.command == "CONNECTED", f


@pytest.mark.parametrize("creds", [
    {}, {"login": "alice"}, {"passcode": "s3cret"},
    {"login": "alice", "passcode": "wrong"}, {"login": "bob", "passcode": "s3cret"},
], ids=["missing", "no-passcode", "no-login", "wrong-passcode", "wrong-login"])
def test_wrong_or_missing_credentials_get_error_and_close(auth_broker, creds):
    c = auth_broker.raw_client()
    err = c.hello("1.2", **creds)
    assert err.command == "ERROR", err
    c.expect_closed()
    assert err.get("message")


def test_connect_headers_are_not_unescaped(start_broker):
    b = start_broker("-login", "a\\cb", "-passcode", "p")
    f = b.raw_client().hello("1.2", login="a\\cb", passcode="p")
    assert f.command == "CONNECTED", f


def test_open_broker_accepts_any_credentials(broker):
    f = broker.raw_client().hello("1.2", login="whoever", passcode="whatever")
    assert f.command == "CONNECTED", f


# --- connection life -----------------------------------------------------------------------------

def test_first_frame_must_be_connect(broker, qname):
    c = broker.raw_client()
    c.send_frame("SEND", {"destination": f"/queue/{qname}", "receipt": "r1"}, "sneaky")
    frames = c.expect_closed()
    assert all(f.command == "ERROR" for f in frames), frames
    assert broker.client().count_msgs(qname) == 0


def test_second_connect_is_an_error(broker):
    c = broker.client()
    c.send_frame("CONNECT", {"accept-version": "1.2", "host": "h"})
    c.expect_error()


def test_connect_must_complete_within_10_seconds(broker):
    silent = broker.raw_client()
    trickle = broker.raw_client()
    data = encode_frame("CONNECT", {"accept-version": "1.2", "host": "h" * 40})
    closed = {"silent": False, "trickle": False}
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 14 and not all(closed.values()):
        if not closed["trickle"]:
            try:
                trickle.send_raw(data[i:i + 1])
                i += 1
            except OSError:
                closed["trickle"] = True
        for name, c in (("silent", silent), ("trickle", trickle)):
            if not closed[name] and c.is_closed(0.25):
                closed[name] = True
    assert i < len(data), "test bug: the CONNECT was sent completely"
    assert closed == {"silent": True, "trickle": True}
    assert time.monotonic() - t0 > 8, "closed long before the 10 s deadline"


def test_message_and_error_always_carry_content_length(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    c.send(f"/queue/{qname}", b"", content_length=False)
    c.send(f"/queue/{qname}", b"abc", content_length=False)
    m1, m2 = c.messages(2)
    assert m1["content-length"] == "0" and m1.body == b""
    assert m2["content-length"] == "3" and m2.body == b"abc"


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_outgoing_frames_end_with_nul_then_newline(broker, qname, version):
    c = broker.client(version)
    c.subscribe(f"/queue/{qname}")
    c.send(f"/queue/{qname}", "x")
    c.message()
    c.expect_nothing(0.3)
    c.send_frame("SEND", {"destination": "/bogus"}, "x")
    c.expect_error()
    # CONNECTED, RECEIPT (subscribe), RECEIPT (send), MESSAGE, ERROR
    assert len(c.after_nul) == 5, c.after_nul
    assert c.after_nul == [b"\n"] * 5, c.after_nul


# ============================================================================================
# §4 Destinations
# ============================================================================================

@pytest.mark.both_backends
def test_queue_message_goes_to_exactly_one_subscriber(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}")
    b.subscribe(f"/queue/{qname}")
    a.send(f"/queue/{qname}", "only once")
    got = collect([a, b], 1)
    assert got[0][1].body == b"only once"
    a.expect_nothing()
    b.expect_nothing()


@pytest.mark.both_backends
def test_queue_message_is_stored_until_a_subscriber_comes(broker, qname):
    broker.client().send(f"/queue/{qname}", "waiting")
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    assert c.message().body == b"waiting"


def test_topic_message_reaches_fifty_subscribers_once_each(broker, qname):
    subs = [broker.client() for _ in range(50)]
    for s in subs:
        s.subscribe(f"/topic/{qname}")
    broker.client().send(f"/topic/{qname}", "fan out")
    for s in subs:
        assert s.message().body == b"fan out"
    for s in subs[:5]:
        s.expect_nothing(0.1)


def test_topic_message_is_broadcast_to_every_subscriber(broker, qname):
    subs = [broker.client(v) for v in ("1.0", "1.1", "1.2")]
    for s in subs:
        s.subscribe(f"/topic/{qname}")
    broker.client().send(f"/topic/{qname}", "to all")
    for s in subs:
        m = s.message()
        assert m.body == b"to all"
        assert m["destination"] == f"/topic/{qname}"
        s.expect_nothing(0.2)


def test_topic_prefix_subscription_receives_every_matching_topic(broker, qname):
    c = broker.client()
    sid = c.subscribe(f"/topic/{qname}.foo*")
    p = broker.client()
    for name in ("foobar", "fo", "foo", "bar", "foo.baz", "xfoo"):
        p.send(f"/topic/{qname}.{name}", name)
    got = c.messages(3)
    assert [m.body for m in got] == [b"foobar", b"foo", b"foo.baz"]
    assert [m["destination"] for m in got] == [f"/topic/{qname}.{n}" for n in ("foobar", "foo", "foo.baz")]
    assert all(m["subscription"] == sid for m in got)
    c.expect_nothing()


def test_queue_subscription_does_not_get_topic_messages_of_the_same_name(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    c.send(f"/topic/{qname}", "topic")
    c.expect_nothing()


@pytest.mark.parametrize("command,destination", [
    ("SEND", "/bogus/{q}"),
    ("SEND", "queue/{q}"),
    ("SEND", "/queue/"),
    ("SEND", "/topic/"),
    ("SEND", "/topic/{q}*"),
    ("SEND", "/queue/{q}*"),
    ("SEND", ""),
    ("SUBSCRIBE", "/bogus/{q}"),
    ("SUBSCRIBE", "/queue/"),
    ("SUBSCRIBE", "/topic/"),
    ("SUBSCRIBE", "/control/count-msgs/queue/{q}"),
    ("SUBSCRIBE", "/control/count-subscribers/queue/{q}"),
])
def test_bad_destination_is_an_error(broker, qname, command, destination):
    c = broker.client()
    h = {"destination": destination.format(q=qname), "receipt": "r-bad"}
    if command == "SUBSCRIBE":
        h["id"] = "s1"
    c.send_frame(command, h, "x" if command == "SEND" else b"")
    err = c.expect_error()
    assert err.get("receipt-id") == "r-bad", err


@pytest.mark.parametrize("command", ["SEND", "SUBSCRIBE"])
def test_missing_destination_is_an_error(broker, command):
    c = broker.client()
    c.send_frame(command, {"id": "s1", "receipt": "r-bad"})
    assert c.expect_error().get("receipt-id") == "r-bad"


# ============================================================================================
# §5 SEND
# ============================================================================================

@pytest.mark.both_backends
def test_higher_priority_is_delivered_first_fifo_within_a_priority(broker, qname):
    c = broker.client()
    sent = [("a", 0), ("b", 5), ("c", -3), ("d", 5), ("e", 0), ("f", 10), ("g", -3), ("h", None),
            ("i", -100)]
    for body, prio in sent:
        c.send(f"/queue/{qname}", body, priority=prio)
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    got = [m.body.decode() for m in c.messages(len(sent))]
    assert got == ["f", "b", "d", "a", "e", "h", "c", "g", "i"]


@pytest.mark.both_backends
def test_fifo_order_within_default_priority(broker, qname):
    c = broker.client()
    for i in range(30):
        c.send(f"/queue/{qname}", str(i), receipt=(i % 7 == 0))
    barrier(c)
    c.subscribe(f"/queue/{qname}")
    assert [int(m.body) for m in c.messages(30)] == list(range(30))


CUSTOM = {"content-type": "text/plain;charset=utf-8", "correlation-id": "corr-42",
          "reply-to": "/queue/replies", "x-custom": "custom value", "persistent": "true"}


def _assert_custom_headers(m):
    for k, v in CUSTOM.items():
        assert m.get(k) == v, f"{k} not kept: {m!r}"


@pytest.mark.parametrize("kind", ["queue", "topic"])
def test_custom_headers_are_delivered_on_message(broker, qname, kind):
    c = broker.client()
    c.subscribe(f"/{kind}/{qname}")
    c.send(f"/{kind}/{qname}", "x", headers=CUSTOM)
    _assert_custom_headers(c.message())


@pytest.mark.both_backends
@pytest.mark.parametrize("how", ["clean", "kill9"])
def test_custom_headers_survive_a_restart(broker, qname, how):
    c = broker.client()
    c.send(f"/queue/{qname}", "x", headers=CUSTOM, priority=3)
    if how == "clean":
        broker.restart()
    else:
        broker.kill9()
        broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    m = c.message()
    assert m.body == b"x"
    _assert_custom_headers(m)


def test_a_sender_cannot_forge_the_brokers_message_headers(broker, qname):
    c = broker.client("1.2")
    sid = c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "x", headers={"message-id": "forged", "subscription": "forged",
                                            "ack": "forged", "redelivered": "true"})
    m = c.message()
    assert m["message-id"] != "forged"
    assert m["subscription"] == sid
    assert m["ack"] == m["message-id"]
    assert m.get("redelivered") != "true", "a first delivery claims to be redelivered"
    c.ack(m)
    assert c.count_msgs(qname) == 0


def test_a_1_0_subscriber_gets_no_injected_headers(broker, qname):
    sub = broker.client("1.0")
    sub.subscribe(f"/queue/{qname}")
    c = broker.client("1.2")
    c.send_raw(f"SEND\ndestination:/queue/{qname}\nx-evil:a\\nforged:1\\n\\nbody\nreceipt:r1\n\nreal\x00"
               .encode())
    c.receipt("r1")
    m = sub.message()
    assert "forged" not in m, m
    assert "x-evil" in m
    assert m.body == b"real"
    sub.expect_nothing(0.2)


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize("ack", ["auto", "client", "client-individual"])
def test_message_has_message_id_destination_subscription_and_content_length(broker, qname, version, ack):
    c = broker.client(version)
    sid = c.subscribe(f"/queue/{qname}", ack=ack)
    c.send(f"/queue/{qname}", "hello")
    m = c.message()
    assert m.get("message-id"), m
    assert m["destination"] == f"/queue/{qname}"
    assert m["subscription"] == sid
    assert m["content-length"] == "5"
    assert m.get("redelivered") != "true"
    if version == "1.2" and ack != "auto":
        assert m["ack"] == m["message-id"], m


def test_message_ids_are_distinct(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    for i in range(10):
        c.send(f"/queue/{qname}", str(i))
    ids = [m["message-id"] for m in c.messages(10)]
    assert len(set(ids)) == 10


@pytest.mark.both_backends
def test_redelivered_message_has_redelivered_true_and_the_same_message_id(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "again")
    m1 = c.message()
    c.nack(m1)
    m2 = c.message()
    assert m2["redelivered"] == "true"
    assert m2["message-id"] == m1["message-id"]
    assert m2.body == b"again"


@pytest.mark.both_backends
@pytest.mark.parametrize("how", ["clean", "kill9"])
def test_message_id_is_kept_across_a_restart(broker, qname, how):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client")
    c.send(f"/queue/{qname}", "keep my id")
    m1 = c.message()
    if how == "clean":
        broker.restart()
    else:
        broker.kill9()
        broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client")
    m2 = c.message()
    assert m2["message-id"] == m1["message-id"]
    assert m2.body == b"keep my id"


def test_topic_send_is_not_stored(broker, qname):
    c = broker.client()
    c.send(f"/topic/{qname}", "gone")
    c.subscribe(f"/topic/{qname}")
    c.expect_nothing()


@pytest.mark.parametrize("kind", ["queue", "topic"])
def test_a_one_megabyte_binary_body_works(broker, qname, kind):
    c = broker.client()
    c.subscribe(f"/{kind}/{qname}")
    body = bytes(range(256)) * 4096
    c.send(f"/{kind}/{qname}", body)
    m = c.message(timeout=15)
    assert m["content-length"] == str(len(body))
    assert m.body == body


@pytest.mark.both_backends
def test_receipted_queue_send_survives_kill_9(broker, qname):
    c = broker.client()
    c.send(f"/queue/{qname}", "durable", headers={"x-k": "v"})
    broker.kill9()
    broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    m = c.message()
    assert m.body == b"durable"
    assert m["x-k"] == "v"


@pytest.mark.both_backends
def test_receipted_send_in_the_turn_that_refills_a_window_survives_kill_9(broker, qname):
    """A queue whose in-memory window is full keeps new messages in the store; the ACK that
    empties the window makes the broker read them back in the same turn as a receipted SEND.
    That SEND's RECEIPT still means synced: it survives a kill -9 right after."""
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=1)
    big = b"b" * (1024 * 1024)
    for i in range(10):                        # 8 MiB fill the window; the rest wait in store
        c.send(f"/queue/{qname}", big, receipt=False, headers={"x-n": str(i)})
    for i in range(8):
        m = c.message(timeout=10)
        assert m["x-n"] == str(i)
        c.ack(m, receipt=False)
    last = c.message(timeout=10)               # the window's last one: its ACK refills it
    c.send_raw(encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": "x"}, "after")
               + encode_frame("ACK", {"id": last["ack"]}))
    c.receipt("x")
    broker.kill9()
    broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    bodies = [m.body for m in c.messages(2, timeout=10)]
    assert b"after" in bodies, bodies


@pytest.mark.both_backends
def test_many_receipted_sends_pipelined_survive_kill_9(broker, qname):
    c = broker.client()
    c.send_raw(b"".join(encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": f"p{i}"},
                                     f"m{i}") for i in range(50)))
    for i in range(50):
        c.receipt(f"p{i}")
    broker.kill9()
    broker.start()
    c = broker.client()
    assert c.count_msgs(qname) == 50
    c.subscribe(f"/queue/{qname}")
    assert [m.body for m in c.messages(50)] == [f"m{i}".encode() for i in range(50)]


@pytest.mark.both_backends
def test_every_receipted_send_survives_a_kill_9_in_mid_stream(broker, qname):
    c = broker.client()
    n = 400
    c.send_raw(b"".join(encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": f"k{i}"},
                                     f"m{i}") for i in range(n)))
    receipted = set()
    while len(receipted) < 50:
        receipted.add(c.expect("RECEIPT")["receipt-id"])
    broker.kill9(close_clients=False)
    try:                                      # receipts already on their way count too
        while True:
            receipted.add(c.expect("RECEIPT", timeout=1)["receipt-id"])
    except AssertionError:                    # closed (or nothing more)
        pass
    broker.close_clients()
    broker.start()
    c = broker.client()
    stored = c.count_msgs(qname)
    assert stored >= len(receipted)
    c.subscribe(f"/queue/{qname}")
    bodies = {m.body.decode() for m in c.messages(stored)}
    missing = {r for r in receipted if "m" + r[1:] not in bodies}
    assert not missing, f"receipted but lost after kill -9: {sorted(missing)[:10]}"


@pytest.mark.both_backends
@pytest.mark.parametrize("how", ["clean", "kill9"])
def test_priority_order_survives_a_restart(broker, qname, how):
    c = broker.client()
    for body, prio in (("a", 0), ("b", 7), ("c", -2), ("d", 7), ("e", 3)):
        c.send(f"/queue/{qname}", body, priority=prio)
    if how == "clean":
        broker.restart()
    else:
        broker.kill9()
        broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    assert [m.body for m in c.messages(5)] == [b"b", b"d", b"e", b"a", b"c"]


@pytest.mark.both_backends
def test_queue_names_and_bodies_are_kept_exactly_across_a_restart(broker):
    names = ["with space", "ünïcödé-名前", "a.b/c", "x" * 200]
    c = broker.client()
    for name in names:
        c.send(f"/queue/{name}", name.encode() + b"\x00\xff", content_length=True)
    c.send(f"/queue/empty-{names[0]}", b"")
    broker.kill9()
    broker.start()
    c = broker.client()
    for name in names:
        c.subscribe(f"/queue/{name}")
        m = c.message()
        assert m["destination"] == f"/queue/{name}"
        assert m.body == name.encode() + b"\x00\xff"
    c.subscribe(f"/queue/empty-{names[0]}")
    assert c.message().body == b""


@pytest.mark.both_backends
def test_a_backlog_split_between_disk_and_cache_is_delivered_in_order(start_broker, qname):
    b = start_broker("-maxmsgs", "10", "-flush-period", "600", "-max-prefetch", "1000")
    c = b.client()
    expected = []
    for i in range(120):
        prio = (i * 7) % 3
        c.send(f"/queue/{qname}", f"m{i}", receipt=(i % 5 == 0), priority=prio)
        expected.append((-prio, i))
    barrier(c)
    assert c.count_msgs(qname) == 120
    c.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=1000)
    got = [m.body.decode() for m in c.messages(120)]
    assert got == [f"m{i}" for _, i in sorted(expected)]
    c.expect_nothing()


@pytest.mark.both_backends
def test_a_thousand_stored_messages_are_all_delivered_after_a_restart(broker, qname):
    c = broker.client()
    c.send_raw(b"".join(encode_frame("SEND", {"destination": f"/queue/{qname}"}, f"m{i}")
                        for i in range(1000)))
    barrier(c)
    broker.restart()
    c = broker.client()
    assert c.count_msgs(qname) == 1000
    c.subscribe(f"/queue/{qname}", ack="client", prefetch=50)
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 1000:
        batch = [c.message(timeout=max(0.1, deadline - time.monotonic())) for _ in range(50)]
        got += batch
        c.ack(batch[-1])                     # cumulative: frees the whole batch
    assert [m.body for m in got] == [f"m{i}".encode() for i in range(1000)]
    assert c.count_msgs(qname) == 0


def _read_acking(c, n, batch=100, limit=60.0):
    """Read n messages of a client-mode subscription, ACKing (cumulatively) every `batch`."""
    got = []
    deadline = time.monotonic() + limit
    while len(got) < n:
        m = c.message(timeout=max(0.1, deadline - time.monotonic()))
        got.append(m)
        if len(got) % batch == 0 or len(got) == n:
            c.ack(m)
    return got


@pytest.mark.both_backends
@pytest.mark.parametrize("stored_first", [False, True], ids=["live", "stored"])
def test_a_long_backlog_streams_in_order_and_a_late_urgent_message_jumps_it(broker, qname, stored_first):
    n = 2600                                  # longer than the broker can sensibly keep in a window
    c = broker.client()
    p = broker.client()
    if not stored_first:
        c.subscribe(f"/queue/{qname}", ack="client", prefetch=100)
    for i in range(0, n, 200):
        p.send_raw(b"".join(encode_frame("SEND", {"destination": f"/queue/{qname}"}, f"m{j}")
                            for j in range(i, i + 200)))
    barrier(p)
    if stored_first:
        c.subscribe(f"/queue/{qname}", ack="client", prefetch=100)
    first = c.messages(100)
    p.send(f"/queue/{qname}", "urgent", priority=9)
    c.ack(first[-1])
    rest = _read_acking(c, n + 1 - 100)
    bodies = [m.body.decode() for m in first + rest]
    assert bodies[:100] == [f"m{i}" for i in range(100)]
    assert bodies[100] == "urgent"
    assert bodies[101:] == [f"m{i}" for i in range(100, n)]
    c.expect_nothing()
    assert p.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_unreceipted_sends_reach_disk_at_the_flush_period(start_broker, qname):
    b = start_broker("-flush-period", "0.2")
    c = b.client()
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}", receipt=False)
    barrier(c)
    time.sleep(1.5)
    b.kill9()
    b.start()
    c = b.client()
    c.subscribe(f"/queue/{qname}")
    assert [m.body for m in c.messages(3)] == [b"m0", b"m1", b"m2"]


@pytest.mark.both_backends
def test_unreceipted_sends_reach_disk_when_more_than_maxmsgs_are_cached(start_broker, qname):
    b = start_broker("-flush-period", "600", "-maxmsgs", "5")
    c = b.client()
    for i in range(10):
        c.send(f"/queue/{qname}", f"m{i}", receipt=False)
        barrier(c)
    time.sleep(0.5)
    b.kill9()
    b.start()
    c = b.client()
    n = c.count_msgs(qname)
    assert 6 <= n <= 10, n


@pytest.mark.both_backends
def test_a_receipted_cumulative_ack_is_durable(broker, qname):
    c = broker.client()
    for i in range(5):
        c.send(f"/queue/{qname}", f"m{i}", receipt=False)
    c.send(f"/queue/{qname}", "last")
    c.subscribe(f"/queue/{qname}", ack="client")
    got = c.messages(6)
    c.ack(got[4])
    broker.kill9()
    broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    assert c.message().body == b"last"
    c.expect_nothing()


@pytest.mark.both_backends
def test_every_receipt_sent_before_sigterm_is_kept(broker, qname):
    c = broker.client()
    n = 300
    c.send_raw(b"".join(encode_frame("SEND", {"destination": f"/queue/{qname}", "receipt": f"k{i}"},
                                     f"m{i}") for i in range(n)))
    receipted = {c.expect("RECEIPT")["receipt-id"] for _ in range(20)}
    broker.proc.send_signal(signal.SIGTERM)
    try:
        while True:
            receipted.add(c.expect("RECEIPT", timeout=3)["receipt-id"])
    except AssertionError:
        pass
    assert broker.terminate() == 0
    broker.close_clients()
    broker.start()
    c = broker.client()
    stored = c.count_msgs(qname)
    c.subscribe(f"/queue/{qname}")
    bodies = {m.body.decode() for m in c.messages(stored)}
    missing = {r for r in receipted if "m" + r[1:] not in bodies}
    assert not missing, f"receipted but lost after SIGTERM: {sorted(missing)[:10]}"


@pytest.mark.both_backends
def test_acked_message_is_not_redelivered_after_kill_9(broker, qname):
    c = broker.client()
    c.send(f"/queue/{qname}", "one")
    c.send(f"/queue/{qname}", "two")
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    m1, m2 = c.messages(2)
    c.ack(m1)
    broker.kill9()
    broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    assert c.message().body == b"two"
    c.expect_nothing()


@pytest.mark.both_backends
def test_auto_acked_message_is_not_redelivered_after_a_clean_restart(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    c.send(f"/queue/{qname}", "consumed")
    c.message()
    barrier(c)
    broker.restart()
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    c.expect_nothing()


@pytest.mark.both_backends
def test_message_sent_and_acked_before_a_flush_is_gone_after_restart(start_broker, qname):
    b = start_broker("-flush-period", "600")
    c = b.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "short-lived", receipt=False)
    c.ack(c.message())
    b.restart()
    c = b.client()
    assert c.count_msgs(qname) == 0
    c.subscribe(f"/queue/{qname}")
    c.expect_nothing()


# ============================================================================================
# §6 SUBSCRIBE / UNSUBSCRIBE
# ============================================================================================

@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize("ack", ["auto", "client", "client-individual"])
def test_every_ack_mode_is_accepted_in_every_version(broker, qname, version, ack):
    c = broker.client(version)
    c.subscribe(f"/queue/{qname}", ack=ack)


def test_absent_ack_header_means_auto(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack=None)
    c.send(f"/queue/{qname}", "x")
    c.message()
    assert wait_until(lambda: c.count_msgs(qname) == 0)


@pytest.mark.parametrize("ack", ["bogus", "Client", "AUTO", ""])
def test_invalid_ack_mode_is_an_error(broker, qname, ack):
    c = broker.client()
    c.send_frame("SUBSCRIBE", {"destination": f"/queue/{qname}", "id": "s1", "ack": ack,
                               "receipt": "r1"})
    assert c.expect_error().get("receipt-id") == "r1"


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_subscription_id_is_required_in_1_1_and_later(broker, qname, version):
    c = broker.client(version)
    c.send_frame("SUBSCRIBE", {"destination": f"/queue/{qname}", "receipt": "r1"})
    assert c.expect_error().get("receipt-id") == "r1"


def test_subscription_id_defaults_to_the_destination_in_1_0(broker, qname):
    c = broker.client("1.0")
    c.subscribe(f"/queue/{qname}", id=None)
    c.send(f"/queue/{qname}", "x")
    assert c.message()["subscription"] == f"/queue/{qname}"


def test_unsubscribe_by_destination_in_1_0(broker, qname):
    c = broker.client("1.0")
    c.subscribe(f"/queue/{qname}", id=None)
    c.unsubscribe(destination=f"/queue/{qname}")
    c.send(f"/queue/{qname}", "x")
    c.expect_nothing()
    assert c.count_msgs(qname) == 1


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_unsubscribe_by_id(broker, qname, version):
    c = broker.client(version)
    sid = c.subscribe(f"/topic/{qname}")
    c.unsubscribe(id=sid)
    c.send(f"/topic/{qname}", "x")
    c.expect_nothing()


@pytest.mark.both_backends
def test_prefetch_limits_unacked_messages(broker, qname):
    c = broker.client()
    for i in range(5):
        c.send(f"/queue/{qname}", f"m{i}")
    c.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=2)
    first = c.messages(2)
    c.expect_nothing()
    c.ack(first[0])
    third = c.message()
    c.expect_nothing()
    assert [m.body for m in first + [third]] == [b"m0", b"m1", b"m2"]
    c.nack(first[1])
    assert c.message().body == b"m1"


@pytest.mark.parametrize("prefetch", [None, "10", "0", "-1", "99999999999999999999999"])
def test_max_prefetch_caps_and_defaults_the_prefetch(start_broker, qname, prefetch):
    b = start_broker("-max-prefetch", "3")
    c = b.client()
    for i in range(6):
        c.send(f"/queue/{qname}", f"m{i}")
    c.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=prefetch)
    c.messages(3)
    c.expect_nothing()


def test_prefetch_applies_to_queue_not_topic_messages(broker, qname):
    c = broker.client()
    c.subscribe(f"/topic/{qname}", ack="client-individual", prefetch=1)
    for i in range(3):
        c.send(f"/topic/{qname}", f"t{i}")
    assert [m.body for m in c.messages(3)] == [b"t0", b"t1", b"t2"]


@pytest.mark.both_backends
def test_cumulative_ack_frees_every_prefetch_slot_it_acks(broker, qname):
    c = broker.client()
    for i in range(6):
        c.send(f"/queue/{qname}", f"m{i}")
    c.subscribe(f"/queue/{qname}", ack="client", prefetch=2)
    first = c.messages(2)
    c.expect_nothing()
    c.ack(first[1])
    assert [m.body for m in c.messages(2)] == [b"m2", b"m3"]
    c.expect_nothing()


@pytest.mark.both_backends
def test_ready_subscriptions_are_served_round_robin(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", ack="client-individual")
    b.subscribe(f"/queue/{qname}", ack="client-individual")
    p = broker.client()
    for i in range(10):
        p.send(f"/queue/{qname}", str(i))
    got = collect([a, b], 10)
    per = {id(a): 0, id(b): 0}
    for c, _ in got:
        per[id(c)] += 1
    assert sorted(per.values()) == [5, 5], per


@pytest.mark.both_backends
def test_a_full_subscription_is_skipped(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=1)
    p = broker.client()
    p.send(f"/queue/{qname}", "first")
    assert a.message().body == b"first"
    b.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=10)
    for i in range(3):
        p.send(f"/queue/{qname}", f"more{i}")
    assert [m.body for m in b.messages(3)] == [b"more0", b"more1", b"more2"]
    a.expect_nothing()


@pytest.mark.both_backends
def test_stored_messages_are_delivered_at_subscribe_in_priority_order(broker, qname):
    c = broker.client()
    for body, prio in (("low", 1), ("high", 9), ("mid", 5)):
        c.send(f"/queue/{qname}", body, priority=prio)
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    assert [m.body for m in c.messages(3)] == [b"high", b"mid", b"low"]


def test_two_1_0_subscriptions_to_one_destination_without_id_are_a_duplicate(broker, qname):
    c = broker.client("1.0")
    c.subscribe(f"/queue/{qname}", id=None)
    c.send_frame("SUBSCRIBE", {"destination": f"/queue/{qname}", "receipt": "r2"})
    assert c.expect_error().get("receipt-id") == "r2"


def test_duplicate_subscription_id_is_an_error(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", id="dup")
    c.send_frame("SUBSCRIBE", {"destination": f"/topic/{qname}", "id": "dup", "receipt": "r2"})
    assert c.expect_error().get("receipt-id") == "r2"


def test_topic_message_is_delivered_once_per_matching_subscription(broker, qname):
    c = broker.client()
    s1 = c.subscribe(f"/topic/{qname}.a")
    s2 = c.subscribe(f"/topic/{qname}.a")
    s3 = c.subscribe(f"/topic/{qname}.*")
    c.send(f"/topic/{qname}.a", "x")
    got = c.messages(3)
    assert sorted(m["subscription"] for m in got) == sorted([s1, s2, s3])
    c.expect_nothing()


@pytest.mark.both_backends
def test_two_queue_subscriptions_on_one_connection_share_the_queue(broker, qname):
    c = broker.client()
    s1 = c.subscribe(f"/queue/{qname}", ack="client-individual")
    s2 = c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "1")
    c.send(f"/queue/{qname}", "2")
    got = c.messages(2)
    assert sorted(m["subscription"] for m in got) == sorted([s1, s2])
    c.expect_nothing()


@pytest.mark.both_backends
def test_unsubscribe_returns_unacked_messages_to_the_queue_at_once(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", id="sa", ack="client")
    a.send(f"/queue/{qname}", "m")
    m1 = a.message()
    b.subscribe(f"/queue/{qname}", ack="client")
    b.expect_nothing(0.3)
    a.unsubscribe(id="sa")
    m2 = b.message(timeout=2)
    assert m2["message-id"] == m1["message-id"]
    assert m2["redelivered"] == "true"
    a.expect_nothing()


def test_no_message_for_a_subscription_after_its_unsubscribe_receipt(broker, qname):
    c = broker.client()
    c.subscribe(f"/topic/{qname}", id="gone")
    p = broker.client()
    p.send_raw(b"".join(encode_frame("SEND", {"destination": f"/topic/{qname}"}, f"t{i}")
                        for i in range(300)))
    c.message()                               # the flood has started
    c.unsubscribe(id="gone")
    c.backlog.clear()                         # what came before the RECEIPT is allowed
    c.expect_nothing()


def test_unsubscribed_subscription_gets_nothing_more(broker, qname):
    c = broker.client()
    sid = c.subscribe(f"/queue/{qname}")
    c.unsubscribe(id=sid)
    c.send(f"/queue/{qname}", "x")
    c.expect_nothing()
    assert c.count_msgs(qname) == 1


# ============================================================================================
# §7 ACK, NACK, ack-timeout, failures
# ============================================================================================

@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize("by", ["id", "message-id"])
def test_ack_by_id_or_message_id_is_accepted_in_every_version(broker, qname, version, by):
    c = broker.client(version)
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "x")
    c.ack(c.message(), by=by)
    assert c.count_msgs(qname) == 0
    c.close()
    d = broker.client()
    d.subscribe(f"/queue/{qname}")
    d.expect_nothing()


@pytest.mark.both_backends
@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_client_mode_ack_is_cumulative_in_1_1_and_later(broker, qname, version):
    c = broker.client(version)
    c.subscribe(f"/queue/{qname}", ack="client")
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}")
    m0, m1, m2 = c.messages(3)
    c.ack(m1)
    assert c.count_msgs(qname) == 1
    c.close()
    d = broker.client()
    d.subscribe(f"/queue/{qname}")
    assert d.message()["message-id"] == m2["message-id"]
    d.expect_nothing()


@pytest.mark.both_backends
@pytest.mark.parametrize("version,ack", [("1.0", "client"), ("1.0", "client-individual"),
                                         ("1.1", "client-individual"), ("1.2", "client-individual")])
def test_ack_acknowledges_one_message_in_client_individual_and_1_0_client_mode(broker, qname, version, ack):
    c = broker.client(version)
    c.subscribe(f"/queue/{qname}", ack=ack)
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}")
    m0, m1, m2 = c.messages(3)
    c.ack(m1)
    assert c.count_msgs(qname) == 2
    c.close()
    d = broker.client()
    d.subscribe(f"/queue/{qname}", ack="client-individual")
    got = d.messages(2)
    assert sorted(m["message-id"] for m in got) == sorted([m0["message-id"], m2["message-id"]])
    d.expect_nothing()


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_ack_of_an_unknown_id_is_ignored_but_receipted(broker, qname, version):
    c = broker.client(version)
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "x")
    c.message()
    c.request("ACK", {"id": "no-such-id", "message-id": "no-such-id"})
    assert c.count_msgs(qname) == 1


@pytest.mark.both_backends
def test_a_connection_cannot_ack_another_connections_delivery(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", ack="client-individual")
    a.send(f"/queue/{qname}", "x")
    m = a.message()
    b.ack(m)
    assert b.count_msgs(qname) == 1
    a.ack(m)
    assert b.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_auto_mode_counts_a_delivered_message_as_acked(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="auto")
    c.send(f"/queue/{qname}", "x")
    c.message()
    assert wait_until(lambda: c.count_msgs(qname) == 0)
    c.close()
    d = broker.client()
    d.subscribe(f"/queue/{qname}")
    d.expect_nothing()


@pytest.mark.both_backends
@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_nack_returns_the_message_for_redelivery(broker, qname, version):
    c = broker.client(version)
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "x")
    m1 = c.message()
    c.nack(m1)
    m2 = c.message()
    assert m2["message-id"] == m1["message-id"]
    assert m2["redelivered"] == "true"
    c.ack(m2)
    assert c.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_nack_in_client_mode_is_cumulative(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client")
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}")
    m0, m1, m2 = c.messages(3)
    c.nack(m1)
    again = c.messages(2)
    assert sorted(m["message-id"] for m in again) == sorted([m0["message-id"], m1["message-id"]])
    assert all(m["redelivered"] == "true" for m in again)
    c.expect_nothing()


@pytest.mark.both_backends
def test_ack_after_the_delivery_was_taken_back_is_ignored(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", id="sa", ack="client-individual")
    a.send(f"/queue/{qname}", "x")
    m1 = a.message()
    a.unsubscribe(id="sa")          # taken back, nobody else subscribed yet
    a.ack(m1)                        # stale: ignored
    assert a.count_msgs(qname) == 1
    b.subscribe(f"/queue/{qname}", ack="client-individual")
    assert b.message()["message-id"] == m1["message-id"]


@pytest.mark.both_backends
def test_ack_timeout_sends_the_message_to_another_subscriber(broker, qname):
    a, b, p = broker.client(), broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", ack="client-individual")
    b.subscribe(f"/queue/{qname}", ack="client-individual")
    p.send(f"/queue/{qname}", "slow", headers={"ack-timeout": "1.0"})
    ((first, m1),) = collect([a, b], 1)
    other = b if first is a else a
    m2 = other.message(timeout=5)
    assert m2["message-id"] == m1["message-id"]
    assert m2["redelivered"] == "true"
    first.ack(m1)                    # too late: ignored
    assert p.count_msgs(qname) == 1
    other.ack(m2)
    assert p.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_ack_timeout_redelivers_to_the_same_subscriber_when_it_is_the_only_one(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "slow", headers={"ack-timeout": "0.5"})
    m1 = c.message()
    m2 = c.message(timeout=5)
    assert m2["message-id"] == m1["message-id"]
    assert m2["redelivered"] == "true"


@pytest.mark.both_backends
def test_a_message_acked_within_its_ack_timeout_is_not_redelivered(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "quick", headers={"ack-timeout": "0.4"})
    c.ack(c.message())
    c.expect_nothing(1.2)
    assert c.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_ack_timeout_applies_again_after_a_redelivery(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "slow", headers={"ack-timeout": "0.4"})
    ids = {m["message-id"] for m in c.messages(3, timeout=5)}
    assert len(ids) == 1


def test_ack_timeout_counts_from_the_latest_delivery(broker, qname):
    """A NACKed and redelivered message gets its whole ack-timeout again: the first
    delivery's deadline must not take the second delivery back early."""
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "slow", headers={"ack-timeout": "1.6"})
    first = c.message()
    time.sleep(0.8)
    c.nack(first)
    again = c.message()
    assert again["message-id"] == first["message-id"]
    assert c.try_message(timeout=1.2) is None, "taken back by the first delivery's deadline"
    third = c.message(timeout=3)
    assert third["message-id"] == first["message-id"]


@pytest.mark.both_backends
def test_a_returned_message_keeps_its_priority(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=1)
    c.send(f"/queue/{qname}", "high", priority=9)
    m = c.message()
    for i in range(3):
        c.send(f"/queue/{qname}", f"low{i}", priority=1)
    c.nack(m)
    assert c.message().body == b"high"


def test_ack_of_a_topic_message_is_harmless(broker, qname):
    c = broker.client()
    c.subscribe(f"/topic/{qname}", ack="client-individual")
    c.send(f"/topic/{qname}", "t")
    c.ack(c.message())
    c.send(f"/topic/{qname}", "t2")
    assert c.message().body == b"t2"


@pytest.mark.both_backends
def test_without_ack_timeout_the_broker_waits_for_the_ack(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", ack="client-individual")
    a.send(f"/queue/{qname}", "patient")
    a.message()
    b.subscribe(f"/queue/{qname}", ack="client-individual")
    a.expect_nothing(1.5)
    b.expect_nothing(0.1)


@pytest.mark.both_backends
@pytest.mark.parametrize("how", ["disconnect", "close", "reset", "error", "heart-beat-loss"])
def test_a_closed_connections_unacked_messages_go_to_other_subscribers_at_once(broker, qname, how):
    a = broker.client(heart_beat="1000,0" if how == "heart-beat-loss" else "0,0")
    a.subscribe(f"/queue/{qname}", ack="client")
    b = broker.client()
    b.send(f"/queue/{qname}", "m0")
    b.send(f"/queue/{qname}", "m1")
    sent = a.messages(2)
    b.subscribe(f"/queue/{qname}", ack="client-individual")
    b.expect_nothing(0.2)
    if how == "disconnect":
        a.disconnect()
    elif how == "close":
        a.close()
    elif how == "reset":
        a.drop()
    elif how == "error":
        a.send_frame("SEND", {"destination": "/bogus/x"}, "x")
        a.expect_error()
    got = b.messages(2, timeout=5)
    assert [m["message-id"] for m in got] == [m["message-id"] for m in sent]
    assert all(m["redelivered"] == "true" for m in got)


@pytest.mark.both_backends
@pytest.mark.parametrize("how", ["clean", "kill9"])
def test_a_restart_redelivers_every_unacked_message(broker, qname, how):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}")
    m = c.messages(3)
    c.ack(m[1])
    if how == "clean":
        broker.restart()
    else:
        broker.kill9()
        broker.start()
    c = broker.client()
    assert c.count_msgs(qname) == 2
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    assert [x.body for x in c.messages(2)] == [b"m0", b"m2"]
    c.expect_nothing()


# --- transactions -----------------------------------------------------------------------------

@pytest.mark.both_backends
def test_transactional_sends_take_effect_at_commit(broker, qname):
    sub = broker.client()
    sub.subscribe(f"/queue/{qname}")
    c = broker.client()
    c.begin("t1")
    c.send(f"/queue/{qname}", "a", transaction="t1")   # receipt answered at once
    c.send(f"/queue/{qname}", "b", transaction="t1")
    c.send(f"/topic/{qname}", "t", transaction="t1")
    sub.expect_nothing()
    assert c.count_msgs(qname) == 0
    tsub = broker.client()
    tsub.subscribe(f"/topic/{qname}")
    c.commit("t1")
    assert [m.body for m in sub.messages(2)] == [b"a", b"b"]
    assert tsub.message().body == b"t"


@pytest.mark.both_backends
def test_abort_discards_transactional_sends(broker, qname):
    sub = broker.client()
    sub.subscribe(f"/queue/{qname}")
    c = broker.client()
    c.begin("t1")
    c.send(f"/queue/{qname}", "a", transaction="t1")
    c.abort("t1")
    c.send(f"/queue/{qname}", "after")
    assert sub.message().body == b"after"
    sub.expect_nothing()


@pytest.mark.both_backends
def test_transactional_ack_takes_effect_at_commit(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "x")
    m = c.message()
    c.begin("t1")
    c.ack(m, transaction="t1")
    assert c.count_msgs(qname) == 1
    c.commit("t1")
    assert c.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_aborted_transactional_ack_is_discarded(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "x")
    m = c.message()
    c.begin("t1")
    c.ack(m, transaction="t1")
    c.abort("t1")
    assert c.count_msgs(qname) == 1
    c.expect_nothing()
    c.ack(m)
    assert c.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_transactional_nack_takes_effect_at_commit(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    c.send(f"/queue/{qname}", "x")
    m = c.message()
    c.begin("t1")
    c.nack(m, transaction="t1")
    c.expect_nothing()
    c.commit("t1")
    again = c.message()
    assert again["message-id"] == m["message-id"]


@pytest.mark.both_backends
@pytest.mark.parametrize("how", ["disconnect", "close", "reset"])
def test_disconnect_or_drop_discards_an_open_transaction(broker, qname, how):
    sub = broker.client()
    sub.subscribe(f"/queue/{qname}")
    c = broker.client()
    c.begin("t1")
    c.send(f"/queue/{qname}", "never", transaction="t1")
    if how == "disconnect":
        c.disconnect()
    elif how == "close":
        c.close()
    else:
        c.drop()
    sub.expect_nothing(1.0)
    assert sub.count_msgs(qname) == 0


@pytest.mark.both_backends
def test_disconnect_with_a_pending_transactional_ack_returns_the_message(broker, qname):
    a, b = broker.client(), broker.client()
    a.subscribe(f"/queue/{qname}", ack="client-individual")
    a.send(f"/queue/{qname}", "x")
    m = a.message()
    a.begin("t1")
    a.ack(m, transaction="t1")
    b.subscribe(f"/queue/{qname}", ack="client-individual")
    a.disconnect()
    again = b.message(timeout=3)
    assert again["message-id"] == m["message-id"]


@pytest.mark.both_backends
def test_commit_receipt_means_the_transactions_sends_are_durable(broker, qname):
    c = broker.client()
    c.begin("t1")
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}", receipt=False, transaction="t1")
    c.commit("t1")
    broker.kill9()
    broker.start()
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    assert [m.body for m in c.messages(3)] == [b"m0", b"m1", b"m2"]


def test_transaction_ids_belong_to_their_connection(broker, qname):
    a, b = broker.client(), broker.client()
    a.begin("same")
    b.begin("same")
    a.send(f"/queue/{qname}", "from a", transaction="same")
    b.commit("same")
    assert a.count_msgs(qname) == 0
    a.commit("same")
    assert a.count_msgs(qname) == 1


@pytest.mark.parametrize("scenario", [
    [("SEND", {"destination": "/queue/{q}", "transaction": "nope"})],
    [("ACK", {"id": "x", "message-id": "x", "transaction": "nope"})],
    [("COMMIT", {"transaction": "nope"})],
    [("ABORT", {"transaction": "nope"})],
    [("BEGIN", {"transaction": "t"}), ("BEGIN", {"transaction": "t"})],
    [("BEGIN", {"transaction": "t"}), ("COMMIT", {"transaction": "t"}), ("COMMIT", {"transaction": "t"})],
    [("BEGIN", {"transaction": "t"}), ("ABORT", {"transaction": "t"}), ("SEND", {"destination": "/queue/{q}", "transaction": "t"})],
    [("BEGIN", {"transaction": "t"}), ("COMMIT", {"transaction": "t"}), ("ABORT", {"transaction": "t"})],
    [("BEGIN", {})],
    [("COMMIT", {})],
], ids=["send-unknown", "ack-unknown", "commit-unknown", "abort-unknown", "duplicate-begin",
        "commit-twice", "send-after-abort", "abort-after-commit", "begin-without-id",
        "commit-without-id"])
def test_unknown_finished_or_duplicate_transaction_is_an_error(broker, qname, scenario):
    c = broker.client()
    *ok, (command, headers) = scenario
    for i, (cmd, h) in enumerate(ok):
        c.request(cmd, {k: v.format(q=qname) for k, v in h.items()}, receipt=f"ok{i}")
    c.send_frame(command, {**{k: v.format(q=qname) for k, v in headers.items()}, "receipt": "bad"}, "x" if command == "SEND" else b"")
    assert c.expect_error().get("receipt-id") == "bad"
    assert broker.client().count_msgs(qname) == 0


def test_another_connections_transaction_id_is_unknown(broker):
    a, b = broker.client(), broker.client()
    a.begin("mine")
    b.send_frame("COMMIT", {"transaction": "mine", "receipt": "bad"})
    assert b.expect_error().get("receipt-id") == "bad"
    a.commit("mine")


# ============================================================================================
# §8 Control destinations
# ============================================================================================

@pytest.mark.both_backends
def test_count_msgs_counts_stored_unacked_messages_including_in_flight(broker, qname):
    c = broker.client()
    assert c.count_msgs(qname) == 0
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}")
    assert c.count_msgs(qname) == 3
    c.subscribe(f"/queue/{qname}", ack="client-individual")
    m = c.messages(3)
    assert c.count_msgs(qname) == 3
    c.ack(m[0])
    assert c.count_msgs(qname) == 2


@pytest.mark.both_backends
def test_count_msgs_is_per_queue(broker, qname):
    c = broker.client()
    c.send(f"/queue/{qname}a", "x")
    c.send(f"/queue/{qname}ab", "x")
    c.send(f"/queue/{qname}ab", "x")
    assert c.count_msgs(f"{qname}a") == 1
    assert c.count_msgs(f"{qname}ab") == 2


@pytest.mark.both_backends
def test_count_subscribers_of_a_queue_counts_each_subscription(broker, qname):
    a, b = broker.client(), broker.client()
    assert a.count_subscribers(f"/queue/{qname}") == 0
    s1 = a.subscribe(f"/queue/{qname}")
    a.subscribe(f"/queue/{qname}")
    assert a.count_subscribers(f"/queue/{qname}") == 2
    b.subscribe(f"/queue/{qname}")
    a.subscribe(f"/queue/{qname}other")
    a.subscribe(f"/topic/{qname}")
    assert a.count_subscribers(f"/queue/{qname}") == 3
    a.unsubscribe(id=s1)
    assert a.count_subscribers(f"/queue/{qname}") == 2
    b.close()
    assert wait_until(lambda: a.count_subscribers(f"/queue/{qname}") == 1)


@pytest.mark.both_backends
def test_count_subscribers_of_a_topic_includes_matching_prefix_subscriptions(broker, qname):
    c = broker.client()
    c.subscribe(f"/topic/{qname}.a")
    c.subscribe(f"/topic/{qname}.b")
    c.subscribe(f"/topic/{qname}.*")
    c.subscribe(f"/topic/{qname}.a*")
    c.subscribe(f"/queue/{qname}.a")
    assert c.count_subscribers(f"/topic/{qname}.a") == 3
    assert c.count_subscribers(f"/topic/{qname}.ab") == 2
    assert c.count_subscribers(f"/topic/{qname}.b") == 2
    assert c.count_subscribers(f"/topic/{qname}.c") == 1
    assert c.count_subscribers(f"/topic/{qname}x") == 0


@pytest.mark.both_backends
@pytest.mark.parametrize("dest", ["/control/count-msgs/queue/{q}", "/control/count-subscribers/queue/{q}",
                                  "/control/count-subscribers/topic/{q}"])
def test_control_without_receipt_returns_nothing(broker, qname, dest):
    c = broker.client()
    c.send(dest.format(q=qname), receipt=False)
    c.expect_nothing()
    c.send(f"/topic/{qname}", "still open")


@pytest.mark.both_backends
@pytest.mark.parametrize("dest", ["/control/bogus/queue/{q}", "/control/count-everything",
                                  "/control/", "/control/count-msgs/elsewhere/{q}"])
def test_unknown_control_name_is_an_error(broker, qname, dest):
    c = broker.client()
    c.send_frame("SEND", {"destination": dest.format(q=qname), "receipt": "bad"})
    assert c.expect_error().get("receipt-id") == "bad"


# ============================================================================================
# §9 Limits and bad input (basics)
# ============================================================================================

def _assert_rejected(broker, c, qname, frame_bytes):
    """frame_bytes (which would store a message in /queue/qname) gets ERROR + close, stores
    nothing, and other connections keep working."""
    other = broker.client()
    other.subscribe(f"/queue/{qname}-other")
    c.send_raw(frame_bytes)
    c.expect_error()
    assert other.count_msgs(qname) == 0
    other.send(f"/queue/{qname}-other", "fine")
    assert other.message().body == b"fine"


@pytest.mark.parametrize("command", ["FROB", "send", "MESSAGE", "CONNECTED", "RECEIPT"])
def test_unknown_command_is_an_error(broker, qname, command):
    c = broker.client()
    _assert_rejected(broker, c, qname, encode_frame(command, {"destination": f"/queue/{qname}"}, "x"))


@pytest.mark.parametrize("cl", ["abc", "-1", "1.5", "", "0x3", "99999999999999999999999"])
def test_bad_content_length_is_an_error(broker, qname, cl):
    c = broker.client()
    _assert_rejected(broker, c, qname, encode_frame("SEND", {"destination": f"/queue/{qname}"}, "abc",
                                                    content_length=cl))


def test_body_not_followed_by_nul_at_content_length_is_an_error(broker, qname):
    c = broker.client()
    _assert_rejected(broker, c, qname,
                     f"SEND\ndestination:/queue/{qname}\ncontent-length:2\n\nabcdef\x00".encode())


@pytest.mark.parametrize("priority", ["high", "1.5", "", "5x"])
def test_bad_priority_is_an_error(broker, qname, priority):
    c = broker.client()
    _assert_rejected(broker, c, qname, encode_frame("SEND", {"destination": f"/queue/{qname}",
                                                             "priority": priority}, "x"))


@pytest.mark.parametrize("timeout", ["soon", ""])
def test_bad_ack_timeout_is_an_error(broker, qname, timeout):
    c = broker.client()
    _assert_rejected(broker, c, qname, encode_frame("SEND", {"destination": f"/queue/{qname}",
                                                             "ack-timeout": timeout}, "x"))


@pytest.mark.parametrize("header,value", [
    ("priority", "99999999999999999999999999"), ("priority", "-99999999999999999999999999"),
    ("ack-timeout", "nan"), ("ack-timeout", "inf"), ("ack-timeout", "-1"), ("ack-timeout", "1e400"),
])
def test_extreme_priority_or_ack_timeout_is_stored_or_refused_never_crashes(broker, qname, header, value):
    c = broker.client()
    c.send_frame("SEND", {"destination": f"/queue/{qname}", header: value, "receipt": "r"}, "x")
    f = c.recv()
    assert f.command in ("RECEIPT", "ERROR"), f
    other = broker.client()
    if f.command == "ERROR":
        c.expect_closed()
        assert other.count_msgs(qname) == 0
    else:
        other.subscribe(f"/queue/{qname}", ack="client-individual")
        other.ack(other.message())
    other.send(f"/queue/{qname}-after", "broker still fine")
    broker.restart()
    broker.client().count_msgs(qname)


@pytest.mark.parametrize("prefetch", ["many", "1.5"])
def test_bad_prefetch_is_an_error(broker, qname, prefetch):
    c = broker.client()
    c.send_frame("SUBSCRIBE", {"destination": f"/queue/{qname}", "id": "s", "prefetch": prefetch,
                               "receipt": "bad"})
    assert c.expect_error().get("receipt-id") == "bad"


@pytest.mark.parametrize("shape", ["content-length", "no-content-length", "header"])
def test_a_frame_over_max_frame_size_is_an_error(start_broker, qname, shape):
    b = start_broker("-max-frame-size", "2000")
    c = b.client()
    if shape == "content-length":
        data = encode_frame("SEND", {"destination": f"/queue/{qname}"}, b"x" * 5000)
    elif shape == "no-content-length":
        data = encode_frame("SEND", {"destination": f"/queue/{qname}"}, b"x" * 5000, content_length=False)
    else:
        data = encode_frame("SEND", {"destination": f"/queue/{qname}", "x-big": "y" * 5000}, b"x")
    _assert_rejected(b, c, qname, data)


def test_a_frame_within_max_frame_size_works(start_broker, qname):
    b = start_broker("-max-frame-size", "2000")
    c = b.client()
    c.subscribe(f"/queue/{qname}")
    c.send(f"/queue/{qname}", b"x" * 1500)
    assert c.message().body == b"x" * 1500


def test_more_than_1000_headers_is_an_error(broker, qname):
    c = broker.client()
    headers = [("destination", f"/queue/{qname}")] + [(f"h{i}", "v") for i in range(1100)]
    _assert_rejected(broker, c, qname, encode_frame("SEND", headers, "x"))


def test_exactly_1000_headers_are_accepted(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    headers = [("destination", f"/queue/{qname}")] + [(f"h{i}", "v") for i in range(999)]
    c.send_frame("SEND", headers)                        # no body, no content-length: 1000 headers
    m = c.message()
    assert m["h998"] == "v"


def test_a_header_line_of_64_kib_is_accepted(broker, qname):
    c = broker.client()
    c.subscribe(f"/queue/{qname}")
    value = "y" * (64 * 1024 - len("x-long:"))
    c.send(f"/queue/{qname}", "x", headers={"x-long": value})
    assert c.message()["x-long"] == value


def test_a_header_line_over_64_kib_is_an_error(broker, qname):
    c = broker.client()
    _assert_rejected(broker, c, qname, encode_frame("SEND", {"destination": f"/queue/{qname}",
                                                             "x-long": "y" * 70000}, "x"))


def test_invalid_utf8_in_headers_is_an_error(broker, qname):
    c = broker.client()
    _assert_rejected(broker, c, qname, encode_frame("SEND", {"destination": f"/queue/{qname}",
                                                             "x-bad": b"\xff\xfe\xc3"}, "x"))


def test_header_line_without_colon_is_an_error(broker, qname):
    c = broker.client()
    _assert_rejected(broker, c, qname,
                     f"SEND\ndestination:/queue/{qname}\nno colon here\n\nx\x00".encode())


def test_undefined_escape_in_1_2_is_an_error(broker, qname):
    c = broker.client("1.2")
    _assert_rejected(broker, c, qname,
                     f"SEND\ndestination:/queue/{qname}\nx-esc:a\\tb\n\nx\x00".encode())


def test_garbage_before_connect_closes_the_socket(broker):
    c = broker.raw_client()
    c.send_raw(b"\x00\x01\x02garbage\n\n\x00")
    assert all(f.command == "ERROR" for f in c.expect_closed())
    broker.client().send("/topic/x", "broker still fine")


def test_a_slow_queue_consumer_is_not_closed_and_loses_nothing(broker, qname):
    p = broker.client()
    body = b"q" * 100_000
    n = 60                                   # 6 MB: well above the 1 MiB high-water mark
    for i in range(n):
        p.send(f"/queue/{qname}", body, receipt=(i == n - 1), headers={"x-seq": str(i)})
    slow = broker.client()
    slow.subscribe(f"/queue/{qname}", ack="auto", receipt=False)
    time.sleep(1.5)                          # the broker fills the socket, then must pause
    deadline = time.monotonic() + 30
    got = [slow.message(timeout=max(0.1, deadline - time.monotonic())) for _ in range(n)]
    assert [int(m["x-seq"]) for m in got] == list(range(n))
    assert all(m.body == body for m in got)
    slow.send(f"/topic/{qname}", "still connected")


def _drain(c, quiet=1.0, limit=60.0):
    got = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        m = c.try_message(quiet)
        if m is None:
            break
        got.append(m)
    return got


def test_queue_delivery_to_a_slow_consumer_pauses_so_others_get_the_messages(broker, qname):
    slow = broker.client(rcvbuf=16384)
    slow.subscribe(f"/queue/{qname}", ack="auto")
    p = broker.client()
    n = 200                                  # 20 MB, far more than socket buffers + 1 MiB
    body = b"s" * 100_000
    for i in range(0, n, 20):
        p.send_raw(b"".join(encode_frame("SEND", {"destination": f"/queue/{qname}", "x-seq": str(j)},
                                         body) for j in range(i, i + 20)))
    barrier(p)
    time.sleep(1.0)
    fast = broker.client()
    fast.subscribe(f"/queue/{qname}", ack="auto")
    fast_got = _drain(fast)
    slow_got = _drain(slow)
    fast_seq = [int(m["x-seq"]) for m in fast_got]
    slow_seq = [int(m["x-seq"]) for m in slow_got]
    assert sorted(fast_seq + slow_seq) == list(range(n))
    assert len(fast_seq) >= 50, f"the slow consumer took {len(slow_seq)} of {n} messages"


def test_a_connection_over_max_pending_gets_error_and_is_closed(start_broker, qname):
    b = start_broker("-max-pending", "200000")
    slow = b.client()
    slow.subscribe(f"/topic/{qname}")
    p = b.client()
    chunk = b"".join(encode_frame("SEND", {"destination": f"/topic/{qname}"}, b"t" * 65536)
                     for _ in range(50))
    for _ in range(8):                       # 26 MB of topic messages for a reader that waits
        p.send_raw(chunk)
    barrier(p)
    frames = slow.expect_closed(timeout=20)
    assert frames and frames[-1].command == "ERROR", [f.command for f in frames[-3:]]
    assert len(frames) - 1 < 400, "every message arrived: nothing was over the limit"
    p.send(f"/topic/{qname}", "producer unaffected")


def test_the_broker_raises_its_open_file_limit_and_serves_many_connections(start_broker, qname):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 3000
    if soft < n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 200), hard))
    n = min(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)
    assert n > 1100, "the test process cannot open enough sockets to exceed 1024"
    b = start_broker(soft_nofile=1024)          # the broker must raise this itself
    clients = [b.raw_client() for _ in range(n)]
    for c in clients:
        c.send_frame("CONNECT", {"accept-version": "1.2", "host": "h"})
        c.send_frame("SUBSCRIBE", {"destination": f"/topic/{qname}", "id": "s"})
    for c in clients:
        assert c.expect("CONNECTED").command == "CONNECTED"
    probe = b.client()
    probe.count_subscribers(f"/topic/{qname}")
    assert wait_until(lambda: probe.count_subscribers(f"/topic/{qname}") == n, timeout=10)
    probe.send(f"/topic/{qname}", "to everyone")
    for c in clients:
        assert c.message().body == b"to everyone"
