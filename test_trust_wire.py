"""What a client can make the broker write, and atomic transactions (SPEC §3, §7).

Every test starts the real broker (conftest.py) and reads the broker's output as raw bytes, so
that an extra header line smuggled in through an escape shows up as what it is on the wire:

- §3 destinations with a control character (LF/CR through a 1.1/1.2 escape, raw tab and other
  C0 characters in any version) are an ERROR for SEND and SUBSCRIBE; nothing is stored or
  delivered to subscribers of the destination they imitate;
- §3 every header the broker writes (MESSAGE `subscription`, custom headers, ERROR `message`) is
  encoded for the receiving connection's version: 1.2 escapes LF/CR/colon/backslash, 1.1 cannot
  escape CR (a space), 1.0 has no escapes (LF/CR, and a colon in a name, become spaces);
- §7 a bad frame in a transaction is an ERROR when it is taken in, not at COMMIT, and nothing of
  the transaction is applied; at most 1,000 open transactions, each costing at least 1 KiB against
  `-max-pending`;
- the README's stomp.py example runs as written against the broker.
"""

import re
import subprocess
import sys
import time

import pytest

from conftest import HERE, RECV_TIMEOUT, encode_frame
from test_hostile import error_lines

BODY = b"body\x00with\nnul and \\ and :"
NOTE_RAW = r"a\nforged:1\r\cb\\c"           # as a 1.2 producer writes it
NOTE = "a\nforged:1\r:b\\c"                 # what it decodes to
NAME_RAW, NAME = r"x\cy", "x:y"             # a header name holding a colon

ENCODE = {"1.2": {"\\": "\\\\", "\n": "\\n", "\r": "\\r", ":": "\\c"},
          "1.1": {"\\": "\\\\", "\n": "\\n", "\r": " ", ":": "\\c"},
          "1.0": {"\n": " ", "\r": " "}}
UNESCAPE = re.compile(r"\\[\\ncr]")


# --------------------------------------------------------------------------------------------
# Helpers: raw bytes off a Client's socket
# --------------------------------------------------------------------------------------------

def encoded(text, version, name=False):
    """`text` as the broker must write it in a header to a `version` connection."""
    table = dict(ENCODE[version])
    if version == "1.0" and name:
        table[":"] = " "
    return text.translate(str.maketrans(table))


def unescaped(raw):
    return UNESCAPE.sub(lambda m: {"\\\\": "\\", "\\n": "\n", "\\c": ":", "\\r": "\r"}[m[0]], raw)


def split_frame(data):
    """(command, raw header lines, body, rest) of the first frame in `data`, or None if it is
    incomplete.  The body length comes from content-length (which MESSAGE and ERROR carry)."""
    data = data.lstrip(b"\r\n")
    end = data.find(b"\n\n")
    if end < 0:
        return None
    command, *lines = data[:end].decode().split("\n")
    lengths = [int(l.split(":", 1)[1]) for l in lines if l.startswith("content-length:")]
    start = end + 2
    stop = start + lengths[0] if lengths else data.find(b"\x00", start)
    if stop < 0 or len(data) <= stop:
        return None
    assert data[stop] == 0, f"no NUL after the body: {data[:stop + 1]!r}"
    return command, lines, data[start:stop], data[stop + 1:]


def raw_frames(c, n, timeout=RECV_TIMEOUT):
    """The next `n` frames `c` receives, each (command, raw header lines, body), read as bytes."""
    assert not c.backlog, f"{c.name}: frames already parsed: {list(c.backlog)!r}"
    data, frames = c.take_bytes(), []
    deadline = time.monotonic() + timeout
    while len(frames) < n:
        got = split_frame(data)
        if got is not None:
            frames.append(got[:3])
            data = got[3]
            continue
        left = deadline - time.monotonic()
        assert left > 0, f"{c.name}: {len(frames)} of {n} frames within {timeout}s; {data!r}"
        c.sock.settimeout(left)
        chunk = c.sock.recv(65536)
        assert chunk, f"{c.name}: closed after {frames!r}, then {data!r}"
        data += chunk
    c.parser.feed(data)
    return frames


