"""A memory node's RC queue pairs, each filed under the lease of the client it serves (or the
leadership of the master), so that the master's ``fence`` cuts that client (or a deposed
master) off at the NIC (``fusee.fencing``).

With the verbs backend the MN's CPU never sees a client's READ, WRITE or atomic: the NIC
executes it on the client's queue pair. So refusing a fenced client's requests, as the zmq
loop does, is not possible; closing its queue pairs is. A client says which lease it holds
when it connects (``lease``: its fence key, an elected master's key, or None for one that
holds none, such as a single master's worker or a cluster without a master); on the master's
``fence`` the MN closes every queue pair filed under a key it now refuses before it acks, and
refuses that key a new one. The client's verbs then fail at its own NIC (no responder: its
retries run out), never land.

No pyverbs here: a queue pair is anything with ``close()``, so this bookkeeping is tested on
a machine without RDMA (``fusee.emulator.rdma_nic`` hands it real ones).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from fusee.errors import Fenced
from fusee.fencing import holder_of, leadership_of, refusal
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
    if key is not None and holder_of(key) is None and leadership_of(key) is None:
        raise ControlError(f"MN {node}: {key!r} is not a client's lease (fence key)", node)
    assert key is None or type(key) is bytes, "holder_of and leadership_of accept bytes only"
    return key


class QueuePairs:
    """The queue pairs of one MN by number, with their owners' fence keys, oldest first.

    ``refuses``: the MN's own judgement (``MemoryNode.refuses``): a key it refuses gets no
    queue pair."""

    def __init__(self, node: int, refuses: Callable[[bytes], bool], limit: int):
        assert limit > 0, "a memory node serves at least one queue pair"
        self.node, self.refuses, self.limit = node, refuses, limit
        self.qps: OrderedDict[int, tuple[bytes | None, Closable]] = OrderedDict()

    def make_room(self, owner: bytes | None, replaces: object = None) -> None:
        """Before a queue pair is created for ``owner``: Fenced if the master fenced it;
        else the one it says it used before (``replaces``, if it is its own) is closed, and
        the oldest while the MN is at its limit (which can only cut off a client long gone)."""
        if owner is not None and self.refuses(owner):
            raise Fenced(refusal(self.node, owner), self.node)
        if type(replaces) is int and self.owner(replaces) == owner:
            self.drop(replaces, owner)
        while len(self.qps) >= self.limit:
            qpn = next(iter(self.qps))
            self.drop(qpn, self.qps[qpn][0])

    def add(self, qpn: int, owner: bytes | None, qp: Closable) -> None:
        assert qpn not in self.qps, f"queue pair {qpn} is filed already"
        assert owner is None or not self.refuses(owner), "make_room refuses a fenced owner"
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

    def fence(self) -> int:
        """Close every queue pair whose owner the MN now refuses (it gets none again); ->
        how many. When this returns, the NIC executes none of their requests any more."""
        gone = [(qpn, owner) for qpn, (owner, _qp) in self.qps.items()
                if owner is not None and self.refuses(owner)]
        for qpn, owner in gone:
            self.drop(qpn, owner)
        if gone:
            log.info("memnode %d: closed the queue pairs of fenced %s", self.node,
                     ", ".join(sorted({repr(owner) for _, owner in gone})))
        return len(gone)

    def close(self) -> None:
        for qpn, (owner, _qp) in list(self.qps.items()):
            self.drop(qpn, owner)
