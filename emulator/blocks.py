"""The memory node's one piece of CPU work: handing out data blocks.

The block-allocation table lives in the region itself (one word per block: owner id + 1, or
0 when free), so that recovery can read who owns what with one-sided READs alone.

Design: docs/design.md#two-level-allocation (the MN level).
"""

from __future__ import annotations

import struct

from fusee.emulator.memory import MemoryRegion
from fusee.index import initial_image
from fusee.memory_map import (HEADER_CLUSTER, HEADER_INCARNATION, HEADER_LAYOUT, HEADER_MAGIC,
                              HEADER_NODE, MAGIC, MemoryMap)
from fusee.verbs import AllocBlock, ControlError, FreeBlock

_U64 = struct.Struct("<Q")


def format_region(region: MemoryRegion, mmap_: MemoryMap, node: int, cluster: int,
                  incarnation: int = 0) -> None:
    """Write the header and the empty index of a fresh region (the rest is already zero).
    ``cluster``: the cluster id's word (``fusee.cluster_identity.cluster_word``), which every
    process that connects checks; ``incarnation``: this start's word
    (``fusee.cluster_identity.new_incarnation``), which tells a restarted MN, empty, from
    the one it replaces."""
    rkey = region.rkey
    region.write(HEADER_MAGIC, _U64.pack(MAGIC), rkey)
    region.write(HEADER_LAYOUT, _U64.pack(mmap_.fingerprint), rkey)
    region.write(HEADER_NODE, _U64.pack(node), rkey)
    region.write(HEADER_CLUSTER, _U64.pack(cluster), rkey)
    region.write(HEADER_INCARNATION, _U64.pack(incarnation), rkey)
    for addr, data in initial_image(mmap_.layout):      # the RACE index's empty image
        region.write(addr, data, rkey)


class BlockTable:
    """Allocates whole data blocks of one region to owners, recording them in the region."""

    def __init__(self, region: MemoryRegion, mmap_: MemoryMap):
        self.region, self.map = region, mmap_
        self._next = 0      # where the search for a free block starts

    def _owner(self, i: int) -> int:
        return _U64.unpack(self.region.mem[self.map.table_entry(i):][:8])[0]

    def _set(self, i: int, value: int) -> None:
        self.region.mem[self.map.table_entry(i):self.map.table_entry(i) + 8] = _U64.pack(value)

    def alloc(self, owner: int, at: int = 0) -> int:
        if not 0 <= owner < self.map.layout.max_clients:
            raise ControlError(f"owner {owner} out of range", self.region.node)
        if at:
            try:
                i = self.map.block_index(at)
            except ValueError as e:
                raise ControlError(str(e), self.region.node) from None
            if self._owner(i) != 0:
                raise ControlError(f"MN {self.region.node}: block {at:#x} is taken",
                                   self.region.node)
            self._set(i, owner + 1)
            return at
        n = self.map.num_blocks
        for k in range(n):
            i = (self._next + k) % n
            if self._owner(i) == 0:
                self._set(i, owner + 1)
                self._next = (i + 1) % n
                return self.map.block_addr(i)
        raise ControlError(f"MN {self.region.node}: out of memory ({n} blocks in use)",
                           self.region.node)

    def free(self, owner: int, addr: int) -> None:
        try:
            i = self.map.block_index(addr)
        except ValueError as e:
            raise ControlError(str(e), self.region.node) from None
        if self._owner(i) != owner + 1:
            raise ControlError(f"block {addr:#x} is not owned by client {owner}", self.region.node)
        self._set(i, 0)

    def used(self) -> int:
        """How many blocks are handed out (for operators: the MN's memory in use)."""
        return sum(self._owner(i) != 0 for i in range(self.map.num_blocks))

    def serve(self, req):
        """Answer one control request."""
        if type(req) is AllocBlock:
            return self.alloc(req.owner, req.at)
        if type(req) is FreeBlock:
            return self.free(req.owner, req.addr)
        raise ControlError(f"unknown control request {req!r}", self.region.node)
