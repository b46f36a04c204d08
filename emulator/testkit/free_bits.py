"""A free delivered to an object whose free bit is already set, caught in the simulator the
moment it happens.

A free is an FAA of the bit of the object's first unit in its block's bitmap
(``fusee.allocation.Allocator.free_request``): an FAA, not a CAS, because the freer does not
know the word and a free rides in the next batch without a round trip of its own. So a free
delivered twice while the bit is still set does not fail: the add carries into the next
bit, and the object after it (live, maybe another client's) reads as freed. Its owner
reclaims and reuses it, and an acknowledged write is lost much later, where the leak audit
can only say that a live object was free, not who freed twice. The simulator checks every
FAA it executes against the bitmap word before it lands (``FreeBits.check``), so a sweep
fails at the verb that freed twice, naming the client and its operation.

A reclaim clears bits with an FAA of minus them (``Allocator.reclaim``), which is a single
positive bit only when it clears bit 63 alone (-(1 << 63) = 1 << 63 modulo 2**64): there a
free and a reclaim are the same verb, and bit 63 is not checked. A second free of bit 63
carries out of the word: it harms no neighbour (the object reads as held again: a leak the
audit finds).
"""

from __future__ import annotations

from fusee.layout import BLOCK_HEADER
from fusee.memory_map import MemoryMap
from fusee.verbs import Faa

_TOP = 1 << 63


class DoubleFree(AssertionError):
    """A free FAA met its bit already set: it would carry into the next object's bit."""


class FreeBits:
    """The bitmap geometry of a layout: which words an FAA frees into."""

    def __init__(self, mmap_: MemoryMap) -> None:
        layout = mmap_.layout
        self.data, self.block_size = mmap_.data, layout.block_size
        self.end = mmap_.data + mmap_.num_blocks * layout.block_size
        units = layout.block_size // layout.object_unit
        self.bitmap_bytes = -(-units // 64) * 8

    def is_free(self, req: Faa) -> bool:
        """Is ``req`` a free: one bit (not the top one, see the module docstring) added to a
        word of a data block's bitmap?"""
        delta = req.delta
        if delta <= 0 or delta >= _TOP or delta & (delta - 1):
            return False
        if not self.data <= req.addr < self.end:
            return False
        off = (req.addr - self.data) % self.block_size - BLOCK_HEADER
        return 0 <= off < self.bitmap_bytes and off % 8 == 0

    def check(self, req: Faa, word: int, who: str) -> None:
        """Raise DoubleFree if free ``req`` (``is_free``) finds its bit set in ``word``, the
        bitmap word it is about to add to; ``who`` names the client and operation."""
        assert self.is_free(req), req
        if word & req.delta:
            raise DoubleFree(f"{who}: a free of a freed object (MN {req.node}, bitmap word "
                             f"{req.addr:#x} = {word:#x}, bit {req.delta.bit_length() - 1}): "
                             f"the add carries into the next object's bit")
