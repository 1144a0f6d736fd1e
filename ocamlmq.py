#!/usr/bin/env python3
"""ocamlmq.py: a small, durable STOMP broker for task queues, in one file of standard Python.

    python3 ocamlmq.py [options] [sqlite3 database (default: ocamlmq.db)]

The file reads top to bottom in four layers, each using only the ones above it:

1. The STOMP codec: bytes in, frames out, and frames to bytes. No sockets.
2. The broker: clients, subscriptions, queues, topics, acks, transactions and timers, on top of a
   `MessageStore` (an in-memory cache in front of a small storage backend: storage_sqlite.py by
   default, storage_pg.py with -pg). It talks to a client only by appending frames to its `outbox`
   and setting its `closing` flag; it asks for timers through the `call_later` it is handed.
3. The reactor: one thread, `selectors`, non-blocking sockets, a `heapq` of timers.
4. The command line.

Theory of operation
-------------------
A queue message is *stored* when its SEND is handled: into the cache if the SEND had no receipt,
into this turn's durable batch if it had one. Then it is *ready*: it waits in its queue, ordered
by priority (highest first) and then age, until a subscription has room under its prefetch limit.
It is then *delivered*: written to that subscriber and remembered, with an ack-timeout deadline if
the SEND gave one, until the subscriber ACKs it, which *deletes* it from the cache or the disk.
A NACK, a passed deadline, an UNSUBSCRIBE or the end of the connection puts the message back in
its queue, its delivery count kept with it, for the next ready subscription; a message delivered
-max-deliveries times (or NACKed with requeue:false) moves to its dead-letter queue instead. A
message past its `expires` time is dropped (or dead-lettered, if it asked for that); a delayed
one waits on disk until its time. Nothing else ever drops a message.

The reactor runs in turns: wait for sockets and timers, handle every complete frame that arrived,
then commit the turn's durable batch with one disk sync (group commit), and only then write the
clients' outboxes. So a RECEIPT never leaves before the message it confirms is on disk, and every
frame leaves in the order of the client frames that caused it. The cache is written to disk every
-flush-period seconds or once it holds more than -maxmsgs messages; a message ACKed before that
never touches the disk. After a restart everything stored and not ACKed is delivered again.

Memory follows what is active, not what is stored: a queue is in memory only while it has
subscribers, and then only a window of its next messages; the rest of its backlog stays on disk
and is read in batches, in delivery order, as the window drains.
"""

import base64
import collections
import contextlib
import ctypes
import errno
import hashlib
import heapq
import itertools
import json
import logging
import math
import re
import resource
import selectors
import signal
import socket
import ssl
import sys
import time
import types
import urllib.parse

SERVER_NAME = "ocamlmq.py/1.0"
VERSIONS = ("1.0", "1.1", "1.2")

log = logging.getLogger("ocamlmq")


# ==============================================================================================
# 1. STOMP codec: bytes in, frames out, and back. No sockets, no broker state.
# ==============================================================================================

class ProtocolError(Exception):
    """The peer sent bytes that are not a STOMP frame we accept. The message is for the peer;
    `receipt` is the bad frame's receipt header, when its head could be read."""

    def __init__(self, message, receipt=None):
        super().__init__(message)
        self.receipt = receipt


class Frame:
    """One STOMP frame. `headers` maps each name to its first value (the first header wins)."""
    __slots__ = ("command", "headers", "body", "size")

    def __init__(self, command, headers, body=b"", size=0):
        self.command = command
        self.headers = headers
        self.body = body
        self.size = size          # its bytes on the wire, head and body

    def __repr__(self):
        return f"Frame({self.command!r}, {self.headers!r}, {self.body[:40]!r})"


UNESCAPES = {"1.1": {"\\\\": "\\", "\\n": "\n", "\\c": ":"},
             "1.2": {"\\\\": "\\", "\\n": "\n", "\\c": ":", "\\r": "\r"}}
# How each version writes a header (name table, value table). 1.0 has no escapes, so what would
# end a line (and, in a name, the colon) becomes a space; 1.1 cannot escape CR, likewise.
_V10_VALUE = {"\n": " ", "\r": " "}
_V11 = {"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": " "}
_V12 = {"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"}
HEADER_ENCODINGS = {
    "1.0": (str.maketrans({**_V10_VALUE, ":": " "}), str.maketrans(_V10_VALUE)),
    "1.1": (str.maketrans(_V11), str.maketrans(_V11)),
    "1.2": (str.maketrans(_V12), str.maketrans(_V12)),
}
ESCAPE_SEQUENCE = re.compile(r"\\.?")
NEEDS_ENCODING = re.compile(r"[\\:\n\r]")   # a search is far cheaper than a translate
FRAME_END = b"\0\n"
EOL_STARTS = (b"\n", b"\r\n")   # what a heart-beat or a frame-ending EOL starts with
EOLS = re.compile(rb"(?:\r?\n)+")


def unescape(value, version):
    """Decode STOMP 1.1/1.2 header escapes; an undefined escape is a protocol error."""
    if "\\" not in value:
        return value
    table = UNESCAPES[version]

    def replace(match):
        try:
            return table[match.group()]
        except KeyError:
            raise ProtocolError(f"undefined escape sequence {match.group()!r} in header") from None
    return ESCAPE_SEQUENCE.sub(replace, value)


def encode_headers(headers, version):
    """The header lines of (name, value) pairs, encoded for a receiver speaking `version`.

    This is the only place where the broker makes header lines, so whatever a client put in a
    value (a decoded LF, CR or colon) stays inside its own line: no client can add a header to,
    or end the head of, a frame that someone else receives."""
    names, values = HEADER_ENCODINGS[version]
    lines = []
    for name, value in headers:
        value = str(value)
        if NEEDS_ENCODING.search(name):
            name = name.translate(names)
        if NEEDS_ENCODING.search(value):
            value = value.translate(values)
        lines.append(f"{name}:{value}\n")
    return "".join(lines).encode()


def encode_message_head(subscription, message_id, ack, deliveries, version):
    """The start of a MESSAGE frame: the headers that differ per delivery (encode_headers,
    unrolled for the fast path: only the subscription id can hold a character to escape).
    `deliveries` counts this one; topic messages have none (0)."""
    if NEEDS_ENCODING.search(subscription):
        subscription = subscription.translate(HEADER_ENCODINGS[version][1])
    head = f"MESSAGE\nsubscription:{subscription}\nmessage-id:{message_id}\n"
    if ack:
        head += f"ack:{message_id}\n"
    if deliveries:
        head += f"delivery-count:{deliveries}\n"
        if deliveries > 1:
            head += "redelivered:true\n"
    return head.encode()


def encode_message_tail(destination, headers, body_length, version):
    """The rest of a MESSAGE's head, which every subscriber of one version gets alike. The
    client's own headers come last: the first of two same-named headers is the one that counts."""
    if NEEDS_ENCODING.search(destination):
        destination = destination.translate(HEADER_ENCODINGS[version][1])
    custom = encode_headers(headers, version) if headers else b""
    return b"destination:%s\ncontent-length:%d\n%s\n" % (destination.encode(), body_length,
                                                           custom)


def encode_frame(command, headers, body=None, version="1.2"):
    """The bytes of a frame. `headers` is a list of (name, value) pairs, encoded for `version`
    (CONNECTED never escapes, as STOMP 1.2 says). With a body, `content-length` is added."""
    if body is not None:
        headers = [*headers, ("content-length", len(body))]
    head = b"%s\n%s\n" % (command.encode(),
                          encode_headers(headers, "1.0" if command == "CONNECTED" else version))
    return head + body + FRAME_END if body else head + FRAME_END


class FrameParser:
    """Incremental STOMP frame parser: `feed(bytes)`, then `next_frame()` until it returns None.
    One frame at a time, so that the caller can switch `version` (header trimming and escapes)
    right after CONNECT. It owns the limits: anything over them, or malformed, raises
    ProtocolError. It remembers how far it searched: a frame arriving in pieces is scanned once."""

    def __init__(self, max_frame_size=16 * 1024 * 1024, max_headers=1000, max_line=64 * 1024):
        self.max_frame_size = max_frame_size
        self.max_headers = max_headers
        self.max_line = max_line
        self.version = "1.0"
        self.buffer = bytearray()
        self.pos = 0              # where the pending frame starts; what is before it is done
        self.scanned = 0          # bytes of the pending frame already searched
        self.newlines = 0         # EOLs seen in the pending frame's head so far
        self.head = None          # (command, headers, content_length, body offset) once parsed

    def feed(self, data):
        if self.pos:              # drop the frames already taken: once per feed, not per frame
            del self.buffer[:self.pos]
            self.pos = 0
        self.buffer += data

    def discard(self):
        """Let go of everything held: the connection is closing."""
        self.buffer = bytearray()
        self.pos = self.scanned = self.newlines = 0
        self.head = None

    def buffered(self):
        return len(self.buffer) - self.pos

    def next_frame(self):
        """The next complete frame, or None until more bytes arrive."""
        buf, pos = self.buffer, self.pos
        if self.head is None:
            if buf.startswith(EOL_STARTS, pos):
                pos = self._skip_eols()
            end = 0 if self.scanned else buf.find(b"\n\n", pos) + 2
            if end < 2 or buf.find(13, pos, end) >= 0:   # in pieces, or CRs: the careful search
                end = self._find_head_end(pos)
                if end < 0:
                    return None
            command, headers, length = self._parse_head(buf[pos:end])
            body_offset = scan_from = end - pos
        else:
            command, headers, length, body_offset = self.head
            scan_from, self.head, self.scanned = self.scanned, None, 0
        body_start = pos + body_offset
        if length is not None:
            body_end = body_start + length
            if body_offset + length > self.max_frame_size:
                raise ProtocolError(f"frame larger than {self.max_frame_size} bytes",
                                    headers.get("receipt"))
            if body_end >= len(buf):
                self.head = command, headers, length, body_offset
                return None
            if buf[body_end] != 0:
                raise ProtocolError("frame body does not end with NUL where content-length says",
                                    headers.get("receipt"))
        else:
            body_end = buf.find(0, pos + scan_from)
            if body_end < 0:
                body_end = len(buf)
            if body_end - pos > self.max_frame_size:
                raise ProtocolError(f"frame larger than {self.max_frame_size} bytes",
                                    headers.get("receipt"))
            if body_end == len(buf):
                self.head, self.scanned = (command, headers, length, body_offset), body_end - pos
                return None
        self.pos = body_end + 1
        return Frame(command, headers, bytes(buf[body_start:body_end]), body_end + 1 - pos)

    def _skip_eols(self):
        """Step over the heart-beats and frame-ending EOLs at `pos` (there is one); return where
        the next frame starts."""
        self.pos = EOLS.match(self.buffer, self.pos).end()
        self.scanned = self.newlines = 0
        return self.pos

    def _find_head_end(self, pos):
        """Where the body starts, after the blank line that ends the head; -1 if not yet here.
        It checks the limits as the head arrives, so that they hold alike whole or in pieces."""
        buf = self.buffer
        if buf.startswith(b"\0", pos):
            raise ProtocolError("empty frame: NUL where a command was expected")
        start = max(pos, pos + self.scanned - 3)
        lf = buf.find(b"\n\n", start)
        crlf = buf.find(b"\n\r\n", start, lf + 2 if lf >= 0 else len(buf))   # one that ends first
        if crlf >= 0 or lf >= 0:
            self.scanned = self.newlines = 0
            return crlf + 3 if crlf >= 0 else lf + 2
        if pos == len(buf):       # all consumed: do not hold the last frame's bytes
            buf.clear()
            self.pos = 0
            return -1
        if len(buf) - pos > self.max_frame_size:
            raise ProtocolError(f"frame larger than {self.max_frame_size} bytes")
        line_start = max(pos, buf.rfind(b"\n", pos, pos + self.scanned) + 1)
        while True:
            eol = buf.find(b"\n", max(line_start, pos + self.scanned))
            end = len(buf) if eol < 0 else eol
            if end - line_start - (buf[end - 1] == 13 if end > line_start else 0) > self.max_line:
                raise ProtocolError(f"header line longer than {self.max_line} bytes")
            if eol < 0:
                break
            self.newlines += 1
            if self.newlines > self.max_headers + 1:
                raise ProtocolError(f"more than {self.max_headers} headers")
            line_start = eol + 1
        self.scanned = len(buf) - pos
        return -1

    def _parse_head(self, head):
        """(command, headers, content_length) from the command line and header lines."""
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("headers are not valid UTF-8") from None
        if "\0" in text:
            raise ProtocolError("NUL byte in the headers")
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        lines = text.split("\n")
        if len(lines) - 3 > self.max_headers:    # the command, the headers, the blank line
            raise ProtocolError(f"more than {self.max_headers} headers")
        if len(head) > self.max_line and max(
                len(line) - line.endswith(b"\r") for line in head.split(b"\n")) > self.max_line:
            raise ProtocolError(f"header line longer than {self.max_line} bytes")
        command = lines[0]
        trim = self.version == "1.0" or command in ("CONNECT", "STOMP")
        escaped = not trim and "\\" in text
        headers = {}
        bad_escape = None
        for line in lines[1:-2]:
            name, colon, value = line.partition(":")
            if not colon:
                raise ProtocolError(f"header line without a colon: {line[:80]!r}")
            if trim:
                name, value = name.strip(), value.strip()
            elif escaped:
                try:
                    name, value = unescape(name, self.version), unescape(value, self.version)
                except ProtocolError as e:    # read on, for the receipt to answer
                    bad_escape = bad_escape or e
                    continue
            if name not in headers:
                headers[name] = value
        if bad_escape:
            bad_escape.receipt = headers.get("receipt")
            raise bad_escape
        length = headers.get("content-length")
        if length is not None:
            if not (length.isdigit() and length.isascii()):
                raise ProtocolError(f"bad content-length {length[:40]!r}", headers.get("receipt"))
            length = int(length)
        return command, headers, length


