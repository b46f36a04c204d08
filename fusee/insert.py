"""INSERT: SNAPSHOT on a free slot, plus the check that keeps a key in at most one slot.

Two clients inserting the same new key into two different free slots would both win their
slot's SNAPSHOT round. So an insert first *claims* its slot where other inserters look: on the
first backup for r >= 2 (the SNAPSHOT proposals themselves), or on the primary with the
TENTATIVE bit for r = 1 (readers ignore tentative slots). In the same batch, right after the
claim on that MN, it reads the key's buckets there. Like Dekker's flags, of two claims for the
same key at least one claimant sees the other. Then, before committing:

- the key is committed in another slot (primary): withdraw, KeyExists;
- another claim for the key sits at a LOWER position: withdraw, wait until that claim is
  resolved (committed or withdrawn), start over;
- claims only at HIGHER positions: wait until each is resolved, look again;
- otherwise commit the log entry and CAS the primary (the linearization point).

The lowest claim never waits for a lower one, so somebody always progresses. A withdrawn claim
ends its SNAPSHOT round by writing a fresh *void* (a free slot value unique to this client,
``layout.free_value``), so the slot never returns to an old value. An insert that loses the
round for its slot simply retries on another free slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal

from fusee.errors import KeyExists, Stalled
from fusee.hashing import key_hash
from fusee.index import SlotTarget, View
from fusee.layout import (ABORTED, COMMITTED, FROZEN, INSERT, TENTATIVE,
                          committed_object, decode_object, is_object, object_slot,
                          slot_fp, slot_ref, strip, unpack_u64)
from fusee.replication import (cas_went_out, fix_requests, primary_lost, primary_request,
                               proposal_requests, resolve, tally, unfreeze_requests)
from fusee.resize import split
from fusee.reuse import is_named
from fusee.verbs import EPOCH_ENDS, Cas, Op, Read, TransportError
from fusee.verdicts import FRESH, RESTART, RULE3, WIN, Fresh

if TYPE_CHECKING:
    from fusee.hashing import KeyHash
    from fusee.log import NewObject
    from fusee.op_core import OpCore
    from fusee.verdicts import Verdict

#: another inserter's claim to wait for: (position, claim value, primary value)
Rival = tuple[int, int, int]

#: what the duplicate check (``_check``) found: commit, withdraw (the key exists), withdraw
#: and wait for a lower claim, or start over (the subtable froze)
Check = Literal["clear", "exists", "yield", "restart"]
CLEAR: Final = "clear"
EXISTS: Final = "exists"
YIELD: Final = "yield"


class ClaimRound:
    """The SNAPSHOT round an INSERT has open on its claimed slot: what settling it takes when
    its epoch ends before the round does. (A class with its own ``__init__``, not a
    dataclass: compiled, a dataclass's ``__init__`` is generated Python, an interpreted call
    on every insert.)"""
    __slots__ = ("epoch", "target", "v_old", "committed", "cased")

    def __init__(self, epoch: int, target: SlotTarget, v_old: int) -> None:
        self.epoch, self.target, self.v_old = epoch, target, v_old
        #: False until the commit record is sent, None while it may have reached some
        #: replicas only, True once it is through
        self.committed: bool | None = False
        self.cased = False          # its primary CAS is in flight (``cas_went_out``)


def insert(core: OpCore, key: bytes, value: bytes, units: int = 0) -> Op[None]:
    """Generator: the INSERT operation of ``core`` (an OpCore). An insert that runs out of
    patience (Stalled) withdraws any claim it holds and gives its object back. (``units``:
    the object's size class where the caller checked it already.)"""
    return core.with_objects(INSERT, key, value, _insert, False, units)   # (positional: no
    # keyword arguments for a compiled call to parse)


def _insert(core: OpCore, obj: NewObject, key: bytes, opcode: int, value: bytes,
            then_insert: bool) -> Op[Fresh | None]:
    """Generator: the body of an INSERT (``OpCore.with_objects``; of its arguments it needs
    the core, the object and the key)."""
    h = key_hash(key)
    s = object_slot(h.fp, obj.units, obj.ptr, obj.seq)    # (the group's first MN's pointer)
    writes = obj.writes
    lost: dict[tuple[int, int], int] = {}       # (sid, pos) -> value when we lost it
    waits = 0                                   # re-reads spent waiting on other clients
    open_round: ClaimRound | None = None
    while True:
        try:
            sid, depth = core.dir.lookup(h)
            t_nodes = core.dir.nodes(sid)
            reads, firsts = core.dir.bucket_reads(sid, h, t_nodes[0])
            res = yield from core.rt([*reads, *writes])
            writes = []
            view = View(res[:2], firsts, sid)
            if view.stale:
                waits = yield from core.split_seen(sid, waits)
                continue
            cands = [v for _, v in view.candidates(h.fp)]
            unsettled = _lost_here(lost, sid, view) if lost else []
            pos = view.free_slot(unsettled)
            if pos is None:
                known: dict[int, bool] = {}
                bufs = (yield from core.rt(_object_reads(core, cands))) if cands else []
                if not _learn(known, key, cands, bufs):
                    waits = yield from core.waited(
                        waits, f"subtable {sid}: a candidate object is being replaced")
                    continue
                if any(known.values()):
                    yield from core.abandon(obj)
                    raise KeyExists(key)
                if unsettled:       # a slot we lost is still being settled: look again
                    waits = yield from core.waited(
                        waits, f"subtable {sid}: a lost round is not settled")
                    continue
                if not (yield from split(core, sid, depth, h.suffix(depth))):
                    waits = yield from core.waited(
                        waits, f"subtable {sid} is full and being split")
                continue
            v_old = view.get(pos)
            assert v_old is not None, "the view holds the free slot it chose"
            t = core.target(sid, pos)
            claim_node = t.backups[0] if t.backups else t.primary
            # the same buckets on the claim MN (made from ``reads``: a new key's buckets
            # are not among the reads the directory keeps)
            r0, r1 = reads[0], reads[1]         # (compiled: no iterator over the list)
            claim_reads = [Read(claim_node, r0.addr, r0.length), Read(claim_node, r1.addr,
                                                                      r1.length)]
            extra = claim_reads + _object_reads(core, cands) if cands else claim_reads
            open_round = ClaimRound(core.membership.epoch, t, v_old)
            if t.backups:
                k = len(t.backups)
                got = yield from core.rt([*proposal_requests(t, v_old, s), *extra])
                (current, verdict), got = tally(got[:k], v_old, s), got[k:]
                if verdict == RULE3:
                    verdict = yield from resolve(core, t, v_old, s, current)
                # (every backup took ours, the common case: no fix-up, and no interpreted
                # call of ``fix_requests`` to say so)
                if verdict == WIN and current.count(s) != k and (
                        fix := fix_requests(t, current, s)):
                    got = (yield from core.rt([*fix, *claim_reads]))[len(fix):] + got[2:]
                expected = v_old
            else:
                got = yield from core.rt([Cas(t.primary, t.addr, v_old, s | TENTATIVE), *extra])
                verdict = WIN if got[0] == v_old else primary_lost(got[0])
                got = got[1:]
                expected = s | TENTATIVE
            if verdict != WIN:
                open_round = None
                core.retry()
                if verdict == RESTART:
                    yield from core.refresh()
                else:
                    core.counters["lost"] += 1
                    lost[(sid, pos)] = v_old
                continue
            known = {}
            settled = _learn(known, key, cands, got[2:]) if cands else True
            claims = View(got[:2], firsts, sid)
            prims = claims if not t.backups else view
            stalled: Stalled | None = None
            try:
                if settled and _clear_at_once(t, h.fp, prims, claims):
                    outcome, other = CLEAR, None
                else:
                    outcome, other = yield from _check(core, t, s, h, key, firsts, prims,
                                                       claims, known, settled)
            except Stalled as halt:
                stalled = halt
            if stalled is not None:         # (out of the except clause: tests/test_compiled)
                yield from _withdraw(core, t, obj, s, v_old, expected)
                raise stalled
            if outcome == CLEAR:
                # the record may land on some replicas only: None until it is through
                open_round.committed = None
                yield from core.rt(core.log.record(obj, COMMITTED, slot_ref(sid, pos), v_old))
                open_round.committed = True
                held = (yield from core.rt([primary_request(t, expected, s, open_round)]))[0]
                if held == expected:                # the linearization point
                    core.cache.store(key, sid, pos, s)
                    return None
                if primary_lost(held, open_round) == RESTART and t.backups:
                    yield from core.rt(unfreeze_requests(t, v_old, s))
                open_round = None
                core.retry()
                yield from core.refresh()
                continue
            if outcome == RESTART:
                open_round = None
                core.retry()
                yield from core.refresh()
                continue
            yield from _withdraw(core, t, obj, s, v_old, expected)
            open_round = None
            if outcome == EXISTS:
                core.alloc.release(obj.ptr)
                raise KeyExists(key)
            core.retry()
            assert other is not None, "a YIELD names the lower claim to wait for"
            yield from _await_claim(core, t.sid, other, claim_node, t.primary)
            continue
        except EPOCH_ENDS as cut:
            err: TransportError = cut
        # the epoch ended (out of the except clause: no yield in one, tests/test_compiled.py)
        ended = core.membership.epoch
        writes = yield from core.epoch_ended(err, obj)
        if core.membership.epoch > ended:
            # every round the old epoch left open is closed: a round we lost there
            # either moved its slot on or was rolled back to the value we lost it at,
            # and then nobody will move it: free to claim again, not one to wait on
            lost.clear()
        if open_round is None:
            continue
        r, open_round = open_round, None
        return (yield from _settle(core, key, obj, s, r, cas_went_out(r, err)))


def _settle(core: OpCore, key: bytes, obj: NewObject, s: int, r: ClaimRound, cased: bool
            ) -> Op[Fresh | None]:
    """Generator: settle the claim round ``r`` (for slot value ``s``) an epoch's end cut
    short: None if the insert took effect, else FRESH. (A function of its own: the closures
    it makes would be cells of ``_insert``'s, made on every insert.)"""
    epoch, t, v_old, committed = r.epoch, r.target, r.v_old, r.committed
    if not t.backups:           # an r = 1 claim sits on the primary
        # committed: its primary CAS may have taken effect (the only way to know is the
        # slot), and no rival commits the key while the claim stands: finish it
        if committed and (yield from core.retrying(lambda: _publish(core, t, s))):
            core.cache.store(key, t.sid, t.pos, s)
            return None
        yield from core.retrying(lambda: _take_back(core, t, obj, s, v_old))
        return FRESH
    # settling the round meets the end of the next epoch too when more MNs die
    if committed is None:       # did the commit record reach a live replica?
        (buf,) = yield from core.retrying(lambda: core.rt([core.object_read(s)]))
        v = decode_object(buf)
        committed = (v is not None and v.state == COMMITTED
                     and v.slot_ref == slot_ref(t.sid, t.pos))
    # the failover keeps an insert's claim only once committed (checked for duplicates);
    # any other claim it withdrew
    decided: Verdict | None = WIN if committed else None
    fate = yield from core.retrying(lambda: core.fate(epoch, t, v_old, s, decided, cased))
    if fate == WIN:
        core.cache.store(key, t.sid, t.pos, s)
        return None
    return FRESH


def _learn(known: dict[int, bool], key: bytes, values: list[int], bufs: Sequence[bytes]
           ) -> bool:
    """Judge slot values by the objects read after the slots: ``known[v]`` says whether
    ``v`` names our key. A verdict is about the object read, not about the value: once the
    slot moves on, its object is freed and the memory reused, and the same value may name
    an object of our key again (``fusee.reuse``). So verdicts only judge the slot values read
    before them, and an object that does not decode or that ``v`` cannot name (``is_named``)
    is memory being reused: no verdict at all (returns False; the slots must be read
    again)."""
    settled = True
    for v, buf in zip(values, bufs):
        obj = decode_object(buf)
        if obj is None or not is_named(v, obj, key):
            settled = False
        else:
            known[v] = obj.key == key
    return settled


def _check(core: OpCore, t: SlotTarget, s: int, h: KeyHash, key: bytes,
           firsts: tuple[int, int], prims: View, claims: View,
           known: dict[int, bool], settled: bool) -> Op[tuple[Check, Rival | None]]:
    """Generator: the duplicate check once our claim is visible on the claim MN. ``claims``
    were read there after our claim, ``prims`` from the primary BEFORE that, ``known`` the
    verdicts (``_learn``) on objects read after both (``settled``: every one had a verdict).
    Returns (CLEAR | EXISTS | YIELD | RESTART, the (pos, claim value, primary value) to wait
    for).

    A slot whose claim-MN value equals its primary value is *settled*: backups take a new
    value before the primary and never return to an old one, so the primary held that value
    all along. Any other slot is judged from a primary read made AFTER the claim read (a
    claim seen there may have been committed since, or committed and then updated or deleted
    by a round whose proposal is all the claim MN still shows).

    Every read of the slots drops the verdicts: the objects are read again after it. The
    common case decodes no slot but the few naming our fingerprint (``View.pairs``).
    """
    r1 = not t.backups
    claim_node = t.primary if r1 else t.backups[0]
    after = r1              # are ``prims`` at least as recent as ``claims``?
    waits = 0
    while True:
        if not settled:     # an object was being replaced: the slots moved, read them again
            waits = yield from core.waited(
                waits, f"slot {t.sid}:{t.pos}: a rival's object is being replaced")
            reads = core.dir.bucket_reads(t.sid, h, claim_node)[0]
            bufs = yield from core.rt(reads + ([] if r1 else
                                               core.dir.bucket_reads(t.sid, h, t.primary)[0]))
            claims = View(bufs[:2], firsts, t.sid)
            prims = claims if r1 else View(bufs[2:], firsts, t.sid)
            after = r1      # (the same batch: no order between the two reads)
            known.clear()
            settled = True
            continue
        if prims.frozen:
            return RESTART, None
        # only slots naming our fingerprint can hold our key or a rival claim for it
        fp = h.fp
        others = claims.pairs(prims, fp, t.pos)
        unknown = _unknown(others, fp, s, known) if others else []
        if unknown:
            bufs = yield from core.rt(_object_reads(core, unknown))
            settled = _learn(known, key, unknown, bufs)
            continue
        if not after and claims.differs(prims, t.pos):
            prims = View((yield from core.rt(core.dir.bucket_reads(t.sid, h, t.primary)[0])),
                         firsts, t.sid)
            after = True
            known.clear()
            continue
        if not others:      # (the common case: no other slot names our fingerprint)
            return CLEAR, None
        if _exists(others, known):
            return EXISTS, None
        rivals = _rivals(others, s, known)
        for c in rivals:
            if c[0] < t.pos:
                return YIELD, c     # the first lower claim
        if not rivals:
            return CLEAR, None
        yield from _await_claim(core, t.sid, rivals[0], claim_node, t.primary)
        bufs = yield from core.rt(core.dir.bucket_reads(t.sid, h, claim_node)[0])
        claims = View(bufs, firsts, t.sid)
        if r1:
            prims = claims
        after = r1
        known.clear()


def _lost_here(lost: dict[tuple[int, int], int], sid: int, view: View) -> list[int]:
    """The positions of subtable ``sid`` whose rounds we lost that ``view`` still shows at
    the value we lost them at: being settled, not to be claimed again yet. (These helpers
    are functions of their own: a comprehension in ``_insert`` or ``_check`` makes cells of
    their variables on every insert.)"""
    return [p for (lsid, p), v in lost.items() if lsid == sid and view.get(p) == v]


def _object_reads(core: OpCore, values: list[int]) -> list[Read]:
    """The reads of the objects ``values`` name."""
    return [core.object_read(v) for v in values]


def _unknown(others: list[Rival], fp: int, s: int, known: dict[int, bool]) -> list[int]:
    """The objects (other than ours, ``s``) of fingerprint ``fp`` named by the slots
    ``others`` on either MN that have no verdict in ``known`` yet."""
    return list({v for _, cv, pv in others for v in (strip(cv), strip(pv))
                 if is_object(v) and slot_fp(v) == fp and v != s and v not in known})


def _exists(others: list[Rival], known: dict[int, bool]) -> bool:
    """A slot of ``others`` commits an object of our key on the primary."""
    return any(committed_object(pv) and known.get(pv) for _, _, pv in others)


def _rivals(others: list[Rival], s: int, known: dict[int, bool]) -> list[Rival]:
    """The slots of ``others`` holding another inserter's claim for our key on the claim MN
    (not yet on the primary)."""
    return [(p, cv, pv) for p, cv, pv in others if is_object(strip(cv))
            and strip(cv) != s and known.get(strip(cv)) and strip(cv) != pv]


def _clear_at_once(t: SlotTarget, fp: int, prims: View, claims: View) -> bool:
    """What ``_check``'s first look answers CLEAR to with no read (given verdicts on every
    candidate): the subtable is not frozen, no other slot names our fingerprint on either
    MN, and for r >= 2 no other slot moved between the primary's read and the claim MN's.
    The common case of an insert, without making ``_check``'s generator."""
    if not t.backups:       # (r >= 2: ``prims`` is the view whose ``stale`` said not frozen)
        return not prims.frozen and not claims.pairs(prims, fp, t.pos)
    return claims.quiet(prims, fp, t.pos)


def _await_claim(core: OpCore, sid: int, claim: Rival, claim_node: int, primary: int
                 ) -> Op[None]:
    """Generator: poll until another inserter's claim is resolved (its claim value or the
    slot's primary value changes); Stalled after ``core.patience`` polls."""
    pos, cv, pv = claim
    addr = core.geo.slot_addr(sid, pos)
    polls = 0
    while True:
        a, b = yield from core.rt([Read(claim_node, addr, 8), Read(primary, addr, 8)])
        if unpack_u64(a) != cv or unpack_u64(b) != pv:
            return
        polls = yield from core.waited(
            polls, f"slot {sid}:{pos}: another insert's claim is not resolved")


def _publish(core: OpCore, t: SlotTarget, s: int) -> Op[bool]:
    """Generator: finish a committed r = 1 claim whose primary CAS (``s | TENTATIVE -> s``)
    an epoch's end cut short: it may have taken effect, maybe in the very step a rebuild
    copied the slot onto the MN it rebuilt, so the slot tells, on every replica it has now
    (a rebuild copies the claim or ``s``; a failover leaves what the live replicas agree
    on). The CAS is made again there, backups first as in a round (recovery publishes a
    committed claim the same way, ``Recovery._claim_r1``). Returns whether the insert took
    effect: the slot held the claim (published now) or anything but it (``s`` landed, and
    maybe another writer has replaced it since: nobody else moves a claim). False only if a
    split froze the claim (it drops claims: the insert never took effect; the backups take
    the frozen value back, as after a round a split ended). Run under ``core.retrying``."""
    now, claim = core.target(t.sid, t.pos), s | TENTATIVE
    if now.backups:
        yield from core.rt([Cas(n, now.addr, claim, s) for n in now.backups])
    (old,) = yield from core.rt([Cas(now.primary, now.addr, claim, s)])
    if old == claim | FROZEN:
        if now.backups:
            yield from core.rt(unfreeze_requests(now, claim, s))
        return False
    return True


def _take_back(core: OpCore, t: SlotTarget, obj: NewObject, s: int, v_old: int
               ) -> Op[None]:
    """Generator: withdraw an r = 1 claim whose primary CAS was never made (or that a split
    froze). A rebuild published since copied the claim onto the MN it rebuilt: the claim is
    withdrawn from every replica the slot has now, or that copy would name our object
    forever (after its memory is reused: every insert of its fingerprint there would wait on
    it). That holds also when the MN the claim was made on died since: a failover leaves a
    copy that all the live replicas agree on as it is. Run under ``core.retrying``: an MN may
    die during it."""
    now = core.target(t.sid, t.pos)
    old = yield from _withdraw(core, now, obj, s, v_old, s | TENTATIVE, claim=s | TENTATIVE)
    # ``s`` there would be an insert that took effect, its object about to be given back
    assert old & ~FROZEN != s, f"slot {t.sid}:{t.pos}: a claim taken back had been published"


def _withdraw(core: OpCore, t: SlotTarget, obj: NewObject, s: int, v_old: int,
              expected: int, claim: int | None = None) -> Op[int]:
    """Generator: end our claimed round with a fresh void value (log entry marked first).
    ``claim``: what the backups hold (``s`` but for a claim taken back from a rebuilt
    copy). Returns the value the primary CAS found."""
    void = core.free_value()
    mark = core.log.record(obj, ABORTED, slot_ref(t.sid, t.pos), v_old)
    yield from core.rt([*(Cas(n, t.addr, claim or s, void) for n in t.backups), *mark])
    (old,) = yield from core.rt([primary_request(t, expected, void)])
    return int(old)
