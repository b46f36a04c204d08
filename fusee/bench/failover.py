"""`fusee bench failover`: throughput over time across a memory-node crash (cf. FUSEE Fig. 20).

It starts a local cluster with a master (default: 3 memory nodes, r = 3, the shm backend),
loads the keys, runs a YCSB workload (default A: 50% search, 50% update) from N client
processes for a fixed time, and kills one memory node with SIGKILL at t = K s. Every client
counts the operations it completes in each time bucket (100 ms) of the shared monotonic clock;
their sum is the cluster's throughput timeline. The master's failover record gives the
milestones: when it declared the MN dead, when every client had paused, when the new epoch
was published. It prints the timeline, the steady throughput before and after, the drop and
the time until throughput is back, and writes failover.json and failover.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import shlex
import sys
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusee.bench import report
from fusee.bench.runner import MAX_CLIENTS, BenchError, key_base
from fusee.bench.ycsb import (KEY_LENGTH, OP_NAMES, WORKLOADS, OpStream, StoreShape, key_names,
                              stream_rng)
from fusee.client import Client
from fusee.driver import run_concurrently
from fusee.errors import FuseeError
from fusee.verbs import Op, TransportError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from fusee.emulator.cluster import LocalCluster

#: operations pre-computed at a time by a client
CHUNK = 4096
#: a bucket is back when it reaches this share of the steady throughput
RECOVERED = 0.9


@dataclass
class FailoverOptions(StoreShape):
    transport: str = "shm"
    endpoint: str = "ipc"
    memnodes: int = 3
    replication: int = 0                    # 0: min(3, memnodes)
    clients: int = 2
    depth: int = 1
    keys: int = 10_000
    object_size: int = 1024                 # key + value bytes
    workload: str = "A"
    theta: float = 0.99
    duration: float = 8.0                   # seconds of load, the kill included
    kill_at: float = 3.0                    # seconds into the load
    kill_node: int = 0
    bucket: float = 0.1                     # seconds per throughput point
    warmup: float = 0.5                     # seconds not counted in the steady throughput
    client_lease: float = 1.0
    mn_lease: float = 1.0
    timeout: float = 1.0
    seed: int = 1

    def check(self) -> None:
        if self.transport not in ("shm", "zmq"):
            raise ValueError("transport must be shm or zmq (the master needs MN processes)")
        if not 2 <= self.replicas <= self.memnodes:
            raise ValueError("a memory node can die only with r >= 2 replicas on as many MNs")
        if not 0 <= self.kill_node < self.memnodes:
            raise ValueError(f"kill node must be in 0..{self.memnodes - 1}")
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; known: {', '.join(WORKLOADS)}")
        if self.object_size <= KEY_LENGTH:
            raise ValueError(f"object size must exceed the {KEY_LENGTH}-byte key")
        if self.keys < 2 or self.depth < 1 or not 0 < self.theta < 1:
            raise ValueError("need keys >= 2, depth >= 1, 0 < theta < 1")
        if not 0 < self.bucket <= self.warmup < self.kill_at < self.duration:
            raise ValueError("need 0 < bucket <= warmup < kill-at < duration")
        for name in ("client_lease", "mn_lease", "timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive")


# -- the client process ------------------------------------------------------------------------
def _client(config_path: str, index: int, o: FailoverOptions, conn: Connection) -> None:
    """Load this client's share of the keys, say ready, then at the go time run the workload
    until the end and send back its counts per bucket."""
    try:
        with Client.connect(config_path) as kv:
            core, ex = kv.core, kv.executor
            value = stream_rng(o.seed, 1 << 30, index).bytes(o.value_size)
            names = key_names(np.arange(o.keys))
            run_concurrently((core.insert(k, value) for k in names[index::o.clients]), ex,
                             o.depth, lambda i, r: None)
            ops: dict[str, Callable[[bytes], Op[Any]]] = {
                "search": lambda k: core.search(k), "update": lambda k: core.update(k, value),
                "insert": lambda k: core.insert(k, value)}
            stream = OpStream(WORKLOADS[o.workload], o.keys, stream_rng(o.seed, 1, index),
                              insert_base=key_base(1, index), theta=o.theta)
            n = math.ceil(o.duration / o.bucket)
            done, failed, slowest = array("q", [0] * n), array("q", [0] * n), array("q", [0] * n)
            kinds: Counter[str] = Counter()
            conn.send(("ready", None))
            go, t0 = conn.recv()
            if go != "go":
                return
            width, end = int(o.bucket * 1e9), t0 + int(o.duration * 1e9)

            def timed(op: Op[Any]) -> Op[None]:
                start = time.monotonic_ns()
                try:
                    yield from op
                    failure = None
                except KeyError:            # KeyExists / KeyNotFound: done all the same
                    failure = None
                except (TransportError, FuseeError) as e:
                    failure = type(e).__name__
                now = time.monotonic_ns()
                b = (now - t0) // width
                if 0 <= b < n:
                    if failure is None:
                        done[b] += 1
                    else:
                        failed[b] += 1
                        kinds[failure] += 1
                    slowest[b] = max(slowest[b], now - start)

            def source() -> Iterator[Op[None]]:
                codes: list[int] = []
                nums: list[int] = []
                i = 0
                while time.monotonic_ns() < end:
                    if i == len(codes):
                        codes, nums = (a.tolist() for a in stream.chunk(CHUNK))
                        i = 0
                    kind, num = OP_NAMES[codes[i]], nums[i]
                    i += 1
                    key = names[num] if num < o.keys else key_names([num])[0]
                    yield timed(ops[kind](key))

            while (left := t0 - time.monotonic_ns()) > 0:
                time.sleep(min(left / 1e9, 0.05))
            run_concurrently(source(), ex, o.depth, lambda i, r: None)
            conn.send(("ok", {"done": done.tolist(), "failed": failed.tolist(),
                              "slowest_ns": slowest.tolist(), "errors": dict(kinds),
                              "client_id": kv.client_id}))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _recv(conn: Connection, proc: BaseProcess, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise BenchError(f"a benchmark client died ({what}, exit code {proc.exitcode})")
        if time.monotonic() > deadline:
            raise BenchError(f"a benchmark client did not answer within {timeout:g} s ({what})")
    status, value = conn.recv()
    if status == "error":
        raise BenchError(f"a benchmark client failed ({what}):\n{value}")
    return value


# -- the parent --------------------------------------------------------------------------------
def run_failover(o: FailoverOptions, command: str = "") -> dict[str, Any]:
    """Run the benchmark; returns the result document."""
    from fusee.emulator.cluster import LocalCluster
    from fusee.bench.main import _machine
    from fusee.bench.systems import cluster_layout
    o.check()
    layout = cluster_layout(o.keys, o.object_size)
    doc: dict[str, Any] = {"fusee_bench_failover": 1, "command": command,
           "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": _machine(), "options": {**dataclasses.asdict(o), "replicas": o.replicas}}
    ctx = mp.get_context("spawn")
    with LocalCluster(memnodes=o.memnodes, transport=o.transport, endpoint=o.endpoint,
                      replication=o.replication, layout=layout, timeout=o.timeout, master=True,
                      client_lease=o.client_lease, mn_lease=o.mn_lease) as cluster:
        pipes = [ctx.Pipe() for _ in range(o.clients)]
        procs = [ctx.Process(target=_client, args=(str(cluster.config_path), i, o, child),
                             daemon=True, name=f"fusee-failover-client-{i}")
                 for i, (_, child) in enumerate(pipes)]
        try:
            for p in procs:
                p.start()
            for (conn, _), p in zip(pipes, procs):
                _recv(conn, p, 600.0, "loading the keys")
            t0 = time.monotonic_ns() + 50_000_000
            for conn, _ in pipes:
                conn.send(("go", t0))
            while (left := t0 + int(o.kill_at * 1e9) - time.monotonic_ns()) > 0:
                time.sleep(min(left / 1e9, 0.05))
            cluster.kill(o.kill_node)
            killed = (time.monotonic_ns() - t0) / 1e9
            wall0 = time.time() - (time.monotonic_ns() - t0) / 1e9
            results = [_recv(conn, p, o.duration + 120.0, "running")
                       for (conn, _), p in zip(pipes, procs)]
            status, rec = _failover_record(cluster, o.kill_node, 120.0)
        finally:
            for conn, _ in pipes:
                try:
                    conn.send(("stop", 0))
                except (OSError, ValueError):
                    pass
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
    milestones = {"killed": killed}
    for name, key in (("declared_dead", "detected_at"), ("paused", "started_at"),
                      ("published", "finished_at")):
        if key in rec:
            milestones[name] = rec[key] - wall0
    doc["failover"] = {**rec, "milestones_s": milestones, "epoch": status["epoch"],
                       "dead": status["dead"]}
    doc["timeline"] = timeline(results, o.bucket)
    doc["summary"] = summarize(doc["timeline"], o, killed)
    doc["errors"] = dict(sum((Counter(r["errors"]) for r in results), Counter()))
    doc["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return doc


def _failover_record(cluster: LocalCluster, node: int, timeout: float
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The master's status once the failover of ``node`` is on record, and that record."""
    deadline = time.monotonic() + timeout
    while True:
        status = cluster.master_status()
        records = [f for f in status["failovers"] if f["node"] == node]
        if records:
            return status, records[-1]
        if time.monotonic() > deadline:
            raise BenchError(f"the master did not fail MN {node} over within {timeout:g} s: "
                             f"{status.get('failover')}; lost: {status.get('lost')}")
        time.sleep(0.05)


