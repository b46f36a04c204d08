"""Consistency of the RACE index of a quiescent store (no operation, recovery, split or
failover in flight), with READs alone: the checks a test runs after a run with faults.

``check_index(config, membership)`` returns a list of problems (empty: consistent):

- every live directory replica holds the same entries (a split CASes them all, a failover
  merges them);
- entry ``e`` names subtable ``s`` at depth ``d`` only if ``e``'s low ``d`` bits are the
  suffix in ``s``'s bucket headers, which name ``s`` at depth ``d`` on every live replica and
  are not RETIRED (a client routed there would wait forever for a split nobody runs);
- every committed object a live subtable's primary names decodes, holds a key whose hash
  routes to that subtable and to the slot's bucket with the slot's fingerprint, and no key
  and no object is named by two slots.

The leak audit (``fusee.audit``) checks the objects' side: held, free, settled rounds.
"""

from __future__ import annotations

import struct

from fusee.config import ClusterConfig
from fusee.hashing import key_hash
from fusee.index import Directory, IndexGeometry, replica_nodes
from fusee.layout import (RETIRED, SLOTS_PER_BUCKET, committed_object, decode_object,
                          parse_header, slot_addr, slot_node, slot_units)
from fusee.membership import Membership
from fusee.verbs import Read, chunks


def check_index(config: ClusterConfig, membership: Membership = Membership()):
    """Generator: the problems found in the index (see the module docstring)."""
    geo = IndexGeometry.of(config.layout)
    n, unit = len(config.memnodes), config.layout.object_unit
    directory = Directory(geo, n, config.replicas, membership)
    problems: list[str] = []
    tables = yield [directory.read()._replace(node=m) for m in directory.replicas]
    if len(set(tables)) > 1:
        problems.append(f"the directory replicas on MNs {directory.replicas} differ")
    directory.load(tables[0])
    entries = directory.entries
    named: dict[int, tuple[int, int]] = {}          # subtable -> (depth, suffix)
    for e, word in enumerate(entries):
        sid, depth = word & 0xFFFFFFFF, (word >> 32) & 0xFF
        suffix = e & ((1 << depth) - 1)
        if named.setdefault(sid, (depth, suffix)) != (depth, suffix):
            problems.append(f"entry {e} names subtable {sid} at depth {depth}, suffix "
                            f"{suffix}; another entry names it at {named[sid]}")
    sids = sorted(named)
    reads = [Read(m, geo.subtable(sid), geo.subtable_bytes) for sid in sids
             for m in directory.nodes(sid)]
    bufs = []
    for batch in chunks(reads):
        bufs += yield batch
    words = iter(struct.unpack(f"<{geo.subtable_bytes // 8}Q", b) for b in bufs)
    slots: list[tuple[int, int, int]] = []          # (subtable, position, value) of objects
    for sid in sids:
        depth, suffix = named[sid]
        for m in directory.nodes(sid):
            img = next(words)
            headers = {parse_header(img[b * 8]) for b in range(geo.buckets)}
            if headers != {(sid, depth, suffix, 0)}:
                flags = [f"subtable {h[0]} depth {h[1]} suffix {h[2]}"
                         f"{' RETIRED' if h[3] & RETIRED else ''}" for h in sorted(headers)]
                problems.append(f"subtable {sid} (depth {depth}, suffix {suffix}) on MN {m} "
                                f"has the headers {flags}")
            if m == directory.nodes(sid)[0]:
                slots += [(sid, b * SLOTS_PER_BUCKET + s, img[b * 8 + 1 + s])
                          for b in range(geo.buckets) for s in range(SLOTS_PER_BUCKET)
                          if committed_object(img[b * 8 + 1 + s])]
    objs = []
    for batch in chunks([Read(membership.live(replica_nodes(slot_node(v), n, config.replicas))[0],
                              slot_addr(v, unit), slot_units(v) * unit) for _, _, v in slots]):
        objs += yield batch
    keys: dict[bytes, str] = {}
    pointers: dict[int, str] = {}
    for (sid, pos, v), buf in zip(slots, objs):
        where = f"slot {sid}:{pos} ({v:#x})"
        ptr = v & ((1 << 46) - 1)
        if ptr in pointers:
            problems.append(f"{where} names the object of {pointers[ptr]}")
        pointers[ptr] = where
        obj = decode_object(buf)
        if obj is None:
            problems.append(f"{where}: its object fails its checksum")
            continue
        h = key_hash(obj.key)
        if obj.key in keys:
            problems.append(f"key {obj.key!r} is in {keys[obj.key]} and in {where}")
        keys[obj.key] = where
        buckets = {f + i for m in h.mains(geo.mains)
                   for f in [geo.combined(sid, m)[1]] for i in (0, 1)}
        if (directory.lookup(h)[0] != sid or h.fp != v >> 56
                or pos // SLOTS_PER_BUCKET not in buckets):
            problems.append(f"{where}: its key {obj.key!r} does not belong there")
    return problems
