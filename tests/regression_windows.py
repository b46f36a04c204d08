"""The windows of the seed-pinned regressions: what each seed's run must do to reach the
interleaving its bug needed (``fusee.emulator.testkit.trace``).

A seed reproduces a bug for one schedule; a change of verb counts shifts every schedule and
the seed passes while its run no longer gets near the bug. Each regression here is a
``Regression``: how to run a seed (the simulator run class and its shape), the ``Window``
its seeds must reach, and those seeds. Its test runs the checks (history, audit, index), then
requires the window: a seed that no longer reaches it fails with "seed N no longer reaches
its window: find another", and ``python3 tests/find_seeds.py NAME`` finds seeds that do.

Each window is stated in the store's terms (rounds, epochs, primaries, rebuilds), as the bug's
analysis tells it, and checked against the old code that had the bug: there the same seed
reaches the window AND the test fails on the bug (docs/testing.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from test_failover import TwoMNsRun
from test_rebuild import LatePauseCrash
from test_rebuild import _check as check_rebuild
from test_rebuild_soak import CycleRun, LongSlowCycleRun, SlowCycleRun
from test_recovery_mn_crash import RecoveryMNCrashRun

from fusee.emulator.testkit.history import OK
from fusee.emulator.testkit.simulator import SimulationError
from fusee.emulator.testkit.trace import (COMMITTED, OpTrace, SlotCas, Trace, Window,
                                          commit_record, window)
from fusee.index import replica_nodes
from fusee.layout import is_free, is_object

WRITES = ("insert", "update", "put", "delete")


# -- the store's terms, read off a trace ---------------------------------------------------

def _rounds(o: OpTrace) -> Iterator[tuple[int, tuple[int, int], list[SlotCas], list[SlotCas]]]:
    """(epoch, slot, backup CASes, primary CASes) of each round ``o`` opened: its CASes on
    one slot in one epoch, the backups' apart from the primary's."""
    groups: dict[tuple[int, tuple[int, int]], list[SlotCas]] = {}
    for c in o.cases:
        groups.setdefault((c.epoch, c.slot), []).append(c)
    for (epoch, slot), cases in groups.items():
        yield (epoch, slot, [c for c in cases if not c.primary], [c for c in cases if c.primary])


def _won_on_backups(o: OpTrace):
    """The rounds ``o`` won on its backups: every backup CAS of the round swapped."""
    for epoch, slot, backups, primaries in _rounds(o):
        if backups and all(c.took for c in backups):
            yield epoch, slot, backups, primaries


def _later(o: OpTrace, step: int):
    """``o``'s verbs after ``step``."""
    return [v for v in o.verbs if v.step > step]


def _committed_slots(o: OpTrace) -> Iterator[tuple[int, tuple[int, int], int]]:
    """(epoch, slot, step) of each COMMITTED record ``o`` wrote that names a slot."""
    for v in o.verbs:
        record = commit_record(v.req)
        if record is not None and record[0] == COMMITTED and record[1] is not None:
            yield v.membership.epoch, record[1], v.step


def _writes(t: Trace, *, crashed: bool) -> Iterator[OpTrace]:
    for o in t.ops():
        if o.op.kind in WRITES and o.crashed == crashed:
            yield o


def _won_uncased(t: Trace, *, crashed: bool) -> Iterator[tuple[OpTrace, int, tuple[int, int],
                                                              list[SlotCas]]]:
    """(op, epoch, slot, backup CASes) of each round a write (of a crashed client, or of a live
    one) won on the backups and committed, its primary CAS never sent in that epoch."""
    for o in _writes(t, crashed=crashed):
        for epoch, slot, backups, primaries in _won_on_backups(o):
            if not primaries and epoch in o.commits:
                yield o, epoch, slot, backups


# -- the windows ---------------------------------------------------------------------------

@window("a live client's write won its round on the backups and committed in epoch e, no primary "
        "CAS went out in e, and the round's primary was rebuilt while the write went on")
