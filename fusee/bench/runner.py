"""Benchmark clients as processes, each keeping K operations in flight.

A ``WorkerPool`` starts the client processes once per benchmark (spawned, so no ZeroMQ state
is inherited). For every phase the parent sends each client its part; the client prepares
(connects, pre-computes its operation stream and key names) and says it is ready; the parent
then gives one start time on the system-wide monotonic clock, so every client measures the
same window. Inside a client, operations run as the system's users run them (``drive``): one
call each at depth 1 (``kv.get``, ``kv.insert``...), else ``depth`` at a time, each group one
call that keeps them in flight together, their verbs merged into one batch per round trip
(``kv.get_many``, a pipeline).

A YCSB phase runs for a fixed time (warm-up, then the measured window), then deletes the keys
its inserts made, untimed; a micro phase and the load run a fixed list of keys per client.
Each client records every latency of its window and returns one HdrHistogram per operation
(encoded), which the parent merges losslessly.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
from multiprocessing import resource_tracker
import signal
import time
import traceback
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from hdrh.histogram import HdrHistogram

from fusee.bench.systems import Driver, SystemSpec, connect
from fusee.bench.ycsb import OP_NAMES, OpStream, Workload, key_names, stream_rng

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

#: latencies are recorded in nanoseconds, 3 significant digits, up to a minute
HDR_LOWEST, HDR_HIGHEST, HDR_DIGITS = 1, 60 * 10 ** 9, 3
#: operations pre-computed at a time by a YCSB client (about 1 ms of work)
CHUNK = 4096
#: keys read per call when a client warms its cache up (``_Client.warm_up``)
WARM_GROUP = 64
MAX_CLIENTS = 255
MAX_KEYS_PER_CLIENT = 1 << 20


class BenchError(RuntimeError):
    """A benchmark client failed, died or stopped answering."""


@dataclass(frozen=True)
class Phase:
    """One step of a benchmark, identical for every system so all see the same keys."""
    suite: str                      # "load" | "ycsb" | "micro" | "floor"
    name: str                       # workload name, the operation of a micro phase, the floor
    clients: int
    depth: int
    keyspace: int                   # seeds the op stream; names the keys a phase inserts
    value_size: int
    keys: int = 0                   # loaded keys (numbers 0..keys-1)
    workload: Workload | None = None
    theta: float = 0.99
    seed: int = 1
    warmup: float = 0.0
    duration: float = 0.0
    count: int = 0                  # micro: keys per client
    record: bool = True             # False: a micro setup / clean-up step, not reported
    repeat: int = 0                 # which run of its point this is (``--repeat``), from 0

    def label(self) -> str:
        what = self.name if self.suite == self.name else f"{self.suite} {self.name}"
        return f"{what} x{self.clients}" + (f", run {self.repeat + 1}" if self.repeat else "")


def key_base(keyspace: int, client: int) -> int:
    """First number of the keys that ``client`` inserts in a phase: disjoint from the loaded
    keys and from every other (phase, client); up to 2**20 keys each."""
    return (1 << 56) | (keyspace << 28) | (client << 20)


def hdr_encode(latencies_ns: array[int]) -> str:
    h = HdrHistogram(HDR_LOWEST, HDR_HIGHEST, HDR_DIGITS)
    values, counts = np.unique(np.frombuffer(latencies_ns, dtype=np.int64), return_counts=True)
    for v, c in zip(np.clip(values, HDR_LOWEST, HDR_HIGHEST).tolist(), counts.tolist()):
        h.record_value(v, c)
    encoded: str = h.encode().decode()
    return encoded


# -- the client process ------------------------------------------------------------------------
class _Recorder:
    """What one client saw: latencies of the operations that ended in the window [lo, hi),
    refusals, misses, and the driver's counters where the window opened and closed."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.lat: defaultdict[str, array[int]] = defaultdict(lambda: array("q"))
        self.errors: Counter[str] = Counter()
        self.misses = 0

    def result(self, counters: dict[str, Any], t0: int, t1: int) -> dict[str, Any]:
        lat = {k: v for k, v in self.lat.items() if v}
        return {"ops": {k: len(v) for k, v in lat.items()}, "errors": dict(self.errors),
                "misses": self.misses, "hdr": {k: hdr_encode(v) for k, v in lat.items()},
                "counters": counters, "t0": t0, "t1": t1}


def _counters(d: Driver) -> dict[str, Any]:
    """The driver's cumulative counters, plus this process's CPU time (user + system, in us):
    summed over a phase's clients and divided by its operations, the client CPU per
    operation, which tells the cost of the client's code apart from waiting on the verbs."""
    return {**d.counters(), "cpu_us": time.process_time_ns() / 1000}


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: b[k] - a.get(k, 0) for k in b}


