"""The master as a process (``fusee.master.command``) with real memory nodes and clients:
restart, a client killed with kill -9, an MN killed and failed over, the pause of a batch in
flight, RPC errors, CURVE, the CLI, recovery time. The pure logic: tests/test_master.py."""

from __future__ import annotations

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import pytest
import zmq

from fusee.emulator import wire
from fusee.emulator.cluster import LocalCluster
from fusee.lease_guard import LeaseGuard
from fusee.driver import await_membership
from fusee.layout import META_RECOVERY
from fusee.master.logic import LeaseError, LeaseLapsed
from fusee.memory_map import MemoryMap
from fusee.verbs import Cas, EpochChanged, NodeTimeout, Read
from fusee.master.link import (LeaseKeeper, MasterBusy, MasterError, MasterLink,
                                    membership_wait, register_wait)
from processes import wait_for


def status(c: LocalCluster) -> dict:
    """The master's status, waited for as a registration is (``register_wait``): under load
    a master just restarted, still leasing and repairing, answered later than one timeout."""
    with MasterLink(c.config, register_wait(c.config)) as link:
        return link.status()


def small_cluster(**kw) -> LocalCluster:
    return LocalCluster(memnodes=3, master=True, **{"client_lease": 2.0, "mn_lease": 2.0,
                                                    "timeout": 1.0, **kw})


#: a client process that writes fresh keys and prints each acknowledged one
CHILD = r"""
import os, sys
from fusee.client import Client
kv = Client.connect(sys.argv[1])
print("id", kv.client_id, flush=True)
i = 0
while True:
    kv.insert(b"%d-key-%d" % (os.getpid(), i), b"value-%d" % i)
    print("ack", i, flush=True)
    i += 1
"""


def key(pid: int, i: int) -> bytes:
    return b"%d-key-%d" % (pid, i)


