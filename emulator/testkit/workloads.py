"""The workloads simulations run (``fusee.emulator.testkit.simulator``): random operation
mixes over hot keys, value sizes that fill the size classes, and the calls that invoke them on
a store."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

from fusee.config import LayoutConfig
from fusee.emulator.testkit.scheduler import Call
from fusee.layout import CLASSES, object_bytes


def kv_workload(rng: random.Random, client: str, keys: list[bytes], n: int,
                mix: dict[str, float], sizes: Sequence[int] = ()
                ) -> list[tuple[str, bytes, bytes | None]]:
    """``n`` random (kind, key, value) operations over ``keys`` with the given kind weights.
    Every written value is unique (client name + sequence number), which makes the checker's
    job sharper: a read names exactly which write it saw. With ``sizes``, each value is
    padded to a length drawn from them (``class_filling_sizes``)."""
    kinds, weights = zip(*mix.items())
    ops = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        value = None if kind in ("get", "delete") else f"{client}.{i}".encode()
        key = rng.choice(keys)
        if value is not None and sizes:
            value = value.ljust(rng.choice(sizes), b".")
        ops.append((kind, key, value))
    return ops


def class_filling_sizes(layout: LayoutConfig, key_len: int) -> list[int]:
    """Value lengths whose objects (with a key of ``key_len`` bytes) exactly fill each size
    class (``fusee.layout.CLASSES``): the largest included, whose few objects per block make
    a freed object come back at the same address soon, under the same slot value when it is
    for the same key (ABA, ``fusee.reuse``)."""
    return [c * layout.object_unit - object_bytes(key_len, 0) for c in CLASSES
            if c * layout.object_unit >= object_bytes(key_len, 0)]


def store_calls(store, ops: Iterable[tuple[str, bytes, bytes | None]]) -> Iterator[Call]:
    """Calls on anything with the sans-IO store methods search/insert/update/delete/put,
    each returning an operation generator (fusee.operations.ClientCore)."""
    for kind, key, value in ops:
        if kind == "get":
            yield Call(kind, key, None, lambda k=key: store.search(k))
        elif kind == "delete":
            yield Call(kind, key, None, lambda k=key: store.delete(k))
        else:
            yield Call(kind, key, value,
                       lambda m=getattr(store, kind), k=key, v=value: m(k, v))  # noqa: B008 (binds the method now)
