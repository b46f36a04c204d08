"""Windows of seed-pinned regressions as scripted interleavings: no seed, so no schedule to
drift (``regression_windows`` has the seeded forms and their windows).

Each test drives the operations by hand, batch by batch, on the in-process memory, placing
the crash, failover and rebuild exactly where the bug's analysis puts them, as
``test_insert_epoch_end`` does for seed 518.
"""

from __future__ import annotations

import pytest
from test_failover import _config
from test_insert_epoch_end import _drive, _rebuilt

from fusee.audit import audit
from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.emulator.testkit.index_check import check_index
from fusee.emulator.testkit.trace import COMMITTED, commit_record
from fusee.driver import run
from fusee.errors import EpochChanged, KeyExists, NodeTimeout
from fusee.failover import failover
from fusee.hashing import key_hash
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.recovery import OLD_LOST, UNPROVEN, recover_client
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import AwaitMembership, Cas

KEY = b"k0"


def _up_to_the_primary_cas(cfg, write, before=None, record=False, key=KEY):
    """Clients A and B open on a fresh cluster (then ``before(cfg, memory, transport, A)``);
    A's ``write(A)`` (an operation on ``key``) is driven up to its batch that holds the CAS on
    the key's primary (``record``: its COMMITTED record, the batch before), not posted.
    Returns (memory, transport, A, B, the operation, that batch)."""
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a, b = ClientCore(cfg, 0), ClientCore(cfg, 1)
    run(a.open(), t)
    run(b.open(), t)
    if before is not None:
        before(cfg, mem, t, a)
    primary = a.dir.nodes(a.dir.lookup(key_hash(key))[0])[0]
    op = write(a)
    batch = next(op)
    while not (any(map(_committed, batch)) if record else
               any(isinstance(c, Cas) and c.node == primary for c in batch)):
        batch = op.send(t.execute(batch))
    return mem, t, a, b, op, batch


def _committed(req) -> bool:
    """``req`` writes a COMMITTED record."""
    record = commit_record(req)
    return record is not None and record[0] == COMMITTED


def test_a_won_round_judged_after_its_primary_was_rebuilt():
    """Seed 526 of the rebuild cycles (3 MNs r = 3): A's put of an absent key wins its slot
    on both backups and commits; its primary dies before the primary CAS goes out. The
    failover keeps A's committed claim, B updates the key over it (acknowledged), and the
    dead MN is rebuilt with B's value. A, learning the new epoch, must not judge its round
    by that rebuilt primary (it holds neither A's value nor the old one: a LOSE, after which
    A inserted again and updated the key back, its one put taking effect twice around B's
    update). It goes by its own WIN, which the failover kept: B's value stays."""
    cfg = _config(3, 3)
    mem, t, a, b, op, batch = _up_to_the_primary_cas(cfg, lambda a: a.put(KEY, b"A's"))
    primary = a.dir.nodes(a.dir.lookup(key_hash(KEY))[0])[0]
    mem.crash(primary)
    m1 = run(failover(cfg, Membership(), primary), t)
    b.place(m1)
    run(b.update(KEY, b"B's"), t)                # acknowledged
    t, m2 = _rebuilt(cfg, mem, m1, primary)
    batch = op.throw(NodeTimeout(f"MN {primary} did not answer", primary))
    if batch and type(batch[0]) is not AwaitMembership:
        batch = op.throw(EpochChanged(m2))      # posted in an epoch that ended
    assert _drive(op, batch, t, m2) is None
    b.place(m2)
    for core in (a, b):
        run(core.close(), t)                    # frees in flight delivered
    reader = ClientCore(cfg, 7, membership=m2)
    run(reader.open(), t)
    assert run(reader.search(KEY), t) == b"B's"
    report = run(audit(cfg, [a, b, reader], m2, excuse=lost_frees(mem, m2)), t)
    assert report.ok, report.explain()


def test_a_won_round_whose_unanswered_primary_cas_a_later_write_replaced():
    """Seeds 916 and 1860 of the slow-MN rebuild cycles (as 1860 runs on 00645c3^): A's
    insert wins its slot on the backup, commits, and CASes the primary, which is slow: the
    CAS takes effect, its reply comes too late. The backup dies; in the next epoch C puts the
    key over A's value (acknowledged) before A learns that its batch failed. A's fate reads
    the primary: neither the old value nor A's, a third value that only a round after A's
    could have put there. A must take WIN (it used to take LOSE and insert the key again
    with its object, which C's put had already given back)."""
    cfg = _config(3, 2)
    mem, t, a, c, op, batch = _up_to_the_primary_cas(cfg, lambda a: a.insert(KEY, b"A's"))
    primary, backup = a.dir.nodes(a.dir.lookup(key_hash(KEY))[0])
    t.execute(batch)                            # took effect; its reply comes too late
    mem.crash(backup)
    m1 = run(failover(cfg, Membership(), backup), t)
    c.place(m1)
    run(c.put(KEY, b"C's"), t)                  # acknowledged
    batch = op.throw(NodeTimeout(f"MN {primary} did not answer", primary))
    if batch and type(batch[0]) is not AwaitMembership:
        batch = op.throw(EpochChanged(m1))
    assert _drive(op, batch, t, m1) is None
    for core in (a, c):
        run(core.close(), t)
    reader = ClientCore(cfg, 7, membership=m1)
    run(reader.open(), t)
    assert run(reader.search(KEY), t) == b"C's"
    report = run(audit(cfg, [a, c, reader], m1, excuse=lost_frees(mem, m1)), t)
    assert report.ok, report.explain()


