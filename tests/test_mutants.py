"""Mutation tests: SNAPSHOT with one of its rules broken must be caught by the simulator's
checks (the linearizability checker, else the audit of the store a schedule leaves), so that
a green simulator run means something. The schedules are ``test_simulation.store_schedule``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import fusee.layout
import fusee.replication
from fusee.emulator.testkit.linearizability import check
from fusee.emulator.testkit.simulator import SimulationError
from fusee.audit import audit
from fusee.driver import run
from fusee.verbs import Read
from test_simulation import KEYS, store_schedule, word
from fusee.transports.local import LocalTransport

ROOT = Path(__file__).resolve().parent.parent


def _patch_everywhere(monkeypatch, name, new):
    """Replace ``fusee.replication.<name>`` in every fusee module that imported it."""
    orig = getattr(fusee.replication, name)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("fusee") and getattr(mod, name, None) is orig:
            monkeypatch.setattr(mod, name, new)


def _loser_does_not_wait(core, t, v_old, current, extra=()):
    """BROKEN step 5: a loser returns at once instead of waiting for the primary to change, so
    its UPDATE is acknowledged before the winner's linearization point."""
    if extra:
        yield from core.rt(list(extra))
    return fusee.replication.LOSE


def _winner_skips_fix_up(t, current, v_new):
    """BROKEN step 4: the winner leaves other proposals on the backups."""
    return []


def _rule3_largest(core, t, v_old, v_new, current):
    """Rule 3 electing the LARGEST proposal instead of the smallest."""
    verdict = fusee.replication.decide(current, v_new)
    if verdict != fusee.replication.RULE3:
        return verdict
    now = word((yield from core.rt([Read(t.primary, t.addr, 8)]))[0])
    if now != v_old:
        return (fusee.replication.RESTART if now == v_old | fusee.layout.FROZEN
                else fusee.replication.LOSE)
    return fusee.replication.WIN if max(current) == v_new else fusee.replication.LOSE


#: mutant -> (name in fusee.replication, broken version, workload that exposes it)
MUTANTS = {"loser-does-not-wait": ("await_change", _loser_does_not_wait, {}),
           "winner-skips-fix-up": ("fix_requests", _winner_skips_fix_up,
                                   dict(clients=6, keys=KEYS[:2]))}


def _what_is_wrong(sim, cores) -> str | None:
    """The checker's explanation of a schedule's history, else the audit's of the store it
    left (unsettled rounds...), or None: nothing."""
    report = check(sim.history)
    if not report.ok:
        return report.explain()
    mem = sim.memory
    found = run(audit(mem.config, cores), LocalTransport(mem.config, memory=mem))
    return None if found.ok else found.explain()


def test_every_rule_a_mutant_breaks_is_defined_in_the_python_module():
    """A mutant replaces a rule where modules imported it. A compiled caller calls a function
    of its own compiled group directly, bound when it was compiled (setup.py), so a rule
    re-exported by fusee.replication from a compiled module (fusee.snapshot's request
    builders) would be broken in the source build only, and the compiled build, which users
    run, would go untested. Every target is defined in fusee.replication, which stays Python."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fusee_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    assert "replication" not in setup.COMPILED
    for name in [*(target for target, _, _ in MUTANTS.values()), "resolve"]:
        assert getattr(fusee.replication, name).__module__ == "fusee.replication", name


@pytest.mark.parametrize("mutant", MUTANTS)
def test_checker_catches_a_broken_snapshot_rule(monkeypatch, mutant):
    """Some seed's history must be NOT linearizable, or the store it leaves fail the audit (a
    winner that skips its fix-ups leaves rounds unsettled; with slot values that never come
    back, its next rounds mostly wedge rather than show in the history). (A broken rule may
    also leave a writer waiting forever: such runs are cut short and skipped.)"""
    name, broken, workload = MUTANTS[mutant]
    _patch_everywhere(monkeypatch, name, broken)
    stuck = 0
    for seed in range(600):
        try:
            wrong = _what_is_wrong(*store_schedule(seed, max_steps=4_000, **workload))
        except SimulationError:
            stuck += 1
            continue
        if wrong:
            break
    else:
        pytest.fail(f"{mutant} was never caught by the checks ({stuck} schedules stuck)")
    assert _what_is_wrong(*store_schedule(seed, max_steps=4_000, **workload)) == wrong


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_rule3_electing_the_largest_proposal_is_caught(monkeypatch):
    """Not a safety bug in a plain round (every writer sees the same backup values, and the
    largest is as good a tie-break as the smallest), but INSERT's withdrawal writes a void into
    a round that is still open, and only the smallest-wins rule makes a late proposer seeing
    [its own claim, a void] lose. With the largest it elects itself and waits forever (about
    one schedule in 1500 with this workload): caught as a stuck run, or by the checker."""
    _patch_everywhere(monkeypatch, "resolve", _rule3_largest)
    for seed in range(20_000):
        try:
            sim, _ = store_schedule(seed, max_steps=4_000)
        except SimulationError:
            return
        if not check(sim.history).ok:
            return
    pytest.fail("Rule 3 electing the largest proposal was never caught")
