"""The verbs contract (docs/design.md#verbs-and-batches), the same for every backend.

Each test runs against a real cluster of 3 memory nodes per backend: in-process memory,
shared memory executed by the client, and the ZeroMQ emulated NIC over ipc:// and tcp://.
"""

from __future__ import annotations

import struct

import pytest
from processes import run_processes

from fusee.cluster_identity import check, new_cluster_id
from fusee.config import ClusterConfig
from fusee.driver import run
from fusee.errors import WrongMemoryNode
from fusee.memory_map import MAGIC, MemoryMap
from fusee.verbs import (AllocBlock, AwaitMembership, Backoff, Cas, ControlError, Faa, FreeBlock,
                         MASK64, NodeTimeout, Read, RemoteAccessError, Write)
from fusee.transports import connect
from fusee.transports.base import RegionInfo

MiB = 1 << 20


def data_addr(cluster, i=0) -> int:
    """A scratch address in the data area, far from the header and the tables."""
    return MemoryMap.of(cluster.config.layout).data + i * 4096


def u64(b: bytes) -> int:
    return struct.unpack("<Q", b)[0]


def test_regions_learned(cluster):
    t = cluster.transport()
    assert sorted(t.regions) == [0, 1, 2]
    for n, r in t.regions.items():
        assert r.node == n and r.length == cluster.config.layout.region_size and r.rkey
    assert t.execute([Read(n, 0, 8) for n in range(3)]) == [struct.pack("<Q", MAGIC)] * 3
    t.close()


def test_every_mn_names_its_cluster_and_one_read_batch_checks_them(cluster):
    """fusee.cluster_identity: each region's header holds the cluster id of the config its MN
    started from; a connecting process reads every header in one round trip of READs and
    refuses a config of another cluster before writing anything."""
    t = cluster.transport()                 # (checked already: its MNs are this cluster's)
    before = t.stats.copy()
    run(check(cluster.config, range(3)), t)
    spent = t.stats - before
    assert (spent.round_trips, spent.reads, spent.writes, spent.atomics) == (1, 3, 0, 0)
    other = cluster.config.with_(cluster_id=new_cluster_id())
    with pytest.raises(WrongMemoryNode, match="memory node 0 at .* belongs to another cluster"
                       ) as refused:
        run(check(other, range(3)), t)
    assert (refused.value.expected, refused.value.found) == (other.cluster_id,
                                                             cluster.config.cluster_id)
    assert (t.stats - before).writes == 0
    t.close()


def test_each_verb(cluster):
    t = cluster.transport()
    a = data_addr(cluster)
    assert t.execute([Write(0, a, b"hello world")]) == [None]
    assert t.execute([Read(0, a, 11)]) == [b"hello world"]
    assert t.execute([Read(0, a + 6, 5)]) == [b"world"]
    w = a + 64
    t.execute([Write(1, w, struct.pack("<Q", 0x0102030405060708))])
    assert t.execute([Cas(1, w, 0x0102030405060708, 0xA1B2C3D4E5F60718)]) == [0x0102030405060708]
    assert t.execute([Cas(1, w, 0x0102030405060708, 5)]) == [0xA1B2C3D4E5F60718]   # fails
    assert u64(t.execute([Read(1, w, 8)])[0]) == 0xA1B2C3D4E5F60718
    t.execute([Write(2, w, struct.pack("<Q", MASK64 - 1))])
    assert t.execute([Faa(2, w, 3)]) == [MASK64 - 1]                   # wraps modulo 2**64
    assert t.execute([Faa(2, w, -1)]) == [1]
    assert u64(t.execute([Read(2, w, 8)])[0]) == 0
    t.close()


def test_batch_across_nodes_is_one_round_trip_in_order(cluster):
    t = cluster.transport()
    a = data_addr(cluster, 1)
    before = t.stats.copy()
    batch = [Write(n, a, bytes([n]) * 16) for n in range(3)] + [Read(n, a, 16) for n in (2, 0, 1)]
    res = t.execute(batch)
    assert res[:3] == [None] * 3
    assert res[3:] == [b"\x02" * 16, b"\x00" * 16, b"\x01" * 16]
    d = t.stats - before
    assert ((d.round_trips, d.verbs, d.writes, d.reads, d.bytes_out, d.bytes_in)
            == (1, 6, 3, 3, 48, 48))
    assert t.execute([]) == [] and (t.stats - before).round_trips == 1
    t.close()


