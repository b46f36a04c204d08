"""Two-level memory management (SPEC §7).

MN level: a *block group* is one data block on each of the r MNs that replicate the objects
carved from it, obtained with AllocBlock control requests (the only work of an MN's CPU, off
the fast path). Every block starts with a header (owner, the group's replica list) and a free
bitmap with one bit per allocation unit; objects follow.

Client level: a slab over the client's groups with size classes (``layout.CLASSES``). Each
class keeps a FIFO of free objects and one *reserved* object, the class's next allocation, so
that an object's log entry can name its successor before it is written. Any client frees any
object by setting the bit of its first unit with one FAA on the primary block; the owner
reclaims its freed objects by reading its bitmaps and clearing the bits (FAA of minus the bits)
before it reuses them, so a later free can never carry into a neighbour's bit.

Operations of one client in flight together (``driver.run_concurrently``) share its allocator.
Only one of them reclaims or grows at a time; the others pause (empty batches) and then use
what it got, so K operations that run out at once take one new group, not K, and no freed
object is reclaimed twice. A group that cannot fit an object keeps its tail for smaller ones.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import NamedTuple

from fusee.errors import OutOfMemory
from fusee.index import replica_nodes
from fusee.layout import (BLOCK_HEADER, MAX_REPLICAS, META_GROUPS, META_RECORDS,
                          NODE_MASK, NODE_SHIFT, ADDR_MASK, encode_block_header, group_record,
                          pack_u64)
from fusee.memory_map import MemoryMap
from fusee.verbs import MASK64, AllocBlock, ControlError, Faa, FreeBlock, Read, Write, chunks

#: empty batches an operation waits for another's reclaim or growth before calling it stuck
#: (when driven together it takes a few round trips; only a driver that stopped driving one
#: operation of a client while running another can get here)
MAX_PAUSES = 100_000


class BlockGroup(NamedTuple):
    nodes: tuple[int, ...]          # nodes[0] holds the primary copy and the live bitmap
    addrs: tuple[int, ...]


class Allocator:
    def __init__(self, mmap_: MemoryMap, unit: int, n_nodes: int, r: int, client_id: int,
                 meta_nodes: list[int]):
        if r > MAX_REPLICAS:
            raise ValueError(f"at most {MAX_REPLICAS} data replicas")
        self.map, self.unit, self.n, self.r = mmap_, unit, n_nodes, r
        self.client_id, self.meta_nodes = client_id, meta_nodes
        self.block_size = mmap_.layout.block_size
        units = self.block_size // unit
        self.bitmap_bytes = -(-units // 64) * 8
        self.first_object = -(-(BLOCK_HEADER + self.bitmap_bytes) // unit) * unit
        self.groups: list[BlockGroup] = []
        self.by_block: dict[tuple[int, int], BlockGroup] = {}
        self.free: dict[int, deque[int]] = {}
        self.sizes: dict[int, int] = {}         # ptr -> units, for objects handed out
        self.pending: dict[int, int] = {}       # class -> reserved next object
        self.current: BlockGroup | None = None
        self.bump = 0
        self.tails: list[list] = []             # [group, bump] of earlier groups with room
        self.busy = False                       # an operation is reclaiming or growing
        self.data = mmap_.data
        self.next_primary = client_id % n_nodes
        self.stats = {"blocks": 0, "reclaimed": 0}

    # -- pointers --------------------------------------------------------------------------
    def ptr(self, node: int, addr: int) -> int:
        return (node << NODE_SHIFT) | (addr // self.unit)

    def where(self, ptr: int) -> tuple[int, int]:
        return (ptr >> NODE_SHIFT) & NODE_MASK, (ptr & ADDR_MASK) * self.unit

    def block_of(self, addr: int) -> int:
        return addr - (addr - self.data) % self.block_size

    def replicas(self, ptr: int) -> list[tuple[int, int]]:
        """(node, addr) of every copy of an object of this client, primary first."""
        node, addr = (ptr >> NODE_SHIFT) & NODE_MASK, (ptr & ADDR_MASK) * self.unit
        off = (addr - self.data) % self.block_size
        g = self.by_block[(node, addr - off)]
        return [(n, a + off) for n, a in zip(g.nodes, g.addrs)]

    # -- allocation ------------------------------------------------------------------------
    def _take(self, units: int) -> int | None:
        q = self.free.get(units)
        if q:
            return q.popleft()
        size = units * self.unit
        for tail in self.tails:                 # older space first
            g, bump = tail
            if bump + size <= self.block_size:
                tail[1] = bump + size
                if tail[1] + self.unit > self.block_size:
                    self.tails.remove(tail)
                break
        else:
            g, bump = self.current, self.bump
            if g is None or bump + size > self.block_size:
                return None
            self.bump = bump + size
        p = self.ptr(g.nodes[0], g.addrs[0] + bump)
        self.sizes[p] = units
        return p

    def _room(self, size: int) -> bool:
        return (self.current is not None and self.bump + size <= self.block_size
                or any(b + size <= self.block_size for _, b in self.tails))

    def ready(self, units: int) -> bool:
        """An allocation of this class can proceed without talking to the MNs."""
        if units not in self.pending and (p := self._take(units)) is not None:
            self.pending[units] = p
        return units in self.pending and (bool(self.free.get(units))
                                          or self._room(units * self.unit))

    def alloc(self, units: int) -> tuple[int, int]:
        """(object, the class's next object); call after ``ensure(units)``."""
        p = self.pending.pop(units)
        nxt = self._take(units)
        assert nxt is not None, "ensure() not called"
        self.pending[units] = nxt
        return p, nxt

    def ensure(self, units: int):
        """Generator: make ``alloc(units)`` possible, reclaiming or getting blocks if needed
        (or waiting for the operation in flight that is doing so, and looking again)."""
        reclaimed = False
        while not self.ready(units):
            if self.busy:
                yield from self._wait()
            elif self.groups and not reclaimed:
                reclaimed = True
                yield from self.reclaim()
            else:
                yield from self.grow()

    def _wait(self):
        """Generator: pause until no operation of this client is reclaiming or growing."""
        for _ in range(MAX_PAUSES):
            if not self.busy:
                return
            yield []
        raise RuntimeError("another operation of this client never finished reclaiming or "
                           "growing its memory: drive every operation in flight to its end")

    def _alone(self, work):
        """Generator: run ``work`` (a reclaim or a growth) while no other operation of this
        client does either."""
        yield from self._wait()
        self.busy = True
        try:
            return (yield from work)
        finally:
            self.busy = False

    def release(self, ptr: int) -> None:
        """Return an object of ours that no other client can reach (never published)."""
        self.free.setdefault(self.sizes[ptr], deque()).append(ptr)

    def free_request(self, ptr: int) -> Faa:
        """The FAA that frees any client's object: sets the bit of its first unit."""
        node, addr = (ptr >> NODE_SHIFT) & NODE_MASK, (ptr & ADDR_MASK) * self.unit
        off = (addr - self.data) % self.block_size
        bit = off // self.unit
        return Faa(node, addr - off + BLOCK_HEADER + (bit >> 6) * 8, 1 << (bit & 63))

    # -- MN level --------------------------------------------------------------------------
    def grow(self):
        """Generator: get a block group (one block on each of r MNs) and record it."""
        return self._alone(self._grow())

    def _grow(self):
        nodes = replica_nodes(self.next_primary, self.n, self.r)
        self.next_primary = (self.next_primary + 1) % self.n
        try:
            addrs = yield [AllocBlock(n, self.client_id) for n in nodes]
        except ControlError as e:
            got = [(n, a) for n, a in zip(nodes, e.results or []) if isinstance(a, int)]
            if got:
                yield [FreeBlock(n, self.client_id, a) for n, a in got]
            raise OutOfMemory(f"no data block left: {e}") from None
        g = BlockGroup(tuple(nodes), tuple(addrs))
        reps = list(zip(nodes, addrs))
        writes = [Write(n, a, encode_block_header(self.client_id, i, reps) +
                        bytes(self.bitmap_bytes)) for i, (n, a) in enumerate(reps)]
        i = len(self.groups)
        for m in self.meta_nodes:
            meta = self.map.client_meta(self.client_id)
            if META_RECORDS + 8 * (i + 1) <= self.map.layout.client_meta_size:
                writes.append(Write(m, meta + META_RECORDS + 8 * i,
                                    pack_u64(group_record(nodes[0], addrs[0]))))
            writes.append(Write(m, meta + META_GROUPS, pack_u64(i + 1)))
        yield writes
        self.groups.append(g)
        self.by_block[(nodes[0], addrs[0])] = g
        if self.current is not None and self.bump + self.unit <= self.block_size:
            self.tails.append([self.current, self.bump])
        self.current, self.bump = g, self.first_object
        self.stats["blocks"] += 1

    def reclaim(self):
        """Generator: take back the objects other clients (or we) freed in our blocks."""
        return self._alone(self._reclaim())

    def _reclaim(self):
        groups = list(self.groups)
        bufs = yield [Read(g.nodes[0], g.addrs[0] + BLOCK_HEADER, self.bitmap_bytes)
                      for g in groups]
        clears, found = [], []
        for g, buf in zip(groups, bufs):
            words = struct.unpack(f"<{self.bitmap_bytes // 8}Q", buf)
            first = self.ptr(g.nodes[0], g.addrs[0])        # + bit: the object at that unit
            for w, word in enumerate(words):
                mask = 0
                while word:
                    low = word & -word
                    word ^= low
                    p = first + w * 64 + low.bit_length() - 1
                    if p in self.sizes:     # unknown objects are left for recovery
                        mask |= low
                        found.append(p)
                if mask:
                    clears.append(Faa(g.nodes[0], g.addrs[0] + BLOCK_HEADER + 8 * w,
                                      -mask & MASK64))
        if clears:
            # used = 0 on each object first (same MN, posting order): whoever wonders later
            # whether a free was delivered (recovery) sees that it was, even after the bit
            # is cleared (fusee.recovery)
            for batch in chunks([Write(*self.last_byte(p), b"\0") for p in found] + clears):
                yield batch
        for p in found:
            self.release(p)
        self.stats["reclaimed"] += len(found)

    def last_byte(self, ptr: int) -> tuple[int, int]:
        """(node, address) of the used byte of one of our objects' primary copy."""
        node, addr = self.where(ptr)
        return node, addr + self.sizes[ptr] * self.unit - 1

    def install(self, groups: list[BlockGroup], sizes: dict[int, int],
                free: dict[int, list[int]], current: BlockGroup | None, bump: int,
                tails=()) -> None:
        """Take over an allocation state rebuilt from the memory nodes (fusee.holdings):
        every object ever carved from ``groups`` (``sizes``), those free, and where carving
        goes on (``current`` at ``bump``, and the (group, bump) ``tails`` of the others)."""
        self.groups = list(groups)
        self.by_block = {(g.nodes[0], g.addrs[0]): g for g in self.groups}
        self.sizes = dict(sizes)
        self.free = {u: deque(ps) for u, ps in free.items() if ps}
        self.pending = {}
        self.current, self.bump = current, bump
        self.tails = [[g, b] for g, b in tails]
        self.stats["blocks"] = len(self.groups)
