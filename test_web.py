"""STOMP over WebSocket and TLS, and GET /metrics (SPEC §13, its flags in §2).

The real broker with `-ws-port` (and `-tls-port`, `-tls-cert`, `-tls-key`), spoken to over
sockets: a small WebSocket client (conftest.WsClient: the raw STOMP client, its bytes carried
in masked WebSocket messages) for the handshake, masking, fragments, ping, close, the limits and
the Origin check; raw STOMP over TLS and stomp.py over TLS; /metrics parsed as Prometheus text.
"""

import base64
import hashlib
import socket
import ssl
import time

import pytest
import stomp

from conftest import (HOST, Closed, TlsClient, WsClient, encode_frame, free_port,
                      read_http_response, run_cli, ws_frame, ws_handshake)



@pytest.fixture
def tls_broker(start_broker, tls_files):
    """A broker with a TLS port (`tls_port`) and wss on its WebSocket port (`ws_port`)."""
    tls_port, ws_port = free_port(), free_port()
    b = start_broker("-tls-port", str(tls_port), "-ws-port", str(ws_port),
                     "-tls-cert", tls_files[0], "-tls-key", tls_files[1])
    b.tls_port, b.ws_port = tls_port, ws_port
    return b


def ws_client(broker, version="1.2", connect=True, **handshake):
    c = WsClient(broker.ws_port, **handshake)
    broker.clients.append(c)
    if connect:
        c.connect(version)
    return c


def raw_socket(port):
    s = socket.create_connection((HOST, port), timeout=5)
    return s


# --- the handshake ----------------------------------------------------------------------------

@pytest.mark.parametrize("offered, chosen", [("v10.stomp,v11.stomp,v12.stomp", "v12.stomp"),
                                             ("v10.stomp, v11.stomp", "v11.stomp"),
                                             ("v10.stomp", "v10.stomp"), (None, None)])
