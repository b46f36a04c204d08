"""What one client id holds on the memory nodes, read back with one-sided READs alone.

The MNs' block-allocation tables name the blocks the id owns; each block's header names its
group (the r replicas, first MN first); the home copy of a group's block (its first live one)
holds the objects carved from it in carving order, each starting with a header whose key and
value lengths give its size class, and the block's free bitmap. So reading the blocks whole
(one READ each) finds every object the id ever allocated, whatever reuse did to its log
lists, in a few round trips.

Recovery (``fusee.recovery``), a client taking over an id (``adopt``) and the leak audit
(``fusee.audit``) sort the objects by their log entries (home copy):

- HELD: a committed INSERT or UPDATE, intact, free bit clear: it is in the index, or whoever
  replaced it is about to set its free bit;
- free: everything else: never completely written, never published (pending, lost, aborted),
  a DELETE's record, taken back by its owner (used 0), or freed (bit set: ``adopt`` clears
  the bit as ``Allocator.reclaim`` does).

Carved space holding no object (reservations that were never written) is cut into free
objects, except at the end of a block, where carving goes on (the emptiest group first). Blocks the
id owns outside any complete group (a crash inside ``Allocator.grow``, before any object) go
back to their MNs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fusee.allocation import Allocator, BlockGroup, return_blocks
from fusee.layout import (BLOCK_HEADER, BLOCK_MAGIC, CLASSES, COMMITTED, DELETE, TAIL_BYTES,
                          VALID, ObjectView, decode_object, object_bytes, object_tail,
                          size_class)
from fusee.verbs import Read, chunks

_HDR = struct.Struct("<BBHI")              # an object's header: valid, 0, key len, value len
_BLOCK = struct.Struct("<QIHH")            # a block's header: magic, owner, r, index
_VALID = bytes([VALID])


@dataclass
class Carved:
    """One object carved from a block group."""
    ptr: int                        # node/address bits of its primary copy
    units: int
    group: BlockGroup
    offset: int                     # in the block
    view: ObjectView | None         # its primary copy, decoded (None: not a complete object)
    freed: bool                     # its free bit is set
    crc: int                        # the crc field of its primary copy (its identity)
    copies: list = field(default_factory=list)   # every replica's view, when read

    @property
    def held(self) -> bool:
        v = self.view
        return (v is not None and not self.freed and v.state == COMMITTED
                and v.opcode != DELETE)


@dataclass
class Holdings:
    client_id: int
    groups: list[BlockGroup] = field(default_factory=list)
    orphans: list[tuple[int, int]] = field(default_factory=list)   # (node, block address)
    objects: list[Carved] = field(default_factory=list)
    gaps: list[tuple[BlockGroup, int, int]] = field(default_factory=list)  # offset, bytes

    def allocation(self, alloc: Allocator):
        """The arguments of ``alloc.install``: groups, every object's size, the free lists
        (freed objects stay handed out for ``reclaim`` to take), the group to carve from
        next and where in it, and where the other groups' tails begin."""
        unit, end = alloc.unit, alloc.block_size
        sizes = {c.ptr: c.units for c in self.objects}
        free: dict[int, list[int]] = {}
        for c in self.objects:
            if not c.held and not c.freed:
                free.setdefault(c.units, []).append(c.ptr)
        tails = {g: off for g, off, length in self.gaps if off + length == end}
        for g in self.groups:
            tails.setdefault(g, end)
        current = max(self.groups, key=lambda g: end - tails[g], default=None)
        for g, off, length in self.gaps:
            if off + length == end:
                continue                # carving goes on there
            while length >= unit:
                units = max(c for c in CLASSES if c * unit <= length)
                p = alloc.ptr(g.nodes[0], g.addrs[0] + off)
                sizes[p] = units
                free.setdefault(units, []).append(p)
                off += units * unit
                length -= units * unit
        rest = [(g, b) for g, b in tails.items() if g != current and b + unit <= end]
        return self.groups, sizes, free, current, tails.get(current, 0), rest