@pytest.mark.parametrize("kind", ["insert", "update"])
@pytest.mark.parametrize("cut", ["record", "cas"])
def test_a_won_round_closed_by_its_live_primary_which_died_since(kind, cut):
    """Seed 526 of the rebuild cycles on 3 MNs r = 2 with a client crash (``CycleRun``; not
    the r = 3 one above): A's insert won its slot on the one backup B and wrote its commit
    record; B died before the primary CAS went out (``cut``: as the record went out, its part
    on the primary P landing, seed 526's schedule; or the master published B's failover
    before the CAS batch went out). B's failover found P alive and went by P's value, the
    round's old one; it recorded nothing (no live backup held the proposal). B was rebuilt
    from P, then P died before A read it: P was no witness of the round any more, and
    ``Membership.fate`` let A's verdict from the backups (WIN) stand, as if P had died at the
    epoch's end: the insert was acknowledged and in no slot (a second insert of the key
    succeeded). An UPDATE the same: acknowledged, never made. The failover that ended the
    round's epoch found P alive (``Membership.dead_in``): A starts over, and takes effect."""
    cfg, key = _config(3, 2), b"k3"    # its subtable on MNs 0 and 1, as A's first group
    before = (lambda cfg, mem, t, a: run(a.insert(key, b"first"), t)) if kind == "update" \
        else None
    mem, t, a, _, op, batch = _up_to_the_primary_cas(
        cfg, lambda a: getattr(a, kind)(key, b"A's"), before, cut == "record", key)
    primary, backup = a.dir.nodes(a.dir.lookup(key_hash(key))[0])
    mem.crash(backup)
    m1 = run(failover(cfg, Membership(), backup), t)
    assert m1.settled == {1: {}} and not m1.kept, "the failover recorded nothing"
    if cut == "record":
        assert {r.node for r in batch} == {primary, backup}, batch
        with pytest.raises(NodeTimeout) as timeout:
            t.execute(batch)                    # its part on P lands
        assert type(op.throw(timeout.value)[0]) is AwaitMembership
    t, m2 = _rebuilt(cfg, mem, m1, backup)      # B copies P: the round's old value
    mem.crash(primary)
    m3 = run(failover(cfg, m2, primary), t)
    assert m3.dead_in(1) == {backup}, "the round's epoch ended with its primary alive"
    assert _drive(op, op.throw(EpochChanged(m3)), t, m3) is None
    run(a.close(), t)                           # frees in flight delivered
    reader = ClientCore(cfg, 7, membership=m3)
    run(reader.open(), t)
    assert run(reader.search(key), t) == b"A's"
    with pytest.raises(KeyExists):
        run(reader.insert(key, b"again"), t)
    report = run(audit(cfg, [a, reader], m3), t)
    assert report.ok, report.explain()


def test_a_crashed_update_committed_without_a_backup_recovered_amid_a_delete():
    """Seed 814 of the slow-MN rebuild cycles: A's update commits in an epoch where its
    subtable has no backup (no round to win) and A crashes before its primary CAS. The dead
    replica is rebuilt. B's delete of the key puts its tombstone on the backup; A's recovery
    reads the slot there, B's primary CAS takes, then the recovery CASes the backup. It used
    to take the committed entry for a round won and put A's value over B's tombstone on the
    backup (and then fail, IndexError, on its own proposal): the backup named A's object
    under a deleted key. It now runs the round again (SNAPSHOT): it competes with B's, and
    every replica agrees on the outcome (A's update and B's delete overlap: either order is
    linearizable)."""
    cfg = _config(3, 2)
    mem, t, a, b, update, _ = _up_to_the_primary_cas(cfg, lambda a: a.update(KEY, b"A's"),
                                                     before=_backup_dead)
    update.close()                              # A crashes, its primary CAS not posted
    m1 = a.membership
    primary = a.dir.nodes(a.dir.lookup(key_hash(KEY))[0])[0]
    backup = next(iter(m1.dead))
    t, m2 = _rebuilt(cfg, mem, m1, backup)
    b.place(m2)
    delete = b.delete(KEY)
    batch = next(delete)
    while not any(isinstance(r, Cas) and r.node == primary for r in batch):
        batch = delete.send(t.execute(batch))   # B's tombstone on the backup
    recovery = recover_client(cfg, 0, clock=lambda: 0.0, membership=m2)
    step = next(recovery)
    while not any(isinstance(r, Cas) and r.node == backup for r in step):
        step = recovery.send(t.execute(step))   # the recovery has read the slot
    _drive(delete, batch, t, m2)
    report = _drive(recovery, step, t, m2)
    run(b.close(), t)
    assert not run(check_index(cfg, m2), t)
    reader = ClientCore(cfg, 7, membership=m2)
    run(reader.open(), t)
    assert run(reader.search(KEY), t) in (None, b"A's")    # deleted, or A's after it
    audited = run(audit(cfg, [b, reader], m2, excuse=lost_frees(mem, m2)), t)
    counted = report.outcomes.get(OLD_LOST, 0) + report.outcomes.get(UNPROVEN, 0)
    assert len(audited.leaked) <= counted, audited.explain()
    audited.leaked = []
    assert audited.ok, audited.explain()


def _backup_dead(cfg, mem: LocalMemory, t, a: ClientCore) -> None:
    """KEY inserted, then its subtable's backup dies and is failed over; A adopts that."""
    run(a.insert(KEY, b"old"), t)
    backup = a.dir.nodes(a.dir.lookup(key_hash(KEY))[0])[1]
    mem.crash(backup)
    a.place(run(failover(cfg, Membership(), backup), t))
