"""`fusee`: the command line for a person at a terminal.

Each subcommand imports its machinery only when it runs, so `fusee --help` works on a laptop
without RDMA libraries and a memory node does not load the benchmark stack.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def _cluster(args) -> int:
    from emulator.cluster import LocalCluster
    with LocalCluster(memnodes=args.memnodes, transport=args.transport,
                      endpoint=args.endpoint) as c:
        print(f"local cluster of {args.memnodes} memory nodes ({args.transport}, "
              f"{args.endpoint}) is up.\nconfig: {c.config_path}\n"
              f"try:   fusee put --config {c.config_path} hello world\n"
              "Ctrl-C stops it.", flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0


def _memnode(argv) -> int:
    from emulator.memnode import main
    return main(argv)


def _bench(argv) -> int:
    if argv and argv[0] == "verbs":
        from fusee.bench.verbs import main
        return main(argv[1:])
    print("usage: fusee bench verbs [options]   (see fusee bench verbs --help)", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough = {"memnode": _memnode, "bench": _bench}
    if argv and argv[0] in passthrough:
        return passthrough[argv[0]](argv[1:]) or 0

    p = argparse.ArgumentParser(prog="fusee", description="A fully memory-disaggregated "
                                "key-value store (after FUSEE, FAST '23).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("memnode", help="run one memory node (see fusee memnode --help)")
    sub.add_parser("bench", help="benchmarks (see fusee bench verbs --help)")
    c = sub.add_parser("cluster", help="start a local cluster and keep it up until Ctrl-C")
    c.add_argument("--memnodes", type=int, default=3)
    c.add_argument("--transport", default="zmq", choices=["shm", "zmq"])
    c.add_argument("--endpoint", default="ipc", choices=["ipc", "tcp"])
    c.set_defaults(func=_cluster)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
