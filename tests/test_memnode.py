"""The memory-node process: it serves, survives garbage, and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from fusee.emulator import wire
from fusee.emulator.cluster import ClusterStartError, LocalCluster
from fusee.config import ClusterConfig, MemNodeConfig
from fusee.fencing import identity, master_identity
from fusee.verbs import Read


def _raw(endpoint: str):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _ask(sock, payload: bytes, timeout_ms: int = 5000):
    sock.send(payload)
    assert sock.poll(timeout_ms), "memory node did not answer"
    return wire.decode_reply(sock.recv())


@pytest.mark.parametrize("garbage", [
    b"", b"\x00", b"\xff" * 100, msgpack.packb([0, 1]), msgpack.packb([0, "x", 1, []]),
    msgpack.packb([0, 1, 1, [[9, 0]]]), msgpack.packb([0, 1, 1, [[0, -5, 8]]]),
    msgpack.packb([0, 1, 1, [[0, "a", "b"]]]), msgpack.packb([0, 1, 1, [[1, 0, 7]]]),
    msgpack.packb([0, 1, 1, [[2, 0, 1.5, 0]]]), msgpack.packb([1, 1, "nope", {}]),
    msgpack.packb([1, 1, "info", []]), msgpack.packb({"a": 1}),
])
def test_garbage_gets_an_error_reply_and_node_serves_on(garbage):
    with LocalCluster(memnodes=1, transport="zmq") as c:
        s = _raw(c.config.node(0).endpoint)
        seq, results, error = _ask(s, garbage)
        assert error and error[1] in (wire.ERR_MALFORMED, wire.ERR_CONTROL, wire.ERR_ACCESS,
                                      wire.ERR_WRONG_KEY)
        s.send_multipart([b"a", b"b", b"c"])           # wrong frame count: dropped
        t = c.transport()
        assert t.execute([Read(0, 0, 8)])[0][:5] == b"FUSEE"
        t.close()
        s.close(0)


def test_sigterm_stops_cleanly_and_removes_segment():
    with LocalCluster(memnodes=2, transport="zmq") as c:
        names = dict(c.shm_names)
        for n in names.values():
            assert os.path.exists(f"/dev/shm/{n.lstrip('/')}")
            assert os.stat(f"/dev/shm/{n.lstrip('/')}").st_mode & 0o777 == 0o600
        p = c.procs[0]
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert not os.path.exists(f"/dev/shm/{names[0].lstrip('/')}")
    assert not any(os.path.exists(f"/dev/shm/{n.lstrip('/')}") for n in names.values())


def test_cluster_cleans_up_after_failure_inside_with():
    with pytest.raises(RuntimeError, match="boom"):
        with LocalCluster(memnodes=2, transport="zmq") as c:
            procs, workdir, names = list(c.procs.values()), c.workdir, dict(c.shm_names)
            raise RuntimeError("boom")
    assert all(p.poll() is not None for p in procs)
    assert not workdir.exists()
    assert not any(os.path.exists(f"/dev/shm/{n.lstrip('/')}") for n in names.values())


def test_killed_node_leaves_no_segment():
    with LocalCluster(memnodes=1, transport="zmq") as c:
        name = c.shm_names[0]
        c.kill(0)
        assert os.path.exists(f"/dev/shm/{name.lstrip('/')}")
    assert not os.path.exists(f"/dev/shm/{name.lstrip('/')}")


def test_memnode_exits_when_its_parent_dies(tmp_path):
    cfg = ClusterConfig(memnodes=(MemNodeConfig(0, f"ipc://{tmp_path}/mn0.sock"),),
                        name=f"orphan{os.getpid()}")
    path = cfg.save(tmp_path / "c.toml")
    ready = tmp_path / "ready"
    # A parent that starts the memory node in the background and dies at once.
    code = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', "
            f"'fusee.emulator.memnode', '--config', {str(path)!r}, '--id', '0', '--ready-file', "
            f"{str(ready)!r}, '--parent-pid', str(__import__('os').getpid())], "
            f"stdout=subprocess.DEVNULL); print(p.pid)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break                           # exited; nobody has reaped it yet
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("orphaned memory node kept running")


def test_start_failure_reports_the_nodes_error(tmp_path):
    c = LocalCluster(memnodes=1, transport="zmq", workdir=str(tmp_path))
    c.config = c.config.with_(memnodes=(MemNodeConfig(0, "bogus://nowhere"),))
    with pytest.raises(ClusterStartError, match="exited"):
        c.start()


@pytest.fixture
def node():
    from fusee.emulator.testkit import fuzz
    n = fuzz.make_node(f"serve{os.getpid()}")
    yield n
    n.close()


def test_a_batch_of_one_sided_verbs_is_served_without_a_python_call(node):
    """The MN's common request, a batch of READ/WRITE/CAS/FAA with the right key, is decoded,
    run and answered in one C call (fusee.emulator._atomic.serve): no Python call per verb
    or per message, and the reply is the one the verb-by-verb path gives."""
    rkey = node.region.rkey
    word = int.from_bytes(b"abcdefgh", "little")
    ops = [[wire.OP_WRITE, 64, b"abcdefgh" * 16], [wire.OP_CAS, 64, word, 5],
           [wire.OP_CAS, 512, 0, 7], [wire.OP_FAA, 512, 3], [wire.OP_READ, 64, 16],
           [wire.OP_READ, 512, 8], [wire.OP_READ, 0, 0]]
    request = msgpack.packb((wire.VERBS, 77, rkey, ops))
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(frame.f_code.co_name)
                   if event == "call" else None)
    try:
        reply = node.handle(request)
    finally:
        sys.setprofile(None)
    assert calls == ["handle"], calls
    seq, results, error = wire.decode_reply(reply)
    assert seq == 77 and error is None
    assert results == [None, word, 0, 7, (5).to_bytes(8, "little") + b"abcdefgh",
                       (10).to_bytes(8, "little"), b""]
    assert node.tally[1] == len(ops)


def test_the_serve_loop_makes_no_python_call_per_request_of_verbs(node, tmp_path):
    """The serve loop answers a request of one-sided verbs with the C fast path itself (no
    call to ``handle``) and asks ``stop()`` once per STOP_CHECK_EVERY requests, not per
    request: each was a Python call, a few percent of the node's instructions per message.
    The answers are the node's all the same, and ``stop()`` still ends the loop.

    It also asks ``stop()`` after each 200 ms wait that no request ended (zmq.Again), which a
    loaded host makes between this test's requests: those waits are counted (each Again the
    server thread makes, seen by the profiler) and allowed for, one ``stop()`` each, on top
    of the one before the first request and one per STOP_CHECK_EVERY requests. (A bound
    of a few extra flaked under load; per request, ``stop()`` would be asked hundreds of
    times more.)"""
    import threading
    from fusee.emulator.memnode import STOP_CHECK_EVERY, serve
    endpoint = f"ipc://{tmp_path}/mn.sock"
    stops, calls, done = [], [], threading.Event()
    waits: list[zmq.Again] = []             # (held: each its own id)

    def stop():
        stops.append(1)
        return done.is_set()

    def profile(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code.co_name)
            if isinstance(frame.f_locals.get("self"), zmq.Again):
                waits.append(frame.f_locals["self"])

    def run():
        threading.setprofile(profile)       # (this thread's own, set before it runs serve)
        sys.setprofile(profile)
        serve(node, endpoint, stop)

    server = threading.Thread(target=run)
    server.start()
    sock = _raw(endpoint)
    try:
        requests = 4 * STOP_CHECK_EVERY
        for seq in range(requests):
            seq_, results, error = _ask(sock, msgpack.packb(
                (wire.VERBS, seq, node.region.rkey, [[wire.OP_READ, 64, 8]])))
            assert (seq_, results, error) == (seq, [bytes(8)], None)
    finally:
        done.set()
        sock.close(0)
        server.join(10)
    assert not server.is_alive()
    assert "handle" not in calls, calls[:20]
    # (the loop may end on the stop() after the last request, with no wait at all: the
    # test's done is set before the server thread gets back to its check)
    idle = len({id(again) for again in waits})
    assert len(stops) <= 1 + requests // STOP_CHECK_EVERY + idle, (len(stops), idle)


def test_a_failing_verb_stops_the_batch_after_running_each_earlier_verb_once(node):
    """A batch the C path does not take whole (here its last READ is out of bounds) runs
    verb by verb in Python: nothing may have run before, or a FAA would count twice."""
    rkey, size = node.region.rkey, node.region.length
    ops = [[wire.OP_FAA, 256, 1], [wire.OP_WRITE, 264, b"x" * 8], [wire.OP_READ, size - 4, 8]]
    seq, results, error = wire.decode_reply(node.handle(msgpack.packb((wire.VERBS, 3, rkey, ops))))
    assert results == [0, None] and error[0] == 2 and error[1] == wire.ERR_ACCESS
    seq, results, error = wire.decode_reply(node.handle(msgpack.packb(
        (wire.VERBS, 4, rkey, [[wire.OP_READ, 256, 16]]))))
    assert error is None and results == [(1).to_bytes(8, "little") + b"x" * 8]
    wrong_key = msgpack.packb((wire.VERBS, 5, rkey ^ 1, [[wire.OP_FAA, 256, 1]]))
    seq, results, error = wire.decode_reply(node.handle(wrong_key))
    assert results == [] and error[1] == wire.ERR_WRONG_KEY


def test_a_block_request_with_another_key_is_refused(node):
    """ALLOC and FREE travel in a verbs message with the region's key like the verbs, and are
    refused without it: one sent to a dead MN's predecessor at the endpoint (or by a client
    stalled since) must not run on the MN rebuilt there, which no fence reached (the process
    version: tests/test_stall_processes.py)."""
    rkey = node.region.rkey
    seq, (addr,), error = wire.decode_reply(node.handle(msgpack.packb(
        (wire.VERBS, 1, rkey, [[wire.OP_ALLOC, 3]]))))
    assert error is None and node.blocks.used() == 1
    for op in ([wire.OP_FREE, 3, addr], [wire.OP_ALLOC, 3]):
        seq, results, error = wire.decode_reply(node.handle(msgpack.packb(
            (wire.VERBS, 2, rkey ^ 1, [op]))))
        assert results == [] and error[1] == wire.ERR_WRONG_KEY
        assert node.blocks.used() == 1


def _as(endpoint: str, identity: bytes | None):
    """A raw socket to the MN with that routing identity (a master's or a client's)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    s.connect(endpoint)
    return s


