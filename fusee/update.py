"""UPDATE, DELETE and PUT: the replace path, SNAPSHOT on the key's existing slot.

An UPDATE writes a new object, finds the key's slot (with the object's writes in the same
batch), proposes the object's slot value over the current one on the backups and, having won
the round, commits its log entry and CASes the primary: the linearization point. A DELETE
does the same with a fresh tombstone of its own (``OpCore.free_value``) as the proposal, its
object holding the log entry only. A loser waits until the winner is through: an UPDATE that
lost was overwritten by the winner (linearized just before it), a DELETE looks again (the
winner may have been an UPDATE). PUT is an UPDATE, and an INSERT where the key is absent.

When the round's epoch ends (a failover), the operation settles it from the failover's
decisions (``OpCore.fate``): finished as a winner, as an overwritten loser, or started over
with a new object (FRESH: the old object's log entry must never commit again).

Design: docs/design.md#update-and-delete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

from fusee import insert as insert_mod
from fusee.errors import CorruptObject, KeyExists, KeyNotFound, Stalled
from fusee.hashing import key_hash
from fusee.index import View
from fusee.layout import (COMMITTED, DELETE, LOST, TAIL_BYTES, UPDATE, object_crc,
                          object_extent, object_slot, pack_u64, slot_ref)
# SNAPSHOT's rules from its Python module (the mutation tests replace them there by name)
from fusee.replication import await_change, fix_requests, resolve, tally
from fusee.reuse import ObjectReads
from fusee.search import find
from fusee.snapshot import (cas_went_out, primary_lost, primary_request, proposal_requests,
                            unfreeze_requests)
from fusee.verbs import EPOCH_ENDS, Op, Read, Request, TransportError, Write
from fusee.verdicts import FRESH, LOSE, RESTART, RULE3, WIN, Decision, Fresh, Verdict

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fusee.cache import CacheEntry
    from fusee.hashing import KeyHash
    from fusee.log import NewObject
    from fusee.op_core import OpCore
    from fusee.replication import SlotTarget


class ReplaceRound:
    """The SNAPSHOT round an UPDATE or DELETE has open: what settling it takes when its
    epoch ends before the round does. (A plain class: compiled, a dataclass's ``__init__``
    is the Python one its decorator writes, a Python call on every write.)"""
    __slots__ = ("epoch", "target", "v_old", "v_new", "old_crc", "reached", "recorded",
                 "cased")

    def __init__(self, epoch: int, target: SlotTarget, v_old: int, v_new: int, old_crc: int
                 ) -> None:
        self.epoch = epoch
        self.target = target
        self.v_old = v_old
        self.v_new = v_new
        self.old_crc = old_crc          # of the object ``v_old`` names (the commit record's)
        self.reached: Verdict | None = None  # the verdict reached from the backups, if any
        self.recorded = False   # the commit record is on every replica of the object
        self.cased = False      # its primary CAS is in flight (``cas_went_out``)


def replace(core: OpCore, key: bytes, value: bytes, opcode: int, then_insert: bool = False,
            units: int = 0) -> Op[None]:
    """Generator: UPDATE (new object) or DELETE of a present key. ``then_insert``: an
    absent key is inserted next (a put), so the object's ABORTED mark rides with the
    insert's first batch instead of a round trip of its own. (A function returning the
    generator, not one itself: each level of generators costs on every round trip.)
    ``units``: an UPDATE's size class where the caller checked it already."""
    return _replace_with(core, key, value, opcode, then_insert, units)


def put(core: OpCore, key: bytes, value: bytes) -> Op[None]:
    """Generator: UPDATE, or INSERT where the key is absent: 5 round trips for a new key
    (the update's object is marked ABORTED with the insert's first batch)."""
    while True:
        try:
            return (yield from replace(core, key, value, UPDATE, then_insert=True))
        except KeyNotFound:
            pass
        try:
            return (yield from insert_mod.insert(core, key, value))
        except KeyExists:
            core.retry()


#: where a key's slot is: (subtable, position, its value, crc of the object it names)
Located = tuple[int, int, int, int]
#: Final: compiled, the read of a cached object is made from a C static, not a lookup of the
#: module's dict
_READ: Final = Read


def _locate_batch(core: OpCore, key: bytes, h: KeyHash, writes: Sequence[Write]
                  ) -> tuple[int, CacheEntry | None, tuple[int, int], list[Read | Write]]:
    """The key's subtable, its cache entry there (None: none), the first buckets and the
    batch of a round that looks for its slot: its bucket reads (with a cached slot, the
    cached object's last bytes too) and ``writes``."""
    d = core.dir
    sid, _ = d.lookup(h)
    reads, firsts = d.bucket_reads(sid, h, d.nodes(sid)[0])
    e = core.cache.get(key)
    if e is not None and e.sid == sid:
        node, addr, length = object_extent(e.value, core.unit)
        reads.append(_READ(core.alloc.home_of(node), addr + length - TAIL_BYTES, TAIL_BYTES))
    else:
        e = None
    batch = cast("list[Read | Write]", reads)   # (ours: a list less than ``[*a, *b]``)
    batch += writes
    return sid, e, firsts, batch


