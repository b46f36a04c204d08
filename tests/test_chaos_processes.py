"""Process-level chaos under a mixed workload (tests/chaos.py): MNs killed and rejoined (during
a rebuild too), stopped past their lease; the leading master killed or stopped, all masters
killed; ZooKeeper servers killed (one, the quorum, all); client processes killed or stopped
past their lease; two faults at once; ``fusee status`` all along. Each round must end with no
finding: no acknowledged write lost (the final reads linearizable), no wedge, no failed
operation, none longer than a failover, no traceback, a clean audit, every client id
recovered, nothing left behind.

Soak only (a round of 3-6 faults takes 30-90 s on a quiet host): python3 -m pytest -m soak
tests/test_chaos_processes.py; more rounds, other seeds: python3 tests/run_chaos.py --help.
"""

from __future__ import annotations

import pytest
from chaos import COMBOS, KINDS, Round, run_round

from fusee.emulator.testkit import zk_ensemble

pytestmark = [pytest.mark.soak,
              pytest.mark.skipif(zk_ensemble.missing() is not None,
                                 reason=f"no ZooKeeper here: {zk_ensemble.missing()}")]


@pytest.fixture(scope="module")
def ensemble():
    with zk_ensemble.ZooKeeperEnsemble(3) as zk:
        yield zk


@pytest.mark.parametrize("kind", KINDS)
def test_one_kind_of_fault(ensemble, tmp_path, kind):
    r = run_round(Round(seed=1, steps=3, kinds=(kind,)), tmp_path, ensemble)
    assert not r.findings, "\n".join(r.findings)


@pytest.mark.parametrize("backend,seed,kinds", [("zmq", 1, KINDS), ("shm", 2, KINDS),
                                                ("zmq", 202, COMBOS), ("shm", 3, COMBOS)])
def test_mixed_faults(ensemble, tmp_path, backend, seed, kinds):
    r = run_round(Round(seed=seed, steps=6, backend=backend, kinds=tuple(kinds)), tmp_path,
                  ensemble)
    assert not r.findings, "\n".join(r.findings)
