#!/usr/bin/env python3
"""Run the ocamlmq.py benchmarks and print / save the figures.

By default every case gets a fresh broker started from this checkout (`python3 ocamlmq.py -port P
DB` with DB in a new temp dir, a free port on 127.0.0.1), so RSS figures and queue contents of one
case do not leak into the next; the broker is stopped (SIGTERM, then SIGKILL) after each case.
With --port (and optionally --host) the cases run against an already running STOMP broker instead;
RSS figures then need --pid.

    python3 bench/run.py                                 # all scenarios, < 5 minutes
    python3 bench/run.py --scenarios queue,topic --repeat 3
    python3 bench/run.py --port 61613                    # any STOMP 1.2 broker
    python3 bench/run.py --backend pg --pg "dbname=mq"   # passes -pg CONNINFO to the broker

Scenarios: queue, durable (4 and 16 producers), topic (plain and prefix), backlog, subs (queue and
topic subscriptions).  See bench/README.md for what each figure means.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import loadgen  # noqa: E402
import testkit  # noqa: E402

# Longest each case may take (seconds); the overall --budget caps the sum.
CASE_TIMEOUT = {"queue": 60, "durable4": 30, "durable16": 30, "topic": 45, "topic_prefix": 45,
                "backlog": 90, "subs_queue": 45, "subs_topic": 45, "queue_ws": 60,
                "queue_tls": 60, "topic_ws": 45, "topic_tls": 45}


class Broker(testkit.BrokerProcess):
    """ocamlmq.py from the checkout (testkit.BrokerProcess) on a free port with its database in a
    new temp dir, and with `transport` != "tcp" also on a WebSocket or TLS port
    (`transport_port`); started at once.  stop() removes the temp dir and sets `exit_note` when
    the stop was not clean."""

    def __init__(self, backend="sqlite", pg=None, extra=(), login=None, passcode=None,
                 transport="tcp"):
        self.tmp = tempfile.mkdtemp(prefix="ocamlmq-bench-")
        flags = []
        self.transport_port = None
        if transport != "tcp":
            self.transport_port = testkit.free_port()
            flags += ["-%s-port" % transport, str(self.transport_port)]
        if transport == "tls":
            cert, key = testkit.self_signed_cert(self.tmp)
            flags += ["-tls-cert", cert, "-tls-key", key]
        if login is not None:
            flags += ["-login", login, "-passcode", passcode or ""]
        super().__init__(self.tmp, flags + list(extra), pg=pg if backend == "pg" else None,
                         name="bench", start_timeout=15.0, stop_timeout=15.0, orphan_stop=True)
        self.exit_note = None
        self.stop_s = None
        try:
            self.start()
        except testkit.BrokerError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.transport_port = self.transport_port or self.port

    def log_tail(self, n=800):
        return self.stderr()[-n:].strip() or "(no output)"

    def stop(self):
        """SIGTERM, wait up to 15 s, then SIGKILL.  Sets exit_note when that was not clean."""
        t0 = time.monotonic()
        rc = super().stop()
        self.stop_s = time.monotonic() - t0
        if rc == "timeout":
            self.exit_note = "broker ignored SIGTERM for 15 s; killed"
        elif rc != 0:
            self.exit_note = "broker exit code %s after SIGTERM: %s" % (rc, self.log_tail(300))
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_case(name, args, timeout):
    """Run one case (with its own broker unless external).  Returns a list of figure dicts."""
    broker = None
    try:
        if args.port:
            probe = loadgen.ProcProbe(args.pid) if args.pid else None
            env = loadgen.Env(args.host, args.port, timeout, probe, args.scale,
                              args.login, args.passcode, control=not args.no_control)
        else:
            transport = name.rsplit("_", 1)[1] if name.endswith(
                tuple("_" + t for t in loadgen.TRANSPORTS)) else "tcp"
            broker = Broker(args.backend, args.pg, args.broker_arg, args.login, args.passcode,
                            transport)
            env = loadgen.Env("127.0.0.1", broker.port, timeout, broker.probe, args.scale,
                              args.login, args.passcode, transport=transport,
                              transport_port=broker.transport_port)
        figs = loadgen.CASES[name](env)
        for f in figs:
            f["case"] = name
    except loadgen.FAILURES as e:
        note = "FAILED: %s: %s" % (type(e).__name__, e)
        if broker is not None and not broker.alive():
            note += " | broker died (exit %s): %s" % (broker.proc.returncode, broker.log_tail())
        figs = [{"case": name, "figure": "(failed)", "value": None, "unit": "", "ok": False,
                 "notes": note}]
    finally:
        if broker is not None:
            broker.stop()
    if broker is not None:
        for f in figs:
            f["broker_stop_s"] = round(broker.stop_s, 2) if broker.stop_s is not None else None
    if broker is not None and broker.exit_note:
        # the spec wants exit 0 on SIGTERM; a failure here does not invalidate the figures
        figs.append({"case": name, "figure": "broker clean stop on SIGTERM", "value": None,
                     "unit": "", "ok": False, "notes": broker.exit_note})
    return figs


def median_figures(runs):
    """runs: list (one per repeat) of lists of figure dicts -> one list with medians."""
    order, groups = [], {}
    for figs in runs:
        for f in figs:
            key = (f["case"], f["figure"])
            if key not in groups:
                order.append(key)
                groups[key] = []
            groups[key].append(f)
    out = []
    for key in order:
        fs = groups[key]
        vals = [f["value"] for f in fs if f["value"] is not None]
        m = dict(fs[-1])
        m["value"] = statistics.median(vals) if vals else None
        m["values"] = [f["value"] for f in fs]
        m["ok"] = all(f["ok"] for f in fs)
        for k in ("lg_cpu_s", "lg_wall_s", "lg_cores", "lg_max_proc", "broker_cpu_s"):
            xs = [f[k] for f in fs if f.get(k) is not None]
            m[k] = statistics.median(xs) if xs else None
        if not m["ok"]:
            m["notes"] = " || ".join(sorted(set(f["notes"] for f in fs if not f["ok"])))
        out.append(m)
    return out


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit in ("ms",):
        return "%.2f %s" % (v, unit)
    if unit == "MiB":
        return "%.1f %s" % (v, unit)
    return "%s %s" % (format(int(round(v)), ","), unit)


def fmt_cpu(f):
    if f.get("lg_cores") is None:
        return "-"
    return "%.2f cores (%d procs, max %.2f)" % (f["lg_cores"], f.get("lg_procs", 0),
                                                f["lg_max_proc"])


def fmt_bcpu(f):
    b, w = f.get("broker_cpu_s"), f.get("lg_wall_s")
    if b is None or not w:
        return "-"
    return "%.2f cores" % (b / w)


def print_table(figs, out=sys.stdout):
    rows = [("scenario", "figure", "value", "loadgen CPU", "broker CPU", "ok")]
    for f in figs:
        rows.append((f["case"], f["figure"], fmt_value(f["value"], f["unit"]), fmt_cpu(f),
                     fmt_bcpu(f), "ok" if f["ok"] else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(widths[i]) if i != 2 else c.rjust(widths[i])
                        for i, c in enumerate(r)).rstrip(), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)
    print(file=out)
    plain = {(f["case"], f["figure"]): f["value"] for f in figs}
    for f in figs:                # a transport's figure as a share of plain TCP's, same run
        base = plain.get((f["case"].rsplit("_", 1)[0], f["figure"]))
        if f["case"].endswith(("_ws", "_tls")) and base and f["value"] is not None:
            print("%s: %.2fx of plain TCP (%s)" % (f["case"], f["value"] / base, f["figure"]),
                  file=out)
    seen = set()
    for f in figs:
        key = (f["case"], f["notes"])
        if f.get("notes") and key not in seen:
            seen.add(key)
            print("%s%s: %s" % ("" if f["ok"] else "FAIL ", f["case"], f["notes"]), file=out)


def fs_type(path):
    try:
        best = ("", "?")
        real = os.path.realpath(path)
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                mnt, typ = parts[1], parts[2]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, typ)
        return best[1]
    except OSError:
        return "?"


def git_rev():
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(loadgen.SCENARIOS),
                    help="comma list of %s, or case names (%s)"
                    % (",".join(loadgen.SCENARIOS), ",".join(loadgen.CASES)))
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the median is reported")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"),
                    help="where to write the results (default bench/results.json)")
    ap.add_argument("--host", default="127.0.0.1", help="external broker host (with --port)")
    ap.add_argument("--port", type=int, help="measure an already running broker on this port")
    ap.add_argument("--pid", type=int, help="PID of the external broker (RSS/CPU figures)")
    ap.add_argument("--login")
    ap.add_argument("--passcode")
    ap.add_argument("--no-control", action="store_true",
                    help="external broker without ocamlmq's /control/ destinations: the backlog "
                         "fill ends with a receipted SEND and the count checks are skipped")
    ap.add_argument("--backend", choices=("sqlite", "pg"), default="sqlite")
    ap.add_argument("--pg", metavar="CONNINFO", help="with --backend pg: -pg CONNINFO for the broker")
    ap.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the started broker, repeatable "
                         "(e.g. --broker-arg=-flush-period --broker-arg=0.5)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply message / subscription counts (e.g. 0.1 for a smoke run)")
    ap.add_argument("--budget", type=float,
                    help="overall time limit in seconds; cases past it are skipped "
                         "(default 280 x --repeat)")
    args = ap.parse_args(argv)
    if args.backend == "pg" and not args.pg and not args.port:
        ap.error("--backend pg needs --pg CONNINFO")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.budget is None:
        args.budget = 280.0 * args.repeat
    cases = []
    for s in args.scenarios.split(","):
        s = s.strip()
        if not s:
            continue
        if s in loadgen.SCENARIOS:
            cases += loadgen.SCENARIOS[s]
        elif s in loadgen.CASES:
            cases.append(s)
        else:
            ap.error("unknown scenario %r" % s)
    if not args.port and not os.path.exists(os.path.join(ROOT, "ocamlmq.py")):
        ap.error("no ocamlmq.py in %s (use --port to measure a running broker)" % ROOT)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    t_start = time.monotonic()
    end = t_start + args.budget
    runs_by_case = {c: [] for c in cases}
    skipped = []
    for rep in range(args.repeat):
        for c in cases:
            left = end - time.monotonic()
            if left < 10:
                skipped.append("%s (run %d)" % (c, rep + 1))
                continue
            timeout = min(CASE_TIMEOUT.get(c, 60), left)
            t0 = time.monotonic()
            figs = run_case(c, args, timeout)
            for f in figs:
                f["run"] = rep + 1
            runs_by_case[c].append(figs)
            print("# %s run %d: %.1f s%s" % (c, rep + 1, time.monotonic() - t0,
                                             "" if all(f["ok"] for f in figs) else "  (FAIL)"),
                  file=sys.stderr, flush=True)
    figures = []
    for c in cases:
        if runs_by_case[c]:
            figures += median_figures(runs_by_case[c])
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": ("%s:%d (external)" % (args.host, args.port)) if args.port
        else "ocamlmq.py from checkout, fresh broker per case, backend %s" % args.backend,
        "git": git_rev(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_end": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
        "tmp_fs": fs_type(tempfile.gettempdir()), "repeat": args.repeat, "scale": args.scale,
        "broker_args": args.broker_arg, "elapsed_s": round(time.monotonic() - t_start, 1),
        "skipped": skipped,
    }
    print("ocamlmq.py benchmarks: %s; git %s; %s CPUs; median of %d; temp fs %s; %.0f s"
          % (meta["target"], meta["git"], meta["cpus"], args.repeat, meta["tmp_fs"],
             meta["elapsed_s"]))
    print()
    print_table(figures)
    if skipped:
        print("\nskipped (over --budget %.0f s): %s" % (args.budget, ", ".join(skipped)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "figures": figures,
                       "runs": [f for c in cases for r in runs_by_case[c] for f in r]},
                      f, indent=1, default=str)
        print("\nwrote %s" % args.json)
    return 0 if all(f["ok"] for f in figures) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
