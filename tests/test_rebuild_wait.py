"""A rebuild that takes longer than a client's ``membership_wait``, with real processes.

A failover is a few round trips; a rebuild copies what its MN holds, which for a big store
takes longer than ``membership_wait`` (what a client waits for the next epoch before it
calls an MN gone, NodeTimeout). The master's renewals say that a rebuild runs
(``Grant.rebuild``), and a paused client keeps waiting while they do.

The long rebuild comes from a slowed master: the real master process, whose rebuild's last
phase (the clients paused, ``Rebuild.finish``) sleeps before each of its round trips (as on a
slow network), so that it lasts ``membership_wait``
(twice: an operation that meets the pause in a batch asks for the next epoch once more)
plus a margin. With it, a client paused for the rebuild:
- gets its put through once the rebuild publishes its epoch (before: NodeTimeout);
- goes on at once when the rebuild fails instead (the rejoining MN killed mid-copy): the
  pause ends with the next epoch, which carries the rounds the pause closed (MN 0 still
  dead), and the batch held back goes out (before: it waited for an epoch that never came,
  then NodeTimeout; then, it resumed the old epoch, whose rounds the pause had closed);
- gets its put through when the master is killed in the pause: the next one finds in the
  saved state that the pause may have closed rounds, and closes them again (a failover of
  no MN) and publishes the next epoch before any client resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from storekit import SMALL
from processes import wait_for
from test_failover_processes import LEASES

from fusee import cli_status
from fusee.emulator.cluster import ClusterStartError, LocalCluster
from fusee.config import LayoutConfig
from fusee.master.logic import Master
from fusee.master.link import membership_wait

#: the master process, its rebuild's pause slowed to last at least argv[1] seconds
SLOWED_MASTER = """
import sys, time
import fusee.master.command as command
import fusee.master.worker as worker

seconds, real = float(sys.argv[1]), worker.Rebuild.finish

def slowed(*args, **kwargs):
    gen, send, arg, end = real(*args, **kwargs), None, None, time.monotonic() + seconds
    send = gen.send
    while True:
        try:
            batch = send(arg)
        except StopIteration as stop:
            time.sleep(max(0.0, end - time.monotonic()))
            return stop.value
        time.sleep(max(0.0, min(0.5, end - time.monotonic())))
        try:
            arg, send = (yield batch), gen.send
        except BaseException as e:
            arg, send = e, gen.throw

