"""Objects met in reused memory: telling an object being replaced from a corrupt one.

A slot value names an object by address (and fingerprint and size), not by instance: once the
slot moves on, the object is freed, its owner reclaims the memory and writes a new object
there, possibly of the same key and size, so the SAME slot value names it again (ABA). A
client reads a slot, then (a round trip later) the object it names; by then the memory may
hold a half-written object, one with its ``used`` byte cleared, or an object of another key.
None of that is corruption: the reader must look at the slot again.

When is an undecodable object proven corrupt? Say the object reads at T2 and T4 returned the
same undecodable bytes, and a slot read at T3 between them still showed the value. A slot
naming a value names a live object: written whole before it was published, freed only after
the slot moved on. If that object had been written before T2, T2 would have read it intact;
so it was written after T2, and, as T4 did not read it either, freed and overwritten before
T4, with bytes that equal those of before it was written: impossible, as every object a
client writes differs (its sequence number and links). So the object at that address is
corrupt, or the slot names something that is not an object. Anything else is reuse in
progress, and the caller looks again (bounded by its patience).
"""

from __future__ import annotations

from fusee.errors import CorruptObject
from fusee.hashing import key_hash
from fusee.layout import ObjectView, decode_object, slot_addr, slot_fp, slot_node


class ObjectReads:
    """The undecodable objects of the last two passes (a pass: a read of the slots, then of
    the objects their values name), by slot value. Call ``next_pass`` before judging the
    objects of a pass whose slots were read after the previous pass's objects."""

    def __init__(self, unit: int):
        self.unit = unit
        self.last: dict[int, bytes] = {}
        self.now: dict[int, bytes] = {}

    def next_pass(self) -> None:
        self.last, self.now = self.now, {}

    def judge(self, v: int, buf, key: bytes) -> ObjectView | None:
        """The object ``v`` names, read from ``buf``; None while its memory is being reused
        (it does not decode, or holds a key of another fingerprint than ``v``'s). Raises
        CorruptObject when the previous pass read the same bytes for ``v``."""
        obj = decode_object(buf)
        if obj is not None and (obj.key == key or key_hash(obj.key).fp == slot_fp(v)):
            return obj
        raw = bytes(buf)
        if self.last.get(v) == raw:
            what = "fails its checksum" if obj is None else "holds a key of another fingerprint"
            raise CorruptObject(f"object at MN {slot_node(v)} {slot_addr(v, self.unit):#x} "
                                f"{what}")
        self.now[v] = raw
        return None
