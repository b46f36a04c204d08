"""A SEARCH's cache hit judged in C (``search_hit`` in emulator/_atomic.c) gives what its
Python spec, ``fusee.search.hit_value``, gives: the value or None, on hits and on every way
a round can miss (stale or retired buckets, another value in the slot, a slot the buckets do
not hold, damaged, foreign, reused or torn objects)."""

from __future__ import annotations

import random
import struct

from isal.isal_zlib import crc32

import pytest

from fusee import index as X
from fusee import layout as L
from fusee import search as S
from fusee.emulator.cluster import LocalCluster
from fusee.layout import (FROZEN, LOG_BYTES, RETIRED, SLOTS_PER_BUCKET, TENTATIVE,
                          bucket_header, encode_object, make_slot, object_bytes, size_class)


def _buckets(rng: random.Random, sid: int, fp: int) -> list[int]:
    """The 32 words of two combined buckets: headers mostly of ``sid``, random slots."""
    words = []
    for _ in range(4):
        words.append(bucket_header(rng.choice([sid] * 19 + [sid + 1]), 3, 5,
                                   rng.choice([0] * 19 + [RETIRED])))
        for _ in range(SLOTS_PER_BUCKET):
            v = rng.choice([0, rng.getrandbits(64) & ~FROZEN,
                            make_slot(fp, rng.randrange(1, 256), rng.randrange(64),
                                      64 * rng.randrange(1 << 30), 64)])
            words.append(v | rng.choice([0] * 60 + [FROZEN, TENTATIVE]))
    return words


def _case(rng: random.Random) -> tuple:
    """A SEARCH's first round with a speculation: (key, sid, firsts, pos, value, res)."""
    sid, fp = rng.randrange(4), rng.randrange(256)
    firsts = tuple(rng.sample([3 * g + rng.randrange(2) for g in range(40)], 2))
    words = _buckets(rng, sid, fp)
    key = rng.randbytes(rng.randint(1, 40))
    data = rng.randbytes(rng.choice([0, 8, 1000, rng.randint(0, 3000)]))
    seq = rng.getrandbits(16)
    size = size_class(object_bytes(len(key), len(data)), 64) * 64
    value = make_slot(fp, size // 64, rng.randrange(64), 64 * rng.randrange(1 << 30), 64, seq)
    word = rng.choice([w for w in range(32) if w % 8])
    pos = (firsts[word >> 4] + (word >> 3 & 1)) * SLOTS_PER_BUCKET + (word & 7) - 1
    if rng.random() < .9:
        words[word] = value                     # the slot still names the object
    if rng.random() < .05:
        pos = rng.choice([-1, 0, 7 * 200, pos + 7 * 2])      # a slot elsewhere
    obj = bytearray(encode_object(
        rng.choice([key] * 9 + [key[:-1] + b"!"]), data, size, rng.randint(1, 3),
        rng.getrandbits(46), rng.getrandbits(46),
        seq if rng.random() < .9 else seq + rng.randrange(1, 1 << 16)))    # reused memory
    if rng.random() < .15:                      # damage anywhere: the crc, the header...
        obj[rng.randrange(size)] ^= 1 << rng.randrange(8)
    if rng.random() < .1:                       # a torn commit record does not matter
        obj[size - LOG_BYTES + 16 + rng.randrange(24)] ^= 0xFF
    if rng.random() < .05:
        obj = bytearray(rng.randbytes(rng.choice([0, 8, 56, 64, 128])))
    raw = struct.pack("<32Q", *words)
    res = [raw[:128], raw[128:], bytes(obj)]
    if rng.random() < .03:                      # not bytes, or not 128 + 128 of them
        res = rng.choice([[bytearray(raw[:128]), memoryview(raw[128:]), bytes(obj)],
                          [raw[:100], raw[100:], bytearray(obj)], [raw[:120], raw[128:], b""]])
    return key, sid, firsts, pos, value, res


def test_the_hit_judged_in_c_is_the_python_spec_s_on_every_round(monkeypatch):
    assert S._HIT_IN_C is not None, "the C extension is not built: build_ext --inplace"
    for module, name in ((L, "_DECODE_IN_C"), (X, "_STALE_IN_C"), (X, "_GET_IN_C")):
        monkeypatch.setattr(module, name, None)     # the spec all in Python
    rng = random.Random(21)
    answers = []
    for i in range(4000):
        key, sid, firsts, pos, value, res = _case(rng)
        try:
            want = S.hit_value(key, sid, firsts, pos, value, res)
        except ValueError:                      # not a View's bytes: the View says so
            want = None
        except TypeError:       # compiled, hit_value's annotations refuse all but bytes
            continue            # first (no transport delivers another type)
        got = S._HIT_IN_C(crc32, res[0], res[1], res[2], firsts[0], firsts[1], sid, pos,
                          value, key)
        assert got == want, (i, got, want)
        assert got is None or type(got) is bytes
        answers.append(got)
    hits = sum(a is not None for a in answers)
    assert 600 < hits < 3400, hits              # both answers, many times


@pytest.mark.parametrize("in_c", [True, False])
def test_a_client_s_cached_gets_hit_and_miss_alike_with_or_without_the_c_helper(
        monkeypatch, in_c):
    """Gets of cached keys hit (one round trip each); once another client moved a key's
    object, the cached get misses and still finds the new value: with the C helper and
    with its Python spec, the same round trips and cache outcomes."""
    if not in_c:
        monkeypatch.setattr(S, "_HIT_IN_C", None)
    keys = [b"hit-%d" % i for i in range(40)]
    with LocalCluster(memnodes=3, transport="shm", replication=3) as cluster:
        with cluster.client() as kv, cluster.client() as other:
            kv.put_many([(k, b"v1" * 300) for k in keys])
            kv.get_many(keys)                   # the cache learns every slot
            cache, stats = kv.core.cache, kv.transport.stats
            hits, trips = cache.hits, stats.round_trips
            assert [kv.get(k) for k in keys] == [b"v1" * 300] * len(keys)
            assert (cache.hits - hits, stats.round_trips - trips) == (40, 40)
            for k in keys[::2]:
                other.update(k, b"v2" * 300)
            misses, trips = cache.misses, stats.round_trips
            assert [kv.get(k) for k in keys] == [b"v2" * 300, b"v1" * 300] * 20
            assert (cache.misses - misses, stats.round_trips - trips) == (20, 60)