def test_requests_of_one_node_execute_in_posting_order(cluster):
    t = cluster.transport()
    a = data_addr(cluster, 2)
    res = t.execute([Write(0, a, struct.pack("<Q", 7)), Faa(0, a, 1), Cas(0, a, 8, 9),
                     Read(0, a, 8)])
    assert res == [None, 7, 8, struct.pack("<Q", 9)]
    t.close()


@pytest.mark.parametrize("bad", [
    Read(0, 1 << 40, 8),                 # far outside
    Read(0, -1, 8),                      # negative
    "end",                               # crosses the end of the region
    Write(0, 1 << 40, b"x"),
    Cas(0, 1 << 40, 0, 1),
    Faa(0, 1 << 40, 1),
])
def test_out_of_range_is_refused_and_node_serves_on(cluster, bad):
    t = cluster.transport()
    if bad == "end":
        bad = Read(0, cluster.config.layout.region_size - 4, 8)
    with pytest.raises((RemoteAccessError, ValueError)):
        t.execute([bad])
    assert t.execute([Read(0, 0, 8)]) == [struct.pack("<Q", MAGIC)]
    t.close()


@pytest.mark.parametrize("verb", [Cas, Faa])
def test_unaligned_atomic_is_refused(cluster, verb):
    t = cluster.transport()
    a = data_addr(cluster) + 4
    with pytest.raises(RemoteAccessError, match="unaligned"):
        t.execute([verb(1, a, 0, 1) if verb is Cas else verb(1, a, 1)])
    assert t.execute([Faa(1, a + 4, 1)]) == [0]
    t.close()


@pytest.mark.parametrize("operands", [(7, -1), (-1, 8)])
def test_cas_operands_that_are_not_words_are_refused_and_change_nothing(cluster, operands):
    """A NIC's CAS compares and swaps 64-bit words: every backend refuses other operands
    (fusee.emulator.nic_checks; the verbs backend before posting, as for a request out of
    range) rather than wrapping them into some word it then writes."""
    t = cluster.transport()
    a = data_addr(cluster, 5)
    t.execute([Write(2, a, struct.pack("<Q", 7))])
    with pytest.raises((RemoteAccessError, ValueError)):
        t.execute([Cas(2, a, *operands)])
    assert t.execute([Read(2, a, 8)]) == [struct.pack("<Q", 7)]
    t.close()


def test_wrong_key_is_refused(cluster):
    t = cluster.transport()
    r = t.regions[1]
    t.regions[1] = RegionInfo(r.node, r.length, (r.rkey + 1) & 0xFFFFFFFF, r.shm_name, r.addr)
    with pytest.raises(RemoteAccessError, match="key"):
        t.execute([Read(1, 0, 8)])
    good = cluster.transport()
    assert good.execute([Read(1, 0, 8)]) == [struct.pack("<Q", MAGIC)]
    good.close()
    t.close()


def test_failure_reports_partial_results_and_flushes_the_rest(cluster):
    t = cluster.transport()
    a = data_addr(cluster, 3)
    t.execute([Write(0, a, b"A" * 8), Write(1, a, b"B" * 8)])
    with pytest.raises(RemoteAccessError) as err:
        t.execute([Read(0, a, 8), Read(0, 1 << 40, 8), Write(0, a, b"Z" * 8), Read(1, a, 8)])
    res = err.value.results
    assert res[0] == b"A" * 8 and res[3] == b"B" * 8
    assert isinstance(res[1], RemoteAccessError) and isinstance(res[2], RemoteAccessError)
    assert err.value.node == 0
    assert t.execute([Read(0, a, 8)]) == [b"A" * 8]          # the flushed WRITE never ran
    t.close()


def test_unknown_node_and_malformed_requests(cluster):
    t = cluster.transport()
    with pytest.raises(ValueError, match="no memory node"):
        t.execute([Read(7, 0, 8)])
    with pytest.raises(TypeError):
        t.execute([("READ", 0, 0, 8)])
    t.close()


