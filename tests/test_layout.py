"""Byte formats: slots, bucket headers, objects with their embedded log entry."""

from __future__ import annotations

import pytest

from fusee import layout as L
from fusee.config import ConfigError, LayoutConfig


def test_slot_fields_round_trip():
    v = L.make_slot(0xAB, 12, 5, 64 * 12345, 64)
    assert (L.slot_fp(v), L.slot_units(v), L.slot_node(v), L.slot_addr(v, 64)) == \
        (0xAB, 12, 5, 64 * 12345)
    assert L.is_object(v) and L.committed_object(v) and not L.is_free(v)
    assert not L.committed_object(v | L.TENTATIVE) and not L.committed_object(v | L.FROZEN)
    assert L.strip(v | L.FROZEN | L.TENTATIVE) == v


def test_slot_generation_is_the_allocation_sequence_and_leaves_the_address_alone():
    v = L.make_slot(0xAB, 12, 5, 64 * L.ADDR_MASK, 64, seq=0x1234)
    assert (L.slot_gen(v), L.slot_addr(v, 64), L.slot_node(v)) == (0x34, 64 * L.ADDR_MASK, 5)
    assert L.make_slot(0xAB, 12, 5, 64, 64, seq=1) != L.make_slot(0xAB, 12, 5, 64, 64, seq=2)


def test_slot_rejects_unaligned_or_bad_node():
    with pytest.raises(ValueError):
        L.make_slot(1, 1, 0, 100, 64)
    with pytest.raises(ValueError):
        L.make_slot(1, 1, L.MAX_NODES, 128, 64)
    with pytest.raises(ValueError):
        L.make_slot(1, 1, 0, 64 * (L.ADDR_MASK + 1), 64)


def test_free_values_are_free_distinct_and_never_empty():
    values = {L.free_value(c, s) for c in (0, 1, 63, 64, L.MAX_CLIENT_IDS - 1)
              for s in (0, 1, 2, (1 << 40) - 1)}
    assert len(values) == 20 and 0 not in values
    assert all(L.is_free(v) and not L.is_object(v) for v in values)
    assert L.is_free(0) and not L.is_free(L.FROZEN) and not L.is_free(L.TENTATIVE)


def test_bucket_header_round_trip():
    h = L.bucket_header(700, 9, 0x1F3, L.RETIRED)
    assert L.parse_header(h) == (700, 9, 0x1F3, L.RETIRED)


def _obj(key=b"key", value=b"value", opcode=L.UPDATE, size=128):
    return L.encode_object(key, value, size, opcode, next_ptr=0x42 << 48 | 7, prev_ptr=9,
                           seq=70000)


def test_object_round_trip_and_log_entry():
    buf = _obj()
    assert len(buf) == 128 and buf[-1] == 1                  # the last byte is the used bit
    o = L.decode_object(buf)
    assert (o.key, o.value, o.opcode, o.next, o.prev, o.seq) == \
        (b"key", b"value", L.UPDATE, 0x42 << 48 | 7, 9, 70000 & 0xFFFF)
    assert o.state == L.PENDING


@pytest.mark.parametrize("offset", [0, 3, 8, 12, 60, 128 - 48, 128 - 40, 128 - 8, 128 - 3, 127])
def test_any_flipped_byte_is_detected(offset):
    buf = bytearray(_obj())
    buf[offset] ^= 0x5A
    assert L.decode_object(bytes(buf)) is None


def test_commit_record_is_recognisable_with_old_value_zero():
    buf = bytearray(_obj(opcode=L.INSERT))
    off = len(buf) - L.LOG_BYTES + L.COMMIT_OFFSET
    rec = L.commit_record(L.slot_ref(3, 17), 0, L.COMMITTED)
    buf[off:off + len(rec)] = rec
    o = L.decode_object(bytes(buf))
    assert (o.state, o.slot_ref, o.old_value) == (L.COMMITTED, (3 << 32) | 17, 0)
    buf[off] ^= 1                                            # a torn record reads as pending
    assert L.decode_object(bytes(buf)).state == L.PENDING


def test_size_classes():
    assert L.size_class(1, 64) == 1 and L.size_class(64, 64) == 1 and L.size_class(65, 64) == 2
    assert L.size_class(255 * 64, 64) == 255 and L.size_class(255 * 64 + 1, 64) is None
    assert list(L.CLASSES) == sorted(L.CLASSES)


def test_truncated_or_garbage_objects_are_rejected():
    assert L.decode_object(b"") is None
    assert L.decode_object(bytes(128)) is None
    assert L.decode_object(_obj()[:64]) is None


def test_a_region_too_large_for_the_slot_address_is_refused():
    LayoutConfig(region_size=64 << 32, object_unit=64).check()
    with pytest.raises(ConfigError, match="2\\*\\*32 object units"):
        LayoutConfig(region_size=128 << 32, object_unit=64).check()