def test_the_handshake_answers_the_highest_stomp_subprotocol_offered(web, offered, chosen):
    key = base64.b64encode(b"0123456789abcdef").decode()
    with raw_socket(web.ws_port) as s:
        status, headers, _ = ws_handshake(s, protocols=offered, key=key)
    assert status == 101
    expected = base64.b64encode(hashlib.sha1(
        key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
    assert headers["sec-websocket-accept"] == expected
    assert headers.get("sec-websocket-protocol") == chosen


@pytest.mark.parametrize("origin, allowed", [(None, True), ("http://127.0.0.1:8080", True),
                                             ("http://127.0.0.1", True),
                                             ("http://evil.example", False),
                                             ("null", False)])
def test_an_origin_must_be_the_brokers_own_host_by_default(web, origin, allowed):
    with raw_socket(web.ws_port) as s:
        status, _, _ = ws_handshake(s, origin=origin)
    assert status == (101 if allowed else 403)


def test_ws_origin_allows_the_origins_it_names(start_broker):
    ws_port = free_port()
    b = start_broker("-ws-port", str(ws_port), "-ws-origin", "http://app.example:8000",
                     "-ws-origin", "https://other.example")
    for origin, status in (("http://app.example:8000", 101), ("https://other.example", 101),
                           ("http://127.0.0.1", 403), ("http://app.example", 403)):
        with raw_socket(ws_port) as s:
            assert ws_handshake(s, origin=origin)[0] == status, origin
    b.stop()
    b.flags = ["-ws-port", str(ws_port), "-ws-origin", "*"]
    b.start()
    with raw_socket(ws_port) as s:
        assert ws_handshake(s, origin="http://anything.example")[0] == 101


@pytest.mark.parametrize("request_lines, status", [
    (["GET /other HTTP/1.1", "Host: x"], 404),
    (["POST / HTTP/1.1", "Host: x"], 400),
    (["GET / HTTP/1.1", "Host: x", "Upgrade: websocket", "Sec-WebSocket-Key: a2V5",
      "Sec-WebSocket-Version: 8"], 426),
])
def test_other_http_requests_get_an_error_status(web, request_lines, status):
    with raw_socket(web.ws_port) as s:
        s.sendall(("\r\n".join(request_lines) + "\r\n\r\n").encode())
        assert read_http_response(s)[0] == status
        assert s.recv(100) == b""          # and the connection is closed


# --- STOMP over WebSocket -----------------------------------------------------------------------

def test_stomp_over_websocket_round_trips_with_a_tcp_client_both_ways(web, qname):
    ws = ws_client(web)
    tcp = web.client()
    ws.subscribe(f"/queue/{qname}", ack="client-individual")
    tcp.send(f"/queue/{qname}", b"from tcp")
    m = ws.message()
    assert m.body == b"from tcp"
    ws.ack(m)
    tcp.subscribe(f"/topic/{qname}")
    ws.send(f"/topic/{qname}", b"from ws")
    assert tcp.message().body == b"from ws"
    assert tcp.count_msgs(qname) == 0
    assert all(opcode == 1 for opcode, _ in ws.messages)   # text messages, one frame each


def test_frames_split_across_and_packed_into_websocket_messages(web, qname):
    ws = ws_client(web)
    ws.subscribe(f"/topic/{qname}")
    one = encode_frame("SEND", {"destination": f"/topic/{qname}"}, b"split in three")
    ws.send_raw(one, fragments=3)                       # one message, three fragments
    assert ws.message().body == b"split in three"
    for i in range(0, len(one), 7):                     # one frame in many messages
        ws.send_raw(one[i:i + 7])
    assert ws.message().body == b"split in three"
    two = b"".join(encode_frame("SEND", {"destination": f"/topic/{qname}"}, b"packed %d" % i)
                   for i in range(2))
    ws.send_raw(two)                                    # two frames in one message
    assert [ws.message().body for _ in range(2)] == [b"packed 0", b"packed 1"]


def test_a_binary_body_with_nul_bytes_arrives_as_a_binary_message(web, qname):
    ws = ws_client(web)
    ws.subscribe(f"/queue/{qname}")
    body = b"\x00\xff\xfe binary \x00"
    web.client().send(f"/queue/{qname}", body)
    assert ws.message().body == body
    assert ws.messages[-1][0] == 2                      # not UTF-8: binary


def test_heart_beats_are_newline_messages_and_pings_get_pongs(web):
    ws = ws_client(web, connect=False)
    connected = ws.hello("1.2", heart_beat="0,100")
    assert connected["heart-beat"] == "100,0"
    time.sleep(0.5)
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.3)
    assert ws.heartbeats >= 2 and (1, b"\n") in ws.messages
    ws.sock.sendall(ws_frame(b"are you there", opcode=9))
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.3)
    assert ws.pongs == [b"are you there"]


def test_the_close_handshake_is_answered_and_the_connection_ends(web, qname):
    ws = ws_client(web)
    ws.subscribe(f"/queue/{qname}", ack="client")
    web.client().send(f"/queue/{qname}", b"unacked")
    ws.message()
    ws.sock.sendall(ws_frame((1000).to_bytes(2, "big"), opcode=8))
    with pytest.raises(Closed):
        ws.recv(timeout=5)
    assert ws.close_code == 1000
    other = web.client()
    other.subscribe(f"/queue/{qname}")
    assert other.message().body == b"unacked"           # the unacked message went back


@pytest.mark.parametrize("bad, code", [
    (ws_frame(b"SEND", mask=None), 1002),                      # unmasked
    (ws_frame(b"x", opcode=3), 1002),                          # reserved opcode
    (ws_frame(b"x" * 200, opcode=9), 1002),                    # control frame too long
    (ws_frame(b"x", opcode=0), 1002),                          # continuation of nothing
    (ws_frame(b"x" * 5000), 1009),                             # over -max-frame-size
])
def test_a_websocket_protocol_error_closes_with_the_rfc_code(start_broker, bad, code):
    ws_port = free_port()
    b = start_broker("-ws-port", str(ws_port), "-max-frame-size", "4096")
    b.ws_port = ws_port
    ws = ws_client(b)
    ws.sock.sendall(bad)
    with pytest.raises(Closed):
        ws.recv(timeout=5)
    assert ws.close_code == code
    assert b.client().count_msgs("anything") == 0       # the broker serves on


