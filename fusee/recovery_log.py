"""The crashed client's log, as recovery reads it (``fusee.recovery``, step 2): one entry per
object the id carved, its newest commit record among the replicas' copies, and the writes that
give an entry a new record on every live replica.

A crash may leave a replica with an older object at the same place, or a newer one not yet
everywhere: only the copies of the instance the primary holds (same crc) count, and of those the
newest record wins (records are numbered; a torn write leaves two numbers one apart). An entry
whose copies disagree is rewritten (``LogEntry.rewrite``), so that the next holder of the id,
which reads the primary copy, reads the same story as every replica.

Design: docs/design.md#client-crash-recovery.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from fusee.hashing import key_hash
from fusee.holdings import Carved, Holdings
from fusee.layout import (COMMIT_OFFSET, DELETE, INSERT, LOG_BYTES, UPDATE, ObjectView,
                          commit_record, make_slot, unpack_u64)
from fusee.verbs import Write


@dataclass
class LogEntry:
    """One object of the crashed client with its newest log entry."""
    c: Carved
    v: ObjectView
    s: int | None                   # its slot value (INSERT / UPDATE proposals)
    tomb: int | None = None         # the tombstone a DELETE proposes (its record holds it)
    linearized: bool = False        # the operation took effect
    found_at: tuple[int, int] | None = None     # the slot holding its value, when found
    lost: bool = False              # a round it joined was won by another writer
    synced: bool = True             # every replica holds the newest commit record

    @property
    def ref(self) -> tuple[int, int]:
        return self.v.slot_ref >> 32, self.v.slot_ref & 0xFFFFFFFF

    def mark(self, state: int, ref: int, old: int, old_crc: int, unit: int,
             dead: Container[int]) -> list[Write]:
        """Writes of a new commit record (numbered after the newest) on every live replica."""
        number = (self.v.number + 1) & 0xFF
        self.v = self.v._replace(state=state, slot_ref=ref, old_value=old, old_crc=old_crc,
                                 number=number)
        return self._writes(commit_record(ref, old, state, old_crc, number), unit, dead)

    def rewrite(self, unit: int, dead: Container[int]) -> list[Write]:
        """Writes of the newest commit record again on every live replica."""
        v = self.v
        return self._writes(commit_record(v.slot_ref, v.old_value, v.state, v.old_crc, v.number),
                            unit, dead)

    def _writes(self, rec: bytes, unit: int, dead: Container[int]) -> list[Write]:
        c = self.c
        off = c.offset + c.units * unit - LOG_BYTES + COMMIT_OFFSET
        self.synced = True
        return [Write(n, a + off, rec) for n, a in zip(c.group.nodes, c.group.addrs)
                if n not in dead]


def log_entries(found: Holdings, unit: int) -> list[LogEntry]:
    """The entries of the objects ``found`` in the id's blocks (read with their copies)."""
    entries = []
    for c in found.objects:
        views = [v for v in c.copies if v is not None and v.crc == c.crc]
        if not views:
            continue
        v = _newest(views)
        s = None
        if v.opcode in (INSERT, UPDATE):
            s = make_slot(key_hash(v.key).fp, c.units, c.group.nodes[0],
                          c.group.addrs[0] + c.offset, unit, v.seq)
        e = LogEntry(c, v, s)
        if v.opcode == DELETE and len(v.value) == 8:
            e.tomb = unpack_u64(v.value)
        e.synced = len(views) == len(c.copies) and all(_record(x) == _record(v) for x in views)
        entries.append(e)
    return entries


def _record(v: ObjectView) -> tuple[int, int, int, int, int]:
    return v.state, v.number, v.slot_ref, v.old_value, v.old_crc


def _newest(views: list[ObjectView]) -> ObjectView:
    """The copy with the newest commit record (numbers differ by one after a torn write)."""
    best = views[0]
    for v in views[1:]:
        if (v.number - best.number) % 256 == 1 or (best.number == 0 and v.number):
            best = v
    return best