def run_child(c: LocalCluster, acks: int) -> tuple[int, int, int, float]:
    """Start a writing client process, kill -9 it after ``acks`` acknowledged inserts (so
    with one insert in flight); returns its pid, id, last acknowledged insert, kill time."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(c.config_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline().split()
        acked = -1
        while first and acked < acks:
            line = child.stdout.readline().split()
            if not line:
                break
            acked = int(line[1])
        if acked < acks:
            child.kill()
            raise AssertionError(f"the client process failed:\n{child.stderr.read()}")
        os.kill(child.pid, signal.SIGKILL)
        killed = time.time()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    return child.pid, int(first[1]), acked, killed


def hold_recovery_lock(t, c: LocalCluster, cid: int, hold: bool) -> None:
    """Take (or give back) ``cid``'s recovery lock as another recoverer would: the master's
    recovery of ``cid`` then fails with RecoveryInProgress until it is given back."""
    lock = MemoryMap.of(c.config.layout).client_meta(cid) + META_RECOVERY
    old, new = (0, 1000) if hold else (1000, 0)
    assert t.execute([Cas(0, lock, old, new)]) == [old]


def test_a_killed_client_loses_its_lease_and_the_master_recovers_it():
    with small_cluster() as c:
        pid, cid, acked, _ = run_child(c, 30)
        seen = wait_for(lambda: (s := status(c)) and str(cid) not in s["clients"] and s,
                        "the killed client's lease to expire")
        assert str(cid) in seen["repairs"] or cid in seen["free_ids"]
        wait_for(lambda: cid in status(c)["free_ids"], "the recovery of the killed client")
        (record,) = [r for r in status(c)["repaired"] if r["id"] == cid]
        assert record["reason"] == "expired" and not record["report"]["clean"]
        assert record["report"]["entries"] >= acked + 1
        with c.client() as kv:
            assert kv.client_id == cid              # recycled after its recovery
            for i in range(acked + 1):              # nothing acknowledged is lost
                assert kv.get(key(pid, i)) == b"value-%d" % i
            kv.put(b"after", b"recovery")
            assert kv.get(b"after") == b"recovery"


def test_an_id_is_not_handed_out_before_its_recovery_completes():
    with small_cluster() as c:
        kv = c.client()
        cid = kv.client_id
        kv.put(b"k", b"v")
        # someone else holds the id's recovery lock: the master's recovery cannot finish
        with c.transport() as t:
            hold_recovery_lock(t, c, cid, True)
            kv.lease.close(release=False)           # stop renewing: as if it had crashed
            kv.transport.close()
            s = wait_for(lambda: (s := status(c))["repairs"].get(str(cid), {}).get("attempts")
                         and s, "a failed recovery attempt")
            assert "RecoveryInProgress" in s["repairs"][str(cid)]["error"]
            others = [c.client() for _ in range(3)]
            assert cid not in [o.client_id for o in others]
            assert str(cid) in status(c)["repairs"]
            hold_recovery_lock(t, c, cid, False)    # let go: the retry succeeds
        wait_for(lambda: cid in status(c)["free_ids"], "the retried recovery")
        with c.client() as again:
            assert again.client_id == cid and again.get(b"k") == b"v"
        for o in others:
            o.close()


def test_master_restart_carries_on():
    # the master must be back before the clients' leases run out: long enough for a restart
    with small_cluster(client_lease=5.0) as c, c.transport() as t:
        kv = c.client()
        kv.put(b"k", b"v")
        other = c.client()
        hold_recovery_lock(t, c, other.client_id, True)
        other.close()                           # its repair waits for the lock
        wait_for(lambda: status(c)["repairs"][str(other.client_id)]["attempts"],
                 "a first recovery attempt")
        before = status(c)
        c.stop_master(kill=True)                # a crash: no chance to write anything more
        c.start_master()
        restarted = time.monotonic()
        after = status(c)
        assert after["pid"] != before["pid"]
        assert set(after["clients"]) == set(before["clients"]) == {str(kv.client_id)}
        assert list(after["repairs"]) == list(before["repairs"]) == [str(other.client_id)]
        hold_recovery_lock(t, c, other.client_id, False)
        wait_for(lambda: other.client_id in status(c)["free_ids"],
                 "the new master to finish the repair")
        # a renewal sent after the restart reached the new master
        wait_for(lambda: kv.lease.expires > restarted + c.config.client_lease,
                 "a renewal through the restarted master")
        kv.put(b"k", b"w")
        assert kv.get(b"k") == b"w" and kv.lease.valid()
        with c.client() as newcomer:
            assert newcomer.client_id == other.client_id      # recycled, now recovered
        # the membership survives a restart too: a dead MN stays dead, the epoch stays
        c.kill(2)
        wait_for(lambda: status(c)["dead"] == [2], "MN 2 to be declared dead")
        c.stop_master(kill=True)
        c.start_master()
        s = status(c)
        assert (s["dead"], s["epoch"], sorted(s["alive"])) == ([2], 1, ["0", "1"])
        kv.lease.close()
        kv.transport.close()


def test_a_lapsed_lease_posts_no_verbs_until_the_restarted_master_renews_it():
    with small_cluster() as c:
        kv = c.client()
        kv.put(b"k", b"v")
        c.stop_master(kill=True)
        wait_for(lambda: not kv.lease.valid(), "the lease to lapse without a master")
        kv.executor.wait = 0.2                  # how long an operation waits for a renewal
        verbs = kv.transport.stats.verbs
        for call in (lambda: kv.get(b"k"), lambda: kv.put(b"k", b"w")):
            with pytest.raises(LeaseLapsed):
                call()
        assert kv.transport.stats.verbs == verbs and not kv.lease.ended
        c.start_master()                        # it leases every recorded client afresh
        kv.executor.wait = membership_wait(c.config)
        kv.put(b"k", b"x")                      # waits for the keeper's next renewal
        assert kv.get(b"k") == b"x" and kv.lease.valid()
        assert list(status(c)["clients"]) == [str(kv.client_id)]
        kv.close()
        with c.client() as fresh:
            assert fresh.get(b"k") == b"x"


#: a client process that writes fresh keys and prints each acknowledged one; once an operation
#: raises, it prints the exception, tries three more writes and prints what they raised
FENCED_CHILD = r"""
import sys
from fusee.client import Client
kv = Client.connect(sys.argv[1])
print("id", kv.client_id, flush=True)
i = 0
try:
    while True:
        kv.put(b"fenced-%d" % i, b"v")
        print("ack", i, flush=True)
        i += 1