def WON_ROUND_PRIMARY_REBUILT(t: Trace) -> Iterator[str]:
    for o, epoch, slot, backups in _won_uncased(t, crashed=False):
        p = backups[0].replicas[0]
        if t.rebuilt_between(p, epoch, o.verbs[-1].membership.epoch):
            yield f"{o.op}: won {slot} in epoch {epoch}, primary MN {p} rebuilt since"


@window("a live client's write won its round on the backups and committed in epoch e, no primary "
        "CAS went out in e, e ended with every backup of the round dead and its primary P alive "
        "(nothing recorded), and P died while the write went on")
def WON_ROUND_CLOSED_BY_LIVE_PRIMARY(t: Trace) -> Iterator[str]:
    for o, epoch, slot, backups in _won_uncased(t, crashed=False):
        p, closing = backups[0].replicas[0], t.final.dead_in(epoch + 1)
        if closing is None or p in closing or not {c.node for c in backups} <= closing:
            continue
        if any(p in v.membership.dead for v in _later(o, backups[-1].step)):
            yield (f"{o.op}: won {slot} in epoch {epoch}, its backups died at its end, "
                   f"MN {p} (primary) lived and died before the write ended")


@window("a live client's insert claimed a slot on its only live replica P (r = 1), committed in "
        "epoch e and CASed the claim to its committed value, which took effect; before the "
        "insert saw the reply a rebuild published epoch e+1 and P died")
def R1_CLAIM_CUT_SHORT(t: Trace) -> Iterator[str]:
    for o in _writes(t, crashed=False):
        for c in o.cases:
            if not (c.took and c.tentative and len(c.replicas) == 1 and c.epoch in o.commits):
                continue
            later = _later(o, c.step)
            if later and later[0].membership.epoch >= c.epoch + 2 and \
                    c.node in later[0].membership.dead and \
                    any(t.rebuilt_between(n, c.epoch, c.epoch + 1) for n in range(t.n)):
                yield (f"{o.op}: r = 1 claim on {c.slot} (MN {c.node}) committed in epoch "
                       f"{c.epoch}, its CAS to the committed value took effect; a rebuild "
                       f"ended the epoch and MN {c.node} died before the insert went on")


@window("a live client's write won its round on the backups in epoch e and its primary CAS took "
        "effect on a slow primary, whose reply came after the epoch ended")
def WON_ROUND_LATE_PRIMARY(t: Trace) -> Iterator[str]:
    for o in _writes(t, crashed=False):
        for epoch, slot, _, primaries in _won_on_backups(o):
            for p in primaries:
                later = _later(o, p.step)
                if p.took and p.late and later and later[0].membership.epoch > epoch:
                    yield (f"{o.op}: won {slot} in epoch {epoch}, its primary CAS took effect "
                           f"on a slow MN {p.node}; the epoch ended before the reply")


@window("a live client's write won its round on the backups in epoch e, and e ended before its "
        "primary CAS went out (the write went on in a later epoch)")
def WON_ROUND_CAS_NEVER_OUT(t: Trace) -> Iterator[str]:
    for o in _writes(t, crashed=False):
        for epoch, slot, backups, primaries in _won_on_backups(o):
            later = _later(o, backups[-1].step)
            if not primaries and later and later[-1].membership.epoch > epoch:
                yield (f"{o.op}: won {slot} in epoch {epoch}; the epoch ended before its "
                       "primary CAS went out")


@window("a client crashed after its write committed its log entry for slot s in epoch e and "
        "before its primary CAS, and a replica of s died and was rebuilt after e")
def CRASHED_COMMIT_REPLICA_REBUILT(t: Trace) -> Iterator[str]:
    for o in _writes(t, crashed=True):
        for epoch, slot, step in _committed_slots(o):
            if any(c.primary and c.slot == slot and c.step > step for c in o.cases):
                continue            # its primary CAS went out
            nodes = replica_nodes(slot[0], t.n, t.r)
            redone = [n for n in nodes if t.rebuilt_between(n, epoch, t.final.epoch)]
            if redone:
                yield (f"{o.op}: committed for {slot} in epoch {epoch}, crashed before its "
                       f"primary CAS; MN {redone} rebuilt since")