def _cached(core: OpCore, sid: int, e: CacheEntry | None, firsts: tuple[int, int],
            res: list[Any]) -> tuple[View, int]:
    """The buckets a ``_locate_batch`` round read, and the crc of the object the key's slot
    names if its cache entry ``e`` still holds (the common case: the slot is ``e``'s, and no
    generator runs for the rest of ``_locate``), else -1. (Not a ``Located``: compiled, a
    tuple of boxed ints made and freed on every write.)"""
    view = View(res[0] + res[1], firsts, sid)
    if e is not None and not view.stale:
        hit = view.get(e.pos) == e.value
        core.cache.outcome(e, hit)
        if hit:
            tail: bytes = res[2]
            return view, object_crc(tail)
    return view, -1


def _locate(core: OpCore, key: bytes, h: KeyHash, sid: int, view: View
            ) -> Op[Located | None]:
    """Generator: find the key's slot after a first round (``_locate_batch``) whose
    ``view`` of subtable ``sid`` did not find it cached. Returns where it is, or None
    (absent); follows splits, each round one bucket read."""
    suspects = None                         # made on a cache miss only
    waits = 0
    while True:
        if view.stale:
            waits = yield from core.split_seen(sid, waits)
        else:
            suspects = suspects or ObjectReads(core.unit)
            found = yield from find(core, key, view, h, suspects)
            if found is not False:
                return found and (sid, found[0], found[1], found[2].crc)
        sid, e, firsts, batch = _locate_batch(core, key, h, ())
        view, crc = _cached(core, sid, e, firsts, (yield from core.rt(batch)))
        if crc >= 0 and e is not None:
            return sid, e.pos, e.value, crc


def _replace_with(core: OpCore, key: bytes, value: bytes, opcode: int, then_insert: bool,
                  units: int) -> Op[None]:
    """Generator: the write, its object's lifecycle included as ``OpCore.with_objects``
    runs a body's, through the same calls of the core (``write_object``, ``made_object``,
    ``abandoned``) and counted the same way (``in_flight``, ``write_ended``): not run as a
    body of it, a generator level less on each of its round trips. An object that ends in
    Stalled or FRESH goes back (no round of ours is left open on it)."""
    core.in_flight += 1
    whole = False               # ended by its result or one of its own outcomes
    obj: NewObject | None = None
    tombstone = 0               # a DELETE's proposal, its object's value
    try:
        h = key_hash(key)
        open_round: ReplaceRound | None = None
        try:
            while True:
                if obj is None:     # the write's object (again after FRESH)
                    if opcode == DELETE:    # a fresh tombstone: recovery knows it by it
                        tombstone = core.free_value()
                        value = pack_u64(tombstone)
                    obj = core.write_object(opcode, key, value, units)
                    if obj is None:
                        obj = yield from core.made_object(opcode, key, value, units)
                    writes: Sequence[Write] = obj.writes
                try:
                    try:
                        # the key's slot: one round with the object's writes, inline (a
                        # generator level less on it); ``_locate`` only where its cache entry
                        # does not hold (each round trip of the common case is posted here,
                        # not through the ``core.rt`` generator: ``owing`` where the client
                        # owes something that rides with it, the previous write's free)
                        sid, e, firsts, batch = _locate_batch(core, key, h, writes)
                        if not core.owes():
                            res = yield batch
                        else:
                            owed = core.owing(batch)
                            try:
                                res = yield owed[0]
                            except TransportError as failed:
                                core.owed_failed(owed, failed)
                                raise
                            res, twice = core.owed_done(owed, res)
                            if twice:
                                yield from core.take_back(twice)
                        view, old_crc = _cached(core, sid, e, firsts, res)
                        absent = False
                        if old_crc >= 0 and e is not None:      # the cached slot
                            pos, v_old = e.pos, e.value
                        else:
                            found = yield from _locate(core, key, h, sid, view)
                            if found is None:
                                absent = True
                            else:
                                sid, pos, v_old, old_crc = found
                    except CorruptObject as damaged:
                        corrupt: CorruptObject | None = damaged
                    else:
                        corrupt = None
                    if corrupt is not None:     # (out of the except clause: tests/test_compiled.py)
                        yield from core.abandon(obj)
                        raise corrupt
                    writes = ()                 # (sent: none with the next rounds)
                    if absent:
                        if then_insert:
                            core.abandon_later(obj)
                        else:
                            yield from core.abandon(obj)
                        raise KeyNotFound(key)
                    v_new = (object_slot(h.fp, obj.units, obj.ptr, obj.seq) if opcode == UPDATE
                             else tombstone)
                    t = core.target(sid, pos)
                    ref = slot_ref(sid, pos)
                    current: list[int] = []
                    open_round = ReplaceRound(core.membership.epoch, t, v_old, v_new, old_crc)
                    verdict: Decision = WIN                 # with no backup, no round to decide
                    if t.backups:
                        cases = proposal_requests(t, v_old, v_new)
                        current, verdict = tally((yield cases) if not core.owes()
                                                 else (yield from core.rt(cases)), v_old, v_new)
                    if verdict == RULE3:
                        verdict = yield from resolve(core, t, v_old, v_new, current)
                    if verdict == WIN:
                        # with no backup there is no round to win: the primary CAS alone decides,
                        # and other writers may be as sure as we are (``Membership.fate``)
                        open_round.reached = WIN if t.backups else None
                        commit: Sequence[Request] = core.log.record(obj, COMMITTED, ref, v_old,
                                                                     old_crc)
                        if current.count(v_new) != len(current):
                            # another proposal on some backup (``fix_requests`` finds none when
                            # every backup took ours: the common case makes no Python call)
                            commit = [*fix_requests(t, current, v_new), *commit]
                        _ = (yield commit) if not core.owes() else (yield from core.rt(commit))
                        open_round.recorded = True
                        cas = [primary_request(t, v_old, v_new, open_round)]
                        # (indexed, not unpacked: compiled, an unpacking iterates)
                        held = ((yield cas) if not core.owes() else (yield from core.rt(cas)))[0]
                        if held == v_old:                   # the linearization point
                            _replaced(core, key, obj, opcode, t, v_old, v_new)
                            whole = True
                            return None
                        verdict = primary_lost(held, open_round)
                        if verdict == RESTART and t.backups:
                            yield from core.rt(unfreeze_requests(t, v_old, v_new))
                    elif verdict == LOSE:
                        open_round.reached = LOSE
                        core.counters["lost"] += 1
                        verdict = yield from await_change(core, t, v_old, current,
                                                          core.log.record(obj, LOST, ref, v_old))
                        if verdict == LOSE and opcode == UPDATE:
                            _overwritten(core, key, obj)
                            whole = True
                            return None
                        # a DELETE that lost must look again: the winner may have been an UPDATE
                    open_round = None
                    core.retry()
                    if verdict == RESTART:
                        yield from core.refresh()
                    continue
                except EPOCH_ENDS as ended:
                    err: TransportError = ended
                # the epoch ended (out of the except clause: no yield in one,
                # tests/test_compiled.py)
                writes = yield from core.epoch_ended(err, obj)
                if open_round is None:
                    continue
                r, open_round = open_round, None
                if (yield from _settle(core, key, obj, opcode, r, cas_went_out(r, err))) != FRESH:
                    whole = True
                    return None
                # a failover dropped the round's proposal: that object's log entry must never
                # commit again, a new object starts over
                yield from core.abandoned(obj)
                obj = None
        except Stalled as halt:
            stalled = halt
        if obj is not None:         # (out of the except clause: tests/test_compiled.py)
            yield from core.abandoned(obj)
        raise stalled
    except (KeyExists, KeyNotFound, Stalled):   # its own outcomes: withdrawn
        whole = True
        raise
    finally:
        core.write_ended(whole)


