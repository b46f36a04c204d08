"""The four operations, sans-IO (SPEC §5): ``ClientCore`` holds one client's state and hands
out operation generators that yield batches of ``fusee.verbs`` requests, receive their
completions and return the result. Anything with ``execute(batch)`` can drive them
(``fusee.driver.run``), and a simulator can interleave the verbs of many clients.

Round trips with r >= 2 and no contention (the first batch of each operation also carries the
new object's writes and any deferred frees / log marks of earlier operations):

    SEARCH  buckets (+ cached object) | candidate objects                       1-2
    INSERT  buckets + object | backup CASes + claim check | commit | primary     4
    UPDATE  buckets + object | (candidate objects) | backup CASes | fix + commit | primary  4-5
    DELETE  like UPDATE; proposes a fresh tombstone, its record object holds the log entry  4-5

Requests for one MN within one batch must execute in posting order (as on an RC queue pair):
the insert's claim check reads a backup right after CASing it.

An UPDATE or DELETE with a cached slot also reads the cached object's last 8 bytes with the
buckets: its commit record names that object's crc, which is how recovery tells the object it
replaced from a later one in reused memory. A client id is IN_USE from ``open`` to ``close``
(which delivers the deferred frees, then marks it CLEAN); ``open`` adopts what an id left
CLEAN holds (``fusee.holdings``) and refuses one left IN_USE (NeedsRecovery: see
``fusee.recovery``). Waits on other clients are bounded by ``patience`` re-reads (Stalled).
"""

from __future__ import annotations

from fusee import insert as insert_mod
from fusee.allocation import Allocator
from fusee.cache import IndexCache
from fusee.config import ClusterConfig
from fusee.errors import (ClientLimit, CorruptObject, KeyExists, KeyNotFound, NeedsRecovery,
                          Stalled, StoreFormatError, check_key, check_value)
from fusee.hashing import KeyHash, key_hash
from fusee.index import HDR_MAGIC, INDEX_MAGIC, Directory, IndexGeometry, View
from fusee.holdings import adopt
from fusee.layout import (ABORTED, CLEAN, COMMITTED, DELETE, IN_USE, LOST, MAX_CLIENT_IDS,
                          META_GROUPS, META_INCARNATION, META_MAGIC, META_MAGIC_OFF, META_STATE,
                          NO_SLOT, TAIL_BYTES, UPDATE, decode_object, free_value, make_slot,
                          object_tail, pack_u64, slot_addr, slot_node, slot_ref, slot_units,
                          unpack_u64)
from fusee.log import NewObject, ObjectLog
from fusee.memory_map import HEADER_CLIENT_IDS, HEADER_LAYOUT, MemoryMap
from fusee.replication import (LOSE, RESTART, WIN, SlotTarget, await_change, cas_primary,
                               fix_requests, propose, resolve)
from fusee.verbs import Faa, Read, Write


#: re-reads an operation spends waiting on another client before it raises Stalled: seconds
#: on the fast backends, far longer than a live client takes to finish a round or a split
PATIENCE = 200_000


def draw_client_id(config: ClusterConfig):
    """Generator: a cluster-unique client id, by FAA on MN 0's client-id counter."""
    (cid,) = yield [Faa(0, HEADER_CLIENT_IDS, 1)]
    if cid >= config.layout.max_clients:
        raise ClientLimit(f"all {config.layout.max_clients} client ids are taken")
    return cid


