"""The systems a benchmark compares: fusee and its two baselines.

Each system has a host side, ``serve`` (start its servers for one run: a local cluster of
memory nodes, plus the metadata server for Clover, or a private redis-server; stop them all
afterwards), and a client side, ``connect`` (run inside a benchmark client process). A
``Driver`` gives operation generators for the four operations and an executor for their
batches, so ``fusee.driver.run_concurrently`` drives every system the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from collections.abc import Callable, Generator, Iterator
from typing import Any

from fusee.config import ClusterConfig, LayoutConfig

#: an operation of any system: yields the batches its driver's executor runs
SystemOp = Generator[Any, Any, Any]

SYSTEMS = ("fusee", "clover", "redis")
MiB = 1 << 20


@dataclass(frozen=True)
class SystemSpec:
    """What a client process needs to reach a running system (picklable)."""
    name: str
    config_path: str = ""          # fusee, clover: the cluster config
    endpoint: str = ""             # clover: the metadata server
    port: int = 0                  # redis
    timeout: float = 5.0


@dataclass
class Driver:
    """One client's connection: ``ops[kind](key, value)`` -> an operation generator."""
    ops: dict[str, Callable[[bytes, bytes], SystemOp]]
    executor: Any                  # has execute(batch) -> completions
    counters: Callable[[], dict[str, int]]     # cumulative round_trips, verbs, rpcs, bytes
    close: Callable[[], None]


def cluster_layout(keys: int, object_size: int) -> LayoutConfig:
    """A layout whose memory nodes hold ``keys`` objects of ``object_size`` bytes on every
    replica with room to spare for out-of-place updates, and an index that starts big enough
    for them (the store can still grow it by splitting subtables)."""
    base = LayoutConfig()
    slots = base.buckets_per_subtable * 7
    subtables = 8
    while subtables * slots < 2 * keys:
        subtables *= 2
    subtable_bytes = base.buckets_per_subtable * 64
    index = max(32 * MiB, -(-4 * subtables * subtable_bytes // MiB) * MiB)
    block = 2 * MiB
    data = max(256 * MiB, 3 * keys * -(-(object_size + 128) // 64) * 64)
    region = -(-(index + data + 64 * MiB) // block) * block
    fields = {f.name for f in dataclasses.fields(LayoutConfig)}
    changes = dict(region_size=region, block_size=block, max_clients=256,
                   index_size=index, initial_subtables=subtables)
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if k in fields})


@contextlib.contextmanager
def serve(name: str, *, memnodes: int, transport: str, endpoint: str, replication: int,
          layout: LayoutConfig, timeout: float) -> Iterator[SystemSpec]:
    """Start system ``name`` for one benchmark run; yields its SystemSpec."""
    if name == "redis":
        from fusee.bench.redis_baseline import RedisServer
        with RedisServer() as server:
            yield SystemSpec("redis", port=server.port, timeout=timeout)
        return
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    from fusee.emulator.cluster import LocalCluster
    with LocalCluster(memnodes=memnodes, transport=transport, endpoint=endpoint,
                      layout=layout, replication=replication, timeout=timeout) as cluster:
        if name == "fusee":
            yield SystemSpec("fusee", config_path=str(cluster.config_path), timeout=timeout)
            return
        from fusee.bench.clover_server import MetadataServerProcess
        with MetadataServerProcess(cluster.config_path, cluster.workdir) as ms:
            yield SystemSpec("clover", config_path=str(cluster.config_path),
                             endpoint=ms.endpoint, timeout=timeout)


def connect(spec: SystemSpec) -> Driver:
    """Client side: connect to a running system."""
    if spec.name == "redis":
        from fusee.bench import redis_baseline as rb
        ex = rb.RedisExecutor(spec.port, spec.timeout)
        return Driver(
            ops={"search": lambda k, v: rb.search(k), "insert": rb.insert,
                 "update": rb.update, "delete": lambda k, v: rb.delete(k)},
            executor=ex,
            counters=lambda: {"round_trips": ex.round_trips, "verbs": ex.commands},
            close=ex.close)
    from fusee.transports import connect as connect_transport
    config = ClusterConfig.load(spec.config_path)
    if spec.name == "clover":
        from fusee.bench.clover import CloverClient, CloverExecutor
        transport = connect_transport(config)
        clover = CloverExecutor(transport, spec.endpoint, spec.timeout)
        cl = CloverClient(len(config.memnodes), config.replicas, spec.timeout)

        def close() -> None:
            clover.close()
            transport.close()

        return Driver(
            ops={"search": lambda k, v: cl.search(k), "insert": cl.insert,
                 "update": cl.update, "delete": lambda k, v: cl.delete(k)},
            executor=clover,
            counters=lambda: {"round_trips": clover.round_trips, "verbs": transport.stats.verbs,
                              "rpcs": clover.rpcs, "bytes": transport.stats.bytes_in
                              + transport.stats.bytes_out},
            close=close)
    from fusee.client import Client
    client = Client.connect(spec.config_path)
    core, transport = client.core, client.transport
    return Driver(
        ops={"search": lambda k, v: core.search(k), "insert": core.insert,
             "update": core.update, "delete": lambda k, v: core.delete(k)},
        executor=transport,
        counters=lambda: {"round_trips": transport.stats.round_trips,
                          "verbs": transport.stats.verbs,
                          "bytes": transport.stats.bytes_in + transport.stats.bytes_out},
        close=client.close)