# ---- WebSocket (RFC 6455), server side: bytes in, a byte stream for the STOMP codec out --------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")     # the first one offered wins
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0, 1, 2, 8, 9, 10
HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 403: "Forbidden",
                404: "Not Found", 426: "Upgrade Required", 431: "Request Header Fields Too Large"}


def unmask(data, mask):
    """XOR `data` with the repeated 4-byte `mask`, as one big-integer operation."""
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def is_utf8(buf, last=[None, False]):
    """Whether a buffer holds UTF-8; the last answer is kept, for a topic body that goes to
    many subscribers."""
    if type(buf) is bytes and buf.isascii():
        return True
    if last[0] is not buf:
        try:
            str(buf, "utf-8")
            last[:] = buf, True
        except UnicodeDecodeError:
            last[:] = buf, False
    return last[1]


def http_response(status, headers=(), body=b""):
    lines = [f"HTTP/1.1 {status} {HTTP_REASONS[status]}", *(f"{k}: {v}" for k, v in headers)]
    if status != 101:
        lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class WebSocket:
    """One WebSocket connection, server side, without I/O (like FrameParser). `feed(bytes)`
    returns the payload of the data messages that arrived, text or binary alike: for STOMP they
    are one byte stream (a message may hold several frames or a part of one). What must be
    written back (the handshake's answer, pongs, the close) collects in `replies`; `closing`:
    the connection ends once they are written. `metrics_wanted`: the request was `GET /metrics`,
    for the caller to answer. `frame(buffers)` wraps one outgoing STOMP frame as a message."""
    MAX_REQUEST = 8192

    def __init__(self, max_message, origins=None):
        self.max_message = max_message    # -max-frame-size: the largest data message taken
        self.origins = origins            # allowed Origin values ("*": any); None: same host
        self.buffer = bytearray()
        self.open = False                 # the handshake is done
        self.closing = self.metrics_wanted = False
        self.replies = []
        self.ping = None                  # the payload of the latest ping not yet answered
        self.in_message = False           # between the fragments of a data message
        self.message_size = 0
        self.frame_left = 0               # payload bytes of the current data frame still due
        self.mask = b""

    def feed(self, data):
        self.buffer += data
        try:
            if not self.open and not self._handshake():
                return b""
            return self._frames()
        except WebSocketError as e:
            self.buffer.clear()
            if self.open:
                self.close(e.code, str(e))
            else:
                self.replies.append(http_response(e.code, e.headers, str(e).encode()))
                self.closing = True
            return b""

    def _handshake(self):
        """Read the HTTP request; True once the connection is a WebSocket."""
        end = self.buffer.find(b"\r\n\r\n")
        if end > self.MAX_REQUEST or (end < 0 and len(self.buffer) > self.MAX_REQUEST):
            raise WebSocketError(431, "request too large")
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[:end + 4]
        request = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
        if len(request) != 3 or request[0] != "GET":
            raise WebSocketError(400, "only GET requests are served here")
        if request[1].split("?")[0] == "/metrics":
            self.metrics_wanted = self.closing = True
            return False
        if "websocket" not in headers.get("upgrade", "").lower():
            raise WebSocketError(404, "not found: STOMP over WebSocket and /metrics live here")
        if headers.get("sec-websocket-version") != "13":
            raise WebSocketError(426, "WebSocket version 13 only", [("Sec-WebSocket-Version", 13)])
        key = headers.get("sec-websocket-key", "")
        if not key:
            raise WebSocketError(400, "no Sec-WebSocket-Key")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, headers.get("host", "")):
            raise WebSocketError(403, f"origin {origin[:100]!r} not allowed (see -ws-origin)")
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        answer = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                  ("Sec-WebSocket-Accept", accept)]
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        chosen = next((p for p in WS_SUBPROTOCOLS if p in offered), None)
        if chosen:
            answer.append(("Sec-WebSocket-Protocol", chosen))
        self.replies.append(http_response(101, answer))
        self.open = True
        return True

    def origin_allowed(self, origin, host):
        """A browser page may connect if -ws-origin allows its origin, or by default if it
        comes from the host name the broker was reached at (any port)."""
        if self.origins is not None:
            return "*" in self.origins or origin.lower() in self.origins
        try:
            hostname = urllib.parse.urlsplit(origin).hostname
            return hostname is not None and hostname == urllib.parse.urlsplit(
                "//" + host).hostname
        except ValueError:
            return False

    def _frames(self):
        """The payload of the data frames in the buffer; control frames are answered."""
        out = []
        buf = self.buffer
        while buf and not self.closing:
            if self.frame_left:           # more of a data frame's payload: pass it on now
                chunk = bytes(buf[:self.frame_left])
                del buf[:len(chunk)]
                out.append(unmask(chunk, self.mask))
                shift = len(chunk) % 4
                self.mask = self.mask[shift:] + self.mask[:shift]
                self.frame_left -= len(chunk)
                continue
            if len(buf) < 2:
                break
            fin, opcode, masked, size = buf[0] & 0x80, buf[0] & 0x0F, buf[1] & 0x80, buf[1] & 0x7F
            start = 2 + (2 if size == 126 else 8 if size == 127 else 0)
            if len(buf) < start + 4:
                break
            if size >= 126:
                size = int.from_bytes(buf[2:start], "big")
            if buf[0] & 0x70:
                raise WebSocketError(1002, "reserved bits set")
            if not masked:
                raise WebSocketError(1002, "a client's frames must be masked")
            if opcode >= WS_CLOSE:
                if opcode > WS_PONG or not fin or size > 125:
                    raise WebSocketError(1002, "bad control frame")
                if len(buf) < start + 4 + size:
                    break
                payload = unmask(bytes(buf[start + 4:start + 4 + size]), buf[start:start + 4])
                del buf[:start + 4 + size]
                self._control(opcode, payload)
                continue
            if opcode not in (WS_CONTINUATION, WS_TEXT, WS_BINARY) or \
                    (opcode == WS_CONTINUATION) != self.in_message:
                raise WebSocketError(1002, f"unexpected frame (opcode {opcode})")
            self.message_size = (self.message_size if self.in_message else 0) + size
            if self.message_size > self.max_message:
                raise WebSocketError(1009, f"message larger than {self.max_message} bytes")
            self.in_message = not fin
            self.mask = bytes(buf[start:start + 4])
            self.frame_left = size
            del buf[:start + 4]
        return b"".join(out)

    def _control(self, opcode, payload):
        if opcode == WS_PING:             # answered once per read, the latest (RFC 6455 5.5.3)
            self.ping = payload
        elif opcode == WS_CLOSE:          # answer with the same code, then end
            if len(payload) == 1:
                raise WebSocketError(1002, "bad close frame")
            self.replies.append(self.message(WS_CLOSE, payload[:2]))
            self.closing = True

    def close(self, code, reason=""):
        """Begin the close handshake from our side."""
        if not self.closing:
            self.replies.append(self.message(WS_CLOSE, code.to_bytes(2, "big")
                                             + reason.encode()[:120]))
            self.closing = True

    @staticmethod
    def message(opcode, payload):
        return WebSocket.header(opcode, len(payload)) + payload

    @staticmethod
    def header(opcode, size):
        if size < 126:
            return bytes((0x80 | opcode, size))
        if size < 65536:
            return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
        return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")

    def frame(self, buffers, size):
        """One outgoing STOMP frame of `size` bytes as one message: text, or binary if its body
        is not UTF-8. Returns the buffers to write, and their size."""
        body = buffers[-2] if len(buffers) > 2 else buffers[0]    # the rest is ours: text
        opcode = WS_TEXT if is_utf8(body) else WS_BINARY
        header = self.header(opcode, size)
        return (header, *buffers), size + len(header)


class WebSocketError(Exception):
    """A WebSocket peer broke RFC 6455 (`code`: the close code to send), or an HTTP request
    is refused (`code`: the HTTP status)."""

    def __init__(self, code, message, headers=()):
        super().__init__(message)
        self.code = code
        self.headers = headers


# ==============================================================================================
# 2. The broker: clients, subscriptions, queues, topics, acks, transactions, storage.
# ==============================================================================================

class ClientError(Exception):
    """A client broke the protocol or the SPEC; it gets an ERROR with this message and is closed."""


class Message:
    """A queue or topic message. `rank` is minus the priority, so (rank, id) sorts in delivery
    order; `headers`: the client's own SEND headers, passed on to MESSAGE; times: Unix seconds."""
    __slots__ = ("id", "queue", "rank", "ack_timeout", "headers", "body", "size", "deliveries",
                 "expires", "ready_at", "state", "timer")

    def __init__(self, msg_id, queue, rank, ack_timeout, headers, body, size, deliveries=0,
                 expires=None, ready_at=None):
        self.id = msg_id
        self.queue = queue            # queue name, or None for a topic message
        self.rank = rank
        self.ack_timeout = ack_timeout
        self.headers = headers        # [(name, value), ...]
        self.body = body
        self.size = size              # what it costs in memory, about: body and headers
        self.deliveries = deliveries  # how often it was delivered (as far as the disk knows)
        self.expires = expires        # never delivered from then on
        self.ready_at = ready_at      # a delayed message: not delivered before then
        # Where the store holds it (CACHED, BATCHED, ... below), and its ack-timeout while it is
        # delivered and not ACKed.
        self.state = self.timer = None

    def row(self):
        """As a backend stores it (6 columns when the rest is at its default); a delayed message
        waits under a queue name of its own, so that reading a queue never steps over it."""
        headers = json.dumps(self.headers) if self.headers else "[]"
        queue = self.queue if self.ready_at is None else DELAYED + self.queue
        row = (self.id, queue, self.rank, self.ack_timeout, headers, self.body)
        if self.deliveries or self.expires is not None or self.ready_at is not None:
            row += (self.deliveries, self.expires, self.ready_at)
        return row

    @classmethod
    def from_row(cls, row, queue=None):
        """From a backend's row: all its columns, or those a fetch of `queue` reads."""
        if queue is None:
            msg_id, queue, rank, ack_timeout, headers, body, deliveries, expires, ready_at = row
            queue = queue if ready_at is None else queue[len(DELAYED):]
        else:
            (msg_id, rank, ack_timeout, headers, body, deliveries, expires), ready_at = row, None
        size = len(body) + len(headers)
        headers = [tuple(h) for h in json.loads(headers)] if headers != "[]" else []
        return cls(msg_id, queue, rank, ack_timeout, headers, bytes(body), size, deliveries,
                   expires, ready_at)


DELAYED = "\x1f"      # the prefix of a delayed message's stored queue name (a client's queue
                      # name cannot hold a control character)


# Where the store holds a message (Message.state). A message moves down this list, except that a
# failed commit sends INSERTED messages back to RECACHED.
CACHED = "cached"             # in memory only; inserted at the next flush (no receipt waits)
BATCHED = "batched"           # in memory only; a RECEIPT waits: inserted and synced this turn
RECACHED = "recached"         # in memory again, to be written again: after a failed commit (its
                              # row may exist or not), or back from a delivery (its row has an
                              # older delivery count)
INSERTED = "inserted"         # its row is in the open transaction, durable at the next commit
ON_DISK = None                # its row is committed
ACKED = "acked"               # done: never written, its row (if any) deleted
UNSAVED = (CACHED, BATCHED, RECACHED)   # the states of a message the database may lack

PAGE_ROWS = 500                   # a read of stored messages stops after this many of them,
PAGE_BYTES = 8 * 1024 * 1024      # or after the one that brings their bodies to this many bytes


def full_page(msgs):
    """Whether a read of stored messages stopped at a limit: the store may have more."""
    return len(msgs) == PAGE_ROWS or sum(len(msg.body) for msg in msgs) >= PAGE_BYTES


