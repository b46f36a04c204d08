"""The client's index cache: key -> where its slot is and the slot value last seen.

With an entry, SEARCH reads the cached object in the same batch as the buckets and answers in
one round trip when the slot still holds the cached value; UPDATE and DELETE skip reading the
candidate objects. A key whose slot keeps changing under us (other writers) makes the
speculative object read wasted bandwidth, so a key whose miss ratio exceeds ``threshold``
(0.1, as in the paper) is *bypassed*: no speculative read. Its counters are still updated from
the bucket read, and they decay, so a key that calms down is cached again.

Design: docs/design.md#index-cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from fusee.acyclic import untracked

if TYPE_CHECKING:
    from fusee.membership import Membership
    from fusee.verbs import Read

#: Final: a compiled ``store`` calls it from a C static, not through the module's dict
_UNTRACKED: Final = untracked


class CacheEntry:
    """Kept off the garbage collector's lists (``fusee.acyclic``): nothing it holds ever
    leads back to it (``hit_reads`` neither). A plain class, not a dataclass: compiled, a
    dataclass's ``__init__`` is the one its decorator writes, a Python call per entry made
    (every UPDATE makes one: ``store``)."""
    __slots__ = ("sid", "pos", "value", "accesses", "misses", "hit_reads")

    def __init__(self, sid: int, pos: int, value: int, accesses: int = 0, misses: int = 0
                 ) -> None:
        self.sid = sid          # subtable: with ``pos`` gives the slot on every replica
        self.pos = pos
        self.value = value      # slot value last seen (the key's object)
        self.accesses = accesses
        self.misses = misses
        #: what a SEARCH hit posts, made once for the entry (``fusee.search``): the membership
        #: it was made for (a new one may move the primary and the object's copies), its
        #: requests (the key's bucket reads and the object read), the buckets' first buckets
        self.hit_reads: tuple[Membership, list[Read], tuple[int, int]] | None = None

    def __repr__(self) -> str:
        return (f"CacheEntry(sid={self.sid}, pos={self.pos}, value={self.value:#x}, "
                f"accesses={self.accesses}, misses={self.misses})")


class IndexCache:
    def __init__(self, capacity: int = 65536, threshold: float = 0.1, warmup: int = 8,
                 window: int = 64) -> None:
        self.capacity, self.threshold = capacity, threshold
        self.warmup, self.window = warmup, window
        # least recently used first: a plain dict (insertion ordered), re-inserted on use;
        # compiled, its operations are native calls (an OrderedDict's are Python method calls)
        self.entries: dict[bytes, CacheEntry] = {}
        self.hits = self.misses = self.bypassed = 0

    def get(self, key: bytes) -> CacheEntry | None:
        e = self.entries.pop(key, None)     # (taken out and put back: 2 look-ups, not 3)
        if e is not None:           # last, as the most recently used
            self.entries[key] = e
        return e

    def consult(self, key: bytes, sid: int) -> tuple[CacheEntry | None, bool]:
        """What a SEARCH asks first, in one call: the key's entry (None: none, or one for
        another subtable than ``sid``, the key's now: dropped), and whether a speculative
        object read is worth it: not once the key misses too often (bypassed)."""
        e = self.entries.get(key)
        if e is None:
            return None, False
        if e.sid != sid:
            del self.entries[key]
            return None, False
        entries = self.entries      # last, as the most recently used
        entries[key] = entries.pop(key)
        if e.accesses < self.warmup or e.misses <= self.threshold * e.accesses:
            return e, True
        self.bypassed += 1
        return e, False

    def outcome(self, e: CacheEntry, hit: bool) -> None:
        e.accesses += 1
        e.misses += not hit
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        if e.accesses >= self.window:       # decay: recent behaviour counts most
            e.accesses //= 2
            e.misses //= 2

    def store(self, key: bytes, sid: int, pos: int, value: int, alone: bool = False) -> None:
        """Remember where the key's slot is. A new entry replaces the old one, which is never
        changed: an operation in flight holds the entry it read with its speculative object
        read, and must judge that read against the slot value it was made for, not one that
        another operation of this client stored since (it would take the old object for
        the new one). ``alone``: the caller's operation is the only one in flight, so none
        holds the old entry: it is changed in place (every UPDATE stores one: no entry made
        and freed), its requests made for the old value (``hit_reads``) dropped."""
        entries = self.entries
        old = entries.pop(key, None)        # (then set: the entry goes last, as recent)
        if old is not None and alone:
            old.sid, old.pos, old.value, old.hit_reads = sid, pos, value, None
            entries[key] = old
            return
        if old is None:
            new = CacheEntry(sid, pos, value)
        else:
            new = CacheEntry(sid, pos, value, old.accesses, old.misses)
        entries[key] = new
        if old is None and len(entries) > self.capacity:
            del entries[next(iter(entries))]    # the least recently used
        _UNTRACKED(new)

    def drop(self, key: bytes) -> None:
        self.entries.pop(key, None)     # (one look-up: every DELETE drops its key's entry)
