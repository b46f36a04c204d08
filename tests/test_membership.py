"""The membership's record of rebuilds: in which epoch each rebuilt MN became a replica again,
which rounds it can tell about (``Membership.witness``), which replicas were alive in every
epoch (``Membership.always_live``), and that record on the wire and at the master; the fate
of a round an epoch's end cut short (``Membership.fate``).

The simulator runs that need it are ``test_rebuild_cycles`` (seeds 526 and 169)."""

from __future__ import annotations

import pytest

from fusee.master.logic import Master
from fusee.membership import Membership
from fusee.verdicts import LOSE, RESTART, WIN

from test_master import MN_L, _failed_over, master


def _history() -> Membership:
    """3 MNs: MN 1 dies (epoch 1), is rebuilt (epoch 2), MN 2 dies (epoch 3)."""
    return Membership().successor([1], {}).rejoined([1], {}).successor([2], {})


def test_a_rebuilt_mn_witnesses_only_the_rounds_of_its_epoch_and_later():
    m = _history()
    assert m.rebuilt_at == {1: 2} and m.rebuilt == frozenset({1})
    assert m.witness(0, 0) and m.witness(0, 3)              # alive throughout
    assert not m.witness(1, 0) and not m.witness(1, 1)      # died after those rounds
    assert m.witness(1, 2) and m.witness(1, 3)              # a replica since epoch 2
    assert not m.witness(2, 2) and not m.witness(2, 3)      # dead now
    assert m.always_live([0, 1, 2]) == (0,)
    # a second rebuild of MN 1 moves its epoch on
    again = m.successor([1], {}).rejoined([1], {})
    assert again.rebuilt_at == {1: 5} and not again.witness(1, 2)


def test_the_rebuild_epochs_go_over_the_wire():
    m = _history()
    wire = m.to_wire()
    assert wire["rebuilt"] == [1] and wire["rebuilt_at"] == [[1, 2]]
    back = Membership.from_wire(wire)
    assert (back.epoch, back.dead, back.rebuilt_at) == (3, frozenset({2}), {1: 2})


def test_a_membership_written_before_rebuild_epochs_were_recorded_trusts_no_rebuilt_mn():
    """A master's saved state, or a reply, from before: its rebuilt MNs witness no round
    before the membership's own epoch (less sure of a round's fate, never wrong)."""
    wire = _history().to_wire()
    del wire["rebuilt_at"]
    m = Membership.from_wire(wire)
    assert m.rebuilt_at == {1: 3} and not m.witness(1, 2) and m.witness(1, 3)


@pytest.mark.parametrize("rebuilt_at", [
    [[1]], [[1, 0]], [[1, 4]], [["1", 2]], [[-1, 2]], {"1": 2},
    [[2, 2]],                           # not in "rebuilt"
    [],                                 # MN 1 missing
])
def test_a_malformed_rebuild_record_is_refused(rebuilt_at):
    wire = _history().to_wire()
    wire["rebuilt_at"] = rebuilt_at
    with pytest.raises(ValueError, match="malformed membership"):
        Membership.from_wire(wire)


def test_a_subtable_is_backed_while_every_epoch_left_it_two_live_replicas():
    """``_history`` on 3 MNs r = 3: no MN but 0 was alive throughout, yet every epoch left
    two of the three alive: every round had a backup a failover saw. On r = 2 every list
    had one replica in some epoch: (0, 1) in epoch 1, (0, 2) in epoch 3, (1, 2) in both."""
    m = _history()
    assert m.past_dead == (frozenset(), frozenset({1}), frozenset())
    assert m.always_live([0, 1, 2]) == (0,) and m.backed([0, 1, 2])
    assert not any(m.backed(pair) for pair in ([0, 1], [0, 2], [1, 2]))
    assert Membership().successor([2], {}).backed([0, 1])    # MN 2 is not in the list
    assert not m.successor([1], {}).backed([0, 1, 2])        # epoch 4: MN 0 alone


def test_the_dead_of_every_epoch_go_over_the_wire():
    m = _history()
    wire = m.to_wire()
    assert wire["past_dead"] == [[], [1], []]
    assert Membership.from_wire(wire).past_dead == m.past_dead


def test_a_membership_without_the_dead_of_every_epoch_asks_for_replicas_never_dead():
    """A record from before: ``backed`` falls back on ``always_live`` (two replicas never
    dead), which may count a subtable unbacked that was (less sure, never wrong); so do its
    successors."""
    wire = _history().to_wire()
    del wire["past_dead"]
    m = Membership.from_wire(wire)
    assert m.past_dead == () and not m.backed([0, 1, 2])
    assert not m.rejoined([2], {}).backed([0, 1, 2])
    assert Membership.from_wire(Membership().to_wire()).backed([0, 1])     # epoch 0: known


