"""Byte formats on the memory nodes: index slots, bucket headers, KV objects and their embedded
log entries (docs/design.md#slots and #kv-objects). All integers are little-endian.

Slot (one 8-byte atomic word)::

    bits 56-63  fingerprint              bits 48-55  length in allocation units (0: no object)
    bit  47     FROZEN (subtable split)  bit  46     TENTATIVE (an r=1 insert's claim)
    bits 40-45  memory node id           bits 32-39  generation: the object's seq mod 256
    bits  0-31  address / allocation unit

The generation tells apart the objects that one address holds in turn: freed memory comes
back for the same key and size (at once, in the largest class), and without it a slot would
go back to an old value, under SNAPSHOT rounds (a writer's CASes landing in two rounds with
the same old value) and under readers and duplicate checks holding that value (ABA).
0 is an empty slot. Any other value with length 0 is a *tombstone* (a DELETE's proposal) or a
*void* (ends the round of a withdrawn insert claim): free slots, made of the writer's client id
and a per-client sequence number (``free_value``), so SNAPSHOT proposals stay distinct and a
slot never goes back to an old value.
The same pointer format (with fingerprint and generation 0) links log entries.

Bucket (64 bytes) = header + 7 slots. Header: bits 0-31 suffix, 32-39 local depth,
40-47 flags (RETIRED), 48-63 subtable id.

KV object (``units * unit`` bytes, written in ONE write per replica)::

    +0  u8 valid (0xFE)  u8 0  u16 key_len  u32 value_len
    +8  key, value, zero padding
    end-48: log entry (48 bytes), last byte = used
       +0  u64 next       the client's next object of this size class (known in advance)
       +8  u64 prev       the previous one (0 at the list head)
       +16 u64 record     \\  commit record, written by the writer once it knows its outcome:
                           |  bits 0-47 slot_ref, 48-55 record number (the newest of a torn
                           |  set of replicas wins), 56-63 state: 0 pending, 1 committed,
                           |  2 lost, 3 aborted (explicit, so visible when old_value is 0)
       +24 u64 old_value   |  the slot value replaced
       +32 u32 old_crc     |  the crc of the object old_value named (tells that instance from a
                           |  later object in reused memory), 0 when it named none
       +36 u32 commit_crc /   crc32(+16..+36), so a torn record reads as pending
       +40 u8  opcode     1 insert, 2 update, 3 delete
       +41 u16 seq        allocation sequence of the client in this class (mod 2**16)
       +43 u32 crc        crc32 of header, key, value, padding, next, prev, opcode, seq
       +47 u8  used       1 once written; the owner writes 0 when it takes a freed object back

Client metadata slot: magic, group count, log list heads, incarnation counter, the STATE word
(CLEAN when nothing of the id is in flight, IN_USE while a client holds it), the RECOVERY lock
(recoverer + 1 while a recovery runs), then the block group records.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

# ISA-L's crc32: zlib's polynomial and results, several times faster on a 1 KB object
from isal.isal_zlib import crc32

from fusee.errors import Arg, KeyTooLarge, WrongType


def _in_c(name: str) -> Callable[..., Any] | None:
    try:
        from fusee.emulator import _atomic
    except ImportError:     # pragma: no cover (a source tree without its build)
        return None
    found: Callable[..., Any] | None = getattr(_atomic, name, None)    # (None: a stale build)
    return found


# the objects and commit records every write makes, and the objects every read decodes, each
# in one C call (emulator/_atomic.c); this module's Python functions where it is not built.
# The writes' are Final: a compiled caller reads them (and crc32) from C statics, not from the
# module's dict; the decoder is not, so that the tests can run its Python spec in its place
_ENCODE_IN_C: Final = _in_c("encode_object")
_RECORD_IN_C: Final = _in_c("commit_record")
_DECODE_IN_C: Callable[..., Any] | None = _in_c("decode_object")
_CRC32: Final = crc32

FP_SHIFT: Final = 56
LEN_SHIFT: Final = 48
NODE_SHIFT: Final = 40
FROZEN: Final = 1 << 47
TENTATIVE: Final = 1 << 46
ADDR_MASK: Final = (1 << 32) - 1
GEN_SHIFT: Final = 32
GEN_MASK: Final = 0xFF
FREE_SEQ_MASK: Final = (1 << 40) - 1       # the sequence number bits of a tombstone / void
NODE_MASK: Final = 0x3F
MAX_NODES: Final = NODE_MASK + 1
_NOT_PTR: Final = ~(NODE_MASK << NODE_SHIFT | ADDR_MASK)    # bits an object pointer never has
MAX_CLIENT_IDS: Final = (1 << 14) - 2     # what a free value can name, less the failover's own
FAILOVER_ID: Final = MAX_CLIENT_IDS        # the free values a failover writes name this id
MAX_UNITS: Final = 255
SLOTS_PER_BUCKET: Final = 7
BUCKET_BYTES: Final = 64

#: object size classes, in allocation units
CLASSES: Final = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 255)

OBJ_HEADER: Final = 8
LOG_BYTES: Final = 48
VALID: Final = 0xFE
INSERT: Final = 1
UPDATE: Final = 2
DELETE: Final = 3
PENDING: Final = 0
COMMITTED: Final = 1
LOST: Final = 2
ABORTED: Final = 3
RETIRED: Final = 1

_HDR: Final = struct.Struct("<BBHI")
_LOG_LINKS: Final = struct.Struct("<QQ")
_COMMIT: Final = struct.Struct("<QQII")  # record word, old_value, old_crc, commit_crc (+16..+40)
_TAIL: Final = struct.Struct("<BHIB")          # opcode, seq, crc, used (+40..+48)
_U64: Final = struct.Struct("<Q")
_TAIL_CRC: Final = struct.Struct("<3xI")     # the crc of ``_TAIL``
#: its ``unpack_from``, bound once: compiled, a call of a C static, not a method looked up
_TAIL_CRC_OF: Final = _TAIL_CRC.unpack_from
_OPSEQ: Final = struct.Struct("<BH")           # opcode, seq: the last bytes the object crc covers
_ENTRY: Final = struct.Struct("<QQQQIIBHIB")   # the whole log entry: links, commit record, tail
_RECORD: Final = struct.Struct("<QQI")  # the commit record minus its crc: what the crc covers
_U32: Final = struct.Struct("<I")
_NO_COMMIT: Final = bytes(_COMMIT.size)         # a fresh object's commit record: pending


# -- slots -----------------------------------------------------------------------------------
def make_slot(fp: int, units: int, node: int, addr: int, unit: int, seq: int = 0) -> int:
    """The slot value naming the object of allocation sequence ``seq`` at ``node:addr``."""
    return ((fp << FP_SHIFT) | (units << LEN_SHIFT) | ((seq & GEN_MASK) << GEN_SHIFT)
            | ptr_bits(node, addr, unit))


def object_slot(fp: int, units: int, ptr: int, seq: int) -> int:
    """``make_slot`` for an object pointer as the allocator hands it out (``ptr_bits``: node
    and address, checked when the allocator made it): what every write's proposal is."""
    assert not ptr & _NOT_PTR, f"not an object pointer: {ptr:#x}"
    # the low 56 bits first: compiled, they stay a machine word; only the fingerprint's
    # shift and OR take a 64-bit (boxed) integer
    return (fp << FP_SHIFT) | ((units << LEN_SHIFT) | ((seq & GEN_MASK) << GEN_SHIFT) | ptr)