def _settle(core: OpCore, key: bytes, obj: NewObject, opcode: int, r: ReplaceRound,
            cased: bool) -> Op[Fresh | None]:
    """Generator: settle the round ``r`` an epoch's end cut short, from the failover's
    decisions (``OpCore.fate``): finish as a winner or as an overwritten loser, or FRESH.
    (A function of its own: the closures it makes would be cells of ``_replace_with``'s,
    made on every write.)"""
    # settling the round meets the end of the next epoch too when more MNs die
    fate = yield from core.retrying(
        lambda: core.fate(r.epoch, r.target, r.v_old, r.v_new, r.reached, cased))
    ref = slot_ref(r.target.sid, r.target.pos)
    if fate == WIN:         # our proposal took effect: finish as a winner
        if not r.recorded:  # (else the object may be the slot's next writer's now)
            yield from core.retrying(lambda: core.rt(
                core.log.record(obj, COMMITTED, ref, r.v_old, r.old_crc)))
        _replaced(core, key, obj, opcode, r.target, r.v_old, r.v_new)
        return None
    if fate == LOSE and opcode == UPDATE:
        yield from core.retrying(lambda: core.rt(core.log.record(obj, LOST, ref, r.v_old)))
        _overwritten(core, key, obj)
        return None
    return FRESH


def _replaced(core: OpCore, key: bytes, obj: NewObject, opcode: int, t: SlotTarget,
              v_old: int, v_new: int) -> None:
    """The primary holds ``v_new``: the old object is freed with the next batch."""
    if opcode == UPDATE:
        core.defer_free(v_old)
        # (``alone``: no other operation of this client holds the key's entry)
        core.cache.store(key, t.sid, t.pos, v_new, core.in_flight == 1)
    else:
        core.defer_free(v_old, then_release=obj.ptr)
        core.cache.drop(key)


def _overwritten(core: OpCore, key: bytes, obj: NewObject) -> None:
    """An UPDATE that lost its round: overwritten by the winner, linearized just before
    it; its object was never published."""
    core.cache.drop(key)
    core.alloc.release(obj.ptr)
