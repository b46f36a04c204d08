"""The ZeroMQ backend: verbs travel to an emulated NIC inside the memory-node process.

Works between any hosts (``tcp://``) or on one host (``ipc://``). All requests of a batch for
one MN go in one message; the messages for several MNs go out together and the batch completes
when every reply is in, so a batch is one round trip however many MNs it touches.

Connecting asks every MN for its region at once. An MN known dead (``dead``, from the
master's membership) or silent within the timeout is marked dead: it keeps a placeholder
region (length 0) so that requests to it are known, and each fails at once with NodeTimeout.

``identity`` (a leased client's, ``fusee.fencing``) lets the MNs refuse this transport once
the master has ended the client's lease: its requests then fail with Fenced.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusee.emulator import _atomic, wire
from fusee.config import ClusterConfig
from fusee.verbs import MAX_BATCH, Batch, Cas, Faa, Read, Request, Write
from fusee.transports.base import RegionInfo, Transport, group_by_node, raise_for_failures
from fusee.transports.channel import Channels, dead_on_connect, place_replies


#: the verbs ``ZmqTransport.execute`` sorts out in C, in the order ``_atomic.group`` expects
ONE_SIDED = (Read, Write, Cas, Faa)
_group = _atomic.group
#: ``wire.encode_verbs``'s fast path: a batch of well-formed one-sided verbs in one C call
_pack = _atomic.pack
#: ``place_completions`` in one C call
_place = _atomic.place


class ZmqTransport(Transport):
    name = "zmq"

    def __init__(self, config: ClusterConfig, timeout: float | None = None, dead=(),
                 identity: bytes | None = None):
        super().__init__(config, timeout)
        self.channels = Channels(config, identity)
        try:
            known = set(dead)
            live = [m.id for m in config.memnodes if m.id not in known]
            infos = self.channels.call_all(live, "info", self.timeout)
            self.dead = dead_on_connect(config, dead, infos)
            for m in config.memnodes:
                if m.id in self.dead:
                    self.regions[m.id] = RegionInfo(node=m.id, length=0, rkey=0)
                else:
                    info = infos[m.id]
                    self.regions[m.id] = RegionInfo(node=m.id, length=info["length"],
                                                    rkey=info["rkey"],
                                                    shm_name=info["shm_name"])
        except BaseException:
            self.channels.close()
            raise

    def revive(self, nodes) -> None:
        """MNs ``nodes`` are alive again (rebuilt: ``fusee.rebuild``): learn their new
        regions (a new process has a new key). One that does not answer stays as it was."""
        for node, info in self.channels.call_all(sorted(nodes), "info", self.timeout).items():
            if isinstance(info, dict):
                self.regions[node] = RegionInfo(node=node, length=info["length"],
                                                rkey=info["rkey"], shm_name=info["shm_name"])
                self.dead.discard(node)

    def execute(self, batch: Batch) -> list:
        """See Transport.execute. The common case, a batch of verbs on known MNs, is checked,
        counted and sorted out per MN in one C call (``_atomic.group``), not in Python loops
        over its verbs: with operations in flight together (``run_concurrently``) a batch
        spans the MNs, and those loops cost more than its messages. Any other batch
        (control requests, an unknown MN, malformed requests) goes the general way, which
        checks and words its refusal."""
        if not batch or len(batch) > MAX_BATCH:
            return Transport.execute(self, batch)
        groups = _group(batch, ONE_SIDED, self.regions, self.stats.counts)
        if groups is None:
            return Transport.execute(self, batch)
        if len(groups) == 1:
            node = batch[0].node
            if node not in self.dead:
                return self._on_one(node, batch)
        return self._execute(batch, groups)

    def _on_one(self, node: int, batch: Batch) -> list:
        """A batch for one live MN: one message and its reply, without the per-node
        positions of a batch that spans MNs; raises on any failure."""
        channels = self.channels
        seq = channels.seq = channels.seq + 1           # (``next_seq``, without a call)
        payload = _pack(seq, self.regions[node].rkey, batch, ONE_SIDED, None)
        if payload is None:                             # (``wire.encode_verbs`` says why)
            payload = wire.encode_verbs(seq, self.regions[node].rkey, batch)
        reply = channels.roundtrip(node, payload, seq, self.timeout)
        if type(reply) is tuple and reply[1] is None and len(reply[0]) == len(batch):
            return reply[0]
        return self._complete(batch, seq, {node: list(range(len(batch)))}, {node: reply})

    def _execute(self, batch: Sequence[Request],
                 groups: dict[int, list[int]] | None = None) -> list:
        """One message to each MN the batch names (``groups``: node -> the positions of its
        requests), all in flight together; a known dead MN's requests fail at once."""
        if groups is None:
            groups = group_by_node(batch)
        regions, dead = self.regions, self.dead
        if len(groups) == 1:
            node = batch[0].node
            if not (dead and node in dead):
                return self._on_one(node, batch)
        channels = self.channels
        seq = channels.seq = channels.seq + 1           # (``next_seq``, without a call)
        payloads = {}
        for node, idx in groups.items():
            if node not in dead:
                rkey = regions[node].rkey
                payload = _pack(seq, rkey, batch, ONE_SIDED, idx)
                payloads[node] = (payload if payload is not None      # (as ``_on_one``)
                                  else wire.encode_verbs(seq, rkey, batch, idx))
        replies = channels.exchange(payloads, seq, self.timeout)
        if dead:
            for node in groups.keys() & dead:
                replies[node] = channels.taken_for_dead(node)
        else:                                           # the common case: all answered
            results = _place(len(batch), groups, replies)   # (``place_completions``)
            if results is not None:
                return results
        return self._complete(batch, seq, groups, replies)  # (it words why)

    def _complete(self, batch, seq: int, groups: dict, replies: dict) -> list:
        """The batch's completions in order from each node's reply; raises on any failure
        (what may still come late is kept for ``late``)."""
        results: list = [None] * len(batch)
        if place_replies(results, groups, replies):
            self.overdue = self.channels.overdue(batch, seq, groups, replies, results)
            raise_for_failures(results)
        return results

    def close(self) -> None:
        self.channels.close()



def place_completions(size: int, groups: dict[int, list[int]], replies: dict) -> list | None:
    """The completions of a batch of ``size`` requests in batch order, from the replies of the
    nodes it went to (``groups``: node -> the positions of its requests), when every node's
    reply is a clean ``(completions, None)`` with one completion per request; else None (a
    failure: ``_complete`` words it). ``_atomic.place`` does this in C, which
    ``ZmqTransport._execute`` runs (tests/test_fast_path.py holds the two equal)."""
    results: list = [None] * size
    for node, idx in groups.items():
        reply = replies.get(node)
        if (type(idx) is not list or type(reply) is not tuple or len(reply) != 2
                or reply[1] is not None or type(reply[0]) is not list
                or len(reply[0]) != len(idx)):
            return None
        for i, completion in zip(idx, reply[0]):
            if type(i) is not int or not 0 <= i < size:
                return None
            results[i] = completion
    return results
