#!/usr/bin/env python3
"""STOMP load generator for ocamlmq.py (or any STOMP 1.2 broker).

Standard library only.  Every connection is its own process (multiprocessing, fork), so that the
generator is not what limits the figures, and each process measures its own CPU use
(resource.getrusage) over the measured phase; the figures are always reported next to that CPU.

Frames are pipelined: producers build a few hundred frames into one bytes buffer and sendall it;
consumers parse everything a recv() returned (content-length honoured) and answer all the ACKs of
that read in one sendall.

How a case runs (see `run_workers`):
  1. the parent forks one worker per connection; each connects, subscribes (waiting for the RECEIPT
     of its SUBSCRIBE, so the subscription is live) and reports "ready";
  2. when all are ready the parent sets the start event; workers do their part, timestamps taken
     with time.monotonic() (one clock for all processes of this machine);
  3. each worker puts its result (counts, first/last timestamps, CPU seconds) on a queue;
  4. the parent computes the figure, stops every worker it started (join, then terminate/kill).
While waiting, the parent can sample the broker's /proc/PID/status (RSS) through a callback.

Cases (a "scenario" in run.py is one or more cases):
  queue         P producers x N messages (no receipts) to one queue; C consumers, ack
                client-individual, prefetch 100, ACK every message.  msgs/s first SEND -> last ACK.
  durable       P producers, each SEND carries a receipt and waits for its RECEIPT, for D seconds.
                receipted msgs/s, p50 / p99 receipt latency.
  topic         S subscribers on one topic (or /topic/NAME* prefix subscriptions), one producer
                sends N messages.  deliveries/s = all messages received / (first send -> last receive).
  backlog       N messages into a queue with no consumer (ended by a receipted count-msgs control
                SEND), then one consumer (ack client, prefetch 100) drains it.  fill and drain msgs/s.
  subs          K connections x M subscriptions (queue or topic), the last SUBSCRIBE of each with a
                receipt; the caller measures broker RSS before and after (hold/release events).

Run one case directly:  python3 bench/loadgen.py --port 61613 queue --messages 10000
Everything talks to 127.0.0.1 (or --host); every socket has a timeout; every loop has a deadline.
"""

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from testkit import BrokerError, ProcProbe, die_with_parent  # noqa: E402,F401

RECV_SIZE = 1 << 18
SOCK_TIMEOUT = 10.0          # any single blocking socket operation
POLL = 0.1                   # recv timeout while also watching a shared condition


class BenchError(Exception):
    """A protocol or broker failure seen by the load generator."""


FAILURES = (BenchError, OSError, BrokerError)   # what fails a case (not the whole run)


# --------------------------------------------------------------------------------------------
# Framing (client side)

def frame(command, headers=(), body=b""):
    """Encode one client frame.  headers: iterable of (name, value) str pairs (no escaping needed
    for the values we use)."""
    head = command + "\n" + "".join("%s:%s\n" % (k, v) for k, v in headers) + "\n"
    return head.encode() + body + b"\0"


def header(head, name):
    """Value (bytes) of header `name` (bytes, e.g. b"ack") in a raw header block, first one wins;
    None if absent.  `head` is the raw bytes before the blank line, command line included."""
    key = b"\n" + name + b":"
    i = head.find(key)
    if i < 0:
        return None
    i += len(key)
    j = head.find(b"\n", i)
    v = head[i:] if j < 0 else head[i:j]
    return v[:-1] if v.endswith(b"\r") else v


def command_of(head):
    i = head.find(b"\n")
    c = head if i < 0 else head[:i]
    return c[:-1] if c.endswith(b"\r") else c


class FrameReader:
    """Incremental parser for broker->client frames.  feed(data) returns a list of (head, body):
    head is the raw header block (command line first, bytes), body the payload.  A frame with
    content-length is cut by length (bodies may hold NUL), otherwise at the first NUL.  EOLs
    between frames (heart-beats, the broker's trailing "\\n") are skipped."""

    __slots__ = ("buf", "max_frame")

    def __init__(self, max_frame=64 << 20):
        self.buf = b""
        self.max_frame = max_frame

    def feed(self, data):
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        out = []
        append = out.append
        while True:
            while pos < n and buf[pos] in (10, 13):
                pos += 1
            if pos >= n:
                break
            hend = buf.find(b"\n\n", pos)
            if hend < 0:
                # CRLF line endings: the header block ends with "\r\n\r\n"
                hend2 = buf.find(b"\n\r\n", pos)
                if hend2 < 0:
                    if n - pos > self.max_frame:
                        raise BenchError("frame header too long")
                    break
                hend, skip = hend2, 3
            else:
                # a CRLF frame whose blank line is "\r\n" after "\r\n" also contains "\n\r\n"
                # before any "\n\n"; check that only when the command line uses CR
                skip = 2
                nl = buf.find(b"\n", pos)
                if nl > pos and buf[nl - 1] == 13:
                    h2 = buf.find(b"\n\r\n", pos, hend + 1)
                    if h2 >= 0:
                        hend, skip = h2, 3
            head = buf[pos:hend]
            bstart = hend + skip
            i = head.find(b"\ncontent-length:")
            if i >= 0:
                j = head.find(b"\n", i + 16)
                v = head[i + 16:] if j < 0 else head[i + 16:j]
                try:
                    length = int(v.strip())
                except ValueError:
                    raise BenchError("bad content-length %r" % v)
                bend = bstart + length
                if bend >= n:
                    if length > self.max_frame:
                        raise BenchError("frame too large")
                    break
                if buf[bend] != 0:
                    raise BenchError("frame not NUL-terminated after content-length")
            else:
                bend = buf.find(b"\0", bstart)
                if bend < 0:
                    break
            append((head, buf[bstart:bend]))
            pos = bend + 1
        self.buf = buf[pos:] if pos < n else b""
        return out


