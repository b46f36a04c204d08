"""The embedded operation log (docs/design.md#the-embedded-log).

Every object a client writes carries a log entry at its end (format in ``fusee.layout``). The
entries of one client and one size class form a list in allocation order: each names the next
object the client will allocate in that class (reserved in advance by the allocator) and the
previous one, and the first object of each class is recorded as the list head in the client's
metadata slot (``META_HEADS + 8 * class index``) on the live MNs of ``0..r-1``. After a
crash, the whole history of in-flight operations is reachable from the heads with READs
alone; ``seq`` tells a live successor from a stale object left in reused memory.

The writer records its outcome in the entry's commit record: COMMITTED (with the slot, the
old value and the crc of the object it named) before the primary CAS, LOST when it lost the
SNAPSHOT round, ABORTED when the operation ended with an error or withdrew its claim. Records
are numbered per object, so recovery tells the newest when a crash left replicas differing.
Recovery (``fusee.recovery``) reads the entries back by reading the client's blocks whole
(``fusee.holdings``): a few round trips instead of one per entry, and no entry is missed
when reused memory has unlinked it from its list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from fusee.allocation import Allocator
from fusee.errors import ValueTooLarge
from fusee.layout import (CLASS_OF, CLASSES, COMMIT_OFFSET, LEN_SHIFT, LOG_BYTES, MAX_UNITS,
                          META_HEADS, NODE_MASK, NODE_SHIFT, OBJ_HEADER, commit_record,
                          encode_object, object_bytes, pack_u64)
from fusee.memory_map import MemoryMap
from fusee.verbs import Write

def _writes_in_c() -> Callable[..., list[Write]] | None:
    try:
        from fusee.emulator._atomic import verbs_to
    except ImportError:     # pragma: no cover (a source tree without its build, or a stale one)
        return None
    return verbs_to


#: the same write to every copy, in one C call (emulator/_atomic.c, at the end); Final, so
#: that a compiled caller reads it from a C static, not from the module's dict (``_WRITE``
#: too: the class it makes them of)
_WRITES_IN_C: Final = _writes_in_c()
_WRITE: Final = Write


def writes_to(nodes: Sequence[int], addr: int, data: bytes) -> list[Write]:
    """The write of ``data`` at ``addr`` on each of ``nodes`` (an object's copies share
    their addresses)."""
    if _WRITES_IN_C is not None:
        return _WRITES_IN_C(_WRITE, nodes, addr, data)
    return writes_to_py(nodes, addr, data)


def writes_to_py(nodes: Sequence[int], addr: int, data: bytes) -> list[Write]:
    """``writes_to`` in Python: what the C version must make (tests/test_layout.py)."""
    return [Write(n, addr, data) for n in nodes]


class NewObject:
    """An object being written by one operation: where it is, its first writes, and how many
    commit records it has had (records are numbered so that recovery can tell the newest when
    a crash left different ones on different replicas)."""
    __slots__ = ("ptr", "units", "seq", "nodes", "addr", "placed", "data", "writes",
                 "heads", "records")

    def __init__(self, ptr: int, units: int, seq: int, nodes: Sequence[int], addr: int,
                 placed: object, data: bytes, writes: list[Write],
                 heads: Sequence[tuple[int, bytes]]) -> None:
        self.ptr = ptr                  # node/address bits (no length)
        self.units = units
        self.seq = seq                  # allocation sequence: its slot value's generation
        self.nodes, self.addr = nodes, addr     # its copies as written, and its address
        #: the allocator's placement ``nodes`` were taken under (``Allocator.copies_of``):
        #: while it stands, they are where the object's later writes go too
        self.placed = placed
        self.data = data                # the object as written
        #: the object on every replica (with its write marks, and a list head at first)
        self.writes = writes
        self.heads = heads              # (address, word) of the list head it sets, if any
        self.records = 0

    @property
    def size(self) -> int:
        return len(self.data)


#: an object's bytes beyond its key and value (``layout.object_bytes``)
OBJECT_OVERHEAD: Final = OBJ_HEADER + LOG_BYTES


class ObjectLog:
    def __init__(self, alloc: Allocator, mmap_: MemoryMap, client_id: int,
                 meta_nodes: list[int], unit: int) -> None:
        self.alloc, self.unit = alloc, unit
        self.meta = mmap_.client_meta(client_id)
        self.meta_nodes = meta_nodes
        self.prev: dict[int, int] = {}
        self.seq: dict[int, int] = {}

    def units_for(self, key: bytes, value: bytes) -> int:
        """Size class of an object, or ValueTooLarge (checked before any verb)."""
        need = -(-(OBJECT_OVERHEAD + len(key) + len(value)) // self.unit)
        if need <= MAX_UNITS:           # (``size_class`` inline: every write asks)
            return CLASS_OF[need]
        largest = CLASSES[-1] * self.unit
        raise ValueTooLarge(
            f"a value of {len(value)} bytes is too large: with this {len(key)}-byte key a "
            f"value has at most {largest - object_bytes(len(key), 0)} bytes (objects are "
            f"at most {largest} bytes, header and log entry included)")

    def new_object(self, opcode: int, key: bytes, value: bytes, units: int) -> NewObject:
        """Allocate (after ``alloc.ensure(units)``) and encode an object with its log entry."""
        p, nxt = self.alloc.alloc(units)
        prev = self.prev.get(units, 0)     # (never 0 once set: it has the length bits)
        seq = self.seq.get(units, 0)
        data = encode_object(key, value, units * self.unit, opcode,
                             (units << LEN_SHIFT) | nxt, prev, seq)
        nodes, addr = self.alloc.replicas(p)
        writes = writes_to(nodes, addr, data)
        if self.alloc.marked[p >> NODE_SHIFT & NODE_MASK]:
            self._between_marks(writes)
        heads: Sequence[tuple[int, bytes]] = ()
        if not prev:                    # first object of this class: it heads the list
            heads = [(self.meta + META_HEADS + 8 * CLASSES.index(units),
                      pack_u64((units << LEN_SHIFT) | p))]
            writes += self._head_writes(heads)
        self.prev[units] = (units << LEN_SHIFT) | p
        self.seq[units] = seq + 1
        return NewObject(p, units, seq, nodes, addr, self.alloc.copies_of, data, writes, heads)

    def _between_marks(self, writes: list[Write]) -> None:
        """Put the first of ``writes`` (into an object on its home) between its write marks:
        an MN of the object's group is dead (``Allocator.marks``)."""
        before, after = self.alloc.marks(writes[0].node, writes[0].addr)
        writes[:1] = [before, writes[0], after]

    def rewrite(self, obj: NewObject) -> list[Write]:
        """The object's first writes again, to its replicas under the membership now (after
        a batch that carried them failed: they may have reached none). Those are the live
        ones of the time it was written, and an MN rebuilt since (``fusee.rebuild``)."""
        writes = writes_to(*self.alloc.replicas(obj.ptr), obj.data)
        if self.alloc.marked[obj.ptr >> NODE_SHIFT & NODE_MASK]:
            self._between_marks(writes)
        return writes + self._head_writes(obj.heads)

    def _head_writes(self, heads: Sequence[tuple[int, bytes]]) -> list[Write]:
        """The writes of list heads ``heads`` to every metadata replica."""
        return [Write(m, addr, word) for addr, word in heads for m in self.meta_nodes]

    def record(self, obj: NewObject, state: int, ref: int, old: int,
               old_crc: int = 0) -> list[Write]:
        """Writes of the commit record (COMMITTED / LOST / ABORTED) on every replica;
        ``old_crc`` names the instance of the object ``old`` points to."""
        obj.records += 1
        rec = commit_record(ref, old, state, old_crc, obj.records)
        off = len(obj.data) - LOG_BYTES + COMMIT_OFFSET
        # (the object's copies as written, unless a new membership moved them since)
        if obj.placed is self.alloc.copies_of:
            writes = writes_to(obj.nodes, obj.addr + off, rec)
        else:
            nodes, addr = self.alloc.replicas(obj.ptr)
            writes = writes_to(nodes, addr + off, rec)
        if self.alloc.marked[obj.ptr >> NODE_SHIFT & NODE_MASK]:
            self._between_marks(writes)
        return writes
