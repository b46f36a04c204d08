"""Rebuilding a memory node that died: it becomes a replica again of everything it held.

A dead MN is failed over (``fusee.failover``) and the cluster runs on the live replicas. When
an MN with the dead one's id comes back with an empty region (``fusee memnode --id N
--rejoin``, the restarted process or a replacement on another host), the master pauses the
clients exactly as for a failover (``fusee.master.logic``: every leased client acks that no batch of
it is in flight and it posts none), runs ``rebuild(config, membership, N)`` on a transport
that reaches N, and publishes the Membership it returns, in which N is alive: a replica again
of everything ``replica_nodes`` gives it, primary where it comes first.

What the rebuild does, in order, with one-sided verbs only (N's CPU does nothing):

1. It closes every SNAPSHOT round open when the clients paused, as a failover with no new
   death does (``failover._Failover`` with an empty ``dead``: every primary is alive, so every
   backup that differs goes back to its primary's value, recorded in the epoch's ``settled``
   and ``dropped``), and finishes any split a paused client held. A client learns its
   round's fate from them in the new epoch (``Membership.fate``), as after a failover.
2. It copies to N, each from the thing's first live replica (its primary, the only copy
   readers read): the client-id counter (the largest of the live ones), the client metadata
   area and the index header, split locks and directory (if N is one of their r MNs),
   every subtable N replicates that exists (an initial one, or one with a nonzero first
   bucket header: live and retired ones, which stale clients still read), and every data
   block of a group N belongs to, whole (header, free bitmap, objects, embedded log
   entries; the header's index in the group made N's), with N's block-table word for it.
   A group is known from its block header, which names every MN of the group, including
   those dead when it was made; it is copied from its home (first live replica): frees went
   only there, so only its bitmap is current. The frees that went to N's bitmap before it
   died are lost with it, as after any MN death (``Membership.rebuilt``, ``fusee.audit``).

Why nothing written is lost or half copied: while the rebuild runs, no client posts a verb
(the pause), and none of the old epoch ever will (each client's next batch is refused with
the new membership, ``EpochChanged``). So every image read in step 2 is final until the new
epoch starts, and N ends up equal, thing by thing, to the copy readers used: what a read in
the old epoch saw, a read of N in the new one sees. Step 1 leaves no proposal on a backup
that the copy of the primary would silently drop: the writers whose rounds it closed are told
so in ``settled``, and they redo their writes in the new epoch, which names N among the
replicas (writes of objects they had under way are written again to every live replica,
``ClientCore.epoch_ended``). If another MN dies meanwhile, a verb fails, the rebuild fails
with it and the master retries it after that MN's failover (N keeps being dead until a
rebuild publishes: nobody reads a half-written N). If N dies meanwhile, the same.

The price is the pause: every client waits for the whole copy, which moves what N holds
(for r = n: the whole used part of a region; 166 MiB in 0.74 s over shm for 100,000 keys of
1 KB). ``progress`` reports bytes copied so that the master can show it. Copying the block
groups while clients write (N a write-only replica of the objects first) would shorten it,
but is not done: a copy of a range read from the home before a client's write lands there
and written to N after the same write landed on N undoes that write on N, so every block
copied under way would have to be verified again (read twice) in a final pause.
A replacement host takes N's place by serving N's endpoint of the cluster config. A rebuild of an MN group address that two groups both claim (possible
only with r < n: two groups that share N but no live MN can take the same address while N
is dead) is refused with RebuildError rather than guessed: that N cannot rejoin.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from fusee.config import ClusterConfig
from fusee.errors import FuseeError
from fusee.failover import _Failover
from fusee.index import replica_nodes
from fusee.layout import BLOCK_HEADER, BLOCK_MAGIC, pack_u64, unpack_u64
from fusee.membership import Membership
from fusee.memory_map import HEADER_CLIENT_IDS
from fusee.operations import ClientCore
from fusee.verbs import Read, Write, chunks

#: bytes read (then written) per round trip of the copy
COPY_BATCH_BYTES = 8 << 20
_BLOCK = struct.Struct("<QIHH")                 # magic, owner, r, index in group
_INDEX_IN_GROUP = 14


class RebuildError(FuseeError):
    """A memory node cannot be rebuilt (it is not dead, or its data cannot be placed)."""


def rebuild(config: ClusterConfig, membership: Membership, node: int,
            progress: Callable[[int, int], None] = lambda done, total: None):
    """Generator: make dead MN ``node`` (serving an empty region) a replica of everything it
    held again; returns the next Membership. ``progress(bytes copied, bytes to copy)``."""
    if node not in membership.dead:
        raise RebuildError(f"memory node {node} is not dead: nothing to rebuild")
    closing = _Failover(config, membership, membership.successor((), {}), frozenset())
    settled = yield from closing.run()
    pieces, words = yield from _plan(ClientCore(config, 0, membership=membership), node)
    yield from _copy(node, pieces, words, progress)
    return membership.rejoined([node], settled, closing.dropped)


def _plan(core: ClientCore, node: int):
    """Generator: (pieces, words) to copy to ``node``: pieces are (source MN, address,
    length, patch), copied to the same address, with ``patch`` (None, or (offset, bytes))
    written over the copy; words are (address, u64) written as they are."""
    geo, mm, m = core.geo, core.map, core.membership
    n, r = core.n, core.r

    def source(first: int) -> int:
        return m.live(replica_nodes(first, n, r))[0]

    pieces: list[tuple[int, int, int, tuple | None]] = []
    words: list[tuple[int, int]] = []
    if node in replica_nodes(0, n, r):
        meta = m.live(replica_nodes(0, n, r))
        counters = yield [Read(x, HEADER_CLIENT_IDS, 8) for x in meta]
        words.append((HEADER_CLIENT_IDS, max(map(unpack_u64, counters))))
        # client metadata, then the index's header words, split locks and directory
        pieces.append((meta[0], mm.clients, geo.subtables - mm.clients, None))
    sids = [s for s in range(geo.max_subtables) if node in replica_nodes(s, n, r)]
    firsts = []
    for batch in chunks([Read(source(s), geo.subtable(s), 8) for s in sids]):
        firsts += yield batch
    # (the initial ones always exist: subtable 0 at depth 0 has a zero header)
    pieces += [(source(s), geo.subtable(s), geo.subtable_bytes, None)
               for s, raw in zip(sids, firsts)
               if unpack_u64(raw) or s < 1 << geo.initial_depth]
    blocks, table = yield from _blocks(core, node)
    pieces += blocks
    words += table
    return pieces, words


def _blocks(core: ClientCore, node: int):
    """Generator: the data blocks of every group ``node`` belongs to, as pieces from each
    group's home, and ``node``'s block-table words for them."""
    mm, m, n, r = core.map, core.membership, core.n, core.r
    peers = sorted({x for p in range(n) if node in replica_nodes(p, n, r)
                    for x in m.live(replica_nodes(p, n, r))})
    tables = yield [Read(x, mm.table, 8 * mm.num_blocks) for x in peers]
    used = [(x, i, w) for x, buf in zip(peers, tables)
            for i, w in enumerate(struct.unpack(f"<{mm.num_blocks}Q", buf)) if w]
    heads = []
    for batch in chunks([Read(x, mm.block_addr(i), BLOCK_HEADER) for x, i, _ in used]):
        heads += yield batch
    pieces, words, taken = [], [], {}
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
        if taken.setdefault(j, (x, i)) != (x, i):
            raise RebuildError(f"block {dst:#x} of memory node {node} belongs to two groups "
                               f"(made while it was dead): it cannot be rebuilt in place")
        # each copy's header says where in the group it is
        pieces.append((x, mm.block_addr(i), mm.layout.block_size,
                       (_INDEX_IN_GROUP, struct.pack("<H", nodes.index(node)))))
        words.append((mm.table_entry(j), owner_word))
    return pieces, words


def _copy(node: int, pieces, words, progress):
    """Generator: read each piece from its source and write it to ``node``, a batch of up
    to COPY_BATCH_BYTES per round trip each way; then the words."""
    total, done = sum(piece[2] for piece in pieces), 0
    progress(0, total)
    batch: list = []
    for piece in pieces + [None]:
        if piece is not None and (not batch or
                                  sum(b[2] for b in batch) + piece[2] <= COPY_BATCH_BYTES):
            batch.append(piece)
            continue
        if batch:
            data = yield [Read(src, addr, length) for src, addr, length, _ in batch]
            yield [Write(node, addr, _patched(buf, patch))
                   for (_, addr, _, patch), buf in zip(batch, data)]
            done += sum(b[2] for b in batch)
            progress(done, total)
        batch = [piece] if piece is not None else []
    # (not ``yield from`` a list: the driver sends each batch's completions back)
    for writes in chunks([Write(node, addr, pack_u64(v)) for addr, v in words]):  # noqa: UP028
        yield writes


def _patched(buf, patch) -> bytes:
    if patch is None:
        return bytes(buf)
    offset, data = patch
    out = bytearray(buf)
    out[offset:offset + len(data)] = data
    return bytes(out)
