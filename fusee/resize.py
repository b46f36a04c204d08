"""Extendible split of a full subtable (RACE resizing), done by the client whose insert
found both of its key's combined buckets full.

1. Lock the subtable: CAS its split lock on the first directory replica (``0 -> client id +
   1``). A lock already at RETIRED_LOCK means the subtable was split: refresh the directory.
2. Freeze every slot on the primary: CAS ``v -> v | FROZEN`` until each one holds. From then
   on every writer's primary CAS on this subtable fails, and every reader and writer that sees
   FROZEN re-reads the directory; writes completed before a slot froze are in the value
   frozen. Bucket headers are marked RETIRED on every replica. Then every backup slot takes
   the primary's frozen value: a SNAPSHOT round open on the slot ends there (its writer sees
   FROZEN and starts over), and the values the split copies are on every replica, so a
   failover that loses the primary keeps exactly them (``fusee.failover``).
3. Read the key of every object slot and copy the slot to the same position of the new
   subtable that the key's next suffix bit selects (tentative claims, tombstones and voids are
   dropped), writing both new subtables whole on all of their replicas. Their ids follow from
   the old one's place in the split tree (``fusee.index.child_ids``).
4. Publish: CAS every directory entry of the old subtable's range (on every directory
   replica) that is not yet deeper than it to the new subtable it selects, and set the old
   subtable's lock to RETIRED_LOCK for good.

Every step is idempotent, so a recoverer or a failover (``finish``) can run steps 2-4 again
for a splitter that crashed or paused for good: the frozen values are final, so the new
images come out the same, and each is written only on the replicas that do not hold it yet
(one that does may be in use: the directory replicas that published it may have died with an
MN). A lock can be lost with the MN that held it; a client that then locks a subtable split
long ago finds everything done and changes nothing.

Directory entries only ever get deeper. A new subtable can be split before the split that
made it has published every entry of its range (clients reach it through the entries already
published): its step 4 then takes the entries still naming an ancestor too, so no entry is
left naming a retired subtable whatever order the two splits finish in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusee.op_core import OpCore

import struct

from fusee.errors import CorruptObject, IndexFull
from fusee.hashing import key_hash
from fusee.index import RETIRED_LOCK, child_ids, entry_word
from fusee.layout import (BUCKET_BYTES, FROZEN, RETIRED, SLOTS_PER_BUCKET, bucket_header,
                          committed_object, decode_object, pack_u64, parse_header, unpack_u64)
from fusee.verbs import Cas, Op, Read, Request, Write, chunks

_HOLDER = 0xFFFFFFFF        # the lock word's low half: client id + 1 of the splitter


def split(core: OpCore, sid: int, depth: int, suffix: int) -> Op[bool]:
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
    yield from finish(core, sid, me)
    return True


def holder(lock: int) -> int | None:
    """The client id holding a split lock word, or None (free or retired)."""
    if lock in (0, RETIRED_LOCK):
        return None
    return (lock & _HOLDER) - 1


def finish(core: OpCore, sid: int, lock: int) -> Op[None]:
    """Generator: steps 2-4 of the split of ``sid`` whose lock word is ``lock`` (the caller's
    own; for a recoverer: the crashed splitter's; for a failover: whatever the lock holds)."""
    geo = core.geo
    slots, depth, suffix = yield from _freeze(core, sid, [])
    news = child_ids(sid, depth, suffix, geo.initial_depth)
    if max(news) >= geo.max_subtables:
        raise IndexFull(f"cannot finish the split of subtable {sid}: the index area holds "
                        f"at most {geo.max_subtables} subtables")
    # every directory replica (a crashed finisher may have published on some of them only),
    # and the last bucket header of each new subtable on each of its replicas: a replica
    # that holds the image may be in use (even if no live directory replica says so: the
    # ones that did may have died), so it is never written again
    nodes = core.dir.replicas
    places = [(bit, new, n) for bit, new in enumerate(news) for n in core.dir.nodes(new)]
    last = (geo.buckets - 1) * BUCKET_BYTES
    bufs = yield from core.rt([core.dir.read()._replace(node=n) for n in nodes] +
                              [Read(n, geo.subtable(new) + last, 8) for _, new, n in places])
    core.dir.load(bufs[0])
    tables = [struct.unpack(f"<{1 << geo.dir_bits}Q", b) for b in bufs[:len(nodes)]]
    missing = [(bit, new, n) for (bit, new, n), raw in zip(places, bufs[len(nodes):])
               if parse_header(unpack_u64(raw))[:3] != (new, depth + 1, suffix | bit << depth)]
    if missing:
        halves = yield from _sort(core, slots, depth)
        yield from core.rt([Write(n, geo.subtable(new), geo.subtable_image(
            new, depth + 1, suffix | bit << depth, halves[bit])) for bit, new, n in missing])
    span = range(suffix, 1 << geo.dir_bits, 1 << depth)
    yield from _publish(core, dict(zip(nodes, tables)), span, depth, news)
    head = core.dir.replicas[0]
    yield from core.rt([Cas(head, geo.lock(sid), lock, RETIRED_LOCK)])     # retired last
    core.counters["splits"] += 1
    yield from core.refresh()


def _depth(entry: int) -> int:
    return (entry >> 32) & 0xFF


def _publish(core: OpCore, tables: dict[int, tuple[int, ...]], span: range, depth: int,
             news: tuple[int, int]) -> Op[None]:
    """Generator: step 4's directory CASes: every entry of ``span`` (the old subtable's range)
    on every directory replica (``tables``: its entries, by MN) that is not deeper than
    ``depth`` (it names the old subtable, or an ancestor whose split has not published it
    yet) takes the word of the new subtable it selects. A CAS that finds another shallow
    value is made again from that value."""
    geo = core.geo
    words = [entry_word(new, depth + 1) for new in news]
    todo = [Cas(n, geo.entry(e), table[e], words[(e >> depth) & 1])
            for n, table in tables.items() for e in span if _depth(table[e]) <= depth]

    def again(c: Cas, old: int) -> bool:
        # entries only get deeper: one at depth + 1 names the subtable we made
        assert _depth(old) != depth + 1 or old == c.desired, (hex(old), c)
        return _depth(old) <= depth
    yield from _cas_until(core, todo, again)


def _cas_until(core: OpCore, cases: list[Cas], again: Callable[[Cas, int], bool]
               ) -> Op[None]:
    """Generator: post the CASes; each that fails is made again from the value it found, as
    long as ``again(cas, found)`` says so."""
    while cases:
        res: list[int] = []
        for batch in chunks(cases):
            res += yield from core.rt(batch)
        cases = [c._replace(expected=old) for c, old in zip(cases, res)
                 if old != c.expected and again(c, old)]


def _freeze(core: OpCore, sid: int, extra: list[Request]
            ) -> Op[tuple[dict[int, int], int, int]]:
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
        res: list[int] = []
        for batch in chunks([Cas(primary, geo.slot_addr(sid, p), todo[p], todo[p] | FROZEN)
                             for p in order] + extra):
            res += yield from core.rt(batch)
        extra = []
        nxt: dict[int, int] = {}
        for p, old in zip(order, res):
            if old == todo[p]:
                values[p] = old
            elif old & FROZEN:
                values[p] = old
            else:
                nxt[p] = old            # a writer got there first: freeze what it wrote
        todo = nxt
    slots = {p: v & ~FROZEN for p, v in values.items()}
    yield from _freeze_backups(core, sid, slots)
    return slots, depth, suffix


def _freeze_backups(core: OpCore, sid: int, slots: dict[int, int]) -> Op[None]:
    """Generator: every backup slot of ``sid`` takes the value the primary froze (``slots``,
    without the FROZEN bit). Nobody changes a frozen backup (a proposal CAS expects an
    unfrozen old value, a winner's fix-up skips frozen values), so each CAS that fails is
    made again from the value it found until it holds."""
    geo = core.geo
    todo = [Cas(n, geo.slot_addr(sid, p), v, v | FROZEN)
            for n in core.dir.nodes(sid)[1:] for p, v in slots.items()]

    def again(c: Cas, old: int) -> bool:
        # a slot has one frozen value: the one its primary froze
        assert not old & FROZEN or old == c.desired, (hex(old), c)
        return not old & FROZEN
    yield from _cas_until(core, todo, again)


def _sort(core: OpCore, slots: dict[int, int], depth: int
          ) -> Op[tuple[dict[int, int], dict[int, int]]]:
    """Generator: which new subtable each object slot goes to, from its key's hash."""
    objs = [(p, v) for p, v in slots.items() if committed_object(v)]
    bufs: list[bytes] = []
    for batch in chunks([core.object_read(v) for _, v in objs]):
        bufs += yield from core.rt(batch)
    halves: tuple[dict[int, int], dict[int, int]] = ({}, {})
    for (p, v), buf in zip(objs, bufs):
        obj = decode_object(buf)
        if obj is None:
            raise CorruptObject(f"subtable split: the object of slot {p} fails its checksum")
        halves[(key_hash(obj.key).low >> depth) & 1][p] = v
    return halves

