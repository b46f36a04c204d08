"""The Clover-style baseline's metadata server: index and allocator in one process.

This is the monolithic server that FUSEE removes: every write of every client
passes through its single CPU. It owns the key -> newest version map and allocates object
memory from data blocks that it obtains from the memory nodes (their AllocBlock control
request); it never touches a value. Freed versions are reused only after a grace period, so a
client still linking or reading an old version never sees it recycled under its feet.

Run by ``MetadataServerProcess`` (a context manager, like ``LocalCluster``), or by hand:
``python -m fusee.bench.clover_server --config cluster.toml --endpoint ipc:///tmp/ms.sock``.

Design: docs/design.md#baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from fusee.logsetup import add_log_level_option, setup_logging
from fusee.bench.clover import (DELETE, EXISTS, FAILED, INSERT, LOOKUP, MAX_UNITS, MISSING, OK,
                                UNIT, UPDATE, replica_nodes)
from fusee.emulator.serving import bind, stop_condition, stop_processes, write_ready
from fusee.config import ClusterConfig
from fusee.verbs import AllocBlock, TransportError

if TYPE_CHECKING:
    from fusee.transports.base import Transport

#: seconds a freed version waits before its memory is handed out again
GRACE = 1.0
#: block owner id the metadata server uses on the memory nodes
OWNER = 0


class Arena:
    """Object memory on one memory node: bump allocation in blocks, plus delayed reuse."""

    def __init__(self, node: int, block_size: int, transport: Transport) -> None:
        self.node, self.block_size, self.transport = node, block_size, transport
        self.cur = self.end = 0
        #: size -> (reusable at, addr, tag)
        self.free: dict[int, deque[tuple[float, int, int]]] = defaultdict(deque)

    def alloc(self, size: int, now: float) -> tuple[int, int]:
        """-> (address, tag of the slot's previous life; 0 for fresh memory)."""
        q = self.free[size]
        if q and q[0][0] <= now:
            _, addr, tag = q.popleft()
            return addr, tag
        if self.cur + size > self.end:
            (addr,) = self.transport.execute([AllocBlock(self.node, OWNER)])
            self.cur, self.end = addr, addr + self.block_size
        addr, self.cur = self.cur, self.cur + size
        return addr, 0

    def release(self, size: int, addr: int, tag: int, now: float) -> None:
        self.free[size].append((now + GRACE, addr, tag))


class MetadataServer:
    """Request handling, bytes in and bytes out (no sockets here)."""

    def __init__(self, config: ClusterConfig, transport: Transport) -> None:
        self.n_nodes, self.r = len(config.memnodes), config.replicas
        self.arenas = [Arena(m.id, config.layout.block_size, transport) for m in config.memnodes]
        #: key -> (tag, size, addrs, the version it replaced as (size, primary addr) or None)
        self.index: dict[bytes, tuple[Any, ...]] = {}
        self.tag = 0
        self.served = 0

    def handle(self, data: bytes) -> bytes | None:
        """One message: [seq, [[op, key, size], ...]] -> [seq, [[status, payload], ...]]."""
        try:
            seq, calls = msgpack.unpackb(data, raw=False)
            calls = list(calls)
        except (ValueError, TypeError, msgpack.UnpackException):
            return None                             # not our protocol: nothing to answer
        reply: bytes = msgpack.packb([seq, self.answer(calls, time.monotonic())])
        return reply

    def answer(self, calls: list[Any], now: float) -> list[Any]:
        """The replies to ``calls`` ([op, key, size] each) at time ``now`` (seconds, any
        monotonic clock: the timing model gives its simulated one)."""
        replies: list[Any] = []
        for call in calls:
            try:
                op, key, size = call
                replies.append(self._one(op, bytes(key), int(size), now))
            except (ValueError, TypeError, KeyError) as e:
                replies.append([FAILED, f"bad request: {e}"])
            except TransportError as e:
                replies.append([FAILED, f"allocation failed: {e}"])
        self.served += len(replies)
        return replies

    def _one(self, op: str, key: bytes, size: int, now: float) -> list[Any]:
        entry = self.index.get(key)
        if op == LOOKUP:
            return [MISSING, None] if entry is None else [OK, list(entry[1:])]
        if op == DELETE:
            if entry is None:
                return [MISSING, None]
            del self.index[key]
            self._release(key, entry, now)
            return [OK, list(entry[:3])]
        if op not in (INSERT, UPDATE):
            raise ValueError(f"unknown operation {op!r}")
        if op == INSERT and entry is not None:
            return [EXISTS, None]
        if op == UPDATE and entry is None:
            return [MISSING, None]
        if size <= 0 or size % UNIT or size > MAX_UNITS * UNIT:
            raise ValueError(f"object size {size}")
        nodes = replica_nodes(key, self.n_nodes, self.r)
        got = [self.arenas[n].alloc(size, now) for n in nodes]
        addrs, stale = [a for a, _ in got], {t for _, t in got}
        # A reused slot still holds the link its previous life was given (with that life's
        # tag); a tag different from it makes that stale link unmistakable.
        self.tag = self.tag % 0xFFFF + 1                           # 1..65535, never 0
        while self.tag in stale:
            self.tag = self.tag % 0xFFFF + 1
        replaced = None if entry is None else (entry[1], entry[2][0])
        self.index[key] = (self.tag, size, addrs, replaced)
        if entry is not None:
            self._release(key, entry, now)
        return [OK, [self.tag, addrs, None if entry is None else list(entry[:3])]]

    def _release(self, key: bytes, entry: tuple[Any, ...], now: float) -> None:
        tag, size, addrs, _ = entry
        for n, a in zip(replica_nodes(key, self.n_nodes, self.r), addrs):
            self.arenas[n].release(size, a, tag, now)


def serve(server: MetadataServer, endpoint: str, stop: Callable[[], bool],
          on_bound: Callable[[str], object] = lambda ep: None) -> None:
    """Answer requests on ``endpoint`` until ``stop()`` (checked at least every 200 ms)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
    on_bound(bind(sock, endpoint))
    try:
        while not stop():
            if not sock.poll(200):
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2:
                    continue
                reply = server.handle(frames[1])
                if reply is not None:
                    sock.send_multipart((frames[0], reply), zmq.NOBLOCK)
    finally:
        sock.close(0)


class MetadataServerProcess:
    """Start the metadata server for a running cluster; always stop it (context manager)."""

    def __init__(self, config_path: str | Path, workdir: str | Path | None = None,
                 start_timeout: float = 30.0) -> None:
        self.config_path = Path(config_path)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fusee-clover-"))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self) -> MetadataServerProcess:
        config = ClusterConfig.load(self.config_path)
        tcp = config.memnodes[0].endpoint.startswith("tcp://")
        endpoint = "tcp://127.0.0.1:*" if tcp else f"ipc://{self.workdir}/clover-ms.sock"
        ready, log = self.workdir / "clover-ms.ready", self.workdir / "clover-ms.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fusee.bench.clover_server", "--config",
                 str(self.config_path), "--endpoint", endpoint, "--ready-file", str(ready),
                 "--parent-pid", str(os.getpid())],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("clover metadata server did not start:\n"
                                   + log.read_text(errors="replace")[-4096:])
            time.sleep(0.01)
        self.endpoint = json.loads(ready.read_text())["endpoint"]
        return self

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            stop_processes([p])
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MetadataServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusee.bench.clover_server",
                                description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="cluster config (TOML)")
    p.add_argument("--endpoint", required=True, help="ZeroMQ endpoint to bind")
    p.add_argument("--ready-file", help="write {endpoint, pid} here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    add_log_level_option(p)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    config = ClusterConfig.load(args.config)
    stop = stop_condition(args.parent_pid)
    from fusee.transports import connect
    transport = connect(config)
    try:
        def bound(endpoint: str) -> None:
            write_ready(args.ready_file, endpoint=endpoint)

        serve(MetadataServer(config, transport), args.endpoint, stop, bound)
    finally:
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
