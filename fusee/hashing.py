"""The key hash, split into the parts RACE hashing needs (docs/design.md#race-hashing).

One 128-bit xxHash (XXH3) of the key gives independent bit fields: the low word picks the
subtable through the directory (its low ``dir_bits`` bits) and the 8-bit fingerprint (its top
byte); the high word gives the two candidate main buckets. xxHash is stable across processes
and machines, unlike Python's salted ``hash()``, so every client computes the same positions.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Final, NamedTuple

import xxhash

_M32: Final = 0xFFFFFFFF


class KeyHash(NamedTuple):
    low: int            # directory suffix in the low bits; fingerprint in the top byte
    high: int           # two 32-bit bucket hashes
    #: the fingerprint (``low``'s top byte): a field, not a property, as every operation
    #: reads it, some several times (a field read is no Python call)
    fp: int

    def suffix(self, bits: int) -> int:
        """The directory index: the hash's low ``bits`` bits."""
        return self.low & ((1 << bits) - 1)

    def mains(self, n_mains: int) -> tuple[int, int]:
        """Two distinct candidate main buckets in different bucket groups (0 <= m < n_mains,
        where main ``m`` belongs to group ``m // 2``)."""
        m1 = (self.high & _M32) % n_mains
        m2 = ((self.high >> 32) & _M32) % n_mains
        if n_mains > 2 and m2 // 2 == m1 // 2:
            m2 = (m2 + 2) % n_mains
        return m1, m2


def _build_in_c() -> None:
    """Make a call of KeyHash one C function where the extension is built (its namedtuple
    ``__new__`` is Python: about 1k instructions of every operation on a key not hashed
    lately), and the hashes it makes untracked by the garbage collector: the memo below
    keeps 16k of them, which every full collection walked (issue 12). Same KeyHash
    otherwise (fusee.verbs does the same for the verbs)."""
    try:
        from fusee.emulator._atomic import verb_constructor
    except ImportError:     # pragma: no cover (a source tree without its build)
        return
    verb_constructor(KeyHash)


_build_in_c()


#: xxHash's function and the split of its digest (canonical: big-endian, the high word first)
#: into the two words, each one C call; compiled, C statics (not module attributes looked
#: up at every call). The same words as ``key_hash_py`` without a 128-bit int (masked and
#: shifted: a few boxed big-int operations of every new key; tests/test_hashing.py)
_XXH3_128: Final = xxhash.xxh3_128_digest
_WORDS: Final = struct.Struct(">QQ").unpack


@lru_cache(maxsize=1 << 14)
def key_hash(key: bytes) -> KeyHash:
    """The key's hash; recently used keys (every operation on a key hashes it) are memoized."""
    digest = _XXH3_128(key)
    high, low = _WORDS(digest)
    return KeyHash(low, high, digest[8])        # (the low word's top byte: no big-int shift)


def key_hash_py(key: bytes) -> KeyHash:
    """``key_hash`` from the 128-bit hash as one int: the definition it must equal."""
    h = xxhash.xxh3_128_intdigest(key)
    low = h & ((1 << 64) - 1)
    return KeyHash(low, h >> 64, low >> 56)