def ptr_bits(node: int, addr: int, unit: int) -> int:
    if addr % unit or not 0 <= node < MAX_NODES or addr // unit > ADDR_MASK:
        raise ValueError(f"bad object address {node}:{addr:#x}")
    return (node << NODE_SHIFT) | (addr // unit)


def slot_fp(v: int) -> int:
    return v >> FP_SHIFT


def slot_units(v: int) -> int:
    return (v >> LEN_SHIFT) & 0xFF


def slot_node(v: int) -> int:
    return (v >> NODE_SHIFT) & NODE_MASK


def slot_addr(v: int, unit: int) -> int:
    return (v & ADDR_MASK) * unit


def object_extent(v: int, unit: int) -> tuple[int, int, int]:
    """(node, address, length) of the object slot value ``v`` names: what a read of it
    needs, in one call (``slot_node``, ``slot_addr`` and ``slot_units`` at once)."""
    # (a slot value has bits above 62: compiled, each operation on it is one on a boxed
    # long, a new object each; two of them leave ints that fit a machine word)
    low = v & 0xFFFF_FFFF_FFFF         # the bits below LEN_SHIFT: node and address
    return low >> NODE_SHIFT & NODE_MASK, (low & ADDR_MASK) * unit, (v >> LEN_SHIFT & 0xFF) * unit


LEN_BITS: Final = 0xFF << LEN_SHIFT
#: a slot value ``v`` is free (``is_free``) iff ``not v & TAKEN``: one test inline, for the
#: loops over every slot of a bucket that the fast path makes
TAKEN: Final = FROZEN | TENTATIVE | LEN_BITS


def slot_gen(v: int) -> int:
    return (v >> GEN_SHIFT) & GEN_MASK


def is_object(v: int) -> bool:
    """The slot names a KV object (committed unless TENTATIVE)."""
    return v & LEN_BITS != 0


def is_free(v: int) -> bool:
    """Empty, tombstone or void, not frozen, not claimed: an insert may take it."""
    return not v & TAKEN


def committed_object(v: int) -> bool:
    return v & LEN_BITS != 0 and not v & (TENTATIVE | FROZEN)


def any_frozen(values: Iterable[int]) -> bool:
    """Some slot value of ``values`` has the FROZEN bit: one pass in C, no Python-level call
    per slot (a duplicate check tests every slot of two combined buckets)."""
    return any(map(FROZEN.__and__, values))


def strip(v: int) -> int:
    return v & ~(FROZEN | TENTATIVE)


def free_value(client_id: int, seq: int) -> int:
    """A tombstone / void (length 0): unique per writer and sequence number, so a slot never
    returns to an old value. Client id + 1 in the node bits and the fingerprint byte, the
    sequence number in the 40 generation and address bits."""
    c = client_id + 1
    return ((c >> 6) << FP_SHIFT) | ((c & NODE_MASK) << NODE_SHIFT) | (seq & FREE_SEQ_MASK)


def free_value_of(v: int, client_id: int) -> bool:
    """``v`` is a tombstone / void that ``client_id`` proposed (``free_value``)."""
    c = client_id + 1
    return (v != 0 and not v & (0xFF << LEN_SHIFT | FROZEN | TENTATIVE) and v >> FP_SHIFT == c >> 6
            and (v >> NODE_SHIFT) & NODE_MASK == c & NODE_MASK)


def slot_ref(subtable: int, pos: int) -> int:
    return (subtable << 32) | pos


# -- bucket headers --------------------------------------------------------------------------
def bucket_header(subtable: int, depth: int, suffix: int, flags: int = 0) -> int:
    return suffix | (depth << 32) | (flags << 40) | (subtable << 48)


def parse_header(h: int) -> tuple[int, int, int, int]:
    """(subtable, depth, suffix, flags)"""
    return h >> 48, (h >> 32) & 0xFF, h & 0xFFFFFFFF, (h >> 40) & 0xFF


# -- objects ---------------------------------------------------------------------------------
def check_key(key: Arg, max_key_size: int) -> bytes:
    """Return ``key`` as bytes or raise WrongType / KeyTooLarge. (Here, compiled, rather
    than in ``fusee.errors``, which stays Python: every operation of the API checks its key,
    and an interpreted call cost ~2k instructions of each; issue 12.)"""
    if type(key) is bytes and 0 < len(key) <= max_key_size:     # the common case
        same: bytes = key
        return same
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise WrongType(f"keys are bytes, got {type(key).__name__}")
    made = bytes(key)
    if not made:
        raise KeyTooLarge(f"the empty key is not allowed: a key has 1 to {max_key_size} bytes")
    if len(made) > max_key_size:
        raise KeyTooLarge(f"a key of {len(made)} bytes is too long: a key has 1 to "
                          f"{max_key_size} bytes (layout.max_key_size)")
    return made


def check_value(value: Arg) -> bytes:
    """Return ``value`` as bytes or raise WrongType (its size is checked by the allocator,
    ``ObjectLog.units_for``)."""
    if type(value) is bytes:
        same: bytes = value
        return same
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise WrongType(f"values are bytes, got {type(value).__name__}")
    return bytes(value)


def size_class(nbytes: int, unit: int) -> int | None:
    """Smallest class (in units) holding ``nbytes``, or None if too large."""
    need = -(-nbytes // unit)
    return CLASS_OF[need] if need <= MAX_UNITS else None


#: the size class of an object of ``need`` units (``need`` <= MAX_UNITS)
CLASS_OF = [next(c for c in CLASSES if c >= need) for need in range(MAX_UNITS + 1)]


def object_bytes(key_len: int, value_len: int) -> int:
    return OBJ_HEADER + key_len + value_len + LOG_BYTES


def encode_object(key: bytes, value: bytes, size: int, opcode: int, next_ptr: int,
                  prev_ptr: int, seq: int) -> bytes:
    """The bytes of a KV object with its log entry, commit record pending (the format in
    the module docstring). Made in one C call where the extension is built."""
    if _ENCODE_IN_C is not None:
        encoded: bytes = _ENCODE_IN_C(_CRC32, key, value, size, opcode, next_ptr, prev_ptr,
                                      seq & 0xFFFF)
        return encoded
    return encode_object_py(key, value, size, opcode, next_ptr, prev_ptr, seq)


def encode_object_py(key: bytes, value: bytes, size: int, opcode: int, next_ptr: int,
                     prev_ptr: int, seq: int) -> bytes:
    """``encode_object`` in Python: what the C version must make, byte for byte
    (tests/test_layout.py)."""
    klen, vlen = len(key), len(value)
    seq &= 0xFFFF
    # built as one join with the crc accumulated piecewise: no scratch buffer, one copy
    head = _HDR.pack(VALID, 0, klen, vlen)
    pad = bytes(size - LOG_BYTES - OBJ_HEADER - klen - vlen)
    links = _LOG_LINKS.pack(next_ptr, prev_ptr)
    crc = crc32(links, crc32(pad, crc32(value, crc32(key, crc32(head)))))
    crc = crc32(_OPSEQ.pack(opcode, seq), crc)
    return b"".join((head, key, value, pad, links, _NO_COMMIT,
                     _TAIL.pack(opcode, seq, crc, 1)))


class ObjectView(NamedTuple):
    key: bytes
    value: bytes
    opcode: int
    next: int
    prev: int
    seq: int
    state: int          # commit state (PENDING if the commit record does not verify)
    slot_ref: int
    old_value: int
    old_crc: int = 0    # crc of the object old_value named
    number: int = 0     # record number: which of two torn records is newer
    crc: int = 0        # this object's own crc (its identity against reused memory)


def decode_object(buf: bytes) -> ObjectView | None:
    """Parse and verify an object read whole; None when it is not a valid, complete object."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    if _DECODE_IN_C is not None:        # (in one C call where the extension is built)
        view: ObjectView | None = _DECODE_IN_C(crc32, ObjectView, buf)
        return view
    log = len(buf) - LOG_BYTES
    if log < OBJ_HEADER:
        return None
    valid, _, klen, vlen = _HDR.unpack_from(buf, 0)
    end = OBJ_HEADER + klen + vlen
    if valid != VALID or end > log:
        return None
    nxt, prev, rec, old, old_crc, ccrc, opcode, seq, crc, used = _ENTRY.unpack_from(buf, log)
    # crc of everything up to the commit record, then of opcode and seq (their raw bytes)
    if used != 1 or crc != crc32(buf[log + 40:log + 43], crc32(buf[:log + 16])):
        return None
    state = rec >> 56
    if state != PENDING and ccrc != crc32(buf[log + 16:log + 36]):
        state, rec, old, old_crc = PENDING, 0, 0, 0
    return _new_view(ObjectView, (buf[OBJ_HEADER:OBJ_HEADER + klen], buf[OBJ_HEADER + klen:end],
                                  opcode, nxt, prev, seq, state, rec & REF_MASK, old, old_crc,
                                  (rec >> 48) & 0xFF, crc))


_new_view = tuple.__new__       # ObjectView(...) minus its Python-level __new__: a hot path


def commit_record(ref: int, old: int, state: int, old_crc: int = 0, number: int = 0) -> bytes:
    """Bytes to WRITE at ``object + size - 48 + 16``: the writer's outcome
    (docs/design.md#commit-records). Made in one C call where the extension is built."""
    if _RECORD_IN_C is not None:
        record: bytes = _RECORD_IN_C(ref, old, state, old_crc, number)
        return record
    return commit_record_py(ref, old, state, old_crc, number)


def commit_record_py(ref: int, old: int, state: int, old_crc: int = 0, number: int = 0
                     ) -> bytes:
    """``commit_record`` in Python: what the C version must make (tests/test_layout.py)."""
    head = _RECORD.pack(ref | (number & 0xFF) << 48 | state << 56, old, old_crc)
    return head + _U32.pack(crc32(head))


def object_tail(word: bytes) -> tuple[int, int]:
    """(crc, used) from an object's last 8 bytes: who it is, and whether its owner took it
    back (used 0) since it was freed."""
    _, _, crc, used = _TAIL.unpack(word)
    return crc, used


def object_crc(word: bytes) -> int:
    """``object_tail(word)[0]``, the crc alone: one unpack, no tuples of ours (a cached
    UPDATE or DELETE checks it on every write)."""
    crc: int = _TAIL_CRC_OF(word)[0]
    return crc


COMMIT_OFFSET: Final = 16          # of the commit record inside the log entry
TAIL_BYTES: Final = _TAIL.size     # the object's last bytes: opcode, seq, crc, used
REF_MASK: Final = (1 << 48) - 1    # the slot_ref bits of the record word
NO_SLOT: Final = REF_MASK          # slot_ref of an operation that never proposed


def pack_u64(v: int) -> bytes:
    # (compiled, ``to_bytes`` of "little" is a C primitive; ``_U64.pack`` a Python method call)
    return v.to_bytes(8, "little")


def unpack_u64(b: bytes | bytearray | memoryview, offset: int = 0) -> int:
    value: int = _U64.unpack_from(b, offset)[0]
    return value


# -- client metadata slot (MemoryMap.client_meta) and data block headers ---------------------
META_MAGIC: Final = 0x314154454D454546     # b"FEEMETA1"
META_MAGIC_OFF: Final = 0
META_GROUPS: Final = 8
META_HEADS: Final = 16
META_INCARNATION: Final = 144
META_RECORDS: Final = 256
META_STATE: Final = 152
META_RECOVERY: Final = 160
CLEAN: Final = 0                # META_STATE: CLEAN, or IN_USE | a holder's nonce << 1
IN_USE: Final = 1
BLOCK_MAGIC: Final = 0x314B4C4245455546    # b"FUEEBLK1"
BLOCK_HEADER: Final = 256  # magic, owner, r, replica list, mark; then the free bitmap
#: the header's last word: the *write mark* its owner moves, on the group's home, with every
#: write into the group while one of its MNs is dead (``Allocator.mark``, ``fusee.rebuild``)
BLOCK_MARK: Final = BLOCK_HEADER - 8
MAX_REPLICAS: Final = (BLOCK_MARK - 16) // 8


def encode_block_header(owner: int, index: int, replicas: list[tuple[int, int]]) -> bytes:
    """+0 magic, +8 u32 owner, u16 r, u16 index in group, +16 u64 node << 48 | addr each."""
    out = struct.pack("<QIHH", BLOCK_MAGIC, owner, len(replicas), index)
    return out + b"".join(pack_u64((n << 48) | a) for n, a in replicas)


def group_record(node: int, addr: int) -> int:
    return (node << 48) | addr