class MessageStore:
    """Where queue messages live until ACKed: an in-memory cache in front of a disk backend.

    The broker calls:
      save(msg, durable)  a new message: into this turn's batch if `durable` (a RECEIPT waits),
                          else into the cache.
      ack(msg)            the message is done: drop it from memory, or delete its row.
      returned(msg)       back from a delivery: its row is written again, with its count.
      move(msg, queue)    to another queue (dead-lettered), synced like the batch.
      want_sync()         a RECEIPT of this turn promises something durable (an ACK's delete).
      commit()            end of a reactor turn: insert the batch and apply the deletes, synced
                          in one transaction; nothing at all when no receipt waits.
      flush()             write the cache too (every -flush-period, or when over -maxmsgs).
      fetch(queue, after), take_due(now) (delayed messages whose time has come, made ready),
      take_expired(now, after) (each reads a page: see full_page), count(queue, now),
      next_due(), max_id(), close().
    Reads see everything: the queue's unsaved messages are inserted into the open transaction
    first (no sync), and the pending deletes applied.

    A backend (storage_sqlite.SqliteBackend, storage_pg.PgBackend) only stores rows (see
    Message.row): max_id(), insert(rows) (replacing rows of the same ids), delete(ids),
    commit(), fetch(queue, after, rows, max_bytes), due(column, after, now, rows, max_bytes) (by
    the key (column, id)), next_due(), count(queues, now), close(). Writes join an open
    transaction that commit() makes durable; reads see it. A fetch or due stops after `rows`
    rows, or after the one that brings their bodies to `max_bytes`.
    A failure raises the backend's StorageError and loses that transaction: the store keeps in
    memory all that was not committed (RECACHED), says `healthy = False`, and tries again only
    at the next flush.
    """

    INSERT_CHUNK = 1000           # rows made and inserted at once: a failing try costs one chunk

    def __init__(self, backend, storage_error):
        self.backend = backend
        self.StorageError = storage_error
        self.unsaved = {}         # queue name -> {id: Message} in CACHED, BATCHED or RECACHED
        self.unsaved_count = self.unsaved_bytes = 0   # and their size (Message.size)
        self.batch = []           # messages saved with a receipt this turn
        self.inserted = []        # messages INSERTED into the open transaction
        self.inserted_bytes = 0
        self.deletes = []         # ids of ACKed messages whose rows are to be deleted
        self.applied = []         # deletes done in the open transaction, not yet committed
        self.sync_wanted = False  # a receipt waits for this turn's commit
        self.healthy = True
        self.stored = backend.count()     # messages not ACKed, on disk or not (for /metrics)
        self.commits, self.commit_seconds = 0, 0.0     # for /metrics

    def max_id(self):
        return self.backend.max_id()

    def save(self, msg, durable):
        self.stored += 1
        msg.state = BATCHED if durable else CACHED
        if durable:
            self.batch.append(msg)
        self._keep_unsaved(msg)

    def ack(self, msg):
        state = msg.state
        if state is ON_DISK or state is INSERTED or state is RECACHED:
            self.deletes.append(msg.id)
        if state in UNSAVED:
            self._forget_unsaved(msg)
        if state is not ACKED:
            self.stored -= 1
        msg.state = ACKED

    def returned(self, msg):
        if msg.state is ON_DISK or msg.state is INSERTED:
            msg.state = RECACHED
            self._keep_unsaved(msg)

    def move(self, msg, queue):
        """Written at once (its old row may exist), so that no read sees it where it was."""
        if msg.state in UNSAVED:
            self._forget_unsaved(msg)
        msg.queue, msg.deliveries, msg.expires, msg.ready_at = queue, 0, None, None
        msg.state = RECACHED
        self._keep_unsaved(msg)
        self.sync_wanted = True
        if self.healthy:
            try:
                self._insert([msg])
            except self.StorageError as e:
                self._failed(e)

    def want_sync(self):
        self.sync_wanted = True

    def commit(self):
        """Insert the batch and apply the deletes, synced; nothing when no receipt waits.
        Raises StorageError, at once while unhealthy: the receipts of this turn must not go."""
        if not (self.batch or self.sync_wanted):
            return
        batch, self.batch = self.batch, []
        self.sync_wanted = False
        try:
            if not self.healthy:
                raise self.StorageError("storage unavailable")
            self._write(batch)
        except self.StorageError:
            for msg in batch:     # kept, unconfirmed, for the next flush
                if msg.state is BATCHED:
                    msg.state = CACHED
            raise

    def flush(self):
        """Write every unsaved message and delete, synced. Raises StorageError."""
        if self.healthy and not (self.unsaved or self.deletes or self.applied or self.inserted):
            return
        self._write([msg for msgs in self.unsaved.values() for msg in msgs.values()])
        self.unsaved = {}         # empty now; a new dict gives back what a million queues took

    def fetch(self, queue, after):
        return [Message.from_row(row, queue) for row in self._read(
            queue, self.backend.fetch, queue, after, PAGE_ROWS, PAGE_BYTES)]

    def take_due(self, now):
        """A page of delayed messages now due, written again (ready) into the transaction."""
        msgs = self._due("ready_at", now)
        for msg in msgs:
            msg.ready_at, msg.state = None, RECACHED
            self._keep_unsaved(msg)
        try:
            self._insert(msgs)
        except self.StorageError as e:
            self._failed(e)
        return msgs

    def take_expired(self, now, after):
        """A page of messages on disk expired by `now`, (expires, id) after `after`, not cached."""
        return [msg for msg in self._due("expires", now, after)
                if msg.id not in self.unsaved.get(msg.queue, ())]

    def _due(self, column, now, after=(-math.inf, 0)):
        return [Message.from_row(row) for row in self._read(
            None, self.backend.due, column, after, now, PAGE_ROWS, PAGE_BYTES)]

    def next_due(self):
        return self._read(None, self.backend.next_due)

    def count(self, queue, now):
        """Rows, and unsaved messages never written (a RECACHED one has a row while healthy)."""
        unsaved = self.unsaved.get(queue, {}).values()
        return self._read(None, self.backend.count, [queue, DELAYED + queue], now) + sum(
            msg.state is not RECACHED and (msg.expires is None or msg.expires > now)
            for msg in unsaved)

    def _read(self, queue, read, *args):
        """A read that sees the pending deletes and `queue`'s unsaved messages, inserted first
        (unsynced, unless a RECEIPT waits for one: then this turn's commit syncs them)."""
        if not self.healthy:      # the deletes could not be applied
            raise self.StorageError("storage unavailable")
        unsaved = list(self.unsaved.get(queue, {}).values())
        if any(msg.state is BATCHED for msg in unsaved):
            self.sync_wanted = True
        try:
            self._insert(unsaved)
            self._apply_deletes()
            return read(*args)
        except self.StorageError as e:
            self._failed(e)
            raise

    def over(self, max_messages, max_bytes):
        """Whether more is held unsynced (unsaved, or in the open transaction) than should be."""
        return (self.unsaved_count + len(self.inserted) > max_messages
                or self.unsaved_bytes + self.inserted_bytes > max_bytes)

    def close(self):
        self.flush()
        self.backend.close()

    def _keep_unsaved(self, msg):
        self.unsaved.setdefault(msg.queue, {})[msg.id] = msg
        self.unsaved_count += 1
        self.unsaved_bytes += msg.size

    def _forget_unsaved(self, msg):
        msgs = self.unsaved[msg.queue]
        del msgs[msg.id]
        if not msgs:
            del self.unsaved[msg.queue]
        self.unsaved_count -= 1
        self.unsaved_bytes -= msg.size

    def _insert(self, msgs):
        """Insert the rows of the unsaved ones of `msgs` into the open transaction, a chunk at a
        time: reads see them from now on, and the next commit makes them durable."""
        msgs = [msg for msg in msgs if msg.state in UNSAVED]
        for start in range(0, len(msgs), self.INSERT_CHUNK):
            chunk = msgs[start:start + self.INSERT_CHUNK]
            self.backend.insert([msg.row() for msg in chunk])
            for msg in chunk:
                self._forget_unsaved(msg)
                msg.state = INSERTED
                self.inserted_bytes += msg.size
            self.inserted += chunk

    def _write(self, msgs):
        """One transaction for `msgs`, the rows inserted before and the pending deletes,
        committed and synced."""
        try:
            self._insert(msgs)
            self._apply_deletes()
            start = time.perf_counter()
            self.backend.commit()
            self.commits += 1
            self.commit_seconds += time.perf_counter() - start
        except self.StorageError as e:
            self._failed(e)
            raise
        if not self.healthy:
            log.warning("storage is back")
        self.healthy = True
        self.applied = []
        for msg in self.inserted:
            if msg.state is INSERTED:
                msg.state = ON_DISK
        self.inserted = []
        self.inserted_bytes = 0

    def _apply_deletes(self):
        """Delete ACKed rows in the open transaction, so that reads no longer see them."""
        if self.deletes:
            ids, self.deletes = self.deletes, []
            self.applied += ids
            self.backend.delete(ids)

    def _failed(self, error):
        """The open transaction is lost: its deletes are to be done again, and its rows go back
        into memory, to be written at the next flush. Logged once per outage, whichever call
        met it first."""
        if self.healthy:
            log.error("storage failed: %s; unreceipted messages are kept in memory, receipted "
                      "frames get ERRORs, and each flush tries again", error)
        self.healthy = False
        self.deletes = self.applied + self.deletes
        self.applied = []
        for msg in self.inserted:
            if msg.state is INSERTED:
                msg.state = RECACHED
                self._keep_unsaved(msg)
        self.inserted = []
        self.inserted_bytes = 0


class Client:
    """One connection's broker-side state. The broker appends frames to `outbox` and sets
    `closing`; the reactor writes the outbox, tells the broker what it wrote, and closes.
    A frame is a tuple of buffers (a topic message's are shared by its subscribers' outboxes),
    written, or dropped, whole: `head_sent` bytes of the first one are written, `unsent` bytes
    are still to write, and `frames_sent` of the `frames_queued` ever queued are written."""
    __slots__ = ("session", "peer", "parser", "version", "connected", "closing", "outbox",
                 "head_sent", "unsent", "shared_frames", "frames_queued", "frames_sent",
                 "after_write", "subscriptions", "deliveries", "transactions", "transaction_bytes",
                 "input_held", "transport_held", "reading_paused", "held_frame", "watching_stall",
                 "output_full", "last_input", "last_output", "timers", "framing", "__weakref__")

    def __init__(self, session, peer, parser):
        self.session = session
        self.peer = peer
        self.parser = parser
        self.version = "1.0"
        self.connected = self.closing = False
        self.outbox = []
        self.head_sent = self.unsent = 0
        self.shared_frames = 0    # frames in the outbox with buffers shared with other outboxes
        self.frames_queued = self.frames_sent = 0
        self.after_write = collections.deque()  # (frame number, subscription, message-id):
                                                # deliveries waiting for their frame's write
        self.subscriptions = {}   # subscription id -> Subscription
        self.deliveries = {}      # message-id -> Subscription, for this client's unacked messages
        self.transactions = {}    # transaction id -> [(command handler, frame), ...]
        self.transaction_bytes = 0    # what the open transactions cost, about
        self.input_held = 0       # bytes of input the parser holds (counted in Broker.held)
        self.transport_held = 0   # output its transport holds beyond the outbox (TLS)
        self.reading_paused = False   # storage backpressure: its frames wait unread
        self.held_frame = None    # a frame that needs storage, waiting out backpressure
        self.watching_stall = False   # a timer watches its incomplete frame
        self.output_full = False  # outbox above the high-water mark: no queue deliveries
        self.last_input = self.last_output = 0.0
        self.timers = []
        self.framing = None       # set by a transport that wraps each frame (WebSocket)

    def holding(self):
        """What this connection makes the broker hold, shared buffers counted in full."""
        return self.input_held + self.unsent + self.transaction_bytes + self.transport_held


QUEUE, TOPIC, PREFIX = "queue", "topic", "prefix"   # Subscription.kind
ACK_MODES = {mode: mode for mode in ("auto", "client", "client-individual")}


class Subscription:
    """A client's subscription. `next`/`prev` link it into a ring (see ring_add): its topic's
    subscribers, or its queue's subscriptions with room for another message. Small on purpose
    (there may be millions): each kind is a subclass with only the slots it needs."""
    __slots__ = ("client", "id", "target", "ack_mode", "next", "prev")
    kind = None

    def __init__(self, client, sub_id, target, ack_mode):
        self.client = client
        self.id = sub_id
        self.target = target
        self.ack_mode = ack_mode
        self.next = self.prev = None


class TopicSubscription(Subscription):
    """A subscription to one topic; `target` is the topic name."""
    __slots__ = ()
    kind = TOPIC

    def destination(self):
        return "/topic/" + self.target


class PrefixSubscription(Subscription):
    """A subscription to every topic whose name starts with `target`."""
    __slots__ = ()
    kind = PREFIX

    def destination(self):
        return "/topic/" + self.target + "*"


class QueueSubscription(Subscription):
    """A subscription to a queue; `target` is the Queue. At most `prefetch` messages are
    delivered and not yet ACKed at once."""
    __slots__ = ("prefetch", "unacked")
    kind = QUEUE

    def __init__(self, client, sub_id, queue, ack_mode, prefetch):
        super().__init__(client, sub_id, queue, ack_mode)
        self.prefetch = prefetch
        self.unacked = None       # message-id -> Message delivered and not ACKed, in order

    def destination(self):
        return "/queue/" + self.target.name

    def has_room(self):
        client = self.client
        return (not self.unacked or len(self.unacked) < self.prefetch) \
            and not client.output_full and not client.closing

    def settle(self, msg_id):
        """Take a delivered message out of the unacked ones (ACK, NACK, ack-timeout, end) and
        cancel its ack-timeout; returns it, or None if it is not (or no longer) unacked."""
        msg = self.unacked.pop(msg_id, None) if self.unacked else None
        if msg is not None:
            self.client.deliveries.pop(msg_id, None)
            self.target.in_flight -= 1
            if msg.timer is not None:
                msg.timer.cancel()
                msg.timer = None
        return msg


def ring_add(head, sub):
    """Add `sub` at the end of the ring that starts at `head`; returns the ring's head.
    A ring is a circular doubly linked list through the subscriptions themselves: adding,
    removing and rotating cost O(1), and an empty ring costs nothing."""
    if sub.next is not None:
        return head
    if head is None:
        sub.next = sub.prev = sub
        return sub
    tail = head.prev
    sub.prev, sub.next = tail, head
    tail.next = head.prev = sub
    return head


def ring_remove(head, sub):
    """Take `sub` out of the ring that starts at `head`; returns the ring's head (or None)."""
    after = sub.next
    if after is None:
        return head
    if after is sub:
        head = None
    else:
        sub.prev.next = after
        after.prev = sub.prev
        if head is sub:
            head = after
    sub.next = sub.prev = None
    return head


