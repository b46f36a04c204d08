"""The memory node's real NIC: its region registered for one-sided RDMA, one RC QP per client.

``install(node)`` registers the very shared-memory segment the emulated NIC serves as a memory
region with remote read, write and atomic access, and adds two control requests to the node's
control channel: ``rdma_connect`` (a client sends its queue-pair info and its lease, the node
creates a queue pair for it, brings it to RTS and answers with its own info plus the region's
key, address and length) and ``rdma_disconnect``. After that the node's CPU does nothing for
the client's verbs: the NIC executes them. A client that vanishes leaves its queue pair
behind; past ``max_qps`` the oldest is destroyed, which can only cut off a client that long
went away. The master's ``fence`` destroys every queue pair of the fenced client (or of the
deposed masters) before the node acks it (``fusee.emulator.queue_pairs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fusee.emulator import _atomic
from fusee.emulator.queue_pairs import QueuePairs, lease_of
from fusee.emulator.rdma_device import (Device, RdmaUnavailable, access_flags, check_peer,
                                        connect_qp, create_qp, new_psn)
from fusee.verbs import ControlError

log = logging.getLogger(__name__)

#: work requests a responder-only queue pair may need posted: none, but a QP needs a send queue
_RESPONDER_DEPTH = 1


class RdmaNic:
    """Registered region + queue pairs of one memory node."""

    def __init__(self, buf, node_id: int, refuses: Callable[[bytes], bool],
                 device: Device | None = None, max_qps: int = 1024):
        """``refuses``: whether the node refuses a fence key (``MemoryNode.refuses``: a
        fenced client, a deposed master), which gets no queue pair."""
        self.node = node_id
        self.dev = device or Device.open()           # also makes pyverbs importable
        from pyverbs.cq import CQ
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        try:
            self.pd = PD(self.dev.ctx)
            self.cq = CQ(self.dev.ctx, 16, None, None, 0)
            mem = memoryview(buf).cast("B")
            self.length = len(mem)
            self.mr = MR(self.pd, self.length, access_flags(), address=_atomic.address(mem))
            mem.release()
        except Exception as e:
            self.dev.close()
            raise RdmaUnavailable(f"cannot register the region ({e}): check the locked-memory "
                                  f"limit (ulimit -l) against the region size") from None
        self.qps = QueuePairs(node_id, refuses, min(max_qps, self.dev.attr.max_qp))

    def connect(self, args: dict) -> dict:
        """Control request ``rdma_connect``: args = the client's queue-pair info, its
        ``lease`` (``fusee.emulator.queue_pairs.lease_of``), optionally ``replaces`` = a queue
        pair number of ours it used before (destroyed first)."""
        peer = check_peer(args)
        owner = lease_of(args, self.node)
        self.qps.make_room(owner, args.get("replaces"))
        from pyverbs.pyverbs_error import PyverbsError
        psn = new_psn()
        try:
            qp = create_qp(self.dev, self.pd, self.cq, _RESPONDER_DEPTH)
        except PyverbsError as e:
            raise ControlError(f"MN {self.node}: cannot create a queue pair: {e}",
                               self.node) from e
        try:
            connect_qp(self.dev, qp, psn, peer)
        except PyverbsError as e:
            qp.close()
            raise ControlError(f"MN {self.node}: cannot connect to {peer['gid']}: {e}",
                               self.node) from e
        self.qps.add(qp.qp_num, owner, qp)
        return {**self.dev.info(), "qpn": qp.qp_num, "psn": psn, "rkey": self.mr.rkey,
                "addr": self.mr.buf, "length": self.length, "node": self.node}

    def disconnect(self, args: dict) -> bool:
        """Control request ``rdma_disconnect``: args = {"qpn": our queue pair number, "lease":
        the client's}; a client closes only its own."""
        qpn = args.get("qpn")
        if type(qpn) is not int:
            raise ValueError("rdma_disconnect needs an integer qpn")
        return self.qps.drop(qpn, lease_of(args, self.node))

    def close(self) -> None:
        """Tear down in dependency order: queue pairs, region, CQ, PD, device."""
        self.qps.close()
        self.mr.close()
        self.cq.close()
        self.pd.close()
        self.dev.close()


def install(node) -> RdmaNic:
    """Serve ``node``'s region (an fusee.emulator.memnode.MemoryNode) over RDMA as well."""
    nic = RdmaNic(node.segment.mmap, node.id, node.refuses)
    node.register_control("rdma_connect", nic.connect)
    node.register_control("rdma_disconnect", nic.disconnect)
    node.fence_hooks.append(nic.qps.fence)
    close = node.close

    def close_both() -> None:        # deregister before the segment is unmapped
        nic.close()
        close()

    node.close = close_both
    log.info("memnode %d: RDMA on %s port %s gid[%s] %s (%s), rkey %#x", node.id, nic.dev.name,
             nic.dev.port, nic.dev.gid_index, nic.dev.gid, nic.dev.link_layer, nic.mr.rkey)
    return nic