@window("a live client's backup CAS took effect on a slow MN (its reply late) in epoch e, and "
        "the slot's primary died while the write went on")
def LATE_BACKUP_CAS_PRIMARY_DIED(t: Trace) -> Iterator[str]:
    for o in _writes(t, crashed=False):
        for c in o.cases:
            if c.primary or not (c.took and c.late):
                continue
            p = c.replicas[0]
            if any(v.membership.epoch > c.epoch and p in v.membership.dead for v in o.verbs):
                yield (f"{o.op}: backup CAS on {c.slot} took effect on slow MN {c.node} in "
                       f"epoch {c.epoch}; primary MN {p} died before the write ended")


@window("a live client's write read its slot while the subtable had no backup (one live replica "
        "P), CASed it after a rebuild gave it a backup again, and P died before the write ended")
def ROUND_OPENED_WITHOUT_A_BACKUP(t: Trace) -> Iterator[str]:
    for o in _writes(t, crashed=False):
        for c in o.cases:
            sid = c.slot[0]
            alone = [v for v in o.verbs if v.step < c.step and
                     len(t.live_replicas(sid, v.membership)) == 1 and
                     (t.slot(v.req) or (None,))[0] == sid]
            if not alone or len(c.replicas) < 2:
                continue
            p = t.live_replicas(sid, alone[-1].membership)[0]
            if any(p in v.membership.dead for v in _later(o, c.step)):
                yield (f"{o.op}: read {c.slot} with no backup in epoch "
                       f"{alone[-1].membership.epoch}, CASed it in epoch {c.epoch}; MN {p}, "
                       "its primary, died before the write ended")


@window("a live client's write had a round open (a backup CAS that took, no primary CAS yet) "
        "when an MN crashed in a rebuild's pause (which closes the open rounds first), and "
        "went on after it")
def PAUSE_CLOSED_AN_OPEN_ROUND(t: Trace) -> Iterator[str]:
    closed = [step for step, what in t.sim.faults if "crashed in a rebuild's pause" in what]
    for o in _writes(t, crashed=False):
        for epoch, slot, backups, primaries in _rounds(o):
            for at in closed:
                opened = [c for c in backups if c.took and c.step <= at]
                if opened and not any(p.step <= at for p in primaries) and _later(o, at):
                    yield (f"{o.op}: its round on {slot} (epoch {epoch}) was open when an "
                           f"MN crashed in a rebuild's pause (step {at})")


@window("a live client's write went on from epoch e into e+1, which a rebuild published, and "
        "met a dead MN there (a verb that failed: the next epoch's end came while it settled)")
def SETTLING_ACROSS_TWO_EPOCH_ENDS(t: Trace) -> Iterator[str]:
    for o in _writes(t, crashed=False):
        for v in o.verbs:
            e = v.membership.epoch
            if isinstance(v.result, Exception) and e - 1 in o.epochs and \
                    any(t.rebuilt_between(n, e - 1, e) for n in range(t.n)):
                yield (f"{o.op}: from epoch {e - 1} into {e} (a rebuild's), where a verb "
                       f"failed on MN {v.req.node}")
                break


@window("a client crashed after its write won its round on slot s's backups and committed in "
        "epoch e, before its primary CAS; every one of those backups died at e's end, the "
        "primary alive, and another write's primary CAS took s off the round's old value later")
def CRASHED_COMMIT_BACKUPS_DIED(t: Trace) -> Iterator[str]:
    cases = [c for o in t.ops() for c in o.cases]
    for o, epoch, slot, backups in _won_uncased(t, crashed=True):
        p, old = backups[0].replicas[0], backups[0].expected
        if p in t.final.dead or not {c.node for c in backups} <= t.final.dead:
            continue
        if any(c.slot == slot and c.primary and c.took and c.expected == old and
               c.epoch > epoch for c in cases):
            yield (f"{o.op}: won {slot} in epoch {epoch}, crashed before its primary CAS; "
                   f"its backups died, MN {p} (primary) lived, another write replaced "
                   "the old value")


@window("a client crashed after its insert won its round on slot s's backups and committed in "
        "epoch e, before its primary CAS; every one of those backups was dead in epoch e+1, and "
        "another write of the key, acknowledged, took it into another slot's primary after e")
