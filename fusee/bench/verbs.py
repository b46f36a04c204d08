"""`fusee bench verbs`: what a verb costs on each backend, next to the floor it cannot beat.

For every backend it starts a local cluster of 3 memory nodes and times, one batch at a time
through ``Transport.execute``: READ 64 B, WRITE 64 B, CAS, FAA, READ 1 KiB, and a batch of one
READ 64 B on each of the 3 MNs. In the same run it times the floors: for the memory backends
(local, shm) a plain in-process memoryview copy, a struct unpack and the bare hardware atomic;
for ZeroMQ a raw pyzmq DEALER/ROUTER ping-pong to an echo process over the same endpoint kind
and the same security as the cluster. Cases and floors are timed in interleaved rounds, so that
a noisy machine slows them alike and the ratios stay meaningful.

A backend is a name in ``TARGETS`` (cluster arguments + floor kind); ``verbs`` (pyverbs over
RDMA) is listed there and is benched when named and a device is present.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from fusee.emulator import _atomic
from fusee.emulator.cluster import LocalCluster
from fusee.config import ClusterConfig, MemNodeConfig
from fusee.memory_map import MemoryMap
from fusee.verbs import Cas, Faa, Read, Request, Write
from fusee.transports.security import secure_client, secure_server


@dataclass(frozen=True)
class Target:
    """How to bench one backend: LocalCluster arguments and which floors apply."""
    cluster: dict[str, Any]
    floor: str                      # "memory" | "zmq" | "none"
    about: str = ""


TARGETS: dict[str, Target] = {
    "local": Target(dict(transport="local"), "memory", "in-process memory"),
    "shm": Target(dict(transport="shm"), "memory", "client executes on the mapped segment"),
    "zmq-ipc": Target(dict(transport="zmq", endpoint="ipc"), "zmq", "emulated NIC over ipc://"),
    "zmq-tcp": Target(dict(transport="zmq", endpoint="tcp"), "zmq", "emulated NIC over tcp://"),
    "verbs": Target(dict(transport="verbs"), "none", "pyverbs RC queue pairs (RDMA device)"),
}
DEFAULT_TARGETS = ("local", "shm", "zmq-ipc", "zmq-tcp")

#: case -> (verbs per batch, the memory floor it is compared with)
CASES = {
    "read64": (1, "copy64"),
    "write64": (1, "copy64"),
    "cas": (1, "atomic"),
    "faa": (1, "atomic"),
    "read1k": (1, "copy1k"),
    "batch3": (3, "copy64"),
}


def batches(config: ClusterConfig) -> dict[str, list[Request]]:
    """One batch per case, on scratch words of the data area (never the header or tables)."""
    a = MemoryMap.of(config.layout).data
    return {
        "read64": [Read(0, a, 64)],
        "write64": [Write(0, a + 4096, b"w" * 64)],
        "cas": [Cas(0, a + 8192, 0, 0)],
        "faa": [Faa(0, a + 8200, 1)],
        "read1k": [Read(0, a, 1024)],
        "batch3": [Read(n, a, 64) for n in range(3)],
    }


# -- timing ---------------------------------------------------------------------------------
@dataclass
class Samples:
    ns: list[int] = field(default_factory=list)     # one latency per batch
    wall: int = 0                                # summed wall time of the timed loops

    def summary(self, verbs_per_batch: int = 1) -> dict[str, Any]:
        s = sorted(self.ns)
        n = len(s)
        return {"n": n, "p50_us": s[n // 2] / 1e3, "p99_us": s[min(n - 1, n * 99 // 100)] / 1e3,
                "ops_per_s": n * 1e9 / self.wall if self.wall else 0.0,
                "verbs_per_s": n * verbs_per_batch * 1e9 / self.wall if self.wall else 0.0}


def timed(fn: Callable[[Any], object], arg: object, n: int, out: Samples) -> None:
    """Call ``fn(arg)`` n times, recording each call's latency."""
    clock = time.perf_counter_ns
    ns = out.ns
    start = clock()
    for _ in range(n):
        t0 = clock()
        fn(arg)
        ns.append(clock() - t0)
    out.wall += clock() - start


