"""The model's experiments: a cluster of fusee or Clover-style clients in simulated time.

``ModelRun`` builds one cluster image (memory nodes as ``LocalMemory``, clients with their
real state: caches, allocators, logs), loads keys outside simulated time, and runs phases on
it, each one a fresh ``TimingModel`` over the same memory and clients:

- ``micro(op, count)``: every client runs ``op`` on its own ``count`` keys (inserted by an
  earlier ``micro("insert")``), as the paper's micro-benchmarks and ``fusee bench micro`` do;
  throughput is operations over the phase's makespan.
- ``ycsb(workload, warmup, duration)``: every client issues the YCSB mix over the loaded keys;
  throughput counts the operations that end inside the measured window.
- ``timeline(...)``: a YCSB phase with a memory-node crash, counted per time bucket.

Each phase returns a ``PhaseResult``: throughput, latencies, verbs per operation, and the
busy share of every resource, busiest first, which says what saturates.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusee.emulator.timing.engine import Completed, TimingModel
from fusee.emulator.timing.profile import Profile
from fusee.bench.runner import key_base
from fusee.bench.ycsb import (
    KEY_LENGTH,
    OP_NAMES,
    OpStream,
    Workload,
    key_names,
    stream_rng,
)
from fusee.cache import CacheEntry
from fusee.config import ClusterConfig, KiB, LayoutConfig, MemNodeConfig, MiB
from fusee.driver import run
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport

SYSTEMS = ("fusee", "clover")
#: operations a YCSB client pre-computes at a time
CHUNK = 1024


@dataclass
class PhaseResult:
    system: str
    suite: str                          # micro | ycsb | timeline
    name: str
    clients: int
    ops: int
    seconds: float                      # simulated
    latencies_us: dict[str, list[float]]
    refused: int
    misses: int
    round_trips: int
    verbs: int
    utilization: dict[str, float]
    buckets: list[int] = field(default_factory=list)     # timeline: ops per bucket
    failovers: list[float] = field(default_factory=list)  # when each failover ran (us)

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def bottleneck(self) -> tuple[str, float]:
        return next(iter(self.utilization.items()))


def layout_for(keys: int, clients: int, object_size: int, memnodes: int,
               replicas: int) -> LayoutConfig:
    """A small layout (the model keeps every MN image in this process) with room for
    ``keys`` objects of ``object_size`` bytes written a few times over, and a block or two
    per client and size class."""
    block = 256 * KiB
    base = LayoutConfig()
    subtables = 8
    while subtables * base.buckets_per_subtable * 7 < 2 * keys:
        subtables *= 2
    index = max(4 * MiB, -(-4 * subtables * base.buckets_per_subtable * 64 // MiB) * MiB)
    per_node = -(-keys * replicas // memnodes)
    slot = 1 << (object_size + 128 - 1).bit_length()     # size classes round up: room for it
    data = 6 * per_node * slot + 4 * (clients + 2) * block
    region = -(-(index + data + 16 * MiB) // block) * block
    return dataclasses.replace(base, region_size=region, block_size=block,
                               max_clients=max(64, clients + 2), index_size=index,
                               initial_subtables=subtables)


class _CloverLoader:
    """Executes a Clover client's batches outside simulated time (for loading keys)."""

    def __init__(self, server, transport):
        self.server, self.transport = server, transport

    def execute(self, batch):
        from fusee.bench.clover import Rpc
        if type(batch[0]) is Rpc:
            return self.server.answer([list(r) for r in batch], 0.0)
        return self.transport.execute(batch)


