"""The systems a benchmark compares: fusee and its two baselines.

Each system has a host side, ``serve`` (start its servers for one run: a local cluster of
memory nodes, plus the metadata server for Clover, or a private redis-server; stop them all
afterwards), and a client side, ``connect`` (run inside a benchmark client process). A
``Driver`` runs the four operations the way the system's users run them, one at a time
(``call``) or a group in flight together, their verbs merged into one batch per round trip
(``many``), so the benchmark times every system through the same two calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from collections.abc import Callable, Generator, Iterator, Sequence
from itertools import repeat
from typing import Any

from fusee.config import ClusterConfig, LayoutConfig
from fusee.driver import run, run_concurrently

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
    #: fusee: keys its client's index cache holds (0: the client's default), as many as the
    #: benchmark touches, as the Clover baseline's cache holds every key (see README)
    cache_capacity: int = 0


@dataclass
class Driver:
    """One client's connection. ``call[kind](key, value)`` runs one operation and returns
    its result (KeyExists / KeyNotFound when refused); ``many(kinds, keys, value)`` runs a group
    of operations in flight together and returns their outcomes in order, the exception in
    place of a refused one."""
    call: dict[str, Callable[[bytes, bytes], Any]]
    many: Callable[[Sequence[str], Sequence[bytes], bytes], list[Any]]
    counters: Callable[[], dict[str, int]]     # cumulative round_trips, verbs, rpcs, bytes
    close: Callable[[], None]


def _outcome(i: int, op: SystemOp, outcomes: list[Any]) -> SystemOp:
    """Generator: ``op``, its result or the KeyError it was refused with into ``outcomes[i]``."""
    try:
        outcomes[i] = yield from op
    except KeyError as e:
        outcomes[i] = e


def generic_driver(ops: dict[str, Callable[[bytes, bytes], SystemOp]], executor: Any,
                   counters: Callable[[], dict[str, int]], close: Callable[[], None]
                   ) -> Driver:
    """The Driver of a baseline whose operations are generators of batches run by
    ``executor``: one at a time by ``fusee.driver.run``, a group by ``run_concurrently``
    (every step of the group one batch), as ``fusee``'s pipelines run theirs."""
    def one(make: Callable[[bytes, bytes], SystemOp]) -> Callable[[bytes, bytes], Any]:
        return lambda key, value: run(make(key, value), executor)

    def many(kinds: Sequence[str], keys: Sequence[bytes], value: bytes) -> list[Any]:
        outcomes: list[Any] = [None] * len(keys)
        made = (ops[kind](key, value) for kind, key in zip(kinds, keys))
        run_concurrently(map(_outcome, range(len(keys)), made, repeat(outcomes)), executor)
        return outcomes

    return Driver({kind: one(make) for kind, make in ops.items()}, many, counters, close)


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
        return generic_driver(
            {"search": lambda k, v: rb.search(k), "insert": rb.insert,
             "update": rb.update, "delete": lambda k, v: rb.delete(k)}, ex,
            lambda: {"round_trips": ex.round_trips, "verbs": ex.commands}, ex.close)
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

        return generic_driver(
            {"search": lambda k, v: cl.search(k), "insert": cl.insert,
             "update": cl.update, "delete": lambda k, v: cl.delete(k)}, clover,
            lambda: {"round_trips": clover.round_trips, "verbs": transport.stats.verbs,
                     "rpcs": clover.rpcs, "bytes": transport.stats.bytes_in
                     + transport.stats.bytes_out},
            close)
    return _fusee_driver(spec)


def _fusee_driver(spec: SystemSpec) -> Driver:
    """fusee through its public API: ``kv.get`` / ``kv.insert`` / ... one at a time, and a
    group as one ``kv.get_many`` (searches only) or one pipeline (``fusee.batch``)."""
    from fusee.client import Client
    kv = (Client.connect(spec.config_path, cache_capacity=spec.cache_capacity)
          if spec.cache_capacity else Client.connect(spec.config_path))
    transport = kv.transport
    queue = {"search": lambda p, k, v: p.get(k), "insert": lambda p, k, v: p.insert(k, v),
             "update": lambda p, k, v: p.update(k, v), "delete": lambda p, k, v: p.delete(k)}

    def many(kinds: Sequence[str], keys: Sequence[bytes], value: bytes) -> list[Any]:
        if kinds.count("search") == len(kinds):
            return kv.get_many(keys, len(keys))
        p = kv.pipeline(len(keys))
        for kind, key in zip(kinds, keys):
            queue[kind](p, key, value)
        outcomes = p.execute(raise_on_error=False)
        for got in outcomes:
            if isinstance(got, Exception) and not isinstance(got, KeyError):
                raise got
        return outcomes

    return Driver(
        call={"search": lambda k, v: kv.get(k), "insert": kv.insert, "update": kv.update,
              "delete": lambda k, v: kv.delete(k)},
        many=many,
        counters=lambda: {"round_trips": transport.stats.round_trips,
                          "verbs": transport.stats.verbs,
                          "bytes": transport.stats.bytes_in + transport.stats.bytes_out},
        close=kv.close)
