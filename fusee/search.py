"""SEARCH: one round trip to the key's buckets (with the cached object read alongside, from
the same MN, when the index cache knows the key's slot), a second to its candidate objects
when the cache missed. Objects met while their memory is reused are read again (``fusee.reuse``).

When the primary of the key's subtable stops answering, the search reads the live backups
instead of waiting for the failover, where that is safe (``_on_backups``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from fusee.cache import CacheEntry
from fusee.hashing import KeyHash
from fusee.index import View
from fusee.layout import COMMITTED, DELETE, INSERT, ObjectView, decode_object
from fusee.reuse import ObjectReads, is_named
from fusee.verbs import EPOCH_ENDS, NodeTimeout, Op, Read, TransportError

# ISA-L's crc32, as fusee.layout checks objects with
from isal.isal_zlib import crc32

# a SEARCH's cache hit judged in one C call (emulator/_atomic.c); ``hit_value`` where the
# extension is not built
_HIT_IN_C: Callable[..., bytes | None] | None
try:
    from fusee.emulator._atomic import search_hit as _HIT_IN_C
except ImportError:     # pragma: no cover (a source tree without its build, or a stale one)
    _HIT_IN_C = None

if TYPE_CHECKING:
    from fusee.membership import Membership
    from fusee.op_core import OpCore
    from fusee.operations import ClientCore

#: a key found in the index: (slot position, slot value, the object it names)
Found = tuple[int, int, ObjectView]

#: a SEARCH's first round (``first_round``): the key's subtable, the cache entry it was
#: planned with (None: the cache has none), whether the entry's object read rides along
#: (after the bucket reads), the requests, the buckets' first buckets
Round = tuple[int, CacheEntry | None, bool, list[Read], tuple[int, int]]
#: a first round run by the driver (``search``'s ``first``): the round and its answer, or
#: the transport error its batch failed with
First = tuple[Round, "bytes | View | BaseException"]

#: a SEARCH on the backups of a dead primary cannot tell before the failover
UNSURE = object()


def searching(core: ClientCore, key: bytes, h: KeyHash) -> Op[bytes | None]:
    """Generator: the SEARCH operation ``ClientCore.search`` hands out, its first round run
    here, in one generator: the common case, a cache hit answered in one round trip, makes
    no ``search`` generator, ``tracked`` wrapper or ``rt`` round. That round is
    ``search``'s own (``first_round`` makes the requests, ``first_answer`` judges their
    completions); when it does not answer the SEARCH (a cache miss, a stale subtable) or
    its batch failed, ``search`` takes over from it (its ``first``), tracked: the same
    verbs, round trips and outcomes as ``tracked(search(...))``. A client that owes frees
    or ABORTED marks (``ClientCore.rt`` carries them) runs ``search`` from the start.

    While its first round is out it counts in ``in_flight``, and ending there any other way
    than through its answer (closed, an exception) leaves the client unsettled, as
    ``tracked`` tells (``fusee.settle``)."""
    if core.deferred or core.aborts:
        return (yield from core.tracked(search(core, key, h)))
    core.in_flight += 1
    got: bytes | View | BaseException
    try:
        rnd = first_round(core, key, h)
        try:
            res = yield rnd[3]
        except TransportError as e:
            got = e
        else:
            got = first_answer(core, key, rnd, res)
    except BaseException:
        core.cut_short = True
        raise
    finally:
        core.in_flight -= 1
    if isinstance(got, bytes):
        return got
    return (yield from core.tracked(search(core, key, h, (rnd, got))))


def search(core: OpCore, key: bytes, h: KeyHash, first: First | None = None
           ) -> Op[bytes | None]:
    """Generator: the SEARCH operation of ``core`` (an OpCore): the key's value or None.

    Its first round is ``first_round`` (the requests) and ``first_answer`` (the verdict on
    their completions). A driver may run that round itself, without this generator
    (``searching``): when the answer is not final it hands over ``first``,
    the round and its answer (or the transport's error), and the search goes on from there
    exactly as if it had posted that round itself."""
    suspects = None                             # made on a cache miss only
    waits = 0
    while True:
        try:
            if first is None:
                rnd = first_round(core, key, h)
                res = yield from core.rt(rnd[3])
                got: bytes | View | BaseException = first_answer(core, key, rnd, res)
            else:
                (rnd, got), first = first, None
            if isinstance(got, BaseException):
                raise got
            if not isinstance(got, View):
                return got
            sid = rnd[0]
            if got.stale:
                waits = yield from core.split_seen(sid, waits)
                continue
            suspects = suspects or ObjectReads(core.unit)
            found = yield from find(core, key, got, h, suspects)
            if found is False:
                continue
            if found is None:
                return None
            pos, v, obj = found
            core.cache.store(key, sid, pos, v)
            return obj.value
        except EPOCH_ENDS as ended:
            err: TransportError = ended
        # (out of the except clause: no yield in one, see tests/test_compiled.py)
        sid = rnd[0]
        nodes = core.dir.nodes(sid)
        if isinstance(err, NodeTimeout) and err.node == nodes[0] and len(nodes) > 1:
            try:
                again: Any = yield from _on_backups(core, key, h, sid, nodes[1:])
            except EPOCH_ENDS as later:
                again, err = UNSURE, later
            if again is not UNSURE:
                core.counters["backup_reads"] += 1
                value: bytes | None = again
                return value
        yield from core.new_epoch(err)


def first_round(core: OpCore, key: bytes, h: KeyHash) -> Round:
    """What a SEARCH posts first: the key's bucket reads on its subtable's primary, with
    the cached object's read when the index cache has an entry worth speculating on
    (``fusee.cache``)."""
    sid = core.dir.lookup(h)[0]
    e, speculate = core.cache.consult(key, sid)
    if speculate:
        assert e is not None, "a speculation on an entry"
        made = e.hit_reads
        if made is None or made[0] is not core.membership:
            made = _hit_reads(core, e, h)
        return sid, e, True, list(made[1]), made[2]
    reads, firsts = core.dir.bucket_reads(sid, h, core.dir.nodes(sid)[0])
    return sid, e, False, reads, firsts


def first_answer(core: OpCore, key: bytes, rnd: Round, res: list[Any], at: int = 0
                 ) -> bytes | View:
    """The verdict on a SEARCH's first round ``rnd`` from its completions, ``res`` from
    position ``at`` on (a merged batch's: ``fusee.driver.first_rounds``): the value when
    the cached slot still names the object read alongside (a hit: the SEARCH is done,
    judged by ``hit_value``, in one C call where the extension is built), else the View of
    the key's buckets to go on from (stale, or a cache miss)."""
    sid, e, spec, _, firsts = rnd
    if spec:
        assert e is not None, "a speculation on an entry"
        if _HIT_IN_C is not None:
            value = _HIT_IN_C(crc32, res[at], res[at + 1], res[at + 2], firsts[0], firsts[1],
                              sid, e.pos, e.value, key)
        else:
            value = hit_value(key, sid, firsts, e.pos, e.value, res[at:at + 3])
        if value is not None:
            core.cache.outcome(e, True)
            return value
    view = View(res[at:at + 2], firsts, sid)
    if view.stale or e is None:
        return view
    core.cache.outcome(e, not spec and view.get(e.pos) == e.value)
    return view


def hit_value(key: bytes, sid: int, firsts: tuple[int, int], pos: int, value: int,
              res: list[Any]) -> bytes | None:
    """The value of a SEARCH's cache hit, or None: the key's buckets ``res[:2]`` (of
    subtable ``sid``, first buckets ``firsts``) are not stale and their slot ``pos`` still
    holds ``value``, which names the object ``res[2]``, the key's (``fusee.reuse``). The
    spec of the C helper ``first_answer`` calls (tests/test_search_hit.py)."""
    view = View(res[:2], firsts, sid)
    if view.stale or view.get(pos) != value:
        return None
    obj = decode_object(res[2])
    if obj is None or obj.key != key or not is_named(value, obj, key):
        return None
    return obj.value


def _hit_reads(core: OpCore, e: CacheEntry, h: KeyHash
               ) -> tuple[Membership, list[Read], tuple[int, int]]:
    """What a SEARCH that speculates on cache entry ``e`` posts: the key's bucket reads on
    its subtable's primary and the read of the cached object (from there, when it holds a
    copy), and the buckets' first buckets, for the membership they are made in. Made once
    per entry and membership (which alone moves a primary or an object's copies), as every
    hit on the key makes the same (``first_round`` copies the requests)."""
    primary = core.dir.nodes(e.sid)[0]
    reads, firsts = core.dir.bucket_reads(e.sid, h, primary)
    reads.append(core.object_read(e.value, primary))
    made = e.hit_reads = (core.membership, reads, firsts)
    return made


def _on_backups(core: OpCore, key: bytes, h: KeyHash, sid: int, backups: tuple[int, ...]
                ) -> Op[Any]:
    """Generator: SEARCH on the live backups of a subtable whose primary stopped
    answering. The backups are never older than the primary, and where they
    agree on the key's slots the failover keeps their values (every writer of such a
    round saw its proposal on all of them), except an insert's claim not yet committed:
    then, or where they disagree, UNSURE (the failover must decide first). Returns the
    value, None (absent) or UNSURE."""
    reads: list[Read] = []
    firsts = None
    for n in backups:
        more, firsts = core.dir.bucket_reads(sid, h, n)
        reads += more
    assert firsts is not None, "a subtable with backups"
    res = yield from core.rt(reads)
    views = [View(res[i:i + 2], firsts, sid) for i in range(0, len(res), 2)]
    cands = views[0].candidates(h.fp)
    if any(v.stale or v.candidates(h.fp) != cands for v in views):
        return UNSURE
    if not cands:
        return None
    bufs = yield from core.rt([core.object_read(v) for _, v in cands])
    for (_, v), buf in zip(cands, bufs):
        obj = decode_object(buf)
        if obj is None or not is_named(v, obj, key):
            return UNSURE           # memory being reused (``fusee.reuse``): no verdict here
        if obj.key == key:
            if obj.opcode == INSERT and obj.state != COMMITTED or obj.opcode == DELETE:
                return UNSURE
            return obj.value
    return None


def find(core: OpCore, key: bytes, view: View, h: KeyHash, suspects: ObjectReads
         ) -> Op[Found | None | Literal[False]]:
    """Generator: read the key's candidate objects in ``view``: (pos, value, object),
    None when the key is absent, or False when a candidate's memory was being reused (look
    again). SEARCH's second round trip, and the one UPDATE and DELETE make on a cache miss."""
    cands = view.candidates(h.fp)
    if not cands:
        return None
    bufs = yield from core.rt([core.object_read(v) for _, v in cands])
    found, bad = _match(key, cands, bufs, suspects)
    if found is None and bad:
        core.retry()
        return False
    return found


def _match(key: bytes, cands: list[tuple[int, int]], bufs: list[bytes], suspects: ObjectReads
           ) -> tuple[Found | None, bool]:
    """Find the key among candidate objects: (pos, value, object) or None, and whether a
    candidate's memory was being reused (``fusee.reuse``: look again; CorruptObject once
    its corruption is proven)."""
    suspects.next_pass()
    bad = False
    for (pos, v), buf in zip(cands, bufs):
        obj = suspects.judge(v, buf, key)
        if obj is None:
            bad = True
        elif obj.key == key:
            return (pos, v, obj), False
    return None, bad