def _wait_until(t_ns: int) -> None:
    while (left := t_ns - time.monotonic_ns()) > 0:
        time.sleep(min(left / 1e9, 0.05))


def drive(d: Driver, ops: Iterable[tuple[str, bytes]], value: bytes, depth: int,
          rec: _Recorder) -> dict[str, Any]:
    """Run ``ops`` ((kind, key) pairs) as a user would: one call each at depth 1
    (``Driver.call``), else ``depth`` at a time, each group one call (``Driver.many``: its
    operations in flight together). An operation's latency is its call's, timed around
    it. Stops when ``ops`` ends or once the clock passes ``rec.hi``; returns the result."""
    clock, lo, hi = time.monotonic_ns, rec.lo, rec.hi
    lat, errors = rec.lat, rec.errors
    marks: list[tuple[dict[str, Any], int]] = []     # the counters where the window opened

    def past(t: int) -> int:
        """The clock reached the next mark: the window opens (the next mark: its end), or
        it closed (0: stop)."""
        if marks:
            return 0
        marks.append((_counters(d), t))
        return hi

    mark, misses = lo, 0
    if depth == 1:              # the loop around the call: no list, tuple or zip per call
        calls = d.call
        for kind, key in ops:
            t0 = clock()
            if t0 >= mark and not (mark := past(t0)):
                break
            try:
                got = calls[kind](key, value)
            except KeyError:                    # done, but refused: KeyExists / KeyNotFound
                if lo <= clock() < hi:
                    errors[kind] += 1
                continue
            t1 = clock()
            if lo <= t1 < hi:
                lat[kind].append(t1 - t0)
                if got is None and kind == "search":
                    misses += 1
    else:
        many = d.many
        for kinds, keys in _groups(iter(ops), depth):
            t0 = clock()
            if t0 >= mark and not (mark := past(t0)):
                break
            outcomes = many(kinds, keys, value)
            t1 = clock()
            if lo <= t1 < hi:
                for kind, got in zip(kinds, outcomes):
                    if isinstance(got, KeyError):
                        errors[kind] += 1
                    else:
                        lat[kind].append(t1 - t0)
                        if got is None and kind == "search":
                            misses += 1
    rec.misses += misses
    end = (_counters(d), clock())
    (c0, t0), (c1, t1) = marks[0] if marks else end, end
    return rec.result(_delta(c0, c1), t0, t1)


def _groups(ops: Iterator[tuple[str, bytes]], size: int
            ) -> Iterator[tuple[tuple[str, ...], tuple[bytes, ...]]]:
    """``ops`` ``size`` at a time, each group as its kinds and its keys."""
    while group := list(islice(ops, size)):
        kinds, keys = zip(*group)
        yield kinds, keys


