"""In-process memory nodes: the backend of unit tests and of the deterministic simulator.

``LocalMemory`` holds every MN's region in this process; any number of ``LocalTransport``
clients share it. Verbs execute synchronously in posting order, so a simulator that decides
which client's batch runs next decides the interleaving exactly. A crashed node (``crash``)
answers nothing: its requests fail with NodeTimeout at once, as they would after the deadline.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusee.emulator.blocks import BlockTable, format_region
from fusee.emulator.memory import MemoryRegion, new_rkey
from fusee.cluster_identity import cluster_word
from fusee.config import ClusterConfig
from fusee.memory_map import MemoryMap
from fusee.verbs import AllocBlock, FreeBlock, NodeTimeout, Request, TransportError
from fusee.transports.base import RegionInfo, Transport, raise_for_failures


class LocalMemory:
    """Every memory node of a cluster, as bytearrays in this process."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.map = MemoryMap.of(config.layout)
        self.regions: dict[int, MemoryRegion] = {}
        self.tables: dict[int, BlockTable] = {}
        self.crashed: set[int] = set()
        #: (node, its region as it died) for every crash, in order: the memory a failover
        #: gave up, kept for the simulator's leak oracle (``fusee.emulator.testkit.lost_frees``)
        self.dead_regions: list[tuple[int, MemoryRegion]] = []
        for m in config.memnodes:
            region = MemoryRegion(bytearray(config.layout.region_size), new_rkey(), m.id)
            format_region(region, self.map, m.id, cluster_word(config))
            self.regions[m.id] = region
            self.tables[m.id] = BlockTable(region, self.map)

    def crash(self, node: int) -> None:
        """The node stops answering, for good (crash-stop)."""
        if node not in self.crashed:
            self.dead_regions.append((node, self.regions[node]))
        self.crashed.add(node)

    def restart(self, node: int) -> None:
        """A crashed node comes back with an empty region (a new key, as a restarted MN has),
        to be rebuilt (``fusee.rebuild``)."""
        assert node in self.crashed, f"MN {node} did not crash"
        region = MemoryRegion(bytearray(self.config.layout.region_size), new_rkey(), node)
        format_region(region, self.map, node, cluster_word(self.config))
        self.regions[node] = region
        self.tables[node] = BlockTable(region, self.map)
        self.crashed.discard(node)

    def info(self, node: int) -> RegionInfo:
        r = self.regions[node]
        return RegionInfo(node=node, length=r.length, rkey=r.rkey)


class LocalTransport(Transport):
    name = "local"

    def __init__(self, config: ClusterConfig, memory: LocalMemory | None = None,
                 timeout: float | None = None):
        super().__init__(config, timeout)
        self.memory = memory or LocalMemory(config)
        self.regions = {n: self.memory.info(n) for n in self.memory.regions}

    def revive(self, nodes) -> None:
        """MNs ``nodes`` were rebuilt: learn their regions again."""
        self.regions.update((n, self.memory.info(n)) for n in nodes)

    def _execute(self, batch: Sequence[Request]) -> list:
        mem = self.memory
        results: list = [None] * len(batch)
        failed: dict[int, TransportError] = {}     # per node: later requests are flushed
        for i, req in enumerate(batch):
            node = req.node
            if node in failed:
                results[i] = failed[node]
                continue
            if node in mem.crashed:
                failed[node] = results[i] = NodeTimeout(f"MN {node} did not answer", node)
                continue
            try:
                t = type(req)
                if t is AllocBlock or t is FreeBlock:
                    results[i] = mem.tables[node].serve(req)
                else:
                    results[i] = mem.regions[node].execute(req, self.regions[node].rkey)
            except TransportError as e:
                failed[node] = results[i] = e
        if failed:
            raise_for_failures(results)
        return results
