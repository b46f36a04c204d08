"""Failover after a memory-node crash (docs/design.md#mn-failover), sans-IO: the master runs
``failover(config, membership, dead)`` (the MNs that died since the last epoch) once no client
posts verbs of the old epoch (they have paused, or their leases ran out), and publishes the
Membership it returns.

Nothing moves: every replicated thing keeps its live replicas and the next one in its list
becomes its primary (``fusee.membership``). What the failover closes is every SNAPSHOT round
open when the clients paused (each of them leaves its round to the failover's decision), and
any split the dead MN interrupted. For every subtable:

- its primary is alive: the primary holds the truth (its CAS is every write's linearization
  point). Every backup that differs, an open round's proposals, goes back to the primary's
  value: nobody's write in that round happened (a winner that had committed its log entry
  learns so from the epoch's ``settled`` slots, or, where every backup holding its proposal
  died, from the primary being alive in the next epoch, and writes again: ``Membership.fate``;
  a crashed one is completed by its recovery, from the COMMITTED entry).
- its primary died: its value is gone, and the backups are never older than it. Where the live
  backups agree they stand (the value kept is recorded like a decision, unless it is an object
  committed for the slot: a writer may not have seen its proposal on every backup, if a backup
  died too or a CAS's completion never came back), except an insert's claim that was not yet
  committed, which is withdrawn with a fresh void: a claim committed for this slot has passed
  the duplicate-key check, any other could install a key twice. An object committed for the
  same position of another subtable that holds it FROZEN there is no claim: a split copied it
  here. A slot FROZEN on any live replica takes its frozen value, recorded even where all
  agree: a split took the round back on the backups and may have copied that value
  (``fusee.resize``). Where they differ the round was undecided for everyone (rule 3 needs the
  primary): the failover picks, preferring an object committed for this slot (the round's old
  value, or a winner that committed), then withdrawing insert claims, then the smallest
  proposal, as rule 3 would.

Every slot changed is recorded in ``settled`` with its new value, and the proposals taken off
it in ``dropped``: a writer the failover interrupted learns from them whether its proposal was
kept (``Membership.fate``), even if the slot has moved on by the time it looks, and so does
the recovery of a writer that crashed. The directory replicas are merged (an entry a split
had CASed on some replicas only takes its deeper value everywhere), and any split the dead MN
interrupted (its lock held, or its subtable partly frozen or retired on any live replica) is
finished, with the same code a recovering client uses (``fusee.resize.finish``).

A change of a slot uses CAS from the value read, so a client that did not pause shows up as a
FailoverError rather than as a silently lost write.
"""

from __future__ import annotations

from collections.abc import Iterable

import struct

from fusee.config import ClusterConfig
from fusee.errors import FuseeError
from fusee.index import ENTRY_VALID, RETIRED_LOCK, replica_nodes
from fusee.layout import (COMMITTED, FAILOVER_ID, FROZEN, INSERT, RETIRED, SLOTS_PER_BUCKET,
                          ObjectView,
                          committed_object, decode_object, free_value, pack_u64, parse_header,
                          slot_ref, unpack_u64)
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.resize import finish
from fusee.verbs import Cas, Op, Read, chunks


#: the object each slot value names, decoded (None: it does not decode)
Views = dict[int, ObjectView | None]


def _crc(view: ObjectView | None) -> int:
    """The crc a dropped value is told by (0: no object, or a free value)."""
    return view.crc if view else 0


class FailoverError(FuseeError):
    """The failover cannot go on: a client wrote during it, or too many MNs are dead."""


def failover(config: ClusterConfig, membership: Membership, dead: int | Iterable[int]
             ) -> Op[Membership]:
    """Generator: close what the MNs ``dead`` (an id or a collection of ids) left open;
    returns the next Membership."""
    failed = frozenset([dead] if isinstance(dead, int) else dead) - membership.dead
    if not failed:
        return membership
    new = membership.successor(failed, {})
    work = _Failover(config, membership, new, failed)
    settled = yield from work.run()
    return membership.successor(failed, settled, work.kept, work.dropped)


def close_rounds(config: ClusterConfig, membership: Membership) -> Op[Membership]:
    """Generator: a failover with no new death: close every open round; returns the next
    Membership. For a master that finds the rounds may have been touched with no epoch
    published since (a rebuild's pause that failed, its decisions lost with the master
    that ran it): the clients must meet a new epoch, never resume their rounds."""
    work = _Failover(config, membership, membership.successor((), {}), frozenset())
    settled = yield from work.run()
    return membership.successor((), settled, work.kept, work.dropped)


