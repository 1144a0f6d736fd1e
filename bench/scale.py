#!/usr/bin/env python3
"""Scale benchmarks for ocamlmq.py: what SPEC section 10 promises at a million subscriptions,
a million queues and a multi-million message backlog.

    python3 bench/scale.py                        # everything at full size (several minutes)
    python3 bench/scale.py --scale 0.01           # quick run (< 1 minute)
    python3 bench/scale.py --only subs_queue,costs --json /tmp/scale.json

Cases (every case starts its own broker from this checkout: free port on 127.0.0.1, database in a
new temp dir; stopped with SIGTERM, then SIGKILL):
  subs_queue  20 connections x 50,000 SUBSCRIBEs to distinct queues: subscribe rate, broker RSS
              growth per subscription, UNSUBSCRIBE rate, then the same subscriptions again and all
              connections closed with them held (half DISCONNECT, half reset): RSS after close and
              /control/count-subscribers on a sample (1 while held, 0 after).
  subs_topic  the same with topic subscriptions, half of them prefix subscriptions (NAME*).
  queues      1,000,000 distinct queues with one unreceipted message each (-flush-period 1):
              broker RSS 3 s after the fill vs its idle RSS (target: within 50 MB), and
              count-msgs on a sample (must answer 1) with its latency.
  backlog     5,000,000 messages, priority = i % 10, in one queue nobody reads: fill rate (target
              > 50,000 msgs/s); then one consumer (client-individual, prefetch 100) drains and ACKs
              them: order must be highest priority first, then oldest; drain rate; broker peak RSS
              over both phases (target < 150 MB; VmRSS sampled every 100 ms, and VmHWM).
  costs       per-operation costs: SEND+delivery throughput on a queue with 1 subscriber vs with
              100,000 subscriptions on other queues, vs 100,000 subscriptions (prefetch 1) on the
              same queue; topic SEND with 1 subscriber vs with 100,000 unrelated prefix
              subscriptions.  The ratios should be a small constant, not ~100,000x.
  delayed     1,000,000 messages with deliver-at times in random order, due over a window
              (--delayed-rate per second), one consumer waiting: fill rate, RSS growth (they
              must wait on disk), lateness p50/p99/max, and that they come out in time order.
  nack        every message delivered three times: plain NACKs (ACK on the third) against
              max-deliveries:3 with NACK every time (then the dead-letter move), deliveries/s.

It reuses bench/loadgen.py (framing, connections, the worker-process harness, worker roles,
/proc probe) and bench/run.py (starting and stopping the broker, the table).  Standard library only.
Every socket has a timeout and every wait a deadline; all connections go to 127.0.0.1.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import select
import socket
import struct
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import loadgen as lg  # noqa: E402
import run as rn  # noqa: E402
from loadgen import BenchError, Conn, command_of, fig, frame, header  # noqa: E402

HOST = "127.0.0.1"
MiB = 1048576.0


# --------------------------------------------------------------------------------------------
# Harness additions: a WorkerSet whose workers go through several phases

class PhasedSet(lg.WorkerSet):
    """loadgen.WorkerSet plus `nphases` go-events handed to every worker as the `go` parameter,
    and phase results: a worker puts (kind, idx, value) on ctx.resq and the parent collects them
    with phase(kind).  Leaving the context sets every event, so no worker waits forever."""

    def __init__(self, specs, opts, timeout, nphases=0, sample=None):
        super().__init__(specs, opts, timeout, sample)
        self.go = [self.ctx.Event() for _ in range(nphases)]
        self.specs = [(fn, dict(params, go=self.go)) for fn, params in specs]

    def phase(self, kind):
        """Wait for every worker's `kind` value; returns them in worker order."""
        have = self.values.get(kind, {})
        if len(have) < len(self.procs):
            self._collect(kind, len(self.procs) - len(have))
        return [self.values[kind][i] for i in range(len(self.procs))]

    def next_phase(self, i):
        self.go[i].set()

    def __exit__(self, *exc):
        for ev in self.go:
            ev.set()
        return super().__exit__(*exc)


def wait_go(ctx, ev):
    if not ev.wait(max(0.0, ctx.deadline - time.monotonic())):
        raise BenchError("parent never started the next phase")


def poll_frames(c, on_frame):
    """Handle whatever the broker already sent, without blocking."""
    while select.select([c.sock], [], [], 0)[0]:
        for head, body in c.recv_frames(1.0):
            on_frame(head, body)


def pump(ctx, c, n, make, batch=500, chunk=5000):
    """Send n frames, make(j, receipt_id_or_None) -> bytes, `batch` per sendall, a receipt on
    every `chunk`-th frame and on the last.  Receipts are read while sending (when they are
    already there), so each one is timed close to when the broker handled its frame.
    Returns {t0, t_end, marks: [(frames done, time)], cpu}."""
    cpu0 = lg.cpu_now()
    t0 = time.monotonic()
    got = {}
    rids = []

    def on_frame(head, body):
        if command_of(head) != b"RECEIPT":
            raise BenchError("unexpected frame %r" % head[:200])
        got[header(head, b"receipt-id").decode()] = time.monotonic()

    j = 0
    while j < n:
        end = min(j + batch, n)
        parts = []
        for k in range(j, end):
            rid = None
            if (k + 1) % chunk == 0 or k == n - 1:
                rid = "r%d" % (k + 1)
                rids.append(rid)
            parts.append(make(k, rid))
        c.send(b"".join(parts))
        j = end
        poll_frames(c, on_frame)
        ctx.check()
    while len(got) < len(rids):
        left = ctx.deadline - time.monotonic()
        if left <= 0:
            raise BenchError("timed out waiting for receipts (%d of %d)" % (len(got), len(rids)))
        for head, body in c.recv_frames(min(lg.SOCK_TIMEOUT, left)):
            on_frame(head, body)
    marks = [(int(r[1:]), got[r]) for r in rids]
    return {"t0": t0, "t_end": max(got.values()) if got else t0, "marks": marks,
            "cpu": lg.cpu_now() - cpu0, "n": n}


def hard_close(c):
    """Close with a TCP reset (SO_LINGER 0): a client that vanished."""
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    c.close(graceful=False)


def graceful_close(ctx, c):
    c.send(frame("DISCONNECT", [("receipt", "bye")]))
    try:
        c.wait_receipt("bye", min(ctx.deadline, time.monotonic() + 30),
                       on_other=lambda h, b: None)
    except BenchError:
        pass
    c.close(graceful=False)


# --------------------------------------------------------------------------------------------
# Worker roles (each in its own process)

def role_subs_cycle(ctx, dest_fn, count, batch, chunk, go, steps=("sub", "unsub", "sub")):
    """Run `steps` over dest_fn(j), j < count: "sub" SUBSCRIBEs them all, "unsub" UNSUBSCRIBEs
    them all; each step after the first waits for the parent's go event, and its result goes
    to the parent as ("<step><k>", idx, value).  After the last step (and one more go event),
    close holding whatever is subscribed: DISCONNECT for even workers, a TCP reset for odd
    ones."""
    c = ctx.connect()

    def sub(j, rid):
        return frame("SUBSCRIBE", [("destination", dest_fn(j)), ("id", "s%d" % j),
                                   ("ack", "auto")] + ([("receipt", rid)] if rid else []))

    def unsub(j, rid):
        return frame("UNSUBSCRIBE", [("id", "s%d" % j)] + ([("receipt", rid)] if rid else []))

    ctx.ready()
    for k, step in enumerate(steps):
        if k:
            wait_go(ctx, go[k - 1])
        ctx.resq.put(("%s%d" % (step, k), ctx.idx,
                      pump(ctx, c, count, sub if step == "sub" else unsub, batch, chunk)))
    wait_go(ctx, go[len(steps) - 1])
    t = time.monotonic()
    if ctx.idx % 2 == 0:
        graceful_close(ctx, c)
        how = "DISCONNECT"
    else:
        hard_close(c)
        how = "reset"
    return {"closed": how, "t_close": t}