def scan(alloc: Allocator, copies: bool = False):
    """Generator: the Holdings of ``alloc.client_id`` (its geometry from ``alloc``); with
    ``copies`` every replica of every block is read too (recovery wants each replica's log
    entries: a crash can leave their commit records different)."""
    mmap_, cid = alloc.map, alloc.client_id
    found = Holdings(cid)
    dead = alloc.membership.dead
    live = [m for m in range(alloc.n) if m not in dead]
    tables = yield [Read(m, mmap_.table, 8 * mmap_.num_blocks) for m in live]
    owned = [(m, mmap_.block_addr(i)) for m, buf in zip(live, tables)
             for i, w in enumerate(struct.unpack(f"<{mmap_.num_blocks}Q", buf)) if w == cid + 1]
    if not owned:
        return found
    heads = []
    for batch in chunks([Read(n, a, BLOCK_HEADER) for n, a in owned]):
        heads += yield batch
    header = {}
    for (n, a), buf in zip(owned, heads):
        magic, owner, r, index = _BLOCK.unpack_from(buf)
        if magic == BLOCK_MAGIC and owner == cid and 0 < r <= (BLOCK_HEADER - 16) // 8:
            reps = tuple(divmod(w, 1 << 48) for w in
                         struct.unpack_from(f"<{r}Q", buf, _BLOCK.size))
            header[(n, a)] = (index, reps)
    in_group = set()
    for (n, a), (index, reps) in header.items():
        # a group is complete when every replica on a live MN says so; it is found once,
        # from its first live replica
        mine = [rep for rep in reps if rep[0] not in dead]
        if mine and mine[0] == (n, a) and reps[index] == (n, a) and all(
                header.get(rep) == (i, reps) for i, rep in enumerate(reps) if rep[0] not in dead):
            found.groups.append(BlockGroup(tuple(x for x, _ in reps),
                                           tuple(y for _, y in reps)))
            in_group.update(mine)
    found.orphans = [b for b in owned if b not in in_group]
    groups = found.groups
    where = [[(x, y) for x, y in zip(g.nodes, g.addrs) if x not in dead] for g in groups]
    if not copies:
        where = [w[:1] for w in where]
    bufs = []
    for batch in chunks([Read(x, y, alloc.block_size) for w in where for x, y in w]):
        bufs += yield batch
    i = 0
    for g, w in zip(groups, where):
        block, others = bufs[i], bufs[i + 1:i + len(w)]
        i += len(w)
        _parse(found, alloc, g, block, others)
    return found


def _parse(found: Holdings, alloc: Allocator, g: BlockGroup, block: bytes, others) -> None:
    unit, end = alloc.unit, alloc.block_size
    bitmap = int.from_bytes(block[BLOCK_HEADER:BLOCK_HEADER + alloc.bitmap_bytes], "little")
    off = alloc.first_object
    gap = None
    while off + unit <= end:
        valid, _, klen, vlen = _HDR.unpack_from(block, off)
        units = size_class(object_bytes(klen, vlen), unit) if valid == VALID else None
        if units is None or off + units * unit > end:
            if gap is None:
                gap = off
            nxt = block.find(_VALID, off + unit)        # unwritten space is zeros
            off = end if nxt < 0 else off + unit + (nxt - off - 1) // unit * unit
            continue
        if gap is not None:
            found.gaps.append((g, gap, off - gap))
            gap = None
        size = units * unit
        raw = block[off:off + size]
        view = decode_object(raw)
        copies = [view] + [view if b[off:off + size] == raw else decode_object(b[off:off + size])
                           for b in others]
        found.objects.append(Carved(alloc.ptr(g.nodes[0], g.addrs[0] + off), units, g, off,
                                    view, bool(bitmap >> (off // unit) & 1),
                                    object_tail(block[off + size - TAIL_BYTES:off + size])[0],
                                    copies))
        off += size
    if gap is not None:
        found.gaps.append((g, gap, end - gap))


def adopt(alloc: Allocator, log):
    """Generator: take over every block, object and free slot the id holds (after a clean
    close or a recovery): the allocator continues where the previous holder stopped, the
    objects others freed meanwhile are reclaimed, orphan blocks go back to the MNs. The log
    lists start again from new heads. Returns the Holdings."""
    found = yield from scan(alloc)
    yield from return_blocks(alloc.client_id, found.orphans)
    alloc.install(*found.allocation(alloc))
    for c in found.objects:
        if c.view is not None:
            log.seq[c.units] = max(log.seq.get(c.units, 0), c.view.seq + 1)
    if any(c.freed for c in found.objects):
        yield from alloc.reclaim()
    return found
