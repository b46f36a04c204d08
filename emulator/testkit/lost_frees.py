"""What the leak audit cannot tell from memory alone, told by the simulator: did a free of an
object reach an MN that died since?

A free sets a bit in the bitmap of the object's home (``Allocator.free_request``), and a
reclaim zeroes the object's used byte there before it clears the bit (``Allocator.reclaim``).
When that home dies, or dies and is rebuilt, its bitmap goes with it, so the audit
(``fusee.audit``) finds the object held (or, reclaimed on the live copies, free but in no
free list) and named by no slot, and cannot tell "its free went to the dead home" from
"nobody ever freed it": it counts the object *stranded*, not leaked. A real leak hid that way
(tests/regression_windows.py: recovery-withdrawal-cut-short, seed 2335 of the failover sweep).

The simulator's memory keeps every dead MN's region as it died (``LocalMemory.dead_regions``:
no verb reaches a crashed MN, so a verb in flight at the crash either took effect there first
or never did), and an MN the master failed over while it ran (a run that ended before its
crash: the master catches up) holds what reached it. ``lost_frees(memory, membership)`` is
the audit's ``excuse``: an object it would count stranded is excused only if one of those
regions holds the same object (same crc: the same allocation, not an earlier use of that
memory) with its free bit set or its used byte zeroed there; otherwise the audit reports it
leaked, unless a client still owes its free: sent to an MN that died, unanswered, so it may
have taken effect, and settling must tell (``fusee.audit``). Otherwise a free sent to a dead
MN that never took effect is no excuse: its sender sends it again to the next home
(``ClientCore.place``), or leaves it to recovery, which must tell.
"""

from __future__ import annotations

from fusee.audit import Excuse
from fusee.holdings import Carved
from fusee.layout import BLOCK_HEADER, TAIL_BYTES, object_tail
from fusee.membership import Membership
from fusee.transports.local import LocalMemory


def lost_frees(memory: LocalMemory, membership: Membership) -> Excuse:
    """The audit's ``excuse`` for a run over ``memory`` audited under ``membership``: for an
    object the audit would count stranded, where a free (or a reclaim) of it reached an MN
    that died since (or that ``membership`` failed over while it ran: what it holds is lost
    to the store all the same), or None: it reached none."""
    unit = memory.config.layout.object_unit
    dead = [(f"crash {i}", node, region) for i, (node, region) in enumerate(memory.dead_regions)]
    dead += [("failed over, running", node, memory.regions[node])
             for node in sorted(membership.dead - memory.crashed)]

    def excuse(c: Carved) -> str | None:
        size = c.units * unit
        bit = c.offset // unit
        for how, node, region in dead:
            if node not in c.group.nodes:
                continue
            block = c.group.addrs[c.group.nodes.index(node)]
            at = block + c.offset
            crc, used = object_tail(region.read(at + size - TAIL_BYTES, TAIL_BYTES,
                                                region.rkey))
            if crc != c.crc:
                continue            # not this object there: another use of the memory, or none
            word = int.from_bytes(region.read(block + BLOCK_HEADER + bit // 64 * 8, 8,
                                              region.rkey), "little")
            if word >> bit % 64 & 1:
                return f"its free reached MN {node}, lost with it ({how})"
            if used == 0:
                return f"its owner's reclaim reached MN {node}, lost with it ({how})"
        return None
    return excuse
