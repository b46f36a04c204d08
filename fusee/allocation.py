"""Two-level memory management (docs/design.md#two-level-allocation).

MN level: a *block group* is one data block on each of the r MNs that replicate the objects
carved from it (``replica_nodes`` of its first MN, every copy at the same address), obtained
with AllocBlock control requests (the only work of an MN's CPU, off the fast path). Every block
starts with a header (owner, the group's replica list) and a free bitmap with one bit per
allocation unit; objects follow. An object's pointer names the group's first MN; under a
membership with dead MNs its copies are on the live members of the list and its *home* (the
copy readers read, the bitmap frees go to) is the first of them (a cached SEARCH reads
the copy on its buckets' MN instead, ``ClientCore.object_read``). A free that went to a home
that died is lost with it: that object is never reclaimed (the audit counts such objects).

Client level: a slab over the client's groups with size classes (``layout.CLASSES``). Each
class keeps a FIFO of free objects and one *reserved* object, the class's next allocation, so
that an object's log entry can name its successor before it is written. Any client frees any
object by setting the bit of its first unit with one FAA on the primary block; the owner
reclaims its freed objects by reading its bitmaps and clearing the bits (FAA of minus the bits)
before it reuses them, so a later free can never carry into a neighbour's bit.

While one of a group's MNs is dead, every write of its owner into the group's home goes
between two *write marks* (``Allocator.marks``): WRITEs of the header's last word on the
home, an odd value just before it (a write under way) and the next, even, just after, in the
same batch to the same MN, so they land in that order. The values are this holder's
incarnation and a count: no two marks of any holders of the id are equal. No round trip of
their own, and no verb at all while every MN is alive. The rebuild of the dead MN reads the
marks before it copies a group online and again in its pause: a group whose mark was even
and did not move was not written meanwhile, even by a batch cut short by a crash or an
interrupt (``fusee.rebuild``).

While a rebuild of a dead MN N copies (the master's grants say so: ``follow``), the owner
writes into none of the groups N belongs to that it held when it heard but the one it was
carving from: it carves every new object from that one and from *fresh* groups, got since
(not one new group per rebuild: it never gives groups back), and reuses no freed object
(nor reclaims one: that writes its used byte) until the rebuild ends. A writer updating keys
at random would otherwise reuse freed objects all over its groups, each of which the
rebuild's pause would then copy again, whole; this way the pause copies its fresh groups
and the group of each class's reserved object (written once more), not every group it
holds. The copy is exact either way (the marks); this only keeps the pause short. Memory
freed during the rebuild waits for its end, unless no block is left: then reuse resumes at
once (``ensure``).

Operations of one client in flight together (``driver.run_concurrently``) share its allocator.
Only one of them reclaims or grows at a time; the others pause (empty batches) and then use
what it got, so K operations that run out at once take one new group, not K, and no freed
object is reclaimed twice. A group that cannot fit an object keeps its tail for smaller ones.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Callable, Iterable
from itertools import compress
from typing import Any, Final, NamedTuple

from fusee.errors import OutOfMemory
from fusee.index import LostData, replica_nodes
from fusee.membership import Membership
from fusee.layout import (BLOCK_HEADER, BLOCK_MARK, MAX_REPLICAS, META_GROUPS, META_RECORDS,
                          NODE_MASK, NODE_SHIFT, ADDR_MASK, encode_block_header, group_record,
                          pack_u64, unpack_u64)
from fusee.memory_map import MemoryMap
from fusee.verbs import (MASK64, MAX_BATCH, AllocBlock, ControlError, Faa, FreeBlock,
                         NodeTimeout, Op, Read, Request, T, TransportError, Write, chunks)

#: empty batches an operation waits for another's reclaim or growth before calling it stuck
#: (when driven together it takes a few round trips; only a driver that stopped driving one
#: operation of a client while running another can get here)
MAX_PAUSES: Final = 100_000
#: a write mark is a holder's incarnation << MARK_COUNT_BITS | its count of marks so far
MARK_COUNT_BITS: Final = 40
MARK_COUNT_MASK: Final = (1 << MARK_COUNT_BITS) - 1


class BlockGroup(NamedTuple):
    nodes: tuple[int, ...]          # nodes[0] holds the primary copy and the live bitmap
    addrs: tuple[int, ...]


def group_peers(membership: Membership, node: int, n_nodes: int, r: int) -> list[int]:
    """The live MNs that are in some block group with ``node`` (ascending). Every group of
    ``node`` that still has a live copy has its block in the table of one of them, at its
    address on ``node`` too: with ``node`` dead, they tell which of its addresses are taken
    (``Allocator._claim_group``) and where its rebuild finds its groups (``fusee.rebuild``)."""
    return sorted({x for p in range(n_nodes) if node in replica_nodes(p, n_nodes, r)
                   for x in membership.live(replica_nodes(p, n_nodes, r))})


def return_blocks(owner: int, blocks: list[tuple[int, int]]) -> Op[None]:
    """Generator: give ``blocks`` ((node, address), each owned by ``owner``) back to their
    MNs, each with its group header wiped first (its magic word; the FreeBlocks follow in
    the next round trip, as a control request may overtake a WRITE to the same MN). A
    failed growth's header left in a free block would name a group again once the block is
    claimed anew, until the new header is written over it: a rebuild in that window copies
    the stale group onto the MN it rebuilds (a block there outside any group), and a scan
    of the new owner's holdings (``fusee.holdings``) takes it for one of its groups."""
    for batch in chunks([Write(n, a, bytes(8)) for n, a in blocks]):
        yield batch
    for frees in chunks([FreeBlock(n, owner, a) for n, a in blocks]):
        yield frees