class ModelRun:
    """One cluster image, its ``clients`` clients and the loaded keys, for phase after
    phase of one system on one profile."""

    def __init__(self, system: str, profile: Profile, *, memnodes: int, replicas: int,
                 clients: int, keys: int, object_size: int = 1024, seed: int = 1,
                 extra_keys: int = 0):
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; the model runs {', '.join(SYSTEMS)}")
        if not 1 <= replicas <= memnodes:
            raise ValueError(f"need 1 <= r <= memnodes, got r={replicas}, {memnodes} MNs")
        self.system, self.profile, self.seed = system, profile, seed
        self.n_clients, self.keys = clients, keys
        self.value = stream_rng(seed, 1 << 30).bytes(object_size - KEY_LENGTH)
        layout = layout_for(keys + extra_keys, clients, object_size, memnodes, replicas)
        self.config = ClusterConfig(
            memnodes=tuple(MemNodeConfig(i, f"inproc://{i}") for i in range(memnodes)),
            replication=replicas, layout=layout, transport="local")
        self.memory = LocalMemory(self.config)
        transport = LocalTransport(self.config, memory=self.memory)
        self.names = key_names(np.arange(keys))
        self.server = None
        if system == "fusee":
            self.stores: list[Any] = []     # ClientCores, or CloverClients
            for i in range(clients + 1):            # the last one loads the keys
                core = ClientCore(self.config, i)
                run(core.open(), transport)
                self.stores.append(core)
            loader = self.stores.pop()
            for k in self.names:
                run(loader.insert(k, self.value), transport)
        else:
            from fusee.bench.clover import CloverClient
            from fusee.bench.clover_server import MetadataServer
            self.server = MetadataServer(self.config, transport)
            self.stores = [CloverClient(memnodes, replicas) for _ in range(clients)]
            clover, executor = CloverClient(memnodes, replicas), _CloverLoader(self.server,
                                                                               transport)
            for k in self.names:
                run(clover.insert(k, self.value), executor)

    def _model(self) -> TimingModel:
        return TimingModel(self.profile, self.memory, self.server)

    def _result(self, model: TimingModel, suite: str, name: str, done: list[Completed],
                seconds: float, elapsed_us: float, buckets=()) -> PhaseResult:
        lat: dict[str, list[float]] = {}
        for d in done:
            lat.setdefault(d.kind, []).append(d.end - d.start)
        rts = sum(c.stats.round_trips for c in model.clients)
        verbs = sum(c.stats.verbs for c in model.clients)
        return PhaseResult(self.system, suite, name, self.n_clients, len(done), seconds, lat,
                           sum(d.refused for d in done), sum(d.missed for d in done),
                           rts, verbs, model.utilization(elapsed_us), list(buckets))

    def micro(self, op: str, count: int, keyspace: int = 1) -> PhaseResult:
        """Every client runs ``op`` on its own ``count`` keys of ``keyspace``."""
        model = self._model()
        done: list[Completed] = []
        for i, store in enumerate(self.stores):
            base = key_base(keyspace, i)
            names = key_names(np.arange(base, base + count))
            model.add_client(f"c{i}", self._calls(store, op, names), done.append)
        model.run()
        t0 = min(d.start for d in done)
        t1 = max(d.end for d in done)
        return self._result(model, "micro", op, done, (t1 - t0) / 1e6, t1 - t0)

    def _calls(self, store, op: str, names):
        value = self.value
        if op in ("search", "delete"):
            method = getattr(store, op)
            return ((op, lambda k=k: method(k)) for k in names)
        method = getattr(store, op)
        return ((op, lambda k=k: method(k, value)) for k in names)

    def warm_caches(self) -> None:
        """Give every client the cache a long-running client has: an entry for every loaded
        key. The paper measures seconds of load, in which every client meets every key; a
        simulated window of a millisecond never gets there (YCSB's scrambled Zipfian spreads
        its draws over all the keys). One extra client SEARCHes every key, outside simulated
        time, and each client gets a copy of its cache."""
        transport = LocalTransport(self.config, memory=self.memory)
        if self.server is None:
            scout = ClientCore(self.config, self.n_clients + 1)      # after the loader
            run(scout.open(), transport)
            for k in self.names:
                run(scout.search(k), transport)
            known = [(k, e.sid, e.pos, e.value) for k, e in scout.cache.entries.items()]
            for store in self.stores:
                store.cache.entries = OrderedDict(
                    (k, CacheEntry(sid, pos, value)) for k, sid, pos, value in known)
        else:
            from fusee.bench.clover import CloverClient
            clover = CloverClient(self.stores[0].n_nodes, self.stores[0].r)
            executor = _CloverLoader(self.server, transport)
            for k in self.names:
                run(clover.search(k), executor)
            for store in self.stores:
                store.cache.update(clover.cache)

    def ycsb(self, workload: Workload, warmup_us: float, duration_us: float,
             keyspace: int = 2, theta: float = 0.99, crash: tuple[int, float] | None = None,
             bucket_us: float = 0.0) -> PhaseResult:
        """Every client issues ``workload`` until ``warmup_us + duration_us``; throughput over
        the window after the warm-up. ``crash`` = (node, at_us) kills a memory node;
        ``bucket_us`` > 0 also counts completions per bucket of the whole run."""
        model = self._model()
        end = warmup_us + duration_us
        done: list[Completed] = []
        for i, store in enumerate(self.stores):
            stream = OpStream(workload, self.keys, stream_rng(self.seed, keyspace, i),
                              insert_base=key_base(keyspace, i), theta=theta)
            model.add_client(f"c{i}", self._stream(model, store, stream, end), done.append)
        if crash is not None:
            model.crash_node(*crash)
        model.run()
        window = [d for d in done if warmup_us <= d.end < end]
        buckets = []
        if bucket_us > 0:
            buckets = [0] * int(-(-end // bucket_us))
            for d in done:
                if d.end < end:
                    buckets[int(d.end // bucket_us)] += 1
        result = self._result(model, "ycsb", workload.name, window, duration_us / 1e6,
                              model.now, buckets)
        result.failovers = [t for t, _ in model.failovers]
        return result

    def _stream(self, model: TimingModel, store, stream: OpStream, end: float):
        names, loaded, value = self.names, self.keys, self.value
        while True:
            codes, nums = (a.tolist() for a in stream.chunk(CHUNK))
            for code, num in zip(codes, nums):
                if model.now >= end:
                    return
                kind = OP_NAMES[code]
                key = names[num] if num < loaded else key_names([num])[0]
                if kind == "search":
                    yield kind, lambda k=key: store.search(k)
                else:
                    method = getattr(store, kind)
                    yield kind, lambda m=method, k=key: m(k, value)