def ring_members(head):
    members, sub = [], head
    while sub is not None and not (members and sub is head):
        members.append(sub)
        sub = sub.next
    return members


class Queue:
    """An active queue (one with subscribers): a window of its next messages in a heap of
    (rank, id, Message), and `cursor`, the greatest key it took into memory. While
    `backlog_on_disk`, the store may hold messages after the cursor that are not in memory
    (all in memory sort at or before it, so reading on from it never fetches one twice);
    otherwise all its messages are in memory (heap or delivered), and a new one joins the heap."""
    __slots__ = ("name", "subscribers", "ready", "heap", "heap_bytes", "backlog_on_disk",
                 "cursor", "in_flight")

    WINDOW = 2000                 # messages (and body bytes, below) held in memory before new
    WINDOW_BYTES = 8 * 1024 * 1024    # ones are left on disk
    START = (-2 ** 63, 0)         # a key before every message

    def __init__(self, name):
        self.name = name
        self.subscribers = self.heap_bytes = 0
        self.ready = None         # ring of subscriptions with room; the head is served next
        self.heap = None          # made when the first message arrives
        self.backlog_on_disk = True
        self.cursor = Queue.START
        self.in_flight = 0        # delivered, not ACKed


try:   # glibc's malloc keeps in its heap the pages that big bodies freed (with 1 MB messages, as
       # much again as the memory in use); malloc_trim, called every flush period, gives them back
    give_back_free_memory = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):     # another C library: nothing to do
    def give_back_free_memory(pad):
        pass


HEART_BEAT_FRAME = (b"\n",)
LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})   # a Prometheus label value
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")
HEART_BEAT = re.compile(r" *([0-9]{1,9}) *, *([0-9]{1,9}) *")   # milliseconds, up to ~11 days
DECIMAL = re.compile(r"[0-9]{1,20}(\.[0-9]{0,20})?|\.[0-9]{1,20}")


def parse_int(value, what, limit=2 ** 63 - 1, low=None):
    """A decimal integer header; beyond +-limit (priorities are stored as 64-bit), or below
    `low`, is an error."""
    if not re.fullmatch(r"-?[0-9]{1,400}", value) or not (
            -limit if low is None else low) <= int(value) <= limit:
        raise ClientError(f"invalid {what} {value[:40]!r}")
    return int(value)


