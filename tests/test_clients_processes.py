"""Clients and memory nodes as processes: a client used after fork(), a second memory node
started with a live one's id, two processes opening one client id at once, and many
short-lived clients (some concurrent, some killed) with and without a master, followed by
the leak audit. The in-process tests of client ids: tests/test_clients.py."""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import subprocess
import sys
import time

import pytest

from fusee.emulator.cluster import LocalCluster
from fusee.audit import audit
from fusee.client import Client
from fusee.driver import run
from fusee.errors import ForkedClient, NeedsRecovery
from processes import run_processes, wait_for
from test_clients import owned_blocks
from test_master_processes import status

SPAWN = multiprocessing.get_context("spawn")


def _wait_child(pid: int, timeout: float = 60.0) -> int:
    """The exit code of forked child ``pid``; SIGKILLed (and a failure) if it hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(code)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung")


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_a_client_used_after_fork_is_refused_in_the_child(backend):
    """Before: on shm the child wrote through the parent's client (its id, log and blocks:
    lost acknowledged puts, CorruptObject); on zmq it hung in ``put`` on the parent's
    sockets; the batch API (put_many, get_many, pipeline) too. Now the child gets ForkedClient
    from each, its ``close()`` leaves the parent's client be,
    and a client it opens itself works; the parent's carries on throughout."""
    with LocalCluster(memnodes=3, transport=backend, replication=2) as c:
        with c.client() as kv:
            kv.put(b"before", b"fork")
            pid = os.fork()
            if pid == 0:                                    # the child
                code = 1
                try:
                    attempts = [lambda: kv.put(b"child", b"through the parent's client"),
                                lambda: kv.put_many({b"child": b"through a batch"}),
                                lambda: kv.get_many([b"before"]),
                                lambda: kv.pipeline().put(b"child", b"piped").execute()]
                    refused = 0
                    for attempt in attempts:
                        try:
                            attempt()
                        except ForkedClient:
                            refused += 1
                    code = 3
                    if refused == len(attempts):
                        kv.close()
                        with Client.connect(c.config_path) as own:
                            own.put(b"child", b"own client")
                        code = 0
                finally:
                    os._exit(code)
            for i in range(100):
                kv.put(b"parent%d" % (i % 10), b"%d" % i)
            assert _wait_child(pid) == 0
            assert kv.get(b"child") == b"own client"
            assert [kv.get(b"parent%d" % k) for k in range(10)] == [b"%d" % (90 + k)
                                                                   for k in range(10)]
            kv.put(b"after", b"fork")
        with c.client() as kv:
            assert kv.get(b"before") == kv.get(b"after") == b"fork"
            assert run(audit(c.config, [kv.core]), c.transport()).ok


