"""A throwaway PostgreSQL cluster for the tests of ocamlmq.py's PostgreSQL backend.

`start_cluster(tmpdir)` runs initdb and pg_ctl from the newest /usr/lib/postgresql/*/bin (or the
pg_ctl on PATH) on a free 127.0.0.1 port, with its data directory and unix socket in a fresh
directory, and returns `(conninfo, stop_function)`. The `Cluster` class underneath also offers
`stop()` and `start()` on the same data directory, which is how the tests make an outage.

initdb refuses to run as root, so as root the cluster belongs to the `postgres` user and every
command runs through `runuser -u postgres --`; the directory is then made under /tmp (whose
ancestors postgres can traverse) unless the given one is traversable already. The server keeps
PostgreSQL's defaults (fsync and synchronous_commit on), so durability tests mean something.
Every server started here is stopped by `destroy()`, and at interpreter exit as a last resort.
"""

import atexit
import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile

PG_ROOT = "/usr/lib/postgresql"


def bindir():
    """The directory holding initdb and pg_ctl (newest installed major version), or None."""
    def version(path):
        try:
            return float(os.path.basename(os.path.dirname(path)))
        except ValueError:
            return -1.0
    for path in sorted(glob.glob(os.path.join(PG_ROOT, "*", "bin")), key=version, reverse=True):
        if all(os.access(os.path.join(path, tool), os.X_OK) for tool in ("initdb", "pg_ctl")):
            return path
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and shutil.which("initdb"):
        return os.path.dirname(pg_ctl)
    return None


def available():
    """Whether PostgreSQL server binaries are installed (and, as root, a postgres user exists)."""
    if bindir() is None:
        return False
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
    return True


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traversable_by_others(path):
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


class Cluster:
    """One initdb'ed data directory and the server on it; `conninfo` reaches it over TCP."""

    def __init__(self, tmpdir=None):
        self.bin = bindir()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self.as_root = os.geteuid() == 0
        base = tmpdir if tmpdir is not None else tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        if self.as_root and not _traversable_by_others(base):
            base = "/tmp"
        # Short path: the unix socket path must stay under ~100 bytes.
        self.dir = tempfile.mkdtemp(prefix="ocamlmq-pg-", dir=base)
        os.chmod(self.dir, 0o755)
        if self.as_root:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.port = free_port()
        self.running = False
        self.conninfo = (f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
                         " connect_timeout=5")
        atexit.register(self.destroy)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        self.start()

    def _run(self, tool, *args, check=True):
        cmd = [os.path.join(self.bin, tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n"
                               + done.stdout.decode(errors="replace") + self.server_log())
        return done.returncode

    def server_log(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def start(self):
        """Start the server (again) on the same data directory and port; waits until it accepts."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "start", "-D", self.data, "-l", self.log, "-w", "-t", "30",
                  "-o", options)
        self.running = True

    def stop(self, mode="fast"):
        """Stop the server: `fast` rolls back open transactions and drops every connection."""
        self._run("pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", "30", check=False)
        self.running = False

    def destroy(self):
        """Stop the server if it runs and remove the directory; safe to call twice."""
        if os.path.isdir(self.dir):
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self.stop("immediate")
            shutil.rmtree(self.dir, ignore_errors=True)
        self.running = False
        atexit.unregister(self.destroy)


def start_cluster(tmpdir=None):
    """Initialise and start a throwaway cluster; returns (conninfo, stop_function)."""
    cluster = Cluster(tmpdir)
    return cluster.conninfo, cluster.destroy


if __name__ == "__main__":
    # Manual use: start a cluster, print its conninfo, stop it on Enter.
    conninfo, stop = start_cluster()
    print(conninfo, flush=True)
    try:
        input("running; press Enter to stop\n")
    finally:
        stop()
