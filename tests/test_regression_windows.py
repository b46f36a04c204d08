"""The windows of seed-pinned regressions (``regression_windows``, the simulator's trace):
a seed whose run misses its window fails loudly instead of passing, and the trace reads a run
in the store's terms (a slot's primary and backups, a commit record) as a window needs."""

from __future__ import annotations

import find_seeds
import pytest
from regression_windows import CRASHED_COMMIT_REPLICA_REBUILT, REGRESSIONS, Regression
from test_failover import _config
from test_rebuild_soak import CycleRun

from fusee.driver import run
from fusee.emulator.testkit.simulator import Call, Simulator
from fusee.emulator.testkit.trace import Trace
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport


def test_a_seed_that_misses_its_window_fails_loudly():
    """A window that needs a crashed client, on a run with none: the run passes its checks,
    and the test fails on the window, saying how to find another seed."""
    reg = Regression("crash-needed", CRASHED_COMMIT_REPLICA_REBUILT, CycleRun, ())
    with pytest.raises(AssertionError, match=r"seed 101 no longer reaches its window: find "
                                             r"another \(python3 tests/find_seeds.py"):
        reg.check(101, 3, 2, crash=False)


def test_a_seed_in_its_window_names_the_witness():
    reg = REGRESSIONS["round-without-backup"]
    (case,) = reg.cases
    witness, failure = reg.probe(*case)
    assert failure is None and witness is not None and "no backup" in witness


def test_the_trace_reads_an_update_in_the_stores_terms():
    """r = 3 on 3 MNs: an update's round CASes both backups, then writes its COMMITTED record,
    then CASes the primary; each CAS swaps. The trace says which is which."""
    cfg = _config(3, 3)
    mem = LocalMemory(cfg)
    core = ClientCore(cfg, 0)
    run(core.open(), LocalTransport(cfg, memory=mem))
    run(core.insert(b"k", b"v0"), LocalTransport(cfg, memory=mem))
    sim = Simulator(mem, 1)
    sim.add_client("c0", [Call("update", b"k", b"v1", lambda: core.update(b"k", b"v1"))])
    sim.run()
    (update,) = Trace(sim).ops()
    backups = [c for c in update.cases if not c.primary]
    (primary,) = [c for c in update.cases if c.primary]
    assert len(backups) == 2 and all(c.took and not c.late for c in backups + [primary])
    assert {c.node for c in backups} | {primary.node} == {0, 1, 2}
    assert primary.replicas[0] == primary.node and primary.step > max(c.step for c in backups)
    assert update.commits == (0,) and not update.crashed and update.epochs == (0,)
    assert len({c.slot for c in update.cases}) == 1


def test_find_seeds_prints_the_seeds_that_reach_a_window(capsys):
    assert find_seeds.main(["round-without-backup", "--start", "101", "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("(101, 3, 2, False) reaches it: ") and "no backup" in out


def test_find_seeds_says_what_to_do_with_a_name_it_does_not_know(capsys):
    assert find_seeds.main(["no-such-regression"]) == 2
    assert capsys.readouterr().err == "no regression 'no-such-regression': --list names them\n"