class ClientCore:
    def __init__(self, config: ClusterConfig, client_id: int, cache_capacity: int = 65536,
                 patience: int = PATIENCE):
        if type(client_id) is not int:
            raise TypeError("client_id must be an int")
        self.config, self.layout = config, config.layout
        self.map = MemoryMap.of(self.layout)
        self.map.client_meta(client_id)             # range check
        if client_id >= MAX_CLIENT_IDS:
            raise ValueError(f"client ids must be below {MAX_CLIENT_IDS}")
        self.geo = IndexGeometry.of(self.layout)
        self.client_id = client_id
        self.n, self.r = len(config.memnodes), config.replicas
        self.unit = self.layout.object_unit
        self.dir = Directory(self.geo, self.n, self.r)
        self.meta_nodes = self.dir.replicas
        self.alloc = Allocator(self.map, self.unit, self.n, self.r, client_id, self.meta_nodes)
        self.log = ObjectLog(self.alloc, self.map, client_id, self.meta_nodes, self.unit)
        self.cache = IndexCache(cache_capacity)
        self.counters = {"retries": 0, "lost": 0, "splits": 0}
        self.deferred: list = []        # frees riding on the next batch
        self.releases: list[int] = []   # objects of ours to reuse once ``deferred`` is sent
        self.free_seq = 0               # set by open() from the client's incarnation
        if type(patience) is not int or patience < 1:
            raise ValueError("patience must be a positive int")
        self.patience = patience

    # -- public operations (each returns a generator) --------------------------------------
    def open(self):
        return self._open()

    def close(self):
        """Generator: send what is deferred, then mark the id CLEAN: nothing of it is in
        flight, so a later client may take it over (``fusee.holdings.adopt``)."""
        return self._close()

    def search(self, key):
        key = check_key(key, self.layout.max_key_size)
        return self._search(key, key_hash(key))

    def insert(self, key, value):
        key, value = check_key(key, self.layout.max_key_size), check_value(value)
        self.log.units_for(key, value)
        return insert_mod.insert(self, key, value)

    def update(self, key, value):
        key, value = check_key(key, self.layout.max_key_size), check_value(value)
        self.log.units_for(key, value)
        return self._replace(key, value, UPDATE)

    def delete(self, key):
        key = check_key(key, self.layout.max_key_size)
        return self._replace(key, b"", DELETE)

    def put(self, key, value):
        key, value = check_key(key, self.layout.max_key_size), check_value(value)
        self.log.units_for(key, value)
        return self._put(key, value)

    @property
    def stats(self) -> dict:
        c = self.cache
        return dict(self.counters, cache_hits=c.hits, cache_misses=c.misses,
                    cache_bypassed=c.bypassed, **self.alloc.stats)

    # -- plumbing --------------------------------------------------------------------------
    def rt(self, reqs: list):
        """Generator: one round trip for ``reqs`` plus whatever was deferred."""
        extra, self.deferred = self.deferred, []
        if not extra:
            return (yield reqs)
        released, self.releases = self.releases, []
        res = yield list(reqs) + extra
        for p in released:      # the frees their log entries owe are delivered: reuse them
            self.alloc.release(p)
        return res[:len(reqs)]

    def _open(self):
        """Take the id: a fresh one gets its first block group; one a client left CLEAN
        (closed, or recovered) is adopted with everything its blocks hold; one left IN_USE
        needs recovery first (NeedsRecovery)."""
        g = self.geo
        meta = self.map.client_meta(self.client_id)
        res = yield [self.dir.read(), Read(0, g.header_word(HDR_MAGIC), 8),
                     Read(0, HEADER_LAYOUT, 8), Faa(0, meta + META_INCARNATION, 1),
                     Read(0, meta + META_STATE, 8), Read(0, meta + META_GROUPS, 8)] + [
                     Write(m, meta + off, pack_u64(v)) for m in self.meta_nodes
                     for off, v in ((META_MAGIC_OFF, META_MAGIC), (META_STATE, IN_USE))]
        if unpack_u64(res[2]) != self.map.fingerprint or unpack_u64(res[1]) != INDEX_MAGIC:
            raise StoreFormatError("the memory nodes were formatted for another layout")
        if unpack_u64(res[4]) != CLEAN:
            raise NeedsRecovery(f"client id {self.client_id} was not closed cleanly: recover "
                                f"it first (Client(..., recover=True) or the master)")
        self.dir.load(res[0])
        # each incarnation of this client id draws free values from its own range
        self.free_seq = res[3] << 28
        if unpack_u64(res[5]):
            yield from adopt(self.alloc, self.log)
        if self.alloc.current is None:
            yield from self.alloc.grow()

    def _flush(self):
        if self.deferred:
            yield from self.rt([])

    def _close(self):
        yield from self._flush()            # frees first: CLEAN says nothing is owed
        meta = self.map.client_meta(self.client_id)
        yield from self.rt([Write(m, meta + META_STATE, pack_u64(CLEAN))
                            for m in self.meta_nodes])

    def waited(self, n: int, what: str) -> int:
        """Count one more re-read spent waiting on another client's write, claim or split:
        Stalled once ``patience`` of them went by (that client probably crashed)."""
        n += 1
        if n >= self.patience:
            raise Stalled(f"{what}: nothing changed in {n} re-reads (a crashed client? it "
                          f"waits for recovery)")
        return n

    def refresh(self):
        """Generator: re-read the directory (a FROZEN slot said ours is stale)."""
        (buf,) = yield from self.rt([self.dir.read()])
        self.dir.load(buf)

    def retry(self):
        self.counters["retries"] += 1

    def bucket_reads(self, sid: int, h: KeyHash, node: int):
        return self.dir.bucket_reads(sid, h, node)

    def view(self, bufs, firsts, sid: int) -> View:
        return View(bufs[:2], firsts, sid)

    def target(self, sid: int, pos: int) -> SlotTarget:
        return SlotTarget(sid, pos, tuple(self.dir.nodes(sid)), self.geo.slot_addr(sid, pos))

    def object_read(self, v: int) -> Read:
        return Read(slot_node(v), slot_addr(v, self.unit), slot_units(v) * self.unit)

    def candidates(self, view: View, h: KeyHash) -> list[tuple[int, int]]:
        return view.candidates(h.fp)

    def match(self, key: bytes, cands, bufs, suspects: dict):
        """Find the key among candidate objects: (pos, value, object) or None. A candidate
        that fails to verify is counted in ``suspects``; seen twice with the same slot value
        (so not a concurrent replacement) it is reported as CorruptObject."""
        bad = False
        for (pos, v), buf in zip(cands, bufs):
            obj = decode_object(buf)
            if obj is None:
                suspects[v] = suspects.get(v, 0) + 1
                if suspects[v] >= 2:
                    raise CorruptObject(f"object at MN {slot_node(v)} "
                                        f"{slot_addr(v, self.unit):#x} fails its checksum")
                bad = True
            elif obj.key == key:
                return (pos, v, obj), False
        return None, bad

    def defer_free(self, v: int, then_release: int | None = None) -> None:
        """Free ``v``'s object with the next batch; ``then_release`` (an object of ours whose
        log entry records that free) is reused only once that batch is through."""
        self.deferred.append(self.alloc.free_request(v))
        if then_release is not None:
            self.releases.append(then_release)

    def new_object(self, opcode: int, key: bytes, value: bytes):
        """Generator: allocate and encode an object (getting memory first if needed)."""
        units = self.log.units_for(key, value)
        if self.deferred and not self.alloc.ready(units):
            # deliver the frees our log entries owe before reclaim may reuse those entries
            yield from self._flush()
        yield from self.alloc.ensure(units)
        return self.log.new_object(opcode, key, value, units)

    def abandon(self, obj: NewObject):
        """Generator: an operation ends in an error without having proposed its object:
        mark the log entry ABORTED (so recovery never redoes it) and reuse the memory."""
        yield from self.rt(self.log.record(obj, ABORTED, NO_SLOT, 0))
        self.alloc.release(obj.ptr)

    def slot_value(self, h: KeyHash, obj: NewObject) -> int:
        node, addr = obj.replicas[0]
        return make_slot(h.fp, obj.units, node, addr, self.unit)

    def free_value(self) -> int:
        """A fresh tombstone / void value of this client (SNAPSHOT proposals are distinct)."""
        self.free_seq += 1
        return free_value(self.client_id, self.free_seq)

    # -- SEARCH ----------------------------------------------------------------------------
    def _search(self, key: bytes, h: KeyHash):
        suspects: dict[int, int] = {}
        waits = 0
        while True:
            sid, _ = self.dir.lookup(h)
            reads, firsts = self.bucket_reads(sid, h, self.dir.nodes(sid)[0])
            e = self.cache.get(key)
            if e is not None and e.sid != sid:
                self.cache.drop(key)
                e = None
            spec = e is not None and self.cache.use(e)
            res = yield from self.rt(reads + ([self.object_read(e.value)] if spec else []))
            view = View(res[:2], firsts, sid)
            if view.stale:
                waits = self.waited(waits, f"subtable {sid} is being split")
                self.retry()
                yield from self.refresh()
                continue
            if e is not None:
                hit = view.get(e.pos) == e.value
                if spec and hit:
                    obj = decode_object(res[2])
                    if obj is not None and obj.key == key:
                        self.cache.outcome(e, True)
                        return obj.value
                    hit = False
                self.cache.outcome(e, hit)
            cands = self.candidates(view, h)
            if not cands:
                return None
            bufs = yield from self.rt([self.object_read(v) for _, v in cands])
            found, bad = self.match(key, cands, bufs, suspects)
            if found is not None:
                pos, v, obj = found
                self.cache.store(key, sid, pos, v)
                return obj.value
            if not bad:
                return None
            self.retry()

    # -- UPDATE / DELETE -------------------------------------------------------------------
    def _locate(self, key: bytes, h: KeyHash, writes: list):
        """Generator: find the key's slot. Returns (sid, pos, value, crc of the object the
        value names) or None (absent), after one bucket read that also carries ``writes``
        (and, with a cached slot, the cached object's last bytes); follows splits."""
        suspects: dict[int, int] = {}
        waits = 0
        while True:
            sid, _ = self.dir.lookup(h)
            reads, firsts = self.bucket_reads(sid, h, self.dir.nodes(sid)[0])
            e = self.cache.get(key)
            if e is not None and e.sid == sid:
                v = e.value
                reads.append(Read(slot_node(v), slot_addr(v, self.unit) + slot_units(v) *
                                  self.unit - TAIL_BYTES, TAIL_BYTES))
            res = yield from self.rt(reads + writes)
            writes = []
            view = View(res[:2], firsts, sid)
            if view.stale:
                waits = self.waited(waits, f"subtable {sid} is being split")
                self.retry()
                yield from self.refresh()
                continue
            if e is not None and e.sid == sid:
                hit = view.get(e.pos) == e.value
                self.cache.outcome(e, hit)
                if hit:
                    return sid, e.pos, e.value, object_tail(res[2])[0]
            cands = self.candidates(view, h)
            if not cands:
                return None
            bufs = yield from self.rt([self.object_read(v) for _, v in cands])
            found, bad = self.match(key, cands, bufs, suspects)
            if found is not None:
                return sid, found[0], found[1], found[2].crc
            if not bad:
                return None
            self.retry()

    def _replace(self, key: bytes, value: bytes, opcode: int):
        """UPDATE (new object) or DELETE (tombstone naming a record object) of a present key."""
        obj = yield from self.new_object(opcode, key, value)
        try:
            return (yield from self._replace_with(obj, key, opcode))
        except Stalled:
            yield from self.abandon(obj)        # no round of ours is left open: give it back
            raise

    def _replace_with(self, obj: NewObject, key: bytes, opcode: int):
        h = key_hash(key)
        writes = obj.writes
        while True:
            try:
                found = yield from self._locate(key, h, writes)
            except CorruptObject:
                yield from self.abandon(obj)
                raise
            writes = []
            if found is None:
                yield from self.abandon(obj)
                raise KeyNotFound(key)
            sid, pos, v_old, old_crc = found
            v_new = self.slot_value(h, obj) if opcode == UPDATE else self.free_value()
            t = self.target(sid, pos)
            ref = slot_ref(sid, pos)
            current = []
            if t.backups:
                current, _ = yield from propose(t, v_old, v_new)
            verdict = yield from resolve(t, v_old, v_new, current)
            if verdict == WIN:
                yield from self.rt(fix_requests(t, current, v_new) +
                                   self.log.record(obj, COMMITTED, ref, v_old, old_crc))
                verdict, _ = yield from cas_primary(t, v_old, v_new)
                if verdict == WIN:
                    if opcode == UPDATE:
                        self.defer_free(v_old)
                        self.cache.store(key, sid, pos, v_new)
                    else:
                        self.defer_free(v_old, then_release=obj.ptr)
                        self.cache.drop(key)
                    return None
            elif verdict == LOSE:
                self.counters["lost"] += 1
                verdict = yield from await_change(t, v_old,
                                                  self.log.record(obj, LOST, ref, v_old),
                                                  self.patience)
                if verdict == LOSE and opcode == UPDATE:
                    # overwritten by the round's winner: linearized just before it
                    self.cache.drop(key)
                    self.alloc.release(obj.ptr)
                    return None
                # a DELETE that lost must look again: the winner may have been an UPDATE
            self.retry()
            if verdict == RESTART:
                yield from self.refresh()

    def _put(self, key: bytes, value: bytes):
        while True:
            try:
                return (yield from self._replace(key, value, UPDATE))
            except KeyNotFound:
                pass
            try:
                return (yield from insert_mod.insert(self, key, value))
            except KeyExists:
                self.retry()
