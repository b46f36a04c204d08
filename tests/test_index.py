"""RACE index: geometry, the formatted image, combined buckets, resizing by splits."""

from __future__ import annotations

import dataclasses
import gc
import random
import struct

import pytest

from fusee.config import LayoutConfig
from fusee.errors import IndexFull
from fusee.hashing import key_hash
from fusee.index import IndexGeometry, View, initial_image
from fusee.layout import (FROZEN, RETIRED, SLOTS_PER_BUCKET, TAKEN, TENTATIVE, bucket_header,
                          committed_object, make_slot, slot_fp)
from fusee.memory_map import MemoryMap
from fusee.verbs import Read
from storekit import TINY, clients, config, simulate


def test_geometry_fits_the_index_area():
    lay = LayoutConfig()
    g = IndexGeometry.of(lay)
    m = MemoryMap.of(lay)
    assert g.directory > g.lock(g.max_subtables - 1)
    assert g.subtables >= g.entry((1 << g.dir_bits) - 1) + 8
    assert g.subtable(g.max_subtables) <= m.index + lay.index_size
    assert (1 << g.dir_bits) >= g.max_subtables and g.initial_depth == 3


def test_two_candidate_buckets_are_in_different_groups():
    g = IndexGeometry.of(LayoutConfig(buckets_per_subtable=6, initial_subtables=1))
    for i in range(500):
        m1, m2 = key_hash(b"%d" % i).mains(g.mains)
        assert m1 // 2 != m2 // 2 and 0 <= m1 < g.mains and 0 <= m2 < g.mains
        for m in (m1, m2):      # a combined bucket is a main and its group's overflow
            _, first = g.combined(0, m)
            assert {first, first + 1} == {3 * (m // 2) + 1, 3 * (m // 2) + 2 * (m % 2)}


def test_a_key_hash_made_in_c_is_the_python_one():
    """Where the extension is built, calling KeyHash is one C call: the same namedtuple,
    fields and all, as the class's own (Python) ``__new__`` makes."""
    import xxhash
    import fusee.hashing as H
    keys = [b"", b"k", bytes(range(256)), *(b"%d" % i for i in range(300))]
    made = [H.key_hash.__wrapped__(k) for k in keys]
    spec = []
    for k in keys:
        h = xxhash.xxh3_128_intdigest(k)
        low = h & ((1 << 64) - 1)
        spec.append(H.KeyHash.__new__(H.KeyHash, low, h >> 64, low >> 56))
    assert made == spec and all(type(h) is H.KeyHash for h in made)
    assert [(h.low, h.high, h.fp) for h in made] == [(h.low, h.high, h.fp) for h in spec]
    assert not any(map(gc.is_tracked, made)) and all(map(gc.is_tracked, spec))


def test_a_keys_bucket_reads_made_in_c_are_the_python_ones():
    """Where the extension is built, a key's two bucket reads (not kept yet) are made in one
    C call: the same reads and first buckets as the Python spec, over geometries of 2, 3 and
    many main buckets and hashes that land both mains in one group."""
    import fusee.index as X
    from fusee.index import Directory
    assert X._READS_IN_C is not None, "the C extension is not built: build_ext --inplace"
    rng = random.Random(7)
    for buckets in (3, 6, 7, 9, 64, 3 * 1000 + 1):
        geo = dataclasses.replace(IndexGeometry.of(LayoutConfig()), buckets=buckets)
        d = Directory(geo, 3, 3)
        for _ in range(400):
            h = key_hash(rng.randbytes(rng.randint(0, 20)))
            h = h._replace(high=rng.choice([h.high, h.high & 0xFFFFFFFF, (1 << 64) - 1,
                                            h.high & ~0xFFFFFFFF | (h.high >> 32)]))
            sid, node = rng.randrange(geo.max_subtables), rng.randrange(3)
            d._reads.clear()
            made = d.bucket_reads(sid, h, node)
            assert made == (list(d.bucket_reads_py(sid, h, node)[0]),
                            d.bucket_reads_py(sid, h, node)[1])
            assert all(type(r) is Read for r in made[0])
            # what the client keeps (tens of thousands) is off the garbage collector's lists
            kept = d._reads[(h.high, sid, node)]
            assert not any(map(gc.is_tracked, (kept, *kept, *kept[0])))


def test_initial_image_names_the_initial_subtables():
    cfg = config()
    mem, (kv,) = clients(cfg)
    d = kv.core.dir
    assert sorted(set(d.entries)) == sorted({d.entries[i] for i in range(2)})
    assert {d.lookup(key_hash(b"%d" % i))[0] for i in range(100)} == {0, 1}
    pieces = initial_image(cfg.layout)
    assert all(bytes(mem.regions[1].mem[a:a + len(b)]) == b for a, b in pieces)


def test_insert_ten_times_the_initial_capacity_then_delete_it_all():
    cfg = config()
    mem, (a, b) = clients(cfg, 2)
    g = a.core.geo
    n = 10 * cfg.layout.initial_subtables * g.buckets * SLOTS_PER_BUCKET
    for i in range(n):
        a.insert(b"key-%d" % i, b"v%d" % i)
    assert a.stats["splits"] > 0
    # b's directory is stale: it notices from the frozen slots of retired subtables
    assert all(b.get(b"key-%d" % i) == b"v%d" % i for i in range(n))
    for i in range(0, n, 2):
        b.delete(b"key-%d" % i)
    assert all(a.get(b"key-%d" % i) == (None if i % 2 == 0 else b"v%d" % i) for i in range(n))


def test_full_directory_depth_is_a_clear_error():
    cfg = config(**{**TINY, "index_size": 16 * 1024})
    _, (kv,) = clients(cfg)
    with pytest.raises(IndexFull):
        for i in range(10_000):
            kv.insert(b"k%d" % i, b"v")


def test_directory_survives_a_stale_reader_and_writer():
    cfg = config(**TINY)
    _, (a, b) = clients(cfg, 2)
    b.insert(b"old", b"1")
    assert b.get(b"old") == b"1"                   # cached: subtable 0
    for i in range(200):                           # a splits the index many times
        a.insert(b"x%d" % i, b"v")
    b.update(b"old", b"2")                         # b finds out on its own
    b.insert(b"new", b"3")
    assert a.get(b"old") == b"2" and a.get(b"new") == b"3"
    assert len(set(b.core.dir.entries)) > 1       # the directory b re-read


@pytest.mark.parametrize("r", [1, 3])
def test_concurrent_inserts_while_subtables_split(r):
    cfg = config(r=r, **TINY)
    keys = [b"k%d" % i for i in range(60)]
    splits = 0
    for seed in range(6):
        sim, cores, report = simulate(cfg, seed, 4, keys, 50,
                                      {"insert": 5, "get": 2, "delete": 2})
        assert report.ok, report.explain()
        splits += sum(c.counters["splits"] for c in cores)
    assert splits > 0


def _combined(rng, sid, fp):
    """A 128-byte combined bucket: two headers (sometimes another subtable's, sometimes
    retired) and 14 random slots, many with fingerprint ``fp``, some flagged."""
    words = []
    for _ in range(2):
        words.append(bucket_header(rng.choice([sid] * 9 + [sid + 1]), 3, 5,
                                   rng.choice([0] * 9 + [RETIRED])))
        for _ in range(SLOTS_PER_BUCKET):
            v = rng.choice([0, rng.getrandbits(64),
                            make_slot(rng.choice([fp, rng.randrange(256)]), rng.randrange(256),
                                      rng.randrange(64), 64 * rng.randrange(1 << 30), 64)])
            words.append(v | rng.choice([0] * 30 + [FROZEN, TENTATIVE]))
    return struct.pack("<16Q", *words)


def _free_slot_reference(slots: dict[int, int], skip) -> int | None:
    """The free slot an insert takes, slot by slot: the free positions (not ``skip``) grouped
    by bucket, the emptiest bucket first, ties to the lower position; its lowest one."""
    buckets: dict[int, list[int]] = {}
    for p in sorted(slots):
        if not slots[p] & TAKEN and p not in skip:
            buckets.setdefault(p // SLOTS_PER_BUCKET, []).append(p)
    ranked = sorted(buckets.values(), key=lambda b: (-len(b), b[0]))
    return ranked[0][0] if ranked else None


def test_the_free_slot_an_insert_takes_is_the_lowest_of_the_emptiest_bucket():
    """View.free_slot reads TAKEN for all words at once; it must pick what the slot-by-slot
    reference picks, free values of every kind (zero, tombstones, voids) and skips included."""
    rng = random.Random(11)
    for i in range(3000):
        sid, fp = rng.randrange(4), rng.randrange(256)
        firsts = tuple(rng.sample([3 * g + rng.randrange(2) for g in range(40)], 2))
        words = list(struct.unpack("<32Q", b"".join(_combined(rng, sid, fp) for _ in range(2))))
        for w in rng.sample(range(32), rng.randrange(0, 32, 3) if i % 4 else 0):
            if w % 8:
                words[w] &= ~TAKEN              # a free value with other bits set
        view = View([struct.pack("<16Q", *words[:16]), struct.pack("<16Q", *words[16:])],
                    firsts, sid)
        slots = view.slots
        skip = rng.sample(sorted(slots), rng.choice([0, 0, 1, 3]))
        assert view.free_slot(skip) == _free_slot_reference(slots, skip), (i, skip)


def test_view_decodes_lazily_what_unpacking_every_word_gives():
    rng = random.Random(7)
    for _ in range(2000):
        sid, fp = rng.randrange(4), rng.randrange(256)
        firsts = tuple(rng.sample([3 * g + rng.randrange(2) for g in range(40)], 2))
        bufs = [_combined(rng, sid, fp) for _ in range(2)]
        slots, stale = {}, False            # the reference: every word unpacked
        for buf, first in zip(bufs, firsts):
            words = struct.unpack("<16Q", buf)
            for b in range(2):
                h = words[8 * b]
                stale |= h >> 48 != sid or bool(h >> 40 & RETIRED)
                for s in range(SLOTS_PER_BUCKET):
                    slots[(first + b) * SLOTS_PER_BUCKET + s] = words[8 * b + 1 + s]
        stale |= any(v & FROZEN for v in slots.values())
        view = View(bufs, firsts, sid)
        assert view.stale == stale
        assert view.candidates(fp) == [(p, v) for p, v in slots.items()
                                       if committed_object(v) and slot_fp(v) == fp]
        for p in [*slots, *rng.sample(range(300), 5)]:
            assert view.get(p) == slots.get(p)
        assert view.slots == slots and list(view.slots) == list(slots)


def test_two_reads_of_the_same_buckets_compare_as_their_decoded_slots_do():
    """An insert's duplicate check compares its claim MN's read with the primary's without
    decoding every slot (``View.pairs``, ``View.differs``, ``View.quiet``, ``View.frozen``):
    each must say what the slot-by-slot reference says, on reads that differ in a few words or
    not at all (headers included, which the slots do not cover)."""
    rng = random.Random(13)
    quiet = 0
    for i in range(1500):
        sid, fp = rng.randrange(4), rng.randrange(256)
        firsts = tuple(rng.sample([3 * g + rng.randrange(2) for g in range(40)], 2))
        bufs = [_combined(rng, sid, fp) for _ in range(2)]
        words = list(struct.unpack("<32Q", b"".join(bufs)))
        for w in rng.sample(range(32), rng.choice([0, 0, 1, 1, 2, 5])):
            words[w] = rng.choice([rng.getrandbits(64), words[w] ^ (1 << rng.randrange(64)),
                                   make_slot(fp, 4, 1, 64, 64)])
        a = View(bufs, firsts, sid)
        b = View([struct.pack("<16Q", *words[:16]), struct.pack("<16Q", *words[16:])],
                 firsts, sid)
        sa, sb = dict(a.slots), dict(b.slots)
        a, b = View(bufs, firsts, sid), View([b.raw[:128], b.raw[128:]], firsts, sid)
        skip = rng.choice([*sa, *sa, -1])
        assert a.pairs(b, fp, skip) == [(p, v, sb[p]) for p, v in sa.items() if p != skip
                                        and (v >> 56 == fp or sb[p] >> 56 == fp)], i
        mine = dict(sa)
        if skip in mine:
            mine[skip] = sb[skip]
        assert a.differs(b, skip) == (mine != sb), i
        # (a fingerprint in neither read, or ours: slots naming ours are many)
        qfp = rng.choice([fp, min({*range(256)} - {*a.raw[7::8], *b.raw[7::8]})])
        assert a.quiet(b, qfp, skip) == (mine == sb and not any(
            v >> 56 == qfp for p, v in sa.items() if p != skip)), i
        quiet += a.quiet(b, qfp, skip)
        assert a.frozen == any(v & FROZEN for v in sa.values())
    assert 50 < quiet < 1450, quiet         # both answers, many times


def test_the_scans_of_a_view_made_in_c_answer_what_its_python_spec_does(monkeypatch):
    """Where the extension is built, View's scans of the slots (staleness, an insert's free
    slot and duplicate check, every operation's candidates and slot values) run in C
    (``emulator/_atomic.c``): the same answers as View's Python methods, on views of every
    kind."""
    import fusee.index as index
    scans = ("_FREE_SLOT_IN_C", "_MATCHES_IN_C", "_DIFFERS_IN_C",
             "_STALE_IN_C", "_GET_IN_C", "_QUIET_IN_C")
    assert all(getattr(index, name) is not None for name in scans), \
        "the C extension is not built: build_ext --inplace"
    rng = random.Random(13)
    answers: list[list[object]] = [[], []]
    cases = []
    for _ in range(3000):
        sid, fp = rng.randrange(4), rng.randrange(256)
        firsts = tuple(rng.sample([3 * g + rng.randrange(2) for g in range(40)], 2))
        raw = [_combined(rng, sid, fp) for _ in range(2)]
        again = bytearray(b"".join(raw))        # a second read: some words changed
        for w in rng.sample(range(32), rng.choice([0, 0, 1, 2])):
            again[8 * w:8 * w + 8] = rng.randbytes(8)
        cases.append((sid, fp, firsts, raw, bytes(again), rng.random()))
    for run, answer in enumerate(answers):
        if run:
            for name in scans:
                monkeypatch.setattr(index, name, None)
        for sid, fp, firsts, raw, again, pick in cases:
            view = View(raw, firsts, sid)
            other = View([again[:128], again[128:]], firsts, sid)
            absent = min({*range(256)} - {*view.raw[7::8], *other.raw[7::8]})
            positions = index._positions(*firsts)
            skip = positions[int(pick * len(positions))]
            answer += [view.stale, other.stale, view.get(skip), view.get(int(pick * 1000)),
                       view.free_slot([skip] if pick < .5 else []), view.candidates(fp),
                       view.pairs(other, fp, skip), view.differs(other, skip),
                       view.quiet(other, fp, skip), view.quiet(other, absent, skip)]
    assert answers[0] == answers[1]
