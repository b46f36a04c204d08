"""Garbage in, clear errors out: every parser that sees bytes from outside, fuzzed.

A short Hypothesis run of each target is part of the normal suite; the coverage-guided atheris
targets (emulator/testkit/fuzz.py) run briefly here and long under ``-m soak``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from fusee.emulator import wire
from fusee.emulator.testkit import fuzz
from fusee.emulator.cluster import LocalCluster
from fusee.verbs import MAX_BATCH, Read

FAST = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SIZE = fuzz.LAYOUT.region_size


@pytest.fixture(scope="module")
def node():
    n = fuzz.make_node(f"hyp{os.getpid()}")
    yield n
    n.close()


near_edges = st.one_of(st.integers(0, 64), st.integers(SIZE - 64, SIZE + 64),
                       st.integers(0, (1 << 64) - 1), st.integers(-(1 << 63), -1))
operand = st.one_of(near_edges, st.binary(max_size=80), st.text(max_size=4), st.none(),
                    st.floats(allow_nan=False), st.lists(st.integers(), max_size=2))


@FAST
@given(st.binary(max_size=300))
def test_memnode_answers_any_bytes(node, data):
    fuzz.check_memnode(node, data)


@FAST
@given(st.lists(st.lists(st.one_of(st.integers(0, 7), operand), min_size=0, max_size=5),
                max_size=8), st.booleans())
def test_memnode_never_completes_a_verb_it_should_refuse(node, ops, right_key):
    rkey = node.region.rkey if right_key else node.region.rkey ^ 1
    try:
        data = msgpack.packb((wire.VERBS, 1, rkey, ops))
    except (OverflowError, TypeError, ValueError):
        return                                  # not representable on the wire at all
    fuzz.check_memnode(node, data)


@FAST
@given(st.text(max_size=12), st.dictionaries(st.text(max_size=5), operand, max_size=3))
def test_control_requests_with_any_name_and_arguments(node, name, args):
    try:
        data = msgpack.packb((wire.CONTROL, 3, name, args))
    except (OverflowError, TypeError, ValueError):
        return                                  # not representable on the wire at all
    fuzz.check_memnode(node, data)


@FAST
@given(st.binary(min_size=1, max_size=64), st.binary(max_size=600), st.integers(0, 1 << 16),
       st.integers(0, 7))
def test_a_damaged_object_is_detected_not_returned(key, value, where, bit):
    fuzz.check_damaged_object(key, value, where, bit)


@FAST
@given(st.binary(max_size=2000))
def test_object_decoder_on_random_bytes(data):
    fuzz.check_object(data)


@FAST
@given(st.binary(max_size=256), st.integers(0, 0xFFFF), st.integers(0, 0xFF))
def test_bucket_decoder_on_random_bytes(data, sid, fp):
    fuzz.check_view(data, sid, fp)


@FAST
@given(st.text(max_size=300))
def test_config_parser_on_random_text(text):
    fuzz.check_config(text)


def test_over_long_batches_are_refused_on_both_sides(node):
    reply = wire.decode_reply(node.handle(fuzz.verbs_message(node.region.rkey,
                                                             [[0, 0, 8]] * (MAX_BATCH + 1))))
    assert reply[1] == [] and "MAX_BATCH" in reply[2][2]
    with LocalCluster(memnodes=1, transport="zmq") as c:
        t = c.transport()
        with pytest.raises(ValueError, match="MAX_BATCH"):
            t.execute([Read(0, 0, 8)] * (MAX_BATCH + 1))
        assert len(t.execute([Read(0, 0, 8)] * MAX_BATCH)) == MAX_BATCH
        t.close()


def test_a_stuck_or_hostile_client_does_not_stall_the_others():
    with LocalCluster(memnodes=1, transport="zmq") as c:
        ctx = zmq.Context.instance()
        stuck = ctx.socket(zmq.DEALER)          # sends and never reads its replies
        stuck.setsockopt(zmq.LINGER, 0)
        stuck.connect(c.config.node(0).endpoint)
        big = fuzz.verbs_message(0, [[0, 0, 1 << 16]] * 64)
        for _ in range(200):
            stuck.send(big)
        hostile = ctx.socket(zmq.DEALER)        # sends one message over the size limit
        hostile.setsockopt(zmq.LINGER, 0)
        hostile.connect(c.config.node(0).endpoint)
        hostile.send(b"\0" * (c.config.layout.region_size + (2 << 20)))
        t = c.transport(timeout=10)
        for _ in range(50):
            assert t.execute([Read(0, 0, 5)]) == [b"FUSEE"]
        t.close()
        stuck.close(0)
        hostile.close(0)
        assert c.procs[0].poll() is None        # the memory node is still up


ATHERIS = importlib.util.find_spec("atheris") is not None


def _atheris(target: str, runs: int, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fusee.emulator.testkit.fuzz", target,
                           f"-runs={runs}", "-seed=1", f"-artifact_prefix={tmp_path}/"],
                          capture_output=True, text=True, timeout=1800,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DONE" in proc.stderr


@pytest.mark.skipif(not ATHERIS, reason="atheris is not installed (pip install '.[fuzz]')")
@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_atheris_short_run(target, tmp_path):
    _atheris(target, 3000, tmp_path)


@pytest.mark.skipif(not ATHERIS, reason="atheris is not installed (pip install '.[fuzz]')")
def test_the_fuzzer_instruments_the_parsers_not_the_standard_library():
    """Coverage feedback comes from the code that handles the bytes; instrumenting every
    loaded function (the standard library's too) cost 22 s of CPU a run, more than the
    test's time limit in wall time on a loaded machine."""
    probe = ("import atheris, json, fusee.layout, fusee.emulator.testkit.fuzz as fuzz\n"
             "before = json.dumps.__code__, fusee.layout.decode_object.__code__\n"
             "fuzz._instrument(atheris)\n"
             "print(json.dumps.__code__ is before[0], "
             "fusee.layout.decode_object.__code__ is before[1])")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.split() == ["True", "False"], proc.stderr[-3000:]


@pytest.mark.soak
@pytest.mark.skipif(not ATHERIS, reason="atheris is not installed (pip install '.[fuzz]')")
@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_atheris_long_run(target, tmp_path):
    _atheris(target, 1_000_000, tmp_path)