@pytest.mark.parametrize("past_dead", [[[1], [2], [0], [1]], [["1"]], [[-1]], {"0": []},
                                       [1, 2]])
def test_a_malformed_record_of_the_dead_is_refused(past_dead):
    wire = _history().to_wire()
    wire["past_dead"] = past_dead
    with pytest.raises(ValueError, match="malformed membership"):
        Membership.from_wire(wire)


def test_the_master_refuses_a_rebuild_that_does_not_record_its_epoch():
    m: Master = master(pinged_until=0.0)
    for mn in (1, 2):
        m.mn_seen(mn, 10.0)
    _failed_over(m, 0, now=MN_L + 0.1)
    assert m.rejoin(0, 0.7) and m.next_rebuild(0.8) == 0
    m.rebuild_pausing(0)
    unrecorded = Membership(2, frozenset(), m.membership.settled)
    with pytest.raises(ValueError, match="does not record it rebuilt in epoch 2"):
        m.rebuild_done(0, unrecorded, now=0.9)
    m.rebuild_done(0, m.membership.rejoined([0], {}), now=0.9)
    assert m.membership.rebuilt_at == {0: 2} and m.dead == frozenset()


OLD, NEW, OTHER = 0x10, 0x20, 0x30      # slot values: the round's old one, its proposal, another


@pytest.mark.parametrize("recorded, decided, primary_now, fate, cased", [
    # a value the failover recorded for the slot decides
    (NEW, None, OTHER, WIN, True), (OLD, WIN, OTHER, RESTART, True), (OTHER, WIN, NEW, LOSE, True),
    # else the primary, alive since the round, tells
    (None, None, NEW, WIN, True), (None, WIN, OLD, RESTART, True), (None, None, OLD, RESTART, True),
    # the won round's value replaced since: only its winner moved the primary off OLD
    (None, WIN, OTHER, WIN, True),
    # ... unless its CAS never went out: a later epoch's round moved it
    (None, WIN, OTHER, LOSE, False),
    (None, LOSE, OTHER, LOSE, True), (None, None, OTHER, LOSE, True),
    # nothing tells, the primary died at the epoch's end: the writer's own verdict stands
    (None, WIN, None, WIN, True), (None, LOSE, None, LOSE, True), (None, None, None, RESTART, True),
])
def test_the_fate_of_a_round_by_the_case_table(recorded, decided, primary_now, fate, cased):
    """``Membership.fate``'s table: a round of epoch 0 in slot 0:3 whose primary is MN 1,
    ended by MN 1's failover, which recorded ``recorded`` (or nothing) for the slot."""
    kept = {} if recorded is None else {(0, 3): recorded}
    m = Membership().successor([1], {}, kept)
    assert m.fate(0, 0, 3, OLD, NEW, decided, primary_now, cased, primary=1) == fate


@pytest.mark.parametrize("decided, cased, fate", [
    (WIN, False, RESTART), (LOSE, False, RESTART), (None, False, RESTART), (WIN, True, WIN)])
@pytest.mark.parametrize("since", ["died", "rebuilt", "old record"])
def test_a_round_closed_by_its_live_primary_that_died_since(decided, cased, since, fate):
    """Seed 526 of CycleRun on 3 MNs r = 2 (an acknowledged insert lost): a round of epoch 0
    in slot 0:3, its primary MN 0, its backup MN 1. MN 1's failover ended the epoch: the
    primary alive, the failover went by its value and recorded nothing (no live backup held
    the proposal). Then MN 0 died (or died and was rebuilt) before the writer read it:
    nothing tells now, and the writer's verdict from the backups does not stand, unless its
    primary CAS went out before the epoch ended (executed before the failover read the
    primary). A record that does not say who was dead then keeps the writer's verdict."""
    m = Membership().successor([1], {}).successor([0], {})
    if since == "rebuilt":
        m = m.rejoined([0], {})
    if since == "old record":
        m = Membership.from_wire({**m.to_wire(), "past_dead": []})
        fate = decided or RESTART
    assert m.fate(0, 0, 3, OLD, NEW, decided, None, cased, primary=0) == fate
    # the same round, its primary dead at the epoch's end: the backups' value stood
    assert m.fate(0, 0, 3, OLD, NEW, decided, None, cased, primary=1) == (decided or RESTART)