class _Failover:
    def __init__(self, config: ClusterConfig, old: Membership, new: Membership,
                 dead: frozenset[int]) -> None:
        self.old, self.new, self.dead = old, new, dead
        # a core for the geometry, placement under the new membership, object reads and
        # finishing splits; the id is never used to allocate or to write a free value
        self.core = ClientCore(config, 0, membership=new)
        self.geo = self.core.geo
        self.n, self.r = self.core.n, self.core.r
        self.settled: dict[tuple[int, int], int] = {}
        self.kept: dict[tuple[int, int], int] = {}
        self.dropped: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
        self.copied: set[int] = set()       # slot values a split copied (``_copied``)
        self.voids = 0

    def run(self) -> Op[dict[tuple[int, int], int]]:
        core, geo = self.core, self.geo
        yield from self._merge_directories()
        head = core.dir.replicas[0]
        (raw,) = yield from core.rt([Read(head, geo.lock(0), 8 * geo.max_subtables)])
        locks = struct.unpack(f"<{geo.max_subtables}Q", raw)
        in_use = sorted({e & 0xFFFFFFFF for e in core.dir.entries})
        splitting: list[int] = []
        for sid in in_use:
            # every subtable, not only the dead MN's: each client drops the round it had
            # open when the epoch ends, so every open round is closed here
            frozen = yield from self._settle(sid, self.old.live(
                replica_nodes(sid, self.n, self.r)))
            # a splitter that held a lock has paused for good: its split is finished here
            if frozen or locks[sid] not in (0, RETIRED_LOCK):
                splitting.append(sid)
        for sid in splitting:
            yield from finish(core, sid, locks[sid])
        return self.settled

    # -- the directory -----------------------------------------------------------------------
    def _merge_directories(self) -> Op[None]:
        """Every live directory replica gets, entry by entry, the deepest value any holds."""
        core, geo = self.core, self.geo
        nodes = core.dir.replicas
        bufs = yield from core.rt([core.dir.read()._replace(node=n) for n in nodes])
        count = 1 << geo.dir_bits
        tables = [struct.unpack(f"<{count}Q", b) for b in bufs]
        merged = [max(col, key=lambda e: ((e >> 32) & 0xFF, e)) for col in zip(*tables)]
        if not all(e & ENTRY_VALID for e in merged):
            raise FailoverError("the index directory is not formatted")
        fixes = [Cas(n, geo.entry(i), t[i], merged[i]) for n, t in zip(nodes, tables)
                 for i in range(count) if t[i] != merged[i]]
        yield from self._apply(fixes)
        core.dir.load(b"".join(pack_u64(e) for e in merged))

    # -- one subtable ------------------------------------------------------------------------
    def _settle(self, sid: int, old_nodes: tuple[int, ...]) -> Op[bool]:
        """Generator: settle every slot of ``sid``; returns whether a split was under way
        there (frozen slots or retired headers on its primary)."""
        core, geo = self.core, self.geo
        live = [n for n in old_nodes if n not in self.dead]
        if not live:
            raise FailoverError(f"subtable {sid} has no replica left: more than r-1 memory "
                                f"nodes failed")
        base = geo.subtable(sid)
        bufs = yield from core.rt([Read(n, base, geo.subtable_bytes) for n in live])
        images = [struct.unpack(f"<{geo.subtable_bytes // 8}Q", b) for b in bufs]
        slots = [(b * SLOTS_PER_BUCKET + s, b * 8 + 1 + s)
                 for b in range(geo.buckets) for s in range(SLOTS_PER_BUCKET)]
        primary_alive = old_nodes[0] not in self.dead
        fixes: list[Cas] = []
        drops: dict[tuple[int, int], set[int]] = {}
        views: dict[int, ObjectView | None] = {}
        if primary_alive:
            prim, backups = images[0], list(zip(live[1:], images[1:]))
            for pos, w in slots:
                p = prim[w]                     # frozen too if a split froze it: so be it
                stale = [(n, img[w]) for n, img in backups if img[w] != p]
                # a split freezes the primary before any backup
                assert p & FROZEN or not any(v & FROZEN for _, v in stale), (sid, pos)
                if stale:
                    self.settled[(sid, pos)] = p & ~FROZEN
                    drops[(sid, pos)] = {v for _, v in stale if v != p & ~FROZEN}
                    fixes += [Cas(n, geo.slot_addr(sid, pos), v, p) for n, v in stale]
        else:
            views = yield from self._objects({img[w] for img in images for _, w in slots
                                              if committed_object(img[w])})
            yield from self._copied(sid, views)
            for pos, w in slots:
                values = [img[w] for img in images]
                chosen = self._choose(sid, pos, values, views)
                # a writer may not know that its proposal won: a backup died too, or the
                # CAS took effect on a live backup but its completion never came back (a
                # slow MN); a value left in place that may be a proposal (not a committed
                # object) is recorded as ``kept``
                seen = views.get(values[0])     # None: no object, or one that does not decode
                if chosen is None and values[0] and not (
                        seen is not None and seen.state == COMMITTED):
                    self.kept[(sid, pos)] = values[0]   # perhaps a proposal, perhaps not
                if chosen is not None:
                    self.settled[(sid, pos)] = chosen & ~FROZEN
                    # the old value, or a winner, is not a proposal to drop
                    drops[(sid, pos)] = {v for v in set(values) - {chosen}
                                         if not self._belongs(sid, pos, v, views)}
                    fixes += [Cas(n, geo.slot_addr(sid, pos), v, chosen)
                              for n, v in zip(live, values) if v != chosen]
        # a dropped object is told by its crc too: its memory may be reused for another
        # object that gets the same slot value later (no crc: a free value, never reused)
        views.update((yield from self._objects({v for vs in drops.values() for v in vs
                                                if committed_object(v) and v not in views})))
        for where, vs in drops.items():
            self.dropped[where] = tuple(sorted((v, _crc(views.get(v))) for v in vs))
        yield from self._apply(fixes)
        # a split froze the primary (a backup is frozen only after it), or retired a header
        # on some replica: it must be finished, or the frozen slots (now on every replica)
        # would stall every writer of the subtable
        return any(img[w] & FROZEN for img in images for _, w in slots) or any(
            parse_header(img[b * 8])[3] & RETIRED for img in images for b in range(geo.buckets))

    def _belongs(self, sid: int, pos: int, v: int, views: Views) -> bool:
        """Slot value ``v`` names an object whose log entry is committed for this slot, or
        one a split copied here (``_copied``): it is the slot's value or a winner that
        committed."""
        o = views.get(v)
        return o is not None and o.state == COMMITTED and (
            o.slot_ref == slot_ref(sid, pos) or
            o.slot_ref & 0xFFFFFFFF == pos and v in self.copied)

    def _copied(self, sid: int, views: Views) -> Op[None]:
        """Generator: add to ``copied`` the values of ``views`` (objects in subtable ``sid``)
        whose log entry is committed for the same position of another subtable that holds
        them FROZEN there: a split copied them from it (splits keep positions, and freeze
        every replica before they copy). Another object committed elsewhere is an insert's
        claim made again after a split ended its round: it passed no duplicate check here."""
        core = self.core
        reads: list[Read] = []
        values: list[int] = []
        for v, o in views.items():
            if o is None or o.state != COMMITTED:
                continue
            there, pos = o.slot_ref >> 32, o.slot_ref & 0xFFFFFFFF
            if there != sid and there < self.geo.max_subtables and pos < self.geo.slots:
                reads.append(Read(core.dir.nodes(there)[0], self.geo.slot_addr(there, pos), 8))
                values.append(v)
        got: list[bytes] = []
        for batch in chunks(reads):
            got += yield from core.rt(batch)
        self.copied.update(v for v, raw in zip(values, got) if unpack_u64(raw) == v | FROZEN)

    def _choose(self, sid: int, pos: int, values: list[int], views: Views) -> int | None:
        """The value a slot whose primary died takes, or None to leave it as it is. An
        insert's object that does not belong here (``_belongs``) is a claim."""
        def belongs(v: int) -> bool:
            return self._belongs(sid, pos, v, views)

        def claim(v: int) -> bool:
            o = views.get(v)
            return o is not None and o.opcode == INSERT and not belongs(v)

        distinct = set(values)
        frozen = [v for v in distinct if v & FROZEN]
        if frozen:
            # a split froze the slot, and took the round's proposals back: its value is final
            # (the split may have copied it), settled even where every backup holds it, so
            # that a writer that had won the round learns that it must start over
            assert len(frozen) == 1, (sid, pos, [hex(v) for v in frozen])
            return frozen[0]
        if len(distinct) == 1:
            return self._void() if claim(values[0]) else None
        mine = [v for v in distinct if belongs(v)]
        if mine:
            return min(mine)
        if any(claim(v) for v in distinct):
            return self._void()
        return min(distinct)

    def _objects(self, values: set[int]) -> Op[Views]:
        """Generator: the decoded object (or None) each slot value names."""
        ordered = sorted(values)
        bufs: list[bytes] = []
        for batch in chunks([self.core.object_read(v) for v in ordered]):
            bufs += yield from self.core.rt(batch)
        return {v: decode_object(b) for v, b in zip(ordered, bufs)}

    def _void(self) -> int:
        """A free value no client proposes: withdraws the claims of a slot."""
        self.voids += 1
        return free_value(FAILOVER_ID, (self.new.epoch << 24) | self.voids)

    def _apply(self, cases: list[Cas]) -> Op[None]:
        """Generator: the CASes, each of which must find the value it expects."""
        for batch in chunks(cases):
            res = yield from self.core.rt(batch)
            for c, old in zip(batch, res):
                if old != c.expected:
                    raise FailoverError(f"MN {c.node} {c.addr:#x} changed during the failover "
                                        f"({c.expected:#x} -> {old:#x}): a client did not pause")
