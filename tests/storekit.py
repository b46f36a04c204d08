"""Helpers for the store's tests: small clusters on the in-process backend, and seeded
simulations of several ``ClientCore``s over one shared memory."""

from __future__ import annotations

import random

from fusee.emulator.testkit.linearizability import check
from fusee.emulator.testkit.simulator import Simulator, kv_workload, store_calls
from fusee.client import Client
from fusee.config import ClusterConfig, KiB, LayoutConfig, MemNodeConfig, MiB
from fusee.driver import run
from fusee.errors import KeyExists, KeyNotFound
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport

#: a tiny index (2 subtables of 8 groups) so that splits come early
SMALL = dict(region_size=16 * MiB, block_size=256 * KiB, max_clients=64, index_size=2 * MiB,
             initial_subtables=2, buckets_per_subtable=3 * 8)
#: one subtable of two groups and 16 KiB blocks: hot buckets, splits and memory reuse at once
TINY = dict(region_size=8 * MiB, block_size=16 * KiB, max_clients=16, index_size=256 * KiB,
            initial_subtables=1, buckets_per_subtable=6)


def config(nodes: int = 3, r: int = 0, **layout) -> ClusterConfig:
    return ClusterConfig(memnodes=tuple(MemNodeConfig(i, f"inproc://{i}") for i in range(nodes)),
                         replication=r, layout=LayoutConfig(**{**SMALL, **layout}),
                         transport="local")


def clients(cfg: ClusterConfig, n: int = 1) -> tuple[LocalMemory, list[Client]]:
    """``n`` clients sharing one in-process cluster."""
    mem = LocalMemory(cfg)
    return mem, [Client(LocalTransport(cfg, memory=mem)) for _ in range(n)]


def simulate(cfg: ClusterConfig, seed: int, n_clients: int, keys: list[bytes], n_ops: int,
             mix: dict[str, float]):
    """Run a seeded simulation; returns (simulator, cores, linearizability report)."""
    mem = LocalMemory(cfg)
    rng = random.Random(seed)
    sim = Simulator(mem, seed, expected_errors=(KeyExists, KeyNotFound))
    cores = []
    for c in range(n_clients):
        core = ClientCore(cfg, c)
        run(core.open(), LocalTransport(cfg, memory=mem))
        cores.append(core)
        sim.add_client(f"c{c}", store_calls(core, kv_workload(rng, f"c{c}", keys, n_ops, mix)))
    history = sim.run()
    return sim, cores, check(history)


def rt(client: Client, fn, *args):
    """Round trips one call takes (from the transport's counters) and its result."""
    before = client.transport.stats.round_trips
    result = fn(*args)
    return client.transport.stats.round_trips - before, result
