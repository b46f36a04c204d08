"""Seeded cases of the rebuild soak's cycles (``test_rebuild_soak``, opt-in there) that once
lost or wedged acknowledged data, kept in the default suite (about a second each). Each pinned
seed must still reach the window of its bug (``regression_windows``): one that no longer does
fails with "seed N no longer reaches its window: find another" (``tests/find_seeds.py``).
Seed 518 (an r = 1 insert committed as a rebuild publishes, its primary dead before the reply)
no longer reaches its window, nor does any of seeds 0-799 on its shape (4 MNs r = 2, a client
crash) or 0-299 on 3, 5 and 6 MNs r = 2: ``test_insert_epoch_end`` holds that interleaving
without a seed (it fails on 31f84dc^, the code before the fix).

- seed 116, 3 MNs r = 2: a put's round opened in an epoch where its subtable had no live
  backup (MN 0 dead); the epoch ended (MN 0's rebuild published) before its CAS, and the
  slot's primary, MN 1, died before the writer could read it. ``ClientCore.fate`` found no
  live MN of the round and took its verdict, reached from no backup at all, for a win: the
  put was acknowledged and lost. The slot's primary now (the rebuilt MN 0, copied from MN 1
  after the epoch ended) tells instead. Seed 116 no longer reaches that window (the verb counts
  changed since); seed 101 does (``regression_windows``: round-without-backup).
- with a slow MN (``SlowCycleRun``), seed 169 on 3 MNs r = 2 (and 207, 23, 226, 255): an
  update's backup CAS took effect on the slow MN 2 but its completion timed out; the primary
  MN 1 died, and the failover left MN 2's value (the proposal) in place without recording it,
  taking every writer of the round for one that had seen its proposal land. The writer, not
  knowing, started over and gave its object back to its free list while the slot named it;
  its retry replaced that value and freed the object again, by then reused for the next
  update (dangling: a live object freed). The failover now records every value it leaves in
  place on a subtable whose primary died, unless it is an object committed for the slot
  (``kept``), so the writer learns it won.
- with a slow MN, seed 814 on 4 MNs r = 2 (a client crash): c0's update of k1 committed in
  epoch 1, its subtable with no backup (MN 2 dead), and c0 crashed before its primary CAS.
  Its recovery ran only in epoch 7, MN 2 rebuilt since, while c2's delete of k1 had its
  tombstone on that backup and not yet on the primary: recovery took COMMITTED for a round
  won and "fixed" the backup, its proposal over c2's tombstone; c2's primary CAS took, and
  the backup named c0's object under a deleted key (recovery then failed, IndexError, on
  its own proposal). A committed round whose primary CAS did not happen now goes through
  SNAPSHOT again (``Recovery._win_again``): one it won wins again, one it did not competes.
"""

from __future__ import annotations

import pytest
from regression_windows import check_pinned
from test_rebuild import _check as check_rebuild
from test_rebuild_soak import CycleRun, RecoveryCrashCycleRun, SlowCycleRun, TwoCrashCycleRun


@pytest.mark.parametrize("seed,nodes,r", [(101, 3, 2)])
def test_rebuild_cycles_seed(seed, nodes, r):
    check_pinned(seed, nodes, r, crash=seed % 3 == 0)


@pytest.mark.parametrize("seed,nodes,r,crash", [(5, 3, 2, False), (77, 5, 2, False),
                                                (1, 4, 3, False), (123, 5, 2, True),
                                                (255, 3, 2, False), (814, 4, 2, True)])
def test_rebuild_cycles_with_a_slow_mn_seed(seed, nodes, r, crash):
    """(Seeds 169, 207, 23 and 226 left their window when the write marks moved the
    schedules: 5, 77, 1 and 123 reach it now.)"""
    check_pinned(seed, nodes, r, crash=crash)


@pytest.mark.parametrize("seed", range(600, 604))
@pytest.mark.parametrize("nodes,r", [(3, 3), (4, 2)])
def test_rebuild_cycles_with_two_client_crashes_seed(seed, nodes, r):
    """A slice of the soak's two-crash cycles (``TwoCrashCycleRun``): c0 and c1 both crash
    and are recovered, each on its own, through the rebuild cycles."""
    check_rebuild(seed, cls=TwoCrashCycleRun, nodes=nodes, r=r, crash_client=True)


