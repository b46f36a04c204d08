"""Client-crash recovery, sans-IO: ``recover_client(config, client_id)`` is an
operation like any other (run it with ``fusee.driver.run``), for the master or for a client
restarting with the id (``Client(..., client_id=N, recover=True)``), which then adopts what
the id holds (``fusee.holdings.adopt``).

1. Start: the id's recovery lock (CAS; a second recoverer gets RecoveryInProgress), a fresh
   incarnation (so the tombstones recovery proposes are its own), the directory and every
   subtable's split lock. An id left CLEAN has nothing in flight: done.
2. Read the log (``fusee.recovery_log``): every object the id carved, from every replica of
   its blocks (each entry's newest commit record wins: records are numbered). Reading the
   blocks whole is a few round trips, not one per entry, and finds entries that memory reuse
   unlinked from the lists.
3. Finish the operations:
   - a split the client had locked is finished (``fusee.resize.finish``);
   - a COMMITTED entry: the object it replaced (its crc is in the record) tells whether the
     free it owed was delivered (bit set, used 0, or another object there since), which also
     proves the primary CAS, since the free follows it. Not delivered and the primary still
     holds the old value: the backups are fixed, the primary CASed, the old object freed.
     Not delivered and the primary moved on: the free is delivered now, if the CAS that
     moved it was ours (in a subtable that lost its backups, the commit records of the
     slot's writers since must say so: ``fusee.slot_history.moved_on_by_us``);
   - every other entry (pending, lost, aborted, or committed in a subtable that froze) is
     looked up by key on every replica of its current subtable: a SNAPSHOT round the client
     joined and nobody finished is redone with its proposal (the rules decide the same winner
     for everyone): an UPDATE or DELETE that wins is completed, an INSERT that wins is
     withdrawn (its outcome is unknown, and nothing observed it), a withdrawal half done is
     completed. An UPDATE's or DELETE's proposal that a failover left in a slot
     (``Membership.installed``: its primary died, every live backup held it) took effect
     there, though the slot may have moved on since; the value it replaced went with the
     primary (``OLD_LOST``). What took effect is marked COMMITTED, the rest LOST or ABORTED,
     so that the entries tell the next holder of the id which objects are free.
4. Release: blocks owned outside a complete group go back to their MNs, the id is marked
   CLEAN, the lock is released.

Waits on other clients (a split in progress, a round whose winner is another crashed client)
are bounded (``Stalled``: the master retries later). Every step is idempotent, so a recovery
that died half way is simply run again (by the same ``owner``).

Memory-node crashes: recovery runs under a membership (``fusee.membership``), reading live
replicas only. Under a dead MN not yet failed over it fails with NodeTimeout; the master runs
it again after the failover (``fusee.failover``), which closed every round the MN left open.

Design: docs/design.md#client-crash-recovery.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

from fusee.allocation import return_blocks
from fusee.config import ClusterConfig
from fusee.driver import observed
from fusee.errors import RecoveryInProgress, StoreFormatError
from fusee.hashing import key_hash
from fusee.holdings import scan
from fusee.index import HDR_MAGIC, INDEX_MAGIC, LOCKS, View, replica_nodes
from fusee.layout import (ABORTED, CLEAN, COMMITTED, DELETE, FROZEN, INSERT, LOST, META_INCARNATION,
                          META_RECOVERY, META_STATE, NO_SLOT, PENDING, TAIL_BYTES, TENTATIVE,
                          UPDATE, committed_object, decode_object, free_value_of, is_free,
                          is_object, object_tail, pack_u64, slot_addr, slot_node,
                          slot_ref, slot_units, unpack_u64)
from fusee.membership import Membership
from fusee.memory_map import HEADER_LAYOUT
from fusee.operations import ClientCore
from fusee.recovery_log import LogEntry, log_entries
from fusee.replication import SlotTarget, fix_requests, proposal_requests, resolve, tally
from fusee.verdicts import LOSE, RESTART, WIN
from fusee.resize import finish, holder
from fusee.slot_history import moved_on_by_us
from fusee.verbs import Cas, Faa, Op, Read, Request, Step, Write, chunks

#: the recovery-lock owner of the master; a client recovering its own id uses the id
MASTER = (1 << 32) - 1
#: the outcome of an entry a failover completed after the primary holding the value it
#: replaced had died: nothing tells which object that was, and it is never freed
OLD_LOST = "kept by a failover; the value it replaced is lost"
#: the outcome of a committed INSERT or UPDATE in a subtable left with one replica (its
#: backups died) whose slot moved on: it may never have taken effect, and then its object is
#: never freed
UNPROVEN = "committed with no backup; whether it took effect is unknown"


@dataclass
class RecoveryReport:
    client_id: int
    clean: bool = False             # the id was CLEAN: nothing was in flight
    objects: int = 0                # objects found in the id's blocks
    entries: int = 0                # ... of them with a readable log entry
    examined: int = 0               # entries that needed a look at the index
    outcomes: dict[str, int] = field(default_factory=dict)  # what recovery did, by kind
    frees_delivered: int = 0        # frees a crash had kept from delivery, sent now
    splits_finished: int = 0
    orphan_blocks: int = 0
    held: int = 0                   # objects still handed out afterwards (in the index, or
                                    # about to be freed by whoever replaced them)
    round_trips: int = 0
    verbs: int = 0
    phases: dict[str, float] = field(default_factory=dict)   # seconds per phase

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, outcomes=dict(self.outcomes), phases=dict(self.phases))


def recover_client(config: ClusterConfig, client_id: int, owner: int = MASTER,
                   clock: Callable[[], float] = time.perf_counter,
                   membership: Membership = Membership(), leave: int = CLEAN
                   ) -> Op[RecoveryReport]:
    """Generator: recover ``client_id`` (crashed, or its lease ran out) under ``membership``;
    returns a RecoveryReport. ``owner`` tags the recovery lock (a recovery that died is re-run
    by the same owner); ``clock`` times the phases for the report; ``leave`` is the STATE word
    the id is left with (a live client settling its own id keeps its claim: ``fusee.settle``)."""
    return Recovery(config, client_id, owner, clock, membership, leave).run()


class Recovery:
    def __init__(self, config: ClusterConfig, client_id: int, owner: int = MASTER,
                 clock: Callable[[], float] = time.perf_counter,
                 membership: Membership = Membership(), leave: int = CLEAN) -> None:
        self.core = ClientCore(config, client_id, membership=membership)
        self.cid, self.owner, self.clock, self.leave = client_id, owner, clock, leave
        self.meta = self.core.map.client_meta(client_id)
        self.report = RecoveryReport(client_id)
        self.locks: list[int] = []

    def run(self) -> Op[RecoveryReport]:
        """Generator: the whole recovery; returns the report."""
        return (yield from observed(self._run(), self._count))

    def _run(self) -> Op[RecoveryReport]:
        rep = self.report
        t0 = self.clock()
        yield from self._start()
        if rep.clean:
            yield from self._release()
            rep.phases["total"] = self.clock() - t0
            return rep
        found = yield from scan(self.core.alloc, copies=True)
        entries = log_entries(found, self.core.unit)
        rep.objects, rep.entries = len(found.objects), len(entries)
        t1 = self.clock()
        rep.phases["read_logs"] = t1 - t0
        yield from self._splits()
        yield from self._finish(entries)
        t2 = self.clock()
        rep.phases["finish_ops"] = t2 - t1
        yield from return_blocks(self.cid, found.orphans)
        rep.orphan_blocks = len(found.orphans)
        yield from self._release()
        rep.phases["release"] = self.clock() - t2
        rep.phases["total"] = self.clock() - t0
        return rep

    def _count(self, step: Step) -> None:
        """Count a round trip and its verbs for the report."""
        self.report.round_trips += 1
        self.report.verbs += len(step)

    def _outcome(self, kind: str) -> None:
        self.report.outcomes[kind] = self.report.outcomes.get(kind, 0) + 1

    # -- 1. start / 4. release ---------------------------------------------------------------
    def _start(self) -> Op[None]:
        core, geo, meta = self.core, self.core.geo, self.meta
        m0 = core.meta_nodes[0]         # the directory's first live replica, too
        batch: list[Request] = [
            core.dir.read(), Read(m0, geo.header_word(HDR_MAGIC), 8),
            Read(m0, HEADER_LAYOUT, 8), Cas(m0, meta + META_RECOVERY, 0, self.owner + 1),
            Read(m0, meta + META_STATE, 8),
            Read(m0, geo.header_word(LOCKS), 8 * geo.max_subtables)]
        res = yield batch + [Faa(m, meta + META_INCARNATION, 1) for m in core.meta_nodes]
        if unpack_u64(res[2]) != core.map.fingerprint or unpack_u64(res[1]) != INDEX_MAGIC:
            raise StoreFormatError("the memory nodes were formatted for another layout")
        if res[3] == self.cid + 1 and self.owner == MASTER:
            # the client was settling its own id (``fusee.settle``) when it died: the master,
            # which recovers only an id whose client it deems dead, takes its lock over and
            # runs the recovery again (each step is idempotent); else the id stays wedged
            (res[3],) = yield [Cas(m0, meta + META_RECOVERY, self.cid + 1, self.owner + 1)]
            res[3] = 0 if res[3] == self.cid + 1 else res[3]
        if res[3] not in (0, self.owner + 1):
            raise RecoveryInProgress(f"client {self.cid} is being recovered by "
                                     f"{res[3] - 1:#x}")
        core.dir.load(res[0])
        core.free_seq = (max(res[6:]) + 1) << 28     # as ClientCore.open: its own range
        self.report.clean = unpack_u64(res[4]) == CLEAN
        self.locks = [unpack_u64(res[5], 8 * i) for i in range(geo.max_subtables)]

    def _release(self) -> Op[None]:
        """Mark the id CLEAN (or ``leave``) and release the lock. An id found CLEAN is not
        written: a client may have claimed it meanwhile (``ClientCore.open``), and CLEAN would
        hand it out twice."""
        meta = self.meta
        nodes = self.core.meta_nodes
        clean = [] if self.report.clean else [Write(m, meta + META_STATE, pack_u64(self.leave))
                                              for m in nodes]
        yield clean + [Cas(nodes[0], meta + META_RECOVERY, self.owner + 1, 0)]

    # -- 3. finishing ----------------------------------------------------------------------
    def _splits(self) -> Op[None]:
        for sid, lock in enumerate(self.locks):
            if holder(lock) == self.cid:
                yield from finish(self.core, sid, lock)
                self.report.splits_finished += 1

    def _finish(self, entries: list[LogEntry]) -> Op[None]:
        core = self.core
        committed = [e for e in entries if e.v.state == COMMITTED]
        looks = [e for e in entries if e.v.state == PENDING or e.v.state == LOST or
                 (e.v.state == ABORTED and e.v.slot_ref != NO_SLOT)]
        if committed:
            looks += (yield from self._committed(committed))
        keys: dict[bytes, list[LogEntry]] = {}
        for e in looks:
            keys.setdefault(e.v.key, []).append(e)
        self.report.examined = len(looks)
        for key, group in keys.items():
            yield from self._by_key(key, group, entries)
        for e in looks:
            proposal = e.tomb if e.v.opcode == DELETE else e.s if e.v.opcode == UPDATE else None
            if not (e.linearized or e.lost) and proposal is not None:
                # a failover kept the proposal of a round no one decided here (the primary
                # died; every live backup held it): it took effect, though the slot may
                # have moved on since (then, for an UPDATE, its replacer frees the object:
                # taken for aborted, it would be handed out again as well)
                where = core.membership.installed(proposal)
                if where is not None:
                    e.linearized, e.found_at = True, where
        marks = []
        for e in looks:
            if e.linearized:
                if e.v.state != COMMITTED and e.found_at is not None:
                    # a failover kept its proposal (the old primary died with the old value,
                    # so no free is owed: that object stays behind, counted here)
                    marks += self._mark(e, COMMITTED, slot_ref(*e.found_at), 0, 0)
                    self._outcome(OLD_LOST)
                continue
            state = LOST if e.lost else ABORTED
            if e.v.state != state or e.v.slot_ref != NO_SLOT:
                marks += self._mark(e, state, NO_SLOT, 0, 0)
            self._outcome("lost" if e.lost else "aborted")
        for e in entries:
            if not e.synced:    # the next holder reads the primary copy: every replica
                marks += e.rewrite(self.core.unit, self.core.membership.dead)  # says the same
        for batch in chunks(marks):
            yield from core.rt(batch)
        self.report.held = sum(1 for e in entries if e.v.state == COMMITTED and
                               e.v.opcode != DELETE and not e.c.freed)

    def _dropped(self, e: LogEntry) -> bool:
        """A failover took ``e``'s proposal off its slot: the round ``e`` committed in never
        took effect (its client went on with another object, if it did)."""
        proposal = e.s if e.s is not None else e.tomb
        return proposal is not None and self.core.membership.was_dropped(
            e.v.slot_ref >> 32, e.v.slot_ref & 0xFFFFFFFF, proposal, e.c.crc)

    def _committed(self, entries: list[LogEntry]) -> Op[list[LogEntry]]:
        """Generator: step A for COMMITTED entries; returns those whose round died in a
        split or was rolled back by a failover (to look up by key).

        For an UPDATE or DELETE the replaced object tells whether the free the operation
        owed was delivered (its bit set, used 0, or another object there since); that can
        only change by the crashed client's hand, and the free follows the primary CAS, so a
        delivered free also says that the CAS happened, whatever value the slot holds now
        (a value can come back when memory is reused). A free not delivered while the slot
        moved on is ours to deliver only if our CAS moved it, which a subtable that lost
        its backups does not prove (``moved_on_by_us``)."""
        core, unit = self.core, self.core.unit
        reqs, where = [], []
        for e in entries:
            sid, pos = e.ref
            t = core.target(sid, pos)
            old = e.v.old_value
            reqs.append(Read(t.primary, t.addr, 8))
            if is_object(old) and e.v.opcode != INSERT:
                # the bit before the tail (one MN: posting order): a reclaim writes used 0
                # and then clears the bit, so a clear bit read first and a tail read after it
                # see the used 0 (or the next object there) of a free that was delivered; the
                # other order can see used 1 from before the reclaim and the bit after it,
                # and deliver the free again, to an object reused meanwhile (double free)
                free = core.alloc.free_request(old)
                assert free.node == core.alloc.home_of(slot_node(old))
                reqs += [Read(free.node, free.addr, 8),
                         Read(free.node, slot_addr(old, unit) + slot_units(old) * unit
                              - TAIL_BYTES, TAIL_BYTES)]
            where.append((e, t, len(reqs)))
        res = []
        for batch in chunks(reqs):
            res += yield from core.rt(batch)
        dead, start = [], 0
        for e, t, end in where:
            got, start = res[start:end], end
            p, old = unpack_u64(got[0]), e.v.old_value
            if self._dropped(e):
                dead.append(e)                  # looked up by key, and marked
                continue
            owed = False                        # a free not delivered
            if len(got) == 3:
                crc, used = object_tail(got[2])
                bit = core.alloc.free_request(old).delta
                owed = crc == e.v.old_crc and used == 1 and not unpack_u64(got[1]) & bit
            expect = {old}
            if e.v.opcode == INSERT:
                assert e.s is not None, "an INSERT entry proposes a slot value"
                expect.add(e.s | TENTATIVE)
            if p & FROZEN and p & ~FROZEN in expect:
                # a split froze the slot before our CAS: never took effect here. ``old``'s
                # free says nothing (the split copied ``old`` on; a writer there may have
                # freed it): tests/test_hostile_combos.py
                dead.append(e)
                continue
            if (owed or len(got) == 1) and p & ~FROZEN in expect:
                if e.v.opcode == INSERT and p == old:
                    # its claim never reached the primary, so nobody observed it (a helper,
                    # or a failover of the primary, would have put it there), and the round
                    # it won may have been closed unseen since (its backups died with the
                    # claim): another insert of the key may have taken effect elsewhere.
                    # Withdrawn by key, as an insert not committed: SNAPSHOT again would
                    # not check for the key again (two slots of one key)
                    dead.append(e)
                    continue
                ok = yield from self._win_again(e, t, p)
                if not ok:
                    dead.append(e)
                continue
            proven = False                  # our primary CAS took the slot off ``old``
            if (owed or e.v.opcode == UPDATE and not e.c.freed) and not self._backed(t.sid):
                # the slot moved on, but in a subtable that lost its backups that proves
                # nothing: the round may have been closed, unseen, by the failover of the
                # backups that held our proposal (``fusee.slot_history``), or have had no
                # backup (another writer's CAS came first), or been run again by a recovery
                # cut short after it lost (before its LOST mark): an UPDATE's object, held
                # unless the slot's writers say our CAS took, would leak
                by_us = yield from moved_on_by_us(self.core, e, p)
                if by_us is False:
                    dead.append(e)          # another writer replaced ``old`` and frees it
                    continue
                if by_us is None:
                    # whoever replaced ``old`` owes its free, and that may be us or not:
                    # it is held (delivered by both, the bit would carry into the next
                    # object's); so is an UPDATE's object, if the CAS was not ours
                    e.linearized = True
                    self._outcome(UNPROVEN)
                    continue
                proven = True
            e.linearized = True
            if e.v.opcode in (INSERT, UPDATE) and p != e.s and not e.c.freed \
                    and not proven and not self._backed(t.sid):
                # no SNAPSHOT round without backups: committed is not "won", and another
                # writer's primary CAS may have beaten this one; if so its object stays held
                # (freed, it was named by the slot and replaced: it did take effect).
                # So too a round whose backups all died before its primary CAS: the failover
                # left the primary its old value, and an INSERT's slot may have been taken
                # since. Freeing the object instead could free it twice: if the CAS did take
                # effect, the writer that replaced it may still be on its way to free it
                self._outcome(UNPROVEN)
            elif e.v.opcode != INSERT and not is_object(old):
                # marked so by a recovery that found its proposal kept by a failover (and
                # was cut short before it reported it): the value it replaced is lost
                self._outcome(OLD_LOST)
            else:
                self._outcome("had taken effect")
            if owed:
                yield from self._free(old)
                self.report.frees_delivered += 1
        return dead

    def _free(self, old: int) -> Op[None]:
        """Generator: free ``old``'s object now, as a client's deferred free goes out: one
        that finds the bit set already is taken back (``ClientCore.rt``)."""
        self.core.defer_free(old)
        yield from self.core.rt([])

    def _backed(self, sid: int) -> bool:
        """Did every round ever opened in subtable ``sid`` have a backup, and did every
        failover that ended one see it (``Membership.backed``)? A log entry does not say in
        which epoch its round was, so every epoch so far must have left the subtable two
        live replicas."""
        d = self.core.dir
        return self.core.membership.backed(replica_nodes(sid % d.n, d.n, d.r))

    def _win_again(self, e: LogEntry, t: SlotTarget, p: int) -> Op[bool]:
        """Generator: finish the round of committed ``e`` whose primary CAS did not happen
        (the primary still holds ``p``), if it is still ``e``'s to finish. Returns whether
        its primary CAS took.

        COMMITTED says the round was won only if the slot had backups then: a round with
        none wins at once, and the slot may have backups again since (a rebuild), where
        another writer's round on ``p`` is open now. So the crashed client's proposal goes
        through SNAPSHOT again rather than over whatever the backups hold: a round it did
        win finds its proposal on the backups and wins again (only a winner touches them),
        one it did not competes as any writer's does. Overwriting the other writer's
        proposal instead left a backup naming this object once that writer's primary CAS
        took: the key deleted came back from that backup at the next failover."""
        core = self.core
        if e.v.opcode == DELETE:            # its tombstone, if a backup has it, else afresh
            now = [unpack_u64(b) for b in
                   (yield from core.rt([Read(n, t.addr, 8) for n in t.backups]))]
            v_new = next((v for v in now if free_value_of(v, self.cid)), core.free_value())
        else:
            assert e.s is not None, "an INSERT or UPDATE entry proposes a slot value"
            v_new = e.s
        current: list[int] = []
        if t.backups:
            current, _ = tally((yield from core.rt(proposal_requests(t, p, v_new))), p, v_new)
        verdict = yield from resolve(core, t, p, v_new, current)
        if verdict == LOSE:
            # marked LOST at once, as a live loser marks its entry with its first wait: the
            # winner's primary CAS may land before this recovery's last marks, and a rerun
            # after a cut (an MN or the master died) would read the entry COMMITTED with its
            # slot moved on, in a subtable that lost its backups: UNPROVEN, its object held
            # for good, named by no slot (tests/test_recovery_win_again_rerun.py)
            assert not self._backed(t.sid), "a round won with a backup is won again"
            e.lost = True
            yield from core.rt(self._mark(e, LOST, NO_SLOT, 0, 0))
        if verdict != WIN:
            return False
        return (yield from self._complete(e, t, p, v_new, current, e.v.old_crc))

    def _complete(self, e: LogEntry, t: SlotTarget, p: int, v_new: int | None,
                  current: list[int] | None, old_crc: int) -> Op[bool]:
        """Generator: finish the round at ``t`` that ``e`` won (primary holds ``p``): fix the
        backups, record COMMITTED, CAS the primary, free the old object. ``v_new`` None: a
        DELETE, whose tombstone is read off the backups (or made afresh). Returns whether
        the primary CAS took (False: the slot froze)."""
        core = self.core
        if current is None:
            current = [unpack_u64(b) for b in
                       (yield from core.rt([Read(n, t.addr, 8) for n in t.backups]))]
        if v_new is None:
            mine = [v for v in current if free_value_of(v, self.cid)]
            v_new = mine[0] if mine else core.free_value()
        old = p & ~TENTATIVE if e.v.opcode != INSERT else e.v.old_value
        marks = []
        if not (e.v.state == COMMITTED and e.v.slot_ref == slot_ref(t.sid, t.pos)):
            marks = self._mark(e, COMMITTED, slot_ref(t.sid, t.pos), old, old_crc)
        first = fix_requests(t, current, v_new) + marks
        if first:                   # as the writer would: fix and commit, then the primary
            yield from core.rt(first)
        (old_p,) = yield from core.rt([Cas(t.primary, t.addr, p, v_new)])
        if old_p != p:
            return False
        e.linearized = True
        self._outcome("completed")
        if committed_object(old) and e.v.opcode != INSERT:
            yield from self._free(old)
        return True

    def _by_key(self, key: bytes, group: list[LogEntry], entries: list[LogEntry]) -> Op[None]:
        """Generator: step B: settle every round on ``key``'s slots that carries a trace of
        the crashed client."""
        core, h = self.core, key_hash(key)
        mine = {e.s: e for e in entries if e.s is not None and e.v.key == key}
        deletes = [e for e in group if e.v.opcode == DELETE]
        waits = 0
        while True:
            sid, _ = core.dir.lookup(h)
            nodes = core.dir.nodes(sid)
            # the primary first, the backups after: a proposal of ours still on a backup then
            # means its round was open all along, so the primary read is that round's v_old
            reads, firsts = core.dir.bucket_reads(sid, h, nodes[0])
            res = yield from core.rt(reads)
            if len(nodes) > 1:
                more = []
                for n in nodes[1:]:
                    more += core.dir.bucket_reads(sid, h, n)[0]
                res += yield from core.rt(more)
            views = [View(res[2 * i:2 * i + 2], firsts, sid) for i in range(len(nodes))]
            if views[0].stale:
                waits = yield from core.waited(
                    waits, f"recovery of client {self.cid}: subtable {sid} is being split")
                yield from core.refresh()
                continue
            acted = False
            prim = views[0].slots
            for pos, p in prim.items():
                backups = [v.slots[pos] for v in views[1:]]
                t = core.target(sid, pos)
                if committed_object(p) and p in mine:
                    mine[p].linearized = True           # took effect here
                    mine[p].found_at = (sid, pos)
                if p & TENTATIVE and p & ~TENTATIVE in mine:
                    yield from self._claim_r1(mine[p & ~TENTATIVE], t, p)
                    acted = True
                    continue
                if not backups:
                    continue
                if all(b == p for b in backups):
                    continue
                voids = [b for b in backups if b != p and free_value_of(b, self.cid)]
                ours = [b for b in backups if b != p and b in mine]
                if voids and is_free(p):
                    yield from self._withdrawn(t, p, voids[0])
                    acted = True
                elif ours:
                    acted |= yield from self._redo(mine[ours[0]], t, p, ours[0])
                elif voids and committed_object(p) and deletes:
                    e = yield from self._delete_of(deletes, key, p)
                    if e is not None:
                        acted |= yield from self._redo(e, t, p, voids[0])
            if not acted:
                return
            waits = yield from core.waited(waits, f"recovery of client {self.cid}: key {key!r}")

    def _claim_r1(self, e: LogEntry, t: SlotTarget, p: int) -> Op[None]:
        """Generator: an r = 1 insert's TENTATIVE claim: committed -> publish it; else
        withdraw it with a fresh void. The slot may have backups again, holding the claim
        too: a rebuild copied it onto the MN it rebuilt. They take the value first, as
        backups do in a round, or the copy would name the object after its memory is
        reused (every insert of its fingerprint there would wait on it)."""
        committed = e.v.state == COMMITTED and e.v.slot_ref == slot_ref(t.sid, t.pos)
        assert not committed or e.s is not None, "an insert's entry proposes a slot value"
        new = e.s if committed and e.s is not None else self.core.free_value()
        if t.backups:
            yield from self.core.rt([Cas(n, t.addr, p, new) for n in t.backups])
        (old,) = yield from self.core.rt([Cas(t.primary, t.addr, p, new)])
        if old == p and committed:
            e.linearized = True
            self._outcome("completed")
        elif old == p:
            self._outcome("withdrawn")

    def _withdrawn(self, t: SlotTarget, p: int, void: int) -> Op[None]:
        """Generator: finish an insert's withdrawal: its claim -> the void on every backup,
        then on the primary."""
        core = self.core
        cur = [unpack_u64(b) for b in
               (yield from core.rt([Read(n, t.addr, 8) for n in t.backups]))]
        rest = [Cas(n, t.addr, v, void) for n, v in zip(t.backups, cur)
                if v != void and not free_value_of(v, self.cid) and not v & FROZEN]
        if rest:
            yield from core.rt(rest)
        yield from core.rt([Cas(t.primary, t.addr, p, void)])     # the backups first
        self._outcome("withdrawn")

    def _redo(self, e: LogEntry, t: SlotTarget, p: int, v_new: int) -> Op[bool]:
        """Generator: SNAPSHOT again with the crashed client's proposal ``v_new`` in the open
        round on ``t`` (primary ``p``). Returns whether it changed anything."""
        core = self.core
        extra = []
        if committed_object(p):
            u = slot_units(p) * core.unit
            extra = [Read(core.alloc.home_of(slot_node(p)), slot_addr(p, core.unit) + u -
                          TAIL_BYTES, TAIL_BYTES)]
        k = len(t.backups)
        got = yield from core.rt([*proposal_requests(t, p, v_new), *extra])
        (current, _), got = tally(got[:k], p, v_new), got[k:]
        verdict = yield from resolve(core, t, p, v_new, current)
        if verdict == LOSE:
            e.lost = True
            return False
        if verdict == RESTART:
            return True
        assert verdict == WIN
        if e.v.opcode == INSERT:
            void = core.free_value()
            # the entry marked ABORTED before the claim is withdrawn anywhere, as the client's
            # own withdrawal does (``insert._withdraw``): a recovery cut short after that (an
            # MN died) runs again, and an entry still COMMITTED whose slot moved on (the void,
            # another insert) would read as an insert that took effect: its object held, but
            # named by no slot, for good. A failover withdraws an ABORTED claim, too
            ref = slot_ref(t.sid, t.pos)
            first: list[Request] = [*fix_requests(t, current, v_new)]
            if e.v.state != ABORTED or e.v.slot_ref != ref:
                first += self._mark(e, ABORTED, ref, p, 0)
            if first:
                yield from core.rt(first)
            yield from core.rt([Cas(n, t.addr, v_new, void) for n in t.backups])
            yield from core.rt([Cas(t.primary, t.addr, p, void)])
            self._outcome("withdrawn")
            return True
        yield from self._complete(e, t, p, v_new, current, object_tail(got[0])[0])
        return True

    def _delete_of(self, deletes: list[LogEntry], key: bytes, p: int) -> Op[LogEntry | None]:
        """Generator: the DELETE entry whose tombstone is proposed against ``p`` (``p``'s
        object must hold ``key``), or None."""
        (buf,) = yield from self.core.rt([self.core.object_read(p)])
        obj = decode_object(buf)
        return deletes[0] if obj is not None and obj.key == key else None

    def _mark(self, e: LogEntry, state: int, ref: int, old: int, old_crc: int) -> list[Write]:
        return e.mark(state, ref, old, old_crc, self.core.unit, self.core.membership.dead)
