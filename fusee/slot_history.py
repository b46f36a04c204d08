"""Who moved a slot off a value: walking back through the commit records of the objects
that held the slot since (recovery's question when a committed write's round may have been
closed unseen by the failover of its backups, ``fusee.recovery``). Each writer's commit record
names the value it replaced and that object's crc, so the chain of occupants is on the MNs."""

from __future__ import annotations

from fusee.hashing import key_hash
from fusee.layout import (COMMITTED, DELETE, FROZEN, committed_object, decode_object, make_slot,
                          slot_addr, slot_node, slot_units)
from fusee.operations import ClientCore
from fusee.recovery_log import LogEntry
from fusee.verbs import Op

#: how many objects back from the slot's value ``moved_on_by_us`` reads at most
_WALK = 8


def moved_on_by_us(core: ClientCore, e: LogEntry, p: int) -> Op[bool | None]:
    """Generator: did committed ``e``'s primary CAS take its slot off the value it
    replaced (``old``), now that the slot holds ``p``? None: unknown.

    Where the slot always had a backup, only the round's winner moves the primary off
    ``old`` while the round's epoch lasts, and a failover that ends it records a
    proposal it takes off a live backup (``Membership.dropped``). But a failover of the
    backups alone, the primary alive, sees no proposal: the round is closed as though
    it never was (the primary keeps ``old``), unrecorded, and in the next epoch another
    writer may replace ``old`` itself, and owes its free. Each writer's commit record
    names the value it replaced (and that object's crc), so walking back from ``p``
    through the objects that held the slot tells who replaced ``old``: reaching our
    proposal says it was us, reaching ``old`` another writer. The walk stops, unknown,
    at a value that names no object (another client's tombstone), an object reused
    since (it does not make the slot value it is read by, or not the crc its successor
    recorded), a record not committed, or after ``_WALK`` objects."""
    ours, old = e.tomb if e.v.opcode == DELETE else e.s, e.v.old_value
    v, crc = p & ~FROZEN, None          # (frozen by a split: the same occupant)
    for _ in range(_WALK):
        if v == ours and (crc is None or e.v.opcode == DELETE or crc == e.c.crc):
            return True
        if v == old:
            return False if crc == e.v.old_crc else None
        if not committed_object(v):
            return None
        (buf,) = yield from core.rt([core.object_read(v)])
        o = decode_object(buf)
        if o is None or o.state != COMMITTED or crc not in (None, o.crc) or v != make_slot(
                key_hash(o.key).fp, slot_units(v), slot_node(v), slot_addr(v, core.unit),
                core.unit, o.seq):
            return None
        v, crc = o.old_value, o.old_crc
    return None