@pytest.mark.parametrize("seed", range(600, 604))
@pytest.mark.parametrize("nodes,r", [(3, 3), (4, 2)])
def test_rebuild_cycles_with_a_recovery_that_dies_seed(seed, nodes, r):
    """A slice of the soak's cycles where the master's recovery of c0 dies a few steps in
    and runs again (``RecoveryCrashCycleRun``)."""
    check_rebuild(seed, cls=RecoveryCrashCycleRun, nodes=nodes, r=r, crash_client=True)


def test_a_crashed_update_committed_with_no_backup_and_never_cased():
    """Seed 169 on 6 MNs r = 2 with a client crash (leaked). In epoch 5 (MN 2 dead) the
    subtable of k4 had no backup: c0's put, with no SNAPSHOT round to win, committed its log
    entry before its primary CAS, and crashed (epoch 6) before that CAS, which would have
    failed anyway: c2 had replaced the value meanwhile and freed the object it named. The
    recovery reads the free of the replaced object as delivered, and so, it takes for granted
    (``Recovery._committed``), by the crashed client after its primary CAS; and the subtable
    has a backup again (MN 2 rebuilt), so it does not count the entry UNPROVEN either: the
    object stays held, named by no slot, counted by no outcome. The entry does not say in
    which epoch its round ran, so recovery now trusts a committed INSERT or UPDATE whose slot
    moved on to have taken effect only where two replicas of the subtable were alive in every
    epoch (``Membership.always_live``): here MN 2 died and was rebuilt, the entry is
    UNPROVEN, and its object is counted as such."""
    check_pinned(169, 6, 2, crash=True)


def test_a_fate_read_off_a_primary_rebuilt_since_the_round():
    """Seed 526 on 3 MNs r = 3 with a client crash (not linearizable; fails on f9b8e50 too).
    In epoch 2 c1's put (an insert of k0) won slot 1:7 on both backups and committed; its
    primary, MN 1, died before the primary CAS. The failover kept the committed claim (epoch
    3), c2 updated k0 over it (acknowledged), and MN 1 was rebuilt (epoch 4) with c2's value.
    c1's ``ClientCore.fate`` read the round's primary, alive again, found neither its value
    nor the old one and took LOSE: it inserted again and then updated k0 back to its value, so
    c1's one put took effect twice around c2's update, which the history cannot order. A
    primary rebuilt since the round tells nothing (the failover that ended the epoch found it
    dead). The membership now records the epoch of each rebuild (``rebuilt_at``), and a round
    is judged only by a primary alive from its epoch on (``Membership.witness``; a primary
    rebuilt before the round still tells, as seed 7 of test_rebuild needs): c1 goes by its
    own WIN, which the failover kept. (The write marks moved 526 off the window: seed 119
    reaches it now, c1's insert of k2 winning 1:7 in epoch 3, MN 1 rebuilt since.)"""
    check_pinned(119, 3, 3, crash=True)


@pytest.mark.parametrize("seed", [1261, 20])
def test_a_crashed_round_committed_without_a_backup_counted_as_taken_effect(seed):
    """With a slow MN, on 6 MNs r = 2, a client crash (leaked on 013092f). Seed 1261: in
    epoch 2 c0's put of k1 (an insert) won its slot on its one backup, MN 2, and committed;
    c0 crashed before its primary CAS, and MN 2 crashed next. Its failover (epoch 3) settled
    nothing, the primary MN 1 being alive with the slot empty; MN 2 was rebuilt from it
    (empty), and c1 inserted k4 into the slot. Seed 1627: c0's put of k5 (an update)
    committed in epoch 5 with the slot's other MN dead (no backup: no round to win), and c0
    crashed before its primary CAS. Recovery (epoch 7, the slot with a backup again) read
    each entry COMMITTED, the primary holding neither the old value nor the proposal, and
    took it for one that took effect: its object stayed held, named by no slot. Recovery now
    trusts "had taken effect" only where two replicas of the subtable were alive in every
    epoch (``Membership.always_live``); else the entry is UNPROVEN, as for seed 169. (The
    write marks moved 1627 off the window: seed 20 reaches it, c0's insert of k2 committed
    for 1:7 in epoch 1, crashed before its primary CAS, MNs 1 and 2 rebuilt since.)"""
    check_pinned(seed, 6, 2, crash=True)


