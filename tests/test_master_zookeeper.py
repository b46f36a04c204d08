"""Masters on ZooKeeper, for real: a 3-server ensemble on loopback
(``fusee.emulator.testkit.zk_ensemble``, one per module), masters electing their leader on it,
memory nodes and client processes, and
things killed with SIGKILL under a mixed workload (r = 3, 3 MNs): a ZooKeeper server, the
leading master, then an MN, which the new leader must fail over. No operation may fail, the
history (final reads included) must be linearizable, and the audit must account for every
object. The pause each kill causes is printed (``-s``). Skipped, with the reason, where java
or ZooKeeper's jars or kazoo are missing (.ci/run installs them).

Also: a deposed leader cannot publish (the store's version fence), and a master that cannot
reach ZooKeeper says so in one line.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
from histories import check_with_final_reads, unexpected_errors
from processes import stop_processes
from storekit import SMALL
from test_failover_processes import KEYS, LEASES, _history, _wait, _worker

from fusee.emulator.testkit import zk_ensemble
from fusee.emulator.cluster import LocalCluster, master_name
from fusee.emulator.testkit.history import Op
from fusee.audit import audit
from fusee.config import LayoutConfig
from fusee.driver import run
from fusee.membership import Membership
from fusee.master.link import MasterError, membership_wait

pytestmark = pytest.mark.skipif(zk_ensemble.missing() is not None,
                                reason=f"no ZooKeeper here: {zk_ensemble.missing()}")
CLIENTS = 3
#: operations every client does between two kills
STEP = 80


@pytest.fixture(scope="module")
def ensemble():
    with zk_ensemble.ZooKeeperEnsemble(3) as zk:
        yield zk


def leader_index(c: LocalCluster, other_than: int | None = None) -> int:
    """The index of the leading master (waiting for one other than ``other_than``)."""
    def elected():
        try:
            pid = c.master_status()["pid"]
        except MasterError:
            return None                         # none elected yet
        (name,) = [n for n, p in c.master_procs.items() if p.pid == pid]
        i = 0 if name == "master" else int(name.removeprefix("master"))
        return None if i == other_than else (i,)
    return _wait(elected, "a leading master", timeout=60)[0]


class Workload:
    """CLIENTS worker processes (tests/test_failover_processes.py's mix on the hot keys),
    each logging its history."""

    def __init__(self, c: LocalCluster, tmp_path):
        ctx = mp.get_context("spawn")
        self.progress, self.stop = ctx.Array("q", CLIENTS, lock=False), ctx.Event()
        self.outs = [tmp_path / f"c{i}.jsonl" for i in range(CLIENTS)]
        self.procs = [ctx.Process(target=_worker, args=(str(c.config_path), i,
                                                         str(self.outs[i]), self.progress,
                                                         self.stop))
                      for i in range(CLIENTS)]
        for p in self.procs:
            p.start()
        self.advance("the clients to get going")

    def advance(self, what: str, survivors=range(CLIENTS)) -> None:
        marks = list(self.progress)
        _wait(lambda: all(self.progress[i] >= marks[i] + STEP for i in survivors), what,
              timeout=120)

    def history(self) -> list[Op]:
        return [op for i, out in enumerate(self.outs) for op in _history(f"c{i}", out)]


def pause_between(ops: list[Op], start_ns: int, end_ns: int) -> float:
    """The longest operation that returned between ``start_ns`` and ``end_ns`` (seconds)."""
    return max(op.ret - op.invoke for op in ops
               if op.ret and 2 * start_ns < op.ret < 2 * end_ns) / 2e9


def test_kills_of_a_zookeeper_server_the_leading_master_and_then_a_memory_node(ensemble,
                                                                                tmp_path):
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True, masters=2,
                      coordination=ensemble.url, layout=LayoutConfig(**SMALL), **LEASES) as c:
        w = Workload(c, tmp_path)
        kills = {}
        try:
            kills["zookeeper server"] = time.monotonic_ns()
            ensemble.kill(0)
            w.advance("the clients to carry on without a ZooKeeper server")
            ensemble.start(0)
            first = leader_index(c)
            kills["leading master"] = time.monotonic_ns()
            c.stop_master(kill=True, i=first)
            leader_index(c, other_than=first)
            w.advance("the clients to carry on under the new leader")
            c.start_master(first)                   # back, as a standby
            kills["memory node"] = time.monotonic_ns()
            c.kill(1)
            _wait(lambda: c.master_status()["dead"] == [1], "the new leader's failover")
            w.advance("the clients to carry on in the new epoch")
            assert stop_processes(w.procs, w.stop) == [0] * CLIENTS
        finally:
            stop_processes(w.procs, w.stop, timeout=5)
        ops = w.history()
        unexpected = unexpected_errors(ops)
        assert not unexpected, "\n".join(map(str, unexpected[:10]))
        times = [*kills.values(), time.monotonic_ns()]
        for (what, t), end in zip(kills.items(), times[1:]):
            pause = pause_between(ops, t, end)
            print(f"\nkill -9 of the {what}: longest operation after it {pause:.2f} s "
                  f"(client_lease {c.config.client_lease:g} s, mn_lease "
                  f"{c.config.mn_lease:g} s, timeout {c.config.timeout:g} s)")
            assert pause < membership_wait(c.config)
        status = _wait(lambda: (s := c.master_status())["repairs"] == {} and
                       len(s["free_ids"]) == CLIENTS and s, "the new leader's repairs")
        membership = Membership.from_wire(status["membership"])
        assert membership.epoch == 1 and membership.dead == {1}
        with c.client() as reader:
            check_with_final_reads(ops, reader, KEYS)
        with c.transport(dead=membership.dead) as t:
            report = run(audit(c.config, (), membership), t)
        assert report.ok, report.explain()


def test_a_deposed_leader_cannot_publish(ensemble):
    from kazoo.client import KazooClient

    from fusee.master.store import Deposed, ZooKeeperStore
    clients = [KazooClient(hosts=ensemble.hosts, timeout=4.0) for _ in range(2)]
    for zk in clients:
        zk.start(timeout=30)
    try:
        old, new = (ZooKeeperStore(zk, "/fusee/deposed-test") for zk in clients)
        assert old.load() is None
        old.claim({"epoch": 1})
        assert new.load() == {"epoch": 1}
        new.claim({"epoch": 1})                 # the successor takes over
        with pytest.raises(Deposed):
            old.save({"epoch": 2})              # the old leader's write is refused
        assert new.load() == {"epoch": 1}
        new.save({"epoch": 2})
        assert ZooKeeperStore(clients[0], "/fusee/deposed-test").load() == {"epoch": 2}
    finally:
        for zk in clients:
            zk.stop()
            zk.close()


@pytest.mark.parametrize("writes", [50, pytest.param(1000, marks=pytest.mark.soak)])
def test_a_new_leader_reads_the_state_written_last_through_another_server(ensemble, writes):
    """ZooKeeper serves a read from what the client's server has applied: right after a
    write made through one server, another may still answer with the older state (2 reads
    in a hundred, here). A master loading the state syncs first, so it reads what was
    written last, whichever servers the two masters' sessions are on."""
    from kazoo.client import KazooClient

    from fusee.master.store import ZooKeeperStore
    writer_hosts, reader_hosts = ensemble.hosts.split(",")[:2]
    clients = [KazooClient(hosts=h, timeout=4.0) for h in (writer_hosts, reader_hosts)]
    for zk in clients:
        zk.start(timeout=30)
    try:
        for i in range(writes):
            writer, reader = (ZooKeeperStore(zk, f"/fusee/fresh-read-{i}") for zk in clients)
            writer.claim({"epoch": i})
            assert reader.load() == {"epoch": i}, f"a stale read after {i} fresh ones"
    finally:
        for zk in clients:
            zk.stop()
            zk.close()


def test_a_master_that_cannot_reach_zookeeper_says_so(tmp_path):
    c = LocalCluster(memnodes=1, transport="shm", workdir=str(tmp_path), master=False)
    config = c.config.with_(master=f"ipc://{tmp_path}/m.sock",
                            coordination="zookeeper://127.0.0.1:9")
    config.save(tmp_path / "zk.toml")
    out = subprocess.run([sys.executable, "-m", "fusee.master.command", "--config",
                          str(tmp_path / "zk.toml")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        (f"fusee master: error: cannot reach ZooKeeper at 127.0.0.1:9 within "
         f"{config.timeout:g} s: is the ensemble up?")]


def test_a_master_of_another_cluster_on_the_same_path_is_refused_before_the_election(
        ensemble, tmp_path):
    """Two clusters of one name on one ensemble share ``/fusee/<name>``: the other cluster's
    master exits with one line before it stands in this one's election (where it would wait
    as a standby, then lead this cluster with the other's MNs, or leave its own leaderless),
    and this cluster's masters and clients carry on."""
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True, masters=2,
                      coordination=ensemble.url, layout=LayoutConfig(**SMALL), **LEASES) as c:
        leader = c.master_procs[master_name(leader_index(c))].pid
        other = c.config.with_(
            memnodes=tuple(dataclasses.replace(m, endpoint=f"ipc://{tmp_path}/other{m.id}")
                           for m in c.config.memnodes),
            master=f"ipc://{tmp_path}/other-master.sock")
        other.save(tmp_path / "other.toml")
        out = subprocess.run([sys.executable, "-m", "fusee.master.command", "--config",
                              str(tmp_path / "other.toml")], capture_output=True, text=True,
                             timeout=30, check=False)
        assert out.returncode == 2, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith(f"fusee master: error: the master state in ZooKeeper "
                               f"(/fusee/{c.name}/state) is that of another cluster named "
                               f"{c.name!r}: its memory nodes are at "), line
        assert line.endswith("if this is another cluster, give it its own [cluster] name "
                             "(or a chroot in coordination); if not, fix the config"), line
        assert c.master_status()["pid"] == leader
        with c.client() as kv:
            kv.put(b"still", b"served")
            assert kv.get(b"still") == b"served"


@pytest.mark.soak
def test_the_leader_killed_with_a_client_then_a_memory_node_before_the_takeover(ensemble,
                                                                                 tmp_path):
    """The leading master and a client process killed together, and an MN killed at once,
    while no master leads yet: the new leader fails the MN over (the surviving clients pause
    for it and carry on) and recovers the killed client."""
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True, masters=3,
                      coordination=ensemble.url, layout=LayoutConfig(**SMALL), **LEASES) as c:
        w = Workload(c, tmp_path)
        try:
            first = leader_index(c)
            c.stop_master(kill=True, i=first)
            w.procs[0].kill()
            c.kill(2)
            killed = time.monotonic_ns()
            assert leader_index(c, other_than=first) != first
            _wait(lambda: c.master_status()["dead"] == [2], "the new leader's failover",
                  timeout=120)
            w.advance("the surviving clients to carry on in the new epoch", survivors=(1, 2))
            assert stop_processes(w.procs[1:], w.stop) == [0, 0]
        finally:
            stop_processes(w.procs, w.stop, timeout=5)
        ops = w.history()
        unexpected = unexpected_errors(ops)
        assert not unexpected, "\n".join(map(str, unexpected[:10]))
        print(f"\nkill -9 of the leading master, a client and an MN: longest operation after "
              f"it {pause_between(ops, killed, time.monotonic_ns()):.2f} s")
        status = _wait(lambda: (s := c.master_status())["repairs"] == {} and
                       len(s["free_ids"]) == CLIENTS and s, "the killed client's recovery")
        assert [r["reason"] for r in status["repaired"]].count("expired") == 1
        membership = Membership.from_wire(status["membership"])
        with c.client() as reader:
            check_with_final_reads(ops, reader, KEYS)
        with c.transport(dead=membership.dead) as t:
            report = run(audit(c.config, (), membership), t)
        assert report.ok, report.explain()


