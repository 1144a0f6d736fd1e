"""What the tests (conftest.py) and the benchmarks (bench/*.py) share: one broker launcher and one
raw STOMP connection built on the broker's own codec (ocamlmq.FrameParser reads what the broker
writes).  Standard library only.  Everything talks to 127.0.0.1 by default.

- `BrokerProcess`: `python3 ocamlmq.py -port P [flags] (DB | -pg CONNINFO)` on a free port, with
  its database in a given directory; start (waits until this very process listens), restart on
  the same port and database, stop (SIGTERM, then SIGKILL after a timeout), kill -9, stderr of
  every run, and `probe()` for /proc figures (RSS, VmHWM, CPU).
- `Connection`: a socket to the broker over "tcp", "tls", "ws" (STOMP over WebSocket) or "wss";
  `send_raw` writes bytes as given (one WebSocket message each), `fill` reads once into the
  parser, `read_frames` returns the frames one read completed.
"""

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ocamlmq  # noqa: E402

BROKER = os.path.join(HERE, "ocamlmq.py")
HOST = "127.0.0.1"
RECV_SIZE = 1 << 18


def free_port(host=HOST):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent():
    """Get SIGTERM when the parent process dies, even by SIGKILL (Linux prctl; best effort)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def self_signed_cert(directory):
    """(certificate, key) PEM files of a self-signed certificate for localhost/127.0.0.1."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


# --------------------------------------------------------------------------------------------
# Broker process
# --------------------------------------------------------------------------------------------

class BrokerError(AssertionError):
    """The broker did not start."""


