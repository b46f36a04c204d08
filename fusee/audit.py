"""Leak accounting over a quiescent store (no operation, recovery or split in flight), with
READs alone: every object any client ever carved must be reachable from the index or free.

``audit(config, cores)`` reads the directory and every live subtable on all its replicas, and
the holdings of every client id that owns blocks (``fusee.holdings.scan``), then checks:

- every object the index names (primary slots of live subtables) is an intact object that
  its owner counts as HELD (else it is *dangling*: memory the index still uses was freed);
- every HELD object is named by the index (else it is *leaked*: nobody will ever free it);
- every round is settled (backups equal the primary, no TENTATIVE claim, no FROZEN slot in
  a live subtable) and no block is owned outside a complete group;
- for the clients whose ``ClientCore`` is given (open, or closed but not crashed): no HELD
  object sits in their free lists, and every free object with a clear free bit is in them
  (freed objects are in the bitmap, for ``reclaim``), or parked for reuse once the frees the
  client still owes are settled (``ClientCore.releases``). Objects of a client without a
  core are free for its next holder (``fusee.holdings.adopt``).

Under a membership with dead MNs it reads the live replicas. Which membership is not a guess
the audit makes: without a master no MN is ever failed over, but a master may have failed one
over that still runs (it missed its lease on a loaded host), and such an MN holds what it held
when it died, which read as a replica looks like unsettled slots, dangling pointers and
blocks outside any group. So for a cluster with a master the caller passes the master's
membership (``fusee.emulator.cluster.LocalCluster.audit`` does), and the report says the
epoch it audited and the MNs it read.

A free delivered to the bitmap of a dead MN is lost with it, so a HELD object named by no
slot in a group whose first MN is dead, or died and was rebuilt since (``Membership.rebuilt``),
is *stranded*, not leaked: counted, listed, and no failure (nothing can reclaim it without
knowing that nobody still owes its free). So is the owner's taking it back (its used byte
zeroed on the home copy alone, ``Allocator.reclaim``): such an object in its owner's free
lists is not misplaced.

Memory alone cannot tell such an object from one that nobody ever freed (a real leak hid as
stranded that way). A caller that knows which frees reached the dead MNs passes ``excuse``:
called for each object that would be stranded (``fusee.holdings.Carved``), it returns why it
is (a free or a reclaim of it reached a home that died since), or None, and then the object
is *leaked*, unless a client given in ``cores`` sent its free and got no answer (it still
owes it: ``ClientCore.unsure``). The simulator's runs pass one
(``fusee.emulator.testkit.lost_frees``); a real cluster's audit (``LocalCluster.audit``)
cannot, and counts them stranded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusee.operations import ClientCore

import struct
from dataclasses import dataclass, field

from fusee.allocation import Allocator
from fusee.config import ClusterConfig
from fusee.hashing import key_hash
from fusee.holdings import Carved, Holdings, scan
from fusee.index import Directory, IndexGeometry
from fusee.membership import Membership
from fusee.layout import (ADDR_MASK, FROZEN, GEN_MASK, NODE_MASK, NODE_SHIFT, SLOTS_PER_BUCKET,
                          TENTATIVE, committed_object, slot_gen, slot_units)
from fusee.memory_map import MemoryMap
from fusee.verbs import Op, Read, chunks

_PTR = NODE_MASK << NODE_SHIFT | ADDR_MASK     # node and address bits of a slot value
#: why an object the audit would count stranded is, or None: it is leaked (module docstring)
Excuse = Callable[[Carved], str | None]


@dataclass
class AuditReport:
    objects: int = 0                # objects carved, all clients
    referenced: int = 0             # slots naming an object
    held: int = 0
    free: int = 0
    leaked: list[str] = field(default_factory=list)
    dangling: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)  # a client's free lists disagree
    stranded: list[str] = field(default_factory=list)   # its free went to a dead MN
    epoch: int = 0                  # the membership audited under
    read: tuple[int, ...] = ()      # the MNs read: that membership's live ones
    dead: tuple[int, ...] = ()      # the MNs not read: dead in it
    #: MN -> what the caller knows it reached (its segment, its process): says which memory
    #: a failed audit read, should an MN not be the one the caller meant
    identities: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.leaked or self.dangling or self.unsettled or self.misplaced)

    def explain(self) -> str:
        read = ", ".join(f"{m}" + (f" ({self.identities[m]})" if m in self.identities else "")
                         for m in self.read)
        lines = [f"epoch {self.epoch}: read MNs {read}" +
                 (f"; not MNs {', '.join(map(str, self.dead))} (dead)" if self.dead else ""),
                 f"{self.objects} objects: {self.held} held, {self.free} free; "
                 f"{self.referenced} referenced by the index"]
        for name in ("leaked", "dangling", "unsettled", "misplaced", "stranded"):
            items = getattr(self, name)
            if items:
                lines.append(f"{name} ({len(items)}):")
                lines += [f"  {x}" for x in items[:20]]
        return "\n".join(lines)


def audit(config: ClusterConfig, cores: Iterable[ClientCore] = (),
          membership: Membership | None = None,
          excuse: Excuse | None = None) -> Op[AuditReport]:
    """Generator: the AuditReport of the store (see the module docstring); ``cores`` are the
    ClientCores of the clients that did not crash. ``membership``: the master's, required
    when the cluster has one (None: no MN was ever failed over). ``excuse``: why an object
    the audit would count stranded is (None: it is leaked), see the module docstring."""
    if membership is None:
        if config.master is not None:
            raise ValueError("this cluster has a master: audit it under the master's "
                             "membership (its status's 'membership'), or an MN it failed "
                             "over is read as a replica")
        membership = Membership()
    layout = config.layout
    mmap_, geo = MemoryMap.of(layout), IndexGeometry.of(layout)
    n, r = len(config.memnodes), config.replicas
    rep = AuditReport(epoch=membership.epoch, dead=tuple(sorted(membership.dead)),
                      read=tuple(m.id for m in config.memnodes if m.id not in membership.dead))
    directory = Directory(geo, n, r, membership)
    (buf,) = yield [directory.read()]
    directory.load(buf)
    sids = sorted({e & 0xFFFFFFFF for e in directory.entries})
    read: list[bytes] = []
    for batch in chunks([Read(m, geo.subtable(sid), geo.subtable_bytes) for sid in sids
                         for m in directory.nodes(sid)]):
        read += yield batch
    bufs = iter(read)
    named: dict[int, int] = {}                  # object pointer -> slot value
    for sid in sids:
        copies = [struct.unpack(f"<{geo.subtable_bytes // 8}Q", next(bufs))
                  for _ in directory.nodes(sid)]
        for b in range(geo.buckets):
            for s in range(SLOTS_PER_BUCKET):
                w = b * 8 + 1 + s
                v = copies[0][w]
                where = f"slot {sid}:{b * SLOTS_PER_BUCKET + s}"
                if v & (FROZEN | TENTATIVE) or any(c[w] != v for c in copies[1:]):
                    rep.unsettled.append(f"{where}: {[hex(c[w]) for c in copies]}")
                if committed_object(v):
                    if v & _PTR in named:
                        rep.dangling.append(f"{where}: {v:#x} is named twice")
                    named[v & _PTR] = v
    rep.referenced = len(named)
    tables = yield [Read(m, mmap_.table, 8 * mmap_.num_blocks) for m in range(n)
                    if m not in membership.dead]
    owners = sorted({w - 1 for buf in tables
                     for w in struct.unpack(f"<{mmap_.num_blocks}Q", buf) if w})
    given = list(cores)
    by_id = {core.client_id: core for core in given}
    if excuse is not None:
        excuse = _or_owed(excuse, given)
    seen: set[int] = set()
    for cid in owners:
        alloc = Allocator(mmap_, layout.object_unit, n, r, cid, directory.replicas, membership)
        found = yield from scan(alloc)
        _client(rep, found, named, by_id.get(cid), seen, membership.dead | membership.rebuilt,
                excuse)
    for p, v in named.items():
        if p not in seen:
            rep.dangling.append(f"{v:#x}: names no object")
    return rep


def _client(rep: AuditReport, found: Holdings, named: dict[int, int], core: ClientCore | None,
            seen: set[int], dead: frozenset[int],
            excuse: Excuse | None) -> None:
    cid = found.client_id
    for node, addr in found.orphans:
        rep.unsettled.append(f"client {cid}: block {node}:{addr:#x} outside any group")
    free_lists: set[int] = set()
    if core is not None:
        alloc = core.alloc
        free_lists = {p for q in alloc.free.values() for p in q} | set(alloc.pending.values())
        if core.unsure or core.deferred:
            # DELETE records parked until the free their log entry records is settled
            # (``OwedRoundTrip.owed_failed``): a close met with a free unanswered leaves
            # them there, and the id IN_USE for settling, which adopts them
            free_lists.update(core.releases)
    for c in found.objects:
        rep.objects += 1
        v = named.get(c.ptr)
        what = f"client {cid} object {c.ptr:#x} ({c.units} units)"
        if v is not None:
            seen.add(c.ptr)
            if not c.held:
                rep.dangling.append(f"{what}: named by the index but free "
                                    f"(state {None if c.view is None else c.view.state}, "
                                    f"freed {c.freed})")
            else:
                assert c.view is not None, what     # held: a committed object
                if (slot_units(v) != c.units or key_hash(c.view.key).fp != v >> 56
                        or slot_gen(v) != c.view.seq & GEN_MASK):
                    rep.dangling.append(f"{what}: the slot {v:#x} does not describe it")
        if c.held:
            assert c.view is not None, what
            rep.held += 1
            if v is None:
                lost_with_home, why = _lost_with_home(c, dead, excuse)
                (rep.stranded if lost_with_home else rep.leaked).append(
                    f"{what}: held (committed {c.view.key!r}) but named by no slot{why}")
                if c.ptr in free_lists and not lost_with_home:
                    rep.misplaced.append(f"{what}: held, yet in its owner's free lists")
            elif c.ptr in free_lists:
                rep.misplaced.append(f"{what}: held, yet in its owner's free lists")
        else:
            rep.free += 1
            if core is not None and not c.freed and c.ptr not in free_lists:
                # a reclaim zeroes used on every copy; if the home died under its batch,
                # its clear of the bit is unknown and the owner never reuses the object:
                # taken along by the dead home, as a free sent there is
                lost, why = _lost_with_home(c, dead, excuse)
                (rep.stranded if lost else rep.misplaced).append(
                    f"{what}: free, yet neither in its owner's free lists nor in its bitmap{why}")


def _or_owed(excuse: Excuse, cores: list[ClientCore]) -> Excuse:
    """``excuse``, or else: a client of ``cores`` sent the object's free and got no answer
    (``unsure``): it may have taken effect on the MN that died, and the client still owes
    it (settling tells whether it did, ``fusee.settle``)."""
    owed = {p & _PTR: (core.client_id, node) for core in cores for p, node, _ in core.unsure}

    def either(c: Carved) -> str | None:
        why = excuse(c)
        if why is None and c.ptr in owed:
            cid, node = owed[c.ptr]
            why = (f"client {cid} sent its free to MN {node}, got no answer, and still owes "
                   "it: settling tells whether it took effect")
        return why
    return either


def _lost_with_home(c: Carved, dead: frozenset[int], excuse: Excuse | None
                    ) -> tuple[bool, str]:
    """Whether ``c``, held and named by no slot (or free and in no free list), went with its
    dead home (stranded), and the words that say why (see the module docstring)."""
    home = c.group.nodes[0]
    if home not in dead:
        return False, ""
    if excuse is None:
        return True, f" (its home MN {home} died: its free may have gone with it)"
    why = excuse(c)
    if why is None:
        return False, (f"; its home MN {home} died, but no free or reclaim of it reached a "
                       "dead MN, and no client owes its free (the caller's record)")
    return True, f" ({why})"
