"""Issue 12's targets next to the figures that `fusee bench` runs measured.

    python3 -m fusee.bench.targets RESULTS [RESULTS ...]

Each RESULTS is a `fusee bench --out` folder (or its ``results.json``). For every figure in
them that a target is about, one line: the figure, the target, and whether it is met. A target
holds under stated conditions (shm, 3 memory nodes, r = 3, 1 KB objects, one client process):
a figure measured under others is not judged, so a run cannot pass by changing them. The depth
targets compare two runs of the same workload, at depth 1 and at depth 8, of one build. Each
line names the build that ran (machine.fast_path: "compiled", as ``pip install fusee`` builds
it, or "Python", the sources), since the client's CPU per operation differs between them.
``benchmarks/issue12.sh`` runs each measurement in one line.

Exit status: 0 when every judged figure meets its target, 1 when one misses, 2 when nothing
could be judged or a RESULTS is unreadable.
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the micro-benchmarks' p50 latency targets, in microseconds
P50_US = {"search": 5.0, "update": 12.0, "delete": 12.0, "insert": 15.0}
LOAD_OPS = 60_000               # the load phase, per client process
YCSB_C_DEPTH8_OPS = 150_000     # YCSB-C at depth 8 from one client process, shm
#: throughput at depth 8 over depth 1, per transport
DEPTH_GAIN = {"zmq": 4.0, "shm": 1.0}
#: zmq (ipc): a SEARCH of one round trip (a cache hit), p50, over the raw pyzmq ping-pong's
#: p50 measured in the same run (``fusee.bench.main.FLOOR``)
ZMQ_SEARCH_OVER_PINGPONG = 1.5


@dataclass(frozen=True)
class Verdict:
    what: str
    figure: str
    target: str
    met: bool

    def line(self) -> str:
        outcome = "met" if self.met else "MISSED"
        return f"{self.what}: {self.figure}  (target {self.target})  {outcome}"


def _conditions(options: dict[str, Any], transport: str = "shm") -> bool:
    """The conditions every target is stated under (one client process is checked per row)."""
    return (options.get("transport") == transport and options.get("memnodes") == 3
            and options.get("replicas") == 3 and options.get("object_size") == 1024)


def _judge(what: str, value: float, unit: str, limit: float,
           meets: Callable[[float, float], bool], sign: str) -> Verdict:
    return Verdict(what, f"{value:.1f} {unit}", f"{sign} {limit:g} {unit}", meets(value, limit))


def _build(doc: dict[str, Any]) -> str:
    """The fast path's build a run measured (older results do not say)."""
    build: str = doc.get("machine", {}).get("fast_path", "build unknown")
    return build


def judge_run(doc: dict[str, Any]) -> list[Verdict]:
    """The verdicts one run's results can give on their own (latency, load, YCSB-C depth 8)."""
    o = doc["options"]
    if _conditions(o, "zmq") and o.get("endpoint", "ipc") == "ipc":
        return _judge_zmq(doc)
    if not _conditions(o):
        return []
    build = _build(doc)
    out = []
    for row in doc["results"]:
        if row["system"] != "fusee" or row["clients"] != 1:
            continue
        if row["suite"] == "micro" and row["depth"] == 1 and row["name"] in P50_US:
            p50 = row["latency_us"].get(row["name"], {}).get("p50_us")
            if p50 is not None:
                out.append(_judge(f"{row['name'].upper()} p50, shm, 1 client, {build}", p50, "us",
                                  P50_US[row["name"]], operator.le, "<="))
        if row["suite"] == "ycsb" and row["name"] == "C" and row["depth"] == 8:
            out.append(_judge(f"YCSB-C throughput, shm, 1 client, depth 8, {build}",
                              row["throughput"] / 1e3, "Kops/s", YCSB_C_DEPTH8_OPS / 1e3,
                              operator.ge, ">="))
    if o.get("load_clients") == 1:
        for load in doc["load"]:
            if load["system"] == "fusee":
                out.append(_judge(f"load phase, shm, 1 client process, {build}",
                                  load["throughput"] / 1e3,
                                  "Kops/s", LOAD_OPS / 1e3, operator.ge, ">="))
    return out


def _judge_zmq(doc: dict[str, Any]) -> list[Verdict]:
    """The zmq (ipc) run's verdict: its SEARCH p50 of one client against the ping-pong floor
    it measured (a run without the floor, e.g. of an older fusee, is not judged)."""
    pingpong = doc.get("floors", {}).get("pingpong", {}).get("latency_us", {}).get("p50_us")
    if not pingpong:
        return []
    for row in doc["results"]:
        if (row["system"] == "fusee" and row["clients"] == 1 and row["suite"] == "micro"
                and row["depth"] == 1 and row["name"] == "search"):
            p50 = row["latency_us"].get("search", {}).get("p50_us")
            if p50 is not None:
                return [_judge(f"SEARCH p50 / raw pyzmq ping-pong p50 ({p50:.1f} / "
                               f"{pingpong:.1f} us), zmq ipc, 1 client, {_build(doc)}",
                               p50 / pingpong, "x", ZMQ_SEARCH_OVER_PINGPONG, operator.le,
                               "<=")]
    return []


def judge_depth(docs: Sequence[dict[str, Any]]) -> list[Verdict]:
    """Depth 8 against depth 1: the YCSB rows of one client that two runs under the same
    conditions, of one build, measured at those depths, per transport and workload."""
    by: dict[tuple[str, str, str, int], float] = {}
    for doc in docs:
        transport = doc["options"].get("transport", "")
        if transport not in DEPTH_GAIN or not _conditions(doc["options"], transport):
            continue
        for row in doc["results"]:
            if (row["system"] == "fusee" and row["suite"] == "ycsb" and row["clients"] == 1
                    and row["depth"] in (1, 8)):
                by[(transport, _build(doc), row["name"], row["depth"])] = row["throughput"]
    out = []
    for (transport, build, name, depth), deep in sorted(by.items()):
        shallow = by.get((transport, build, name, 1))
        if depth != 8 or not shallow:
            continue
        out.append(_judge(f"YCSB-{name} depth 8 / depth 1, {transport}, 1 client, {build}",
                          deep / shallow, "x", DEPTH_GAIN[transport], operator.ge, ">="))
    return out


def load(path: Path) -> dict[str, Any]:
    """A run's results: ``path`` is its folder or its results.json."""
    file = path / "results.json" if path.is_dir() else path
    doc: dict[str, Any] = json.loads(file.read_text())
    if "options" not in doc or "results" not in doc:
        raise ValueError(f"{file} is not the results.json of a `fusee bench` run")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m fusee.bench.targets",
                                description=(__doc__ or "").splitlines()[0])
    p.add_argument("results", nargs="+", type=Path,
                   help="`fusee bench --out` folders (or their results.json)")
    args = p.parse_args(argv)
    try:
        docs = [load(path) for path in args.results]
    except (OSError, ValueError) as e:       # (json's decode error is a ValueError)
        print(f"fusee.bench.targets: cannot read the results: {e}", file=sys.stderr)
        return 2
    verdicts = [v for doc in docs for v in judge_run(doc)] + judge_depth(docs)
    for v in verdicts:
        print(v.line())
    if not verdicts:
        print("fusee.bench.targets: no figure in these results is one a target is about "
              "(see benchmarks/issue12.sh for the runs that measure them)", file=sys.stderr)
        return 2
    return 0 if all(v.met for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