class _Client:
    """State of one benchmark client process between commands."""

    def __init__(self) -> None:
        self.driver: Driver | None = None
        self.spec: SystemSpec | None = None
        self.names: tuple[int, list[bytes]] = (0, [])
        self.warm = 0           # loaded keys the driver's cache has met (``warm_up``)

    def loaded_names(self, keys: int) -> list[bytes]:
        if self.names[0] != keys:
            self.names = (keys, key_names(np.arange(keys)))
        return self.names[1]

    def warm_up(self, keys: int, value: bytes) -> None:
        """Read every loaded key once, untimed, before the first YCSB point on them: YCSB
        measures a long-running client, whose cache knows the keys it works on; in a short
        window a scrambled Zipfian meets a key of its tail only every few seconds. Every
        system gets the same reads (the Clover baseline's cache learns its addresses)."""
        d = self.driver
        assert d is not None, "a connected client"
        if self.warm != keys:
            names = self.loaded_names(keys)
            for i in range(0, keys, WARM_GROUP):
                group = names[i:i + WARM_GROUP]
                d.many(["search"] * len(group), group, value)
            self.warm = keys

    def prepare(self, phase: Phase, client: int) -> Callable[[int], dict[str, Any]]:
        """Everything before the clock starts; returns the function that runs the phase."""
        d = self.driver
        assert d is not None, "a phase runs on a connected client"
        if phase.suite == "floor":
            return self._pingpong(phase)
        value = stream_rng(phase.seed, 1 << 30, client).bytes(phase.value_size)
        if phase.suite == "ycsb":
            self.warm_up(phase.keys, value)
            return self._ycsb(phase, client, value)
        if phase.suite == "load":
            names = self.loaded_names(phase.keys)[client::phase.clients]
            kind = "insert"
        else:
            base = key_base(phase.keyspace, client)
            names = key_names(np.arange(base, base + phase.count))
            kind = phase.name
        ops = [(kind, name) for name in names]

        def run(t_start: int) -> dict[str, Any]:
            _wait_until(t_start)
            return drive(d, ops, value, phase.depth, _Recorder(0, 1 << 63))
        return run

    def _pingpong(self, phase: Phase) -> Callable[[int], dict[str, Any]]:
        """The floor of a zmq run (``Phase.floor``): ``phase.count`` raw pyzmq ping-pongs of
        a one-verb batch's size, from this client process to an echo process over the
        cluster's endpoint kind and security, timed as ``drive`` times an operation."""
        import tempfile
        from fusee.bench.verbs import PingPong
        d, spec = self.driver, self.spec
        assert d is not None and spec is not None, "a phase runs on a connected client"
        workdir = tempfile.TemporaryDirectory(prefix="fusee-bench-floor-")
        try:
            ping = PingPong(spec.config_path, workdir.name)
        except BaseException:
            workdir.cleanup()
            raise
        payload = b"p" * 32

        def run(t_start: int) -> dict[str, Any]:
            rec = _Recorder(0, 1 << 63)
            lat, clock = rec.lat[phase.name], time.monotonic_ns
            try:
                for _ in range(min(200, phase.count)):      # warm up, untimed
                    ping(payload)
                _wait_until(t_start)
                c0, t0 = _counters(d), clock()
                for _ in range(phase.count):
                    t = clock()
                    ping(payload)
                    lat.append(clock() - t)
                return rec.result(_delta(c0, _counters(d)), t0, clock())
            finally:
                ping.close()
                workdir.cleanup()
        return run

    def _ycsb(self, phase: Phase, client: int, value: bytes) -> Callable[[int], dict[str, Any]]:
        d = self.driver
        assert d is not None and phase.workload is not None, "a YCSB phase, connected"
        stream = OpStream(phase.workload, phase.keys,
                          stream_rng(phase.seed, phase.keyspace, client),
                          insert_base=key_base(phase.keyspace, client), theta=phase.theta)
        ops = ycsb_ops(stream, self.loaded_names(phase.keys))

        def run(t_start: int) -> dict[str, Any]:
            lo = t_start + int(phase.warmup * 1e9)
            _wait_until(t_start)
            result = drive(d, ops, value, phase.depth,
                           _Recorder(lo, lo + int(phase.duration * 1e9)))
            _delete_inserted(d, stream, value)
            return result
        return run


def _delete_inserted(d: Driver, stream: OpStream, value: bytes) -> None:
    """After a YCSB run's window: delete the keys its inserts may have made (YCSB-D's),
    untimed, as a micro point deletes its keys. A run inserts for as long as it lasts, so the
    faster the client the more keys: kept, the runs of a whole suite filled the memory the
    cluster was sized for (``cluster_layout``: the loaded and micro keys) and the next insert
    met OutOfMemory. The stream drew its chunks ahead of what ran, so some of these keys
    were never inserted: their deletes are refused (KeyNotFound), which is fine."""
    names = key_names(np.arange(stream.insert_base, stream.insert_base + stream.inserted))
    for i in range(0, len(names), WARM_GROUP):
        group = names[i:i + WARM_GROUP]
        d.many(["delete"] * len(group), group, value)


