"""Hostile process tests of rebuilds the other process tests do not reach, judged as they are
(every client process's history linearizable with a reader's final gets, the leak audit and
the index check under the final membership). Real processes: zmq memory nodes (r = 3), a
master, client processes on hot keys and fresh ones.

- a client process SIGKILLed inside a rebuild's pause (the master expires it and recovers
  its id once the rebuild has published);
- an MN asking to rejoin while another MN's failover is pending;
- two MNs asking to rejoin one right after the other;
- an MN killed in its own rebuild (copying online, or in the pause), then rejoining again.

After each, every MN but the last one rebuilt is killed: it alone must hold everything
acknowledged. Behind the ``soak`` marker (20-40 s each):
python3 -m pytest tests/test_hostile_rebuilds_processes.py -m soak
"""

from __future__ import annotations

import pytest
from histories import unexpected_errors
from processes import stop_processes, wait_for
from storekit import SMALL
from test_failover_processes import LEASES, _history, read_back_and_check, running
from test_hostile_processes import CLIENTS, _carry_on, _cluster, _clients, _kill_and_fail_over
from test_master_zookeeper import (Workload, _mn_state, alone_on_mn_1, leader_index,
                                   stopped_until_deposed)

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster
from fusee.emulator.testkit import zk_ensemble
from fusee.emulator.testkit.history import CRASHED
from fusee.master.link import MasterError
from fusee.membership import Membership

pytestmark = pytest.mark.soak


@pytest.fixture(scope="module")
def ensemble():
    """A ZooKeeper ensemble for the masters' tests of this module."""
    with zk_ensemble.ZooKeeperEnsemble(3) as zk:
        yield zk


def _state(c: LocalCluster, node: int) -> tuple[str, str | None] | None:
    """MN ``node``'s state and rebuild phase in the master's status (None: no answer now)."""
    try:
        entry = c.master_status()["memnodes"][str(node)]
    except MasterError:
        return None
    return entry["state"], entry.get("phase")


def _alone(c: LocalCluster, progress, survivors, keep: int) -> None:
    """Kill every MN but ``keep``; once they are failed over, the clients carry on on it."""
    others = [m for m in range(3) if m != keep]
    for m in others:
        c.kill(m)
    wait_for(lambda: c.master_status()["dead"] == others, f"MNs {others}' failover",
             timeout=120)
    _carry_on(progress, f"on MN {keep} alone", survivors=survivors)


def _judge(c: LocalCluster, procs, stop, outs, killed: tuple[int, ...] = ()) -> None:
    """Stop the clients, then: no unexpected error, a crashed operation only in a killed
    client, a linearizable history with final gets, the audit and the index check."""
    stop.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for i, p in enumerate(procs) if i not in killed] == \
        [0] * (CLIENTS - len(killed))
    status = wait_for(lambda: (s := c.master_status())["repairs"] == {} and s,
                      "the master's repairs", timeout=120)
    membership = Membership.from_wire(status["membership"])
    ops = [op for i, out in enumerate(outs) for op in _history(f"c{i}", out)]
    unexpected = unexpected_errors(ops)
    assert not unexpected, "\n".join(map(str, unexpected[:10]))
    assert not any(op.status == CRASHED for op in ops if op.client not in
                   {f"c{i}" for i in killed})
    read_back_and_check(c, ops, membership)


def test_a_client_killed_in_a_rebuild_pause_loses_nothing(tmp_path):
    """MN 0 killed, failed over, restarted with --rejoin; the moment the master's status
    shows its rebuild pausing the clients, client process c0 is SIGKILLed (it may have acked
    the pause or not: either way the rebuild publishes, and c0 is recovered after it)."""
    with _cluster() as c:
        procs, progress, stop, outs = _clients(c, tmp_path)
        with running(procs, stop):
            _kill_and_fail_over(c, progress, 0)
            c.rejoin(0)
            wait_for(lambda: _state(c, 0) == ("rebuilding", "pausing"), "MN 0's pause",
                     timeout=120, interval=0.005)
            procs[0].kill()
            wait_for(lambda: _state(c, 0) == ("alive", None), "MN 0's rebuild", timeout=120)
            survivors = (1, 2)
            _carry_on(progress, "after MN 0's rebuild", survivors=survivors)
            wait_for(lambda: c.master_status()["repairs"] == {}, "c0's recovery", timeout=120)
            _alone(c, progress, survivors, keep=0)
            _judge(c, procs, stop, outs, killed=(0,))


