"""emulator/_atomic.c's ``u64_of``: every verb operand the C fast paths take (``run`` on shm,
``pack`` on zmq) is read as an unsigned 64-bit int there, from CPython's digits where it can
(issue 12: a slot value of three 30-bit digits went through PyLong_AsUnsignedLongLong, about
1k instructions per UPDATE). Its spec: an exact int ``x`` that ``x.to_bytes(8, "little")``
takes, and that value; anything else is refused (None: the caller's Python path then runs)."""

from __future__ import annotations

import random

import msgpack

from fusee.emulator import _atomic, wire
from fusee.verbs import Cas, Faa, Read, Write

KINDS = (Read, Write, Cas, Faa)


def spec(x: object) -> int | None:
    """What ``u64_of`` must read of ``x``: its value, or None (refused)."""
    if type(x) is not int:
        return None
    try:
        return int.from_bytes(x.to_bytes(8, "little"), "little")
    except OverflowError:
        return None


def read_by_c(x: object) -> int | None:
    """``x`` as ``u64_of`` read it: ``pack``'s seq, None where it refused it."""
    packed = _atomic.pack(x, 0, [], KINDS)
    if packed is None:
        return None
    verbs, seq, rkey, reqs = msgpack.unpackb(packed)
    assert (verbs, rkey, reqs) == (wire.VERBS, 0, [])
    return seq


def test_every_operand_is_read_as_its_unsigned_64_bit_value_or_refused():
    rng = random.Random(12)
    edges = [0, 1, (1 << 30) - 1, 1 << 30, (1 << 60) - 1, 1 << 60, (1 << 63) - 1, 1 << 63,
             (1 << 64) - 1, 1 << 64, (1 << 64) + 1, (1 << 68) - 1, 1 << 90, 1 << 200,
             -1, -(1 << 60), -(1 << 63), -(1 << 64), -(1 << 64) - 1, True, False, 1.0, "1"]
    # every bit length, and three-digit ints (2**60 .. 2**90) with every top digit
    drawn = [rng.getrandbits(bits) | 1 << bits for bits in range(100) for _ in range(50)]
    drawn += [(top << 60) | rng.getrandbits(60) for top in range(1 << 10)]
    drawn += [-x for x in drawn[::7]]
    for x in edges + drawn:
        assert read_by_c(x) == spec(x), x
