"""The public API: Client over the in-process backend and over real memory-node processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fusee import LocalCluster
from fusee.driver import run_concurrently
from fusee.errors import (CorruptObject, KeyExists, KeyNotFound, KeyTooLarge, ValueTooLarge)
from storekit import clients, config, rt


@pytest.mark.parametrize("r", [1, 2, 3])
def test_four_operations(r):
    _, (a, b) = clients(config(r=r), 2)
    assert a.get(b"k") is None
    a.insert(b"k", b"v1")
    with pytest.raises(KeyExists):
        b.insert(b"k", b"other")
    assert b.get(b"k") == b"v1"
    b.update(b"k", b"v2")
    assert a.get(b"k") == b"v2"
    a.delete(b"k")
    assert b.get(b"k") is None
    with pytest.raises(KeyNotFound):
        b.update(b"k", b"v3")
    with pytest.raises(KeyNotFound):
        b.delete(b"k")
    b.put(b"k", b"v4")
    a.put(b"k", b"v5")
    assert b.get(b"k") == b"v5"
    a.put(b"empty-value", b"")
    assert b.get(b"empty-value") == b""


def test_bad_arguments_are_rejected_before_any_verb():
    _, (kv,) = clients(config(**{"max_key_size": 16}))
    before = kv.transport.stats.verbs
    for call in (lambda: kv.get("str"), lambda: kv.insert(1, b"v"), lambda: kv.put(b"k", "v"),
                 lambda: kv.update(b"k", None), lambda: kv.delete(3.0)):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(KeyTooLarge):
        kv.insert(b"k" * 17, b"v")
    with pytest.raises(KeyTooLarge):
        kv.get(b"")
    with pytest.raises(ValueTooLarge):
        kv.insert(b"k", b"v" * (255 * 64))
    with pytest.raises(ValueTooLarge):
        kv.put(b"k", b"v" * (255 * 64))
    assert kv.transport.stats.verbs == before
    kv.insert(bytearray(b"k"), memoryview(b"v"))     # bytes-like is fine
    assert kv.get(b"k") == b"v"
    kv.insert(b"k" * 16, b"v" * (255 * 64 - 100))   # the limits themselves are accepted
    assert kv.get(b"k" * 16) == b"v" * (255 * 64 - 100)


def test_round_trip_budget_with_three_replicas():
    """docs/design.md#round-trips: SEARCH <= 2 (1 on a cache hit), INSERT <= 4, UPDATE <= 4 (5 on a
    cache miss), DELETE <= 5, from the transport's counters, no contention."""
    _, (a, b, c) = clients(config(r=3), 3)
    seen: dict[str, list[int]] = {}
    for i in range(200):
        k = b"key%d" % i
        for name, kv, fn, *args in [
                ("insert", a, a.insert, k, b"v" * 200),
                ("search hit", a, a.get, k),
                ("update hit", a, a.update, k, b"w" * 200),
                ("search cold", b, b.get, k),            # b never saw the key
                ("update miss", c, c.update, k, b"x" * 200),
                ("delete miss", a, a.delete, k) if i % 2 else ("search miss", a, a.get, k),
                ("delete hit", a, a.delete, k) if i % 2 == 0 else ("absent", a, a.get, k)]:
            seen.setdefault(name, []).append(rt(kv, fn, *args)[0])
    worst = {name: max(v) for name, v in seen.items()}
    assert worst == {"insert": 4, "search hit": 1, "update hit": 4, "search cold": 2,
                     "update miss": 5, "search miss": 2, "delete miss": 5, "delete hit": 4,
                     "absent": worst["absent"]}, worst
    assert worst["absent"] <= 2


def test_cache_bypass_for_a_key_that_keeps_changing():
    _, (reader, writer) = clients(config(r=3), 2)
    writer.insert(b"hot", b"0")
    reader.get(b"hot")
    for i in range(40):
        writer.update(b"hot", b"%d" % i)
        n, value = rt(reader, reader.get, b"hot")
        assert value == b"%d" % i and n <= 2
    assert reader.stats["cache_bypassed"] > 0 and reader.stats["cache_misses"] >= 8
    before = reader.transport.stats.bytes_in
    reader.get(b"hot")                       # bypassed: no speculative object read
    assert reader.transport.stats.bytes_in - before <= 2 * 128 + 64 * 2


def test_a_corrupted_object_is_detected():
    mem, (a, b) = clients(config(r=3), 2)
    a.insert(b"k", b"precious value")
    v = a.core.cache.get(b"k").value
    nodes, addr = a.core.alloc.replicas(v)
    for node in nodes:                          # every copy: a cached read takes the one
        mem.regions[node].mem[addr + 12] ^= 0xFF    # beside its buckets, not the home
    with pytest.raises(CorruptObject):
        b.get(b"k")
    with pytest.raises(CorruptObject):
        a.get(b"k")                          # the cached path verifies too


def test_several_operations_in_flight_on_one_client():
    _, (kv,) = clients(config(r=3))
    core = kv.core
    run_concurrently((core.insert(b"k%d" % i, b"v%d" % i) for i in range(50)), kv.transport,
                     depth=8)
    got = run_concurrently((core.search(b"k%d" % i) for i in range(50)), kv.transport)
    assert got == [b"v%d" % i for i in range(50)]


def test_close_and_context_manager():
    _, (kv,) = clients(config())
    with kv:
        kv.insert(b"k", b"v")
        kv.update(b"k", b"w")                # leaves a deferred free
    assert kv.closed
    with pytest.raises(RuntimeError):
        kv.get(b"k")
    kv.close()


def test_import_fusee_loads_no_transport():
    code = ("import sys, fusee, fusee.verbs, fusee.operations\n"
            "assert 'zmq' not in sys.modules and 'transports' not in sys.modules\n"
            "from fusee import Client, LocalCluster\n"
            "assert Client.__module__ == 'fusee.client'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_real_memory_nodes_and_another_process(backend):
    with LocalCluster(memnodes=3, transport=backend) as cluster:
        with cluster.client() as kv:
            kv.insert(b"k", b"v")
            kv.update(b"k", b"w")
            assert kv.get(b"k") == b"w"
            kv.delete(b"k")
            kv.put(b"k", b"from parent")
            code = textwrap.dedent(f"""
                from fusee import Client
                with Client.connect({str(cluster.config_path)!r}) as kv:
                    assert kv.get(b"k") == b"from parent"
                    kv.put(b"child", b"hello")
                    print(kv.client_id)
            """)
            out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                                 capture_output=True, text=True).stdout
            assert int(out) != kv.client_id
            assert kv.get(b"child") == b"hello"
            assert kv.stats["round_trips"] > 0 and kv.stats["cache_hits"] > 0