worker.Rebuild.finish = slowed
sys.exit(command.main(sys.argv[2:]))
"""


def _slowed_master(c: LocalCluster, seconds: float) -> None:
    """Replace the cluster's master by the slowed one (same endpoint and state file)."""
    c.stop_master()
    ready = c.workdir / "master.ready"
    ready.unlink(missing_ok=True)
    with open(c.workdir / "master.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOWED_MASTER, str(seconds), "--config",
             str(c.config_path), "--state", str(c.workdir / "master.json"),
             "--endpoint", c.config.master, "--ready-file", str(ready),
             "--parent-pid", str(os.getpid())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    c.master_procs["master"] = proc         # the cluster stops it
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ClusterStartError(f"the slowed master did not start:\n{c.master_log()}")
        time.sleep(0.01)
    assert json.loads(ready.read_text())["endpoint"] == c.config.master


def test_renewals_say_which_rebuild_runs_and_how_far():
    m = Master((0, 1, 2), client_lease=2.0, mn_lease=2.0, grace=1.0, now=0.0)
    m.seed_ids(0)
    g = m.grant(m.draw_id(), 7, 0.0)
    m.mn_seen(1, 1.5)
    m.mn_seen(2, 1.5)
    m.tick(2.1)                                  # MN 0 missed its lease: failed over
    m.renew(g.id, 7, 2.2, paused=1)
    assert m.next_failover(2.3) == (0,)
    m.failover_done((0,), m.membership.successor((0,), {}))
    assert m.renew(g.id, 7, 3.0).rebuild is None
    assert m.rejoin(0, 3.0)
    assert m.renew(g.id, 7, 3.1, paused=2).rebuild is None     # joining: not running yet
    assert m.next_rebuild(3.2) == 0
    m.rejoins.progress = (5, 10)
    assert m.renew(g.id, 7, 3.3, paused=2).rebuild == (0, 5, 10)
    m.rebuild_failed(0, 3.4, "NodeTimeout: MN 0")
    assert m.renew(g.id, 7, 3.5).rebuild is None and m.pause == 0


def _put_in_background(kv, key: bytes, value: bytes) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def put():
        try:
            kv.put(key, value)
            out["ok"] = True
        except Exception as e:          # noqa: BLE001 - the test reports it
            out["error"] = e
    t = threading.Thread(target=put, daemon=True)
    t.start()
    return t, out


def _state(c: LocalCluster, node: int) -> str:
    return c.master_status()["memnodes"][str(node)]["state"]


def _paused(c: LocalCluster, node: int) -> bool:
    """The rebuild of ``node`` is in its last phase, every client paused for it."""
    status = c.master_status()
    return (status["memnodes"][str(node)].get("phase") == "pausing"
            and status["waiting_for"] == [])


@pytest.mark.parametrize("backend", ["shm"])
def test_a_client_waits_out_a_rebuild_longer_than_its_membership_wait(backend):
    with LocalCluster(memnodes=3, transport=backend, replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        wait = membership_wait(c.config)
        # an operation meets the pause in a batch, then asks for the next epoch: two waits
        _slowed_master(c, 2 * wait + 4.0)
        with c.client() as kv:
            kv.put(b"before", b"1")
            c.kill(0)
            wait_for(lambda: c.master_status()["dead"] == [0], "MN 0's failover")
            kv.put(b"after the failover", b"2")
            c.rejoin(0)
            wait_for(lambda: _paused(c, 0), "MN 0's rebuild to pause the clients")
            # the online copy began only once the client had heard of the rebuild (its
            # allocator then spares the groups the copy takes: ``Allocator.follow``)
            assert kv.lease.rebuilding == 0
            shown = cli_status.render(cli_status.gather(c.config))      # ``fusee status``
            row = next(ln for ln in shown.splitlines() if ln.startswith("0 "))
            assert "rebuilding" in row and "phase=pausing" in row and "MiB (" in row, shown
            thread, out = _put_in_background(kv, b"during the rebuild", b"3")
            thread.join(4 * wait)
            assert not thread.is_alive(), "the put is still waiting"
            assert out == {"ok": True}, out
            status = c.master_status()
            assert status["epoch"] == 2 and status["dead"] == []
            (record,) = status["rebuilds"]
            assert record["rebuild_s"] > 2 * wait      # the case at stake
            assert kv.get(b"during the rebuild") == b"3"
            assert kv.get(b"after the failover") == b"2"


@contextlib.contextmanager
def _a_put_held_by_a_slow_pause():
    """A cluster whose slowed master has paused the client for MN 0's rebuild, half a second
    into the pause, a put held back by it: yields (cluster, client, membership_wait, the
    put's thread, its outcome)."""
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        wait = membership_wait(c.config)
        _slowed_master(c, wait + 5.0)
        with c.client() as kv:
            kv.put(b"before", b"1")
            c.kill(0)
            wait_for(lambda: c.master_status()["dead"] == [0], "MN 0's failover")
            c.rejoin(0)
            wait_for(lambda: _paused(c, 0), "MN 0's rebuild to pause the clients")
            thread, out = _put_in_background(kv, b"during the rebuild", b"3")
            time.sleep(0.5)
            yield c, kv, wait, thread, out


def test_a_failed_rebuild_lets_a_paused_client_go_on_at_once():
    with _a_put_held_by_a_slow_pause() as (c, kv, wait, thread, out):
        c.kill(0)           # its copy fails: the rebuild fails, the pause ends
        wait_for(lambda: "rebuild_error" in c.master_status()["memnodes"]["0"],
              "the rebuild to fail", timeout=3 * wait)
        # within a few renewals of the pause's end, not after membership_wait
        thread.join(wait / 2)
        assert not thread.is_alive(), "the put still waits for an epoch that never comes"
        assert out == {"ok": True}, out
        status = c.master_status()
        assert (status["epoch"], status["dead"]) == (2, [0])   # the rounds its pause closed
        assert status["closing"] is False
        assert kv.get(b"during the rebuild") == b"3" and kv.get(b"before") == b"1"


def test_a_master_killed_in_a_rebuilds_pause_is_followed_by_a_new_epoch():
    with _a_put_held_by_a_slow_pause() as (c, kv, wait, thread, out):
        c.stop_master(kill=True)            # in the pause, which has begun its closing
        c.start_master()
        thread.join(3 * wait)
        assert not thread.is_alive(), "the put is still waiting"
        assert out == {"ok": True}, out
        assert "failing over memory node none (closing the rounds a rebuild left) " \
               "(epoch 1 -> 2)" in c.master_log(), c.master_log()
        wait_for(lambda: c.master_status()["dead"] == [], "MN 0's rebuild", timeout=3 * wait)
        assert c.master_status()["epoch"] == 3
        assert kv.get(b"during the rebuild") == b"3" and kv.get(b"before") == b"1"