def CRASHED_INSERT_KEY_ELSEWHERE(t: Trace) -> Iterator[str]:
    verbs = [v for o in t.ops() for v in o.verbs]
    for o, epoch, slot, backups in _won_uncased(t, crashed=True):
        died = {c.node for c in backups}
        if is_object(backups[0].expected) or not any(
                v.membership.epoch == epoch + 1 and died <= v.membership.dead for v in verbs):
            continue
        for other in t.ops():
            if other.op.key == o.op.key and other.op.status == OK and any(
                    c.primary and c.took and c.slot != slot and c.epoch > epoch
                    for c in other.cases):
                yield (f"{o.op}: won {slot} in epoch {epoch}, crashed before its primary CAS; "
                       f"its backups died, and {other.op} took the key into another slot")
                break


@window("a client crashed after its insert committed its log entry for slot s, before its "
        "primary CAS; its recovery withdrew the claim from s's backups (a CAS from the claim to "
        "a void that took) in epoch e, met a dead MN before it wrote any commit record after "
        "that, and ran again in a later epoch")
def RECOVERY_WITHDRAWAL_CUT_SHORT(t: Trace) -> Iterator[str]:
    recoveries = [o for o in t.ops() if o.op.kind == "recover"]
    for o in _writes(t, crashed=True):
        for _, slot, step in _committed_slots(o):
            if any(c.primary and c.slot == slot and c.step > step for c in o.cases):
                continue            # its primary CAS went out
            claims = {c.desired for c in o.cases if c.slot == slot and not c.primary}
            for rec in recoveries:
                cut = [c for c in rec.cases if c.slot == slot and not c.primary and c.took and
                       c.expected in claims and is_free(c.desired) and _cut_short(rec, c)]
                if cut:
                    yield (f"{o.op}: committed for {slot}, crashed before its primary CAS; "
                           f"its recovery withdrew the claim from MN {cut[0].node} in epoch "
                           f"{cut[0].epoch} and ran again in epoch {rec.epochs[-1]}")


def _cut_short(rec: OpTrace, c: SlotCas) -> bool:
    """Recovery ``rec`` wrote no commit record after its CAS ``c`` in ``c``'s epoch, and went
    on in a later one."""
    return rec.epochs[-1] > c.epoch and not any(
        v.step > c.step and v.membership.epoch == c.epoch and commit_record(v.req)
        for v in rec.verbs)


# -- the regressions -----------------------------------------------------------------------

@dataclass(frozen=True)
class Regression:
    """A bug's regression: each case (seed, MNs, r, a client crash or not) of run class
    ``cls`` passes the run's checks (history, audit, index: they fail on the bug), then
    must reach ``window``."""
    name: str
    window: Window
    cls: type
    cases: tuple[tuple[int, int, int, bool], ...]
    options: tuple[str, ...] = ()       # the run's flags: splits, in_pause...

    def run(self, seed: int, nodes: int, r: int, crash: bool) -> Any:
        """The checked run (raises AssertionError on a bug)."""
        kw = dict.fromkeys(self.options, True)
        return check_rebuild(seed, cls=self.cls, nodes=nodes, r=r, crash_client=crash, **kw)

    def probe(self, seed: int, nodes: int, r: int, crash: bool
              ) -> tuple[str | None, str | None]:
        """(the window's witness, the checks' failure): both looked at, whatever the
        other says (a seed finder; the check that a window holds on the buggy code)."""
        runs: list[Any] = []

        class Kept(self.cls):  # type: ignore[name-defined,misc]
            def __init__(self, *a: Any, **kw: Any):
                super().__init__(*a, **kw)
                runs.append(self)
        failure = None
        try:
            Regression(self.name, self.window, Kept, self.cases,
                       self.options).run(seed, nodes, r, crash)
        except (AssertionError, SimulationError) as e:
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return self.window.witness(runs[-1].sim), failure

    def check(self, seed: int, nodes: int, r: int, crash: bool) -> str:
        """The test: the run's checks, then its window; returns the witness."""
        sim = self.run(seed, nodes, r, crash).sim
        return self.window.require(sim, f"python3 tests/find_seeds.py {self.name}")


