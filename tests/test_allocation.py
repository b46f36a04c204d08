"""Two-level allocation: blocks from the MNs, the client slab, FAA frees and reuse."""

from __future__ import annotations

import struct

import pytest

from fusee.emulator.testkit.simulator import Simulator, store_calls
from fusee.audit import audit
from fusee.config import MiB
from fusee.driver import run, run_concurrently
from fusee.errors import OutOfMemory
from fusee.index import replica_nodes
from fusee.layout import (BLOCK_HEADER, BLOCK_MAGIC, CLASSES, LEN_SHIFT, META_GROUPS,
                          META_HEADS, META_RECORDS, UPDATE, decode_object, object_bytes,
                          size_class)
from fusee.operations import ClientCore
from storekit import TINY, clients, config
from fusee.transports.local import LocalMemory, LocalTransport

#: 64 KiB blocks and an index roomy enough for a few thousand keys without splits
ROOMY = dict(region_size=32 * 1024 * 1024, block_size=64 * 1024, max_clients=16,
             index_size=4 * 1024 * 1024, initial_subtables=16, buckets_per_subtable=3 * 64)


def _u64(mem, node, addr):
    return struct.unpack_from("<Q", mem.regions[node].mem, addr)[0]


def test_block_group_is_recorded_on_the_mns():
    mem, (kv,) = clients(config(r=3))
    alloc, m = kv.core.alloc, kv.core.map
    (g,) = alloc.groups
    assert len(set(g.nodes)) == 3
    for n, a in zip(g.nodes, g.addrs):
        assert _u64(mem, n, a) == BLOCK_MAGIC
        assert mem.tables[n]._owner(m.block_index(a)) == kv.client_id + 1
    meta = m.client_meta(kv.client_id)
    for n in kv.core.meta_nodes:
        assert _u64(mem, n, meta + META_GROUPS) == 1
        assert _u64(mem, n, meta + META_RECORDS) == (g.nodes[0] << 48) | g.addrs[0]


def test_log_entries_name_the_next_object_in_advance():
    mem, (kv,) = clients(config(r=2, nodes=2))
    core = kv.core
    run(core.alloc.ensure(2), kv.transport)
    objs = [core.log.new_object(UPDATE, b"k%d" % i, b"v" * 70, 2) for i in range(4)]
    kv.transport.execute([w for o in objs for w in o.writes])
    views = [decode_object(o.writes[0].data) for o in objs]
    for i in range(3):
        assert views[i].next == (2 << LEN_SHIFT) | objs[i + 1].ptr
        assert views[i + 1].prev == (2 << LEN_SHIFT) | objs[i].ptr
        assert views[i + 1].seq == views[i].seq + 1
    head = core.map.client_meta(kv.client_id) + META_HEADS + 8 * CLASSES.index(2)
    assert all(_u64(mem, n, head) == (2 << LEN_SHIFT) | objs[0].ptr for n in core.meta_nodes)
    # every replica holds the same bytes
    for o in objs:
        a = o.addr
        assert len({bytes(mem.regions[n].mem[a:a + o.size]) for n in o.nodes}) == 1


def test_any_client_frees_with_faa_and_the_owner_reclaims():
    mem, (a, b) = clients(config(r=3), 2)
    a.insert(b"k", b"first")
    v = a.core.cache.get(b"k").value
    node, addr = a.core.alloc.where(v)
    block = a.core.alloc.block_of(addr)
    bit = (addr - block) // a.core.unit
    word = block + BLOCK_HEADER + bit // 64 * 8
    b.update(b"k", b"second")                       # b frees a's object (deferred FAA)
    b.get(b"k")                                     # ... which rides on b's next batch
    assert _u64(mem, node, word) >> (bit % 64) & 1
    run(a.core.alloc.reclaim(), a.transport)
    assert not _u64(mem, node, word) >> (bit % 64) & 1
    assert a.core.alloc.stats["reclaimed"] == 1
    assert a.core.alloc.free[1][-1] == v & ((1 << 46) - 1)