class Broker:
    """The STOMP broker. The reactor calls connection_made, data_received, output_written,
    connection_lost and end_of_turn; everything else happens in the command handlers below."""

    HIGH_WATER = 1024 * 1024      # pause queue deliveries to a client above this much unsent
    MAX_CACHED_BYTES = 64 * 1024 * 1024   # flush the cache past this, whatever -maxmsgs says
    CONNECT_DEADLINE = 10.0
    STALL_DEADLINE = 30.0         # an incomplete frame must get a new byte this often
    MAX_TRANSACTIONS = 1000       # open transactions per connection
    MAX_NAME = 1024               # bytes of a destination's name (a database index holds it)
    TRANSACTION_COST = 1024       # what an open transaction counts for, at least
    SHARE_FROM = 4096             # a MESSAGE this large is not copied into the outbox (a
                                  # topic's body and headers are shared by every outbox); a
                                  # smaller one costs less to copy than to keep apart

    SETTINGS = {"login": None, "passcode": None, "max_prefetch": 100,   # the command line's
                "max_pending": 64 * 1024 * 1024, "maxmsgs": 100000, "flush_period": 1.0,
                "max_frame_size": 16 * 1024 * 1024, "max_memory": 1 << 30, "max_deliveries": 0}

    def __init__(self, store, call_later, clock=time.monotonic, wall_clock=time.time,
                 **settings):
        self.store = store
        self.call_later = call_later
        self.clock = clock
        self.wall_clock = wall_clock  # Unix time, for `expires` and delays
        for name, default in self.SETTINGS.items():
            setattr(self, name, settings.pop(name, default))
        if settings:
            raise TypeError(f"unknown broker settings {sorted(settings)}")
        self.queues = {}            # name -> Queue, for queues with subscribers
        self.topics = {}            # name -> ring of its subscriptions
        self.prefixes = {}          # prefix -> ring of its subscriptions
        self.prefix_lengths = {}    # length -> how many prefixes of that length are subscribed
        self.next_id = max(store.max_id(), time.time_ns() // 1000) + 1
        self.sessions, self.clients = 0, set()
        self.to_write = set()       # clients whose outbox or reading state changed this turn
        self.awaiting_sync = {}     # client -> its outbox's frame count before a durable RECEIPT
        self.held = 0               # bytes clients make the broker hold, shared ones once
        self.shared = {}            # id(topic body memoryview) -> its buffers shared by outboxes:
                                    # (users: frames holding them, size: their bytes, counted once)
        self.producers_held = False  # storage backpressure: queue senders are not read
        self.totals = dict.fromkeys(("received", "delivered", "acked", "redelivered",
                                     "dead_lettered", "expired"), 0)   # for /metrics
        call_later(self.flush_period, self.periodic_flush)
        self.due_at = self.due_timer = None     # when the first delayed message is due
        self.purged_to = (-math.inf, 0)   # the (expires, id) key the purge goes on after
        self.watch_due(store.next_due())

    # ---- what the reactor calls ------------------------------------------------------------

    def connection_made(self, peer):
        self.sessions += 1
        client = Client(f"session-{self.sessions}", peer, FrameParser(self.max_frame_size))
        client.last_input = client.last_output = self.clock()
        self.client_timer(client, self.CONNECT_DEADLINE, self.connect_deadline)
        self.clients.add(client)
        return client

    def data_received(self, client, data):
        """Handle every complete frame in `data`; a bad one ends the connection with an ERROR.
        While storage holds producers back, a frame that needs storage waits, and so does the
        rest of the connection's input."""
        if client.closing:
            return
        client.last_input = self.clock()
        frame = None
        try:
            client.parser.feed(data)
            while not client.closing:
                frame, client.held_frame = client.held_frame, None
                if frame is None:
                    frame = client.parser.next_frame()
                    if frame is None:
                        break
                if self.producers_held and self.needs_storage(frame):
                    client.held_frame = frame
                    client.reading_paused = True
                    self.to_write.add(client)     # the reactor stops reading its socket
                    break
                self.handle(client, frame)
                frame = None
        except ProtocolError as e:
            self.fail(client, str(e), receipt_id=e.receipt)
        except ClientError as e:
            self.fail(client, str(e), frame)
        except self.store.StorageError as e:
            self.fail(client, f"storage unavailable: {e}", frame)
        except Exception:         # a bug of ours: end this connection only, keep serving the rest
            log.exception("%s: internal error handling %r", client.session, frame)
            self.fail(client, "internal error", frame)
        self.count_input(client)

    def connection_lost(self, client):
        """The socket is gone: every unacked queue message goes back to its queue at once."""
        if client.connected or client.subscriptions:
            log.debug("%s: connection closed", client.session)
        client.closing = True
        self.release(client)
        for frame in client.outbox:
            self.let_go(client, frame)
        client.outbox = []
        client.unsent = client.head_sent = 0
        self.transport_holds(client, 0)
        self.clients.discard(client)

    def output_written(self, client, sent):
        """The reactor wrote `sent` more bytes of the outbox. Drop the frames now fully written;
        what waited for their write happens now: auto-ACKs, and ack-timeouts start. Queue
        deliveries resume once the outbox is below the high-water mark."""
        client.unsent -= sent
        client.last_output = self.clock()
        outbox = client.outbox
        if not client.unsent and not client.shared_frames:   # all written, the usual case
            self.held -= client.head_sent + sent
            count = len(outbox)
            outbox.clear()
            client.head_sent = 0
        else:
            done = client.head_sent + sent
            count = released = 0
            for frame in outbox:
                if len(frame) == 1:       # most frames: one buffer of nothing shared
                    size = len(frame[0])
                    if done < size:
                        break
                    released += size
                else:
                    size = sum(map(len, frame))
                    if done < size:
                        break
                    self.let_go(client, frame, size)
                done -= size
                count += 1
            self.held -= released
            del outbox[:count]
            client.head_sent = done
        client.frames_sent += count
        touched = set()
        after_write = client.after_write
        while after_write and after_write[0][0] <= client.frames_sent:
            _, sub, msg_id = after_write.popleft()
            if sub.ack_mode == "auto":
                msg = sub.settle(msg_id)
                if msg is not None:
                    self.store.ack(msg)
                    self.totals["acked"] += 1
                    touched.add(sub)
            else:
                self.start_ack_timeout(sub, msg_id)
        if client.output_full and client.unsent < self.HIGH_WATER:
            client.output_full = False
            touched.update(s for s in client.subscriptions.values() if s.kind == QUEUE)
        for sub in touched:
            self.make_ready(sub)

    def end_of_turn(self):
        """Group commit: sync this turn's receipted messages before any RECEIPT is written.
        If the disk write fails, the receipts that waited for it become ERRORs."""
        try:
            self.store.commit()
        except self.store.StorageError:
            for client, mark in list(self.awaiting_sync.items()):
                if client not in self.clients:    # gone meanwhile
                    continue
                self.drop_output(client, mark)
                self.fail(client, "not confirmed: the message could not be stored (storage "
                                  "unavailable)", again=True)
        self.awaiting_sync.clear()
        if self.store.healthy and self.store.over(self.maxmsgs, self.MAX_CACHED_BYTES):
            self.flush()
        if self.held > self.max_memory:
            self.shed_load()

    # ---- sending to clients ----------------------------------------------------------------

    def send(self, client, frame, size, shared=0, raw=False):
        """Queue a frame (a tuple of buffers of `size` bytes) on the client's outbox. `shared`:
        how many of its bytes are in buffers that other outboxes share (see publish), counted
        once already. The client's transport may wrap the frame, unless it is `raw` (the
        transport's own bytes)."""
        if client.framing is not None and not raw:
            frame, size = client.framing(frame, size)
        client.outbox.append(frame)
        client.frames_queued += 1
        client.unsent += size
        self.held += size - shared
        if shared:
            client.shared_frames += 1
        self.to_write.add(client)
        if client.unsent > self.HIGH_WATER:
            client.output_full = True
        if client.unsent > self.max_pending and not client.closing:
            self.drop_output(client, 0)   # it would not read them in time; the ERROR goes next
            self.fail(client, "slow consumer: too much unsent output")

    def let_go(self, client, frame, size=None):
        """A frame (of `size` bytes) left an outbox, written or dropped: uncount what it held.
        A topic MESSAGE's shared buffers (..., tail, body, FRAME_END) are uncounted with the
        last frame that holds them."""
        size = sum(map(len, frame)) if size is None else size
        if len(frame) > 2 and type(frame[-2]) is memoryview:
            self.held -= size - len(frame[-3]) - len(frame[-2])
            self.unshare(frame[-2])
            client.shared_frames -= 1
        else:
            self.held -= size

    def unshare(self, body):
        shared = self.shared[id(body)]
        shared.users -= 1
        if not shared.users:
            del self.shared[id(body)]
            self.held -= shared.size

    def drop_output(self, client, keep):
        """Forget the frames after the first `keep`, except one already begun: a frame is
        written whole or not at all. Deliveries in dropped frames stay unacked, and go back
        to their queues when the connection closes."""
        keep = max(keep, 1 if client.head_sent else 0)
        dropped = client.outbox[keep:]
        del client.outbox[keep:]
        for frame in dropped:
            client.unsent -= sum(map(len, frame))
            self.let_go(client, frame)
        client.frames_queued -= len(dropped)
        after_write = client.after_write
        while after_write and after_write[-1][0] > client.frames_queued:
            after_write.pop()

    def send_frame(self, client, command, headers, body=None):
        frame = encode_frame(command, headers, body, client.version)
        self.send(client, (frame,), len(frame))

    def receipt(self, client, frame, **extra):
        receipt_id = frame.headers.get("receipt")
        if receipt_id is not None:
            self.send_frame(client, "RECEIPT", [("receipt-id", receipt_id), *extra.items()])

    def hold_until_synced(self, client):
        """What the client is sent from here on in this turn depends on the turn's commit: if
        that fails, it is replaced by an ERROR (see end_of_turn)."""
        self.awaiting_sync.setdefault(client, len(client.outbox))   # a count of frames

    def fail(self, client, message, frame=None, receipt_id=None, again=False, **extra):
        """The one place that answers a client's mistake: ERROR, then close, and release.
        The ERROR answers the receipt of the bad `frame` (or `receipt_id`) if it had one.
        `again`: the client may be closing already, but its ERROR was dropped."""
        if client.closing and not again:
            return
        log.info("%s: ERROR %s", client.session, message)
        headers = [("message", message), *extra.items()]
        if frame is not None:
            receipt_id = frame.headers.get("receipt")
        if receipt_id is not None:
            headers.append(("receipt-id", receipt_id))
        client.closing = True
        self.send_frame(client, "ERROR", headers, message.encode() + b"\n")
        self.close(client)

    def close(self, client):
        """Close after the outbox is written; unacked messages go back to their queues now."""
        client.closing = True
        self.to_write.add(client)
        self.release(client)

    # ---- memory and backpressure -----------------------------------------------------------

    def count_input(self, client):
        """Count what the client's parser holds; watch an incomplete frame for stalls."""
        held = 0 if client.closing else client.parser.buffered() + (
            client.held_frame.size if client.held_frame else 0)
        self.held += held - client.input_held
        client.input_held = held
        if held and not client.watching_stall and not client.reading_paused:
            client.watching_stall = True
            self.client_timer(client, self.STALL_DEADLINE, self.check_stalled)
        if self.held > self.max_memory:
            self.shed_load()

    def shed_load(self):
        """Over -max-memory: close the connections that hold the most until under it (one
        already closing just loses the output it has not begun to receive)."""
        shed = set()
        while self.held > self.max_memory:
            candidates = [c for c in self.clients if c not in shed and c.holding()]
            if not candidates:
                return
            worst = max(candidates, key=Client.holding)
            shed.add(worst)
            self.drop_output(worst, 0)
            self.fail(worst, "the broker's memory limit is reached (-max-memory) and this "
                             "connection holds the most")

    @staticmethod
    def needs_storage(frame):
        """Whether a frame stores messages: a queue SEND of its own, or a COMMIT."""
        return frame.command == "COMMIT" or (
            frame.command == "SEND" and "transaction" not in frame.headers
            and frame.headers.get("destination", "").startswith("/queue/"))

    def transport_holds(self, client, size):
        """The client's transport now holds `size` bytes of its output beyond the outbox (TLS
        ciphertext not yet sent): counted like the outbox."""
        self.held += size - client.transport_held
        client.transport_held = size

    def resume_reading(self):
        for client in [c for c in self.clients if c.reading_paused]:
            client.reading_paused = False
            self.to_write.add(client)
            self.data_received(client, b"")

    # ---- frames ------------------------------------------------------------------------------

    def handle(self, client, frame):
        handler = self.COMMANDS.get(frame.command)
        if handler is None:
            raise ClientError(f"unknown command {frame.command[:40]!r}")
        if not client.connected and handler is not Broker.cmd_connect:
            raise ClientError("the first frame must be CONNECT or STOMP")
        if "transaction" in frame.headers and handler in self.TRANSACTIONAL:
            tx = self.transaction_id(client, frame)
            if handler is Broker.cmd_send:    # refuse a bad frame now: COMMIT applies all
                if self.parse_send(frame)[0] == "control":
                    raise ClientError("a control destination cannot be used in a transaction")
            else:
                self.ack_id(frame)
            self.hold_for_transaction(client, self.held_cost(frame))
            client.transactions[tx].append((handler, frame))
            self.receipt(client, frame)
            return
        handler(self, client, frame)

    def cmd_connect(self, client, frame):
        if client.connected:
            raise ClientError("already connected")
        h = frame.headers
        accepted = h.get("accept-version", "1.0").split(",")
        common = [v for v in VERSIONS if v in (a.strip() for a in accepted)]
        if not common:
            self.fail(client, f"no common protocol version; this broker speaks "
                              f"{','.join(VERSIONS)}", version=",".join(VERSIONS))
            return
        if self.login is not None and (h.get("login") != self.login
                                       or h.get("passcode") != self.passcode):
            raise ClientError("wrong login or passcode")
        version = common[-1]
        client.version = client.parser.version = version
        client.connected = True
        client.timers.pop(0).cancel()
        headers = [("version", version), ("session", client.session), ("server", SERVER_NAME)]
        if version != "1.0":
            headers.append(("heart-beat", self.negotiate_heartbeat(client, h.get("heart-beat"))))
        self.send_frame(client, "CONNECTED", headers)

    def negotiate_heartbeat(self, client, value):
        """The client's cx,cy becomes our sx=cy, sy=cx (each 0, or at least 100 ms)."""
        beats = HEART_BEAT.fullmatch("0,0" if value is None else value)
        if beats is None:
            raise ClientError(f"bad heart-beat header {value[:40]!r}")
        cx, cy = int(beats[1]), int(beats[2])
        send_every = max(cy, 100) if cy else 0
        expect_every = max(cx, 100) if cx else 0
        if send_every:
            self.client_timer(client, send_every / 1000, self.beat, send_every / 1000)
        if expect_every:
            self.client_timer(client, 2 * expect_every / 1000, self.check_alive,
                              2 * expect_every / 1000)
        return f"{send_every},{expect_every}"

    def parse_destination(self, destination):
        """('queue'|'topic'|'control', name) from a destination, or a ClientError."""
        if destination is None:
            raise ClientError("missing destination header")
        if not destination.isprintable() and CONTROL_CHARACTER.search(destination):
            raise ClientError(f"control character in destination {destination[:100]!r}")
        kind, _, name = destination[1:].partition("/")
        if not destination.startswith("/") or kind not in ("queue", "topic", "control") \
                or not name:
            raise ClientError(f"unknown destination {destination[:100]!r}")
        if len(name) > 256 and kind != "control" and len(name.encode()) > self.MAX_NAME:
            raise ClientError(f"destination name longer than {self.MAX_NAME} bytes")
        return kind, name

    def parse_send(self, frame):
        """(kind, name, rank, ack_timeout, expires, ready_at) of a SEND, every header checked;
        for a control destination, name is (question, kind, target) (see control)."""
        h = frame.headers
        kind, name = self.parse_destination(h.get("destination"))
        if kind == "control":
            name = self.parse_control(name)
        elif name.endswith("*"):
            raise ClientError("cannot SEND to a destination ending in '*'")
        priority = h.get("priority")
        priority = 0 if priority is None else parse_int(priority, "priority")
        ack_timeout = h.get("ack-timeout")
        if ack_timeout is not None:
            if not DECIMAL.fullmatch(ack_timeout):
                raise ClientError(f"invalid ack-timeout {ack_timeout[:40]!r}")
            ack_timeout = float(ack_timeout) or None
        if kind != "queue" or self.SECTION_12_HEADERS.isdisjoint(h):    # the usual SEND
            return kind, name, -priority, ack_timeout, None, None
        parse_int(h.get("max-deliveries", "0"), "max-deliveries", low=0)
        now, times = self.wall_clock(), []   # Unix seconds, from headers in ms since the epoch
        for absolute, relative in self.TIME_HEADERS:                        # or from now
            at, after = parse_int(h.get(absolute, "0"), absolute, low=0), h.get(relative)
            times.append(at / 1000 if at else None if after is None else
                         now + parse_int(after, relative, low=0) / 1000)
        expires, ready_at = times
        return kind, name, -priority, ack_timeout, expires, (
            ready_at if (ready_at or 0) > now else None)

    TIME_HEADERS = (("expires", "expiration"), ("deliver-at", "AMQ_SCHEDULED_DELAY"))
    SECTION_12_HEADERS = frozenset(("max-deliveries",) + sum(TIME_HEADERS, ()))

    PASSED_HEADERS_EXCLUDED = frozenset(("destination", "receipt", "transaction", "content-length",
                                         "message-id", "subscription", "ack", "redelivered",
                                         "delivery-count"))

    def passed_on(self, name):
        """Whether a SEND header goes on to the MESSAGE: not one of the broker's own, also
        not as a receiver may read it (1.0 trims blanks, and a colon in a name is a blank)."""
        if name in self.PASSED_HEADERS_EXCLUDED:
            return False
        if NEEDS_ENCODING.search(name) or name[:1].isspace() or name[-1:].isspace():
            return (name.translate(HEADER_ENCODINGS["1.0"][0]).strip()
                    not in self.PASSED_HEADERS_EXCLUDED)
        return True

    def cmd_send(self, client, frame, durable=None):
        kind, name, rank, ack_timeout, expires, ready_at = self.parse_send(frame)
        if durable is None:       # a SEND of its own (a COMMIT checks storage for all its own)
            durable = "receipt" in frame.headers
            if durable and kind == "queue" and not self.store.healthy:
                raise ClientError("message not stored: storage unavailable")
        if kind == "control":
            return self.control(client, frame, name)
        headers = [(k, v) for k, v in frame.headers.items() if self.passed_on(k)]
        msg = Message(self.next_id, name if kind == "queue" else None, rank, ack_timeout,
                      headers, frame.body, frame.size, 0, expires, ready_at)
        self.next_id += 1
        self.totals["received"] += 1
        if kind == "topic":
            self.publish(msg, name)
        else:             # a delayed message is written at once: it waits on disk, not in memory
            self.store.save(msg, durable or ready_at is not None)
            if not self.store.healthy:
                self.check_backpressure()
            if ready_at is not None:
                self.watch_due(ready_at)
            elif name in self.queues:
                self.offer(self.queues[name], msg)
                self.dispatch(self.queues[name])
            if durable and "receipt" in frame.headers:
                self.hold_until_synced(client)
        self.receipt(client, frame)

    CONTROLS = (("count-msgs", "queue"), ("count-subscribers", "queue"),
                ("count-subscribers", "topic"))

    def parse_control(self, name):
        """(question, kind, target) of a control destination /control/QUESTION/KIND/TARGET."""
        question, _, target = name.partition("/")
        kind, target = self.parse_destination("/" + target) if target else (None, None)
        if (question, kind) not in self.CONTROLS:
            raise ClientError(f"unknown control destination /control/{name[:100]}")
        return question, kind, target

    def control(self, client, frame, control):
        question, kind, target = control
        if question == "count-msgs":
            answer = {"num-messages": str(self.store.count(target, self.wall_clock()))}
        elif kind == "queue":
            queue = self.queues.get(target)
            answer = {"num-subscribers": str(queue.subscribers if queue else 0)}
        else:
            answer = {"num-subscribers": str(len(self.topic_subscribers(target)))}
        self.receipt(client, frame, **answer)

    def cmd_subscribe(self, client, frame):
        h = frame.headers
        destination = h.get("destination")
        kind, name = self.parse_destination(destination)
        if kind == "control":
            raise ClientError("cannot SUBSCRIBE to a control destination")
        sub_id = h.get("id", destination if client.version == "1.0" else None)
        if sub_id is None:
            raise ClientError("SUBSCRIBE needs an id header")
        if sub_id in client.subscriptions:
            raise ClientError(f"duplicate subscription id {sub_id[:100]!r}")
        ack_mode = ACK_MODES.get(h.get("ack", "auto"))   # one shared string per mode
        if ack_mode is None:
            raise ClientError(f"invalid ack mode {h['ack'][:40]!r}")
        prefetch = parse_int(h.get("prefetch", "0"), "prefetch", limit=10 ** 400)
        prefetch = self.max_prefetch if prefetch <= 0 else min(prefetch, self.max_prefetch)
        if kind == "queue":
            queue = self.queues.get(name)
            if queue is None:
                queue = self.queues[name] = Queue(name)
            queue.subscribers += 1
            sub = QueueSubscription(client, sub_id, queue, ack_mode, prefetch)
            client.subscriptions[sub_id] = sub
            self.make_ready(sub)
        elif name.endswith("*"):
            name = name[:-1]
            sub = client.subscriptions[sub_id] = PrefixSubscription(client, sub_id, name,
                                                                    ack_mode)
            if name not in self.prefixes:
                self.prefix_lengths[len(name)] = self.prefix_lengths.get(len(name), 0) + 1
            self.prefixes[name] = ring_add(self.prefixes.get(name), sub)
        else:
            sub = client.subscriptions[sub_id] = TopicSubscription(client, sub_id, name,
                                                                   ack_mode)
            self.topics[name] = ring_add(self.topics.get(name), sub)
        self.receipt(client, frame)

    def cmd_unsubscribe(self, client, frame):
        h = frame.headers
        sub = client.subscriptions.get(h.get("id"))
        if sub is None and client.version == "1.0" and "destination" in h:
            sub = next((s for s in client.subscriptions.values()
                        if s.destination() == h["destination"]), None)
        if sub is None:
            raise ClientError("UNSUBSCRIBE of an unknown subscription")
        self.unsubscribe(sub)
        self.receipt(client, frame)

    def cmd_ack(self, client, frame):
        """ACK: the messages are done. NACK: they go back to their queues, or to the DLQ
        (requeue:false). A receipt waits for the sync of the deletes or of the moves."""
        nack = frame.command == "NACK"
        reject = nack and frame.headers.get("requeue") == "false"
        moved = self.totals["dead_lettered"]
        queues = set()
        for sub, msg in self.acked_messages(client, frame):
            if nack:
                self.requeue(sub, msg, reject)
            else:
                self.store.ack(msg)
                self.totals["acked"] += 1
            self.make_ready(sub, dispatch=False)
            queues.add(sub.target)
        for queue in queues:
            self.dispatch(queue)
        if "receipt" in frame.headers and (not nack or self.totals["dead_lettered"] > moved):
            self.store.want_sync()
            self.hold_until_synced(client)
        self.receipt(client, frame)

    def acked_messages(self, client, frame):
        """The (subscription, message) pairs an ACK or NACK settles, taken out of the client's
        deliveries. Cumulative in `client` mode since 1.1; an unknown id settles nothing."""
        h = frame.headers
        msg_id = self.ack_id(frame)
        sub = client.deliveries.get(msg_id)
        if sub is None:
            if msg_id != h.get("message-id") and h.get("message-id") in client.deliveries:
                msg_id = h["message-id"]
                sub = client.deliveries[msg_id]
            else:
                return []
        if sub.ack_mode == "client" and client.version != "1.0":
            ids = []
            for earlier in sub.unacked:
                ids.append(earlier)
                if earlier == msg_id:
                    break
        else:
            ids = [msg_id]
        return [(sub, sub.settle(i)) for i in ids]

    @staticmethod
    def ack_id(frame):
        """The message an ACK or NACK names: `id` (1.2), else `message-id`."""
        h = frame.headers
        msg_id = h.get("id", h.get("message-id"))
        if msg_id is None:
            raise ClientError(f"{frame.command} needs an id or message-id header")
        return msg_id

    def cmd_begin(self, client, frame):
        tx = self.transaction_id(client, frame, begun=False)
        if len(client.transactions) >= self.MAX_TRANSACTIONS:
            raise ClientError(f"too many open transactions (at most {self.MAX_TRANSACTIONS}): "
                              f"COMMIT or ABORT first")
        self.hold_for_transaction(client, self.TRANSACTION_COST)
        client.transactions[tx] = []
        self.receipt(client, frame)

    @staticmethod
    def held_cost(frame):
        """About the memory a frame held in a transaction takes: its bytes and its objects."""
        return frame.size + 512

    def hold_for_transaction(self, client, cost):
        """Count what an open transaction holds (against -max-pending and -max-memory)."""
        client.transaction_bytes += cost
        self.held += cost
        if client.transaction_bytes > self.max_pending:
            raise ClientError("transactions too large: COMMIT or ABORT sooner")

    def end_transaction(self, client, tx):
        """The frames of transaction `tx`, now no longer held."""
        frames = client.transactions.pop(tx)
        cost = self.TRANSACTION_COST + sum(self.held_cost(inner) for _, inner in frames)
        client.transaction_bytes -= cost
        self.held -= cost
        return frames

    def cmd_commit(self, client, frame):
        tx = self.transaction_id(client, frame)
        durable = "receipt" in frame.headers       # then the whole COMMIT is synced first
        if durable and not self.store.healthy and any(
                inner.headers["destination"].startswith("/queue/")
                for handler, inner in client.transactions[tx] if handler is Broker.cmd_send):
            raise ClientError("COMMIT refused, nothing applied: storage unavailable")
        for handler, inner in self.end_transaction(client, tx):
            inner.headers.pop("receipt", None)      # answered when taken into the transaction
            if handler is Broker.cmd_send:
                handler(self, client, inner, durable=durable)
            else:
                handler(self, client, inner)
        if durable:
            self.store.want_sync()
            self.hold_until_synced(client)
        self.receipt(client, frame)

    def cmd_abort(self, client, frame):
        self.end_transaction(client, self.transaction_id(client, frame))
        self.receipt(client, frame)

    @staticmethod
    def transaction_id(client, frame, begun=True):
        """The frame's transaction: one of the client's open ones (BEGIN: not one of them)."""
        tx = frame.headers.get("transaction")
        if tx is None:
            raise ClientError(f"{frame.command} needs a transaction header")
        if (tx in client.transactions) != begun:
            raise ClientError(f"transaction {tx[:40]!r} {'unknown' if begun else 'already begun'}")
        return tx

    def cmd_disconnect(self, client, frame):
        self.receipt(client, frame)
        self.close(client)

    TRANSACTIONAL = (cmd_send, cmd_ack)
    COMMANDS = {"CONNECT": cmd_connect, "STOMP": cmd_connect, "SEND": cmd_send,
                "SUBSCRIBE": cmd_subscribe, "UNSUBSCRIBE": cmd_unsubscribe, "ACK": cmd_ack,
                "NACK": cmd_ack, "BEGIN": cmd_begin, "COMMIT": cmd_commit, "ABORT": cmd_abort,
                "DISCONNECT": cmd_disconnect}

    # ---- topics --------------------------------------------------------------------------------

    def topic_subscribers(self, name):
        """The subscriptions that receive topic `name`: its own, then each matching prefix's.
        One dict lookup per distinct subscribed prefix length, however many prefixes exist."""
        found = ring_members(self.topics.get(name))
        for length in self.prefix_lengths:
            if length <= len(name):
                found += ring_members(self.prefixes.get(name[:length]))
        return found

    def publish(self, msg, name):
        """Deliver a topic message to every matching subscription, once each. Not stored.
        A body of SHARE_FROM bytes or more is held once, however many subscribers there are:
        every outbox gets the same buffers for it and, per version, for the headers after
        the subscriber's own."""
        destination = "/topic/" + name
        msg_id = str(msg.id)
        shared = None
        if msg.size >= self.SHARE_FROM:
            body = memoryview(msg.body)
            shared = self.shared[id(body)] = types.SimpleNamespace(users=1, size=len(body))
            self.held += shared.size      # publish is one of its users while it fans out
        rests = {}                # version -> the frame after the delivery's own headers
        for sub in self.topic_subscribers(name):
            client = sub.client
            if client.closing:
                continue
            version = client.version
            rest = rests.get(version)
            if rest is None:
                tail = encode_message_tail(destination, msg.headers, len(msg.body), version)
                if shared is None:
                    rest = tail + msg.body + FRAME_END
                else:
                    rest = (memoryview(tail), body, FRAME_END)
                    shared.size += len(tail)
                    self.held += len(tail)
                rests[version] = rest
            head = encode_message_head(sub.id, msg_id, version == "1.2" and
                                       sub.ack_mode != "auto", 0, version)
            self.totals["delivered"] += 1
            if shared is None:
                frame = head + rest
                self.send(client, (frame,), len(frame))
            else:
                shared.users += 1
                size = len(rest[0]) + len(body)
                self.send(client, (head, *rest), len(head) + size + 2, size)
        if shared is not None:
            self.unshare(body)

    # ---- queues --------------------------------------------------------------------------------

    def offer(self, queue, msg):
        """A new or returned message for an active queue: into its window, unless the window is
        full or the message sorts after messages still on disk; then the store has it for later."""
        key = (msg.rank, msg.id)
        heap = queue.heap
        if heap is None:
            heap = queue.heap = []
        elif not queue.backlog_on_disk and (len(heap) >= Queue.WINDOW
                                            or queue.heap_bytes >= Queue.WINDOW_BYTES):
            queue.backlog_on_disk = True
        if queue.backlog_on_disk:
            if key > queue.cursor:
                return
        elif key > queue.cursor:
            queue.cursor = key
        heapq.heappush(heap, (msg.rank, msg.id, msg))
        queue.heap_bytes += msg.size

    @staticmethod
    def trim_window(queue):
        """Back to WINDOW messages in memory: the last ones are read again from the store."""
        heap = queue.heap
        if len(heap) > Queue.WINDOW:
            heap.sort()
            queue.heap_bytes -= sum(msg.size for _, _, msg in heap[Queue.WINDOW:])
            del heap[Queue.WINDOW:]
            queue.cursor = heap[-1][:2]
            queue.backlog_on_disk = True

    def next_message(self, queue):
        """Pop the queue's next unexpired message, reading the next batch from the store when
        needed. Expired ones met on the way are dropped or dead-lettered."""
        while True:
            heap = queue.heap
            if not heap and queue.backlog_on_disk:
                if not self.store.healthy:
                    return None
                try:
                    msgs = self.store.fetch(queue.name, queue.cursor)
                except self.store.StorageError:
                    return None
                if msgs:
                    heap = queue.heap = [(msg.rank, msg.id, msg) for msg in msgs]  # a heap
                    queue.heap_bytes = sum(msg.size for msg in msgs)
                    queue.cursor = heap[-1][:2]
                if not full_page(msgs):
                    queue.backlog_on_disk = False
            if not heap:
                return None
            msg = heapq.heappop(heap)[2]
            queue.heap_bytes -= msg.size
            if msg.expires is None or msg.expires > self.wall_clock():
                return msg
            self.expire(msg)

    def dispatch(self, queue):
        """Hand the queue's messages to its ready subscriptions, round-robin."""
        while queue.ready is not None:
            sub = queue.ready
            if sub.has_room():
                msg = self.next_message(queue)
                if msg is None:
                    return
                self.deliver(sub, msg)
            if sub.has_room():
                queue.ready = sub.next
            else:
                queue.ready = ring_remove(queue.ready, sub)

    def make_ready(self, sub, dispatch=True):
        """The subscription may have room again: put it in its queue's rotation."""
        if sub.kind == QUEUE and sub.has_room():
            queue = sub.target
            queue.ready = ring_add(queue.ready, sub)
            if dispatch:
                self.dispatch(queue)

    def deliver(self, sub, msg):
        """Write a queue message to a subscriber and remember it until it is ACKed. In `auto`
        mode it counts as ACKed, and otherwise its ack-timeout starts, once it is written."""
        client = sub.client
        msg_id = str(msg.id)
        if sub.unacked is None:
            sub.unacked = {}
        sub.unacked[msg_id] = msg
        sub.target.in_flight += 1
        msg.deliveries += 1
        self.totals["delivered"] += 1
        if sub.ack_mode != "auto":
            client.deliveries[msg_id] = sub
        version = client.version
        head = encode_message_head(sub.id, msg_id, version == "1.2" and sub.ack_mode != "auto",
                                   msg.deliveries, version) + encode_message_tail(
            "/queue/" + msg.queue, msg.headers, len(msg.body), version)
        if msg.size < self.SHARE_FROM:
            frame = head + msg.body + FRAME_END
            self.send(client, (frame,), len(frame))
        else:                     # the body is not copied: the Message holds it anyway
            self.send(client, (head, msg.body, FRAME_END), len(head) + len(msg.body) + 2)
        if (sub.ack_mode == "auto" or msg.ack_timeout) and not client.closing:
            client.after_write.append((client.frames_queued, sub, msg_id))

    def start_ack_timeout(self, sub, msg_id):
        """The MESSAGE is written: its ack-timeout, if it has one, runs from now."""
        msg = sub.unacked.get(msg_id) if sub.unacked else None
        if msg is not None and msg.ack_timeout:
            if msg.timer is not None:
                msg.timer.cancel()
            msg.timer = self.call_later(msg.ack_timeout, self.ack_timeout_passed, sub, msg_id)

    def requeue(self, sub, msg, reject=False):
        """A delivered message back to its queue, or to the DLQ: rejected, or delivered enough."""
        limit = next((int(v) for k, v in msg.headers if k == "max-deliveries"), self.max_deliveries)
        if reject or (limit and msg.deliveries >= limit):
            self.dead_letter(msg, "rejected" if reject else "max-deliveries")
        else:
            self.totals["redelivered"] += 1
            self.store.returned(msg)
            if sub.target.subscribers:
                self.offer(sub.target, msg)

    def dead_letter(self, msg, reason):
        """To the DLQ of its queue, durably, with its id, headers and body, and where and why."""
        self.totals["dead_lettered"] += 1
        own = ("original-destination", "dead-letter-reason")
        msg.headers = [(own[0], "/queue/" + msg.queue), (own[1], reason)] + [
            (k, v) for k, v in msg.headers if k not in own]
        self.store.move(msg, "DLQ." + msg.queue)
        queue = self.queues.get(msg.queue)
        if queue is not None:
            self.offer(queue, msg)
            self.dispatch(queue)

    def expire(self, msg):
        """A message is past its `expires`: drop it, or dead-letter it if it asked for that."""
        self.totals["expired"] += 1
        if any(k == "max-deliveries" or (k, v) == ("dead-letter", "true") for k, v in msg.headers):
            self.dead_letter(msg, "expired")
        else:
            self.store.ack(msg)

    def ack_timeout_passed(self, sub, msg_id):
        """Take the message back and give it to another ready subscriber if there is one.
        (Settling a message cancels this timer, so the delivery is still unacked here.)"""
        log.debug("%s: ack-timeout of message %s", sub.client.session, msg_id)
        self.requeue(sub, sub.settle(msg_id))
        queue = sub.target
        queue.ready = ring_remove(queue.ready, sub)
        self.dispatch(queue)
        self.make_ready(sub)

    def unsubscribe(self, sub):
        """Remove a subscription; its unacked queue messages go back to the queue at once."""
        client = sub.client
        del client.subscriptions[sub.id]
        if sub.kind != QUEUE:
            index = self.prefixes if sub.kind == PREFIX else self.topics
            head = index[sub.target] = ring_remove(index[sub.target], sub)
            if head is None:
                del index[sub.target]
                if sub.kind == PREFIX:
                    length = len(sub.target)
                    self.prefix_lengths[length] -= 1
                    if not self.prefix_lengths[length]:
                        del self.prefix_lengths[length]
            return
        queue = sub.target
        queue.ready = ring_remove(queue.ready, sub)
        queue.subscribers -= 1
        for msg_id in list(sub.unacked or ()):
            self.requeue(sub, sub.settle(msg_id))
        sub.unacked = None
        if queue.subscribers == 0:
            del self.queues[queue.name]
        else:
            self.dispatch(queue)

    def release(self, client):
        """The client is going away: drop its subscriptions, transactions and timers."""
        for timer in client.timers:
            timer.cancel()
        client.timers = []
        client.transactions.clear()
        self.held -= client.transaction_bytes + client.input_held
        client.transaction_bytes = client.input_held = 0
        client.parser.discard()
        client.after_write.clear()
        for sub in list(client.subscriptions.values()):
            self.unsubscribe(sub)
        # Python dicts keep their size when emptied; give back what a million entries took.
        for index in ("queues", "topics", "prefixes"):
            if not getattr(self, index):
                setattr(self, index, {})

    # ---- timers ---------------------------------------------------------------------------------

    def connect_deadline(self, client):
        if not client.connected and not client.closing:
            log.info("%s: no CONNECT within %gs, closing", client.session, self.CONNECT_DEADLINE)
            self.close(client)

    def beat(self, client, interval):
        """Send an EOL if nothing else went out for `interval` seconds."""
        if client.closing:
            return
        now = self.clock()
        if now - client.last_output >= interval * 0.9 and not client.outbox:
            self.send(client, HEART_BEAT_FRAME, 1)
            client.last_output = now
        self.client_timer(client, max(0.01, client.last_output + interval - now), self.beat,
                          interval)

    def check_alive(self, client, grace):
        """Close a connection from which nothing arrived for `grace` seconds."""
        if client.closing:
            return
        now = self.clock()
        if client.reading_paused:     # we are the ones not reading
            client.last_input = now
        elif now - client.last_input >= grace:
            log.info("%s: no heart-beat for %gs, closing", client.session, grace)
            self.close(client)
            return
        self.client_timer(client, client.last_input + grace - now, self.check_alive, grace)

    def check_stalled(self, client):
        """Close a connection whose incomplete frame got no new byte for STALL_DEADLINE."""
        client.watching_stall = False
        if client.closing or not client.input_held or client.reading_paused:
            return
        idle = self.clock() - client.last_input
        if idle >= self.STALL_DEADLINE:
            self.fail(client, f"incomplete frame: nothing arrived for {self.STALL_DEADLINE:g}s")
            return
        client.watching_stall = True
        self.client_timer(client, self.STALL_DEADLINE - idle, self.check_stalled)

    def client_timer(self, client, delay, callback, *args):
        """call_later(delay, callback, client, *args), cancelled if the client goes first."""
        if len(client.timers) > 8:
            client.timers = [t for t in client.timers if not t.cancelled and not t.fired]
        client.timers.append(self.call_later(delay, callback, client, *args))

    def periodic_flush(self):
        self.purge_expired()
        self.flush()
        give_back_free_memory(0)
        self.call_later(self.flush_period, self.periodic_flush)

    def watch_due(self, ready_at):
        """Have take_due run when the first delayed message is due (at `ready_at` or before)."""
        if ready_at is not None and (self.due_at is None or ready_at < self.due_at):
            if self.due_timer is not None:
                self.due_timer.cancel()
            self.due_at = ready_at
            self.due_timer = self.call_later(max(0.0, ready_at - self.wall_clock()),
                                             self.take_due)

    def take_due(self):
        """Due delayed messages join their queues by priority and age (see offer, trim_window)."""
        self.due_at = self.due_timer = None
        now = self.wall_clock()
        try:
            msgs = self.store.take_due(now)
        except self.store.StorageError:
            msgs = []
        for msg in msgs:
            if msg.queue in self.queues:
                self.offer(self.queues[msg.queue], msg)
        for name in {msg.queue for msg in msgs} & self.queues.keys():
            self.trim_window(self.queues[name])
            self.dispatch(self.queues[name])
        try:
            self.watch_due(now if full_page(msgs) else self.store.next_due())
        except self.store.StorageError:
            self.watch_due(now + self.flush_period)     # after the flush that retries storage

    def purge_expired(self):
        """Expire the messages on disk past their time, a batch per turn, paging on; those in an
        active queue's window (at or before its cursor) are left to next_message."""
        try:
            msgs = self.store.take_expired(self.wall_clock(), self.purged_to)
        except self.store.StorageError:
            return
        more = full_page(msgs)
        self.purged_to = (msgs[-1].expires, msgs[-1].id) if more else (-math.inf, 0)
        queues = self.queues
        for msg in msgs:
            if msg.queue not in queues or msg.ready_at is not None or (
                    msg.rank, msg.id) > queues[msg.queue].cursor:
                self.expire(msg)
        if more:
            self.call_later(0, self.purge_expired)

    def flush(self):
        """Write the cache; while storage is unavailable this is the one retry per period."""
        was_healthy = self.store.healthy
        with contextlib.suppress(self.store.StorageError):
            self.store.flush()
        if self.store.healthy and not was_healthy:     # back: what waited for it can go
            for queue in list(self.queues.values()):
                self.dispatch(queue)
        self.check_backpressure()

    def check_backpressure(self):
        """While storage is unavailable, the cache takes unreceipted messages up to -maxmsgs
        or MAX_CACHED_BYTES; past that the connections that SEND to queues are not read. Once
        that ends, the held-back producers are read again, from the frames in their parsers."""
        full = not self.store.healthy and self.store.over(self.maxmsgs, self.MAX_CACHED_BYTES)
        if full == self.producers_held:
            return
        self.producers_held = full
        if full:
            log.warning("storage unavailable and the cache is full: not reading from the "
                        "connections that send to queues until a flush succeeds")
        else:
            self.call_later(0, self.resume_reading)   # at the start of a turn, before commit

    def metrics(self):
        """The broker's figures in Prometheus' text format (GET /metrics); the README lists them."""
        store, queues = self.store, self.queues.values()
        gauges = {"connections": len(self.clients),
                  "subscriptions": sum(len(c.subscriptions) for c in self.clients),
                  "messages_stored": store.stored,
                  "messages_cached": store.unsaved_count + len(store.inserted),
                  "messages_in_flight": sum(q.in_flight for q in queues),
                  "storage_healthy": int(store.healthy)}
        lines = [f"# TYPE ocamlmq_{k} gauge\nocamlmq_{k} {v}" for k, v in gauges.items()]
        for name, value in (("ready", lambda q: len(q.heap or ())),
                            ("unacked", lambda q: q.in_flight),
                            ("consumers", lambda q: q.subscribers)):
            lines.append(f"# TYPE ocamlmq_queue_{name} gauge")
            lines += [f'ocamlmq_queue_{name}{{queue="{q.name.translate(LABEL_ESCAPES)}"}} '
                      f'{value(q)}' for q in queues]
        totals = {**{f"messages_{k}": v for k, v in self.totals.items()},
                  "storage_commits": store.commits, "storage_commit_seconds": store.commit_seconds}
        lines += [f"# TYPE ocamlmq_{k}_total counter\nocamlmq_{k}_total {v}"
                  for k, v in totals.items()]
        return "\n".join(lines) + "\n"

    def shutdown(self):
        """SIGINT/SIGTERM: write the cache (with the counts of unACKed deliveries) and close."""
        for client in self.clients:
            for sub in client.subscriptions.values():
                for msg in (sub.unacked or {}).values() if sub.kind == QUEUE else ():
                    self.store.returned(msg)
        self.store.close()


# ==============================================================================================
# 3. The reactor: one thread, selectors, non-blocking sockets, heapq timers.
# ==============================================================================================

class Timer:
    __slots__ = ("deadline", "callback", "args", "cancelled", "fired")

    def __init__(self, deadline, callback, args):
        self.deadline = deadline
        self.callback = callback
        self.args = args
        self.cancelled = self.fired = False

    def cancel(self):
        """Never run; let go of the callback and its arguments now (they may hold a closed
        connection or a message body) rather than at the deadline."""
        self.cancelled = True
        self.callback = self.args = None


class Reactor:
    """Accept connections, read frames into the broker, write outboxes, run timers. Each turn:
    run the due timers, wait on the sockets until the next timer, hand what was read to the
    broker, let it commit its durable batch (see gather_commit), then write every touched
    outbox with one send of up to WRITE_CHUNK bytes."""

    READ_SIZE = 256 * 1024
    MAX_FRAMES = 4096             # frames looked at for one write
    GATHER = 0.0005               # longest wait for more SENDs to share a disk sync
    CLOSE_GRACE = 5.0             # how long a closing connection may take to drain its outbox
    MIN_COMPACT = 4096            # timers in the heap before cancelled ones are swept out
    ACCEPT_PAUSES = (0.1, 1.0)    # out of file descriptors: first and longest accept pause
    WRITE_CHUNK = 256 * 1024      # bytes sent (or encrypted, for TLS) at once

    def __init__(self, listeners, clock=time.monotonic, tls_context=None, ws_origins=None):
        self.listeners = listeners    # [(socket, kind)], kind: "stomp", "tls" or "ws"
        self.tls_context, self.ws_origins, self.clock = tls_context, ws_origins, clock
        self.selector = selectors.DefaultSelector()
        self.timers = []          # heap of (deadline, sequence, Timer)
        self.compact_at, self.sequence = self.MIN_COMPACT, 0
        self.connections = {}     # Client -> Connection
        self.draining = set()     # closing clients given CLOSE_GRACE to drain their outbox
        self.last_synced = 0      # clients whose receipts waited for the last disk sync
        self.read_buffer = bytearray(self.READ_SIZE)
        self.read_view = memoryview(self.read_buffer)
        self.accept_pause = 0     # seconds accepting is paused for, while out of descriptors
        self.stopping, self.broker = False, None
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        for s in (self.wakeup_r, self.wakeup_w):
            s.setblocking(False)
        for listener, kind in listeners:
            self.selector.register(listener, selectors.EVENT_READ, kind)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "wakeup")

    def call_later(self, delay, callback, *args):
        timer = Timer(self.clock() + delay, callback, args)
        self.sequence += 1
        heapq.heappush(self.timers, (timer.deadline, self.sequence, timer))
        if len(self.timers) > self.compact_at:    # mostly cancelled timers: drop them
            self.timers[:] = [entry for entry in self.timers if not entry[2].cancelled]
            heapq.heapify(self.timers)
            self.compact_at = max(self.MIN_COMPACT, 2 * len(self.timers))
        return timer

    def run_due_timers(self):
        """Run every timer that is due; return how long to wait for the next one."""
        timers = self.timers
        while timers:
            deadline, _, timer = timers[0]
            if timer.cancelled:
                heapq.heappop(timers)
                continue
            now = self.clock()
            if deadline > now:
                return deadline - now
            heapq.heappop(timers)
            timer.fired = True
            callback = timer.callback
            try:
                callback(*timer.args)
            except Exception:     # a bug of ours: log it and keep serving
                log.exception("internal error in timer %s", callback.__name__)
        return None

    def run(self):
        broker = self.broker
        while not self.stopping:
            timeout = self.run_due_timers()
            if broker.to_write:           # output is waiting: do not sleep before writing it
                timeout = 0
            self.handle_events(timeout)
            self.gather_commit()
            broker.end_of_turn()
            self.flush_outboxes()
        self.stop()

    def gather_commit(self):
        """Before a disk sync, give the producers that were waiting on the previous sync a
        moment to join this one (PostgreSQL's commit_delay idea): one sync then confirms a
        SEND from each of them, instead of a few each time. Bounded by GATHER seconds."""
        waiting = self.broker.awaiting_sync
        if not waiting:
            self.last_synced = 0
            return
        deadline = self.clock() + self.GATHER
        while len(waiting) < self.last_synced and self.clock() < deadline:
            self.handle_events(0)
        self.last_synced = len(waiting)

    def handle_events(self, timeout):
        for key, events in self.selector.select(timeout):
            if type(key.data) is str:
                if key.data == "wakeup":
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        self.wakeup_r.recv(4096)      # one byte per signal
                else:
                    self.accept(key.fileobj, key.data)
            else:
                client = key.data
                if events & selectors.EVENT_READ:
                    self.read(client)
                if events & selectors.EVENT_WRITE:   # written after the turn's commit
                    self.broker.to_write.add(client)

    def accept(self, listener, kind):
        for _ in range(256):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                if self.accept_pause:
                    log.warning("accepting connections again")
                    self.accept_pause = 0
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.pause_accepting(e)
                return                   # else the peer gave up already (ECONNABORTED, ...)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = self.broker.connection_made(f"{peer[0]}:{peer[1]}")
            conn = self.connections[client] = Connection(sock)
            if kind == "tls" or (kind == "ws" and self.tls_context is not None):
                conn.tls = Tls(self.tls_context)
            if kind == "ws":
                conn.ws = WebSocket(self.broker.max_frame_size, self.ws_origins)
                client.framing = conn.ws.frame
            self.selector.register(sock, selectors.EVENT_READ, client)

    def pause_accepting(self, error):
        """Out of file descriptors: the listeners would be ready again at once, so stop
        watching them for a moment (doubling, up to a second) and serve the open connections."""
        if not self.accept_pause:
            log.error("cannot accept connections (%s): pausing accept, serving the %d open "
                      "connections", error.strerror, len(self.connections))
        first, longest = self.ACCEPT_PAUSES
        self.accept_pause = min(longest, 2 * self.accept_pause or first)
        for listener, kind in self.listeners:
            self.watch(listener, kind, 0)
        self.call_later(self.accept_pause, self.resume_accepting)

    def resume_accepting(self):
        if not self.stopping:
            for listener, kind in self.listeners:
                self.watch(listener, kind, selectors.EVENT_READ)

    def read(self, client):
        """Read from the socket, up through the transport's layers (TLS, WebSocket) into
        the broker."""
        conn = self.connections.get(client)
        if conn is None:
            return
        try:
            size = conn.sock.recv_into(self.read_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size = 0
        if not size:
            self.close(client)
            return
        data = self.read_view[:size]
        if conn.tls is not None:
            try:
                data = conn.tls.receive(data)
            except ssl.SSLError as e:
                log.info("%s: TLS: %s", client.session, e.reason or e)
                self.close(client)
                return
            self.broker.to_write.add(client)      # the handshake may have a reply
        ws = conn.ws
        if ws is not None:
            data = ws.feed(data)
            if ws.metrics_wanted:
                ws.metrics_wanted = False
                ws.replies.append(http_response(
                    200, [("Content-Type", "text/plain; version=0.0.4")],
                    self.broker.metrics().encode()))
            if ws.ping is not None and not client.output_full:
                ws.replies.insert(-1 if ws.closing else len(ws.replies),
                                  ws.message(WS_PONG, ws.ping))
            ws.ping = None
            last = ws.replies.pop() if ws.closing and ws.open and ws.replies else None
            for reply in ws.replies:          # the handshake's answer, before any frame
                self.send_raw(client, reply)
            ws.replies = []
        if data:
            self.broker.data_received(client, data)
        if ws is not None and ws.closing and ws.open and last is not None:
            self.send_raw(client, last)       # a close frame goes after what came before it
        if (ws is not None and ws.closing) or (conn.tls is not None and conn.tls.ended):
            self.broker.close(client)

    def send_raw(self, client, data):
        """Bytes of the transport's own (a handshake answer, a pong, a close) for the outbox."""
        self.broker.send(client, (data,), len(data), raw=True)

    def flush_outboxes(self):
        """Write every outbox that got bytes; what writing causes (auto-ACKs make room for more
        deliveries) is written in the next turn, so that one busy client cannot starve others."""
        written, self.broker.to_write = self.broker.to_write, set()
        for client in written:
            self.write(client)

    def write(self, client):
        """Write what the kernel takes of the outbox; then watch the socket for what is next:
        reading (unless closing or held back) and writing (while output waits)."""
        conn = self.connections.get(client)
        if conn is None:
            return
        if conn.tls is not None:
            sent = self.send_tls(client, conn)
        elif client.outbox:
            sent = self.sock_send(client, conn.sock, self.outbox_bytes(client))
            if sent:
                self.broker.output_written(client, sent)
        else:
            sent = 0
        if sent is None:
            return
        outbox = client.outbox
        if client.closing and not outbox and not conn.ciphertext:
            if conn.ws is not None and conn.ws.open and not conn.ws.closing:
                conn.ws.close(1000)           # end the WebSocket too, then the socket
                self.send_raw(client, conn.ws.replies.pop())
                return self.write(client)
            self.close(client)
            return
        if client.closing:            # stop reading; give the outbox a little time to drain
            want = selectors.EVENT_WRITE
            if client not in self.draining:
                self.draining.add(client)
                self.call_later(self.CLOSE_GRACE, self.close, client)
        else:
            want = ((0 if client.reading_paused else selectors.EVENT_READ)
                    | (selectors.EVENT_WRITE if outbox or conn.ciphertext else 0))
        self.watch(conn.sock, client, want)

    def outbox_bytes(self, client):
        """Up to WRITE_CHUNK bytes of the outbox, from the first byte not yet written, joined:
        one send of many small frames costs less than an iovec each, and no large buffer is
        copied whole."""
        parts, size, skip = [], 0, client.head_sent
        for buf in itertools.chain.from_iterable(client.outbox[:self.MAX_FRAMES]):
            if skip:                  # the part of the first frame written already
                if skip >= len(buf):
                    skip -= len(buf)
                    continue
                buf, skip = memoryview(buf)[skip:], 0
            if size + len(buf) >= self.WRITE_CHUNK:
                parts.append(memoryview(buf)[:self.WRITE_CHUNK - size])
                break
            parts.append(buf)
            size += len(buf)
        return b"".join(parts)

    def sock_send(self, client, sock, data):
        """sock.send(data): how much the kernel took, or None if the connection is gone."""
        try:
            return sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.close(client)
            return None

    def send_tls(self, client, conn):
        """Encrypt a chunk of the outbox once the last chunk's ciphertext is sent (so that
        "written" still means "about to leave"), then send what the kernel takes."""
        tls = conn.tls
        if tls.ready and client.outbox and not conn.ciphertext:   # one chunk at a time
            plaintext = self.outbox_bytes(client)
            try:
                tls.ssl.write(plaintext)
            except ssl.SSLError:
                self.close(client)
                return None
            conn.ciphertext += tls.outgoing.read()
            self.broker.output_written(client, len(plaintext))
        conn.ciphertext += tls.outgoing.read()
        self.broker.transport_holds(client, len(conn.ciphertext))
        sent = self.sock_send(client, conn.sock, conn.ciphertext) if conn.ciphertext else 0
        if not sent:
            return sent
        del conn.ciphertext[:sent]
        self.broker.transport_holds(client, len(conn.ciphertext))
        return sent

    def watch(self, sock, data, events):
        """Have the selector watch `sock` for `events` (none: not at all)."""
        try:
            current = self.selector.get_key(sock).events
        except KeyError:
            current = 0
        if events == current:
            return
        if not events:
            self.selector.unregister(sock)
        elif not current:
            self.selector.register(sock, events, data)
        else:
            self.selector.modify(sock, events, data)

    def close(self, client):
        self.draining.discard(client)
        conn = self.connections.pop(client, None)
        if conn is None:
            return
        self.watch(conn.sock, client, 0)
        conn.sock.close()
        self.broker.connection_lost(client)

    def request_stop(self, signum, frame):
        self.stopping = True

    def stop(self):
        """Stop accepting, handle what already arrived, flush and close everything."""
        for listener, kind in self.listeners:
            self.watch(listener, kind, 0)
            listener.close()
        for client in list(self.connections):
            self.read(client)
        self.broker.end_of_turn()
        for client in list(self.connections):
            client.closing = True
            self.write(client)
        for client in list(self.connections):
            self.close(client)
        self.broker.shutdown()


class Connection:
    """What the reactor keeps for one socket: the transport layers between it and the broker,
    TLS (`tls`, with the `ciphertext` it has yet to send) and WebSocket (`ws`), when used."""
    __slots__ = ("sock", "tls", "ws", "ciphertext")

    def __init__(self, sock):
        self.sock = sock
        self.tls = self.ws = None
        self.ciphertext = bytearray()


class Tls:
    """The server side of one TLS connection through memory buffers (ssl.MemoryBIO): the
    reactor gives it the bytes that arrive and sends the bytes it makes, so that neither the
    handshake nor a record split across reads ever blocks the reactor."""
    READ_SIZE = 256 * 1024

    def __init__(self, context):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ready = False        # the handshake is done
        self.ended = False        # the peer sent close_notify

    def receive(self, data):
        """The plaintext of what arrived (b"" until the handshake is done). Raises SSLError."""
        self.incoming.write(data)
        if not self.ready:
            try:
                self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.ready = True
        chunks = []
        while True:
            try:
                chunk = self.ssl.read(self.READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:                 # close_notify: nothing more will be read
                self.ended = True
                break
            chunks.append(chunk)
        if self.incoming.pending > self.READ_SIZE:    # bytes it will never decrypt
            raise ssl.SSLError("undecryptable input")
        return b"".join(chunks)


# ==============================================================================================
# 4. Command line
# ==============================================================================================

USAGE = """\
Usage: python3 ocamlmq.py [options] [sqlite3 database (default: ocamlmq.db)]
  -port PORT              TCP port to listen on (default: 61613)
  -address ADDR           address to bind (default: 127.0.0.1; 0.0.0.0 for all interfaces)
  -login LOGIN            login that CONNECT must carry (default: none, open)
  -passcode PASSCODE      passcode that CONNECT must carry (default: none)
  -maxmsgs N              flush the in-memory cache when it holds more than N messages
                          (default: 100000)
  -flush-period DT        flush the in-memory cache every DT seconds (default: 1.0)
  -max-prefetch N         cap and default of a subscription's prefetch (default: 100)
  -max-frame-size BYTES   largest frame accepted, headers and body (default: 16777216)
  -max-pending BYTES      unsent output after which a connection is closed, and the most
                          its open transactions may hold (default: 67108864)
  -max-memory BYTES       the most all clients together may make the broker hold (input,
                          output, transactions); past it the biggest is closed
                          (default: 1073741824)
  -pg CONNINFO            store messages in PostgreSQL (libpq conninfo or postgresql:// URI;
                          PG* environment variables apply) instead of the sqlite file
  -ws-port PORT           also serve STOMP over WebSocket, and GET /metrics, on this port
  -ws-origin ORIGIN       a browser origin allowed on the WebSocket port (repeatable; * for
                          any; default: pages from the host name the broker is reached at)
  -tls-port PORT          also serve STOMP over TLS on this port
  -tls-cert FILE          certificate chain (PEM) for TLS; with it the WebSocket port is wss
  -tls-key FILE           private key (PEM) for TLS (default: in the -tls-cert file)
  -max-deliveries N       deliveries after which a queue message goes to its dead-letter
                          queue, unless its SEND says otherwise (default: 0, unlimited)
  -debug                  debug logging to stderr
  -help, --help           show this help"""


class UsageError(Exception):
    pass


def checked(convert, valid):
    """A flag's conversion: `convert`, then ValueError unless `valid` holds."""
    def check(text):
        value = convert(text)
        if not valid(value):
            raise ValueError
        return value
    return check


positive_int = checked(int, lambda value: value > 0)
natural_int = checked(int, lambda value: value >= 0)
positive_float = checked(float, lambda value: math.isfinite(value) and value > 0)
port_number = checked(int, lambda value: 0 <= value <= 65535)


OPTIONS = {  # flag -> (setting, conversion, default); no conversion: a flag without a value
    "port": ("port", port_number, 61613), "address": ("address", str, "127.0.0.1"),
    "login": ("login", str, None), "passcode": ("passcode", str, None),
    "maxmsgs": ("maxmsgs", positive_int, 100000),
    "flush-period": ("flush_period", positive_float, 1.0),
    "max-prefetch": ("max_prefetch", positive_int, 100),
    "max-frame-size": ("max_frame_size", positive_int, 16 * 1024 * 1024),
    "max-pending": ("max_pending", positive_int, 64 * 1024 * 1024),
    "max-memory": ("max_memory", positive_int, 1 << 30),
    "max-deliveries": ("max_deliveries", natural_int, 0),
    "pg": ("pg", str, None), "debug": ("debug", None, False),
    "ws-port": ("ws_port", port_number, None), "ws-origin": ("ws_origins", str, None),
    "tls-port": ("tls_port", port_number, None), "tls-cert": ("tls_cert", str, None),
    "tls-key": ("tls_key", str, None),
}
REPEATABLE = {"ws_origins"}


def parse_args(argv):
    settings = {setting: default for setting, _, default in OPTIONS.values()}
    settings["database"] = "ocamlmq.db"
    positional = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-help", "--help", "-h"):
            print(USAGE)
            sys.exit(0)
        if arg.startswith("-") and len(arg) > 1:
            name = arg.lstrip("-")
            if name not in OPTIONS:
                raise UsageError(f"unknown option {arg}")
            setting, convert, _ = OPTIONS[name]
            if convert is None:
                settings[setting] = True
                continue
            if not args:
                raise UsageError(f"option {arg} needs a value")
            value = args.pop(0)
            try:
                value = convert(value)
            except ValueError:
                raise UsageError(f"bad value for {arg}: {value!r}") from None
            if setting in REPEATABLE:
                value = (settings[setting] or set()) | {value.lower()}
            settings[setting] = value
        else:
            positional.append(arg)
    if len(positional) > 1:
        raise UsageError("more than one database given")
    if positional:
        settings["database"] = positional[0]
    if settings["tls_port"] is not None and settings["tls_cert"] is None:
        raise UsageError("-tls-port needs -tls-cert")
    return settings


def listen(address, port):
    """A non-blocking listening socket; raises OSError."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(1024)
    listener.setblocking(False)
    return listener


def open_backend(settings):
    """(backend, its StorageError class) for the settings; raises that StorageError."""
    if settings["pg"] is not None:
        import storage_pg
        return storage_pg.PgBackend(settings["pg"]), storage_pg.StorageError
    import storage_sqlite
    return storage_sqlite.SqliteBackend(settings["database"]), storage_sqlite.StorageError


def raise_open_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class StartupError(Exception):
    """The broker cannot start; the message is one line for the operator."""


def start(settings):
    """The Reactor with its listeners and its Broker, from the settings; raises StartupError."""
    tls_context = None
    if settings["tls_cert"] is not None:
        try:
            tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls_context.options |= ssl.OP_NO_RENEGOTIATION
            tls_context.load_cert_chain(settings["tls_cert"], settings["tls_key"])
        except (OSError, ssl.SSLError) as e:
            raise StartupError(f"cannot use the TLS certificate or key: {e.strerror or e}")
    listeners = []
    for kind in ("stomp", "ws", "tls"):
        port = settings["port" if kind == "stomp" else f"{kind}_port"]
        try:
            if port is not None:
                listeners.append((listen(settings["address"], port), kind))
        except OSError as e:
            raise StartupError(f"cannot listen on {settings['address']}:{port}: "
                               f"{e.strerror or e}")
    reactor = Reactor(listeners, tls_context=tls_context, ws_origins=settings["ws_origins"])
    try:
        backend, storage_error = open_backend(settings)
        reactor.broker = Broker(MessageStore(backend, storage_error), reactor.call_later,
                                **{name: settings[name] for name in Broker.SETTINGS})
    except ImportError as e:
        raise StartupError(f"-pg needs psycopg2 ({e})")
    except Exception as e:          # the backend's StorageError: one line, no traceback
        raise StartupError(str(e))
    return reactor, storage_error


def main(argv):
    try:
        settings = parse_args(argv)
    except UsageError as e:
        print(f"ocamlmq.py: {e}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if settings["debug"] else logging.INFO,
                        format="%(asctime)s ocamlmq %(levelname)s %(message)s")
    raise_open_file_limit()
    try:
        reactor, storage_error = start(settings)
    except StartupError as e:
        print(f"ocamlmq.py: {e}", file=sys.stderr)
        return 1
    signal.set_wakeup_fd(reactor.wakeup_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, reactor.request_stop)
    signal.signal(signal.SIGTERM, reactor.request_stop)
    log.info("listening on %s:%d, storing in %s", settings["address"], settings["port"],
             "PostgreSQL" if settings["pg"] is not None else settings["database"])
    try:
        reactor.run()
        for signum in (signal.SIGINT, signal.SIGTERM):   # a second signal must not kill the
            signal.signal(signum, signal.SIG_IGN)         # interpreter while it exits
    except storage_error as e:
        print(f"ocamlmq.py: storage failed at shutdown: {e}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
