"""A delete cut short by its client's crash after its tombstone reached every backup, the
slot's primary dying before the next round trip: the failover keeps the tombstone (every live
backup holds it), so the delete took effect, and the value it replaced went with the primary
(the client had not yet written its commit record, which names it).

The slow-MN rebuild cycles found it (seed 1064 on 4 MNs r = 3, ``test_rebuild_cycles``): the
recovery of the crashed client looked for the delete's slot value among the index's objects
only, never for its tombstone, so it marked the delete ABORTED, as one that never took effect,
and the object it had replaced was held, named by no slot, owned up to by no outcome. Recovery
now finds the tombstone in the slot (or, once the slot has moved on, in the failover's
record), marks the entry COMMITTED and counts the replaced object ``OLD_LOST``, as it does for
an UPDATE whose proposal a failover kept; a recovery run again after one cut short counts the
entry so too, from its COMMITTED record with no old value.

These cases drive the window by hand (no seed: they cannot drift with the schedule)."""

from __future__ import annotations

from fusee.audit import audit
from fusee.driver import run
from fusee.failover import failover
from fusee.layout import META_RECOVERY, unpack_u64
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.recovery import MASTER, OLD_LOST, recover_client
from fusee.verbs import Cas, Read

from test_failover import _two_clients


def _deleted_by_a_crashed_client():
    """4 MNs r = 3: A (client 0) inserted b"key"; B (client 1) deletes it and crashes right
    after its tombstone landed on both backups; the slot's primary dies and is failed over.
    Returns (config, memory, transport, A, the membership, the slot, the tombstone, the
    slot value the delete replaced)."""
    cfg, mem, t, a, b, e, tgt = _two_clients()
    op = b.delete(b"key")
    batch = op.send(None)
    while not (batch and all(type(r) is Cas and r.expected == e.value for r in batch)):
        batch = op.send(t.execute(batch))
    assert sorted(r.node for r in batch) == sorted(tgt.backups), batch
    t.execute(batch)                # the proposal lands everywhere; B crashes before the
    op.close()                      # commit record (which names the value replaced)
    tomb = batch[0].desired
    mem.crash(tgt.primary)
    m = run(failover(cfg, Membership(), tgt.primary), t)
    assert m.kept[1] == {(e.sid, e.pos): tomb}, m.kept
    a.place(m)
    return cfg, mem, t, a, m, (e.sid, e.pos), tomb, e.value


def _checked(cfg, t, a, m, report, replaced):
    """The delete took effect: the key is gone, and the one object held and named by no
    slot is the one it replaced, counted by the recovery."""
    assert report.outcomes == {OLD_LOST: 1}, report.outcomes
    reader = ClientCore(cfg, 5, membership=m)
    run(reader.open(), t)
    assert run(reader.search(b"key"), t) is None
    run(a.close(), t)
    got = run(audit(cfg, [a, reader], m), t)
    assert len(got.leaked) == 1 and f"{replaced & ((1 << 46) - 1):#x}" in got.leaked[0], \
        got.explain()
    got.leaked = []
    assert got.ok, got.explain()


def test_a_crashed_delete_whose_tombstone_a_failover_kept_took_effect():
    cfg, _, t, a, m, _, _, replaced = _deleted_by_a_crashed_client()
    report = run(recover_client(cfg, 1, membership=m), t)
    _checked(cfg, t, a, m, report, replaced)


def test_the_kept_tombstone_is_found_when_the_slot_moved_on_before_recovery():
    """Another insert takes the slot the tombstone freed before the recovery looks: the
    failover's record (``Membership.installed``) still tells that the delete took effect."""
    cfg, _, t, a, m, (sid, pos), tomb, replaced = _deleted_by_a_crashed_client()
    slot = a.target(sid, pos)
    for i in range(200):            # bounded: keys until one lands in the tombstone's slot
        run(a.insert(b"other%d" % i, b"A's"), t)
        (raw,) = t.execute([Read(slot.primary, slot.addr, 8)])
        if unpack_u64(raw) != tomb:
            break
    else:
        raise AssertionError("no insert took the tombstone's slot")
    report = run(recover_client(cfg, 1, membership=m), t)
    _checked(cfg, t, a, m, report, replaced)


def test_a_recovery_run_again_after_marking_the_kept_delete_still_counts_it():
    """The master's recovery of B is cut short after it wrote its commit records (its last
    round trip, the release of the id, never goes out), then runs again: the entry is
    COMMITTED with no old value now, and still counted OLD_LOST (it was counted as having
    taken effect, and the test's leak check then failed on an object no outcome owned)."""
    cfg, _, t, a, m, _, _, replaced = _deleted_by_a_crashed_client()
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
    _checked(cfg, t, a, m, report, replaced)
