"""``key_hash`` splits xxHash's 128-bit digest into its words without making the 128-bit int
(issue 12): the same KeyHash as the definition, ``key_hash_py``, on every key."""

from __future__ import annotations

import random

from fusee.hashing import key_hash, key_hash_py


def test_key_hash_equals_its_definition() -> None:
    rng = random.Random(12)
    keys = [rng.randbytes(rng.randrange(1, 300)) for _ in range(5000)]
    keys += [bytes([b]) * n for b in (0, 0xFF) for n in (1, 8, 16, 17, 64, 255)]
    for key in keys:
        got, want = key_hash(key), key_hash_py(key)
        assert got == want and got.fp == want.fp, key
        assert got.mains(1024) == want.mains(1024) and got.suffix(9) == want.suffix(9)