@pytest.mark.soak
def test_a_leader_paused_past_its_session_is_deposed_and_stops(ensemble, tmp_path):
    """The leader stopped (SIGSTOP: a long GC pause) past its ZooKeeper session: a standby
    takes over; woken up (SIGCONT), the old leader grants nothing (its last ZooKeeper round
    trip is too old) and exits with status 1 once it learns its session is gone, while the
    clients carry on with the new leader."""
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True, masters=2,
                      coordination=ensemble.url, layout=LayoutConfig(**SMALL), **LEASES) as c:
        w = Workload(c, tmp_path)
        try:
            first = leader_index(c)
            old = c.master_procs[master_name(first)]
            os.kill(old.pid, signal.SIGSTOP)
            try:
                leader_index(c, other_than=first)
                w.advance("the clients to carry on under the new leader")
            finally:
                os.kill(old.pid, signal.SIGCONT)
            assert old.wait(60) == 1, c.master_log(first)
            assert "stopping" in c.master_log(first)
            w.advance("the clients to carry on after the old leader woke up")
            assert stop_processes(w.procs, w.stop) == [0] * CLIENTS
        finally:
            stop_processes(w.procs, w.stop, timeout=5)
        ops = w.history()
        assert not unexpected_errors(ops), "\n".join(map(str, unexpected_errors(ops)[:10]))
        with c.client() as reader:
            check_with_final_reads(ops, reader, KEYS)
