"""The ZeroMQ backend: verbs travel to an emulated NIC inside the memory-node process.

Works between any hosts (``tcp://``) or on one host (``ipc://``). All requests of a batch for
one MN go in one message; the messages for several MNs go out together and the batch completes
when every reply is in, so a batch is one round trip however many MNs it touches.

Connecting asks every MN for its region at once. An MN known dead (``dead``, from the
master's membership) or silent within the timeout is marked dead: it keeps a placeholder
region (length 0) so that requests to it are known, and each fails at once with NodeTimeout.
"""

from __future__ import annotations

from typing import Sequence

from fusee.emulator import wire
from fusee.config import ClusterConfig
from fusee.verbs import Request
from fusee.transports.base import RegionInfo, Transport, group_by_node, raise_for_failures
from fusee.transports.channel import Channels, dead_on_connect, place_replies


class ZmqTransport(Transport):
    name = "zmq"

    def __init__(self, config: ClusterConfig, timeout: float | None = None, dead=()):
        super().__init__(config, timeout)
        self.channels = Channels(config)
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

    def _execute(self, batch: Sequence[Request]) -> list:
        channels = self.channels
        seq = channels.next_seq()
        regions, dead = self.regions, self.dead
        if len(batch) == 1 and not (dead and batch[0].node in dead):     # the common case
            node = batch[0].node
            reply = channels.roundtrip(node, wire.encode_verbs(seq, regions[node].rkey, batch),
                                       seq, self.timeout)
            if type(reply) is tuple and reply[1] is None and len(reply[0]) == 1:
                return reply[0]
            groups = {node: [0]}
            replies = {node: reply}
        else:
            groups = group_by_node(batch)
            payloads = {node: wire.encode_verbs(seq, regions[node].rkey, [batch[i] for i in idx])
                        for node, idx in groups.items() if node not in dead}
            replies = channels.exchange(payloads, seq, self.timeout)
            for node in groups.keys() & dead:
                replies[node] = channels.taken_for_dead(node)
        return self._complete(batch, groups, replies)

    @staticmethod
    def _complete(batch, groups: dict, replies: dict) -> list:
        """The batch's completions in order from each node's reply; raises on any failure."""
        results: list = [None] * len(batch)
        if place_replies(results, groups, replies):
            raise_for_failures(results)
        return results

    def close(self) -> None:
        self.channels.close()