def test_objects_and_commit_records_made_in_c_are_the_python_formats_byte_for_byte():
    """Where the extension is built, every write's object and commit record are made in C
    (``emulator/_atomic.c``): the same bytes as the Python spec; fields that do not fit the
    format are refused."""
    import random
    assert L._ENCODE_IN_C is not None and L._RECORD_IN_C is not None, \
        "the C extension is not built: build_ext --inplace"
    rng = random.Random(12)
    for _ in range(3000):
        key = rng.randbytes(rng.randint(1, 64))
        value = rng.randbytes(rng.choice([0, 1, 8, 1000, rng.randint(0, 5000)]))
        size = L.size_class(L.object_bytes(len(key), len(value)), 64) * 64
        args = (key, value, size, rng.randint(1, 3), rng.getrandbits(rng.choice([1, 46, 64])),
                rng.getrandbits(46), rng.getrandbits(20))
        assert L.encode_object(*args) == L.encode_object_py(*args)
        record = (rng.getrandbits(48), rng.getrandbits(64), rng.randint(0, 3),
                  rng.getrandbits(32), rng.getrandbits(9))
        assert L.commit_record(*record) == L.commit_record_py(*record)
    with pytest.raises(ValueError):     # the key and value do not fit
        L.encode_object(b"k", bytes(100), 64, 1, 0, 0, 0)
    with pytest.raises(OverflowError):
        L.encode_object(b"k", b"v", 64, 1, 1 << 64, 0, 0)
    with pytest.raises(OverflowError):
        L.commit_record(1, 2, 1, 1 << 32)


def test_the_writes_to_every_copy_made_in_c_are_the_python_ones():
    """Where the extension is built, an object's writes and its commit records' are made in
    one C call (``fusee.log.writes_to``): the same Write verbs as the Python spec makes, for
    a list or a tuple of nodes, none included; a class of another shape is refused."""
    from fusee import log
    from fusee.emulator._atomic import verbs_to
    from fusee.verbs import Read, Write
    assert log._WRITES_IN_C is not None, "the C extension is not built: build_ext --inplace"
    for nodes in ([], [2], [0, 1, 2], (3, 1), list(range(7))):
        for addr, data in ((0, b""), (1 << 40, b"x" * 24), ((1 << 64) - 1, bytes(1000))):
            made = log.writes_to(nodes, addr, data)
            assert made == log.writes_to_py(nodes, addr, data)
            assert all(type(w) is Write for w in made)
    verbs_to(Read, [1], 2, 3)           # any class of three fields
    with pytest.raises(TypeError):
        verbs_to(tuple, [1], 2, b"")    # no fields
    with pytest.raises(TypeError):
        verbs_to(Write, 5, 2, b"")      # nodes not a sequence


def test_objects_decoded_in_c_are_what_the_python_spec_decodes(monkeypatch):
    """Where the extension is built, every object read is decoded in C: the same views (or
    None) as the Python spec, for whole, damaged, torn and foreign bytes alike."""
    import random
    assert L._DECODE_IN_C is not None, "the C extension is not built: build_ext --inplace"
    rng = random.Random(14)
    bufs = []
    for _ in range(2000):
        key = rng.randbytes(rng.randint(1, 40))
        value = rng.randbytes(rng.choice([0, 8, 1000, rng.randint(0, 3000)]))
        size = L.size_class(L.object_bytes(len(key), len(value)), 64) * 64
        obj = bytearray(L.encode_object(key, value, size, rng.randint(1, 3),
                                        rng.getrandbits(46), rng.getrandbits(46),
                                        rng.getrandbits(16)))
        if rng.random() < .6:           # a commit record, sometimes torn
            at = size - L.LOG_BYTES + L.COMMIT_OFFSET
            obj[at:at + 24] = L.commit_record(rng.getrandbits(48), rng.getrandbits(64),
                                              rng.randint(0, 3), rng.getrandbits(32),
                                              rng.getrandbits(8))
            if rng.random() < .3:
                obj[at + rng.randrange(24)] ^= 1 << rng.randrange(8)
        if rng.random() < .2:           # damage anywhere, or bytes of nothing
            obj[rng.randrange(size)] ^= 1 << rng.randrange(8)
        if rng.random() < .05:
            obj = bytearray(rng.randbytes(rng.choice([0, 8, 56, 64, 128])))
        bufs.append(bytes(obj))
    in_c = [L.decode_object(b) for b in bufs]
    monkeypatch.setattr(L, "_DECODE_IN_C", None)
    assert in_c == [L.decode_object(b) for b in bufs]
    assert sum(v is not None for v in in_c) > 1000
    assert all(type(v) is L.ObjectView for v in in_c if v is not None)
    assert sum(v is not None and v.state != L.PENDING for v in in_c) > 300


def test_object_crc_and_extent_agree_with_their_specs():
    """``object_crc`` is ``object_tail``'s crc and ``object_extent`` is ``slot_node``,
    ``slot_addr`` and ``slot_units`` at once, over random tails and slot values (those with
    the top bits set above all: compiled, they are the boxed longs the fast path meets)."""
    import random
    rnd = random.Random(12)
    for _ in range(5000):
        word = rnd.randbytes(8)
        assert L.object_crc(word) == L.object_tail(word)[0]
        v = rnd.getrandbits(64)
        unit = rnd.choice((1, 8, 64))
        assert L.object_extent(v, unit) == (L.slot_node(v), L.slot_addr(v, unit),
                                            L.slot_units(v) * unit)