def ycsb_ops(stream: OpStream, loaded: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """Generator: the (kind, key name) operations of ``stream``, endless, ``loaded`` naming
    the loaded keys. The first chunk is drawn at once (before the clock starts), and the
    names of keys inserted since the load (YCSB-D's inserts, and its reads of the latest
    keys) are made a chunk at a time in one call: one at a time they cost ~60 us each, more
    than the operation the bench times."""
    chunk = stream.chunk(CHUNK)
    return _named(stream, chunk, loaded)


def _named(stream: OpStream, chunk: tuple[np.ndarray, np.ndarray], loaded: list[bytes]
           ) -> Iterator[tuple[str, bytes]]:
    n_loaded = len(loaded)
    while True:
        codes, nums = chunk
        fresh = iter(key_names(nums[nums >= n_loaded]))
        for code, num in zip(codes.tolist(), nums.tolist()):
            yield OP_NAMES[code], loaded[num] if num < n_loaded else next(fresh)
        chunk = stream.chunk(CHUNK)


def _client_main(conn: Connection) -> None:
    state = _Client()
    interrupted = False
    try:
        # started with SIGINT held (``_sigint_held``): a Ctrl-C during the start comes now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        while True:
            try:
                cmd, arg = conn.recv()
            except EOFError:
                return                          # the parent is gone
            try:
                reply = None
                if cmd == "exit":
                    return
                if cmd == "connect":
                    state.driver, state.spec, state.warm = connect(arg), arg, 0
                elif cmd == "disconnect":
                    if state.driver is not None:
                        state.driver.close()
                    state.driver = None
                elif cmd == "phase":
                    run = state.prepare(*arg)
                    gc.collect()                # no collection of setup garbage mid-window,
                    gc.freeze()                 # and no rescans of long-lived setup objects
                    conn.send(("ready", None))
                    go, t_start = conn.recv()
                    if go != "go":
                        return                  # the parent gave up on this phase
                    reply = run(t_start)
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", reply))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except KeyboardInterrupt:
        # a Ctrl-C in the terminal reaches its whole process group: the parent stops the
        # bench, and the memory nodes (the same Ctrl-C) are gone, so a close would fail
        interrupted = True
    finally:
        if state.driver is not None and not interrupted:
            state.driver.close()


# -- the parent side ------------------------------------------------------------------------
@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT held while the client processes start (main thread only). A process inherits
    the starting thread's signal mask, so each client starts with SIGINT blocked, and a
    Ctrl-C (which reaches the terminal's whole process group) stays pending until
    ``_client_main`` lets it in, where the client stops quietly. Delivered any sooner, it
    cut short multiprocessing's own start (importing the interpreter's site, or this
    module), each client printing a traceback before any of ours ran. (How multiprocessing's
    resource tracker guards its own start; started on the first process start, it lifts the
    block as it ends: started first here.) This process's own Ctrl-C is noted meanwhile and
    raised as the block ends: another thread of it (tqdm's monitor) does not block SIGINT,
    so the signal still came, and its KeyboardInterrupt between a start's fork and its
    write of the process's data left that client reading nothing (EOFError, a traceback)."""
    resource_tracker.ensure_running()
    noted: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)    # one pending comes: noted
        signal.signal(signal.SIGINT, before)
    if noted:
        signal.raise_signal(signal.SIGINT)                  # as it would have come


class WorkerPool:
    """N client processes, started once, always stopped (context manager)."""

    def __init__(self, n: int) -> None:
        if not 1 <= n <= MAX_CLIENTS:
            raise ValueError(f"between 1 and {MAX_CLIENTS} clients")
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        try:
            with _sigint_held():
                for i in range(n):
                    parent, child = ctx.Pipe()
                    p = ctx.Process(target=_client_main, args=(child,), daemon=True,
                                    name=f"fusee-bench-client-{i}")
                    p.start()
                    child.close()
                    self.procs.append(p)
                    self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, i: int, msg: object) -> None:
        self.conns[i].send(msg)

    def recv(self, clients: Iterable[int], timeout: float) -> list[Any]:
        """One reply from each of ``clients``; raises BenchError on an error, a dead client or
        no answer within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        replies: dict[int, Any] = {}
        for i in clients:
            conn, proc = self.conns[i], self.procs[i]
            while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                if not proc.is_alive():
                    raise BenchError(f"benchmark client {i} died (exit code {proc.exitcode})")
                if time.monotonic() > deadline:
                    raise BenchError(f"benchmark client {i}: no answer within {timeout:g} s")
            try:
                status, value = conn.recv()
            except EOFError:
                raise BenchError(f"benchmark client {i} died") from None
            if status == "error":
                raise BenchError(f"benchmark client {i} failed:\n{value}")
            replies[i] = value
        return [replies[i] for i in clients]

    def call(self, clients: Iterable[int], msg: object, timeout: float) -> list[Any]:
        for i in clients:
            self.send(i, msg)
        return self.recv(clients, timeout)

    def connect(self, spec: SystemSpec, timeout: float = 60.0) -> None:
        self.call(range(len(self)), ("connect", spec), timeout)

    def disconnect(self, timeout: float = 60.0) -> None:
        self.call(range(len(self)), ("disconnect", None), timeout)

    def run_phase(self, phase: Phase, timeout: float) -> list[dict[str, Any]]:
        """Run ``phase`` on its first ``phase.clients`` clients; their raw results."""
        clients = range(phase.clients)
        for i in clients:
            self.send(i, ("phase", (phase, i)))
        self.recv(clients, 120.0)                       # ready: streams and keys prepared
        t_start = time.monotonic_ns() + 20_000_000      # 20 ms: every client is waiting
        for i in clients:
            self.send(i, ("go", t_start))
        return self.recv(clients, timeout)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit", None))
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