except Exception as e:
    print("raised", type(e).__name__, flush=True)
for j in range(3):
    try:
        kv.put(b"after-%d" % j, b"v")
        print("wrote", j, flush=True)
    except Exception as e:
        print("raised", type(e).__name__, flush=True)
"""


def test_a_client_the_master_declared_dead_stays_fenced():
    """A client stopped (SIGSTOP: a long GC pause, a VM migration) past its lease and the
    grace, while the master runs: the master recovers it and reuses its id; woken up, the
    client posts no verb, its next operation raises LeaseExpired."""
    with small_cluster() as c:
        # stderr to a file: ``communicate`` reads the pipes' file descriptors and would lose
        # what ``readline`` has buffered (in CI: half an "ack" line read as an empty line)
        err_file = tempfile.TemporaryFile("w+")
        child = subprocess.Popen([sys.executable, "-c", FENCED_CHILD, str(c.config_path)],
                                 stdout=subprocess.PIPE, stderr=err_file, text=True)
        try:
            cid = int(child.stdout.readline().split()[1])
            while int(child.stdout.readline().split()[1]) < 20:
                pass
            os.kill(child.pid, signal.SIGSTOP)
            wait_for(lambda: cid in status(c)["free_ids"], "the stopped client's recovery")
            with c.client() as newcomer:
                assert newcomer.client_id == cid    # its id is someone else's now
                os.kill(child.pid, signal.SIGCONT)
                child.wait(timeout=60)             # what is left to print fits in the pipe
                out = child.stdout.read()
                err_file.seek(0)
                raised = [line for line in out.splitlines() if not line.startswith("ack")]
                assert raised == ["raised LeaseExpired"] * 4, err_file.read()
                for j in range(3):
                    assert newcomer.get(b"after-%d" % j) is None
                newcomer.put(b"after-0", b"mine")
                assert newcomer.get(b"after-0") == b"mine"
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGCONT)
                child.kill()
            child.wait()
            child.stdout.close()
            err_file.close()


def test_a_killed_memory_node_is_failed_over_and_its_clients_carry_on():
    with small_cluster() as c:
        kv = c.client()
        kv.put(b"k", b"v")
        assert status(c)["dead"] == [] and kv.lease.epoch == 0
        c.kill(1)
        s = wait_for(lambda: (s := status(c))["dead"] and s, "MN 1 to be failed over")
        assert s["dead"] == [1] and s["epoch"] == 1 and sorted(s["alive"]) == ["0", "2"]
        assert s["membership"]["dead"] == [1] and s["failing"] == [] and s["pause"] == 0
        (record,) = s["failovers"]
        assert (record["node"], record["epoch"]) == (1, 1) and record["failover_s"] > 0
        assert str(kv.client_id) in s["clients"]        # paused, not expired
        wait_for(lambda: kv.lease.epoch == 1,
                 lambda: f"the client to learn the new epoch: {status(c)}, lease {kv.lease.lost}")
        assert kv.get(b"k") == b"v"
        kv.put(b"k", b"w")
        with c.client() as newcomer:                    # registers in the new epoch
            assert newcomer.lease.membership.dead == {1} and newcomer.get(b"k") == b"w"
        kv.close()


def test_a_failover_waits_until_every_client_has_paused():
    """A client that neither acks the pause nor loses its lease holds the failover back;
    meanwhile a paused client posts nothing and newcomers are told to retry. Once its lease
    runs out it counts as crashed: the failover runs, then its recovery."""
    with small_cluster() as c:
        kv = c.client()
        kv.put(b"k", b"v")
        stubborn = MasterLink(c.config)                 # renews by hand, never acks
        g = stubborn.register()
        c.kill(2)
        s = wait_for(lambda: (s := status(c))["waiting_for"] == [g.id] and s,
                     "the other client to ack the pause for MN 2's failover")
        assert s["failing"] == [2] and s["epoch"] == 0 and s["pause"] == 1
        assert kv.lease.pause == kv.lease.acked == 1
        with MasterLink(c.config) as other, pytest.raises(MasterBusy):
            other.register()
        verbs = kv.transport.stats.verbs
        got = {}
        reader = threading.Thread(target=lambda: got.setdefault("k", kv.get(b"k")))
        reader.start()
        for _ in range(4):                              # it keeps its lease: no failover
            g = stubborn.renew(g)
            assert g.pause == 1 and status(c)["failing"] == [2]
            assert kv.transport.stats.verbs == verbs and reader.is_alive()
            time.sleep(c.config.client_lease / 4)
        stubborn.close()                                # silent now: its lease runs out
        reader.join(60)
        assert got == {"k": b"v"} and kv.lease.epoch == 1
        wait_for(lambda: g.id in status(c)["free_ids"], "the stubborn client's recovery")
        (record,) = [r for r in status(c)["repaired"] if r["id"] == g.id]
        assert record["reason"] == "expired"
        kv.close()


class _Held:
    """A real transport whose next batch stays in flight until ``go`` is set."""

    def __init__(self, transport):
        self.transport, self.go, self.inside = transport, threading.Event(), threading.Event()

    def execute(self, batch):
        self.inside.set()
        assert self.go.wait(60)
        return self.transport.execute(batch)


def test_a_pause_waits_for_the_batch_in_flight_and_the_next_batch_gets_the_epoch():
    with small_cluster() as c, c.transport() as t:
        keeper = LeaseKeeper(c.config)
        with pytest.raises(NodeTimeout, match="no new membership"):    # no failover comes
            LeaseGuard(t, keeper, 0.1, keeper.membership).await_membership(0)
        held = _Held(t)
        guard = LeaseGuard(held, keeper, membership_wait(c.config), keeper.membership)
        done = []
        flight = threading.Thread(target=lambda: done.append(guard.execute([Read(0, 0, 8)])))
        flight.start()
        assert held.inside.wait(60)
        c.kill(2)
        s = wait_for(lambda: (s := status(c))["failing"] == [2] and keeper.pause and s,
                     "the pause for MN 2's failover")
        # the keeper cannot ack while the batch is in flight: the failover waits for it
        assert s["waiting_for"] == [keeper.client_id] and keeper.acked == 0 and not done
        held.go.set()
        flight.join(60)
        assert len(done[0][0]) == 8
        wait_for(lambda: keeper.membership.epoch == 1, "the new epoch")
        with pytest.raises(EpochChanged) as e:
            guard.execute([Read(0, 0, 8)])      # not posted: the operation adopts it first
        assert e.value.membership.dead == {2} and guard.handed == 1
        assert guard.execute([Read(0, 0, 8)]) == done[0]
        with pytest.raises(EpochChanged):
            guard.await_membership(0)   # epoch 1 is out already: at once
        keeper.close()


def test_more_dead_memory_nodes_than_replicas_can_bear_is_reported():
    with small_cluster(replication=2) as c:
        kv = c.client()
        kv.put(b"k", b"v")
        c.kill(1)
        wait_for(lambda: status(c)["dead"] == [1], "MN 1 to be failed over")
        c.kill(2)
        s = wait_for(lambda: (s := status(c))["lost"] and s, "the data loss to be noticed")
        assert s["failing"] == [2] and "replication factor is 2" in s["lost"]
        assert "DATA LOST" in c.master_log()
        with pytest.raises(NodeTimeout, match="no failover will come"):
            kv.put(b"k", b"w")
        with MasterLink(c.config) as link, pytest.raises(MasterError, match="lost"):
            link.register()
        kv.lease.close()
        kv.transport.close()


def test_without_a_master_nobody_fails_a_dead_node_over():
    with LocalCluster(memnodes=3) as c:
        kv = c.client()
        kv.put(b"k", b"v")
        with pytest.raises(NodeTimeout, match="no master"):
            await_membership(kv.executor, 0)
        c.kill(2)
        with pytest.raises(NodeTimeout, match="no master"):
            kv.put(b"k", b"w")
        kv.transport.close()


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_a_transport_connects_while_a_memory_node_is_dead(backend):
    with LocalCluster(memnodes=3, transport=backend, timeout=1.0) as c:
        c.kill(1)
        for known in ((), [1]):                 # found silent, or told by the membership
            with c.transport(dead=known) as t:
                assert t.regions[1].length == 0 and t.regions[0].length > 0
                with pytest.raises(NodeTimeout, match="dead") as e:
                    t.execute([Read(1, 0, 8)])
                with pytest.raises(NodeTimeout) as e:
                    t.execute([Read(0, 0, 8), Read(1, 0, 8), Read(2, 0, 8)])
                head = t.execute([Read(0, 0, 8)])[0]
                assert e.value.results[0] == head and e.value.results[2] == head
                assert isinstance(e.value.results[1], NodeTimeout)
        with pytest.raises(NodeTimeout, match="cannot survive"):
            c.transport(dead=[0, 2])            # with 1 silent: 3 replicas all gone
        with pytest.raises(ValueError):
            c.transport(dead=[7])


def test_bad_requests_get_errors_and_the_master_keeps_serving():
    with small_cluster() as c:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(c.config.master)
        try:
            for raw in (b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb([1, 5, 7, {}])):
                sock.send(raw)
                _, _, error = wire.decode_reply(sock.recv())
                assert error and error[1] == wire.ERR_MALFORMED
            sock.send_multipart([b"two", b"frames"])      # dropped, not fatal
        finally:
            sock.close(0)
        with MasterLink(c.config) as link:
            with pytest.raises(MasterError, match="unknown request"):
                link.call("no-such-method")
            with pytest.raises(MasterError, match="integers"):
                link.call("renew", id="1", token=2)
            with pytest.raises(MasterError):
                link.call("release", token=2)
            with pytest.raises(LeaseError):
                link.call("renew", id=12345, token=1)
            assert link.call("ping") == "pong"


def test_master_over_tcp_with_curve():
    with small_cluster(transport="zmq", endpoint="tcp") as c:
        assert c.config.master.startswith("tcp://") and c.config.master_curve_public
        with c.client() as kv:
            kv.put(b"k", b"v")
            assert kv.get(b"k") == b"v"
            assert str(kv.client_id) in status(c)["clients"]
        # a client with a key the master has not authorized is refused at once, and no lease
        from fusee.errors import NotAuthorized
        from fusee.transports.security import init_keys
        stranger = c.workdir / "stranger"
        init_keys(stranger, 0, ["nobody"])
        os.environ["FUSEE_CLIENT_KEY"] = str(stranger / "nobody.key_secret")
        try:
            with MasterLink(c.config, timeout=0.5) as link, pytest.raises(NotAuthorized):
                link.register()
        finally:
            del os.environ["FUSEE_CLIENT_KEY"]


def test_fusee_master_cli_exits_cleanly_on_sigterm(tmp_path):
    with LocalCluster(memnodes=1) as c:
        config = c.config.with_(master=f"ipc://{tmp_path}/m.sock")
        path = config.save(tmp_path / "cluster.toml")
        ready = tmp_path / "ready"
        proc = subprocess.Popen([sys.executable, "-m", "fusee.cli", "master", "--config",
                                 str(path), "--ready-file", str(ready)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: ready.exists() or proc.poll() is not None, "the master to start")
            keeper = LeaseKeeper(config)
            assert keeper.valid()
            keeper.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
            proc.wait()
        state = json.loads((tmp_path / f"{config.name}.master.json").read_text())
        assert state["cluster"] == config.name
        assert str(keeper.client_id) in state["repairs"] or keeper.client_id in state["free_ids"]
        # a config without a master endpoint is a clear error, not a hang
        out = subprocess.run([sys.executable, "-m", "fusee.cli", "master", "--config",
                              str(c.config_path), "--state", str(tmp_path / "s.json")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "names no master endpoint" in out.stderr
        # a state file of another cluster is refused
        (tmp_path / "other.json").write_text(json.dumps({**state, "cluster": "elsewhere"}))
        out = subprocess.run([sys.executable, "-m", "fusee.cli", "master", "--config",
                              str(path), "--state", str(tmp_path / "other.json")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "elsewhere" in out.stderr
        # so is one of another cluster of the same name (its memory nodes elsewhere)
        (tmp_path / "same-name.json").write_text(json.dumps(
            {**state, "endpoints": ["tcp://10.9.9.9:7000"]}))
        out = subprocess.run([sys.executable, "-m", "fusee.cli", "master", "--config",
                              str(path), "--state", str(tmp_path / "same-name.json")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [
            f"fusee master: error: the master state in {tmp_path / 'same-name.json'} is that "
            f"of another cluster named {config.name!r}: its memory nodes are at "
            f"tcp://10.9.9.9:7000, this config's at {config.node(0).endpoint}: if this is a "
            f"new cluster, move {tmp_path / 'same-name.json'} aside (or pass another --state); "
            f"if not, fix the config"]
        assert state["endpoints"] == [config.node(0).endpoint]


@pytest.mark.soak
@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_recovery_time_by_phase(transport):
    """Client-crash recovery time, by phase (cf. FUSEE Table 1: 177 ms, mostly reconnecting).
    Run: pytest -m soak -s tests/test_master.py -k recovery_time"""
    rows = []
    with small_cluster(transport=transport, client_lease=1.0, timeout=0.5) as c:
        for trial in range(6):
            pid, cid, acked, killed = run_child(c, 20 + 7 * trial)
            (r,) = wait_for(lambda: [r for r in status(c)["repaired"]
                                     if r["id"] == cid and r["finished_at"] > killed],  # noqa: B023 (called in this iteration)
                            "the recovery of the killed client")
            rows.append((killed, r))
            with c.client() as kv:                  # the id is back, and nothing is lost
                assert kv.client_id == cid
                assert all(kv.get(key(pid, i)) == b"value-%d" % i for i in range(acked + 1))
        t0 = time.perf_counter()
        fresh = c.transport()                       # what a restarted client pays first
        connect = time.perf_counter() - t0
        fresh.close()
        t0 = time.perf_counter()
        keeper = LeaseKeeper(c.config)
        register = time.perf_counter() - t0
        keeper.close()
    ms = lambda x: f"{x * 1000:8.1f}"               # noqa: E731
    print(f"\n[{transport}] client lease {c.config.client_lease:g} s + grace "
          f"{c.config.timeout:g} s; cold transport connect {connect * 1e3:.1f} ms, "
          f"register {register * 1e3:.1f} ms")
    print("   detect    queue  connect  readlog   finish  release  recover  RTs verbs entries")
    for killed, r in rows:
        p, rep = r["report"]["phases"], r["report"]
        print(ms(r["detected_at"] - killed), ms(r["started_at"] - r["detected_at"]),
              ms(r["connect_s"]), ms(p.get("read_logs", 0)), ms(p.get("finish_ops", 0)),
              ms(p.get("release", 0)), ms(r["recover_s"]), f"{rep['round_trips']:4d}",
              f"{rep['verbs']:5d}", f"{rep['entries']:7d}")
        assert r["recover_s"] > 0 and rep["round_trips"] > 0
