"""Fuzzing of ocamlmq.py (SPEC §3, §9): the codec in-process, and the broker over real sockets.

1. Hypothesis drives the sans-IO codec (`FrameParser`, `encode_frame`, `ProtocolError`) with
   random and mutated frames fed in random chunk sizes: it returns frames or raises
   ProtocolError, never anything else; its buffer never exceeds the frame limit by more than one
   chunk; its answer does not depend on how the bytes were chunked; and encode_frame then parse
   gives back the same command, headers and body for 1.1/1.2 escaping.
2. Random frame sequences, valid and mutated, go over real sockets to a real broker while an
   honest client stores messages with receipts on another connection: the broker stays up,
   every reply is well-formed (an ERROR has a `message` and is the last frame before the
   close), and the honest client loses nothing.

The long variants carry the `slow` marker, which conftest.py skips unless selected: `python3 -m
pytest -m slow test_fuzz.py` (or OCAMLMQ_SLOW=1).  Examples run are printed as `[figures]` lines (pytest -s).
"""

import random
import socket
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import conftest
from conftest import Closed, ProtocolViolation
from ocamlmq import FrameParser, ProtocolError, encode_frame
from test_hostile import report

DEFAULT_EXAMPLES = 300
SLOW_EXAMPLES = 5000
NET_EXAMPLES = 150
NET_SLOW_EXAMPLES = 3000

COMMANDS = ["CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN",
            "COMMIT", "ABORT", "DISCONNECT", "MESSAGE", "RECEIPT", "ERROR"]
HEADER_NAMES = ["destination", "id", "ack", "receipt", "transaction", "priority", "ack-timeout",
                "prefetch", "content-length", "message-id", "subscription", "heart-beat",
                "accept-version", "host", "login", "x-custom", ""]
VERSIONS = ["1.0", "1.1", "1.2"]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
special_text = st.text(st.sampled_from("ab:\\\n\r\x00 \t\u00e9\u20ac\U0001f600crn"), max_size=12)
long_value = st.builds(lambda c, n: c * n, st.sampled_from(["a", "\u00e9", "\u20ac"]), st.integers(0, 40))
header_value = st.one_of(text, special_text, long_value, st.sampled_from(
    ["/queue/fz-a", "/queue/fz-b", "/topic/fz-t", "/topic/fz*", "/queue/fz*", "/bogus",
     "/control/count-msgs/queue/fz-a", "/control/nope", "1.0,1.1,1.2", "1.2", "0,0", "100,100",
     "auto", "client", "client-individual", "-1", "0", "5", "99999999999999999999", "nan", "1e400",
     "tx1", "\\t", "\\"]))
header_name = st.one_of(st.sampled_from(HEADER_NAMES), text, special_text)
body = st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"\x00", b"\x00\x00\n", b"\n\n"]))


@st.composite
def raw_frame(draw):
    """The bytes of one frame, mostly well formed, with headers drawn from STOMP's own."""
    command = draw(st.one_of(st.sampled_from(COMMANDS), text, special_text))
    headers = draw(st.lists(st.tuples(header_name, header_value), max_size=6))
    content_length = draw(st.one_of(st.none(), st.booleans(), st.integers(-3, 60),
                                    st.sampled_from(["abc", "", "99999999999999999999"])))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    return conftest.encode_frame(command, headers, draw(body), content_length, eol)