def test_what_is_not_a_verb_is_refused(cluster):
    """A transport executes verbs only: an operation's Backoff or AwaitMembership is its
    driver's to interpret (fusee.driver), and one that reached a transport is a bug."""
    t = cluster.transport()
    for step in ([Backoff(0.0)], [AwaitMembership(0)]):
        with pytest.raises(TypeError, match="not a verb"):
            t.execute(step)
    t.close()


def test_large_transfers(cluster):
    t = cluster.transport()
    a = data_addr(cluster)
    blob = bytes(range(256)) * (17 * MiB // 256)                 # 17 MiB
    t.execute([Write(2, a, blob)])
    assert t.execute([Read(2, a, len(blob))]) == [blob]
    t.close()


def test_block_allocation(cluster):
    t = cluster.transport()
    m = MemoryMap.of(cluster.config.layout)
    got = t.execute([AllocBlock(0, 5), AllocBlock(0, 6), AllocBlock(1, 5)])
    assert len(set(got[:2])) == 2
    for addr in got:
        assert (addr - m.data) % cluster.config.layout.block_size == 0
    entry = m.table_entry(m.block_index(got[0]))
    assert u64(t.execute([Read(0, entry, 8)])[0]) == 5 + 1            # owner recorded in memory
    with pytest.raises(ControlError):
        t.execute([FreeBlock(0, 6, got[0])])                     # not the owner
    t.execute([FreeBlock(0, 5, got[0])])
    assert u64(t.execute([Read(0, entry, 8)])[0]) == 0
    with pytest.raises(ControlError, match="out of memory"):
        t.execute([AllocBlock(2, 1)] * (m.num_blocks + 1))
    t.close()


# -- several client processes ---------------------------------------------------------------------

def _faa_worker(config_path, backend, addr, rounds, out):
    t = connect(ClusterConfig.load(config_path), backend)
    for _ in range(rounds):
        t.execute([Faa(0, addr, 1), Faa(1, addr, 2)])
    out.put("done")
    t.close()


def _cas_worker(config_path, backend, me, addr, rounds, out):
    t = connect(ClusterConfig.load(config_path), backend)
    wins = []
    for r in range(rounds):
        if t.execute([Cas(0, addr + 8 * r, 0, me)])[0] == 0:
            wins.append(r)
    out.put((me, wins))
    t.close()


def test_concurrent_faa_counts_exactly(cluster, backend):
    if backend == "local":
        pytest.skip("in-process memory is not shared with other processes")
    n, m = 4, 300
    a = data_addr(cluster, 5)
    run_processes(_faa_worker,
               [(str(cluster.config_path), cluster.backend, a, m)] * n)
    t = cluster.transport()
    assert [u64(x) for x in t.execute([Read(0, a, 8), Read(1, a, 8)])] == [n * m, 2 * n * m]
    t.close()


def test_cas_race_has_exactly_one_winner_per_round(cluster, backend):
    if backend == "local":
        pytest.skip("in-process memory is not shared with other processes")
    n, rounds = 4, 200
    a = data_addr(cluster, 6)
    res = run_processes(_cas_worker,
                     [(str(cluster.config_path), cluster.backend, me, a, rounds)
                      for me in range(1, n + 1)])
    winners: dict[int, int] = {}
    for me, wins in res:
        for r in wins:
            assert r not in winners, f"round {r} won twice"
            winners[r] = me
    assert sorted(winners) == list(range(rounds))
    t = cluster.transport()
    words = t.execute([Read(0, a + 8 * r, 8) for r in range(rounds)])
    assert [u64(w) for w in words] == [winners[r] for r in range(rounds)]
    t.close()


def test_dead_node_times_out_and_others_serve(cluster, backend):
    t = cluster.transport(timeout=0.5)
    if backend == "local":
        cluster.memory.crash(1)
    else:
        cluster.kill(1)
    with pytest.raises(NodeTimeout) as err:
        t.execute([Read(0, 0, 8), Read(1, 0, 8), Read(2, 0, 8)])
    assert err.value.node == 1
    assert err.value.results[0] == err.value.results[2] == struct.pack("<Q", MAGIC)
    assert t.execute([Read(2, 0, 8)]) == [struct.pack("<Q", MAGIC)]
    t.close()
