"""Fuzz targets for every parser that sees bytes from outside (and what each must guarantee).

- ``memnode``: a memory node's request handler. Whatever arrives, it answers with a reply the
  client can decode, never raises, and never completes a verb that reaches outside its region or
  an unaligned atomic (checked against the request it was given).
- ``object``: the KV-object decoder. Random or damaged bytes decode to None (detected), never to
  an object that is not the one written.
- ``view``: the bucket decoder of the index: any 256 bytes are a View it can answer about.
- ``config``: the cluster-config parser: a config or a ConfigError, nothing else.

Run one with atheris (opt-in, ``pip install atheris``):
``python -m fusee.emulator.testkit.fuzz memnode -runs=100000``; the tests run each one briefly too.
"""

from __future__ import annotations

import gc
import sys
import types
from typing import Any

import msgpack

from fusee.emulator import wire
from fusee.emulator.memnode import MemoryNode
from fusee.config import ClusterConfig, ConfigError, LayoutConfig, MemNodeConfig
from fusee.index import COMBINED, View
from fusee.layout import decode_object, encode_object, object_bytes, size_class
from fusee.verbs import MAX_BATCH

KiB, MiB = 1 << 10, 1 << 20
LAYOUT = LayoutConfig(region_size=4 * MiB, block_size=256 * KiB, max_clients=16,
                      index_size=MiB, initial_subtables=2, buckets_per_subtable=96)


class FuzzError(AssertionError):
    """A target's guarantee was broken: a real finding."""


def make_node(name: str = "fuzz") -> MemoryNode:
    """A memory node with a small region, as the MN process would build it."""
    config = ClusterConfig(memnodes=(MemNodeConfig(0, "ipc:///nonexistent"),), layout=LAYOUT,
                           name=name)
    return MemoryNode(config, 0)


def check_memnode(node: MemoryNode, data: bytes) -> None:
    reply = node.handle(data)
    try:
        seq, results, error = wire.decode_reply(reply)
    except wire.MalformedMessage as e:
        raise FuzzError(f"undecodable reply {reply!r}") from e
    if error is not None and not (isinstance(error, list) and len(error) == 3):
        raise FuzzError(f"bad error triple {error!r}")
    try:
        kind, _, key, ops = wire.decode_request(data)
    except wire.MalformedMessage:
        if results:
            raise FuzzError("a malformed request completed something") from None
        return
    if kind != wire.VERBS:
        return
    if len(ops) > MAX_BATCH and results:
        raise FuzzError("an over-long batch was executed")
    size = node.region.length
    for op, _ in zip(ops, results):              # every request that completed
        code = op[0]
        addr: Any = op[1] if len(op) > 1 else None     # a hostile message's operand
        if (code in (wire.OP_READ, wire.OP_WRITE, wire.OP_CAS, wire.OP_FAA)
                and key != node.region.rkey):
            raise FuzzError(f"{op!r} completed with a wrong key")
        if code == wire.OP_READ:
            end = addr + op[2]
        elif code == wire.OP_WRITE:
            end = addr + len(op[2])
        elif code in (wire.OP_CAS, wire.OP_FAA):
            if addr & 7:
                raise FuzzError(f"unaligned atomic completed: {op!r}")
            end = addr + 8
        else:
            continue
        if not 0 <= addr <= end <= size:
            raise FuzzError(f"out-of-bounds verb completed: {op!r} on a {size}-byte region")


def verbs_message(rkey: int, ops: list) -> bytes:
    """A verbs request as a client would send it, with arbitrary operands."""
    return msgpack.packb((wire.VERBS, 1, rkey, ops))


def check_object(data: bytes) -> None:
    view = decode_object(data)
    if view is not None and len(view.key) + len(view.value) > len(data):
        raise FuzzError("decoded more than was read")


