"""The four operations, sans-IO: ``ClientCore`` holds one client's state and its round
machinery, and hands out operation generators that yield batches of ``fusee.verbs`` requests,
receive their completions and return the result. Anything with ``execute(batch)`` can drive
them (``fusee.driver.run``), and a simulator can interleave the verbs of many clients.

Each operation lives in its own module, a free function of the core typed by the interface it
may use (``fusee.op_core.OpCore``): SEARCH in ``fusee.search``, INSERT in ``fusee.insert``,
UPDATE, DELETE and PUT in ``fusee.update``, the split they may run into in ``fusee.resize``.
This module keeps what they share: the epochs (``new_epoch``, ``epoch_ended``, ``fate``,
``retrying``), waits, the new object an operation writes (``with_objects``) and the opening
and closing of the client id; the round trip that carries what the client owes (``rt``) is
``fusee.owed_round_trip``'s, the class ``ClientCore`` inherits.

Round trips with r >= 2 and no contention (the first batch of each operation also carries the
new object's writes and any deferred frees / log marks of earlier operations):

    SEARCH  buckets (+ cached object) | candidate objects                       1-2
    INSERT  buckets + object | backup CASes + claim check | commit | primary     4
    UPDATE  buckets + object | (candidate objects) | backup CASes | fix + commit | primary  4-5
    DELETE  like UPDATE; proposes a fresh tombstone, its record object holds the log entry  4-5
    PUT     an UPDATE; of an absent key, its first 1-2, then an INSERT that carries the
            update object's ABORTED mark                                                    4-6

Requests for one MN within one batch must execute in posting order (as on an RC queue pair):
the insert's claim check reads a backup right after CASing it.

An UPDATE or DELETE with a cached slot also reads the cached object's last 8 bytes with the
buckets: its commit record names that object's crc, which is how recovery tells the object it
replaced from a later one in reused memory. A client id is IN_USE from ``open`` (which claims
it with a CAS: one of two clients opening it wins) to ``close`` (which delivers the deferred
frees, then marks it CLEAN); ``open`` adopts what an id left CLEAN holds (``fusee.holdings``)
and refuses one left IN_USE (NeedsRecovery: see ``fusee.recovery``); an operation cut short
makes the client unsettled (``settled``: see ``fusee.settle``). Waits on other clients are
bounded by ``patience`` re-reads (Stalled).

A memory node that stops answering (NodeTimeout) makes an operation ask its driver for the next
membership epoch (``AwaitMembership``); the master's failover (``fusee.failover``) starts it
once every client has paused, and the driver throws it in as EpochChanged (also when another
operation met the dead node first). The operation then settles the SNAPSHOT round it had open
from the epoch's decisions (``Membership.fate``) and goes on with the live replicas.

Design: docs/design.md#the-four-operations.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from fusee import insert as insert_mod
from fusee import search as search_mod
from fusee import update as update_mod
from fusee.allocation import Allocator
from fusee.cache import IndexCache
from fusee.config import ClusterConfig
from fusee.errors import (Arg, InvalidArgument, KeyExists, KeyNotFound, NeedsRecovery, Stalled,
                          StoreFormatError, WrongType)
from fusee.hashing import key_hash
from fusee.index import HDR_MAGIC, INDEX_MAGIC, Directory, IndexGeometry
from fusee.holdings import adopt
from fusee.layout import (ABORTED, CLEAN, DELETE, FROZEN, IN_USE, MAX_CLIENT_IDS, META_GROUPS,
                          META_INCARNATION, META_MAGIC, META_MAGIC_OFF, META_STATE, NO_SLOT,
                          UPDATE, check_key, check_value, free_value, object_extent, pack_u64,
                          slot_node, unpack_u64)
from fusee.log import NewObject, ObjectLog
from fusee.membership import Membership
from fusee.memory_map import HEADER_LAYOUT, MemoryMap
from fusee.owed_round_trip import OwedRoundTrip
from fusee.replication import SlotTarget, backoff
from fusee.verbs import (EPOCH_ENDS, AwaitMembership, Cas, EpochChanged, Faa,
                         Op, Read, Request, T, TransportError, Write)
from fusee.verdicts import FRESH, Verdict

if TYPE_CHECKING:
    from fusee.op_core import Body

#: re-reads an operation spends waiting on another client before it raises Stalled (about a
#: minute with the back-off between them; ``fusee.client.Client`` sets it from the time a
#: master takes to fail over an MN or recover a client): far longer than a live client takes
#: to finish a round or a split
PATIENCE: Final = 200_000
#: slot targets a client keeps (``ClientCore.target``): the slots of the keys in recent use
KEPT_TARGETS: Final = 1 << 14


class ClientCore(OwedRoundTrip):
    def __init__(self, config: ClusterConfig, client_id: Arg, cache_capacity: Arg = 65536,
                 patience: int = PATIENCE, membership: Membership = Membership()) -> None:
        if type(client_id) is not int:
            raise WrongType(f"client_id is an int, got {type(client_id).__name__}")
        if type(cache_capacity) is not int:     # (else a TypeError at the first key cached)
            raise WrongType(f"cache_capacity is an int, got {type(cache_capacity).__name__}")
        self.config, self.layout = config, config.layout
        ids = min(self.layout.max_clients, MAX_CLIENT_IDS)
        if not 0 <= client_id < ids:
            raise InvalidArgument(f"client id {client_id} is out of range 0..{ids - 1} "
                                  f"(layout.max_clients)")
        self.map = MemoryMap.of(self.layout)
        self.geo = IndexGeometry.of(self.layout)
        self.client_id = client_id
        self.n, self.r = len(config.memnodes), config.replicas
        self.unit = self.layout.object_unit
        self.membership = membership
        self.dir = Directory(self.geo, self.n, self.r, membership)
        self.meta_nodes = self.dir.replicas
        self.alloc = Allocator(self.map, self.unit, self.n, self.r, client_id, self.meta_nodes,
                               membership)
        self.log = ObjectLog(self.alloc, self.map, client_id, self.meta_nodes, self.unit)
        self.cache = IndexCache(cache_capacity)
        self._targets: dict[int, SlotTarget] = {}     # see ``target``
        self.counters = {"retries": 0, "lost": 0, "splits": 0, "epochs": 0, "backup_reads": 0}
        # what the client owes (``fusee.owed_round_trip``): nothing yet
        self.deferred: list[int] = []
        self.releases: list[int] = []
        self.unsure: list[tuple[int, int | None, int]] = []
        self.aborts: list[NewObject] = []
        self.free_seq = 0               # set by open() from the client's incarnation
        self.adopting = False           # open() found blocks of a previous holder
        # the STATE word while this client holds the id: IN_USE and a nonce of its own
        self.claim = secrets.randbits(62) << 1 | IN_USE
        self.in_flight = 0              # operations started and not ended (``tracked``)
        self.cut_short = False          # one of them ended half way (``settled``)
        if type(patience) is not int or patience < 1:
            raise InvalidArgument(f"patience must be a positive int, got {patience!r}")
        self.patience = patience

    # -- public operations (each returns a generator) --------------------------------------
    def open(self) -> Op[None]:
        return self.retrying(self._open)

    def close(self) -> Op[None]:
        """Generator: send what is deferred, then mark the id CLEAN: nothing of it is in
        flight, so a later client may take it over (``fusee.holdings.adopt``)."""
        return self.retrying(self._close)

    def search(self, key: Arg) -> Op[bytes | None]:
        key = check_key(key, self.layout.max_key_size)
        return search_mod.searching(self, key, key_hash(key))     # tracked by itself

    # (an INSERT, UPDATE or DELETE is counted in ``in_flight`` by ``with_objects``: no
    # ``tracked`` level on each of its round trips)
    def insert(self, key: Arg, value: Arg) -> Op[None]:
        key, value = check_key(key, self.layout.max_key_size), check_value(value)
        # (the size class, checked before any verb, is the object's: not made twice)
        return insert_mod.insert(self, key, value, self.log.units_for(key, value))

    def update(self, key: Arg, value: Arg) -> Op[None]:
        key, value = check_key(key, self.layout.max_key_size), check_value(value)
        return update_mod.replace(self, key, value, UPDATE, units=self.log.units_for(key, value))

    def delete(self, key: Arg) -> Op[None]:
        key = check_key(key, self.layout.max_key_size)
        return update_mod.replace(self, key, b"", DELETE)

    def put(self, key: Arg, value: Arg) -> Op[None]:
        key, value = check_key(key, self.layout.max_key_size), check_value(value)
        self.log.units_for(key, value)
        return update_mod.put(self, key, value)     # (each write in it counts itself)

    @property
    def settled(self) -> bool:
        """Nothing of this client is half done: no operation is in flight and none ended
        half way. Otherwise a SNAPSHOT round, an insert's claim, a split or a free may be
        left open (blocking every writer of that key) and only recovery of the id can tell
        (``fusee.settle``): ``close`` must not call the id CLEAN before that."""
        return not self.in_flight and not self.cut_short and not self.unsure

    def tracked(self, op: Op[T]) -> Op[T]:
        """Generator: ``op`` counted in ``in_flight`` while it runs. It ends half way when
        anything but its result or one of its own outcomes ends it: an exception thrown in
        between two round trips (KeyboardInterrupt, GeneratorExit when its driver drops it),
        a transport's error it gave up on, a bug. KeyExists, KeyNotFound and Stalled are
        raised only once the operation withdrew what it had started. (A write counts itself
        the same way: ``with_objects``.)"""
        self.in_flight += 1
        ended = False
        try:
            result = yield from op
            ended = True
            return result
        except (KeyExists, KeyNotFound, Stalled):
            ended = True
            raise
        finally:
            self.in_flight -= 1
            if not ended:
                self.cut_short = True

    @property
    def stats(self) -> dict[str, int]:
        c = self.cache
        return dict(self.counters, cache_hits=c.hits, cache_misses=c.misses,
                    cache_bypassed=c.bypassed, **self.alloc.stats)

    # -- memory-node failures ----------------------------------------------------------------
    def place(self, membership: Membership) -> None:
        """Adopt a membership: every replica list keeps its live members; an unsure free
        whose MN is dead goes to the next home, unless that home was rebuilt since the free
        went out: its bitmap is a copy of the dead MN's made later, which may hold the free
        (sent again, its bit would carry into the next object's). Recovery (settling)
        tells from the bit, the used byte and the crc whether it happened."""
        # a client that went back an epoch would settle its rounds against decisions it has
        # seen past, and send verbs the failover after them no longer expects
        assert membership.epoch >= self.membership.epoch, \
            f"client {self.client_id}: epoch {self.membership.epoch} -> {membership.epoch}"
        self.membership = membership
        self.dir.place(membership)
        self.alloc.place(membership)
        self._targets = {}
        unsure, self.unsure = self.unsure, []
        for p, node, epoch in unsure:
            home = self.alloc.home[slot_node(p)]
            if node not in membership.dead:
                self.unsure.append((p, node, epoch))
            elif home is None or membership.rebuilt_at.get(home, 0) > epoch:
                self.unsure.append((p, None, epoch))    # (None: no MN's death resends it)
            else:
                self.deferred.append(p)
        self.meta_nodes = self.alloc.meta_nodes = self.log.meta_nodes = self.dir.replicas
        self.counters["epochs"] += 1

    def new_epoch(self, error: TransportError) -> Op[None]:
        """Generator: the epoch this operation ran in is over (``error``: a dead node's
        NodeTimeout, or EpochChanged): get the next one from the driver and adopt it. The
        driver raises NodeTimeout when no failover comes."""
        if not isinstance(error, EpochChanged):
            try:
                yield [AwaitMembership(self.membership.epoch)]
            except EpochChanged as e:
                error = e
            else:
                raise error
        if error.membership.epoch > self.membership.epoch:
            self.place(error.membership)

    def epoch_ended(self, error: TransportError, obj: NewObject) -> Op[list[Write]]:
        """Generator: an operation writing ``obj`` met the end of its epoch: adopt the next
        one; returns ``obj``'s first writes again, for the replicas still alive (the batch
        that carried them may have reached none)."""
        yield from self.new_epoch(error)
        self.retry()
        return self.log.rewrite(obj)

    def fate(self, epoch: int, t: SlotTarget, v_old: int, v_new: int, decided: Verdict | None,
             cased: bool) -> Op[Verdict]:
        """Generator: WIN, LOSE or RESTART for the round this client had open at ``t`` when
        ``epoch`` ended (``Membership.fate``). Reads the round's primary if it is alive, else
        its first live replica: a FROZEN value there is final, and tells the round's fate
        even if this client had decided it (a split took the round back on the backups and
        copied the frozen value, in a subtable the failover no longer settles). The primary
        tells only if it was alive throughout (``Membership.witness``): rebuilt since, it
        died at some epoch's end after the round and holds what another replica held when it
        was copied, the failover's choice and later writes over it. Where it does not tell,
        the membership still says whether the round's epoch ended with it alive (then the
        failover went by its value, not by this client's verdict)."""
        now = None
        m = self.membership
        assert epoch < m.epoch, f"the fate of a round of epoch {epoch}, still current"
        live = m.live(t.nodes)
        if not t.backups:
            # the primary was the slot's only replica: every copy it has now was made from
            # it since, by a rebuild (in a pause, after the round's verbs), so the first
            # tells what the primary would, also once the primary died (a verdict with no
            # backup, WIN for one, is no proposal that a failover could have kept)
            live = self.dir.nodes(t.sid)
        if m.decided_at(epoch, t.sid, t.pos) is None and live:
            (raw,) = yield from self.rt([Read(live[0], t.addr, 8)])
            now = unpack_u64(raw)
            if live[0] == t.primary and m.witness(t.primary, epoch) or now & FROZEN \
                    or not t.backups:
                now &= ~FROZEN
            else:
                now = None
        return m.fate(epoch, t.sid, t.pos, v_old, v_new, decided, now, cased,
                      primary=t.primary)

    def retrying(self, step: Callable[[], Op[T]],
                 ends: tuple[type[TransportError], ...] = EPOCH_ENDS) -> Op[T]:
        """Generator: run ``step()`` (a generator function) until it completes in one epoch."""
        while True:
            try:
                return (yield from step())
            except ends as e:
                ended: TransportError = e
            yield from self.new_epoch(ended)    # (out of the except clause: test_compiled)

    def _open(self) -> Op[None]:
        """Claim the id: one CAS of its STATE word on the first metadata replica, from CLEAN
        to this client's ``claim`` (so of two clients opening the same id, one wins; the
        other gets NeedsRecovery). A fresh id gets its first block group; one a client left
        CLEAN (closed, or recovered) is adopted with everything its blocks hold; one left
        IN_USE needs recovery first (NeedsRecovery). An open that a failover interrupted
        starts over: it knows its own claim."""
        g = self.geo
        meta = self.map.client_meta(self.client_id)
        if self.free_seq == 0:
            m0 = self.meta_nodes[0]
            claim: list[Request] = [self.dir.read(), Read(m0, g.header_word(HDR_MAGIC), 8),
                                    Read(m0, HEADER_LAYOUT, 8),
                                    Cas(m0, meta + META_STATE, CLEAN, self.claim),
                                    Read(m0, meta + META_GROUPS, 8)]
            res = yield claim + [Faa(m, meta + META_INCARNATION, 1) for m in self.meta_nodes]
            if unpack_u64(res[2]) != self.map.fingerprint or unpack_u64(res[1]) != INDEX_MAGIC:
                raise StoreFormatError("the memory nodes were formatted for another layout")
            if res[3] not in (CLEAN, self.claim):
                raise NeedsRecovery(f"client id {self.client_id} is in use: another client "
                                    f"holds it, or one did not close it cleanly (then recover "
                                    f"it first: Client(..., recover=True) or the master)")
            self.dir.load(res[0])
            self.adopting = unpack_u64(res[4]) != 0
            # each incarnation of this client id draws free values from its own range
            self.free_seq = (max(res[5:]) + 1) << 28
            self.alloc.start_marks(max(res[5:]) + 1)
        yield [Write(m, meta + off, pack_u64(v)) for m in self.meta_nodes
               for off, v in ((META_MAGIC_OFF, META_MAGIC), (META_STATE, self.claim))]
        if self.adopting:
            yield from adopt(self.alloc, self.log)
            self.adopting = False
        if self.alloc.current is None:
            yield from self.alloc.grow()

    def _flush(self) -> Op[None]:
        if self.deferred or self.aborts:
            yield from self.rt([])

    def _close(self) -> Op[None]:
        yield from self._flush()            # frees first: CLEAN says nothing is owed
        yield from self.alloc.give_back()
        if self.unsure:                     # a free may be owed: not CLEAN yet
            return                          # (``fusee.settle.closing`` settles, then closes)
        # CLEAN says nothing is owed: the next holder adopts the blocks as they are
        assert not self.deferred and not self.aborts, \
            f"client {self.client_id}: CLEAN with frees or ABORTED marks owed"
        meta = self.map.client_meta(self.client_id)
        yield from self.rt([Write(m, meta + META_STATE, pack_u64(CLEAN))
                            for m in self.meta_nodes])

    def waited(self, n: int, what: str) -> Op[int]:
        """Generator: count one more re-read spent waiting on another client's write, claim
        or split (backing off once the wait is long): Stalled once ``patience`` of them went
        by (that client probably crashed). Returns the count."""
        n += 1
        if n >= self.patience:
            raise Stalled(f"{what}: nothing changed in {n} re-reads (a crashed client? it "
                          f"waits for recovery)")
        yield from backoff(n)
        return n

    def split_seen(self, sid: int, waits: int) -> Op[int]:
        """Generator: the key's buckets said subtable ``sid`` is split or being split: count
        the wait (``waited``) and re-read the directory. Returns the waits so far."""
        waits = yield from self.waited(waits, f"subtable {sid} is being split")
        self.retry()
        yield from self.refresh()
        return waits

    def refresh(self) -> Op[None]:
        """Generator: re-read the directory (a FROZEN slot said ours is stale)."""
        (buf,) = yield from self.rt([self.dir.read()])
        self.dir.load(buf)

    def retry(self) -> None:
        self.counters["retries"] += 1

    def target(self, sid: int, pos: int) -> SlotTarget:
        """The slot's replicas and address: kept for the slots in recent use (every write of
        a key asks for its slot's) until the membership changes (``place``)."""
        t = self._targets.get(sid << 32 | pos)
        if t is None:
            t = SlotTarget(sid, pos, tuple(self.dir.nodes(sid)), self.geo.slot_addr(sid, pos))
            if len(self._targets) >= KEPT_TARGETS:
                self._targets.clear()
            self._targets[sid << 32 | pos] = t
        return t

    def object_read(self, v: int, near: int | None = None) -> Read:
        """The read of the object ``v`` names: from MN ``near`` when it holds a live copy
        (a batch that also reads buckets there then stays on one MN: one message, one
        reply to wait for), else from the object's home. Every live copy of a published
        object holds it whole: its writes reached all of them before any slot named it
        (``fusee.log``), and later writes (commit records, reuse) go to all of them too."""
        node, addr, length = object_extent(v, self.unit)
        if near is None or near not in self.alloc.copies_of[node]:
            near = self.alloc.home_of(node)
        return Read(near, addr, length)

    def defer_free(self, v: int, then_release: int | None = None) -> None:
        """Free ``v``'s object with the next batch; ``then_release`` (an object of ours whose
        log entry records that free) is reused only once that batch is through."""
        # a free bit is set once: a second FAA would carry into the next object's bit
        assert v not in self.deferred, f"object {v:#x} freed twice"
        self.deferred.append(v)
        if then_release is not None:
            self.releases.append(then_release)

    def _make_room(self, units: int) -> Op[None]:
        """Generator: make an allocation of ``units`` possible (``Allocator.ensure``)."""
        if (self.deferred or self.aborts) and not self.alloc.ready(units):
            # deliver the frees our log entries owe (and the memory of objects to abort)
            # before reclaim may reuse those entries
            yield from self._flush()
        yield from self.alloc.ensure(units)

    def abandon(self, obj: NewObject) -> Op[None]:
        """Generator: an operation ends in an error without having proposed its object:
        mark the log entry ABORTED (so recovery never redoes it) and reuse the memory."""
        yield from self.rt(self.log.record(obj, ABORTED, NO_SLOT, 0))
        self.alloc.release(obj.ptr)

    def abandon_later(self, obj: NewObject) -> None:
        """An operation ends without having proposed ``obj`` and another operation follows
        at once (a put's insert): the ABORTED mark rides with the next batch (``rt``), and
        the memory is reused once it is through."""
        self.aborts.append(obj)

    def free_value(self) -> int:
        """A fresh tombstone / void value of this client (SNAPSHOT proposals are distinct)."""
        self.free_seq += 1
        return free_value(self.client_id, self.free_seq)

    def with_objects(self, opcode: int, key: bytes, value: bytes, body: Body[T],
                     then_insert: bool = False, units: int = 0) -> Op[T]:
        """Generator: run ``body(self, obj, key, opcode, value, then_insert)`` with a new
        object until it returns anything but FRESH (a failover dropped its proposal: that
        object's log entry must never commit again). An object that ends in Stalled or FRESH
        goes back (no round of ours is left open on it). A DELETE's object holds the
        tombstone it proposes, drawn anew each time (so that recovery knows it). Counted in
        ``in_flight`` as ``tracked`` counts (in its place: a generator level less on every
        round trip of a write). (``body`` takes its arguments rather than being a closure of
        them, and the rare paths' closures are made in methods of their own: a closure's
        cells and function object cost on every write.) ``units``: the object's size class
        where the caller checked it already (0: made here; a DELETE's, of each tombstone).
        (``fusee.update`` runs its writes' lifecycle itself, through the same calls.)"""
        self.in_flight += 1
        whole = False
        try:
            while True:
                if opcode == DELETE:
                    value = pack_u64(self.free_value())
                obj = self.write_object(opcode, key, value, units)
                if obj is None:
                    obj = yield from self.made_object(opcode, key, value, units)
                try:
                    result = yield from body(self, obj, key, opcode, value, then_insert)
                except Stalled as halt:
                    stalled: Stalled | None = halt
                else:
                    stalled = None
                if stalled is not None:     # (out of the except clause: test_compiled)
                    yield from self.abandoned(obj)
                    raise stalled
                if result != FRESH:
                    whole = True
                    return result
                yield from self.abandoned(obj)
        except (KeyExists, KeyNotFound, Stalled):   # its own outcomes: withdrawn
            whole = True
            raise
        finally:
            self.write_ended(whole)

    def write_ended(self, whole: bool) -> None:
        """A write ended (counted in ``in_flight`` from its start), ``whole``: by its result
        or one of its own outcomes (KeyExists, KeyNotFound, Stalled: withdrawn), else half
        way (GeneratorExit when its driver drops it, a transport's error it gave up on, a
        bug): the client is not ``settled``."""
        self.in_flight -= 1
        if not whole:
            self.cut_short = True

    def write_object(self, opcode: int, key: bytes, value: bytes, units: int
                     ) -> NewObject | None:
        """A write's new object holding ``value`` (allocated and encoded: the common case
        posts nothing), or None where memory must be made for it first (``made_object``).
        ``units``: its size class, 0 where not checked yet."""
        if not units:
            units = self.log.units_for(key, value)
        if not self.alloc.ready(units):
            return None
        return self.log.new_object(opcode, key, value, units)

    def made_object(self, opcode: int, key: bytes, value: bytes, units: int
                    ) -> Op[NewObject]:
        """Generator: ``write_object``, memory made for it first, and the object allocated
        at once (``ready`` is not asked again: it follows the lease's news of a rebuild
        first, which the lease's thread may change in between, and a rebuild begun then
        would not count the room just made)."""
        units = units or self.log.units_for(key, value)
        yield from self._room_for(units)
        return self.log.new_object(opcode, key, value, units)

    def _room_for(self, units: int) -> Op[None]:
        """Generator: ``_make_room(units)``, in one epoch."""
        return self.retrying(lambda: self._make_room(units))

    def abandoned(self, obj: NewObject) -> Op[None]:
        """Generator: ``abandon(obj)``, in one epoch."""
        return self.retrying(lambda: self.abandon(obj))
