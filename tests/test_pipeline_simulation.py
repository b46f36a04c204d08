"""Several operations of ONE client in flight at once, as a pipeline or the benchmark's depth
keeps them (fusee.batch, fusee.driver.run_concurrently), under the deterministic simulator.

Each ClientCore gets several *lanes*: simulated clients that share the core (its allocator,
object log, index cache and deferred frees) and each run one operation at a time, interleaved
verb by verb with every other lane's. That is a superset of the schedules run_concurrently
makes (it executes a merged batch in posting order), and it includes what the pipeline never
does (two operations of one client on one key at once), so the core must be linearizable
with operations in flight together, whatever their keys. Every history is checked; the
deferred frees and the objects the lanes allocated must settle (audit) after close.
"""

from __future__ import annotations

import random

import pytest
from test_simulation import KEYS, MIX, STORE_ERRORS, STORE_LAYOUT, cluster_config

from fusee.emulator.testkit.linearizability import check
from fusee.emulator.testkit.simulator import Simulator, kv_workload, store_calls
from fusee.driver import run
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport


def pipelined_schedule(seed, clients=2, lanes=3, ops=8, keys=KEYS, mix=MIX, replication=0):
    """``clients`` ClientCores with ``lanes`` operations in flight each: opened before the
    run, closed after it (an open or close runs alone). Returns the simulator and the
    transport the cores were opened and closed through."""
    config = cluster_config(3, STORE_LAYOUT, replication=replication)
    memory = LocalMemory(config)
    transport = LocalTransport(config, memory=memory)
    sim = Simulator(memory, seed, expected_errors=STORE_ERRORS, max_steps=40_000)
    wrng = random.Random(f"workload {seed}")
    cores = [ClientCore(config, c) for c in range(clients)]
    for c, core in enumerate(cores):
        run(core.open(), transport)
        for lane in range(lanes):
            name = f"c{c}.{lane}"
            sim.add_client(name, store_calls(core, kv_workload(wrng, name, keys, ops, mix)))
    sim.run()
    for core in cores:
        run(core.close(), transport)
    return sim, cores, transport


def failures(seeds, **kw) -> list[str]:
    """The explanation of every schedule whose history is not linearizable."""
    return [f"pipelined_schedule({seed}, **{kw}):\n{report.explain()}" for seed in seeds
            if not (report := check(pipelined_schedule(seed, **kw)[0].history)).ok]


@pytest.mark.parametrize("replication, seeds", [(3, 40), (1, 20)])
def test_a_client_with_operations_in_flight_is_linearizable(replication, seeds):
    """2 clients x 3 lanes x 8 ops on 3 hot keys. (Lanes sharing a mutable index-cache entry
    read an old object as the new one: seeds 33 with r = 3 and 13 with r = 1 caught it.)"""
    bad = failures(range(seeds), replication=replication)
    assert not bad, bad[0]


@pytest.mark.soak
@pytest.mark.parametrize("replication", [3, 2, 1])
def test_a_client_with_operations_in_flight_is_linearizable_soak(replication):
    bad = failures(range(2000), replication=replication)
    assert not bad, f"{len(bad)} failing schedules; the first: {bad[0]}"


def test_lanes_over_many_keys_settle_every_object():
    """Inserts, updates and deletes of many keys from lanes of one core, the index splitting
    under them: linearizable, and after close the audit finds every object settled."""
    from fusee.audit import audit
    keys = [b"key%d" % i for i in range(60)]
    mix = {"insert": 6, "get": 2, "update": 2, "delete": 2, "put": 2}
    for seed in range(5):
        sim, cores, transport = pipelined_schedule(seed, clients=2, lanes=4, ops=15, keys=keys,
                                                   mix=mix)
        report = check(sim.history)
        assert report.ok, f"seed {seed}:\n{report.explain()}"
        audited = run(audit(cores[0].config, cores), transport)
        assert audited.ok, f"seed {seed}:\n{audited.explain()}"


def test_a_cache_entry_an_operation_holds_never_changes():
    """What the schedules above caught, directly: storing a key's new slot replaces its
    cache entry (keeping the hit counters) instead of changing the one in use."""
    from fusee.cache import IndexCache
    cache = IndexCache()
    cache.store(b"k", 1, 2, 0x30)
    held = cache.get(b"k")
    cache.outcome(held, False)
    cache.store(b"k", 1, 5, 0x60)
    assert (held.sid, held.pos, held.value) == (1, 2, 0x30)
    now = cache.get(b"k")
    assert (now.pos, now.value, now.accesses, now.misses) == (5, 0x60, 1, 1)


def test_a_cache_entry_no_other_operation_holds_is_changed_in_place():
    """An UPDATE alone in flight (``alone``) changes its key's entry in place (no entry made
    and freed per write): the counters kept, the requests made for the old value dropped,
    the entry last in recency; with another operation in flight, it is replaced as above."""
    from fusee.cache import IndexCache
    cache = IndexCache()
    cache.store(b"k", 1, 2, 0x30)
    cache.store(b"j", 1, 3, 0x40)
    held = cache.get(b"k")
    cache.outcome(held, False)
    held.hit_reads = (None, [], (0, 0))         # type: ignore[assignment]
    cache.get(b"j")
    cache.store(b"k", 1, 5, 0x60, alone=True)
    assert cache.get(b"k") is held and list(cache.entries) == [b"j", b"k"]
    assert (held.sid, held.pos, held.value, held.accesses, held.misses, held.hit_reads) == (
        1, 5, 0x60, 1, 1, None)
    cache.store(b"k", 1, 6, 0x70, alone=False)
    assert cache.get(b"k") is not held and held.value == 0x60