def timeline(results: list[dict[str, Any]], bucket: float) -> list[dict[str, Any]]:
    """Per bucket: start time (s), completed and failed ops of all clients, throughput
    (ops/s), and the slowest completion (ms)."""
    out = []
    for b, parts in enumerate(zip(*(r["done"] for r in results))):
        done = sum(parts)
        out.append({"t": round(b * bucket, 6), "ops": done,
                    "failed": sum(r["failed"][b] for r in results),
                    "throughput": round(done / bucket, 1),
                    "slowest_ms": round(max(r["slowest_ns"][b] for r in results) / 1e6, 3)})
    return out


def summarize(points: list[dict[str, Any]], o: FailoverOptions, killed: float) -> dict[str, Any]:
    """Steady throughput before the kill (after the warm-up) and after (the last third of
    what follows the kill), the lowest bucket after the kill, the time with no operation
    completing, and the time from the kill until a bucket reaches ``RECOVERED`` of the
    smaller steady throughput again, after the lowest one."""
    rates = [p["throughput"] for p in points]
    k = min(len(rates), int(killed / o.bucket))         # the bucket of the kill
    w = min(k, int(o.warmup / o.bucket))
    tail = k + 2 * (len(rates) - k) // 3
    before = sum(rates[w:k]) / max(1, k - w)
    after = sum(rates[tail:]) / max(1, len(rates) - tail)
    low = min(range(k, len(rates)), key=rates.__getitem__, default=None)
    back = None
    if low is not None:
        target = RECOVERED * min(before, after)
        back = next((i for i in range(low, len(rates)) if rates[i] >= target), None)
    return {"before_ops_s": round(before, 1), "after_ops_s": round(after, 1),
            "lowest_ops_s": rates[low] if low is not None else None,
            "lowest_at_s": round(low * o.bucket, 3) if low is not None else None,
            "drop": round(1 - rates[low] / before, 3) if low is not None and before else None,
            "stalled_s": round(sum(o.bucket for r in rates[k:] if r == 0), 3),
            "recovered_after_s": round(back * o.bucket - killed, 3) if back is not None
            else None,
            "killed_at_s": round(killed, 3)}