def probe_subscribe_median(port, dest_fn, n, k=3):
    """probe_subscribe k times (new names each time); (median rate, all rates)."""
    rates = sorted(probe_subscribe(port, (lambda r: lambda j: dest_fn(r * n + j))(r), n)
                   for r in range(k))
    return rates[len(rates) // 2], rates


def probe_subscribe(port, dest_fn, n, timeout=120.0):
    """One connection SUBSCRIBEs to dest_fn(j) for j < n (pipelined, the last receipted), then
    UNSUBSCRIBEs them again.  Returns SUBSCRIBEs/s (first write -> RECEIPT)."""
    c = Conn(HOST, port)
    deadline = time.monotonic() + timeout
    try:
        t0 = time.monotonic()
        for j0 in range(0, n, 500):
            c.send(b"".join(frame("SUBSCRIBE", [("destination", dest_fn(j)), ("id", "p%d" % j)]
                                  + ([("receipt", "sub")] if j == n - 1 else []))
                            for j in range(j0, min(n, j0 + 500))))
        c.wait_receipt("sub", deadline)
        rate = n / (time.monotonic() - t0)
        for j0 in range(0, n, 500):
            c.send(b"".join(frame("UNSUBSCRIBE", [("id", "p%d" % j)]
                                  + ([("receipt", "unsub")] if j == n - 1 else []))
                            for j in range(j0, min(n, j0 + 500))))
        c.wait_receipt("unsub", deadline)
    finally:
        c.close()
    return rate


def role_hold(ctx, dest_fn, count, batch, headers=()):
    """SUBSCRIBE to dest_fn(j) for j < count (extra SUBSCRIBE headers), then report and hold the
    connection until released.  Anything delivered meanwhile is an error (nothing should be)."""
    c = ctx.connect()
    ctx.ready()

    def sub(j, rid):
        return frame("SUBSCRIBE", [("destination", dest_fn(j)), ("id", "s%d" % j)]
                     + list(headers) + ([("receipt", rid)] if rid else []))

    r = pump(ctx, c, count, sub, batch, chunk=max(count, 1))
    ctx.report({"t_first": r["t0"], "t_receipt": r["t_end"]})
    ctx.hold()
    c.close()


def role_fill(ctx, dest_fn, count, batch, count_dest, priorities=0, size=100):
    """SEND count messages (to dest_fn(j); `priorities` > 0: priority = j % priorities), no
    receipts, `batch` per sendall, then a receipted /control/count-msgs on count_dest."""
    c = ctx.connect()
    body = b"x" * size
    fixed = None
    if dest_fn is None and priorities and batch % priorities == 0:
        fixed = b"".join(frame("SEND", [("destination", count_dest), ("priority", str(p)),
                                        ("content-length", size)], body)
                         for p in list(range(priorities)) * (batch // priorities))
    elif dest_fn is None:
        fixed = frame("SEND", [("destination", count_dest), ("content-length", size)],
                      body) * batch
    ctx.ready()
    t0 = time.monotonic()
    j = 0
    while j < count:
        k = min(batch, count - j)
        if fixed is not None and k == batch:
            c.send(fixed)
        else:
            c.send(b"".join(
                frame("SEND", [("destination", dest_fn(i) if dest_fn else count_dest)]
                      + ([("priority", str(i % priorities))] if priorities else [])
                      + [("content-length", size)], body) for i in range(j, j + k)))
        j += k
        if (j // batch) % 20 == 0:
            ctx.check()
    t_sent = time.monotonic()
    c.send(frame("SEND", [("destination", "/control/count-msgs" + count_dest),
                          ("receipt", "end")]))
    head = c.wait_receipt("end", ctx.deadline)
    t1 = time.monotonic()
    v = header(head, b"num-messages")
    c.close()
    return {"sent": count, "t_first": t0, "t_sent": t_sent, "t_receipt": t1,
            "num_messages": int(v) if v is not None else None}


def role_ordered_drain(ctx, dest, total, prefetch):
    """Subscribe (client-individual) to a filled queue, ACK every message (one sendall per read)
    until `total` arrived; check that (-priority, message-id) strictly increases."""
    c = ctx.connect()
    ctx.ready()
    t0 = time.monotonic()
    c.send(frame("SUBSCRIBE", [("destination", dest), ("id", "s"), ("ack", "client-individual"),
                               ("prefetch", prefetch)]))
    got = 0
    inversions = 0            # priority higher than the one before
    misorders = 0             # same priority, message-id not greater (FIFO broken or duplicate)
    redelivered = 0
    prio_counts = {}
    last = None
    first_bad = None
    t_last = None
    while got < total:
        frames = c.recv_frames(lg.SOCK_TIMEOUT)
        if not frames:
            raise BenchError("no message for %.0f s after %d of %d" % (lg.SOCK_TIMEOUT, got, total))
        acks = []
        for head, _ in frames:
            if not head.startswith(b"MESSAGE"):
                raise BenchError("unexpected frame %r" % head[:200])
            mid = header(head, b"message-id")
            acks.append(c.ack_frame(head, mid))
            p = header(head, b"priority")
            p = int(p) if p is not None else 0
            key = (-p, int(mid))
            prio_counts[p] = prio_counts.get(p, 0) + 1
            if last is not None and key <= last:
                if key[0] < last[0]:
                    inversions += 1
                else:
                    misorders += 1
                if first_bad is None:
                    first_bad = "#%d: priority %d id %d after priority %d id %d" % (
                        got + len(acks) - 1, p, key[1], -last[0], last[1])
            last = key
            if b"\nredelivered:true" in head:
                redelivered += 1
        c.send(b"".join(acks))
        t_last = time.monotonic()
        got += len(acks)
        ctx.check()
    graceful_close(ctx, c)
    return {"received": got, "inversions": inversions, "misorders": misorders,
            "redelivered": redelivered, "first_bad": first_bad, "t_first": t0,
            "t_last_ack": t_last, "prio_counts": prio_counts}


def role_many_consumer(ctx, dest, subs, prefetch, total, counter):
    """`subs` subscriptions (client-individual, prefetch each) to the same queue on one
    connection; ACK everything received (one sendall per read) until the shared counter reaches
    `total`."""
    c = ctx.connect()

    def sub(j, rid):
        return frame("SUBSCRIBE", [("destination", dest), ("id", "s%d" % j),
                                   ("ack", "client-individual"), ("prefetch", prefetch)]
                     + ([("receipt", rid)] if rid else []))

    pump(ctx, c, subs, sub, 500, chunk=max(subs, 1))
    ctx.ready()
    got = 0
    t_last = None
    subs_used = set()
    while True:
        frames = c.recv_frames(lg.POLL)
        if frames:
            acks = []
            for head, _ in frames:
                if not head.startswith(b"MESSAGE"):
                    raise BenchError("unexpected frame %r" % head[:200])
                acks.append(c.ack_frame(head, header(head, b"message-id")))
                subs_used.add(header(head, b"subscription"))
            c.send(b"".join(acks))
            t_last = time.monotonic()
            got += len(acks)
            with counter.get_lock():
                counter.value += len(acks)
                done = counter.value >= total
        else:
            done = counter.value >= total
        if done:
            break
        ctx.check()
    graceful_close(ctx, c)
    return {"received": got, "t_last_ack": t_last, "subs_used": len(subs_used)}


# --------------------------------------------------------------------------------------------
# Parent-side helpers

class RssSampler(threading.Thread):
    """VmRSS of the broker every `period` seconds; max and last value."""

    def __init__(self, probe, period=0.1):
        super().__init__(daemon=True)
        self.probe = probe
        self.period = period
        self.peak = 0
        self.samples = 0
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            v = self.probe.rss()
            if v:
                self.samples += 1
                if v > self.peak:
                    self.peak = v
            self.stop_ev.wait(self.period)

    def stop(self):
        self.stop_ev.set()
        self.join(5.0)


def control_many(port, dests, what, timeout=60.0, sequential=False):
    """Ask /control/count-<what><dest> for every dest on one connection.  Returns (answers,
    latencies): pipelined in one write unless `sequential` (then each is timed on its own)."""
    key = b"num-messages" if what == "msgs" else b"num-subscribers"
    c = Conn(HOST, port, timeout=min(timeout, lg.SOCK_TIMEOUT))
    deadline = time.monotonic() + timeout
    answers, lat = [], []
    try:
        if sequential:
            for i, d in enumerate(dests):
                t = time.monotonic()
                c.send(frame("SEND", [("destination", "/control/count-%s%s" % (what, d)),
                                      ("receipt", "q%d" % i)]))
                head = c.wait_receipt("q%d" % i, deadline)
                lat.append(time.monotonic() - t)
                v = header(head, key)
                answers.append(int(v) if v is not None else None)
        else:
            c.send(b"".join(frame("SEND", [("destination", "/control/count-%s%s" % (what, d)),
                                           ("receipt", "q%d" % i)]) for i, d in enumerate(dests)))
            for i in range(len(dests)):
                head = c.wait_receipt("q%d" % i, deadline)
                v = header(head, key)
                answers.append(int(v) if v is not None else None)
    finally:
        c.close()
    return answers, lat


def settle_counts(port, dests, what, want, timeout=10.0):
    """Poll the sample until every answer is `want` (or time runs out); returns the answers."""
    end = time.monotonic() + timeout
    while True:
        answers, _ = control_many(port, dests, what)
        if all(a == want for a in answers) or time.monotonic() > end:
            return answers
        time.sleep(0.2)


def summarize(answers, want):
    bad = [a for a in answers if a != want]
    if not bad:
        return "all %d answered %s" % (len(answers), want)
    vals = {}
    for a in bad:
        vals[a] = vals.get(a, 0) + 1
    return "%d of %d not %s (%s)" % (len(bad), len(answers), want,
                                    ", ".join("%s: %d" % kv for kv in sorted(vals.items(),
                                                                           key=str)))


def rss_settled(probe, wait=0.5):
    time.sleep(wait)
    return probe.rss() or 0


def cpu_fig(vals, wall, broker_cpu=None):
    d = lg._cpu(vals, wall)
    d["broker_cpu_s"] = round(broker_cpu, 3) if broker_cpu is not None else None
    return d


def phase_figs(case, what, vals, total, b_cpu):
    t0 = min(v["t0"] for v in vals)
    t1 = max(v["t_end"] for v in vals)
    wall = t1 - t0
    return wall, cpu_fig(vals, wall, b_cpu)


class BrokerRun:
    """A fresh broker for one case (run.Broker), plus its log checked for errors at the end."""

    def __init__(self, extra=()):
        self.b = rn.Broker(extra=list(extra))
        self.port = self.b.port
        self.probe = self.b.probe

    def cpu(self):
        return self.probe.cpu()

    def finish(self, case, figs):
        """Stop the broker; add a FAIL figure for a crash, an unclean stop or errors in its log."""
        alive = self.b.alive()
        self.b.stop()
        log = self.b.stderr()
        bad = [line for line in log.splitlines()
               if any(w in line for w in ("Traceback", "ERROR", "error", "Error", "exception"))]
        if not alive:
            figs.append(fig(case, "broker alive at the end", None, "", {}, False,
                            "broker died: " + log[-600:]))
        if bad:
            figs.append(fig(case, "broker log", len(bad), "error lines", {}, False,
                            "first: " + " | ".join(bad[:3])[:600]))
        if self.b.exit_note:
            figs.append(fig(case, "broker clean stop on SIGTERM", None, "", {}, False,
                            self.b.exit_note))
        for f in figs:
            f.setdefault("broker_stop_s", round(self.b.stop_s or 0, 2))
        return figs


def opts(port):
    return {"host": HOST, "port": port, "login": None, "passcode": None}


def scaled(n, scale, low=1):
    return max(low, int(round(n * scale)))


# --------------------------------------------------------------------------------------------
# Cases

def case_subs(args, kind):
    case = "subs_" + kind
    conns = args.conns
    per = scaled(args.subs // conns, args.scale, 10)
    total = per * conns
    base = lg.unique(case)

    if kind == "queue":
        def dest_for(i):
            return lambda j: "/queue/%s-c%02d-%07d" % (base, i, j)

        def count_name(i, j):
            return "/queue/%s-c%02d-%07d" % (base, i, j)
    else:
        # even j: exact topic; odd j: prefix subscription.  Fixed-width numbers, so that no
        # prefix is a prefix of another name and count-subscribers on the prefix answers 1.
        def dest_for(i):
            return lambda j: ("/topic/%s-c%02d-t.%07d" % (base, i, j) if j % 2 == 0
                              else "/topic/%s-c%02d-p.%07d*" % (base, i, j))

        def count_name(i, j):
            return ("/topic/%s-c%02d-t.%07d" % (base, i, j) if j % 2 == 0
                    else "/topic/%s-c%02d-p.%07d" % (base, i, j))

    rnd = random.Random(1)
    sample_ij = sorted(set([(0, 0), (conns - 1, per - 1)]
                           + [(rnd.randrange(conns), rnd.randrange(per))
                              for _ in range(min(args.sample, total))]))
    sample = [count_name(i, j) for i, j in sample_ij]
    br = BrokerRun()
    figs = []
    try:
        probe = br.probe
        timeout = 300 + 4 * total / 2000.0
        chunk = max(1, per // 10)
        nprobe = max(100, min(10000, total // 100))
        probe_dest = (lambda j: "/queue/%s-probe-%07d" % (base, j)) if kind == "queue" else \
            (lambda j: "/topic/%s-probe-%07d%s" % (base, j, "*" if j % 2 else ""))
        probe_empty, pe_all = probe_subscribe_median(br.port, probe_dest, nprobe)
        specs = [(role_subs_cycle, dict(dest_fn=dest_for(i), count=per, batch=min(500, chunk),
                                        chunk=chunk)) for i in range(conns)]
        with PhasedSet(specs, opts(br.port), timeout, nphases=3) as ws:
            ws.wait_ready()
            rss0 = rss_settled(probe, 1.0)
            c0 = br.cpu()
            ws.start()
            sub = ws.phase("sub0")
            c1 = br.cpu()
            rss1 = rss_settled(probe)
            held = settle_counts(br.port, sample, "subscribers", 1, timeout=2.0)
            probe_full, pf_all = probe_subscribe_median(br.port, probe_dest, nprobe)
            wall, cpu = phase_figs(case, "sub", sub, total, c1 - c0)
            figs.append(fig(case, "SUBSCRIBE rate (until last RECEIPT)", total / wall, "sub/s",
                            cpu, True, "%d connections x %d %s subscriptions%s, %d per write"
                            % (conns, per, kind, " (half of them prefix NAME*)"
                               if kind == "topic" else "", min(500, chunk))))
            figs.append(fig(case, "SUBSCRIBE cost with %d held / with none" % total,
                            probe_empty / probe_full, "x", {}, True,
                            "1 connection, %d SUBSCRIBEs pipelined (then UNSUBSCRIBEd), median "
                            "of 3: %.0f sub/s on the empty broker (runs %s), %.0f sub/s with the "
                            "%d held (runs %s); O(log subscriptions): should stay near 1"
                            % (nprobe, probe_empty, ", ".join("%.0f" % r for r in pe_all),
                               probe_full, total, ", ".join("%.0f" % r for r in pf_all))))
            per_sub = (rss1 - rss0) / total
            figs.append(fig(case, "broker RSS growth per subscription", per_sub, "B/sub", {},
                            True, "VmRSS %.1f -> %.1f MiB for %d subscriptions (the OCaml "
                            "original: ~150 B)" % (rss0 / MiB, rss1 / MiB, total)))
            ok_held = all(a == 1 for a in held)
            figs.append(fig(case, "count-subscribers while held", sum(a == 1 for a in held),
                            "of %d = 1" % len(held), {}, ok_held,
                            "sample of %d names: %s" % (len(held), summarize(held, 1))))
            c2 = br.cpu()
            ws.next_phase(0)
            uns = ws.phase("unsub1")
            c3 = br.cpu()
            rss2 = rss_settled(probe)
            after_unsub = settle_counts(br.port, sample, "subscribers", 0)
            wall, cpu = phase_figs(case, "unsub", uns, total, c3 - c2)
            ok0 = all(a == 0 for a in after_unsub)
            figs.append(fig(case, "UNSUBSCRIBE rate (until last RECEIPT)", total / wall,
                            "unsub/s", cpu, ok0,
                            "VmRSS after UNSUBSCRIBE of all: %.1f MiB; count-subscribers: %s"
                            % (rss2 / MiB, summarize(after_unsub, 0))))
            c4 = br.cpu()
            ws.next_phase(1)
            resub = ws.phase("sub2")
            c5 = br.cpu()
            rss3 = rss_settled(probe)
            wall, cpu = phase_figs(case, "resub", resub, total, c5 - c4)
            figs.append(fig(case, "SUBSCRIBE rate, 2nd time (same names)", total / wall,
                            "sub/s", cpu, True, "VmRSS with them held again: %.1f MiB"
                            % (rss3 / MiB)))
            ws.next_phase(2)
            ws.wait_results()
            ws.release()
        after_close = settle_counts(br.port, sample, "subscribers", 0, timeout=15.0)
        rss4 = rss_settled(probe, 2.0)
        peak = max(probe.hwm() or 0, rss1, rss3)
        grown = max(1, peak - rss0)
        kept = (rss4 - rss0) / grown
        near = rss4 - rss0 <= max(0.5 * grown, 32 * MiB)
        figs.append(fig(case, "broker RSS after closing all connections", rss4 / MiB, "MiB",
                        {}, near,
                        "start %.1f MiB, peak %.1f MiB, after close %.1f MiB: %.0f%% of the "
                        "growth kept (check: <= 50%% or 32 MiB; what stays is freed memory "
                        "CPython keeps, and dict tables that do not shrink: the next row shows "
                        "it is reused); closed %d connections holding %d subscriptions (half "
                        "DISCONNECT, half TCP reset)"
                        % (rss0 / MiB, peak / MiB, rss4 / MiB, 100 * kept, conns, total)))
        ok_close = all(a == 0 for a in after_close)
        figs.append(fig(case, "count-subscribers after close", sum(a == 0 for a in after_close),
                        "of %d = 0" % len(after_close), {}, ok_close,
                        "sample of %d names: %s" % (len(after_close),
                                                    summarize(after_close, 0))))
        # a second cycle on new connections: memory kept after close must be reused, not grow
        specs = [(role_subs_cycle, dict(dest_fn=dest_for(i), count=per, batch=min(500, chunk),
                                        chunk=chunk, steps=("sub",))) for i in range(conns)]
        with PhasedSet(specs, opts(br.port), timeout, nphases=1) as ws:
            ws.wait_ready()
            ws.start()
            ws.phase("sub0")
            rss5 = rss_settled(probe)
            ws.next_phase(0)
            ws.wait_results()
            ws.release()
        after_close2 = settle_counts(br.port, sample, "subscribers", 0, timeout=15.0)
        rss6 = rss_settled(probe, 2.0)
        ok2 = rss6 - rss4 <= max(0.1 * grown, 10 * MiB) and all(a == 0 for a in after_close2)
        figs.append(fig(case, "broker RSS after a 2nd subscribe + close cycle", rss6 / MiB,
                        "MiB", {}, ok2,
                        "new connections subscribed all %d again (VmRSS %.1f MiB) and closed: "
                        "%+.1f MiB vs after the 1st close (check: <= 10%% of the growth or 10 "
                        "MiB: memory is reused, not leaked); count-subscribers: %s"
                        % (total, rss5 / MiB, (rss6 - rss4) / MiB, summarize(after_close2, 0))))
    except lg.FAILURES as e:
        figs.append(fail_fig(case, e, br))
    return br.finish(case, figs)


def fail_fig(case, e, br):
    note = "FAILED: %s: %s" % (type(e).__name__, e)
    if br is not None and not br.b.alive():
        note += " | broker died (exit %s): %s" % (br.b.proc.returncode, br.b.log_tail())
    return fig(case, "(failed)", None, "", {}, False, note)


def case_queues(args):
    case = "queues"
    n = scaled(args.queues, args.scale, 100)
    producers = 2
    per = n // producers
    n = per * producers
    base = lg.unique(case)

    def name(i, j):
        return "/queue/%s-p%d-%07d" % (base, i, j)

    br = BrokerRun(["-flush-period", "1"])
    figs = []
    try:
        probe = br.probe
        time.sleep(1.0)
        idle = rss_settled(probe, 0.5)
        sampler = RssSampler(probe)
        sampler.start()
        c0 = br.cpu()
        specs = [(role_fill, dict(dest_fn=(lambda i: lambda j: name(i, j))(i), count=per,
                                  batch=500, count_dest=name(i, per - 1)))
                 for i in range(producers)]
        res = lg.run_workers(specs, opts(br.port), 120 + n / 1000.0)
        c1 = br.cpu()
        t0 = min(r["t_first"] for r in res)
        t1 = max(r["t_receipt"] for r in res)
        wall = t1 - t0
        last_ok = all(r["num_messages"] == 1 for r in res)
        figs.append(fig(case, "fill msgs/s (1 msg to each of N queues)", n / wall, "msg/s",
                        cpu_fig(res, wall, c1 - c0), last_ok,
                        "%d producers x %d queues, 1 unreceipted SEND of 100 B each, ended by a "
                        "receipted count-msgs on each producer's last queue (answers: %s)"
                        % (producers, per, [r["num_messages"] for r in res])))
        time.sleep(args.flush_wait)
        after = probe.rss() or 0
        sampler.stop()
        rnd = random.Random(2)
        sample = [name(rnd.randrange(producers), rnd.randrange(per))
                  for _ in range(min(args.sample, n))]
        answers, lat = control_many(br.port, sample, "msgs", sequential=True)
        after2 = probe.rss() or 0
        lat.sort()
        figs.append(fig(case, "broker RSS growth vs idle, %.0f s after the fill"
                        % args.flush_wait, (after - idle) / MiB, "MiB", {},
                        after - idle <= 50 * MiB,
                        "idle %.1f MiB, after %.1f MiB (target: within 50 MB), peak during fill "
                        "%.1f MiB, after the count-msgs sample %.1f MiB; %d queues, broker "
                        "-flush-period 1" % (idle / MiB, after / MiB, sampler.peak / MiB,
                                             after2 / MiB, n)))
        ok = all(a == 1 for a in answers)
        figs.append(fig(case, "count-msgs latency p50", lg.percentile(lat, 0.5) * 1000, "ms",
                        {}, ok, "sequential count-msgs on %d random queues of the %d: %s"
                        % (len(sample), n, summarize(answers, 1))))
        figs.append(fig(case, "count-msgs latency p99", lg.percentile(lat, 0.99) * 1000, "ms",
                        {}, ok, "sequential count-msgs on %d random queues of the %d: %s"
                        % (len(sample), n, summarize(answers, 1))))
        # as many queues again: if what stays in memory is the allocator keeping its peak, RSS
        # stays put; if it is a per-queue cost, it grows by as much again
        specs = [(role_fill, dict(dest_fn=(lambda i: lambda j: name(i + producers, j))(i),
                                  count=per, batch=500, count_dest=name(i + producers, per - 1)))
                 for i in range(producers)]
        res = lg.run_workers(specs, opts(br.port), 120 + n / 1000.0)
        time.sleep(args.flush_wait)
        after3 = probe.rss() or 0
        ok3 = after3 - after <= max(0.25 * (after - idle), 10 * MiB) \
            and all(r["num_messages"] == 1 for r in res)
        figs.append(fig(case, "broker RSS growth vs idle after %d more queues" % n,
                        (after3 - idle) / MiB, "MiB", {}, ok3,
                        "VmRSS %.1f MiB after the 2nd fill (%d queues in all) vs %.1f MiB after "
                        "the 1st: %+.1f MiB (check: <= 25%% of the 1st growth or 10 MiB; memory "
                        "must not grow with the number of queues)"
                        % (after3 / MiB, 2 * n, after / MiB, (after3 - after) / MiB)))
    except lg.FAILURES as e:
        figs.append(fail_fig(case, e, br))
    return br.finish(case, figs)


def case_backlog(args):
    case = "backlog"
    n = scaled(args.backlog, args.scale, 1000)
    dest = "/queue/" + lg.unique(case)
    br = BrokerRun()
    figs = []
    try:
        probe = br.probe
        time.sleep(0.5)
        rss0 = probe.rss() or 0
        hwm_ok = probe.reset_hwm()
        sampler = RssSampler(probe, 0.1)
        sampler.start()
        c0 = br.cpu()
        res = lg.run_workers([(role_fill, dict(dest_fn=None, count=n, batch=1000,
                                               count_dest=dest, priorities=10))],
                             opts(br.port), 120 + n / 2000.0)
        fill = res[0]
        c1 = br.cpu()
        count = fill["num_messages"]
        polls = 0
        while count != n and polls < 50:
            time.sleep(0.2)
            count = lg.control_count(HOST, br.port, dest)
            polls += 1
        fill_wall = fill["t_receipt"] - fill["t_first"]
        fill_peak = sampler.peak
        rate = n / fill_wall
        figs.append(fig(case, "fill msgs/s (first SEND -> count-msgs RECEIPT)", rate, "msg/s",
                        cpu_fig(res, fill_wall, c1 - c0), rate > 50000 and count == n,
                        "%d msgs of 100 B, priority = i %% 10, no receipts, 1000 per write; "
                        "count-msgs: %s at the RECEIPT, %s after polling (target > 50,000 "
                        "msgs/s); all written by +%.1f s" % (
                            n, fill["num_messages"], count, fill["t_sent"] - fill["t_first"])))
        c2 = br.cpu()
        res2 = lg.run_workers([(role_ordered_drain, dict(dest=dest, total=n, prefetch=100))],
                              opts(br.port), 120 + n / 2000.0)
        d = res2[0]
        c3 = br.cpu()
        left = lg.control_count(HOST, br.port, dest)
        sampler.stop()
        hwm = probe.hwm() if hwm_ok else None
        drain_wall = d["t_last_ack"] - d["t_first"]
        order_ok = d["inversions"] == 0 and d["misorders"] == 0
        figs.append(fig(case, "drain msgs/s (SUBSCRIBE -> last ACK)", n / drain_wall, "msg/s",
                        cpu_fig(res2, drain_wall, c3 - c2),
                        d["received"] == n and order_ok and left == 0,
                        "1 consumer, client-individual, prefetch 100, ACK each (one write per "
                        "read); received %d, %d marked redelivered:true, left in queue %s; "
                        "per priority %s" % (d["received"], d["redelivered"], left,
                                             dict(sorted(d["prio_counts"].items())))))
        figs.append(fig(case, "delivery order: priority inversions", d["inversions"], "",
                        {}, order_ok,
                        "(-priority, message-id) must strictly increase; priority went up %d "
                        "times, same priority with id not increasing %d times%s"
                        % (d["inversions"], d["misorders"],
                           "; first: " + d["first_bad"] if d["first_bad"] else "")))
        peak = max(sampler.peak, hwm or 0)
        figs.append(fig(case, "broker peak RSS (fill + drain)", peak / MiB, "MiB", {},
                        peak < 150 * MiB,
                        "before %.1f MiB; peak during fill %.1f MiB; VmRSS sampled every 100 ms "
                        "(%d samples, max %.1f MiB), VmHWM %s (target < 150 MB)"
                        % (rss0 / MiB, fill_peak / MiB, sampler.samples, sampler.peak / MiB,
                           "%.1f MiB" % (hwm / MiB) if hwm else "not reset")))
    except lg.FAILURES as e:
        figs.append(fail_fig(case, e, br))
    return br.finish(case, figs)


def measure_queue(port, dest, n, consumers=1, subs=1, prefetch=100, timeout=300):
    """Producer sends n msgs to dest; `consumers` connections x `subs` subscriptions consume and
    ACK.  Returns (msgs/s first SEND -> last ACK, received, results)."""
    counter = mp.get_context("fork").Value("q", 0)
    if subs == 1:
        specs = [(lg.role_queue_consumer, dict(dest=dest, ack_mode="client-individual",
                                               prefetch=prefetch, total=n, counter=counter))
                 for _ in range(consumers)]
    else:
        specs = [(role_many_consumer, dict(dest=dest, subs=subs, prefetch=prefetch, total=n,
                                           counter=counter))
                 for _ in range(consumers)]
    specs.append((lg.role_producer, dict(dest=dest, count=n, size=100, batch=200)))
    res = lg.run_workers(specs, opts(port), timeout)
    prod = res[-1]
    cons = res[:-1]
    got = sum(r["received"] for r in cons)
    t1 = max(r["t_last_ack"] for r in cons if r["t_last_ack"] is not None)
    wall = t1 - prod["t_first"]
    return n / wall, got, res, wall


def measure_topic(port, dest, n, timeout=300):
    specs = [(lg.role_topic_subscriber, dict(dest=dest, expect=n, idle=5.0)),
             (lg.role_producer, dict(dest=dest, count=n, size=100, batch=200))]
    res = lg.run_workers(specs, opts(port), timeout)
    sub, prod = res
    wall = (sub["t_last_recv"] or prod["t_first"]) - prod["t_first"]
    return (sub["received"] / wall if wall > 0 else None), sub["received"], res, wall


class Holders:
    """`conns` connections x `per` subscriptions (role_hold) held open inside a `with`."""

    def __init__(self, port, conns, per, dest_for, headers=(), timeout=600):
        self.ws = lg.WorkerSet([(role_hold, dict(dest_fn=dest_for(i), count=per, batch=500,
                                                 headers=headers)) for i in range(conns)],
                               opts(port), timeout)
        self.n = conns * per

    def __enter__(self):
        self.ws.__enter__()
        try:
            self.ws.wait_ready()
            self.ws.start()
            res = self.ws.wait_results()
        except BaseException:
            self.ws.__exit__(*sys.exc_info())
            raise
        self.wall = max(r["t_receipt"] for r in res) - min(r["t_first"] for r in res)
        return self

    def __exit__(self, *exc):
        self.ws.release()
        return self.ws.__exit__(*exc)


def median_run(k, fn):
    """Run fn() (-> (rate, received, results, wall)) k times; the run with the median rate, and
    all the rates."""
    runs = [fn() for _ in range(max(1, k))]
    runs.sort(key=lambda r: r[0] or 0)
    return runs[len(runs) // 2], [r[0] for r in runs]


def case_costs(args):
    case = "costs"
    nq = scaled(args.cost_msgs, args.scale, 200)
    nt = scaled(args.cost_msgs * 2, args.scale, 200)
    conns = args.conns
    per = scaled(args.cost_subs // conns, args.scale, 5)
    nsubs = per * conns
    k = args.cost_repeat
    base = lg.unique(case)
    seq = [0]
    figs = []
    br = BrokerRun()

    def qname(tag):
        seq[0] += 1
        return "/queue/%s-%s-%d" % (base, tag, seq[0])

    def rates(rs):
        return "runs: %s msg/s" % ", ".join("%.0f" % r for r in rs)

    try:
        port = br.port
        tmo = 120 + nq / 500.0

        def q_run(tag, **kw):
            return measure_queue(port, qname(tag), nq, timeout=tmo + nsubs / 1000.0, **kw)

        def t_run(name):
            return measure_topic(port, name, nt, timeout=tmo)

        # queue, 1 subscriber
        (q1, got, res, wall), r1 = median_run(k, lambda: q_run("q1"))
        figs.append(fig(case, "queue: 1 subscriber", q1, "msg/s", cpu_fig(res, wall),
                        got == nq, "%d msgs of 100 B (200 per write, no receipts), 1 consumer "
                        "client-individual prefetch 100, ACK each; msgs / (first SEND -> last "
                        "ACK), median of %d; %s; received %d" % (nq, k, rates(r1), got)))
        # topic, 1 subscriber; a long name so every prefix length is looked up later
        tname = "/topic/%s-t1-%s" % (base, "n" * 40)
        (t1, got, res, wall), r2 = median_run(k, lambda: t_run(tname))
        figs.append(fig(case, "topic: 1 subscriber", t1, "msg/s", cpu_fig(res, wall),
                        got == nt, "%d msgs of 100 B to a %d-char topic name, 1 subscriber "
                        "(auto); msgs / (first SEND -> last receive), median of %d; %s; "
                        "received %d" % (nt, len(tname) - 7, k, rates(r2), got)))
        # queue, 100k subscriptions held on other queues
        with Holders(port, conns, per,
                     lambda i: lambda j: "/queue/%s-other-c%02d-%07d" % (base, i, j),
                     headers=[("ack", "client-individual")]) as h:
            (q2, got, res, wall), r3 = median_run(k, lambda: q_run("q2"))
            figs.append(fig(case, "queue: 1 subscriber, %d subs on other queues" % nsubs, q2,
                            "msg/s", cpu_fig(res, wall), got == nq,
                            "%d connections x %d subscriptions held (subscribed in %.1f s); "
                            "median of %d; %s; received %d"
                            % (conns, per, h.wall, k, rates(r3), got)))
        figs.append(fig(case, "queue SEND cost: %d subs on other queues / none" % nsubs,
                        q1 / q2, "x", {}, True, "time per message relative to the 1-subscriber "
                        "row (O(log subscribers) of its own queue: should be ~1)"))
        # topic, 100k unrelated prefix subscriptions of 40 different lengths
        with Holders(port, conns, per,
                     lambda i: lambda j: "/topic/u%02d%s%07d*" % (i, "z" * (j % 40), j),
                     headers=[("ack", "auto")]) as h:
            tname2 = "/topic/%s-t2-%s" % (base, "n" * 40)
            (t2, got, res, wall), r4 = median_run(k, lambda: t_run(tname2))
            figs.append(fig(case, "topic: 1 subscriber, %d unrelated prefix subs" % nsubs, t2,
                            "msg/s", cpu_fig(res, wall), got == nt,
                            "prefixes /topic/uNN<0-39 z>NNNNNNN* (40 distinct lengths, all "
                            "shorter than the topic name, so each SEND looks all 40 up); "
                            "subscribed in %.1f s; median of %d; %s; received %d"
                            % (h.wall, k, rates(r4), got)))
        figs.append(fig(case, "topic SEND cost: %d unrelated prefix subs / none" % nsubs,
                        t1 / t2, "x", {}, True, "time per message relative to the "
                        "1-subscriber row (O(subscribers + prefix lengths): a small constant)"))
        # the same number of unrelated prefixes, all of one length: one lookup per SEND
        with Holders(port, conns, per,
                     lambda i: lambda j: "/topic/v%02d%07d*" % (i, j),
                     headers=[("ack", "auto")]) as h:
            tname3 = "/topic/%s-t3-%s" % (base, "n" * 40)
            (t3, got, res, wall), r7 = median_run(k, lambda: t_run(tname3))
            figs.append(fig(case, "topic: 1 subscriber, %d prefix subs of 1 length" % nsubs, t3,
                            "msg/s", cpu_fig(res, wall), got == nt,
                            "prefixes /topic/vNNNNNNNNN* (one length: one lookup per SEND); "
                            "subscribed in %.1f s; median of %d; %s; received %d"
                            % (h.wall, k, rates(r7), got)))
        figs.append(fig(case, "topic SEND cost: %d prefix subs of 1 length / none" % nsubs,
                        t1 / t3, "x", {}, True, "time per message relative to the "
                        "1-subscriber row: the number of prefixes costs nothing, the number of "
                        "distinct prefix lengths (row before) a dict lookup each"))
        # queue, 20 connections x 1 subscription, then x per subscriptions on the same queue
        (q3, got, res, wall), r5 = median_run(k, lambda: q_run("q3", consumers=conns))
        figs.append(fig(case, "queue: %d consumers x 1 sub (prefetch 100)" % conns, q3,
                        "msg/s", cpu_fig(res, wall), got == nq,
                        "baseline for the next row; median of %d; %s; received %d"
                        % (k, rates(r5), got)))
        (q4, got, res, wall), r6 = median_run(
            k, lambda: q_run("q4", consumers=conns, subs=per, prefetch=1))
        used = sum(r.get("subs_used", 0) for r in res[:-1])
        figs.append(fig(case, "queue: %d subs on it (%d x %d, prefetch 1)" % (nsubs, conns, per),
                        q4, "msg/s", cpu_fig(res, wall), got == nq,
                        "%d consumer connections x %d subscriptions to the one queue, "
                        "client-individual, ACK each; %d distinct subscriptions got messages; "
                        "median of %d (fresh queue and subscriptions each run, SUBSCRIBEs not "
                        "timed); %s; received %d" % (conns, per, used, k, rates(r6), got)))
        figs.append(fig(case, "queue SEND cost: %d subs on it / 1 sub" % nsubs, q1 / q4, "x",
                        {}, True, "time per message relative to the 1-subscriber row; relative "
                        "to %d x 1 subscription: %.2fx (O(log subscribers): a small constant)"
                        % (conns, q3 / q4)))
        left = [lg.control_count(HOST, port, "/queue/%s-%s-%d" % (base, t, i))
                for i, t in enumerate(["q1"] * k + ["q2"] * k + ["q3"] * k + ["q4"] * k, 1)]
        figs.append(fig(case, "messages left in the measured queues", sum(v for v in left if isinstance(v, int)), "msgs", {},
                        all(v == 0 for v in left), "count-msgs on all %d: %s"
                        % (len(left), summarize(left, 0))))
    except lg.FAILURES as e:
        figs.append(fail_fig(case, e, br))
    return br.finish(case, figs)


# --------------------------------------------------------------------------------------------
# SPEC section 12: delayed messages and dead-letter queues

class Consumer(threading.Thread):
    """Reads MESSAGEs on one connection, ACKs or NACKs each one as `decide(head, count)` says
    ("ACK", "NACK" or "REJECT"; `count` is this client's own count of the message's deliveries,
    so that the case runs on a broker without delivery-count too), and records (message-id,
    receive time, head) until `expect` deliveries have arrived or `deadline` passes."""

    def __init__(self, conn, expect, deadline, decide=None):
        super().__init__(daemon=True)
        self.conn, self.expect, self.deadline, self.decide = conn, expect, deadline, decide
        self.seen, self.counts, self.error = [], {}, None

    def run(self):
        try:
            while len(self.seen) < self.expect and time.monotonic() < self.deadline:
                acks = []
                for head, body in self.conn.recv_frames(1.0):
                    if command_of(head) != b"MESSAGE":
                        continue
                    mid = header(head, b"message-id")
                    count = self.counts[mid] = self.counts.get(mid, 0) + 1
                    self.seen.append((mid, time.time(), head))
                    if self.decide is not None:
                        answer = self.decide(head, count)
                        ack = self.conn.ack_frame(head, mid)
                        acks.append(ack if answer == "ACK" else b"NACK" + ack[3:-3]
                                    + (b"\nrequeue:false" if answer == "REJECT" else b"")
                                    + b"\n\n\0")
                if acks:
                    self.conn.send(b"".join(acks))
        except lg.FAILURES as e:
            self.error = e


def send_all(conn, frames, batch=500):
    """Send the frames `batch` per write, the last with a receipt; wait for it."""
    for start in range(0, len(frames), batch):
        conn.send(b"".join(frames[start:start + batch]))
    conn.send(frame("SEND", [("destination", "/topic/bench-barrier"), ("receipt", "done")]))
    conn.wait_receipt("done", time.monotonic() + 600)


def case_delayed(args):
    """1,000,000 messages with deliver-at times, due over a window at --delayed-rate per
    second, to one queue with a consumer already waiting: fill rate, broker RSS growth (the
    messages must wait on disk), lateness (receive time - deliver-at), none early, and order.
    They are sent in the order of their times, so that the order SPEC section 12 asks for
    (priority, then age, among the messages ready) is the order of their times too."""
    case = "delayed"
    n = scaled(args.delayed, args.scale, 100)
    dest = "/queue/" + lg.unique(case)
    br = BrokerRun()
    figs = []
    try:
        probe = br.probe
        time.sleep(0.5)
        idle = rss_settled(probe, 0.3)
        probe.reset_hwm()
        consumer_conn = Conn(HOST, br.port)
        consumer_conn.send(frame("SUBSCRIBE", [("destination", dest), ("id", "1"),
                                               ("ack", "auto"), ("receipt", "s")]))
        consumer_conn.wait_receipt("s", time.monotonic() + 10)
        window = n / args.delayed_rate
        start_ms = int((time.time() + 5 + n / 20000.0) * 1000)    # after the fill
        frames = [frame("SEND", [("destination", dest),
                                 ("deliver-at", str(start_ms + int(k * window * 1000 / n)))],
                        b"x" * 100) for k in range(n)]
        consumer = Consumer(consumer_conn, n, time.monotonic() + 120 + 3 * window + n / 5000)
        consumer.start()
        producer = Conn(HOST, br.port)
        t0, c0 = time.monotonic(), br.cpu()
        send_all(producer, frames)
        wall = time.monotonic() - t0
        filled = probe.rss()
        figs.append(fig(case, "fill msgs/s (delayed, until a RECEIPT after the last)", n / wall,
                        "msg/s", {"broker_cpu": (br.cpu() - c0) / wall}))
        figs.append(fig(case, "broker RSS growth after the fill", (filled - idle) / MiB, "MiB",
                        {}, True, "idle %.1f MiB" % (idle / MiB)))
        early = len(consumer.seen)
        consumer.join()
        got = consumer.seen
        late = sorted(t - int(header(h, b"deliver-at")) / 1000.0 for _, t, h in got)
        ids = [int(mid) for mid, _, _ in got]
        disorder = sum(1 for a, b in zip(ids, ids[1:]) if b <= a)
        too_early = sum(1 for x in late if x < -0.002)      # the same clock; 2 ms of rounding
        ok = len(got) == n and not early and not too_early and consumer.error is None
        notes = "received %d of %d; %d before the fill ended, %d before their time%s" % (
            len(got), n, early, too_early, "; " + str(consumer.error) if consumer.error else "")
        figs.append(fig(case, "delivered on time: p50 lateness", late[len(late) // 2] * 1000
                        if late else None, "ms", {}, ok, notes))
        figs.append(fig(case, "p99 lateness", late[int(len(late) * 0.99)] * 1000
                        if late else None, "ms", {}, ok))
        figs.append(fig(case, "max lateness", late[-1] * 1000 if late else None, "ms", {}, ok))
        figs.append(fig(case, "messages out of order (message-id not increasing)", disorder, "",
                        {}, disorder == 0))
        figs.append(fig(case, "broker peak RSS (VmHWM)", (probe.hwm() or 0) / MiB, "MiB", {},
                        True, "window %.0f s at %d msgs/s" % (window, args.delayed_rate)))
        producer.close()
        consumer_conn.close()
    except lg.FAILURES as e:
        figs.append(fail_fig(case, e, br))
    return br.finish(case, figs)


def nack_run(args, variant):
    """One broker, `variant` "plain" (no max-deliveries: NACK twice, ACK the third delivery)
    or "max-deliveries" (max-deliveries:3, NACK every delivery: dead-lettered after the third).
    Three deliveries per message either way. Returns (deliveries/s, notes, ok, broker CPU)."""
    n = scaled(args.nack_msgs, args.scale, 100)
    dest = "/queue/" + lg.unique("nack")
    br = BrokerRun()
    try:
        headers = [("max-deliveries", "3")] if variant == "max-deliveries" else []
        producer = Conn(HOST, br.port)
        send_all(producer, [frame("SEND", [("destination", dest)] + headers, b"x" * 100)
                            for _ in range(n)])
        conn = Conn(HOST, br.port)
        consumer = Consumer(conn, 3 * n, time.monotonic() + 60 + n / 1000.0,
                            lambda head, count: "ACK" if count == 3 and not headers else "NACK")
        t0, c0 = time.monotonic(), br.cpu()
        conn.send(frame("SUBSCRIBE", [("destination", dest), ("id", "1"),
                                      ("ack", "client-individual"), ("prefetch", "100")]))
        consumer.start()
        consumer.join()
        wall = time.monotonic() - t0
        cpu = (br.cpu() - c0) / wall
        left = lg.control_count(HOST, br.port, dest)
        dead = lg.control_count(HOST, br.port, "/queue/DLQ." + dest[len("/queue/"):])
        want_dead = n if headers else 0
        ok = len(consumer.seen) == 3 * n and left == 0 and dead == want_dead
        notes = "%d deliveries of %d messages; left %s, in the DLQ %s" % (
            len(consumer.seen), n, left, dead)
        producer.close()
        conn.close()
        return len(consumer.seen) / wall, notes, ok, cpu, br
    except lg.FAILURES as e:
        return None, str(e), False, 0.0, br


def case_nack(args):
    """A NACK-heavy load: every message delivered three times, plain NACKs against
    max-deliveries with its dead-letter move, each --nack-repeat times on a fresh broker."""
    figs, rates = [], {}
    for variant in ("plain", "max-deliveries"):
        runs = []
        for _ in range(args.nack_repeat):
            rate, notes, ok, cpu, br = nack_run(args, variant)
            br.finish("nack_" + variant, [])
            runs.append((rate or 0, notes, ok, cpu))
        runs.sort()
        rate, notes, ok, cpu = runs[len(runs) // 2]
        rates[variant] = rate
        figs.append(fig("nack_" + variant, "deliveries/s (median of %d)" % len(runs), rate,
                        "msg/s", {"broker_cpu": cpu}, all(r[2] for r in runs), notes))
    if rates["plain"]:
        figs.append(fig("nack", "max-deliveries / plain", rates["max-deliveries"] / rates["plain"],
                        "x", {}))
    return figs


CASES = {
    "subs_queue": lambda a: case_subs(a, "queue"),
    "subs_topic": lambda a: case_subs(a, "topic"),
    "queues": case_queues,
    "backlog": case_backlog,
    "costs": case_costs,
    "delayed": case_delayed,
    "nack": case_nack,
}


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit in ("x", "ms", "MiB"):
        return "%.2f %s" % (v, unit)
    return rn.fmt_value(v, unit)


def print_table(figs, out=sys.stdout):
    rows = [("case", "figure", "value", "loadgen CPU", "broker CPU", "ok")]
    for f in figs:
        rows.append((f["case"], f["figure"], fmt_value(f["value"], f["unit"]), rn.fmt_cpu(f),
                     rn.fmt_bcpu(f), "ok" if f["ok"] else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(widths[i]) if i != 2 else c.rjust(widths[i])
                        for i, c in enumerate(r)).rstrip(), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)
    print(file=out)
    for f in figs:
        if f.get("notes"):
            print("%s%s / %s: %s" % ("" if f["ok"] else "FAIL ", f["case"], f["figure"],
                                     f["notes"]), file=out)
    out.flush()


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Cases: " + ", ".join(CASES))
    ap.add_argument("--only", default=",".join(CASES), help="comma list of cases")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every count (e.g. 0.01 for a quick run)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--conns", type=int, default=20, help="connections holding subscriptions")
    ap.add_argument("--subs", type=int, default=1000000, help="subscriptions in subs_*")
    ap.add_argument("--queues", type=int, default=1000000, help="queues in `queues`")
    ap.add_argument("--backlog", type=int, default=5000000, help="messages in `backlog`")
    ap.add_argument("--cost-subs", type=int, default=100000,
                    help="other subscriptions in `costs`")
    ap.add_argument("--cost-msgs", type=int, default=100000,
                    help="queue messages per `costs` measurement (topic: twice that)")
    ap.add_argument("--cost-repeat", type=int, default=3,
                    help="runs per `costs` measurement (the median is shown)")
    ap.add_argument("--delayed", type=int, default=1000000, help="messages in `delayed`")
    ap.add_argument("--delayed-rate", type=int, default=20000,
                    help="messages per second that come due in `delayed`")
    ap.add_argument("--nack-msgs", type=int, default=20000, help="messages per `nack` run")
    ap.add_argument("--nack-repeat", type=int, default=3, help="runs per `nack` variant")
    ap.add_argument("--sample", type=int, default=1000, help="names checked with /control/")
    ap.add_argument("--flush-wait", type=float, default=3.0,
                    help="seconds to wait after the `queues` fill before measuring RSS")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            ap.error("unknown case %r (cases: %s)" % (c, ", ".join(CASES)))
    if not os.path.exists(os.path.join(rn.ROOT, "ocamlmq.py")):
        ap.error("no ocamlmq.py in %s" % rn.ROOT)

    def on_term(signum, frame_):
        raise SystemExit(128 + signum)
    import signal
    signal.signal(signal.SIGTERM, on_term)

    t_start = time.monotonic()
    figures = []
    for c in cases:
        t0 = time.monotonic()
        try:
            figs = CASES[c](args)
        except lg.FAILURES as e:          # e.g. the broker did not start
            figs = [fail_fig(c, e, None)]
        figures += figs
        print("# %s: %.1f s%s" % (c, time.monotonic() - t0,
                                  "" if all(f["ok"] for f in figs) else "  (FAIL)"),
              file=sys.stderr, flush=True)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": rn.git_rev(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "scale": args.scale,
            "cases": cases, "elapsed_s": round(time.monotonic() - t_start, 1),
            "tmp_fs": rn.fs_type("/tmp"), "argv": sys.argv[1:] if argv is None else argv,
            "loadavg_end": loadavg()}
    print("ocamlmq.py scale benchmarks: scale %g; git %s; %s CPUs; python %s; %.0f s; "
          "load average at the end %s (other work on the machine moves the rates)"
          % (args.scale, meta["git"], meta["cpus"], meta["python"], meta["elapsed_s"],
             " ".join(meta["loadavg_end"] or ["?"])))
    print()
    print_table(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "figures": figures}, f, indent=1, default=str)
        print("\nwrote %s" % args.json)
    return 0 if all(f["ok"] for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
