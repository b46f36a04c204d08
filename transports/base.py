"""The one small interface every verb backend offers (docs/design.md#verbs-and-batches).

A transport connects to the memory nodes of a cluster, learns each registered region (length,
access key, and whatever the backend needs to reach it), and executes *batches*: all requests
for one MN are posted together (one message / one doorbell, like a chain of work requests on an
RC queue pair), the sub-batches for different MNs go out in parallel, and ``execute`` returns
when every completion is in. One batch = one round trip, and every transport counts them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fusee.config import ClusterConfig
from fusee.errors import batch_failure
from fusee.verbs import (MAX_BATCH, AllocBlock, Batch, Cas, Faa, FreeBlock, NodeTimeout, Read,
                         RemoteAccessError, Request, TransportError, Write)

if TYPE_CHECKING:
    from fusee.transports.channel import Overdue


@dataclass(frozen=True)
class RegionInfo:
    """What a client learns about one MN's registered region when it connects."""
    node: int
    length: int
    rkey: int
    shm_name: str | None = None      # same-host shared-memory segment (shm backend)
    addr: int = 0                    # remote virtual address of offset 0 (verbs backend)


#: the counts of ``TransportStats``, in the order of its ``counts`` array
COUNTS = ("round_trips", "verbs", "reads", "writes", "atomics", "bytes_in", "bytes_out",
          "controls")


class _Count:
    """One count of a TransportStats: an attribute that lives in its ``counts`` array."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, stats: TransportStats, owner: object = None) -> int:
        return stats.counts[self.index]

    def __set__(self, stats: TransportStats, value: int) -> None:
        stats.counts[self.index] = value


class TransportStats:
    """Counters a test or a benchmark reads: round trips, requests, payload bytes.

    They live in one array of signed 64-bit integers (``counts``, in the order of
    ``COUNTS``), which the C fast paths (``_atomic.run``, ``_atomic.group``) add a batch's
    counts to in place: setting Python attributes one by one cost a twentieth of a SEARCH."""

    __slots__ = ("counts",)
    round_trips, verbs, reads, writes = _Count(0), _Count(1), _Count(2), _Count(3)
    atomics, bytes_in, bytes_out, controls = _Count(4), _Count(5), _Count(6), _Count(7)

    def __init__(self, round_trips: int = 0, verbs: int = 0, reads: int = 0, writes: int = 0,
                 atomics: int = 0, bytes_in: int = 0, bytes_out: int = 0,
                 controls: int = 0) -> None:
        self.counts = array("q", (round_trips, verbs, reads, writes, atomics, bytes_in,
                                  bytes_out, controls))

    def count(self, req) -> None:
        """Count one request by kind and payload bytes (the round trip is counted apart)."""
        t = type(req)
        c = self.counts
        if t is Read:
            c[2] += 1
            c[5] += req.length
        elif t is Write:
            c[3] += 1
            c[6] += len(req.data)
        elif t is Cas or t is Faa:
            c[4] += 1
        elif t is AllocBlock or t is FreeBlock:
            c[7] += 1
        else:
            raise TypeError(f"not a verb: {req!r}")

    def copy(self) -> TransportStats:
        return TransportStats(*self.counts)

    def __sub__(self, other: TransportStats) -> TransportStats:
        return TransportStats(*(a - b for a, b in zip(self.counts, other.counts)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransportStats) and self.counts == other.counts

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it was

    def as_dict(self) -> dict:
        return dict(zip(COUNTS, self.counts))

    def __repr__(self) -> str:
        return "TransportStats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


def group_by_node(batch: Sequence[Request]) -> dict[int, list[int]]:
    """Positions of the batch's requests, per memory node, in posting order."""
    groups: dict[int, list[int]] = {}
    for i, req in enumerate(batch):
        groups.setdefault(req.node, []).append(i)
    return groups


def raise_for_failures(results: list) -> list:
    """Raise the failure of a completed batch (``fusee.errors.batch_failure``: with all
    results attached), or return them."""
    failure = batch_failure(results)
    if failure is not None:
        raise failure
    return results


class Transport(ABC):
    """Client side of the verbs: connect once, then ``execute`` batches."""

    name = "abstract"

    def __init__(self, config: ClusterConfig, timeout: float | None = None):
        self.config = config
        self.timeout = config.timeout if timeout is None else timeout
        self.stats = TransportStats()
        self.regions: dict[int, RegionInfo] = {}
        self.overdue: Overdue | None = None     # what the last failed batch may still get

    def execute(self, batch: Batch) -> list:
        """Post a batch and wait for every completion: one round trip.

        Returns the completions in batch order (bytes for READ, None for WRITE, the old word
        for CAS/FAA, an address for AllocBlock). Raises TypeError/ValueError for a malformed
        request before anything is sent, RemoteAccessError when an MN refuses a request,
        NodeTimeout when an MN does not answer within ``timeout``; both carry ``results``.
        Only verbs and control requests: what an operation yields that is not one
        (``Backoff``, ``AwaitMembership``) is its driver's to interpret (``fusee.driver``).
        """
        if not batch:
            return []
        if len(batch) > MAX_BATCH:
            raise ValueError(f"a batch of {len(batch)} requests exceeds MAX_BATCH={MAX_BATCH}")
        s = self.stats
        s.round_trips += 1
        s.verbs += len(batch)
        regions = self.regions
        for req in batch:
            s.count(req)                    # (TypeError for what is not a request)
            if req.node not in regions:
                raise ValueError(f"no memory node {req.node!r} in this cluster")
        return self._execute(batch)

    @abstractmethod
    def _execute(self, batch: Sequence[Request]) -> list:
        """Backend part of ``execute``: the batch is non-empty and names known nodes."""

    def awaits_late(self, batch: Batch) -> bool:
        """Whether ``late`` may complete ``batch`` (its MNs' replies may still come)."""
        return self.overdue is not None and self.overdue.batch is batch

    def late(self, batch: Batch, timeout: float) -> list | None:
        """The completions of ``batch``, the last one executed, which failed with
        NodeTimeout: once the MNs that did not answer it in time have answered late, within
        ``timeout`` seconds (raising the batch's other failure, if it had one), else None.
        Each verb then ran exactly once, and its completion says what it did. The backends
        whose MNs answer over ``fusee.transports.channel`` keep in ``overdue`` what may still
        come; one that cannot await a late reply (a queue pair in error: verbs) never does."""
        overdue = self.overdue
        if overdue is None or overdue.batch is not batch:
            return None
        assert overdue.groups, "a batch all of whose replies came is not overdue"
        try:
            return overdue.complete(timeout)
        finally:
            if not overdue.groups:              # all in: nothing more will come
                self.overdue = None

    def revive(self, nodes) -> None:  # noqa: B027 (an optional hook: most backends need nothing)
        """MNs ``nodes`` are alive again (rebuilt: ``fusee.rebuild``); a backend that took
        some of them for dead reconnects to them. (Those that need every MN: nothing to do.)"""

    def close(self) -> None:  # noqa: B027 (an optional hook: most backends need nothing)
        """Release connections and mappings; the transport is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["RegionInfo", "Transport", "TransportStats", "group_by_node", "raise_for_failures",
           "RemoteAccessError", "NodeTimeout", "TransportError"]