def check_damaged_object(key: bytes, value: bytes, flip: int, bit: int) -> None:
    """Flip one bit of a valid object: the decoder must reject it or return it unchanged."""
    unit = LAYOUT.object_unit
    units = size_class(object_bytes(len(key), len(value)), unit)
    assert units is not None, "the targets draw keys and values that fit a class"
    size = units * unit
    good = encode_object(key, value, size, 1, 0, 0, 7)
    assert decode_object(good).value == value
    bad = bytearray(good)
    bad[flip % len(bad)] ^= 1 << (bit % 8)
    view = decode_object(bytes(bad))
    if view is not None and (view.key, view.value) != (key, value):
        raise FuzzError(f"a damaged object decoded as {view.key!r}={view.value!r}")


def check_view(data: bytes, sid: int, fp: int) -> None:
    data = data or b"\0"
    raw = (data * (2 * COMBINED // len(data) + 1))[:2 * COMBINED]
    v = View([raw[:COMBINED], raw[COMBINED:]], (0, 2), sid)
    v.candidates(fp & 0xFF)
    for pos in list(v.slots)[:4]:
        v.get(pos)
    _ = v.stale


def check_config(text: str) -> None:
    try:
        ClusterConfig.loads(text)
    except ConfigError:
        pass


TARGETS = ("memnode", "object", "view", "config")

#: the packages whose code decides what a target does with its bytes: this project's, and the
#: TOML parser under the config's (msgpack, under the wire format, is native code)
INSTRUMENTED = ("fusee", "tomllib", __name__)


def _instrument(atheris: Any) -> None:
    """Coverage feedback from the functions of ``INSTRUMENTED`` already loaded. Not
    ``atheris.instrument_all()``: it rewrites every loaded function, 4,280 of them, mostly
    the standard library's, for 22 s of CPU a run while the fuzzing itself took under one;
    on a loaded machine that alone outran the test's time limit."""
    for obj in gc.get_objects():
        if (isinstance(obj, types.FunctionType) and
                (obj.__module__ or "").split(".")[0] in INSTRUMENTED):
            atheris.instrument_func(obj)


def main(argv=None) -> int:
    import atheris                              # opt-in: the fuzz extra
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TARGETS:
        print(f"usage: python -m fusee.emulator.testkit.fuzz {{{','.join(TARGETS)}}} "
              "[libFuzzer options]", file=sys.stderr)
        return 2
    target = argv[0]
    node = make_node(f"fuzz{__import__('os').getpid()}") if target == "memnode" else None

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        if target == "memnode":
            assert node is not None
            if fdp.ConsumeBool():
                check_memnode(node, fdp.ConsumeBytes(fdp.remaining_bytes()))
            else:                               # well-formed messages with hostile operands
                rkey = node.region.rkey if fdp.ConsumeBool() else fdp.ConsumeUInt(4)
                ops = []
                for _ in range(fdp.ConsumeIntInRange(0, 8)):
                    code = fdp.ConsumeIntInRange(0, 6)
                    addr = fdp.ConsumeIntInRange(0, LAYOUT.region_size + 64)
                    arg = fdp.ConsumeIntInRange(0, (1 << 64) - 1) if code != 1 else \
                        fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
                    swap = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
                    ops.append([code, addr, arg, swap][:3 + (code == 2)])
                check_memnode(node, verbs_message(rkey, ops))
        elif target == "object":
            if fdp.ConsumeBool():
                check_object(fdp.ConsumeBytes(fdp.remaining_bytes()))
            else:
                check_damaged_object(fdp.ConsumeBytes(16) or b"k", fdp.ConsumeBytes(200),
                                     fdp.ConsumeUInt(2), fdp.ConsumeUInt(1))
        elif target == "view":
            check_view(fdp.ConsumeBytes(2 * COMBINED), fdp.ConsumeUInt(2), fdp.ConsumeUInt(1))
        else:
            check_config(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))

    _instrument(atheris)
    try:
        atheris.Setup([sys.argv[0], *argv[1:]], one)
        atheris.Fuzz()
    finally:
        if node is not None:
            node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