def interleaved(cases: dict[str, Any], ops: int, rounds: int) -> dict[str, Samples]:
    """Time every case (name -> (fn, arg)) for ``ops`` calls, in ``rounds`` interleaved slices,
    after one untimed warm-up slice each."""
    rounds = max(1, min(rounds, ops))
    chunk = [ops // rounds + (1 if r < ops % rounds else 0) for r in range(rounds)]
    for fn, arg in cases.values():
        timed(fn, arg, min(chunk[0], 200), Samples())
    out = {name: Samples() for name in cases}
    for n in chunk:
        for name, (fn, arg) in cases.items():
            timed(fn, arg, n, out[name])
    return out


# -- floors ---------------------------------------------------------------------------------
def memory_floors() -> tuple[dict[str, Any], object]:
    """Cases for the in-process floors; returns (cases, keep-alive)."""
    buf = mmap.mmap(-1, 1 << 16)
    mv = memoryview(buf)
    base = _atomic.address(buf)
    unpack = struct.Struct("<Q").unpack_from
    cas = _atomic.cas
    cases = {
        "copy64": (lambda a: mv[a:a + 64].tobytes(), 64),
        "copy1k": (lambda a: mv[a:a + 1024].tobytes(), 64),
        "unpack": (lambda a: unpack(mv, a), 64),
        "atomic": (lambda a: cas(a, 0, 0), base + 64),
    }
    return cases, (buf, mv)


def echo(config_path: str, endpoint: str) -> None:
    """The raw ping-pong's server (run in its own process): a ROUTER that returns every
    one-part message; it prints its bound endpoint, and stops on an empty message or when
    the process that started it is gone."""
    config = ClusterConfig.load(config_path)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    auth = secure_server(ctx, sock, config, 0)      # the same security as memory node 0
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.bind(endpoint)
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    parent = os.getppid()
    recv, send, more = sock.recv, sock.send, zmq.SNDMORE
    try:
        while os.getppid() == parent:     # the fewest pyzmq calls an echo can make
            try:
                ident = recv()
            except zmq.Again:
                continue
            message = recv()
            if not message:
                break
            send(ident, more)
            send(message)
    finally:
        sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()


class PingPong:
    """A raw pyzmq request/reply ping-pong, over the cluster's endpoint kind and security:
    ``config_path`` names the cluster's config, and an ipc endpoint's socket goes in
    ``ipc_dir``. Used by `fusee bench verbs` and by the zmq runs of `fusee bench micro`
    (the floor a SEARCH of one round trip is judged against)."""

    def __init__(self, config_path: str | Path, ipc_dir: str | Path) -> None:
        config = ClusterConfig.load(config_path)
        if config.node(0).endpoint.startswith("tcp://"):
            endpoint = "tcp://127.0.0.1:*"
        else:
            endpoint = f"ipc://{ipc_dir}/floor.sock"
        code = (f"from fusee.bench.verbs import echo; "
                f"echo({str(config_path)!r}, {endpoint!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        out = self.proc.stdout
        assert out is not None, "stdout=PIPE"
        try:
            if not select.select([out], [], [], 30)[0]:
                raise RuntimeError("the ping-pong echo process did not start within 30 s")
            endpoint = out.readline().decode().strip()
            if not endpoint:
                raise RuntimeError(f"the ping-pong echo process exited with {self.proc.wait(5)}")
            self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.RCVTIMEO, int(config.timeout * 1000))
            node = config.node(0)
            secure_client(self.sock, config, MemNodeConfig(0, endpoint, node.curve_public))
            self.sock.connect(endpoint)
        except BaseException:
            self.close()
            raise

    def __call__(self, payload: bytes) -> bytes:
        self.sock.send(payload)
        reply: bytes = self.sock.recv()
        return reply

    def close(self) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:
            try:
                sock.send(b"", zmq.NOBLOCK)         # ask the echo to stop
            except Exception:
                pass
            sock.close(0)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- one backend ----------------------------------------------------------------------------
def bench_target(name: str, ops: int, rounds: int) -> dict[str, Any]:
    target = TARGETS[name]
    with LocalCluster(memnodes=3, **target.cluster) as cluster:
        t = cluster.transport()
        ping = None
        try:
            cases = {case: (t.execute, batch) for case, batch in batches(cluster.config).items()}
            floors: dict[str, Any] = {}
            if target.floor == "memory":
                floors, _keep_alive = memory_floors()
            elif target.floor == "zmq":
                ping = PingPong(cluster.config_path, cluster.workdir)
                # a message of the size of a one-verb batch
                floors = {"pingpong": (ping, b"p" * 32)}
            timer = Samples()
            timed(lambda _: None, None, 1000, timer)
            got = interleaved({**floors, **cases}, ops, rounds)
        finally:
            if ping is not None:
                ping.close()
            t.close()
        curve = cluster.config.security.curve
    floor_stats = {f: got[f].summary() for f in floors}
    result: dict[str, Any] = {
        "about": target.about, "cluster": dict(target.cluster), "curve": curve,
        "timer_overhead_us": timer.summary()["p50_us"], "floors": floor_stats, "ops": {}}
    for case, (verbs, memory_floor) in CASES.items():
        row = got[case].summary(verbs)
        floor = {"memory": memory_floor, "zmq": "pingpong"}.get(target.floor)
        if floor is not None:
            row["floor"] = floor
            row["x_floor"] = row["p50_us"] / floor_stats[floor]["p50_us"]
        result["ops"][case] = row
    rows: dict[str, dict[str, Any]] = result["ops"]
    result["batch3_x_single"] = rows["batch3"]["p50_us"] / rows["read64"]["p50_us"]
    return result


# -- 8-byte atomics from Python: the alternatives --------------------------------------------
def atomic_alternatives(ops: int) -> dict[str, Any]:
    """Time CAS and FAA on shared memory through the C extension (METH_FASTCALL), ctypes +
    libatomic, and the PyPI ``atomics`` package when it is installed."""
    import ctypes
    import ctypes.util
    buf = mmap.mmap(-1, 4096)
    base = _atomic.address(buf)
    cases: dict[str, Any] = {"c_ext_cas": (lambda a: _atomic.cas(a, 0, 0), base),
                   "c_ext_faa": (lambda a: _atomic.faa(a, 1), base)}
    notes = {}
    lib_name = ctypes.util.find_library("atomic")
    if lib_name:
        lib = ctypes.CDLL(lib_name)
        fetch_add = lib.__atomic_fetch_add_8
        fetch_add.restype, fetch_add.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64,
                                                                 ctypes.c_int]
        cmpxchg = lib.__atomic_compare_exchange_8
        cmpxchg.restype = ctypes.c_bool
        cmpxchg.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                            ctypes.c_int]
        expected = ctypes.c_uint64(0)
        p_expected = ctypes.addressof(expected)

        def ctypes_cas(a: int) -> int:
            expected.value = 0
            cmpxchg(a, p_expected, 0, 5, 5)
            return expected.value

        cases["ctypes_libatomic_cas"] = (ctypes_cas, base)
        cases["ctypes_libatomic_faa"] = (lambda a: fetch_add(a, 1, 5), base)
    else:
        notes["ctypes_libatomic"] = "libatomic not found"
    context = None
    try:
        import atomics
        context = atomics.atomicview(buffer=memoryview(buf)[8:16], atype=atomics.UINT)
        view = context.__enter__()
        cases["atomics_pkg_cas"] = (lambda _: view.cmpxchg_strong(0, 0), None)
        cases["atomics_pkg_faa"] = (lambda _: view.fetch_add(1), None)
    except ImportError:
        notes["atomics_pkg"] = "not installed (pip install atomics)"
    try:
        got = interleaved(cases, ops, 5)
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    out: dict[str, Any] = {k: {"p50_ns": v.summary()["p50_us"] * 1e3,
                               "mean_ns": v.wall / len(v.ns)}
           for k, v in got.items()}
    out.update(notes)
    return out


