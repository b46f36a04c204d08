"""Which memory nodes are alive, per epoch, and what the last failover decided.

Every replicated thing has a fixed list of r MNs (``fusee.index.replica_nodes``): a subtable,
the directory and client metadata (MNs 0..r-1), a block group of data (the group's first MN
then the next ones, every copy at the same address). Under a membership the thing lives on the
*live* members of its list, in list order: the first live one is its primary. So a dead MN
needs no data moved: its duties pass to the next replica in every list, and an object's
pointer (which names the first MN of its group) stays valid.

A new epoch starts once the master's failover (``fusee.failover``) has closed every SNAPSHOT
round open when the clients paused. ``settled`` records how, per failover: ``epoch -> {(subtable,
slot) -> value}`` for each slot the failover that began ``epoch`` decided, fetched with the
membership, so a writer whose round it interrupted learns its fate even when the slot has moved
on since (``fate``). ``kept`` records, the same way, the values a failover left in place
where it cannot tell a proposal from the slot's old value and a writer may not know it won (a
backup died with the primary). ``dropped`` records the proposals each failover took off the
backups: the recovery of a client that crashed meanwhile tells from it that a round its log
entry committed in never took effect (a writer that goes on after such a round does so with a
new object, so a later entry never shows a dropped proposal).

``past_dead`` records the dead MNs of every earlier epoch: a subtable that had two live
replicas in each (``backed``) had a backup in every round, and every failover saw its rounds;
and a round whose epoch ended with its primary alive was closed by the primary's value, which
its writer learns from it once that primary has died too (``dead_in``, ``fate``).

``rebuilt_at`` records the epoch in which each rebuilt MN became a replica again. A round is
judged only by replicas alive from its epoch until now (``witness``): a primary that died at
the epoch's end and was rebuilt since holds a copy of what the failover left elsewhere and of
every write after it, not the round's outcome.

Design: docs/design.md#membership-epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping
from typing import Any

from fusee.verdicts import LOSE, RESTART, WIN, Verdict


@dataclass(frozen=True)
class Membership:
    epoch: int = 0
    dead: frozenset[int] = frozenset()
    settled: Mapping[int, Mapping[tuple[int, int], int]] = field(default_factory=dict)
    kept: Mapping[int, Mapping[tuple[int, int], int]] = field(default_factory=dict)
    dropped: Mapping[int, Mapping[tuple[int, int], tuple[tuple[int, int], ...]]] = field(
        default_factory=dict)           # (value, crc of the object it names, 0: none)
    #: MN -> the epoch its last rebuild (``fusee.rebuild``) started, for every MN that died
    #: and was rebuilt: what it held before it died is gone, and what it holds now was
    #: copied from another replica in that epoch's pause (``witness``)
    rebuilt_at: Mapping[int, int] = field(default_factory=dict)
    #: the dead MNs of each earlier epoch (index: the epoch), for ``backed``; shorter than
    #: ``epoch`` in a record written before it was kept, which ``backed`` then cannot use
    past_dead: tuple[frozenset[int], ...] = ()

    def __post_init__(self) -> None:
        assert all(0 < e <= self.epoch for e in self.rebuilt_at.values()), \
            f"epoch {self.epoch}: rebuilt in a later or no epoch: {dict(self.rebuilt_at)}"
        assert len(self.past_dead) <= self.epoch, (self.epoch, self.past_dead)

    @property
    def rebuilt(self) -> frozenset[int]:
        """MNs that died and were rebuilt: the frees delivered to their bitmaps before they
        died are lost, as with a dead MN (``fusee.audit``: stranded)."""
        return frozenset(self.rebuilt_at)

    def live(self, nodes: Iterable[int]) -> tuple[int, ...]:
        """``nodes`` without the dead ones, in order."""
        dead = self.dead
        return tuple(n for n in nodes if n not in dead)

    def witness(self, node: int, epoch: int) -> bool:
        """Was ``node`` alive from ``epoch`` until now? Only such a replica can tell what a
        round opened in ``epoch`` did to it: one that died since lost the round's traces,
        and if it was rebuilt, it holds a copy of another replica made after the round, with
        whatever that one held then (a failover's decision, later writes)."""
        return node not in self.dead and self.rebuilt_at.get(node, 0) <= epoch

    def always_live(self, nodes: Iterable[int]) -> tuple[int, ...]:
        """Those of ``nodes`` alive in every epoch so far (never dead): for a round whose
        epoch is unknown (a log entry does not say), the replicas that surely took part."""
        return tuple(n for n in nodes if n not in self.dead and n not in self.rebuilt_at)

    def backed(self, nodes: Iterable[int]) -> bool:
        """Had the thing with replica list ``nodes`` (a subtable) two live replicas in every
        epoch so far? Then every SNAPSHOT round in it had a backup, and the failover that
        ended a round left alive a replica that took part in it (a failover only removes
        MNs), so it saw the round: a proposal on a live backup is recorded (settled, kept,
        dropped). Otherwise a round may have had no backup, or have been closed unseen (every
        backup holding its proposal died, the primary alive with the old value), and a slot
        that moved off the round's old value may have been moved by another writer. For a
        record without the history, two replicas never dead (``always_live``) say it."""
        nodes = tuple(nodes)
        if len(self.past_dead) != self.epoch:
            return len(self.always_live(nodes)) > 1
        return all(sum(n not in dead for n in nodes) > 1
                   for dead in (*self.past_dead, self.dead))

    def decided_at(self, epoch: int, sid: int, pos: int) -> int | None:
        """The value the failover that ended ``epoch`` gave (or left) slot ``sid:pos``, if it
        recorded one."""
        v = self.settled.get(epoch + 1, {}).get((sid, pos))
        return self.kept.get(epoch + 1, {}).get((sid, pos)) if v is None else v

    def dead_in(self, epoch: int) -> frozenset[int] | None:
        """The dead MNs of ``epoch`` (at most this one), or None where the record does not
        say (one written before ``past_dead`` was kept holds only the epochs since)."""
        if epoch == self.epoch:
            return self.dead
        i = epoch - self.epoch + len(self.past_dead)        # ``past_dead`` ends at epoch - 1
        return self.past_dead[i] if 0 <= i < len(self.past_dead) else None

    def fate(self, epoch: int, sid: int, pos: int, v_old: int, v_new: int,
             decided: Verdict | None, primary_now: int | None, cased: bool = False, *,
             primary: int) -> Verdict:
        """WIN, LOSE or RESTART for a writer that proposed ``v_new`` over ``v_old`` in slot
        ``sid:pos`` in ``epoch``, which a failover ended. ``decided``: the verdict it had
        reached from a complete set of backup values (WIN, LOSE), or None. ``primary_now``:
        the slot's value on the round's primary read since, if it is a ``witness`` of the
        round, or a FROZEN value (final: a split ended the round) on its first live replica;
        else None. ``cased``: the writer's primary CAS went out. ``primary``: the round's
        primary (the slot's first live replica in ``epoch``).

        ``decided`` stands only where the failover that ended ``epoch`` found the primary
        dead: then the live backups' value stood, every writer of the round having seen it.
        One that found the primary alive went by the primary's value, and a backup holding
        the writer's proposal went back to it, or had died with it (nothing recorded): a
        writer whose primary CAS never went out did not take effect there, whatever it had
        decided, though the primary may have died or been rebuilt since (it cannot tell).

        ``decided`` is WIN only from a round with backups: it has one winner, and only that
        winner moves the primary off ``v_old`` (an insert's helpers only commit its claim
        there) within the epoch; once it ended, the primary still at ``v_old``, a later round
        may move it. A writer with no backup has no round to win, its primary CAS alone
        decides (others may be as sure as it is), so it passes None.

        ======================  =============  ==========  =========================================
        slot value ``v``        ``decided``    fate        the writer's object
        ======================  =============  ==========  =========================================
        recorded by the         any            WIN if      WIN: named by the slot (or replaced
        failover that ended                    ``v_new``,  since, as below); RESTART, LOSE: never
        ``epoch`` (settled:                    RESTART if  published, the writer's own (it writes
        ``v_old`` back; kept)                  ``v_old``,  it again or gives it back)
                                               else LOSE
        on the primary, a       any            WIN         named by the slot (our CAS took effect)
        witness: ``v_new``
        ... ``v_old``           any            RESTART     the writer's own: nobody's CAS took
                                                           effect (a failover never installs a
                                                           value on a live primary)
        ... a third value       WIN, CAS out   WIN         the slot's next writer's: our CAS took
                                                           effect, later writers replaced our value
                                                           and free the object; the writer must
                                                           not write to it again (its commit
                                                           record went out before its CAS) nor
                                                           give it back, and frees ``v_old`` as
                                                           any winner does
        ... a third value       else           LOSE        the writer's own, never published:
                                                           another writer won the round, or a
                                                           round of a later epoch took the slot
        unknown: the primary    WIN, LOSE      as decided  WIN: the failover kept our committed
        died at the epoch's                                object, which it does not record (every
        end (or the record                                 writer of the round had seen it)
        does not say)
        ... unknown             None           RESTART     the writer's own: an undecided writer's
                                                           proposal reached no live backup
        unknown: the primary    any, CAS not   RESTART     the writer's own: the failover went by
        lived through the       out                        the primary, which its CAS never reached
        epoch's end, and died                              (a WIN's proposal went back, or died
        or was rebuilt since                               with its backups, unrecorded)
        ... unknown             WIN, CAS out   WIN         as decided: the CAS was executed before
                                                           the failover read the primary
        ======================  =============  ==========  =========================================

        Open: a writer with no backup whose primary CAS went out and whose reply was lost,
        finding a third value, cannot tell whether its CAS took effect before another writer
        replaced its value; it takes LOSE."""
        v = self.decided_at(epoch, sid, pos)
        if v is None:
            if primary_now is None:
                closing = self.dead_in(epoch + 1)
                if not cased and closing is not None and primary not in closing:
                    return RESTART
                return decided or RESTART
            if decided == WIN and cased and primary_now != v_old:
                return WIN
            v = primary_now
        return WIN if v == v_new else RESTART if v == v_old else LOSE

    def installed(self, value: int) -> tuple[int, int] | None:
        """The slot a failover (or a rebuild's closing) left holding ``value``, settled or
        kept, if one did: the slot may have moved on since. A tombstone
        (``fusee.layout.free_value``) is proposed once, ever; an object's slot value comes
        back when its memory is reused for the same key, 256 allocations on, so a match may
        name an older object there: the caller must be able to bear that."""
        for by_epoch in (self.settled, self.kept):
            for slots in by_epoch.values():
                for where, v in slots.items():
                    if v == value:
                        return where
        return None

    def was_dropped(self, sid: int, pos: int, proposal: int, crc: int) -> bool:
        """Did some failover take ``proposal`` (naming the object whose crc is ``crc``) off
        slot ``sid:pos``?"""
        return any(v == proposal and c in (0, crc)
                   for slots in self.dropped.values() for v, c in slots.get((sid, pos), ()))

    def successor(self, dead: Iterable[int], settled: Mapping[tuple[int, int], int],
                  kept: Mapping[tuple[int, int], int] | None = None,
                  dropped: Mapping[tuple[int, int], tuple[tuple[int, int], ...]] | None = None
                  ) -> Membership:
        """The membership a failover of the MNs ``dead`` starts, with its decisions."""
        e = self.epoch + 1
        return Membership(e, self.dead | frozenset(dead), {**self.settled, e: dict(settled)},
                          {**self.kept, e: dict(kept)} if kept else dict(self.kept),
                          {**self.dropped, e: dict(dropped)} if dropped else dict(self.dropped),
                          dict(self.rebuilt_at), (*self.past_dead, self.dead))

    def rejoined(self, nodes: Iterable[int], settled: Mapping[tuple[int, int], int],
                 dropped: Mapping[tuple[int, int], tuple[tuple[int, int], ...]] | None = None
                 ) -> Membership:
        """The membership a rebuild of the dead MNs ``nodes`` starts (``fusee.rebuild``): they
        are replicas again from the new epoch on (``rebuilt_at``), and the rounds the rebuild
        closed are recorded like a failover's."""
        nodes = frozenset(nodes)
        assert nodes <= self.dead, (sorted(nodes), sorted(self.dead))
        e = self.epoch + 1
        return Membership(e, self.dead - nodes, {**self.settled, e: dict(settled)},
                          dict(self.kept),
                          {**self.dropped, e: dict(dropped)} if dropped else dict(self.dropped),
                          {**self.rebuilt_at, **dict.fromkeys(nodes, e)},
                          (*self.past_dead, self.dead))

    # -- wire (msgpack-friendly) -------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "dead": sorted(self.dead), "settled": _flat(self.settled),
                "kept": _flat(self.kept),
                "dropped": [[e, s, p, v, c] for e, slots in sorted(self.dropped.items())
                            for (s, p), vs in sorted(slots.items()) for v, c in vs],
                "rebuilt": sorted(self.rebuilt),
                "rebuilt_at": [[n, e] for n, e in sorted(self.rebuilt_at.items())],
                "past_dead": [sorted(d) for d in self.past_dead]}

    @classmethod
    def from_wire(cls, d: object) -> Membership:
        if not isinstance(d, dict):
            raise ValueError("a membership must be a map")
        epoch, dead = d.get("epoch"), d.get("dead")
        if type(epoch) is not int or epoch < 0 or not isinstance(dead, list):
            raise ValueError("malformed membership")
        rebuilt = d.get("rebuilt", [])
        if not (isinstance(rebuilt, list) and all(type(n) is int and n >= 0
                                                  for n in dead + rebuilt)):
            raise ValueError("malformed membership: dead or rebuilt nodes")
        dropped: dict[int, dict[tuple[int, int], tuple[tuple[int, int], ...]]] = {}
        for item in _items(d.get("dropped", []), epoch, 5):
            slots = dropped.setdefault(item[0], {})
            slots[(item[1], item[2])] = slots.get((item[1], item[2]), ()) + ((item[3], item[4]),)
        past = d.get("past_dead", [])
        if not (isinstance(past, list) and len(past) <= epoch and all(
                isinstance(x, list) and all(type(n) is int and n >= 0 for n in x)
                for x in past)):
            raise ValueError("malformed membership: past_dead")
        return cls(epoch, frozenset(dead), _nested(d.get("settled"), epoch),
                   _nested(d.get("kept", []), epoch), dropped, _rebuilt_at(d, rebuilt, epoch),
                   tuple(frozenset(x) for x in past))


