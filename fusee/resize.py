"""Extendible split of a full subtable (RACE resizing, SPEC §4), done by the client whose
insert found both of its key's combined buckets full.

1. Lock the subtable: CAS its split lock on the first directory replica (``0 -> client id +
   1``). A lock already at RETIRED_LOCK means the subtable was split: refresh the directory.
2. Freeze every slot on the primary: CAS ``v -> v | FROZEN`` until each one holds. From then
   on every writer's primary CAS on this subtable fails, and every reader and writer that sees
   FROZEN re-reads the directory; writes completed before a slot froze are in the value
   frozen. Bucket headers are marked RETIRED.
3. Read the key of every object slot and copy the slot to the same position of the new
   subtable that the key's next suffix bit selects (tentative claims, tombstones and voids are
   dropped), writing both new subtables whole on all of their replicas. Their ids follow from
   the old one's place in the split tree (``fusee.index.child_ids``).
4. CAS the directory entries that named the old subtable (on every directory replica), and
   set the old subtable's lock to RETIRED_LOCK for good.

Every step is idempotent, so a recoverer (``finish``) can run steps 2-4 again for a splitter
that crashed: the frozen values are final, so the new images come out the same, and they are
only written while no directory entry names them yet (once one does, clients may be using
them).
"""

from __future__ import annotations

import struct

from fusee.errors import CorruptObject, IndexFull
from fusee.hashing import key_hash
from fusee.index import RETIRED_LOCK, child_ids, entry_word
from fusee.layout import (BUCKET_BYTES, FROZEN, RETIRED, SLOTS_PER_BUCKET, bucket_header,
                          committed_object, decode_object, pack_u64, parse_header)
from fusee.verbs import Cas, Read, Write, chunks

_HOLDER = 0xFFFFFFFF        # the lock word's low half: client id + 1 of the splitter


def split(core, sid: int, depth: int, suffix: int):
    """Generator: split subtable ``sid`` (local depth ``depth``, directory suffix ``suffix``)
    or, if someone else is at it or did it, just refresh the directory. Returns whether the
    lock was free (False: another client holds it or the split is done)."""
    geo, me = core.geo, core.client_id + 1
    if depth >= geo.dir_bits:
        raise IndexFull(f"subtable {sid} is at the directory's full depth {geo.dir_bits}")
    if max(child_ids(sid, depth, suffix, geo.initial_depth)) >= geo.max_subtables:
        raise IndexFull(f"the index area holds at most {geo.max_subtables} subtables")
    head = core.dir.replicas[0]
    (held,) = yield from core.rt([Cas(head, geo.lock(sid), 0, me)])
    if held != 0:
        yield from core.refresh()           # split done, or in progress: look again
        return False
    yield from finish(core, sid, me, fresh=True)
    return True


def holder(lock: int) -> int | None:
    """The client id holding a split lock word, or None (free or retired)."""
    if lock in (0, RETIRED_LOCK):
        return None
    return (lock & _HOLDER) - 1


def finish(core, sid: int, lock: int, fresh: bool = False):
    """Generator: steps 2-4 of the split of ``sid`` whose lock word is ``lock`` (for a
    recoverer: the crashed splitter's; for a failover: whatever the lock holds). ``fresh``
    says the caller just took the lock, so no directory entry can name the new subtables."""
    geo = core.geo
    slots, depth, suffix = yield from _freeze(core, sid, [])
    news = child_ids(sid, depth, suffix, geo.initial_depth)
    if max(news) >= geo.max_subtables:
        raise IndexFull(f"cannot finish the split of subtable {sid}: the index area holds "
                        f"at most {geo.max_subtables} subtables")
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
    head = core.dir.replicas[0]
    for batch in chunks(cas + [Cas(head, geo.lock(sid), lock, RETIRED_LOCK)]):
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
    # retired on every replica: a backup that becomes primary when this one dies must not
    # pass for a subtable in use with a client whose directory is stale
    extra = list(extra) + [Write(n, base + b * BUCKET_BYTES, retire)
                           for n in core.dir.nodes(sid) for b in range(geo.buckets)]
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

