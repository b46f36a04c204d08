"""The public batch API (fusee.batch): get_many, put_many and pipeline, on real memory-node
processes: per-key results and errors, per-key order, and round trips shared between keys."""

from __future__ import annotations

import pytest

from fusee.emulator.cluster import LocalCluster
from fusee.batch import BatchError
from fusee.errors import KeyExists, KeyNotFound, KeyTooLarge


@pytest.fixture(scope="module", params=["shm", "zmq"])
def cluster(request):
    with LocalCluster(memnodes=3, transport=request.param, replication=3) as c:
        yield c


@pytest.fixture
def kv(cluster):
    with cluster.client() as client:
        yield client


def keys(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def test_put_many_then_get_many_in_key_order(kv):
    ks = keys("pm", 50)
    kv.put_many({k: b"v" + k for k in ks})
    kv.put_many([(ks[0], b"again"), (ks[1], b"again")])        # update through put
    got = kv.get_many([ks[1], b"pm-absent", *ks, ks[1]])
    assert got == [b"again", None, b"again", b"again", *(b"v" + k for k in ks[2:]), b"again"]
    assert [kv.get(k) for k in ks[2:]] == [b"v" + k for k in ks[2:]]


def test_get_many_searches_a_key_asked_twice_once(kv):
    """Gets of one key with no write between them may share one read: a key asked again in
    get_many costs no verb and no round trip of its own (a pipeline of gets would run them
    one after the other)."""
    ks = keys("twice", 3)
    kv.put_many({k: b"v" + k for k in ks})
    assert kv.get_many(ks) == [b"v" + k for k in ks]           # the cache knows them all
    verbs0, rt0 = kv.stats["verbs"], kv.stats["round_trips"]
    assert kv.get_many([ks[0], *ks, ks[2], ks[0]]) == [b"v" + k for k in
                                                       [ks[0], *ks, ks[2], ks[0]]]
    assert kv.stats["round_trips"] - rt0 == 1
    assert kv.stats["verbs"] - verbs0 == 3 * len(ks)     # a cache hit: two buckets, the object


def test_operations_on_one_key_keep_their_order(kv):
    k = b"ordered"
    with kv.pipeline() as p:
        p.insert(k, b"1").get(k).update(k, b"2").get(k).delete(k).get(k).put(k, b"3").get(k)
        p.get(b"unrelated")
    assert p.results == [None, b"1", None, b"2", None, None, None, b"3", None]


def test_each_operation_has_its_own_outcome(kv):
    kv.insert(b"taken", b"old")
    p = kv.pipeline()
    p.insert(b"taken", b"x").insert(b"fresh", b"y").update(b"nowhere", b"z").get(b"taken")
    with pytest.raises(BatchError) as e:
        p.execute()
    res = e.value.results
    assert isinstance(res[0], KeyExists) and res[1] is None
    assert isinstance(res[2], KeyNotFound) and res[3] == b"old"
    assert [i for i, _ in e.value.errors] == [0, 2]
    assert kv.get(b"fresh") == b"y" and kv.get(b"nowhere") is None
    p.delete(b"fresh").delete(b"fresh")
    out = p.execute(raise_on_error=False)
    assert out[0] is None and isinstance(out[1], KeyNotFound)


def test_bad_arguments_raise_when_queued_and_nothing_runs(kv):
    p = kv.pipeline()
    p.put(b"never", b"v")
    with pytest.raises(TypeError):
        p.get("not bytes")
    with pytest.raises(KeyTooLarge):
        p.insert(b"", b"v")
    with pytest.raises(ZeroDivisionError):
        with p:
            1 / 0                                           # noqa: B018 (raises)
    assert len(p) == 0 and kv.get(b"never") is None         # the queue was dropped
    with pytest.raises(ValueError):
        kv.pipeline(depth=0)


def test_keys_in_flight_share_round_trips(kv):
    """Each SEARCH of an absent key is one bucket read: 64 of them, 8 in flight, take 8 round
    trips (a fingerprint collision may add a candidate read now and then), not 64."""
    ks = keys("absent", 64)
    rt0 = kv.stats["round_trips"]
    assert kv.get_many(ks, depth=8) == [None] * 64
    assert kv.stats["round_trips"] - rt0 <= 12
    rt0 = kv.stats["round_trips"]
    kv.put_many([(k, k) for k in ks], depth=16)
    inserts = kv.stats["round_trips"] - rt0
    assert inserts <= 64 * 4 // 16 + 8, inserts            # an insert alone: 4 round trips
    assert kv.get_many(ks, depth=16) == ks


def test_a_closed_client_refuses_a_batch(cluster):
    kv = cluster.client()
    p = kv.pipeline().get(b"k")
    kv.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.execute()
    with pytest.raises(RuntimeError, match="closed"):
        kv.get_many([b"k"])


def test_a_queue_runs_on_the_core_the_client_has_when_it_runs(kv):
    """Operations are made when queued (checking their arguments), on the core of that
    moment; one that a settle replaced by the time the queue runs (``Client.ready``) gets
    them made again on the new core: none runs on the old one."""
    kv.put_many({b"rq-a": b"1", b"rq-b": b"2"})
    p = kv.pipeline().get(b"rq-a").put(b"rq-b", b"3").get(b"rq-b")
    old = kv.core
    old.cut_short = True                # as after an operation cut short: the next settles
    seen = (old.cache.hits, old.cache.misses)
    assert p.execute() == [b"1", None, b"3"]
    assert kv.core is not old and (old.cache.hits, old.cache.misses) == seen
    assert old.in_flight == 0 and kv.get(b"rq-b") == b"3"
