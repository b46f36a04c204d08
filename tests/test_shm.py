"""What is particular to the shm backend: the client executes the verbs itself on the MN's
mapped segment, so it must agree with the MN's own atomics, keep working while the MN's CPU is
stopped, notice a dead MN although its memory stays mapped, and send only block allocation to
the MN's CPU."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import struct
import subprocess
import sys

import pytest
from processes import run_processes

from fusee.emulator.cluster import LocalCluster
from fusee.config import ClusterConfig
from fusee.memory_map import MAGIC, MemoryMap
from fusee.verbs import (AllocBlock, Cas, ControlError, Faa, FreeBlock, NodeTimeout, Read,
                         RemoteAccessError, TransportError, Write)
from fusee.transports import connect
from fusee.transports.shm import ShmTransport

MAGIC_WORD = struct.pack("<Q", MAGIC)


@pytest.fixture
def cluster():
    with LocalCluster(memnodes=3, transport="shm") as c:
        yield c


def scratch(cluster, i=0) -> int:
    return MemoryMap.of(cluster.config.layout).data + i * 4096


def u64(b: bytes) -> int:
    return struct.unpack("<Q", b)[0]


def test_cluster_gives_an_shm_transport_that_maps_each_segment(cluster):
    t = cluster.transport()
    assert isinstance(t, ShmTransport)
    for n, r in t.regions.items():
        assert r.shm_name == cluster.shm_names[n]
    assert t.execute([Read(n, 0, 8) for n in range(3)]) == [MAGIC_WORD] * 3
    t.close()


def test_segments_are_owner_only(cluster):
    for name in cluster.shm_names.values():
        mode = os.stat(f"/dev/shm/{name.lstrip('/')}").st_mode
        assert stat.S_IMODE(mode) == 0o600


def test_verbs_need_no_mn_cpu(cluster):
    """One-sided: with the MN process stopped, verbs still complete; a stopped MN is alive."""
    t = cluster.transport(timeout=0.5)
    a = scratch(cluster)
    pid = cluster.procs[0].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(2000):          # spans several liveness polls
            t.execute([Faa(0, a, 1)])
        assert t.execute([Cas(0, a + 8, 0, 7), Write(0, a + 16, b"x" * 8), Read(0, a, 24)]) == \
            [0, None, struct.pack("<QQ", 2000, 7) + b"x" * 8]
        with pytest.raises(NodeTimeout):           # but its CPU's work times out
            t.execute([AllocBlock(0, 1)])
    finally:
        os.kill(pid, signal.SIGCONT)
    t.close()


def test_client_and_mn_atomics_agree(cluster):
    """The same word, FAA'd by the client (shm) and by the MN's emulated NIC (zmq)."""
    shm, zmq_ = cluster.transport("shm"), cluster.transport("zmq")
    a = scratch(cluster, 1)
    for _ in range(50):
        shm.execute([Faa(1, a, 1)])
        zmq_.execute([Faa(1, a, 2)])
    assert u64(shm.execute([Read(1, a, 8)])[0]) == 150
    assert zmq_.execute([Cas(1, a, 150, 9)]) == [150] and shm.execute([Faa(1, a, 0)]) == [9]
    shm.close()
    zmq_.close()


def _faa_worker(config_path, backend, addr, rounds, out):
    t = connect(ClusterConfig.load(config_path), backend)
    for _ in range(rounds):
        t.execute([Faa(0, addr, 1), Faa(2, addr, 1)])
    out.put(backend)
    t.close()


def _cas_worker(config_path, backend, me, addr, rounds, out):
    t = connect(ClusterConfig.load(config_path), backend)
    wins = [r for r in range(rounds) if t.execute([Cas(2, addr + 8 * r, 0, me)])[0] == 0]
    out.put((me, wins))
    t.close()


def test_processes_mixing_shm_and_mn_atomics_count_exactly(cluster):
    n, m = 4, 500
    a = scratch(cluster, 2)
    backends = ["shm", "zmq", "shm", "shm"]
    run_processes(_faa_worker, [(str(cluster.config_path), b, a, m) for b in backends[:n]])
    t = cluster.transport()
    assert [u64(w) for w in t.execute([Read(0, a, 8), Read(2, a, 8)])] == [n * m, n * m]
    t.close()


def test_processes_race_cas_one_winner_per_round(cluster):
    rounds = 300
    a = scratch(cluster, 3)
    args = [(str(cluster.config_path), b, me, a, rounds)
            for me, b in enumerate(["shm", "shm", "zmq"], start=1)]
    winners: dict[int, int] = {}
    for me, wins in run_processes(_cas_worker, args):
        for r in wins:
            assert r not in winners
            winners[r] = me
    assert sorted(winners) == list(range(rounds))
    t = cluster.transport()
    assert [u64(w) for w in t.execute([Read(2, a + 8 * r, 8) for r in range(rounds)])] == \
        [winners[r] for r in range(rounds)]
    t.close()


@pytest.mark.parametrize("how", ["reaped", "zombie", "terminated"])
def test_dead_mn_is_a_timeout_although_its_memory_stays_mapped(cluster, how):
    t = cluster.transport(timeout=1.0)
    a = scratch(cluster, 4)
    t.execute([Write(1, a, b"before!!")])
    proc = cluster.procs[1]
    if how == "reaped":
        cluster.kill(1)
    elif how == "zombie":
        os.kill(proc.pid, signal.SIGKILL)      # not waited for: a zombie until cleanup
    else:
        proc.terminate()                        # clean exit: the segment is unlinked
        proc.wait(10)
    with pytest.raises(NodeTimeout) as err:    # noticed within the timeout, whatever the timing
        for _ in range(10 ** 6):
            t.execute([Read(1, a, 8)])
    assert err.value.node == 1 and isinstance(err.value.results[0], NodeTimeout)
    with pytest.raises(NodeTimeout) as err:
        t.execute([Read(0, 0, 8), Write(1, a, b"after!!!"), Read(2, 0, 8), Read(1, a, 8)])
    assert err.value.results[0] == err.value.results[2] == MAGIC_WORD
    assert all(isinstance(r, NodeTimeout) for r in (err.value.results[1], err.value.results[3]))
    with pytest.raises(NodeTimeout):
        t.execute([AllocBlock(1, 3)])
    assert t.execute([Faa(2, a, 1), Read(0, 0, 8)]) == [0, MAGIC_WORD]
    t.close()


def test_block_allocation_keeps_order_within_a_node_and_runs_beside_verbs(cluster):
    t = cluster.transport()
    m = MemoryMap.of(cluster.config.layout)
    a = scratch(cluster, 5)
    before = t.stats.copy()
    res = t.execute([Write(0, a, b"first..."), AllocBlock(0, 4), Faa(1, a, 5), Read(0, a, 8)])
    block = res[1]
    assert res[0] is None and res[2] == 0 and res[3] == b"first..."
    entry = m.table_entry(m.block_index(block))
    # The owner record written by the MN is visible to the next verb of the same node's batch.
    assert t.execute([FreeBlock(0, 4, block), Read(0, entry, 8), Read(1, a, 8)]) == \
        [None, bytes(8), struct.pack("<Q", 5)]
    d = t.stats - before
    assert (d.round_trips, d.verbs, d.controls, d.reads, d.writes, d.atomics) == (2, 7, 2, 3, 1, 1)


def test_failed_control_request_flushes_the_rest_of_its_node_only(cluster):
    t = cluster.transport()
    a = scratch(cluster, 6)
    with pytest.raises(ControlError) as err:
        t.execute([FreeBlock(2, 1, 12345), Write(2, a, b"never..."), Write(0, a, b"done....")])
    res = err.value.results
    assert isinstance(res[0], ControlError) and isinstance(res[1], ControlError)
    assert res[2] is None
    assert t.execute([Read(2, a, 8), Read(0, a, 8)]) == [bytes(8), b"done...."]
    t.close()


@pytest.mark.parametrize("bad", [
    Cas(0, 0, -1, 0),                  # operands must be unsigned 64-bit, as on the wire
    Cas(0, 0, 0, 1 << 64),
    Read(0, 0, -1),
    Write(0, 0, 12),                   # not bytes
    Read(0, 0.5, 8),                   # not an int
])
def test_malformed_operands_are_refused_like_the_emulated_nic_does(cluster, bad):
    t = cluster.transport()
    with pytest.raises(RemoteAccessError) as err:
        t.execute([bad, Read(0, 0, 8)])
    assert isinstance(err.value.results[1], RemoteAccessError)        # flushed
    with pytest.raises(RemoteAccessError):
        t.execute([bad])
    assert t.execute([Read(0, 0, 8)]) == [MAGIC_WORD]
    t.close()


def test_closed_transport_refuses_instead_of_touching_unmapped_memory(cluster):
    t = cluster.transport()
    t.close()
    for batch in ([Faa(0, 4096, 1)], [Read(0, 0, 8), Read(1, 0, 8)]):
        with pytest.raises(ValueError, match="no memory node"):
            t.execute(batch)
    t.close()                                   # twice is harmless


def test_bad_liveness_interval_is_refused(cluster):
    with pytest.raises(ValueError, match="liveness_interval"):
        cluster.transport(liveness_interval=0)


def test_a_batch_runs_whole_in_c_or_not_at_all(cluster):
    """fusee.emulator._atomic.run, the fast path: a batch whose requests all pass the checks runs
    in one call, in order, counted as the verb-by-verb path counts; one that would fail
    anywhere (here its last request) runs none of its requests there, and the transport's
    verb-by-verb path then runs it with its per-request errors."""
    from fusee.emulator import _atomic
    from fusee.transports.shm import _KINDS
    t = cluster.transport()
    a = scratch(cluster)
    ok = [Write(0, a, b"x" * 16), Faa(0, a + 16, -1), Cas(1, a, 0, 7), Read(0, a, 24),
          Cas(1, a, 0, 9), Faa(2, a, 2**64 - 1)]
    before = t.stats.copy()
    done = _atomic.run(ok, t._table, t.regions, _KINDS, t.stats.counts)
    assert done == [None, 0, 0, b"x" * 16 + (2**64 - 1).to_bytes(8, "little"), 7, 0]
    delta = t.stats - before
    assert (delta.round_trips, delta.verbs, delta.reads, delta.writes, delta.atomics,
            delta.bytes_in, delta.bytes_out) == (1, 6, 1, 1, 4, 24, 16)
    size = t.regions[2].length
    for bad in (Read(2, size - 4, 8), Cas(2, a + 4, 0, 1), Faa(2, a + 4, 1),
                Cas(2, a, 0, -1), Write(2, a, bytearray(8)), Read(7, a, 8), Read(2, -8, 8),
                Cas(2, a, 1 << 64, 0), Read(2, a, 1 << 64), Read(2, 1 << 63, 8)):
        before = t.stats.copy()
        # (after a good request to MN 2: its bounds, read once per batch, hold for every one)
        batch = [Write(0, a + 64, b"never"), Read(2, a, 8), bad]
        assert _atomic.run(batch, t._table, t.regions, _KINDS, t.stats.counts) is None
        assert t.execute([Read(0, a + 64, 5)])[0] == bytes(5) and t.stats - before == \
            type(t.stats)(round_trips=1, verbs=1, reads=1, bytes_in=5)
    t.regions[1] = dataclasses.replace(t.regions[1], rkey=t.regions[1].rkey ^ 1)
    assert _atomic.run([Read(1, a, 8)], t._table, t.regions, _KINDS, t.stats.counts) is None
    with pytest.raises(RemoteAccessError, match="wrong access key"):
        t.execute([Read(0, a, 8), Read(1, a, 8)])
    t.close()


def test_execute_in_c_answers_as_the_python_execute_on_random_and_bad_batches(cluster):
    """``ShmTransport.execute`` as bound (``_atomic.shm_executor``: its checks and ``run`` in
    C, the rest handed to the Python method) gives every batch the completions, the error
    and the counts the Python method gives; a batch it cannot take (empty, too long, a
    request ``run`` refuses) goes to the Python method; the liveness poll is made when it
    is due, before the batch runs, and only then."""
    import random
    from fusee.verbs import MAX_BATCH
    t, spec = cluster.transport(), cluster.transport()
    spec.execute = spec._execute                # the Python method alone
    rng = random.Random(12)
    a = scratch(cluster)
    size = t.regions[0].length
    zeros = [Write(n, at, bytes(72)) for n in range(3) for at in (a, size - 72)]

    def request():
        node = rng.choice([0, 1, 2, 2, 2, 9])
        addr = rng.choice([a, a + 8, a + 64, a + 4, size - 8, size])
        return rng.choice([Read(node, addr, rng.choice([8, 16])), Write(node, addr, b"w" * 8),
                           Cas(node, addr, rng.choice([0, 7]), rng.randrange(9)),
                           Faa(node, addr, rng.randrange(3))])

    def outcome(transport, batch):
        spec.execute(zeros)                     # the same memory for both
        before = transport.stats.copy()
        try:
            got = transport.execute(batch)
        except (TransportError, ValueError, TypeError) as e:
            got = (type(e), str(e))
        return got, transport.stats - before

    for _ in range(400):
        batch = [request() for _ in range(rng.choice([0, 1, 3, 8]))]
        got = outcome(t, batch)
        assert got == outcome(spec, batch), batch
    polls = []
    t._check_liveness = lambda now: polls.append(now)          # (spied: the poll is due)
    t._next_check = 0.0
    assert t.execute([Read(0, a, 8)]) == spec.execute([Read(0, a, 8)]) and len(polls) == 1
    t._next_check = float("inf")
    calls = []                                  # the common case runs no Python function
    sys.setprofile(lambda frame, event, arg: event == "call" and calls.append(frame))
    try:
        done = t.execute([Read(0, a, 8), Write(1, a, b"x"), Cas(2, a, 0, 0), Faa(0, a, 0)])
    finally:
        sys.setprofile(None)
    assert calls == [] and done == [bytes(8), None, 0, 0] and len(polls) == 1
    with pytest.raises(ValueError, match="exceeds MAX_BATCH"):
        t.execute([Read(0, a, 8)] * (MAX_BATCH + 1))
    assert t.execute([]) == []
    t.close()
    spec.close()


def test_execute_in_c_reads_what_the_transport_set_last(cluster):
    """The C execute reads the transport's liveness due time, table, regions and counts by
    position (``ShmTransport._fast``), not by name: whatever replaced them last is what it
    reads (a new table, a new regions dict, a new stats), a region whose access key was
    revoked (its MN registered the region anew) is refused, whether its RegionInfo was
    replaced in the dict or the dict itself was, and the poll runs when it is due."""
    from fusee.transports.base import TransportStats
    t = cluster.transport()
    a = scratch(cluster)
    calls = []

    def python_calls(batch):
        calls.clear()
        sys.setprofile(lambda frame, event, arg: event == "call" and calls.append(frame))
        try:
            return t.execute(batch)
        finally:
            sys.setprofile(None)
    t._next_check = float("inf")
    assert python_calls([Read(1, a, 8)]) == [bytes(8)] and calls == []
    table = t._table
    t._table = ()                   # nothing the C path can take: the Python method runs
    assert python_calls([Read(1, a, 8)]) == [bytes(8)] and calls
    t._table = table
    t.stats = fresh = TransportStats()
    assert python_calls([Read(1, a, 8)]) == [bytes(8)] and calls == []
    assert (fresh.round_trips, fresh.reads, fresh.bytes_in) == (1, 1, 8)
    same = dataclasses.replace(t.regions[1])    # another object, the same key: still runs
    t.regions[1] = same
    assert python_calls([Read(1, a, 8)]) == [bytes(8)] and calls == []
    t.regions = {**t.regions, 1: dataclasses.replace(same, rkey=same.rkey ^ 1)}
    with pytest.raises(RemoteAccessError, match="wrong access key"):
        t.execute([Read(1, a, 8)])
    t.regions = {**t.regions, 1: same}
    assert t.execute([Read(1, a, 8)]) == [bytes(8)]
    t.regions[2] = dataclasses.replace(t.regions[2], rkey=t.regions[2].rkey ^ 1)
    with pytest.raises(RemoteAccessError, match="wrong access key"):
        t.execute([Read(0, a, 8), Read(2, a, 8)])
    polls = []
    t._check_liveness = lambda now: polls.append(now)
    t.execute([Read(0, a, 8)])
    assert polls == []
    t._next_check = 0
    t.execute([Read(0, a, 8)])
    assert len(polls) == 1
    t.close()


def test_a_batch_in_c_reads_every_operand_width_as_python_does(cluster):
    """``_atomic.run`` reads its operands (nodes, addresses, lengths, a CAS's words) as
    unsigned 64-bit ints, the small ones straight from CPython's digits: at every digit
    boundary it answers what the verbs mean; a negative or too large operand is never run
    (None: the Python path words the refusal)."""
    from fusee.emulator import _atomic
    from fusee.transports.shm import _KINDS
    t = cluster.transport()
    a = scratch(cluster)
    run = lambda batch: _atomic.run(batch, t._table, t.regions, _KINDS, t.stats.counts)  # noqa: E731
    edges = [0, 1, 2**15, 2**30 - 1, 2**30, 2**31, 2**32 - 1, 2**32, 2**45, 2**60 - 1, 2**60,
             2**62, 2**63 - 1, 2**63, 2**64 - 1]
    for old in edges:
        for new in (edges[-1 - edges.index(old)], old ^ 1):
            assert run([Write(0, a, old.to_bytes(8, "little")), Cas(0, a, old, new),
                        Read(0, a, 8)]) == [None, old, new.to_bytes(8, "little")]
    for bad in (-1, -2**30, -2**31, -2**60, -2**63, 2**64, 2**90):
        assert run([Cas(0, a, bad, 0)]) is None and run([Cas(0, a, 0, bad)]) is None
        assert run([Read(0, bad, 8)]) is None and run([Read(0, a, bad)]) is None
    assert run([Read(0, a + 2**30, 8)]) is None             # beyond the region: refused
    t.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MAP_POPULATE is Linux's")
def test_a_client_touches_a_memory_nodes_pages_without_faulting(cluster):
    """The transport maps each region populated, as a NIC translates a registered region's
    every address from the start: a client's first touch of a page takes no page fault
    (mapped lazily, one insert in four faulted on its three replicas: a sixth of a load's
    client CPU, issue 12). Counted with the process's minor faults, not a clock."""
    import resource
    t = cluster.transport()
    try:
        pages = 2048                                    # 8 MiB of MN 0's data area
        base = t.regions[0].length - pages * 4096
        reads = [Read(0, base + i * 4096, 8) for i in range(pages)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(0, pages, 256):
            t.execute(reads[i:i + 256])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        t.close()
    assert faults < pages // 8, f"{faults} page faults touching {pages} pages"


def _resident(mapping) -> int:
    """Bytes of ``mapping`` (an mmap of this process) in its page tables: the Rss of its
    entry in /proc/self/smaps."""
    from fusee.emulator import _atomic
    start = f"{_atomic.address(mapping):x}-"
    with open("/proc/self/smaps") as smaps:
        lines = iter(smaps)
        for line in lines:
            if line.startswith(start):
                for field in lines:
                    if field.startswith("Rss:"):
                        return int(field.split()[1]) * 1024
    raise AssertionError(f"no mapping at {start} in /proc/self/smaps")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MAP_POPULATE, smaps")
def test_a_library_client_maps_populated_and_a_cli_command_lazily(cluster, monkeypatch,
                                                                   capsys):
    """A library client (``Client.connect``, the bench's) maps each region populated: its
    pages are in its page tables once it has connected. One command of the CLI maps them
    lazily (``populate=False``): mapped populated, 3 regions of 128 MiB took ~30 ms of a
    `fusee get` (512 MiB: ~120 ms), for the few pages it touches. Each segment the command
    maps is looked at as it is mapped (the segment itself, not a stand-in)."""
    from fusee import cli
    from fusee.client import Client
    from fusee.emulator.memory import SharedSegment
    import fusee.transports.shm as shm
    with Client.connect(cluster.config_path) as kv:
        segments = list(kv.transport._segments.values())
        assert len(segments) == 3 and kv.transport.populate
        assert [_resident(s.mmap) for s in segments] == [s.size for s in segments]
    with Client.connect(cluster.config_path, populate=False) as kv:
        segments = list(kv.transport._segments.values())
        assert len(segments) == 3 and not kv.transport.populate
        assert all(_resident(s.mmap) < s.size // 8 for s in segments)
    mapped = []

    class Observed(SharedSegment):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            mapped.append((self.size, _resident(self.mmap)))

    monkeypatch.setattr(shm, "SharedSegment", Observed)
    config = str(cluster.config_path)
    assert cli.main(["put", "--config", config, "k", "v"]) == 0
    assert cli.main(["get", "--config", config, "k"]) == 0
    assert capsys.readouterr().out == "v\n"
    assert len(mapped) == 6 and all(rss < size // 8 for size, rss in mapped), mapped


def _in_small_shm(script: str) -> subprocess.CompletedProcess | None:
    """Run ``script`` with a /dev/shm of 64 MiB (Docker's default) in a mount namespace of its
    own, or None where one cannot be made (not root, no user namespaces)."""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    shell = 'mount -t tmpfs -o size=64M tmpfs /dev/shm && exec "$0" -c "$1"'
    try:
        probe = subprocess.run([*unshare, "sh", "-c", shell, sys.executable, "pass"],
                               capture_output=True, timeout=60)
    except FileNotFoundError:
        return None
    if probe.returncode:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([*unshare, "sh", "-c", shell, sys.executable, script],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": root}, cwd=root)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fallocate on tmpfs")
def test_regions_beyond_dev_shm_refuse_to_start_in_one_line():
    """Three memory nodes' regions in a /dev/shm too small for them: mapped populated, the
    first took all the room and the next died of SIGBUS formatting its header (exit -7, no
    word of why). The memory node reserves its region's memory when it makes it, as pinning
    does, and says in one line that /dev/shm is too small."""
    done = _in_small_shm(
        "from fusee.emulator.cluster import LocalCluster, ClusterStartError\n"
        "try:\n"
        "    with LocalCluster(memnodes=3, transport='shm') as c:\n"
        "        kv = c.client(); kv.put(b'k', b'v'); print('started', kv.get(b'k'))\n"
        "except ClusterStartError as e:\n"
        "    print(e)\n")
    if done is None:
        pytest.skip("no mount namespace with a small /dev/shm here")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "exited with 2" in out and "no room for shared memory segment" in out, out
    assert "layout.region_size smaller or /dev/shm larger" in out
    # and ``fusee cluster`` exits with the node's usage error, not as an internal one
    done = _in_small_shm("from fusee.cli import main; raise SystemExit(main(['cluster']))")
    assert done is not None and done.returncode == 2, done
    assert "no room for shared memory segment" in done.stderr
    assert "internal error" not in done.stderr, done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_a_client_without_the_address_space_for_the_regions_says_so(cluster):
    """A client whose address space (ulimit -v) cannot hold the regions it maps: one line
    that says so and what to do (ConfigError), not ``[Errno 12] Cannot allocate memory`` as
    an internal error."""
    script = (
        "import resource, sys\n"
        "from fusee.config import ClusterConfig\n"
        "from fusee.errors import ConfigError\n"
        "from fusee.transports import connect\n"
        "import fusee.transports.shm, zmq\n"
        "cfg = ClusterConfig.load(sys.argv[1])\n"
        "vm = next(int(line.split()[1]) for line in open('/proc/self/status')\n"
        "          if line.startswith('VmSize'))\n"
        "room = vm * 1024 + (cfg.layout.region_size >> 1)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (room, room))\n"
        "try:\n"
        "    connect(cfg, 'shm').close()\n"
        "except ConfigError as e:\n"
        "    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script, str(cluster.config_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root}, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "cannot map its region" in done.stdout and "(ulimit -v)" in done.stdout, done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_a_memory_node_without_the_address_space_for_its_region_says_so():
    """A memory node that may not map its region (ulimit -v): one line saying what to do
    (ConfigError, which ``fusee memnode`` prints and exits 2 with), not an OSError's
    traceback; and the segment it made is gone again."""
    name = f"/fusee-test-nomap-{os.getpid()}"
    script = (
        "import resource, sys\n"
        "from fusee.errors import ConfigError\n"
        "from fusee.emulator.memory import SharedSegment\n"
        "vm = next(int(line.split()[1]) for line in open('/proc/self/status')\n"
        "          if line.startswith('VmSize'))\n"
        "room = vm * 1024 + (64 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (room, room))\n"
        "try:\n"
        "    SharedSegment(sys.argv[1], 256 << 20, create=True).close()\n"
        "except ConfigError as e:\n"
        "    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script, name], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": root},
                          cwd=root)
    assert done.returncode == 0, done.stderr
    assert "cannot map shared memory segment" in done.stdout, done.stdout
    assert "(ulimit -v)" in done.stdout
    assert not os.path.exists(f"/dev/shm{name}")
