"""Where things live inside one memory node's region (docs/design.md#memory-map).

    0 ............ header page: magic, layout fingerprint, node id, client-id counter, cluster id,
                   incarnation
    table ........ block-allocation table: one 8-byte word per data block (owner id + 1, 0 = free)
    clients ...... max_clients metadata slots of client_meta_size bytes (log heads, owned blocks)
    index ........ RACE directory and subtables (index_size bytes)
    data ......... data blocks of block_size bytes

Every process derives the same map from the same LayoutConfig, so nothing is negotiated.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from fusee.config import ConfigError, LayoutConfig

PAGE = 4096
MAGIC = 0x314E4D4545535546      # b"FUSEEMN1" little-endian
HEADER_MAGIC = 0                 # u64 magic
HEADER_LAYOUT = 8                # u64 fingerprint of the layout
HEADER_NODE = 16                 # u64 node id
HEADER_CLIENT_IDS = 24           # u64 counter: FAA by a new client to draw a unique id
HEADER_CLUSTER = 32              # u64 cluster id (fusee.cluster_identity); 0: made without one
HEADER_INCARNATION = 40          # u64 random, nonzero, new at each start of the MN process
HEADER_END = 48                  # the header's words end here; one READ of them identifies an MN


def _align(n: int, a: int = PAGE) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class MemoryMap:
    layout: LayoutConfig
    table: int
    num_blocks: int
    clients: int
    index: int
    data: int

    @classmethod
    def of(cls, layout: LayoutConfig) -> MemoryMap:
        layout.check()
        table = PAGE
        # The table has one word per block; size it for the most blocks the region could hold.
        clients = table + _align(8 * (layout.region_size // layout.block_size))
        index = clients + layout.max_clients * layout.client_meta_size
        data = _align(index + layout.index_size, PAGE)
        num_blocks = (layout.region_size - data) // layout.block_size
        if num_blocks < 1:
            # a ConfigError (a ValueError): the config is wrong, a process exits 2 saying so
            raise ConfigError(f"the layout leaves no room for a single data block: the "
                              f"{layout.region_size}-byte region holds the client slots and "
                              f"the index up to byte {data}, then blocks of "
                              f"{layout.block_size} bytes (make layout.region_size larger, or "
                              f"index_size, block_size or max_clients smaller)")
        return cls(layout, table, num_blocks, clients, index, data)

    def block_addr(self, i: int) -> int:
        return self.data + i * self.layout.block_size

    def block_index(self, addr: int) -> int:
        i, rem = divmod(addr - self.data, self.layout.block_size)
        if rem or not 0 <= i < self.num_blocks:
            raise ValueError(f"{addr:#x} is not the start of a data block")
        return i

    def table_entry(self, i: int) -> int:
        return self.table + 8 * i

    def client_meta(self, client_id: int) -> int:
        if not 0 <= client_id < self.layout.max_clients:
            raise ValueError(f"client id {client_id} out of range 0..{self.layout.max_clients - 1}")
        return self.clients + client_id * self.layout.client_meta_size

    @property
    def fingerprint(self) -> int:
        """A 64-bit digest of the layout, stored in the header so a mismatched client is refused."""
        lay = self.layout
        raw = repr((lay.region_size, lay.block_size, lay.max_clients, lay.client_meta_size,
                    lay.index_size, lay.initial_subtables, lay.buckets_per_subtable,
                    lay.object_unit, lay.max_key_size)).encode()
        return zlib.crc32(raw) | (zlib.adler32(raw) << 32)
