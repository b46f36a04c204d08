"""The crc32 an object is checked by, folded in C with carry-less multiplies
(``crc32_folded`` in emulator/_atomic.c, which ``object_crc`` uses where the CPU has
PCLMULQDQ), is zlib's: on random data of every length around its 16- and 64-byte steps, from
any start value, at any alignment, and on damaged copies of real objects."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from fusee.emulator import _atomic
from fusee.layout import INSERT, encode_object, object_bytes

if _atomic.crc32(b"", 0) is None:      # pragma: no cover (no PCLMULQDQ: isal's crc32 runs)
    pytest.skip("this CPU cannot fold a crc32 (object_crc calls ISA-L's)",
                allow_module_level=True)


def test_the_folded_crc32_is_zlib_s_on_random_data():
    rng = random.Random(32)
    for n in [*range(0, 300), *rng.sample(range(300, 5000), 300)]:
        data = os.urandom(n + 15)
        start = rng.choice([0, rng.getrandbits(32), 0xFFFFFFFF])
        skew = rng.randrange(16)                # unaligned too
        view = memoryview(data)[skew:skew + n]
        assert _atomic.crc32(view, start) == zlib.crc32(view, start), (n, skew, start)


def test_the_folded_crc32_is_zlib_s_on_damaged_objects():
    rng = random.Random(33)
    for _ in range(2000):
        key, value = os.urandom(rng.randrange(1, 64)), os.urandom(rng.randrange(2000))
        obj = bytearray(encode_object(key, value, object_bytes(len(key), len(value)), INSERT,
                                      rng.getrandbits(48), rng.getrandbits(48),
                                      rng.randrange(1 << 16)))
        for _ in range(rng.randrange(3)):
            obj[rng.randrange(len(obj))] ^= 1 << rng.randrange(8)
        cut = rng.randrange(len(obj) + 1)
        assert _atomic.crc32(obj[:cut], 0) == zlib.crc32(obj[:cut])