def raw_until_closed(c, timeout=RECV_TIMEOUT):
    """Every byte `c` receives until the broker closes the connection."""
    data = c.take_bytes()
    c.sock.settimeout(timeout)
    while chunk := c.sock.recv(65536):
        data += chunk
    return data


def names(lines):
    return sorted(line.split(":", 1)[0] for line in lines)


def value(lines, name):
    [v] = [l.split(":", 1)[1] for l in lines if l.split(":", 1)[0] == name]
    return v


def first_then_closed(c):
    """The first frame `c` gets (which must be an ERROR with a message) and then the close."""
    f = c.recv()
    assert f.command == "ERROR" and f.get("message"), f"expected an ERROR, got {f!r}"
    assert c.expect_closed() == [], "frames after the ERROR"
    return f


def try_send(c, data):
    try:
        c.send_raw(data)
    except OSError:                 # the broker may have closed already
        pass


# ============================================================================================
# §3 Destinations with control characters
# ============================================================================================

BAD_DESTINATIONS = [                           # version, command, destination as written
    ("1.1", "SEND", r"/queue/a\nforged:yes"),
    ("1.2", "SEND", r"/queue/a\nforged:yes"),
    ("1.1", "SEND", r"/topic/a\nforged:yes"),
    ("1.2", "SEND", r"/topic/a\nforged:yes"),
    ("1.2", "SEND", r"/queue/a\rforged:yes"),
    ("1.2", "SEND", r"/topic/a\rforged:yes"),
    ("1.0", "SEND", "/queue/a\tb"),
    ("1.0", "SEND", "/topic/a\x01b"),
    ("1.2", "SEND", "/queue/a\x1fb"),
    ("1.2", "SEND", "/topic/a\tb"),
    ("1.2", "SUBSCRIBE", r"/queue/a\nforged:yes"),
    ("1.1", "SUBSCRIBE", r"/topic/a\nforged:yes"),
    ("1.0", "SUBSCRIBE", "/topic/a\x01b"),
    ("1.2", "SUBSCRIBE", "/topic/a\x1f*"),
]
CONTROL_NAMES = {"\\n": "-escaped-LF-", "\\r": "-escaped-CR-", "\t": "-TAB-", "\x01": "-0x01-",
                 "\x1f": "-0x1f-"}


def bad_destination_id(case):
    version, command, destination = case
    for char, label in CONTROL_NAMES.items():
        destination = destination.replace(char, label)
    return f"{version}-{command}-{destination.strip('/').replace('/', '-')}"


@pytest.mark.parametrize("version,command,destination", BAD_DESTINATIONS,
                         ids=[bad_destination_id(case) for case in BAD_DESTINATIONS])
def test_a_destination_with_a_control_character_is_an_error(broker, version, command,
                                                             destination):
    """SEND/SUBSCRIBE to a destination that holds (or decodes to) a control character gets an
    ERROR and a close; subscribers of /queue/a, /topic/a and /topic/a* get nothing (raw bytes
    up to a sentinel sent afterwards), and nothing is stored in /queue/a."""
    watchers = []
    for v in ("1.0", "1.2"):
        w = broker.client(v)
        w.subscribe("/queue/a", id="q", ack="client")
        w.subscribe("/topic/a", id="t")
        w.subscribe("/topic/a*", id="p")
        watchers.append(w)
    c = broker.client(version)
    headers = [("destination", destination), ("receipt", "bad")]
    headers += [("id", "s")] if command == "SUBSCRIBE" else []
    try_send(c, encode_frame(command, headers, b"forged body" if command == "SEND" else b""))

    other = broker.client()
    other.send("/topic/a", b"sentinel")
    for w in watchers:               # anything the bad frame caused would come before these
        for cmd, lines, body in raw_frames(w, 2):
            assert (cmd, body, value(lines, "destination")) == ("MESSAGE", b"sentinel", "/topic/a"), \
                f"{w.version} watcher got {cmd} {lines!r} {body!r}"
            assert "forged" not in "".join(lines)
    assert other.count_msgs("a") == 0
    first_then_closed(c)


# ============================================================================================
# §3 Headers are encoded for the receiver's version
# ============================================================================================

