"""Rebuilding a memory node that died: it becomes a replica again of everything it held.

A dead MN is failed over (``fusee.failover``) and the cluster runs on the live replicas. When
an MN with the dead one's id comes back with an empty region (``fusee memnode --id N
--rejoin``, the restarted process or a replacement on another host), the master rebuilds it
(``Rebuild``) in two phases on a transport that reaches N, then publishes the Membership the
second returns, in which N is alive: a replica again of everything ``replica_nodes`` gives it,
primary where it comes first. N's CPU does nothing: one-sided verbs only.

Phase A, online (``Rebuild.copy_online``): the clients keep going, N is still dead in the
membership, so no client reads or writes it. The master copies to N the bulk of the bytes,
the data blocks of the block groups N belongs to, each from its home (first live replica):
every group whose owner (a client id) has no recovery running (its metadata's RECOVERY word,
read before any block, is zero) and whose *write mark* is even. The owner may be CLEAN (no
client holds the id) or held by a client that keeps writing: while N is dead, every write
of a holder into a group of N goes, on the group's home, between two write marks
(``Allocator.marks``: WRITEs of the header's last word, an odd value before, the next even
one after, in the same batch, so they land in that order), and the values never repeat.
Each group's header (with its mark) and its owner's (STATE, incarnation, RECOVERY) words
are kept as they were read, before the block.

The master begins phase A once every leased client has heard, in a renewal, that the rebuild
runs (``Master.unheard``; a client renews every third of its lease, and one that does not
within a lease is expiring). From then until the rebuild ends, a client carves every new
object from the group it was carving from and *fresh* ones, got since it heard, and reuses
no freed object (``Allocator.follow``): its writes of the time land in those (the first
usually holds the reserved objects), not all over the groups it held, which a writer
updating keys at random would otherwise touch nearly all of during the copy (it reuses freed
objects where they are). That is what keeps the pause short for a client that stays open; the copy's
exactness does not rest on it (below).

Phase B, the pause (``Rebuild.finish``): every leased client has acked that no batch of it is
in flight and it posts none (``fusee.master.logic``, as for a failover), and none of the old epoch
ever will (its next batch is refused with the new membership, ``EpochChanged``). Then:

1. Every SNAPSHOT round open when the clients paused is closed, as a failover with no new
   death does (``failover._Failover`` with an empty ``dead``: every backup that differs goes
   back to its primary's value, recorded in the epoch's ``settled`` and ``dropped``), and
   any split a paused client held is finished. A client learns its round's fate from them in
   the new epoch (``Membership.fate``), as after a failover.
2. What must be exact is copied, each from its first live replica: the client-id counter
   (the largest of the live ones), the client metadata area and the index header, split
   locks and directory (if N is one of their r MNs), every subtable N replicates that exists
   (an initial one, or one with a nonzero first bucket header: live and retired ones, which
   stale clients still read).
3. The block groups are enumerated again (block tables, then headers). Of each group N
   belongs to, N gets the header and free bitmap (everything before the first object: frees
   and reclaims went to the home's bitmap during A) and, unless phase A copied it and it
   is *unchanged*, the whole block: same home, same block, same header (write mark
   included: not moved), same owner, and that owner's metadata words equal to those phase
   A read. Then N's whole block table.
   Only a home's bitmap holds bits: N's is zero unless N is the group's home again, and
   then the home it takes over has its bitmap wiped once N has it (``_piece``).
   The frees that went to N's bitmap before it died are lost with it, as after any MN death
   (``Membership.rebuilt``, ``fusee.audit``).

What is paused, and for how long: every client, from its ack of the pause to the publish
of the next epoch: the wait for the last ack (up to one renewal of each client), step 1
(reads of every subtable on every replica, and a CAS per round to settle), and the copy of
steps 2 and 3, which moves the index, the metadata, one header and bitmap per group, and the
blocks written since A read them (or made since, or of an id a recovery touched): for a
client that heard of the rebuild, its fresh groups and those of its reserved objects; not
the data that stayed as it was, which is the bulk of a store, whether its clients come and
go or stay open. ``pause_groups`` and ``pause_bytes`` say what the pause copied (in the
master's rebuild record and log line).

Why the copy is exact (the proof sketch). Bytes of a data block change only thus: (a) an
object (with its embedded log entry, its commit record, its ``used`` byte) is written by the
client holding the id that owns the group, into objects it allocated, or by a recovery of
that id (``fusee.recovery`` writes commit records); (b) a free sets a bit of the home's
bitmap, and the owner's reclaim clears it; (c) a growth writes the header of a block its
AllocBlock got, and a give-back (FreeBlock) frees it, after which another growth may take it.
Every holder of an id CASes its STATE from CLEAN and FAAs its incarnation before its first
write (``ClientCore.open``), and every recovery FAAs the incarnation before its first
(``fusee.recovery``); a holder writes CLEAN only once every write of it has completed
(``ClientCore.close``). So if an owner's words read at time t0 say no recovery, and read the
same again in the pause, one holder (or none) held the id all along and no recovery wrote
after t0 (a recovery starting after t0 moves the incarnation; one running at t0 shows in
RECOVERY; a new holder moves STATE and the incarnation). That holder posted every batch of
the time in an epoch where N is dead (a batch of an older epoch is refused), so each of its
writes W into a group of N went between marks M1 (odd, before W) and M2 (even, after W) on
the home, in that order. Say phase A read the group's header at t1 (mark c1, even), then
its block at t2 > t1, and the pause reads the mark c3. If W landed after t2, M2 lands after
W (or never: a batch cut short by a crash or an interrupt) and M1 before W; either M1 landed
after t1, and the mark moved to M1 or a later value, none equal to c1 (values only grow
within a holder and carry its incarnation), or M1 landed before t1, and then c1 is M1 (odd:
A skips the group) or a later mark of the same holder, posted after W, so after t2:
impossible. So c3 = c1 with c1 even means that no write of (a) landed after t2, and phase A's
copy is final. (b) touches only the header-and-bitmap range, which phase B copies for every
group. (c) changes the table word or the header, or happens under an owner whose words
moved: a group made, re-made or given back after A enumerated it does not match A's record,
so it is copied whole in the pause (or, gone, not at all: its block on N is then free, with
whatever bytes A left there, as any block given back is). Since phase A never writes where
a client reads (N is dead to the clients until the new epoch) and never writes a block-table
word of N (phase B does), nothing it does is visible before the publish; a write that lands
on a home after A read the range is caught by the mark, or by the owner's words. The danger
that made the copy stop-the-world, a range read from the home before a client's write and
written to N after the same write landed on N, cannot arise: no client writes N before the
publish. The marks cost nothing while every MN is alive (no verb), and while one is dead two
WRITEs per write batch to a group of it, with no round trip of their own. Nothing of this
asks where a client writes: a client that never heard of the rebuild (a lease ran out
waiting for it), or that stopped sparing when no block was left (``Allocator.ensure``), or
whose operation in flight writes a reserved object of a group phase A copied, writes into
such a group between its marks like any other write, and the pause copies that group
again. Sparing decides only how many groups that is.

After the pause N is equal, thing by thing, to the copy readers used: what a read in the old
epoch saw, a read of N in the new one sees. Step 1 leaves no proposal on a backup that the
copy of the primary would silently drop: the writers whose rounds it closed are told so in
``settled``, and they redo their writes in the new epoch, which names N among the replicas
(objects they had under way are written again to every live replica,
``ClientCore.epoch_ended``). If another MN dies meanwhile, a verb fails, or (phase A) the
master abandons the copy at once (``abandon``) so that its failover is not held up; the
rebuild fails and the master retries it after that MN's failover (N keeps being dead until a
rebuild publishes: nobody reads a half-written N). If N dies meanwhile, the same. A pause that
fails once it has begun closing the rounds still ends in a new epoch, which carries the
decisions it recorded (``Rebuild.closed``): a writer never resumes a round it settled.

``progress`` reports bytes copied and to copy, per phase, so that the master can show it.

Measured (``python3 -m pytest tests/test_rebuild_processes.py -m soak -s -k 100k``: 100,000
keys of 1 KB on 3 MNs, r = 3, two client processes updating and reading random keys all
along; a 2-core machine shared with four other engineers' test runs, load average 10-13, so
wall times are noisy; one run each, two where a writer holds the id): rebuild;
pause (of it copying: MiB, groups whole); MiB copied online of all; longest client operation
during the rebuild. Marks: the
write marks alone (the online copy takes the groups of open ids too); spared: the clients
spare the rebuild's groups; + renewals: they also renew every ``REBUILD_POLL`` while it runs.

- loader's id closed, shm. Marks: 3.34 s; 1.66 s (1.06 s, 31 MiB, 6); 164 of 195; 1.37 s.
  Spared: 2.92 s; 0.84 s (0.44 s, 35 MiB, 7); 164 of 199; 0.56 s. + renewals: 2.80 s;
  0.68 s (0.59 s, 23 MiB, 4); 172 of 195; 0.80 s.
- closed, zmq. Marks: 1.61 s; 0.84 s (0.31 s, 15 MiB, 2); 156 of 171; 0.32 s. Spared:
  2.07 s; 0.73 s (0.20 s, 15 MiB, 2); 164 of 179; 0.21 s. + renewals: 2.91 s; 0.47 s
  (0.45 s, 23 MiB, 4); 164 of 187; 0.48 s.
- held by a writer, shm. Marks: 4.09 s; 0.75 s (0.28 s, 162 MiB, 39); 168 of 330; 0.92 s,
  and 3.75 s; 2.20 s (0.77 s, 102 MiB, 24); 168 of 270; 1.59 s. Spared: 1.98 s; 0.81 s
  (0.29 s, 27 MiB, 5); 168 of 195; 0.54 s. + renewals: 2.00 s; 0.57 s (0.54 s, 23 MiB, 4);
  164 of 187; 0.81 s, and 2.36 s; 0.82 s (0.79 s, 27 MiB, 5); 168 of 195; 0.93 s.
- held by a writer, zmq. Marks: 0.91 s; 0.30 s (0.29 s, 15 MiB, 2); 152 of 167; 0.31 s,
  and 1.83 s; 0.94 s (0.58 s, 158 MiB, 38); 152 of 310; 0.61 s. Spared: 2.01 s; 0.52 s
  (0.23 s, 15 MiB, 2); 160 of 175; 0.25 s. + renewals: 2.05 s; 0.42 s (0.41 s, 15 MiB, 2);
  160 of 175; 0.44 s, and 2.36 s; 0.46 s (0.43 s, 19 MiB, 3); 160 of 179; 0.46 s.

With the marks alone, a writer holding the load's id (updates of random keys reuse freed
objects all over its groups) had 24-39 of its ~40 groups (102-162 MiB) copied again in the
pause whenever it was reclaiming while the copy ran (the first zmq run caught it carving a
fresh tail instead: 2 groups). Spared, the pause copies 2-7 groups whatever the writers do:
each writer's fresh group and the group of its reserved object; the rest of what it copies
is the metadata, the index (about 7 MiB here) and one header and bitmap per group. What is
left of the pause is mostly not the copy of data (on shm, 162 MiB took 0.28 s of one pause
and 27 MiB 0.79 s of another, the machine loaded as it was): closing the rounds reads every
subtable on every replica, the groups are enumerated again (every block table and header),
all of it Python in the master; and the wait for the acks (the pause less its copying),
which took 0.01-1.43 s with renewals every third of the lease (2 s here) and 0.01-0.09 s
with those of a rebuild. The rebuild as a whole now includes the wait for every client to
hear of it (up to a third of a lease).

A replacement host takes N's place by serving N's endpoint of the cluster config. Every
dead N can be rebuilt in place: no two of its groups sit at one address of it. (With r < n a
group made while N was dead may share no live MN with one made before it died;
``Allocator._claim_group`` still chooses its address free on all of N's ``group_peers``,
whose tables hold every group of N.)
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple

from fusee.allocation import group_peers
from fusee.config import ClusterConfig
from fusee.errors import FuseeError
from fusee.failover import _Failover
from fusee.index import replica_nodes
from fusee.layout import (
    BLOCK_HEADER,
    BLOCK_MAGIC,
    BLOCK_MARK,
    META_INCARNATION,
    META_RECOVERY,
    META_STATE,
    pack_u64,
    unpack_u64,
)
from fusee.membership import Membership
from fusee.memory_map import HEADER_CLIENT_IDS, HEADER_INCARNATION
from fusee.operations import ClientCore
from fusee.verbs import Op, Read, Write, chunks

#: bytes read (then written) per round trip of the copy
COPY_BATCH_BYTES = 8 << 20
_BLOCK = struct.Struct("<QIHH")                 # magic, owner, r, index in group
_INDEX_IN_GROUP = 14
#: the words of a client id's metadata that any holder or recoverer moves before it writes
_OWNER_WORDS = (META_STATE, META_INCARNATION, META_RECOVERY)


class RebuildError(FuseeError):
    """A memory node cannot be rebuilt: it is not dead."""


class RebuildAbandoned(FuseeError):
    """The online copy was given up (the membership is about to change): retried later."""


#: what rebuild copies: (source MN, address, length, patch: None or (offset, bytes) written
#: over the copy)
Piece = tuple[int, int, int, tuple[int, bytes] | None]


class _Group(NamedTuple):
    """One block group N belongs to, as its home has it."""
    source: int                 # the home: the MN it is copied from
    addr: int                   # the block's address on the home
    dst: int                    # N's block of the group
    owner_word: int             # the block-table word: owner id + 1
    head: bytes                 # the home's block header (magic, owner, r, replica list)
    position: int               # N's index in the group (patched into N's header)
    takes_home: bool            # N is the group's home again once it is alive


def rebuild(config: ClusterConfig, membership: Membership, node: int,
            progress: Callable[[int, int], None] = lambda done, total: None) -> Op[Membership]:
    """Generator: both phases with nothing in between (the caller has paused the clients for
    the whole of it); returns the next Membership."""
    job = Rebuild(config, membership, node, progress)
    yield from job.copy_online()
    return (yield from job.finish())


class Rebuild:
    """Make dead MN ``node`` (serving an empty region) a replica of everything it held again:
    ``copy_online`` while the clients work, then ``finish`` while they pause (see the module
    docstring). ``progress(bytes copied, bytes to copy)`` is called in each phase;
    ``abandon()``, between the online copy's round trips, returns why to give it up (or
    None)."""

    def __init__(self, config: ClusterConfig, membership: Membership, node: int,
                 progress: Callable[[int, int], None] = lambda done, total: None,
                 abandon: Callable[[], str | None] = lambda: None):
        if node not in membership.dead:
            raise RebuildError(f"memory node {node} is not dead: nothing to rebuild")
        self.config, self.membership, self.node = config, membership, node
        self.progress, self.abandon = progress, abandon
        self.core = ClientCore(config, 0, membership=membership)
        self.copied: dict[tuple[int, int], _Group] = {}     # by (source, addr): phase A's
        self.owners: dict[int, tuple[int, ...]] = {}        # owner id -> its words at A
        self.online_bytes = 0
        #: the pause's copy: groups it copied whole (written since phase A, or not copied
        #: then), and the bytes it copied in all
        self.pause_groups = self.pause_bytes = 0
        self.closing: _Failover | None = None               # phase B's, once it has begun
        #: the incarnation in the header of the MN copied to, read with the pause's last
        #: write (``fusee.cluster_identity.new_incarnation``; 0 until then)
        self.incarnation = 0

    def closed(self) -> Membership | None:
        """After ``finish`` failed: the Membership the master must publish instead of letting
        the clients resume the old epoch, or None if the pause touched no memory.

        The pause begins by closing every open round on the memory, as a failover with no
        new death does; a writer whose round it settled, resuming in the same epoch, would
        go on as if the round were still open (its verdict, its primary CAS) and lose an
        acknowledged write. So from the moment the closing began, the rounds are over: the
        next epoch carries every decision the closing recorded, the rejoining MN still dead
        (not a replica), and each writer learns its round's fate there
        (``Membership.fate``). A decision is recorded before its CAS: one whose CAS did not
        land names the primary's value all the same, which the failover of the MN that died
        installs on that backup."""
        if self.closing is None:
            return None
        c = self.closing
        return self.membership.successor((), c.settled, c.kept, c.dropped)

    def copy_online(self) -> Op[None]:
        """Generator, phase A: copy whole the groups whose owner no recovery writes for and
        whose write mark says no write is under way."""
        groups = yield from _groups(self.core, self.node)
        words = yield from _owner_words(self.core, {g.owner_word - 1 for g in groups})
        self.owners = {cid: w for cid, w in words.items() if w[2] == 0}
        chosen = [g for g in groups if g.owner_word - 1 in self.owners and _settled(g)]
        bitmap = self.core.alloc.bitmap_bytes
        yield from _copy(self.node, [_piece(g, self.core.map.layout.block_size, bitmap)
                                     for g in chosen], [], self.progress, self.abandon)
        self.copied = {(g.source, g.addr): g for g in chosen}
        self.online_bytes = len(chosen) * self.core.map.layout.block_size

    def finish(self) -> Op[Membership]:
        """Generator, phase B (the clients paused): close the open rounds, copy what must be
        exact and what changed since phase A; returns the next Membership."""
        m, node, core = self.membership, self.node, self.core
        self.closing = closing = _Failover(self.config, m, m.successor((), {}), frozenset())
        settled = yield from closing.run()
        pieces, words = yield from _exact(core, node)
        groups = yield from _groups(core, node)
        now = yield from _owner_words(core, {g.owner_word - 1 for g in groups
                                             if (g.source, g.addr) in self.copied})
        mm = core.map
        whole, head = mm.layout.block_size, core.alloc.first_object
        table = [0] * mm.num_blocks
        for g in groups:
            # (the head holds the write mark: equal, it did not move)
            unchanged = (self.copied.get((g.source, g.addr)) == g
                         and self.owners.get(g.owner_word - 1) == now[g.owner_word - 1])
            pieces.append(_piece(g, head if unchanged else whole, core.alloc.bitmap_bytes))
            table[mm.block_index(g.dst)] = g.owner_word
            self.pause_groups += not unchanged
        self.pause_bytes = sum(piece[2] for piece in pieces)
        yield from _copy(node, pieces, words, self.progress)
        # the whole table, not the used words: a rebuild that failed may have left some;
        # and the incarnation of the process all this went to, which the master expects of
        # it from now on (not the one it asked to rejoin with: it may have restarted since)
        _, word = yield [Write(node, mm.table, struct.pack(f"<{mm.num_blocks}Q", *table)),
                         Read(node, HEADER_INCARNATION, 8)]
        self.incarnation = unpack_u64(word)
        for batch in chunks(_wipes(groups, core.alloc.bitmap_bytes)):  # noqa: UP028
            yield batch
        return m.rejoined([node], settled, closing.dropped)


def _exact(core: ClientCore, node: int) -> Op[tuple[list[Piece], list[tuple[int, int]]]]:
    """Generator: (pieces, words) of what ``node`` replicates outside the data blocks:
    pieces are (source MN, address, length, patch), copied to the same address, with
    ``patch`` (None, or (offset, bytes)) written over the copy; words are (address, u64)
    written as they are."""
    geo, mm, m = core.geo, core.map, core.membership
    n, r = core.n, core.r

    def source(first: int) -> int:
        return m.live(replica_nodes(first, n, r))[0]

    pieces: list[Piece] = []
    words: list[tuple[int, int]] = []
    if node in replica_nodes(0, n, r):
        meta = m.live(replica_nodes(0, n, r))
        counters = yield [Read(x, HEADER_CLIENT_IDS, 8) for x in meta]
        words.append((HEADER_CLIENT_IDS, max(map(unpack_u64, counters))))
        # client metadata, then the index's header words, split locks and directory
        pieces.append((meta[0], mm.clients, geo.subtables - mm.clients, None))
    sids = [s for s in range(geo.max_subtables) if node in replica_nodes(s, n, r)]
    firsts: list[bytes] = []
    for batch in chunks([Read(source(s), geo.subtable(s), 8) for s in sids]):
        firsts += yield batch
    # (the initial ones always exist: subtable 0 at depth 0 has a zero header)
    pieces += [(source(s), geo.subtable(s), geo.subtable_bytes, None)
               for s, raw in zip(sids, firsts)
               if unpack_u64(raw) or s < 1 << geo.initial_depth]
    return pieces, words


def _groups(core: ClientCore, node: int) -> Op[list[_Group]]:
    """Generator: every block group ``node`` belongs to (``_Group``), from its home."""
    mm, m = core.map, core.membership
    peers = group_peers(m, node, core.n, core.r)
    tables = yield [Read(x, mm.table, 8 * mm.num_blocks) for x in peers]
    used = [(x, i, w) for x, buf in zip(peers, tables)
            for i, w in enumerate(struct.unpack(f"<{mm.num_blocks}Q", buf)) if w]
    heads: list[bytes] = []
    for batch in chunks([Read(x, mm.block_addr(i), BLOCK_HEADER) for x, i, _ in used]):
        heads += yield batch
    groups: list[_Group] = []
    taken: dict[int, tuple[int, int]] = {}
    for (x, i, owner_word), head in zip(used, heads):
        magic, _, count, _ = _BLOCK.unpack_from(head)
        if magic != BLOCK_MAGIC or not 0 < count <= (BLOCK_HEADER - _BLOCK.size) // 8:
            continue            # a growth that failed before its header: an orphan, not data
        reps = [divmod(w, 1 << 48) for w in struct.unpack_from(f"<{count}Q", head, _BLOCK.size)]
        nodes = [rn for rn, _ in reps]
        if node not in nodes or m.live(nodes)[0] != x or dict(reps).get(x) != mm.block_addr(i):
            continue            # not one of node's groups, or copied from its home instead
        dst = dict(reps)[node]
        j = mm.block_index(dst)
        first_seen = taken.setdefault(j, (x, i))
        assert first_seen == (x, i), f"block {dst:#x} of memory node {node} in two groups"
        home_after = next(y for y in nodes if y == node or y not in m.dead)
        groups.append(_Group(x, mm.block_addr(i), dst, owner_word, bytes(head),
                             nodes.index(node), home_after == node))
    return groups


def _settled(g: _Group) -> bool:
    """No write of the group's owner is under way on its home as its header was read: its
    write mark is even (``Allocator.marks``)."""
    return unpack_u64(g.head, BLOCK_MARK) % 2 == 0


def _owner_words(core: ClientCore, owners: Iterable[int]
                 ) -> Op[dict[int, tuple[int, ...]]]:
    """Generator: {client id: its (STATE, incarnation, RECOVERY) words} for ``owners``, from
    the first live metadata replica (where ids are claimed and recoveries locked)."""
    ids = sorted(owners)
    m0, mm = core.meta_nodes[0], core.map
    raw: list[bytes] = []
    for batch in chunks([Read(m0, mm.client_meta(cid) + off, 8)
                         for cid in ids for off in _OWNER_WORDS]):
        raw += yield batch
    k = len(_OWNER_WORDS)
    return {cid: tuple(map(unpack_u64, raw[k * i:k * i + k])) for i, cid in enumerate(ids)}


def _piece(g: _Group, length: int, bitmap_bytes: int) -> Piece:
    """The first ``length`` bytes of the group's home block, as a piece to copy to N's block,
    whose header says where in the group it is.

    Only a group's home bitmap may hold bits: frees go to the home and reclaims clear them
    there, so another copy's bits go stale, and once that copy becomes the home (the home
    dies) a bit its owner cleared since would hand the object out a second time while it is
    in use again. Before any rebuild the other copies' bitmaps are all zero (the frees that
    went to a dead home are lost with it, as ``fusee.allocation`` says); a rebuild keeps
    it so: N's copy gets the bitmap only where N is the home again (``takes_home``), and
    then the home it takes over has its bitmap wiped (``_wipes``, once N has it)."""
    assert g.dst == g.addr, "the copies of a block group sit at one address"
    patch = struct.pack("<H", g.position)
    if not g.takes_home:            # a zero bitmap
        patch += g.head[_INDEX_IN_GROUP + 2:] + bytes(bitmap_bytes)
    return (g.source, g.addr, length, (_INDEX_IN_GROUP, patch))


def _wipes(groups: list[_Group], bitmap_bytes: int) -> list[Write]:
    """The Writes that clear the bitmaps of the homes N takes over (see ``_piece``)."""
    return [Write(g.source, g.addr + BLOCK_HEADER, bytes(bitmap_bytes))
            for g in groups if g.takes_home]


def _copy(node: int, pieces: list[Piece], words: list[tuple[int, int]],
          progress: Callable[[int, int], None],
          abandon: Callable[[], str | None] = lambda: None) -> Op[None]:
    """Generator: read each piece from its source and write it to ``node``, a batch of up
    to COPY_BATCH_BYTES per round trip each way; then the words. Before each round trip,
    ``abandon()`` may give the copy up (RebuildAbandoned)."""
    total, done = sum(piece[2] for piece in pieces), 0
    progress(0, total)
    batch: list[Piece] = []
    for piece in [*pieces, None]:
        if piece is not None and (not batch or
                                  sum(b[2] for b in batch) + piece[2] <= COPY_BATCH_BYTES):
            batch.append(piece)
            continue
        if batch:
            reason = abandon()
            if reason:
                raise RebuildAbandoned(reason)
            data = yield [Read(src, addr, length) for src, addr, length, _ in batch]
            yield [Write(node, addr, _patched(buf, patch))
                   for (_, addr, _, patch), buf in zip(batch, data)]
            done += sum(b[2] for b in batch)
            progress(done, total)
        batch = [piece] if piece is not None else []
    # (not ``yield from`` a list: the driver sends each batch's completions back)
    for writes in chunks([Write(node, addr, pack_u64(v)) for addr, v in words]):  # noqa: UP028
        yield writes


def _patched(buf: bytes, patch: tuple[int, bytes] | None) -> bytes:
    if patch is None:
        return bytes(buf)
    offset, data = patch
    out = bytearray(buf)
    out[offset:offset + len(data)] = data
    return bytes(out)
