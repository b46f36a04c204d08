"""`fusee`: the command line for a person at a terminal.

Each subcommand imports its machinery only when it runs, so `fusee --help` works on a laptop
without RDMA libraries and a memory node does not load the benchmark stack. A failure prints
one line saying what went wrong and what to do, and exits with the code `fusee.exit_codes`
documents (1 is "not found", never a crash); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import fusee
from fusee import exit_codes
from fusee.errors import ConfigError
from fusee.logsetup import add_log_level_option, setup_logging

#: the modules of the [bench] extra, which `fusee bench` needs and a plain install lacks
BENCH_EXTRA = {"numpy", "hdrh", "matplotlib", "redis", "tqdm"}


def _cluster(args: argparse.Namespace) -> int:
    from fusee.emulator.cluster import LocalCluster
    setup_logging(args.log_level)
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


def _memnode(argv: list[str]) -> int:
    from fusee.emulator.memnode import main
    return main(argv)


def _master(argv: list[str]) -> int:
    from fusee.master.command import main
    return main(argv)


def _bench(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "verbs":
            from fusee.bench.verbs import main
            return main(argv[1:])
        if argv and argv[0] == "failover":
            from fusee.bench.failover import main
            return main(argv[1:])
        from fusee.bench.main import main
        return main(argv)
    except KeyboardInterrupt:
        return 130                  # as ``_run`` has it: Ctrl-C, no traceback
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in BENCH_EXTRA:
            raise
        print(f"fusee bench: error: {e.name} is not installed; the benchmarks need the "
              "[bench] extra: pip install 'fusee[bench]'", file=sys.stderr)
        return exit_codes.USAGE


def _rdma(argv: list[str]) -> int:
    if argv and argv[0] == "preflight":
        from fusee.emulator.rdma_preflight import main
        return main(argv[1:])
    print("usage: fusee rdma preflight [--config CLUSTER.toml] [options]", file=sys.stderr)
    return 2


def _value(args: argparse.Namespace) -> bytes:
    """The value argument; ``-`` reads it from stdin, byte for byte (no newline stripped)."""
    if args.value == "-":
        return sys.stdin.buffer.read()
    return os.fsencode(args.value)


def _kv(args: argparse.Namespace) -> int:
    from fusee.client import Client
    key = os.fsencode(args.key)
    value = _value(args) if args.cmd in ("put", "insert", "update") else None
    # one operation and out: mapping the regions whole would take most of the command's
    # time (populate: ``Client.connect``)
    with Client.connect(args.config, transport=args.transport, populate=False) as kv:
        if args.cmd == "get":
            found = kv.get(key)
            if args.json:
                print(json.dumps({"key": args.key, **_json_value(found)}))
            elif found is not None:
                sys.stdout.buffer.write(found + b"\n")
            if found is None:
                print(f"fusee get: {args.key}: not found", file=sys.stderr)
                return exit_codes.NOT_FOUND
        elif args.cmd == "delete":
            kv.delete(key)
        else:
            getattr(kv, args.cmd)(key, value)
    return exit_codes.OK


def _json_value(value: bytes | None) -> dict[str, str | None]:
    """A value as JSON: text when it is UTF-8, else base64 (``value_base64``)."""
    if value is None:
        return {"value": None}
    try:
        return {"value": value.decode()}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode()}


def _status(args: argparse.Namespace) -> int:
    from fusee import cli_status
    from fusee.config import ClusterConfig
    view = cli_status.gather(ClusterConfig.load(args.config))
    print(json.dumps(view, indent=2) if args.json else cli_status.render(view))
    if (wrong := cli_status.wrong_memnode(view)) is not None:
        print(f"fusee status: error: {wrong}", file=sys.stderr)
        return exit_codes.USAGE
    if cli_status.reachable(view):
        return exit_codes.OK
    print("fusee status: error: neither the master nor any memory node answered",
          file=sys.stderr)
    return exit_codes.UNAVAILABLE


#: how long `fusee cluster-id` waits for memory nodes already running from the config: they
#: answer within milliseconds, and a new cluster's (none running) should not wait long
PROBE_TIMEOUT = 1.0


def _cluster_id(args: argparse.Namespace) -> int:
    """Print the config's cluster id, giving it a fresh one first if it has none
    (``fusee.cluster_identity``): a step of making a cluster, before its MNs start."""
    from fusee.cluster_identity import new_cluster_id, serving_without_id
    from fusee.config import ClusterConfig
    config = ClusterConfig.load(args.config)
    if config.cluster_id is None and (running := serving_without_id(config, PROBE_TIMEOUT)):
        node = config.node(running[0])
        raise ConfigError(f"memory node {node.id} at {node.endpoint} is running from this "
                          "config, which has no cluster id: with one, every client and the "
                          "master would refuse the running memory nodes (a restart empties "
                          "them); keep this config without an id, or give a new cluster its "
                          "id before its memory nodes first start")
    if config.cluster_id is None:
        fresh = new_cluster_id()
        config = ClusterConfig.edit(args.config, lambda doc: doc.setdefault("cluster", {})
                                    .update(cluster_id=fresh))
        print(f"# {args.config}: cluster_id set (memory nodes started before from this config "
              "hold none: clients refuse them until they restart with it)", file=sys.stderr)
    print(config.cluster_id)
    return exit_codes.OK


def _keys(args: argparse.Namespace) -> int:
    from fusee.config import ClusterConfig
    from fusee.transports.security import add_client, init_keys, init_master_key
    if args.action == "init-master":
        public = init_master_key(args.dir)
        print(f"# the master's keypair is in {args.dir} (authorized with the memory nodes): "
              f"{args.dir}/master.key_secret goes on the master's host")
        if args.config:
            ClusterConfig.edit(args.config, lambda doc: doc.setdefault("cluster", {}).update(
                master_curve_public=public))
            print(f"# {args.config}: master_curve_public set")
        else:
            print(f'# in the cluster config, [cluster]:\nmaster_curve_public = "{public}"')
    elif args.action == "init":
        memnodes = args.memnodes
        if args.config:             # checked before any key is made
            configured = len(ClusterConfig.load(args.config).memnodes)
            if memnodes not in (None, configured):
                raise ConfigError(f"--memnodes {memnodes}, but {args.config} has {configured} "
                                  "memory nodes: leave --memnodes out")
            memnodes = configured
        publics = init_keys(args.dir, 3 if memnodes is None else memnodes, args.client)
        print(f"# keys written to {args.dir} (secrets are owner-only)")
        if args.config:
            ClusterConfig.edit(args.config, lambda doc: _record_keys(doc, args, publics))
            print(f"# {args.config}: [security] and each memory node's curve_public set")
        else:
            print(f'[security]\ncurve = true\nkeys_dir = "{args.dir}"')
            for i, pub in publics.items():
                print(f'# memnode {i}: curve_public = "{pub}"')
        for name in args.client:
            print(f"# client {name}: FUSEE_CLIENT_KEY={args.dir}/{name}.key_secret")
    else:
        for name in args.client:
            path = add_client(args.dir, name)
            print(f"client {name} authorized; give it FUSEE_CLIENT_KEY={path}")
    return exit_codes.OK


def _record_keys(doc: dict[str, Any], args: argparse.Namespace, publics: dict[int, str]
                 ) -> None:
    """Put what ``fusee keys init`` made into a config document: CURVE on, the keys folder
    (relative to the config's own folder, as it resolves), each MN's public key."""
    folder = os.path.dirname(os.path.abspath(args.config))
    doc.setdefault("security", {}).update(
        curve=True, keys_dir=os.path.relpath(os.path.abspath(args.dir), folder))
    nodes = {m.get("id"): m for m in doc.get("memnodes", [])}
    assert nodes.keys() == publics.keys(), (nodes.keys(), publics.keys())
    for i, public in publics.items():
        nodes[i]["curve_public"] = public


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough = {"memnode": _memnode, "master": _master, "bench": _bench, "rdma": _rdma}
    if argv and argv[0] in passthrough:
        return passthrough[argv[0]](argv[1:]) or 0

    p = argparse.ArgumentParser(prog="fusee", description="A fully memory-disaggregated "
                                "key-value store (after FUSEE, FAST '23).")
    p.add_argument("--version", action="version", version=f"fusee {fusee.__version__}")
    p.add_argument("--debug", action="store_true", help="on a failure, show the traceback too")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on a failure, show the traceback too")
    config = argparse.ArgumentParser(add_help=False)
    default_config = os.environ.get("FUSEE_CONFIG")
    config.add_argument("--config", required=not default_config, default=default_config,
                        help="cluster config (TOML; default: $FUSEE_CONFIG)")
    sub.add_parser("memnode", help="run one memory node (see fusee memnode --help)")
    sub.add_parser("master", help="run the master: MN membership, client leases, recovery "
                   "(see fusee master --help)")
    sub.add_parser("rdma", help="RDMA host checks: fusee rdma preflight [--config C]")
    sub.add_parser("bench", help="YCSB and micro-benchmarks against Clover-style and Redis "
                   "baselines (fusee bench --help); raw verbs: fusee bench verbs --help; "
                   "throughput across an MN crash: fusee bench failover --help")
    c = sub.add_parser("cluster", help="start a local cluster and keep it up until Ctrl-C",
                       parents=[common])
    c.add_argument("--memnodes", type=int, default=3)
    c.add_argument("--transport", default="zmq", choices=["shm", "zmq"])
    c.add_argument("--endpoint", default="ipc", choices=["ipc", "tcp"])
    add_log_level_option(c)
    c.set_defaults(func=_cluster)
    for name, text in (("get", "print a key's value (exit code 1 when absent)"),
                       ("put", "insert or update a key"),
                       ("insert", "add a new key"), ("update", "replace a present key's value"),
                       ("delete", "remove a key")):
        kv = sub.add_parser(name, help=text, parents=[common, config])
        kv.add_argument("--transport", help="backend (default: the config's)")
        kv.add_argument("key")
        if name in ("put", "insert", "update"):
            kv.add_argument("value", help="the value; - reads it from stdin")
        if name == "get":
            kv.add_argument("--json", action="store_true",
                            help='print {"key": ..., "value": ...} (value_base64 if not UTF-8)')
        kv.set_defaults(func=_kv)
    st = sub.add_parser("status", parents=[common, config],
                        help="memory nodes and their state, epoch, clients and leases, memory "
                        "used per MN (from the master, and from the MNs themselves)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)
    ci = sub.add_parser("cluster-id", parents=[common, config],
                        help="print the config's cluster id, writing a fresh one into it first "
                        "if it has none (do it before the memory nodes first start)")
    ci.set_defaults(func=_cluster_id)
    k = sub.add_parser("keys", help="CURVE keys: who may talk to the memory nodes over tcp://",
                       parents=[common])
    k.add_argument("action", choices=["init", "add-client", "init-master"],
                   help="init: a keypair per MN and per client; add-client: authorize more; "
                   "init-master: the master's keypair, authorized with the MNs")
    k.add_argument("--dir", required=True, help="keys directory (created owner-only)")
    k.add_argument("--memnodes", type=int, help="with init: how many MNs (default: the "
                   "config's, else 3)")
    k.add_argument("--config", help="with init / init-master: write the public keys into this "
                   "cluster config (its comments are not kept)")
    k.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="a client to create and authorize (repeatable)")
    k.set_defaults(func=_keys)
    p.epilog = ("exit codes: 0 done, 1 not found (or already exists, for insert), 2 usage or "
                "config error, 3 cluster unavailable, 4 data damaged or lost, 5 internal error")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fusee: %(levelname)s: %(message)s")
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; a failure becomes one line on stderr and its exit code."""
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as e:      # noqa: BLE001 - every failure gets its line and its code
        code, hint = exit_codes.classify(e)
        if args.debug:
            traceback.print_exc()
        label = "" if code == exit_codes.NOT_FOUND else "error: "
        hint = f" ({hint})" if hint else ""
        print(f"fusee {args.cmd}: {label}{exit_codes.describe(e)}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
