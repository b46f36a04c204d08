"""`fusee`: the command line for a person at a terminal.

Each subcommand imports its machinery only when it runs, so `fusee --help` works on a laptop
without RDMA libraries and a memory node does not load the benchmark stack.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import fusee
from fusee.config import ConfigError


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


def _master(argv) -> int:
    from emulator.master_server import main
    return main(argv)


def _bench(argv) -> int:
    if argv and argv[0] == "verbs":
        from fusee.bench.verbs import main
        return main(argv[1:])
    if argv and argv[0] == "failover":
        from fusee.bench.failover import main
        return main(argv[1:])
    from fusee.bench.main import main
    return main(argv)


def _rdma(argv) -> int:
    if argv and argv[0] == "preflight":
        from emulator.rdma_preflight import main
        return main(argv[1:])
    print("usage: fusee rdma preflight [--config CLUSTER.toml] [options]", file=sys.stderr)
    return 2


def _kv(args) -> int:
    from fusee.client import Client
    from fusee.errors import KeyExists, KeyNotFound
    key = args.key.encode()
    with Client.connect(args.config, transport=args.transport) as kv:
        try:
            if args.cmd == "get":
                value = kv.get(key)
                if value is None:
                    print(f"{args.key}: not found", file=sys.stderr)
                    return 1
                sys.stdout.buffer.write(value + b"\n")
            else:
                op = getattr(kv, args.cmd)
                op(key) if args.cmd == "delete" else op(key, args.value.encode())
        except (KeyExists, KeyNotFound) as e:
            print(f"fusee {args.cmd}: {e}", file=sys.stderr)
            return 1
    return 0


def _keys(args) -> int:
    from transports.security import add_client, init_keys, init_server_key
    if args.action == "init-master":
        public = init_server_key(args.dir, "master")
        print(f'# the master\'s keypair is in {args.dir}. In the cluster config, [cluster]:')
        print(f'master_curve_public = "{public}"')
        return 0
    if args.action == "init":
        publics = init_keys(args.dir, args.memnodes, args.client)
        print(f"# keys written to {args.dir} (secrets are owner-only). In the cluster config:")
        print(f'[security]\ncurve = true\nkeys_dir = "{args.dir}"')
        for i, pub in publics.items():
            print(f'# memnode {i}: curve_public = "{pub}"')
        for name in args.client:
            print(f"# client {name}: FUSEE_CLIENT_KEY={args.dir}/{name}.key_secret")
    else:
        for name in args.client:
            path = add_client(args.dir, name)
            print(f"client {name} authorized; give it FUSEE_CLIENT_KEY={path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough = {"memnode": _memnode, "master": _master, "bench": _bench, "rdma": _rdma}
    if argv and argv[0] in passthrough:
        return passthrough[argv[0]](argv[1:]) or 0

    p = argparse.ArgumentParser(prog="fusee", description="A fully memory-disaggregated "
                                "key-value store (after FUSEE, FAST '23).")
    p.add_argument("--version", action="version", version=f"fusee {fusee.__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("memnode", help="run one memory node (see fusee memnode --help)")
    sub.add_parser("master", help="run the master: MN membership, client leases, recovery "
                   "(see fusee master --help)")
    sub.add_parser("rdma", help="RDMA host checks: fusee rdma preflight [--config C]")
    sub.add_parser("bench", help="YCSB and micro-benchmarks against Clover-style and Redis "
                   "baselines (fusee bench --help); raw verbs: fusee bench verbs --help; "
                   "throughput across an MN crash: fusee bench failover --help")
    c = sub.add_parser("cluster", help="start a local cluster and keep it up until Ctrl-C")
    c.add_argument("--memnodes", type=int, default=3)
    c.add_argument("--transport", default="zmq", choices=["shm", "zmq"])
    c.add_argument("--endpoint", default="ipc", choices=["ipc", "tcp"])
    c.set_defaults(func=_cluster)
    for name, text in (("get", "print a key's value"), ("put", "insert or update a key"),
                       ("insert", "add a new key"), ("update", "replace a present key's value"),
                       ("delete", "remove a key")):
        kv = sub.add_parser(name, help=text)
        kv.add_argument("--config", required=True, help="cluster config (TOML)")
        kv.add_argument("--transport", help="backend (default: the config's)")
        kv.add_argument("key")
        if name in ("put", "insert", "update"):
            kv.add_argument("value")
        kv.set_defaults(func=_kv)
    k = sub.add_parser("keys", help="CURVE keys: who may talk to the memory nodes over tcp://")
    k.add_argument("action", choices=["init", "add-client", "init-master"],
                   help="init: a keypair per MN and per client; add-client: authorize more; "
                   "init-master: the master's keypair")
    k.add_argument("--dir", required=True, help="keys directory (created owner-only)")
    k.add_argument("--memnodes", type=int, default=3, help="with init: how many MNs")
    k.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="a client to create and authorize (repeatable)")
    k.set_defaults(func=_keys)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError) as e:
        print(f"fusee {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