@pytest.mark.parametrize("case", ["while another fails over", "one after the other"])
def test_two_mns_rejoining_close_together_lose_nothing(case, tmp_path):
    """``while another fails over``: MN 0 killed and failed over; MN 1 killed, and MN 0
    restarted with --rejoin at once, its ask heard while MN 1's failover is pending; then MN
    1 rejoins. ``one after the other``: MNs 0 and 1 killed and failed over, then both
    restarted with --rejoin back to back. Once both are alive, MNs 0 and 2 are killed: MN 1,
    rebuilt from the others, alone must hold everything acknowledged."""
    with _cluster() as c:
        procs, progress, stop, outs = _clients(c, tmp_path)
        with running(procs, stop):
            _kill_and_fail_over(c, progress, 0)
            c.kill(1)
            if case == "while another fails over":
                c.rejoin(0)
                wait_for(lambda: c.master_status()["dead"] == [0, 1] or
                         c.master_status()["dead"] == [1], "MN 1's failover", timeout=120)
                c.rejoin(1)
            else:
                wait_for(lambda: c.master_status()["dead"] == [0, 1], "MN 1's failover")
                c.rejoin(0)
                c.rejoin(1)
            for m in (0, 1):
                wait_for(lambda m=m: _state(c, m) == ("alive", None), f"MN {m}'s rebuild",
                         timeout=120)
            _carry_on(progress, "after both rebuilds")
            _alone(c, progress, range(CLIENTS), keep=1)
            _judge(c, procs, stop, outs)


@pytest.mark.parametrize("phase", ["copying online", "pausing"])
def test_an_mn_killed_in_its_own_rebuild_rejoins_again(phase, tmp_path):
    """MN 0 killed, failed over, restarted with --rejoin, and SIGKILLed again as soon as the
    status shows its rebuild in ``phase``: the rebuild fails (the clients resume, in a new
    epoch if the pause had begun closing rounds); restarted once more, it is rebuilt. Then
    MNs 1 and 2 are killed: MN 0 alone must hold everything acknowledged."""
    with _cluster() as c:
        procs, progress, stop, outs = _clients(c, tmp_path)
        with running(procs, stop):
            _kill_and_fail_over(c, progress, 0)
            c.rejoin(0)
            wait_for(lambda: _state(c, 0) == ("rebuilding", phase), f"MN 0 {phase}",
                     timeout=120, interval=0.005)
            c.kill(0)
            wait_for(lambda: (_state(c, 0) or ("",))[0] == "dead", "MN 0's rebuild to fail",
                     timeout=120)
            _carry_on(progress, "after the failed rebuild")
            c.rejoin(0)
            wait_for(lambda: _state(c, 0) == ("alive", None), "MN 0's rebuild", timeout=120)
            _carry_on(progress, "after MN 0's rebuild")
            _alone(c, progress, range(CLIENTS), keep=0)
            _judge(c, procs, stop, outs)


@pytest.mark.skipif(zk_ensemble.missing() is not None,
                    reason=f"no ZooKeeper here: {zk_ensemble.missing()}")
@pytest.mark.parametrize("phase", ["copying online", "pausing"])
def test_a_leader_stopped_in_a_rebuild_is_deposed_and_does_no_harm(ensemble, phase, tmp_path):
    """Masters on ZooKeeper; MN 1 killed, failed over and restarted with --rejoin; the leader
    SIGSTOPped once the status shows the rebuild in ``phase`` (mid-copy, most likely). A
    standby takes over and rebuilds MN 1 itself; then the old leader is SIGCONTed: it must
    stop without writing anything more (what it was copying is older than what the new
    leader copied). Then MNs 0 and 2 are killed: MN 1 alone must hold everything
    acknowledged."""
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True, masters=2,
                      coordination=ensemble.url, layout=LayoutConfig(**SMALL), **LEASES) as c:
        w = Workload(c, tmp_path)
        try:
            first = leader_index(c)
            c.kill(1)
            wait_for(lambda: _mn_state(c, 1) == "dead", "MN 1's failover", timeout=120)
            w.advance("the clients to carry on without MN 1")
            c.rejoin(1)
            wait_for(lambda: _state(c, 1) == ("rebuilding", phase), f"MN 1 {phase}",
                     timeout=120, interval=0.002)

            def under_the_new_leader() -> None:
                wait_for(lambda: _mn_state(c, 1) == "alive", "MN 1 rebuilt by the new leader",
                         timeout=120)
                w.advance("the clients to carry on under the new leader")
            stopped_until_deposed(c, first, under_the_new_leader)
            w.advance("the clients to carry on after the old leader woke up")
            assert stop_processes(w.procs, w.stop) == [0] * CLIENTS
        finally:
            stop_processes(w.procs, w.stop, timeout=5)
        ops = w.history()
        assert not unexpected_errors(ops), "\n".join(map(str, unexpected_errors(ops)[:10]))
        alone_on_mn_1(c, ops)