@st.composite
def mutated(draw, frames):
    """Bytes of some frames, then a few mutations: flips, inserts, deletes, duplications."""
    data = bytearray(b"".join(draw(st.lists(frames, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate"]))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                       st.sampled_from([b"\n", b"\r", b"\x00", b":", b"\\", b"\n\n"])))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "dup":
            data[i:i] = data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


stream = st.one_of(mutated(raw_frame()), st.binary(max_size=200),
                   st.lists(raw_frame(), max_size=4).map(b"".join))


def chunked(data, sizes):
    """Split data into chunks of the given sizes (cycled), the last one taking the rest."""
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)] if sizes else len(data)
        out.append(data[i:i + n])
        i += n
        k += 1
    return out


def parse_all(data_chunks, version, limits):
    """Feed the chunks; returns (frames as tuples, error or None). Checks the buffer bound and
    that nothing but ProtocolError is raised (anything else propagates and fails the test)."""
    max_frame_size, max_headers, max_line = limits
    p = FrameParser(max_frame_size, max_headers, max_line)
    p.version = version
    frames = []
    for chunk in data_chunks:
        p.feed(chunk)
        assert p.buffered() <= max_frame_size + len(chunk) + 1, \
            f"buffer {p.buffered()} over the {max_frame_size} limit by more than a chunk"
        while True:
            try:
                f = p.next_frame()
            except ProtocolError as e:
                assert str(e), "ProtocolError without a message"
                return frames, e
            if f is None:
                break
            assert isinstance(f.command, str) and isinstance(f.body, bytes), f
            assert len(f.headers) <= max_headers, f
            assert len(f.body) <= max_frame_size, f
            frames.append((f.command, dict(f.headers), f.body))
        assert p.buffered() <= max_frame_size + len(chunk) + 1, \
            f"buffer {p.buffered()} over the {max_frame_size} limit by more than a chunk"
        pending = bytes(p.buffer[p.pos:])
        if b"\n\n" not in pending and b"\n\r\n" not in pending:      # still in a head
            last_line = len(pending) - (pending.rfind(b"\n") + 1)
            assert last_line <= max_line + len(chunk) + 1, \
                f"header line of {last_line} bytes held, over the {max_line} limit by more than a chunk"
    return frames, None


limits = st.tuples(st.sampled_from([30, 64, 200, 1000, 16 * 1024 * 1024]),
                   st.sampled_from([1, 3, 10, 1000]),
                   st.sampled_from([8, 20, 100, 64 * 1024]))
chunk_sizes = st.lists(st.integers(1, 64), max_size=8)

RUNS = {}


def _count(name):
    RUNS[name] = RUNS.get(name, 0) + 1


# --------------------------------------------------------------------------------------------
# 1. The codec in-process
# --------------------------------------------------------------------------------------------

def codec_never_raises_anything_but_protocol_error(examples):
    @settings(max_examples=examples, deadline=None)
    @given(data=stream, sizes=chunk_sizes, version=st.sampled_from(VERSIONS), lim=limits)
    def check(data, sizes, version, lim):
        _count("codec")
        parse_all(chunked(data, sizes), version, lim)
    RUNS["codec"] = 0
    check()
    report("codec fuzz", examples=RUNS["codec"])


def codec_result_does_not_depend_on_chunking(examples):
    @settings(max_examples=examples, deadline=None)
    @given(data=stream, sizes=chunk_sizes, version=st.sampled_from(VERSIONS), lim=limits)
    # found by the long run: a 20-byte line under a 20-byte limit, split before its EOL
    @example(data=b"SEND\ndestination:aaaaaaaa\n\n\x00", sizes=[1], version="1.2", lim=(1000, 10, 20))
    @example(data=b"SEND\ndestination:aaaaaaaa\r\n\r\n\x00", sizes=[25], version="1.2", lim=(1000, 10, 20))
    # ... and a line of 11 characters but 21 bytes under a 20-byte limit
    @example(data=b"SEND\nx:" + "\u00e9".encode() * 10 + b"\n\n\x00", sizes=[3], version="1.1",
             lim=(1000, 10, 20))
    def check(data, sizes, version, lim):
        _count("chunking")
        whole, whole_err = parse_all([data], version, lim)
        pieces, pieces_err = parse_all(chunked(data, sizes), version, lim)
        assert pieces == whole, "different frames when the bytes arrive in pieces"
        assert (pieces_err is None) == (whole_err is None), \
            f"error in one piece: {whole_err!r}, in chunks {sizes}: {pieces_err!r}"
    RUNS["chunking"] = 0
    check()
    report("codec chunking fuzz", examples=RUNS["chunking"])


def test_codec_returns_frames_or_raises_protocol_error_in_any_chunking():
    codec_never_raises_anything_but_protocol_error(DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_codec_returns_frames_or_raises_protocol_error_in_any_chunking_long():
    codec_never_raises_anything_but_protocol_error(SLOW_EXAMPLES)


def test_codec_result_does_not_depend_on_chunking():
    codec_result_does_not_depend_on_chunking(DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_codec_result_does_not_depend_on_chunking_long():
    codec_result_does_not_depend_on_chunking(SLOW_EXAMPLES)


def test_codec_one_byte_at_a_time_equals_one_piece():
    """A fixed sample of stream shapes, byte by byte (chunk size 1 is the worst case)."""
    rnd = random.Random(6)
    for _ in range(200):
        frames = [conftest.encode_frame(rnd.choice(COMMANDS),
                                        [(rnd.choice(HEADER_NAMES[:-1]), "v%d" % rnd.randrange(99))
                                         for _ in range(rnd.randrange(4))],
                                        bytes(rnd.randrange(256) for _ in range(rnd.randrange(20))),
                                        eol=rnd.choice([b"\n", b"\r\n"])) for _ in range(3)]
        data = b"\n".join(frames)
        lim = (16 * 1024 * 1024, 1000, 64 * 1024)
        pieces, pieces_err = parse_all([data[i:i + 1] for i in range(len(data))], "1.2", lim)
        whole, whole_err = parse_all([data], "1.2", lim)
        assert pieces == whole and (pieces_err is None) == (whole_err is None), (pieces_err, whole_err)


@pytest.mark.parametrize("start", [b"SEND\n", b"\rSEND\n"], ids=["command", "lone CR"])
def test_a_head_arriving_in_pieces_is_scanned_once(start):
    """The parser picks up a pending head's search where it stopped, so a client that trickles a
    big head costs each read only its new bytes, even when the head starts with a lone CR."""
    seen = []

    class Watched(FrameParser):
        def _find_head_end(self, pos):
            seen.append(self.scanned)
            return super()._find_head_end(pos)

    parser = Watched()
    parser.feed(start + b"a:b\n" * 500)
    for _ in range(50):
        assert parser.next_frame() is None
        parser.feed(b"x")
    assert seen[1:] == sorted(seen[1:]) and seen[-1] > len(start) + 4 * 500, seen[:5]


# round trip -----------------------------------------------------------------------------------

# Any text but NUL, which the codec refuses in a head (it ends frames on the wire).
safe_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                    max_size=20)
tricky_text = st.text(st.sampled_from("ab:\\\n\r \u00e9\U0001f600c"), max_size=20)
rt_headers = st.lists(st.tuples(st.one_of(safe_text, tricky_text), st.one_of(safe_text, tricky_text))
                      .filter(lambda h: h[0] != "content-length"), max_size=8)


def round_trip(examples):
    @settings(max_examples=examples, deadline=None)
    @given(command=st.sampled_from(["SEND", "MESSAGE", "RECEIPT", "ERROR", "SUBSCRIBE", "ACK"]),
           headers=rt_headers, body=st.binary(max_size=100), version=st.sampled_from(["1.1", "1.2"]),
           sizes=chunk_sizes)
    @example(command="SEND", headers=[("a:b", "v"), ("c\\d\ne", "w")], body=b"x", version="1.2", sizes=[])
    def check(command, headers, body, version, sizes):
        if version == "1.1":      # 1.1 has no \r escape: the codec writes a CR as a blank
            headers = [(k, v) for k, v in headers if "\r" not in k + v]
        _count("round-trip")
        data = encode_frame(command, headers, body, version)
        frames, err = parse_all(chunked(data + data, sizes), version,
                                (16 * 1024 * 1024, 1000, 64 * 1024))
        assert err is None, err
        expected = {}
        for k, v in headers:
            expected.setdefault(k, v)
        expected.setdefault("content-length", str(len(body)))
        assert frames == [(command, expected, body)] * 2
    RUNS["round-trip"] = 0
    check()
    report("codec round trip", examples=RUNS["round-trip"])


def test_encode_then_parse_gives_back_command_headers_and_body():
    round_trip(DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_encode_then_parse_gives_back_command_headers_and_body_long():
    round_trip(SLOW_EXAMPLES)


def test_encode_without_body_then_parse():
    for version in ("1.1", "1.2"):
        data = encode_frame("RECEIPT", [("receipt-id", "a:b\\c\nd")], None, version)
        frames, err = parse_all([data], version, (1 << 24, 1000, 1 << 16))
        assert err is None and frames == [("RECEIPT", {"receipt-id": "a:b\\c\nd"}, b"")]


# --------------------------------------------------------------------------------------------
# 2. The broker over real sockets
# --------------------------------------------------------------------------------------------

HONEST_QUEUE = "honest-ledger-7f3a"

connect_frame = st.builds(
    lambda v, hb: conftest.encode_frame("CONNECT", [("accept-version", v), ("host", "h")]
                                        + ([("heart-beat", hb)] if hb else [])),
    st.sampled_from(["1.0", "1.1", "1.2", "1.0,1.1,1.2", "2.0"]),
    st.sampled_from([None, "0,0", "0,5000", "x"]))

session = st.tuples(st.one_of(connect_frame, st.just(b""), mutated(connect_frame)),
                    st.lists(st.one_of(raw_frame(), mutated(raw_frame()), st.binary(max_size=60)),
                             max_size=8),
                    chunk_sizes)


def read_replies(c, timeout=10.0):
    """Frames until the broker closes; checks they are well formed and that an ERROR has a
    message and is the last one."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            frames.append(c._read_frame(deadline))
        except Closed:
            break
        except TimeoutError:
            raise AssertionError(f"broker did not close a half-closed connection in {timeout}s; "
                                 f"frames {frames!r}") from None
        except ProtocolViolation as e:
            raise AssertionError(f"malformed frame from the broker: {e}") from None
    commands = [f.command for f in frames]
    assert set(commands) <= {"CONNECTED", "RECEIPT", "ERROR", "MESSAGE"}, frames
    if "ERROR" in commands:
        first = commands.index("ERROR")
        assert frames[first].get("message"), frames[first]
        # the no-common-version ERROR also carries `version`; any ERROR ends the connection
        assert first == len(commands) - 1, f"frames after an ERROR: {frames!r}"
    return frames


def network_fuzz(broker, examples):
    honest = broker.client("1.2")
    honest.subscribe("/topic/honest-echo")
    stored = []

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(s=session)
    def check(s):
        _count("network")
        first, rest, sizes = s
        data = first + b"".join(rest)
        c = conftest.Client(broker.port, timeout=10)
        try:
            for chunk in chunked(data, sizes):
                try:
                    c.send_raw(chunk)
                except OSError:
                    break
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            read_replies(c)
        finally:
            c.close()
        # The honest client, on its own connection, is untouched.
        n = len(stored)
        body = b"honest %d \x00 body" % n
        honest.send(f"/queue/{HONEST_QUEUE}", body, headers={"x-n": str(n)})
        stored.append(body)
        honest.send("/topic/honest-echo", b"echo %d" % n)
        assert honest.message().body == b"echo %d" % n

    RUNS["network"] = 0
    check()
    assert broker.alive()
    assert honest.count_msgs(HONEST_QUEUE) == len(stored)
    honest.subscribe(f"/queue/{HONEST_QUEUE}", ack="client-individual", prefetch=50)
    got = []
    for _ in range(len(stored)):
        m = honest.message(timeout=10)
        got.append(m.body)
        honest.ack(m, receipt=False)
    honest.expect_nothing(0.3)
    assert got == stored, "the honest client lost or reordered messages"
    assert honest.count_msgs(HONEST_QUEUE) == 0
    assert "Traceback" not in broker.stderr()
    report("network fuzz", examples=RUNS["network"], honest_messages=len(stored))


def test_random_frames_over_sockets_leave_the_broker_up_and_the_honest_client_whole(broker):
    network_fuzz(broker, NET_EXAMPLES)


@pytest.mark.slow
def test_random_frames_over_sockets_leave_the_broker_up_and_the_honest_client_whole_long(broker):
    network_fuzz(broker, NET_SLOW_EXAMPLES)
