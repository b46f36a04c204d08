"""RACE hashing on the memory nodes: where the directory, the subtables and their buckets are,
the index's initial image, and the client's cached copy of the directory.

Index area (offsets from ``MemoryMap.index``; every MN has the same layout)::

    +0   u64 magic          +16 u64 dir_bits
    +64  u64 split lock per subtable: 0 free, client id + 1 while splitting, RETIRED_LOCK after
    dir  u64 per directory entry (2**dir_bits of them): VALID | depth << 32 | subtable id
    subtables (page aligned): subtable s at ``subtables + s * subtable_bytes``

The directory has a fixed number of entries (``2**dir_bits``, enough for every subtable the
area can hold), so it never doubles: a subtable of local depth d is named by all the entries
whose low d bits are its suffix. Subtable s lives on r MNs, primary ``s % n`` then the next
ones; the directory, split locks and header words on MNs ``0..r-1``, read from the first. Under
a membership with dead MNs (``fusee.membership``) each list keeps its live members, in order.
Subtables are never moved or reused: a split freezes every slot of the old subtable and copies
it into two new ones, so a client whose cached directory is stale notices the FROZEN bit (and
the RETIRED bucket headers). A subtable's id follows from its place in the split tree
(``child_ids``), so a split needs no shared counter that a dead MN could take with it.

Design: docs/design.md#race-hashing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from fusee.acyclic import untracked
from fusee.config import LayoutConfig
from fusee.errors import DataLost, StoreFormatError
from fusee.hashing import KeyHash
from fusee.membership import Membership
from fusee.layout import (BUCKET_BYTES, FROZEN, LEN_SHIFT, RETIRED, SLOTS_PER_BUCKET,
                          TAKEN, TENTATIVE, any_frozen, bucket_header, pack_u64)
from fusee.memory_map import PAGE, MemoryMap
from fusee.verbs import Read

INDEX_MAGIC: Final = 0x3158494545535546    # b"FUSEEIX1"
HDR_MAGIC: Final = 0
HDR_DIR_BITS: Final = 16
LOCKS: Final = 64
ENTRY_VALID: Final = 1 << 63
RETIRED_LOCK: Final = (1 << 64) - 1
COMBINED: Final = 2 * BUCKET_BYTES


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class IndexGeometry:
    base: int
    buckets: int                # per subtable
    subtable_bytes: int
    max_subtables: int
    dir_bits: int
    initial_depth: int
    directory: int              # absolute address of entry 0
    subtables: int              # absolute address of subtable 0

    @classmethod
    def of(cls, layout: LayoutConfig) -> IndexGeometry:
        mmap_ = MemoryMap.of(layout)
        n0 = layout.initial_subtables
        if n0 & (n0 - 1):
            raise StoreFormatError("layout.initial_subtables must be a power of two")
        if layout.buckets_per_subtable < 6:
            raise StoreFormatError("layout.buckets_per_subtable must be at least 6")
        d0 = n0.bit_length() - 1
        sub = layout.buckets_per_subtable * BUCKET_BYTES
        m = min(layout.index_size // sub, 0xFFFF)
        while m >= n0:
            bits = max(d0, (m - 1).bit_length())
            directory = _align(LOCKS + 8 * m, 64)
            start = _align(directory + 8 * (1 << bits), PAGE)
            if start + m * sub <= layout.index_size and bits <= 32:
                return cls(mmap_.index, layout.buckets_per_subtable, sub, m, bits, d0,
                           mmap_.index + directory, mmap_.index + start)
            m -= 1
        raise StoreFormatError("layout.index_size cannot hold the initial subtables")

    # -- addresses -------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.buckets * SLOTS_PER_BUCKET

    @property
    def mains(self) -> int:
        return 2 * (self.buckets // 3)

    def header_word(self, offset: int) -> int:
        return self.base + offset

    def lock(self, sid: int) -> int:
        return self.base + LOCKS + 8 * sid

    def entry(self, i: int) -> int:
        return self.directory + 8 * i

    def subtable(self, sid: int) -> int:
        return self.subtables + sid * self.subtable_bytes

    def slot_addr(self, sid: int, pos: int) -> int:
        b, s = divmod(pos, SLOTS_PER_BUCKET)
        return self.subtables + sid * self.subtable_bytes + b * BUCKET_BYTES + 8 + 8 * s

    def combined(self, sid: int, main: int) -> tuple[int, int]:
        """(address, first bucket) of the 128-byte combined bucket of main bucket ``main``:
        main then the group's overflow (left main) or overflow then main (right main)."""
        first = 3 * (main // 2) + (main % 2)
        # (``subtable`` inline: two of these per bucket read an operation makes)
        return self.subtables + sid * self.subtable_bytes + first * BUCKET_BYTES, first

    # -- images ----------------------------------------------------------------------------
    def subtable_image(self, sid: int, depth: int, suffix: int, slots: dict[int, int],
                       flags: int = 0) -> bytes:
        img = bytearray(self.subtable_bytes)
        hdr = pack_u64(bucket_header(sid, depth, suffix, flags))
        for b in range(self.buckets):
            img[b * BUCKET_BYTES:b * BUCKET_BYTES + 8] = hdr
        for pos, v in slots.items():
            b, s = divmod(pos, SLOTS_PER_BUCKET)
            struct.pack_into("<Q", img, b * BUCKET_BYTES + 8 + 8 * s, v)
        return bytes(img)


def entry_word(sid: int, depth: int) -> int:
    return ENTRY_VALID | (depth << 32) | sid


def initial_image(layout: LayoutConfig) -> list[tuple[int, bytes]]:
    """(address, bytes) pieces that format a fresh region's index area (the same on every
    MN): header, the directory naming the initial subtables, their bucket headers."""
    g = IndexGeometry.of(layout)
    n0 = layout.initial_subtables
    pieces = [(g.header_word(HDR_MAGIC), pack_u64(INDEX_MAGIC)),
              (g.header_word(HDR_DIR_BITS), pack_u64(g.dir_bits)),
              (g.directory, b"".join(pack_u64(entry_word(i % n0, g.initial_depth))
                                     for i in range(1 << g.dir_bits)))]
    for sid in range(n0):
        pieces.append((g.subtable(sid), g.subtable_image(sid, g.initial_depth, sid, {})))
    return pieces


#: bucket reads a Directory keeps (per key, subtable and MN): the keys in recent use
_KEPT_READS: Final = 1 << 14


def replica_nodes(first: int, n_nodes: int, r: int) -> list[int]:
    """The r MNs holding a replicated thing whose primary is ``first % n``."""
    return [(first + j) % n_nodes for j in range(r)]


def child_ids(sid: int, depth: int, suffix: int, initial_depth: int) -> tuple[int, int]:
    """The ids of the two subtables that split subtable ``sid`` (local depth ``depth``,
    directory suffix ``suffix``): subtables are numbered level by level of the split tree
    (the initial ones 0..n0-1, then the 2*n0 of the next depth...), so every splitter and
    recoverer of the same subtable names the same two, without a counter."""
    base = (1 << (depth + 1)) - (1 << initial_depth)
    return base + suffix, base + suffix + (1 << depth)


#: Final: a compiled ``SlotTarget`` calls it from a C static, not through the module's dict
_UNTRACKED: Final = untracked


class SlotTarget:
    """One index slot: its subtable, position, replica nodes (primary first) and address
    (``fusee.replication``'s rounds are made on it; a class of this compiled module, so a
    new one is no interpreted call: an insert makes one for every slot it claims).

    Its primary and backups are fields, not properties: an UPDATE asks for them five times,
    and each property is a Python call on the fast path (issue 12). A client keeps thousands
    (``ClientCore.target``), off the garbage collector's lists: ints and tuples of ints, in
    no cycle (``fusee.acyclic``)."""
    __slots__ = ("sid", "pos", "nodes", "addr", "primary", "backups")

    def __init__(self, sid: int, pos: int, nodes: tuple[int, ...], addr: int) -> None:
        self.sid, self.pos, self.nodes, self.addr = sid, pos, nodes, addr
        self.primary, self.backups = nodes[0], nodes[1:]
        _UNTRACKED(self)

    def __repr__(self) -> str:
        return (f"SlotTarget(sid={self.sid}, pos={self.pos}, nodes={self.nodes}, "
                f"addr={self.addr:#x})")


#: the name this module gave ``fusee.errors.DataLost``
LostData = DataLost


class Directory:
    """A client's cached copy of the directory, and where things live under a membership."""

    def __init__(self, geo: IndexGeometry, n_nodes: int, r: int,
                 membership: Membership = Membership()) -> None:
        self.geo, self.n, self.r = geo, n_nodes, r
        self.entries: list[int] = []          # the directory's words, less VALID (``load``)
        # per-operation lookups, computed once
        self._suffix_mask = (1 << geo.dir_bits) - 1
        self._mains = geo.mains
        # see bucket_reads; its values typed Any: compiled, a fixed-length tuple type would
        # be unboxed and boxed anew on the way in, a tuple the garbage collector tracks
        self._reads: dict[tuple[int, int, int], Any] = {}
        self.place(membership)

    def place(self, membership: Membership) -> None:
        """Adopt a membership: every replica list keeps its live members."""
        self.membership = membership
        self._nodes = [membership.live(replica_nodes(p, self.n, self.r))
                       for p in range(self.n)]
        if not all(self._nodes):
            raise LostData(f"memory nodes {sorted(membership.dead)} are dead: some index "
                           f"subtables have no replica left")

    def read(self) -> Read:
        """Request that fetches the whole directory from its first live replica."""
        return Read(self.replicas[0], self.geo.directory, 8 << self.geo.dir_bits)

    def load(self, buf: bytes) -> None:
        entries = struct.unpack(f"<{1 << self.geo.dir_bits}Q", buf)
        if not all(e & ENTRY_VALID for e in entries):
            raise StoreFormatError("the index directory is not formatted (wrong layout?)")
        # kept without their VALID bit: depth << 32 | subtable id, ints a compiled ``lookup``
        # takes apart inline (with bit 63, each is a boxed int: a call per operation)
        self.entries = [e ^ ENTRY_VALID for e in entries]

    def lookup(self, h: KeyHash) -> tuple[int, int]:
        """(subtable id, local depth) for a key."""
        e = self.entries[h.low & self._suffix_mask]
        return e & 0xFFFFFFFF, (e >> 32) & 0xFF

    def nodes(self, sid: int) -> tuple[int, ...]:
        """The MNs holding subtable ``sid``, primary first."""
        return self._nodes[sid % self.n]

    def bucket_reads(self, sid: int, h: KeyHash, node: int) -> tuple[list[Read], tuple[int, int]]:
        """The reads of a key's two combined buckets in subtable ``sid`` on ``node``, and the
        first bucket of each (``IndexGeometry.combined``). They depend on the key's hash only
        through ``h.high``, and every operation on a key makes them: recent ones are kept."""
        got = self._reads.get((h.high, sid, node))
        if got is None:
            reads_in_c = _READS_IN_C
            if reads_in_c is not None:
                geo = self.geo
                got = reads_in_c(Read, node, h.high, self._mains,
                                 geo.subtables + sid * geo.subtable_bytes, BUCKET_BYTES)
            else:
                got = self.bucket_reads_py(sid, h, node)
            if len(self._reads) >= _KEPT_READS:
                self._reads.clear()
            self._reads[(h.high, sid, node)] = got
        return list(got[0]), got[1]

    def bucket_reads_py(self, sid: int, h: KeyHash, node: int
                        ) -> tuple[tuple[Read, Read], tuple[int, int]]:
        """``bucket_reads`` made in Python, uncached: what the C version must make
        (tests/test_index.py)."""
        m1, m2 = h.mains(self._mains)
        a1, f1 = self.geo.combined(sid, m1)
        a2, f2 = self.geo.combined(sid, m2)
        return (Read(node, a1, COMBINED), Read(node, a2, COMBINED)), (f1, f2)

    @property
    def replicas(self) -> list[int]:
        """The live MNs holding the directory, split locks and header words (first: where
        they are read and locked)."""
        return list(self._nodes[0])


#: of each of the 4 bucket headers of two combined buckets, its flags byte (bits 40-47) and
#: subtable id (bits 48-63): small ints, compared without a 64-bit int made of each header
_HEADERS: Final = struct.Struct("<5xBH" + "56x5xBH" * 3)
#: byte 5 of a slot word -> nonzero iff it has FROZEN or TENTATIVE (bits 47 and 46) set;
#: with the length in byte 6, that is all of TAKEN (``View.free_slot``)
assert TAKEN == 0xFF << 48 | 0xC0 << 40 and LEN_SHIFT == 48
_FLAGGED: Final = bytes(int(b & (FROZEN | TENTATIVE) >> 40 != 0) for b in range(256))
_SLOT_WORDS: Final = struct.Struct("<" + "8x7Q" * 4)    # the 28 slots of two combined buckets


@lru_cache(maxsize=1 << 12)
def _positions(f0: int, f1: int) -> tuple[int, ...]:
    """The slot positions of the two combined buckets whose first buckets are f0 and f1, in
    the order of their words."""
    n = 2 * SLOTS_PER_BUCKET
    return (*range(f0 * SLOTS_PER_BUCKET, f0 * SLOTS_PER_BUCKET + n),
            *range(f1 * SLOTS_PER_BUCKET, f1 * SLOTS_PER_BUCKET + n))
_WORD: Final = struct.Struct("<Q")
# View's scans of the slots, each in one C call (emulator/_atomic.c); its Python methods,
# the spec, where the extension is not built
_FREE_SLOT_IN_C: Callable[..., int | None] | None
_MATCHES_IN_C: Callable[..., list[Any]] | None
_DIFFERS_IN_C: Callable[..., bool] | None
_STALE_IN_C: Callable[..., bool] | None
_GET_IN_C: Callable[..., int | None] | None
_READS_IN_C: Callable[..., Any] | None     # its answer kept as is (see Directory._reads)
_QUIET_IN_C: Callable[..., bool] | None
try:
    from fusee.emulator._atomic import bucket_reads as _READS_IN_C
    from fusee.emulator._atomic import view_differs as _DIFFERS_IN_C
    from fusee.emulator._atomic import view_free_slot as _FREE_SLOT_IN_C
    from fusee.emulator._atomic import view_get as _GET_IN_C
    from fusee.emulator._atomic import view_matches as _MATCHES_IN_C
    from fusee.emulator._atomic import view_stale as _STALE_IN_C
except ImportError:     # pragma: no cover (a source tree without its build, or a stale one)
    _FREE_SLOT_IN_C = _MATCHES_IN_C = _DIFFERS_IN_C = None
    _STALE_IN_C = _GET_IN_C = _READS_IN_C = None
try:        # (the newest: a build older than it has the others)
    from fusee.emulator._atomic import view_quiet as _QUIET_IN_C
except ImportError:     # pragma: no cover
    _QUIET_IN_C = None
_WORD_BITS: Final = (1 << 64) - 1
#: the bits of the slot words of two combined buckets read as one little-endian integer
#: (``View.differs``): all but the 4 bucket headers
_SLOT_BITS: Final = sum(_WORD_BITS << 8 * at for at in range(0, 2 * COMBINED, 8)
                         if at % BUCKET_BYTES)


class View:
    """A key's two combined buckets in one subtable, as read from one MN (two 128-byte reads).

    Python pays per slot decoded, and a SEARCH needs only the slots whose fingerprint matches
    its key's, so nothing is decoded up front: ``stale`` comes from the 4 headers and one look
    at the FROZEN byte of every word, ``candidates`` finds the fingerprint byte with
    ``bytes.find``, ``get`` decodes one slot; ``slots`` (every position, for inserts) is
    decoded on first use. The two combined buckets are disjoint (``KeyHash.mains``).
    """

    __slots__ = ("raw", "firsts", "f0", "f1", "stale", "_slots")

    def __init__(self, bufs: Iterable[bytes] | bytes, firsts: tuple[int, int] | list[int],
                 sid: int) -> None:
        # (``bufs``: the two reads, or their bytes joined already: no list sliced for them)
        raw = self.raw = bufs if isinstance(bufs, bytes) else b"".join(bufs)
        if len(raw) != 2 * COMBINED or len(firsts) != 2:
            raise ValueError("a View needs the two combined buckets of a key")
        self.firsts = firsts
        # (as ints of their own: compiled, ``firsts`` is a tuple or a list, unpacked by a
        # generic call in every method)
        self.f0: int = firsts[0]
        self.f1: int = firsts[1]
        self._slots: dict[int, int] | None = None
        # each helper in C looked up once (a module global: a lookup of the module's dict,
        # which tests replace it in to run the Python spec)
        stale_in_c = _STALE_IN_C
        if stale_in_c is not None:
            self.stale = stale_in_c(raw, sid)
            return
        f0, s0, f1, s1, f2, s2, f3, s3 = _HEADERS.unpack_from(raw)
        # bit 47 (FROZEN) is the top bit of byte 5 of each word: all of them ASCII, none frozen
        self.stale = (s0 != sid or s1 != sid or s2 != sid or s3 != sid
                      or bool((f0 | f1 | f2 | f3) & RETIRED)
                      or not raw[5::8].isascii()      # ``frozen``, without a call
                      and any_frozen(self.slots.values()))

    def _pos(self, word: int) -> int:
        """Slot position of the ``word``-th 8-byte word of ``raw`` (not a header)."""
        return ((self.f1 if word >> 4 else self.f0) + (word >> 3 & 1)) * SLOTS_PER_BUCKET \
            + (word & 7) - 1

    @property
    def frozen(self) -> bool:
        """Some slot has the FROZEN bit (a split froze the subtable). Bit 47 is the top bit of
        byte 5 of each word: when all of those bytes are ASCII, none is frozen; the slots are
        decoded only otherwise."""
        return not self.raw[5::8].isascii() and any_frozen(self.slots.values())

    def candidates(self, fp: int) -> list[tuple[int, int]]:
        """(position, value) of the committed objects whose fingerprint is ``fp``."""
        matches_in_c = _MATCHES_IN_C
        if matches_in_c is not None:
            return matches_in_c(self.raw, None, fp, self.f0, self.f1, -1)
        raw, found = self.raw, []
        tops = raw[7::8]                    # the fingerprint byte of every word
        i = tops.find(fp, 1)
        while i >= 0:
            if i & 7:                       # not a bucket header
                (v,) = _WORD.unpack_from(raw, 8 * i)
                if v >> LEN_SHIFT & 0xFF and not v & (TENTATIVE | FROZEN):
                    found.append((self._pos(i), v))
            i = tops.find(fp, i + 1)
        return found

    def pairs(self, other: View, fp: int, skip: int) -> list[tuple[int, int, int]]:
        """(position, value here, value in ``other``) of the slots but ``skip`` whose
        fingerprint byte is ``fp`` in either view (the same buckets read twice), in the order
        of their words: found with ``bytes.find``, no slot decoded for nothing (an insert's
        duplicate check looks only at the slots naming its key's fingerprint)."""
        assert other.f0 == self.f0 and other.f1 == self.f1, "two reads of the same buckets"
        matches_in_c = _MATCHES_IN_C
        if matches_in_c is not None:
            return matches_in_c(self.raw, other.raw, fp, self.f0, self.f1, skip)
        raw, theirs = self.raw, other.raw
        tops = raw[7::8] + theirs[7::8]     # the fingerprint bytes of both: word i, 32 + i
        words = set()
        i = tops.find(fp, 1)
        while i >= 0:
            if i & 7:                       # not a bucket header
                words.add(i & 31)
            i = tops.find(fp, i + 1)
        found = []
        for i in sorted(words):
            pos = self._pos(i)
            if pos != skip:
                found.append((pos, _WORD.unpack_from(raw, 8 * i)[0],
                              _WORD.unpack_from(theirs, 8 * i)[0]))
        return found

    def differs(self, other: View, skip: int) -> bool:
        """Some slot but ``skip`` holds different values here and in ``other`` (the same
        buckets read twice): the two reads as two 256-byte integers, XORed, their headers'
        and ``skip``'s bits masked off (a handful of C operations, no copy of either read
        patched word by word)."""
        assert other.f0 == self.f0 and other.f1 == self.f1, "two reads of the same buckets"
        differs_in_c = _DIFFERS_IN_C
        if differs_in_c is not None:
            return differs_in_c(self.raw, other.raw, self.f0, self.f1, skip)
        apart = (int.from_bytes(self.raw, "little") ^ int.from_bytes(other.raw, "little")
                 ) & _SLOT_BITS
        at = self._offset(skip)
        if at is not None:
            apart &= ~(_WORD_BITS << 8 * at)
        return apart != 0

    def quiet(self, other: View, fp: int, skip: int) -> bool:
        """No slot but ``skip`` holds different values here and in ``other`` (the same
        buckets read twice), nor a fingerprint byte of ``fp``: neither ``pairs`` nor
        ``differs`` finds one (an insert's duplicate check with nothing to look at), in one
        C call where the extension is built."""
        assert other.f0 == self.f0 and other.f1 == self.f1, "two reads of the same buckets"
        quiet_in_c = _QUIET_IN_C
        if quiet_in_c is not None:
            return quiet_in_c(self.raw, other.raw, fp, self.f0, self.f1, skip)
        return not self.pairs(other, fp, skip) and not self.differs(other, skip)

    def _offset(self, pos: int) -> int | None:
        """Where slot ``pos``'s word is in ``raw``; None when the view does not hold it."""
        bucket, slot = divmod(pos, SLOTS_PER_BUCKET)
        for i, first in enumerate(self.firsts):
            if 0 <= bucket - first < 2:
                return 128 * i + 64 * (bucket - first) + 8 + 8 * slot
        return None

    def get(self, pos: int) -> int | None:
        """The value of slot ``pos``, or None when the view does not hold it."""
        if self._slots is not None:
            return self._slots.get(pos)
        f0, f1 = self.f0, self.f1           # (``_offset`` inline: a call less per operation)
        get_in_c = _GET_IN_C
        if get_in_c is not None:
            return get_in_c(self.raw, f0, f1, pos)
        b, s = divmod(pos, SLOTS_PER_BUCKET)
        b -= f0                             # the bucket's index in ``raw``: 0..3
        if not 0 <= b < 2:
            b += f0 - f1 + 2
            if not 2 <= b < 4:
                return None
        value: int = _WORD.unpack_from(self.raw, 64 * b + 8 + 8 * s)[0]
        return value

    def free_slot(self, skip: Iterable[int] = ()) -> int | None:
        """The free position an insert claims: the lowest of the emptiest bucket (so buckets
        fill evenly), not one of ``skip``; None when every slot is taken. Read for all 32
        words at once from the two bytes that hold TAKEN's bits (the length byte, and FROZEN
        and TENTATIVE at the top of byte 5), not slot by slot; in one C call where the
        extension is built."""
        f0, f1 = self.f0, self.f1
        free_slot_in_c = _FREE_SLOT_IN_C
        if free_slot_in_c is not None:
            mask = 0                        # the words of ``skip``
            for pos in skip:
                b, s = divmod(pos, SLOTS_PER_BUCKET)
                b = b - f0 if 0 <= b - f0 < 2 else b - f1 + 2
                mask |= 1 << 8 * b + 1 + s
            return free_slot_in_c(self.raw, f0 * SLOTS_PER_BUCKET, f1 * SLOTS_PER_BUCKET, mask)
        raw = self.raw
        taken = (int.from_bytes(raw[6::8], "little")
                 | int.from_bytes(raw[5::8].translate(_FLAGGED), "little"))
        row = bytearray(taken.to_bytes(32, "little"))      # 0: the word's slot is free
        for pos in skip:
            b, s = divmod(pos, SLOTS_PER_BUCKET)
            b = b - f0 if 0 <= b - f0 < 2 else b - f1 + 2
            row[8 * b + 1 + s] = 1
        first, second = f0 * SLOTS_PER_BUCKET, f1 * SLOTS_PER_BUCKET
        best, most = -1, 0
        # each bucket's first slot word, and the position of its first slot (``_pos`` inline)
        for w, at in ((1, first), (9, first + SLOTS_PER_BUCKET), (17, second),
                      (25, second + SLOTS_PER_BUCKET)):
            free = row.count(0, w, w + SLOTS_PER_BUCKET)
            if free and free >= most:
                pos = at + row.find(0, w) - w
                if free > most or pos < best:
                    best, most = pos, free
        return best if most else None

    @property
    def slots(self) -> dict[int, int]:
        """{position: value} of all 28 slots."""
        if self._slots is None:
            self._slots = dict(zip(_positions(*self.firsts), _SLOT_WORDS.unpack_from(self.raw)))
        return self._slots