def _rebuilt_at(d: dict[Any, Any], rebuilt: list[int], epoch: int) -> dict[int, int]:
    """The ``rebuilt_at`` map of a wire membership. One written before it was recorded
    lists the rebuilt MNs alone: each is taken as rebuilt in ``epoch``, a witness of no
    earlier round (``Membership.witness``), which can only make a round's fate less sure."""
    pairs = d.get("rebuilt_at")
    if pairs is None:
        return dict.fromkeys(rebuilt, epoch)
    if not (isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
            and p[0] >= 0 and 0 < p[1] <= epoch for p in pairs)):
        raise ValueError("malformed membership: rebuilt_at")
    out = {n: e for n, e in pairs}
    if set(out) != set(rebuilt):
        raise ValueError("malformed membership: rebuilt and rebuilt_at disagree")
    return out


def _flat(by_epoch: Mapping[int, Mapping[tuple[int, int], int]]) -> list[list[int]]:
    return [[e, s, p, v] for e, slots in sorted(by_epoch.items())
            for (s, p), v in sorted(slots.items())]


def _items(items: object, epoch: int, width: int = 4) -> list[list[int]]:
    """[epoch, subtable, slot, value (, crc)] rows, checked."""
    if not isinstance(items, list):
        raise ValueError("malformed membership: slots")
    for item in items:
        if not (isinstance(item, list) and len(item) == width and
                all(type(x) is int and x >= 0 for x in item) and 0 < item[0] <= epoch):
            raise ValueError("malformed membership: slots")
    return items


def _nested(items: object, epoch: int) -> dict[int, dict[tuple[int, int], int]]:
    out: dict[int, dict[tuple[int, int], int]] = {}
    for item in _items(items, epoch):
        out.setdefault(item[0], {})[(item[1], item[2])] = item[3]
    return out