def produce(broker, destination):
    """A 1.2 producer SENDs BODY with escaped custom headers to `destination`."""
    p = broker.client("1.2")
    p.send_frame("SEND", [("destination", destination), ("x-note", NOTE_RAW), (NAME_RAW, "v"),
                          ("receipt", "p1")], BODY)
    p.receipt("p1")


def check_message(frame, version, sub_id, destination, with_ack, queue=False):
    """The raw MESSAGE has exactly the header lines SPEC §5 lists (and §12's delivery-count
    on a queue message), encoded for `version`."""
    command, lines, body = frame
    assert command == "MESSAGE" and body == BODY, frame
    custom = [f"x-note:{encoded(NOTE, version)}", f"{encoded(NAME, version, name=True)}:v"]
    expected = ["subscription", "message-id", "destination", "content-length"]
    expected += [l.split(":", 1)[0] for l in custom] + (["ack"] if with_ack else [])
    expected += ["delivery-count"] if queue else []
    assert names(lines) == sorted(expected), f"{version}: {lines!r}"
    for line in custom:
        assert line in lines, f"{version}: no {line!r} in {lines!r}"
    assert value(lines, "subscription") == sub_id
    assert value(lines, "destination") == destination
    assert value(lines, "content-length") == str(len(BODY))
    if with_ack:
        assert value(lines, "ack") == value(lines, "message-id")
    assert not any("\r" in l for l in lines), lines


@pytest.mark.parametrize("version,ack", [("1.0", "auto"), ("1.0", "client"), ("1.1", "client"),
                                         ("1.2", "auto"), ("1.2", "client-individual")])
def test_queue_message_headers_are_encoded_for_the_subscribers_version(broker, qname, version, ack):
    """LF, CR, colon and backslash in a custom header's name and value reach a 1.0/1.1/1.2 queue
    subscriber as its version can carry them, one line each, with `ack` only for 1.2 client
    acks, and the body intact."""
    s = broker.client(version)
    s.subscribe(f"/queue/{qname}", id="sub-1", ack=ack)
    produce(broker, f"/queue/{qname}")
    [frame] = raw_frames(s, 1)
    check_message(frame, version, "sub-1", f"/queue/{qname}", version == "1.2" and ack != "auto",
                  queue=True)
    assert value(frame[1], "delivery-count") == "1"


def test_topic_message_headers_are_encoded_for_each_subscribers_version(broker, qname):
    """One topic message reaches 1.0, 1.1 and 1.2 subscribers and a 1.2 prefix subscriber, each
    with the headers encoded for its own version."""
    destination = f"/topic/{qname}.news"
    subs = []
    for version in ("1.0", "1.1", "1.2"):
        s = broker.client(version)
        s.subscribe(destination, id=f"t-{version}")
        subs.append((s, f"t-{version}"))
    prefix = broker.client("1.2")
    prefix.subscribe(f"/topic/{qname}.*", id="p")
    subs.append((prefix, "p"))
    produce(broker, destination)
    for s, sub_id in subs:
        [frame] = raw_frames(s, 1)
        check_message(frame, s.version, sub_id, destination, with_ack=False)


@pytest.mark.parametrize("kind", ["queue", "topic"])
@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_a_subscription_id_with_an_escaped_lf_comes_back_escaped_on_one_line(broker, qname,
                                                                            version, kind):
    """SUBSCRIBE `id:s\\nforged:2` comes back as one escaped `subscription` line on MESSAGE."""
    s = broker.client(version)
    s.send_frame("SUBSCRIBE", [("destination", f"/{kind}/{qname}"), ("id", r"s\nforged:2"),
                               ("receipt", "r")])
    s.receipt("r")
    broker.client().send(f"/{kind}/{qname}", b"hello")
    [(command, lines, body)] = raw_frames(s, 1)
    assert command == "MESSAGE" and body == b"hello"
    expected = ["subscription", "message-id", "destination", "content-length"]
    assert names(lines) == sorted(expected + (["delivery-count"] if kind == "queue" else [])), lines
    assert unescaped(value(lines, "subscription")) == "s\nforged:2", lines


# ============================================================================================
# §3 ERROR frames quoting client input
# ============================================================================================