@pytest.mark.parametrize("r", [1, 3])
def test_deleted_memory_is_reused(r):
    cfg = config(r=r, **TINY)
    _, (a, b) = clients(cfg, 2)
    n = 600
    for i in range(n):
        a.insert(b"key%d" % i, b"x" * 100)
    blocks = a.stats["blocks"]
    assert blocks > 2                               # several 16 KiB blocks were needed
    for i in range(n):
        b.delete(b"key%d" % i)                      # b frees a's objects
    b.close()
    for i in range(n):
        a.insert(b"key%d" % i, b"y" * 100)
    assert a.stats["blocks"] == blocks              # no new block: freed memory came back
    assert a.stats["reclaimed"] >= n
    assert all(a.get(b"key%d" % i) == b"y" * 100 for i in range(n))


def test_out_of_memory_is_a_clear_error():
    cfg = config(r=3, **{**TINY, "region_size": 1024 * 1024})
    _, (kv,) = clients(cfg)
    with pytest.raises(OutOfMemory):
        for i in range(100_000):
            kv.insert(b"k%d" % i, b"v" * 1000)
    assert kv.get(b"k0") == b"v" * 1000
    kv.delete(b"k0")                                # the store still works


def _groups_needed(alloc, objects: int, units: int) -> int:
    """Block groups a client needs for ``objects`` of one class, plus the reserved next one,
    when every group is filled before the next is taken."""
    per_group = (alloc.block_size - alloc.first_object) // (units * alloc.unit)
    return -(-(objects + 1) // per_group)


@pytest.mark.parametrize("depth", [1, 8])
def test_operations_in_flight_share_one_growth(depth):
    _, (kv,) = clients(config(r=3, **ROOMY))
    core, n, value = kv.core, 3000, b"v" * 100
    keys = [b"key%05d" % i for i in range(n)]
    run_concurrently((core.insert(k, value) for k in keys), kv.transport, depth)
    units = size_class(object_bytes(len(keys[0]), len(value)), core.unit)
    assert core.alloc.stats["blocks"] <= _groups_needed(core.alloc, n, units)
    assert all(kv.get(k) == value for k in keys)


def test_concurrent_reclaims_never_hand_out_an_object_twice():
    _, (a, b) = clients(config(r=3, **ROOMY), 2)
    n, depth = 1000, 8
    for i in range(n):
        a.insert(b"old%05d" % i, b"x" * 100)
    for i in range(n):
        b.delete(b"old%05d" % i)                    # b frees a's objects
    b.close()                                       # ... its last deferred frees too
    # more new keys than freed objects: a freed object handed out twice would be overwritten
    new = {b"new%05d" % i: b"%05d" % i * 20 for i in range(2 * n)}
    run_concurrently((a.core.insert(k, v) for k, v in new.items()), a.transport, depth)
    assert a.stats["reclaimed"] == n                # each freed object came back once
    assert all(a.get(k) == v for k, v in new.items())


def test_a_group_too_full_for_an_object_keeps_its_tail_for_smaller_ones():
    _, (kv,) = clients(config(r=3, **TINY))           # 16 KiB blocks: room for 251 units
    alloc, t = kv.core.alloc, kv.transport
    big, small = 96, 48
    old = alloc.current
    run(alloc.ensure(big), t)
    _, nxt = alloc.alloc(big)                           # the second big one is reserved
    run(alloc.ensure(big), t)                           # a third does not fit: a new group
    assert alloc.current != old and alloc.stats["blocks"] == 2
    run(alloc.ensure(small), t)
    p, _ = alloc.alloc(small)                           # ... but a small one fits the old one
    assert alloc.where(p) == (old.nodes[0], alloc.where(nxt)[1] + big * alloc.unit)
    assert alloc.stats["blocks"] == 2


def _grow_in_lockstep(nodes: int, region_size: int, n_clients: int, puts: int):
    """``n_clients`` identical clients of an r=2 cluster over ``nodes`` MNs, each putting
    ``puts`` values of a third of a block (a new group every two puts), run in lockstep by
    the simulator; returns (memory, cores, simulator, config)."""
    cfg = config(nodes=nodes, r=2, **{**TINY, "region_size": region_size})
    mem = LocalMemory(cfg)
    sim = Simulator(mem, 0, expected_errors=(OutOfMemory,), lockstep=True)
    value = b"v" * (cfg.layout.block_size // 3)
    cores = []
    for c in range(n_clients):
        core = ClientCore(cfg, c)
        run(core.open(), LocalTransport(cfg, memory=mem))
        cores.append(core)
        sim.add_client(f"c{c}", store_calls(core, [("put", b"c%d-%d" % (c, i), value)
                                                   for i in range(puts)]))
    sim.run()
    return mem, cores, sim, cfg


def _assert_no_block_leaked(mem, cores, cfg):
    report = run(audit(cfg, cores), LocalTransport(cfg, memory=mem))
    assert report.ok, report.explain()
    for n in range(len(cfg.memnodes)):            # every block owned is in some client's group
        held = sum(n in g.nodes for core in cores for g in core.alloc.groups)
        assert mem.tables[n].used() == held


@pytest.mark.parametrize("nodes", [2, 3])
def test_clients_growing_in_lockstep_all_get_blocks(nodes):
    """Clients that start on different MNs and grow at the same time each get their groups:
    the address of a group is not drawn from one MN's next free block, which moves in step
    with the others' and made racing clients collide on every retry (OutOfMemory with most
    of the region free), and on 3 MNs made about half of all claims fail even without."""
    mem, cores, sim, cfg = _grow_in_lockstep(nodes, 8 * MiB, 8, 12)
    failed = [op for op in sim.history.ops if op.status != "ok"]
    assert not failed, f"{failed[0].client} {failed[0].kind} {failed[0].key}: {failed[0].error}"
    _assert_no_block_leaked(mem, cores, cfg)
    grown = sum(core.alloc.stats["blocks"] - 1 for core in cores)     # one came with open()
    wasted = sim.stats.controls - 2 * grown         # AllocBlock/FreeBlock of lost races
    assert wasted <= grown // 5, f"{wasted} block requests wasted for {grown} groups got"


@pytest.mark.parametrize("nodes", [2, 3])
def test_out_of_memory_only_when_no_address_is_free_on_every_replica(nodes):
    mem, cores, sim, cfg = _grow_in_lockstep(nodes, 2 * MiB, 8, 40)
    assert any(op.error == "OutOfMemory" for op in sim.history.ops)
    m = cores[0].map
    for first in range(nodes):                  # every client tried every replica list
        free = [i for i in range(m.num_blocks)
                if not any(mem.tables[n]._owner(i) for n in replica_nodes(first, nodes, 2))]
        assert not free, f"block {free[0]} is free on MNs {replica_nodes(first, nodes, 2)}"
    _assert_no_block_leaked(mem, cores, cfg)


def test_a_client_takes_no_new_group_for_each_rebuild():
    """A client sparing a rebuild's groups (``Allocator.follow``) carves on in the group it
    was carving from: it took a new group at each rebuild and never gave one back, so a
    writer open across rebuilds piled them up (13 groups of 256 KiB for 40 keys after 12
    rebuilds) until the clients opening next found no block (OutOfMemory)."""
    _, (kv,) = clients(config(r=3))
    alloc = kv.core.alloc
    for rebuild in range(5):
        alloc.follow(1)                     # a grant: the rebuild of MN 1 copies
        for i in range(10):
            kv.put(b"k%d" % i, b"v%d-%d" % (i, rebuild))
        alloc.follow(None)                  # it ended
    assert alloc.stats["blocks"] == 1
    assert all(kv.get(b"k%d" % i) == b"v%d-4" % i for i in range(10))


def test_a_rebuild_beginning_as_memory_is_made_does_not_fail_the_write():
    """A write that had to make memory first (``ClientCore.made_object``) allocates at once
    once ``ensure`` returns. Asking ``alloc.ready`` again there is not a pure look: it first
    follows the lease's news (``Allocator.follow``, set by the lease's thread at any time),
    and a rebuild begun in between no longer counts the room just made: the write died with
    "no memory for an object once made ready" (the session-13 review). Modelled by a
    ``ready`` that says False once ``ensure`` returned, as ``follow`` does then."""
    from fusee.client import Client
    cfg = config(3)
    kv = Client(LocalTransport(cfg, memory=LocalMemory(cfg)))
    kv.insert(b"a", b"1")
    alloc = kv.core.alloc
    real_ready, real_ensure = alloc.ready, alloc.ensure
    state = {"calls": 0, "ensured": False}

    def ready(units):
        state["calls"] += 1
        if state["calls"] == 1 or state["ensured"]:
            state["ensured"] = False
            return False            # the first look (memory to make), and the race
        return real_ready(units)

    def ensure(units):
        yield from real_ensure(units)
        state["ensured"] = True

    alloc.ready, alloc.ensure = ready, ensure
    try:
        kv.update(b"a", b"2")
    finally:
        alloc.ready, alloc.ensure = real_ready, real_ensure
    assert kv.get(b"a") == b"2"
    kv.close()