def test_stomp_errors_close_the_websocket_too(web):
    ws = ws_client(web)
    ws.send_raw(encode_frame("NONSENSE", {}))
    frames = ws.expect_closed()
    assert [f.command for f in frames] == ["ERROR"]
    assert ws.close_code == 1000


def test_login_is_required_over_websocket_too(start_broker):
    ws_port = free_port()
    b = start_broker("-ws-port", str(ws_port), "-login", "u", "-passcode", "p")
    b.ws_port = ws_port
    ws = ws_client(b, connect=False)
    assert ws.hello("1.2", login="u", passcode="wrong").command == "ERROR"
    assert ws_client(b, connect=False).hello("1.2", login="u", passcode="p").command == \
        "CONNECTED"


# --- /metrics ---------------------------------------------------------------------------------

def scrape(port):
    with raw_socket(port) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, body = read_http_response(s)
        while len(body) < int(headers["content-length"]):
            body += s.recv(65536)
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4"
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
        elif line.startswith("# TYPE"):
            assert line.split()[3] in ("gauge", "counter"), line
    return samples


def test_metrics_report_what_the_broker_did(web, qname):
    before = scrape(web.ws_port)
    producer, consumer = web.client(), web.client()
    consumer.subscribe(f"/queue/{qname}", ack="client-individual", prefetch=2)
    for i in range(5):
        producer.send(f"/queue/{qname}", b"m%d" % i)
    first = consumer.message()
    consumer.nack(first)
    messages = consumer.messages(2)
    consumer.ack(messages[0])
    after = scrape(web.ws_port)
    assert after["ocamlmq_messages_received_total"] - before["ocamlmq_messages_received_total"] == 5
    assert after["ocamlmq_messages_acked_total"] == 1
    assert after["ocamlmq_messages_redelivered_total"] == 1
    assert after["ocamlmq_messages_delivered_total"] >= 4
    assert after["ocamlmq_messages_stored"] == 4
    assert after[f'ocamlmq_queue_consumers{{queue="{qname}"}}'] == 1
    assert after[f'ocamlmq_queue_unacked{{queue="{qname}"}}'] == 2
    assert after["ocamlmq_messages_in_flight"] == 2
    assert after["ocamlmq_connections"] >= 2 and after["ocamlmq_subscriptions"] == 1
    assert after["ocamlmq_storage_commits_total"] > before["ocamlmq_storage_commits_total"]
    assert after["ocamlmq_storage_healthy"] == 1


# --- TLS ----------------------------------------------------------------------------------------

def test_stomp_over_tls_with_a_raw_client_and_with_stomp_py(tls_broker, client_tls, tls_files,
                                                           qname):
    raw = TlsClient(tls_broker.tls_port, client_tls)
    tls_broker.clients.append(raw)
    raw.connect("1.2")
    raw.subscribe(f"/queue/{qname}", ack="client-individual")
    got = []

    class Listener(stomp.ConnectionListener):
        def on_message(self, frame):
            got.append(frame.body)

    conn = stomp.Connection12([(HOST, tls_broker.tls_port)], timeout=5)
    conn.set_ssl(for_hosts=[(HOST, tls_broker.tls_port)], ca_certs=tls_files[0])
    conn.set_listener("", Listener())
    conn.connect(wait=True)
    try:
        conn.subscribe(f"/topic/{qname}", id="1")
        conn.send(f"/queue/{qname}", "from stomp.py over TLS", receipt="r1")
        m = raw.message()
        assert m.body == b"from stomp.py over TLS"
        raw.ack(m)
        raw.send(f"/topic/{qname}", b"x" * 300_000)        # many TLS records
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got and len(got[0]) == 300_000
    finally:
        conn.disconnect()