class Allocator:
    def __init__(self, mmap_: MemoryMap, unit: int, n_nodes: int, r: int, client_id: int,
                 meta_nodes: list[int], membership: Membership = Membership()) -> None:
        if r > MAX_REPLICAS:
            raise ValueError(f"at most {MAX_REPLICAS} data replicas")
        self.map, self.unit, self.n, self.r = mmap_, unit, n_nodes, r
        self.client_id, self.meta_nodes = client_id, meta_nodes
        self.block_size = mmap_.layout.block_size
        units = self.block_size // unit
        self.bitmap_bytes = -(-units // 64) * 8
        self.no_frees = bytes(self.bitmap_bytes)    # a bitmap with no bit set (``_reclaim``)
        self.first_object = -(-(BLOCK_HEADER + self.bitmap_bytes) // unit) * unit
        self.groups: list[BlockGroup] = []
        self.free: dict[int, deque[int]] = {}
        self.sizes: dict[int, int] = {}         # ptr -> units, for objects handed out
        self.pending: dict[int, int] = {}       # class -> reserved next object
        self.current: BlockGroup | None = None
        self.bump = 0
        self.tails: list[list[Any]] = []        # [group, bump] of earlier groups with room
        #: the most room a tail has (``_take`` looks at them only for a smaller object: a
        #: client's groups keep a tail each, too short for its usual objects)
        self.tail_room = 0
        self.busy = False                       # an operation is reclaiming or growing
        self.data = mmap_.data
        self.next_primary = client_id % n_nodes
        self.rng = random.Random(client_id)     # seeded: a simulation replays exactly
        self.stats = {"blocks": 0, "reclaimed": 0}
        self.orphans: list[tuple[int, int]] = []    # blocks of a growth that failed half way
        self.last_mark = 0              # the write mark last posted (``mark``)
        #: which MN a running rebuild copies to (None: none), as the client hears it
        self.news: Callable[[], int | None] | None = None
        self.rebuilding: int | None = None      # the one ``follow`` was told of last
        self.sparing = False            # N's groups are spared: see the module docstring
        self.fresh: set[BlockGroup] = set()     # groups got since the rebuild began
        self.place(membership)

    def place(self, membership: Membership) -> None:
        """Adopt a membership: where each group's live copies and home are."""
        self.membership = membership
        self.copies_of = [membership.live(replica_nodes(p, self.n, self.r))
                          for p in range(self.n)]
        self.home = [c[0] if c else None for c in self.copies_of]
        #: by a group's first MN: one of its MNs is dead, so writes into it are marked
        self.marked = [len(c) < min(self.r, self.n) for c in self.copies_of]

    def start_marks(self, incarnation: int) -> None:
        """Number this holder's write marks from its incarnation (``ClientCore.open``), so
        that no mark it posts equals one an earlier holder of the id left."""
        assert incarnation > 0
        self.last_mark = incarnation << MARK_COUNT_BITS

    def marks(self, node: int, addr: int) -> tuple[Write, Write]:
        """The write marks around a write at (``node``, ``addr``), an address of a group on
        its home: an odd one to post before it (a write under way) and the next, even, to
        post after it, to the same MN in the same batch."""
        word = self.block_of(addr) + BLOCK_MARK
        self.last_mark += 2
        assert self.last_mark & MARK_COUNT_MASK, "a holder's write marks ran out"
        return (Write(node, word, pack_u64(self.last_mark - 1)),
                Write(node, word, pack_u64(self.last_mark)))

    def follow(self, node: int | None) -> None:
        """A rebuild of MN ``node`` copies (None: none does): spare the groups of ``node``
        held now, from the next allocation on (see the module docstring). ``fresh`` then
        lists the groups got since, until the next rebuild begins."""
        if node != self.rebuilding:
            self.rebuilding, self.sparing = node, node is not None
            if node is not None:
                # the group carving goes on in counts as fresh: it holds the classes'
                # reserved objects, which the pause copies again anyway. Else every rebuild
                # would cost a client a new group, and it never gives one back: a client
                # open across many rebuilds piled them up until no block was left.
                self.fresh = {self.current} if self.current is not None else set()

    def _spared(self, g: BlockGroup | None) -> bool:
        return g is not None and self.rebuilding in g.nodes and g not in self.fresh

    # -- pointers --------------------------------------------------------------------------
    def ptr(self, node: int, addr: int) -> int:
        return (node << NODE_SHIFT) | (addr // self.unit)

    def where(self, ptr: int) -> tuple[int, int]:
        return (ptr >> NODE_SHIFT) & NODE_MASK, (ptr & ADDR_MASK) * self.unit

    def block_of(self, addr: int) -> int:
        return addr - (addr - self.data) % self.block_size

    def replicas(self, ptr: int) -> tuple[tuple[int, ...], int]:
        """The MNs of every live copy of an object, its home first, and its address (the
        same on each: a group's blocks share their offsets)."""
        node, addr = (ptr >> NODE_SHIFT) & NODE_MASK, (ptr & ADDR_MASK) * self.unit
        copies = self.copies_of[node]
        if not copies:
            raise LostData(f"every copy of the object at MN {node} {addr:#x} is on a dead MN")
        return copies, addr

    def home_of(self, node: int) -> int:
        """The MN readers use for an object whose pointer names ``node``."""
        home = self.home[node]
        if home is None:
            raise LostData(f"every replica of the data of MN {node} is on a dead MN")
        return home

    # -- allocation ------------------------------------------------------------------------
    def _take(self, units: int) -> int | None:
        q = self.free.get(units)
        if q and not self.sparing:
            return q.popleft()
        size = units * self.unit
        tail = self._tail_for(size) if size <= self.tail_room else None
        if tail is not None:                    # older space first
            g, bump = tail
            tail[1] = bump + size
            if tail[1] + self.unit > self.block_size:
                self.tails.remove(tail)
            self._measure_tails()
        else:
            g, bump = self.current, self.bump
            if g is None or bump + size > self.block_size or self.sparing and self._spared(g):
                return None
            self.bump = bump + size
        p = self.ptr(g.nodes[0], g.addrs[0] + bump)
        self.sizes[p] = units
        return p

    def _tail_for(self, size: int) -> list[Any] | None:
        """The oldest tail with room for ``size`` bytes (None: none has)."""
        for tail in self.tails:
            g, bump = tail
            if bump + size <= self.block_size and not (self.sparing and self._spared(g)):
                return tail
        return None

    def _measure_tails(self) -> None:
        """``tail_room`` anew, after a tail shrank or the tails changed."""
        self.tail_room = max([self.block_size - b for _, b in self.tails], default=0)

    def _room(self, size: int) -> bool:
        if self.sparing:
            return any(b + size <= self.block_size and not self._spared(g)
                       for g, b in [(self.current, self.bump), *self.tails] if g is not None)
        return (self.current is not None and self.bump + size <= self.block_size
                or size <= self.tail_room)

    def ready(self, units: int) -> bool:
        """An allocation of this class can proceed without talking to the MNs."""
        if self.news is not None:
            self.follow(self.news())
        if units not in self.pending and (p := self._take(units)) is not None:
            self.pending[units] = p
        if units not in self.pending:
            return False
        if self.sparing:
            return self._room(units * self.unit)
        if self.free.get(units):
            return True
        size = units * self.unit        # (``_room``'s common case inline: every write asks)
        return self.current is not None and self.bump + size <= self.block_size \
            or self._room(size)

    def alloc(self, units: int) -> tuple[int, int]:
        """(object, the class's next object); call after ``ensure(units)``."""
        pending = self.pending
        p = pending[units]          # (no ``pop``: a method call; the entry is replaced)
        nxt = self._take(units)
        assert nxt is not None, "ensure() not called"
        pending[units] = nxt
        return p, nxt

    def ensure(self, units: int) -> Op[None]:
        """Generator: make ``alloc(units)`` possible, reclaiming or getting blocks if needed
        (or waiting for the operation in flight that is doing so, and looking again)."""
        reclaimed = False
        while not self.ready(units):
            if self.busy:
                yield from self._wait()
            elif self.groups and not reclaimed and not self.sparing:
                reclaimed = True
                yield from self.reclaim()
            else:
                try:
                    yield from self.grow()
                except OutOfMemory:
                    if not self.sparing:
                        raise
                    self.sparing = False    # reuse after all, until the next rebuild

    def _wait(self) -> Op[None]:
        """Generator: pause until no operation of this client is reclaiming or growing."""
        for _ in range(MAX_PAUSES):
            if not self.busy:
                return
            yield []
        raise RuntimeError("another operation of this client never finished reclaiming or "
                           "growing its memory: drive every operation in flight to its end")

    def _alone(self, work: Op[T]) -> Op[T]:
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
        units = self.sizes[ptr]
        kept = self.free.get(units)     # (not ``setdefault``: a deque made on every call)
        if kept is None:
            kept = self.free[units] = deque()
        kept.append(ptr)

    def free_request(self, ptr: int) -> Faa:
        """The FAA that frees any client's object: sets the bit of its first unit in the
        bitmap of its home copy."""
        node, addr = (ptr >> NODE_SHIFT) & NODE_MASK, (ptr & ADDR_MASK) * self.unit
        off = (addr - self.data) % self.block_size
        bit = off // self.unit
        home = self.home[node]      # (``home_of`` inline: every UPDATE and DELETE frees)
        if home is None:
            home = self.home_of(node)   # (raises LostData)
        return Faa(home, addr - off + BLOCK_HEADER + (bit >> 6) * 8, 1 << (bit & 63))

    # -- MN level --------------------------------------------------------------------------
    def grow(self) -> Op[None]:
        """Generator: get a block group (one block on each of r MNs) and record it."""
        return self._alone(self._grow())

    def _grow(self) -> Op[None]:
        yield from self.give_back()
        g = None
        while g is None:                # ends: each lost race is another client's won group
            g = yield from self._claim_group()
        copies = self.membership.live(g.nodes)
        reps = list(zip(g.nodes, g.addrs))
        writes = [Write(n, g.addrs[0], encode_block_header(self.client_id, g.nodes.index(n),
                                                           reps) + bytes(self.bitmap_bytes))
                  for n in copies]
        i = len(self.groups)
        for m in self.meta_nodes:
            meta = self.map.client_meta(self.client_id)
            if META_RECORDS + 8 * (i + 1) <= self.map.layout.client_meta_size:
                writes.append(Write(m, meta + META_RECORDS + 8 * i,
                                    pack_u64(group_record(g.nodes[0], g.addrs[0]))))
            writes.append(Write(m, meta + META_GROUPS, pack_u64(i + 1)))
        try:
            yield writes
        except TransportError:
            # a rebuild published meanwhile copied the header onto the MN it rebuilt: that
            # copy is ours to give back too (``give_back`` forgets those it did not copy)
            self.orphans += [(n, g.addrs[0]) for n in g.nodes]
            raise
        self.groups.append(g)
        if self.sparing:
            self.fresh.add(g)
        if self.current is not None and self.bump + self.unit <= self.block_size:
            self.tails.append([self.current, self.bump])
            self.tail_room = max(self.tail_room, self.block_size - self.bump)
        self.current, self.bump = g, self.first_object
        self.stats["blocks"] += 1

    def _claim_group(self) -> Op[BlockGroup | None]:
        """Generator: claim one block address on every live replica of the next group.
        Returns the BlockGroup, or None when another client took that address on one of
        them first (the blocks got are given back: try again).

        Every copy of a group sits at the same address, so the address is chosen from the
        block tables of all the replicas (read with one-sided READs), never by one MN alone:
        an address one MN hands out may be taken on another, and MNs that hand out their
        next free block move in step, so clients that start on different MNs at the same
        time would draw colliding addresses on every retry. OutOfMemory means no address is
        free on every replica. Clients that pick the same address claim it MN by MN in
        ascending order (one AllocBlock per round trip), so of any set of racing claims one
        gets all its blocks (the one furthest along): a lost race is always someone's win,
        and retries end. Blocks got by a batch that failed otherwise are kept in
        ``orphans``, for the next growth to give back.

        A dead member N of the group gets its copy when N is rebuilt (``fusee.rebuild``), at
        the same address: that address must be free on N too, or the rebuild would find two
        groups for one block of N, and N could never rejoin. N's table cannot be read, but
        every group of N that can still be copied (made before N died, or since) has a live
        member, which shares that group with N: the tables of N's ``group_peers`` show
        every address of N taken, so the address is chosen free on those too
        (``_witnesses``). Groups claimed meanwhile cannot take one address of N either,
        though only their live members are claimed: two groups with N made in one epoch
        share a live MN (a group's first MN is live and it spans from there to N, so the one
        whose first MN is nearer to N lies within the other from that first MN to N), and
        their claims race there; claims never span two epochs (the clients pause between
        epochs and a batch of the old one is refused)."""
        live = [p for p in range(self.n) if p not in self.membership.dead]
        if not live:
            raise LostData("every memory node is dead")
        first = min(live, key=lambda p: (p - self.next_primary) % self.n)
        self.next_primary = (first + 1) % self.n
        nodes = tuple(replica_nodes(first, self.n, self.r))
        copies = self.membership.live(nodes)
        addr = yield from self._free_address(self._witnesses(nodes))
        got: list[int] = []
        refused = False
        try:
            for n in sorted(copies):
                yield [AllocBlock(n, self.client_id, addr)]
                got.append(n)
        except TransportError as e:
            self.orphans += [(n, addr) for n in got]
            if type(e) is NodeTimeout and e.node == n:
                # a slow MN grants it and answers too late, and lives on: given back before
                # the next claim, unless its table says it is not ours (it never took)
                self.orphans.append((n, addr))
            if type(e) is not ControlError:
                raise
            refused = True
        if refused:         # (out of the except clause: no yield in one, tests/test_compiled)
            yield from self.give_back()
            return None
        return BlockGroup(nodes, (addr,) * len(nodes))

    def _witnesses(self, nodes: tuple[int, ...]) -> list[int]:
        """The live MNs whose block tables show which addresses are taken on every MN of
        ``nodes``: its live ones, and for each dead one its ``group_peers``, whose tables
        hold the groups it had (made before it died, or while it was dead)."""
        m = self.membership
        seen = set(m.live(nodes))
        for dead in set(nodes) & m.dead:
            seen.update(group_peers(m, dead, self.n, self.r))
        return sorted(seen)

    def _free_address(self, witnesses: list[int]) -> Op[int]:
        """Generator: a block address free in the block tables of all of ``witnesses`` (one
        drawn at random, so that clients growing at once rarely race for the same one)."""
        blocks = self.map.num_blocks
        tables = yield [Read(n, self.map.table, 8 * blocks) for n in witnesses]
        taken = [struct.unpack(f"<{blocks}Q", t) for t in tables]
        free = [i for i in range(blocks) if not any(owners[i] for owners in taken)]
        if not free:
            used = sum(any(owners[i] for owners in taken) for i in range(blocks))
            raise OutOfMemory(f"no data block address free on all of MNs "
                              f"{', '.join(map(str, witnesses))} ({used} of {blocks} blocks "
                              f"in use on one of them)")
        return self.map.block_addr(free[self.rng.randrange(len(free))])

    def give_back(self) -> Op[None]:
        """Generator: return the blocks of growths that failed half way (on live MNs; those
        on a dead MN went with it). Each MN's table is read first, and only the blocks it
        says are ours go back (``return_blocks``, which writes to them): one on an MN
        rebuilt since it was got went with the old region unless the rebuild copied it (its
        group header had reached a live copy), and may be someone else's now; one whose
        FreeBlock went through in a batch that failed is free already, and one whose
        AllocBlock got no answer may never have been taken. Those are forgotten. Those on a dead
        MN are kept until the others are back: a rebuild of it
        meanwhile may copy one (its header on a live copy), to give back in the next epoch."""
        m = self.membership
        back = [(n, a) for n, a in self.orphans if n not in m.dead]
        if back:
            words = yield [Read(n, self.map.table_entry(self.map.block_index(a)), 8)
                           for n, a in back]
            gone = {b for b, w in zip(back, words) if unpack_u64(w) != self.client_id + 1}
            self.orphans = [b for b in self.orphans if b not in gone]
            yield from return_blocks(self.client_id, [b for b in back if b not in gone])
        self.orphans = []

    def reclaim(self) -> Op[None]:
        """Generator: take back the objects other clients (or we) freed in our blocks."""
        return self._alone(self._reclaim())

    def _reclaim(self) -> Op[None]:
        groups = list(self.groups)
        bufs = yield [Read(self.home_of(g.nodes[0]), g.addrs[0] + BLOCK_HEADER,
                           self.bitmap_bytes) for g in groups]
        unit, sizes = self.unit, self.sizes
        # used = 0 on each object before its bit is cleared (same MN, posting order): whoever
        # wonders later whether a free was delivered (recovery) sees that it was, even after
        # the bit is cleared (fusee.recovery). On every live copy, not the home alone: once
        # the home dies, the next copy is the home, and recovery must see there too that
        # the free was delivered (with used 1 there it delivered it again to an object we
        # had taken back, and reused: a double free; tests/test_hostile_combos.py). An
        # object is reused once its clear is through, also when the batch failed for
        # another node.
        batch: list[Request] = []
        #: where each clearing FAA is in ``batch``, and the objects it frees
        freeing: list[tuple[int, list[int]]] = []
        for g, buf in zip(groups, bufs):
            if buf == self.no_frees:    # (most, in a load: the reclaim before each growth
                continue                # read every group's bitmap, one word at a time)
            words = struct.unpack(f"<{self.bitmap_bytes // 8}Q", buf)
            home, marked = self.home_of(g.nodes[0]), self.marked[g.nodes[0]]
            backups = self.copies_of[g.nodes[0]][1:]        # (the home is the first copy)
            first = self.ptr(g.nodes[0], g.addrs[0])        # + bit: the object at that unit
            # only the words with a bit set (most are 0: skipped in C, not one by one)
            for w in compress(range(len(words)), words):
                word, mask, found = words[w], 0, []
                while word:
                    low = word & -word
                    word ^= low
                    bit = w * 64 + low.bit_length() - 1
                    units = sizes.get(first + bit)
                    if units is None:       # unknown objects are left for recovery
                        continue
                    mask |= low
                    found.append(first + bit)
                    used = g.addrs[0] + (bit + units) * unit - 1     # its last byte
                    if marked:
                        before, after = self.marks(home, used)
                        batch += [before, Write(home, used, b"\0"), after]
                    else:
                        batch.append(Write(home, used, b"\0"))
                    batch += [Write(n, used, b"\0") for n in backups]
                if not mask:
                    continue
                batch.append(Faa(home, g.addrs[0] + BLOCK_HEADER + 8 * w, -mask & MASK64))
                freeing.append((len(batch) - 1, found))
                if len(batch) >= MAX_BATCH // 2:
                    yield from self._clear(batch, freeing)
                    batch, freeing = [], []
        if batch:
            yield from self._clear(batch, freeing)

    def _clear(self, batch: list[Request], freeing: list[tuple[int, list[int]]]) -> Op[None]:
        """Generator: post a reclaim's batch; reuse the objects whose clear went through."""
        try:
            yield batch
        except TransportError as e:
            done = e.results or []
            for at, found in freeing:
                if at < len(done) and isinstance(done[at], int):
                    self._reuse(found)
            raise
        for _, found in freeing:
            self._reuse(found)

    def _reuse(self, found: list[int]) -> None:
        for p in found:
            self.release(p)
        self.stats["reclaimed"] += len(found)

    def install(self, groups: list[BlockGroup], sizes: dict[int, int],
                free: dict[int, list[int]], current: BlockGroup | None, bump: int,
                tails: Iterable[tuple[BlockGroup, int]] = ()) -> None:
        """Take over an allocation state rebuilt from the memory nodes (fusee.holdings):
        every object ever carved from ``groups`` (``sizes``), those free, and where carving
        goes on (``current`` at ``bump``, and the (group, bump) ``tails`` of the others)."""
        self.groups = list(groups)
        self.sizes = dict(sizes)
        self.free = {u: deque(ps) for u, ps in free.items() if ps}
        self.pending = {}
        self.current, self.bump = current, bump
        self.tails = [[g, b] for g, b in tails]
        self._measure_tails()
        self.stats["blocks"] = len(self.groups)
