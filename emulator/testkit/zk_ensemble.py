"""A real ZooKeeper ensemble on loopback, for tests and local trials of the masters' high
availability (``fusee.master.election``): N ``QuorumPeerMain`` processes from the
distribution's jars (Debian's ``zookeeper`` package puts them in /usr/share/java), each with its
own data directory and ports, never the system service. ``kill`` / ``start`` crash and bring
back one server (``wipe`` in between: a replacement host); ``stop`` ends them all (also at
interpreter exit).

    with ZooKeeperEnsemble(3) as zk:
        zk.hosts            # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3" for kazoo
        zk.url              # "zookeeper://..." for a cluster config's [master] coordination
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

#: where distributions put ZooKeeper's server jar (its manifest names the rest)
JAR_PLACES = ("/usr/share/java/zookeeper.jar", "/usr/share/zookeeper/zookeeper.jar")
MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"


class EnsembleError(RuntimeError):
    """The ensemble did not come up (its servers' logs say why)."""


def missing() -> str | None:
    """Why no ensemble can run here (None: it can): java or ZooKeeper's jars are missing."""
    if shutil.which("java") is None:
        return "java is not installed (apt-get install -y zookeeper brings it)"
    if server_jar() is None:
        return (f"ZooKeeper's server jar is in none of {', '.join(JAR_PLACES)} "
                "(apt-get install -y zookeeper)")
    try:
        import kazoo  # noqa: F401
    except ImportError:
        return "the kazoo package is not installed (pip install 'fusee[zookeeper]')"
    return None


def server_jar() -> str | None:
    return next((p for p in JAR_PLACES if os.path.exists(p)), None)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ZooKeeperEnsemble:
    def __init__(self, servers: int = 3, tick_ms: int = 200, start_timeout: float = 60.0):
        """``tick_ms``: ZooKeeper's tick; sessions may last 2 to 20 ticks."""
        why = missing()
        if why:
            raise EnsembleError(why)
        self.n, self.tick_ms, self.start_timeout = servers, tick_ms, start_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="fusee-zk-"))
        ports = _free_ports(3 * servers)
        self.client_ports = ports[:servers]
        peers = [(ports[servers + i], ports[2 * servers + i]) for i in range(servers)]
        self.procs: dict[int, subprocess.Popen] = {}
        for i in range(servers):
            data = self.workdir / f"zk{i}"
            data.mkdir()
            (data / "myid").write_text(f"{i + 1}\n")
            lines = [f"tickTime={tick_ms}", "initLimit=50", "syncLimit=10",
                     f"dataDir={data}", f"clientPort={self.client_ports[i]}",
                     "clientPortAddress=127.0.0.1", "admin.enableServer=false",
                     "4lw.commands.whitelist=ruok,srvr", "maxSessionTimeout=20000"]
            lines += [f"server.{j + 1}=127.0.0.1:{p}:{e}" for j, (p, e) in enumerate(peers)]
            (data / "zoo.cfg").write_text("\n".join(lines) + "\n")
        self._finalizer = weakref.finalize(self, _kill_all, self.procs)

    @property
    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    @property
    def url(self) -> str:
        return f"zookeeper://{self.hosts}"

    def start(self, i: int | None = None) -> ZooKeeperEnsemble:
        """Start server ``i`` (all of them if None) and wait until it serves."""
        jar = server_jar()
        assert jar is not None, "ZooKeeper's jars are installed (the caller checks first)"
        for j in range(self.n) if i is None else (i,):
            if j in self.procs and self.procs[j].poll() is None:
                continue
            data = self.workdir / f"zk{j}"
            with open(data / "server.log", "ab") as log:
                self.procs[j] = subprocess.Popen(
                    ["java", "-Xmx128m", "-Dzookeeper.jmx.log4j.disable=true",
                     "-cp", jar, MAIN, str(data / "zoo.cfg")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        for j in range(self.n) if i is None else (i,):
            while not self.serving(j):
                if self.procs[j].poll() is not None:
                    raise EnsembleError(f"ZooKeeper server {j} exited:\n{self.log(j)}")
                if time.monotonic() > deadline:
                    raise EnsembleError(f"ZooKeeper server {j} does not serve after "
                                        f"{self.start_timeout:g} s:\n{self.log(j)}")
                time.sleep(0.1)
        return self

    def serving(self, i: int) -> bool:
        """Server ``i`` is in the quorum and serves clients (its ``srvr`` reply says a mode)."""
        return self.mode(i) in ("leader", "follower")

    def mode(self, i: int) -> str | None:
        """Server ``i``'s role in the quorum ("leader", "follower"), or None: down, or not
        in a quorum (its ``srvr`` reply)."""
        try:
            with socket.create_connection(("127.0.0.1", self.client_ports[i]), timeout=1) as s:
                s.sendall(b"srvr")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
        except OSError:
            return None
        for role in ("leader", "follower"):
            if f"Mode: {role}".encode() in reply:
                return role
        return None

    def leader(self) -> int | None:
        """The index of the server that leads the quorum (None: no quorum)."""
        return next((i for i in self.procs if self.mode(i) == "leader"), None)

    def kill(self, i: int) -> None:
        """Crash server ``i`` (SIGKILL)."""
        p = self.procs.pop(i)
        p.kill()
        p.wait()

    def wipe(self, i: int) -> None:
        """Empty killed server ``i``'s data directory but for its ``myid`` and config: the
        replacement of a lost host, which the next ``start`` brings back empty, to catch up
        from the quorum."""
        assert i not in self.procs, f"ZooKeeper server {i} is running"
        shutil.rmtree(self.workdir / f"zk{i}" / "version-2", ignore_errors=True)

    def log(self, i: int) -> str:
        try:
            return (self.workdir / f"zk{i}" / "server.log").read_bytes()[-3000:].decode(
                errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self._finalizer()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ZooKeeperEnsemble:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_all(procs: dict) -> None:
    for p in procs.values():
        p.kill()
    for p in procs.values():
        p.wait()
    procs.clear()
