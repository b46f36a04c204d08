"""Extendible split of a full subtable (RACE resizing, SPEC §4), done by the client whose
insert found both of its key's combined buckets full.

1. Lock the subtable: CAS its split lock on MN 0 (``0 -> client id + 1``). A lock already
   at RETIRED_LOCK means the subtable was split: refresh the directory.
2. Take two fresh subtable ids (FAA on the counter) — subtables are never reused, so no slot
   word ever returns to an old value — and record them in the lock word (``first << 32 |
   client id + 1``, with the first freezing CASes) so that recovery can finish the split.
3. Freeze every slot on the primary: CAS ``v -> v | FROZEN`` until each one holds. From then
   on every writer's primary CAS on this subtable fails, and every reader and writer that sees
   FROZEN re-reads the directory; writes completed before a slot froze are in the value
   frozen. Bucket headers are marked RETIRED.
4. Read the key of every object slot and copy the slot to the same position of the new
   subtable that the key's next suffix bit selects (tentative claims, tombstones and voids are
   dropped), writing both new subtables whole on all of their replicas.
5. CAS the directory entries that named the old subtable (on every directory replica), and
   set the old subtable's lock to RETIRED_LOCK for good.

Every step is idempotent, so a recoverer (``finish``) can run steps 3-5 again for a splitter
that crashed: the frozen values are final, so the new images come out the same, and they are
only written while no directory entry names them yet (once one does, clients may be using
them).
"""

from __future__ import annotations

import struct

from fusee.errors import CorruptObject, IndexFull
from fusee.hashing import key_hash
from fusee.index import HDR_NEXT_SUBTABLE, RETIRED_LOCK, entry_word
from fusee.layout import (BUCKET_BYTES, FROZEN, RETIRED, SLOTS_PER_BUCKET, bucket_header,
                          committed_object, decode_object, pack_u64, parse_header)
from fusee.verbs import Cas, Faa, Read, Write, chunks

_HOLDER = 0xFFFFFFFF        # the lock word's low half: client id + 1 of the splitter


def split(core, sid: int, depth: int, suffix: int):
    """Generator: split subtable ``sid`` (local depth ``depth``, directory suffix ``suffix``)
    or, if someone else is at it or did it, just refresh the directory. Returns whether the
    lock was free (False: another client holds it or the split is done)."""
    geo, me = core.geo, core.client_id + 1
    if depth >= geo.dir_bits:
        raise IndexFull(f"subtable {sid} is at the directory's full depth {geo.dir_bits}")
    (held,) = yield from core.rt([Cas(0, geo.lock(sid), 0, me)])
    if held != 0:
        yield from core.refresh()           # split done, or in progress: look again
        return False
    (first,) = yield from core.rt([Faa(0, geo.header_word(HDR_NEXT_SUBTABLE), 2)])
    if first + 2 > geo.max_subtables:
        yield from core.rt([Cas(0, geo.lock(sid), me, 0)])
        raise IndexFull(f"the index area holds at most {geo.max_subtables} subtables")
    yield from finish(core, sid, me, first, fresh=True)
    return True


def holder(lock: int) -> int | None:
    """The client id holding a split lock word, or None (free or retired)."""
    if lock in (0, RETIRED_LOCK):
        return None
    return (lock & _HOLDER) - 1


def finish(core, sid: int, lock: int, first: int | None = None, fresh: bool = False):
    """Generator: steps 3-5 of the split of ``sid`` whose lock word is ``lock`` (for a
    recoverer: the crashed splitter's). ``first`` is the first new subtable id (None: take
    it from the lock word, or draw two now when the splitter crashed before recording
    them); ``fresh`` says the caller just drew it, so no directory entry can name it yet."""
    geo = core.geo
    if first is None:
        first = lock >> 32
    if not first:
        (first,) = yield from core.rt([Faa(0, geo.header_word(HDR_NEXT_SUBTABLE), 2)])
        if first + 2 > geo.max_subtables:
            raise IndexFull(f"cannot finish the split of subtable {sid}: the index area "
                            f"holds at most {geo.max_subtables} subtables")
    recorded = (lock & _HOLDER) | first << 32
    extra = [] if lock == recorded else [Cas(0, geo.lock(sid), lock, recorded)]
    lock = recorded
    slots, depth, suffix = yield from _freeze(core, sid, extra)
    news = (first, first + 1)
    if not fresh:
        yield from core.refresh()
    named = {entry_word(s, depth + 1) for s in news}
    if fresh or not named & set(core.dir.entries):
        halves = yield from _sort(core, slots, depth)
        writes = []
        for bit, new in enumerate(news):
            img = geo.subtable_image(new, depth + 1, suffix | (bit << depth), halves[bit])
            writes += [Write(n, geo.subtable(new), img) for n in core.dir.nodes(new)]
        yield from core.rt(writes)
    old = entry_word(sid, depth)
    cas = []
    for e in range(suffix, 1 << geo.dir_bits, 1 << depth):
        new = entry_word(news[(e >> depth) & 1], depth + 1)
        cas += [Cas(n, geo.entry(e), old, new) for n in core.dir.replicas]
    for batch in chunks(cas + [Cas(0, geo.lock(sid), lock, RETIRED_LOCK)]):
        yield from core.rt(batch)          # the lock is retired last
    core.counters["splits"] += 1
    yield from core.refresh()


def _freeze(core, sid: int, extra: list):
    """Generator: freeze every slot of the subtable's primary (``extra`` requests ride on the
    first CASes); returns ({pos: value}, local depth, suffix) from its bucket headers."""
    geo = core.geo
    primary = core.dir.nodes(sid)[0]
    base = geo.subtable(sid)
    (buf,) = yield from core.rt([Read(primary, base, geo.subtable_bytes)])
    words = struct.unpack(f"<{geo.subtable_bytes // 8}Q", buf)
    _, depth, suffix, _ = parse_header(words[0])
    values = {b * SLOTS_PER_BUCKET + s: words[b * 8 + 1 + s]
              for b in range(geo.buckets) for s in range(SLOTS_PER_BUCKET)}
    todo = {p: v for p, v in values.items() if not v & FROZEN}
    retire = pack_u64(bucket_header(sid, depth, suffix, RETIRED))
    extra = list(extra) + [Write(primary, base + b * BUCKET_BYTES, retire)
                           for b in range(geo.buckets)]
    while todo or extra:
        order = list(todo)
        res = []
        for batch in chunks([Cas(primary, geo.slot_addr(sid, p), todo[p], todo[p] | FROZEN)
                             for p in order] + extra):
            res += yield from core.rt(batch)
        extra = []
        nxt = {}
        for p, old in zip(order, res):
            if old == todo[p]:
                values[p] = old
            elif old & FROZEN:
                values[p] = old
            else:
                nxt[p] = old            # a writer got there first: freeze what it wrote
        todo = nxt
    return {p: v & ~FROZEN for p, v in values.items()}, depth, suffix


def _sort(core, slots: dict[int, int], depth: int):
    """Generator: which new subtable each object slot goes to, from its key's hash."""
    objs = [(p, v) for p, v in slots.items() if committed_object(v)]
    bufs = []
    for batch in chunks([core.object_read(v) for _, v in objs]):
        bufs += yield from core.rt(batch)
    halves: tuple[dict, dict] = ({}, {})
    for (p, v), buf in zip(objs, bufs):
        obj = decode_object(buf)
        if obj is None:
            raise CorruptObject(f"subtable split: the object of slot {p} fails its checksum")
        halves[(key_hash(obj.key).low >> depth) & 1][p] = v
    return halves

