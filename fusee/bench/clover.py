"""The Clover-style baseline: a *semi*-disaggregated key-value store (Tsai et al., ATC '20).

What FUSEE is measured against: values live on the same memory nodes and are read
and written with one-sided verbs through our transports, but the index and the allocator live
on one metadata server (MS) process, reached by RPC over ZeroMQ (``clover_server``). Every
INSERT, UPDATE and DELETE costs one RPC: the MS allocates the new version, switches the index
to it and returns the previous one. SEARCH is one-sided when the client's cache knows where the
key lives, one RPC more when it does not.

Versions of a key form a chain, as in Clover: a writer writes its new version (r replicas,
one batch) and in the same batch links the previous version to it. A reader with a cached
address READs it and follows links to the newest version. Each allocation carries a 16-bit tag
that its header repeats and its link must carry, so a link left in memory by an earlier life of
a reused slot is ignored; the MS reuses freed memory only after a grace period longer than any
operation, and gives a reused slot a tag different from its previous life's (whose link is
what the slot still holds). The baseline keeps no operation log and survives no crash: it is a
performance reference, given its best case (one RPC per write, batched per step, cached reads).

Object, ``size`` bytes (a multiple of 64) at the same key's replica nodes::

    +0 u64 link (tag 16 | units 8 | addr 40; units = 0: deleted)  +8 u32 crc32 of +12..end
    +12 u16 tag  +14 u16 key length  +16 u32 value length  +20 u32 0  +24 key, value

Design: docs/design.md#baselines.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import msgpack
import xxhash
import zmq

from fusee.errors import CorruptObject, KeyExists, KeyNotFound, ValueTooLarge
from fusee.verbs import Read, TransportError, Write

if TYPE_CHECKING:
    from fusee.transports.base import Transport

T = TypeVar("T")
#: an operation on Clover: yields batches of verbs and Rpcs (``CloverExecutor``)
CloverOp = Generator[list[Any], Any, T]

UNIT = 64
HEADER = 24
MAX_UNITS = 255
ADDR_BITS = 40
#: RPC operations and reply statuses (msgpack: [seq, [[op, key, size], ...]] -> [seq, [[st, x]]])
LOOKUP, INSERT, UPDATE, DELETE = "lookup", "insert", "update", "delete"
OK, EXISTS, MISSING, FAILED = 0, 1, 2, 3

_HEAD = struct.Struct("<QIHHII")
_U64 = struct.Struct("<Q")


class Rpc(NamedTuple):
    """A request for the metadata server, posted in a batch next to verbs."""
    op: str
    key: bytes
    size: int = 0


def object_size(key_len: int, value_len: int) -> int:
    size = -(-(HEADER + key_len + value_len) // UNIT) * UNIT
    if size > MAX_UNITS * UNIT or key_len > 0xFFFF:
        raise ValueTooLarge(f"the Clover baseline stores objects up to {MAX_UNITS * UNIT} bytes")
    return size


def replica_nodes(key: bytes, n_nodes: int, r: int) -> list[int]:
    first = xxhash.xxh64_intdigest(key) % n_nodes
    return [(first + i) % n_nodes for i in range(r)]


def link(tag: int, size: int, addr: int) -> int:
    return (tag << 48) | ((size // UNIT) << ADDR_BITS) | addr


def encode_body(tag: int, key: bytes, value: bytes, size: int) -> bytes:
    """Everything but the link word: the writer must not overwrite a link that the next
    writer of the key may already have stored there."""
    rest = struct.pack("<HHII", tag, len(key), len(value), 0) + key + value
    rest += bytes(size - HEADER - len(key) - len(value))
    return struct.pack("<I", zlib.crc32(rest)) + rest


def decode(buf: bytes, key: bytes) -> tuple[Any, ...] | None:
    """-> ('value', v) | ('link', size, addr) | ('deleted',) | None (not this key's version)."""
    if len(buf) < HEADER:
        return None
    word, crc, tag, klen, vlen, _ = _HEAD.unpack_from(buf)
    if HEADER + klen + vlen > len(buf) or buf[HEADER:HEADER + klen] != key:
        return None
    if zlib.crc32(memoryview(buf)[12:]) != crc:
        return None                             # being written, or a reused slot
    if word >> 48 != tag:
        return ("value", bytes(buf[HEADER + klen:HEADER + klen + vlen]))
    units, addr = (word >> ADDR_BITS) & 0xFF, word & ((1 << ADDR_BITS) - 1)
    return ("deleted",) if units == 0 else ("link", units * UNIT, addr)


class CloverClient:
    """Operation generators of one client; they yield batches of verbs and ``Rpc``s that a
    ``CloverExecutor`` runs (``fusee.driver.run`` / ``run_concurrently``)."""

    def __init__(self, n_nodes: int, replicas: int, timeout: float = 5.0) -> None:
        self.n_nodes, self.r, self.timeout = n_nodes, replicas, timeout
        self.cache: dict[bytes, tuple[int, int]] = {}      # key -> (size, primary address)
        self.cache_hits = self.cache_misses = 0

    def search(self, key: bytes) -> CloverOp[bytes | None]:
        primary = replica_nodes(key, self.n_nodes, self.r)[0]
        where = self.cache.get(key)
        if where is None:
            self.cache_misses += 1
        else:
            self.cache_hits += 1
        previous = None                         # (size, addr) of the version replaced
        inserting = False
        deadline = None
        while True:
            if where is None:
                ((status, found),) = yield [Rpc(LOOKUP, key)]
                if status == MISSING:
                    return None
                size, addrs, previous = found
                where, inserting = (size, addrs[0]), previous is None
            (buf,) = yield [Read(primary, where[1], where[0])]
            got = decode(buf, key)
            if got is not None and got[0] == "value":
                self.cache[key] = where
                value: bytes = got[1]
                return value
            if got is not None and got[0] == "link":
                where, previous, inserting = got[1:], None, False
                continue
            if got is None and inserting:
                return None                     # an insert still writing its object
            if got is None and previous is not None:
                # The MS published a version that its writer has not written yet, so the
                # version it replaces is still the value: that one gets its link only in the
                # batch that writes the new version, after it.
                (buf,) = yield [Read(primary, previous[1], previous[0])]
                old, previous = decode(buf, key), None
                if old is not None and old[0] == "value":
                    previous_value: bytes = old[1]
                    return previous_value
                continue                        # linked meanwhile: read the new one again
            # deleted, or a stale cached address (reused slot): ask the MS
            self.cache.pop(key, None)
            where = None
            now = time.monotonic()
            deadline = deadline or now + self.timeout
            if now > deadline:
                raise CorruptObject(f"clover: no readable version of {key!r} "
                                    f"within {self.timeout:g} s")

    def insert(self, key: bytes, value: bytes) -> CloverOp[None]:
        return (yield from self._write(INSERT, key, value))

    def update(self, key: bytes, value: bytes) -> CloverOp[None]:
        return (yield from self._write(UPDATE, key, value))

    def delete(self, key: bytes) -> CloverOp[None]:
        nodes = replica_nodes(key, self.n_nodes, self.r)
        ((status, old),) = yield [Rpc(DELETE, key)]
        if status == MISSING:
            raise KeyNotFound(key)
        old_tag, _, old_addrs = old
        yield [Write(n, a, _U64.pack(link(old_tag, 0, 0))) for n, a in zip(nodes, old_addrs)]
        self.cache.pop(key, None)

    def _write(self, op: str, key: bytes, value: bytes) -> CloverOp[None]:
        size = object_size(len(key), len(value))
        nodes = replica_nodes(key, self.n_nodes, self.r)
        ((status, got),) = yield [Rpc(op, key, size)]
        if status == EXISTS:
            raise KeyExists(key)
        if status == MISSING:
            raise KeyNotFound(key)
        tag, addrs, old = got
        body = encode_body(tag, key, value, size)
        batch = [Write(n, a + 8, body) for n, a in zip(nodes, addrs)]
        if old is not None:                     # link the previous version to this one
            old_tag, _, old_addrs = old
            word = _U64.pack(link(old_tag, size, addrs[0]))
            batch += [Write(n, a, word) for n, a in zip(nodes, old_addrs)]
        yield batch
        self.cache[key] = (size, addrs[0])


class MetadataServerError(RuntimeError):
    """The metadata server refused a request or did not answer in time."""


class CloverExecutor:
    """Executes batches of verbs and ``Rpc``s: the RPCs of a batch travel in one message to
    the MS while the verbs run on the transport, so a batch is still one round trip."""

    def __init__(self, transport: Transport, endpoint: str, timeout: float) -> None:
        self.transport, self.timeout = transport, timeout
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seq = 0
        self.round_trips = self.rpcs = 0

    def _reply(self, seq: int, n: int) -> list[Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise MetadataServerError(f"metadata server: no reply within {self.timeout:g} s")
            try:
                rseq, replies = msgpack.unpackb(self.sock.recv(), raw=False)
            except (ValueError, TypeError, msgpack.UnpackException) as e:
                raise MetadataServerError(f"metadata server: malformed reply ({e})") from None
            if rseq == seq:
                break                           # else: late reply to a timed-out request
        if len(replies) != n or any(st == FAILED for st, _ in replies):
            raise MetadataServerError(f"metadata server refused: {replies}")
        answers: list[Any] = replies
        return answers

    def execute(self, batch: Sequence[Any]) -> list[Any]:
        self.round_trips += 1
        rpcs = [i for i, req in enumerate(batch) if type(req) is Rpc]
        if not rpcs:
            done: list[Any] = self.transport.execute(batch)
            return done
        self.rpcs += len(rpcs)
        self.seq += 1
        seq = self.seq
        self.sock.send(msgpack.packb([seq, [list(batch[i]) for i in rpcs]]))
        verb_pos = [i for i, req in enumerate(batch) if type(req) is not Rpc]
        failure = None
        try:                                    # the verbs run while the MS works
            done = self.transport.execute([batch[i] for i in verb_pos]) if verb_pos else []
        except TransportError as e:
            failure, done = e, e.results or [e] * len(verb_pos)
        replies = self._reply(seq, len(rpcs))
        results: list[Any] = [None] * len(batch)
        for i, r in zip(rpcs, replies):
            results[i] = r
        for i, r in zip(verb_pos, done):
            results[i] = r
        if failure is not None:
            raise type(failure)(str(failure), failure.node, results)
        return results

    def close(self) -> None:
        self.sock.close(0)