REGRESSIONS: dict[str, Regression] = {r.name: r for r in [
    Regression("fate-primary-rebuilt", WON_ROUND_PRIMARY_REBUILT, CycleRun,
               ((119, 3, 3, True),)),
    # seed 518 drifted out of it and no seed found reaches it (test_rebuild_cycles says where
    # it looked; ``test_insert_epoch_end`` scripts it): find_seeds --nodes 4 --r 2 looks on
    Regression("r1-claim-cut-short", R1_CLAIM_CUT_SHORT, CycleRun, ()),
    Regression("won-closed-by-live-primary", WON_ROUND_CLOSED_BY_LIVE_PRIMARY, CycleRun,
               ((526, 3, 2, True),)),
    # (seed 247 reaches the window too, but its loss is overwritten before anyone reads it)
    Regression("won-late-primary", WON_ROUND_LATE_PRIMARY, SlowCycleRun,
               ((76, 4, 2, True), (1860, 4, 2, True))),
    Regression("cas-never-out", WON_ROUND_CAS_NEVER_OUT, SlowCycleRun,
               ((1, 3, 2, True), (904, 5, 2, True), (984, 5, 3, True))),
    Regression("crashed-commit-rebuilt", CRASHED_COMMIT_REPLICA_REBUILT, SlowCycleRun,
               ((814, 4, 2, True), (1261, 6, 2, True), (20, 6, 2, True))),
    Regression("crashed-commit-rebuilt-splits", CRASHED_COMMIT_REPLICA_REBUILT, SlowCycleRun,
               ((20, 4, 2, True),), ("splits",)),
    Regression("crashed-commit-rebuilt-no-slow", CRASHED_COMMIT_REPLICA_REBUILT, CycleRun,
               ((169, 6, 2, True),)),
    Regression("late-backup-primary-died", LATE_BACKUP_CAS_PRIMARY_DIED, SlowCycleRun,
               ((5, 3, 2, False), (77, 5, 2, False), (1, 4, 3, False), (123, 5, 2, True),
                (255, 3, 2, False))),
    Regression("round-without-backup", ROUND_OPENED_WITHOUT_A_BACKUP, CycleRun,
               ((101, 3, 2, False),)),
    Regression("settling-across-two-epoch-ends", SETTLING_ACROSS_TWO_EPOCH_ENDS, CycleRun,
               ((102, 3, 2, False), (111, 4, 2, True))),     # not 110: see test_rebuild
    Regression("pause-closed-rounds", PAUSE_CLOSED_AN_OPEN_ROUND, LatePauseCrash,
               ((4, 3, 3, True),), ("in_pause",)),
    Regression("crashed-commit-backups-died", CRASHED_COMMIT_BACKUPS_DIED, RecoveryMNCrashRun,
               ((40, 3, 2, True),)),
    Regression("crashed-insert-key-elsewhere", CRASHED_INSERT_KEY_ELSEWHERE, LongSlowCycleRun,
               ((12347, 3, 2, True),)),
    # 109 (and 168, drifted out since) found by a wide sweep of test_failover's two MNs of
    # five; 3446 by find_seeds. The bug also hid as "stranded" where the object's home died
    # (seed 2335), before the simulator's audit knew which frees reached a dead MN
    # (``fusee.emulator.testkit.lost_frees``): there it is leaked now, though that seed's
    # leak stays within its recovery's UNPROVEN allowance (test_failover._check)
    Regression("recovery-withdrawal-cut-short", RECOVERY_WITHDRAWAL_CUT_SHORT, TwoMNsRun,
               ((109, 5, 3, True), (3446, 5, 3, True))),
]}


def check_pinned(seed: int, nodes: int, r: int, crash: bool) -> str:
    """The test of a pinned case: its run's checks, then the window of its regression."""
    (reg,) = [reg for reg in REGRESSIONS.values() if (seed, nodes, r, crash) in reg.cases]
    return reg.check(seed, nodes, r, crash)
