"""`fusee bench [ycsb|micro|all]`: how fast is fusee, next to what people use today.

It starts a local cluster (default: 3 memory nodes, r = 3, the shm backend), loads the keys,
runs YCSB A-D as the paper defines them and the INSERT / UPDATE / SEARCH / DELETE
micro-benchmarks with 1..N client processes, then does the same, on the same machine with the
same keys and sizes, for the Clover-style semi-disaggregated baseline and for Redis through
redis-py. It prints a summary table with fusee's ratio to each baseline and writes
results.json, table.txt and two plots. ``--suite FILE`` runs every [[run]] of a TOML file
(benchmarks/reference.toml holds the reference runs of this repository).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

from fusee.bench import report
from fusee.bench.runner import (MAX_CLIENTS, MAX_KEYS_PER_CLIENT, BenchError, Phase,
                                WorkerPool)
from fusee.bench.systems import SYSTEMS, SystemSpec, cluster_layout, serve
from fusee.bench.ycsb import KEY_LENGTH, WORKLOADS, StoreShape, Workload

MICRO_OPS = ("insert", "update", "search", "delete")
#: the floor a zmq run measures after each SEARCH micro-benchmark of one client: a raw pyzmq
#: request/reply of a one-verb batch's size to an echo process, over the same endpoint kind
#: and security (``fusee.bench.verbs.PingPong``), from a benchmark client process
FLOOR = "pingpong"


@dataclass
class BenchOptions(StoreShape):
    suite: str = "all"                      # ycsb | micro | all
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    transport: str = "shm"
    endpoint: str = "ipc"
    memnodes: int = 3
    replication: int = 0                    # 0: min(3, memnodes)
    keys: int = 100_000
    object_size: int = 1024                 # key + value bytes
    distribution: str = "zipfian"           # request distribution of A-C (D reads latest)
    theta: float = 0.99
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    custom_workloads: dict[str, Any] = field(default_factory=dict)    # name -> Workload fields
    micro_ops: list[str] = field(default_factory=lambda: list(MICRO_OPS))
    micro_keys: int = 10_000                # per client, as in the paper
    clients: list[int] = field(default_factory=lambda: [1, 2, 4])
    depth: int = 1
    repeat: int = 3                         # runs per point: the table gives their median
    duration: float = 2.0                   # measured seconds per YCSB point
    warmup: float = 0.5
    load_clients: int = 2
    seed: int = 1
    timeout: float = 5.0

    def workload(self, name: str) -> Workload:
        if name in self.custom_workloads:
            return Workload(name, **self.custom_workloads[name])
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; known: "
                             f"{', '.join([*WORKLOADS, *self.custom_workloads])}")
        w = WORKLOADS[name]
        if w.distribution == "zipfian":
            w = dataclasses.replace(w, distribution=self.distribution)
        return w

    def check(self) -> None:
        if self.suite not in ("ycsb", "micro", "all"):
            raise ValueError("suite must be ycsb, micro or all")
        for s in self.systems:
            if s not in SYSTEMS:
                raise ValueError(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
        if "fusee" not in self.systems:
            raise ValueError("the systems must include fusee (the ratios are fusee's)")
        if self.object_size <= KEY_LENGTH:
            raise ValueError(f"object size must exceed the {KEY_LENGTH}-byte key")
        if not self.clients or min(self.clients) < 1 or max(self.clients) > MAX_CLIENTS:
            raise ValueError(f"client counts must be 1..{MAX_CLIENTS}")
        if not 1 <= self.load_clients <= MAX_CLIENTS:
            raise ValueError(f"load clients must be 1..{MAX_CLIENTS}")
        if self.keys < 2 or self.depth < 1 or self.duration <= 0 or self.warmup < 0:
            raise ValueError("need keys >= 2, depth >= 1, duration > 0, warmup >= 0")
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1 (runs per point)")
        if not 1 <= self.micro_keys <= MAX_KEYS_PER_CLIENT:
            raise ValueError(f"micro keys per client must be 1..{MAX_KEYS_PER_CLIENT}")
        if not 0 < self.theta < 1:
            raise ValueError("theta must be in (0, 1)")
        for op in self.micro_ops:
            if op not in MICRO_OPS:
                raise ValueError(f"unknown micro-benchmark {op!r}")
        for name in self.workloads:
            self.workload(name)


def build_plan(o: BenchOptions) -> list[Phase]:
    """The phases every system runs, in order; keyspaces are shared across systems so each
    system sees exactly the same keys. Each point runs ``o.repeat`` times in a row, each run
    on keys of its own (a micro point: its four steps again)."""
    common: dict[str, Any] = dict(depth=o.depth, value_size=o.value_size, seed=o.seed)
    plan = [Phase("load", "load", clients=o.load_clients, keyspace=0, keys=o.keys, **common)]
    keyspace = 1
    if o.suite in ("ycsb", "all"):
        for name in o.workloads:
            for n in o.clients:
                for run in range(o.repeat):
                    plan.append(Phase("ycsb", name, clients=n, keyspace=keyspace, keys=o.keys,
                                      workload=o.workload(name), theta=o.theta,
                                      warmup=o.warmup, duration=o.duration, repeat=run,
                                      **common))
                    keyspace += 1
    if o.suite in ("micro", "all") and o.micro_ops:
        for n in o.clients:
            # every client count inserts fresh keys, then updates, searches and deletes them;
            # steps not asked for still run (unrecorded) so the others find their keys
            for run in range(o.repeat):
                for op in MICRO_OPS:
                    plan.append(Phase("micro", op, clients=n, keyspace=keyspace,
                                      count=o.micro_keys, record=op in o.micro_ops,
                                      repeat=run, **common))
                    if op == "search" and n == 1 and o.transport == "zmq" and op in o.micro_ops:
                        # the floor of a SEARCH on zmq, next to it in the same run
                        plan.append(Phase("floor", FLOOR, clients=1, keyspace=keyspace,
                                          count=o.micro_keys, record=False, repeat=run,
                                          **common))
                keyspace += 1
    return plan


def _phase_timeout(p: Phase, o: BenchOptions) -> float:
    if p.suite == "ycsb":
        return p.warmup + p.duration + 60 + 4 * o.timeout
    keys = p.count if p.suite == "micro" else -(-p.keys // p.clients)
    return 120 + keys * 0.01


def fast_path_build() -> str:
    """How the client's operations run: "compiled" (a wheel, built with mypyc: setup.py) or
    "Python" (source: an editable install, a checkout). Their CPU per operation differs by a
    quarter to a third, so a figure means little without it."""
    import fusee.operations
    compiled = fusee.operations.__file__.endswith(tuple(EXTENSION_SUFFIXES))
    return "compiled" if compiled else "Python"


def _machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "fast_path": fast_path_build()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["fusee_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _run_system(pool: WorkerPool, spec: SystemSpec, system: str, plan: list[Phase],
                o: BenchOptions, doc: dict[str, Any], bar: Any) -> None:
    pool.connect(spec)
    #: a point -> the raw results of each of its runs
    runs: dict[tuple[str, str, int], list[list[dict[str, Any]]]] = {}
    floors: list[dict[str, Any]] = []
    for p in plan:
        if p.suite == "floor" and system != "fusee":
            continue                    # the transport's floor: measured once, with fusee
        bar.set_description(f"{system}: {p.label()}")
        raws = pool.run_phase(p, _phase_timeout(p, o))
        if p.suite == "floor":
            floors += raws
            doc["floors"][p.name] = report.floor(floors, p.name)
        elif p.suite == "load":
            row = report.aggregate(system, p, raws)
            doc["load"].append({"system": system, "keys": p.keys, "seconds": row["seconds"],
                                "throughput": row["throughput"],
                                "cpu_us_per_op": row["per_op"].get("cpu_us")})
        elif p.record:
            point = runs.setdefault((p.suite, p.name, p.clients), [])
            point.append(raws)
            if len(point) == o.repeat:
                doc["results"].append(report.combine(system, p, point))
                del runs[(p.suite, p.name, p.clients)]
        else:
            continue
        bar.update(1)
    pool.disconnect()


def run_bench(o: BenchOptions, command: str = "", progress: bool | None = None) -> dict[str, Any]:
    """Run every system through the plan; returns the result document."""
    from tqdm import tqdm
    o.check()
    plan = build_plan(o)
    keys = o.keys + o.micro_keys * max(o.clients)
    layout = cluster_layout(keys, o.object_size)
    doc: dict[str, Any] = {"fusee_bench": 1, "command": command,
           "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": _machine(),
           "options": {**dataclasses.asdict(o), "replicas": o.replicas},
           "systems": [], "skipped": {}, "failed": {}, "load": [], "results": [],
           "floors": {}}
    reported = [p for p in plan if p.record]
    bar = tqdm(total=len(o.systems) * len(reported), unit="phase", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    n_clients = max(max(o.clients), o.load_clients)
    pool = WorkerPool(n_clients)
    try:
        for system in o.systems:
            with contextlib.ExitStack() as running:
                bar.set_description(f"{system}: starting")
                try:
                    spec = running.enter_context(serve(
                        system, memnodes=o.memnodes, transport=o.transport,
                        endpoint=o.endpoint, replication=o.replication, layout=layout,
                        timeout=o.timeout))
                    spec = dataclasses.replace(spec, cache_capacity=keys)
                except Exception as e:              # e.g. no redis-server on this machine
                    verdict = "failed" if system == "fusee" else "skipped"
                    doc[verdict][system] = str(e)   # the table says so, once
                    bar.update(len(reported))
                    continue
                doc["systems"].append(system)
                try:
                    _run_system(pool, spec, system, plan, o, doc, bar)
                except BenchError as e:
                    doc["failed"][system] = str(e)
                    print(f"\n{system}: FAILED: {e}", file=sys.stderr)
                    pool.close()                    # clients may be stuck: start afresh
                    pool = WorkerPool(n_clients)
    finally:
        pool.close()
    bar.close()
    doc["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return doc


# -- command line ----------------------------------------------------------------------------
def _csv(kind: Callable[[str], object] = str) -> Callable[[str], list[object]]:
    return lambda s: [kind(x) for x in s.split(",") if x]


QUICK = dict(keys=10_000, micro_keys=1_000, duration=0.5, warmup=0.2, clients=[1, 2],
             repeat=1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusee bench", description=__doc__.split("\n\n")[0],
                                epilog="fusee bench verbs: the raw verbs benchmark "
                                       "(see fusee bench verbs --help); fusee bench failover: "
                                       "throughput over time across a memory-node crash "
                                       "(see fusee bench failover --help); fusee bench "
                                       "model: the paper's testbed or your cluster in "
                                       "simulated time (see fusee bench model --help)")
    p.add_argument("suite", nargs="?", default=None, choices=["ycsb", "micro", "all"],
                   help="what to run (default: all)")
    p.add_argument("--suite", dest="suite_file", metavar="TOML",
                   help="run every [[run]] of this file (e.g. benchmarks/reference.toml)")
    p.add_argument("--out", help="output folder (default: ./fusee-bench-results; with --suite:"
                                 " the file's out, one subfolder per run)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 10,000 keys, 1,000 micro keys, 0.5 s points, 1-2 "
                        "clients, each point run once")
    d = BenchOptions()
    p.add_argument("--systems", type=_csv(), help=f"default: {','.join(d.systems)}")
    p.add_argument("--no-baselines", action="store_true", help="fusee only")
    p.add_argument("--transport", choices=["shm", "zmq", "verbs"], help="default: shm")
    p.add_argument("--endpoint", choices=["ipc", "tcp"], help="zmq endpoints (default: ipc)")
    p.add_argument("--memnodes", type=int, help="default: 3")
    p.add_argument("--replication", type=int, help="r (default: min(3, memnodes))")
    p.add_argument("--keys", type=int, help="YCSB keys loaded (default: 100000)")
    p.add_argument("--object-size", type=int, help="key + value bytes (default: 1024)")
    p.add_argument("--distribution", choices=["zipfian", "uniform"],
                   help="requests of A-C (default: zipfian; D always reads latest)")
    p.add_argument("--theta", type=float, help="Zipfian constant (default: 0.99)")
    p.add_argument("--workloads", type=_csv(), help="default: A,B,C,D")
    p.add_argument("--micro-ops", type=_csv(), help="default: insert,update,search,delete")
    p.add_argument("--micro-keys", type=int, help="keys per client (default: 10000)")
    p.add_argument("--clients", type=_csv(int), help="client processes per point (default: 1,2,4)")
    p.add_argument("--depth", type=int, help="operations in flight per client (default: 1)")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="runs per point; the table and plots give their median and spread "
                        "(default: 3; 1 with --quick)")
    p.add_argument("--duration", type=float, help="measured seconds per YCSB point (default: 2)")
    p.add_argument("--warmup", type=float, help="seconds before measuring (default: 0.5)")
    p.add_argument("--load-clients", type=int, help="processes loading keys (default: 2)")
    p.add_argument("--seed", type=int, help="default: 1")
    p.add_argument("--timeout", type=float, help="network wait bound, seconds (default: 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def options(args: argparse.Namespace, base: dict[str, Any] | None = None) -> BenchOptions:
    """Defaults, then ``base`` (a suite's settings), then --quick, then explicit flags."""
    values = dict(base or {})
    if args.quick:
        values.update(QUICK)
    for f in dataclasses.fields(BenchOptions):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "suite":
            values[f.name] = v
    if args.suite:
        values["suite"] = args.suite
    if args.no_baselines:
        values["systems"] = ["fusee"]
    if "workload" in values:                     # a suite's [workload.NAME] tables
        values["custom_workloads"] = values.pop("workload")
    unknown = set(values) - {f.name for f in dataclasses.fields(BenchOptions)}
    if unknown:
        raise ValueError(f"unknown bench settings: {', '.join(sorted(unknown))}")
    return BenchOptions(**values)


def equivalent_command(o: BenchOptions) -> str | None:
    """The plain `fusee bench` command line with these options (None: custom workloads)."""
    if o.custom_workloads:
        return None
    d, words = BenchOptions(), ["fusee", "bench"]
    if o.suite != d.suite:
        words.append(o.suite)
    for f in dataclasses.fields(BenchOptions):
        v = getattr(o, f.name)
        if f.name in ("suite", "custom_workloads") or v == getattr(d, f.name):
            continue
        words += ["--" + f.name.replace("_", "-"),
                  ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return shlex.join(words)


def _finish(doc: dict[str, Any], out: Path) -> int:
    files = report.write_all(doc, out)
    print(report.table(doc))
    print("wrote " + ", ".join(str(f) for f in files))
    return 1 if doc["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "model":             # the timing model: fusee bench model --help
        from fusee.bench.model import main as model_main
        return model_main(argv[1:])
    args = parser().parse_args(argv)
    progress = False if args.no_progress else None
    command = "fusee bench " + shlex.join(argv)
    try:
        if args.suite_file:
            return _run_suite(args, Path(args.suite_file), command, progress)
        o = options(args)
        o.check()
    except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
        print(f"fusee bench: error: {e}", file=sys.stderr)
        return 2
    doc = run_bench(o, command, progress)
    return _finish(doc, Path(args.out or "fusee-bench-results"))


def _run_suite(args: argparse.Namespace, path: Path, command: str, progress: bool | None
               ) -> int:
    """Every [[run]] of a suite file: [defaults] merged under each run's own settings."""
    spec = tomllib.loads(path.read_text())
    runs = spec.get("run", [])
    if not runs:
        raise ValueError(f"{path}: no [[run]] tables")
    out = Path(args.out or (path.parent / spec.get("out", "results")))
    plans = []
    for r in runs:
        r = dict(r)
        name = r.pop("name", None)
        if not name:
            raise ValueError(f"{path}: every [[run]] needs a name")
        settings = {**spec.get("defaults", {}), **r}
        if "workload" in spec:
            settings["workload"] = spec["workload"]
        o = options(args, settings)
        o.check()
        plans.append((name, o))
    status = 0
    for name, o in plans:
        print(f"== {name}: {equivalent_command(o) or command}", file=sys.stderr)
        doc = run_bench(o, command, progress)
        doc["run"] = name
        doc["equivalent_command"] = equivalent_command(o)
        status |= _finish(doc, out / name)
    return status
