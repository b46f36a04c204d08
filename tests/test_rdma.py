"""The verbs backend on a real RDMA device: verbs specifics and a FUSEE subset (the conformance
suite runs on it as on every backend: ``tests/test_conformance.py``, backend ``verbs``).

Memory nodes are processes (``fusee memnode --rdma``) that register their region with the
device; clients are this process and, in the multi-process tests, spawned processes. Tests
marked ``rdma`` are skipped when the host has no RDMA device (this machine and CI's host: the
kernel has none), and run in a SoftRoCE VM by ``python -m fusee.emulator.softroce.run_tests``, which
sets FUSEE_RDMA_REQUIRED=1 so that a missing device there is a failure, not a skip. The
tests without the marker check the device-independent logic and run everywhere.
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import sys

import pytest

from test_conformance import data_addr
from verbs_cluster import VERBS_LAYOUT

from fusee.emulator.cluster import LocalCluster
from fusee.emulator.rdma_device import check_peer, choose_gid, gid_rank
from fusee.verbs import Cas, Faa, Read, RemoteAccessError, Write
from fusee.transports.base import RegionInfo
from fusee.transports.rdma import detect_order, fetched_word


@pytest.fixture
def backend():
    """Every test here runs on the verbs backend (``verbs_cluster``)."""
    return "verbs"


# -- device-independent logic (runs everywhere) ------------------------------------------------

def test_gid_choice_prefers_an_ipv4_mapped_rocev2_gid():
    link_local = "fe80:0000:0000:0000:5054:00ff:fe12:3456"
    mapped = "0000:0000:0000:0000:0000:ffff:c000:0201"
    zero = "0000:0000:0000:0000:0000:0000:0000:0000"
    assert choose_gid([(0, link_local, False), (1, link_local, True), (2, mapped, False),
                       (3, mapped, True)]) == 3
    assert choose_gid([(0, link_local, True), (1, mapped, False)]) == 1
    assert choose_gid([(0, link_local, False), (1, link_local, True)]) == 1
    assert choose_gid([(0, link_local, False)]) == 0                # InfiniBand: the port GID
    assert choose_gid([(0, zero, True)]) is None and choose_gid([]) is None
    assert gid_rank("not a gid", True) == -1


def test_fetched_atomic_words_decode_in_the_nics_byte_order():
    raw = bytes([1, 2, 3, 4, 5, 6, 7, 8])                          # every byte differs
    assert fetched_word(raw, "little") == 0x0807060504030201
    assert fetched_word(raw, "big") == 0x0102030405060708
    assert detect_order(raw, raw) == "little"
    assert detect_order(raw, raw[::-1]) == "big"
    assert detect_order(raw, bytes(8)) is None                      # neither: refuse to guess
    assert detect_order(b"\x01\x02\x03\x04\x04\x03\x02\x01", b"\x01\x02\x03\x04\x04\x03\x02\x01") \
        is None                                                     # a palindrome cannot tell


@pytest.mark.parametrize("layout", ["pyverbs.libibverbs_enums", "pyverbs.enums"])
def test_both_pyverbs_enum_layouts_are_found(monkeypatch, layout):
    """Newer rdma-core has pyverbs.libibverbs_enums, older pyverbs.enums: whichever this
    pyverbs has provides the enums (stand-in modules, since one host has only one pyverbs)."""
    import types
    from fusee.emulator import rdma_device
    enums = types.ModuleType(layout)
    enums.IBV_WR_RDMA_WRITE = 0
    monkeypatch.setitem(sys.modules, "pyverbs", types.ModuleType("pyverbs"))
    for name in ("pyverbs.libibverbs_enums", "pyverbs.enums"):
        monkeypatch.setitem(sys.modules, name, enums if name == layout else None)
    monkeypatch.setattr(rdma_device, "_E", None)
    assert rdma_device.load_pyverbs() is enums


@pytest.mark.parametrize("bad", [
    None, [], {"qpn": 1},
    {"qpn": 0, "psn": 1, "lid": 0, "mtu": 3, "rd": 4, "gid": "::ffff:192.0.2.1"},
    {"qpn": 5, "psn": 1 << 24, "lid": 0, "mtu": 3, "rd": 4, "gid": "::ffff:192.0.2.1"},
    {"qpn": 5, "psn": 1, "lid": 0, "mtu": 9, "rd": 4, "gid": "::ffff:192.0.2.1"},
    {"qpn": 5, "psn": 1, "lid": 0, "mtu": 3, "rd": 0, "gid": "::ffff:192.0.2.1"},
    {"qpn": 5, "psn": 1, "lid": 0, "mtu": 3, "rd": 4, "gid": "::"},
    {"qpn": 5, "psn": 1, "lid": 0, "mtu": 3, "rd": 4, "gid": 7},
])
def test_queue_pair_info_from_the_network_is_checked(bad):
    with pytest.raises(ValueError):
        check_peer(bad)
    check_peer({"qpn": 5, "psn": 1, "lid": 0, "mtu": 3, "rd": 4, "gid": "::ffff:192.0.2.1"})


# -- verbs specifics on the device -------------------------------------------------------------

WORD = 0x0102030405060708      # bytes all differ: a byte-order mistake cannot go unnoticed


@pytest.mark.rdma
def test_atomics_fetch_words_whose_bytes_differ(cluster):
    t = cluster.transport()
    a = data_addr(cluster)
    assert set(t.orders.values()) <= {"little", "big"}
    t.execute([Write(0, a, struct.pack("<Q", WORD))])
    assert t.execute([Cas(0, a, WORD, WORD + 0x10), Faa(0, a, 0x0100)]) == [WORD, WORD + 0x10]
    assert t.execute([Read(0, a, 8)]) == [struct.pack("<Q", WORD + 0x110)]    # memory: LE
    # Decoding with the other order visibly swaps the bytes: the probed order is what works.
    other = {"little": "big", "big": "little"}[t.orders[1]]
    wrong = cluster.transport(atomic_order=other)
    wrong.execute([Write(1, a, struct.pack("<Q", WORD))])
    got = wrong.execute([Faa(1, a, 0)])[0]
    assert got == int.from_bytes(WORD.to_bytes(8, "little"), "big") != WORD
    wrong.close()
    t.close()


@pytest.mark.rdma
def test_a_chain_signals_only_its_last_work_request(cluster):
    t = cluster.transport()
    a = data_addr(cluster, 1)
    before = dict(t.rdma_stats)
    t.execute([Write(0, a, b"x" * 64)] + [Read(0, a, 64)] * 8 + [Faa(0, a + 64, 1)])
    assert t.rdma_stats["work_requests"] - before["work_requests"] == 10
    assert t.rdma_stats["completions"] - before["completions"] == 1
    t.execute([Read(n, a, 8) for n in (0, 1, 2)])                 # one chain per MN
    assert t.rdma_stats["completions"] - before["completions"] == 1 + 3
    t.close()


@pytest.mark.rdma
def test_a_chain_longer_than_the_send_queue_goes_in_windows(cluster):
    t = cluster.transport(send_depth=8)
    a = data_addr(cluster, 2)
    before = t.rdma_stats["completions"]
    assert t.execute([Faa(2, a, 1) for _ in range(50)]) == list(range(50))
    assert t.rdma_stats["completions"] - before == 7                # ceil(50 / 8) windows
    t.close()


@pytest.mark.rdma
def test_requests_larger_than_a_message_are_split(cluster):
    t = cluster.transport()
    t.max_msg = 4096                          # as if the port's maximum message were 4 KiB
    a = data_addr(cluster, 3)
    blob = os.urandom(10_000)
    before = t.rdma_stats["work_requests"]
    t.execute([Write(1, a, blob)])
    assert t.execute([Read(1, a, 10_000), Read(1, a + 4095, 2)]) == [blob, blob[4095:4097]]
    assert t.rdma_stats["work_requests"] - before == 3 + 3 + 1
    t.close()


@pytest.mark.rdma
def test_an_error_completion_reconnects_the_queue_pair(cluster):
    t = cluster.transport()
    a = data_addr(cluster, 4)
    t.execute([Write(2, a, b"kept")])
    r = t.regions[2]
    t.regions[2] = RegionInfo(r.node, r.length, r.rkey ^ 0x5A5A, r.shm_name, r.addr)
    with pytest.raises(RemoteAccessError, match="key") as err:
        t.execute([Read(0, a, 4), Read(2, a, 4), Write(2, a, b"lost")])
    assert err.value.node == 2 and isinstance(err.value.results[2], RemoteAccessError)
    assert t.execute([Read(2, a, 4), Read(0, 0, 8)])[0] == b"kept"    # a fresh QP, right key
    assert t.rdma_stats["reconnects"] == 1
    t.close()


@pytest.mark.rdma
def test_zero_length_requests(cluster):
    t = cluster.transport()
    a = data_addr(cluster, 5)
    assert t.execute([Write(0, a, b""), Read(0, a, 0), Read(0, VERBS_LAYOUT.region_size, 0)]) \
        == [None, b"", b""]
    t.close()


@pytest.mark.rdma
def test_preflight_passes_on_this_device(cluster):
    from fusee.emulator.rdma_preflight import preflight, report
    checks = preflight(config=str(cluster.config_path), region_size=VERBS_LAYOUT.region_size)
    text = report(checks)
    assert not [c for c in checks if c.status == "fail"], text
    assert {"kernel", "pyverbs", "device", "gid", "atomics", "loopback", "memlock",
            "cluster"} <= {c.name for c in checks}


# -- the FUSEE store over verbs ----------------------------------------------------------------

def _client(cluster):
    return cluster.client()


@pytest.mark.rdma
def test_fusee_four_operations(cluster):
    kv = _client(cluster)
    kv.insert(b"k", b"v1")
    assert kv.get(b"k") == b"v1"
    kv.update(b"k", b"v2")
    assert kv.get(b"k") == b"v2"
    kv.delete(b"k")
    assert kv.get(b"k") is None
    kv.put(b"k", b"v3")
    assert kv.get(b"k") == b"v3"


def _writer(config_path, me, keys, rounds, out):
    from fusee.client import Client
    kv = Client.connect(config_path)
    for r in range(rounds):
        for k in keys:
            kv.put(k, b"%d:%d" % (me, r))
    out.put(me)


@pytest.mark.rdma
def test_fusee_snapshot_under_contention(cluster):
    """Several processes write the same keys at once (SNAPSHOT decides each slot on 3
    replicas): afterwards every client agrees on each key, and it is the last round's value
    of one of the writers."""
    kv = _client(cluster)
    keys = [b"hot%d" % i for i in range(3)]
    for k in keys:
        kv.put(k, b"start")
    n, rounds = 3, 20
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(cluster.config_path), me, keys, rounds, out))
             for me in range(n)]
    for p in procs:
        p.start()
    try:
        assert sorted(out.get(timeout=300) for _ in procs) == list(range(n))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    other = cluster.client()
    for k in keys:
        value = kv.get(k)
        assert value in {b"%d:%d" % (me, rounds - 1) for me in range(n)}
        assert other.get(k) == value


@pytest.mark.rdma
def test_fusee_short_ycsb_run(cluster):
    """YCSB A (50% read, 50% update, scrambled Zipfian) on 200 keys, checked against a model."""
    from fusee.bench.ycsb import READ, WORKLOADS, OpStream, key_names, stream_rng
    kv = _client(cluster)
    keys = key_names(range(200))
    model = {}
    for i, k in enumerate(keys):
        kv.insert(k, b"v%d" % i)
        model[k] = b"v%d" % i
    codes, nums = OpStream(WORKLOADS["A"], 200, stream_rng(7, 0), insert_base=200).chunk(400)
    for step, (code, key) in enumerate(zip(codes.tolist(), key_names(nums))):
        if code == READ:
            assert kv.get(key) == model[key]
        else:
            model[key] = b"u%d" % step
            kv.update(key, model[key])
    assert all(kv.get(k) == v for k, v in model.items())



# -- fencing (the device-independent part: tests/test_fencing.py) ------------------------------

@pytest.mark.rdma
def test_a_client_the_master_expired_is_cut_off_at_every_memory_node_s_nic():
    """The verbs version of tests/test_stall_processes.py's zmq test: the client stops
    renewing its lease (as one SIGSTOPped past it would); the master expires it, fences it at
    the MNs and recovers its id. The MNs' CPUs never see its verbs, so the fence destroys its
    queue pairs: a batch that had passed the lease check (posted straight to its transport
    here) fails at its own NIC and writes nothing, and it gets no new queue pair. Generous
    timeouts: the master's first registration connects its own queue pairs, slow in the VM."""
    from fusee.memory_map import MemoryMap
    from fusee.errors import Fenced, TransportError
    from test_stall_processes import expired_client
    with LocalCluster(memnodes=3, transport="verbs", replication=3, master=True,
                      layout=VERBS_LAYOUT, start_timeout=180, client_lease=4.0,
                      mn_lease=30.0, timeout=10.0) as c:
        scratch = MemoryMap.of(c.config.layout).client_meta(15)    # no client holds id 15
        kv = expired_client(c, timeout=120)
        try:
            stale = [Write(n, scratch, b"stale!!!") for n in range(3)]
            with pytest.raises(TransportError) as failed:
                kv.transport.execute(stale)
            assert all(isinstance(r, TransportError) for r in failed.value.results), \
                failed.value.results
            with pytest.raises(Fenced):             # reconnecting is refused
                kv.transport.execute([Read(0, scratch, 8)])
        finally:
            kv.closed = True
            kv.transport.close()
        t = c.transport()
        try:
            assert b"stale!!!" not in t.execute([Read(n, scratch, 8) for n in range(3)])
        finally:
            t.close()
        with c.client() as other:
            assert other.get(b"k") == b"v"
            other.put(b"k", b"w")