@pytest.mark.parametrize("seed", [76, 1860])
def test_the_fate_of_a_won_round_whose_primary_moved_on(seed):
    """With a slow MN, on 4 MNs r = 2 (a client crash elsewhere; the audit finds a live client's
    objects held and named by no slot, their frees undone by a double free's carry; both fail on
    013092f too). Seed 1860: in epoch 4 c1's insert of k2 won slot 1:14 on its backup MN 2,
    committed, and CASed the primary MN 1, which was slow: the CAS took effect, its reply came too
    late. MN 2 died (epoch 5); c2, reading k2, had committed c1's claim on the primary meanwhile
    (an insert's helper: the claim to its committed form). c1's ``ClientCore.fate`` read the
    primary (alive), found neither v_old nor its claim and took LOSE (``Membership.fate``: another
    value on a live primary means the round is over), though only the round's winner moves the
    primary off v_old. c1 inserted k2 again with the same object, named already, and a later free
    of it carried into the next objects' bits. Seed 916: the same in epoch 6 (slot 0:7, c1's put of
    k3). A WIN reached from the backups has one winner: such a writer finding a third value now
    takes WIN, and leaves its object (the slot's, or the slot's next writer's) alone. That alone
    made 916 pass; 1860 then failed further on (CorruptObject): in epoch 5 (MN 2, the backup, dead)
    c1 and c2 each "won" a round over k2's value with no backup; neither CAS went out (the epoch
    ended at their commit records); c2, finding v_old, restarted and deleted k2 in epoch 6; c1,
    finding c2's tombstone, took WIN and freed v_old, which c2's delete had freed already. A writer
    with no backup has no round to win: it now passes no verdict (``ReplaceRound.reached``) and
    takes LOSE. A won round's writer whose primary CAS never went out takes LOSE too: once the
    epoch ended, a later round may take the slot (the sweep's seeds 833, 904, 984 of
    ``SlowCycleRun``, two inserts of one key both acknowledged, otherwise). The case table:
    ``Membership.fate``. (The write marks moved 916 off the window: seed 76 reaches it,
    c1's put of k0 winning 1:7 in epoch 4, its primary CAS taking effect on slow MN 1.)"""
    check_pinned(seed, 4, 2, crash=True)


def test_a_crashed_insert_whose_backup_died_with_its_proposal():
    """Seed 267 on 4 MNs r = 2 with a slow MN, splits and a client crash (leaked on
    013092f). In epoch 2 c0's insert of s48 proposed on slot 2:32's backup, MN 3,
    committed its log entry and crashed before its primary CAS; MN 3 died next (epoch 3):
    the proposal went with it, and the failover, the primary MN 2 alive, had nothing to
    settle or drop. The slot stayed free on MN 2 and c1 inserted there (r = 1). c0's recovery
    in epoch 3 (no backup: it would have counted the entry UNPROVEN) was cut short by MN 3's
    rebuild; in epoch 4 the slot has a backup again, the primary holds neither the old value
    nor the claim, and ``Recovery._committed`` took that for the entry's CAS having taken
    effect: its object stayed held, named by no slot. Now UNPROVEN, as seed 169 above: MN 3
    was not alive in every epoch (``Membership.always_live``). (The write marks moved 267
    off the window: seed 20 reaches it, c0's put of k3 committed for 1:1 in epoch 5, crashed
    before its primary CAS, MN 1 rebuilt since.)"""
    check_pinned(20, 4, 2, crash=True)


@pytest.mark.parametrize("seed, nodes, r", [(1, 3, 2), (904, 5, 2), (984, 5, 3)])
def test_a_won_round_whose_cas_never_went_out_meets_a_later_round(seed, nodes, r):
    """With a slow MN and a client crash. Seed 833 on 3 MNs r = 2: in epoch 6 c1's insert of
    k0 committed its claim on slot 1:14's backup, and the epoch ended before its primary CAS
    went out; the failover settled nothing (the primary alive, still empty), and c2 inserted
    k0 into the slot in the next epoch. Judging a WIN by any third value on the primary, c1
    took c2's value for its own replaced since: both inserts acknowledged (not linearizable;
    passes on 60f9534, where c1 took LOSE). Only a writer whose CAS went out (``cased``) can
    be the one that moved the primary; the others (904 on 5 MNs r = 2, 984 on 5 MNs r = 3:
    the same) take LOSE. (The write marks moved 833 off the window: seed 1 reaches it,
    c2's put of k3 winning 0:7 in epoch 5, the epoch ending before its primary CAS.)"""
    check_pinned(seed, nodes, r, crash=True)


