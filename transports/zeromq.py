"""The ZeroMQ backend: verbs travel to an emulated NIC inside the memory-node process.

Works between any hosts (``tcp://``) or on one host (``ipc://``). All requests of a batch for
one MN go in one message; the messages for several MNs go out together and the batch completes
when every reply is in, so a batch is one round trip however many MNs it touches.
"""

from __future__ import annotations

from typing import Sequence

from emulator import wire
from fusee.config import ClusterConfig
from fusee.verbs import NodeTimeout, Request
from transports.base import RegionInfo, Transport, group_by_node, raise_for_failures
from transports.channel import Channels


class ZmqTransport(Transport):
    name = "zmq"

    def __init__(self, config: ClusterConfig, timeout: float | None = None):
        super().__init__(config, timeout)
        self.channels = Channels(config)
        try:
            for m in config.memnodes:
                info = self.channels.call(m.id, "info", self.timeout)
                self.regions[m.id] = RegionInfo(node=m.id, length=info["length"],
                                                rkey=info["rkey"], shm_name=info["shm_name"])
        except BaseException:
            self.channels.close()
            raise

    def _execute(self, batch: Sequence[Request]) -> list:
        channels = self.channels
        seq = channels.next_seq()
        groups = group_by_node(batch)
        regions = self.regions
        payloads = {node: wire.encode_verbs(seq, regions[node].rkey, [batch[i] for i in idx])
                    for node, idx in groups.items()}
        replies = channels.exchange(payloads, seq, self.timeout)
        results: list = [None] * len(batch)
        failed = False
        for node, idx in groups.items():
            reply = replies[node]
            if isinstance(reply, NodeTimeout):
                failed = True
                for i in idx:
                    results[i] = reply
                continue
            done, error = reply
            for k, i in enumerate(idx):
                if k < len(done):
                    results[i] = done[k]
                else:              # the failed request and those flushed after it
                    failed = True
                    results[i] = wire.error_of(error, node) if error else NodeTimeout(
                        f"MN {node}: reply lacks completion {k}", node)
        if failed:
            raise_for_failures(results)
        return results

    def close(self) -> None:
        self.channels.close()