# --------------------------------------------------------------------------------------------
# Connection

class Conn:
    """One STOMP 1.2 connection on a blocking socket with a timeout, over plain TCP or one of
    the broker's other transports: "tls", "ws" (STOMP over WebSocket) or "wss"."""

    def __init__(self, host, port, login=None, passcode=None, timeout=SOCK_TIMEOUT,
                 transport="tcp"):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if transport in ("tls", "wss"):
            context = ssl.create_default_context()
            context.check_hostname = False           # the bench's self-signed certificate
            context.verify_mode = ssl.CERT_NONE
            self.sock = context.wrap_socket(self.sock)
        self.ws = WsFraming(self.sock, host) if transport in ("ws", "wss") else None
        self.reader = FrameReader()
        self.pending = []            # frames read but not yet consumed by wait_*
        hdrs = [("accept-version", "1.2"), ("host", "localhost")]
        if login is not None:
            hdrs += [("login", login), ("passcode", passcode or "")]
        self.send(frame("CONNECT", hdrs))
        head, _ = self.next_frame(time.monotonic() + timeout)
        if command_of(head) != b"CONNECTED":
            raise BenchError("CONNECT answered with %r" % head[:200])
        self.version = header(head, b"version")

    def send(self, data):
        self.sock.sendall(data if self.ws is None else self.ws.wrap(data))

    def ack_frame(self, head, mid):
        """The ACK for a MESSAGE (raw header block `head`, its message-id `mid`): by the `ack`
        header in 1.2, by message-id (+ subscription) when the broker negotiated 1.0 / 1.1."""
        if self.version == b"1.2":
            aid = header(head, b"ack")
            if aid is not None:
                return b"ACK\nid:" + aid + b"\n\n\0"
        sub = header(head, b"subscription")   # 1.0 / 1.1, or a 1.2 broker that sent no `ack`
        return (b"ACK\nid:" + mid + b"\nmessage-id:" + mid
                + (b"\nsubscription:" + sub if sub else b"") + b"\n\n\0")

    def recv_frames(self, timeout=None):
        """Read once (waiting up to `timeout`, default the socket's) and return parsed frames;
        [] on timeout.  Raises BenchError on EOF or on an ERROR frame."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(RECV_SIZE)
        except socket.timeout:
            return []
        finally:
            if timeout is not None:
                self.sock.settimeout(SOCK_TIMEOUT)
        if not data:
            raise BenchError("connection closed by broker")
        if self.ws is not None:
            data = self.ws.unwrap(data)
        frames = self.reader.feed(data)
        for head, body in frames:
            if head.startswith(b"ERROR"):
                raise BenchError("ERROR frame: %r %r" % (head[:300], body[:300]))
        return frames

    def next_frame(self, deadline):
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("timed out waiting for a frame")
            self.pending.extend(self.recv_frames(min(left, SOCK_TIMEOUT)))
        return self.pending.pop(0)

    def wait_receipt(self, rid, deadline, on_other=None):
        """Wait for RECEIPT receipt-id:rid; other frames go to on_other(head, body) (or are an
        error if on_other is None).  Returns the RECEIPT's header block."""
        rid = rid.encode() if isinstance(rid, str) else rid
        while True:
            head, body = self.next_frame(deadline)
            if command_of(head) == b"RECEIPT" and header(head, b"receipt-id") == rid:
                return head
            if on_other is None:
                raise BenchError("unexpected frame while waiting for receipt %r: %r"
                                 % (rid, head[:200]))
            on_other(head, body)

    def close(self, graceful=True):
        try:
            if graceful:
                self.send(frame("DISCONNECT"))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class WsFraming:
    """The client side of STOMP over WebSocket, as far as the bench needs it: the upgrade,
    then every send is one masked binary message, and what arrives is unwrapped."""

    def __init__(self, sock, host):
        sock.sendall(("GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: YmVuY2hiZW5jaGJlbmNoIQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v12.stomp\r\n\r\n"
                      % host).encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError("WebSocket handshake: connection closed")
            answer += chunk
        head, _, self.buf = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise BenchError("WebSocket handshake answered %r" % head[:100])

    @staticmethod
    def wrap(data):
        n = len(data)
        length = bytes([0x80 | n]) if n < 126 else bytes([0xFE]) + n.to_bytes(2, "big") \
            if n < 65536 else bytes([0xFF]) + n.to_bytes(8, "big")
        return b"\x82" + length + b"\0\0\0\0" + data      # a zero mask leaves data as it is

    def unwrap(self, data):
        buf = self.buf + data if self.buf else data
        out, pos = [], 0
        while len(buf) - pos >= 2:
            n, start = buf[pos + 1] & 0x7F, pos + 2
            if n == 126:
                n, start = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif n == 127:
                n, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            if len(buf) < start + n:
                break
            if buf[pos] & 0x0F in (1, 2):
                out.append(buf[start:start + n])
            pos = start + n
        self.buf = buf[pos:]
        return b"".join(out)


def control_count(host, port, dest, what="msgs", timeout=10.0, login=None, passcode=None):
    """num-messages (what="msgs") or num-subscribers (what="subscribers") of `dest`
    (/queue/X or /topic/X) through the /control/count-* destinations.  Returns int or None."""
    c = Conn(host, port, login, passcode, timeout=timeout)
    try:
        c.send(frame("SEND", [("destination", "/control/count-%s%s" % (what, dest)),
                              ("receipt", "cnt")]))
        head = c.wait_receipt("cnt", time.monotonic() + timeout)
        v = header(head, b"num-messages" if what == "msgs" else b"num-subscribers")
        return int(v) if v is not None else None
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# Worker harness

def cpu_now():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Ctx:
    """What a worker function gets: connection settings, its deadline, and the synchronisation
    with the parent (ready -> start, report -> release)."""

    def __init__(self, idx, opts, events, resq, deadline):
        self.idx = idx
        self.host = opts["host"]
        self.port = opts["port"]
        self.login = opts.get("login")
        self.passcode = opts.get("passcode")
        self.transport = opts.get("transport", "tcp")
        self.start_ev, self.release_ev = events
        self.resq = resq
        self.deadline = deadline
        self.cpu0 = None
        self.reported = False

    def connect(self):
        return Conn(self.host, self.port, self.login, self.passcode, transport=self.transport)

    def ready(self):
        """Tell the parent setup is done; block until every worker is ready and the parent says
        go.  The CPU measurement starts here."""
        self.resq.put(("ready", self.idx, None))
        if not self.start_ev.wait(max(0.0, self.deadline - time.monotonic())):
            raise BenchError("never got the start signal")
        self.cpu0 = cpu_now()

    def report(self, result):
        result = dict(result)
        result["cpu"] = cpu_now() - (self.cpu0 if self.cpu0 is not None else 0.0)
        self.resq.put(("result", self.idx, result))
        self.reported = True

    def hold(self):
        """After report(): keep the connection open until the parent releases the workers."""
        self.release_ev.wait(max(0.0, self.deadline - time.monotonic()))

    def left(self):
        return self.deadline - time.monotonic()

    def check(self):
        if time.monotonic() > self.deadline:
            raise BenchError("worker deadline passed")


def _worker_entry(fn, idx, params, opts, events, resq, deadline):
    die_with_parent()
    ctx = Ctx(idx, opts, events, resq, deadline)
    try:
        res = fn(ctx, **params)
        if not ctx.reported:
            ctx.report(res or {})
    except BaseException as e:  # report everything, incl. KeyboardInterrupt, to the parent
        try:
            resq.put(("error", idx, "%s: %s" % (type(e).__name__, e)))
        except Exception:
            pass
    finally:
        try:
            resq.close()
            resq.join_thread()
        except Exception:
            pass


class WorkerSet:
    """Start workers, wait for ready, start them, collect results; always stops them all.

    specs: list of (fn, params).  sample: optional callable run every ~50 ms while waiting
    (used to sample the broker's RSS).  Use as a context manager."""

    def __init__(self, specs, opts, timeout, sample=None):
        self.ctx = mp.get_context("fork")
        self.specs = specs
        self.opts = opts
        self.deadline = time.monotonic() + timeout
        self.sample = sample
        self.start_ev = self.ctx.Event()
        self.release_ev = self.ctx.Event()
        self.resq = self.ctx.Queue()
        self.procs = []
        self.results = {}
        self.values = {}          # kind -> {worker index: value}, for every kind a worker sent
        self.errors = []

    def __enter__(self):
        for i, (fn, params) in enumerate(self.specs):
            p = self.ctx.Process(target=_worker_entry, daemon=True,
                                 args=(fn, i, params, self.opts,
                                       (self.start_ev, self.release_ev), self.resq,
                                       self.deadline))
            p.start()
            self.procs.append(p)
        return self

    def _collect(self, kind, want):
        """Wait until `want` messages of `kind` arrived (or an error / the deadline)."""
        got = set()
        while len(got) < want:
            if self.sample:
                self.sample()
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BenchError("timed out waiting for workers (%s: %d of %d)"
                                 % (kind, len(got), want))
            try:
                k, idx, val = self.resq.get(timeout=min(0.05, left))
            except queue_mod.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise BenchError("worker died with exit code %s" % dead[0].exitcode)
                continue
            if k == "error":
                self.errors.append(val)
                raise BenchError("worker %d: %s" % (idx, val))
            self.values.setdefault(k, {})[idx] = val
            if k == "result":
                self.results[idx] = val
            if k == kind:
                got.add(idx)
        return got

    def wait_ready(self):
        self._collect("ready", len(self.procs))

    def start(self):
        self.start_ev.set()

    def wait_results(self):
        self._collect("result", len(self.procs) - len(self.results))
        return [self.results[i] for i in range(len(self.procs))]

    def release(self):
        self.release_ev.set()

    def __exit__(self, *exc):
        self.start_ev.set()          # unblock anyone still waiting (they then fail fast)
        self.release_ev.set()
        end = time.monotonic() + 5.0
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        try:
            self.resq.close()
            self.resq.cancel_join_thread()
        except Exception:
            pass
        return False


def run_workers(specs, opts, timeout, sample=None, between=None):
    """Convenience: ready -> (between()) -> start -> results.  Returns the result dicts."""
    with WorkerSet(specs, opts, timeout, sample) as ws:
        ws.wait_ready()
        if between:
            between()
        ws.start()
        res = ws.wait_results()
        ws.release()
        return res


# --------------------------------------------------------------------------------------------
# Worker roles (each runs in its own process)

def role_producer(ctx, dest, count, size, batch, receipt_at_end=True, count_dest=None,
                  last_receipt=False):
    """Send `count` SENDs of `size` bytes without receipts, `batch` frames per sendall; end with a
    receipted frame so the broker has taken them all (count_dest: a receipted
    /control/count-msgs SEND whose answer is returned; last_receipt: the last SEND itself carries
    the receipt; otherwise a receipted DISCONNECT)."""
    c = ctx.connect()
    one = frame("SEND", [("destination", dest), ("content-length", size)], b"x" * size)
    ctx.ready()
    t0 = time.monotonic()
    sent = 0
    if last_receipt:
        count -= 1
    while sent < count:
        k = min(batch, count - sent)
        c.send(one * k)
        sent += k
        if sent % (batch * 50) == 0:
            ctx.check()
    if last_receipt:
        c.send(frame("SEND", [("destination", dest), ("receipt", "end"),
                              ("content-length", size)], b"x" * size))
        sent += 1
    t_sent = time.monotonic()
    res = {"sent": sent, "t_first": t0, "t_sent": t_sent}
    if last_receipt:
        c.wait_receipt("end", ctx.deadline)
        res["t_receipt"] = time.monotonic()
        c.close()
    elif count_dest:
        c.send(frame("SEND", [("destination", "/control/count-msgs" + count_dest),
                              ("receipt", "end")]))
        head = c.wait_receipt("end", ctx.deadline)
        v = header(head, b"num-messages")
        res["num_messages"] = int(v) if v is not None else None
        res["t_receipt"] = time.monotonic()
        c.close()
    elif receipt_at_end:
        c.send(frame("DISCONNECT", [("receipt", "end")]))
        try:
            c.wait_receipt("end", ctx.deadline)
        except BenchError as e:          # some (1.0) brokers just close after DISCONNECT
            if "closed by broker" not in str(e):
                raise
            res["disconnect"] = "closed without RECEIPT"
        res["t_receipt"] = time.monotonic()
        c.close(graceful=False)
    else:
        c.close()
    return res


def role_queue_consumer(ctx, dest, ack_mode, prefetch, total, counter):
    """Subscribe to a queue and ACK every MESSAGE (in the same sendall per read) until the shared
    `counter` (all consumers together) reaches `total`."""
    c = ctx.connect()
    c.send(frame("SUBSCRIBE", [("destination", dest), ("id", "s"), ("ack", ack_mode),
                               ("prefetch", prefetch), ("receipt", "sub")]))
    c.wait_receipt("sub", ctx.deadline)
    ctx.ready()
    got = 0
    redelivered = 0
    ids = []
    t_first = t_last_ack = None
    while True:
        frames = c.recv_frames(POLL)
        if frames:
            acks = []
            n = 0
            for head, body in frames:
                if not head.startswith(b"MESSAGE"):
                    raise BenchError("unexpected frame %r" % head[:200])
                mid = header(head, b"message-id")
                acks.append(c.ack_frame(head, mid))
                ids.append(mid)
                if b"\nredelivered:true" in head:
                    redelivered += 1
                n += 1
            if t_first is None:
                t_first = time.monotonic()
            c.send(b"".join(acks))
            t_last_ack = time.monotonic()
            got += n
            with counter.get_lock():
                counter.value += n
                done = counter.value >= total
        else:
            done = counter.value >= total
        if done:
            break
        ctx.check()
    # make sure the broker has processed our ACKs before we disconnect (outside the timing)
    c.send(frame("DISCONNECT", [("receipt", "bye")]))
    try:
        c.wait_receipt("bye", ctx.deadline, on_other=lambda h, b: None)
    except BenchError:
        pass
    c.close(graceful=False)
    return {"received": got, "redelivered": redelivered, "t_first_recv": t_first,
            "t_last_ack": t_last_ack, "ids": ids}


def role_durable_producer(ctx, dest, size, duration):
    """SEND with a receipt, wait for the RECEIPT, repeat for `duration` seconds."""
    c = ctx.connect()
    ctx.ready()
    lat = []
    t0 = time.monotonic()
    end = t0 + duration
    i = 0
    body = b"x" * size
    while True:
        now = time.monotonic()
        if now >= end:
            break
        rid = "r%d" % i
        c.send(frame("SEND", [("destination", dest), ("receipt", rid),
                              ("content-length", size)], body))
        c.wait_receipt(rid, min(ctx.deadline, now + SOCK_TIMEOUT))
        lat.append(time.monotonic() - now)
        i += 1
    t1 = time.monotonic()
    c.close()
    return {"receipts": len(lat), "t_first": t0, "t_end": t1, "lat": lat}


def role_topic_subscriber(ctx, dest, expect, idle):
    """Subscribe (ack auto) and count MESSAGEs until `expect` arrived, or nothing arrived for
    `idle` seconds after the first one (lost messages are then reported)."""
    c = ctx.connect()
    c.send(frame("SUBSCRIBE", [("destination", dest), ("id", "s"), ("ack", "auto"),
                               ("receipt", "sub")]))
    c.wait_receipt("sub", ctx.deadline)
    ctx.ready()
    got = 0
    t_start = time.monotonic()
    t_last = None
    while got < expect:
        frames = c.recv_frames(POLL)
        now = time.monotonic()
        if frames:
            for head, _ in frames:
                if head.startswith(b"MESSAGE"):
                    got += 1
            t_last = now
        elif now - (t_last or t_start) > idle:
            break
        ctx.check()
    c.close()
    return {"received": got, "t_last_recv": t_last}


def role_drain_consumer(ctx, dest, ack_mode, prefetch, total):
    """Subscribe to a filled queue and ACK every message until `total` were received."""
    c = ctx.connect()
    ctx.ready()
    t0 = time.monotonic()
    c.send(frame("SUBSCRIBE", [("destination", dest), ("id", "s"), ("ack", ack_mode),
                               ("prefetch", prefetch)]))
    got = 0
    redelivered = 0
    ids = []
    t_last_ack = None
    while got < total:
        frames = c.recv_frames(SOCK_TIMEOUT)
        if not frames:
            raise BenchError("no message for %.0f s after %d of %d" % (SOCK_TIMEOUT, got, total))
        acks = []
        for head, _ in frames:
            if not head.startswith(b"MESSAGE"):
                raise BenchError("unexpected frame %r" % head[:200])
            mid = header(head, b"message-id")
            acks.append(c.ack_frame(head, mid))
            ids.append(mid)
            if b"\nredelivered:true" in head:
                redelivered += 1
        c.send(b"".join(acks))
        t_last_ack = time.monotonic()
        got += len(acks)
        ctx.check()
    c.send(frame("DISCONNECT", [("receipt", "bye")]))
    try:
        c.wait_receipt("bye", ctx.deadline, on_other=lambda h, b: None)
    except BenchError:
        pass
    c.close(graceful=False)
    return {"received": got, "redelivered": redelivered, "t_first": t0,
            "t_last_ack": t_last_ack, "ids": ids}


def role_subscriber_many(ctx, prefix, count, batch):
    """Open `count` subscriptions (destination prefix + index, distinct ids), `batch` SUBSCRIBEs
    per sendall, the last with a receipt; report once the RECEIPT is in, then keep the connection
    open until the parent has measured the broker."""
    c = ctx.connect()
    ctx.ready()
    t0 = time.monotonic()
    i = 0
    while i < count:
        parts = []
        for j in range(i, min(i + batch, count)):
            hdrs = [("destination", "%s%d" % (prefix, j)), ("id", "s%d" % j), ("ack", "auto")]
            if j == count - 1:
                hdrs.append(("receipt", "last"))
            parts.append(frame("SUBSCRIBE", hdrs))
        c.send(b"".join(parts))
        i += batch
        ctx.check()
    c.wait_receipt("last", ctx.deadline)
    t1 = time.monotonic()
    ctx.report({"subscriptions": count, "t_first": t0, "t_receipt": t1})
    ctx.hold()
    c.close()


# --------------------------------------------------------------------------------------------
# Cases: each returns a list of figure dicts:
#   {"case", "figure", "value", "unit", "lg_cpu_s", "lg_wall_s", "lg_max_proc", "ok", "notes"}

_seq = [0]


def unique(name):
    _seq[0] += 1
    return "bench-%s-%d-%d-%d" % (name, int(time.time() * 1000), os.getpid(), _seq[0])


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def _cpu(results, wall):
    cpus = [r.get("cpu", 0.0) for r in results]
    total = sum(cpus)
    return {"lg_cpu_s": round(total, 3), "lg_wall_s": round(wall, 3),
            "lg_procs": len(cpus),
            "lg_cores": round(total / wall, 3) if wall > 0 else None,
            "lg_max_proc": round(max(cpus) / wall, 3) if wall > 0 and cpus else None}


def fig(case, figure, value, unit, cpu, ok=True, notes=""):
    d = {"case": case, "figure": figure, "value": value, "unit": unit, "ok": ok, "notes": notes}
    d.update(cpu)
    return d


NOT_CHECKED = "not checked (--no-control)"


class Env:
    """What a case needs: where the broker is, how long it may take, and (optional) a probe of
    the broker process (`broker` with rss()/hwm()/reset_hwm()/cpu(), or None)."""

    def __init__(self, host, port, timeout, broker=None, scale=1.0, login=None, passcode=None,
                 control=True, transport="tcp", transport_port=None):
        self.opts = {"host": host, "port": transport_port or port, "login": login,
                     "passcode": passcode, "transport": transport}
        self.control = control      # False: the broker has no ocamlmq /control/ destinations
        self.host, self.port = host, port
        self.timeout = timeout
        self.broker = broker
        self.scale = scale

    def count(self, dest, what="msgs", want=None, tries=20):
        """A /control/count-* answer (retried briefly until it equals `want`), an error text, or
        NOT_CHECKED when the broker has no control destinations."""
        if not self.control:
            return NOT_CHECKED
        v = None
        try:
            for _ in range(tries):
                v = control_count(self.host, self.port, dest, what,
                                  login=self.opts["login"], passcode=self.opts["passcode"])
                if want is None or v == want:
                    break
                time.sleep(0.1)
        except (OSError, BenchError) as e:
            v = "error: %s" % e
        return v

    def n(self, v):
        return max(1, int(v * self.scale))

    def deadline_left(self, start):
        return max(1.0, self.timeout - (time.monotonic() - start))


def case_queue(env, producers=2, messages=50000, size=100, consumers=2,
               ack="client-individual", prefetch=100, batch=200):
    messages = env.n(messages)
    dest = "/queue/" + unique("queue")
    total = producers * messages
    counter = mp.get_context("fork").Value("q", 0)
    specs = [(role_queue_consumer, dict(dest=dest, ack_mode=ack, prefetch=prefetch, total=total,
                                        counter=counter)) for _ in range(consumers)]
    specs += [(role_producer, dict(dest=dest, count=messages, size=size, batch=batch))
              for _ in range(producers)]
    b0 = env.broker.cpu() if env.broker else None
    res = run_workers(specs, env.opts, env.timeout)
    cons, prods = res[:consumers], res[consumers:]
    t0 = min(r["t_first"] for r in prods)
    t1 = max(r["t_last_ack"] for r in cons if r["t_last_ack"] is not None)
    wall = t1 - t0
    got = sum(r["received"] for r in cons)
    redel = sum(r["redelivered"] for r in cons)
    distinct = len(set(i for r in cons for i in r.pop("ids")))
    bcpu = env.broker.cpu() - b0 if env.broker else None
    left = env.count(dest, want=0)
    ok = got == total and distinct == total and left in (0, NOT_CHECKED)
    notes = "%d producers x %d msgs of %d B, %d consumers %s prefetch %d; received %d " \
            "(%d distinct message-ids), %d marked redelivered:true, left in queue %s" % (
                producers, messages, size, consumers, ack, prefetch, got, distinct, redel, left)
    if redel:
        notes += " (unexpected: no consumer NACKed, timed out or disconnected)"
    notes += "; all SENDs written by +%.1f s" % (max(r["t_sent"] for r in prods) - t0)
    cpu = _cpu(res, wall)
    cpu["broker_cpu_s"] = round(bcpu, 3) if bcpu is not None else None
    return [fig("queue", "msgs/s (first SEND -> last ACK)", total / wall, "msg/s", cpu, ok, notes)]


def case_durable(env, producers=4, duration=10.0, size=100):
    dest = "/queue/" + unique("durable%d" % producers)
    duration = max(1.0, duration * env.scale) if env.scale < 1 else duration
    specs = [(role_durable_producer, dict(dest=dest, size=size, duration=duration))
             for _ in range(producers)]
    b0 = env.broker.cpu() if env.broker else None
    res = run_workers(specs, env.opts, env.timeout)
    t0 = min(r["t_first"] for r in res)
    t1 = max(r["t_end"] for r in res)
    wall = t1 - t0
    n = sum(r["receipts"] for r in res)
    lat = sorted(x for r in res for x in r["lat"])
    bcpu = env.broker.cpu() - b0 if env.broker else None
    cpu = _cpu(res, wall)
    cpu["broker_cpu_s"] = round(bcpu, 3) if bcpu is not None else None
    notes = "%d producers, %.0f s, %d receipts" % (producers, duration, n)
    case = "durable%d" % producers
    p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
    return [fig(case, "receipted msgs/s", n / wall, "msg/s", cpu, n > 0, notes),
            fig(case, "receipt latency p50", p50 * 1000 if p50 is not None else None, "ms", cpu,
                n > 0, notes),
            fig(case, "receipt latency p99", p99 * 1000 if p99 is not None else None, "ms", cpu,
                n > 0, notes)]


def case_topic(env, subscribers=10, messages=50000, size=100, prefix=False, batch=200, idle=5.0):
    messages = env.n(messages)
    name = unique("topic")
    if prefix:
        sub_dest, send_dest = "/topic/%s*" % name, "/topic/%s.x" % name
    else:
        sub_dest = send_dest = "/topic/" + name
    specs = [(role_topic_subscriber, dict(dest=sub_dest, expect=messages, idle=idle))
             for _ in range(subscribers)]
    specs.append((role_producer, dict(dest=send_dest, count=messages, size=size, batch=batch)))
    b0 = env.broker.cpu() if env.broker else None
    res = run_workers(specs, env.opts, env.timeout)
    subs, prod = res[:-1], res[-1]
    t0 = prod["t_first"]
    lasts = [r["t_last_recv"] for r in subs if r["t_last_recv"] is not None]
    got = sum(r["received"] for r in subs)
    wall = (max(lasts) - t0) if lasts else 0.0
    bcpu = env.broker.cpu() - b0 if env.broker else None
    cpu = _cpu(res, wall if wall > 0 else 1.0)
    cpu["broker_cpu_s"] = round(bcpu, 3) if bcpu is not None else None
    want = subscribers * messages
    case = "topic_prefix" if prefix else "topic"
    notes = "%d subscribers on %s, %d msgs of %d B to %s; received %d of %d" % (
        subscribers, "/topic/NAME*" if prefix else "/topic/NAME", messages, size,
        "/topic/NAME.x" if prefix else "/topic/NAME", got, want)
    return [fig(case, "deliveries/s (first send -> last receive)",
                got / wall if wall > 0 else None, "msg/s", cpu, got == want, notes)]


def case_backlog(env, messages=200000, size=100, ack="client", prefetch=100, batch=200):
    messages = env.n(messages)
    dest = "/queue/" + unique("backlog")
    br = env.broker
    peak = [0]
    hwm_reset = False
    if br:
        rss0 = br.rss()
        hwm_reset = br.reset_hwm()
        peak[0] = rss0 or 0

    def sample():
        if br:
            v = br.rss()
            if v and v > peak[0]:
                peak[0] = v

    t_start = time.monotonic()
    b0 = br.cpu() if br else None
    res = run_workers([(role_producer, dict(dest=dest, count=messages, size=size, batch=batch,
                                            count_dest=dest if env.control else None,
                                            last_receipt=not env.control))],
                      env.opts, env.timeout, sample)
    fill = res[0]
    fill_wall = fill["t_receipt"] - fill["t_first"]
    b1 = br.cpu() if br else None
    res2 = run_workers([(role_drain_consumer, dict(dest=dest, ack_mode=ack, prefetch=prefetch,
                                                   total=messages))],
                       env.opts, env.deadline_left(t_start), sample)
    drain = res2[0]
    distinct = len(set(drain.pop("ids")))
    drain_wall = drain["t_last_ack"] - drain["t_first"]
    b2 = br.cpu() if br else None
    left = env.count(dest, want=0)
    sample()
    figs = []
    cpu_f = _cpu(res, fill_wall)
    cpu_f["broker_cpu_s"] = round(b1 - b0, 3) if br else None
    nm = fill.get("num_messages") if env.control else NOT_CHECKED
    figs.append(fig("backlog", "fill msgs/s (first SEND -> %s RECEIPT)"
                    % ("count-msgs" if env.control else "last SEND's"),
                    messages / fill_wall, "msg/s", cpu_f, nm in (messages, NOT_CHECKED),
                    "%d msgs of %d B, no receipts%s; count-msgs after fill: %s"
                    % (messages, size, "" if env.control else " but the last", nm)))
    cpu_d = _cpu(res2, drain_wall)
    cpu_d["broker_cpu_s"] = round(b2 - b1, 3) if br else None
    figs.append(fig("backlog", "drain msgs/s (SUBSCRIBE -> last ACK)", messages / drain_wall,
                    "msg/s", cpu_d,
                    drain["received"] == messages and distinct == messages
                    and left in (0, NOT_CHECKED),
                    "1 consumer, ack %s, prefetch %d; received %d (%d distinct message-ids), "
                    "%d marked redelivered:true; left in queue %s"
                    % (ack, prefetch, drain["received"], distinct, drain["redelivered"], left)
                    + (" (unexpected: these are first deliveries)" if drain["redelivered"] else "")))
    if br:
        hwm = br.hwm() if hwm_reset else None
        p = max(peak[0], hwm or 0)
        figs.append(fig("backlog", "broker peak RSS", p / 1048576.0, "MiB", {}, True,
                        "before fill %.1f MiB; sampled every ~50 ms%s"
                        % ((rss0 or 0) / 1048576.0,
                           ", VmHWM reset before the case" if hwm_reset else
                           " (VmHWM could not be reset: sampled peak only)")))
    else:
        figs.append(fig("backlog", "broker peak RSS", None, "MiB", {}, True,
                        "skipped: external broker (no PID; pass --pid to sample it)"))
    return figs


def case_subs(env, kind="queue", connections=10, per_conn=10000, batch=500):
    per_conn = env.n(per_conn)
    name = unique("subs" + kind)
    br = env.broker
    before = {}

    def measure_before():
        time.sleep(0.3)
        before["rss"] = br.rss() if br else None

    b0 = br.cpu() if br else None
    specs = [(role_subscriber_many, dict(prefix="/%s/%s-c%d-" % (kind, name, i),
                                         count=per_conn, batch=batch))
             for i in range(connections)]
    with WorkerSet(specs, env.opts, env.timeout) as ws:
        ws.wait_ready()
        measure_before()
        ws.start()
        res = ws.wait_results()
        after = None
        check = None
        if br:
            time.sleep(0.3)
            after = br.rss()
        check = env.count("/%s/%s-c0-%d" % (kind, name, per_conn - 1), "subscribers", tries=1)
        ws.release()
    bcpu = br.cpu() - b0 if br else None
    n = connections * per_conn
    t0 = min(r["t_first"] for r in res)
    t1 = max(r["t_receipt"] for r in res)
    wall = t1 - t0
    cpu = _cpu(res, wall)
    cpu["broker_cpu_s"] = round(bcpu, 3) if bcpu is not None else None
    case = "subs_" + kind
    notes = "%d connections x %d %s subscriptions (distinct destinations); " \
            "count-subscribers on the last one: %s" % (connections, per_conn, kind, check)
    figs = [fig(case, "subscriptions/s (until last RECEIPT)", n / wall, "sub/s", cpu,
                check in (1, NOT_CHECKED), notes)]
    if br and before.get("rss") is not None and after is not None:
        figs.append(fig(case, "broker RSS growth per subscription",
                        (after - before["rss"]) / n, "B/sub", cpu, True,
                        "VmRSS %.1f -> %.1f MiB for %d subscriptions"
                        % (before["rss"] / 1048576.0, after / 1048576.0, n)))
    else:
        figs.append(fig(case, "broker RSS growth per subscription", None, "B/sub", cpu, True,
                        "skipped: external broker (no PID; pass --pid to sample it)"))
    return figs


CASES = {
    "queue": lambda env: case_queue(env),
    "durable4": lambda env: case_durable(env, producers=4),
    "durable16": lambda env: case_durable(env, producers=16),
    "topic": lambda env: case_topic(env),
    "topic_prefix": lambda env: case_topic(env, prefix=True),
    "backlog": lambda env: case_backlog(env),
    "subs_queue": lambda env: case_subs(env, "queue"),
    "subs_topic": lambda env: case_subs(env, "topic"),
}
TRANSPORTS = ("ws", "tls")      # queue_ws, topic_tls, ...: the same case over that transport
for _transport in TRANSPORTS:
    for _case in ("queue", "topic"):
        CASES[f"{_case}_{_transport}"] = CASES[_case]

SCENARIOS = {
    "queue": ["queue"],
    "durable": ["durable4", "durable16"],
    "topic": ["topic", "topic_prefix"],
    "backlog": ["backlog"],
    "subs": ["subs_queue", "subs_topic"],
    "transports": ["queue_ws", "queue_tls", "topic_ws", "topic_tls"],
}


def selftest():
    """Framing checks for FrameReader (no broker needed): python3 bench/loadgen.py selftest"""
    msg = (b"MESSAGE\nmessage-id:7\nack:a7\ncontent-length:5\n\nab\0cd\0\n")
    r = FrameReader()
    out = []
    for i in range(len(msg) * 3):                     # one byte at a time
        out += r.feed((msg * 3)[i:i + 1])
    assert [b for _, b in out] == [b"ab\0cd"] * 3, out
    assert header(out[0][0], b"ack") == b"a7" and command_of(out[0][0]) == b"MESSAGE"
    r = FrameReader()
    out = r.feed(b"\n\r\nRECEIPT\r\nreceipt-id:x\r\n\r\n\0\nRECEIPT\nreceipt-id:y\n\n\0\n")
    assert [header(h, b"receipt-id") for h, _ in out] == [b"x", b"y"], out
    r = FrameReader()
    out = r.feed(b"MESSAGE\nack:1\nack:2\n\nbody\0")  # first header wins, no content-length
    assert out == [(b"MESSAGE\nack:1\nack:2", b"body")] and header(out[0][0], b"ack") == b"1"
    assert frame("ACK", [("id", "5")]) == b"ACK\nid:5\n\n\0"
    print("loadgen selftest ok")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["selftest"]:
        return selftest()
    ap = argparse.ArgumentParser(description="Run one load-generator case against a broker "
                                             "(or 'selftest' for the framing checks).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=61613)
    ap.add_argument("--pid", type=int, help="broker PID on this machine (RSS / CPU figures)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--login")
    ap.add_argument("--passcode")
    ap.add_argument("--no-control", action="store_true",
                    help="the broker has no ocamlmq /control/ destinations: skip those checks")
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="case parameter, e.g. --param messages=10000 (repeatable)")
    a = ap.parse_args(argv)
    env = Env(a.host, a.port, a.timeout, ProcProbe(a.pid) if a.pid else None,
              login=a.login, passcode=a.passcode, control=not a.no_control)
    fn = {"queue": case_queue, "durable4": case_durable, "durable16": case_durable,
          "topic": case_topic, "topic_prefix": case_topic, "backlog": case_backlog,
          "subs_queue": case_subs, "subs_topic": case_subs}[a.case]
    params = {"durable16": {"producers": 16}, "topic_prefix": {"prefix": True},
              "subs_topic": {"kind": "topic"}, "subs_queue": {"kind": "queue"}}.get(a.case, {})
    for p in a.param:
        k, _, v = p.partition("=")
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        params[k] = v
    figs = fn(env, **params)
    print(json.dumps(figs, indent=1))
    return 0 if all(f["ok"] for f in figs) else 1


if __name__ == "__main__":
    sys.exit(main())