class ProcProbe:
    """Figures of a process from /proc (Linux): bytes of RSS / VmHWM, CPU seconds."""

    def __init__(self, pid):
        self.pid = pid
        self.clk = os.sysconf("SC_CLK_TCK")

    def _status(self, key):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def rss(self):
        return self._status("VmRSS:")

    def hwm(self):
        return self._status("VmHWM:")

    def reset_hwm(self):
        """Reset VmHWM to the current RSS (write 5 to clear_refs).  True if it worked."""
        try:
            with open("/proc/%d/clear_refs" % self.pid, "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def cpu(self):
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                s = f.read()
            fields = s[s.rindex(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / self.clk
        except (OSError, ValueError, IndexError):
            return 0.0


class BrokerProcess:
    """One broker process bound to one port and one database (a sqlite file `name`.db in
    `directory`, or `pg`, a libpq conninfo); restartable on both.  `defaults`: flags added to
    every start unless `flags` has them.  Each run's stderr (and stdout) goes to a file in
    `directory`."""

    def __init__(self, directory, flags=(), pg=None, name="broker", port=None, soft_nofile=None,
                 defaults=None, start_timeout=10.0, stop_timeout=10.0, orphan_stop=False):
        self.directory = str(directory)
        self.flags = list(flags)
        self.conninfo = pg
        self.name = name
        self.auto_port = port is None
        self.port_retries = 0
        self.port = port or free_port()
        self.host = HOST
        if "-address" in self.flags:
            addr = self.flags[self.flags.index("-address") + 1]
            self.host = HOST if addr in ("0.0.0.0", "::") else addr
        self.db = os.path.join(self.directory, f"{name}.db")
        self.soft_nofile = soft_nofile     # start the broker with this soft RLIMIT_NOFILE
        self.defaults = dict(defaults or {})
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.orphan_stop = orphan_stop     # SIGTERM the broker when its parent dies
        self.proc = None
        self.runs = 0
        self.returncodes = []
        self.stderr_paths = []

    def argv(self):
        flags = list(self.flags)
        for flag, value in self.defaults.items():
            if flag not in flags:
                flags += [flag, value]
        storage = [self.db] if self.conninfo is None else ["-pg", self.conninfo]
        return [sys.executable, BROKER, "-port", str(self.port), *flags, *storage]

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        self.runs += 1
        base = os.path.join(self.directory, f"{self.name}-run{self.runs}")
        self.stderr_paths.append(base + ".stderr")
        with open(base + ".stderr", "wb") as err, open(base + ".stdout", "wb") as out:
            self.proc = subprocess.Popen(self.argv(), cwd=HERE, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, preexec_fn=self._preexec)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                if self.runs == 1 and self.auto_port and self.proc.returncode == 1 \
                        and self.port_retries < 3:
                    # another process took our free port in the meantime: pick another one
                    self.port_retries += 1
                    self.port = free_port()
                    self.runs = 0
                    self.stderr_paths.pop()
                    return self.start()
                raise BrokerError(f"broker exited with {self.proc.returncode} at start:\n"
                                  f"{self.stderr()}")
            if self._listening():
                return self
            if time.monotonic() > deadline:
                self.kill9()
                raise BrokerError(f"broker did not accept connections within "
                                  f"{self.start_timeout}s:\n{self.stderr()}")
            time.sleep(0.05)

    def _listening(self):
        """True once *our* process listens on the port (on Linux, checked in /proc, so a
        stranger that grabbed the port is not mistaken for our broker)."""
        if not os.path.isdir(f"/proc/{self.proc.pid}/fd"):
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self.proc.poll() is None
            except OSError:
                return False
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
                link = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                with open(table) as f:
                    for line in f.readlines()[1:]:
                        parts = line.split()
                        if (parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == self.port
                                and parts[9] in inodes):
                            return True
        except OSError:
            pass
        return False

    def _preexec(self):
        if self.orphan_stop:
            die_with_parent()
        if self.soft_nofile is not None:
            import resource
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft_nofile, hard))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def probe(self):
        return ProcProbe(self.proc.pid)

    def stop(self, sig=signal.SIGTERM):
        """Signal (SIGTERM) and wait; SIGKILL after stop_timeout.  Returns the exit code, or
        "timeout" if SIGKILL was needed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(self.stop_timeout)
                self.returncodes.append("timeout")
                return "timeout"
        rc = self.proc.returncode
        self.returncodes.append(rc)
        return rc

    def kill9(self):
        return self.stop(signal.SIGKILL)

    def restart(self):
        rc = self.stop()
        self.start()
        return rc

    def stderr(self, run=None):
        paths = self.stderr_paths if run is None else [self.stderr_paths[run - 1]]
        out = []
        for p in paths:
            try:
                with open(p, "rb") as f:
                    out.append(f.read().decode(errors="replace"))
            except OSError:
                pass
        return "".join(out)


# --------------------------------------------------------------------------------------------
# Raw STOMP connection, over TCP, TLS or WebSocket (RFC 6455)
# --------------------------------------------------------------------------------------------

class Closed(Exception):
    """The broker closed the connection."""


class ProtocolViolation(AssertionError):
    """The broker wrote something that is not a well-formed frame."""


def ws_frame(payload, opcode=1, fin=True, mask=b"\x11\x22\x33\x44"):
    """One client-to-server WebSocket frame (masked unless mask is None)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    length = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 65536 \
        else bytes([127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + length + payload
    return head + bytes([length[0] | 0x80]) + length[1:] + mask + ocamlmq.unmask(payload, mask)


def ws_handshake(sock, host="127.0.0.1", path="/", protocols="v10.stomp,v11.stomp,v12.stomp",
                 origin=None, key="dGhlIHNhbXBsZSBub25jZQ==", extra=()):
    """Send an upgrade request; return (status, headers dict, bytes after the response)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines += list(extra)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return read_http_response(sock)


def read_http_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers, rest


def client_parser():
    """ocamlmq.FrameParser without the broker's limits (what the broker writes is checked
    for being well formed, not for its size)."""
    return ocamlmq.FrameParser(max_frame_size=1 << 62, max_headers=1 << 62, max_line=1 << 62)


class Connection:
    """A raw STOMP connection.  transport: "tcp", "tls", "ws" or "wss" (tls_context: the
    SSLContext; None trusts any certificate).  Over WebSocket, each send_raw is one masked
    message of `ws_opcode`, and the server's messages are unwrapped (every one of them is kept
    in `messages` when `keep_messages`, pongs in `pongs`, a close's code in `close_code`)."""

    keep_messages = False
    ws_opcode = 1

    def __init__(self, port, host=HOST, timeout=5.0, transport="tcp", tls_context=None,
                 rcvbuf=None, nodelay=False, parser=None, **handshake):
        self.port = port
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:          # before connect, so the TCP window really is small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        if transport in ("tls", "wss"):
            if tls_context is None:
                tls_context = ssl.create_default_context()
                tls_context.check_hostname = False     # a test's self-signed certificate
                tls_context.verify_mode = ssl.CERT_NONE
            self.sock = tls_context.wrap_socket(self.sock, server_hostname="localhost")
        self.parser = parser or client_parser()
        self.eof = False
        self.ws = transport in ("ws", "wss")
        if self.ws:
            self.status, self.http_headers, self.wsbuf = ws_handshake(self.sock, **handshake)
            if self.status != 101:
                raise ConnectionError(f"WebSocket handshake answered {self.status}")
            self.messages, self.pongs, self.close_code = [], [], None
            self.parser.feed(self._unwrap(b""))       # what came with the handshake's answer

    def send_raw(self, data):
        self.sock.sendall(ws_frame(data, self.ws_opcode) if self.ws else data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def drop(self):
        """Close abruptly with a TCP reset (no DISCONNECT, no FIN)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def fill(self, timeout):
        """Read once (waiting up to `timeout`) into the parser: False on timeout; raises Closed
        when the broker has closed the connection."""
        if self.eof:
            raise Closed()
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(RECV_SIZE)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            data = b""
        if not data:
            self.eof = True
            raise Closed()
        self.parser.feed(self._unwrap(data) if self.ws else data)
        return True

    def _unwrap(self, data):
        """The STOMP bytes in the whole server WebSocket frames received so far."""
        buf = self.wsbuf + data if self.wsbuf else data
        out, pos = [], 0
        while len(buf) - pos >= 2 and not self.eof:
            if buf[pos + 1] & 0x80:
                raise ProtocolViolation("a server frame must not be masked")
            n, start = buf[pos + 1] & 0x7F, pos + 2
            if n == 126:
                n, start = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif n == 127:
                n, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            if len(buf) < start + n:
                break
            if not buf[pos] & 0x80:
                raise ProtocolViolation("the broker sends each frame as one whole message")
            opcode, payload = buf[pos] & 0x0F, buf[start:start + n]
            pos = start + n
            if opcode in (1, 2):
                out.append(payload)
                if self.keep_messages:
                    self.messages.append((opcode, payload))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else None
                self.eof = True
            elif opcode == 10:
                self.pongs.append(payload)
        self.wsbuf = buf[pos:]
        return b"".join(out)

    def read_frames(self, timeout):
        """The frames that one read, waiting up to `timeout`, completed ([] on timeout)."""
        frames = []
        if self.fill(timeout):
            while (f := self.parser.next_frame()) is not None:
                frames.append(f)
        return frames
