"""Objects met in reused memory: telling an object being replaced from a corrupt one.

A slot value names an object by address, fingerprint, size and generation (its allocation's
sequence number mod 256, ``fusee.layout``): once the slot moves on, the object is freed, its
owner reclaims the memory and writes a new object there, possibly of the same key and size;
the generation tells it apart (up to 256 allocations later, when the same value may come
back: ABA). A client reads a slot, then (a round trip later) the object it names; by then
the memory may hold a half-written object, one with its ``used`` byte cleared, an object of
another key, or a new object of the same key that no slot names yet (its value is not
written yet as far as anyone else knows). None of that is corruption: the reader must look
at the slot again.

Two reads of the same bytes prove what they read. Say the object reads at T2 and T4 returned
the same bytes, and a slot read at T3 between them still showed the value. A slot naming a
value names a live object: written whole before it was published, freed only after the slot
moved on. Had that object been written after T2, T4 would have read it or, were it freed by
then, what was written over it, not the bytes of before it: every object a client writes
differs (its sequence number and links). So the bytes are the live object's: if they are no
KV pair of the slot's fingerprint, the object is corrupt (or the slot names no object).
"""

from __future__ import annotations

from fusee.errors import CorruptObject
from fusee.hashing import key_hash
from fusee.layout import (COMMITTED, DELETE, GEN_MASK, ObjectView, decode_object, slot_addr,
                          slot_fp, slot_gen, slot_node)


class ObjectReads:
    """The objects in doubt in the last two passes (a pass: a read of the slots, then of the
    objects their values name), by slot value. Call ``next_pass`` before judging the objects
    of a pass whose slots were read after the previous pass's objects."""

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.last: dict[int, bytes] = {}
        self.now: dict[int, bytes] = {}

    def next_pass(self) -> None:
        self.last, self.now = self.now, {}

    def judge(self, v: int, buf: bytes, key: bytes) -> ObjectView | None:
        """The object ``v`` names, read from ``buf``, or None while its memory is being
        reused: it does not decode, is another allocation than ``v``'s (generation, key
        fingerprint), holds a DELETE's log entry, or is an object of ``key`` whose commit
        record is not COMMITTED (a write in flight: a slot names an object once it is
        recorded COMMITTED, but for the few a failover or a recovery publishes before, which
        the next pass proves named by reading the same bytes). Raises CorruptObject when the
        previous pass read the same bytes for ``v`` and they are no KV pair it names."""
        obj = decode_object(buf)
        named = ours = False
        if obj is not None and is_named(v, obj, key):
            named, ours = True, obj.key == key and obj.opcode != DELETE
            if ours and obj.state == COMMITTED or obj.key != key:
                return obj
        raw = bytes(buf)
        if self.last.get(v) == raw:
            if ours:
                return obj
            what = ("fails its checksum" if obj is None else
                    "is not the allocation the slot names" if not named else
                    "holds a DELETE's log entry")
            raise CorruptObject(f"object at MN {slot_node(v)} {slot_addr(v, self.unit):#x} "
                                f"{what}")
        self.now[v] = raw
        return None


def is_named(v: int, obj: ObjectView, key: bytes) -> bool:
    """Can slot value ``v`` name ``obj`` (decoded from the memory ``v`` points to)? Its
    generation and key fingerprint must be ``v``'s (``key``'s fingerprint is, when ``v`` is
    one of its candidates); otherwise it is a later allocation in that memory."""
    return (obj.seq & GEN_MASK == slot_gen(v)
            and (obj.key == key or key_hash(obj.key).fp == slot_fp(v)))
