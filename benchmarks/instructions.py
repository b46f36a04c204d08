"""Client instructions per operation, counted by callgrind: a figure a shared machine cannot
blur (issue 12), unlike any clock.

    python3 benchmarks/instructions.py search --transport shm --depth 8

starts a local cluster (3 MNs, r = 3, 1 KB objects), stores the keys (a warm index cache),
then runs COUNT operations of one kind at ``--depth`` in flight (``fusee.driver.run`` at depth
1, ``run_concurrently`` beyond), and prints the client's instructions per operation: only the
client process runs under valgrind, and only the measured loop is counted (it runs inside
``functools.reduce``, the C function callgrind is told to collect in). The memory nodes run
outside valgrind; on zmq their work is not counted, only the client's side of each message.

Which build runs is whatever ``import fusee`` finds: the source, or modules compiled in place
(``python3 setup.py build_ext --inplace``; ``FUSEE_PURE_PYTHON=1`` has no effect on an
existing build). The line printed says which.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile

KINDS = ("insert", "update", "search", "delete")
#: set in the process valgrind runs: it measures instead of starting valgrind
CHILD = "FUSEE_INSTRUCTIONS_CHILD"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--transport", choices=["local", "shm", "zmq"], default="shm")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--count", type=int, default=200, help="operations measured (default 200)")
    p.add_argument("--via", choices=["core", "client"], default="core",
                   help="core: the operation generators, driven by fusee.driver (default); "
                        "client: the public API (kv.get, kv.get_many at --depth; search only)")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> None:
    """The child: run the workload, the measured loop inside functools.reduce."""
    if args.transport == "shm":
        # valgrind does not know pidfd_open(2): the shm transport watches each MN's death
        # through a pidfd; a pipe that never polls readable stands in (no MN dies here)
        keep = []

        def pipe_for_pidfd(pid: int, flags: int = 0) -> int:
            r, w = os.pipe()
            keep.append(w)
            return r
        os.pidfd_open = pipe_for_pidfd
    from fusee.driver import run, run_concurrently
    from fusee.emulator.cluster import LocalCluster

    value = bytes(range(256)) * 4
    value = value[:1000]
    with LocalCluster(memnodes=3, transport=args.transport, replication=3) as cluster:
        with cluster.client() as kv:
            for i in range(100):            # the first block groups
                kv.insert(b"warm-%d" % i, value)
            core, executor = kv.core, kv.executor
            keys = [b"k-%d" % i for i in range(args.count)]
            if args.kind != "insert":
                kv.put_many([(k, value) for k in keys])
                kv.get_many(keys)           # the index cache knows every key
            if args.via == "client":
                if args.kind != "search":
                    raise SystemExit("--via client measures search only")
                get, get_many = kv.get, kv.get_many
                if args.depth == 1:
                    functools.reduce(lambda _, k: get(k), keys, None)
                else:
                    functools.reduce(lambda _, go: go(), [lambda: get_many(keys, args.depth)],
                                     None)
                return
            make = {"insert": lambda k: core.insert(k, value),
                    "update": lambda k: core.update(k, value),
                    "search": core.search, "delete": core.delete}[args.kind]
            ops = [make(k) for k in keys]
            if args.depth == 1:
                functools.reduce(lambda _, op: run(op, executor), ops, None)
            else:
                functools.reduce(lambda _, go: go(), [lambda: run_concurrently(
                    iter(ops), executor, args.depth, lambda i, r: None)], None)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if os.environ.get(CHILD):
        measure(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             "--toggle-collect=functools_reduce", f"--callgrind-out-file={tmp}/callgrind.out",
             sys.executable, __file__, *argv],
            env={**os.environ, CHILD: "1"}, capture_output=True, text=True)
    collected = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not collected:
        print(done.stderr[-2000:], file=sys.stderr)
        return 1
    import fusee.search
    build = "compiled" if fusee.search.__file__.endswith(".so") else "source"
    per_op = int(collected.group(1)) // args.count
    via = " via the client" if args.via == "client" else ""
    print(f"{args.kind} {args.transport} depth {args.depth}{via}: {per_op:,} instructions per "
          f"operation ({build})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
