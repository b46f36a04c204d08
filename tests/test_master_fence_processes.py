"""A leader deposed while stopped between its leadership check and the batch it checked
(docs/design.md#fencing): masters on ZooKeeper (``fusee.emulator.testkit.zk_ensemble``), zmq
memory nodes (r = 3), client processes on hot keys.

The leader checks that it leads before every batch it posts (``LeaderGuard``), but a batch past
that check when the process stops (SIGSTOP, a long GC pause, a VM migrated) goes out whenever
it runs again: after its ZooKeeper session expired, a standby took over and acted. Here the
masters are ``fusee.emulator.testkit.stopped_leader``s: the one that leads the rebuild stops
itself exactly there, before the first write of the rebuild's last phase to the rejoining MN
(its copy of the index, read in the pause). The new leader rebuilds that MN again, the clients
carry on on it, and then the old leader is woken up. Unfenced, its copy lands: the MN's index
goes back to what it was in the old leader's pause, and once the other MNs die every update
acknowledged since is lost (the final reads are not linearizable). Fenced, the new leader had
every MN refuse leaderships older than its own before it acted, and the old batch is refused.
"""

from __future__ import annotations

import os
import signal

import pytest
from processes import stop_processes, wait_for
from storekit import SMALL
from test_failover_processes import LEASES
from test_master_zookeeper import Supervisor, Workload, _mn_state, alone_on_mn_1, leader_index

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster, master_name
from fusee.emulator.testkit import stopped_leader, zk_ensemble

pytestmark = pytest.mark.skipif(zk_ensemble.missing() is not None,
                                reason=f"no ZooKeeper here: {zk_ensemble.missing()}")


@pytest.fixture(scope="module")
def ensemble():
    with zk_ensemble.ZooKeeperEnsemble(3) as zk:
        yield zk


def _stopped(pid: int) -> bool:
    """Process ``pid`` is stopped (SIGSTOP): its state in /proc is T."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _stopping_masters(c: LocalCluster) -> None:
    """Make both masters ``stopped_leader``s (the first to get there stops: whichever leads
    the rebuild, however the election went on a loaded host), one after the other, so that
    one always leads."""
    for i in (0, 1):
        c.stop_master(i=i)                  # a clean exit: the other takes over at once
        c.start_master(i, module="fusee.emulator.testkit.stopped_leader")
        leader_index(c)


def _a_stopped_master(c: LocalCluster) -> tuple[int] | None:
    for i in (0, 1):
        try:
            if _stopped(c.master_procs[master_name(i)].pid):
                return (i,)
        except OSError:
            pass                            # gone meanwhile (the supervisor restarts it)
    return None


def test_a_leader_stopped_after_its_check_lands_nothing_after_its_successor_acted(
        ensemble, tmp_path, monkeypatch):
    monkeypatch.setenv(stopped_leader.ONCE, str(tmp_path / "stopped-once"))
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True, masters=2,
                      coordination=ensemble.url, layout=LayoutConfig(**SMALL),
                      workdir=tmp_path, **LEASES) as c:
        _stopping_masters(c)
        with Supervisor(c):                 # a master that lost its session comes back
            w = Workload(c, tmp_path)
            try:
                c.kill(1)
                wait_for(lambda: _mn_state(c, 1) == "dead", "MN 1's failover", timeout=120)
                w.advance("the clients to carry on without MN 1")
                c.rejoin(1)
                (old,) = wait_for(lambda: _a_stopped_master(c),
                                  "the leader to stop in MN 1's rebuild", timeout=120)
                proc = c.master_procs[master_name(old)]
                try:
                    leader_index(c, other_than=old)
                    wait_for(lambda: _mn_state(c, 1) == "alive",
                             "MN 1 rebuilt by the new leader", timeout=120)
                    w.advance("the clients to carry on under the new leader")
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                assert proc.wait(60) == 1, c.master_log(old)
                w.advance("the clients to carry on after the old leader woke up")
                assert stop_processes(w.procs, w.stop) == [0] * len(w.procs)
            finally:
                stop_processes(w.procs, w.stop, timeout=5)
        alone_on_mn_1(c, w.history())
        # its batch did go out, and MN 1 refused it
        log = (c.workdir / f"{master_name(old)}.log").read_text()
        assert "the batch checked before the stop failed: Fenced: MN 1: a newer master leads" \
            in log, log[-4096:]


def test_each_leadership_is_numbered_above_every_one_before(ensemble):
    """The number a leader's requests carry grows from one leader to the next, whether the
    next stood in the election already (as a standby does) or joined it later."""
    from fusee.master.election import ZooKeeperLeadership

    def contender(i: int) -> ZooKeeperLeadership:
        return ZooKeeperLeadership(ensemble.url, "numbered", f"ipc:///m{i}", session_timeout=4.0,
                                   connect_timeout=30.0)

    masters = [contender(0), contender(1)]
    try:
        for m in masters:
            m.campaign()
        first = wait_for(lambda: [m for m in masters if m.acquired.is_set()], "a leader")[0]
        standby = masters[1 - masters.index(first)]
        masters.remove(first)
        first.close()
        wait_for(standby.acquired.is_set, "the standby to lead")
        latecomer = contender(2)
        masters.append(latecomer)
        latecomer.campaign()
        masters.remove(standby)
        standby.close()
        wait_for(latecomer.acquired.is_set, "the latecomer to lead")
        assert first.number is not None and standby.number is not None
        assert first.number < standby.number < latecomer.number
    finally:
        for m in masters:
            m.close()
