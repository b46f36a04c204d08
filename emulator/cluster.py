"""An embedded cluster on one machine: N memory-node processes, started and always stopped.

``LocalCluster`` is what tests, examples and benchmarks use. It writes a cluster config,
starts ``python -m emulator.memnode`` once per MN, waits until each one reports its bound
endpoint (or fails with that node's own error output), rewrites the config with the real
endpoints, and on exit stops every process and removes every segment, socket and temporary
file, even when the code inside the ``with`` block failed. MN processes also exit by
themselves if the process that started them dies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from fusee.config import ClusterConfig, LayoutConfig, MemNodeConfig

MiB = 1 << 20

#: small enough for many clusters at once in a test run, large enough for real work
DEFAULT_LAYOUT = LayoutConfig(region_size=128 * MiB, block_size=2 * MiB, max_clients=256,
                              index_size=32 * MiB)


class ClusterStartError(RuntimeError):
    """A memory node did not come up; the message carries its own error output."""


class LocalCluster:
    def __init__(self, memnodes: int = 3, transport: str = "shm", endpoint: str = "ipc",
                 layout: LayoutConfig | None = None, replication: int = 0,
                 timeout: float = 5.0, start_timeout: float = 30.0, workdir: str | None = None):
        if transport not in ("local", "shm", "zmq", "verbs"):
            raise ValueError(f"unknown transport {transport!r}")
        if endpoint not in ("ipc", "tcp"):
            raise ValueError("endpoint must be 'ipc' or 'tcp'")
        self.backend, self.endpoint_kind = transport, endpoint
        self.start_timeout = start_timeout
        self.name = f"lc{os.getpid()}-{secrets.token_hex(3)}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"fusee-{self.name}-"))
        self.procs: dict[int, subprocess.Popen] = {}
        self.shm_names: dict[int, str] = {}
        self.memory = None                      # LocalMemory for transport="local"
        eps = [self._endpoint(i) for i in range(memnodes)]
        self.config = ClusterConfig(
            memnodes=tuple(MemNodeConfig(i, ep) for i, ep in enumerate(eps)),
            layout=layout or DEFAULT_LAYOUT, name=self.name, replication=replication,
            transport=transport, timeout=timeout)
        self.config_path = self.workdir / "cluster.toml"
        self._finalizer = weakref.finalize(self, _cleanup, self.procs, self.shm_names,
                                           self.workdir if self._own_workdir else None)

    def _endpoint(self, i: int) -> str:
        if self.endpoint_kind == "tcp":
            return "tcp://127.0.0.1:*"          # the MN picks a free port and reports it
        return f"ipc://{self.workdir}/mn{i}.sock"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        if self.backend == "local":
            from transports.local import LocalMemory
            self.memory = LocalMemory(self.config)
            self.config.save(self.config_path)
            return self
        proto = self.config.save(self.workdir / "proto.toml")
        ready = {i: self.workdir / f"mn{i}.ready" for i in range(len(self.config.memnodes))}
        for i in ready:
            log = open(self.workdir / f"mn{i}.log", "wb")
            cmd = [sys.executable, "-m", "emulator.memnode", "--config", str(proto),
                   "--id", str(i), "--ready-file", str(ready[i]), "--parent-pid", str(os.getpid())]
            if self.backend == "verbs":
                cmd.append("--rdma")
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            log.close()
        deadline = time.monotonic() + self.start_timeout
        endpoints = {}
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
                        raise ClusterStartError(f"memory node {i} exited with "
                                                f"{self.procs[i].returncode}:\n{self.log(i)}")
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"memory nodes not ready after "
                                            f"{self.start_timeout:g} s")
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        self.config = self.config.with_(memnodes=tuple(
            MemNodeConfig(i, endpoints[i]) for i in sorted(endpoints)))
        self.config.save(self.config_path)
        return self

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

    def stop(self) -> None:
        self._finalizer()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------
    def transport(self, backend: str | None = None, **kwargs):
        """A transport connected to every MN (default: the cluster's backend)."""
        from transports import connect
        backend = backend or self.backend
        if backend == "local":
            kwargs.setdefault("memory", self.memory)
        return connect(self.config, backend, **kwargs)

    def client(self, backend: str | None = None, **kwargs):
        """A store client on a fresh transport (fusee.Client)."""
        from fusee.client import Client
        return Client(self.transport(backend), self.config, **kwargs)


def _cleanup(procs: dict, shm_names: dict, workdir: Path | None) -> None:
    """Stop every MN (SIGTERM, then SIGKILL) and remove what they leave behind."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs.values():
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    for name in shm_names.values():              # left behind only by a killed node
        try:
            os.unlink(f"/dev/shm/{name.lstrip('/')}")
        except OSError:
            pass
    procs.clear()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