def test_a_crashed_delete_whose_tombstone_a_failover_kept():
    """Seed 1064 on 4 MNs r = 3 with a slow MN and a client crash, found by the slow-MN sweep of
    merged main at the end of session 6 (leaked: one object of client 2, alive, committed for
    k0, held but named by no slot). In epoch 4 c0's delete of k0 put its tombstone on both
    backups (MNs 2 and 3) over c2's object; MN 1, the primary, died at once and c0 crashed
    before its commit record, the only place but the primary that names the value replaced.
    The failover (epoch 5) kept the tombstone: the delete took effect, and c2's object was
    left to nobody. c0's recovery in epoch 5 looked for the delete's trace among the slots'
    objects only and marked it ABORTED; the next runs skipped it. Recovery now finds the
    tombstone in the failover's record (``Membership.installed``) and counts the replaced
    object ``OLD_LOST``; a recovery run again after one cut short (here by MN 1's rebuild)
    counts it from the entry's COMMITTED record with no old value. The window by hand, with
    no seed: ``test_kept_proposal``."""
    check_rebuild(1064, cls=SlowCycleRun, nodes=4, r=3, crash_client=True)


def test_a_committed_insert_whose_backup_died_is_not_completed_over_a_later_insert():
    """Found by session 9's hostile sweep (``LongSlowCycleRun``, seeds 12000-12399, 4 shapes:
    1 of 1,600 cases), on 3 MNs r = 2, four clients of 20 operations, three of them crashing.
    The index check finds k0 in two slots, 1:7 and 1:14. In epoch 6 (no MN dead) c1's put of
    k0, an insert, claimed slot 1:14 on its one backup, MN 2, won the round and committed its
    log entry; MN 2 crashed, and c1 crashed before its primary CAS. The failover of MN 2
    (epoch 7) found the primary, MN 1, alive with the slot's void: nothing to settle, and
    nothing recorded (the proposal died with MN 2). In epoch 7 the subtable had no backup, and
    c3's put of k0 inserted it into slot 1:7 (acknowledged). c1's recovery then read the entry
    COMMITTED with the primary still holding the old value, and ``Recovery._win_again`` ran
    the round again: with no backup it wins at once, and ``_complete`` CASed c1's object into
    1:14. A SNAPSHOT round again is not an insert again: the duplicate check, which c1 passed
    in epoch 6, is not redone, and another insert of the key may have taken effect since its
    round was closed unseen. Two slots of one key: a delete then removes one and the next get
    finds the other (a deleted key comes back). Recovery now withdraws a committed INSERT
    whose claim never reached the primary, by key, as one not committed
    (``Recovery._committed``): nobody can have observed it (a helper, or a failover of the
    primary, would have put the claim there). Looking the key up before completing would
    not do: a live client may insert the key between that lookup and the CAS."""
    check_pinned(12347, 3, 2, crash=True)


def test_a_won_round_closed_by_its_live_primary_which_died_since():
    """Seed 526 on 3 MNs r = 2 with a client crash (an acknowledged insert lost): in epoch 2
    c1's insert of k5 won slot 0:0 on its one backup, MN 1, and wrote its commit record; MN 1
    crashed as the record went out (its part on the primary, MN 0, landed), before the
    primary CAS. MN 1's failover (epoch 3) found MN 0 alive, still empty in 0:0: nothing to
    settle, nothing recorded. MN 1 was rebuilt from MN 0 (epoch 4), and MN 0 crashed before
    c1 read it. In epoch 5 the round's primary was dead and the live replica rebuilt since
    (no witness), and ``Membership.fate`` let c1's verdict from the backups (WIN) stand, as
    for a primary that died at the round's epoch's end: the insert was acknowledged, in no
    slot, and c1's second insert of k5 succeeded. A verdict from the backups stands only
    where the failover that ended the round's epoch found the primary dead; one that found
    it alive went by its value (``Membership.dead_in``): c1 starts over. Scripted, no seed:
    ``test_scripted_windows``."""
    check_pinned(526, 3, 2, crash=True)


@pytest.mark.parametrize("seed", range(2000, 2008))
@pytest.mark.parametrize("nodes,r", [(3, 2), (4, 2)])
def test_rebuild_cycles_with_a_client_crash_beyond_the_sweep(seed, nodes, r):
    """A few seeds of ``test_rebuild_soak``'s sweep shape past its range (seed 526's, a
    client crash in every run): the default ranges ran the cycles with a client crash in one
    seed of three only."""
    check_rebuild(seed, cls=CycleRun, nodes=nodes, r=r, crash_client=True)