# -- output ----------------------------------------------------------------------------------
def table(doc: dict[str, Any]) -> str:
    o, s, f = doc["options"], doc["summary"], doc["failover"]
    ms = f["milestones_s"]
    lines = [f"failover timeline: YCSB-{o['workload']}, {o['keys']:,} keys, {o['clients']} "
             f"clients x depth {o['depth']}, {o['transport']}, {o['memnodes']} MNs, "
             f"r={o['replicas']}; MN {o['kill_node']} killed at {s['killed_at_s']:.2f} s "
             f"(MN lease {o['mn_lease']:g} s, client lease {o['client_lease']:g} s)"]
    peak = max((p["throughput"] for p in doc["timeline"]), default=0) or 1
    marks = {name: t for name, t in ms.items()}
    for p in doc["timeline"]:
        here = [n for n, t in marks.items() if p["t"] <= t < p["t"] + o["bucket"]]
        bar = "#" * round(40 * p["throughput"] / peak)
        lines.append(f"{p['t']:6.2f} s {p['throughput'] / 1e3:8.2f} Kops/s {bar:<40}"
                     + (f"  <- {', '.join(here)}" if here else ""))

    def kops(x: float | None) -> str:
        return "-" if x is None else f"{x / 1e3:.2f} Kops/s"

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    def since(name: str) -> str:
        return secs(ms[name] - ms["killed"] if name in ms else None)

    lines += [
        f"steady before: {kops(s['before_ops_s'])}, after: {kops(s['after_ops_s'])}",
        f"lowest after the kill: {kops(s['lowest_ops_s'])} at {secs(s['lowest_at_s'])} "
        f"(a drop of {(s['drop'] or 0) * 100:.0f}%); no operation completed for "
        f"{s['stalled_s']:.2f} s",
        f"back to {RECOVERED:.0%} of steady {secs(s['recovered_after_s'])} after the kill",
        f"master: declared dead {since('declared_dead')}, all clients paused "
        f"{since('paused')}, epoch published {since('published')} after the kill"
        f" (failover itself {f['failover_s'] * 1e3:.1f} ms, "
        f"{f['settled']} slots settled, attempt {f['attempts']})"]
    if doc["errors"]:
        lines.append(f"failed operations: {doc['errors']}")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> Path:
    o, ms = doc["options"], doc["failover"]["milestones_s"]
    fig, ax = report.subplots(figsize=(8, 3.2))
    ax.step([p["t"] for p in doc["timeline"]],
            [p["throughput"] / 1e3 for p in doc["timeline"]], where="post", label="throughput")
    styles = {"killed": ("red", "MN killed"), "declared_dead": ("orange", "declared dead"),
              "published": ("green", "new epoch")}
    for name, (color, label) in styles.items():
        if name in ms:
            ax.axvline(ms[name], color=color, linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Kops/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"YCSB-{o['workload']}, {o['clients']} clients, {o['transport']}, "
                 f"r={o['replicas']}: MN {o['kill_node']} killed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return report.save(fig, path)


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "failover.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "failover.txt").write_text(f"$ {doc['command']}\n\n{table(doc)}")
    return [out / "failover.json", out / "failover.txt", plot(doc, out / "failover.png")]


# -- command line ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusee bench failover",
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    d = FailoverOptions()
    p.add_argument("--out", default="fusee-bench-results",
                   help="output folder (default: ./fusee-bench-results)")
    p.add_argument("--transport", choices=["shm", "zmq"], help=f"default: {d.transport}")
    p.add_argument("--endpoint", choices=["ipc", "tcp"], help="zmq endpoints (default: ipc)")
    for f in dataclasses.fields(FailoverOptions):
        if f.name in ("transport", "endpoint"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                       help=f"default: {f.default}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FailoverOptions)
              if getattr(args, f.name) is not None}
    try:
        o = FailoverOptions(**values)
        o.check()
    except ValueError as e:
        print(f"fusee bench failover: error: {e}", file=sys.stderr)
        return 2
    try:
        doc = run_failover(o, "fusee bench failover " + shlex.join(argv))
    except BenchError as e:
        print(f"fusee bench failover: FAILED: {e}", file=sys.stderr)
        return 1
    files = write_all(doc, Path(args.out))
    print(table(doc), end="")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