# -- report ---------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    lines = [f"{'backend':9} {'case':9} {'ops/s':>10} {'p50 us':>9} {'p99 us':>9}  "
             f"{'floor':8} {'x floor':>7}"]
    for name, r in results.items():
        if "error" in r:
            said = r["error"].strip().splitlines()      # first line, and a cause's last line
            lines.append(f"{name:9} unavailable: {said[0]}" +
                         (f" ... {said[-1].strip()}" if len(said) > 1 else ""))
            continue
        for f, s in r["floors"].items():
            lines.append(f"{name:9} {'(' + f + ')':9} {s['ops_per_s']:10.0f} {s['p50_us']:9.3f} "
                         f"{s['p99_us']:9.3f}")
        for case, s in r["ops"].items():
            ratio = f"{s['x_floor']:7.2f}" if "x_floor" in s else ""
            lines.append(f"{name:9} {case:9} {s['ops_per_s']:10.0f} {s['p50_us']:9.3f} "
                         f"{s['p99_us']:9.3f}  {s.get('floor', ''):8} {ratio}")
        lines.append(f"{name:9} batch of 3 MNs / one verb (p50): {r['batch3_x_single']:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusee bench verbs", description=__doc__.splitlines()[0])
    p.add_argument("--transport", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated backends out of {', '.join(TARGETS)} "
                        f"(default: {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--ops", type=int, default=10000, help="timed batches per case (default 10000)")
    p.add_argument("--rounds", type=int, default=10,
                   help="interleaved slices the ops of each case are timed in (default 10)")
    p.add_argument("--atomics", action="store_true",
                   help="also time the ways to do an 8-byte CAS/FAA on shared memory from Python")
    p.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.transport.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        p.error(f"unknown backend(s) {unknown}; choose from {', '.join(TARGETS)}")
    if args.ops < 1 or args.rounds < 1:
        p.error("--ops and --rounds must be positive")

    results: dict[str, Any] = {}
    for name in names:
        print(f"benching {name} ({TARGETS[name].about}) ...", file=sys.stderr, flush=True)
        try:
            results[name] = bench_target(name, args.ops, args.rounds)
        except Exception as e:           # one backend unavailable must not lose the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(table(results))
    doc = {"bench": "verbs", "ops": args.ops, "rounds": args.rounds, "memnodes": 3,
           "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "backends": results}
    if args.atomics:
        doc["atomics"] = atomic_alternatives(args.ops)
        print("8-byte atomics from Python (p50 ns per call):")
        for k, v in doc["atomics"].items():
            print(f"  {k:24} {v['p50_ns']:8.0f}" if isinstance(v, dict) else f"  {k:24} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
