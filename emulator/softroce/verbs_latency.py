"""Batch latencies of the verbs backend next to the emulated NIC, on the same memory nodes.

    python -m fusee.emulator.softroce.vm -- \
        python -m fusee.emulator.softroce.verbs_latency [--json out]

Starts 3 memory nodes serving RDMA (``--rdma``), connects a ``verbs`` and a ``zmq`` transport
to the same nodes, and times one-verb batches (READ/WRITE 64 B, READ 4 KiB, CAS, FAA) and a
batch of one READ on each of the 3 MNs: p50 / p99 in microseconds and batches per second.
``measure`` is the reusable part (any transport, any batch).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import struct
import sys
import time
from typing import Any

from fusee.emulator.cluster import LocalCluster
from fusee.config import LayoutConfig
from fusee.memory_map import MemoryMap
from fusee.verbs import Cas, Faa, Read, Write

MiB = 1 << 20
LAYOUT = LayoutConfig(region_size=32 * MiB, block_size=1 * MiB, max_clients=64,
                      index_size=8 * MiB)


def batches(data: int) -> dict[str, list]:
    """Name -> batch; ``data`` is a scratch address in every MN's region."""
    w = data + 4096
    return {
        "read 64B": [Read(0, data, 64)],
        "write 64B": [Write(0, data, b"w" * 64)],
        "read 4KiB": [Read(0, data, 4096)],
        "cas": [Cas(0, w, 0, 0)],
        "faa": [Faa(0, w + 8, 1)],
        "3-MN batch": [Read(n, data, 64) for n in range(3)],
    }


def measure(transport, batch: list, iterations: int, warmup: int = 20) -> dict:
    """p50 / p99 / mean latency (us) and batches per second of ``batch`` on ``transport``."""
    for _ in range(warmup):
        transport.execute(batch)
    lat = []
    clock = time.perf_counter
    start = clock()
    for _ in range(iterations):
        t0 = clock()
        transport.execute(batch)
        lat.append(clock() - t0)
    total = clock() - start
    lat.sort()
    return {"p50_us": round(lat[len(lat) // 2] * 1e6, 1),
            "p99_us": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6, 1),
            "mean_us": round(statistics.fmean(lat) * 1e6, 1),
            "batches_per_s": round(iterations / total, 1), "iterations": iterations}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusee.emulator.softroce.verbs_latency",
                                description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"host": platform.node(), "kernel": platform.release(),
                               "results": {}}
    with LocalCluster(memnodes=3, transport="verbs", layout=LAYOUT, start_timeout=180) as c:
        data = MemoryMap.of(LAYOUT).data
        for backend in ("verbs", "zmq"):
            t = c.transport(backend)
            t.execute([Write(n, data + 4096, struct.pack("<QQ", 0, 0)) for n in range(3)])
            results["results"][backend] = {name: measure(t, b, args.iterations)
                                           for name, b in batches(data).items()}
            t.close()
    print(f"{'batch':<12} " + "  ".join(f"{b + ' p50/p99 us':>24} {'/s':>7}"
                                          for b in results["results"]))
    for name in batches(0):
        row = "  ".join(f"{r[name]['p50_us']:>11.1f} / {r[name]['p99_us']:>10.1f} "
                        f"{r[name]['batches_per_s']:>7.0f}" for r in results["results"].values())
        print(f"{name:<12} {row}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