def test_a_master_watermark_refuses_every_older_leadership_and_nothing_else():
    """``fence`` with ``masters_below`` (docs/design.md#fencing): every request of a master of
    an older leadership is refused from then on, whatever it asks; the new one's, a client's
    and an anonymous one's are served; a lower watermark later changes nothing."""
    with LocalCluster(memnodes=1, transport="zmq") as c:
        endpoint = c.config.node(0).endpoint
        old, new = _as(endpoint, master_identity(6)), _as(endpoint, master_identity(9))
        client, anonymous = _as(endpoint, identity(3, 77)), _as(endpoint, None)
        ping = wire.encode_control(1, "ping", {})
        try:
            assert _ask(old, ping)[2] is None
            assert _ask(new, wire.encode_control(2, "fence", {"masters_below": 9})) == \
                (2, ["fenced"], None)
            for payload in (ping, wire.encode_verbs(3, 0, [Read(0, 0, 8)])):
                seq, results, error = _ask(old, payload)
                assert (results, error[1]) == ([], wire.ERR_FENCED), error
                assert "a newer master leads" in error[2]
            for s in (new, client, anonymous):
                assert _ask(s, ping)[2] is None
            assert _ask(new, wire.encode_control(4, "fence", {"masters_below": 2}))[2] is None
            assert _ask(old, ping)[2][1] == wire.ERR_FENCED
            assert _ask(_as(endpoint, master_identity(8)), ping)[2][1] == wire.ERR_FENCED
        finally:
            for s in (old, new, client, anonymous):
                s.close(0)


@pytest.mark.parametrize("args", [
    {}, {"key": b"fusee-client 1 2.", "masters_below": 3}, {"key": 5}, {"masters_below": -1},
    {"masters_below": "3"}, {"masters_below": True}, {"masters_below": 1.5},
    {"masters_below": 2**63}, {"masters_below": None},
])
def test_a_malformed_fence_gets_one_clear_refusal_and_changes_nothing(args):
    with LocalCluster(memnodes=1, transport="zmq") as c:
        s = _as(c.config.node(0).endpoint, master_identity(0))
        try:
            seq, results, error = _ask(s, wire.encode_control(7, "fence", args))
            assert (seq, results, error[1]) == (7, [], wire.ERR_CONTROL), error
            assert "\n" not in error[2] and ("masters_below" in error[2] or "bytes" in
                                             error[2]), error[2]
            assert _ask(s, wire.encode_control(8, "ping", {}))[2] is None     # not fenced
        finally:
            s.close(0)