def test_wss_on_the_websocket_port_with_tls_files(tls_broker, client_tls, qname):
    ws = WsClient(tls_broker.ws_port, tls_context=client_tls)
    tls_broker.clients.append(ws)
    ws.connect("1.2")
    ws.subscribe(f"/topic/{qname}")
    tls_broker.client().send(f"/topic/{qname}", b"over wss")
    assert ws.message().body == b"over wss"


def test_a_plain_client_on_the_tls_port_is_dropped(tls_broker):
    with socket.create_connection((HOST, tls_broker.tls_port), timeout=5) as s:
        s.sendall(encode_frame("CONNECT", {"accept-version": "1.2"}))
        received = b""
        while chunk := s.recv(4096):              # a TLS alert at most, then the close
            received += chunk
    assert b"CONNECTED" not in received
    assert tls_broker.client().count_msgs("x") == 0


def test_a_tls_handshake_that_never_finishes_is_closed_at_the_connect_deadline(tls_broker):
    with socket.create_connection((HOST, tls_broker.tls_port), timeout=15) as s:
        s.sendall(b"\x16\x03\x01\x00")                 # the start of a ClientHello, no more
        t0 = time.monotonic()
        assert s.recv(100) == b""
        waited = time.monotonic() - t0
    assert 8 < waited < 13, waited
    assert tls_broker.client().count_msgs("x") == 0


@pytest.mark.parametrize("flags, message", [
    (["-tls-cert", "/nonexistent/cert.pem"], "cannot use the TLS certificate"),
    (["-tls-port", "1"], "-tls-port needs -tls-cert"),
])
def test_a_missing_certificate_is_one_line_and_an_exit(tmp_path, flags, message):
    r = run_cli(["-port", str(free_port()), *flags, str(tmp_path / "x.db")])
    assert r.returncode in (1, 2) and message in r.stderr
    assert "Traceback" not in r.stderr


def test_a_bad_key_file_is_one_line_and_exit_1(tmp_path, tls_files):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    r = run_cli(["-port", str(free_port()), "-tls-port", str(free_port()), "-tls-cert",
                 tls_files[0], "-tls-key", str(bad), str(tmp_path / "x.db")])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_read_that_ends_with_a_close_gets_its_frames_answered_before_the_close(web, qname):
    ws = ws_client(web)
    ws.sock.sendall(ws_frame(encode_frame("SEND", {"destination": f"/topic/{qname}",
                                                   "receipt": "last"}))
                    + ws_frame((1000).to_bytes(2, "big"), opcode=8))
    frames = ws.expect_closed()
    assert [f.command for f in frames] == ["RECEIPT"] and ws.close_code == 1000


def test_a_ping_flood_from_a_client_that_never_reads_costs_little(web):
    from test_hostile import rss_kib
    ws = ws_client(web)
    before = rss_kib(web.proc.pid)
    flood = ws_frame(b"", opcode=9) * 40_000
    for _ in range(25):                       # a million pings, never reading a pong
        ws.sock.sendall(flood)
    assert web.client().count_msgs("x") == 0  # everything sent has been read by now
    growth_kib = rss_kib(web.proc.pid) - before
    assert growth_kib < 20 * 1024, f"{growth_kib} KiB for a million unanswered pings"


def test_tls_close_notify_ends_the_connection(tls_broker, client_tls):
    """After close_notify nothing more is decrypted: the broker closes rather than keep
    taking bytes it will never read."""
    raw = TlsClient(tls_broker.tls_port, client_tls)
    raw.connect("1.2")
    sock = raw.sock
    try:
        sock = sock.unwrap()                  # close_notify (the broker may close at once)
    except ssl.SSLError:
        pass
    sock.settimeout(5)
    t0 = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    assert time.monotonic() - t0 < 5
    sock.close()
    assert tls_broker.client().count_msgs("x") == 0
