"""A memory node's RC queue pairs, each filed under the lease of the client it serves, so that
the master's ``fence`` cuts that client off at the NIC (``fusee.fencing``).

With the verbs backend the MN's CPU never sees a client's READ, WRITE or atomic: the NIC
executes it on the client's queue pair. So refusing a fenced client's requests, as the zmq
loop does, is not possible; closing its queue pairs is. A client says which lease it holds
when it connects (``lease``: its fence key, or None for one that holds none, such as the
master's own worker or a cluster without a master); on the master's ``fence`` the MN closes
every queue pair filed under that key before it acks, and refuses that key a new one. The
client's verbs then fail at its own NIC (no responder: its retries run out), never land.

No pyverbs here: a queue pair is anything with ``close()``, so this bookkeeping is tested on
a machine without RDMA (``fusee.emulator.rdma_nic`` hands it real ones).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Protocol

from fusee.errors import Fenced
from fusee.fencing import holder_of
from fusee.verbs import ControlError

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self) -> None: ...


def lease_of(args: dict, node: int) -> bytes | None:
    """The fence key a connect or disconnect request files its queue pair under (None: a
    client that holds no lease). A request without one comes from a client older than
    fencing on verbs, whose queue pairs the master could not close: refused."""
    if "lease" not in args:
        raise ControlError(f"MN {node}: this client does not say which lease it holds (it is "
                           "older than this memory node): upgrade it", node)
    key = args["lease"]
    if key is not None and holder_of(key) is None:
        raise ControlError(f"MN {node}: {key!r} is not a client's lease (fence key)", node)
    assert key is None or type(key) is bytes, "holder_of accepts bytes only"
    return key


class QueuePairs:
    """The queue pairs of one MN by number, with their owners' fence keys, oldest first.

    ``fenced`` is the MN's own set (``MemoryNode.fenced``): a key in it gets no queue pair."""

    def __init__(self, node: int, fenced: set[bytes], limit: int):
        assert limit > 0, "a memory node serves at least one queue pair"
        self.node, self.fenced, self.limit = node, fenced, limit
        self.qps: OrderedDict[int, tuple[bytes | None, Closable]] = OrderedDict()

    def make_room(self, owner: bytes | None, replaces: object = None) -> None:
        """Before a queue pair is created for ``owner``: Fenced if the master fenced it;
        else the one it says it used before (``replaces``, if it is its own) is closed, and
        the oldest while the MN is at its limit (which can only cut off a client long gone)."""
        if owner is not None and owner in self.fenced:
            raise Fenced(f"MN {self.node}: the master ended this client's lease and recovers "
                         "its id: open a new client", self.node)
        if type(replaces) is int and self.owner(replaces) == owner:
            self.drop(replaces, owner)
        while len(self.qps) >= self.limit:
            qpn = next(iter(self.qps))
            self.drop(qpn, self.qps[qpn][0])

    def add(self, qpn: int, owner: bytes | None, qp: Closable) -> None:
        assert qpn not in self.qps, f"queue pair {qpn} is filed already"
        assert owner is None or owner not in self.fenced, "make_room refuses a fenced owner"
        self.qps[qpn] = (owner, qp)

    def owner(self, qpn: int) -> bytes | None:
        entry = self.qps.get(qpn)
        return None if entry is None else entry[0]

    def drop(self, qpn: object, owner: bytes | None) -> bool:
        """Close queue pair ``qpn`` if ``owner`` holds it (a client closes only its own);
        True if it did."""
        if type(qpn) is not int:
            return False
        entry = self.qps.get(qpn)
        if entry is None or entry[0] != owner:
            return False
        del self.qps[qpn]
        entry[1].close()
        return True

    def fence(self, key: bytes) -> int:
        """Close every queue pair of ``key`` (the caller has added it to ``fenced``, so it
        gets none again); -> how many. When this returns, the NIC executes none of its
        requests any more."""
        assert key in self.fenced, "fence the key before closing its queue pairs"
        mine = [qpn for qpn, (owner, _qp) in self.qps.items() if owner == key]
        for qpn in mine:
            self.drop(qpn, key)
        if mine:
            log.info("memnode %d: closed the %d queue pairs of fenced %r", self.node,
                     len(mine), key)
        return len(mine)

    def close(self) -> None:
        for qpn, (owner, _qp) in list(self.qps.items()):
            self.drop(qpn, owner)