ERROR_INPUTS = {                                 # id: version, frames (command, raw headers)
    "1.2-ack-mode-escaped-LF":
        ("1.2", [("SUBSCRIBE", [("destination", "/queue/q"), ("id", "s"), ("ack", r"bogus\nmode")])]),
    "1.1-ack-mode-escaped-LF":
        ("1.1", [("SUBSCRIBE", [("destination", "/queue/q"), ("id", "s"), ("ack", r"bad\nforged:1")])]),
    "1.2-control-destination-escaped-LF":
        ("1.2", [("SEND", [("destination", r"/control/nonsense\nforged:1")])]),
    "1.1-control-destination-raw-CR":
        ("1.1", [("SEND", [("destination", "/control/nonsense\rforged:1")])]),
    "1.2-unknown-transaction-escaped-LF":
        ("1.2", [("COMMIT", [("transaction", r"t\nforged:1")])]),
    "1.2-duplicate-subscription-id-escaped-LF":
        ("1.2", [("SUBSCRIBE", [("destination", "/topic/t"), ("id", r"s\nforged:1")])] * 2),
}


@pytest.mark.parametrize("version,frames", list(ERROR_INPUTS.values()),
                         ids=list(ERROR_INPUTS))
def test_an_error_quoting_client_input_writes_only_its_own_header_lines(broker, version, frames):
    """An ERROR whose message quotes a decoded value with LF or CR is well formed: its header
    lines are only message/receipt-id/content-length/version, none holds a raw CR, and nothing
    follows it."""
    c = broker.client(version)
    for i, (command, headers) in enumerate(frames):
        try_send(c, encode_frame(command, headers + [("receipt", f"r{i}")]))
    data = raw_until_closed(c)
    while data.lstrip(b"\r\n").startswith(b"RECEIPT\n"):       # the first duplicate SUBSCRIBE
        data = data[data.index(b"\x00") + 1:]
    got = split_frame(data)
    assert got is not None, f"no complete frame before the close: {data!r}"
    command, lines, body, rest = got
    assert command == "ERROR" and rest.strip(b"\r\n") == b"", data
    assert set(names(lines)) <= {"message", "receipt-id", "content-length", "version"}, lines
    assert len(names(lines)) == len(set(names(lines))) and "message" in names(lines), lines
    assert not any("\r" in l for l in lines), lines
    assert value(lines, "content-length") == str(len(body))


# ============================================================================================
# §7 Atomic transactions
# ============================================================================================

BAD_IN_TX = {
    "ack-without-id": ("ACK", []),
    "nack-without-id": ("NACK", []),
    "send-to-unknown-control": ("SEND", [("destination", "/control/nonsense")]),
}


@pytest.mark.parametrize("kind", list(BAD_IN_TX))
def test_a_bad_frame_in_a_transaction_is_an_error_before_commit_and_nothing_is_applied(broker, qname,
                                                                                      kind):
    """BEGIN; SEND to a queue; a bad frame (receipted), COMMIT: the ERROR answers the bad frame
    (no RECEIPT for it), the connection closes, and the SEND is never stored."""
    command, headers = BAD_IN_TX[kind]
    c = broker.client()
    c.send_raw(b"".join([
        encode_frame("BEGIN", [("transaction", "tx"), ("receipt", "begin")]),
        encode_frame("SEND", [("destination", f"/queue/{qname}"), ("transaction", "tx"),
                              ("receipt", "send")], b"in tx"),
        encode_frame(command, headers + [("transaction", "tx"), ("receipt", "bad")]),
        encode_frame("COMMIT", [("transaction", "tx"), ("receipt", "commit")]),
    ]))
    frames = c.expect_closed()
    assert [(f.command, f.get("receipt-id")) for f in frames] == \
        [("RECEIPT", "begin"), ("RECEIPT", "send"), ("ERROR", "bad")], frames
    assert broker.client().count_msgs(qname) == 0


