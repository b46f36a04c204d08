"""A recovery run again after its first attempt lost the round it ran again for a crashed
client's committed write (``Recovery._win_again``), scripted: the sibling of
``test_recovery_rerun``'s window.

3 MNs, r = 2. B inserted the key (``old``). The key's backup dies: with no backup, A's UPDATE
commits its log entry (no round to win) and A crashes before its primary CAS. The backup is
rebuilt, and B writes the key again: B wins its round on the backup and commits, its primary
CAS not yet sent. A's recovery finds A's entry COMMITTED with the primary still holding ``old``
and runs SNAPSHOT again with A's proposal: B's holds the backup, A's loses. The recovery is
cut short right there (the master running it died, or an MN it reads did), B's primary CAS
lands, and the master runs the recovery again. That run read A's entry COMMITTED with the slot
moved on, in a subtable that lost its backup once: whether A's CAS took effect looked unknown
(``UNPROVEN``), A's object held for good, named by no slot (a leak; the audit's ``leaked``).
(Had B not freed ``old`` yet, the walk back through the slot's commit records told it was B
that replaced ``old``: no double free, then or now.)

Now a recovery whose re-run round lost marks the entry LOST at once, as a live loser does, and
a COMMITTED UPDATE whose slot moved on in such a subtable is walked back whether or not the
free of ``old`` is still owed: cut short before that mark lands, a rerun still finds B's
commit record naming ``old``. Not past a DELETE's tombstone (it names no object): the one
gap left, a cut between the round's last reply and the mark with B deleting, reads UNPROVEN
(A's object held and counted), as a first run that came after B's CAS would.

No simulator run reaches this: the round run again loses only where the subtable lost its
backups and has one again (a rebuild), so ``LateRecoveryMNCrashRun`` (no rebuilds) cannot, and
``RecoveryCrashCycleRun`` did not in seeds 0-2999 on six shapes (its leak check would have let
it pass anyway: UNPROVEN is a count of the objects that may leak)."""

from __future__ import annotations

import pytest

from test_insert_epoch_end import _rebuilt
from test_recovery_unseen_round import KEY, Cluster

from fusee.driver import run
from fusee.recovery import UNPROVEN, recover_client
from fusee.verbs import Cas

WINNERS = {"update": lambda b: b.update(KEY, b"B's second"), "delete": lambda b: b.delete(KEY)}


def _until_primary_cas(op, t, primary):
    """Run ``op`` up to its primary CAS; returns that batch (not executed)."""
    batch = next(op)
    while not any(isinstance(r, Cas) and r.node == primary for r in batch):
        batch = op.send(t.execute(batch))
    return batch


@pytest.mark.parametrize("mark_landed", [True, False])
@pytest.mark.parametrize("b_freed", [True, False])
@pytest.mark.parametrize("winner", WINNERS)
def test_a_recovery_run_again_after_its_round_again_lost_reads_it_lost(winner, b_freed,
                                                                        mark_landed):
    c = Cluster()
    m = c.backup_dies()
    c.a.place(m)
    op = c.a.update(KEY, b"A's")
    _until_primary_cas(op, c.t, c.primary)      # committed (no backup: no round)
    op.close()                                  # A crashes: its primary CAS never posted
    c.t, m = _rebuilt(c.cfg, c.mem, m, c.backup)
    c.b.place(m)
    op = WINNERS[winner](c.b)
    cas = _until_primary_cas(op, c.t, c.primary)    # B won on the backup and committed
    first = recover_client(c.cfg, 0, membership=m)
    batch = next(first)
    while not any(isinstance(r, Cas) and r.node == c.backup and r.expected == c.old
                  for r in batch):
        batch = first.send(c.t.execute(batch))
    batch = first.send(c.t.execute(batch))      # A's proposal again: B's holds the backup
    if mark_landed:
        c.t.execute(batch)                      # (the LOST mark)
    first.close()                               # cut short
    with pytest.raises(StopIteration):
        op.send(c.t.execute(cas))               # B's primary CAS lands
    if b_freed:
        run(c.b.insert(b"k1", b"B's"), c.t)     # B's free of ``old`` rides its next batch
    assert c.freed(c.old) == b_freed
    report = run(recover_client(c.cfg, 0, membership=m), c.t)
    gap = winner == "delete" and not mark_landed
    # the gap left: B's tombstone names no object, the walk back stops there
    assert report.outcomes == ({UNPROVEN: 1} if gap else {"aborted": 1}), report.outcomes
    assert report.frees_delivered == 0
    c.finish(m, b"B's second" if winner == "update" else None, [c.b], leaked=int(gap))