def _memnode(c: LocalCluster, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fusee.emulator.memnode", "--config",
                             str(c.config_path), "--id", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("endpoint", ["ipc", "tcp"])
def test_a_second_memnode_with_a_live_ones_id_is_refused(endpoint):
    """Before: over ipc:// the newcomer unlinked the live MN's socket file and served an
    empty region in its place (keys stored with r=3 "not found", then NodeTimeout for MN 0
    once it stopped); over tcp:// it died with a traceback."""
    with LocalCluster(memnodes=3, transport="zmq", endpoint=endpoint, replication=3) as c:
        with c.client() as kv:
            kv.put(b"k", b"v")
        dup = _memnode(c)
        try:
            _, err = dup.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            dup.kill()
            dup.communicate()
            pytest.fail("the second memory node 0 kept running")
        assert dup.returncode == 2
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "another" in err and "process" in err
        with c.client() as kv:
            assert kv.get(b"k") == b"v"
            kv.put(b"k2", b"w")
            assert kv.get(b"k2") == b"w"


def test_the_endpoint_of_a_crashed_memnode_is_reclaimed():
    """What a killed MN leaves behind (its ipc socket file, its lock file) does not keep a
    new one off the endpoint: the lock died with the process."""
    with LocalCluster(memnodes=3, transport="zmq") as c:
        c.kill(0)
        ready = c.workdir / "again.ready"
        again = _memnode(c, "--ready-file", str(ready))
        try:
            wait_for(lambda: ready.exists() or again.poll() is not None, "the new MN 0")
            assert again.poll() is None, again.communicate()[1]
        finally:
            again.terminate()
            again.communicate(timeout=30)


def _open_id(config_path, cid: int, go, out) -> None:
    go.wait(60)
    try:
        kv = Client.connect(config_path, client_id=cid)
    except NeedsRecovery:
        kv = None
    out.put(kv is not None)
    go.wait(60)                     # the winner holds the id until every claimant tried
    if kv is not None:
        kv.close()


def processes_opening_one_id(backend: str, rounds: int) -> None:
    """Three processes open one explicit id at once, ``rounds`` times: one wins each time."""
    with LocalCluster(memnodes=3, transport=backend) as c:
        for cid in range(rounds):
            wins = run_processes(_open_id, [(c.config_path, cid, SPAWN.Barrier(3))] * 3)
            assert wins.count(True) == 1, (cid, wins)


def test_of_processes_opening_one_id_at_once_one_wins():
    """Before: two processes opening the same explicit id at once could both succeed."""
    processes_opening_one_id("shm", 1)


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_of_processes_opening_one_id_at_once_one_wins_every_time(backend):
    processes_opening_one_id(backend, 25)


def test_a_master_started_on_a_used_cluster_takes_in_its_ids():
    """Ids used before there was a master: one closed (its blocks hold a key), one left in
    use by a client that never closed. Before: the master's counter started above both, so
    the closed id and its blocks were never used again and the other never recovered (its
    key stuck, and NeedsRecovery for whoever asked for it). Now the closed one is recycled,
    blocks and all, and the other is recovered first."""
    with LocalCluster(memnodes=3, transport="shm", replication=2, client_lease=3.0) as c:
        with c.client() as kv:
            kv.put(b"a", b"closed")
            closed = kv.client_id
        crashed = c.client(client_id=5)
        crashed.put(b"b", b"crashed")
        crashed.transport.close()           # never closed: id 5 stays in use
        c.start_master()
        with c.client() as kv:
            assert kv.client_id == closed and kv.core.alloc.stats["blocks"] == 1
            assert kv.get(b"a") == b"closed"
        wait_for(lambda: 5 in status(c)["free_ids"], "the recovery of id 5")
        with c.client(client_id=5) as kv:
            assert kv.get(b"b") == b"crashed"
            kv.put(b"b", b"recovered")
        with c.client() as kv:
            assert c.audit([kv.core]).ok


# -- many short-lived clients -----------------------------------------------------------------
def _cycles(config_path, seed: int, cycles: int, out) -> None:
    """Open and close ``cycles`` clients, each doing 0 to 3 puts of its own keys (small and
    large values); report the ids and the last acknowledged value of each key."""
    rng = random.Random(seed)
    ids, acked = [], {}
    for i in range(cycles):
        with Client.connect(config_path) as kv:
            ids.append(kv.client_id)
            for _ in range(rng.choice((0, 1, 1, 3))):
                key, value = b"w%d-%d" % (seed, rng.randrange(4)), b"%d." % i * rng.choice(
                    (1, 50, 1000))
                kv.put(key, value)
                acked[key] = value
    out.put((ids, acked))


def _victim(config_path, ready) -> None:
    """A client killed (SIGKILL) while it writes: its id is left for recovery."""
    kv = Client.connect(config_path)
    ready.put(kv.client_id)
    i = 0
    while True:
        kv.put(b"victim%d" % kv.client_id, b"%d" % i)
        i += 1


def collect(out, procs, timeout: float = 900.0) -> list:
    """One result from each of ``procs`` (failing at once when one of them died first)."""
    results: list = []
    deadline = time.monotonic() + timeout
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a process exited with {dead[0]} before it reported"
            assert time.monotonic() < deadline, "the processes did not report in time"
    return results


def short_lived_clients(backend: str, master: bool, workers: int, cycles: int,
                        victims: int) -> None:
    """``workers`` processes open and close ``cycles`` clients each while ``victims`` are
    killed mid-write; their ids are recovered (by the master, or by a client with
    ``recover=True``). Then: every acknowledged put is there, the audit is clean, closed ids
    were reused (so few ids for all those clients) and so were their blocks."""
    # a lease of a few seconds: the victims are recovered soon, and the other clients
    # renew theirs in time even on a loaded machine
    with LocalCluster(memnodes=3, transport=backend, replication=2, master=master,
                      client_lease=3.0 if master else None, timeout=2.0) as c:
        out, ready = SPAWN.Queue(), SPAWN.Queue()
        procs = [SPAWN.Process(target=_cycles, args=(c.config_path, s, cycles, out))
                 for s in range(workers)]
        killed = [SPAWN.Process(target=_victim, args=(c.config_path, ready))
                  for _ in range(victims)]
        try:
            for p in procs + killed:
                p.start()
            victim_ids = collect(ready, killed)
            for p in killed:
                p.kill()
                p.join(30)
            results = collect(out, procs)
            for p in procs:
                p.join(30)
                assert p.exitcode == 0
        finally:
            for p in procs + killed:
                if p.is_alive():
                    p.kill()
        if master:
            wait_for(lambda: (s := status(c))["repairs"] == {} and
                     set(victim_ids) <= set(s["free_ids"]), "the victims' recovery")
        else:
            for cid in victim_ids:
                Client.connect(c.config_path, client_id=cid, recover=True).close()
        used = {cid for ids, _ in results for cid in ids} | set(victim_ids)
        # without a master a closed id is drawn again at once; a master recycles it once its
        # repair queue has gone through it, so a client reconnecting at once may get another
        concurrent = workers + victims
        assert len(used) <= (4 * concurrent if master else concurrent), sorted(used)
        with c.client() as kv:
            for _, acked in results:
                assert {k: kv.get(k) for k in acked} == acked
            assert kv.client_id in used
            report = c.audit([kv.core])
        assert report.ok, report.explain()
        # every id holds one block group (on r = 2 of the 3 MNs): nothing else is owned
        blocks = sum(owned_blocks(c.config, c.transport()))
        assert blocks <= 2 * len(used)
        print(f"{workers} x {cycles} short-lived clients and {victims} killed ({backend}, "
              f"{'a' if master else 'no'} master): {len(used)} ids, {blocks} blocks owned")


@pytest.mark.parametrize("backend,master", [("shm", False), ("zmq", True)])
def test_many_short_lived_clients(backend, master):
    short_lived_clients(backend, master, workers=2, cycles=10, victims=1)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_hundreds_of_short_lived_clients(backend, master):
    short_lived_clients(backend, master, workers=4, cycles=100, victims=3)