def test_a_good_transaction_of_three_sends_stores_all_three_at_commit(broker, qname):
    """BEGIN, 3 SENDs, COMMIT: nothing before COMMIT, all 3 after."""
    c, other = broker.client(), broker.client()
    c.begin("tx")
    for i in range(3):
        c.send(f"/queue/{qname}", f"m{i}", headers={"transaction": "tx"})
    assert other.count_msgs(qname) == 0
    c.commit("tx")
    assert other.count_msgs(qname) == 3


def begins(n, prefix="tx"):
    return b"".join(encode_frame("BEGIN", [("transaction", f"{prefix}{i}"), ("receipt", f"b{i}")])
                    for i in range(n))


def receipts_then_error(c, limit):
    """How many RECEIPTs `c` gets (up to `limit`) before an ERROR, and that ERROR (or None)."""
    count = 0
    while count < limit:
        f = c.recv()
        if f.command == "ERROR":
            return count, f
        assert f.command == "RECEIPT", f
        count += 1
    return count, None


def test_at_most_1000_open_transactions_per_connection(broker, qname):
    """1,000 BEGINs succeed; the 1,001st is an ERROR about transactions and a close; another
    connection is unaffected."""
    other = broker.client()
    c = broker.client()
    c.send_raw(begins(1000))
    assert receipts_then_error(c, 1000) == (1000, None)
    c.send_frame("BEGIN", [("transaction", "one-too-many"), ("receipt", "last")])
    err = first_then_closed(c)
    assert "transaction" in err["message"], err
    other.send(f"/queue/{qname}", b"still fine")
    assert other.count_msgs(qname) == 1


def test_each_open_transaction_costs_at_least_1_kib_against_max_pending(start_broker):
    """With -max-pending 102400, at most 100 empty transactions fit: of 150 BEGINs at most 100
    are answered before an ERROR and a close."""
    b = start_broker("-max-pending", "102400")
    c = b.client()
    try_send(c, begins(150))
    count, err = receipts_then_error(c, 150)
    assert err is not None and err.get("message"), f"{count} BEGINs answered, no ERROR"
    assert count <= 100, f"{count} empty transactions held within 100 KiB"
    assert c.expect_closed() == []


# ============================================================================================
# The README's example
# ============================================================================================

def readme_example():
    """The ```python block of README.md's section "An example with stomp.py"."""
    with open(f"{HERE}/README.md") as f:
        text = f.read()
    section = text.split("## An example with stomp.py", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_readme_stomp_py_example_works_as_written(broker, tmp_path):
    """The README example, with only the port changed, prints the message, ACKs it (the queue is
    empty afterwards) and makes the broker log no ERROR."""
    pytest.importorskip("stomp")
    code = readme_example()
    assert "61613" in code
    script = tmp_path / "readme_example.py"
    script.write_text(code.replace("61613", str(broker.port)))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert any(line.startswith("got") for line in run.stdout.splitlines()), run.stdout
    assert broker.client().count_msgs("jobs") == 0, "the example's message was not ACKed"
    assert error_lines(broker) == []


@pytest.mark.parametrize("name", ["content-length ", r"content-length\c", " destination",
                                  "message-id\t"])
def test_a_header_that_reads_as_the_brokers_own_is_not_passed_on(broker, qname, name):
    """A 1.0 subscriber trims blanks and reads a colon in a name as a blank: a producer's
    `content-length ` (or `content-length\\c`) must not reach it as a second content-length
    that would cut the body short and turn the rest into a frame of the producer's making."""
    plain = broker.client("1.0")
    plain.subscribe(f"/queue/{qname}", ack="client")
    forged = b"\x00MESSAGE\nmessage-id:forged\ndestination:/queue/x\n\nevil\x00"
    producer = broker.client("1.2")
    producer.send_raw(b"SEND\ndestination:/queue/%s\n%s:0\nreceipt:r\ncontent-length:%d\n\n%s\x00"
                      % (qname.encode(), name.encode(), len(forged), forged))
    producer.receipt("r")
    [(command, lines, body)] = raw_frames(plain, 1)
    assert command == "MESSAGE" and body == forged, (lines, body)
    reads_as = name.replace("\\c", "").strip()
    assert [l for l in lines if l.replace(":", " ").split()[0] == reads_as] == \
        [l for l in lines if l.startswith(reads_as + ":")], lines
    plain.expect_nothing()
