"""Fencing on the verbs backend, the part that needs no RDMA device: the memory node files each
queue pair under its client's lease (or its master's leadership), and the master's ``fence``
closes them all before the node acks it (``fusee.emulator.queue_pairs``, the ``fence`` control
of ``fusee.emulator.memnode``). The same on a real device, with the master and the clients as
processes: the fencing test of tests/test_rdma.py (in the SoftRoCE VM). On zmq:
tests/test_stall_processes.py, and tests/test_master_fence_processes.py for a deposed master."""

from __future__ import annotations

import pytest
from storekit import config

from fusee.emulator import wire
from fusee.emulator.memnode import MemoryNode
from fusee.emulator.queue_pairs import QueuePairs, lease_of
from fusee.errors import ControlError, Fenced
from fusee.fencing import (fence_key, holder_of, identity, key_of, leadership_of, master_identity,
                           master_key, refused)


class QueuePair:
    """What the table needs of a pyverbs QP: ``close`` (which destroys it on the NIC)."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        assert not self.closed, "a queue pair closed twice"
        self.closed = True


A, B = fence_key(3, 1001), fence_key(4, 1002)


def table(limit: int = 8) -> tuple[QueuePairs, set[bytes]]:
    fenced: set[bytes] = set()
    return QueuePairs(0, fenced.__contains__, limit), fenced


def connect(qps: QueuePairs, qpn: int, owner: bytes | None, replaces=None) -> QueuePair:
    qps.make_room(owner, replaces)
    qp = QueuePair()
    qps.add(qpn, owner, qp)
    return qp


def test_a_fence_closes_every_queue_pair_of_that_lease_and_refuses_it_another():
    qps, fenced = table()
    a1, a2 = connect(qps, 11, A), connect(qps, 12, A)
    b, master = connect(qps, 13, B), connect(qps, 14, None)
    fenced.add(A)
    assert qps.fence() == 2
    assert a1.closed and a2.closed and not b.closed and not master.closed
    assert sorted(qps.qps) == [13, 14]
    with pytest.raises(Fenced, match="open a new client"):
        qps.make_room(A)
    assert qps.fence() == 0                     # twice: nothing more to close
    connect(qps, 15, fence_key(3, 2001))        # the id's next holder has another token


def test_a_client_closes_or_replaces_only_its_own_queue_pairs():
    qps, _ = table()
    a, b = connect(qps, 11, A), connect(qps, 12, B)
    assert not qps.drop(11, B) and not qps.drop(11, None) and not a.closed
    connect(qps, 13, B, replaces=11)            # not B's: stays
    assert not a.closed
    connect(qps, 14, A, replaces=11)
    assert a.closed and not b.closed
    assert qps.drop(12, B) and b.closed and not qps.drop(12, B)
    assert not qps.drop("12", B)                # from the network: anything


def test_past_the_limit_the_oldest_queue_pair_goes():
    qps, _ = table(limit=2)
    first, second = connect(qps, 11, A), connect(qps, 12, B)
    third = connect(qps, 13, None)
    assert first.closed and not second.closed and not third.closed
    qps.close()
    assert second.closed and third.closed and not qps.qps


def test_a_connect_must_say_which_lease_it_holds():
    assert lease_of({"lease": None}, 0) is None
    assert lease_of({"lease": A}, 0) == A
    with pytest.raises(ControlError, match="does not say which lease it holds.*upgrade it"):
        lease_of({"qpn": 5}, 0)                  # a client older than fencing on verbs
    assert lease_of({"lease": master_key(7)}, 0) == master_key(7)
    for bad in (b"fusee-client 3 x.", "fusee-client 3 4.", 5, A + b"0", b"fusee-master -1.",
                master_identity(7)):
        with pytest.raises(ControlError, match="is not a client's lease"):
            lease_of({"lease": bad}, 0)


def test_a_fence_key_names_its_holder():
    assert holder_of(fence_key(7, 2**62 - 1)) == (7, 2**62 - 1)
    assert holder_of(key_of(identity(7, 9))) == (7, 9)
    assert holder_of(identity(7, 9)) is None    # the socket's nonce is not part of it
    assert holder_of(b"fusee-client 07 9.") is None
    assert leadership_of(master_key(2**31 - 1)) == 2**31 - 1
    assert leadership_of(key_of(master_identity(12))) == 12
    for other in (fence_key(7, 9), b"fusee-master 07.", b"fusee-master 1", "fusee-master 1.",
                  master_identity(12)):
        assert leadership_of(other) is None, other


def test_a_watermark_refuses_every_older_master_and_no_client():
    fenced = {A}
    assert refused(A, fenced, 0) and not refused(B, fenced, 0)
    assert not refused(master_key(5), fenced, 0)
    assert refused(master_key(4), fenced, 5) and refused(master_key(0), fenced, 5)
    assert not refused(master_key(5), fenced, 5) and not refused(master_key(6), fenced, 5)
    assert not refused(B, fenced, 5)            # a client is no master


def _control(node: MemoryNode, name: str, **args) -> tuple[list, list | None]:
    reply = node.handle(wire.encode_control(1, name, args))
    _seq, results, error = wire.decode_reply(reply)
    return results, error


def test_the_memory_node_acks_a_fence_only_after_its_hooks_cut_the_client_off():
    node = MemoryNode(config(1), 0)
    try:
        qps = QueuePairs(0, node.refuses, 8)
        node.fence_hooks.append(qps.fence)
        a, b = connect(qps, 11, A), connect(qps, 12, B)

        def rdma_connect(args: dict) -> str:
            qps.make_room(lease_of(args, 0))
            return "connected"

        node.register_control("rdma_connect", rdma_connect)
        assert _control(node, "fence", key=A) == (["fenced"], None)
        assert a.closed and not b.closed
        results, error = _control(node, "rdma_connect", lease=A)
        assert results == [] and error is not None
        refused = wire.error_of(error, 0)
        assert isinstance(refused, Fenced), refused
        assert _control(node, "rdma_connect", lease=B) == (["connected"], None)
        results, error = _control(node, "rdma_connect")
        assert isinstance(wire.error_of(error, 0), ControlError)
        assert "upgrade it" in error[2]
    finally:
        node.close()


def test_a_new_master_has_the_node_close_and_refuse_every_older_leaderships_queue_pairs():
    node = MemoryNode(config(1), 0)
    try:
        qps = QueuePairs(0, node.refuses, 8)
        node.fence_hooks.append(qps.fence)
        old, older, new = (connect(qps, 10 + n, master_key(n)) for n in (4, 2, 5))
        client = connect(qps, 20, A)
        assert _control(node, "fence", masters_below=5) == (["fenced"], None)
        assert old.closed and older.closed and not new.closed and not client.closed
        with pytest.raises(Fenced, match="a newer master leads"):
            qps.make_room(master_key(4))
        connect(qps, 21, master_key(5))
        assert _control(node, "fence", masters_below=3) == (["fenced"], None)
        assert node.masters_below == 5          # a watermark never goes down
    finally:
        node.close()
