"""An embedded cluster on one machine: N memory-node processes, started and always stopped.

``LocalCluster`` is what tests, examples and benchmarks use. It writes a cluster config,
starts ``python -m fusee.emulator.memnode`` once per MN, waits until each one reports its bound
endpoint (or fails with that node's own error output), rewrites the config with the real
endpoints, and on exit stops every process and removes every segment, socket and temporary
file, even when the code inside the ``with`` block failed. MN processes also exit by
themselves if the process that started them dies. Over tcp:// it makes CURVE keys of its own
(``secure=False`` opts into plaintext, with a warning). With ``master=True`` it also runs the
master (``python -m fusee.master.command``) and names it in the config, so clients register
with it; ``stop_master`` / ``start_master`` restart it on the same endpoint and state file,
``master_status`` asks it how things stand, and ``kill`` crashes a memory node.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fusee.cluster_identity import check_transport, new_cluster_id
from fusee.emulator.serving import stop_processes
from fusee.config import ClusterConfig, LayoutConfig, MemNodeConfig, SecurityConfig
from fusee.exit_codes import USAGE
from fusee.transports.security import init_keys, init_master_key

if TYPE_CHECKING:
    from fusee.audit import AuditReport
    from fusee.operations import ClientCore
    from fusee.transports.local import LocalMemory

MiB = 1 << 20

#: small enough for many clusters at once in a test run, large enough for real work
DEFAULT_LAYOUT = LayoutConfig(region_size=128 * MiB, block_size=2 * MiB, max_clients=256,
                              index_size=32 * MiB)


class ClusterStartError(RuntimeError):
    """A memory node did not come up; the message carries its own error output.
    ``exit_code`` (``fusee.exit_codes``): the node's own where it refused its config (2: a
    region /dev/shm has no room for, say), so that ``fusee cluster`` says so and exits
    with it; absent, an internal error."""

    def __init__(self, message: str, node_exit: int | None = None) -> None:
        super().__init__(message)
        if node_exit == USAGE:
            self.exit_code = USAGE


class LocalCluster:
    def __init__(self, memnodes: int = 3, transport: str = "shm", endpoint: str = "ipc",
                 layout: LayoutConfig | None = None, replication: int = 0,
                 timeout: float = 5.0, start_timeout: float = 30.0, workdir: str | None = None,
                 secure: bool = True, master: bool = False, client_lease: float | None = None,
                 mn_lease: float | None = None, masters: int = 1,
                 coordination: str | None = None):
        """``masters`` > 1: that many master processes electing their leader on ZooKeeper
        (``coordination``: "zookeeper://..."; see fusee.emulator.testkit.zk_ensemble), on ipc
        endpoints."""
        if transport not in ("local", "shm", "zmq", "verbs"):
            raise ValueError(f"unknown transport {transport!r}")
        if master and transport == "local":
            raise ValueError("a master process cannot reach in-process (local) memory nodes")
        if endpoint not in ("ipc", "tcp"):
            raise ValueError("endpoint must be 'ipc' or 'tcp'")
        if masters > 1 and not (master and coordination and endpoint == "ipc"):
            raise ValueError("several masters need master=True, coordination and ipc endpoints")
        self.backend, self.endpoint_kind = transport, endpoint
        self.start_timeout = start_timeout
        self.name = f"lc{os.getpid()}-{secrets.token_hex(3)}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"fusee-{self.name}-"))
        self.procs: dict[int, subprocess.Popen] = {}
        self.shm_names: dict[int, str] = {}
        self.memory: LocalMemory | None = None      # for transport="local"
        self.with_master = master
        self.master_procs: dict[str, subprocess.Popen] = {}
        eps = [self._endpoint(i) for i in range(memnodes)]
        publics: dict[int, str] = {}
        master_public = None
        security = SecurityConfig()
        if endpoint == "tcp" and secure:            # CURVE keys of this cluster's own
            keys = self.workdir / "keys"
            publics = init_keys(keys, memnodes, ["client"])
            if master:
                master_public = init_master_key(keys)
            security = SecurityConfig(curve=True, keys_dir=str(keys),
                                      client_key=str(keys / "client.key_secret"))
        elif endpoint == "tcp":
            security = SecurityConfig(allow_insecure_tcp=True)
        leases: dict[str, Any] = {k: v for k, v in (("client_lease", client_lease),
                                                    ("mn_lease", mn_lease)) if v is not None}
        self.config = ClusterConfig(
            memnodes=tuple(MemNodeConfig(i, ep, publics.get(i)) for i, ep in enumerate(eps)),
            layout=layout or DEFAULT_LAYOUT, name=self.name, cluster_id=new_cluster_id(),
            replication=replication,
            transport=transport, timeout=timeout, security=security,
            master_curve_public=master_public, coordination=coordination,
            master=",".join(f"ipc://{self.workdir}/master{i}.sock" for i in range(masters))
            if masters > 1 else None,
            **leases)
        self.config_path = self.workdir / "cluster.toml"
        self._finalizer = weakref.finalize(self, _cleanup, self.procs, self.shm_names,
                                           self.workdir if self._own_workdir else None)
        # created later, so at interpreter exit it runs first: the master stops before the MNs
        self._master_finalizer = weakref.finalize(self, _cleanup, self.master_procs, {}, None)

    def _endpoint(self, i: int) -> str:
        if self.endpoint_kind == "tcp":
            return "tcp://127.0.0.1:*"          # the MN picks a free port and reports it
        return f"ipc://{self.workdir}/mn{i}.sock"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        if self.backend == "local":
            from fusee.transports.local import LocalMemory
            self.memory = LocalMemory(self.config)
            self.config.save(self.config_path)
            return self
        proto = self.config.save(self.workdir / "proto.toml")
        ready = {i: self.workdir / f"mn{i}.ready" for i in range(len(self.config.memnodes))}
        for i in ready:
            log = open(self.workdir / f"mn{i}.log", "wb")
            cmd = [sys.executable, "-m", "fusee.emulator.memnode", "--config", str(proto),
                   "--id", str(i), "--ready-file", str(ready[i]), "--parent-pid", str(os.getpid())]
            if self.backend == "verbs":
                cmd.append("--rdma")
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            log.close()
        deadline = time.monotonic() + self.start_timeout
        endpoints: dict[int, str] = {}
        try:
            while len(endpoints) < len(ready):
                for i, f in ready.items():
                    if i in endpoints:
                        continue
                    if f.exists():
                        info = json.loads(f.read_text())
                        endpoints[i] = info["endpoint"]
                        self.shm_names[i] = info["shm_name"]
                    elif self.procs[i].poll() is not None:
                        code = self.procs[i].returncode
                        raise ClusterStartError(f"memory node {i} exited with {code}:\n"
                                                f"{self.log(i)}", code)
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"memory nodes not ready after "
                                            f"{self.start_timeout:g} s")
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        self.config = self.config.with_(memnodes=tuple(
            MemNodeConfig(i, endpoints[i], self.config.node(i).curve_public)
            for i in sorted(endpoints)))
        self.config.save(self.config_path)
        if self.with_master:
            try:
                for i in range(max(1, len(self.config.masters))):
                    self.start_master(i)
            except BaseException:
                self.stop()
                raise
        return self

    def start_master(self, i: int = 0, module: str = "fusee.master.command") -> None:
        """Start master ``i`` (again, after ``stop_master``: same endpoint and state).
        ``module``: run that instead of ``fusee master`` (a test's variant of it, taking the
        same arguments, such as ``fusee.emulator.testkit.stopped_leader``)."""
        name = master_name(i)
        if self.master_procs.get(name) and self.master_procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        if len(self.config.masters) > 1:
            endpoint = self.config.masters[i]
        else:
            endpoint = self.config.master or ("tcp://127.0.0.1:*" if self.endpoint_kind == "tcp"
                                              else f"ipc://{self.workdir}/master.sock")
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, "--config",
                 str(self.config_path), "--state", str(self.workdir / "master.json"),
                 "--endpoint", endpoint, "--ready-file", str(ready),
                 "--parent-pid", str(os.getpid())],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.master_procs[name] = proc
        deadline = time.monotonic() + self.start_timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise ClusterStartError(f"{name} exited with {proc.returncode}:\n"
                                        f"{self.master_log(i)}")
            if time.monotonic() > deadline:
                raise ClusterStartError(f"{name} is not ready after {self.start_timeout:g} s")
            time.sleep(0.01)
        endpoint = json.loads(ready.read_text())["endpoint"]
        if len(self.config.masters) <= 1 and endpoint != self.config.master:
            self.config = self.config.with_(master=endpoint)
            self.config.save(self.config_path)

    def stop_master(self, kill: bool = False, i: int = 0) -> None:
        """Stop master ``i``: SIGTERM (a clean exit), or SIGKILL with ``kill=True`` (a crash)."""
        proc = self.master_procs.get(master_name(i))
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
            proc.wait(10)
        else:
            _cleanup({master_name(i): proc}, {}, None)

    def master_log(self, i: int = 0) -> str:
        """What master ``i`` printed (its last 4 KiB)."""
        try:
            return (self.workdir / f"{master_name(i)}.log").read_bytes()[-4096:].decode(
                errors="replace")
        except OSError:
            return ""

    def log(self, node: int) -> str:
        """What memory node ``node`` printed (its last 4 KiB)."""
        try:
            return (self.workdir / f"mn{node}.log").read_bytes()[-4096:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self, node: int) -> None:
        """Crash memory node ``node`` (SIGKILL), as fault injection."""
        p = self.procs[node]
        p.kill()
        p.wait(10)

    def rejoin(self, node: int, config_path: Path | None = None) -> None:
        """Start memory node ``node`` again after ``kill``, with ``--rejoin`` on its endpoint:
        the master rebuilds it (``fusee.rebuild``). Returns once it serves. ``config_path``:
        start it with another config (an operator's mistake, in tests)."""
        assert self.procs[node].poll() is not None, f"memory node {node} is running"
        old = self.shm_names.pop(node, None)
        if old is not None:                     # the killed process's segment
            _cleanup({}, {node: old}, None)
        ready = self.workdir / f"mn{node}.ready"
        ready.unlink(missing_ok=True)
        with open(self.workdir / f"mn{node}.log", "ab") as log:
            self.procs[node] = subprocess.Popen(
                [sys.executable, "-m", "fusee.emulator.memnode", "--config",
                 str(config_path or self.config_path),
                 "--id", str(node), "--ready-file", str(ready), "--rejoin",
                 "--parent-pid", str(os.getpid())],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while not ready.exists():
            if self.procs[node].poll() is not None or time.monotonic() > deadline:
                raise ClusterStartError(f"memory node {node} did not start again:\n"
                                        f"{self.log(node)}")
            time.sleep(0.01)
        self.shm_names[node] = json.loads(ready.read_text())["shm_name"]

    def stop(self) -> None:
        self._master_finalizer()
        self._finalizer()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------
    def transport(self, backend: str | None = None, **kwargs):
        """A transport connected to every MN (default: the cluster's backend), checked to have
        reached this cluster's own MNs (``fusee.cluster_identity``: WrongMemoryNode for an
        endpoint another cluster's MN took over, a port reused or a stale config)."""
        from fusee.transports import connect
        backend = backend or self.backend
        if backend == "local":
            kwargs.setdefault("memory", self.memory)
        t = connect(self.config, backend, **kwargs)
        try:
            check_transport(t)
        except BaseException:
            t.close()
            raise
        return t

    def audit(self, cores: Iterable[ClientCore] = (), timeout: float = 60.0) -> AuditReport:
        """The leak audit (``fusee.audit``) of this cluster under the membership it has: the
        master's, once the master has no failover, pause or repair under way (waiting up to
        ``timeout`` seconds for that), else none dead. A master may fail over an MN nobody
        killed (its lease ran out on a loaded host): read as a replica, its stale memory
        would fail the audit of a sound store. The report names the segment of each MN read."""
        from fusee.audit import audit
        from fusee.driver import run
        from fusee.membership import Membership
        membership = Membership()
        if self.config.master is not None:
            deadline = time.monotonic() + timeout
            while not _quiescent(status := self.master_status()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the master is still busy after {timeout:g} s: failing "
                                       f"{status['failing']}, pause {status['pause']}, "
                                       f"repairs {status['repairs']}")
                time.sleep(0.02)
            membership = Membership.from_wire(status["membership"])
        with self.transport(dead=membership.dead) as t:
            report = run(audit(self.config, cores, membership), t)
            report.identities = {m: t.regions[m].shm_name for m in report.read
                                 if t.regions[m].shm_name is not None}
        return report

    def client(self, backend: str | None = None, **kwargs):
        """A store client on a fresh transport (fusee.Client); with a master it registers
        first, so the transport skips the MNs known dead."""
        from fusee.client import Client
        backend = backend or self.backend
        if backend == "local":
            return Client(self.transport(backend), self.config, **kwargs)
        return Client.connect(self.config_path, backend, **kwargs)

    def master_status(self, patience: float = 10.0) -> dict:
        """The (leading) master's ``status`` (membership, leases, failovers, repairs); with
        several masters, standbys send the request on and a dead one is skipped.

        One request waits one round trip's timeout; a master that is alive but slow to
        answer (a loaded host, its worker copying a rebuild's megabytes) is asked again
        until ``patience`` seconds have passed, so that a caller polling the cluster's state
        is not failed by one late reply."""
        from fusee.errors import MasterTimeout
        from fusee.master.link import MasterLink
        deadline = time.monotonic() + patience
        while True:
            try:
                with MasterLink(self.config) as link:
                    for _ in range(len(self.config.masters) - 1):
                        try:
                            return link.status()
                        except MasterTimeout:
                            pass                # the link moved on to the next master
                    return link.status()
            except MasterTimeout:
                if time.monotonic() > deadline:
                    raise


def _quiescent(status: dict) -> bool:
    """No failover pending or running, no pause, no repair: the membership holds still."""
    return not (status["failing"] or status["pause"] or status["repairs"])


def master_name(i: int) -> str:
    return "master" if i == 0 else f"master{i}"


def _cleanup(procs: dict, shm_names: dict, workdir: Path | None) -> None:
    """Stop every MN (SIGTERM, then SIGKILL) and remove what they leave behind."""
    stop_processes(procs.values())
    for name in shm_names.values():              # left behind only by a killed node
        try:
            os.unlink(f"/dev/shm/{name.lstrip('/')}")
        except OSError:
            pass
    procs.clear()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
