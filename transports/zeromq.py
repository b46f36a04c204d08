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

from fusee.emulator import wire
from fusee.config import ClusterConfig
from fusee.verbs import MAX_BATCH, Batch, Cas, Faa, Read, Request, Write
from fusee.transports.base import RegionInfo, Transport, group_by_node, raise_for_failures
from fusee.transports.channel import Channels, dead_on_connect, place_replies


#: the verbs ``ZmqTransport.execute`` runs flat
ONE_SIDED = (Read, Write, Cas, Faa)


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
        """See Transport.execute. The common cases, a batch of verbs on live MNs, run here
        flat: Transport.execute's checks and counts inline, not a Python call per verb. On
        one MN: one message, one reply (a one-round-trip SEARCH made 6 more Python calls the
        general way). On several (operations in flight together, ``run_concurrently``): one
        message to each, in parallel (``_execute``). Any other batch (control requests, a
        dead first MN or an unknown MN, malformed requests) goes the general way, which
        checks and words its refusal."""
        if not batch or len(batch) > MAX_BATCH or type(batch[0]) not in ONE_SIDED:
            return Transport.execute(self, batch)
        node = batch[0].node
        regions = self.regions
        region = regions.get(node) if type(node) is int else None
        if region is None or (self.dead and node in self.dead):
            return Transport.execute(self, batch)
        reads = writes = atomics = bytes_in = bytes_out = 0
        alone = True
        for r in batch:
            t = type(r)
            if t not in ONE_SIDED:
                return Transport.execute(self, batch)
            if r.node != node:
                if type(r.node) is not int or r.node not in regions:
                    return Transport.execute(self, batch)
                alone = False
            if t is Read:
                reads += 1
                bytes_in += r.length
            elif t is Write:
                writes += 1
                bytes_out += len(r.data)
            else:
                atomics += 1
        s = self.stats
        s.round_trips += 1
        s.verbs += len(batch)
        s.reads += reads
        s.writes += writes
        s.atomics += atomics
        s.bytes_in += bytes_in
        s.bytes_out += bytes_out
        if alone:
            return self._on_one(node, region.rkey, batch)
        return self._execute(batch)

    def _on_one(self, node: int, rkey: int, batch: Batch) -> list:
        """A batch of verbs for one live MN: one message and its reply; raises on any
        failure."""
        channels = self.channels
        seq = channels.next_seq()
        reply = channels.roundtrip(node, wire.encode_verbs(seq, rkey, batch), seq, self.timeout)
        if type(reply) is tuple and reply[1] is None and len(reply[0]) == len(batch):
            return reply[0]
        return self._complete(batch, seq, {node: list(range(len(batch)))}, {node: reply})

    def _execute(self, batch: Sequence[Request]) -> list:
        regions, dead = self.regions, self.dead
        node = batch[0].node
        if not (dead and node in dead) and all_on(node, batch):
            return self._on_one(node, regions[node].rkey, batch)
        channels = self.channels
        seq = channels.next_seq()
        groups = group_by_node(batch)
        payloads = {node: wire.encode_verbs(seq, regions[node].rkey, [batch[i] for i in idx])
                    for node, idx in groups.items() if node not in dead}
        replies = channels.exchange(payloads, seq, self.timeout)
        for node in groups.keys() & dead:
            replies[node] = channels.taken_for_dead(node)
        return self._complete(batch, seq, groups, replies)

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


def all_on(node: int, batch: Sequence[Request]) -> bool:
    """Whether every request of ``batch`` goes to MN ``node``: then the batch is one message
    and one reply, without the per-node grouping of a batch that spans MNs."""
    for r in batch:
        if r.node != node:
            return False
    return True
