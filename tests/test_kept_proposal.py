"""An UPDATE or DELETE cut short by its client's crash after its proposal reached every
backup, the slot's primary dying before the next round trip: the failover keeps the proposal
(every live backup holds it), so the operation took effect, and the value it replaced went
with the primary (the client had not yet written its commit record, which names it).

The slow-MN rebuild cycles found it (seed 1064 on 4 MNs r = 3, ``test_rebuild_cycles``, a
delete): the recovery of the crashed client looked for the entry's proposal in the slots,
and a delete's tombstone not at all, so it marked the delete ABORTED, as one that never took
effect, and the object it had replaced was held, named by no slot, owned up to by no outcome.
An UPDATE's kept object whose slot had moved on by then (its replacer about to free it) was
marked ABORTED too, and so handed out again by the next holder of the id besides being freed
by its replacer: twice in the free lists. Recovery now finds the proposal in the failover's
record (``Membership.installed``), marks the entry COMMITTED and counts the replaced object
``OLD_LOST``, as it did for an UPDATE whose kept object it found in the slot; a recovery run
again after one cut short counts the entry so too, from its COMMITTED record with no old value.

These cases drive the window by hand (no seed: they cannot drift with the schedule)."""

from __future__ import annotations

import pytest

from fusee.audit import audit
from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.driver import run
from fusee.failover import failover
from fusee.layout import META_RECOVERY, unpack_u64
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.recovery import MASTER, OLD_LOST, recover_client
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import Cas, Read

from test_failover import _config, heir_once_freed


def _proposed_by_a_crashed_client(kind: str, nodes: int = 4, r: int = 3):
    """``nodes`` MNs, ``r`` replicas: A (client 0) inserted b"key"; B (client 1) updates or
    deletes it and crashes right after its proposal landed on every backup; the slot's
    primary dies and is failed over. Returns (config, transport, A, the membership, the
    slot, the proposal, the slot value B's operation replaced)."""
    cfg = _config(nodes, r)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a, b = ClientCore(cfg, 0), ClientCore(cfg, 1)
    for core in (a, b):
        run(core.open(), t)
    run(a.insert(b"key", b"A's"), t)
    e = a.cache.get(b"key")
    tgt = a.target(e.sid, e.pos)
    op = b.update(b"key", b"B's") if kind == "update" else b.delete(b"key")
    batch = op.send(None)
    while not (batch and all(type(r) is Cas and r.expected == e.value for r in batch)):
        batch = op.send(t.execute(batch))
    assert sorted(r.node for r in batch) == sorted(tgt.backups), batch
    t.execute(batch)                # the proposal lands everywhere; B crashes before the
    op.close()                      # commit record (which names the value replaced)
    proposal = batch[0].desired
    mem.crash(tgt.primary)
    m = run(failover(cfg, Membership(), tgt.primary), t)
    assert m.kept[1] == {(e.sid, e.pos): proposal}, m.kept
    a.place(m)
    return cfg, t, a, m, (e.sid, e.pos), proposal, e.value


def _checked(cfg, t, cores, m, report, replaced, value):
    """B's operation took effect (the key reads ``value``), and the one object held and
    named by no slot is the one it replaced, counted by the recovery."""
    assert report.outcomes == {OLD_LOST: 1}, report.outcomes
    reader = ClientCore(cfg, 5, membership=m)
    run(reader.open(), t)
    assert run(reader.search(b"key"), t) == value
    got = run(audit(cfg, [*cores, reader], m, excuse=lost_frees(t.memory, m)), t)
    assert len(got.leaked) == 1 and f"{replaced & ((1 << 46) - 1):#x}" in got.leaked[0], \
        got.explain()
    got.leaked = []
    assert got.ok, got.explain()


@pytest.mark.parametrize("nodes, r", [(4, 3), (3, 2)])
@pytest.mark.parametrize("kind", ["delete", "update"])
def test_a_crashed_write_whose_proposal_a_failover_kept_took_effect(kind, nodes, r):
    cfg, t, a, m, _, _, replaced = _proposed_by_a_crashed_client(kind, nodes, r)
    report = run(recover_client(cfg, 1, membership=m), t)
    run(a.close(), t)
    _checked(cfg, t, [a], m, report, replaced, b"B's" if kind == "update" else None)


def test_the_kept_tombstone_is_found_when_the_slot_moved_on_before_recovery():
    """Another insert takes the slot the tombstone freed before the recovery looks: the
    failover's record (``Membership.installed``) still tells that the delete took effect."""
    cfg, t, a, m, (sid, pos), tomb, replaced = _proposed_by_a_crashed_client("delete")
    slot = a.target(sid, pos)
    for i in range(200):            # bounded: keys until one lands in the tombstone's slot
        run(a.insert(b"other%d" % i, b"A's"), t)
        (raw,) = t.execute([Read(slot.primary, slot.addr, 8)])
        if unpack_u64(raw) != tomb:
            break
    else:
        raise AssertionError("no insert took the tombstone's slot")
    report = run(recover_client(cfg, 1, membership=m), t)
    run(a.close(), t)
    _checked(cfg, t, [a], m, report, replaced, None)


def test_a_kept_update_replaced_before_recovery_is_not_handed_out_twice():
    """A updates the key over B's kept object before B's recovery (A's free of it still on
    its way); B's id is taken over next. The entry, taken for aborted, made B's object free
    for the heir while A's free then reached it too: twice in the heir's free lists."""
    cfg, t, a, m, _, _, replaced = _proposed_by_a_crashed_client("update")
    assert run(a.search(b"key"), t) == b"B's"
    run(a.update(b"key", b"A's second"), t)            # its free of B's object is deferred
    report = run(recover_client(cfg, 1, membership=m), t)
    heir = heir_once_freed(cfg, t, 1, m, a)             # A's free goes out after the adoption
    _checked(cfg, t, [a, heir], m, report, replaced, b"A's second")


def test_a_recovery_run_again_after_marking_the_kept_delete_still_counts_it():
    """The master's recovery of B is cut short after it wrote its commit records (its last
    round trip, the release of the id, never goes out), then runs again: the entry is
    COMMITTED with no old value now, and still counted OLD_LOST (counted as having taken
    effect, the leak check of seed 1064 failed on an object no outcome owned)."""
    cfg, t, a, m, _, _, replaced = _proposed_by_a_crashed_client("delete")
    op = recover_client(cfg, 1, membership=m)
    meta = a.map.client_meta(1)
    batch = op.send(None)
    while not any(type(r) is Cas and r.addr == meta + META_RECOVERY and r.desired == 0
                  for r in batch):
        batch = op.send(t.execute(batch))
    op.close()                                          # the master died there
    (lock,) = t.execute([Read(a.meta_nodes[0], meta + META_RECOVERY, 8)])
    assert unpack_u64(lock) == MASTER + 1               # still held by the first run
    report = run(recover_client(cfg, 1, membership=m), t)
    run(a.close(), t)
    _checked(cfg, t, [a], m, report, replaced, None)
